//! Table tests for every rule of DESIGN §3 "Ordering", "Tiers" and "Entitlement", on the pure
//! `decide` / `expire_grace`, with events parsed from realistic JSON.

mod common;

use chrono::{DateTime, Duration, Utc};
use common::{CUS, DAY, T0, at, ev, invoice_json, policy, price_json_subscription, subscription_json};
use mindroom_billing_core::{
    Decision, DesiredInstance, EmailKind, Event, JobKind, Outcome, SubscriptionState, SubscriptionStatus, Tier, decide,
    expire_grace,
};

const SUB: &str = "sub_rules";
const STARTER: &str = common::PRICE_STARTER;
const PRO: &str = common::PRICE_PRO;

fn sub_ev(n: u32, kind: &str, created: i64, status: &str, price: &str) -> Event {
    let json = subscription_json(&format!("evt_s{n}"), kind, created, SUB, status, price, n % 2 == 0);
    ev(&json)
}

fn updated(n: u32, created: i64, status: &str, price: &str) -> Event {
    sub_ev(n, "customer.subscription.updated", created, status, price)
}

fn inv_ev(n: u32, kind: &str, created: i64, invoice: &str) -> Event {
    ev(&invoice_json(&format!("evt_i{n}"), kind, created, invoice, SUB, n % 2 == 1))
}

/// A tiny fold: applies events in order at `now` = each event's created + 1 s.
#[derive(Default)]
struct Run {
    state: Option<SubscriptionState>,
    decisions: Vec<Decision>,
}

impl Run {
    fn apply(&mut self, e: &Event) -> &Decision {
        self.apply_at(e, e.created + Duration::seconds(1))
    }

    fn apply_at(&mut self, e: &Event, now: DateTime<Utc>) -> &Decision {
        let d = decide(&policy(), self.state.as_ref(), e, now);
        if let Some(next) = &d.subscription {
            self.state = Some(next.clone());
        }
        self.decisions.push(d);
        self.decisions.last().unwrap()
    }

    fn state(&self) -> &SubscriptionState {
        self.state.as_ref().expect("aggregate exists")
    }
}

fn running(tier: Tier) -> DesiredInstance {
    DesiredInstance::Running { tier, limits: tier.limits() }
}

fn reconciles(d: &Decision) -> bool {
    d.jobs.iter().any(|j| matches!(&j.kind, JobKind::Reconcile { subscription_id } if subscription_id == SUB))
}

fn emails(d: &Decision) -> Vec<&EmailKind> {
    d.jobs
        .iter()
        .filter_map(|j| match &j.kind {
            JobKind::Email { email, .. } => Some(email),
            _ => None,
        })
        .collect()
}

#[test]
fn active_and_trialing_run_at_the_tier_limits() {
    for (status, price, tier) in
        [("active", STARTER, Tier::Starter), ("trialing", STARTER, Tier::Starter), ("active", PRO, Tier::Professional)]
    {
        let mut run = Run::default();
        let d = run.apply(&sub_ev(1, "customer.subscription.created", T0, status, price));
        assert_eq!(d.outcome, Outcome::Applied);
        assert!(reconciles(d), "{status}: a reconcile is queued");
        assert_eq!(run.state().desired(at(T0 + 30 * DAY)), running(tier), "{status}");
        assert!(run.state().grace.is_none());
    }
}

#[test]
fn delinquent_statuses_grant_a_grace_period_from_the_event_time() {
    for status in ["past_due", "unpaid", "paused"] {
        let mut run = Run::default();
        run.apply(&sub_ev(1, "customer.subscription.created", T0, "active", STARTER));
        let failed_at = T0 + 30 * DAY;
        // Processed two days late: the grace still starts at the event's `created`.
        let d = run.apply_at(&updated(2, failed_at, status, STARTER), at(failed_at + 2 * DAY)).clone();
        assert_eq!(d.outcome, Outcome::Applied, "{status}");
        assert!(!reconciles(&d), "{status}: keeps running, nothing to reconcile yet");
        let s = run.state();
        let grace = s.grace.expect("grace");
        assert_eq!((grace.started_at, grace.ends_at), (at(failed_at), at(failed_at + 7 * DAY)), "{status}");
        assert_eq!(s.desired(at(failed_at + 7 * DAY - 1)), running(Tier::Starter), "{status}");
        assert_eq!(s.desired(at(failed_at + 7 * DAY)), DesiredInstance::Absent, "{status}");
    }
}

#[test]
fn canceled_and_incomplete_expired_deprovision_now() {
    for status in ["canceled", "incomplete_expired"] {
        let mut run = Run::default();
        run.apply(&sub_ev(1, "customer.subscription.created", T0, "active", STARTER));
        let d = run.apply(&updated(2, T0 + DAY, status, STARTER)).clone();
        assert!(reconciles(&d), "{status}: deprovision is queued");
        assert_eq!(run.state().desired(at(T0 + DAY)), DesiredInstance::Absent, "{status}");
        assert!(run.state().status().unwrap().is_terminal());
    }
}

#[test]
fn incomplete_provisions_nothing_until_active() {
    let mut run = Run::default();
    let d = run.apply(&sub_ev(1, "customer.subscription.created", T0, "incomplete", STARTER)).clone();
    assert_eq!(d.outcome, Outcome::Applied);
    // A new aggregate is reconciled (an app adopted from the Node service may exist), to nothing.
    assert!(reconciles(&d));
    assert_eq!(run.state().desired(at(T0 + 60)), DesiredInstance::Absent, "nothing to provision");
    let d = run.apply(&updated(2, T0 + 60, "active", STARTER)).clone();
    assert!(reconciles(&d));
    assert_eq!(run.state().desired(at(T0 + 61)), running(Tier::Starter));
}

#[test]
fn grace_is_never_extended_by_repeated_failures() {
    let mut run = Run::default();
    run.apply(&sub_ev(1, "customer.subscription.created", T0, "active", STARTER));
    let first = T0 + 30 * DAY;
    run.apply(&inv_ev(1, "invoice.payment_failed", first, "in_a"));
    run.apply(&updated(2, first + 1, "past_due", STARTER));
    run.apply(&inv_ev(2, "invoice.payment_failed", first + 3 * DAY, "in_a"));
    run.apply(&inv_ev(3, "invoice.payment_failed", first + 5 * DAY, "in_b"));
    run.apply(&updated(4, first + 5 * DAY + 1, "unpaid", STARTER));
    let grace = run.state().grace.unwrap();
    assert_eq!((grace.started_at, grace.ends_at), (at(first), at(first + 7 * DAY)));
}

#[test]
fn grace_is_cleared_by_payment_or_a_return_to_active() {
    type Clearing = fn(i64) -> Event;
    let clear: [(&str, Clearing); 3] = [
        ("invoice.paid", |t| inv_ev(9, "invoice.paid", t, "in_a")),
        ("invoice.payment_succeeded", |t| inv_ev(9, "invoice.payment_succeeded", t, "in_a")),
        ("active snapshot", |t| updated(9, t, "active", STARTER)),
    ];
    for (what, clearing) in clear {
        let mut run = Run::default();
        run.apply(&sub_ev(1, "customer.subscription.created", T0, "active", STARTER));
        let failed = T0 + 30 * DAY;
        run.apply(&inv_ev(1, "invoice.payment_failed", failed, "in_a"));
        run.apply(&updated(2, failed + 1, "past_due", STARTER));
        assert!(run.state().grace.is_some());
        let d = run.apply(&clearing(failed + 2 * DAY)).clone();
        assert_eq!(d.outcome, Outcome::Applied, "{what}");
        assert!(run.state().grace.is_none(), "{what} clears the grace period");
        assert!(run.state().failures.is_empty(), "{what}");
        assert_eq!(
            run.state().desired(at(failed + 30 * DAY)),
            running(Tier::Starter),
            "{what}: runs past the old deadline"
        );
        // A later failure starts a new grace period, from its own time.
        run.apply(&inv_ev(3, "invoice.payment_failed", failed + 40 * DAY, "in_c"));
        assert_eq!(run.state().grace.unwrap().started_at, at(failed + 40 * DAY), "{what}");
    }
}

#[test]
fn grace_expired_before_payment_comes_back_when_paid() {
    let mut run = Run::default();
    run.apply(&sub_ev(1, "customer.subscription.created", T0, "active", STARTER));
    run.apply(&inv_ev(1, "invoice.payment_failed", T0 + DAY, "in_a"));
    let late = T0 + 9 * DAY;
    assert_eq!(run.state().desired(at(late)), DesiredInstance::Absent);
    let d = run.apply(&inv_ev(2, "invoice.paid", late, "in_a")).clone();
    assert!(reconciles(&d), "paid after expiry: provision again");
    assert_eq!(run.state().desired(at(late + 1)), running(Tier::Starter));
}

#[test]
fn a_failure_of_a_paid_invoice_is_stale() {
    let mut run = Run::default();
    run.apply(&sub_ev(1, "customer.subscription.created", T0, "active", STARTER));
    run.apply(&inv_ev(1, "invoice.paid", T0 + 10 * DAY, "in_a"));
    let d = run.apply(&inv_ev(2, "invoice.payment_failed", T0 + 9 * DAY, "in_a")).clone();
    assert_eq!(d.outcome, Outcome::Stale);
    assert!(emails(&d).is_empty(), "no payment-failed e-mail for a resolved failure");
    assert!(run.state().grace.is_none());
    // An older report of the same payment is stale as well, and changes nothing.
    let before = run.state().clone();
    let d = run.apply(&inv_ev(4, "invoice.payment_succeeded", T0 + 5 * DAY, "in_a")).clone();
    assert_eq!(d.outcome, Outcome::Stale);
    assert_eq!(run.state(), &before);
    // Another invoice failing in the same second as that payment is not resolved by it (DESIGN §3:
    // failures are tracked per invoice).
    let d = run.apply(&inv_ev(3, "invoice.payment_failed", T0 + 10 * DAY, "in_b")).clone();
    assert_eq!(d.outcome, Outcome::Applied);
    assert_eq!(run.state().grace.unwrap().started_at, at(T0 + 10 * DAY));
}

#[test]
fn unknown_price_fails_with_an_admin_alert_and_never_maps_to_free() {
    // Without and with an existing aggregate.
    for existing in [false, true] {
        let mut run = Run::default();
        if existing {
            run.apply(&sub_ev(1, "customer.subscription.created", T0, "active", PRO));
        }
        let before = run.state.clone();
        let e = updated(2, T0 + DAY, "active", "price_unknown_42");
        let d = run.apply(&e).clone();
        let Outcome::Failed(reason) = &d.outcome else { panic!("expected failure, got {:?}", d.outcome) };
        assert!(reason.contains("price_unknown_42"), "{reason}");
        assert!(d.subscription.is_none(), "no aggregate change");
        assert_eq!(run.state, before);
        assert_eq!(d.jobs.len(), 1);
        assert!(matches!(&d.jobs[0].kind, JobKind::AdminAlert { detail, .. } if detail.contains(&e.id)));
        if existing {
            assert_eq!(run.state().tier(), Some(Tier::Professional), "not downgraded");
        }
    }
}

#[test]
fn lookup_key_and_metadata_tier_resolve_unconfigured_prices() {
    for (price_object, tier) in [
        (r#"{"id":"price_lk","object":"price","lookup_key":"professional","metadata":{}}"#, Tier::Professional),
        (r#"{"id":"price_lk2","object":"price","lookup_key":"pro"}"#, Tier::Professional),
        (r#"{"id":"price_md","object":"price","lookup_key":null,"metadata":{"tier":"enterprise"}}"#, Tier::Enterprise),
        (r#"{"id":"price_md2","object":"price","lookup_key":"nonsense","metadata":{"tier":"Starter"}}"#, Tier::Starter),
        // The configured id wins over a contradicting lookup key.
        (&format!(r#"{{"id":"{STARTER}","object":"price","lookup_key":"enterprise"}}"#), Tier::Starter),
    ] {
        let json =
            price_json_subscription("evt_p", "customer.subscription.created", T0, SUB, "active", price_object, true);
        let mut run = Run::default();
        let d = run.apply(&ev(&json)).clone();
        assert_eq!(d.outcome, Outcome::Applied, "{price_object}");
        assert_eq!(run.state().desired(at(T0 + 1)), running(tier), "{price_object}");
    }
    let json = price_json_subscription(
        "evt_p",
        "customer.subscription.created",
        T0,
        SUB,
        "active",
        r#"{"id":"price_x","lookup_key":"gold","metadata":{"tier":"platinum"}}"#,
        false,
    );
    assert!(matches!(Run::default().apply(&ev(&json)).outcome, Outcome::Failed(_)));
}

#[test]
fn canceled_is_terminal() {
    let mut run = Run::default();
    run.apply(&sub_ev(1, "customer.subscription.created", T0, "active", STARTER));
    run.apply(&sub_ev(2, "customer.subscription.deleted", T0 + DAY, "canceled", STARTER));
    for (n, status) in [(3, "active"), (4, "trialing"), (5, "past_due"), (6, "incomplete")] {
        let d = run.apply(&updated(n, T0 + 2 * DAY + i64::from(n), status, PRO)).clone();
        assert_eq!(d.outcome, Outcome::Stale, "{status} after canceled");
        assert!(!reconciles(&d));
        assert_eq!(run.state().status(), Some(SubscriptionStatus::Canceled));
        assert_eq!(run.state().desired(at(T0 + 3 * DAY)), DesiredInstance::Absent);
    }
    // A paid invoice does not revive it either.
    run.apply(&inv_ev(7, "invoice.paid", T0 + 4 * DAY, "in_z"));
    assert_eq!(run.state().desired(at(T0 + 4 * DAY)), DesiredInstance::Absent);
}

#[test]
fn updated_before_created_creates_the_aggregate_and_the_late_created_is_stale() {
    let mut run = Run::default();
    let d = run.apply(&updated(2, T0 + 60, "active", PRO)).clone();
    assert_eq!(d.outcome, Outcome::Applied);
    assert!(reconciles(&d));
    assert_eq!(run.state().customer_id, CUS);
    let d = run.apply(&sub_ev(1, "customer.subscription.created", T0, "incomplete", STARTER)).clone();
    assert_eq!(d.outcome, Outcome::Stale);
    assert!(!reconciles(&d));
    assert_eq!(run.state().tier(), Some(Tier::Professional));
    assert_eq!(run.state().status(), Some(SubscriptionStatus::Active));
}

#[test]
fn equal_second_snapshots_apply() {
    let mut run = Run::default();
    run.apply(&updated(1, T0, "active", STARTER));
    let d = run.apply(&updated(2, T0, "active", PRO)).clone();
    assert_eq!(d.outcome, Outcome::Applied, "same second: apply (a strict < would lose it)");
    assert_eq!(run.state().tier(), Some(Tier::Professional));
    let d = run.apply(&updated(3, T0 - 1, "active", STARTER)).clone();
    assert_eq!(d.outcome, Outcome::Stale);
}

#[test]
fn invoice_for_an_unknown_subscription_creates_the_aggregate() {
    let mut run = Run::default();
    let failed = T0 + DAY;
    let d = run.apply(&inv_ev(1, "invoice.payment_failed", failed, "in_a")).clone();
    assert_eq!(d.outcome, Outcome::Applied);
    let s = d.subscription.as_ref().expect("aggregate created, the fact is not lost");
    assert_eq!((s.subscription_id.as_str(), s.customer_id.as_str()), (SUB, CUS));
    assert!(s.snapshot.is_none());
    assert_eq!(s.desired(at(failed)), DesiredInstance::Absent, "no snapshot yet: nothing provisioned");
    assert!(!emails(&d).is_empty(), "the customer is told");
    // The snapshot arrives later: running, in grace from the invoice's time.
    let d = run.apply(&sub_ev(2, "customer.subscription.created", T0, "active", STARTER)).clone();
    assert!(reconciles(&d));
    assert_eq!(run.state().grace.unwrap().started_at, at(failed));
    assert_eq!(run.state().desired(at(failed + DAY)), running(Tier::Starter));
}

#[test]
fn invoice_without_subscription_is_ignored() {
    let json = format!(
        r#"{{"id":"evt_one_off","object":"event","type":"invoice.paid","created":{T0},"data":{{"object":{{"id":"in_1","customer":"{CUS}","subscription":null,"amount_due":100,"currency":"usd","customer_email":"a@b.c"}}}}}}"#
    );
    let d = decide(&policy(), None, &ev(&json), at(T0));
    assert_eq!(d.outcome, Outcome::Ignored);
    assert!(d.subscription.is_none() && d.jobs.is_empty());
    assert_eq!(d.account.unwrap().email.as_deref(), Some("a@b.c"));
}

#[test]
fn emails_payment_failed_once_per_invoice_cancellation_once_trial_ending() {
    let mut run = Run::default();
    run.apply(&sub_ev(1, "customer.subscription.created", T0, "trialing", STARTER));
    // Trial ending.
    let mut json =
        subscription_json("evt_tw", "customer.subscription.trial_will_end", T0 + DAY, SUB, "trialing", STARTER, true);
    json = json.replace(r#""trial_end":null"#, &format!(r#""trial_end":{}"#, T0 + 4 * DAY));
    let d = run.apply(&ev(&json)).clone();
    assert_eq!(emails(&d), [&EmailKind::TrialEnding { trial_end: Some(at(T0 + 4 * DAY)) }]);

    // Payment failed: one e-mail key per invoice, whatever the retries.
    let keys: Vec<String> = [(1, T0 + 10 * DAY), (2, T0 + 12 * DAY), (3, T0 + 14 * DAY)]
        .iter()
        .map(|&(n, t)| {
            let d = run.apply(&inv_ev(n, "invoice.payment_failed", t, "in_a")).clone();
            let job = d.jobs.iter().find(|j| matches!(j.kind, JobKind::Email { .. })).expect("e-mail job");
            assert!(matches!(&job.kind, JobKind::Email { email: EmailKind::PaymentFailed { invoice_id, amount_due: 4900, .. }, .. } if invoice_id == "in_a"));
            job.key.clone()
        })
        .collect();
    assert!(keys.iter().all(|k| k == &keys[0]), "{keys:?}");
    let other = run.apply(&inv_ev(4, "invoice.payment_failed", T0 + 15 * DAY, "in_b")).clone();
    assert!(other.jobs.iter().any(|j| matches!(j.kind, JobKind::Email { .. }) && j.key != keys[0]));

    // Cancellation: once, even when both `updated` (canceled) and `deleted` arrive.
    let d = run.apply(&updated(5, T0 + 20 * DAY, "canceled", STARTER)).clone();
    assert_eq!(emails(&d), [&EmailKind::Cancellation]);
    let d = run.apply(&sub_ev(6, "customer.subscription.deleted", T0 + 20 * DAY, "canceled", STARTER)).clone();
    assert!(emails(&d).is_empty(), "{:?}", d.jobs);
}

#[test]
fn expire_grace_fires_once_and_never_for_canceled() {
    let mut run = Run::default();
    run.apply(&sub_ev(1, "customer.subscription.created", T0, "active", STARTER));
    let failed = T0 + 30 * DAY;
    run.apply(&updated(2, failed, "past_due", STARTER));
    let s = run.state().clone();
    let end = at(failed + 7 * DAY);
    assert!(expire_grace(&s, end - Duration::seconds(1)).is_none(), "not yet");
    let d = expire_grace(&s, end).expect("expired");
    assert_eq!(d.outcome, Outcome::Applied);
    assert!(d.jobs.iter().any(|j| matches!(j.kind, JobKind::Reconcile { .. })));
    assert!(d.jobs.iter().any(|j| matches!(&j.kind, JobKind::Email { email: EmailKind::GraceExpired, .. })));
    let handled = d.subscription.expect("marked handled");
    assert!(handled.grace_expiry_handled);
    assert!(expire_grace(&handled, end + Duration::days(3)).is_none(), "once");

    // Canceled during grace: nothing for the sweeper (deprovisioned already).
    run.apply(&sub_ev(3, "customer.subscription.deleted", failed + DAY, "canceled", STARTER));
    assert!(expire_grace(run.state(), end + Duration::days(1)).is_none());

    // A failure after a payment after an expiry starts a fresh grace whose expiry is handled again.
    let mut run = Run::default();
    run.apply(&sub_ev(1, "customer.subscription.created", T0, "active", STARTER));
    run.apply(&inv_ev(1, "invoice.payment_failed", T0 + DAY, "in_a"));
    let handled = expire_grace(run.state(), at(T0 + 8 * DAY)).unwrap().subscription.unwrap();
    run.state = Some(handled);
    run.apply(&inv_ev(2, "invoice.paid", T0 + 9 * DAY, "in_a"));
    run.apply(&inv_ev(3, "invoice.payment_failed", T0 + 40 * DAY, "in_b"));
    assert!(!run.state().grace_expiry_handled);
    assert!(expire_grace(run.state(), at(T0 + 47 * DAY)).is_some());
}

// ---- a late fact is not news -------------------------------------------------------------------

/// The e-mail jobs of a decision: which e-mail, and whether it is skipped as not news.
fn email_news(d: &Decision) -> Vec<(&'static str, bool)> {
    d.jobs
        .iter()
        .filter_map(|j| match &j.kind {
            JobKind::Email { email, late, .. } => Some((email.label(), late.is_some())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_fact_older_than_the_news_horizon_is_recorded_but_emails_nobody() {
    let live = || {
        let mut run = Run::default();
        run.apply(&updated(0, T0, "active", STARTER));
        run
    };
    // A payment failure learnt 8 days later (past the 7-day grace) is not news; 2 days later it is.
    let failed = inv_ev(1, "invoice.payment_failed", T0 + DAY, "in_late");
    assert_eq!(email_news(live().apply_at(&failed, at(T0 + 9 * DAY))), [("payment_failed", true)]);
    assert_eq!(email_news(live().apply_at(&failed, at(T0 + 3 * DAY))), [("payment_failed", false)]);
    let reason = match &live().apply_at(&failed, at(T0 + 9 * DAY)).jobs.last().unwrap().kind {
        JobKind::Email { late: Some(reason), .. } => reason.clone(),
        other => panic!("{other:?}"),
    };
    assert!(reason.contains("payment failure") && reason.contains("7-day horizon"), "{reason}");

    // A deletion webhook of a subscription canceled at period end: `canceled_at` is when the customer
    // asked (a month before), `ended_at` now: news.
    let deleted = r#"{"id":"evt_end","object":"event","api_version":"2026-07-29.dahlia","created":CREATED,"data":{"object":{"id":"sub_rules","object":"subscription","customer":"CUS","status":"canceled","cancel_at_period_end":true,"canceled_at":ASKED,"ended_at":CREATED,"trial_end":null,"items":{"object":"list","data":[{"id":"si_1","object":"subscription_item","price":{"id":"PRICE","object":"price"},"quantity":1,"current_period_end":CREATED}]},"metadata":{}}},"livemode":false,"type":"customer.subscription.deleted"}"#
        .replace("CREATED", &(T0 + 40 * DAY).to_string())
        .replace("ASKED", &(T0 + 10 * DAY).to_string())
        .replace("CUS", CUS)
        .replace("PRICE", STARTER);
    assert_eq!(email_news(live().apply(&ev(&deleted))), [("cancellation", false)]);
    // The same subscription seen by a reconcile a year later (a snapshot dated at the fetch): not news.
    let mut snapshot = ev(&deleted);
    snapshot.created = at(T0 + 400 * DAY);
    assert_eq!(email_news(live().apply(&snapshot)), [("cancellation", true)]);

    // With a grace period shorter than Stripe's 3 days of webhook retries, a retried webhook is news.
    let short = policy().with_grace_period(Duration::days(1));
    assert_eq!(short.news_horizon(), Duration::days(3));
    let state = live().state().clone();
    let d = decide(&short, Some(&state), &failed, at(T0 + 3 * DAY));
    assert_eq!(email_news(&d), [("payment_failed", false)]);
}

// ---- explain: one sentence per subscription, on the same states ------------------------------------

mod explained {
    use super::*;
    use mindroom_billing_core::explain::{explain, job_label};
    use mindroom_billing_core::{EventObject, InstanceRecord, InstanceStatus, Job, JobState};

    fn instance(status: InstanceStatus, tier: Tier, updated: i64) -> InstanceRecord {
        InstanceRecord {
            subscription_id: SUB.into(),
            app_name: "mr-rules-1".into(),
            status,
            generation: 1,
            tier: Some(tier),
            limits: Some(tier.limits()),
            subdomain: None,
            frontend_url: None,
            backend_url: None,
            deprovisioned_at: (status == InstanceStatus::Deprovisioned).then(|| at(updated)),
            updated_at: at(updated),
            adopted: false,
        }
    }

    fn job(id: i64, kind: JobKind, state: JobState, created: i64, finished: i64) -> Job {
        Job {
            id,
            key: format!("job:{id}"),
            group: Some(SUB.into()),
            kind,
            state,
            attempts: 1,
            run_after: at(created),
            locked_until: None,
            last_error: None,
            created_at: at(created),
            updated_at: at(finished),
        }
    }

    fn reconcile() -> JobKind {
        JobKind::Reconcile { subscription_id: SUB.into() }
    }

    fn invoices(events: &[&Event]) -> Vec<mindroom_billing_core::event::InvoiceFact> {
        events
            .iter()
            .filter_map(|e| match &e.object {
                EventObject::Invoice(i) => Some(i.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_expired_grace_names_the_invoice_its_amount_the_dates_and_the_deprovisioning_job() {
        let mut run = Run::default();
        run.apply(&sub_ev(1, "customer.subscription.created", T0, "active", PRO));
        let failed_at = T0 + 30 * DAY;
        let failed = inv_ev(2, "invoice.payment_failed", failed_at, "in_1Pgd9kAugust");
        run.apply(&failed);
        let expiry = at(failed_at + 7 * DAY + 60);
        let d = expire_grace(run.state(), expiry).expect("the grace expires");
        let state = d.subscription.expect("handled");
        let done = at(failed_at + 7 * DAY + 70);
        let gone = InstanceRecord {
            deprovisioned_at: Some(done),
            ..instance(InstanceStatus::Deprovisioned, Tier::Professional, failed_at + 7 * DAY + 70)
        };
        let jobs = [
            job(1, reconcile(), JobState::Done, T0, T0 + 5),
            job(10, reconcile(), JobState::Done, failed_at + 7 * DAY + 60, failed_at + 7 * DAY + 71),
            job(11, reconcile(), JobState::Done, failed_at + 7 * DAY + 80, failed_at + 7 * DAY + 90),
        ];
        let now = at(failed_at + 9 * DAY);
        let sentence = explain(&state, Some(&gone), &jobs, &invoices(&[&failed]), now);
        assert_eq!(
            sentence,
            "No instance: invoice in_1Pgd9kAugust ($49.00) failed on 24 Aug 2026; the 7-day grace ended on 31 Aug \
             2026; deprovisioned on 31 Aug 2026 (job 10)."
        );
        assert_eq!(job_label(&jobs[1], &state, Some(&gone), &jobs, now), "deprovision");
        assert_eq!(job_label(&jobs[2], &state, Some(&gone), &jobs, now), "reconcile (no change)");
        // Without the invoice event at hand the id is still named.
        assert!(
            explain(&state, Some(&gone), &jobs, &[], now).starts_with("No instance: invoice in_1Pgd9kAugust failed")
        );
    }

    #[test]
    fn in_grace_the_instance_runs_and_the_deadline_is_said() {
        let mut run = Run::default();
        run.apply(&sub_ev(1, "customer.subscription.created", T0, "active", STARTER));
        let failed = inv_ev(2, "invoice.payment_failed", T0 + DAY, "in_Sept");
        run.apply(&failed);
        let running = instance(InstanceStatus::Running, Tier::Starter, T0 + 5);
        let sentence = explain(run.state(), Some(&running), &[], &invoices(&[&failed]), at(T0 + 2 * DAY));
        assert_eq!(
            sentence,
            "Running: active starter subscription; instance mr-rules-1 runs; invoice in_Sept ($49.00) failed on 26 Jul \
             2026; the 7-day grace ends on 2 Aug 2026: the instance is removed then unless it is paid."
        );
    }

    #[test]
    fn a_canceled_subscription_says_since_when() {
        let mut run = Run::default();
        run.apply(&sub_ev(1, "customer.subscription.created", T0, "active", PRO));
        run.apply(&sub_ev(2, "customer.subscription.deleted", T0 + 3 * DAY, "canceled", PRO));
        let s = explain(run.state(), None, &[], &[], at(T0 + 4 * DAY));
        assert_eq!(s, "No instance: the subscription is canceled since 28 Jul 2026; none was ever provisioned.");
        let still = instance(InstanceStatus::Running, Tier::Professional, T0 + 5);
        let pending = [job(7, reconcile(), JobState::Pending, T0 + 3 * DAY, T0 + 3 * DAY)];
        let s = explain(run.state(), Some(&still), &pending, &[], at(T0 + 4 * DAY));
        assert_eq!(
            s,
            "Instance mr-rules-1 still runs but should not: the subscription is canceled since 28 Jul 2026; deprovision \
             job 7 is pending (attempt 1)."
        );
        assert_eq!(job_label(&pending[0], run.state(), Some(&still), &pending, at(T0 + 4 * DAY)), "deprovision");
    }

    #[test]
    fn an_active_subscription_without_an_instance_names_the_dead_job() {
        let mut run = Run::default();
        run.apply(&sub_ev(1, "customer.subscription.created", T0, "active", PRO));
        let mut dead = job(3, reconcile(), JobState::Dead, T0, T0 + 600);
        dead.attempts = 5;
        dead.last_error = Some("provisioner answered 500".into());
        let jobs = [dead];
        let s = explain(run.state(), None, &jobs, &[], at(T0 + DAY));
        assert_eq!(
            s,
            "No instance yet: the subscription is active professional; provision job 3 is dead after 5 attempts \
             (provisioner answered 500): retry it."
        );
        assert_eq!(job_label(&jobs[0], run.state(), None, &jobs, at(T0 + DAY)), "provision");
        let none = explain(run.state(), None, &[], &[], at(T0 + DAY));
        assert!(
            none.ends_with("; no provision job is queued (reconcile with Stripe, or replay its last event)."),
            "{none}"
        );
    }

    #[test]
    fn a_period_end_in_the_past_is_flagged_and_only_invoices_say_so() {
        let mut run = Run::default();
        run.apply(&sub_ev(1, "customer.subscription.created", T0, "active", STARTER));
        let running = instance(InstanceStatus::Running, Tier::Starter, T0 + 5);
        let provisioned = [job(1, reconcile(), JobState::Done, T0, T0 + 6)];
        let s = explain(run.state(), Some(&running), &provisioned, &[], at(T0 + 31 * DAY));
        assert_eq!(
            s,
            "Running: active starter subscription (its period ended on 24 Aug 2026 and Stripe has sent no renewal \
             since); instance mr-rules-1 runs."
        );
        assert_eq!(job_label(&provisioned[0], run.state(), Some(&running), &provisioned, at(T0 + DAY)), "provision");

        let mut only = Run::default();
        only.apply(&inv_ev(1, "invoice.payment_failed", T0, "in_1"));
        assert!(explain(only.state(), None, &[], &[], at(T0)).starts_with("No instance: only invoices have been seen"));
    }
}
