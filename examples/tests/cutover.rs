//! Cut-over from the original Node service (issue 10, defect 4): the database already holds the
//! `accounts` / `subscriptions` / `instances` rows the Node service wrote (DESIGN §4), and its app
//! runs under the Node service's name. The real binary, migrated onto that database, must adopt the
//! app: no second `POST /provision`, and a cancel removes the adopted app.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../testsupport/stripe_stub.rs"]
mod stripe_stub;
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

/// Writes the Node service's rows for `life`, its app `running`; returns the `instances` row id.
async fn node_rows(db: &TestDb, life: &Life) -> uuid::Uuid {
    node_rows_with(db, life, "running").await
}

/// Writes the Node service's rows for `life`, its instance in `status`; returns the row id.
async fn node_rows_with(db: &TestDb, life: &Life, status: &str) -> uuid::Uuid {
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
         values ($1, $2, 'cus123', $3, 'https://cus123.mindroom.chat', 'https://api.cus123.mindroom.chat',
                 512, 0.5) returning id",
    )
    .bind(subscription)
    .bind(NODE_APP)
    .bind(status)
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

    assert_eq!(welcome_jobs(&cluster).await, Vec::<(String, Option<String>)>::new(), "adopted, not provisioned");

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

/// `(key, last_error)` of every welcome e-mail job.
async fn welcome_jobs(cluster: &Cluster) -> Vec<(String, Option<String>)> {
    let filter = mindroom_billing_core::ports::JobFilter { state: None, limit: 1000 };
    let jobs = cluster.store().await.list_jobs(&filter).await.unwrap();
    jobs.into_iter().filter(|j| j.key.starts_with("email:welcome:")).map(|j| (j.key, j.last_error)).collect()
}

fn cutover_life(sub: &str, cancelled: bool) -> Life {
    Life {
        sub: sub.into(),
        customer: "cus123".into(),
        start: now_secs() - 60,
        first_price: STARTER.into(),
        upgrade_to: None,
        payment_failed: false,
        paid_after_failure: false,
        cancelled,
    }
}

/// Billing's first fact of the subscription is its cancellation: nothing moved from billing's point
/// of view ("no instance" to "no instance"), yet the Node service's app runs and must go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancellation_as_billings_first_event_removes_the_node_app() {
    let stub = StubProvisioner::start().await;
    stub.add_app(NODE_APP);
    let life = cutover_life("sub_cutover_first_cancel", true);
    let db = TestDb::create().await.expect("fresh database");
    let node_instance = node_rows(&db, &life).await;
    let cluster =
        Cluster::start_on(db, ClusterOptions { replicas: 1, ..ClusterOptions::new(&stub, &[STARTER, PRO]) }).await;
    let deleted = life_events(&life).into_iter().find(|e| e.id.ends_with("_deleted")).unwrap();
    assert_eq!(cluster.send_once(&[deleted]).await, [200]);
    cluster.wait_for_quiet(Duration::from_secs(30)).await;
    let apps = stub.apps();
    assert!(!apps[NODE_APP].alive && apps[NODE_APP].deprovisions == 1, "the Node app runs on: {apps:?}");
    assert_eq!(apps.len(), 1, "{apps:?}");
    assert_eq!(
        instance_rows(cluster.db(), &life.sub).await,
        [(node_instance, Some(NODE_APP.to_owned()), Some("deprovisioned".to_owned()))]
    );
}

/// The Node service left its instance `provisioning` (its app exists): billing's provision answers
/// that app, and the customer, welcomed or not by the Node service, gets no welcome from billing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_instance_gets_no_welcome_email() {
    let stub = StubProvisioner::start().await;
    stub.add_app(NODE_APP);
    let life = cutover_life("sub_cutover_welcome", false);
    let db = TestDb::create().await.expect("fresh database");
    let node_instance = node_rows_with(&db, &life, "provisioning").await;
    let cluster =
        Cluster::start_on(db, ClusterOptions { replicas: 1, ..ClusterOptions::new(&stub, &[STARTER, PRO]) }).await;
    let created = life_events(&life).into_iter().find(|e| e.id.ends_with("_created")).unwrap();
    assert_eq!(cluster.send_once(&[created]).await, [200]);
    cluster.wait_for_quiet(Duration::from_secs(30)).await;
    let apps = stub.apps();
    assert!(apps.len() == 1 && apps[NODE_APP].alive, "{apps:?}");
    assert_eq!(apps[NODE_APP].limits, Some(tier_wire(Tier::Starter)), "the adopted app's limits are stated");
    assert_eq!(
        instance_rows(cluster.db(), &life.sub).await,
        [(node_instance, Some(NODE_APP.to_owned()), Some("running".to_owned()))]
    );
    for (key, last_error) in welcome_jobs(&cluster).await {
        assert!(last_error.as_deref().is_some_and(|e| e.contains("adopted")), "{key} was sent: {last_error:?}");
    }
}

/// The Node service's rows for a subscription billing does not know yet, on a migrated database.
async fn adoptable(sub: &str) -> (TestDb, Life) {
    let life = cutover_life(sub, true);
    let db = TestDb::create().await.expect("fresh database");
    node_rows(&db, &life).await;
    support::migrate(db.url());
    (db, life)
}

/// `stripe reconcile --dry-run` over an adopted instance reads it and writes nothing: every row of
/// every table is the same before and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_over_an_adoptable_instance_writes_nothing() {
    const KEY: &str = "sk_test_cutover_dry_run";
    let (db, life) = adoptable("sub_cutover_dry_run").await;
    let stripe = stripe_stub::StripeStub::start(KEY).await;
    stripe.add_subscription(
        serde_json::json!({
            "id": life.sub, "object": "subscription", "customer": life.customer, "status": "canceled",
            "created": life.start, "cancel_at_period_end": false, "canceled_at": life.start + 30,
            "trial_end": null, "metadata": {},
            "items": {"object": "list", "data": [{"id": "si_1", "object": "subscription_item",
                "current_period_end": life.start + 30 * 86_400, "price": {"id": STARTER, "object": "price"}}]},
        }),
        None,
    );
    let before = support::dump_rows(&db, &[]).await;
    let table = support::stripe_cli(&["stripe", "reconcile", "--dry-run"], db.url(), KEY, &stripe.url, [STARTER, PRO]);
    assert!(table.contains(&life.sub) && table.contains("dry run"), "{table}");
    assert_eq!(support::dump_rows(&db, &[]).await, before, "the dry run wrote");
}

/// A console page view of a customer whose instance is adoptable (billing knows the subscription, no
/// job has acted on its instance yet) reads it and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_page_view_of_an_adoptable_instance_writes_nothing() {
    let (db, life) = adoptable("sub_cutover_page_view").await;
    // Billing knows the subscription (its first fact is committed; its reconcile has not run yet) and
    // the console shows the customer's page.
    let created = life_events(&life).into_iter().find(|e| e.id.ends_with("_created")).unwrap();
    let event = mindroom_billing_core::event::parse(created.body.as_bytes()).unwrap();
    let policy = mindroom_billing_core::Policy::default()
        .with_prices(mindroom_billing_core::PriceCatalog::new().with_price(STARTER, Tier::Starter));
    let now = chrono::Utc::now();
    let decision = mindroom_billing_core::transition::decide(&policy, None, &event, now);
    let store = mindroom_billing_supabase::PgStore::connect(db.url(), Default::default()).await.unwrap();
    let commit = mindroom_billing_core::Commit {
        now,
        event_id: None,
        outcome: mindroom_billing_core::Outcome::Applied,
        subscription: decision.subscription,
        account: decision.account,
        jobs: Vec::new(),
    };
    mindroom_billing_core::Store::commit(&store, &commit).await.unwrap();
    store.close().await;
    let stub = StubProvisioner::start().await;
    let console = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let hash = mindroom_billing_console::hash_password("a console password").unwrap();
    let mut options = ClusterOptions { replicas: 1, ..ClusterOptions::new(&stub, &[STARTER, PRO]) };
    options.env =
        vec![("BILLING_CONSOLE_ADDR".into(), console.clone()), ("BILLING_CONSOLE_PASSWORD_HASH".into(), hash)];
    let cluster = Cluster::start_on(db, options).await;
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let base = format!("http://{console}");
    let started = std::time::Instant::now();
    let login = loop {
        let login = http
            .post(format!("{base}/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("name=admin&password=a+console+password")
            .send()
            .await;
        match login {
            Ok(login) => break login,
            Err(e) => assert!(started.elapsed() < Duration::from_secs(30), "console not up: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(login.status(), 303);
    let cookie = login.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    // The operator's session keeps its idle clock (the console ends idle sessions): the one write a
    // request makes by design.
    let session_clock = [("billing_operator_sessions", "last_seen")];
    let before = support::dump_rows(cluster.db(), &session_clock).await;
    let page = http.get(format!("{base}/customers/{}", life.customer)).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let page = page.text().await.unwrap();
    assert!(page.contains(NODE_APP), "the adopted app is shown: {page}");
    assert_eq!(support::dump_rows(cluster.db(), &session_clock).await, before, "the page view wrote");
}
