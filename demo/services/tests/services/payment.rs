//! The payment service: charges, the token triggers, 3-D Secure with its webhook, refunds.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charge_replays_and_reads_back() {
    let (_tmp, dir) = data_dir();
    let demo = Demo::start(&dir, "http://127.0.0.1:9").await;
    let url = format!("{}/charges", demo.payment);
    let first = post(&url, Some("c-1"), &charge("o-1", "tok_visa")).await;
    assert_eq!(first.status, 201);
    assert_eq!(
        first.body,
        json!({ "charge_id": "ch_o-1", "order_id": "o-1", "amount_cents": 2500, "currency": "USD", "status": "charged" })
    );
    let again = post(&url, Some("c-1"), &charge("o-1", "tok_visa")).await;
    assert_eq!((again.status, again.replayed), (201, true));
    assert_eq!(effects(&demo.payment, "o-1").await, json!({ "charge": 1, "refund": 0 }));
    let record = get(&format!("{}/charges/o-1", demo.payment)).await;
    assert_eq!((record.status, record.body.clone()), (200, first.body));
    let missing = get(&format!("{}/charges/o-none", demo.payment)).await;
    assert_eq!(missing.status, 404);
    assert!(missing.body["error"].as_str().unwrap().contains("o-none"));
    demo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decline_is_a_stored_402_without_effect() {
    let (_tmp, dir) = data_dir();
    let demo = Demo::start(&dir, "http://127.0.0.1:9").await;
    let url = format!("{}/charges", demo.payment);
    let first = post(&url, Some("c-d"), &charge("o-d", "tok_decline")).await;
    assert_eq!((first.status, first.body.clone()), (402, json!({ "error": "card declined" })));
    let again = post(&url, Some("c-d"), &charge("o-d", "tok_decline")).await;
    assert_eq!((again.status, again.replayed), (402, true));
    assert_eq!(effects(&demo.payment, "o-d").await, json!({ "charge": 0, "refund": 0 }));
    assert_eq!(get(&format!("{}/charges/o-d", demo.payment)).await.status, 404);
    demo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_token_fails_twice_then_charges_once() {
    let (_tmp, dir) = data_dir();
    let demo = Demo::start(&dir, "http://127.0.0.1:9").await;
    let url = format!("{}/charges", demo.payment);
    for _ in 0..2 {
        let r = post(&url, Some("c-f"), &charge("o-f", "tok_flaky")).await;
        assert_eq!((r.status, r.body.clone()), (503, json!({ "error": "payment gateway unavailable" })));
    }
    assert_eq!(post(&url, Some("c-f"), &charge("o-f", "tok_flaky")).await.status, 201);
    let replay = post(&url, Some("c-f"), &charge("o-f", "tok_flaky")).await;
    assert_eq!((replay.status, replay.replayed), (201, true));
    assert_eq!(effects(&demo.payment, "o-f").await["charge"], 1);
    demo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_d_secure_confirm_charges_once_and_signals_sagahost() {
    let (_tmp, dir) = data_dir();
    // sagahost answers 409 twice (the saga does not wait yet), then 202.
    let sagahost = Recorder::start(2).await;
    let demo = Demo::start(&dir, &sagahost.url).await;
    let url = format!("{}/charges", demo.payment);

    let pending = post(&url, Some("c-3ds"), &charge("o-3ds", "tok_3ds")).await;
    assert_eq!(pending.status, 202);
    assert_eq!(pending.body["status"], "requires_action");
    assert_eq!(pending.body["charge_id"], "ch_o-3ds");
    assert_eq!(effects(&demo.payment, "o-3ds").await["charge"], 0, "no effect before the confirmation");

    let confirm = format!("{}/charges/o-3ds/confirm", demo.payment);
    let confirmed = post(&confirm, None, "").await;
    assert_eq!(confirmed.status, 200);
    assert_eq!(confirmed.body["status"], "charged");
    assert_eq!(effects(&demo.payment, "o-3ds").await["charge"], 1);

    let seen = sagahost.wait_for(3).await;
    for r in &seen {
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/sagas/order-http/o-3ds/signals/payment-confirmed");
        assert_eq!(r.body, json!({ "charge_id": "ch_o-3ds" }));
        assert_eq!(r.authorization.as_deref(), Some("Bearer secret-token"));
        assert_eq!(r.idempotency_key, seen[0].idempotency_key, "re-sends carry the same key");
    }
    assert!(seen[0].idempotency_key.is_some());

    // Confirming again is a no-op: same record, no effect, no new signal.
    let twice = post(&confirm, None, "").await;
    assert_eq!((twice.status, twice.body.clone()), (200, confirmed.body));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(sagahost.seen().len(), 3, "the webhook stopped after the 202 and did not fire again");
    assert_eq!(effects(&demo.payment, "o-3ds").await["charge"], 1);

    // A refunded charge cannot be confirmed.
    let refunded = post(&format!("{}/refunds", demo.payment), Some("r-3ds"), r#"{"order_id":"o-3ds"}"#).await;
    assert_eq!(refunded.body, json!({ "order_id": "o-3ds", "status": "refunded", "refunded_cents": 2500 }));
    assert_eq!(post(&confirm, None, "").await.status, 409);
    assert_eq!(post(&format!("{}/charges/o-none/confirm", demo.payment), None, "").await.status, 404);
    demo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_commits_before_answering() {
    let (_tmp, dir) = data_dir();
    let demo = Demo::start(&dir, "http://127.0.0.1:9").await;
    let url = format!("{}/charges", demo.payment);
    let started = Instant::now();
    let held = tokio::spawn({
        let url = url.clone();
        async move { post(&url, Some("c-hold"), &charge("o-hold", "tok_hold")).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The charge is already applied and its answer stored while the first request still holds.
    assert_eq!(effects(&demo.payment, "o-hold").await["charge"], 1);
    let replay = post(&url, Some("c-hold"), &charge("o-hold", "tok_hold")).await;
    assert_eq!((replay.status, replay.replayed), (201, true));
    assert!(started.elapsed() < Duration::from_millis(PAUSE_MS), "the replay waited for the hold");
    let first = held.await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(PAUSE_MS), "the first answer was not held");
    assert_eq!((first.status, first.replayed), (201, false));
    assert_eq!(first.raw, replay.raw);
    assert_eq!(effects(&demo.payment, "o-hold").await["charge"], 1);
    demo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refund_semantics() {
    let (_tmp, dir) = data_dir();
    let demo = Demo::start(&dir, "http://127.0.0.1:9").await;
    let charges = format!("{}/charges", demo.payment);
    let refunds = format!("{}/refunds", demo.payment);

    // Nothing charged.
    let none = post(&refunds, Some("r-0"), r#"{"order_id":"o-r"}"#).await;
    assert_eq!((none.status, none.body), (200, json!({ "order_id": "o-r", "status": "none", "refunded_cents": 0 })));

    // Charged: refunded once, whatever the retries.
    assert_eq!(post(&charges, Some("c-r"), &charge("o-r", "tok_visa")).await.status, 201);
    let refunded = post(&refunds, Some("r-1"), r#"{"order_id":"o-r"}"#).await;
    assert_eq!(refunded.body, json!({ "order_id": "o-r", "status": "refunded", "refunded_cents": 2500 }));
    let replay = post(&refunds, Some("r-1"), r#"{"order_id":"o-r"}"#).await;
    assert_eq!((replay.status, replay.replayed, replay.body), (200, true, refunded.body));
    let new_key = post(&refunds, Some("r-2"), r#"{"order_id":"o-r"}"#).await;
    assert_eq!(new_key.body["status"], "none");
    assert_eq!(effects(&demo.payment, "o-r").await, json!({ "charge": 1, "refund": 1 }));
    assert_eq!(get(&format!("{}/charges/o-r", demo.payment)).await.body["status"], "refunded");

    // Requires action: the refund cancels it, no effect, and it cannot be confirmed any more.
    assert_eq!(post(&charges, Some("c-a"), &charge("o-a", "tok_3ds")).await.status, 202);
    let cancelled = post(&refunds, Some("r-a"), r#"{"order_id":"o-a"}"#).await;
    assert_eq!(cancelled.body, json!({ "order_id": "o-a", "status": "cancelled", "refunded_cents": 0 }));
    assert_eq!(get(&format!("{}/charges/o-a", demo.payment)).await.body["status"], "cancelled");
    assert_eq!(post(&format!("{}/charges/o-a/confirm", demo.payment), None, "").await.status, 409);
    assert_eq!(effects(&demo.payment, "o-a").await, json!({ "charge": 0, "refund": 0 }));

    assert_eq!(post(&refunds, None, r#"{"order_id":"o-r"}"#).await.status, 400);
    assert_eq!(post(&refunds, Some("r-x"), r#"{}"#).await.status, 400);
    demo.stop().await;
}
