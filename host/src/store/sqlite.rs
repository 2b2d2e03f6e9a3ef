//! The SQLite dialect: the embedded default, one host process per database file.
//!
//! Writes go through a pool of exactly one connection. SQLite allows one writer at a time
//! anyway; funnelling writes through one connection means a transaction never meets
//! `SQLITE_BUSY` halfway (no deferred-to-write lock upgrade can fail), and it is the natural
//! place to batch commits across sagas later. Reads use a separate pool of read-only
//! connections: in WAL mode readers never block the writer nor each other.
//!
//! `synchronous = FULL`: a commit is on disk before we acknowledge it, so "nothing
//! acknowledged is lost" holds across power loss, not only process crashes.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::ConnectOptions as _;

use super::dialect::{Dialect, Pools};
use super::Result;

static MIGRATOR: Migrator = sqlx::migrate!("../migrations/sqlite");

/// Set on every connection. WAL so readers never block the writer; FULL so an acknowledged
/// commit survives power loss; foreign keys on (SQLite's default is off); a busy timeout for
/// the rare moment a checkpoint or a reader's WAL lock makes a statement wait.
const SESSION: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; \
     PRAGMA busy_timeout = 10000;";

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

    fn now_ms(&self) -> &'static str {
        "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
    }

    fn skip_locked(&self) -> &'static str {
        // One writer connection: claims are serialised, there is nothing to skip.
        ""
    }

    fn begin_snapshot(&self) -> &'static str {
        // A deferred read transaction: in WAL mode its first SELECT fixes the snapshot.
        "BEGIN"
    }

    fn group_commit(&self) -> bool {
        true
    }

    fn scripts(&self) -> bool {
        true
    }

    fn migrator(&self) -> &'static Migrator {
        &MIGRATOR
    }

    async fn connect(&self, url: &str, _max_connections: u32) -> Result<Pools> {
        let options = SqliteConnectOptions::from_str(url)?;
        let writer_url = options.clone().create_if_missing(true).to_url_lossy();
        let reader_url = options.create_if_missing(false).read_only(true).to_url_lossy();
        let session = |pool: AnyPoolOptions| {
            pool.after_connect(|conn, _| {
                Box::pin(async move { sqlx::Executor::execute(conn, SESSION).await.map(drop) })
            })
        };
        // No ping before each use (sqlx's default): a connection to a local file does not go
        // stale, and the ping is one more round trip to the connection's thread per read and
        // per batch of writes.
        let session = |pool: AnyPoolOptions| session(pool.test_before_acquire(false));
        // The writer first: it creates the file and switches it to WAL before any reader opens it.
        let writer = session(AnyPoolOptions::new())
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
        Ok(Pools { writer, reader })
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
