//! Decisions at the edges real Stripe histories reach (issue 10): grace per invoice, the best tier of
//! several items, every e-mail source. Pure `decide` over events parsed from realistic JSON.

mod common;

use chrono::{DateTime, Duration, Utc};
use common::{CUS, DAY, T0, at, ev, invoice_json, policy, subscription_json};
use mindroom_billing_core::{DesiredInstance, Event, Outcome, SubscriptionState, Tier, decide};

const SUB: &str = "sub_edges";
const STARTER: &str = common::PRICE_STARTER;
const PRO: &str = common::PRICE_PRO;

fn created(n: u32, t: i64, status: &str) -> Event {
    ev(&subscription_json(&format!("evt_s{n}"), "customer.subscription.created", t, SUB, status, STARTER, true))
}

fn updated(n: u32, t: i64, status: &str) -> Event {
    ev(&subscription_json(&format!("evt_s{n}"), "customer.subscription.updated", t, SUB, status, STARTER, true))
}

fn invoice(n: u32, kind: &str, t: i64, invoice: &str) -> Event {
    ev(&invoice_json(&format!("evt_i{n}"), kind, t, invoice, SUB, n % 2 == 0))
}

/// Applies `events` in the given order, each decided at `now`.
fn fold(events: &[&Event], now: DateTime<Utc>) -> Option<SubscriptionState> {
    let mut state: Option<SubscriptionState> = None;
    for e in events {
        if let Some(next) = decide(&policy(), state.as_ref(), e, now).subscription {
            state = Some(next);
        }
    }
    state.map(|mut s| {
        s.version = 0;
        s
    })
}

fn permutations<T: Clone>(items: &[T]) -> Vec<Vec<T>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut out = Vec::new();
    for i in 0..items.len() {
        let mut rest = items.to_vec();
        let first = rest.remove(i);
        for mut tail in permutations(&rest) {
            tail.insert(0, first.clone());
            out.push(tail);
        }
    }
    out
}

#[test]
fn paying_one_invoice_does_not_clear_the_failure_of_another() {
    // The issue's sequence: A fails at T1, B fails at T2, A is paid at T3; B is still unpaid.
    let now = at(T0 + 40 * DAY);
    let (t1, t2, t3) = (now - Duration::days(10), now - Duration::hours(9 * 24), now - Duration::hours(204));
    let events = [
        created(1, T0, "active"),
        invoice(1, "invoice.payment_failed", t1.timestamp(), "in_a"),
        invoice(2, "invoice.payment_failed", t2.timestamp(), "in_b"),
        invoice(3, "invoice.paid", t3.timestamp(), "in_a"),
    ];
    let refs: Vec<&Event> = events.iter().collect();
    let state = fold(&refs, now).unwrap();
    let grace = state.grace.expect("B is unpaid: still in grace");
    assert_eq!(grace.started_at, t2, "the grace runs from the earliest unresolved failure (B)");
    assert_eq!(state.desired(now), DesiredInstance::Absent, "B has been unpaid for 9 days: deprovision");

    // A later retry failure of B does not open a new window.
    let retry = invoice(5, "invoice.payment_failed", (now - Duration::days(1)).timestamp(), "in_b");
    let after = decide(&policy(), Some(&state), &retry, now).subscription.unwrap_or(state.clone());
    assert_eq!(after.grace.unwrap().started_at, t2, "Stripe's retry never extends the grace");

    // Any delivery order gives the same aggregate.
    for order in permutations(&refs) {
        assert_eq!(fold(&order, now).as_ref(), Some(&state), "{:?}", order.iter().map(|e| &e.id).collect::<Vec<_>>());
    }
}

#[test]
fn a_payment_resolves_its_own_invoice_even_when_delivered_first() {
    let now = at(T0 + 20 * DAY);
    let paid = invoice(2, "invoice.paid", T0 + 10 * DAY + 60, "in_a");
    let failed = invoice(1, "invoice.payment_failed", T0 + 10 * DAY, "in_a");
    let mut state = fold(&[&created(1, T0, "active"), &paid], now).unwrap();
    state.version = 1;
    let d = decide(&policy(), Some(&state), &failed, now);
    assert_eq!(d.outcome, Outcome::Stale, "the failure of a paid invoice changes nothing");
    assert!(d.jobs.is_empty(), "no payment-failed e-mail for a paid invoice: {:?}", d.jobs);
    // Another invoice's failure at the same second as that payment is not resolved by it.
    let other = invoice(3, "invoice.payment_failed", T0 + 10 * DAY + 60, "in_b");
    let d = decide(&policy(), Some(&state), &other, now);
    assert_eq!(d.outcome, Outcome::Applied);
    assert_eq!(d.subscription.unwrap().grace.unwrap().started_at, at(T0 + 10 * DAY + 60));
}

#[test]
fn a_snapshot_back_to_active_resolves_every_failure() {
    let now = at(T0 + 12 * DAY);
    let state = fold(
        &[
            &created(1, T0, "active"),
            &invoice(1, "invoice.payment_failed", T0 + DAY, "in_a"),
            &invoice(2, "invoice.payment_failed", T0 + 2 * DAY, "in_b"),
            &updated(2, T0 + 2 * DAY + 1, "past_due"),
            &invoice(3, "invoice.paid", T0 + 3 * DAY, "in_a"),
        ],
        now,
    )
    .unwrap();
    assert_eq!(state.grace.unwrap().started_at, at(T0 + 2 * DAY), "B unpaid, past_due snapshot after A's failure");
    let back = fold(
        &[
            &created(1, T0, "active"),
            &invoice(1, "invoice.payment_failed", T0 + DAY, "in_a"),
            &invoice(2, "invoice.payment_failed", T0 + 2 * DAY, "in_b"),
            &updated(2, T0 + 2 * DAY + 1, "past_due"),
            &invoice(3, "invoice.paid", T0 + 3 * DAY, "in_a"),
            &updated(3, T0 + 3 * DAY + 5, "active"),
        ],
        now,
    )
    .unwrap();
    assert!(back.grace.is_none() && back.failures.is_empty(), "{back:?}");
    assert_eq!(back.desired(now), DesiredInstance::Running { tier: Tier::Starter, limits: Tier::Starter.limits() });
}

#[test]
fn several_items_take_the_highest_tier_whatever_their_order() {
    for prices in [[STARTER, PRO], [PRO, STARTER]] {
        let items: Vec<String> = prices
            .iter()
            .enumerate()
            .map(|(i, p)| format!(r#"{{"id":"si_{i}","object":"subscription_item","price":{{"id":"{p}","object":"price"}},"quantity":1}}"#))
            .collect();
        let json = format!(
            r#"{{"id":"evt_multi","object":"event","type":"customer.subscription.created","created":{T0},"data":{{"object":{{"id":"{SUB}","object":"subscription","customer":"{CUS}","status":"active","items":{{"object":"list","data":[{}]}}}}}}}}"#,
            items.join(",")
        );
        let d = decide(&policy(), None, &ev(&json), at(T0));
        let state = d.subscription.expect("applied");
        assert_eq!(state.tier(), Some(Tier::Professional), "{prices:?}");
        assert_eq!(state.snapshot.unwrap().price_id, PRO, "{prices:?}");
    }
}

#[test]
fn the_subscription_metadata_email_is_read_with_its_time() {
    let json = subscription_json("evt_meta", "customer.subscription.created", T0, SUB, "active", STARTER, true)
        .replace(r#""metadata":{}"#, r#""metadata":{"email":"seed@example.com","app_user_id":"u1"}"#);
    assert!(json.contains("seed@example.com"), "fixture carries the e-mail");
    let d = decide(&policy(), None, &ev(&json), at(T0 + 1));
    let patch = d.account.expect("the account learns the address");
    assert_eq!((patch.stripe_customer_id.as_str(), patch.email.as_deref()), (CUS, Some("seed@example.com")));
    assert_eq!(patch.observed_at, at(T0), "the fact's time, not the processing time");
    // Invoices carry their time too.
    let d = decide(&policy(), None, &invoice(1, "invoice.payment_failed", T0 + 5, "in_a"), at(T0 + 9));
    assert_eq!(d.account.unwrap().observed_at, at(T0 + 5));
}
