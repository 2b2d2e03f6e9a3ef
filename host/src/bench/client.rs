//! The generator's HTTP client: hyper's pooled HTTP/1.1 client, one keep-alive pool for every
//! target, and the one exchange the generator makes per saga (POST, then poll if needed).
//!
//! hyper directly rather than reqwest: the host already links hyper and hyper-util, and a
//! request here is a handful of prebuilt headers and a shared body, so nothing is encoded per
//! request but the idempotency key. Plain `http://` only: the generator talks to replicas or to
//! a load balancer on the same network, and TLS would put the generator's crypto into the
//! figures.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, LOCATION};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as Pool;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use tokio::time::Instant;

/// How an exchange for one saga ended.
#[derive(Debug)]
pub enum Answer {
    /// The saga reached a final status.
    Settled { status: String, reason: Option<String> },
    /// Still running when the generator's deadline passed.
    Unsettled,
    /// An HTTP status the API should not answer a valid order with, and the start of its body.
    Http { status: u16, body: String },
    /// No HTTP answer: refused, reset, timed out.
    Transport(String),
}

/// Statuses after which a saga changes no more without an operator (SPEC §1).
const FINAL: [&str; 3] = ["COMPLETED", "CANCELLED", "COMPENSATION_FAILED"];

/// The fields of a saga the generator checks; everything else in the answer is skipped.
#[derive(Deserialize)]
struct SagaFields {
    status: String,
    #[serde(default)]
    reason: Option<String>,
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// One sagahost (or load balancer) the generator sends to.
struct Target {
    /// `http://host:port`, no trailing slash.
    base: String,
    /// Where sagas of the benchmarked type are created, e.g. `/orders`.
    create: Uri,
}

/// The pooled client and everything constant about the requests it sends.
pub struct Client {
    pool: Pool<HttpConnector, Body>,
    targets: Vec<Target>,
    auth: Option<HeaderValue>,
    prefer: Option<HeaderValue>,
}

/// Checks a `--url`: an `http://` URL with a host, returned without a trailing slash.
pub fn parse_url(s: &str) -> Result<String, String> {
    parse_base_url(s, "https is not supported by the generator; point it at the replicas or a plain-HTTP load balancer")
}

/// Checks the base URL of a host (the generator's and the operator CLI's `--url`): `http://`
/// with a host and no path, returned without a trailing slash; `no_https` says what to do
/// instead of `https://`.
pub fn parse_base_url(s: &str, no_https: &str) -> Result<String, String> {
    let s = s.trim().trim_end_matches('/');
    let uri: Uri = s.parse().map_err(|e| format!("'{s}' is not a URL ({e}); e.g. http://127.0.0.1:8080"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err(no_https.to_owned()),
        _ => return Err(format!("'{s}' has no http:// scheme; e.g. http://127.0.0.1:8080")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("'{s}' names no host; e.g. http://127.0.0.1:8080"));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty()) {
        return Err(format!("'{s}' has a path; give the base URL only, e.g. http://127.0.0.1:8080"));
    }
    Ok(s.to_owned())
}

/// The error and its causes on one line: hyper's own message ("client error (Connect)") says
/// little without them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        source = s.source();
    }
    out
}

impl Client {
    /// A client for `bases` (already checked by [`parse_url`]), creating sagas at `path`.
    /// `wait` is the `Prefer: wait` in seconds (0: none, poll only).
    pub fn new(bases: &[String], path: &str, api_token: Option<&str>, wait: u64) -> Result<Client, String> {
        let mut connector = HttpConnector::new();
        // Latency matters more than packet count: don't let Nagle hold a request back.
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let pool = Pool::builder(TokioExecutor::new())
            // Below the server's header-read timeout (10 s by default), so the pool drops an idle
            // connection before the server does and never sends on one being closed.
            .pool_idle_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(usize::MAX)
            .build(connector);
        let targets = bases
            .iter()
            .map(|base| {
                let create = format!("{base}{path}").parse().map_err(|e| format!("{base}{path}: {e}"))?;
                Ok(Target { base: base.clone(), create })
            })
            .collect::<Result<_, String>>()?;
        let auth = api_token
            .map(|t| HeaderValue::from_str(&format!("Bearer {t}")))
            .transpose()
            .map_err(|_| "the API token holds characters a header cannot carry".to_owned())?;
        let prefer = (wait > 0).then(|| HeaderValue::from_str(&format!("wait={wait}")).expect("ascii"));
        Ok(Client { pool, targets, auth, prefer })
    }

    /// How many targets requests are spread over.
    pub fn targets(&self) -> usize {
        self.targets.len()
    }

    async fn send(
        &self,
        req: Request<Body>,
        deadline: Instant,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), Answer> {
        let exchange = async {
            let resp = self.pool.request(req).await.map_err(|e| Answer::Transport(chain(&e)))?;
            let (parts, body) = resp.into_parts();
            let bytes = body.collect().await.map_err(|e| Answer::Transport(chain(&e)))?.to_bytes();
            Ok((parts.status, parts.headers, bytes))
        };
        match tokio::time::timeout_at(deadline, exchange).await {
            Ok(result) => result,
            Err(_) => Err(Answer::Unsettled),
        }
    }

    fn get(&self, uri: Uri) -> Request<Body> {
        let mut req = Request::builder().method(Method::GET).uri(uri);
        if let Some(auth) = &self.auth {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        req.body(Empty::new().boxed()).expect("a GET request from parts that were checked")
    }

    /// Creates a saga on target `n % targets` with `body` under `key`, and follows it until it
    /// is final or `deadline` passes; also returns how many GETs that took.
    ///
    /// With `Prefer: wait` the POST usually answers 200 with the final saga. A 201 (the wait
    /// ran out, or the server had too many waiters) is followed by GETs of its `Location`, 10 ms
    /// apart at first, backing off to a tenth of the saga's age (at least 100 ms, at most 1 s):
    /// past the first second the latency stays within about 10% of the truth, and an
    /// overloaded server is not buried under the generator's polls (they are counted, so their
    /// load is visible). Below a second the polls land some 10, 30, 70, 150, 250 ms after the
    /// answer: a saga that settled at 71 ms is seen at 150. The figures say how many sagas
    /// were polled; a capacity test raises the host's `--max-waiters` so that none is.
    pub async fn settle(
        &self,
        n: u64,
        key: HeaderValue,
        body: Bytes,
        started: Instant,
        deadline: Instant,
    ) -> (Answer, u32) {
        let mut polls = 0;
        let answer = self.exchange(n, key, body, started, deadline, &mut polls).await;
        (answer, polls)
    }

    async fn exchange(
        &self,
        n: u64,
        key: HeaderValue,
        body: Bytes,
        started: Instant,
        deadline: Instant,
        polls: &mut u32,
    ) -> Answer {
        let target = &self.targets[(n % self.targets.len() as u64) as usize];
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(target.create.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header("idempotency-key", key);
        if let Some(prefer) = &self.prefer {
            req = req.header("prefer", prefer.clone());
        }
        if let Some(auth) = &self.auth {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        let req = req.body(Full::new(body).boxed()).expect("a POST request from parts that were checked");
        let (status, headers, bytes) = match self.send(req, deadline).await {
            Ok(answer) => answer,
            Err(answer) => return answer,
        };
        if status != StatusCode::OK && status != StatusCode::CREATED {
            return http_error(status, &bytes);
        }
        let saga = match parse(status, &bytes) {
            Ok(saga) => saga,
            Err(answer) => return answer,
        };
        if FINAL.contains(&saga.status.as_str()) {
            return Answer::Settled { status: saga.status, reason: saga.reason };
        }
        let Some(location) = headers.get(LOCATION).and_then(|l| l.to_str().ok()) else {
            return Answer::Http { status: status.as_u16(), body: "a 201 without a Location header".to_owned() };
        };
        let Ok(uri) = format!("{}{location}", target.base).parse::<Uri>() else {
            return Answer::Http { status: status.as_u16(), body: format!("a Location that is no path: {location}") };
        };
        let mut pause = Duration::from_millis(10);
        loop {
            if Instant::now() + pause >= deadline {
                return Answer::Unsettled;
            }
            tokio::time::sleep(pause).await;
            let cap = (started.elapsed() / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
            pause = (pause * 2).min(cap);
            *polls += 1;
            let (status, _, bytes) = match self.send(self.get(uri.clone()), deadline).await {
                Ok(answer) => answer,
                Err(answer) => return answer,
            };
            if status != StatusCode::OK {
                return http_error(status, &bytes);
            }
            match parse(status, &bytes) {
                Ok(saga) if FINAL.contains(&saga.status.as_str()) => {
                    return Answer::Settled { status: saga.status, reason: saga.reason }
                }
                Ok(_) => {}
                Err(answer) => return answer,
            }
        }
    }

    /// `GET {base}{path}` as text, within `limit`: health checks and metric scrapes.
    pub async fn get_text(&self, base: &str, path: &str, limit: Duration) -> Result<(StatusCode, String), String> {
        let uri: Uri = format!("{base}{path}").parse().map_err(|e| format!("{base}{path}: {e}"))?;
        match self.send(self.get(uri), Instant::now() + limit).await {
            Ok((status, _, bytes)) => Ok((status, String::from_utf8_lossy(&bytes).into_owned())),
            Err(Answer::Transport(e)) => Err(e),
            Err(_) => Err(format!("no answer within {} s", limit.as_secs())),
        }
    }
}

fn parse(status: StatusCode, bytes: &[u8]) -> Result<SagaFields, Answer> {
    serde_json::from_slice(bytes)
        .map_err(|e| Answer::Http { status: status.as_u16(), body: format!("not a saga ({e}): {}", snippet(bytes)) })
}

fn http_error(status: StatusCode, bytes: &[u8]) -> Answer {
    Answer::Http { status: status.as_u16(), body: snippet(bytes) }
}

/// The start of a body, for error samples.
fn snippet(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]);
    text.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_plain_http_bases() {
        assert_eq!(parse_url("http://127.0.0.1:8080/").unwrap(), "http://127.0.0.1:8080");
        assert_eq!(parse_url(" http://lb.internal ").unwrap(), "http://lb.internal");
        assert!(parse_url("https://x:443").unwrap_err().contains("https is not supported"));
        assert!(parse_url("127.0.0.1:8080").unwrap_err().contains("http://"));
        assert!(parse_url("http://h:1/orders").unwrap_err().contains("base URL only"));
        assert!(parse_url("http://").is_err());
    }
}
