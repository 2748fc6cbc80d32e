//! The job worker: claims due jobs and runs them (reconcile the instance, send e-mails and alerts),
//! with exponential backoff, a dead state and an admin alert for dead provisioning.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tracing::{Instrument, debug, info, info_span, warn};

use super::{Billing, error_chain};
use crate::event::SubscriptionStatus;
use crate::model::{
    Claim, DesiredInstance, EmailKind, InstanceRecord, InstanceStatus, Job, JobFinish, JobKind, JobResolution, NewJob,
    SubscriptionState,
};
use crate::ports::{Message, Notification, NotifyError, ProvisionError, ProvisionRequest, StoreError};
use crate::tier::{Limits, Tier};

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

/// A provisioner operation, as named in idempotency keys and admin alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    Provision,
    Update,
    Deprovision,
}

impl Operation {
    fn label(self) -> &'static str {
        match self {
            Self::Provision => "provision",
            Self::Update => "update",
            Self::Deprovision => "deprovision",
        }
    }

    fn request(self) -> &'static str {
        match self {
            Self::Provision => "POST /provision",
            Self::Update => "PUT /update",
            Self::Deprovision => "DELETE /deprovision",
        }
    }
}

enum JobError {
    Retryable(String, Option<Duration>),
    Permanent(String),
    /// Waiting for a fact a later event brings (a customer's e-mail address): retried with backoff
    /// until [`super::WorkerConfig::email_address_wait`] has passed, whatever the attempt limit.
    Waiting(String),
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

/// A failed attempt, with the provisioner operation it was in (if any): a dead job's consequence
/// depends on it (only a dead provision marks the instance failed).
struct JobFailure {
    error: JobError,
    operation: Option<Operation>,
}

impl JobFailure {
    fn during(operation: Operation, error: impl Into<JobError>) -> Self {
        Self { error: error.into(), operation: Some(operation) }
    }
}

impl From<JobError> for JobFailure {
    fn from(error: JobError) -> Self {
        Self { error, operation: None }
    }
}

impl From<StoreError> for JobFailure {
    fn from(e: StoreError) -> Self {
        JobError::from(e).into()
    }
}

impl From<NotifyError> for JobFailure {
    fn from(e: NotifyError) -> Self {
        JobError::from(e).into()
    }
}

#[derive(Default)]
struct JobOutput {
    instance: Option<InstanceRecord>,
    enqueue: Vec<NewJob>,
    /// Set when the job did nothing because what it was for no longer holds.
    skipped: Option<String>,
}

impl JobOutput {
    fn skipped(reason: String) -> Self {
        Self { skipped: Some(reason), ..Self::default() }
    }
}

impl Billing {
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
                // A fact learnt too late to be news: recorded, and nobody is e-mailed.
                JobKind::Email { late: Some(reason), .. } => Ok(JobOutput::skipped(reason.clone())),
                JobKind::Email { customer_id, subscription_id, email, late: None } => {
                    self.send_email(job, customer_id, subscription_id.as_deref(), email).await
                }
                JobKind::AdminAlert { subject, detail } => self.send_alert(job, subject, detail).await,
            };
            let now = self.clock.now();
            let worker = &self.config.worker;
            let (resolution, output) = match result {
                Ok(mut output) => match output.skipped.take() {
                    Some(reason) => {
                        info!(%reason, "job skipped");
                        (JobResolution::Skipped { reason }, output)
                    }
                    None => (JobResolution::Done, output),
                },
                Err(JobFailure { error: JobError::Waiting(error), .. })
                    if now < job.created_at + worker.email_address_wait =>
                {
                    let delay = self.backoff(job.attempts);
                    info!(%error, retry_in_ms = delay.as_millis(), "job waits");
                    (JobResolution::Retry { run_after: later(now, delay), error }, JobOutput::default())
                }
                Err(JobFailure { error: JobError::Retryable(error, retry_after), .. })
                    if job.attempts < worker.max_attempts =>
                {
                    // A server's Retry-After is honoured, but never beyond the configured maximum.
                    let delay = retry_after.map_or_else(|| self.backoff(job.attempts), |d| d.min(worker.backoff_max));
                    warn!(%error, retry_in_ms = delay.as_millis(), "job failed; will retry");
                    (JobResolution::Retry { run_after: later(now, delay), error }, JobOutput::default())
                }
                Err(JobFailure {
                    error: JobError::Retryable(error, _) | JobError::Permanent(error) | JobError::Waiting(error),
                    operation,
                }) => {
                    warn!(%error, "job is dead");
                    let output = self.dead_job_output(job, operation, &error, now).await?;
                    (JobResolution::Dead { error }, output)
                }
            };
            let label = match &resolution {
                JobResolution::Done => "done",
                JobResolution::Skipped { .. } => "skipped",
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

    /// What a dead job leaves behind. Only a dead *provision* marks the instance `failed`: a dead
    /// update or deprovision leaves the instance as it is (the next reconcile tries again, with a new
    /// idempotency key). Every dead reconcile queues one admin alert naming the operation.
    async fn dead_job_output(
        &self,
        job: &Job,
        operation: Option<Operation>,
        error: &str,
        now: DateTime<Utc>,
    ) -> Result<JobOutput, StoreError> {
        let JobKind::Reconcile { subscription_id } = &job.kind else { return Ok(JobOutput::default()) };
        let existing = self.store.load_instance(subscription_id).await?;
        let app = existing.as_ref().map_or_else(|| app_name_for(subscription_id), |i| i.app_name.clone());
        let (subject, consequence, instance) = match operation {
            Some(Operation::Provision) => {
                let mut instance = existing.unwrap_or_else(|| InstanceRecord {
                    subscription_id: subscription_id.clone(),
                    app_name: app.clone(),
                    status: InstanceStatus::Failed,
                    generation: 1,
                    tier: None,
                    limits: None,
                    subdomain: None,
                    frontend_url: None,
                    backend_url: None,
                    deprovisioned_at: None,
                    updated_at: now,
                    adopted: false,
                });
                instance.status = InstanceStatus::Failed;
                instance.updated_at = now;
                let subject = format!("Provisioning failed for {subscription_id}");
                (subject, format!("The instance {app} is marked failed."), Some(instance))
            }
            Some(op) => {
                let subject = format!("{} of {app} failed for {subscription_id}", op.request());
                let consequence = format!(
                    "The instance {app} is left as it was ({}); the next reconcile of the subscription tries again.",
                    existing.as_ref().map_or("no record", |i| i.status.as_str())
                );
                (subject, consequence, None)
            }
            None => (
                format!("Reconcile failed for {subscription_id}"),
                format!("The instance {app} is left as it was; the next reconcile tries again."),
                None,
            ),
        };
        let alert = NewJob {
            key: format!("alert:dead_job:{}", job.id),
            group: None,
            kind: JobKind::AdminAlert {
                subject,
                detail: format!(
                    "Job {} ({}) gave up after {} attempts: {error}. {consequence}",
                    job.id, job.key, job.attempts
                ),
            },
            run_after: now,
        };
        Ok(JobOutput { instance, enqueue: vec![alert], skipped: None })
    }

    /// Compares the desired instance with the recorded one and calls the provisioner as needed.
    ///
    /// An outcome never learnt (a timeout, a reset connection, a worker that died mid-call) is not a
    /// failure: before each call the intent is recorded, so every later attempt or job converges from
    /// "the app may exist". A record in any status but `deprovisioned` may have an app (removed when
    /// absent is wanted; provisioned again, which answers the existing app, and its limits set unless
    /// they are known to be the wanted ones, when running is wanted).
    async fn reconcile(&self, job: &Job, subscription_id: &str) -> Result<JobOutput, JobFailure> {
        let Some(state) = self.store.load_subscription(subscription_id).await? else {
            return Ok(JobOutput::default());
        };
        let instance = self.store.load_instance(subscription_id).await?;
        let now = self.clock.now();
        let desired = state.desired(now);
        let op_started = Instant::now();
        // Idempotency keys name the operation, the desired state and the job: a retry of this job
        // (after a crash or a lost lease) repeats its key; a later job, e.g. after a dead one, does not.
        let output = match (desired, instance) {
            (DesiredInstance::Running { tier, limits }, Some(mut current))
                if current.status == InstanceStatus::Running =>
            {
                if current.limits == Some(limits) {
                    return Ok(JobOutput::default());
                }
                // While the update is in flight (and after it, until an answer says) its limits are unknown.
                current.limits = None;
                current.updated_at = now;
                self.record_intent(job, &current).await?;
                let key = format!("update:{subscription_id}:{}:{tier}:{}", current.generation, job.id);
                let call = self.provisioner.update_limits(&current.app_name, &limits, &key);
                self.provisioner_call(job, Operation::Update, call).await?;
                info!(app = %current.app_name, %tier, "instance limits updated");
                current.tier = Some(tier);
                current.limits = Some(limits);
                JobOutput { instance: Some(current), ..JobOutput::default() }
            }
            (DesiredInstance::Running { tier, limits }, current) => {
                self.provision(job, &state, current, tier, limits, now).await?
            }
            (DesiredInstance::Absent, Some(mut current)) if current.may_exist() => {
                current.status = InstanceStatus::Deprovisioning;
                current.updated_at = now;
                self.record_intent(job, &current).await?;
                let key = format!("deprovision:{subscription_id}:{}:{}", current.generation, job.id);
                let call = self.provisioner.deprovision(&current.app_name, &key);
                self.provisioner_call(job, Operation::Deprovision, call).await?;
                info!(app = %current.app_name, "instance deprovisioned");
                current.status = InstanceStatus::Deprovisioned;
                current.deprovisioned_at = Some(now);
                JobOutput { instance: Some(current), ..JobOutput::default() }
            }
            (DesiredInstance::Absent, _) => JobOutput::default(),
        };
        debug!(elapsed_ms = op_started.elapsed().as_millis(), "reconciled");
        Ok(output)
    }

    /// Provisions the instance `current` records (none, removed, or one that may exist) at `tier`.
    async fn provision(
        &self,
        job: &Job,
        state: &SubscriptionState,
        current: Option<InstanceRecord>,
        tier: Tier,
        limits: Limits,
        now: DateTime<Utc>,
    ) -> Result<JobOutput, JobFailure> {
        let subscription_id = state.subscription_id.as_str();
        let (generation, app_name, may_exist) = match current {
            Some(c) if c.may_exist() => (c.generation, c.app_name.clone(), Some(c)),
            Some(c) => (c.generation + 1, app_name_for(subscription_id), None),
            None => (1, app_name_for(subscription_id), None),
        };
        let intent = InstanceRecord {
            subscription_id: subscription_id.to_owned(),
            app_name,
            status: InstanceStatus::Provisioning,
            generation,
            tier: Some(tier),
            // A new app gets the limits it is asked for; an existing one keeps its own, known only
            // when they are recorded.
            limits: match &may_exist {
                Some(c) => c.limits.filter(|l| *l == limits),
                None => Some(limits),
            },
            subdomain: may_exist.as_ref().and_then(|c| c.subdomain.clone()),
            frontend_url: may_exist.as_ref().and_then(|c| c.frontend_url.clone()),
            backend_url: may_exist.as_ref().and_then(|c| c.backend_url.clone()),
            deprovisioned_at: None,
            updated_at: now,
            adopted: may_exist.as_ref().is_some_and(|c| c.adopted),
        };
        self.record_intent(job, &intent).await?;
        let request = ProvisionRequest {
            subscription_id: subscription_id.to_owned(),
            customer_id: state.customer_id.clone(),
            account_id: state.account_id,
            app_name: intent.app_name.clone(),
            tier,
            limits,
            idempotency_key: format!("provision:{subscription_id}:{generation}:{tier}:{}", job.id),
        };
        let call = self.provisioner.provision(&request);
        let created = self.provisioner_call(job, Operation::Provision, call).await?;
        if created.app_name != request.app_name {
            // Recording another name would leak the app we asked for (nothing would ever
            // remove it) and point billing at one it did not ask for.
            let error = format!(
                "contract violation: the provisioner answered appName {:?} to a request for {:?}; \
                 check both apps on the Dokku host",
                created.app_name, request.app_name
            );
            return Err(JobFailure::during(Operation::Provision, JobError::Permanent(error)));
        }
        if intent.limits != Some(limits) {
            // The provisioner answered the existing app, which keeps the limits it has.
            let key = format!("update:{subscription_id}:{generation}:{tier}:{}", job.id);
            let call = self.provisioner.update_limits(&request.app_name, &limits, &key);
            self.provisioner_call(job, Operation::Update, call).await?;
        }
        info!(app = %created.app_name, %tier, generation, "instance provisioned");
        let welcome = NewJob {
            key: format!("email:welcome:{subscription_id}:{generation}"),
            group: None,
            kind: JobKind::Email {
                customer_id: state.customer_id.clone(),
                subscription_id: Some(subscription_id.to_owned()),
                email: EmailKind::Welcome,
                late: None,
            },
            run_after: now,
        };
        let record = InstanceRecord {
            status: InstanceStatus::Running,
            limits: Some(limits),
            subdomain: created.subdomain.or(intent.subdomain),
            frontend_url: created.frontend_url.or(intent.frontend_url),
            backend_url: created.backend_url.or(intent.backend_url),
            ..intent
        };
        Ok(JobOutput { instance: Some(record), enqueue: vec![welcome], skipped: None })
    }

    /// Records `intent` before a provisioner call; a job that lost its lease makes no call.
    async fn record_intent(&self, job: &Job, intent: &InstanceRecord) -> Result<(), JobFailure> {
        if self.store.record_instance_intent(job.id, job.attempts, intent).await? {
            Ok(())
        } else {
            Err(JobError::Retryable("lease lost before the provisioner call; another worker owns the job".into(), None)
                .into())
        }
    }

    /// Runs one provisioner call, renewing the job's lease while it is in flight (so a slow call is
    /// never run twice by two workers), with metrics.
    async fn provisioner_call<T>(
        &self,
        job: &Job,
        op: Operation,
        call: impl std::future::Future<Output = Result<T, ProvisionError>>,
    ) -> Result<T, JobFailure> {
        let started = Instant::now();
        let result = tokio::select! {
            biased;
            result = call => result,
            () = self.keep_lease(job) => unreachable!("keep_lease never returns"),
        };
        metrics::histogram!("billing_provisioner_request_seconds", "op" => op.label())
            .record(started.elapsed().as_secs_f64());
        result.map_err(|e| {
            let kind = if e.is_retryable() { "retryable" } else { "permanent" };
            metrics::counter!("billing_provisioner_errors_total", "op" => op.label(), "kind" => kind).increment(1);
            JobFailure::during(op, e)
        })
    }

    /// Renews the lease of `job` every third of the lease, for as long as it is polled.
    async fn keep_lease(&self, job: &Job) {
        let lease = self.config.worker.lease;
        let every = (lease / 3).to_std().unwrap_or(Duration::from_secs(1)).max(Duration::from_millis(10));
        loop {
            tokio::time::sleep(every).await;
            match self.store.extend_lease(job.id, job.attempts, self.clock.now() + lease).await {
                Ok(true) => debug!("lease renewed"),
                Ok(false) => {
                    warn!("lease lost during a provisioner call; another worker owns the job now");
                    // Nothing left to renew; the call runs on (its finish will be refused).
                    return std::future::pending().await;
                }
                Err(e) => warn!(error = %error_chain(&e), "cannot renew the lease; will try again"),
            }
        }
    }

    async fn send_email(
        &self,
        job: &Job,
        customer_id: &str,
        subscription_id: Option<&str>,
        email: &EmailKind,
    ) -> Result<JobOutput, JobFailure> {
        let state = match subscription_id {
            Some(id) => self.store.load_subscription(id).await?,
            None => None,
        };
        // Only the welcome e-mail speaks of the instance.
        let instance = match subscription_id {
            Some(id) if matches!(email, EmailKind::Welcome) => self.store.load_instance(id).await?,
            _ => None,
        };
        // An e-mail says what holds when it is sent, not when it was queued.
        if let Err(reason) = still_true(email, state.as_ref(), instance.as_ref(), self.clock.now()) {
            return Ok(JobOutput::skipped(reason));
        }
        let mut to = self.store.load_account(customer_id).await?.and_then(|a| a.email);
        if to.is_none() && self.stripe.is_some() && job.attempts == 1 {
            // Ask Stripe once; the address is recorded on the account for the next e-mails too.
            match self.fetch_customer_email(customer_id).await {
                Ok(email) => to = email,
                Err(e) => warn!(customer_id, error = %error_chain(&e), "cannot look the customer up at Stripe"),
            }
        }
        let Some(to) = to else {
            let error = format!("no e-mail address known for {customer_id} yet; waiting for an event that brings one");
            return Err(JobError::Waiting(error).into());
        };
        let message = match email {
            EmailKind::Welcome => Message::Welcome {
                tier: state.as_ref().and_then(SubscriptionState::tier).unwrap_or(Tier::Free),
                instance_url: instance.and_then(|i| i.frontend_url),
            },
            EmailKind::PaymentFailed { amount_due, currency, hosted_invoice_url, .. } => Message::PaymentFailed {
                amount_due: *amount_due,
                currency: currency.clone(),
                grace_deadline: state.as_ref().and_then(|s| s.grace).map(|g| g.ends_at),
                update_payment_url: hosted_invoice_url.clone(),
            },
            EmailKind::PaymentActionRequired { amount_due, currency, hosted_invoice_url, .. } => {
                Message::PaymentActionRequired {
                    amount_due: *amount_due,
                    currency: currency.clone(),
                    grace_deadline: state.as_ref().and_then(|s| s.grace).map(|g| g.ends_at),
                    confirm_url: hosted_invoice_url.clone(),
                }
            }
            EmailKind::GraceExpired => Message::GraceExpired,
            EmailKind::TrialEnding { trial_end } => Message::TrialEnding { trial_end: *trial_end },
            EmailKind::Cancellation => Message::Cancellation,
        };
        self.notifier.send(&Notification { to, message, idempotency_key: job.key.clone() }).await?;
        Ok(JobOutput::default())
    }

    async fn send_alert(&self, job: &Job, subject: &str, detail: &str) -> Result<JobOutput, JobFailure> {
        let Some(to) = self.config.admin_email.clone() else {
            warn!(subject, detail, "admin alert (no ADMIN_EMAIL configured)");
            return Ok(JobOutput::default());
        };
        let message = Message::AdminAlert { subject: subject.to_owned(), detail: detail.to_owned() };
        self.notifier.send(&Notification { to, message, idempotency_key: job.key.clone() }).await?;
        Ok(JobOutput::default())
    }
}

/// Whether what an e-mail tells the customer still holds at `now`; `Err(reason)` when it does not.
fn still_true(
    email: &EmailKind,
    state: Option<&SubscriptionState>,
    instance: Option<&InstanceRecord>,
    now: DateTime<Utc>,
) -> Result<(), String> {
    let status = state.and_then(SubscriptionState::status);
    match email {
        EmailKind::Welcome => match instance {
            Some(i) if i.adopted => Err("the instance was adopted from the service billing took over, not \
                                         provisioned by billing"
                .into()),
            Some(i) if i.status == InstanceStatus::Running => Ok(()),
            other => Err(format!("the instance is not running ({})", other.map_or("none", |i| i.status.as_str()))),
        },
        EmailKind::PaymentFailed { invoice_id, .. } | EmailKind::PaymentActionRequired { invoice_id, .. } => {
            let Some(state) = state else { return Err("the subscription is unknown".into()) };
            match status {
                Some(SubscriptionStatus::Incomplete | SubscriptionStatus::IncompleteExpired) => {
                    return Err("the first payment of an incomplete subscription failed: no instance exists".into());
                }
                Some(SubscriptionStatus::Canceled) => return Err("the subscription is canceled".into()),
                _ => {}
            }
            if state.failures.iter().any(|f| f.invoice_id.as_deref() == Some(invoice_id.as_str())) {
                Ok(())
            } else if state.paid_invoices.iter().any(|p| &p.invoice_id == invoice_id) {
                Err(format!("invoice {invoice_id} was paid meanwhile"))
            } else {
                Err(format!("the failure of invoice {invoice_id} is resolved"))
            }
        }
        EmailKind::GraceExpired => match state.and_then(|s| s.grace) {
            Some(grace) if grace.ends_at <= now && state.is_some_and(|s| s.desired(now) == DesiredInstance::Absent) => {
                Ok(())
            }
            _ => Err("the grace period is no longer expired (a payment arrived)".into()),
        },
        EmailKind::TrialEnding { .. } => match status {
            Some(SubscriptionStatus::Trialing) => Ok(()),
            other => {
                Err(format!("the subscription is no longer trialing ({})", other.map_or("unknown", |s| s.as_str())))
            }
        },
        EmailKind::Cancellation => Ok(()),
    }
}

/// `now + delay`, saturating.
fn later(now: DateTime<Utc>, delay: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(delay).ok().and_then(|d| now.checked_add_signed(d)).unwrap_or(DateTime::<Utc>::MAX_UTC)
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
