//! Reading the whole store out (`mindroom-billing store copy`): events and jobs in pages, the rest
//! at once, as the core's [`transfer`](mindroom_billing_core::transfer) values.

use chrono::NaiveDate;
use mindroom_billing_core::transfer::{
    AccountRecord, EventRecord, StateRecords, TransferCounts, UsageKeyRecord, UsageRecord,
};
use mindroom_billing_core::{Job, Metric, StoreError, SyncCursor, UsageKey};
use rusqlite::{Connection, params};
use uuid::Uuid;

use crate::rows::{
    self, AUDIT_COLUMNS, DRIFT_COLUMNS, EVENT_COLUMNS, JOB_COLUMNS, SUBSCRIPTION_COLUMNS, collect, instant, sql, to_u64,
};
use crate::store::{ACCOUNT_COLUMNS, account};
use crate::{SqliteStore, undecodable};

fn uuid(text: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(text).map_err(undecodable)
}

fn day(text: &str) -> Result<NaiveDate, StoreError> {
    text.parse().map_err(undecodable)
}

fn metric(text: &str) -> Result<Metric, StoreError> {
    text.parse().map_err(undecodable)
}

fn count(conn: &Connection, table: &str) -> Result<u64, StoreError> {
    let n: i64 = conn.query_row(&format!("select count(*) from {table}"), [], |r| r.get(0)).map_err(sql)?;
    Ok(to_u64(n))
}

impl SqliteStore {
    /// Events whose id sorts after `after`, in id order, at most `limit`.
    pub async fn export_events(&self, after: Option<String>, limit: u32) -> Result<Vec<EventRecord>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare(&format!(
                    "select {EVENT_COLUMNS}, api_version, livemode from events where ?1 is null or id > ?1 \
                     order by id limit ?2"
                ))
                .map_err(sql)?;
            collect(&mut stmt, params![after, limit], |r| {
                Ok(EventRecord {
                    event: rows::event(r)?,
                    api_version: r.get(10).map_err(sql)?,
                    livemode: r.get(11).map_err(sql)?,
                })
            })
        })
        .await
    }

    /// Jobs whose id is above `after`, in id order, at most `limit`.
    pub async fn export_jobs(&self, after: i64, limit: u32) -> Result<Vec<Job>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare(&format!("select {JOB_COLUMNS} from jobs where id > ?1 order by id limit ?2"))
                .map_err(sql)?;
            collect(&mut stmt, params![after, limit], rows::job)
        })
        .await
    }

    /// Everything but the events and jobs.
    pub async fn export_state(&self) -> Result<StateRecords, StoreError> {
        self.read(|conn| {
            let all = |query: &str| conn.prepare(query).map_err(sql);
            let subscriptions = collect(
                &mut all(&format!("select {SUBSCRIPTION_COLUMNS} from subscriptions order by subscription_id"))?,
                [],
                rows::subscription,
            )?;
            let accounts = collect(
                &mut all(&format!(
                    "select {ACCOUNT_COLUMNS}, email_observed_at from accounts order by stripe_customer_id"
                ))?,
                [],
                |r| {
                    let observed: Option<i64> = r.get(4).map_err(sql)?;
                    Ok(AccountRecord { account: account(r)?, email_observed_at: observed.map(instant).transpose()? })
                },
            )?;
            let instances =
                collect(&mut all("select record from instances order by subscription_id")?, [], rows::instance)?;
            let usage = collect(&mut all("select account_id, metric, day, count from usage")?, [], |r| {
                let key = UsageKey {
                    account_id: uuid(&r.get::<_, String>(0).map_err(sql)?)?,
                    metric: metric(&r.get::<_, String>(1).map_err(sql)?)?,
                    day: day(&r.get::<_, String>(2).map_err(sql)?)?,
                };
                Ok(UsageRecord { key, count: to_u64(r.get(3).map_err(sql)?) })
            })?;
            let usage_keys = collect(
                &mut all("select account_id, metric, key, requested_at, count, used from usage_keys")?,
                [],
                |r| {
                    Ok(UsageKeyRecord {
                        account_id: uuid(&r.get::<_, String>(0).map_err(sql)?)?,
                        metric: metric(&r.get::<_, String>(1).map_err(sql)?)?,
                        key: r.get(2).map_err(sql)?,
                        requested_at: instant(r.get(3).map_err(sql)?)?,
                        count: to_u64(r.get(4).map_err(sql)?),
                        used: to_u64(r.get(5).map_err(sql)?),
                    })
                },
            )?;
            let cursors = collect(&mut all("select name, created, saved_at from cursors order by name")?, [], |r| {
                let cursor = SyncCursor {
                    created: instant(r.get(1).map_err(sql)?)?,
                    saved_at: instant(r.get(2).map_err(sql)?)?,
                };
                Ok((r.get(0).map_err(sql)?, cursor))
            })?;
            let audit = collect(&mut all(&format!("select {AUDIT_COLUMNS} from audit order by id"))?, [], rows::audit)?;
            let drift = collect(&mut all(&format!("select {DRIFT_COLUMNS} from drift"))?, [], rows::drift)?;
            Ok(StateRecords { subscriptions, accounts, instances, usage, usage_keys, cursors, audit, drift })
        })
        .await
    }

    /// How many rows of each kind the store holds.
    pub async fn transfer_counts(&self) -> Result<TransferCounts, StoreError> {
        self.read(|conn| {
            Ok(TransferCounts {
                events: count(conn, "events")?,
                subscriptions: count(conn, "subscriptions")?,
                accounts: count(conn, "accounts")?,
                instances: count(conn, "instances")?,
                jobs: count(conn, "jobs")?,
                usage: count(conn, "usage")?,
                usage_keys: count(conn, "usage_keys")?,
                cursors: count(conn, "cursors")?,
                audit: count(conn, "audit")?,
                drift: count(conn, "drift")?,
            })
        })
        .await
    }
}
