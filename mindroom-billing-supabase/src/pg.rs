//! The direct PostgreSQL store (`DATABASE_URL`).
//!
//! Every operation is one simple-protocol query, `select public.billing_<op>('<json>'::jsonb)::text`:
//! one round trip, no prepared statements and no session state, so it works through Supabase's
//! pooler (Supavisor / PgBouncer) in transaction mode. TLS follows the URL's `sslmode` (rustls).

use std::sync::Weak;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use mindroom_billing_core::{ChangeListener, StoreError};
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Row};
use uuid::Uuid;

use crate::migrations::{MIGRATIONS, Migration};
use crate::wire::{Rpc, impl_store_via_rpc, retryable_sqlstate};

/// Advisory lock key serializing migration runs across replicas (ASCII `mrbmigr1`).
const MIGRATION_LOCK: i64 = 0x6d72_626d_6967_7231;

/// Pooled connections idle at least this long are pinged before use.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// How many times a call that failed on a broken connection is sent again on another one.
const RECONNECT_RETRIES: usize = 2;

/// Connection settings of a [`PgStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgStoreOptions {
    /// Most connections in the pool.
    pub max_connections: u32,
    /// Connections kept open when idle.
    pub min_connections: u32,
    /// How long to wait for a free connection (or a new one) before answering `Unavailable`.
    pub acquire_timeout: Duration,
    /// Upper bound for one call; on expiry the call answers `Unavailable`. `None`: no bound.
    pub query_timeout: Option<Duration>,
    /// Close connections idle for this long.
    pub idle_timeout: Option<Duration>,
    /// `application_name` shown in `pg_stat_activity`.
    pub application_name: String,
}

impl Default for PgStoreOptions {
    fn default() -> Self {
        Self {
            max_connections: 10,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(5),
            query_timeout: Some(Duration::from_secs(30)),
            idle_timeout: Some(Duration::from_secs(300)),
            application_name: "mindroom-billing".to_owned(),
        }
    }
}

impl PgStoreOptions {
    /// Sets the pool size.
    #[must_use]
    pub fn with_max_connections(mut self, max_connections: u32) -> Self {
        self.max_connections = max_connections;
        self
    }

    /// Sets the acquire timeout.
    #[must_use]
    pub fn with_acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// Sets the per-call timeout.
    #[must_use]
    pub fn with_query_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.query_timeout = timeout;
        self
    }
}

/// What [`PgStore::migrate`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// Versions applied by this run.
    pub applied: Vec<String>,
    /// Versions that were already recorded.
    pub skipped: Vec<String>,
    /// How long the run took.
    pub elapsed: Duration,
}

/// The [`Store`](mindroom_billing_core::Store) on PostgreSQL, called directly.
#[derive(Clone)]
pub struct PgStore {
    pub(crate) pool: PgPool,
    query_timeout: Option<Duration>,
}

impl std::fmt::Debug for PgStore {
    // The pool's options hold the password: never print them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("pool_size", &self.pool.size())
            .field("query_timeout", &self.query_timeout)
            .finish_non_exhaustive()
    }
}

/// A call did not finish within the configured timeout.
#[derive(Debug, thiserror::Error)]
#[error("{0} timed out after {1:?}")]
struct TimedOut(&'static str, Duration);

/// An invalid connection URL.
#[derive(Debug, thiserror::Error)]
#[error("invalid database URL: {0}")]
struct BadUrl(String);

/// Maps a driver error into the core's kinds; the driver type stays behind the boxed source.
pub(crate) fn map_sqlx(e: sqlx::Error) -> StoreError {
    let retryable = match &e {
        sqlx::Error::Database(db) => db.code().is_some_and(|c| retryable_sqlstate(&c)),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    };
    if retryable { StoreError::Unavailable(Box::new(e)) } else { StoreError::Other(Box::new(e)) }
}

/// Quotes a string as a SQL literal, independent of `standard_conforming_strings` (as libpq's
/// `PQescapeLiteral`): quotes doubled; with any backslash, an `E''` literal with backslashes doubled.
pub(crate) fn quote_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 3);
    if s.contains('\\') {
        out.push('E');
    }
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

fn parse_options(url: &str, options: &PgStoreOptions) -> Result<(PgConnectOptions, PgPoolOptions), StoreError> {
    let connect = url
        .parse::<PgConnectOptions>()
        .map_err(|e| StoreError::Other(Box::new(BadUrl(e.to_string()))))?
        .application_name(&options.application_name)
        // Pooler-safe: never keep named prepared statements (we use the simple protocol anyway).
        .statement_cache_capacity(0)
        .disable_statement_logging();
    let pool = PgPoolOptions::new()
        .max_connections(options.max_connections.max(1))
        .min_connections(options.min_connections)
        .acquire_timeout(options.acquire_timeout)
        .idle_timeout(options.idle_timeout)
        // No extra round trip per call under load; a connection idle for a while (e.g. across a
        // database restart) is pinged first, and a broken one is replaced.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        });
    Ok((connect, pool))
}

impl PgStore {
    /// Connects to `url` (`postgres://…`, `sslmode` honoured) and checks that the server answers.
    /// A server that cannot be reached gives [`StoreError::Unavailable`].
    ///
    /// The check is one connection attempt, so its error is the server's own ("connection refused",
    /// "database … does not exist", a failed password) rather than a pool time-out hiding it.
    pub async fn connect(url: &str, options: PgStoreOptions) -> Result<PgStore, StoreError> {
        let (connect, pool) = parse_options(url, &options)?;
        let probe = connect.connect().await.map_err(map_sqlx)?;
        // The probe was only a check; the pool opens its own connections.
        let _ = sqlx::Connection::close(probe).await;
        Ok(PgStore { pool: pool.connect_lazy_with(connect), query_timeout: options.query_timeout })
    }

    /// Like [`PgStore::connect`] but opens connections on first use (the process can start while
    /// the database is down; calls answer `Unavailable` until it is back).
    pub fn connect_lazy(url: &str, options: PgStoreOptions) -> Result<PgStore, StoreError> {
        let (connect, pool) = parse_options(url, &options)?;
        Ok(PgStore { pool: pool.connect_lazy_with(connect), query_timeout: options.query_timeout })
    }

    /// Wraps an existing sqlx pool (for services that already hold one). Use a pool with
    /// `statement_cache_capacity(0)` behind a transaction-mode pooler.
    pub fn from_pool(pool: PgPool) -> PgStore {
        PgStore { pool, query_timeout: PgStoreOptions::default().query_timeout }
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Applies the embedded migrations that are not recorded in `public.billing_schema_migrations`,
    /// in one transaction under a transaction-scoped advisory lock (safe to run from every replica
    /// at once, and through a transaction-mode pooler). Running it again is a no-op; the files are
    /// idempotent too, so a database migrated by the Supabase CLI is fine.
    pub async fn migrate(&self) -> Result<MigrationReport, StoreError> {
        let started = Instant::now();
        let mut tx = self.pool.begin().await.map_err(map_sqlx)?;
        let setup = format!(
            "set local client_min_messages = warning;
             select pg_advisory_xact_lock({MIGRATION_LOCK});
             create table if not exists public.billing_schema_migrations (
                 version text primary key,
                 name text not null,
                 applied_at timestamptz not null default now()
             );
             alter table public.billing_schema_migrations enable row level security;"
        );
        sqlx::raw_sql(&setup).execute(&mut *tx).await.map_err(map_sqlx)?;
        let rows = sqlx::raw_sql("select version from public.billing_schema_migrations")
            .fetch_all(&mut *tx)
            .await
            .map_err(map_sqlx)?;
        let done: Vec<String> =
            rows.iter().map(|r| r.try_get::<String, _>(0)).collect::<Result<_, _>>().map_err(map_sqlx)?;
        let mut report = MigrationReport::default();
        for m in MIGRATIONS {
            if done.iter().any(|v| v == m.version) {
                report.skipped.push(m.version.to_owned());
                continue;
            }
            sqlx::raw_sql(m.sql).execute(&mut *tx).await.map_err(map_sqlx)?;
            let record = format!(
                "insert into public.billing_schema_migrations (version, name) values ({}, {}) on conflict do nothing",
                quote_literal(m.version),
                quote_literal(m.name)
            );
            sqlx::raw_sql(&record).execute(&mut *tx).await.map_err(map_sqlx)?;
            report.applied.push(m.version.to_owned());
        }
        tx.commit().await.map_err(map_sqlx)?;
        report.elapsed = started.elapsed();
        tracing::info!(applied = ?report.applied, elapsed_ms = report.elapsed.as_millis(), "migrations done");
        Ok(report)
    }

    /// The embedded migrations this database has not recorded, oldest first (empty: the schema is
    /// current). A migration counts as applied when it is recorded by [`PgStore::migrate`]
    /// (`public.billing_schema_migrations`) or by the Supabase CLI (`supabase_migrations.schema_migrations`).
    pub async fn pending_migrations(&self) -> Result<Vec<&'static Migration>, StoreError> {
        let ledgers =
            [("public.billing_schema_migrations", "version"), ("supabase_migrations.schema_migrations", "version")];
        let mut done = Vec::new();
        for (table, column) in ledgers {
            let exists = sqlx::raw_sql(&format!("select to_regclass({}) is not null", quote_literal(table)))
                .fetch_one(&self.pool)
                .await
                .and_then(|row| row.try_get::<bool, _>(0))
                .map_err(map_sqlx)?;
            if exists {
                let rows = sqlx::raw_sql(&format!("select {column}::text from {table}"))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(map_sqlx)?;
                for row in rows {
                    done.push(row.try_get::<String, _>(0).map_err(map_sqlx)?);
                }
            }
        }
        Ok(MIGRATIONS.iter().filter(|m| !done.iter().any(|v| v == m.version)).collect())
    }

    async fn call_inner(&self, function: &'static str, p: &Value) -> Result<Value, StoreError> {
        let sql = format!("select public.{function}({}::jsonb)::text", quote_literal(&p.to_string()));
        let row = sqlx::raw_sql(&sql).fetch_one(&self.pool).await.map_err(map_sqlx)?;
        let text: Option<String> = row.try_get(0).map_err(map_sqlx)?;
        match text {
            None => Ok(Value::Null),
            Some(text) => serde_json::from_str(&text).map_err(|e| StoreError::Other(Box::new(e))),
        }
    }
}

/// Whether an error is a broken connection (the pool drops it; another one may work).
fn broken_connection(e: &StoreError) -> bool {
    match e {
        StoreError::Unavailable(source) => source
            .downcast_ref::<sqlx::Error>()
            .is_some_and(|e| matches!(e, sqlx::Error::Io(_) | sqlx::Error::Protocol(_))),
        _ => false,
    }
}

#[async_trait]
impl Rpc for PgStore {
    /// A call that failed on a broken connection (a database restart, a pooler recycling its
    /// connections) is sent again on another one. Every function is safe to run again —
    /// `record_event` and `commit` are idempotent by event id and version, `enqueue` by key,
    /// `claim_jobs`/`finish_job` are fenced by lease and attempt — except `consume_usage` without an
    /// idempotency key, which is never re-sent (it would count twice).
    async fn call(&self, function: &'static str, p: Value) -> Result<Value, StoreError> {
        let mut attempt = 0;
        loop {
            let result = self.call_once(function, &p).await;
            match result {
                Err(e) if attempt < RECONNECT_RETRIES && safe_to_resend(function, &p) && broken_connection(&e) => {
                    attempt += 1;
                    tracing::debug!(function, attempt, "broken database connection; sending again");
                }
                other => return other,
            }
        }
    }
}

/// Whether a call may be sent again after a broken connection: all but a usage increment without
/// an idempotency key.
fn safe_to_resend(function: &str, p: &Value) -> bool {
    function != "billing_consume_usage" || p["idempotency_key"].is_string()
}

impl PgStore {
    async fn call_once(&self, function: &'static str, p: &Value) -> Result<Value, StoreError> {
        match self.query_timeout {
            None => self.call_inner(function, p).await,
            Some(limit) => match tokio::time::timeout(limit, self.call_inner(function, p)).await {
                Ok(result) => result,
                Err(_) => Err(StoreError::Unavailable(Box::new(TimedOut(function, limit)))),
            },
        }
    }
}

impl_store_via_rpc!(PgStore {
    fn watch_changes(&self, listener: Weak<dyn ChangeListener>) -> bool {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return false };
        runtime.spawn(watch_changes(self.pool.clone(), listener));
        true
    }
});
crate::wire::operator::impl_operator_store_via_rpc!(PgStore);

/// The channel `billing_commit` notifies with the id of each account whose subscriptions it wrote.
const CHANGES_CHANNEL: &str = "billing_account_changed";

/// The payload of the heartbeats each watching store sends on [`CHANGES_CHANNEL`].
const HEARTBEAT: &str = "heartbeat";

/// How often a watching store sends a heartbeat; a session that hears nothing (no change, no
/// heartbeat from any replica) for [`SILENCE_LIMIT`] is taken for lost, so a half-open connection
/// cannot keep a replica serving stale entitlements.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
const SILENCE_LIMIT: Duration = Duration::from_secs(6);

/// Longest wait between two attempts to listen again.
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(5);

/// Reports committed account changes to `listener` over one `LISTEN` session, reconnecting after a
/// lost connection (and saying so, since notifications sent meanwhile are gone), until the listener
/// is dropped or the pool closed.
async fn watch_changes(pool: PgPool, listener: Weak<dyn ChangeListener>) {
    let heartbeat = tokio::spawn(send_heartbeats(pool.clone(), listener.clone()));
    let mut retry = Duration::from_millis(100);
    while listener.strong_count() > 0 && !pool.is_closed() {
        let error = match listen(&pool, &listener, &mut retry).await {
            Ok(()) => break,
            Err(e) => e,
        };
        let Some(strong) = listener.upgrade() else { break };
        strong.lost();
        drop(strong);
        if pool.is_closed() {
            break;
        }
        tracing::warn!(error = %error, retry_ms = retry.as_millis(),
            "account change notifications lost; entitlement cache off until listening again");
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(LISTEN_RETRY_MAX);
    }
    heartbeat.abort();
}

/// Sends a heartbeat on the channel every [`HEARTBEAT_EVERY`] while `listener` lives.
async fn send_heartbeats(pool: PgPool, listener: Weak<dyn ChangeListener>) {
    let sql = format!("select pg_catalog.pg_notify({}, {})", quote_literal(CHANGES_CHANNEL), quote_literal(HEARTBEAT));
    while listener.strong_count() > 0 && !pool.is_closed() {
        if let Err(e) = sqlx::raw_sql(&sql).execute(&pool).await {
            tracing::debug!(error = %e, "cannot send the change-notification heartbeat");
        }
        tokio::time::sleep(HEARTBEAT_EVERY).await;
    }
}

/// The session ended: nothing heard for too long.
#[derive(Debug, thiserror::Error)]
#[error("no notification or heartbeat for {0:?}")]
struct Silent(Duration);

/// One `LISTEN` session: `Ok` once the listener is gone, `Err` when the session ended.
async fn listen(pool: &PgPool, listener: &Weak<dyn ChangeListener>, retry: &mut Duration) -> Result<(), sqlx::Error> {
    let mut session = PgListener::connect_with(pool).await?;
    session.listen(CHANGES_CHANNEL).await?;
    match listener.upgrade() {
        Some(listener) => listener.listening(),
        None => return Ok(()),
    }
    *retry = Duration::from_millis(100);
    tracing::debug!(channel = CHANGES_CHANNEL, "listening for account changes");
    loop {
        // `try_recv` answers `None` when the connection was lost (`recv` would reconnect silently
        // and hide the notifications missed meanwhile). On silence the session is dropped, never
        // read again after the interrupted receive.
        let received = tokio::time::timeout(SILENCE_LIMIT, session.try_recv())
            .await
            .map_err(|_| sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, Silent(SILENCE_LIMIT))))?;
        let Some(notification) = received? else {
            return Err(sqlx::Error::Protocol("the listening connection was lost".into()));
        };
        let Some(listener) = listener.upgrade() else { return Ok(()) };
        match notification.payload() {
            HEARTBEAT => {}
            payload => match payload.parse::<Uuid>() {
                Ok(account_id) => listener.account_changed(account_id),
                // Not ours to read: forget everything rather than keep something stale.
                Err(_) => listener.listening(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_quoted_like_libpq() {
        assert_eq!(quote_literal("a'b"), "'a''b'");
        assert_eq!(quote_literal(r#"{"x":"\u00e9\\"}"#), r#"E'{"x":"\\u00e9\\\\"}'"#);
        assert_eq!(quote_literal(""), "''");
    }

    #[test]
    fn sqlstates_are_classified() {
        for code in ["08006", "08001", "57P01", "53300", "40001", "40P01", "57014"] {
            assert!(retryable_sqlstate(code), "{code}");
        }
        for code in ["23505", "42883", "P0001", "22P02", "53400", "42501"] {
            assert!(!retryable_sqlstate(code), "{code}");
        }
    }

    #[test]
    fn pool_errors_are_unavailable() {
        assert!(matches!(map_sqlx(sqlx::Error::PoolTimedOut), StoreError::Unavailable(_)));
        assert!(matches!(map_sqlx(sqlx::Error::RowNotFound), StoreError::Other(_)));
    }
}
