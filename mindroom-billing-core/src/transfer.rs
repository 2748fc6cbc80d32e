//! Moving a store's whole contents into another store (`mindroom-billing store copy`, e.g. from the
//! embedded SQLite file to PostgreSQL when one machine is not enough): the rows as the core's
//! values, so that the exporting and the importing adapter share a vocabulary and know nothing of
//! each other. Everything is copied as it is: events with their raw payloads, statuses and
//! delivery counts, aggregates with their versions, jobs with their ids, states and attempts.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::model::{Account, InstanceRecord, StoredEvent, SubscriptionState, SyncCursor, UsageKey};
use crate::operator::{AuditEntry, DriftRecord};
use crate::tier::Metric;

/// A stored event with the envelope fields a [`StoredEvent`] leaves out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// The event as stored (payload byte for byte; empty once pruned).
    pub event: StoredEvent,
    /// Its `api_version`.
    pub api_version: Option<String>,
    /// Its `livemode`.
    pub livemode: bool,
}

/// An account with when the fact its e-mail came from was created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRecord {
    /// The account.
    pub account: Account,
    /// `created` of the event the e-mail came from (the newest fact wins).
    pub email_observed_at: Option<DateTime<Utc>>,
}

/// A usage counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageRecord {
    /// Account, metric and day.
    pub key: UsageKey,
    /// The count.
    pub count: u64,
}

/// An allowed usage call remembered by its idempotency key (per account, metric and key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageKeyRecord {
    /// Account.
    pub account_id: Uuid,
    /// The metric it counted.
    pub metric: Metric,
    /// The idempotency key.
    pub key: String,
    /// When the first call was made (the key is remembered from then).
    pub requested_at: DateTime<Utc>,
    /// What it counted.
    pub count: u64,
    /// The counter after it (its answer).
    pub used: u64,
}

/// Everything but the events and jobs (which are moved in pages).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateRecords {
    /// Subscription aggregates, with their versions.
    pub subscriptions: Vec<SubscriptionState>,
    /// Accounts.
    pub accounts: Vec<AccountRecord>,
    /// Instance records.
    pub instances: Vec<InstanceRecord>,
    /// Usage counters.
    pub usage: Vec<UsageRecord>,
    /// Remembered usage calls.
    pub usage_keys: Vec<UsageKeyRecord>,
    /// Named cursors (singleton leases are not moved: they expire).
    pub cursors: Vec<(String, SyncCursor)>,
    /// Operator actions, oldest first.
    pub audit: Vec<AuditEntry>,
    /// Drift found by the last reconciliations.
    pub drift: Vec<DriftRecord>,
}

/// How many rows of each kind a store holds (a copy is verified by comparing them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransferCounts {
    /// Events.
    pub events: u64,
    /// Subscription aggregates.
    pub subscriptions: u64,
    /// Accounts.
    pub accounts: u64,
    /// Instance records.
    pub instances: u64,
    /// Jobs.
    pub jobs: u64,
    /// Usage counters.
    pub usage: u64,
    /// Remembered usage calls.
    pub usage_keys: u64,
    /// Cursors.
    pub cursors: u64,
    /// Audit rows.
    pub audit: u64,
    /// Drift rows.
    pub drift: u64,
}

impl TransferCounts {
    /// The kinds with their names, for a report.
    pub fn named(&self) -> [(&'static str, u64); 10] {
        [
            ("events", self.events),
            ("subscriptions", self.subscriptions),
            ("accounts", self.accounts),
            ("instances", self.instances),
            ("jobs", self.jobs),
            ("usage counters", self.usage),
            ("usage keys", self.usage_keys),
            ("cursors", self.cursors),
            ("audit rows", self.audit),
            ("drift rows", self.drift),
        ]
    }
}
