//! Metrics, served as OpenMetrics text at `GET /metrics` (Prometheus scrapes it).
//!
//! Counters and histograms of what this process did (plugin calls by outcome and their
//! latency, events published) live in a registry owned by the app: no globals, so tests can
//! run several hosts in one process. Gauges that describe stored state (sagas by status, the
//! outbox backlog and relay lag) are read from the store at scrape time, so every replica
//! reports the same truth and a restart loses nothing.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::store::StatsStore;

/// Labels of a plugin call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub saga_type: String,
    pub step: String,
    /// `execute` or `compensate`.
    pub call: &'static str,
    /// `done`, `wait`, `retryable`, `rejected` or `trap`.
    pub outcome: &'static str,
}

/// Labels of a plugin's outbound HTTP request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    plugin: String,
    /// A granted origin, or `-`.
    origin: String,
    /// `2xx` and the like, or why no response came (`RequestMade::outcome`).
    outcome: &'static str,
}

/// Labels of the time outbound requests took: by plugin and origin.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OriginLabels {
    plugin: String,
    origin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    saga_type: String,
    status: String,
}

/// What answered a plugin state read.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnsweredBy {
    answered_by: &'static str,
}

/// Which gauges read from the database an age is of.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GaugeLabels {
    gauge: &'static str,
}

/// Labels of a plugin call's phase, or of a relay batch's.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    /// One of [`PHASES`] ([`crate::runtime::Phases`]), or of [`RelayPhase`].
    phase: &'static str,
}

/// A part of one relay batch, as labelled in `sagahost_relay_phase_seconds`: where the relay's
/// time goes when it falls behind (the database's reads or marks, or the sink).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayPhase {
    /// Reading the batch from the outbox (reads that find nothing are not counted).
    Read,
    /// The sink's publish (for `events.jsonl` the write and fsync, for Kafka the produce
    /// acknowledgements), a refused row's retry alone included.
    Publish,
    /// Marking the delivered rows published, or a refused one dead-lettered.
    Mark,
}

impl RelayPhase {
    const ALL: [RelayPhase; 3] = [RelayPhase::Read, RelayPhase::Publish, RelayPhase::Mark];

    fn label(self) -> &'static str {
        match self {
            RelayPhase::Read => "read",
            RelayPhase::Publish => "publish",
            RelayPhase::Mark => "mark",
        }
    }

    /// Its place in [`RelayPhase::ALL`] (and in `Metrics::relay_phases`).
    fn index(self) -> usize {
        match self {
            RelayPhase::Read => 0,
            RelayPhase::Publish => 1,
            RelayPhase::Mark => 2,
        }
    }
}

/// Labels of `sagahost_plugin_call_spares`: whether a call took a spare instance.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpareLabels {
    /// `taken` or `missed` ([`crate::runtime::Phases::spare`]).
    result: &'static str,
}

/// Labels of a saga the driver settled.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SettledLabels {
    saga_type: String,
    /// `COMPLETED`, `CANCELLED` or `COMPENSATION_FAILED`.
    status: String,
}

type HistogramFn = fn() -> Histogram;

/// The phases of a plugin call, as labelled in `sagahost_plugin_call_phase_seconds`.
/// `release` comes after the call has answered (giving its sandbox back to the pool), and
/// `spare` before a call (an instance made ahead of it), so neither is part of
/// `sagahost_plugin_call_seconds` ([`crate::runtime::Runtime::observing_releases`],
/// [`crate::runtime::Runtime::keeping_spares`]).
const PHASES: [&str; 6] = ["setup", "instantiate", "run", "collect", "release", "spare"];

/// `release`'s place in [`PHASES`].
const RELEASE: usize = 4;

/// `spare`'s place in [`PHASES`].
const SPARE: usize = 5;

fn phase_histogram() -> Histogram {
    // 1 µs to about 4 s: a pooled instantiation takes microseconds.
    Histogram::new(exponential_buckets(0.000_001, 4.0, 12))
}

fn latency_histogram() -> Histogram {
    // 50 µs to about 13 s: host overhead sits at the bottom, timeouts at the top.
    Histogram::new(exponential_buckets(0.000_05, 4.0, 10))
}

/// The metrics of one host process.
pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    call_seconds: Family<CallLabels, Histogram, HistogramFn>,
    http_requests: Family<RequestLabels, Counter>,
    http_seconds: Family<OriginLabels, Histogram, HistogramFn>,
    /// The histograms of `sagahost_plugin_call_phase_seconds`, one per phase in [`PHASES`]
    /// order, created once: a call records its phases without a label lookup.
    call_phases: [Histogram; PHASES.len()],
    /// `sagahost_plugin_call_cpu_seconds`.
    call_cpu: Histogram,
    /// `sagahost_plugin_call_spares`: calls that took a spare, and that found none.
    spares_taken: Counter,
    spares_missed: Counter,
    /// `sagahost_relay_phase_seconds`, one per phase in [`RelayPhase::ALL`] order.
    relay_phases: [Histogram; 3],
    events_published: Counter,
    relay_failures: Counter,
    transition_overhead: Histogram,
    commit_seconds: Histogram,
    committed_transitions: Counter,
    stale_commits: Counter,
    sagas_shed: Counter,
    settled: Family<SettledLabels, Counter>,
    relay_leader: Gauge,
    clock_offset: Gauge<f64, std::sync::atomic::AtomicU64>,
    dead_lettered: Counter,
    not_loadable: Counter,
    /// Sagas by (type, status, count) as last read from the store; see [`Reused`].
    saga_counts: tokio::sync::Mutex<Option<Reused<SagaCounts>>>,
    /// The outbox backlog as last read: pending events, and the oldest one's age in seconds
    /// when read. Apart from the saga counts, so that a slow count (many sagas kept) does not
    /// keep it old: this read is an index lookup, reused only [`STORE_GAUGES_TTL`] normally.
    backlog: tokio::sync::Mutex<Option<Reused<(i64, f64)>>>,
}

/// Sagas by (type, status, count).
type SagaCounts = Vec<(String, String, i64)>;

/// A gauge read from the store, when, and how long the read took: scrapes within
/// [`reuse_for`] of it share it, so a scrape storm costs the database one read.
struct Reused<T> {
    at: std::time::Instant,
    took: std::time::Duration,
    value: T,
}

impl<T: Clone> Reused<T> {
    /// The value in `cache` if it is recent enough, else `read`'s (kept for the next scrapes);
    /// with how old it is (from when its read began).
    async fn get<F: std::future::Future<Output = crate::store::Result<T>>>(
        cache: &tokio::sync::Mutex<Option<Reused<T>>>,
        read: F,
    ) -> crate::store::Result<(T, std::time::Duration)> {
        let mut cached = cache.lock().await;
        match cached.as_ref() {
            Some(r) if r.at.elapsed() < reuse_for(r.took) => Ok((r.value.clone(), r.at.elapsed())),
            _ => {
                let at = std::time::Instant::now();
                let value = read.await?;
                *cached = Some(Reused { at, took: at.elapsed(), value: value.clone() });
                Ok((value, at.elapsed()))
            }
        }
    }
}

/// How long a scrape waits for the database to answer a ping before leaving its gauges out.
pub const STORE_PING_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long the gauges read from the store are reused, at least.
pub const STORE_GAUGES_TTL: std::time::Duration = std::time::Duration::from_secs(2);

/// How long gauges whose read took `took` are reused: [`STORE_GAUGES_TTL`], or twenty times
/// the read's own time if longer. Counting sagas by status reads every saga row (an index
/// scan): with many millions kept (no `--saga-retention-hours`) one read takes seconds, and
/// scrapes must not keep the database busy with it. At most a twentieth of its time goes to
/// them, whatever the scrape interval; the figures are that much older.
fn reuse_for(took: std::time::Duration) -> std::time::Duration {
    STORE_GAUGES_TTL.max(took.saturating_mul(20))
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("sagahost");
        let calls = Family::<CallLabels, Counter>::default();
        let call_seconds =
            Family::<CallLabels, Histogram, HistogramFn>::new_with_constructor(latency_histogram as HistogramFn);
        let call_phase_seconds =
            Family::<PhaseLabels, Histogram, HistogramFn>::new_with_constructor(phase_histogram as HistogramFn);
        registry.register(
            "plugin_call_phase_seconds",
            "Where plugin calls' time goes, by phase: setup (a sandbox slot and the call's store), instantiate, \
             run (the export, host imports included), collect (checking the answer, taking its writes); and \
             release, giving the call's sandbox back to the pool (dropping the instance, resetting its memory), \
             which comes after the call has answered, off the saga's path; and spare, instantiating a component \
             ahead of its next call, off the saga's path too (a call that takes the spare has an instantiate \
             phase of nearly nothing). Neither release nor spare is in plugin_call_seconds",
            call_phase_seconds.clone(),
        );
        let call_phases = PHASES.map(|phase| call_phase_seconds.get_or_create(&PhaseLabels { phase }).clone());
        let call_cpu = phase_histogram();
        let spares = Family::<SpareLabels, Counter>::default();
        registry.register(
            "plugin_call_spares",
            "Plugin calls of components the host keeps spare instances of (--plugin-spares), by whether the \
             call took one (taken: no instantiation on its path) or found none ready (missed: it instantiated, \
             and one more is made for the next call); a component whose instantiation reaches the host has none",
            spares.clone(),
        );
        // One statement each: a `get_or_create` holds the family's lock until its statement ends,
        // and the next one's insert waits for it.
        let spares_taken = spares.get_or_create(&SpareLabels { result: "taken" }).clone();
        let spares_missed = spares.get_or_create(&SpareLabels { result: "missed" }).clone();
        registry.register(
            "plugin_call_cpu_seconds",
            format!(
                "Processor time of plugin calls (one call in {} is measured): the calls' own work (wasm, host \
                 imports, instantiation; not the release phase after the call), without the waits for a core, a \
                 sandbox slot or a state read that plugin_call_seconds includes",
                crate::runtime::CPU_SAMPLE_EVERY
            ),
            call_cpu.clone(),
        );
        let events_published = Counter::default();
        let relay_failures = Counter::default();
        registry.register("plugin_calls", "Plugin calls (step attempts) by outcome", calls.clone());
        registry.register(
            "plugin_call_seconds",
            "Wall-clock time of plugin calls, instantiation included",
            call_seconds.clone(),
        );
        registry.register(
            "events_published",
            "Outbox events the relay published (redeliveries included)",
            events_published.clone(),
        );
        registry.register("relay_failures", "Relay batches that failed and will be retried", relay_failures.clone());
        let relay_phase_seconds =
            Family::<PhaseLabels, Histogram, HistogramFn>::new_with_constructor(latency_histogram as HistogramFn);
        registry.register(
            "relay_phase_seconds",
            "Where the relay's batches spend their time, by phase: read (a batch's outbox rows; reads that find \
             none are not counted), publish (the sink's write or the broker's acknowledgements), mark (the delivered \
             rows published, or a refused one dead-lettered)",
            relay_phase_seconds.clone(),
        );
        let relay_phases =
            RelayPhase::ALL.map(|p| relay_phase_seconds.get_or_create(&PhaseLabels { phase: p.label() }).clone());
        let http_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "plugin_http_requests",
            "Plugins' outbound HTTP requests (sagahost:plugin@0.2.0) by plugin, granted origin (- for one not \
             granted) and outcome: the response's status class (2xx, 4xx, ...) or why none came (denied, limit, dns, \
             connect, tls, timeout, protocol, proxy, late, abandoned, invalid, error)",
            http_requests.clone(),
        );
        let http_seconds =
            Family::<OriginLabels, Histogram, HistogramFn>::new_with_constructor(latency_histogram as HistogramFn);
        registry.register(
            "plugin_http_request_seconds",
            "Time from a plugin's outbound request to its response's head (the grants' read, DNS, connecting and TLS \
             included), of requests answered, by plugin and origin",
            http_seconds.clone(),
        );
        let not_loadable = Counter::default();
        registry.register(
            "plugin_calls_not_loadable",
            "Plugin calls this replica did not make because its build refuses the plugin version (the saga is left \
             to other replicas for 30 s): a rolling upgrade in progress, or a version no replica can run (rebind it)",
            not_loadable.clone(),
        );
        let dead_lettered = Counter::default();
        registry.register(
            "dead_lettered_events",
            "Events the sink refused for good, moved to the dead letters (GET /admin/dead-letters)",
            dead_lettered.clone(),
        );
        let transition_overhead = latency_histogram();
        registry.register(
            "transition_overhead_seconds",
            "Host time per transition of the driver, plugin call and durable commit excluded: the engine, \
             the call's set-up, staging the result",
            transition_overhead.clone(),
        );
        let commit_seconds = latency_histogram();
        registry.register(
            "driver_commit_seconds",
            "Time from the driver's commit request until it is durable (one commit carries a chain of \
             transitions: see committed_transitions)",
            commit_seconds.clone(),
        );
        let committed_transitions = Counter::default();
        registry.register(
            "committed_transitions",
            "Transitions the driver committed; divided by the count of driver_commit_seconds, the mean chain length",
            committed_transitions.clone(),
        );
        let stale_commits = Counter::default();
        registry.register(
            "stale_commits",
            "Step results discarded because the saga's lease had passed to another worker (fencing)",
            stale_commits.clone(),
        );
        let sagas_shed = Counter::default();
        registry.register(
            "sagas_shed",
            "New sagas refused with 503 because --max-queued-sagas waited to start already (load shedding: \
             the host was offered more than it runs)",
            sagas_shed.clone(),
        );
        let settled = Family::<SettledLabels, Counter>::default();
        registry.register(
            "sagas_settled",
            "Sagas the driver brought to rest, by type and status: COMPLETED, CANCELLED, or COMPENSATION_FAILED \
             (stuck until an operator retries or resolves it; alert on its rate)",
            settled.clone(),
        );
        let relay_leader = Gauge::default();
        registry.register(
            "relay_leader",
            "1 while this process holds the relay lease and publishes",
            relay_leader.clone(),
        );
        let clock_offset = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "clock_offset_seconds",
            "The database server's clock minus this host's, as last measured (replicas on PostgreSQL keep to the \
             database's clock; alert when it is large, the host's time service is off)",
            clock_offset.clone(),
        );
        let start_time = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        start_time
            .set(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()));
        registry.register(
            "start_time_seconds",
            "When this process started, in Unix seconds: it changes when a replica restarts, and its counters start \
             over from zero",
            start_time,
        );
        Arc::new(Metrics {
            clock_offset,
            saga_counts: tokio::sync::Mutex::new(None),
            backlog: tokio::sync::Mutex::new(None),
            dead_lettered,
            not_loadable,
            registry,
            calls,
            call_seconds,
            http_requests,
            http_seconds,
            call_phases,
            call_cpu,
            spares_taken,
            spares_missed,
            relay_phases,
            events_published,
            relay_failures,
            transition_overhead,
            commit_seconds,
            committed_transitions,
            stale_commits,
            sagas_shed,
            settled,
            relay_leader,
        })
    }

    /// Records one plugin call and where its time went.
    pub fn call(&self, labels: CallLabels, elapsed: Duration, phases: &crate::runtime::Phases) {
        self.call_seconds.get_or_create(&labels).observe(elapsed.as_secs_f64());
        self.calls.get_or_create(&labels).inc();
        let times = [phases.setup, phases.instantiate, phases.run, phases.collect];
        for (histogram, time) in self.call_phases[..RELEASE].iter().zip(times) {
            histogram.observe(time.as_secs_f64());
        }
        if let Some(cpu) = phases.cpu {
            self.call_cpu.observe(cpu.as_secs_f64());
        }
        match phases.spare {
            Some(true) => {
                self.spares_taken.inc();
            }
            Some(false) => {
                self.spares_missed.inc();
            }
            None => {}
        }
    }

    /// Records how long a call's sandbox took to give back, after the call
    /// ([`crate::runtime::Runtime::observing_releases`]).
    pub fn sandbox_released(&self, took: Duration) {
        self.call_phases[RELEASE].observe(took.as_secs_f64());
    }

    /// Records how long a spare instance took to make, ahead of a call
    /// ([`crate::runtime::Runtime::keeping_spares`]).
    pub fn spare_made(&self, took: Duration) {
        self.call_phases[SPARE].observe(took.as_secs_f64());
    }

    /// Records a call's outbound HTTP requests (`plugin` made them).
    pub fn http_requests(&self, plugin: &str, requests: &[crate::runtime::RequestMade]) {
        for r in requests {
            let labels = RequestLabels { plugin: plugin.to_owned(), origin: r.origin.clone(), outcome: r.outcome };
            self.http_requests.get_or_create(&labels).inc();
            if r.responded {
                let labels = OriginLabels { plugin: plugin.to_owned(), origin: r.origin.clone() };
                self.http_seconds.get_or_create(&labels).observe(r.elapsed.as_secs_f64());
            }
        }
    }

    /// Records the host's own time for one transition (plugin call and commit excluded).
    pub fn transition(&self, overhead: Duration) {
        self.transition_overhead.observe(overhead.as_secs_f64());
    }

    /// Records one durable commit of the driver carrying `transitions` transitions.
    pub fn commit(&self, elapsed: Duration, transitions: usize) {
        self.commit_seconds.observe(elapsed.as_secs_f64());
        self.committed_transitions.inc_by(transitions as u64);
    }

    /// Starts the settled counters of these saga types at 0, so that the first saga to settle
    /// in a status is an increase from 0 a rate or `increase()` alert sees (a series that
    /// appears at 1 shows no increase), whichever process it settles in.
    pub fn saga_types<'a>(&self, types: impl IntoIterator<Item = &'a str>) {
        for saga_type in types {
            for status in ["COMPLETED", "CANCELLED", "COMPENSATION_FAILED"] {
                let labels = SettledLabels { saga_type: saga_type.to_owned(), status: status.to_owned() };
                drop(self.settled.get_or_create(&labels));
            }
        }
    }

    /// The driver committed a saga into a terminal status or COMPENSATION_FAILED.
    pub fn settled(&self, saga_type: &str, status: &str) {
        self.settled.get_or_create(&SettledLabels { saga_type: saga_type.to_owned(), status: status.to_owned() }).inc();
    }

    /// One phase of a relay batch took `elapsed`.
    pub fn relay_phase(&self, phase: RelayPhase, elapsed: Duration) {
        self.relay_phases[phase.index()].observe(elapsed.as_secs_f64());
    }

    pub fn published(&self, n: usize) {
        self.events_published.inc_by(n as u64);
    }

    /// An event the sink refused for good went to the dead letters.
    pub fn dead_lettered(&self) {
        self.dead_lettered.inc();
    }

    /// A call not made: this build refuses the plugin version.
    pub fn not_loadable(&self) {
        self.not_loadable.inc();
    }

    pub fn relay_failed(&self) {
        self.relay_failures.inc();
    }

    /// `sagahost_relay_failures_total` as it stands.
    #[cfg(test)]
    pub fn relay_failures(&self) -> u64 {
        self.relay_failures.get()
    }

    /// `sagahost_dead_lettered_events_total` as it stands.
    #[cfg(test)]
    pub fn dead_letters_written(&self) -> u64 {
        self.dead_lettered.get()
    }

    /// `sagahost_events_published_total` as it stands.
    #[cfg(test)]
    pub fn events_published(&self) -> u64 {
        self.events_published.get()
    }

    /// A commit refused by the fence: this worker had lost the saga.
    pub fn stale_commit(&self) {
        self.stale_commits.inc();
    }

    /// A new saga was refused: the driver's queue was full.
    pub fn shed(&self) {
        self.sagas_shed.inc();
    }

    pub fn relay_leader(&self, leading: bool) {
        self.relay_leader.set(i64::from(leading));
    }

    /// The database's clock minus this host's, in ms ([`crate::clock::SyncedClock`]).
    pub fn clock_offset(&self, offset_ms: i64) {
        self.clock_offset.set(offset_ms as f64 / 1000.0);
    }

    /// The whole exposition: live counters plus gauges read from the store (at most
    /// [`reuse_for`] old; left out, with `sagahost_store_up 0`, when the store does not answer).
    /// `catalog_version` is the store's catalog version this process's plugins and definitions
    /// reflect: replicas agree on it within a catalog refresh interval.
    pub async fn render(&self, store: &dyn StatsStore, now_ms: i64, catalog_version: i64) -> anyhow::Result<String> {
        let mut scrape = Registry::with_prefix("sagahost");
        let catalog = Gauge::<i64>::default();
        catalog.set(catalog_version);
        scrape.register(
            "catalog_version",
            "The plugin and definition version this process serves (compare across replicas)",
            catalog,
        );
        // A database that does not answer leaves its gauges out of the scrape, not the scrape
        // out: the counters of this process (relay failures, its leadership...) are what the
        // alerts need most then, and `store_up` says why the gauges are missing. A ping with a
        // short bound first: a read of a database that is gone waits out the pool's acquire
        // timeout (10 s on PostgreSQL), and two of them took a scrape past Prometheus's own
        // timeout, so the scrape failed whole all the same.
        let mut store_up = match tokio::time::timeout(STORE_PING_WAIT, store.ping()).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the database did not answer /metrics' ping; its gauges are left out");
                false
            }
            Err(_) => {
                tracing::warn!(
                    "the database did not answer /metrics' ping in {STORE_PING_WAIT:?}; its gauges are left out"
                );
                false
            }
        };
        // How old each read is: the saga counts are reused far longer than the backlog when
        // counting is slow (many sagas kept), and a reader waiting for a fresh backlog (the
        // load generator after a run) must not wait for the counts.
        let ages = Family::<GaugeLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        if store_up {
            match Reused::get(&self.saga_counts, store.saga_counts()).await {
                Ok((counts, age)) => {
                    ages.get_or_create(&GaugeLabels { gauge: "sagas" }).set(age.as_secs_f64());
                    let sagas = Family::<StatusLabels, Gauge>::default();
                    for (saga_type, status, count) in counts {
                        sagas.get_or_create(&StatusLabels { saga_type, status }).set(count);
                    }
                    scrape.register("sagas", "Sagas by type and status", sagas);
                }
                Err(e) => {
                    store_up = false;
                    tracing::warn!(error = %e, "counting sagas for /metrics failed; sagahost_sagas is left out");
                }
            }
            // The age as of the read, not of `now_ms`: a reused read must not show a lag that grows
            // by a second every second while the relay keeps up.
            let backlog = Reused::get(&self.backlog, async {
                let (pending, oldest) = store.outbox_backlog().await?;
                Ok((pending, oldest.map_or(0.0, |t| (now_ms - t).max(0) as f64 / 1000.0)))
            })
            .await;
            match backlog {
                Ok(((pending, age), read_age)) => {
                    ages.get_or_create(&GaugeLabels { gauge: "outbox" }).set(read_age.as_secs_f64());
                    let backlog = Gauge::<i64>::default();
                    backlog.set(pending);
                    scrape.register("outbox_pending_events", "Committed events not yet published", backlog);
                    let lag = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
                    lag.set(age);
                    scrape.register("outbox_lag_seconds", "Age of the oldest unpublished event (relay lag)", lag);
                }
                Err(e) => {
                    store_up = false;
                    tracing::warn!(error = %e, "reading the outbox backlog for /metrics failed; its gauges are left out");
                }
            }
        }
        scrape.register(
            "store_gauges_age_seconds",
            "How old this scrape's gauges read from the database are, by gauge: sagas (sagahost_sagas), outbox \
             (outbox_pending_events, outbox_lag_seconds); scrapes share one read for 2 s, or longer when the read \
             is slow",
            ages,
        );
        let up = Gauge::<i64>::default();
        up.set(i64::from(store_up));
        scrape.register(
            "store_up",
            "1 when this scrape could read the gauges kept in the database (sagas by status, outbox backlog \
             and lag); 0 when the database did not answer, and those gauges are left out",
            up,
        );

        let writes = store.write_stats();
        let transactions = Counter::<u64>::default();
        transactions.inc_by(writes.transactions);
        scrape.register(
            "store_write_transactions",
            "Database transactions the writes ran in (with group commit many writes share one)",
            transactions,
        );
        let jobs = Counter::<u64>::default();
        jobs.inc_by(writes.jobs);
        scrape.register(
            "store_writes",
            "Writes (transitions, creations, claims, leases, outbox marks; purges, catalog and grant changes)",
            jobs,
        );

        let reads = store.state_read_stats();
        let state_reads = Family::<AnsweredBy, Counter>::default();
        for (answered_by, count) in [("cache", reads.cache), ("filter", reads.filter), ("database", reads.database)] {
            state_reads.get_or_create(&AnsweredBy { answered_by }).inc_by(count);
        }
        scrape.register(
            "state_reads",
            "Plugin state reads (state.get) by what answered them: recently committed values kept in memory, the \
             filter of keys never written (both checked at the commit where hosts share the database), or the database",
            state_reads,
        );
        let refused = Counter::<u64>::default();
        refused.inc_by(reads.checks_refused);
        scrape.register(
            "state_checks_refused",
            "Commits refused while carrying the state values their calls read: another saga's commit (or, on a \
             shared database, another host) changed a value since, or the saga moved on (or its idempotency key was \
             taken); the steps ran again on the current values",
            refused,
        );
        let refused = Counter::<u64>::default();
        refused.inc_by(reads.catalog_checks_refused);
        scrape.register(
            "catalog_checks_refused",
            "Commits refused while carrying the catalog version a compensation picked its binding at, read from \
             this host's catalog cache on a shared database (PostgreSQL): another host uploaded or bound a plugin or \
             changed a definition since (or the saga moved on); the steps ran again on the current catalog",
            refused,
        );

        let dropped = Counter::<u64>::default();
        dropped.inc_by(crate::logs::lines_dropped());
        scrape.register(
            "log_lines_dropped",
            "Log lines dropped because standard output's reader fell more than the host buffers behind \
             (the host never waits for its log reader)",
            dropped,
        );

        let mut out = String::new();
        encode_registry(&mut out, &self.registry)?;
        encode_registry(&mut out, &scrape)?;
        encode_eof(&mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// Counts the store reads a scrape makes.
    #[derive(Default)]
    struct CountingStats(AtomicU32);

    #[async_trait::async_trait]
    impl StatsStore for CountingStats {
        async fn ping(&self) -> crate::store::Result<()> {
            Ok(())
        }
        async fn outbox_backlog(&self) -> crate::store::Result<(i64, Option<i64>)> {
            Ok((3, Some(0)))
        }
        async fn saga_counts(&self) -> crate::store::Result<Vec<(String, String, i64)>> {
            let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(vec![("refund".into(), "COMPLETED".into(), i64::from(n))])
        }
    }

    /// A database that does not answer.
    struct DownStats;

    #[async_trait::async_trait]
    impl StatsStore for DownStats {
        async fn ping(&self) -> crate::store::Result<()> {
            Err(crate::store::Error::Unsupported("down".into()))
        }
        async fn outbox_backlog(&self) -> crate::store::Result<(i64, Option<i64>)> {
            Err(crate::store::Error::Unsupported("down".into()))
        }
        async fn saga_counts(&self) -> crate::store::Result<Vec<(String, String, i64)>> {
            Err(crate::store::Error::Unsupported("down".into()))
        }
    }

    /// With the database down the scrape still answers, with this process's own series (the
    /// relay's failures and leadership: what the alerts need then); the gauges read from the
    /// database are left out and `store_up` says so. The scrape failed whole, and every alert
    /// on these series went silent through a database outage.
    #[tokio::test]
    async fn a_scrape_with_the_database_down_keeps_the_processs_own_series() {
        let metrics = Metrics::new();
        metrics.relay_failed();
        metrics.relay_leader(true);
        let text = metrics.render(&DownStats, 1_000, 1).await.expect("a scrape");
        for line in ["sagahost_relay_failures_total 1", "sagahost_relay_leader 1", "sagahost_store_up 0"] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in {text}");
        }
        for absent in ["sagahost_sagas{", "sagahost_outbox_pending_events ", "sagahost_outbox_lag_seconds "] {
            assert!(!text.contains(absent), "{absent} without a database: {text}");
        }
        let up = metrics.render(&CountingStats::default(), 1_000, 1).await.unwrap();
        assert!(up.lines().any(|l| l == "sagahost_store_up 1"), "{up}");
    }

    /// A database that takes connections nowhere (gone, partitioned): every read would wait out
    /// the pool's acquire timeout.
    struct HangingStats;

    #[async_trait::async_trait]
    impl StatsStore for HangingStats {
        async fn ping(&self) -> crate::store::Result<()> {
            std::future::pending().await
        }
        async fn outbox_backlog(&self) -> crate::store::Result<(i64, Option<i64>)> {
            std::future::pending().await
        }
        async fn saga_counts(&self) -> crate::store::Result<Vec<(String, String, i64)>> {
            std::future::pending().await
        }
    }

    /// A scrape of a host whose database hangs answers within the ping's bound, saying the
    /// database is down (it waited on every read, past Prometheus's scrape timeout).
    #[tokio::test]
    async fn a_scrape_with_the_database_hanging_answers_within_the_pings_bound() {
        let metrics = Metrics::new();
        let text = tokio::time::timeout(STORE_PING_WAIT * 5, metrics.render(&HangingStats, 1_000, 1))
            .await
            .expect("the scrape waited for the database")
            .unwrap();
        assert!(text.lines().any(|l| l == "sagahost_store_up 0"), "{text}");
    }

    #[tokio::test]
    async fn scrapes_within_the_ttl_share_one_store_read() {
        let metrics = Metrics::new();
        let stats = CountingStats::default();
        for _ in 0..5 {
            let text = metrics.render(&stats, 1_000, 1).await.unwrap();
            assert!(text.contains("sagahost_sagas{saga_type=\"refund\",status=\"COMPLETED\"} 1"), "{text}");
            assert!(text.contains("sagahost_outbox_pending_events 3"), "{text}");
        }
        assert_eq!(stats.0.load(Ordering::SeqCst), 1, "a scrape storm read the store more than once");
        // Past the TTL the next scrape reads again.
        *metrics.saga_counts.lock().await = None;
        let text = metrics.render(&stats, 1_000, 1).await.unwrap();
        assert!(text.contains("status=\"COMPLETED\"} 2"), "{text}");
    }

    #[tokio::test]
    async fn a_reused_backlog_read_shows_the_lag_it_read_not_a_growing_one() {
        let metrics = Metrics::new();
        let stats = CountingStats::default();
        let text = metrics.render(&stats, 1_000, 1).await.unwrap();
        assert!(text.contains("sagahost_outbox_lag_seconds 1.0"), "{text}");
        // 30 s later by the clock, within the reuse: the read said 1 s, not 31.
        let text = metrics.render(&stats, 31_000, 1).await.unwrap();
        assert!(text.contains("sagahost_outbox_lag_seconds 1.0"), "{text}");
        // A slow saga count is reused longer; the backlog is read again after its own TTL.
        metrics.saga_counts.lock().await.as_mut().unwrap().took = Duration::from_secs(10);
        metrics.backlog.lock().await.as_mut().unwrap().at = std::time::Instant::now() - STORE_GAUGES_TTL;
        let text = metrics.render(&stats, 31_000, 1).await.unwrap();
        assert!(text.contains("sagahost_outbox_lag_seconds 31.0"), "{text}");
        assert_eq!(stats.0.load(Ordering::SeqCst), 1, "the saga count was read again");
    }

    #[tokio::test]
    async fn a_registered_types_settled_counters_start_at_zero() {
        let metrics = Metrics::new();
        metrics.saga_types(["refund"]);
        let text = metrics.render(&CountingStats::default(), 1_000, 1).await.unwrap();
        for status in ["COMPLETED", "CANCELLED", "COMPENSATION_FAILED"] {
            let series = format!("sagahost_sagas_settled_total{{saga_type=\"refund\",status=\"{status}\"}} 0");
            assert!(text.contains(&series), "no {series} in\n{text}");
        }
        metrics.settled("refund", "COMPENSATION_FAILED");
        let text = metrics.render(&CountingStats::default(), 1_000, 1).await.unwrap();
        assert!(text.contains("status=\"COMPENSATION_FAILED\"} 1"), "{text}");
    }

    #[tokio::test]
    async fn a_slow_store_read_is_reused_longer() {
        use std::time::{Duration, Instant};
        assert_eq!(reuse_for(Duration::from_millis(5)), STORE_GAUGES_TTL);
        assert_eq!(reuse_for(Duration::from_millis(500)), Duration::from_secs(10));
        let metrics = Metrics::new();
        let stats = CountingStats::default();
        metrics.render(&stats, 1_000, 1).await.unwrap();
        let age = |secs| Instant::now().checked_sub(Duration::from_secs(secs)).unwrap();
        // Read 5 s ago: past the TTL, but it took 500 ms, so it stands for 10 s.
        metrics.saga_counts.lock().await.as_mut().unwrap().at = age(5);
        metrics.saga_counts.lock().await.as_mut().unwrap().took = Duration::from_millis(500);
        metrics.render(&stats, 1_000, 1).await.unwrap();
        assert_eq!(stats.0.load(Ordering::SeqCst), 1, "a slow read was made again within twenty times its length");
        metrics.saga_counts.lock().await.as_mut().unwrap().at = age(11);
        let text = metrics.render(&stats, 1_000, 1).await.unwrap();
        assert!(text.contains("status=\"COMPLETED\"} 2"), "{text}");
    }
}
