//! The in-memory store passes the store conformance suite, and keeps its memory bounded: at most
//! `max_payloads` raw payloads of done events and `max_events` event rows, never losing a failed or
//! received event, and still answering a redelivery of a dropped payload as a duplicate.
#![cfg(feature = "test-util")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use chrono::Duration;
use mindroom_billing_core::conformance::{new_event, t0};
use mindroom_billing_core::memory::MemoryLimits;
use mindroom_billing_core::model::{Commit, EventStatus, Outcome, Recorded, StoredEvent};
use mindroom_billing_core::ports::{EventFilter, Store};
use mindroom_billing_core::{EventSource, MemoryStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_conforms() {
    mindroom_billing_core::conformance::run_all(|| async { Arc::new(MemoryStore::new()) as Arc<dyn Store> }).await;
}

#[tokio::test]
async fn memory_store_conforms_as_an_operator_store() {
    mindroom_billing_core::operator_conformance::run_all(|| async { Arc::new(MemoryStore::new()) }).await;
}

fn bounded(max_payloads: usize, max_events: usize) -> MemoryStore {
    MemoryStore::with_limits(MemoryLimits::default().with_max_payloads(max_payloads).with_max_events(max_events))
}

fn id(i: usize) -> String {
    format!("evt_{i:04}")
}

fn payload(i: usize) -> String {
    format!("{{\"id\":\"{}\",\"n\":{i}}}", id(i))
}

/// Records event `i` (received `i` seconds after t0) and commits it with `outcome`.
async fn deliver(store: &MemoryStore, i: usize, outcome: Outcome) {
    let (id, payload) = (id(i), payload(i));
    let at = t0() + Duration::seconds(i64::try_from(i).unwrap());
    assert_eq!(store.record_event(&new_event(&id, &payload, at)).await.unwrap(), Recorded::Fresh);
    let commit = Commit { now: at, event_id: Some(id), outcome, subscription: None, account: None, jobs: vec![] };
    store.commit(&commit).await.unwrap();
}

async fn all_events(store: &MemoryStore) -> Vec<StoredEvent> {
    store.list_events(&EventFilter { status: None, limit: u32::MAX }).await.unwrap()
}

fn with_payload(events: &[StoredEvent]) -> Vec<String> {
    let mut ids: Vec<String> = events.iter().filter(|e| !e.payload.is_empty()).map(|e| e.id.clone()).collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn defaults_are_ten_thousand_payloads_and_a_million_rows() {
    let limits = MemoryLimits::default();
    assert_eq!((limits.max_payloads, limits.max_events), (10_000, 1_000_000));
}

#[tokio::test]
async fn only_the_newest_payloads_of_done_events_are_kept() {
    let store = bounded(3, 100);
    let outcomes = [Outcome::Applied, Outcome::Stale, Outcome::Ignored];
    for i in 0..9 {
        deliver(&store, i, outcomes[i % 3].clone()).await;
    }
    let events = all_events(&store).await;
    assert_eq!(events.len(), 9, "every row stays (under max_events)");
    assert_eq!(with_payload(&events), [id(6), id(7), id(8)], "only the newest 3 payloads");
    let newest = store.load_event(&id(8)).await.unwrap().unwrap();
    assert_eq!(newest.payload, payload(8), "a kept payload is byte exact");

    let old = store.load_event(&id(1)).await.unwrap().unwrap();
    assert_eq!(old.payload, "", "the dropped payload reads empty");
    assert_eq!(
        (old.id.as_str(), old.event_type.as_str(), old.created, old.status, old.deliveries, old.source),
        (id(1).as_str(), "customer.subscription.updated", t0(), EventStatus::Stale, 1, EventSource::Webhook),
        "the row keeps id, type, created, status, deliveries and source"
    );
    assert_eq!((old.received_at, old.processed_at), (t0() + Duration::seconds(1), Some(t0() + Duration::seconds(1))));
    let stale = store.list_events(&EventFilter { status: Some(EventStatus::Stale), limit: 10 }).await.unwrap();
    assert_eq!(stale.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), [id(7), id(4), id(1)], "newest first");
}

#[tokio::test]
async fn a_redelivery_of_a_dropped_payload_is_still_a_duplicate() {
    let store = bounded(2, 100);
    for i in 0..6 {
        deliver(&store, i, Outcome::Applied).await;
    }
    assert_eq!(store.load_event(&id(0)).await.unwrap().unwrap().payload, "", "its payload was dropped");
    let (first, again) = (id(0), payload(0));
    let redelivery = new_event(&first, &again, t0() + Duration::days(3));
    assert_eq!(store.record_event(&redelivery).await.unwrap(), Recorded::Done(EventStatus::Applied));
    assert_eq!(
        store.record_and_load(&redelivery, Some("sub_x")).await.unwrap(),
        (Recorded::Done(EventStatus::Applied), None)
    );
    let row = store.load_event(&id(0)).await.unwrap().unwrap();
    assert_eq!((row.deliveries, row.payload.as_str()), (3, ""), "deliveries counted, nothing stored again");
    let commit = Commit {
        now: t0() + Duration::days(3),
        event_id: Some(id(0)),
        outcome: Outcome::Applied,
        subscription: None,
        account: None,
        jobs: vec![],
    };
    assert_eq!(store.commit(&commit).await.unwrap(), mindroom_billing_core::model::CommitResult::AlreadyDone);
}

#[tokio::test]
async fn event_rows_beyond_the_bound_drop_the_oldest_done_ones() {
    let store = bounded(2, 5);
    for i in 0..8 {
        deliver(&store, i, Outcome::Applied).await;
    }
    let events = all_events(&store).await;
    let mut ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    ids.sort();
    assert_eq!(ids, (3..8).map(id).collect::<Vec<_>>(), "the 5 newest rows");
    assert_eq!(with_payload(&events), [id(6), id(7)]);
    assert!(store.load_event(&id(0)).await.unwrap().is_none());
}

#[tokio::test]
async fn failed_and_received_events_are_never_dropped() {
    let store = bounded(1, 3);
    deliver(&store, 0, Outcome::Failed("unknown price".into())).await;
    let (received_id, received_payload) = (id(1), payload(1));
    store.record_event(&new_event(&received_id, &received_payload, t0())).await.unwrap();
    for i in 2..12 {
        deliver(&store, i, Outcome::Ignored).await;
    }
    let failed = store.load_event(&id(0)).await.unwrap().unwrap();
    assert_eq!(
        (failed.status, failed.payload.as_str(), failed.reason.as_deref()),
        (EventStatus::Failed, payload(0).as_str(), Some("unknown price")),
        "the failed event keeps its payload and reason, whatever the bounds"
    );
    let received = store.load_event(&received_id).await.unwrap().unwrap();
    assert_eq!((received.status, received.payload), (EventStatus::Received, payload(1)));
    let unapplied = store.unapplied_events(t0() + Duration::days(1), 10).await.unwrap();
    assert_eq!(unapplied.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), [id(1)]);
    assert_eq!(
        store.record_event(&new_event(&id(0), "{}", t0())).await.unwrap(),
        Recorded::Pending(EventStatus::Failed)
    );

    let events = all_events(&store).await;
    assert_eq!(events.len(), 3, "failed + received + the newest done row");
    assert_eq!(with_payload(&events), [id(0), id(1), id(11)]);

    // Replayed and applied, the failed event becomes an ordinary done event: the newest payload.
    let commit = Commit {
        now: t0(),
        event_id: Some(id(0)),
        outcome: Outcome::Applied,
        subscription: None,
        account: None,
        jobs: vec![],
    };
    store.commit(&commit).await.unwrap();
    let events = all_events(&store).await;
    assert_eq!(with_payload(&events), [id(0), id(1)], "the replayed event's payload is the newest kept one");
    assert_eq!(events.len(), 3);
}

/// Retention prunes compacted rows too, and the payload bound keeps working after a prune.
#[tokio::test]
async fn pruning_a_bounded_store_keeps_its_bounds() {
    use mindroom_billing_core::{PruneReport, PruneRequest};
    let store = bounded(2, 100);
    for i in 0..6 {
        deliver(&store, i, Outcome::Applied).await;
    }
    let at = |secs: i64| t0() + Duration::seconds(secs);
    let request = PruneRequest {
        events_before: at(3),
        payloads_before: at(5),
        jobs_before: at(0),
        email_jobs_before: at(0),
        limit: 100,
        dry_run: false,
    };
    // 0–2 go whole (0–3 had lost their payload to the bound already); 4 loses its payload.
    assert_eq!(store.prune(&request).await.unwrap(), PruneReport { events: 3, payloads: 1, jobs: 0 });
    let ids: Vec<String> = all_events(&store).await.into_iter().map(|e| e.id).collect();
    assert_eq!(ids, [id(5), id(4), id(3)]);
    assert_eq!(with_payload(&all_events(&store).await), [id(5)]);
    for i in 6..9 {
        deliver(&store, i, Outcome::Applied).await;
    }
    assert_eq!(with_payload(&all_events(&store).await), [id(7), id(8)], "the payload bound still holds");
    assert_eq!(
        store.record_event(&new_event(&id(4), &payload(4), at(10))).await.unwrap(),
        Recorded::Done(EventStatus::Applied),
        "a pruned payload's id still answers a duplicate"
    );
}
