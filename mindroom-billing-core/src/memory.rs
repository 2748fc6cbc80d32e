//! The in-memory store: the embedded default (one process, not durable) and the reference
//! implementation of the [`Store`] contract.
//!
//! Its memory is bounded by [`MemoryLimits`]: the raw payloads of only the newest done (applied,
//! stale, ignored) events are kept; older done events keep a compact row without the payload (so a
//! redelivery is still answered as a duplicate), and beyond the row bound the oldest done rows go.
//! Received and failed events are always kept whole: they are still to be applied.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::model::{
    Account, Claim, Commit, CommitResult, EventSource, EventStatus, Expected, InstanceRecord, Job, JobCounts,
    JobFinish, JobResolution, JobState, NewEvent, NewJob, Recorded, RecordedCommit, StoredEvent, SubscriptionState,
    SyncCursor, UsageKey, UsageResult, account_id_for_customer,
};
use crate::operator::{
    AuditEntry, DriftRecord, Operator, OperatorSession, OperatorStore, SessionCutoff, event_customer,
};
use crate::ports::{ChangeListener, EventFilter, JobFilter, Store, StoreError};
use crate::retention::{PruneReport, PruneRequest};
use crate::tier::Limit;

/// How much of its event history the in-memory store keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemoryLimits {
    /// Raw payloads of done (applied, stale, ignored) events kept, the most recently done ones
    /// (default 10,000). Received and failed events always keep theirs, on top of this.
    pub max_payloads: usize,
    /// Event rows kept, with or without their payload (default 1,000,000, some weeks of heavy
    /// traffic: far more than Stripe's 3-day redelivery window). Beyond it the oldest done rows go;
    /// received and failed ones are never dropped.
    pub max_events: usize,
}

impl Default for MemoryLimits {
    fn default() -> Self {
        Self { max_payloads: 10_000, max_events: 1_000_000 }
    }
}

impl MemoryLimits {
    /// Sets [`MemoryLimits::max_payloads`].
    #[must_use]
    pub fn with_max_payloads(mut self, max_payloads: usize) -> Self {
        self.max_payloads = max_payloads;
        self
    }

    /// Sets [`MemoryLimits::max_events`].
    #[must_use]
    pub fn with_max_events(mut self, max_events: usize) -> Self {
        self.max_events = max_events;
        self
    }
}

/// A done event whose payload was dropped: what a duplicate check and a listing still need, in
/// 48 bytes (a million of them are the bulk of a busy store's memory).
struct DoneRow {
    created: DateTime<Utc>,
    received_at: DateTime<Utc>,
    /// A done event always has one (set by the commit that made it done).
    processed_at: DateTime<Utc>,
    deliveries: u32,
    /// Index into `Inner::event_types`: a few dozen distinct types are shared by every row.
    event_type: u32,
    status: EventStatus,
    source: EventSource,
}

// The size the comment above promises (the row bound is a memory bound only while rows stay small).
const _: () = assert!(std::mem::size_of::<DoneRow>() <= 48);

impl DoneRow {
    fn to_stored(&self, id: &str, event_types: &[Box<str>]) -> StoredEvent {
        let event_type = usize::try_from(self.event_type).ok().and_then(|i| event_types.get(i));
        StoredEvent {
            id: id.to_owned(),
            event_type: event_type.map(ToString::to_string).unwrap_or_default(),
            created: self.created,
            status: self.status,
            reason: None,
            payload: String::new(),
            received_at: self.received_at,
            processed_at: Some(self.processed_at),
            deliveries: self.deliveries,
            source: self.source,
        }
    }
}

/// Ordered maps throughout: they never rehash, so a growing store has no latency spikes while the
/// mutex is held (a `HashMap` of 100k events stalls every request for milliseconds when it grows).
#[derive(Default)]
struct Inner {
    limits: MemoryLimits,
    /// Events with their payload: received, failed and the newest done ones.
    events: BTreeMap<Arc<str>, StoredEvent>,
    /// Done events whose payload was dropped (disjoint from `events`).
    compacted: BTreeMap<Arc<str>, DoneRow>,
    /// Done events in `events`, in the order they became done (oldest first).
    kept: VecDeque<Arc<str>>,
    /// The rows of `compacted`, oldest first.
    dropped: VecDeque<Arc<str>>,
    /// Event types, interned for `compacted`.
    event_types: Vec<Box<str>>,
    subscriptions: BTreeMap<String, SubscriptionState>,
    accounts: BTreeMap<String, Account>,
    /// `created` of the fact the account's e-mail came from (the newest wins).
    email_observed_at: BTreeMap<String, DateTime<Utc>>,
    instances: BTreeMap<String, InstanceRecord>,
    jobs: BTreeMap<i64, Job>,
    job_keys: BTreeSet<String>,
    next_job_id: i64,
    usage: BTreeMap<UsageKey, u64>,
    cursors: BTreeMap<String, SyncCursor>,
    /// Named singleton leases: holder and until when.
    leases: BTreeMap<String, (String, DateTime<Utc>)>,
    /// Allowed usage calls with an idempotency key: (account, metric, key) → their answer and when
    /// the first call was made (remembered for `USAGE_KEY_HOURS`).
    usage_requests: BTreeMap<(uuid::Uuid, crate::tier::Metric, String), (UsageResult, DateTime<Utc>)>,
    /// `usage_requests.len()` after the last sweep of expired keys.
    usage_requests_swept: usize,
    /// Operator actions, oldest first ([`OperatorStore`]).
    audit: Vec<AuditEntry>,
    /// The drift the last reconciliation found, per subscription.
    drift: BTreeMap<String, Vec<DriftRecord>>,
    /// Console operators by name.
    operators: BTreeMap<String, Operator>,
    /// Console sessions by id.
    sessions: BTreeMap<String, OperatorSession>,
}

impl Inner {
    /// Ends the live sessions of `operator` at `now`.
    fn end_sessions_of(&mut self, operator: &str, now: DateTime<Utc>) {
        for session in self.sessions.values_mut().filter(|s| s.operator == operator && s.ended_at.is_none()) {
            session.ended_at = Some(now);
        }
    }
}

/// A [`Store`] in process memory. All operations take one mutex, never across an `.await`.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    unavailable: AtomicBool,
    /// Told about every committed account change (see [`Store::watch_changes`]).
    watchers: Mutex<Vec<Weak<dyn ChangeListener>>>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("in-memory store switched off (fault injection)")]
struct SwitchedOff;

impl MemoryStore {
    /// An empty store with the default [`MemoryLimits`].
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store keeping at most what `limits` allow.
    pub fn with_limits(limits: MemoryLimits) -> Self {
        Self { inner: Mutex::new(Inner { limits, ..Inner::default() }), ..Self::default() }
    }

    /// Fault injection: while set, every call fails with [`StoreError::Unavailable`].
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::SeqCst);
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, StoreError> {
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(Box::new(SwitchedOff)));
        }
        Ok(self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Tells the watchers that `accounts` changed (after the commit, outside the store's lock).
    fn changed(&self, accounts: &[uuid::Uuid]) {
        let mut watchers = self.watchers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        watchers.retain(|w| w.strong_count() > 0);
        for watcher in watchers.iter().filter_map(Weak::upgrade) {
            for account in accounts {
                watcher.account_changed(*account);
            }
        }
    }
}

impl Inner {
    /// Remembers that the event `id` (in `events`) became done, then drops what the limits exceed.
    fn became_done(&mut self, id: &str) {
        if let Some((key, _)) = self.events.get_key_value(id) {
            self.kept.push_back(Arc::clone(key));
        }
        while self.kept.len() > self.limits.max_payloads {
            let Some(id) = self.kept.pop_front() else { break };
            if self.compact(&id) {
                self.dropped.push_back(id);
            }
        }
        while self.events.len() + self.compacted.len() > self.limits.max_events {
            if let Some(id) = self.dropped.pop_front() {
                self.compacted.remove(&id);
            } else if let Some(id) = self.kept.pop_front() {
                self.events.remove(&id);
            } else {
                break; // only received and failed events are left: never dropped
            }
        }
    }

    /// Moves the event `id` from `events` to `compacted`, dropping its payload (the caller keeps
    /// `kept` and `dropped` in step). Whether it was there.
    fn compact(&mut self, id: &Arc<str>) -> bool {
        let Some(event) = self.events.remove(id) else { return false };
        let known = self.event_types.iter().position(|t| **t == *event.event_type);
        let index = known.unwrap_or_else(|| {
            self.event_types.push(event.event_type.into());
            self.event_types.len() - 1
        });
        let row = DoneRow {
            event_type: u32::try_from(index).unwrap_or(u32::MAX),
            created: event.created,
            received_at: event.received_at,
            processed_at: event.processed_at.unwrap_or(event.received_at),
            deliveries: event.deliveries,
            status: event.status,
            source: event.source,
        };
        self.compacted.insert(Arc::clone(id), row);
        true
    }

    /// [`Store::prune`] under the lock.
    fn prune(&mut self, request: &PruneRequest) -> PruneReport {
        let limit = if request.dry_run { usize::MAX } else { usize::try_from(request.limit).unwrap_or(usize::MAX) };
        let done_before = |status: EventStatus, received_at: DateTime<Utc>, before: DateTime<Utc>| {
            status.is_done() && received_at < before
        };
        let old_ids: Vec<Arc<str>> = self
            .events
            .iter()
            .filter(|(_, e)| done_before(e.status, e.received_at, request.events_before))
            .map(|(id, _)| Arc::clone(id))
            .chain(
                self.compacted
                    .iter()
                    .filter(|(_, r)| done_before(r.status, r.received_at, request.events_before))
                    .map(|(id, _)| Arc::clone(id)),
            )
            .take(limit)
            .collect();
        let payload_ids: Vec<Arc<str>> = self
            .events
            .iter()
            .filter(|(_, e)| {
                done_before(e.status, e.received_at, request.payloads_before)
                    && e.received_at >= request.events_before
                    && !e.payload.is_empty()
            })
            .map(|(id, _)| Arc::clone(id))
            .take(limit)
            .collect();
        let job_ids: Vec<i64> = self
            .jobs
            .values()
            .filter(|j| {
                let before = match j.kind {
                    crate::model::JobKind::Email { .. } => request.jobs_before.min(request.email_jobs_before),
                    _ => request.jobs_before,
                };
                j.state == JobState::Done && j.created_at < before && j.updated_at < before
            })
            .map(|j| j.id)
            .take(limit)
            .collect();
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        let report = PruneReport {
            events: count(old_ids.len()),
            payloads: count(payload_ids.len()),
            jobs: count(job_ids.len()),
        };
        if request.dry_run {
            return report;
        }
        for id in &old_ids {
            self.events.remove(id);
            self.compacted.remove(id);
        }
        for id in payload_ids {
            if self.compact(&id) {
                self.dropped.push_front(id); // older than anything compacted by the payload bound
            }
        }
        for id in job_ids {
            if let Some(job) = self.jobs.remove(&id) {
                self.job_keys.remove(&job.key);
            }
        }
        let (events, compacted) = (&self.events, &self.compacted);
        self.kept.retain(|id| events.contains_key(id));
        self.dropped.retain(|id| compacted.contains_key(id));
        report
    }

    fn enqueue(&mut self, jobs: &[NewJob], now: DateTime<Utc>) {
        for job in jobs {
            if !self.job_keys.insert(job.key.clone()) {
                continue;
            }
            self.next_job_id += 1;
            let id = self.next_job_id;
            self.jobs.insert(
                id,
                Job {
                    id,
                    key: job.key.clone(),
                    group: job.group.clone(),
                    kind: job.kind.clone(),
                    state: JobState::Pending,
                    attempts: 0,
                    run_after: job.run_after,
                    locked_until: None,
                    last_error: None,
                    created_at: now,
                    updated_at: now,
                },
            );
        }
    }
}

fn newest_first<T>(mut items: Vec<T>, key: impl Fn(&T) -> (DateTime<Utc>, i64), limit: u32) -> Vec<T> {
    items.sort_by_key(|t| std::cmp::Reverse(key(t)));
    items.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    items
}

/// Records an event (see [`Store::record_event`]).
fn record_in(inner: &mut Inner, event: &NewEvent<'_>) -> Recorded {
    if let Some(existing) = inner.events.get_mut(event.id) {
        existing.deliveries += 1;
        return if existing.status.is_done() {
            Recorded::Done(existing.status)
        } else {
            Recorded::Pending(existing.status)
        };
    }
    if let Some(done) = inner.compacted.get_mut(event.id) {
        done.deliveries += 1;
        return Recorded::Done(done.status);
    }
    inner.events.insert(
        event.id.into(),
        StoredEvent {
            id: event.id.to_owned(),
            event_type: event.event_type.to_owned(),
            created: event.created,
            status: EventStatus::Received,
            reason: None,
            payload: event.payload.to_owned(),
            received_at: event.received_at,
            processed_at: None,
            deliveries: 1,
            source: event.source,
        },
    );
    Recorded::Fresh
}

/// Applies a commit (see [`Store::commit`]); also answers the accounts whose subscriptions changed.
fn commit_in(inner: &mut Inner, commit: &Commit) -> Result<(CommitResult, Vec<Uuid>), StoreError> {
    if let Some(id) = &commit.event_id {
        if inner.compacted.contains_key(id.as_str())
            || inner.events.get(id.as_str()).is_some_and(|e| e.status.is_done())
        {
            return Ok((CommitResult::AlreadyDone, Vec::new()));
        }
    }
    if let Some(next) = &commit.subscription {
        let stored = inner.subscriptions.get(&next.subscription_id).map_or(0, |s| s.version);
        if stored != next.version {
            return Err(StoreError::Conflict(next.subscription_id.clone()));
        }
    }
    // Every check passed: write everything (the mutex makes it one atomic step).
    let now = commit.now;
    let mut changed = Vec::new();
    if let Some(next) = &commit.subscription {
        changed.push(next.account_id);
        let by_customer = inner.accounts.get(&next.customer_id).map(|a| a.id);
        changed.extend(by_customer.filter(|id| *id != next.account_id));
        let mut stored = next.clone();
        stored.version += 1;
        inner.subscriptions.insert(stored.subscription_id.clone(), stored);
        let customer = next.customer_id.clone();
        inner.accounts.entry(customer.clone()).or_insert_with(|| Account {
            id: account_id_for_customer(&customer),
            stripe_customer_id: customer,
            email: None,
            reference: None,
        });
    }
    if let Some(patch) = &commit.account {
        let inner = &mut *inner;
        let account = inner.accounts.entry(patch.stripe_customer_id.clone()).or_insert_with(|| Account {
            id: account_id_for_customer(&patch.stripe_customer_id),
            stripe_customer_id: patch.stripe_customer_id.clone(),
            email: None,
            reference: None,
        });
        let observed =
            inner.email_observed_at.entry(patch.stripe_customer_id.clone()).or_insert(DateTime::<Utc>::MIN_UTC);
        if patch.email.is_some() && patch.observed_at >= *observed {
            account.email.clone_from(&patch.email);
            *observed = patch.observed_at;
        }
        if patch.reference.is_some() {
            account.reference.clone_from(&patch.reference);
        }
    }
    inner.enqueue(&commit.jobs, now);
    if let Some(id) = &commit.event_id {
        if let Some(event) = inner.events.get_mut(id.as_str()) {
            event.status = EventStatus::of(&commit.outcome);
            event.reason = match &commit.outcome {
                crate::model::Outcome::Failed(reason) => Some(reason.clone()),
                _ => None,
            };
            event.processed_at = Some(now);
            if event.status.is_done() {
                inner.became_done(id);
            }
        }
    }
    Ok((CommitResult::Committed, changed))
}

#[async_trait]
impl Store for MemoryStore {
    async fn record_event(&self, event: &NewEvent<'_>) -> Result<Recorded, StoreError> {
        Ok(record_in(&mut *self.lock()?, event))
    }

    async fn load_event(&self, id: &str) -> Result<Option<StoredEvent>, StoreError> {
        let inner = self.lock()?;
        Ok(inner
            .events
            .get(id)
            .cloned()
            .or_else(|| inner.compacted.get(id).map(|row| row.to_stored(id, &inner.event_types))))
    }

    async fn list_events(&self, filter: &EventFilter) -> Result<Vec<StoredEvent>, StoreError> {
        let inner = self.lock()?;
        let wanted = |status: EventStatus| filter.status.is_none_or(|s| s == status);
        // Sort references, then copy only the page: a million rows are not cloned to list ten.
        let mut found: Vec<(DateTime<Utc>, &str, Option<&StoredEvent>)> = inner
            .events
            .iter()
            .filter(|(_, e)| wanted(e.status))
            .map(|(id, e)| (e.received_at, &**id, Some(e)))
            .chain(inner.compacted.iter().filter(|(_, r)| wanted(r.status)).map(|(id, r)| (r.received_at, &**id, None)))
            .collect();
        found.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        found.truncate(usize::try_from(filter.limit).unwrap_or(usize::MAX));
        Ok(found
            .into_iter()
            .map(|(_, id, event)| match event {
                Some(event) => event.clone(),
                None => inner.compacted[id].to_stored(id, &inner.event_types),
            })
            .collect())
    }

    async fn unapplied_events(&self, before: DateTime<Utc>, limit: u32) -> Result<Vec<StoredEvent>, StoreError> {
        let inner = self.lock()?;
        let mut events: Vec<StoredEvent> = inner
            .events
            .values()
            .filter(|e| e.status == EventStatus::Received && e.received_at < before)
            .cloned()
            .collect();
        events.sort_by_key(|e| e.received_at);
        events.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        Ok(events)
    }

    async fn load_subscription(&self, subscription_id: &str) -> Result<Option<SubscriptionState>, StoreError> {
        Ok(self.lock()?.subscriptions.get(subscription_id).cloned())
    }

    async fn commit(&self, commit: &Commit) -> Result<CommitResult, StoreError> {
        let (result, changed) = commit_in(&mut *self.lock()?, commit)?;
        self.changed(&changed);
        Ok(result)
    }

    async fn record_and_commit(
        &self,
        event: &NewEvent<'_>,
        expected: Option<Expected<'_>>,
        commit: &Commit,
    ) -> Result<RecordedCommit, StoreError> {
        let mut inner = self.lock()?;
        if let Recorded::Done(_) = record_in(&mut inner, event) {
            return Ok(RecordedCommit::Duplicate);
        }
        let current =
            |inner: &Inner| expected.and_then(|e| inner.subscriptions.get(e.subscription_id).cloned()).map(Box::new);
        if expected.is_some_and(|e| inner.subscriptions.get(e.subscription_id).map_or(0, |s| s.version) != e.version) {
            return Ok(RecordedCommit::Conflict(current(&inner)));
        }
        match commit_in(&mut inner, commit) {
            Ok((CommitResult::Committed, changed)) => {
                drop(inner);
                self.changed(&changed);
                Ok(RecordedCommit::Committed)
            }
            Ok((CommitResult::AlreadyDone, _)) => Ok(RecordedCommit::Duplicate),
            Err(StoreError::Conflict(_)) => Ok(RecordedCommit::Conflict(current(&inner))),
            Err(e) => Err(e),
        }
    }

    async fn expired_grace(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<String>, StoreError> {
        let inner = self.lock()?;
        let mut ids: Vec<String> = inner
            .subscriptions
            .values()
            .filter(|s| {
                s.grace.is_some_and(|g| g.ends_at <= now)
                    && !s.grace_expiry_handled
                    && !s.status().is_some_and(crate::event::SubscriptionStatus::is_terminal)
            })
            .map(|s| s.subscription_id.clone())
            .collect();
        ids.sort();
        ids.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        Ok(ids)
    }

    async fn subscriptions_for_account(&self, account_id: Uuid) -> Result<Vec<SubscriptionState>, StoreError> {
        let inner = self.lock()?;
        Ok(inner.subscriptions.values().filter(|s| s.account_id == account_id).cloned().collect())
    }

    async fn load_account(&self, stripe_customer_id: &str) -> Result<Option<Account>, StoreError> {
        Ok(self.lock()?.accounts.get(stripe_customer_id).cloned())
    }

    async fn accounts_by_reference(&self, reference: &str, limit: u32) -> Result<Vec<Account>, StoreError> {
        let inner = self.lock()?;
        Ok(take(inner.accounts.values().filter(|a| a.reference.as_deref() == Some(reference)).cloned(), limit))
    }

    async fn load_instance(&self, subscription_id: &str) -> Result<Option<InstanceRecord>, StoreError> {
        Ok(self.lock()?.instances.get(subscription_id).cloned())
    }

    async fn enqueue(&self, jobs: &[NewJob]) -> Result<(), StoreError> {
        let now = jobs.first().map_or(DateTime::<Utc>::MIN_UTC, |j| j.run_after);
        self.lock()?.enqueue(jobs, now);
        Ok(())
    }

    async fn claim_jobs(&self, claim: &Claim) -> Result<Vec<Job>, StoreError> {
        let mut inner = self.lock()?;
        let mut blocked: HashSet<String> = HashSet::new();
        let mut claimed = Vec::new();
        let limit = usize::try_from(claim.limit).unwrap_or(usize::MAX);
        for job in inner.jobs.values_mut() {
            if !matches!(job.state, JobState::Pending | JobState::Running) {
                continue;
            }
            if let Some(group) = &job.group {
                if !blocked.insert(group.clone()) {
                    continue; // an earlier unfinished job of this group goes first
                }
            }
            let due = match job.state {
                JobState::Pending => job.run_after <= claim.now,
                _ => job.locked_until.is_none_or(|l| l <= claim.now),
            };
            if due && claimed.len() < limit {
                job.state = JobState::Running;
                job.attempts += 1;
                job.locked_until = Some(claim.now + claim.lease);
                job.updated_at = claim.now;
                claimed.push(job.clone());
            }
        }
        Ok(claimed)
    }

    async fn finish_job(&self, finish: &JobFinish) -> Result<bool, StoreError> {
        let mut inner = self.lock()?;
        let Some(job) = inner.jobs.get_mut(&finish.job_id) else { return Ok(false) };
        if job.state != JobState::Running || job.attempts != finish.attempt {
            return Ok(false);
        }
        job.updated_at = finish.now;
        job.locked_until = None;
        match &finish.resolution {
            JobResolution::Done => job.state = JobState::Done,
            JobResolution::Retry { run_after, error } => {
                job.state = JobState::Pending;
                job.run_after = *run_after;
                job.last_error = Some(error.clone());
            }
            JobResolution::Dead { error } => {
                job.state = JobState::Dead;
                job.last_error = Some(error.clone());
            }
            JobResolution::Skipped { reason } => {
                job.state = JobState::Done;
                job.last_error = Some(format!("skipped: {reason}"));
            }
        }
        if let Some(instance) = &finish.instance {
            inner.instances.insert(instance.subscription_id.clone(), instance.clone());
        }
        inner.enqueue(&finish.enqueue, finish.now);
        Ok(true)
    }

    async fn record_instance_intent(
        &self,
        job_id: i64,
        attempt: u32,
        instance: &InstanceRecord,
    ) -> Result<bool, StoreError> {
        let mut inner = self.lock()?;
        match inner.jobs.get(&job_id) {
            Some(job) if job.state == JobState::Running && job.attempts == attempt => {
                inner.instances.insert(instance.subscription_id.clone(), instance.clone());
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn extend_lease(&self, job_id: i64, attempt: u32, locked_until: DateTime<Utc>) -> Result<bool, StoreError> {
        let mut inner = self.lock()?;
        match inner.jobs.get_mut(&job_id) {
            Some(job) if job.state == JobState::Running && job.attempts == attempt => {
                job.locked_until = Some(locked_until);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn load_cursor(&self, name: &str) -> Result<Option<SyncCursor>, StoreError> {
        Ok(self.lock()?.cursors.get(name).copied())
    }

    async fn save_cursor(&self, name: &str, cursor: &SyncCursor) -> Result<(), StoreError> {
        self.lock()?.cursors.insert(name.to_owned(), *cursor);
        Ok(())
    }

    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let mut inner = self.lock()?;
        match inner.leases.get(name) {
            Some((other, held_until)) if other != holder && *held_until > now => Ok(false),
            _ => {
                inner.leases.insert(name.to_owned(), (holder.to_owned(), until));
                Ok(true)
            }
        }
    }

    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, StoreError> {
        let inner = self.lock()?;
        let jobs = inner.jobs.values().filter(|j| filter.state.is_none_or(|s| j.state == s)).cloned().collect();
        Ok(newest_first(jobs, |j| (j.created_at, j.id), filter.limit))
    }

    async fn job_counts(&self) -> Result<JobCounts, StoreError> {
        let inner = self.lock()?;
        let mut counts = JobCounts::default();
        for job in inner.jobs.values() {
            match job.state {
                JobState::Pending => counts.pending += 1,
                JobState::Running => counts.running += 1,
                JobState::Done => counts.done += 1,
                JobState::Dead => counts.dead += 1,
            }
        }
        Ok(counts)
    }

    async fn consume_usage(
        &self,
        key: UsageKey,
        count: u64,
        limit: Limit,
        idempotency: Option<crate::model::UsageRequestKey<'_>>,
    ) -> Result<UsageResult, StoreError> {
        let mut inner = self.lock()?;
        let remembered = chrono::Duration::hours(crate::model::USAGE_KEY_HOURS);
        let request = idempotency.map(|r| ((key.account_id, key.metric, r.key.to_owned()), r.at));
        if let Some((id, at)) = &request {
            match inner.usage_requests.get(id) {
                Some((done, first)) if *at < *first + remembered => return Ok(*done),
                _ => {}
            }
        }
        let used = inner.usage.entry(key).or_insert(0);
        let next = used.saturating_add(count);
        if !limit.allows(next) {
            return Ok(UsageResult { allowed: false, used: *used });
        }
        *used = next;
        let result = UsageResult { allowed: true, used: next };
        if let Some((id, at)) = request {
            inner.usage_requests.insert(id, (result, at));
            // Expired keys go in a sweep whenever the map has doubled since the last one.
            if inner.usage_requests.len() > inner.usage_requests_swept.max(512) * 2 {
                inner.usage_requests.retain(|_, (_, first)| at < *first + remembered);
                inner.usage_requests_swept = inner.usage_requests.len();
            }
        }
        Ok(result)
    }

    async fn usage(&self, key: UsageKey) -> Result<u64, StoreError> {
        Ok(self.lock()?.usage.get(&key).copied().unwrap_or(0))
    }

    fn watch_changes(&self, listener: Weak<dyn ChangeListener>) -> bool {
        let Some(strong) = listener.upgrade() else { return true };
        self.watchers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(listener);
        strong.listening();
        true
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.lock().map(drop)
    }

    async fn prune(&self, request: &PruneRequest) -> Result<PruneReport, StoreError> {
        Ok(self.lock()?.prune(request))
    }
}

fn take<T>(items: impl Iterator<Item = T>, limit: u32) -> Vec<T> {
    items.take(usize::try_from(limit).unwrap_or(usize::MAX)).collect()
}

#[async_trait]
impl OperatorStore for MemoryStore {
    async fn accounts_by_email(&self, email: &str, limit: u32) -> Result<Vec<Account>, StoreError> {
        let inner = self.lock()?;
        let email = email.to_lowercase();
        let matches = |a: &&Account| a.email.as_deref().is_some_and(|e| e.to_lowercase() == email);
        Ok(take(inner.accounts.values().filter(matches).cloned(), limit))
    }

    async fn search_customers(&self, text: &str, limit: u32) -> Result<Vec<String>, StoreError> {
        if text.is_empty() {
            return Ok(vec![]);
        }
        let inner = self.lock()?;
        let needle = text.to_lowercase();
        let contains = |v: Option<&str>| v.is_some_and(|v| v.to_lowercase().contains(&needle));
        let accounts = inner
            .accounts
            .values()
            .filter(|a| contains(a.email.as_deref()) || contains(a.reference.as_deref()))
            .map(|a| a.stripe_customer_id.clone());
        let invoices = inner
            .subscriptions
            .values()
            .filter(|_| text.starts_with("in_"))
            .filter(|s| {
                s.failures.iter().any(|f| f.invoice_id.as_deref() == Some(text))
                    || s.paid_invoices.iter().any(|p| p.invoice_id == text)
            })
            .map(|s| s.customer_id.clone());
        let found: BTreeSet<String> = accounts.chain(invoices).collect();
        Ok(take(found.into_iter(), limit))
    }

    async fn instance_by_app(&self, app_name: &str) -> Result<Option<InstanceRecord>, StoreError> {
        Ok(self.lock()?.instances.values().find(|i| i.app_name == app_name).cloned())
    }

    async fn subscriptions_for_customer(&self, customer_id: &str) -> Result<Vec<SubscriptionState>, StoreError> {
        let inner = self.lock()?;
        Ok(inner.subscriptions.values().filter(|s| s.customer_id == customer_id).cloned().collect())
    }

    async fn events_for_customer(&self, customer_id: &str, limit: u32) -> Result<Vec<StoredEvent>, StoreError> {
        let inner = self.lock()?;
        // A substring test first (memchr-fast) so that only candidate payloads are parsed while the
        // mutex is held.
        let mut found: Vec<&StoredEvent> = inner
            .events
            .values()
            .filter(|e| e.payload.contains(customer_id))
            .filter(|e| event_customer(&e.payload).as_deref() == Some(customer_id))
            .collect();
        found.sort_by(|a, b| b.received_at.cmp(&a.received_at).then_with(|| a.id.cmp(&b.id)));
        Ok(take(found.into_iter().cloned(), limit))
    }

    async fn jobs_for_subscription(&self, subscription_id: &str, limit: u32) -> Result<Vec<Job>, StoreError> {
        let inner = self.lock()?;
        let names = |job: &&Job| {
            let about = match &job.kind {
                crate::model::JobKind::Reconcile { subscription_id } => Some(subscription_id.as_str()),
                crate::model::JobKind::Email { subscription_id, .. } => subscription_id.as_deref(),
                crate::model::JobKind::AdminAlert { .. } => None,
            };
            about.or(job.group.as_deref()) == Some(subscription_id)
        };
        let found: Vec<Job> = inner.jobs.values().filter(names).cloned().collect();
        Ok(newest_first(found, |j| (j.created_at, j.id), limit))
    }

    async fn load_job(&self, job_id: i64) -> Result<Option<Job>, StoreError> {
        Ok(self.lock()?.jobs.get(&job_id).cloned())
    }

    async fn subscriptions_in_grace(&self, limit: u32) -> Result<Vec<SubscriptionState>, StoreError> {
        let inner = self.lock()?;
        let mut found: Vec<&SubscriptionState> = inner
            .subscriptions
            .values()
            .filter(|s| {
                s.grace.is_some()
                    && !s.grace_expiry_handled
                    && !s.status().is_some_and(crate::event::SubscriptionStatus::is_terminal)
            })
            .collect();
        found.sort_by_key(|s| (s.grace.map(|g| g.ends_at), s.subscription_id.clone()));
        Ok(take(found.into_iter().cloned(), limit))
    }

    async fn list_subscriptions(&self, after: Option<&str>, limit: u32) -> Result<Vec<SubscriptionState>, StoreError> {
        use std::ops::Bound::{Excluded, Unbounded};
        let inner = self.lock()?;
        let from = after.map_or(Unbounded, |a| Excluded(a.to_owned()));
        Ok(take(inner.subscriptions.range((from, Unbounded)).map(|(_, s)| s.clone()), limit))
    }

    async fn open_disputes(&self, limit: u32) -> Result<Vec<SubscriptionState>, StoreError> {
        let inner = self.lock()?;
        let mut found: Vec<(Option<DateTime<Utc>>, &SubscriptionState)> = inner
            .subscriptions
            .values()
            .filter_map(|s| s.open_disputes().first().map(|d| (d.evidence_due_by, s)))
            .collect();
        found.sort_by_key(|(due, s)| (due.is_none(), *due, s.subscription_id.clone()));
        Ok(take(found.into_iter().map(|(_, s)| s.clone()), limit))
    }

    async fn retry_dead_job(&self, job_id: i64, now: DateTime<Utc>) -> Result<Option<Job>, StoreError> {
        let mut inner = self.lock()?;
        let Some(job) = inner.jobs.get_mut(&job_id).filter(|j| j.state == JobState::Dead) else { return Ok(None) };
        job.state = JobState::Pending;
        job.run_after = now;
        job.locked_until = None;
        job.updated_at = now;
        Ok(Some(job.clone()))
    }

    async fn record_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        self.lock()?.audit.push(entry.clone());
        Ok(())
    }

    async fn list_audit(&self, customer_id: Option<&str>, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let inner = self.lock()?;
        let wanted = |a: &&AuditEntry| customer_id.is_none_or(|c| a.customer_id.as_deref() == Some(c));
        Ok(take(inner.audit.iter().rev().filter(wanted).cloned(), limit))
    }

    async fn save_drift(&self, checked: &[String], drift: &[DriftRecord]) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        for id in checked {
            let found: Vec<DriftRecord> = drift.iter().filter(|d| d.subscription_id == *id).cloned().collect();
            if found.is_empty() {
                inner.drift.remove(id);
            } else {
                inner.drift.insert(id.clone(), found);
            }
        }
        Ok(())
    }

    async fn list_drift(&self, subscription_id: Option<&str>, limit: u32) -> Result<Vec<DriftRecord>, StoreError> {
        let inner = self.lock()?;
        let mut found: Vec<&DriftRecord> = inner
            .drift
            .iter()
            .filter(|(id, _)| subscription_id.is_none_or(|s| s == id.as_str()))
            .flat_map(|(_, d)| d)
            .collect();
        found.sort_by(|a, b| {
            b.found_at
                .cmp(&a.found_at)
                .then_with(|| a.subscription_id.cmp(&b.subscription_id))
                .then(a.field.cmp(&b.field))
        });
        Ok(take(found.into_iter().cloned(), limit))
    }

    async fn add_operator(&self, operator: &Operator) -> Result<bool, StoreError> {
        let mut inner = self.lock()?;
        if inner.operators.contains_key(&operator.name) {
            return Ok(false);
        }
        inner.operators.insert(operator.name.clone(), operator.clone());
        Ok(true)
    }

    async fn load_operator(&self, name: &str) -> Result<Option<Operator>, StoreError> {
        Ok(self.lock()?.operators.get(name).cloned())
    }

    async fn list_operators(&self) -> Result<Vec<Operator>, StoreError> {
        Ok(self.lock()?.operators.values().cloned().collect())
    }

    async fn set_operator_password(
        &self,
        name: &str,
        password_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let mut inner = self.lock()?;
        let Some(operator) = inner.operators.get_mut(name) else { return Ok(false) };
        password_hash.clone_into(&mut operator.password_hash);
        inner.end_sessions_of(name, now);
        Ok(true)
    }

    async fn remove_operator(&self, name: &str, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let mut inner = self.lock()?;
        if inner.operators.remove(name).is_none() {
            return Ok(false);
        }
        inner.end_sessions_of(name, now);
        Ok(true)
    }

    async fn create_session(&self, session: &OperatorSession) -> Result<(), StoreError> {
        self.lock()?.sessions.insert(session.id.clone(), session.clone());
        Ok(())
    }

    async fn touch_session(&self, id: &str, cutoff: &SessionCutoff) -> Result<Option<OperatorSession>, StoreError> {
        let mut inner = self.lock()?;
        let Some(session) = inner.sessions.get_mut(id).filter(|s| s.ended_at.is_none()) else { return Ok(None) };
        if session.last_seen < cutoff.idle_since || session.created_at < cutoff.opened_since {
            session.ended_at = Some(cutoff.now);
            return Ok(None);
        }
        session.last_seen = session.last_seen.max(cutoff.now);
        Ok(Some(session.clone()))
    }

    async fn end_session(&self, id: &str, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let mut inner = self.lock()?;
        let Some(session) = inner.sessions.get_mut(id).filter(|s| s.ended_at.is_none()) else { return Ok(false) };
        session.ended_at = Some(now);
        Ok(true)
    }
}
