//! End-to-end tests: the real host on port 0, real HTTP, the real demo plugins compiled from
//! plugins/, a fresh SQLite file per test.

mod bench_tool;
mod cli;
mod console;
mod crash;
mod demo;
mod fuzz;
mod grants;
mod harness;
mod invariants;
mod kafka;
mod languages;
mod lifecycle;
mod operators;
mod plugin_run;
mod plugins;
mod process;
mod races;
mod replicas;
mod security;
mod services;
mod serving;
mod templates;
mod traces;

use std::time::Duration;

use harness::{fixture, good_order, key, order, TestHost};
use reqwest::StatusCode;
use sagahost::engine::PluginRef;
use sagahost::store::DefinitionSource;
use serde_json::{json, Value};

fn step<'a>(o: &'a Value, name: &str) -> &'a Value {
    o["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {o:#}"))
}

#[tokio::test]
async fn happy_path_completes_with_every_effect_once_and_gapless_events() {
    // A chain never ages out here, so the commits below do not depend on the machine's speed.
    let host = TestHost::start_with(|c| c.driver.chain_max_age = Duration::from_secs(30)).await;
    let r = host.post_order_raw(Some(&key()), good_order().to_string().as_bytes(), Some(20)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.bytes));
    let o = r.json();
    assert_eq!(o["status"], "COMPLETED");
    let id = o["id"].as_str().unwrap();
    assert_eq!(r.header("location").as_deref(), Some(format!("/orders/{id}").as_str()));
    for name in ["inventory", "payment", "shipment"] {
        let s = step(&o, name);
        assert_eq!(s["status"], "succeeded");
        assert_eq!(s["attempts"], 1);
        assert!(s["execute_digest"].as_str().unwrap().starts_with("sha256:"));
    }
    assert_eq!(host.state("inventory", &format!("reservation/{id}")).await.unwrap()["status"], "reserved");
    let charge = host.state("payment", &format!("charge/{id}")).await.unwrap();
    assert_eq!(charge, json!({"amount_cents": 3000, "currency": "USD", "status": "charged"}));
    assert_eq!(host.state("shipment", &format!("shipment/{id}")).await.unwrap()["status"], "created");
    assert_eq!(
        host.event_types(id).await,
        ["OrderCreated", "InventoryReserved", "PaymentCharged", "ShipmentCreated", "OrderCompleted"]
    );
    let events = host.events(id).await;
    let statuses: Vec<_> = events.iter().map(|e| e["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["CREATED", "INVENTORY_RESERVED", "PAYMENT_CHARGED", "SHIPMENT_CREATED", "COMPLETED"]);
    assert!(events.iter().all(|e| e["saga_type"] == "order" && e["event_id"].as_str().unwrap().len() == 36));
    // The driver ran the three steps and the finish as one chain: one commit after creation.
    let metrics = String::from_utf8(host.get("/metrics").await.bytes).unwrap();
    let sample = |name: &str| -> f64 {
        metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok()).unwrap_or(-1.0)
    };
    assert_eq!(sample("sagahost_committed_transitions_total"), 4.0, "{metrics}");
    assert_eq!(sample("sagahost_driver_commit_seconds_count"), 1.0, "{metrics}");

    // The relay appends the same events to events.jsonl, in seq order.
    let path = host.dir.path().join("events.jsonl");
    let start = std::time::Instant::now();
    loop {
        let lines: Vec<Value> = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|e: &Value| e["saga_id"] == id)
            .collect();
        if lines.len() == events.len() {
            assert_eq!(lines, events);
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "relay did not publish: {lines:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The relay marks rows right after the sink confirmed them: wait for that, briefly.
    let start = std::time::Instant::now();
    while !host.store.outbox_pending(10).await.unwrap().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(5), "published rows are marked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn out_of_stock_is_rejected_at_inventory_and_nothing_is_compensated() {
    let host = TestHost::start().await;
    let o = host.run_order(&order("tok_visa", "OOS-1", "US")).await;
    let id = o["id"].as_str().unwrap();
    assert_eq!(o["status"], "CANCELLED");
    assert!(o["reason"].as_str().unwrap().contains("out of stock"), "{o:#}");
    assert_eq!(step(&o, "inventory")["status"], "failed");
    assert_eq!(step(&o, "payment")["status"], "pending");
    assert_eq!(host.state("inventory", &format!("reservation/{id}")).await, None);
    assert_eq!(host.state("payment", &format!("charge/{id}")).await, None);
    assert_eq!(host.event_types(id).await, ["OrderCreated", "OrderCompensating", "OrderCancelled"]);
}

#[tokio::test]
async fn declined_card_releases_the_inventory() {
    let host = TestHost::start().await;
    let o = host.run_order(&order("tok_decline", "SKU-1", "US")).await;
    let id = o["id"].as_str().unwrap();
    assert_eq!(o["status"], "CANCELLED");
    assert_eq!(o["reason"], "payment: card declined");
    assert_eq!(step(&o, "inventory")["status"], "compensated");
    assert_eq!(step(&o, "payment")["status"], "failed");
    assert_eq!(host.state("inventory", &format!("reservation/{id}")).await.unwrap()["status"], "released");
    assert_eq!(host.state("payment", &format!("charge/{id}")).await, None);
    assert_eq!(
        host.event_types(id).await,
        ["OrderCreated", "InventoryReserved", "OrderCompensating", "StepCompensated", "OrderCancelled"]
    );
}

#[tokio::test]
async fn no_carrier_refunds_payment_then_releases_inventory() {
    let host = TestHost::start().await;
    let o = host.run_order(&order("tok_visa", "SKU-1", "XX")).await;
    let id = o["id"].as_str().unwrap();
    assert_eq!(o["status"], "CANCELLED");
    assert_eq!(o["reason"], "shipment: no carrier for XX");
    assert_eq!(step(&o, "shipment")["status"], "failed");
    assert_eq!(step(&o, "payment")["status"], "compensated");
    assert_eq!(step(&o, "inventory")["status"], "compensated");
    assert_eq!(host.state("inventory", &format!("reservation/{id}")).await.unwrap()["status"], "released");
    let charge = host.state("payment", &format!("charge/{id}")).await.unwrap();
    assert_eq!(charge["status"], "refunded");
    assert_eq!(charge["amount_cents"], 3000);
    assert_eq!(host.state("shipment", &format!("shipment/{id}")).await, None);
    // Compensation ran in reverse order: payment, then inventory.
    let compensated: Vec<String> = host
        .events(id)
        .await
        .iter()
        .filter(|e| e["type"] == "StepCompensated")
        .map(|e| e["data"]["step"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(compensated, ["payment", "inventory"]);
    assert_eq!(
        host.event_types(id).await,
        [
            "OrderCreated",
            "InventoryReserved",
            "PaymentCharged",
            "OrderCompensating",
            "StepCompensated",
            "StepCompensated",
            "OrderCancelled"
        ]
    );
}

#[tokio::test]
async fn flaky_payment_completes_on_attempt_three_with_one_charge() {
    let host = TestHost::start().await;
    let o = host.run_order(&order("tok_flaky", "SKU-1", "US")).await;
    let id = o["id"].as_str().unwrap();
    assert_eq!(o["status"], "COMPLETED");
    assert_eq!(step(&o, "payment")["attempts"], 3);
    assert_eq!(host.state("payment", &format!("charge/{id}")).await.unwrap()["status"], "charged");
    let charges = host.store.state_list("payment", "charge/", 100).await.unwrap();
    assert_eq!(charges.len(), 1, "exactly one charge");
    let types = host.event_types(id).await;
    assert_eq!(types.iter().filter(|t| *t == "StepRetryScheduled").count(), 2);
    assert_eq!(types.last().unwrap(), "OrderCompleted");
}

#[tokio::test]
async fn idempotent_replay_is_byte_identical_and_marked() {
    let host = TestHost::start().await;
    let k = key();
    let first = host.post_order(&k, &good_order()).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.header("idempotent-replayed"), None);
    // Same body with other whitespace and key order is the same request.
    let reordered = serde_json::to_string_pretty(&good_order()).unwrap();
    let again = host.post_order_raw(Some(&k), reordered.as_bytes(), None).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.bytes, first.bytes, "replay is byte for byte");
    assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(again.header("location"), first.header("location"));
    // `/sagas/order` is the same route as `/orders` (SPEC §5.2): the same key there replays too.
    let alias = host
        .send(host.client.post(host.url("/sagas/order")).header("Idempotency-Key", k.clone()).json(&good_order()))
        .await;
    assert_eq!((alias.status, alias.header("idempotent-replayed").as_deref()), (StatusCode::CREATED, Some("true")));
    assert_eq!(alias.json()["id"], first.json()["id"]);

    let mut other = good_order();
    other["customer_id"] = json!("c-43");
    let r = host.post_order(&k, &other).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.json()["error"]["code"], "idempotency_key_reused");

    let r = host.post_order_raw(None, good_order().to_string().as_bytes(), None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("Idempotency-Key"));

    let list = host.get("/orders").await.json();
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "one saga for one key");
}

#[tokio::test]
async fn ten_concurrent_identical_requests_make_exactly_one_saga() {
    let host = TestHost::start().await;
    let k = key();
    let body = good_order().to_string();
    let responses =
        futures::future::join_all((0..10).map(|_| host.post_order_raw(Some(&k), body.as_bytes(), None))).await;
    let mut ids = std::collections::HashSet::new();
    for r in &responses {
        match r.status {
            StatusCode::CREATED => {
                ids.insert(r.json()["id"].as_str().unwrap().to_owned());
            }
            StatusCode::CONFLICT => assert!(r.header("retry-after").is_some()),
            other => panic!("unexpected {other}: {}", String::from_utf8_lossy(&r.bytes)),
        }
    }
    assert_eq!(ids.len(), 1, "every success names the same saga");
    let list = host.get("/orders?limit=100").await.json();
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
}

/// Waiting requests have their saga created together with its first steps, so ten of them
/// run the steps at once and race at that commit: one wins, the rest replay its answer or
/// find the key in flight.
#[tokio::test]
async fn ten_concurrent_identical_waiting_requests_make_exactly_one_saga() {
    let host = TestHost::start().await;
    let k = key();
    let body = good_order().to_string();
    let responses =
        futures::future::join_all((0..10).map(|_| host.post_order_raw(Some(&k), body.as_bytes(), Some(20)))).await;
    let mut ids = std::collections::HashSet::new();
    let mut settled = 0;
    for r in &responses {
        match r.status {
            StatusCode::OK | StatusCode::CREATED => {
                settled += usize::from(r.status == StatusCode::OK);
                ids.insert(r.json()["id"].as_str().unwrap().to_owned());
            }
            StatusCode::CONFLICT => assert!(r.header("retry-after").is_some()),
            other => panic!("unexpected {other}: {}", String::from_utf8_lossy(&r.bytes)),
        }
    }
    assert_eq!(ids.len(), 1, "every success names the same saga: {ids:?}");
    assert!(settled >= 1, "the winner waited for its saga");
    let list = host.get("/orders?limit=100").await.json();
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list:#}");
    let id = ids.into_iter().next().unwrap();
    let types = host.event_types(&id).await;
    assert_eq!(types, ["OrderCreated", "InventoryReserved", "PaymentCharged", "ShipmentCreated", "OrderCompleted"]);
    // The losers ran their steps uncommitted: no second saga, no second series of events.
    let again = host.post_order_raw(Some(&k), body.as_bytes(), Some(20)).await;
    assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
}

/// Registers saga type `spinning`: one host-only step (the counter fixture imports no outbound
/// HTTP, so its saga's creation may wait for the first commit) that, given `{"spin":
/// 1_000_000_000}`, spins until its 10-second timeout, one attempt (long, so that even a
/// loaded machine answers a 1-second wait and reads the saga well before).
async fn spinning_saga(host: &TestHost) {
    let (digest, _) = host.catalog.install_plugin("counter", fixture("counter")).await.expect("fixture loads");
    let mut def = (*host.catalog.definition("order").unwrap()).clone();
    def.saga_type = "spinning".into();
    def.sensitive.clear();
    def.steps.truncate(1);
    def.steps[0].execute = PluginRef { plugin: "counter".into(), digest };
    def.steps[0].compensate = def.steps[0].execute.clone();
    def.steps[0].timeout_ms = 10_000;
    def.steps[0].retry.max_attempts = 1;
    host.catalog.put_definition(def, DefinitionSource::Admin).await.unwrap();
}

/// A waiting request whose saga cannot start yet (every place of the driver is taken) still
/// answers by its deadline: its creation is not deferred into the driver's queue behind the
/// running sagas, where it waited uncommitted for as long as they ran (here 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_request_answers_by_its_deadline_while_the_driver_is_full() {
    let host = TestHost::start_with(|c| c.driver.max_concurrency = 1).await;
    spinning_saga(&host).await;
    let spinning = host
        .send(
            host.client
                .post(host.url("/sagas/spinning"))
                .header("Idempotency-Key", key())
                .json(&json!({"spin": 1_000_000_000})),
        )
        .await;
    assert_eq!(spinning.status, StatusCode::CREATED);
    // Handed to the driver at once: running, or ahead of the next saga in the driver's queue.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let r = host.post_order_raw(Some(&key()), order("tok_visa", "SKU-1", "US").to_string().as_bytes(), Some(1)).await;
    let took = started.elapsed();
    assert_eq!(r.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&r.bytes));
    assert!(took < Duration::from_secs(5), "answered after {took:?}: when the running saga ended, not by the wait");
    let id = r.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(host.get(&format!("/orders/{id}")).await.status, StatusCode::OK, "acknowledged, so stored");
    assert_eq!(host.wait_settled(&id).await["status"], "COMPLETED", "it runs once a place frees");
}

/// A waiting request's saga is created by its first commit, but a first step that runs long
/// does not hold the answer back: the creation commits alone meanwhile, and the request
/// answers 201 once its `Prefer: wait` time is up (SPEC §5.1), not when the step ends.
///
/// On a multi-threaded runtime, as the binary runs: on one thread the spinning call (which
/// yields every epoch tick and is woken at once) leaves the timers and the database's
/// wake-ups to the scheduler's maintenance, every 61 polls, about 0.6 s each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_request_answers_by_its_deadline_while_its_first_step_still_runs() {
    let host = TestHost::start().await;
    spinning_saga(&host).await;
    let k = key();
    let post = || {
        host.send(
            host.client
                .post(host.url("/sagas/spinning"))
                .header("Idempotency-Key", &k)
                .header("Prefer", "wait=1")
                .json(&json!({"spin": 1_000_000_000})),
        )
    };
    let started = std::time::Instant::now();
    let r = post().await;
    let took = started.elapsed();
    assert_eq!(r.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&r.bytes));
    assert!(took < Duration::from_secs(5), "answered after {took:?}: the step's end, not the wait's");
    assert!(took >= Duration::from_millis(900), "answered after {took:?}, before the wait was up");
    let id = r.json()["id"].as_str().unwrap().to_owned();
    // Acknowledged, so stored: the step is still spinning.
    let stored = host.get(&format!("/sagas/spinning/{id}")).await;
    assert_eq!(stored.status, StatusCode::OK);
    assert!(!matches!(stored.json()["status"].as_str(), Some("COMPLETED" | "CANCELLED")), "{:#}", stored.json());
    // The retry replays the same answer while the saga runs on, then it ends: the step timed
    // out once, and the saga with its one event series exists exactly once.
    let again = post().await;
    assert_eq!((again.status, &again.bytes), (StatusCode::CREATED, &r.bytes));
    assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
    let settled = loop {
        let o = host.get(&format!("/sagas/spinning/{id}")).await.json();
        if o["status"] == "CANCELLED" {
            break o;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the saga did not end: {o:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(step(&settled, "inventory")["attempts"], 1, "{settled:#}");
    let types = host.event_types(&id).await;
    assert!(types[0].ends_with("Created"), "{types:?}");
    assert_eq!(types.iter().filter(|t| t.ends_with("Created")).count(), 1, "{types:?}");
}

#[tokio::test]
async fn prefer_wait_replays_the_settled_response() {
    let host = TestHost::start().await;
    let k = key();
    let body = order("tok_decline", "SKU-1", "US").to_string();
    let first = host.post_order_raw(Some(&k), body.as_bytes(), Some(20)).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.json()["status"], "CANCELLED");
    let again = host.post_order_raw(Some(&k), body.as_bytes(), Some(20)).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.bytes, first.bytes);
    assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
}

#[tokio::test]
async fn invalid_orders_get_400_naming_the_field_and_change_nothing() {
    let host = TestHost::start().await;
    let cases: Vec<(Value, &str)> = vec![
        (json!({"items": []}), "customer_id"),
        (
            {
                let mut o = good_order();
                o["items"] = json!([]);
                o
            },
            "items",
        ),
        (
            {
                let mut o = good_order();
                o["items"][0]["quantity"] = json!(0);
                o
            },
            "items[0].quantity",
        ),
        (
            {
                let mut o = good_order();
                o["items"][1]["quantity"] = json!(-1);
                o
            },
            "items[1].quantity",
        ),
        (
            {
                let mut o = good_order();
                o["currency"] = json!("ABC");
                o
            },
            "currency",
        ),
        (
            {
                let mut o = good_order();
                o["payment"]["token"] = json!("");
                o
            },
            "payment.token",
        ),
        (
            {
                let mut o = good_order();
                o["ship_to"]["country"] = json!("U");
                o
            },
            "ship_to.country",
        ),
        (
            {
                let mut o = good_order();
                o["ship_to"]["city"] = json!(7);
                o
            },
            "ship_to.city",
        ),
    ];
    for (body, field) in cases {
        let r = host.post_order(&key(), &body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        let e = r.json();
        assert_eq!(e["error"]["code"], "invalid_request");
        assert!(e["error"]["message"].as_str().unwrap().contains(field), "{field}: {e}");
    }
    let r = host.post_order_raw(Some(&key()), b"{not json", None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = host.post_order_raw(Some(&"k".repeat(256)), good_order().to_string().as_bytes(), None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    let mut big = good_order();
    big["customer_id"] = json!("x".repeat(70 * 1024));
    let r = host.post_order(&key(), &big).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.json()["error"]["code"], "payload_too_large");

    // A rejected request is not stored: the same key works for a valid request afterwards.
    let k = key();
    assert_eq!(host.post_order(&k, &json!({"items": []})).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(host.post_order(&k, &good_order()).await.status, StatusCode::CREATED);
    assert_eq!(host.get("/orders").await.json()["data"].as_array().unwrap().len(), 1);
}

/// A route naming a saga type, or a step, no definition can have is a 404 in the API's error
/// shape before anything is stored under the request's key: not a key kept for a day (a retry
/// with another body would get 422), nor on PostgreSQL a 500 for a NUL byte or a name past the
/// key index's size. Nor is a path segment that is not UTF-8 answered in plain text.
#[tokio::test]
async fn a_keyed_request_for_a_type_no_saga_can_have_is_a_404_that_stores_nothing() {
    let host = TestHost::start_with(|c| c.admin_token = Some("admin-secret".to_owned())).await;
    let id = "00000000-0000-4000-8000-000000000001";
    let long = "t".repeat(3000);
    let not_found = |path: &str, r: &crate::harness::Resp| {
        let shown = &path[..path.len().min(80)];
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{shown}: {}", String::from_utf8_lossy(&r.bytes));
        assert_eq!(r.json()["error"]["code"], "not_found", "{shown}");
    };
    for saga_type in ["%00", long.as_str(), "Order"] {
        let k = key();
        for (path, body) in [
            (format!("/sagas/{saga_type}/{id}/signals/go"), json!({"n": 1})),
            (format!("/sagas/{saga_type}/{id}/signals/go"), json!({"n": 2})),
            (format!("/sagas/{saga_type}/{id}/cancel"), json!(null)),
        ] {
            let r =
                host.send(reqwest::Client::new().post(host.url(&path)).header("Idempotency-Key", &k).json(&body)).await;
            not_found(&path, &r);
        }
        for (path, body) in [
            (format!("/admin/sagas/{saga_type}/steps/payment"), json!({"execute": "sha256:00"})),
            (format!("/admin/sagas/order/steps/{saga_type}"), json!({"execute": "sha256:00"})),
        ] {
            let put = reqwest::Client::new()
                .put(host.url(&path))
                .bearer_auth("admin-secret")
                .header("Idempotency-Key", &k)
                .json(&body);
            not_found(&path, &host.send(put).await);
        }
        let put = reqwest::Client::new()
            .put(host.url(&format!("/admin/sagas/{saga_type}")))
            .bearer_auth("admin-secret")
            .header("Idempotency-Key", &k)
            .json(&json!({"steps": [{"name": "payment"}]}));
        let r = host.send(put).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(&r.bytes));
    }
    for (method, path) in [
        (reqwest::Method::GET, "/orders/%FF"),
        (reqwest::Method::POST, "/orders/%FF/cancel"),
        (reqwest::Method::GET, "/sagas/order/%FF"),
        (reqwest::Method::POST, "/sagas/%FF/x/cancel"),
    ] {
        let r = host.send(reqwest::Client::new().request(method, host.url(path))).await;
        assert!(r.status.is_client_error(), "{path}: {}", r.status);
        assert!(
            r.json()["error"]["code"].is_string(),
            "{path}: the API's error shape: {}",
            String::from_utf8_lossy(&r.bytes)
        );
    }
}

#[tokio::test]
async fn orders_list_newest_first_with_cursor_and_404_for_unknown() {
    let host = TestHost::start().await;
    let mut ids = vec![];
    for _ in 0..3 {
        ids.push(host.post_order(&key(), &good_order()).await.json()["id"].as_str().unwrap().to_owned());
    }
    let page = host.get("/orders?limit=2").await.json();
    let got: Vec<_> = page["data"].as_array().unwrap().iter().map(|o| o["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(got, [ids[2].clone(), ids[1].clone()]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let page2 = host.get(&format!("/orders?limit=2&cursor={cursor}")).await.json();
    assert_eq!(page2["data"][0]["id"], json!(ids[0]));
    assert_eq!(page2["next_cursor"], Value::Null);
    for id in &ids {
        host.wait_settled(id).await;
    }
    assert_eq!(host.get("/orders?status=COMPLETED").await.json()["data"].as_array().unwrap().len(), 3);
    assert_eq!(host.get("/orders?status=CANCELLED").await.json()["data"].as_array().unwrap().len(), 0);
    assert_eq!(host.get("/orders?limit=0").await.status, StatusCode::BAD_REQUEST);
    assert_eq!(host.get("/orders?cursor=nope").await.status, StatusCode::BAD_REQUEST);
    // An id in upper case names the same saga, as a cursor too (compared as stored, it skipped
    // rows); a typo is an error, not an empty page ("nothing is stuck").
    let upper = host.get(&format!("/orders/{}", ids[1].to_uppercase())).await;
    assert_eq!((upper.status, upper.json()["id"].clone()), (StatusCode::OK, json!(ids[1])));
    let page2 = host.get(&format!("/orders?limit=2&cursor={}", cursor.to_uppercase())).await.json();
    assert_eq!(page2["data"][0]["id"], json!(ids[0]));
    let typo = host.get("/orders?status=COMPENSATION_FAILD").await;
    assert_eq!((typo.status, typo.json()["error"]["field"].clone()), (StatusCode::BAD_REQUEST, json!("status")));
    assert!(typo.json()["error"]["message"].as_str().unwrap().contains("COMPENSATION_FAILED"), "{:?}", typo.json());
    assert_eq!(host.get("/orders?status=COMPENSATION_FAILED").await.json()["data"], json!([]));
    assert_eq!(host.get("/orders?stauts=CANCELLED").await.status, StatusCode::BAD_REQUEST);
    assert_eq!(host.get("/sagas/ordr?status=COMPENSATION_FAILED").await.status, StatusCode::NOT_FOUND);
    assert_eq!(host.get("/sagas/order-http").await.status, StatusCode::OK);

    let r = host.get("/orders/00000000-0000-0000-0000-000000000000").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"]["code"], "not_found");
}

#[tokio::test]
async fn health_readiness_and_openapi() {
    let host = TestHost::start().await;
    assert_eq!(host.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(host.get("/readyz").await.status, StatusCode::OK);
    let api = host.get("/openapi.json").await.json();
    for path in ["/orders", "/orders/{id}", "/orders/{id}/cancel", "/sagas/{type}", "/healthz", "/readyz"] {
        assert!(api["paths"][path].is_object(), "{path} missing from the OpenAPI document");
    }
    assert!(api["components"]["schemas"]["OrderRequest"].is_object());
    assert_eq!(host.get("/nope").await.status, StatusCode::NOT_FOUND);
}

/// Binds the hostile fixture plugin, uploaded as a version of `shipment`, as the shipment
/// step's execute (compensate stays the demo's).
async fn bind_misbehave_to_shipment(host: &TestHost, timeout_ms: u64) {
    let (digest, _) = host.catalog.install_plugin("shipment", fixture("misbehave")).await.expect("fixture loads");
    let mut def = (*host.catalog.definition("order").unwrap()).clone();
    def.steps[2].execute = PluginRef { plugin: "shipment".into(), digest };
    def.steps[2].timeout_ms = timeout_ms;
    host.catalog.put_definition(def, DefinitionSource::Admin).await.unwrap();
}

fn misbehaving(mode: &str) -> Value {
    let mut o = good_order();
    o["customer_id"] = json!(mode);
    o
}

#[tokio::test]
async fn a_trapping_plugin_is_retried_then_compensated_and_the_host_keeps_serving() {
    let host = TestHost::start().await;
    // A long timeout until the loop: a loaded machine must not turn a panic into a timeout.
    bind_misbehave_to_shipment(&host, 10_000).await;

    // Traps on attempts 1 and 2, then succeeds: traps count as retryable.
    let o = host.run_order(&misbehaving("panic-until-3")).await;
    assert_eq!(o["status"], "COMPLETED", "{o:#}");
    assert_eq!(step(&o, "shipment")["attempts"], 3);

    // Always panics: after max attempts the trap counts as a rejection and the saga compensates.
    let o = host.run_order(&misbehaving("panic")).await;
    let id = o["id"].as_str().unwrap();
    assert_eq!(o["status"], "CANCELLED", "{o:#}");
    let s = step(&o, "shipment");
    assert_eq!(s["attempts"], 5);
    assert!(s["last_error"].as_str().unwrap().contains("panicked"), "{s:#}");
    assert_eq!(host.state("payment", &format!("charge/{id}")).await.unwrap()["status"], "refunded");
    assert_eq!(host.state("inventory", &format!("reservation/{id}")).await.unwrap()["status"], "released");

    // Output that is not JSON is a host-limit failure, not a success.
    let o = host.run_order(&misbehaving("bad-json")).await;
    assert_eq!(o["status"], "CANCELLED");
    assert!(step(&o, "shipment")["last_error"].as_str().unwrap().contains("not valid JSON"), "{o:#}");

    // An infinite loop is interrupted by the timeout; ordinary orders keep completing meanwhile.
    bind_misbehave_to_shipment(&host, 300).await;
    let r = host.post_order(&key(), &misbehaving("loop")).await;
    let looping = r.json()["id"].as_str().unwrap().to_owned();
    let ok = host.run_order(&good_order()).await;
    assert_eq!(ok["status"], "COMPLETED");
    let o = host.wait_settled(&looping).await;
    assert_eq!(o["status"], "CANCELLED");
    assert!(step(&o, "shipment")["last_error"].as_str().unwrap().contains("timed out"), "{o:#}");
}

#[tokio::test]
async fn data_survives_a_restart() {
    let host = TestHost::start().await;
    let o = host.run_order(&good_order()).await;
    let id = o["id"].as_str().unwrap().to_owned();
    let dir = host.stop().await;
    // Nothing compiled is kept in the data directory: a compiled artifact is native code, and
    // whoever could write it there would run code in the host. A file planted where earlier
    // versions kept artifacts is never loaded (the directory is cleared at start-up).
    let files: Vec<_> = walk(dir.path()).into_iter().filter(|p| p.ends_with(".cwasm")).collect();
    assert!(files.is_empty(), "compiled artifacts on disk: {files:?}");
    std::fs::create_dir_all(dir.path().join("cache")).unwrap();
    std::fs::write(dir.path().join("cache/planted.cwasm"), b"not wasmtime's").unwrap();
    let host = TestHost::start_in(dir, |_| {}).await;
    assert!(!host.dir.path().join("cache").exists(), "the old artifact directory was not cleared");
    let again = host.get(&format!("/orders/{id}")).await.json();
    assert_eq!(again["status"], "COMPLETED");
    assert_eq!(again["steps"], o["steps"]);
    assert_eq!(host.event_types(&id).await.len(), 5);
}

/// Scrapes `/metrics` until the sample whose line starts with `start` is `enough` (it is counted
/// by tasks of their own, which may still be under way at a scrape), at most 10 s; it never
/// exceeds `calls`, one per call.
async fn scrape_until(host: &TestHost, start: &str, calls: f64, enough: impl Fn(f64) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8(host.get("/metrics").await.bytes).unwrap();
        let count: f64 = text.lines().find_map(|l| l.strip_prefix(start)).map_or(0.0, |v| v.parse().unwrap());
        assert!(count <= calls, "{start}{count} after {calls} calls: {text}");
        if enough(count) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{start}{count} after {calls} calls, never enough: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn metrics_count_sagas_by_status_plugin_calls_and_the_outbox() {
    let host = TestHost::start().await;
    host.run_order(&good_order()).await;
    host.run_order(&order("tok_decline", "SKU-1", "US")).await;
    host.run_order(&order("tok_flaky", "SKU-1", "US")).await;
    let r = host.get("/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.header("content-type").unwrap().starts_with("application/openmetrics-text"));
    let text = String::from_utf8(r.bytes).unwrap();
    let value = |line_start: &str| -> f64 {
        let line =
            text.lines().find(|l| l.starts_with(line_start)).unwrap_or_else(|| panic!("no {line_start} in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(value(r#"sagahost_sagas{saga_type="order",status="COMPLETED"}"#), 2.0);
    assert_eq!(value(r#"sagahost_sagas{saga_type="order",status="CANCELLED"}"#), 1.0);
    assert_eq!(
        value(r#"sagahost_plugin_calls_total{saga_type="order",step="payment",call="execute",outcome="retryable"}"#),
        2.0
    );
    assert_eq!(
        value(r#"sagahost_plugin_calls_total{saga_type="order",step="payment",call="execute",outcome="rejected"}"#),
        1.0
    );
    assert_eq!(
        value(r#"sagahost_plugin_calls_total{saga_type="order",step="inventory",call="compensate",outcome="done"}"#),
        1.0
    );
    assert!(text.contains("sagahost_plugin_call_seconds_bucket"));
    // Every call is also counted in each of its phases.
    let calls: f64 = text
        .lines()
        .filter(|l| l.starts_with("sagahost_plugin_calls_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert!(calls >= 9.0, "{text}");
    for phase in ["setup", "instantiate", "run", "collect"] {
        assert_eq!(value(&format!("sagahost_plugin_call_phase_seconds_count{{phase=\"{phase}\"}}")), calls, "{phase}");
    }
    // And each call's sandbox given back to the pool after it answered (by a task of its own,
    // which may still be under way at a scrape: scrape again).
    let released = r#"sagahost_plugin_call_phase_seconds_count{phase="release"} "#;
    scrape_until(&host, released, calls, |released| released == calls).await;
    // The host keeps spare instances: after a call a task makes its component's next instance
    // (at most one per call), and a later call that takes it instantiates in no time at all
    // (the first bucket, 1 µs: the sagas above ran one after another, each long after the
    // spares of the one before were made).
    let made = r#"sagahost_plugin_call_phase_seconds_count{phase="spare"} "#;
    scrape_until(&host, made, calls, |made| made >= 1.0).await;
    let instant: f64 = text
        .lines()
        .find(|l| l.starts_with("sagahost_plugin_call_phase_seconds_bucket{") && l.contains(r#"phase="instantiate""#))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap());
    assert!(instant >= 1.0, "no call took a spare: {text}");
    // Every call took a spare or found none (the demo plugins all allow them): the first call
    // of each component at least missed, and a later one took what the one before made.
    let spares = |result: &str| value(&format!("sagahost_plugin_call_spares_total{{result=\"{result}\"}}"));
    let (taken, missed) = (spares("taken"), spares("missed"));
    assert_eq!(taken + missed, calls, "{text}");
    assert!(taken >= 1.0 && missed >= 1.0, "{text}");
    // One call in 64 has its processor time measured, the first among them.
    assert_eq!(value("sagahost_plugin_call_cpu_seconds_count"), (calls / 64.0).ceil(), "{text}");
    assert!(value("sagahost_plugin_call_cpu_seconds_sum") > 0.0, "{text}");
    assert_eq!(value("sagahost_log_lines_dropped_total"), 0.0, "{text}");
    assert!(text.contains("sagahost_outbox_lag_seconds"));
    assert!(text.trim_end().ends_with("# EOF"));
    // The relay's batches by phase: each read that found rows, then published, then (what
    // the sink took) marked; a batch may end between two of the scrape's lines (the relay
    // runs on its own: wait for its first batch).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let phases = loop {
        let text = String::from_utf8(host.get("/metrics").await.bytes).unwrap();
        let count = |phase: &str| -> f64 {
            let start = format!("sagahost_relay_phase_seconds_count{{phase=\"{phase}\"}} ");
            text.lines().find_map(|l| l.strip_prefix(start.as_str())).map_or(0.0, |v| v.parse().unwrap())
        };
        let phases = (count("read"), count("publish"), count("mark"), text);
        if phases.2 >= 1.0 || std::time::Instant::now() > deadline {
            break phases;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (read, publish, mark, text) = phases;
    assert!(
        mark >= 1.0 && publish >= mark && read + 1.0 >= publish && publish + 1.0 >= read,
        "read {read}, publish {publish}, mark {mark}:\n{text}"
    );
}

/// Before any saga settles, every status of every registered type counts from 0: the first
/// stuck saga after a start is an increase an `increase()` alert sees (a series that appears
/// at 1 shows none).
#[tokio::test]
async fn a_fresh_host_counts_every_settled_status_from_zero() {
    let host = TestHost::start().await;
    let fresh = String::from_utf8(host.get("/metrics").await.bytes).unwrap();
    for saga_type in ["order", "order-http"] {
        for status in ["COMPLETED", "CANCELLED", "COMPENSATION_FAILED"] {
            let zero = format!(r#"sagahost_sagas_settled_total{{saga_type="{saga_type}",status="{status}"}} 0"#);
            assert!(fresh.lines().any(|l| l == zero), "no {zero} before any saga:\n{fresh}");
        }
    }
}

#[tokio::test]
async fn the_example_alert_rules_name_only_metrics_the_host_exports() {
    let host = TestHost::start().await;
    host.run_order(&good_order()).await;
    host.run_order(&order("tok_decline", "SKU-1", "US")).await;
    let text = String::from_utf8(host.get("/metrics").await.bytes).unwrap();
    // A settled saga is counted by type and status.
    let settled = |status: &str| {
        let start = format!(r#"sagahost_sagas_settled_total{{saga_type="order",status="{status}"}} "#);
        text.lines().find_map(|l| l.strip_prefix(start.as_str())?.parse::<f64>().ok())
    };
    assert_eq!((settled("COMPLETED"), settled("CANCELLED")), (Some(1.0), Some(1.0)), "{text}");
    let mut exported: std::collections::BTreeSet<&str> =
        text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split(['{', ' ']).next()).collect();
    // A family without a series is not exported at all: plugins' HTTP requests appear with the
    // first one (the built-in order saga makes none; `services::happy_path...` checks them).
    exported.insert("sagahost_plugin_http_requests_total");
    let rules = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/prometheus-alerts.yml")).unwrap();
    let mut named = std::collections::BTreeSet::new();
    for (i, _) in rules.match_indices("sagahost_") {
        let name: String =
            rules[i..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        named.insert(name);
    }
    assert!(named.len() >= 8, "the rules name the metrics they alert on: {named:?}");
    let missing: Vec<_> = named.iter().filter(|n| !exported.contains(n.as_str())).collect();
    assert!(missing.is_empty(), "docs/prometheus-alerts.yml names metrics /metrics does not export: {missing:?}");
}

/// Every file path under `dir`.
fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path.display().to_string());
        }
    }
    out
}
