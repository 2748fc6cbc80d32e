//! Many replicas on one database: unique event ids, job claims, lease expiry, compare-and-swap
//! commits, and events recorded but never committed. Real PostgreSQL, each test its own database.
#![cfg(feature = "test-util")]
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use common::{DAHLIA, DAY, SUB, T0, TestClock, at, fixture, signed};
use mindroom_billing_core::conformance::job;
use mindroom_billing_core::ports::{EventFilter, JobFilter};
use mindroom_billing_core::testing::{HookedStore, StoreHooks};
use mindroom_billing_core::{
    Claim, CommitResult, Disposition, EventStatus, InstanceStatus, JobFinish, JobResolution, NewEvent, NewJob,
    Recorded, Store, StoreError, Tier,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_replicas_record_one_event_exactly_once() {
    let fresh = common::fresh().await;
    let body = fixture(DAHLIA, "customer.subscription.created");
    let payload = std::str::from_utf8(&body).unwrap().to_owned();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let store = common::replica(&fresh.db).await;
        let payload = payload.clone();
        tasks.spawn(async move {
            let event = NewEvent {
                id: "evt_race_8",
                event_type: "customer.subscription.created",
                created: at(T0),
                api_version: Some(DAHLIA),
                livemode: false,
                payload: &payload,
                received_at: at(T0 + 1),
                source: mindroom_billing_core::EventSource::Webhook,
                customer_id: None,
            };
            let r = store.record_event(&event).await.unwrap();
            store.close().await;
            r
        });
    }
    let mut fresh_count = 0;
    while let Some(r) = tasks.join_next().await {
        if r.unwrap() == Recorded::Fresh {
            fresh_count += 1;
        }
    }
    assert_eq!(fresh_count, 1);
    let stored = fresh.store.load_event("evt_race_8").await.unwrap().unwrap();
    assert_eq!((stored.deliveries, stored.payload.as_str()), (8, payload.as_str()));

    // The same through `Billing::receive` on 8 replicas: one applies, the others see duplicates.
    let clock = Arc::new(TestClock::new(at(T0 + 10)));
    let header = signed(&body, at(T0 + 10));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let store = common::replica(&fresh.db).await;
        let billing = common::billing(store as Arc<dyn Store>, Arc::clone(&clock), Tier::Professional);
        let (body, header) = (body.clone(), header.clone());
        tasks.spawn(async move { billing.receive(Some(&header), &body).await.unwrap().disposition });
    }
    let mut dispositions = Vec::new();
    while let Some(r) = tasks.join_next().await {
        dispositions.push(r.unwrap());
    }
    assert_eq!(dispositions.iter().filter(|d| **d == Disposition::Applied).count(), 1, "{dispositions:?}");
    assert_eq!(dispositions.iter().filter(|d| **d == Disposition::Duplicate).count(), 7, "{dispositions:?}");
    let events = fresh.store.list_events(&EventFilter { status: None, limit: 100 }).await.unwrap();
    assert_eq!(events.len(), 2);
    let reconciles = fresh.store.list_jobs(&JobFilter { state: None, limit: 100 }).await.unwrap();
    assert_eq!(reconciles.len(), 1, "one decision, one job: {reconciles:?}");
    fresh.db.drop_db().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_replicas_run_each_of_200_jobs_once_and_groups_in_order() {
    let fresh = common::fresh().await;
    // 100 ungrouped jobs and 10 groups of 10.
    let mut jobs: Vec<NewJob> = (0..100).map(|i| job(&format!("free:{i}"), None, at(T0))).collect();
    for i in 0..10 {
        for g in 0..10 {
            jobs.push(job(&format!("grp:{g}:{i}"), Some(&format!("sub_{g}")), at(T0)));
        }
    }
    fresh.store.enqueue(&jobs).await.unwrap();
    let sequence = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let store = common::replica(&fresh.db).await;
        let sequence = Arc::clone(&sequence);
        tasks.spawn(async move {
            let mut mine = Vec::new();
            let mut idle = 0;
            while idle < 3 {
                let claim = Claim { now: at(T0), lease: Duration::seconds(600), limit: 5 };
                let got = store.claim_jobs(&claim).await.unwrap();
                if got.is_empty() {
                    idle += 1; // groups may still be blocked by another worker's running job
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
                idle = 0;
                // Claimed before finished: the claim order of a group's jobs is this sequence.
                let seqs: Vec<u64> = got.iter().map(|_| sequence.fetch_add(1, Ordering::SeqCst)).collect();
                for (j, seq) in got.into_iter().zip(seqs) {
                    let finish = JobFinish {
                        job_id: j.id,
                        attempt: j.attempts,
                        now: at(T0),
                        resolution: JobResolution::Done,
                        instance: None,
                        enqueue: vec![],
                    };
                    assert!(store.finish_job(&finish).await.unwrap());
                    mine.push((j.key, j.group, j.id, j.attempts, seq));
                }
            }
            store.close().await;
            mine
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r.unwrap());
    }
    let keys: HashSet<&str> = all.iter().map(|(k, ..)| k.as_str()).collect();
    assert_eq!((all.len(), keys.len()), (200, 200), "every job exactly once");
    assert!(all.iter().all(|(_, _, _, attempts, _)| *attempts == 1));
    let counts = fresh.store.job_counts().await.unwrap();
    assert_eq!((counts.done, counts.pending, counts.running), (200, 0, 0));
    // Within a group a job becomes claimable only after the previous one finished, so across all
    // workers the claim order of a group's jobs is their enqueue order.
    let mut by_group: BTreeMap<String, Vec<(u64, i64)>> = BTreeMap::new();
    for (_, group, id, _, seq) in &all {
        if let Some(g) = group {
            by_group.entry(g.clone()).or_default().push((*seq, *id));
        }
    }
    assert_eq!(by_group.len(), 10);
    for (group, mut claims) in by_group {
        claims.sort_unstable();
        assert!(claims.windows(2).all(|w| w[0].1 < w[1].1), "{group} ran out of order: {claims:?}");
    }
    fresh.db.drop_db().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_workers_job_is_run_by_another_after_the_lease() {
    let fresh = common::fresh().await;
    let clock = Arc::new(TestClock::new(at(T0 + 10)));
    let billing = common::billing(fresh.store.clone() as Arc<dyn Store>, Arc::clone(&clock), Tier::Professional);
    let body = fixture(DAHLIA, "customer.subscription.created");
    let receipt = billing.receive(Some(&signed(&body, clock.now_at())), &body).await.unwrap();
    assert_eq!(receipt.disposition, Disposition::Applied);

    // Worker A (another replica) claims the reconcile job, then dies without finishing.
    let worker_a = common::replica(&fresh.db).await;
    let claimed =
        worker_a.claim_jobs(&Claim { now: at(T0 + 10), lease: Duration::seconds(2), limit: 10 }).await.unwrap();
    assert_eq!(claimed.len(), 1);
    worker_a.close().await;

    // Worker B: nothing to do while the lease holds; after it expires it runs the job.
    assert_eq!(billing.run_due_jobs(10).await.unwrap(), 0);
    assert!(fresh.store.load_instance(SUB).await.unwrap().is_none());
    clock.advance(Duration::seconds(3));
    assert!(billing.run_due_jobs(10).await.unwrap() >= 1);
    let instance = fresh.store.load_instance(SUB).await.unwrap().expect("instance");
    assert_eq!(instance.status, InstanceStatus::Running);
    let job = fresh.store.list_jobs(&JobFilter { state: None, limit: 10 }).await.unwrap();
    let reconcile = job.iter().find(|j| j.id == claimed[0].id).unwrap();
    assert_eq!(reconcile.attempts, 2);

    // A late finish from the dead worker's attempt is refused.
    let late = JobFinish {
        job_id: claimed[0].id,
        attempt: claimed[0].attempts,
        now: at(T0 + 20),
        resolution: JobResolution::Dead { error: "zombie".into() },
        instance: None,
        enqueue: vec![],
    };
    assert!(!fresh.store.finish_job(&late).await.unwrap());
    fresh.db.drop_db().await.unwrap();
}

trait NowAt {
    fn now_at(&self) -> DateTime<Utc>;
}

impl NowAt for TestClock {
    fn now_at(&self) -> DateTime<Utc> {
        mindroom_billing_core::Clock::now(self)
    }
}

/// Hooks that make the first `load_subscription` wait for a peer's, so two deciders load the same
/// version and then race their commits; they count lost compare-and-swaps.
struct Racing {
    barrier: Arc<tokio::sync::Barrier>,
    armed: AtomicBool,
    conflicts: Arc<AtomicU32>,
}

#[async_trait]
impl StoreHooks for Racing {
    async fn after_load(&self, _subscription_id: &str) {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.barrier.wait().await;
        }
    }
    async fn after_commit(&self, result: &Result<CommitResult, StoreError>) {
        if matches!(result, Err(StoreError::Conflict(_))) {
            self.conflicts.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commits_on_one_aggregate_both_end_up_applied() {
    let fresh = common::fresh().await;
    let clock = Arc::new(TestClock::new(at(T0 + 30 * DAY + 3_700)));
    let setup = common::billing(fresh.store.clone() as Arc<dyn Store>, Arc::clone(&clock), Tier::Professional);
    let created = fixture(DAHLIA, "customer.subscription.created");
    let now = clock.now_at();
    assert_eq!(setup.receive(Some(&signed(&created, now)), &created).await.unwrap().disposition, Disposition::Applied);

    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let conflicts = Arc::new(AtomicU32::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for name in ["customer.subscription.updated", "invoice.payment_failed"] {
        let hooks =
            Racing { barrier: Arc::clone(&barrier), armed: AtomicBool::new(true), conflicts: Arc::clone(&conflicts) };
        let racing = HookedStore::new(common::replica(&fresh.db).await as Arc<dyn Store>, hooks);
        let billing = common::billing(Arc::new(racing), Arc::clone(&clock), Tier::Professional);
        let body = fixture(DAHLIA, name);
        let header = signed(&body, now);
        tasks.spawn(async move { billing.receive(Some(&header), &body).await.unwrap().disposition });
    }
    while let Some(r) = tasks.join_next().await {
        assert_eq!(r.unwrap(), Disposition::Applied);
    }
    assert_eq!(conflicts.load(Ordering::SeqCst), 1, "exactly one compare-and-swap lost and was retried");
    let state = fresh.store.load_subscription(SUB).await.unwrap().unwrap();
    assert_eq!(state.version, 3);
    assert_eq!(state.tier(), Some(Tier::Professional), "the price change is applied");
    let grace = state.grace.expect("the payment failure is applied");
    assert_eq!(grace.ends_at, at(1_787_595_600) + Duration::days(7));
    fresh.db.drop_db().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_recorded_but_never_committed_is_applied_on_redelivery() {
    let fresh = common::fresh().await;
    let body = fixture(DAHLIA, "customer.subscription.created");
    let payload = std::str::from_utf8(&body).unwrap();
    let event = mindroom_billing_core::parse(&body).unwrap();
    // The process recorded the event, then was killed before committing its decision.
    let recorded = fresh
        .store
        .record_event(&NewEvent {
            id: &event.id,
            event_type: event.event_type.as_str(),
            created: event.created,
            api_version: event.api_version.as_deref(),
            livemode: event.livemode,
            payload,
            received_at: at(T0 + 5),
            source: mindroom_billing_core::EventSource::Webhook,
            customer_id: None,
        })
        .await
        .unwrap();
    assert_eq!(recorded, Recorded::Fresh);
    assert!(fresh.store.load_subscription(SUB).await.unwrap().is_none());

    let clock = Arc::new(TestClock::new(at(T0 + 30)));
    let billing = common::billing(fresh.store.clone() as Arc<dyn Store>, Arc::clone(&clock), Tier::Professional);
    let receipt = billing.receive(Some(&signed(&body, clock.now_at())), &body).await.unwrap();
    assert_eq!(receipt.disposition, Disposition::Applied);
    let stored = fresh.store.load_event(&event.id).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.deliveries), (EventStatus::Applied, 2));
    assert_eq!(stored.payload, payload);
    assert_eq!(fresh.store.load_subscription(SUB).await.unwrap().unwrap().tier(), Some(Tier::Starter));
    // A third delivery is a duplicate.
    let again = billing.receive(Some(&signed(&body, clock.now_at())), &body).await.unwrap();
    assert_eq!(again.disposition, Disposition::Duplicate);
    fresh.db.drop_db().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_picks_up_an_unapplied_event_without_stripe() {
    let fresh = common::fresh().await;
    let body = fixture(DAHLIA, "customer.subscription.created");
    let event = mindroom_billing_core::parse(&body).unwrap();
    fresh
        .store
        .record_event(&NewEvent {
            id: &event.id,
            event_type: event.event_type.as_str(),
            created: event.created,
            api_version: event.api_version.as_deref(),
            livemode: event.livemode,
            payload: std::str::from_utf8(&body).unwrap(),
            received_at: at(T0 + 5),
            source: mindroom_billing_core::EventSource::Webhook,
            customer_id: None,
        })
        .await
        .unwrap();
    let clock = Arc::new(TestClock::new(at(T0 + 5 + 61)));
    let billing = common::billing(fresh.store.clone() as Arc<dyn Store>, clock, Tier::Professional);
    assert_eq!(billing.pick_up_unapplied().await.unwrap(), 1);
    assert_eq!(fresh.store.load_event(&event.id).await.unwrap().unwrap().status, EventStatus::Applied);
    fresh.db.drop_db().await.unwrap();
}
