//! The [`Store`] port: each call is one transaction on the writer or one read on a reader.

use std::sync::Weak;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mindroom_billing_core::operator::event_customer;
use mindroom_billing_core::ports::{EventFilter, JobFilter};
use mindroom_billing_core::{
    Account, ChangeListener, Claim, Commit, CommitResult, EventSource, EventStatus, Expected, InstanceRecord, Job,
    JobCounts, JobFinish, JobResolution, Limit, NewEvent, NewJob, Outcome, PruneReport, PruneRequest, Recorded,
    RecordedCommit, Store, StoreError, StoredEvent, SubscriptionState, SyncCursor, USAGE_KEY_HOURS, UsageKey,
    UsageRequestKey, UsageResult, account_id_for_customer,
};
use rusqlite::{OptionalExtension, Transaction, params};
use uuid::Uuid;

use crate::rows::{
    EVENT_COLUMNS, JOB_COLUMNS, SUBSCRIPTION_COLUMNS, collect, instant, job_about, micros, sql, to_i64, to_json, to_u64,
};
use crate::{SqliteStore, lock, rows, undecodable};

/// A [`NewEvent`] the blocking task owns.
struct OwnedEvent {
    id: String,
    event_type: String,
    created: i64,
    api_version: Option<String>,
    livemode: bool,
    payload: String,
    received_at: i64,
    source: EventSource,
    customer: Option<String>,
}

impl OwnedEvent {
    fn of(event: &NewEvent<'_>) -> Self {
        Self {
            id: event.id.to_owned(),
            event_type: event.event_type.to_owned(),
            created: micros(event.created),
            api_version: event.api_version.map(str::to_owned),
            livemode: event.livemode,
            payload: event.payload.to_owned(),
            received_at: micros(event.received_at),
            source: event.source,
            customer: event_customer(event.payload),
        }
    }
}

/// Records an event (see [`Store::record_event`]): one upsert counting the delivery.
fn record_in(tx: &Transaction<'_>, event: &OwnedEvent) -> Result<Recorded, StoreError> {
    let mut stmt = tx
        .prepare_cached(
            "insert into events (id, type, created, api_version, livemode, status, payload, received_at, \
             deliveries, source, customer) values (?1, ?2, ?3, ?4, ?5, 'received', ?6, ?7, 1, ?8, ?9) \
             on conflict (id) do update set deliveries = deliveries + 1 returning status, deliveries",
        )
        .map_err(sql)?;
    let (status, deliveries): (String, i64) = stmt
        .query_row(
            params![
                event.id,
                event.event_type,
                event.created,
                event.api_version,
                event.livemode,
                event.payload,
                event.received_at,
                event.source.as_str(),
                event.customer,
            ],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(sql)?;
    let status = EventStatus::parse(&status).ok_or_else(|| undecodable(&status))?;
    Ok(match (deliveries, status.is_done()) {
        (1, _) => Recorded::Fresh,
        (_, true) => Recorded::Done(status),
        (_, false) => Recorded::Pending(status),
    })
}

fn load_subscription_in(conn: &rusqlite::Connection, id: &str) -> Result<Option<SubscriptionState>, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!("select {SUBSCRIPTION_COLUMNS} from subscriptions where subscription_id = ?1"))
        .map_err(sql)?;
    let mut rows = stmt.query([id]).map_err(sql)?;
    rows.next().map_err(sql)?.map(rows::subscription).transpose()
}

fn stored_version(tx: &Transaction<'_>, id: &str) -> Result<u64, StoreError> {
    let mut stmt = tx.prepare_cached("select version from subscriptions where subscription_id = ?1").map_err(sql)?;
    let version: Option<i64> = stmt.query_row([id], |r| r.get(0)).optional().map_err(sql)?;
    Ok(version.map_or(0, to_u64))
}

fn ensure_account(tx: &Transaction<'_>, customer: &str) -> Result<(), StoreError> {
    let mut stmt = tx
        .prepare_cached("insert into accounts (stripe_customer_id, id) values (?1, ?2) on conflict do nothing")
        .map_err(sql)?;
    stmt.execute(params![customer, account_id_for_customer(customer).to_string()]).map_err(sql)?;
    Ok(())
}

pub(crate) fn enqueue_in(tx: &Transaction<'_>, jobs: &[NewJob], now: DateTime<Utc>) -> Result<(), StoreError> {
    let mut stmt = tx
        .prepare_cached(
            "insert into jobs (key, grp, kind, about, state, attempts, run_after, created_at, updated_at) \
             values (?1, ?2, ?3, ?4, 'pending', 0, ?5, ?6, ?6) on conflict (key) do nothing",
        )
        .map_err(sql)?;
    for job in jobs {
        stmt.execute(params![
            job.key,
            job.group,
            to_json(&job.kind)?,
            job_about(&job.kind),
            micros(job.run_after),
            micros(now)
        ])
        .map_err(sql)?;
    }
    Ok(())
}

/// Applies a commit (see [`Store::commit`]); also answers the accounts whose subscriptions changed.
fn commit_in(tx: &Transaction<'_>, commit: &Commit) -> Result<(CommitResult, Vec<Uuid>), StoreError> {
    if let Some(id) = &commit.event_id {
        let mut stmt = tx.prepare_cached("select status from events where id = ?1").map_err(sql)?;
        let status: Option<String> = stmt.query_row([id], |r| r.get(0)).optional().map_err(sql)?;
        if status.as_deref().and_then(EventStatus::parse).is_some_and(EventStatus::is_done) {
            return Ok((CommitResult::AlreadyDone, Vec::new()));
        }
    }
    let now = micros(commit.now);
    let mut changed = Vec::new();
    if let Some(next) = &commit.subscription {
        if stored_version(tx, &next.subscription_id)? != next.version {
            return Err(StoreError::Conflict(next.subscription_id.clone()));
        }
        changed.push(next.account_id);
        let mut by_customer =
            tx.prepare_cached("select id from accounts where stripe_customer_id = ?1").map_err(sql)?;
        let owner: Option<String> = by_customer.query_row([&next.customer_id], |r| r.get(0)).optional().map_err(sql)?;
        if let Some(owner) = owner {
            let owner = Uuid::parse_str(&owner).map_err(undecodable)?;
            if owner != next.account_id {
                changed.push(owner);
            }
        }
        let mut stored = next.clone();
        stored.version += 1;
        let terminal = stored.status().is_some_and(mindroom_billing_core::SubscriptionStatus::is_terminal);
        let mut stmt = tx
            .prepare_cached(
                "insert into subscriptions (subscription_id, customer_id, account_id, version, state, grace_ends_at, \
                 grace_expiry_handled, terminal, updated_at) values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                 on conflict (subscription_id) do update set customer_id = excluded.customer_id, \
                 account_id = excluded.account_id, version = excluded.version, state = excluded.state, \
                 grace_ends_at = excluded.grace_ends_at, grace_expiry_handled = excluded.grace_expiry_handled, \
                 terminal = excluded.terminal, updated_at = excluded.updated_at",
            )
            .map_err(sql)?;
        stmt.execute(params![
            stored.subscription_id,
            stored.customer_id,
            stored.account_id.to_string(),
            to_i64(stored.version),
            to_json(&stored)?,
            stored.grace.map(|g| micros(g.ends_at)),
            stored.grace_expiry_handled,
            terminal,
            now,
        ])
        .map_err(sql)?;
        ensure_account(tx, &stored.customer_id)?;
    }
    if let Some(patch) = &commit.account {
        ensure_account(tx, &patch.stripe_customer_id)?;
        if let Some(email) = &patch.email {
            let mut stmt = tx
                .prepare_cached(
                    "update accounts set email = ?2, email_lower = ?3, email_observed_at = ?4 \
                     where stripe_customer_id = ?1 and (email_observed_at is null or email_observed_at <= ?4)",
                )
                .map_err(sql)?;
            stmt.execute(params![patch.stripe_customer_id, email, email.to_lowercase(), micros(patch.observed_at)])
                .map_err(sql)?;
        }
        if let Some(reference) = &patch.reference {
            let mut stmt = tx
                .prepare_cached(
                    "update accounts set reference = ?2, reference_lower = ?3 where stripe_customer_id = ?1",
                )
                .map_err(sql)?;
            stmt.execute(params![patch.stripe_customer_id, reference, reference.to_lowercase()]).map_err(sql)?;
        }
    }
    enqueue_in(tx, &commit.jobs, commit.now)?;
    if let Some(id) = &commit.event_id {
        let reason = match &commit.outcome {
            Outcome::Failed(reason) => Some(reason.as_str()),
            _ => None,
        };
        let mut stmt = tx
            .prepare_cached("update events set status = ?2, reason = ?3, processed_at = ?4 where id = ?1")
            .map_err(sql)?;
        stmt.execute(params![id, EventStatus::of(&commit.outcome).as_str(), reason, now]).map_err(sql)?;
    }
    Ok((CommitResult::Committed, changed))
}

fn count(conn: &rusqlite::Connection, query: &str, params: impl rusqlite::Params) -> Result<u64, StoreError> {
    let n: i64 = conn.query_row(query, params, |r| r.get(0)).map_err(sql)?;
    Ok(to_u64(n))
}

const DONE: &str = "status in ('applied', 'stale', 'ignored')";

/// [`Store::prune`] in one transaction.
fn prune_in(tx: &Transaction<'_>, request: &PruneRequest) -> Result<PruneReport, StoreError> {
    let events_before = micros(request.events_before);
    let payloads_before = micros(request.payloads_before);
    let jobs_before = micros(request.jobs_before);
    let email_jobs_before = micros(request.email_jobs_before);
    let old_events = format!("from events where {DONE} and received_at < ?1");
    let old_payloads = format!("from events where {DONE} and received_at < ?1 and received_at >= ?2 and payload <> ''");
    // Done e-mail jobs keep their keys until `email_jobs_before` too (a fact told again is not mailed twice).
    let old_jobs = "from jobs where state = 'done' and created_at < ?1 and updated_at < ?1 \
                    and (json_extract(kind, '$.kind') is not 'email' or (created_at < ?2 and updated_at < ?2))";
    if request.dry_run {
        return Ok(PruneReport {
            events: count(tx, &format!("select count(*) {old_events}"), [events_before])?,
            payloads: count(tx, &format!("select count(*) {old_payloads}"), [payloads_before, events_before])?,
            jobs: count(tx, &format!("select count(*) {old_jobs}"), [jobs_before, email_jobs_before])?,
        });
    }
    let limit = i64::from(request.limit);
    let events = tx
        .execute(
            &format!("delete from events where id in (select id {old_events} limit ?2)"),
            params![events_before, limit],
        )
        .map_err(sql)?;
    let payloads = tx
        .execute(
            &format!("update events set payload = '', customer = null where id in (select id {old_payloads} limit ?3)"),
            params![payloads_before, events_before, limit],
        )
        .map_err(sql)?;
    let jobs = tx
        .execute(
            &format!("delete from jobs where id in (select id {old_jobs} limit ?3)"),
            params![jobs_before, email_jobs_before, limit],
        )
        .map_err(sql)?;
    let n = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    Ok(PruneReport { events: n(events), payloads: n(payloads), jobs: n(jobs) })
}

fn limit(n: u32) -> i64 {
    i64::from(n)
}

#[async_trait]
impl Store for SqliteStore {
    async fn record_event(&self, event: &NewEvent<'_>) -> Result<Recorded, StoreError> {
        let event = OwnedEvent::of(event);
        self.write(move |tx| record_in(tx, &event)).await
    }

    async fn record_and_load(
        &self,
        event: &NewEvent<'_>,
        subscription_id: Option<&str>,
    ) -> Result<(Recorded, Option<SubscriptionState>), StoreError> {
        let event = OwnedEvent::of(event);
        let subscription_id = subscription_id.map(str::to_owned);
        self.write(move |tx| {
            let recorded = record_in(tx, &event)?;
            let state = match (recorded, subscription_id) {
                (Recorded::Done(_), _) | (_, None) => None,
                (_, Some(id)) => load_subscription_in(tx, &id)?,
            };
            Ok((recorded, state))
        })
        .await
    }

    async fn record_and_commit(
        &self,
        event: &NewEvent<'_>,
        expected: Option<Expected<'_>>,
        commit: &Commit,
    ) -> Result<RecordedCommit, StoreError> {
        let event = OwnedEvent::of(event);
        let expected = expected.map(|e| (e.subscription_id.to_owned(), e.version));
        let commit = commit.clone();
        let (result, changed) = self
            .write(move |tx| {
                if let Recorded::Done(_) = record_in(tx, &event)? {
                    return Ok((RecordedCommit::Duplicate, Vec::new()));
                }
                let current = |tx: &Transaction<'_>| -> Result<_, StoreError> {
                    match &expected {
                        Some((id, _)) => Ok(load_subscription_in(tx, id)?.map(Box::new)),
                        None => Ok(None),
                    }
                };
                if let Some((id, version)) = &expected {
                    if stored_version(tx, id)? != *version {
                        return Ok((RecordedCommit::Conflict(current(tx)?), Vec::new()));
                    }
                }
                // A conflict must keep the event recorded: check before writing anything else.
                if let Some(next) = &commit.subscription {
                    if stored_version(tx, &next.subscription_id)? != next.version {
                        return Ok((RecordedCommit::Conflict(current(tx)?), Vec::new()));
                    }
                }
                match commit_in(tx, &commit)? {
                    (CommitResult::Committed, changed) => Ok((RecordedCommit::Committed, changed)),
                    (CommitResult::AlreadyDone, _) => Ok((RecordedCommit::Duplicate, Vec::new())),
                }
            })
            .await?;
        self.changed(&changed);
        Ok(result)
    }

    async fn load_event(&self, id: &str) -> Result<Option<StoredEvent>, StoreError> {
        let id = id.to_owned();
        self.read(move |conn| {
            let mut stmt =
                conn.prepare_cached(&format!("select {EVENT_COLUMNS} from events where id = ?1")).map_err(sql)?;
            Ok(collect(&mut stmt, [id], rows::event)?.pop())
        })
        .await
    }

    async fn list_events(&self, filter: &EventFilter) -> Result<Vec<StoredEvent>, StoreError> {
        let status = filter.status.map(EventStatus::as_str);
        let n = limit(filter.limit);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "select {EVENT_COLUMNS} from events where ?1 is null or status = ?1 \
                     order by received_at desc, id limit ?2"
                ))
                .map_err(sql)?;
            collect(&mut stmt, params![status, n], rows::event)
        })
        .await
    }

    async fn unapplied_events(&self, before: DateTime<Utc>, n: u32) -> Result<Vec<StoredEvent>, StoreError> {
        let (before, n) = (micros(before), limit(n));
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "select {EVENT_COLUMNS} from events where status = 'received' and received_at < ?1 \
                     order by received_at, id limit ?2"
                ))
                .map_err(sql)?;
            collect(&mut stmt, params![before, n], rows::event)
        })
        .await
    }

    async fn load_subscription(&self, subscription_id: &str) -> Result<Option<SubscriptionState>, StoreError> {
        let id = subscription_id.to_owned();
        self.read(move |conn| load_subscription_in(conn, &id)).await
    }

    async fn commit(&self, commit: &Commit) -> Result<CommitResult, StoreError> {
        let commit = commit.clone();
        let (result, changed) = self.write(move |tx| commit_in(tx, &commit)).await?;
        self.changed(&changed);
        Ok(result)
    }

    async fn expired_grace(&self, now: DateTime<Utc>, n: u32) -> Result<Vec<String>, StoreError> {
        let (now, n) = (micros(now), limit(n));
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "select subscription_id from subscriptions where grace_ends_at <= ?1 \
                     and not grace_expiry_handled and not terminal order by subscription_id limit ?2",
                )
                .map_err(sql)?;
            collect(&mut stmt, params![now, n], |r| r.get(0).map_err(sql))
        })
        .await
    }

    async fn subscriptions_for_account(&self, account_id: Uuid) -> Result<Vec<SubscriptionState>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "select {SUBSCRIPTION_COLUMNS} from subscriptions where account_id = ?1 order by subscription_id"
                ))
                .map_err(sql)?;
            collect(&mut stmt, [account_id.to_string()], rows::subscription)
        })
        .await
    }

    async fn load_account(&self, stripe_customer_id: &str) -> Result<Option<Account>, StoreError> {
        let customer = stripe_customer_id.to_owned();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!("select {ACCOUNT_COLUMNS} from accounts where stripe_customer_id = ?1"))
                .map_err(sql)?;
            Ok(collect(&mut stmt, [customer], account)?.pop())
        })
        .await
    }

    async fn accounts_by_reference(&self, reference: &str, limit: u32) -> Result<Vec<Account>, StoreError> {
        let reference = reference.to_owned();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "select {ACCOUNT_COLUMNS} from accounts where reference = ?1 order by stripe_customer_id limit ?2"
                ))
                .map_err(sql)?;
            collect(&mut stmt, params![reference, limit], account)
        })
        .await
    }

    async fn load_instance(&self, subscription_id: &str) -> Result<Option<InstanceRecord>, StoreError> {
        let id = subscription_id.to_owned();
        self.read(move |conn| {
            let mut stmt =
                conn.prepare_cached("select record from instances where subscription_id = ?1").map_err(sql)?;
            Ok(collect(&mut stmt, [id], rows::instance)?.pop())
        })
        .await
    }

    async fn enqueue(&self, jobs: &[NewJob]) -> Result<(), StoreError> {
        let now = jobs.first().map_or(DateTime::<Utc>::MIN_UTC, |j| j.run_after);
        let jobs = jobs.to_vec();
        self.write(move |tx| enqueue_in(tx, &jobs, now)).await
    }

    async fn claim_jobs(&self, claim: &Claim) -> Result<Vec<Job>, StoreError> {
        let (now, until, n) = (micros(claim.now), micros(claim.now + claim.lease), limit(claim.limit));
        self.write(move |tx| {
            let mut stmt = tx
                .prepare_cached(&format!(
                    "update jobs set state = 'running', attempts = attempts + 1, locked_until = ?2, updated_at = ?1 \
                     where id in (select j.id from jobs j where j.state in ('pending', 'running') \
                       and (case j.state when 'pending' then j.run_after <= ?1 \
                            else coalesce(j.locked_until <= ?1, 1) end) \
                       and (j.grp is null or not exists (select 1 from jobs e where e.grp = j.grp \
                            and e.state in ('pending', 'running') and e.id < j.id)) \
                       order by j.id limit ?3) \
                     returning {JOB_COLUMNS}"
                ))
                .map_err(sql)?;
            let mut jobs = collect(&mut stmt, params![now, until, n], rows::job)?;
            jobs.sort_by_key(|j| j.id);
            Ok(jobs)
        })
        .await
    }

    async fn finish_job(&self, finish: &JobFinish) -> Result<bool, StoreError> {
        let finish = finish.clone();
        self.write(move |tx| {
            let now = micros(finish.now);
            let (state, run_after, error) = match &finish.resolution {
                JobResolution::Done => ("done", None, None),
                JobResolution::Retry { run_after, error } => ("pending", Some(micros(*run_after)), Some(error.clone())),
                JobResolution::Dead { error } => ("dead", None, Some(error.clone())),
                JobResolution::Skipped { reason } => ("done", None, Some(format!("skipped: {reason}"))),
            };
            let mut stmt = tx
                .prepare_cached(
                    "update jobs set state = ?3, run_after = coalesce(?4, run_after), \
                     last_error = coalesce(?5, last_error), locked_until = null, updated_at = ?6 \
                     where id = ?1 and state = 'running' and attempts = ?2",
                )
                .map_err(sql)?;
            let updated =
                stmt.execute(params![finish.job_id, finish.attempt, state, run_after, error, now]).map_err(sql)?;
            if updated == 0 {
                return Ok(false);
            }
            if let Some(instance) = &finish.instance {
                put_instance(tx, instance)?;
            }
            enqueue_in(tx, &finish.enqueue, finish.now)?;
            Ok(true)
        })
        .await
    }

    async fn record_instance_intent(
        &self,
        job_id: i64,
        attempt: u32,
        instance: &InstanceRecord,
    ) -> Result<bool, StoreError> {
        let instance = instance.clone();
        self.write(move |tx| {
            let mut stmt = tx
                .prepare_cached("select 1 from jobs where id = ?1 and state = 'running' and attempts = ?2")
                .map_err(sql)?;
            if stmt.query_row(params![job_id, attempt], |_| Ok(())).optional().map_err(sql)?.is_none() {
                return Ok(false);
            }
            put_instance(tx, &instance)?;
            Ok(true)
        })
        .await
    }

    async fn extend_lease(&self, job_id: i64, attempt: u32, locked_until: DateTime<Utc>) -> Result<bool, StoreError> {
        let until = micros(locked_until);
        self.write(move |tx| {
            let mut stmt = tx
                .prepare_cached(
                    "update jobs set locked_until = ?3 where id = ?1 and state = 'running' and attempts = ?2",
                )
                .map_err(sql)?;
            Ok(stmt.execute(params![job_id, attempt, until]).map_err(sql)? == 1)
        })
        .await
    }

    async fn load_cursor(&self, name: &str) -> Result<Option<SyncCursor>, StoreError> {
        let name = name.to_owned();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached("select created, saved_at from cursors where name = ?1").map_err(sql)?;
            let found = collect(&mut stmt, [name], |r| {
                Ok(SyncCursor { created: instant(r.get(0).map_err(sql)?)?, saved_at: instant(r.get(1).map_err(sql)?)? })
            })?;
            Ok(found.into_iter().next())
        })
        .await
    }

    async fn save_cursor(&self, name: &str, cursor: &SyncCursor) -> Result<(), StoreError> {
        let (name, created, saved_at) = (name.to_owned(), micros(cursor.created), micros(cursor.saved_at));
        self.write(move |tx| {
            tx.execute(
                "insert into cursors (name, created, saved_at) values (?1, ?2, ?3) on conflict (name) do update \
                 set created = excluded.created, saved_at = excluded.saved_at",
                params![name, created, saved_at],
            )
            .map_err(sql)?;
            Ok(())
        })
        .await
    }

    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let (name, holder, now, until) = (name.to_owned(), holder.to_owned(), micros(now), micros(until));
        self.write(move |tx| {
            let taken = tx
                .execute(
                    "insert into leases (name, holder, until) values (?1, ?2, ?4) on conflict (name) do update \
                     set holder = excluded.holder, until = excluded.until \
                     where leases.holder = excluded.holder or leases.until <= ?3",
                    params![name, holder, now, until],
                )
                .map_err(sql)?;
            Ok(taken == 1)
        })
        .await
    }

    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, StoreError> {
        let state = filter.state.map(mindroom_billing_core::JobState::as_str);
        let n = limit(filter.limit);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "select {JOB_COLUMNS} from jobs where ?1 is null or state = ?1 \
                     order by created_at desc, id desc limit ?2"
                ))
                .map_err(sql)?;
            collect(&mut stmt, params![state, n], rows::job)
        })
        .await
    }

    async fn job_counts(&self) -> Result<JobCounts, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached("select state, count(*) from jobs group by state").map_err(sql)?;
            let mut counts = JobCounts::default();
            for (state, n) in
                collect(&mut stmt, [], |r| Ok((r.get::<_, String>(0).map_err(sql)?, to_u64(r.get(1).map_err(sql)?))))?
            {
                match state.as_str() {
                    "pending" => counts.pending = n,
                    "running" => counts.running = n,
                    "done" => counts.done = n,
                    "dead" => counts.dead = n,
                    other => return Err(undecodable(other)),
                }
            }
            Ok(counts)
        })
        .await
    }

    async fn consume_usage(
        &self,
        key: UsageKey,
        count: u64,
        limit: Limit,
        idempotency: Option<UsageRequestKey<'_>>,
    ) -> Result<UsageResult, StoreError> {
        let request = idempotency.map(|r| (r.key.to_owned(), micros(r.at)));
        let remembered = chrono::Duration::hours(USAGE_KEY_HOURS).num_microseconds().unwrap_or(i64::MAX);
        let (account, metric, day) = (key.account_id.to_string(), key.metric.as_str(), key.day.to_string());
        self.write(move |tx| {
            if let Some((request, at)) = &request {
                // The account's expired keys go on the way; a live one answers what it answered.
                tx.prepare_cached("delete from usage_keys where account_id = ?1 and requested_at <= ?2")
                    .map_err(sql)?
                    .execute(params![account, at.saturating_sub(remembered)])
                    .map_err(sql)?;
                let mut stmt = tx
                    .prepare_cached("select used from usage_keys where account_id = ?1 and metric = ?2 and key = ?3")
                    .map_err(sql)?;
                let done: Option<i64> =
                    stmt.query_row(params![account, metric, request], |r| r.get(0)).optional().map_err(sql)?;
                if let Some(used) = done {
                    return Ok(UsageResult { allowed: true, used: to_u64(used) });
                }
            }
            let mut stmt = tx
                .prepare_cached("select count from usage where account_id = ?1 and metric = ?2 and day = ?3")
                .map_err(sql)?;
            let used: u64 =
                stmt.query_row(params![account, metric, day], |r| r.get(0)).optional().map_err(sql)?.map_or(0, to_u64);
            let next = used.saturating_add(count).min(to_u64(i64::MAX));
            if !limit.allows(next) {
                return Ok(UsageResult { allowed: false, used });
            }
            tx.prepare_cached(
                "insert into usage (account_id, metric, day, count) values (?1, ?2, ?3, ?4) \
                 on conflict (account_id, metric, day) do update set count = excluded.count",
            )
            .map_err(sql)?
            .execute(params![account, metric, day, to_i64(next)])
            .map_err(sql)?;
            if let Some((request, at)) = &request {
                tx.prepare_cached(
                    "insert into usage_keys (account_id, metric, key, requested_at, count, used) \
                     values (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(sql)?
                .execute(params![account, metric, request, at, to_i64(count), to_i64(next)])
                .map_err(sql)?;
            }
            Ok(UsageResult { allowed: true, used: next })
        })
        .await
    }

    async fn usage(&self, key: UsageKey) -> Result<u64, StoreError> {
        let (account, metric, day) = (key.account_id.to_string(), key.metric.as_str(), key.day.to_string());
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached("select count from usage where account_id = ?1 and metric = ?2 and day = ?3")
                .map_err(sql)?;
            let used: Option<i64> =
                stmt.query_row(params![account, metric, day], |r| r.get(0)).optional().map_err(sql)?;
            Ok(used.map_or(0, to_u64))
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|conn| conn.query_row("select count(*) from sqlite_schema", [], |_| Ok(())).map_err(sql)).await
    }

    async fn prune(&self, request: &PruneRequest) -> Result<PruneReport, StoreError> {
        let request = *request;
        self.write(move |tx| prune_in(tx, &request)).await
    }

    fn watch_changes(&self, listener: Weak<dyn ChangeListener>) -> bool {
        let Some(strong) = listener.upgrade() else { return true };
        lock(&self.shared.watchers).push(listener);
        strong.listening();
        self.watch_other_processes();
        true
    }
}

/// Writes an instance record.
pub(crate) fn put_instance(tx: &Transaction<'_>, instance: &InstanceRecord) -> Result<(), StoreError> {
    let mut stmt = tx
        .prepare_cached(
            "insert into instances (subscription_id, app_name, record, updated_at) values (?1, ?2, ?3, ?4) \
             on conflict (subscription_id) do update set app_name = excluded.app_name, record = excluded.record, \
             updated_at = excluded.updated_at",
        )
        .map_err(sql)?;
    stmt.execute(params![instance.subscription_id, instance.app_name, to_json(instance)?, micros(instance.updated_at)])
        .map_err(sql)?;
    Ok(())
}

/// The columns [`account`] reads.
pub(crate) const ACCOUNT_COLUMNS: &str = "id, stripe_customer_id, email, reference";

pub(crate) fn account(row: &rusqlite::Row<'_>) -> Result<Account, StoreError> {
    let id: String = row.get(0).map_err(sql)?;
    Ok(Account {
        id: Uuid::parse_str(&id).map_err(undecodable)?,
        stripe_customer_id: row.get(1).map_err(sql)?,
        email: row.get(2).map_err(sql)?,
        reference: row.get(3).map_err(sql)?,
    })
}
