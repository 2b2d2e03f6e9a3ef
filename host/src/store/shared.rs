//! What the SQLite and PostgreSQL stores share word for word: row mapping, the step upsert,
//! outbox and audit inserts, and the idempotency claim. The SQL uses `$N` placeholders, which
//! both drivers accept (sqlx maps `$N` to SQLite's numbered parameters). Each store expands
//! `sql_helpers!` with its row and connection types; what differs between the databases
//! (the clock expression, claims with `SKIP LOCKED`, snapshots) stays in each store.

/// Expands the shared helpers for one backend: `sql_helpers!(RowType, ConnectionType)`. The
/// calling module must have the store's types (`use super::*`), `StepState`, `StepStatus` and
/// `sqlx::Row` in scope.
macro_rules! sql_helpers {
    ($row:ty, $conn:ty) => {
        fn corrupt(what: impl Into<String>) -> Error {
            Error::Corrupt(what.into())
        }

        fn step_from_row(row: &$row) -> Result<StepState> {
            let status: String = row.try_get("status")?;
            Ok(StepState {
                status: StepStatus::parse(&status).ok_or_else(|| corrupt(format!("step status {status}")))?,
                attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).map_err(|_| corrupt("attempts"))?,
                compensate_attempts: u32::try_from(row.try_get::<i64, _>("compensate_attempts")?)
                    .map_err(|_| corrupt("compensate_attempts"))?,
                failures: u32::try_from(row.try_get::<i64, _>("failures")?).map_err(|_| corrupt("failures"))?,
                waited: row.try_get::<i64, _>("waited")? != 0,
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

        const UPSERT_STEP: &str = "INSERT INTO saga_steps (saga_id, idx, name, status, attempts, compensate_attempts, output, \
             compensate_output, last_error, wait_signal, signal_payload, execute_digest, compensate_digest, started_at, \
             finished_at, updated_at, failures, waited) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) \
             ON CONFLICT (saga_id, idx) DO UPDATE SET status = excluded.status, attempts = excluded.attempts, \
             compensate_attempts = excluded.compensate_attempts, output = excluded.output, \
             compensate_output = excluded.compensate_output, last_error = excluded.last_error, \
             wait_signal = excluded.wait_signal, signal_payload = excluded.signal_payload, \
             execute_digest = excluded.execute_digest, compensate_digest = excluded.compensate_digest, \
             started_at = excluded.started_at, finished_at = excluded.finished_at, updated_at = excluded.updated_at, \
             failures = excluded.failures, waited = excluded.waited";

        async fn upsert_step(
            tx: &mut $conn,
            saga_id: &str,
            idx: usize,
            name: &str,
            s: &StepState,
        ) -> Result<()> {
            sqlx::query(UPSERT_STEP)
                .bind(saga_id)
                .bind(idx as i64)
                .bind(name)
                .bind(s.status.as_str())
                .bind(i64::from(s.attempts))
                .bind(i64::from(s.compensate_attempts))
                .bind(&s.output)
                .bind(&s.compensate_output)
                .bind(&s.last_error)
                .bind(&s.wait_signal)
                .bind(&s.signal_payload)
                .bind(&s.execute_digest)
                .bind(&s.compensate_digest)
                .bind(s.started_at)
                .bind(s.finished_at)
                .bind(s.updated_at)
                .bind(i64::from(s.failures))
                .bind(i64::from(s.waited))
                .execute(tx)
                .await?;
            Ok(())
        }

        /// The fields of an outbox row; the payload is the event JSON exactly as it will be published.
        struct OutboxInsert<'a> {
            event_id: &'a str,
            saga_id: &'a str,
            seq: i64,
            event_type: &'a str,
            payload: String,
            now: i64,
        }

        async fn insert_outbox(tx: &mut $conn, row: OutboxInsert<'_>) -> Result<()> {
            sqlx::query(
                "INSERT INTO outbox (event_id, saga_id, seq, event_type, payload, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(row.event_id)
            .bind(row.saga_id)
            .bind(row.seq)
            .bind(row.event_type)
            .bind(row.payload)
            .bind(row.now)
            .execute(tx)
            .await?;
            Ok(())
        }

        async fn insert_audit(tx: &mut $conn, a: &AuditEntry, now: i64) -> Result<()> {
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
            .execute(tx)
            .await?;
            Ok(())
        }

        /// Claims an idempotency key inside `tx`: `None` if the key is now ours, else what the key
        /// already holds. INSERT .. ON CONFLICT DO NOTHING is atomic: never SELECT-then-INSERT.
        async fn claim_in_tx(
            tx: &mut $conn,
            c: &IdempotencyClaim,
            saga_id: Option<&str>,
            now: i64,
        ) -> Result<Option<CreateOutcome>> {
            // An expired row (past retention) is replaced as if it never existed.
            sqlx::query("DELETE FROM idempotency_keys WHERE caller = $1 AND route = $2 AND key = $3 AND expires_at <= $4")
                .bind(&c.caller)
                .bind(&c.route)
                .bind(&c.key)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            let (status, body) = match &c.response {
                Some((s, b)) => (Some(i64::from(*s)), Some(b.as_slice())),
                None => (None, None),
            };
            let inserted = sqlx::query(
                "INSERT INTO idempotency_keys (caller, route, key, fingerprint, saga_id, response_status, response_body, \
                 locked_until, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING",
            )
            .bind(&c.caller)
            .bind(&c.route)
            .bind(&c.key)
            .bind(&c.fingerprint)
            .bind(saga_id)
            .bind(status)
            .bind(body)
            .bind(now + c.lock_ms)
            .bind(now)
            .bind(now + c.ttl_ms)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if inserted {
                return Ok(None);
            }
            let row = sqlx::query(
                "SELECT fingerprint, saga_id, response_status, response_body, locked_until FROM idempotency_keys \
                 WHERE caller = $1 AND route = $2 AND key = $3",
            )
            .bind(&c.caller)
            .bind(&c.route)
            .bind(&c.key)
            .fetch_one(&mut *tx)
            .await?;
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
            Ok(Some(match existing_saga {
                Some(saga_id) => CreateOutcome::Abandoned { saga_id },
                None => CreateOutcome::Abandoned { saga_id: String::new() },
            }))
        }

        /// Marks the catalog changed, inside the transaction that changes it.
        async fn bump_catalog(tx: &mut $conn) -> Result<()> {
            sqlx::query("UPDATE catalog_version SET version = version + 1 WHERE id = 1").execute(tx).await?;
            Ok(())
        }

        fn plugin_from_row(r: &$row) -> Result<PluginRow> {
            Ok(PluginRow {
                digest: r.try_get("digest")?,
                name: r.try_get("name")?,
                size: r.try_get("size")?,
                wasm: r.try_get("wasm")?,
                uploaded_at: r.try_get("uploaded_at")?,
            })
        }

        fn outbox_from_row(r: &$row) -> Result<OutboxRow> {
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
    };
}
