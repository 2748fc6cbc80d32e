//! The core's store conformance suite against real PostgreSQL: the direct store, and the
//! PostgREST store through the test gateway. Every check gets its own fresh database.
#![cfg(feature = "test-util")]

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
