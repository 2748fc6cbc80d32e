#![doc = include_str!("../README.md")]

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use mindroom_billing_core::ports::{BoxError, Notification, Notifier, NotifyError};
use mindroom_billing_http::{
    ClientSettings, REDACTED, TransportFailure, bearer, build_client, is_retryable_status, parse_base_url, snippet,
};
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use tracing::{Instrument, debug, debug_span};

mod template;

pub use template::{RenderedEmail, escape_html, format_amount, render};

/// The Resend API.
pub const DEFAULT_BASE_URL: &str = "https://api.resend.com";
/// Default whole-request timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// Default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Resend's longest idempotency key.
const MAX_IDEMPOTENCY_KEY: usize = 256;

/// How to reach Resend and who the e-mails are from.
#[derive(Clone)]
pub struct ResendConfig {
    api_key: SecretString,
    from: String,
    base_url: String,
    timeout: Duration,
    connect_timeout: Duration,
}

impl ResendConfig {
    /// Sends with `api_key` (`RESEND_API_KEY`) from `from` (`EMAIL_FROM`, e.g.
    /// `MindRoom <billing@mindroom.chat>`) through the public Resend API.
    pub fn new(api_key: impl Into<String>, from: impl Into<String>) -> Self {
        Self {
            api_key: SecretString::from(api_key.into()),
            from: from.into(),
            base_url: DEFAULT_BASE_URL.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// Sets the API base URL (tests, proxies); a trailing slash is fine.
    #[must_use]
    pub fn with_base_url(mut self, base_url: impl Into<String>) -> Self {
        self.base_url = base_url.into();
        self
    }

    /// Sets the whole-request timeout (default 15 s).
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

    /// The sender.
    pub fn from(&self) -> &str {
        &self.from
    }

    /// The API base URL.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }
}

impl fmt::Debug for ResendConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResendConfig")
            .field("api_key", &REDACTED)
            .field("from", &self.from)
            .field("base_url", &self.base_url)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// Why a [`ResendNotifier`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResendError {
    /// The base URL is not an absolute `http`/`https` URL.
    #[error("invalid Resend URL {url:?}: {reason}")]
    InvalidBaseUrl {
        /// The URL as configured.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The API key cannot be sent as a header value (empty, or control characters).
    #[error("invalid Resend API key: {0}")]
    InvalidApiKey(&'static str),
    /// The sender is empty.
    #[error("EMAIL_FROM is empty")]
    MissingFrom,
    /// The HTTP client could not be built (TLS initialisation).
    #[error("could not build the HTTP client")]
    Client(#[source] BoxError),
}

/// Sends notifications through Resend. Cheap to clone.
#[derive(Clone)]
pub struct ResendNotifier {
    client: reqwest::Client,
    endpoint: String,
    authorization: HeaderValue,
    config: ResendConfig,
}

impl fmt::Debug for ResendNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResendNotifier").field("config", &self.config).finish_non_exhaustive()
    }
}

impl ResendNotifier {
    /// Builds the client (reqwest with rustls; redirects are not followed).
    pub fn new(config: ResendConfig) -> Result<Self, ResendError> {
        let base = parse_base_url(&config.base_url)
            .map_err(|e| ResendError::InvalidBaseUrl { url: config.base_url.clone(), reason: e.to_string() })?;
        if config.from.trim().is_empty() {
            return Err(ResendError::MissingFrom);
        }
        let authorization =
            bearer(config.api_key.expose_secret()).map_err(|e| ResendError::InvalidApiKey(e.as_str()))?;
        let settings = ClientSettings::new(concat!("mindroom-billing-resend/", env!("CARGO_PKG_VERSION")))
            .with_timeout(config.timeout)
            .with_connect_timeout(config.connect_timeout);
        let client = build_client(&settings).map_err(|e| ResendError::Client(Box::new(e)))?;
        Ok(Self { client, endpoint: format!("{base}/emails"), authorization, config })
    }

    /// The configuration.
    pub fn config(&self) -> &ResendConfig {
        &self.config
    }
}

#[derive(Serialize)]
struct EmailBody<'a> {
    from: &'a str,
    to: [&'a str; 1],
    subject: &'a str,
    text: &'a str,
    html: &'a str,
}

/// Whether an unsuccessful status is worth retrying.
fn is_retryable(status: StatusCode, body: &[u8]) -> bool {
    is_retryable_status(status)
        // Another request with the same idempotency key is still in flight.
        || (status == StatusCode::CONFLICT && String::from_utf8_lossy(body).contains("concurrent_idempotent_requests"))
}

#[async_trait]
impl Notifier for ResendNotifier {
    async fn send(&self, notification: &Notification) -> Result<(), NotifyError> {
        let span = debug_span!("resend.send", key = %notification.idempotency_key);
        async {
            let to = notification.to.trim();
            if to.is_empty() {
                return Err(NotifyError::Permanent("no recipient".into()));
            }
            let key = notification.idempotency_key.as_str();
            if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
                return Err(NotifyError::Permanent(format!(
                    "idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY} bytes, is {}",
                    key.len()
                )));
            }
            let idempotency = HeaderValue::from_str(key)
                .map_err(|_| NotifyError::Permanent("idempotency key is not a valid header value".into()))?;
            let email = render(&notification.message);
            let body = EmailBody {
                from: &self.config.from,
                to: [to],
                subject: &email.subject,
                text: &email.text,
                html: &email.html,
            };
            let result = self
                .client
                .post(&self.endpoint)
                .header(AUTHORIZATION, self.authorization.clone())
                .header("Idempotency-Key", idempotency)
                .header(CONTENT_TYPE, "application/json")
                .header(ACCEPT, "application/json")
                .json(&body)
                .send()
                .await;
            let response = match result {
                Ok(response) => response,
                Err(e) => return Err(transport_error(&e, self.config.timeout)),
            };
            let status = response.status();
            let answer = match response.bytes().await {
                Ok(bytes) => bytes,
                Err(e) => return Err(transport_error(&e, self.config.timeout)),
            };
            if status.is_success() {
                let id = serde_json::from_slice::<serde_json::Value>(&answer)
                    .ok()
                    .and_then(|v| v.get("id").and_then(|id| id.as_str()).map(str::to_owned));
                debug!(%status, id = id.as_deref().unwrap_or("?"), subject = %email.subject, "e-mail sent");
                return Ok(());
            }
            let snippet = snippet(&answer, self.config.api_key.expose_secret());
            let message = if snippet.is_empty() {
                format!("POST /emails: HTTP {status}")
            } else {
                format!("POST /emails: HTTP {status}: {snippet}")
            };
            if is_retryable(status, &answer) {
                Err(NotifyError::Retryable(message))
            } else {
                Err(NotifyError::Permanent(message))
            }
        }
        .instrument(span)
        .await
    }
}

/// Transport failures (connect, timeout, reset) are retryable; a request that cannot be built is not.
fn transport_error(e: &reqwest::Error, timeout: Duration) -> NotifyError {
    let failure = TransportFailure::of(e);
    if !failure.is_retryable() {
        return NotifyError::Permanent("POST /emails: invalid request".into());
    }
    let what = failure.describe(timeout);
    // Include the cause chain (it names the URL, never the headers).
    let mut message = format!("POST /emails: {what}: {e}");
    let mut cur = std::error::Error::source(e);
    while let Some(src) = cur {
        message.push_str(": ");
        message.push_str(&src.to_string());
        cur = src.source();
    }
    NotifyError::Retryable(message)
}
