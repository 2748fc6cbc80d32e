#![doc = include_str!("../README.md")]

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use chrono::DateTime;
use mindroom_billing_core::ports::BoxError;
use mindroom_billing_core::stripe_api::{ApiEvent, EventsQuery, Page, RawObject, StripeApi, StripeApiError};
use mindroom_billing_http::{
    ClientSettings, REDACTED, TransportFailure, bearer, build_client, is_retryable_status, parse_base_url, retry_after,
    snippet,
};
use rand::Rng;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span, warn};

/// The Stripe API.
pub const DEFAULT_BASE_URL: &str = "https://api.stripe.com";
/// The API version pinned by default: the version of the events this workspace's fixtures hold.
pub const DEFAULT_API_VERSION: &str = "2026-07-29.dahlia";
/// Default whole-request timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The page size of [`StripeApi::list_subscriptions`] (Stripe's largest).
pub const SUBSCRIPTIONS_PAGE: u32 = 100;

/// The counter of API requests (every attempt), labelled `endpoint` and `status` (the HTTP status
/// code, or `error` when no answer came).
pub const METRIC_REQUESTS: &str = "billing_stripe_api_requests_total";
/// The histogram of request latency in seconds (every attempt), labelled `endpoint`.
pub const METRIC_SECONDS: &str = "billing_stripe_api_request_seconds";

/// Describes the client's metrics (meaning, unit, labels) to the installed `metrics` recorder, and
/// registers each endpoint's series at zero (status `200`), so a scrape right after start lists them.
pub fn describe_metrics() {
    for endpoint in [Endpoint::Events, Endpoint::Subscriptions, Endpoint::Subscription, Endpoint::Customer] {
        metrics::counter!(METRIC_REQUESTS, "endpoint" => endpoint.label(), "status" => "200").absolute(0);
        drop(metrics::histogram!(METRIC_SECONDS, "endpoint" => endpoint.label()));
    }
    metrics::describe_counter!(
        METRIC_REQUESTS,
        metrics::Unit::Count,
        "Stripe API requests (each attempt), by endpoint (events, subscriptions, subscription, customer) and HTTP status"
    );
    metrics::describe_histogram!(
        METRIC_SECONDS,
        metrics::Unit::Seconds,
        "Duration of Stripe API requests, by endpoint, in seconds"
    );
}

/// The client-side limiter: a token bucket refilled at `per_second`, holding at most `burst`
/// tokens. In any window of one second at most `per_second + burst` requests start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained requests per second (> 0).
    pub per_second: f64,
    /// Requests that may start at once after a quiet spell (≥ 1).
    pub burst: u32,
}

impl RateLimit {
    /// For test-mode keys: 20/s + a burst of 5 stays within Stripe's 25 reads/s in test mode.
    pub const TEST_MODE: Self = Self { per_second: 20.0, burst: 5 };
    /// For live keys: 80/s + a burst of 20 stays within Stripe's 100 reads/s in live mode.
    pub const LIVE_MODE: Self = Self { per_second: 80.0, burst: 20 };

    /// The default for a key: [`RateLimit::TEST_MODE`] for `sk_test_…` / `rk_test_…`, else
    /// [`RateLimit::LIVE_MODE`].
    pub fn for_key(key: &str) -> Self {
        if key.starts_with("sk_test_") || key.starts_with("rk_test_") { Self::TEST_MODE } else { Self::LIVE_MODE }
    }
}

/// How a request that failed in a retryable way is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (≥ 1).
    pub max_attempts: u32,
    /// The delay before the second attempt; it doubles each time, with jitter (half to all of it).
    pub base_delay: Duration,
    /// No wait is longer than this, a `Retry-After` included.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 10 attempts, 500 ms doubling up to 30 s (about 2 minutes of trying in all).
    fn default() -> Self {
        Self { max_attempts: 10, base_delay: Duration::from_millis(500), max_delay: Duration::from_secs(30) }
    }
}

impl RetryPolicy {
    /// The wait before attempt `attempt + 1` after attempt `attempt` (1-based) failed: the
    /// exponential delay with jitter, at least `retry_after`, at most `max_delay`.
    fn delay(&self, attempt: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
        let exp = self.base_delay.saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1))).min(self.max_delay);
        let jittered = exp.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
        jittered.max(retry_after.unwrap_or_default()).min(self.max_delay)
    }
}

/// How to reach the Stripe API.
#[derive(Clone)]
pub struct StripeConfig {
    secret_key: SecretString,
    api_version: String,
    base_url: String,
    timeout: Duration,
    connect_timeout: Duration,
    rate_limit: Option<RateLimit>,
    retry: RetryPolicy,
}

impl StripeConfig {
    /// Reads Stripe with `secret_key` (`STRIPE_SECRET_KEY`: `sk_…`, or a restricted `rk_…` key with
    /// read access to events, subscriptions, invoices and customers), pinned to
    /// [`DEFAULT_API_VERSION`], at [`DEFAULT_BASE_URL`].
    pub fn new(secret_key: impl Into<String>) -> Self {
        Self {
            secret_key: SecretString::from(secret_key.into()),
            api_version: DEFAULT_API_VERSION.to_owned(),
            base_url: DEFAULT_BASE_URL.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            rate_limit: None,
            retry: RetryPolicy::default(),
        }
    }

    /// Pins another `Stripe-Version` (`STRIPE_API_VERSION`).
    #[must_use]
    pub fn with_api_version(mut self, api_version: impl Into<String>) -> Self {
        self.api_version = api_version.into();
        self
    }

    /// Sets the API base URL (`STRIPE_API_BASE`; tests point it at a local stub).
    #[must_use]
    pub fn with_base_url(mut self, base_url: impl Into<String>) -> Self {
        self.base_url = base_url.into();
        self
    }

    /// Sets the whole-request timeout (default 30 s).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the connect timeout (default 5 s).
    #[must_use]
    pub fn with_connect_timeout(mut self, connect_timeout: Duration) -> Self {
        self.connect_timeout = connect_timeout;
        self
    }

    /// Sets the client-side rate limit (default: [`RateLimit::for_key`]).
    #[must_use]
    pub fn with_rate_limit(mut self, rate_limit: RateLimit) -> Self {
        self.rate_limit = Some(rate_limit);
        self
    }

    /// Sets the retry policy (default: [`RetryPolicy::default`]).
    #[must_use]
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The pinned API version.
    pub fn api_version(&self) -> &str {
        &self.api_version
    }

    /// The API base URL as configured.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The rate limit in force.
    pub fn rate_limit(&self) -> RateLimit {
        self.rate_limit.unwrap_or_else(|| RateLimit::for_key(self.secret_key.expose_secret()))
    }

    /// The retry policy.
    pub fn retry(&self) -> RetryPolicy {
        self.retry
    }
}

impl fmt::Debug for StripeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripeConfig")
            .field("secret_key", &REDACTED)
            .field("api_version", &self.api_version)
            .field("base_url", &self.base_url)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("rate_limit", &self.rate_limit())
            .field("retry", &self.retry)
            .finish()
    }
}

/// Why a [`StripeClient`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StripeClientError {
    /// The base URL is not an absolute `http`/`https` URL.
    #[error("invalid STRIPE_API_BASE {url:?}: {reason}")]
    InvalidBaseUrl {
        /// The URL as configured.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The key is empty, not a secret (`sk_…`) or restricted (`rk_…`) key, or not a header value.
    #[error("invalid STRIPE_SECRET_KEY: {0}")]
    InvalidSecretKey(&'static str),
    /// The API version is empty or not a header value.
    #[error("invalid STRIPE_API_VERSION {0:?}")]
    InvalidApiVersion(String),
    /// The rate limit or retry policy is out of range.
    #[error("invalid Stripe client setting: {0}")]
    InvalidSetting(&'static str),
    /// The HTTP client could not be built (TLS initialisation).
    #[error("could not build the HTTP client")]
    Client(#[source] BoxError),
}

/// The read-only Stripe API client. Cheap to clone: clones share the connection pool and the rate
/// limiter.
#[derive(Clone)]
pub struct StripeClient {
    client: reqwest::Client,
    /// Base URL without trailing slashes.
    base: String,
    authorization: HeaderValue,
    version: HeaderValue,
    limiter: Arc<TokenBucket>,
    config: StripeConfig,
}

impl fmt::Debug for StripeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripeClient").field("config", &self.config).finish_non_exhaustive()
    }
}

/// The bounded endpoint label of a call (metrics and spans).
#[derive(Debug, Clone, Copy)]
enum Endpoint {
    Events,
    Subscriptions,
    Subscription,
    Customer,
    Charge,
}

impl Endpoint {
    fn label(self) -> &'static str {
        match self {
            Self::Events => "events",
            Self::Subscriptions => "subscriptions",
            Self::Subscription => "subscription",
            Self::Customer => "customer",
            Self::Charge => "charge",
        }
    }
}

impl StripeClient {
    /// Builds the client (reqwest with rustls; redirects are not followed).
    pub fn new(config: StripeConfig) -> Result<Self, StripeClientError> {
        let base = parse_base_url(&config.base_url)
            .map_err(|e| StripeClientError::InvalidBaseUrl { url: config.base_url.clone(), reason: e.to_string() })?;
        let key = config.secret_key.expose_secret();
        if !key.is_empty() && !key.starts_with("sk_") && !key.starts_with("rk_") {
            return Err(StripeClientError::InvalidSecretKey("not a secret (sk_…) or restricted (rk_…) key"));
        }
        let authorization = bearer(key).map_err(|e| StripeClientError::InvalidSecretKey(e.as_str()))?;
        let version = HeaderValue::from_str(&config.api_version)
            .ok()
            .filter(|_| !config.api_version.trim().is_empty())
            .ok_or_else(|| StripeClientError::InvalidApiVersion(config.api_version.clone()))?;
        let limit = config.rate_limit();
        if !(limit.per_second.is_finite() && limit.per_second > 0.0) || limit.burst == 0 {
            return Err(StripeClientError::InvalidSetting("the rate limit needs per_second > 0 and burst ≥ 1"));
        }
        if config.retry.max_attempts == 0 {
            return Err(StripeClientError::InvalidSetting("the retry policy needs max_attempts ≥ 1"));
        }
        let settings = ClientSettings::new(concat!("mindroom-billing-stripe/", env!("CARGO_PKG_VERSION")))
            .with_timeout(config.timeout)
            .with_connect_timeout(config.connect_timeout);
        let client = build_client(&settings).map_err(|e| StripeClientError::Client(Box::new(e)))?;
        Ok(Self { client, base, authorization, version, limiter: Arc::new(TokenBucket::new(limit)), config })
    }

    /// The configuration.
    pub fn config(&self) -> &StripeConfig {
        &self.config
    }

    /// One GET with the limiter, retries and metrics. `Ok(None)` is a 404 when `missing_is_none`.
    async fn get(
        &self,
        endpoint: Endpoint,
        path: &str,
        query: &[(&str, String)],
        missing_is_none: bool,
    ) -> Result<Option<Vec<u8>>, StripeApiError> {
        let what = format!("GET {path}");
        let url = format!("{}{path}", self.base);
        let policy = self.config.retry;
        let mut last = String::new();
        for attempt in 1..=policy.max_attempts {
            self.limiter.acquire().await;
            let span = debug_span!("stripe.request", endpoint = endpoint.label(), attempt);
            let outcome = self.attempt(endpoint, &url, query).instrument(span).await;
            let (reason, wait) = match outcome {
                Ok(answer) if answer.status.is_success() => return Ok(Some(answer.body)),
                Ok(answer) if answer.status == StatusCode::NOT_FOUND && missing_is_none => return Ok(None),
                Ok(answer) => match self.classify(&what, &answer) {
                    Verdict::Stop(e) => return Err(e),
                    Verdict::Retry(reason, retry_after) => (reason, retry_after),
                },
                Err(e) => {
                    let failure = TransportFailure::of(&e);
                    let reason = if failure == TransportFailure::Connect {
                        format!("{what}: could not connect to {} (STRIPE_API_BASE)", self.base)
                    } else {
                        format!("{what}: {}", failure.describe(self.config.timeout))
                    };
                    if !failure.is_retryable() {
                        return Err(StripeApiError::Invalid(reason));
                    }
                    (reason, None)
                }
            };
            last = reason;
            if attempt < policy.max_attempts {
                let delay = policy.delay(attempt, wait, rand::thread_rng().r#gen::<f64>());
                warn!(
                    endpoint = endpoint.label(),
                    "{last}; attempt {attempt} of {}, next try in {:.1} s",
                    policy.max_attempts,
                    delay.as_secs_f64()
                );
                tokio::time::sleep(delay).await;
            }
        }
        Err(StripeApiError::Unavailable(format!("{last} (gave up after {} attempts)", policy.max_attempts)))
    }

    async fn attempt(&self, endpoint: Endpoint, url: &str, query: &[(&str, String)]) -> Result<Answer, reqwest::Error> {
        let started = Instant::now();
        let result = async {
            let response = self
                .client
                .get(url)
                .query(query)
                .header(AUTHORIZATION, self.authorization.clone())
                .header("Stripe-Version", self.version.clone())
                .header(ACCEPT, "application/json")
                .send()
                .await?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await?.to_vec();
            Ok(Answer { status, headers, body })
        }
        .await;
        let status = match &result {
            Ok(answer) => answer.status.as_u16().to_string(),
            Err(_) => "error".to_owned(),
        };
        debug!(status = %status, "answered");
        metrics::counter!(METRIC_REQUESTS, "endpoint" => endpoint.label(), "status" => status).increment(1);
        metrics::histogram!(METRIC_SECONDS, "endpoint" => endpoint.label()).record(started.elapsed().as_secs_f64());
        result
    }

    /// What to do with an answer that is neither a success nor an expected 404.
    fn classify(&self, what: &str, answer: &Answer) -> Verdict {
        let status = answer.status;
        let quoted = snippet(&answer.body, self.config.secret_key.expose_secret());
        let message = if quoted.is_empty() {
            format!("{what}: HTTP {status}")
        } else {
            format!("{what}: HTTP {status}: {quoted}")
        };
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Verdict::Stop(StripeApiError::Unauthorized(format!(
                "Stripe refused STRIPE_SECRET_KEY ({message}); check the key, or give a restricted key read \
                 access to events, subscriptions, invoices and customers"
            )));
        }
        let should_retry = answer.headers.get("Stripe-Should-Retry").and_then(|v| v.to_str().ok());
        let retry = match should_retry {
            Some("true") => true,
            Some("false") => false,
            _ => is_retryable_status(status),
        };
        if retry {
            return Verdict::Retry(message, retry_after(&answer.headers, SystemTime::now()));
        }
        let message = match should_retry {
            Some(value) => format!("{message} (Stripe-Should-Retry: {value})"),
            None => message,
        };
        if is_retryable_status(status) {
            Verdict::Stop(StripeApiError::Unavailable(message))
        } else {
            Verdict::Stop(StripeApiError::Invalid(message))
        }
    }

    async fn get_object(&self, endpoint: Endpoint, kind: &str, id: &str) -> Result<Option<RawObject>, StripeApiError> {
        check_id(id)?;
        let query: &[(&str, String)] = if matches!(endpoint, Endpoint::Subscription) {
            &[("expand[]", String::from("latest_invoice"))]
        } else {
            &[]
        };
        let Some(body) = self.get(endpoint, &format!("/v1/{kind}/{id}"), query, true).await? else {
            return Ok(None);
        };
        let raw = String::from_utf8(body).map_err(|_| invalid_answer(kind, "not UTF-8"))?;
        let head: Head<'_> = serde_json::from_str(&raw).map_err(|e| invalid_answer(kind, &e.to_string()))?;
        if head.id != id {
            return Err(invalid_answer(kind, &format!("asked for {id}, got {}", head.id)));
        }
        Ok(Some(RawObject { id: head.id.into_owned(), raw }))
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

enum Verdict {
    Stop(StripeApiError),
    Retry(String, Option<Duration>),
}

fn invalid_answer(what: &str, why: &str) -> StripeApiError {
    StripeApiError::Invalid(format!("unreadable Stripe answer for {what}: {why}"))
}

/// Ids go into the path: only what Stripe ids are made of.
fn check_id(id: &str) -> Result<(), StripeApiError> {
    if id.is_empty() || id.len() > 255 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(StripeApiError::Invalid(format!("not a Stripe id: {id:?}")));
    }
    Ok(())
}

/// A list answer: the objects stay raw, exactly as sent.
#[derive(Deserialize)]
struct ListWire<'a> {
    #[serde(borrow)]
    data: Vec<&'a RawValue>,
    has_more: bool,
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
}

#[derive(Deserialize)]
struct EventHead<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    event_type: Cow<'a, str>,
    created: i64,
}

fn parse_list<'a, T>(
    what: &str,
    body: &'a [u8],
    mut item: impl FnMut(&'a RawValue) -> Result<T, String>,
) -> Result<Page<T>, StripeApiError> {
    let list: ListWire<'a> = serde_json::from_slice(body).map_err(|e| invalid_answer(what, &e.to_string()))?;
    let data = list.data.into_iter().map(&mut item).collect::<Result<Vec<T>, String>>();
    Ok(Page { data: data.map_err(|e| invalid_answer(what, &e))?, has_more: list.has_more })
}

#[async_trait]
impl StripeApi for StripeClient {
    async fn list_events(&self, q: &EventsQuery) -> Result<Page<ApiEvent>, StripeApiError> {
        if !(1..=100).contains(&q.limit) {
            return Err(StripeApiError::Invalid(format!("limit must be 1 to 100, is {}", q.limit)));
        }
        let mut query: Vec<(&str, String)> = q.types.iter().map(|t| ("types[]", t.clone())).collect();
        if let Some(gte) = q.created_gte {
            query.push(("created[gte]", gte.timestamp().to_string()));
        }
        if let Some(lt) = q.created_lt {
            query.push(("created[lt]", lt.timestamp().to_string()));
        }
        if let Some(after) = &q.starting_after {
            check_id(after)?;
            query.push(("starting_after", after.clone()));
        }
        query.push(("limit", q.limit.to_string()));
        let body = self.get(Endpoint::Events, "/v1/events", &query, false).await?.unwrap_or_default();
        parse_list("GET /v1/events", &body, |raw| {
            let head: EventHead<'_> = serde_json::from_str(raw.get()).map_err(|e| e.to_string())?;
            let created = DateTime::from_timestamp(head.created, 0).ok_or("created out of range")?;
            Ok(ApiEvent {
                id: head.id.into_owned(),
                event_type: head.event_type.into_owned(),
                created,
                raw: raw.get().to_owned(),
            })
        })
    }

    async fn list_subscriptions(&self, starting_after: Option<&str>) -> Result<Page<RawObject>, StripeApiError> {
        let mut query = vec![
            ("status", "all".to_owned()),
            ("expand[]", "data.latest_invoice".to_owned()),
            ("limit", SUBSCRIPTIONS_PAGE.to_string()),
        ];
        if let Some(after) = starting_after {
            check_id(after)?;
            query.push(("starting_after", after.to_owned()));
        }
        let body = self.get(Endpoint::Subscriptions, "/v1/subscriptions", &query, false).await?.unwrap_or_default();
        parse_list("GET /v1/subscriptions", &body, |raw| {
            let head: Head<'_> = serde_json::from_str(raw.get()).map_err(|e| e.to_string())?;
            Ok(RawObject { id: head.id.into_owned(), raw: raw.get().to_owned() })
        })
    }

    async fn get_subscription(&self, id: &str) -> Result<Option<RawObject>, StripeApiError> {
        self.get_object(Endpoint::Subscription, "subscriptions", id).await
    }

    async fn get_customer(&self, id: &str) -> Result<Option<RawObject>, StripeApiError> {
        self.get_object(Endpoint::Customer, "customers", id).await
    }

    async fn get_charge(&self, id: &str) -> Result<Option<RawObject>, StripeApiError> {
        self.get_object(Endpoint::Charge, "charges", id).await
    }
}

/// A token bucket: `acquire` takes a token, waiting for it when none is left. A waiter reserves its
/// token before sleeping, so waiters are served in order and the rate holds under contention.
struct TokenBucket {
    per_second: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    fn new(limit: RateLimit) -> Self {
        let burst = f64::from(limit.burst);
        Self { per_second: limit.per_second, burst, state: Mutex::new((burst, Instant::now())) }
    }

    async fn acquire(&self) {
        let wait = {
            let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = Instant::now();
            let (tokens, last) = *state;
            let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.per_second).min(self.burst) - 1.0;
            *state = (tokens, now);
            (tokens < 0.0).then(|| Duration::from_secs_f64(-tokens / self.per_second))
        };
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_honours_retry_after_up_to_the_cap() {
        let p =
            RetryPolicy { max_attempts: 10, base_delay: Duration::from_millis(100), max_delay: Duration::from_secs(2) };
        assert_eq!(p.delay(1, None, 1.0), Duration::from_millis(100));
        assert_eq!(p.delay(1, None, 0.0), Duration::from_millis(50));
        assert_eq!(p.delay(3, None, 1.0), Duration::from_millis(400));
        assert_eq!(p.delay(30, None, 1.0), Duration::from_secs(2));
        assert_eq!(p.delay(1, Some(Duration::from_secs(1)), 0.0), Duration::from_secs(1));
        assert_eq!(p.delay(1, Some(Duration::from_secs(60)), 0.0), Duration::from_secs(2));
    }

    #[test]
    fn rate_limit_by_key_mode() {
        assert_eq!(RateLimit::for_key("sk_test_1"), RateLimit::TEST_MODE);
        assert_eq!(RateLimit::for_key("rk_test_1"), RateLimit::TEST_MODE);
        assert_eq!(RateLimit::for_key("sk_live_1"), RateLimit::LIVE_MODE);
        assert_eq!(RateLimit::for_key("rk_live_1"), RateLimit::LIVE_MODE);
    }

    #[test]
    fn ids_are_checked_before_they_reach_a_path() {
        assert!(check_id("sub_1Pgc6rB7WZ01zgkWNy0Cn5nw").is_ok());
        for bad in ["", "../v1/charges", "sub_1?expand=x", "sub 1", &"a".repeat(256)] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_lets_a_burst_through_then_paces() {
        let bucket = TokenBucket::new(RateLimit { per_second: 10.0, burst: 3 });
        let start = Instant::now();
        for _ in 0..3 {
            bucket.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        for _ in 0..10 {
            bucket.acquire().await;
        }
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(1000) && elapsed < Duration::from_millis(1010), "{elapsed:?}");
    }

    #[test]
    fn settings_are_validated() {
        let bad = |c: StripeConfig| StripeClient::new(c).unwrap_err().to_string();
        assert!(bad(StripeConfig::new("")).contains("STRIPE_SECRET_KEY"));
        assert!(bad(StripeConfig::new("pk_test_1")).contains("STRIPE_SECRET_KEY"));
        assert!(bad(StripeConfig::new("sk_test_1\n")).contains("STRIPE_SECRET_KEY"));
        assert!(bad(StripeConfig::new("sk_test_1").with_api_version(" ")).contains("STRIPE_API_VERSION"));
        assert!(bad(StripeConfig::new("sk_test_1").with_base_url("ftp://x")).contains("STRIPE_API_BASE"));
        assert!(
            bad(StripeConfig::new("sk_test_1").with_rate_limit(RateLimit { per_second: 0.0, burst: 1 }))
                .contains("rate limit")
        );
        let c = StripeClient::new(StripeConfig::new("rk_live_1")).unwrap();
        assert_eq!(c.config().base_url(), DEFAULT_BASE_URL);
        assert_eq!(c.config().api_version(), DEFAULT_API_VERSION);
        assert_eq!(c.config().rate_limit(), RateLimit::LIVE_MODE);
    }
}
