//! Test helpers (feature `test-util`): a store wrapper for injecting faults and races.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::model::{
    Account, Claim, Commit, CommitResult, InstanceRecord, Job, JobCounts, JobFinish, NewEvent, NewJob, Recorded,
    StoredEvent, SubscriptionState, SyncCursor, UsageKey, UsageResult,
};
use crate::ports::{EventFilter, JobFilter, Store, StoreError};
use crate::tier::Limit;

/// What a test runs around a store's decision path. Every hook defaults to doing nothing.
#[async_trait]
pub trait StoreHooks: Send + Sync + 'static {
    /// After `load_subscription` answered (e.g. to line two writers up on a barrier).
    async fn after_load(&self, _subscription_id: &str) {}

    /// Before a commit reaches the store (e.g. to commit a competing write first, or to be slow).
    async fn before_commit(&self, _inner: &dyn Store, _commit: &Commit) -> Result<(), StoreError> {
        Ok(())
    }

    /// With each commit's result (e.g. to count lost compare-and-swaps).
    async fn after_commit(&self, _result: &Result<CommitResult, StoreError>) {}
}

/// A store that passes every call to `inner` and runs `hooks` around loads and commits.
///
/// `record_and_load` keeps the trait's default (record, then `load_subscription`), so the load hook
/// also runs on the webhook path, whatever the inner store's one-round-trip version does.
pub struct HookedStore<H> {
    /// The real store.
    pub inner: Arc<dyn Store>,
    /// The test's hooks.
    pub hooks: H,
}

impl<H> HookedStore<H> {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Store>, hooks: H) -> Self {
        Self { inner, hooks }
    }
}

#[async_trait]
impl<H: StoreHooks> Store for HookedStore<H> {
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
        let loaded = self.inner.load_subscription(id).await;
        self.hooks.after_load(id).await;
        loaded
    }
    async fn commit(&self, commit: &Commit) -> Result<CommitResult, StoreError> {
        self.hooks.before_commit(&*self.inner, commit).await?;
        let result = self.inner.commit(commit).await;
        self.hooks.after_commit(&result).await;
        result
    }
    async fn expired_grace(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<String>, StoreError> {
        self.inner.expired_grace(now, limit).await
    }
    async fn subscriptions_for_account(&self, account_id: Uuid) -> Result<Vec<SubscriptionState>, StoreError> {
        self.inner.subscriptions_for_account(account_id).await
    }
    async fn load_account(&self, customer: &str) -> Result<Option<Account>, StoreError> {
        self.inner.load_account(customer).await
    }
    async fn accounts_by_reference(&self, reference: &str, limit: u32) -> Result<Vec<Account>, StoreError> {
        self.inner.accounts_by_reference(reference, limit).await
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
    async fn record_instance_intent(
        &self,
        job_id: i64,
        attempt: u32,
        instance: &InstanceRecord,
    ) -> Result<bool, StoreError> {
        self.inner.record_instance_intent(job_id, attempt, instance).await
    }
    async fn extend_lease(&self, job_id: i64, attempt: u32, locked_until: DateTime<Utc>) -> Result<bool, StoreError> {
        self.inner.extend_lease(job_id, attempt, locked_until).await
    }
    async fn load_cursor(&self, name: &str) -> Result<Option<SyncCursor>, StoreError> {
        self.inner.load_cursor(name).await
    }
    async fn save_cursor(&self, name: &str, cursor: &SyncCursor) -> Result<(), StoreError> {
        self.inner.save_cursor(name, cursor).await
    }
    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        self.inner.try_lease(name, holder, now, until).await
    }
    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, StoreError> {
        self.inner.list_jobs(filter).await
    }
    async fn job_counts(&self) -> Result<JobCounts, StoreError> {
        self.inner.job_counts().await
    }
    async fn consume_usage(
        &self,
        key: UsageKey,
        count: u64,
        limit: Limit,
        idempotency: Option<crate::model::UsageRequestKey<'_>>,
    ) -> Result<UsageResult, StoreError> {
        self.inner.consume_usage(key, count, limit, idempotency).await
    }
    async fn usage(&self, key: UsageKey) -> Result<u64, StoreError> {
        self.inner.usage(key).await
    }
    async fn prune(
        &self,
        request: &crate::retention::PruneRequest,
    ) -> Result<crate::retention::PruneReport, StoreError> {
        self.inner.prune(request).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}
