//! The request side of HTTP idempotency (draft-ietf-httpapi-idempotency-key-header with
//! Stripe's storage rules): reading and checking the key, scoping it to the caller and route,
//! and fingerprinting the request. Storage and the claim itself live in the store.

use axum::http::HeaderMap;
use sha2::{Digest as _, Sha256};

use super::error::ApiError;

pub const HEADER: &str = "idempotency-key";
pub const REPLAYED: &str = "idempotent-replayed";
pub const MAX_KEY_LEN: usize = 255;

/// 409: the key's first request is still running.
pub fn in_flight() -> ApiError {
    ApiError::conflict(
        "idempotency_key_in_flight",
        "a request with this Idempotency-Key is still being processed; retry after the Retry-After delay",
    )
    .with_retry_after(1)
}

/// 422: the key was used with another request.
pub fn reused() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
        "this Idempotency-Key was already used with a different request body; use a new key for a new request",
    )
}

/// The key from the request, if any, checked for length and printability.
pub fn key(headers: &HeaderMap, required: bool) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(HEADER) else {
        return if required {
            Err(ApiError::invalid(
                "Idempotency-Key",
                "this request needs an Idempotency-Key header; send a unique value (a UUID) and reuse it when you retry",
            ))
        } else {
            Ok(None)
        };
    };
    let key = value.to_str().map_err(|_| ApiError::invalid("Idempotency-Key", "must be printable ASCII"))?.trim();
    if key.is_empty() {
        return Err(ApiError::invalid("Idempotency-Key", "must not be empty; send a unique value such as a UUID"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(ApiError::invalid("Idempotency-Key", format!("must be at most {MAX_KEY_LEN} characters")));
    }
    if !key.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(ApiError::invalid("Idempotency-Key", "must be printable ASCII"));
    }
    Ok(Some(key.to_owned()))
}

/// Keys are scoped per caller: the same key from two callers is two keys. A caller is
/// identified by its credentials (hashed, never stored in clear); unauthenticated callers
/// share one scope. A bearer token is taken as the token check reads it (`bearer` or
/// `Bearer`, spaces around the token trimmed) and hashed in its canonical form
/// `Bearer <token>`, the form clients send and keys stored before this rule were scoped by.
pub fn caller(headers: &HeaderMap) -> String {
    let digest = |bytes: &[u8]| format!("auth:{}", &hex::encode(Sha256::digest(bytes))[..32]);
    match (super::admin::bearer(headers), headers.get(axum::http::header::AUTHORIZATION)) {
        (Some(token), _) => digest(format!("Bearer {token}").as_bytes()),
        (None, Some(v)) => digest(v.as_bytes()),
        (None, None) => "anonymous".to_owned(),
    }
}

/// SHA-256 over the route and the canonical JSON of the body, so that whitespace and key
/// order do not make an identical request look different.
pub fn fingerprint(route: &str, body: &serde_json::Value) -> String {
    let mut h = Sha256::new();
    h.update(route.as_bytes());
    h.update([0]);
    h.update(canonical_json(body).as_bytes());
    hex::encode(h.finalize())
}

/// JSON with object keys sorted at every level.
pub fn canonical_json(v: &serde_json::Value) -> String {
    fn write(v: &serde_json::Value, out: &mut String) {
        match v {
            serde_json::Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::Value::String(k.clone()).to_string());
                    out.push(':');
                    write(&map[k], out);
                }
                out.push('}');
            }
            serde_json::Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(v, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn fingerprint_ignores_key_order_and_whitespace_but_not_values() {
        let a: serde_json::Value = serde_json::from_str(r#"{"a": 1, "b": {"y": [1, 2], "x": "s"}}"#).unwrap();
        let b: serde_json::Value = serde_json::from_str(r#"{"b":{"x":"s","y":[1,2]},"a":1}"#).unwrap();
        let c: serde_json::Value = serde_json::from_str(r#"{"b":{"x":"s","y":[2,1]},"a":1}"#).unwrap();
        assert_eq!(fingerprint("POST /orders", &a), fingerprint("POST /orders", &b));
        assert_ne!(fingerprint("POST /orders", &a), fingerprint("POST /orders", &c));
        assert_ne!(fingerprint("POST /orders", &a), fingerprint("POST /sagas/x", &a));
    }

    #[test]
    fn key_rules() {
        let mut h = HeaderMap::new();
        assert!(key(&h, true).is_err());
        assert_eq!(key(&h, false).unwrap(), None);
        h.insert(HEADER, HeaderValue::from_static("abc"));
        assert_eq!(key(&h, true).unwrap().as_deref(), Some("abc"));
        h.insert(HEADER, HeaderValue::from_str(&"k".repeat(256)).unwrap());
        assert!(key(&h, true).is_err());
        h.insert(HEADER, HeaderValue::from_str(&"k".repeat(255)).unwrap());
        assert!(key(&h, true).is_ok());
        h.insert(HEADER, HeaderValue::from_static(""));
        assert!(key(&h, true).is_err());
    }
}
