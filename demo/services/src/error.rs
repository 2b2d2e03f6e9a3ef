//! The one error type of the HTTP layer and its mapping to responses.
//!
//! An `ApiError` is an answer that is *not* a business outcome: a malformed request, an unknown
//! route or record, a reused key, an injected outage or an internal failure. None of them is
//! ever stored in the idempotency table (business refusals such as "out of stock" are stored
//! answers, see `idempotency::Answer`). Internal causes are logged and never sent to the client.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

/// An error answer: `{"error": "<message>"}` with the status of its variant.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request cannot be understood (bad JSON, a missing field, no key).
    #[error("{0}")]
    BadRequest(String),
    /// 401: the payment service's API key is missing or wrong (`--payment-api-key-file`).
    #[error("{0}")]
    Unauthorized(String),
    /// 404: no such route or record.
    #[error("{0}")]
    NotFound(String),
    /// 405: the route exists but not with this method.
    #[error("method not allowed; see the service's README for the routes")]
    MethodNotAllowed,
    /// 409: the record is in a state that refuses this action.
    #[error("{0}")]
    Conflict(String),
    /// 422: the idempotency key was first used with another request.
    #[error("Idempotency-Key reused with a different request")]
    KeyReused,
    /// 503: an injected or shutdown-related outage; the client should retry with the same key.
    #[error("{0}")]
    Unavailable(String),
    /// 500: a database or other internal failure; logged, not shown.
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Internal(e.into())
    }
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(cause) = &self {
            tracing::error!(error = format!("{cause:#}"), "request failed");
        }
        let body = serde_json::json!({ "error": self.to_string() });
        (self.status(), [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
    }
}

/// Parses a JSON request body into `T`, mapping every failure to a 400 that names the problem.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// Fails with 400 when a required string field is empty.
pub fn non_empty(field: &str, value: &str) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::BadRequest(format!("field `{field}` must not be empty")));
    }
    Ok(())
}
