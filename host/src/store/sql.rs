//! The store: every statement, written once for every database, run through sqlx's `Any`
//! driver. What differs between databases comes from the [`Dialect`]; the few statements that
//! need one of its clauses are composed once, when the store opens ([`Statements`]).
//!
//! Only types `Any` carries cross this boundary: 64-bit integers, text and bytes. Counts and
//! `MIN()` come back as 64-bit integers on every database; times are integer milliseconds.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::pool::PoolConnection;
use sqlx::Row;
use sqlx::{Any, AnyConnection, AnyPool};

use super::batch::Writes;
use super::cache::{self, StateCache};
use super::dialect::{Dialect, Folding};
use super::keys::KeyFilter;
use super::*;
use crate::engine::{Phase, StepState, StepStatus};

/// A page of a saga type's list: one statement per combination of filters, each a plain bound
/// on an index (`sagas_by_status` with a status, `sagas_by_type` without). SQLite cannot bound
/// an index with `($2 IS NULL OR status = $2)`: one statement for all filters walked every saga
/// of the type, newest first, to find a page of one status, or the page after a cursor.
pub(super) fn list_sagas_sql(status: bool, before: bool) -> &'static str {
    match (status, before) {
        (false, false) => {
            "SELECT id, saga_type, status, reason, created_at, updated_at FROM sagas \
             WHERE saga_type = $1 ORDER BY id DESC LIMIT $2"
        }
        (true, false) => {
            "SELECT id, saga_type, status, reason, created_at, updated_at FROM sagas \
             WHERE saga_type = $1 AND status = $2 ORDER BY id DESC LIMIT $3"
        }
        (false, true) => {
            "SELECT id, saga_type, status, reason, created_at, updated_at FROM sagas \
             WHERE saga_type = $1 AND id < $2 ORDER BY id DESC LIMIT $3"
        }
        (true, true) => {
            "SELECT id, saga_type, status, reason, created_at, updated_at FROM sagas \
             WHERE saga_type = $1 AND status = $2 AND id < $3 ORDER BY id DESC LIMIT $4"
        }
    }
}

/// The outbox rows of one saga the janitor deletes per statement.
const PURGE_CHUNK: i64 = 1000;

/// Gives back every claim of one owner; by the `sagas_leased` index (migration 0014), not a
/// scan of every saga kept.
pub(super) const RELEASE_OWNER: &str = "UPDATE sagas SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1";

/// The janitor's outbox purge: published rows past the retention, oldest first by the
/// `outbox_published` index (migration 0012), so that the last, short batch of a pass does not
/// read every row still kept.
/// The published test is on the deleted row too, not only in the subquery: on PostgreSQL a
/// row a dead-letter redelivery unpublished after the subquery picked it is checked again, as
/// it is now, by the outer condition alone, and kept.
pub(super) const OUTBOX_PURGE: &str = "DELETE FROM outbox WHERE published_at IS NOT NULL AND published_at < $1 \
     AND id IN (SELECT id FROM outbox WHERE published_at IS NOT NULL AND published_at < $1 LIMIT $2)";

const INSERT_SAGA_COLUMNS: &str = "id, saga_type, status, phase, reason, input, definition, seq, next_run_at, epoch, \
     lease_owner, lease_until, created_at, updated_at, last_event_id, trace_parent";

/// The statements that embed a dialect clause, composed once per store.
struct Statements {
    insert_saga: String,
    insert_saga_if_claimed: String,
    /// `INSERT INTO sagas (..) SELECT <values> WHERE `: the saga row's insert under a
    /// condition ([`SqlStore::push_saga_insert`] with state checks).
    insert_saga_where: String,
    claim_due: String,
    renew_lease: String,
    /// Takes or renews the lease named `$3` for `$1`, for `$2` ms: the relay's (`outbox`) and
    /// the janitor's (`janitor`) rows of `relay_lease`.
    take_lease: String,
    finished_sagas: String,
    next_due: String,
    /// Marks the outbox rows whose ids `$2` lists (comma-separated) published at `$1`.
    mark_published: String,
}

impl Statements {
    fn new(d: &dyn Dialect) -> Statements {
        let now = d.now_ms();
        // The saga row ([`SqlStore::push_saga_insert`]): as created, or as its first commit
        // leaves it. The lease ($10 owner, $11 ms) is measured on the database's clock.
        let insert_saga_values = format!(
            "$1, $2, $3, $4, $5, $6, $7, $14, $8, $15, $10, CASE WHEN CAST($10 AS TEXT) IS NULL THEN NULL ELSE {now} + $11 END, \
             $9, $16, $12, $13"
        );
        let skip_locked = d.skip_locked();
        Statements {
            insert_saga_where: format!("INSERT INTO sagas ({INSERT_SAGA_COLUMNS}) SELECT {insert_saga_values} WHERE "),
            insert_saga: format!(
                "INSERT INTO sagas ({INSERT_SAGA_COLUMNS}) VALUES ({insert_saga_values}) RETURNING seq, id, last_event_id"
            ),
            // The same, only if the idempotency key ($17..$19) was claimed for this saga by the
            // statement before (a key that was not new names another saga, or none).
            insert_saga_if_claimed: format!(
                "INSERT INTO sagas ({INSERT_SAGA_COLUMNS}) SELECT {insert_saga_values} WHERE EXISTS \
                 (SELECT 1 FROM idempotency_keys WHERE caller = $17 AND route = $18 AND key = $19 AND saga_id = $1) \
                 RETURNING seq, id, last_event_id"
            ),
            // The CTE picks at most $4 rows, locked (skipping rows another claimer holds), and
            // is evaluated once (MATERIALIZED); the UPDATE then changes exactly those. An
            // `UPDATE .. WHERE id IN (SELECT .. LIMIT n FOR UPDATE SKIP LOCKED)` may run its
            // subquery more than once and claim more than n.
            claim_due: format!(
                "WITH due AS MATERIALIZED (SELECT id FROM sagas WHERE next_run_at IS NOT NULL AND next_run_at <= $3 \
                 AND (lease_until IS NULL OR lease_until <= {now}) ORDER BY next_run_at LIMIT $4{skip_locked}) \
                 UPDATE sagas SET lease_owner = $1, lease_until = {now} + $2, epoch = epoch + 1 \
                 FROM due WHERE sagas.id = due.id RETURNING sagas.id AS id, sagas.epoch AS epoch"
            ),
            renew_lease: format!(
                "UPDATE sagas SET lease_until = {now} + $3 WHERE id = $1 AND epoch = $2 AND lease_owner IS NOT NULL"
            ),
            // One statement: take the lease if it is free or expired, renew it if it is ours.
            take_lease: format!(
                "INSERT INTO relay_lease (name, owner, lease_until, epoch) VALUES ($3, $1, {now} + $2, 1) \
                 ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, lease_until = excluded.lease_until, \
                 epoch = CASE WHEN relay_lease.owner = excluded.owner THEN relay_lease.epoch ELSE relay_lease.epoch + 1 END \
                 WHERE relay_lease.owner = excluded.owner OR relay_lease.lease_until <= {now} \
                 RETURNING epoch"
            ),
            // Locked, so no transition can commit to a saga while it is being deleted (none
            // should: it is finished, but an operator action is an outside event).
            finished_sagas: format!(
                "SELECT id FROM sagas WHERE phase IN ('completed', 'cancelled') AND next_run_at IS NULL \
                 AND updated_at < $1 AND NOT EXISTS \
                 (SELECT 1 FROM outbox WHERE outbox.saga_id = sagas.id AND outbox.published_at IS NULL) \
                 AND NOT EXISTS (SELECT 1 FROM idempotency_keys k \
                 WHERE k.saga_id = sagas.id AND k.response_status IS NULL) \
                 ORDER BY updated_at LIMIT $2{skip_locked}"
            ),
            // The first saga a claim could take: due or not, but not under a live lease (a
            // running saga's timer is in the past, and would wake the driver at once, again and
            // again). Walks the due index in order, past the few running sagas, to the first
            // free one. A lease that expires later is seen at the next poll (the driver sleeps
            // at most its poll interval).
            next_due: format!(
                "SELECT next_run_at FROM sagas WHERE next_run_at IS NOT NULL \
                 AND (lease_until IS NULL OR lease_until <= {now}) ORDER BY next_run_at LIMIT 1"
            ),
            mark_published: format!("UPDATE outbox SET published_at = $1 WHERE {}", d.in_integers("id", "$2")),
        }
    }
}

/// A saga row as inserted ([`SqlStore::push_saga_insert`]): as created (`seq` 1), or as the
/// first commit that carries its creation leaves it.
struct SagaRow<'a> {
    state: &'a SagaState,
    seq: i64,
    epoch: i64,
    /// (owner, lease in ms from the database's now), when held.
    lease: Option<&'a (String, i64)>,
    updated_at: i64,
    /// The last event's id, which the statements after the insert check ([`if_committed!`]).
    last_event_id: &'a str,
}

/// The one implementation of every store role.
pub struct SqlStore {
    dialect: &'static dyn Dialect,
    /// Every write (transitions, creations, claims, leases, outbox marks, the janitor's
    /// purges, catalog, grants and audit changes), grouped into shared commits where the
    /// database has one writer ([`Writes`]). It owns the writer pool.
    writes: Writes,
    /// Plain reads. For PostgreSQL, the same pool as `writer`.
    reader: AnyPool,
    /// A connection of `reader` the relay's reads keep from one batch to the next
    /// (`outbox_batch`).
    relay_conn: std::sync::Mutex<Option<PoolConnection<Any>>>,
    sql: Arc<Statements>,
    /// The plugin state keys that may exist, for a serving host ([`KeyFilter`]): reads of
    /// other keys answer "absent" without a query (exactly where this process owns the
    /// database; see `guesses`).
    keys: Option<Arc<KeyFilter>>,
    /// Recently committed plugin state, for a serving host ([`StateCache`]): reads of those
    /// keys answer without a query (exactly where this process owns the database).
    cache: Option<Arc<StateCache>>,
    /// The filter and the cache answer for a database other hosts write too (PostgreSQL,
    /// opened by a serving host): their answers may be stale, so only a caller whose reads
    /// are checked by its commit may have them ([`StateRead::checked`], [`check_conditions`]).
    guesses: bool,
    /// State reads the filter answered, and those that reached the database.
    filtered: AtomicU64,
    read_from_database: AtomicU64,
    /// Commits refused while they carried state checks, and while they carried a catalog
    /// check ([`Error::StaleRead`]; one carrying both counts in both).
    checks_refused: AtomicU64,
    catalog_checks_refused: AtomicU64,
    /// The database file's lock, held while the store lives (SQLite opened exclusively).
    _lock: Option<std::fs::File>,
    /// The dialect's background work, stopped with the store.
    _background: Option<tokio_util::sync::DropGuard>,
}

impl SqlStore {
    /// The statements that create `saga` under `claim`: the claim, the saga row (only if the
    /// claim went in; the one statement that returns a row), its steps and its first event
    /// (only if the saga went in).
    fn creation_statements(
        &self,
        script: &mut Script,
        saga: &NewSaga,
        claim: Option<&IdempotencyClaim>,
        now: i64,
    ) -> Result<()> {
        if let Some(c) = claim {
            claim_statement(script, c, Some(&saga.id), now, Checks::default(), "");
        }
        // Born claimed (epoch 1, as a claim would make it) when it has an owner.
        let row = SagaRow {
            state: &saga.state,
            seq: 1,
            epoch: i64::from(saga.lease.is_some()),
            lease: saga.lease.as_ref(),
            updated_at: saga.now,
            last_event_id: &saga.event.event_id,
        };
        self.push_saga_insert(script, saga, claim, row, Checks::default())?;
        let steps = saga.state.steps.iter().zip(&saga.definition.steps).enumerate();
        let steps = steps.map(|(i, (step, def))| step_values(i, &def.name, step));
        let fence = || [Arg::text(&saga.id), Arg::text(&saga.event.event_id)];
        push_rows(script, STEPS_INTO, STEP_VALUES, STEPS_UPSERT, fence(), steps.collect());
        push_rows(
            script,
            OUTBOX_INTO,
            OUTBOX_VALUES,
            OUTBOX_ORDER,
            fence(),
            vec![outbox_values(&saga.event, 1, saga.now)],
        );
        Ok(())
    }

    /// The statements of a commit that also creates its saga ([`Commit::creation`]): the
    /// claim (carrying the commit's response when it settles the saga: one row, written
    /// once), the saga row as the commit leaves it (only if the claim went in; the one
    /// statement that returns a row, `seq`), every step row, the creation's event and the
    /// chain's, and the chain's state writes (only if the saga went in). One fenced group, so
    /// on PostgreSQL one statement; the same rows as a creation followed by its commit.
    fn creation_committed_statements(
        &self,
        script: &mut Script,
        creation: &Creation<'_>,
        c: &Commit<'_>,
    ) -> Result<()> {
        let saga = creation.saga;
        let last = c.events.last().ok_or_else(|| corrupt("a commit without an event"))?;
        if c.read_seq != 1 || c.saga_id != saga.id {
            return Err(corrupt("a creation's commit starts from its saga's first event"));
        }
        let (epoch, keep) = match c.fence {
            Fence::Lease(epoch) => (epoch, true),
            Fence::LeaseRelease(epoch) => (epoch, false),
            Fence::Takeover => return Err(corrupt("a creation is committed by the driver that holds it")),
        };
        // The response goes into the claim's row when it is that key's: a statement of the
        // same group could not update a row the group inserts.
        let mut response = c.response;
        if let Some(claim) = creation.claim {
            let own = response.filter(|r| (r.caller, r.route, r.key) == (&*claim.caller, &*claim.route, &*claim.key));
            let with_response =
                own.map(|r| IdempotencyClaim { response: Some((r.status, r.body.to_vec())), ..claim.clone() });
            if own.is_some() {
                response = None;
            }
            let for_update = self.dialect.for_update();
            claim_statement(
                script,
                with_response.as_ref().unwrap_or(claim),
                Some(&saga.id),
                c.now,
                Checks::of(c),
                for_update,
            );
        }
        let row = SagaRow {
            state: c.state,
            seq: c.read_seq + c.events.len() as i64,
            epoch,
            lease: saga.lease.as_ref().filter(|_| keep),
            updated_at: c.now,
            last_event_id: &last.event_id,
        };
        // A claimed insert follows its claim, which carries the checks.
        let checks = if creation.claim.is_some() { Checks::default() } else { Checks::of(c) };
        self.push_saga_insert(script, saga, creation.claim, row, checks)?;
        let fenced = || [Arg::text(&saga.id), Arg::text(&last.event_id)];
        let mut steps = Vec::with_capacity(c.state.steps.len());
        for (i, step) in c.state.steps.iter().enumerate() {
            let name = c.step_names.get(i).ok_or_else(|| corrupt(format!("step name {i} out of range")))?;
            steps.push(step_values(i, name, step));
        }
        push_rows(script, STEPS_INTO, STEP_VALUES, STEPS_UPSERT, fenced(), steps);
        state_statements(c, script, fenced);
        let mut events = vec![outbox_values(&saga.event, 1, saga.now)];
        events.extend((c.read_seq + 1..).zip(c.events).map(|(seq, event)| outbox_values(event, seq, c.now)));
        push_rows(script, OUTBOX_INTO, OUTBOX_VALUES, OUTBOX_ORDER, fenced(), events);
        tail_statements(c, response, script, fenced);
        Ok(())
    }

    /// The saga row's insert (the head of a creation's group), only if `claim` went in (its
    /// statement pushed just before), and without a claim only if the `checks` hold
    /// ([`check_conditions`]; a claim carries them itself: [`claim_statement`]).
    fn push_saga_insert(
        &self,
        script: &mut Script,
        saga: &NewSaga,
        claim: Option<&IdempotencyClaim>,
        row: SagaRow<'_>,
        checks: Checks<'_>,
    ) -> Result<()> {
        let definition = serde_json::to_string(&saga.definition).map_err(|e| corrupt(e.to_string()))?;
        let mut args = vec![
            Arg::text(&saga.id),
            Arg::text(&saga.definition.saga_type),
            Arg::text(row.state.status.as_str()),
            Arg::text(row.state.phase.as_str()),
            Arg::Text(row.state.reason.clone()),
            Arg::text(&saga.input),
            Arg::Text(Some(definition)),
            Arg::Int(row.state.next_run_at),
            Arg::Int(Some(saga.now)),
            Arg::Text(row.lease.map(|(owner, _)| owner.clone())),
            Arg::Int(row.lease.map(|(_, ms)| *ms)),
            Arg::text(row.last_event_id),
            Arg::Text(saga.trace_parent.clone()),
            Arg::Int(Some(row.seq)),
            Arg::Int(Some(row.epoch)),
            Arg::Int(Some(row.updated_at)),
        ];
        let insert = match claim {
            Some(c) => {
                args.extend([Arg::text(&c.caller), Arg::text(&c.route), Arg::text(&c.key)]);
                self.sql.insert_saga_if_claimed.clone()
            }
            None => match check_conditions(checks, self.dialect.for_update(), &mut args) {
                None => self.sql.insert_saga.clone(),
                Some(checks) => format!("{}{checks}{COMMIT_RETURNING}", self.sql.insert_saga_where),
            },
        };
        script.push_as(Role::Head("seq"), insert, args);
        Ok(())
    }

    /// A plugin state value as the database holds it now.
    async fn state_from_database(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>> {
        self.read_from_database.fetch_add(1, Ordering::Relaxed);
        self.read(|| async {
            Ok(sqlx::query_scalar("SELECT value FROM plugin_state WHERE plugin = $1 AND key = $2")
                .bind(plugin)
                .bind(key)
                .fetch_optional(&self.reader)
                .await?)
        })
        .await
    }

    /// Runs a read again while it fails on a connection that died in the pool (the server
    /// ended the session, a failover): the PostgreSQL pool hands out a connection used in the
    /// last half second without a ping, so after a wave of ended sessions each dead connection
    /// fails the one statement that draws it, at once, and is dropped. Reads are safe to
    /// repeat. At most once per pooled connection, plus one.
    async fn read<T, F, Fut>(&self, attempt: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let tries = self.reader.options().get_max_connections() + 1;
        let mut tried = 1;
        loop {
            match attempt().await {
                Err(e) if tried < tries && e.is_lost_connection() => tried += 1,
                out => return out,
            }
        }
    }

    /// [`OutboxStore::outbox_batch`], one attempt, on the relay's kept connection
    /// (`relay_conn`).
    async fn outbox_batch_once(&self, limit: u32, max_bytes: usize) -> Result<Vec<AnyRow>> {
        // The oldest `limit` first (the index on unpublished rows, no more rows read), then
        // their running size: a row goes in while the rows before it stay under the budget.
        let query = sqlx::query(
            "SELECT id, event_id, saga_id, seq, event_type, payload, created_at FROM ( \
               SELECT p.*, SUM(LENGTH(p.payload)) OVER (ORDER BY p.id) - LENGTH(p.payload) AS before_it FROM ( \
                 SELECT id, event_id, saga_id, seq, event_type, payload, created_at FROM outbox \
                 WHERE published_at IS NULL ORDER BY id LIMIT $1 \
               ) AS p \
             ) AS b WHERE before_it < $2 ORDER BY id",
        )
        .bind(i64::from(limit))
        .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX));
        // Taken out while in use, so a read that fails or is dropped halfway gives it back to
        // the pool, which tests it, instead of keeping it.
        let held = self.relay_conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let mut conn = match held {
            Some(conn) => conn,
            None => self.reader.acquire().await?,
        };
        let rows = query.fetch_all(&mut *conn).await?;
        *self.relay_conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(conn);
        Ok(rows)
    }

    /// [`SagaStore::saga`], one attempt.
    async fn saga_once(&self, id: &str) -> Result<Option<SagaRecord>> {
        // One read transaction, so the saga row and its steps are one snapshot.
        let mut tx = super::dialect::begin(&self.reader, Some(self.dialect.begin_snapshot())).await?;
        let Some(r) = sqlx::query(
            "SELECT id, saga_type, status, phase, reason, input, definition, seq, next_run_at, epoch, created_at, updated_at, \
             trace_parent FROM sagas WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        let steps = sqlx::query("SELECT * FROM saga_steps WHERE saga_id = $1 ORDER BY idx")
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        let definition: String = r.try_get("definition")?;
        let definition: SagaDefinition =
            serde_json::from_str(&definition).map_err(|e| corrupt(format!("definition: {e}")))?;
        let phase: String = r.try_get("phase")?;
        let steps = steps.iter().map(step_from_row).collect::<Result<Vec<_>>>()?;
        if steps.len() != definition.steps.len() {
            return Err(corrupt(format!(
                "saga {id} has {} step rows for {} steps",
                steps.len(),
                definition.steps.len()
            )));
        }
        Ok(Some(SagaRecord {
            id: r.try_get("id")?,
            saga_type: r.try_get("saga_type")?,
            definition,
            input: r.try_get("input")?,
            state: SagaState {
                status: SagaStatus::parse(&r.try_get::<String, _>("status")?),
                phase: Phase::parse(&phase).ok_or_else(|| corrupt(format!("phase {phase}")))?,
                reason: r.try_get("reason")?,
                steps,
                next_run_at: r.try_get("next_run_at")?,
            },
            seq: r.try_get("seq")?,
            epoch: r.try_get("epoch")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
            trace_parent: r.try_get("trace_parent")?,
        }))
    }

    /// Connects as the dialect says and brings the schema up to date. `exclusive`: this
    /// process is to own the database where the dialect can tell (SQLite: the file's lock, or
    /// [`Error::InUse`]); then state reads of keys never written answer without a query.
    pub async fn open(
        dialect: &'static dyn Dialect,
        url: &str,
        max_connections: u32,
        exclusive: bool,
    ) -> Result<SqlStore> {
        sqlx::any::install_default_drivers();
        let lock = if exclusive { lock(dialect, url).await? } else { None };
        let pools = dialect.connect(url, max_connections).await?;
        dialect.migrator().run(&pools.writer).await?;
        // Memory answers state reads for a serving host: exactly where it owns the database
        // (its lock), checked at the commit where hosts share it by design.
        let guesses = exclusive && lock.is_none() && dialect.shared_by_hosts();
        let keys = match lock.is_some() || guesses {
            true => Some(Arc::new(load_keys(&pools.reader).await?)),
            false => None,
        };
        tracing::debug!(dialect = dialect.name(), exclusive = lock.is_some(), guesses, "store open");
        let writes = if dialect.group_commit() { Writes::grouped(pools.writer) } else { Writes::direct(pools.writer) };
        let sql = Arc::new(Statements::new(dialect));
        Ok(SqlStore {
            dialect,
            writes,
            reader: pools.reader,
            relay_conn: std::sync::Mutex::new(None),
            sql,
            cache: keys.is_some().then(|| Arc::new(StateCache::new(cache::BUDGET, cache::LARGEST))),
            keys,
            guesses,
            filtered: AtomicU64::new(0),
            read_from_database: AtomicU64::new(0),
            checks_refused: AtomicU64::new(0),
            catalog_checks_refused: AtomicU64::new(0),
            _lock: lock,
            _background: pools.background,
        })
    }
}

/// How long a host waits for the database's lock before giving up: a host started while the
/// one before it on the same file is still shutting down (a restart) waits for it.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// [`Dialect::lock`], waiting up to [`LOCK_WAIT`] while another process holds it.
async fn lock(dialect: &dyn Dialect, url: &str) -> Result<Option<std::fs::File>> {
    let started = std::time::Instant::now();
    loop {
        match dialect.lock(url) {
            Err(Error::InUse(_)) if started.elapsed() < LOCK_WAIT => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// Every plugin state key stored, into a new [`KeyFilter`] (in pages, in key order).
async fn load_keys(reader: &AnyPool) -> Result<KeyFilter> {
    const PAGE: i64 = 10_000;
    let started = std::time::Instant::now();
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM plugin_state").fetch_one(reader).await?;
    let filter = KeyFilter::with_capacity(total.max(0) as u64);
    let mut after: Option<(String, String)> = None;
    loop {
        let rows =
            match &after {
                None => {
                    sqlx::query("SELECT plugin, key FROM plugin_state ORDER BY plugin, key LIMIT $1")
                        .bind(PAGE)
                        .fetch_all(reader)
                        .await?
                }
                Some((plugin, key)) => sqlx::query(
                    "SELECT plugin, key FROM plugin_state WHERE (plugin, key) > ($1, $2) ORDER BY plugin, key LIMIT $3",
                )
                .bind(plugin)
                .bind(key)
                .bind(PAGE)
                .fetch_all(reader)
                .await?,
            };
        for row in &rows {
            filter.insert(row.try_get("plugin")?, row.try_get("key")?);
        }
        match rows.last() {
            Some(last) if rows.len() as i64 == PAGE => after = Some((last.try_get("plugin")?, last.try_get("key")?)),
            _ => break,
        }
    }
    let (layers, bytes) = filter.size();
    tracing::info!(
        keys = total,
        layers,
        bytes,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "plugin state keys loaded"
    );
    Ok(filter)
}

fn corrupt(what: impl Into<String>) -> Error {
    Error::Corrupt(what.into())
}

fn count(n: i64, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| corrupt(what.to_owned()))
}

fn step_from_row(row: &AnyRow) -> Result<StepState> {
    let status: String = row.try_get("status")?;
    Ok(StepState {
        status: StepStatus::parse(&status).ok_or_else(|| corrupt(format!("step status {status}")))?,
        attempts: count(row.try_get("attempts")?, "attempts")?,
        compensate_attempts: count(row.try_get("compensate_attempts")?, "compensate_attempts")?,
        failures: count(row.try_get("failures")?, "failures")?,
        waited: row.try_get::<i64, _>("waited")? != 0,
        in_flight_until: row.try_get("in_flight_until")?,
        output: row.try_get("output")?,
        compensate_output: row.try_get("compensate_output")?,
        last_error: row.try_get("last_error")?,
        wait_signal: row.try_get("wait_signal")?,
        signal_payload: row.try_get("signal_payload")?,
        execute_digest: row.try_get("execute_digest")?,
        compensate_digest: row.try_get("compensate_digest")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn plugin_from_row(r: &AnyRow) -> Result<PluginRow> {
    Ok(PluginRow {
        digest: r.try_get("digest")?,
        name: r.try_get("name")?,
        size: r.try_get("size")?,
        wasm: r.try_get("wasm")?,
        uploaded_at: r.try_get("uploaded_at")?,
    })
}

fn outbox_from_row(r: &AnyRow) -> Result<OutboxRow> {
    Ok(OutboxRow {
        id: r.try_get("id")?,
        event_id: r.try_get("event_id")?,
        saga_id: r.try_get("saga_id")?,
        seq: r.try_get("seq")?,
        event_type: r.try_get("event_type")?,
        payload: r.try_get("payload")?,
        created_at: r.try_get("created_at")?,
    })
}

/// [`CatalogStore::put_definition`]'s job: `expected_version` as that method takes it.
#[allow(clippy::too_many_arguments)]
async fn put_definition(
    tx: &mut AnyConnection,
    saga_type: &str,
    json: &str,
    source: &str,
    expected_version: Option<i64>,
    release: Option<&'static str>,
    now: i64,
    audit: Option<&AuditEntry>,
) -> Result<i64> {
    let sql = match expected_version {
        // Replace a definition that must exist at exactly this version.
        Some(expected) if expected > 0 => {
            "UPDATE saga_definitions SET definition = $2, source = $3, updated_at = $4, version = version + 1, \
             builtin_release = $6 WHERE saga_type = $1 AND version = $5 RETURNING version"
        }
        // Create, or (no expectation) replace whatever is there. With an expectation of 0 the
        // update never matches, so an existing definition is a conflict.
        _ => {
            "INSERT INTO saga_definitions (saga_type, definition, source, updated_at, version, builtin_release) \
             VALUES ($1, $2, $3, $4, 1, $6) ON CONFLICT (saga_type) DO UPDATE SET definition = excluded.definition, \
             source = excluded.source, updated_at = excluded.updated_at, version = saga_definitions.version + 1, \
             builtin_release = excluded.builtin_release WHERE CAST($5 AS BIGINT) IS NULL RETURNING version"
        }
    };
    let version: Option<i64> = sqlx::query_scalar(sql)
        .bind(saga_type)
        .bind(json)
        .bind(source)
        .bind(now)
        .bind(expected_version)
        .bind(release)
        .fetch_optional(&mut *tx)
        .await?;
    // Nothing matched: nothing was written.
    let Some(version) = version else {
        return Err(Error::Conflict);
    };
    bump_catalog(&mut *tx).await?;
    if let Some(a) = audit {
        insert_audit(&mut *tx, a, now).await?;
    }
    Ok(version)
}

/// [`OutboxStore::dead_letter_redeliver`]'s job.
async fn redeliver(tx: &mut AnyConnection, event_id: &str, now: i64, audit: &AuditEntry) -> Result<()> {
    // The row still there is unpublished again first: the update locks it, so a janitor's
    // purge that picked it meanwhile finds it unpublished when it gets the row and keeps
    // it (its condition is on the row itself, `OUTBOX_PURGE`). Where the janitor purged
    // it already, it is written again from the dead letter (the same event id, saga and
    // seq: consumers see the same event). Either way the relay sends it next.
    sqlx::query(
        "UPDATE outbox SET published_at = NULL WHERE event_id = $1 AND published_at IS NOT NULL \
         AND EXISTS (SELECT 1 FROM dead_letters WHERE dead_letters.event_id = $1)",
    )
    .bind(event_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO outbox (event_id, saga_id, seq, event_type, payload, created_at) \
         SELECT event_id, saga_id, seq, event_type, payload, $2 FROM dead_letters WHERE event_id = $1 \
         ON CONFLICT DO NOTHING",
    )
    .bind(event_id)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    letter_removed(tx, event_id, now, audit).await
}

/// Ends a dead letter's redelivery or discard: deletes the letter and writes `audit`; or, with
/// no letter to delete (done already, by another request), refuses with [`Error::Conflict`],
/// which rolls the job back ([`Writes`]). The job wrote nothing then anyway where writes are
/// grouped (one writer: the letter was gone before the job's first statement, which therefore
/// matched no row), as a refusal in a shared transaction must.
async fn letter_removed(tx: &mut AnyConnection, event_id: &str, now: i64, audit: &AuditEntry) -> Result<()> {
    let removed = sqlx::query("DELETE FROM dead_letters WHERE event_id = $1").bind(event_id).execute(&mut *tx).await?;
    if removed.rows_affected() == 0 {
        // No such letter (any more): nothing of the job stays, written or not.
        return Err(Error::Conflict);
    }
    insert_audit(tx, audit, now).await
}

/// Whether a job ending in [`letter_removed`] removed the letter (`false`: there was none).
fn letter_gone(removed: Result<()>) -> Result<bool> {
    match removed {
        Ok(()) => Ok(true),
        Err(Error::Conflict) => Ok(false),
        Err(e) => Err(e),
    }
}

fn dead_letter_from_row(r: &AnyRow) -> Result<DeadLetter> {
    Ok(DeadLetter {
        outbox_id: r.try_get("outbox_id")?,
        event_id: r.try_get("event_id")?,
        saga_id: r.try_get("saga_id")?,
        seq: r.try_get("seq")?,
        event_type: r.try_get("event_type")?,
        payload: r.try_get("payload")?,
        reason: r.try_get("reason")?,
        at: r.try_get("at")?,
    })
}

fn definition_from_row(r: &AnyRow) -> Result<StoredDefinition> {
    let saga_type: String = r.try_get("saga_type")?;
    let def: String = r.try_get("definition")?;
    let source: String = r.try_get("source")?;
    Ok(StoredDefinition {
        definition: serde_json::from_str(&def).map_err(|e| corrupt(format!("definition of {saga_type}: {e}")))?,
        source: if source == "builtin" { DefinitionSource::Builtin } else { DefinitionSource::Admin },
        version: r.try_get("version")?,
        builtin_release: r.try_get("builtin_release")?,
    })
}

async fn insert_audit(tx: &mut AnyConnection, a: &AuditEntry, now: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit_log (at, actor, action, target, before, after, note) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(now)
    .bind(&a.actor)
    .bind(&a.action)
    .bind(&a.target)
    .bind(a.before.as_ref().map(|v| v.to_string()))
    .bind(a.after.as_ref().map(|v| v.to_string()))
    .bind(&a.note)
    .execute(&mut *tx)
    .await?;
    if let Some(k) = &a.answer {
        answer_key(tx, &k.caller, &k.route, &k.key, k.status, &k.body).await?;
    }
    Ok(())
}

/// Stores `status` and `body` as the answer of an idempotency key, only if the key is still
/// in flight (its lock held, nobody else answered it); true if it was.
async fn answer_key(
    conn: &mut AnyConnection,
    caller: &str,
    route: &str,
    key: &str,
    status: u16,
    body: &[u8],
) -> Result<bool> {
    let stored = sqlx::query(
        "UPDATE idempotency_keys SET response_status = $4, response_body = $5 \
         WHERE caller = $1 AND route = $2 AND key = $3 AND response_status IS NULL",
    )
    .bind(caller)
    .bind(route)
    .bind(key)
    .bind(i64::from(status))
    .bind(body)
    .execute(conn)
    .await?;
    Ok(stored.rows_affected() > 0)
}

/// Marks the catalog changed, inside the transaction that changes it.
async fn bump_catalog(tx: &mut AnyConnection) -> Result<()> {
    sqlx::query("UPDATE catalog_version SET version = version + 1 WHERE id = 1").execute(tx).await?;
    Ok(())
}

/// The head of every claim of a key ([`CLAIM_INSERT`], [`CLAIM_WHERE`]).
macro_rules! claim_into {
    () => {
        "INSERT INTO idempotency_keys (caller, route, key, fingerprint, saga_id, response_status, \
         response_body, locked_until, created_at, expires_at)"
    };
}
/// The tail of every claim of a key: an expired row is replaced as if it never existed.
macro_rules! claim_conflict {
    () => {
        " ON CONFLICT (caller, route, key) DO UPDATE SET fingerprint = excluded.fingerprint, \
         saga_id = excluded.saga_id, response_status = excluded.response_status, \
         response_body = excluded.response_body, locked_until = excluded.locked_until, \
         created_at = excluded.created_at, expires_at = excluded.expires_at \
         WHERE idempotency_keys.expires_at <= excluded.created_at"
    };
}
/// Claims a key: inserts it unless it exists, and replaces a row past its expiry ($9 is now)
/// as if it never existed. One atomic statement (an upsert): never SELECT-then-INSERT; one
/// row affected means the key is now ours.
const CLAIM_INSERT: &str =
    concat!(claim_into!(), " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)", claim_conflict!());
/// [`CLAIM_INSERT`] under a further condition, numbered from `$11`
/// (`CLAIM_WHERE + condition + CLAIM_CONFLICT`): a creation whose commit carries checks
/// claims its key only if they hold, or a refused commit would leave the key claimed for a
/// saga that does not exist.
const CLAIM_WHERE: &str = concat!(claim_into!(), " SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10 WHERE ");
const CLAIM_CONFLICT: &str = claim_conflict!();

/// The statement that claims an idempotency key for `saga_id` (or for a request that creates
/// nothing): inserted unless it exists (an expired one is replaced), and only if the
/// `checks` hold ([`check_conditions`]).
fn claim_statement(
    script: &mut Script,
    c: &IdempotencyClaim,
    saga_id: Option<&str>,
    now: i64,
    checks: Checks<'_>,
    for_update: &str,
) {
    let (status, body) = match &c.response {
        Some((s, b)) => (Some(i64::from(*s)), Some(b.clone())),
        None => (None, None),
    };
    let mut args = vec![
        Arg::text(&c.caller),
        Arg::text(&c.route),
        Arg::text(&c.key),
        Arg::text(&c.fingerprint),
        Arg::Text(saga_id.map(str::to_owned)),
        Arg::Int(status),
        Arg::Bytes(body),
        Arg::Int(Some(now + c.lock_ms)),
        Arg::Int(Some(now)),
        Arg::Int(Some(now + c.ttl_ms)),
    ];
    match check_conditions(checks, for_update, &mut args) {
        None => script.push_as(Role::Claim, CLAIM_INSERT, args),
        Some(checks) => script.push_as(Role::Claim, format!("{CLAIM_WHERE}{checks}{CLAIM_CONFLICT}"), args),
    }
}

/// Claims an idempotency key inside `tx`: `None` if the key is now ours, else what the key
/// already holds.
async fn claim_in_tx(tx: &mut AnyConnection, c: &IdempotencyClaim, now: i64) -> Result<Option<CreateOutcome>> {
    let mut script = Script::default();
    claim_statement(&mut script, c, None, now, Checks::default(), "");
    for _ in 0..CLAIM_TRIES {
        let mut inserted = false;
        for s in &script.statements {
            inserted = bind(sqlx::query(&s.sql), &s.args).execute(&mut *tx).await?.rows_affected() == 1;
        }
        if inserted {
            return Ok(None);
        }
        if let Some(held) = claim_existing(tx, c, now).await? {
            return Ok(Some(held));
        }
    }
    Ok(Some(CreateOutcome::InFlight))
}

/// How often a claim is made again when the row that refused it was gone by the time it was
/// read ([`claim_existing`]): a key released or expired in between is free, and a key that
/// keeps coming and going is in use by other requests of the moment (answered as in flight).
const CLAIM_TRIES: usize = 3;

/// What a key that was not new holds (after [`claim_statement`] found it taken): the first
/// request's outcome. `None` if the row is gone: the request that held it released it (it
/// failed before creating anything) or the janitor expired it, after the claim found it and
/// before this read. Only a claim made outside a transaction can see that (PostgreSQL's
/// single-statement creation; within one, the upsert keeps the row it found locked).
async fn claim_existing(tx: &mut AnyConnection, c: &IdempotencyClaim, now: i64) -> Result<Option<CreateOutcome>> {
    let row = sqlx::query(
        "SELECT fingerprint, saga_id, response_status, response_body, locked_until FROM idempotency_keys \
         WHERE caller = $1 AND route = $2 AND key = $3",
    )
    .bind(&c.caller)
    .bind(&c.route)
    .bind(&c.key)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let fingerprint: String = row.try_get("fingerprint")?;
    if fingerprint != c.fingerprint {
        return Ok(Some(CreateOutcome::Mismatch));
    }
    let existing_saga: Option<String> = row.try_get("saga_id")?;
    let status: Option<i64> = row.try_get("response_status")?;
    if let Some(status) = status {
        let body: Vec<u8> = row.try_get::<Option<Vec<u8>>, _>("response_body")?.unwrap_or_default();
        let status = u16::try_from(status).map_err(|_| corrupt("status"))?;
        return Ok(Some(CreateOutcome::Replay { status, body, saga_id: existing_saga }));
    }
    let locked_until: i64 = row.try_get("locked_until")?;
    if locked_until > now {
        return Ok(Some(CreateOutcome::InFlight));
    }
    Ok(Some(CreateOutcome::Abandoned { saga_id: existing_saga.unwrap_or_default() }))
}

#[async_trait]
impl SagaStore for SqlStore {
    async fn create_saga(&self, saga: &NewSaga, claim: Option<&IdempotencyClaim>, now: i64) -> Result<CreateOutcome> {
        // One script: the claim, the saga (only if the claim went in), its steps and its first
        // event (only if the saga went in). A key that was not new wrote nothing: its expired
        // row, the only thing deleted, would have let it in.
        let mut script = Script::default();
        self.creation_statements(&mut script, saga, claim, now)?;
        let script = script.join(self.dialect.folding())?;
        // One query (PostgreSQL's CTEs) needs no transaction of its own.
        let single = script.single();
        self.writes
            .submit(
                (script, claim.cloned(), now),
                |(script, claim, now), conn| {
                    Box::pin(async move {
                        // A crash here, before the claim and the saga row commit, must leave
                        // neither: both are in this one transaction.
                        crate::failpoint!("intake-after-claim");
                        for _ in 0..CLAIM_TRIES {
                            // The saga insert is the only statement that returns a row.
                            if !script.run(conn).await?.is_empty() {
                                return Ok(CreateOutcome::Created);
                            }
                            let Some(c) = claim else {
                                return Err(corrupt("a saga without an idempotency key was not inserted"));
                            };
                            // A key gone since the claim found it: nothing was written, claim again.
                            if let Some(held) = claim_existing(conn, c, *now).await? {
                                return Ok(held);
                            }
                            tracing::debug!(key = %c.key, "an idempotency key was released or expired while claimed; claiming it again");
                        }
                        Ok(CreateOutcome::InFlight)
                    })
                },
                single,
            )
            .await
    }

    async fn saga(&self, id: &str) -> Result<Option<SagaRecord>> {
        self.read(|| self.saga_once(id)).await
    }

    async fn list_sagas(
        &self,
        saga_type: &str,
        status: Option<&str>,
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<SagaSummary>> {
        // UUIDv7 ids sort by creation time, so `id < before` is a stable keyset cursor.
        let mut query = sqlx::query(list_sagas_sql(status.is_some(), before.is_some())).bind(saga_type);
        if let Some(status) = status {
            query = query.bind(status);
        }
        if let Some(before) = before {
            query = query.bind(before);
        }
        let rows = query.bind(i64::from(limit)).fetch_all(&self.reader).await?;
        rows.iter()
            .map(|r| {
                Ok(SagaSummary {
                    id: r.try_get("id")?,
                    saga_type: r.try_get("saga_type")?,
                    status: SagaStatus::parse(&r.try_get::<String, _>("status")?),
                    reason: r.try_get("reason")?,
                    created_at: r.try_get("created_at")?,
                    updated_at: r.try_get("updated_at")?,
                })
            })
            .collect()
    }

    async fn claim_due(&self, owner: &str, now: i64, lease_ms: i64, limit: u32) -> Result<Vec<(String, i64)>> {
        let data = (Arc::clone(&self.sql), owner.to_owned(), now, lease_ms, limit);
        self.writes
            .run_one(data, |(sql, owner, now, lease_ms, limit), conn| {
                Box::pin(async move {
                    let rows = sqlx::query(&sql.claim_due)
                        .bind(owner)
                        .bind(lease_ms)
                        .bind(now)
                        .bind(i64::from(*limit))
                        .fetch_all(&mut *conn)
                        .await?;
                    rows.iter().map(|r| Ok((r.try_get("id")?, r.try_get("epoch")?))).collect()
                })
            })
            .await
    }

    async fn renew_lease(&self, id: &str, epoch: i64, lease_ms: i64) -> Result<bool> {
        let data = (Arc::clone(&self.sql), id.to_owned(), epoch, lease_ms);
        self.writes
            .run_one(data, |(sql, id, epoch, lease_ms), conn| {
                Box::pin(async move {
                    let r =
                        sqlx::query(&sql.renew_lease).bind(id).bind(epoch).bind(lease_ms).execute(&mut *conn).await?;
                    Ok(r.rows_affected() == 1)
                })
            })
            .await
    }

    async fn release(&self, id: &str, epoch: i64) -> Result<()> {
        self.writes
            .run_one((id.to_owned(), epoch), |(id, epoch), conn| {
                Box::pin(async move {
                    sqlx::query("UPDATE sagas SET lease_owner = NULL, lease_until = NULL WHERE id = $1 AND epoch = $2")
                        .bind(id)
                        .bind(epoch)
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            })
            .await
    }

    async fn release_until(&self, id: &str, epoch: i64, at: i64) -> Result<()> {
        self.writes
            .run_one((id.to_owned(), epoch, at), |(id, epoch, at), conn| {
                Box::pin(async move {
                    sqlx::query(
                        "UPDATE sagas SET lease_owner = NULL, lease_until = NULL, \
                         next_run_at = CASE WHEN next_run_at < $3 THEN $3 ELSE next_run_at END \
                         WHERE id = $1 AND epoch = $2 AND next_run_at IS NOT NULL",
                    )
                    .bind(id)
                    .bind(epoch)
                    .bind(at)
                    .execute(&mut *conn)
                    .await?;
                    Ok(())
                })
            })
            .await
    }

    async fn release_owner(&self, owner: &str) -> Result<u64> {
        self.writes
            .run_one(owner.to_owned(), |owner, conn| {
                Box::pin(async move { Ok(sqlx::query(RELEASE_OWNER).bind(owner).execute(conn).await?.rows_affected()) })
            })
            .await
    }

    async fn database_now_ms(&self) -> Result<Option<i64>> {
        if !self.dialect.shared_by_hosts() {
            return Ok(None);
        }
        let now = sqlx::query_scalar(&format!("SELECT {}", self.dialect.now_ms())).fetch_one(&self.reader).await?;
        Ok(Some(now))
    }

    async fn next_due(&self) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(&self.sql.next_due).fetch_optional(&self.reader).await?)
    }

    async fn commit(&self, c: &Commit<'_>) -> Result<i64> {
        let mut script = Script::default();
        match &c.creation {
            Some(creation) => self.creation_committed_statements(&mut script, creation, c)?,
            None => commit_script(c, &mut script, self.dialect.for_update())?,
        }
        if let Some(keys) = &self.keys {
            // Before the commit runs: whoever sees the row must find the key (module keys).
            for &(plugin, writes) in c.plugin_writes {
                writes.iter().filter(|(_, value)| value.is_some()).for_each(|(key, _)| keys.insert(plugin, key));
            }
        }
        let script = script.join(self.dialect.folding())?;
        let single = script.single();
        // Announced before it is queued; dropped unresolved (uncached) on every error below.
        let cached = self.cache.as_ref().map(|cache| cache.begin(c.plugin_writes));
        let submitted = self
            .writes
            .submit(
                script,
                |script, conn| {
                    Box::pin(async move {
                        // The update (or the saga insert, when creating) is the only statement
                        // that returns a row: none means fenced (or the key was not new), and
                        // then every other statement found its condition false and wrote nothing.
                        let rows = script.run(conn).await?;
                        let [row] = rows.as_slice() else {
                            return match rows.as_slice() {
                                [] => Err(Error::Fenced),
                                _ => Err(corrupt("a commit returned rows it does not write")),
                            };
                        };
                        Ok(row.try_get("seq")?)
                    })
                },
                single,
            )
            .await;
        let seq = match submitted {
            Ok(seq) => seq,
            Err(e) if Checks::of(c).any() => return Err(self.checks_refused(Checks::of(c), e)),
            Err(e) => return Err(e),
        };
        // Durable: its values may be served.
        if let Some(cached) = cached {
            cached.committed();
        }
        Ok(seq)
    }
}

impl SqlStore {
    /// A commit carrying checks ([`Checks`]) failed with `e`: when refused (`Fenced`), a
    /// checked value may be stale (or the fence alone refused it: a check cannot tell which,
    /// and either way the caller reloads), and it is [`Error::StaleRead`]; so is a unique
    /// violation of a commit that inserts a key it read absent (that insert met the row
    /// another commit created meanwhile: [`check_conditions`]), and a deadlock of a commit
    /// whose checks lock rows (PostgreSQL: the database failed it to let another commit
    /// through; nothing was written). Any other error is passed on
    /// (data the database refuses may have come of a stale value too). Either way the checked
    /// keys are no longer answered from memory: each is dropped from the cache and marked in
    /// the filter as existing, so the steps' next reads of them ask the database.
    fn checks_refused(&self, checks: Checks<'_>, e: Error) -> Error {
        let e = match e {
            e if e.is_unique_violation() && checks.inserts() => {
                self.checks_refused.fetch_add(1, Ordering::Relaxed);
                Error::StaleRead
            }
            // Its checks' row locks met another commit's writes in the other order, and the
            // database failed this side (nothing written): run the steps again on a reload,
            // after the refused commit's pause, as for a changed value.
            e if e.is_deadlock() && checks.any_state() => {
                self.checks_refused.fetch_add(1, Ordering::Relaxed);
                Error::StaleRead
            }
            Error::Fenced => {
                if checks.any_state() {
                    self.checks_refused.fetch_add(1, Ordering::Relaxed);
                }
                if checks.catalog.is_some() {
                    self.catalog_checks_refused.fetch_add(1, Ordering::Relaxed);
                }
                Error::StaleRead
            }
            other => other,
        };
        for &(plugin, checks) in checks.state {
            for (key, _) in checks {
                if let Some(cache) = &self.cache {
                    cache.forget(plugin, key);
                }
                if let Some(keys) = &self.keys {
                    keys.insert(plugin, key);
                }
            }
        }
        e
    }
}

/// The saga row update of a commit, by fence. The fence: the row updates only if nobody
/// committed since the state was read (seq) and, for the driver, nobody claimed or took the
/// saga over since its claim (epoch, $10). The row lock this takes serialises one saga's
/// commits, so its outbox rows get ids in seq order. It sets the new seq ($9, the read seq
/// plus the commit's number of events) and records the commit's last event id ($8), which
/// every later statement of the commit checks ([`if_committed`]).
macro_rules! commit_update {
    ($($tail:literal),*) => {
        concat!(
            "UPDATE sagas SET status = $3, phase = $4, reason = $5, next_run_at = $6, updated_at = $7, seq = $9, \
             last_event_id = $8",
            $($tail),*,
            // Its result, and what its dependents check as a CTE ([`Script`]).
            " RETURNING seq, id, last_event_id"
        )
    };
}
/// The end of every [`commit_update!`].
const COMMIT_RETURNING: &str = " RETURNING seq, id, last_event_id";
const COMMIT_LEASE: &str = commit_update!(" WHERE id = $1 AND seq = $2 AND epoch = $10");
const COMMIT_LEASE_RELEASE: &str =
    commit_update!(", lease_owner = NULL, lease_until = NULL WHERE id = $1 AND seq = $2 AND epoch = $10");
const COMMIT_TAKEOVER: &str =
    commit_update!(", lease_owner = NULL, lease_until = NULL, epoch = epoch + 1 WHERE id = $1 AND seq = $2");

/// The condition of every statement of a commit after the fenced update: that update applied
/// (the saga row carries this commit's last event id; `$1` the saga id, `$2` that event id).
/// So a fenced commit writes nothing even when its statements run as one script.
macro_rules! if_committed {
    () => {
        "EXISTS (SELECT 1 FROM sagas WHERE id = $1 AND last_event_id = $2)"
    };
}
/// [`if_committed!`] as it reads in a fenced group's CTE ([`Script`]): the head's `RETURNING`.
const IF_COMMITTED: (&str, &str) = ("SELECT 1 FROM sagas WHERE id = $1", "SELECT 1 FROM head WHERE id = $1");

/// Step rows: inserted, or updated when they exist ([`rows_if_committed`]; 18 values per row).
const STEPS_INTO: &str = "INSERT INTO saga_steps (saga_id, idx, name, status, attempts, compensate_attempts, output, \
     compensate_output, last_error, wait_signal, signal_payload, execute_digest, compensate_digest, started_at, \
     finished_at, updated_at, failures, waited, in_flight_until)";
const STEP_VALUES: usize = 18;
const STEPS_UPSERT: &str = " ON CONFLICT (saga_id, idx) DO UPDATE SET status = excluded.status, \
     attempts = excluded.attempts, compensate_attempts = excluded.compensate_attempts, output = excluded.output, \
     compensate_output = excluded.compensate_output, last_error = excluded.last_error, \
     wait_signal = excluded.wait_signal, signal_payload = excluded.signal_payload, \
     execute_digest = excluded.execute_digest, compensate_digest = excluded.compensate_digest, \
     started_at = excluded.started_at, finished_at = excluded.finished_at, updated_at = excluded.updated_at, \
     failures = excluded.failures, waited = excluded.waited, in_flight_until = excluded.in_flight_until";
/// Plugin state rows: `(plugin, key, value, updated_at)` each, inserted or replaced.
const STATE_INTO: &str = "INSERT INTO plugin_state (plugin, key, value, updated_at)";
const STATE_UPSERT: &str =
    " ON CONFLICT (plugin, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at";
const STATE_DELETE_IF_COMMITTED: &str =
    concat!("DELETE FROM plugin_state WHERE plugin = $3 AND key = $4 AND ", if_committed!());
/// Outbox rows ([`rows_if_committed`]; 5 values per row), inserted in `seq` order (the third
/// column) so that their ids follow it.
const OUTBOX_INTO: &str = "INSERT INTO outbox (saga_id, event_id, seq, event_type, payload, created_at)";
const OUTBOX_VALUES: usize = 5;
const OUTBOX_ORDER: &str = " ORDER BY 3";
const RESPONSE_IF_COMMITTED: &str = concat!(
    "UPDATE idempotency_keys SET response_status = $3, response_body = $4 \
     WHERE caller = $5 AND route = $6 AND key = $7 AND response_status IS NULL AND ",
    if_committed!()
);
const AUDIT_IF_COMMITTED: &str = concat!(
    "INSERT INTO audit_log (at, actor, action, target, before, after, note) SELECT $3, $4, $5, $6, $7, $8, $9 WHERE ",
    if_committed!()
);

/// `{into} SELECT * FROM (VALUES ($1, $3, ..), ($1, ..), ..) AS v WHERE <if committed>{tail}`:
/// `rows` rows in one statement, each the saga id (`$1`, unless not `saga_id_first`) and
/// `width` values of its own, all after the two arguments of the fence. One statement for all the steps (or events) of a
/// commit instead of one each: a round trip each on PostgreSQL, and on SQLite a result handed
/// back from its thread each.
fn rows_if_committed(into: &str, rows: usize, width: usize, saga_id_first: bool, tail: &str) -> String {
    use std::fmt::Write as _;
    let mut sql = String::with_capacity(into.len() + tail.len() + rows * (width * 5 + 8) + 120);
    sql.push_str(into);
    sql.push_str(" SELECT * FROM (VALUES ");
    let mut n = 3;
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for i in 0..width {
            let comma = if i == 0 && !saga_id_first { "" } else { ", " };
            if i == 0 && saga_id_first {
                sql.push_str("$1");
            }
            let _ = write!(sql, "{comma}${n}");
            n += 1;
        }
        sql.push(')');
    }
    sql.push_str(") AS v WHERE ");
    sql.push_str(if_committed!());
    sql.push_str(tail);
    sql
}

/// Pushes one statement writing `rows` of a saga (each its id and `width` values) if the commit
/// fenced by `fence` applied; nothing when there are no rows.
fn push_rows(script: &mut Script, into: &str, width: usize, tail: &str, fence: [Arg; 2], rows: Vec<Vec<Arg>>) {
    push_rows_with(script, into, width, true, tail, fence, rows);
}

/// [`push_rows`], with the saga id in each row or not (`saga_id_first`).
fn push_rows_with(
    script: &mut Script,
    into: &str,
    width: usize,
    saga_id_first: bool,
    tail: &str,
    fence: [Arg; 2],
    rows: Vec<Vec<Arg>>,
) {
    if rows.is_empty() {
        return;
    }
    let sql = rows_if_committed(into, rows.len(), width, saga_id_first, tail);
    let mut args: Vec<Arg> = fence.into();
    args.extend(rows.into_iter().flatten());
    script.push_as(Role::Dependent, sql, args);
}

/// The statements of one commit, with their arguments: the fenced update first, then the
/// changed steps, the plugins' state writes, one outbox row per transition and the audit
/// entry, each conditional on the update having applied.
/// A commit's statements: the fenced update of the saga row first, then what depends on it.
/// A commit that stores its keyed request's answer ([`Commit::answer`]) also needs the key
/// still claimed and unanswered, and holds its row (`for_update`) until it commits: the
/// request may be dropped while this statement waits for the saga's row (its client hung up),
/// and the release of its key must then either wait for the commit (which leaves the key
/// answered, so the release removes nothing and the retry replays the answer) or come first
/// (and the commit applies nothing, so the retry runs the event). On PostgreSQL a release on
/// another connection had deleted the key while the commit waited, and the commit applied the
/// event without its answer: the retry ran it again (a signal then answered 409).
fn commit_script(c: &Commit<'_>, script: &mut Script, for_update: &str) -> Result<()> {
    let last = c.events.last().ok_or_else(|| corrupt("a commit without an event".to_owned()))?;
    let new_seq = c.read_seq + c.events.len() as i64;
    let (update, epoch) = match c.fence {
        Fence::Lease(epoch) => (COMMIT_LEASE, Some(epoch)),
        Fence::LeaseRelease(epoch) => (COMMIT_LEASE_RELEASE, Some(epoch)),
        Fence::Takeover => (COMMIT_TAKEOVER, None),
    };
    let mut args = vec![
        Arg::text(c.saga_id),
        Arg::Int(Some(c.read_seq)),
        Arg::text(c.state.status.as_str()),
        Arg::text(c.state.phase.as_str()),
        Arg::Text(c.state.reason.clone()),
        Arg::Int(c.state.next_run_at),
        Arg::Int(Some(c.now)),
        Arg::text(&last.event_id),
        Arg::Int(Some(new_seq)),
    ];
    args.extend(epoch.map(|e| Arg::Int(Some(e))));
    let mut conditions = String::new();
    if let Some(answer) = &c.answer {
        let n = args.len();
        args.extend([Arg::text(answer.caller), Arg::text(answer.route), Arg::text(answer.key)]);
        conditions = format!(
            " AND EXISTS (SELECT 1 FROM idempotency_keys WHERE caller = ${} AND route = ${} AND key = ${} \
             AND response_status IS NULL{for_update})",
            n + 1,
            n + 2,
            n + 3
        );
    }
    if let Some(checks) = check_conditions(Checks::of(c), for_update, &mut args) {
        conditions.push_str(" AND ");
        conditions.push_str(&checks);
    }
    let update: std::borrow::Cow<'static, str> = if conditions.is_empty() {
        update.into()
    } else {
        let fenced =
            update.strip_suffix(COMMIT_RETURNING).ok_or_else(|| corrupt("a commit's update without its RETURNING"))?;
        format!("{fenced}{conditions}{COMMIT_RETURNING}").into()
    };
    script.push_as(Role::Head("seq"), update, args);
    let mut steps = Vec::with_capacity(c.changed_steps.len());
    for &i in c.changed_steps {
        let step = c.state.steps.get(i).ok_or_else(|| corrupt(format!("changed step {i} out of range")))?;
        let name = c.step_names.get(i).ok_or_else(|| corrupt(format!("step name {i} out of range")))?;
        steps.push(step_values(i, name, step));
    }
    let fenced = || [Arg::text(c.saga_id), Arg::text(&last.event_id)];
    push_rows(script, STEPS_INTO, STEP_VALUES, STEPS_UPSERT, fenced(), steps);
    state_statements(c, script, fenced);
    let events = (c.read_seq + 1..).zip(c.events).map(|(seq, event)| outbox_values(event, seq, c.now)).collect();
    push_rows(script, OUTBOX_INTO, OUTBOX_VALUES, OUTBOX_ORDER, fenced(), events);
    tail_statements(c, c.response, script, fenced);
    Ok(())
}

/// What a commit must find still true in the database: the state values its calls read
/// ([`Commit::plugin_checks`]) and the catalog version its compensations picked their
/// bindings at ([`Commit::catalog_check`]); with the writes that go with them
/// ([`Commit::plugin_writes`]): a checked key the commit writes is locked.
#[derive(Clone, Copy, Default)]
struct Checks<'a> {
    state: &'a [(&'a str, &'a [StateCheck])],
    writes: &'a [(&'a str, &'a [StateWrite])],
    catalog: Option<i64>,
}

impl<'a> Checks<'a> {
    fn of(c: &Commit<'a>) -> Checks<'a> {
        Checks { state: c.plugin_checks, writes: c.plugin_writes, catalog: c.catalog_check }
    }

    /// Whether there is anything to check.
    fn any(&self) -> bool {
        self.catalog.is_some() || self.any_state()
    }

    /// Whether there is a state value to check.
    fn any_state(&self) -> bool {
        self.state.iter().any(|(_, checks)| !checks.is_empty())
    }

    /// Whether the commit writes (or deletes) `key` of `plugin`.
    fn writes(&self, plugin: &str, key: &str) -> bool {
        self.writes.iter().any(|&(p, writes)| p == plugin && writes.iter().any(|(k, _)| k == key))
    }

    /// Whether the commit read `key` of `plugin` absent: its value is then inserted, not
    /// upserted ([`state_statements`]).
    fn read_absent(&self, plugin: &str, key: &str) -> bool {
        self.state.iter().any(|&(p, checks)| p == plugin && checks.iter().any(|(k, v)| k == key && v.is_none()))
    }

    /// Whether some key the commit read absent gets a value from it (a plain insert).
    fn inserts(&self) -> bool {
        last_writes(self.writes).iter().any(|&(plugin, key, value)| value.is_some() && self.read_absent(plugin, key))
    }
}

/// The condition that a commit's checks hold ([`Checks`]): each key still holds the value
/// read, or is still absent, and the catalog version is still the one given, in the database
/// as it stood before the commit (the head of its statements carries it). Its arguments are
/// appended to `args`, numbered after those already there. `None` without checks.
///
/// On PostgreSQL every part of the one statement sees the snapshot from before it, and a
/// commit of the same key may be under way there, not yet visible. For a key the commit
/// writes (a lost update otherwise): the check of the value read locks its row
/// (`for_update`), so it waits for that commit and then looks at the row as it left it (READ
/// COMMITTED re-reads a row it waited for): changed or deleted, the check fails and the
/// commit is refused; read absent, there is no row to lock, and the commit inserts the key
/// plainly ([`state_statements`]), which fails on the row the other commit made (refused as
/// well: [`SqlStore::checks_refused`]). A key the commit only reads is not held: a commit of
/// it landing meanwhile is as if it came after this one, and readers of a hot key do not
/// queue for it (what stays possible is write skew: two commits each reading what the other
/// writes). Keys are checked in one order (plugin, key), and written in it, so that commits
/// locking the same keys lock them alike. On SQLite, one writer: `for_update` is empty and
/// nothing else can be under way.
fn check_conditions(checks: Checks<'_>, for_update: &str, args: &mut Vec<Arg>) -> Option<String> {
    use std::fmt::Write as _;
    let mut sql = String::new();
    if let Some(version) = checks.catalog {
        args.push(Arg::Int(Some(version)));
        let _ = write!(sql, "EXISTS (SELECT 1 FROM catalog_version WHERE id = 1 AND version = ${})", args.len());
    }
    let mut state: Vec<(&str, &str, &Option<Vec<u8>>)> = checks
        .state
        .iter()
        .flat_map(|&(plugin, checks)| checks.iter().map(move |(key, value)| (plugin, key.as_str(), value)))
        .collect();
    state.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    for (plugin, key, value) in state {
        if !sql.is_empty() {
            sql.push_str(" AND ");
        }
        let n = args.len();
        args.extend([Arg::text(plugin), Arg::text(key)]);
        let _ = match value {
            Some(value) => {
                args.push(Arg::Bytes(Some(value.clone())));
                let lock = if checks.writes(plugin, key) { for_update } else { "" };
                write!(
                    sql,
                    "EXISTS (SELECT 1 FROM plugin_state WHERE plugin = ${} AND key = ${} AND value = ${}{lock})",
                    n + 1,
                    n + 2,
                    n + 3
                )
            }
            None => {
                write!(sql, "NOT EXISTS (SELECT 1 FROM plugin_state WHERE plugin = ${} AND key = ${})", n + 1, n + 2)
            }
        };
    }
    (!sql.is_empty()).then_some(sql)
}

/// A commit's plugin state writes, each conditional on the fence `fenced` names.
fn state_statements(c: &Commit<'_>, script: &mut Script, fenced: impl Fn() -> [Arg; 2]) {
    // The last write of each key is what stands; one statement for the puts, one per delete.
    // (One upsert may not touch a row twice, hence the last write per key only.) A key the
    // commit checked absent is inserted, not upserted: should another commit have created it
    // while this one's statement ran, the insert fails rather than overwrite what that commit
    // wrote from a value this one never saw ([`check_conditions`]). Rows are written in key
    // order, as checks lock them, so commits writing the same keys lock them alike.
    let checks = Checks::of(c);
    let mut last = last_writes(c.plugin_writes);
    last.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let (mut puts, mut inserts) = (Vec::new(), Vec::new());
    for (plugin, key, value) in last {
        match value {
            Some(v) => {
                let row = vec![Arg::text(plugin), Arg::text(key), Arg::Bytes(Some(v.clone())), Arg::Int(Some(c.now))];
                if checks.read_absent(plugin, key) {
                    inserts.push(row)
                } else {
                    puts.push(row)
                }
            }
            None => {
                let mut args: Vec<Arg> = fenced().into();
                args.extend([Arg::text(plugin), Arg::text(key)]);
                script.push_as(Role::Dependent, STATE_DELETE_IF_COMMITTED, args);
            }
        }
    }
    push_rows_with(script, STATE_INTO, 4, false, STATE_UPSERT, fenced(), puts);
    push_rows_with(script, STATE_INTO, 4, false, "", fenced(), inserts);
}

/// A commit's stored response (unless it went elsewhere), its request's answer and its audit
/// entry, conditional on the fence `fenced` names.
fn tail_statements(
    c: &Commit<'_>,
    response: Option<StoredResponse<'_>>,
    script: &mut Script,
    fenced: impl Fn() -> [Arg; 2],
) {
    for r in response.into_iter().chain(c.answer) {
        let mut args: Vec<Arg> = fenced().into();
        args.extend([
            Arg::Int(Some(i64::from(r.status))),
            Arg::Bytes(Some(r.body.to_vec())),
            Arg::text(r.caller),
            Arg::text(r.route),
            Arg::text(r.key),
        ]);
        script.push_as(Role::Dependent, RESPONSE_IF_COMMITTED, args);
    }
    if let Some(a) = c.audit {
        let mut args: Vec<Arg> = fenced().into();
        args.extend([
            Arg::Int(Some(c.now)),
            Arg::text(&a.actor),
            Arg::text(&a.action),
            Arg::text(&a.target),
            Arg::Text(a.before.as_ref().map(|v| v.to_string())),
            Arg::Text(a.after.as_ref().map(|v| v.to_string())),
            Arg::Text(a.note.clone()),
        ]);
        script.push_as(Role::Dependent, AUDIT_IF_COMMITTED, args);
    }
}

/// The values of one step row after the saga id ([`STEPS_INTO`]).
fn step_values(idx: usize, name: &str, s: &StepState) -> Vec<Arg> {
    vec![
        Arg::Int(Some(idx as i64)),
        Arg::text(name),
        Arg::text(s.status.as_str()),
        Arg::Int(Some(i64::from(s.attempts))),
        Arg::Int(Some(i64::from(s.compensate_attempts))),
        Arg::Text(s.output.clone()),
        Arg::Text(s.compensate_output.clone()),
        Arg::Text(s.last_error.clone()),
        Arg::Text(s.wait_signal.clone()),
        Arg::Text(s.signal_payload.clone()),
        Arg::Text(s.execute_digest.clone()),
        Arg::Text(s.compensate_digest.clone()),
        Arg::Int(s.started_at),
        Arg::Int(s.finished_at),
        Arg::Int(s.updated_at),
        Arg::Int(Some(i64::from(s.failures))),
        Arg::Int(Some(i64::from(s.waited))),
        Arg::Int(s.in_flight_until),
    ]
}

/// The values of the event's outbox row `seq` after the saga id ([`OUTBOX_INTO`]).
fn outbox_values(e: &OutboxEvent, seq: i64, now: i64) -> Vec<Arg> {
    vec![
        Arg::text(&e.event_id),
        Arg::Int(Some(seq)),
        Arg::text(&e.event_type),
        Arg::text(&e.payload),
        Arg::Int(Some(now)),
    ]
}

/// A value bound to a statement of a [`Script`]: the types `Any` carries.
#[derive(Debug, Clone)]
enum Arg {
    Int(Option<i64>),
    Text(Option<String>),
    Bytes(Option<Vec<u8>>),
}

impl Arg {
    fn text(s: &str) -> Arg {
        Arg::Text(Some(s.to_owned()))
    }
}

/// Statements that run in order, each with its own `$1..$n`, folded into fewer queries as
/// the dialect allows ([`Folding`]): on SQLite ONE multi-statement query, renumbered to one
/// argument list, so a commit is one round trip to the connection's thread instead of one per
/// statement; on PostgreSQL one statement per fenced group (below); else one by one. Either
/// way the rows come back as if each statement ran in turn, and statements that depend on an
/// earlier one say so in their own conditions.
///
/// A fenced group is a head (the statement that writes the saga row the others depend on:
/// the fenced update of a commit, or a creation's saga insert), the claim its insert may depend
/// on, and its dependents (each conditional on [`if_committed!`]). As a PostgreSQL statement:
/// `WITH claimed AS (<claim> RETURNING ..), head AS (<head>), d2 AS (<dependent>), ..
/// SELECT <result> FROM head`, where each condition reads the CTE instead of the table (the
/// sub-statements of one statement all see the snapshot from before it, so a table read would
/// not see the head's write). One round trip for the group, and a commit of one group needs no
/// `BEGIN` and `COMMIT` either: one statement is atomic on its own.
#[derive(Default)]
struct Script {
    statements: Vec<Statement>,
    /// The queries to send, each SQL text and the statements whose arguments it binds
    /// ([`Script::join`]); empty: each statement alone.
    queries: Vec<(String, std::ops::Range<usize>)>,
}

struct Statement {
    sql: Cow<'static, str>,
    args: Vec<Arg>,
    role: Role,
}

/// What a statement is to its fenced group ([`Script`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The idempotency claim the next head's insert depends on ([`CLAIMED`]).
    Claim,
    /// Writes the saga row its dependents check; its `RETURNING` names `id` and
    /// `last_event_id`, and its result column is the one given.
    Head(&'static str),
    /// Conditional on its head ([`if_committed!`]).
    Dependent,
}

/// The condition of a saga insert on the claim before it, and what it reads as a CTE.
const CLAIMED: (&str, &str) = ("SELECT 1 FROM idempotency_keys WHERE", "SELECT 1 FROM claimed WHERE");
/// The columns of a claim's `RETURNING` in a CTE: those [`CLAIMED`] compares.
const CLAIM_RETURNING: &str = " RETURNING caller, route, key, saga_id";

impl Script {
    fn push_as(&mut self, role: Role, sql: impl Into<Cow<'static, str>>, args: Vec<Arg>) {
        self.statements.push(Statement { sql: sql.into(), args, role });
    }

    /// Folds the statements into queries now, as `folding` says: in the caller's task, not
    /// the writer's, whose every microsecond everyone waits for (the renumbering was a sixth
    /// of the writer thread's time at the closed-loop peak).
    fn join(mut self, folding: Folding) -> Result<Script> {
        self.queries = match folding {
            Folding::Script => {
                let mut sql = String::new();
                let mut count = 0;
                for s in &self.statements {
                    if !sql.is_empty() {
                        sql.push_str(";\n");
                    }
                    renumber(&s.sql, count, &mut sql);
                    count += s.args.len();
                }
                vec![(sql, 0..self.statements.len())]
            }
            Folding::Ctes => {
                self.groups().into_iter().map(|g| Ok((self.fold(g.clone())?, g))).collect::<Result<_>>()?
            }
        };
        Ok(self)
    }

    /// The fenced groups, in order: a claim opens one, a head opens one unless it follows its
    /// claim, dependents join the current one (one with no head before it runs alone, as
    /// written).
    fn groups(&self) -> Vec<std::ops::Range<usize>> {
        let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
        let mut headed = false;
        for (i, s) in self.statements.iter().enumerate() {
            let joins = match s.role {
                Role::Claim => false,
                Role::Head(_) => !headed && groups.last().is_some_and(|g| self.statements[g.start].role == Role::Claim),
                Role::Dependent => headed,
            };
            match groups.last_mut() {
                Some(g) if joins => g.end = i + 1,
                _ => groups.push(i..i + 1),
            }
            headed = match s.role {
                Role::Head(_) => true,
                Role::Dependent => headed,
                Role::Claim => false,
            };
        }
        groups
    }

    /// One group as one statement: itself when alone (its conditions read the tables, as run
    /// in turn), else its CTEs.
    fn fold(&self, group: std::ops::Range<usize>) -> Result<String> {
        let statements = &self.statements[group];
        if let [only] = statements {
            return Ok(only.sql.clone().into_owned());
        }
        let mut sql = String::from("WITH ");
        let mut count = 0;
        let mut result = None;
        for (i, s) in statements.iter().enumerate() {
            let (name, text) = match s.role {
                Role::Claim => ("claimed".to_owned(), format!("{}{CLAIM_RETURNING}", s.sql)),
                Role::Head(column) => {
                    result = Some(column);
                    let claimed = statements[..i].iter().any(|s| s.role == Role::Claim);
                    ("head".to_owned(), if claimed { reread(&s.sql, CLAIMED)? } else { s.sql.clone().into_owned() })
                }
                Role::Dependent => (format!("d{i}"), reread(&s.sql, IF_COMMITTED)?),
            };
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&name);
            sql.push_str(" AS (");
            renumber(&text, count, &mut sql);
            sql.push(')');
            count += s.args.len();
        }
        let result = result.ok_or_else(|| corrupt("a fenced group without its head"))?;
        sql.push_str(" SELECT ");
        sql.push_str(result);
        sql.push_str(" FROM head");
        Ok(sql)
    }

    /// Runs the statements as folded; again on every call (a job may run twice: after a
    /// rolled-back batch).
    async fn run(&self, conn: &mut AnyConnection) -> Result<Vec<AnyRow>> {
        if self.queries.is_empty() {
            let mut rows = Vec::new();
            for s in &self.statements {
                rows.extend(bind(sqlx::query(&s.sql), &s.args).fetch_all(&mut *conn).await?);
            }
            return Ok(rows);
        }
        let mut rows = Vec::new();
        for (sql, range) in &self.queries {
            let args = self.statements[range.clone()].iter().flat_map(|s| &s.args);
            rows.extend(bind(sqlx::query(sql), args).fetch_all(&mut *conn).await?);
        }
        Ok(rows)
    }

    /// Whether it runs as one query: then it needs no transaction of its own.
    fn single(&self) -> bool {
        self.queries.len() == 1 || (self.queries.is_empty() && self.statements.len() == 1)
    }
}

/// `sql` with its condition on an earlier statement's table made a read of that statement's
/// CTE (`(table form, CTE form)`). Refuses a statement without the condition: as a CTE it would
/// write unconditionally, fenced or not.
fn reread(sql: &str, condition: (&str, &str)) -> Result<String> {
    if !sql.contains(condition.0) {
        return Err(corrupt(format!("a dependent statement without its condition: {sql}")));
    }
    Ok(sql.replacen(condition.0, condition.1, 1))
}

fn bind<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    args: impl IntoIterator<Item = &'q Arg>,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for a in args {
        q = match a {
            Arg::Int(v) => q.bind(*v),
            Arg::Text(v) => q.bind(v.as_deref()),
            Arg::Bytes(v) => q.bind(v.as_deref()),
        };
    }
    q
}

/// Appends `sql` with every `$n` made `$(n + offset)`. The statements are ours: no `$` inside
/// a string literal.
fn renumber(sql: &str, offset: usize, out: &mut String) {
    let mut chars = sql.char_indices().peekable();
    while let Some((_, ch)) = chars.next() {
        out.push(ch);
        if ch != '$' {
            continue;
        }
        let mut n = 0usize;
        let mut digits = false;
        while let Some(&(_, d)) = chars.peek() {
            let Some(v) = d.to_digit(10) else { break };
            n = n * 10 + v as usize;
            digits = true;
            chars.next();
        }
        if digits {
            out.push_str(&(n + offset).to_string());
        }
    }
}

#[async_trait]
impl PluginStateStore for SqlStore {
    async fn state_get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.state_read(plugin, key, false).await?.value)
    }

    async fn state_read(&self, plugin: &str, key: &str, guess: bool) -> Result<StateRead> {
        // Every read of a caller that can have it checked is checked at its commit, however
        // it was answered: another saga's commit of the key between this read and that commit
        // refuses it (no lost update). Memory answers are exact where this process owns the
        // database, and where it does not, only a checked caller may have them.
        let checked = guess;
        if !self.guesses || guess {
            if let Some(value) = self.cache.as_ref().and_then(|cache| cache.get(plugin, key)) {
                return Ok(StateRead { value, checked });
            }
            if self.keys.as_ref().is_some_and(|keys| !keys.may_contain(plugin, key)) {
                self.filtered.fetch_add(1, Ordering::Relaxed);
                return Ok(StateRead { value: None, checked });
            }
        }
        Ok(StateRead { value: self.state_from_database(plugin, key).await?, checked })
    }

    async fn state_list(&self, plugin: &str, prefix: &str, limit: u32) -> Result<Vec<(String, Vec<u8>)>> {
        self.state_scan(plugin, prefix, None, limit).await
    }

    async fn state_scan(
        &self,
        plugin: &str,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        // A range scan on the primary key rather than LIKE, so '%' and '_' in keys are literal.
        // Keys compare bytewise on both databases (SQLite's BINARY collation, PostgreSQL's
        // COLLATE "C" on the column), and Rust's `str` order is the same byte order.
        let (op, from) = match after {
            Some(after) if after >= prefix => (">", after),
            _ => (">=", prefix),
        };
        let end = prefix_end(prefix);
        // Two statements rather than `($3 IS NULL OR key < $3)`: a generic plan could not use
        // that as an index bound, and would read the plugin's keys past the prefix. The page
        // ends at STATE_PAGE_BYTES of values (`before`: the values of the rows before this
        // one; the first row always comes), counted in the database: a thousand values of a
        // megabyte each are never read into memory at once. `length` of a BLOB or bytea is
        // its size in bytes, read from its header (SQLite's record header, PostgreSQL's TOAST
        // pointer), not from the value.
        let range = match end {
            Some(_) => format!("plugin = $1 AND key {op} $2 AND key < $3 ORDER BY key LIMIT $4"),
            None => format!("plugin = $1 AND key {op} $2 ORDER BY key LIMIT $3"),
        };
        let budget = if end.is_some() { "$5" } else { "$4" };
        // The window runs over the keys and sizes of the page's rows only; the values are read
        // for the rows that make the cut.
        let sql = format!(
            "SELECT s.key, s.value FROM (SELECT key, SUM(size) OVER (ORDER BY key ROWS BETWEEN UNBOUNDED PRECEDING \
             AND 1 PRECEDING) AS before FROM (SELECT key, length(value) AS size FROM plugin_state WHERE {range}) AS r) \
             AS page JOIN plugin_state s ON s.plugin = $1 AND s.key = page.key \
             WHERE page.before IS NULL OR page.before < {budget} ORDER BY s.key"
        );
        let rows = self
            .read(|| async {
                let mut query = sqlx::query(&sql).bind(plugin).bind(from);
                if let Some(end) = &end {
                    query = query.bind(end.as_str());
                }
                let query = query.bind(i64::from(limit)).bind(super::STATE_PAGE_BYTES as i64);
                Ok(query.fetch_all(&self.reader).await?)
            })
            .await?;
        rows.iter().map(|r| Ok((r.try_get("key")?, r.try_get("value")?))).collect()
    }
}

/// The least string above every string that starts with `prefix`, in byte order (which is
/// code point order, for UTF-8): the prefix with its last character that is not `char::MAX`
/// moved to the next one and what follows it dropped. `None` when the prefix is empty or only
/// `char::MAX`: then no key is past the prefix's range.
pub(super) fn prefix_end(prefix: &str) -> Option<String> {
    let mut end = prefix.to_owned();
    while let Some(last) = end.pop() {
        // The surrogates are no characters: after U+D7FF comes U+E000.
        let next = if last == '\u{D7FF}' { Some('\u{E000}') } else { char::from_u32(u32::from(last) + 1) };
        if let Some(next) = next {
            end.push(next);
            return Some(end);
        }
    }
    None
}

/// A `plugin_grants` row's two JSON columns, read back.
fn grants_from_row(plugin: &str, row: Option<AnyRow>) -> Result<Grants> {
    let Some(row) = row else { return Ok(Grants::default()) };
    let column = |name: &str| -> Result<String> { Ok(row.try_get(name)?) };
    let bad = |e: serde_json::Error| corrupt(format!("grants of plugin {plugin}: {e}"));
    Ok(Grants {
        allowed_hosts: serde_json::from_str(&column("allowed_hosts")?).map_err(bad)?,
        credentials: serde_json::from_str(&column("credentials")?).map_err(bad)?,
    })
}

const GRANTS_ROW: &str = "SELECT allowed_hosts, credentials FROM plugin_grants WHERE plugin = $1";

#[async_trait]
impl GrantStore for SqlStore {
    async fn grants(&self, plugin: &str) -> Result<Grants> {
        let row = sqlx::query(GRANTS_ROW).bind(plugin).fetch_optional(&self.reader).await?;
        grants_from_row(plugin, row)
    }

    async fn put_grants(&self, plugin: &str, grants: &Grants, audit: &AuditEntry, now: i64) -> Result<Grants> {
        let hosts = serde_json::to_string(&grants.allowed_hosts).map_err(|e| corrupt(e.to_string()))?;
        let credentials = serde_json::to_string(&grants.credentials).map_err(|e| corrupt(e.to_string()))?;
        let data = (plugin.to_owned(), hosts, credentials, audit.clone(), now);
        self.writes
            .run(data, |(plugin, hosts, credentials, audit, now), conn| {
                Box::pin(put_grants(conn, plugin, hosts, credentials, audit, *now))
            })
            .await
    }
}

/// [`GrantStore::put_grants`]'s job: the grants' lists already JSON.
async fn put_grants(
    tx: &mut AnyConnection,
    plugin: &str,
    hosts: &str,
    credentials: &str,
    audit: &AuditEntry,
    now: i64,
) -> Result<Grants> {
    // Lock the plugin's row first, creating it with no grants if there is none: a
    // concurrent change waits here until this one commits, so the list read next is the
    // one this change replaces, and the audit trail chains without a gap.
    sqlx::query(
        "INSERT INTO plugin_grants (plugin, allowed_hosts, updated_at) VALUES ($1, '[]', $2) \
         ON CONFLICT (plugin) DO UPDATE SET updated_at = plugin_grants.updated_at",
    )
    .bind(plugin)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    let previous = sqlx::query(GRANTS_ROW).bind(plugin).fetch_optional(&mut *tx).await?;
    let previous = grants_from_row(plugin, previous)?;
    sqlx::query("UPDATE plugin_grants SET allowed_hosts = $2, credentials = $3, updated_at = $4 WHERE plugin = $1")
        .bind(plugin)
        .bind(hosts)
        .bind(credentials)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    let audit = AuditEntry { before: Some(serde_json::json!(previous)), ..audit.clone() };
    insert_audit(tx, &audit, now).await?;
    Ok(previous)
}

#[async_trait]
impl IdempotencyStore for SqlStore {
    async fn claim_key(&self, claim: &IdempotencyClaim, now: i64) -> Result<CreateOutcome> {
        self.writes
            .run((claim.clone(), now), |(claim, now), conn| {
                Box::pin(async move {
                    Ok(match claim_in_tx(conn, claim, *now).await? {
                        None => CreateOutcome::Created,
                        // An abandoned claim of a request that creates nothing: take it over,
                        // remembered as long as a new claim (the janitor must not forget it
                        // while this request runs, nor right after it answers).
                        Some(CreateOutcome::Abandoned { saga_id }) if saga_id.is_empty() => {
                            sqlx::query(
                                "UPDATE idempotency_keys SET locked_until = $4, expires_at = $5 \
                                 WHERE caller = $1 AND route = $2 AND key = $3",
                            )
                            .bind(&claim.caller)
                            .bind(&claim.route)
                            .bind(&claim.key)
                            .bind(now + claim.lock_ms)
                            .bind(now + claim.ttl_ms)
                            .execute(&mut *conn)
                            .await?;
                            CreateOutcome::Created
                        }
                        Some(other) => other,
                    })
                })
            })
            .await
    }

    async fn release_key(&self, caller: &str, route: &str, key: &str) -> Result<()> {
        let data = (caller.to_owned(), route.to_owned(), key.to_owned());
        self.writes
            .run_one(data, |(caller, route, key), conn| {
                Box::pin(async move {
                    sqlx::query(
                        "DELETE FROM idempotency_keys WHERE caller = $1 AND route = $2 AND key = $3 AND response_status IS NULL",
                    )
                    .bind(caller)
                    .bind(route)
                    .bind(key)
                    .execute(&mut *conn)
                    .await?;
                    Ok(())
                })
            })
            .await
    }

    async fn complete_idempotency(
        &self,
        caller: &str,
        route: &str,
        key: &str,
        status: u16,
        body: &[u8],
    ) -> Result<Option<(u16, Vec<u8>)>> {
        let data = (caller.to_owned(), route.to_owned(), key.to_owned(), status, body.to_vec());
        self.writes
            .run_one(data, |(caller, route, key, status, body), conn| {
                Box::pin(async move {
                    if answer_key(&mut *conn, caller, route, key, *status, body).await? {
                        return Ok(None);
                    }
                    // Stored before, by the commit that settled the saga. A stored response
                    // never changes, so reading it outside a transaction is safe.
                    let row = sqlx::query(
                        "SELECT response_status, response_body FROM idempotency_keys \
                         WHERE caller = $1 AND route = $2 AND key = $3 AND response_status IS NOT NULL",
                    )
                    .bind(caller)
                    .bind(route)
                    .bind(key)
                    .fetch_optional(&mut *conn)
                    .await?;
                    let Some(row) = row else { return Ok(None) };
                    let status: i64 = row.try_get("response_status")?;
                    let status =
                        u16::try_from(status).map_err(|_| corrupt(format!("stored response status {status}")))?;
                    Ok(Some((status, row.try_get("response_body")?)))
                })
            })
            .await
    }
}

/// The relay's row of `relay_lease` (one publisher at a time).
const RELAY_LEASE: &str = "outbox";
/// The janitor's row of `relay_lease` (one replica purges at a time).
const JANITOR_LEASE: &str = "janitor";

impl SqlStore {
    /// Takes or renews the lease `name` for `owner`: its epoch when `owner` holds it now,
    /// `None` while another owner's lease is live.
    async fn lease(&self, name: &'static str, owner: &str, lease_ms: i64) -> Result<Option<i64>> {
        let data = (Arc::clone(&self.sql), name, owner.to_owned(), lease_ms);
        self.writes
            .run_one(data, |(sql, name, owner, lease_ms), conn| {
                Box::pin(async move {
                    Ok(sqlx::query_scalar(&sql.take_lease)
                        .bind(owner)
                        .bind(lease_ms)
                        .bind(*name)
                        .fetch_optional(&mut *conn)
                        .await?)
                })
            })
            .await
    }

    /// Ends the lease `name` at once, if `owner` holds it.
    async fn release_lease(&self, name: &str, owner: &str) -> Result<()> {
        self.writes
            .run_one((name.to_owned(), owner.to_owned()), |(name, owner), conn| {
                Box::pin(async move {
                    sqlx::query("UPDATE relay_lease SET lease_until = 0 WHERE name = $1 AND owner = $2")
                        .bind(name)
                        .bind(owner)
                        .execute(conn)
                        .await?;
                    Ok(())
                })
            })
            .await
    }
}

#[async_trait]
impl OutboxStore for SqlStore {
    async fn relay_lease(&self, owner: &str, lease_ms: i64) -> Result<Option<i64>> {
        self.lease(RELAY_LEASE, owner, lease_ms).await
    }

    async fn relay_release(&self, owner: &str) -> Result<()> {
        self.release_lease(RELAY_LEASE, owner).await
    }

    async fn outbox_batch(&self, limit: u32, max_bytes: usize) -> Result<Vec<OutboxRow>> {
        // On a connection kept from one batch to the next: sqlx tests every connection that
        // goes back to its pool (a ping: one more round trip per read, on SQLite a wake-up of
        // the connection's thread too), and at low rates the relay reads once per saga. Kept,
        // it skips the pool's check of an idle connection too (PostgreSQL), so one that died
        // meanwhile (a restart, a failover) is read again on another, as every read is.
        let rows = self.read(|| self.outbox_batch_once(limit, max_bytes)).await?;
        rows.iter().map(outbox_from_row).collect()
    }

    async fn outbox_mark_published(&self, ids: &[i64], now: i64) -> Result<()> {
        // One statement for the whole batch, its ids one text value: one round trip (and on
        // PostgreSQL no BEGIN and COMMIT), where 64 ids a statement took 16 of them and a
        // transaction for a batch of 1,024, each a wake-up of the relay on a busy host.
        let ids = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
        self.writes
            .run_one((Arc::clone(&self.sql), ids, now), |(sql, ids, now), conn| {
                Box::pin(async move {
                    sqlx::query(&sql.mark_published).bind(*now).bind(ids.as_str()).execute(&mut *conn).await?;
                    Ok(())
                })
            })
            .await
    }

    async fn outbox_dead_letter(&self, id: i64, reason: &str, now: i64, owner: &str, epoch: i64) -> Result<bool> {
        let data = (id, reason.to_owned(), now, owner.to_owned(), epoch);
        self.writes
            .run(data, |(id, reason, now, owner, epoch), conn| {
                Box::pin(async move {
                    // Fenced by the lease and by the row in one statement: only while no other
                    // owner took the lease since `epoch`, and only an event nobody delivered or
                    // dead-lettered since it was read. No row lock: the holder's own lease
                    // renewal, on another connection, must never wait for this transaction
                    // (on PostgreSQL the relay drives both from one task). So on PostgreSQL a
                    // takeover that commits while this statement runs is not seen: a window
                    // of one statement, where a pause before it always sees the takeover.
                    let moved = sqlx::query(
                        "INSERT INTO dead_letters (outbox_id, event_id, saga_id, seq, event_type, payload, reason, at) \
                         SELECT id, event_id, saga_id, seq, event_type, payload, $2, $3 FROM outbox \
                         WHERE id = $1 AND published_at IS NULL AND EXISTS (SELECT 1 FROM relay_lease \
                         WHERE name = $4 AND owner = $5 AND epoch = $6) ON CONFLICT (outbox_id) DO NOTHING",
                    )
                    .bind(id)
                    .bind(reason)
                    .bind(now)
                    .bind(RELAY_LEASE)
                    .bind(owner)
                    .bind(*epoch)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected()
                        == 1;
                    if moved {
                        sqlx::query("UPDATE outbox SET published_at = $2 WHERE id = $1")
                            .bind(id)
                            .bind(now)
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(moved)
                })
            })
            .await
    }

    async fn dead_letter(&self, event_id: &str) -> Result<Option<DeadLetter>> {
        let row = sqlx::query(
            "SELECT outbox_id, event_id, saga_id, seq, event_type, payload, reason, at FROM dead_letters \
             WHERE event_id = $1",
        )
        .bind(event_id)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(dead_letter_from_row).transpose()
    }

    async fn dead_letter_redeliver(&self, event_id: &str, now: i64, audit: &AuditEntry) -> Result<bool> {
        let data = (event_id.to_owned(), now, audit.clone());
        let redelivered = self
            .writes
            .run(data, |(event_id, now, audit), conn| Box::pin(redeliver(conn, event_id, *now, audit)))
            .await;
        letter_gone(redelivered)
    }

    async fn dead_letter_discard(&self, event_id: &str, now: i64, audit: &AuditEntry) -> Result<bool> {
        let data = (event_id.to_owned(), now, audit.clone());
        let discarded = self
            .writes
            .run(data, |(event_id, now, audit), conn| Box::pin(letter_removed(conn, event_id, *now, audit)))
            .await;
        letter_gone(discarded)
    }

    async fn dead_letters(&self, before: Option<i64>, limit: u32) -> Result<Vec<DeadLetter>> {
        let rows = match before {
            Some(before) => sqlx::query(
                "SELECT outbox_id, event_id, saga_id, seq, event_type, payload, reason, at FROM dead_letters \
                 WHERE outbox_id < $1 ORDER BY outbox_id DESC LIMIT $2",
            )
            .bind(before),
            None => sqlx::query(
                "SELECT outbox_id, event_id, saga_id, seq, event_type, payload, reason, at FROM dead_letters \
                 ORDER BY outbox_id DESC LIMIT $1",
            ),
        }
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(dead_letter_from_row).collect()
    }

    async fn outbox_page(&self, saga_id: &str, after: i64, limit: u32) -> Result<Vec<OutboxRow>> {
        let rows = sqlx::query(
            "SELECT id, event_id, saga_id, seq, event_type, payload, created_at FROM outbox \
             WHERE saga_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(saga_id)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(outbox_from_row).collect()
    }
}

#[async_trait]
impl CatalogStore for SqlStore {
    async fn put_plugin(
        &self,
        digest: &str,
        name: &str,
        wasm: &[u8],
        now: i64,
        audit: Option<&AuditEntry>,
    ) -> Result<bool> {
        let data = (digest.to_owned(), name.to_owned(), wasm.to_vec(), now, audit.cloned());
        self.writes
            .run(data, |(digest, name, wasm, now, audit), tx| {
                Box::pin(async move {
                    let r = sqlx::query(
                        "INSERT INTO plugins (digest, name, size, wasm, uploaded_at) VALUES ($1, $2, $3, $4, $5) \
                         ON CONFLICT DO NOTHING",
                    )
                    .bind(digest)
                    .bind(name)
                    .bind(wasm.len() as i64)
                    .bind(wasm.as_slice())
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                    let new = r.rows_affected() == 1;
                    if new {
                        bump_catalog(&mut *tx).await?;
                        if let Some(a) = audit {
                            insert_audit(&mut *tx, a, *now).await?;
                        }
                    }
                    Ok(new)
                })
            })
            .await
    }

    async fn plugins(&self) -> Result<Vec<PluginRow>> {
        let rows = sqlx::query("SELECT digest, name, size, wasm, uploaded_at FROM plugins ORDER BY name, uploaded_at")
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(plugin_from_row).collect()
    }

    async fn plugin(&self, digest: &str) -> Result<Option<PluginRow>> {
        let row = sqlx::query("SELECT digest, name, size, wasm, uploaded_at FROM plugins WHERE digest = $1")
            .bind(digest)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(plugin_from_row).transpose()
    }

    async fn plugin_versions(&self) -> Result<Vec<PluginInfo>> {
        let rows =
            sqlx::query("SELECT digest, name, size, uploaded_at FROM plugins ORDER BY name, uploaded_at, digest")
                .fetch_all(&self.reader)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(PluginInfo {
                    digest: r.try_get("digest")?,
                    name: r.try_get("name")?,
                    size: r.try_get("size")?,
                    uploaded_at: r.try_get("uploaded_at")?,
                })
            })
            .collect()
    }

    async fn definition(&self, saga_type: &str) -> Result<Option<StoredDefinition>> {
        let row = sqlx::query(
            "SELECT saga_type, definition, source, version, builtin_release FROM saga_definitions WHERE saga_type = $1",
        )
        .bind(saga_type)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(definition_from_row).transpose()
    }

    async fn definitions(&self) -> Result<Vec<StoredDefinition>> {
        let rows = sqlx::query(
            "SELECT saga_type, definition, source, version, builtin_release FROM saga_definitions ORDER BY saga_type",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(definition_from_row).collect()
    }

    async fn put_definition(
        &self,
        def: &SagaDefinition,
        source: DefinitionSource,
        expected_version: Option<i64>,
        now: i64,
        audit: Option<&AuditEntry>,
    ) -> Result<i64> {
        let json = serde_json::to_string(def).map_err(|e| corrupt(e.to_string()))?;
        let source = match source {
            DefinitionSource::Builtin => "builtin",
            DefinitionSource::Admin => "admin",
        };
        // A built-in is this release's (an admin's change is no release's).
        let release = (source == "builtin").then_some(env!("CARGO_PKG_VERSION"));
        let data = (def.saga_type.clone(), json, source, expected_version, release, now, audit.cloned());
        self.writes
            .run(data, |(saga_type, json, source, expected, release, now, audit), tx| {
                Box::pin(put_definition(tx, saga_type, json, source, *expected, *release, *now, audit.as_ref()))
            })
            .await
    }

    async fn catalog_version(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT version FROM catalog_version WHERE id = 1").fetch_one(&self.reader).await?)
    }

    fn shared_by_hosts(&self) -> bool {
        self.dialect.shared_by_hosts()
    }
}

#[async_trait]
impl AuditStore for SqlStore {
    async fn audit(&self, entry: &AuditEntry, now: i64) -> Result<()> {
        self.writes.run_one((entry.clone(), now), |(entry, now), conn| Box::pin(insert_audit(conn, entry, *now))).await
    }

    async fn audit_log(&self, target: Option<&str>, before: Option<i64>, limit: u32) -> Result<Vec<AuditRecord>> {
        // One statement per filter, for the reason `list_sagas_sql` gives.
        let rows = match (target, before) {
            (Some(target), Some(before)) => sqlx::query(
                "SELECT id, at, actor, action, target, before, after, note FROM audit_log \
                 WHERE target = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
            )
            .bind(target)
            .bind(before),
            (Some(target), None) => sqlx::query(
                "SELECT id, at, actor, action, target, before, after, note FROM audit_log \
                 WHERE target = $1 ORDER BY id DESC LIMIT $2",
            )
            .bind(target),
            (None, Some(before)) => sqlx::query(
                "SELECT id, at, actor, action, target, before, after, note FROM audit_log \
                 WHERE id < $1 ORDER BY id DESC LIMIT $2",
            )
            .bind(before),
            (None, None) => sqlx::query(
                "SELECT id, at, actor, action, target, before, after, note FROM audit_log ORDER BY id DESC LIMIT $1",
            ),
        }
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        let json = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
        rows.iter()
            .map(|r| {
                Ok(AuditRecord {
                    id: r.try_get("id")?,
                    at: r.try_get("at")?,
                    entry: AuditEntry {
                        actor: r.try_get("actor")?,
                        action: r.try_get("action")?,
                        target: r.try_get("target")?,
                        before: json(r.try_get("before")?),
                        after: json(r.try_get("after")?),
                        note: r.try_get("note")?,
                        answer: None,
                    },
                })
            })
            .collect()
    }
}

#[async_trait]
impl JanitorStore for SqlStore {
    async fn janitor_lease(&self, owner: &str, lease_ms: i64) -> Result<bool> {
        Ok(self.lease(JANITOR_LEASE, owner, lease_ms).await?.is_some())
    }

    async fn janitor_release(&self, owner: &str) -> Result<()> {
        self.release_lease(JANITOR_LEASE, owner).await
    }

    async fn expire_idempotency(&self, now: i64, limit: u32) -> Result<u64> {
        // The outer `expires_at` check is the one that counts: on PostgreSQL a row the
        // subquery picked and a request claimed again meanwhile (the claim renews it in place)
        // is re-checked against its new version by the outer condition only; without it the
        // fresh claim would be deleted and a retry of that request could create a second saga.
        self.writes
            .run_one((now, limit), |(now, limit), conn| {
                Box::pin(async move {
                    let (now, limit) = (*now, *limit);
                    let r = sqlx::query(
                        "DELETE FROM idempotency_keys WHERE expires_at <= $1 AND (caller, route, key) IN \
             (SELECT caller, route, key FROM idempotency_keys WHERE expires_at <= $1 LIMIT $2)",
                    )
                    .bind(now)
                    .bind(i64::from(limit))
                    .execute(conn)
                    .await?;
                    Ok(r.rows_affected())
                })
            })
            .await
    }

    async fn outbox_purge(&self, before: i64, limit: u32) -> Result<u64> {
        self.writes
            .run_one((before, limit), |(before, limit), conn| {
                Box::pin(async move {
                    let r = sqlx::query(OUTBOX_PURGE).bind(before).bind(i64::from(*limit)).execute(conn).await?;
                    Ok(r.rows_affected())
                })
            })
            .await
    }

    async fn purge_finished_sagas(&self, before: i64, limit: u32, rows: u32) -> Result<Purged> {
        let data = (Arc::clone(&self.sql), before, limit, rows);
        self.writes
            .run(data, |(sql, before, limit, rows), conn| Box::pin(purge_finished(sql, *before, *limit, *rows, conn)))
            .await
    }
}

/// [`JanitorStore::purge_finished_sagas`]'s job.
async fn purge_finished(
    sql: &Statements,
    before: i64,
    limit: u32,
    rows: u32,
    tx: &mut AnyConnection,
) -> Result<Purged> {
    let ids: Vec<String> =
        sqlx::query_scalar(&sql.finished_sagas).bind(before).bind(i64::from(limit)).fetch_all(&mut *tx).await?;
    // A saga's outbox rows in chunks, within the call's budget of rows; the saga's steps
    // (at most 64) and its row once none is left. Where the budget runs out mid-saga, the
    // chunks deleted so far commit (published events past the retention: nothing needs
    // them) and the saga, still finished, is picked again by the next call.
    let (mut budget, mut sagas, mut more) = (i64::from(rows.max(1)), 0, ids.len() == limit as usize);
    'sagas: for id in &ids {
        loop {
            let chunk = budget.min(PURGE_CHUNK);
            if chunk == 0 {
                more = true;
                break 'sagas;
            }
            // Published rows only, checked on the deleted row itself: a dead letter
            // redelivered meanwhile (its row unpublished again, or written again) is sent
            // first, whatever becomes of its saga (the relay needs only the row).
            let deleted = sqlx::query(
                "DELETE FROM outbox WHERE saga_id = $1 AND published_at IS NOT NULL AND id IN \
                 (SELECT id FROM outbox WHERE saga_id = $1 AND published_at IS NOT NULL LIMIT $2)",
            )
            .bind(id)
            .bind(chunk)
            .execute(&mut *tx)
            .await?
            .rows_affected() as i64;
            budget -= deleted;
            if deleted < chunk {
                break;
            }
        }
        for sql in ["DELETE FROM saga_steps WHERE saga_id = $1", "DELETE FROM sagas WHERE id = $1"] {
            sqlx::query(sql).bind(id).execute(&mut *tx).await?;
        }
        sagas += 1;
    }
    Ok(Purged { sagas, more })
}

#[async_trait]
impl StatsStore for SqlStore {
    async fn ping(&self) -> Result<()> {
        self.read(|| async {
            sqlx::query("SELECT 1").execute(&self.reader).await?;
            Ok(())
        })
        .await
    }

    fn state_read_stats(&self) -> StateReadStats {
        StateReadStats {
            cache: self.cache.as_ref().map_or(0, |cache| cache.hits()),
            filter: self.filtered.load(Ordering::Relaxed),
            database: self.read_from_database.load(Ordering::Relaxed),
            checks_refused: self.checks_refused.load(Ordering::Relaxed),
            catalog_checks_refused: self.catalog_checks_refused.load(Ordering::Relaxed),
        }
    }

    fn write_stats(&self) -> WriteStats {
        self.writes.stats()
    }

    async fn outbox_backlog(&self) -> Result<(i64, Option<i64>)> {
        let r = sqlx::query("SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM outbox WHERE published_at IS NULL")
            .fetch_one(&self.reader)
            .await?;
        Ok((r.try_get("n")?, r.try_get("oldest")?))
    }

    async fn saga_counts(&self) -> Result<Vec<(String, String, i64)>> {
        let rows = sqlx::query(
            "SELECT saga_type, status, COUNT(*) AS n FROM sagas GROUP BY saga_type, status ORDER BY saga_type, status",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(|r| Ok((r.try_get("saga_type")?, r.try_get("status")?, r.try_get("n")?))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{renumber, rows_if_committed, Arg, Folding, Role, Script};

    fn ints(n: i64) -> Vec<Arg> {
        (0..n).map(|i| Arg::Int(Some(i))).collect()
    }

    /// A creation carried by a commit, as the store builds it: claim, saga insert and its
    /// dependents, then the fenced update and its dependents.
    fn creation_and_commit() -> Script {
        let cond = "EXISTS (SELECT 1 FROM sagas WHERE id = $1 AND last_event_id = $2)";
        let mut s = Script::default();
        s.push_as(Role::Claim, "INSERT INTO idempotency_keys (a) VALUES ($1)", ints(1));
        s.push_as(
            Role::Head("id"),
            "INSERT INTO sagas (id) SELECT $1 WHERE EXISTS (SELECT 1 FROM idempotency_keys WHERE key = $2) \
             RETURNING id, last_event_id",
            ints(2),
        );
        s.push_as(Role::Dependent, format!("INSERT INTO saga_steps (x) SELECT $3 WHERE {cond}"), ints(3));
        s.push_as(
            Role::Head("seq"),
            "UPDATE sagas SET seq = $3 WHERE id = $1 RETURNING seq, id, last_event_id",
            ints(3),
        );
        s.push_as(Role::Dependent, format!("INSERT INTO outbox (x) SELECT $3 WHERE {cond}"), ints(3));
        s.push_as(Role::Dependent, format!("DELETE FROM plugin_state WHERE key = $3 AND {cond}"), ints(3));
        s
    }

    #[test]
    fn postgres_folds_each_fenced_group_into_one_statement_whose_writes_read_the_heads_cte() {
        let s = creation_and_commit().join(Folding::Ctes).unwrap();
        let queries: Vec<_> = s.queries.iter().map(|(sql, range)| (sql.as_str(), range.clone())).collect();
        assert_eq!(
            queries,
            [
                (
                    "WITH claimed AS (INSERT INTO idempotency_keys (a) VALUES ($1) RETURNING caller, route, key, saga_id), \
                     head AS (INSERT INTO sagas (id) SELECT $2 WHERE EXISTS (SELECT 1 FROM claimed WHERE key = $3) \
                     RETURNING id, last_event_id), \
                     d2 AS (INSERT INTO saga_steps (x) SELECT $6 WHERE EXISTS (SELECT 1 FROM head WHERE id = $4 AND last_event_id = $5)) \
                     SELECT id FROM head",
                    0..3
                ),
                (
                    "WITH head AS (UPDATE sagas SET seq = $3 WHERE id = $1 RETURNING seq, id, last_event_id), \
                     d1 AS (INSERT INTO outbox (x) SELECT $6 WHERE EXISTS (SELECT 1 FROM head WHERE id = $4 AND last_event_id = $5)), \
                     d2 AS (DELETE FROM plugin_state WHERE key = $9 AND EXISTS (SELECT 1 FROM head WHERE id = $7 AND last_event_id = $8)) \
                     SELECT seq FROM head",
                    3..6
                ),
            ]
        );
        assert!(!s.single(), "two groups: a transaction around them");
        // A commit alone is one statement, atomic without BEGIN and COMMIT.
        let mut alone = Script::default();
        for st in creation_and_commit().statements.into_iter().skip(3) {
            alone.push_as(st.role, st.sql, st.args);
        }
        assert!(alone.join(Folding::Ctes).unwrap().single());
        // SQLite: one script of all six, numbered through.
        let joined = creation_and_commit().join(Folding::Script).unwrap();
        assert_eq!(joined.queries.len(), 1);
        assert!(joined.queries[0].0.contains("SELECT 1 FROM sagas WHERE id = $13 AND last_event_id = $14"));
    }

    #[test]
    fn a_dependent_without_its_condition_is_refused_rather_than_written_unconditionally() {
        let mut s = Script::default();
        s.push_as(
            Role::Head("seq"),
            "UPDATE sagas SET seq = $2 WHERE id = $1 RETURNING seq, id, last_event_id",
            ints(2),
        );
        s.push_as(Role::Dependent, "INSERT INTO outbox (x) VALUES ($1)", ints(1));
        assert!(s.join(Folding::Ctes).is_err());
    }

    #[test]
    fn renumbering_shifts_every_placeholder_and_nothing_else() {
        let mut out = String::from("x;\n");
        renumber("SELECT $1, $10, $2 WHERE a = $1 AND b = '$'", 9, &mut out);
        assert_eq!(out, "x;\nSELECT $10, $19, $11 WHERE a = $10 AND b = '$'");
    }

    #[test]
    fn multi_row_statements_number_each_rows_values_after_the_fence() {
        let cond = "EXISTS (SELECT 1 FROM sagas WHERE id = $1 AND last_event_id = $2)";
        assert_eq!(
            rows_if_committed("INSERT INTO t (s, a, b)", 2, 2, true, " ORDER BY 3"),
            format!("INSERT INTO t (s, a, b) SELECT * FROM (VALUES ($1, $3, $4), ($1, $5, $6)) AS v WHERE {cond} ORDER BY 3")
        );
        assert_eq!(
            rows_if_committed("INSERT INTO t (a, b)", 2, 2, false, ""),
            format!("INSERT INTO t (a, b) SELECT * FROM (VALUES ($3, $4), ($5, $6)) AS v WHERE {cond}")
        );
    }
}
