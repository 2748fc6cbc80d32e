//! Entitlements answered from a replica's cache stay correct across replicas: `billing_commit`
//! notifies the account it changed, every `PgStore` listens, and a lost listening connection drops
//! the cache. Two stores with their own pools on one database stand for two replicas.
#![cfg(feature = "test-util")]
#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod common;

use std::sync::Arc;
use std::time::{Duration as StdDuration, Instant};

use common::{CUS, DAHLIA, DAY, T0, TestClock, at, fixture, signed};
use mindroom_billing_core::service::Entitlements;
use mindroom_billing_core::{Billing, Clock, Store, Tier};
use uuid::Uuid;

async fn deliver(billing: &Billing, clock: &TestClock, name: &str) {
    let body = fixture(DAHLIA, name);
    billing.receive(Some(&signed(&body, clock.now())), &body).await.unwrap_or_else(|e| panic!("{name}: {e}"));
}

/// Reads until two answers in a row come from the cache (the same `as_of` although the clock
/// moved): the replica listens and has cached the account.
async fn until_cached(billing: &Billing, clock: &TestClock, account: Uuid) -> Entitlements {
    for _ in 0..200 {
        let first = billing.entitlements(account).await.unwrap();
        clock.advance(chrono::Duration::milliseconds(10));
        let second = billing.entitlements(account).await.unwrap();
        if second.as_of == first.as_of {
            return second;
        }
        tokio::time::sleep(StdDuration::from_millis(25)).await;
    }
    panic!("the replica never answered from its cache");
}

/// Reads until the answer has `tier`; returns how long it took.
async fn until_tier(billing: &Billing, account: Uuid, tier: Tier) -> StdDuration {
    let started = Instant::now();
    for _ in 0..400 {
        if billing.entitlements(account).await.unwrap().tier == tier {
            return started.elapsed();
        }
        tokio::time::sleep(StdDuration::from_millis(25)).await;
    }
    panic!("the replica kept answering a tier other than {tier:?}");
}

struct Replicas {
    fresh: common::Fresh,
    clock: Arc<TestClock>,
    a: Billing,
    b: Billing,
    account: Uuid,
}

/// Replica A applies a starter subscription; replica B has it cached.
async fn replicas_with_a_cached_starter() -> Replicas {
    let fresh = common::fresh().await;
    let clock = Arc::new(TestClock::new(at(T0 + 10)));
    let a = common::billing(fresh.store.clone() as Arc<dyn Store>, Arc::clone(&clock), Tier::Professional);
    let b = common::billing(common::replica(&fresh.db).await as Arc<dyn Store>, Arc::clone(&clock), Tier::Professional);
    for name in ["checkout.session.completed", "customer.subscription.created", "invoice.paid"] {
        deliver(&a, &clock, name).await;
    }
    let account = fresh.store.load_account(CUS).await.unwrap().expect("account").id;
    let cached = until_cached(&b, &clock, account).await;
    assert_eq!(cached.tier, Tier::Starter);
    Replicas { fresh, clock, a, b, account }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_committed_on_one_replica_reaches_the_others_cache() {
    let r = replicas_with_a_cached_starter().await;
    r.clock.set(at(T0 + 10 * DAY + 10));
    deliver(&r.a, &r.clock, "customer.subscription.updated").await;
    let took = until_tier(&r.b, r.account, Tier::Professional).await;
    eprintln!("replica B answered the upgrade committed on replica A after {took:?}");
    let answer = r.b.entitlements(r.account).await.unwrap();
    assert!(answer.as_of >= at(T0 + 10 * DAY + 10), "the answer says when it was read: {:?}", answer.as_of);
    r.fresh.db.drop_db().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_listening_connection_drops_the_cache() {
    let r = replicas_with_a_cached_starter().await;
    // Kill B's listening session (the only one: A never read entitlements), then change the
    // account on A at once: its notification has nowhere to go.
    let killed: i64 = sqlx::query_scalar(
        "select count(pg_catalog.pg_terminate_backend(pid)) from pg_catalog.pg_stat_activity
         where datname = current_database() and query ilike 'listen%'",
    )
    .fetch_one(r.fresh.db.pool())
    .await
    .unwrap();
    assert_eq!(killed, 1, "one listening session");
    r.clock.set(at(T0 + 10 * DAY + 10));
    deliver(&r.a, &r.clock, "customer.subscription.updated").await;
    until_tier(&r.b, r.account, Tier::Professional).await;
    // B listens again and caches again.
    assert_eq!(until_cached(&r.b, &r.clock, r.account).await.tier, Tier::Professional);
    r.fresh.db.drop_db().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_postgrest_cached_entitlements_live_for_the_time_to_live() {
    let fresh = common::fresh().await;
    let clock = Arc::new(TestClock::new(at(T0 + 10)));
    let a = common::billing(fresh.store.clone() as Arc<dyn Store>, Arc::clone(&clock), Tier::Professional);
    let (_gateway, rest) = common::via_gateway(&fresh.db, false).await;
    let ttl = StdDuration::from_millis(300);
    let config = mindroom_billing_core::CacheConfig { ttl, ..mindroom_billing_core::CacheConfig::default() };
    let b = common::billing_with_cache(rest as Arc<dyn Store>, Arc::clone(&clock), Tier::Professional, config);
    for name in ["checkout.session.completed", "customer.subscription.created", "invoice.paid"] {
        deliver(&a, &clock, name).await;
    }
    let account = fresh.store.load_account(CUS).await.unwrap().expect("account").id;
    assert_eq!(until_cached(&b, &clock, account).await.tier, Tier::Starter);
    clock.set(at(T0 + 10 * DAY + 10));
    deliver(&a, &clock, "customer.subscription.updated").await;
    let took = until_tier(&b, account, Tier::Professional).await;
    eprintln!("over PostgREST (time-to-live {ttl:?}) the upgrade was answered after {took:?}");
    fresh.db.drop_db().await.unwrap();
}

/// Accounts named by Stripe customer or platform reference resolve on PostgreSQL; a replica keeps a
/// resolved reference for its time-to-live (the fast path: no store call), and its own commits that
/// set a reference drop what it kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_named_by_customer_or_reference_resolve_and_stay_cached_for_the_time_to_live() {
    use mindroom_billing_core::service::{AccountLookupError, AccountName};
    let fresh = common::fresh().await;
    let clock = Arc::new(TestClock::new(at(T0 + 10)));
    let a = common::billing(fresh.store.clone() as Arc<dyn Store>, Arc::clone(&clock), Tier::Professional);
    let hour = mindroom_billing_core::CacheConfig { ttl: StdDuration::from_secs(3600), ..Default::default() };
    let b = common::billing_with_cache(
        common::replica(&fresh.db).await as Arc<dyn Store>,
        Arc::clone(&clock),
        Tier::Professional,
        hour,
    );
    for name in ["checkout.session.completed", "customer.subscription.created"] {
        deliver(&a, &clock, name).await;
    }
    let account = mindroom_billing_core::account_id_for_customer(CUS);
    for replica in [&a, &b] {
        assert_eq!(replica.resolve_account(AccountName::Customer(CUS)).await.unwrap(), account);
        assert_eq!(replica.resolve_account(AccountName::Reference("user_123")).await.unwrap(), account);
        for unknown in [AccountName::Customer("cus_nobody"), AccountName::Reference("user_nobody")] {
            let e = replica.resolve_account(unknown).await.unwrap_err();
            assert!(matches!(e, AccountLookupError::Unknown(_)), "{e}");
        }
    }
    assert_eq!(b.entitlements(account).await.unwrap().tier, Tier::Starter);

    // A second customer checks out with the same reference, on replica A.
    let mut second: serde_json::Value = serde_json::from_slice(&fixture(DAHLIA, "checkout.session.completed")).unwrap();
    second["id"] = "evt_checkout_second_customer".into();
    second["data"]["object"]["customer"] = "cus_second".into();
    let body = serde_json::to_vec(&second).unwrap();
    a.receive(Some(&signed(&body, clock.now())), &body).await.unwrap();
    let e = a.resolve_account(AccountName::Reference("user_123")).await.unwrap_err();
    assert!(matches!(e, AccountLookupError::Ambiguous(_)), "A's own commit dropped what it kept: {e}");
    assert_eq!(
        b.resolve_account(AccountName::Reference("user_123")).await.unwrap(),
        account,
        "B answers from its cache within the time-to-live"
    );
    fresh.db.drop_db().await.unwrap();
}
