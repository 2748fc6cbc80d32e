//! Tiers, their limits, and the mapping from a Stripe price to a tier.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A subscription tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// $0: one agent, basic tools only.
    Free,
    /// $49/mo.
    Starter,
    /// $199/mo, API access.
    Professional,
    /// Custom pricing, unlimited agents and messages.
    Enterprise,
}

impl Tier {
    /// Every tier, cheapest first.
    pub const ALL: [Tier; 4] = [Tier::Free, Tier::Starter, Tier::Professional, Tier::Enterprise];

    /// The tier's name as stored in the database and sent on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Starter => "starter",
            Tier::Professional => "professional",
            Tier::Enterprise => "enterprise",
        }
    }

    /// The limits this tier grants.
    pub fn limits(self) -> Limits {
        use Limit::{Limited, Unlimited};
        match self {
            Tier::Free => Limits {
                agents: Limited(1),
                messages_per_day: Limited(100),
                api_calls_per_day: Limited(0),
                memory_mb: 256,
                cpu_millis: 250,
            },
            Tier::Starter => Limits {
                agents: Limited(3),
                messages_per_day: Limited(1_000),
                api_calls_per_day: Limited(0),
                memory_mb: 512,
                cpu_millis: 500,
            },
            Tier::Professional => Limits {
                agents: Limited(10),
                messages_per_day: Limited(10_000),
                api_calls_per_day: Unlimited,
                memory_mb: 2048,
                cpu_millis: 2000,
            },
            Tier::Enterprise => Limits {
                agents: Unlimited,
                messages_per_day: Unlimited,
                api_calls_per_day: Unlimited,
                memory_mb: 8192,
                cpu_millis: 4000,
            },
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error for a string that names no tier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown tier {0:?}")]
pub struct UnknownTier(pub String);

impl FromStr for Tier {
    type Err = UnknownTier;

    /// Accepts the canonical names and the common short forms (`pro`, `ent`), case-insensitively.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "free" => Ok(Tier::Free),
            "starter" => Ok(Tier::Starter),
            "professional" | "pro" => Ok(Tier::Professional),
            "enterprise" | "ent" => Ok(Tier::Enterprise),
            _ => Err(UnknownTier(s.to_owned())),
        }
    }
}

/// A countable limit. `Unlimited` is a real variant; in the database and on the wire it is `-1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// At most this many.
    Limited(u32),
    /// No limit.
    Unlimited,
}

impl Limit {
    /// The wire/database form: the number, or `-1` for unlimited.
    pub fn to_wire(self) -> i64 {
        match self {
            Limit::Limited(n) => i64::from(n),
            Limit::Unlimited => -1,
        }
    }

    /// Reads the wire form; any negative number means unlimited.
    pub fn from_wire(value: i64) -> Self {
        if value < 0 { Limit::Unlimited } else { Limit::Limited(u32::try_from(value).unwrap_or(u32::MAX)) }
    }

    /// Whether `used` stays within this limit.
    pub fn allows(self, used: u64) -> bool {
        match self {
            Limit::Limited(n) => used <= u64::from(n),
            Limit::Unlimited => true,
        }
    }

    /// What is left after `used`, `None` when unlimited.
    pub fn remaining(self, used: u64) -> Option<u64> {
        match self {
            Limit::Limited(n) => Some(u64::from(n).saturating_sub(used)),
            Limit::Unlimited => None,
        }
    }
}

impl Serialize for Limit {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_i64(self.to_wire())
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        i64::deserialize(deserializer).map(Limit::from_wire)
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Limited(n) => write!(f, "{n}"),
            Limit::Unlimited => f.write_str("unlimited"),
        }
    }
}

/// What an instance of a tier may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Limits {
    /// Number of agents.
    pub agents: Limit,
    /// Messages per UTC day.
    pub messages_per_day: Limit,
    /// API calls per UTC day (0 for tiers without API access).
    pub api_calls_per_day: Limit,
    /// Memory of the instance, MB.
    pub memory_mb: u32,
    /// CPU of the instance in thousandths of a core (250 = 0.25 CPU).
    pub cpu_millis: u32,
}

impl Limits {
    /// CPU as a fraction of cores (`0.25`), as the provisioner and the database expect it.
    pub fn cpu(&self) -> f64 {
        f64::from(self.cpu_millis) / 1000.0
    }
}

/// A usage metric tracked per account and UTC day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Messages sent by the account's agents.
    Messages,
    /// Calls to the MindRoom API.
    ApiCalls,
}

impl Metric {
    /// The metric's name in the database and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Messages => "messages",
            Metric::ApiCalls => "api_calls",
        }
    }

    /// This metric's daily limit within `limits`.
    pub fn limit_in(self, limits: &Limits) -> Limit {
        match self {
            Metric::Messages => limits.messages_per_day,
            Metric::ApiCalls => limits.api_calls_per_day,
        }
    }
}

impl FromStr for Metric {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "messages" => Ok(Metric::Messages),
            "api_calls" => Ok(Metric::ApiCalls),
            other => Err(format!("unknown metric {other:?} (expected messages or api_calls)")),
        }
    }
}

/// What we know of a subscription item's price.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PriceRef {
    /// `price.id`.
    pub id: String,
    /// `price.lookup_key`, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookup_key: Option<String>,
    /// `price.metadata.tier`, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_tier: Option<String>,
}

/// Price id → tier configuration (`STRIPE_PRICE_STARTER`, `STRIPE_PRICE_PRO`, `STRIPE_PRICE_ENTERPRISE`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceCatalog {
    prices: HashMap<String, Tier>,
}

impl PriceCatalog {
    /// An empty catalog: only `lookup_key` / `metadata.tier` can resolve a price.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `price_id` to `tier`.
    #[must_use]
    pub fn with_price(mut self, price_id: impl Into<String>, tier: Tier) -> Self {
        self.prices.insert(price_id.into(), tier);
        self
    }

    /// Resolves a price: the configured map first, then `lookup_key`, then `metadata.tier`.
    /// `None` means unknown — never silently free.
    pub fn resolve(&self, price: &PriceRef) -> Option<Tier> {
        self.prices
            .get(&price.id)
            .copied()
            .or_else(|| price.lookup_key.as_deref().and_then(|k| k.parse().ok()))
            .or_else(|| price.metadata_tier.as_deref().and_then(|k| k.parse().ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_table_matches_design() {
        let rows = [
            (Tier::Free, 1, 100, 256, 250),
            (Tier::Starter, 3, 1_000, 512, 500),
            (Tier::Professional, 10, 10_000, 2048, 2000),
        ];
        for (tier, agents, messages, memory, cpu) in rows {
            let l = tier.limits();
            assert_eq!(l.agents, Limit::Limited(agents), "{tier}");
            assert_eq!(l.messages_per_day, Limit::Limited(messages), "{tier}");
            assert_eq!((l.memory_mb, l.cpu_millis), (memory, cpu), "{tier}");
        }
        let e = Tier::Enterprise.limits();
        assert_eq!(
            (e.agents, e.messages_per_day, e.memory_mb, e.cpu()),
            (Limit::Unlimited, Limit::Unlimited, 8192, 4.0)
        );
    }

    #[test]
    fn unlimited_is_minus_one_on_the_wire() {
        let json = serde_json::to_string(&Tier::Enterprise.limits()).unwrap();
        assert!(json.contains("\"agents\":-1"), "{json}");
        let back: Limits = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Tier::Enterprise.limits());
        assert_eq!(Limit::from_wire(-1), Limit::Unlimited);
        assert_eq!(Limit::Limited(3).to_wire(), 3);
    }

    #[test]
    fn price_resolution_order() {
        let catalog = PriceCatalog::new().with_price("price_pro", Tier::Professional);
        let p = |id: &str, lk: Option<&str>, md: Option<&str>| PriceRef {
            id: id.into(),
            lookup_key: lk.map(Into::into),
            metadata_tier: md.map(Into::into),
        };
        assert_eq!(catalog.resolve(&p("price_pro", Some("starter"), None)), Some(Tier::Professional));
        assert_eq!(catalog.resolve(&p("price_x", Some("starter"), Some("enterprise"))), Some(Tier::Starter));
        assert_eq!(catalog.resolve(&p("price_x", Some("weird"), Some("Enterprise"))), Some(Tier::Enterprise));
        assert_eq!(catalog.resolve(&p("price_x", None, None)), None);
    }

    #[test]
    fn limit_allows_and_remaining() {
        assert!(Limit::Limited(2).allows(2));
        assert!(!Limit::Limited(2).allows(3));
        assert_eq!(Limit::Limited(5).remaining(7), Some(0));
        assert!(Limit::Unlimited.allows(u64::MAX));
        assert_eq!(Limit::Unlimited.remaining(1), None);
    }
}
