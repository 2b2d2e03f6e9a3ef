//! `order-http` against the real demo services (issue 12, item 6): the inventory, payment and
//! shipping services run as separate `sagahost-demo-services` processes on port 0; the host
//! is granted their origins and given the `order-http` definition with their real ports over
//! the admin API, exactly as an operator would. Every test checks what the services
//! themselves counted (`GET /effects/{order_id}`, `/stats`, their idempotency tables), not only
//! what the host says.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Map, Value};

use crate::demo::DemoService;
use crate::harness::{fixture, key, order, TestHost};
use crate::process::HostProcess;
use crate::step;

pub(crate) const TOKEN: &str = "services-admin-token";
const SAGA: &str = "order-http";

/// A host under test, in process or as the real binary: its base URL and a client.
#[derive(Clone)]
pub(crate) struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    pub(crate) fn new(base: &str) -> Api {
        Api {
            base: base.to_owned(),
            http: reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap(),
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(b);
        }
        let r = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = r.status();
        let bytes = r.bytes().await.expect("body read");
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, json)
    }

    async fn grant(&self, plugin: &str, origins: &[&str]) {
        let body = json!({ "allowed_hosts": origins });
        let (status, r) = self.call(Method::PUT, &format!("/admin/plugins/{plugin}/grants"), Some(&body)).await;
        assert_eq!(status, StatusCode::OK, "grant {plugin}: {r}");
    }

    pub(crate) async fn define(&self, saga_type: &str, def: &Value) {
        let (status, r) = self.call(Method::PUT, &format!("/admin/sagas/{saga_type}"), Some(def)).await;
        assert_eq!(status, StatusCode::OK, "define {saga_type}: {r}");
    }

    /// `POST /sagas/{type}` with a fresh Idempotency-Key; the new saga's id.
    async fn submit(&self, saga_type: &str, body: Value) -> String {
        let r = self
            .http
            .post(format!("{}/sagas/{saga_type}", self.base))
            .header("Idempotency-Key", key())
            .json(&body)
            .send()
            .await
            .expect("POST /sagas");
        let status = r.status();
        let created: Value = r.json().await.expect("JSON answer");
        assert_eq!(status, StatusCode::CREATED, "{created}");
        created["id"].as_str().expect("saga id").to_owned()
    }

    async fn saga(&self, saga_type: &str, id: &str) -> Value {
        let (status, s) = self.call(Method::GET, &format!("/sagas/{saga_type}/{id}"), None).await;
        assert_eq!(status, StatusCode::OK, "{s}");
        s
    }

    async fn wait_for(&self, saga_type: &str, id: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let s = self.saga(saga_type, id).await;
            if done(&s) {
                return s;
            }
            assert!(start.elapsed() < within, "saga {id} did not get there in {within:?}: {s:#}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until the saga is COMPLETED, CANCELLED or COMPENSATION_FAILED.
    async fn settled(&self, saga_type: &str, id: &str) -> Value {
        self.wait_for(saga_type, id, Duration::from_secs(30), |s| {
            matches!(s["status"].as_str(), Some("COMPLETED" | "CANCELLED" | "COMPENSATION_FAILED"))
        })
        .await
    }
}

/// The three services, each its own process.
pub(crate) struct Services {
    inventory: DemoService,
    payment: DemoService,
    shipping: DemoService,
}

impl Services {
    /// Starts them; the payment service's webhook signals `order-http` sagas at `host_base`.
    pub(crate) async fn start(host_base: &str, inventory_args: &[&str], payment_args: &[&str]) -> Services {
        let owned = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        let mut payment = owned(&["--sagahost-url", host_base, "--saga-type", SAGA]);
        payment.extend(owned(payment_args));
        let inventory = owned(inventory_args);
        let (inventory, payment, shipping) = tokio::join!(
            DemoService::start("inventory", &inventory),
            DemoService::start("payment", &payment),
            DemoService::start("shipping", &[]),
        );
        Services { inventory, payment, shipping }
    }

    /// Every effect of the three services for one order, in one object:
    /// `{"reserve", "release", "charge", "refund", "create", "cancel"}`.
    async fn effects(&self, order_id: &str) -> Value {
        let mut all = Map::new();
        for s in [&self.inventory, &self.payment, &self.shipping] {
            all.extend(s.effects(order_id).await);
        }
        Value::Object(all)
    }

    /// Grants each http plugin its own service's origin, nothing more.
    pub(crate) async fn grant(&self, api: &Api) {
        api.grant("http-inventory", &[&self.inventory.url]).await;
        api.grant("http-payment", &[&self.payment.url]).await;
        api.grant("http-shipment", &[&self.shipping.url]).await;
    }

    /// The `order-http` definition pointed at these services, with short backoffs: like the
    /// built-in one, but test-sized.
    pub(crate) fn definition(&self) -> Value {
        let step = |name: &str, plugin: &str, state: &str, url: &str| {
            json!({
                "name": name, "plugin": plugin, "state": state,
                "config": {"base_url": url},
                "retry": retry(5, 20, 200),
                "compensate_retry": retry(20, 20, 200),
                "timeout_ms": 5_000,
            })
        };
        let mut payment = step("payment", "http-payment", "PAYMENT_CHARGED", &self.payment.url);
        payment["deadline_ms"] = json!(60_000);
        json!({
            "steps": [
                step("inventory", "http-inventory", "INVENTORY_RESERVED", &self.inventory.url),
                payment,
                step("shipment", "http-shipment", "SHIPMENT_CREATED", &self.shipping.url),
            ],
            "sensitive": ["/payment/token"],
        })
    }
}

fn retry(max_attempts: u32, initial_backoff_ms: u64, max_backoff_ms: u64) -> Value {
    json!({"max_attempts": max_attempts, "initial_backoff_ms": initial_backoff_ms, "max_backoff_ms": max_backoff_ms})
}

/// Effect counts, every one of the six listed (0 when not given).
fn effects(counts: &[(&str, u64)]) -> Value {
    let mut all: Map<String, Value> = ["reserve", "release", "charge", "refund", "create", "cancel"]
        .iter()
        .map(|e| (e.to_string(), json!(0)))
        .collect();
    for (name, n) in counts {
        all.insert(name.to_string(), json!(n));
    }
    Value::Object(all)
}

/// In-process host with the admin API on, the services, grants and the definition.
struct Env {
    host: TestHost,
    api: Api,
    services: Services,
}

impl Env {
    async fn start(inventory_args: &[&str], payment_args: &[&str]) -> Env {
        Self::start_with(inventory_args, payment_args, |_| {}).await
    }

    /// Like `start`, with the definition adjusted before it is sent.
    async fn start_with(inventory_args: &[&str], payment_args: &[&str], adjust: impl FnOnce(&mut Value)) -> Env {
        Self::start_configured(inventory_args, payment_args, adjust, |_| {}).await
    }

    /// Like `start_with`, with the host's configuration adjusted too.
    async fn start_configured(
        inventory_args: &[&str],
        payment_args: &[&str],
        adjust: impl FnOnce(&mut Value),
        configure: impl FnOnce(&mut sagahost::Config),
    ) -> Env {
        let host = TestHost::start_with(|c| {
            c.admin_token = Some(TOKEN.into());
            configure(c);
        })
        .await;
        let api = Api::new(&host.base);
        let services = Services::start(&host.base, inventory_args, payment_args).await;
        services.grant(&api).await;
        let mut def = services.definition();
        adjust(&mut def);
        api.define(SAGA, &def).await;
        Env { host, api, services }
    }

    async fn run(&self, body: Value) -> (String, Value) {
        let id = self.api.submit(SAGA, body).await;
        let s = self.api.settled(SAGA, &id).await;
        (id, s)
    }

    /// The events' `type`s, checked gapless, and the `error` of every retry of `step`.
    async fn events(&self, id: &str) -> (Vec<String>, Vec<String>) {
        let types = self.host.event_types(id).await;
        let events = self.host.events(id).await;
        assert!(events.iter().all(|e| e["saga_type"] == SAGA), "{events:#?}");
        (types, retry_errors(&events))
    }
}

/// The error of each `StepRetryScheduled` event, as `step: error`.
fn retry_errors(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "StepRetryScheduled")
        .map(|e| format!("{}: {}", e["data"]["step"].as_str().unwrap(), e["data"]["error"].as_str().unwrap()))
        .collect()
}

#[tokio::test]
async fn happy_path_applies_each_effect_once_with_the_steps_keys() {
    let env = Env::start(&[], &[]).await;
    let (id, s) = env.run(order("tok_visa", "SKU-1", "US")).await;
    assert_eq!(s["status"], "COMPLETED", "{s:#}");
    for name in ["inventory", "payment", "shipment"] {
        let st = step(&s, name);
        assert_eq!((&st["status"], &st["attempts"], &st["last_error"]), (&json!("succeeded"), &json!(1), &Value::Null));
    }
    // The outputs are the services' answers.
    assert_eq!(step(&s, "inventory")["output"]["reservation_id"], format!("res_{id}"));
    assert_eq!(step(&s, "payment")["output"]["charge_id"], format!("ch_{id}"));
    assert_eq!(step(&s, "payment")["output"]["amount_cents"], 3000);
    assert_eq!(step(&s, "shipment")["output"]["tracking"], format!("TRK-{id}"));
    assert_eq!(s["input"]["payment"]["token"], "[redacted]", "the token is sensitive in order-http too");

    assert_eq!(env.services.effects(&id).await, effects(&[("reserve", 1), ("charge", 1), ("create", 1)]));
    // One request each, sent with the step's key (the services store the key with its answer).
    for (svc, step) in [
        (&env.services.inventory, "inventory"),
        (&env.services.payment, "payment"),
        (&env.services.shipping, "shipment"),
    ] {
        assert_eq!(svc.requests().await, 1, "{}", svc.service);
        assert_eq!(svc.keys(&id).await, [format!("{id}:{step}:execute")], "{}", svc.service);
    }
    let (types, retries) = env.events(&id).await;
    // Each call out is recorded as started before it is made.
    assert_eq!(
        types,
        [
            "OrderHttpCreated",
            "StepStarted",
            "InventoryReserved",
            "StepStarted",
            "PaymentCharged",
            "StepStarted",
            "ShipmentCreated",
            "OrderHttpCompleted"
        ]
    );
    assert!(retries.is_empty(), "{retries:?}");
    // Counted per plugin and granted origin, with the time to each response.
    let metrics = String::from_utf8(env.host.get("/metrics").await.bytes).unwrap();
    for (plugin, svc) in [
        ("http-inventory", &env.services.inventory),
        ("http-payment", &env.services.payment),
        ("http-shipment", &env.services.shipping),
    ] {
        let labels = format!("plugin=\"{plugin}\",origin=\"{}\"", svc.url);
        let count = format!("sagahost_plugin_http_requests_total{{{labels},outcome=\"2xx\"}} 1\n");
        assert!(metrics.contains(&count), "no {count:?} in:\n{metrics}");
        let timed = format!("sagahost_plugin_http_request_seconds_count{{{labels}}} 1\n");
        assert!(metrics.contains(&timed), "no {timed:?} in:\n{metrics}");
    }
}

#[tokio::test]
async fn the_payment_step_signs_in_with_a_key_only_the_host_reads_and_a_rotated_or_missing_key_is_handled() {
    // The payment service wants its API key (as a payment provider's API does); the host holds
    // it as a secret file and adds it to the http-payment plugin's requests to that service.
    let files = tempfile::tempdir().unwrap();
    let secrets = files.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    let service_key = files.path().join("service-key");
    std::fs::write(&service_key, "sk_test_first\n").unwrap();
    std::fs::write(secrets.join("payment-key"), "sk_test_first\n").unwrap();
    let dir = sagahost::secrets::Secrets::from_flag(secrets.to_str().unwrap()).unwrap();
    let env = Env::start_configured(
        &[],
        &["--payment-api-key-file", service_key.to_str().unwrap()],
        |_| {},
        |c| c.limits.http.secrets = Some(dir),
    )
    .await;
    let payment = env.services.payment.url.clone();
    // Without the key the service refuses: the plugin alone could not charge.
    let r = reqwest::Client::new()
        .post(format!("{payment}/charges"))
        .header("Idempotency-Key", key())
        .json(&json!({"order_id": "o-1", "amount_cents": 1, "currency": "USD", "token": "tok_visa"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let grant = json!({"allowed_hosts": [payment], "credentials": [
        {"origin": payment, "header": "Authorization", "value": "Bearer ${payment-key}"}]});
    let (status, r) = env.api.call(Method::PUT, "/admin/plugins/http-payment/grants", Some(&grant)).await;
    assert_eq!(status, StatusCode::OK, "{r}");

    let (id, s) = env.run(order("tok_visa", "SKU-1", "US")).await;
    assert_eq!(s["status"], "COMPLETED", "{s:#}");
    assert_eq!(step(&s, "payment")["attempts"], 1);
    assert_eq!(env.services.effects(&id).await, effects(&[("reserve", 1), ("charge", 1), ("create", 1)]));

    // Rotated on both sides: the next charge sends the new key, with no restart.
    std::fs::write(&service_key, "sk_test_second").unwrap();
    std::fs::write(secrets.join("payment-key"), "sk_test_second\n").unwrap();
    let (id, s) = env.run(order("tok_visa", "SKU-1", "US")).await;
    assert_eq!(s["status"], "COMPLETED", "{s:#}");
    assert_eq!(env.services.effects(&id).await, effects(&[("reserve", 1), ("charge", 1), ("create", 1)]));

    // The secret's file gone: the host's failure, not the step's. Nothing is sent, no attempt
    // is spent, and the step goes on once the file is back.
    std::fs::remove_file(secrets.join("payment-key")).unwrap();
    let id = env.api.submit(SAGA, order("tok_visa", "SKU-1", "US")).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let s = env.api.saga(SAGA, &id).await;
    assert_eq!(s["status"], "INVENTORY_RESERVED", "{s:#}");
    let payment_step = step(&s, "payment");
    assert_eq!((&payment_step["status"], &payment_step["attempts"]), (&json!("pending"), &json!(0)), "{s:#}");
    assert_eq!(env.services.effects(&id).await, effects(&[("reserve", 1)]));
    let metrics = String::from_utf8(env.host.get("/metrics").await.bytes).unwrap();
    let held = format!(
        "sagahost_plugin_http_requests_total{{plugin=\"http-payment\",origin=\"{payment}\",outcome=\"credential\"}}"
    );
    assert!(metrics.contains(&held), "no {held:?} in:\n{metrics}");
    std::fs::write(secrets.join("payment-key"), "sk_test_second").unwrap();
    let s = env.api.settled(SAGA, &id).await;
    assert_eq!(s["status"], "COMPLETED", "{s:#}");
    assert_eq!(step(&s, "payment")["attempts"], 1);
    assert_eq!(env.services.effects(&id).await, effects(&[("reserve", 1), ("charge", 1), ("create", 1)]));
    // The key itself shows nowhere the host answers: the saga, its events, the grants.
    let events = json!(env.host.events(&id).await).to_string();
    let (_, grants) = env.api.call(Method::GET, "/admin/plugins/http-payment/grants", None).await;
    for text in [s.to_string(), events, grants.to_string()] {
        assert!(!text.contains("sk_test"), "{text}");
    }
}

#[tokio::test]
async fn out_of_stock_declined_card_and_flaky_gateway_each_take_effect_as_the_service_decides() {
    let env = Env::start(&[], &[]).await;
    let (oos, declined, flaky) = tokio::join!(
        env.run(order("tok_visa", "OOS-1", "US")),
        env.run(order("tok_decline", "SKU-1", "US")),
        env.run(order("tok_flaky", "SKU-1", "US")),
    );

    // OOS-: refused at inventory, nothing to undo, no effect anywhere.
    let (id, s) = oos;
    assert_eq!(s["status"], "CANCELLED", "{s:#}");
    assert_eq!(s["reason"], "inventory: out of stock: OOS-1");
    let inventory = step(&s, "inventory");
    assert_eq!((&inventory["status"], &inventory["attempts"]), (&json!("failed"), &json!(1)));
    assert_eq!(inventory["last_error"], "out of stock: OOS-1");
    assert_eq!(step(&s, "payment")["status"], "pending");
    assert_eq!(env.services.effects(&id).await, effects(&[]));
    assert_eq!(env.services.inventory.keys(&id).await, [format!("{id}:inventory:execute")], "the refusal is stored");
    assert!(env.services.payment.keys(&id).await.is_empty());
    assert_eq!(
        env.events(&id).await.0,
        ["OrderHttpCreated", "StepStarted", "OrderHttpCompensating", "OrderHttpCancelled"]
    );

    // tok_decline: refused at payment; the reservation is released, once.
    let (id, s) = declined;
    assert_eq!(s["status"], "CANCELLED", "{s:#}");
    assert_eq!(s["reason"], "payment: card declined");
    assert_eq!(step(&s, "payment")["status"], "failed");
    assert_eq!(step(&s, "payment")["attempts"], 1);
    assert_eq!(step(&s, "inventory")["status"], "compensated");
    assert_eq!(step(&s, "inventory")["compensate_output"]["released"], true);
    assert_eq!(step(&s, "shipment")["status"], "pending");
    assert_eq!(env.services.effects(&id).await, effects(&[("reserve", 1), ("release", 1)]));
    assert_eq!(
        env.services.inventory.keys(&id).await,
        [format!("{id}:inventory:compensate"), format!("{id}:inventory:execute")]
    );
    assert_eq!(
        env.events(&id).await.0,
        [
            "OrderHttpCreated",
            "StepStarted",
            "InventoryReserved",
            "StepStarted",
            "OrderHttpCompensating",
            "StepCompensated",
            "OrderHttpCancelled"
        ]
    );

    // tok_flaky: two 503s, then the charge on attempt 3, applied once.
    let (id, s) = flaky;
    assert_eq!(s["status"], "COMPLETED", "{s:#}");
    assert_eq!(step(&s, "payment")["attempts"], 3);
    assert_eq!(env.services.effects(&id).await, effects(&[("reserve", 1), ("charge", 1), ("create", 1)]));
    assert_eq!(env.services.payment.keys(&id).await, [format!("{id}:payment:execute")]);
    let (types, retries) = env.events(&id).await;
    assert_eq!(retries.len(), 2, "{retries:?}");
    for r in &retries {
        assert!(
            r.starts_with("payment: ") && r.contains("answered 503") && r.contains("payment gateway unavailable"),
            "{r}"
        );
    }
    assert_eq!(types.last().unwrap(), "OrderHttpCompleted");
    // Every POST /charges of the three orders: 1 (declined) + 3 (flaky); inventory refused the first.
    assert_eq!(env.services.payment.requests().await, 4);
}

#[tokio::test]
async fn three_d_secure_waits_until_the_payment_services_webhook_signals_the_saga() {
    let env = Env::start(&[], &[]).await;
    let api = &env.api;
    let id = api.submit(SAGA, order("tok_3ds", "SKU-1", "US")).await;
    let s = api.wait_for(SAGA, &id, Duration::from_secs(30), |s| step(s, "payment")["status"] == "waiting").await;
    assert_eq!(s["status"], "INVENTORY_RESERVED");
    assert_eq!(step(&s, "payment")["waiting_for"], "payment-confirmed");
    // Nothing charged yet: the service holds the charge until the customer confirms.
    assert_eq!(env.services.effects(&id).await, effects(&[("reserve", 1)]));

    // The customer confirms at the payment service; its webhook signals the saga.
    let r = api.http.post(format!("{}/charges/{id}/confirm", env.services.payment.url)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "charged");
    let s = api.settled(SAGA, &id).await;
    assert_eq!(s["status"], "COMPLETED", "{s:#}");
    assert_eq!(step(&s, "payment")["output"]["status"], "charged");
    assert_eq!(env.services.effects(&id).await, effects(&[("reserve", 1), ("charge", 1), ("create", 1)]));
    let (types, retries) = env.events(&id).await;
    assert_eq!(
        types,
        [
            "OrderHttpCreated",
            "StepStarted",
            "InventoryReserved",
            "StepStarted",
            "StepWaiting",
            "SignalReceived",
            "StepStarted",
            "PaymentCharged",
            "StepStarted",
            "ShipmentCreated",
            "OrderHttpCompleted"
        ]
    );
    assert!(retries.is_empty(), "{retries:?}");
    let signal = env.host.events(&id).await.into_iter().find(|e| e["type"] == "SignalReceived").unwrap();
    assert_eq!(signal["data"]["signal"], "payment-confirmed", "{signal:#}");
}

#[tokio::test]
async fn a_shipping_refusal_refunds_then_releases_each_effect_once() {
    let env = Env::start(&[], &[]).await;
    let (id, s) = env.run(order("tok_visa", "SKU-1", "XX")).await;
    assert_eq!(s["status"], "CANCELLED", "{s:#}");
    assert_eq!(s["reason"], "shipment: no carrier for XX");
    assert_eq!(step(&s, "shipment")["status"], "failed");
    assert_eq!(step(&s, "shipment")["last_error"], "no carrier for XX");
    for name in ["payment", "inventory"] {
        let st = step(&s, name);
        assert_eq!((&st["status"], &st["compensate_attempts"]), (&json!("compensated"), &json!(1)), "{name}");
    }
    assert_eq!(
        step(&s, "payment")["compensate_output"],
        json!({"order_id": id, "status": "refunded", "refunded_cents": 3000})
    );
    assert_eq!(
        env.services.effects(&id).await,
        effects(&[("reserve", 1), ("charge", 1), ("refund", 1), ("release", 1)])
    );
    assert_eq!(env.services.shipping.keys(&id).await, [format!("{id}:shipment:execute")]);
    assert_eq!(
        env.services.payment.keys(&id).await,
        [format!("{id}:payment:compensate"), format!("{id}:payment:execute")]
    );
    // Compensation in reverse order: payment (refund), then inventory (release).
    let compensated: Vec<Value> = env
        .host
        .events(&id)
        .await
        .into_iter()
        .filter(|e| e["type"] == "StepCompensated")
        .map(|e| e["data"]["step"].clone())
        .collect();
    assert_eq!(compensated, [json!("payment"), json!("inventory")]);
    assert_eq!(
        env.events(&id).await.0,
        [
            "OrderHttpCreated",
            "StepStarted",
            "InventoryReserved",
            "StepStarted",
            "PaymentCharged",
            "StepStarted",
            "OrderHttpCompensating",
            "StepCompensated",
            "StepCompensated",
            "OrderHttpCancelled"
        ]
    );
    // Exactly one request per action: reserve, charge, create (refused), refund, release.
    assert_eq!(env.services.inventory.requests().await, 2);
    assert_eq!(env.services.payment.requests().await, 2);
    assert_eq!(env.services.shipping.requests().await, 1);
}

#[tokio::test]
async fn an_inventory_answering_503_twice_is_retried_and_reserves_once() {
    let env = Env::start(&[], &[]).await;
    let (id, s) = env.run(order("tok_visa", "FLAKY-1", "US")).await;
    assert_eq!(s["status"], "COMPLETED", "{s:#}");
    assert_eq!(step(&s, "inventory")["attempts"], 3);
    assert_eq!(step(&s, "payment")["attempts"], 1);
    assert_eq!(env.services.effects(&id).await, effects(&[("reserve", 1), ("charge", 1), ("create", 1)]));
    assert_eq!(env.services.inventory.requests().await, 3, "two 503s and the reservation");
    let (_, retries) = env.events(&id).await;
    assert_eq!(retries.len(), 2, "{retries:?}");
    for r in &retries {
        assert!(r.starts_with("inventory: ") && r.contains("answered 503"), "{r}");
    }
}

#[tokio::test]
async fn a_service_killed_and_restarted_while_sagas_run_applies_each_effect_once() {
    let mut env = Env::start_with(&[], &[], |def| {
        for st in def["steps"].as_array_mut().unwrap() {
            st["retry"] = retry(30, 100, 1_000);
        }
    })
    .await;
    let mut ids: Vec<String> =
        futures::future::join_all((0..5).map(|_| env.api.submit(SAGA, order("tok_visa", "SKU-1", "US")))).await;

    // Kill the payment service once it has taken a couple of charges, while the rest may be
    // due; the sagas submitted after the kill surely meet it dead (a fast host may have
    // charged all of the first ones already).
    let start = Instant::now();
    while env.services.payment.requests().await < 2 {
        assert!(start.elapsed() < Duration::from_secs(30), "no charge reached the payment service");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    env.services.payment.kill().await;
    ids.extend(futures::future::join_all((0..5).map(|_| env.api.submit(SAGA, order("tok_visa", "SKU-1", "US")))).await);
    let mut completed = 0;
    for id in &ids {
        completed += usize::from(env.api.saga(SAGA, id).await["status"] == "COMPLETED");
    }
    assert!(completed < ids.len(), "every saga completed before the kill: the test tested nothing");
    tokio::time::sleep(Duration::from_millis(800)).await;
    env.services.payment.restart().await;

    let mut retried = 0;
    for id in &ids {
        let s = env.api.settled(SAGA, id).await;
        assert_eq!(s["status"], "COMPLETED", "{s:#}");
        assert_eq!(env.services.effects(id).await, effects(&[("reserve", 1), ("charge", 1), ("create", 1)]), "{id}");
        assert_eq!(env.services.payment.keys(id).await, [format!("{id}:payment:execute")]);
        let (_, retries) = env.events(id).await;
        assert!(retries.iter().all(|r| r.starts_with("payment: ")), "{retries:?}");
        retried += usize::from(!retries.is_empty());
    }
    assert!(retried > 0, "no saga met the dead payment service");
    println!("{retried} of {} sagas retried their payment across the outage", ids.len());
}

/// The `type` of every event of saga `id`, read from the outbox of the data dir `dir` (its host
/// may be down).
async fn stored_event_types(dir: &std::path::Path, id: &str) -> Vec<String> {
    let events = crate::harness::open_store(dir).await.outbox_for_saga(id).await.unwrap();
    events
        .iter()
        .map(|r| serde_json::from_str::<Value>(&r.payload).unwrap()["type"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_host_killed_after_the_charge_but_before_its_commit_resends_with_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let env_token = [("SAGAHOST_ADMIN_TOKEN", TOKEN)];
    let host = HostProcess::spawn(dir.path(), None, &env_token).await;
    let api = Api::new(&host.base);
    // Held 10 s: time for a loaded machine to see the charge and kill the host meanwhile (the
    // resend after the restart is answered from the service's record at once).
    let services = Services::start(&host.base, &[], &["--hold-ms", "10000"]).await;
    services.grant(&api).await;
    let mut def = services.definition();
    def["steps"][1]["timeout_ms"] = json!(15_000); // longer than the hold
    api.define(SAGA, &def).await;

    let id = api.submit(SAGA, order("tok_hold", "SKU-1", "US")).await;
    let started = Instant::now();
    // The service charged and committed its answer, and holds it: the host is still waiting.
    let start = Instant::now();
    while services.payment.effects(&id).await["charge"] != 1 {
        assert!(start.elapsed() < Duration::from_secs(20), "the payment service never charged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = api.saga(SAGA, &id).await;
    assert_eq!(
        (&s["status"], &step(&s, "payment")["status"]),
        (&json!("INVENTORY_RESERVED"), &json!("pending")),
        "{s:#}"
    );
    host.kill().await;

    let host = HostProcess::spawn(dir.path(), None, &env_token).await;
    let api = Api::new(&host.base);
    let s = api.settled(SAGA, &id).await;
    assert_eq!(s["status"], "COMPLETED", "{s:#}\n{}", host.log());
    assert_eq!(step(&s, "payment")["output"]["charge_id"], format!("ch_{id}"));
    // As Temporal does for an activity whose worker died, the restarted host resends only once
    // the killed call's time is over (its step's timeout from its start, and the grace): a
    // caller that froze rather than died could still be sending it.
    assert!(started.elapsed() >= Duration::from_secs(15), "resent before the killed call's timeout was over");
    // The payment service's own count: one charge, though it was asked twice, with one key.
    assert_eq!(services.effects(&id).await, effects(&[("reserve", 1), ("charge", 1), ("create", 1)]));
    assert_eq!(services.payment.requests().await, 2, "the charge was sent again after the restart");
    assert_eq!(services.payment.keys(&id).await, [format!("{id}:payment:execute")]);
    let types = stored_event_types(dir.path(), &id).await;
    // The payment's start twice: before the kill, and again before the resend.
    assert_eq!(
        types,
        [
            "OrderHttpCreated",
            "StepStarted",
            "InventoryReserved",
            "StepStarted",
            "StepStarted",
            "PaymentCharged",
            "StepStarted",
            "ShipmentCreated",
            "OrderHttpCompleted"
        ]
    );
}

/// A refund goes out only once the decision to compensate is durable. The payment (it calls
/// out) commits alone; the shipment (host state only) is rejected and the saga turns to
/// compensating in the same chain that then calls the refund: that chain is committed before
/// the refund call, so a host killed right after the refund went out restarts from
/// COMPENSATING, not from a saga still going forward whose rejected step, run again, could
/// succeed (or a signal accepted meanwhile could complete it) with the charge refunded.
#[tokio::test]
async fn a_refund_goes_out_only_after_the_decision_to_compensate_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let token = ("SAGAHOST_ADMIN_TOKEN", TOKEN);
    let mut host = HostProcess::spawn(dir.path(), Some("driver-after-compensate-call=abort"), &[token]).await;
    let api = Api::new(&host.base);
    let services = Services::start(&host.base, &[], &[]).await;
    services.grant(&api).await;
    let def = services.definition();
    let mut payment = def["steps"][1].clone();
    payment["compensate_retry"] = retry(5, 20, 200);
    // The demo `shipment` step keeps to host state and rejects country XX.
    let shipment = json!({"name": "shipment", "plugin": "shipment", "state": "SHIPMENT_CREATED"});
    api.define(SAGA, &json!({"steps": [payment, shipment], "sensitive": ["/payment/token"]})).await;
    let id = api.submit(SAGA, order("tok_visa", "SKU-1", "XX")).await;
    // The refund call is the process's first compensation: it aborts right after it.
    host.wait_failpoint("driver-after-compensate-call", 1, Duration::from_secs(30)).await;
    assert_eq!(services.payment.effects(&id).await["refund"], 1, "the refund went out before the abort");
    let types = stored_event_types(dir.path(), &id).await;
    assert_eq!(
        types,
        ["OrderHttpCreated", "StepStarted", "PaymentCharged", "OrderHttpCompensating"],
        "the shipment's rejection (the turn to compensating) was committed before the refund"
    );
    // Restarted: the refund again, with the same key (the service answers from its record).
    let host = HostProcess::spawn(dir.path(), None, &[token]).await;
    let s = Api::new(&host.base).settled(SAGA, &id).await;
    assert_eq!(s["status"], "CANCELLED", "{s:#}\n{}", host.log());
    assert_eq!(services.effects(&id).await, effects(&[("charge", 1), ("refund", 1)]));
    // (The service lists its keys in order.)
    assert_eq!(services.payment.keys(&id).await, [format!("{id}:payment:compensate"), format!("{id}:payment:execute")]);
}

#[tokio::test]
async fn a_cancel_while_the_charge_is_in_flight_refunds_it_once_the_call_has_ended() {
    // The payment service charges, commits and then holds its answer 4 s, past the step's 2 s
    // timeout: the host is mid-call, with the charge already made, when the client cancels.
    // The attempt's result will never commit (the cancel took the saga over), so only the
    // durable record that the attempt started says the card may have been charged; and the
    // refund must wait until the call can send nothing more, or it could overtake the charge.
    let env = Env::start_with(&[], &["--hold-ms", "4000"], |def| {
        def["steps"][1]["timeout_ms"] = json!(2_000);
    })
    .await;
    let id = env.api.submit(SAGA, order("tok_hold", "SKU-1", "US")).await;
    let start = Instant::now();
    while env.services.payment.effects(&id).await["charge"] != 1 {
        assert!(start.elapsed() < Duration::from_secs(20), "the payment service never charged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The step shows its call in flight, and until when.
    let s = env.api.saga(SAGA, &id).await;
    assert_eq!(step(&s, "payment")["status"], "pending", "{s:#}");
    let in_flight = step(&s, "payment")["call_in_flight_until"].as_str().map(str::to_owned);
    assert!(in_flight.is_some(), "{s:#}");
    let (status, answer) = env.api.call(Method::POST, &format!("/sagas/{SAGA}/{id}/cancel"), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let s = env.api.settled(SAGA, &id).await;
    assert_eq!(s["status"], "CANCELLED", "{s:#}");
    let payment = step(&s, "payment");
    assert_eq!(payment["call_in_flight_until"], Value::Null, "undone: no call in flight any more");
    assert_eq!((&payment["status"], &payment["output"]), (&json!("compensated"), &Value::Null), "{s:#}");
    assert_eq!(
        payment["compensate_output"],
        json!({"order_id": id, "status": "refunded", "refunded_cents": 3000}),
        "the refund found the charge: it ran after the call had ended"
    );
    assert_eq!(
        env.services.effects(&id).await,
        effects(&[("reserve", 1), ("charge", 1), ("refund", 1), ("release", 1)])
    );
    let events = env.host.events(&id).await;
    let started = events
        .iter()
        .find(|e| e["type"] == "StepStarted" && e["data"]["step"] == "payment")
        .unwrap_or_else(|| panic!("no StepStarted for the payment: {events:#?}"));
    let until = started["data"]["until"].as_i64().expect("until");
    let refunded = events
        .iter()
        .find(|e| e["type"] == "StepCompensated" && e["data"]["step"] == "payment")
        .expect("the payment's StepCompensated");
    let refunded_at = chrono::DateTime::parse_from_rfc3339(refunded["at"].as_str().unwrap()).unwrap();
    assert!(refunded_at.timestamp_millis() >= until, "refunded at {refunded_at}, before the call's end {until}");
    assert_eq!(
        env.events(&id).await.0,
        [
            "OrderHttpCreated",
            "StepStarted",
            "InventoryReserved",
            "StepStarted",
            "OrderHttpCompensating",
            "StepCompensated",
            "StepCompensated",
            "OrderHttpCancelled"
        ]
    );
}

#[tokio::test]
async fn a_service_slower_than_the_attempt_timeout_fails_the_attempt_and_holds_up_no_other_saga() {
    // Four SLOW- orders whose first inventory request sleeps 20 s against a 10 s attempt
    // timeout, started together with six ordinary orders. The timeout is long so that a loaded
    // machine finishes the ordinary orders well before it, and short enough that a host whose
    // slow calls held up the others would make them wait for it.
    let env = Env::start_with(&["--slow-ms", "20000"], &[], |def| {
        def["steps"][0]["timeout_ms"] = json!(10_000);
    })
    .await;
    let started = Instant::now();
    let slow: Vec<String> =
        futures::future::join_all((0..4).map(|_| env.api.submit(SAGA, order("tok_visa", "SLOW-1", "US")))).await;
    let ordinary = futures::future::join_all((0..6).map(|_| async {
        let (id, s) = env.run(order("tok_visa", "SKU-1", "US")).await;
        (id, s, started.elapsed())
    }))
    .await;
    let ordinary_done = started.elapsed();
    // The ordinary orders completed while the slow orders' first calls were still waiting on
    // the service (no attempt of theirs has ended yet): those calls hold no thread the other
    // sagas need.
    for id in &slow {
        let s = env.api.saga(SAGA, id).await;
        let inventory = step(&s, "inventory");
        assert_eq!(
            (&s["status"], &inventory["status"], &inventory["attempts"], &inventory["last_error"]),
            (&json!("CREATED"), &json!("pending"), &json!(0), &Value::Null),
            "a slow order's first call ended before the ordinary orders completed ({ordinary_done:?}): {s:#}"
        );
    }
    for (id, s, took) in &ordinary {
        assert_eq!(s["status"], "COMPLETED", "{s:#}");
        assert!(*took < Duration::from_secs(8), "an ordinary order took {took:?} next to slow calls");
        assert_eq!(env.services.effects(id).await, effects(&[("reserve", 1), ("charge", 1), ("create", 1)]));
    }
    for id in &slow {
        let s = env.api.settled(SAGA, id).await;
        assert_eq!(s["status"], "COMPLETED", "{s:#}");
        assert_eq!(step(&s, "inventory")["attempts"], 2);
        let (_, retries) = env.events(id).await;
        assert_eq!(retries, ["inventory: timed out after 10000 ms"]);
        assert_eq!(env.services.effects(id).await, effects(&[("reserve", 1), ("charge", 1), ("create", 1)]));
    }
    let slow_done = started.elapsed();
    assert!(slow_done >= Duration::from_secs(10), "the slow orders cannot finish before their timeout");
    println!("ordinary orders done after {ordinary_done:?}, slow ones after {slow_done:?}");
}

#[tokio::test]
async fn new_sagas_past_the_driver_s_queue_are_shed_with_503_before_any_write() {
    // One saga runs at a time and two may wait: a SLOW- order holds the one place for 8 s
    // (its inventory request sleeps; long, so a loaded machine is done queueing and shedding
    // well before), two ordinary orders queue behind it, the fourth is shed.
    let env = Env::start_configured(
        &["--slow-ms", "8000"],
        &[],
        |def| def["steps"][0]["timeout_ms"] = json!(15_000),
        |c| {
            c.driver.max_concurrency = 1;
            c.driver.max_queued = 2;
        },
    )
    .await;
    let slow = env.api.submit(SAGA, order("tok_visa", "SLOW-1", "US")).await;
    // The driver takes it at once (a few ms); its first call then waits on the service.
    env.api.wait_for(SAGA, &slow, Duration::from_secs(2), |s| s["status"] == "CREATED").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let queued = [
        env.api.submit(SAGA, order("tok_visa", "SKU-1", "US")).await,
        env.api.submit(SAGA, order("tok_visa", "SKU-1", "US")).await,
    ];
    let shed_key = key();
    let post = || {
        env.host.send(
            env.host
                .client
                .post(env.host.url(&format!("/sagas/{SAGA}")))
                .header("Idempotency-Key", &shed_key)
                .json(&order("tok_visa", "SKU-1", "US")),
        )
    };
    let shed = post().await;
    assert_eq!(shed.status, StatusCode::SERVICE_UNAVAILABLE, "{}", String::from_utf8_lossy(&shed.bytes));
    assert_eq!(shed.json()["error"]["code"], "overloaded");
    assert_eq!(shed.header("retry-after").as_deref(), Some("1"));
    let listed = env.host.get(&format!("/sagas/{SAGA}")).await.json();
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(3), "the shed request wrote no saga: {listed:#}");
    let metrics = String::from_utf8_lossy(&env.host.get("/metrics").await.bytes).into_owned();
    assert!(metrics.contains("sagahost_sagas_shed_total 1\n"), "the shed saga is counted: {metrics}");
    // Everything admitted completes; then the shed request, retried with its key, is admitted.
    for id in std::iter::once(&slow).chain(&queued) {
        assert_eq!(env.api.settled(SAGA, id).await["status"], "COMPLETED");
    }
    let retried = post().await;
    assert_eq!(retried.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&retried.bytes));
    assert_eq!(retried.header("idempotent-replayed"), None, "the shed attempt stored no answer");
    let id = retried.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(env.api.settled(SAGA, &id).await["status"], "COMPLETED");
}

/// A waiting request's saga is created together with its first steps, unless a step may
/// call another service: then the saga is durable before the call goes out, so the effect
/// out there belongs to a saga a retry of the request finds (the same step keys).
#[tokio::test]
async fn a_waiting_requests_saga_is_durable_before_its_first_step_calls_out() {
    // The service sleeps 8 s (the step may take 15): a saga stored only once its first call
    // came back would be listed after 8 s, a loaded machine lists a durable one well within 6.
    let env = Env::start_with(&["--slow-ms", "8000"], &[], |def| {
        def["steps"][0]["timeout_ms"] = json!(15_000);
    })
    .await;
    let waiting = env.host.send(
        env.host
            .client
            .post(env.host.url(&format!("/sagas/{SAGA}")))
            .header("Idempotency-Key", key())
            .header("Prefer", "wait=20")
            .json(&order("tok_visa", "SLOW-1", "US")),
    );
    // The inventory request sleeps in the service: meanwhile the saga must be listed.
    let watch = async {
        let started = Instant::now();
        loop {
            let page = env.host.get(&format!("/sagas/{SAGA}")).await.json();
            let data = page["data"].as_array().cloned().unwrap_or_default();
            if let Some(s) = data.first() {
                break s.clone();
            }
            assert!(started.elapsed() < Duration::from_secs(6), "no saga stored while its first call was out");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (r, listed) = tokio::join!(waiting, watch);
    assert_eq!(listed["status"], "CREATED", "{listed:#}");
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.bytes));
    let done = r.json();
    assert_eq!((&done["id"], &done["status"]), (&listed["id"], &json!("COMPLETED")));
    let id = done["id"].as_str().unwrap();
    assert_eq!(env.services.effects(id).await, effects(&[("reserve", 1), ("charge", 1), ("create", 1)]));
}

#[tokio::test]
async fn a_response_over_the_size_limit_fails_the_step_and_the_host_keeps_serving() {
    let env = Env::start_with(&[], &[], |def| {
        def["steps"][0]["retry"] = retry(2, 20, 50);
    })
    .await;
    let (id, s) = env.run(order("tok_visa", "HUGE-1", "US")).await;
    assert_eq!(s["status"], "CANCELLED", "{s:#}");
    let inventory = step(&s, "inventory");
    assert_eq!((&inventory["status"], &inventory["attempts"]), (&json!("compensated"), &json!(2)));
    // Its compensation succeeded (which clears last_error); the saga's reason keeps why.
    let error = s["reason"].as_str().unwrap();
    assert!(
        error.starts_with("inventory: gave up after 2 failed attempts: ")
            && error.contains("larger than 1048576 bytes"),
        "{error}"
    );
    let (_, retries) = env.events(&id).await;
    assert_eq!(retries.len(), 1, "{retries:?}");
    assert!(retries[0].contains("larger than 1048576 bytes"), "{retries:?}");
    // The service reserved (and replayed the same 2 MiB answer to the retry), but the step
    // never read an answer: its requests left the host, so it may have had effects, and it
    // is compensated although it never completed. The release undoes the reservation.
    assert_eq!(env.services.effects(&id).await, effects(&[("reserve", 1), ("release", 1)]));
    assert_eq!(env.services.inventory.requests().await, 3, "two reserve attempts and one release");
    assert_eq!(step(&s, "inventory")["compensate_attempts"], 1);

    // The host is up and answers; the next order completes.
    assert_eq!(env.host.get("/healthz").await.status, StatusCode::OK);
    let (id, s) = env.run(order("tok_visa", "SKU-1", "US")).await;
    assert_eq!(s["status"], "COMPLETED", "{s:#}");
    assert_eq!(env.services.effects(&id).await, effects(&[("reserve", 1), ("charge", 1), ("create", 1)]));
}

#[tokio::test]
async fn a_request_to_an_origin_not_granted_is_denied_without_a_connection() {
    // A listener that counts the connections it accepts.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let trap = format!("http://{}", listener.local_addr().unwrap());
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((_socket, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });

    // http-payment keeps its grant for the real payment service, but its step points elsewhere.
    let env = Env::start_with(&[], &[], |def| {
        def["steps"][1]["config"]["base_url"] = json!(trap);
        def["steps"][1]["retry"] = retry(2, 20, 50);
    })
    .await;
    let (id, s) = env.run(order("tok_visa", "SKU-1", "US")).await;
    assert_eq!(s["status"], "CANCELLED", "{s:#}");
    let payment = step(&s, "payment");
    assert_eq!((&payment["status"], &payment["attempts"]), (&json!("failed"), &json!(2)));
    let error = payment["last_error"].as_str().unwrap();
    assert!(error.contains("denied") && error.contains(&trap), "{error}");
    assert_eq!(step(&s, "inventory")["status"], "compensated");
    assert_eq!(env.services.effects(&id).await, effects(&[("reserve", 1), ("release", 1)]));
    assert_eq!(env.services.payment.requests().await, 0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0, "a denied request opened a connection");
    // Counted as denied, under no origin: the plugin's URL is not a label.
    let metrics = String::from_utf8(env.host.get("/metrics").await.bytes).unwrap();
    let denied = "sagahost_plugin_http_requests_total{plugin=\"http-payment\",origin=\"-\",outcome=\"denied\"} 2\n";
    assert!(metrics.contains(denied), "no {denied:?} in:\n{metrics}");
    assert!(!metrics.contains(&format!("origin=\"{trap}\"")), "the denied URL became a label:\n{metrics}");
}

#[tokio::test]
async fn a_0_1_0_plugin_uploaded_before_keeps_running_next_to_0_2_0_http_steps() {
    // Uploaded to a host that then restarts: the plugin comes back from the store.
    let host = TestHost::start_with(|c| c.admin_token = Some(TOKEN.into())).await;
    let r = host
        .send(host.client.post(host.url("/admin/plugins/legacy")).bearer_auth(TOKEN).body(fixture("legacy-v0-1")))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&r.bytes));
    let legacy = r.json()["digest"].as_str().unwrap().to_owned();
    let dir = host.stop().await;
    let host = TestHost::start_in(dir, |c| c.admin_token = Some(TOKEN.into())).await;
    let api = Api::new(&host.base);

    // A saga type with the 0.1.0 step first, then the 0.2.0 http-inventory step.
    let services = Services::start(&host.base, &[], &[]).await;
    services.grant(&api).await;
    let def = services.definition();
    let mixed = json!({"steps": [
        {"name": "legacy", "plugin": "legacy", "state": "LEGACY_DONE", "retry": retry(2, 20, 50)},
        def["steps"][0].clone(),
    ]});
    api.define("mixed", &mixed).await;
    let id = api.submit("mixed", json!({"customer_id": "c-1", "items": [{"sku": "SKU-1", "quantity": 1}]})).await;
    let s = api.settled("mixed", &id).await;
    assert_eq!(s["status"], "COMPLETED", "{s:#}");
    assert_eq!(step(&s, "legacy")["execute_digest"], json!(legacy));
    assert_eq!(step(&s, "legacy")["output"], json!({"world": "0.1.0", "saga_id": id}));
    assert_eq!(step(&s, "inventory")["output"]["reservation_id"], format!("res_{id}"));
    assert_eq!(services.inventory.effects(&id).await["reserve"], 1);

    let (status, view) = api.call(Method::GET, &format!("/admin/plugins/legacy/state?prefix=legacy/{id}"), None).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    let data = view["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "{view}");
    assert_eq!((&data[0]["key"], &data[0]["value"]), (&json!(format!("legacy/{id}")), &json!("0.1.0")), "{view}");
    // The admin API says which world each version targets, after the restart too.
    let (_, plugin) = api.call(Method::GET, "/admin/plugins/legacy", None).await;
    assert_eq!(
        (&plugin["versions"][0]["world"], &plugin["versions"][0]["outbound_http"]),
        (&json!("0.1.0"), &json!(false))
    );
}

/// A TLS front for a plain-HTTP demo service, as a load balancer terminating TLS would be:
/// it accepts TLS on 127.0.0.1 with the fixture certificate for `localhost`
/// (`tests/fixtures/tls`, issued by the fixture CA) and relays each connection's bytes to the
/// service. Counts the handshakes that succeeded and those that failed. Stops when dropped.
struct TlsFront {
    /// `https://localhost:<port>`: the origin to grant and the step's `base_url`.
    url: String,
    handshakes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

fn tls_fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tls").join(name)
}

impl TlsFront {
    async fn start(backend: &str) -> TlsFront {
        TlsFront::start_asking(backend, None).await
    }

    /// The same, asking for a client certificate issued by the fixture CA `client_ca` (mutual
    /// TLS) when given: a handshake without one counts as refused.
    async fn start_asking(backend: &str, client_ca: Option<&str>) -> TlsFront {
        TlsFront::start_as(backend, "localhost", client_ca).await
    }

    /// The same, presenting the fixture certificate `{cert}.pem` instead; its URL names
    /// `payments.internal` for the `internal` one (a name only an egress proxy resolves).
    async fn start_as(backend: &str, cert: &str, client_ca: Option<&str>) -> TlsFront {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let certs: Vec<_> = CertificateDer::pem_file_iter(tls_fixture(&format!("{cert}.pem")))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(tls_fixture(&format!("{cert}.key"))).unwrap();
        let builder = rustls::ServerConfig::builder();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(CertificateDer::from_pem_file(tls_fixture(ca)).unwrap()).unwrap();
                builder.with_client_cert_verifier(
                    rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build().unwrap(),
                )
            }
        };
        let config = builder.with_single_cert(certs, key).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let name = if cert == "internal" { "payments.internal" } else { "localhost" };
        let url = format!("https://{name}:{}", listener.local_addr().unwrap().port());
        let backend = backend.strip_prefix("http://").expect("a plain-HTTP service").to_owned();
        let (handshakes, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (ok, failed) = (Arc::clone(&handshakes), Arc::clone(&refused));
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (acceptor, backend, ok, failed) = (acceptor.clone(), backend.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(socket).await else {
                        failed.fetch_add(1, Ordering::SeqCst);
                        return;
                    };
                    ok.fetch_add(1, Ordering::SeqCst);
                    let mut service = tokio::net::TcpStream::connect(&backend).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut service).await;
                });
            }
        });
        TlsFront { url, handshakes, refused, task }
    }

    fn handshakes(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering;
        (self.handshakes.load(Ordering::SeqCst), self.refused.load(Ordering::SeqCst))
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn steps_reach_their_services_over_https_trusting_the_operator_s_ca() {
    let trust = sagahost::runtime::TlsTrust::with_pem_file(&tls_fixture("ca.pem")).unwrap();
    let env = Env::start_configured(&[], &[], |_| {}, |c| c.limits.http.trust = trust).await;
    let (inventory, payment, shipping) = tokio::join!(
        TlsFront::start(&env.services.inventory.url),
        TlsFront::start(&env.services.payment.url),
        TlsFront::start(&env.services.shipping.url),
    );
    // Each plugin granted its service's https origin only, and the steps pointed at it.
    env.api.grant("http-inventory", &[&inventory.url]).await;
    env.api.grant("http-payment", &[&payment.url]).await;
    env.api.grant("http-shipment", &[&shipping.url]).await;
    let mut def = env.services.definition();
    for (i, front) in [&inventory, &payment, &shipping].iter().enumerate() {
        def["steps"][i]["config"]["base_url"] = json!(front.url);
    }
    env.api.define(SAGA, &def).await;
    let (id, s) = env.run(order("tok_visa", "SKU-1", "US")).await;
    assert_eq!(s["status"], "COMPLETED", "{s:#}");
    assert_eq!(step(&s, "payment")["output"]["charge_id"], format!("ch_{id}"));
    assert_eq!(env.services.effects(&id).await, effects(&[("reserve", 1), ("charge", 1), ("create", 1)]));
    for (front, svc) in
        [(&inventory, &env.services.inventory), (&payment, &env.services.payment), (&shipping, &env.services.shipping)]
    {
        let (ok, refused) = front.handshakes();
        assert!(ok >= 1 && refused == 0, "{}: {ok} handshakes, {refused} refused", svc.service);
        assert_eq!(svc.keys(&id).await.len(), 1, "{}: one request, through TLS", svc.service);
    }
}

/// Mutual TLS: the payment service asks for a client certificate from its own CA; the host
/// presents the one it was given (`--outbound-client-cert`, `--outbound-client-key`), and the
/// charge goes through. The other services do not ask, and are reached as before.
#[tokio::test]
async fn steps_present_the_host_s_client_certificate_to_services_that_ask_for_one() {
    use sagahost::runtime::{ClientCertChain, ClientKey, TlsTrust};
    let path = |name: &str| tls_fixture(name).to_str().unwrap().to_owned();
    let chain = ClientCertChain::from_flag(&path("client.pem")).unwrap();
    let key = ClientKey::from_flag(&path("client.key")).unwrap();
    let trust = TlsTrust::with_pem_file(&tls_fixture("ca.pem")).unwrap().presenting(&chain, &key).unwrap();
    let env = Env::start_configured(&[], &[], |_| {}, |c| c.limits.http.trust = trust).await;
    let payment = TlsFront::start_asking(&env.services.payment.url, Some("client-ca.pem")).await;
    env.api.grant("http-payment", &[&payment.url]).await;
    let mut def = env.services.definition();
    def["steps"][1]["config"]["base_url"] = json!(payment.url);
    env.api.define(SAGA, &def).await;
    let (id, s) = env.run(order("tok_visa", "SKU-1", "US")).await;
    assert_eq!(s["status"], "COMPLETED", "{s:#}");
    assert_eq!(env.services.effects(&id).await, effects(&[("reserve", 1), ("charge", 1), ("create", 1)]));
    assert_eq!(payment.handshakes(), (1, 0), "the service took the host's certificate");
}

#[tokio::test]
async fn a_service_whose_certificate_the_host_does_not_trust_is_never_sent_a_request() {
    // The host trusts the public CAs only (the default); the payment service's certificate
    // was issued by the fixture CA.
    let env = Env::start(&[], &[]).await;
    let payment = TlsFront::start(&env.services.payment.url).await;
    env.api.grant("http-payment", &[&payment.url]).await;
    let mut def = env.services.definition();
    def["steps"][1]["config"]["base_url"] = json!(payment.url);
    def["steps"][1]["retry"] = retry(2, 20, 50);
    def["steps"][1]["compensate_retry"] = retry(2, 20, 50);
    env.api.define(SAGA, &def).await;
    let (id, s) = env.run(order("tok_visa", "SKU-1", "US")).await;
    // The charge failed at the certificate, twice. No request left the host (the handshake
    // failed before one could), so there is no charge to refund: the saga releases the
    // reservation and is cancelled, with no operator needed.
    assert_eq!(s["status"], "CANCELLED", "{s:#}");
    let st = step(&s, "payment");
    assert_eq!((&st["status"], &st["attempts"]), (&json!("failed"), &json!(2)), "{s:#}");
    let error = st["last_error"].as_str().unwrap();
    assert!(error.contains("/charges") && error.contains("TLS certificate error"), "{error}");
    assert_eq!(step(&s, "inventory")["status"], "compensated", "{s:#}");
    let (_, retries) = env.events(&id).await;
    assert!(
        retries.first().is_some_and(|e| e.starts_with("payment:")
            && e.contains("/charges")
            && e.contains("TLS certificate error")),
        "{retries:?}"
    );
    assert_eq!(env.services.effects(&id).await, effects(&[("reserve", 1), ("release", 1)]));
    assert_eq!(env.services.payment.requests().await, 0, "nothing reached the service");
    // The front counts a refused handshake once the host's alert reached it: two charges, and
    // no refund tried.
    let start = Instant::now();
    while payment.handshakes().1 < 2 && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (ok, refused) = payment.handshakes();
    assert_eq!((ok, refused), (0, 2), "each attempt tried, and gave up at the certificate");
}

/// An egress proxy, as a company network has one: an HTTP/1.1 forward proxy on 127.0.0.1 that
/// wants Basic credentials (`svc:s3cret`; 407 otherwise), opens `CONNECT` tunnels (403 while
/// `refuse_tunnels` is set) and forwards absolute-form requests (each on a connection of its
/// own to the service, closed after the answer). It resolves names under `.internal` to
/// 127.0.0.1 itself, as a proxy inside a network knows its names: the host cannot resolve them.
/// Keeps every request line it was sent. Stops when dropped.
struct EgressProxy {
    /// `http://svc:s3cret@127.0.0.1:<port>`.
    url: String,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    refuse_tunnels: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Credentials are checked on CONNECT only (absolute-form requests pass without).
    check_tunnels_only: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The credentials it takes, base64 of `user:password`.
    accepts: std::sync::Arc<std::sync::Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl EgressProxy {
    async fn start() -> EgressProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://svc:s3cret@{}", listener.local_addr().unwrap());
        let lines = Arc::new(Mutex::new(Vec::new()));
        let refuse_tunnels = Arc::new(AtomicBool::new(false));
        let check_tunnels_only = Arc::new(AtomicBool::new(false));
        let accepts = Arc::new(Mutex::new("c3ZjOnMzY3JldA==".to_owned()));
        let (seen, refuse, creds) = (lines.clone(), refuse_tunnels.clone(), accepts.clone());
        let only_tunnels = check_tunnels_only.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (seen, refuse, creds) = (seen.clone(), refuse.clone(), creds.clone());
                let only_tunnels = only_tunnels.clone();
                tokio::spawn(async move {
                    // The head, a byte at a time: whatever follows it is the body, relayed as is.
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") {
                        let Ok(b) = client.read_u8().await else { return };
                        head.push(b);
                    }
                    let head = String::from_utf8(head).unwrap();
                    let mut lines = head.split("\r\n");
                    let request_line = lines.next().unwrap().to_owned();
                    seen.lock().unwrap().push(request_line.clone());
                    let credentials = format!("proxy-authorization: basic {}", creds.lock().unwrap().to_lowercase());
                    let answer =
                        |status: &str| format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                    let checked = head.starts_with("CONNECT ") || !only_tunnels.load(Ordering::SeqCst);
                    if checked && !head.to_lowercase().contains(&credentials) {
                        let _ = client.write_all(answer("407 Proxy Authentication Required").as_bytes()).await;
                        return;
                    }
                    let mut parts = request_line.split(' ');
                    let (method, target) = (parts.next().unwrap(), parts.next().unwrap());
                    let resolve = |authority: &str| match authority.split_once(".internal:") {
                        Some((_, port)) => format!("127.0.0.1:{port}"),
                        None => authority.to_owned(),
                    };
                    if method == "CONNECT" {
                        if refuse.load(Ordering::SeqCst) {
                            let _ = client.write_all(answer("403 Forbidden").as_bytes()).await;
                            return;
                        }
                        let Ok(mut service) = tokio::net::TcpStream::connect(resolve(target)).await else {
                            let _ = client.write_all(answer("502 Bad Gateway").as_bytes()).await;
                            return;
                        };
                        client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await.unwrap();
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut service).await;
                        return;
                    }
                    // Absolute form: to the service in origin form, without the proxy's headers.
                    let rest = target.strip_prefix("http://").expect("an absolute-form target");
                    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
                    let path = if path.is_empty() { "/" } else { path };
                    let mut forwarded = format!("{method} {path} HTTP/1.1\r\n");
                    for line in lines.filter(|l| !l.is_empty()) {
                        let name = line.split(':').next().unwrap().to_lowercase();
                        if name != "proxy-authorization" && name != "connection" {
                            forwarded.push_str(&format!("{line}\r\n"));
                        }
                    }
                    forwarded.push_str("connection: close\r\n\r\n");
                    let Ok(mut service) = tokio::net::TcpStream::connect(resolve(authority)).await else {
                        let _ = client.write_all(answer("502 Bad Gateway").as_bytes()).await;
                        return;
                    };
                    service.write_all(forwarded.as_bytes()).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut service).await;
                });
            }
        });
        EgressProxy { url, lines, refuse_tunnels, check_tunnels_only, accepts, task }
    }

    /// The request lines sent to it so far.
    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A host whose plugins reach their services through an egress proxy, by names only the proxy
/// resolves: the inventory as `http://inventory.internal:<port>` (absolute form through the
/// proxy), the payment as `https://payments.internal:<port>` (a CONNECT tunnel, TLS to the
/// service inside it, its certificate issued by a CA the host was given); the shipping service
/// as `http://127.0.0.1:<port>`, a loopback address, never through it. Then the proxy refuses
/// tunnels: the charge fails saying what the proxy answered, and the saga is compensated.
/// Then it refuses the host's credentials to a tunnel: the host's own failure, so the step
/// waits without spending its attempts, and goes on once they are right again.
#[tokio::test]
async fn steps_reach_their_services_through_the_egress_proxy_by_names_only_it_resolves() {
    use std::sync::atomic::Ordering;
    let proxy = EgressProxy::start().await;
    let trust = sagahost::runtime::TlsTrust::with_pem_file(&tls_fixture("internal-ca.pem")).unwrap();
    let via = sagahost::runtime::Proxy::parse(&proxy.url)
        .unwrap()
        .bypassing(sagahost::runtime::NoProxy::parse("corp.example, 10.0.0.0/8").unwrap());
    let env = Env::start_configured(
        &[],
        &[],
        |_| {},
        |c| {
            c.limits.http.trust = trust;
            c.limits.http.proxy = Some(std::sync::Arc::new(via));
        },
    )
    .await;
    let payment = TlsFront::start_as(&env.services.payment.url, "internal", None).await;
    let inventory = env.services.inventory.url.replace("127.0.0.1", "inventory.internal");
    let shipping = env.services.shipping.url.clone();
    env.api.grant("http-inventory", &[&inventory]).await;
    env.api.grant("http-payment", &[&payment.url]).await;
    let mut def = env.services.definition();
    def["steps"][0]["config"]["base_url"] = json!(inventory);
    def["steps"][1]["config"]["base_url"] = json!(payment.url);
    def["steps"][1]["retry"] = retry(2, 20, 50);
    env.api.define(SAGA, &def).await;

    let (id, s) = env.run(order("tok_visa", "SKU-1", "US")).await;
    assert_eq!(s["status"], "COMPLETED", "{s:#}");
    assert_eq!(env.services.effects(&id).await, effects(&[("reserve", 1), ("charge", 1), ("create", 1)]));
    let lines = proxy.lines();
    let port = |url: &str| url.rsplit(':').next().unwrap().trim_end_matches('/').to_owned();
    let tunnel = format!("CONNECT payments.internal:{} HTTP/1.1", port(&payment.url));
    assert!(lines.contains(&tunnel), "the charge went through a tunnel: {lines:#?}");
    let forwarded = format!(" http://inventory.internal:{}/", port(&inventory));
    assert!(lines.iter().any(|l| l.contains(&forwarded)), "the reservation, in absolute form: {lines:#?}");
    assert!(!lines.iter().any(|l| l.contains(&port(&shipping))), "loopback is never proxied: {lines:#?}");
    assert_eq!(payment.handshakes(), (1, 0), "TLS end to end, with the service's own certificate");

    // The proxy refuses tunnels now: each charge attempt fails saying so, and the saga is
    // compensated (the release goes through the proxy too).
    proxy.refuse_tunnels.store(true, Ordering::SeqCst);
    let (id, s) = env.run(order("tok_visa", "SKU-1", "US")).await;
    assert_eq!(s["status"], "CANCELLED", "{s:#}");
    let st = step(&s, "payment");
    assert_eq!((&st["status"], &st["attempts"]), (&json!("failed"), &json!(2)), "{s:#}");
    let error = st["last_error"].as_str().unwrap();
    let answered = format!("answered CONNECT payments.internal:{} with 403 Forbidden", port(&payment.url));
    assert!(error.contains(&answered) && error.contains(&proxy.url.replace("svc:s3cret@", "")), "{error}");
    assert!(!error.contains("s3cret"), "{error}");
    assert_eq!(env.services.effects(&id).await, effects(&[("reserve", 1), ("release", 1)]));
    proxy.refuse_tunnels.store(false, Ordering::SeqCst);
    // Counted as the proxy's refusals, under the service's origin.
    let metrics = String::from_utf8(env.host.get("/metrics").await.bytes).unwrap();
    let refused = format!(
        "sagahost_plugin_http_requests_total{{plugin=\"http-payment\",origin=\"https://payments.internal:{}\",outcome=\"proxy\"}} 2\n",
        port(&payment.url)
    );
    assert!(metrics.contains(&refused), "no {refused:?} in:\n{metrics}");

    // The host's credentials refused, to the charge's tunnel: not the step's failure. It is
    // tried again every second or so without spending an attempt, and goes through once they
    // are right again. (The reservation is let through: only tunnels are checked meanwhile.)
    *proxy.accepts.lock().unwrap() = "b3RoZXI6Y3JlZHM=".to_owned();
    proxy.check_tunnels_only.store(true, Ordering::SeqCst);
    let charges = || proxy.lines().iter().filter(|l| **l == tunnel).count();
    let before = charges();
    let id = env.api.submit(SAGA, order("tok_visa", "SKU-1", "US")).await;
    let start = Instant::now();
    while charges() < before + 2 {
        assert!(start.elapsed() < Duration::from_secs(20), "not tried again: {:#?}", proxy.lines());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = env.api.saga(SAGA, &id).await;
    assert_eq!(s["status"], "INVENTORY_RESERVED", "{s:#}");
    assert_eq!(step(&s, "payment")["attempts"], 0, "a proxy refusing the host is no attempt: {s:#}");
    *proxy.accepts.lock().unwrap() = "c3ZjOnMzY3JldA==".to_owned();
    let s = env.api.settled(SAGA, &id).await;
    assert_eq!(s["status"], "COMPLETED", "{s:#}");
    assert_eq!(env.services.effects(&id).await, effects(&[("reserve", 1), ("charge", 1), ("create", 1)]));

    // A 407 to a plain request may come from further on (or the service): the attempts count,
    // saying what was answered, and the saga ends instead of waiting for ever. The request was
    // sent (to the proxy), so the reservation is undone too, which fails alike: an operator's
    // to resolve once the credentials are right.
    *proxy.accepts.lock().unwrap() = "b3RoZXI6Y3JlZHM=".to_owned();
    proxy.check_tunnels_only.store(false, Ordering::SeqCst);
    let (id, s) = env.run(order("tok_visa", "SKU-1", "US")).await;
    assert_eq!(s["status"], "COMPENSATION_FAILED", "{s:#}");
    let st = step(&s, "inventory");
    assert_eq!(st["attempts"], 5, "{s:#}");
    let error = st["last_error"].as_str().unwrap();
    assert!(error.contains("407 Proxy Authentication Required (check the credentials"), "{error}");
    assert_eq!(env.services.effects(&id).await, effects(&[]));
}
