//! Opening a file: created and migrated on first use, refused (naming the file) when it is missing
//! for a read, newer than the binary, another application's, not a database, or served already.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod common;

use std::path::PathBuf;

use common::TempDir;

use mindroom_billing_core::conformance::{new_event, t0};
use mindroom_billing_core::{Recorded, Store, StoreError};
use mindroom_billing_sqlite::{OpenError, SCHEMA_VERSION, ServeLock, SqliteOptions, SqliteStore};

fn dir() -> TempDir {
    TempDir::new("open")
}

fn named(e: &OpenError, path: &std::path::Path) -> bool {
    e.to_string().contains(&path.display().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_is_created_with_its_folder_and_keeps_what_was_committed() {
    let d = dir();
    let path = d.0.join("nested/folder/billing.db");
    let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    assert_eq!(store.record_event(&new_event("evt_1", "{\"a\":1}", t0())).await.unwrap(), Recorded::Fresh);
    drop(store);
    let again = SqliteStore::open(&path, SqliteOptions::default().with_create(false)).unwrap();
    let event = again.load_event("evt_1").await.unwrap().expect("kept across opens");
    assert_eq!(event.payload, "{\"a\":1}");
}

#[test]
fn a_missing_file_is_not_created_for_a_read() {
    let d = dir();
    let path = d.0.join("none.db");
    let e = SqliteStore::open(&path, SqliteOptions::default().with_create(false)).unwrap_err();
    assert!(matches!(e, OpenError::Missing(_)) && named(&e, &path), "{e}");
    assert!(!path.exists());
}

#[test]
fn a_newer_schema_stops_the_open() {
    let d = dir();
    let path = d.0.join("billing.db");
    drop(SqliteStore::open(&path, SqliteOptions::default()).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
    drop(conn);
    let e = SqliteStore::open(&path, SqliteOptions::default()).unwrap_err();
    assert!(matches!(e, OpenError::NewerSchema { found, .. } if found == SCHEMA_VERSION + 1), "{e}");
    assert!(named(&e, &path), "{e}");
}

#[test]
fn a_foreign_database_stops_the_open() {
    let d = dir();
    let path = d.0.join("other.db");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("create table notes (body text); insert into notes values ('mine');").unwrap();
    drop(conn);
    let e = SqliteStore::open(&path, SqliteOptions::default()).unwrap_err();
    assert!(matches!(e, OpenError::Foreign(_)) && named(&e, &path), "{e}");
}

#[test]
fn a_file_that_is_not_sqlite_stops_the_open() {
    let d = dir();
    let path = d.0.join("garbage.db");
    std::fs::write(&path, vec![0x5a_u8; 8192]).unwrap();
    let e = SqliteStore::open(&path, SqliteOptions::default()).unwrap_err();
    assert!(matches!(e, OpenError::Corrupt { .. }) && named(&e, &path), "{e}");
}

#[test]
fn a_second_server_on_one_file_is_refused_until_the_first_is_gone() {
    let d = dir();
    let path = d.0.join("billing.db");
    let first = ServeLock::acquire(&path).unwrap();
    let e = ServeLock::acquire(&path).unwrap_err();
    assert!(matches!(e, OpenError::Locked(_)) && named(&e, &path), "{e}");
    drop(first);
    ServeLock::acquire(&path).unwrap();
}

/// A tiny tmpfs mounted for one test (needs root; `None` where mounting is not allowed).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf, size: &str) -> Option<Self> {
        std::fs::create_dir_all(&at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Self(at))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A full disk answers `Unavailable` (retryable: the webhook answers 503) and commits nothing; once
/// there is room again the same store writes.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_is_unavailable_and_commits_nothing() {
    let d = dir();
    let Some(fs) = Tmpfs::mount(d.0.join("small"), "1m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
        return;
    };
    let store = SqliteStore::open(fs.0.join("billing.db"), SqliteOptions::default()).unwrap();
    store.record_event(&new_event("evt_small", "{}", t0())).await.unwrap();
    // Fill the file system.
    let filler = fs.0.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let block = vec![0_u8; 4096];
    while std::io::Write::write_all(&mut file, &block).is_ok() {}
    drop(file);
    let big = "x".repeat(200_000);
    let e = store.record_event(&new_event("evt_big", &big, t0())).await.unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)) && e.is_retryable(), "{e:?}");
    assert!(store.load_event("evt_big").await.unwrap().is_none(), "nothing committed");
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(store.record_event(&new_event("evt_big", &big, t0())).await.unwrap(), Recorded::Fresh, "room again");
    drop(store);
}

/// Change notifications: this store's own commits name their account at once; a commit of another
/// connection (another process on the same file) drops everything cached.
#[tokio::test(flavor = "multi_thread")]
async fn own_commits_are_reported_and_other_processes_commits_clear_the_cache() {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use mindroom_billing_core::{ChangeListener, Commit, Outcome, SubscriptionState};

    #[derive(Default)]
    struct Heard(Mutex<Vec<String>>);
    impl ChangeListener for Heard {
        fn listening(&self) {
            self.0.lock().unwrap().push("listening".into());
        }
        fn account_changed(&self, account_id: uuid::Uuid) {
            self.0.lock().unwrap().push(account_id.to_string());
        }
        fn lost(&self) {
            self.0.lock().unwrap().push("lost".into());
        }
    }

    let d = dir();
    let path = d.0.join("billing.db");
    let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    let heard = Arc::new(Heard::default());
    let listener: Arc<dyn ChangeListener> = heard.clone();
    assert!(store.watch_changes(Arc::downgrade(&listener)));
    let sub = SubscriptionState::new("sub_w", "cus_w");
    let account = sub.account_id.to_string();
    let commit = Commit {
        now: t0(),
        event_id: None,
        outcome: Outcome::Applied,
        subscription: Some(sub),
        account: None,
        jobs: vec![],
    };
    store.commit(&commit).await.unwrap();
    assert_eq!(*heard.0.lock().unwrap(), ["listening".to_owned(), account]);

    let other = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    other.record_event(&new_event("evt_other", "{}", t0())).await.unwrap();
    let started = Instant::now();
    while heard.0.lock().unwrap().len() < 3 {
        assert!(started.elapsed() < Duration::from_secs(10), "the other commit was never noticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(heard.0.lock().unwrap()[2], "listening", "everything cached is dropped");
}

/// A backup is a consistent copy that opens as a store of its own, taken while the store is open;
/// an existing file is never overwritten.
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_is_a_store_of_its_own() {
    let d = dir();
    let store = SqliteStore::open(d.0.join("billing.db"), SqliteOptions::default()).unwrap();
    for i in 0..50 {
        let id = format!("evt_{i}");
        store.record_event(&new_event(&id, "{\"k\":\"v\"}", t0())).await.unwrap();
    }
    let copy = d.0.join("backup.db");
    store.backup(&copy).await.unwrap();
    store.record_event(&new_event("evt_after", "{}", t0())).await.unwrap();
    let restored = SqliteStore::open(&copy, SqliteOptions::default().with_create(false)).unwrap();
    assert_eq!(restored.load_event("evt_49").await.unwrap().unwrap().payload, "{\"k\":\"v\"}");
    assert!(restored.load_event("evt_after").await.unwrap().is_none(), "the copy is the store as of the backup");
    let e = store.backup(&copy).await.unwrap_err();
    assert!(e.to_string().contains("store error"), "{e}");
}
