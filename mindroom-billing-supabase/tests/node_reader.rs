//! The reader of the Node service's tables (`NodeDatabase`, for `cutover compare`) on real
//! PostgreSQL: every subscription with a Stripe id, its customer, all its instance rows, CPU in
//! thousandths, nulls as `None`; read-only; a database without the tables is an error.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use mindroom_billing_core::StoreError;
use mindroom_billing_supabase::NodeDatabase;
use mindroom_billing_supabase::testing::TestDb;

const NODE_SCHEMA: &str = include_str!("../../examples/tests/support/node_schema.sql");

#[tokio::test]
async fn reads_every_subscription_with_its_customer_and_instances() {
    let db = TestDb::create().await.unwrap();
    let pool = db.pool();
    sqlx::raw_sql(NODE_SCHEMA).execute(pool).await.unwrap();
    sqlx::raw_sql(
        "insert into accounts (id, stripe_customer_id) values ('00000000-0000-0000-0000-00000000000a', 'cus_a');
         insert into subscriptions (id, account_id, stripe_subscription_id, tier, status, max_agents, max_messages_per_day)
         values ('00000000-0000-0000-0000-0000000000b1', '00000000-0000-0000-0000-00000000000a', 'sub_b', 'pro', 'active', -1, 10000),
                ('00000000-0000-0000-0000-0000000000a1', null, 'sub_a', null, null, null, null),
                ('00000000-0000-0000-0000-0000000000c1', '00000000-0000-0000-0000-00000000000a', null, 'starter', 'active', 3, 1000);
         insert into instances (id, subscription_id, dokku_app_name, status, memory_limit_mb, cpu_limit, created_at)
         values ('00000000-0000-0000-0000-000000000002', '00000000-0000-0000-0000-0000000000b1', 'app-new', 'running', 2048, 0.25, '2026-01-02'),
                ('00000000-0000-0000-0000-000000000001', '00000000-0000-0000-0000-0000000000b1', 'app-old', 'deprovisioned', null, null, '2026-01-01'),
                ('00000000-0000-0000-0000-000000000003', '00000000-0000-0000-0000-0000000000c1', 'app-orphan', 'running', 512, 0.5, null);",
    )
    .execute(pool)
    .await
    .unwrap();
    let node = NodeDatabase::connect(db.url()).await.unwrap();
    let subs = node.subscriptions().await.unwrap();
    node.close().await;
    let ids: Vec<&str> = subs.iter().map(|s| s.subscription_id.as_str()).collect();
    assert_eq!(ids, ["sub_a", "sub_b"], "by id; a row without a Stripe id is not a subscription");
    let (a, b) = (&subs[0], &subs[1]);
    assert_eq!((a.customer_id.as_deref(), a.tier.as_deref(), a.max_agents), (None, None, None));
    assert!(a.instances.is_empty());
    assert_eq!(b.customer_id.as_deref(), Some("cus_a"));
    assert_eq!((b.tier.as_deref(), b.status.as_deref()), (Some("pro"), Some("active")));
    assert_eq!((b.max_agents, b.max_messages_per_day), (Some(-1), Some(10_000)));
    let apps: Vec<(&str, Option<i64>, Option<i64>)> =
        b.instances.iter().map(|i| (i.app_name.as_deref().unwrap(), i.memory_mb, i.cpu_millis)).collect();
    assert_eq!(apps, [("app-old", None, None), ("app-new", Some(2048), Some(250))]);
    assert_eq!(b.adopted().and_then(|i| i.app_name.as_deref()), Some("app-new"));
}

#[tokio::test]
async fn a_database_without_the_node_tables_is_an_error() {
    let db = TestDb::create().await.unwrap();
    let node = NodeDatabase::connect(db.url()).await.unwrap();
    let error = node.subscriptions().await.unwrap_err();
    assert!(matches!(error, StoreError::Other(_)), "{error:?}");
    assert!(format!("{:?}", mindroom_billing_core::service::error_chain(&error)).contains("subscriptions"));
    assert!(matches!(
        NodeDatabase::connect("postgres://postgres@127.0.0.1:1/none").await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(NodeDatabase::connect("not a url").await, Err(StoreError::Other(_))));
}
