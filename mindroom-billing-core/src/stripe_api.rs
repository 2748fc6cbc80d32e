//! The Stripe API port: the read-only calls catch-up and reconciliation stand on (DESIGN §8).
//!
//! Implementations only *read* Stripe (GET). They page nothing themselves: each call is one page,
//! newest first as Stripe lists, and the caller follows `has_more` with `starting_after` = the last
//! id of the page. Raw JSON is kept exactly as Stripe sent it, like a webhook body, so an event caught
//! up from the API is stored and replayed byte for byte.

use std::fmt;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

/// One page of a Stripe list (`{"object":"list","data":[…],"has_more":…}`), newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// The objects of this page, in Stripe's order (newest first).
    pub data: Vec<T>,
    /// Whether more objects follow (ask again with `starting_after` = the last id of `data`).
    pub has_more: bool,
}

/// What `GET /v1/events` is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsQuery {
    /// `types[]`: only these event types (Stripe accepts up to 20); empty: every type.
    pub types: Vec<String>,
    /// `created[gte]`: only events created at or after this time (whole seconds).
    pub created_gte: Option<DateTime<Utc>>,
    /// `starting_after`: the page after (older than) this event id.
    pub starting_after: Option<String>,
    /// `limit`: page size, 1 to 100.
    pub limit: u32,
}

impl Default for EventsQuery {
    /// Every type, no bound, the first page of 100.
    fn default() -> Self {
        Self { types: Vec::new(), created_gte: None, starting_after: None, limit: 100 }
    }
}

/// An event as listed by `GET /v1/events`.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiEvent {
    /// `evt_…`.
    pub id: String,
    /// `type`, e.g. `customer.subscription.updated`.
    pub event_type: String,
    /// `created`.
    pub created: DateTime<Utc>,
    /// The event's JSON exactly as Stripe sent it inside `data[]`, byte for byte.
    pub raw: String,
}

impl fmt::Debug for ApiEvent {
    /// The raw JSON holds customer data (e-mail addresses): `Debug` shows its length only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiEvent")
            .field("id", &self.id)
            .field("event_type", &self.event_type)
            .field("created", &self.created)
            .field("raw_len", &self.raw.len())
            .finish()
    }
}

/// A Stripe object (subscription, customer) as Stripe sent it.
#[derive(Clone, PartialEq, Eq)]
pub struct RawObject {
    /// The object's id (`sub_…`, `cus_…`).
    pub id: String,
    /// The object's JSON exactly as Stripe sent it, byte for byte.
    pub raw: String,
}

impl fmt::Debug for RawObject {
    /// The raw JSON holds customer data: `Debug` shows its length only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawObject").field("id", &self.id).field("raw_len", &self.raw.len()).finish()
    }
}

/// Why a Stripe API call failed. Messages never contain the API key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StripeApiError {
    /// Stripe refused the key (401/403): wrong, revoked, or a restricted key without read access.
    /// The message names `STRIPE_SECRET_KEY`. Retrying cannot help until the configuration changes.
    #[error("{0}")]
    Unauthorized(String),
    /// Stripe could not be reached or kept answering 429 / 5xx until the client's retries ran out.
    /// Trying again later can succeed.
    #[error("{0}")]
    Unavailable(String),
    /// Any other refusal (4xx) or an answer that is not what the contract says.
    #[error("{0}")]
    Invalid(String),
}

impl StripeApiError {
    /// Whether trying again later can succeed (only [`StripeApiError::Unavailable`]).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// The read-only Stripe API. Every call is one GET, retried by the implementation as it sees fit
/// (rate limits, 5xx, connection errors); an error means it gave up.
#[async_trait]
pub trait StripeApi: Send + Sync + fmt::Debug {
    /// One page of `GET /v1/events` (newest first).
    async fn list_events(&self, query: &EventsQuery) -> Result<Page<ApiEvent>, StripeApiError>;

    /// One page of `GET /v1/subscriptions?status=all&expand[]=data.latest_invoice&limit=100`
    /// (every status, canceled included; newest first), after `starting_after` if given.
    async fn list_subscriptions(&self, starting_after: Option<&str>) -> Result<Page<RawObject>, StripeApiError>;

    /// `GET /v1/subscriptions/{id}?expand[]=latest_invoice`; `None` when Stripe knows no such
    /// subscription (404).
    async fn get_subscription(&self, id: &str) -> Result<Option<RawObject>, StripeApiError>;

    /// `GET /v1/customers/{id}`; `None` when Stripe knows no such customer (404). A deleted
    /// customer is `Some` (`{"deleted":true,…}`).
    async fn get_customer(&self, id: &str) -> Result<Option<RawObject>, StripeApiError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unavailable_is_retryable() {
        assert!(StripeApiError::Unavailable("x".into()).is_retryable());
        assert!(!StripeApiError::Unauthorized("x".into()).is_retryable());
        assert!(!StripeApiError::Invalid("x".into()).is_retryable());
    }

    #[test]
    fn debug_hides_the_raw_json() {
        let o = RawObject { id: "cus_1".into(), raw: r#"{"email":"ada@example.com"}"#.into() };
        assert!(!format!("{o:?}").contains("ada@"));
        let e = ApiEvent {
            id: "evt_1".into(),
            event_type: "customer.updated".into(),
            created: DateTime::UNIX_EPOCH,
            raw: r#"{"email":"ada@example.com"}"#.into(),
        };
        assert!(!format!("{e:?}").contains("ada@"));
    }

    #[test]
    fn the_port_is_object_safe() {
        fn takes(_: Option<&dyn StripeApi>) {}
        takes(None);
    }
}
