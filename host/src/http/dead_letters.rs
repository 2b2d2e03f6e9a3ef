//! `GET /admin/dead-letters`: events the sink refused for good (SPEC §6 delivery, issue
//! "one oversized event must not stop every saga's events"). Read-only: the store keeps them,
//! the relay puts them there.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::sagas::{json_response, to_json};
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
/// a gap in that saga's `seq` where this event is.
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
