//! The physical anchor for the webhook's write path on SQLite: one small row per transaction, in WAL
//! mode with the store's `synchronous` setting, on the disk of `<file>`, for `seconds`:
//! `raw_commits <file> [seconds] [FULL|NORMAL]`. Prints commits per second and the p50/p99 latency.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::cast_precision_loss, missing_docs)]

use std::time::{Duration, Instant};

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("usage: raw_commits <file> [seconds] [FULL|NORMAL]");
    let seconds: u64 = args.next().map_or(10, |s| s.parse().unwrap());
    let synchronous = args.next().unwrap_or_else(|| "FULL".into());
    let conn = rusqlite::Connection::open(&path).unwrap();
    let _: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)).unwrap();
    conn.pragma_update(None, "synchronous", &synchronous).unwrap();
    conn.execute_batch("create table if not exists raw (id integer primary key, body text not null)").unwrap();
    let mut latencies = Vec::new();
    let started = Instant::now();
    let mut i: i64 = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        let t = Instant::now();
        let tx = conn.unchecked_transaction().unwrap();
        tx.execute("insert into raw (body) values (?1)", [format!("evt_raw_{i:012}")]).unwrap();
        tx.commit().unwrap();
        latencies.push(t.elapsed());
        i += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let at = |percent: usize| latencies[(latencies.len() - 1) * percent / 100];
    println!(
        "raw SQLite, synchronous={synchronous}: {i} commits in {elapsed:.1} s = {:.0}/s, p50 {:?}, p99 {:?}",
        i as f64 / elapsed,
        at(50),
        at(99)
    );
}
