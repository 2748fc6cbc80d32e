//! The core's store conformance suite against real PostgreSQL: the direct store, and the
//! PostgREST store through the test gateway. Every check gets its own fresh database.
#![cfg(feature = "test-util")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};

use mindroom_billing_core::Store;
use mindroom_billing_core::conformance::run_all;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_store_passes_the_conformance_suite() {
    let keep: Arc<Mutex<Vec<common::Fresh>>> = Arc::default();
    run_all(|| {
        let keep = Arc::clone(&keep);
        async move {
            // The previous check is over: release its database before making the next one.
            let previous = std::mem::take(&mut *keep.lock().unwrap());
            for fresh in previous {
                fresh.store.close().await;
                fresh.db.drop_db().await.unwrap();
            }
            let fresh = common::fresh().await;
            let store = Arc::clone(&fresh.store) as Arc<dyn Store>;
            keep.lock().unwrap().push(fresh);
            store
        }
    })
    .await;
    let all = std::mem::take(&mut *keep.lock().unwrap());
    for fresh in all {
        fresh.store.close().await;
        fresh.db.drop_db().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgrest_store_passes_the_conformance_suite() {
    let keep: Arc<Mutex<Vec<(common::Fresh, mindroom_billing_supabase::testing::Gateway)>>> = Arc::default();
    run_all(|| {
        let keep = Arc::clone(&keep);
        async move {
            let previous = std::mem::take(&mut *keep.lock().unwrap());
            for (fresh, gw) in previous {
                drop(gw);
                fresh.store.close().await;
                fresh.db.drop_db().await.unwrap();
            }
            let fresh = common::fresh().await;
            let (gw, store) = common::via_gateway(&fresh.db, false).await;
            keep.lock().unwrap().push((fresh, gw));
            store as Arc<dyn Store>
        }
    })
    .await;
    let all = std::mem::take(&mut *keep.lock().unwrap());
    for (fresh, gw) in all {
        drop(gw);
        fresh.store.close().await;
        fresh.db.drop_db().await.unwrap();
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_store_passes_the_operator_conformance_suite() {
    let keep: Arc<Mutex<Vec<common::Fresh>>> = Arc::default();
    mindroom_billing_core::operator_conformance::run_all(|| {
        let keep = Arc::clone(&keep);
        async move {
            let previous = std::mem::take(&mut *keep.lock().unwrap());
            for fresh in previous {
                fresh.store.close().await;
                fresh.db.drop_db().await.unwrap();
            }
            let fresh = common::fresh().await;
            let store = Arc::clone(&fresh.store);
            keep.lock().unwrap().push(fresh);
            store
        }
    })
    .await;
    for fresh in std::mem::take(&mut *keep.lock().unwrap()) {
        fresh.store.close().await;
        fresh.db.drop_db().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgrest_store_passes_the_operator_conformance_suite() {
    let keep: Arc<Mutex<Vec<(common::Fresh, mindroom_billing_supabase::testing::Gateway)>>> = Arc::default();
    mindroom_billing_core::operator_conformance::run_all(|| {
        let keep = Arc::clone(&keep);
        async move {
            let previous = std::mem::take(&mut *keep.lock().unwrap());
            for (fresh, gw) in previous {
                drop(gw);
                fresh.store.close().await;
                fresh.db.drop_db().await.unwrap();
            }
            let fresh = common::fresh().await;
            let (gw, store) = common::via_gateway(&fresh.db, false).await;
            keep.lock().unwrap().push((fresh, gw));
            store
        }
    })
    .await;
    for (fresh, gw) in std::mem::take(&mut *keep.lock().unwrap()) {
        drop(gw);
        fresh.store.close().await;
        fresh.db.drop_db().await.unwrap();
    }
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
