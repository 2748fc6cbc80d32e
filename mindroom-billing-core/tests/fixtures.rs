//! All 24 event fixtures (both API versions) parse, agree on the fields billing reads, and drive the
//! full subscription timeline through the pure `decide`.

mod common;

use chrono::Duration;
use common::{CUS, PRICE_PRO, PRICE_STARTER, SUB, VERSIONS, at, fixture, fixture_bytes, policy};
use mindroom_billing_core::event::{CheckoutSession, CustomerInfo, InvoiceFact, SubscriptionSnapshot};
use mindroom_billing_core::{
    DesiredInstance, EmailKind, Event, EventObject, EventType, JobKind, Outcome, SubscriptionState, SubscriptionStatus,
    Tier, decide, expire_grace,
};

const NAMES: [&str; 12] = [
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "invoice.paid",
    "invoice.payment_succeeded",
    "invoice.payment_failed",
    "checkout.session.completed",
    "customer.updated",
    "invoice.payment_action_required",
    "charge.dispute.created",
    "charge.dispute.updated",
    "charge.dispute.closed",
];

fn subscription(e: &Event) -> &SubscriptionSnapshot {
    match &e.object {
        EventObject::Subscription(s) => s,
        other => panic!("{}: not a subscription: {other:?}", e.id),
    }
}

fn invoice(e: &Event) -> &InvoiceFact {
    match &e.object {
        EventObject::Invoice(i) => i,
        other => panic!("{}: not an invoice: {other:?}", e.id),
    }
}

#[test]
fn all_twenty_four_fixtures_parse_with_the_right_type_and_version() {
    let mut count = 0;
    for version in VERSIONS {
        for name in NAMES {
            let e = fixture(version, name);
            assert_eq!(e.event_type.as_str(), name, "{version}/{name}");
            assert_ne!(e.event_type, EventType::Other(name.to_owned()));
            assert_eq!(e.api_version.as_deref(), Some(version));
            assert!(e.id.starts_with("evt_"), "{}", e.id);
            assert!(!e.livemode);
            count += 1;
        }
    }
    assert_eq!(count, 24);
    // Every file of the events directory is covered.
    for version in VERSIONS {
        let files = std::fs::read_dir(common::stripe_dir().join("events").join(version)).unwrap().count();
        assert_eq!(files, NAMES.len(), "{version}");
    }
}

#[test]
fn subscription_fields_agree_across_api_versions() {
    for (name, status, price, period_end) in [
        ("customer.subscription.created", SubscriptionStatus::Active, PRICE_STARTER, 1_787_592_000),
        ("customer.subscription.updated", SubscriptionStatus::Active, PRICE_PRO, 1_787_592_000),
        ("customer.subscription.deleted", SubscriptionStatus::Canceled, PRICE_PRO, 1_790_184_000),
    ] {
        let [old, new] = VERSIONS.map(|v| fixture(v, name));
        let (a, b) = (subscription(&old), subscription(&new));
        for s in [a, b] {
            assert_eq!((s.id.as_str(), s.customer.as_str(), s.status), (SUB, CUS, status), "{name}");
            assert_eq!(s.prices.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(), [price], "{name}");
            // Pre-basil on the subscription, from basil on the item: found in both.
            assert_eq!(s.current_period_end, Some(at(period_end)), "{name}");
        }
        assert_eq!(a, b, "{name}: both shapes read the same snapshot");
        assert_eq!(old.created, new.created);
    }
    let deleted = fixture(VERSIONS[1], "customer.subscription.deleted");
    assert_eq!(subscription(&deleted).canceled_at, Some(at(1_788_888_000)));
}

#[test]
fn invoice_fields_agree_across_api_versions() {
    for (name, invoice_id, amount_due, next_attempt) in [
        ("invoice.paid", "in_1Pgc6tB7WZ01zgkWu9fdqL6I", 2000, None),
        ("invoice.payment_succeeded", "in_1Pgc6tB7WZ01zgkWu9fdqL6I", 2000, None),
        ("invoice.payment_failed", "in_1Pgd9kB7WZ01zgkWn4Tz2Yq8", 5000, Some(at(1_787_851_200))),
    ] {
        let [old, new] = VERSIONS.map(|v| fixture(v, name));
        let (a, b) = (invoice(&old), invoice(&new));
        for i in [a, b] {
            // `invoice.subscription` before basil, `parent.subscription_details.subscription` after.
            assert_eq!(i.subscription.as_deref(), Some(SUB), "{name}");
            assert_eq!((i.id.as_str(), i.customer.as_str(), i.amount_due), (invoice_id, CUS, amount_due), "{name}");
            assert_eq!(i.customer_email.as_deref(), Some("jenny.rosen@example.com"), "{name}");
            assert_eq!(i.currency, "usd");
            assert_eq!(i.next_payment_attempt, next_attempt, "{name}");
            assert!(i.hosted_invoice_url.as_deref().is_some_and(|u| u.ends_with(&invoice_id[3..])), "{name}");
        }
        assert_eq!(a, b, "{name}");
        assert_eq!(old.subscription_id(), Some(SUB));
    }
}

#[test]
fn checkout_and_customer_fields_agree_across_api_versions() {
    for version in VERSIONS {
        let e = fixture(version, "checkout.session.completed");
        let EventObject::CheckoutSession(CheckoutSession { customer, subscription, client_reference_id, email, id }) =
            &e.object
        else {
            panic!("{version}: not a checkout session")
        };
        assert!(id.starts_with("cs_test_"));
        assert_eq!(customer.as_deref(), Some(CUS));
        assert_eq!(subscription.as_deref(), Some(SUB));
        assert_eq!(client_reference_id.as_deref(), Some("user_123"));
        assert_eq!(email.as_deref(), Some("jenny.rosen@example.com"));

        let e = fixture(version, "customer.updated");
        let EventObject::Customer(CustomerInfo { id, email, .. }) = &e.object else { panic!("not a customer") };
        assert_eq!((id.as_str(), email.as_deref()), (CUS, Some("jenny.rosen@example.com")));
    }
    assert_eq!(fixture_bytes(VERSIONS[0], "checkout.session.completed").len(), 3822, "the 3.8 KB bench event");
}

/// Applies `e` to `state` as the orchestrator would (the decision's aggregate replaces the state).
fn step(
    state: &mut Option<SubscriptionState>,
    e: &Event,
    now: chrono::DateTime<chrono::Utc>,
) -> mindroom_billing_core::Decision {
    let d = decide(&policy(), state.as_ref(), e, now);
    if let Some(next) = &d.subscription {
        *state = Some(next.clone());
    }
    d
}

fn has_reconcile(d: &mindroom_billing_core::Decision) -> bool {
    d.jobs.iter().any(|j| matches!(&j.kind, JobKind::Reconcile { subscription_id } if subscription_id == SUB))
}

#[test]
fn full_timeline_through_decide_in_both_api_versions() {
    let mut finals = Vec::new();
    for version in VERSIONS {
        let mut state = None;
        let ev = |name| fixture(version, name);
        let now_of = |e: &Event| e.created + Duration::seconds(2);

        let e = ev("customer.subscription.created");
        let d = step(&mut state, &e, now_of(&e));
        assert_eq!(d.outcome, Outcome::Applied);
        assert!(has_reconcile(&d), "{version}: first provision");
        let s = state.clone().unwrap();
        assert_eq!(s.tier(), Some(Tier::Starter));
        assert_eq!(
            s.desired(now_of(&e)),
            DesiredInstance::Running { tier: Tier::Starter, limits: Tier::Starter.limits() }
        );

        for name in ["invoice.paid", "invoice.payment_succeeded"] {
            let e = ev(name);
            let d = step(&mut state, &e, now_of(&e));
            assert_eq!(d.outcome, Outcome::Applied, "{version}/{name}");
            assert!(!has_reconcile(&d), "{version}/{name}: nothing to reconcile");
            assert_eq!(d.account.as_ref().and_then(|a| a.email.as_deref()), Some("jenny.rosen@example.com"));
        }

        let e = ev("checkout.session.completed");
        let d = step(&mut state, &e, now_of(&e));
        let account = d.account.unwrap();
        assert_eq!((account.stripe_customer_id.as_str(), account.reference.as_deref()), (CUS, Some("user_123")));
        assert!(d.subscription.is_none() && d.jobs.is_empty());

        let e = ev("customer.updated");
        let d = step(&mut state, &e, now_of(&e));
        assert_eq!(d.account.unwrap().email.as_deref(), Some("jenny.rosen@example.com"));

        let e = ev("customer.subscription.updated");
        let d = step(&mut state, &e, now_of(&e));
        assert!(has_reconcile(&d), "{version}: upgrade resizes");
        assert_eq!(state.as_ref().unwrap().tier(), Some(Tier::Professional));

        let e = ev("invoice.payment_failed");
        let d = step(&mut state, &e, now_of(&e) + Duration::hours(5));
        let s = state.clone().unwrap();
        let grace = s.grace.expect("grace starts");
        assert_eq!(grace.started_at, at(1_787_595_600), "{version}: grace starts at the event's created");
        assert_eq!(grace.ends_at, at(1_787_595_600) + Duration::days(7));
        assert!(!has_reconcile(&d), "still running during grace");
        assert!(d.jobs.iter().any(|j| j.key == "email:payment_failed:in_1Pgd9kB7WZ01zgkWn4Tz2Yq8"));
        assert!(matches!(
            s.desired(grace.ends_at - Duration::seconds(1)),
            DesiredInstance::Running { tier: Tier::Professional, .. }
        ));
        assert_eq!(s.desired(grace.ends_at), DesiredInstance::Absent);
        assert!(expire_grace(&s, grace.ends_at - Duration::seconds(1)).is_none());
        assert!(expire_grace(&s, grace.ends_at).is_some());

        let e = ev("customer.subscription.deleted");
        let d = step(&mut state, &e, now_of(&e));
        let s = state.clone().unwrap();
        assert_eq!(s.status(), Some(SubscriptionStatus::Canceled));
        assert_eq!(s.desired(now_of(&e)), DesiredInstance::Absent);
        assert!(d.jobs.iter().any(|j| matches!(&j.kind, JobKind::Email { email: EmailKind::Cancellation, .. })));
        assert!(expire_grace(&s, now_of(&e)).is_none(), "no grace expiry for a canceled subscription");
        finals.push(s);
    }
    assert_eq!(finals[0], finals[1], "both API versions end in the same aggregate");
}

fn dispute(e: &Event) -> &mindroom_billing_core::event::DisputeInfo {
    match &e.object {
        EventObject::Dispute(d) => d,
        other => panic!("{}: not a dispute: {other:?}", e.id),
    }
}

#[test]
fn dispute_fields_agree_across_api_versions() {
    for (name, status, closed) in [
        ("charge.dispute.created", "needs_response", false),
        ("charge.dispute.updated", "under_review", false),
        ("charge.dispute.closed", "won", true),
    ] {
        let [old, new] = VERSIONS.map(|v| fixture(v, name));
        let (a, b) = (dispute(&old), dispute(&new));
        for d in [a, b] {
            assert_eq!(d.id, "dp_1PgdQ2B7WZ01zgkWc4Ka9Dsp", "{name}");
            assert_eq!(d.charge, "ch_3PgcA1B7WZ01zgkW0fdqL6I", "{name}");
            assert_eq!(d.payment_intent.as_deref(), Some("pi_3PgcA1B7WZ01zgkW0fdqL6I"), "{name}");
            assert_eq!((d.amount, d.currency.as_str(), d.reason.as_str()), (2000, "usd", "fraudulent"), "{name}");
            assert_eq!((d.status.as_str(), d.is_closed()), (status, closed), "{name}");
            assert_eq!(d.opened_at, at(1_786_728_000), "{name}");
            assert_eq!(d.evidence_due_by, Some(at(1_787_529_599)), "{name}: the end of the ninth day after");
            assert_eq!((d.customer.as_deref(), d.subscription.as_deref()), (None, None), "the charge is looked up");
        }
        assert_eq!(a, b, "{name}: both shapes read the same dispute");
        assert_eq!(old.customer_id(), None);
        assert_eq!(old.subscription_id(), None);
    }
}

#[test]
fn payment_action_required_reads_the_invoice_in_both_shapes() {
    let [old, new] = VERSIONS.map(|v| fixture(v, "invoice.payment_action_required"));
    assert_eq!(invoice(&old), invoice(&new));
    let i = invoice(&new);
    assert_eq!(
        (i.id.as_str(), i.subscription.as_deref(), i.customer.as_str()),
        ("in_1Pgd9kB7WZ01zgkWn4Tz2Yq8", Some(SUB), CUS)
    );
    assert_eq!(
        i.hosted_invoice_url.as_deref(),
        Some("https://invoice.stripe.com/i/acct_1PgafEB7WZ01zgkW/test_1Pgd9kB7WZ01zgkWn4Tz2Yq8")
    );
    assert!(i.amount_due > 0);
}

/// The renewal waits for the customer: one e-mail with the link (keyed per invoice), the grace of a
/// failed payment of that invoice (a later failure report of it does not move it), and the payment
/// ends both.
#[test]
fn payment_action_required_opens_the_grace_and_e_mails_the_link_once_per_invoice() {
    for version in VERSIONS {
        let p = policy();
        let created = fixture(version, "customer.subscription.created");
        let s0 = decide(&p, None, &created, created.created).subscription.unwrap();
        let action = fixture(version, "invoice.payment_action_required");
        let d = decide(&p, Some(&s0), &action, action.created);
        assert_eq!(d.outcome, Outcome::Applied);
        let s1 = d.subscription.unwrap();
        assert_eq!(s1.awaiting_customer, ["in_1Pgd9kB7WZ01zgkWn4Tz2Yq8"]);
        let grace = s1.grace.expect("grace opened");
        assert_eq!((grace.started_at, grace.ends_at), (action.created, action.created + Duration::days(7)));
        let emails: Vec<_> = d.jobs.iter().filter(|j| matches!(j.kind, JobKind::Email { .. })).collect();
        assert_eq!(emails.len(), 1, "{version}");
        assert_eq!(emails[0].key, "email:payment_action_required:in_1Pgd9kB7WZ01zgkWn4Tz2Yq8");
        let JobKind::Email { email: EmailKind::PaymentActionRequired { hosted_invoice_url, amount_due, .. }, .. } =
            &emails[0].kind
        else {
            panic!("{:?}", emails[0].kind)
        };
        assert!(hosted_invoice_url.as_deref().is_some_and(|u| u.ends_with("test_1Pgd9kB7WZ01zgkWn4Tz2Yq8")));
        assert_eq!(*amount_due, invoice(&action).amount_due);
        // Stripe sends the same fact again under a new event id, later: same e-mail key, same grace.
        let mut again = action.clone();
        again.id = "evt_again".into();
        again.created = action.created + Duration::hours(20);
        let d2 = decide(&p, Some(&s1), &again, again.created);
        let s2 = d2.subscription.clone().unwrap_or_else(|| s1.clone());
        assert_eq!(s2.grace, Some(grace), "never extended");
        assert!(d2.jobs.iter().all(|j| !matches!(j.kind, JobKind::Email { .. }) || j.key == emails[0].key));
        // The customer confirms: the invoice is paid, the grace ends, no reconcile removes anything.
        let mut paid = fixture(version, "invoice.paid");
        let EventObject::Invoice(fact) = &mut paid.object else { unreachable!() };
        fact.id = "in_1Pgd9kB7WZ01zgkWn4Tz2Yq8".into();
        paid.created = action.created + Duration::days(1);
        let s3 = decide(&p, Some(&s2), &paid, paid.created).subscription.unwrap();
        assert_eq!(s3.grace, None, "{version}");
        assert!(s3.awaiting_customer.is_empty(), "paid: nothing waits for the customer");
        // Learnt past the news horizon (a long outage caught up): the grace still counts, the
        // e-mail is queued as not news (recorded as skipped, never sent).
        let late = decide(&p, Some(&s0), &action, action.created + Duration::days(8));
        let late_email = late.jobs.iter().find(|j| matches!(j.kind, JobKind::Email { .. })).unwrap();
        let JobKind::Email { late: reason, .. } = &late_email.kind else { unreachable!() };
        assert!(reason.as_deref().is_some_and(|r| r.contains("authentication request")), "{reason:?}");
        assert!(matches!(s3.desired(paid.created + Duration::days(30)), DesiredInstance::Running { .. }));
    }
}
