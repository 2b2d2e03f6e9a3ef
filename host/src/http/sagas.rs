//! Saga routes: `/orders` for the built-in `order` saga and `/sagas/{type}` for every type.
//!
//! Handlers validate, then talk to the store and wake the driver. They never call plugins.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{body_rejection, ApiError, ApiPath, ErrorBody, Provisional};
use super::openapi::{OptionalKey, RequiredKey};
use super::{idempotency, AppState};
use crate::builtin::{self, InputError};
use crate::clock::rfc3339;
use crate::driver::{Responder, Watch};
use crate::engine::{self, Event, Phase, SagaDefinition, SagaState, SagaStatus, StepStatus};
use crate::saga::{self, KeyedAnswer};
use crate::store::{CreateOutcome, IdempotencyClaim, SagaRecord, SagaSummary};

/// The longest `Prefer: wait=N` honoured, in seconds.
pub const MAX_WAIT_SECS: u64 = 30;

/// A saga (an order, for `/orders`) as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct SagaView {
    pub id: String,
    pub saga_type: String,
    /// CREATED, a step's state label (e.g. PAYMENT_CHARGED), COMPLETED, COMPENSATING, CANCELLED or COMPENSATION_FAILED.
    #[schema(value_type = String, example = "COMPLETED")]
    pub status: SagaStatus,
    /// Why the saga compensated, once it does.
    pub reason: Option<String>,
    /// The input as accepted, with the definition's sensitive fields shown as `"[redacted]"`.
    pub input: serde_json::Value,
    pub created_at: String,
    pub updated_at: String,
    pub steps: Vec<StepView>,
}

/// One step of a saga.
#[derive(Debug, Serialize, ToSchema)]
pub struct StepView {
    pub name: String,
    /// pending, retrying, waiting, succeeded, failed, compensating, compensated or compensation_failed.
    #[schema(value_type = String)]
    pub status: StepStatus,
    pub attempts: u32,
    pub compensate_attempts: u32,
    /// The component digest that runs (or ran) execute: pinned when the saga started.
    pub execute_digest: String,
    /// The component digest that ran compensate, once it ran.
    pub compensate_digest: Option<String>,
    /// What execute returned, once it succeeded.
    pub output: Option<serde_json::Value>,
    /// What compensate returned, once it succeeded.
    pub compensate_output: Option<serde_json::Value>,
    pub last_error: Option<String>,
    /// The signal a waiting step waits for.
    pub waiting_for: Option<String>,
    /// While an execute attempt that may call another service has started and its result is
    /// not recorded yet: when it is over for certain (its timeout and a second). Should the
    /// saga compensate meanwhile, this step is undone too, after that time.
    pub call_in_flight_until: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub updated_at: Option<String>,
}

/// A page of sagas, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct SagaPage {
    pub data: Vec<SagaSummaryView>,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// A saga in a listing.
#[derive(Debug, Serialize, ToSchema)]
pub struct SagaSummaryView {
    pub id: String,
    pub saga_type: String,
    #[schema(value_type = String)]
    pub status: SagaStatus,
    pub reason: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// Query of the list routes.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only sagas with this status, e.g. `CANCELLED`.
    #[param(pattern = "^[A-Z0-9_]{1,64}$")]
    pub status: Option<String>,
    /// Page size, 1 to 100 (default 20). Parsed here rather than by serde, so that a bad value
    /// gets our error shape and names the field.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")]
    pub cursor: Option<String>,
}

fn json_or_null(s: &Option<String>) -> Option<serde_json::Value> {
    s.as_ref().map(|s| serde_json::from_str(s).unwrap_or(serde_json::Value::Null))
}

fn opt_time(t: Option<i64>) -> Option<String> {
    t.map(rfc3339)
}

/// Builds the view of a saga.
pub fn view(
    id: &str,
    def: &SagaDefinition,
    input: &str,
    state: &SagaState,
    created_at: i64,
    updated_at: i64,
) -> SagaView {
    SagaView {
        id: id.to_owned(),
        saga_type: def.saga_type.clone(),
        status: state.status.clone(),
        reason: state.reason.clone(),
        input: def.redact(&serde_json::from_str(input).unwrap_or(serde_json::Value::Null)),
        created_at: rfc3339(created_at),
        updated_at: rfc3339(updated_at),
        steps: def
            .steps
            .iter()
            .zip(&state.steps)
            .map(|(d, s)| StepView {
                name: d.name.clone(),
                status: s.status,
                attempts: s.attempts,
                compensate_attempts: s.compensate_attempts,
                execute_digest: s.execute_digest.clone().unwrap_or_else(|| d.execute.digest.clone()),
                compensate_digest: s.compensate_digest.clone(),
                output: json_or_null(&s.output),
                compensate_output: json_or_null(&s.compensate_output),
                last_error: s.last_error.clone(),
                waiting_for: s
                    .wait_signal
                    .clone()
                    .filter(|_| s.status == engine::StepStatus::Waiting && s.signal_payload.is_none()),
                call_in_flight_until: opt_time(s.in_flight_until).filter(|_| {
                    use engine::StepStatus::{Pending, Retrying, Waiting};
                    matches!(s.status, Pending | Retrying | Waiting)
                }),
                started_at: opt_time(s.started_at),
                finished_at: opt_time(s.finished_at),
                updated_at: opt_time(s.updated_at),
            })
            .collect(),
    }
}

pub(super) fn record_view(rec: &SagaRecord) -> SagaView {
    view(&rec.id, &rec.definition, &rec.input, &rec.state, rec.created_at, rec.updated_at)
}

pub(super) fn json_response(status: StatusCode, body: Vec<u8>, location: Option<&str>) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(loc) = location.and_then(|l| HeaderValue::from_str(l).ok()) {
        r.headers_mut().insert(header::LOCATION, loc);
    }
    r
}

pub(super) fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(v).map_err(ApiError::internal)
}

/// A stored response, replayed byte for byte and marked `Idempotent-Replayed: true`.
fn replay(status: u16, body: Vec<u8>, location: Option<&str>) -> Result<Response, ApiError> {
    let status = StatusCode::from_u16(status).map_err(ApiError::internal)?;
    let mut r = json_response(status, body, location);
    if status == StatusCode::NO_CONTENT {
        // A 204 has no content to have a type (a discarded dead letter's answer).
        r.headers_mut().remove(header::CONTENT_TYPE);
    }
    r.headers_mut().insert(idempotency::REPLAYED, HeaderValue::from_static("true"));
    Ok(r)
}

impl From<InputError> for ApiError {
    fn from(e: InputError) -> ApiError {
        ApiError::invalid(e.field, e.message)
    }
}

/// `Prefer: wait=N` (RFC 7240), capped at [`MAX_WAIT_SECS`]. Malformed preferences are ignored,
/// as the RFC asks.
fn prefer_wait(headers: &HeaderMap) -> Option<u64> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .filter_map(|pref| {
            let (name, value) = pref.trim().split_once('=')?;
            name.trim()
                .eq_ignore_ascii_case("wait")
                .then(|| {
                    // All digits but past a u64 is a wait longer than the cap: the cap.
                    let digits = value.trim().trim_matches('"');
                    match digits.parse::<u64>() {
                        Ok(n) => Some(n),
                        Err(_) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => Some(u64::MAX),
                        Err(_) => None,
                    }
                })
                .flatten()
        })
        .next()
        .map(|n| n.min(MAX_WAIT_SECS))
}

pub(super) fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<serde_json::Value, ApiError> {
    let body = body.map_err(body_rejection)?;
    if body.is_empty() {
        return Err(ApiError::invalid("", "the request body is empty; send a JSON object"));
    }
    serde_json::from_slice(&body).map_err(|e| ApiError::invalid("", format!("the request body is not valid JSON: {e}")))
}

/// JSON numbers with no fractional part become integers (`2.0` -> `2`), at every level.
///
/// JSON Schema counts `2.0` as an integer, and so does the OpenAPI document; serde does not.
/// Typed bodies (orders, definitions) are normalised before they are parsed, so that every
/// request the document calls valid is accepted, and the input stored is the one validated.
pub(super) fn integral_numbers(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            // Exactly representable integers only: beyond 2^53 a float is not a precise integer.
            if f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_992.0 {
                Value::from(f as i64)
            } else {
                Value::Number(n)
            }
        }
        Value::Array(items) => Value::Array(items.into_iter().map(integral_numbers).collect()),
        Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (k, integral_numbers(v))).collect()),
        other => other,
    }
}

/// 404 for a saga that does not exist (as a saga of `saga_type`, when given).
pub(super) fn not_found(saga_type: Option<&str>, id: &str) -> ApiError {
    match saga_type {
        Some(t) => ApiError::not_found(format!(
            "no {} with id '{id}'; check the id, or list them with GET {}",
            builtin::noun(t),
            builtin::collection(t)
        )),
        None => ApiError::not_found(format!("no saga with id '{id}'; check the id")),
    }
}

async fn load(state: &AppState, saga_type: Option<&str>, id: &str) -> Result<SagaRecord, ApiError> {
    let id = &saga_id(saga_type, id)?;
    state.sagas.get(saga_type, id).await?.ok_or_else(|| not_found(saga_type, id))
}

/// Saga ids are UUIDs this API issued: anything else (too long, a NUL, not a UUID) names no
/// saga, and is answered without asking the database. Returns the id as the store keeps it:
/// a UUID in lowercase (RFC 9562 reads hex digits in either case, and clients copy ids out
/// of logs and tools that upper-case them).
/// 404 for a saga type no definition can have.
fn no_such_type() -> ApiError {
    ApiError::not_found("no such saga type; type names are 1-64 lowercase letters, digits, '-' or '_'")
}

/// The saga id of a route, checked with its type (if the route names one) before anything is
/// written under the request's key: a type no saga can have is a 404, never a key stored, nor
/// a value the database refuses (a NUL byte, an over-long key) as a 500.
pub(super) fn saga_id(saga_type: Option<&str>, id: &str) -> Result<String, ApiError> {
    if saga_type.is_some_and(|t| !crate::engine::definition::is_valid_name(t)) {
        return Err(no_such_type());
    }
    canonical_id(id).ok_or_else(|| {
        // Never echo a hostile id back in full.
        let shown: String = id.chars().filter(|c| !c.is_control()).take(64).collect();
        not_found(saga_type, &shown)
    })
}

/// `s` as the store keeps a saga id (a UUID in its hyphenated form, in lowercase), if it is one.
pub(super) fn canonical_id(s: &str) -> Option<String> {
    (s.len() == 36 && uuid::Uuid::try_parse(s).is_ok()).then(|| s.to_ascii_lowercase())
}

/// Maps what the saga service says about an outside event to the API's terms; `refused`
/// words the engine's refusal for the route.
pub(super) fn outside_error(
    saga_type: Option<&str>,
    id: &str,
    e: saga::Error,
    refused: impl FnOnce(engine::Error, Box<SagaRecord>) -> ApiError,
) -> ApiError {
    match e {
        saga::Error::NotFound => not_found(saga_type, id),
        saga::Error::Refused(e, rec) => refused(e, rec),
        saga::Error::Busy | saga::Error::Fenced | saga::Error::StaleRead => {
            ApiError::conflict("busy", "the saga is changing rapidly; retry the request").with_retry_after(1)
        }
        saga::Error::Overloaded(queued) => overloaded(queued),
        saga::Error::Store(e) => e.into(),
    }
}

/// A new saga shed: the host has as many waiting to start as it queues.
fn overloaded(queued: usize) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        format!(
            "{queued} new sagas wait for this host to start them; retry after the Retry-After delay with the same Idempotency-Key"
        ),
    )
    .with_retry_after(1)
}

/// Whether a waiting create answers 200 with the saga (SPEC §5.2: COMPLETED, or CANCELLED).
/// A saga stuck in COMPENSATION_FAILED is not: an operator still acts on it, and the wait
/// runs out (201, the saga as it stands).
fn settled(rec: &SagaRecord) -> bool {
    rec.state.phase.is_terminal()
}

/// Waits until the saga is settled or the time is up; returns the latest record.
///
/// This process's saga service announces every change it commits, which wakes the wait at
/// once. A saga this process's driver runs (`here`: it was created claimed by it) changes
/// only through those commits until the driver announces that it left the saga (parked it,
/// gave it back, lost it). From then on, with replicas, another process may run it, whose
/// changes are seen only by reading the store: so on a shared database the wait re-reads on a
/// timer that backs off from 20 ms to 250 ms. Otherwise the timer is only a safety net: from
/// 1 s, backing off to 5 s. Waiters must not read the store while the saga runs here: under
/// overload hundreds of them wait for seconds, and their reads took the database from the
/// sagas they waited for (the host did ever less the more it was offered).
///
/// `watch` was taken before the saga was created (the driver may finish it at once), so the
/// saga is not read first: it cannot be settled before its first announced change.
///
/// Also returns the response body the settling commit stored under the request's idempotency
/// key, when the watch registered a responder and this process committed it.
async fn wait_settled(
    state: &AppState,
    mut watch: Watch,
    deadline: tokio::time::Instant,
    here: bool,
) -> Result<(SagaRecord, Option<Arc<Vec<u8>>>), ApiError> {
    const SHARED: (Duration, Duration) = (Duration::from_millis(20), Duration::from_millis(250));
    const SAFETY_NET: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(5));
    let shared = state.config.shared_database;
    let mut timer = if shared && !here { SHARED } else { SAFETY_NET };
    let id = watch.saga_id().to_owned();
    let read = || async {
        let rec = state.store.saga(&id).await?.ok_or_else(|| ApiError::internal(format!("saga {id} vanished")))?;
        Ok::<_, ApiError>((rec, None))
    };
    let mut poll = timer.0;
    loop {
        let wake = (tokio::time::Instant::now() + poll).min(deadline);
        match tokio::time::timeout_at(wake, watch.next()).await {
            // Committed here: the announcement carries the settled saga.
            Ok(Some(change)) if change.settled => match change.record {
                Some(rec) => return Ok((Arc::unwrap_or_clone(rec), change.response)),
                None => return read().await,
            },
            Ok(Some(change)) if change.left && shared && timer != SHARED => {
                // Another replica may pick it up: follow the store from now on.
                timer = SHARED;
                poll = timer.0;
            }
            Ok(Some(_)) => continue,
            // The host is stopping: answer with what is stored.
            Ok(None) => return read().await,
            Err(_) => {
                // The timer: a replica may be running the saga, or time is up.
                let (rec, none) = read().await?;
                if settled(&rec) || tokio::time::Instant::now() >= deadline {
                    return Ok((rec, none));
                }
                poll = (poll * 2).min(timer.1);
            }
        }
    }
}

/// Creates a saga under the request's idempotency key (SPEC §5.1).
pub(super) async fn create(
    state: AppState,
    saga_type: &str,
    route: &str,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let key = idempotency::key(&headers, true)?.unwrap_or_default();
    let value = integral_numbers(parse_body(body)?);
    let def = state.catalog.find_definition(saga_type).await.ok_or_else(|| {
        ApiError::not_found(format!(
            "no saga type '{saga_type}' is registered; register it with PUT /admin/sagas/{saga_type}"
        ))
    })?;
    builtin::validate_input(saga_type, &value)?;
    // A waiter holds its place until its response is stored; past the cap, no wait.
    let waiter = prefer_wait(&headers).and_then(|secs| Some((secs, state.gates.waiter()?)));
    let wait = waiter.as_ref().map(|(secs, _)| *secs);
    let draft = state.sagas.draft(&def, &value);
    let id = draft.record.id.clone();
    let created_body = to_json(&record_view(&draft.record))?;
    let claim = IdempotencyClaim {
        caller: idempotency::caller(&headers),
        route: route.to_owned(),
        key,
        fingerprint: idempotency::fingerprint(route, &value),
        // An in-flight claim outlives the longest wait by a margin before it counts as abandoned.
        lock_ms: (wait.unwrap_or(0) as i64 + 30) * 1000,
        ttl_ms: state.config.idempotency_ttl.as_millis() as i64,
        response: if wait.is_none() { Some((201, created_body.clone())) } else { None },
    };
    // Watched before it exists: this process's driver may settle it before `create` returns.
    // The commit that settles it stores this request's response too (one write less).
    let watch = wait.map(|_| {
        let responder = Responder {
            caller: claim.caller.clone(),
            route: claim.route.clone(),
            key: claim.key.clone(),
            render: Box::new(|rec| to_json(&record_view(rec)).ok()),
        };
        state.driver.watch_responding(&id, responder)
    });
    // Dropped before it answers (its client hung up, its deadline passed), a waiting request
    // leaves its key unanswered: the guard answers it, so the retry gets the saga, not 409.
    // So does one whose answer failed after its saga was created (a store error while waiting),
    // or whose creation failed with a store error (its commit may have landed all the same).
    let mut unanswered = Unanswered::arm(&state, &claim, &id, wait);
    create_and_answer(&state, saga_type, &claim, &draft, (wait, watch), created_body, &mut unanswered).await
}

/// [`create`] from the commit on: the commit, then the answer (waiting first with `wait`).
/// Disarms `unanswered` once the key's answer is settled: stored (or to be), or not this
/// request's to give.
async fn create_and_answer(
    state: &AppState,
    saga_type: &str,
    claim: &IdempotencyClaim,
    draft: &saga::Draft,
    (wait, watch): (Option<u64>, Option<Watch>),
    created_body: Vec<u8>,
    unanswered: &mut Unanswered,
) -> Result<Response, ApiError> {
    let id = &draft.record.id;
    let here = state.driver.adopts();
    // The wait counts from here: time spent creating the saga is part of it.
    let until = wait.map(|secs| tokio::time::Instant::now() + Duration::from_secs(secs));
    let created = state.sagas.create(draft, Some(claim), wait.is_some()).await;
    // Unless its saga may exist (created, or a store error after which the commit may have
    // landed all the same), the key's answer is not this request's to give.
    if !matches!(created, Ok(CreateOutcome::Created) | Err(saga::Error::Store(_))) {
        unanswered.disarm();
    }
    let created = created.map_err(|e| match e {
        saga::Error::Overloaded(queued) => {
            state.metrics.shed();
            overloaded(queued)
        }
        saga::Error::Store(e) => e.into(),
        e => ApiError::internal(e),
    });
    match created? {
        CreateOutcome::Created => {
            let loc = builtin::location(saga_type, id);
            let (Some(secs), Some(until), Some(watch)) = (wait, until, watch) else {
                return Ok(json_response(StatusCode::CREATED, created_body, Some(&loc)));
            };
            let (status, body) = match wait_settled(state, watch, until, here).await? {
                (_, Some(stored)) => (StatusCode::OK, Arc::unwrap_or_clone(stored)),
                // Stored first by this request's settling commit: its own answer, no replay.
                (rec, None) => {
                    let (status, body, _) = answer_from(state, claim, &rec).await?;
                    (status, body)
                }
            };
            unanswered.disarm();
            let mut r = json_response(status, body, Some(&loc));
            r.headers_mut()
                .insert("preference-applied", HeaderValue::from_str(&format!("wait={secs}")).expect("ascii"));
            Ok(r)
        }
        CreateOutcome::Replay { status, body, saga_id } => {
            replay(status, body, saga_id.map(|id| builtin::location(saga_type, &id)).as_deref())
        }
        CreateOutcome::InFlight => Err(idempotency::in_flight()),
        CreateOutcome::Mismatch => Err(idempotency::reused()),
        CreateOutcome::Abandoned { saga_id } => {
            // The first request created the saga, then died before answering (only a waiting
            // request leaves its key so). Answer now, from the saga as it stands, as that
            // request's wait running out would have: never a second saga for one key.
            let rec = load(state, Some(saga_type), &saga_id).await?;
            let loc = builtin::location(saga_type, &saga_id);
            match answer_from(state, claim, &rec).await? {
                (status, body, false) => Ok(json_response(status, body, Some(&loc))),
                // Another retry answered the key first: this is its answer, replayed.
                (status, body, true) => replay(status.as_u16(), body, Some(&loc)),
            }
        }
    }
}

/// Stores the answer to a waiting create under its key: the saga as it stands, 200 once
/// settled, else 201 (the wait ran out). Returns the answer the key holds: this one, or the
/// one stored first (by the settling commit, or by another request), flagged `true`.
async fn answer_from(
    state: &AppState,
    claim: &IdempotencyClaim,
    rec: &SagaRecord,
) -> Result<(StatusCode, Vec<u8>, bool), ApiError> {
    let status = if settled(rec) { StatusCode::OK } else { StatusCode::CREATED };
    let body = to_json(&record_view(rec))?;
    let (c, r, k) = (&claim.caller, &claim.route, &claim.key);
    match state.store.complete_idempotency(c, r, k, status.as_u16(), &body).await? {
        None => Ok((status, body, false)),
        Some((stored, body)) => Ok((StatusCode::from_u16(stored).map_err(ApiError::internal)?, body, true)),
    }
}

/// Answers the key of a waiting create request that was dropped before it answered (its
/// client hung up, its deadline passed) or failed to after its saga was created: nobody else
/// would until the key's lock ran out (the wait plus 30 s), and a retry meanwhile got 409 "in
/// flight" from a request that no longer was. The answer is the saga as it stands (200 once
/// settled, else 201), as a wait that ran out would give. A creation still on its way to its
/// commit is awaited through its announcement, and read again on a timer (a commit that
/// landed after its request was dropped is not announced); one that never commits (the key
/// held another saga) leaves nothing to answer once the key's lock would have run out.
struct Unanswered(Option<(AppState, IdempotencyClaim, String)>);

impl Unanswered {
    /// A guard for a request with `wait`; none without (its claim carries its response).
    fn arm(state: &AppState, claim: &IdempotencyClaim, id: &str, wait: Option<u64>) -> Self {
        Self(wait.map(|_| (state.clone(), claim.clone(), id.to_owned())))
    }

    /// The key's answer is settled without the guard.
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        let Some((state, claim, id)) = self.0.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            let mut watch = state.driver.watch(&id);
            let mut poll = Duration::from_millis(50);
            let until = tokio::time::Instant::now() + Duration::from_millis(claim.lock_ms.max(0) as u64);
            loop {
                match state.store.saga(&id).await {
                    Ok(Some(rec)) => {
                        if let Err(e) = answer_from(&state, &claim, &rec).await {
                            tracing::warn!(saga_id = %id, error = %e.message, "could not answer the key of a dropped request; it answers once its lock runs out");
                        }
                        return;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(saga_id = %id, error = %e, "could not read the saga of a dropped request; its key answers once its lock runs out");
                        return;
                    }
                }
                // Not created yet: its creation's commit is announced here, or found on a read.
                let now = tokio::time::Instant::now();
                if now >= until {
                    return;
                }
                if let Ok(None) = tokio::time::timeout_at((now + poll).min(until), watch.next()).await {
                    return; // the host is stopping
                }
                poll = (poll * 2).min(Duration::from_secs(1));
            }
        });
    }
}

/// A page size given as `limit` in a query string: `default` when absent, else a whole number
/// from 1 to `max` (parsed here rather than by serde, so that a bad value names the field).
pub(super) fn page_limit(raw: Option<&str>, default: u32, max: u32) -> Result<u32, ApiError> {
    match raw {
        None => Ok(default),
        Some(s) => s
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| ApiError::invalid("limit", format!("must be a whole number from 1 to {max}"))),
    }
}

pub(super) async fn get_one(state: AppState, saga_type: &str, id: &str) -> Result<Response, ApiError> {
    let rec = load(&state, Some(saga_type), id).await?;
    Ok(json_response(StatusCode::OK, to_json(&record_view(&rec))?, None))
}

pub(super) async fn list(state: AppState, saga_type: &str, q: ListQuery) -> Result<Response, ApiError> {
    if !crate::engine::definition::is_valid_name(saga_type) {
        return Err(no_such_type());
    }
    // An unregistered type has no sagas: say so rather than list none (a typo in the type
    // would otherwise read as "nothing is stuck").
    let def = state.catalog.find_definition(saga_type).await.ok_or_else(|| {
        ApiError::not_found(format!(
            "no saga type '{saga_type}' is registered; GET /admin/sagas lists the registered types"
        ))
    })?;
    let limit = page_limit(q.limit.as_deref(), 20, 100)?;
    if let Some(status) = &q.status {
        if status.is_empty()
            || status.len() > 64
            || !status.bytes().all(|b| b.is_ascii_uppercase() || b == b'_' || b.is_ascii_digit())
        {
            return Err(ApiError::invalid("status", "must be a status label such as COMPLETED or CANCELLED"));
        }
    }
    // A cursor is a saga id; compared as the store keeps ids (lowercase), or an upper-cased
    // one would skip rows.
    let cursor = match q.cursor.as_deref() {
        None => None,
        Some(cursor) => Some(canonical_id(cursor).ok_or_else(|| {
            ApiError::invalid("cursor", "is not a cursor this API returned; pass next_cursor from the previous page")
        })?),
    };
    let rows = state.store.list_sagas(saga_type, q.status.as_deref(), cursor.as_deref(), limit + 1).await?;
    if let Some(status) = q.status.as_deref().filter(|_| rows.is_empty() && cursor.is_none()) {
        // None found: a label the type's definition never reaches is a typo, not an answer.
        // (A label only an older version of the definition reached is still listed while
        // sagas have it.)
        let known = def.status_labels();
        if !known.contains(&status) {
            return Err(ApiError::invalid(
                "status",
                format!("{saga_type} sagas have no status {status}; they have {}", known.join(", ")),
            ));
        }
    }
    let more = rows.len() > limit as usize;
    let rows: Vec<SagaSummary> = rows.into_iter().take(limit as usize).collect();
    let next_cursor = if more { rows.last().map(|r| r.id.clone()) } else { None };
    let page = SagaPage {
        data: rows
            .into_iter()
            .map(|r| SagaSummaryView {
                id: r.id,
                saga_type: r.saga_type,
                status: r.status,
                reason: r.reason,
                created_at: rfc3339(r.created_at),
                updated_at: rfc3339(r.updated_at),
            })
            .collect(),
        next_cursor,
    };
    Ok(json_response(StatusCode::OK, to_json(&page)?, None))
}

/// Runs a mutating request that creates no saga under its optional `Idempotency-Key` (SPEC
/// §5.1): the first request runs and its response is stored; a retry with the same key and
/// body gets that response back (`Idempotent-Replayed: true`), one with another body 422, one
/// while the first runs 409. Validation must happen before: rejected requests are not stored.
/// Only final answers are stored: a 5xx, or an answer marked [`Provisional`] (a 409 "busy,
/// retry", a signal the saga does not wait for yet), releases the key, so a retry runs the
/// request again. `run` gets the key ([`RequestKey`]): an outside event's commit stores the
/// answer under it itself, so a request that dies after its commit leaves its key answered
/// (its retry replays it instead of running the event again). A request dropped before its
/// key is settled releases it ([`claim_detached`] while claiming, then [`Unsettled`]); one
/// whose host died holds it until its lock runs out: its deadline plus 30 s (75 s by
/// default, 330 s for a plugin upload).
pub(super) async fn idempotent<F, Fut>(
    state: &AppState,
    headers: &HeaderMap,
    route: String,
    body: &serde_json::Value,
    run: F,
) -> Result<Response, ApiError>
where
    F: FnOnce(Option<RequestKey>) -> Fut,
    Fut: std::future::Future<Output = Result<Response, ApiError>>,
{
    idempotent_within(state, headers, route, body, state.gates.deadline(false), run).await
}

/// [`idempotent`] for a route whose requests may take `deadline` (a plugin upload's).
pub(super) async fn idempotent_within<F, Fut>(
    state: &AppState,
    headers: &HeaderMap,
    route: String,
    body: &serde_json::Value,
    deadline: Duration,
    run: F,
) -> Result<Response, ApiError>
where
    F: FnOnce(Option<RequestKey>) -> Fut,
    Fut: std::future::Future<Output = Result<Response, ApiError>>,
{
    let Some(key) = idempotency::key(headers, false)? else {
        return run(None).await;
    };
    let claim = IdempotencyClaim {
        caller: idempotency::caller(headers),
        fingerprint: idempotency::fingerprint(&route, body),
        route,
        key,
        // Held past the longest the request can run (its deadline ends it), so a retry never
        // takes the key over from a request still running: one key, one run.
        lock_ms: (deadline + KEY_LOCK_MARGIN).as_millis() as i64,
        ttl_ms: state.config.idempotency_ttl.as_millis() as i64,
        response: None,
    };
    match claim_detached(&state.store, &claim, state.clock.now_ms()).await? {
        CreateOutcome::Created | CreateOutcome::Abandoned { .. } => {
            let key = RequestKey { caller: claim.caller.clone(), route: claim.route.clone(), key: claim.key.clone() };
            // Armed before anything else is awaited: from here on a drop releases the key.
            let mut unsettled = Unsettled::arm(state, &key);
            let response = run(Some(key)).await.unwrap_or_else(IntoResponse::into_response);
            if response.status().is_server_error() || response.extensions().get::<Provisional>().is_some() {
                state.store.release_key(&claim.caller, &claim.route, &claim.key).await?;
                unsettled.disarm();
                return Ok(response);
            }
            if response.extensions().get::<AnsweredInCommit>().is_some() {
                unsettled.disarm();
                return Ok(response);
            }
            let (parts, body) = response.into_parts();
            let bytes = axum::body::to_bytes(body, usize::MAX).await.map_err(ApiError::internal)?;
            let (c, r, k) = (&claim.caller, &claim.route, &claim.key);
            // `Some`: stored already by nobody else while the lock holds; the stored one stands.
            let stored = state.store.complete_idempotency(c, r, k, parts.status.as_u16(), &bytes).await?;
            unsettled.disarm();
            match stored {
                None => Ok(Response::from_parts(parts, axum::body::Body::from(bytes))),
                Some((status, body)) => {
                    let mut r = Response::from_parts(parts, axum::body::Body::from(body));
                    *r.status_mut() = StatusCode::from_u16(status).map_err(ApiError::internal)?;
                    Ok(r)
                }
            }
        }
        CreateOutcome::Replay { status, body, .. } => replay(status, body, None),
        CreateOutcome::InFlight => Err(idempotency::in_flight()),
        CreateOutcome::Mismatch => Err(idempotency::reused()),
    }
}

/// Claims `claim`'s key in a task of its own, so that a request dropped while its claim is on
/// its way (its client hung up, its deadline passed) cannot leave the key claimed with nobody
/// to run or release it: on SQLite a claim is a job queued to the group-commit writer, which
/// runs it even when its caller is gone, and a retry got 409 "in flight" until the lock ran
/// out (the deadline plus 30 s). A claim the dropped request can no longer take is released by
/// the task (the request never ran); one that reached the request just before the drop is
/// released by [`ClaimWait`]. From the answer on, [`Unsettled`] covers the request.
async fn claim_detached(
    store: &Arc<dyn crate::store::Store>,
    claim: &IdempotencyClaim,
    now: i64,
) -> Result<CreateOutcome, crate::store::Error> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (store, claim) = (Arc::clone(store), claim.clone());
    let mut wait = ClaimWait { rx, release: Some((Arc::clone(&store), claim.clone())) };
    tokio::spawn(async move {
        let outcome = store.claim_key(&claim, now).await;
        if let Err(Ok(CreateOutcome::Created | CreateOutcome::Abandoned { .. })) = tx.send(outcome) {
            release_dropped(store.as_ref(), &claim.caller, &claim.route, &claim.key).await;
        }
    });
    let outcome = (&mut wait.rx).await;
    wait.release = None;
    outcome.unwrap_or_else(|_| Err(crate::store::Error::Unsupported("the key's claim was cut short".to_owned())))
}

/// The request's end of [`claim_detached`]: dropped before it took the answer, it closes the
/// channel (no answer can come after) and releases a claim that came before.
struct ClaimWait {
    rx: tokio::sync::oneshot::Receiver<Result<CreateOutcome, crate::store::Error>>,
    /// The store and the claim to release; `None` once the request took the answer.
    release: Option<(Arc<dyn crate::store::Store>, IdempotencyClaim)>,
}

impl Drop for ClaimWait {
    fn drop(&mut self) {
        let Some((store, claim)) = self.release.take() else { return };
        self.rx.close();
        if let Ok(Ok(CreateOutcome::Created | CreateOutcome::Abandoned { .. })) = self.rx.try_recv() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(
                    async move { release_dropped(store.as_ref(), &claim.caller, &claim.route, &claim.key).await },
                );
            }
        }
    }
}

/// Releases the key of a request that was dropped (a release removes only a key without an
/// answer).
async fn release_dropped(store: &dyn crate::store::Store, caller: &str, route: &str, key: &str) {
    if let Err(e) = store.release_key(caller, route, key).await {
        tracing::warn!(route, error = %e, "could not release the key of a dropped request; it is free once its lock runs out");
    }
}

/// How long a keyed request's claim outlives its deadline: replicas' clocks differ a little,
/// and a process that stalls (a pause, swapping) may run a little past its deadline.
const KEY_LOCK_MARGIN: Duration = Duration::from_secs(30);

/// Releases the key of a keyed request ([`idempotent`]) that is dropped before its key is
/// settled (its client hung up, its deadline passed): nobody would answer it, and its retry
/// got 409 "in flight" until the lock ran out (the deadline plus 30 s). Released, the retry
/// runs the request. An outside event whose commit landed stored its answer with it, and a
/// release removes only a key without one, so the retry then replays that answer.
struct Unsettled(Option<(Arc<dyn crate::store::Store>, RequestKey)>);

impl Unsettled {
    fn arm(state: &AppState, key: &RequestKey) -> Self {
        Self(Some((Arc::clone(&state.store), key.clone())))
    }

    /// The key is answered or released.
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        let Some((store, k)) = self.0.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move { release_dropped(store.as_ref(), &k.caller, &k.route, &k.key).await });
    }
}

/// The key a request runs under in [`idempotent`], for the commit of its outside event to
/// store its answer under ([`KeyedAnswer`]).
#[derive(Clone)]
pub(super) struct RequestKey {
    caller: String,
    route: String,
    key: String,
}

impl RequestKey {
    /// The answer `status` and `body` of an admin change, for the change's transaction to store
    /// under this key ([`crate::store::AuditEntry::answer`]); the request then answers with
    /// [`answered_in_commit`].
    pub(super) fn answer(&self, status: StatusCode, body: &[u8]) -> crate::store::KeyAnswer {
        crate::store::KeyAnswer {
            caller: self.caller.clone(),
            route: self.route.clone(),
            key: self.key.clone(),
            status: status.as_u16(),
            body: body.to_vec(),
        }
    }

    /// The answer of an applied outside event ([`accepted`]), for its commit to store.
    pub(super) fn accepted(&self) -> KeyedAnswer<'_> {
        KeyedAnswer {
            caller: &self.caller,
            route: &self.route,
            key: &self.key,
            status: StatusCode::ACCEPTED.as_u16(),
            render: |rec| to_json(&record_view(rec)).ok(),
        }
    }
}

/// Marks the answer of an outside event whose commit stored it under the request's key
/// ([`RequestKey::accepted`]): [`idempotent`] has nothing left to store.
#[derive(Debug, Clone, Copy)]
struct AnsweredInCommit;

/// `response`, whose status and body the change's own commit stored under the request's key
/// ([`RequestKey::answer`]), if it had one: [`idempotent`] has nothing left to store.
pub(super) fn answered_in_commit(mut response: Response, key: Option<&RequestKey>) -> Response {
    if key.is_some() {
        crate::failpoint!("admin-after-commit");
        response.extensions_mut().insert(AnsweredInCommit);
    }
    response
}

/// The answer of an applied outside event: 202 with the saga as its commit left it, the same
/// bytes the commit stored under `key`, if the request had one.
pub(super) fn accepted(rec: &SagaRecord, key: Option<&RequestKey>) -> Result<Response, ApiError> {
    let mut r = json_response(StatusCode::ACCEPTED, to_json(&record_view(rec))?, None);
    if key.is_some() {
        r.extensions_mut().insert(AnsweredInCommit);
    }
    Ok(r)
}

pub(super) async fn cancel(
    state: AppState,
    saga_type: &str,
    id: &str,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = &saga_id(Some(saga_type), id)?;
    let route = format!("POST {}/cancel", builtin::location(saga_type, id));
    idempotent(&state, &headers, route, &serde_json::Value::Null, |key| cancel_now(&state, saga_type, id, key)).await
}

async fn cancel_now(
    state: &AppState,
    saga_type: &str,
    id: &str,
    key: Option<RequestKey>,
) -> Result<Response, ApiError> {
    let event = Event::Cancel { reason: "cancelled by client".to_owned() };
    let answer = key.as_ref().map(RequestKey::accepted);
    match state.sagas.apply(Some(saga_type), id, event, None, answer.as_ref()).await {
        Ok(rec) => accepted(&rec, key.as_ref()),
        // Cancelling is idempotent: a saga already compensating or cancelled stays so (one
        // whose compensation is stuck too: it is not COMPLETED, and an operator finishes it).
        Err(saga::Error::Refused(_, rec))
            if matches!(rec.state.phase, Phase::Compensating | Phase::Cancelled | Phase::CompensationFailed) =>
        {
            Ok(json_response(StatusCode::OK, to_json(&record_view(&rec))?, None))
        }
        Err(e) => Err(outside_error(Some(saga_type), id, e, |e, _| {
            ApiError::conflict("not_cancellable", format!("{e}; a completed saga is final"))
        })),
    }
}

pub(super) async fn signal(
    state: AppState,
    saga_type: &str,
    id: &str,
    name: &str,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = &saga_id(Some(saga_type), id)?;
    let payload = parse_body(body)?;
    if !engine::is_signal_name(name) {
        return Err(ApiError::invalid("name", "a signal name has 1 to 128 characters and no control characters"));
    }
    let route = format!("POST {}/signals/{name}", builtin::location(saga_type, id));
    let event = Event::Signal { name: name.to_owned(), payload: payload.to_string() };
    let sagas = &state.sagas;
    idempotent(&state, &headers, route, &payload, |key| async move {
        let answer = key.as_ref().map(RequestKey::accepted);
        match sagas.apply(Some(saga_type), id, event, None, answer.as_ref()).await {
            Ok(rec) => accepted(&rec, key.as_ref()),
            Err(e) => Err(outside_error(Some(saga_type), id, e, |e, _| match e {
                // Final: the step is rejected and the saga compensates.
                engine::Error::DeadlinePassed(_) => ApiError::conflict("deadline_passed", e.to_string()),
                // The step may come to wait for it later: a retry must run again, not replay this.
                e => ApiError::conflict("not_waiting", format!("{e}; check the saga's steps[].waiting_for"))
                    .provisional(),
            })),
        }
    })
    .await
}

// ------------------------------------------------------------------------------------------
// Route handlers. Thin wrappers, one per route, so that each appears in the OpenAPI document.

/// Start a saga of any registered type.
///
/// The body is the saga's input: a JSON object, which a built-in type checks against its own
/// shape (the `order` type: `OrderRequest`). Requires `Idempotency-Key`; `Prefer: wait=N` as
/// for orders.
#[utoipa::path(post, path = "/sagas/{type}", tag = "sagas",
    params(
           ("type" = String, Path, description = "A saga type name: 1-64 lowercase letters, digits, `-` or `_`, starting with a letter", pattern = "^[a-z][a-z0-9_-]{0,63}$"), RequiredKey,
           ("Prefer" = Option<String>, Header, description = "wait=N: wait up to N seconds (at most 30) for a final status")),
    request_body(content = Object, description = "The saga's input"),
    responses((status = 201, description = "Saga accepted", body = SagaView, headers(("Location" = String))),
              (status = 200, description = "Saga COMPLETED or CANCELLED within the Prefer wait", body = SagaView, headers(("Location" = String))),
              (status = 400, description = "Invalid input (the error names the field) or a missing or malformed Idempotency-Key", body = ErrorBody),
              (status = 404, description = "No saga type of this name is registered", body = ErrorBody),
              (status = 409, description = "A request with this key is still in flight", body = ErrorBody,
               headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
              (status = 422, description = "The key was used with a different body", body = ErrorBody)))]
pub async fn create_saga(
    State(state): State<AppState>,
    ApiPath(saga_type): ApiPath<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    // A built-in type's own route and `/sagas/{type}` are the same route (SPEC §5.2): keys are
    // scoped by the canonical one, as cancel and signal are (`builtin::location`).
    let route = format!("POST {}", builtin::collection(&saga_type));
    create(state, &saga_type, &route, headers, body).await
}

/// Get a saga.
#[utoipa::path(get, path = "/sagas/{type}/{id}", tag = "sagas", params(
           ("type" = String, Path, description = "A saga type name: 1-64 lowercase letters, digits, `-` or `_`, starting with a letter", pattern = "^[a-z][a-z0-9_-]{0,63}$"), 
           ("id" = String, Path, description = "The saga id, a UUID", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")),
    responses((status = 200, body = SagaView), (status = 404, description = "No saga of this type with this id", body = ErrorBody)))]
pub async fn get_saga(
    State(state): State<AppState>,
    ApiPath((saga_type, id)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    get_one(state, &saga_type, &id).await
}

/// List sagas of a type, newest first.
#[utoipa::path(get, path = "/sagas/{type}", tag = "sagas", params(
           ("type" = String, Path, description = "A saga type name: 1-64 lowercase letters, digits, `-` or `_`, starting with a letter", pattern = "^[a-z][a-z0-9_-]{0,63}$"), ListQuery),
    responses((status = 200, body = SagaPage),
              (status = 400, description = "A query parameter is out of bounds or unknown, or a status no saga of the type has or can reach", body = ErrorBody),
              (status = 404, description = "No saga type of this name is registered", body = ErrorBody)))]
pub async fn list_sagas(
    State(state): State<AppState>,
    ApiPath(saga_type): ApiPath<String>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    list(state, &saga_type, super::error::query(q)?).await
}

/// Cancel a saga.
#[utoipa::path(post, path = "/sagas/{type}/{id}/cancel", tag = "sagas", params(
           ("type" = String, Path, description = "A saga type name: 1-64 lowercase letters, digits, `-` or `_`, starting with a letter", pattern = "^[a-z][a-z0-9_-]{0,63}$"), 
           ("id" = String, Path, description = "The saga id, a UUID", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"), OptionalKey),
    responses((status = 202, description = "Cancelling", body = SagaView),
              (status = 200, description = "Already compensating (or stuck in COMPENSATION_FAILED) or cancelled", body = SagaView),
              (status = 400, description = "A malformed Idempotency-Key", body = ErrorBody),
              (status = 404, description = "No saga of this type with this id", body = ErrorBody),
              (status = 409, description = "Completed (final), busy, or the key is in flight", body = ErrorBody,
               headers(("Retry-After" = u64, description = "Present when a retry may succeed"))),
              (status = 422, description = "The key was used with another request", body = ErrorBody)))]
pub async fn cancel_saga(
    State(state): State<AppState>,
    ApiPath((saga_type, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    cancel(state, &saga_type, &id, headers).await
}

/// Send a named signal to a saga's waiting step.
#[utoipa::path(post, path = "/sagas/{type}/{id}/signals/{name}", tag = "sagas",
    params(
           ("type" = String, Path, description = "A saga type name: 1-64 lowercase letters, digits, `-` or `_`, starting with a letter", pattern = "^[a-z][a-z0-9_-]{0,63}$"), 
           ("id" = String, Path, description = "The saga id, a UUID", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"), 
           ("name" = String, Path, description = "The signal name: 1 to 128 characters, no control characters", min_length = 1, max_length = 128, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$"), OptionalKey),
    request_body(content = serde_json::Value, description = "Any JSON value: the signal's payload"),
    responses((status = 202, description = "Delivered", body = SagaView),
              (status = 400, description = "The body is not JSON, or a malformed Idempotency-Key", body = ErrorBody),
              (status = 404, description = "No saga of this type with this id", body = ErrorBody),
              (status = 409, description = "No step waits for this signal (yet), the step is past its deadline (`deadline_passed`, final), the saga is busy, or the key is in flight", body = ErrorBody,
               headers(("Retry-After" = u64, description = "Present when a retry may succeed"))),
              (status = 422, description = "The key was used with another request", body = ErrorBody)))]
pub async fn signal_saga(
    State(state): State<AppState>,
    ApiPath((saga_type, id, name)): ApiPath<(String, String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    signal(state, &saga_type, &id, &name, headers, body).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A keyed request dropped while its claim waits for SQLite's writer (a queued job runs
    /// even when its caller is gone) leaves its key to the retry, rather than "in flight" until
    /// the lock runs out (75 s).
    #[tokio::test]
    async fn a_request_dropped_while_its_claim_waits_for_the_writer_leaves_its_key_free() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open(None, dir.path()).await.unwrap();
        let claim = IdempotencyClaim {
            caller: "c".into(),
            route: "POST /orders/x/cancel".into(),
            key: "k".into(),
            fingerprint: "f".into(),
            lock_ms: 75_000,
            ttl_ms: 86_400_000,
            response: None,
        };
        // Another connection holds the database's write lock: the writer's next job waits.
        let holder = crate::store::tests::WriteLock::take(&dir.path().join("sagahost.db")).await;
        let claiming = claim_detached(&store, &claim, 0);
        // The client hangs up while its claim is queued.
        let gave_up = tokio::time::timeout(Duration::from_millis(300), claiming).await;
        assert!(gave_up.is_err(), "the claim waited for the lock: {gave_up:?}");
        holder.release().await;

        let retry = std::time::Instant::now();
        loop {
            match claim_detached(&store, &claim, 0).await.unwrap() {
                CreateOutcome::Created => break,
                // The dropped claim commits, then its release follows.
                CreateOutcome::InFlight if retry.elapsed() < Duration::from_secs(5) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                other => panic!("the retry found the key {other:?} after {:?}", retry.elapsed()),
            }
        }
    }

    #[test]
    fn prefer_wait_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(prefer_wait(&h), None);
        h.insert("prefer", HeaderValue::from_static("wait=5"));
        assert_eq!(prefer_wait(&h), Some(5));
        h.insert("prefer", HeaderValue::from_static("respond-async, wait=100"));
        assert_eq!(prefer_wait(&h), Some(MAX_WAIT_SECS));
        h.insert("prefer", HeaderValue::from_static("wait=soon"));
        assert_eq!(prefer_wait(&h), None);
        // Past a u64 is past the cap, not no wait at all.
        h.insert("prefer", HeaderValue::from_static("wait=99999999999999999999"));
        assert_eq!(prefer_wait(&h), Some(MAX_WAIT_SECS));
        h.insert("prefer", HeaderValue::from_static("wait=-1"));
        assert_eq!(prefer_wait(&h), None);
    }

    /// An integer written as a float (`1341.0`) is that integer, up to 2^53, however many
    /// digits it has: parsed exactly (serde_json's `float_roundtrip`; its default parser made
    /// `2180746175968289.0` into `2180746175968288.75`, and the fuzz test's request failed).
    #[test]
    fn integral_floats_are_integers_exactly() {
        for (text, want) in [
            ("1341.0", json!(1341)),
            ("2180746175968289.0", json!(2180746175968289_i64)),
            ("9007199254740992.0", json!(9_007_199_254_740_992_i64)),
            ("-16.0", json!(-16)),
            ("2.5", json!(2.5)),
        ] {
            let parsed: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(integral_numbers(parsed), want, "{text}");
        }
    }
}
