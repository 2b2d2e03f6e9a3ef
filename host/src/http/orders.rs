//! The `order` saga's own routes (`/orders`, SPEC §3): thin wrappers over the generic saga
//! handlers of `sagas.rs`, each its own route so that each appears in the OpenAPI document
//! with the order's request shape. The generic host names no saga type; this module is where
//! the built-in `order` type meets HTTP.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;

use super::error::{ApiError, ApiPath, ErrorBody};
use super::openapi::{OptionalKey, RequiredKey};
use super::sagas::{cancel, create, get_one, list, signal, ListQuery, SagaPage, SagaView};
use super::AppState;
use crate::builtin::order::{self, OrderRequest};

/// The OpenAPI links from a created order to what can be done with it (see
/// [`super::openapi::links`]): (operation, whether it also takes the saga type).
pub const LINKS: (&str, [(&str, bool); 3]) =
    ("/orders", [("get_order", false), ("cancel_order", false), ("signal_order", false)]);

/// Submit an order.
///
/// Starts an `order` saga. Requires `Idempotency-Key`. With `Prefer: wait=N` (N <= 30) the
/// response waits for the saga to settle: 200 with the final order, or 201 if N passed.
#[utoipa::path(post, path = "/orders", tag = "orders", request_body = OrderRequest,
    params(RequiredKey,
           ("Prefer" = Option<String>, Header, description = "wait=N: wait up to N seconds (at most 30) for a final status; other preferences are ignored")),
    responses(
        (status = 201, description = "Order accepted", body = SagaView, headers(("Location" = String, description = "/orders/{id}"))),
        (status = 200, description = "Order COMPLETED or CANCELLED within the Prefer wait", body = SagaView, headers(("Location" = String))),
        (status = 400, description = "Invalid body (the error names the field) or a missing or malformed Idempotency-Key", body = ErrorBody),
        (status = 409, description = "A request with this key is still in flight", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
        (status = 422, description = "The key was used with a different body", body = ErrorBody)))]
pub async fn create_order(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    create(state, order::SAGA_TYPE, "POST /orders", headers, body).await
}

/// Get an order with its step history.
#[utoipa::path(get, path = "/orders/{id}", tag = "orders", params(
           ("id" = String, Path, description = "The saga id, a UUID", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")),
    responses((status = 200, body = SagaView), (status = 404, description = "No order with this id", body = ErrorBody)))]
pub async fn get_order(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    get_one(state, order::SAGA_TYPE, &id).await
}

/// List orders, newest first.
#[utoipa::path(get, path = "/orders", tag = "orders", params(ListQuery),
    responses((status = 200, body = SagaPage),
              (status = 400, description = "A query parameter is out of bounds or unknown, or a status no order has or can reach", body = ErrorBody)))]
pub async fn list_orders(
    State(state): State<AppState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    list(state, order::SAGA_TYPE, super::error::query(q)?).await
}

/// Cancel an order: compensates the steps done so far. 409 once COMPLETED.
#[utoipa::path(post, path = "/orders/{id}/cancel", tag = "orders", params(
           ("id" = String, Path, description = "The saga id, a UUID", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"), OptionalKey),
    responses((status = 202, description = "Cancelling", body = SagaView),
              (status = 200, description = "Already compensating (or stuck in COMPENSATION_FAILED) or cancelled", body = SagaView),
              (status = 400, description = "A malformed Idempotency-Key", body = ErrorBody),
              (status = 404, description = "No order with this id", body = ErrorBody),
              (status = 409, description = "Completed (final), busy, or the key is in flight", body = ErrorBody,
               headers(("Retry-After" = u64, description = "Present when a retry may succeed"))),
              (status = 422, description = "The key was used with another request", body = ErrorBody)))]
pub async fn cancel_order(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    cancel(state, order::SAGA_TYPE, &id, headers).await
}

/// Send a named signal to an order's waiting step (e.g. `payment-confirmed`).
///
/// The body is any JSON value; the waiting step receives it.
#[utoipa::path(post, path = "/orders/{id}/signals/{name}", tag = "orders", params(
           ("id" = String, Path, description = "The saga id, a UUID", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"), 
           ("name" = String, Path, description = "The signal name: 1 to 128 characters, no control characters", min_length = 1, max_length = 128, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$"), OptionalKey),
    request_body(content = serde_json::Value, description = "Any JSON value: the signal's payload"),
    responses((status = 202, description = "Delivered", body = SagaView),
              (status = 400, description = "The body is not JSON, or a malformed Idempotency-Key", body = ErrorBody),
              (status = 404, description = "No order with this id", body = ErrorBody),
              (status = 409, description = "No step waits for this signal (yet), the step is past its deadline (`deadline_passed`, final), the saga is busy, or the key is in flight", body = ErrorBody,
               headers(("Retry-After" = u64, description = "Present when a retry may succeed"))),
              (status = 422, description = "The key was used with another request", body = ErrorBody)))]
pub async fn signal_order(
    State(state): State<AppState>,
    ApiPath((id, name)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    signal(state, order::SAGA_TYPE, &id, &name, headers, body).await
}
