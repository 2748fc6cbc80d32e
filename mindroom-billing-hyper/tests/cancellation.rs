//! A webhook whose handling outlives the request (timeout, client gone) is still applied: the
//! decision runs in its own task, so it is never cancelled between record and commit.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http_body_util::Full;
use mindroom_billing_core::dryrun::{DryRunProvisioner, LogNotifier};
use mindroom_billing_core::signature::sign;
use mindroom_billing_core::testing::{HookedStore, StoreHooks};
use mindroom_billing_core::{
    Billing, BillingConfig, Commit, EventStatus, MemoryStore, Store, StoreError, Verifier, WebhookSecret,
};
use mindroom_billing_hyper::{AppState, handle};

/// Every commit first waits this long.
struct SlowCommit(Duration);

#[async_trait]
impl StoreHooks for SlowCommit {
    async fn before_commit(&self, _inner: &dyn Store, _commit: &Commit) -> Result<(), StoreError> {
        tokio::time::sleep(self.0).await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_webhook_is_still_applied_without_waiting_for_redelivery() {
    let secret = WebhookSecret::new("whsec_cancel");
    let store = Arc::new(HookedStore::new(Arc::new(MemoryStore::new()), SlowCommit(Duration::from_millis(400))));
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
