//! The relay's throughput in isolation (issue: the outbox relay keeps up at 10,000 events/s):
//! an outbox filled with the events of thousands of sagas, drained batch by batch into the
//! JSON-lines sink and, when `BENCH_KAFKA_BROKERS` names a broker, into Kafka. Prints events/s;
//! asserts only that every event went out once, in order per saga. An ignored test, so it runs
//! only when asked (`scripts/bench` does, in release):
//!
//! ```sh
//! cargo test --release -p sagahost --lib relay::bench_tests -- --ignored --nocapture
//! ```
//!
//! Knobs: `BENCH_RELAY_SAGAS` (4,000 sagas of 5 events each), `BENCH_RELAY_BATCH` (the relay's
//! default batch), `BENCH_KAFKA_BROKERS` and `BENCH_KAFKA_TOPIC` (`sagahost.bench`, created by
//! the caller), `SAGAHOST_TEST_POSTGRES` to also measure on PostgreSQL.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::*;
use crate::clock::SystemClock;
use crate::engine::SagaState;
use crate::event::OutboxEvent;
use crate::store::{Commit, Fence, NewSaga, Store};

/// Events per saga: creation plus four transitions committed as one chain.
const EVENTS_PER_SAGA: i64 = 5;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn event(saga: &str, seq: i64) -> OutboxEvent {
    let event_id = uuid::Uuid::now_v7().to_string();
    let payload = serde_json::json!({
        "event_id": event_id, "saga_id": saga, "saga_type": "bench", "seq": seq, "type": "X",
        "status": "RUNNING", "at": 0, "data": {"note": "a payload about the size of a real event's"},
    })
    .to_string();
    OutboxEvent { event_id, event_type: "X".into(), payload }
}

/// Fills `store`'s outbox with `sagas` sagas of [`EVENTS_PER_SAGA`] events each.
async fn fill(store: &Arc<dyn Store>, prefix: &str, sagas: usize) {
    let def = crate::store::tests::def();
    let names: Vec<String> = def.steps.iter().map(|s| s.name.clone()).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in 0..8 {
        let (store, def, names, prefix) = (Arc::clone(store), def.clone(), names.clone(), prefix.to_owned());
        tasks.spawn(async move {
            for i in (chunk..sagas).step_by(8) {
                let id = format!("{prefix}-{i}");
                let state = SagaState::new(&def, 0);
                let saga = NewSaga {
                    id: id.clone(),
                    definition: def.clone(),
                    input: "{}".into(),
                    state: state.clone(),
                    event: event(&id, 1),
                    now: 0,
                    lease: None,
                    trace_parent: None,
                };
                store.create_saga(&saga, None, 0).await.unwrap();
                let events: Vec<OutboxEvent> = (2..=EVENTS_PER_SAGA).map(|seq| event(&id, seq)).collect();
                let commit = Commit {
                    saga_id: &id,
                    fence: Fence::Takeover,
                    read_seq: 1,
                    state: &state,
                    step_names: &names,
                    changed_steps: &[],
                    plugin_writes: &[],
                    plugin_checks: &[],
                    catalog_check: None,
                    events: &events,
                    now: 0,
                    audit: None,
                    response: None,
                    answer: None,
                    creation: None,
                };
                store.commit(&commit).await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

/// A sink that remembers, per saga, the seqs it was handed, around the real one.
struct Checked<S> {
    inner: S,
    seen: std::sync::Mutex<HashMap<String, Vec<i64>>>,
}

#[async_trait]
impl<S: Sink + ?Sized> Sink for Checked<Box<S>> {
    fn name(&self) -> String {
        self.inner.name()
    }

    async fn publish(&self, rows: &[OutboxRow]) -> Published {
        let published = self.inner.publish(rows).await;
        let mut seen = self.seen.lock().unwrap();
        for row in &rows[..published.acked.min(rows.len())] {
            seen.entry(row.saga_id.clone()).or_default().push(row.seq);
        }
        published
    }
}

/// Drains the outbox into `sink`; prints and returns events/s.
async fn drain(label: &str, store: &Arc<dyn Store>, sink: Box<dyn Sink>, sagas: usize) -> f64 {
    let sink = Checked { inner: sink, seen: Default::default() };
    let metrics = Metrics::new();
    let options = RelayOptions {
        batch_size: env_or("BENCH_RELAY_BATCH", RelayOptions::default().batch_size),
        ..RelayOptions::default()
    };
    let epoch = store.relay_lease(&options.owner, 3_600_000).await.unwrap().expect("the relay lease is free");
    let total = sagas * EVENTS_PER_SAGA as usize;
    let started = Instant::now();
    let mut published = 0;
    while published < total {
        let n = publish_once(&**store, &sink, &SystemClock, &metrics, &options, epoch).await.unwrap().marked;
        assert!(n > 0, "{label}: the relay stalled at {published} of {total} events");
        published += n;
    }
    let elapsed = started.elapsed();
    // The next sink's drain on this store has an owner of its own.
    store.relay_release(&options.owner).await.unwrap();
    let rate = total as f64 / elapsed.as_secs_f64();
    println!(
        "relay {label}: {total} events in {:.2} s = {rate:.0} events/s (batch {})",
        elapsed.as_secs_f64(),
        options.batch_size
    );
    let seen = sink.seen.into_inner().unwrap();
    assert_eq!(seen.len(), sagas, "{label}: every saga's events went out");
    let want: Vec<i64> = (1..=EVENTS_PER_SAGA).collect();
    assert!(seen.values().all(|seqs| *seqs == want), "{label}: each event once, in seq order per saga");
    rate
}

/// A store to measure: its name, and the scratch PostgreSQL database to drop afterwards
/// (admin URL, database URL).
type Backend = (&'static str, Arc<dyn Store>, Option<(String, String)>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --ignored --nocapture, in release"]
async fn relay_throughput() {
    let sagas: usize = env_or("BENCH_RELAY_SAGAS", 4_000);
    let dir = tempfile::tempdir().unwrap();
    let mut stores: Vec<Backend> = vec![("sqlite", crate::store::open(None, dir.path()).await.unwrap(), None)];
    if let Ok(admin) = std::env::var("SAGAHOST_TEST_POSTGRES") {
        let url = crate::store::postgres::scratch_database(&admin, "sagahost_bench_relay").await.unwrap();
        stores.push(("postgres", crate::store::open(Some(&url), dir.path()).await.unwrap(), Some((admin, url))));
    }
    for (backend, store, _) in &stores {
        let mut sinks: Vec<(&str, Box<dyn Sink>)> = Vec::new();
        let events = dir.path().join(format!("events-{backend}.jsonl"));
        let jsonl = jsonl::JsonlSink::open(&events, Default::default()).await.unwrap();
        sinks.push(("events.jsonl", Box::new(jsonl)));
        if let Ok(brokers) = std::env::var("BENCH_KAFKA_BROKERS") {
            let topic = std::env::var("BENCH_KAFKA_TOPIC").unwrap_or_else(|_| "sagahost.bench".into());
            let sink = kafka::KafkaSink::new(kafka::KafkaOptions { brokers, topic, settings: Vec::new() }).unwrap();
            sinks.push(("kafka", Box::new(sink)));
        }
        for (name, sink) in sinks {
            let started = Instant::now();
            fill(store, name, sagas).await;
            println!("relay {backend}: filled {sagas} sagas in {:.2} s", started.elapsed().as_secs_f64());
            drain(&format!("{backend} -> {name}"), store, sink, sagas).await;
        }
    }
    for (_, _, pg) in stores {
        if let Some((admin, url)) = pg {
            crate::store::postgres::drop_database(&admin, &url).await.unwrap();
        }
    }
}
