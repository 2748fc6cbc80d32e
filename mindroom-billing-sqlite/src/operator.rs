//! The [`OperatorStore`] port.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mindroom_billing_core::operator::{Operator, OperatorRole, OperatorSession, SessionCutoff};
use mindroom_billing_core::{
    Account, AuditEntry, DriftRecord, InstanceRecord, Job, OperatorStore, StoreError, StoredEvent, SubscriptionState,
};
use rusqlite::params;

use crate::SqliteStore;
use crate::rows::instant;
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

    async fn open_disputes(&self, limit: u32) -> Result<Vec<SubscriptionState>, StoreError> {
        // Only aggregates that ever had a dispute carry `disputes` (rare); which are open and their
        // order are decided on the values, as the other stores do.
        let with_disputes = self
            .read(move |conn| {
                let mut stmt = conn
                    .prepare_cached(&format!(
                        "select {SUBSCRIPTION_COLUMNS} from subscriptions \
                         where json_extract(state, '$.disputes') is not null"
                    ))
                    .map_err(sql)?;
                collect(&mut stmt, [], rows::subscription)
            })
            .await?;
        let mut open: Vec<(Option<chrono::DateTime<chrono::Utc>>, SubscriptionState)> = with_disputes
            .into_iter()
            .filter_map(|s| s.open_disputes().first().map(|d| d.evidence_due_by).map(|due| (due, s)))
            .collect();
        open.sort_by(|(a, x), (b, y)| (a.is_none(), a, &x.subscription_id).cmp(&(b.is_none(), b, &y.subscription_id)));
        Ok(open.into_iter().map(|(_, s)| s).take(usize::try_from(limit).unwrap_or(usize::MAX)).collect())
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
    async fn search_customers(&self, text: &str, limit: u32) -> Result<Vec<String>, StoreError> {
        if text.is_empty() {
            return Ok(vec![]);
        }
        let (text, needle) = (text.to_owned(), text.to_lowercase());
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "select stripe_customer_id from accounts \
                     where instr(email_lower, ?1) > 0 or instr(reference_lower, ?1) > 0",
                )
                .map_err(sql)?;
            let mut found: std::collections::BTreeSet<String> =
                collect(&mut stmt, [&needle], |r| r.get(0).map_err(sql))?.into_iter().collect();
            if text.starts_with("in_") {
                let mut stmt = conn
                    .prepare_cached(&format!(
                        "select {SUBSCRIPTION_COLUMNS} from subscriptions where instr(state, ?1) > 0"
                    ))
                    .map_err(sql)?;
                for s in collect(&mut stmt, [&text], rows::subscription)? {
                    let names = s.failures.iter().any(|f| f.invoice_id.as_deref() == Some(text.as_str()))
                        || s.paid_invoices.iter().any(|p| p.invoice_id == text);
                    if names {
                        found.insert(s.customer_id);
                    }
                }
            }
            Ok(found.into_iter().take(usize::try_from(limit).unwrap_or(usize::MAX)).collect())
        })
        .await
    }

    async fn load_job(&self, job_id: i64) -> Result<Option<Job>, StoreError> {
        self.read(move |conn| {
            let mut stmt =
                conn.prepare_cached(&format!("select {JOB_COLUMNS} from jobs where id = ?1")).map_err(sql)?;
            Ok(collect(&mut stmt, [job_id], rows::job)?.pop())
        })
        .await
    }

    async fn add_operator(&self, operator: &Operator) -> Result<bool, StoreError> {
        let operator = operator.clone();
        self.write(move |tx| {
            let added = tx
                .execute(
                    "insert into operators (name, role, password_hash, created_at) values (?1, ?2, ?3, ?4) \
                     on conflict (name) do nothing",
                    params![operator.name, operator.role.as_str(), operator.password_hash, micros(operator.created_at)],
                )
                .map_err(sql)?;
            Ok(added == 1)
        })
        .await
    }

    async fn load_operator(&self, name: &str) -> Result<Option<Operator>, StoreError> {
        let name = name.to_owned();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached("select name, role, password_hash, created_at from operators where name = ?1")
                .map_err(sql)?;
            Ok(collect(&mut stmt, [name], operator)?.pop())
        })
        .await
    }

    async fn list_operators(&self) -> Result<Vec<Operator>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached("select name, role, password_hash, created_at from operators order by name")
                .map_err(sql)?;
            collect(&mut stmt, [], operator)
        })
        .await
    }

    async fn set_operator_password(
        &self,
        name: &str,
        password_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let (name, hash, now) = (name.to_owned(), password_hash.to_owned(), micros(now));
        self.write(move |tx| {
            let changed = tx
                .execute("update operators set password_hash = ?2 where name = ?1", params![name, hash])
                .map_err(sql)?;
            if changed == 1 {
                end_sessions_of(tx, &name, now)?;
            }
            Ok(changed == 1)
        })
        .await
    }

    async fn remove_operator(&self, name: &str, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let (name, now) = (name.to_owned(), micros(now));
        self.write(move |tx| {
            let removed = tx.execute("delete from operators where name = ?1", [&name]).map_err(sql)?;
            if removed == 1 {
                end_sessions_of(tx, &name, now)?;
            }
            Ok(removed == 1)
        })
        .await
    }

    async fn create_session(&self, session: &OperatorSession) -> Result<(), StoreError> {
        let s = session.clone();
        self.write(move |tx| {
            tx.execute(
                "insert into sessions (id, operator, role, created_at, last_seen, ended_at) \
                 values (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    s.id,
                    s.operator,
                    s.role.as_str(),
                    micros(s.created_at),
                    micros(s.last_seen),
                    s.ended_at.map(micros)
                ],
            )
            .map_err(sql)?;
            Ok(())
        })
        .await
    }

    async fn touch_session(&self, id: &str, cutoff: &SessionCutoff) -> Result<Option<OperatorSession>, StoreError> {
        let (id, cutoff) = (id.to_owned(), *cutoff);
        self.write(move |tx| {
            let mut stmt = tx
                .prepare_cached(
                    "select id, operator, role, created_at, last_seen, ended_at from sessions \
                     where id = ?1 and ended_at is null",
                )
                .map_err(sql)?;
            let Some(mut session) = collect(&mut stmt, [&id], session)?.pop() else { return Ok(None) };
            if session.last_seen < cutoff.idle_since || session.created_at < cutoff.opened_since {
                tx.execute("update sessions set ended_at = ?2 where id = ?1", params![id, micros(cutoff.now)])
                    .map_err(sql)?;
                return Ok(None);
            }
            session.last_seen = session.last_seen.max(cutoff.now);
            tx.execute("update sessions set last_seen = ?2 where id = ?1", params![id, micros(session.last_seen)])
                .map_err(sql)?;
            Ok(Some(session))
        })
        .await
    }

    async fn end_session(&self, id: &str, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let (id, now) = (id.to_owned(), micros(now));
        self.write(move |tx| {
            let ended = tx
                .execute("update sessions set ended_at = ?2 where id = ?1 and ended_at is null", params![id, now])
                .map_err(sql)?;
            Ok(ended == 1)
        })
        .await
    }
}

/// Ends the live sessions of operator `name` at `now`.
fn end_sessions_of(tx: &rusqlite::Transaction<'_>, name: &str, now: i64) -> Result<(), StoreError> {
    tx.execute("update sessions set ended_at = ?2 where operator = ?1 and ended_at is null", params![name, now])
        .map_err(sql)?;
    Ok(())
}

fn role(text: &str) -> Result<OperatorRole, StoreError> {
    OperatorRole::parse(text).ok_or_else(|| crate::undecodable(text))
}

fn operator(r: &rusqlite::Row<'_>) -> Result<Operator, StoreError> {
    Ok(Operator {
        name: r.get(0).map_err(sql)?,
        role: role(&r.get::<_, String>(1).map_err(sql)?)?,
        password_hash: r.get(2).map_err(sql)?,
        created_at: instant(r.get(3).map_err(sql)?)?,
    })
}

fn session(r: &rusqlite::Row<'_>) -> Result<OperatorSession, StoreError> {
    let ended: Option<i64> = r.get(5).map_err(sql)?;
    Ok(OperatorSession {
        id: r.get(0).map_err(sql)?,
        operator: r.get(1).map_err(sql)?,
        role: role(&r.get::<_, String>(2).map_err(sql)?)?,
        created_at: instant(r.get(3).map_err(sql)?)?,
        last_seen: instant(r.get(4).map_err(sql)?)?,
        ended_at: ended.map(instant).transpose()?,
    })
}
