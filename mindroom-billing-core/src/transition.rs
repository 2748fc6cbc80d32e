//! The pure decision function: `(state, event, now) -> Decision`. No I/O, no clock reads.

use chrono::{DateTime, Duration, Utc};

use crate::event::{DisputeInfo, Event, EventObject, EventType, InvoiceFact, SubscriptionSnapshot, SubscriptionStatus};
use crate::model::{
    AccountPatch, AppliedSnapshot, DisputeRecord, EmailKind, Failure, Grace, JobKind, MAX_FAILURE_FACTS, NewJob,
    Outcome, PaidInvoice, PricedAt, SubscriptionState,
};
use crate::tier::{PriceCatalog, Tier};

/// What a dispute (chargeback) does to the subscription it is booked on (`BILLING_DISPUTE_POLICY`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DisputePolicy {
    /// The team is alerted; the customer keeps everything.
    #[default]
    Alert,
    /// The team is alerted, and the entitlements are suspended while a dispute is open or lost; the
    /// instance is kept for the grace period (from the dispute's opening), then removed unless the
    /// dispute was won meanwhile.
    Suspend,
}

impl DisputePolicy {
    /// Parses `alert` / `suspend`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "alert" => Some(Self::Alert),
            "suspend" => Some(Self::Suspend),
            _ => None,
        }
    }

    /// The configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alert => "alert",
            Self::Suspend => "suspend",
        }
    }
}

/// Business rules that come from configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Price id → tier.
    pub prices: PriceCatalog,
    /// Length of the grace period after the first unresolved payment failure (`GRACE_PERIOD_DAYS`).
    pub grace_period: Duration,
    /// What a dispute does (`BILLING_DISPUTE_POLICY`).
    pub disputes: DisputePolicy,
    /// The operator console's origin (`https://billing.example.com`), for links in admin alerts.
    pub console_url: Option<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            prices: PriceCatalog::new(),
            grace_period: Duration::days(7),
            disputes: DisputePolicy::Alert,
            console_url: None,
        }
    }
}

impl Policy {
    /// Sets the dispute policy.
    #[must_use]
    pub fn with_dispute_policy(mut self, disputes: DisputePolicy) -> Self {
        self.disputes = disputes;
        self
    }

    /// Sets the console origin used for links in admin alerts.
    #[must_use]
    pub fn with_console_url(mut self, url: impl Into<String>) -> Self {
        self.console_url = Some(url.into().trim_end_matches('/').to_owned());
        self
    }

    /// Sets the price catalog.
    #[must_use]
    pub fn with_prices(mut self, prices: PriceCatalog) -> Self {
        self.prices = prices;
        self
    }

    /// Sets the grace period.
    #[must_use]
    pub fn with_grace_period(mut self, grace_period: Duration) -> Self {
        self.grace_period = grace_period;
        self
    }

    /// How old a cancellation, failed payment or trial end may be when billing learns of it and
    /// still be news worth an e-mail: the grace period, and never less than the 3 days Stripe retries
    /// a webhook delivery. Past the grace period a payment-failed e-mail's deadline is over and the
    /// customer has lived with the fact already; a fact that old reaches billing only from a snapshot
    /// (reconciliation, the first start with a Stripe key) or a long catch-up, never from a timely
    /// webhook, which the 3-day floor keeps news even with a grace period shorter than Stripe's retries.
    pub fn news_horizon(&self) -> Duration {
        self.grace_period.max(Duration::days(3))
    }

    /// Why an e-mail about `what` that happened at `fact_at` is not sent when billing learns of it at
    /// `now`; `None` when it is news.
    fn late(&self, what: &str, fact_at: DateTime<Utc>, now: DateTime<Utc>) -> Option<String> {
        let horizon = self.news_horizon();
        (now - fact_at > horizon).then(|| {
            format!(
                "not news: the {what} of {} was learnt {} days later, past the {}-day horizon",
                fact_at.to_rfc3339(),
                (now - fact_at).num_days(),
                horizon.num_days()
            )
        })
    }
}

/// What to write for one event: the outcome, the next aggregate, an account update and the jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Stored with the event.
    pub outcome: Outcome,
    /// The next aggregate, when it changed (its `version` is still the loaded one).
    pub subscription: Option<SubscriptionState>,
    /// An account update.
    pub account: Option<AccountPatch>,
    /// Side effects to run from the job queue.
    pub jobs: Vec<NewJob>,
}

impl Decision {
    fn outcome(outcome: Outcome) -> Self {
        Self { outcome, subscription: None, account: None, jobs: Vec::new() }
    }
}

/// Decides what `event` does to `state` (the aggregate of the event's subscription, if any) at `now`.
pub fn decide(policy: &Policy, state: Option<&SubscriptionState>, event: &Event, now: DateTime<Utc>) -> Decision {
    match &event.object {
        EventObject::Subscription(snapshot) => apply_snapshot(policy, state, event, snapshot, now),
        EventObject::Invoice(invoice) => apply_invoice(policy, state, event, invoice, now),
        EventObject::Customer(customer) => Decision {
            account: Some(AccountPatch {
                stripe_customer_id: customer.id.clone(),
                email: customer.email.clone(),
                reference: None,
                observed_at: event.created,
            }),
            ..Decision::outcome(Outcome::Applied)
        },
        EventObject::CheckoutSession(session) => match &session.customer {
            Some(customer) => Decision {
                account: Some(AccountPatch {
                    stripe_customer_id: customer.clone(),
                    email: session.email.clone(),
                    reference: session.client_reference_id.clone(),
                    observed_at: event.created,
                }),
                ..Decision::outcome(Outcome::Applied)
            },
            None => Decision::outcome(Outcome::Ignored),
        },
        EventObject::Dispute(dispute) => apply_dispute(policy, state, event, dispute, now),
        EventObject::Other => Decision::outcome(Outcome::Ignored),
    }
}

/// The sweeper's decision for a subscription whose grace period may have run out at `now`.
/// Returns `None` when there is nothing to do (not expired, already handled, or terminal).
pub fn expire_grace(state: &SubscriptionState, now: DateTime<Utc>) -> Option<Decision> {
    let grace = state.grace?;
    let terminal = state.status().is_some_and(SubscriptionStatus::is_terminal);
    if now < grace.ends_at || state.grace_expiry_handled || terminal {
        return None;
    }
    let mut next = state.clone();
    next.grace_expiry_handled = true;
    let sub = &state.subscription_id;
    let start = grace.started_at.timestamp();
    Some(Decision {
        outcome: Outcome::Applied,
        jobs: vec![
            reconcile_job(sub, &format!("grace:{start}"), now),
            email_job(state, EmailKind::GraceExpired, format!("email:grace_expired:{sub}:{start}"), None, now),
        ],
        subscription: Some(next),
        account: None,
    })
}

fn apply_snapshot(
    policy: &Policy,
    state: Option<&SubscriptionState>,
    event: &Event,
    snapshot: &SubscriptionSnapshot,
    now: DateTime<Utc>,
) -> Decision {
    let current = state.and_then(|s| s.snapshot.as_ref());
    // Several items (a base plan and add-ons): the highest tier any of their prices maps to.
    let resolved = snapshot
        .prices
        .iter()
        .filter_map(|p| policy.prices.resolve(p).map(|tier| (p, tier)))
        .max_by_key(|&(_, tier)| tier);
    let (price_id, tier) = match resolved {
        Some((price, tier)) => (price.id.clone(), Some(tier)),
        // A terminal snapshot removes the instance whatever its price says; its tier is filled in
        // from the latest priced snapshot below.
        None if snapshot.status.is_terminal() => (snapshot.prices[0].id.clone(), None),
        None => return unknown_price(event, snapshot, now),
    };

    let mut next = state.cloned().unwrap_or_else(|| SubscriptionState::new(&snapshot.id, &snapshot.customer));
    let created = event.created;
    if let Some(tier) = tier {
        if next.last_priced.is_none_or(|p| created >= p.at) {
            next.last_priced = Some(PricedAt { at: created, tier });
        }
    }
    match snapshot.status {
        status if status.is_delinquent() => {
            add_failure(&mut next, Failure { at: created, invoice_id: None });
        }
        SubscriptionStatus::Active | SubscriptionStatus::Trialing => add_good_standing(&mut next, created),
        _ => {}
    }

    // Ordering guard: a snapshot applies if it is not older than the applied one (equal seconds
    // apply). `canceled` is terminal: a terminal snapshot always replaces a live one, and nothing but
    // a newer terminal snapshot replaces a terminal one.
    let apply = match current {
        None => true,
        Some(cur) if cur.status.is_terminal() => snapshot.status.is_terminal() && created >= cur.event_created,
        Some(cur) => snapshot.status.is_terminal() || created >= cur.event_created,
    };
    let mut jobs = Vec::new();
    if apply {
        let was_canceled = current.is_some_and(|c| c.status == SubscriptionStatus::Canceled);
        next.snapshot = Some(AppliedSnapshot {
            status: snapshot.status,
            price_id,
            tier: tier.unwrap_or(Tier::Free),
            tier_from_price: tier.is_some(),
            current_period_end: snapshot.current_period_end,
            trial_end: snapshot.trial_end,
            canceled_at: snapshot.canceled_at,
            event_created: created,
        });
        if snapshot.status == SubscriptionStatus::Canceled && !was_canceled {
            let key = format!("email:cancellation:{}", snapshot.id);
            // A snapshot is dated when it was fetched: the cancellation happened when it ended (or,
            // without `ended_at`, when it was canceled).
            let canceled = snapshot.ended_at.or(snapshot.canceled_at).map_or(created, |t| t.min(created));
            let late = policy.late("cancellation", canceled, now);
            jobs.push(email_job(&next, EmailKind::Cancellation, key, late, now));
        }
    }
    if event.event_type == EventType::SubscriptionTrialWillEnd {
        let end = snapshot.trial_end.map_or(0, |t| t.timestamp());
        let key = format!("email:trial_ending:{}:{end}", snapshot.id);
        let late = policy.late("trial-ending notice", created, now);
        jobs.push(email_job(&next, EmailKind::TrialEnding { trial_end: snapshot.trial_end }, key, late, now));
    }
    if let Some(applied) = next.snapshot.as_mut().filter(|s| !s.tier_from_price) {
        applied.tier = next.last_priced.map_or(Tier::Free, |p| p.tier);
    }
    recompute_grace(&mut next, policy);
    let outcome = if apply { Outcome::Applied } else { Outcome::Stale };
    let account = (snapshot.email.is_some() || snapshot.reference.is_some()).then(|| AccountPatch {
        stripe_customer_id: snapshot.customer.clone(),
        email: snapshot.email.clone(),
        reference: snapshot.reference.clone(),
        observed_at: created,
    });
    finish(state, next, event, outcome, jobs, account, now)
}

fn apply_invoice(
    policy: &Policy,
    state: Option<&SubscriptionState>,
    event: &Event,
    invoice: &InvoiceFact,
    now: DateTime<Utc>,
) -> Decision {
    let account = invoice.customer_email.as_ref().map(|email| AccountPatch {
        stripe_customer_id: invoice.customer.clone(),
        email: Some(email.clone()),
        reference: None,
        observed_at: event.created,
    });
    let Some(subscription_id) = &invoice.subscription else {
        return Decision { account, ..Decision::outcome(Outcome::Ignored) };
    };
    let mut next = state.cloned().unwrap_or_else(|| SubscriptionState::new(subscription_id, &invoice.customer));
    let created = event.created;
    let mut jobs = Vec::new();
    let relevant = match event.event_type {
        EventType::InvoicePaid | EventType::InvoicePaymentSucceeded => add_payment(&mut next, &invoice.id, created),
        EventType::InvoicePaymentFailed => {
            let relevant = add_failure(&mut next, Failure { at: created, invoice_id: Some(invoice.id.clone()) });
            if relevant {
                let email = EmailKind::PaymentFailed {
                    invoice_id: invoice.id.clone(),
                    amount_due: invoice.amount_due,
                    currency: invoice.currency.clone(),
                    hosted_invoice_url: invoice.hosted_invoice_url.clone(),
                };
                let late = policy.late("payment failure", created, now);
                jobs.push(email_job(&next, email, format!("email:payment_failed:{}", invoice.id), late, now));
            }
            relevant
        }
        EventType::InvoicePaymentActionRequired => {
            // The payment waits for the customer: a failure of that invoice (same grace), and one
            // e-mail per invoice with the link where the customer confirms it.
            let relevant = add_failure(&mut next, Failure { at: created, invoice_id: Some(invoice.id.clone()) });
            if relevant {
                if let Err(pos) = next.awaiting_customer.binary_search(&invoice.id) {
                    next.awaiting_customer.insert(pos, invoice.id.clone());
                }
                let email = EmailKind::PaymentActionRequired {
                    invoice_id: invoice.id.clone(),
                    amount_due: invoice.amount_due,
                    currency: invoice.currency.clone(),
                    hosted_invoice_url: invoice.hosted_invoice_url.clone(),
                };
                let late = policy.late("authentication request", created, now);
                let key = format!("email:payment_action_required:{}", invoice.id);
                jobs.push(email_job(&next, email, key, late, now));
            }
            relevant
        }
        _ => return Decision { account, ..Decision::outcome(Outcome::Ignored) },
    };
    recompute_grace(&mut next, policy);
    let outcome = if relevant { Outcome::Applied } else { Outcome::Stale };
    finish(state, next, event, outcome, jobs, account, now)
}

fn apply_dispute(
    policy: &Policy,
    state: Option<&SubscriptionState>,
    event: &Event,
    dispute: &DisputeInfo,
    now: DateTime<Utc>,
) -> Decision {
    let Some(subscription_id) = &dispute.subscription else {
        // The charge's customer is unknown (no Stripe API to look it up, or no subscription of it
        // is known): the team hears of it, nothing else changes.
        let alert = dispute_alert(policy, dispute, None, event, now);
        return Decision { jobs: vec![alert], ..Decision::outcome(Outcome::Applied) };
    };
    let customer = dispute.customer.clone().unwrap_or_default();
    let mut next = state.cloned().unwrap_or_else(|| SubscriptionState::new(subscription_id, &customer));
    let created = event.created;
    let previous = next.disputes.iter().find(|d| d.id == dispute.id).cloned();
    // Reports of one dispute are ordered by `created`; a decided dispute is not reopened by an older
    // or undecided report.
    let stale = previous.as_ref().is_some_and(|p| created < p.reported_at || (p.is_closed() && !dispute.is_closed()));
    if stale {
        return Decision::outcome(Outcome::Stale);
    }
    let record = DisputeRecord {
        id: dispute.id.clone(),
        charge: dispute.charge.clone(),
        amount: dispute.amount,
        currency: dispute.currency.clone(),
        reason: dispute.reason.clone(),
        status: dispute.status.clone(),
        evidence_due_by: dispute.evidence_due_by,
        opened_at: dispute.opened_at,
        reported_at: created,
    };
    let mut jobs = Vec::new();
    if previous.as_ref().is_none_or(|p| p.status != record.status) {
        jobs.push(dispute_alert(policy, dispute, previous.as_ref(), event, now));
    }
    match next.disputes.iter_mut().find(|d| d.id == record.id) {
        Some(existing) => *existing = record,
        None => {
            // Kept by id, so the aggregate does not depend on the order disputes arrived in.
            let pos = next.disputes.partition_point(|d| d.id < record.id);
            next.disputes.insert(pos, record);
        }
    }
    next.dispute_hold = match policy.disputes {
        DisputePolicy::Alert => None,
        DisputePolicy::Suspend => next.disputes.iter().filter(|d| d.holds()).map(|d| d.opened_at).min(),
    };
    recompute_grace(&mut next, policy);
    finish(state, next, event, Outcome::Applied, jobs, None, now)
}

/// The admin alert for one reported dispute status: one per dispute and status.
fn dispute_alert(
    policy: &Policy,
    dispute: &DisputeInfo,
    previous: Option<&DisputeRecord>,
    event: &Event,
    now: DateTime<Utc>,
) -> NewJob {
    let amount = crate::explain::money(dispute.amount, &dispute.currency);
    let customer = dispute.customer.as_deref().unwrap_or("unknown customer");
    let subject = match (dispute.status.as_str(), previous) {
        ("won", _) => format!("Dispute won: {amount} of {customer}"),
        ("lost", _) => format!("Dispute lost: {amount} of {customer}"),
        (status, _) if dispute.is_closed() => format!("Dispute closed ({status}): {amount} of {customer}"),
        (_, None) => format!("Dispute opened: {amount} of {customer}"),
        (status, Some(_)) => format!("Dispute {} is now {status}: {amount} of {customer}", dispute.id),
    };
    let due = dispute
        .evidence_due_by
        .map_or_else(|| "no deadline given".to_owned(), |d| d.format("%Y-%m-%d %H:%M UTC").to_string());
    let subscription = dispute.subscription.as_deref().unwrap_or("unknown");
    let mut detail = format!(
        "Dispute {} of charge {} ({event_type}, event {event_id}): {amount}, reason {reason}, status {status}{was}.          Evidence due by {due}. Customer {customer}, subscription {subscription}.",
        dispute.id,
        dispute.charge,
        event_type = event.event_type,
        event_id = event.id,
        reason = if dispute.reason.is_empty() { "not given" } else { &dispute.reason },
        status = dispute.status,
        was = previous.map_or_else(String::new, |p| format!(" (was {})", p.status)),
    );
    if dispute.subscription.is_some() && policy.disputes == DisputePolicy::Suspend {
        detail.push_str(if dispute.is_closed() && dispute.status != "lost" {
            " Policy suspend: the entitlements come back unless another dispute holds them."
        } else {
            " Policy suspend: the entitlements are suspended; the instance is kept for the grace period."
        });
    }
    if dispute.customer.is_none() {
        detail.push_str(" The charge's customer could not be looked up (is STRIPE_SECRET_KEY set?).");
    }
    if let (Some(console), Some(customer)) = (&policy.console_url, &dispute.customer) {
        detail.push_str(&format!(" Console: {console}/customers/{customer}"));
    }
    NewJob {
        key: format!("alert:dispute:{}:{}", dispute.id, dispute.status),
        group: None,
        kind: JobKind::AdminAlert { subject, detail },
        run_after: now,
    }
}

/// Common tail: compare the desired instance before and after, queue a reconcile when it moved (or the
/// aggregate is new), and only hand back an aggregate that changed.
fn finish(
    state: Option<&SubscriptionState>,
    next: SubscriptionState,
    event: &Event,
    outcome: Outcome,
    mut jobs: Vec<NewJob>,
    account: Option<AccountPatch>,
    now: DateTime<Utc>,
) -> Decision {
    // A new aggregate is reconciled whatever it wants: an instance billing never recorded may exist
    // (one adopted from the service billing took over), and absent is then news to it.
    if state.is_none_or(|s| s.desired(now) != next.desired(now)) {
        jobs.insert(0, reconcile_job(&next.subscription_id, &event.id, now));
    }
    let changed = state != Some(&next);
    Decision { outcome, subscription: changed.then_some(next), account, jobs }
}

fn unknown_price(event: &Event, snapshot: &SubscriptionSnapshot, now: DateTime<Utc>) -> Decision {
    let ids: Vec<&str> = snapshot.prices.iter().map(|p| p.id.as_str()).collect();
    let reason = format!(
        "unknown price {}: not configured in STRIPE_PRICE_* and no lookup_key or metadata.tier names a tier",
        ids.join(", ")
    );
    let alert = NewJob {
        key: format!("alert:unknown_price:{}", event.id),
        group: None,
        kind: JobKind::AdminAlert {
            subject: format!("Unknown Stripe price on {}", snapshot.id),
            detail: format!(
                "Event {} ({}) for subscription {} of customer {}: {reason}. Fix the price configuration, then replay the event.",
                event.id, event.event_type, snapshot.id, snapshot.customer
            ),
        },
        run_after: now,
    };
    Decision { outcome: Outcome::Failed(reason), subscription: None, account: None, jobs: vec![alert] }
}

/// An `active` / `trialing` snapshot at `at`: every failure up to then is resolved.
fn add_good_standing(state: &mut SubscriptionState, at: DateTime<Utc>) {
    state.good_standing_at = Some(state.good_standing_at.map_or(at, |g| g.max(at)));
    retain_unresolved(state);
}

/// A payment of `invoice_id` at `at`: resolves that invoice's failure (whenever it is delivered) and
/// the delinquent-snapshot facts older than the payment. Returns whether it was news
/// (not older than a report of the same payment already seen).
fn add_payment(state: &mut SubscriptionState, invoice_id: &str, at: DateTime<Utc>) -> bool {
    state.last_payment_at = Some(state.last_payment_at.map_or(at, |p| p.max(at)));
    let known = state.paid_invoices.iter_mut().find(|p| p.invoice_id == invoice_id);
    // `invoice.paid` and `invoice.payment_succeeded` both report one payment: the newer report (or
    // one of the same second) applies, an older one is stale.
    let news = match known {
        Some(paid) if paid.at > at => false,
        Some(paid) => {
            paid.at = at;
            true
        }
        None => {
            state.paid_invoices.push(PaidInvoice { invoice_id: invoice_id.to_owned(), at });
            true
        }
    };
    // Keep the latest payments (Stripe redelivers and lists events for 30 days: older facts are settled).
    state.paid_invoices.sort_by(|a, b| b.at.cmp(&a.at).then_with(|| a.invoice_id.cmp(&b.invoice_id)));
    state.paid_invoices.truncate(MAX_FAILURE_FACTS);
    retain_unresolved(state);
    news
}

/// Adds a delinquency fact unless it is already resolved. Returns whether it is unresolved.
fn add_failure(state: &mut SubscriptionState, failure: Failure) -> bool {
    if is_resolved(state, &failure) {
        return false;
    }
    if let Err(pos) = state.failures.binary_search(&failure) {
        state.failures.insert(pos, failure);
        state.failures.truncate(MAX_FAILURE_FACTS);
    }
    true
}

fn is_resolved(state: &SubscriptionState, failure: &Failure) -> bool {
    if state.good_standing_at.is_some_and(|g| failure.at <= g) {
        return true;
    }
    match &failure.invoice_id {
        Some(invoice) => state.paid_invoices.iter().any(|p| &p.invoice_id == invoice),
        None => state.last_payment_at.is_some_and(|p| failure.at < p),
    }
}

fn retain_unresolved(state: &mut SubscriptionState) {
    let failures = std::mem::take(&mut state.failures);
    state.failures = failures.into_iter().filter(|f| !is_resolved(state, f)).collect();
    let failures = &state.failures;
    state.awaiting_customer.retain(|invoice| failures.iter().any(|f| f.invoice_id.as_ref() == Some(invoice)));
}

/// The grace period starts at the earliest unresolved failure (or dispute hold) and is never extended.
fn recompute_grace(state: &mut SubscriptionState, policy: &Policy) {
    let start = match (state.failures.first().map(|f| f.at), state.dispute_hold) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let grace = start.map(|at| Grace { started_at: at, ends_at: at + policy.grace_period });
    if grace.map(|g| g.started_at) != state.grace.map(|g| g.started_at) {
        state.grace_expiry_handled = false;
    }
    state.grace = grace;
}

fn reconcile_job(subscription_id: &str, cause: &str, now: DateTime<Utc>) -> NewJob {
    NewJob {
        key: format!("reconcile:{subscription_id}:{cause}"),
        group: Some(subscription_id.to_owned()),
        kind: JobKind::Reconcile { subscription_id: subscription_id.to_owned() },
        run_after: now,
    }
}

fn email_job(
    state: &SubscriptionState,
    email: EmailKind,
    key: String,
    late: Option<String>,
    now: DateTime<Utc>,
) -> NewJob {
    NewJob {
        key,
        group: None,
        kind: JobKind::Email {
            customer_id: state.customer_id.clone(),
            subscription_id: Some(state.subscription_id.clone()),
            email,
            late,
        },
        run_after: now,
    }
}
