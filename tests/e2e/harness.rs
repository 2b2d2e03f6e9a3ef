//! The test host: the real sagahost (the same `App` the binary runs) on port 0, with a fresh
//! database and the real demo plugins, plus a helper-rich client.
//!
//! The backend is `SAGAHOST_TEST_BACKEND`: `sqlite` (default; a file in the test's temporary
//! directory) or `postgres` (a fresh database per test on the server `SAGAHOST_TEST_POSTGRES`
//! names, default `postgres://postgres@127.0.0.1:5432/postgres`). `./scripts/test` runs the
//! suite once for each.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use sagahost::store::Store;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

pub struct TestHost {
    pub base: String,
    pub client: reqwest::Client,
    pub store: Arc<dyn Store>,
    pub catalog: Arc<sagahost::catalog::Catalog>,
    pub dir: tempfile::TempDir,
    shutdown: CancellationToken,
    join: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// An HTTP response, read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub bytes: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes)
            .unwrap_or_else(|e| panic!("response is not JSON ({e}): {}", String::from_utf8_lossy(&self.bytes)))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| v.to_str().unwrap().to_owned())
    }
}

/// The SPEC §5.2 example order, with the given payment token, first SKU and country.
pub fn order(token: &str, sku: &str, country: &str) -> Value {
    json!({
        "customer_id": "c-42",
        "items": [{"sku": sku, "quantity": 2, "unit_price_cents": 1250}, {"sku": "SKU-2", "quantity": 1, "unit_price_cents": 500}],
        "currency": "USD",
        "payment": {"token": token},
        "ship_to": {"name": "Ada", "line1": "1 Main St", "city": "Springfield", "postal_code": "12345", "country": country}
    })
}

pub fn good_order() -> Value {
    order("tok_visa", "SKU-1", "US")
}

/// A fresh idempotency key.
pub fn key() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Path of a plugin or test fixture built from plugins/ (`payment`, `unknown-import`, ...).
pub fn plugin_path(name: &str) -> String {
    // cargo names the artifact after the package with dashes turned into underscores.
    format!("{}/../plugins/target/wasm32-wasip2/release/{}.wasm", env!("CARGO_MANIFEST_DIR"), name.replace('-', "_"))
}

/// The bytes of a plugin or test fixture built from plugins/.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = plugin_path(name);
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("fixture {path} missing ({e}); building the host builds the plugins workspace"))
}

/// The `order` definition with a compensate for payment that always panics, and a budget of
/// two attempts: a saga that needs a refund ends COMPENSATION_FAILED (operators:: and console:: fix it and retry).
pub async fn break_payment_compensation(host: &TestHost) -> sagahost::engine::SagaDefinition {
    let (broken, _) = host.catalog.install_plugin("payment", fixture("misbehave")).await.unwrap();
    let original = (*host.catalog.definition("order").unwrap()).clone();
    let mut def = original.clone();
    def.steps[1].compensate = sagahost::engine::PluginRef { plugin: "payment".into(), digest: broken };
    def.steps[1].compensate_retry =
        sagahost::engine::RetryPolicy { max_attempts: 2, initial_backoff_ms: 10, max_backoff_ms: 20 };
    host.catalog.put_definition(def, sagahost::store::DefinitionSource::Admin).await.unwrap();
    original
}

/// The owner under which [`TestHost::start_holding_the_relay`] holds the relay lease.
#[allow(dead_code)] // used by the dead-letter tests
pub const TEST_RELAY: &str = "test-relay";

/// The PostgreSQL server tests create their databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("SAGAHOST_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Is this run of the suite on PostgreSQL?
pub fn on_postgres() -> bool {
    std::env::var("SAGAHOST_TEST_BACKEND").is_ok_and(|b| b == "postgres")
}

/// A fresh PostgreSQL database for one test (the harness drops leftovers at the next run).
pub async fn scratch_postgres() -> String {
    let admin = postgres_admin_url();
    sagahost::store::postgres::scratch_database(&admin, "sagahost_e2e")
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is needed ({e}); is it running?"))
}

/// The database URL of a test's data directory: `None` (the SQLite file inside it) unless the
/// suite runs on PostgreSQL, where the directory remembers its database so that a restarted
/// host finds its data again.
pub async fn database_for(dir: &Path) -> Option<String> {
    if !on_postgres() {
        return None;
    }
    let file = dir.join("test-database-url");
    if let Ok(url) = std::fs::read_to_string(&file) {
        return Some(url);
    }
    let url = scratch_postgres().await;
    std::fs::write(&file, &url).unwrap();
    Some(url)
}

/// Opens the store a test host in `dir` used (SQLite file or its PostgreSQL database).
pub async fn open_store(dir: &Path) -> Arc<dyn Store> {
    let url = std::fs::read_to_string(dir.join("test-database-url")).ok();
    sagahost::store::open(url.as_deref(), dir).await.expect("open the host's database")
}

impl TestHost {
    pub async fn start() -> TestHost {
        Self::start_in(tempfile::tempdir().expect("temp dir"), |_| {}).await
    }

    #[allow(dead_code)] // used by tests that tune the host
    pub async fn start_with(adjust: impl FnOnce(&mut sagahost::Config)) -> TestHost {
        Self::start_in(tempfile::tempdir().expect("temp dir"), adjust).await
    }

    /// [`TestHost::start_with`], the relay lease taken by the test (as [`TEST_RELAY`], for an
    /// hour) before the host starts: the host's relay publishes nothing, so its outbox rows stay
    /// unpublished for the test to move to the dead letters as a relay does, under the lease's
    /// epoch (returned), until the test releases the lease (`relay_release(TEST_RELAY)`).
    #[allow(dead_code)] // used by the dead-letter tests
    pub async fn start_holding_the_relay(adjust: impl FnOnce(&mut sagahost::Config)) -> (TestHost, i64) {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = database_for(dir.path()).await;
        let store = sagahost::store::open(url.as_deref(), dir.path()).await.expect("open the host's database");
        let epoch =
            store.relay_lease(TEST_RELAY, 3_600_000).await.unwrap().expect("a new database's relay lease is free");
        drop(store);
        (Self::start_in(dir, adjust).await, epoch)
    }

    /// Starts a host on an existing data directory (to test restarts).
    pub async fn start_in(dir: tempfile::TempDir, adjust: impl FnOnce(&mut sagahost::Config)) -> TestHost {
        let mut config = sagahost::Config::embedded(dir.path());
        config.database = database_for(dir.path()).await;
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.driver.poll_interval = Duration::from_millis(50);
        config.relay.poll_interval = Duration::from_millis(50);
        adjust(&mut config);
        let app = sagahost::App::build(config).await.expect("host builds");
        let base = format!("http://{}", app.local_addr());
        let store = app.store();
        let catalog = app.catalog();
        let shutdown = CancellationToken::new();
        let join = tokio::spawn(app.run(shutdown.clone()));
        TestHost { base, client: reqwest::Client::new(), store, catalog, dir, shutdown, join: Some(join) }
    }

    /// Stops the host gracefully and hands back its data directory.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.shutdown.cancel();
        if let Some(join) = self.join.take() {
            join.await.expect("host task").expect("host ran cleanly");
        }
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Resp {
        let r = req.send().await.expect("request sent");
        let status = r.status();
        let headers = r.headers().clone();
        let bytes = r.bytes().await.expect("body read").to_vec();
        Resp { status, headers, bytes }
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.send(self.client.get(self.url(path))).await
    }

    /// `POST /orders` with an idempotency key (None: no header) and optional `Prefer: wait`.
    pub async fn post_order_raw(&self, key: Option<&str>, body: &[u8], wait: Option<u64>) -> Resp {
        let mut req =
            self.client.post(self.url("/orders")).header("content-type", "application/json").body(body.to_vec());
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        if let Some(w) = wait {
            req = req.header("Prefer", format!("wait={w}"));
        }
        self.send(req).await
    }

    pub async fn post_order(&self, key: &str, body: &Value) -> Resp {
        self.post_order_raw(Some(key), body.to_string().as_bytes(), None).await
    }

    /// Submits an order and waits for it to settle; returns the final order.
    pub async fn run_order(&self, body: &Value) -> Value {
        let r = self.post_order(&key(), body).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&r.bytes));
        let id = r.json()["id"].as_str().unwrap().to_owned();
        self.wait_settled(&id).await
    }

    /// Polls `GET /orders/{id}` until it is COMPLETED, CANCELLED or COMPENSATION_FAILED.
    pub async fn wait_settled(&self, id: &str) -> Value {
        self.wait_for(id, |o| matches!(o["status"].as_str(), Some("COMPLETED" | "CANCELLED" | "COMPENSATION_FAILED")))
            .await
    }

    pub async fn wait_for(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let r = self.get(&format!("/orders/{id}")).await;
            assert_eq!(r.status, StatusCode::OK);
            let o = r.json();
            if done(&o) {
                return o;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "order {id} did not get there in 30 s: {o:#}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// A demo plugin's state record, parsed.
    pub async fn state(&self, plugin: &str, key: &str) -> Option<Value> {
        let bytes = self.store.state_get(plugin, key).await.unwrap()?;
        Some(serde_json::from_slice(&bytes).expect("state is JSON"))
    }

    /// Every outbox event of a saga, parsed, in seq order.
    pub async fn events(&self, saga_id: &str) -> Vec<Value> {
        self.store
            .outbox_for_saga(saga_id)
            .await
            .unwrap()
            .iter()
            .map(|r| serde_json::from_str(&r.payload).unwrap())
            .collect()
    }

    /// How many `StepCompensated` events a saga has for `step`: a compensation that ran once
    /// has exactly one.
    pub async fn compensations(&self, saga_id: &str, step: &str) -> usize {
        self.events(saga_id)
            .await
            .iter()
            .filter(|e| e["type"] == "StepCompensated" && e["data"]["step"] == step)
            .count()
    }

    /// The `type` of each event of a saga, checking seq is 1..=n with no gaps.
    pub async fn event_types(&self, saga_id: &str) -> Vec<String> {
        let events = self.events(saga_id).await;
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e["seq"], json!(i as u64 + 1), "seq gap in {events:#?}");
            assert_eq!(e["saga_id"], json!(saga_id));
        }
        events.iter().map(|e| e["type"].as_str().unwrap().to_owned()).collect()
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
