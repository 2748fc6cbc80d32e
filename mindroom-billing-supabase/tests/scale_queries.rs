//! The two queries rewritten for scale (migration 20261205000000) keep their meaning: an account's
//! subscriptions are found by the aggregate's account id and through an account row of another id
//! holding the same Stripe customer (accounts the Node service created); the grace sweep finds every
//! expired, unhandled, non-terminal grace period and returns the earliest deadlines first when more
//! than the limit are due. Real PostgreSQL.
#![cfg(feature = "test-util")]
#![allow(clippy::unwrap_used)]

mod common;

use chrono::Duration;
use common::{T0, at};
use mindroom_billing_core::model::{Commit, Grace, Outcome, SubscriptionState};
use mindroom_billing_core::{Store, account_id_for_customer};

fn commit(state: SubscriptionState) -> Commit {
    Commit {
        now: at(T0),
        event_id: None,
        outcome: Outcome::Applied,
        subscription: Some(state),
        account: None,
        jobs: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_found_by_account_id_and_through_a_legacy_account_row() {
    let fresh = common::fresh().await;
    let legacy = uuid::Uuid::new_v4();
    sqlx::query("insert into public.accounts (id, stripe_customer_id) values ($1, 'cus_legacy')")
        .bind(legacy)
        .execute(fresh.db.pool())
        .await
        .unwrap();
    for (sub, cus) in [("sub_a", "cus_legacy"), ("sub_b", "cus_legacy"), ("sub_other", "cus_other")] {
        fresh.store.commit(&commit(SubscriptionState::new(sub, cus))).await.unwrap();
    }
    let ids = |states: Vec<SubscriptionState>| states.into_iter().map(|s| s.subscription_id).collect::<Vec<_>>();
    assert_eq!(ids(fresh.store.subscriptions_for_account(legacy).await.unwrap()), ["sub_a", "sub_b"]);
    let by_id = fresh.store.subscriptions_for_account(account_id_for_customer("cus_legacy")).await.unwrap();
    assert_eq!(ids(by_id), ["sub_a", "sub_b"], "and by the aggregate's own account id");
    assert!(fresh.store.subscriptions_for_account(uuid::Uuid::new_v4()).await.unwrap().is_empty());
    fresh.store.close().await;
    fresh.db.drop_db().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_takes_the_earliest_deadlines_first_and_only_unhandled_ones() {
    let fresh = common::fresh().await;
    let in_grace = |sub: &str, ends_in_days: i64, handled: bool| {
        let mut s = SubscriptionState::new(sub, "cus_g");
        let ends_at = at(T0) + Duration::days(ends_in_days);
        s.grace = Some(Grace { started_at: ends_at - Duration::days(7), ends_at });
        s.grace_expiry_handled = handled;
        s
    };
    for (sub, days, handled) in
        [("sub_z", -3, false), ("sub_a", -1, false), ("sub_m", -2, false), ("sub_h", -5, true), ("sub_f", 2, false)]
    {
        fresh.store.commit(&commit(in_grace(sub, days, handled))).await.unwrap();
    }
    let now = at(T0);
    assert_eq!(fresh.store.expired_grace(now, 10).await.unwrap(), ["sub_a", "sub_m", "sub_z"]);
    assert_eq!(fresh.store.expired_grace(now, 2).await.unwrap(), ["sub_m", "sub_z"], "the two oldest deadlines, by id");
    assert_eq!(
        fresh.store.expired_grace(now + Duration::days(3), 10).await.unwrap(),
        ["sub_a", "sub_f", "sub_m", "sub_z"]
    );
    fresh.store.close().await;
    fresh.db.drop_db().await.unwrap();
}
