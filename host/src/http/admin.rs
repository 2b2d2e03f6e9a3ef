//! Admin routes: bearer-token authentication, operator actions on stuck sagas (SPEC §5.4),
//! and the audit trail.
//!
//! Without a configured admin token every admin route answers 403: admin is off, not open.
//! The token is compared in constant time (over SHA-256 digests, so length leaks nothing).

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ApiPath, ErrorBody};
use super::openapi::OptionalKey;
use super::sagas::{accepted, idempotent, json_response, outside_error, to_json, RequestKey, SagaView};
use super::AppState;
use crate::engine::Event;
use crate::saga::Actor;
use crate::store::AuditEntry;

/// Constant-time equality of two secrets.
fn secret_eq(a: &str, b: &str) -> bool {
    let (da, db) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    da.iter().zip(db.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Middleware guarding every `/admin` route.
pub async fn require_admin(State(state): State<AppState>, req: Request, next: Next) -> Result<Response, ApiError> {
    let Some(expected) = state.config.admin_token.as_deref() else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "admin routes are off; start sagahost with --admin-token (or SAGAHOST_ADMIN_TOKEN) to enable them",
        ));
    };
    match bearer(req.headers()) {
        Some(token) if secret_eq(token, expected) => Ok(next.run(req).await),
        _ => Ok(unauthorized("admin routes need the header Authorization: Bearer <admin token>")),
    }
}

/// Middleware guarding the client routes (`/orders`, `/sagas`) when API tokens are
/// configured (`--api-token`, SPEC §8): any one of them opens them. Without tokens they are
/// open. Idempotency keys are scoped per credential (`idempotency::caller`).
pub async fn require_client(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let tokens = &state.config.api_tokens;
    if tokens.is_empty() {
        return next.run(req).await;
    }
    match bearer(req.headers()) {
        // Compare with every token, so the time taken does not tell which one matched.
        Some(token) if tokens.iter().fold(false, |ok, t| secret_eq(token, t) | ok) => next.run(req).await,
        _ => unauthorized("this route needs the header Authorization: Bearer <API token>"),
    }
}

/// The bearer token of a request, if it presents one.
pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme is case-insensitive (RFC 9110 §11.1).
        .and_then(|v| v.split_once(' ').filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer")))
        .map(|(_, token)| token.trim())
}

/// 401 with `WWW-Authenticate: Bearer`.
fn unauthorized(message: &'static str) -> Response {
    let mut r = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// Who performed an admin action: the `X-Actor` header if given (an operator's name), else
/// `admin`. The token proves the right to act; the header says who, for the audit trail.
/// The header's bytes are read as UTF-8 (as the CLI and the console send it), so `Zoë` is
/// recorded as `Zoë`; bytes that are not UTF-8 show as U+FFFD rather than hiding who acted.
pub(super) fn actor(headers: &HeaderMap) -> String {
    headers
        .get("x-actor")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().chars().filter(|c| !c.is_control()).take(128).collect())
        .filter(|s: &String| !s.is_empty())
        .unwrap_or_else(|| "admin".to_owned())
}

/// The audit entry of an admin change made by the request with `headers` (its actor).
pub(super) fn audit(
    headers: &HeaderMap,
    action: &str,
    target: &str,
    before: Option<serde_json::Value>,
    after: Option<serde_json::Value>,
) -> AuditEntry {
    AuditEntry {
        actor: actor(headers),
        action: action.to_owned(),
        target: target.to_owned(),
        before,
        after,
        note: None,
        answer: None,
    }
}

/// Body of a retry (optional, as is its note).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OperatorNote {
    /// Why the operator acts; kept in the audit trail. Tabs and line breaks are the only
    /// control characters it may hold.
    #[schema(max_length = 2000, pattern = "^[^\\u0000-\\u0008\\u000B\\u000C\\u000E-\\u001F\\u007F-\\u009F]*$")]
    pub note: Option<String>,
}

/// Body of a resolve: what was done by hand.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveNote {
    /// What was done by hand (not white space only); kept in the audit trail. Tabs and line
    /// breaks are the only control characters it may hold.
    #[schema(
        min_length = 1,
        max_length = 2000,
        pattern = "^[^\\u0000-\\u0008\\u000B\\u000C\\u000E-\\u001F\\u007F-\\u009F]*[^\\s\\u0000-\\u001F\\u007F-\\u009F][^\\u0000-\\u0008\\u000B\\u000C\\u000E-\\u001F\\u007F-\\u009F]*$",
        example = "refunded in the PSP console"
    )]
    pub note: String,
}

/// The note of an operator action. No body, an empty one, and JSON `null` all mean no note.
fn parse_note(body: Result<Bytes, BytesRejection>) -> Result<OperatorNote, ApiError> {
    let body = body.map_err(super::error::body_rejection)?;
    if body.is_empty() {
        return Ok(OperatorNote::default());
    }
    let note: Option<OperatorNote> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid("", format!("expected {{\"note\": \"...\"}}: {e}")))?;
    let note = note.unwrap_or_default();
    if let Some(n) = &note.note {
        if n.chars().count() > 2000 {
            return Err(ApiError::invalid("note", "must be at most 2000 characters"));
        }
        // PostgreSQL's text holds no NUL (the audit row would fail, a 500 on every retry), and
        // no other control character belongs in a note an operator reads back in a console.
        if n.chars().any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r')) {
            return Err(ApiError::invalid(
                "note",
                "must not contain control characters other than tabs and line breaks",
            ));
        }
    }
    Ok(note)
}

async fn operate(
    state: AppState,
    id: &str,
    headers: HeaderMap,
    event: Event,
    action: &str,
    note: Option<String>,
) -> Result<Response, ApiError> {
    let id = &super::sagas::saga_id(None, id)?;
    let route = format!("POST /admin/sagas/{id}/{}", action.trim_start_matches("saga."));
    let body = serde_json::json!({ "note": note });
    idempotent(&state, &headers, route, &body, |key| operate_now(&state, id, &headers, event, action, note, key)).await
}

async fn operate_now(
    state: &AppState,
    id: &str,
    headers: &HeaderMap,
    event: Event,
    action: &str,
    note: Option<String>,
    key: Option<RequestKey>,
) -> Result<Response, ApiError> {
    let who = Actor { name: actor(headers), action: action.to_owned(), note };
    let answer = key.as_ref().map(RequestKey::accepted);
    match state.sagas.apply(None, id, event, Some(&who), answer.as_ref()).await {
        Ok(rec) => {
            tracing::info!(saga_id = %id, actor = %who.name, action, status = %rec.state.status, "operator action");
            accepted(&rec, key.as_ref())
        }
        Err(e) => Err(outside_error(None, id, e, |e, rec| {
            let refused = ApiError::conflict("not_stuck", e.to_string());
            // A saga still under way may yet get stuck: a retry with the key decides again.
            if rec.state.phase.is_terminal() {
                refused
            } else {
                refused.provisional()
            }
        })),
    }
}

/// Re-run the compensation of a COMPENSATION_FAILED saga (after a fix is bound).
///
/// Compensations restart with a fresh budget and use the compensate bindings in force now.
#[utoipa::path(post, path = "/admin/sagas/{id}/retry", tag = "admin", params(
           ("id" = String, Path, description = "The saga id, a UUID", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"), OptionalKey, ActorHeader),
    request_body(content = Option<OperatorNote>, description = "Optional: no body, `null` or `{\"note\": ...}`"),
    responses((status = 202, description = "Compensation restarts", body = SagaView),
              (status = 400, description = "The body is not a note, or a malformed Idempotency-Key", body = ErrorBody),
              (status = 404, description = "No saga with this id", body = ErrorBody),
              (status = 409, description = "Not in COMPENSATION_FAILED, busy, or the key is in flight", body = ErrorBody,
               headers(("Retry-After" = u64, description = "Present when a retry may succeed"))),
              (status = 422, description = "The key was used with another request", body = ErrorBody)))]
pub async fn retry_saga(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let note = parse_note(body)?;
    operate(state, &id, headers, Event::RetryCompensation, "saga.retry", note.note).await
}

/// Mark a COMPENSATION_FAILED saga as resolved by hand (it ends CANCELLED); audited.
#[utoipa::path(post, path = "/admin/sagas/{id}/resolve", tag = "admin", params(
           ("id" = String, Path, description = "The saga id, a UUID", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"), OptionalKey, ActorHeader),
    request_body = ResolveNote,
    responses((status = 202, description = "Resolved: the saga ends CANCELLED", body = SagaView),
              (status = 400, description = "No note, a blank one, or a malformed Idempotency-Key", body = ErrorBody),
              (status = 404, description = "No saga with this id", body = ErrorBody),
              (status = 409, description = "Not in COMPENSATION_FAILED, busy, or the key is in flight", body = ErrorBody,
               headers(("Retry-After" = u64, description = "Present when a retry may succeed"))),
              (status = 422, description = "The key was used with another request", body = ErrorBody)))]
pub async fn resolve_saga(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let note = parse_note(body)?.note.filter(|n| !crate::builtin::is_blank(n));
    let Some(note) = note else {
        return Err(ApiError::invalid(
            "note",
            "say what was done by hand, e.g. {\"note\": \"refunded in the PSP console\"}",
        ));
    };
    operate(state, &id, headers, Event::Resolve { note: note.clone() }, "saga.resolve", Some(note)).await
}

/// The `X-Actor` header of admin actions.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct ActorHeader {
    /// Who acts, for the audit trail (at most 128 characters are kept; default `admin`).
    #[param(rename = "X-Actor")]
    pub actor: Option<String>,
}

/// Query of the audit trail.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only entries about this saga id, plugin digest, plugin, binding, saga type or event id.
    #[param(max_length = 256, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$")]
    pub target: Option<String>,
    /// At most this many entries (1-500, default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page: the entries older than it.
    #[param(minimum = 1)]
    pub cursor: Option<i64>,
}

/// An entry of the audit trail.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct AuditEntryView {
    pub id: i64,
    /// When, RFC 3339.
    pub at: String,
    /// `X-Actor` of the request, or `admin`.
    pub actor: String,
    /// e.g. `saga.retry`, `saga.resolve`, `plugin.upload`, `binding.change`, `saga.define`.
    pub action: String,
    /// The saga id, plugin digest, binding or saga type the action applies to.
    pub target: String,
    /// The state before the change, where there was one.
    pub before: Option<serde_json::Value>,
    /// The state after the change.
    pub after: Option<serde_json::Value>,
    pub note: Option<String>,
}

/// A page of audit entries, newest first.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct AuditPage {
    pub data: Vec<AuditEntryView>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<i64>,
}

/// The audit trail of admin and operator actions, newest first.
#[utoipa::path(get, path = "/admin/audit", tag = "admin", params(AuditQuery),
    responses((status = 200, description = "Audit entries, newest first", body = AuditPage),
              (status = 400, description = "A query parameter is out of bounds", body = ErrorBody)))]
pub async fn audit_log(
    State(state): State<AppState>,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = super::error::query(q)?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid("limit", "must be from 1 to 500"));
    }
    if let Some(target) = &q.target {
        if target.chars().count() > 256 || target.chars().any(char::is_control) {
            return Err(ApiError::invalid("target", "must be at most 256 characters without control characters"));
        }
    }
    // A saga id is kept in lowercase (see `saga_id`); other targets are matched as given.
    let target = q.target.map(|t| super::sagas::canonical_id(&t).unwrap_or(t));
    if q.cursor.is_some_and(|c| c < 1) {
        return Err(ApiError::invalid(
            "cursor",
            "is not a cursor this API returned; pass next_cursor from the previous page",
        ));
    }
    // One more than the page: whether there is a next one.
    let mut entries = state.store.audit_log(target.as_deref(), q.cursor, limit + 1).await?;
    let more = entries.len() > limit as usize;
    entries.truncate(limit as usize);
    let next_cursor = if more { entries.last().map(|r| r.id) } else { None };
    let data = entries
        .into_iter()
        .map(|r| AuditEntryView {
            id: r.id,
            at: crate::clock::rfc3339(r.at),
            actor: r.entry.actor,
            action: r.entry.action,
            target: r.entry.target,
            before: r.entry.before,
            after: r.entry.after,
            note: r.entry.note,
        })
        .collect();
    Ok(json_response(StatusCode::OK, to_json(&AuditPage { data, next_cursor })?, None))
}

#[cfg(test)]
mod tests {
    use super::{bearer, parse_note, secret_eq};
    use axum::body::Bytes;
    use axum::http::{header, HeaderMap, HeaderValue, StatusCode};

    /// A note reaches the audit row as text: what PostgreSQL cannot store (a NUL) or a console
    /// should not show (other control characters) is a 400, before anything changes.
    #[test]
    fn a_note_with_a_control_character_is_refused_tabs_and_line_breaks_are_kept() {
        let parse = |json: &'static str| parse_note(Ok(Bytes::from_static(json.as_bytes())));
        for bad in [r#"{"note": "refunded\u0000"}"#, r#"{"note": "a\u001bb"}"#, r#"{"note": "x\u007f"}"#] {
            let e = parse(bad).expect_err(bad);
            assert_eq!((e.status, e.field.as_deref()), (StatusCode::BAD_REQUEST, Some("note")), "{bad}");
        }
        let kept = parse(r#"{"note": "refunded by hand\n\tticket 12\r\n"}"#).unwrap();
        assert_eq!(kept.note.as_deref(), Some("refunded by hand\n\tticket 12\r\n"));
        assert_eq!(parse(r#"{"note": "Zoë: erstattet"}"#).unwrap().note.as_deref(), Some("Zoë: erstattet"));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let token = |value: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
            bearer(&h).map(str::to_owned)
        };
        assert_eq!(token("Bearer t0k").as_deref(), Some("t0k"));
        assert_eq!(token("BEARER t0k").as_deref(), Some("t0k"));
        assert_eq!(token("bEaReR  t0k ").as_deref(), Some("t0k"));
        assert_eq!(token("Basic dTpw"), None);
        assert_eq!(token("Bearert0k"), None);
    }

    #[test]
    fn secrets_compare_by_value() {
        assert!(secret_eq("s3cret", "s3cret"));
        assert!(!secret_eq("s3cret", "s3cres"));
        assert!(!secret_eq("s3cret", "s3cret "));
        assert!(!secret_eq("", "x"));
    }
}
