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

/// A web page of another site cannot act on orders through its visitor's browser (a "simple"
/// cross-origin POST needs no preflight: `text/plain`, no custom header), nor read the API by
/// pointing a DNS name of its own at the loopback address the host listens on (DNS
/// rebinding). Requests from the host's own pages, from `localhost`, by IP address, and from
/// clients that are not browsers go through as before.
#[tokio::test]
async fn pages_of_other_origins_and_rebound_names_are_refused() {
    const CONFIRMED: &str = r#"{"confirmed": true}"#;
    let host = TestHost::start_with(|c| c.allowed_hosts = vec!["orders.example.com".into()]).await;
    let waiting =
        host.post_order(&key(), &order("tok_3ds", "SKU-1", "US")).await.json()["id"].as_str().unwrap().to_owned();
    let before = host.wait_for(&waiting, |o| o["steps"][1]["waiting_for"] == "payment-confirmed").await;
    let port = host.base.rsplit(':').next().unwrap().to_owned();
    let cancel = || host.client.post(host.url(&format!("/orders/{waiting}/cancel")));
    let signal = || host.client.post(host.url(&format!("/orders/{waiting}/signals/payment-confirmed")));

    // A page of another site: refused, nothing changed.
    for req in [
        cancel().header("origin", "https://evil.example").header("content-type", "text/plain").body("{}"),
        signal().header("origin", "https://evil.example").header("content-type", "text/plain").body(CONFIRMED),
        signal().header("origin", "null").body(CONFIRMED),
        signal().header("origin", format!("http://127.0.0.1:{}", port.parse::<u16>().unwrap() + 1)).body(CONFIRMED),
    ] {
        let r = host.send(req).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", String::from_utf8_lossy(&r.bytes));
        assert_eq!(r.json()["error"]["code"], "cross_origin");
    }
    let o = host.send(host.client.get(host.url(&format!("/orders/{waiting}")))).await.json();
    assert_eq!(o["status"], before["status"], "{o:#}");
    assert_eq!(o["steps"][1]["waiting_for"], "payment-confirmed", "{o:#}");

    // A rebound name, even with a same-origin Origin: refused, saying which flag serves it.
    let rebound = format!("rebind.evil.example:{port}");
    for req in [
        host.client.get(host.url("/orders")).header("host", &rebound),
        signal().header("host", &rebound).header("origin", format!("http://{rebound}")).body(CONFIRMED),
    ] {
        let r = host.send(req).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", String::from_utf8_lossy(&r.bytes));
        assert_eq!(r.json()["error"]["code"], "host_not_allowed");
        assert!(r.json()["error"]["message"].as_str().unwrap().contains("--allowed-host rebind.evil.example"));
    }

    // localhost, a listed name, and the host's own pages (Origin = Host) go through.
    for name in [format!("localhost:{port}"), format!("orders.example.com:{port}")] {
        let r = host.send(host.client.get(host.url("/orders")).header("host", &name)).await;
        assert_eq!(r.status, StatusCode::OK, "{name}: {}", String::from_utf8_lossy(&r.bytes));
    }
    let same =
        signal().header("origin", format!("http://127.0.0.1:{port}")).json(&serde_json::json!({"confirmed": true}));
    let r = host.send(same).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&r.bytes));
    let done = host.wait_settled(&waiting).await;
    assert_eq!(done["status"], "COMPLETED", "{done:#}");
    host.stop().await;
}
