//! Durable storage: sagas, steps, plugin state, the outbox, idempotency keys, plugins and
//! definitions.
//!
//! Architecture invariant: this is the only module that contains SQL. Everything above it
//! speaks in the types defined here, behind the [`Store`] trait, so that SQLite (embedded
//! default) and PostgreSQL (production) are interchangeable.
//!
//! Architecture invariant: a saga transition is one call, [`Store::commit`], and one
//! database transaction: the saga row, the changed step rows, the plugin's state writes and
//! exactly one outbox row commit together or not at all. Every commit is fenced by the saga's
//! `epoch`, so a worker that lost its claim can never commit.

#[macro_use]
mod shared;
pub mod postgres;
pub mod sqlite;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use crate::engine::{EventSpec, SagaDefinition, SagaState, SagaStatus};

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// Opens the store a database URL names, running its migrations: `sqlite:` URLs and
/// `postgres://` (or `postgresql://`) URLs. `None` is the embedded default, a SQLite file in
/// `data_dir`.
pub async fn open(url: Option<&str>, data_dir: &Path) -> Result<Arc<dyn Store>> {
    open_with(url, data_dir, postgres::DEFAULT_MAX_CONNECTIONS).await
}

/// [`open`] with the size of the PostgreSQL connection pool (SQLite ignores it: it has one
/// writer connection and a small reader pool).
pub async fn open_with(url: Option<&str>, data_dir: &Path, max_connections: u32) -> Result<Arc<dyn Store>> {
    Ok(match url {
        None => Arc::new(SqliteStore::open(&data_dir.join("sagahost.db")).await?),
        Some(url) if url.starts_with("sqlite:") => Arc::new(SqliteStore::open_url(url).await?),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Arc::new(PgStore::open_with(url, max_connections).await?)
        }
        Some(url) => {
            // Never echo credentials back: show the scheme only.
            let scheme = url.split_once(':').map_or("", |(s, _)| s);
            return Err(Error::Unsupported(format!(
                "database URL scheme '{scheme}:' is not supported; use sqlite:PATH or postgres://USER@HOST/DB"
            )));
        }
    })
}

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The saga's epoch moved on: another worker (or an outside event) owns it now.
    #[error("the saga was changed by someone else; reload it and try again")]
    Fenced,
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Connect(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A saga as stored.
#[derive(Debug, Clone)]
pub struct SagaRecord {
    pub id: String,
    pub saga_type: String,
    /// The definition pinned when the saga started.
    pub definition: SagaDefinition,
    /// The saga's input JSON, as accepted.
    pub input: String,
    pub state: SagaState,
    /// The last outbox `seq` issued for this saga.
    pub seq: i64,
    /// The fencing token the next commit must present.
    pub epoch: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A saga to create, with its first outbox event.
#[derive(Debug, Clone)]
pub struct NewSaga {
    pub id: String,
    pub definition: SagaDefinition,
    pub input: String,
    pub state: SagaState,
    pub event: EventSpec,
    pub event_id: String,
    pub now: i64,
}

/// The idempotency key a creating request presents.
#[derive(Debug, Clone)]
pub struct IdempotencyClaim {
    pub caller: String,
    pub route: String,
    pub key: String,
    pub fingerprint: String,
    /// How long an in-flight claim blocks retries before it counts as abandoned.
    pub lock_ms: i64,
    /// How long the key is remembered.
    pub ttl_ms: i64,
    /// The response to store with the claim when it is known up front (status, body); `None`
    /// leaves the key in flight until [`Store::complete_idempotency`].
    pub response: Option<(u16, Vec<u8>)>,
}

/// What happened to a create request under its idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateOutcome {
    /// The key was new: the saga now exists.
    Created,
    /// The key completed before: replay this response.
    Replay { status: u16, body: Vec<u8>, saga_id: Option<String> },
    /// The key's first request is still running.
    InFlight,
    /// The key was used with a different request.
    Mismatch,
    /// The key's first request created this saga but died before storing a response.
    Abandoned { saga_id: String },
}

/// One outbox row awaiting publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub id: i64,
    pub event_id: String,
    pub saga_id: String,
    pub seq: i64,
    pub event_type: String,
    /// The event JSON exactly as it must be published.
    pub payload: String,
    pub created_at: i64,
}

/// A state write buffered during a plugin call: `None` deletes the key.
pub type StateWrite = (String, Option<Vec<u8>>);

/// Who is allowed to commit a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// The driver holding the claim at this epoch; the claim is kept.
    Lease(i64),
    /// The driver holding the claim at this epoch, giving it up with this commit.
    LeaseRelease(i64),
    /// An outside event (client cancel, signal, operator) applied to the state read at this
    /// epoch. It bumps the epoch, which fences out any worker mid-call: that worker's result
    /// is discarded and the step runs again from the new state.
    Takeover(i64),
}

/// One saga transition, committed atomically.
#[derive(Debug, Clone)]
pub struct Commit<'a> {
    pub saga_id: &'a str,
    pub saga_type: &'a str,
    pub fence: Fence,
    pub state: &'a SagaState,
    pub step_names: &'a [String],
    pub changed_steps: &'a [usize],
    /// The plugin whose state space the writes go to, and the writes.
    pub plugin_writes: Option<(&'a str, &'a [StateWrite])>,
    pub event: &'a EventSpec,
    pub event_id: &'a str,
    pub now: i64,
    /// An audit record to write in the same transaction (operator actions).
    pub audit: Option<&'a AuditEntry>,
}

/// One entry of the audit trail.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AuditEntry {
    pub actor: String,
    /// e.g. `saga.retry`, `saga.resolve`.
    pub action: String,
    /// The saga id, plugin digest or binding the action applies to.
    pub target: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
    pub note: Option<String>,
}

/// A stored audit entry.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AuditRecord {
    pub id: i64,
    pub at: i64,
    #[serde(flatten)]
    pub entry: AuditEntry,
}

/// A compact row for listings.
#[derive(Debug, Clone)]
pub struct SagaSummary {
    pub id: String,
    pub saga_type: String,
    pub status: SagaStatus,
    pub reason: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A stored plugin component.
#[derive(Debug, Clone)]
pub struct PluginRow {
    pub digest: String,
    pub name: String,
    pub size: i64,
    pub wasm: Vec<u8>,
    pub uploaded_at: i64,
}

/// A stored plugin version without its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    pub digest: String,
    pub name: String,
    pub size: i64,
    pub uploaded_at: i64,
}

/// Where a definition came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefinitionSource {
    /// Installed by the host itself; upgraded in place when the host ships new defaults.
    Builtin,
    /// Registered through the admin API; never touched by the host.
    Admin,
}

/// The storage interface. Implementations must make [`Store::commit`] and
/// [`Store::create_saga`] atomic and fenced as documented.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Is the database reachable?
    async fn ping(&self) -> Result<()>;

    async fn put_plugin(&self, digest: &str, name: &str, wasm: &[u8], now: i64) -> Result<bool>;
    async fn plugins(&self) -> Result<Vec<PluginRow>>;
    /// One stored plugin version, with its bytes.
    async fn plugin(&self, digest: &str) -> Result<Option<PluginRow>>;
    /// Every stored plugin version, without the bytes, by name then upload time.
    async fn plugin_versions(&self) -> Result<Vec<PluginInfo>>;

    async fn definition(&self, saga_type: &str) -> Result<Option<(SagaDefinition, DefinitionSource)>>;
    async fn definitions(&self) -> Result<Vec<SagaDefinition>>;
    async fn put_definition(&self, def: &SagaDefinition, source: DefinitionSource, now: i64) -> Result<()>;
    /// A counter bumped in the transaction of every new plugin version and every definition
    /// change: a replica whose catalog was built at an older version reloads.
    async fn catalog_version(&self) -> Result<i64>;

    /// Creates a saga and its first event, under an idempotency key when one is given: the
    /// claim, the saga and (when known) the stored response commit in one transaction.
    async fn create_saga(&self, saga: &NewSaga, claim: Option<&IdempotencyClaim>, now: i64) -> Result<CreateOutcome>;
    /// Claims an idempotency key for a request that creates no saga (a signal, a cancel, an
    /// operator action). `Created` means the key is now this request's; an in-flight claim
    /// whose lock expired is taken over the same way.
    async fn claim_key(&self, claim: &IdempotencyClaim, now: i64) -> Result<CreateOutcome>;
    /// Forgets an in-flight key whose request failed without effect, so a retry runs again.
    async fn release_key(&self, caller: &str, route: &str, key: &str) -> Result<()>;
    /// Stores the response of an in-flight idempotency key.
    async fn complete_idempotency(&self, caller: &str, route: &str, key: &str, status: u16, body: &[u8]) -> Result<()>;
    /// Forgets keys past their retention. Returns how many.
    async fn expire_idempotency(&self, now: i64) -> Result<u64>;

    async fn saga(&self, id: &str) -> Result<Option<SagaRecord>>;
    /// Newest first; `before` is the id of the last saga of the previous page.
    async fn list_sagas(
        &self,
        saga_type: &str,
        status: Option<&str>,
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<SagaSummary>>;

    /// Claims up to `limit` sagas due at `now` (the driver's clock) for `owner`. The lease is
    /// measured in database time (`lease_ms` from the database's now), so replicas with skewed
    /// clocks agree on when a lease expired. Returns (id, epoch).
    async fn claim_due(&self, owner: &str, now: i64, lease_ms: i64, limit: u32) -> Result<Vec<(String, i64)>>;
    /// Extends a claim by `lease_ms` from the database's now; false if the claim was lost.
    async fn renew_lease(&self, id: &str, epoch: i64, lease_ms: i64) -> Result<bool>;
    /// Gives up a claim without a transition.
    async fn release(&self, id: &str, epoch: i64) -> Result<()>;
    /// Drops every claim held by `owner` (a process that restarts under the same identity).
    async fn release_owner(&self, owner: &str) -> Result<u64>;
    /// The earliest `next_run_at` of any saga, to know how long the driver may sleep.
    async fn next_due(&self) -> Result<Option<i64>>;
    /// Commits one transition; returns the event's `seq`.
    async fn commit(&self, c: &Commit<'_>) -> Result<i64>;

    async fn state_get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>>;
    async fn state_list(&self, plugin: &str, prefix: &str, limit: u32) -> Result<Vec<(String, Vec<u8>)>>;

    /// Takes or renews the relay lease for `owner`, for `lease_ms` of database time. Returns
    /// the lease's epoch when `owner` holds it (the epoch moves on every change of holder),
    /// `None` while another owner's lease is live. Only the holder publishes, so the events of
    /// one saga leave in `seq` order however many replicas run.
    async fn relay_lease(&self, owner: &str, lease_ms: i64) -> Result<Option<i64>>;
    /// Gives the relay lease up at once (a clean shutdown), if `owner` holds it.
    async fn relay_release(&self, owner: &str) -> Result<()>;

    /// Unpublished outbox rows, oldest first.
    async fn outbox_pending(&self, limit: u32) -> Result<Vec<OutboxRow>>;
    async fn outbox_mark_published(&self, ids: &[i64], now: i64) -> Result<()>;
    /// How many events wait for the relay, and when the oldest was committed.
    async fn outbox_backlog(&self) -> Result<(i64, Option<i64>)>;
    /// Sagas by (type, status, count), for metrics.
    async fn saga_counts(&self) -> Result<Vec<(String, String, i64)>>;
    /// Deletes up to `limit` rows published before `before`. Returns how many.
    async fn outbox_purge(&self, before: i64, limit: u32) -> Result<u64>;
    /// Every outbox row of one saga in `seq` order (published or not).
    async fn outbox_for_saga(&self, saga_id: &str) -> Result<Vec<OutboxRow>>;

    /// Writes an audit entry on its own (actions that are not saga transitions).
    async fn audit(&self, entry: &AuditEntry, now: i64) -> Result<()>;
    /// The audit trail, newest first, optionally for one target.
    async fn audit_log(&self, target: Option<&str>, limit: u32) -> Result<Vec<AuditRecord>>;
}

/// Builds the event JSON published for an outbox row (SPEC §6).
pub fn event_payload(
    event_id: &str,
    saga_id: &str,
    saga_type: &str,
    seq: i64,
    spec: &EventSpec,
    status: &str,
    now: i64,
) -> String {
    let at = crate::clock::rfc3339(now);
    serde_json::json!({
        "event_id": event_id,
        "saga_id": saga_id,
        "saga_type": saga_type,
        "seq": seq,
        "type": spec.event_type,
        "status": status,
        "at": at,
        "data": spec.data,
    })
    .to_string()
}
