//! The subscription aggregate, the instance record, accounts and jobs: the values the store keeps.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::event::SubscriptionStatus;
use crate::tier::{Limits, Tier};

/// Namespace of the deterministic account ids derived from Stripe customer ids.
const ACCOUNT_NAMESPACE: Uuid = Uuid::from_u128(0x6d2f_0c1e_9a57_4b1d_8e0f_3c6a_2b9d_7e41);

/// The account id billing derives from a Stripe customer id (UUID v5), identical on every replica.
pub fn account_id_for_customer(customer_id: &str) -> Uuid {
    Uuid::new_v5(&ACCOUNT_NAMESPACE, customer_id.as_bytes())
}

/// A MindRoom account as billing knows it: one per Stripe customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Account id (see [`account_id_for_customer`]).
    pub id: Uuid,
    /// `cus_…`
    pub stripe_customer_id: String,
    /// Where e-mails go.
    pub email: Option<String>,
    /// The platform's reference (Checkout `client_reference_id`).
    pub reference: Option<String>,
}

/// An update to an account carried by a decision; `None` fields keep the stored value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountPatch {
    /// `cus_…`
    pub stripe_customer_id: String,
    /// New e-mail, if the event carries one.
    pub email: Option<String>,
    /// New platform reference, if the event carries one.
    pub reference: Option<String>,
    /// `created` of the event that carried the patch: a store keeps the e-mail of the newest fact,
    /// whatever the order events are processed in.
    pub observed_at: DateTime<Utc>,
}

/// The subscription as last applied from Stripe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedSnapshot {
    /// Status.
    pub status: SubscriptionStatus,
    /// The price that set the tier.
    pub price_id: String,
    /// The tier that price maps to. For a terminal snapshot whose price maps to no tier, the tier of
    /// the latest priced snapshot ([`SubscriptionState::last_priced`]), else free.
    pub tier: Tier,
    /// Whether `tier` came from this snapshot's own price (false only for such terminal snapshots).
    #[serde(default = "yes")]
    pub tier_from_price: bool,
    /// End of the current period.
    pub current_period_end: Option<DateTime<Utc>>,
    /// End of the trial.
    pub trial_end: Option<DateTime<Utc>>,
    /// When it was canceled.
    pub canceled_at: Option<DateTime<Utc>>,
    /// `created` of the event that carried this snapshot.
    pub event_created: DateTime<Utc>,
}

fn yes() -> bool {
    true
}

/// The tier of the latest snapshot (by `created`) whose price mapped to a tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PricedAt {
    /// `created` of that snapshot.
    pub at: DateTime<Utc>,
    /// Its tier.
    pub tier: Tier,
}

/// One delinquency fact: a failed payment of an invoice, or a delinquent snapshot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Failure {
    /// `created` of the event that carried it.
    pub at: DateTime<Utc>,
    /// The unpaid invoice (`invoice.payment_failed`); `None` for a `past_due` / `unpaid` / `paused`
    /// snapshot, which does not say which invoice is unpaid.
    pub invoice_id: Option<String>,
}

impl<'de> Deserialize<'de> for Failure {
    /// Reads both shapes: `{"at", "invoice_id"}` and a bare time (aggregates stored before failures
    /// were tracked per invoice; those read as snapshot facts).
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Shape {
            Fact { at: DateTime<Utc>, invoice_id: Option<String> },
            Time(DateTime<Utc>),
        }
        Ok(match Shape::deserialize(deserializer)? {
            Shape::Fact { at, invoice_id } => Self { at, invoice_id },
            Shape::Time(at) => Self { at, invoice_id: None },
        })
    }
}

/// A paid invoice, remembered so that a late delivery of its failure does not open a grace period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaidInvoice {
    /// `in_…`
    pub invoice_id: String,
    /// `created` of the payment event.
    pub at: DateTime<Utc>,
}

/// A grace period: the instance keeps running until `ends_at`, then is deprovisioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grace {
    /// The first unresolved payment failure (event time, not processing time).
    pub started_at: DateTime<Utc>,
    /// `started_at + GRACE_PERIOD_DAYS`; never extended by Stripe's retries.
    pub ends_at: DateTime<Utc>,
}

/// The aggregate billing keeps per Stripe subscription. Every field is a pure function of the set of
/// facts applied so far, so the result does not depend on delivery order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionState {
    /// `sub_…`
    pub subscription_id: String,
    /// `cus_…`
    pub customer_id: String,
    /// The account (derived from the customer).
    pub account_id: Uuid,
    /// The latest applied snapshot; `None` while only invoices have been seen.
    pub snapshot: Option<AppliedSnapshot>,
    /// Latest `active` / `trialing` snapshot: it resolves every failure up to its time. (Aggregates
    /// stored before failures were tracked per invoice may also hold a payment time here.)
    pub good_standing_at: Option<DateTime<Utc>>,
    /// Latest payment of any invoice: it resolves the delinquent-snapshot facts older than it.
    #[serde(default)]
    pub last_payment_at: Option<DateTime<Utc>>,
    /// Unresolved delinquency facts, sorted by time (Stripe's retries of one invoice add facts, but
    /// the grace runs from the earliest, so they never extend it). A failure is resolved by the
    /// payment of its own invoice or by a good-standing snapshot at or after it.
    pub failures: Vec<Failure>,
    /// The latest paid invoices (at most [`MAX_FAILURE_FACTS`]).
    #[serde(default)]
    pub paid_invoices: Vec<PaidInvoice>,
    /// The current grace period, derived from `failures`.
    pub grace: Option<Grace>,
    /// Whether the sweeper has handled the expiry of the current grace period.
    pub grace_expiry_handled: bool,
    /// The latest priced snapshot seen (applied or stale), so the tier of an unpriced terminal
    /// snapshot does not depend on delivery order.
    #[serde(default)]
    pub last_priced: Option<PricedAt>,
    /// Invoices whose payment waits for the customer to authenticate it (`invoice.payment_action_required`),
    /// while their failure is unresolved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub awaiting_customer: Vec<String>,
    /// Disputes (chargebacks) of this subscription's charges, each as last reported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disputes: Vec<DisputeRecord>,
    /// Set under the `suspend` dispute policy while a dispute is open or lost: when the earliest such
    /// dispute was opened. The entitlements are suspended meanwhile, and the grace period runs from
    /// it (the instance is kept for the grace period).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispute_hold: Option<DateTime<Utc>>,
    /// Compare-and-swap version: the version this value was loaded at (0 = not stored yet).
    pub version: u64,
}

/// Most delinquency facts remembered (the earliest are kept: they define the grace start), and most
/// paid invoices remembered (the latest are kept).
pub const MAX_FAILURE_FACTS: usize = 32;

impl SubscriptionState {
    /// A new, empty aggregate.
    pub fn new(subscription_id: impl Into<String>, customer_id: impl Into<String>) -> Self {
        let customer_id = customer_id.into();
        Self {
            subscription_id: subscription_id.into(),
            account_id: account_id_for_customer(&customer_id),
            customer_id,
            snapshot: None,
            good_standing_at: None,
            last_payment_at: None,
            failures: Vec::new(),
            paid_invoices: Vec::new(),
            grace: None,
            grace_expiry_handled: false,
            last_priced: None,
            awaiting_customer: Vec::new(),
            disputes: Vec::new(),
            dispute_hold: None,
            version: 0,
        }
    }

    /// The disputes still open (not won, lost or closed), earliest evidence deadline first.
    pub fn open_disputes(&self) -> Vec<&DisputeRecord> {
        let mut open: Vec<&DisputeRecord> = self.disputes.iter().filter(|d| !d.is_closed()).collect();
        open.sort_by_key(|d| (d.evidence_due_by.is_none(), d.evidence_due_by, d.opened_at));
        open
    }

    /// The subscription's status, if a snapshot was applied.
    pub fn status(&self) -> Option<SubscriptionStatus> {
        self.snapshot.as_ref().map(|s| s.status)
    }

    /// The tier, if a snapshot was applied.
    pub fn tier(&self) -> Option<Tier> {
        self.snapshot.as_ref().map(|s| s.tier)
    }

    /// What the instance should be at `now` (level-triggered: the worker converges on this).
    pub fn desired(&self, now: DateTime<Utc>) -> DesiredInstance {
        let Some(snapshot) = &self.snapshot else { return DesiredInstance::Absent };
        match snapshot.status {
            SubscriptionStatus::Canceled | SubscriptionStatus::IncompleteExpired | SubscriptionStatus::Incomplete => {
                DesiredInstance::Absent
            }
            SubscriptionStatus::Active
            | SubscriptionStatus::Trialing
            | SubscriptionStatus::PastDue
            | SubscriptionStatus::Unpaid
            | SubscriptionStatus::Paused => match self.grace {
                Some(grace) if now >= grace.ends_at => DesiredInstance::Absent,
                _ => DesiredInstance::Running { tier: snapshot.tier, limits: snapshot.tier.limits() },
            },
        }
    }
}

impl SubscriptionState {
    /// What the subscription entitles its account to at `now`: the effective tier and limits (free
    /// unless it grants its own) and why. The entitlements answer and the public `subscriptions` row
    /// (`max_*`, `entitlement_status`) both come from here. Grants exactly when [`Self::desired`] is
    /// a running instance, except under a dispute hold ([`Self::dispute_hold`]): then nothing is
    /// granted while the instance is kept until the grace period ends.
    pub fn entitlement(&self, now: DateTime<Utc>) -> Entitlement {
        let status = match &self.snapshot {
            None => EntitlementStatus::Suspended,
            Some(snapshot) => match snapshot.status {
                SubscriptionStatus::Canceled | SubscriptionStatus::IncompleteExpired => EntitlementStatus::Canceled,
                SubscriptionStatus::Incomplete => EntitlementStatus::Suspended,
                SubscriptionStatus::Active
                | SubscriptionStatus::Trialing
                | SubscriptionStatus::PastDue
                | SubscriptionStatus::Unpaid
                | SubscriptionStatus::Paused => match self.grace {
                    Some(grace) if now >= grace.ends_at => EntitlementStatus::Suspended,
                    _ if self.dispute_hold.is_some() => EntitlementStatus::Suspended,
                    Some(_) => EntitlementStatus::Grace,
                    None => EntitlementStatus::Active,
                },
            },
        };
        let tier = match (&self.snapshot, status.grants()) {
            (Some(snapshot), true) => snapshot.tier,
            _ => Tier::Free,
        };
        Entitlement { tier, limits: tier.limits(), status }
    }
}

/// A dispute (chargeback) of one of a subscription's charges, as last reported by Stripe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisputeRecord {
    /// `dp_…`
    pub id: String,
    /// The disputed charge.
    pub charge: String,
    /// Amount, minor unit.
    pub amount: i64,
    /// Currency.
    pub currency: String,
    /// Stripe's reason.
    pub reason: String,
    /// Stripe's status (see [`crate::event::DisputeInfo::status`]).
    pub status: String,
    /// The evidence deadline.
    pub evidence_due_by: Option<DateTime<Utc>>,
    /// When the dispute was opened.
    pub opened_at: DateTime<Utc>,
    /// `created` of the event that reported `status` (reports are ordered by it).
    pub reported_at: DateTime<Utc>,
}

impl DisputeRecord {
    /// Whether it is decided (won, lost, or an inquiry closed).
    pub fn is_closed(&self) -> bool {
        crate::event::dispute_status_is_closed(&self.status)
    }

    /// Whether it holds the entitlements under the `suspend` policy: open, or lost.
    pub fn holds(&self) -> bool {
        !self.is_closed() || self.status == "lost"
    }
}

/// Why a subscription grants what it grants; stored as `subscriptions.entitlement_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntitlementStatus {
    /// Paid up (active or trialing): the tier's limits.
    Active,
    /// A payment failed and the grace period runs: still the tier's limits.
    Grace,
    /// Nothing granted for now: the grace period ran out, the first payment is still missing
    /// (`incomplete`), or only invoices are known. Free limits.
    Suspended,
    /// Canceled (or `incomplete_expired`): free limits for good.
    Canceled,
}

impl EntitlementStatus {
    /// The database and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Grace => "grace",
            Self::Suspended => "suspended",
            Self::Canceled => "canceled",
        }
    }

    /// Whether the subscription's own tier applies.
    pub fn grants(self) -> bool {
        matches!(self, Self::Active | Self::Grace)
    }
}

/// What a subscription entitles its account to at one time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entitlement {
    /// The effective tier: the subscription's while it grants, else free.
    pub tier: Tier,
    /// The effective limits (`tier`'s).
    pub limits: Limits,
    /// Why.
    pub status: EntitlementStatus,
}

/// The instance a subscription should have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DesiredInstance {
    /// No instance.
    Absent,
    /// An instance sized for `tier`.
    Running {
        /// The tier.
        tier: Tier,
        /// Its limits.
        limits: Limits,
    },
}

impl DesiredInstance {
    /// `running <tier>` or `absent`, as [`InstanceRecord::describe`] describes a record.
    pub fn describe(self) -> String {
        match self {
            Self::Running { tier, .. } => format!("running {tier}"),
            Self::Absent => "absent".to_owned(),
        }
    }
}

/// Life-cycle status of an instance, as stored in `instances.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceStatus {
    /// Provisioning requested.
    Provisioning,
    /// Up.
    Running,
    /// Provisioning gave up (dead job); an admin was alerted.
    Failed,
    /// Deprovisioning requested.
    Deprovisioning,
    /// Gone.
    Deprovisioned,
}

impl InstanceStatus {
    /// The database name of the status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provisioning => "provisioning",
            Self::Running => "running",
            Self::Failed => "failed",
            Self::Deprovisioning => "deprovisioning",
            Self::Deprovisioned => "deprovisioned",
        }
    }

    /// Parses the database name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "provisioning" => Self::Provisioning,
            "running" => Self::Running,
            "failed" => Self::Failed,
            "deprovisioning" => Self::Deprovisioning,
            "deprovisioned" => Self::Deprovisioned,
            _ => return None,
        })
    }
}

/// The instance as last reconciled; written only by reconcile jobs (one at a time per subscription).
///
/// Before a provisioner call whose outcome decides the record, the job records its intent: status
/// `provisioning` (or `deprovisioning`), the app name and the limits the app has *if it exists*
/// (`None`: unknown). Every status but `deprovisioned` means the app may exist.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// `sub_…`
    pub subscription_id: String,
    /// Deterministic Dokku app name.
    pub app_name: String,
    /// Status.
    pub status: InstanceStatus,
    /// Increments each time the instance is provisioned anew after being removed.
    pub generation: u32,
    /// Tier it runs at.
    pub tier: Option<Tier>,
    /// Limits it runs with.
    pub limits: Option<Limits>,
    /// Subdomain.
    pub subdomain: Option<String>,
    /// Frontend URL.
    pub frontend_url: Option<String>,
    /// Backend URL.
    pub backend_url: Option<String>,
    /// When it was removed.
    pub deprovisioned_at: Option<DateTime<Utc>>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// The app was created by the service billing took over from (adopted, not provisioned by billing):
    /// its customer gets no welcome e-mail from billing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopted: bool,
}

impl InstanceRecord {
    /// Whether the app may exist on the provisioner (anything but `deprovisioned`).
    pub fn may_exist(&self) -> bool {
        self.status != InstanceStatus::Deprovisioned
    }

    /// How the record compares with a desired instance: `running <tier>` when it is known to run at
    /// its tier's limits, `absent` when it is known to be gone, else what it may be.
    pub fn describe(instance: Option<&Self>) -> String {
        match instance {
            None => "absent".to_owned(),
            Some(i) => match (i.status, i.tier, i.limits) {
                (InstanceStatus::Deprovisioned, ..) => "absent".to_owned(),
                (InstanceStatus::Running, Some(tier), Some(limits)) if limits == tier.limits() => {
                    format!("running {tier}")
                }
                (InstanceStatus::Running, ..) => "running at unknown limits".to_owned(),
                (status, ..) => format!("may exist ({})", status.as_str()),
            },
        }
    }
}

/// The outcome of applying one event, as stored with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", content = "reason", rename_all = "lowercase")]
pub enum Outcome {
    /// The event changed billing state.
    Applied,
    /// Older than what was already applied (or after a terminal state); recorded, not applied.
    Stale,
    /// Not something billing acts on.
    Ignored,
    /// Could not be applied (e.g. unknown price); replayable once fixed.
    Failed(String),
}

impl Outcome {
    /// The status label (`applied`, `stale`, `ignored`, `failed`).
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Stale => "stale",
            Outcome::Ignored => "ignored",
            Outcome::Failed(_) => "failed",
        }
    }
}

/// Status of a stored event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventStatus {
    /// Recorded; its decision is not committed yet.
    Received,
    /// Applied.
    Applied,
    /// Recorded as stale.
    Stale,
    /// Recorded as ignored.
    Ignored,
    /// Failed; replayable.
    Failed,
}

impl EventStatus {
    /// The database name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Received => "received",
            Self::Applied => "applied",
            Self::Stale => "stale",
            Self::Ignored => "ignored",
            Self::Failed => "failed",
        }
    }

    /// Parses the database name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "received" => Self::Received,
            "applied" => Self::Applied,
            "stale" => Self::Stale,
            "ignored" => Self::Ignored,
            "failed" => Self::Failed,
            _ => return None,
        })
    }

    /// Whether the event's decision is final (a redelivery is a duplicate).
    pub fn is_done(self) -> bool {
        matches!(self, Self::Applied | Self::Stale | Self::Ignored)
    }

    /// The status an outcome is stored as.
    pub fn of(outcome: &Outcome) -> Self {
        match outcome {
            Outcome::Applied => Self::Applied,
            Outcome::Stale => Self::Stale,
            Outcome::Ignored => Self::Ignored,
            Outcome::Failed(_) => Self::Failed,
        }
    }
}

/// How an event reached billing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventSource {
    /// A webhook delivery whose signature verified.
    #[default]
    Webhook,
    /// Listed from the Stripe API by catch-up (`GET /v1/events`, authenticated by our key).
    Api,
}

impl EventSource {
    /// The database name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Webhook => "webhook",
            Self::Api => "api",
        }
    }
}

/// Where catch-up stands: events created before `created` are recorded (Stripe lists by `created`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncCursor {
    /// The next catch-up lists events created at or after this time.
    pub created: DateTime<Utc>,
    /// When the cursor was last saved.
    pub saved_at: DateTime<Utc>,
}

/// A verified event to record, with its raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent<'a> {
    /// `evt_…`
    pub id: &'a str,
    /// `type`.
    pub event_type: &'a str,
    /// `created`.
    pub created: DateTime<Utc>,
    /// API version.
    pub api_version: Option<&'a str>,
    /// Live mode.
    pub livemode: bool,
    /// The exact bytes received (UTF-8 JSON), kept for audit and byte-exact replay.
    pub payload: &'a str,
    /// When we received it.
    pub received_at: DateTime<Utc>,
    /// How it reached us (the first delivery's source is kept).
    pub source: EventSource,
    /// The customer the payload names ([`crate::operator::event_customer`]) when the caller has
    /// parsed the event already; `None` lets the store derive it from the payload. Stored for the
    /// operator's look-ups, so the webhook path does not parse the payload a second time.
    pub customer_id: Option<&'a str>,
}

/// What recording an event found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// First time this id was seen; it is now stored as `received`.
    Fresh,
    /// Seen before but its decision is not final (`received` or `failed`): apply it now.
    Pending(EventStatus),
    /// Seen before and done: a duplicate.
    Done(EventStatus),
}

/// A stored event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// `evt_…`
    pub id: String,
    /// `type`.
    pub event_type: String,
    /// `created`.
    pub created: DateTime<Utc>,
    /// Status.
    pub status: EventStatus,
    /// Why it failed.
    pub reason: Option<String>,
    /// The exact bytes received.
    pub payload: String,
    /// When first received.
    pub received_at: DateTime<Utc>,
    /// When its decision was committed.
    pub processed_at: Option<DateTime<Utc>>,
    /// How many times it was delivered (1 + duplicates).
    pub deliveries: u32,
    /// How its first delivery reached us.
    #[serde(default)]
    pub source: EventSource,
}

/// Everything one decision writes, atomically.
#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    /// When the decision was made (stored as the event's `processed_at`).
    pub now: DateTime<Utc>,
    /// The event this decision applies (`None` for sweeper decisions). Its status is set to
    /// `outcome` in the same transaction; if it is already done the commit writes nothing.
    pub event_id: Option<String>,
    /// The outcome to store with the event.
    pub outcome: Outcome,
    /// The new aggregate; `version` is the version it was loaded at (0 = must not exist yet).
    pub subscription: Option<SubscriptionState>,
    /// An account update.
    pub account: Option<AccountPatch>,
    /// Jobs to enqueue (a job whose key exists already is skipped).
    pub jobs: Vec<NewJob>,
}

/// The aggregate a decision was made on: its subscription and version (0: absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected<'a> {
    /// `sub_…`
    pub subscription_id: &'a str,
    /// The version the decision saw (0: no aggregate).
    pub version: u64,
}

/// What [`crate::Store::record_and_commit`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordedCommit {
    /// The event is recorded with the decision's outcome, and the decision committed.
    Committed,
    /// The event was done already: only its delivery was counted.
    Duplicate,
    /// The aggregate is not at the expected version: the event is recorded (pending) and nothing
    /// else written. Holds the current aggregate, to decide again on.
    Conflict(Option<Box<SubscriptionState>>),
}

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitResult {
    /// Written.
    Committed,
    /// The event was already done (another delivery or replica won); nothing was written.
    AlreadyDone,
}

/// A job's work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobKind {
    /// Converge the subscription's instance on its desired state.
    Reconcile {
        /// `sub_…`
        subscription_id: String,
    },
    /// E-mail the customer.
    Email {
        /// `cus_…`: the recipient is resolved when sending.
        customer_id: String,
        /// The subscription it is about.
        subscription_id: Option<String>,
        /// Which e-mail.
        email: EmailKind,
        /// Set when the fact the e-mail is about was learnt too late to be news (see
        /// [`Policy::news_horizon`](crate::transition::Policy::news_horizon)): the job is recorded as
        /// skipped with this reason and nobody is e-mailed. Its key still de-duplicates the e-mail.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        late: Option<String>,
    },
    /// E-mail the operators.
    AdminAlert {
        /// Subject.
        subject: String,
        /// Details.
        detail: String,
    },
}

/// Customer e-mails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EmailKind {
    /// The instance is ready.
    Welcome,
    /// A payment failed; the grace deadline is read when sending.
    PaymentFailed {
        /// Invoice.
        invoice_id: String,
        /// Amount due, minor unit.
        amount_due: i64,
        /// Currency.
        currency: String,
        /// Where to pay.
        hosted_invoice_url: Option<String>,
    },
    /// A renewal needs the customer to confirm the payment (3-D Secure); the grace deadline is read
    /// when sending.
    PaymentActionRequired {
        /// Invoice.
        invoice_id: String,
        /// Amount due, minor unit.
        amount_due: i64,
        /// Currency.
        currency: String,
        /// Where the customer confirms the payment.
        hosted_invoice_url: Option<String>,
    },
    /// The grace period ran out; the instance is removed.
    GraceExpired,
    /// The trial ends soon.
    TrialEnding {
        /// When.
        trial_end: Option<DateTime<Utc>>,
    },
    /// The subscription was canceled.
    Cancellation,
}

impl EmailKind {
    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Welcome => "welcome",
            Self::PaymentFailed { .. } => "payment_failed",
            Self::PaymentActionRequired { .. } => "payment_action_required",
            Self::GraceExpired => "grace_expired",
            Self::TrialEnding { .. } => "trial_ending",
            Self::Cancellation => "cancellation",
        }
    }
}

impl JobKind {
    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Reconcile { .. } => "reconcile",
            Self::Email { .. } => "email",
            Self::AdminAlert { .. } => "admin_alert",
        }
    }
}

/// A job to enqueue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewJob {
    /// Unique key: enqueueing an existing key does nothing. Also sent as the idempotency key.
    pub key: String,
    /// Jobs of one group run one at a time, in enqueue order (the subscription id for reconciles).
    pub group: Option<String>,
    /// The work.
    pub kind: JobKind,
    /// Not before.
    pub run_after: DateTime<Utc>,
}

/// Job state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for `run_after`.
    Pending,
    /// Claimed under a lease.
    Running,
    /// Finished.
    Done,
    /// Gave up after the attempt limit or a permanent error.
    Dead,
}

impl JobState {
    /// Database name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Done => "done",
            Self::Dead => "dead",
        }
    }

    /// Parses the database name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "running" => Self::Running,
            "done" => Self::Done,
            "dead" => Self::Dead,
            _ => return None,
        })
    }
}

/// A stored job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Sequence number (enqueue order).
    pub id: i64,
    /// Unique key.
    pub key: String,
    /// Ordering group.
    pub group: Option<String>,
    /// The work.
    pub kind: JobKind,
    /// State.
    pub state: JobState,
    /// Attempts started so far (incremented by each claim; doubles as the lease fencing token).
    pub attempts: u32,
    /// Not before.
    pub run_after: DateTime<Utc>,
    /// Lease end while running.
    pub locked_until: Option<DateTime<Utc>>,
    /// The last error.
    pub last_error: Option<String>,
    /// Enqueued at.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// A claim request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Now.
    pub now: DateTime<Utc>,
    /// Lease length: an unfinished job becomes claimable again after it.
    pub lease: chrono::Duration,
    /// At most this many jobs.
    pub limit: u32,
}

/// How a claimed job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum JobResolution {
    /// Finished.
    Done,
    /// Try again not before `run_after`.
    Retry {
        /// Not before.
        run_after: DateTime<Utc>,
        /// What went wrong.
        error: String,
    },
    /// Give up.
    Dead {
        /// What went wrong.
        error: String,
    },
    /// Not run because what it was for no longer holds (e.g. a payment-failed e-mail for an
    /// invoice paid meanwhile). Stored as `done`, with `skipped: <reason>` as its last error.
    Skipped {
        /// Why.
        reason: String,
    },
}

/// Finishing a claimed job, atomically with the instance it recorded and the jobs it spawned.
#[derive(Debug, Clone, PartialEq)]
pub struct JobFinish {
    /// The job.
    pub job_id: i64,
    /// The `attempts` value seen at claim: the finish is refused if another worker re-claimed it.
    pub attempt: u32,
    /// Now.
    pub now: DateTime<Utc>,
    /// The resolution.
    pub resolution: JobResolution,
    /// Instance record to store.
    pub instance: Option<InstanceRecord>,
    /// Jobs to enqueue (deduplicated by key).
    pub enqueue: Vec<NewJob>,
}

/// Counts of jobs by state, for metrics and `/ready`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCounts {
    /// Pending.
    pub pending: u64,
    /// Running.
    pub running: u64,
    /// Dead.
    pub dead: u64,
    /// Done.
    pub done: u64,
}

/// A usage counter key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UsageKey {
    /// Account.
    pub account_id: Uuid,
    /// Metric.
    pub metric: crate::tier::Metric,
    /// UTC day.
    pub day: NaiveDate,
}

/// How long a usage call's idempotency key is remembered: a retry within this time (also across
/// midnight UTC) counts nothing.
pub const USAGE_KEY_HOURS: i64 = 48;

/// The idempotency key of a usage call (`POST /v1/usage`) and when the call was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageRequestKey<'a> {
    /// The caller's key, per account and metric.
    pub key: &'a str,
    /// When the call was made: the key is remembered for [`USAGE_KEY_HOURS`] from the first call.
    pub at: DateTime<Utc>,
}

/// The result of an atomic conditional increment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageResult {
    /// Whether the increment was within the limit (and so applied).
    pub allowed: bool,
    /// The counter after the call.
    pub used: u64,
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_instance_that_may_exist_is_never_described_as_absent() {
        use crate::tier::Tier;
        let record = |status, limits| InstanceRecord {
            subscription_id: "sub_d".into(),
            app_name: "mr-d".into(),
            status,
            generation: 1,
            tier: Some(Tier::Starter),
            limits,
            subdomain: None,
            frontend_url: None,
            backend_url: None,
            deprovisioned_at: None,
            updated_at: chrono::DateTime::<chrono::Utc>::MIN_UTC,
            adopted: false,
        };
        let starter = Some(Tier::Starter.limits());
        let running = DesiredInstance::Running { tier: Tier::Starter, limits: Tier::Starter.limits() };
        let describe = |status, limits| InstanceRecord::describe(Some(&record(status, limits)));
        assert_eq!(describe(InstanceStatus::Running, starter), running.describe());
        assert_eq!(describe(InstanceStatus::Deprovisioned, starter), DesiredInstance::Absent.describe());
        assert_eq!(InstanceRecord::describe(None), DesiredInstance::Absent.describe());
        for (status, limits) in [
            (InstanceStatus::Provisioning, starter),
            (InstanceStatus::Failed, None),
            (InstanceStatus::Deprovisioning, starter),
            (InstanceStatus::Running, None),
        ] {
            let described = describe(status, limits);
            assert_ne!(described, DesiredInstance::Absent.describe(), "{status:?}");
            assert_ne!(described, running.describe(), "{status:?}");
        }
    }

    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, 0).unwrap_or_default()
    }

    fn with(status: SubscriptionStatus, grace_ends: Option<i64>) -> SubscriptionState {
        let mut s = SubscriptionState::new("sub_1", "cus_1");
        s.snapshot = Some(AppliedSnapshot {
            status,
            price_id: "price_pro".into(),
            tier: Tier::Professional,
            tier_from_price: true,
            current_period_end: None,
            trial_end: None,
            canceled_at: None,
            event_created: at(0),
        });
        s.grace = grace_ends.map(|e| Grace { started_at: at(e - 7 * 86_400), ends_at: at(e) });
        s
    }

    #[test]
    fn entitlement_follows_status_and_grace_and_grants_exactly_when_an_instance_runs() {
        use EntitlementStatus::{Active, Canceled, Grace, Suspended};
        use SubscriptionStatus as S;
        let now = at(1_000_000);
        let cases = [
            (S::Active, None, Active),
            (S::Trialing, None, Active),
            (S::PastDue, Some(1_000_001), Grace),
            (S::Unpaid, Some(1_000_000), Suspended),
            (S::Active, Some(999_999), Suspended),
            (S::Paused, Some(2_000_000), Grace),
            (S::Incomplete, None, Suspended),
            (S::Canceled, None, Canceled),
            (S::IncompleteExpired, Some(1), Canceled),
        ];
        for (status, grace_ends, expected) in cases {
            let state = with(status, grace_ends);
            let e = state.entitlement(now);
            assert_eq!(e.status, expected, "{status:?} {grace_ends:?}");
            let tier = if expected.grants() { Tier::Professional } else { Tier::Free };
            assert_eq!((e.tier, e.limits), (tier, tier.limits()), "{status:?} {grace_ends:?}");
            let runs = matches!(state.desired(now), DesiredInstance::Running { .. });
            assert_eq!(runs, expected.grants(), "{status:?} {grace_ends:?}");
        }
        let unknown = SubscriptionState::new("sub_2", "cus_2").entitlement(now);
        assert_eq!((unknown.tier, unknown.status), (Tier::Free, Suspended));
    }
}
