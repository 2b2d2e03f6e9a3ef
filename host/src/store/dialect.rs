//! What differs between the databases the store runs on, and nothing else.
//!
//! The store's statements are written once, in the SQL that SQLite and PostgreSQL share
//! (`$N` placeholders, `ON CONFLICT`, `RETURNING`, `CAST(.. AS ..)`, row values, `UPDATE ..
//! FROM`, `WITH .. AS MATERIALIZED`), and run through sqlx's `Any` driver. A [`Dialect`] holds
//! the handful of clauses that cannot be shared (the database's clock, row locks that skip
//! locked rows, how a snapshot read begins, a set of integers bound as one value), how
//! connections are made, which migrations apply, and which of the database's error codes mean
//! "try again".
//!
//! Adding a backend means one more `Dialect` (a file beside `sqlite.rs` and `postgres.rs`,
//! listed in [`ALL`]) and one more folder under `migrations/`, in lockstep with the others.
//! It must not mean another copy of any statement.

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::AnyPool;

use super::Result;

/// The connections a store uses. Databases with one writer (SQLite) get a pool of exactly one
/// writer connection and a separate reader pool; others use one pool for both.
pub struct Pools {
    pub writer: AnyPool,
    pub reader: AnyPool,
    /// Stops the dialect's background work (SQLite's checkpointer) when dropped with the store.
    pub background: Option<tokio_util::sync::DropGuard>,
}

/// One database's differences from the shared SQL.
#[async_trait]
pub trait Dialect: Send + Sync + 'static {
    /// For logs and test names, e.g. `sqlite`.
    fn name(&self) -> &'static str;
    /// Whether this dialect serves a database URL (by its scheme).
    fn accepts(&self, url: &str) -> bool;
    /// An SQL expression for the database's clock in milliseconds since the Unix epoch, as a
    /// 64-bit integer. Leases are measured on it so that hosts with skewed clocks agree.
    fn now_ms(&self) -> &'static str;
    /// Whether processes on several machines share one database (their clocks may differ, so
    /// they keep to the database's: [`super::SagaStore::database_now_ms`]). Not SQLite: one
    /// process on one machine, whose clock is the database's.
    fn shared_by_hosts(&self) -> bool {
        true
    }
    /// Appended to a `SELECT .. LIMIT n` that picks rows to change in the same statement or
    /// transaction: locks them and skips rows another transaction has locked, so concurrent
    /// claimers take disjoint rows without queueing. Empty where writers are serialised anyway.
    fn skip_locked(&self) -> &'static str;
    /// Appended to a `SELECT` whose rows a statement must hold until it commits (no other
    /// transaction may change or delete them meanwhile). Empty where writers are serialised
    /// anyway.
    fn for_update(&self) -> &'static str;
    /// The statement that begins a read-only transaction in which several SELECTs see one
    /// snapshot (a saga row and its steps).
    fn begin_snapshot(&self) -> &'static str;
    /// A condition that `column` is one of the 64-bit integers of the text parameter `param`,
    /// written comma-separated (`1,2,3`; empty: none). One statement, prepared once, for a
    /// set of any size, where `IN ($2, $3, ..)` takes a placeholder per member and a
    /// statement per size.
    fn in_integers(&self, column: &str, param: &str) -> String;
    /// Whether writes share transactions ([`super::batch::Writes::Grouped`]): true
    /// where the database has one writer and a commit is an fsync the next writer waits for.
    fn group_commit(&self) -> bool;
    /// How the statements of one write are folded into fewer queries, each a round trip.
    fn folding(&self) -> Folding;
    /// The schema, `migrations/<dialect>/`, made with [`tolerant`].
    fn migrator(&self) -> &'static Migrator;
    /// Opens the pools for `url`, with the session settings this database needs. The first
    /// failure to reach the server is [`super::Error::Connect`] and says why without the
    /// password.
    async fn connect(&self, url: &str, max_connections: u32) -> Result<Pools>;
    /// Takes the database for this process where it is meant to have one (a SQLite file):
    /// the lock, held as long as the returned file is open, or [`super::Error::InUse`] when
    /// another process holds it. `None` where many processes share the database by design.
    fn lock(&self, _url: &str) -> Result<Option<std::fs::File>> {
        Ok(None)
    }
    /// Whether a database error of this backend is worth retrying as it is (busy, locked,
    /// serialization failure, deadlock, connection lost). Errors of other backends are false.
    fn is_transient(&self, e: &dyn sqlx::error::DatabaseError) -> bool;
}

/// How a write's statements become queries ([`super::sql`]'s `Script`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Folding {
    /// All of them, one query: a script of several statements with arguments numbered `$n`
    /// across them all. SQLite's driver runs it in one round trip to its connection thread.
    Script,
    /// One statement per fenced group, its writes as data-modifying CTEs that depend on the
    /// group's head through its `RETURNING` (PostgreSQL, whose extended protocol runs one
    /// statement per round trip and SQLite cannot write inside `WITH`).
    Ctes,
}

/// Every dialect, in the order URLs are matched.
pub static ALL: &[&dyn Dialect] = &[&super::sqlite::Sqlite, &super::postgres::Postgres];

/// The dialect that serves `url`, if any.
pub fn for_url(url: &str) -> Option<&'static dyn Dialect> {
    ALL.iter().copied().find(|d| d.accepts(url))
}

/// Begins a transaction on a connection of `pool` (`statement` instead of `BEGIN`, if given)
/// where no caller can cancel it half-way. sqlx (0.8) forgets a `BEGIN` whose future was
/// dropped between sending it and its answer (it counts the transaction only once answered,
/// and its drop guard rolls back only what it counted): the connection went back to the pool
/// inside a transaction block nobody knew of, single statements on it were never committed,
/// and once one failed every later one did (25P02). A request whose client hung up, a timeout
/// or a relay publish dropped with its lease could do that. In a task of its own, `BEGIN`
/// always completes; a caller gone by then drops the transaction, which sqlx then does roll
/// back.
pub(super) async fn begin(
    pool: &sqlx::AnyPool,
    statement: Option<&'static str>,
) -> super::Result<sqlx::Transaction<'static, sqlx::Any>> {
    let pool = pool.clone();
    let begun = tokio::spawn(async move {
        match statement {
            Some(statement) => pool.begin_with(statement).await,
            None => pool.begin().await,
        }
    });
    match begun.await {
        Ok(tx) => Ok(tx?),
        Err(e) => Err(super::Error::Unsupported(format!("the task beginning a transaction failed: {e}"))),
    }
}

/// `migrator` made to start on a database a later release has migrated further: during a
/// rolling upgrade a replica of the previous release that restarts (a crash, a node drained)
/// finds migrations it does not know applied, and sqlx refused to start it (`VersionMissing`),
/// so it crash-looped until upgraded. Architecture invariant: every migration leaves the schema
/// usable by the release before it (columns added nullable or with a default, indexes,
/// tables), so that release runs on it. Migrations it knows must still be applied unchanged
/// (their checksums are checked as before).
pub const fn tolerant(mut migrator: Migrator) -> Migrator {
    migrator.ignore_missing = true;
    migrator
}
