//! The orchestrator: the imperative shell over the pure core. It verifies and records webhooks,
//! commits decisions and runs the grace sweeper here; the job worker is in `worker`, usage and
//! entitlements in `usage`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use std::borrow::Cow;

use crate::event::{self, Event, EventObject, EventType, ParseError};
use crate::model::{
    Commit, CommitResult, EventSource, Expected, JobKind, NewEvent, NewJob, Outcome, Recorded, RecordedCommit,
    StoredEvent, SubscriptionState,
};
use crate::ports::{Clock, Notifier, Provisioner, Store, StoreError, SystemClock};
use crate::retention::RetentionPolicy;
use crate::signature::{SignatureError, Verifier};
use crate::stripe_api::StripeApi;
use crate::transition::{self, Policy};

mod cache;
mod retention;
mod sync;
mod usage;
mod worker;

pub use cache::CacheConfig;

pub use sync::{CATCH_UP_TYPES, CatchUpReport, Drift, DriftField, ReconcileReport, StripeSyncConfig, SyncError};
pub use usage::{AccountLookupError, AccountName, Entitlements, UsageReport, UsageToday};
pub use worker::app_name_for;

/// How many times a commit is re-decided after losing a compare-and-swap.
const MAX_COMMIT_ATTEMPTS: u32 = 16;

/// Job worker and sweeper settings.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerConfig {
    /// Lease of a claimed job; after it another worker may take the job over.
    pub lease: chrono::Duration,
    /// Attempts before a job is dead.
    pub max_attempts: u32,
    /// First retry delay; doubled per attempt, with jitter.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Idle wait between polls of the job table.
    pub poll_interval: Duration,
    /// Concurrent job runners per process.
    pub concurrency: usize,
    /// How often the grace sweeper and the unapplied-event pick-up run.
    pub sweep_interval: Duration,
    /// A `received` event older than this is applied by the worker without waiting for Stripe.
    pub unapplied_after: chrono::Duration,
    /// How long a customer e-mail whose address is not known yet keeps waiting for an event that
    /// brings it (retried with backoff, whatever `max_attempts` says) before it is given up.
    pub email_address_wait: chrono::Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            lease: chrono::Duration::seconds(120),
            max_attempts: 10,
            backoff_base: Duration::from_secs(2),
            backoff_max: Duration::from_secs(600),
            poll_interval: Duration::from_millis(500),
            concurrency: 4,
            sweep_interval: Duration::from_secs(30),
            unapplied_after: chrono::Duration::seconds(60),
            email_address_wait: chrono::Duration::hours(24),
        }
    }
}

/// Everything the orchestrator is configured with.
#[derive(Debug, Clone)]
pub struct BillingConfig {
    /// Webhook secrets and tolerance.
    pub verifier: Verifier,
    /// Prices and grace period.
    pub policy: Policy,
    /// Worker settings.
    pub worker: WorkerConfig,
    /// Where operator alerts go; without it they are only logged.
    pub admin_email: Option<String>,
    /// Catch-up and reconciliation from the Stripe API (used when one is configured).
    pub stripe_sync: StripeSyncConfig,
    /// The per-replica entitlement cache.
    pub cache: CacheConfig,
    /// How long event payloads, event ids and finished jobs are kept; the worker prunes the rest.
    pub retention: RetentionPolicy,
}

impl BillingConfig {
    /// A configuration with the given verifier and defaults elsewhere.
    pub fn new(verifier: Verifier) -> Self {
        Self {
            verifier,
            policy: Policy::default(),
            worker: WorkerConfig::default(),
            admin_email: None,
            stripe_sync: StripeSyncConfig::default(),
            cache: CacheConfig::default(),
            retention: RetentionPolicy::default(),
        }
    }

    /// Sets the entitlement cache settings.
    #[must_use]
    pub fn with_cache(mut self, cache: CacheConfig) -> Self {
        self.cache = cache;
        self
    }

    /// Sets the retention policy.
    #[must_use]
    pub fn with_retention(mut self, retention: RetentionPolicy) -> Self {
        self.retention = retention;
        self
    }

    /// Sets the catch-up and reconciliation settings.
    #[must_use]
    pub fn with_stripe_sync(mut self, stripe_sync: StripeSyncConfig) -> Self {
        self.stripe_sync = stripe_sync;
        self
    }

    /// Sets the policy.
    #[must_use]
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets the worker settings.
    #[must_use]
    pub fn with_worker(mut self, worker: WorkerConfig) -> Self {
        self.worker = worker;
        self
    }

    /// Sets the admin e-mail.
    #[must_use]
    pub fn with_admin_email(mut self, email: impl Into<String>) -> Self {
        self.admin_email = Some(email.into());
        self
    }
}

/// What happened to a delivered webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Applied now.
    Applied,
    /// Already processed (by this or another replica): nothing else happened.
    Duplicate,
    /// Older than the applied state; recorded.
    Stale,
    /// Not acted on; recorded.
    Ignored,
    /// Recorded as failed (e.g. unknown price), an admin alert queued; replayable.
    Failed(String),
}

impl Disposition {
    fn of(outcome: &Outcome) -> Self {
        match outcome {
            Outcome::Applied => Self::Applied,
            Outcome::Stale => Self::Stale,
            Outcome::Ignored => Self::Ignored,
            Outcome::Failed(reason) => Self::Failed(reason.clone()),
        }
    }

    /// Label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Duplicate => "duplicate",
            Self::Stale => "stale",
            Self::Ignored => "ignored",
            Self::Failed(_) => "failed",
        }
    }
}

/// The result of receiving one webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// `evt_…`
    pub event_id: String,
    /// Type.
    pub event_type: EventType,
    /// The subscription concerned.
    pub subscription_id: Option<String>,
    /// What happened.
    pub disposition: Disposition,
}

/// Why a webhook was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiveError {
    /// The signature did not verify (400; nothing stored).
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// The verified payload is not a Stripe event: not even its `id`, `type` and `created` can be
    /// read (400; nothing stored). An event whose object does not parse is stored as failed instead.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// The store failed (503 when unavailable: Stripe retries).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a replay did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// No such event.
    #[error("no event {0}")]
    NotFound(String),
    /// The stored payload no longer parses.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The billing service: pure decisions, durable effects.
pub struct Billing {
    store: Arc<dyn Store>,
    provisioner: Arc<dyn Provisioner>,
    notifier: Arc<dyn Notifier>,
    clock: Arc<dyn Clock>,
    config: BillingConfig,
    /// The Stripe API (read only), when configured: catch-up, reconciliation, customer e-mails.
    stripe: Option<Arc<dyn StripeApi>>,
    /// Names this process as the holder of singleton leases.
    holder: String,
    /// Entitlement answers kept by this replica.
    cache: Arc<cache::EntitlementCache>,
    /// Aggregates this replica last committed or loaded (see [`Store::record_and_commit`]).
    aggregates: cache::AggregateCache,
    /// Where reconciliation records the drift it found (the operator console shows it).
    drift_log: Option<Arc<dyn crate::operator::OperatorStore>>,
}

impl std::fmt::Debug for Billing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Billing").field("config", &self.config).finish_non_exhaustive()
    }
}

/// An error and its sources, one line, each cause said once: a source whose message the line
/// already says (an error that prints its source in its own message, as many drivers' do) is
/// skipped.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let said = src.to_string();
        if !said.is_empty() && !s.contains(&said) {
            s.push_str(": ");
            s.push_str(&said);
        }
        cur = src.source();
    }
    s
}

impl Billing {
    /// Wires the service with the system clock.
    pub fn new(
        store: Arc<dyn Store>,
        provisioner: Arc<dyn Provisioner>,
        notifier: Arc<dyn Notifier>,
        config: BillingConfig,
    ) -> Self {
        let holder = format!("billing-{}", uuid::Uuid::new_v4());
        let cache = Arc::new(cache::EntitlementCache::new(config.cache.clone()));
        let aggregates = cache::AggregateCache::new(config.cache.aggregates);
        Self {
            store,
            provisioner,
            notifier,
            clock: Arc::new(SystemClock),
            config,
            stripe: None,
            holder,
            cache,
            aggregates,
            drift_log: None,
        }
    }

    /// Adds the Stripe API: catch-up and reconciliation (DESIGN §8), and customer e-mail look-ups.
    #[must_use]
    pub fn with_stripe_api(mut self, api: Arc<dyn StripeApi>) -> Self {
        self.stripe = Some(api);
        self
    }

    /// Records the drift each reconciliation against Stripe finds (per subscription checked, the
    /// last run's replaces the previous; a dry run records nothing) in `log`, normally the same
    /// store seen through the operator port.
    #[must_use]
    pub fn with_drift_log(mut self, log: Arc<dyn crate::operator::OperatorStore>) -> Self {
        self.drift_log = Some(log);
        self
    }

    /// Replaces the clock (tests, simulations).
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Whether the Stripe API is configured (catch-up, reconciliation against Stripe).
    pub fn has_stripe_api(&self) -> bool {
        self.stripe.is_some()
    }

    /// The configuration.
    pub fn config(&self) -> &BillingConfig {
        &self.config
    }

    /// Now, per the configured clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Receives one webhook: verify the raw bytes, parse, record, decide, commit. Returns once the
    /// decision is durable; side effects run later from the job queue.
    pub async fn receive(&self, signature: Option<&str>, body: &[u8]) -> Result<Receipt, ReceiveError> {
        let started = Instant::now();
        let now = self.clock.now();
        if let Err(e) = self.config.verifier.verify(signature, body, now.timestamp()) {
            metrics::counter!("billing_webhook_verification_failures_total", "reason" => e.reason()).increment(1);
            return Err(e.into());
        }
        let parsed = std::str::from_utf8(body)
            .map_err(|_| ParseError::Json("payload is not UTF-8".into()))
            .and_then(|payload| Ok((payload, event::parse_str(payload)?)));
        let (payload, event) = match parsed {
            Ok(parsed) => parsed,
            Err(e) => {
                metrics::counter!("billing_webhook_parse_failures_total").increment(1);
                return self.receive_unreadable(body, e, now).await;
            }
        };
        let span = info_span!("webhook", event_id = %event.id, event_type = %event.event_type,
            subscription_id = event.subscription_id().unwrap_or(""));
        async move {
            let lag = (now - event.created).num_milliseconds().max(0);
            #[allow(clippy::cast_precision_loss)]
            metrics::histogram!("billing_webhook_delivery_lag_seconds").record(lag as f64 / 1000.0);
            let disposition = self.ingest(payload, &event, EventSource::Webhook, now).await?;
            metrics::counter!("billing_webhook_events_total", "type" => event.event_type.metric_label(),
                "outcome" => disposition.label())
            .increment(1);
            metrics::histogram!("billing_webhook_processing_seconds").record(started.elapsed().as_secs_f64());
            debug!(disposition = disposition.label(), "webhook processed");
            Ok(Receipt {
                subscription_id: event.subscription_id().map(str::to_owned),
                event_id: event.id,
                event_type: event.event_type,
                disposition,
            })
        }
        .instrument(span)
        .await
    }

    /// Records an authenticated event (a verified webhook, or one listed from the Stripe API) and
    /// applies it unless it is done already: the one path both channels share, so an event delivered
    /// by both is applied once.
    pub(crate) async fn ingest(
        &self,
        payload: &str,
        event: &Event,
        source: EventSource,
        now: DateTime<Utc>,
    ) -> Result<Disposition, StoreError> {
        let event = &*self.linked(event).await?;
        let new_event = NewEvent {
            id: &event.id,
            event_type: event.event_type.as_str(),
            created: event.created,
            api_version: event.api_version.as_deref(),
            livemode: event.livemode,
            payload,
            received_at: now,
            source,
            customer_id: event.customer_id(),
        };
        // Decide first, on the aggregate this replica last saw (none: the subscription is taken
        // for new), then record and commit in one call. The store's compare-and-swap catches a
        // stale guess, keeps the event recorded and answers the current aggregate to decide on.
        let subscription_id = event.subscription_id();
        let state = subscription_id.and_then(|id| self.aggregates.get(id));
        let decision = transition::decide(&self.config.policy, state.as_ref(), event, now);
        let expected = subscription_id
            .map(|id| Expected { subscription_id: id, version: state.as_ref().map_or(0, |s| s.version) });
        let commit = Commit {
            now,
            event_id: Some(event.id.clone()),
            outcome: decision.outcome,
            subscription: decision.subscription,
            account: decision.account,
            jobs: decision.jobs,
        };
        match self.store.record_and_commit(&new_event, expected, &commit).await? {
            RecordedCommit::Committed => {
                self.committed(&commit);
                if let Outcome::Failed(reason) = &commit.outcome {
                    warn!(event_id = %event.id, %reason, "event failed; recorded with its reason (its admin alert is queued once per event id)");
                }
                Ok(Disposition::of(&commit.outcome))
            }
            RecordedCommit::Duplicate => Ok(Disposition::Duplicate),
            RecordedCommit::Conflict(current) => {
                let current = current.map(|state| *state);
                metrics::counter!("billing_commit_conflicts_total").increment(1);
                if let Some(id) = subscription_id {
                    self.aggregates.put(id, current.clone());
                }
                self.apply_from(event, Some(current)).await
            }
        }
    }

    /// A verified payload whose object does not parse (say, a subscription status this version does
    /// not know): stored raw as `failed` with the parse error, an admin alert queued, so it is not lost
    /// when Stripe stops retrying and can be replayed after an upgrade. Without even an id, `type` and
    /// `created` it is no Stripe event and is refused.
    async fn receive_unreadable(
        &self,
        body: &[u8],
        error: ParseError,
        now: DateTime<Utc>,
    ) -> Result<Receipt, ReceiveError> {
        let Some(payload) = std::str::from_utf8(body).ok() else { return Err(error.into()) };
        let Some(receipt) = self.ingest_unreadable(payload, &error, EventSource::Webhook, now).await? else {
            return Err(error.into());
        };
        metrics::counter!("billing_webhook_events_total", "type" => receipt.event_type.metric_label(),
            "outcome" => receipt.disposition.label())
        .increment(1);
        Ok(receipt)
    }

    /// Records an authenticated payload whose object does not parse as `failed` (see
    /// [`Billing::receive`]); `None` when not even its envelope can be read.
    pub(crate) async fn ingest_unreadable(
        &self,
        payload: &str,
        error: &ParseError,
        source: EventSource,
        now: DateTime<Utc>,
    ) -> Result<Option<Receipt>, StoreError> {
        let Some(envelope) = event::envelope(payload) else { return Ok(None) };
        let new_event = NewEvent {
            id: &envelope.id,
            event_type: &envelope.event_type,
            created: envelope.created,
            api_version: envelope.api_version.as_deref(),
            livemode: envelope.livemode,
            payload,
            received_at: now,
            source,
            customer_id: None,
        };
        let (recorded, _) = self.store.record_and_load(&new_event, None).await?;
        let disposition = match recorded {
            Recorded::Done(_) => Disposition::Duplicate,
            Recorded::Fresh | Recorded::Pending(_) => {
                self.fail_unreadable(&envelope.id, &envelope.event_type, error, now).await?
            }
        };
        let event_type = EventType::from_stripe(&envelope.event_type);
        Ok(Some(Receipt { event_id: envelope.id, event_type, subscription_id: None, disposition }))
    }

    /// Commits a recorded event that does not parse as `failed`, with an admin alert.
    async fn fail_unreadable(
        &self,
        event_id: &str,
        event_type: &str,
        error: &ParseError,
        now: DateTime<Utc>,
    ) -> Result<Disposition, StoreError> {
        let reason = format!("cannot read the event ({error}); replay it once billing understands it");
        warn!(event_id, event_type, %reason, "verified event recorded as failed; admin alert queued");
        let alert = NewJob {
            key: format!("alert:unreadable:{event_id}"),
            group: None,
            kind: JobKind::AdminAlert {
                subject: format!("Unreadable Stripe event {event_id}"),
                detail: format!(
                    "Event {event_id} ({event_type}) is verified and stored, but billing cannot read it: {error}. \
                     Upgrade mindroom-billing, then run `mindroom-billing events replay {event_id}`."
                ),
            },
            run_after: now,
        };
        let commit = Commit {
            now,
            event_id: Some(event_id.to_owned()),
            outcome: Outcome::Failed(reason.clone()),
            subscription: None,
            account: None,
            jobs: vec![alert],
        };
        Ok(match self.commit(&commit).await? {
            CommitResult::Committed => Disposition::Failed(reason),
            CommitResult::AlreadyDone => Disposition::Duplicate,
        })
    }

    /// Commits a decision; a written aggregate drops its account's cached entitlements at once
    /// (other replicas learn of it from the store, see [`Store::watch_changes`]).
    pub(crate) async fn commit(&self, commit: &Commit) -> Result<CommitResult, StoreError> {
        match self.store.commit(commit).await {
            Ok(CommitResult::Committed) => {
                self.committed(commit);
                Ok(CommitResult::Committed)
            }
            Err(StoreError::Conflict(what)) => {
                if let Some(subscription) = &commit.subscription {
                    self.aggregates.put(&subscription.subscription_id, None);
                }
                Err(StoreError::Conflict(what))
            }
            other => other,
        }
    }

    /// After a commit: remembers the aggregate as stored (its version bumped) and drops the
    /// account's cached entitlements.
    fn committed(&self, commit: &Commit) {
        if commit.account.as_ref().is_some_and(|patch| patch.reference.is_some()) {
            self.cache.forget_references();
        }
        if let Some(subscription) = &commit.subscription {
            self.cache.invalidate(subscription.account_id);
            let stored = SubscriptionState { version: subscription.version + 1, ..subscription.clone() };
            self.aggregates.put(&subscription.subscription_id, Some(stored));
        }
    }

    /// Applies a recorded event: load, decide, commit with compare-and-swap, re-deciding on conflict.
    pub async fn apply(&self, event: &Event) -> Result<Disposition, StoreError> {
        let event = self.linked(event).await?;
        self.apply_from(&event, None).await
    }

    /// A dispute names its charge, not its customer or subscription: with the Stripe API, the
    /// charge is looked up for its customer, and the dispute is booked on the subscription of that
    /// customer that already holds it, else the live one seen last. Without the API (or when the
    /// charge names no customer billing knows) it stays unbooked: `decide` then only alerts.
    /// Other events are returned as they are.
    async fn linked<'e>(&self, event: &'e Event) -> Result<Cow<'e, Event>, StoreError> {
        let EventObject::Dispute(dispute) = &event.object else { return Ok(Cow::Borrowed(event)) };
        if dispute.subscription.is_some() {
            return Ok(Cow::Borrowed(event));
        }
        let mut dispute = dispute.clone();
        if dispute.customer.is_none() {
            if let Some(api) = &self.stripe {
                match api.get_charge(&dispute.charge).await {
                    Ok(Some(charge)) => match event::parse_charge_customer(&charge.raw) {
                        Ok(customer) => dispute.customer = customer,
                        Err(e) => warn!(charge = %dispute.charge, error = %e, "cannot read the disputed charge"),
                    },
                    Ok(None) => warn!(charge = %dispute.charge, "Stripe knows no disputed charge of that id"),
                    Err(e) if e.is_retryable() => {
                        // Not applied now: the webhook answers 503 and Stripe delivers it again.
                        return Err(StoreError::Unavailable(
                            format!("the Stripe API did not answer for the disputed charge {}: {e}", dispute.charge)
                                .into(),
                        ));
                    }
                    Err(e) => warn!(charge = %dispute.charge, error = %e, "cannot look the disputed charge up"),
                }
            }
        }
        if let Some(customer) = &dispute.customer {
            let account = crate::model::account_id_for_customer(customer);
            let mut subscriptions = self.store.subscriptions_for_account(account).await?;
            subscriptions.sort_by_key(|s| {
                let holds = s.disputes.iter().any(|d| d.id == dispute.id);
                let live = s.status().is_some_and(|st| !st.is_terminal());
                (holds, live, s.snapshot.as_ref().map(|snap| snap.event_created))
            });
            dispute.subscription = subscriptions.pop().map(|s| s.subscription_id);
        }
        Ok(Cow::Owned(Event { object: EventObject::Dispute(dispute), ..event.clone() }))
    }

    /// [`Billing::apply`] starting from an aggregate loaded with the event's record (`Some`), or
    /// loading it first (`None`). After a lost compare-and-swap it always reloads.
    async fn apply_from(
        &self,
        event: &Event,
        mut preloaded: Option<Option<SubscriptionState>>,
    ) -> Result<Disposition, StoreError> {
        for _ in 0..MAX_COMMIT_ATTEMPTS {
            let state = match (preloaded.take(), event.subscription_id()) {
                (Some(state), _) => state,
                (None, Some(id)) => self.store.load_subscription(id).await?,
                (None, None) => None,
            };
            let now = self.clock.now();
            let decision = transition::decide(&self.config.policy, state.as_ref(), event, now);
            if let Outcome::Failed(reason) = &decision.outcome {
                warn!(event_id = %event.id, %reason, "event failed; recorded with its reason (its admin alert is queued once per event id)");
            }
            let commit = Commit {
                now,
                event_id: Some(event.id.clone()),
                outcome: decision.outcome.clone(),
                subscription: decision.subscription,
                account: decision.account,
                jobs: decision.jobs,
            };
            match self.commit(&commit).await {
                Ok(CommitResult::Committed) => return Ok(Disposition::of(&decision.outcome)),
                Ok(CommitResult::AlreadyDone) => return Ok(Disposition::Duplicate),
                Err(StoreError::Conflict(what)) => {
                    metrics::counter!("billing_commit_conflicts_total").increment(1);
                    debug!(%what, "compare-and-swap lost; deciding again");
                }
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict(format!("gave up on {} after {MAX_COMMIT_ATTEMPTS} conflicts", event.id)))
    }

    /// Re-applies a stored event by id (after fixing configuration, for a failed one). An event that
    /// is already applied, stale or ignored is not applied twice.
    pub async fn replay(&self, event_id: &str) -> Result<Disposition, ReplayError> {
        let stored = self.store.load_event(event_id).await?.ok_or_else(|| ReplayError::NotFound(event_id.into()))?;
        self.apply_stored(&stored).await
    }

    async fn apply_stored(&self, stored: &StoredEvent) -> Result<Disposition, ReplayError> {
        if stored.status.is_done() {
            return Ok(Disposition::Duplicate);
        }
        let event = event::parse(stored.payload.as_bytes())?;
        Ok(self.apply(&event).await?)
    }

    /// Applies events recorded more than `unapplied_after` ago whose commit never happened (a crash
    /// between recording and committing). Returns how many were applied.
    pub async fn pick_up_unapplied(&self) -> Result<usize, StoreError> {
        let before = self.clock.now() - self.config.worker.unapplied_after;
        let stale = self.store.unapplied_events(before, 100).await?;
        let mut applied = 0;
        for stored in &stale {
            let error = match self.apply_stored(stored).await {
                Ok(_) => {
                    applied += 1;
                    continue;
                }
                Err(ReplayError::Parse(e)) => {
                    match self.fail_unreadable(&stored.id, &stored.event_type, &e, self.clock.now()).await {
                        Ok(_) => continue,
                        Err(e) => ReplayError::Store(e),
                    }
                }
                Err(e) => e,
            };
            // Only an unavailable store ends the pass: one poison event must not hold up the rest.
            if let ReplayError::Store(e @ StoreError::Unavailable(_)) = error {
                return Err(e);
            }
            metrics::counter!("billing_unapplied_pickup_errors_total").increment(1);
            warn!(event_id = %stored.id, error = %error_chain(&error), "cannot apply stored event; going on");
        }
        if applied > 0 {
            info!(applied, "picked up unapplied events");
        }
        Ok(applied)
    }

    /// Handles expired grace periods: marks each handled (compare-and-swap, so one replica wins)
    /// and queues the deprovisioning reconcile and the e-mail. Returns how many were handled.
    pub async fn sweep_grace(&self) -> Result<usize, StoreError> {
        let now = self.clock.now();
        let mut handled = 0;
        for subscription_id in self.store.expired_grace(now, 100).await? {
            for _ in 0..MAX_COMMIT_ATTEMPTS {
                let Some(state) = self.store.load_subscription(&subscription_id).await? else { break };
                let Some(decision) = transition::expire_grace(&state, now) else { break };
                let commit = Commit {
                    now,
                    event_id: None,
                    outcome: decision.outcome,
                    subscription: decision.subscription,
                    account: None,
                    jobs: decision.jobs,
                };
                match self.commit(&commit).await {
                    Ok(_) => {
                        info!(%subscription_id, "grace period expired; deprovisioning");
                        handled += 1;
                        break;
                    }
                    Err(StoreError::Conflict(_)) => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(handled)
    }

    /// Sets `billing_disputes_open` (open disputes) and `billing_disputes_evidence_due_timestamp_seconds`
    /// (the earliest evidence deadline among them, 0 when none), read through the operator port.
    async fn measure_disputes(&self) {
        let Some(ops) = &self.drift_log else { return };
        match ops.open_disputes(1000).await {
            Ok(subscriptions) => {
                let open: Vec<_> = subscriptions.iter().flat_map(SubscriptionState::open_disputes).collect();
                let due = open.iter().filter_map(|d| d.evidence_due_by).min().map_or(0, |d| d.timestamp());
                #[allow(clippy::cast_precision_loss)]
                {
                    metrics::gauge!("billing_disputes_open").set(open.len() as f64);
                    metrics::gauge!("billing_disputes_evidence_due_timestamp_seconds").set(due as f64);
                }
            }
            Err(e) => warn!(error = %error_chain(&e), "cannot count open disputes"),
        }
    }

    /// Runs the job workers, the grace sweeper and unapplied pick-up, retention pruning and (with a
    /// Stripe API) catch-up and reconciliation until `shutdown`
    /// turns true; a job that is running then is finished first.
    pub async fn run_background(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..self.config.worker.concurrency.max(1) {
            let (this, mut stop) = (Arc::clone(&self), shutdown.clone());
            tasks.spawn(async move {
                while !*stop.borrow() {
                    let idle = match this.run_due_jobs(1).await {
                        Ok(n) => n == 0,
                        Err(e) => {
                            warn!(error = %error_chain(&e), "job worker: store error");
                            true
                        }
                    };
                    if idle {
                        tokio::select! {
                            _ = tokio::time::sleep(this.config.worker.poll_interval) => {}
                            _ = stop.changed() => {}
                        }
                    }
                }
            });
        }
        if self.stripe.is_some() {
            let (this, stop) = (Arc::clone(&self), shutdown.clone());
            tasks.spawn(async move { this.run_stripe_sync(stop).await });
        }
        let (this, stop) = (Arc::clone(&self), shutdown.clone());
        tasks.spawn(async move { this.run_retention(stop).await });
        let (this, mut stop) = (Arc::clone(&self), shutdown);
        tasks.spawn(async move {
            while !*stop.borrow() {
                if let Err(e) = this.sweep_grace().await {
                    warn!(error = %error_chain(&e), "grace sweeper: store error");
                }
                if let Err(e) = this.pick_up_unapplied().await {
                    warn!(error = %error_chain(&e), "unapplied pick-up: store error");
                }
                this.measure_disputes().await;
                if let Ok(counts) = this.store.job_counts().await {
                    #[allow(clippy::cast_precision_loss)]
                    {
                        metrics::gauge!("billing_jobs_pending").set(counts.pending as f64);
                        metrics::gauge!("billing_jobs_running").set(counts.running as f64);
                        metrics::gauge!("billing_jobs_dead").set(counts.dead as f64);
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(this.config.worker.sweep_interval) => {}
                    _ = stop.changed() => {}
                }
            }
        });
        while tasks.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that prints its source in its own message too (as `sqlx`'s I/O error does).
    #[derive(Debug, thiserror::Error)]
    #[error("error communicating with database: {0}")]
    struct Echo(#[source] std::io::Error);

    #[test]
    fn the_error_chain_says_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused (os error 111)");
        let e = StoreError::Unavailable(Box::new(Echo(io)));
        assert_eq!(
            error_chain(&e),
            "store unavailable: error communicating with database: Connection refused (os error 111)"
        );
        let api =
            SyncError::Api(crate::stripe_api::StripeApiError::Unavailable("GET /v1/events: could not connect".into()));
        assert_eq!(error_chain(&api), "Stripe API: GET /v1/events: could not connect");
    }
}
