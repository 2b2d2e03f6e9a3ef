//! The rules all three services share: the key is required, reused keys are refused, errors
//! are JSON with the right status, concurrent retries apply once, and a restart keeps it all.

use serde_json::json;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mutation_needs_a_key_and_a_key_is_one_request() {
    let (_tmp, dir) = data_dir();
    let demo = Demo::start(&dir, "http://127.0.0.1:9").await;
    let cases = [
        (format!("{}/reservations", demo.inventory), reservation("o-k", "SKU-1"), reservation("o-k", "SKU-2")),
        (format!("{}/charges", demo.payment), charge("o-k", "tok_visa"), charge("o-k", "tok_other")),
        (format!("{}/shipments", demo.shipping), shipment("o-k", "US"), shipment("o-k", "FR")),
        (format!("{}/refunds", demo.payment), r#"{"order_id":"o-k"}"#.to_owned(), r#"{"order_id": "o-k"}"#.to_owned()),
    ];
    for (i, (url, body, other_body)) in cases.into_iter().enumerate() {
        let key = format!("same-{i}");
        let missing = post(&url, None, &body).await;
        assert_eq!(missing.status, 400, "{url}");
        assert_eq!(missing.body, json!({ "error": "Idempotency-Key header required" }));

        assert_eq!(post(&url, Some(&key), &body).await.status / 100, 2, "{url}");
        let reused = post(&url, Some(&key), &other_body).await;
        assert_eq!(reused.status, 422, "{url}: the fingerprint covers the raw body");
        assert_eq!(reused.body, json!({ "error": "Idempotency-Key reused with a different request" }));
    }
    // The fingerprint covers the path too: a key used on one route is refused on another.
    let cross = post(&format!("{}/reservations/o-k/release", demo.inventory), Some("same-0"), "{}").await;
    assert_eq!(cross.status, 422);
    demo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_json_errors() {
    let (_tmp, dir) = data_dir();
    let demo = Demo::start(&dir, "http://127.0.0.1:9").await;
    let bad = [
        (format!("{}/reservations", demo.inventory), "not json"),
        (format!("{}/reservations", demo.inventory), r#"{"order_id":"o"}"#),
        (format!("{}/reservations", demo.inventory), r#"{"order_id":"o","items":[{"sku":"A","quantity":-1}]}"#),
        (format!("{}/reservations", demo.inventory), r#"{"order_id":"","items":[{"sku":"A","quantity":1}]}"#),
        (format!("{}/charges", demo.payment), r#"{"order_id":"o","amount_cents":"12","currency":"USD","token":"t"}"#),
        (format!("{}/charges", demo.payment), r#"{"order_id":"o","currency":"USD","token":"t"}"#),
        (format!("{}/shipments", demo.shipping), r#"{"order_id":"o","items":[]}"#),
    ];
    for (i, (url, body)) in bad.iter().enumerate() {
        let r = post(url, Some(&format!("bad-{i}")), body).await;
        assert_eq!(r.status, 400, "{url} {body}: {}", r.raw);
        assert!(r.body["error"].as_str().is_some_and(|e| !e.is_empty()), "{}", r.raw);
    }
    // A 400 is not stored: the same key then works with a valid body.
    let fixed = post(&format!("{}/reservations", demo.inventory), Some("bad-0"), &reservation("o", "SKU-1")).await;
    assert_eq!(fixed.status, 201);

    for base in [&demo.inventory, &demo.payment, &demo.shipping] {
        let unknown = get(&format!("{base}/nope")).await;
        assert_eq!(unknown.status, 404);
        assert!(unknown.body["error"].is_string());
        assert_eq!(get(&format!("{base}/healthz")).await.body, json!({ "status": "ok" }));
    }
    for url in [
        format!("{}/reservations", demo.inventory),
        format!("{}/refunds", demo.payment),
        format!("{}/shipments", demo.shipping),
    ] {
        let r = get(&url).await;
        assert_eq!(r.status, 405, "{url}");
        assert!(r.body["error"].is_string());
    }
    let client = reqwest::Client::new();
    let r = client.delete(format!("{}/charges/o-1", demo.payment)).send().await.unwrap();
    assert_eq!(r.status(), 405);
    demo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_with_one_key_apply_once() {
    let (_tmp, dir) = data_dir();
    let demo = Demo::start(&dir, "http://127.0.0.1:9").await;
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let url = format!("{}/charges", demo.payment);
        tasks.push(tokio::spawn(async move { post(&url, Some("c-race"), &charge("o-race", "tok_visa")).await }));
    }
    let mut fresh = 0;
    let mut bodies = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 201);
        fresh += usize::from(!r.replayed);
        bodies.push(r.raw);
    }
    assert_eq!(fresh, 1, "exactly one request applied, the others replayed");
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(effects(&demo.payment, "o-race").await["charge"], 1);
    demo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_answers_counts_and_trigger_counters() {
    let (_tmp, dir) = data_dir();
    let demo = Demo::start(&dir, "http://127.0.0.1:9").await;
    let reserved = post(&format!("{}/reservations", demo.inventory), Some("k-r"), &reservation("o-1", "SKU-1")).await;
    let declined = post(&format!("{}/charges", demo.payment), Some("k-d"), &charge("o-1", "tok_decline")).await;
    let shipped = post(&format!("{}/shipments", demo.shipping), Some("k-s"), &shipment("o-1", "US")).await;
    // One of the two injected failures happens before the restart.
    assert_eq!(post(&format!("{}/charges", demo.payment), Some("k-f"), &charge("o-2", "tok_flaky")).await.status, 503);
    demo.stop().await;

    let demo = Demo::start(&dir, "http://127.0.0.1:9").await;
    let r = post(&format!("{}/reservations", demo.inventory), Some("k-r"), &reservation("o-1", "SKU-1")).await;
    assert_eq!((r.status, r.replayed, r.raw), (201, true, reserved.raw));
    let d = post(&format!("{}/charges", demo.payment), Some("k-d"), &charge("o-1", "tok_decline")).await;
    assert_eq!((d.status, d.replayed, d.raw), (402, true, declined.raw));
    let s = post(&format!("{}/shipments", demo.shipping), Some("k-s"), &shipment("o-1", "US")).await;
    assert_eq!((s.status, s.replayed, s.raw), (201, true, shipped.raw));
    assert_eq!(effects(&demo.inventory, "o-1").await, json!({ "reserve": 1, "release": 0 }));
    assert_eq!(effects(&demo.shipping, "o-1").await, json!({ "create": 1, "cancel": 0 }));
    // The second injected failure, then the charge: the counter survived the restart.
    assert_eq!(post(&format!("{}/charges", demo.payment), Some("k-f"), &charge("o-2", "tok_flaky")).await.status, 503);
    assert_eq!(post(&format!("{}/charges", demo.payment), Some("k-f"), &charge("o-2", "tok_flaky")).await.status, 201);
    assert_eq!(effects(&demo.payment, "o-2").await["charge"], 1);
    // `/stats` counts since start.
    assert_eq!(requests(&demo.payment).await, 3);
    demo.stop().await;
}
