//! The fixture timeline through `Billing` + `PgStore` leaves the public `subscriptions`,
//! `instances` and `accounts` rows other MindRoom services read as DESIGN §3 prescribes.
#![cfg(feature = "test-util")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use common::{CUS, DAHLIA, DAY, SUB, T0, TestClock, at, fixture, signed};
use mindroom_billing_core::service::app_name_for;
use mindroom_billing_core::{Billing, Clock, Disposition, Store, Tier};
use sqlx::{PgPool, Row};

#[derive(Debug, PartialEq)]
struct SubscriptionRow {
    tier: Option<String>,
    status: Option<String>,
    price: Option<String>,
    max_agents: Option<i32>,
    max_messages_per_day: Option<i32>,
    grace_period_ends_at: Option<DateTime<Utc>>,
    cancelled_at: Option<DateTime<Utc>>,
    current_period_end: Option<DateTime<Utc>>,
    account_matches: bool,
}

async fn subscription_row(pool: &PgPool) -> SubscriptionRow {
    let r = sqlx::query(
        "select s.tier, s.status, s.stripe_price_id, s.max_agents, s.max_messages_per_day, s.grace_period_ends_at,
                s.cancelled_at, s.current_period_end, s.account_id = a.id as account_matches
         from public.subscriptions s left join public.accounts a on a.stripe_customer_id = $2
         where s.stripe_subscription_id = $1",
    )
    .bind(SUB)
    .bind(CUS)
    .fetch_one(pool)
    .await
    .unwrap();
    SubscriptionRow {
        tier: r.get(0),
        status: r.get(1),
        price: r.get(2),
        max_agents: r.get(3),
        max_messages_per_day: r.get(4),
        grace_period_ends_at: r.get(5),
        cancelled_at: r.get(6),
        current_period_end: r.get(7),
        account_matches: r.get::<Option<bool>, _>(8).unwrap_or(false),
    }
}

#[derive(Debug, PartialEq)]
struct InstanceRow {
    status: String,
    app: Option<String>,
    memory_limit_mb: Option<i32>,
    cpu_limit: Option<String>,
    deprovisioned: bool,
    linked: bool,
}

async fn instance_row(pool: &PgPool) -> Option<InstanceRow> {
    let r = sqlx::query(
        "select i.status, i.dokku_app_name, i.memory_limit_mb, i.cpu_limit::float8::text, i.deprovisioned_at is not null,
                i.subscription_id = s.id
         from public.instances i join public.subscriptions s on s.id = i.subscription_id
         where s.stripe_subscription_id = $1",
    )
    .bind(SUB)
    .fetch_optional(pool)
    .await
    .unwrap()?;
    Some(InstanceRow {
        status: r.get(0),
        app: r.get(1),
        memory_limit_mb: r.get(2),
        cpu_limit: r.get(3),
        deprovisioned: r.get(4),
        linked: r.get(5),
    })
}

async fn deliver(billing: &Billing, clock: &TestClock, version: &str, name: &str) -> Disposition {
    let body = fixture(version, name);
    let header = signed(&body, clock.now());
    billing.receive(Some(&header), &body).await.unwrap_or_else(|e| panic!("{name}: {e}")).disposition
}

async fn run_jobs(billing: &Billing) {
    for _ in 0..20 {
        if billing.run_due_jobs(50).await.unwrap() == 0 {
            return;
        }
    }
}

async fn timeline(version: &str, pro: Tier) {
    let fresh = common::fresh().await;
    let pool = fresh.db.pool();
    let clock = Arc::new(TestClock::new(at(T0 + 10)));
    let billing = common::billing(fresh.store.clone() as Arc<dyn Store>, Arc::clone(&clock), pro);

    // T0: checkout, subscription created (starter), first invoice paid.
    for name in ["checkout.session.completed", "customer.subscription.created", "invoice.paid"] {
        let d = deliver(&billing, &clock, version, name).await;
        assert!(matches!(d, Disposition::Applied | Disposition::Ignored), "{name}: {d:?}");
    }
    run_jobs(&billing).await;
    let row = subscription_row(pool).await;
    assert_eq!(
        (row.tier.as_deref(), row.status.as_deref(), row.max_agents, row.max_messages_per_day),
        (Some("starter"), Some("active"), Some(3), Some(1000)),
        "{row:?}"
    );
    assert_eq!(row.price.as_deref(), Some(common::PRICE_STARTER));
    assert!(row.account_matches && row.current_period_end.is_some() && row.grace_period_ends_at.is_none());
    let instance = instance_row(pool).await.expect("instance row");
    assert_eq!(
        instance,
        InstanceRow {
            status: "running".into(),
            app: Some(app_name_for(SUB)),
            memory_limit_mb: Some(512),
            cpu_limit: Some("0.5".into()),
            deprovisioned: false,
            linked: true,
        }
    );

    // T0+5d: the customer's e-mail changes.
    clock.set(at(T0 + 5 * DAY + 10));
    deliver(&billing, &clock, version, "customer.updated").await;
    let email: Option<String> = sqlx::query_scalar("select email from public.accounts where stripe_customer_id = $1")
        .bind(CUS)
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(email.is_some_and(|e| e.contains('@')));

    // T0+10d: upgrade to the second price.
    clock.set(at(T0 + 10 * DAY + 10));
    assert_eq!(deliver(&billing, &clock, version, "customer.subscription.updated").await, Disposition::Applied);
    run_jobs(&billing).await;
    let row = subscription_row(pool).await;
    let instance = instance_row(pool).await.unwrap();
    match pro {
        Tier::Enterprise => {
            assert_eq!(
                (row.tier.as_deref(), row.max_agents, row.max_messages_per_day),
                (Some("enterprise"), Some(-1), Some(-1)),
                "unlimited is -1"
            );
            assert_eq!((instance.memory_limit_mb, instance.cpu_limit.as_deref()), (Some(8192), Some("4")));
        }
        _ => {
            assert_eq!(
                (row.tier.as_deref(), row.max_agents, row.max_messages_per_day),
                (Some("professional"), Some(10), Some(10_000))
            );
            assert_eq!((instance.memory_limit_mb, instance.cpu_limit.as_deref()), (Some(2048), Some("2")));
        }
    }
    assert_eq!(instance.status, "running");

    // T0+30d+1h: a renewal payment fails: grace until the failure's time + 7 days; still running.
    let failed_at = 1_787_595_600;
    clock.set(at(failed_at + 10));
    assert_eq!(deliver(&billing, &clock, version, "invoice.payment_failed").await, Disposition::Applied);
    run_jobs(&billing).await;
    let row = subscription_row(pool).await;
    assert_eq!(row.grace_period_ends_at, Some(at(failed_at) + Duration::days(7)));
    assert_eq!(instance_row(pool).await.unwrap().status, "running");

    // The grace period ends: the sweeper deprovisions.
    clock.set(at(failed_at) + Duration::days(7) + Duration::seconds(1));
    assert_eq!(billing.sweep_grace().await.unwrap(), 1);
    assert_eq!(billing.sweep_grace().await.unwrap(), 0, "handled once");
    run_jobs(&billing).await;
    let instance = instance_row(pool).await.unwrap();
    assert_eq!((instance.status.as_str(), instance.deprovisioned), ("deprovisioned", true));

    // T0+45d: Stripe cancels the subscription.
    clock.set(at(1_788_888_000 + 10));
    assert_eq!(deliver(&billing, &clock, version, "customer.subscription.deleted").await, Disposition::Applied);
    run_jobs(&billing).await;
    let row = subscription_row(pool).await;
    assert_eq!(row.status.as_deref(), Some("canceled"));
    assert!(row.cancelled_at.is_some());
    assert_eq!(instance_row(pool).await.unwrap().status, "deprovisioned");
    let dead: i64 = sqlx::query_scalar("select count(*) from public.billing_jobs where state = 'dead'")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(dead, 0);
    fresh.store.close().await;
    fresh.db.drop_db().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_timeline_newest_shape_professional() {
    timeline(common::DAHLIA, Tier::Professional).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_timeline_old_shape_enterprise_is_unlimited() {
    timeline("2023-10-16", Tier::Enterprise).await;
}

/// `(max_agents, max_messages_per_day, entitlement_status)` of the public row.
async fn entitlement_columns(pool: &PgPool) -> (Option<i32>, Option<i32>, Option<String>) {
    let r = sqlx::query(
        "select max_agents, max_messages_per_day, entitlement_status from public.subscriptions
         where stripe_subscription_id = $1",
    )
    .bind(SUB)
    .fetch_one(pool)
    .await
    .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// The entitlements answer in the public row's terms.
async fn entitlements_answer(billing: &Billing) -> (Option<i32>, Option<i32>, Option<String>) {
    let e = billing.entitlements(mindroom_billing_core::account_id_for_customer(CUS)).await.unwrap();
    let wire = |l: mindroom_billing_core::Limit| i32::try_from(l.to_wire()).ok();
    (wire(e.limits.agents), wire(e.limits.messages_per_day), e.entitlement_status.map(|s| s.as_str().to_owned()))
}

/// Other services read `subscriptions` directly: its `max_*` columns and `entitlement_status` say
/// what the entitlements answer says, in grace and after the sweeper ended the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_row_holds_the_effective_entitlement_after_grace_expiry() {
    let fresh = common::fresh().await;
    let pool = fresh.db.pool();
    let clock = Arc::new(TestClock::new(at(T0 + 10)));
    let billing = common::billing(fresh.store.clone() as Arc<dyn Store>, Arc::clone(&clock), Tier::Professional);
    deliver(&billing, &clock, DAHLIA, "customer.subscription.created").await;
    let active = (Some(3), Some(1000), Some("active".to_owned()));
    assert_eq!((entitlement_columns(pool).await, entitlements_answer(&billing).await), (active.clone(), active));

    let failed_at = 1_787_595_600;
    clock.set(at(failed_at + 10));
    assert_eq!(deliver(&billing, &clock, DAHLIA, "invoice.payment_failed").await, Disposition::Applied);
    let grace = (Some(3), Some(1000), Some("grace".to_owned()));
    assert_eq!((entitlement_columns(pool).await, entitlements_answer(&billing).await), (grace.clone(), grace));

    clock.set(at(failed_at) + Duration::days(7) + Duration::seconds(1));
    assert_eq!(billing.sweep_grace().await.unwrap(), 1);
    let suspended = (Some(1), Some(100), Some("suspended".to_owned()));
    assert_eq!(
        (entitlement_columns(pool).await, entitlements_answer(&billing).await),
        (suspended.clone(), suspended),
        "the sweeper's commit leaves free limits in the public row"
    );
    let tier: Option<String> =
        sqlx::query_scalar("select tier from public.subscriptions where stripe_subscription_id = $1")
            .bind(SUB)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(tier.as_deref(), Some("starter"), "tier stays what was subscribed");
    fresh.store.close().await;
    fresh.db.drop_db().await.unwrap();
}
