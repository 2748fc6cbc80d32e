//! Disputes through the pure `decide`: one admin alert per dispute and status, the dispute kept in
//! the aggregate of its subscription, and `BILLING_DISPUTE_POLICY` (alert / suspend) decided here.

mod common;

use chrono::Duration;
use common::{CUS, SUB, VERSIONS, fixture, policy};
use mindroom_billing_core::{
    DesiredInstance, DisputePolicy, EntitlementStatus, Event, EventObject, JobKind, Outcome, SubscriptionState, decide,
    expire_grace,
};

/// A dispute fixture booked on the fixtures' subscription (what the orchestrator's charge look-up does).
fn booked(version: &str, name: &str) -> Event {
    let mut e = fixture(version, name);
    let EventObject::Dispute(d) = &mut e.object else { panic!("{name}: not a dispute") };
    d.customer = Some(CUS.into());
    d.subscription = Some(SUB.into());
    e
}

fn alerts(jobs: &[mindroom_billing_core::NewJob]) -> Vec<(String, String, String)> {
    jobs.iter()
        .filter_map(|j| match &j.kind {
            JobKind::AdminAlert { subject, detail } => Some((j.key.clone(), subject.clone(), detail.clone())),
            _ => None,
        })
        .collect()
}

fn active(p: &mindroom_billing_core::Policy, version: &str) -> SubscriptionState {
    let created = fixture(version, "customer.subscription.created");
    let mut s = decide(p, None, &created, created.created).subscription.unwrap();
    s.version = 1;
    s
}

fn step(
    p: &mindroom_billing_core::Policy,
    s: &SubscriptionState,
    e: &Event,
) -> (SubscriptionState, Vec<(String, String, String)>) {
    let d = decide(p, Some(s), e, e.created);
    assert_eq!(d.outcome, Outcome::Applied, "{}", e.id);
    (d.subscription.unwrap_or_else(|| s.clone()), alerts(&d.jobs))
}

#[test]
fn a_dispute_alerts_once_per_state_change_with_the_details() {
    let p = policy().with_console_url("https://billing.example.com/");
    for version in VERSIONS {
        let s0 = active(&p, version);
        let (s1, a1) = step(&p, &s0, &booked(version, "charge.dispute.created"));
        assert_eq!(a1.len(), 1, "{version}");
        let (key, subject, detail) = &a1[0];
        assert_eq!(key, "alert:dispute:dp_1PgdQ2B7WZ01zgkWc4Ka9Dsp:needs_response");
        assert_eq!(subject, &format!("Dispute opened: $20.00 of {CUS}"));
        for part in
            ["reason fraudulent", "Evidence due by 2026-08-23 23:59 UTC", SUB, CUS, "ch_3PgcA1B7WZ01zgkW0fdqL6I"]
        {
            assert!(detail.contains(part), "{part}: {detail}");
        }
        assert!(detail.contains(&format!("Console: https://billing.example.com/customers/{CUS}")), "{detail}");
        assert_eq!(s1.open_disputes().len(), 1);
        // Policy alert: nothing else changes.
        assert_eq!(s1.entitlement(s1.disputes[0].opened_at).status, EntitlementStatus::Active);
        assert_eq!((s1.grace, s1.dispute_hold), (None, None));

        let updated = booked(version, "charge.dispute.updated");
        let (s2, a2) = step(&p, &s1, &updated);
        assert_eq!(a2.len(), 1);
        assert!(a2[0].1.contains("is now under_review") && a2[0].2.contains("(was needs_response)"), "{a2:?}");
        // Stripe delivers the same state again (another event id, later): no second alert.
        let mut again = updated.clone();
        again.id = "evt_again".into();
        again.created += Duration::minutes(5);
        let (s3, a3) = step(&p, &s2, &again);
        assert!(a3.is_empty(), "{a3:?}");

        let (s4, a4) = step(&p, &s3, &booked(version, "charge.dispute.closed"));
        assert_eq!(a4.len(), 1);
        assert_eq!(a4[0].1, format!("Dispute won: $20.00 of {CUS}"));
        assert!(s4.open_disputes().is_empty());
        // A late `updated` after the close is stale and reopens nothing.
        let late = decide(&p, Some(&s4), &updated, updated.created + Duration::days(30));
        assert_eq!(late.outcome, Outcome::Stale);
        assert!(late.jobs.is_empty() && late.subscription.is_none());
    }
}

#[test]
fn an_unbooked_dispute_still_alerts_and_changes_nothing() {
    let e = fixture(VERSIONS[1], "charge.dispute.created");
    let d = decide(&policy().with_dispute_policy(DisputePolicy::Suspend), None, &e, e.created);
    assert_eq!(d.outcome, Outcome::Applied);
    assert!(d.subscription.is_none());
    let a = alerts(&d.jobs);
    assert_eq!(a.len(), 1);
    assert!(a[0].1.contains("unknown customer") && a[0].2.contains("STRIPE_SECRET_KEY"), "{a:?}");
}

#[test]
fn suspend_policy_suspends_while_open_keeps_the_instance_for_the_grace_and_restores_when_won() {
    let p = policy().with_dispute_policy(DisputePolicy::Suspend);
    for version in VERSIONS {
        let s0 = active(&p, version);
        let opened = booked(version, "charge.dispute.created");
        let d = decide(&p, Some(&s0), &opened, opened.created);
        let s1 = d.subscription.unwrap();
        let t = opened.created;
        assert_eq!(s1.dispute_hold, Some(t));
        let e = s1.entitlement(t);
        assert_eq!((e.status, e.tier), (EntitlementStatus::Suspended, mindroom_billing_core::Tier::Free), "{version}");
        // The instance is kept for the grace period from the dispute's opening.
        assert!(matches!(s1.desired(t + Duration::days(6)), DesiredInstance::Running { .. }));
        assert_eq!(s1.grace.map(|g| g.ends_at), Some(t + Duration::days(7)));
        assert!(alerts(&d.jobs)[0].2.contains("the entitlements are suspended"));
        // Still open after the grace: the sweeper removes the instance.
        let swept = expire_grace(&s1, t + Duration::days(7)).expect("expiry handled");
        assert!(swept.jobs.iter().any(|j| matches!(j.kind, JobKind::Reconcile { .. })));
        assert_eq!(s1.desired(t + Duration::days(7)), DesiredInstance::Absent);

        // Won (before the grace ran out): everything comes back, no grace left.
        let won = booked(version, "charge.dispute.closed");
        let mut won_early = won.clone();
        won_early.created = t + Duration::days(3);
        let s2 = decide(&p, Some(&s1), &won_early, won_early.created).subscription.unwrap();
        assert_eq!((s2.dispute_hold, s2.grace), (None, None), "{version}");
        assert_eq!(s2.entitlement(won_early.created).status, EntitlementStatus::Active);
    }
}

#[test]
fn a_lost_dispute_keeps_the_hold_and_alert_policy_never_holds() {
    let suspend = policy().with_dispute_policy(DisputePolicy::Suspend);
    let s0 = active(&suspend, VERSIONS[0]);
    let mut lost = booked(VERSIONS[0], "charge.dispute.closed");
    let EventObject::Dispute(d) = &mut lost.object else { unreachable!() };
    d.status = "lost".into();
    let s1 = decide(&suspend, Some(&s0), &lost, lost.created).subscription.unwrap();
    assert!(s1.open_disputes().is_empty(), "lost is decided");
    assert!(s1.dispute_hold.is_some(), "but a lost dispute still holds the entitlements");
    assert_eq!(s1.entitlement(lost.created).status, EntitlementStatus::Suspended);
    let subject = &alerts(&decide(&suspend, Some(&s0), &lost, lost.created).jobs)[0].1;
    assert!(subject.starts_with("Dispute lost"), "{subject}");

    let alert = policy();
    let s2 = decide(&alert, Some(&s0), &lost, lost.created).subscription.unwrap();
    assert_eq!((s2.dispute_hold, s2.entitlement(lost.created).status), (None, EntitlementStatus::Active));
}

/// Whatever order Stripe delivers the reports in, the aggregate ends the same (the latest report
/// wins, a decided dispute stays decided), and no status is alerted twice.
#[test]
fn dispute_reports_in_any_order_give_one_aggregate() {
    let p = policy().with_dispute_policy(DisputePolicy::Suspend);
    let names = ["charge.dispute.created", "charge.dispute.updated", "charge.dispute.closed"];
    let orders = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
    let mut finals = Vec::new();
    for order in orders {
        let mut s = active(&p, VERSIONS[1]);
        let mut keys = Vec::new();
        for i in order {
            let e = booked(VERSIONS[1], names[i]);
            let d = decide(&p, Some(&s), &e, e.created);
            keys.extend(alerts(&d.jobs).into_iter().map(|(k, _, _)| k));
            if let Some(next) = d.subscription {
                s = next;
            }
        }
        let unique: std::collections::BTreeSet<_> = keys.iter().collect();
        assert_eq!(unique.len(), keys.len(), "{order:?}: {keys:?}");
        assert_eq!(s.disputes[0].status, "won", "{order:?}");
        assert_eq!((s.dispute_hold, s.grace), (None, None), "{order:?}");
        finals.push(s);
    }
    assert!(finals.windows(2).all(|w| w[0] == w[1]), "{finals:#?}");
}

/// The console's why sentence names an invoice waiting for the customer's confirmation, and a dispute
/// that holds the entitlements.
#[test]
fn the_why_sentence_says_what_waits_for_the_customer_and_which_dispute_holds() {
    use mindroom_billing_core::explain::explain;
    let p = policy().with_dispute_policy(DisputePolicy::Suspend);
    let s0 = active(&p, VERSIONS[1]);
    let action = fixture(VERSIONS[1], "invoice.payment_action_required");
    let s1 = decide(&p, Some(&s0), &action, action.created).subscription.unwrap();
    let EventObject::Invoice(invoice) = &action.object else { unreachable!() };
    let why = explain(&s1, None, &[], std::slice::from_ref(invoice), action.created);
    let deadline = (action.created + Duration::days(7)).format("%-d %b %Y").to_string();
    assert!(
        why.contains(&format!(
            "waiting for the customer to confirm the payment of {} ($50.00) by {deadline}",
            invoice.id
        )),
        "{why}"
    );
    let late = explain(&s1, None, &[], &[], action.created + Duration::days(8));
    assert!(
        late.contains(&format!("the customer did not confirm the payment of {} by {deadline}", invoice.id)),
        "{late}"
    );

    let opened = booked(VERSIONS[1], "charge.dispute.created");
    let s2 = decide(&p, Some(&s0), &opened, opened.created).subscription.unwrap();
    let why = explain(&s2, None, &[], &[], opened.created);
    assert!(why.contains("a dispute opened on 14 Aug 2026 suspends the entitlements"), "{why}");
}
