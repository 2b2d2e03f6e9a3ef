//! The inventory service: reserve, replay, release and the SKU triggers.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_replays_with_the_same_key_and_counts_once() {
    let (_tmp, dir) = data_dir();
    let demo = Demo::start(&dir, "http://127.0.0.1:9").await;
    let url = format!("{}/reservations", demo.inventory);
    let body = reservation("o-1", "SKU-1");

    let first = post(&url, Some("k-1"), &body).await;
    assert_eq!(first.status, 201, "{}", first.raw);
    assert!(!first.replayed);
    assert_eq!(
        first.body,
        json!({ "reservation_id": "res_o-1", "order_id": "o-1", "items": [{ "sku": "SKU-1", "quantity": 2 }], "status": "reserved" })
    );

    let again = post(&url, Some("k-1"), &body).await;
    assert_eq!(again.status, 201);
    assert!(again.replayed, "a replay carries Idempotent-Replayed: true");
    assert_eq!(again.raw, first.raw, "a replay is the stored body, byte for byte");
    assert_eq!(effects(&demo.inventory, "o-1").await, json!({ "reserve": 1, "release": 0 }));

    // Without the key's protection a service applies again: a new key is a new reservation.
    let other_key = post(&url, Some("k-2"), &body).await;
    assert_eq!(other_key.status, 201);
    assert!(!other_key.replayed);
    assert_eq!(effects(&demo.inventory, "o-1").await, json!({ "reserve": 2, "release": 0 }));

    let record = get(&format!("{}/reservations/o-1", demo.inventory)).await;
    assert_eq!(record.status, 200);
    assert_eq!(record.body["status"], "reserved");
    demo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_stock_is_a_stored_409_without_effect() {
    let (_tmp, dir) = data_dir();
    let demo = Demo::start(&dir, "http://127.0.0.1:9").await;
    let url = format!("{}/reservations", demo.inventory);
    let body =
        json!({ "order_id": "o-oos", "items": [{ "sku": "SKU-1", "quantity": 1 }, { "sku": "OOS-7", "quantity": 1 }] })
            .to_string();

    let first = post(&url, Some("k-oos"), &body).await;
    assert_eq!(first.status, 409);
    assert_eq!(first.body, json!({ "error": "out of stock", "sku": "OOS-7" }));
    let again = post(&url, Some("k-oos"), &body).await;
    assert_eq!((again.status, again.replayed), (409, true));
    assert_eq!(again.body, first.body);
    assert_eq!(effects(&demo.inventory, "o-oos").await, json!({ "reserve": 0, "release": 0 }));
    assert_eq!(get(&format!("{}/reservations/o-oos", demo.inventory)).await.status, 404);
    demo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_fails_twice_per_key_then_reserves_once() {
    let (_tmp, dir) = data_dir();
    let demo = Demo::start(&dir, "http://127.0.0.1:9").await;
    let url = format!("{}/reservations", demo.inventory);
    let body = reservation("o-flaky", "FLAKY-1");
    let before = requests(&demo.inventory).await;

    for _ in 0..2 {
        let r = post(&url, Some("k-flaky"), &body).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.body, json!({ "error": "inventory temporarily unavailable" }));
        assert!(!r.replayed, "an injected 503 is never stored");
    }
    assert_eq!(effects(&demo.inventory, "o-flaky").await["reserve"], 0);
    let third = post(&url, Some("k-flaky"), &body).await;
    assert_eq!((third.status, third.replayed), (201, false));
    let fourth = post(&url, Some("k-flaky"), &body).await;
    assert_eq!((fourth.status, fourth.replayed), (201, true));
    assert_eq!(effects(&demo.inventory, "o-flaky").await["reserve"], 1);
    // Another key fails twice again: the counter is per key.
    assert_eq!(post(&url, Some("k-flaky-2"), &body).await.status, 503);
    // Four POSTs and one more; the monitoring reads in between are not counted.
    assert_eq!(requests(&demo.inventory).await - before, 5);
    demo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_sleeps_once_without_blocking_others_and_a_retry_wins() {
    let (_tmp, dir) = data_dir();
    let demo = Demo::start(&dir, "http://127.0.0.1:9").await;
    let url = format!("{}/reservations", demo.inventory);
    let body = reservation("o-slow", "SLOW-1");

    let started = Instant::now();
    let slow = tokio::spawn({
        let (url, body) = (url.clone(), body.clone());
        async move { post(&url, Some("k-slow"), &body).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Another order goes through while the slow one sleeps: the lock is not held.
    let other = post(&url, Some("k-other"), &reservation("o-other", "SKU-1")).await;
    assert_eq!(other.status, 201);
    assert!(started.elapsed() < Duration::from_millis(PAUSE_MS), "another order waited for the slow one");
    // The client's retry (it timed out) is not the first request of the key: served at once.
    let retry = post(&url, Some("k-slow"), &body).await;
    assert_eq!((retry.status, retry.replayed), (201, false));
    assert!(started.elapsed() < Duration::from_millis(PAUSE_MS), "the retry slept too");
    // The slow original wakes up, finds the answer stored and replays it.
    let original = slow.await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(PAUSE_MS), "the first request did not sleep");
    assert_eq!((original.status, original.replayed), (201, true));
    assert_eq!(original.raw, retry.raw);
    assert_eq!(effects(&demo.inventory, "o-slow").await["reserve"], 1);

    // Later requests with the key do not sleep.
    let t = Instant::now();
    assert_eq!(post(&url, Some("k-slow"), &body).await.status, 201);
    assert!(t.elapsed() < Duration::from_millis(PAUSE_MS));
    demo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_alone_sleeps_then_reserves() {
    let (_tmp, dir) = data_dir();
    let demo = Demo::start(&dir, "http://127.0.0.1:9").await;
    let t = Instant::now();
    let r = post(&format!("{}/reservations", demo.inventory), Some("k"), &reservation("o-s", "SLOW-2")).await;
    assert!(t.elapsed() >= Duration::from_millis(PAUSE_MS));
    assert_eq!((r.status, r.replayed), (201, false));
    assert_eq!(effects(&demo.inventory, "o-s").await["reserve"], 1);
    demo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_answers_two_mebibytes_of_padding() {
    let (_tmp, dir) = data_dir();
    let demo = Demo::start(&dir, "http://127.0.0.1:9").await;
    let url = format!("{}/reservations", demo.inventory);
    let r = post(&url, Some("k-huge"), &reservation("o-huge", "HUGE-1")).await;
    assert_eq!(r.status, 201);
    assert_eq!(r.body["padding"].as_str().unwrap().len(), 2 * 1024 * 1024);
    assert!(r.raw.len() > 2 * 1024 * 1024);
    assert_eq!(r.body["status"], "reserved");
    let again = post(&url, Some("k-huge"), &reservation("o-huge", "HUGE-1")).await;
    assert_eq!((again.status, again.replayed, again.raw.len()), (201, true, r.raw.len()));
    assert_eq!(effects(&demo.inventory, "o-huge").await["reserve"], 1);
    demo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_releases_an_active_reservation_once() {
    let (_tmp, dir) = data_dir();
    let demo = Demo::start(&dir, "http://127.0.0.1:9").await;
    let release = format!("{}/reservations/o-r/release", demo.inventory);

    // Nothing reserved yet: nothing to release (an empty body is fine).
    let none = post(&release, Some("rel-0"), "").await;
    assert_eq!(none.status, 200);
    assert_eq!(none.body, json!({ "order_id": "o-r", "status": "none", "released": false }));

    assert_eq!(
        post(&format!("{}/reservations", demo.inventory), Some("res"), &reservation("o-r", "SKU-1")).await.status,
        201
    );
    let released = post(&release, Some("rel-1"), "{}").await;
    assert_eq!(released.status, 200);
    assert_eq!(released.body, json!({ "order_id": "o-r", "status": "released", "released": true }));
    let replay = post(&release, Some("rel-1"), "{}").await;
    assert_eq!((replay.status, replay.replayed), (200, true));
    assert_eq!(replay.body, released.body);
    // A new key finds nothing active any more.
    let later = post(&release, Some("rel-2"), "{}").await;
    assert_eq!(later.body["released"], false);
    assert_eq!(effects(&demo.inventory, "o-r").await, json!({ "reserve": 1, "release": 1 }));
    assert_eq!(get(&format!("{}/reservations/o-r", demo.inventory)).await.body["status"], "released");

    // The key is still required, and the body must be empty or an object.
    assert_eq!(post(&release, None, "{}").await.status, 400);
    assert_eq!(post(&release, Some("rel-3"), "[1]").await.status, 400);
    demo.stop().await;
}
