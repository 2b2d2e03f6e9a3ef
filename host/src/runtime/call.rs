//! One plugin call: a fresh store with its limits and deadline, the export run through the
//! world's [`Prepared`] component, and the answer checked and classified into the engine's
//! outcome types.
//!
//! Every call gets a fresh `Store` and a fresh instance, so a trap (which leaves an instance
//! unusable) costs only that attempt. The instance takes a slot of the engine's pool
//! (`engine.rs`): instantiation costs microseconds, and a released slot is reset to the
//! component's initial memory image, so nothing of one call is visible to the next. A call
//! holds one of the runtime's slot permits while its store lives, so the pool cannot run out;
//! a call that finds them all taken waits at most its timeout and then ends `Unavailable`
//! (the host is overloaded: no attempt is counted). Limits per call:
//! - time: epoch interruption. The engine's epoch advances every [`EPOCH_TICK`]; the store's
//!   deadline callback yields to tokio on every tick (so a busy plugin never starves other
//!   tasks) and interrupts the call once its [`Deadline`] passed. Time blocked in the host's
//!   state reads is credited back (up to the timeout once more), and a read slower than the
//!   whole timeout is the host's failure, not the plugin's.
//! - memory: a [`MemoryBudget`] for the whole call: every linear memory and table of the
//!   store counts against one limit (a component may hold several core instances, each with
//!   its own memory), and growing past it traps.
//! - output: checked here; state writes and log lines: checked in `host.rs`, as they cross.
//!
//! This module must not name a world version's generated types: it sees components only
//! through [`Prepared`].
//!
//! [`EPOCH_TICK`]: super::EPOCH_TICK

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::{ResourceTable, ResourceTableError};
use wasmtime::{Engine, PoolConcurrencyLimitError, ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::cpu::Timed;
use super::engine::PER_CALL;
use super::host::HostState;
use super::outbound::{Notes, Outbound};
use super::spare::Spares;
use super::stderr::StderrHead;
use super::wit::{Answer, Export, Prepared};
use super::{CallInfo, CallOutcome, Limits, Phases, PluginReader, Recorded, Unavailable};
use crate::engine::{CompensateOutcome, ExecuteOutcome};

/// Extra wall-clock time beyond a call's deadline before the host abandons the future. Epoch
/// interruption stops wasm code; this guards against a host import that blocks.
const HOST_GRACE: Duration = Duration::from_secs(1);

/// Longest message of a failed call that is kept: it becomes the step's public `last_error`.
const MAX_ERROR_BYTES: usize = 1024;

/// Longest part of a plugin's stderr kept in a trap's message.
const MAX_STDERR_BYTES: usize = 512;

/// When a call's time is up: its start plus its timeout, plus the time its state reads were
/// credited back (see `host::get`). Shared by the store's epoch callback, the state reads and
/// the guard in [`attempt`].
pub(super) struct Deadline {
    start: Instant,
    /// Nanoseconds after `start`. A timeout is at most an hour, far below `u64::MAX` ns.
    after: AtomicU64,
    /// The timeout the call was given, which no credit extends.
    timeout: Duration,
}

impl Deadline {
    fn new(timeout: Duration) -> Arc<Deadline> {
        Arc::new(Deadline { start: Instant::now(), after: AtomicU64::new(nanos(timeout)), timeout })
    }

    pub(super) fn at(&self) -> Instant {
        self.start + Duration::from_nanos(self.after.load(Ordering::Relaxed))
    }

    /// The last instant the call may have a request out: its start plus its timeout, never
    /// credited. The driver recorded the attempt as possibly in flight until its timeout plus
    /// a grace, and compensates from then on: a request sent later (time credited for slow
    /// state reads) could land after the undo it must precede.
    pub(super) fn outbound_until(&self) -> Instant {
        self.start + self.timeout
    }

    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether state reads were slow enough that time was credited back to the plugin: the
    /// database is slow (or the host busy) in this call.
    pub(super) fn credited(&self) -> bool {
        self.at() > self.outbound_until()
    }

    pub(super) fn extend(&self, by: Duration) {
        self.after.fetch_add(nanos(by), Ordering::Relaxed);
    }

    pub(super) fn shorten(&self, by: Duration) {
        self.after.fetch_sub(nanos(by), Ordering::Relaxed);
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The data of one call's `Store`.
pub(super) struct CallState {
    /// Built on the first WASI call the plugin makes ([`WasiView::ctx`]): most calls make none,
    /// and building one (two random-number generators seeded from the thread's, clocks, the
    /// standard streams) was a measurable part of a call, most of all after an idle pause.
    wasi: Option<WasiCtx>,
    /// The plugin's stderr, its head kept to explain a trap; the WASI context writes to a
    /// clone of it.
    stderr: StderrHead,
    http: WasiHttpCtx,
    pub(super) outbound: Outbound,
    table: ResourceTable,
    memory: MemoryBudget,
    pub(super) host: HostState,
    /// When the component was instantiated, set by the world's [`Prepared`] call: it splits
    /// a call's time into [`Phases`].
    pub(super) instantiated: Option<Instant>,
    /// The store holds a spare being instantiated ahead of any call (`spare.rs`): the
    /// `sagahost:plugin` imports trap, and a WASI or HTTP import marks it `touched`.
    pub(super) ahead: bool,
    /// Set when a WASI or wasi:http import was reached while `ahead`: the spare is thrown
    /// away.
    pub(super) touched: bool,
}

#[cfg(test)]
impl CallState {
    /// Whether the call has built its WASI context (made a WASI call).
    pub(super) fn made_a_wasi_call(&self) -> bool {
        self.wasi.is_some()
    }

    /// Whether the plugin wrote to its stderr (a panic message, say).
    pub(super) fn wrote_to_stderr(&self) -> bool {
        !self.stderr.contents().is_empty()
    }
}

/// The most random bytes one `wasi:random` call may ask for (wasi's default is 64 MiB): the
/// host makes them in its own memory, outside the call's memory limit, before they are copied
/// in. A key or a seed is tens of bytes; a plugin asking for more traps, naming the limit.
pub(super) const MAX_RANDOM_BYTES: u64 = 64 << 10;

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        self.touched |= self.ahead;
        let stderr = &self.stderr;
        let ctx = self.wasi.get_or_insert_with(|| {
            WasiCtxBuilder::new().stderr(stderr.clone()).max_random_size(MAX_RANDOM_BYTES).build()
        });
        WasiCtxView { ctx, table: &mut self.table }
    }
}

impl WasiHttpView for CallState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        self.touched |= self.ahead;
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.outbound }
    }
}

/// The interface of wasi:http's outgoing requests, as `wasmtime_wasi_http` links it.
const HTTP_TYPES: &str = "wasi:http/types@0.2.12";

/// Redefines wasi:http's `set-method` and `set-authority` of an outgoing request so that a
/// value over [`MAX_REQUEST_PART_BYTES`] is refused (as an invalid one is) before anything
/// keeps it. `wasmtime_wasi_http` checks their syntax only, and keeps them whole in host
/// memory outside the call's memory limit for as long as the plugin keeps the request: a
/// method or an authority of tens of MiB on each of a call's hundreds of unsent requests held
/// gigabytes. The path is bounded by its parser (64 KiB), headers by [`FIELDS_BYTES`].
///
/// [`FIELDS_BYTES`]: super::outbound::FIELDS_BYTES
pub(super) fn bound_request_parts(linker: &mut wasmtime::component::Linker<CallState>) -> wasmtime::Result<()> {
    use wasmtime::component::Resource;
    use wasmtime_wasi_http::p2::bindings::http::types::{HostOutgoingRequest as Requests, Method};
    use wasmtime_wasi_http::p2::types::HostOutgoingRequest;
    linker.allow_shadowing(true);
    let mut types = linker.instance(HTTP_TYPES)?;
    types.func_wrap(
        "[method]outgoing-request.set-method",
        |mut store, (request, method): (Resource<HostOutgoingRequest>, Method)| {
            let state: &mut CallState = store.data_mut();
            if let Method::Other(other) = &method {
                if other.len() > MAX_REQUEST_PART_BYTES {
                    state.outbound.refused_part("method", other.len());
                    return Ok((Err(()),));
                }
            }
            Ok((Requests::set_method(&mut state.http(), request, method)?,))
        },
    )?;
    types.func_wrap(
        "[method]outgoing-request.set-authority",
        |mut store, (request, authority): (Resource<HostOutgoingRequest>, Option<String>)| {
            let state: &mut CallState = store.data_mut();
            if let Some(long) = authority.as_ref().filter(|a| a.len() > MAX_REQUEST_PART_BYTES) {
                state.outbound.refused_part("authority", long.len());
                return Ok((Err(()),));
            }
            Ok((Requests::set_authority(&mut state.http(), request, authority)?,))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// The longest method or authority a plugin may set on a request ([`bound_request_parts`]).
pub const MAX_REQUEST_PART_BYTES: usize = 8 << 10;

/// One call to make: what it needs from the runtime, and what it calls.
pub(super) struct Call<'a> {
    pub(super) engine: &'a Engine,
    /// The permits for the engine's sandbox slots.
    pub(super) slots: &'a Arc<Semaphore>,
    /// Instances made ahead of calls, when the runtime keeps them.
    pub(super) spares: Option<&'a Arc<Spares>>,
    /// Told how long the call's sandbox took to give back ([`release`]).
    pub(super) released: Option<&'a super::ReleaseObserver>,
    pub(super) reader: &'a Arc<dyn PluginReader>,
    pub(super) limits: &'a Limits,
    /// The component, if it is loaded.
    pub(super) ready: Option<Arc<dyn Prepared>>,
    /// Its state reads are checked at the commit, and may be answered from memory (it imports
    /// no outbound HTTP).
    pub(super) guess: bool,
    pub(super) digest: &'a str,
    /// Whose state space the call reads and writes.
    pub(super) plugin: &'a str,
    pub(super) info: &'a CallInfo,
    pub(super) timeout: Duration,
    /// Keep the call's log lines and requests ([`super::Recorded`]).
    pub(super) record: bool,
    /// Measure the call's processor time ([`Phases::cpu`]).
    pub(super) measure_cpu: bool,
}

/// How a call ended, before it is shaped into an engine outcome.
enum Ended {
    Answered(Answer),
    /// Trapped, timed out, ran out of memory or broke a host limit.
    Trapped(String),
}

impl Ended {
    /// A failed call that ran into a host limit on the way says so first: the plugin's own
    /// message ("request failed") rarely names the limit. A successful call is left alone
    /// (the plugin coped).
    fn blame(self, limit: &str) -> Ended {
        match self {
            Ended::Answered(Answer::Retryable(m)) => {
                Ended::Answered(Answer::Retryable(format!("{limit}; the plugin said: {m}")))
            }
            Ended::Answered(Answer::Rejected(m)) => {
                Ended::Answered(Answer::Rejected(format!("{limit}; the plugin said: {m}")))
            }
            Ended::Trapped(m) => Ended::Trapped(format!("{limit}; {m}")),
            answered => answered,
        }
    }
}

/// Runs `execute` and classifies its result.
pub(super) async fn execute(call: Call<'_>, input: &str) -> CallOutcome<ExecuteOutcome> {
    let limits = call.limits.clone();
    run(call, Export::Execute { input }, |ended| match ended {
        Ended::Answered(Answer::Done(out)) => match check_output(&limits, out) {
            Ok(out) => ("done", ExecuteOutcome::Done(out)),
            Err(e) => ("trap", ExecuteOutcome::Trapped(e)),
        },
        // A wait for nothing would park the step until its deadline, or forever: a broken
        // contract, failed like a trap so the retry policy bounds it.
        Ended::Answered(Answer::Wait { delay_ms: None, signal: None }) => {
            ("trap", ExecuteOutcome::Trapped("wait needs a delay-ms or a signal; the plugin gave neither".to_owned()))
        }
        // A wait for a name no signal can have could never end.
        Ended::Answered(Answer::Wait { signal: Some(name), .. }) if !crate::engine::is_signal_name(&name) => (
            "trap",
            ExecuteOutcome::Trapped(
                "a wait's signal name must have 1 to 128 characters and no control characters".to_owned(),
            ),
        ),
        Ended::Answered(Answer::Wait { delay_ms, signal }) => ("wait", ExecuteOutcome::Wait { delay_ms, signal }),
        Ended::Answered(Answer::Retryable(e)) => {
            ("retryable", ExecuteOutcome::Retryable(sanitize(&e, MAX_ERROR_BYTES)))
        }
        Ended::Answered(Answer::Rejected(e)) => ("rejected", ExecuteOutcome::Rejected(sanitize(&e, MAX_ERROR_BYTES))),
        Ended::Trapped(e) => ("trap", ExecuteOutcome::Trapped(e)),
    })
    .await
}

/// Runs `compensate` and classifies its result. Every failure is `Failed`; the label keeps
/// which kind it was.
pub(super) async fn compensate(call: Call<'_>, input: &str, output: &str) -> CallOutcome<CompensateOutcome> {
    let limits = call.limits.clone();
    run(call, Export::Compensate { input, output }, |ended| match ended {
        Ended::Answered(Answer::Done(out)) => match check_output(&limits, out) {
            Ok(out) => ("done", CompensateOutcome::Done(out)),
            Err(e) => ("trap", CompensateOutcome::Failed(e)),
        },
        Ended::Answered(Answer::Wait { .. }) => {
            ("trap", CompensateOutcome::Failed("internal: execute result from a compensate call".to_owned()))
        }
        Ended::Answered(Answer::Retryable(e)) => {
            ("retryable", CompensateOutcome::Failed(sanitize(&e, MAX_ERROR_BYTES)))
        }
        Ended::Answered(Answer::Rejected(e)) => ("rejected", CompensateOutcome::Failed(sanitize(&e, MAX_ERROR_BYTES))),
        Ended::Trapped(e) => ("trap", CompensateOutcome::Failed(e)),
    })
    .await
}

/// One call ([`attempt`]), its processor time measured into [`Phases::cpu`] if the runtime
/// asked for it.
async fn run<T>(
    call: Call<'_>,
    export: Export<'_>,
    classify: impl FnOnce(Ended) -> (&'static str, T),
) -> CallOutcome<T> {
    if !call.measure_cpu || !super::cpu::AVAILABLE {
        return attempt(call, export, classify).await;
    }
    let mut cpu = Duration::ZERO;
    let running = attempt(call, export, classify);
    tokio::pin!(running);
    let mut outcome = Timed::new(running, &mut cpu).await;
    outcome.phases.cpu = Some(cpu);
    outcome
}

/// One call in a fresh store: instantiate, call the export, classify the result with
/// `classify`, and keep the state writes only if the call succeeded (label `done` or `wait`).
async fn attempt<T>(
    call: Call<'_>,
    export: Export<'_>,
    classify: impl FnOnce(Ended) -> (&'static str, T),
) -> CallOutcome<T> {
    let started = Instant::now();
    let (info, timeout, digest) = (call.info, call.timeout, call.digest);
    // Not the plugin's doing: the catalog could not load it here (yet).
    let Some(ready) = call.ready.clone() else {
        return unavailable(format!("plugin {digest} is not loaded on this host"), started);
    };
    // A slot in the engine's pool, held until the store is dropped. All busy: wait, but no
    // longer than the call's own timeout; past it the host is overloaded, which is no attempt.
    let slot = match Arc::clone(call.slots).try_acquire_owned() {
        Ok(slot) => slot,
        Err(_) => match tokio::time::timeout(timeout, Arc::clone(call.slots).acquire_owned()).await {
            Ok(Ok(slot)) => slot,
            _ => {
                return unavailable(
                    format!(
                        "all {} sandbox slots stayed busy for {} ms; run fewer calls at once \
                         (--max-concurrent-sagas) or give the runtime more slots (Limits::concurrent_calls)",
                        call.limits.concurrent_calls,
                        timeout.as_millis()
                    ),
                    started,
                )
            }
        },
    };
    let spare = call.spares.and_then(|spares| spares.take(&ready));
    // Taken, missed, or none kept of this component.
    let took_spare = call
        .spares
        .filter(|_| spare.is_some() || !ready.no_spares().load(std::sync::atomic::Ordering::Relaxed))
        .map(|_| spare.is_some());
    if let Some(spares) = call.spares {
        spares.refill(&ready, spare.is_some());
    }
    let (mut store, live, slot) = match spare {
        Some(spare) => {
            let (mut store, live, permit) = spare.into_parts();
            fit(&mut store, &call);
            (store, Some(live), Permits { call: slot, spare: Some(permit) })
        }
        None => (new_store(&call), None, Permits { call: slot, spare: None }),
    };
    let built = Instant::now();
    let deadline = Arc::clone(&store.data().host.deadline);
    let answer = {
        let running = match &live {
            Some(live) => {
                store.data_mut().instantiated = Some(built);
                live.call(&mut store, info, export)
            }
            None => ready.call(&mut store, info, export),
        };
        tokio::pin!(running);
        // The deadline moves while state reads are credited back, so the guard re-arms until
        // the call ends or the deadline (plus grace) has really passed.
        loop {
            tokio::select! {
                answer = &mut running => break Some(answer),
                () = tokio::time::sleep_until((deadline.at() + HOST_GRACE).into()) => {
                    if Instant::now() >= deadline.at() + HOST_GRACE {
                        break None;
                    }
                }
            }
        }
    };
    let returned = Instant::now();
    drop(live);
    let ended = match answer {
        Some(Ok(answer)) => Ended::Answered(answer),
        // The permits make this unreachable; should wasmtime count otherwise, it is still
        // the host's shortage, not the plugin's failure.
        Some(Err(e)) if e.downcast_ref::<PoolConcurrencyLimitError>().is_some() => {
            release(store, slot, call.released.cloned());
            return unavailable(format!("no sandbox slot was free: {e:#}"), started);
        }
        Some(Err(trap)) => Ended::Trapped(classify_trap(&trap, &store, timeout)),
        None => Ended::Trapped(format!("timed out after {} ms", timeout.as_millis())),
    };
    let Notes { limit, host_error, reached_out, .. } = store.data().outbound.notes();
    let ended = match limit {
        Some(limit) => ended.blame(&limit),
        None => ended,
    };
    let instantiated = store.data().instantiated;
    let peak_memory_bytes = store.data().memory.used;
    let recorded_requests = store.data().outbound.requests();
    let made = store.data().outbound.made();
    let state = &mut store.data_mut().host;
    if let Some(e) = host_error {
        release(store, slot, call.released.cloned());
        return CallOutcome { requests: made, ..unavailable(e, started) };
    }
    if state.logs_dropped > 0 {
        tracing::warn!(saga_id = %state.saga_id, step = %state.step, plugin = %state.plugin, dropped = state.logs_dropped, "plugin log lines dropped over the per-call limit");
    }
    if let Some(e) = state.host_error.take() {
        release(store, slot, call.released.cloned());
        return CallOutcome { requests: made, ..unavailable(e, started) };
    }
    let recorded = Recorded {
        logs: state.recorded_logs.take().unwrap_or_default(),
        logs_dropped: state.logs_dropped,
        requests: recorded_requests,
    };
    let (label, outcome) = classify(ended);
    let writes = std::mem::take(&mut state.writes);
    let writes = if matches!(label, "done" | "wait") { writes.into_iter().collect() } else { Vec::new() };
    let checks = std::mem::take(&mut state.checks).into_iter().collect();
    let ended = Instant::now();
    release(store, slot, call.released.cloned());
    let phases = Phases { spare: took_spare, ..Phases::split(started, built, instantiated, returned, ended) };
    CallOutcome {
        result: Ok(outcome),
        writes,
        checks,
        elapsed: ended - started,
        label,
        reached_out,
        phases,
        peak_memory_bytes,
        recorded,
        requests: made,
    }
}

/// The permits a call's sandbox holds until it is given back: the call's own (the runtime's
/// bound on calls at once), and the spare's when the call was handed an instance made ahead.
struct Permits {
    call: OwnedSemaphorePermit,
    spare: Option<OwnedSemaphorePermit>,
}

/// Gives a call's sandbox back to the pool once the call has answered, off the saga's path.
/// Dropping the store drops its instances, and the pool resets each memory to its module's
/// initial image (finding the pages the call wrote takes a system call, then they are copied
/// back or zeroed: a fifth of a demo plugin's call, measured). Nothing of the call's result
/// waits for that: a task does it, which tokio runs next on this worker thread once the
/// caller yields, mostly to wait for its commit (which takes far longer). The slot's permit
/// goes with the store, so no call is handed the slot before it is clean; a call that finds
/// every permit held waits, which yields to these tasks. Every call that got a store ends
/// here, whatever its outcome. A call made in a spare (`spare.rs`) also gives back the spare's
/// slot, with the same store.
fn release(store: Store<CallState>, slot: Permits, observe: Option<super::ReleaseObserver>) {
    tokio::spawn(async move {
        let started = Instant::now();
        let Permits { call, spare } = slot;
        drop(store);
        drop(call);
        drop(spare);
        if let Some(observe) = observe {
            observe(started.elapsed());
        }
    });
}

impl Phases {
    /// The phases between the marks of a call. A call that failed to instantiate has no
    /// `instantiated` mark: all its time until the answer counts as instantiation.
    fn split(
        started: Instant,
        built: Instant,
        instantiated: Option<Instant>,
        returned: Instant,
        ended: Instant,
    ) -> Phases {
        let instantiated = instantiated.unwrap_or(returned);
        Phases {
            setup: built - started,
            instantiate: instantiated - built,
            run: returned - instantiated,
            collect: ended - returned,
            cpu: None,
            spare: None,
        }
    }
}

/// The host's own failure: no outcome, no writes, and no attempt counted.
fn unavailable<T>(why: String, started: Instant) -> CallOutcome<T> {
    CallOutcome {
        result: Err(Unavailable(why)),
        writes: Vec::new(),
        checks: Vec::new(),
        elapsed: started.elapsed(),
        label: "unavailable",
        reached_out: false,
        phases: Phases::default(),
        peak_memory_bytes: 0,
        recorded: Recorded::default(),
        requests: Vec::new(),
    }
}

pub(super) fn new_store(call: &Call<'_>) -> Store<CallState> {
    let (host, outbound) = call_parts(call);
    store_with(call.engine, call.limits, host, outbound, false)
}

/// A store for a spare instance (`spare.rs`): no call's context yet, and `ahead`, so an import
/// made while it is instantiated traps or marks it. [`fit`] makes it a call's.
pub(super) fn spare_store(engine: &Engine, limits: &Limits, reader: &Arc<dyn PluginReader>) -> Store<CallState> {
    let nobody = CallInfo {
        saga_id: String::new(),
        saga_type: String::new(),
        step: String::new(),
        attempt: 0,
        idempotency_key: String::new(),
        signal: None,
        signal_name: None,
    };
    let deadline = Deadline::new(SPARE_TIMEOUT);
    let host =
        HostState::new("", "", "", Arc::clone(reader), false, limits.clone(), Arc::clone(&deadline), SPARE_TIMEOUT);
    let outbound = Outbound::new("", &nobody, Arc::clone(reader), limits.http.clone(), deadline, false);
    store_with(engine, limits, host, outbound, true)
}

/// How long an instantiation ahead of a call may run guest code (a start function) before it
/// is interrupted and the spare thrown away.
const SPARE_TIMEOUT: Duration = Duration::from_secs(1);

/// Makes a spare's store the call's: its context, deadline, limits on requests and records,
/// and a fresh epoch deadline (the spare's was set when it was made, and has passed).
fn fit(store: &mut Store<CallState>, call: &Call<'_>) {
    let (host, outbound) = call_parts(call);
    let state = store.data_mut();
    state.host = host;
    state.outbound = outbound;
    state.ahead = false;
    store.set_epoch_deadline(1);
}

/// What a store holds of one call: the imports' state and the outbound requests' context.
fn call_parts(call: &Call<'_>) -> (HostState, Outbound) {
    let mut host = HostState::new(
        call.plugin,
        &call.info.saga_id,
        &call.info.step,
        Arc::clone(call.reader),
        call.guess,
        call.limits.clone(),
        Deadline::new(call.timeout),
        call.timeout,
    );
    host.recorded_logs = call.record.then(Vec::new);
    let outbound = Outbound::new(
        call.plugin,
        call.info,
        Arc::clone(call.reader),
        call.limits.http.clone(),
        Arc::clone(&host.deadline),
        call.record,
    );
    (host, outbound)
}

fn store_with(engine: &Engine, limits: &Limits, host: HostState, outbound: Outbound, ahead: bool) -> Store<CallState> {
    // Rust panics print to stderr; we keep the first few KiB to explain the trap.
    let stderr = StderrHead::new(4 << 10);
    let memory = MemoryBudget { limit: limits.memory_bytes, used: 0, exceeded: false };
    let mut http = WasiHttpCtx::new();
    http.set_field_size_limit(super::outbound::FIELDS_BYTES);
    let mut table = ResourceTable::new();
    table.set_max_capacity(limits.http.max_resources());
    let state = CallState {
        wasi: None,
        stderr,
        http,
        outbound,
        table,
        memory,
        host,
        instantiated: None,
        ahead,
        touched: false,
    };
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.memory);
    store.set_epoch_deadline(1);
    let mut ticks = 0u32;
    store.epoch_deadline_callback(move |ctx| {
        if Instant::now() >= ctx.data().host.deadline.at() {
            return Ok(UpdateDeadline::Interrupt);
        }
        ticks = ticks.saturating_add(1);
        if ticks == 1 {
            // A call of tens of microseconds that happens to meet a tick: wasmtime's own yield,
            // which wakes the task at once and resumes it next. Deferring it behind every
            // ready task (below) would keep its sandbox slot for milliseconds under load.
            Ok(UpdateDeadline::Yield(1))
        } else {
            // A call that computes for ticks on end: tokio's `yield_now`, which resumes it
            // only after the scheduler has polled its I/O and timer driver. Woken at once on
            // every tick, it ran ahead of the driver for a whole event interval (61 ticks,
            // some 0.6 s of a busy plugin) and held its thread's requests and replies off.
            Ok(UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now())))
        }
    });
    store
}

/// What wasmtime keeps per table element: a pointer.
const TABLE_ELEMENT_BYTES: usize = size_of::<usize>();

/// The memory of one call: every linear memory and table the store creates or grows is
/// charged against one limit, so several memories cannot take several times the limit.
/// (wasmtime's `StoreLimits` caps each memory on its own.)
pub(super) struct MemoryBudget {
    limit: usize,
    /// Bytes of memories and tables granted so far. A failed growth is not given back: it
    /// traps, and the store is dropped.
    used: usize,
    /// Set when a growth was refused for the limit: the trap's message says so.
    exceeded: bool,
}

impl MemoryBudget {
    fn charge(&mut self, bytes: usize) -> wasmtime::Result<bool> {
        let after = self.used.saturating_add(bytes);
        if after > self.limit {
            self.exceeded = true;
            return Err(wasmtime::format_err!(
                "growing the call's memory to {after} bytes would pass its limit of {} bytes",
                self.limit
            ));
        }
        self.used = after;
        Ok(true)
    }
}

// Every refusal is an error rather than `Ok(false)`, so it traps at once (as wasmtime's
// `trap_on_grow_failure` would) instead of leaving the plugin's allocator to fail later.
impl ResourceLimiter for MemoryBudget {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|max| desired > max) {
            return Err(wasmtime::format_err!("growing a memory past its declared maximum"));
        }
        self.charge(desired.saturating_sub(current))
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(error.context("growing a memory failed"))
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > PER_CALL.table_elements || maximum.is_some_and(|max| desired > max) {
            return Err(wasmtime::format_err!(
                "growing a table past {} elements or its declared maximum",
                PER_CALL.table_elements
            ));
        }
        self.charge(desired.saturating_sub(current).saturating_mul(TABLE_ELEMENT_BYTES))
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(error.context("growing a table failed"))
    }

    // What one call may create (`engine::PER_CALL`); the pool refuses more as well.
    fn instances(&self) -> usize {
        PER_CALL.instances as usize
    }

    fn tables(&self) -> usize {
        PER_CALL.tables as usize
    }

    fn memories(&self) -> usize {
        PER_CALL.memories as usize
    }
}

/// Output must be JSON and within the size limit: later steps and the API rely on both.
fn check_output(limits: &Limits, out: String) -> Result<String, String> {
    if out.len() > limits.output_bytes {
        return Err(format!("output of {} bytes exceeds the limit of {} bytes", out.len(), limits.output_bytes));
    }
    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&out) {
        return Err(format!("output is not valid JSON: {e}"));
    }
    Ok(out)
}

/// Text from a plugin made safe for logs and the API (`last_error`): control characters
/// (newlines, escapes, NUL) and characters that reorder or hide text (bidirectional
/// overrides, zero-width marks) become spaces, runs of spaces become one, and the result is
/// cut to at most `max` bytes at a character boundary, ending in `…` when cut. Reads only as
/// much of `s` as it keeps.
pub(super) fn sanitize(s: &str, max: usize) -> String {
    const ELLIPSIS: char = '…';
    let mut out = String::with_capacity(s.len().min(max.saturating_add(4)));
    let mut space = false;
    for c in s.chars() {
        if crate::text::hides_or_reorders(c) || c.is_whitespace() {
            space = true;
            continue;
        }
        if space && !out.is_empty() {
            out.push(' ');
        }
        space = false;
        out.push(c);
        if out.len() > max {
            let mut end = max.saturating_sub(ELLIPSIS.len_utf8());
            while !out.is_char_boundary(end) {
                end -= 1;
            }
            out.truncate(end);
            out.push(ELLIPSIS);
            return out;
        }
    }
    out
}

/// Turns a wasmtime error into a message an operator can act on. It becomes the step's public
/// `last_error`, and parts of it (stderr, symbol names in a backtrace) are the plugin's text,
/// so it is sanitised and bounded.
fn classify_trap(err: &wasmtime::Error, store: &Store<CallState>, timeout: Duration) -> String {
    let state = store.data();
    if matches!(err.downcast_ref::<wasmtime::Trap>(), Some(wasmtime::Trap::Interrupt)) {
        return format!("timed out after {} ms", timeout.as_millis());
    }
    let mut msg = match err.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::UnreachableCodeReached) => "plugin panicked (wasm trap: unreachable)".to_owned(),
        Some(wasmtime::Trap::StackOverflow) => "plugin overflowed its stack".to_owned(),
        // Rust keeps its stack in linear memory: unbounded recursion usually ends here, as an
        // out-of-bounds access below the bottom of memory, before the native stack overflows.
        Some(trap) => trap.to_string(),
        None if matches!(err.root_cause().downcast_ref::<ResourceTableError>(), Some(ResourceTableError::Full)) => {
            format!(
                "plugin held more than {} host resources at once (HTTP requests, header sets, bodies, streams; \
                 the limit grows with --plugin-http-max-requests)",
                state.table.max_capacity()
            )
        }
        // A host import refused the call (a limit): its own message says why; the context
        // wasmtime wraps around it is a backtrace of function indices.
        None => err.root_cause().to_string(),
    };
    if state.memory.exceeded {
        msg = format!(
            "plugin exceeded its memory limit of {} bytes (all memories and tables of the call together)",
            state.memory.limit
        );
    }
    let panic = String::from_utf8_lossy(&state.stderr.contents()).trim().to_owned();
    if !panic.is_empty() {
        msg = format!("{msg}: {}", sanitize(&panic, MAX_STDERR_BYTES));
    }
    sanitize(&msg, MAX_ERROR_BYTES)
}
