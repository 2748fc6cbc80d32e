//! Writing a whole store's contents into PostgreSQL (`mindroom-billing store copy --to postgres://…`):
//! the core's [`transfer`](mindroom_billing_core::transfer) values as rows, in batches, into an empty,
//! migrated database. The public tables other services read (`accounts`, `subscriptions`,
//! `instances`) are filled as the store's own functions fill them.

use chrono::Utc;
use mindroom_billing_core::transfer::{EventRecord, StateRecords, TransferCounts};
use mindroom_billing_core::{Job, StoreError, SubscriptionStatus};
use serde_json::{Value, json};
use sqlx::Row;

use crate::pg::{PgStore, map_sqlx, quote_literal};
use crate::wire::{instance_public, subscription_public};

/// Rows per statement.
const BATCH: usize = 500;

/// The target already holds billing data.
#[derive(Debug, thiserror::Error)]
#[error("the target database already holds billing data ({0} events, aggregates or jobs): copy into an empty one")]
pub struct NotEmpty(pub u64);

fn encode<T: serde::Serialize>(value: &T) -> Result<Value, StoreError> {
    serde_json::to_value(value).map_err(|e| StoreError::Other(Box::new(e)))
}

impl PgStore {
    /// Runs `sql` once per batch of `rows`, `$ROWS` standing for the batch as a jsonb array.
    async fn insert_rows(&self, sql: &str, rows: Vec<Value>) -> Result<(), StoreError> {
        for batch in rows.chunks(BATCH) {
            let literal = format!("{}::jsonb", quote_literal(&Value::Array(batch.to_vec()).to_string()));
            sqlx::raw_sql(&sql.replace("$ROWS", &literal)).execute(&self.pool).await.map_err(map_sqlx)?;
        }
        Ok(())
    }

    async fn count(&self, sql: &str) -> Result<u64, StoreError> {
        let row = sqlx::raw_sql(sql).fetch_one(&self.pool).await.map_err(map_sqlx)?;
        let n: i64 = row.try_get(0).map_err(map_sqlx)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Refuses ([`NotEmpty`]) a database that holds events, aggregates or jobs already.
    pub async fn ensure_empty(&self) -> Result<(), StoreError> {
        let n = self
            .count(
                "select (select count(*) from public.billing_events) + \
                 (select count(*) from public.billing_subscription_state) + (select count(*) from public.billing_jobs)",
            )
            .await?;
        if n > 0 {
            return Err(StoreError::Other(Box::new(NotEmpty(n))));
        }
        Ok(())
    }

    /// Inserts events as they are (status, reason, deliveries, payload byte for byte).
    pub async fn import_events(&self, events: &[EventRecord]) -> Result<(), StoreError> {
        let rows = events
            .iter()
            .map(|r| {
                let e = &r.event;
                json!({
                    "id": e.id, "type": e.event_type, "created": e.created, "api_version": r.api_version,
                    "livemode": r.livemode, "status": e.status.as_str(), "reason": e.reason, "payload": e.payload,
                    "received_at": e.received_at, "processed_at": e.processed_at, "deliveries": e.deliveries,
                    "source": e.source.as_str(),
                })
            })
            .collect();
        self.insert_rows(
            "insert into public.billing_events (id, type, created, api_version, livemode, status, reason, payload, \
             received_at, processed_at, deliveries, source, customer_id) \
             select r.id, r.type, r.created, r.api_version, r.livemode, r.status, r.reason, r.payload, r.received_at, \
             r.processed_at, r.deliveries, r.source, \
             case when r.payload <> '' then public.billing_event_customer(r.payload) end \
             from jsonb_to_recordset($ROWS) as r(id text, type text, created timestamptz, api_version text, \
             livemode boolean, status text, reason text, payload text, received_at timestamptz, \
             processed_at timestamptz, deliveries integer, source text)",
            rows,
        )
        .await
    }

    /// Inserts jobs as they are (ids, states, attempts, leases), then moves the id sequence past them.
    pub async fn import_jobs(&self, jobs: &[Job]) -> Result<(), StoreError> {
        let rows = jobs
            .iter()
            .map(|j| {
                Ok(json!({
                    "id": j.id, "key": j.key, "grp": j.group, "kind": encode(&j.kind)?, "state": j.state.as_str(),
                    "attempts": j.attempts, "run_after": j.run_after, "locked_until": j.locked_until,
                    "last_error": j.last_error, "created_at": j.created_at, "updated_at": j.updated_at,
                }))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.insert_rows(
            "insert into public.billing_jobs (id, key, grp, kind, state, attempts, run_after, locked_until, \
             last_error, created_at, updated_at) \
             select r.id, r.key, r.grp, r.kind, r.state, r.attempts, r.run_after, r.locked_until, r.last_error, \
             r.created_at, r.updated_at \
             from jsonb_to_recordset($ROWS) as r(id bigint, key text, grp text, kind jsonb, state text, \
             attempts integer, run_after timestamptz, locked_until timestamptz, last_error text, \
             created_at timestamptz, updated_at timestamptz); \
             select pg_catalog.setval(pg_catalog.pg_get_serial_sequence('public.billing_jobs', 'id'), \
             greatest((select max(id) from public.billing_jobs), 1))",
            rows,
        )
        .await
    }

    /// Inserts everything else: accounts, aggregates (with their versions) and their public rows,
    /// instance records and their public rows, usage, cursors, audit and drift.
    pub async fn import_state(&self, state: &StateRecords) -> Result<(), StoreError> {
        #[allow(clippy::disallowed_methods)] // the public rows' timestamps: when they were copied
        let now = Utc::now();
        let accounts = state
            .accounts
            .iter()
            .map(|r| {
                let a = &r.account;
                json!({"id": a.id, "stripe_customer_id": a.stripe_customer_id, "email": a.email,
                       "client_reference_id": a.reference, "observed_at": r.email_observed_at})
            })
            .collect();
        self.insert_rows(
            "insert into public.accounts (id, stripe_customer_id, email, client_reference_id, \
             billing_email_observed_at) \
             select r.id, r.stripe_customer_id, r.email, r.client_reference_id, r.observed_at \
             from jsonb_to_recordset($ROWS) as r(id uuid, stripe_customer_id text, email text, \
             client_reference_id text, observed_at timestamptz) on conflict do nothing",
            accounts,
        )
        .await?;
        let subscriptions = state
            .subscriptions
            .iter()
            .map(|s| {
                let mut value = encode(s)?;
                if let Some(obj) = value.as_object_mut() {
                    obj.remove("version"); // kept in its own column
                }
                Ok(json!({
                    "id": s.subscription_id, "customer_id": s.customer_id, "account_id": s.account_id,
                    "version": s.version, "state": value, "grace_ends_at": s.grace.map(|g| g.ends_at),
                    "grace_expiry_handled": s.grace_expiry_handled,
                    "terminal": s.status().is_some_and(SubscriptionStatus::is_terminal),
                    "public": subscription_public(s, now), "now": now,
                }))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.insert_rows(
            "insert into public.billing_subscription_state (subscription_id, customer_id, account_id, version, \
             state, grace_ends_at, grace_expiry_handled, terminal, updated_at) \
             select r.id, r.customer_id, r.account_id, r.version, r.state, r.grace_ends_at, r.grace_expiry_handled, \
             r.terminal, r.now \
             from jsonb_to_recordset($ROWS) as r(id text, customer_id text, account_id uuid, version bigint, \
             state jsonb, grace_ends_at timestamptz, grace_expiry_handled boolean, terminal boolean, now timestamptz); \
             insert into public.subscriptions (account_id, stripe_subscription_id, stripe_price_id, tier, status, \
             max_agents, max_messages_per_day, entitlement_status, current_period_end, trial_ends_at, cancelled_at, \
             grace_period_ends_at, created_at, updated_at) \
             select a.id, r.id, r.public ->> 'stripe_price_id', r.public ->> 'tier', r.public ->> 'status', \
             (r.public ->> 'max_agents')::integer, (r.public ->> 'max_messages_per_day')::integer, \
             r.public ->> 'entitlement_status', (r.public ->> 'current_period_end')::timestamptz, \
             (r.public ->> 'trial_ends_at')::timestamptz, (r.public ->> 'cancelled_at')::timestamptz, \
             (r.public ->> 'grace_period_ends_at')::timestamptz, r.now, r.now \
             from jsonb_to_recordset($ROWS) as r(id text, customer_id text, public jsonb, now timestamptz) \
             left join public.accounts a on a.stripe_customer_id = r.customer_id \
             on conflict (stripe_subscription_id) do nothing",
            subscriptions,
        )
        .await?;
        let instances = state
            .instances
            .iter()
            .map(|i| {
                Ok(json!({"subscription_id": i.subscription_id, "record": encode(i)?, "public": instance_public(i),
                          "now": now}))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.insert_rows(
            "with r as (select * from jsonb_to_recordset($ROWS) as r(subscription_id text, record jsonb, \
             public jsonb, now timestamptz)), \
             i as (insert into public.billing_instances (subscription_id, record, updated_at) \
                   select r.subscription_id, r.record, r.now from r returning subscription_id, instance_id) \
             insert into public.instances (id, subscription_id, dokku_app_name, subdomain, status, frontend_url, \
             backend_url, memory_limit_mb, cpu_limit, deprovisioned_at, created_at, updated_at) \
             select i.instance_id, s.id, r.public ->> 'dokku_app_name', r.public ->> 'subdomain', \
             r.public ->> 'status', r.public ->> 'frontend_url', r.public ->> 'backend_url', \
             (r.public ->> 'memory_limit_mb')::integer, (r.public ->> 'cpu_limit')::numeric, \
             (r.public ->> 'deprovisioned_at')::timestamptz, r.now, r.now \
             from i join r using (subscription_id) \
             left join public.subscriptions s on s.stripe_subscription_id = r.subscription_id",
            instances,
        )
        .await?;
        let usage = state
            .usage
            .iter()
            .map(|u| json!({"account_id": u.key.account_id, "metric": u.key.metric.as_str(), "day": u.key.day, "count": u.count}))
            .collect();
        self.insert_rows(
            "insert into public.billing_usage (account_id, metric, day, count) \
             select r.account_id, r.metric, r.day, r.count \
             from jsonb_to_recordset($ROWS) as r(account_id uuid, metric text, day date, count bigint)",
            usage,
        )
        .await?;
        let keys = state
            .usage_keys
            .iter()
            .map(|u| {
                json!({"account_id": u.account_id, "metric": u.metric.as_str(), "key": u.key,
                       "requested_at": u.requested_at, "count": u.count, "used": u.used})
            })
            .collect();
        self.insert_rows(
            "insert into public.billing_usage_keys (account_id, metric, key, requested_at, count, used) \
             select r.account_id, r.metric, r.key, r.requested_at, r.count, r.used \
             from jsonb_to_recordset($ROWS) as r(account_id uuid, metric text, key text, requested_at timestamptz, \
             count bigint, used bigint)",
            keys,
        )
        .await?;
        let cursors = state
            .cursors
            .iter()
            .map(|(name, c)| json!({"name": name, "created": c.created, "saved_at": c.saved_at}))
            .collect();
        self.insert_rows(
            "insert into public.billing_sync_state (name, cursor_created, cursor_saved_at) \
             select r.name, r.created, r.saved_at \
             from jsonb_to_recordset($ROWS) as r(name text, created timestamptz, saved_at timestamptz)",
            cursors,
        )
        .await?;
        let audit = state.audit.iter().map(encode).collect::<Result<Vec<_>, StoreError>>()?;
        self.insert_rows(
            "insert into public.billing_audit (at, actor, action, target, customer_id, ok, result) \
             select r.at, r.actor, r.action, r.target, r.customer_id, r.ok, r.result \
             from jsonb_to_recordset($ROWS) with ordinality as r(at timestamptz, actor text, action text, \
             target text, customer_id text, ok boolean, result text, n bigint) order by r.n",
            audit,
        )
        .await?;
        let drift = state.drift.iter().map(encode).collect::<Result<Vec<_>, StoreError>>()?;
        self.insert_rows(
            "insert into public.billing_drift (subscription_id, field, before, after, found_at) \
             select r.subscription_id, r.field, r.before, r.after, r.found_at \
             from jsonb_to_recordset($ROWS) as r(subscription_id text, field text, before text, after text, \
             found_at timestamptz)",
            drift,
        )
        .await
    }

    /// How many rows of each kind the database holds (accounts: those with a Stripe customer).
    pub async fn transfer_counts(&self) -> Result<TransferCounts, StoreError> {
        let row = sqlx::raw_sql(
            "select (select count(*) from public.billing_events), \
             (select count(*) from public.billing_subscription_state), \
             (select count(*) from public.accounts where stripe_customer_id is not null), \
             (select count(*) from public.billing_instances), (select count(*) from public.billing_jobs), \
             (select count(*) from public.billing_usage), (select count(*) from public.billing_usage_keys), \
             (select count(*) from public.billing_sync_state where cursor_created is not null), \
             (select count(*) from public.billing_audit), (select count(*) from public.billing_drift)",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(map_sqlx)?;
        let n = |i: usize| -> Result<u64, StoreError> {
            let v: i64 = row.try_get(i).map_err(map_sqlx)?;
            Ok(u64::try_from(v).unwrap_or(0))
        };
        Ok(TransferCounts {
            events: n(0)?,
            subscriptions: n(1)?,
            accounts: n(2)?,
            instances: n(3)?,
            jobs: n(4)?,
            usage: n(5)?,
            usage_keys: n(6)?,
            cursors: n(7)?,
            audit: n(8)?,
            drift: n(9)?,
        })
    }
}
