//! The operator console of mindroom-billing: a small server-rendered web UI that answers "why does
//! customer X have no instance?" on one page.
//!
//! - **Find**: one search box for a Stripe customer id, subscription id, event id, invoice id, app
//!   name, or part of an e-mail or account reference.
//! - **Customer page**: first one sentence per subscription saying why it is in its state
//!   ([`mindroom_billing_core::explain()`]); then entitlements now, each subscription, its instance
//!   and the last provisioner call, the jobs by operation, the event timeline (with invoice ids and
//!   amounts, and the raw JSON byte for byte), the last reconcile drift and the audit trail.
//! - **Lists**: failed events, dead jobs, subscriptions in grace by deadline, drift, audit.
//! - **Actions** (admin role only): replay an event, retry a dead job, reconcile a subscription
//!   against Stripe now; each a `POST` with the session's CSRF token and a confirmation box, through
//!   the [`Billing`] orchestrator, recorded in the audit table, and answered with a redirect to its
//!   result.
//!
//! It reads through the core's ports only ([`mindroom_billing_core::Store`] via [`Billing`] and
//! [`OperatorStore`]), so it runs on every store. It depends on no other adapter crate.
//!
//! # Security model
//! - **Named operators** (name, role admin or read-only, argon2 hash) are kept in the store
//!   ([`OperatorStore::add_operator`]; the binary's `console add-operator`). The two configured
//!   hashes ([`ConsoleConfig::new`], [`ConsoleConfig::with_readonly_password_hash`]) keep working
//!   as the bootstrap operators `admin` and `readonly` while the store has no operator of that name.
//! - **Login throttle**: growing delays per client address and per operator name (see the
//!   throttle's rules in `auth.rs`), never a lock that the right password from an address that has
//!   not failed cannot pass. Every refused login is logged and audited.
//! - **Sessions live in the store** (operator, role, login time, last request, end): the cookie
//!   carries only a random token (the store keeps its SHA-256 digest). Logout, a password change,
//!   the operator's removal, 30 minutes idle ([`ConsoleConfig::with_idle_timeout`]) and 8 hours
//!   after login ([`ConsoleConfig::with_session_ttl`]) end it, whatever the cookie says. The cookie
//!   is `HttpOnly`, `SameSite=Strict`, `Path=/`; on an https origin it is `__Host-mrb_console` and
//!   `Secure`.
//! - **Origin**: the console's public origin ([`ConsoleConfig::with_origin`], default the bound
//!   address over http) is compared with every request's `Host` (another host is refused with 421:
//!   DNS rebinding) and with the `Origin` of every `POST`, scheme included.
//! - Every `POST` needs the CSRF token bound to the session (an HMAC of its token under the
//!   [`SessionKey`]); `SameSite=Strict` is the second layer.
//! - **Audit**: every action, every login and every refusal (CSRF, cross-origin, read-only,
//!   throttled or wrong logins) is recorded with the operator's name and address.
//! - Every answer carries `Content-Security-Policy: default-src 'self'` (no inline script or style
//!   runs; the console has no JavaScript), `X-Frame-Options: DENY`, `X-Content-Type-Options:
//!   nosniff`, `Referrer-Policy: same-origin` and `Cache-Control: no-store`.
//! - Templates are [maud](https://maud.lambda.xyz): every interpolated value is HTML-escaped, so
//!   names, e-mails and metadata from Stripe cannot inject markup. Raw event JSON is served as
//!   `text/plain` with `nosniff`.

mod auth;
mod pages;
mod routes;
mod server;

use std::sync::{Arc, OnceLock};

use chrono::Duration;
use mindroom_billing_core::{Billing, OperatorStore};

use auth::{ConsoleOrigin, LoginThrottle, PasswordDigest, ThrottlePolicy};
pub use auth::{SessionKey, hash_password};
pub use mindroom_billing_core::OperatorRole as Role;
pub use routes::handle;
pub use server::serve;

/// The response body of every answer.
pub type ResponseBody = http_body_util::Full<bytes::Bytes>;

/// The name of the session cookie on an http origin.
pub const SESSION_COOKIE: &str = "mrb_console";
/// The name of the session cookie on an https origin (or with [`ConsoleConfig::with_secure_cookie`]).
pub const SECURE_SESSION_COOKIE: &str = "__Host-mrb_console";

/// A console configuration or set-up error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsoleError {
    /// The configuration is unusable (a hash that does not parse, a short key…).
    #[error("console configuration: {0}")]
    Config(String),
}

/// How the console authenticates. Secrets are redacted from `Debug`.
#[derive(Debug)]
pub struct ConsoleConfig {
    admin: PasswordDigest,
    readonly: Option<PasswordDigest>,
    key: SessionKey,
    origin: Option<ConsoleOrigin>,
    secure_cookie: bool,
    session_ttl: Duration,
    idle_timeout: Duration,
    throttle: ThrottlePolicy,
    trusted_proxies: Vec<std::net::IpAddr>,
}

impl ConsoleConfig {
    /// A configuration with the bootstrap admin password's argon2 PHC hash (operator `admin`) and
    /// the key CSRF tokens are derived with; sessions last 8 hours after login and end after 30
    /// minutes without a request; the origin is the bound address over http unless
    /// [`Self::with_origin`] says otherwise.
    pub fn new(admin_password_hash: &str, key: SessionKey) -> Result<Self, ConsoleError> {
        Ok(Self {
            admin: PasswordDigest::parse(admin_password_hash, "the console password hash")?,
            readonly: None,
            key,
            origin: None,
            secure_cookie: false,
            session_ttl: Duration::hours(8),
            idle_timeout: Duration::minutes(30),
            throttle: ThrottlePolicy::default(),
            trusted_proxies: Vec::new(),
        })
    }

    /// Adds the bootstrap read-only password (operator `readonly`, its argon2 PHC hash): it sees
    /// every page, and every action answers 403.
    pub fn with_readonly_password_hash(mut self, hash: &str) -> Result<Self, ConsoleError> {
        self.readonly = Some(PasswordDigest::parse(hash, "the read-only console password hash")?);
        Ok(self)
    }

    /// The console's public origin, `http(s)://host[:port]`, as browsers reach it (e.g. behind a
    /// TLS proxy, which must pass the `Host` header on). Requests for another host are refused, and
    /// a `POST` must come from exactly this origin. An https origin makes the cookie `Secure` with
    /// the `__Host-` prefix.
    pub fn with_origin(mut self, origin: &str) -> Result<Self, ConsoleError> {
        self.origin = Some(ConsoleOrigin::parse(origin)?);
        Ok(self)
    }

    /// Marks the session cookie `Secure` (and `__Host-`) even on an http origin.
    #[must_use]
    pub fn with_secure_cookie(mut self, secure: bool) -> Self {
        self.secure_cookie = secure;
        self
    }

    /// How long a session lasts after login, however busy.
    #[must_use]
    pub fn with_session_ttl(mut self, ttl: Duration) -> Self {
        self.session_ttl = ttl;
        self
    }

    /// Proxies whose `X-Forwarded-For` names the client (the last entry, the one the proxy
    /// appended): the login throttle and the audit then see each client's own address instead of
    /// the proxy's. Requests from other peers are taken at their word of nothing.
    #[must_use]
    pub fn with_trusted_proxies(mut self, proxies: impl IntoIterator<Item = std::net::IpAddr>) -> Self {
        self.trusted_proxies = proxies.into_iter().collect();
        self
    }

    /// How long a session may go without a request.
    #[must_use]
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle;
        self
    }
}

/// The console: the orchestrator for actions, the operator port for reads, sessions and audit.
pub struct Console {
    billing: Arc<Billing>,
    ops: Arc<dyn OperatorStore>,
    config: ConsoleConfig,
    origin: OnceLock<ConsoleOrigin>,
    throttle: LoginThrottle,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Console {
    /// A console acting through `billing` and reading through `ops` (the same store).
    pub fn new(billing: Arc<Billing>, ops: Arc<dyn OperatorStore>, config: ConsoleConfig) -> Self {
        let throttle = LoginThrottle::new(config.throttle);
        let origin = OnceLock::new();
        if let Some(o) = &config.origin {
            let _ = origin.set(o.clone());
        }
        Self { billing, ops, config, origin, throttle }
    }

    /// The public origin: the configured one, or the address [`serve`] was bound to.
    pub fn origin(&self) -> Option<String> {
        self.origin.get().map(ToString::to_string)
    }

    /// Whether the session cookie is `Secure` (and `__Host-` prefixed).
    fn secure_cookie(&self) -> bool {
        self.config.secure_cookie || self.origin.get().is_some_and(ConsoleOrigin::is_https)
    }

    fn cookie_name(&self) -> &'static str {
        if self.secure_cookie() { SECURE_SESSION_COOKIE } else { SESSION_COOKIE }
    }
}
