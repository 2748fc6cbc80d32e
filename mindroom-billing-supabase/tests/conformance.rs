//! The core's store conformance suite against real PostgreSQL: the direct store, and the
//! PostgREST store through the test gateway. Every check gets its own fresh database.
#![cfg(feature = "test-util")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};

use mindroom_billing_core::Store;
use mindroom_billing_core::conformance::run_all;
use mindroom_billing_supabase::testing::Gateway;
use mindroom_billing_supabase::{PgStore, PostgrestStore};

/// Hands out stores each on a fresh database; the previous check is over when the next store is
/// asked for, so its database is released first.
#[derive(Default)]
struct Databases(Mutex<Vec<(common::Fresh, Option<Gateway>)>>);

impl Databases {
    async fn release(&self) {
        let previous = std::mem::take(&mut *self.0.lock().unwrap());
        for (fresh, gw) in previous {
            drop(gw);
            fresh.store.close().await;
            fresh.db.drop_db().await.unwrap();
        }
    }

    async fn pg(&self) -> Arc<PgStore> {
        self.release().await;
        let fresh = common::fresh().await;
        let store = Arc::clone(&fresh.store);
        self.0.lock().unwrap().push((fresh, None));
        store
    }

    async fn postgrest(&self) -> Arc<PostgrestStore> {
        self.release().await;
        let fresh = common::fresh().await;
        let (gw, store) = common::via_gateway(&fresh.db, false).await;
        self.0.lock().unwrap().push((fresh, Some(gw)));
        store
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_store_passes_the_conformance_suite() {
    let dbs = Arc::new(Databases::default());
    run_all(|| {
        let dbs = Arc::clone(&dbs);
        async move { dbs.pg().await as Arc<dyn Store> }
    })
    .await;
    dbs.release().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgrest_store_passes_the_conformance_suite() {
    let dbs = Arc::new(Databases::default());
    run_all(|| {
        let dbs = Arc::clone(&dbs);
        async move { dbs.postgrest().await as Arc<dyn Store> }
    })
    .await;
    dbs.release().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_store_passes_the_operator_conformance_suite() {
    let dbs = Arc::new(Databases::default());
    mindroom_billing_core::operator_conformance::run_all(|| {
        let dbs = Arc::clone(&dbs);
        async move { dbs.pg().await }
    })
    .await;
    dbs.release().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgrest_store_passes_the_operator_conformance_suite() {
    let dbs = Arc::new(Databases::default());
    mindroom_billing_core::operator_conformance::run_all(|| {
        let dbs = Arc::clone(&dbs);
        async move { dbs.postgrest().await }
    })
    .await;
    dbs.release().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgrest_store_works_with_a_legacy_jwt_key() {
    let fresh = common::fresh().await;
    let (gw, store) = common::via_gateway(&fresh.db, true).await;
    assert!(store.sends_bearer());
    store.ping().await.unwrap();
    mindroom_billing_core::conformance::record_event_is_idempotent_and_byte_exact(store as Arc<dyn Store>).await;
    drop(gw);
    fresh.store.close().await;
    fresh.db.drop_db().await.unwrap();
}

/// An event whose payload is not JSON, or JSON that jsonb refuses, is stored and simply belongs
/// to no customer: the expression index never makes an insert fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unparsable_payload_does_not_break_the_customer_index() {
    use mindroom_billing_core::OperatorStore;
    use mindroom_billing_core::conformance::{new_event, t0};
    let fresh = common::fresh().await;
    let nul = r#"{"data":{"object":{"customer":"cus_nul","note":"\u0000"}}}"#;
    for (id, payload) in
        [("evt_text", "not json at all"), ("evt_nul", nul), ("evt_num", r#"{"data":{"object":{"customer":7}}}"#)]
    {
        fresh.store.record_event(&new_event(id, payload, t0())).await.unwrap();
    }
    assert!(fresh.store.events_for_customer("cus_nul", 10).await.unwrap().is_empty());
    assert_eq!(fresh.store.load_event("evt_nul").await.unwrap().unwrap().payload, nul);
    fresh.store.close().await;
    fresh.db.drop_db().await.unwrap();
}
