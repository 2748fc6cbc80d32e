//! Retention in the orchestrator: `Billing::prune` works through the backlog in batches, a dry run
//! changes nothing, and the background worker prunes under its singleton lease. What each store
//! prunes is the conformance suite's business (`retention_prunes_only_old_done_history`).

mod common;

use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use common::{T0, TestClock, at};
use mindroom_billing_core::dryrun::{DryRunProvisioner, LogNotifier};
use mindroom_billing_core::model::{Commit, EventSource, EventStatus, NewEvent, Outcome};
use mindroom_billing_core::{
    Billing, BillingConfig, MemoryStore, PruneReport, RetentionPolicy, Store, Verifier, WebhookSecret,
};

fn now() -> DateTime<Utc> {
    at(T0)
}

/// Records `id` received at `received_at` and commits it with `outcome`.
async fn stored(store: &MemoryStore, id: &str, received_at: DateTime<Utc>, outcome: Outcome) {
    let event = NewEvent {
        id,
        event_type: "invoice.paid",
        created: received_at,
        api_version: None,
        livemode: false,
        payload: "{}",
        received_at,
        source: EventSource::Webhook,
        customer_id: None,
    };
    store.record_event(&event).await.unwrap();
    let commit = Commit {
        now: received_at,
        event_id: Some(id.into()),
        outcome,
        subscription: None,
        account: None,
        jobs: vec![],
    };
    store.commit(&commit).await.unwrap();
}

async fn world(policy: RetentionPolicy) -> (Arc<Billing>, Arc<MemoryStore>) {
    let store = Arc::new(MemoryStore::new());
    for i in 0..25 {
        stored(&store, &format!("evt_old_{i:02}"), now() - Duration::days(401), Outcome::Applied).await;
    }
    stored(&store, "evt_old_failed", now() - Duration::days(401), Outcome::Failed("unknown price".into())).await;
    stored(&store, "evt_recent", now() - Duration::days(399), Outcome::Applied).await;
    let config = BillingConfig::new(Verifier::new([WebhookSecret::new("whsec_retention")])).with_retention(policy);
    let billing = Billing::new(
        Arc::clone(&store) as Arc<dyn Store>,
        Arc::new(DryRunProvisioner::default()),
        Arc::new(LogNotifier),
        config,
    )
    .with_clock(Arc::new(TestClock::new(now())));
    (Arc::new(billing), store)
}

#[tokio::test]
async fn prune_works_through_the_backlog_in_batches_and_a_dry_run_changes_nothing() {
    let (billing, store) = world(RetentionPolicy::default().with_batch(10)).await;
    let would = billing.prune(true, None).await.unwrap();
    assert_eq!(would, PruneReport { events: 25, payloads: 0, jobs: 0 });
    assert!(store.load_event("evt_old_00").await.unwrap().is_some(), "a dry run deletes nothing");

    assert_eq!(billing.prune(false, Some(1)).await.unwrap().events, 10, "one batch of 10");
    assert_eq!(billing.prune(false, None).await.unwrap().events, 15, "then the rest, batch by batch");
    assert_eq!(billing.prune(false, None).await.unwrap(), PruneReport::default());
    let failed = store.load_event("evt_old_failed").await.unwrap().expect("a failed event is never pruned");
    assert_eq!(failed.status, EventStatus::Failed);
    assert!(store.load_event("evt_recent").await.unwrap().is_some(), "inside the 400 days");
}

#[tokio::test]
async fn the_worker_prunes_in_the_background_under_its_lease() {
    let policy = RetentionPolicy::default().with_batch(10).with_interval(StdDuration::from_millis(10));
    let (billing, store) = world(policy).await;
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(Arc::clone(&billing).run_background(shutdown));
    // Bounded wait for the behaviour (not a timing assertion): the old events go.
    let mut pruned = false;
    for _ in 0..1_000 {
        if store.load_event("evt_old_24").await.unwrap().is_none()
            && store.load_event("evt_old_00").await.unwrap().is_none()
        {
            pruned = true;
            break;
        }
        tokio::time::sleep(StdDuration::from_millis(10)).await;
    }
    stop.send(true).unwrap();
    worker.await.unwrap();
    assert!(pruned, "the worker pruned the events older than the retention");
    assert!(store.load_event("evt_old_failed").await.unwrap().is_some());
    assert!(store.load_event("evt_recent").await.unwrap().is_some());
    let other = store.try_lease("retention_prune", "another-replica", now(), now() + Duration::minutes(1)).await;
    assert!(!other.unwrap(), "the worker holds the pruning lease, so no other replica prunes meanwhile");
}

/// Counts the e-mails sent, by label.
#[derive(Debug, Default)]
struct Outbox(std::sync::Mutex<Vec<String>>);

#[async_trait::async_trait]
impl mindroom_billing_core::Notifier for Outbox {
    async fn send(
        &self,
        notification: &mindroom_billing_core::ports::Notification,
    ) -> Result<(), mindroom_billing_core::ports::NotifyError> {
        self.0.lock().unwrap().push(format!("{:?}", notification.message));
        Ok(())
    }
}

#[tokio::test]
async fn a_retried_failed_invoice_after_a_short_retention_emails_once() {
    use mindroom_billing_core::signature::sign;
    let secret = "whsec_retention";
    let store = Arc::new(MemoryStore::new());
    let outbox = Arc::new(Outbox::default());
    let clock = Arc::new(TestClock::new(now()));
    let config = BillingConfig::new(Verifier::new([WebhookSecret::new(secret)]))
        .with_policy(common::policy())
        .with_retention(RetentionPolicy::default().with_retention(Duration::days(1)));
    let billing = Billing::new(
        Arc::clone(&store) as Arc<dyn Store>,
        Arc::new(DryRunProvisioner::default()),
        Arc::clone(&outbox) as Arc<dyn mindroom_billing_core::Notifier>,
        config,
    )
    .with_clock(Arc::clone(&clock) as Arc<dyn mindroom_billing_core::Clock>);
    let deliver = |raw: String| {
        let billing = &billing;
        let clock = &clock;
        async move {
            let header = sign(
                &WebhookSecret::new(secret),
                raw.as_bytes(),
                mindroom_billing_core::Clock::now(&**clock).timestamp(),
            );
            billing.receive(Some(&header), raw.as_bytes()).await.unwrap();
            while billing.run_due_jobs(10).await.unwrap() > 0 {}
        }
    };
    let sub = common::SUB;
    deliver(common::subscription_json(
        "evt_r_created",
        "customer.subscription.created",
        T0,
        sub,
        "active",
        common::PRICE_STARTER,
        true,
    ))
    .await;
    clock.set(now() + Duration::hours(1));
    deliver(common::invoice_json("evt_r_failed_1", "invoice.payment_failed", T0 + 3600, "in_r", sub, true)).await;
    let failures = |outbox: &Outbox| outbox.0.lock().unwrap().iter().filter(|m| m.starts_with("PaymentFailed")).count();
    assert_eq!(failures(&outbox), 1);
    // Day 3: retention has pruned what it may; Stripe's next attempt on the same invoice fails too.
    clock.set(now() + Duration::days(3));
    billing.prune(false, None).await.unwrap();
    deliver(common::invoice_json("evt_r_failed_2", "invoice.payment_failed", T0 + 3 * 86_400, "in_r", sub, true)).await;
    assert_eq!(failures(&outbox), 1, "the customer is told once per invoice: {:?}", outbox.0.lock().unwrap());
}

#[tokio::test]
async fn a_usage_call_retried_across_midnight_counts_once() {
    use mindroom_billing_core::Metric;
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(TestClock::new(at(1_785_023_999))); // 23:59:59 UTC
    let billing = Billing::new(
        Arc::clone(&store) as Arc<dyn Store>,
        Arc::new(DryRunProvisioner::default()),
        Arc::new(LogNotifier),
        BillingConfig::new(Verifier::new([WebhookSecret::new("whsec_usage")])),
    )
    .with_clock(Arc::clone(&clock) as Arc<dyn mindroom_billing_core::Clock>);
    let account = uuid::Uuid::new_v4();
    billing.consume_usage(account, Metric::Messages, 2, None).await.unwrap();
    let first = billing.consume_usage(account, Metric::Messages, 5, Some("req-midnight")).await.unwrap();
    assert_eq!(first.used, 7);
    // The answer was lost; the client retries two seconds later, on the next UTC day.
    clock.set(at(1_785_024_001));
    let retried = billing.consume_usage(account, Metric::Messages, 5, Some("req-midnight")).await.unwrap();
    assert_eq!(retried.used, 7, "the retry answers the first call");
    let today = billing.consume_usage(account, Metric::Messages, 0, None).await.unwrap();
    assert_eq!(today.used, 0, "nothing counted on the new day");
}
