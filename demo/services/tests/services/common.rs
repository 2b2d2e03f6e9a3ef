//! Test helpers: start the demo services in-process (port 0, a fresh data directory) or as the
//! real binary, talk to them over real HTTP, and a tiny recording server that stands in for
//! sagahost when the payment webhook fires.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::StatusCode;
use clap::Parser as _;
use sagahost_demo_services::{Config, Services};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// How long trigger sleeps (`--slow-ms`, `--hold-ms`) last in tests.
pub const PAUSE_MS: u64 = 1500;

/// The three services running in this process.
pub struct Demo {
    pub inventory: String,
    pub payment: String,
    pub shipping: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Demo {
    /// Starts all three services on port 0 over `data_dir`, the webhook aimed at `sagahost_url`.
    pub async fn start(data_dir: &Path, sagahost_url: &str) -> Demo {
        let dir = data_dir.to_str().unwrap();
        let slow = PAUSE_MS.to_string();
        let config = Config::parse_from([
            "sagahost-demo-services",
            "--data-dir",
            dir,
            "--inventory-addr",
            "127.0.0.1:0",
            "--payment-addr",
            "127.0.0.1:0",
            "--shipping-addr",
            "127.0.0.1:0",
            "--sagahost-url",
            sagahost_url,
            "--sagahost-token",
            "secret-token",
            "--slow-ms",
            &slow,
            "--hold-ms",
            &slow,
        ]);
        let services = Services::build(&config).await.expect("the services start");
        let url = |name: &str| {
            let addr = services.addrs().into_iter().find(|(n, _)| *n == name).unwrap().1;
            format!("http://{addr}")
        };
        let (inventory, payment, shipping) = (url("inventory"), url("payment"), url("shipping"));
        let stop = CancellationToken::new();
        let task = tokio::spawn(services.run(stop.clone().cancelled_owned()));
        Demo { inventory, payment, shipping, stop, task }
    }

    /// Shuts the services down gracefully and waits until they stopped.
    pub async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().expect("the services stop cleanly");
    }
}

/// An answer: status, `Idempotent-Replayed` header and JSON body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub replayed: bool,
    pub body: Value,
    pub raw: String,
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

/// POSTs `body` (raw text) to `url` with an optional `Idempotency-Key`.
pub async fn post(url: &str, key: Option<&str>, body: &str) -> Reply {
    let mut req = client().post(url).header("content-type", "application/json").body(body.to_owned());
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    reply(req.send().await.expect("the service answers")).await
}

/// GETs `url`.
pub async fn get(url: &str) -> Reply {
    reply(client().get(url).send().await.expect("the service answers")).await
}

async fn reply(resp: reqwest::Response) -> Reply {
    let status = resp.status().as_u16();
    let replayed = resp.headers().get("idempotent-replayed").map(|v| v.to_str().unwrap().to_owned());
    assert!(replayed.is_none() || replayed.as_deref() == Some("true"), "Idempotent-Replayed is true or absent");
    let raw = resp.text().await.unwrap();
    let body = serde_json::from_str(&raw).unwrap_or_else(|e| panic!("not JSON ({e}): {raw}"));
    Reply { status, replayed: replayed.is_some(), body, raw }
}

/// `GET /effects/{order}` as `(name, count)` pairs of the whole report, sorted.
pub async fn effects(base: &str, order: &str) -> Value {
    let r = get(&format!("{base}/effects/{order}")).await;
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["order_id"], order);
    r.body["effects"].clone()
}

/// `GET /stats` requests count.
pub async fn requests(base: &str) -> u64 {
    get(&format!("{base}/stats")).await.body["requests"].as_u64().unwrap()
}

/// One request the recording server received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub idempotency_key: Option<String>,
    pub body: Value,
}

/// A stand-in for sagahost: records every request; the first `refuse_first` get 409 (as
/// sagahost answers while the saga does not wait yet), the rest 202.
#[derive(Clone)]
pub struct Recorder {
    pub url: String,
    seen: Arc<Mutex<Vec<Recorded>>>,
}

impl Recorder {
    pub async fn start(refuse_first: usize) -> Recorder {
        Self::start_on("127.0.0.1:0", refuse_first).await
    }

    pub async fn start_on(addr: &str, refuse_first: usize) -> Recorder {
        let seen: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let record = seen.clone();
        let app = axum::Router::new().fallback(move |req: Request| {
            let record = record.clone();
            async move {
                let (authorization, idempotency_key) = {
                    let header = |name: &str| req.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
                    (header("authorization"), header("idempotency-key"))
                };
                let method = req.method().to_string();
                let path = req.uri().path().to_owned();
                let bytes = axum::body::to_bytes(req.into_body(), 1 << 20).await.unwrap();
                let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let mut seen = record.lock().unwrap();
                seen.push(Recorded { method, path, authorization, idempotency_key, body });
                if seen.len() <= refuse_first {
                    (StatusCode::CONFLICT, r#"{"error":"not waiting"}"#)
                } else {
                    (StatusCode::ACCEPTED, "{}")
                }
            }
        });
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Recorder { url, seen }
    }

    pub fn seen(&self) -> Vec<Recorded> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests arrived (at most 10 s) and returns them all.
    pub async fn wait_for(&self, n: usize) -> Vec<Recorded> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen = self.seen();
            if seen.len() >= n {
                return seen;
            }
            assert!(Instant::now() < deadline, "expected {n} webhook requests, got {seen:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A fresh data directory, kept as a path so a test can restart on it.
pub fn data_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    (dir, path)
}

/// A reservation body for `order` with one line of `sku`.
pub fn reservation(order: &str, sku: &str) -> String {
    serde_json::json!({ "order_id": order, "items": [{ "sku": sku, "quantity": 2 }] }).to_string()
}

/// A charge body for `order` paying with `token`.
pub fn charge(order: &str, token: &str) -> String {
    serde_json::json!({ "order_id": order, "amount_cents": 2500, "currency": "USD", "token": token }).to_string()
}

/// A shipment body for `order` to `country`.
pub fn shipment(order: &str, country: &str) -> String {
    serde_json::json!({
        "order_id": order,
        "ship_to": { "name": "Ada", "line1": "1 Main St", "city": "Springfield", "postal_code": "12345", "country": country },
        "items": [{ "sku": "SKU-1", "quantity": 2 }],
    })
    .to_string()
}
