//! Property test of the second source of truth (DESIGN §8): any interleaving of webhook deliveries
//! (late, reordered, repeated), catch-up runs and reconcile snapshots of one subscription's history
//! ends in the same aggregate (tier, status, grace, desired instance) as in-order delivery.
//!
//! Stripe is the in-memory `FakeStripeApi`: at each step of the history it holds the events created
//! so far and the subscription as it stands then, with its latest invoice.

mod common;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use common::{CUS, T0, TestClock, at, invoice_json, policy, subscription_json};
use mindroom_billing_core::signature::{WebhookSecret, sign};
use mindroom_billing_core::stripe_api::{
    ApiEvent, EventsQuery, FakeStripeApi, Page, RawObject, StripeApi, StripeApiError,
};
use mindroom_billing_core::{
    Billing, BillingConfig, Clock, DesiredInstance, MemoryStore, Store, SyncCursor, Tier, Verifier,
};
use proptest::prelude::*;
use serde_json::{Value, json};

const SUB: &str = "sub_sync_prop";
const SECRET: &str = "whsec_sync_prop";
/// Seconds between two steps of the history.
const STEP: i64 = 100;

/// What happens at Stripe in one step of the history.
#[derive(Debug, Clone, Copy)]
enum Change {
    /// The price switches between starter and professional.
    SwitchPrice,
    /// A new invoice's payment fails; the subscription goes `past_due`.
    PaymentFails,
    /// The latest failed invoice is paid; the subscription is `active` again.
    PaymentSucceeds,
    /// Canceled (terminal: the history ends).
    Cancel,
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => Just(Change::SwitchPrice),
        3 => Just(Change::PaymentFails),
        3 => Just(Change::PaymentSucceeds),
        1 => Just(Change::Cancel),
    ]
}

/// What the system does between steps.
#[derive(Debug, Clone, Copy)]
enum Action {
    /// The next step of the history happens at Stripe.
    Advance,
    /// Stripe delivers (again) one of the events created so far, picked by this number.
    Deliver(usize),
    /// A catch-up run from the stored cursor.
    CatchUp,
    /// A reconciliation of every subscription.
    Reconcile,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => Just(Action::Advance),
        4 => any::<usize>().prop_map(Action::Deliver),
        1 => Just(Action::CatchUp),
        1 => Just(Action::Reconcile),
    ]
}

/// One step: the events it creates and the subscription object Stripe holds after it.
struct Step {
    at: i64,
    events: Vec<ApiEvent>,
    object: RawObject,
}

/// The latest invoice as `expand[]=latest_invoice` shows it.
struct Invoice {
    id: String,
    paid_at: Option<i64>,
    created: i64,
}

fn api_event(raw: String) -> ApiEvent {
    let v: Value = serde_json::from_str(&raw).unwrap();
    ApiEvent {
        id: v["id"].as_str().unwrap().to_owned(),
        event_type: v["type"].as_str().unwrap().to_owned(),
        created: at(v["created"].as_i64().unwrap()),
        raw,
    }
}

/// The subscription object of an event built by `subscription_json`, with its latest invoice.
fn object_of(event_raw: &str, created: i64, latest: Option<&Invoice>) -> RawObject {
    let v: Value = serde_json::from_str(event_raw).unwrap();
    let mut object = v["data"]["object"].clone();
    object["created"] = json!(created);
    object["latest_invoice"] = latest.map_or(Value::Null, |i| {
        json!({
            "id": i.id, "object": "invoice", "customer": CUS, "amount_due": 4900, "currency": "usd",
            "status": if i.paid_at.is_some() { "paid" } else { "open" },
            // As at Stripe: created about an hour before its first attempt, at finalization.
            "attempt_count": 1, "created": i.created - 3600,
            "status_transitions": {"paid_at": i.paid_at, "finalized_at": i.created},
        })
    });
    RawObject { id: SUB.to_owned(), raw: object.to_string() }
}

/// The history: created on starter at `T0 + STEP`, then one change per step.
///
/// A failed invoice is created an hour before its first attempt and finalized at it, as at Stripe;
/// reconciliation dates the failure at finalization, so a reconcile that runs before the
/// `invoice.payment_failed` webhook starts the grace when the webhook would.
fn history(changes: &[Change]) -> Vec<Step> {
    let prices = [common::PRICE_STARTER, common::PRICE_PRO];
    let (mut price, mut status, mut latest): (usize, &str, Option<Invoice>) = (0, "active", None);
    let mut steps = Vec::new();
    let mut n = 0;
    let mut next_id = || {
        n += 1;
        format!("evt_{n}")
    };
    let created =
        subscription_json(&next_id(), "customer.subscription.created", T0 + STEP, SUB, "active", prices[0], true);
    let object = object_of(&created, T0 + STEP, None);
    steps.push(Step { at: T0 + STEP, events: vec![api_event(created)], object });
    for (k, change) in changes.iter().enumerate() {
        let t = T0 + STEP * (i64::try_from(k).unwrap() + 2);
        let mut events = Vec::new();
        let kind = match change {
            Change::SwitchPrice => {
                price = 1 - price;
                "customer.subscription.updated"
            }
            Change::PaymentFails => {
                let invoice = format!("in_{k}");
                events.push(invoice_json(&next_id(), "invoice.payment_failed", t, &invoice, SUB, true));
                latest = Some(Invoice { id: invoice, paid_at: None, created: t });
                status = "past_due";
                "customer.subscription.updated"
            }
            Change::PaymentSucceeds => {
                if let Some(invoice) = latest.as_mut().filter(|i| i.paid_at.is_none()) {
                    events.push(invoice_json(&next_id(), "invoice.paid", t, &invoice.id, SUB, true));
                    invoice.paid_at = Some(t);
                }
                status = "active";
                "customer.subscription.updated"
            }
            Change::Cancel => {
                status = "canceled";
                "customer.subscription.deleted"
            }
        };
        let snapshot = subscription_json(&next_id(), kind, t, SUB, status, prices[price], true);
        let object = object_of(&snapshot, T0 + STEP, latest.as_ref());
        events.push(snapshot);
        steps.push(Step { at: t, events: events.into_iter().map(api_event).collect(), object });
        if status == "canceled" {
            break;
        }
    }
    steps
}

struct Sim {
    billing: Billing,
    store: Arc<dyn Store>,
    clock: Arc<TestClock>,
    api: Arc<FakeStripeApi>,
}

fn sim() -> Sim {
    let clock = Arc::new(TestClock::new(at(T0)));
    let api = Arc::new(FakeStripeApi::new());
    let (billing, store) = sim_with(&clock, Arc::clone(&api) as Arc<dyn StripeApi>);
    Sim { billing, store, clock, api }
}

impl Sim {
    async fn deliver(&self, event: &ApiEvent) {
        let header = sign(&WebhookSecret::new(SECRET), event.raw.as_bytes(), self.clock.now().timestamp());
        self.billing.receive(Some(&header), event.raw.as_bytes()).await.unwrap();
    }

    /// Stripe after `step`: its events are listable, its object is the subscription; the clock just after.
    fn happen(&self, step: &Step) {
        for e in &step.events {
            self.api.add_event(e.clone());
        }
        self.api.put_subscription(step.object.clone());
        self.clock.set(at(step.at + 1));
    }

    /// What must not depend on the delivery path.
    async fn outcome(&self, now: DateTime<Utc>) -> (Option<Tier>, Option<String>, Option<(i64, i64)>, DesiredInstance) {
        let s = self.store.load_subscription(SUB).await.unwrap().expect("the aggregate exists");
        (
            s.tier(),
            s.status().map(|st| st.as_str().to_owned()),
            s.grace.map(|g| (g.started_at.timestamp(), g.ends_at.timestamp())),
            s.desired(now),
        )
    }
}

fn run(changes: &[Change], actions: &[Action], final_order: &[usize]) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let steps = history(changes);
        let all: Vec<&ApiEvent> = steps.iter().flat_map(|s| &s.events).collect();
        let end = at(steps.last().unwrap().at + 10);

        let reference = sim();
        for step in &steps {
            reference.happen(step);
            for e in &step.events {
                reference.deliver(e).await;
            }
        }
        reference.clock.set(end);

        let mixed = sim();
        mixed.store.save_cursor("stripe_catch_up", &SyncCursor { created: at(T0), saved_at: at(T0) }).await.unwrap();
        let mut happened = 0;
        let mut visible = 0;
        for action in actions {
            match *action {
                Action::Advance if happened < steps.len() => {
                    mixed.happen(&steps[happened]);
                    visible += steps[happened].events.len();
                    happened += 1;
                }
                Action::Advance => {}
                Action::Deliver(pick) if visible > 0 => mixed.deliver(all[pick % visible]).await,
                Action::Deliver(_) => {}
                Action::CatchUp => {
                    mixed.billing.catch_up(None).await.unwrap();
                }
                Action::Reconcile => {
                    mixed.billing.reconcile_stripe(None, false).await.unwrap();
                }
            }
        }
        for step in &steps[happened..] {
            mixed.happen(step);
        }
        // Every event reaches billing in the end, in some order (again, for those already there).
        let mut order: Vec<usize> = (0..all.len()).collect();
        order.sort_by_key(|i| final_order.get(*i).copied().unwrap_or(*i));
        for i in order {
            mixed.deliver(all[i]).await;
        }
        mixed.clock.set(end);

        prop_assert_eq!(mixed.outcome(end).await, reference.outcome(end).await);
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn any_interleaving_of_webhooks_catch_up_and_reconcile_ends_as_in_order_delivery(
        changes in prop::collection::vec(change(), 0..8),
        actions in prop::collection::vec(action(), 0..30),
        final_order in prop::collection::vec(any::<usize>(), 0..20),
    ) {
        run(&changes, &actions, &final_order)?;
    }
}

// ---- a reconcile never beats a webhook of the second it was sent or later -----------------------

/// The Stripe API as seen from billing: every call takes `delay` (the test clock moves on by it), so
/// the answer is processed later than the request was sent. It also measures the longest listing of
/// events (a first page and the pages that follow it by `starting_after`): billing applies events
/// only once their listing is complete, so it holds this many at most.
#[derive(Debug)]
struct SlowApi {
    inner: Arc<FakeStripeApi>,
    clock: Arc<TestClock>,
    delay: chrono::Duration,
    listing: std::sync::atomic::AtomicUsize,
    longest_listing: std::sync::atomic::AtomicUsize,
}

impl SlowApi {
    fn new(inner: &Arc<FakeStripeApi>, clock: &Arc<TestClock>, delay: chrono::Duration) -> Self {
        Self {
            inner: Arc::clone(inner),
            clock: Arc::clone(clock),
            delay,
            listing: std::sync::atomic::AtomicUsize::new(0),
            longest_listing: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

#[async_trait::async_trait]
impl StripeApi for SlowApi {
    async fn list_events(&self, query: &EventsQuery) -> Result<Page<ApiEvent>, StripeApiError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.clock.advance(self.delay);
        let page = self.inner.list_events(query).await?;
        if query.starting_after.is_none() {
            self.listing.store(0, Relaxed);
        }
        let held = self.listing.fetch_add(page.data.len(), Relaxed) + page.data.len();
        self.longest_listing.fetch_max(held, Relaxed);
        Ok(page)
    }
    async fn list_subscriptions(&self, after: Option<&str>) -> Result<Page<RawObject>, StripeApiError> {
        self.clock.advance(self.delay);
        self.inner.list_subscriptions(after).await
    }
    async fn get_subscription(&self, id: &str) -> Result<Option<RawObject>, StripeApiError> {
        self.clock.advance(self.delay);
        self.inner.get_subscription(id).await
    }
    async fn get_customer(&self, id: &str) -> Result<Option<RawObject>, StripeApiError> {
        self.clock.advance(self.delay);
        self.inner.get_customer(id).await
    }
    async fn get_charge(&self, id: &str) -> Result<Option<RawObject>, StripeApiError> {
        self.clock.advance(self.delay);
        self.inner.get_charge(id).await
    }
}

fn sim_with(clock: &Arc<TestClock>, api: Arc<dyn StripeApi>) -> (Billing, Arc<dyn Store>) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let config = BillingConfig::new(Verifier::new([WebhookSecret::new(SECRET)])).with_policy(policy());
    let billing = Billing::new(
        Arc::clone(&store),
        Arc::new(mindroom_billing_core::dryrun::DryRunProvisioner::default()),
        Arc::new(mindroom_billing_core::dryrun::LogNotifier),
        config,
    )
    .with_clock(Arc::clone(clock) as Arc<dyn Clock>)
    .with_stripe_api(api);
    (billing, store)
}

async fn deliver_raw(billing: &Billing, clock: &TestClock, raw: &str) {
    let header = sign(&WebhookSecret::new(SECRET), raw.as_bytes(), clock.now().timestamp());
    billing.receive(Some(&header), raw.as_bytes()).await.unwrap();
}

/// What the same-second webhook is.
#[derive(Debug, Clone, Copy)]
enum SameSecond {
    /// An upgrade to professional (Stripe's object, fetched just before, still says starter).
    Upgrade,
    /// The payment of the invoice whose failure made the fetched object `past_due`.
    Payment,
    /// `customer.updated` with a new address (the fetched customer has the old one).
    NewAddress,
}

/// Stripe's subscription object: `status` on starter, with a failed latest invoice when past due.
fn stripe_object(status: &str, failed_at: i64) -> RawObject {
    let raw =
        subscription_json("evt_obj", "customer.subscription.updated", T0, SUB, status, common::PRICE_STARTER, true);
    let latest = (status == "past_due").then(|| Invoice { id: "in_same".into(), paid_at: None, created: failed_at });
    object_of(&raw, T0, latest.as_ref())
}

fn customer_json(id: &str, created: i64, email: &str) -> String {
    format!(
        r#"{{"id":"{id}","object":"event","api_version":"2026-07-29.dahlia","created":{created},"data":{{"object":{{"id":"{CUS}","object":"customer","email":"{email}","name":null}}}},"livemode":false,"type":"customer.updated"}}"#
    )
}

/// The request is sent at `second + sent_micros`, its answer processed `delay_ms` later; the webhook
/// is created `offset` seconds after `second` and delivered before the request is sent (then it can
/// only be of that very second) or after the answer is processed.
async fn same_second(kind: SameSecond, sent_micros: i64, delay_ms: i64, offset: i64, webhook_first: bool) {
    let second = T0 + 1000;
    let offset = if webhook_first { 0 } else { offset };
    let clock = Arc::new(TestClock::new(at(T0)));
    let fake = Arc::new(FakeStripeApi::new());
    let api = SlowApi::new(&fake, &clock, chrono::Duration::milliseconds(delay_ms));
    let (billing, store) = sim_with(&clock, Arc::new(api));
    // Billing knows the subscription on starter, no address known for the customer.
    deliver_raw(
        &billing,
        &clock,
        &subscription_json("evt_c", "customer.subscription.created", T0, SUB, "active", common::PRICE_STARTER, true),
    )
    .await;
    let status = if matches!(kind, SameSecond::Payment) { "past_due" } else { "active" };
    fake.put_subscription(stripe_object(status, second - 50));
    fake.put_customer(RawObject {
        id: CUS.into(),
        raw: format!(r#"{{"id":"{CUS}","object":"customer","email":"old@example.com"}}"#),
    });
    let webhook = match kind {
        SameSecond::Upgrade => subscription_json(
            "evt_w",
            "customer.subscription.updated",
            second + offset,
            SUB,
            "active",
            common::PRICE_PRO,
            true,
        ),
        SameSecond::Payment => invoice_json("evt_w", "invoice.paid", second + offset, "in_same", SUB, true),
        SameSecond::NewAddress => customer_json("evt_w", second + offset, "new@example.com"),
    };
    let sent = at(second) + chrono::Duration::microseconds(sent_micros);
    if webhook_first {
        clock.set(sent);
        deliver_raw(&billing, &clock, &webhook).await;
    }
    clock.set(sent);
    match kind {
        SameSecond::NewAddress => {
            // The welcome e-mail knows no address: its job asks Stripe for the customer.
            while billing.run_due_jobs(10).await.unwrap() > 0 {
                clock.set(sent);
            }
        }
        _ => {
            billing.reconcile_stripe(None, false).await.unwrap();
        }
    }
    if !webhook_first {
        let processed = clock.now();
        clock.set(processed.max(at(second + offset)));
        deliver_raw(&billing, &clock, &webhook).await;
    }
    let state = store.load_subscription(SUB).await.unwrap().unwrap();
    let event = store.load_event("evt_w").await.unwrap().unwrap();
    assert_eq!(event.status, mindroom_billing_core::EventStatus::Applied, "{kind:?}: the webhook is not stale");
    match kind {
        SameSecond::Upgrade => assert_eq!(state.tier(), Some(Tier::Professional), "the upgrade stands"),
        SameSecond::Payment => assert_eq!(state.grace, None, "the payment resolves every failure of the snapshot"),
        SameSecond::NewAddress => {
            let account = store.load_account(CUS).await.unwrap().unwrap();
            assert_eq!(account.email.as_deref(), Some("new@example.com"), "the newer address stands");
        }
    }
}

// Each: sent at .300, answered 800 ms later (in the next second); the webhook's `created` is the
// second the request was sent in.

#[tokio::test]
async fn an_upgrade_in_the_second_of_the_fetch_beats_the_snapshot_fetched_before_it() {
    same_second(SameSecond::Upgrade, 300_000, 800, 0, false).await;
}

#[tokio::test]
async fn a_payment_in_the_second_of_the_fetch_resolves_the_past_due_snapshot() {
    same_second(SameSecond::Payment, 300_000, 800, 0, false).await;
}

#[tokio::test]
async fn a_customer_update_in_the_second_of_the_fetch_beats_the_address_fetched_before_it() {
    same_second(SameSecond::NewAddress, 300_000, 800, 0, false).await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn a_webhook_of_the_second_a_reconcile_was_sent_or_later_is_never_overwritten_by_it(
        kind in prop_oneof![Just(SameSecond::Upgrade), Just(SameSecond::Payment), Just(SameSecond::NewAddress)],
        sent_micros in 0..1_000_000i64,
        delay_ms in 0..3_000i64,
        offset in 0..3i64,
        webhook_first in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(same_second(kind, sent_micros, delay_ms, offset, webhook_first));
    }
}

// ---- catch-up: the relist margin and a bounded backlog -------------------------------------------

#[tokio::test]
async fn a_late_listed_event_is_caught_up_by_the_next_run_in_memory() {
    let s = sim();
    s.store.save_cursor("stripe_catch_up", &SyncCursor { created: at(T0), saved_at: at(T0) }).await.unwrap();
    let created = |id: &str, at: i64, sub: &str| {
        api_event(subscription_json(
            id,
            "customer.subscription.created",
            at,
            sub,
            "active",
            common::PRICE_STARTER,
            true,
        ))
    };
    s.api.add_event(created("evt_first", T0 + 50, "sub_first"));
    s.clock.set(at(T0 + 60));
    s.billing.catch_up(None).await.unwrap();
    // Created 20 s before the one caught up, listed only now.
    s.api.add_event(created("evt_late", T0 + 30, "sub_late"));
    s.clock.set(at(T0 + 120));
    s.billing.catch_up(None).await.unwrap();
    let stored = s.store.load_event("evt_late").await.unwrap().expect("the late-listed event is caught up");
    assert_eq!(stored.status, mindroom_billing_core::EventStatus::Applied);
    let cursor = s.store.load_cursor("stripe_catch_up").await.unwrap().unwrap();
    assert!(cursor.created <= at(T0 + 120) - chrono::Duration::minutes(5), "{cursor:?}");
}

#[tokio::test]
async fn catch_up_holds_a_bounded_part_of_a_long_backlog() {
    const BACKLOG: i64 = 2_500;
    let clock = Arc::new(TestClock::new(at(T0)));
    let fake = Arc::new(FakeStripeApi::new());
    let held = Arc::new(SlowApi::new(&fake, &clock, chrono::Duration::zero()));
    let (billing, store) = sim_with(&clock, Arc::clone(&held) as Arc<dyn StripeApi>);
    // Twenty days of events (an outage), one subscription each, a few minutes apart.
    for i in 0..BACKLOG {
        let created = T0 + i * 600;
        let sub = format!("sub_backlog_{i}");
        fake.add_event(api_event(subscription_json(
            &format!("evt_backlog_{i}"),
            "customer.subscription.created",
            created,
            &sub,
            "active",
            common::PRICE_STARTER,
            true,
        )));
    }
    store.save_cursor("stripe_catch_up", &SyncCursor { created: at(T0), saved_at: at(T0) }).await.unwrap();
    clock.set(at(T0 + BACKLOG * 600 + 60));
    let report = billing.catch_up(None).await.unwrap();
    assert_eq!(report.applied, usize::try_from(BACKLOG).unwrap());
    for i in [0, BACKLOG / 2, BACKLOG - 1] {
        assert!(store.load_event(&format!("evt_backlog_{i}")).await.unwrap().is_some());
    }
    let most = held.longest_listing.load(std::sync::atomic::Ordering::Relaxed);
    assert!(most <= 1_100, "{most} listed events held at once (of {BACKLOG})");
}
