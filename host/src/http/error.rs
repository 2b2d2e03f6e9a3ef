//! `ApiError`: the one place where failures become HTTP responses.
//!
//! Every error body is `{"error": {"code": "...", "message": "..."}}` (plus `field` for
//! validation errors), with a message that says what to do next. Internal causes are logged
//! here and never returned to the client.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    pub retry_after: Option<u64>,
    /// The answer may change if the request is sent again later (the saga is busy, or not
    /// waiting for that signal yet): it is never stored under an idempotency key.
    pub provisional: bool,
}

/// Marks a response that is not final (see [`ApiError::provisional`]), so that
/// idempotency storage can tell it from a final answer.
#[derive(Debug, Clone, Copy)]
pub struct Provisional;

/// The JSON body of every error.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong and what to do about it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable, machine-readable code, e.g. `invalid_request`.
    pub code: String,
    /// A human-readable message that says what to do next.
    pub message: String,
    /// The offending request field, for validation errors, e.g. `items[0].quantity`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), field: None, retry_after: None, provisional: false }
    }

    /// 400 naming the field.
    pub fn invalid(field: impl Into<String>, message: impl std::fmt::Display) -> ApiError {
        let field = field.into();
        let message = if field.is_empty() { message.to_string() } else { format!("{field}: {message}") };
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            message,
            field: Some(field).filter(|f| !f.is_empty()),
            retry_after: None,
            provisional: false,
        }
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, code, message)
    }

    /// Says when to retry; an answer that asks for a retry is provisional.
    pub fn with_retry_after(mut self, seconds: u64) -> ApiError {
        self.retry_after = Some(seconds);
        self.provisional = true;
        self
    }

    /// An answer that a later retry may not get (see [`Provisional`]).
    pub fn provisional(mut self) -> ApiError {
        self.provisional = true;
        self
    }

    /// A failure the client cannot fix: log the cause, say only that it happened.
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the server failed to handle the request; retry with the same Idempotency-Key, it is safe",
        )
    }

    /// The store is unavailable for a moment.
    pub fn unavailable(cause: impl std::fmt::Display) -> ApiError {
        tracing::warn!(error = %cause, "store unavailable");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the database is busy or unreachable; retry shortly with the same Idempotency-Key",
        )
        .with_retry_after(1)
    }
}

impl From<crate::store::Error> for ApiError {
    fn from(e: crate::store::Error) -> ApiError {
        if e.is_transient() {
            ApiError::unavailable(e)
        } else if e.is_refused_data() {
            // The database refuses a value of this request itself (a NUL in text, a value past
            // a column's range): the same request fails the same way every time, so it is the
            // client's to change, not a 500 that invites the same retry.
            tracing::warn!(error = %e, "the database refused a request's data");
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "refused_data",
                format!("the database cannot store a value of this request ({e}); nothing was changed"),
            )
        } else {
            ApiError::internal(e)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            ErrorBody { error: ErrorDetail { code: self.code.to_owned(), message: self.message, field: self.field } };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.provisional {
            response.extensions_mut().insert(Provisional);
        }
        response
    }
}

/// Maps axum's body-reading failures (too large, unreadable) to our error shape.
pub fn body_rejection(rejection: axum::extract::rejection::BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the request body is larger than the limit for this route; send a smaller body",
        )
    } else {
        ApiError::new(
            rejection.status(),
            "unreadable_body",
            format!("the request body could not be read: {}", rejection.body_text()),
        )
    }
}

/// Maps axum's query-string failures (a bound that is not a number, a repeated parameter) to
/// our error shape, so that every 400 is JSON.
pub fn query<T>(
    query: Result<axum::extract::Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    query.map(|q| q.0).map_err(|e| {
        let text = e.body_text();
        let detail = text.strip_prefix("Failed to deserialize query string: ").unwrap_or(&text);
        let field = detail.split_once(':').map(|(f, _)| f.trim()).filter(|f| !f.is_empty() && !f.contains(' '));
        let mut error = ApiError::invalid("", format!("the query string is not valid ({detail}); see /openapi.json"));
        error.field = field.map(str::to_owned);
        error
    })
}

/// axum's `Path` with its failures in the API's error shape: a segment that is not UTF-8
/// names no resource, so it is a 404 like any id or name nothing has (axum's own answer is a
/// plain-text 400).
pub struct ApiPath<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(ApiPath(value)),
            Err(e) => Err(ApiError::not_found(format!("no such resource ({}); see /openapi.json", e.body_text()))),
        }
    }
}
