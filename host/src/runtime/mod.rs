//! The WebAssembly runtime: compiles plugin components, checks them against the `step` world,
//! and runs one `execute` or `compensate` call at a time in a fresh, limited sandbox.
//!
//! Architecture invariant: this is the only module that names wasmtime types, and it has the
//! only `bindgen!` site. The rest of the host sees [`Runtime`], [`CallInfo`] and
//! [`CallError`].
//!
//! Every call gets a fresh `Store` instantiated from a cached `InstancePre`, so a trap (which
//! leaves an instance unusable) costs only that attempt. Limits per call:
//! - time: epoch interruption. A ticker thread bumps the engine's epoch every
//!   [`EPOCH_TICK`]; the store's deadline callback yields to tokio on every tick (so a busy
//!   plugin never starves other tasks) and interrupts the call once its timeout passed.
//!   Epochs are about twice as cheap as fuel, and we need wall-clock limits, not instruction
//!   counts.
//! - memory: a `StoreLimits` cap on linear memory and tables; growing past it traps.
//! - output, state writes and log lines: checked here, as they cross the boundary.
//!
//! Plugins get WASI preview 2 (Rust's std needs it) with an empty context: no files, no
//! network, no environment, no arguments. Their `state` imports read committed state through
//! [`StateReader`] and buffer writes; the driver commits the writes with the step result.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sha2::{Digest as _, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder, UpdateDeadline};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::store::StateWrite;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "step",
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

use bindings::sagahost::plugin::{log as wit_log, state as wit_state};
use bindings::{Step, StepPre};

/// How often the epoch advances: the granularity of call timeouts and of yields to tokio.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Per-call limits. Configurable on the command line.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Linear memory per instance, in bytes.
    pub memory_bytes: usize,
    /// Largest output JSON a call may return.
    pub output_bytes: usize,
    /// Total bytes of state a call may write (keys plus values).
    pub state_write_bytes: usize,
    /// Log lines kept per call; the rest are counted and dropped.
    pub log_lines: u32,
    /// Largest single log line kept (longer lines are truncated).
    pub log_line_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            output_bytes: 256 << 10,
            state_write_bytes: 1 << 20,
            log_lines: 100,
            log_line_bytes: 4 << 10,
        }
    }
}

/// Reads a plugin's committed state. Implemented by the store; a trait so the runtime does
/// not depend on how state is kept.
#[async_trait]
pub trait StateReader: Send + Sync + 'static {
    async fn get(&self, plugin: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>>;
}

/// What the host tells the plugin about a call (the WIT `call-context`).
#[derive(Debug, Clone)]
pub struct CallInfo {
    pub saga_id: String,
    pub saga_type: String,
    pub step: String,
    pub attempt: u32,
    pub idempotency_key: String,
    pub signal: Option<String>,
}

/// A successful `execute`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Executed {
    Done(String),
    Wait { delay_ms: Option<u64>, signal: Option<String> },
}

/// Why a call did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The plugin returned `step-error::retryable`.
    #[error("{0}")]
    Retryable(String),
    /// The plugin returned `step-error::rejected`.
    #[error("{0}")]
    Rejected(String),
    /// The call trapped, timed out, ran out of memory, broke a host limit, or the plugin is
    /// not loaded: an infrastructure failure, not a business outcome.
    #[error("{0}")]
    Trap(String),
    /// The host could not serve the call (a state read failed: the database was unreachable).
    /// Not the plugin's doing: the attempt does not count, and the step runs again later.
    #[error("{0}")]
    Unavailable(String),
}

impl CallError {
    /// `retryable`, `rejected` or `trap`: a label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Retryable(_) => "retryable",
            CallError::Rejected(_) => "rejected",
            CallError::Trap(_) => "trap",
            CallError::Unavailable(_) => "unavailable",
        }
    }
}

/// The result of a call plus the state writes to commit if it succeeded.
#[derive(Debug)]
pub struct CallOutcome<T> {
    pub result: Result<T, CallError>,
    /// Empty unless the call succeeded: a failed call's writes are discarded.
    pub writes: Vec<StateWrite>,
    pub elapsed: Duration,
}

/// Why a component was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("not a valid WebAssembly component: {0}")]
    Invalid(String),
    #[error("the component does not meet the sagahost:plugin/step world: {0}")]
    WrongWorld(String),
}

/// Is this a component (not a core module)? The preamble's layer field says: the first 8
/// bytes are `\0asm`, a 16-bit version and a 16-bit layer, which is 1 for components.
fn is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && &bytes[0..4] == b"\0asm" && bytes[6..8] == [1, 0]
}

/// `sha256:<hex>` of some bytes: the identity of a plugin version.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Imports a plugin may have. The `sagahost:plugin` interfaces are the contract; the WASI
/// pieces are what Rust's standard library links (streams, an empty environment, exit,
/// stdio) and grant nothing with our empty `WasiCtx`; randomness has no effect outside the
/// call. Everything else (files, sockets, clocks, HTTP, unknown functions) is refused at
/// upload, so a plugin cannot even ask for a capability the host does not grant.
const GRANTED_IMPORTS: &[&str] = &[
    "sagahost:plugin/",
    "wasi:io/",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-",
    "wasi:random/",
];

/// Checks a component's imports against [`GRANTED_IMPORTS`].
fn check_imports(engine: &Engine, component: &Component) -> Result<(), LoadError> {
    let ty = component.component_type();
    let refused: Vec<&str> = ty
        .imports(engine)
        .map(|(name, _)| name)
        .filter(|name| !GRANTED_IMPORTS.iter().any(|p| name.starts_with(p)))
        .collect();
    if refused.is_empty() {
        return Ok(());
    }
    Err(LoadError::WrongWorld(format!(
        "it imports {}, which the host does not grant; plugins may import only the sagahost:plugin interfaces \
         and the WASI streams, environment, exit, stdio and random interfaces Rust's std links (no files, sockets or clocks)",
        refused.join(", ")
    )))
}

/// The wasmtime engine, the linker with host imports, and the compiled plugins by digest.
pub struct Runtime {
    engine: Engine,
    linker: Linker<CallState>,
    components: RwLock<HashMap<String, StepPre<CallState>>>,
    reader: Arc<dyn StateReader>,
    limits: Limits,
    /// Where compiled artifacts are kept, by digest and engine compatibility hash.
    cache_dir: Option<std::path::PathBuf>,
}

impl Runtime {
    /// `cache_dir` keeps compiled artifacts across restarts (compiling costs tens of
    /// milliseconds per plugin; loading a cached artifact well under one).
    pub fn new(
        limits: Limits,
        reader: Arc<dyn StateReader>,
        cache_dir: Option<std::path::PathBuf>,
    ) -> anyhow::Result<Runtime> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        // Deep recursion must trap inside the plugin, well before the host thread's stack.
        config.max_wasm_stack(1 << 20);
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Step::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(|e| anyhow::anyhow!("{e:?}"))?;

        // The epoch ticker holds only a weak reference: it stops when the engine is dropped.
        let weak = engine.weak();
        std::thread::Builder::new().name("sagahost-epoch".into()).spawn(move || loop {
            std::thread::sleep(EPOCH_TICK);
            match weak.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => break,
            }
        })?;
        if let Some(dir) = &cache_dir {
            std::fs::create_dir_all(dir)?;
        }
        Ok(Runtime { engine, linker, components: RwLock::new(HashMap::new()), reader, limits, cache_dir })
    }

    /// Compiles and checks a component, and keeps it ready under its digest. Compiling takes
    /// tens of milliseconds of CPU, so it runs on the blocking pool. Idempotent.
    pub async fn load(self: &Arc<Self>, wasm: Vec<u8>) -> Result<String, LoadError> {
        let digest = digest_of(&wasm);
        if self.is_loaded(&digest) {
            return Ok(digest);
        }
        let this = Arc::clone(self);
        let key = digest.clone();
        let pre = tokio::task::spawn_blocking(move || this.compile(&key, &wasm))
            .await
            .map_err(|e| LoadError::Invalid(format!("compiler task failed: {e}")))??;
        self.components.write().unwrap_or_else(|e| e.into_inner()).insert(digest.clone(), pre);
        Ok(digest)
    }

    fn compile(&self, digest: &str, wasm: &[u8]) -> Result<StepPre<CallState>, LoadError> {
        if !is_component(wasm) {
            return Err(LoadError::Invalid(
                "the bytes are not a WebAssembly component (a core module or something else); build the plugin with \
                 cargo build --target wasm32-wasip2, which produces a component"
                    .to_owned(),
            ));
        }
        let component = match self.cached(digest) {
            Some(c) => c,
            None => {
                let c = Component::new(&self.engine, wasm).map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
                self.store_cached(digest, &c);
                c
            }
        };
        check_imports(&self.engine, &component)?;
        // Resolving imports here rejects components that import anything the host does not
        // provide; StepPre::new rejects missing or mistyped exports.
        let pre = self.linker.instantiate_pre(&component).map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        StepPre::new(pre).map_err(|e| LoadError::WrongWorld(format!("{e:#}")))
    }

    fn cache_path(&self, digest: &str) -> Option<std::path::PathBuf> {
        use std::hash::{Hash, Hasher};
        let dir = self.cache_dir.as_ref()?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        Some(dir.join(format!("{hex}-{:016x}.cwasm", h.finish())))
    }

    /// A compiled artifact of this digest for this engine, if one was cached.
    #[allow(unsafe_code)]
    fn cached(&self, digest: &str) -> Option<Component> {
        let path = self.cache_path(digest)?;
        if !path.exists() {
            return None;
        }
        // SAFETY: `deserialize_file` trusts its input to be an artifact wasmtime produced. The
        // cache directory is written only by `store_cached` below, from a component this
        // process compiled, under a name that includes the engine's compatibility hash; wasmtime
        // also checks the artifact's header and refuses artifacts of another version or config.
        match unsafe { Component::deserialize_file(&self.engine, &path) } {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "ignoring an unusable compiled artifact");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Writes a compiled artifact atomically (temp file, then rename), so a crash never leaves
    /// a torn artifact under the final name.
    fn store_cached(&self, digest: &str, component: &Component) {
        let Some(path) = self.cache_path(digest) else { return };
        let result = component.serialize().map_err(|e| anyhow::anyhow!("{e:#}")).and_then(|bytes| {
            let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4()));
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, &path)?;
            Ok(())
        });
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "could not cache a compiled plugin");
        }
    }

    pub fn is_loaded(&self, digest: &str) -> bool {
        self.components.read().unwrap_or_else(|e| e.into_inner()).contains_key(digest)
    }

    fn pre(&self, digest: &str) -> Option<StepPre<CallState>> {
        self.components.read().unwrap_or_else(|e| e.into_inner()).get(digest).cloned()
    }

    fn new_store(&self, plugin: &str, info: &CallInfo, timeout: Duration) -> (Store<CallState>, MemoryOutputPipe) {
        // Rust panics print to stderr; we keep the first few KiB to explain the trap.
        let stderr = MemoryOutputPipe::new(4 << 10);
        let wasi = WasiCtxBuilder::new().stderr(stderr.clone()).build();
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.memory_bytes)
            .table_elements(100_000)
            .instances(16)
            .tables(16)
            .memories(4)
            .trap_on_grow_failure(true)
            .build();
        let state = CallState {
            wasi,
            table: ResourceTable::new(),
            store_limits: limits,
            limits: self.limits.clone(),
            plugin: plugin.to_owned(),
            saga_id: info.saga_id.clone(),
            step: info.step.clone(),
            reader: Arc::clone(&self.reader),
            writes: BTreeMap::new(),
            write_bytes: 0,
            log_lines: 0,
            logs_dropped: 0,
            deadline: Instant::now() + timeout,
            timed_out: false,
            host_error: None,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.store_limits);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|ctx| {
            if Instant::now() >= ctx.data().deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        (store, stderr)
    }

    /// Runs `execute`.
    pub async fn execute(
        &self,
        digest: &str,
        plugin: &str,
        info: &CallInfo,
        input: &str,
        timeout: Duration,
    ) -> CallOutcome<Executed> {
        let out = self.call(digest, plugin, info, timeout, Export::Execute { input }).await;
        let result = out.result.map(|r| match r {
            Returned::Executed(bindings::StepOutcome::Done(o)) | Returned::Compensated(o) => Executed::Done(o),
            Returned::Executed(bindings::StepOutcome::Wait(w)) => {
                Executed::Wait { delay_ms: w.delay_ms, signal: w.signal }
            }
        });
        CallOutcome { result, writes: out.writes, elapsed: out.elapsed }
    }

    /// Runs `compensate`.
    pub async fn compensate(
        &self,
        digest: &str,
        plugin: &str,
        info: &CallInfo,
        input: &str,
        output: &str,
        timeout: Duration,
    ) -> CallOutcome<String> {
        let out = self.call(digest, plugin, info, timeout, Export::Compensate { input, output }).await;
        let result = out.result.and_then(|r| match r {
            Returned::Compensated(o) => Ok(o),
            Returned::Executed(_) => Err(CallError::Trap("internal: execute result from a compensate call".into())),
        });
        CallOutcome { result, writes: out.writes, elapsed: out.elapsed }
    }

    /// One call in a fresh store: instantiate, call the export, classify the result, and keep
    /// the state writes only if the call succeeded and its output passed the checks.
    async fn call(
        &self,
        digest: &str,
        plugin: &str,
        info: &CallInfo,
        timeout: Duration,
        export: Export<'_>,
    ) -> CallOutcome<Returned> {
        let started = Instant::now();
        let Some(pre) = self.pre(digest) else {
            return not_loaded(digest, started);
        };
        let (mut store, stderr) = self.new_store(plugin, info, timeout);
        let ctx = wit_context(info);
        let call = async {
            let step = pre.instantiate_async(&mut store).await?;
            match export {
                Export::Execute { input } => {
                    Ok(step.call_execute(&mut store, &ctx, input).await?.map(Returned::Executed))
                }
                Export::Compensate { input, output } => {
                    Ok(step.call_compensate(&mut store, &ctx, input, output).await?.map(Returned::Compensated))
                }
            }
        };
        let result = match tokio::time::timeout(timeout + HOST_GRACE, call).await {
            Ok(Ok(Ok(Returned::Executed(bindings::StepOutcome::Done(out))))) => {
                self.check_output(out).map(|o| Returned::Executed(bindings::StepOutcome::Done(o)))
            }
            Ok(Ok(Ok(Returned::Compensated(out)))) => self.check_output(out).map(Returned::Compensated),
            // A wait for nothing would park the step until its deadline, or forever: a broken
            // contract, failed like a trap so the retry policy bounds it.
            Ok(Ok(Ok(Returned::Executed(bindings::StepOutcome::Wait(w)))))
                if w.delay_ms.is_none() && w.signal.is_none() =>
            {
                Err(CallError::Trap("wait needs a delay-ms or a signal; the plugin gave neither".to_owned()))
            }
            Ok(Ok(Ok(waiting))) => Ok(waiting),
            Ok(Ok(Err(e))) => Err(step_error(e)),
            Ok(Err(trap)) => Err(classify_trap(&trap, &store, &stderr, timeout)),
            Err(_) => Err(CallError::Trap(format!("timed out after {} ms", timeout.as_millis()))),
        };
        finish(store, result, started)
    }

    /// Output must be JSON and within the size limit: later steps and the API rely on both.
    fn check_output(&self, out: String) -> Result<String, CallError> {
        if out.len() > self.limits.output_bytes {
            return Err(CallError::Trap(format!(
                "output of {} bytes exceeds the limit of {} bytes",
                out.len(),
                self.limits.output_bytes
            )));
        }
        if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&out) {
            return Err(CallError::Trap(format!("output is not valid JSON: {e}")));
        }
        Ok(out)
    }
}

/// Which export a call runs, with its arguments.
enum Export<'a> {
    Execute { input: &'a str },
    Compensate { input: &'a str, output: &'a str },
}

/// What an export returned, before it is mapped to the public result types.
enum Returned {
    Executed(bindings::StepOutcome),
    Compensated(String),
}

/// Extra wall-clock time beyond a call's timeout before the host abandons the future. Epoch
/// interruption stops wasm code; this guards against a host import that blocks.
const HOST_GRACE: Duration = Duration::from_secs(1);

fn not_loaded<T>(digest: &str, started: Instant) -> CallOutcome<T> {
    CallOutcome {
        result: Err(CallError::Trap(format!("plugin {digest} is not loaded on this host"))),
        writes: Vec::new(),
        elapsed: started.elapsed(),
    }
}

fn finish<T>(store: Store<CallState>, result: Result<T, CallError>, started: Instant) -> CallOutcome<T> {
    let state = store.into_data();
    if state.logs_dropped > 0 {
        tracing::warn!(saga_id = %state.saga_id, step = %state.step, plugin = %state.plugin, dropped = state.logs_dropped, "plugin log lines dropped over the per-call limit");
    }
    let result = match state.host_error {
        Some(e) => Err(CallError::Unavailable(e)),
        None => result,
    };
    let writes = if result.is_ok() { state.writes.into_iter().collect() } else { Vec::new() };
    CallOutcome { result, writes, elapsed: started.elapsed() }
}

fn wit_context(info: &CallInfo) -> bindings::CallContext {
    bindings::CallContext {
        saga_id: info.saga_id.clone(),
        saga_type: info.saga_type.clone(),
        step: info.step.clone(),
        attempt: info.attempt,
        idempotency_key: info.idempotency_key.clone(),
        signal: info.signal.clone(),
    }
}

fn step_error(e: bindings::StepError) -> CallError {
    match e {
        bindings::StepError::Retryable(m) => CallError::Retryable(truncate(m, 1024)),
        bindings::StepError::Rejected(m) => CallError::Rejected(truncate(m, 1024)),
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// Turns a wasmtime error into a message an operator can act on.
fn classify_trap(
    err: &wasmtime::Error,
    store: &Store<CallState>,
    stderr: &MemoryOutputPipe,
    timeout: Duration,
) -> CallError {
    let state = store.data();
    if state.timed_out || matches!(err.downcast_ref::<wasmtime::Trap>(), Some(wasmtime::Trap::Interrupt)) {
        return CallError::Trap(format!("timed out after {} ms", timeout.as_millis()));
    }
    let mut msg = match err.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::UnreachableCodeReached) => "plugin panicked (wasm trap: unreachable)".to_owned(),
        Some(wasmtime::Trap::StackOverflow) => "plugin overflowed its stack".to_owned(),
        // Rust keeps its stack in linear memory: unbounded recursion usually ends here, as an
        // out-of-bounds access below the bottom of memory, before the native stack overflows.
        Some(trap) => trap.to_string(),
        None => format!("{err:#}"),
    };
    let root = format!("{:#}", err);
    if root.contains("forcing trap when growing memory") {
        msg = format!("plugin exceeded its memory limit of {} bytes", state.limits.memory_bytes);
    }
    let panic = String::from_utf8_lossy(&stderr.contents()).trim().to_owned();
    if !panic.is_empty() {
        msg = format!("{msg}: {}", truncate(panic, 512));
    }
    CallError::Trap(msg)
}

/// The data of one call's `Store`.
struct CallState {
    wasi: WasiCtx,
    table: ResourceTable,
    store_limits: StoreLimits,
    limits: Limits,
    plugin: String,
    saga_id: String,
    step: String,
    reader: Arc<dyn StateReader>,
    /// Buffered writes: `None` is a delete. A BTreeMap so the commit order is deterministic.
    writes: BTreeMap<String, Option<Vec<u8>>>,
    write_bytes: usize,
    log_lines: u32,
    logs_dropped: u32,
    deadline: Instant,
    timed_out: bool,
    /// Set when a host import failed for the host's own reasons (the database): the call's
    /// result is then [`CallError::Unavailable`] whatever the plugin did with the trap.
    host_error: Option<String>,
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl bindings::sagahost::plugin::types::Host for CallState {}

impl CallState {
    fn charge_write(&mut self, bytes: usize) -> wasmtime::Result<()> {
        self.write_bytes = self.write_bytes.saturating_add(bytes);
        if self.write_bytes > self.limits.state_write_bytes {
            return Err(wasmtime::format_err!(
                "plugin wrote more than {} bytes of state in one call",
                self.limits.state_write_bytes
            ));
        }
        Ok(())
    }
}

impl wit_state::Host for CallState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        if let Some(buffered) = self.writes.get(&key) {
            return Ok(buffered.clone());
        }
        let remaining = self.deadline.saturating_duration_since(Instant::now()) + HOST_GRACE;
        match tokio::time::timeout(remaining, self.reader.get(&self.plugin, &key)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.host_error = Some(format!("state read failed: {e:#}"));
                Err(wasmtime::format_err!("state read failed: {e:#}"))
            }
            Err(_) => {
                self.timed_out = true;
                Err(wasmtime::format_err!("state read timed out"))
            }
        }
    }

    async fn set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<()> {
        self.charge_write(key.len() + value.len())?;
        self.writes.insert(key, Some(value));
        Ok(())
    }

    async fn delete(&mut self, key: String) -> wasmtime::Result<()> {
        self.charge_write(key.len())?;
        self.writes.insert(key, None);
        Ok(())
    }
}

impl wit_log::Host for CallState {
    async fn log(&mut self, level: wit_log::Level, message: String) -> wasmtime::Result<()> {
        if self.log_lines >= self.limits.log_lines {
            self.logs_dropped = self.logs_dropped.saturating_add(1);
            return Ok(());
        }
        self.log_lines += 1;
        let message = truncate(message, self.limits.log_line_bytes);
        let (saga_id, step, plugin) = (&self.saga_id, &self.step, &self.plugin);
        match level {
            wit_log::Level::Trace => {
                tracing::trace!(target: "plugin", %saga_id, %step, %plugin, "{message}")
            }
            wit_log::Level::Debug => {
                tracing::debug!(target: "plugin", %saga_id, %step, %plugin, "{message}")
            }
            wit_log::Level::Info => {
                tracing::info!(target: "plugin", %saga_id, %step, %plugin, "{message}")
            }
            wit_log::Level::Warn => {
                tracing::warn!(target: "plugin", %saga_id, %step, %plugin, "{message}")
            }
            wit_log::Level::Error => {
                tracing::error!(target: "plugin", %saga_id, %step, %plugin, "{message}")
            }
        }
        Ok(())
    }
}
