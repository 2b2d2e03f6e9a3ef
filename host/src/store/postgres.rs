//! The PostgreSQL store: production, any number of host replicas on one database.
//!
//! Same schema, same statements and same transactions as the SQLite store (see
//! `migrations/postgres/`, kept in lockstep with `migrations/sqlite/`); what differs is how
//! several processes share the data:
//!
//! - Due sagas are claimed with `FOR UPDATE SKIP LOCKED`, so replicas polling at once take
//!   disjoint sets without waiting on each other, plus the lease and the fencing epoch that
//!   SQLite uses too. Leases are measured on the database's clock (`clock_timestamp()`), so
//!   replicas with skewed clocks agree on when one expired.
//! - A commit updates the saga row `WHERE epoch = $mine` first: the row lock serialises one
//!   saga's transitions, so its outbox rows get ids in `seq` order.
//! - Sessions set `idle_in_transaction_session_timeout`: a replica frozen mid-transaction
//!   (SIGSTOP, a GC-like pause of the VM) loses its session and its row locks instead of
//!   blocking the others.
//!
//! Connections that die (`pg_terminate_backend`, a failover) surface as errors of the
//! statement that used them; the pool opens new ones, and the driver and relay retry.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Row;

use super::*;
use crate::engine::{Phase, SagaStatus, StepState, StepStatus};

/// The database's clock in milliseconds since the Unix epoch, for leases.
const DB_NOW_MS: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

/// Connections per replica unless the URL or the caller says otherwise.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 16;

/// The PostgreSQL implementation of [`Store`].
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects to a `postgres://` URL and runs migrations (under sqlx's advisory lock, so
    /// replicas starting together migrate once).
    pub async fn open(url: &str) -> Result<PgStore> {
        Self::open_with(url, DEFAULT_MAX_CONNECTIONS).await
    }

    pub async fn open_with(url: &str, max_connections: u32) -> Result<PgStore> {
        use sqlx::ConnectOptions as _;
        let options = PgConnectOptions::from_str(url)?
            .application_name("sagahost")
            .options([("idle_in_transaction_session_timeout", "10s"), ("lock_timeout", "10s")]);
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
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        sqlx::migrate!("../migrations/postgres").run(&pool).await?;
        Ok(PgStore { pool })
    }

    /// The pool, for tests that need to reach under the store (e.g. to kill its sessions).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// A fresh, empty database on the server `admin_url` points at, named with `prefix` and a
/// random suffix; returns its URL. For tests and benchmarks, which each need their own.
pub async fn scratch_database(admin_url: &str, prefix: &str) -> Result<String> {
    use sqlx::ConnectOptions as _;
    let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    let admin = PgConnectOptions::from_str(admin_url)?;
    let mut conn = admin.connect().await?;
    sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut conn).await?;
    sqlx::Connection::close(conn).await?;
    let mut url = url_without_database(admin_url);
    url.push('/');
    url.push_str(&name);
    Ok(url)
}

/// Drops a database made by [`scratch_database`], disconnecting whoever still uses it.
pub async fn drop_database(admin_url: &str, url: &str) -> Result<()> {
    use sqlx::ConnectOptions as _;
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

sql_helpers!(sqlx::postgres::PgRow, sqlx::PgConnection);

#[async_trait]
impl Store for PgStore {
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn put_plugin(&self, digest: &str, name: &str, wasm: &[u8], now: i64) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query("INSERT INTO plugins (digest, name, size, wasm, uploaded_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING")
            .bind(digest)
            .bind(name)
            .bind(wasm.len() as i64)
            .bind(wasm)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let new = r.rows_affected() == 1;
        if new {
            bump_catalog(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(new)
    }

    async fn plugin(&self, digest: &str) -> Result<Option<PluginRow>> {
        let row = sqlx::query("SELECT digest, name, size, wasm, uploaded_at FROM plugins WHERE digest = $1")
            .bind(digest)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(plugin_from_row).transpose()
    }

    async fn plugins(&self) -> Result<Vec<PluginRow>> {
        let rows = sqlx::query("SELECT digest, name, size, wasm, uploaded_at FROM plugins ORDER BY name, uploaded_at")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(plugin_from_row).collect()
    }

    async fn plugin_versions(&self) -> Result<Vec<PluginInfo>> {
        let rows =
            sqlx::query("SELECT digest, name, size, uploaded_at FROM plugins ORDER BY name, uploaded_at, digest")
                .fetch_all(&self.pool)
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

    async fn definition(&self, saga_type: &str) -> Result<Option<(SagaDefinition, DefinitionSource)>> {
        let row = sqlx::query("SELECT definition, source FROM saga_definitions WHERE saga_type = $1")
            .bind(saga_type)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            let def: String = r.try_get("definition")?;
            let source: String = r.try_get("source")?;
            let def = serde_json::from_str(&def).map_err(|e| corrupt(format!("definition of {saga_type}: {e}")))?;
            let source = if source == "builtin" { DefinitionSource::Builtin } else { DefinitionSource::Admin };
            Ok((def, source))
        })
        .transpose()
    }

    async fn definitions(&self) -> Result<Vec<SagaDefinition>> {
        let rows =
            sqlx::query("SELECT definition FROM saga_definitions ORDER BY saga_type").fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                let def: String = r.try_get("definition")?;
                serde_json::from_str(&def).map_err(|e| corrupt(format!("definition: {e}")))
            })
            .collect()
    }

    async fn put_definition(&self, def: &SagaDefinition, source: DefinitionSource, now: i64) -> Result<()> {
        let json = serde_json::to_string(def).map_err(|e| corrupt(e.to_string()))?;
        let source = match source {
            DefinitionSource::Builtin => "builtin",
            DefinitionSource::Admin => "admin",
        };
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO saga_definitions (saga_type, definition, source, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (saga_type) DO UPDATE SET definition = excluded.definition, source = excluded.source, \
             updated_at = excluded.updated_at",
        )
        .bind(&def.saga_type)
        .bind(json)
        .bind(source)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        bump_catalog(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn catalog_version(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT version FROM catalog_version WHERE id = 1").fetch_one(&self.pool).await?)
    }

    async fn create_saga(&self, saga: &NewSaga, claim: Option<&IdempotencyClaim>, now: i64) -> Result<CreateOutcome> {
        let mut tx = self.pool.begin().await?;
        if let Some(c) = claim {
            if let Some(existing) = claim_in_tx(&mut tx, c, Some(&saga.id), now).await? {
                tx.rollback().await?;
                return Ok(existing);
            }
        }
        // A crash here, between the claim and the saga row, must leave neither: both are in
        // this one transaction.
        crate::failpoint!("intake-after-claim");
        let definition = serde_json::to_string(&saga.definition).map_err(|e| corrupt(e.to_string()))?;
        sqlx::query(
            "INSERT INTO sagas (id, saga_type, status, phase, reason, input, definition, seq, next_run_at, epoch, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8, 0, $9, $9)",
        )
        .bind(&saga.id)
        .bind(&saga.definition.saga_type)
        .bind(saga.state.status.as_str())
        .bind(saga.state.phase.as_str())
        .bind(&saga.state.reason)
        .bind(&saga.input)
        .bind(definition)
        .bind(saga.state.next_run_at)
        .bind(saga.now)
        .execute(&mut *tx)
        .await?;
        for (i, (step, def)) in saga.state.steps.iter().zip(&saga.definition.steps).enumerate() {
            upsert_step(&mut tx, &saga.id, i, &def.name, step).await?;
        }
        let payload = event_payload(
            &saga.event_id,
            &saga.id,
            &saga.definition.saga_type,
            1,
            &saga.event,
            saga.state.status.as_str(),
            saga.now,
        );
        let row = OutboxInsert {
            event_id: &saga.event_id,
            saga_id: &saga.id,
            seq: 1,
            event_type: &saga.event.event_type,
            payload,
            now: saga.now,
        };
        insert_outbox(&mut tx, row).await?;
        tx.commit().await?;
        Ok(CreateOutcome::Created)
    }

    async fn claim_key(&self, claim: &IdempotencyClaim, now: i64) -> Result<CreateOutcome> {
        let mut tx = self.pool.begin().await?;
        let outcome = match claim_in_tx(&mut tx, claim, None, now).await? {
            None => CreateOutcome::Created,
            // An abandoned claim of a request that creates nothing: take it over.
            Some(CreateOutcome::Abandoned { saga_id }) if saga_id.is_empty() => {
                sqlx::query(
                    "UPDATE idempotency_keys SET locked_until = $4 WHERE caller = $1 AND route = $2 AND key = $3",
                )
                .bind(&claim.caller)
                .bind(&claim.route)
                .bind(&claim.key)
                .bind(now + claim.lock_ms)
                .execute(&mut *tx)
                .await?;
                CreateOutcome::Created
            }
            Some(other) => other,
        };
        tx.commit().await?;
        Ok(outcome)
    }

    async fn release_key(&self, caller: &str, route: &str, key: &str) -> Result<()> {
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE caller = $1 AND route = $2 AND key = $3 AND response_status IS NULL",
        )
        .bind(caller)
        .bind(route)
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn complete_idempotency(&self, caller: &str, route: &str, key: &str, status: u16, body: &[u8]) -> Result<()> {
        sqlx::query(
            "UPDATE idempotency_keys SET response_status = $4, response_body = $5 \
             WHERE caller = $1 AND route = $2 AND key = $3 AND response_status IS NULL",
        )
        .bind(caller)
        .bind(route)
        .bind(key)
        .bind(i64::from(status))
        .bind(body)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn expire_idempotency(&self, now: i64) -> Result<u64> {
        // In batches, so that a large backlog never becomes one long transaction.
        let r = sqlx::query(
            "DELETE FROM idempotency_keys WHERE (caller, route, key) IN \
             (SELECT caller, route, key FROM idempotency_keys WHERE expires_at <= $1 LIMIT 1000)",
        )
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    async fn saga(&self, id: &str) -> Result<Option<SagaRecord>> {
        // One REPEATABLE READ transaction, so the saga row and its steps are one snapshot.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
        let Some(r) = sqlx::query(
            "SELECT id, saga_type, status, phase, reason, input, definition, seq, next_run_at, epoch, created_at, updated_at \
             FROM sagas WHERE id = $1",
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
        }))
    }

    async fn list_sagas(
        &self,
        saga_type: &str,
        status: Option<&str>,
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<SagaSummary>> {
        // UUIDv7 ids sort by creation time, so `id < before` is a stable keyset cursor.
        let rows = sqlx::query(
            "SELECT id, saga_type, status, reason, created_at, updated_at FROM sagas \
             WHERE saga_type = $1 AND ($2::TEXT IS NULL OR status = $2) AND ($3::TEXT IS NULL OR id < $3) \
             ORDER BY id DESC LIMIT $4",
        )
        .bind(saga_type)
        .bind(status)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
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
        let sql = format!(
            "UPDATE sagas SET lease_owner = $1, lease_until = {DB_NOW_MS} + $2, epoch = epoch + 1 WHERE id IN \
             (SELECT id FROM sagas WHERE next_run_at IS NOT NULL AND next_run_at <= $3 \
              AND (lease_until IS NULL OR lease_until <= {DB_NOW_MS}) ORDER BY next_run_at LIMIT $4 \
              FOR UPDATE SKIP LOCKED) \
             RETURNING id, epoch"
        );
        let rows =
            sqlx::query(&sql).bind(owner).bind(lease_ms).bind(now).bind(i64::from(limit)).fetch_all(&self.pool).await?;
        rows.iter().map(|r| Ok((r.try_get("id")?, r.try_get("epoch")?))).collect()
    }

    async fn renew_lease(&self, id: &str, epoch: i64, lease_ms: i64) -> Result<bool> {
        let sql = format!(
            "UPDATE sagas SET lease_until = {DB_NOW_MS} + $3 WHERE id = $1 AND epoch = $2 AND lease_owner IS NOT NULL"
        );
        let r = sqlx::query(&sql).bind(id).bind(epoch).bind(lease_ms).execute(&self.pool).await?;
        Ok(r.rows_affected() == 1)
    }

    async fn release(&self, id: &str, epoch: i64) -> Result<()> {
        sqlx::query("UPDATE sagas SET lease_owner = NULL, lease_until = NULL WHERE id = $1 AND epoch = $2")
            .bind(id)
            .bind(epoch)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn release_owner(&self, owner: &str) -> Result<u64> {
        let r = sqlx::query("UPDATE sagas SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1")
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    async fn next_due(&self) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar("SELECT MIN(next_run_at) FROM sagas WHERE next_run_at IS NOT NULL")
            .fetch_one(&self.pool)
            .await?)
    }

    async fn commit(&self, c: &Commit<'_>) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        let (Fence::Lease(epoch) | Fence::LeaseRelease(epoch) | Fence::Takeover(epoch)) = c.fence;
        // The fence: the row only updates if nobody moved the epoch since we read it.
        let sql = match c.fence {
            Fence::Lease(_) => "UPDATE sagas SET status = $3, phase = $4, reason = $5, next_run_at = $6, updated_at = $7, \
                 seq = seq + 1 WHERE id = $1 AND epoch = $2 RETURNING seq",
            Fence::LeaseRelease(_) => "UPDATE sagas SET status = $3, phase = $4, reason = $5, next_run_at = $6, updated_at = $7, \
                 seq = seq + 1, lease_owner = NULL, lease_until = NULL WHERE id = $1 AND epoch = $2 RETURNING seq",
            Fence::Takeover(_) => "UPDATE sagas SET status = $3, phase = $4, reason = $5, next_run_at = $6, updated_at = $7, \
                 seq = seq + 1, lease_owner = NULL, lease_until = NULL, epoch = epoch + 1 WHERE id = $1 AND epoch = $2 RETURNING seq",
        };
        let seq: Option<i64> = sqlx::query_scalar(sql)
            .bind(c.saga_id)
            .bind(epoch)
            .bind(c.state.status.as_str())
            .bind(c.state.phase.as_str())
            .bind(&c.state.reason)
            .bind(c.state.next_run_at)
            .bind(c.now)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(seq) = seq else {
            tx.rollback().await?;
            return Err(Error::Fenced);
        };
        for &i in c.changed_steps {
            let step = c.state.steps.get(i).ok_or_else(|| corrupt(format!("changed step {i} out of range")))?;
            let name = c.step_names.get(i).ok_or_else(|| corrupt(format!("step name {i} out of range")))?;
            upsert_step(&mut tx, c.saga_id, i, name, step).await?;
        }
        if let Some((plugin, writes)) = c.plugin_writes {
            for (key, value) in writes {
                match value {
                    Some(v) => {
                        sqlx::query(
                            "INSERT INTO plugin_state (plugin, key, value, updated_at) VALUES ($1, $2, $3, $4) \
                             ON CONFLICT (plugin, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                        )
                        .bind(plugin)
                        .bind(key)
                        .bind(v)
                        .bind(c.now)
                        .execute(&mut *tx)
                        .await?;
                    }
                    None => {
                        sqlx::query("DELETE FROM plugin_state WHERE plugin = $1 AND key = $2")
                            .bind(plugin)
                            .bind(key)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
            }
        }
        let payload = event_payload(c.event_id, c.saga_id, c.saga_type, seq, c.event, c.state.status.as_str(), c.now);
        let row = OutboxInsert {
            event_id: c.event_id,
            saga_id: c.saga_id,
            seq,
            event_type: &c.event.event_type,
            payload,
            now: c.now,
        };
        insert_outbox(&mut tx, row).await?;
        if let Some(a) = c.audit {
            insert_audit(&mut tx, a, c.now).await?;
        }
        tx.commit().await?;
        Ok(seq)
    }

    async fn state_get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(sqlx::query_scalar("SELECT value FROM plugin_state WHERE plugin = $1 AND key = $2")
            .bind(plugin)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn state_list(&self, plugin: &str, prefix: &str, limit: u32) -> Result<Vec<(String, Vec<u8>)>> {
        // A range scan on the primary key rather than LIKE, so '%' and '_' in keys are literal.
        let mut upper = prefix.to_owned();
        upper.push(char::MAX);
        let rows = sqlx::query(
            "SELECT key, value FROM plugin_state WHERE plugin = $1 AND key >= $2 AND key < $3 ORDER BY key LIMIT $4",
        )
        .bind(plugin)
        .bind(prefix)
        .bind(upper)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok((r.try_get("key")?, r.try_get("value")?))).collect()
    }

    async fn relay_lease(&self, owner: &str, lease_ms: i64) -> Result<Option<i64>> {
        // One statement: take the lease if it is free or expired, renew it if it is ours.
        let sql = format!(
            "INSERT INTO relay_lease (name, owner, lease_until, epoch) VALUES ('outbox', $1, {DB_NOW_MS} + $2, 1) \
             ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, lease_until = excluded.lease_until, \
             epoch = CASE WHEN relay_lease.owner = excluded.owner THEN relay_lease.epoch ELSE relay_lease.epoch + 1 END \
             WHERE relay_lease.owner = excluded.owner OR relay_lease.lease_until <= {DB_NOW_MS} \
             RETURNING epoch"
        );
        Ok(sqlx::query_scalar(&sql).bind(owner).bind(lease_ms).fetch_optional(&self.pool).await?)
    }

    async fn relay_release(&self, owner: &str) -> Result<()> {
        sqlx::query("UPDATE relay_lease SET lease_until = 0 WHERE name = 'outbox' AND owner = $1")
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn outbox_pending(&self, limit: u32) -> Result<Vec<OutboxRow>> {
        let rows = sqlx::query(
            "SELECT id, event_id, saga_id, seq, event_type, payload, created_at FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(outbox_from_row).collect()
    }

    async fn outbox_mark_published(&self, ids: &[i64], now: i64) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for id in ids {
            sqlx::query("UPDATE outbox SET published_at = $2 WHERE id = $1")
                .bind(id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn outbox_backlog(&self) -> Result<(i64, Option<i64>)> {
        let r = sqlx::query("SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM outbox WHERE published_at IS NULL")
            .fetch_one(&self.pool)
            .await?;
        Ok((r.try_get("n")?, r.try_get("oldest")?))
    }

    async fn saga_counts(&self) -> Result<Vec<(String, String, i64)>> {
        let rows = sqlx::query(
            "SELECT saga_type, status, COUNT(*) AS n FROM sagas GROUP BY saga_type, status ORDER BY saga_type, status",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok((r.try_get("saga_type")?, r.try_get("status")?, r.try_get("n")?))).collect()
    }

    async fn outbox_purge(&self, before: i64, limit: u32) -> Result<u64> {
        let r = sqlx::query(
            "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE published_at IS NOT NULL AND published_at < $1 LIMIT $2)",
        )
        .bind(before)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    async fn outbox_for_saga(&self, saga_id: &str) -> Result<Vec<OutboxRow>> {
        let rows = sqlx::query(
            "SELECT id, event_id, saga_id, seq, event_type, payload, created_at FROM outbox WHERE saga_id = $1 ORDER BY seq",
        )
        .bind(saga_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(outbox_from_row).collect()
    }

    async fn audit(&self, entry: &AuditEntry, now: i64) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        insert_audit(&mut conn, entry, now).await
    }

    async fn audit_log(&self, target: Option<&str>, limit: u32) -> Result<Vec<AuditRecord>> {
        let rows = sqlx::query(
            "SELECT id, at, actor, action, target, before, after, note FROM audit_log \
             WHERE ($1::TEXT IS NULL OR target = $1) ORDER BY id DESC LIMIT $2",
        )
        .bind(target)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
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
                    },
                })
            })
            .collect()
    }
}
