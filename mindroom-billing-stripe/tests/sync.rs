//! Catch-up and reconciliation end to end (DESIGN §8): the real client against the local Stripe API
//! stub on 127.0.0.1, a real `Billing` over the in-memory store and over PostgreSQL (a fresh
//! database per test), a provisioner and a notifier that record what they are asked, and real
//! webhook signatures for the deliveries that race the API.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mindroom_billing_core::model::{Commit, EventSource, EventStatus, SubscriptionState, SyncCursor};
use mindroom_billing_core::ports::{
    Message, Notification, NotifyError, ProvisionError, ProvisionRequest, ProvisionedInstance,
};
use mindroom_billing_core::service::{DriftField, SyncError};
use mindroom_billing_core::signature::{WebhookSecret, sign};
use mindroom_billing_core::stripe_api::StripeApiError;
use mindroom_billing_core::testing::{HookedStore, StoreHooks};
use mindroom_billing_core::{
    Billing, BillingConfig, Clock, DesiredInstance, Disposition, Limits, MemoryStore, Notifier, Policy, PriceCatalog,
    Provisioner, Store, StoreError, Tier, Verifier,
};
use mindroom_billing_stripe::StripeClient;
use mindroom_billing_supabase::testing::TestDb;
use mindroom_billing_supabase::{PgStore, PgStoreOptions};
use serde_json::{Value, json};

mod common;
#[path = "../../testsupport/stripe_stub.rs"]
mod stub;

use stub::{Fault, StripeStub};

const KEY: &str = "sk_test_SYNC_0123456789abcdef";
const SECRET: &str = "whsec_sync_test";
const STARTER: &str = "price_starter_sync";
const PRO: &str = "price_pro_sync";
/// Events of the tests are created from here on; the clock starts an hour later.
const T0: i64 = 1_785_000_000;
const HOUR: i64 = 3_600;
const CURSOR: &str = "stripe_catch_up";

fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap()
}

#[derive(Debug)]
struct TestClock(Mutex<DateTime<Utc>>);

impl TestClock {
    fn set(&self, now: DateTime<Utc>) {
        *self.0.lock().unwrap() = now;
    }
}

impl Clock for TestClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }
}

/// What the provisioner was asked, in order.
#[derive(Debug, Clone, PartialEq)]
enum Call {
    Provision(String, Tier),
    Update(String, Limits),
    Deprovision(String),
}

#[derive(Default)]
struct RecordingProvisioner(Mutex<Vec<Call>>);

impl RecordingProvisioner {
    fn calls(&self) -> Vec<Call> {
        self.0.lock().unwrap().clone()
    }
}

#[async_trait]
impl Provisioner for RecordingProvisioner {
    async fn provision(&self, request: &ProvisionRequest) -> Result<ProvisionedInstance, ProvisionError> {
        self.0.lock().unwrap().push(Call::Provision(request.subscription_id.clone(), request.tier));
        Ok(ProvisionedInstance {
            app_name: request.app_name.clone(),
            subdomain: None,
            frontend_url: Some(format!("https://{}.example", request.app_name)),
            backend_url: None,
        })
    }

    async fn update_limits(&self, app_name: &str, limits: &Limits, _key: &str) -> Result<(), ProvisionError> {
        self.0.lock().unwrap().push(Call::Update(app_name.to_owned(), *limits));
        Ok(())
    }

    async fn deprovision(&self, app_name: &str, _key: &str) -> Result<(), ProvisionError> {
        self.0.lock().unwrap().push(Call::Deprovision(app_name.to_owned()));
        Ok(())
    }
}

#[derive(Default)]
struct RecordingNotifier(Mutex<Vec<Notification>>);

#[async_trait]
impl Notifier for RecordingNotifier {
    async fn send(&self, notification: &Notification) -> Result<(), NotifyError> {
        self.0.lock().unwrap().push(notification.clone());
        Ok(())
    }
}

/// The store under test; a PostgreSQL one keeps its database alive.
struct Backend {
    store: Arc<dyn Store>,
    _db: Option<TestDb>,
}

fn memory() -> Backend {
    Backend { store: Arc::new(MemoryStore::new()), _db: None }
}

async fn postgres() -> Backend {
    let db = TestDb::create().await.expect("test database (PostgreSQL on 127.0.0.1:5432 or DATABASE_URL)");
    let store = PgStore::connect(db.url(), PgStoreOptions::default().with_max_connections(4)).await.unwrap();
    store.migrate().await.unwrap();
    Backend { store: Arc::new(store), _db: Some(db) }
}

/// Runs `$name(backend)` as two tests: `$name::memory` and `$name::postgres`.
macro_rules! on_both_stores {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn memory() {
                super::$name(super::memory()).await;
            }

            #[tokio::test]
            async fn postgres() {
                super::$name(super::postgres().await).await;
            }
        }
    };
}

struct Env {
    stub: StripeStub,
    billing: Billing,
    store: Arc<dyn Store>,
    clock: Arc<TestClock>,
    provisioner: Arc<RecordingProvisioner>,
    notifier: Arc<RecordingNotifier>,
    _db: Option<TestDb>,
}

async fn env(backend: Backend) -> Env {
    env_with_key(backend, KEY).await
}

/// An environment whose client uses `key` (the stub accepts only [`KEY`]).
async fn env_with_key(backend: Backend, key: &str) -> Env {
    let stub = StripeStub::start(KEY).await;
    let clock = Arc::new(TestClock(Mutex::new(at(T0 + HOUR))));
    let provisioner = Arc::new(RecordingProvisioner::default());
    let notifier = Arc::new(RecordingNotifier::default());
    let billing = billing(Arc::clone(&backend.store), &stub.url, key, &clock, &provisioner, &notifier);
    Env { stub, billing, store: backend.store, clock, provisioner, notifier, _db: backend._db }
}

fn billing(
    store: Arc<dyn Store>,
    url: &str,
    key: &str,
    clock: &Arc<TestClock>,
    provisioner: &Arc<RecordingProvisioner>,
    notifier: &Arc<RecordingNotifier>,
) -> Billing {
    let policy = Policy::default()
        .with_prices(PriceCatalog::new().with_price(STARTER, Tier::Starter).with_price(PRO, Tier::Professional));
    let config = BillingConfig::new(Verifier::new([WebhookSecret::new(SECRET)])).with_policy(policy);
    let client = StripeClient::new(common::quick_config(url, key)).unwrap();
    Billing::new(
        store,
        Arc::clone(provisioner) as Arc<dyn Provisioner>,
        Arc::clone(notifier) as Arc<dyn Notifier>,
        config,
    )
    .with_clock(Arc::clone(clock) as Arc<dyn Clock>)
    .with_stripe_api(Arc::new(client))
}

/// A subscription object as Stripe holds it (the 2026-07-29.dahlia shape: the period on the item).
fn subscription(sub: &str, cus: &str, status: &str, price: &str, created: i64) -> Value {
    json!({
        "id": sub, "object": "subscription", "customer": cus, "status": status, "created": created,
        "cancel_at_period_end": false,
        "canceled_at": if status == "canceled" { json!(created) } else { Value::Null },
        "trial_end": null, "metadata": {},
        "items": {"object": "list", "has_more": false, "data": [{
            "id": format!("si_{sub}"), "object": "subscription_item", "quantity": 1,
            "price": {"id": price, "object": "price"}, "current_period_end": created + 30 * 86_400,
        }]},
    })
}

/// Adds a `customer.subscription.created` event (active, starter) to the stub; returns its JSON text.
fn created_event(stub: &StripeStub, id: &str, sub: &str, cus: &str, created: i64) -> String {
    stub.add_event(id, "customer.subscription.created", created, subscription(sub, cus, "active", STARTER, created))
}

/// An invoice of `sub` (dahlia shape: the subscription under `parent`).
fn invoice(id: &str, sub: &str, cus: &str, status: &str, attempts: u32, created: i64) -> Value {
    json!({
        "id": id, "object": "invoice", "customer": cus, "amount_due": 4900, "currency": "usd",
        "hosted_invoice_url": format!("https://invoice.stripe.com/i/{id}"), "status": status,
        "attempt_count": attempts, "attempted": attempts > 0, "created": created,
        "status_transitions": {"paid_at": if status == "paid" { json!(created) } else { Value::Null }},
        "parent": {"type": "subscription_details", "quote_details": null,
                   "subscription_details": {"metadata": {}, "subscription": sub}},
    })
}

impl Env {
    async fn webhook(&self, raw: &str) -> Disposition {
        let header = sign(&WebhookSecret::new(SECRET), raw.as_bytes(), self.clock.now().timestamp());
        self.billing.receive(Some(&header), raw.as_bytes()).await.unwrap().disposition
    }

    async fn state(&self, sub: &str) -> SubscriptionState {
        self.store.load_subscription(sub).await.unwrap().unwrap_or_else(|| panic!("no aggregate for {sub}"))
    }

    /// Runs due jobs until none is left.
    async fn drain_jobs(&self) {
        while self.billing.run_due_jobs(50).await.unwrap() > 0 {}
    }

    /// After [`missed_history`]: one provision per live subscription at its final tier, none for the
    /// canceled one, whichever replica ran the jobs.
    fn assert_history_provisioned(&self) {
        let mut calls = self.provisioner.calls();
        calls.sort_by_key(|c| format!("{c:?}"));
        let expected =
            vec![Call::Provision("sub_a".into(), Tier::Professional), Call::Provision("sub_b".into(), Tier::Starter)];
        assert_eq!(calls, expected);
    }

    fn event_requests(&self) -> usize {
        self.stub.requests().iter().filter(|r| r.path.starts_with("/v1/events")).count()
    }
}

fn app(sub: &str) -> String {
    mindroom_billing_core::service::app_name_for(sub)
}

/// Six events that exist only in the stub: `sub_a` created on starter then upgraded; `sub_b`
/// created, then its first invoice fails; `sub_c` created and canceled before anything ran.
fn missed_history(stub: &StripeStub) -> Vec<String> {
    vec![
        created_event(stub, "evt_a1", "sub_a", "cus_a", T0 + 10),
        stub.add_event(
            "evt_a2",
            "customer.subscription.updated",
            T0 + 20,
            subscription("sub_a", "cus_a", "active", PRO, T0 + 10),
        ),
        created_event(stub, "evt_b1", "sub_b", "cus_b", T0 + 30),
        stub.add_event(
            "evt_b2",
            "invoice.payment_failed",
            T0 + 40,
            invoice("in_b1", "sub_b", "cus_b", "open", 1, T0 + 35),
        ),
        created_event(stub, "evt_c1", "sub_c", "cus_c", T0 + 50),
        stub.add_event(
            "evt_c2",
            "customer.subscription.deleted",
            T0 + 60,
            subscription("sub_c", "cus_c", "canceled", STARTER, T0 + 50),
        ),
    ]
}

async fn catch_up_heals_missed_deliveries_then_webhooks_are_duplicates(backend: Backend) {
    let env = env(backend).await;
    let raws = missed_history(&env.stub);
    // An unrelated type is not listed (types[]) and not recorded.
    env.stub.add_event("evt_charge", "charge.succeeded", T0 + 15, json!({"id": "ch_1", "object": "charge"}));

    let report = env.billing.catch_up(Some(at(T0))).await.unwrap();
    // Oldest first: applied newest first, each `created` would come after its update and be stale.
    assert_eq!((report.listed, report.applied, report.duplicates, report.other), (6, 6, 0, 0), "{report:?}");
    assert_eq!(report.cursor, Some(at(T0 + HOUR) - chrono::Duration::minutes(5)));
    for id in ["evt_a1", "evt_a2", "evt_b1", "evt_b2", "evt_c1", "evt_c2"] {
        let stored = env.store.load_event(id).await.unwrap().unwrap_or_else(|| panic!("{id} not recorded"));
        assert_eq!(stored.source, EventSource::Api, "{id}");
    }
    assert_eq!(env.store.load_event("evt_charge").await.unwrap(), None);
    let b = env.state("sub_b").await;
    assert_eq!(b.grace.map(|g| g.started_at), Some(at(T0 + 40)), "grace from the failure event's time");

    env.drain_jobs().await;
    env.assert_history_provisioned();

    for raw in &raws {
        assert_eq!(env.webhook(raw).await, Disposition::Duplicate);
    }
    let again = env.billing.catch_up(None).await.unwrap();
    assert_eq!((again.listed, again.applied), (0, 0), "the cursor moved past them: {again:?}");
    let relisted = env.billing.catch_up(Some(at(T0))).await.unwrap();
    assert_eq!((relisted.listed, relisted.applied, relisted.duplicates), (6, 0, 6), "{relisted:?}");
    env.drain_jobs().await;
    assert_eq!(env.provisioner.calls().len(), 2, "nothing happened twice");
}

on_both_stores!(catch_up_heals_missed_deliveries_then_webhooks_are_duplicates);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_catching_up_while_webhooks_arrive_apply_each_event_once_postgres() {
    let env = env(postgres().await).await;
    let raws = missed_history(&env.stub);
    let url = env._db.as_ref().unwrap().url().to_owned();
    let mut replicas = vec![];
    for _ in 0..2 {
        let store = PgStore::connect(&url, PgStoreOptions::default().with_max_connections(4)).await.unwrap();
        let store: Arc<dyn Store> = Arc::new(store);
        replicas.push(billing(store, &env.stub.url, KEY, &env.clock, &env.provisioner, &env.notifier));
    }
    let [b, c] = [&replicas[0], &replicas[1]];
    let deliveries = async {
        let mut applied = 0;
        for raw in &raws {
            applied += usize::from(env.webhook(raw).await == Disposition::Applied);
        }
        applied
    };
    let since = Some(at(T0));
    let (ra, rb, rc, by_webhook) =
        tokio::join!(env.billing.catch_up(since), b.catch_up(since), c.catch_up(since), deliveries);
    let applied = ra.unwrap().applied + rb.unwrap().applied + rc.unwrap().applied + by_webhook;
    let mut recorded_applied = 0;
    for id in ["evt_a1", "evt_a2", "evt_b1", "evt_b2", "evt_c1", "evt_c2"] {
        let status = env.store.load_event(id).await.unwrap().unwrap().status;
        assert!(matches!(status, EventStatus::Applied | EventStatus::Stale), "{id}: {status:?}");
        recorded_applied += usize::from(status == EventStatus::Applied);
    }
    assert_eq!(applied, recorded_applied, "each event is applied by one channel of one replica");
    tokio::join!(env.drain_jobs(), async { while b.run_due_jobs(10).await.unwrap() > 0 {} }, async {
        while c.run_due_jobs(10).await.unwrap() > 0 {}
    },);
    env.drain_jobs().await;
    env.assert_history_provisioned();
    assert_eq!(env.state("sub_a").await.tier(), Some(Tier::Professional));
    assert_eq!(env.state("sub_c").await.desired(env.clock.now()), DesiredInstance::Absent);
}

async fn a_webhook_caught_up_later_is_a_duplicate(backend: Backend) {
    let env = env(backend).await;
    let raw = created_event(&env.stub, "evt_w1", "sub_w", "cus_w", T0 + 10);
    assert_eq!(env.webhook(&raw).await, Disposition::Applied);
    let report = env.billing.catch_up(Some(at(T0))).await.unwrap();
    assert_eq!((report.listed, report.applied, report.duplicates), (1, 0, 1), "{report:?}");
    let stored = env.store.load_event("evt_w1").await.unwrap().unwrap();
    assert_eq!(stored.source, EventSource::Webhook, "the first channel's record stays");
    assert_eq!(stored.payload, raw);
}

on_both_stores!(a_webhook_caught_up_later_is_a_duplicate);

/// Fails the commit of one event while `armed`.
struct FailCommitOf {
    event_id: &'static str,
    armed: AtomicBool,
}

#[async_trait]
impl StoreHooks for FailCommitOf {
    async fn before_commit(&self, _inner: &dyn Store, commit: &Commit) -> Result<(), StoreError> {
        if self.armed.load(Ordering::SeqCst) && commit.event_id.as_deref() == Some(self.event_id) {
            return Err(StoreError::Unavailable("injected: the store went away".into()));
        }
        Ok(())
    }
}

async fn the_cursor_never_passes_an_unrecorded_event(backend: Backend) {
    let hooked = Arc::new(HookedStore::new(
        Arc::clone(&backend.store),
        FailCommitOf { event_id: "evt_b2", armed: AtomicBool::new(true) },
    ));
    let env = env(Backend { store: Arc::clone(&hooked) as Arc<dyn Store>, _db: backend._db }).await;
    missed_history(&env.stub);
    // A cursor from an earlier run, within the retention.
    let saved_at = at(T0);
    env.store.save_cursor(CURSOR, &SyncCursor { created: at(T0), saved_at }).await.unwrap();

    let err = env.billing.catch_up(None).await.unwrap_err();
    assert!(matches!(err, SyncError::Store(StoreError::Unavailable(_))), "{err:?}");
    let cursor = env.store.load_cursor(CURSOR).await.unwrap().unwrap();
    // Catch-up applies the events of different subscriptions at once (lanes), each subscription's in
    // order: the cursor stands at the failed event (listed again with `created[gte]`), never past it.
    assert_eq!(cursor.created, at(T0 + 40), "the cursor stands at the failed event: {cursor:?}");
    assert!(env.state("sub_a").await.tier() == Some(Tier::Professional));
    let b = env.store.load_event("evt_b2").await.unwrap().expect("recorded");
    assert_eq!(b.status, mindroom_billing_core::EventStatus::Received, "recorded, its decision not committed");

    hooked.hooks.armed.store(false, Ordering::SeqCst);
    let report = env.billing.catch_up(None).await.unwrap();
    // Listed again from the cursor (>= T0+40): evt_b2 (recorded, not applied) is applied now; what
    // another lane applied in the first run is a duplicate.
    assert_eq!(report.listed, 3, "{report:?}");
    assert_eq!(report.applied + report.duplicates, 3, "{report:?}");
    assert!(report.applied >= 1, "{report:?}");
    assert_eq!(env.state("sub_b").await.grace.map(|g| g.started_at), Some(at(T0 + 40)));
    assert_eq!(env.state("sub_c").await.desired(env.clock.now()), DesiredInstance::Absent);
}

on_both_stores!(the_cursor_never_passes_an_unrecorded_event);

async fn without_a_usable_cursor_catch_up_reconciles(backend: Backend, cursor: Option<chrono::Duration>) {
    let env = env(backend).await;
    let now = env.clock.now();
    if let Some(age) = cursor {
        let old = SyncCursor { created: now - age, saved_at: now - age };
        env.store.save_cursor(CURSOR, &old).await.unwrap();
    }
    // The subscription's events are older than Stripe keeps; only the object tells.
    env.stub.add_subscription(subscription("sub_r", "cus_r", "active", STARTER, T0 - 40 * 86_400), None);

    let report = env.billing.catch_up(None).await.unwrap();
    let reconciled = report.reconciled.expect("reconciled instead");
    assert_eq!(reconciled.checked, 1);
    assert!(reconciled.drift.iter().any(|d| d.field == DriftField::Tier && d.after == "starter"), "{reconciled:?}");
    let start = now - chrono::Duration::minutes(5);
    assert_eq!(report.cursor, Some(start));
    assert_eq!(env.store.load_cursor(CURSOR).await.unwrap().map(|c| c.created), Some(start));
    assert_eq!(env.event_requests(), 0, "no event listing without a usable cursor");
    assert_eq!(env.state("sub_r").await.tier(), Some(Tier::Starter));

    // The next run catches up from the new cursor.
    let next = env.billing.catch_up(None).await.unwrap();
    assert_eq!(next.reconciled, None);
    assert_eq!(env.event_requests(), 1);
}

#[tokio::test]
async fn without_a_cursor_catch_up_reconciles_memory() {
    without_a_usable_cursor_catch_up_reconciles(memory(), None).await;
}

#[tokio::test]
async fn a_cursor_older_than_30_days_means_reconciliation_postgres() {
    without_a_usable_cursor_catch_up_reconciles(postgres().await, Some(chrono::Duration::days(31))).await;
}

async fn reconciliation_fixes_drift_and_later_webhooks_still_order(backend: Backend) {
    let env = env(backend).await;
    let created = created_event(&env.stub, "evt_d1", "sub_d", "cus_d", T0 + 10);
    assert_eq!(env.webhook(&created).await, Disposition::Applied);
    env.drain_jobs().await;
    assert_eq!(env.provisioner.calls(), vec![Call::Provision("sub_d".into(), Tier::Starter)]);

    // Upgraded at Stripe; the event never came (or is older than 30 days).
    env.stub.add_subscription(subscription("sub_d", "cus_d", "active", PRO, T0 + 10), None);
    let dry = env.billing.reconcile_stripe(None, true).await.unwrap();
    assert!(dry.dry_run);
    let fields: Vec<(DriftField, &str, &str)> =
        dry.drift.iter().map(|d| (d.field, d.before.as_str(), d.after.as_str())).collect();
    assert_eq!(
        fields,
        vec![
            (DriftField::Tier, "starter", "professional"),
            (DriftField::Instance, "running starter", "running professional"),
        ]
    );
    assert_eq!(env.state("sub_d").await.tier(), Some(Tier::Starter), "a dry run changes nothing");
    env.drain_jobs().await;
    assert_eq!(env.provisioner.calls().len(), 1, "a dry run queues nothing");

    let fixed = env.billing.reconcile_stripe(None, false).await.unwrap();
    assert_eq!(fixed.drift, dry.drift, "the same drift, now fixed");
    assert_eq!(env.state("sub_d").await.tier(), Some(Tier::Professional));
    env.drain_jobs().await;
    assert_eq!(env.provisioner.calls()[1], Call::Update(app("sub_d"), Tier::Professional.limits()));
    let quiet = env.billing.reconcile_stripe(Some("sub_d"), false).await.unwrap();
    assert_eq!((quiet.checked, quiet.drift.len()), (1, 0), "no drift is left: {quiet:?}");

    // A webhook created before the fetch is stale; a newer one applies.
    let fetch = env.clock.now();
    let older = env.stub.add_event(
        "evt_d2",
        "customer.subscription.updated",
        fetch.timestamp() - 60,
        subscription("sub_d", "cus_d", "active", STARTER, T0 + 10),
    );
    assert_eq!(env.webhook(&older).await, Disposition::Stale);
    assert_eq!(env.state("sub_d").await.tier(), Some(Tier::Professional));
    env.clock.set(fetch + chrono::Duration::seconds(30));
    let newer = env.stub.add_event(
        "evt_d3",
        "customer.subscription.deleted",
        fetch.timestamp() + 10,
        subscription("sub_d", "cus_d", "canceled", PRO, T0 + 10),
    );
    assert_eq!(env.webhook(&newer).await, Disposition::Applied);
    env.drain_jobs().await;
    assert_eq!(env.provisioner.calls().last(), Some(&Call::Deprovision(app("sub_d"))));
}

on_both_stores!(reconciliation_fixes_drift_and_later_webhooks_still_order);

#[tokio::test]
async fn a_subscription_canceled_without_an_event_is_deprovisioned_by_reconciliation() {
    let env = env(postgres().await).await;
    let created = created_event(&env.stub, "evt_e1", "sub_e", "cus_e", T0 + 10);
    assert_eq!(env.webhook(&created).await, Disposition::Applied);
    env.drain_jobs().await;
    env.stub.add_subscription(subscription("sub_e", "cus_e", "canceled", STARTER, T0 + 10), None);
    let report = env.billing.reconcile_stripe(Some("sub_e"), false).await.unwrap();
    let fields: Vec<DriftField> = report.drift.iter().map(|d| d.field).collect();
    assert_eq!(fields, vec![DriftField::Status, DriftField::Instance], "{report:?}");
    env.drain_jobs().await;
    assert_eq!(
        env.provisioner.calls(),
        vec![Call::Provision("sub_e".into(), Tier::Starter), Call::Deprovision(app("sub_e"))]
    );
}

async fn past_due_with_an_attempted_open_invoice_starts_grace_at_the_invoice(backend: Backend) {
    let env = env(backend).await;
    let invoice_at = T0 + 100;
    env.stub.add_subscription(
        subscription("sub_p", "cus_p", "past_due", STARTER, T0 + 10),
        Some(invoice("in_p1", "sub_p", "cus_p", "open", 2, invoice_at)),
    );
    let report = env.billing.reconcile_stripe(None, false).await.unwrap();
    let grace = env.state("sub_p").await.grace.expect("in grace");
    assert_eq!(grace.started_at, at(invoice_at));
    assert_eq!(grace.ends_at, at(invoice_at) + chrono::Duration::days(7));
    let drift = report.drift.iter().find(|d| d.field == DriftField::Grace).expect("grace drift");
    assert_eq!((drift.before.as_str(), drift.after.clone()), ("-", grace.ends_at.to_rfc3339()));
    assert_eq!(
        env.state("sub_p").await.desired(env.clock.now()),
        DesiredInstance::Running { tier: Tier::Starter, limits: Tier::Starter.limits() }
    );
}

on_both_stores!(past_due_with_an_attempted_open_invoice_starts_grace_at_the_invoice);

#[tokio::test]
async fn rate_limits_server_errors_and_slowness_still_end_with_everything_applied() {
    let env = env(postgres().await).await;
    for i in 0..250i64 {
        env.stub.add_event(
            &format!("evt_f{i:03}"),
            "customer.subscription.created",
            T0 + i,
            subscription(&format!("sub_f{i:03}"), &format!("cus_f{i:03}"), "active", STARTER, T0 + i),
        );
    }
    env.stub.fail_next(Fault::RateLimited { retry_after: None }, 4);
    env.stub.fail_next(Fault::RateLimited { retry_after: Some(1) }, 1);
    env.stub.fail_next(Fault::ServerError, 2);
    env.stub.fail_next(Fault::Slow(Duration::from_millis(300)), 1);
    let report = env.billing.catch_up(Some(at(T0))).await.unwrap();
    assert_eq!((report.listed, report.applied), (250, 250), "{report:?}");
    let requests = env.event_requests();
    assert_eq!(requests, 7 + 3, "seven refusals, then three pages (the first one slow)");
}

#[tokio::test]
async fn a_wrong_key_stops_catch_up_naming_the_variable_and_webhooks_keep_working() {
    let wrong = "sk_test_WRONG_fedcba9876543210";
    let env = env_with_key(memory(), wrong).await;
    let raw = created_event(&env.stub, "evt_k1", "sub_k", "cus_k", T0 + 10);
    let err = env.billing.catch_up(Some(at(T0))).await.unwrap_err();
    let SyncError::Api(StripeApiError::Unauthorized(message)) = &err else { panic!("{err:?}") };
    assert!(message.contains("STRIPE_SECRET_KEY"), "{message}");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains(wrong), "the key leaked: {shown}");
    assert_eq!(env.stub.requests().len(), 1, "a refused key is not retried");
    assert_eq!(env.store.load_cursor(CURSOR).await.unwrap(), None);
    assert_eq!(env.webhook(&raw).await, Disposition::Applied, "webhooks do not need the key");
}

#[test]
fn in_the_background_a_wrong_key_is_counted_once_per_run_and_webhooks_keep_working() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let env = env_with_key(memory(), "sk_test_WRONG_fedcba9876543210").await;
            let raw = created_event(&env.stub, "evt_g1", "sub_g", "cus_g", T0 + 10);
            let billing = Arc::new(env.billing);
            let (stop, shutdown) = tokio::sync::watch::channel(false);
            let background = tokio::spawn(Arc::clone(&billing).run_background(shutdown));
            let refused = r#"billing_stripe_sync_errors_total{task="catch_up",kind="unauthorized"} 1"#;
            // The first run starts at once; wait for it to be counted (the bound only ends a hang).
            for waited in 0.. {
                let rendered = metrics.render();
                if rendered.contains(refused) {
                    break;
                }
                assert!(waited < 3_000, "never counted:\n{rendered}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // Catch-up and reconciliation both run at start-up: one refused request each, none retried.
            let requests = env.stub.requests().len();
            assert!((1..=2).contains(&requests), "{requests} requests: a refused key is not retried");
            let header = sign(&WebhookSecret::new(SECRET), raw.as_bytes(), env.clock.now().timestamp());
            let receipt = billing.receive(Some(&header), raw.as_bytes()).await.unwrap();
            assert_eq!(receipt.disposition, Disposition::Applied);
            stop.send(true).unwrap();
            background.await.unwrap();
        });
    });
}

async fn an_email_without_a_known_address_looks_the_customer_up_once(backend: Backend) {
    let env = env(backend).await;
    env.stub.add_customer(json!({"id": "cus_m", "object": "customer", "email": "mia@example.com"}));
    let created = created_event(&env.stub, "evt_m1", "sub_m", "cus_m", T0 + 10);
    assert_eq!(env.webhook(&created).await, Disposition::Applied);
    assert_eq!(env.store.load_account("cus_m").await.unwrap().and_then(|a| a.email), None);
    env.drain_jobs().await;

    let sent = env.notifier.0.lock().unwrap().clone();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].to, "mia@example.com");
    assert!(matches!(sent[0].message, Message::Welcome { .. }));
    let lookups: Vec<String> =
        env.stub.requests().iter().map(|r| r.path.clone()).filter(|p| p.starts_with("/v1/customers")).collect();
    assert_eq!(lookups, vec!["/v1/customers/cus_m".to_owned()]);
    assert_eq!(
        env.store.load_account("cus_m").await.unwrap().and_then(|a| a.email).as_deref(),
        Some("mia@example.com"),
        "recorded for the next e-mails"
    );
}

on_both_stores!(an_email_without_a_known_address_looks_the_customer_up_once);
