//! The orchestrator: the imperative shell over the pure core. It verifies and records webhooks,
//! commits decisions, runs the job worker and the grace sweeper, and answers usage questions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};
use uuid::Uuid;

use crate::event::{self, Event, EventType, ParseError};
use crate::model::{
    Claim, Commit, CommitResult, DesiredInstance, EmailKind, InstanceRecord, InstanceStatus, Job, JobFinish, JobKind,
    JobResolution, NewEvent, NewJob, Outcome, Recorded, StoredEvent, SubscriptionState, UsageKey,
};
use crate::ports::{
    Clock, Message, Notification, Notifier, NotifyError, ProvisionError, ProvisionRequest, Provisioner, Store,
    StoreError, SystemClock,
};
use crate::signature::{SignatureError, Verifier};
use crate::tier::{Limit, Limits, Metric, Tier};
use crate::transition::{self, Policy};

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
}

impl BillingConfig {
    /// A configuration with the given verifier and defaults elsewhere.
    pub fn new(verifier: Verifier) -> Self {
        Self { verifier, policy: Policy::default(), worker: WorkerConfig::default(), admin_email: None }
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
    /// The verified payload is not an event we can read (400; nothing stored).
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

/// The answer to a usage increment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UsageReport {
    /// Within the limit (and counted).
    pub allowed: bool,
    /// Used today, after this call.
    pub used: u64,
    /// Today's limit (`-1` = unlimited).
    pub limit: Limit,
    /// Left today (`-1` = unlimited).
    #[serde(serialize_with = "remaining_wire")]
    pub remaining: Option<u64>,
}

fn remaining_wire<S: serde::Serializer>(remaining: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match remaining {
        Some(n) => s.serialize_u64(*n),
        None => s.serialize_i64(-1),
    }
}

/// What an account may use now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entitlements {
    /// Account.
    pub account_id: Uuid,
    /// The best running tier (free without a paid subscription).
    pub tier: Tier,
    /// Status of the subscription granting it.
    pub status: Option<String>,
    /// The subscription granting it.
    pub subscription_id: Option<String>,
    /// Limits.
    pub limits: Limits,
    /// Grace deadline, if a payment failed.
    pub grace_period_ends_at: Option<DateTime<Utc>>,
    /// Usage today.
    pub usage_today: UsageToday,
}

/// Today's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UsageToday {
    /// Messages.
    pub messages: u64,
    /// API calls.
    pub api_calls: u64,
}

/// The deterministic Dokku app name of a subscription: readable and traceable to Stripe, unique.
pub fn app_name_for(subscription_id: &str) -> String {
    let readable: String = subscription_id
        .trim_start_matches("sub_")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(24)
        .collect::<String>()
        .to_ascii_lowercase();
    let digest = Sha256::digest(subscription_id.as_bytes());
    format!("mr-{readable}-{}", hex::encode(&digest[..3]))
}

/// The billing service: pure decisions, durable effects.
pub struct Billing {
    store: Arc<dyn Store>,
    provisioner: Arc<dyn Provisioner>,
    notifier: Arc<dyn Notifier>,
    clock: Arc<dyn Clock>,
    config: BillingConfig,
}

impl std::fmt::Debug for Billing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Billing").field("config", &self.config).finish_non_exhaustive()
    }
}

enum JobError {
    Retryable(String, Option<Duration>),
    Permanent(String),
}

impl From<StoreError> for JobError {
    fn from(e: StoreError) -> Self {
        JobError::Retryable(format!("store: {}", error_chain(&e)), None)
    }
}

impl From<ProvisionError> for JobError {
    fn from(e: ProvisionError) -> Self {
        let retry_after = e.retry_after();
        if e.is_retryable() {
            JobError::Retryable(error_chain(&e), retry_after)
        } else {
            JobError::Permanent(error_chain(&e))
        }
    }
}

impl From<NotifyError> for JobError {
    fn from(e: NotifyError) -> Self {
        match e {
            NotifyError::Retryable(m) => JobError::Retryable(m, None),
            NotifyError::Permanent(m) => JobError::Permanent(m),
        }
    }
}

/// An error and its sources, one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

#[derive(Default)]
struct JobOutput {
    instance: Option<InstanceRecord>,
    enqueue: Vec<NewJob>,
}

impl Billing {
    /// Wires the service with the system clock.
    pub fn new(
        store: Arc<dyn Store>,
        provisioner: Arc<dyn Provisioner>,
        notifier: Arc<dyn Notifier>,
        config: BillingConfig,
    ) -> Self {
        Self { store, provisioner, notifier, clock: Arc::new(SystemClock), config }
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
        let payload = std::str::from_utf8(body).map_err(|_| ParseError::Json("payload is not UTF-8".into()))?;
        let event = match event::parse(body) {
            Ok(event) => event,
            Err(e) => {
                metrics::counter!("billing_webhook_parse_failures_total").increment(1);
                return Err(e.into());
            }
        };
        let span = info_span!("webhook", event_id = %event.id, event_type = %event.event_type,
            subscription_id = event.subscription_id().unwrap_or(""));
        async move {
            let lag = (now - event.created).num_milliseconds().max(0);
            #[allow(clippy::cast_precision_loss)]
            metrics::histogram!("billing_webhook_delivery_lag_seconds").record(lag as f64 / 1000.0);
            let new_event = NewEvent {
                id: &event.id,
                event_type: event.event_type.as_str(),
                created: event.created,
                api_version: event.api_version.as_deref(),
                livemode: event.livemode,
                payload,
                received_at: now,
            };
            let (recorded, state) = self.store.record_and_load(&new_event, event.subscription_id()).await?;
            let disposition = match recorded {
                Recorded::Done(_) => Disposition::Duplicate,
                Recorded::Fresh | Recorded::Pending(_) => self.apply_from(&event, Some(state)).await?,
            };
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

    /// Applies a recorded event: load, decide, commit with compare-and-swap, re-deciding on conflict.
    pub async fn apply(&self, event: &Event) -> Result<Disposition, StoreError> {
        self.apply_from(event, None).await
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
                warn!(event_id = %event.id, %reason, "event failed; admin alert queued");
            }
            let commit = Commit {
                now,
                event_id: Some(event.id.clone()),
                outcome: decision.outcome.clone(),
                subscription: decision.subscription,
                account: decision.account,
                jobs: decision.jobs,
            };
            match self.store.commit(&commit).await {
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
            match self.apply_stored(stored).await {
                Ok(_) => applied += 1,
                Err(ReplayError::Store(e)) => return Err(e),
                Err(e) => warn!(event_id = %stored.id, error = %error_chain(&e), "cannot apply stored event"),
            }
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
                match self.store.commit(&commit).await {
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

    /// Claims and runs up to `limit` due jobs. Returns how many ran.
    pub async fn run_due_jobs(&self, limit: u32) -> Result<usize, StoreError> {
        let now = self.clock.now();
        let jobs = self.store.claim_jobs(&Claim { now, lease: self.config.worker.lease, limit }).await?;
        for job in &jobs {
            self.run_job(job).await?;
        }
        Ok(jobs.len())
    }

    async fn run_job(&self, job: &Job) -> Result<(), StoreError> {
        let span = info_span!("job", job_id = job.id, kind = job.kind.label(), attempt = job.attempts);
        async {
            let result = match &job.kind {
                JobKind::Reconcile { subscription_id } => self.reconcile(job, subscription_id).await,
                JobKind::Email { customer_id, subscription_id, email } => {
                    self.send_email(job, customer_id, subscription_id.as_deref(), email).await
                }
                JobKind::AdminAlert { subject, detail } => self.send_alert(job, subject, detail).await,
            };
            let now = self.clock.now();
            let (resolution, output) = match result {
                Ok(output) => (JobResolution::Done, output),
                Err(JobError::Retryable(error, retry_after)) if job.attempts < self.config.worker.max_attempts => {
                    // A server's Retry-After is honoured, but never beyond the configured maximum.
                    let delay = retry_after
                        .map_or_else(|| self.backoff(job.attempts), |d| d.min(self.config.worker.backoff_max));
                    warn!(%error, retry_in_ms = delay.as_millis(), "job failed; will retry");
                    let run_after = chrono::Duration::from_std(delay)
                        .ok()
                        .and_then(|d| now.checked_add_signed(d))
                        .unwrap_or(DateTime::<Utc>::MAX_UTC);
                    (JobResolution::Retry { run_after, error }, JobOutput::default())
                }
                Err(JobError::Retryable(error, _) | JobError::Permanent(error)) => {
                    warn!(%error, "job is dead");
                    let output = self.dead_job_output(job, &error, now).await?;
                    (JobResolution::Dead { error }, output)
                }
            };
            let label = match &resolution {
                JobResolution::Done => "done",
                JobResolution::Retry { .. } => "retry",
                JobResolution::Dead { .. } => "dead",
            };
            metrics::counter!("billing_jobs_total", "kind" => job.kind.label(), "result" => label).increment(1);
            let finish = JobFinish {
                job_id: job.id,
                attempt: job.attempts,
                now,
                resolution,
                instance: output.instance,
                enqueue: output.enqueue,
            };
            if !self.store.finish_job(&finish).await? {
                warn!("lease lost before finishing; another worker owns the job now");
            }
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Exponential backoff with full jitter in [delay/2, delay].
    fn backoff(&self, attempts: u32) -> Duration {
        let w = &self.config.worker;
        let exp = w.backoff_base.saturating_mul(1u32 << attempts.saturating_sub(1).min(20));
        let capped = exp.min(w.backoff_max);
        let jitter: f64 = rand::Rng::gen_range(&mut rand::thread_rng(), 0.5..=1.0);
        capped.mul_f64(jitter)
    }

    async fn dead_job_output(&self, job: &Job, error: &str, now: DateTime<Utc>) -> Result<JobOutput, StoreError> {
        let JobKind::Reconcile { subscription_id } = &job.kind else { return Ok(JobOutput::default()) };
        let existing = self.store.load_instance(subscription_id).await?;
        let mut instance = existing.unwrap_or_else(|| InstanceRecord {
            subscription_id: subscription_id.clone(),
            app_name: app_name_for(subscription_id),
            status: InstanceStatus::Failed,
            generation: 1,
            tier: None,
            limits: None,
            subdomain: None,
            frontend_url: None,
            backend_url: None,
            deprovisioned_at: None,
            updated_at: now,
        });
        instance.status = InstanceStatus::Failed;
        instance.updated_at = now;
        let alert = NewJob {
            key: format!("alert:dead_job:{}", job.id),
            group: None,
            kind: JobKind::AdminAlert {
                subject: format!("Provisioning failed for {subscription_id}"),
                detail: format!(
                    "Job {} ({}) gave up after {} attempts: {error}. The instance {} is marked failed.",
                    job.id, job.key, job.attempts, instance.app_name
                ),
            },
            run_after: now,
        };
        Ok(JobOutput { instance: Some(instance), enqueue: vec![alert] })
    }

    async fn reconcile(&self, job: &Job, subscription_id: &str) -> Result<JobOutput, JobError> {
        let Some(state) = self.store.load_subscription(subscription_id).await? else {
            return Ok(JobOutput::default());
        };
        let instance = self.store.load_instance(subscription_id).await?;
        let now = self.clock.now();
        let desired = state.desired(now);
        let op_started = Instant::now();
        let output = match (desired, instance) {
            (DesiredInstance::Running { tier, limits }, Some(mut current))
                if current.status == InstanceStatus::Running =>
            {
                if current.limits == Some(limits) {
                    return Ok(JobOutput::default());
                }
                let key = format!("update:{subscription_id}:{}:{}", current.generation, job.id);
                self.provisioner_call("update", self.provisioner.update_limits(&current.app_name, &limits, &key))
                    .await?;
                info!(app = %current.app_name, %tier, "instance limits updated");
                current.tier = Some(tier);
                current.limits = Some(limits);
                current.updated_at = now;
                JobOutput { instance: Some(current), enqueue: Vec::new() }
            }
            (DesiredInstance::Running { tier, limits }, current) => {
                let generation = match &current {
                    Some(c) if c.status == InstanceStatus::Deprovisioned => c.generation + 1,
                    Some(c) => c.generation,
                    None => 1,
                };
                let request = ProvisionRequest {
                    subscription_id: subscription_id.to_owned(),
                    customer_id: state.customer_id.clone(),
                    account_id: state.account_id,
                    app_name: app_name_for(subscription_id),
                    tier,
                    limits,
                    idempotency_key: format!("provision:{subscription_id}:{generation}"),
                };
                let created = self.provisioner_call("provision", self.provisioner.provision(&request)).await?;
                info!(app = %created.app_name, %tier, generation, "instance provisioned");
                let welcome = NewJob {
                    key: format!("email:welcome:{subscription_id}:{generation}"),
                    group: None,
                    kind: JobKind::Email {
                        customer_id: state.customer_id.clone(),
                        subscription_id: Some(subscription_id.to_owned()),
                        email: EmailKind::Welcome,
                    },
                    run_after: now,
                };
                let record = InstanceRecord {
                    subscription_id: subscription_id.to_owned(),
                    app_name: created.app_name,
                    status: InstanceStatus::Running,
                    generation,
                    tier: Some(tier),
                    limits: Some(limits),
                    subdomain: created.subdomain,
                    frontend_url: created.frontend_url,
                    backend_url: created.backend_url,
                    deprovisioned_at: None,
                    updated_at: now,
                };
                JobOutput { instance: Some(record), enqueue: vec![welcome] }
            }
            (DesiredInstance::Absent, Some(mut current)) if current.status != InstanceStatus::Deprovisioned => {
                let key = format!("deprovision:{subscription_id}:{}", current.generation);
                self.provisioner_call("deprovision", self.provisioner.deprovision(&current.app_name, &key)).await?;
                info!(app = %current.app_name, "instance deprovisioned");
                current.status = InstanceStatus::Deprovisioned;
                current.deprovisioned_at = Some(now);
                current.updated_at = now;
                JobOutput { instance: Some(current), enqueue: Vec::new() }
            }
            (DesiredInstance::Absent, _) => JobOutput::default(),
        };
        debug!(elapsed_ms = op_started.elapsed().as_millis(), "reconciled");
        Ok(output)
    }

    async fn provisioner_call<T>(
        &self,
        op: &'static str,
        call: impl std::future::Future<Output = Result<T, ProvisionError>>,
    ) -> Result<T, ProvisionError> {
        let started = Instant::now();
        let result = call.await;
        metrics::histogram!("billing_provisioner_request_seconds", "op" => op).record(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            let kind = if e.is_retryable() { "retryable" } else { "permanent" };
            metrics::counter!("billing_provisioner_errors_total", "op" => op, "kind" => kind).increment(1);
        }
        result
    }

    async fn send_email(
        &self,
        job: &Job,
        customer_id: &str,
        subscription_id: Option<&str>,
        email: &EmailKind,
    ) -> Result<JobOutput, JobError> {
        let Some(to) = self.store.load_account(customer_id).await?.and_then(|a| a.email) else {
            warn!(customer_id, email = email.label(), "no e-mail address known; e-mail not sent");
            return Ok(JobOutput::default());
        };
        let state = match subscription_id {
            Some(id) => self.store.load_subscription(id).await?,
            None => None,
        };
        let message = match email {
            EmailKind::Welcome => {
                let instance = match subscription_id {
                    Some(id) => self.store.load_instance(id).await?,
                    None => None,
                };
                Message::Welcome {
                    tier: state.as_ref().and_then(SubscriptionState::tier).unwrap_or(Tier::Free),
                    instance_url: instance.and_then(|i| i.frontend_url),
                }
            }
            EmailKind::PaymentFailed { amount_due, currency, hosted_invoice_url, .. } => Message::PaymentFailed {
                amount_due: *amount_due,
                currency: currency.clone(),
                grace_deadline: state.as_ref().and_then(|s| s.grace).map(|g| g.ends_at),
                update_payment_url: hosted_invoice_url.clone(),
            },
            EmailKind::GraceExpired => Message::GraceExpired,
            EmailKind::TrialEnding { trial_end } => Message::TrialEnding { trial_end: *trial_end },
            EmailKind::Cancellation => Message::Cancellation,
        };
        self.notifier.send(&Notification { to, message, idempotency_key: job.key.clone() }).await?;
        Ok(JobOutput::default())
    }

    async fn send_alert(&self, job: &Job, subject: &str, detail: &str) -> Result<JobOutput, JobError> {
        let Some(to) = self.config.admin_email.clone() else {
            warn!(subject, detail, "admin alert (no ADMIN_EMAIL configured)");
            return Ok(JobOutput::default());
        };
        let message = Message::AdminAlert { subject: subject.to_owned(), detail: detail.to_owned() };
        self.notifier.send(&Notification { to, message, idempotency_key: job.key.clone() }).await?;
        Ok(JobOutput::default())
    }

    /// Counts `count` units of `metric` for the account today, if its tier allows it (atomically).
    pub async fn consume_usage(&self, account_id: Uuid, metric: Metric, count: u64) -> Result<UsageReport, StoreError> {
        let now = self.clock.now();
        let (_, limits, _) = self.best_subscription(account_id, now).await?;
        let limit = metric.limit_in(&limits);
        let key = UsageKey { account_id, metric, day: now.date_naive() };
        let result = self.store.consume_usage(key, count, limit).await?;
        Ok(UsageReport { allowed: result.allowed, used: result.used, limit, remaining: limit.remaining(result.used) })
    }

    /// The account's tier, limits, grace deadline and today's usage.
    pub async fn entitlements(&self, account_id: Uuid) -> Result<Entitlements, StoreError> {
        let now = self.clock.now();
        let (tier, limits, state) = self.best_subscription(account_id, now).await?;
        let day = now.date_naive();
        let messages = self.store.usage(UsageKey { account_id, metric: Metric::Messages, day }).await?;
        let api_calls = self.store.usage(UsageKey { account_id, metric: Metric::ApiCalls, day }).await?;
        Ok(Entitlements {
            account_id,
            tier,
            status: state.as_ref().and_then(SubscriptionState::status).map(|s| s.as_str().to_owned()),
            subscription_id: state.as_ref().map(|s| s.subscription_id.clone()),
            limits,
            grace_period_ends_at: state.as_ref().and_then(|s| s.grace).map(|g| g.ends_at),
            usage_today: crate::service::UsageToday { messages, api_calls },
        })
    }

    async fn best_subscription(
        &self,
        account_id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<(Tier, Limits, Option<SubscriptionState>), StoreError> {
        let subscriptions = self.store.subscriptions_for_account(account_id).await?;
        let best = subscriptions
            .into_iter()
            .filter_map(|s| match s.desired(now) {
                DesiredInstance::Running { tier, limits } => Some((tier, limits, s)),
                DesiredInstance::Absent => None,
            })
            .max_by_key(|(tier, _, _)| *tier);
        Ok(match best {
            Some((tier, limits, s)) => (tier, limits, Some(s)),
            None => (Tier::Free, Tier::Free.limits(), None),
        })
    }

    /// Runs the job workers, the grace sweeper and the unapplied-event pick-up until `shutdown`
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
        let (this, mut stop) = (Arc::clone(&self), shutdown);
        tasks.spawn(async move {
            while !*stop.borrow() {
                if let Err(e) = this.sweep_grace().await {
                    warn!(error = %error_chain(&e), "grace sweeper: store error");
                }
                if let Err(e) = this.pick_up_unapplied().await {
                    warn!(error = %error_chain(&e), "unapplied pick-up: store error");
                }
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

    #[test]
    fn app_names_are_deterministic_dns_safe_and_distinct() {
        let a = app_name_for("sub_1Pgc6rB7WZ01zgkWNy0Cn5nw");
        assert_eq!(a, app_name_for("sub_1Pgc6rB7WZ01zgkWNy0Cn5nw"));
        assert!(a.starts_with("mr-1pgc6rb7wz01zgkwny0cn5nw-"), "{a}");
        assert!(a.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
        assert!(a.len() <= 63);
        // Ids differing only in case get different names.
        assert_ne!(app_name_for("sub_ABC"), app_name_for("sub_abc"));
    }
}
