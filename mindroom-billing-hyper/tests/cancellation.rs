//! A webhook whose handling outlives the request (timeout, client gone) is still applied: the
//! decision runs in its own task, so it is never cancelled between record and commit.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use http_body_util::Full;
use mindroom_billing_core::dryrun::{DryRunProvisioner, LogNotifier};
use mindroom_billing_core::ports::{EventFilter, JobFilter};
use mindroom_billing_core::signature::sign;
use mindroom_billing_core::{
    Account, Billing, BillingConfig, Claim, Commit, CommitResult, EventStatus, InstanceRecord, Job, JobCounts,
    JobFinish, Limit, MemoryStore, NewEvent, NewJob, Recorded, Store, StoreError, StoredEvent, SubscriptionState,
    UsageKey, UsageResult, Verifier, WebhookSecret,
};
use mindroom_billing_hyper::{AppState, handle};

/// The in-memory store with a slow commit.
struct SlowCommit {
    inner: MemoryStore,
    delay: Duration,
}

#[async_trait]
impl Store for SlowCommit {
    async fn record_event(&self, event: &NewEvent<'_>) -> Result<Recorded, StoreError> {
        self.inner.record_event(event).await
    }
    async fn load_event(&self, id: &str) -> Result<Option<StoredEvent>, StoreError> {
        self.inner.load_event(id).await
    }
    async fn list_events(&self, filter: &EventFilter) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.list_events(filter).await
    }
    async fn unapplied_events(&self, before: DateTime<Utc>, limit: u32) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.unapplied_events(before, limit).await
    }
    async fn load_subscription(&self, id: &str) -> Result<Option<SubscriptionState>, StoreError> {
        self.inner.load_subscription(id).await
    }
    async fn commit(&self, commit: &Commit) -> Result<CommitResult, StoreError> {
        tokio::time::sleep(self.delay).await;
        self.inner.commit(commit).await
    }
    async fn expired_grace(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<String>, StoreError> {
        self.inner.expired_grace(now, limit).await
    }
    async fn subscriptions_for_account(&self, id: uuid::Uuid) -> Result<Vec<SubscriptionState>, StoreError> {
        self.inner.subscriptions_for_account(id).await
    }
    async fn load_account(&self, customer: &str) -> Result<Option<Account>, StoreError> {
        self.inner.load_account(customer).await
    }
    async fn load_instance(&self, id: &str) -> Result<Option<InstanceRecord>, StoreError> {
        self.inner.load_instance(id).await
    }
    async fn enqueue(&self, jobs: &[NewJob]) -> Result<(), StoreError> {
        self.inner.enqueue(jobs).await
    }
    async fn claim_jobs(&self, claim: &Claim) -> Result<Vec<Job>, StoreError> {
        self.inner.claim_jobs(claim).await
    }
    async fn finish_job(&self, finish: &JobFinish) -> Result<bool, StoreError> {
        self.inner.finish_job(finish).await
    }
    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, StoreError> {
        self.inner.list_jobs(filter).await
    }
    async fn job_counts(&self) -> Result<JobCounts, StoreError> {
        self.inner.job_counts().await
    }
    async fn consume_usage(&self, key: UsageKey, count: u64, limit: Limit) -> Result<UsageResult, StoreError> {
        self.inner.consume_usage(key, count, limit).await
    }
    async fn usage(&self, key: UsageKey) -> Result<u64, StoreError> {
        self.inner.usage(key).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_webhook_is_still_applied_without_waiting_for_redelivery() {
    let secret = WebhookSecret::new("whsec_cancel");
    let store = Arc::new(SlowCommit { inner: MemoryStore::new(), delay: Duration::from_millis(400) });
    let billing = Arc::new(Billing::new(
        store.clone(),
        Arc::new(DryRunProvisioner::default()),
        Arc::new(LogNotifier),
        BillingConfig::new(Verifier::new([secret.clone()])),
    ));
    let state = AppState::new(Arc::clone(&billing)).with_request_timeout(Duration::from_millis(100));
    let body = br#"{"id":"evt_slow","type":"customer.updated","created":1785000000,"data":{"object":{"id":"cus_slow","email":"slow@example.com"}}}"#;
    let header = sign(&secret, body, billing.now().timestamp());
    let request = http::Request::post("/webhooks/stripe")
        .header("stripe-signature", header)
        .body(Full::new(bytes::Bytes::from_static(body)))
        .unwrap();

    let response = handle(&state, request).await;
    assert_eq!(response.status(), 503, "the request itself times out");
    assert_eq!(store.load_event("evt_slow").await.unwrap().unwrap().status, EventStatus::Received);

    // No redelivery, no pick-up: the decision finishes on its own.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let event = store.load_event("evt_slow").await.unwrap().unwrap();
    assert_eq!(event.status, EventStatus::Applied);
    let account = store.load_account("cus_slow").await.unwrap().expect("account written by the decision");
    assert_eq!(account.email.as_deref(), Some("slow@example.com"));
}
