//! `sagahost plugin run|check`, a plugin author's local tools, run as authors run them: the real
//! binary as a child process on the real demo plugins and fixtures, no host, its `--json`
//! parsed, its text read, its exit codes checked against docs/cli.md.

use serde_json::{json, Value};

use crate::harness::plugin_path;
use crate::process::{plugin_run, run_command, Run};

/// The path of a built plugin or fixture (`payment`, `unknown-import`, ...).
fn wasm(name: &str) -> String {
    let path = plugin_path(name);
    assert!(std::path::Path::new(&path).exists(), "{path} missing; building the host builds the plugins workspace");
    path
}

/// Runs `sagahost ARGS` (`plugin run` with a patient timeout, see `process::plugin_run`).
async fn sagahost(args: &[&str]) -> Run {
    match args {
        ["plugin", "run", rest @ ..] => plugin_run(rest).await,
        _ => run_command(args, &[]).await,
    }
}

/// The step input of the order saga's payment step, as the host builds it.
fn payment_input(token: &str) -> String {
    json!({
        "input": {
            "customer_id": "c1",
            "items": [{"sku": "SKU-1", "quantity": 2, "unit_price_cents": 1250}],
            "currency": "USD",
            "payment": {"token": token},
            "shipping": {"country": "DE"},
        },
        "steps": {"reserve": {"reservation_id": "r1"}},
        "config": null,
    })
    .to_string()
}

/// The step input of a misbehave fixture call in `mode`.
fn misbehave_input(mode: &str, config: Value) -> String {
    json!({"input": {"customer_id": mode}, "steps": {}, "config": config}).to_string()
}

#[tokio::test]
async fn a_payment_charges_writes_its_state_and_logs_in_text_and_json() {
    let payment = wasm("payment");
    let input = payment_input("tok_visa");
    let text = sagahost(&["plugin", "run", &payment, "--input", &input, "--saga-id", "o-1"]).await.exits(0);
    for part in ["outcome:  done", "charge/o-1", "state writes: 1", "wall time:", "peak memory:", "logs: 1"] {
        assert!(text.stdout.contains(part), "{part:?} missing from {}", text.stdout);
    }
    let run =
        sagahost(&["plugin", "run", &payment, "--input", &input, "--saga-id", "o-1", "--step", "payment", "--json"])
            .await
            .exits(0);
    let r = run.json();
    assert_eq!(r["outcome"], "done");
    assert_eq!(r["call"], "execute");
    assert_eq!(r["plugin"], "payment");
    assert_eq!(r["output"], json!({"charge_id": "ch_o-1", "amount_cents": 2500, "currency": "USD"}));
    assert_eq!(
        r["state_writes"],
        json!([{"key": "charge/o-1", "op": "set",
                "value": {"amount_cents": 2500, "currency": "USD", "status": "charged"}}])
    );
    assert_eq!(r["context"]["idempotency_key"], "o-1:payment:execute");
    assert_eq!(r["context"]["attempt"], 1);
    assert!(r["world"].as_str().unwrap().starts_with("sagahost:plugin@"), "{r:#}");
    assert!(r["digest"].as_str().unwrap().starts_with("sha256:"), "{r:#}");
    assert!(!r["logs"].as_array().unwrap().is_empty(), "{r:#}");
    assert!(r["wall_ms"].as_f64().unwrap() > 0.0, "{r:#}");
    assert!(r["phases_ms"]["run"].as_f64().unwrap() > 0.0, "{r:#}");
    let cpu = r["cpu_ms"].as_f64().unwrap();
    assert!(cpu > 0.0 && cpu <= r["wall_ms"].as_f64().unwrap() + 1.0, "{r:#}");
    assert_eq!(r["memory_limit_bytes"], 64 << 20);
    assert!(r["load_ms"].as_f64().unwrap() > 0.0, "{r:#}");
    let peak = r["peak_memory_bytes"].as_u64().unwrap();
    assert!(peak > 0 && peak <= 64 << 20, "peak memory {peak}");
    assert_eq!(r["outbound"], json!([]));
}

#[tokio::test]
async fn a_declined_card_is_rejected_with_exit_1_and_writes_nothing() {
    let run = sagahost(&["plugin", "run", &wasm("payment"), "--input", &payment_input("tok_decline"), "--json"])
        .await
        .exits(1);
    let r = run.json();
    assert_eq!(r["outcome"], "rejected");
    assert_eq!(r["error"], "card declined");
    assert_eq!(r["output"], Value::Null);
    assert_eq!(r["state_writes"], json!([]));
}

#[tokio::test]
async fn seeded_state_is_what_the_plugin_reads_and_compensate_refunds_it() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    std::fs::write(
        &state,
        json!({"charge/o-7": {"amount_cents": 900, "currency": "USD", "status": "charged"}}).to_string(),
    )
    .unwrap();
    let state = state.to_string_lossy().into_owned();
    let payment = wasm("payment");
    let input = payment_input("tok_visa");
    // Execute finds the charge already made: the same output, nothing written.
    let r = sagahost(&["plugin", "run", &payment, "--input", &input, "--saga-id", "o-7", "--state", &state, "--json"])
        .await
        .exits(0)
        .json();
    assert_eq!(r["output"]["amount_cents"], 900, "{r:#}");
    assert_eq!(r["state_writes"], json!([]));
    // Compensate refunds it, given execute's output.
    let output = json!({"charge_id": "ch_o-7", "amount_cents": 900, "currency": "USD"}).to_string();
    let r = sagahost(&[
        "plugin",
        "run",
        &payment,
        "--input",
        &input,
        "--saga-id",
        "o-7",
        "--state",
        &state,
        "--call",
        "compensate",
        "--output",
        &output,
        "--json",
    ])
    .await
    .exits(0)
    .json();
    assert_eq!(r["call"], "compensate");
    assert_eq!(r["outcome"], "done");
    assert_eq!(r["output"], json!({"refunded_cents": 900}));
    assert_eq!(r["context"]["idempotency_key"], "o-7:step:compensate");
    assert_eq!(r["state_writes"][0]["key"], "charge/o-7");
    assert_eq!(r["state_writes"][0]["value"]["status"], "refunded");
    // Without the state, there is nothing to refund.
    let r = sagahost(&[
        "plugin",
        "run",
        &payment,
        "--input",
        &input,
        "--saga-id",
        "o-7",
        "--call",
        "compensate",
        "--output",
        &output,
        "--json",
    ])
    .await
    .exits(0)
    .json();
    assert_eq!(r["output"], json!({"refunded_cents": 0}));
    // The input may come from a file.
    let input_file = dir.path().join("input.json");
    std::fs::write(&input_file, &input).unwrap();
    let at = format!("@{}", input_file.to_string_lossy());
    let r = sagahost(&["plugin", "run", &payment, "--input", &at, "--saga-id", "o-7", "--state", &state, "--json"])
        .await
        .exits(0)
        .json();
    assert_eq!(r["output"]["amount_cents"], 900, "{r:#}");
    // String values are stored raw: the fixture reads back exactly what was seeded.
    std::fs::write(dir.path().join("s.json"), r#"{"misbehave/s-1": "hello"}"#).unwrap();
    let seeded = dir.path().join("s.json").to_string_lossy().into_owned();
    let r = sagahost(&[
        "plugin",
        "run",
        &wasm("misbehave"),
        "--input",
        &misbehave_input("read-state", Value::Null),
        "--saga-id",
        "s-1",
        "--state",
        &seeded,
        "--json",
    ])
    .await
    .exits(0)
    .json();
    assert_eq!(r["outcome"], "done", "{r:#}");
}

#[tokio::test]
async fn traps_and_limits_end_with_exit_1_and_say_why() {
    let misbehave = wasm("misbehave");
    let r = sagahost(&["plugin", "run", &misbehave, "--input", &misbehave_input("panic", Value::Null), "--json"])
        .await
        .exits(1)
        .json();
    assert_eq!(r["outcome"], "trap");
    assert!(r["error"].as_str().unwrap().contains("panic"), "{r:#}");
    let r = sagahost(&[
        "plugin",
        "run",
        &misbehave,
        "--input",
        &misbehave_input("oom", Value::Null),
        "--plugin-memory-mib",
        "8",
        "--json",
    ])
    .await
    .exits(1)
    .json();
    assert_eq!(r["outcome"], "trap");
    assert!(r["error"].as_str().unwrap().contains("memory"), "{r:#}");
    assert!(r["peak_memory_bytes"].as_u64().unwrap() <= 8 << 20, "{r:#}");
    let r = sagahost(&["plugin", "run", &misbehave, "--input", &misbehave_input("huge-output", Value::Null), "--json"])
        .await
        .exits(1)
        .json();
    assert_eq!(r["outcome"], "trap");
    assert!(r["error"].as_str().unwrap().contains("output"), "{r:#}");
    let r = sagahost(&[
        "plugin",
        "run",
        &misbehave,
        "--input",
        &misbehave_input("loop", Value::Null),
        "--timeout-ms",
        "200",
        "--json",
    ])
    .await
    .exits(1)
    .json();
    assert!(r["error"].as_str().unwrap().contains("timed out"), "{r:#}");
    let r = sagahost(&["plugin", "run", &misbehave, "--input", &misbehave_input("log-flood", Value::Null), "--json"])
        .await
        .exits(0)
        .json();
    assert_eq!(r["logs"].as_array().unwrap().len(), 100, "the default per-call limit");
    assert!(r["logs_dropped"].as_u64().unwrap() > 0, "{r:#}");
}

#[tokio::test]
async fn outbound_requests_are_listed_with_their_status_or_why_they_were_denied() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().route("/hello", axum::routing::get(|| async { "hi" }));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let origin = format!("http://127.0.0.1:{port}");
    let url = format!("{origin}/hello");
    let input = misbehave_input("http-get-2", json!({"url": url}));
    let misbehave = wasm("misbehave");
    let r = sagahost(&["plugin", "run", &misbehave, "--input", &input, "--allow-host", &origin, "--json"])
        .await
        .exits(0)
        .json();
    assert_eq!(r["outcome"], "done", "{r:#}");
    assert_eq!(
        r["outbound"],
        json!([{"method": "GET", "url": url, "status": 200, "error": null},
               {"method": "GET", "url": url, "status": 200, "error": null}])
    );
    assert_eq!(r["reached_out"], true);
    assert_eq!(r["allowed_hosts"], json!([origin]));
    // Not granted: denied inside the plugin, and listed as such.
    let run = sagahost(&["plugin", "run", &misbehave, "--input", &input]).await.exits(1);
    assert!(run.stdout.contains(&format!("GET {url} -> HttpRequestDenied")), "{run:#?}");
    server.abort();
}

#[tokio::test]
async fn a_credential_is_read_from_the_secrets_directory_and_shown_only_as_its_template() {
    // A service that answers 200 only to its key, 401 otherwise.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().route(
        "/hello",
        axum::routing::get(|headers: axum::http::HeaderMap| async move {
            match headers.get("authorization").map(|v| v.as_bytes()) {
                Some(b"Bearer sk_local_1") => axum::http::StatusCode::OK,
                _ => axum::http::StatusCode::UNAUTHORIZED,
            }
        }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let origin = format!("http://127.0.0.1:{port}");
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("local-key"), "sk_local_1\n").unwrap();
    let dir = secrets.path().to_str().unwrap();
    let credential = format!("{origin} Authorization: Bearer ${{local-key}}");
    let input = misbehave_input("http-auth", json!({"url": format!("{origin}/hello")}));
    let misbehave = wasm("misbehave");
    let base = ["plugin", "run", &misbehave, "--input", &input, "--allow-host", &origin];
    let with = ["--credential", &credential, "--outbound-secrets-dir", dir, "--json"];
    let run = sagahost(&[&base[..], &with].concat()).await.exits(0);
    assert!(!run.stdout.contains("sk_local"), "{run:#?}");
    let r = run.json();
    assert_eq!(r["output"], json!({"status": 200}), "{r:#}");
    assert_eq!(
        r["credentials"],
        json!([{"origin": origin, "header": "authorization", "value": "Bearer ${local-key}"}])
    );
    // Without it the plugin's own header goes out, and the service refuses it.
    let r = sagahost(&[&base[..], &["--json"]].concat()).await.exits(0).json();
    assert_eq!(r["output"], json!({"status": 401}), "{r:#}");

    // A secret that cannot be read, a credential for an origin not allowed, or one naming no
    // secret: usage errors before any call.
    let missing = format!("{origin} Authorization: Bearer ${{other-key}}");
    let run =
        sagahost(&[&base[..], &["--credential", &missing, "--outbound-secrets-dir", dir]].concat()).await.exits(2);
    assert!(run.stderr.contains("--credential") && run.stderr.contains("no secret named"), "{run:#?}");
    let run = sagahost(&[&base[..], &["--credential", &credential]].concat()).await.exits(2);
    assert!(run.stderr.contains("no secrets directory"), "{run:#?}");
    let elsewhere = "http://127.0.0.1:1 Authorization: Bearer ${local-key}";
    let run =
        sagahost(&[&base[..], &["--credential", elsewhere, "--outbound-secrets-dir", dir]].concat()).await.exits(2);
    assert!(run.stderr.contains("not among allowed_hosts"), "{run:#?}");
    let run = sagahost(&[&base[..], &["--credential", &origin]].concat()).await.exits(2);
    assert!(run.stderr.contains("ORIGIN HEADER: VALUE"), "{run:#?}");
    let run = sagahost(&[&base[..], &["--outbound-secrets-dir", "/nonexistent/secrets"]].concat()).await.exits(2);
    assert!(run.stderr.contains("/nonexistent/secrets"), "{run:#?}");
    server.abort();
}

#[tokio::test]
async fn check_accepts_what_an_upload_accepts_and_refuses_with_the_reason() {
    let r = sagahost(&["plugin", "check", &wasm("payment"), "--json"]).await.exits(0).json();
    assert_eq!(r["valid"], true);
    assert!(r["digest"].as_str().unwrap().starts_with("sha256:"));
    let r = sagahost(&["plugin", "check", &wasm("legacy-v0-1"), "--json"]).await.exits(0).json();
    assert_eq!(r["world"], "sagahost:plugin@0.1.0");
    let text = sagahost(&["plugin", "check", &wasm("http-payment")]).await.exits(0);
    assert!(text.stdout.starts_with("ok: "), "{text:#?}");
    assert!(text.stdout.contains("needs grants"), "{text:#?}");
    let run = sagahost(&["plugin", "check", &wasm("unknown-import")]).await.exits(9);
    assert!(run.stderr.contains("does not meet the sagahost:plugin/step world"), "{run:#?}");
    assert!(run.stderr.contains("which the host does not grant"), "{run:#?}");
    // The same refusal stops a run before any call.
    let run = sagahost(&["plugin", "run", &wasm("unknown-import"), "--input", "{}"]).await.exits(9);
    assert!(run.stderr.contains("which the host does not grant"), "{run:#?}");
    let dir = tempfile::tempdir().unwrap();
    let not_wasm = dir.path().join("plugin.wasm");
    std::fs::write(&not_wasm, b"definitely not wasm").unwrap();
    let run = sagahost(&["plugin", "check", &not_wasm.to_string_lossy()]).await.exits(9);
    assert!(run.stderr.contains("not a WebAssembly component"), "{run:#?}");
    let missing = dir.path().join("missing.wasm");
    let run = sagahost(&["plugin", "check", &missing.to_string_lossy()]).await.exits(2);
    assert!(run.stderr.contains("cannot read"), "{run:#?}");
}

#[tokio::test]
async fn usage_errors_exit_2() {
    let payment = wasm("payment");
    let run = sagahost(&["plugin", "run", &payment, "--input", "{not json"]).await.exits(2);
    assert!(run.stderr.contains("--input is not JSON"), "{run:#?}");
    // Compensate needs execute's output.
    sagahost(&["plugin", "run", &payment, "--input", "{}", "--call", "compensate"]).await.exits(2);
    let run =
        sagahost(&["plugin", "run", &payment, "--input", "{}", "--state", "/nonexistent/state.json"]).await.exits(2);
    assert!(run.stderr.contains("cannot read the state file"), "{run:#?}");
    let run = sagahost(&["plugin", "run", &payment, "--input", "{}", "--allow-host", "not an origin"]).await.exits(2);
    assert!(run.stderr.contains("--allow-host"), "{run:#?}");
    // A CA file that is missing, or holds no certificate (a key), stops the command saying so.
    let args = ["plugin", "run", &payment, "--input", "{}", "--outbound-ca-file"];
    let run = sagahost(&[&args[..], &["/nonexistent/ca.pem"]].concat()).await.exits(2);
    assert!(run.stderr.contains("cannot read /nonexistent/ca.pem"), "{run:#?}");
    let key = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/tls/localhost.key");
    let run = sagahost(&[&args[..], &[key]].concat()).await.exits(2);
    assert!(run.stderr.contains("no certificate"), "{run:#?}");
    // A client certificate without its key, or with another's; a proxy that is no http URL.
    let cert = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/tls/client.pem");
    let base = ["plugin", "run", &payment, "--input", "{}"];
    let run = sagahost(&[&base[..], &["--outbound-client-cert", cert]].concat()).await.exits(2);
    assert!(run.stderr.contains("--outbound-client-key"), "{run:#?}");
    let mismatched = ["--outbound-client-cert", cert, "--outbound-client-key", key];
    let run = sagahost(&[&base[..], &mismatched].concat()).await.exits(2);
    assert!(run.stderr.contains("cannot be used together"), "{run:#?}");
    let run = sagahost(&[&base[..], &["--outbound-proxy", "socks5://proxy:1080"]].concat()).await.exits(2);
    assert!(run.stderr.contains("plain http"), "{run:#?}");
}
