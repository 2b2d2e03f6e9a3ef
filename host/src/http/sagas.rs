//! Saga routes: `/orders` for the built-in `order` saga and `/sagas/{type}` for every type.
//!
//! Handlers validate, then talk to the store and wake the driver. They never call plugins.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{body_rejection, ApiError, ErrorBody};
use super::order::OrderRequest;
use super::{idempotency, order, AppState};
use crate::clock::rfc3339;
use crate::engine::{self, Event, EventSpec, Phase, SagaDefinition, SagaState, SagaStatus, StepStatus};
use crate::store::{AuditEntry, Commit, CreateOutcome, Fence, IdempotencyClaim, NewSaga, SagaRecord, SagaSummary};

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
    /// The input as accepted.
    #[schema(value_type = Object)]
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
    #[schema(value_type = Option<Object>)]
    pub output: Option<serde_json::Value>,
    #[schema(value_type = Option<Object>)]
    pub compensate_output: Option<serde_json::Value>,
    pub last_error: Option<String>,
    /// The signal a waiting step waits for.
    pub waiting_for: Option<String>,
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
pub struct ListQuery {
    /// Only sagas with this status, e.g. `CANCELLED`.
    pub status: Option<String>,
    /// Page size, 1 to 100 (default 20).
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
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
        input: serde_json::from_str(input).unwrap_or(serde_json::Value::Null),
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
    r.headers_mut().insert(idempotency::REPLAYED, HeaderValue::from_static("true"));
    Ok(r)
}

/// Where a saga lives: `/orders/{id}` for orders, `/sagas/{type}/{id}` otherwise.
pub fn location(saga_type: &str, id: &str) -> String {
    if saga_type == "order" {
        format!("/orders/{id}")
    } else {
        format!("/sagas/{saga_type}/{id}")
    }
}

fn noun(saga_type: &str) -> String {
    if saga_type == "order" {
        "order".to_owned()
    } else {
        format!("{saga_type} saga")
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
                .then(|| value.trim().trim_matches('"').parse::<u64>().ok())
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

async fn load(state: &AppState, saga_type: &str, id: &str) -> Result<SagaRecord, ApiError> {
    match state.store.saga(id).await? {
        Some(rec) if rec.saga_type == saga_type || saga_type.is_empty() => Ok(rec),
        _ => Err(ApiError::not_found(format!(
            "no {} with id '{id}'; check the id, or list them with GET {}",
            noun(saga_type),
            if saga_type == "order" || saga_type.is_empty() {
                "/orders".to_owned()
            } else {
                format!("/sagas/{saga_type}")
            }
        ))),
    }
}

fn settled(rec: &SagaRecord) -> bool {
    rec.state.phase.is_terminal() || rec.state.phase == Phase::CompensationFailed
}

/// Waits until the saga is settled or the time is up; returns the latest record.
///
/// This process's driver announces the changes it commits, which wakes the wait at once. With
/// replicas, another process may be running the saga: those changes are only seen by reading
/// the store, so the wait also re-reads on a timer that backs off from 20 ms to 250 ms.
async fn wait_settled(state: &AppState, id: &str, secs: u64) -> Result<SagaRecord, ApiError> {
    const FIRST_POLL: Duration = Duration::from_millis(20);
    const MAX_POLL: Duration = Duration::from_millis(250);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut poll = FIRST_POLL;
    // Subscribe before reading, so a change between the read and the wait is not missed.
    let mut changes = state.driver.subscribe();
    loop {
        let rec = state.store.saga(id).await?.ok_or_else(|| ApiError::internal(format!("saga {id} vanished")))?;
        if settled(&rec) {
            return Ok(rec);
        }
        let next = async {
            loop {
                match changes.recv().await {
                    Ok(c) if c.saga_id == id => return,
                    Ok(_) => continue,
                    // Lagged: we may have missed ours; re-read. Closed: the host is stopping.
                    Err(_) => return,
                }
            }
        };
        let wake = (tokio::time::Instant::now() + poll).min(deadline);
        if tokio::time::timeout_at(wake, next).await.is_err() {
            if tokio::time::Instant::now() >= deadline {
                return state.store.saga(id).await?.ok_or_else(|| ApiError::internal(format!("saga {id} vanished")));
            }
            poll = (poll * 2).min(MAX_POLL);
        }
    }
}

/// Creates a saga under the request's idempotency key (SPEC §5.1).
async fn create(
    state: AppState,
    saga_type: &str,
    route: &str,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let key = idempotency::key(&headers, true)?.unwrap_or_default();
    let value = parse_body(body)?;
    let def = state.catalog.definition(saga_type).ok_or_else(|| {
        ApiError::not_found(format!(
            "no saga type '{saga_type}' is registered; register it with PUT /admin/sagas/{saga_type}"
        ))
    })?;
    if saga_type == "order" {
        order::parse(&value)?;
    } else if !value.is_object() {
        return Err(ApiError::invalid("", "the saga input must be a JSON object"));
    }
    let wait = prefer_wait(&headers);
    let now = state.clock.now_ms();
    let id = uuid::Uuid::now_v7().to_string();
    let saga_state = SagaState::new(&def, now);
    let input = value.to_string();
    let created = view(&id, &def, &input, &saga_state, now, now);
    let created_body = to_json(&created)?;
    let new = NewSaga {
        id: id.clone(),
        definition: (*def).clone(),
        input,
        event: crate::event::Envelope {
            saga_id: &id,
            saga_type: &def.saga_type,
            seq: 1,
            status: &saga_state.status,
            at: now,
        }
        .wrap(&EventSpec {
            event_type: format!("{}Created", def.event_prefix()),
            data: serde_json::json!({ "input": value }),
        }),
        state: saga_state,
        now,
    };
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
    match state.store.create_saga(&new, Some(&claim), now).await? {
        CreateOutcome::Created => {
            state.driver.wake();
            let loc = location(saga_type, &id);
            let Some(secs) = wait else {
                return Ok(json_response(StatusCode::CREATED, created_body, Some(&loc)));
            };
            let rec = wait_settled(&state, &id, secs).await?;
            let status = if settled(&rec) { StatusCode::OK } else { StatusCode::CREATED };
            let body = to_json(&record_view(&rec))?;
            state.store.complete_idempotency(&claim.caller, &claim.route, &claim.key, status.as_u16(), &body).await?;
            let mut r = json_response(status, body, Some(&loc));
            r.headers_mut()
                .insert("preference-applied", HeaderValue::from_str(&format!("wait={secs}")).expect("ascii"));
            Ok(r)
        }
        CreateOutcome::Replay { status, body, saga_id } => {
            replay(status, body, saga_id.map(|id| location(saga_type, &id)).as_deref())
        }
        CreateOutcome::InFlight => Err(idempotency::in_flight()),
        CreateOutcome::Mismatch => Err(idempotency::reused()),
        CreateOutcome::Abandoned { saga_id } => {
            // The first request created the saga, then died before answering. Answer now, from
            // the saga: never a second saga for one key.
            let rec = load(&state, saga_type, &saga_id).await?;
            let body = to_json(&record_view(&rec))?;
            state.store.complete_idempotency(&claim.caller, &claim.route, &claim.key, 201, &body).await?;
            Ok(json_response(StatusCode::CREATED, body, Some(&location(saga_type, &saga_id))))
        }
    }
}

async fn get_one(state: AppState, saga_type: &str, id: &str) -> Result<Response, ApiError> {
    let rec = load(&state, saga_type, id).await?;
    Ok(json_response(StatusCode::OK, to_json(&record_view(&rec))?, None))
}

async fn list(state: AppState, saga_type: &str, q: ListQuery) -> Result<Response, ApiError> {
    let limit = match q.limit.as_deref() {
        None => 20,
        Some(s) => s
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(|| ApiError::invalid("limit", "must be a whole number from 1 to 100"))?,
    };
    if let Some(status) = &q.status {
        if status.is_empty()
            || status.len() > 64
            || !status.bytes().all(|b| b.is_ascii_uppercase() || b == b'_' || b.is_ascii_digit())
        {
            return Err(ApiError::invalid("status", "must be a status label such as COMPLETED or CANCELLED"));
        }
    }
    if let Some(cursor) = &q.cursor {
        if uuid::Uuid::parse_str(cursor).is_err() {
            return Err(ApiError::invalid(
                "cursor",
                "is not a cursor this API returned; pass next_cursor from the previous page",
            ));
        }
    }
    let rows = state.store.list_sagas(saga_type, q.status.as_deref(), q.cursor.as_deref(), limit + 1).await?;
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

/// Applies an outside event (cancel, signal) to a saga: read, apply, commit fenced on the epoch
/// that was read, retrying if the driver committed in between. The commit takes the saga over
/// from a worker that may be mid-call; that worker's result is discarded.
/// An empty `saga_type` matches a saga of any type (operator routes address sagas by id).
pub(super) async fn apply_outside(
    state: &AppState,
    saga_type: &str,
    id: &str,
    event: Event,
    audit: Option<(&str, &str, Option<String>)>,
) -> Result<Result<SagaRecord, (engine::Error, SagaRecord)>, ApiError> {
    for _ in 0..10 {
        let mut rec = load(state, saga_type, id).await?;
        let now = state.clock.now_ms();
        let t = match engine::apply(&rec.definition, &rec.state, event.clone(), now) {
            Ok(t) => t,
            Err(e) => return Ok(Err((e, rec))),
        };
        let names: Vec<String> = rec.definition.steps.iter().map(|s| s.name.clone()).collect();
        let event = crate::event::Envelope {
            saga_id: id,
            saga_type: &rec.saga_type,
            seq: rec.seq + 1,
            status: &t.state.status,
            at: now,
        }
        .wrap(&t.event);
        let audit = audit.as_ref().map(|(actor, action, note)| AuditEntry {
            actor: (*actor).to_owned(),
            action: (*action).to_owned(),
            target: id.to_owned(),
            before: Some(serde_json::json!({ "status": rec.state.status })),
            after: Some(serde_json::json!({ "status": t.state.status })),
            note: note.clone(),
        });
        let commit = Commit {
            saga_id: id,
            fence: Fence::Takeover,
            read_seq: rec.seq,
            state: &t.state,
            step_names: &names,
            changed_steps: &t.changed_steps,
            plugin_writes: None,
            event: &event,
            now,
            audit: audit.as_ref(),
        };
        match state.store.commit(&commit).await {
            Ok(_) => {
                state.driver.wake();
                rec.state = t.state;
                rec.updated_at = now;
                return Ok(Ok(rec));
            }
            Err(crate::store::Error::Fenced) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict("busy", "the saga is changing rapidly; retry the request").with_retry_after(1))
}

/// Runs a mutating request that creates no saga under its optional `Idempotency-Key` (SPEC
/// §5.1): the first request runs and its response is stored; a retry with the same key and
/// body gets that response back (`Idempotent-Replayed: true`), one with another body 422, one
/// while the first runs 409. Validation must happen before: rejected requests are not stored.
/// A 5xx is not stored either, so a retry runs the request again.
pub(super) async fn idempotent<F, Fut>(
    state: &AppState,
    headers: &HeaderMap,
    route: String,
    body: &serde_json::Value,
    run: F,
) -> Result<Response, ApiError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Response, ApiError>>,
{
    let Some(key) = idempotency::key(headers, false)? else {
        return run().await;
    };
    let claim = IdempotencyClaim {
        caller: idempotency::caller(headers),
        fingerprint: idempotency::fingerprint(&route, body),
        route,
        key,
        lock_ms: 30_000,
        ttl_ms: state.config.idempotency_ttl.as_millis() as i64,
        response: None,
    };
    match state.store.claim_key(&claim, state.clock.now_ms()).await? {
        CreateOutcome::Created | CreateOutcome::Abandoned { .. } => {
            let response = run().await.unwrap_or_else(IntoResponse::into_response);
            if response.status().is_server_error() {
                state.store.release_key(&claim.caller, &claim.route, &claim.key).await?;
                return Ok(response);
            }
            let (parts, body) = response.into_parts();
            let bytes = axum::body::to_bytes(body, usize::MAX).await.map_err(ApiError::internal)?;
            state
                .store
                .complete_idempotency(&claim.caller, &claim.route, &claim.key, parts.status.as_u16(), &bytes)
                .await?;
            Ok(Response::from_parts(parts, axum::body::Body::from(bytes)))
        }
        CreateOutcome::Replay { status, body, .. } => replay(status, body, None),
        CreateOutcome::InFlight => Err(idempotency::in_flight()),
        CreateOutcome::Mismatch => Err(idempotency::reused()),
    }
}

async fn cancel(state: AppState, saga_type: &str, id: &str, headers: HeaderMap) -> Result<Response, ApiError> {
    let route = format!("POST {}/cancel", location(saga_type, id));
    idempotent(&state, &headers, route, &serde_json::Value::Null, || cancel_now(&state, saga_type, id)).await
}

async fn cancel_now(state: &AppState, saga_type: &str, id: &str) -> Result<Response, ApiError> {
    match apply_outside(state, saga_type, id, Event::Cancel { reason: "cancelled by client".to_owned() }, None).await? {
        Ok(rec) => Ok(json_response(StatusCode::ACCEPTED, to_json(&record_view(&rec))?, None)),
        // Cancelling is idempotent: a saga already compensating or cancelled stays so.
        Err((_, rec)) if matches!(rec.state.phase, Phase::Compensating | Phase::Cancelled) => {
            Ok(json_response(StatusCode::OK, to_json(&record_view(&rec))?, None))
        }
        Err((e, _)) => Err(ApiError::conflict("not_cancellable", format!("{e}; a completed saga is final"))),
    }
}

async fn signal(
    state: AppState,
    saga_type: &str,
    id: &str,
    name: &str,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let payload = parse_body(body)?;
    if name.is_empty() || name.len() > 128 {
        return Err(ApiError::invalid("name", "a signal name has 1 to 128 characters"));
    }
    let route = format!("POST {}/signals/{name}", location(saga_type, id));
    let event = Event::Signal { name: name.to_owned(), payload: payload.to_string() };
    idempotent(&state, &headers, route, &payload, || async {
        match apply_outside(&state, saga_type, id, event, None).await? {
            Ok(rec) => Ok(json_response(StatusCode::ACCEPTED, to_json(&record_view(&rec))?, None)),
            Err((e, _)) => Err(ApiError::conflict("not_waiting", format!("{e}; check the saga's steps[].waiting_for"))),
        }
    })
    .await
}

// ------------------------------------------------------------------------------------------
// Route handlers. Thin wrappers, one per route, so that each appears in the OpenAPI document.

/// Submit an order.
///
/// Starts an `order` saga. Requires `Idempotency-Key`. With `Prefer: wait=N` (N <= 30) the
/// response waits for the saga to settle: 200 with the final order, or 201 if N passed.
#[utoipa::path(post, path = "/orders", tag = "orders", request_body = OrderRequest,
    params(("Idempotency-Key" = String, Header, description = "Unique per request; reuse it on retries"),
           ("Prefer" = Option<String>, Header, description = "wait=N: wait up to N seconds for a final status")),
    responses(
        (status = 201, description = "Order accepted", body = SagaView),
        (status = 200, description = "Order settled within the Prefer wait", body = SagaView),
        (status = 400, description = "Invalid body or missing Idempotency-Key", body = ErrorBody),
        (status = 409, description = "The same key is still in flight", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 422, description = "The key was used with a different body", body = ErrorBody)))]
pub async fn create_order(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    create(state, "order", "POST /orders", headers, body).await
}

/// Get an order with its step history.
#[utoipa::path(get, path = "/orders/{id}", tag = "orders", params(("id" = String, Path)),
    responses((status = 200, body = SagaView), (status = 404, body = ErrorBody)))]
pub async fn get_order(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    get_one(state, "order", &id).await
}

/// List orders, newest first.
#[utoipa::path(get, path = "/orders", tag = "orders", params(ListQuery),
    responses((status = 200, body = SagaPage), (status = 400, body = ErrorBody)))]
pub async fn list_orders(State(state): State<AppState>, Query(q): Query<ListQuery>) -> Result<Response, ApiError> {
    list(state, "order", q).await
}

/// Cancel an order: compensates the steps done so far. 409 once COMPLETED.
#[utoipa::path(post, path = "/orders/{id}/cancel", tag = "orders", params(("id" = String, Path)),
    responses((status = 202, body = SagaView), (status = 200, description = "Already cancelling or cancelled", body = SagaView),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn cancel_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    cancel(state, "order", &id, headers).await
}

/// Send a named signal to an order's waiting step (e.g. `payment-confirmed`).
#[utoipa::path(post, path = "/orders/{id}/signals/{name}", tag = "orders", params(("id" = String, Path), ("name" = String, Path)),
    request_body = Object,
    responses((status = 202, body = SagaView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn signal_order(
    State(state): State<AppState>,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    signal(state, "order", &id, &name, headers, body).await
}

/// Start a saga of any registered type.
#[utoipa::path(post, path = "/sagas/{type}", tag = "sagas", params(("type" = String, Path),
        ("Idempotency-Key" = String, Header), ("Prefer" = Option<String>, Header)),
    request_body = Object,
    responses((status = 201, body = SagaView), (status = 200, body = SagaView), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_saga(
    State(state): State<AppState>,
    Path(saga_type): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let route = format!("POST /sagas/{saga_type}");
    create(state, &saga_type, &route, headers, body).await
}

/// Get a saga.
#[utoipa::path(get, path = "/sagas/{type}/{id}", tag = "sagas", params(("type" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = SagaView), (status = 404, body = ErrorBody)))]
pub async fn get_saga(
    State(state): State<AppState>,
    Path((saga_type, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    get_one(state, &saga_type, &id).await
}

/// List sagas of a type, newest first.
#[utoipa::path(get, path = "/sagas/{type}", tag = "sagas", params(("type" = String, Path), ListQuery),
    responses((status = 200, body = SagaPage), (status = 400, body = ErrorBody)))]
pub async fn list_sagas(
    State(state): State<AppState>,
    Path(saga_type): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    list(state, &saga_type, q).await
}

/// Cancel a saga.
#[utoipa::path(post, path = "/sagas/{type}/{id}/cancel", tag = "sagas", params(("type" = String, Path), ("id" = String, Path)),
    responses((status = 202, body = SagaView), (status = 200, body = SagaView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn cancel_saga(
    State(state): State<AppState>,
    Path((saga_type, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    cancel(state, &saga_type, &id, headers).await
}

/// Send a named signal to a saga's waiting step.
#[utoipa::path(post, path = "/sagas/{type}/{id}/signals/{name}", tag = "sagas",
    params(("type" = String, Path), ("id" = String, Path), ("name" = String, Path)), request_body = Object,
    responses((status = 202, body = SagaView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn signal_saga(
    State(state): State<AppState>,
    Path((saga_type, id, name)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    signal(state, &saga_type, &id, &name, headers, body).await
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
