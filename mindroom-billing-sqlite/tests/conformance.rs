//! The core's store and operator conformance suites on SQLite, each check its own test on a fresh
//! database file.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::TempDir;

use mindroom_billing_core::Store;
use mindroom_billing_core::{conformance, operator_conformance};
use mindroom_billing_sqlite::{SqliteOptions, SqliteStore};

/// A fresh database file in its own folder.
struct Fresh {
    _dir: TempDir,
    store: Arc<SqliteStore>,
}

fn fresh() -> Fresh {
    let dir = TempDir::new("conformance");
    let store = Arc::new(SqliteStore::open(dir.0.join("billing.db"), SqliteOptions::default()).unwrap());
    Fresh { _dir: dir, store }
}

macro_rules! store_checks {
    ($($check:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $check() {
            let db = fresh();
            conformance::$check(Arc::clone(&db.store) as Arc<dyn Store>).await;
        }
    )*};
}

macro_rules! operator_checks {
    ($($check:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $check() {
            let db = fresh();
            operator_conformance::$check(Arc::clone(&db.store)).await;
        }
    )*};
}

store_checks!(
    record_event_is_idempotent_and_byte_exact,
    concurrent_records_yield_one_fresh,
    commit_is_compare_and_swap,
    commit_marks_event_once,
    failed_events_stay_pending,
    jobs_dedup_order_and_lease,
    concurrent_claimers_run_each_job_once,
    finish_job_records_instance_and_dead,
    instance_intent_is_fenced_by_the_lease,
    usage_is_atomic_and_limited,
    usage_idempotency_key_counts_once,
    grace_and_unapplied_queries,
    accounts_and_listing,
    record_and_load_returns_the_aggregate,
    record_and_commit_is_one_atomic_step,
    leases_renew_and_skipped_jobs_keep_their_reason,
    retention_prunes_only_old_done_history,
    retention_keeps_email_keys_for_stripes_retry_horizon,
    accounts_are_found_by_reference,
);

operator_checks!(
    finds_by_email_app_and_customer,
    events_of_a_customer_newest_first,
    jobs_of_a_subscription,
    grace_by_deadline,
    open_disputes_by_evidence_deadline,
    every_subscription_by_id_a_page_at_a_time,
    retry_is_fenced_on_dead,
    audit_rows_by_customer,
    drift_is_replaced_per_checked_subscription,
    operators_are_named_and_unique,
    searches_by_part_of_an_email_a_reference_or_an_invoice,
    sessions_end_by_logout_password_removal_and_time,
);

/// The whole suites in one run too, as the other stores run them (a check added to `run_all` and
/// not listed above still runs here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_store_passes_both_suites_whole() {
    let dbs = Arc::new(std::sync::Mutex::new(Vec::new()));
    let hand_out = || {
        let dbs = Arc::clone(&dbs);
        async move {
            let db = fresh();
            let store = Arc::clone(&db.store);
            dbs.lock().unwrap().push(db);
            store
        }
    };
    conformance::run_all(|| {
        let next = hand_out();
        async move { next.await as Arc<dyn Store> }
    })
    .await;
    operator_conformance::run_all(hand_out).await;
}
