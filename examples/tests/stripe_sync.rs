//! The Stripe API as a second source of truth (issue 12), end to end: three real `mindroom-billing
//! serve` replicas on one fresh PostgreSQL database, a local Stripe API stub holding events the
//! webhooks never delivered, and the recording stub provisioner.
//!
//! Run with `scripts/test.sh` (or `cargo test -p mindroom-billing-examples --test stripe_sync`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../testsupport/stripe_stub.rs"]
mod stripe_stub;
mod support;

use std::time::{Duration, Instant};

use mindroom_billing_core::ports::EventFilter;
use mindroom_billing_core::service::app_name_for;
use mindroom_billing_core::{EventSource, EventStatus, Tier};
use rand::Rng;
use serde_json::json;

use stripe_stub::StripeStub;
use support::{Cluster, ClusterOptions, Life, StubProvisioner, life_events, now_secs, subscription_event, tier_wire};

const STARTER: &str = "price_sync_starter";
const PRO: &str = "price_sync_pro";
const KEY: &str = "sk_test_e2e_catch_up";

fn tier_of(price: &str) -> Tier {
    if price == STARTER { Tier::Starter } else { Tier::Professional }
}

fn options(stub: &StubProvisioner, stripe: &StripeStub) -> ClusterOptions {
    let mut options = ClusterOptions::new(stub, &[STARTER, PRO]);
    options.env = vec![
        ("STRIPE_SECRET_KEY".into(), KEY.into()),
        ("STRIPE_API_BASE".into(), stripe.url.clone()),
        ("STRIPE_CATCH_UP_INTERVAL_SECS".into(), "2".into()),
    ];
    options
}

fn lives(n: usize, base: i64) -> Vec<Life> {
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|i| {
            let first = if rng.gen_bool(0.5) { STARTER } else { PRO };
            let failed = rng.gen_bool(0.3);
            Life {
                sub: format!("sub_sync{i:03}x{}", rng.gen_range(1000..9999)),
                customer: format!("cus_sync{i:03}"),
                start: base + i64::try_from(i).unwrap(),
                first_price: first.into(),
                upgrade_to: rng.gen_bool(0.5).then(|| if first == STARTER { PRO } else { STARTER }.to_owned()),
                payment_failed: failed,
                paid_after_failure: failed && rng.gen_bool(0.5),
                cancelled: rng.gen_bool(0.25),
            }
        })
        .collect()
}

/// Every live subscription provisioned exactly once at its final tier; no app left for a canceled one.
fn converged(lives: &[Life], stub: &StubProvisioner) -> Result<(), String> {
    let apps = stub.apps();
    for life in lives {
        let app = apps.get(&app_name_for(&life.sub));
        let provisions = app.map_or(0, |a| a.provision_keys.len());
        let deprovisions = app.map_or(0, |a| a.deprovisions);
        if life.cancelled {
            if app.is_some_and(|a| a.alive) || provisions != deprovisions as usize || provisions > 1 {
                return Err(format!("{}: canceled but {app:?}", life.sub));
            }
        } else {
            let tier = tier_of(life.upgrade_to.as_deref().unwrap_or(&life.first_price));
            let ok = app.is_some_and(|a| a.alive && a.limits == Some(tier_wire(tier)));
            if !ok || provisions != 1 || deprovisions != 0 {
                return Err(format!("{}: expected one app at {tier}: {app:?}", life.sub));
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn missed_deliveries_heal_from_the_stripe_api_once_across_three_replicas() {
    let stripe = StripeStub::start(KEY).await;
    let stub = StubProvisioner::start().await;
    // First start: no cursor yet, so the start-up catch-up reconciles (nothing at Stripe yet) and
    // starts the cursor.
    let mut cluster = Cluster::start(options(&stub, &stripe)).await;
    let store = cluster.store().await;
    let started = Instant::now();
    while store.load_cursor("stripe_catch_up").await.unwrap().is_none() {
        assert!(started.elapsed() < Duration::from_secs(30), "no cursor after start-up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The servers are down while 50 subscriptions live their lives: the events exist only at Stripe.
    cluster.stop_all();
    let lives = lives(50, now_secs() - 120);
    let events: Vec<_> = lives.iter().flat_map(life_events).collect();
    for e in &events {
        stripe.add_event_raw(&e.body);
    }
    cluster.start_again().await;
    let started = Instant::now();
    loop {
        match converged(&lives, &stub) {
            Ok(()) => break,
            Err(e) => assert!(started.elapsed() < Duration::from_secs(60), "not healed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.wait_for_quiet(Duration::from_secs(60)).await;
    converged(&lives, &stub).expect("still converged once quiet");
    for e in &events {
        let stored = store.load_event(&e.id).await.unwrap().expect("recorded");
        assert_eq!((stored.source, stored.payload.as_str()), (EventSource::Api, e.body.as_str()), "{}", e.id);
    }

    // The same events delivered late as webhooks are all duplicates: nothing happens twice.
    let calls_before = stub.calls().len();
    for e in &events {
        let (status, _) = cluster.post(0, &e.body).await;
        assert_eq!(status, 200, "{}", e.id);
    }
    cluster.wait_for_quiet(Duration::from_secs(30)).await;
    assert_eq!(stub.calls().len(), calls_before, "no provisioner call from the late webhooks");
    for e in &events {
        let stored = store.load_event(&e.id).await.unwrap().unwrap();
        assert!(stored.deliveries >= 2 && stored.status != EventStatus::Received, "{}: {stored:?}", e.id);
    }
    let failed = store.list_events(&EventFilter { status: Some(EventStatus::Failed), limit: 10 }).await.unwrap();
    assert!(failed.is_empty(), "{failed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn drift_is_listed_by_a_dry_run_and_healed_by_reconcile() {
    let stripe = StripeStub::start(KEY).await;
    let stub = StubProvisioner::start().await;
    let mut options = options(&stub, &stripe);
    options.replicas = 1;
    // Catch-up runs at start-up only within this test (the interval is long).
    options.env.retain(|(k, _)| k != "STRIPE_CATCH_UP_INTERVAL_SECS");
    let cluster = Cluster::start(options).await;
    let store = cluster.store().await;

    // Billing knows the subscription as starter (a webhook) ...
    let mut life = support_life("sub_sync_drift", now_secs() - 3600);
    life.first_price = STARTER.into();
    let created =
        subscription_event("evt_drift_created", "customer.subscription.created", life.start, &life, "active", STARTER);
    assert_eq!(cluster.post(0, &created.body).await.0, 200);
    let app = app_name_for(&life.sub);
    let started = Instant::now();
    while !stub.apps().get(&app).is_some_and(|a| a.alive) {
        assert!(started.elapsed() < Duration::from_secs(30), "not provisioned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... while Stripe holds it as professional, and no event says so (older than 30 days, or never sent).
    let object = json!({
        "id": life.sub, "object": "subscription", "customer": life.customer, "status": "active",
        "created": life.start, "cancel_at_period_end": false, "canceled_at": null, "trial_end": null,
        "metadata": {}, "items": {"object": "list", "data": [{"id": "si_1", "object": "subscription_item",
            "current_period_end": life.start + 30 * 86_400, "price": {"id": PRO, "object": "price"}}]},
    });
    stripe.add_subscription(object, None);

    let cli = |args: &[&str]| support::stripe_cli(args, cluster.db().url(), KEY, &stripe.url, [STARTER, PRO]);
    let table = cli(&["stripe", "reconcile", "--dry-run"]);
    assert!(table.contains(&life.sub) && table.contains("tier") && table.contains("professional"), "{table}");
    assert!(table.contains("dry run"), "{table}");
    assert_eq!(store.load_subscription(&life.sub).await.unwrap().unwrap().tier(), Some(Tier::Starter), "unchanged");

    let fixed = cli(&["stripe", "reconcile", "--subscription", &life.sub]);
    assert!(fixed.contains("1 subscriptions checked, 1 with drift"), "{fixed}");
    let started = Instant::now();
    while stub.apps()[&app].limits != Some(tier_wire(Tier::Professional)) {
        assert!(started.elapsed() < Duration::from_secs(30), "drift not healed: {:?}", stub.apps()[&app]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A webhook older than the fetch is stale; a newer one applies.
    let old =
        subscription_event("evt_drift_old", "customer.subscription.updated", now_secs() - 60, &life, "active", STARTER);
    assert_eq!(cluster.post(0, &old.body).await.0, 200);
    assert_eq!(store.load_event("evt_drift_old").await.unwrap().unwrap().status, EventStatus::Stale);
    let new =
        subscription_event("evt_drift_new", "customer.subscription.updated", now_secs() + 5, &life, "active", STARTER);
    assert_eq!(cluster.post(0, &new.body).await.0, 200);
    assert_eq!(store.load_event("evt_drift_new").await.unwrap().unwrap().status, EventStatus::Applied);
    assert_eq!(store.load_subscription(&life.sub).await.unwrap().unwrap().tier(), Some(Tier::Starter));
}

fn support_life(sub: &str, start: i64) -> Life {
    Life {
        sub: sub.into(),
        customer: format!("cus_{sub}"),
        start,
        first_price: STARTER.into(),
        upgrade_to: None,
        payment_failed: false,
        paid_after_failure: false,
        cancelled: false,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_key_stops_catch_up_with_one_error_and_webhooks_keep_working() {
    let stripe = StripeStub::start("sk_test_the_right_one").await;
    let stub = StubProvisioner::start().await;
    let mut options = options(&stub, &stripe);
    options.replicas = 1;
    let cluster = Cluster::start(options).await;
    let client = reqwest::Client::new();
    let started = Instant::now();
    // Every series is listed at 0 from the start: wait for a sync error counted.
    let counted = |body: &str| {
        body.lines()
            .filter(|l| l.starts_with("billing_stripe_sync_errors_total{"))
            .filter(|l| !l.ends_with(" 0"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let errors = loop {
        let body = client.get(cluster.url(0, "/metrics")).send().await.unwrap().text().await.unwrap();
        let errors = counted(&body);
        if !errors.is_empty() {
            break errors;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no sync error counted:\n{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(errors.iter().all(|l| l.contains(r#"kind="unauthorized""#)), "{errors:?}");
    // A 401 is not retried: one request per catch-up run (every 2 s here), not a retry storm.
    let seen = stripe.requests().len();
    assert!(seen >= 1);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(stripe.requests().len() <= seen + 1, "{} requests after {seen}", stripe.requests().len());

    let life = support_life("sub_sync_key", now_secs() - 60);
    let created =
        subscription_event("evt_key_created", "customer.subscription.created", life.start, &life, "active", STARTER);
    assert_eq!(cluster.post(0, &created.body).await.0, 200, "webhooks keep working");
    let started = Instant::now();
    while !stub.apps().get(&app_name_for(&life.sub)).is_some_and(|a| a.alive) {
        assert!(started.elapsed() < Duration::from_secs(30), "webhook not applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---- the first start on an account with history, the cursor, the reconcile lease ---------------

const DAY: i64 = 86_400;

/// A subscription object as `GET /v1/subscriptions` shows it.
fn subscription_object(
    sub: &str,
    customer: &str,
    status: &str,
    price: &str,
    created: i64,
    ended: Option<i64>,
) -> serde_json::Value {
    json!({
        "id": sub, "object": "subscription", "customer": customer, "status": status, "created": created,
        "cancel_at_period_end": false, "canceled_at": ended, "ended_at": ended, "trial_end": null,
        "metadata": {}, "items": {"object": "list", "data": [{"id": format!("si_{sub}"), "object": "subscription_item",
            "current_period_end": ended.unwrap_or(created + 30 * DAY), "price": {"id": price, "object": "price"}}]},
    })
}

/// An expanded latest invoice: paid at `at`, or its payment failed (attempted at `at`, still open).
fn latest_invoice(id: &str, customer: &str, paid: bool, at: i64) -> serde_json::Value {
    json!({
        "id": id, "object": "invoice", "customer": customer, "amount_due": 4900, "currency": "usd",
        "status": if paid { "paid" } else { "open" }, "attempt_count": 1, "created": at - 3600,
        "hosted_invoice_url": format!("https://invoice.stripe.com/i/{id}"),
        "status_transitions": {"paid_at": if paid { Some(at) } else { None }, "finalized_at": at},
    })
}

/// The number in `/metrics` of the series whose line starts with `series`, 0 when absent.
async fn metric(base: &str, series: &str) -> u64 {
    let body = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
    body.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse::<u64>().ok())).unwrap_or(0)
}

/// Stripe holds a year of history: two subscriptions canceled a year ago (one after its last payment
/// failed), one active. Returns the ids (canceled, canceled after a failure, active).
fn year_of_history(stripe: &StripeStub) -> (String, String, String) {
    let now = now_secs();
    let (old, failed, active) = ("sub_hist_old".to_owned(), "sub_hist_failed".to_owned(), "sub_hist_active".to_owned());
    for sub in [&old, &failed, &active] {
        let customer = format!("cus_{sub}");
        stripe.add_customer(json!({"id": customer, "object": "customer", "email": format!("{sub}@example.com")}));
    }
    let ended = now - 365 * DAY;
    stripe.add_subscription(
        subscription_object(&old, &format!("cus_{old}"), "canceled", STARTER, now - 500 * DAY, Some(ended)),
        Some(latest_invoice("in_hist_old", &format!("cus_{old}"), true, ended - 30 * DAY)),
    );
    stripe.add_subscription(
        subscription_object(&failed, &format!("cus_{failed}"), "canceled", PRO, now - 450 * DAY, Some(ended)),
        Some(latest_invoice("in_hist_failed", &format!("cus_{failed}"), false, ended - 20 * DAY)),
    );
    stripe.add_subscription(
        subscription_object(&active, &format!("cus_{active}"), "active", PRO, now - 20 * DAY, None),
        Some(latest_invoice("in_hist_active", &format!("cus_{active}"), true, now - 20 * DAY)),
    );
    (old, failed, active)
}

/// Waits until the four e-mail jobs of `year_of_history` (a welcome, two cancellations, a payment
/// failure) have finished, and answers (sent, skipped).
async fn emails_finished(base: &str) -> (u64, u64) {
    let started = Instant::now();
    loop {
        let done = metric(base, r#"billing_jobs_total{kind="email",result="done"}"#).await;
        let skipped = metric(base, r#"billing_jobs_total{kind="email",result="skipped"}"#).await;
        if done + skipped >= 4 {
            return (done, skipped);
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "e-mail jobs not finished: {done} sent, {skipped} skipped"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn first_start_with_a_key_emails_nobody_about_year_old_cancellations_on_postgres() {
    let stripe = StripeStub::start(KEY).await;
    let stub = StubProvisioner::start().await;
    let (old, failed, active) = year_of_history(&stripe);
    let mut options = options(&stub, &stripe);
    options.replicas = 1;
    let cluster = Cluster::start(options).await;
    let (sent, skipped) = emails_finished(&cluster.url(0, "")).await;
    assert!(stub.apps().get(&app_name_for(&active)).is_some_and(|a| a.alive), "the active one is provisioned");
    assert_eq!((sent, skipped), (1, 3), "only the welcome e-mail of the active subscription is sent");
    let store = cluster.store().await;
    let jobs = store.list_jobs(&mindroom_billing_core::ports::JobFilter { state: None, limit: 100 }).await.unwrap();
    for (key, what) in [
        (format!("email:cancellation:{old}"), "cancellation"),
        (format!("email:cancellation:{failed}"), "cancellation"),
        ("email:payment_failed:in_hist_failed".to_owned(), "payment failure"),
    ] {
        let job = jobs.iter().find(|j| j.key == key).unwrap_or_else(|| panic!("no job {key}: {jobs:?}"));
        let reason = job.last_error.as_deref().unwrap_or_default();
        assert!(
            reason.starts_with("skipped:") && reason.contains(what) && reason.contains("not news"),
            "{key}: {reason}"
        );
    }
    assert!(!stub.apps().contains_key(&app_name_for(&old)) && !stub.apps().contains_key(&app_name_for(&failed)));
}

#[tokio::test(flavor = "multi_thread")]
async fn first_start_with_a_key_emails_nobody_about_year_old_cancellations_in_memory() {
    let stripe = StripeStub::start(KEY).await;
    let stub = StubProvisioner::start().await;
    let (_, _, active) = year_of_history(&stripe);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut command = support::binary(&support::scratch_dir("late-facts"));
    command
        .arg("serve")
        .env("PORT", port.to_string())
        // No DATABASE_URL: the in-memory store.
        .env("STRIPE_WEBHOOK_SECRET", support::SECRET)
        .env("STRIPE_PRICE_STARTER", STARTER)
        .env("STRIPE_PRICE_PRO", PRO)
        .env("DOKKU_PROVISIONER_URL", &stub.url)
        .env("PROVISIONER_API_KEY", support::PROVISIONER_KEY)
        .env("STRIPE_SECRET_KEY", KEY)
        .env("STRIPE_API_BASE", &stripe.url)
        .env("BILLING_JOB_POLL_MS", "100")
        .env("RUST_LOG", "info");
    let server = support::Logged::spawn(command, "late-facts-memory");
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    while reqwest::get(format!("{base}/health")).await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "not started:\n{}", server.output());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (sent, skipped) = emails_finished(&base).await;
    assert!(stub.apps().get(&app_name_for(&active)).is_some_and(|a| a.alive), "the active one is provisioned");
    assert_eq!((sent, skipped), (1, 3), "only the welcome e-mail is sent:\n{}", server.output());
    let log = server.output();
    let mailed: Vec<&str> = log.lines().filter(|l| l.contains("e-mail (not sent")).collect();
    assert!(mailed.len() == 1 && mailed[0].contains("Welcome"), "{mailed:?}");
}

/// A fresh migrated database whose catch-up cursor is at `secs`.
async fn database_with_cursor(secs: i64) -> mindroom_billing_supabase::testing::TestDb {
    let db = mindroom_billing_supabase::testing::TestDb::create().await.unwrap();
    support::migrate(db.url());
    let at = chrono::DateTime::from_timestamp(secs, 0).unwrap();
    let store =
        mindroom_billing_supabase::PgStore::connect(db.url(), mindroom_billing_supabase::PgStoreOptions::default())
            .await
            .unwrap();
    let cursor = mindroom_billing_core::SyncCursor { created: at, saved_at: at };
    mindroom_billing_core::Store::save_cursor(&store, "stripe_catch_up", &cursor).await.unwrap();
    db
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_listed_late_is_caught_up_by_a_later_run() {
    let stripe = StripeStub::start(KEY).await;
    let stub = StubProvisioner::start().await;
    let now = now_secs();
    // A catch-up ran a minute ago.
    let db = database_with_cursor(now - 60).await;
    let newer = support_life("sub_listed_first", now - 10);
    let first =
        subscription_event("evt_listed_first", "customer.subscription.created", now - 10, &newer, "active", STARTER);
    stripe.add_event_raw(&first.body);
    let mut options = options(&stub, &stripe);
    options.replicas = 1;
    let cluster = Cluster::start_on(db, options).await;
    let store = cluster.store().await;
    let started = Instant::now();
    while store.load_event("evt_listed_first").await.unwrap().is_none() {
        assert!(started.elapsed() < Duration::from_secs(30), "the first event is not caught up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Stripe's list is eventually consistent: an event created 20 s before the one already caught up
    // shows in the list only now.
    let older = support_life("sub_listed_late", now - 30);
    let late =
        subscription_event("evt_listed_late", "customer.subscription.created", now - 30, &older, "active", STARTER);
    stripe.add_event_raw(&late.body);
    let started = Instant::now();
    while store.load_event("evt_listed_late").await.unwrap().is_none() {
        assert!(started.elapsed() < Duration::from_secs(30), "the late-listed event is never caught up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let started = Instant::now();
    while !stub.apps().get(&app_name_for(&older.sub)).is_some_and(|a| a.alive) {
        assert!(started.elapsed() < Duration::from_secs(30), "the late-listed subscription is not provisioned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_reconcile_leaves_its_lease_to_the_next_start() {
    let stripe = StripeStub::start(KEY).await;
    let stub = StubProvisioner::start().await;
    // A recent cursor: the start-up catch-up lists events (one request) instead of reconciling.
    let db = database_with_cursor(now_secs()).await;
    // The catch-up's request is answered; the reconcile's is refused once.
    stripe.fail_next(stripe_stub::Fault::Slow(Duration::ZERO), 1);
    stripe.fail_next(stripe_stub::Fault::Status { status: 400, should_retry: Some(false) }, 1);
    let mut options = options(&stub, &stripe);
    options.replicas = 1;
    options.env.retain(|(k, _)| k != "STRIPE_CATCH_UP_INTERVAL_SECS");
    let mut cluster = Cluster::start_on(db, options).await;
    let started = Instant::now();
    while metric(&cluster.url(0, ""), r#"billing_stripe_sync_errors_total{task="reconcile",kind="api"}"#).await == 0 {
        assert!(started.elapsed() < Duration::from_secs(30), "the reconcile did not fail");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listings = || stripe.requests().iter().filter(|r| r.path.starts_with("/v1/subscriptions")).count();
    assert_eq!(listings(), 1);
    // A deploy: the next process reconciles at start-up, not a day later.
    cluster.stop_all();
    cluster.start_again().await;
    let started = Instant::now();
    while listings() < 2 {
        assert!(started.elapsed() < Duration::from_secs(30), "the failed reconcile's lease is still held");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
