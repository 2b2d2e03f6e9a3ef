//! Durable storage: sagas, steps, plugin state, the outbox, idempotency keys, plugins,
//! definitions, outbound grants and the audit trail.
//!
//! Architecture invariant: this is the only module that contains SQL. Everything above it
//! speaks in the types defined here, through role-sized traits ([`SagaStore`],
//! [`IdempotencyStore`], [`OutboxStore`], [`CatalogStore`], [`PluginStateStore`],
//! [`GrantStore`], [`AuditStore`], [`JanitorStore`], [`StatsStore`]); [`Store`] is their sum,
//! for wiring. Each consumer holds only the role it uses (`Arc<dyn Store>` upcasts to
//! `Arc<dyn OutboxStore>`).
//!
//! There is one implementation, `sql.rs`: every statement is written once, run through sqlx's
//! `Any` driver, and a small [`dialect::Dialect`] per database (`sqlite.rs`, `postgres.rs`)
//! holds what differs. No sqlx type leaves this module: errors are [`Error`], which says
//! whether a failure is transient.
//!
//! Architecture invariant: a saga transition is one call, [`SagaStore::commit`], and one
//! database transaction: the saga row, the changed step rows, the plugin's state writes and
//! the transition's outbox row commit together or not at all. A chain of transitions (the
//! driver's host-only steps of one saga) is one commit too: all of it or none of it, one
//! outbox row per transition, in order. Every commit is conditional on the
//! saga's `seq` being the one its state was read at, and the driver's also on its `epoch`, so
//! neither a worker that lost its claim nor a change computed from a stale read can commit.
//!
//! Every write goes through one commit path, `batch.rs`: on SQLite many of them share a
//! transaction and its fsync (group commit), on PostgreSQL each has its own. Either way a
//! write is answered only once it is durable.

mod batch;
mod cache;
mod dialect;
mod error;
mod keys;
pub mod postgres;
mod sql;
mod sqlite;
#[cfg(test)]
pub(crate) mod tests;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use crate::engine::{SagaDefinition, SagaState, SagaStatus};
use crate::event::OutboxEvent;
use crate::grants::Grants;

pub use error::{DatabaseError, Error, Result};

/// Opens the store a database URL names, running its migrations: `sqlite:` URLs and
/// `postgres://` (or `postgresql://`) URLs. `None` is the embedded default, a SQLite file in
/// `data_dir`.
pub async fn open(url: Option<&str>, data_dir: &Path) -> Result<Arc<dyn Store>> {
    open_with(url, data_dir, postgres::DEFAULT_MAX_CONNECTIONS).await
}

/// [`open`] with the size of the connection pool, for databases that take several writers
/// (SQLite ignores it: it has one writer connection and a small reader pool).
pub async fn open_with(url: Option<&str>, data_dir: &Path, max_connections: u32) -> Result<Arc<dyn Store>> {
    open_url(url, data_dir, max_connections, false).await
}

/// [`open_with`] for the host that serves the database: where the database belongs to one
/// process (a SQLite file), takes it for this one, so that a second host on the same file
/// fails to start with [`Error::InUse`] instead of both writing it; and, owning every write,
/// answers state reads of keys that were never written without a query. Other processes may
/// still open the database with [`open`] (to read it, as the tests do), not to run sagas.
pub async fn open_exclusive(url: Option<&str>, data_dir: &Path, max_connections: u32) -> Result<Arc<dyn Store>> {
    open_url(url, data_dir, max_connections, true).await
}

async fn open_url(url: Option<&str>, data_dir: &Path, max_connections: u32, exclusive: bool) -> Result<Arc<dyn Store>> {
    let url = match url {
        Some(url) => url.to_owned(),
        None => sqlite::file_url(&data_dir.join("sagahost.db")),
    };
    let Some(dialect) = dialect::for_url(&url) else {
        // Never echo credentials back: show the scheme only.
        let scheme = url.split_once(':').map_or("", |(s, _)| s);
        return Err(Error::Unsupported(format!(
            "database URL scheme '{scheme}:' is not supported; use sqlite:PATH or postgres://USER@HOST/DB"
        )));
    };
    Ok(Arc::new(sql::SqlStore::open(dialect, &url, max_connections, exclusive).await?))
}

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
    /// The W3C `traceparent` of the saga's intake span: the parent of its every span. `None`
    /// when it was created with tracing off.
    pub trace_parent: Option<String>,
}

/// A saga to create, with its first outbox event.
#[derive(Debug, Clone)]
pub struct NewSaga {
    pub id: String,
    pub definition: SagaDefinition,
    pub input: String,
    pub state: SagaState,
    /// The first event (`seq` 1), built by the caller with [`crate::event::Envelope::wrap`].
    pub event: OutboxEvent,
    pub now: i64,
    /// Created already claimed: (owner, lease in ms from the database's now), at epoch 1,
    /// as if [`SagaStore::claim_due`] had claimed it. `None`: unclaimed, epoch 0.
    pub lease: Option<(String, i64)>,
    /// The W3C `traceparent` of the intake span, stored with the saga.
    pub trace_parent: Option<String>,
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

/// A state read a commit must find still true: the key, and the value read (`None`: absent).
/// Made for every read of a call that can have its reads checked ([`StateRead::checked`]).
pub type StateCheck = (String, Option<Vec<u8>>);

/// How [`PluginStateStore::state_read`] answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateRead {
    /// The value (`None`: absent).
    pub value: Option<Vec<u8>>,
    /// The commit of what the call did with the value must check that it still stands
    /// ([`Commit::plugin_checks`]): another saga's commit of the key since this read (or,
    /// where other hosts write the same database, a change this host's memory missed) would
    /// otherwise be overwritten by a value computed from the old one (a lost update).
    pub checked: bool,
}

/// The write that stands for each (plugin, key) of a commit's `plugin_writes`, in the order
/// the keys were first written: a later write of a key replaces an earlier one.
fn last_writes<'a>(plugin_writes: &[(&'a str, &'a [StateWrite])]) -> Vec<(&'a str, &'a str, &'a Option<Vec<u8>>)> {
    let mut last: Vec<(&str, &str, &Option<Vec<u8>>)> = Vec::new();
    for &(plugin, writes) in plugin_writes {
        for (key, value) in writes {
            match last.iter_mut().find(|(p, k, _)| *p == plugin && *k == key.as_str()) {
                Some(w) => w.2 = value,
                None => last.push((plugin, key, value)),
            }
        }
    }
    last
}

/// Who is allowed to commit a transition, besides the condition every commit carries (the
/// saga's `seq` is still the one the transition was computed from).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// The driver holding the claim at this epoch; the claim is kept.
    Lease(i64),
    /// The driver holding the claim at this epoch, giving it up with this commit.
    LeaseRelease(i64),
    /// An outside event (client cancel, signal, operator): no epoch check. It bumps the epoch
    /// and clears the lease, which fences out any worker mid-call: that worker's result is
    /// discarded and the step runs again from the new state.
    Takeover,
}

/// One commit of a saga: one transition, or a chain of transitions the driver computed one
/// after the other from the same read, committed atomically by [`SagaStore::commit`].
#[derive(Debug, Clone)]
pub struct Commit<'a> {
    pub saga_id: &'a str,
    pub fence: Fence,
    /// The saga's `seq` when the state the first transition was computed from was read. The
    /// commit applies only if it is still the saga's `seq`, and sets it to
    /// `read_seq + events.len()`.
    pub read_seq: i64,
    /// The state after the last transition.
    pub state: &'a SagaState,
    pub step_names: &'a [String],
    /// Every step any of the transitions changed.
    pub changed_steps: &'a [usize],
    /// The plugins' state writes, (plugin, writes) in the order the calls made them: a later
    /// write of a key wins.
    pub plugin_writes: &'a [(&'a str, &'a [StateWrite])],
    /// State values the calls read, to check ([`StateRead::checked`]),
    /// (plugin, checks): the commit applies only if each key still holds the value read in
    /// the database as its statement finds it (before the commit's own writes); else
    /// [`Error::StaleRead`]. On PostgreSQL a key the commit also writes is held from its check
    /// to its end, and another commit of it still under way is waited for and then checked
    /// (no lost update); a key it only reads is checked in the statement's snapshot.
    pub plugin_checks: &'a [(&'a str, &'a [StateCheck])],
    /// The catalog version ([`CatalogStore::catalog_version`]) at which the chain's
    /// compensations picked their bindings from a cache that may be a refresh behind the
    /// store (other hosts share it): the commit applies only if the stored version is still
    /// this one, so that no compensation commits on a binding replaced before it ran; else
    /// [`Error::StaleRead`]. Like `plugin_checks`, the database as the commit's statement
    /// finds it.
    pub catalog_check: Option<i64>,
    /// The transitions' events in order, built by the caller: the first with
    /// `seq = read_seq + 1`, each next one `seq + 1`. At least one.
    pub events: &'a [OutboxEvent],
    pub now: i64,
    /// An audit record to write in the same transaction (operator actions).
    pub audit: Option<&'a AuditEntry>,
    /// The response of the request that created the saga, stored under its idempotency key
    /// in the same transaction when it is still in flight (a `Prefer: wait` request whose
    /// saga settles with this commit): one durable write less per saga.
    pub response: Option<StoredResponse<'a>>,
    /// The answer of the keyed request whose outside event this commit applies (a cancel, a
    /// signal, an operator action with an `Idempotency-Key`), stored under its key in the same
    /// transaction when it is still in flight: a request that dies after the commit leaves
    /// its key answered, not in flight for its retry to run the event a second time.
    pub answer: Option<StoredResponse<'a>>,
    /// The saga's creation, when its first transitions commit with it (`read_seq` 1, the
    /// fence of the driver that holds it at epoch 1): the idempotency claim (with `response`,
    /// when it is that key's), then the saga row, its steps and its events written as the
    /// commit leaves them (its first event, `seq` 1, then the commit's), only if the claim
    /// went in: the same rows as [`SagaStore::create_saga`] followed by the commit.
    /// A key that was not new writes nothing and the commit is [`Error::Fenced`]
    /// ([`Error::StaleRead`] when it carries checks): the caller then learns what the key
    /// holds from [`SagaStore::create_saga`].
    pub creation: Option<Creation<'a>>,
}

/// A saga's creation carried by its first [`Commit`].
#[derive(Debug, Clone, Copy)]
pub struct Creation<'a> {
    pub saga: &'a NewSaga,
    pub claim: Option<&'a IdempotencyClaim>,
}

/// A response stored under an in-flight idempotency key (see [`Commit::response`] and
/// [`Commit::answer`]).
#[derive(Debug, Clone, Copy)]
pub struct StoredResponse<'a> {
    pub caller: &'a str,
    pub route: &'a str,
    pub key: &'a str,
    pub status: u16,
    pub body: &'a [u8],
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
    /// The answer of the keyed admin request making this change (a bind, a definition, grants,
    /// an upload), stored under its idempotency key in the change's own transaction, as an
    /// outside event's is ([`Commit::answer`]): a request that dies after the commit leaves its
    /// key answered, and its retry replays the answer instead of making the change again on top
    /// of later ones. Not part of the trail.
    #[serde(skip)]
    pub answer: Option<KeyAnswer>,
}

/// An answer to store under an in-flight idempotency key ([`AuditEntry::answer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyAnswer {
    pub caller: String,
    pub route: String,
    pub key: String,
    pub status: u16,
    pub body: Vec<u8>,
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

/// A stored definition with its compare-and-set version.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDefinition {
    pub definition: SagaDefinition,
    pub source: DefinitionSource,
    /// 1 when first stored, +1 on every change. [`CatalogStore::put_definition`] can require it.
    pub version: i64,
    /// The host release (`CARGO_PKG_VERSION`) that stored a built-in: written by
    /// [`CatalogStore::put_definition`] with [`DefinitionSource::Builtin`]; `None` for an
    /// admin's, or a built-in stored before releases were recorded (migration 0013).
    pub builtin_release: Option<String>,
}

/// Sagas: creation (with its idempotency claim), reads, the driver's claims and leases, and
/// the one way a saga changes, [`SagaStore::commit`].
#[async_trait]
pub trait SagaStore: Send + Sync + 'static {
    /// Creates a saga and its first event, under an idempotency key when one is given: the
    /// claim, the saga and (when known) the stored response commit in one transaction.
    async fn create_saga(&self, saga: &NewSaga, claim: Option<&IdempotencyClaim>, now: i64) -> Result<CreateOutcome>;
    async fn saga(&self, id: &str) -> Result<Option<SagaRecord>>;
    /// Newest first; `before` is the id of the last saga of the previous page.
    async fn list_sagas(
        &self,
        saga_type: &str,
        status: Option<&str>,
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<SagaSummary>>;
    /// Claims up to `limit` sagas due at `now` (the driver's clock) for `owner`, never more,
    /// and never one another caller holds. The lease is measured in database time (`lease_ms`
    /// from the database's now), so replicas with skewed clocks agree on when a lease expired.
    /// Returns (id, epoch).
    async fn claim_due(&self, owner: &str, now: i64, lease_ms: i64, limit: u32) -> Result<Vec<(String, i64)>>;
    /// Extends a claim by `lease_ms` from the database's now; false if the claim was lost.
    async fn renew_lease(&self, id: &str, epoch: i64, lease_ms: i64) -> Result<bool>;
    /// Gives up a claim without a transition.
    async fn release(&self, id: &str, epoch: i64) -> Result<()>;
    /// Gives up a claim, and no claim takes the saga before `at` (ms, the driver's clock): a
    /// saga this host could not run (its plugin does not load here) waits a while for another
    /// replica, or for this one to be upgraded, rather than being claimed again at once. Only
    /// the claim's schedule: the saga's own state still says when it is due, and its next
    /// commit writes that back.
    async fn release_until(&self, id: &str, epoch: i64, at: i64) -> Result<()>;
    /// Drops every claim held by `owner` (a process that restarts under the same identity).
    async fn release_owner(&self, owner: &str) -> Result<u64>;
    /// The database server's clock in ms since the epoch, where hosts on several machines
    /// share the database (`None` otherwise: SQLite's clock is its one host's). One read, for
    /// [`crate::clock::SyncedClock`].
    async fn database_now_ms(&self) -> Result<Option<i64>>;
    /// The earliest `next_run_at` of any saga no one holds a live lease on (a claim's next
    /// chance), to know how long the driver may sleep. A saga running somewhere is not due.
    async fn next_due(&self) -> Result<Option<i64>>;
    /// Commits one transition, or a chain of them, if the saga's `seq` is still `read_seq`
    /// (and, for the driver's fences, its epoch is still the claim's); returns the new `seq`
    /// (`read_seq` + the number of events).
    /// [`Error::Fenced`] if not, and then nothing was written; [`Error::StaleRead`] instead
    /// when the commit carries [`Commit::plugin_checks`] or a [`Commit::catalog_check`]
    /// (which may be what refused it).
    async fn commit(&self, c: &Commit<'_>) -> Result<i64>;
}

/// The values one page of plugin state holds at most, about: a page ends with the entry that
/// reaches this many bytes of values ([`PluginStateStore::state_scan`]).
pub const STATE_PAGE_BYTES: usize = 4 << 20;

/// The plugins' durable key-value spaces (written only by [`SagaStore::commit`]).
#[async_trait]
pub trait PluginStateStore: Send + Sync + 'static {
    /// The committed value of `key`, as the database holds it now.
    async fn state_get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>>;
    /// A plugin call's read of `key`. With `guess` the answer is [`StateRead::checked`]: the
    /// commit of the call must carry the read as a [`StateCheck`]; and where several hosts
    /// write the database, a value this host committed or a key it never saw may then be
    /// answered from memory. Set `guess` only for calls whose effects stay within the host
    /// until that commit (no outbound HTTP): a refused commit runs the call again, and a
    /// value changed meanwhile must not reach another service.
    async fn state_read(&self, plugin: &str, key: &str, guess: bool) -> Result<StateRead> {
        Ok(StateRead { value: self.state_get(plugin, key).await?, checked: guess })
    }
    /// Keys starting with `prefix`, in byte order.
    async fn state_list(&self, plugin: &str, prefix: &str, limit: u32) -> Result<Vec<(String, Vec<u8>)>>;
    /// At most `limit` entries whose keys start with `prefix` and, when `after` is given, are
    /// strictly greater than it, in byte order: one page of a scan that continues after the
    /// last key of the previous page. A range scan on the primary key, so `%` and `_` in keys
    /// and prefixes are literal. The page also ends once its values reach
    /// [`STATE_PAGE_BYTES`] (it has at least one entry): a page that big may have been cut.
    async fn state_scan(
        &self,
        plugin: &str,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>>;
}

/// The origins each plugin may reach over outbound HTTP (SPEC §4.1). They live only in the
/// database, never in the catalog, so every replica sees a change on its next read.
#[async_trait]
pub trait GrantStore: Send + Sync + 'static {
    /// The origins and credentials granted to `plugin` as stored (canonical, see
    /// [`crate::grants::normalize`]); empty when none were ever granted.
    async fn grants(&self, plugin: &str) -> Result<Grants>;
    /// Replaces the grants of `plugin`, origins and credentials together (empty lists revoke
    /// every one) and writes the audit entry in the same transaction, its `before` set to the
    /// previous grants as read in that transaction, so that of two concurrent changes each is
    /// audited with what it replaced. Returns the previous grants. The caller validates and
    /// normalizes: the store keeps what it is given.
    async fn put_grants(&self, plugin: &str, grants: &Grants, audit: &AuditEntry, now: i64) -> Result<Grants>;
}

/// Idempotency keys of requests that create no saga (those that do claim theirs in
/// [`SagaStore::create_saga`]).
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims an idempotency key for a request that creates no saga (a signal, a cancel, an
    /// operator action). `Created` means the key is now this request's; an in-flight claim
    /// whose lock expired is taken over the same way.
    async fn claim_key(&self, claim: &IdempotencyClaim, now: i64) -> Result<CreateOutcome>;
    /// Forgets an in-flight key whose request failed without effect, so a retry runs again.
    async fn release_key(&self, caller: &str, route: &str, key: &str) -> Result<()>;
    /// Stores the response of an in-flight idempotency key. `Some` when a response was stored
    /// under the key before (a commit that settled the saga stored it, see
    /// [`Commit::response`]): that one stands, and is what the request must answer.
    async fn complete_idempotency(
        &self,
        caller: &str,
        route: &str,
        key: &str,
        status: u16,
        body: &[u8],
    ) -> Result<Option<(u16, Vec<u8>)>>;
}

/// The relay's side of the outbox.
#[async_trait]
pub trait OutboxStore: Send + Sync + 'static {
    /// Takes or renews the relay lease for `owner`, for `lease_ms` of database time. Returns
    /// the lease's epoch when `owner` holds it (the epoch moves on every change of holder),
    /// `None` while another owner's lease is live. Only the holder publishes, so that replicas
    /// do not all send the same rows (per-saga order does not rest on it: `relay` module docs).
    async fn relay_lease(&self, owner: &str, lease_ms: i64) -> Result<Option<i64>>;
    /// Gives the relay lease up at once (a clean shutdown), if `owner` holds it.
    async fn relay_release(&self, owner: &str) -> Result<()>;
    /// Unpublished outbox rows, oldest first: at most `limit`, and none past the first whose
    /// payload brings the batch to `max_bytes` (so at least one row, however large). The relay
    /// reads its batches so: a count alone let a batch of large events (outputs up to the
    /// plugin output limit) hold hundreds of MiB. (Payloads are counted in characters, which a
    /// byte count bounds within 4x.)
    async fn outbox_batch(&self, limit: u32, max_bytes: usize) -> Result<Vec<OutboxRow>>;
    /// Unpublished outbox rows, oldest first, at most `limit`.
    async fn outbox_pending(&self, limit: u32) -> Result<Vec<OutboxRow>> {
        self.outbox_batch(limit, usize::MAX).await
    }
    async fn outbox_mark_published(&self, ids: &[i64], now: i64) -> Result<()>;
    /// Every outbox row of one saga in `seq` order (published or not).
    async fn outbox_for_saga(&self, saga_id: &str) -> Result<Vec<OutboxRow>> {
        self.outbox_page(saga_id, 0, u32::MAX).await
    }
    /// The outbox rows of one saga with `seq` above `after`, in `seq` order, at most `limit`.
    async fn outbox_page(&self, saga_id: &str, after: i64, limit: u32) -> Result<Vec<OutboxRow>>;
    /// Moves an outbox row the sink refused for good into the dead letters, with the reason,
    /// and marks it published, in one transaction, fenced by the relay lease: only while no
    /// other owner has taken it since `owner` took it at `epoch` (what
    /// [`OutboxStore::relay_lease`] returned), and only a row still unpublished. False, with
    /// nothing changed, otherwise: the row is gone, was delivered or dead-lettered by another
    /// holder, or was redelivered by an operator after this holder read it (a former holder
    /// that woke from a pause must not undo that).
    async fn outbox_dead_letter(&self, id: i64, reason: &str, now: i64, owner: &str, epoch: i64) -> Result<bool>;
    /// Dead-lettered events, newest first; with `before`, those older than that outbox id
    /// (the next page).
    async fn dead_letters(&self, before: Option<i64>, limit: u32) -> Result<Vec<DeadLetter>>;
    /// The dead letter of one event, if there is one.
    async fn dead_letter(&self, event_id: &str) -> Result<Option<DeadLetter>>;
    /// Puts a dead-lettered event back in line for the relay (its outbox row unpublished
    /// again, or written again where the janitor purged it) and takes it out of the dead
    /// letters, with `audit`, in one transaction. False (nothing changed) if the event has no
    /// dead letter.
    async fn dead_letter_redeliver(&self, event_id: &str, now: i64, audit: &AuditEntry) -> Result<bool>;
    /// Deletes a dead letter for good, with `audit`, in one transaction. False (nothing
    /// changed) if the event has none.
    async fn dead_letter_discard(&self, event_id: &str, now: i64, audit: &AuditEntry) -> Result<bool>;
}

/// An event a sink refused for good.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    pub outbox_id: i64,
    pub event_id: String,
    pub saga_id: String,
    pub seq: i64,
    pub event_type: String,
    /// The event JSON as it would have been published.
    pub payload: String,
    pub reason: String,
    pub at: i64,
}

/// Plugins and definitions, the source of truth of every replica's catalog.
#[async_trait]
pub trait CatalogStore: Send + Sync + 'static {
    /// Stores a plugin version; true if it was new. The audit entry, if any, is written in the
    /// same transaction, and only if the version was new.
    async fn put_plugin(
        &self,
        digest: &str,
        name: &str,
        wasm: &[u8],
        now: i64,
        audit: Option<&AuditEntry>,
    ) -> Result<bool>;
    async fn plugins(&self) -> Result<Vec<PluginRow>>;
    /// One stored plugin version, with its bytes.
    async fn plugin(&self, digest: &str) -> Result<Option<PluginRow>>;
    /// Every stored plugin version, without the bytes, by name then upload time.
    async fn plugin_versions(&self) -> Result<Vec<PluginInfo>>;
    async fn definition(&self, saga_type: &str) -> Result<Option<StoredDefinition>>;
    async fn definitions(&self) -> Result<Vec<StoredDefinition>>;
    /// Stores a definition; returns its new version. With `expected_version`, a compare and
    /// set: the stored version must be that one (0: no definition of the type yet), else
    /// [`Error::Conflict`] and nothing changes. The audit entry, if any, commits with it.
    async fn put_definition(
        &self,
        def: &SagaDefinition,
        source: DefinitionSource,
        expected_version: Option<i64>,
        now: i64,
        audit: Option<&AuditEntry>,
    ) -> Result<i64>;
    /// A counter bumped in the transaction of every new plugin version and every definition
    /// change: a replica whose catalog was built at an older version reloads.
    async fn catalog_version(&self) -> Result<i64>;
    /// Whether other hosts may change the catalog (replicas on one PostgreSQL): a host that
    /// owns its database sees every change as it makes it, and need not read the version to
    /// know its cache is current.
    fn shared_by_hosts(&self) -> bool {
        true
    }
}

/// The audit trail of operator and admin actions.
#[async_trait]
pub trait AuditStore: Send + Sync + 'static {
    /// Writes an audit entry on its own (actions that change nothing in the store).
    async fn audit(&self, entry: &AuditEntry, now: i64) -> Result<()>;
    /// The audit trail, newest first, optionally for one target; with `before`, the entries
    /// older than that id (the next page).
    async fn audit_log(&self, target: Option<&str>, before: Option<i64>, limit: u32) -> Result<Vec<AuditRecord>>;
}

/// Housekeeping: every call deletes at most `limit` rows, so that no transaction runs long;
/// callers repeat while a call returns `limit`.
#[async_trait]
pub trait JanitorStore: Send + Sync + 'static {
    /// Takes or renews the janitor's lease for `owner` for `lease_ms` (database time): true
    /// when `owner` holds it now, false while another owner's lease is live. Replicas purge one
    /// at a time: two purging together do the same work twice, and on PostgreSQL an outbox
    /// purge and a saga purge deleting the same rows in different orders can deadlock.
    async fn janitor_lease(&self, owner: &str, lease_ms: i64) -> Result<bool>;
    /// Gives the janitor's lease up at once (a clean shutdown), if `owner` holds it.
    async fn janitor_release(&self, owner: &str) -> Result<()>;
    /// Forgets idempotency keys past their retention. Returns how many.
    async fn expire_idempotency(&self, now: i64, limit: u32) -> Result<u64>;
    /// Deletes outbox rows published before `before`. Returns how many.
    async fn outbox_purge(&self, before: i64, limit: u32) -> Result<u64>;
    /// Deletes sagas that finished (COMPLETED or CANCELLED) before `before`, with their steps
    /// and outbox rows, once every one of those rows is published: at most `limit` sagas and
    /// about `rows` outbox rows per call (one transaction), so that a saga with very many
    /// events (a step that polled for hours) never makes one long transaction; its rows go
    /// over several calls, the saga row with the last of them.
    async fn purge_finished_sagas(&self, before: i64, limit: u32, rows: u32) -> Result<Purged>;
}

/// What one call of [`JanitorStore::purge_finished_sagas`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    /// Sagas deleted whole.
    pub sagas: u64,
    /// The call stopped at one of its bounds: more may be due now.
    pub more: bool,
}

/// Health and the gauges read at scrape time.
#[async_trait]
pub trait StatsStore: Send + Sync + 'static {
    /// Is the database reachable?
    async fn ping(&self) -> Result<()>;
    /// How many events wait for the relay, and when the oldest was committed.
    async fn outbox_backlog(&self) -> Result<(i64, Option<i64>)>;
    /// Sagas by (type, status, count), for metrics.
    async fn saga_counts(&self) -> Result<Vec<(String, String, i64)>>;
    /// How the writes were committed since the store opened (no database read).
    fn write_stats(&self) -> WriteStats {
        WriteStats::default()
    }
    /// How plugin state reads were answered since the store opened (no database read).
    fn state_read_stats(&self) -> StateReadStats {
        StateReadStats::default()
    }
}

/// Plugin state reads (`state.get`) so far, by what answered them: the cache of recently
/// committed values, the filter of keys never written (on SQLite exact, where this process
/// owns the database; on PostgreSQL checked at the commit), or the database.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateReadStats {
    pub cache: u64,
    pub filter: u64,
    pub database: u64,
    /// Commits refused while they carried checks of their calls' reads ([`Error::StaleRead`]):
    /// a value another saga's commit (or another host) changed, or a plain fence.
    pub checks_refused: u64,
    /// Commits refused while they carried a [`Commit::catalog_check`]: the catalog changed
    /// since a compensation picked its binding from the cache, or a plain fence.
    pub catalog_checks_refused: u64,
}

/// The writes so far: with group commit (SQLite) `jobs / transactions` is how many
/// writes shared each commit and its fsync; elsewhere the two are equal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    pub transactions: u64,
    pub jobs: u64,
}

/// Every role at once, for wiring: [`open`] returns one, and it upcasts to each role.
pub trait Store:
    SagaStore
    + PluginStateStore
    + GrantStore
    + IdempotencyStore
    + OutboxStore
    + CatalogStore
    + AuditStore
    + JanitorStore
    + StatsStore
{
}

impl<T> Store for T where
    T: SagaStore
        + PluginStateStore
        + GrantStore
        + IdempotencyStore
        + OutboxStore
        + CatalogStore
        + AuditStore
        + JanitorStore
        + StatsStore
{
}
