//! `/admin/dead-letters`: events the sink refused for good (SPEC §6 delivery, issue "one
//! oversized event must not stop every saga's events"). The relay puts them there; an
//! operator lists them, sends one again once the sink takes it (the broker's size limit
//! raised, say), or discards one that consumers will never need; both audited.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::admin::{audit, ActorHeader};
use super::error::{ApiError, ApiPath, ErrorBody};
use super::openapi::OptionalKey;
use super::sagas::{answered_in_commit, idempotent, json_response, to_json};
use super::AppState;

/// Query of the dead-letter listing.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterQuery {
    /// At most this many entries (1-500, default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page: the dead letters older than it.
    #[param(minimum = 0)]
    pub cursor: Option<i64>,
}

/// An event the sink refused for good. Its saga's later events were published: consumers see
/// a gap in that saga's `seq` where this event is (filled out of order if it is redelivered).
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterView {
    pub saga_id: String,
    pub seq: i64,
    pub event_id: String,
    pub event_type: String,
    /// Why the sink refused it.
    pub reason: String,
    /// When it was moved here (RFC 3339).
    pub at: String,
    /// The size of the event JSON, in bytes.
    pub size: usize,
    /// The event JSON as it would have been published.
    #[schema(value_type = Object)]
    pub event: serde_json::Value,
}

/// A page of dead letters, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterPage {
    pub data: Vec<DeadLetterView>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<i64>,
}

/// Events the sink refused for good (too large for the broker, say), newest first.
#[utoipa::path(get, path = "/admin/dead-letters", tag = "admin", params(DeadLetterQuery),
    security(("admin_token" = [])),
    responses((status = 200, description = "Dead letters, newest first", body = DeadLetterPage),
              (status = 400, description = "A query parameter is out of bounds", body = ErrorBody)))]
pub async fn list_dead_letters(
    State(state): State<AppState>,
    q: Result<Query<DeadLetterQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = super::error::query(q)?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid("limit", "must be from 1 to 500"));
    }
    if q.cursor.is_some_and(|c| c < 0) {
        return Err(ApiError::invalid(
            "cursor",
            "is not a cursor this API returned; pass next_cursor from the previous page",
        ));
    }
    // One more than the page: whether there is a next one.
    let mut letters = state.store.dead_letters(q.cursor, limit + 1).await?;
    let more = letters.len() > limit as usize;
    letters.truncate(limit as usize);
    let next_cursor = if more { letters.last().map(|d| d.outbox_id) } else { None };
    let data = letters
        .into_iter()
        .map(|d| DeadLetterView {
            size: d.payload.len(),
            event: serde_json::from_str(&d.payload).unwrap_or(serde_json::Value::Null),
            saga_id: d.saga_id,
            seq: d.seq,
            event_id: d.event_id,
            event_type: d.event_type,
            reason: d.reason,
            at: crate::clock::rfc3339(d.at),
        })
        .collect();
    Ok(json_response(StatusCode::OK, to_json(&DeadLetterPage { data, next_cursor })?, None))
}

/// The event id of a dead-letter route, checked: a UUID, as every event id is.
fn event_id(id: &str) -> Result<String, ApiError> {
    uuid::Uuid::parse_str(id)
        .map(|u| u.to_string())
        .map_err(|_| ApiError::invalid("event_id", "is not an event id; take `event_id` from GET /admin/dead-letters"))
}

/// The dead letter of `event_id` and the audit entry of `action` on it, or 404.
async fn letter_and_audit(
    state: &AppState,
    headers: &HeaderMap,
    event_id: &str,
    action: &str,
) -> Result<crate::store::AuditEntry, ApiError> {
    let letter = state.store.dead_letter(event_id).await?.ok_or_else(|| gone(event_id))?;
    let before = serde_json::json!({
        "saga_id": letter.saga_id,
        "seq": letter.seq,
        "event_type": letter.event_type,
        "reason": letter.reason,
        "at": crate::clock::rfc3339(letter.at),
    });
    Ok(audit(headers, action, event_id, Some(before), None))
}

fn gone(event_id: &str) -> ApiError {
    ApiError::not_found(format!(
        "no dead letter for event {event_id}; it may have been redelivered or discarded already \
         (GET /admin/audit?target={event_id} says)"
    ))
}

/// What a redelivery did.
#[derive(Debug, Serialize, ToSchema)]
pub struct Redelivered {
    pub event_id: String,
    /// Always true: the event is back in the outbox, and the relay sends it (with its next
    /// batch, or after the events pending then where its row had been purged).
    pub queued: bool,
}

/// Send a dead-lettered event again (once the sink takes it: the broker's size limit raised,
/// say); audited.
///
/// The event goes back into the outbox as it was (same `event_id`, `saga_id` and `seq`) and
/// leaves the dead letters; the relay publishes it next, after its saga's later events, so
/// consumers see the gap in `seq` filled out of order. A sink that refuses it again puts it
/// back in the dead letters.
#[utoipa::path(post, path = "/admin/dead-letters/{event_id}/redeliver", tag = "admin",
    params(("event_id" = String, Path, description = "The event's id (`event_id` of the listing), a UUID", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"), ActorHeader, OptionalKey),
    security(("admin_token" = [])),
    responses((status = 202, description = "Back in the outbox; the relay sends it", body = Redelivered),
              (status = 400, description = "Not an event id, or a malformed Idempotency-Key", body = ErrorBody),
              (status = 404, description = "No dead letter for this event (redelivered or discarded already?)", body = ErrorBody),
              (status = 409, description = "A request with this key is still in flight", body = ErrorBody,
               headers(("Retry-After" = u64, description = "Seconds to wait before retrying")))))]
pub async fn redeliver_dead_letter(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = event_id(&id)?;
    let route = format!("POST /admin/dead-letters/{id}/redeliver");
    let (state, headers, id) = (&state, &headers, &id);
    idempotent(state, headers, route, &serde_json::Value::Null, |key| async move {
        let answer = to_json(&Redelivered { event_id: id.clone(), queued: true })?;
        let mut audit = letter_and_audit(state, headers, id, "dead_letter.redeliver").await?;
        // Stored with the change: a retry after a lost answer replays it (SPEC §5.1) instead
        // of finding the letter gone.
        audit.answer = key.as_ref().map(|k| k.answer(StatusCode::ACCEPTED, &answer));
        if !state.store.dead_letter_redeliver(id, state.clock.now_ms(), &audit).await? {
            return Err(gone(id));
        }
        tracing::info!(event_id = %id, actor = %audit.actor, "dead letter redelivered");
        Ok(answered_in_commit(json_response(StatusCode::ACCEPTED, answer, None), key.as_ref()))
    })
    .await
}

/// Delete a dead letter for good (consumers will never need the event); audited, with the
/// event's saga, `seq`, type and the sink's reason.
#[utoipa::path(delete, path = "/admin/dead-letters/{event_id}", tag = "admin",
    params(("event_id" = String, Path, description = "The event's id (`event_id` of the listing), a UUID", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"), ActorHeader, OptionalKey),
    security(("admin_token" = [])),
    responses((status = 204, description = "Deleted"),
              (status = 400, description = "Not an event id, or a malformed Idempotency-Key", body = ErrorBody),
              (status = 404, description = "No dead letter for this event (redelivered or discarded already?)", body = ErrorBody),
              (status = 409, description = "A request with this key is still in flight", body = ErrorBody,
               headers(("Retry-After" = u64, description = "Seconds to wait before retrying")))))]
pub async fn discard_dead_letter(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = event_id(&id)?;
    let route = format!("DELETE /admin/dead-letters/{id}");
    let (state, headers, id) = (&state, &headers, &id);
    idempotent(state, headers, route, &serde_json::Value::Null, |key| async move {
        let mut audit = letter_and_audit(state, headers, id, "dead_letter.discard").await?;
        audit.answer = key.as_ref().map(|k| k.answer(StatusCode::NO_CONTENT, &[]));
        if !state.store.dead_letter_discard(id, state.clock.now_ms(), &audit).await? {
            return Err(gone(id));
        }
        tracing::info!(event_id = %id, actor = %audit.actor, "dead letter discarded");
        Ok(answered_in_commit(StatusCode::NO_CONTENT.into_response(), key.as_ref()))
    })
    .await
}
