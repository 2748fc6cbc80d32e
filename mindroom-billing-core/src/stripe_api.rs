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
    /// `created[lt]`: only events created before this time (whole seconds).
    pub created_lt: Option<DateTime<Utc>>,
    /// `starting_after`: the page after (older than) this event id.
    pub starting_after: Option<String>,
    /// `limit`: page size, 1 to 100.
    pub limit: u32,
}

impl Default for EventsQuery {
    /// Every type, no bound, the first page of 100.
    fn default() -> Self {
        Self { types: Vec::new(), created_gte: None, created_lt: None, starting_after: None, limit: 100 }
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

    /// `GET /v1/charges/{id}`; `None` when Stripe knows no such charge (404). A dispute names its
    /// charge only: the charge names the customer.
    async fn get_charge(&self, id: &str) -> Result<Option<RawObject>, StripeApiError>;
}

/// An in-memory [`StripeApi`] for tests (feature `test-util`): events, subscriptions and customers
/// that the test adds, listed newest first the way Stripe pages them, and errors it queues.
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
#[derive(Debug, Default)]
pub struct FakeStripeApi {
    state: std::sync::Mutex<FakeState>,
}

#[cfg(feature = "test-util")]
#[derive(Debug, Default)]
struct FakeState {
    /// In the order added; later added = newer among equal `created`.
    events: Vec<ApiEvent>,
    /// In the order added; later added = newer.
    subscriptions: Vec<RawObject>,
    customers: Vec<RawObject>,
    charges: Vec<RawObject>,
    errors: std::collections::VecDeque<StripeApiError>,
    calls: usize,
}

#[cfg(feature = "test-util")]
impl FakeStripeApi {
    /// An empty fake.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds an event.
    pub fn add_event(&self, event: ApiEvent) {
        self.state().events.push(event);
    }

    /// Adds or replaces (by id) a subscription; a replaced one keeps its place in the list.
    pub fn put_subscription(&self, object: RawObject) {
        let mut state = self.state();
        match state.subscriptions.iter_mut().find(|s| s.id == object.id) {
            Some(existing) => *existing = object,
            None => state.subscriptions.push(object),
        }
    }

    /// Adds or replaces (by id) a customer.
    pub fn put_customer(&self, object: RawObject) {
        let mut state = self.state();
        state.customers.retain(|c| c.id != object.id);
        state.customers.push(object);
    }

    /// Adds or replaces (by id) a charge.
    pub fn put_charge(&self, object: RawObject) {
        let mut state = self.state();
        state.charges.retain(|c| c.id != object.id);
        state.charges.push(object);
    }

    /// The next call (of any kind) fails with `error`; queued errors are served in order.
    pub fn fail_next(&self, error: StripeApiError) {
        self.state().errors.push_back(error);
    }

    /// How many calls were made, failed ones included.
    pub fn calls(&self) -> usize {
        self.state().calls
    }

    fn begin(&self) -> Result<std::sync::MutexGuard<'_, FakeState>, StripeApiError> {
        let mut state = self.state();
        state.calls += 1;
        match state.errors.pop_front() {
            Some(error) => Err(error),
            None => Ok(state),
        }
    }
}

/// The page after `starting_after` (an id of `items`, newest first).
#[cfg(feature = "test-util")]
fn fake_page<T: Clone>(
    items: Vec<&T>,
    id: impl Fn(&T) -> &str,
    starting_after: Option<&str>,
    limit: usize,
) -> Result<Page<T>, StripeApiError> {
    let start = match starting_after {
        None => 0,
        Some(after) => {
            items
                .iter()
                .position(|i| id(i) == after)
                .ok_or_else(|| StripeApiError::Invalid(format!("No such object: '{after}'")))?
                + 1
        }
    };
    let rest = &items[start..];
    Ok(Page { data: rest.iter().take(limit).map(|i| (*i).clone()).collect(), has_more: rest.len() > limit })
}

#[cfg(feature = "test-util")]
#[async_trait]
impl StripeApi for FakeStripeApi {
    async fn list_events(&self, q: &EventsQuery) -> Result<Page<ApiEvent>, StripeApiError> {
        if !(1..=100).contains(&q.limit) {
            return Err(StripeApiError::Invalid(format!("limit must be 1 to 100, is {}", q.limit)));
        }
        let state = self.begin()?;
        let mut events: Vec<(usize, &ApiEvent)> = state
            .events
            .iter()
            .enumerate()
            .filter(|(_, e)| q.types.is_empty() || q.types.contains(&e.event_type))
            .filter(|(_, e)| q.created_gte.is_none_or(|gte| e.created.timestamp() >= gte.timestamp()))
            .filter(|(_, e)| q.created_lt.is_none_or(|lt| e.created.timestamp() < lt.timestamp()))
            .collect();
        events.sort_by(|(ia, a), (ib, b)| b.created.cmp(&a.created).then(ib.cmp(ia)));
        let limit = usize::try_from(q.limit).unwrap_or(100);
        fake_page(events.into_iter().map(|(_, e)| e).collect(), |e| &e.id, q.starting_after.as_deref(), limit)
    }

    async fn list_subscriptions(&self, starting_after: Option<&str>) -> Result<Page<RawObject>, StripeApiError> {
        let state = self.begin()?;
        fake_page(state.subscriptions.iter().rev().collect(), |s| &s.id, starting_after, 100)
    }

    async fn get_subscription(&self, id: &str) -> Result<Option<RawObject>, StripeApiError> {
        Ok(self.begin()?.subscriptions.iter().find(|s| s.id == id).cloned())
    }

    async fn get_customer(&self, id: &str) -> Result<Option<RawObject>, StripeApiError> {
        Ok(self.begin()?.customers.iter().find(|c| c.id == id).cloned())
    }

    async fn get_charge(&self, id: &str) -> Result<Option<RawObject>, StripeApiError> {
        Ok(self.begin()?.charges.iter().find(|c| c.id == id).cloned())
    }
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

    #[tokio::test]
    async fn the_fake_pages_newest_first_and_serves_queued_errors() {
        let fake = FakeStripeApi::new();
        for i in 0..150i64 {
            let event_type = if i % 2 == 0 { "invoice.paid" } else { "customer.updated" };
            fake.add_event(ApiEvent {
                id: format!("evt_{i}"),
                event_type: event_type.into(),
                created: DateTime::from_timestamp(1_785_000_000 + i / 2, 0).unwrap(),
                raw: String::new(),
            });
        }
        let mut q = EventsQuery { types: vec!["invoice.paid".into()], ..EventsQuery::default() };
        q.limit = 50;
        let first = fake.list_events(&q).await.unwrap();
        assert_eq!((first.data[0].id.as_str(), first.data.len(), first.has_more), ("evt_148", 50, true));
        q.starting_after = Some(first.data[49].id.clone());
        let second = fake.list_events(&q).await.unwrap();
        assert_eq!((second.data[0].id.as_str(), second.data.len(), second.has_more), ("evt_48", 25, false));
        q.created_gte = DateTime::from_timestamp(1_785_000_074, 0);
        q.starting_after = None;
        assert_eq!(fake.list_events(&q).await.unwrap().data.len(), 1);

        fake.put_subscription(RawObject { id: "sub_1".into(), raw: "{}".into() });
        fake.put_subscription(RawObject { id: "sub_2".into(), raw: "{}".into() });
        fake.put_subscription(RawObject { id: "sub_1".into(), raw: r#"{"v":2}"#.into() });
        let subs = fake.list_subscriptions(None).await.unwrap();
        assert_eq!(subs.data.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["sub_2", "sub_1"]);
        assert_eq!(fake.get_subscription("sub_1").await.unwrap().unwrap().raw, r#"{"v":2}"#);
        assert_eq!(fake.get_customer("cus_1").await.unwrap(), None);

        fake.fail_next(StripeApiError::Unauthorized("STRIPE_SECRET_KEY".into()));
        assert!(matches!(fake.get_customer("cus_1").await, Err(StripeApiError::Unauthorized(_))));
        assert!(fake.get_customer("cus_1").await.is_ok());
        assert_eq!(fake.calls(), 8);
    }

    #[test]
    fn the_port_is_object_safe() {
        fn takes(_: Option<&dyn StripeApi>) {}
        takes(None);
    }
}
