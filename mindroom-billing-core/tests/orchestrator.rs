//! Orchestrator tests with mocked ports (mockall): retries and backoff, permanent errors, dead jobs,
//! compare-and-swap conflicts, duplicates, and events recorded but never committed.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use common::{SUB, TestClock, at, fixture_bytes, policy};
use mindroom_billing_core::model::{
    Commit, CommitResult, EventStatus, InstanceRecord, InstanceStatus, Job, JobKind, JobState, NewEvent, Outcome,
    Recorded, SubscriptionState,
};
use mindroom_billing_core::ports::{
    JobFilter, Message, Notification, NotifyError, ProvisionError, ProvisionRequest, ProvisionedInstance,
};
use mindroom_billing_core::signature::{WebhookSecret, sign};
use mindroom_billing_core::testing::{HookedStore, StoreHooks};
use mindroom_billing_core::{
    Billing, BillingConfig, Disposition, Limits, MemoryStore, Notifier, Provisioner, Store, StoreError, Verifier,
    WorkerConfig, parse,
};
use mockall::mock;

mock! {
    Prov {}
    #[async_trait]
    impl Provisioner for Prov {
        async fn provision(&self, request: &ProvisionRequest) -> Result<ProvisionedInstance, ProvisionError>;
        async fn update_limits(&self, app_name: &str, limits: &Limits, idempotency_key: &str) -> Result<(), ProvisionError>;
        async fn deprovision(&self, app_name: &str, idempotency_key: &str) -> Result<(), ProvisionError>;
    }
}

mock! {
    Notify {}
    #[async_trait]
    impl Notifier for Notify {
        async fn send(&self, notification: &Notification) -> Result<(), NotifyError>;
    }
}

const SECRET: &str = "whsec_orchestrator_test";
const ADMIN: &str = "ops@mindroom.test";
/// Just after the fixtures' `customer.subscription.created` (1785000000).
const NOW: i64 = 1_785_000_010;

fn created_body() -> Vec<u8> {
    fixture_bytes("2026-07-29.dahlia", "customer.subscription.created")
}

fn signed(body: &[u8], now: DateTime<Utc>) -> String {
    sign(&WebhookSecret::new(SECRET), body, now.timestamp())
}

fn instance_ok(request: &ProvisionRequest) -> Result<ProvisionedInstance, ProvisionError> {
    Ok(ProvisionedInstance {
        app_name: request.app_name.clone(),
        subdomain: Some(format!("{}.example", request.app_name)),
        frontend_url: Some(format!("https://{}.example", request.app_name)),
        backend_url: None,
    })
}

/// A notifier that accepts everything and remembers admin alerts.
fn quiet_notifier(alerts: Arc<AtomicU32>) -> MockNotify {
    let mut n = MockNotify::new();
    n.expect_send().returning(move |note| {
        if let Message::AdminAlert { .. } = note.message {
            assert_eq!(note.to, ADMIN);
            alerts.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    });
    n
}

struct Harness {
    billing: Billing,
    store: Arc<dyn Store>,
    clock: Arc<TestClock>,
}

fn harness(store: Arc<dyn Store>, provisioner: MockProv, notifier: MockNotify, max_attempts: u32) -> Harness {
    let clock = Arc::new(TestClock::new(at(NOW)));
    let worker = WorkerConfig {
        max_attempts,
        backoff_base: std::time::Duration::from_secs(2),
        backoff_max: std::time::Duration::from_secs(60),
        ..WorkerConfig::default()
    };
    let config = BillingConfig::new(Verifier::new([WebhookSecret::new(SECRET)]))
        .with_policy(policy())
        .with_worker(worker)
        .with_admin_email(ADMIN);
    let billing = Billing::new(Arc::clone(&store), Arc::new(provisioner), Arc::new(notifier), config)
        .with_clock(Arc::clone(&clock) as Arc<dyn mindroom_billing_core::Clock>);
    Harness { billing, store, clock }
}

impl Harness {
    async fn receive(&self, body: &[u8]) -> Disposition {
        let header = signed(body, self.clock.now_utc());
        self.billing.receive(Some(&header), body).await.unwrap().disposition
    }

    async fn jobs(&self) -> Vec<Job> {
        let mut jobs = self.store.list_jobs(&JobFilter { state: None, limit: 1000 }).await.unwrap();
        jobs.sort_by_key(|j| j.id);
        jobs
    }

    async fn reconcile_job(&self) -> Job {
        self.jobs().await.into_iter().find(|j| matches!(j.kind, JobKind::Reconcile { .. })).expect("reconcile job")
    }

    async fn instance(&self) -> Option<InstanceRecord> {
        self.store.load_instance(SUB).await.unwrap()
    }
}

trait NowUtc {
    fn now_utc(&self) -> DateTime<Utc>;
}

impl NowUtc for TestClock {
    fn now_utc(&self) -> DateTime<Utc> {
        mindroom_billing_core::Clock::now(self)
    }
}

#[tokio::test]
async fn retryable_provisioner_errors_are_retried_with_backoff() {
    let calls = Arc::new(AtomicU32::new(0));
    let mut prov = MockProv::new();
    let c = Arc::clone(&calls);
    prov.expect_provision().times(3).returning(move |req| {
        // Operation, generation, desired tier and job: one key for every retry of this job.
        assert_eq!(req.idempotency_key, format!("provision:{SUB}:1:starter:1"), "one key for every retry");
        match c.fetch_add(1, Ordering::SeqCst) {
            0 | 1 => Err(ProvisionError::retryable("503 from provisioner")),
            _ => instance_ok(req),
        }
    });
    let h = harness(Arc::new(MemoryStore::new()), prov, quiet_notifier(Arc::default()), 5);
    assert_eq!(h.receive(&created_body()).await, Disposition::Applied);

    // Attempt 1 fails: pending again, run_after within [base/2, base] from now.
    assert_eq!(h.billing.run_due_jobs(10).await.unwrap(), 1);
    let job = h.reconcile_job().await;
    assert_eq!((job.state, job.attempts), (JobState::Pending, 1));
    assert!(job.last_error.as_deref().is_some_and(|e| e.contains("503")), "{:?}", job.last_error);
    let now = h.clock.now_utc();
    assert!(job.run_after >= now + Duration::seconds(1) && job.run_after <= now + Duration::seconds(2), "{job:?}");
    assert_eq!(h.billing.run_due_jobs(10).await.unwrap(), 0, "not due before run_after");

    // Attempt 2 fails: the delay doubles.
    h.clock.advance(Duration::seconds(2));
    assert_eq!(h.billing.run_due_jobs(10).await.unwrap(), 1);
    let job = h.reconcile_job().await;
    let now = h.clock.now_utc();
    assert_eq!((job.state, job.attempts), (JobState::Pending, 2));
    assert!(job.run_after >= now + Duration::seconds(2) && job.run_after <= now + Duration::seconds(4), "{job:?}");

    // Attempt 3 succeeds.
    h.clock.advance(Duration::seconds(4));
    h.billing.run_due_jobs(10).await.unwrap();
    let job = h.reconcile_job().await;
    assert_eq!((job.state, job.attempts), (JobState::Done, 3));
    let instance = h.instance().await.unwrap();
    assert_eq!((instance.status, instance.generation), (InstanceStatus::Running, 1));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn retry_after_from_the_provisioner_is_honoured() {
    let mut prov = MockProv::new();
    prov.expect_provision().times(1).returning(|_| {
        Err(ProvisionError::Retryable {
            message: "429".into(),
            retry_after: Some(std::time::Duration::from_secs(30)),
            source: None,
        })
    });
    let h = harness(Arc::new(MemoryStore::new()), prov, quiet_notifier(Arc::default()), 5);
    h.receive(&created_body()).await;
    h.billing.run_due_jobs(10).await.unwrap();
    let job = h.reconcile_job().await;
    assert_eq!(job.run_after, h.clock.now_utc() + Duration::seconds(30));
}

#[tokio::test]
async fn permanent_errors_are_not_retried_the_instance_fails_and_the_admin_is_alerted() {
    let mut prov = MockProv::new();
    prov.expect_provision().times(1).returning(|_| Err(ProvisionError::permanent("422 invalid tier")));
    let alerts = Arc::new(AtomicU32::new(0));
    let h = harness(Arc::new(MemoryStore::new()), prov, quiet_notifier(Arc::clone(&alerts)), 10);
    h.receive(&created_body()).await;
    h.billing.run_due_jobs(1).await.unwrap();

    let job = h.reconcile_job().await;
    assert_eq!((job.state, job.attempts), (JobState::Dead, 1), "dead at once, no retry");
    assert_eq!(h.instance().await.unwrap().status, InstanceStatus::Failed);
    let alert_jobs: Vec<Job> =
        h.jobs().await.into_iter().filter(|j| matches!(j.kind, JobKind::AdminAlert { .. })).collect();
    assert_eq!(alert_jobs.len(), 1);
    assert!(
        matches!(&alert_jobs[0].kind, JobKind::AdminAlert { detail, .. } if detail.contains("422 invalid tier")),
        "{alert_jobs:?}"
    );

    // The worker sends the alert to ADMIN_EMAIL; nothing calls the provisioner again.
    for _ in 0..3 {
        h.clock.advance(Duration::hours(1));
        h.billing.run_due_jobs(10).await.unwrap();
    }
    assert_eq!(alerts.load(Ordering::SeqCst), 1);
    assert_eq!(h.store.job_counts().await.unwrap().pending, 0);
}

#[tokio::test]
async fn a_job_dead_after_max_attempts_marks_the_instance_failed_and_alerts_once() {
    let mut prov = MockProv::new();
    prov.expect_provision().times(3).returning(|_| Err(ProvisionError::retryable("connect refused")));
    let alerts = Arc::new(AtomicU32::new(0));
    let h = harness(Arc::new(MemoryStore::new()), prov, quiet_notifier(Arc::clone(&alerts)), 3);
    h.receive(&created_body()).await;
    for attempt in 1..=3 {
        assert!(h.billing.run_due_jobs(1).await.unwrap() >= 1, "attempt {attempt}");
        let job = h.reconcile_job().await;
        assert_eq!(job.attempts, attempt);
        let expected = if attempt < 3 { JobState::Pending } else { JobState::Dead };
        assert_eq!(job.state, expected, "attempt {attempt}");
        h.clock.advance(Duration::minutes(5));
    }
    assert_eq!(h.instance().await.unwrap().status, InstanceStatus::Failed);
    for _ in 0..4 {
        h.billing.run_due_jobs(10).await.unwrap();
        h.clock.advance(Duration::hours(1));
    }
    assert_eq!(alerts.load(Ordering::SeqCst), 1, "exactly one alert");
    let counts = h.store.job_counts().await.unwrap();
    assert_eq!((counts.dead, counts.pending, counts.running), (1, 0, 0));
}

/// Hooks under which the first commit loses a compare-and-swap: a concurrent writer (another
/// replica) commits a change to the aggregate just before it.
struct ConcurrentWriter {
    armed: AtomicBool,
    commits: Arc<AtomicU32>,
}

#[async_trait]
impl StoreHooks for ConcurrentWriter {
    async fn before_commit(&self, inner: &dyn Store, commit: &Commit) -> Result<(), StoreError> {
        self.commits.fetch_add(1, Ordering::SeqCst);
        if !self.armed.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        if let Some(next) = &commit.subscription {
            // The other replica's write: a payment fact on the same aggregate.
            let mut theirs = inner
                .load_subscription(&next.subscription_id)
                .await?
                .unwrap_or_else(|| SubscriptionState::new(&next.subscription_id, &next.customer_id));
            theirs.good_standing_at = Some(at(1_784_999_000));
            let other = Commit {
                now: commit.now,
                event_id: None,
                outcome: Outcome::Applied,
                subscription: Some(theirs),
                account: None,
                jobs: Vec::new(),
            };
            assert_eq!(inner.commit(&other).await?, CommitResult::Committed);
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_cas_conflict_is_retried_and_the_event_applied_once() {
    let commits = Arc::new(AtomicU32::new(0));
    let hooks = ConcurrentWriter { armed: AtomicBool::new(true), commits: Arc::clone(&commits) };
    let store = Arc::new(HookedStore::new(Arc::new(MemoryStore::new()), hooks));
    let mut prov = MockProv::new();
    prov.expect_provision().times(1).returning(instance_ok);
    let h = harness(Arc::clone(&store) as Arc<dyn Store>, prov, quiet_notifier(Arc::default()), 5);
    let body = created_body();
    assert_eq!(h.receive(&body).await, Disposition::Applied);
    // Injected write + the lost CAS + the re-decided commit.
    assert_eq!(commits.load(Ordering::SeqCst), 2);
    let state = store.load_subscription(SUB).await.unwrap().unwrap();
    assert_eq!(state.version, 2, "the other write and ours");
    assert_eq!(state.good_standing_at, Some(at(1_785_000_000)), "our decision was made on the reloaded state");
    assert!(state.snapshot.is_some());
    let id = parse(&body).unwrap().id;
    assert_eq!(store.load_event(&id).await.unwrap().unwrap().status, EventStatus::Applied);
    let reconciles = h.jobs().await.iter().filter(|j| matches!(j.kind, JobKind::Reconcile { .. })).count();
    assert_eq!(reconciles, 1);
    h.billing.run_due_jobs(10).await.unwrap();
    assert_eq!(h.instance().await.unwrap().status, InstanceStatus::Running);
}

#[tokio::test]
async fn a_duplicate_of_an_applied_event_produces_nothing() {
    let mut prov = MockProv::new();
    prov.expect_provision().times(1).returning(instance_ok);
    let h = harness(Arc::new(MemoryStore::new()), prov, quiet_notifier(Arc::default()), 5);
    let body = created_body();
    // The customer's address first, so the welcome e-mail goes out instead of waiting for one.
    let customer = fixture_bytes("2026-07-29.dahlia", "customer.updated");
    assert_eq!(h.receive(&customer).await, Disposition::Applied);
    assert_eq!(h.receive(&body).await, Disposition::Applied);
    // Drain: the reconcile, then the welcome e-mail it queued.
    while h.billing.run_due_jobs(10).await.unwrap() > 0 {}
    let jobs_before = h.jobs().await;
    assert!(jobs_before.iter().all(|j| j.state == JobState::Done), "{jobs_before:?}");
    let state_before = h.store.load_subscription(SUB).await.unwrap();

    for _ in 0..3 {
        h.clock.advance(Duration::seconds(1));
        assert_eq!(h.receive(&body).await, Disposition::Duplicate);
    }
    assert_eq!(h.billing.run_due_jobs(10).await.unwrap(), 0, "no new jobs");
    assert_eq!(h.jobs().await, jobs_before);
    assert_eq!(h.store.load_subscription(SUB).await.unwrap(), state_before);
    let stored = h.store.load_event(&parse(&body).unwrap().id).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.deliveries), (EventStatus::Applied, 4));
    assert_eq!(stored.payload.as_bytes(), &body[..], "stored byte for byte");
}

fn new_event<'a>(
    event: &'a mindroom_billing_core::Event,
    payload: &'a str,
    received_at: DateTime<Utc>,
) -> NewEvent<'a> {
    NewEvent {
        id: &event.id,
        event_type: event.event_type.as_str(),
        created: event.created,
        api_version: event.api_version.as_deref(),
        livemode: event.livemode,
        payload,
        received_at,
        source: mindroom_billing_core::EventSource::Webhook,
        customer_id: None,
    }
}

#[tokio::test]
async fn an_event_recorded_but_never_committed_is_applied_on_redelivery() {
    let mut prov = MockProv::new();
    prov.expect_provision().times(1).returning(instance_ok);
    let h = harness(Arc::new(MemoryStore::new()), prov, quiet_notifier(Arc::default()), 5);
    let body = created_body();
    let event = parse(&body).unwrap();
    // The crash: recorded, then nothing.
    let payload = std::str::from_utf8(&body).unwrap();
    assert_eq!(h.store.record_event(&new_event(&event, payload, h.clock.now_utc())).await.unwrap(), Recorded::Fresh);
    assert!(h.store.load_subscription(SUB).await.unwrap().is_none());

    h.clock.advance(Duration::seconds(5));
    assert_eq!(h.receive(&body).await, Disposition::Applied, "the redelivery applies it");
    assert_eq!(h.store.load_event(&event.id).await.unwrap().unwrap().status, EventStatus::Applied);
    h.billing.run_due_jobs(10).await.unwrap();
    assert_eq!(h.instance().await.unwrap().status, InstanceStatus::Running);
    assert_eq!(h.receive(&body).await, Disposition::Duplicate);
}

#[tokio::test]
async fn the_worker_picks_up_events_left_unapplied() {
    let mut prov = MockProv::new();
    prov.expect_provision().times(1).returning(instance_ok);
    let h = harness(Arc::new(MemoryStore::new()), prov, quiet_notifier(Arc::default()), 5);
    let body = created_body();
    let event = parse(&body).unwrap();
    let payload = std::str::from_utf8(&body).unwrap();
    h.store.record_event(&new_event(&event, payload, h.clock.now_utc())).await.unwrap();
    // A second, recent one must wait.
    let other_body = fixture_bytes("2026-07-29.dahlia", "customer.updated");
    let other = parse(&other_body).unwrap();
    h.clock.advance(Duration::seconds(50));
    let other_payload = std::str::from_utf8(&other_body).unwrap();
    h.store.record_event(&new_event(&other, other_payload, h.clock.now_utc())).await.unwrap();

    assert_eq!(h.billing.pick_up_unapplied().await.unwrap(), 0, "younger than unapplied_after (60 s)");
    h.clock.advance(Duration::seconds(11));
    assert_eq!(h.billing.pick_up_unapplied().await.unwrap(), 1);
    assert_eq!(h.store.load_event(&event.id).await.unwrap().unwrap().status, EventStatus::Applied);
    assert_eq!(h.store.load_event(&other.id).await.unwrap().unwrap().status, EventStatus::Received);
    assert!(h.store.load_subscription(SUB).await.unwrap().is_some());
    h.billing.run_due_jobs(10).await.unwrap();
    assert_eq!(h.instance().await.unwrap().status, InstanceStatus::Running);
    // Picked up once: nothing left for the first, and a redelivery is a duplicate.
    h.clock.advance(Duration::minutes(2));
    assert_eq!(h.billing.pick_up_unapplied().await.unwrap(), 1, "only the second one now");
    assert_eq!(h.receive(&body).await, Disposition::Duplicate);
}
