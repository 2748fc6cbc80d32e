//! Conversions between the core's values and rows: instants as integer microseconds, the core's
//! composite values as JSON text.

use chrono::{DateTime, Utc};
use mindroom_billing_core::{
    AuditEntry, DriftRecord, EventSource, EventStatus, InstanceRecord, Job, JobKind, JobState, StoreError, StoredEvent,
    SubscriptionState,
};
use rusqlite::Row;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::undecodable;

/// An instant as stored.
pub(crate) fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

/// A stored instant.
pub(crate) fn instant(micros: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(micros).ok_or_else(|| undecodable(format!("instant {micros}")))
}

fn optional_instant(micros: Option<i64>) -> Result<Option<DateTime<Utc>>, StoreError> {
    micros.map(instant).transpose()
}

pub(crate) fn to_json<T: Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Other(Box::new(e)))
}

pub(crate) fn from_json<T: DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(undecodable)
}

/// A count as stored (SQLite integers are signed).
pub(crate) fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub(crate) fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

pub(crate) fn sql(e: rusqlite::Error) -> StoreError {
    crate::store_error(e)
}

/// The columns [`event`] reads, in its order.
pub(crate) const EVENT_COLUMNS: &str =
    "id, type, created, status, reason, payload, received_at, processed_at, deliveries, source";

pub(crate) fn event(row: &Row<'_>) -> Result<StoredEvent, StoreError> {
    let status: String = row.get(3).map_err(sql)?;
    let source: String = row.get(9).map_err(sql)?;
    Ok(StoredEvent {
        id: row.get(0).map_err(sql)?,
        event_type: row.get(1).map_err(sql)?,
        created: instant(row.get(2).map_err(sql)?)?,
        status: EventStatus::parse(&status).ok_or_else(|| undecodable(status))?,
        reason: row.get(4).map_err(sql)?,
        payload: row.get(5).map_err(sql)?,
        received_at: instant(row.get(6).map_err(sql)?)?,
        processed_at: optional_instant(row.get(7).map_err(sql)?)?,
        deliveries: u32::try_from(row.get::<_, i64>(8).map_err(sql)?).unwrap_or(u32::MAX),
        source: match source.as_str() {
            "api" => EventSource::Api,
            _ => EventSource::Webhook,
        },
    })
}

/// The columns [`subscription`] reads.
pub(crate) const SUBSCRIPTION_COLUMNS: &str = "state, version";

pub(crate) fn subscription(row: &Row<'_>) -> Result<SubscriptionState, StoreError> {
    let state: String = row.get(0).map_err(sql)?;
    let mut state: SubscriptionState = from_json(&state)?;
    state.version = to_u64(row.get(1).map_err(sql)?);
    Ok(state)
}

pub(crate) fn instance(row: &Row<'_>) -> Result<InstanceRecord, StoreError> {
    let record: String = row.get(0).map_err(sql)?;
    from_json(&record)
}

/// The columns [`job`] reads, in its order.
pub(crate) const JOB_COLUMNS: &str =
    "id, key, grp, kind, state, attempts, run_after, locked_until, last_error, created_at, updated_at";

pub(crate) fn job(row: &Row<'_>) -> Result<Job, StoreError> {
    let kind: String = row.get(3).map_err(sql)?;
    let state: String = row.get(4).map_err(sql)?;
    Ok(Job {
        id: row.get(0).map_err(sql)?,
        key: row.get(1).map_err(sql)?,
        group: row.get(2).map_err(sql)?,
        kind: from_json::<JobKind>(&kind)?,
        state: JobState::parse(&state).ok_or_else(|| undecodable(state))?,
        attempts: u32::try_from(row.get::<_, i64>(5).map_err(sql)?).unwrap_or(u32::MAX),
        run_after: instant(row.get(6).map_err(sql)?)?,
        locked_until: optional_instant(row.get(7).map_err(sql)?)?,
        last_error: row.get(8).map_err(sql)?,
        created_at: instant(row.get(9).map_err(sql)?)?,
        updated_at: instant(row.get(10).map_err(sql)?)?,
    })
}

/// The subscription a job's work names (its reconciles and e-mails).
pub(crate) fn job_about(kind: &JobKind) -> Option<&str> {
    match kind {
        JobKind::Reconcile { subscription_id } => Some(subscription_id),
        JobKind::Email { subscription_id, .. } => subscription_id.as_deref(),
        _ => None,
    }
}

/// Runs `query` and maps every row with `map`.
pub(crate) fn collect<T>(
    stmt: &mut rusqlite::Statement<'_>,
    params: impl rusqlite::Params,
    map: impl Fn(&Row<'_>) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut rows = stmt.query(params).map_err(sql)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(sql)? {
        out.push(map(row)?);
    }
    Ok(out)
}

/// The columns [`audit`] reads.
pub(crate) const AUDIT_COLUMNS: &str = "at, actor, action, target, customer_id, ok, result";

pub(crate) fn audit(r: &Row<'_>) -> Result<AuditEntry, StoreError> {
    Ok(AuditEntry {
        at: instant(r.get(0).map_err(sql)?)?,
        actor: r.get(1).map_err(sql)?,
        action: r.get(2).map_err(sql)?,
        target: r.get(3).map_err(sql)?,
        customer_id: r.get(4).map_err(sql)?,
        ok: r.get(5).map_err(sql)?,
        result: r.get(6).map_err(sql)?,
    })
}

/// The columns [`drift`] reads.
pub(crate) const DRIFT_COLUMNS: &str = "subscription_id, field, before, after, found_at";

pub(crate) fn drift(r: &Row<'_>) -> Result<DriftRecord, StoreError> {
    Ok(DriftRecord {
        subscription_id: r.get(0).map_err(sql)?,
        field: r.get(1).map_err(sql)?,
        before: r.get(2).map_err(sql)?,
        after: r.get(3).map_err(sql)?,
        found_at: instant(r.get(4).map_err(sql)?)?,
    })
}
