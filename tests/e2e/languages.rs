//! Steps in every language a team may write them in: the demo payment step written in Rust
//! (`plugins/payment`), JavaScript (`plugins/js/payment`, componentize-js) and Python
//! (`plugins/python/payment`, componentize-py), each uploaded over HTTP as its own plugin,
//! bound to the `order` saga's payment step, and held to the same checks: one charge of the
//! order total, a declined card, a flaky gateway retried to success, a 3-D Secure wait woken
//! by its signal, and exactly one refund when a later step fails; and, under `sagahost plugin
//! run`, no second charge when the first is already in state, and the SDK's refusals of bad
//! input and corrupt state.
//!
//! The JavaScript and Python components are built by `plugins/js/build` and
//! `plugins/python/build` (scripts/test runs both). A build that could not install its
//! toolchain leaves `plugins/target/<lang>/SKIPPED` with the reason; the test then says so and
//! skips that language. A component that is simply missing fails the test.

use std::path::PathBuf;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{key, order, plugin_path, Resp, TestHost};
use crate::process::plugin_run;

const TOKEN: &str = "languages-admin-token";

/// Where each language's payment component is built.
fn component(lang: &str) -> PathBuf {
    match lang {
        "rust" => PathBuf::from(plugin_path("payment")),
        _ => PathBuf::from(format!("{}/../plugins/target/{lang}/payment.wasm", env!("CARGO_MANIFEST_DIR"))),
    }
}

/// The component's bytes, or `None` (with the reason printed) when its toolchain could not
/// be installed on this machine.
fn built(lang: &str) -> Option<Vec<u8>> {
    let path = component(lang);
    match std::fs::read(&path) {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            let skipped = path.with_file_name("SKIPPED");
            if let Ok(reason) = std::fs::read_to_string(&skipped) {
                eprintln!("SKIPPED: the {lang} payment step was not built: {}", reason.trim());
                return None;
            }
            panic!("{} is missing ({e}); build it with plugins/{lang}/build (scripts/test does)", path.display())
        }
    }
}

async fn admin(host: &TestHost, req: reqwest::RequestBuilder) -> Resp {
    host.send(req.bearer_auth(TOKEN).header("X-Actor", "team-payments")).await
}

/// Uploads `bytes` as plugin `name` and binds it as the `order` saga's payment step (execute
/// and compensate); returns its digest.
async fn upload_and_bind(host: &TestHost, name: &str, bytes: Vec<u8>) -> String {
    // Compressed, as `sagahost plugins upload` sends a component over 1 MiB: a Python
    // component is over the 16 MiB body limit as it is.
    let packed = zstd::bulk::compress(&bytes, 0).unwrap();
    let up = admin(
        host,
        host.client
            .post(host.url(&format!("/admin/plugins/{name}")))
            .header("content-type", "application/wasm")
            .header("content-encoding", "zstd")
            .body(packed),
    )
    .await;
    // 200 for the Rust step: the host embeds those very bytes as its `payment` plugin.
    assert!(matches!(up.status, StatusCode::CREATED | StatusCode::OK), "{}", String::from_utf8_lossy(&up.bytes));
    let digest = up.json()["digest"].as_str().unwrap().to_owned();
    let bound = admin(
        host,
        host.client
            .put(host.url("/admin/sagas/order/steps/payment"))
            .json(&json!({"execute": digest, "compensate": digest})),
    )
    .await;
    assert_eq!(bound.status, StatusCode::OK, "{}", String::from_utf8_lossy(&bound.bytes));
    digest
}

/// The total of `harness::order`: 2 x 1250 + 1 x 500 cents.
const TOTAL: u64 = 3000;

/// Charge once: an execute that finds its order's charge in state (a rerun after a crash, say)
/// writes nothing and answers as the first did, under `sagahost plugin run` with that state.
async fn a_charge_already_made_is_not_made_again(lang: &str) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let charged = json!({"amount_cents": TOTAL, "currency": "USD", "status": "charged"});
    std::fs::write(&state, json!({"charge/o-1": charged}).to_string()).unwrap();
    let input = json!({"input": order("tok_visa", "SKU-1", "US"), "steps": {}, "config": {}}).to_string();
    let (component, state) = (component(lang), state.to_str().unwrap());
    let args = [component.to_str().unwrap(), "--input", &input, "--state", state, "--saga-id", "o-1", "--json"];
    let run = plugin_run(&args).await.exits(0);
    let r = run.json();
    assert_eq!(r["output"], json!({"charge_id": "ch_o-1", "amount_cents": TOTAL, "currency": "USD"}), "{lang}: {r:#}");
    assert_eq!(r["state_writes"], json!([]), "{lang}: a second charge: {r:#}");
}

/// The Rust SDK's error handling, which the JavaScript and Python steps rebuild by hand: input
/// that is not an order is rejected (`invalid input: ...`, retrying cannot fix it), a total past
/// `u64` is rejected, and a charge record in state that is not one fails retryably; each writes
/// nothing. Run for the Rust step too, so the expectations are the reference's own.
async fn bad_input_and_corrupt_state_fail_as_the_rust_step_fails(lang: &str) {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("state.json");
    std::fs::write(&corrupt, json!({"charge/o-1": "garbage"}).to_string()).unwrap();
    let mut huge = order("tok_visa", "SKU-1", "US");
    huge["items"] = json!([{"sku": "SKU-1", "quantity": 2, "unit_price_cents": u64::MAX}]);
    let call = |input: Value| json!({"input": input, "steps": {}, "config": {}}).to_string();
    let cases = [
        (call(json!({"items": "x"})), None, "rejected", "invalid input: "),
        (call(huge), None, "rejected", "order total overflows"),
        (
            call(order("tok_visa", "SKU-1", "US")),
            Some(corrupt.to_str().unwrap()),
            "retryable",
            "state charge/o-1 holds unexpected data",
        ),
    ];
    let component = component(lang);
    for (input, state, outcome, error) in cases {
        let mut args = vec![component.to_str().unwrap(), "--input", &input, "--saga-id", "o-1", "--json"];
        if let Some(state) = state {
            args.extend(["--state", state]);
        }
        let r = plugin_run(&args).await.json();
        assert_eq!(r["outcome"], outcome, "{lang}: {r:#}");
        assert!(r["error"].as_str().is_some_and(|e| e.starts_with(error)), "{lang}: expected {error:?}: {r:#}");
        assert!(r["state_writes"].as_array().is_none_or(Vec::is_empty), "{lang}: wrote state: {r:#}");
    }
}

async fn the_payment_step_passes_the_demo_checks(lang: &str) {
    let Some(bytes) = built(lang) else { return };
    a_charge_already_made_is_not_made_again(lang).await;
    bad_input_and_corrupt_state_fail_as_the_rust_step_fails(lang).await;
    let host = TestHost::start_with(|c| c.admin_token = Some(TOKEN.into())).await;
    // A version belongs to one plugin name: the Rust step is the demo `payment` plugin itself.
    let plugin = if lang == "rust" { "payment".to_owned() } else { format!("payment-{lang}") };
    let digest = upload_and_bind(&host, &plugin, bytes).await;
    let charge = |id: &str| format!("charge/{id}");

    // One charge of the order total, recorded in the plugin's own state.
    let o = host.run_order(&order("tok_visa", "SKU-1", "US")).await;
    let id = o["id"].as_str().unwrap();
    assert_eq!(o["status"], "COMPLETED", "{lang}: {o:#}");
    let payment = &o["steps"][1];
    assert_eq!(payment["execute_digest"], json!(digest), "{lang}: the uploaded step ran");
    assert_eq!(payment["attempts"], 1);
    assert_eq!(payment["output"], json!({"charge_id": format!("ch_{id}"), "amount_cents": TOTAL, "currency": "USD"}));
    assert_eq!(
        host.state(&plugin, &charge(id)).await,
        Some(json!({"amount_cents": TOTAL, "currency": "USD", "status": "charged"})),
        "{lang}"
    );
    if lang != "rust" {
        assert_eq!(host.state("payment", &charge(id)).await, None, "{lang}: the Rust demo plugin did not run");
    }

    // A declined card: the saga is cancelled with the step's reason, nothing is charged, and
    // the inventory reserved before it is released.
    let o = host.run_order(&order("tok_decline", "SKU-1", "US")).await;
    let id = o["id"].as_str().unwrap();
    assert_eq!(o["status"], "CANCELLED", "{lang}: {o:#}");
    assert_eq!(o["reason"], "payment: card declined", "{lang}");
    assert_eq!(host.state(&plugin, &charge(id)).await, None, "{lang}");
    assert_eq!(host.state("inventory", &format!("reservation/{id}")).await.unwrap()["status"], "released");

    // A flaky gateway: two retryable failures, then one charge on the third attempt.
    let o = host.run_order(&order("tok_flaky", "SKU-1", "US")).await;
    let id = o["id"].as_str().unwrap();
    assert_eq!(o["status"], "COMPLETED", "{lang}: {o:#}");
    assert_eq!(o["steps"][1]["attempts"], 3, "{lang}");
    assert_eq!(host.state(&plugin, &charge(id)).await.unwrap()["amount_cents"], json!(TOTAL));

    // 3-D Secure: the step waits for its signal without charging, and charges once woken.
    let created = host.post_order(&key(), &order("tok_3ds", "SKU-1", "US")).await;
    assert_eq!(created.status, StatusCode::CREATED);
    let id = created.json()["id"].as_str().unwrap().to_owned();
    let waiting = host.wait_for(&id, |o| o["steps"][1]["status"] == "waiting").await;
    assert_eq!(waiting["steps"][1]["waiting_for"], "payment-confirmed", "{lang}: {waiting:#}");
    assert_eq!(host.state(&plugin, &charge(&id)).await, None, "{lang}: nothing charged while waiting");
    let signal = host
        .send(
            host.client
                .post(host.url(&format!("/orders/{id}/signals/payment-confirmed")))
                .json(&json!({"confirmed": true})),
        )
        .await;
    assert!(signal.status.is_success(), "{lang}: {}", String::from_utf8_lossy(&signal.bytes));
    let o = host.wait_settled(&id).await;
    assert_eq!(o["status"], "COMPLETED", "{lang}: {o:#}");
    assert_eq!(host.state(&plugin, &charge(&id)).await.unwrap()["status"], "charged");

    // A later step fails: exactly one refund of the whole charge.
    let o = host.run_order(&order("tok_visa", "SKU-1", "XX")).await;
    let id = o["id"].as_str().unwrap();
    assert_eq!(o["status"], "CANCELLED", "{lang}: {o:#}");
    assert_eq!(o["steps"][1]["compensate_digest"], json!(digest));
    assert_eq!(o["steps"][1]["compensate_output"], json!({"refunded_cents": TOTAL}), "{lang}");
    assert_eq!(
        host.state(&plugin, &charge(id)).await,
        Some(json!({"amount_cents": TOTAL, "currency": "USD", "status": "refunded"})),
        "{lang}"
    );
    assert_eq!(host.compensations(id, "payment").await, 1, "{lang}: exactly one refund");
    host.stop().await;
}

#[tokio::test]
async fn the_rust_payment_step_passes_the_demo_checks() {
    the_payment_step_passes_the_demo_checks("rust").await;
}

#[tokio::test]
async fn the_javascript_payment_step_passes_the_demo_checks() {
    the_payment_step_passes_the_demo_checks("js").await;
}

#[tokio::test]
async fn the_python_payment_step_passes_the_demo_checks() {
    the_payment_step_passes_the_demo_checks("python").await;
}
