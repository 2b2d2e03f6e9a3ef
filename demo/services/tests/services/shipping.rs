//! The shipping service: create, the `XX` trigger, cancel.

use serde_json::json;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_replay_and_cancel() {
    let (_tmp, dir) = data_dir();
    let demo = Demo::start(&dir, "http://127.0.0.1:9").await;
    let url = format!("{}/shipments", demo.shipping);
    let created = post(&url, Some("s-1"), &shipment("o-1", "US")).await;
    assert_eq!(created.status, 201);
    assert_eq!(
        created.body,
        json!({ "shipment_id": "shp_o-1", "order_id": "o-1", "tracking": "TRK-o-1", "status": "created" })
    );
    let replay = post(&url, Some("s-1"), &shipment("o-1", "US")).await;
    assert_eq!((replay.status, replay.replayed), (201, true));
    assert_eq!(effects(&demo.shipping, "o-1").await, json!({ "create": 1, "cancel": 0 }));

    let cancel = format!("{}/shipments/o-1/cancel", demo.shipping);
    let cancelled = post(&cancel, Some("x-1"), "").await;
    assert_eq!((cancelled.status, cancelled.body.clone()), (200, json!({ "order_id": "o-1", "status": "cancelled" })));
    assert!(post(&cancel, Some("x-1"), "").await.replayed);
    let again = post(&cancel, Some("x-2"), "").await;
    assert_eq!(again.body, json!({ "order_id": "o-1", "status": "none" }));
    assert_eq!(effects(&demo.shipping, "o-1").await, json!({ "create": 1, "cancel": 1 }));
    assert_eq!(get(&format!("{}/shipments/o-1", demo.shipping)).await.body["status"], "cancelled");
    assert_eq!(post(&cancel, None, "").await.status, 400);
    demo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_carrier_for_xx_is_a_stored_422_without_effect() {
    let (_tmp, dir) = data_dir();
    let demo = Demo::start(&dir, "http://127.0.0.1:9").await;
    let url = format!("{}/shipments", demo.shipping);
    let refused = post(&url, Some("s-xx"), &shipment("o-xx", "XX")).await;
    assert_eq!((refused.status, refused.body.clone()), (422, json!({ "error": "no carrier for XX" })));
    let replay = post(&url, Some("s-xx"), &shipment("o-xx", "XX")).await;
    assert_eq!((replay.status, replay.replayed), (422, true));
    assert_eq!(effects(&demo.shipping, "o-xx").await, json!({ "create": 0, "cancel": 0 }));
    let cancel = post(&format!("{}/shipments/o-xx/cancel", demo.shipping), Some("x-xx"), "").await;
    assert_eq!(cancel.body["status"], "none");
    assert_eq!(get(&format!("{}/shipments/o-xx", demo.shipping)).await.status, 404);
    // A missing country is a bad request, not a refusal.
    let bad = post(&url, Some("s-bad"), r#"{"order_id":"o-b","ship_to":{"name":"Ada"},"items":[]}"#).await;
    assert_eq!(bad.status, 400);
    demo.stop().await;
}
