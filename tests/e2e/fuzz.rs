//! HTTP fuzzing from the OpenAPI document: schemathesis (PyPI) generates requests for every
//! route of `/openapi.json` (random bodies, headers, ids and sizes, valid and invalid, plus
//! stateful sequences) and runs all its checks against the real host: no 5xx and no crash,
//! every status code, content type and header documented, every response matching its schema,
//! every schema-valid request accepted and every invalid one refused. The few answers JSON
//! Schema cannot predict are named in `schemathesis.toml` at the repository root.
//!
//! schemathesis is installed by `scripts/setup --fuzz` (a virtualenv under
//! `~/.cache/sagahost-ci/schemathesis`); `SAGAHOST_SCHEMATHESIS` may name another executable.
//! The test fails, never skips, when it is missing. `SAGAHOST_FUZZ_SEED` replays a run, and
//! `SAGAHOST_FUZZ_EXAMPLES` changes the number of examples per operation (default 30).

use std::path::PathBuf;
use std::time::Duration;

use crate::harness::TestHost;

const TOKEN: &str = "fuzz-admin-token";

/// The longest the whole run may take before the test kills it and fails. 30 examples per
/// operation take about a minute on two cores. (schemathesis' own `--max-time` is a budget it
/// spends in full, not a cap, so the cap is kept here.)
const HARD_TIMEOUT: Duration = Duration::from_secs(240);

/// The schemathesis executable: `SAGAHOST_SCHEMATHESIS`, the virtualenv `scripts/setup --fuzz`
/// makes, or `schemathesis` on PATH.
fn schemathesis() -> PathBuf {
    if let Some(path) = std::env::var_os("SAGAHOST_SCHEMATHESIS") {
        return PathBuf::from(path);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    let venv = home.join(".cache/sagahost-ci/schemathesis/bin/schemathesis");
    if venv.is_file() {
        return venv;
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("schemathesis"))
        .find(|p| p.is_file());
    on_path.unwrap_or_else(|| {
        panic!(
            "the schemathesis executable is missing: run `scripts/setup --fuzz` (it installs schemathesis \
             into ~/.cache/sagahost-ci/schemathesis), or set SAGAHOST_SCHEMATHESIS to its path"
        )
    })
}

/// The last lines of schemathesis' report, from its SUMMARY banner on.
fn summary(stdout: &str) -> &str {
    stdout.rfind("= SUMMARY =").and_then(|i| stdout[..i].rfind('\n').map(|j| &stdout[j + 1..])).unwrap_or(stdout)
}

#[tokio::test]
async fn schemathesis_finds_no_failure_on_any_route() {
    let exe = schemathesis();
    let host = TestHost::start_with(|c| c.admin_token = Some(TOKEN.into())).await;
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemathesis.toml");
    // Hypothesis keeps its example database in the working directory: a scratch one.
    let scratch = tempfile::tempdir().expect("temp dir");
    let examples = std::env::var("SAGAHOST_FUZZ_EXAMPLES").unwrap_or_else(|_| "30".to_owned());
    for attempt in 1..=2 {
        let mut command = tokio::process::Command::new(&exe);
        command
            .arg("--config-file")
            .arg(&config)
            .arg("run")
            .arg(host.url("/openapi.json"))
            .args(["--checks", "all", "--max-examples", &examples, "--workers", "2"])
            .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
            .current_dir(scratch.path())
            .env("NO_COLOR", "1")
            .kill_on_drop(true);
        if let Ok(seed) = std::env::var("SAGAHOST_FUZZ_SEED") {
            command.args(["--seed", &seed]);
        }
        let started = std::time::Instant::now();
        let output = tokio::time::timeout(HARD_TIMEOUT, command.output())
            .await
            .unwrap_or_else(|_| panic!("schemathesis ran longer than {HARD_TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("could not run {}: {e}; run `scripts/setup --fuzz`", exe.display()));
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.success() {
            println!("schemathesis passed in {:.0?}:\n{}", started.elapsed(), summary(&stdout));
            break;
        }
        // Under CPython 3.11 hypothesis itself fails now and then ("AST constructor recursion
        // depth mismatch", a CPython bug, not a finding about the server): one more run.
        // `scripts/setup --fuzz` prefers a Python without it.
        let generator_bug =
            stdout.contains("AST constructor recursion depth mismatch") && !stdout.contains("\nFailures:");
        if attempt == 1 && generator_bug {
            println!(
                "schemathesis hit the CPython 3.11 AST bug (not a finding); running it again:\n{}",
                summary(&stdout)
            );
            continue;
        }
        panic!(
            "schemathesis found failures ({}; replay with SAGAHOST_FUZZ_SEED=<the Seed below>):\n{stdout}\n{stderr}",
            output.status
        );
    }
    // Whatever it sent, the host still answers.
    assert_eq!(host.get("/healthz").await.status, reqwest::StatusCode::OK);
}

/// The document states the bounds the server enforces, so clients (and the fuzzer) know them.
#[tokio::test]
async fn openapi_documents_the_bounds_the_server_enforces() {
    let host = TestHost::start().await;
    let api = host.get("/openapi.json").await.json();
    let param = |path: &str, method: &str, name: &str| -> serde_json::Value {
        api["paths"][path][method]["parameters"]
            .as_array()
            .unwrap_or_else(|| panic!("{method} {path} has no parameters"))
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{method} {path} does not document {name}"))
            .clone()
    };
    for path in ["/orders", "/sagas/{type}"] {
        let limit = param(path, "get", "limit");
        assert_eq!(limit["in"], "query");
        assert_eq!((limit["schema"]["minimum"].as_u64(), limit["schema"]["maximum"].as_u64()), (Some(1), Some(100)));
        // The server agrees: 100 is fine, 101 is not.
        assert_eq!(host.get(&format!("{}?limit=100", path.replace("{type}", "order"))).await.status, 200);
        assert_eq!(host.get(&format!("{}?limit=101", path.replace("{type}", "order"))).await.status, 400);
    }
    let events = param("/sagas/{type}/{id}/events", "get", "limit");
    assert_eq!((events["schema"]["minimum"].as_u64(), events["schema"]["maximum"].as_u64()), (Some(1), Some(1000)));
    let audit = param("/admin/audit", "get", "limit");
    assert_eq!((audit["schema"]["minimum"].as_u64(), audit["schema"]["maximum"].as_u64()), (Some(1), Some(500)));
    let key = param("/orders", "post", "Idempotency-Key");
    assert_eq!((key["in"].as_str(), key["required"].as_bool()), (Some("header"), Some(true)));
    assert_eq!((key["schema"]["minLength"].as_u64(), key["schema"]["maxLength"].as_u64()), (Some(1), Some(255)));
    let key = param("/orders/{id}/cancel", "post", "Idempotency-Key");
    assert_eq!((key["required"].as_bool(), key["schema"]["maxLength"].as_u64()), (Some(false), Some(255)));
    assert!(param("/orders/{id}", "get", "id")["schema"]["pattern"].as_str().unwrap().contains("{8}-"));
    assert_eq!(param("/sagas/{type}", "post", "type")["schema"]["pattern"], "^[a-z][a-z0-9_-]{0,63}$");

    // Responses: the layers' answers are on every route they guard.
    let responses = |path: &str, method: &str| -> Vec<String> {
        api["paths"][path][method]["responses"].as_object().unwrap().keys().cloned().collect()
    };
    for (path, method) in [("/admin/plugins", "get"), ("/admin/sagas/{id}/resolve", "post")] {
        let codes = responses(path, method);
        assert!(["401", "403", "503"].iter().all(|c| codes.iter().any(|x| x == c)), "{method} {path}: {codes:?}");
    }
    assert!(responses("/orders", "post").iter().any(|c| c == "413"));
    assert!(responses("/orders/{id}", "get").iter().any(|c| c == "401"), "client routes may be closed");
    let upload = &api["paths"]["/admin/plugins/{name}"]["post"]["requestBody"]["content"];
    assert!(upload["application/wasm"].is_object(), "{upload}");
    let metrics = api["paths"]["/metrics"]["get"]["responses"]["200"]["content"].as_object().unwrap();
    assert!(metrics.keys().any(|k| k.starts_with("application/openmetrics-text")), "{metrics:?}");

    // Bodies: order bounds, and no unknown fields where the server refuses them.
    let schemas = &api["components"]["schemas"];
    assert_eq!(schemas["OrderRequest"]["additionalProperties"], false);
    assert_eq!(schemas["OrderRequest"]["properties"]["items"]["maxItems"], 100);
    assert_eq!(schemas["OrderItem"]["properties"]["quantity"]["minimum"], 1);
    assert_eq!(schemas["ResolveNote"]["properties"]["note"]["maxLength"], 2000);
}
