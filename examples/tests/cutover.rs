//! Cut-over from the original Node service (issue 10, defect 4): the database already holds the
//! `accounts` / `subscriptions` / `instances` rows the Node service wrote (DESIGN §4), and its app
//! runs under the Node service's name. The real binary, migrated onto that database, must adopt the
//! app: no second `POST /provision`, and a cancel removes the adopted app.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::time::Duration;

use mindroom_billing_core::Tier;
use mindroom_billing_core::service::app_name_for;
use mindroom_billing_supabase::testing::TestDb;
use sqlx::Row;
use support::{Cluster, ClusterOptions, Life, NODE_SCHEMA, StubProvisioner, life_events, now_secs, tier_wire};

const STARTER: &str = "price_cutover_starter";
const PRO: &str = "price_cutover_pro";
const NODE_APP: &str = "mindroom-cus123";

/// Writes the Node service's rows for `life`; returns the `instances` row id.
async fn node_rows(db: &TestDb, life: &Life) -> uuid::Uuid {
    let pool = db.pool();
    sqlx::raw_sql(NODE_SCHEMA).execute(pool).await.unwrap();
    let account: uuid::Uuid =
        sqlx::query_scalar("insert into accounts (stripe_customer_id, email) values ($1, $2) returning id")
            .bind(&life.customer)
            .bind("owner@example.com")
            .fetch_one(pool)
            .await
            .unwrap();
    let subscription: uuid::Uuid = sqlx::query_scalar(
        "insert into subscriptions (account_id, stripe_subscription_id, stripe_price_id, tier, status, max_agents,
                                    max_messages_per_day, current_period_end)
         values ($1, $2, $3, 'starter', 'active', 3, 1000, now() + interval '20 days') returning id",
    )
    .bind(account)
    .bind(&life.sub)
    .bind(STARTER)
    .fetch_one(pool)
    .await
    .unwrap();
    sqlx::query_scalar(
        "insert into instances (subscription_id, dokku_app_name, subdomain, status, frontend_url, backend_url,
                                memory_limit_mb, cpu_limit)
         values ($1, $2, 'cus123', 'running', 'https://cus123.mindroom.chat', 'https://api.cus123.mindroom.chat',
                 512, 0.5) returning id",
    )
    .bind(subscription)
    .bind(NODE_APP)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// `(id, dokku_app_name, status)` of every `instances` row of the subscription.
async fn instance_rows(db: &TestDb, sub: &str) -> Vec<(uuid::Uuid, Option<String>, Option<String>)> {
    sqlx::query(
        "select i.id, i.dokku_app_name, i.status from public.instances i
         join public.subscriptions s on s.id = i.subscription_id where s.stripe_subscription_id = $1",
    )
    .bind(sub)
    .fetch_all(db.pool())
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_over_adopts_the_node_services_instance() {
    let stub = StubProvisioner::start().await;
    stub.add_app(NODE_APP);
    let life = Life {
        sub: "sub_cutover123".into(),
        customer: "cus123".into(),
        start: now_secs() - 60,
        first_price: STARTER.into(),
        upgrade_to: Some(PRO.into()),
        payment_failed: false,
        paid_after_failure: false,
        cancelled: true,
    };
    let db = TestDb::create().await.expect("fresh database");
    let node_instance = node_rows(&db, &life).await;
    let cluster =
        Cluster::start_on(db, ClusterOptions { replicas: 1, ..ClusterOptions::new(&stub, &[STARTER, PRO]) }).await;
    let events = life_events(&life);
    let event = |suffix: &str| events.iter().find(|e| e.id.ends_with(suffix)).unwrap().clone();

    // The first event billing sees of this subscription: an upgrade to professional.
    assert_eq!(cluster.send_once(&[event("_updated")]).await, [200]);
    cluster.wait_for_quiet(Duration::from_secs(30)).await;
    let apps = stub.apps();
    assert!(!apps.contains_key(&app_name_for(&life.sub)), "a second app was provisioned: {apps:?}");
    let adopted = &apps[NODE_APP];
    assert!(adopted.provision_keys.is_empty() && adopted.alive, "{adopted:?}");
    assert_eq!(adopted.limits, Some(tier_wire(Tier::Professional)), "the adopted app is resized");
    assert_eq!(
        instance_rows(cluster.db(), &life.sub).await,
        [(node_instance, Some(NODE_APP.to_owned()), Some("running".to_owned()))],
        "the Node service's row is the instance record"
    );

    // The cancel removes the adopted app.
    assert_eq!(cluster.send_once(&[event("_deleted")]).await, [200]);
    cluster.wait_for_quiet(Duration::from_secs(30)).await;
    let apps = stub.apps();
    assert_eq!(apps.len(), 1, "{apps:?}");
    assert!(!apps[NODE_APP].alive && apps[NODE_APP].deprovisions == 1, "{apps:?}");
    assert_eq!(
        instance_rows(cluster.db(), &life.sub).await,
        [(node_instance, Some(NODE_APP.to_owned()), Some("deprovisioned".to_owned()))]
    );
}
