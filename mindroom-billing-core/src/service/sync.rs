//! The second source of truth (DESIGN §8): catch-up from `GET /v1/events` and reconciliation
//! against `GET /v1/subscriptions`, both read-only, both through the same decide / commit path as
//! webhooks, so that a delivery Stripe gave up on heals by itself.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::{Instrument, error, info, info_span, warn};

use super::{Billing, Disposition, MAX_COMMIT_ATTEMPTS, error_chain};
use crate::event::{self, Event, EventObject, EventType, LatestInvoice, ParseError};
use crate::model::{Commit, EventSource, InstanceRecord, JobKind, NewJob, Outcome, SubscriptionState, SyncCursor};
use crate::operator::DriftRecord;
use crate::ports::StoreError;
use crate::stripe_api::{ApiEvent, EventsQuery, RawObject, StripeApi, StripeApiError};
use crate::transition;

/// The event types catch-up lists (`types[]`): every type billing acts on.
pub const CATCH_UP_TYPES: [&str; 16] = [
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "customer.subscription.paused",
    "customer.subscription.resumed",
    "customer.subscription.trial_will_end",
    "invoice.paid",
    "invoice.payment_succeeded",
    "invoice.payment_failed",
    "invoice.payment_action_required",
    "charge.dispute.created",
    "charge.dispute.updated",
    "charge.dispute.closed",
    "customer.created",
    "customer.updated",
    "checkout.session.completed",
];

/// The store cursor of catch-up.
const CURSOR: &str = "stripe_catch_up";
/// Lease names of the periodic tasks (one replica at a time).
const CATCH_UP_LEASE: &str = "stripe_catch_up";
const RECONCILE_LEASE: &str = "stripe_reconcile";

/// Catch-up and reconciliation settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeSyncConfig {
    /// How often catch-up runs in `serve` (`STRIPE_CATCH_UP_INTERVAL_SECS`, 300 s).
    pub catch_up_interval: Duration,
    /// How often reconciliation runs in `serve` (`STRIPE_RECONCILE_INTERVAL_SECS`, one day).
    pub reconcile_interval: Duration,
    /// How long Stripe keeps events listable (30 days): an older cursor means reconciliation.
    pub event_retention: chrono::Duration,
    /// Each catch-up lists again from this long before it started (events may show in the list a
    /// little after their `created`); relisted events are duplicates.
    pub relist_margin: chrono::Duration,
    /// At most this many listed events are held before they are applied (a longer backlog is listed
    /// and applied in time windows, oldest first); only the events of a single second may exceed it.
    pub catch_up_chunk: usize,
}

impl Default for StripeSyncConfig {
    fn default() -> Self {
        Self {
            catch_up_interval: Duration::from_secs(300),
            reconcile_interval: Duration::from_secs(86_400),
            event_retention: chrono::Duration::days(30),
            relist_margin: chrono::Duration::minutes(5),
            catch_up_chunk: 1_000,
        }
    }
}

/// Why catch-up or reconciliation stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// No Stripe API is configured.
    #[error("no Stripe API configured: set STRIPE_SECRET_KEY")]
    NotConfigured,
    /// The Stripe API refused or failed (a 401/403 names `STRIPE_SECRET_KEY`).
    #[error("Stripe API")]
    Api(#[from] StripeApiError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SyncError {
    fn label(&self) -> &'static str {
        match self {
            Self::NotConfigured => "not_configured",
            Self::Api(StripeApiError::Unauthorized(_)) => "unauthorized",
            Self::Api(_) => "api",
            Self::Store(_) => "store",
        }
    }
}

/// What one catch-up did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatchUpReport {
    /// Events listed by Stripe since the cursor.
    pub listed: usize,
    /// Events applied now (the others were duplicates, stale, ignored or failed).
    pub applied: usize,
    /// Events already recorded (delivered by webhook or caught up before).
    pub duplicates: usize,
    /// Events recorded as stale, ignored or failed.
    pub other: usize,
    /// The cursor after the run.
    pub cursor: Option<DateTime<Utc>>,
    /// Set when there was no usable cursor and the run reconciled instead.
    pub reconciled: Option<ReconcileReport>,
}

/// A field that differed between billing's record and Stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DriftField {
    /// The tier.
    Tier,
    /// Stripe's status.
    Status,
    /// The grace deadline.
    Grace,
    /// The instance (running at which tier, or absent).
    Instance,
}

impl DriftField {
    /// Label for metrics and tables.
    pub fn label(self) -> &'static str {
        match self {
            Self::Tier => "tier",
            Self::Status => "status",
            Self::Grace => "grace",
            Self::Instance => "instance",
        }
    }
}

/// One difference found by reconciliation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    /// `sub_…`
    pub subscription_id: String,
    /// Which field.
    pub field: DriftField,
    /// Billing's value before.
    pub before: String,
    /// The value Stripe's object gives.
    pub after: String,
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<32} {:<9} {:<28} -> {}", self.subscription_id, self.field.label(), self.before, self.after)
    }
}

/// What one reconciliation found (and, unless a dry run, fixed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Subscriptions compared.
    pub checked: usize,
    /// The ids of the subscriptions compared.
    pub subscriptions: Vec<String>,
    /// Differences found.
    pub drift: Vec<Drift>,
    /// Subscriptions Stripe returned that billing could not read or decide (logged).
    pub failed: usize,
    /// Nothing was written.
    pub dry_run: bool,
}

impl Billing {
    fn stripe_api(&self) -> Result<&dyn StripeApi, SyncError> {
        self.stripe.as_deref().ok_or(SyncError::NotConfigured)
    }

    /// Lists the events Stripe holds since the cursor (or `since`), oldest first, through the same
    /// record / decide / commit path as webhooks (recorded with source `api`). Without a cursor, or
    /// with one older than Stripe's event retention, reconciles instead and starts the cursor there.
    pub async fn catch_up(&self, since: Option<DateTime<Utc>>) -> Result<CatchUpReport, SyncError> {
        let span = info_span!("stripe_catch_up");
        self.catch_up_inner(since).instrument(span).await
    }

    async fn catch_up_inner(&self, since: Option<DateTime<Utc>>) -> Result<CatchUpReport, SyncError> {
        let api = self.stripe_api()?;
        let settings = &self.config.stripe_sync;
        let started = self.clock.now();
        let from = match since {
            Some(t) => Some(t),
            None => self.store.load_cursor(CURSOR).await?.map(|c| c.created),
        };
        let Some(from) = from.filter(|f| *f > started - settings.event_retention) else {
            info!("no catch-up cursor within Stripe's 30-day event retention: reconciling instead");
            let reconciled = self.reconcile_stripe(None, false).await?;
            let cursor = started - settings.relist_margin;
            self.save_catch_up_cursor(cursor).await?;
            return Ok(CatchUpReport {
                cursor: Some(cursor),
                reconciled: Some(reconciled),
                ..CatchUpReport::default()
            });
        };
        // The cursor never passes the run's start minus the relist margin: Stripe's list is
        // eventually consistent, so an event may show in it a little after newer ones already have.
        let ceiling = started - settings.relist_margin;
        let mut report = CatchUpReport::default();
        // Stripe lists newest first; events are applied oldest first, one time window at a time, each
        // window holding at most `catch_up_chunk` events (a window that lists more is halved), so a
        // 30-day backlog is never held in memory at once.
        let mut low = from;
        let mut span = started - from + chrono::Duration::seconds(1);
        loop {
            let last = low + span > started;
            let high = (!last).then_some(low + span);
            let Some(mut listed) = self.list_window(api, low, high, settings.catch_up_chunk).await? else {
                span = (span / 2).max(chrono::Duration::seconds(1));
                continue;
            };
            listed.reverse();
            listed.sort_by_key(|e| e.created);
            report.listed += listed.len();
            if let Err((at, e)) = self.apply_listed(&listed, &mut report).await {
                // Everything created before the earliest failure is recorded (each lane runs in
                // `created` order and stops at its failure).
                self.save_catch_up_cursor(at.max(low).min(ceiling)).await?;
                return Err(e.into());
            }
            match high {
                Some(high) => {
                    // Everything before `high` is recorded.
                    self.save_catch_up_cursor(high.min(ceiling)).await?;
                    low = high;
                    span = span * 2;
                }
                None => break,
            }
        }
        // Everything listed is recorded: the next run starts a little before this one did.
        let cursor = ceiling;
        self.save_catch_up_cursor(cursor).await?;
        report.cursor = Some(cursor);
        if report.applied > 0 {
            info!(listed = report.listed, applied = report.applied, duplicates = report.duplicates, "caught up");
        }
        Ok(report)
    }

    /// Lists the events created in `[low, high)` (no upper bound without `high`), newest first;
    /// `None` when there are more than `limit` of them and the window spans more than a second.
    async fn list_window(
        &self,
        api: &dyn StripeApi,
        low: DateTime<Utc>,
        high: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Result<Option<Vec<ApiEvent>>, SyncError> {
        let mut listed = Vec::new();
        let mut query = EventsQuery {
            types: CATCH_UP_TYPES.iter().map(|t| (*t).to_owned()).collect(),
            created_gte: Some(low),
            created_lt: high,
            starting_after: None,
            limit: 100,
        };
        loop {
            let page = api.list_events(&query).await?;
            query.starting_after = page.data.last().map(|e| e.id.clone());
            listed.extend(page.data);
            if !page.has_more || query.starting_after.is_none() {
                return Ok(Some(listed));
            }
            // A single second cannot be split: it is held whole, however many events it has.
            let splittable = high.is_none_or(|h| h - low > chrono::Duration::seconds(1));
            if listed.len() > limit && splittable {
                return Ok(None);
            }
        }
    }

    /// Applies events sorted by `created`, in lanes; on a failure, the `created` of the earliest
    /// event that is not recorded, and the error.
    async fn apply_listed(
        &self,
        listed: &[ApiEvent],
        report: &mut CatchUpReport,
    ) -> Result<(), (DateTime<Utc>, StoreError)> {
        // Lanes: the events of one subscription (or customer) in order, different ones at once, so a
        // long backlog is not one commit round trip per event end to end.
        let lanes = lanes(listed);
        let next = AtomicUsize::new(0);
        let (applied, duplicates, other) = (AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0));
        let first_failure: std::sync::Mutex<Option<(DateTime<Utc>, StoreError)>> = std::sync::Mutex::new(None);
        let lane_worker = || async {
            while let Some(lane) = lanes.get(next.fetch_add(1, Ordering::Relaxed)) {
                for listed in lane {
                    match self.catch_up_one(listed).await {
                        Ok(Disposition::Applied) => applied.fetch_add(1, Ordering::Relaxed),
                        Ok(Disposition::Duplicate) => duplicates.fetch_add(1, Ordering::Relaxed),
                        Ok(_) => other.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            let created = listed.api.created;
                            let mut failed = first_failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                            if failed.as_ref().is_none_or(|(at, _)| created < *at) {
                                *failed = Some((created, e));
                            }
                            break;
                        }
                    };
                }
            }
        };
        tokio::join!(lane_worker(), lane_worker(), lane_worker(), lane_worker());
        report.applied += applied.into_inner();
        report.duplicates += duplicates.into_inner();
        report.other += other.into_inner();
        match first_failure.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
            Some(failure) => Err(failure),
            None => Ok(()),
        }
    }

    /// Records and applies one listed event (an unreadable one is stored as failed).
    async fn catch_up_one(&self, listed: &Listed<'_>) -> Result<Disposition, StoreError> {
        let (api_event, now) = (listed.api, self.clock.now());
        let disposition = match &listed.parsed {
            Ok(event) => self.ingest(&api_event.raw, event, EventSource::Api, now).await?,
            Err(e) => match self.ingest_unreadable(&api_event.raw, e, EventSource::Api, now).await? {
                Some(receipt) => receipt.disposition,
                None => {
                    warn!(event_id = %api_event.id, "Stripe listed an event without an envelope; skipped");
                    Disposition::Ignored
                }
            },
        };
        metrics::counter!("billing_stripe_catch_up_events_total", "outcome" => disposition.label()).increment(1);
        Ok(disposition)
    }

    async fn save_catch_up_cursor(&self, created: DateTime<Utc>) -> Result<(), StoreError> {
        let now = self.clock.now();
        self.store.save_cursor(CURSOR, &SyncCursor { created, saved_at: now }).await?;
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!("billing_stripe_cursor_lag_seconds").set((now - created).num_seconds().max(0) as f64);
        Ok(())
    }

    /// Compares every subscription Stripe holds (or one) with billing's record: each object is a
    /// snapshot taken at fetch time, its latest invoice gives the payment facts, and both go through
    /// `decide` like any event. Reports the drift per field; a dry run writes nothing.
    pub async fn reconcile_stripe(
        &self,
        subscription: Option<&str>,
        dry_run: bool,
    ) -> Result<ReconcileReport, SyncError> {
        let api = self.stripe_api()?;
        let span = info_span!("stripe_reconcile", dry_run);
        async {
            let mut report = ReconcileReport { dry_run, ..ReconcileReport::default() };
            match subscription {
                Some(id) => {
                    let fetched = snapshot_time(self.clock.now());
                    if let Some(object) = api.get_subscription(id).await? {
                        self.reconcile_object(&object, fetched, dry_run, &mut report).await?;
                    }
                }
                None => {
                    let mut after: Option<String> = None;
                    loop {
                        let fetched = snapshot_time(self.clock.now());
                        let page = api.list_subscriptions(after.as_deref()).await?;
                        for object in &page.data {
                            self.reconcile_object(object, fetched, dry_run, &mut report).await?;
                        }
                        after = page.data.last().map(|o| o.id.clone());
                        if !page.has_more || after.is_none() {
                            break;
                        }
                    }
                }
            }
            for drift in &report.drift {
                metrics::counter!("billing_stripe_drift_total", "field" => drift.field.label()).increment(1);
            }
            if let (Some(log), false) = (&self.drift_log, dry_run) {
                let found_at = self.clock.now();
                let records: Vec<DriftRecord> = report.drift.iter().map(|d| DriftRecord::of(d, found_at)).collect();
                if let Err(e) = log.save_drift(&report.subscriptions, &records).await {
                    warn!(error = %error_chain(&e), "cannot record the drift found (the fixes are committed)");
                }
            }
            info!(checked = report.checked, drift = report.drift.len(), dry_run, "reconciled against Stripe");
            Ok(report)
        }
        .instrument(span)
        .await
    }

    /// `fetched_at`: the snapshot's date, from [`snapshot_time`] of when the request was sent.
    async fn reconcile_object(
        &self,
        object: &RawObject,
        fetched_at: DateTime<Utc>,
        dry_run: bool,
        report: &mut ReconcileReport,
    ) -> Result<(), SyncError> {
        report.checked += 1;
        report.subscriptions.push(object.id.clone());
        let (snapshot, latest) = match event::parse_subscription_object(&object.raw) {
            Ok(parsed) => parsed,
            Err(e) => {
                report.failed += 1;
                warn!(subscription_id = %object.id, error = %e, "cannot read the subscription Stripe returned");
                return Ok(());
            }
        };
        let sub = snapshot.id.clone();
        let mut facts: Vec<Event> = latest.iter().filter_map(|i| invoice_fact(&sub, i)).collect();
        facts.push(Event {
            id: format!("reconcile_{sub}_{}", fetched_at.timestamp_micros()),
            event_type: EventType::SubscriptionUpdated,
            created: fetched_at,
            api_version: None,
            livemode: false,
            account: None,
            object: EventObject::Subscription(snapshot),
        });
        for _ in 0..MAX_COMMIT_ATTEMPTS {
            let now = self.clock.now();
            let before = self.store.load_subscription(&sub).await?;
            let instance = self.store.load_instance(&sub).await?;
            let mut after = before.clone();
            let mut jobs = Vec::new();
            let mut account = None;
            for fact in &facts {
                let decision = transition::decide(&self.config.policy, after.as_ref(), fact, now);
                if let Outcome::Failed(reason) = &decision.outcome {
                    report.failed += 1;
                    warn!(subscription_id = %sub, %reason, "cannot decide on the subscription Stripe returned");
                    return Ok(());
                }
                if let Some(next) = decision.subscription {
                    after = Some(next);
                }
                jobs.extend(decision.jobs);
                account = decision.account.or(account);
            }
            let Some(after_state) = &after else { return Ok(()) };
            let drift = compare(&sub, before.as_ref(), after_state, &InstanceRecord::describe(instance.as_ref()), now);
            let instance_drift = drift.iter().any(|d| d.field == DriftField::Instance);
            let changed = after != before;
            if dry_run || (!changed && !instance_drift) {
                report.drift.extend(drift);
                return Ok(());
            }
            if instance_drift && !jobs.iter().any(|j| matches!(j.kind, JobKind::Reconcile { .. })) {
                jobs.push(NewJob {
                    key: format!("reconcile:{sub}:drift:{}", now.timestamp_micros()),
                    group: Some(sub.clone()),
                    kind: JobKind::Reconcile { subscription_id: sub.clone() },
                    run_after: now,
                });
            }
            let commit = Commit {
                now,
                event_id: None,
                outcome: Outcome::Applied,
                subscription: changed.then(|| after.clone()).flatten(),
                account,
                jobs,
            };
            match self.commit(&commit).await {
                Ok(_) => {
                    report.drift.extend(drift);
                    return Ok(());
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Conflict(format!("gave up reconciling {sub} after {MAX_COMMIT_ATTEMPTS} conflicts")).into())
    }

    /// Runs catch-up at start and every interval, and reconciliation likewise, each on one replica
    /// at a time (a lease in the store). Errors are logged and counted; webhooks are not affected.
    pub(crate) async fn run_stripe_sync(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        if self.stripe.is_none() {
            return;
        }
        let settings = self.config.stripe_sync.clone();
        // Both at start-up (the leases keep a restart from repeating a run another process did
        // within the interval), then every interval.
        let mut next_catch_up = tokio::time::Instant::now();
        let mut next_reconcile = next_catch_up;
        while !*stop.borrow() {
            let now = tokio::time::Instant::now();
            if now >= next_catch_up {
                next_catch_up = now + settings.catch_up_interval;
                if self.lease(CATCH_UP_LEASE, settings.catch_up_interval).await {
                    match until_stopped(&mut stop, self.catch_up(None)).await {
                        None => return,
                        Some(Err(e)) => report_sync_error("catch_up", &e),
                        Some(Ok(_)) => {}
                    }
                }
            }
            if now >= next_reconcile {
                next_reconcile = now + settings.reconcile_interval;
                if self.lease(RECONCILE_LEASE, settings.reconcile_interval).await {
                    match until_stopped(&mut stop, self.reconcile_stripe(None, false)).await {
                        None => {
                            // Stopped mid-run (a deploy): the next process may reconcile at once.
                            self.release_lease(RECONCILE_LEASE).await;
                            return;
                        }
                        Some(Err(e)) => {
                            report_sync_error("reconcile", &e);
                            // A transient error must not skip a day: the lease is given back (another
                            // replica, or the next process, may reconcile at once) and this one tries
                            // again at the next catch-up tick.
                            self.release_lease(RECONCILE_LEASE).await;
                            next_reconcile = now + settings.catch_up_interval.min(settings.reconcile_interval);
                        }
                        Some(Ok(_)) => {}
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep_until(next_catch_up.min(next_reconcile)) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// Takes or renews the singleton lease `name` for `interval`; `false` when another replica
    /// holds it (or the store failed: logged).
    pub(super) async fn lease(&self, name: &str, interval: Duration) -> bool {
        let now = self.clock.now();
        let until = now + chrono::Duration::from_std(interval).unwrap_or(chrono::Duration::days(1));
        match self.store.try_lease(name, &self.holder, now, until).await {
            Ok(held) => held,
            Err(e) => {
                warn!(lease = name, error = %error_chain(&e), "cannot take the lease");
                false
            }
        }
    }

    /// Gives the lease `name` back (held until now), so any replica may take it at once.
    async fn release_lease(&self, name: &str) {
        let now = self.clock.now();
        if let Err(e) = self.store.try_lease(name, &self.holder, now, now).await {
            warn!(lease = name, error = %error_chain(&e), "cannot give the lease back; it expires by itself");
        }
    }

    /// The customer's address from `GET /v1/customers/{id}`, recorded on the account (once per job).
    pub(crate) async fn fetch_customer_email(&self, customer_id: &str) -> Result<Option<String>, SyncError> {
        let fetched = snapshot_time(self.clock.now());
        let Some(object) = self.stripe_api()?.get_customer(customer_id).await? else { return Ok(None) };
        let email = event::parse_customer_object(&object.raw).ok().and_then(|c| c.email);
        if let Some(email) = &email {
            let now = self.clock.now();
            let patch = crate::model::AccountPatch {
                stripe_customer_id: customer_id.to_owned(),
                email: Some(email.clone()),
                reference: None,
                // A `customer.updated` of the second the request was sent (or later) wins.
                observed_at: fetched,
            };
            let commit = Commit {
                now,
                event_id: None,
                outcome: Outcome::Applied,
                subscription: None,
                account: Some(patch),
                jobs: vec![],
            };
            self.commit(&commit).await?;
        }
        Ok(email)
    }
}

/// Runs `task` unless the stop signal comes first (or has come): the task is then dropped. Each
/// step of a sync run commits atomically and the cursor never passes an unrecorded event, so a run
/// cut short at shutdown (Stripe unreachable, retries backing off) loses nothing.
async fn until_stopped<T>(
    stop: &mut tokio::sync::watch::Receiver<bool>,
    task: impl std::future::Future<Output = T>,
) -> Option<T> {
    if *stop.borrow() {
        return None;
    }
    tokio::select! {
        result = task => Some(result),
        _ = stop.changed() => {
            info!("Stripe sync stopped mid-run for shutdown");
            None
        }
    }
}

fn report_sync_error(task: &'static str, e: &SyncError) {
    metrics::counter!("billing_stripe_sync_errors_total", "task" => task, "kind" => e.label()).increment(1);
    match e {
        SyncError::Api(StripeApiError::Unauthorized(_)) => {
            error!(task, error = %error_chain(e), "Stripe refused the key; catch-up stopped (webhooks keep working)");
        }
        _ => warn!(task, error = %error_chain(e), "Stripe sync failed; will try again"),
    }
}

/// A listed event, parsed once.
struct Listed<'a> {
    api: &'a ApiEvent,
    parsed: Result<Event, ParseError>,
}

/// Groups events (sorted by `created`) into lanes by the subscription (or customer) they are about,
/// each lane in `created` order.
fn lanes(events: &[ApiEvent]) -> Vec<Vec<Listed<'_>>> {
    let mut lanes: Vec<Vec<Listed<'_>>> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for api in events {
        let parsed = event::parse_str(&api.raw);
        let key = match &parsed {
            Ok(e) => match (e.subscription_id(), &e.object) {
                (Some(sub), _) => sub.to_owned(),
                (None, EventObject::Customer(c)) => c.id.clone(),
                (None, EventObject::CheckoutSession(c)) => c.customer.clone().unwrap_or_else(|| api.id.clone()),
                // The reports of one dispute in order (it is booked on its subscription when applied).
                (None, EventObject::Dispute(d)) => d.id.clone(),
                (None, _) => api.id.clone(),
            },
            Err(_) => api.id.clone(),
        };
        let lane = *index.entry(key).or_insert_with(|| {
            lanes.push(Vec::new());
            lanes.len() - 1
        });
        lanes[lane].push(Listed { api, parsed });
    }
    lanes
}

/// The date of a snapshot whose request was sent at `sent`: just before that second began.
///
/// Stripe dates events in whole seconds, and an event of the second the request was sent in may
/// have happened after the object was read: any webhook created in that second or later is newer
/// than the snapshot (it applies, the snapshot never overwrites it), while everything the object
/// already shows (created in an earlier second) is older. The time is taken when the request is
/// sent, not when the answer is processed (which may be seconds later).
pub(crate) fn snapshot_time(sent: DateTime<Utc>) -> DateTime<Utc> {
    let second = DateTime::from_timestamp(sent.timestamp(), 0).unwrap_or(sent);
    second - chrono::Duration::microseconds(1)
}

/// The payment fact a subscription's latest invoice gives: paid, or a failed attempt.
fn invoice_fact(subscription_id: &str, invoice: &LatestInvoice) -> Option<Event> {
    let (event_type, at) = match invoice.status.as_str() {
        "paid" => (EventType::InvoicePaid, invoice.paid_at.unwrap_or(invoice.created)),
        // The first attempt is at finalization (`created` is about an hour earlier): a failure dated
        // at `created` would start the grace early, and the earliest failure is kept.
        "open" | "uncollectible" if invoice.attempted => {
            (EventType::InvoicePaymentFailed, invoice.finalized_at.unwrap_or(invoice.created))
        }
        _ => return None,
    };
    Some(Event {
        id: format!("reconcile_{subscription_id}_{}_{}", invoice.fact.id, event_type.as_str()),
        event_type,
        created: at,
        api_version: None,
        livemode: false,
        account: None,
        object: EventObject::Invoice(invoice.fact.clone()),
    })
}

/// What the recorded instance is, as a desired-instance value (for drift).
fn compare(
    sub: &str,
    before: Option<&SubscriptionState>,
    after: &SubscriptionState,
    recorded_instance: &str,
    now: DateTime<Utc>,
) -> Vec<Drift> {
    let show = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    let tier = |s: Option<&SubscriptionState>| s.and_then(SubscriptionState::tier).map(|t| t.to_string());
    let status = |s: Option<&SubscriptionState>| s.and_then(SubscriptionState::status).map(|t| t.as_str().to_owned());
    let grace = |s: Option<&SubscriptionState>| s.and_then(|s| s.grace).map(|g| g.ends_at.to_rfc3339());
    let mut drift = Vec::new();
    let mut push = |field, b: Option<String>, a: Option<String>| {
        if b != a {
            drift.push(Drift { subscription_id: sub.to_owned(), field, before: show(b), after: show(a) });
        }
    };
    push(DriftField::Tier, tier(before), tier(Some(after)));
    push(DriftField::Status, status(before), status(Some(after)));
    push(DriftField::Grace, grace(before), grace(Some(after)));
    // A record that may have an app (provisioning, failed, adopted at unknown limits) is not absent.
    push(DriftField::Instance, Some(recorded_instance.to_owned()), Some(after.desired(now).describe()));
    drift
}
