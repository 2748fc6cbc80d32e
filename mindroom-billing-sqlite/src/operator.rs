//! The [`OperatorStore`] port.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mindroom_billing_core::{
    Account, AuditEntry, DriftRecord, InstanceRecord, Job, OperatorStore, StoreError, StoredEvent, SubscriptionState,
};
use rusqlite::params;

use crate::SqliteStore;
use crate::rows::{
    self, AUDIT_COLUMNS, DRIFT_COLUMNS, EVENT_COLUMNS, JOB_COLUMNS, SUBSCRIPTION_COLUMNS, collect, micros, sql,
};
use crate::store::{ACCOUNT_COLUMNS, account};

#[async_trait]
impl OperatorStore for SqliteStore {
    async fn accounts_by_email(&self, email: &str, limit: u32) -> Result<Vec<Account>, StoreError> {
        let email = email.to_lowercase();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "select {ACCOUNT_COLUMNS} from accounts where email_lower = ?1 order by stripe_customer_id limit ?2"
                ))
                .map_err(sql)?;
            collect(&mut stmt, params![email, limit], account)
        })
        .await
    }

    async fn instance_by_app(&self, app_name: &str) -> Result<Option<InstanceRecord>, StoreError> {
        let app = app_name.to_owned();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached("select record from instances where app_name = ?1 order by subscription_id limit 1")
                .map_err(sql)?;
            Ok(collect(&mut stmt, [app], rows::instance)?.pop())
        })
        .await
    }

    async fn subscriptions_for_customer(&self, customer_id: &str) -> Result<Vec<SubscriptionState>, StoreError> {
        let customer = customer_id.to_owned();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "select {SUBSCRIPTION_COLUMNS} from subscriptions where customer_id = ?1 order by subscription_id"
                ))
                .map_err(sql)?;
            collect(&mut stmt, [customer], rows::subscription)
        })
        .await
    }

    async fn events_for_customer(&self, customer_id: &str, limit: u32) -> Result<Vec<StoredEvent>, StoreError> {
        let customer = customer_id.to_owned();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "select {EVENT_COLUMNS} from events where customer = ?1 order by received_at desc, id limit ?2"
                ))
                .map_err(sql)?;
            collect(&mut stmt, params![customer, limit], rows::event)
        })
        .await
    }

    async fn jobs_for_subscription(&self, subscription_id: &str, limit: u32) -> Result<Vec<Job>, StoreError> {
        let id = subscription_id.to_owned();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "select {JOB_COLUMNS} from jobs where about = ?1 or (about is null and grp = ?1) \
                     order by created_at desc, id desc limit ?2"
                ))
                .map_err(sql)?;
            collect(&mut stmt, params![id, limit], rows::job)
        })
        .await
    }

    async fn subscriptions_in_grace(&self, limit: u32) -> Result<Vec<SubscriptionState>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "select {SUBSCRIPTION_COLUMNS} from subscriptions where grace_ends_at is not null \
                     and not grace_expiry_handled and not terminal order by grace_ends_at, subscription_id limit ?1"
                ))
                .map_err(sql)?;
            collect(&mut stmt, [limit], rows::subscription)
        })
        .await
    }

    async fn list_subscriptions(&self, after: Option<&str>, limit: u32) -> Result<Vec<SubscriptionState>, StoreError> {
        let after = after.map(str::to_owned);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "select {SUBSCRIPTION_COLUMNS} from subscriptions where ?1 is null or subscription_id > ?1 \
                     order by subscription_id limit ?2"
                ))
                .map_err(sql)?;
            collect(&mut stmt, params![after, limit], rows::subscription)
        })
        .await
    }

    async fn retry_dead_job(&self, job_id: i64, now: DateTime<Utc>) -> Result<Option<Job>, StoreError> {
        let now = micros(now);
        self.write(move |tx| {
            let mut stmt = tx
                .prepare_cached(&format!(
                    "update jobs set state = 'pending', run_after = ?2, locked_until = null, updated_at = ?2 \
                     where id = ?1 and state = 'dead' returning {JOB_COLUMNS}"
                ))
                .map_err(sql)?;
            Ok(collect(&mut stmt, params![job_id, now], rows::job)?.pop())
        })
        .await
    }

    async fn record_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        let entry = entry.clone();
        self.write(move |tx| {
            tx.prepare_cached(
                "insert into audit (at, actor, action, target, customer_id, ok, result) \
                 values (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .map_err(sql)?
            .execute(params![
                micros(entry.at),
                entry.actor,
                entry.action,
                entry.target,
                entry.customer_id,
                entry.ok,
                entry.result
            ])
            .map_err(sql)?;
            Ok(())
        })
        .await
    }

    async fn list_audit(&self, customer_id: Option<&str>, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let customer = customer_id.map(str::to_owned);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "select {AUDIT_COLUMNS} from audit where ?1 is null or customer_id = ?1 order by id desc limit ?2"
                ))
                .map_err(sql)?;
            collect(&mut stmt, params![customer, limit], rows::audit)
        })
        .await
    }

    async fn save_drift(&self, checked: &[String], drift: &[DriftRecord]) -> Result<(), StoreError> {
        let (checked, drift) = (checked.to_vec(), drift.to_vec());
        self.write(move |tx| {
            let mut clear = tx.prepare_cached("delete from drift where subscription_id = ?1").map_err(sql)?;
            let mut add = tx
                .prepare_cached(
                    "insert into drift (subscription_id, field, before, after, found_at) values (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(sql)?;
            for id in &checked {
                clear.execute([id]).map_err(sql)?;
                for d in drift.iter().filter(|d| d.subscription_id == *id) {
                    add.execute(params![d.subscription_id, d.field, d.before, d.after, micros(d.found_at)])
                        .map_err(sql)?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn list_drift(&self, subscription_id: Option<&str>, limit: u32) -> Result<Vec<DriftRecord>, StoreError> {
        let id = subscription_id.map(str::to_owned);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "select {DRIFT_COLUMNS} from drift where ?1 is null or subscription_id = ?1 \
                     order by found_at desc, subscription_id, field limit ?2"
                ))
                .map_err(sql)?;
            collect(&mut stmt, params![id, limit], rows::drift)
        })
        .await
    }
}
