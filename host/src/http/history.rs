//! `GET /sagas/{type}/{id}/events`: one saga's history, the events of its transitions in `seq`
//! order, exactly as they were published (SPEC §6). The web console draws its timeline from
//! them; operators read them to see every attempt, wait, signal and compensation.
//!
//! Read-only, and it decides nothing: the events are the outbox rows the saga service wrote
//! with each transition, so the history needs no table of its own.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ApiPath, ErrorBody};
use super::sagas::{json_response, not_found, page_limit, saga_id};
use super::AppState;

/// One event of a saga (SPEC §6), as published to Kafka or `events.jsonl`.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventView {
    /// Unique per event (a UUIDv7): consumers drop repeats by it.
    pub event_id: String,
    pub saga_id: String,
    pub saga_type: String,
    /// 1 for the saga's first event, no gaps.
    pub seq: i64,
    /// e.g. `OrderCreated`, `StepStarted` (an attempt that may call another service is about
    /// to), `PaymentCharged`, `StepRetryScheduled`, `StepWaiting`, `SignalReceived`,
    /// `OrderCompensating`, `StepCompensated`, `OrderCancelled`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The saga's status after the transition.
    pub status: String,
    /// Commit time, RFC 3339.
    pub at: String,
    /// What the transition says: the step, attempt, output, error, signal, wait or reason.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

/// A page of a saga's events, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventList {
    /// In `seq` order. Published events are deleted after the outbox retention
    /// (`--outbox-retention-hours`): when the first `seq` is above 1, the older ones are gone.
    pub data: Vec<EventView>,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// The most events one page holds, and the default.
pub const MAX_EVENTS_PAGE: u32 = 1000;

/// Query of the events route.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Page size, 1 to 1000 (default 1000).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page: the events after it.
    #[param(pattern = "^[0-9]{1,18}$")]
    pub cursor: Option<String>,
}

/// A saga's history: the event of every transition, oldest first.
///
/// Every attempt that failed retryably (`StepRetryScheduled`), every wait (`StepWaiting`), signal,
/// compensation and operator action is one event. Events older than the outbox retention may
/// have been deleted once published. Paged: at most `limit` events (1000) per answer, then
/// `next_cursor`.
#[utoipa::path(get, path = "/sagas/{type}/{id}/events", tag = "sagas", params(
           ("type" = String, Path, description = "A saga type name: 1-64 lowercase letters, digits, `-` or `_`, starting with a letter", pattern = "^[a-z][a-z0-9_-]{0,63}$"),
           ("id" = String, Path, description = "The saga id, a UUID", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"),
           EventsQuery),
    responses((status = 200, description = "The saga's events, oldest first", body = EventList),
              (status = 400, description = "A bad `limit` or `cursor`", body = ErrorBody),
              (status = 404, description = "No saga of this type with this id", body = ErrorBody)))]
pub async fn saga_events(
    State(state): State<AppState>,
    ApiPath((saga_type, id)): ApiPath<(String, String)>,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = saga_id(Some(&saga_type), &id)?;
    let q = super::error::query(q)?;
    let limit = page_limit(q.limit.as_deref(), MAX_EVENTS_PAGE, MAX_EVENTS_PAGE)?;
    let after = match q.cursor.as_deref() {
        None => 0,
        Some(s) => {
            s.parse::<i64>().ok().filter(|n| *n >= 0 && s.bytes().all(|b| b.is_ascii_digit())).ok_or_else(|| {
                ApiError::invalid(
                    "cursor",
                    "is not a cursor this API returned; pass next_cursor from the previous page",
                )
            })?
        }
    };
    // One indexed read (outbox's unique (saga_id, seq)); the saga row is read only when there
    // are no events to say which type the saga is (its events all purged, past the cursor, or
    // no saga at all).
    let rows = state.store.outbox_page(&id, after, limit).await?;
    match rows.first() {
        Some(first) => {
            let first: serde_json::Value = serde_json::from_str(&first.payload).map_err(ApiError::internal)?;
            if first["saga_type"] != saga_type.as_str() {
                return Err(not_found(Some(&saga_type), &id));
            }
        }
        None => {
            if state.sagas.get(Some(&saga_type), &id).await?.is_none() {
                return Err(not_found(Some(&saga_type), &id));
            }
        }
    }
    // The payloads are the event JSON as published: written out as they are, not re-encoded.
    let mut body = Vec::with_capacity(16 + rows.iter().map(|r| r.payload.len() + 1).sum::<usize>());
    body.extend_from_slice(b"{\"data\":[");
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(row.payload.as_bytes());
    }
    body.extend_from_slice(b"],\"next_cursor\":");
    match rows.last().filter(|_| rows.len() as u32 == limit) {
        // A full page: there may be more (an empty last page, if not).
        Some(last) => body.extend_from_slice(format!("\"{}\"", last.seq).as_bytes()),
        None => body.extend_from_slice(b"null"),
    }
    body.push(b'}');
    Ok(json_response(StatusCode::OK, body, None))
}
