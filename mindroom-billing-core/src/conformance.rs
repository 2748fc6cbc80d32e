//! The store conformance suite (feature `test-util`): every [`Store`] implementation must pass it.
//!
//! ```ignore
//! mindroom_billing_core::conformance::run_all(|| async { Arc::new(MyStore::fresh().await) as Arc<dyn Store> }).await;
//! ```
//! Each check gets a fresh, empty store from the factory.

#![allow(clippy::missing_panics_doc, clippy::unwrap_used)]

use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};

use crate::model::{
    AccountPatch, Claim, Commit, CommitResult, EventStatus, Failure, Grace, InstanceRecord, InstanceStatus, JobFinish,
    JobKind, JobResolution, JobState, NewEvent, NewJob, Outcome, PaidInvoice, Recorded, SubscriptionState, UsageKey,
    UsageRequestKey,
};
use crate::ports::{EventFilter, JobFilter, Store, StoreError};
use crate::retention::{PruneReport, RetentionPolicy};
use crate::tier::{Limit, Metric, Tier};

/// A fixed instant the checks work around.
pub fn t0() -> DateTime<Utc> {
    Utc.timestamp_opt(1_785_000_000, 0).unwrap()
}

/// A `NewEvent` for tests.
pub fn new_event<'a>(id: &'a str, payload: &'a str, received_at: DateTime<Utc>) -> NewEvent<'a> {
    NewEvent {
        id,
        event_type: "customer.subscription.updated",
        created: t0(),
        api_version: Some("2026-07-29.dahlia"),
        livemode: false,
        payload,
        received_at,
        source: crate::model::EventSource::Webhook,
        customer_id: None,
    }
}

/// A job for tests.
pub fn job(key: &str, group: Option<&str>, run_after: DateTime<Utc>) -> NewJob {
    NewJob {
        key: key.to_owned(),
        group: group.map(str::to_owned),
        kind: JobKind::Reconcile { subscription_id: group.unwrap_or("sub_x").to_owned() },
        run_after,
    }
}

fn commit_for(event_id: Option<&str>, subscription: Option<SubscriptionState>, jobs: Vec<NewJob>) -> Commit {
    Commit {
        now: t0(),
        event_id: event_id.map(str::to_owned),
        outcome: Outcome::Applied,
        subscription,
        account: None,
        jobs,
    }
}

/// Runs every check, each on a fresh store from `fresh`.
pub async fn run_all<F, Fut>(fresh: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    record_event_is_idempotent_and_byte_exact(fresh().await).await;
    concurrent_records_yield_one_fresh(fresh().await).await;
    commit_is_compare_and_swap(fresh().await).await;
    commit_marks_event_once(fresh().await).await;
    failed_events_stay_pending(fresh().await).await;
    jobs_dedup_order_and_lease(fresh().await).await;
    concurrent_claimers_run_each_job_once(fresh().await).await;
    finish_job_records_instance_and_dead(fresh().await).await;
    instance_intent_is_fenced_by_the_lease(fresh().await).await;
    usage_is_atomic_and_limited(fresh().await).await;
    usage_idempotency_key_counts_once(fresh().await).await;
    grace_and_unapplied_queries(fresh().await).await;
    accounts_and_listing(fresh().await).await;
    accounts_are_found_by_reference(fresh().await).await;
    record_and_load_returns_the_aggregate(fresh().await).await;
    record_and_commit_is_one_atomic_step(fresh().await).await;
    leases_renew_and_skipped_jobs_keep_their_reason(fresh().await).await;
    retention_prunes_only_old_done_history(fresh().await).await;
    retention_keeps_email_keys_for_stripes_retry_horizon(fresh().await).await;
}

/// `extend_lease` keeps a running job from being taken over and is refused once the lease is lost;
/// a skipped job is stored as done with its reason.
pub async fn leases_renew_and_skipped_jobs_keep_their_reason(store: Arc<dyn Store>) {
    store.enqueue(&[job("slow", None, t0()), job("skip", None, t0())]).await.unwrap();
    let claim = |secs, limit| Claim { now: t0() + Duration::seconds(secs), lease: Duration::seconds(30), limit };
    let slow = store.claim_jobs(&claim(0, 1)).await.unwrap().remove(0);
    assert!(store.extend_lease(slow.id, slow.attempts, t0() + Duration::seconds(90)).await.unwrap());
    let others = store.claim_jobs(&claim(60, 10)).await.unwrap();
    assert_eq!(others.iter().map(|j| j.key.as_str()).collect::<Vec<_>>(), ["skip"], "the renewed lease holds");
    assert!(!store.extend_lease(slow.id, slow.attempts + 1, t0() + Duration::seconds(200)).await.unwrap());
    let taken = store.claim_jobs(&claim(91, 1)).await.unwrap();
    assert_eq!((taken[0].key.as_str(), taken[0].attempts), ("slow", 2), "after it runs out, another worker takes over");
    assert!(!store.extend_lease(slow.id, slow.attempts, t0() + Duration::seconds(300)).await.unwrap(), "lost lease");
    let skipped = JobFinish {
        job_id: others[0].id,
        attempt: others[0].attempts,
        now: t0() + Duration::seconds(61),
        resolution: JobResolution::Skipped { reason: "the invoice was paid".into() },
        instance: None,
        enqueue: vec![],
    };
    assert!(store.finish_job(&skipped).await.unwrap());
    let done = store.list_jobs(&JobFilter { state: Some(JobState::Done), limit: 5 }).await.unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].last_error.as_deref(), Some("skipped: the invoice was paid"));
}

/// `record_and_commit` records a new event with its outcome and commits; a stale expected version
/// commits nothing but keeps the event recorded (pending) and answers the current aggregate; a done
/// event is a duplicate; a pending one is committed.
pub async fn record_and_commit_is_one_atomic_step(store: Arc<dyn Store>) {
    use crate::model::{Expected, RecordedCommit};
    let payload = "{\"id\":\"evt_rc1\",\"note\":\"caf\u{e9} \\u00e9 'quoted'\"}";
    let absent = Some(Expected { subscription_id: "sub_rc", version: 0 });
    let first = commit_for(Some("evt_rc1"), Some(state_of("sub_rc")), vec![job("rc:first", Some("sub_rc"), t0())]);
    let r = store.record_and_commit(&new_event("evt_rc1", payload, t0()), absent, &first).await.unwrap();
    assert_eq!(r, RecordedCommit::Committed);
    let stored = store.load_event("evt_rc1").await.unwrap().expect("recorded");
    assert_eq!((stored.status, stored.payload.as_str(), stored.deliveries), (EventStatus::Applied, payload, 1));
    assert_eq!(store.load_subscription("sub_rc").await.unwrap().map(|s| s.version), Some(1));

    // The same event again: a duplicate, counted, nothing else written.
    let again = commit_for(Some("evt_rc1"), Some(state_of("sub_rc")), vec![job("rc:again", Some("sub_rc"), t0())]);
    let r = store.record_and_commit(&new_event("evt_rc1", payload, t0()), absent, &again).await.unwrap();
    assert_eq!(r, RecordedCommit::Duplicate);
    assert_eq!(store.load_event("evt_rc1").await.unwrap().unwrap().deliveries, 2);

    // Decided on a stale aggregate (absent, but it is at version 1): nothing committed, the event
    // kept as received, the current aggregate answered — also for a decision that writes none.
    let mut stale = commit_for(Some("evt_rc2"), None, vec![job("rc:stale", Some("sub_rc"), t0())]);
    stale.outcome = Outcome::Ignored;
    let r = store.record_and_commit(&new_event("evt_rc2", "{}", t0()), absent, &stale).await.unwrap();
    let RecordedCommit::Conflict(Some(current)) = r else { panic!("expected a conflict with the aggregate: {r:?}") };
    assert_eq!(current.version, 1);
    let pending = store.load_event("evt_rc2").await.unwrap().expect("recorded although not committed");
    assert_eq!((pending.status, pending.processed_at), (EventStatus::Received, None));
    let jobs = store.list_jobs(&JobFilter { state: None, limit: 10 }).await.unwrap();
    assert_eq!(jobs.iter().map(|j| j.key.as_str()).collect::<Vec<_>>(), ["rc:first"], "nothing else written");

    // Decided again on the current aggregate: the pending event is committed.
    let mut next = state_of("sub_rc");
    next.version = 1;
    let mut retry = commit_for(Some("evt_rc2"), Some(next), vec![]);
    retry.outcome = Outcome::Failed("unknown price".into());
    let expected = Some(Expected { subscription_id: "sub_rc", version: 1 });
    let r = store.record_and_commit(&new_event("evt_rc2", "{}", t0()), expected, &retry).await.unwrap();
    assert_eq!(r, RecordedCommit::Committed);
    let failed = store.load_event("evt_rc2").await.unwrap().unwrap();
    assert_eq!((failed.status, failed.reason.as_deref()), (EventStatus::Failed, Some("unknown price")));
    assert_eq!(store.load_subscription("sub_rc").await.unwrap().map(|s| s.version), Some(2));

    // An event about no subscription: recorded with its outcome.
    let mut ignored = commit_for(Some("evt_rc3"), None, vec![]);
    ignored.outcome = Outcome::Ignored;
    let r = store.record_and_commit(&new_event("evt_rc3", "{}", t0()), None, &ignored).await.unwrap();
    assert_eq!(r, RecordedCommit::Committed);
    assert_eq!(store.load_event("evt_rc3").await.unwrap().unwrap().status, EventStatus::Ignored);
}

/// `record_and_load` records like `record_event` and hands back the aggregate unless the event is done.
pub async fn record_and_load_returns_the_aggregate(store: Arc<dyn Store>) {
    let (recorded, state) = store.record_and_load(&new_event("evt_rl", "{}", t0()), Some("sub_rl")).await.unwrap();
    assert_eq!((recorded, state), (Recorded::Fresh, None), "unknown subscription: no aggregate");
    store.commit(&commit_for(Some("evt_rl"), Some(state_of("sub_rl")), vec![])).await.unwrap();
    let (recorded, state) = store.record_and_load(&new_event("evt_rl2", "{}", t0()), Some("sub_rl")).await.unwrap();
    assert_eq!(recorded, Recorded::Fresh);
    let state = state.expect("the aggregate is loaded with the record");
    assert_eq!((state.subscription_id.as_str(), state.version), ("sub_rl", 1));
    let (recorded, state) = store.record_and_load(&new_event("evt_rl2", "{}", t0()), None).await.unwrap();
    assert_eq!((recorded, state), (Recorded::Pending(EventStatus::Received), None), "no subscription asked");
    let (recorded, state) = store.record_and_load(&new_event("evt_rl", "{}", t0()), Some("sub_rl")).await.unwrap();
    assert_eq!((recorded, state), (Recorded::Done(EventStatus::Applied), None), "a duplicate loads nothing");
    assert_eq!(store.load_event("evt_rl").await.unwrap().unwrap().deliveries, 2);
}

fn state_of(id: &str) -> SubscriptionState {
    state(id)
}

/// Recording twice stores one event, keeps the bytes exactly and reports the second as pending.
pub async fn record_event_is_idempotent_and_byte_exact(store: Arc<dyn Store>) {
    // Key order, whitespace and unicode escapes must survive (jsonb would reorder them).
    let payload = "{\"z\":1,  \"a\":\"\\u00e9\u{e9}\",\n\"n\":12345678901234567890}\n";
    let first = store.record_event(&new_event("evt_a", payload, t0())).await.unwrap();
    assert_eq!(first, Recorded::Fresh);
    let again = store.record_event(&new_event("evt_a", "{}", t0())).await.unwrap();
    assert_eq!(again, Recorded::Pending(EventStatus::Received));
    let stored = store.load_event("evt_a").await.unwrap().expect("stored");
    assert_eq!(stored.payload, payload, "payload must be byte-exact");
    assert_eq!(stored.status, EventStatus::Received);
    assert_eq!(stored.deliveries, 2);
    assert!(store.load_event("evt_missing").await.unwrap().is_none());
}

/// Many concurrent recorders of one id: exactly one gets `Fresh`.
pub async fn concurrent_records_yield_one_fresh(store: Arc<dyn Store>) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let store = Arc::clone(&store);
        tasks.spawn(async move { store.record_event(&new_event("evt_race", "{}", t0())).await.unwrap() });
    }
    let mut fresh = 0;
    while let Some(r) = tasks.join_next().await {
        if r.unwrap() == Recorded::Fresh {
            fresh += 1;
        }
    }
    assert_eq!(fresh, 1);
}

fn state(id: &str) -> SubscriptionState {
    SubscriptionState::new(id, "cus_1")
}

/// Commits are compare-and-swap on the version.
pub async fn commit_is_compare_and_swap(store: Arc<dyn Store>) {
    assert_eq!(store.commit(&commit_for(None, Some(state("sub_1")), vec![])).await.unwrap(), CommitResult::Committed);
    let loaded = store.load_subscription("sub_1").await.unwrap().expect("stored");
    assert_eq!(loaded.version, 1);
    // A second "create" loses.
    let lost = store.commit(&commit_for(None, Some(state("sub_1")), vec![job("j_lost", None, t0())])).await;
    assert!(matches!(lost, Err(StoreError::Conflict(_))), "{lost:?}");
    // Nothing of the losing commit was written.
    assert!(store.list_jobs(&JobFilter { state: None, limit: 10 }).await.unwrap().is_empty());
    // Two writers from version 1: one wins.
    let mut a = loaded.clone();
    a.grace_expiry_handled = true;
    let b = loaded.clone();
    let (ca, cb) = (commit_for(None, Some(a), vec![]), commit_for(None, Some(b), vec![]));
    let (ra, rb) = tokio::join!(store.commit(&ca), store.commit(&cb));
    assert_eq!(usize::from(ra.is_ok()) + usize::from(rb.is_ok()), 1, "{ra:?} {rb:?}");
    let after = store.load_subscription("sub_1").await.unwrap().unwrap();
    assert_eq!(after.version, 2);
    // Round trip of every field.
    let mut full = after.clone();
    full.failures = vec![
        Failure { at: t0() + Duration::seconds(5), invoice_id: Some("in_b".into()) },
        Failure { at: t0() + Duration::seconds(6), invoice_id: None },
    ];
    full.paid_invoices = vec![PaidInvoice { invoice_id: "in_a".into(), at: t0() + Duration::seconds(4) }];
    full.last_payment_at = Some(t0() + Duration::seconds(4));
    full.good_standing_at = Some(t0());
    full.grace = Some(Grace { started_at: t0() + Duration::seconds(5), ends_at: t0() + Duration::days(7) });
    store.commit(&commit_for(None, Some(full.clone()), vec![])).await.unwrap();
    let mut expected = full;
    expected.version = 3;
    assert_eq!(store.load_subscription("sub_1").await.unwrap().unwrap(), expected);
}

/// The event is marked in the same commit; a second commit for a done event writes nothing.
pub async fn commit_marks_event_once(store: Arc<dyn Store>) {
    store.record_event(&new_event("evt_1", "{}", t0())).await.unwrap();
    let first =
        commit_for(Some("evt_1"), Some(state("sub_1")), vec![job("reconcile:sub_1:evt_1", Some("sub_1"), t0())]);
    assert_eq!(store.commit(&first).await.unwrap(), CommitResult::Committed);
    let mut second = commit_for(Some("evt_1"), None, vec![job("other", None, t0())]);
    second.outcome = Outcome::Stale;
    assert_eq!(store.commit(&second).await.unwrap(), CommitResult::AlreadyDone);
    let jobs = store.list_jobs(&JobFilter { state: None, limit: 10 }).await.unwrap();
    assert_eq!(jobs.len(), 1, "the duplicate's jobs must not be enqueued");
    let stored = store.load_event("evt_1").await.unwrap().unwrap();
    assert_eq!(stored.status, EventStatus::Applied);
    assert!(stored.processed_at.is_some());
    assert_eq!(
        store.record_event(&new_event("evt_1", "{}", t0())).await.unwrap(),
        Recorded::Done(EventStatus::Applied)
    );
}

/// A failed event keeps its reason and can be applied later.
pub async fn failed_events_stay_pending(store: Arc<dyn Store>) {
    store.record_event(&new_event("evt_f", "{}", t0())).await.unwrap();
    let mut failed = commit_for(Some("evt_f"), None, vec![job("alert:x", None, t0())]);
    failed.outcome = Outcome::Failed("unknown price price_x".into());
    store.commit(&failed).await.unwrap();
    let stored = store.load_event("evt_f").await.unwrap().unwrap();
    assert_eq!((stored.status, stored.reason.as_deref()), (EventStatus::Failed, Some("unknown price price_x")));
    assert_eq!(
        store.record_event(&new_event("evt_f", "{}", t0())).await.unwrap(),
        Recorded::Pending(EventStatus::Failed)
    );
    let listed = store.list_events(&EventFilter { status: Some(EventStatus::Failed), limit: 10 }).await.unwrap();
    assert_eq!(listed.len(), 1);
    // Replayed after the fix: applied.
    assert_eq!(store.commit(&commit_for(Some("evt_f"), None, vec![])).await.unwrap(), CommitResult::Committed);
    assert_eq!(store.load_event("evt_f").await.unwrap().unwrap().status, EventStatus::Applied);
}

/// Keys deduplicate; `run_after`, group order and leases are honoured.
pub async fn jobs_dedup_order_and_lease(store: Arc<dyn Store>) {
    let lease = Duration::seconds(30);
    store
        .enqueue(&[
            job("g1", Some("sub_a"), t0()),
            job("g2", Some("sub_a"), t0()),
            job("later", None, t0() + Duration::seconds(100)),
            job("g1", Some("sub_a"), t0()),
        ])
        .await
        .unwrap();
    assert_eq!(store.list_jobs(&JobFilter { state: None, limit: 10 }).await.unwrap().len(), 3, "keys deduplicate");
    let claim = |now, limit| Claim { now, lease, limit };
    let first = store.claim_jobs(&claim(t0(), 10)).await.unwrap();
    assert_eq!(first.iter().map(|j| j.key.as_str()).collect::<Vec<_>>(), ["g1"], "g2 waits for g1; later is not due");
    assert_eq!((first[0].attempts, first[0].state), (1, JobState::Running));
    assert!(store.claim_jobs(&claim(t0() + Duration::seconds(1), 10)).await.unwrap().is_empty(), "lease holds");
    // The lease expires: another worker takes g1 over; the first worker's finish is refused.
    let again = store.claim_jobs(&claim(t0() + Duration::seconds(31), 1)).await.unwrap();
    assert_eq!((again[0].key.as_str(), again[0].attempts), ("g1", 2));
    let finish = |job_id, attempt, resolution| JobFinish {
        job_id,
        attempt,
        now: t0() + Duration::seconds(32),
        resolution,
        instance: None,
        enqueue: vec![],
    };
    assert!(!store.finish_job(&finish(first[0].id, 1, JobResolution::Done)).await.unwrap(), "stale lease refused");
    let retry = JobResolution::Retry { run_after: t0() + Duration::seconds(60), error: "boom".into() };
    assert!(store.finish_job(&finish(again[0].id, 2, retry)).await.unwrap());
    assert!(
        store.claim_jobs(&claim(t0() + Duration::seconds(40), 10)).await.unwrap().is_empty(),
        "g1 backs off, g2 waits"
    );
    let g1 = store.claim_jobs(&claim(t0() + Duration::seconds(61), 10)).await.unwrap();
    assert_eq!(g1.iter().map(|j| (j.key.as_str(), j.attempts)).collect::<Vec<_>>(), [("g1", 3)]);
    assert!(store.finish_job(&finish(g1[0].id, 3, JobResolution::Done)).await.unwrap());
    let rest = store.claim_jobs(&claim(t0() + Duration::seconds(200), 10)).await.unwrap();
    let mut keys: Vec<&str> = rest.iter().map(|j| j.key.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["g2", "later"]);
    let g1_stored = store.list_jobs(&JobFilter { state: Some(JobState::Done), limit: 10 }).await.unwrap();
    assert_eq!((g1_stored.len(), g1_stored[0].last_error.as_deref()), (1, Some("boom")));
}

/// Four claimers over 200 jobs: each job is claimed exactly once.
pub async fn concurrent_claimers_run_each_job_once(store: Arc<dyn Store>) {
    let jobs: Vec<NewJob> = (0..200).map(|i| job(&format!("bulk:{i}"), None, t0())).collect();
    store.enqueue(&jobs).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let store = Arc::clone(&store);
        tasks.spawn(async move {
            let mut mine = Vec::new();
            loop {
                let claim = Claim { now: t0(), lease: Duration::seconds(600), limit: 7 };
                let got = store.claim_jobs(&claim).await.unwrap();
                if got.is_empty() {
                    break mine;
                }
                for j in got {
                    let finish = JobFinish {
                        job_id: j.id,
                        attempt: j.attempts,
                        now: t0(),
                        resolution: JobResolution::Done,
                        instance: None,
                        enqueue: vec![],
                    };
                    assert!(store.finish_job(&finish).await.unwrap());
                    mine.push(j.key);
                }
            }
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r.unwrap());
    }
    all.sort();
    let before = all.len();
    all.dedup();
    assert_eq!((before, all.len()), (200, 200), "every job exactly once");
    let counts = store.job_counts().await.unwrap();
    assert_eq!((counts.done, counts.pending, counts.running), (200, 0, 0));
}

/// `finish_job` stores the instance and follow-up jobs atomically; dead jobs stay dead.
pub async fn finish_job_records_instance_and_dead(store: Arc<dyn Store>) {
    store.enqueue(&[job("r1", Some("sub_i"), t0())]).await.unwrap();
    let claimed = store.claim_jobs(&Claim { now: t0(), lease: Duration::seconds(30), limit: 1 }).await.unwrap();
    let instance = InstanceRecord {
        subscription_id: "sub_i".into(),
        app_name: "mr-i".into(),
        status: InstanceStatus::Failed,
        generation: 2,
        tier: Some(Tier::Enterprise),
        limits: Some(Tier::Enterprise.limits()),
        subdomain: Some("mr-i.example".into()),
        frontend_url: Some("https://mr-i.example".into()),
        backend_url: None,
        deprovisioned_at: None,
        updated_at: t0(),
        adopted: false,
    };
    let finish = JobFinish {
        job_id: claimed[0].id,
        attempt: claimed[0].attempts,
        now: t0(),
        resolution: JobResolution::Dead { error: "gave up".into() },
        instance: Some(instance.clone()),
        enqueue: vec![job("alert:dead", None, t0())],
    };
    assert!(store.finish_job(&finish).await.unwrap());
    assert_eq!(store.load_instance("sub_i").await.unwrap(), Some(instance));
    let counts = store.job_counts().await.unwrap();
    assert_eq!((counts.dead, counts.pending), (1, 1));
    let dead = store.list_jobs(&JobFilter { state: Some(JobState::Dead), limit: 5 }).await.unwrap();
    assert_eq!(dead[0].last_error.as_deref(), Some("gave up"));
}

/// `record_instance_intent` stores the instance of a job still running at its attempt, leaves the
/// job running, and writes nothing once the lease was lost; `finish_job` then replaces the intent.
pub async fn instance_intent_is_fenced_by_the_lease(store: Arc<dyn Store>) {
    store.enqueue(&[job("r-intent", Some("sub_intent"), t0())]).await.unwrap();
    let claim = |secs| Claim { now: t0() + Duration::seconds(secs), lease: Duration::seconds(30), limit: 1 };
    let first = store.claim_jobs(&claim(0)).await.unwrap().remove(0);
    let intent = InstanceRecord {
        subscription_id: "sub_intent".into(),
        app_name: "mr-intent".into(),
        status: InstanceStatus::Provisioning,
        generation: 1,
        tier: Some(Tier::Professional),
        limits: None,
        subdomain: None,
        frontend_url: None,
        backend_url: None,
        deprovisioned_at: None,
        updated_at: t0(),
        adopted: true,
    };
    assert!(store.record_instance_intent(first.id, first.attempts, &intent).await.unwrap());
    assert_eq!(store.load_instance("sub_intent").await.unwrap(), Some(intent.clone()), "stored as written");
    assert_eq!(store.job_counts().await.unwrap().running, 1, "the job still runs");

    // The lease runs out and another worker takes the job: the first worker's intent is refused.
    let second = store.claim_jobs(&claim(31)).await.unwrap().remove(0);
    assert_eq!((second.id, second.attempts), (first.id, first.attempts + 1));
    let stale = InstanceRecord {
        status: InstanceStatus::Deprovisioning,
        updated_at: t0() + Duration::seconds(32),
        ..intent.clone()
    };
    assert!(!store.record_instance_intent(first.id, first.attempts, &stale).await.unwrap(), "lost lease");
    assert_eq!(store.load_instance("sub_intent").await.unwrap(), Some(intent.clone()), "nothing written");

    let running = InstanceRecord {
        status: InstanceStatus::Running,
        limits: Some(Tier::Professional.limits()),
        updated_at: t0() + Duration::seconds(40),
        ..intent
    };
    let finish = JobFinish {
        job_id: second.id,
        attempt: second.attempts,
        now: t0() + Duration::seconds(40),
        resolution: JobResolution::Done,
        instance: Some(running.clone()),
        enqueue: Vec::new(),
    };
    assert!(store.finish_job(&finish).await.unwrap());
    assert_eq!(store.load_instance("sub_intent").await.unwrap(), Some(running));
    assert!(!store.record_instance_intent(second.id, second.attempts, &stale).await.unwrap(), "a finished job");
}

/// Conditional increments are atomic and respect the limit; unlimited never refuses.
pub async fn usage_is_atomic_and_limited(store: Arc<dyn Store>) {
    let key = UsageKey {
        account_id: crate::model::account_id_for_customer("cus_u"),
        metric: Metric::Messages,
        day: t0().date_naive(),
    };
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let store = Arc::clone(&store);
        tasks.spawn(async move { store.consume_usage(key, 1, Limit::Limited(15), None).await.unwrap().allowed });
    }
    let mut allowed = 0;
    while let Some(r) = tasks.join_next().await {
        allowed += usize::from(r.unwrap());
    }
    assert_eq!(allowed, 15);
    assert_eq!(store.usage(key).await.unwrap(), 15);
    let refused = store.consume_usage(key, 1, Limit::Limited(15), None).await.unwrap();
    assert_eq!((refused.allowed, refused.used), (false, 15));
    let other_day = UsageKey { day: key.day.succ_opt().unwrap(), ..key };
    assert_eq!(store.usage(other_day).await.unwrap(), 0);
    let big = store.consume_usage(other_day, 1_000_000, Limit::Unlimited, None).await.unwrap();
    assert_eq!((big.allowed, big.used), (true, 1_000_000));
}

/// A call retried with its idempotency key counts once and answers what the first call answered,
/// also when the retries run concurrently and across midnight; the key is per account and metric and
/// is remembered for 48 hours; a refused call counted nothing, so its retry is decided again.
pub async fn usage_idempotency_key_counts_once(store: Arc<dyn Store>) {
    let key = UsageKey {
        account_id: crate::model::account_id_for_customer("cus_k"),
        metric: Metric::Messages,
        day: t0().date_naive(),
    };
    let at = |id, hours| Some(UsageRequestKey { key: id, at: t0() + Duration::hours(hours) });
    let first = store.consume_usage(key, 4, Limit::Limited(10), at("req-1", 0)).await.unwrap();
    assert_eq!((first.allowed, first.used), (true, 4));
    store.consume_usage(key, 1, Limit::Limited(10), None).await.unwrap();
    let retried = store.consume_usage(key, 4, Limit::Limited(10), at("req-1", 1)).await.unwrap();
    assert_eq!(retried, first, "the first answer, nothing counted");
    assert_eq!(store.usage(key).await.unwrap(), 5);

    let refused = store.consume_usage(key, 6, Limit::Limited(10), at("req-2", 1)).await.unwrap();
    assert_eq!((refused.allowed, refused.used), (false, 5));
    let decided_again = store.consume_usage(key, 6, Limit::Limited(20), at("req-2", 1)).await.unwrap();
    assert_eq!((decided_again.allowed, decided_again.used), (true, 11));

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let store = Arc::clone(&store);
        tasks.spawn(async move { store.consume_usage(key, 2, Limit::Unlimited, at("req-3", 2)).await.unwrap() });
    }
    while let Some(r) = tasks.join_next().await {
        assert_eq!((r.unwrap().allowed, store.usage(key).await.unwrap() >= 13), (true, true));
    }
    assert_eq!(store.usage(key).await.unwrap(), 13, "eight concurrent retries counted once");

    // A retry the next UTC day, within 48 hours, counts nothing (on either day).
    let next_day = UsageKey { day: key.day.succ_opt().unwrap(), ..key };
    assert_eq!(store.consume_usage(next_day, 3, Limit::Unlimited, at("req-1", 30)).await.unwrap(), first);
    assert_eq!((store.usage(key).await.unwrap(), store.usage(next_day).await.unwrap()), (13, 0));
    let other_account = UsageKey { account_id: crate::model::account_id_for_customer("cus_k2"), ..key };
    assert_eq!(store.consume_usage(other_account, 3, Limit::Unlimited, at("req-1", 1)).await.unwrap().used, 3);
    let api_calls = UsageKey { metric: Metric::ApiCalls, ..key };
    let same_key = store.consume_usage(api_calls, 3, Limit::Unlimited, at("req-1", 1)).await.unwrap();
    assert_eq!((same_key.used, store.usage(api_calls).await.unwrap()), (3, 3), "another metric counts on its own");
    // After 48 hours the key is forgotten: the same key is a new call.
    let later = UsageKey { day: next_day.day.succ_opt().unwrap(), ..key };
    assert_eq!(store.consume_usage(later, 2, Limit::Unlimited, at("req-1", 48)).await.unwrap().used, 2);
}

/// The sweeper's and the pick-up's queries.
pub async fn grace_and_unapplied_queries(store: Arc<dyn Store>) {
    let mut s = state("sub_g");
    s.grace = Some(Grace { started_at: t0(), ends_at: t0() + Duration::days(7) });
    store.commit(&commit_for(None, Some(s), vec![])).await.unwrap();
    assert!(store.expired_grace(t0() + Duration::days(6), 10).await.unwrap().is_empty());
    assert_eq!(store.expired_grace(t0() + Duration::days(7), 10).await.unwrap(), ["sub_g"]);
    let mut handled = store.load_subscription("sub_g").await.unwrap().unwrap();
    handled.grace_expiry_handled = true;
    store.commit(&commit_for(None, Some(handled), vec![])).await.unwrap();
    assert!(store.expired_grace(t0() + Duration::days(8), 10).await.unwrap().is_empty());

    store.record_event(&new_event("evt_old", "{}", t0())).await.unwrap();
    store.record_event(&new_event("evt_new", "{}", t0() + Duration::seconds(100))).await.unwrap();
    store.record_event(&new_event("evt_done", "{}", t0())).await.unwrap();
    store.commit(&commit_for(Some("evt_done"), None, vec![])).await.unwrap();
    let stale = store.unapplied_events(t0() + Duration::seconds(50), 10).await.unwrap();
    assert_eq!(stale.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["evt_old"]);
}

/// Account patches merge; subscriptions are found by account.
pub async fn accounts_and_listing(store: Arc<dyn Store>) {
    let patch_at = |email: Option<&str>, reference: Option<&str>, secs: i64| {
        let mut c = commit_for(None, None, vec![]);
        c.account = Some(AccountPatch {
            stripe_customer_id: "cus_1".into(),
            email: email.map(Into::into),
            reference: reference.map(Into::into),
            observed_at: t0() + Duration::seconds(secs),
        });
        c
    };
    store.commit(&patch_at(Some("a@example.com"), Some("user_1"), 10)).await.unwrap();
    store.commit(&patch_at(None, None, 20)).await.unwrap();
    let account = store.load_account("cus_1").await.unwrap().expect("account");
    assert_eq!((account.email.as_deref(), account.reference.as_deref()), (Some("a@example.com"), Some("user_1")));
    // The e-mail of the newest fact by `created` wins, whatever the processing order.
    store.commit(&patch_at(Some("old@example.com"), None, 5)).await.unwrap();
    let account = store.load_account("cus_1").await.unwrap().expect("account");
    assert_eq!(account.email.as_deref(), Some("a@example.com"), "an older fact does not overwrite a newer e-mail");
    store.commit(&patch_at(Some("new@example.com"), None, 30)).await.unwrap();
    let account = store.load_account("cus_1").await.unwrap().expect("account");
    assert_eq!(account.email.as_deref(), Some("new@example.com"), "a newer fact does");
    assert_eq!(account.id, crate::model::account_id_for_customer("cus_1"));
    store.commit(&commit_for(None, Some(state("sub_1")), vec![])).await.unwrap();
    store.commit(&commit_for(None, Some(state("sub_2")), vec![])).await.unwrap();
    let mut subs: Vec<String> =
        store.subscriptions_for_account(account.id).await.unwrap().into_iter().map(|s| s.subscription_id).collect();
    subs.sort();
    assert_eq!(subs, ["sub_1", "sub_2"]);
    assert!(store.load_account("cus_none").await.unwrap().is_none());
    store.ping().await.unwrap();
}

/// Accounts are found by their platform reference: exactly, ordered by customer, bounded; a new
/// reference replaces the old one.
pub async fn accounts_are_found_by_reference(store: Arc<dyn Store>) {
    let patch = |customer: &str, reference: Option<&str>| {
        let mut c = commit_for(None, None, vec![]);
        c.account = Some(AccountPatch {
            stripe_customer_id: customer.into(),
            email: None,
            reference: reference.map(Into::into),
            observed_at: t0(),
        });
        c
    };
    for (customer, reference) in
        [("cus_b", Some("user_2")), ("cus_a", Some("user_2")), ("cus_c", Some("user_1")), ("cus_d", None)]
    {
        store.commit(&patch(customer, reference)).await.unwrap();
    }
    let customers =
        |accounts: Vec<crate::model::Account>| accounts.into_iter().map(|a| a.stripe_customer_id).collect::<Vec<_>>();
    assert_eq!(customers(store.accounts_by_reference("user_1", 10).await.unwrap()), ["cus_c"]);
    assert_eq!(customers(store.accounts_by_reference("user_2", 10).await.unwrap()), ["cus_a", "cus_b"]);
    assert_eq!(customers(store.accounts_by_reference("user_2", 1).await.unwrap()), ["cus_a"]);
    let found = store.accounts_by_reference("user_1", 10).await.unwrap();
    assert_eq!(found[0].id, crate::model::account_id_for_customer("cus_c"));
    assert_eq!(found[0].reference.as_deref(), Some("user_1"));
    for nobody in ["user_3", "USER_1", "user_", ""] {
        assert!(store.accounts_by_reference(nobody, 10).await.unwrap().is_empty(), "{nobody:?}");
    }
    // A patch without a reference keeps it; a new one replaces it.
    store.commit(&patch("cus_c", None)).await.unwrap();
    assert_eq!(customers(store.accounts_by_reference("user_1", 10).await.unwrap()), ["cus_c"]);
    store.commit(&patch("cus_c", Some("user_9"))).await.unwrap();
    assert!(store.accounts_by_reference("user_1", 10).await.unwrap().is_empty());
    assert_eq!(customers(store.accounts_by_reference("user_9", 10).await.unwrap()), ["cus_c"]);
}

/// Retention prunes done events and done jobs past their cut-offs, in batches, and nothing else: a
/// failed or received event and pending, running and dead jobs stay whatever their age; an event inside
/// the window keeps its payload; an event past the payload cut-off but inside the id horizon keeps its
/// row (a redelivery is still a duplicate); a dry run counts everything and changes nothing.
pub async fn retention_prunes_only_old_done_history(store: Arc<dyn Store>) {
    let now = t0();
    let days = |d: i64| now - Duration::days(d);
    // Retention 15 days: payloads go after 15 days, event ids only after 30.
    let policy = RetentionPolicy::default().with_retention(Duration::days(15)).with_batch(2);
    let done = |id: &'static str, received: DateTime<Utc>| {
        let store = Arc::clone(&store);
        async move {
            store.record_event(&new_event(id, id, received)).await.unwrap();
            store.commit(&commit_for(Some(id), None, vec![])).await.unwrap();
        }
    };
    for id in ["evt_old_1", "evt_old_2", "evt_old_3"] {
        done(id, days(500)).await;
    }
    done("evt_mid", days(20)).await;
    done("evt_recent", days(10)).await;
    store.record_event(&new_event("evt_old_failed", "failed payload", days(500))).await.unwrap();
    let mut failed = commit_for(Some("evt_old_failed"), None, vec![]);
    failed.outcome = Outcome::Failed("unknown price".into());
    store.commit(&failed).await.unwrap();
    store.record_event(&new_event("evt_old_received", "received payload", days(500))).await.unwrap();

    // Jobs, each enqueued (and so created) at its `run_after`, claimed one at a time.
    let run = |key: &'static str, at: DateTime<Utc>, resolution: Option<JobResolution>| {
        let store = Arc::clone(&store);
        async move {
            store.enqueue(&[job(key, None, at)]).await.unwrap();
            let Some(resolution) = resolution else { return };
            let claimed = store.claim_jobs(&Claim { now: at, lease: Duration::seconds(30), limit: 1 }).await.unwrap();
            assert_eq!(claimed[0].key, key);
            let finish = |resolution| JobFinish {
                job_id: claimed[0].id,
                attempt: claimed[0].attempts,
                now: at + Duration::seconds(1),
                resolution,
                instance: None,
                enqueue: vec![],
            };
            match resolution {
                JobResolution::Retry { .. } => {} // stays running
                other => assert!(store.finish_job(&finish(other)).await.unwrap()),
            }
        }
    };
    run("job_old_done", days(500), Some(JobResolution::Done)).await;
    run("job_old_dead", days(500), Some(JobResolution::Dead { error: "gave up".into() })).await;
    run("job_recent_done", days(10), Some(JobResolution::Done)).await;
    run("job_old_running", days(500), Some(JobResolution::Retry { run_after: now, error: String::new() })).await;
    run("job_old_pending", days(500), None).await;

    let dry = store.prune(&policy.request(now, true)).await.unwrap();
    assert_eq!(dry, PruneReport { events: 3, payloads: 1, jobs: 1 }, "a dry run counts all, ignoring the batch");
    assert_eq!(store.prune(&policy.request(now, true)).await.unwrap(), dry, "and changes nothing");
    assert_eq!(store.load_event("evt_old_1").await.unwrap().unwrap().payload, "evt_old_1");
    assert_eq!(store.load_event("evt_mid").await.unwrap().unwrap().payload, "evt_mid");

    let first = store.prune(&policy.request(now, false)).await.unwrap();
    assert_eq!(first, PruneReport { events: 2, payloads: 1, jobs: 1 }, "at most a batch of each kind");
    assert!(!first.exhausted(2));
    let second = store.prune(&policy.request(now, false)).await.unwrap();
    assert_eq!(second, PruneReport { events: 1, payloads: 0, jobs: 0 });
    assert_eq!(store.prune(&policy.request(now, false)).await.unwrap(), PruneReport::default());
    assert_eq!(store.prune(&policy.request(now, true)).await.unwrap(), PruneReport::default());

    for id in ["evt_old_1", "evt_old_2", "evt_old_3"] {
        assert!(store.load_event(id).await.unwrap().is_none(), "{id} is past both cut-offs");
    }
    let failed = store.load_event("evt_old_failed").await.unwrap().expect("failed events are never pruned");
    assert_eq!((failed.status, failed.payload.as_str()), (EventStatus::Failed, "failed payload"));
    let received = store.load_event("evt_old_received").await.unwrap().expect("received events are never pruned");
    assert_eq!(received.payload, "received payload");
    let unapplied = store.unapplied_events(now, 10).await.unwrap();
    assert_eq!(unapplied.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["evt_old_received"]);
    assert_eq!(store.load_event("evt_recent").await.unwrap().unwrap().payload, "evt_recent", "inside the window");
    let mid = store.load_event("evt_mid").await.unwrap().expect("the id row stays for 30 days");
    assert_eq!((mid.status, mid.payload.as_str()), (EventStatus::Applied, ""), "its payload is pruned");
    assert_eq!(
        store.record_event(&new_event("evt_mid", "evt_mid", now)).await.unwrap(),
        Recorded::Done(EventStatus::Applied),
        "a redelivery of a pruned-payload event is still a duplicate"
    );
    let mut jobs: Vec<(String, &str)> = store
        .list_jobs(&JobFilter { state: None, limit: 10 })
        .await
        .unwrap()
        .into_iter()
        .map(|j| (j.key, j.state.as_str()))
        .collect();
    jobs.sort();
    let expected = [
        ("job_old_dead", "dead"),
        ("job_old_pending", "pending"),
        ("job_old_running", "running"),
        ("job_recent_done", "done"),
    ];
    assert_eq!(jobs, expected.map(|(k, s)| (k.to_owned(), s)), "only the old done job is pruned");
}

/// A done e-mail job's key is the only de-duplication of its e-mail (the e-mail provider's lasts a
/// day): whatever the retention, it is kept until Stripe can no longer deliver or list the fact
/// again (35 days), while other done jobs go at the retention.
pub async fn retention_keeps_email_keys_for_stripes_retry_horizon(store: Arc<dyn Store>) {
    let now = t0();
    let policy = RetentionPolicy::default().with_retention(Duration::days(1));
    let email = |key: &str, at: DateTime<Utc>| NewJob {
        key: key.to_owned(),
        group: None,
        kind: JobKind::Email {
            customer_id: "cus_r".into(),
            subscription_id: Some("sub_r".into()),
            email: crate::model::EmailKind::Cancellation,
            late: None,
        },
        run_after: at,
    };
    let jobs = [
        email("email:recent", now - Duration::days(3)),
        email("email:old", now - Duration::days(40)),
        job("reconcile:recent", Some("sub_r"), now - Duration::days(3)),
    ];
    for new in &jobs {
        store.enqueue(std::slice::from_ref(new)).await.unwrap();
        let claimed =
            store.claim_jobs(&Claim { now: new.run_after, lease: Duration::seconds(30), limit: 1 }).await.unwrap();
        let finish = JobFinish {
            job_id: claimed[0].id,
            attempt: claimed[0].attempts,
            now: new.run_after,
            resolution: JobResolution::Done,
            instance: None,
            enqueue: vec![],
        };
        assert!(store.finish_job(&finish).await.unwrap());
    }
    let dry = store.prune(&policy.request(now, true)).await.unwrap();
    assert_eq!(dry.jobs, 2, "the 3-day-old reconcile job and the 40-day-old e-mail");
    assert_eq!(store.prune(&policy.request(now, false)).await.unwrap().jobs, 2);
    let left: Vec<String> =
        store.list_jobs(&JobFilter { state: None, limit: 10 }).await.unwrap().into_iter().map(|j| j.key).collect();
    assert_eq!(left, ["email:recent"], "the e-mail key inside 35 days stays");
    // Stripe delivers the fact again: the e-mail is not queued a second time.
    store.enqueue(&[email("email:recent", now)]).await.unwrap();
    let pending = store.list_jobs(&JobFilter { state: Some(JobState::Pending), limit: 10 }).await.unwrap();
    assert!(pending.is_empty(), "{pending:?}");
}
