//! What the three services share: the per-service state (`Core`: database, write lock,
//! request counter, shutdown), the SQLite set-up, the keyed-request gate with the FLAKY and
//! SLOW triggers, the common routes (`/healthz`, `/stats`, `/effects/{order_id}`) and serving.
//!
//! The service modules own their domain tables and routes; this module owns no domain logic.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard};
use tokio_util::sync::CancellationToken;

use crate::effects;
use crate::error::ApiError;
use crate::idempotency::{self, Answer, Keyed};

/// The state every handler of one service shares. Cheap to clone.
#[derive(Clone)]
pub struct Core {
    /// The service's own database.
    pub db: SqlitePool,
    /// The effect names `GET /effects` reports.
    pub effects: &'static [&'static str],
    /// Cancelled when the process shuts down; long sleeps end early on it.
    pub shutdown: CancellationToken,
    /// Serialises the service's mutating requests. SQLite has one writer anyway, but a
    /// deferred transaction only learns that it lost the race when it tries to write; holding
    /// this lock around "look the key up, apply, store the answer" makes the check and the
    /// effect one step, so two concurrent requests with the same key apply the effect once.
    /// It is a tokio lock because it is held across awaits (the database calls), and it is
    /// never held while a trigger sleeps.
    write: Arc<Mutex<()>>,
    /// Requests received since start, for `GET /stats`.
    requests: Arc<AtomicU64>,
}

impl Core {
    /// Opens (creating if needed) `<data_dir>/<name>.db` in WAL mode and creates the shared
    /// tables and the service's own `schema`.
    pub async fn open(
        name: &'static str,
        data_dir: &Path,
        schema: &str,
        effects: &'static [&'static str],
        shutdown: CancellationToken,
    ) -> anyhow::Result<Core> {
        let path = data_dir.join(format!("{name}.db"));
        // WAL with synchronous=NORMAL is durable against a killed process (the case the demo
        // cares about: SIGKILL and restart); only a power loss could drop the last commits.
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let db = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .with_context(|| format!("cannot open the {name} database {}", path.display()))?;
        for ddl in [idempotency::SCHEMA, effects::SCHEMA, schema] {
            sqlx::raw_sql(ddl).execute(&db).await.with_context(|| format!("cannot create the {name} tables"))?;
        }
        Ok(Core { db, effects, shutdown, write: Arc::new(Mutex::new(())), requests: Arc::new(AtomicU64::new(0)) })
    }

    /// Takes the service's write lock and opens a transaction: the start of every mutation
    /// that does not go through [`Core::admit`] (the 3-D Secure confirmation).
    pub async fn write(&self) -> Result<Pending, ApiError> {
        let guard = self.write.clone().lock_owned().await;
        // IMMEDIATE takes SQLite's write lock now, not at the first write: the webhook outbox
        // updates the payment database outside this process lock, and a deferred transaction
        // that read before such a commit could not upgrade to a writer (SQLITE_BUSY_SNAPSHOT,
        // which the busy timeout does not retry). Waiting at BEGIN is retried by the timeout.
        let tx = self.db.begin_with("BEGIN IMMEDIATE").await?;
        Ok(Pending { _guard: guard, tx })
    }

    /// The gate of a keyed mutation: replays or refuses a known key, plays the triggers, and
    /// otherwise hands back the locked transaction in which the handler applies the effect and
    /// then calls [`Pending::finish`].
    pub async fn admit(&self, req: &Keyed, triggers: Triggers) -> Result<Admission, ApiError> {
        let mut pending = self.write().await?;
        if let Some(answer) = idempotency::lookup(&mut pending.tx, &req.key, &req.fingerprint).await? {
            return Ok(Admission::Replay(answer));
        }
        if let Some(message) = triggers.flaky {
            // The first two requests with this key fail, later ones go through. Not stored:
            // an injected outage is not an answer.
            if idempotency::hit(&mut pending.tx, &req.key, "flaky").await? <= 2 {
                pending.release().await?;
                return Err(ApiError::Unavailable(message.to_owned()));
            }
        }
        if let Some(delay) = triggers.slow {
            if idempotency::hit(&mut pending.tx, &req.key, "slow").await? == 1 {
                // Sleep without the lock, so other orders keep going; a retry with the same
                // key that arrives meanwhile is not "the first" and is served at once, and
                // this request then finds its answer stored and replays it.
                pending.release().await?;
                self.pause(delay).await?;
                pending = self.write().await?;
                if let Some(answer) = idempotency::lookup(&mut pending.tx, &req.key, &req.fingerprint).await? {
                    return Ok(Admission::Replay(answer));
                }
            }
        }
        Ok(Admission::New(pending))
    }

    /// Sleeps for `delay`, or fails with 503 if the process starts shutting down meanwhile.
    pub async fn pause(&self, delay: Duration) -> Result<(), ApiError> {
        tokio::select! {
            () = tokio::time::sleep(delay) => Ok(()),
            () = self.shutdown.cancelled() => Err(ApiError::Unavailable("service shutting down; retry with the same Idempotency-Key".to_owned())),
        }
    }
}

/// The triggers a keyed request may play before its effect.
#[derive(Debug, Default, Clone, Copy)]
pub struct Triggers {
    /// Fail the first two requests of a key with this 503 message.
    pub flaky: Option<&'static str>,
    /// Sleep this long before processing the first request of a key.
    pub slow: Option<Duration>,
}

/// What [`Core::admit`] decided.
pub enum Admission {
    /// The key is known with this request: answer the stored answer.
    Replay(Answer),
    /// A new key: apply the effect in this transaction.
    New(Pending),
}

/// A locked, open transaction of one service. Dropping it rolls back and unlocks.
pub struct Pending {
    _guard: OwnedMutexGuard<()>,
    /// The transaction; effects and the stored answer go here.
    pub tx: Transaction<'static, Sqlite>,
}

impl Pending {
    /// Stores `answer` under the request's key and commits it together with the effect.
    pub async fn finish(mut self, req: &Keyed, answer: Answer) -> Result<Answer, ApiError> {
        idempotency::store(&mut self.tx, &req.key, &req.fingerprint, &answer).await?;
        self.tx.commit().await?;
        Ok(answer)
    }

    /// Commits what was written (trigger counters, keyless state changes) and unlocks.
    pub async fn release(self) -> Result<(), ApiError> {
        self.tx.commit().await?;
        Ok(())
    }
}

/// The service's full router: its own `routes`, the common routes, JSON 404/405 answers and
/// the request counter.
pub fn app(core: Core, routes: Router) -> Router {
    let common = Router::new()
        .route("/healthz", get(|| async { Json(serde_json::json!({ "status": "ok" })) }))
        .route("/stats", get(stats))
        .route("/effects/{order_id}", get(effects_of))
        .with_state(core.clone());
    let requests = core.requests.clone();
    routes
        .merge(common)
        .fallback(|| async { ApiError::NotFound("no such route; see the service's README for the routes".to_owned()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            let requests = requests.clone();
            async move {
                if counted(req.method(), req.uri().path()) {
                    requests.fetch_add(1, Ordering::Relaxed);
                }
                next.run(req).await
            }
        }))
}

/// Whether `/stats` counts a request: everything except the monitoring reads themselves, so
/// that a test can read `/stats` and `/effects` before and after an action and see exactly the
/// requests the action caused.
fn counted(method: &Method, path: &str) -> bool {
    let monitoring = path == "/healthz" || path == "/stats" || path.starts_with("/effects/");
    !(method == Method::GET && monitoring)
}

async fn stats(State(core): State<Core>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "requests": core.requests.load(Ordering::Relaxed) }))
}

async fn effects_of(State(core): State<Core>, UrlPath(order_id): UrlPath<String>) -> Result<Response, ApiError> {
    let report = effects::report(&core.db, &order_id, core.effects).await?;
    Ok(axum::response::IntoResponse::into_response(Json(report)))
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then lets open requests finish.
pub async fn serve(listener: tokio::net::TcpListener, app: Router, shutdown: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
}
