//! Billing decisions at the edges (issue 10), black box: signed events into a real `mindroom-billing
//! serve` on a fresh PostgreSQL database, side effects read from the recording stub provisioner and
//! the database.
//!
//! Run with `scripts/test.sh` (or `cargo test -p mindroom-billing-examples --test edges`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::time::{Duration, Instant};

use mindroom_billing_core::ports::JobFilter;
use mindroom_billing_core::service::app_name_for;
use mindroom_billing_core::{EventStatus, InstanceStatus, JobKind, Tier};

use support::{Cluster, ClusterOptions, Life, StubProvisioner, invoice_event, now_secs, subscription_event, tier_wire};

const STARTER: &str = "price_edge_starter";
const PRO: &str = "price_edge_pro";
const ENTERPRISE: &str = "price_edge_enterprise";
const DAY: i64 = 86_400;

fn life(sub: &str) -> Life {
    Life::new(sub, format!("cus_{sub}"), now_secs() - 20 * DAY, STARTER)
}

async fn one_replica(stub: &StubProvisioner) -> Cluster {
    let mut options = ClusterOptions::new(stub, &[STARTER, PRO, ENTERPRISE]);
    options.replicas = 1;
    Cluster::start(options).await
}

/// Polls `done` every 100 ms for up to 30 s.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(30), "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn paying_one_invoice_keeps_the_grace_of_another_and_the_instance_goes() {
    let stub = StubProvisioner::start().await;
    let cluster = one_replica(&stub).await;
    let l = life("sub_edge_grace");
    let now = now_secs();
    let (t1, t2, t3) = (now - 10 * DAY, now - 9 * DAY, now - 8 * DAY - DAY / 2);
    let events = [
        subscription_event("evt_g_created", "customer.subscription.created", l.start, &l, "active", STARTER),
        invoice_event("evt_g_fail_a", "invoice.payment_failed", t1, &l, "in_a", "open"),
        invoice_event("evt_g_fail_b", "invoice.payment_failed", t2, &l, "in_b", "open"),
        invoice_event("evt_g_paid_a", "invoice.paid", t3, &l, "in_a", "paid"),
    ];
    let app = app_name_for(&l.sub);
    assert_eq!(cluster.post(0, &events[0].body).await.0, 200);
    eventually("provisioned", || stub.apps().get(&app).is_some_and(|a| a.alive)).await;
    // The rest in order, one by one: the instance must end up removed (B is 9 days unpaid) and stay so.
    for e in &events[1..] {
        assert_eq!(cluster.post(0, &e.body).await.0, 200, "{}", e.id);
    }
    cluster.wait_for_quiet(Duration::from_secs(30)).await;
    let record = &stub.apps()[&app];
    assert!(!record.alive, "paying A must not bring the instance back while B is unpaid: {record:?}");
    assert_eq!((record.provision_keys.len(), record.deprovisions), (1, 1), "{record:?}");
    let state = cluster.store().await.load_subscription(&l.sub).await.unwrap().unwrap();
    assert_eq!(state.grace.unwrap().started_at.timestamp(), t2, "grace from B's failure, not cleared by A's payment");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_update_keeps_the_instance_and_the_next_change_is_one_update() {
    let stub = StubProvisioner::start().await;
    let cluster = one_replica(&stub).await;
    let mut l = life("sub_edge_update");
    l.start = now_secs() - 60;
    let app = app_name_for(&l.sub);
    let created = subscription_event("evt_u_created", "customer.subscription.created", l.start, &l, "active", STARTER);
    let paid = invoice_event("evt_u_paid", "invoice.paid", l.start + 1, &l, "in_u1", "paid");
    for e in [&created, &paid] {
        assert_eq!(cluster.post(0, &e.body).await.0, 200);
    }
    eventually("provisioned", || stub.apps().get(&app).is_some_and(|a| a.alive)).await;

    stub.reject_updates(true);
    let pro = subscription_event("evt_u_pro", "customer.subscription.updated", l.start + 10, &l, "active", PRO);
    assert_eq!(cluster.post(0, &pro.body).await.0, 200);
    let store = cluster.store().await;
    let alerts = || {
        let store = store.clone();
        async move {
            let jobs = store.list_jobs(&JobFilter { state: None, limit: 1000 }).await.unwrap();
            jobs.into_iter()
                .filter_map(|j| match j.kind {
                    JobKind::AdminAlert { subject, .. } => Some(subject),
                    _ => None,
                })
                .collect::<Vec<_>>()
        }
    };
    let started = Instant::now();
    while alerts().await.is_empty() {
        assert!(started.elapsed() < Duration::from_secs(30), "no alert for the rejected update");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let subjects = alerts().await;
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    assert!(subjects[0].contains("PUT /update"), "the alert names the operation: {subjects:?}");
    let instance = store.load_instance(&l.sub).await.unwrap().unwrap();
    assert_eq!((instance.status, instance.tier), (InstanceStatus::Running, Some(Tier::Starter)), "still running");
    assert!(stub.apps()[&app].alive);

    stub.reject_updates(false);
    let before = stub.calls().len();
    let ent = subscription_event("evt_u_ent", "customer.subscription.updated", l.start + 20, &l, "active", ENTERPRISE);
    assert_eq!(cluster.post(0, &ent.body).await.0, 200);
    eventually("enterprise limits", || stub.apps()[&app].limits == Some(tier_wire(Tier::Enterprise))).await;
    cluster.wait_for_quiet(Duration::from_secs(30)).await;
    let after: Vec<_> = stub.calls().into_iter().skip(before).collect();
    assert_eq!(after.len(), 1, "exactly one call after the fix: {after:?}");
    assert_eq!((after[0].op.as_str(), after[0].app.as_str()), ("PUT /update", app.as_str()));
    assert_eq!(after[0].limits, Some(tier_wire(Tier::Enterprise)));
    let provisions = stub.calls().iter().filter(|c| c.op == "POST /provision").count();
    assert_eq!(provisions, 1, "no second POST /provision");
    let keys: Vec<String> = stub.calls().iter().filter(|c| c.op == "PUT /update").map(|c| c.key.clone()).collect();
    assert_eq!(keys.len(), 2);
    assert_ne!(keys[0], keys[1], "a new idempotency key after the dead job");
}

#[tokio::test(flavor = "multi_thread")]
async fn another_app_name_from_the_provisioner_is_refused() {
    let stub = StubProvisioner::start().await;
    stub.answer_app_name(Some("mr-somebody-else"));
    let cluster = one_replica(&stub).await;
    let mut l = life("sub_edge_name");
    l.start = now_secs() - 60;
    let created = subscription_event("evt_n_created", "customer.subscription.created", l.start, &l, "active", STARTER);
    assert_eq!(cluster.post(0, &created.body).await.0, 200);
    let store = cluster.store().await;
    let started = Instant::now();
    let instance = loop {
        // The intent (`provisioning`) is recorded before the call; then what the job made of the answer.
        if let Some(i) = store.load_instance(&l.sub).await.unwrap().filter(|i| i.status != InstanceStatus::Provisioning)
        {
            break i;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "nothing recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(instance.status, InstanceStatus::Failed, "nothing recorded as running");
    assert_eq!(instance.app_name, app_name_for(&l.sub));
    let jobs = store.list_jobs(&JobFilter { state: None, limit: 100 }).await.unwrap();
    let alert = jobs
        .iter()
        .find_map(|j| match &j.kind {
            JobKind::AdminAlert { detail, .. } => Some(detail.clone()),
            _ => None,
        })
        .expect("an admin alert");
    assert!(alert.contains("contract violation") && alert.contains("mr-somebody-else"), "{alert}");
    assert_eq!(stub.calls().iter().filter(|c| c.op == "POST /provision").count(), 1, "not retried");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_verified_event_that_does_not_parse_is_stored_and_answered_200() {
    let stub = StubProvisioner::start().await;
    let cluster = one_replica(&stub).await;
    let mut l = life("sub_edge_zombie");
    l.start = now_secs() - 60;
    let zombie = subscription_event("evt_z", "customer.subscription.updated", l.start, &l, "zombie", STARTER);
    let (status, body) = cluster.post(0, &zombie.body).await;
    assert_eq!(status, 200, "{body}");
    // Stripe redelivers: still 200, still stored once.
    assert_eq!(cluster.post(0, &zombie.body).await.0, 200);
    let store = cluster.store().await;
    let stored = store.load_event("evt_z").await.unwrap().expect("stored, not lost");
    assert_eq!(stored.status, EventStatus::Failed);
    assert_eq!(stored.payload, zombie.body, "byte for byte");
    assert!(stored.reason.unwrap().contains("zombie"));
    let jobs = store.list_jobs(&JobFilter { state: None, limit: 100 }).await.unwrap();
    let alerts = jobs.iter().filter(|j| matches!(j.kind, JobKind::AdminAlert { .. })).count();
    assert_eq!(alerts, 1);
}
