//! The plugin call benchmark: [`Runtime::execute`] of the demo plugins (`inventory`,
//! `payment`, `shipment`, SPEC §7) on the example order, with state read from memory, then
//! from the embedded SQLite store, then many calls at once. Ignored by the test run; run it on
//! a release build:
//!
//! ```text
//! CARGO_TARGET_DIR=$HOME/.cache/sagahost-bench-target \
//!   cargo test --release -p sagahost --lib runtime::bench -- --ignored --nocapture
//! ```
//!
//! `BENCH_CALLS` (default 5000) sets the calls per plugin, `BENCH_CONCURRENCY` (default 64,
//! the default `--max-concurrent-sagas`) the calls in flight in the concurrent run,
//! `BENCH_READERS` (default `memory sqlite`) where state is read from, `BENCH_GAP_US` (default
//! 10000) the pause before each call of the paced runs (a host at 100 sagas/s idles that long
//! before each saga's first call: its caches and address translations go cold in between). Every
//! figure is the wall-clock time of one call as the driver records it (`CallOutcome::elapsed`,
//! the `sagahost_plugin_call_seconds` metric), split into its [`Phases`].
//!
//! `runtime::bench::languages` compares the payment step in Rust, JavaScript and Python: size,
//! compile, first call and per-call time (BENCHMARKS.md, "steps per language"); build the
//! other two first with `plugins/js/build` and `plugins/python/build`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::json;

use super::*;
use crate::engine::ExecuteOutcome;
// The store's reads, as the app wires them.
use crate::StoreReader;

/// Committed state in memory, answering at once: the runtime's own cost, no database.
#[derive(Default)]
struct MemoryReader(HashMap<(String, String), Vec<u8>>);

#[async_trait]
impl PluginReader for MemoryReader {
    async fn get(&self, plugin: &str, key: &str, _: bool) -> anyhow::Result<crate::store::StateRead> {
        Ok(crate::store::StateRead { value: self.0.get(&(plugin.to_owned(), key.to_owned())).cloned(), checked: false })
    }

    async fn scan(&self, _: &str, _: &str, _: Option<&str>, _: u32) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        Ok(Vec::new())
    }

    async fn grants(&self, _: &str) -> anyhow::Result<crate::grants::Grants> {
        Ok(Default::default())
    }
}

const PLUGINS: [&str; 3] = ["inventory", "payment", "shipment"];

/// The SPEC §5.2 example order as the driver hands it to the first step.
pub(super) fn input() -> String {
    let order = json!({
        "customer_id": "c-42",
        "items": [{"sku": "SKU-1", "quantity": 2, "unit_price_cents": 1250}, {"sku": "SKU-2", "quantity": 1, "unit_price_cents": 500}],
        "currency": "USD",
        "payment": {"token": "tok_visa"},
        "ship_to": {"name": "Ada", "line1": "1 Main St", "city": "Springfield", "postal_code": "12345", "country": "US"}
    });
    json!({"input": order, "steps": {}, "config": {}}).to_string()
}

fn info(saga: usize, step: &str) -> CallInfo {
    let saga_id = format!("0190c6a2-0000-7000-8000-{saga:012}");
    CallInfo {
        idempotency_key: format!("{saga_id}:{step}:execute"),
        saga_id,
        saga_type: "bench".into(),
        step: step.into(),
        attempt: 1,
        signal: None,
        signal_name: None,
    }
}

const TIMEOUT: Duration = Duration::from_secs(5);

fn calls() -> usize {
    std::env::var("BENCH_CALLS").ok().and_then(|v| v.parse().ok()).unwrap_or(5000)
}

fn concurrency() -> usize {
    std::env::var("BENCH_CONCURRENCY").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
}

/// The figures of a run: calls/s and the distribution of call times.
struct Figures {
    elapsed: Vec<Duration>,
    phases: Vec<Phases>,
    wall: Duration,
}

impl Figures {
    fn print(&self, what: &str) {
        let mut sorted = self.elapsed.clone();
        sorted.sort_unstable();
        let n = sorted.len();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let mean = |f: &dyn Fn(&Phases) -> Duration| self.phases.iter().map(|p| us(f(p))).sum::<f64>() / n as f64;
        let pct = |q: f64| us(sorted[((n as f64 * q) as usize).min(n - 1)]);
        println!(
            "{what:<26} {:>6.0} calls/s  mean {:>6.1}  p50 {:>6.1}  p99 {:>7.1}  max {:>8.1}  | setup {:>4.1}  instantiate {:>5.1}  run {:>6.1}  collect {:>5.1}  | cpu {:>5.1}",
            n as f64 / self.wall.as_secs_f64(),
            sorted.iter().map(|d| us(*d)).sum::<f64>() / n as f64,
            pct(0.50),
            pct(0.99),
            us(sorted[n - 1]),
            mean(&|p| p.setup),
            mean(&|p| p.instantiate),
            mean(&|p| p.run),
            mean(&|p| p.collect),
            {
                let measured: Vec<f64> = self.phases.iter().filter_map(|p| p.cpu).map(us).collect();
                measured.iter().sum::<f64>() / measured.len().max(1) as f64
            },
        );
    }
}

fn gap() -> Duration {
    Duration::from_micros(std::env::var("BENCH_GAP_US").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000))
}

/// `n` calls of `plugin`'s execute, one after the other; every one must be `done`.
async fn sequential(runtime: &Runtime, digest: &str, plugin: &str, n: usize) -> Figures {
    paced(runtime, digest, plugin, n, Duration::ZERO).await
}

/// `n` calls of `plugin`'s execute, with a pause of `gap` before each (none if zero).
async fn paced(runtime: &Runtime, digest: &str, plugin: &str, n: usize, gap: Duration) -> Figures {
    let input = input();
    let (mut elapsed, mut phases) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let started = Instant::now();
    for i in 0..n {
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
        let out = runtime.execute(digest, plugin, &info(i, plugin), &input, TIMEOUT).await;
        assert!(matches!(out.result, Ok(ExecuteOutcome::Done(_))), "{plugin}: {:?}", out.result);
        elapsed.push(out.elapsed);
        phases.push(out.phases);
    }
    Figures { elapsed, phases, wall: started.elapsed() }
}

/// `n` calls of each demo plugin with `width` calls in flight at once.
async fn concurrent(runtime: &Arc<Runtime>, digests: &[String], n: usize, width: usize) -> Figures {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..width)
        .map(|_| {
            let (runtime, digests, next) = (Arc::clone(runtime), digests.to_vec(), Arc::clone(&next));
            tokio::spawn(async move {
                let input = input();
                let mut mine = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n * PLUGINS.len() {
                        return mine;
                    }
                    let plugin = PLUGINS[i % PLUGINS.len()];
                    let out =
                        runtime.execute(&digests[i % PLUGINS.len()], plugin, &info(i, plugin), &input, TIMEOUT).await;
                    assert!(matches!(out.result, Ok(ExecuteOutcome::Done(_))), "{plugin}: {:?}", out.result);
                    mine.push((out.elapsed, out.phases));
                    // The driver commits between two calls of a saga and so lets other tasks
                    // run; without this a task would run its calls back to back until an epoch
                    // tick preempts one of them for a whole round of the other tasks.
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let wall = started.elapsed();
    Figures { elapsed: all.iter().map(|(e, _)| *e).collect(), phases: all.iter().map(|(_, p)| *p).collect(), wall }
}

/// What memory gone cold costs on this machine, for reading the paced runs: writing one byte
/// in each 64-byte cache line of a 256 KiB buffer that stays resident, back to back and then
/// with `gap` before each pass. On a machine whose caches and TLBs keep a process's entries
/// through a short idle gap the two are alike; on the 2-vCPU VM of BENCHMARKS.md the second
/// was 5-13x the first after 10 ms (and, in a C program, about 50x after 100 ms, whether or
/// not the vCPUs idled): mostly page walks, about 2 µs per 4 KiB page (session 17).
async fn cold_memory(gap: Duration, n: usize) {
    const BYTES: usize = 256 << 10;
    let mut buffer = vec![1u8; BYTES];
    let mut touch = || {
        let started = Instant::now();
        for line in buffer.chunks_mut(64) {
            line[0] = std::hint::black_box(line[0].wrapping_add(1));
        }
        started.elapsed()
    };
    let mean = |times: &[Duration]| times.iter().map(|d| d.as_secs_f64() * 1e6).sum::<f64>() / times.len() as f64;
    let hot: Vec<Duration> = (0..n).map(|_| touch()).collect();
    let mut cold = Vec::with_capacity(n);
    for _ in 0..n {
        tokio::time::sleep(gap).await;
        cold.push(touch());
    }
    println!(
        "reference: touching {} KiB of resident memory: {:.1} µs back to back, {:.1} µs {} µs apart",
        BYTES >> 10,
        mean(&hot),
        mean(&cold),
        gap.as_micros()
    );
}

async fn loaded(reader: Arc<dyn PluginReader>) -> (Arc<Runtime>, Vec<String>) {
    let runtime = Arc::new(Runtime::new(Limits::default(), reader).unwrap());
    let mut digests = Vec::new();
    for plugin in PLUGINS {
        digests.push(runtime.load(super::tests::fixture(plugin)).await.unwrap());
    }
    (runtime, digests)
}

async fn suite(label: &str, reader: Arc<dyn PluginReader>) {
    let (runtime, digests) = loaded(reader).await;
    let n = calls();
    for (plugin, digest) in PLUGINS.iter().zip(&digests) {
        sequential(&runtime, digest, plugin, n / 10).await; // warm-up
        sequential(&runtime, digest, plugin, n).await.print(&format!("{label} {plugin}"));
    }
    // The same calls with the machine idle between them: what a host at a low rate sees.
    let (gap, paced_calls) = (gap(), (n / 20).max(10));
    for (plugin, digest) in PLUGINS.iter().zip(&digests) {
        paced(&runtime, digest, plugin, paced_calls, gap)
            .await
            .print(&format!("{label} {plugin}, {} µs apart", gap.as_micros()));
    }
    cold_memory(gap, paced_calls).await;
    let width = concurrency();
    concurrent(&runtime, &digests, n / 10, width).await;
    concurrent(&runtime, &digests, n, width).await.print(&format!("{label} all, {width} at once"));
    // What the warm slots keep between calls: the pages a released slot keeps mapped.
    if let Some(pool) = runtime.engine.pooling_allocator_metrics() {
        println!(
            "{label} pool after the runs: {} warm memory slots, {} KiB resident in them",
            pool.unused_warm_memories(),
            pool.unused_memory_bytes_resident() >> 10
        );
    }
}

#[test]
#[ignore = "a benchmark: run it on a release build with --ignored --nocapture"]
fn plugin_calls() {
    // Two workers, like the 2-core machines the other figures come from; the driver runs on
    // the same multi-threaded runtime.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        println!("plugin calls: {} per plugin, Runtime::execute of the example order, times in µs", calls());
        let readers = std::env::var("BENCH_READERS").unwrap_or_else(|_| "memory sqlite".to_owned());
        if readers.contains("memory") {
            suite("memory", Arc::new(MemoryReader::default())).await;
        }
        if readers.contains("sqlite") {
            let dir = tempfile::tempdir().unwrap();
            let store = crate::store::open(None, dir.path()).await.unwrap();
            let n = calls();
            let started = Instant::now();
            for i in 0..n {
                store.state_get("inventory", &format!("reservation/{i}")).await.unwrap();
            }
            let per_read = started.elapsed() / n as u32;
            println!(
                "sqlite state_get alone (a miss, as a first execute reads): {:.1} µs mean",
                per_read.as_secs_f64() * 1e6
            );
            suite("sqlite", Arc::new(StoreReader(store))).await;
        }
    });
}

/// The payment step of SPEC §7 as each language builds it: Rust (`plugins/payment`),
/// JavaScript (`plugins/js/payment`, componentize-js) and Python (`plugins/python/payment`,
/// componentize-py). The two others are built by `plugins/js/build` and `plugins/python/build`.
fn language_components() -> [(&'static str, String); 3] {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/target");
    [
        ("rust", format!("{root}/wasm32-wasip2/release/payment.wasm")),
        ("javascript", format!("{root}/js/payment.wasm")),
        ("python", format!("{root}/python/payment.wasm")),
    ]
}

/// What a step costs in each language: the component's size, the upload's compile (what
/// `POST /admin/plugins` and every host start pay per plugin: nothing compiled is kept on
/// disk), the first call after it, and then `BENCH_CALLS / 10` calls one after the other.
/// A fresh runtime per language, so each compile is cold.
#[test]
#[ignore = "a benchmark: run it on a release build with --ignored --nocapture"]
fn languages() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let n = (calls() / 10).max(10);
        println!("the payment step per language: execute of the example order, state in memory, {n} calls");
        for (lang, path) in language_components() {
            let Ok(bytes) = std::fs::read(&path) else {
                println!("{lang:<10} not built ({path} is missing)");
                continue;
            };
            let size = bytes.len();
            let runtime = Arc::new(Runtime::new(Limits::default(), Arc::new(MemoryReader::default())).unwrap());
            let started = Instant::now();
            let digest = runtime.load(bytes).await.unwrap();
            let compile = started.elapsed();
            let first = runtime.execute(&digest, "payment", &info(0, "payment"), &input(), TIMEOUT).await;
            let upload_to_first_call = started.elapsed();
            assert!(matches!(first.result, Ok(ExecuteOutcome::Done(_))), "{lang}: {:?}", first.result);
            println!(
                "{lang:<10} size {:>6.2} MiB  compile {:>8.1} ms  first call {:>7.2} ms  upload to first call {:>8.1} ms  \
                 peak memory {:>5.1} MiB",
                size as f64 / (1 << 20) as f64,
                compile.as_secs_f64() * 1e3,
                first.elapsed.as_secs_f64() * 1e3,
                upload_to_first_call.as_secs_f64() * 1e3,
                first.peak_memory_bytes as f64 / (1 << 20) as f64,
            );
            sequential(&runtime, &digest, "payment", n).await.print(&format!("{lang} payment"));
        }
    });
}
