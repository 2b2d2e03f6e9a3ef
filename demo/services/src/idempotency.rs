//! Server-side idempotency, the same for all three services: the `Idempotency-Key` extractor,
//! the request fingerprint, the stored answers and the per-key trigger counters.
//!
//! The rules (see the README): same key and same fingerprint replays the stored status and
//! body with `Idempotent-Replayed: true`; same key and another fingerprint is 422. Only final
//! answers (`Answer`) are stored, in the same transaction as the effect they report; errors
//! (`ApiError`, including the injected 503s) never are. This module does not lock: callers hold
//! their service's write lock around lookup, effect and store (see `server::Core::write`).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest as _, Sha256};
use sqlx::SqliteConnection;

use crate::error::ApiError;

/// The request header carrying the key.
pub const KEY_HEADER: &str = "idempotency-key";
/// The response header set on replays.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// Longest key accepted; longer ones are a client bug, not a key.
const MAX_KEY_LEN: usize = 255;

/// The idempotency tables, created in every service's database.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS idempotency (
    key         TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    status      INTEGER NOT NULL,
    body        TEXT NOT NULL,
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
-- How often a key has hit a trigger (FLAKY-/tok_flaky failures, SLOW- sleeps). Kept in SQLite
-- so that a restarted service does not fail the same key twice more.
CREATE TABLE IF NOT EXISTS trigger_hits (
    key     TEXT NOT NULL,
    trigger TEXT NOT NULL,
    hits    INTEGER NOT NULL,
    PRIMARY KEY (key, trigger)
);
";

/// A mutating request: its key, its fingerprint and its raw body.
///
/// Extracting it fails with 400 when the key is missing or malformed, so a handler that takes
/// a `Keyed` cannot forget the key.
#[derive(Debug)]
pub struct Keyed {
    /// The `Idempotency-Key` header, trimmed.
    pub key: String,
    /// Hex SHA-256 of method, path and raw body.
    pub fingerprint: String,
    /// The raw body, for the handler to parse.
    pub body: Bytes,
}

impl<S: Send + Sync> FromRequest<S> for Keyed {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let key = match req.headers().get(KEY_HEADER) {
            None => return Err(ApiError::BadRequest("Idempotency-Key header required".to_owned())),
            Some(v) => check_key(v)?,
        };
        let method = req.method().as_str().to_owned();
        let path = req.uri().path().to_owned();
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::BadRequest(format!("cannot read the body: {}", e.body_text())))?;
        let fingerprint = fingerprint(&method, &path, &body);
        Ok(Keyed { key, fingerprint, body })
    }
}

fn check_key(value: &HeaderValue) -> Result<String, ApiError> {
    let key =
        value.to_str().map_err(|_| ApiError::BadRequest("Idempotency-Key must be printable ASCII".to_owned()))?.trim();
    if key.is_empty() {
        return Err(ApiError::BadRequest("Idempotency-Key must not be empty; send a unique value".to_owned()));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(ApiError::BadRequest(format!("Idempotency-Key must be at most {MAX_KEY_LEN} characters")));
    }
    Ok(key.to_owned())
}

/// SHA-256 over method, path and the raw body bytes, separated by NUL bytes so that the parts
/// cannot run into each other. Raw bytes, not canonical JSON: the contract fingerprints the
/// request as sent, and a retrying client sends the same bytes.
pub fn fingerprint(method: &str, path: &str, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(method.as_bytes());
    h.update([0]);
    h.update(path.as_bytes());
    h.update([0]);
    h.update(body);
    hex::encode(h.finalize())
}

/// A final answer: a status and a JSON body, stored under the key and replayed verbatim.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The HTTP status.
    pub status: StatusCode,
    /// The serialised JSON body.
    pub body: String,
    /// Whether this answer is a replay of a stored one.
    pub replayed: bool,
}

impl Answer {
    /// A fresh answer with a JSON body.
    pub fn json(status: StatusCode, body: &serde_json::Value) -> Self {
        Answer { status, body: body.to_string(), replayed: false }
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let mut resp = (self.status, [(header::CONTENT_TYPE, "application/json")], self.body).into_response();
        if self.replayed {
            resp.headers_mut().insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
        }
        resp
    }
}

/// The stored answer for `key`: `Ok(Some(replay))` for the same fingerprint, `Err(KeyReused)`
/// for another, `Ok(None)` for a new key.
pub async fn lookup(conn: &mut SqliteConnection, key: &str, fingerprint: &str) -> Result<Option<Answer>, ApiError> {
    let row: Option<(String, i64, String)> =
        sqlx::query_as("SELECT fingerprint, status, body FROM idempotency WHERE key = ?")
            .bind(key)
            .fetch_optional(&mut *conn)
            .await?;
    let Some((stored_fp, status, body)) = row else { return Ok(None) };
    if stored_fp != fingerprint {
        return Err(ApiError::KeyReused);
    }
    let status = u16::try_from(status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or_else(|| anyhow::anyhow!("stored status {status} for key {key:?} is not an HTTP status"))?;
    Ok(Some(Answer { status, body, replayed: true }))
}

/// Stores `answer` under `key`. Call it inside the transaction that applied the effect, so
/// that an effect never exists without its answer (and the other way round).
pub async fn store(conn: &mut SqliteConnection, key: &str, fingerprint: &str, answer: &Answer) -> Result<(), ApiError> {
    sqlx::query("INSERT INTO idempotency (key, fingerprint, status, body) VALUES (?, ?, ?, ?)")
        .bind(key)
        .bind(fingerprint)
        .bind(i64::from(answer.status.as_u16()))
        .bind(&answer.body)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Counts one more hit of `trigger` for `key` and returns the new count (1 on the first hit).
pub async fn hit(conn: &mut SqliteConnection, key: &str, trigger: &str) -> Result<i64, ApiError> {
    let hits: i64 = sqlx::query_scalar(
        "INSERT INTO trigger_hits (key, trigger, hits) VALUES (?, ?, 1)
         ON CONFLICT (key, trigger) DO UPDATE SET hits = hits + 1
         RETURNING hits",
    )
    .bind(key)
    .bind(trigger)
    .fetch_one(&mut *conn)
    .await?;
    Ok(hits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_separates_the_parts() {
        assert_ne!(fingerprint("POST", "/a", b"b"), fingerprint("POST", "/ab", b""));
        assert_ne!(fingerprint("POST", "/a", b"{}"), fingerprint("POST", "/a", b""));
        assert_eq!(fingerprint("POST", "/a", b"{}"), fingerprint("POST", "/a", b"{}"));
    }
}
