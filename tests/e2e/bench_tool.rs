//! `sagahost bench`, the load generator, run as users run it: the real binary against a real
//! `sagahost serve` process, its JSON report parsed and checked against what the server
//! itself counted. Nothing here asserts a speed; the figures only have to add up.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use sagahost::bench::mix::{Mix, Trigger};
use serde_json::Value;

use crate::harness::on_postgres;
use crate::process::{binary, refusing_addr, HostProcess};

/// Runs `sagahost bench ARGS` to its end (at most two minutes).
async fn bench(args: &[&str]) -> Output {
    let run = tokio::process::Command::new(binary())
        .arg("bench")
        .args(args)
        .env_remove("SAGAHOST_URL")
        .env_remove("SAGAHOST_API_TOKEN")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(120), run).await.expect("sagahost bench ends within 2 minutes").unwrap()
}

fn report(path: &Path, out: &Output) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "no report at {} ({e}); exit {}, stdout:\n{}\nstderr:\n{}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn num(v: &Value, what: &str) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

/// The checks every measured run must pass: the outcomes add up, no failure of any kind,
/// percentiles ordered and positive.
fn check_run(run: &Value, sent: u64) {
    let count = |k: &str| run[k].as_u64().unwrap_or_else(|| panic!("{k} missing in {run:#}"));
    assert_eq!(count("sent"), sent, "{run:#}");
    assert_eq!(count("completed") + count("compensated"), sent, "every saga ended as its trigger says: {run:#}");
    assert_eq!(count("ok"), sent);
    for k in ["failed", "mismatched", "unsettled", "transport_errors", "dropped", "abandoned"] {
        assert_eq!(count(k), 0, "{k}: {run:#}");
    }
    assert_eq!(run["http_errors"], serde_json::json!({}), "{run:#}");
    assert_eq!(run["error_samples"], serde_json::json!([]));
    let l = &run["latency_ms"];
    assert_eq!(l["count"].as_u64(), Some(sent));
    let (p50, p90, p99, p999, max) = (
        num(&l["p50"], "p50"),
        num(&l["p90"], "p90"),
        num(&l["p99"], "p99"),
        num(&l["p99_9"], "p99.9"),
        num(&l["max"], "max"),
    );
    assert!(p50 > 0.0 && p50 <= p90 && p90 <= p99 && p99 <= p999 && p999 <= max, "percentiles out of order: {l}");
    assert!(num(&l["min"], "min") <= p50 && num(&l["mean"], "mean") <= max, "{l}");
    assert!(num(&run["throughput_per_s"], "throughput") > 0.0);
    // Per trigger: what was sent is what the seeded draw says, and each ended as expected.
    let mut by_trigger = 0;
    for (name, t) in run["by_trigger"].as_object().unwrap() {
        assert_eq!(t["sent"], t["as_expected"], "{name}: {t}");
        by_trigger += t["sent"].as_u64().unwrap();
    }
    assert_eq!(by_trigger, sent);
}

/// How many of sagas `from..to` the default mix sends as `trigger` under `seed`.
fn drawn(seed: u64, from: u64, to: u64, trigger: Trigger) -> u64 {
    let mix = Mix::default();
    (from..to).filter(|n| mix.pick(seed, *n) == trigger).count() as u64
}

/// Waits until the server's own count of sagas (`sagahost_sagas`, all statuses; a gauge the
/// host caches for 2 s) reaches `expected`, and checks it goes no further.
async fn server_counts(host: &HostProcess, expected: f64) {
    let start = Instant::now();
    loop {
        let n = host.metric("sagahost_sagas").await;
        if n == expected {
            return;
        }
        assert!(n < expected, "the server holds {n} sagas, more than the {expected} the tool sent");
        assert!(start.elapsed() < Duration::from_secs(15), "the server holds {n} sagas, expected {expected}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn a_closed_loop_run_reports_every_saga_as_the_server_settled_it() {
    let dir = tempfile::tempdir().unwrap();
    let host = HostProcess::spawn(dir.path(), None, &[]).await;
    let json = dir.path().join("closed.json");
    let pid = host.pid().to_string();
    let out = bench(&[
        "--url",
        &host.base,
        "--clients",
        "4",
        "--sagas",
        "60",
        "--warmup",
        "4",
        "--seed",
        "7",
        "--pid",
        &pid,
        "--label",
        "e2e closed",
        "--json",
        json.to_str().unwrap(),
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exit {}: {stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    let doc = report(&json, &out);
    assert_eq!(doc["tool"], "sagahost bench");
    assert_eq!(doc["sagahost_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(doc["label"], "e2e closed");
    assert_eq!(doc["interrupted"], false);
    let p = &doc["parameters"];
    assert_eq!(
        (p["mode"].as_str(), p["path"].as_str(), p["clients"].as_u64()),
        (Some("closed"), Some("/orders"), Some(4))
    );
    assert_eq!(p["mix"], "complete=90,compensate=10");
    assert_eq!(doc["warmup"], serde_json::json!({"sagas": 4, "ok": 4, "failed": 0}));
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    check_run(run, 60);
    // Sagas 0-3 were the warm-up; the measured ones are 4..64 of the seeded draw.
    let compensate = drawn(7, 4, 64, Trigger::Compensate);
    assert!(compensate > 0, "seed 7 draws some compensations among 60");
    assert_eq!(run["compensated"].as_u64(), Some(compensate), "{run:#}");
    assert_eq!(run["by_trigger"]["compensate"]["sent"].as_u64(), Some(compensate));
    assert_eq!(run["by_trigger"]["compensate"]["expected_status"], "CANCELLED");
    assert_eq!(run["completed"].as_u64(), Some(60 - compensate));
    // The server's figures and CPU time were read.
    let server = &run["server"];
    for k in ["plugin_call_mean_us", "host_per_transition_mean_us", "transitions_per_saga", "events_published_per_s"] {
        assert!(num(&server[k], k) > 0.0, "{k}: {server:#}");
    }
    assert!(num(&run["server_cpu_ms_per_saga"], "server CPU") > 0.0, "{run:#}");
    // The host's threads switched; on SQLite the group-commit writer thread was among them.
    let switches = num(&run["server_context_switches_per_saga"], "context switches");
    let by_thread = run["server_context_switches_by_thread"].as_object().expect("switches by thread");
    if !on_postgres() {
        assert!(num(&by_thread["sagahost-writer"], "writer switches") > 0.0, "{run:#}");
    }
    let summed: f64 = by_thread.values().map(|n| num(n, "switches")).sum();
    assert!(switches > 0.0 && (summed - switches).abs() < 1e-6, "{run:#}");
    assert!(num(&run["generator_cpu_s"], "generator CPU") >= 0.0);
    // The human summary names the figures.
    for text in [
        "closed loop, 4 clients: 60 sagas sent",
        "latency ms  p50",
        "throughput",
        "plugin call mean µs",
        "context switches",
    ] {
        assert!(stdout.contains(text), "no {text:?} in:\n{stdout}");
    }
    // The server holds exactly the sagas the tool says it sent: 4 warm-up + 60.
    server_counts(&host, 64.0).await;
    host.kill().await;
}

#[tokio::test]
async fn an_open_loop_keeps_its_schedule_and_a_sweep_draws_its_chart() {
    let dir = tempfile::tempdir().unwrap();
    let host = HostProcess::spawn(dir.path(), None, &[]).await;
    let json = dir.path().join("open.json");
    let out = bench(&[
        "--url",
        &host.base,
        "--rate",
        "50",
        "--duration",
        "2",
        "--warmup",
        "0",
        "--json",
        json.to_str().unwrap(),
    ])
    .await;
    assert!(out.status.success(), "exit {}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    let doc = report(&json, &out);
    assert_eq!(doc["parameters"]["mode"], "open");
    assert_eq!(doc["warmup"], Value::Null);
    let run = &doc["runs"][0];
    // 50 per second for 2 seconds: sends due at 0, 20 ms, ..., 1980 ms.
    check_run(run, 100);
    assert_eq!(run["mode"], "open");
    assert_eq!(run["offered_rate"], 50.0);
    assert_eq!(run["compensated"].as_u64(), Some(drawn(1, 0, 100, Trigger::Compensate)), "{run:#}");
    assert!(run["send_lag_ms"]["max"].is_number(), "{run:#}");
    // The last send is due at 1.98 s, so the run cannot be shorter.
    assert!(num(&run["elapsed_s"], "elapsed") >= 1.98, "{run:#}");
    server_counts(&host, 100.0).await;

    // A small sweep, written as JSON and drawn.
    let (json, svg) = (dir.path().join("sweep.json"), dir.path().join("sweep.svg"));
    let out = bench(&[
        "--url",
        &host.base,
        "--sweep",
        "--rates",
        "10,20",
        "--duration",
        "1",
        "--warmup",
        "0",
        "--output",
        "json",
        "--json",
        json.to_str().unwrap(),
        "--chart",
        svg.to_str().unwrap(),
    ])
    .await;
    assert!(out.status.success(), "exit {}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    let doc = report(&json, &out);
    let printed: Value = serde_json::from_slice(&out.stdout).expect("--output json prints the report on stdout");
    assert_eq!(printed, doc);
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.iter().map(|r| r["offered_rate"].as_f64().unwrap()).collect::<Vec<_>>(), [10.0, 20.0]);
    check_run(&runs[0], 10);
    check_run(&runs[1], 20);
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(
        chart.starts_with("<svg") && chart.contains("offered load (sagas/s)"),
        "{}",
        &chart[..200.min(chart.len())]
    );

    // Without `Prefer: wait` every POST answers 201 at once and the saga is followed by polling.
    let json = dir.path().join("polled.json");
    let out = bench(&[
        "--url",
        &host.base,
        "--wait",
        "0",
        "--clients",
        "2",
        "--sagas",
        "10",
        "--warmup",
        "0",
        "--json",
        json.to_str().unwrap(),
    ])
    .await;
    assert!(out.status.success(), "exit {}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    let run = &report(&json, &out)["runs"][0];
    check_run(run, 10);
    assert_eq!(run["polled"].as_u64(), Some(10), "{run:#}");
    assert!(run["poll_requests"].as_u64().unwrap() >= 10, "{run:#}");
    host.kill().await;
}

#[tokio::test]
async fn an_unreachable_server_or_a_bad_flag_fails_with_one_clear_line() {
    let (_held, addr) = refusing_addr();
    let url = format!("http://{addr}");
    let out = bench(&["--url", &url, "--sagas", "1"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].starts_with(&format!("sagahost bench: cannot reach {url}")), "{stderr}");
    assert!(lines[0].to_lowercase().contains("connection refused"), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing measured, nothing printed: {}", String::from_utf8_lossy(&out.stdout));

    for (args, says) in [
        (&["--mix", "complete=x"][..], "whole number"),
        (&["--mix", "refund=1"][..], "unknown trigger"),
        (&["--rate", "0"][..], "above 0"),
        (&["--url", "https://example.com"][..], "https is not supported"),
        (&["--rate", "5", "--sweep"][..], "cannot be used with"),
        // Past these bounds the run overflowed the clock (a panic in every saga's task, exit 0)
        // or queued sends without end.
        (&["--rate", "1e9"][..], "at most 1000000 sagas per second"),
        (&["--timeout", "10000000000000000000"][..], "10000000000000000000"),
        (&["--duration", "1e20"][..], "at most 86400"),
    ] {
        let out = bench(args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: no {says:?} in {stderr}");
    }
}
