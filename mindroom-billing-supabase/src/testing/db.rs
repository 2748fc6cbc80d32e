//! Throwaway PostgreSQL databases for tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, PgConnection};

/// Default admin URL used when `DATABASE_URL` is not set.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The admin (superuser) connection string: `DATABASE_URL` if set, else [`DEFAULT_ADMIN_URL`].
pub fn postgres_admin_url() -> String {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => url,
        _ => DEFAULT_ADMIN_URL.to_owned(),
    }
}

/// Replaces the database name (the URL path) of a `postgres://` URL.
pub fn url_with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[after_scheme..].find('/').map_or(base.len(), |i| after_scheme + i);
    let mut out = format!("{}/{db}", &base[..host_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// Errors from [`TestDb`].
#[derive(Debug, thiserror::Error)]
pub enum TestDbError {
    /// A database operation failed.
    #[error("test database: {0}")]
    Sqlx(#[from] sqlx::Error),
}

/// A freshly created, uniquely named PostgreSQL database, dropped on [`TestDb::drop_db`] or
/// (best effort) on `Drop`.
///
/// Creation also makes sure the Supabase-like roles exist cluster-wide (`anon`, `authenticated`,
/// `service_role`, `authenticator`) and grants `USAGE` on `public` to the three API roles.
pub struct TestDb {
    name: String,
    url: String,
    admin_url: String,
    pool: PgPool,
    dropped: Arc<AtomicBool>,
}

impl std::fmt::Debug for TestDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDb").field("name", &self.name).field("url", &self.url).finish_non_exhaustive()
    }
}

fn sqlstate(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// Runs `sql`, ignoring "already exists" races (42710 duplicate_object, 23505 unique_violation,
/// 42P04 duplicate_database, XX000 "tuple concurrently updated").
async fn exec_idempotent(conn: &mut PgConnection, sql: &str) -> Result<(), sqlx::Error> {
    match conn.execute(sql).await {
        Ok(_) => Ok(()),
        Err(e) if matches!(sqlstate(&e).as_deref(), Some("42710" | "23505" | "42P04" | "XX000" | "40001")) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates the Supabase roles cluster-wide if missing (idempotent and race-safe).
pub async fn ensure_supabase_roles(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let roles: [(&str, &str); 4] = [
        ("anon", "nologin noinherit"),
        ("authenticated", "nologin noinherit"),
        ("service_role", "nologin noinherit bypassrls"),
        ("authenticator", "login noinherit"),
    ];
    for (role, attrs) in roles {
        let exists: bool = sqlx::query_scalar("select exists(select 1 from pg_roles where rolname = $1)")
            .bind(role)
            .fetch_one(&mut *conn)
            .await?;
        if !exists {
            exec_idempotent(conn, &format!("create role {role} {attrs}")).await?;
        }
    }
    let settings = [
        "alter role authenticator set statement_timeout = '8s'",
        "alter role authenticator set lock_timeout = '8s'",
        "alter role anon set statement_timeout = '3s'",
        "alter role authenticated set statement_timeout = '8s'",
    ];
    // Only touch pg_db_role_setting when needed: concurrent ALTER ROLE SET can race.
    let current: Vec<String> = sqlx::query_scalar(
        "select r.rolname || ':' || c from pg_db_role_setting s \
         join pg_roles r on r.oid = s.setrole, unnest(s.setconfig) c where s.setdatabase = 0",
    )
    .fetch_all(&mut *conn)
    .await?;
    let wanted = [
        "authenticator:statement_timeout=8s",
        "authenticator:lock_timeout=8s",
        "anon:statement_timeout=3s",
        "authenticated:statement_timeout=8s",
    ];
    for (sql, want) in settings.iter().zip(wanted) {
        if !current.iter().any(|c| c == want) {
            exec_idempotent(conn, sql).await?;
        }
    }
    for role in ["anon", "authenticated", "service_role"] {
        let granted: bool = sqlx::query_scalar("select pg_has_role('authenticator', $1, 'MEMBER')")
            .bind(role)
            .fetch_one(&mut *conn)
            .await?;
        if !granted {
            exec_idempotent(conn, &format!("grant {role} to authenticator")).await?;
        }
    }
    Ok(())
}

impl TestDb {
    /// Creates a fresh database `mrb_test_<hex>` on the server at [`postgres_admin_url`].
    pub async fn create() -> Result<TestDb, TestDbError> {
        Self::create_with_admin_url(&postgres_admin_url()).await
    }

    /// Like [`TestDb::create`] with an explicit admin (superuser) URL.
    pub async fn create_with_admin_url(admin_url: &str) -> Result<TestDb, TestDbError> {
        let name = format!("mrb_test_{}", hex::encode(rand::random::<[u8; 8]>()));
        let mut admin = PgConnection::connect(admin_url).await?;
        ensure_supabase_roles(&mut admin).await?;
        admin.execute(format!("create database \"{name}\"").as_str()).await?;
        admin.close().await.ok();
        let url = url_with_database(admin_url, &name);
        let options: PgConnectOptions = url.parse::<PgConnectOptions>()?.disable_statement_logging();
        let pool = PgPoolOptions::new().max_connections(5).connect_with(options).await?;
        pool.execute("grant usage on schema public to anon, authenticated, service_role").await?;
        Ok(TestDb { name, url, admin_url: admin_url.to_owned(), pool, dropped: Arc::new(AtomicBool::new(false)) })
    }

    /// The database name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connection string (superuser) to this database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A pool connected to this database as the admin user.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes the pool and drops the database (`WITH (FORCE)`).
    pub async fn drop_db(self) -> Result<(), TestDbError> {
        self.pool.close().await;
        let mut admin = PgConnection::connect(&self.admin_url).await?;
        admin.execute(format!("drop database if exists \"{}\" with (force)", self.name).as_str()).await?;
        admin.close().await.ok();
        self.dropped.store(true, Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.dropped.load(Ordering::SeqCst) {
            return;
        }
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Best effort, on a thread with its own runtime (we may be inside an async context).
        let handle = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                    let _ = admin.execute(format!("drop database if exists \"{name}\" with (force)").as_str()).await;
                    let _ = admin.close().await;
                }
            });
        });
        let _ = handle.join();
    }
}

#[cfg(test)]
mod tests {
    use super::url_with_database;

    #[test]
    fn replaces_database() {
        assert_eq!(
            url_with_database("postgres://postgres@127.0.0.1:5432/postgres", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            url_with_database("postgres://u:p@h:1/db?sslmode=disable", "y"),
            "postgres://u:p@h:1/y?sslmode=disable"
        );
        assert_eq!(url_with_database("postgres://h:1", "z"), "postgres://h:1/z");
    }
}
