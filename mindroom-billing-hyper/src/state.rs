//! The adapter's configuration and shared state.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use mindroom_billing_core::Billing;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Default largest accepted request body: 1 MiB (Stripe events are a few KiB).
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

/// Default time budget of one request (reading the body and handling it).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Renders the metrics exposition text for `GET /metrics` (e.g. `PrometheusHandle::render`).
pub type MetricsRender = Arc<dyn Fn() -> String + Send + Sync>;

/// Everything a request handler needs: the billing service and the HTTP settings.
///
/// Built with [`AppState::new`] and the `with_*` methods; its `Debug` output never shows the API key.
#[derive(Clone)]
pub struct AppState {
    billing: Arc<Billing>,
    metrics: Option<MetricsRender>,
    /// SHA-256 of the API key: comparing fixed-length digests in constant time hides the key's length.
    api_key_digest: Option<[u8; 32]>,
    body_limit: usize,
    request_timeout: Duration,
}

impl AppState {
    /// State over `billing` with a 1 MiB body limit, a 15 s request timeout, no metrics endpoint and
    /// the internal API disabled.
    pub fn new(billing: Arc<Billing>) -> Self {
        Self {
            billing,
            metrics: None,
            api_key_digest: None,
            body_limit: DEFAULT_BODY_LIMIT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// Serves `GET /metrics` with the text `render` returns (e.g. `move || handle.render()`).
    #[must_use]
    pub fn with_metrics(mut self, render: impl Fn() -> String + Send + Sync + 'static) -> Self {
        self.metrics = Some(Arc::new(render));
        self
    }

    /// Enables the internal API (`/v1/…`) behind `Authorization: Bearer <key>`. An empty key leaves
    /// it disabled.
    #[must_use]
    pub fn with_api_key(mut self, key: SecretString) -> Self {
        let key = key.expose_secret();
        self.api_key_digest = (!key.is_empty()).then(|| Sha256::digest(key.as_bytes()).into());
        self
    }

    /// Sets the largest accepted request body in bytes (413 above it).
    #[must_use]
    pub fn with_body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// Sets the time budget of one request: a body not received within it gets 408, handling that
    /// does not finish within it 503.
    #[must_use]
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The billing service.
    pub fn billing(&self) -> &Arc<Billing> {
        &self.billing
    }

    /// The body limit in bytes.
    pub fn body_limit(&self) -> usize {
        self.body_limit
    }

    /// The per-request time budget.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    pub(crate) fn metrics(&self) -> Option<&MetricsRender> {
        self.metrics.as_ref()
    }

    /// `None` when no key is configured; otherwise whether `token` is the key (constant time).
    pub(crate) fn check_token(&self, token: &str) -> Option<bool> {
        let expected = self.api_key_digest.as_ref()?;
        let given: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        Some(bool::from(given.ct_eq(expected)))
    }

    pub(crate) fn api_enabled(&self) -> bool {
        self.api_key_digest.is_some()
    }
}

impl fmt::Debug for AppState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppState")
            .field("billing", &self.billing)
            .field("metrics", &self.metrics.is_some())
            .field("api_key", &self.api_key_digest.map(|_| "[REDACTED]"))
            .field("body_limit", &self.body_limit)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}
