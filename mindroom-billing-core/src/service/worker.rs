//! The job worker: claims due jobs and runs them (reconcile the instance, send e-mails and alerts),
//! with exponential backoff, a dead state and an admin alert for dead provisioning.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tracing::{Instrument, debug, info, info_span, warn};

use super::{Billing, error_chain};
use crate::model::{
    Claim, DesiredInstance, EmailKind, InstanceRecord, InstanceStatus, Job, JobFinish, JobKind, JobResolution, NewJob,
    SubscriptionState,
};
use crate::ports::{Message, Notification, NotifyError, ProvisionError, ProvisionRequest, StoreError};
use crate::tier::Tier;

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

#[derive(Default)]
struct JobOutput {
    instance: Option<InstanceRecord>,
    enqueue: Vec<NewJob>,
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
