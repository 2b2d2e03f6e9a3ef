//! The WebAssembly runtime: compiles plugin components, checks them against a version of the
//! `sagahost:plugin` world, and runs one `execute` or `compensate` call at a time in a fresh,
//! limited sandbox, answering with the engine's outcome types.
//!
//! Architecture invariant: this is the only module that names wasmtime types. The rest of the
//! host sees [`Runtime`], [`CallInfo`], [`CallOutcome`] and the engine's
//! [`ExecuteOutcome`](crate::engine::ExecuteOutcome) and
//! [`CompensateOutcome`](crate::engine::CompensateOutcome).
//!
//! One concept per file:
//! - `engine.rs`: the wasmtime engine, the pool its calls' instances come from (a slot per
//!   call, reset to the component's initial image when the call ends), and the epoch ticker
//!   behind call timeouts.
//! - `cache.rs`: compiled components by digest, in memory (nothing compiled is kept on disk).
//! - `policy.rs`: what a plugin may import.
//! - `wit/`: one module per world version, each with the only `bindgen!` for its version,
//!   behind the `PluginWorld` and `Prepared` traits.
//! - `host.rs`: the host side of the imports (`state`, `log`), shared by every version.
//! - `outbound.rs`: the host side of `wasi:http` for 0.2.0 plugins: grants, the idempotency
//!   key and `traceparent` headers, and the per-call limits on requests.
//! - `proxy.rs`: the egress proxy outbound requests may go through (`--outbound-proxy`).
//! - `call.rs`: one call: a pool slot, store, limits, deadline, output checks, classification.
//! - `spare.rs`: instances made ahead of calls, off the saga's path, each taken by one call.
//! - `cpu.rs`: the processor time a call takes, measured per poll of its future.
//! - `bench.rs` (tests only): the plugin call benchmark, `Phases` included (BENCHMARKS.md).
//!
//! Plugins get WASI preview 2 (Rust's std needs it) with an empty context: no files, no
//! sockets, no environment, no arguments; 0.2.0 plugins also get `wasi:http/outgoing-handler`,
//! limited to the origins an admin granted them. Their `state` imports read committed state through
//! [`PluginReader`] and buffer writes; the driver commits the writes with the step result.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest as _, Sha256};
use wasmtime::component::Linker;
use wasmtime::Engine;

use crate::engine::{CompensateOutcome, ExecuteOutcome};
use crate::store::{StateCheck, StateRead, StateWrite};

mod cache;
mod call;
mod cpu;
mod engine;
mod host;
mod outbound;
mod policy;
mod proxy;
mod spare;
mod stderr;
mod wit;

pub use engine::EPOCH_TICK;
pub use host::MAX_SCAN;
pub use outbound::{ClientCertChain, ClientKey, HttpLimits, TlsTrust};
pub use proxy::{NoProxy, Proxy};
pub use spare::SpareObserver;

/// Per-call limits. Configurable on the command line.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Memory of one call, in bytes: all its linear memories and tables together.
    pub memory_bytes: usize,
    /// Largest output JSON a call may return.
    pub output_bytes: usize,
    /// Total bytes of state a call may write (keys plus values).
    pub state_write_bytes: usize,
    /// Log lines kept per call; the rest are counted and dropped.
    pub log_lines: u32,
    /// Largest single log line kept (longer lines are truncated).
    pub log_line_bytes: usize,
    /// Outbound HTTP of 0.2.0 plugins.
    pub http: HttpLimits,
    /// Calls that may run at once. Each has a sandbox slot in the engine's pool, reserved at
    /// start-up (address space, not memory); a call beyond them waits for a slot, at most for
    /// its timeout, and then ends `Unavailable`. Keep it at least the driver's concurrency.
    pub concurrent_calls: u32,
    /// Instances made ahead of calls that a runtime keeping them
    /// ([`Runtime::keeping_spares`]) holds at once, each in a pool slot of its own (address
    /// space, like a call's, and the memory its instantiation wrote). 0 keeps none: every call
    /// instantiates its component on its own path.
    pub spares: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            output_bytes: 256 << 10,
            state_write_bytes: 1 << 20,
            log_lines: 100,
            log_line_bytes: 4 << 10,
            http: HttpLimits::default(),
            concurrent_calls: 256,
            spares: spare::SPARES,
        }
    }
}

/// Reads what a call may need of a plugin's stored data: its committed state and its grants.
/// Implemented by the store; a trait so the runtime does not depend on how they are kept.
#[async_trait]
pub trait PluginReader: Send + Sync + 'static {
    /// `key`'s committed value; with `guess`, checked at the commit and possibly answered
    /// from memory ([`crate::store::PluginStateStore::state_read`]).
    async fn get(&self, plugin: &str, key: &str, guess: bool) -> anyhow::Result<StateRead>;
    /// Keys starting with `prefix`, in byte order, strictly after `after`, at most `limit`,
    /// and a shorter page when its values reach `crate::store::STATE_PAGE_BYTES`.
    async fn scan(
        &self,
        plugin: &str,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> anyhow::Result<Vec<(String, Vec<u8>)>>;
    /// The origins the plugin may reach and the credentials the host adds to its requests
    /// there, in canonical form (`crate::grants`); empty if none.
    async fn grants(&self, plugin: &str) -> anyhow::Result<crate::grants::Grants>;
}

/// What the host tells the plugin about a call (the WIT `call-context`).
#[derive(Debug, Clone)]
pub struct CallInfo {
    pub saga_id: String,
    pub saga_type: String,
    pub step: String,
    pub attempt: u32,
    pub idempotency_key: String,
    /// The payload of the signal that woke the step, if one did.
    pub signal: Option<String>,
    /// The name of that signal.
    pub signal_name: Option<String>,
}

/// The host could not serve a call (a state read failed: the database was unreachable). Not
/// the plugin's doing: the attempt does not count, and the step runs again later.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// The most distinct state keys one call may set or delete. Besides the bytes it writes
/// ([`Limits::state_write_bytes`]), the number of keys is bounded: each is a row of the commit
/// that carries the call's result, and a commit's statement takes a bounded number of
/// arguments (PostgreSQL 65,535), so thousands of tiny keys could make a result that no
/// commit can ever store. Past it, the call traps.
pub const MAX_STATE_KEYS: usize = 1_000;

/// How a call ended, plus the state writes to commit with it.
#[derive(Debug)]
pub struct CallOutcome<T> {
    /// The engine's outcome ([`ExecuteOutcome`] or [`CompensateOutcome`]), or the host's own
    /// failure, which is no outcome of the plugin's at all.
    pub result: Result<T, Unavailable>,
    /// Empty unless the call succeeded: a failed call's writes are discarded.
    pub writes: Vec<StateWrite>,
    /// The reads that the commit of this outcome must find still true
    /// ([`StateRead::checked`]), whatever the outcome: a failure or a rejection that came of a
    /// stale value is as wrong as a success. Empty for the host's own failure (nothing is
    /// committed).
    pub checks: Vec<StateCheck>,
    pub elapsed: Duration,
    /// `done`, `wait`, `retryable`, `rejected`, `trap` or `unavailable`: a label for logs and
    /// metrics (a compensation's `Failed` does not say which kind of failure it was).
    pub label: &'static str,
    /// The call sent requests out of the host (0.2.0 outbound HTTP). A failed call that did
    /// may have had effects the saga must undo.
    pub reached_out: bool,
    /// Where `elapsed` went.
    pub phases: Phases,
    /// The most memory the call held at once: its linear memories and tables together, the
    /// figure [`Limits::memory_bytes`] caps. Memory only grows during a call, so this is what
    /// it held when it ended.
    pub peak_memory_bytes: usize,
    /// The call's log lines and outbound requests, kept only by a runtime made with
    /// [`Runtime::recording`] (`sagahost plugin run`); empty otherwise.
    pub recorded: Recorded,
    /// Every outbound HTTP request the call made and how it went, for metrics (empty for most
    /// calls: no allocation).
    pub requests: Vec<RequestMade>,
}

/// One outbound HTTP request of a call, as metrics count it: whom it was for, how it ended,
/// how long until it did (the response's head, or the error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestMade {
    /// The origin it was for, canonical (`https://payments.example.com:443`), if the plugin
    /// is granted it; `-` otherwise (not granted, the grants not read, not a URL), so that a
    /// plugin cannot make up label values.
    pub origin: String,
    /// `1xx` to `5xx` for a response (its body may still fail: too large, cut off by the
    /// call's end); else why none came: `denied` (not granted, or a link-local address),
    /// `limit` (over the call's request count), `dns`, `connect` (refused, reset, closed),
    /// `tls`, `timeout`, `protocol` (the answer was not HTTP), `proxy` (the egress proxy could
    /// not be reached or refused), `late` (made after the call's time for requests was up),
    /// `abandoned` (still out when the call ended, or dropped by the plugin), `invalid` (not a
    /// URL) or `error`.
    pub outcome: &'static str,
    /// From the plugin's send to the response's head, or to the failure (the grants' read, a
    /// DNS lookup, connecting and TLS included).
    pub elapsed: Duration,
    /// A response came (only those are timed in `sagahost_plugin_http_request_seconds`).
    pub responded: bool,
}

/// What a recording runtime keeps of a call besides its outcome, for a plugin's author.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    /// The log lines kept (at most [`Limits::log_lines`], each sanitised and cut as the host
    /// logs them).
    pub logs: Vec<LogLine>,
    /// Log lines dropped over [`Limits::log_lines`].
    pub logs_dropped: u32,
    /// Every outbound HTTP request the plugin made, in order, denied ones included.
    pub requests: Vec<OutboundRequest>,
}

/// One log line of a plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// `trace`, `debug`, `info`, `warn` or `error`.
    pub level: &'static str,
    pub message: String,
}

/// One outbound HTTP request of a plugin and how it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundRequest {
    pub method: String,
    /// The URL as the plugin asked for it.
    pub url: String,
    /// The response's status, if one came.
    pub status: Option<u16>,
    /// Why no response came (the wasi:http error code, e.g. `HttpRequestDenied`).
    pub error: Option<String>,
}

/// Where a call's time went: the parts add up to [`CallOutcome::elapsed`]. Kept for the
/// benchmark and for metrics that tell the host's overhead from the plugin's own time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Phases {
    /// Waiting for a sandbox slot (none while fewer than `Limits::concurrent_calls` calls
    /// run) and building the call's store: limits, deadline and host state (its WASI context
    /// is built later, by the plugin's first WASI call, if it makes one).
    pub setup: Duration,
    /// Instantiating the component in that store.
    pub instantiate: Duration,
    /// Running the export, the host's imports (state reads) included.
    pub run: Duration,
    /// Checking and classifying the answer, taking the writes. Giving the call's sandbox back
    /// to the pool (dropping the instance, which resets the memory it wrote to the module's
    /// initial image) comes after the call has answered, off the saga's path; it is not a
    /// phase of the call ([`Runtime::observing_releases`]).
    pub collect: Duration,
    /// The processor time the call itself took: its threads' CPU time while the call was
    /// being polled, summed over the polls (`cpu.rs`). Unlike the wall-clock phases it
    /// leaves out time spent waiting for a core, a sandbox slot or a state read; the gap
    /// between the two is what the machine's load added. Measured for one call in
    /// [`CPU_SAMPLE_EVERY`] (each reading of the clock is a system call; a mean needs no
    /// more), for every call of a [`Runtime::recording`] runtime; `None` for the others and
    /// where threads' CPU clocks are not available.
    pub cpu: Option<Duration>,
    /// Whether the call took an instance made ahead of it (`Some(true)`: its `instantiate`
    /// is nothing) or found none of a component the runtime keeps spares of (`Some(false)`);
    /// `None` when the runtime keeps no spares of the component ([`Runtime::keeping_spares`]).
    pub spare: Option<bool>,
}

/// Told how long one call's sandbox took to give back to the pool, once it has been
/// ([`Runtime::observing_releases`]).
pub type ReleaseObserver = Arc<dyn Fn(Duration) + Send + Sync>;

/// The host's runtime measures the processor time of one call in this many
/// ([`Phases::cpu`]). The clock costs two system calls per poll, about 3 µs of a ~60 µs call,
/// and each is a point where the kernel may preempt the worker thread: measured on every
/// call at the peak, the host's time per transition read twice as high (its wall clock took
/// the preemptions), one call in 8 still half again. A mean needs no more than a sample.
pub const CPU_SAMPLE_EVERY: u32 = 64;

/// What a loaded component is and may do, for operators (`GET /admin/plugins`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// The `sagahost:plugin` version it targets, e.g. `0.2.0`.
    pub world: &'static str,
    /// It imports `wasi:http/outgoing-handler`: it can call the origins granted to it.
    pub outbound_http: bool,
}

/// Why a component was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("not a valid WebAssembly component: {0}")]
    Invalid(String),
    #[error("the component does not meet the sagahost:plugin/step world: {0}")]
    WrongWorld(String),
}

/// `sha256:<hex>` of some bytes: the identity of a plugin version.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The wasmtime engine, the linker with the host imports of every world version, and the
/// compiled plugins by digest.
pub struct Runtime {
    engine: Engine,
    linker: Linker<call::CallState>,
    cache: cache::Cache,
    reader: Arc<dyn PluginReader>,
    limits: Limits,
    /// One permit per sandbox slot of the engine's pool: a call holds one while its store
    /// lives (until its sandbox is given back, after the call), so the pool never runs out.
    slots: Arc<tokio::sync::Semaphore>,
    /// Told how long each call's sandbox took to give back ([`Runtime::observing_releases`]).
    released: Option<ReleaseObserver>,
    /// Instances made ahead of calls ([`Runtime::keeping_spares`]).
    spares: Option<Arc<spare::Spares>>,
    /// Keep each call's log lines and requests in [`CallOutcome::recorded`].
    record: bool,
    /// Calls so far, to measure one in [`CPU_SAMPLE_EVERY`]'s processor time.
    calls: std::sync::atomic::AtomicU32,
}

impl Runtime {
    /// A runtime whose plugins read committed state through `reader`.
    pub fn new(limits: Limits, reader: Arc<dyn PluginReader>) -> anyhow::Result<Runtime> {
        let engine = engine::new(&limits)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        // Linked for every component, used only by those whose world grants it (`policy.rs`
        // refuses a 0.1.0 component importing it); every request goes through `outbound.rs`.
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        call::bound_request_parts(&mut linker).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        for world in wit::WORLDS {
            world.add_to_linker(&mut linker).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        }
        let cache = cache::Cache::new();
        let slots = Arc::new(tokio::sync::Semaphore::new(limits.concurrent_calls.max(1) as usize));
        Ok(Runtime {
            engine,
            linker,
            cache,
            reader,
            limits,
            slots,
            released: None,
            spares: None,
            record: false,
            calls: Default::default(),
        })
    }

    /// This runtime tells `observe` how long each call's sandbox took to give back to the pool
    /// (the `release` phase of `sagahost_plugin_call_phase_seconds`): that happens after the
    /// call has answered, off the saga's path, so it is in no call's [`Phases`].
    pub fn observing_releases(mut self, observe: ReleaseObserver) -> Runtime {
        self.released = Some(observe);
        self
    }

    /// This runtime instantiates components ahead of their calls (`spare.rs`): after a call, a
    /// task makes the next call's fresh instance while the saga waits for its commit, and the
    /// next call of that component takes it instead of instantiating on its path. Each call
    /// still runs in an instance no call has used. `made` is told how long each spare took (the
    /// `spare` phase of `sagahost_plugin_call_phase_seconds`: no call's [`Phases`]). The host
    /// keeps up to [`Limits::spares`] (none when 0); a one-shot runtime (`sagahost plugin run`)
    /// has no next call to make one for.
    pub fn keeping_spares(mut self, made: Option<SpareObserver>) -> Runtime {
        if self.limits.spares > 0 {
            self.spares = Some(Arc::new(spare::Spares::new(
                self.engine.clone(),
                self.limits.clone(),
                Arc::clone(&self.reader),
                made,
            )));
        }
        self
    }

    /// This runtime keeps every call's log lines and outbound requests in
    /// [`CallOutcome::recorded`], and measures every call's processor time (for `sagahost
    /// plugin run`; the host's own runtime does not, and pays nothing for it).
    pub fn recording(mut self) -> Runtime {
        self.record = true;
        self
    }

    /// Compiles and checks a component, and keeps it ready under its digest. Compiling takes
    /// tens of milliseconds of CPU, so it runs on the blocking pool. Idempotent.
    pub async fn load(self: &Arc<Self>, wasm: Vec<u8>) -> Result<String, LoadError> {
        self.load_holding(wasm, ()).await
    }

    /// [`Runtime::load`], holding `hold` (a lock that keeps compiles one at a time) until the
    /// compile ends. A compile cannot be stopped once begun: when the caller goes away first
    /// (an upload past its deadline), the compile still finishes, keeps its result (so the
    /// retry finds the version loaded) and only then lets `hold` go (so the retry did not
    /// start a second compile of it beside the first).
    pub async fn load_holding<H: Send + 'static>(
        self: &Arc<Self>,
        wasm: Vec<u8>,
        hold: H,
    ) -> Result<String, LoadError> {
        let digest = digest_of(&wasm);
        if self.is_loaded(&digest) {
            return Ok(digest);
        }
        let this = Arc::clone(self);
        let keep = digest.clone();
        tokio::task::spawn_blocking(move || {
            let (ready, caps) = this.compile(&wasm)?;
            this.cache.insert(keep, ready, caps);
            drop(hold);
            Ok::<_, LoadError>(())
        })
        .await
        .map_err(|e| LoadError::Invalid(format!("compiler task failed: {e}")))??;
        Ok(digest)
    }

    fn compile(&self, wasm: &[u8]) -> Result<(Arc<dyn wit::Prepared>, Capabilities), LoadError> {
        if !policy::is_component(wasm) {
            return Err(LoadError::Invalid(
                "the bytes are not a WebAssembly component (a core module or something else); build the plugin with \
                 cargo build --target wasm32-wasip2, which produces a component"
                    .to_owned(),
            ));
        }
        let component = self.cache.component(&self.engine, wasm)?;
        let world = wit::classify(&self.engine, &component)?;
        policy::check_imports(&self.engine, &component, world.grants())?;
        // Resolving imports here rejects components that import anything the host does not
        // provide; `prepare` rejects missing or mistyped exports.
        let caps =
            Capabilities { world: world.version(), outbound_http: policy::imports_http(&self.engine, &component) };
        let pre = self.linker.instantiate_pre(&component).map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        let ready = world.prepare(pre).map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        Ok((ready, caps))
    }

    /// What a loaded component targets and may do; `None` if it is not loaded here.
    pub fn capabilities(&self, digest: &str) -> Option<Capabilities> {
        self.cache.capabilities(digest)
    }

    pub fn is_loaded(&self, digest: &str) -> bool {
        self.cache.contains(digest)
    }

    /// Unloads the components no call was handed for `idle`, but those `keep` names (the
    /// versions bound now), and throws away their spares (which would keep each compiled
    /// component in memory, and a pool slot, for good: no call takes a spare of a version it
    /// no longer runs); returns their digests. Each is loaded again when a call needs it.
    pub fn unload_idle(&self, idle: Duration, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let (digests, components): (Vec<String>, Vec<_>) = self.cache.drop_idle(idle, keep).into_iter().unzip();
        if let Some(spares) = &self.spares {
            spares.forget(&components);
        }
        digests
    }

    fn call<'a>(&'a self, digest: &'a str, plugin: &'a str, info: &'a CallInfo, timeout: Duration) -> call::Call<'a> {
        let (ready, caps) = self.cache.get(digest).unzip();
        call::Call {
            engine: &self.engine,
            slots: &self.slots,
            spares: self.spares.as_ref(),
            released: self.released.as_ref(),
            reader: &self.reader,
            limits: &self.limits,
            ready,
            // Stale answers only for a component that cannot carry them to another service.
            guess: caps.is_some_and(|c| !c.outbound_http),
            digest,
            plugin,
            info,
            timeout,
            record: self.record,
            measure_cpu: self.record
                || self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed).is_multiple_of(CPU_SAMPLE_EVERY),
        }
    }

    /// Runs `execute` of the plugin version `digest` (whose state space is `plugin`'s).
    pub async fn execute(
        &self,
        digest: &str,
        plugin: &str,
        info: &CallInfo,
        input: &str,
        timeout: Duration,
    ) -> CallOutcome<ExecuteOutcome> {
        call::execute(self.call(digest, plugin, info, timeout), input).await
    }

    /// Runs `compensate` of the plugin version `digest`.
    pub async fn compensate(
        &self,
        digest: &str,
        plugin: &str,
        info: &CallInfo,
        input: &str,
        output: &str,
        timeout: Duration,
    ) -> CallOutcome<CompensateOutcome> {
        call::compensate(self.call(digest, plugin, info, timeout), input, output).await
    }
}

#[cfg(test)]
mod bench;
#[cfg(test)]
mod tests;
