//! The ports: the traits adapters implement. Each method documents what must be atomic and what is
//! idempotent; the `conformance` module (feature `test-util`) checks a store against these contracts.

use std::error::Error as StdError;
use std::sync::Weak;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::model::{
    Account, Claim, Commit, CommitResult, EventStatus, Expected, InstanceRecord, Job, JobCounts, JobFinish, JobState,
    NewEvent, NewJob, Recorded, RecordedCommit, StoredEvent, SubscriptionState, SyncCursor, UsageKey, UsageRequestKey,
    UsageResult,
};
use crate::retention::{PruneReport, PruneRequest};
use crate::tier::{Limit, Limits, Tier};

/// A boxed error source.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// A store failure. Adapters map their driver errors into these kinds; driver types stay private.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store cannot be reached or is overloaded; retry later (HTTP 503).
    #[error("store unavailable")]
    Unavailable(#[source] BoxError),
    /// A compare-and-swap lost: the aggregate changed since it was loaded. Reload and decide again.
    #[error("concurrent update of {0}")]
    Conflict(String),
    /// Anything else (a bug, a schema mismatch…).
    #[error("store error")]
    Other(#[source] BoxError),
}

impl StoreError {
    /// Whether trying again later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Conflict(_))
    }
}

/// Filter for listing events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Only this status.
    pub status: Option<EventStatus>,
    /// At most this many, newest first.
    pub limit: u32,
}

/// Filter for listing jobs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    /// Only this state.
    pub state: Option<JobState>,
    /// At most this many, newest first.
    pub limit: u32,
}

/// Durable billing state. Every method is safe to call from many replicas at once; nothing may rely
/// on in-process locks for correctness.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records a verified event by id, idempotently. The first call stores it as `received` and
    /// returns [`Recorded::Fresh`]; later calls store nothing new (they may count the delivery) and
    /// return `Pending` (received/failed: apply it) or `Done` (a duplicate). Exactly one of any number
    /// of concurrent calls for one id gets `Fresh`. The payload is kept byte for byte.
    async fn record_event(&self, event: &NewEvent<'_>) -> Result<Recorded, StoreError>;

    /// Records an event (exactly as [`Store::record_event`]) and, unless it is already done, loads the
    /// aggregate of `subscription_id` — the webhook's hot path. The loaded aggregate is only the
    /// starting point of a compare-and-swap, so it may be read in the same transaction or just after.
    /// Stores that can do both in one round trip override this; the default makes two calls.
    async fn record_and_load(
        &self,
        event: &NewEvent<'_>,
        subscription_id: Option<&str>,
    ) -> Result<(Recorded, Option<SubscriptionState>), StoreError> {
        let recorded = self.record_event(event).await?;
        let state = match (recorded, subscription_id) {
            (Recorded::Done(_), _) | (_, None) => None,
            (_, Some(id)) => self.load_subscription(id).await?,
        };
        Ok((recorded, state))
    }

    /// Records an event and commits a decision made before it was recorded, on the aggregate the
    /// caller already held (`expected`: its subscription and version, 0 = absent) — a new webhook
    /// event in one round trip when the caller has the aggregate cached. Atomically:
    /// - an event already done is a [`RecordedCommit::Duplicate`] (the delivery may be counted);
    /// - when the stored aggregate is not at the expected version, the event is recorded as
    ///   pending and nothing else is written: [`RecordedCommit::Conflict`] with the current aggregate;
    /// - otherwise the event is recorded (payload byte for byte, as [`Store::record_event`]) and
    ///   `commit` is applied as [`Store::commit`] applies it, with the same compare-and-swap.
    ///
    /// The default records, compares and commits in three calls; stores that can do it in one
    /// transaction override it.
    async fn record_and_commit(
        &self,
        event: &NewEvent<'_>,
        expected: Option<Expected<'_>>,
        commit: &Commit,
    ) -> Result<RecordedCommit, StoreError> {
        if let Recorded::Done(_) = self.record_event(event).await? {
            return Ok(RecordedCommit::Duplicate);
        }
        let current = match expected {
            Some(expected) => {
                let current = self.load_subscription(expected.subscription_id).await?;
                if current.as_ref().map_or(0, |s| s.version) != expected.version {
                    return Ok(RecordedCommit::Conflict(current.map(Box::new)));
                }
                Some(expected.subscription_id)
            }
            None => None,
        };
        match self.commit(commit).await {
            Ok(CommitResult::Committed) => Ok(RecordedCommit::Committed),
            Ok(CommitResult::AlreadyDone) => Ok(RecordedCommit::Duplicate),
            Err(StoreError::Conflict(_)) => Ok(RecordedCommit::Conflict(match current {
                Some(id) => self.load_subscription(id).await?.map(Box::new),
                None => None,
            })),
            Err(e) => Err(e),
        }
    }

    /// Loads a stored event.
    async fn load_event(&self, id: &str) -> Result<Option<StoredEvent>, StoreError>;

    /// Lists events, newest first.
    async fn list_events(&self, filter: &EventFilter) -> Result<Vec<StoredEvent>, StoreError>;

    /// Events still `received` that were received before `before` (their commit never happened).
    async fn unapplied_events(&self, before: DateTime<Utc>, limit: u32) -> Result<Vec<StoredEvent>, StoreError>;

    /// Loads a subscription aggregate (with its current version).
    async fn load_subscription(&self, subscription_id: &str) -> Result<Option<SubscriptionState>, StoreError>;

    /// Atomically: if `commit.event_id` is set and that event is already done, writes nothing and
    /// returns [`CommitResult::AlreadyDone`]. Otherwise writes the aggregate with compare-and-swap
    /// (stored version must equal `subscription.version`, 0 meaning "absent"; on mismatch returns
    /// [`StoreError::Conflict`] and writes nothing), bumping its version; applies the account patch;
    /// enqueues the jobs (skipping keys that exist); and sets the event's status from the outcome.
    async fn commit(&self, commit: &Commit) -> Result<CommitResult, StoreError>;

    /// Subscriptions whose grace period ended at or before `now`, whose expiry is not handled yet and
    /// whose status is not terminal.
    async fn expired_grace(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<String>, StoreError>;

    /// The subscriptions of an account.
    async fn subscriptions_for_account(&self, account_id: Uuid) -> Result<Vec<SubscriptionState>, StoreError>;

    /// An account by its Stripe customer id.
    async fn load_account(&self, stripe_customer_id: &str) -> Result<Option<Account>, StoreError>;

    /// The accounts whose platform reference ([`Account::reference`], the Checkout
    /// `client_reference_id`) is exactly `reference`, ordered by Stripe customer id, at most `limit`.
    async fn accounts_by_reference(&self, reference: &str, limit: u32) -> Result<Vec<Account>, StoreError>;

    /// The instance record of a subscription. A read: it writes nothing. A store that shares its
    /// database with the service billing took over may answer a record adopted from that service's
    /// rows (`adopted`), persisted only when a job writes it ([`Store::record_instance_intent`],
    /// [`Store::finish_job`]).
    async fn load_instance(&self, subscription_id: &str) -> Result<Option<InstanceRecord>, StoreError>;

    /// Enqueues jobs; a job whose key exists is skipped (so each keyed effect is queued once).
    async fn enqueue(&self, jobs: &[NewJob]) -> Result<(), StoreError>;

    /// Claims up to `limit` due jobs: `pending` with `run_after <= now`, or `running` with an expired
    /// lease; and only a job with no earlier unfinished (`pending`/`running`) job in its group. Each
    /// claimed job becomes `running` with `locked_until = now + lease` and `attempts + 1`. Concurrent
    /// claimers never get the same job while its lease holds.
    async fn claim_jobs(&self, claim: &Claim) -> Result<Vec<Job>, StoreError>;

    /// Finishes a claimed job atomically with its instance record and follow-up jobs. Returns `false`
    /// (and writes nothing) when the job is no longer `running` at `attempt` (the lease was lost).
    async fn finish_job(&self, finish: &JobFinish) -> Result<bool, StoreError>;

    /// Records the instance a claimed job is about to act on, before its provisioner call: the
    /// intent that lets a later attempt or job converge when the call's outcome is never learnt (a
    /// timeout, a reset connection, a worker that died). Stored exactly as [`Store::finish_job`]
    /// stores an instance (and, like it, persists an adopted record), without finishing the job.
    /// Returns `false` (and writes nothing) when the job is no longer `running` at `attempt`.
    async fn record_instance_intent(
        &self,
        job_id: i64,
        attempt: u32,
        instance: &InstanceRecord,
    ) -> Result<bool, StoreError>;

    /// Extends the lease of a job still `running` at `attempt` to `locked_until` (the worker renews
    /// it while a slow call is in flight, so no other worker takes the job over meanwhile). Returns
    /// `false` (and writes nothing) when the lease was already lost.
    async fn extend_lease(&self, job_id: i64, attempt: u32, locked_until: DateTime<Utc>) -> Result<bool, StoreError>;

    /// The cursor saved under `name` (e.g. Stripe catch-up's), if any.
    async fn load_cursor(&self, name: &str) -> Result<Option<SyncCursor>, StoreError>;

    /// Saves the cursor `name` (last write wins; only the lease holder writes it).
    async fn save_cursor(&self, name: &str, cursor: &SyncCursor) -> Result<(), StoreError>;

    /// Takes or renews the named singleton lease (one replica at a time runs a periodic task): granted
    /// to `holder` when it is free, expired at `now`, or already `holder`'s, and then held until
    /// `until`. Of concurrent callers for a free lease exactly one gets `true`.
    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// Lists jobs, newest first.
    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, StoreError>;

    /// Counts jobs by state.
    async fn job_counts(&self) -> Result<JobCounts, StoreError>;

    /// Atomically adds `count` (at most `i64::MAX`) to the counter if the result stays within `limit`;
    /// otherwise leaves it unchanged and answers `allowed: false`.
    ///
    /// With an `idempotency` key, an allowed call is remembered per account, metric and key for
    /// [`USAGE_KEY_HOURS`](crate::model::USAGE_KEY_HOURS) from its `at`, atomically with its
    /// increment: a later call with the same account, metric and key within that time (whatever its
    /// UTC day) counts nothing and answers the remembered result, also when both run at once; after
    /// it, the key is a new call. A refused call counted nothing and is not remembered, so its retry
    /// is decided again.
    async fn consume_usage(
        &self,
        key: UsageKey,
        count: u64,
        limit: Limit,
        idempotency: Option<UsageRequestKey<'_>>,
    ) -> Result<UsageResult, StoreError>;

    /// Reads a counter (0 if absent).
    async fn usage(&self, key: UsageKey) -> Result<u64, StoreError>;

    /// Answers when the store is reachable.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Prunes old history, at most `request.limit` rows of each kind (one short transaction):
    /// deletes done (applied, stale, ignored) events received before `events_before`; empties the
    /// payload of done events received before `payloads_before` but not before `events_before` (the
    /// row and its status stay, so a redelivery is still a duplicate; an empty payload means
    /// "pruned"); deletes `done` jobs created and last updated before `jobs_before` (their keys are
    /// forgotten with them). Received and failed events and pending, running and dead jobs are never
    /// touched. Rows another transaction holds are skipped, so concurrent calls never wait on each
    /// other or on the hot path. With `dry_run` nothing changes and the report counts everything
    /// that calls without `dry_run` would prune, ignoring `limit`.
    async fn prune(&self, request: &PruneRequest) -> Result<PruneReport, StoreError>;

    /// Starts telling `listener` about account changes committed from now on, by this or any other
    /// replica (a per-replica read cache drops what they make stale), until `listener` is dropped.
    /// Returns `false` when this store cannot (the default): readers then bound how stale a cached
    /// answer may be with a time-to-live instead.
    ///
    /// A store calls [`ChangeListener::listening`] once changes are reported (and again after each
    /// reconnection), then [`ChangeListener::account_changed`] after each commit that wrote a
    /// subscription aggregate, naming its account, and [`ChangeListener::lost`] whenever changes may
    /// have been missed. Must be called from within a Tokio runtime when the store listens with a
    /// background task.
    fn watch_changes(&self, listener: Weak<dyn ChangeListener>) -> bool {
        let _ = listener;
        false
    }
}

/// Receives the account changes a store reports (see [`Store::watch_changes`]). Called from the
/// store's listening task or commit path: implementations must be quick and never block on I/O.
pub trait ChangeListener: Send + Sync + 'static {
    /// Changes committed from now on are reported; anything cached before may be stale.
    fn listening(&self);
    /// A commit changed the subscriptions of `account_id` (it is visible to readers now).
    fn account_changed(&self, account_id: Uuid);
    /// Changes may have been missed (the listening connection was lost) until the next
    /// [`ChangeListener::listening`].
    fn lost(&self);
}

/// A provisioner failure, classified for the job worker's retry policy.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProvisionError {
    /// Try again later (connect error, timeout, 5xx, 429).
    #[error("provisioner temporarily failed: {message}")]
    Retryable {
        /// What happened.
        message: String,
        /// The server's `Retry-After`, if any.
        retry_after: Option<Duration>,
        /// The cause.
        #[source]
        source: Option<BoxError>,
    },
    /// Will not succeed by retrying (4xx, malformed response).
    #[error("provisioner refused: {message}")]
    Permanent {
        /// What happened.
        message: String,
        /// The cause.
        #[source]
        source: Option<BoxError>,
    },
}

impl ProvisionError {
    /// A retryable error with a message.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::Retryable { message: message.into(), retry_after: None, source: None }
    }

    /// A permanent error with a message.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::Permanent { message: message.into(), source: None }
    }

    /// Whether retrying can help.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable { .. })
    }

    /// The server-requested delay, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Retryable { retry_after, .. } => *retry_after,
            Self::Permanent { .. } => None,
        }
    }
}

/// A request to create an instance.
#[derive(Debug, Clone, PartialEq)]
pub struct ProvisionRequest {
    /// `sub_…`
    pub subscription_id: String,
    /// `cus_…`
    pub customer_id: String,
    /// Account.
    pub account_id: Uuid,
    /// Deterministic app name, so a retried provision converges on one app.
    pub app_name: String,
    /// Tier.
    pub tier: Tier,
    /// Limits.
    pub limits: Limits,
    /// Sent as `Idempotency-Key`.
    pub idempotency_key: String,
}

/// What the provisioner created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionedInstance {
    /// Dokku app name.
    pub app_name: String,
    /// Subdomain.
    pub subdomain: Option<String>,
    /// Frontend URL.
    pub frontend_url: Option<String>,
    /// Backend URL.
    pub backend_url: Option<String>,
}

/// Creates, resizes and removes instances. Each call carries an idempotency key; implementations
/// must make a repeated call with the same key (or the same app name) converge on one result.
#[async_trait]
pub trait Provisioner: Send + Sync + 'static {
    /// Creates the instance (or returns the existing one of that app name).
    async fn provision(&self, request: &ProvisionRequest) -> Result<ProvisionedInstance, ProvisionError>;

    /// Applies new limits to an existing instance.
    async fn update_limits(&self, app_name: &str, limits: &Limits, idempotency_key: &str)
    -> Result<(), ProvisionError>;

    /// Removes the instance; an instance that is already gone is a success.
    async fn deprovision(&self, app_name: &str, idempotency_key: &str) -> Result<(), ProvisionError>;
}

/// A notification to deliver.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    /// Recipient address.
    pub to: String,
    /// What to say.
    pub message: Message,
    /// Sent as the provider's idempotency key, so a retried job never sends twice.
    pub idempotency_key: String,
}

/// The e-mails billing sends, with the data their templates need.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Message {
    /// The instance is ready.
    Welcome {
        /// Tier.
        tier: Tier,
        /// Where to reach it.
        instance_url: Option<String>,
    },
    /// A payment failed.
    PaymentFailed {
        /// Amount due, minor unit.
        amount_due: i64,
        /// Currency.
        currency: String,
        /// When the instance will be removed if nothing is paid.
        grace_deadline: Option<DateTime<Utc>>,
        /// Where to update the payment method.
        update_payment_url: Option<String>,
    },
    /// A renewal waits for the customer to confirm the payment (3-D Secure).
    PaymentActionRequired {
        /// Amount due, minor unit.
        amount_due: i64,
        /// Currency.
        currency: String,
        /// When the instance will be removed if the payment is not confirmed.
        grace_deadline: Option<DateTime<Utc>>,
        /// Where the customer confirms the payment (the invoice's `hosted_invoice_url`).
        confirm_url: Option<String>,
    },
    /// The grace period ended; the instance was removed.
    GraceExpired,
    /// The trial ends soon.
    TrialEnding {
        /// When.
        trial_end: Option<DateTime<Utc>>,
    },
    /// The subscription was canceled.
    Cancellation,
    /// An operator alert.
    AdminAlert {
        /// Subject.
        subject: String,
        /// Details.
        detail: String,
    },
}

/// A notifier failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NotifyError {
    /// Try again later.
    #[error("notification temporarily failed: {0}")]
    Retryable(String),
    /// Will not succeed by retrying.
    #[error("notification refused: {0}")]
    Permanent(String),
}

/// Sends notifications (e-mail).
#[async_trait]
pub trait Notifier: Send + Sync + 'static {
    /// Sends one notification.
    async fn send(&self, notification: &Notification) -> Result<(), NotifyError>;
}

/// The time source. The pure core takes time as an argument; the orchestrator asks this port.
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // the one place the core reads the wall clock
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

// Object safety is part of the contract: adapters are used as `Arc<dyn …>`.
const _: fn(&dyn Store, &dyn Provisioner, &dyn Notifier, &dyn Clock) = |_, _, _, _| {};
const _: fn(&dyn ChangeListener) = |_| {};
