//! A read-only reader of the original Node service's tables (`accounts`, `subscriptions`,
//! `instances`, its columns only) for the cut-over rehearsal
//! ([`mindroom_billing_core::cutover::compare`]). It reads; it never writes or migrates.

use std::time::Duration;

use chrono::{DateTime, Utc};
use mindroom_billing_core::StoreError;
use mindroom_billing_core::cutover::{NodeInstance, NodeSubscription};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Row};
use uuid::Uuid;

use crate::pg::map_sqlx;

/// Every Node subscription with its customer and instance rows, one row per instance (none: the
/// instance columns are null). `cpu_limit` is read in thousandths of a core.
const READ: &str = "
select s.stripe_subscription_id, a.stripe_customer_id, s.tier, s.status,
       s.max_agents::bigint, s.max_messages_per_day::bigint,
       i.id, i.dokku_app_name, i.status, i.memory_limit_mb::bigint,
       round(i.cpu_limit * 1000)::bigint, i.created_at
from public.subscriptions s
left join public.accounts a on a.id = s.account_id
left join public.instances i on i.subscription_id = s.id
where s.stripe_subscription_id is not null
order by s.stripe_subscription_id, i.id";

/// The Node service's database, read in one read-only transaction.
pub struct NodeDatabase {
    pool: PgPool,
}

impl std::fmt::Debug for NodeDatabase {
    // The pool's options hold the password: never print them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeDatabase").finish_non_exhaustive()
    }
}

/// An invalid connection URL.
#[derive(Debug, thiserror::Error)]
#[error("invalid database URL: {0}")]
struct BadUrl(String);

impl NodeDatabase {
    /// Connects to `url` (`postgres://…`, `sslmode` honoured) with one connection attempt, so its
    /// error is the server's own (refused, no such database, a failed password): a server that
    /// cannot be reached gives [`StoreError::Unavailable`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = url
            .parse::<PgConnectOptions>()
            .map_err(|e| StoreError::Other(Box::new(BadUrl(e.to_string()))))?
            .application_name("mindroom-billing cutover compare")
            .statement_cache_capacity(0)
            .disable_statement_logging();
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(map_sqlx)?;
        Ok(Self { pool })
    }

    /// Every subscription the Node service holds (those with a Stripe subscription id), by id, with
    /// its account's customer and all its `instances` rows. One read-only transaction: a
    /// consistent snapshot even while the Node service writes.
    pub async fn subscriptions(&self) -> Result<Vec<NodeSubscription>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(map_sqlx)?;
        sqlx::query("set transaction isolation level repeatable read, read only")
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx)?;
        let rows = sqlx::query(READ).fetch_all(&mut *tx).await.map_err(map_sqlx)?;
        tx.rollback().await.map_err(map_sqlx)?;
        let mut subscriptions: Vec<NodeSubscription> = Vec::new();
        for row in &rows {
            let id: String = row.try_get(0).map_err(map_sqlx)?;
            if subscriptions.last().is_none_or(|s| s.subscription_id != id) {
                subscriptions.push(NodeSubscription {
                    subscription_id: id,
                    customer_id: row.try_get(1).map_err(map_sqlx)?,
                    tier: row.try_get(2).map_err(map_sqlx)?,
                    status: row.try_get(3).map_err(map_sqlx)?,
                    max_agents: row.try_get(4).map_err(map_sqlx)?,
                    max_messages_per_day: row.try_get(5).map_err(map_sqlx)?,
                    instances: Vec::new(),
                });
            }
            let instance: Option<Uuid> = row.try_get(6).map_err(map_sqlx)?;
            if let (Some(id), Some(current)) = (instance, subscriptions.last_mut()) {
                current.instances.push(NodeInstance {
                    id,
                    app_name: row.try_get(7).map_err(map_sqlx)?,
                    status: row.try_get(8).map_err(map_sqlx)?,
                    memory_mb: row.try_get(9).map_err(map_sqlx)?,
                    cpu_millis: row.try_get(10).map_err(map_sqlx)?,
                    created_at: row.try_get::<Option<DateTime<Utc>>, _>(11).map_err(map_sqlx)?,
                });
            }
        }
        Ok(subscriptions)
    }

    /// Closes the connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}
