//! A `canceled` snapshot whose price nobody configured still removes the instance, and the tier it
//! records does not depend on delivery order.

mod common;

use common::{DAY, PRICE_PRO, PRICE_STARTER, T0, at, ev, policy, subscription_json};
use mindroom_billing_core::{DesiredInstance, Event, Outcome, SubscriptionState, Tier, decide};

fn fold(events: &[&Event]) -> SubscriptionState {
    let policy = policy();
    let mut state: Option<SubscriptionState> = None;
    for event in events {
        let d = decide(&policy, state.as_ref(), event, at(T0 + 100 * DAY));
        assert!(!matches!(d.outcome, Outcome::Failed(_)), "a terminal snapshot never fails: {:?}", d.outcome);
        if let Some(next) = d.subscription {
            state = Some(next);
        }
    }
    let mut state = state.expect("an aggregate");
    state.version = 0;
    state
}

#[test]
fn canceled_with_an_unknown_price_is_order_independent() {
    let created =
        ev(&subscription_json("evt_c", "customer.subscription.created", T0, "sub_u", "active", PRICE_STARTER, true));
    let updated =
        ev(&subscription_json("evt_u", "customer.subscription.updated", T0 + 10, "sub_u", "active", PRICE_PRO, true));
    let canceled = ev(&subscription_json(
        "evt_d",
        "customer.subscription.deleted",
        T0 + 20,
        "sub_u",
        "canceled",
        "price_legacy_x",
        true,
    ));
    let in_order = fold(&[&created, &updated, &canceled]);
    assert_eq!(in_order.desired(at(T0 + 100 * DAY)), DesiredInstance::Absent);
    assert_eq!(in_order.tier(), Some(Tier::Professional), "the last priced snapshot's tier");
    for order in [
        [&canceled, &created, &updated],
        [&canceled, &updated, &created],
        [&updated, &canceled, &created],
        [&created, &canceled, &updated],
    ] {
        assert_eq!(fold(&order), in_order, "order {:?}", order.map(|e| e.id.as_str()));
    }
    // Alone, it records free (no priced snapshot was ever seen) and removes nothing that exists.
    assert_eq!(fold(&[&canceled]).tier(), Some(Tier::Free));
}
