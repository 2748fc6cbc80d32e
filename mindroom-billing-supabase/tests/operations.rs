//! Migrations (idempotent, fast, locked-down schema) and outages (database down → `Unavailable`,
//! nothing half-written; back up → Stripe's retry succeeds). Real PostgreSQL.
#![cfg(feature = "test-util")]
#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{DAHLIA, SUB, T0, TestClock, at, fixture, signed};
use mindroom_billing_core::service::error_chain;
use mindroom_billing_core::{Clock, Disposition, EventStatus, ReceiveError, Store, StoreError, Tier};
use mindroom_billing_supabase::testing::TestDb;
use mindroom_billing_supabase::{PgStore, PgStoreOptions, PostgrestOptions, PostgrestStore};
use secrecy::SecretString;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_apply_to_an_empty_database_quickly_and_twice() {
    let db = TestDb::create().await.unwrap();
    let store = PgStore::connect(db.url(), PgStoreOptions::default()).await.unwrap();
    let started = Instant::now();
    let first = store.migrate().await.unwrap();
    let elapsed = started.elapsed();
    eprintln!("migrations on an empty database: {elapsed:?} ({:?})", first.applied);
    assert_eq!(first.applied.len(), mindroom_billing_supabase::migrations::MIGRATIONS.len());
    let second = store.migrate().await.unwrap();
    assert!(second.applied.is_empty());
    // The files themselves are idempotent too (as when the Supabase CLI applied them first).
    for m in mindroom_billing_supabase::migrations::MIGRATIONS {
        sqlx::raw_sql(m.sql).execute(db.pool()).await.unwrap();
    }
    // Concurrent runners (several replicas starting at once) serialize on the advisory lock.
    let other = PgStore::connect(db.url(), PgStoreOptions::default()).await.unwrap();
    let (a, b) = tokio::join!(store.migrate(), other.migrate());
    a.unwrap();
    b.unwrap();
    store.ping().await.unwrap();
    store.close().await;
    other.close().await;
    db.drop_db().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_is_locked_down() {
    let fresh = common::fresh().await;
    let pool = fresh.db.pool();
    let no_rls: Vec<String> = sqlx::query_scalar(
        "select c.relname::text from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = 'public' and c.relkind = 'r' and not c.relrowsecurity",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(no_rls.is_empty(), "tables without RLS: {no_rls:?}");
    let policies: i64 = sqlx::query_scalar("select count(*) from pg_policies where schemaname = 'public'")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(policies, 0);
    let rows: Vec<(String, bool, bool, bool, bool)> = sqlx::query_as(
        "select p.proname::text, p.prosecdef,
                has_function_privilege('service_role', p.oid, 'execute'),
                has_function_privilege('anon', p.oid, 'execute'),
                has_function_privilege('authenticated', p.oid, 'execute')
         from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         where n.nspname = 'public' and p.proname like 'billing\\_%'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(rows.len() >= 20, "{rows:?}");
    for (name, definer, service, anon, authenticated) in &rows {
        assert!(!definer, "{name} must be security invoker");
        assert!(*service && !*anon && !*authenticated, "{name}: execute only for service_role");
    }
    let overloaded: Vec<String> = sqlx::query_scalar(
        "select p.proname::text from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         where n.nspname = 'public' and p.proname like 'billing\\_%' group by p.proname having count(*) > 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(overloaded.is_empty(), "{overloaded:?}");
    fresh.db.drop_db().await.unwrap();
}

/// A port nothing listens on.
async fn closed_port() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_unavailable() {
    let addr = closed_port().await;
    let options = PgStoreOptions::default().with_acquire_timeout(Duration::from_secs(2));
    let url = format!("postgres://postgres@{addr}/postgres");
    let connect = PgStore::connect(&url, options.clone()).await;
    assert!(matches!(connect, Err(StoreError::Unavailable(_))), "{connect:?}");
    let lazy = PgStore::connect_lazy(&url, options).unwrap();
    let err = lazy.ping().await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)) && err.is_retryable(), "{err:?}");

    let rest = PostgrestStore::new(
        &format!("http://{addr}"),
        SecretString::from("sb_secret_x"),
        PostgrestOptions::default().with_timeout(Duration::from_secs(2)),
    )
    .unwrap();
    let err = rest.ping().await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_reports_the_servers_own_error_not_a_pool_time_out() {
    let addr = closed_port().await;
    // A long acquire timeout: the answer must not wait for it, nor hide the cause behind it.
    let options = PgStoreOptions::default().with_acquire_timeout(Duration::from_secs(30));
    let refused = PgStore::connect(&format!("postgres://postgres@{addr}/postgres"), options.clone()).await.unwrap_err();
    assert!(error_chain(&refused).to_lowercase().contains("refused"), "{}", error_chain(&refused));

    let db = TestDb::create().await.unwrap();
    let missing = mindroom_billing_supabase::testing::url_with_database(db.url(), "mrb_no_such_database");
    let missing = PgStore::connect(&missing, options).await.unwrap_err();
    assert!(error_chain(&missing).contains("does not exist"), "{}", error_chain(&missing));
    db.drop_db().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_migrations_are_all_on_a_fresh_database_and_none_after_migrate() {
    let db = TestDb::create().await.unwrap();
    let store = PgStore::connect(db.url(), PgStoreOptions::default()).await.unwrap();
    let all: Vec<&str> = mindroom_billing_supabase::migrations::MIGRATIONS.iter().map(|m| m.version).collect();
    let pending: Vec<&str> = store.pending_migrations().await.unwrap().iter().map(|m| m.version).collect();
    assert_eq!(pending, all);
    store.migrate().await.unwrap();
    assert!(store.pending_migrations().await.unwrap().is_empty());
    // Recorded by the Supabase CLI instead (`supabase db push`): counted as applied too.
    sqlx::raw_sql(
        "drop table public.billing_schema_migrations;
         create schema supabase_migrations;
         create table supabase_migrations.schema_migrations (version text primary key);",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let last = all[all.len() - 1];
    for version in &all[..all.len() - 1] {
        sqlx::query("insert into supabase_migrations.schema_migrations values ($1)")
            .bind(version)
            .execute(db.pool())
            .await
            .unwrap();
    }
    let pending: Vec<&str> = store.pending_migrations().await.unwrap().iter().map(|m| m.version).collect();
    assert_eq!(pending, [last]);
    store.close().await;
    db.drop_db().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgrest_errors_are_classified() {
    let fresh = common::fresh().await;
    let (gw, _) = common::via_gateway(&fresh.db, false).await;
    // A wrong key: 401 → a permanent error (not retryable), no secret in the message.
    let wrong = PostgrestStore::new(&gw.base_url(), SecretString::from("sb_secret_wrong"), PostgrestOptions::default())
        .unwrap();
    let err = wrong.ping().await.unwrap_err();
    assert!(matches!(err, StoreError::Other(_)), "{err:?}");
    assert!(!format!("{err:?}").contains("sb_secret_wrong"));
    // The database behind the gateway goes away: 503 → Unavailable.
    let (_, store) = common::via_gateway(&fresh.db, false).await;
    drop(gw);
    fresh.store.close().await;
    fresh.db.drop_db().await.unwrap();
    let err = store.ping().await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_answers_unavailable_writes_nothing_and_the_retry_succeeds() {
    let fresh = common::fresh().await;
    let (target, _) = common::through(fresh.db.url(), "127.0.0.1:1".parse().unwrap());
    let proxy = common::Proxy::start(target).await;
    let (_, proxied_url) = common::through(fresh.db.url(), proxy.addr);
    let options = PgStoreOptions::default().with_acquire_timeout(Duration::from_secs(2));
    let store = Arc::new(PgStore::connect(&proxied_url, options).await.unwrap());
    let clock = Arc::new(TestClock::new(at(T0 + 10)));
    let billing = common::billing(store.clone() as Arc<dyn Store>, Arc::clone(&clock), Tier::Professional);
    let body = fixture(DAHLIA, "customer.subscription.created");
    let event_id = mindroom_billing_core::parse(&body).unwrap().id;

    // Down before anything: the webhook fails with Unavailable (503) and nothing is stored.
    proxy.down();
    let err = billing.receive(Some(&signed(&body, clock.now())), &body).await.unwrap_err();
    assert!(matches!(err, ReceiveError::Store(StoreError::Unavailable(_))), "{err:?}");
    assert!(fresh.store.load_event(&event_id).await.unwrap().is_none());

    // Down between recording and committing: the event stays `received`, no aggregate, no jobs.
    proxy.up();
    let event = mindroom_billing_core::parse(&body).unwrap();
    store
        .record_event(&mindroom_billing_core::NewEvent {
            id: &event.id,
            event_type: event.event_type.as_str(),
            created: event.created,
            api_version: event.api_version.as_deref(),
            livemode: event.livemode,
            payload: std::str::from_utf8(&body).unwrap(),
            received_at: clock.now(),
            source: mindroom_billing_core::EventSource::Webhook,
            customer_id: None,
        })
        .await
        .unwrap();
    proxy.down();
    let err = billing.apply(&event).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert_eq!(fresh.store.load_event(&event_id).await.unwrap().unwrap().status, EventStatus::Received);
    assert!(fresh.store.load_subscription(SUB).await.unwrap().is_none());
    assert_eq!(fresh.store.job_counts().await.unwrap().pending, 0);

    // Back up: Stripe's retry succeeds (the pool reconnects).
    proxy.up();
    clock.advance(chrono::Duration::seconds(60));
    let receipt = billing.receive(Some(&signed(&body, clock.now())), &body).await.unwrap();
    assert_eq!(receipt.disposition, Disposition::Applied);
    assert_eq!(fresh.store.load_subscription(SUB).await.unwrap().unwrap().version, 1);
    assert_eq!(fresh.store.job_counts().await.unwrap().pending, 1);
    store.close().await;
    fresh.db.drop_db().await.unwrap();
}

/// On a database the Node service wrote, `load_instance` (and the console's `instance_by_app`) answers
/// its `instances` row as an adopted record and writes nothing; the first intent a job records adopts
/// that same row (same id), through the direct store and through PostgREST alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adoptable_instance_is_read_without_a_write_and_adopted_by_the_first_intent() {
    let fresh = common::fresh().await;
    adopted_by_the_first_intent(&fresh.db, Arc::clone(&fresh.store)).await;
    fresh.store.close().await;
    fresh.db.drop_db().await.unwrap();

    let fresh = common::fresh().await;
    let (gateway, store) = common::via_gateway(&fresh.db, false).await;
    adopted_by_the_first_intent(&fresh.db, store).await;
    drop(gateway);
    fresh.store.close().await;
    fresh.db.drop_db().await.unwrap();
}

async fn adopted_by_the_first_intent<S: Store + mindroom_billing_core::OperatorStore>(db: &TestDb, store: Arc<S>) {
    use mindroom_billing_core::{Claim, InstanceRecord, InstanceStatus, JobKind, NewJob};
    let pool = db.pool();
    let node_id: uuid::Uuid = sqlx::query_scalar(
        "with a as (insert into public.accounts (id, stripe_customer_id) values (gen_random_uuid(), 'cus_node')
                    returning id),
              s as (insert into public.subscriptions (account_id, stripe_subscription_id, status)
                    select id, $1, 'active' from a returning id)
         insert into public.instances (subscription_id, dokku_app_name, status, memory_limit_mb)
         select id, 'mindroom-node', 'running', 512 from s returning id",
    )
    .bind(SUB)
    .fetch_one(pool)
    .await
    .unwrap();
    let adopted = store.load_instance(SUB).await.unwrap().expect("the Node row is answered");
    assert!(adopted.adopted, "{adopted:?}");
    assert_eq!(
        (adopted.app_name.as_str(), adopted.status, adopted.limits),
        ("mindroom-node", InstanceStatus::Running, None)
    );
    assert_eq!(store.instance_by_app("mindroom-node").await.unwrap().as_ref(), Some(&adopted), "found by its name");
    let billing_rows = || sqlx::query_scalar::<_, i64>("select count(*) from public.billing_instances").fetch_one(pool);
    assert_eq!(billing_rows().await.unwrap(), 0, "a read writes nothing");

    let job = NewJob {
        key: "reconcile:adopt".into(),
        group: Some(SUB.into()),
        kind: JobKind::Reconcile { subscription_id: SUB.into() },
        run_after: at(T0),
    };
    store.enqueue(&[job]).await.unwrap();
    let claim = Claim { now: at(T0), lease: chrono::Duration::seconds(30), limit: 1 };
    let claimed = store.claim_jobs(&claim).await.unwrap().remove(0);
    let intent = InstanceRecord { status: InstanceStatus::Deprovisioning, ..adopted };
    assert!(store.record_instance_intent(claimed.id, claimed.attempts, &intent).await.unwrap());
    let stored: uuid::Uuid =
        sqlx::query_scalar("select instance_id from public.billing_instances").fetch_one(pool).await.unwrap();
    assert_eq!(stored, node_id, "the Node service's row is billing's record");
    let public: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("select id, status from public.instances").fetch_all(pool).await.unwrap();
    assert_eq!(public, [(node_id, "deprovisioning".to_owned())]);
    assert_eq!(store.load_instance(SUB).await.unwrap(), Some(intent.clone()));
    assert_eq!(store.instance_by_app("mindroom-node").await.unwrap(), Some(intent));
}
