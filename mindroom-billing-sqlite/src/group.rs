//! Group commit: writes that wait for the writer while another batch syncs to disk are run together,
//! each in its own savepoint, and committed with one `fsync`.
//!
//! Each caller queues its write and then runs [`Shared::run_pending`] on the blocking pool. Whoever
//! holds the writer takes every queued write (its own, unless an earlier holder already ran it), runs
//! them in one `BEGIN IMMEDIATE` transaction and answers each after the commit. A write that fails
//! rolls back to its own savepoint only, so it cannot undo or be undone by its neighbours; a commit
//! that fails fails every write of the batch, so nothing is acknowledged that is not on disk. One
//! sender still pays one `fsync` per write; sixteen senders share them.

use std::panic::{AssertUnwindSafe, catch_unwind};

use mindroom_billing_core::StoreError;
use rusqlite::{Transaction, TransactionBehavior};
use tokio::sync::oneshot;

use super::{Shared, lock, store_error};

/// The most writes one transaction runs: bounds how long the first of them waits for its answer.
const MAX_BATCH: usize = 128;

/// Why a whole batch failed: kept as text, so each of its writes gets an error of the same kind.
pub(crate) struct BatchFailure {
    message: String,
    retryable: bool,
}

impl BatchFailure {
    fn of(e: rusqlite::Error) -> Self {
        let message = format!("the write transaction failed: {e}");
        Self { message, retryable: matches!(store_error(e), StoreError::Unavailable(_)) }
    }

    fn to_error(&self) -> StoreError {
        let e = Box::new(std::io::Error::other(self.message.clone()));
        if self.retryable { StoreError::Unavailable(e) } else { StoreError::Other(e) }
    }
}

/// One queued write, its type erased.
pub(crate) trait PendingWrite: Send {
    /// Runs the write inside the batch's transaction; `true` when it succeeded.
    fn run(&mut self, tx: &Transaction<'_>) -> bool;
    /// Answers the caller once the batch is committed (or has failed).
    fn answer(self: Box<Self>, batch: Result<(), &BatchFailure>);
}

/// A write and where its answer goes.
pub(crate) struct Pending<T, F> {
    write: Option<F>,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Pending<T, F> {
    pub(crate) fn new(write: F) -> (Self, oneshot::Receiver<Result<T, StoreError>>) {
        let (reply, answer) = oneshot::channel();
        (Self { write: Some(write), result: None, reply }, answer)
    }
}

impl<T, F> PendingWrite for Pending<T, F>
where
    T: Send,
    F: FnOnce(&Transaction<'_>) -> Result<T, StoreError> + Send,
{
    fn run(&mut self, tx: &Transaction<'_>) -> bool {
        let Some(write) = self.write.take() else { return false };
        let result = catch_unwind(AssertUnwindSafe(|| write(tx)))
            .unwrap_or_else(|_| Err(StoreError::Other(Box::new(std::io::Error::other("a store write panicked")))));
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn answer(self: Box<Self>, batch: Result<(), &BatchFailure>) {
        let result = match (self.result, batch) {
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(value)), Ok(())) => Ok(value),
            (_, Err(failure)) => Err(failure.to_error()),
            (None, Ok(())) => Err(StoreError::Other(Box::new(std::io::Error::other("a store write was never run")))),
        };
        // The caller may have gone (its request was cancelled): the write stands all the same.
        let _ = self.reply.send(result);
    }
}

impl Shared {
    /// Runs one batch of queued writes while holding the writer (see the module docs). A write left
    /// queued past [`MAX_BATCH`] is run by the next caller's batch (every queued write has a caller
    /// running this after queueing it).
    pub(crate) fn run_pending(&self) {
        let mut conn = lock(&self.writer);
        let mut batch: Vec<Box<dyn PendingWrite>> = {
            let mut pending = lock(&self.pending);
            let take = pending.len().min(MAX_BATCH);
            pending.drain(..take).collect()
        };
        if batch.is_empty() {
            return;
        }
        let outcome = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .and_then(|tx| {
                for write in &mut batch {
                    tx.execute_batch("savepoint w")?;
                    if write.run(&tx) {
                        tx.execute_batch("release w")?;
                    } else {
                        tx.execute_batch("rollback to w; release w")?;
                    }
                }
                tx.commit()
            })
            .map_err(BatchFailure::of);
        for write in batch {
            write.answer(outcome.as_ref().map(|_| ()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use mindroom_billing_core::StoreError;

    use crate::{SqliteOptions, SqliteStore};

    /// Writes queued together share transactions, yet each stands or falls alone: a write that
    /// fails leaves nothing behind and takes none of its neighbours with it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_failing_write_rolls_back_only_itself_among_concurrent_writes() {
        let dir = std::env::temp_dir().join(format!("mrb-sqlite-group-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = Arc::new(SqliteStore::open(dir.join("group.db"), SqliteOptions::default()).unwrap());
        store
            .write(|tx| tx.execute_batch("create table t (n integer primary key)").map_err(crate::store_error))
            .await
            .unwrap();

        let writes = (0..64_i64).map(|n| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .write(move |tx| {
                        tx.execute("insert into t (n) values (?1)", [n]).map_err(crate::store_error)?;
                        if n % 5 == 0 {
                            return Err(StoreError::Other(Box::new(std::io::Error::other(format!("refused {n}")))));
                        }
                        Ok(n)
                    })
                    .await
            })
        });
        let mut answered = Vec::new();
        for (n, write) in (0..64_i64).zip(writes.collect::<Vec<_>>()) {
            match write.await.unwrap() {
                Ok(value) => {
                    assert_eq!(value, n, "each caller gets its own answer");
                    answered.push(n);
                }
                Err(e) => {
                    let cause = std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default();
                    assert_eq!(cause, format!("refused {n}"), "only the refused writes fail, each with its own error");
                }
            }
        }
        let stored = store
            .read(|conn| {
                let mut statement = conn.prepare("select n from t order by n").map_err(crate::store_error)?;
                let rows = statement.query_map([], |row| row.get::<_, i64>(0)).map_err(crate::store_error)?;
                rows.collect::<Result<Vec<i64>, _>>().map_err(crate::store_error)
            })
            .await
            .unwrap();
        assert_eq!(stored, answered, "exactly the writes that answered Ok are stored");
        assert_eq!(stored.len(), 64 - 13);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
