//! The [`Store`](mindroom_billing_core::Store) and
//! [`OperatorStore`](mindroom_billing_core::OperatorStore) on SQLite: the durable embedded store. One
//! file, nothing to install, for a billing service on one machine; PostgreSQL is the store for
//! several replicas (`mindroom-billing store copy` moves a file's history there).
//!
//! # Binding
//! [`rusqlite`] with its `bundled` feature: SQLite is compiled into the binary (no system library,
//! no version skew), and rusqlite is the most used and most actively kept SQLite binding for Rust.
//! Its calls block, so this store runs them off the async runtime (on Tokio's blocking pool). The
//! alternative in the tree, sqlx's SQLite driver, would tie the store to sqlx's pool and async
//! emulation for no gain on a local file; the two cannot both link SQLite in one build anyway, so
//! rusqlite's version is the one that shares sqlx's `libsqlite3-sys`.
//!
//! # Durability and concurrency
//! - WAL journal; `synchronous=FULL` by default, so a call that answered is on disk when it returns
//!   (`NORMAL` is an option: a power loss may then lose the last commits, never corrupt the file).
//! - One writer connection behind a mutex: writes run one after another in `BEGIN IMMEDIATE`
//!   transactions, so the compare-and-swaps, leases and idempotency checks are serialized by SQLite
//!   itself. Writes that queue while a commit syncs to disk share the next transaction, each in its
//!   own savepoint (group commit): one `fsync` for all of them, and each answered after it.
//! - Reads go through their own connections (WAL readers never wait on the writer).
//! - A busy timeout covers other processes (a `backup`, a read command) holding the file briefly.
//! - Errors that a retry can cure (busy/locked, disk full, I/O error, read-only file, cannot open)
//!   map to [`StoreError::Unavailable`]: the webhook
//!   answers 503, Stripe retries, and nothing is acknowledged that was not committed.
//!
//! # Schema
//! The migrations in `migrations/` are embedded and applied at open; the file's `user_version` is
//! the schema version and its `application_id` marks it as a mindroom-billing database. A file
//! from a newer binary, a foreign SQLite database or a file that is not SQLite stops the open with
//! an [`OpenError`] naming the path.
//!
//! [`Store::watch_changes`](mindroom_billing_core::Store::watch_changes) reports this store's own
//! commits as they happen (one process serves the file, see [`ServeLock`]); a commit of another
//! process (an operator command run beside `serve`) is noticed within half a second and drops
//! everything cached.

mod group;
mod operator;
mod rows;
mod store;
mod transfer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use mindroom_billing_core::{ChangeListener, StoreError};
use rusqlite::{Connection, ErrorCode, OpenFlags, Transaction, TransactionBehavior};

/// `application_id` of a mindroom-billing database (ASCII `MRB1`).
const APPLICATION_ID: i32 = 0x4d52_4231;

/// The embedded migrations, in order; migration `i` brings the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[include_str!("../migrations/0001_schema.sql")];

/// How often a watched store checks for commits of other processes.
const FOREIGN_COMMIT_POLL: Duration = Duration::from_millis(500);

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// SQLite's `synchronous` setting for the writer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Synchronous {
    /// Every commit is synced before it returns (the default: an answered 200 is on disk).
    #[default]
    Full,
    /// Commits are synced at checkpoints: faster, and a power loss may lose the last commits.
    Normal,
}

impl Synchronous {
    fn pragma(self) -> &'static str {
        match self {
            Self::Full => "FULL",
            Self::Normal => "NORMAL",
        }
    }
}

/// How a [`SqliteStore`] opens its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteOptions {
    /// The writer's `synchronous` setting.
    pub synchronous: Synchronous,
    /// How long a statement waits for another process's lock before answering `Unavailable`.
    pub busy_timeout: Duration,
    /// Reader connections kept open when idle.
    pub readers: usize,
    /// Create the file (and its folder) when it does not exist; otherwise a missing file is
    /// [`OpenError::Missing`].
    pub create: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self { synchronous: Synchronous::Full, busy_timeout: Duration::from_secs(5), readers: 4, create: true }
    }
}

impl SqliteOptions {
    /// Sets [`SqliteOptions::synchronous`].
    #[must_use]
    pub fn with_synchronous(mut self, synchronous: Synchronous) -> Self {
        self.synchronous = synchronous;
        self
    }

    /// Sets [`SqliteOptions::create`].
    #[must_use]
    pub fn with_create(mut self, create: bool) -> Self {
        self.create = create;
        self
    }
}

/// Why a database file could not be opened. Each names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The file does not exist (and was not to be created).
    #[error("no database at {0} (nothing has been stored there yet)")]
    Missing(PathBuf),
    /// The file is not a SQLite database, or it is damaged.
    #[error("{path} is not a readable SQLite database (corrupt or not a database file): {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// SQLite's message.
        detail: String,
    },
    /// A SQLite database of another application.
    #[error("{0} is a SQLite database of another application, not a mindroom-billing store")]
    Foreign(PathBuf),
    /// Written by a newer mindroom-billing.
    #[error("{path} has schema version {found}, newer than this binary's {supported}: run a newer mindroom-billing")]
    NewerSchema {
        /// The file.
        path: PathBuf,
        /// Its schema version.
        found: i64,
        /// This binary's.
        supported: i64,
    },
    /// Another process serves this file.
    #[error("{0} is already served by another mindroom-billing process")]
    Locked(PathBuf),
    /// Anything else SQLite or the file system answered.
    #[error("cannot open {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl OpenError {
    fn io(path: &Path, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Io { path: path.to_owned(), source: Box::new(source) }
    }

    fn sqlite(path: &Path, e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
                Self::Corrupt { path: path.to_owned(), detail: e.to_string() }
            }
            _ => Self::io(path, e),
        }
    }
}

/// An exclusive lock on a database file for the life of the process that serves it: a second
/// `serve` on the same file refuses to start. Read commands and backups do not take it.
///
/// It is an exclusive transaction held open on a small SQLite file beside the database
/// (`<path>.lock`): SQLite's own locks, which also work between connections of one process, and the
/// database file's locks are left to SQLite.
pub struct ServeLock {
    _conn: Connection,
}

impl std::fmt::Debug for ServeLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeLock").finish_non_exhaustive()
    }
}

impl ServeLock {
    /// Takes the lock of the database at `path`, or answers [`OpenError::Locked`].
    pub fn acquire(path: &Path) -> Result<Self, OpenError> {
        let lock_path = lock_path(path);
        if let Some(parent) = lock_path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| OpenError::io(path, e))?;
        }
        let locked = |e: rusqlite::Error| match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => OpenError::Locked(path.to_owned()),
            _ => OpenError::sqlite(&lock_path, e),
        };
        let conn = Connection::open(&lock_path).map_err(locked)?;
        conn.busy_timeout(Duration::ZERO).map_err(locked)?;
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE").map_err(locked)?;
        // Nothing is ever written to it: no journal file beside it.
        conn.pragma_update(None, "journal_mode", "OFF").map_err(locked)?;
        conn.execute_batch("begin exclusive").map_err(locked)?;
        Ok(Self { _conn: conn })
    }
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// What the store's connections share.
struct Shared {
    path: PathBuf,
    options: SqliteOptions,
    writer: Mutex<Connection>,
    /// Writes waiting for the writer (group commit, see `group`).
    pending: Mutex<Vec<Box<dyn group::PendingWrite>>>,
    readers: Mutex<Vec<Connection>>,
    /// Told about every committed account change (see `Store::watch_changes`).
    watchers: Mutex<Vec<Weak<dyn ChangeListener>>>,
    /// Whether the thread that notices other processes' commits runs.
    watching_others: std::sync::atomic::AtomicBool,
}

/// The store on one SQLite file. Cheap to clone (shares its connections).
#[derive(Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.shared.path).finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Maps a driver error into the core's kinds: what a retry can cure is `Unavailable`.
fn store_error(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::DiskFull
            | ErrorCode::SystemIoFailure
            | ErrorCode::ReadOnly
            | ErrorCode::CannotOpen
            | ErrorCode::OutOfMemory
            | ErrorCode::FileLockingProtocolFailed,
        ) => StoreError::Unavailable(Box::new(e)),
        _ => StoreError::Other(Box::new(e)),
    }
}

/// A stored value that does not decode (a bug or a hand-edited file).
#[derive(Debug, thiserror::Error)]
#[error("undecodable stored value: {0}")]
struct Undecodable(String);

fn undecodable(what: impl std::fmt::Display) -> StoreError {
    StoreError::Other(Box::new(Undecodable(what.to_string())))
}

impl SqliteStore {
    /// Opens (by default creating) the database at `path`, migrating it to [`SCHEMA_VERSION`].
    /// Blocks: call it before serving, or from a blocking task.
    pub fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self, OpenError> {
        let path = path.as_ref().to_owned();
        if !options.create && !path.exists() {
            return Err(OpenError::Missing(path));
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty() && options.create) {
            std::fs::create_dir_all(parent).map_err(|e| OpenError::io(&path, e))?;
        }
        let mut writer = connect(&path, &options, options.create)?;
        migrate(&path, &mut writer)?;
        writer
            .pragma_update(None, "synchronous", options.synchronous.pragma())
            .map_err(|e| OpenError::sqlite(&path, e))?;
        Ok(Self {
            shared: Arc::new(Shared {
                path,
                options,
                writer: Mutex::new(writer),
                pending: Mutex::new(Vec::new()),
                readers: Mutex::new(Vec::new()),
                watchers: Mutex::new(Vec::new()),
                watching_others: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Writes an online, consistent copy of the database to `target` (`VACUUM INTO`: one read
    /// transaction, so the copy is the store as of one instant; the writer is never held, and a
    /// server keeps answering meanwhile). `target` must not exist.
    pub async fn backup(&self, target: impl AsRef<Path>) -> Result<(), StoreError> {
        let target = target.as_ref().to_owned();
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            if target.exists() {
                return Err(StoreError::Other(Box::new(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists", target.display()),
                ))));
            }
            let target = target.to_str().ok_or_else(|| undecodable("a backup path that is not UTF-8"))?;
            let conn = connect(&shared.path, &shared.options, false).map_err(|e| StoreError::Other(Box::new(e)))?;
            conn.execute("vacuum into ?1", [target]).map_err(store_error)?;
            Ok(())
        })
        .await
    }

    /// Runs `f` on the writer, off the async runtime, in a `BEGIN IMMEDIATE` transaction that it
    /// may share with writes queued beside it (group commit: one `fsync` for all of them, see
    /// `group`). Answers once that transaction is committed; `f`'s own changes are rolled back
    /// (to its savepoint) when it answers `Err`.
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let (pending, answer) = group::Pending::new(f);
        lock(&self.shared.pending).push(Box::new(pending));
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            shared.run_pending();
            Ok(())
        })
        .await?;
        answer.await.map_err(|_| StoreError::Other(Box::new(std::io::Error::other("a store write was dropped"))))?
    }

    /// Runs `f` on a reader connection, off the async runtime.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            let conn = shared.reader()?;
            let value = f(&conn);
            shared.give_back(conn);
            value
        })
        .await
    }

    /// Starts (once) a thread that notices commits of other processes on the file (a `replay` or a
    /// `stripe catch-up` run from a shell while `serve` runs): the writer's `data_version` changes
    /// only with other connections' commits, and this store's readers never write. Then everything
    /// the watchers cached may be stale: they are told to start over ([`ChangeListener::listening`]
    /// clears a cache). It checks every [`FOREIGN_COMMIT_POLL`] and ends with the store.
    fn watch_other_processes(&self) {
        if self.shared.watching_others.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let data_version =
            |shared: &Shared| lock(&shared.writer).query_row("pragma data_version", [], |r| r.get::<_, i64>(0)).ok();
        let mut last = data_version(&self.shared);
        let shared = Arc::downgrade(&self.shared);
        let spawned = std::thread::Builder::new().name("sqlite-changes".into()).spawn(move || {
            loop {
                std::thread::sleep(FOREIGN_COMMIT_POLL);
                let Some(shared) = shared.upgrade() else { return };
                let version = data_version(&shared);
                if version.is_some() && last.is_some() && version != last {
                    tracing::debug!("another process committed to the store: cached reads dropped");
                    let watchers = lock(&shared.watchers).clone();
                    for watcher in watchers.iter().filter_map(Weak::upgrade) {
                        watcher.listening();
                    }
                }
                last = version.or(last);
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot watch for other processes' commits");
        }
    }

    /// Tells the watchers that `accounts` changed (after the commit).
    fn changed(&self, accounts: &[uuid::Uuid]) {
        if accounts.is_empty() {
            return;
        }
        let mut watchers = lock(&self.shared.watchers);
        watchers.retain(|w| w.strong_count() > 0);
        for watcher in watchers.iter().filter_map(Weak::upgrade) {
            for account in accounts {
                watcher.account_changed(*account);
            }
        }
    }
}

impl Shared {
    fn reader(&self) -> Result<Connection, StoreError> {
        if let Some(conn) = lock(&self.readers).pop() {
            return Ok(conn);
        }
        let conn = connect(&self.path, &self.options, false).map_err(|e| StoreError::Unavailable(Box::new(e)))?;
        conn.pragma_update(None, "query_only", true).map_err(store_error)?;
        Ok(conn)
    }

    fn give_back(&self, conn: Connection) {
        let mut readers = lock(&self.readers);
        if readers.len() < self.options.readers {
            readers.push(conn);
        }
    }
}

async fn blocking<T, F>(f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(|e| StoreError::Other(Box::new(e)))?
}

/// Opens a connection with the busy timeout and WAL.
fn connect(path: &Path, options: &SqliteOptions, create: bool) -> Result<Connection, OpenError> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let conn = Connection::open_with_flags(path, flags).map_err(|e| OpenError::sqlite(path, e))?;
    conn.busy_timeout(options.busy_timeout).map_err(|e| OpenError::sqlite(path, e))?;
    // The first statement that reads the file: a file that is not SQLite fails here.
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(|e| OpenError::sqlite(path, e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(path = %path.display(), mode, "SQLite did not switch to WAL");
    }
    Ok(conn)
}

/// Checks that the file is ours and not newer, then applies the missing migrations.
fn migrate(path: &Path, conn: &mut Connection) -> Result<(), OpenError> {
    let sqlite = |e| OpenError::sqlite(path, e);
    let application_id: i32 = conn.pragma_query_value(None, "application_id", |r| r.get(0)).map_err(sqlite)?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(sqlite)?;
    let tables: i64 = conn.query_row("select count(*) from sqlite_schema", [], |r| r.get(0)).map_err(sqlite)?;
    let ours = application_id == APPLICATION_ID || (application_id == 0 && version == 0 && tables == 0);
    if !ours {
        return Err(OpenError::Foreign(path.to_owned()));
    }
    if version > SCHEMA_VERSION {
        return Err(OpenError::NewerSchema { path: path.to_owned(), found: version, supported: SCHEMA_VERSION });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(version).unwrap_or(0)) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sqlite)?;
        tx.execute_batch(sql).map_err(sqlite)?;
        tx.pragma_update(None, "application_id", APPLICATION_ID).map_err(sqlite)?;
        tx.pragma_update(None, "user_version", i64::try_from(index + 1).unwrap_or(i64::MAX)).map_err(sqlite)?;
        tx.commit().map_err(sqlite)?;
        if version == 0 {
            tracing::debug!(path = %path.display(), version = index + 1, "SQLite schema created");
        } else {
            tracing::info!(path = %path.display(), version = index + 1, "SQLite schema migrated");
        }
    }
    Ok(())
}
