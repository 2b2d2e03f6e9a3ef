//! The load benchmark: drives the real binary over real HTTP and prints figures. Not a timed
//! test: it asserts nothing about speed. `./scripts/bench` runs it on a release build.

use std::time::{Duration, Instant};

use crate::harness::{good_order, key};
use crate::process::HostProcess;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Sums a metric family's `_sum` and `_count` over all its label sets.
fn sum_and_count(metrics: &str, family: &str) -> (f64, f64) {
    let total = |suffix: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(&format!("{family}{suffix}")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    (total("_sum"), total("_count"))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

async fn scrape(http: &reqwest::Client, bases: &[String]) -> Vec<String> {
    let mut out = vec![];
    for b in bases {
        out.push(http.get(format!("{b}/metrics")).send().await.unwrap().text().await.unwrap());
    }
    out
}

/// Drives the real binary: `BENCH_BACKEND` (`sqlite` or `postgres`) with `BENCH_REPLICAS`
/// processes (PostgreSQL only; clients spread round-robin over them, as a load balancer would),
/// `BENCH_CLIENTS` concurrent clients and `BENCH_SAGAS` sagas in all.
#[tokio::test]
#[ignore = "a benchmark, not a test: run with ./scripts/bench"]
async fn load() {
    let total = env_or("BENCH_SAGAS", 2000);
    let clients = env_or("BENCH_CLIENTS", 32);
    let replicas = env_or("BENCH_REPLICAS", 1).max(1);
    let backend = std::env::var("BENCH_BACKEND").unwrap_or_else(|_| "sqlite".into());
    // `order`: the demo plugins keep their effects in host state. `order-http`: the http-*
    // plugins call the demo services, three more processes on the same machine.
    let saga = std::env::var("BENCH_SAGA").unwrap_or_else(|_| "order".into());
    let path = match saga.as_str() {
        "order" => "/orders",
        "order-http" => "/sagas/order-http",
        other => panic!("BENCH_SAGA={other}: use order or order-http"),
    };
    let database = match backend.as_str() {
        "sqlite" => {
            assert_eq!(replicas, 1, "SQLite is embedded: one host process per database file");
            None
        }
        "postgres" => Some(
            sagahost::store::postgres::scratch_database(&crate::harness::postgres_admin_url(), "sagahost_bench")
                .await
                .expect("a PostgreSQL server for the benchmark"),
        ),
        other => panic!("BENCH_BACKEND={other}: use sqlite or postgres"),
    };
    let dirs: Vec<tempfile::TempDir> = (0..replicas).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut hosts = vec![];
    for dir in &dirs {
        let env = [("RUST_LOG", "error"), ("SAGAHOST_ADMIN_TOKEN", crate::services::TOKEN)];
        hosts.push(HostProcess::spawn_on(dir.path(), database.as_deref(), None, &env).await);
    }
    let bases: Vec<String> = hosts.iter().map(|h| h.base.clone()).collect();
    // The services, granted and defined through the first replica (the others share it all).
    let services = match saga.as_str() {
        "order-http" => {
            let services = crate::services::Services::start(&bases[0], &[], &[]).await;
            let api = crate::services::Api::new(&bases[0]);
            services.grant(&api).await;
            api.define("order-http", &services.definition()).await;
            Some(services)
        }
        _ => None,
    };
    let http = reqwest::Client::new();
    let body = good_order().to_string();
    // Warm up every replica: compile caches, connection pools, database pages.
    for i in 0..20 * replicas {
        let r = http
            .post(format!("{}{path}", bases[i % replicas]))
            .header("Idempotency-Key", key())
            .header("Prefer", "wait=30")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let before = scrape(&http, &bases).await;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (http, base, body, next) = (http.clone(), bases[c % replicas].clone(), body.clone(), next.clone());
            tokio::spawn(async move {
                let mut latencies = vec![];
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                    let t = Instant::now();
                    let r = http
                        .post(format!("{base}{path}"))
                        .header("Idempotency-Key", key())
                        .header("Prefer", "wait=30")
                        .body(body.clone())
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200, "a saga did not complete within 30 s");
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = vec![];
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let after = scrape(&http, &bases).await;
    // Mean of a histogram over the run, all replicas together.
    let delta = |family: &str| {
        let (mut sum, mut count) = (0.0, 0.0);
        for (b, a) in before.iter().zip(&after) {
            let (s0, c0) = sum_and_count(b, family);
            let (s1, c1) = sum_and_count(a, family);
            sum += s1 - s0;
            count += c1 - c0;
        }
        (sum / count.max(1.0)) * 1e6
    };
    println!(
        "bench: saga={saga} backend={backend} replicas={replicas} clients={clients} sagas={} elapsed_s={:.2} sagas_per_s={:.1} \
         latency_ms p50={:.1} p95={:.1} p99={:.1} plugin_call_us_mean={:.0} host_overhead_per_transition_us_mean={:.0}",
        latencies.len(),
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.95),
        percentile(&latencies, 0.99),
        delta("sagahost_plugin_call_seconds"),
        delta("sagahost_transition_overhead_seconds"),
    );
    for h in hosts {
        h.kill().await;
    }
    drop(services);
    if let Some(url) = database {
        let _ = sagahost::store::postgres::drop_database(&crate::harness::postgres_admin_url(), &url).await;
    }
}
