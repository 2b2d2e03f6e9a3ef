//! What can go wrong in the store, and whether trying again may help.
//!
//! No sqlx type leaves the store: driver errors are wrapped in [`DatabaseError`], which keeps
//! the message and the one fact callers act on, [`Error::is_transient`]. Which database codes
//! are transient is each dialect's knowledge ([`super::dialect::Dialect::is_transient`]).

use std::fmt;

use super::dialect;

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The saga changed since it was read (its `seq` moved on), or the epoch the commit
    /// presented is no longer the saga's: someone else owns it now.
    #[error("the saga was changed by someone else; reload it and try again")]
    Fenced,
    /// A commit that carried [`super::Commit::plugin_checks`] or a
    /// [`super::Commit::catalog_check`] was refused: fenced as above, or a state value its
    /// calls read is no longer the stored one (another saga's commit, or another host, wrote
    /// it), or the catalog changed since its compensations picked their bindings. Nothing was
    /// written, and the values checked are no longer answered from memory: reload the saga
    /// (and the catalog) and run its steps again.
    #[error(
        "the saga was changed by someone else, or a state value it read or the catalog changed; reload it and try again"
    )]
    StaleRead,
    /// A compare-and-set lost: the stored definition is not the version the change was based on.
    #[error("the definition was changed by someone else since it was read; reload it and try again")]
    Conflict,
    #[error("database error: {0}")]
    Database(DatabaseError),
    #[error("migration failed: {0}")]
    Migrate(DatabaseError),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Unsupported(String),
    /// The database could not be reached at start-up (the text names the cause, never the
    /// password).
    #[error("{0}")]
    Connect(String),
    /// The database belongs to another running host process (a SQLite file's lock is held).
    #[error("{0}")]
    InUse(String),
}

impl Error {
    /// True when the same request may succeed if tried again shortly: the connection was lost
    /// or refused, the pool timed out, the database was busy or locked, or it aborted the
    /// transaction to break a conflict (serialization failure, deadlock, lock timeout, admin
    /// shutdown). Callers answer 503 with `Retry-After`, or retry on their own.
    pub fn is_transient(&self) -> bool {
        match self {
            // A migration that waited too long for a lock (another replica migrating) too.
            Error::Database(e) | Error::Migrate(e) => e.transient,
            Error::Connect(_) => true,
            _ => false,
        }
    }

    /// The database refuses the data itself (a value it cannot hold, a key too large to
    /// index): the same statement with the same data fails every time, whatever the
    /// connection. Only such errors may turn a plugin's result into a failed attempt.
    /// The statement failed because its connection had died (the server ended the session,
    /// a failover, a reset socket): nothing it sent ran, and a read may simply run again on
    /// another connection.
    pub fn is_lost_connection(&self) -> bool {
        matches!(self, Error::Database(e) if e.lost_connection)
    }

    pub fn is_refused_data(&self) -> bool {
        matches!(self, Error::Database(e) if e.refused_data)
    }

    /// An insert found its key taken (a unique or primary key constraint). A commit that
    /// writes a key it read absent inserts it plainly, so this is how it learns another
    /// commit created the key while its statement ran.
    pub(super) fn is_unique_violation(&self) -> bool {
        matches!(self, Error::Database(e) if e.unique_violation)
    }

    /// The database broke a deadlock by failing this transaction (PostgreSQL's 40P01): it
    /// wrote nothing. A commit whose checks lock the rows of keys it writes can meet one with
    /// another commit writing those keys in another order.
    pub(super) fn is_deadlock(&self) -> bool {
        matches!(self, Error::Database(e) if e.deadlock)
    }

    /// The same failure for another caller (a failed group commit fails every job in it with
    /// one error): same kind, message and flags.
    pub(super) fn replicate(&self) -> Error {
        let copy = |e: &DatabaseError| DatabaseError {
            source: Box::<dyn std::error::Error + Send + Sync>::from(e.to_string()),
            transient: e.transient,
            refused_data: e.refused_data,
            lost_connection: e.lost_connection,
            unique_violation: e.unique_violation,
            deadlock: e.deadlock,
        };
        match self {
            Error::Fenced => Error::Fenced,
            Error::StaleRead => Error::StaleRead,
            Error::Conflict => Error::Conflict,
            Error::Database(e) => Error::Database(copy(e)),
            Error::Migrate(e) => Error::Migrate(copy(e)),
            Error::Corrupt(m) => Error::Corrupt(m.clone()),
            Error::Unsupported(m) => Error::Unsupported(m.clone()),
            Error::Connect(m) => Error::Connect(m.clone()),
            Error::InUse(m) => Error::InUse(m.clone()),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A database driver's error, opaque outside the store.
pub struct DatabaseError {
    source: Box<dyn std::error::Error + Send + Sync + 'static>,
    transient: bool,
    refused_data: bool,
    lost_connection: bool,
    unique_violation: bool,
    deadlock: bool,
}

impl DatabaseError {
    fn new(e: sqlx::Error) -> DatabaseError {
        let transient = match &e {
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
            sqlx::Error::Database(db) => dialect::ALL.iter().any(|d| d.is_transient(db.as_ref())),
            _ => false,
        };
        // SQLSTATE class 22 (data exception: a NUL byte, a string too long) and 54 (program
        // limit exceeded: an index row too large) on PostgreSQL; SQLITE_TOOBIG (18) on SQLite.
        let refused_data = match &e {
            sqlx::Error::Database(db) => {
                db.code().is_some_and(|c| c.starts_with("22") || c.starts_with("54") || c == "18")
            }
            _ => false,
        };
        // An I/O error, or the server's notice that it ended the session (57P01 an
        // administrator's pg_terminate_backend, 57P02 a crash shutdown, class 08 a connection
        // exception).
        let lost_connection = match &e {
            sqlx::Error::Io(_) => true,
            sqlx::Error::Database(db) => db.code().is_some_and(|c| c.starts_with("08") || c == "57P01" || c == "57P02"),
            _ => false,
        };
        let unique_violation = matches!(&e, sqlx::Error::Database(db) if db.is_unique_violation());
        let deadlock = matches!(&e, sqlx::Error::Database(db) if db.code().is_some_and(|c| c == "40P01"));
        DatabaseError { source: Box::new(e), transient, refused_data, lost_connection, unique_violation, deadlock }
    }
}

impl fmt::Debug for DatabaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.source, f)
    }
}

impl fmt::Display for DatabaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl std::error::Error for DatabaseError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.source()
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Error {
        Error::Database(DatabaseError::new(e))
    }
}

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(e: sqlx::migrate::MigrateError) -> Error {
        match e {
            sqlx::migrate::MigrateError::Execute(e) => Error::Migrate(DatabaseError::new(e)),
            other => Error::Migrate(DatabaseError {
                source: Box::new(other),
                transient: false,
                refused_data: false,
                lost_connection: false,
                unique_violation: false,
                deadlock: false,
            }),
        }
    }
}
