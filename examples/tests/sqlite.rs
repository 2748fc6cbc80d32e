//! The durable embedded default: `serve` with no store configured keeps its state in
//! `./data/mindroom-billing.db`, so a `kill -9` and a restart in the same folder forget nothing.
//! The real binary, real HTTP and signatures, a recording stub provisioner; only the store is left
//! unconfigured.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr, missing_docs)]

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mindroom_billing_core::Store;
use mindroom_billing_sqlite::{SqliteOptions, SqliteStore};
use rand::seq::SliceRandom;
use support::{
    Life, Logged, PROVISIONER_KEY, SECRET, SentEvent, StubProvisioner, binary, life_events, now_secs, scratch_dir,
};

const STARTER: &str = "price_sqlite_starter";
const PRO: &str = "price_sqlite_pro";

/// One `serve` in `dir` with no `DATABASE_URL`, the stub provisioner and real prices.
struct Server {
    child: std::sync::Mutex<Logged>,
    port: u16,
    client: reqwest::Client,
}

impl Server {
    async fn start(dir: &Path, stub: &StubProvisioner) -> Self {
        Self::start_with(dir, stub, &[]).await
    }

    /// With more variables (e.g. a `DATABASE_URL`).
    async fn start_with(dir: &Path, stub: &StubProvisioner, env: &[(&str, &str)]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut command = binary(dir);
        command
            .arg("serve")
            .env("PORT", port.to_string())
            .env("STRIPE_WEBHOOK_SECRET", SECRET)
            .env("STRIPE_PRICE_STARTER", STARTER)
            .env("STRIPE_PRICE_PRO", PRO)
            .env("DOKKU_PROVISIONER_URL", &stub.url)
            .env("PROVISIONER_API_KEY", PROVISIONER_KEY)
            .env("BILLING_JOB_POLL_MS", "100")
            .env("BILLING_JOB_BACKOFF_BASE_MS", "200")
            .env("BILLING_JOB_BACKOFF_MAX_MS", "2000")
            .env("BILLING_JOB_MAX_ATTEMPTS", "100")
            .env("BILLING_UNAPPLIED_AFTER_SECS", "2")
            .env("BILLING_JOB_LEASE_SECS", "10")
            .env("PROVISIONER_TIMEOUT_SECS", "4")
            .envs(env.iter().copied());
        let server = Self {
            child: std::sync::Mutex::new(Logged::spawn(command, "sqlite-serve")),
            port,
            client: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = server.client.get(server.url("/health")).send().await {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "serve did not start:\n{}", server.child.lock().unwrap().output());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Posts one event signed now; the status (0 when the connection failed).
    async fn post(&self, event: &SentEvent) -> u16 {
        support::post_event(&self.client, &self.url("/webhooks/stripe"), event).await
    }

    /// `kill -9`.
    fn kill(&self) {
        self.child.lock().unwrap().kill();
    }
}

fn db_path(dir: &Path) -> PathBuf {
    dir.join("data/mindroom-billing.db")
}

/// The server's file, read beside it (as `events list` does).
fn read_store(dir: &Path) -> Arc<dyn Store> {
    Arc::new(SqliteStore::open(db_path(dir), SqliteOptions::default().with_create(false)).expect("the default file"))
}

/// Waits until the server's file has no pending or running job and no event waiting to be applied.
async fn wait_quiet(dir: &Path) {
    support::wait_quiet(&*read_store(dir), Duration::from_secs(60)).await;
}

fn count(stub: &StubProvisioner, op: &str) -> usize {
    stub.calls().iter().filter(|c| c.op == op).count()
}

fn life(sub: &str, cancelled: bool) -> Life {
    Life {
        upgrade_to: Some(PRO.into()),
        cancelled,
        ..Life::new(sub, format!("cus_{sub}"), now_secs() - 3_600, STARTER)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_provision_and_upgrade_forgets_nothing() {
    let stub = StubProvisioner::start().await;
    let dir = scratch_dir("sqlite-kill9");
    let events = life_events(&life("sub_sqlite_k9", true));
    let (before, cancel) = events.split_at(events.len() - 1);

    let server = Server::start(&dir, &stub).await;
    // Provisioned (created, paid), then upgraded, each seen through.
    let (provisioned, upgraded) = before.split_at(2);
    for step in [provisioned, upgraded] {
        for event in step {
            assert_eq!(server.post(event).await, 200, "{}", event.id);
        }
        wait_quiet(&dir).await;
    }
    let calls = stub.calls().len();
    assert_eq!((count(&stub, "POST /provision"), count(&stub, "PUT /update")), (1, 1), "{:?}", stub.calls());
    server.kill();
    assert!(db_path(&dir).exists(), "the default file is in the server's folder");

    let server = Server::start(&dir, &stub).await;
    for event in before {
        assert_eq!(server.post(event).await, 200, "redelivered {}", event.id);
    }
    wait_quiet(&dir).await;
    assert_eq!(stub.calls().len(), calls, "no new provisioner call: {:?}", stub.calls());
    let store = read_store(&dir);
    for event in before {
        let stored = store.load_event(&event.id).await.unwrap().expect("kept across the kill");
        assert!(stored.status.is_done() && stored.deliveries == 2, "{stored:?}");
    }

    assert_eq!(server.post(&cancel[0]).await, 200);
    assert_eq!(server.post(&cancel[0]).await, 200, "a redelivered cancellation");
    wait_quiet(&dir).await;
    assert_eq!(count(&stub, "DELETE /deprovision"), 1, "{:?}", stub.calls());
    assert_eq!(stub.calls().len(), calls + 1);
    server.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A shuffled storm of duplicated deliveries, `kill -9` in the middle, a restart, everything
/// delivered again: one provision per live subscription, one deprovision per canceled one, and
/// every event answered 200 before the kill is recorded after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_storm_loses_no_answered_event() {
    let stub = StubProvisioner::start().await;
    let dir = scratch_dir("sqlite-storm");
    let lives: Vec<Life> = (0..24).map(|i| life(&format!("sub_storm{i:03}"), i % 3 == 0)).collect();
    let events: Vec<SentEvent> = lives.iter().flat_map(life_events).collect();
    let mut storm: Vec<SentEvent> = events.iter().chain(events.iter()).cloned().collect();
    storm.shuffle(&mut rand::thread_rng());

    let half = storm.len() / 2;
    let server = Arc::new(Server::start(&dir, &stub).await);
    let answered: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut senders = tokio::task::JoinSet::new();
    for chunk in storm.chunks(storm.len() / 8 + 1) {
        let (server, answered, chunk, tx) = (Arc::clone(&server), Arc::clone(&answered), chunk.to_vec(), tx.clone());
        senders.spawn(async move {
            for event in chunk {
                if server.post(&event).await == 200 {
                    let mut answered = answered.lock().unwrap();
                    answered.push(event.id.clone());
                    if answered.len() == half {
                        let _ = tx.try_send(());
                    }
                }
            }
        });
    }
    rx.recv().await.expect("half the storm answered");
    server.kill(); // mid-storm, while the senders keep sending
    while senders.join_next().await.is_some() {}
    let answered = answered.lock().unwrap().clone();
    assert!(answered.len() >= half && answered.len() < storm.len(), "killed mid-storm: {}", answered.len());

    let server = Server::start(&dir, &stub).await;
    let store = read_store(&dir);
    for id in &answered {
        assert!(store.load_event(id).await.unwrap().is_some(), "{id} was answered 200 and then lost");
    }
    for event in &events {
        let mut tries = 0;
        while server.post(event).await != 200 {
            tries += 1;
            assert!(tries < 50, "{} never accepted", event.id);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    wait_quiet(&dir).await;
    let mut provisions: HashMap<String, usize> = HashMap::new();
    for call in stub.calls().into_iter().filter(|c| c.op == "POST /provision") {
        *provisions.entry(call.app).or_default() += 1;
    }
    let apps = stub.apps();
    for life in &lives {
        let app = mindroom_billing_core::service::app_name_for(&life.sub);
        let record = apps.get(&app);
        if life.cancelled {
            // Canceled before its provision ran, or provisioned once and removed exactly once.
            let removed = |r: &support::AppRecord| !r.alive && r.deprovisions == 1 && r.provision_keys.len() <= 1;
            assert!(record.is_none_or(removed), "{}: {record:?}", life.sub);
        } else {
            let record = record.unwrap_or_else(|| panic!("{} never provisioned", life.sub));
            assert!(record.alive && record.deprovisions == 0, "{}: {record:?}", life.sub);
            // One provisioning job. Its key names the tier, so a retry after the killed server's
            // attempt reached the provisioner, once the tier had changed, is a second key of that job.
            let jobs: std::collections::HashSet<(String, String)> = record
                .provision_keys
                .iter()
                .map(|key| {
                    let parts: Vec<&str> = key.split(':').collect();
                    (parts[2].to_owned(), parts[4].to_owned())
                })
                .collect();
            assert_eq!(jobs.len(), 1, "{}: provisioned by one job: {:?}", life.sub, record.provision_keys);
            assert!(record.provision_keys.len() <= 2 && provisions[&app] >= 1, "{}", life.sub);
            assert_eq!(
                record.limits,
                Some(support::tier_wire(mindroom_billing_core::Tier::Professional)),
                "{}",
                life.sub
            );
        }
    }
    server.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs a command to its end in `dir`; its exit code and everything it printed.
fn run(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut command = binary(dir);
    command.args(args).envs(env.iter().copied());
    let mut child = Logged::spawn(command, "sqlite-cli");
    let status = child.wait_exit(Duration::from_secs(30));
    (status.and_then(|s| s.code()), child.output())
}

/// The error lines of a command's output.
fn errors(out: &str) -> Vec<&str> {
    out.lines().filter(|l| l.starts_with("error")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_per_file_and_read_commands_beside_it() {
    let stub = StubProvisioner::start().await;
    let dir = scratch_dir("sqlite-lock");
    let server = Server::start(&dir, &stub).await;
    let event = &life_events(&life("sub_sqlite_lock", false))[0];
    assert_eq!(server.post(event).await, 200);

    let (code, out) = run(&dir, &["serve"], &[("PORT", "1")]);
    assert_eq!(code, Some(1), "a second serve on the file stops:\n{out}");
    assert_eq!(
        errors(&out),
        ["error: ./data/mindroom-billing.db is already served by another mindroom-billing process"]
    );
    assert_eq!(out.lines().count(), 1, "one line:\n{out}");

    // The read commands work beside the server, in its folder or through DATABASE_URL=sqlite://…
    let (code, out) = run(&dir, &["events", "list"], &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&event.id), "{out}");
    let url = format!("sqlite://{}", db_path(&dir).display());
    let elsewhere = scratch_dir("sqlite-elsewhere");
    let (code, out) = run(&elsewhere, &["jobs", "list"], &[("DATABASE_URL", &url)]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("reconcile"), "{out}");
    server.kill();
    for d in [dir, elsewhere] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn a_file_that_is_not_a_database_stops_the_start_naming_it() {
    let dir = scratch_dir("sqlite-corrupt");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(db_path(&dir), vec![0x42_u8; 8192]).unwrap();
    for args in [&["serve"][..], &["events", "list"], &["migrate"]] {
        let (code, out) = run(&dir, args, &[("PORT", "1")]);
        assert_eq!(code, Some(1), "{args:?}:\n{out}");
        let errors = errors(&out);
        assert_eq!(errors.len(), 1, "{args:?}: one error line:\n{out}");
        assert!(
            errors[0].contains("./data/mindroom-billing.db is not a readable SQLite database"),
            "{args:?} names the file:\n{out}"
        );
    }
    assert_eq!(std::fs::read(db_path(&dir)).unwrap(), vec![0x42_u8; 8192], "the file is left as it was");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_while_serving_is_a_store_of_its_own() {
    let stub = StubProvisioner::start().await;
    let dir = scratch_dir("sqlite-backup");
    let server = Server::start(&dir, &stub).await;
    let events = life_events(&life("sub_sqlite_backup", false));
    for event in &events {
        assert_eq!(server.post(event).await, 200);
    }
    let (code, out) = run(&dir, &["backup", "copy.db"], &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("backed up ./data/mindroom-billing.db to copy.db"), "{out}");
    let (code, out) = run(&dir, &["backup", "copy.db"], &[]);
    assert_eq!(code, Some(1), "an existing file is not overwritten: {out}");
    let copy = SqliteStore::open(dir.join("copy.db"), SqliteOptions::default().with_create(false)).unwrap();
    for event in &events {
        let stored = copy.load_event(&event.id).await.unwrap().expect("in the copy");
        assert_eq!(stored.payload, event.body, "byte for byte");
    }
    let (code, out) = run(&dir, &["backup", "x.db"], &[("DATABASE_URL", "memory:")]);
    assert_eq!(code, Some(2), "{out}");
    server.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `store copy` moves everything into PostgreSQL; `serve` there has the same state: the same
/// aggregates, instances and raw payloads, and every redelivery is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_copy_moves_everything_to_postgres_and_serve_goes_on_there() {
    let stub = StubProvisioner::start().await;
    let dir = scratch_dir("sqlite-copy");
    let lives: Vec<Life> = (0..3).map(|i| life(&format!("sub_copy{i}"), i == 0)).collect();
    let events: Vec<SentEvent> = lives.iter().flat_map(life_events).collect();
    let server = Server::start(&dir, &stub).await;
    for event in &events {
        assert_eq!(server.post(event).await, 200, "{}", event.id);
    }
    wait_quiet(&dir).await;
    let calls = stub.calls().len();

    let db = mindroom_billing_supabase::testing::TestDb::create().await.unwrap();
    let (code, out) = run(&dir, &["store", "copy", "--to", db.url()], &[]);
    assert_eq!(code, Some(1), "refused while serve runs: {out}");
    assert!(out.contains("stop `serve` first"), "{out}");
    server.kill();
    let (code, out) = run(&dir, &["store", "copy", "--to", db.url()], &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("copied"), "{out}");
    let (code, out) = run(&dir, &["store", "copy", "--to", db.url()], &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("already holds billing data"), "not copied twice: {out}");

    let sqlite = read_store(&dir);
    let pg =
        mindroom_billing_supabase::PgStore::connect(db.url(), mindroom_billing_supabase::PgStoreOptions::default())
            .await
            .unwrap();
    for life in &lives {
        let (a, b) =
            (sqlite.load_subscription(&life.sub).await.unwrap(), pg.load_subscription(&life.sub).await.unwrap());
        assert!(a.is_some() && a == b, "{}: {a:?} vs {b:?}", life.sub);
        assert_eq!(sqlite.load_instance(&life.sub).await.unwrap(), pg.load_instance(&life.sub).await.unwrap());
    }
    for event in &events {
        let (a, b) = (sqlite.load_event(&event.id).await.unwrap(), pg.load_event(&event.id).await.unwrap());
        assert!(a.is_some() && a == b, "{}: {a:?} vs {b:?}", event.id);
        assert_eq!(b.unwrap().payload, event.body, "byte for byte");
    }
    let jobs = |s: Arc<dyn Store>| async move {
        let filter = mindroom_billing_core::ports::JobFilter { state: None, limit: 1000 };
        let mut jobs = s.list_jobs(&filter).await.unwrap();
        jobs.sort_by_key(|j| j.id);
        jobs
    };
    let pg: Arc<dyn Store> = Arc::new(pg);
    assert_eq!(jobs(Arc::clone(&sqlite)).await, jobs(Arc::clone(&pg)).await);

    let server = Server::start_with(&dir, &stub, &[("DATABASE_URL", db.url())]).await;
    for event in &events {
        assert_eq!(server.post(event).await, 200, "redelivered {}", event.id);
    }
    support::wait_quiet(&*pg, Duration::from_secs(60)).await;
    assert_eq!(stub.calls().len(), calls, "every redelivery is a duplicate: {:?}", stub.calls());
    for event in &events {
        assert_eq!(pg.load_event(&event.id).await.unwrap().unwrap().deliveries, 2, "{}", event.id);
    }
    server.kill();
    drop(pg);
    db.drop_db().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tiny tmpfs mounted for one test (needs root; `None` where mounting is not allowed).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf, size: &str) -> Option<Self> {
        std::fs::create_dir_all(&at).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(Self(at))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A full disk answers 503 (Stripe retries) and acknowledges nothing it did not commit; once there
/// is room the redelivery is recorded, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_503_and_acknowledges_nothing_it_did_not_commit() {
    let stub = StubProvisioner::start().await;
    let dir = scratch_dir("sqlite-full");
    let Some(fs) = Tmpfs::mount(dir.join("small"), "2m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
        return;
    };
    let url = format!("sqlite://{}", fs.0.join("billing.db").display());
    let server = Server::start_with(&dir, &stub, &[("DATABASE_URL", &url)]).await;
    let events = life_events(&life("sub_sqlite_full", false));
    assert_eq!(server.post(&events[0]).await, 200);

    let filler = fs.0.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    while std::io::Write::write_all(&mut file, &[0_u8; 4096]).is_ok() {}
    drop(file);
    let padding = format!("\"livemode\":false,\"padding\":\"{}\"", "x".repeat(300_000));
    let big = SentEvent { id: events[1].id.clone(), body: events[1].body.replacen("\"livemode\":false", &padding, 1) };
    assert_eq!(server.post(&big).await, 503, "the disk is full");
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(server.post(&big).await, 200, "room again: Stripe's retry is accepted");
    server.kill();
    let store = SqliteStore::open(fs.0.join("billing.db"), SqliteOptions::default().with_create(false)).unwrap();
    let stored = store.load_event(&big.id).await.unwrap().expect("recorded");
    assert_eq!((stored.deliveries, stored.payload.len()), (1, big.body.len()), "the 503 stored nothing");
    drop(store);
    drop(fs);
    let _ = std::fs::remove_dir_all(&dir);
}
