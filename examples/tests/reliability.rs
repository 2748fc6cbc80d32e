//! End-to-end reliability suite: three real `mindroom-billing serve` processes on one fresh
//! PostgreSQL database (direct store), a stub Dokku provisioner that records every call, and a
//! Stripe-like sender that signs events, duplicates and shuffles them and redelivers on failure.
//!
//! Run with `scripts/test.sh` (or `cargo test -p mindroom-billing-examples --test reliability`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr, missing_docs)]

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mindroom_billing_core::ports::{EventFilter, JobFilter, Store};
use mindroom_billing_core::{InstanceStatus, JobKind, JobState, Tier};
use rand::Rng;
use rand::seq::SliceRandom;

use support::{Cluster, ClusterOptions, Life, StubProvisioner, TcpCutter, life_events, now_secs};

const STARTER: &str = "price_e2e_starter";
const PRO: &str = "price_e2e_pro";

fn random_lives(n: usize, base: i64) -> Vec<Life> {
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|i| {
            let first = if rng.gen_bool(0.5) { STARTER } else { PRO };
            let upgrade = rng.gen_bool(0.5).then(|| if first == STARTER { PRO } else { STARTER });
            let failed = rng.gen_bool(0.3);
            let paid_after_failure = failed && rng.gen_bool(0.66);
            let cancelled = rng.gen_bool(0.25);
            Life {
                sub: format!("sub_e2e{i:04}x{}", rng.gen_range(1000..9999)),
                customer: format!("cus_e2e{i:04}"),
                start: base + i64::try_from(i).unwrap(),
                first_price: first.into(),
                upgrade_to: upgrade.map(Into::into),
                payment_failed: failed,
                paid_after_failure,
                cancelled,
            }
        })
        .collect()
}

fn tier_of(price: &str) -> Tier {
    if price == STARTER { Tier::Starter } else { Tier::Professional }
}

/// Asserts the provisioner's record and the database rows against each subscription's life.
async fn assert_converged(lives: &[Life], stub: &StubProvisioner, store: &Arc<dyn Store>) {
    let apps = stub.apps();
    for life in lives {
        let app = mindroom_billing_core::service::app_name_for(&life.sub);
        let record = apps.get(&app);
        let state = store.load_subscription(&life.sub).await.unwrap().expect("aggregate exists");
        let final_price = life.upgrade_to.as_deref().unwrap_or(&life.first_price);
        if !life.cancelled {
            assert_eq!(state.tier(), Some(tier_of(final_price)), "{}", life.sub);
        }
        let instance = store.load_instance(&life.sub).await.unwrap();
        if life.cancelled {
            // Provisioned at most once, and then removed; never left running.
            if let Some(app) = record {
                assert!(app.provision_keys.len() <= 1, "{}: {:?}", life.sub, app.provision_keys);
                assert!(!app.alive, "{} must be deprovisioned", life.sub);
                assert_eq!(app.deprovisions, 1, "{}", life.sub);
            }
            assert!(instance.is_none_or(|i| i.status == InstanceStatus::Deprovisioned), "{}", life.sub);
        } else {
            let app = record.unwrap_or_else(|| panic!("{} was never provisioned", life.sub));
            // One provisioning job (`provision:<sub>:<generation>:<tier>:<job>`). Its key names the
            // tier, so a retry after the killed replica's attempt reached the provisioner, once the
            // tier had changed, is a second key of that same job (and the limits are set after it).
            let jobs: HashSet<(&str, &str)> = app
                .provision_keys
                .iter()
                .map(|key| {
                    let parts: Vec<&str> = key.split(':').collect();
                    assert_eq!(parts.len(), 5, "{key}");
                    (parts[2], parts[4])
                })
                .collect();
            assert_eq!(jobs.len(), 1, "{}: provisioned by one job, got {:?}", life.sub, app.provision_keys);
            assert!(app.provision_keys.len() <= 2, "{}: {:?}", life.sub, app.provision_keys);
            assert!(app.alive, "{}", life.sub);
            assert_eq!(app.deprovisions, 0, "{}", life.sub);
            assert_eq!(
                app.limits,
                Some(support::tier_wire(tier_of(final_price))),
                "{}: limits of the final tier",
                life.sub
            );
            let instance = instance.expect("instance row");
            assert_eq!((instance.status, instance.tier), (InstanceStatus::Running, Some(tier_of(final_price))));
        }
    }
    let counts = store.job_counts().await.unwrap();
    assert_eq!((counts.pending, counts.running, counts.dead), (0, 0, 0), "no job left pending or dead");
}

async fn assert_events_stored_once(store: &Arc<dyn Store>, expected_ids: &HashSet<String>) {
    let events = store.list_events(&EventFilter { status: None, limit: 100_000 }).await.unwrap();
    let ids: HashSet<String> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(events.len(), ids.len(), "every event id stored once");
    assert_eq!(&ids, expected_ids);
    assert!(events.iter().all(|e| e.status.is_done()), "every event applied/stale/ignored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storm_with_a_replica_killed_midway() {
    let stub = StubProvisioner::start().await;
    let mut cluster = Cluster::start(ClusterOptions::new(&stub, &[STARTER, PRO])).await;
    let lives = random_lives(200, now_secs() - 3600);
    let mut deliveries = Vec::new();
    let mut ids = HashSet::new();
    let mut rng = rand::thread_rng();
    for life in &lives {
        for event in life_events(life) {
            ids.insert(event.id.clone());
            for _ in 0..rng.gen_range(1..=5) {
                deliveries.push(event.clone());
            }
        }
    }
    deliveries.shuffle(&mut rng);
    eprintln!("storm: {} subscriptions, {} events, {} deliveries", lives.len(), ids.len(), deliveries.len());
    let half = deliveries.len() / 2;
    let (first, second) = deliveries.split_at(half);
    cluster.send_all(first, 32).await;
    cluster.kill_replica(0); // kill -9 in the middle of the storm, holding leases
    cluster.send_all(second, 32).await;
    cluster.wait_for_quiet(Duration::from_secs(180)).await;
    let store = cluster.store().await;
    assert_converged(&lives, &stub, &store).await;
    assert_events_stored_once(&store, &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_outage_and_provisioner_outage_and_slowness() {
    let stub = StubProvisioner::start().await;
    let mut options = ClusterOptions::new(&stub, &[STARTER, PRO]);
    options.db_cutter = true;
    let cluster = Cluster::start(options).await;
    let lives = random_lives(30, now_secs() - 3600);
    let events: Vec<_> = lives.iter().flat_map(life_events).collect();
    let ids: HashSet<String> = events.iter().map(|e| e.id.clone()).collect();
    let (first, second) = events.split_at(events.len() / 2);

    // Provisioner outage: 503 for 30 s, then 2 s per call.
    stub.fail_for(Duration::from_secs(30));
    cluster.send_all(first, 8).await;

    // Database down: webhooks answer 503 (Stripe retries), nothing half-written.
    let cutter: &TcpCutter = cluster.db_cutter().unwrap();
    cutter.cut();
    let statuses = cluster.send_once(&second[..3]).await;
    assert!(statuses.iter().all(|s| *s == 503), "webhooks answer 503 while the database is down: {statuses:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    cutter.restore();
    cluster.send_all(second, 8).await; // Stripe-style redelivery succeeds

    stub.set_delay(Duration::from_secs(2));
    cluster.wait_for_quiet(Duration::from_secs(300)).await;
    let store = cluster.store().await;
    assert_converged(&lives, &stub, &store).await;
    assert_events_stored_once(&store, &ids).await;
    let retried = store.list_jobs(&JobFilter { state: Some(JobState::Done), limit: 10_000 }).await.unwrap();
    assert!(retried.iter().any(|j| j.attempts > 1 && j.last_error.is_some()), "jobs backed off during the outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grace_period_expires_once_across_replicas() {
    let stub = StubProvisioner::start().await;
    let cluster = Cluster::start(ClusterOptions::new(&stub, &[STARTER, PRO])).await;
    // The failure happened 7 days minus 20 s ago: the grace deadline is 20 s from now.
    let failed_at = now_secs() - 7 * 86_400 + 20;
    let lives: Vec<Life> = (0..3)
        .map(|i| Life {
            sub: format!("sub_grace{i}"),
            customer: format!("cus_grace{i}"),
            start: failed_at - 100,
            first_price: STARTER.into(),
            upgrade_to: None,
            payment_failed: true,
            paid_after_failure: false,
            cancelled: false,
        })
        .collect();
    let events: Vec<_> = lives.iter().flat_map(|l| support::grace_events(l, failed_at)).collect();
    cluster.send_all(&events, 4).await;
    let store = cluster.store().await;
    let started = Instant::now();
    for life in &lives {
        let state = store.load_subscription(&life.sub).await.unwrap().unwrap();
        let grace = state.grace.expect("grace set");
        assert_eq!(grace.started_at.timestamp(), failed_at, "grace starts at the failure's created time");
        assert_eq!(grace.ends_at.timestamp(), failed_at + 7 * 86_400);
    }
    // Running during grace, removed after it, by exactly one replica.
    loop {
        let apps = stub.apps();
        let done = lives
            .iter()
            .all(|l| apps.get(&mindroom_billing_core::service::app_name_for(&l.sub)).is_some_and(|a| !a.alive));
        if done {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "sweeper did not deprovision: {apps:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.wait_for_quiet(Duration::from_secs(60)).await;
    let apps = stub.apps();
    let jobs = store.list_jobs(&JobFilter { state: None, limit: 10_000 }).await.unwrap();
    for life in &lives {
        let app = &apps[&mindroom_billing_core::service::app_name_for(&life.sub)];
        assert_eq!((app.provision_keys.len(), app.deprovisions), (1, 1), "{}", life.sub);
        let grace_emails = jobs
            .iter()
            .filter(|j| {
                matches!(&j.kind, JobKind::Email { subscription_id: Some(s), email, .. }
                if *s == life.sub && email.label() == "grace_expired")
            })
            .count();
        assert_eq!(grace_emails, 1, "{}: one grace-expired e-mail", life.sub);
        let failed_emails = jobs
            .iter()
            .filter(|j| {
                matches!(&j.kind, JobKind::Email { subscription_id: Some(s), email, .. }
                if *s == life.sub && email.label() == "payment_failed")
            })
            .count();
        assert_eq!(failed_emails, 1, "{}: one payment-failed e-mail", life.sub);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_input_leaves_the_service_healthy_and_the_store_untouched() {
    let stub = StubProvisioner::start().await;
    let cluster = Cluster::start(ClusterOptions::new(&stub, &[STARTER, PRO])).await;
    let client = reqwest::Client::new();
    let url = cluster.url(1, "/webhooks/stripe");
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    let body =
        br#"{"id":"evt_hostile","type":"customer.created","created":1,"data":{"object":{"id":"cus_h"}}}"#.to_vec();
    for i in 0..1000u32 {
        let request = match i % 5 {
            0 => client
                .post(&url)
                .header("Stripe-Signature", format!("t={},v1={}", now_secs(), "ab".repeat(32)))
                .body(body.clone()),
            1 => client.post(&url).header("Stripe-Signature", "t=abc,v1=zz,,,=").body(body.clone()),
            2 => client.post(&url).header("Stripe-Signature", "\u{7f}garbage").body(vec![0xff; 64]),
            3 => client.post(&url).body(vec![b'{'; 2 * 1024 * 1024]),
            _ => client.post(&url).header("Stripe-Signature", cluster.sign(b"{not json", now_secs())).body("{not json"),
        };
        let status = request.send().await.map(|r| r.status().as_u16()).unwrap_or(0);
        *statuses.entry(status).or_default() += 1;
    }
    eprintln!("hostile statuses: {statuses:?}");
    assert!(statuses.keys().all(|s| matches!(s, 400 | 413 | 0)), "{statuses:?}");
    let health = client.get(cluster.url(1, "/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let store = cluster.store().await;
    assert!(store.list_events(&EventFilter { status: None, limit: 10 }).await.unwrap().is_empty(), "nothing stored");
    assert_eq!(store.job_counts().await.unwrap(), Default::default());

    // Slowloris: a body that trickles in is cut off by the request timeout.
    let mut stream = tokio::net::TcpStream::connect(cluster.addr(1)).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\nStripe-Signature: t=1,v1=00\r\n\r\n{")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            // Trickle one byte per second until the server gives up on us.
            if stream.write_all(b" ").await.is_err() {
                return 0;
            }
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await {
                return n;
            }
        }
    })
    .await
    .expect("the server must cut a slow body off");
    let answer = String::from_utf8_lossy(&buf[..read]);
    assert!(read == 0 || answer.starts_with("HTTP/1.1 408"), "{answer}");
    eprintln!("slow body cut off after {:?}", started.elapsed());
}

/// `GET /v1/accounts/{id}/entitlements` on `replica`, as JSON.
async fn entitlements(cluster: &Cluster, replica: usize, account: uuid::Uuid) -> serde_json::Value {
    let url = cluster.url(replica, &format!("/v1/accounts/{account}/entitlements"));
    let r = reqwest::Client::new().get(url).bearer_auth("e2e-billing-key").send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upgrade_committed_on_one_replica_is_answered_by_the_other_from_a_fresh_cache() {
    let stub = StubProvisioner::start().await;
    let cluster = Cluster::start(ClusterOptions { replicas: 2, ..ClusterOptions::new(&stub, &[STARTER, PRO]) }).await;
    let life = Life {
        sub: "sub_cache1".into(),
        customer: "cus_cache1".into(),
        start: now_secs() - 60,
        first_price: STARTER.into(),
        upgrade_to: None,
        payment_failed: false,
        paid_after_failure: false,
        cancelled: false,
    };
    for event in life_events(&life) {
        assert_eq!(cluster.post(0, &event.body).await.0, 200);
    }
    let account = cluster.store().await.load_account("cus_cache1").await.unwrap().expect("account").id;

    // Replica 1 answers from its cache: the same `as_of` twice, 20 ms apart in wall time.
    let mut cached = None;
    for _ in 0..100 {
        let first = entitlements(&cluster, 1, account).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = entitlements(&cluster, 1, account).await;
        if first["as_of"] == second["as_of"] {
            cached = Some(second);
            break;
        }
    }
    let cached = cached.expect("replica 1 never answered from its cache");
    assert_eq!(cached["tier"], "starter");
    assert!(cached["usage_today"]["as_of"].is_string(), "usage counters say how old they are: {cached}");

    // The upgrade lands on replica 0; replica 1's next answers show it.
    let upgrade = support::subscription_event(
        "evt_cache1_upgrade",
        "customer.subscription.updated",
        now_secs() - 1,
        &life,
        "active",
        PRO,
    );
    assert_eq!(cluster.post(0, &upgrade.body).await.0, 200);
    let started = Instant::now();
    loop {
        let answer = entitlements(&cluster, 1, account).await;
        if answer["tier"] == "professional" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "replica 1 kept answering {answer}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("replica 1 answered the upgrade committed on replica 0 after {:?}", started.elapsed());
}

// ---- unknown outcomes: a provision whose answer never arrived -----------------------------------

/// A starter subscription whose first `POST /provision` creates the app but answers later than
/// `PROVISIONER_TIMEOUT_SECS`; `then` is sent once the provisioner has done the work, before the retry.
/// Returns the stub and the app name, once `done` holds for the stub (a bounded poll).
async fn provision_times_out_then(
    memory_store: bool,
    then: &str,
    done: impl Fn(&support::AppRecord) -> bool,
) -> (StubProvisioner, String) {
    let stub = StubProvisioner::start().await;
    stub.answer_provisions_late(1, Duration::from_secs(6));
    let options = ClusterOptions { replicas: 1, memory_store, ..ClusterOptions::new(&stub, &[STARTER, PRO]) };
    let cluster = Cluster::start(options).await;
    let life = Life {
        sub: format!("sub_late{}", rand::thread_rng().gen_range(1000..9999)),
        customer: "cus_late".into(),
        start: now_secs() - 60,
        first_price: STARTER.into(),
        upgrade_to: Some(PRO.into()),
        payment_failed: false,
        paid_after_failure: false,
        cancelled: true,
    };
    let events = life_events(&life);
    let event = |suffix: &str| events.iter().find(|e| e.id.ends_with(suffix)).unwrap().clone();
    let app = mindroom_billing_core::service::app_name_for(&life.sub);
    assert_eq!(cluster.send_once(&[event("_created")]).await, [200]);
    let started = Instant::now();
    while !stub.apps().get(&app).is_some_and(|a| a.alive) {
        assert!(started.elapsed() < Duration::from_secs(30), "never provisioned: {:?}", stub.calls());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The provisioner did the work; its answer is still on the way (and will come too late).
    assert_eq!(cluster.send_once(&[event(then)]).await, [200]);
    let started = Instant::now();
    while !done(&stub.apps()[&app]) {
        assert!(started.elapsed() < Duration::from_secs(40), "{app} never converged: {:?}", stub.calls());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !memory_store {
        // The record follows the provisioner's answer (e-mail jobs wait for an address meanwhile).
        let store = cluster.store().await;
        let expected = if then == "_deleted" { InstanceStatus::Deprovisioned } else { InstanceStatus::Running };
        let started = Instant::now();
        loop {
            let instance = store.load_instance(&life.sub).await.unwrap();
            if instance.as_ref().is_some_and(|i| i.status == expected) {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "{instance:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    (stub, app)
}

async fn timed_out_provision_then_cancel(memory_store: bool) {
    let (stub, app) = provision_times_out_then(memory_store, "_deleted", |a| !a.alive).await;
    let deletes = stub.calls().iter().filter(|c| c.op == "DELETE /deprovision" && c.app == app).count();
    assert!(deletes >= 1, "{:?}", stub.calls());
    assert!(stub.apps().values().all(|a| !a.alive), "an app is left running: {:?}", stub.apps());
}

async fn timed_out_provision_then_upgrade(memory_store: bool) {
    let pro = support::tier_wire(Tier::Professional);
    let (stub, app) = provision_times_out_then(memory_store, "_updated", |a| a.limits == Some(pro)).await;
    let apps = stub.apps();
    assert!(apps[&app].alive && apps.len() == 1, "{apps:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_provision_is_removed_when_the_customer_cancels_before_the_retry_on_postgres() {
    timed_out_provision_then_cancel(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_provision_is_removed_when_the_customer_cancels_before_the_retry_in_memory() {
    timed_out_provision_then_cancel(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_provision_followed_by_an_upgrade_ends_at_the_upgraded_limits_on_postgres() {
    timed_out_provision_then_upgrade(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_provision_followed_by_an_upgrade_ends_at_the_upgraded_limits_in_memory() {
    timed_out_provision_then_upgrade(true).await;
}
