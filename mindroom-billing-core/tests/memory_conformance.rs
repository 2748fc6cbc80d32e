//! The in-memory store passes the store conformance suite.
#![cfg(feature = "test-util")]

use std::sync::Arc;

use mindroom_billing_core::MemoryStore;
use mindroom_billing_core::ports::Store;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_conforms() {
    mindroom_billing_core::conformance::run_all(|| async { Arc::new(MemoryStore::new()) as Arc<dyn Store> }).await;
}
