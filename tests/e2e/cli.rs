//! The operator CLI (`sagahost orders|plugins|sagas|audit|dead-letters`), run as operators run it: the real
//! binary as a child process against a real host, its JSON output parsed, its tables read,
//! its exit codes checked against the documented ones (docs/cli.md).

use serde_json::{json, Value};

use crate::harness::{fixture, key, order, TestHost, TEST_RELAY};
use crate::process::{refusing_addr, run_command as sagahost, Run};

const TOKEN: &str = "cli-admin-token";

/// Runs `sagahost ARGS --url <host> --admin-token <TOKEN>` (global flags go after the command).
async fn cli(host: &TestHost, args: &[&str]) -> Run {
    let mut all = args.to_vec();
    all.extend(["--url", &host.base, "--admin-token", TOKEN]);
    sagahost(&all, &[]).await
}

async fn admin_host() -> TestHost {
    TestHost::start_with(|c| c.admin_token = Some(TOKEN.into())).await
}

#[tokio::test]
async fn orders_are_listed_shown_signalled_and_cancelled_with_tables_json_and_exit_codes() {
    let host = admin_host().await;
    let done = host.run_order(&order("tok_visa", "SKU-1", "US")).await;
    let done_id = done["id"].as_str().unwrap().to_owned();
    let waiting =
        host.post_order(&key(), &order("tok_3ds", "SKU-1", "US")).await.json()["id"].as_str().unwrap().to_owned();
    host.wait_for(&waiting, |o| o["steps"][1]["waiting_for"] == "payment-confirmed").await;
    let other =
        host.post_order(&key(), &order("tok_3ds", "SKU-1", "US")).await.json()["id"].as_str().unwrap().to_owned();
    host.wait_for(&other, |o| o["steps"][1]["waiting_for"] == "payment-confirmed").await;

    // A table: a header, then one aligned row per order, newest first.
    let run = cli(&host, &["orders", "list"]).await.exits(0);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{run:#?}");
    assert!(lines[0].starts_with("ID") && lines[0].contains("STATUS") && lines[0].contains("REASON"), "{run:#?}");
    assert!(lines[1].starts_with(&other) && lines[3].starts_with(&done_id), "{run:#?}");
    let status_column = lines[0].find("STATUS").unwrap();
    assert_eq!(&lines[3][status_column..status_column + "COMPLETED".len()], "COMPLETED", "aligned: {run:#?}");
    assert!(!run.stdout.contains('\x1b'), "no colour when stdout is not a terminal");

    // JSON: the API's page, every page with --all.
    let page = cli(&host, &["orders", "list", "-o", "json", "--limit", "1", "--all"]).await.exits(0).json();
    let ids: Vec<&str> = page["data"].as_array().unwrap().iter().map(|o| o["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [other.as_str(), waiting.as_str(), done_id.as_str()]);
    assert_eq!(page["next_cursor"], Value::Null);
    let run = cli(&host, &["orders", "list", "--limit", "1"]).await.exits(0);
    assert!(run.stderr.contains("--cursor"), "a table says there is more: {run:#?}");
    let page = cli(&host, &["orders", "list", "--output", "json", "--status", "COMPLETED"]).await.exits(0).json();
    assert_eq!(page["data"].as_array().unwrap().len(), 1);

    // One order: fields and steps; JSON is the API's view.
    let run = cli(&host, &["orders", "get", &waiting]).await.exits(0);
    assert!(run.stdout.contains(&format!("id:      {waiting}")), "{run:#?}");
    assert!(run.stdout.contains("waiting for signal payment-confirmed"), "{run:#?}");
    let o = cli(&host, &["orders", "get", &done_id, "-o", "json"]).await.exits(0).json();
    assert_eq!(o, host.get(&format!("/orders/{done_id}")).await.json());

    // A signal nobody waits for is a conflict (6) with the API's message; the right one wakes it.
    let run = cli(&host, &["orders", "signal", &waiting, "other"]).await.exits(6);
    assert!(run.stderr.contains("waiting_for") && run.stderr.contains("HTTP 409 not_waiting"), "{run:#?}");
    assert_eq!(run.stdout, "");
    cli(&host, &["orders", "signal", &waiting, "payment-confirmed", "--data", r#"{"auth": "ok"}"#]).await.exits(0);
    assert_eq!(host.wait_settled(&waiting).await["status"], "COMPLETED");
    let run = cli(&host, &["orders", "signal", &waiting, "x", "--data", "{nope"]).await.exits(2);
    assert!(run.stderr.contains("--data is not JSON"), "{run:#?}");

    // Cancel: compensates; again succeeds (already cancelled); a completed order is a conflict.
    let run = cli(&host, &["orders", "cancel", &other, "-o", "json"]).await.exits(0);
    assert_eq!(run.json()["id"], other.as_str());
    assert_eq!(host.wait_settled(&other).await["status"], "CANCELLED");
    let run = cli(&host, &["orders", "cancel", &other]).await.exits(0);
    assert!(run.stdout.contains("already cancelling or cancelled"), "{run:#?}");
    let run = cli(&host, &["orders", "cancel", &done_id]).await.exits(6);
    assert!(run.stderr.contains("a completed saga is final"), "{run:#?}");

    // Not found (4), with the API's message; the same order through `sagas`.
    let run = cli(&host, &["orders", "get", "00000000-0000-0000-0000-000000000000"]).await.exits(4);
    assert!(run.stderr.contains("no order with id") && run.stderr.contains("HTTP 404"), "{run:#?}");
    let o = cli(&host, &["sagas", "get", &done_id, "--type", "order", "-o", "json"]).await.exits(0).json();
    assert_eq!(o["status"], "COMPLETED");
    cli(&host, &["sagas", "list", "--type", "order-http"]).await.exits(0);
    cli(&host, &["sagas", "get", &done_id, "--type", "order-http"]).await.exits(4);
}

#[tokio::test]
async fn a_hot_swap_through_the_cli_sticks_a_compensation_then_fixes_retries_and_resolves_it() {
    let host = admin_host().await;
    // Fast compensation retries for the payment step, set through `sagas define`.
    let mut def = cli(&host, &["sagas", "definition", "order", "-o", "json"]).await.exits(0).json();
    let original = def["steps"][1]["compensate"].as_str().unwrap().to_owned();
    let execute = def["steps"][1]["execute"].as_str().unwrap().to_owned();
    def["steps"][1]["compensate_retry"] = json!({"max_attempts": 2, "initial_backoff_ms": 10, "max_backoff_ms": 20});
    let file = host.dir.path().join("order.json");
    std::fs::write(&file, def.to_string()).unwrap();
    let run = cli(&host, &["sagas", "define", "order", file.to_str().unwrap(), "--actor", "ops@example.com"]).await;
    let run = run.exits(0);
    assert!(run.stdout.lines().next().unwrap().starts_with("TYPE"), "{run:#?}");
    assert!(run.stdout.contains("payment") && run.stdout.contains(" 5/2\n"), "{run:#?}");
    // An operator saves the definition as it now is, to edit it later.
    let saved = cli(&host, &["sagas", "definition", "order", "-o", "json"]).await.exits(0).stdout;
    let saved_file = host.dir.path().join("order-saved.json");
    std::fs::write(&saved_file, saved).unwrap();

    // The hot-swap shortcut: upload a version and bind it as the payment step's compensation
    // only. (Here a broken one: the misbehave fixture panics in compensate.)
    let wasm = host.dir.path().join("misbehave.wasm");
    std::fs::write(&wasm, fixture("misbehave")).unwrap();
    let args = ["plugins", "upload", wasm.to_str().unwrap(), "--name", "payment", "--bind", "order/payment"];
    let out = cli(&host, &[&args[..], &["--compensate-only", "-o", "json"]].concat()).await.exits(0).json();
    let broken = out["upload"]["digest"].as_str().unwrap().to_owned();
    assert!(broken.starts_with("sha256:") && broken != original);
    assert_eq!(
        out["binding"],
        json!({"saga_type": "order", "step": "payment", "execute": execute, "compensate": broken})
    );
    // The same bytes again: a no-op upload, said so in the table.
    let run = cli(&host, &args[..3].iter().chain(&["--name", "payment"]).copied().collect::<Vec<_>>()).await.exits(0);
    assert!(run.stdout.contains("uploaded") && run.stdout.contains("uploaded before"), "{run:#?}");
    let list = cli(&host, &["plugins", "list", "-o", "json"]).await.exits(0).json();
    let payment = list["data"].as_array().unwrap().iter().find(|p| p["name"] == "payment").unwrap();
    assert_eq!(payment["versions"].as_array().unwrap().len(), 2);
    let run = cli(&host, &["plugins", "list", "payment"]).await.exits(0);
    assert!(run.stdout.contains(&broken) && run.stdout.contains(&original), "{run:#?}");
    cli(&host, &["plugins", "list", "nope"]).await.exits(4);
    // The definition saved before the swap, defined (an operator's edit begun before it): it
    // carries the version it was read at, so it is refused, exit 6, and the swapped
    // compensation stays bound. (It silently undid the swap.)
    let run = cli(&host, &["sagas", "define", "order", saved_file.to_str().unwrap()]).await.exits(6);
    assert!(run.stderr.contains("was made from version") && run.stderr.contains("definition_changed"), "{run:#?}");
    let now = cli(&host, &["sagas", "definition", "order", "-o", "json"]).await.exits(0).json();
    assert_eq!(now["steps"][1]["compensate"], json!(broken));

    // Two orders whose refunds panic: both stop in COMPENSATION_FAILED.
    let mut body = order("tok_visa", "SKU-1", "XX");
    body["customer_id"] = json!("compensate-panic");
    let first = host.run_order(&body).await;
    let second = host.run_order(&body).await;
    assert_eq!((&first["status"], &second["status"]), (&json!("COMPENSATION_FAILED"), &json!("COMPENSATION_FAILED")));
    let (first, second) = (first["id"].as_str().unwrap().to_owned(), second["id"].as_str().unwrap().to_owned());
    let stuck = cli(&host, &["sagas", "list", "--status", "COMPENSATION_FAILED", "-o", "json"]).await.exits(0).json();
    assert_eq!(stuck["data"].as_array().unwrap().len(), 2);
    let run = cli(&host, &["orders", "get", &first]).await.exits(0);
    assert!(run.stdout.contains("compensation_failed") && run.stdout.contains("panicked"), "{run:#?}");

    // Fix: bind the original compensation back, then retry the first; resolve the second by hand.
    let bound = cli(&host, &["plugins", "bind", "order/payment", "--compensate", &original, "-o", "json"]).await;
    assert_eq!(bound.exits(0).json()["compensate"], original.as_str());
    let run = cli(&host, &["sagas", "retry", &first, "--note", "refund fixed", "--actor", "ops@example.com"]).await;
    assert!(run.exits(0).stdout.contains(&first));
    assert_eq!(host.wait_settled(&first).await["status"], "CANCELLED");
    assert_eq!(host.state("payment", &format!("charge/{first}")).await.unwrap()["status"], "refunded");
    let run = cli(&host, &["sagas", "retry", &first]).await.exits(6);
    assert!(run.stderr.contains("HTTP 409"), "{run:#?}");
    let resolved =
        cli(&host, &["sagas", "resolve", &second, "--note", "refunded in the PSP console", "-o", "json"]).await;
    assert_eq!(resolved.exits(0).json()["status"], "CANCELLED");
    cli(&host, &["sagas", "resolve", "00000000-0000-0000-0000-000000000000", "--note", "x"]).await.exits(4);

    // The plugin's state and the audit trail, through the CLI.
    let state =
        cli(&host, &["plugins", "state", "payment", "--prefix", &format!("charge/{first}"), "-o", "json"]).await;
    assert_eq!(state.exits(0).json()["data"][0]["value"]["status"], "refunded");
    let audit = cli(&host, &["audit", "--target", &first, "-o", "json"]).await.exits(0).json();
    assert_eq!(audit["data"][0]["action"], "saga.retry");
    assert_eq!(audit["data"][0]["actor"], "ops@example.com");
    assert_eq!(audit["data"][0]["note"], "refund fixed");
    // Page by page, one entry each, to the oldest: the same entries as one page of all.
    let whole = cli(&host, &["audit", "-o", "json"]).await.exits(0).json();
    let paged = cli(&host, &["audit", "--limit", "1", "--all", "-o", "json"]).await.exits(0).json();
    assert!(whole["data"].as_array().unwrap().len() >= 5);
    assert_eq!(paged["data"], whole["data"]);
    let first_page = cli(&host, &["audit", "--limit", "1"]).await.exits(0);
    assert!(first_page.stderr.contains("(more: --cursor "), "{first_page:#?}");
    let run = cli(&host, &["audit"]).await.exits(0);
    for action in ["saga.define", "plugin.upload", "binding.change", "saga.retry", "saga.resolve"] {
        assert!(run.stdout.contains(action), "{action} missing: {run:#?}");
    }
    let define = cli(&host, &["audit", "--target", "order", "-o", "json"]).await.exits(0).json();
    assert_eq!(define["data"][0]["actor"], "ops@example.com");
}

/// Dead letters (made as the relay makes them, from a real saga's outbox rows, under the relay
/// lease the test holds): listed in a table and as JSON, one redelivered, one discarded (each
/// retried with its idempotency key: the same answer), and either again without the key exits
/// 4 (done already).
#[tokio::test]
async fn dead_letters_are_listed_redelivered_and_discarded() {
    let (host, epoch) = TestHost::start_holding_the_relay(|c| c.admin_token = Some(TOKEN.into())).await;
    let id = host.run_order(&order("tok_visa", "SKU-1", "US")).await["id"].as_str().unwrap().to_owned();
    let rows = host.store.outbox_for_saga(&id).await.unwrap();
    for row in &rows[..2] {
        assert!(host.store.outbox_dead_letter(row.id, "Message size too large", 0, TEST_RELAY, epoch).await.unwrap());
    }
    let (first, second) = (rows[0].event_id.as_str(), rows[1].event_id.as_str());
    let table = cli(&host, &["dead-letters", "list"]).await.exits(0);
    for text in ["EVENT_ID", first, second, "OrderCreated", "Message size too large"] {
        assert!(table.stdout.contains(text), "no {text:?} in {table:#?}");
    }
    let listed = cli(&host, &["dead-letters", "list", "-o", "json"]).await.exits(0).json();
    assert_eq!(listed["data"].as_array().unwrap().len(), 2, "{listed:#}");
    assert_eq!(listed["data"][1]["event"]["event_id"], first, "the event as it would have been published");

    // Each run twice with one key: the second replays the first's answer (exit 0 again).
    for _ in 0..2 {
        let args = ["dead-letters", "redeliver", first, "--actor", "ops", "--idempotency-key", "rd-1"];
        let run = cli(&host, &args).await.exits(0);
        assert!(run.stdout.contains("back in the outbox"), "{run:#?}");
        let args = ["dead-letters", "discard", second, "-o", "json", "--idempotency-key", "dc-1"];
        assert_eq!(cli(&host, &args).await.exits(0).json(), json!({"event_id": second, "discarded": true}));
    }
    for args in [["dead-letters", "redeliver", first], ["dead-letters", "discard", second]] {
        let run = cli(&host, &args).await.exits(4);
        assert!(run.stderr.contains("redelivered or discarded already"), "{run:#?}");
    }
    cli(&host, &["dead-letters", "discard", "not-an-event"]).await.exits(1);
    let listed = cli(&host, &["dead-letters", "list", "-o", "json"]).await.exits(0).json();
    assert_eq!(listed["data"], json!([]));
    let trail = cli(&host, &["audit", "--target", first, "-o", "json"]).await.exits(0).json();
    assert_eq!(
        (&trail["data"][0]["action"], &trail["data"][0]["actor"]),
        (&json!("dead_letter.redeliver"), &json!("ops"))
    );
}

#[tokio::test]
async fn grants_refusals_and_local_usage_errors_have_their_exit_codes() {
    let host = admin_host().await;
    let run = cli(&host, &["plugins", "grants", "http-payment", "--allow", "HTTP://127.0.0.1", "-o", "json"]).await;
    assert_eq!(
        run.exits(0).json(),
        json!({"plugin": "http-payment", "allowed_hosts": ["http://127.0.0.1:80"], "credentials": []})
    );
    let run = cli(&host, &["plugins", "grants", "http-payment"]).await.exits(0);
    assert!(run.stdout.contains("http://127.0.0.1:80"), "{run:#?}");
    // A credential goes with its origin; shown as its template. This host has no secrets
    // directory, so the API refuses one (422 -> 1) saying why.
    let credential = "http://127.0.0.1 Authorization: Bearer ${pay-key}";
    let args = ["plugins", "grants", "http-payment", "--allow", "http://127.0.0.1", "--credential", credential];
    let run = cli(&host, &args).await.exits(1);
    assert!(run.stderr.contains("HTTP 422 unknown_secret") && run.stderr.contains("no secrets directory"), "{run:#?}");
    let run = cli(&host, &["plugins", "grants", "http-payment", "--credential", credential]).await.exits(2);
    assert!(run.stderr.contains("--allow"), "a credential alone is a usage error: {run:#?}");
    let run =
        cli(&host, &["plugins", "grants", "http-payment", "--allow", "http://127.0.0.1", "--credential", "x"]).await;
    let run = run.exits(2);
    assert!(run.stderr.contains("ORIGIN HEADER: VALUE"), "{run:#?}");
    let run = cli(&host, &["plugins", "grants", "http-payment", "--revoke-all", "-o", "json"]).await.exits(0);
    assert_eq!(run.json()["allowed_hosts"], json!([]));
    // The API refuses (422 -> 1) with its reason.
    let run = cli(&host, &["plugins", "grants", "http-payment", "--allow", "ftp://x"]).await.exits(1);
    assert!(run.stderr.contains("allowed_hosts") && run.stderr.contains("HTTP 422"), "{run:#?}");
    let junk = host.dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not a component").unwrap();
    let run = cli(&host, &["plugins", "upload", junk.to_str().unwrap(), "--name", "junk"]).await.exits(1);
    assert!(run.stderr.contains("HTTP 422 invalid_plugin"), "{run:#?}");
    // A failed bind after an upload says what was uploaded.
    let wasm = host.dir.path().join("misbehave.wasm");
    std::fs::write(&wasm, fixture("misbehave")).unwrap();
    let run =
        cli(&host, &["plugins", "upload", wasm.to_str().unwrap(), "--name", "spare", "--bind", "order/nope"]).await;
    let run = run.exits(4);
    assert!(run.stderr.contains("uploaded spare as sha256:") && run.stderr.contains("binding it failed"), "{run:#?}");

    // Local usage errors: 2, before any request.
    let run = cli(&host, &["plugins", "upload", "/nonexistent.wasm", "--name", "x"]).await.exits(2);
    assert!(run.stderr.contains("cannot read /nonexistent.wasm"), "{run:#?}");
    cli(&host, &["orders", "frobnicate"]).await.exits(2);
    cli(&host, &["sagas", "define", "order", "/nonexistent.json"]).await.exits(2);
    sagahost(&["orders", "list", "--url", "not a url"], &[]).await.exits(2);
}

#[tokio::test]
async fn tokens_come_from_flags_or_the_environment_and_auth_failures_exit_5() {
    let host = admin_host().await;
    let run = sagahost(&["plugins", "list", "--url", &host.base], &[]).await.exits(5);
    assert!(run.stderr.contains("Authorization: Bearer") && run.stderr.contains("HTTP 401"), "{run:#?}");
    assert!(run.stderr.contains("pass --admin-token"), "the message names the flag: {run:#?}");
    sagahost(&["audit", "--url", &host.base, "--admin-token", "wrong"], &[]).await.exits(5);
    let env = [("SAGAHOST_URL", host.base.as_str()), ("SAGAHOST_ADMIN_TOKEN", TOKEN)];
    let run = sagahost(&["plugins", "list"], &env).await.exits(0);
    assert!(run.stdout.contains("inventory"), "{run:#?}");

    // Admin routes are off on a host without an admin token: 403, also 5, with the reason.
    let open = TestHost::start().await;
    let run = sagahost(&["audit", "--url", &open.base, "--admin-token", "x"], &[]).await.exits(5);
    assert!(run.stderr.contains("admin routes are off"), "{run:#?}");

    // Client routes closed with --api-token on the host.
    let closed = TestHost::start_with(|c| c.api_tokens = vec!["client-1".into()]).await;
    sagahost(&["orders", "list", "--url", &closed.base], &[]).await.exits(5);
    sagahost(&["orders", "list", "--url", &closed.base, "--api-token", "client-1"], &[]).await.exits(0);
    sagahost(&["orders", "list", "--url", &closed.base], &[("SAGAHOST_API_TOKEN", "client-1")]).await.exits(0);
}

#[tokio::test]
async fn an_unreachable_url_exits_3_and_a_url_that_is_not_sagahost_exits_8() {
    let (_held, addr) = refusing_addr();
    let url = format!("http://{addr}");
    let run = sagahost(&["orders", "list", "--url", &url], &[]).await.exits(3);
    assert!(run.stderr.contains("cannot reach") && run.stderr.contains(&url), "{run:#?}");

    // Something else answers: an HTTP server of another kind, and a server that is not HTTP.
    let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other_url = format!("http://{}", other.local_addr().unwrap());
    let garbage = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let garbage_url = format!("http://{}", garbage.local_addr().unwrap());
    let answer = |listener: tokio::net::TcpListener, reply: &'static [u8]| async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = socket.read(&mut buf).await;
            let _ = socket.write_all(reply).await;
            let _ = socket.shutdown().await;
        }
    };
    let a = tokio::spawn(answer(
        other,
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot here!",
    ));
    let b = tokio::spawn(answer(garbage, b"SSH-2.0-OpenSSH_9.6\r\n"));
    for (url, kind) in [(&other_url, "an HTTP server"), (&garbage_url, "not HTTP")] {
        let run = sagahost(&["orders", "list", "--url", url], &[]).await;
        assert_eq!(run.code, 8, "{kind}: {run:#?}");
        assert!(run.stderr.contains("is --url the address of a sagahost"), "{kind}: {run:#?}");
    }
    a.abort();
    b.abort();
}

#[tokio::test]
async fn grants_with_credentials_show_their_templates_never_the_secrets() {
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("pay-key"), "sk_cli_hidden\n").unwrap();
    let dir = sagahost::secrets::Secrets::from_flag(secrets.path().to_str().unwrap()).unwrap();
    let host = TestHost::start_with(move |c| {
        c.admin_token = Some(TOKEN.into());
        c.limits.http.secrets = Some(dir);
    })
    .await;
    let credential = "https://pay.example.com Authorization: Bearer ${pay-key}";
    let args = ["plugins", "grants", "http-payment", "--allow", "https://pay.example.com", "--credential", credential];
    let run = cli(&host, &args).await.exits(0);
    assert!(run.stdout.contains("https://pay.example.com:443 authorization: Bearer ${pay-key}"), "{run:#?}");
    let shown = cli(&host, &["plugins", "grants", "http-payment", "-o", "json"]).await.exits(0);
    assert_eq!(
        shown.json()["credentials"],
        json!([{"origin": "https://pay.example.com:443", "header": "authorization", "value": "Bearer ${pay-key}"}])
    );
    assert!(!run.stdout.contains("sk_cli") && !shown.stdout.contains("sk_cli"), "{run:#?} {shown:#?}");
    // Another --allow without the credential replaces it away.
    let run =
        cli(&host, &["plugins", "grants", "http-payment", "--allow", "https://pay.example.com", "-o", "json"]).await;
    assert_eq!(run.exits(0).json()["credentials"], json!([]));
}
