//! Fills a SQLite store with `N` applied subscription events (one aggregate per 10 events, a job
//! per aggregate), for `scripts/store-copy.sh`: `fill <file> <n>`.
#![allow(clippy::print_stdout, clippy::unwrap_used, missing_docs)]

use std::time::Instant;

use chrono::{Duration, TimeZone, Utc};
use mindroom_billing_core::{Commit, EventSource, JobKind, NewEvent, NewJob, Outcome, Store, SubscriptionState};
use mindroom_billing_sqlite::{SqliteOptions, SqliteStore, Synchronous};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(path), Some(n)) = (args.next(), args.next()) else {
        println!("usage: fill <file> <number of events>");
        std::process::exit(2);
    };
    let n: u64 = n.parse().unwrap();
    // The fill is not what is measured: commits are synced at checkpoints only.
    let store = SqliteStore::open(&path, SqliteOptions::default().with_synchronous(Synchronous::Normal)).unwrap();
    let t0 = Utc.timestamp_opt(1_785_000_000, 0).unwrap();
    let started = Instant::now();
    for i in 0..n {
        let id = format!("evt_fill_{i:09}");
        let sub = format!("sub_fill_{:08}", i / 10);
        let at = t0 + Duration::seconds(i64::try_from(i).unwrap());
        let payload = format!(
            r#"{{"id":"{id}","object":"event","type":"customer.subscription.updated","created":{},"data":{{"object":{{"id":"{sub}","object":"subscription","customer":"cus_{sub}","status":"active"}}}}}}"#,
            at.timestamp()
        );
        let event = NewEvent {
            id: &id,
            event_type: "customer.subscription.updated",
            created: at,
            api_version: Some("2026-07-29.dahlia"),
            livemode: false,
            payload: &payload,
            received_at: at,
            source: EventSource::Webhook,
            customer_id: None,
        };
        let mut state = store
            .load_subscription(&sub)
            .await
            .unwrap()
            .unwrap_or_else(|| SubscriptionState::new(sub.clone(), format!("cus_{sub}")));
        state.good_standing_at = Some(at);
        let jobs = vec![NewJob {
            key: format!("reconcile:{sub}"),
            group: Some(sub.clone()),
            kind: JobKind::Reconcile { subscription_id: sub.clone() },
            run_after: at,
        }];
        let commit = Commit {
            now: at,
            event_id: Some(id.clone()),
            outcome: Outcome::Applied,
            subscription: Some(state),
            account: None,
            jobs,
        };
        store.record_event(&event).await.unwrap();
        store.commit(&commit).await.unwrap();
    }
    println!("{n} events in {path} ({:.1} s)", started.elapsed().as_secs_f64());
}
