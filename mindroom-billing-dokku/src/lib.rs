#![doc = include_str!("../README.md")]

use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use mindroom_billing_core::ports::{BoxError, ProvisionError, ProvisionRequest, ProvisionedInstance, Provisioner};
use mindroom_billing_core::tier::Limits;
use mindroom_billing_http::{
    ClientSettings, REDACTED, TransportFailure, build_client, is_retryable_status, parse_base_url, retry_after,
    secret_header, snippet,
};
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tracing::{Instrument, debug, debug_span, warn};

/// Default whole-request timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest `Retry-After` honoured; longer requests are capped to this.
pub const MAX_RETRY_AFTER: Duration = mindroom_billing_http::MAX_RETRY_AFTER;

/// Where the provisioner is and how to talk to it.
#[derive(Clone)]
pub struct DokkuConfig {
    base_url: String,
    api_key: SecretString,
    timeout: Duration,
    connect_timeout: Duration,
}

impl DokkuConfig {
    /// The provisioner at `base_url` (`DOKKU_PROVISIONER_URL`; a trailing slash is fine), authenticated
    /// with `api_key` (`PROVISIONER_API_KEY`). Timeouts default to 30 s per request and 5 s to connect.
    pub fn new(base_url: impl Into<String>, api_key: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            api_key: SecretString::from(api_key.into()),
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// Sets the whole-request timeout (connect, send, and read the answer).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the connect timeout.
    #[must_use]
    pub fn with_connect_timeout(mut self, connect_timeout: Duration) -> Self {
        self.connect_timeout = connect_timeout;
        self
    }

    /// The base URL as configured.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The whole-request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }
}

impl fmt::Debug for DokkuConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DokkuConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &REDACTED)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// Why a [`DokkuProvisioner`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DokkuError {
    /// The base URL is not an absolute `http`/`https` URL.
    #[error("invalid provisioner URL {url:?}: {reason}")]
    InvalidBaseUrl {
        /// The URL as configured.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The API key cannot be sent as a header value (empty, or control characters).
    #[error("invalid provisioner API key: {0}")]
    InvalidApiKey(&'static str),
    /// The HTTP client could not be built (TLS initialisation).
    #[error("could not build the HTTP client")]
    Client(#[source] BoxError),
}

/// The Dokku provisioner client. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct DokkuProvisioner {
    client: reqwest::Client,
    /// Base URL without trailing slashes.
    base: String,
    api_key: HeaderValue,
    config: DokkuConfig,
}

impl fmt::Debug for DokkuProvisioner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DokkuProvisioner").field("config", &self.config).finish_non_exhaustive()
    }
}

impl DokkuProvisioner {
    /// Builds the client (reqwest with rustls; redirects are not followed).
    pub fn new(config: DokkuConfig) -> Result<Self, DokkuError> {
        let base = parse_base_url(&config.base_url)
            .map_err(|e| DokkuError::InvalidBaseUrl { url: config.base_url.clone(), reason: e.to_string() })?;
        let api_key =
            secret_header(config.api_key.expose_secret()).map_err(|e| DokkuError::InvalidApiKey(e.as_str()))?;
        let settings = ClientSettings::new(concat!("mindroom-billing-dokku/", env!("CARGO_PKG_VERSION")))
            .with_timeout(config.timeout)
            .with_connect_timeout(config.connect_timeout);
        let client = build_client(&settings).map_err(|e| DokkuError::Client(Box::new(e)))?;
        Ok(Self { client, base, api_key, config })
    }

    /// The configuration.
    pub fn config(&self) -> &DokkuConfig {
        &self.config
    }

    /// Sends one call, retrying once on a reset connection, and returns the raw answer.
    async fn call(&self, op: Op, body: &impl Serialize, idempotency_key: &str) -> Result<Answer, ProvisionError> {
        let body = serde_json::to_vec(body)
            .map_err(|e| permanent(format!("{op}: could not encode the request"), Some(Box::new(e))))?;
        let idempotency = HeaderValue::from_str(idempotency_key)
            .map_err(|_| permanent(format!("{op}: idempotency key is not a valid header value"), None))?;
        let url = format!("{}{}", self.base, op.path);
        let mut reset_retried = false;
        loop {
            let request = self
                .client
                .request(op.method.clone(), &url)
                .header("X-API-Key", self.api_key.clone())
                .header("Idempotency-Key", idempotency.clone())
                .header(CONTENT_TYPE, "application/json")
                .header(ACCEPT, "application/json")
                .body(body.clone());
            let result = match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    let headers = response.headers().clone();
                    response.bytes().await.map(|bytes| Answer { status, headers, body: bytes.to_vec() })
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(answer) => return Ok(answer),
                Err(e) if !reset_retried && TransportFailure::of(&e) == TransportFailure::Reset => {
                    debug!(error = %e, "connection reset; retrying once");
                    reset_retried = true;
                }
                Err(e) => return Err(self.transport_error(op, e)),
            }
        }
    }

    fn transport_error(&self, op: Op, e: reqwest::Error) -> ProvisionError {
        let failure = TransportFailure::of(&e);
        if !failure.is_retryable() {
            return permanent(format!("{op}: invalid request"), Some(Box::new(e.without_url())));
        }
        let mut what = failure.describe(self.config.timeout);
        if failure == TransportFailure::Reset {
            what.push_str(" (after one quick retry)");
        }
        ProvisionError::Retryable { message: format!("{op}: {what}"), retry_after: None, source: Some(Box::new(e)) }
    }

    /// The error for a non-success status.
    fn status_error(&self, op: Op, answer: &Answer) -> ProvisionError {
        let status = answer.status;
        let snippet = snippet(&answer.body, self.config.api_key.expose_secret());
        let message =
            if snippet.is_empty() { format!("{op}: HTTP {status}") } else { format!("{op}: HTTP {status}: {snippet}") };
        if is_retryable_status(status) {
            let retry_after = retry_after(&answer.headers, SystemTime::now());
            ProvisionError::Retryable { message, retry_after, source: None }
        } else {
            permanent(message, None)
        }
    }
}

/// One wire call.
#[derive(Clone, Copy)]
struct Op {
    method: &'static Method,
    path: &'static str,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.path)
    }
}

const PROVISION: Op = Op { method: &Method::POST, path: "/provision" };
const UPDATE: Op = Op { method: &Method::PUT, path: "/update" };
const DEPROVISION: Op = Op { method: &Method::DELETE, path: "/deprovision" };

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

fn permanent(message: String, source: Option<BoxError>) -> ProvisionError {
    ProvisionError::Permanent { message, source }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireLimits {
    agents: i64,
    messages_per_day: i64,
    memory_mb: u32,
    cpu_limit: f64,
}

impl From<&Limits> for WireLimits {
    fn from(limits: &Limits) -> Self {
        Self {
            agents: limits.agents.to_wire(),
            messages_per_day: limits.messages_per_day.to_wire(),
            memory_mb: limits.memory_mb,
            cpu_limit: limits.cpu(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ProvisionBody<'a> {
    subscription_id: &'a str,
    account_id: String,
    tier: &'static str,
    limits: WireLimits,
    stripe_subscription_id: &'a str,
    stripe_customer_id: &'a str,
    app_name: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct UpdateBody<'a> {
    app_name: &'a str,
    limits: WireLimits,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeprovisionBody<'a> {
    app_name: &'a str,
}

/// The provision answer; unknown fields are ignored, every field may be absent or null.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProvisionAnswer {
    #[serde(default)]
    app_name: Option<String>,
    #[serde(default)]
    subdomain: Option<String>,
    #[serde(default)]
    frontend_url: Option<String>,
    #[serde(default)]
    backend_url: Option<String>,
}

#[async_trait]
impl Provisioner for DokkuProvisioner {
    async fn provision(&self, request: &ProvisionRequest) -> Result<ProvisionedInstance, ProvisionError> {
        let span = debug_span!("dokku.provision", app = %request.app_name, tier = %request.tier);
        async {
            let body = ProvisionBody {
                subscription_id: &request.subscription_id,
                account_id: request.account_id.to_string(),
                tier: request.tier.as_str(),
                limits: WireLimits::from(&request.limits),
                stripe_subscription_id: &request.subscription_id,
                stripe_customer_id: &request.customer_id,
                app_name: &request.app_name,
            };
            let answer = self.call(PROVISION, &body, &request.idempotency_key).await?;
            if !answer.status.is_success() {
                return Err(self.status_error(PROVISION, &answer));
            }
            let parsed: ProvisionAnswer = serde_json::from_slice(&answer.body).map_err(|e| {
                let snippet = snippet(&answer.body, self.config.api_key.expose_secret());
                permanent(
                    format!("{PROVISION}: HTTP {} with an unreadable answer: {snippet}", answer.status),
                    Some(Box::new(e)),
                )
            })?;
            let app_name = match parsed.app_name.filter(|n| !n.trim().is_empty()) {
                Some(name) if name != request.app_name => {
                    warn!(requested = %request.app_name, returned = %name, "provisioner answered with another app name");
                    name
                }
                Some(name) => name,
                None => request.app_name.clone(),
            };
            debug!(status = %answer.status, "provisioned");
            Ok(ProvisionedInstance {
                app_name,
                subdomain: parsed.subdomain,
                frontend_url: parsed.frontend_url,
                backend_url: parsed.backend_url,
            })
        }
        .instrument(span)
        .await
    }

    async fn update_limits(
        &self,
        app_name: &str,
        limits: &Limits,
        idempotency_key: &str,
    ) -> Result<(), ProvisionError> {
        let span = debug_span!("dokku.update", app = %app_name);
        async {
            let body = UpdateBody { app_name, limits: WireLimits::from(limits) };
            let answer = self.call(UPDATE, &body, idempotency_key).await?;
            if !answer.status.is_success() {
                return Err(self.status_error(UPDATE, &answer));
            }
            debug!(status = %answer.status, "limits updated");
            Ok(())
        }
        .instrument(span)
        .await
    }

    async fn deprovision(&self, app_name: &str, idempotency_key: &str) -> Result<(), ProvisionError> {
        let span = debug_span!("dokku.deprovision", app = %app_name);
        async {
            let answer = self.call(DEPROVISION, &DeprovisionBody { app_name }, idempotency_key).await?;
            if answer.status == StatusCode::NOT_FOUND || answer.status == StatusCode::GONE {
                debug!(status = %answer.status, "app already gone");
                return Ok(());
            }
            if !answer.status.is_success() {
                return Err(self.status_error(DEPROVISION, &answer));
            }
            debug!(status = %answer.status, "deprovisioned");
            Ok(())
        }
        .instrument(span)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mindroom_billing_core::tier::Tier;

    #[test]
    fn wire_limits() {
        let json = serde_json::to_value(WireLimits::from(&Tier::Enterprise.limits())).unwrap();
        assert_eq!(json, serde_json::json!({"agents": -1, "messagesPerDay": -1, "memoryMb": 8192, "cpuLimit": 4.0}));
        let json = serde_json::to_value(WireLimits::from(&Tier::Free.limits())).unwrap();
        assert_eq!(json, serde_json::json!({"agents": 1, "messagesPerDay": 100, "memoryMb": 256, "cpuLimit": 0.25}));
    }

    #[test]
    fn rejects_bad_urls_and_keys() {
        assert!(matches!(
            DokkuProvisioner::new(DokkuConfig::new("ftp://x", "k")),
            Err(DokkuError::InvalidBaseUrl { .. })
        ));
        assert!(matches!(DokkuProvisioner::new(DokkuConfig::new("nope", "k")), Err(DokkuError::InvalidBaseUrl { .. })));
        assert!(matches!(DokkuProvisioner::new(DokkuConfig::new("http://x", "")), Err(DokkuError::InvalidApiKey(_))));
        assert!(matches!(
            DokkuProvisioner::new(DokkuConfig::new("http://x", "a\nb")),
            Err(DokkuError::InvalidApiKey(_))
        ));
        let p = DokkuProvisioner::new(DokkuConfig::new("http://x:1/api///", "k")).unwrap();
        assert_eq!(p.base, "http://x:1/api");
    }
}
