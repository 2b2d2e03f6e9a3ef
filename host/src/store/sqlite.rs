//! The SQLite dialect: the embedded default, one host process per database file.
//!
//! Writes go through a pool of exactly one connection. SQLite allows one writer at a time
//! anyway; funnelling writes through one connection means a transaction never meets
//! `SQLITE_BUSY` halfway (no deferred-to-write lock upgrade can fail), and it is where commits
//! are shared across sagas: the group-commit task (`batch.rs`) takes that connection for good,
//! and every write is a job of it. Reads use a separate pool of read-only connections: in WAL
//! mode readers never block the writer nor each other.
//!
//! `synchronous = FULL`: a commit is on disk before we acknowledge it, so "nothing
//! acknowledged is lost" holds across power loss, not only process crashes.
//!
//! One host process per database file is enforced, not only advised: a serving host locks
//! `<file>.lock` ([`Dialect::lock`]) and a second one on the same file stops at start-up with
//! [`Error::InUse`]. Owning every write lets the store answer reads of plugin state keys that
//! were never written without a query (`store/keys.rs`).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::ConnectOptions as _;

use super::dialect::{Dialect, Folding, Pools};
use super::{Error, Result};

static MIGRATOR: Migrator = super::dialect::tolerant(sqlx::migrate!("../migrations/sqlite"));

/// The pragmas of every connection, plus `$extra`.
macro_rules! session {
    ($($extra:literal)?) => {
        concat!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; \
             PRAGMA busy_timeout = 10000;",
            $($extra)?
        )
    };
}

/// Set on every connection. WAL so readers never block the writer; FULL so an acknowledged
/// commit survives power loss; foreign keys on (SQLite's default is off); a busy timeout for
/// the rare moment a checkpoint or a reader's WAL lock makes a statement wait.
const SESSION: &str = session!();

/// [`SESSION`] for the writer connection: an automatic checkpoint only past 4,000 pages of WAL
/// (SQLite's default is 1,000), as the backstop of [`checkpoints`].
const WRITER_SESSION: &str = session!(" PRAGMA wal_autocheckpoint = 4000;");

/// How often the checkpointer copies the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Copies committed WAL frames into the database file, off the commit path, until `stop`.
///
/// SQLite's default is an automatic checkpoint inside the commit that takes the WAL past
/// 1,000 pages: that commit (and so every group commit waiting behind it on the one writer)
/// copies the pages and fsyncs the database file (measured: 6% of the writer connection's CPU
/// at the closed-loop peak, plus the fsync). Here a task on a connection of its own runs a
/// PASSIVE checkpoint every [`CHECKPOINT_EVERY`], beside the writer and the readers and never
/// waiting for them. Under continuous writes it cannot finish (frames keep coming), so the
/// WAL could never start over and would grow without end; the writer therefore still
/// checkpoints past 4,000 pages, but by then nearly everything is copied, and with no write
/// running beside it that checkpoint finishes, so the next transaction starts the WAL from
/// the beginning again.
async fn checkpoints(pool: sqlx::AnyPool, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool).await {
            tracing::warn!(error = %e, "checkpointing the SQLite WAL failed; trying again shortly");
        }
    }
    pool.close().await;
}

/// The `sqlite:` URL of a database file (created if missing).
pub fn file_url(path: &Path) -> String {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    SqliteConnectOptions::new().filename(path).create_if_missing(true).to_url_lossy().to_string()
}

/// SQLite.
pub struct Sqlite;

#[async_trait]
impl Dialect for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn accepts(&self, url: &str) -> bool {
        url.starts_with("sqlite:")
    }

    fn shared_by_hosts(&self) -> bool {
        false
    }

    fn now_ms(&self) -> &'static str {
        "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
    }

    fn skip_locked(&self) -> &'static str {
        // One writer connection: claims are serialised, there is nothing to skip.
        ""
    }

    fn for_update(&self) -> &'static str {
        ""
    }

    fn in_integers(&self, column: &str, param: &str) -> String {
        // The list as a JSON array: SQLite looks each member up by the column's index.
        format!("{column} IN (SELECT value FROM json_each('[' || {param} || ']'))")
    }

    fn begin_snapshot(&self) -> &'static str {
        // A deferred read transaction: in WAL mode its first SELECT fixes the snapshot.
        "BEGIN"
    }

    fn group_commit(&self) -> bool {
        true
    }

    fn folding(&self) -> Folding {
        Folding::Script
    }

    fn migrator(&self) -> &'static Migrator {
        &MIGRATOR
    }

    async fn connect(&self, url: &str, _max_connections: u32) -> Result<Pools> {
        let options = SqliteConnectOptions::from_str(url)?;
        let writer_url = options.clone().create_if_missing(true).to_url_lossy();
        let reader_url = options.create_if_missing(false).read_only(true).to_url_lossy();
        // No ping before each use (sqlx's default): a connection to a local file does not go
        // stale, and the ping is one more round trip to the connection's thread per read and
        // per batch of writes.
        let with = |pool: AnyPoolOptions, pragmas: &'static str| {
            pool.test_before_acquire(false).after_connect(move |conn, _| {
                Box::pin(async move { sqlx::Executor::execute(conn, pragmas).await.map(drop) })
            })
        };
        let session = |pool: AnyPoolOptions| with(pool, SESSION);
        // The writer first: it creates the file and switches it to WAL before any reader opens
        // it. It checkpoints rarely (the checkpointer below does most of it).
        let writer = with(AnyPoolOptions::new(), WRITER_SESSION)
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(AnyConnectOptions::from_url(&writer_url)?)
            .await?;
        let reader = session(AnyPoolOptions::new())
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(AnyConnectOptions::from_url(&reader_url)?)
            .await?;
        let checkpointer = session(AnyPoolOptions::new())
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(AnyConnectOptions::from_url(&writer_url)?)
            .await?;
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(checkpoints(checkpointer, stop.clone()));
        Ok(Pools { writer, reader, background: Some(stop.drop_guard()) })
    }

    fn lock(&self, url: &str) -> Result<Option<std::fs::File>> {
        let options = SqliteConnectOptions::from_str(url)?;
        let file = options.get_filename();
        if file.as_os_str().is_empty() || file == Path::new(":memory:") {
            return Ok(None);
        }
        // A file beside the database, locked with flock(2): SQLite's own locks are fcntl(2)
        // locks on the database file, which this does not touch. The kernel drops the lock
        // with the process, however it ends.
        let mut path = file.as_os_str().to_owned();
        path.push(".lock");
        let path = std::path::PathBuf::from(path);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::Unsupported(format!("cannot open the lock file {}: {e}", path.display())))?;
        match lock.try_lock() {
            Ok(()) => Ok(Some(lock)),
            Err(std::fs::TryLockError::WouldBlock) => Err(Error::InUse(format!(
                "the database {} is in use by another sagahost process (it holds {}); one host process \
                 per SQLite file: stop the other one, give this one its own --data-dir, or use PostgreSQL \
                 (--database postgres://...) to run replicas",
                file.display(),
                path.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(Error::Unsupported(format!("cannot lock {}: {e}", path.display())))
            }
        }
    }

    fn is_transient(&self, e: &dyn sqlx::error::DatabaseError) -> bool {
        const SQLITE_BUSY: i32 = 5;
        const SQLITE_LOCKED: i32 = 6;
        if e.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_none() {
            return false;
        }
        // The code is the extended result code; its low byte is the primary one.
        let code = e.code().and_then(|c| c.parse::<i32>().ok()).unwrap_or(0);
        matches!(code & 0xff, SQLITE_BUSY | SQLITE_LOCKED)
    }
}
