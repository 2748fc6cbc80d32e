//! Usage counters and entitlements, answered for the other MindRoom services.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::Billing;
use crate::model::{Entitlement, EntitlementStatus, SubscriptionState, UsageKey};
use crate::ports::StoreError;
use crate::tier::{Limit, Limits, Metric, Tier};

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
}

/// Today's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UsageToday {
    /// Messages.
    pub messages: u64,
    /// API calls.
    pub api_calls: u64,
}

impl Billing {
    /// Counts `count` units (at most `i64::MAX`) of `metric` for the account today, if its tier
    /// allows it (atomically). With an `idempotency_key`, a retry of an allowed call (same account,
    /// UTC day and key) counts nothing and answers the same `used` (see [`crate::Store::consume_usage`]).
    pub async fn consume_usage(
        &self,
        account_id: Uuid,
        metric: Metric,
        count: u64,
        idempotency_key: Option<&str>,
    ) -> Result<UsageReport, StoreError> {
        let now = self.clock.now();
        let limits =
            self.best_subscription(account_id, now).await?.map_or_else(|| Tier::Free.limits(), |(e, _)| e.limits);
        let limit = metric.limit_in(&limits);
        let key = UsageKey { account_id, metric, day: now.date_naive() };
        let result = self.store.consume_usage(key, count, limit, idempotency_key).await?;
        Ok(UsageReport { allowed: result.allowed, used: result.used, limit, remaining: limit.remaining(result.used) })
    }

    /// The account's tier, limits, grace deadline and today's usage.
    pub async fn entitlements(&self, account_id: Uuid) -> Result<Entitlements, StoreError> {
        let now = self.clock.now();
        let best = self.best_subscription(account_id, now).await?;
        let day = now.date_naive();
        let messages = self.store.usage(UsageKey { account_id, metric: Metric::Messages, day }).await?;
        let api_calls = self.store.usage(UsageKey { account_id, metric: Metric::ApiCalls, day }).await?;
        let (entitlement, state) = best.unzip();
        let tier = entitlement.map_or(Tier::Free, |e| e.tier);
        Ok(Entitlements {
            account_id,
            tier,
            status: state.as_ref().and_then(SubscriptionState::status).map(|s| s.as_str().to_owned()),
            entitlement_status: entitlement.map(|e| e.status),
            subscription_id: state.as_ref().map(|s| s.subscription_id.clone()),
            limits: tier.limits(),
            grace_period_ends_at: state.as_ref().and_then(|s| s.grace).map(|g| g.ends_at),
            usage_today: crate::service::UsageToday { messages, api_calls },
        })
    }

    /// The subscription that decides the account's limits, with its entitlement (see
    /// [`Entitlements::subscription_id`]); `None` without subscriptions.
    async fn best_subscription(
        &self,
        account_id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Option<(Entitlement, SubscriptionState)>, StoreError> {
        let subscriptions = self.store.subscriptions_for_account(account_id).await?;
        Ok(subscriptions.into_iter().map(|s| (s.entitlement(now), s)).max_by_key(|(e, s)| {
            (
                e.status.grants(),
                e.tier,
                e.status != EntitlementStatus::Canceled,
                s.snapshot.as_ref().map(|x| x.event_created),
            )
        }))
    }
}
