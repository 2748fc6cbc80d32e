//! Usage counters and entitlements, answered for the other MindRoom services.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::Billing;
use crate::model::{Entitlement, EntitlementStatus, SubscriptionState, UsageKey, account_id_for_customer};
use crate::ports::{ChangeListener, StoreError};
use crate::tier::{Limit, Limits, Metric, Tier};

/// How a calling service names an account: billing's account id, the Stripe customer, or the
/// platform's reference for its user (the Checkout `client_reference_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountName<'a> {
    /// The account id (answered for as is, also when billing knows nothing of it: free tier).
    Id(Uuid),
    /// `cus_…`
    Customer(&'a str),
    /// The platform's reference.
    Reference(&'a str),
}

impl std::fmt::Display for AccountName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Id(id) => write!(f, "account_id {id}"),
            Self::Customer(customer) => write!(f, "customer {customer:?}"),
            Self::Reference(reference) => write!(f, "reference {reference:?}"),
        }
    }
}

/// Why a named account could not be resolved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccountLookupError {
    /// No account has this customer or reference.
    #[error("no account with {0}")]
    Unknown(String),
    /// More than one account carries this reference (one user who checked out as two customers).
    #[error("{0} names more than one account; ask by customer")]
    Ambiguous(String),
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
    /// The best tier a subscription grants now (free when none does).
    pub tier: Tier,
    /// Stripe's status of the subscription answered for (the granting one, else the most relevant).
    pub status: Option<String>,
    /// Why the account has these limits (`active` / `grace` / `suspended` / `canceled`): the
    /// subscription's `entitlement_status`; `null` for an account without subscriptions.
    pub entitlement_status: Option<EntitlementStatus>,
    /// The subscription answered for: the one granting the tier, else a suspended one, else a
    /// canceled one (the newest).
    pub subscription_id: Option<String>,
    /// Limits.
    pub limits: Limits,
    /// Grace deadline, if a payment failed.
    pub grace_period_ends_at: Option<DateTime<Utc>>,
    /// Usage today.
    pub usage_today: UsageToday,
    /// When the subscriptions this answer is computed from were read from the store (a replica
    /// answers from its cache, kept correct by change notifications or a short time-to-live).
    pub as_of: DateTime<Utc>,
}

/// Today's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UsageToday {
    /// Messages.
    pub messages: u64,
    /// API calls.
    pub api_calls: u64,
    /// When the counters were read from the store: they may be up to the cache's usage
    /// time-to-live (1 s by default) old. Increments (`POST /v1/usage`) are always atomic in the store.
    pub as_of: DateTime<Utc>,
}

impl Billing {
    /// Counts `count` units (at most `i64::MAX`) of `metric` for the account today, if its tier
    /// allows it (atomically). With an `idempotency_key`, a retry of an allowed call (same account,
    /// metric and key, within 48 hours, also on the next UTC day) counts nothing and answers the same
    /// `used` (see [`crate::Store::consume_usage`]).
    pub async fn consume_usage(
        &self,
        account_id: Uuid,
        metric: Metric,
        count: u64,
        idempotency_key: Option<&str>,
    ) -> Result<UsageReport, StoreError> {
        let now = self.clock.now();
        let (subscriptions, _) = self.account_subscriptions(account_id, now).await?;
        let limits = best_subscription(&subscriptions, now).map_or_else(|| Tier::Free.limits(), |(e, _)| e.limits);
        let limit = metric.limit_in(&limits);
        let key = UsageKey { account_id, metric, day: now.date_naive() };
        let idempotency = idempotency_key.map(|key| crate::model::UsageRequestKey { key, at: now });
        let result = self.store.consume_usage(key, count, limit, idempotency).await?;
        self.cache.counted(account_id, key.day, metric, result.used);
        Ok(UsageReport { allowed: result.allowed, used: result.used, limit, remaining: limit.remaining(result.used) })
    }

    /// The account's tier, limits, grace deadline and today's usage, from this replica's cache
    /// where it holds them (see [`crate::CacheConfig`]); `as_of` says when the store was read.
    pub async fn entitlements(&self, account_id: Uuid) -> Result<Entitlements, StoreError> {
        let now = self.clock.now();
        let (subscriptions, as_of) = self.account_subscriptions(account_id, now).await?;
        let usage_today = self.usage_today(account_id, now).await?;
        let best = best_subscription(&subscriptions, now);
        let tier = best.as_ref().map_or(Tier::Free, |(e, _)| e.tier);
        Ok(Entitlements {
            account_id,
            tier,
            status: best.as_ref().and_then(|(_, s)| s.status()).map(|s| s.as_str().to_owned()),
            entitlement_status: best.as_ref().map(|(e, _)| e.status),
            subscription_id: best.as_ref().map(|(_, s)| s.subscription_id.clone()),
            limits: tier.limits(),
            grace_period_ends_at: best.as_ref().and_then(|(_, s)| s.grace).map(|g| g.ends_at),
            usage_today,
            as_of,
        })
    }

    /// The account id `name` stands for. A customer known to have an account and a recently
    /// resolved reference are answered from this replica's cache (see [`crate::CacheConfig`]).
    pub async fn resolve_account(&self, name: AccountName<'_>) -> Result<Uuid, AccountLookupError> {
        match name {
            AccountName::Id(id) => Ok(id),
            AccountName::Customer(customer) => {
                if !self.cache.known_customer(customer) {
                    if self.store.load_account(customer).await?.is_none() {
                        return Err(AccountLookupError::Unknown(name.to_string()));
                    }
                    self.cache.customer_found(customer);
                }
                Ok(account_id_for_customer(customer))
            }
            AccountName::Reference(reference) => {
                if let Some(account) = self.cache.reference(reference) {
                    return Ok(account);
                }
                match self.store.accounts_by_reference(reference, 2).await?.as_slice() {
                    [] => Err(AccountLookupError::Unknown(name.to_string())),
                    [account] => {
                        self.cache.reference_found(reference, account.id);
                        Ok(account.id)
                    }
                    _ => Err(AccountLookupError::Ambiguous(name.to_string())),
                }
            }
        }
    }

    /// The subscriptions of an account and when they were read: from the cache, or from the store
    /// (filling the cache unless the account changed while it was read).
    async fn account_subscriptions(
        &self,
        account_id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<(Arc<Vec<SubscriptionState>>, DateTime<Utc>), StoreError> {
        self.cache.start(|| {
            let listener: Arc<dyn ChangeListener> = self.cache.clone();
            self.store.watch_changes(Arc::downgrade(&listener))
        });
        let ticket = match self.cache.subscriptions(account_id) {
            Ok(cached) => return Ok((cached.subscriptions, cached.as_of)),
            Err(ticket) => ticket,
        };
        let subscriptions = Arc::new(self.store.subscriptions_for_account(account_id).await?);
        if let Some(ticket) = ticket {
            self.cache.fill_subscriptions(account_id, ticket, Arc::clone(&subscriptions), now);
        }
        Ok((subscriptions, now))
    }

    /// Today's counters, from the cache while fresh.
    async fn usage_today(&self, account_id: Uuid, now: DateTime<Utc>) -> Result<UsageToday, StoreError> {
        let day = now.date_naive();
        if let Some(cached) = self.cache.usage(account_id, day) {
            return Ok(UsageToday { messages: cached.messages, api_calls: cached.api_calls, as_of: cached.as_of });
        }
        let messages = self.store.usage(UsageKey { account_id, metric: Metric::Messages, day }).await?;
        let api_calls = self.store.usage(UsageKey { account_id, metric: Metric::ApiCalls, day }).await?;
        self.cache.fill_usage(account_id, day, messages, api_calls, now);
        Ok(UsageToday { messages, api_calls, as_of: now })
    }
}

/// The subscription that decides the account's limits, with its entitlement (see
/// [`Entitlements::subscription_id`]); `None` without subscriptions.
fn best_subscription(
    subscriptions: &[SubscriptionState],
    now: DateTime<Utc>,
) -> Option<(Entitlement, &SubscriptionState)> {
    subscriptions.iter().map(|s| (s.entitlement(now), s)).max_by_key(|(e, s)| {
        (
            e.status.grants(),
            e.tier,
            e.status != EntitlementStatus::Canceled,
            s.snapshot.as_ref().map(|x| x.event_created),
        )
    })
}
