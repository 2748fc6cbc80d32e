//! The operator console of mindroom-billing: a small server-rendered web UI that answers "why does
//! customer X have no instance?" on one page.
//!
//! - **Find**: one search box for a Stripe customer id, subscription id, event id, app name or e-mail.
//! - **Customer page**: entitlements now, each subscription, its instance and the last provisioner
//!   call, the event timeline (with the raw JSON byte for byte), the jobs, the last reconcile drift
//!   and the audit trail.
//! - **Lists**: failed events, dead jobs, subscriptions in grace by deadline, drift, audit.
//! - **Actions** (admin role only): replay an event, retry a dead job, reconcile a subscription
//!   against Stripe now; each a `POST` with the session's CSRF token and a confirmation box, through
//!   the [`Billing`] orchestrator, and recorded in the audit table.
//!
//! It reads through the core's ports only ([`mindroom_billing_core::Store`] via [`Billing`] and
//! [`OperatorStore`]), so it runs on every store. It depends on no other adapter crate.
//!
//! # Security model
//! - Login with a password checked against an argon2 PHC hash ([`hash_password`] makes one); a
//!   second, read-only password may be configured. Login attempts are rate-limited per client
//!   address and overall.
//! - The session is a stateless cookie `mrb_console` = role, expiry and nonce signed with
//!   HMAC-SHA256 under the [`SessionKey`]; `HttpOnly`, `SameSite=Strict`, `Path=/`, `Max-Age`, and
//!   `Secure` when [`ConsoleConfig::with_secure_cookie`] says the console is behind TLS.
//! - Every `POST` needs the CSRF token bound to the session (HMAC of its nonce); `SameSite=Strict`
//!   is the second layer.
//! - Every answer carries `Content-Security-Policy: default-src 'self'` (no inline script or style
//!   runs; the console has no JavaScript), `X-Frame-Options: DENY`, `X-Content-Type-Options:
//!   nosniff`, `Referrer-Policy: same-origin` (nothing leaks to other sites, and the browser sends
//!   `Origin` with its own forms) and `Cache-Control: no-store`; a `POST` whose `Origin` is another
//!   site (or `null`) is refused.
//! - Templates are [maud](https://maud.lambda.xyz): every interpolated value is HTML-escaped, so
//!   names, e-mails and metadata from Stripe cannot inject markup. Raw event JSON is served as
//!   `text/plain` with `nosniff`.

mod auth;
mod pages;
mod routes;
mod server;

use std::sync::Arc;

use chrono::Duration;
use mindroom_billing_core::{Billing, OperatorStore};

use auth::{LoginLimiter, PasswordDigest};
pub use auth::{Role, SessionKey, hash_password};
pub use routes::handle;
pub use server::serve;

/// The response body of every answer.
pub type ResponseBody = http_body_util::Full<bytes::Bytes>;

/// The name of the session cookie.
pub const SESSION_COOKIE: &str = "mrb_console";

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
    secure_cookie: bool,
    session_ttl: Duration,
    login_attempts_per_minute: u32,
}

impl ConsoleConfig {
    /// A configuration with the admin password's argon2 PHC hash and the session key; sessions last
    /// 8 hours, cookies are not `Secure` (set [`Self::with_secure_cookie`] behind TLS), and 10 login
    /// attempts per minute and client are allowed.
    pub fn new(admin_password_hash: &str, key: SessionKey) -> Result<Self, ConsoleError> {
        Ok(Self {
            admin: PasswordDigest::parse(admin_password_hash, "the console password hash")?,
            readonly: None,
            key,
            secure_cookie: false,
            session_ttl: Duration::hours(8),
            login_attempts_per_minute: 10,
        })
    }

    /// Adds a read-only password (its argon2 PHC hash): it sees every page, and every action
    /// answers 403.
    pub fn with_readonly_password_hash(mut self, hash: &str) -> Result<Self, ConsoleError> {
        self.readonly = Some(PasswordDigest::parse(hash, "the read-only console password hash")?);
        Ok(self)
    }

    /// Marks the session cookie `Secure` (the console is reached over HTTPS, e.g. behind a proxy).
    #[must_use]
    pub fn with_secure_cookie(mut self, secure: bool) -> Self {
        self.secure_cookie = secure;
        self
    }

    /// How long a session lasts after login.
    #[must_use]
    pub fn with_session_ttl(mut self, ttl: Duration) -> Self {
        self.session_ttl = ttl;
        self
    }

    /// Login attempts allowed per client address and minute (six times as many over all clients).
    #[must_use]
    pub fn with_login_attempts_per_minute(mut self, attempts: u32) -> Self {
        self.login_attempts_per_minute = attempts.max(1);
        self
    }
}

/// The console: the orchestrator for actions, the operator port for reads and audit.
pub struct Console {
    billing: Arc<Billing>,
    ops: Arc<dyn OperatorStore>,
    config: ConsoleConfig,
    limiter: LoginLimiter,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Console {
    /// A console acting through `billing` and reading through `ops` (the same store).
    pub fn new(billing: Arc<Billing>, ops: Arc<dyn OperatorStore>, config: ConsoleConfig) -> Self {
        let limiter = LoginLimiter::new(config.login_attempts_per_minute);
        Self { billing, ops, config, limiter }
    }
}
