//! SPEC §8: secrets stay out of reads and events, and client routes can be closed with API
//! tokens.

use reqwest::StatusCode;

use crate::harness::{good_order, key, order, TestHost};

#[tokio::test]
async fn the_payment_token_is_redacted_in_responses_events_and_stored_replays_but_reaches_the_plugin() {
    let host = TestHost::start().await;
    let k = key();
    let r = host.post_order(&k, &good_order()).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let created = r.json();
    assert_eq!(created["input"]["payment"]["token"], "[redacted]");
    assert_eq!(created["input"]["customer_id"], "c-42", "only the sensitive field is redacted");
    let id = created["id"].as_str().unwrap().to_owned();
    let o = host.wait_settled(&id).await;
    assert_eq!(o["status"], "COMPLETED");
    assert_eq!(o["input"]["payment"]["token"], "[redacted]");
    // The stored idempotent response, replayed byte for byte, never had it.
    let replay = host.post_order(&k, &good_order()).await;
    assert_eq!(replay.header("idempotent-replayed").as_deref(), Some("true"));
    assert!(!String::from_utf8_lossy(&replay.bytes).contains("tok_visa"));
    // Nor does any event.
    for e in host.events(&id).await {
        assert!(!e.to_string().contains("tok_visa"), "{e}");
    }
    let first = &host.events(&id).await[0];
    assert_eq!(first["data"]["input"]["payment"]["token"], "[redacted]");
    // The plugin still sees the real token: tok_decline is declined.
    let declined = host.run_order(&order("tok_decline", "SKU-1", "US")).await;
    assert_eq!(declined["status"], "CANCELLED");
    assert!(declined["reason"].as_str().unwrap().contains("card declined"), "{declined:#}");
}

#[tokio::test]
async fn api_tokens_close_the_client_routes_and_scope_idempotency_keys() {
    let host = TestHost::start_with(|c| c.api_tokens = vec!["team-a".into(), "team-b".into()]).await;
    let post = |token: Option<&'static str>, k: String| {
        let mut req = host.client.post(host.url("/orders")).header("Idempotency-Key", k).json(&good_order());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        host.send(req)
    };
    let r = post(None, key()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"));
    assert_eq!(post(Some("wrong"), key()).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(host.get("/orders").await.status, StatusCode::UNAUTHORIZED);
    let listed = host.send(host.client.get(host.url("/sagas/order")).bearer_auth("team-b")).await;
    assert_eq!(listed.status, StatusCode::OK);
    // One key from two callers is two keys: two orders, neither a replay.
    let k = key();
    let a = post(Some("team-a"), k.clone()).await;
    let b = post(Some("team-b"), k.clone()).await;
    assert_eq!((a.status, b.status), (StatusCode::CREATED, StatusCode::CREATED));
    assert_ne!(a.json()["id"], b.json()["id"]);
    assert_eq!(b.header("idempotent-replayed"), None);
    // The same caller with the same key replays, however it spells the scheme and spaces that
    // the token check accepts: the scope is the token, not the header's text.
    let again = post(Some("team-a"), k.clone()).await;
    assert_eq!(again.json()["id"], a.json()["id"]);
    for header in ["bearer team-a", "Bearer  team-a ", "bearer   team-a"] {
        let req =
            host.client.post(host.url("/orders")).header("Idempotency-Key", k.clone()).header("Authorization", header);
        let spelled = host.send(req.json(&good_order())).await;
        assert_eq!(spelled.status, StatusCode::CREATED, "{header:?}: {:?}", spelled.json());
        assert_eq!(spelled.json()["id"], a.json()["id"], "{header:?} is team-a's scope");
        assert_eq!(spelled.header("idempotent-replayed").as_deref(), Some("true"), "{header:?}");
    }
    // Health and metrics stay open for probes.
    assert_eq!(host.get("/healthz").await.status, StatusCode::OK);
}
