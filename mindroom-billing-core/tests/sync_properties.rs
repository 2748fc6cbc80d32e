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
use mindroom_billing_core::stripe_api::{ApiEvent, FakeStripeApi, RawObject};
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
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let clock = Arc::new(TestClock::new(at(T0)));
    let api = Arc::new(FakeStripeApi::new());
    let config = BillingConfig::new(Verifier::new([WebhookSecret::new(SECRET)])).with_policy(policy());
    let billing = Billing::new(
        Arc::clone(&store),
        Arc::new(mindroom_billing_core::dryrun::DryRunProvisioner::default()),
        Arc::new(mindroom_billing_core::dryrun::LogNotifier),
        config,
    )
    .with_clock(Arc::clone(&clock) as Arc<dyn Clock>)
    .with_stripe_api(Arc::clone(&api) as Arc<dyn mindroom_billing_core::stripe_api::StripeApi>);
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
