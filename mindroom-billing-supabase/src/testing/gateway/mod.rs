//! A PostgREST-compatible RPC gateway (`POST /rest/v1/rpc/<fn>`) over a real PostgreSQL,
//! implementing the contract in POSTGREST.md §7 (Kong `apikey` check, JWT roles, `pg_proc`
//! resolution, one transaction per request, §2 response SQL, §3 error mapping).

mod error;
mod handler;
mod routine;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tokio::sync::watch;

use super::jwt;

/// Default legacy JWT secret (the Supabase CLI's local default).
pub const DEFAULT_JWT_SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters-long";
/// Default accepted new-style secret key.
pub const DEFAULT_SECRET_KEY: &str = "sb_secret_test_0123456789abcdefghijklmnopqrstuv";

/// Mints a legacy `service_role` key: HS256 JWT with `{"role":"service_role","iss":"supabase"}`.
pub fn mint_service_role_jwt(secret: &str) -> String {
    jwt::sign_hs256(&serde_json::json!({"role": "service_role", "iss": "supabase"}), secret)
}

/// Mints a legacy `anon` key: HS256 JWT with `{"role":"anon","iss":"supabase"}`.
pub fn mint_anon_jwt(secret: &str) -> String {
    jwt::sign_hs256(&serde_json::json!({"role": "anon", "iss": "supabase"}), secret)
}

/// Mints an HS256 JWT with arbitrary claims.
pub fn mint_jwt(claims: &serde_json::Value, secret: &str) -> String {
    jwt::sign_hs256(claims, secret)
}

/// Configuration of a [`Gateway`].
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Legacy project JWT secret (HS256) used to verify `Authorization: Bearer` JWTs.
    pub jwt_secret: String,
    /// The accepted new-style secret key (`sb_secret_…`); requests with it run as `service_role`.
    pub secret_key: String,
    /// More accepted `apikey` values, besides `secret_key` and the legacy `service_role`/`anon`
    /// JWTs minted from `jwt_secret`.
    pub extra_api_keys: Vec<String>,
    /// Exposed schemas (`db-schemas`); the first is the default.
    pub exposed_schemas: Vec<String>,
    /// Extra schemas appended to `search_path` (`db-extra-search-path`).
    pub extra_search_path: Vec<String>,
    /// Role used for JWTs without a `role` claim (`db-anon-role`).
    pub anon_role: String,
    /// Role whose `statement_timeout` / `lock_timeout` settings apply to every request, as if
    /// the gateway had connected as it (PostgREST connects as `authenticator`).
    pub authenticator_role: String,
    /// `db-max-rows`: limit applied to set-returning functions (Supabase: 1000).
    pub max_rows: Option<u64>,
    /// Maximum number of PostgreSQL connections of the gateway's pool.
    pub pool_max_connections: u32,
    /// Pool acquisition timeout; exceeding it gives 504 PGRST003.
    pub pool_acquire_timeout: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig::new(DEFAULT_JWT_SECRET, DEFAULT_SECRET_KEY)
    }
}

impl GatewayConfig {
    /// A Supabase-like configuration with the given JWT secret and `sb_secret_…` key.
    pub fn new(jwt_secret: impl Into<String>, secret_key: impl Into<String>) -> Self {
        GatewayConfig {
            jwt_secret: jwt_secret.into(),
            secret_key: secret_key.into(),
            extra_api_keys: Vec::new(),
            exposed_schemas: vec!["public".to_owned(), "graphql_public".to_owned()],
            extra_search_path: vec!["public".to_owned(), "extensions".to_owned()],
            anon_role: "anon".to_owned(),
            authenticator_role: "authenticator".to_owned(),
            max_rows: Some(1000),
            pool_max_connections: 4,
            pool_acquire_timeout: Duration::from_secs(10),
        }
    }

    /// The legacy `service_role` key for this config's JWT secret.
    pub fn service_role_jwt(&self) -> String {
        mint_service_role_jwt(&self.jwt_secret)
    }

    /// The legacy `anon` key for this config's JWT secret.
    pub fn anon_jwt(&self) -> String {
        mint_anon_jwt(&self.jwt_secret)
    }

    /// Every `apikey` value the gateway accepts.
    pub fn accepted_api_keys(&self) -> Vec<String> {
        let mut keys = vec![self.secret_key.clone(), self.service_role_jwt(), self.anon_jwt()];
        keys.extend(self.extra_api_keys.iter().cloned());
        keys
    }
}

/// Errors from [`Gateway::try_start`].
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The database URL could not be parsed.
    #[error("gateway database url: {0}")]
    Url(#[source] sqlx::Error),
    /// Binding the listener failed.
    #[error("gateway bind: {0}")]
    Bind(#[source] std::io::Error),
}

pub(crate) struct State {
    pub(crate) pool: PgPool,
    pub(crate) connect_options: PgConnectOptions,
    pub(crate) config: GatewayConfig,
    pub(crate) api_keys: Vec<String>,
}

/// A running PostgREST-compatible gateway on `127.0.0.1:<random port>`; stops on drop.
///
/// Clients call `{base_url}/rest/v1/rpc/<fn>` with `apikey` (and optionally
/// `Authorization: Bearer`).
pub struct Gateway {
    addr: SocketAddr,
    config: GatewayConfig,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl Gateway {
    /// Starts the gateway in front of the database at `db_url` (a superuser URL, e.g.
    /// [`TestDb::url`](super::TestDb::url)). Must be called inside a Tokio runtime.
    ///
    /// # Panics
    /// If the URL is invalid or binding fails; see [`Gateway::try_start`].
    pub async fn start(db_url: &str, config: GatewayConfig) -> Gateway {
        match Self::try_start(db_url, config).await {
            Ok(g) => g,
            Err(e) => panic!("starting the test gateway failed: {e}"),
        }
    }

    /// Fallible [`Gateway::start`]. Connections are opened lazily, so a database that is down
    /// yields 503 responses rather than an error here.
    pub async fn try_start(db_url: &str, config: GatewayConfig) -> Result<Gateway, GatewayError> {
        let options = db_url
            .parse::<PgConnectOptions>()
            .map_err(GatewayError::Url)?
            .application_name("mrb-test-gateway")
            .disable_statement_logging();
        let pool = PgPoolOptions::new()
            .max_connections(config.pool_max_connections.max(1))
            .acquire_timeout(config.pool_acquire_timeout)
            .connect_lazy_with(options.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.map_err(GatewayError::Bind)?;
        let addr = listener.local_addr().map_err(GatewayError::Bind)?;
        let state = Arc::new(State {
            pool,
            connect_options: options,
            api_keys: config.accepted_api_keys(),
            config: config.clone(),
        });
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, state, rx));
        Ok(Gateway { addr, config, shutdown, task })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `{base_url}/rest/v1/rpc/{function}`.
    pub fn rpc_url(&self, function: &str) -> String {
        format!("{}/rest/v1/rpc/{function}", self.base_url())
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The configuration the gateway runs with.
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    /// The accepted legacy `service_role` JWT.
    pub fn service_role_jwt(&self) -> String {
        self.config.service_role_jwt()
    }

    /// The accepted `sb_secret_…` key.
    pub fn secret_key(&self) -> &str {
        &self.config.secret_key
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.task.abort();
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => break,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let state = state.clone();
        let mut conn_shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move {
                    // Run each request to completion even if the client goes away, so that a
                    // transaction is never abandoned half-way.
                    let resp =
                        tokio::spawn(handler::handle(state, req)).await.unwrap_or_else(|_| handler::internal_error());
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = conn_shutdown.changed() => {}
            }
        });
    }
    state.pool.close().await;
}
