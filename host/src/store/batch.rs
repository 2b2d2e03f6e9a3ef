//! Group commit: the writes of many callers in one transaction and one durable flush.
//!
//! SQLite admits one writer, and with `synchronous = FULL` every commit waits for an fsync.
//! Committed one by one, 32 sagas' transitions queue for the disk (about 1 ms each here) and
//! the host idles at one core. [`Writes::Grouped`] hands every write (a saga transition, a
//! creation with its idempotency claim, a claim, a lease renewal, an outbox mark, and the rarer
//! ones: the janitor's purges, catalog, grant and audit changes) to one task that owns the
//! writer connection for good: it takes every job that is queued, runs them one after another
//! inside ONE transaction, commits once, and only then answers each caller. Nobody is answered
//! before the flush that makes their write durable, so "acknowledged means durable" holds
//! exactly as with one commit per write. With one caller the batch is that caller's job alone:
//! no timer, no added latency; under load the batch is whatever queued during the previous
//! flush.
//!
//! A batch keeps each job's all-or-nothing meaning:
//! - A job that refuses (`Fenced`: its saga moved on; `Conflict`: a compare-and-set lost) has
//!   written nothing when it says so (every job checks its condition first), so the batch goes
//!   on without it.
//! - A job that fails any other way (a database error mid-job, data the database refuses)
//!   rolls the whole batch back; then every job of the batch runs again alone, in its own
//!   transaction, so the failure stays with the job that caused it. Nobody was answered yet,
//!   and nothing of the batch was visible to anyone, so running a job again is as if it came
//!   later.
//! - A failed COMMIT fails every job of the batch with that error: none of them is durable.
//!
//! Jobs run in the writer task, not in the callers' tasks: a caller that goes away (an HTTP
//! client hung up) cannot leave half a job in a shared transaction. Jobs see each other's
//! writes in order (one connection, one transaction), so two jobs on one saga in one batch
//! behave as if committed one after the other: the second is fenced by the first's `seq`.
//!
//! PostgreSQL commits concurrently over many connections and flushes its WAL for concurrent
//! commits together on its own, so there [`Writes::Direct`] runs each job in its own
//! transaction on a pooled connection, in the caller's task: the same job code, one commit
//! path.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::TryStreamExt as _;
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool};
use tokio::sync::{mpsc, oneshot};

use super::{Error, Result, WriteStats};

/// A boxed future borrowing a connection (and the job).
pub(super) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The most jobs in one transaction. Bounds how long one flush keeps the next callers
/// waiting; under the heaviest load measured a batch holds a few dozen jobs.
const MAX_BATCH: usize = 256;

/// One write: statements run on the connection it is given, inside a transaction it does not
/// open or close, with the data it owns (`D`, handed to it on every try). It may run more than
/// once (after a rolled-back batch), so it changes nothing outside the database, and it must
/// return `Err(Fenced)` or `Err(Conflict)` only before its first write.
pub(super) type JobFn<D, T> = for<'c> fn(&'c D, &'c mut AnyConnection) -> BoxFuture<'c, Result<T>>;

struct Job<D, T> {
    data: D,
    run: JobFn<D, T>,
}

/// How the store runs its writes.
pub(super) struct Writes {
    mode: Mode,
    counters: Arc<Counters>,
}

enum Mode {
    /// Each job in its own transaction, in the caller's task (PostgreSQL).
    Direct(AnyPool),
    /// Jobs queued to the group-commit task (SQLite).
    Grouped(mpsc::UnboundedSender<Box<dyn Queued>>),
}

/// What the writes did so far: jobs per transaction is how well commits are shared.
#[derive(Default)]
struct Counters {
    transactions: AtomicU64,
    jobs: AtomicU64,
}

impl Writes {
    /// Each job in its own transaction on a connection of `pool`.
    pub(super) fn direct(pool: AnyPool) -> Writes {
        Writes { mode: Mode::Direct(pool), counters: Arc::default() }
    }

    /// Group commit over `pool`'s connection: starts the writer task on a thread of its own
    /// (it ends when the store is dropped).
    ///
    /// Its own thread, with a runtime of its own, because a batch is a dozen round trips to
    /// the connection's thread (`BEGIN`, one per job, `COMMIT`), each of which wakes the task
    /// that waits for it. On the host's shared runtime every wake-up queued behind the plugin
    /// calls and requests of the moment, and the one writer, which everyone waits for, spent
    /// most of a batch waiting for a turn (measured: 7.6 ms per batch of 14 jobs at ~570
    /// sagas/s, with both cores less than half busy).
    pub(super) fn grouped(pool: AnyPool) -> Writes {
        let (tx, rx) = mpsc::unbounded_channel();
        let counters = Arc::<Counters>::default();
        let task = group_commit(pool, rx, Arc::clone(&counters));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build();
        match runtime {
            Ok(runtime) => {
                let spawned =
                    std::thread::Builder::new().name("sagahost-writer".into()).spawn(move || runtime.block_on(task));
                if let Err(e) = spawned {
                    // The channel's receiver went with the closure: every write fails, and says so.
                    tracing::error!(error = %e, "could not start the store's writer thread");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "no runtime for the store's writer thread; it runs on the host's");
                tokio::spawn(task);
            }
        }
        Writes { mode: Mode::Grouped(tx), counters }
    }

    /// (transactions committed or tried, jobs run) since the store opened.
    pub(super) fn stats(&self) -> WriteStats {
        WriteStats {
            transactions: self.counters.transactions.load(Ordering::Relaxed),
            jobs: self.counters.jobs.load(Ordering::Relaxed),
        }
    }

    /// Runs the job `run` with `data` and returns once its outcome is durable (or known to
    /// have failed).
    pub(super) async fn run<D, T>(&self, data: D, run: JobFn<D, T>) -> Result<T>
    where
        D: Send + Sync + 'static,
        T: Send + 'static,
    {
        self.submit(data, run, false).await
    }

    /// [`Writes::run`] for a job of one statement (a claim, a lease renewal): on PostgreSQL it
    /// runs without `BEGIN` and `COMMIT`, saving two round trips.
    pub(super) async fn run_one<D, T>(&self, data: D, run: JobFn<D, T>) -> Result<T>
    where
        D: Send + Sync + 'static,
        T: Send + 'static,
    {
        self.submit(data, run, true).await
    }

    /// [`Writes::run`], or [`Writes::run_one`] when `single_statement`.
    pub(super) async fn submit<D, T>(&self, data: D, run: JobFn<D, T>, single_statement: bool) -> Result<T>
    where
        D: Send + Sync + 'static,
        T: Send + 'static,
    {
        self.counters.jobs.fetch_add(1, Ordering::Relaxed);
        match &self.mode {
            Mode::Direct(pool) => {
                self.counters.transactions.fetch_add(1, Ordering::Relaxed);
                if single_statement {
                    let mut conn = pool.acquire().await?;
                    return run(&data, &mut conn).await;
                }
                let mut tx = super::dialect::begin(pool, None).await?;
                match run(&data, &mut tx).await {
                    Ok(out) => {
                        tx.commit().await?;
                        Ok(out)
                    }
                    Err(e) => {
                        // Dropping the transaction rolls it back too; an explicit rollback
                        // returns the connection to the pool clean at once.
                        let _ = tx.rollback().await;
                        Err(e)
                    }
                }
            }
            Mode::Grouped(queue) => {
                let (reply, answer) = oneshot::channel();
                let slot = Slot { job: Job { data, run }, result: None, reply };
                queue.send(Box::new(slot)).map_err(|_| stopped())?;
                answer.await.map_err(|_| stopped())?
            }
        }
    }
}

fn stopped() -> Error {
    Error::Unsupported("the store's writer has stopped (the process is shutting down)".to_owned())
}

/// Whether a job's error leaves writes behind that the batch must undo.
fn aborts_batch(e: &Error) -> bool {
    !matches!(e, Error::Fenced | Error::Conflict)
}

/// A queued job with its caller's reply channel, its type erased.
pub(super) trait Queued: Send {
    /// Runs the job inside the batch's transaction and keeps its result. `Err` means the job
    /// failed halfway: the batch must be rolled back.
    fn run<'c>(&'c mut self, conn: &'c mut AnyConnection) -> BoxFuture<'c, Result<()>>;
    /// Sends the kept result (the batch committed, or the job refused without writing).
    fn answer(self: Box<Self>);
    /// Sends `e` instead (the batch's commit failed).
    fn fail(self: Box<Self>, e: Error);
}

struct Slot<D, T> {
    job: Job<D, T>,
    result: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
}

impl<D: Send + Sync + 'static, T: Send + 'static> Queued for Slot<D, T> {
    fn run<'c>(&'c mut self, conn: &'c mut AnyConnection) -> BoxFuture<'c, Result<()>> {
        Box::pin(async move {
            match (self.job.run)(&self.job.data, conn).await {
                Err(e) if aborts_batch(&e) => {
                    self.result = None;
                    Err(e)
                }
                done => {
                    self.result = Some(done);
                    Ok(())
                }
            }
        })
    }

    fn answer(self: Box<Self>) {
        let result = self.result.unwrap_or_else(|| Err(Error::Corrupt("a batched write was never run".to_owned())));
        // The caller may be gone (a client hung up): the write stands all the same.
        let _ = self.reply.send(result);
    }

    fn fail(self: Box<Self>, e: Error) {
        let _ = self.reply.send(Err(e));
    }
}

/// The writer task: takes whatever is queued, up to [`MAX_BATCH`], and commits it together.
///
/// It takes the pool's connection once and keeps it for every batch, until the store is
/// dropped or the connection is lost: sqlx tests a connection as it goes back to its pool (a
/// ping, one more round trip to SQLite's connection thread, and a wake-up of that thread, per
/// batch). Nothing else writes through the pool (every write is a job), so nobody waits for
/// it.
async fn group_commit(pool: AnyPool, mut queue: mpsc::UnboundedReceiver<Box<dyn Queued>>, counters: Arc<Counters>) {
    let mut batch: Vec<Box<dyn Queued>> = Vec::with_capacity(MAX_BATCH);
    let mut held: Option<Writer> = None;
    while let Some(first) = queue.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        counters.transactions.fetch_add(1, Ordering::Relaxed);
        let writer = match held.take() {
            Some(writer) => held.insert(writer),
            None => match pool.acquire().await {
                Ok(conn) => held.insert(Writer { conn, begun: false }),
                Err(e) => {
                    let e = Error::from(e);
                    batch.drain(..).for_each(|job| job.fail(e.replicate()));
                    continue;
                }
            },
        };
        if !run_batch(writer, &mut batch).await {
            // Closed, not given back: the next batch connects again.
            if let Some(lost) = held.take() {
                let _ = lost.conn.close().await;
            }
        }
        debug_assert!(batch.is_empty());
    }
    // Closing rolls back the transaction begun for a batch that never came: it wrote nothing.
    if let Some(writer) = held {
        let _ = writer.conn.close().await;
    }
}

/// The writer's connection, and whether a transaction is open on it that no statement has
/// touched yet.
///
/// A batch's commit begins the next batch's transaction in the same round trip to the
/// connection's thread (`COMMIT; BEGIN`), so a batch starts without one of its own: at low
/// rates, where every write is a batch of one, that is one round trip of three. SQLite's
/// `BEGIN` is deferred: it takes no lock and fixes no snapshot until the transaction's first
/// statement, so an idle transaction holds back nothing (not the checkpointer, not the WAL's
/// restart) and the next batch sees every commit before it. Only these statements open and
/// close transactions on this connection (no job does; sqlx's own transaction methods are not
/// used here, as they would not know of this one).
struct Writer {
    conn: PoolConnection<Any>,
    begun: bool,
}

impl Writer {
    /// Makes sure a transaction is open. Should a `BEGIN` find one open that this does not
    /// know of (none can be, but a connection stuck in one would refuse every batch), that one
    /// is rolled back and the `BEGIN` tried once more.
    async fn open(&mut self) -> Result<()> {
        if self.begun {
            return Ok(());
        }
        if sqlx::Executor::execute(&mut *self.conn, "BEGIN").await.is_err() {
            self.roll_back().await;
            sqlx::Executor::execute(&mut *self.conn, "BEGIN").await?;
        }
        self.begun = true;
        Ok(())
    }

    /// Commits the open transaction and begins the next one. `Ok` once the commit is durable,
    /// whether or not the `BEGIN` after it ran (if not, the next batch begins on its own).
    async fn commit(&mut self) -> Result<()> {
        self.begun = false;
        let mut done = 0;
        let failed = {
            // One result per statement, in order: an error before the first is the commit's.
            let mut results = sqlx::Executor::fetch_many(&mut *self.conn, "COMMIT; BEGIN");
            loop {
                match results.try_next().await {
                    Ok(Some(_)) => done += 1,
                    Ok(None) => break None,
                    Err(e) => break Some(e),
                }
            }
        };
        match (failed, done) {
            (None, _) => {
                self.begun = done == 2;
                Ok(())
            }
            (Some(e), 0) => {
                // SQLite may have rolled the transaction back itself (an I/O error) or kept it
                // open (busy): either way it is gone after this, and none of it is durable.
                self.roll_back().await;
                Err(e.into())
            }
            (Some(e), _) => {
                tracing::debug!(error = %e, "the writer's next transaction did not begin; the next batch begins it");
                Ok(())
            }
        }
    }

    /// Rolls the open transaction back. A failure to is not reported: the transaction is gone
    /// either way (or the connection is, which the batch's own error shows).
    async fn roll_back(&mut self) {
        self.begun = false;
        let _ = sqlx::Executor::execute(&mut *self.conn, "ROLLBACK").await;
    }
}

/// Why a batch did not commit as one.
enum Failed {
    /// Before any job ran (no connection, `BEGIN` failed) or at `COMMIT`: every job fails.
    Batch(Error),
    /// A job failed halfway; the batch was rolled back.
    Job,
}

/// Runs `batch` on `writer` and answers every job. False when the connection was lost on the
/// way (the next batch needs a new one).
async fn run_batch(writer: &mut Writer, batch: &mut Vec<Box<dyn Queued>>) -> bool {
    tracing::trace!(jobs = batch.len(), "group commit");
    match together(writer, batch).await {
        Ok(()) => {
            batch.drain(..).for_each(|job| job.answer());
            true
        }
        Err(Failed::Batch(e)) => {
            batch.drain(..).for_each(|job| job.fail(e.replicate()));
            !e.is_lost_connection()
        }
        Err(Failed::Job) => {
            // Each alone, so the failure stays with its job.
            let mut kept = true;
            for mut job in batch.drain(..) {
                match alone(writer, job.as_mut()).await {
                    Ok(()) => job.answer(),
                    Err(e) => {
                        kept &= !e.is_lost_connection();
                        job.fail(e);
                    }
                }
            }
            kept
        }
    }
}

/// The batch in one transaction on the writer's own connection. (Not [`super::dialect::begin`]:
/// this task is never cancelled halfway, so no `BEGIN` of it can be forgotten.)
async fn together(writer: &mut Writer, batch: &mut [Box<dyn Queued>]) -> Result<(), Failed> {
    writer.open().await.map_err(Failed::Batch)?;
    for job in batch.iter_mut() {
        if job.run(&mut writer.conn).await.is_err() {
            writer.roll_back().await;
            return Err(Failed::Job);
        }
    }
    writer.commit().await.map_err(Failed::Batch)
}

/// Runs one job in its own transaction: `Ok` when its kept result may be sent (committed, or
/// refused without writing).
async fn alone(writer: &mut Writer, job: &mut dyn Queued) -> Result<()> {
    writer.open().await?;
    match job.run(&mut writer.conn).await {
        Ok(()) => writer.commit().await,
        Err(e) => {
            writer.roll_back().await;
            Err(e)
        }
    }
}
