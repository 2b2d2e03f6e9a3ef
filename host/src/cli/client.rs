//! The CLI's HTTP client: one request at a time to one host, over hyper's client (the host
//! links it already for `sagahost bench`), and the mapping of every way a request can end to
//! an [`Exit`] code and a message.
//!
//! Plain `http://` only: the host serves plain HTTP, and TLS would be the only reason to link
//! a TLS stack into the server binary. Behind a TLS-terminating proxy, run the CLI where the
//! host's own port is reachable.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as Pool;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::{Exit, Failure, Global};

/// Which credential a route takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// `/orders`, `/sagas`: the API token, when the host closes them (`--api-token`).
    Client,
    /// `/admin/...`: the admin token.
    Admin,
}

/// What a request carries.
#[derive(Debug)]
pub enum Payload {
    None,
    Json(Value),
    /// A plugin component's bytes; sent compressed (`Content-Encoding: zstd`) when larger
    /// than [`COMPRESS_OVER`].
    Wasm(Vec<u8>),
}

/// Components larger than this are uploaded compressed: a JavaScript or Python component
/// (12-19 MiB) then fits the host's 16 MiB body limit, and any big one travels faster.
pub const COMPRESS_OVER: usize = 1 << 20;

/// The least time an upload waits for its answer, whatever `--timeout` says.
const UPLOAD_WAIT: Duration = Duration::from_secs(300);

/// Checks `--url`: an `http://` URL with a host and no path, returned without a trailing slash.
pub fn parse_url(s: &str) -> Result<String, String> {
    crate::bench::client::parse_base_url(
        s,
        "https is not supported: the host serves plain HTTP; give its own http:// address",
    )
}

/// Percent-encodes one path segment or query value: everything but RFC 3986's unreserved
/// characters, so an id or a name from the command line can never change the route.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A query string from the parameters that are set (`?a=1&b=x`, or empty).
pub fn query(params: &[(&str, Option<String>)]) -> String {
    let set: Vec<String> =
        params.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v)))).collect();
    if set.is_empty() {
        String::new()
    } else {
        format!("?{}", set.join("&"))
    }
}

/// A successful answer: its status and JSON body.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
}

pub struct Client {
    pool: Pool<HttpConnector, Full<Bytes>>,
    base: String,
    admin: Option<HeaderValue>,
    api: Option<HeaderValue>,
    actor: Option<HeaderValue>,
    timeout: Duration,
}

fn bearer(token: Option<&str>, flag: &str) -> Result<Option<HeaderValue>, Failure> {
    token
        .map(|t| {
            HeaderValue::from_str(&format!("Bearer {}", t.trim()))
                .map_err(|_| Failure::usage(format!("{flag} holds characters an HTTP header cannot carry")))
        })
        .transpose()
}

impl Client {
    pub fn new(global: &Global) -> Result<Client, Failure> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let pool = Pool::builder(TokioExecutor::new()).build(connector);
        let actor = global
            .actor
            .as_deref()
            .map(|a| {
                HeaderValue::from_str(a.trim())
                    .map_err(|_| Failure::usage("--actor holds characters an HTTP header cannot carry"))
            })
            .transpose()?;
        Ok(Client {
            pool,
            base: global.url.clone(),
            admin: bearer(global.admin_token.as_deref(), "--admin-token")?,
            api: bearer(global.api_token.as_deref(), "--api-token")?,
            actor,
            timeout: Duration::from_secs(global.timeout),
        })
    }

    /// Sends one request and reads the answer: a 2xx with a JSON body, or a [`Failure`] that
    /// carries the API's own error message and the exit code its status maps to.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        auth: Auth,
        payload: Payload,
        idempotency_key: Option<&str>,
    ) -> Result<Answer, Failure> {
        let url = format!("{}{path}", self.base);
        let uri: Uri = url.parse().map_err(|e| Failure::usage(format!("{url} is not a valid URL: {e}")))?;
        let mut req = Request::builder().method(method).uri(uri).header("accept", "application/json");
        let token = match auth {
            Auth::Client => &self.api,
            Auth::Admin => &self.admin,
        };
        if let Some(t) = token {
            req = req.header(AUTHORIZATION, t.clone());
        }
        if let (Auth::Admin, Some(actor)) = (auth, &self.actor) {
            req = req.header("x-actor", actor.clone());
        }
        if let Some(key) = idempotency_key {
            let key = HeaderValue::from_str(key)
                .map_err(|_| Failure::usage("--idempotency-key holds characters an HTTP header cannot carry"))?;
            req = req.header("idempotency-key", key);
        }
        // An upload waits for the host to compile the component: seconds for a JavaScript or
        // Python step, so at least the host's own upload deadline (5 minutes).
        let limit = if matches!(payload, Payload::Wasm(_)) { self.timeout.max(UPLOAD_WAIT) } else { self.timeout };
        let body = match payload {
            Payload::None => Bytes::new(),
            Payload::Json(v) => {
                req = req.header(CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(&v).expect("a JSON value serialises"))
            }
            Payload::Wasm(bytes) => {
                req = req.header(CONTENT_TYPE, "application/wasm");
                if bytes.len() > COMPRESS_OVER {
                    let packed = zstd::bulk::compress(&bytes, 0)
                        .map_err(|e| Failure::usage(format!("cannot compress the component: {e}")))?;
                    req = req.header("content-encoding", "zstd");
                    Bytes::from(packed)
                } else {
                    Bytes::from(bytes)
                }
            }
        };
        let req = req.body(Full::new(body)).map_err(|e| Failure::usage(format!("cannot build the request: {e}")))?;
        let exchange = async {
            let resp = self.pool.request(req).await.map_err(|e| transport(&self.base, &e))?;
            let (parts, body) = resp.into_parts();
            let bytes = body.collect().await.map_err(|e| transport(&self.base, &e))?.to_bytes();
            Ok::<_, Failure>((parts.status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(limit, exchange).await.map_err(|_| {
            Failure::new(
                Exit::Unreachable,
                format!(
                    "{} did not answer within {} s; is the host overloaded? (--timeout)",
                    self.base,
                    limit.as_secs()
                ),
            )
        })??;
        interpret(&self.base, status, &bytes).map_err(|mut f| {
            // The host says which header it wants; say which flag sends it.
            if status == StatusCode::UNAUTHORIZED && token.is_none() {
                f.message.push_str(match auth {
                    Auth::Admin => "; pass --admin-token (or set SAGAHOST_ADMIN_TOKEN)",
                    Auth::Client => "; pass --api-token (or set SAGAHOST_API_TOKEN)",
                });
            }
            f
        })
    }
}

/// The answer of an HTTP exchange: a success with JSON, or the failure it means.
pub fn interpret(base: &str, status: StatusCode, bytes: &[u8]) -> Result<Answer, Failure> {
    let json: Option<Value> = serde_json::from_slice(bytes).ok();
    // A deletion answers with no body at all.
    if status == StatusCode::NO_CONTENT && bytes.is_empty() {
        return Ok(Answer { status, body: Value::Null });
    }
    if status.is_success() {
        return match json {
            Some(body) => Ok(Answer { status, body }),
            None => Err(not_sagahost(base, status)),
        };
    }
    // Every error sagahost answers is {"error": {"code": ..., "message": ...}}.
    let detail = json.as_ref().map(|j| &j["error"]);
    let (Some(code), Some(message)) =
        (detail.and_then(|d| d["code"].as_str()), detail.and_then(|d| d["message"].as_str()))
    else {
        return Err(not_sagahost(base, status));
    };
    Err(Failure {
        exit: Exit::of_status(status),
        message: message.to_owned(),
        http: Some((status.as_u16(), code.to_owned())),
    })
}

fn not_sagahost(base: &str, status: StatusCode) -> Failure {
    Failure::new(
        Exit::NotSagahost,
        format!(
            "{base} answered HTTP {} without sagahost's JSON; is --url the address of a sagahost?",
            status.as_u16()
        ),
    )
}

/// A request that got no HTTP answer: nothing listens (3), or something that is not an HTTP
/// server answered (8).
fn transport(base: &str, e: &(dyn std::error::Error + 'static)) -> Failure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut text = e.to_string();
    let mut garbled = false;
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            garbled |= h.is_parse() || h.is_parse_status();
        }
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    if garbled {
        Failure::new(
            Exit::NotSagahost,
            format!("{base} did not answer HTTP ({text}); is --url the address of a sagahost?"),
        )
    } else {
        Failure::new(
            Exit::Unreachable,
            format!("cannot reach {base} ({text}); is the host running? (--url, SAGAHOST_URL)"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_plain_http_bases() {
        assert_eq!(parse_url("http://127.0.0.1:8080/").unwrap(), "http://127.0.0.1:8080");
        assert!(parse_url("https://h").unwrap_err().contains("https is not supported"));
        assert!(parse_url("127.0.0.1:8080").unwrap_err().contains("http://"));
        assert!(parse_url("http://h:1/orders").unwrap_err().contains("base URL only"));
    }

    #[test]
    fn path_segments_and_query_values_are_encoded() {
        assert_eq!(encode("payment-confirmed"), "payment-confirmed");
        assert_eq!(encode("../admin?x=1 y"), "..%2Fadmin%3Fx%3D1%20y");
        assert_eq!(encode("żó"), "%C5%BC%C3%B3");
        assert_eq!(
            query(&[("status", Some("CANCELLED".into())), ("limit", None), ("prefix", Some("a/b".into()))]),
            "?status=CANCELLED&prefix=a%2Fb"
        );
        assert_eq!(query(&[("limit", None)]), "");
    }

    #[test]
    fn statuses_map_to_the_documented_exit_codes_with_the_apis_message() {
        let body = |code: &str| format!(r#"{{"error": {{"code": "{code}", "message": "say what to do"}}}}"#);
        for (status, exit) in [
            (400, Exit::Refused),
            (401, Exit::Auth),
            (403, Exit::Auth),
            (404, Exit::NotFound),
            (409, Exit::Conflict),
            (413, Exit::Refused),
            (422, Exit::Refused),
            (500, Exit::Server),
            (503, Exit::Server),
        ] {
            let e = interpret("http://h", StatusCode::from_u16(status).unwrap(), body("c").as_bytes()).unwrap_err();
            assert_eq!(e.exit, exit, "HTTP {status}");
            assert_eq!(e.message, "say what to do");
            assert_eq!(e.http, Some((status, "c".to_owned())));
        }
        let ok = interpret("http://h", StatusCode::CREATED, br#"{"id": "x"}"#).unwrap();
        assert_eq!((ok.status, ok.body["id"].as_str()), (StatusCode::CREATED, Some("x")));
    }

    #[test]
    fn answers_without_sagahosts_json_mean_the_url_is_not_sagahost() {
        for (status, body) in
            [(200, &b"<html>hi</html>"[..]), (404, b"Not Found"), (502, br#"{"message": "bad gateway"}"#)]
        {
            let e = interpret("http://h", StatusCode::from_u16(status).unwrap(), body).unwrap_err();
            assert_eq!(e.exit, Exit::NotSagahost, "HTTP {status}");
            assert!(e.message.contains("is --url the address of a sagahost"), "{}", e.message);
        }
    }
}
