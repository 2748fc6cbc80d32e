//! Why a subscription is in its state, in one plain sentence, for the operator console: a pure
//! function of the aggregate, its instance record, its jobs and the invoices seen, at `now` (the
//! same inputs [`crate::decide`] and the worker act on).
//!
//! Also the operation a reconcile job did or will do (provision, update, deprovision), read from
//! the same facts: the job that wrote the instance record is the first to finish at or after the
//! record's time (a job's instance is written in the same commit that finishes it).

use chrono::{DateTime, Utc};

use crate::event::InvoiceFact;
use crate::model::{
    DesiredInstance, EmailKind, InstanceRecord, InstanceStatus, Job, JobKind, JobState, SubscriptionState,
};

/// What a reconcile job does to the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Create the instance.
    Provision,
    /// Change its limits.
    Update,
    /// Remove it.
    Deprovision,
    /// Nothing: the instance is as wanted.
    Nothing,
}

impl Operation {
    /// `provision`, `update`, `deprovision`, `no change`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Provision => "provision",
            Self::Update => "update",
            Self::Deprovision => "deprovision",
            Self::Nothing => "no change",
        }
    }
}

/// The operation the worker would run for `state` and `instance` at `now` (what a pending reconcile
/// job will do).
pub fn planned_operation(
    state: &SubscriptionState,
    instance: Option<&InstanceRecord>,
    now: DateTime<Utc>,
) -> Operation {
    let running = instance.filter(|i| i.status != InstanceStatus::Deprovisioned);
    match (state.desired(now), running) {
        (DesiredInstance::Running { .. }, None) => Operation::Provision,
        (DesiredInstance::Running { limits, .. }, Some(i)) if i.limits != Some(limits) => Operation::Update,
        (DesiredInstance::Absent, Some(_)) => Operation::Deprovision,
        _ => Operation::Nothing,
    }
}

/// The done reconcile job that wrote `instance`: the first to finish at or after its time.
pub fn instance_writer<'a>(instance: &InstanceRecord, jobs: &'a [Job]) -> Option<&'a Job> {
    jobs.iter()
        .filter(|j| {
            matches!(j.kind, JobKind::Reconcile { .. })
                && j.state == JobState::Done
                && j.updated_at >= instance.updated_at
        })
        .min_by_key(|j| (j.updated_at, j.id))
}

/// What a job is, by operation: `provision`, `update`, `deprovision` or `reconcile (no change)` for
/// a reconcile job (what it did when done, what it will do otherwise), the e-mail's kind, or the
/// alert's subject.
pub fn job_label(
    job: &Job,
    state: &SubscriptionState,
    instance: Option<&InstanceRecord>,
    jobs: &[Job],
    now: DateTime<Utc>,
) -> String {
    match &job.kind {
        JobKind::Email { email, .. } => format!("e-mail: {}", email_label(email)),
        JobKind::AdminAlert { subject, .. } => format!("admin alert: {subject}"),
        JobKind::Reconcile { .. } if job.state == JobState::Done => {
            let wrote = instance.filter(|i| instance_writer(i, jobs).is_some_and(|w| w.id == job.id));
            match (wrote, instance) {
                (Some(i), _) if i.status == InstanceStatus::Deprovisioned => "deprovision".to_owned(),
                (Some(i), _) if provisioned_by(i, job, jobs) || first_generation_by(i, job, jobs) => {
                    "provision".to_owned()
                }
                (Some(_), _) => "update".to_owned(),
                // An earlier record: the welcome e-mail of a generation is queued by the commit that
                // provisioned it.
                (None, Some(i)) if provisioned_by(i, job, jobs) => "provision".to_owned(),
                (None, _) => "reconcile (no change)".to_owned(),
            }
        }
        JobKind::Reconcile { .. } => planned_operation(state, instance, now).label().to_owned(),
    }
}

/// Whether `job` created `instance`'s generation: the welcome e-mail of that generation was queued
/// by the same commit.
fn provisioned_by(instance: &InstanceRecord, job: &Job, jobs: &[Job]) -> bool {
    let suffix = format!(":{}", instance.generation);
    jobs.iter().any(|j| {
        matches!(&j.kind, JobKind::Email { email: EmailKind::Welcome, .. })
            && j.key.ends_with(&suffix)
            && j.created_at == job.updated_at
    })
}

/// Whether `job`, which wrote a first-generation record, is the first reconcile job that finished
/// (so it created the record: nothing had before).
fn first_generation_by(instance: &InstanceRecord, job: &Job, jobs: &[Job]) -> bool {
    instance.generation == 1 && !jobs.iter().any(|j| finished_reconcile_before(j, job))
}

/// Whether `other` is a done reconcile job that finished before `job` (so `job` did not create a
/// first generation).
fn finished_reconcile_before(other: &Job, job: &Job) -> bool {
    matches!(other.kind, JobKind::Reconcile { .. })
        && other.state == JobState::Done
        && other.updated_at < job.updated_at
}

fn email_label(email: &EmailKind) -> &'static str {
    match email {
        EmailKind::Welcome => "welcome",
        EmailKind::PaymentFailed { .. } => "payment failed",
        EmailKind::PaymentActionRequired { .. } => "confirm your payment",
        EmailKind::GraceExpired => "grace expired",
        EmailKind::TrialEnding { .. } => "trial ending",
        EmailKind::Cancellation => "cancellation",
    }
}

/// A day as people write it: `24 Aug 2026`.
pub fn day(t: DateTime<Utc>) -> String {
    t.format("%-d %b %Y").to_string()
}

/// An amount in a currency's minor unit: `$50.00`, `€12.50`, `1,000 JPY`-style for the rest.
pub fn money(amount: i64, currency: &str) -> String {
    let zero_decimal = matches!(currency.to_ascii_lowercase().as_str(), "jpy" | "krw" | "vnd" | "clp" | "isk" | "ugx");
    let sign = if amount < 0 { "-" } else { "" };
    let abs = amount.unsigned_abs();
    let number = if zero_decimal { abs.to_string() } else { format!("{}.{:02}", abs / 100, abs % 100) };
    match currency.to_ascii_lowercase().as_str() {
        "usd" => format!("{sign}${number}"),
        "eur" => format!("{sign}€{number}"),
        "gbp" => format!("{sign}£{number}"),
        other => format!("{sign}{number} {}", other.to_ascii_uppercase()),
    }
}

/// The unpaid invoice that started the grace period, with its amount when it was seen:
/// `invoice in_1Pgd… ($49.00)`, or `a past_due update` when no invoice is named.
fn first_failure(state: &SubscriptionState, invoices: &[InvoiceFact]) -> Option<(String, DateTime<Utc>)> {
    let failure = state.failures.first()?;
    let what = match &failure.invoice_id {
        Some(id) => match invoices.iter().find(|i| &i.id == id) {
            Some(i) => format!("invoice {id} ({})", money(i.amount_due, &i.currency)),
            None => format!("invoice {id}"),
        },
        None => "a payment".to_owned(),
    };
    Some((what, failure.at))
}

/// One sentence: why the subscription has (or has not) an instance now, and what happens next.
pub fn explain(
    state: &SubscriptionState,
    instance: Option<&InstanceRecord>,
    jobs: &[Job],
    invoices: &[InvoiceFact],
    now: DateTime<Utc>,
) -> String {
    let Some(snapshot) = &state.snapshot else {
        return "No instance: only invoices have been seen for this subscription, no subscription event yet \
                (replay or catch up on its customer.subscription event)."
            .to_owned();
    };
    let running = instance.filter(|i| i.status != InstanceStatus::Deprovisioned);
    let open = jobs.iter().find(|j| matches!(j.kind, JobKind::Reconcile { .. }) && j.state != JobState::Done);
    let grace_part = |ended: bool| -> String {
        let Some(grace) = state.grace else { return String::new() };
        let days = (grace.ends_at - grace.started_at).num_days();
        // The first unresolved failure waits for the customer to authenticate the payment (3-D Secure).
        let awaiting = state
            .failures
            .first()
            .and_then(|f| f.invoice_id.as_ref())
            .filter(|id| state.awaiting_customer.contains(id));
        if let Some(invoice) = awaiting {
            let amount = invoices
                .iter()
                .find(|i| &i.id == invoice)
                .map(|i| format!(" ({})", money(i.amount_due, &i.currency)))
                .unwrap_or_default();
            return if ended {
                format!("the customer did not confirm the payment of {invoice}{amount} by {}", day(grace.ends_at))
            } else {
                format!(
                    "waiting for the customer to confirm the payment of {invoice}{amount} by {}",
                    day(grace.ends_at)
                )
            };
        }
        if let Some(since) = state.dispute_hold.filter(|&h| state.failures.first().is_none_or(|f| h <= f.at)) {
            let verb = if ended { "ended" } else { "ends" };
            return format!(
                "a dispute opened on {} suspends the entitlements; the {days}-day grace {verb} on {}",
                day(since),
                day(grace.ends_at)
            );
        }
        let (what, at) = first_failure(state, invoices).unwrap_or_else(|| ("a payment".to_owned(), grace.started_at));
        let verb = if ended { "ended" } else { "ends" };
        format!("{what} failed on {}; the {days}-day grace {verb} on {}", day(at), day(grace.ends_at))
    };
    let pending_part = |op: Operation| -> String {
        let op = op.label();
        match open {
            Some(j) if j.state == JobState::Dead => format!(
                "{op} job {} is dead after {} attempts ({}): retry it",
                j.id,
                j.attempts,
                j.last_error.as_deref().unwrap_or("no error recorded")
            ),
            Some(j) => {
                let error = j.last_error.as_deref().map(|e| format!(", last error: {e}")).unwrap_or_default();
                format!("{op} job {} is {} (attempt {}){error}", j.id, j.state.as_str(), j.attempts)
            }
            None => format!("no {op} job is queued (reconcile with Stripe, or replay its last event)"),
        }
    };
    match state.desired(now) {
        DesiredInstance::Absent => {
            let grace_ended = state.grace.is_some_and(|g| now >= g.ends_at);
            let why = if grace_ended && !snapshot.status.is_terminal() {
                grace_part(true)
            } else {
                let since = snapshot.canceled_at.unwrap_or(snapshot.event_created);
                format!("the subscription is {} since {}", snapshot.status.as_str(), day(since))
            };
            match (running, instance) {
                (Some(i), _) => {
                    format!(
                        "Instance {} still runs but should not: {why}; {}.",
                        i.app_name,
                        pending_part(Operation::Deprovision)
                    )
                }
                (None, Some(i)) => {
                    let when = i.deprovisioned_at.unwrap_or(i.updated_at);
                    let job = instance_writer(i, jobs).map(|j| format!(" (job {})", j.id)).unwrap_or_default();
                    format!("No instance: {why}; deprovisioned on {}{job}.", day(when))
                }
                (None, None) => format!("No instance: {why}; none was ever provisioned."),
            }
        }
        DesiredInstance::Running { tier, limits } => {
            let status = snapshot.status.as_str();
            let period = match snapshot.current_period_end {
                Some(end) if end < now => {
                    format!(" (its period ended on {} and Stripe has sent no renewal since)", day(end))
                }
                _ => String::new(),
            };
            let grace = match state.grace {
                Some(_) => format!("; {}: the instance is removed then unless it is paid", grace_part(false)),
                None => String::new(),
            };
            match running {
                Some(i) if i.limits == Some(limits) => {
                    format!("Running: {status} {tier} subscription{period}; instance {} runs{grace}.", i.app_name)
                }
                Some(i) => format!(
                    "Running on old limits: the subscription is {status} {tier}{period} but instance {} has {}; {}{grace}.",
                    i.app_name,
                    i.tier.map_or("unknown limits", |t| t.as_str()),
                    pending_part(Operation::Update)
                ),
                None => format!(
                    "No instance yet: the subscription is {status} {tier}{period}; {}{grace}.",
                    pending_part(Operation::Provision)
                ),
            }
        }
    }
}
