//! The PostgreSQL dialect: production, any number of host replicas on one database; plus
//! [`scratch_database`] and [`drop_database`] for tests.
//!
//! What differs from SQLite is how several processes share the data:
//!
//! - Due sagas are claimed with `FOR UPDATE SKIP LOCKED`, so replicas polling at once take
//!   disjoint sets without waiting on each other, plus the lease and the fencing epoch that
//!   SQLite uses too. Leases are measured on the database's clock (`clock_timestamp()`), so
//!   replicas with skewed clocks agree on when one expired.
//! - A saga and its steps are read in one REPEATABLE READ transaction (one snapshot).
//! - Sessions set `idle_in_transaction_session_timeout` and `lock_timeout` (10 s): a replica
//!   frozen mid-transaction (SIGSTOP, a long VM pause) loses its session and its row locks
//!   instead of blocking the others.
//!
//! Connections that die (`pg_terminate_backend`, a failover) surface as errors of the
//! statement that used them, classed transient; the pool opens new ones, and the driver, the
//! relay and clients (503 with `Retry-After`) retry.

use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::postgres::PgConnectOptions;
use sqlx::ConnectOptions as _;

use super::dialect::{Dialect, Folding, Pools};
use super::{Error, Result};

static MIGRATOR: Migrator = super::dialect::tolerant(sqlx::migrate!("../migrations/postgres"));

/// Connections per replica unless the caller says otherwise.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 16;

/// A pooled connection idle at least this long is pinged before it is handed out (HikariCP's
/// `aliveBypassWindowMs`, same value): one used within the last half second is alive.
const PING_IF_IDLE_FOR: Duration = Duration::from_millis(500);

/// Set on every new connection (one round trip).
const SESSION: &str = "SET application_name = 'sagahost'; SET idle_in_transaction_session_timeout = '10s'; \
     SET lock_timeout = '10s'";

/// "current transaction is aborted, commands ignored until end of transaction block".
const IN_FAILED_TRANSACTION: &str = "25P02";

/// Acquisitions left that first end whatever transaction block their connection is in. A
/// future dropped while its `BEGIN` was on the wire (a timeout, a lease lost mid-publish after
/// the process was frozen) can return a connection to the pool inside a transaction block sqlx
/// does not know of; the first statement that fails there leaves it aborted, and every
/// statement after it failed with 25P02, for as long as the connection lived (a replica's relay
/// and catalog stalled for good in a test). Seeing 25P02 arms this for more acquisitions than
/// any pool has connections.
static STRAY_CHECKS: AtomicU32 = AtomicU32::new(0);
const STRAY_CHECK_ROUNDS: u32 = 256;

/// Whether stray-transaction checks are armed (for tests).
#[cfg(test)]
pub(super) fn stray_checks_armed() -> bool {
    STRAY_CHECKS.load(Ordering::Relaxed) > 0
}

/// Takes one stray-transaction check if any is armed.
fn take_stray_check() -> bool {
    STRAY_CHECKS.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok()
}

/// PostgreSQL.
pub struct Postgres;

#[async_trait]
impl Dialect for Postgres {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn accepts(&self, url: &str) -> bool {
        url.starts_with("postgres://") || url.starts_with("postgresql://")
    }

    fn now_ms(&self) -> &'static str {
        // clock_timestamp(), not now(): now() is the transaction's start, frozen for its length.
        "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
    }

    fn skip_locked(&self) -> &'static str {
        " FOR UPDATE SKIP LOCKED"
    }

    fn for_update(&self) -> &'static str {
        " FOR UPDATE"
    }

    fn in_integers(&self, column: &str, param: &str) -> String {
        // The list as an array literal: one index scan over the members.
        format!("{column} = ANY (CAST('{{' || {param} || '}}' AS BIGINT[]))")
    }

    fn begin_snapshot(&self) -> &'static str {
        "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"
    }

    fn group_commit(&self) -> bool {
        false
    }

    fn folding(&self) -> Folding {
        Folding::Ctes
    }

    fn migrator(&self) -> &'static Migrator {
        // sqlx takes an advisory lock around migrations, so replicas starting together
        // migrate once.
        &MIGRATOR
    }

    async fn connect(&self, url: &str, max_connections: u32) -> Result<Pools> {
        let options = PgConnectOptions::from_str(url)?;
        // One direct connection first: a pool only reports "timed out", this says why
        // (refused, unknown host, authentication, no such database). No password in the text.
        let probe = options.connect().await.map_err(|e| {
            Error::Connect(format!(
                "cannot connect to PostgreSQL at {}:{} as '{}', database '{}': {e}",
                options.get_host(),
                options.get_port(),
                options.get_username(),
                options.get_database().unwrap_or("(default)"),
            ))
        })?;
        sqlx::Connection::close(probe).await?;
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(Duration::from_secs(10))
            // Ping only connections that sat idle (after a server restart or a failover the
            // idle ones are the dead ones), not every acquire: sqlx's default pings each time,
            // a round trip more for every state read and commit, a tenth of the database's work
            // per saga. A dead connection used recently fails its one statement at once: reads
            // run again on another (`SqlStore::read`), writes are retried as after any
            // connection loss.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if take_stray_check() {
                        // A connection may be stuck in a transaction block sqlx does not know
                        // of (see `STRAY_CHECKS`): end it, whatever it holds.
                        sqlx::Executor::execute(&mut *conn, "ROLLBACK").await?;
                    } else if meta.idle_for >= PING_IF_IDLE_FOR {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .after_connect(|conn, _| Box::pin(async move { sqlx::Executor::execute(conn, SESSION).await.map(drop) }))
            .connect_with(AnyConnectOptions::from_str(url)?)
            .await?;
        Ok(Pools { writer: pool.clone(), reader: pool, background: None })
    }

    fn is_transient(&self, e: &dyn sqlx::error::DatabaseError) -> bool {
        let Some(e) = e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() else { return false };
        let code = e.code();
        // Class 08: connection exceptions. 40001 serialization_failure, 40P01 deadlock_detected,
        // 55P03 lock_not_available (our lock_timeout), 57P01-57P03 admin or crash shutdown and
        // "the database system is starting up", 53300 too_many_connections, 25P03 the session
        // was ended for idling in a transaction (a frozen process), 57014 a cancelled statement.
        if code == IN_FAILED_TRANSACTION {
            // A pooled connection is stuck in a failed transaction block: check every pooled
            // connection before its next use; the retry gets a clean one.
            STRAY_CHECKS.store(STRAY_CHECK_ROUNDS, Ordering::Relaxed);
            return true;
        }
        code.starts_with("08")
            || matches!(code, "40001" | "40P01" | "55P03" | "57P01" | "57P02" | "57P03" | "53300" | "25P03" | "57014")
    }
}

/// A fresh, empty database on the server `admin_url` points at, named with `prefix` and a
/// random suffix; returns its URL. For tests, which each need their own.
pub async fn scratch_database(admin_url: &str, prefix: &str) -> Result<String> {
    let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    let mut conn = PgConnectOptions::from_str(admin_url)?.connect().await?;
    sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut conn).await?;
    sqlx::Connection::close(conn).await?;
    let mut url = url_without_database(admin_url);
    url.push('/');
    url.push_str(&name);
    Ok(url)
}

/// Drops a database made by [`scratch_database`], disconnecting whoever still uses it.
pub async fn drop_database(admin_url: &str, url: &str) -> Result<()> {
    let name = url.rsplit('/').next().unwrap_or_default().split('?').next().unwrap_or_default();
    let mut conn = PgConnectOptions::from_str(admin_url)?.connect().await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&mut conn).await?;
    sqlx::Connection::close(conn).await?;
    Ok(())
}

/// `postgres://user@host:port/db?x=y` without `/db?x=y`.
fn url_without_database(url: &str) -> String {
    let base = url.split('?').next().unwrap_or(url);
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    match base[after_scheme..].find('/') {
        Some(i) => base[..after_scheme + i].to_owned(),
        None => base.to_owned(),
    }
}
