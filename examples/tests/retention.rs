//! Retention through the real binary: `events prune --dry-run` counts what would go and changes
//! nothing, `events prune` prunes it, failed events and dead jobs stay, a short retention empties
//! payloads but keeps the id rows for 30 days, and `BILLING_EVENT_RETENTION_DAYS` is validated.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::process::Output;

use mindroom_billing_supabase::testing::TestDb;
use support::{binary, scratch_dir};

fn run(args: &[&str], env: &[(&str, &str)]) -> (Output, String) {
    let out = binary(&scratch_dir("retention")).args(args).envs(env.iter().copied()).output().unwrap();
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out, all)
}

/// The count printed on the line starting with `label` (`  events:   3  …`).
fn count(out: &str, label: &str) -> u64 {
    let line = out.lines().find(|l| l.trim_start().starts_with(label)).unwrap_or_else(|| panic!("no {label}: {out}"));
    line.trim_start()[label.len()..].split_whitespace().next().unwrap().parse().unwrap()
}

/// Old and recent history, written as the store would have written it long ago.
const HISTORY: &str = "
insert into public.billing_events (id, type, created, status, reason, payload, received_at, processed_at)
select id, 'invoice.paid', now() - make_interval(days => age), status, reason, '{\"id\":\"' || id || '\"}',
       now() - make_interval(days => age), now() - make_interval(days => age)
from (values ('evt_old_1', 500, 'applied', null), ('evt_old_2', 450, 'ignored', null),
             ('evt_old_3', 401, 'stale', null), ('evt_old_failed', 500, 'failed', 'unknown price'),
             ('evt_old_received', 500, 'received', null), ('evt_recent', 10, 'applied', null))
     as h (id, age, status, reason);
insert into public.billing_jobs (key, kind, state, run_after, created_at, updated_at)
select key, '{\"admin_alert\":{\"subject\":\"s\",\"detail\":\"d\"}}'::jsonb, state,
       now() - make_interval(days => age), now() - make_interval(days => age), now() - make_interval(days => age)
from (values ('job_old_done', 500, 'done'), ('job_old_dead', 500, 'dead'), ('job_recent_done', 10, 'done'))
     as j (key, age, state);
";

async fn ids(db: &TestDb, sql: &str) -> Vec<String> {
    sqlx::query_scalar(sql).fetch_all(db.pool()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_prune_dry_run_counts_then_prune_keeps_failed_events_and_dead_jobs() {
    let db = TestDb::create().await.unwrap();
    support::migrate(db.url());
    sqlx::raw_sql(HISTORY).execute(db.pool()).await.unwrap();
    let env = [("DATABASE_URL", db.url())];
    let events = "select id from public.billing_events order by id";
    let jobs = "select key from public.billing_jobs order by key";
    let (all_events, all_jobs) = (ids(&db, events).await, ids(&db, jobs).await);

    let (out, text) = run(&["events", "prune", "--dry-run"], &env);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("would prune") && text.contains("retention: 400 days"), "{text}");
    assert_eq!((count(&text, "events:"), count(&text, "payloads:"), count(&text, "jobs:")), (3, 0, 1), "{text}");
    assert_eq!((ids(&db, events).await, ids(&db, jobs).await), (all_events, all_jobs), "a dry run changes nothing");

    let (out, text) = run(&["events", "prune"], &env);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("pruned:"), "{text}");
    assert_eq!((count(&text, "events:"), count(&text, "jobs:")), (3, 1), "{text}");
    assert_eq!(ids(&db, events).await, ["evt_old_failed", "evt_old_received", "evt_recent"]);
    assert_eq!(ids(&db, jobs).await, ["job_old_dead", "job_recent_done"]);

    // A 7-day retention: the 10-day-old payload goes, its id row stays (Stripe may still list it).
    let short = [("DATABASE_URL", db.url()), ("BILLING_EVENT_RETENTION_DAYS", "7")];
    let (out, text) = run(&["events", "prune"], &short);
    assert!(out.status.success(), "{text}");
    assert_eq!((count(&text, "events:"), count(&text, "payloads:"), count(&text, "jobs:")), (0, 1, 1), "{text}");
    assert_eq!(ids(&db, events).await, ["evt_old_failed", "evt_old_received", "evt_recent"]);
    let (out, text) = run(&["events", "show", "evt_recent"], &env);
    assert!(out.status.success() && text.contains("pruned by retention"), "{text}");
    let (_, text) = run(&["events", "show", "evt_old_failed"], &env);
    assert!(text.contains("{\"id\":\"evt_old_failed\"}"), "a failed event keeps its payload: {text}");
    db.drop_db().await.unwrap();
}

#[test]
fn retention_days_must_be_a_positive_number_of_days() {
    for bad in ["0", "-3", "forever", "36501"] {
        let (out, text) = run(&["events", "prune"], &[("BILLING_EVENT_RETENTION_DAYS", bad)]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {text}");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.starts_with("error: BILLING_EVENT_RETENTION_DAYS: "), "{text}");
    }
}
