//! The JSON contract of the SQL functions, shared by both clients: every [`Store`] operation is one
//! call `public.billing_<op>(p jsonb) returns jsonb`. Ids and counts travel as JSON strings and
//! timestamps as RFC 3339 strings, so nothing goes through a float.
//!
//! [`Store`]: mindroom_billing_core::Store

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mindroom_billing_core::ports::{EventFilter, JobFilter, StoreError};
use mindroom_billing_core::{
    Account, Claim, Commit, CommitResult, EventStatus, Expected, InstanceRecord, Job, JobCounts, JobFinish,
    JobResolution, Limit, NewEvent, NewJob, Outcome, PruneReport, PruneRequest, Recorded, RecordedCommit, StoredEvent,
    SubscriptionState, SyncCursor, UsageKey, UsageResult,
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use uuid::Uuid;

pub(crate) mod operator;

/// Whether a SQLSTATE means "try again later": connection exceptions, shutdown, too many
/// connections / out of resources, serialization failure, deadlock, statement timeout, lock
/// timeout, read-only (fail-over in progress).
pub(crate) fn retryable_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || (code.starts_with("53") && code != "53400")
        || matches!(code, "57P01" | "57P02" | "57P03" | "57014" | "40001" | "40P01" | "55P03" | "25006")
}

/// One call of a store SQL function.
#[async_trait]
pub(crate) trait Rpc: Send + Sync {
    /// Calls `public.<function>(p)` in its own transaction and returns its jsonb result (`Null` for
    /// SQL NULL).
    async fn call(&self, function: &'static str, p: Value) -> Result<Value, StoreError>;
}

/// A response that does not match the functions' contract (schema mismatch, wrong migration…).
#[derive(Debug, thiserror::Error)]
#[error("unexpected result from {function}: {detail}")]
pub(crate) struct DecodeError {
    function: &'static str,
    detail: String,
}

fn decode_err(function: &'static str, detail: impl Into<String>) -> StoreError {
    StoreError::Other(Box::new(DecodeError { function, detail: detail.into() }))
}

fn decode<T: DeserializeOwned>(function: &'static str, value: Value) -> Result<T, StoreError> {
    serde_json::from_value(value).map_err(|e| decode_err(function, e.to_string()))
}

fn decode_opt<T: DeserializeOwned>(function: &'static str, value: Value) -> Result<Option<T>, StoreError> {
    if value.is_null() { Ok(None) } else { decode(function, value).map(Some) }
}

fn encode<T: serde::Serialize>(what: &'static str, value: &T) -> Result<Value, StoreError> {
    serde_json::to_value(value).map_err(|e| decode_err(what, format!("cannot encode: {e}")))
}

/// A JSON string or number holding an unsigned integer.
fn u64_field(function: &'static str, value: &Value, field: &str) -> Result<u64, StoreError> {
    let v = &value[field];
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .ok_or_else(|| decode_err(function, format!("field {field:?} is not an unsigned integer: {v}")))
}

fn to_i64(what: &'static str, n: u64) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| decode_err(what, format!("{n} does not fit a bigint")))
}

fn job_json(job: &NewJob) -> Result<Value, StoreError> {
    Ok(json!({
        "key": job.key,
        "group": job.group,
        "kind": encode("job kind", &job.kind)?,
        "run_after": job.run_after,
    }))
}

fn jobs_json(jobs: &[NewJob]) -> Result<Value, StoreError> {
    jobs.iter().map(job_json).collect::<Result<Vec<_>, _>>().map(Value::Array)
}

/// The public `subscriptions` row other services read, derived from the aggregate at `now`: `tier`
/// and `status` are what the customer subscribed to (Stripe's), `max_*` the effective limits (what
/// the entitlements answer says) and `entitlement_status` why.
pub(crate) fn subscription_public(state: &SubscriptionState, now: DateTime<Utc>) -> Value {
    let snapshot = state.snapshot.as_ref();
    let entitlement = state.entitlement(now);
    json!({
        "stripe_price_id": snapshot.map(|s| s.price_id.as_str()),
        "tier": snapshot.map(|s| s.tier.as_str()),
        "status": snapshot.map(|s| s.status.as_str()),
        "max_agents": entitlement.limits.agents.to_wire(),
        "max_messages_per_day": entitlement.limits.messages_per_day.to_wire(),
        "entitlement_status": entitlement.status.as_str(),
        "current_period_end": snapshot.and_then(|s| s.current_period_end),
        "trial_ends_at": snapshot.and_then(|s| s.trial_end),
        "cancelled_at": snapshot.and_then(|s| s.canceled_at),
        "grace_period_ends_at": state.grace.map(|g| g.ends_at),
    })
}

/// `cpu_millis` as an exact decimal string (`250` → `"0.250"`).
fn cpu_decimal(cpu_millis: u32) -> String {
    format!("{}.{:03}", cpu_millis / 1000, cpu_millis % 1000)
}

/// The public `instances` row other services read, derived from the instance record.
pub(crate) fn instance_public(record: &InstanceRecord) -> Value {
    json!({
        "dokku_app_name": record.app_name,
        "subdomain": record.subdomain,
        "status": record.status.as_str(),
        "frontend_url": record.frontend_url,
        "backend_url": record.backend_url,
        "memory_limit_mb": record.limits.map(|l| l.memory_mb),
        "cpu_limit": record.limits.map(|l| cpu_decimal(l.cpu_millis)),
        "deprovisioned_at": record.deprovisioned_at,
    })
}

pub(crate) async fn record_event<R: Rpc + ?Sized>(rpc: &R, event: &NewEvent<'_>) -> Result<Recorded, StoreError> {
    const F: &str = "billing_record_event";
    let out = rpc.call(F, record_payload(event)).await?;
    recorded_of(F, &out)
}

/// Records the event and loads its subscription's aggregate in one round trip.
pub(crate) async fn record_and_load<R: Rpc + ?Sized>(
    rpc: &R,
    event: &NewEvent<'_>,
    subscription_id: Option<&str>,
) -> Result<(Recorded, Option<SubscriptionState>), StoreError> {
    const F: &str = "billing_record_and_load";
    let mut p = record_payload(event);
    p["subscription_id"] = json!(subscription_id);
    let mut out = rpc.call(F, p).await?;
    let recorded = recorded_of(F, &out)?;
    let state = decode_opt(F, out.get_mut("subscription").map_or(Value::Null, Value::take))?;
    Ok((recorded, state))
}

/// Records the event and commits the decision made before it, in one round trip.
pub(crate) async fn record_and_commit<R: Rpc + ?Sized>(
    rpc: &R,
    event: &NewEvent<'_>,
    expected: Option<Expected<'_>>,
    commit: &Commit,
) -> Result<RecordedCommit, StoreError> {
    const F: &str = "billing_record_and_commit";
    let mut p = record_payload(event);
    p["expected"] = expected
        .map_or(Value::Null, |e| json!({ "subscription_id": e.subscription_id, "version": e.version.to_string() }));
    p["commit"] = commit_payload(commit)?;
    let mut out = rpc.call(F, p).await?;
    match out["result"].as_str() {
        Some("committed") => Ok(RecordedCommit::Committed),
        Some("duplicate") => Ok(RecordedCommit::Duplicate),
        Some("conflict") => {
            let current = decode_opt(F, out.get_mut("subscription").map_or(Value::Null, Value::take))?;
            Ok(RecordedCommit::Conflict(current.map(Box::new)))
        }
        _ => Err(decode_err(F, format!("bad result {out}"))),
    }
}

fn record_payload(event: &NewEvent<'_>) -> Value {
    json!({
        "id": event.id,
        "type": event.event_type,
        "created": event.created,
        "api_version": event.api_version,
        "livemode": event.livemode,
        "payload": event.payload,
        "received_at": event.received_at,
        "source": event.source.as_str(),
        "customer_id": event.customer_id,
    })
}

fn recorded_of(function: &'static str, out: &Value) -> Result<Recorded, StoreError> {
    let status = || {
        out["status"]
            .as_str()
            .and_then(EventStatus::parse)
            .ok_or_else(|| decode_err(function, format!("bad status in {out}")))
    };
    match out["recorded"].as_str() {
        Some("fresh") => Ok(Recorded::Fresh),
        Some("pending") => Ok(Recorded::Pending(status()?)),
        Some("done") => Ok(Recorded::Done(status()?)),
        _ => Err(decode_err(function, format!("bad result {out}"))),
    }
}

pub(crate) async fn load_event<R: Rpc + ?Sized>(rpc: &R, id: &str) -> Result<Option<StoredEvent>, StoreError> {
    const F: &str = "billing_load_event";
    decode_opt(F, rpc.call(F, json!({ "id": id })).await?)
}

pub(crate) async fn list_events<R: Rpc + ?Sized>(
    rpc: &R,
    filter: &EventFilter,
) -> Result<Vec<StoredEvent>, StoreError> {
    const F: &str = "billing_list_events";
    let p = json!({ "status": filter.status.map(EventStatus::as_str), "limit": filter.limit.to_string() });
    decode(F, rpc.call(F, p).await?)
}

pub(crate) async fn unapplied_events<R: Rpc + ?Sized>(
    rpc: &R,
    before: DateTime<Utc>,
    limit: u32,
) -> Result<Vec<StoredEvent>, StoreError> {
    const F: &str = "billing_unapplied_events";
    decode(F, rpc.call(F, json!({ "before": before, "limit": limit.to_string() })).await?)
}

pub(crate) async fn load_subscription<R: Rpc + ?Sized>(
    rpc: &R,
    subscription_id: &str,
) -> Result<Option<SubscriptionState>, StoreError> {
    const F: &str = "billing_load_subscription";
    decode_opt(F, rpc.call(F, json!({ "id": subscription_id })).await?)
}

fn commit_payload(commit: &Commit) -> Result<Value, StoreError> {
    let subscription = match &commit.subscription {
        None => Value::Null,
        Some(s) => {
            let mut state = encode("subscription state", s)?;
            if let Some(obj) = state.as_object_mut() {
                obj.remove("version"); // kept in its own column
            }
            json!({
                "id": s.subscription_id,
                "customer_id": s.customer_id,
                "account_id": s.account_id,
                "expected_version": s.version.to_string(),
                "state": state,
                "grace_ends_at": s.grace.map(|g| g.ends_at),
                "grace_expiry_handled": s.grace_expiry_handled,
                "terminal": s.status().is_some_and(mindroom_billing_core::SubscriptionStatus::is_terminal),
                "public": subscription_public(s, commit.now),
            })
        }
    };
    let account = commit.account.as_ref().map(|a| {
        json!({
            "account_id": mindroom_billing_core::account_id_for_customer(&a.stripe_customer_id),
            "stripe_customer_id": a.stripe_customer_id,
            "email": a.email,
            "reference": a.reference,
            "observed_at": a.observed_at,
        })
    });
    let reason = match &commit.outcome {
        Outcome::Failed(reason) => Some(reason.as_str()),
        _ => None,
    };
    Ok(json!({
        "now": commit.now,
        "event_id": commit.event_id,
        "outcome": commit.outcome.label(),
        "reason": reason,
        "subscription": subscription,
        "account": account,
        "jobs": jobs_json(&commit.jobs)?,
    }))
}

pub(crate) async fn commit<R: Rpc + ?Sized>(rpc: &R, commit: &Commit) -> Result<CommitResult, StoreError> {
    const F: &str = "billing_commit";
    let out = rpc.call(F, commit_payload(commit)?).await?;
    match out["result"].as_str() {
        Some("committed") => Ok(CommitResult::Committed),
        Some("already_done") => Ok(CommitResult::AlreadyDone),
        Some("conflict") => Err(StoreError::Conflict(
            commit.subscription.as_ref().map_or_else(String::new, |s| s.subscription_id.clone()),
        )),
        _ => Err(decode_err(F, format!("bad result {out}"))),
    }
}

pub(crate) async fn expired_grace<R: Rpc + ?Sized>(
    rpc: &R,
    now: DateTime<Utc>,
    limit: u32,
) -> Result<Vec<String>, StoreError> {
    const F: &str = "billing_expired_grace";
    decode(F, rpc.call(F, json!({ "now": now, "limit": limit.to_string() })).await?)
}

pub(crate) async fn subscriptions_for_account<R: Rpc + ?Sized>(
    rpc: &R,
    account_id: Uuid,
) -> Result<Vec<SubscriptionState>, StoreError> {
    const F: &str = "billing_subscriptions_for_account";
    decode(F, rpc.call(F, json!({ "account_id": account_id })).await?)
}

pub(crate) async fn load_account<R: Rpc + ?Sized>(
    rpc: &R,
    stripe_customer_id: &str,
) -> Result<Option<Account>, StoreError> {
    const F: &str = "billing_load_account";
    decode_opt(F, rpc.call(F, json!({ "stripe_customer_id": stripe_customer_id })).await?)
}

pub(crate) async fn accounts_by_reference<R: Rpc + ?Sized>(
    rpc: &R,
    reference: &str,
    limit: u32,
) -> Result<Vec<Account>, StoreError> {
    const F: &str = "billing_accounts_by_reference";
    decode(F, rpc.call(F, json!({ "reference": reference, "limit": limit.to_string() })).await?)
}

pub(crate) async fn load_instance<R: Rpc + ?Sized>(
    rpc: &R,
    subscription_id: &str,
) -> Result<Option<InstanceRecord>, StoreError> {
    const F: &str = "billing_load_instance";
    decode_opt(F, rpc.call(F, json!({ "subscription_id": subscription_id })).await?)
}

pub(crate) async fn enqueue<R: Rpc + ?Sized>(rpc: &R, jobs: &[NewJob]) -> Result<(), StoreError> {
    const F: &str = "billing_enqueue";
    let Some(first) = jobs.first() else { return Ok(()) };
    // Like the reference store, the enqueue time of a bare enqueue is the first job's `run_after`.
    rpc.call(F, json!({ "now": first.run_after, "jobs": jobs_json(jobs)? })).await.map(drop)
}

pub(crate) async fn claim_jobs<R: Rpc + ?Sized>(rpc: &R, claim: &Claim) -> Result<Vec<Job>, StoreError> {
    const F: &str = "billing_claim_jobs";
    let lease_us = claim.lease.num_microseconds().ok_or_else(|| decode_err(F, "lease out of range"))?.max(0);
    let p = json!({ "now": claim.now, "lease_us": lease_us.to_string(), "limit": claim.limit.to_string() });
    decode(F, rpc.call(F, p).await?)
}

pub(crate) async fn extend_lease<R: Rpc + ?Sized>(
    rpc: &R,
    job_id: i64,
    attempt: u32,
    locked_until: DateTime<Utc>,
) -> Result<bool, StoreError> {
    const F: &str = "billing_extend_lease";
    let p = json!({ "job_id": job_id.to_string(), "attempt": attempt.to_string(), "locked_until": locked_until });
    let out = rpc.call(F, p).await?;
    out.as_bool().ok_or_else(|| decode_err(F, format!("bad result {out}")))
}

pub(crate) async fn load_cursor<R: Rpc + ?Sized>(rpc: &R, name: &str) -> Result<Option<SyncCursor>, StoreError> {
    const F: &str = "billing_load_cursor";
    decode_opt(F, rpc.call(F, json!({ "name": name })).await?)
}

pub(crate) async fn save_cursor<R: Rpc + ?Sized>(rpc: &R, name: &str, cursor: &SyncCursor) -> Result<(), StoreError> {
    const F: &str = "billing_save_cursor";
    let p = json!({ "name": name, "created": cursor.created, "saved_at": cursor.saved_at });
    rpc.call(F, p).await.map(drop)
}

pub(crate) async fn try_lease<R: Rpc + ?Sized>(
    rpc: &R,
    name: &str,
    holder: &str,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<bool, StoreError> {
    const F: &str = "billing_try_lease";
    let out = rpc.call(F, json!({ "name": name, "holder": holder, "now": now, "until": until })).await?;
    out.as_bool().ok_or_else(|| decode_err(F, format!("bad result {out}")))
}

pub(crate) async fn finish_job<R: Rpc + ?Sized>(rpc: &R, finish: &JobFinish) -> Result<bool, StoreError> {
    const F: &str = "billing_finish_job";
    let resolution = match &finish.resolution {
        JobResolution::Done => json!({ "kind": "done" }),
        JobResolution::Retry { run_after, error } => json!({ "kind": "retry", "run_after": run_after, "error": error }),
        JobResolution::Dead { error } => json!({ "kind": "dead", "error": error }),
        JobResolution::Skipped { reason } => json!({ "kind": "skipped", "error": format!("skipped: {reason}") }),
    };
    let instance = match &finish.instance {
        None => Value::Null,
        Some(record) => instance_json(record)?,
    };
    let p = json!({
        "job_id": finish.job_id.to_string(),
        "attempt": finish.attempt.to_string(),
        "now": finish.now,
        "resolution": resolution,
        "instance": instance,
        "enqueue": jobs_json(&finish.enqueue)?,
    });
    let out = rpc.call(F, p).await?;
    out.as_bool().ok_or_else(|| decode_err(F, format!("bad result {out}")))
}

/// An instance record as `billing_finish_job` and `billing_record_instance_intent` store it.
fn instance_json(record: &InstanceRecord) -> Result<Value, StoreError> {
    Ok(json!({
        "subscription_id": record.subscription_id,
        "record": encode("instance record", record)?,
        "public": instance_public(record),
    }))
}

pub(crate) async fn record_instance_intent<R: Rpc + ?Sized>(
    rpc: &R,
    job_id: i64,
    attempt: u32,
    instance: &InstanceRecord,
) -> Result<bool, StoreError> {
    const F: &str = "billing_record_instance_intent";
    let p = json!({
        "job_id": job_id.to_string(),
        "attempt": attempt.to_string(),
        "now": instance.updated_at,
        "instance": instance_json(instance)?,
    });
    let out = rpc.call(F, p).await?;
    out.as_bool().ok_or_else(|| decode_err(F, format!("bad result {out}")))
}

pub(crate) async fn list_jobs<R: Rpc + ?Sized>(rpc: &R, filter: &JobFilter) -> Result<Vec<Job>, StoreError> {
    const F: &str = "billing_list_jobs";
    let p = json!({ "state": filter.state.map(mindroom_billing_core::JobState::as_str), "limit": filter.limit.to_string() });
    decode(F, rpc.call(F, p).await?)
}

pub(crate) async fn job_counts<R: Rpc + ?Sized>(rpc: &R) -> Result<JobCounts, StoreError> {
    const F: &str = "billing_job_counts";
    let out = rpc.call(F, json!({})).await?;
    Ok(JobCounts {
        pending: u64_field(F, &out, "pending")?,
        running: u64_field(F, &out, "running")?,
        dead: u64_field(F, &out, "dead")?,
        done: u64_field(F, &out, "done")?,
    })
}

fn usage_key_json(key: UsageKey) -> Value {
    json!({ "account_id": key.account_id, "metric": key.metric.as_str(), "day": key.day.to_string() })
}

pub(crate) async fn consume_usage<R: Rpc + ?Sized>(
    rpc: &R,
    key: UsageKey,
    count: u64,
    limit: Limit,
    idempotency: Option<mindroom_billing_core::UsageRequestKey<'_>>,
) -> Result<UsageResult, StoreError> {
    const F: &str = "billing_consume_usage";
    let mut p = usage_key_json(key);
    p["count"] = Value::String(to_i64(F, count)?.to_string());
    p["limit"] = Value::String(limit.to_wire().to_string());
    p["idempotency_key"] = json!(idempotency.map(|r| r.key));
    p["at"] = json!(idempotency.map(|r| r.at));
    let out = rpc.call(F, p).await?;
    let allowed = out["allowed"].as_bool().ok_or_else(|| decode_err(F, format!("bad result {out}")))?;
    Ok(UsageResult { allowed, used: u64_field(F, &out, "used")? })
}

pub(crate) async fn usage<R: Rpc + ?Sized>(rpc: &R, key: UsageKey) -> Result<u64, StoreError> {
    const F: &str = "billing_usage";
    let out = rpc.call(F, usage_key_json(key)).await?;
    out.as_u64()
        .or_else(|| out.as_str().and_then(|s| s.parse().ok()))
        .ok_or_else(|| decode_err(F, format!("bad result {out}")))
}

pub(crate) async fn ping<R: Rpc + ?Sized>(rpc: &R) -> Result<(), StoreError> {
    const F: &str = "billing_ping";
    rpc.call(F, json!({})).await.map(drop)
}

pub(crate) async fn prune<R: Rpc + ?Sized>(rpc: &R, request: &PruneRequest) -> Result<PruneReport, StoreError> {
    const F: &str = "billing_prune";
    let p = json!({
        "events_before": request.events_before,
        "payloads_before": request.payloads_before,
        "jobs_before": request.jobs_before,
        "email_jobs_before": request.email_jobs_before,
        "limit": request.limit.to_string(),
        "dry_run": request.dry_run,
    });
    let out = rpc.call(F, p).await?;
    Ok(PruneReport {
        events: u64_field(F, &out, "events")?,
        payloads: u64_field(F, &out, "payloads")?,
        jobs: u64_field(F, &out, "jobs")?,
    })
}

/// Implements [`mindroom_billing_core::Store`] for a type implementing [`Rpc`].
macro_rules! impl_store_via_rpc {
    ($ty:ty) => {
        crate::wire::impl_store_via_rpc!($ty {});
    };
    ($ty:ty { $($extra:tt)* }) => {
        #[async_trait::async_trait]
        impl mindroom_billing_core::Store for $ty {
            $($extra)*
            async fn record_event(
                &self,
                event: &mindroom_billing_core::NewEvent<'_>,
            ) -> Result<mindroom_billing_core::Recorded, mindroom_billing_core::StoreError> {
                crate::wire::record_event(self, event).await
            }
            async fn record_and_commit(
                &self,
                event: &mindroom_billing_core::NewEvent<'_>,
                expected: Option<mindroom_billing_core::Expected<'_>>,
                commit: &mindroom_billing_core::Commit,
            ) -> Result<mindroom_billing_core::RecordedCommit, mindroom_billing_core::StoreError> {
                crate::wire::record_and_commit(self, event, expected, commit).await
            }
            async fn record_and_load(
                &self,
                event: &mindroom_billing_core::NewEvent<'_>,
                subscription_id: Option<&str>,
            ) -> Result<
                (mindroom_billing_core::Recorded, Option<mindroom_billing_core::SubscriptionState>),
                mindroom_billing_core::StoreError,
            > {
                crate::wire::record_and_load(self, event, subscription_id).await
            }
            async fn load_event(
                &self,
                id: &str,
            ) -> Result<Option<mindroom_billing_core::StoredEvent>, mindroom_billing_core::StoreError> {
                crate::wire::load_event(self, id).await
            }
            async fn list_events(
                &self,
                filter: &mindroom_billing_core::ports::EventFilter,
            ) -> Result<Vec<mindroom_billing_core::StoredEvent>, mindroom_billing_core::StoreError> {
                crate::wire::list_events(self, filter).await
            }
            async fn unapplied_events(
                &self,
                before: chrono::DateTime<chrono::Utc>,
                limit: u32,
            ) -> Result<Vec<mindroom_billing_core::StoredEvent>, mindroom_billing_core::StoreError> {
                crate::wire::unapplied_events(self, before, limit).await
            }
            async fn load_subscription(
                &self,
                subscription_id: &str,
            ) -> Result<Option<mindroom_billing_core::SubscriptionState>, mindroom_billing_core::StoreError> {
                crate::wire::load_subscription(self, subscription_id).await
            }
            async fn commit(
                &self,
                commit: &mindroom_billing_core::Commit,
            ) -> Result<mindroom_billing_core::CommitResult, mindroom_billing_core::StoreError> {
                crate::wire::commit(self, commit).await
            }
            async fn expired_grace(
                &self,
                now: chrono::DateTime<chrono::Utc>,
                limit: u32,
            ) -> Result<Vec<String>, mindroom_billing_core::StoreError> {
                crate::wire::expired_grace(self, now, limit).await
            }
            async fn subscriptions_for_account(
                &self,
                account_id: uuid::Uuid,
            ) -> Result<Vec<mindroom_billing_core::SubscriptionState>, mindroom_billing_core::StoreError> {
                crate::wire::subscriptions_for_account(self, account_id).await
            }
            async fn load_account(
                &self,
                stripe_customer_id: &str,
            ) -> Result<Option<mindroom_billing_core::Account>, mindroom_billing_core::StoreError> {
                crate::wire::load_account(self, stripe_customer_id).await
            }
            async fn accounts_by_reference(
                &self,
                reference: &str,
                limit: u32,
            ) -> Result<Vec<mindroom_billing_core::Account>, mindroom_billing_core::StoreError> {
                crate::wire::accounts_by_reference(self, reference, limit).await
            }
            async fn load_instance(
                &self,
                subscription_id: &str,
            ) -> Result<Option<mindroom_billing_core::InstanceRecord>, mindroom_billing_core::StoreError> {
                crate::wire::load_instance(self, subscription_id).await
            }
            async fn enqueue(
                &self,
                jobs: &[mindroom_billing_core::NewJob],
            ) -> Result<(), mindroom_billing_core::StoreError> {
                crate::wire::enqueue(self, jobs).await
            }
            async fn claim_jobs(
                &self,
                claim: &mindroom_billing_core::Claim,
            ) -> Result<Vec<mindroom_billing_core::Job>, mindroom_billing_core::StoreError> {
                crate::wire::claim_jobs(self, claim).await
            }
            async fn finish_job(
                &self,
                finish: &mindroom_billing_core::JobFinish,
            ) -> Result<bool, mindroom_billing_core::StoreError> {
                crate::wire::finish_job(self, finish).await
            }
            async fn record_instance_intent(
                &self,
                job_id: i64,
                attempt: u32,
                instance: &mindroom_billing_core::InstanceRecord,
            ) -> Result<bool, mindroom_billing_core::StoreError> {
                crate::wire::record_instance_intent(self, job_id, attempt, instance).await
            }
            async fn extend_lease(
                &self,
                job_id: i64,
                attempt: u32,
                locked_until: chrono::DateTime<chrono::Utc>,
            ) -> Result<bool, mindroom_billing_core::StoreError> {
                crate::wire::extend_lease(self, job_id, attempt, locked_until).await
            }
            async fn load_cursor(
                &self,
                name: &str,
            ) -> Result<Option<mindroom_billing_core::SyncCursor>, mindroom_billing_core::StoreError> {
                crate::wire::load_cursor(self, name).await
            }
            async fn save_cursor(
                &self,
                name: &str,
                cursor: &mindroom_billing_core::SyncCursor,
            ) -> Result<(), mindroom_billing_core::StoreError> {
                crate::wire::save_cursor(self, name, cursor).await
            }
            async fn try_lease(
                &self,
                name: &str,
                holder: &str,
                now: chrono::DateTime<chrono::Utc>,
                until: chrono::DateTime<chrono::Utc>,
            ) -> Result<bool, mindroom_billing_core::StoreError> {
                crate::wire::try_lease(self, name, holder, now, until).await
            }
            async fn list_jobs(
                &self,
                filter: &mindroom_billing_core::ports::JobFilter,
            ) -> Result<Vec<mindroom_billing_core::Job>, mindroom_billing_core::StoreError> {
                crate::wire::list_jobs(self, filter).await
            }
            async fn job_counts(&self) -> Result<mindroom_billing_core::JobCounts, mindroom_billing_core::StoreError> {
                crate::wire::job_counts(self).await
            }
            async fn consume_usage(
                &self,
                key: mindroom_billing_core::UsageKey,
                count: u64,
                limit: mindroom_billing_core::Limit,
                idempotency: Option<mindroom_billing_core::UsageRequestKey<'_>>,
            ) -> Result<mindroom_billing_core::UsageResult, mindroom_billing_core::StoreError> {
                crate::wire::consume_usage(self, key, count, limit, idempotency).await
            }
            async fn usage(
                &self,
                key: mindroom_billing_core::UsageKey,
            ) -> Result<u64, mindroom_billing_core::StoreError> {
                crate::wire::usage(self, key).await
            }
            async fn ping(&self) -> Result<(), mindroom_billing_core::StoreError> {
                crate::wire::ping(self).await
            }
            async fn prune(
                &self,
                request: &mindroom_billing_core::PruneRequest,
            ) -> Result<mindroom_billing_core::PruneReport, mindroom_billing_core::StoreError> {
                crate::wire::prune(self, request).await
            }
        }
    };
}
pub(crate) use impl_store_via_rpc;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_an_exact_decimal() {
        assert_eq!(cpu_decimal(250), "0.250");
        assert_eq!(cpu_decimal(4000), "4.000");
        assert_eq!(cpu_decimal(2500), "2.500");
    }

    #[test]
    fn commit_payload_carries_versions_as_strings_and_no_version_in_state() {
        let mut s = SubscriptionState::new("sub_1", "cus_1");
        s.version = u64::MAX;
        let commit = Commit {
            now: DateTime::<Utc>::UNIX_EPOCH,
            event_id: None,
            outcome: Outcome::Failed("why".into()),
            subscription: Some(s),
            account: None,
            jobs: vec![],
        };
        let p = commit_payload(&commit).unwrap();
        assert_eq!(p["subscription"]["expected_version"], "18446744073709551615");
        assert!(p["subscription"]["state"].get("version").is_none());
        assert_eq!((p["outcome"].as_str(), p["reason"].as_str()), (Some("failed"), Some("why")));
        assert_eq!(p["subscription"]["public"]["tier"], Value::Null);
    }
}
