//! The operator port ([`OperatorStore`]) over the same RPC contract: one SQL function per method
//! (`migrations/20261206000000_billing_console.sql`, `20261211000000_billing_list_subscriptions.sql`), shared
//! by both clients.
//!
//! [`OperatorStore`]: mindroom_billing_core::OperatorStore

use chrono::{DateTime, Utc};
use mindroom_billing_core::ports::StoreError;
use mindroom_billing_core::{
    Account, AuditEntry, DriftRecord, InstanceRecord, Job, Operator, OperatorSession, SessionCutoff, StoredEvent,
    SubscriptionState,
};
use serde_json::json;

use super::{Rpc, decode, decode_opt, encode};

pub(crate) async fn accounts_by_email<R: Rpc + ?Sized>(
    rpc: &R,
    email: &str,
    limit: u32,
) -> Result<Vec<Account>, StoreError> {
    const F: &str = "billing_accounts_by_email";
    decode(F, rpc.call(F, json!({ "email": email, "limit": limit.to_string() })).await?)
}

pub(crate) async fn search_customers<R: Rpc + ?Sized>(
    rpc: &R,
    text: &str,
    limit: u32,
) -> Result<Vec<String>, StoreError> {
    const F: &str = "billing_search_customers";
    decode(F, rpc.call(F, json!({ "text": text, "limit": limit.to_string() })).await?)
}

pub(crate) async fn instance_by_app<R: Rpc + ?Sized>(
    rpc: &R,
    app_name: &str,
) -> Result<Option<InstanceRecord>, StoreError> {
    const F: &str = "billing_instance_by_app";
    decode_opt(F, rpc.call(F, json!({ "app_name": app_name })).await?)
}

pub(crate) async fn subscriptions_for_customer<R: Rpc + ?Sized>(
    rpc: &R,
    customer_id: &str,
) -> Result<Vec<SubscriptionState>, StoreError> {
    const F: &str = "billing_subscriptions_for_customer";
    decode(F, rpc.call(F, json!({ "customer_id": customer_id })).await?)
}

pub(crate) async fn events_for_customer<R: Rpc + ?Sized>(
    rpc: &R,
    customer_id: &str,
    limit: u32,
) -> Result<Vec<StoredEvent>, StoreError> {
    const F: &str = "billing_events_for_customer";
    decode(F, rpc.call(F, json!({ "customer_id": customer_id, "limit": limit.to_string() })).await?)
}

pub(crate) async fn jobs_for_subscription<R: Rpc + ?Sized>(
    rpc: &R,
    subscription_id: &str,
    limit: u32,
) -> Result<Vec<Job>, StoreError> {
    const F: &str = "billing_jobs_for_subscription";
    decode(F, rpc.call(F, json!({ "subscription_id": subscription_id, "limit": limit.to_string() })).await?)
}

pub(crate) async fn load_job<R: Rpc + ?Sized>(rpc: &R, job_id: i64) -> Result<Option<Job>, StoreError> {
    const F: &str = "billing_load_job";
    decode_opt(F, rpc.call(F, json!({ "job_id": job_id.to_string() })).await?)
}

pub(crate) async fn subscriptions_in_grace<R: Rpc + ?Sized>(
    rpc: &R,
    limit: u32,
) -> Result<Vec<SubscriptionState>, StoreError> {
    const F: &str = "billing_subscriptions_in_grace";
    decode(F, rpc.call(F, json!({ "limit": limit.to_string() })).await?)
}

pub(crate) async fn list_subscriptions<R: Rpc + ?Sized>(
    rpc: &R,
    after: Option<&str>,
    limit: u32,
) -> Result<Vec<SubscriptionState>, StoreError> {
    const F: &str = "billing_list_subscriptions";
    decode(F, rpc.call(F, json!({ "after": after, "limit": limit.to_string() })).await?)
}

pub(crate) async fn open_disputes<R: Rpc + ?Sized>(rpc: &R, limit: u32) -> Result<Vec<SubscriptionState>, StoreError> {
    const F: &str = "billing_open_disputes";
    decode(F, rpc.call(F, json!({ "limit": limit.to_string() })).await?)
}

pub(crate) async fn retry_dead_job<R: Rpc + ?Sized>(
    rpc: &R,
    job_id: i64,
    now: DateTime<Utc>,
) -> Result<Option<Job>, StoreError> {
    const F: &str = "billing_retry_dead_job";
    decode_opt(F, rpc.call(F, json!({ "job_id": job_id.to_string(), "now": now })).await?)
}

pub(crate) async fn record_audit<R: Rpc + ?Sized>(rpc: &R, entry: &AuditEntry) -> Result<(), StoreError> {
    const F: &str = "billing_record_audit";
    rpc.call(F, encode(F, entry)?).await.map(drop)
}

pub(crate) async fn list_audit<R: Rpc + ?Sized>(
    rpc: &R,
    customer_id: Option<&str>,
    limit: u32,
) -> Result<Vec<AuditEntry>, StoreError> {
    const F: &str = "billing_list_audit";
    decode(F, rpc.call(F, json!({ "customer_id": customer_id, "limit": limit.to_string() })).await?)
}

pub(crate) async fn save_drift<R: Rpc + ?Sized>(
    rpc: &R,
    checked: &[String],
    drift: &[DriftRecord],
) -> Result<(), StoreError> {
    const F: &str = "billing_save_drift";
    rpc.call(F, json!({ "checked": checked, "drift": encode(F, &drift)? })).await.map(drop)
}

pub(crate) async fn list_drift<R: Rpc + ?Sized>(
    rpc: &R,
    subscription_id: Option<&str>,
    limit: u32,
) -> Result<Vec<DriftRecord>, StoreError> {
    const F: &str = "billing_list_drift";
    decode(F, rpc.call(F, json!({ "subscription_id": subscription_id, "limit": limit.to_string() })).await?)
}

pub(crate) async fn add_operator<R: Rpc + ?Sized>(rpc: &R, operator: &Operator) -> Result<bool, StoreError> {
    const F: &str = "billing_add_operator";
    decode(F, rpc.call(F, encode(F, operator)?).await?)
}

pub(crate) async fn load_operator<R: Rpc + ?Sized>(rpc: &R, name: &str) -> Result<Option<Operator>, StoreError> {
    const F: &str = "billing_load_operator";
    decode_opt(F, rpc.call(F, json!({ "name": name })).await?)
}

pub(crate) async fn list_operators<R: Rpc + ?Sized>(rpc: &R) -> Result<Vec<Operator>, StoreError> {
    const F: &str = "billing_list_operators";
    decode(F, rpc.call(F, json!({})).await?)
}

pub(crate) async fn set_operator_password<R: Rpc + ?Sized>(
    rpc: &R,
    name: &str,
    password_hash: &str,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    const F: &str = "billing_set_operator_password";
    decode(F, rpc.call(F, json!({ "name": name, "password_hash": password_hash, "now": now })).await?)
}

pub(crate) async fn remove_operator<R: Rpc + ?Sized>(
    rpc: &R,
    name: &str,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    const F: &str = "billing_remove_operator";
    decode(F, rpc.call(F, json!({ "name": name, "now": now })).await?)
}

pub(crate) async fn create_session<R: Rpc + ?Sized>(rpc: &R, session: &OperatorSession) -> Result<(), StoreError> {
    const F: &str = "billing_create_session";
    rpc.call(F, encode(F, session)?).await.map(drop)
}

pub(crate) async fn touch_session<R: Rpc + ?Sized>(
    rpc: &R,
    id: &str,
    cutoff: &SessionCutoff,
) -> Result<Option<OperatorSession>, StoreError> {
    const F: &str = "billing_touch_session";
    let p =
        json!({ "id": id, "now": cutoff.now, "idle_since": cutoff.idle_since, "opened_since": cutoff.opened_since });
    decode_opt(F, rpc.call(F, p).await?)
}

pub(crate) async fn end_session<R: Rpc + ?Sized>(rpc: &R, id: &str, now: DateTime<Utc>) -> Result<bool, StoreError> {
    const F: &str = "billing_end_session";
    decode(F, rpc.call(F, json!({ "id": id, "now": now })).await?)
}

/// Implements [`mindroom_billing_core::OperatorStore`] for a type that implements [`Rpc`].
macro_rules! impl_operator_store_via_rpc {
    ($ty:ty) => {
        #[async_trait::async_trait]
        impl mindroom_billing_core::OperatorStore for $ty {
            async fn accounts_by_email(
                &self,
                email: &str,
                limit: u32,
            ) -> Result<Vec<mindroom_billing_core::Account>, mindroom_billing_core::StoreError> {
                crate::wire::operator::accounts_by_email(self, email, limit).await
            }
            async fn search_customers(
                &self,
                text: &str,
                limit: u32,
            ) -> Result<Vec<String>, mindroom_billing_core::StoreError> {
                crate::wire::operator::search_customers(self, text, limit).await
            }
            async fn instance_by_app(
                &self,
                app_name: &str,
            ) -> Result<Option<mindroom_billing_core::InstanceRecord>, mindroom_billing_core::StoreError> {
                crate::wire::operator::instance_by_app(self, app_name).await
            }
            async fn subscriptions_for_customer(
                &self,
                customer_id: &str,
            ) -> Result<Vec<mindroom_billing_core::SubscriptionState>, mindroom_billing_core::StoreError> {
                crate::wire::operator::subscriptions_for_customer(self, customer_id).await
            }
            async fn events_for_customer(
                &self,
                customer_id: &str,
                limit: u32,
            ) -> Result<Vec<mindroom_billing_core::StoredEvent>, mindroom_billing_core::StoreError> {
                crate::wire::operator::events_for_customer(self, customer_id, limit).await
            }
            async fn jobs_for_subscription(
                &self,
                subscription_id: &str,
                limit: u32,
            ) -> Result<Vec<mindroom_billing_core::Job>, mindroom_billing_core::StoreError> {
                crate::wire::operator::jobs_for_subscription(self, subscription_id, limit).await
            }
            async fn load_job(
                &self,
                job_id: i64,
            ) -> Result<Option<mindroom_billing_core::Job>, mindroom_billing_core::StoreError> {
                crate::wire::operator::load_job(self, job_id).await
            }
            async fn subscriptions_in_grace(
                &self,
                limit: u32,
            ) -> Result<Vec<mindroom_billing_core::SubscriptionState>, mindroom_billing_core::StoreError> {
                crate::wire::operator::subscriptions_in_grace(self, limit).await
            }
            async fn list_subscriptions(
                &self,
                after: Option<&str>,
                limit: u32,
            ) -> Result<Vec<mindroom_billing_core::SubscriptionState>, mindroom_billing_core::StoreError> {
                crate::wire::operator::list_subscriptions(self, after, limit).await
            }
            async fn open_disputes(
                &self,
                limit: u32,
            ) -> Result<Vec<mindroom_billing_core::SubscriptionState>, mindroom_billing_core::StoreError> {
                crate::wire::operator::open_disputes(self, limit).await
            }
            async fn retry_dead_job(
                &self,
                job_id: i64,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<Option<mindroom_billing_core::Job>, mindroom_billing_core::StoreError> {
                crate::wire::operator::retry_dead_job(self, job_id, now).await
            }
            async fn record_audit(
                &self,
                entry: &mindroom_billing_core::AuditEntry,
            ) -> Result<(), mindroom_billing_core::StoreError> {
                crate::wire::operator::record_audit(self, entry).await
            }
            async fn list_audit(
                &self,
                customer_id: Option<&str>,
                limit: u32,
            ) -> Result<Vec<mindroom_billing_core::AuditEntry>, mindroom_billing_core::StoreError> {
                crate::wire::operator::list_audit(self, customer_id, limit).await
            }
            async fn save_drift(
                &self,
                checked: &[String],
                drift: &[mindroom_billing_core::DriftRecord],
            ) -> Result<(), mindroom_billing_core::StoreError> {
                crate::wire::operator::save_drift(self, checked, drift).await
            }
            async fn list_drift(
                &self,
                subscription_id: Option<&str>,
                limit: u32,
            ) -> Result<Vec<mindroom_billing_core::DriftRecord>, mindroom_billing_core::StoreError> {
                crate::wire::operator::list_drift(self, subscription_id, limit).await
            }
            async fn add_operator(
                &self,
                operator: &mindroom_billing_core::Operator,
            ) -> Result<bool, mindroom_billing_core::StoreError> {
                crate::wire::operator::add_operator(self, operator).await
            }
            async fn load_operator(
                &self,
                name: &str,
            ) -> Result<Option<mindroom_billing_core::Operator>, mindroom_billing_core::StoreError> {
                crate::wire::operator::load_operator(self, name).await
            }
            async fn list_operators(
                &self,
            ) -> Result<Vec<mindroom_billing_core::Operator>, mindroom_billing_core::StoreError> {
                crate::wire::operator::list_operators(self).await
            }
            async fn set_operator_password(
                &self,
                name: &str,
                password_hash: &str,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<bool, mindroom_billing_core::StoreError> {
                crate::wire::operator::set_operator_password(self, name, password_hash, now).await
            }
            async fn remove_operator(
                &self,
                name: &str,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<bool, mindroom_billing_core::StoreError> {
                crate::wire::operator::remove_operator(self, name, now).await
            }
            async fn create_session(
                &self,
                session: &mindroom_billing_core::OperatorSession,
            ) -> Result<(), mindroom_billing_core::StoreError> {
                crate::wire::operator::create_session(self, session).await
            }
            async fn touch_session(
                &self,
                id: &str,
                cutoff: &mindroom_billing_core::SessionCutoff,
            ) -> Result<Option<mindroom_billing_core::OperatorSession>, mindroom_billing_core::StoreError> {
                crate::wire::operator::touch_session(self, id, cutoff).await
            }
            async fn end_session(
                &self,
                id: &str,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<bool, mindroom_billing_core::StoreError> {
                crate::wire::operator::end_session(self, id, now).await
            }
        }
    };
}
pub(crate) use impl_operator_store_via_rpc;
