//! The operator port: what a support console reads and writes beyond the [`Store`] the billing path
//! uses. Kept as its own small trait (not more methods on [`Store`]) so the webhook path does not
//! grow, and so a read-only reporting adapter could implement only this.
//!
//! Every store adapter implements it ([`crate::MemoryStore`], and the PostgreSQL and PostgREST
//! stores); `operator_conformance::run_all` (feature `test-util`) holds them to the contract.
//!
//! [`Store`]: crate::Store

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::{Account, InstanceRecord, Job, StoredEvent, SubscriptionState};
use crate::ports::StoreError;
use crate::service::Drift;

/// One operator action, as recorded for audit: who did what, when, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When.
    pub at: DateTime<Utc>,
    /// Who (the console role that acted, e.g. `admin`).
    pub actor: String,
    /// What (`replay`, `retry_job`, `reconcile`).
    pub action: String,
    /// On what (an event id, a job id, a subscription id).
    pub target: String,
    /// The customer it concerns, when known (the customer page lists its audit rows).
    pub customer_id: Option<String>,
    /// Whether it succeeded.
    pub ok: bool,
    /// What came of it (a disposition, an error), one line.
    pub result: String,
}

/// What an operator may do in the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OperatorRole {
    /// Sees every page and may act (replay, retry, reconcile).
    Admin,
    /// Sees every page; every action is refused.
    ReadOnly,
}

impl OperatorRole {
    /// `admin` or `read-only` (as stored, and as `--role` takes it).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::ReadOnly => "read-only",
        }
    }

    /// Parses [`Self::as_str`] (and `readonly`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Self::Admin),
            "read-only" | "readonly" => Some(Self::ReadOnly),
            _ => None,
        }
    }
}

/// A named console operator. The password hash is an argon2 PHC string; it is redacted from `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operator {
    /// The login name (unique).
    pub name: String,
    /// What the operator may do.
    pub role: OperatorRole,
    /// argon2 PHC string.
    pub password_hash: String,
    /// When the operator was added.
    pub created_at: DateTime<Utc>,
}

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operator")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("password_hash", &"<redacted>")
            .field("created_at", &self.created_at)
            .finish()
    }
}

/// A console session as the store keeps it. `id` is what the store is asked by: the console stores
/// a digest of the cookie's secret there, never the secret itself.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorSession {
    /// The session's key in the store (a digest of the cookie value).
    pub id: String,
    /// The operator's name.
    pub operator: String,
    /// The role the session was opened with.
    pub role: OperatorRole,
    /// When it was opened (login).
    pub created_at: DateTime<Utc>,
    /// The last request it made.
    pub last_seen: DateTime<Utc>,
    /// When it ended (logout, password change, removal, timeout); `None` while live.
    pub ended_at: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for OperatorSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorSession")
            .field("id", &"<redacted>")
            .field("operator", &self.operator)
            .field("role", &self.role)
            .field("created_at", &self.created_at)
            .field("last_seen", &self.last_seen)
            .field("ended_at", &self.ended_at)
            .finish()
    }
}

/// Which sessions [`OperatorStore::touch_session`] still accepts: those seen since `idle_since`
/// and opened since `opened_since`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionCutoff {
    /// The request's time (the new `last_seen`, or the `ended_at` of a session found too old).
    pub now: DateTime<Utc>,
    /// A session last seen before this has been idle too long.
    pub idle_since: DateTime<Utc>,
    /// A session opened before this has lived too long.
    pub opened_since: DateTime<Utc>,
}

/// A difference the last reconciliation of a subscription found (see [`Drift`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftRecord {
    /// `sub_…`
    pub subscription_id: String,
    /// Which field (`tier`, `status`, `grace`, `instance`).
    pub field: String,
    /// Billing's value before.
    pub before: String,
    /// The value Stripe's object gives.
    pub after: String,
    /// When the reconciliation found it.
    pub found_at: DateTime<Utc>,
}

impl DriftRecord {
    /// The record of a drift found at `found_at`.
    pub fn of(drift: &Drift, found_at: DateTime<Utc>) -> Self {
        Self {
            subscription_id: drift.subscription_id.clone(),
            field: drift.field.label().to_owned(),
            before: drift.before.clone(),
            after: drift.after.clone(),
            found_at,
        }
    }
}

/// The customer a stored Stripe event concerns: `data.object.customer`, or `data.object.id` when
/// the object is a customer. `None` for a payload that is not JSON or names no customer. The SQL
/// function `billing_event_customer` computes the same (the PostgreSQL stores index it).
pub fn event_customer(payload: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Envelope {
        data: Data,
    }
    #[derive(Deserialize)]
    struct Data {
        object: Object,
    }
    #[derive(Deserialize)]
    struct Object {
        object: Option<String>,
        id: Option<serde_json::Value>,
        customer: Option<serde_json::Value>,
    }
    let envelope: Envelope = serde_json::from_str(payload).ok()?;
    let object = envelope.data.object;
    let value = if object.object.as_deref() == Some("customer") { object.id } else { object.customer };
    match value? {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    }
}

/// What a support console needs from the store beyond [`crate::Store`]: look-ups by the ids and
/// names a support request carries, the timeline of one customer, the lists that need attention,
/// the audit trail of operator actions and the drift found by reconciliation.
///
/// All reads are bounded by a `limit` and safe to run against a live store (no locks held beyond a
/// statement). Writes are the audit row, the drift of one reconciliation, and re-queueing a dead job.
#[async_trait]
pub trait OperatorStore: Send + Sync + 'static {
    /// Accounts whose e-mail equals `email`, ignoring case, at most `limit`.
    async fn accounts_by_email(&self, email: &str, limit: u32) -> Result<Vec<Account>, StoreError>;

    /// Stripe customer ids a support request may mean by `text`, sorted, at most `limit`: those whose
    /// account e-mail or platform reference contains it (ignoring case; taken literally, `%` and `_`
    /// are no patterns), and, when `text` is an invoice id (`in_…`), those with a subscription whose
    /// failed or paid invoices include it. An empty `text` finds nothing.
    async fn search_customers(&self, text: &str, limit: u32) -> Result<Vec<String>, StoreError>;

    /// The instance record whose app name is `app_name`.
    async fn instance_by_app(&self, app_name: &str) -> Result<Option<InstanceRecord>, StoreError>;

    /// The subscription aggregates of the Stripe customer `customer_id` (also those whose account
    /// row does not exist, e.g. when only invoices were seen).
    async fn subscriptions_for_customer(&self, customer_id: &str) -> Result<Vec<SubscriptionState>, StoreError>;

    /// The events that concern the customer (see [`event_customer`]), newest received first, at
    /// most `limit`. Stores that drop the payloads of old done events (the in-memory one) list only
    /// the events whose payload they keep.
    async fn events_for_customer(&self, customer_id: &str, limit: u32) -> Result<Vec<StoredEvent>, StoreError>;

    /// The jobs of a subscription, newest first, at most `limit`: those whose work names it (its
    /// reconciles and e-mails), and those whose work names no subscription but whose group is it.
    async fn jobs_for_subscription(&self, subscription_id: &str, limit: u32) -> Result<Vec<Job>, StoreError>;

    /// The job `job_id`, in whatever state.
    async fn load_job(&self, job_id: i64) -> Result<Option<Job>, StoreError>;

    /// Subscriptions with a grace period whose expiry is not handled yet, earliest deadline first, at
    /// most `limit`.
    async fn subscriptions_in_grace(&self, limit: u32) -> Result<Vec<SubscriptionState>, StoreError>;

    /// Every subscription aggregate, a page at a time: those whose id sorts after `after` (all when
    /// `None`), by subscription id (byte order), at most `limit`, each with its current version. A
    /// caller reads them all by passing the last id of each page until a page is short.
    async fn list_subscriptions(&self, after: Option<&str>, limit: u32) -> Result<Vec<SubscriptionState>, StoreError>;

    /// Subscriptions with at least one open dispute (see [`SubscriptionState::open_disputes`]),
    /// earliest evidence deadline of their open disputes first (those without a deadline last), at
    /// most `limit`.
    async fn open_disputes(&self, limit: u32) -> Result<Vec<SubscriptionState>, StoreError>;

    /// Re-queues a dead job: `pending`, due at `now`, its last error kept, and returns it as re-queued.
    /// Fenced: only a job that is `dead` changes; returns `None` (and writes nothing) for any other
    /// job or an unknown id. Its
    /// `attempts` keep counting (they are the lease fencing token), so the worker gives it one more
    /// attempt before its attempt limit marks it dead again.
    async fn retry_dead_job(&self, job_id: i64, now: DateTime<Utc>) -> Result<Option<Job>, StoreError>;

    /// Appends an audit row.
    async fn record_audit(&self, entry: &AuditEntry) -> Result<(), StoreError>;

    /// Audit rows, newest first, at most `limit`; only those of `customer_id` when given.
    async fn list_audit(&self, customer_id: Option<&str>, limit: u32) -> Result<Vec<AuditEntry>, StoreError>;

    /// Stores what one reconciliation found: for each subscription of `checked`, its drift is
    /// replaced by the entries of `drift` naming it (none: it is in sync now). Atomic.
    async fn save_drift(&self, checked: &[String], drift: &[DriftRecord]) -> Result<(), StoreError>;

    /// The drift the last reconciliation found, newest first, at most `limit`; only that of
    /// `subscription_id` when given.
    async fn list_drift(&self, subscription_id: Option<&str>, limit: u32) -> Result<Vec<DriftRecord>, StoreError>;

    /// Adds a named operator; `false` (and nothing written) when the name is taken.
    async fn add_operator(&self, operator: &Operator) -> Result<bool, StoreError>;

    /// The operator named `name`.
    async fn load_operator(&self, name: &str) -> Result<Option<Operator>, StoreError>;

    /// Every operator, by name.
    async fn list_operators(&self) -> Result<Vec<Operator>, StoreError>;

    /// Replaces an operator's password hash and ends all its live sessions at `now`, atomically;
    /// `false` for an unknown name.
    async fn set_operator_password(
        &self,
        name: &str,
        password_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// Removes an operator and ends all its live sessions at `now`, atomically; `false` for an
    /// unknown name.
    async fn remove_operator(&self, name: &str, now: DateTime<Utc>) -> Result<bool, StoreError>;

    /// Stores a new session (its `id` is unique: a random secret's digest).
    async fn create_session(&self, session: &OperatorSession) -> Result<(), StoreError>;

    /// The live session `id`, its `last_seen` set to `cutoff.now`. A session that has ended, or
    /// that is idle or old past the cutoff, is `None` (an idle or old one is ended at `now`).
    async fn touch_session(&self, id: &str, cutoff: &SessionCutoff) -> Result<Option<OperatorSession>, StoreError>;

    /// Ends the session `id` at `now`; `false` when it was not live.
    async fn end_session(&self, id: &str, now: DateTime<Utc>) -> Result<bool, StoreError>;
}

// Object safety is part of the contract: the console holds an `Arc<dyn OperatorStore>`.
const _: fn(&dyn OperatorStore) = |_| {};

#[cfg(test)]
mod tests {
    use super::event_customer;

    #[test]
    fn event_customer_reads_the_object_customer_or_a_customer_objects_id() {
        let sub = r#"{"data":{"object":{"object":"subscription","id":"sub_1","customer":"cus_1"}}}"#;
        let customer = r#"{"data":{"object":{"object":"customer","id":"cus_2","email":"a@b"}}}"#;
        let expanded = r#"{"data":{"object":{"object":"invoice","customer":{"id":"cus_3"}}}}"#;
        assert_eq!(event_customer(sub).as_deref(), Some("cus_1"));
        assert_eq!(event_customer(customer).as_deref(), Some("cus_2"));
        assert_eq!(event_customer(expanded), None);
        assert_eq!(event_customer("not json"), None);
        assert_eq!(event_customer(r#"{"data":{}}"#), None);
    }
}
