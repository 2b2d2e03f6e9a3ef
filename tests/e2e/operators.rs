//! Waits, signals, deadlines, client cancel, and the operator escape hatches (SPEC §5.4).

use reqwest::StatusCode;
use sagahost::clock::OffsetClock;
use sagahost::engine::{PluginRef, RetryPolicy};
use sagahost::store::DefinitionSource;
use serde_json::json;

use crate::harness::{break_payment_compensation, fixture, key, order, TestHost, TEST_RELAY};

const TOKEN: &str = "test-admin-token";

async fn admin_post(host: &TestHost, path: &str, token: Option<&str>, body: serde_json::Value) -> crate::harness::Resp {
    let mut req = host.client.post(host.url(path)).json(&body).header("X-Actor", "ops@example.com");
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    host.send(req).await
}

#[tokio::test]
async fn admin_routes_are_off_without_a_token_and_need_the_right_bearer() {
    let host = TestHost::start().await;
    let r = admin_post(&host, "/admin/sagas/x/retry", Some("anything"), json!({})).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["error"]["code"], "admin_disabled");

    let host = TestHost::start_with(|c| c.admin_token = Some(TOKEN.into())).await;
    assert_eq!(admin_post(&host, "/admin/sagas/x/retry", None, json!({})).await.status, StatusCode::UNAUTHORIZED);
    let r = admin_post(&host, "/admin/sagas/x/retry", Some("wrong"), json!({})).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"));
    assert_eq!(admin_post(&host, "/admin/sagas/x/retry", Some(TOKEN), json!({})).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn tok_3ds_waits_for_its_signal_then_completes() {
    let host = TestHost::start().await;
    let r = host.post_order(&key(), &order("tok_3ds", "SKU-1", "US")).await;
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let o = host.wait_for(&id, |o| o["steps"][1]["waiting_for"] == "payment-confirmed").await;
    assert_eq!(o["status"], "INVENTORY_RESERVED");
    assert_eq!(o["steps"][1]["status"], "waiting");
    // A signal nobody waits for is refused and changes nothing.
    let path = format!("/orders/{id}/signals/other");
    assert_eq!(host.send(host.client.post(host.url(&path)).json(&json!({}))).await.status, StatusCode::CONFLICT);
    let path = format!("/orders/{id}/signals/payment-confirmed");
    let k = key();
    let send = |k: Option<String>, body: serde_json::Value| {
        let mut req = host.client.post(host.url(&path)).json(&body);
        if let Some(k) = k {
            req = req.header("Idempotency-Key", k);
        }
        host.send(req)
    };
    let r = send(Some(k.clone()), json!({"auth": "ok"})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&r.bytes));
    // A webhook retried with the same key gets the first answer, not a 409.
    let again = send(Some(k.clone()), json!({"auth": "ok"})).await;
    assert_eq!(again.status, StatusCode::ACCEPTED);
    assert_eq!(again.bytes, r.bytes);
    assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(send(Some(k), json!({"auth": "other"})).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    // Without a key, a repeated signal is refused: it was delivered once.
    assert_eq!(send(None, json!({"auth": "ok"})).await.status, StatusCode::CONFLICT);
    let o = host.wait_settled(&id).await;
    assert_eq!(o["status"], "COMPLETED");
    assert_eq!(host.state("payment", &format!("charge/{id}")).await.unwrap()["status"], "charged");
    assert_eq!(
        host.event_types(&id).await,
        [
            "OrderCreated",
            "InventoryReserved",
            "StepWaiting",
            "SignalReceived",
            "PaymentCharged",
            "ShipmentCreated",
            "OrderCompleted"
        ]
    );
}

#[tokio::test]
async fn cancel_while_waiting_compensates_and_a_completed_order_cannot_be_cancelled() {
    let host = TestHost::start().await;
    let id = host.post_order(&key(), &order("tok_3ds", "SKU-1", "US")).await.json()["id"].as_str().unwrap().to_owned();
    host.wait_for(&id, |o| o["steps"][1]["status"] == "waiting").await;
    let r = host.send(host.client.post(host.url(&format!("/orders/{id}/cancel")))).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let o = host.wait_settled(&id).await;
    assert_eq!(o["status"], "CANCELLED");
    assert_eq!(o["reason"], "cancelled by client");
    assert_eq!(host.state("inventory", &format!("reservation/{id}")).await.unwrap()["status"], "released");
    assert_eq!(host.state("payment", &format!("charge/{id}")).await, None);
    // Cancelling again is idempotent.
    let again = host.send(host.client.post(host.url(&format!("/orders/{id}/cancel")))).await;
    assert_eq!(again.status, StatusCode::OK);

    let done = host.run_order(&order("tok_visa", "SKU-1", "US")).await;
    let done_id = done["id"].as_str().unwrap();
    let r = host.send(host.client.post(host.url(&format!("/orders/{done_id}/cancel")))).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(host.get(&format!("/orders/{done_id}")).await.json()["status"], "COMPLETED");
}

#[tokio::test]
async fn a_payment_waiting_past_its_deadline_is_rejected_and_compensated() {
    let clock = OffsetClock::new();
    let c = clock.clone();
    let host = TestHost::start_with(move |cfg| cfg.clock = std::sync::Arc::new(c)).await;
    let id = host.post_order(&key(), &order("tok_3ds", "SKU-1", "US")).await.json()["id"].as_str().unwrap().to_owned();
    host.wait_for(&id, |o| o["steps"][1]["status"] == "waiting").await;
    // Fifteen minutes pass in an instant.
    clock.advance(15 * 60 * 1000 + 1);
    // The confirmation comes too late: refused, never accepted and then overruled by the
    // deadline (`deadline_passed`, or `not_waiting` if the host applied the deadline first).
    let path = format!("/orders/{id}/signals/payment-confirmed");
    let late = host.send(host.client.post(host.url(&path)).json(&json!({}))).await;
    assert_eq!(late.status, StatusCode::CONFLICT, "{:?}", late.json());
    let code = late.json()["error"]["code"].as_str().unwrap().to_owned();
    assert!(code == "deadline_passed" || code == "not_waiting", "{code}");
    let o = host.wait_settled(&id).await;
    assert_eq!(o["status"], "CANCELLED");
    assert_eq!(o["reason"], "payment: deadline of 900000 ms passed");
    assert_eq!(host.state("inventory", &format!("reservation/{id}")).await.unwrap()["status"], "released");
}

#[tokio::test]
async fn a_stuck_compensation_is_fixed_by_rebinding_then_retried_by_an_operator() {
    let host = TestHost::start_with(|c| c.admin_token = Some(TOKEN.into())).await;
    let original = break_payment_compensation(&host).await;

    let mut body = order("tok_visa", "SKU-1", "XX");
    body["customer_id"] = json!("compensate-panic");
    let o = host.run_order(&body).await;
    let id = o["id"].as_str().unwrap().to_owned();
    assert_eq!(o["status"], "COMPENSATION_FAILED", "{o:#}");
    assert_eq!(o["steps"][1]["status"], "compensation_failed");
    assert!(o["steps"][1]["last_error"].as_str().unwrap().contains("panicked"));
    assert_eq!(host.state("payment", &format!("charge/{id}")).await.unwrap()["status"], "charged");

    // Retrying a saga that is not stuck is refused.
    let ok = host.run_order(&order("tok_visa", "SKU-1", "US")).await;
    let r =
        admin_post(&host, &format!("/admin/sagas/{}/retry", ok["id"].as_str().unwrap()), Some(TOKEN), json!({})).await;
    assert_eq!(r.status, StatusCode::CONFLICT);

    // Bind the fixed compensation (the original plugin), then retry: one refund.
    host.catalog.put_definition(original, DefinitionSource::Admin).await.unwrap();
    let r = admin_post(
        &host,
        &format!("/admin/sagas/{id}/retry"),
        Some(TOKEN),
        json!({"note": "fixed payment compensate"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&r.bytes));
    let o = host.wait_settled(&id).await;
    assert_eq!(o["status"], "CANCELLED");
    assert_eq!(host.state("payment", &format!("charge/{id}")).await.unwrap()["status"], "refunded");
    assert_eq!(host.state("inventory", &format!("reservation/{id}")).await.unwrap()["status"], "released");
    let types = host.event_types(&id).await;
    assert_eq!(types.iter().filter(|t| *t == "OrderCompensationFailed").count(), 1);
    assert_eq!(types.iter().filter(|t| *t == "CompensationRetried").count(), 1);

    let audit =
        host.send(host.client.get(host.url(&format!("/admin/audit?target={id}"))).bearer_auth(TOKEN)).await.json();
    let entry = &audit["data"][0];
    assert_eq!(entry["action"], "saga.retry");
    assert_eq!(entry["actor"], "ops@example.com");
    assert_eq!(entry["before"]["status"], "COMPENSATION_FAILED");
    assert_eq!(entry["after"]["status"], "COMPENSATING");
    assert_eq!(entry["note"], "fixed payment compensate");
}

#[tokio::test]
async fn an_operator_can_resolve_a_stuck_saga_by_hand_with_a_note() {
    let host = TestHost::start_with(|c| c.admin_token = Some(TOKEN.into())).await;
    let (broken, _) = host.catalog.install_plugin("payment", fixture("misbehave")).await.unwrap();
    let mut def = (*host.catalog.definition("order").unwrap()).clone();
    def.steps[1].compensate = PluginRef { plugin: "payment".into(), digest: broken };
    def.steps[1].compensate_retry = RetryPolicy { max_attempts: 1, initial_backoff_ms: 10, max_backoff_ms: 20 };
    host.catalog.put_definition(def, DefinitionSource::Admin).await.unwrap();
    let mut body = order("tok_visa", "SKU-1", "XX");
    body["customer_id"] = json!("compensate-panic");
    // A waiting create is answered 200 only for COMPLETED or CANCELLED (SPEC §5.2): a saga
    // stuck for an operator lets the wait run out, 201 with the saga as it stands.
    let started = std::time::Instant::now();
    let r = host.post_order_raw(Some(&key()), body.to_string().as_bytes(), Some(2)).await;
    assert_eq!((r.status, r.json()["status"].clone()), (StatusCode::CREATED, json!("COMPENSATION_FAILED")));
    assert!(started.elapsed() >= std::time::Duration::from_secs(2), "answered before the wait ran out");
    let id = r.json()["id"].as_str().unwrap().to_owned();
    // A client cancel of it is answered as for one compensating (it is not COMPLETED).
    let r = host.send(host.client.post(host.url(&format!("/orders/{id}/cancel")))).await;
    assert_eq!((r.status, r.json()["status"].clone()), (StatusCode::OK, json!("COMPENSATION_FAILED")));

    let r = admin_post(&host, &format!("/admin/sagas/{id}/resolve"), Some(TOKEN), json!({})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "a note is required");
    // White space only, by the server's and by the schema's measure (schemathesis once sent a
    // lone U+0085, which the schema's `\S` took and the server refused).
    for blank in ["  ", "\u{85}", "\u{feff}\n"] {
        let r = admin_post(&host, &format!("/admin/sagas/{id}/resolve"), Some(TOKEN), json!({ "note": blank })).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{blank:?} is blank");
    }
    // The id as a log or a tool may show it (upper case), by an operator whose name is not
    // ASCII (the CLI sends the name's UTF-8 bytes).
    let upper = id.to_uppercase();
    let r = host
        .send(
            host.client
                .post(host.url(&format!("/admin/sagas/{upper}/resolve")))
                .json(&json!({"note": "refunded in the PSP console"}))
                .header("X-Actor", reqwest::header::HeaderValue::from_bytes("Zoë".as_bytes()).unwrap())
                .bearer_auth(TOKEN),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.json());
    assert_eq!(host.get(&format!("/orders/{id}")).await.json()["status"], "CANCELLED");
    assert_eq!(host.get(&format!("/orders/{upper}")).await.json()["id"], id.as_str());
    assert_eq!(host.event_types(&id).await.last().unwrap(), "OrderResolved");
    let audit =
        host.send(host.client.get(host.url(&format!("/admin/audit?target={upper}"))).bearer_auth(TOKEN)).await.json();
    assert_eq!(audit["data"][0]["action"], "saga.resolve");
    assert_eq!(audit["data"][0]["target"], id.as_str());
    assert_eq!(audit["data"][0]["note"], "refunded in the PSP console");
    assert_eq!(audit["data"][0]["actor"], "Zoë");
}

#[tokio::test]
async fn a_provisional_409_is_not_stored_under_the_idempotency_key() {
    let host = TestHost::start().await;
    let r = host.post_order(&key(), &order("tok_3ds", "SKU-1", "US")).await;
    let id = r.json()["id"].as_str().unwrap().to_owned();
    host.wait_for(&id, |o| o["steps"][1]["waiting_for"] == "payment-confirmed").await;
    // A webhook that arrives for a signal the saga does not wait for (yet) is refused, and a
    // retry with its key must be decided again, not replayed from a stored 409.
    let k = key();
    let path = format!("/orders/{id}/signals/not-yet");
    let send = || host.send(host.client.post(host.url(&path)).header("Idempotency-Key", &k).json(&json!({"n": 1})));
    let first = send().await;
    assert_eq!(first.status, StatusCode::CONFLICT);
    assert_eq!(first.json()["error"]["code"], "not_waiting");
    let again = send().await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert_eq!(again.header("idempotent-replayed"), None, "a provisional answer was replayed");
    // A final answer is stored: the signal it waits for, sent twice with one key.
    let k = key();
    let path = format!("/orders/{id}/signals/payment-confirmed");
    let send = || host.send(host.client.post(host.url(&path)).header("Idempotency-Key", &k).json(&json!({})));
    assert_eq!(send().await.status, StatusCode::ACCEPTED);
    let replay = send().await;
    assert_eq!(replay.status, StatusCode::ACCEPTED);
    assert_eq!(replay.header("idempotent-replayed").as_deref(), Some("true"));
}

/// An operator action refused because the saga is not stuck (yet) is decided again on its
/// keyed retry while the saga is still under way; refused for a finished saga, it is final.
#[tokio::test]
async fn an_operator_action_on_a_saga_still_under_way_is_decided_again_on_its_retry() {
    let host = TestHost::start_with(|c| c.admin_token = Some(TOKEN.into())).await;
    let id = host.post_order(&key(), &order("tok_3ds", "SKU-1", "US")).await.json()["id"].as_str().unwrap().to_owned();
    host.wait_for(&id, |o| o["steps"][1]["status"] == "waiting").await;
    let retry = |id: &str, k: &str| {
        let path = format!("/admin/sagas/{id}/retry");
        host.send(host.client.post(host.url(&path)).bearer_auth(TOKEN).header("Idempotency-Key", k).json(&json!({})))
    };
    let k = key();
    let first = retry(&id, &k).await;
    assert_eq!((first.status, first.json()["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("not_stuck")));
    let again = retry(&id, &k).await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert_eq!(again.header("idempotent-replayed"), None, "a refusal of a running saga was replayed");

    let done = host.run_order(&order("tok_visa", "SKU-1", "US")).await;
    let done_id = done["id"].as_str().unwrap();
    let k = key();
    assert_eq!(retry(done_id, &k).await.status, StatusCode::CONFLICT);
    let replay = retry(done_id, &k).await;
    assert_eq!(replay.status, StatusCode::CONFLICT);
    assert_eq!(replay.header("idempotent-replayed").as_deref(), Some("true"), "final for a finished saga");
}

#[tokio::test]
async fn a_step_rebound_to_another_plugin_keeps_compensating_in_flight_sagas_with_the_plugin_that_executed() {
    let host = TestHost::start().await;
    let r = host.post_order(&key(), &order("tok_3ds", "SKU-1", "US")).await;
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let o = host.wait_for(&id, |o| o["steps"][1]["waiting_for"] == "payment-confirmed").await;
    let payment = o["steps"][1]["execute_digest"].as_str().unwrap().to_owned();
    // An admin rebinds the payment step to a different plugin (here: inventory's component).
    let mut def = (*host.catalog.definition("order").unwrap()).clone();
    let other = def.steps[0].execute.clone();
    assert_ne!(other.plugin, "payment");
    def.steps[1].execute = other.clone();
    def.steps[1].compensate = other.clone();
    host.catalog.put_definition(def, DefinitionSource::Admin).await.unwrap();
    // The in-flight order's payment waited (it committed writes), so cancelling compensates
    // it: with the plugin that executed, which holds its state, not the one bound now.
    let cancel = host.send(host.client.post(host.url(&format!("/orders/{id}/cancel")))).await;
    assert_eq!(cancel.status, StatusCode::ACCEPTED);
    let o = host.wait_settled(&id).await;
    assert_eq!(o["status"], "CANCELLED", "{o:#}");
    assert_eq!(o["steps"][1]["status"], "compensated");
    assert_eq!(o["steps"][1]["compensate_digest"], payment.as_str(), "compensated by another plugin: {o:#}");
    assert_ne!(payment, other.digest);
}

/// The audit trail and the dead letters page by cursor: `next_cursor` leads through every
/// entry once, and a cursor that is not a number is a 400 in the API's error shape.
#[tokio::test]
async fn the_audit_trail_pages_by_cursor_over_http() {
    let host = TestHost::start_with(|c| c.admin_token = Some(TOKEN.into())).await;
    let get = |path: String| host.send(host.client.get(host.url(&path)).bearer_auth(TOKEN));
    for origin in ["http://a.example:8080", "http://b.example:8080", "http://c.example:8080"] {
        let put = host
            .client
            .put(host.url("/admin/plugins/payment/grants"))
            .bearer_auth(TOKEN)
            .json(&json!({ "allowed_hosts": [origin] }));
        assert_eq!(host.send(put).await.status, StatusCode::OK);
    }
    let all = get("/admin/audit?limit=500".to_owned()).await.json();
    let all: Vec<i64> = all["data"].as_array().unwrap().iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(all.len() >= 3, "{all:?}");
    let (mut paged, mut cursor) = (Vec::new(), None::<i64>);
    loop {
        let path = match cursor {
            Some(c) => format!("/admin/audit?limit=2&cursor={c}"),
            None => "/admin/audit?limit=2".to_owned(),
        };
        let page = get(path).await.json();
        paged.extend(page["data"].as_array().unwrap().iter().map(|e| e["id"].as_i64().unwrap()));
        match page["next_cursor"].as_i64() {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(paged, all);
    let empty = get("/admin/dead-letters".to_owned()).await.json();
    assert_eq!((empty["data"].as_array().unwrap().len(), &empty["next_cursor"]), (0, &serde_json::Value::Null));
    for path in ["/admin/audit?cursor=abc", "/admin/dead-letters?cursor=abc"] {
        let r = get(path.to_owned()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(r.json()["error"]["code"], "invalid_request", "{path}");
    }
}

/// An operator sends a dead letter again (once the sink takes it) or discards it, over HTTP,
/// audited; the redelivered event reaches the sink as it was. What the relay does with
/// refusals is tested with the broker (`kafka::`); here the letters are made as the relay
/// makes them, from a real saga's outbox rows, under the relay lease the test holds.
#[tokio::test]
async fn dead_letters_are_redelivered_or_discarded_over_http() {
    let (host, epoch) = TestHost::start_holding_the_relay(|c| c.admin_token = Some(TOKEN.into())).await;
    let id = host.run_order(&order("tok_visa", "SKU-1", "US")).await["id"].as_str().unwrap().to_owned();
    let rows = host.store.outbox_for_saga(&id).await.unwrap();
    let admin = |req: reqwest::RequestBuilder| req.bearer_auth(TOKEN).header("X-Actor", "ops");
    // Refused for good: moved to the dead letters; then the host's relay takes the lease and
    // publishes the rest of the saga's events.
    for row in &rows[..2] {
        assert!(host.store.outbox_dead_letter(row.id, "too large for the broker", 0, TEST_RELAY, epoch).await.unwrap());
    }
    host.store.relay_release(TEST_RELAY).await.unwrap();
    let events = || std::fs::read_to_string(host.dir.path().join("events.jsonl")).unwrap_or_default();
    let start = std::time::Instant::now();
    while !events().contains(&rows.last().unwrap().event_id) {
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "the relay did not publish");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (created, second) = (rows[0].event_id.clone(), rows[1].event_id.clone());
    assert_eq!((events().matches(&created).count(), events().matches(&second).count()), (0, 0), "dead letters sent");
    let listed = host.send(admin(host.client.get(host.url("/admin/dead-letters")))).await.json();
    assert_eq!(listed["data"].as_array().unwrap().len(), 2, "{listed:#}");

    // Redelivered: 202, out of the dead letters, and in the events file.
    let redeliver = |event: &str| host.client.post(host.url(&format!("/admin/dead-letters/{event}/redeliver")));
    let r = host.send(admin(redeliver(&created))).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&r.bytes));
    assert_eq!(r.json(), json!({"event_id": created, "queued": true}));
    let start = std::time::Instant::now();
    while events().matches(&created).count() < 1 {
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "not published once redelivered");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let again = host.send(admin(redeliver(&created))).await;
    assert_eq!(again.status, StatusCode::NOT_FOUND, "a second redelivery");
    assert!(again.json()["error"]["message"].as_str().unwrap().contains("redelivered or discarded already"));

    // Discarded: 204, gone; once.
    let discard = |event: &str| host.client.delete(host.url(&format!("/admin/dead-letters/{event}")));
    assert_eq!(host.send(admin(discard(&second))).await.status, StatusCode::NO_CONTENT);
    assert_eq!(host.send(admin(discard(&second))).await.status, StatusCode::NOT_FOUND);
    let listed = host.send(admin(host.client.get(host.url("/admin/dead-letters")))).await.json();
    assert_eq!(listed["data"], json!([]));
    assert_eq!(events().matches(&second).count(), 0, "a discarded event is not sent");
    assert_eq!(events().matches(&created).count(), 1, "a redelivered event is sent once");

    // Audited, with who and what the letter was.
    for (event, action) in [(&created, "dead_letter.redeliver"), (&second, "dead_letter.discard")] {
        let trail = host.send(admin(host.client.get(host.url(&format!("/admin/audit?target={event}"))))).await.json();
        let entry = &trail["data"][0];
        assert_eq!((&entry["action"], &entry["actor"]), (&json!(action), &json!("ops")), "{trail:#}");
        assert_eq!(entry["before"]["saga_id"], id.as_str(), "{entry:#}");
        assert_eq!(entry["before"]["reason"], "too large for the broker", "{entry:#}");
    }
    // Bad ids, and no admin token.
    assert_eq!(host.send(admin(discard("not-an-id"))).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(host.send(redeliver(&second)).await.status, StatusCode::UNAUTHORIZED);
    host.stop().await;
}

/// A dead letter's redelivery or discard retried with its `Idempotency-Key` (its answer was
/// lost) replays the first answer, byte for byte and marked replayed, and changes nothing
/// again: the event is in the outbox once, one audit entry each (SPEC §5.1: keys are honoured
/// on every mutating endpoint). Without the key a retry finds the letter gone (404).
#[tokio::test]
async fn a_dead_letter_request_retried_with_its_key_replays_its_answer() {
    let (host, epoch) = TestHost::start_holding_the_relay(|c| c.admin_token = Some(TOKEN.into())).await;
    let id = host.run_order(&order("tok_visa", "SKU-1", "US")).await["id"].as_str().unwrap().to_owned();
    let rows = host.store.outbox_for_saga(&id).await.unwrap();
    for row in &rows[..2] {
        assert!(host.store.outbox_dead_letter(row.id, "too large for the broker", 0, TEST_RELAY, epoch).await.unwrap());
    }
    let (first, second) = (rows[0].event_id.clone(), rows[1].event_id.clone());
    let admin = |req: reqwest::RequestBuilder, key: &str| req.bearer_auth(TOKEN).header("Idempotency-Key", key);
    let redeliver = || host.client.post(host.url(&format!("/admin/dead-letters/{first}/redeliver")));
    let discard = || host.client.delete(host.url(&format!("/admin/dead-letters/{second}")));

    let r = host.send(admin(redeliver(), "redeliver-1")).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&r.bytes));
    assert_eq!(r.header("idempotent-replayed"), None);
    let again = host.send(admin(redeliver(), "redeliver-1")).await;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&again.bytes));
    assert_eq!(again.bytes, r.bytes, "the first answer, byte for byte");
    assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
    let outbox = host.store.outbox_for_saga(&id).await.unwrap();
    assert_eq!(outbox.iter().filter(|row| row.event_id == first).count(), 1, "back in the outbox once");

    let d = host.send(admin(discard(), "discard-1")).await;
    assert_eq!(d.status, StatusCode::NO_CONTENT, "{}", String::from_utf8_lossy(&d.bytes));
    let again = host.send(admin(discard(), "discard-1")).await;
    assert_eq!(again.status, StatusCode::NO_CONTENT, "{}", String::from_utf8_lossy(&again.bytes));
    assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
    assert!(again.bytes.is_empty() && again.header("content-type").is_none(), "a 204 has no content");

    for (event, action) in [(&first, "dead_letter.redeliver"), (&second, "dead_letter.discard")] {
        let trail =
            host.send(host.client.get(host.url(&format!("/admin/audit?target={event}"))).bearer_auth(TOKEN)).await;
        let data = trail.json()["data"].as_array().unwrap().clone();
        assert_eq!(data.len(), 1, "one change, one entry: {data:#?}");
        assert_eq!(data[0]["action"], action);
    }
    // Another key, or none, is another request: the letter is gone.
    assert_eq!(host.send(admin(redeliver(), "redeliver-2")).await.status, StatusCode::NOT_FOUND);
    assert_eq!(host.send(discard().bearer_auth(TOKEN)).await.status, StatusCode::NOT_FOUND);
    host.stop().await;
}

/// A step whose plugin version no replica can load (every replica's build refuses it: a
/// rollback below the version's world, a memory limit lowered under what it needs) is not
/// called, and waits for a replica that can; once none has run it for ten minutes, its
/// attempt fails, saying why, and the saga is compensated. It waited for ever before, its
/// step showing no attempt and no error.
#[tokio::test]
async fn a_step_no_replica_can_load_fails_its_attempt_once_none_has_run_it_for_ten_minutes() {
    let clock = OffsetClock::new();
    let c = clock.clone();
    let host = TestHost::start_with(move |cfg| cfg.clock = std::sync::Arc::new(c)).await;
    // Stored as another replica would store an upload, and bound behind the catalog's checks:
    // bytes this build refuses (a core module header, no component).
    let refused = b"\0asm\x01\0\0\0 not a component".to_vec();
    let digest = sagahost::runtime::digest_of(&refused);
    host.store.put_plugin(&digest, "shipment", &refused, 0, None).await.unwrap();
    let mut def = host.store.definition("order").await.unwrap().expect("the built-in order").definition;
    def.steps[2].execute = PluginRef { plugin: "shipment".into(), digest: digest.clone() };
    def.steps[2].retry = RetryPolicy { max_attempts: 1, initial_backoff_ms: 10, max_backoff_ms: 10 };
    host.store.put_definition(&def, DefinitionSource::Admin, None, 0, None).await.unwrap();
    let start = std::time::Instant::now();
    while host.catalog.definition("order").is_none_or(|d| d.steps[2].execute.digest != digest) {
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "the catalog never saw the binding");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let id = host.post_order(&key(), &order("tok_visa", "SKU-1", "US")).await.json()["id"].as_str().unwrap().to_owned();
    let o = host.wait_for(&id, |o| o["steps"][1]["status"] == "succeeded").await;
    // Not called: no attempt, no error; the saga waits for a replica that can load it.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let o2 = host.get(&format!("/orders/{id}")).await.json();
    assert_eq!((&o2["status"], &o2["steps"][2]["attempts"]), (&json!("PAYMENT_CHARGED"), &json!(0)), "{o:#}\n{o2:#}");
    // Ten minutes on, unmoved: no replica can. (The saga was given back for 30 s: it is due.)
    clock.advance(11 * 60 * 1000);
    let o = host.wait_settled(&id).await;
    assert_eq!(o["status"], "CANCELLED", "{o:#}");
    let error = o["steps"][2]["last_error"].as_str().unwrap();
    assert!(error.contains("cannot load plugin shipment") && error.contains("no replica has run it for"), "{error}");
    assert_eq!(host.state("payment", &format!("charge/{id}")).await.unwrap()["status"], "refunded");
}
