//! Outbound grants over the admin API (SPEC §4.1): `PUT` and `GET /admin/plugins/{name}/grants`
//! validate, store the canonical form, audit every change and keep it in the database only.
//! What a plugin may then reach is the runtime's part, tested with the outbound path.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::harness::{fixture, open_store, Resp, TestHost};

const TOKEN: &str = "grants-admin-token";

async fn admin_host() -> TestHost {
    TestHost::start_with(|c| c.admin_token = Some(TOKEN.into())).await
}

async fn admin(host: &TestHost, method: Method, path: &str, body: Option<&str>) -> Resp {
    let mut req = host.client.request(method, host.url(path)).bearer_auth(TOKEN).header("X-Actor", "team-payments");
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b.to_owned());
    }
    host.send(req).await
}

async fn put(host: &TestHost, plugin: &str, body: Value) -> Resp {
    admin(host, Method::PUT, &format!("/admin/plugins/{plugin}/grants"), Some(&body.to_string())).await
}

async fn get(host: &TestHost, plugin: &str) -> Resp {
    admin(host, Method::GET, &format!("/admin/plugins/{plugin}/grants"), None).await
}

async fn audit(host: &TestHost, target: &str) -> Vec<Value> {
    let r = admin(host, Method::GET, &format!("/admin/audit?target={target}"), None).await;
    r.json()["data"].as_array().unwrap().clone()
}

#[tokio::test]
async fn grants_are_stored_canonical_audited_and_revoked_by_an_empty_list() {
    let host = admin_host().await;
    // None by default, for a built-in plugin as for any other.
    let r = get(&host, "payment").await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.bytes));
    assert_eq!(r.json(), json!({"plugin": "payment", "allowed_hosts": [], "credentials": []}));

    let r = put(
        &host,
        "payment",
        json!({"allowed_hosts": ["http://127.0.0.1:9001", "HTTPS://Payments.Example.com/", "http://127.0.0.1:9001/", "http://[::1]:9002"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.bytes));
    let canonical = json!(["http://127.0.0.1:9001", "https://payments.example.com:443", "http://[::1]:9002"]);
    assert_eq!(r.json(), json!({"plugin": "payment", "allowed_hosts": canonical, "credentials": []}));
    assert_eq!(get(&host, "payment").await.json()["allowed_hosts"], canonical);
    assert_eq!(get(&host, "inventory").await.json()["allowed_hosts"], json!([]), "grants are per plugin");

    // The runtime reads grants from the database, not from this process: a store opened
    // apart from the host (as another replica's would be) sees them at once.
    let other = open_store(host.dir.path()).await;
    assert_eq!(json!(other.grants("payment").await.unwrap().allowed_hosts), canonical);

    // Replaced whole; an empty list revokes everything.
    let r = put(&host, "payment", json!({"allowed_hosts": ["http://localhost:9003"]})).await;
    assert_eq!(r.json()["allowed_hosts"], json!(["http://localhost:9003"]));
    let r = put(&host, "payment", json!({"allowed_hosts": []})).await;
    assert_eq!((r.status, r.json()["allowed_hosts"].clone()), (StatusCode::OK, json!([])));
    assert_eq!(get(&host, "payment").await.json()["allowed_hosts"], json!([]));
    assert!(other.grants("payment").await.unwrap().allowed_hosts.is_empty());

    // Every change is audited: who, and the list before and after.
    let entries = audit(&host, "payment").await;
    let got: Vec<(Value, Value, Value, Value)> = entries
        .iter()
        .map(|e| (e["action"].clone(), e["actor"].clone(), e["before"].clone(), e["after"].clone()))
        .collect();
    let grants = json!("plugin.grants");
    let actor = json!("team-payments");
    let hosts = |list: Value| json!({"allowed_hosts": list, "credentials": []});
    assert_eq!(
        got,
        [
            (grants.clone(), actor.clone(), hosts(json!(["http://localhost:9003"])), hosts(json!([]))),
            (grants.clone(), actor.clone(), hosts(canonical.clone()), hosts(json!(["http://localhost:9003"]))),
            (grants, actor, hosts(json!([])), hosts(canonical)),
        ]
    );
}

#[tokio::test]
async fn invalid_grants_change_nothing() {
    let host = admin_host().await;
    let granted = json!(["http://127.0.0.1:9001"]);
    assert_eq!(put(&host, "shipment", json!({"allowed_hosts": granted})).await.status, StatusCode::OK);

    // Anything that is not an http(s) origin: 422 with the reason.
    for bad in [
        "ftp://files.example.com",
        "127.0.0.1:9001",
        "http://example.com/path",
        "http://example.com?q=1",
        "http://user@example.com",
        "http://example.com:0",
        "http://127.1",
        "http://*.example.com",
        "",
    ] {
        let r = put(&host, "shipment", json!({"allowed_hosts": ["http://ok.example.com", bad]})).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {}", String::from_utf8_lossy(&r.bytes));
        let e = r.json();
        assert_eq!(e["error"]["code"], "invalid_grant", "{bad}");
        assert_eq!(e["error"]["field"], "allowed_hosts", "{bad}");
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("allowed_hosts: ") && message.len() > 16, "{bad}: {message}");
    }
    let too_many: Vec<String> = (0..65).map(|i| format!("http://127.0.0.1:{}", 9000 + i)).collect();
    let r = put(&host, "shipment", json!({"allowed_hosts": too_many})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("at most 64"));
    let sixty_four: Vec<String> = (0..64).map(|i| format!("http://127.0.0.1:{}", 9000 + i)).collect();
    assert_eq!(put(&host, "other", json!({"allowed_hosts": sixty_four})).await.status, StatusCode::NOT_FOUND);

    // Not the body's shape: 400, the way other admin bodies are refused.
    for body in [
        r#"{"allowed_hosts": ["http://127.0.0.1:9002"], "extra": 1}"#,
        r#"{"allowed_host": ["http://127.0.0.1:9002"]}"#,
        r#"{}"#,
        r#"{"allowed_hosts": "http://127.0.0.1:9002"}"#,
        r#"{"allowed_hosts": [9002]}"#,
        r#"{"allowed_hosts": null}"#,
        r#"["http://127.0.0.1:9002"]"#,
        "not json",
        "",
    ] {
        let r = admin(&host, Method::PUT, "/admin/plugins/shipment/grants", Some(body)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", String::from_utf8_lossy(&r.bytes));
        assert_eq!(r.json()["error"]["code"], "invalid_request", "{body}");
    }

    // Plugins that were never uploaded, and names that name no plugin: 404 on both methods.
    for name in ["nope", "Payment", "-x"] {
        assert_eq!(get(&host, name).await.status, StatusCode::NOT_FOUND, "{name}");
        let r = put(&host, name, json!({"allowed_hosts": []})).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{name}");
    }
    assert_eq!(get(&host, "nope").await.json()["error"]["code"], "not_found");

    // Nothing above changed the grants or wrote an audit entry.
    assert_eq!(get(&host, "shipment").await.json()["allowed_hosts"], granted);
    assert_eq!(audit(&host, "shipment").await.len(), 1);
    assert!(audit(&host, "nope").await.is_empty());
}

#[tokio::test]
async fn an_uploaded_plugin_has_grants_and_the_routes_need_the_admin_token() {
    let host = admin_host().await;
    let url = host.url("/admin/plugins/counter/grants");
    assert_eq!(get(&host, "counter").await.status, StatusCode::NOT_FOUND);
    let r = host
        .send(host.client.post(host.url("/admin/plugins/counter")).bearer_auth(TOKEN).body(fixture("counter")))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&r.bytes));
    assert_eq!(
        get(&host, "counter").await.json(),
        json!({"plugin": "counter", "allowed_hosts": [], "credentials": []})
    );
    let r = put(&host, "counter", json!({"allowed_hosts": ["https://api.example.com:8443"]})).await;
    assert_eq!(r.json()["allowed_hosts"], json!(["https://api.example.com:8443"]));

    // No token, or a wrong one: 401 and nothing changes.
    assert_eq!(host.send(host.client.get(&url)).await.status, StatusCode::UNAUTHORIZED);
    let body = json!({"allowed_hosts": []}).to_string();
    let r = host.send(host.client.put(&url).bearer_auth("wrong").body(body.clone())).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(get(&host, "counter").await.json()["allowed_hosts"], json!(["https://api.example.com:8443"]));

    // Admin off: 403.
    let closed = TestHost::start().await;
    let r = closed.send(closed.client.put(closed.url("/admin/plugins/payment/grants")).body(body)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn the_openapi_document_describes_the_grants_routes() {
    let host = TestHost::start().await;
    let api = host.get("/openapi.json").await.json();
    let path = &api["paths"]["/admin/plugins/{name}/grants"];
    for (method, codes) in [
        ("put", &["200", "400", "401", "403", "404", "409", "413", "422", "503"][..]),
        ("get", &["200", "401", "403", "404"][..]),
    ] {
        let responses = path[method]["responses"].as_object().unwrap_or_else(|| panic!("{method} grants is missing"));
        for code in codes {
            assert!(responses.contains_key(*code), "{method} grants does not document {code}: {responses:?}");
        }
        assert_eq!(path[method]["security"][0]["admin_token"], json!([]), "{method}");
    }
    let schemas = &api["components"]["schemas"];
    let request = &schemas["GrantsRequest"];
    assert_eq!(request["additionalProperties"], false, "{request:#}");
    assert_eq!(request["required"], json!(["allowed_hosts"]));
    assert_eq!(request["properties"]["allowed_hosts"]["maxItems"], 64);
    assert_eq!(request["properties"]["allowed_hosts"]["items"]["maxLength"], 256);
    assert_eq!(request["example"]["allowed_hosts"][0], "http://127.0.0.1:9001");
    assert_eq!(schemas["GrantsView"]["example"]["plugin"], "payment");
    assert_eq!(request["properties"]["credentials"]["maxItems"], 16, "{request:#}");
    assert_eq!(schemas["Credential"]["additionalProperties"], false);
    assert_eq!(schemas["Credential"]["required"], json!(["origin", "header", "value"]));
}

/// A host with admin on and `secrets` as its secrets directory.
async fn host_with_secrets(secrets: &std::path::Path) -> TestHost {
    let secrets = sagahost::secrets::Secrets::from_flag(secrets.to_str().unwrap()).unwrap();
    TestHost::start_with(move |c| {
        c.admin_token = Some(TOKEN.into());
        c.limits.http.secrets = Some(secrets);
    })
    .await
}

#[tokio::test]
async fn credentials_name_secrets_the_host_can_read_and_only_their_templates_are_ever_shown() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("stripe-key"), "sk_live_not_for_eyes\n").unwrap();
    let host = host_with_secrets(dir.path()).await;
    let body = json!({
        "allowed_hosts": ["https://api.stripe.com", "http://127.0.0.1:9002"],
        "credentials": [
            {"origin": "HTTPS://API.Stripe.com", "header": "Authorization", "value": "Bearer ${stripe-key}"},
            {"origin": "http://127.0.0.1:9002", "header": "X-Api-Key", "value": "${stripe-key}"}
        ]
    });
    let r = put(&host, "payment", body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.bytes));
    let credentials = json!([
        {"origin": "https://api.stripe.com:443", "header": "authorization", "value": "Bearer ${stripe-key}"},
        {"origin": "http://127.0.0.1:9002", "header": "x-api-key", "value": "${stripe-key}"}
    ]);
    assert_eq!(r.json()["credentials"], credentials);
    let shown = get(&host, "payment").await;
    assert_eq!(shown.json()["credentials"], credentials);
    let audited = audit(&host, "payment").await;
    assert_eq!(audited[0]["after"]["credentials"], credentials);
    // The secret itself is nowhere: not in the answers, the audit trail or the database.
    let other = open_store(host.dir.path()).await;
    assert_eq!(json!(other.grants("payment").await.unwrap().credentials), credentials);
    for text in [String::from_utf8_lossy(&r.bytes).into_owned(), shown.json().to_string(), json!(audited).to_string()] {
        assert!(!text.contains("sk_live"), "{text}");
    }

    // Refused, with the entry and the reason, and nothing changed: a secret this host cannot
    // read, a credential for an origin not granted, a header the host manages, a value naming
    // no secret (what a shell leaves of "Bearer ${key}" in double quotes).
    std::fs::write(dir.path().join("empty"), "").unwrap();
    for (credential, code, field, why) in [
        (
            json!({"origin": "https://api.stripe.com", "header": "authorization", "value": "Bearer ${stripe-kee}"}),
            "unknown_secret",
            "credentials[0].value",
            "no secret named \"stripe-kee\"",
        ),
        (
            json!({"origin": "https://api.stripe.com", "header": "authorization", "value": "Bearer ${empty}"}),
            "unknown_secret",
            "credentials[0].value",
            "it is empty",
        ),
        (
            json!({"origin": "https://evil.example", "header": "authorization", "value": "Bearer ${stripe-key}"}),
            "invalid_grant",
            "credentials[0].origin",
            "not among allowed_hosts",
        ),
        (
            json!({"origin": "https://api.stripe.com", "header": "Host", "value": "${stripe-key}"}),
            "invalid_grant",
            "credentials[0].header",
            "set by the host",
        ),
        (
            json!({"origin": "https://api.stripe.com", "header": "authorization", "value": "Bearer -key"}),
            "invalid_grant",
            "credentials[0].value",
            "names no secret",
        ),
    ] {
        let body = json!({"allowed_hosts": ["https://api.stripe.com"], "credentials": [credential]});
        let r = put(&host, "payment", body).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{field}: {}", String::from_utf8_lossy(&r.bytes));
        let e = &r.json()["error"];
        assert_eq!((e["code"].as_str(), e["field"].as_str()), (Some(code), Some(field)), "{e}");
        assert!(e["message"].as_str().unwrap().contains(why), "{e}");
    }
    // Not the body's shape: 400.
    for credentials in [
        json!({"origin": "x"}),
        json!([{"origin": "https://api.stripe.com", "header": "a"}]),
        json!([{
        "origin": "https://api.stripe.com", "header": "a", "value": "${stripe-key}", "secret": "x"}]),
    ] {
        let body = json!({"allowed_hosts": ["https://api.stripe.com"], "credentials": credentials});
        assert_eq!(put(&host, "payment", body).await.status, StatusCode::BAD_REQUEST);
    }
    assert_eq!(get(&host, "payment").await.json()["credentials"], credentials);
    assert_eq!(audit(&host, "payment").await.len(), 1);

    // A refusal for a secret not there yet is not stored under the request's key: once the
    // file is there (a secret reaching the pod late), the retry with the same key goes through.
    let body = json!({"allowed_hosts": ["https://api.stripe.com"], "credentials": [
        {"origin": "https://api.stripe.com", "header": "authorization", "value": "Bearer ${late-key}"}]});
    let keyed = || {
        host.client
            .put(host.url("/admin/plugins/payment/grants"))
            .bearer_auth(TOKEN)
            .header("Idempotency-Key", "grant-late-key")
            .json(&body)
    };
    let r = host.send(keyed()).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", String::from_utf8_lossy(&r.bytes));
    std::fs::write(dir.path().join("late-key"), "sk_live_late").unwrap();
    let r = host.send(keyed()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.bytes));
    assert_eq!(r.json()["credentials"][0]["value"], "Bearer ${late-key}");

    // A host without a secrets directory can grant no credential.
    let plain = admin_host().await;
    let body = json!({"allowed_hosts": ["https://api.stripe.com"], "credentials": [
        {"origin": "https://api.stripe.com", "header": "authorization", "value": "Bearer ${stripe-key}"}]});
    let r = put(&plain, "payment", body).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("no secrets directory"), "{}", r.json());
}
