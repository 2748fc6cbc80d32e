//! Configuration from environment variables (DESIGN §4), validated with messages naming the variable.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mindroom_billing_core::signature::DEFAULT_TOLERANCE_SECS;
use mindroom_billing_core::{
    CacheConfig, DisputePolicy, MemoryLimits, PriceCatalog, RetentionPolicy, StripeSyncConfig, Tier, WorkerConfig,
};
use secrecy::{ExposeSecret, SecretString};

/// A configuration error naming the variable.
#[derive(Debug)]
pub(crate) struct ConfigError {
    /// The variable.
    pub(crate) var: &'static str,
    /// What is wrong.
    pub(crate) message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.var, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogFormat {
    /// Human-readable.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Everything the binary reads from the environment.
pub(crate) struct Config {
    /// `PORT`.
    pub(crate) port: u16,
    /// `STRIPE_WEBHOOK_SECRET`, one or more, comma-separated (empty for commands that do not verify).
    pub(crate) webhook_secrets: Option<SecretString>,
    /// `STRIPE_WEBHOOK_TOLERANCE_SECS`.
    pub(crate) tolerance_secs: u64,
    /// `STRIPE_PRICE_STARTER` / `_PRO` / `_ENTERPRISE`.
    pub(crate) prices: PriceCatalog,
    /// Whether any `STRIPE_PRICE_*` is set.
    pub(crate) any_price: bool,
    /// `GRACE_PERIOD_DAYS`.
    pub(crate) grace_period_days: i64,
    /// `BILLING_DISPUTE_POLICY`: `alert` (default) or `suspend`.
    pub(crate) dispute_policy: DisputePolicy,
    /// `ADMIN_EMAIL`.
    pub(crate) admin_email: Option<String>,
    /// `BILLING_API_KEY`.
    pub(crate) api_key: Option<SecretString>,
    /// `LOG_FORMAT`.
    pub(crate) log_format: LogFormat,
    /// `DATABASE_URL` when it names PostgreSQL (`postgres://…`).
    pub(crate) database_url: Option<SecretString>,
    /// `DATABASE_URL` when it names a SQLite file (`sqlite://path`).
    pub(crate) sqlite_path: Option<PathBuf>,
    /// `DATABASE_URL=memory:`: the in-memory store (tests and demos).
    pub(crate) memory_store: bool,
    /// `SUPABASE_URL`.
    pub(crate) supabase_url: Option<String>,
    /// `SUPABASE_SERVICE_KEY`.
    pub(crate) supabase_service_key: Option<SecretString>,
    /// `DOKKU_PROVISIONER_URL`.
    pub(crate) provisioner_url: Option<String>,
    /// `PROVISIONER_API_KEY`.
    pub(crate) provisioner_api_key: Option<SecretString>,
    /// `RESEND_API_KEY`.
    pub(crate) resend_api_key: Option<SecretString>,
    /// `EMAIL_FROM`.
    pub(crate) email_from: Option<String>,
    /// `RESEND_API_BASE` (default `https://api.resend.com`; tests point it at a local stub).
    pub(crate) resend_api_base: Option<String>,
    /// `STRIPE_SECRET_KEY`: read access to the Stripe API for catch-up and reconciliation (DESIGN §8).
    pub(crate) stripe_secret_key: Option<SecretString>,
    /// `STRIPE_API_BASE` (default `https://api.stripe.com`; tests point it at a local stub).
    pub(crate) stripe_api_base: Option<String>,
    /// `STRIPE_API_VERSION` (default: the version billing is written against).
    pub(crate) stripe_api_version: Option<String>,
    /// `STRIPE_CATCH_UP_INTERVAL_SECS` / `STRIPE_RECONCILE_INTERVAL_SECS`.
    pub(crate) stripe_sync: StripeSyncConfig,
    /// `PROVISIONER_TIMEOUT_SECS`: whole-request timeout of one provisioner call.
    pub(crate) provisioner_timeout: Duration,
    /// `BILLING_*` tuning of the job worker (advanced; the defaults suit production).
    pub(crate) worker: WorkerConfig,
    /// `BILLING_REQUEST_TIMEOUT_SECS`: per-request timeout (body read + handling).
    pub(crate) request_timeout: Duration,
    /// `BILLING_SHUTDOWN_GRACE_SECS`: how long `serve` waits for its background tasks (job worker,
    /// sweeper, Stripe sync, console) after SIGTERM before it abandons them and exits.
    pub(crate) shutdown_grace: Duration,
    /// `BILLING_MEMORY_EVENTS`: raw payloads of done events the in-memory store keeps.
    pub(crate) memory_events: usize,
    /// `BILLING_CACHE_TTL_MS` (1000): how old a cached usage counter may be, and a cached
    /// subscription with a store that cannot report changes (PostgREST); 0 turns the per-replica
    /// entitlement cache off.
    pub(crate) cache: CacheConfig,
    /// `BILLING_EVENT_RETENTION_DAYS`: days raw payloads and finished jobs are kept.
    pub(crate) retention_days: i64,
    /// Whether `webhook_secrets` is the built-in development secret (see [`DEV_WEBHOOK_SECRET`]).
    pub(crate) dev_secret: bool,
    /// `RUST_LOG`, validated (default `info`).
    pub(crate) log_filter: String,
    /// Whether `RUST_LOG` is set (it then decides for every command).
    pub(crate) log_filter_set: bool,
    /// `NO_COLOR` is set (to anything non-empty): no colour codes even on a terminal.
    pub(crate) no_color: bool,
    /// The operator console, when `BILLING_CONSOLE_ADDR` is set.
    pub(crate) console: Option<ConsoleSettings>,
}

/// The operator console's settings (`BILLING_CONSOLE_*`), validated. Secrets are redacted from `Debug`.
pub(crate) struct ConsoleSettings {
    /// Where it listens (never the public port).
    pub(crate) addr: std::net::SocketAddr,
    /// The admin password's argon2 PHC hash.
    pub(crate) password_hash: SecretString,
    /// The read-only password's argon2 PHC hash.
    pub(crate) readonly_password_hash: Option<SecretString>,
    /// The cookie signing key; random per process start when unset.
    pub(crate) session_key: Option<SecretString>,
    /// Mark the session cookie `Secure` (the console is reached over HTTPS).
    pub(crate) secure_cookie: bool,
    /// The public origin browsers reach it at (`BILLING_CONSOLE_ORIGIN`, default `http://` + addr).
    pub(crate) origin: String,
    /// Proxies whose `X-Forwarded-For` names the client (`BILLING_CONSOLE_TRUSTED_PROXIES`).
    pub(crate) trusted_proxies: Vec<std::net::IpAddr>,
}

impl fmt::Debug for ConsoleSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsoleSettings")
            .field("addr", &self.addr)
            .field("readonly", &self.readonly_password_hash.is_some())
            .field("session_key", &self.session_key.as_ref().map(|_| "[set]"))
            .field("secure_cookie", &self.secure_cookie)
            .field("origin", &self.origin)
            .field("trusted_proxies", &self.trusted_proxies)
            .finish_non_exhaustive()
    }
}

impl ConsoleSettings {
    /// The console's configuration (the session key derived from `BILLING_CONSOLE_SESSION_KEY`, or
    /// random: then sessions end when the process restarts, and each replica has its own).
    pub(crate) fn console_config(&self) -> Result<mindroom_billing_console::ConsoleConfig, ConfigError> {
        use mindroom_billing_console::{ConsoleConfig, SessionKey};
        let err = |var: &'static str| {
            move |e: mindroom_billing_console::ConsoleError| ConfigError { var, message: e.to_string() }
        };
        let key = match &self.session_key {
            Some(k) => SessionKey::from_secret(k.expose_secret()).map_err(err("BILLING_CONSOLE_SESSION_KEY"))?,
            None => SessionKey::random(),
        };
        let mut config = ConsoleConfig::new(self.password_hash.expose_secret(), key)
            .map_err(err("BILLING_CONSOLE_PASSWORD_HASH"))?
            .with_origin(&self.origin)
            .map_err(err("BILLING_CONSOLE_ORIGIN"))?
            .with_secure_cookie(self.secure_cookie)
            .with_trusted_proxies(self.trusted_proxies.iter().copied());
        if let Some(hash) = &self.readonly_password_hash {
            config = config
                .with_readonly_password_hash(hash.expose_secret())
                .map_err(err("BILLING_CONSOLE_READONLY_PASSWORD_HASH"))?;
        }
        Ok(config)
    }
}

/// `BILLING_CONSOLE_*`: off unless `BILLING_CONSOLE_ADDR` is set; then a password hash is required
/// and the address must not be the public port.
fn console_from_env(public_port: u16) -> Result<Option<ConsoleSettings>, ConfigError> {
    let Some(addr) = var("BILLING_CONSOLE_ADDR") else { return Ok(None) };
    let addr: std::net::SocketAddr = addr.parse().map_err(|e| ConfigError {
        var: "BILLING_CONSOLE_ADDR",
        message: format!("expected an address with a port (e.g. 127.0.0.1:3006), got {addr:?} ({e})"),
    })?;
    if addr.port() == public_port {
        return Err(ConfigError {
            var: "BILLING_CONSOLE_ADDR",
            message: format!(
                "uses the public port {public_port} (PORT): the console gets its own port, never the webhook's"
            ),
        });
    }
    let Some(password_hash) = var("BILLING_CONSOLE_PASSWORD_HASH").map(SecretString::from) else {
        return Err(ConfigError {
            var: "BILLING_CONSOLE_PASSWORD_HASH",
            message:
                "required when BILLING_CONSOLE_ADDR is set: make one with `mindroom-billing console hash-password`"
                    .into(),
        });
    };
    let secure_cookie = match var("BILLING_CONSOLE_SECURE_COOKIE").as_deref() {
        None | Some("0" | "false") => false,
        Some("1" | "true") => true,
        Some(other) => {
            return Err(ConfigError {
                var: "BILLING_CONSOLE_SECURE_COOKIE",
                message: format!("expected true or false, got {other:?}"),
            });
        }
    };
    for (name, value) in [
        ("BILLING_CONSOLE_PASSWORD_HASH", Some(password_hash.expose_secret().to_owned())),
        ("BILLING_CONSOLE_READONLY_PASSWORD_HASH", var("BILLING_CONSOLE_READONLY_PASSWORD_HASH")),
    ] {
        if value.is_some_and(|v| !v.starts_with("$argon2")) {
            return Err(ConfigError {
                var: name,
                message:
                    "expected an argon2 hash ($argon2id$…) from `mindroom-billing console hash-password`; in .env \
                          put it in single quotes (a `$` there starts a variable)"
                        .into(),
            });
        }
    }
    let settings = ConsoleSettings {
        addr,
        password_hash,
        readonly_password_hash: var("BILLING_CONSOLE_READONLY_PASSWORD_HASH").map(SecretString::from),
        session_key: secret("BILLING_CONSOLE_SESSION_KEY")?,
        secure_cookie,
        origin: var("BILLING_CONSOLE_ORIGIN").unwrap_or_else(|| format!("http://{addr}")),
        trusted_proxies: var("BILLING_CONSOLE_TRUSTED_PROXIES")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse().map_err(|e| ConfigError {
                    var: "BILLING_CONSOLE_TRUSTED_PROXIES",
                    message: format!("expected IP addresses separated by commas, got {s:?} ({e})"),
                })
            })
            .collect::<Result<_, _>>()?,
    };
    settings.console_config()?; // validates the hashes and the key now, at start-up
    Ok(Some(settings))
}

/// The signing secret used when `STRIPE_WEBHOOK_SECRET` is unset in the fully embedded set-up (in-memory
/// store, dry-run provisioner, e-mails logged, no Stripe key): then nothing real can be reached with a
/// forged event, and `serve` + `send` work out of the box. As soon as anything real is configured the
/// variable is required.
pub(crate) const DEV_WEBHOOK_SECRET: &str = "whsec_mindroom_billing_local_dev_only";

/// The variables whose presence means "something real is configured" (no development secret then).
const REAL: [&str; 5] =
    ["DATABASE_URL", "SUPABASE_URL", "DOKKU_PROVISIONER_URL", "RESEND_API_KEY", "STRIPE_SECRET_KEY"];

/// Whether a secret's value is a placeholder copied from documentation rather than a real value:
/// `whsec_replace_me`, `…replace_me…`, `changeme`, `xxx`, `<your key>`, `re_…` and the like.
fn is_placeholder(value: &str) -> bool {
    let lower = value.to_ascii_lowercase();
    let rest = ["whsec_", "sk_live_", "sk_test_", "rk_live_", "rk_test_", "sb_secret_", "re_"]
        .iter()
        .find_map(|prefix| lower.strip_prefix(prefix))
        .unwrap_or(&lower);
    let markers = ["replace_me", "replace-me", "replaceme", "changeme", "change_me", "change-me", "your_", "your-"];
    rest.is_empty()
        || markers.iter().any(|m| rest.contains(m))
        || rest.contains(['…', '<', '>'])
        || rest.contains("...")
        || (rest.contains("xxx") && rest.chars().all(|c| matches!(c, 'x' | '_' | '-' | '.')))
}

/// A secret variable, refused when it holds a placeholder.
fn secret(name: &'static str) -> Result<Option<SecretString>, ConfigError> {
    match var(name) {
        Some(v) if is_placeholder(&v) => Err(ConfigError {
            var: name,
            message: "holds a placeholder (as copied from .env.example or the README), not a real value; \
                      set the real value or leave it empty"
                .into(),
        }),
        other => Ok(other.map(SecretString::from)),
    }
}

/// Reads `BILLING_CACHE_TTL_MS` on top of the core's cache defaults.
fn cache_from_env() -> Result<CacheConfig, ConfigError> {
    let d = CacheConfig::default();
    let ttl = Duration::from_millis(parse(
        "BILLING_CACHE_TTL_MS",
        u64::try_from(d.ttl.as_millis()).unwrap_or(u64::MAX),
        "milliseconds",
    )?);
    if ttl.is_zero() {
        return Ok(CacheConfig::disabled());
    }
    Ok(CacheConfig { ttl, usage_ttl: ttl, ..d })
}

/// Reads the advanced `BILLING_*` worker settings on top of the core's defaults.
fn worker_from_env() -> Result<WorkerConfig, ConfigError> {
    let d = WorkerConfig::default();
    let ms = |name, default: Duration| {
        parse(name, u64::try_from(default.as_millis()).unwrap_or(u64::MAX), "milliseconds").map(Duration::from_millis)
    };
    let secs =
        |name, default: chrono::Duration| parse(name, default.num_seconds(), "seconds").map(chrono::Duration::seconds);
    let worker = WorkerConfig {
        concurrency: parse("BILLING_WORKER_CONCURRENCY", d.concurrency, "a number of job runners")?,
        poll_interval: ms("BILLING_JOB_POLL_MS", d.poll_interval)?,
        sweep_interval: ms("BILLING_SWEEP_INTERVAL_MS", d.sweep_interval)?,
        lease: secs("BILLING_JOB_LEASE_SECS", d.lease)?,
        backoff_base: ms("BILLING_JOB_BACKOFF_BASE_MS", d.backoff_base)?,
        backoff_max: ms("BILLING_JOB_BACKOFF_MAX_MS", d.backoff_max)?,
        max_attempts: parse("BILLING_JOB_MAX_ATTEMPTS", d.max_attempts, "a number of attempts")?,
        unapplied_after: secs("BILLING_UNAPPLIED_AFTER_SECS", d.unapplied_after)?,
        email_address_wait: secs("BILLING_EMAIL_ADDRESS_WAIT_SECS", d.email_address_wait)?,
    };
    if worker.lease <= chrono::Duration::zero() {
        return Err(ConfigError { var: "BILLING_JOB_LEASE_SECS", message: "must be positive".into() });
    }
    if worker.max_attempts == 0 {
        return Err(ConfigError { var: "BILLING_JOB_MAX_ATTEMPTS", message: "must be at least 1".into() });
    }
    Ok(worker)
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |o: &Option<SecretString>| if o.is_some() { "[set]" } else { "[unset]" };
        f.debug_struct("Config")
            .field("port", &self.port)
            .field("webhook_secrets", &set(&self.webhook_secrets))
            .field("tolerance_secs", &self.tolerance_secs)
            .field("prices", &self.prices)
            .field("grace_period_days", &self.grace_period_days)
            .field("dispute_policy", &self.dispute_policy)
            .field("admin_email", &self.admin_email)
            .field("api_key", &set(&self.api_key))
            .field("log_format", &self.log_format)
            .field("database_url", &set(&self.database_url))
            .field("sqlite_path", &self.sqlite_path)
            .field("memory_store", &self.memory_store)
            .field("supabase_url", &self.supabase_url)
            .field("supabase_service_key", &set(&self.supabase_service_key))
            .field("provisioner_url", &self.provisioner_url)
            .field("provisioner_api_key", &set(&self.provisioner_api_key))
            .field("resend_api_key", &set(&self.resend_api_key))
            .field("email_from", &self.email_from)
            .field("resend_api_base", &self.resend_api_base)
            .field("stripe_secret_key", &set(&self.stripe_secret_key))
            .field("worker", &self.worker)
            .field("request_timeout", &self.request_timeout)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("retention_days", &self.retention_days)
            .field("console", &self.console)
            .finish()
    }
}

/// Reads a variable; unset and empty are the same.
fn var(name: &'static str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

fn parse<T: std::str::FromStr>(name: &'static str, default: T, what: &str) -> Result<T, ConfigError>
where
    T::Err: fmt::Display,
{
    match var(name) {
        None => Ok(default),
        Some(v) => {
            v.parse().map_err(|e| ConfigError { var: name, message: format!("expected {what}, got {v:?} ({e})") })
        }
    }
}

fn url(name: &'static str) -> Result<Option<String>, ConfigError> {
    match var(name) {
        Some(v) if !(v.starts_with("http://") || v.starts_with("https://")) => {
            Err(ConfigError { var: name, message: format!("expected an http(s) URL, got {v:?}") })
        }
        other => Ok(other.map(|v| v.trim_end_matches('/').to_owned())),
    }
}

/// A positive number of seconds.
fn positive(name: &'static str, default: u64) -> Result<u64, ConfigError> {
    let value = parse(name, default, "a number of seconds")?;
    if value == 0 {
        return Err(ConfigError { var: name, message: "must be at least 1".into() });
    }
    Ok(value)
}

/// `BILLING_EVENT_RETENTION_DAYS`: 1 to 36,500 days (default 400: disputes and audits reach back
/// more than a year).
fn retention_days() -> Result<i64, ConfigError> {
    const NAME: &str = "BILLING_EVENT_RETENTION_DAYS";
    let days = parse(NAME, RetentionPolicy::default().retention.num_days(), "a number of days")?;
    if !(1..=36_500).contains(&days) {
        return Err(ConfigError { var: NAME, message: format!("must be 1..=36500 days, got {days}") });
    }
    Ok(days)
}

/// `STRIPE_SECRET_KEY`: a secret (`sk_…`) or restricted (`rk_…`) key, not a publishable one.
fn stripe_key() -> Result<Option<SecretString>, ConfigError> {
    let key = secret("STRIPE_SECRET_KEY")?;
    if let Some(key) = &key {
        let k = key.expose_secret();
        if !(k.starts_with("sk_") || k.starts_with("rk_")) {
            return Err(ConfigError {
                var: "STRIPE_SECRET_KEY",
                message: "expected a secret key (sk_…) or a restricted key with read access (rk_…)".into(),
            });
        }
    }
    Ok(key)
}

impl Config {
    /// Reads the environment (after `.env`). `serve` additionally calls [`Config::require_serve`].
    pub(crate) fn from_env() -> Result<Self, ConfigError> {
        let mut prices = PriceCatalog::new();
        let mut any_price = false;
        for (name, tier) in [
            ("STRIPE_PRICE_STARTER", Tier::Starter),
            ("STRIPE_PRICE_PRO", Tier::Professional),
            ("STRIPE_PRICE_ENTERPRISE", Tier::Enterprise),
        ] {
            if let Some(price) = var(name) {
                if !price.starts_with("price_") {
                    return Err(ConfigError {
                        var: name,
                        message: format!("expected a Stripe price id (price_…), got {price:?}"),
                    });
                }
                prices = prices.with_price(price, tier);
                any_price = true;
            }
        }
        let grace_period_days = parse("GRACE_PERIOD_DAYS", 7_i64, "a number of days")?;
        if !(0..=365).contains(&grace_period_days) {
            return Err(ConfigError {
                var: "GRACE_PERIOD_DAYS",
                message: format!("must be 0..=365, got {grace_period_days}"),
            });
        }
        let dispute_policy = match var("BILLING_DISPUTE_POLICY") {
            None => DisputePolicy::default(),
            Some(value) => DisputePolicy::parse(value.trim()).ok_or_else(|| ConfigError {
                var: "BILLING_DISPUTE_POLICY",
                message: format!("expected alert or suspend, got {value:?}"),
            })?,
        };
        let log_format = match var("LOG_FORMAT").as_deref() {
            None | Some("pretty") => LogFormat::Pretty,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError {
                    var: "LOG_FORMAT",
                    message: format!("expected pretty or json, got {other:?}"),
                });
            }
        };
        let webhook_secrets = var("STRIPE_WEBHOOK_SECRET");
        if let Some(secrets) = &webhook_secrets {
            let err = |message: &str| Err(ConfigError { var: "STRIPE_WEBHOOK_SECRET", message: message.into() });
            let list: Vec<&str> = secrets.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
            if list.is_empty() {
                return err("no secret in the list");
            }
            if list.iter().any(|s| !s.starts_with("whsec_")) {
                return err(
                    "expected the endpoint's signing secret(s), each starting with whsec_ (as the dashboard or \
                            `stripe listen` shows it)",
                );
            }
            if list.iter().any(|s| is_placeholder(s)) {
                return err("holds a placeholder (as copied from .env.example), not a signing secret; set the \
                            endpoint's whsec_… secret, or leave it empty in the fully embedded mode");
            }
        }
        let log_filter_set = var("RUST_LOG").is_some();
        let log_filter = var("RUST_LOG").unwrap_or_else(|| "info".to_owned());
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&log_filter) {
            return Err(ConfigError { var: "RUST_LOG", message: format!("invalid filter {log_filter:?}: {e}") });
        }
        let (database_url, sqlite_path, memory_store) = database_from_env()?;
        let port = parse("PORT", 3005_u16, "a TCP port")?;
        let config = Self {
            port,
            webhook_secrets: webhook_secrets.map(SecretString::from),
            tolerance_secs: parse("STRIPE_WEBHOOK_TOLERANCE_SECS", DEFAULT_TOLERANCE_SECS, "a number of seconds")?,
            prices,
            any_price,
            grace_period_days,
            dispute_policy,
            admin_email: var("ADMIN_EMAIL"),
            api_key: secret("BILLING_API_KEY")?,
            log_format,
            database_url,
            sqlite_path,
            memory_store,
            supabase_url: url("SUPABASE_URL")?,
            supabase_service_key: secret("SUPABASE_SERVICE_KEY")?,
            provisioner_url: url("DOKKU_PROVISIONER_URL")?,
            provisioner_api_key: secret("PROVISIONER_API_KEY")?,
            resend_api_key: secret("RESEND_API_KEY")?,
            email_from: var("EMAIL_FROM"),
            resend_api_base: url("RESEND_API_BASE")?,
            stripe_secret_key: stripe_key()?,
            stripe_api_base: url("STRIPE_API_BASE")?,
            stripe_api_version: var("STRIPE_API_VERSION"),
            stripe_sync: StripeSyncConfig {
                catch_up_interval: Duration::from_secs(positive("STRIPE_CATCH_UP_INTERVAL_SECS", 300)?),
                reconcile_interval: Duration::from_secs(positive("STRIPE_RECONCILE_INTERVAL_SECS", 86_400)?),
                ..StripeSyncConfig::default()
            },
            provisioner_timeout: Duration::from_secs(positive("PROVISIONER_TIMEOUT_SECS", 30)?),
            worker: worker_from_env()?,
            request_timeout: Duration::from_secs(parse("BILLING_REQUEST_TIMEOUT_SECS", 15_u64, "seconds")?),
            shutdown_grace: Duration::from_secs(parse("BILLING_SHUTDOWN_GRACE_SECS", 5_u64, "seconds")?),
            memory_events: parse("BILLING_MEMORY_EVENTS", MemoryLimits::default().max_payloads, "a number of events")?,
            cache: cache_from_env()?,
            retention_days: retention_days()?,
            dev_secret: false,
            log_filter,
            log_filter_set,
            no_color: var("NO_COLOR").is_some(),
            console: console_from_env(port)?,
        };
        let mut config = config;
        if config.webhook_secrets.is_none() && config.embedded() {
            config.webhook_secrets = Some(SecretString::from(DEV_WEBHOOK_SECRET));
            config.dev_secret = true;
        }
        if config.supabase_url.is_some() && config.supabase_service_key.is_none() {
            return Err(ConfigError {
                var: "SUPABASE_SERVICE_KEY",
                message: "required when SUPABASE_URL is set".into(),
            });
        }
        if config.resend_api_key.is_some() && config.email_from.is_none() {
            return Err(ConfigError { var: "EMAIL_FROM", message: "required when RESEND_API_KEY is set".into() });
        }
        // A provisioner call (with its one quick retry on a reset connection) must end well inside the
        // job's lease, so that no second worker takes the job over while it is in flight (the worker
        // also renews the lease during a call).
        let call = chrono::Duration::from_std(config.provisioner_timeout * 2).unwrap_or(chrono::Duration::MAX);
        if config.worker.lease <= call {
            return Err(ConfigError {
                var: "BILLING_JOB_LEASE_SECS",
                message: format!(
                    "must be longer than twice PROVISIONER_TIMEOUT_SECS ({} s), got {} s",
                    config.provisioner_timeout.as_secs(),
                    config.worker.lease.num_seconds()
                ),
            });
        }
        if config.provisioner_url.is_some() && config.provisioner_api_key.is_none() {
            return Err(ConfigError {
                var: "PROVISIONER_API_KEY",
                message: "required when DOKKU_PROVISIONER_URL is set".into(),
            });
        }
        Ok(config)
    }

    /// Fully embedded: nothing real is configured (no store, provisioner, e-mail or Stripe key), so a
    /// forged event can reach nothing real.
    pub(crate) fn embedded(&self) -> bool {
        self.database_url.is_none()
            && self.sqlite_path.is_none()
            && !self.memory_store
            && self.supabase_url.is_none()
            && self.provisioner_url.is_none()
            && self.resend_api_key.is_none()
            && self.stripe_secret_key.is_none()
    }

    /// What `serve` needs beyond [`Config::from_env`]: the webhook secret(s).
    pub(crate) fn require_serve(&self) -> Result<&SecretString, ConfigError> {
        self.webhook_secrets.as_ref().ok_or_else(|| ConfigError {
            var: "STRIPE_WEBHOOK_SECRET",
            message: format!(
                "required as soon as anything real is configured ({}): the endpoint's signing secret (whsec_…), \
                 several comma-separated during a rotation",
                REAL.join(", ")
            ),
        })
    }

    /// Where the store is: `DATABASE_URL` (PostgreSQL, a SQLite file or memory), else `SUPABASE_URL`,
    /// else the default SQLite file ([`DEFAULT_SQLITE_PATH`]).
    pub(crate) fn store_target(&self) -> StoreTarget<'_> {
        if let Some(url) = &self.database_url {
            return StoreTarget::Postgres(url);
        }
        if let Some(path) = &self.sqlite_path {
            return StoreTarget::Sqlite { path, default: false };
        }
        if self.memory_store {
            return StoreTarget::Memory;
        }
        if let (Some(url), Some(key)) = (&self.supabase_url, &self.supabase_service_key) {
            return StoreTarget::Supabase { url, key };
        }
        StoreTarget::Sqlite { path: Path::new(DEFAULT_SQLITE_PATH), default: true }
    }

    /// What the operator commands (`events`, `jobs`, `stripe`) need: the server's database, as it
    /// is. They never create a SQLite file (an empty one shows nothing of a server), and an
    /// in-memory server keeps its state to itself.
    pub(crate) fn require_database(&self, command: &str) -> Result<(), ConfigError> {
        let err = |message: String| Err(ConfigError { var: "DATABASE_URL", message });
        match self.store_target() {
            StoreTarget::Postgres(_) | StoreTarget::Supabase { .. } => Ok(()),
            StoreTarget::Sqlite { path, .. } if path.exists() => Ok(()),
            StoreTarget::Sqlite { path, .. } => err(format!(
                "`{command}` reads the server's database: no SQLite file at {} (run it where the server runs, or \
                 set DATABASE_URL as the server has it)",
                path.display()
            )),
            StoreTarget::Memory => err(format!(
                "`{command}` reads the server's database: an in-memory server (DATABASE_URL=memory:) keeps its \
                 events and jobs to itself"
            )),
        }
    }
}

/// The SQLite file `serve` uses when no store is configured (relative to the working directory).
pub(crate) const DEFAULT_SQLITE_PATH: &str = "./data/mindroom-billing.db";

/// Where the store is (see [`Config::store_target`]).
pub(crate) enum StoreTarget<'a> {
    /// `DATABASE_URL=postgres://…`.
    Postgres(&'a SecretString),
    /// `DATABASE_URL=sqlite://path`, or the default file (`default`).
    Sqlite {
        /// The file.
        path: &'a Path,
        /// Whether nothing chose it.
        default: bool,
    },
    /// `DATABASE_URL=memory:`.
    Memory,
    /// `SUPABASE_URL` with its service key.
    Supabase {
        /// The project URL.
        url: &'a str,
        /// The service key.
        key: &'a SecretString,
    },
}

/// `DATABASE_URL`: `postgres://…` (or `postgresql://…`), `sqlite://path` or `memory:`.
#[allow(clippy::type_complexity)]
fn database_from_env() -> Result<(Option<SecretString>, Option<PathBuf>, bool), ConfigError> {
    let Some(url) = secret("DATABASE_URL")? else { return Ok((None, None, false)) };
    let value = url.expose_secret();
    if value.starts_with("postgres://") || value.starts_with("postgresql://") {
        return Ok((Some(url), None, false));
    }
    if let Some(path) = value.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(ConfigError {
                var: "DATABASE_URL",
                message: "sqlite:// names no file (e.g. sqlite://./data/mindroom-billing.db)".into(),
            });
        }
        return Ok((None, Some(PathBuf::from(path)), false));
    }
    if value == "memory:" || value == "memory://" {
        return Ok((None, None, true));
    }
    let scheme = value.split_once("://").map_or("no scheme", |(scheme, _)| scheme);
    Err(ConfigError {
        var: "DATABASE_URL",
        message: format!(
            "expected a PostgreSQL URL (postgres://… or postgresql://…), a SQLite file (sqlite://path) or memory:, \
             got {scheme}"
        ),
    })
}
