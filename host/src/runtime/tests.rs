//! The runtime against real components: the fixture plugins that `host/build.rs` builds into
//! `plugins/target/wasm32-wasip2/release/`, and a fake [`PluginReader`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use tracing_subscriber::layer::SubscriberExt as _;

use super::*;
use crate::engine::{CompensateOutcome, ExecuteOutcome};
use crate::store::StateRead;

/// Committed state in memory; reads can be made slow or failing.
#[derive(Default)]
struct FakeReader {
    values: Mutex<HashMap<(String, String), Vec<u8>>>,
    /// How long every read blocks.
    delay: Duration,
    fail: bool,
    /// Granted origins by plugin.
    grants: Mutex<HashMap<String, crate::grants::Grants>>,
    /// Whether reading the grants blocks for `delay` too.
    slow_grants: bool,
    /// Answers reads a caller lets it guess as a shared database's memory would: checked.
    guesses: bool,
}

#[async_trait]
impl PluginReader for FakeReader {
    async fn get(&self, plugin: &str, key: &str, guess: bool) -> anyhow::Result<StateRead> {
        tokio::time::sleep(self.delay).await;
        if self.fail {
            anyhow::bail!("connection refused");
        }
        let value = self.values.lock().unwrap().get(&(plugin.to_owned(), key.to_owned())).cloned();
        Ok(StateRead { value, checked: guess && self.guesses })
    }

    async fn scan(
        &self,
        plugin: &str,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        tokio::time::sleep(self.delay).await;
        if self.fail {
            anyhow::bail!("connection refused");
        }
        let mut rows: Vec<(String, Vec<u8>)> = self
            .values
            .lock()
            .unwrap()
            .iter()
            .filter(|((p, k), _)| p == plugin && k.starts_with(prefix) && after.is_none_or(|a| k.as_str() > a))
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect();
        rows.sort();
        rows.truncate(limit as usize);
        // Cut as the store cuts a page: after the row whose value reaches the byte budget.
        let mut before = 0;
        rows.retain(|(_, v)| {
            let keep = before < crate::store::STATE_PAGE_BYTES;
            before += v.len();
            keep
        });
        Ok(rows)
    }

    async fn grants(&self, plugin: &str) -> anyhow::Result<crate::grants::Grants> {
        if self.slow_grants {
            tokio::time::sleep(self.delay).await;
        }
        if self.fail {
            anyhow::bail!("connection refused");
        }
        Ok(self.grants.lock().unwrap().get(plugin).cloned().unwrap_or_default())
    }
}

/// The bytes of a component the host build put in `plugins/target` (a fixture or a demo plugin).
pub(super) fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../plugins/target/wasm32-wasip2/release/{}.wasm",
        env!("CARGO_MANIFEST_DIR"),
        name.replace('-', "_")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {path} missing ({e}); building the host builds it"))
}

/// A runtime with `misbehave` loaded; its digest.
async fn misbehave(limits: Limits, reader: FakeReader) -> (Arc<Runtime>, String) {
    let runtime = Arc::new(Runtime::new(limits, Arc::new(reader)).unwrap());
    let digest = runtime.load(fixture("misbehave")).await.unwrap();
    (runtime, digest)
}

/// One event the runtime logged: its target, message and other fields.
#[derive(Debug, Clone)]
struct Logged {
    target: String,
    message: String,
    fields: HashMap<String, String>,
}

/// Collects the events logged on this thread while its guard lives. The calls of a
/// `#[tokio::test]` run on its one thread, wasm included.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<Logged>>>);

impl Logs {
    fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(logs.clone()));
        (logs, guard)
    }

    fn all(&self) -> Vec<Logged> {
        self.0.lock().unwrap().clone()
    }

    /// The plugin's own log lines.
    fn plugin_lines(&self) -> Vec<Logged> {
        self.0.lock().unwrap().iter().filter(|e| e.target == "plugin").cloned().collect()
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Logs {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Fields(HashMap<String, String>);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.insert(field.name().to_owned(), format!("{value:?}"));
            }
        }
        let mut fields = Fields(HashMap::new());
        event.record(&mut fields);
        let message = fields.0.remove("message").unwrap_or_default();
        let target = event.metadata().target().to_owned();
        self.0.lock().unwrap().push(Logged { target, message, fields: fields.0 });
    }
}

fn info(attempt: u32) -> CallInfo {
    CallInfo {
        saga_id: "saga-1".into(),
        saga_type: "hostile".into(),
        step: "work".into(),
        attempt,
        idempotency_key: "saga-1:work:execute".into(),
        signal: None,
        signal_name: None,
    }
}

/// The `input` that makes `misbehave` behave as `mode`.
fn input(mode: &str) -> String {
    json!({"input": {"customer_id": mode}, "steps": {}}).to_string()
}

const TIMEOUT: Duration = Duration::from_secs(5);

async fn execute(runtime: &Runtime, digest: &str, mode: &str) -> CallOutcome<ExecuteOutcome> {
    runtime.execute(digest, "misbehave", &info(1), &input(mode), TIMEOUT).await
}

fn trapped(out: &CallOutcome<ExecuteOutcome>) -> &str {
    match &out.result {
        Ok(ExecuteOutcome::Trapped(e)) => e,
        other => panic!("expected a trap, got {other:?} (label {})", out.label),
    }
}

#[tokio::test]
async fn a_successful_execute_returns_its_output_and_its_state_writes() {
    let (runtime, digest) = misbehave(Limits::default(), FakeReader::default()).await;
    let out = execute(&runtime, &digest, "fine").await;
    assert_eq!(out.result, Ok(ExecuteOutcome::Done(r#"{"ok":true}"#.into())));
    assert_eq!(out.label, "done");
    assert_eq!(out.writes, vec![("misbehave/saga-1".to_owned(), Some(br#""fine""#.to_vec()))]);
}

#[tokio::test]
async fn business_errors_and_traps_become_the_engines_outcomes() {
    let (runtime, digest) = misbehave(Limits::default(), FakeReader::default()).await;
    let out = execute(&runtime, &digest, "retryable").await;
    assert_eq!(out.result, Ok(ExecuteOutcome::Retryable("fixture says retry".into())));
    assert_eq!(out.label, "retryable");

    let out = execute(&runtime, &digest, "panic").await;
    assert_eq!(out.label, "trap");
    let msg = trapped(&out);
    assert!(msg.starts_with("plugin panicked (wasm trap: unreachable)"), "{msg}");
    assert!(msg.contains("misbehave: panic on attempt 1"), "stderr explains the panic: {msg}");

    let out = execute(&runtime, &digest, "wait-for-nothing").await;
    assert!(trapped(&out).contains("wait needs a delay-ms or a signal"));
    assert!(out.writes.is_empty());

    // A signal name is counted in characters, like the route that delivers it: 100 'é' are
    // 200 bytes and a name a signal can have.
    let name = "é".repeat(100);
    let out = execute(&runtime, &digest, &format!("wait-signal-{name}")).await;
    assert_eq!(out.result, Ok(ExecuteOutcome::Wait { delay_ms: None, signal: Some(name) }), "{:?}", out.label);
    let out = execute(&runtime, &digest, &format!("wait-signal-{}", "x".repeat(129))).await;
    assert!(trapped(&out).contains("a wait's signal name must have 1 to 128 characters"));
}

/// A call builds its WASI context on its first WASI call only: the demo steps make none, and a
/// plugin that panics writes its message to stderr through one (which the trap then quotes).
#[tokio::test]
async fn a_call_builds_its_wasi_context_only_when_the_plugin_makes_a_wasi_call() {
    let runtime = Arc::new(Runtime::new(Limits::default(), Arc::new(FakeReader::default())).unwrap());
    let order = super::bench::input();
    let cases = [
        ("inventory", order.clone(), false),
        ("payment", order.clone(), false),
        ("shipment", order, false),
        ("misbehave", input("fine"), false),
        ("misbehave", input("panic"), true),
    ];
    for (plugin, input, wasi) in cases {
        let digest = runtime.load(fixture(plugin)).await.unwrap();
        let info = info(1);
        let call = runtime.call(&digest, plugin, &info, TIMEOUT);
        let ready = call.ready.clone().expect("the plugin is loaded");
        let mut store = call::new_store(&call);
        let answer = ready.call(&mut store, &info, wit::Export::Execute { input: &input }).await;
        assert_eq!(answer.is_ok(), !wasi, "{plugin} {input}: {answer:?}");
        assert_eq!(store.data().made_a_wasi_call(), wasi, "{plugin} {input}");
        assert_eq!(store.data().wrote_to_stderr(), wasi, "{plugin} {input}");
    }
}

#[tokio::test]
async fn compensation_failures_are_failed_with_a_label_saying_which_kind() {
    let (runtime, digest) = misbehave(Limits::default(), FakeReader::default()).await;
    let call = |mode: &'static str| {
        let runtime = Arc::clone(&runtime);
        let digest = digest.clone();
        async move { runtime.compensate(&digest, "misbehave", &info(1), &input(mode), "{}", TIMEOUT).await }
    };
    let out = call("fine").await;
    assert_eq!(out.result, Ok(CompensateOutcome::Done(r#"{"ok":true}"#.into())));
    assert_eq!(out.label, "done");
    let out = call("compensate-panic").await;
    assert_eq!(out.label, "trap");
    assert!(matches!(&out.result, Ok(CompensateOutcome::Failed(e)) if e.contains("panicked")), "{:?}", out.result);
}

fn unavailable<T: std::fmt::Debug>(out: &CallOutcome<T>) -> &str {
    match &out.result {
        Err(Unavailable(e)) if out.label == "unavailable" && out.writes.is_empty() => e,
        other => panic!("expected the host's failure, got {other:?} (label {})", out.label),
    }
}

#[tokio::test]
async fn a_failing_state_read_is_the_hosts_failure() {
    let reader = FakeReader { fail: true, ..FakeReader::default() };
    let (runtime, digest) = misbehave(Limits::default(), reader).await;
    let out = execute(&runtime, &digest, "read-state").await;
    assert!(unavailable(&out).contains("connection refused"));
}

#[tokio::test]
async fn a_state_read_slower_than_the_timeout_is_the_hosts_failure_not_a_plugin_timeout() {
    // The timeout leaves a loaded machine ample time to reach the read; the read never ends.
    let reader = FakeReader { delay: Duration::from_secs(60), ..FakeReader::default() };
    let (runtime, digest) = misbehave(Limits::default(), reader).await;
    let timeout = Duration::from_secs(2);
    let out = runtime.execute(&digest, "misbehave", &info(1), &input("read-state"), timeout).await;
    assert!(unavailable(&out).contains("state read"), "{:?}", out.result);
}

#[tokio::test]
async fn time_blocked_in_state_reads_is_not_charged_to_the_plugin() {
    // `read-state` reads twice: together longer than the timeout, each well within it. The
    // rest of the call (instantiation, the plugin's code) has about 1.8 s, plenty even for a
    // debug build on a loaded machine.
    let reader = FakeReader { delay: Duration::from_millis(1100), ..FakeReader::default() };
    let (runtime, digest) = misbehave(Limits::default(), reader).await;
    let timeout = Duration::from_secs(2);
    let out = runtime.execute(&digest, "misbehave", &info(1), &input("read-state"), timeout).await;
    assert_eq!(out.result, Ok(ExecuteOutcome::Done(r#"{"ok":true}"#.into())));
}

#[tokio::test]
async fn a_plugin_reading_in_a_loop_still_times_out_as_its_own_failure() {
    // Every read is quick, but the credit for time spent reading is bounded by the timeout.
    let reader = FakeReader { delay: Duration::from_millis(5), ..FakeReader::default() };
    let (runtime, digest) = misbehave(Limits::default(), reader).await;
    let timeout = Duration::from_millis(200);
    let started = std::time::Instant::now();
    let out = runtime.execute(&digest, "misbehave", &info(1), &input("read-loop"), timeout).await;
    assert_eq!(trapped(&out), "timed out after 200 ms");
    // Ends about a timeout of credit plus the timeout itself after it began (0.4 s); the bound
    // leaves a loaded machine a second, and a credit five times the timeout would fail it.
    assert!(started.elapsed() < timeout * 2 + Duration::from_secs(1), "{:?}", started.elapsed());
}

#[tokio::test]
async fn a_plugin_not_loaded_on_this_host_is_the_hosts_failure() {
    let (runtime, _) = misbehave(Limits::default(), FakeReader::default()).await;
    let absent = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    let out = runtime.execute(absent, "misbehave", &info(1), &input("fine"), TIMEOUT).await;
    assert!(unavailable(&out).contains("not loaded"));
    let out = runtime.compensate(absent, "misbehave", &info(1), &input("fine"), "{}", TIMEOUT).await;
    assert!(unavailable(&out).contains("not loaded"));
}

/// A component that instantiates `instances` core instances of a module with one linear
/// memory of `pages` 64 KiB pages, and does nothing else. Written by hand (the component
/// binary format is small at this size) so the test needs no assembler.
fn memories_component(instances: u8, pages: u8) -> Vec<u8> {
    assert!(instances < 128 && pages < 128, "one-byte LEB128 only");
    // A core module: the preamble, then a memory section (id 5) with one memory, min `pages`.
    let mut module = b"\0asm\x01\0\0\0".to_vec();
    module.extend([5, 3, 1, 0, pages]);
    let mut component = b"\0asm\x0d\0\x01\0".to_vec();
    // A core module section (id 1) holding the module.
    component.extend([1, module.len() as u8]);
    component.extend(module);
    // A core instance section (id 2): `instances` times "instantiate module 0 with no args".
    let mut section = vec![instances];
    for _ in 0..instances {
        section.extend([0, 0, 0]);
    }
    component.extend([2, section.len() as u8]);
    component.extend(section);
    component
}

/// Instantiates `wasm` in a store set up exactly as for a plugin call under `limits`.
async fn instantiate(limits: Limits, wasm: &[u8]) -> Result<(), String> {
    let runtime = Runtime::new(limits, Arc::new(FakeReader::default())).unwrap();
    let component = wasmtime::component::Component::new(&runtime.engine, wasm).unwrap();
    let info = info(1);
    let mut store = call::new_store(&runtime.call("sha256:test", "test", &info, TIMEOUT));
    let linker = wasmtime::component::Linker::new(&runtime.engine);
    linker.instantiate_async(&mut store, &component).await.map(drop).map_err(|e| format!("{e:#}"))
}

const PAGE: usize = 64 << 10;

#[tokio::test]
async fn the_memory_limit_holds_for_all_memories_of_a_call_together() {
    // Three memories of four pages: 768 KiB in all, 256 KiB each.
    let wasm = memories_component(3, 4);
    let limits = |memory_bytes| Limits { memory_bytes, ..Limits::default() };
    instantiate(limits(12 * PAGE), &wasm).await.expect("exactly at the limit");
    let err = instantiate(limits(12 * PAGE - 1), &wasm).await.expect_err("one byte under the limit");
    assert!(err.contains("memory"), "{err}");
    // Each memory alone fits the limit; together they do not.
    instantiate(limits(8 * PAGE), &wasm).await.expect_err("two memories' worth for three");
}

#[tokio::test]
async fn a_plugin_that_allocates_without_end_traps_at_the_limit() {
    let limits = Limits { memory_bytes: 8 << 20, ..Limits::default() };
    let (runtime, digest) = misbehave(limits, FakeReader::default()).await;
    let out = execute(&runtime, &digest, "oom").await;
    assert!(trapped(&out).starts_with("plugin exceeded its memory limit of 8388608 bytes"), "{:?}", out.result);
    assert!(out.writes.is_empty());
}

/// No control characters (newlines, escapes, NUL) and no characters that reorder or hide text.
fn assert_clean(text: &str) {
    let bad: Vec<char> = text
        .chars()
        .filter(|c| {
            c.is_control()
                || matches!(c, '\u{61c}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        })
        .collect();
    assert!(bad.is_empty(), "{bad:?} in {text:?}");
}

#[test]
fn sanitised_text_keeps_its_words_on_one_line_within_its_bound() {
    assert_eq!(call::sanitize("  a\r\n\tb\u{1b}[0m \u{202e}c  ", 100), "a b [0m c");
    assert_eq!(call::sanitize("exactly ten", 11), "exactly ten", "not cut at the bound");
    assert_eq!(call::sanitize("exactly ten!", 11), "exactly …");
    let cut = call::sanitize(&"é".repeat(100), 10);
    assert!(cut.len() <= 10 && cut.ends_with('…'), "{cut:?}");
}

#[tokio::test]
async fn a_panic_message_reaches_last_error_sanitised_and_bounded() {
    let (runtime, digest) = misbehave(Limits::default(), FakeReader::default()).await;
    let out = execute(&runtime, &digest, "panic-dirty").await;
    let msg = trapped(&out);
    assert!(msg.starts_with("plugin panicked (wasm trap: unreachable): "), "{msg}");
    assert!(msg.contains("red FAKE LOG LINE"), "the text survives, its control characters do not: {msg}");
    assert_clean(msg);
    assert!(msg.len() <= 1024, "{} bytes", msg.len());
}

#[tokio::test]
async fn a_step_errors_message_is_sanitised_and_bounded() {
    let (runtime, digest) = misbehave(Limits::default(), FakeReader::default()).await;
    let out = execute(&runtime, &digest, "reject-dirty").await;
    let Ok(ExecuteOutcome::Rejected(msg)) = &out.result else { panic!("{:?}", out.result) };
    assert!(msg.contains("red FAKE LOG LINE"), "{msg}");
    assert_clean(msg);
    assert!(msg.len() <= 1024 && msg.ends_with('…'), "{} bytes", msg.len());
}

#[tokio::test]
async fn plugin_log_lines_cannot_forge_lines_or_escapes() {
    let (runtime, digest) = misbehave(Limits::default(), FakeReader::default()).await;
    let (logs, _guard) = Logs::capture();
    let out = execute(&runtime, &digest, "log-dirty").await;
    assert_eq!(out.label, "done");
    let lines = logs.plugin_lines();
    let dirty = lines.iter().find(|l| l.message.contains("FAKE LOG LINE")).unwrap_or_else(|| panic!("{lines:?}"));
    assert_clean(&dirty.message);
    assert_eq!(dirty.fields["saga_id"], "saga-1", "tagged with the call: {dirty:?}");
}

#[tokio::test]
async fn log_lines_over_the_per_call_count_are_dropped_and_counted() {
    let limits = Limits { log_lines: 5, ..Limits::default() };
    let (runtime, digest) = misbehave(limits, FakeReader::default()).await;
    let (logs, _guard) = Logs::capture();
    let out = execute(&runtime, &digest, "log-flood").await;
    assert_eq!(out.result, Ok(ExecuteOutcome::Done(r#"{"ok":true}"#.into())), "dropping lines is no failure");
    let lines = logs.plugin_lines();
    assert_eq!(lines.len(), 5, "{lines:?}");
    assert!(lines[0].message.starts_with("misbehave execute attempt 1"));
    assert_eq!(lines[4].message, "misbehave log-flood line 3");
    // The attempt line plus 100 000 flood lines, less the five kept.
    let dropped = logs.all().into_iter().find(|e| e.message.contains("log lines dropped")).expect("the drop is logged");
    assert_eq!(dropped.fields["dropped"], "99996");
}

#[tokio::test]
async fn a_log_line_is_cut_at_its_limit_and_kept_whole_at_exactly_the_limit() {
    const LINE: usize = 64 << 10;
    for (limit, kept) in [(LINE, LINE), (LINE - 1, LINE - 1), (1000, 1000)] {
        let limits = Limits { log_line_bytes: limit, ..Limits::default() };
        let (runtime, digest) = misbehave(limits, FakeReader::default()).await;
        let (logs, _guard) = Logs::capture();
        assert_eq!(execute(&runtime, &digest, "log-long").await.label, "done");
        let lines = logs.plugin_lines();
        let long = lines.iter().find(|l| l.message.starts_with("yyy")).unwrap_or_else(|| panic!("{lines:?}"));
        assert_eq!(long.message.len(), kept, "limit {limit}");
        assert_eq!(long.message.ends_with('…'), kept < LINE, "limit {limit}");
    }
}

/// Requests built and never sent cost the host memory the call's memory limit does not see
/// (a body's buffered write, a header set): their number is bounded, and a plugin past the
/// bound fails its attempt, naming it. Unbounded, this one call would hold about 2 GiB.
#[tokio::test]
async fn a_plugin_hoarding_unsent_requests_fails_at_the_resource_limit() {
    let (runtime, digest) = misbehave(Limits::default(), FakeReader::default()).await;
    let out = execute(&runtime, &digest, "hoard-bodies").await;
    let max = Limits::default().http.max_resources();
    assert_eq!(
        trapped(&out).split(':').next().unwrap(),
        format!(
            "plugin held more than {max} host resources at once (HTTP requests, header sets, bodies, streams; \
             the limit grows with --plugin-http-max-requests)"
        )
    );
    // A well-behaved call is far below the bound: the next call runs as usual.
    let out = execute(&runtime, &digest, "fine").await;
    assert!(matches!(out.result, Ok(ExecuteOutcome::Done(_))), "{}", out.label);
}

/// A request's method and authority are kept by the host outside the call's memory limit, so
/// a long one is refused as an invalid one is: unbounded, this call would keep 128 MiB (and
/// a plugin with hundreds of requests and strings of tens of MiB, gigabytes). Short ones are
/// taken as before.
#[tokio::test]
async fn a_plugin_setting_megabyte_methods_and_authorities_is_refused_them() {
    let (runtime, digest) = misbehave(Limits::default(), FakeReader::default()).await;
    let out = execute(&runtime, &digest, "hoard-long-parts").await;
    assert_eq!(out.result, Ok(ExecuteOutcome::Done(r#"{"long_taken":0,"short_taken":true}"#.into())), "{}", out.label);
}

/// A compile cannot be stopped: one whose caller went away (an upload past its deadline) runs
/// on holding the compile lock, and keeps its result, so the caller's retry waits for it and
/// finds the version loaded instead of compiling it a second time beside it.
#[tokio::test]
async fn a_compile_whose_caller_went_away_keeps_the_lock_and_its_result() {
    let runtime = Arc::new(Runtime::new(Limits::default(), Arc::new(FakeReader::default())).unwrap());
    let wasm = fixture("misbehave");
    let digest = digest_of(&wasm);
    let lock = Arc::new(tokio::sync::Mutex::new(()));
    let held = Arc::clone(&lock).lock_owned().await;
    let loading = runtime.load_holding(wasm, held);
    // Started, then dropped long before a compile of tens of milliseconds ends.
    assert!(tokio::time::timeout(Duration::from_millis(1), loading).await.is_err());
    assert!(lock.try_lock().is_err(), "the lock went with the caller while the compile ran on");
    let start = std::time::Instant::now();
    while !runtime.is_loaded(&digest) {
        assert!(start.elapsed() < Duration::from_secs(60), "the compile's result was dropped with its caller");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _free = tokio::time::timeout(Duration::from_secs(5), lock.lock()).await.expect("the compile kept the lock");
}

/// A request for the store of a call of plugin `test` (what `runtime.call` names it), to `url`.
fn bare_request(url: &str) -> http::Request<wasmtime_wasi_http::WasiBody> {
    use http_body_util::BodyExt as _;
    let body = http_body_util::Empty::<bytes::Bytes>::new().map_err(|never| match never {}).boxed_unsync();
    http::Request::get(url).body(body).unwrap()
}

/// What metrics count of a call's requests stops at the first one over the call's limit: a
/// plugin sending refused requests in a loop grew the list by one per request, outside its
/// memory limit, for as long as the call ran.
#[tokio::test]
async fn a_plugin_looping_on_refused_requests_does_not_grow_the_calls_tally() {
    use wasmtime_wasi_http::WasiHttpHooks as _;
    let runtime = Runtime::new(Limits::default(), Arc::new(FakeReader::default())).unwrap();
    let info = info(1);
    let mut store = call::new_store(&runtime.call("sha256:test", "test", &info, TIMEOUT));
    let max = Limits::default().http.max_requests as usize;
    for _ in 0..10 * max {
        let fut = Box::new(async { Ok(()) });
        drop(store.data_mut().outbound.send_request(bare_request("http://127.0.0.1:1/x"), None, fut));
    }
    let made = store.data().outbound.made();
    assert_eq!(made.len(), max + 1, "the requests up to the limit, and the first refused one");
}

/// A request a plugin left running when its call returned must not leave the host once the
/// call's outcome (did it reach out?) was read: the step would count as never having reached
/// the service, and a failed one would not be compensated (a charge with no refund).
#[tokio::test]
async fn no_request_leaves_the_host_after_the_call_ended() {
    use wasmtime_wasi_http::WasiHttpHooks as _;
    let service = Service::start(Some("{}".into())).await;
    let reader = FakeReader::default();
    let origin = crate::grants::Origin::parse(&service.origin).unwrap().to_string();
    reader
        .grants
        .lock()
        .unwrap()
        .insert("test".into(), crate::grants::Grants { allowed_hosts: vec![origin], credentials: vec![] });
    let runtime = Runtime::new(Limits::default(), Arc::new(reader)).unwrap();
    let info = info(1);
    let mut store = call::new_store(&runtime.call("sha256:test", "test", &info, TIMEOUT));
    let fut = Box::new(async { Ok(()) });
    let sent = store.data_mut().outbound.send_request(bare_request(&format!("{}/before", service.origin)), None, fut);
    assert!(Box::into_pin(sent).await.is_ok(), "a request during the call goes out");
    assert!(store.data().outbound.notes().reached_out);
    // The call has ended (its notes were read); a request still on its way now:
    let fut = Box::new(async { Ok(()) });
    let late = store.data_mut().outbound.send_request(bare_request(&format!("{}/after", service.origin)), None, fut);
    assert!(Box::into_pin(late).await.is_err(), "a request after the call ended was sent");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let paths: Vec<String> =
        service.requests.lock().unwrap().iter().map(|h| h.split(' ').nth(1).unwrap_or("").to_owned()).collect();
    assert_eq!(paths, ["/before"], "only the request made during the call reached the service");
}

/// Random bytes are made in the host's memory before they are copied into the plugin's: a
/// plugin asking for more than a small bound traps (wasi's own bound, 64 MiB per call of the
/// import, let eight calls of 16 MiB each through, host memory the call's limit never saw).
#[tokio::test]
async fn a_plugin_asking_for_megabytes_of_random_bytes_traps_at_the_hosts_bound() {
    let (runtime, digest) = misbehave(Limits::default(), FakeReader::default()).await;
    let out = execute(&runtime, &digest, "random-flood").await;
    let why = trapped(&out);
    assert!(why.contains(&format!("exceeds limit {}", super::call::MAX_RANDOM_BYTES)), "{why}");
    let out = execute(&runtime, &digest, "fine").await;
    assert!(matches!(out.result, Ok(ExecuteOutcome::Done(_))), "{}", out.label);
}

/// stderr is kept only to explain a trap: a plugin that prints more than is kept (debug
/// prints) goes on; `eprintln!` panics on a stream that refuses a write.
#[tokio::test]
async fn a_plugin_printing_more_to_stderr_than_is_kept_is_not_failed_for_it() {
    let (runtime, digest) = misbehave(Limits::default(), FakeReader::default()).await;
    let out = execute(&runtime, &digest, "stderr-flood").await;
    assert_eq!(out.result, Ok(ExecuteOutcome::Done(r#"{"ok":true}"#.into())), "{}", out.label);
}

/// Thousands of tiny keys stay within the byte limit, but each is a row of the commit that
/// stores the result: their number is bounded too, so no result is one no commit can store.
#[tokio::test]
async fn state_keys_are_checked_at_exactly_their_limit() {
    let (runtime, digest) = misbehave(Limits::default(), FakeReader::default()).await;
    let out = execute(&runtime, &digest, &format!("many-keys-{MAX_STATE_KEYS}")).await;
    assert!(matches!(out.result, Ok(ExecuteOutcome::Done(_))), "{:?}", out.result);
    assert_eq!(out.writes.len(), MAX_STATE_KEYS);
    let out = execute(&runtime, &digest, &format!("many-keys-{}", MAX_STATE_KEYS + 1)).await;
    assert_eq!(
        trapped(&out).split(':').next().unwrap(),
        format!("plugin wrote more than {MAX_STATE_KEYS} state keys in one call (sets and deletes)")
    );
    assert!(out.writes.is_empty());
}

#[tokio::test]
async fn output_is_checked_at_exactly_its_limit() {
    // `huge-output` returns `{"padding":"xxx…"}` with 8 MiB of x.
    const OUTPUT: usize = (8 << 20) + r#"{"padding":""}"#.len();
    let limits = |output_bytes| Limits { output_bytes, ..Limits::default() };
    let (runtime, digest) = misbehave(limits(OUTPUT), FakeReader::default()).await;
    let out = execute(&runtime, &digest, "huge-output").await;
    assert!(matches!(&out.result, Ok(ExecuteOutcome::Done(o)) if o.len() == OUTPUT), "{}", out.label);
    assert_eq!(out.writes.len(), 1);

    let (runtime, digest) = misbehave(limits(OUTPUT - 1), FakeReader::default()).await;
    let out = execute(&runtime, &digest, "huge-output").await;
    assert_eq!(trapped(&out), format!("output of {OUTPUT} bytes exceeds the limit of {} bytes", OUTPUT - 1));
    assert!(out.writes.is_empty(), "the state written before the output was refused is dropped");
}

#[tokio::test]
async fn state_writes_are_checked_at_exactly_their_limit() {
    // `fine` writes `misbehave/saga-1` = `"fine"`: 16 + 6 bytes.
    let limits = |state_write_bytes| Limits { state_write_bytes, ..Limits::default() };
    let (runtime, digest) = misbehave(limits(22), FakeReader::default()).await;
    assert_eq!(execute(&runtime, &digest, "fine").await.writes.len(), 1);
    let (runtime, digest) = misbehave(limits(21), FakeReader::default()).await;
    let out = execute(&runtime, &digest, "fine").await;
    assert_eq!(trapped(&out), "plugin wrote more than 21 bytes of state in one call");
    assert!(out.writes.is_empty());
}

#[tokio::test]
async fn a_failed_attempts_state_writes_are_dropped() {
    let (runtime, digest) = misbehave(Limits::default(), FakeReader::default()).await;
    // Each of these writes `misbehave/saga-1` before it fails.
    let out = execute(&runtime, &digest, "write-then-retry").await;
    assert_eq!(out.result, Ok(ExecuteOutcome::Retryable("wrote, then failed".into())));
    assert!(out.writes.is_empty(), "{:?}", out.writes);
    let out = execute(&runtime, &digest, "bad-json").await;
    assert!(trapped(&out).starts_with("output is not valid JSON"));
    assert!(out.writes.is_empty(), "{:?}", out.writes);
    // The same write survives a successful attempt.
    assert_eq!(execute(&runtime, &digest, "fine").await.writes.len(), 1);
}

#[tokio::test]
async fn a_plugin_that_reads_the_clock_is_refused_at_load() {
    let runtime = Arc::new(Runtime::new(Limits::default(), Arc::new(FakeReader::default())).unwrap());
    let err = runtime.load(fixture("clock-reader")).await.expect_err("clocks are not granted");
    let LoadError::WrongWorld(msg) = &err else { panic!("{err}") };
    assert!(msg.contains("wasi:clocks/wall-clock") && msg.contains("wasi:clocks/monotonic-clock"), "{msg}");
    // The clocks alone are the reason: nothing else in the fixture is refused.
    let refused = msg.split_once("it imports ").unwrap().1.split_once(", which").unwrap().0;
    assert!(refused.split(", ").all(|import| import.starts_with("wasi:clocks/")), "{refused}");
    assert!(!runtime.is_loaded(&digest_of(&fixture("clock-reader"))));
}

// ---- sagahost:plugin@0.2.0: outbound HTTP, state.scan, signal-name, and 0.1.0 beside it ----

/// A tiny HTTP/1.1 server on a real port: counts connections, keeps every request head, and
/// answers each request with `body` (or never, when `body` is `None`).
struct Service {
    origin: String,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Service {
    async fn start(body: Option<String>) -> Service {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (c, r) = (Arc::clone(&connections), Arc::clone(&requests));
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else { return };
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (r, body) = (Arc::clone(&r), body.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    r.lock().unwrap().push(String::from_utf8_lossy(&head).into_owned());
                    let Some(body) = body else {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    };
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(answer.as_bytes()).await;
                });
            }
        });
        Service { origin, connections, requests }
    }

    fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The value of header `name` in each request received, in order.
    fn header(&self, name: &str) -> Vec<Option<String>> {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|head| {
                head.lines()
                    .find(|l| l.to_ascii_lowercase().starts_with(&prefix))
                    .map(|l| l[prefix.len()..].trim().to_owned())
            })
            .collect()
    }
}

/// `misbehave` in mode `mode`, with `config.url` set.
fn http_input(mode: &str, url: &str) -> String {
    json!({"input": {"customer_id": mode}, "steps": {}, "config": {"url": url}}).to_string()
}

fn granting(origin: &str) -> FakeReader {
    let reader = FakeReader::default();
    reader.grants.lock().unwrap().insert(
        "misbehave".into(),
        crate::grants::Grants {
            allowed_hosts: vec![crate::grants::Origin::parse(origin).unwrap().to_string()],
            credentials: vec![],
        },
    );
    reader
}

fn retryable(out: &CallOutcome<ExecuteOutcome>) -> &str {
    match &out.result {
        Ok(ExecuteOutcome::Retryable(e)) => e,
        other => panic!("expected retryable, got {other:?} (label {})", out.label),
    }
}

#[tokio::test]
async fn a_request_to_an_origin_not_granted_is_denied_and_opens_no_connection() {
    let service = Service::start(Some("{}".into())).await;
    // Granted another port of the same host: still not this origin.
    let other = granting("http://127.0.0.1:1");
    let (runtime, digest) = misbehave(Limits::default(), other).await;
    let out =
        runtime.execute(&digest, "misbehave", &info(1), &http_input("http-get-1", &service.origin), TIMEOUT).await;
    let msg = retryable(&out);
    assert!(msg.contains("denied") && msg.contains("not granted"), "{msg}");
    assert!(!out.reached_out, "nothing left the host, so nothing needs undoing");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(service.connections(), 0, "a denied request opens no connection");
}

#[tokio::test]
async fn granted_requests_carry_the_idempotency_key_numbered_per_request_and_a_traceparent() {
    let service = Service::start(Some(r#"{"ok":true}"#.into())).await;
    let (runtime, digest) = misbehave(Limits::default(), granting(&service.origin)).await;
    let out =
        runtime.execute(&digest, "misbehave", &info(2), &http_input("http-get-3", &service.origin), TIMEOUT).await;
    assert_eq!(out.result, Ok(ExecuteOutcome::Done(r#"{"bytes":[11,11,11],"statuses":[200,200,200]}"#.into())));
    assert!(out.reached_out);
    let keys = service.header("idempotency-key");
    assert_eq!(
        keys,
        [
            Some("saga-1:work:execute".into()),
            Some("saga-1:work:execute:2".into()),
            Some("saga-1:work:execute:3".into())
        ]
    );
    let traces = service.header("traceparent");
    assert!(traces.iter().all(|t| t.is_some() && *t == traces[0]), "one traceparent per attempt: {traces:?}");
    assert!(traces[0].as_ref().unwrap().starts_with("00-"), "{traces:?}");
}

/// `granting(origin)` with a credential for it: `authorization` set from `template`.
fn granting_with_credential(origin: &str, template: &str) -> FakeReader {
    let reader = granting(origin);
    reader.grants.lock().unwrap().get_mut("misbehave").unwrap().credentials = vec![crate::grants::Credential {
        origin: crate::grants::Origin::parse(origin).unwrap().to_string(),
        header: "authorization".into(),
        value: template.into(),
    }];
    reader
}

/// How many `authorization` lines each request received carried.
fn authorization_lines(service: &Service) -> Vec<usize> {
    let requests = service.requests.lock().unwrap();
    requests
        .iter()
        .map(|head| head.lines().filter(|l| l.to_ascii_lowercase().starts_with("authorization:")).count())
        .collect()
}

#[tokio::test]
async fn a_granted_credential_replaces_the_plugin_s_header_with_the_host_s_secret_read_at_each_request() {
    let service = Service::start(Some("{}".into())).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("api-key"), "sk_test_42\n").unwrap();
    let mut limits = Limits::default();
    limits.http.secrets = Some(crate::secrets::Secrets::from_flag(dir.path().to_str().unwrap()).unwrap());
    let reader = granting_with_credential(&service.origin, "Bearer ${api-key}");
    let (runtime, digest) = misbehave(limits.clone(), reader).await;
    let input = http_input("http-auth", &service.origin);
    let out = runtime.execute(&digest, "misbehave", &info(1), &input, TIMEOUT).await;
    assert_eq!(out.result, Ok(ExecuteOutcome::Done(r#"{"status":200}"#.into())));
    // Rotated: the next request reads the file anew.
    std::fs::write(dir.path().join("api-key"), "sk_test_43").unwrap();
    let out = runtime.execute(&digest, "misbehave", &info(2), &input, TIMEOUT).await;
    assert_eq!(out.result, Ok(ExecuteOutcome::Done(r#"{"status":200}"#.into())));
    assert_eq!(service.header("authorization"), [Some("Bearer sk_test_42".into()), Some("Bearer sk_test_43".into())]);
    assert_eq!(authorization_lines(&service), [1, 1], "the plugin's own header is replaced, not added to");

    // TRACE, which echoes the request, is refused where credentials would go.
    let trace = http_input("http-trace", &service.origin);
    let out = runtime.execute(&digest, "misbehave", &info(3), &trace, TIMEOUT).await;
    let msg = retryable(&out);
    assert!(msg.contains("TRACE") && msg.contains("echoes"), "{msg}");
    assert_eq!(service.connections(), 2, "the TRACE never left the host");

    // The same plugin granted the origin without the credential sends its own header: the
    // replacement above was the credential's doing.
    let (runtime, digest) = misbehave(limits, granting(&service.origin)).await;
    let out = runtime.execute(&digest, "misbehave", &info(1), &input, TIMEOUT).await;
    assert_eq!(out.result, Ok(ExecuteOutcome::Done(r#"{"status":200}"#.into())));
    assert_eq!(service.header("authorization").last().cloned().flatten().as_deref(), Some("Bearer plugin-made"));
}

#[tokio::test]
async fn a_credential_whose_secret_cannot_be_read_holds_the_call_back_as_the_host_s_failure() {
    let service = Service::start(Some("{}".into())).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty"), "\n").unwrap();
    let input = http_input("http-auth", &service.origin);
    for (secrets, template, why) in [
        (Some(dir.path()), "Bearer ${absent}", "no secret named \"absent\""),
        (Some(dir.path()), "Bearer ${empty}", "it is empty"),
        (None, "Bearer ${absent}", "no secrets directory"),
    ] {
        let mut limits = Limits::default();
        limits.http.secrets = secrets.map(|d| crate::secrets::Secrets::from_flag(d.to_str().unwrap()).unwrap());
        let (runtime, digest) = misbehave(limits, granting_with_credential(&service.origin, template)).await;
        let out = runtime.execute(&digest, "misbehave", &info(1), &input, TIMEOUT).await;
        // Unavailable: the host's failure, not an attempt of the plugin's.
        let e = unavailable(&out);
        assert!(e.contains("credential authorization") && e.contains(why), "{template}: {e}");
        assert!(!out.reached_out, "nothing left the host");
        let made: Vec<_> = out.requests.iter().map(|r| r.outcome).collect();
        assert_eq!(made, ["credential"]);
    }
    // A plugin that ignores its request's failure and answers done is held back all the same:
    // its done would skip a request that was never sent.
    let mut limits = Limits::default();
    limits.http.secrets = Some(crate::secrets::Secrets::from_flag(dir.path().to_str().unwrap()).unwrap());
    let (runtime, digest) = misbehave(limits, granting_with_credential(&service.origin, "Bearer ${absent}")).await;
    let lenient = http_input("http-lenient", &service.origin);
    let out = runtime.execute(&digest, "misbehave", &info(1), &lenient, TIMEOUT).await;
    assert!(unavailable(&out).contains("absent"), "{:?}", out.result);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(service.connections(), 0, "a request without its credential is never sent");
}

#[tokio::test]
async fn requests_past_the_per_call_limit_fail_and_last_error_names_the_limit() {
    let service = Service::start(Some("{}".into())).await;
    let mut limits = Limits::default();
    limits.http.max_requests = 2;
    let (runtime, digest) = misbehave(limits, granting(&service.origin)).await;
    let out =
        runtime.execute(&digest, "misbehave", &info(1), &http_input("http-get-3", &service.origin), TIMEOUT).await;
    let msg = retryable(&out);
    assert!(msg.starts_with("the plugin made more than 2 HTTP requests in one call"), "{msg}");
    assert_eq!(service.connections(), 2, "the third request never leaves the host");
    // Counted for metrics: two answered, timed; the third over the limit.
    let origin = crate::grants::Origin::parse(&service.origin).unwrap().to_string();
    let made: Vec<_> = out.requests.iter().map(|r| (r.origin.as_str(), r.outcome, r.responded)).collect();
    assert_eq!(
        made,
        [(origin.as_str(), "2xx", true), (origin.as_str(), "2xx", true), (origin.as_str(), "limit", false)]
    );
}

#[tokio::test]
async fn a_response_body_past_the_limit_fails_the_attempt_naming_the_limit() {
    let service = Service::start(Some(format!("\"{}\"", "x".repeat(5_000)))).await;
    let mut limits = Limits::default();
    limits.http.max_response_bytes = 1_000;
    let (runtime, digest) = misbehave(limits, granting(&service.origin)).await;
    let out =
        runtime.execute(&digest, "misbehave", &info(1), &http_input("http-get-1", &service.origin), TIMEOUT).await;
    let msg = retryable(&out);
    assert!(msg.starts_with("a response body was larger than 1000 bytes"), "{msg}");
}

#[tokio::test]
async fn a_request_to_a_service_that_never_answers_ends_with_the_calls_timeout() {
    let service = Service::start(None).await;
    let (runtime, digest) = misbehave(Limits::default(), granting(&service.origin)).await;
    let started = std::time::Instant::now();
    let timeout = Duration::from_millis(500);
    let out =
        runtime.execute(&digest, "misbehave", &info(1), &http_input("http-get-1", &service.origin), timeout).await;
    assert!(matches!(out.label, "trap" | "retryable"), "{:?}", out.result);
    // Without the timeout the call would wait forever; the bound leaves a loaded CI machine
    // room (the call's own work, a scheduler that is late), far below "forever".
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert_eq!(service.connections(), 1);
    assert!(out.reached_out, "the request went out on the connection: it may have been applied");
    let made: Vec<_> = out.requests.iter().map(|r| (r.outcome, r.responded)).collect();
    assert!(made == [("timeout", false)] || made == [("abandoned", false)], "{made:?}");
    assert!(out.requests[0].elapsed >= Duration::from_millis(400), "{:?}", out.requests);
}

/// A granted name that resolves to a metadata address is not reached, and the attempt's error
/// says why: the plugin learns only "denied", which the SDK reads as "not granted", and that
/// sent operators to the grants, which were fine. (The resolver reads "0xa9fea9fe" as
/// 169.254.169.254, as it would answer for a name pointed there.)
#[tokio::test]
async fn a_granted_name_resolving_to_a_metadata_address_is_denied_saying_why() {
    let origin = "http://0xa9fea9fe:80";
    let (runtime, digest) = misbehave(Limits::default(), granting(origin)).await;
    let out = runtime.execute(&digest, "misbehave", &info(1), &http_input("http-get-1", origin), TIMEOUT).await;
    let msg = retryable(&out);
    assert!(msg.starts_with("http://0xa9fea9fe:80 resolved to 169.254.169.254, a link-local"), "{msg}");
    assert!(!out.reached_out);
}

/// DNS lookups hold threads of tokio's blocking pool until the system resolver answers,
/// however long a dead DNS server makes that: at most `MAX_LOOKUPS` run at once, and a call
/// that cannot start one in its time is the host's failure (the slots may be another plugin's),
/// saying why. (Unbounded, calls retrying against a name whose DNS was down filled the pool,
/// which the JSONL relay and compiles share.)
#[tokio::test]
async fn dns_lookups_in_flight_are_bounded_and_a_call_waiting_past_its_time_says_why() {
    let service = Service::start(Some("{}".into())).await;
    let port = service.origin.rsplit_once(':').unwrap().1;
    let origin = format!("http://localhost:{port}");
    let (runtime, digest) = misbehave(Limits::default(), granting(&origin)).await;
    let input = http_input("http-get-1", &origin);
    // Every lookup slot taken, as by lookups stuck on a dead DNS server.
    let stuck = super::outbound::LOOKUPS.acquire_many(super::outbound::MAX_LOOKUPS as u32).await.unwrap();
    let out = runtime.execute(&digest, "misbehave", &info(1), &input, Duration::from_millis(300)).await;
    // Not the plugin's failure (the slots may be another plugin's): not an attempt.
    let msg = unavailable(&out);
    assert!(msg.starts_with("32 DNS lookups were in flight on this host"), "{msg}");
    assert_eq!(service.connections(), 0);
    drop(stuck);
    let out = runtime.execute(&digest, "misbehave", &info(1), &input, TIMEOUT).await;
    assert_eq!(out.label, "done", "{:?}", out.result);
    assert_eq!(service.connections(), 1);
}

/// A plugin cannot make a request seem meant for another host: a `Host` header of its own is
/// refused (wasi-http forbids it; the host keeps that default), and a path that looks like an
/// authority (`//evil.example/x`) is sent as a path to the granted origin, under its name.
/// Both guarantees come from defaults of wasmtime-wasi-http and of `send_over`: this keeps a
/// change of either from going unnoticed.
#[tokio::test]
async fn a_plugin_cannot_name_another_host_in_its_requests() {
    let service = Service::start(Some("{}".into())).await;
    let (runtime, digest) = misbehave(Limits::default(), granting(&service.origin)).await;
    let out =
        runtime.execute(&digest, "misbehave", &info(1), &http_input("http-spoof", &service.origin), TIMEOUT).await;
    let Ok(ExecuteOutcome::Done(output)) = &out.result else { panic!("{:?}", out.result) };
    let output: serde_json::Value = serde_json::from_str(output).unwrap();
    let refused = output["host"]["Err"].as_str().unwrap_or_default();
    assert!(refused.contains("was not sent") && refused.contains("the host sets itself"), "{output}");
    assert_eq!(output["path"]["Ok"], 200, "{output}");
    let authority = service.origin.trim_start_matches("http://");
    assert_eq!(service.header("host"), [Some(authority.to_owned())], "one request, under the granted name");
    let head = service.requests.lock().unwrap()[0].clone();
    assert!(head.starts_with("GET //evil.example/x HTTP/1.1\r\n"), "{head}");
}

/// A service that refuses the connection was sent nothing: a step failing there has nothing
/// out there to undo. (The call counted as having reached out once the address was resolved,
/// so its saga compensated a charge that never left the host, and with the service still
/// down the refund failed too: COMPENSATION_FAILED for nothing.)
#[tokio::test]
async fn a_refused_connection_is_not_reaching_out() {
    // Bound but not listening: the port is this test's, and a connection to it is refused.
    let closed = tokio::net::TcpSocket::new_v4().unwrap();
    closed.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let origin = format!("http://{}", closed.local_addr().unwrap());
    let (runtime, digest) = misbehave(Limits::default(), granting(&origin)).await;
    let out = runtime.execute(&digest, "misbehave", &info(1), &http_input("http-get-1", &origin), TIMEOUT).await;
    let msg = retryable(&out);
    assert!(msg.contains("refused"), "{msg}");
    assert!(!out.reached_out, "nothing left the host");
}

/// Time blocked in state reads is credited back to the plugin's code, not to its requests:
/// the driver compensates from the attempt's timeout (plus a grace) on, so a request sent
/// later could land after the undo it must precede.
#[tokio::test]
async fn a_request_after_the_calls_timeout_fails_though_slow_reads_were_credited() {
    let service = Service::start(Some("{}".into())).await;
    // Two reads of 300 ms each, each within the 500 ms timeout, together past it.
    let reader = FakeReader { delay: Duration::from_millis(300), ..granting(&service.origin) };
    let (runtime, digest) = misbehave(Limits::default(), reader).await;
    let timeout = Duration::from_millis(500);
    let input = http_input("read-then-http-get", &service.origin);
    let out = runtime.execute(&digest, "misbehave", &info(1), &input, timeout).await;
    assert!(matches!(out.label, "trap" | "retryable"), "{:?}", out.result);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(service.connections(), 0, "a request went out after the call's timeout");
    assert!(!out.reached_out);
    let made: Vec<_> = out.requests.iter().map(|r| r.outcome).collect();
    assert_eq!(made, ["late"], "made after the call's time for requests was up");
}

/// A grants read cut short because the plugin's own work used up the call's time is the
/// plugin's timeout (the attempt counts), not the database's failure (which would run the step
/// again, forever); after state reads that were slow too, it is the database's.
#[tokio::test]
async fn a_grants_read_cut_short_by_the_calls_end_is_the_hosts_failure_only_when_reads_were_slow() {
    let service = Service::start(Some("{}".into())).await;
    // How long `busy` computes here at the fastest of three runs (plugins have no clock): the
    // call's timeout is a quarter as long again, so the first request comes with about a fifth
    // of it left, well under half unless this run computes over a third faster than the
    // measured ones (a slower run just times out, which is the plugin's timeout too). Under a
    // test run's load that happens (the three measured runs shared the cores, this one did
    // not): the host then rightly calls the slow grants read its own failure. So a run that
    // says so is measured and tried again, up to three times; a host that always blamed
    // itself fails every time.
    let (busy_runtime, busy_digest) = misbehave(Limits::default(), FakeReader::default()).await;
    let mut tries = Vec::new();
    loop {
        let mut fastest = Duration::MAX;
        for _ in 0..3 {
            let busy = execute(&busy_runtime, &busy_digest, "busy").await;
            assert!(matches!(busy.result, Ok(ExecuteOutcome::Done(_))), "{:?}", busy.result);
            fastest = fastest.min(busy.elapsed);
        }
        let timeout = (fastest * 5 / 4).max(Duration::from_millis(60));
        // The grants read takes far longer than what is left.
        let reader = FakeReader { delay: timeout * 4, slow_grants: true, ..granting(&service.origin) };
        let (runtime, digest) = misbehave(Limits::default(), reader).await;
        let input = http_input("busy-then-http-get", &service.origin);
        let out = runtime.execute(&digest, "misbehave", &info(1), &input, timeout).await;
        if matches!(out.label, "trap" | "retryable") {
            break;
        }
        tries.push(format!("{:?} with a timeout of {timeout:?}", out.result));
        assert!(tries.len() < 3, "a grants read cut short by the call's end was the host's failure: {tries:?}");
    }
    // Two state reads of 200 ms each (credited back) in a 500 ms call, then a grants read of
    // 200 ms with under 100 ms left.
    let timeout = Duration::from_millis(500);
    let reader = FakeReader { delay: Duration::from_millis(200), slow_grants: true, ..granting(&service.origin) };
    let (runtime, digest) = misbehave(Limits::default(), reader).await;
    let input = http_input("read-then-http-get", &service.origin);
    let out = runtime.execute(&digest, "misbehave", &info(1), &input, timeout).await;
    assert!(matches!(&out.result, Err(Unavailable(e)) if e.contains("grants")), "{:?}", out.result);
    assert_eq!(service.connections(), 0);
}

#[tokio::test]
async fn a_grant_that_cannot_be_read_is_the_hosts_failure() {
    let service = Service::start(Some("{}".into())).await;
    let reader = FakeReader { fail: true, ..FakeReader::default() };
    let (runtime, digest) = misbehave(Limits::default(), reader).await;
    let out =
        runtime.execute(&digest, "misbehave", &info(1), &http_input("http-get-1", &service.origin), TIMEOUT).await;
    assert!(matches!(&out.result, Err(Unavailable(e)) if e.contains("grants")), "{:?}", out.result);
    assert_eq!(service.connections(), 0);
}

#[tokio::test]
async fn scan_pages_in_key_order_through_committed_state_and_the_calls_own_writes() {
    let reader = FakeReader::default();
    for key in ["s/a", "s/c", "s/d", "t/a"] {
        reader.values.lock().unwrap().insert(("misbehave".into(), key.into()), b"c".to_vec());
    }
    reader.values.lock().unwrap().insert(("other".into(), "s/0".into()), b"c".to_vec());
    let (runtime, digest) = misbehave(Limits::default(), reader).await;
    let out = execute(&runtime, &digest, "scan").await;
    // s/b is the call's own write, s/c its own delete; t/a and the other plugin's key are out of range.
    assert_eq!(out.result, Ok(ExecuteOutcome::Done(r#"{"keys":["s/a","s/b","s/d"]}"#.into())));
}

/// A page cut at its byte budget whose rows the call itself deleted is not the end: the
/// plugin sees an empty page only when nothing is left.
#[tokio::test]
async fn a_scan_reads_on_past_a_page_the_call_deleted_whole() {
    let reader = FakeReader::default();
    for i in 0..6 {
        reader.values.lock().unwrap().insert(("misbehave".into(), format!("s/{i}")), vec![b'v'; 1 << 20]);
    }
    let (runtime, digest) = misbehave(Limits::default(), reader).await;
    // Deletes s/0 to s/4 (the first page, cut at 4 MiB, and one more), then scans s/.
    let out = execute(&runtime, &digest, "drain-scan").await;
    assert_eq!(out.result, Ok(ExecuteOutcome::Done(r#"{"keys":["s/5"]}"#.into())));
}

#[tokio::test]
async fn a_woken_step_learns_the_signals_name() {
    let (runtime, digest) = misbehave(Limits::default(), FakeReader::default()).await;
    let woken = CallInfo { signal: Some(r#"{"ok":1}"#.into()), signal_name: Some("go".into()), ..info(1) };
    let out = runtime.execute(&digest, "misbehave", &woken, &input("signal-name"), TIMEOUT).await;
    assert_eq!(out.result, Ok(ExecuteOutcome::Done(r#"{"signal":"{\"ok\":1}","signal_name":"go"}"#.into())));
}

#[tokio::test]
async fn a_0_1_0_component_runs_beside_0_2_0_ones() {
    let (runtime, v2) = misbehave(Limits::default(), FakeReader::default()).await;
    let v1 = runtime.load(fixture("legacy-v0-1")).await.unwrap();
    assert_ne!(v1, v2);
    let out = runtime.execute(&v1, "legacy", &info(1), &input("x"), TIMEOUT).await;
    assert_eq!(out.result, Ok(ExecuteOutcome::Done(r#"{"saga_id":"saga-1","world":"0.1.0"}"#.into())));
    assert_eq!(out.writes, vec![("legacy/saga-1".to_owned(), Some(br#""0.1.0""#.to_vec()))]);
    assert_eq!(execute(&runtime, &v2, "fine").await.label, "done");
}

// ---- the pooled sandboxes: slots, exhaustion, and what one call leaves to the next ----

/// A core module with one memory of one page (a data segment puts 7 at address 16) and three
/// functions: `poke(addr) -> old` reads the i32 at `addr` and writes a marker there, `trap(addr)`
/// writes the marker and traps, `grow(pages) -> old size` grows the memory. Written by hand,
/// like [`memories_component`].
fn poke_module() -> Vec<u8> {
    const MARKER: [u8; 5] = [0xda, 0xb4, 0xe9, 0xd2, 0x05]; // i32.const 0x5a5a5a5a, LEB128
    fn section(id: u8, contents: &[u8]) -> Vec<u8> {
        assert!(contents.len() < 128, "one-byte LEB128 only");
        [&[id, contents.len() as u8][..], contents].concat()
    }
    fn body(code: &[u8]) -> Vec<u8> {
        [&[code.len() as u8][..], code].concat()
    }
    let types = [2, 0x60, 1, 0x7f, 1, 0x7f, 0x60, 1, 0x7f, 0];
    let funcs = [3, 0, 1, 0];
    let memory = [1, 0, 1];
    let mut exports = vec![3];
    for (i, name) in ["poke", "trap", "grow"].iter().enumerate() {
        exports.extend([name.len() as u8]);
        exports.extend(name.as_bytes());
        exports.extend([0, i as u8]);
    }
    // local.get 0; i32.load; local.set 1; local.get 0; i32.const MARKER; i32.store; local.get 1
    let poke = [&[1, 1, 0x7f, 0x20, 0, 0x28, 2, 0, 0x21, 1, 0x20, 0, 0x41][..], &MARKER, &[0x36, 2, 0, 0x20, 1, 0x0b]]
        .concat();
    // local.get 0; i32.const MARKER; i32.store; unreachable
    let trap = [&[0, 0x20, 0, 0x41][..], &MARKER, &[0x36, 2, 0, 0x00, 0x0b]].concat();
    // local.get 0; memory.grow 0
    let grow = [0, 0x20, 0, 0x40, 0, 0x0b];
    let code = [&[3][..], &body(&poke), &body(&trap), &body(&grow)].concat();
    let data = [1, 0, 0x41, 16, 0x0b, 4, 7, 0, 0, 0];
    [
        &b"\0asm\x01\0\0\0"[..],
        &section(1, &types),
        &section(3, &funcs),
        &section(5, &memory),
        &section(7, &exports),
        &section(10, &code),
        &section(11, &data),
    ]
    .concat()
}

#[tokio::test]
async fn nothing_a_call_wrote_to_its_memory_is_visible_to_the_next_call_in_the_same_slot() {
    let runtime = Runtime::new(Limits::default(), Arc::new(FakeReader::default())).unwrap();
    let module = wasmtime::Module::new(&runtime.engine, poke_module()).unwrap();
    let linker = wasmtime::Linker::new(&runtime.engine);
    let info = info(1);
    const PAGE: i32 = 64 << 10;
    // Addresses in the first page (one the data segment set, one it did not), in grown memory
    // within the range a released slot keeps resident, and past it (80 pages = 5 MiB).
    let checks = [(16, 7), (1024, 0), (20 * PAGE, 0), (80 * PAGE - 4, 0)];
    for round in 0..3 {
        let mut store = call::new_store(&runtime.call("sha256:test", "test", &info, TIMEOUT));
        let instance = linker.instantiate_async(&mut store, &module).await.unwrap();
        let poke = instance.get_typed_func::<i32, i32>(&mut store, "poke").unwrap();
        let trap = instance.get_typed_func::<i32, ()>(&mut store, "trap").unwrap();
        let grow = instance.get_typed_func::<i32, i32>(&mut store, "grow").unwrap();
        assert_eq!(grow.call_async(&mut store, 79).await.unwrap(), 1, "round {round}: the memory starts at one page");
        for (addr, fresh) in checks {
            // Every round but the first, the previous one wrote the marker here.
            assert_eq!(poke.call_async(&mut store, addr).await.unwrap(), fresh, "round {round}, address {addr}");
        }
        assert_eq!(poke.call_async(&mut store, 16).await.unwrap(), 0x5a5a_5a5a, "the marker is written");
        // The last call of the round traps after writing: its store is dropped like a failed call's.
        assert_eq!(poke.call_async(&mut store, 2048).await.unwrap(), 0, "round {round}: the trap's write is gone");
        trap.call_async(&mut store, 2048).await.expect_err("unreachable traps");
        drop(store);
        // One memory slot served every round: the next instance reused it.
        let pool = runtime.engine.pooling_allocator_metrics().expect("the engine pools its instances");
        assert_eq!((pool.memories(), pool.unused_warm_memories()), (0, 1), "round {round}");
    }
}

#[tokio::test]
async fn a_trap_or_a_memory_bomb_leaves_the_one_slot_clean_for_the_next_call() {
    // One slot: every call below runs in the same pooled instance slot.
    let limits = Limits { concurrent_calls: 1, memory_bytes: 8 << 20, ..Limits::default() };
    let (runtime, digest) = misbehave(limits, FakeReader::default()).await;
    let first = execute(&runtime, &digest, "fine").await;
    assert_eq!(first.label, "done");
    for mode in ["panic", "oom", "recurse", "write-then-retry", "fine"] {
        let out = execute(&runtime, &digest, mode).await;
        assert_ne!(out.label, "unavailable", "{mode}: {:?}", out.result);
        let again = execute(&runtime, &digest, "fine").await;
        assert_eq!((&again.result, &again.writes, again.label), (&first.result, &first.writes, "done"), "after {mode}");
    }
}

/// Holds every state read until the test opens the gate, counting the reads that wait.
struct GateReader {
    waiting: std::sync::atomic::AtomicUsize,
    gate: tokio::sync::Semaphore,
}

#[async_trait]
impl PluginReader for GateReader {
    async fn get(&self, _: &str, _: &str, _: bool) -> anyhow::Result<StateRead> {
        self.waiting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.gate.acquire().await?.forget();
        Ok(StateRead { value: None, checked: false })
    }

    async fn scan(&self, _: &str, _: &str, _: Option<&str>, _: u32) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        Ok(Vec::new())
    }

    async fn grants(&self, _: &str) -> anyhow::Result<crate::grants::Grants> {
        Ok(Default::default())
    }
}

#[tokio::test]
async fn the_drivers_default_concurrency_fits_the_pool() {
    // Each call blocks in a state read until all of them do, so all hold an instance at once.
    const CALLS: usize = 64;
    let reader = Arc::new(GateReader { waiting: 0.into(), gate: tokio::sync::Semaphore::new(0) });
    let runtime = Arc::new(Runtime::new(Limits::default(), Arc::clone(&reader) as Arc<dyn PluginReader>).unwrap());
    let digest = runtime.load(fixture("misbehave")).await.unwrap();
    let calls: Vec<_> = (0..CALLS)
        .map(|_| {
            let (runtime, digest) = (Arc::clone(&runtime), digest.clone());
            tokio::spawn(async move { execute(&runtime, &digest, "read-state").await })
        })
        .collect();
    let started = std::time::Instant::now();
    while reader.waiting.load(std::sync::atomic::Ordering::SeqCst) < CALLS {
        assert!(started.elapsed() < Duration::from_secs(30), "the calls never all reached their read");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pool = runtime.engine.pooling_allocator_metrics().unwrap();
    assert_eq!(pool.component_instances(), CALLS as u64, "every call is in flight at once");
    reader.gate.add_permits(2 * CALLS); // `read-state` reads twice
    for call in calls {
        assert_eq!(call.await.unwrap().label, "done");
    }
    // Each sandbox is given back just after its call answered.
    released(&runtime, Limits::default().concurrent_calls as usize).await;
}

/// Waits until every sandbox slot is back in the pool: none holds an instance and every
/// permit is free (`slots` permits in all).
async fn released(runtime: &Runtime, slots: usize) {
    let started = std::time::Instant::now();
    loop {
        let held = runtime.engine.pooling_allocator_metrics().unwrap().component_instances();
        if held == 0 && runtime.slots.available_permits() == slots {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{held} sandboxes were never given back");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A call answers before its sandbox is given back to the pool: the reset of the memory it
/// wrote comes after, in a task of its own, which holds the slot's permit until the slot is
/// clean and then tells the runtime's observer how long it took.
#[tokio::test]
async fn a_calls_sandbox_is_given_back_after_it_answers() {
    let limits = Limits { concurrent_calls: 1, ..Limits::default() };
    let times = Arc::new(std::sync::Mutex::new(Vec::new()));
    let observed = Arc::clone(&times);
    let runtime = Runtime::new(limits, Arc::new(FakeReader::default()))
        .unwrap()
        .observing_releases(Arc::new(move |took| observed.lock().unwrap().push(took)));
    let runtime = Arc::new(runtime);
    let digest = runtime.load(fixture("misbehave")).await.unwrap();
    let out = execute(&runtime, &digest, "fine").await;
    assert_eq!(out.label, "done", "{:?}", out.result);
    // This thread has not yielded since the call answered (`#[tokio::test]` runs on one
    // thread): its instance and the slot's permit are still held, and nothing was observed.
    assert_eq!(runtime.engine.pooling_allocator_metrics().unwrap().component_instances(), 1);
    assert_eq!(runtime.slots.available_permits(), 0, "the slot is held until it is clean");
    assert!(times.lock().unwrap().is_empty());
    // The one slot serves the next calls: each waits for the one before to be given back.
    for _ in 0..3 {
        assert_eq!(execute(&runtime, &digest, "fine").await.label, "done");
    }
    released(&runtime, 1).await;
    let times = times.lock().unwrap();
    assert_eq!(times.len(), 4, "{times:?}");
    assert!(times.iter().all(|t| *t > Duration::ZERO), "{times:?}");
}

#[tokio::test]
async fn a_call_waits_for_a_free_slot_at_most_its_timeout_and_is_then_the_hosts_failure() {
    let limits = Limits { concurrent_calls: 1, ..Limits::default() };
    let (runtime, digest) = misbehave(limits, FakeReader::default()).await;
    let run = |mode: &'static str, timeout| {
        let (runtime, digest) = (Arc::clone(&runtime), digest.clone());
        async move { runtime.execute(&digest, "misbehave", &info(1), &input(mode), timeout).await }
    };
    // The loop holds the only slot for 300 ms; the epoch ticks let the others wait meanwhile.
    let (looping, impatient, patient) = tokio::join!(
        run("loop", Duration::from_millis(300)),
        run("fine", Duration::from_millis(100)),
        run("fine", TIMEOUT)
    );
    assert_eq!(trapped(&looping), "timed out after 300 ms");
    let msg = unavailable(&impatient);
    assert!(msg.contains("sandbox slots stayed busy for 100 ms"), "{msg}");
    assert_eq!(patient.label, "done", "{:?}", patient.result);
    assert!(patient.elapsed >= Duration::from_millis(200), "it waited for the slot: {:?}", patient.elapsed);
}

/// A plugin computing without end must not hold the runtime's timers and sockets off: on
/// every epoch tick the call yields, and the scheduler polls its I/O and timer driver before
/// resuming it. (Waking itself at once, a call in a task of its own, as the driver runs them,
/// was resumed ahead of the driver for tokio's whole event interval, 61 polls of 10 ms: a busy
/// plugin held the HTTP requests and database replies of its thread off for some 0.6 s at a
/// time.) `#[tokio::test]` runs on one thread: the call's task and the timer below share it.
#[tokio::test]
async fn a_busy_plugin_leaves_the_threads_timers_and_sockets_served_on_every_tick() {
    let (runtime, digest) = misbehave(Limits::default(), FakeReader::default()).await;
    let call = tokio::spawn(async move {
        runtime.execute(&digest, "misbehave", &info(1), &input("loop"), Duration::from_secs(1)).await
    });
    let mut woken = 0;
    while !call.is_finished() {
        tokio::time::sleep(Duration::from_millis(5)).await;
        woken += 1;
    }
    let looping = call.await.unwrap();
    assert_eq!(trapped(&looping), "timed out after 1000 ms");
    // A tick every 10 ms is some 100 in the second; one driver poll every 61 ticks, 2.
    assert!(woken >= 25, "the timer fired only {woken} times while the plugin computed for 1 s");
}

/// A store holding an instance of `component` from `runtime`'s pool, past the runtime's own
/// bound on calls: a slot taken as a call would take it, or the pool's refusal.
async fn occupy_slot(
    runtime: &Runtime,
    component: &wasmtime::component::Component,
    info: &CallInfo,
) -> wasmtime::Result<wasmtime::Store<call::CallState>> {
    let mut store = call::new_store(&runtime.call("sha256:test", "test", info, TIMEOUT));
    wasmtime::component::Linker::new(&runtime.engine).instantiate_async(&mut store, component).await?;
    Ok(store)
}

#[tokio::test]
async fn an_exhausted_pool_is_the_hosts_failure_not_the_plugins() {
    // Admit two calls to a pool of one (no slots for spares), with the one slot taken: the
    // engine refuses the instance, which must not count as the plugin's attempt.
    let limits = Limits { concurrent_calls: 1, spares: 0, ..Limits::default() };
    let reader = Arc::new(FakeReader::default());
    let mut runtime = Runtime::new(limits, reader).unwrap();
    runtime.slots = Arc::new(tokio::sync::Semaphore::new(2));
    let runtime = Arc::new(runtime);
    let digest = runtime.load(fixture("misbehave")).await.unwrap();
    let component = wasmtime::component::Component::new(&runtime.engine, memories_component(1, 1)).unwrap();
    let info = info(1);
    let taken = occupy_slot(&runtime, &component, &info).await.unwrap();
    let out = execute(&runtime, &digest, "fine").await;
    assert!(unavailable(&out).contains("no sandbox slot was free"), "{:?}", out.result);
    drop(taken);
    assert_eq!(execute(&runtime, &digest, "fine").await.label, "done", "the slot is back");
}

#[tokio::test]
async fn a_call_reports_where_its_time_went() {
    let (runtime, digest) = misbehave(Limits::default(), FakeReader::default()).await;
    let mut calls = Vec::new();
    for _ in 0..2 * CPU_SAMPLE_EVERY {
        calls.push(execute(&runtime, &digest, "fine").await);
    }
    for out in &calls {
        let Phases { setup, instantiate, run, collect, .. } = out.phases;
        assert_eq!(setup + instantiate + run + collect, out.elapsed);
        assert!(instantiate > Duration::ZERO && run > Duration::ZERO, "{:?}", out.phases);
    }
    // The host measures the processor time of one call in CPU_SAMPLE_EVERY: some, and never
    // more than the call's wall-clock time (one thread polls it at a time); the clock's own
    // reads may add a little.
    let measured: Vec<_> = calls.iter().filter_map(|out| out.phases.cpu.map(|cpu| (cpu, out.elapsed))).collect();
    assert_eq!(measured.len(), 2, "{calls:?}");
    for (cpu, elapsed) in measured {
        assert!(cpu > Duration::ZERO && cpu <= elapsed + Duration::from_millis(1), "{cpu:?} of {elapsed:?}");
    }
}

#[tokio::test]
async fn every_call_reports_its_peak_memory_within_the_limit() {
    let (runtime, digest) = misbehave(Limits::default(), FakeReader::default()).await;
    let out = execute(&runtime, &digest, "fine").await;
    assert!(out.peak_memory_bytes > 0 && out.peak_memory_bytes <= Limits::default().memory_bytes, "{out:?}");
    let limits = Limits { memory_bytes: 8 << 20, ..Limits::default() };
    let (runtime, digest) = misbehave(limits, FakeReader::default()).await;
    let out = execute(&runtime, &digest, "oom").await;
    trapped(&out);
    // The refused growth is not counted: the peak is what the call really held.
    assert!(out.peak_memory_bytes > 1 << 20 && out.peak_memory_bytes <= 8 << 20, "{}", out.peak_memory_bytes);
}

#[tokio::test]
async fn only_a_recording_runtime_keeps_log_lines_and_requests() {
    let service = Service::start(Some("{}".into())).await;
    let http = http_input("http-get-1", &service.origin);
    // The host's runtime keeps nothing.
    let (runtime, digest) = misbehave(Limits::default(), granting(&service.origin)).await;
    let out = runtime.execute(&digest, "misbehave", &info(1), &http, TIMEOUT).await;
    assert_eq!(out.label, "done", "{out:?}");
    assert_eq!(out.recorded, Recorded::default());
    // What metrics count, every runtime keeps: the granted origin, canonical.
    let origin = crate::grants::Origin::parse(&service.origin).unwrap().to_string();
    assert_eq!((out.requests.len(), &out.requests[0].origin, out.requests[0].outcome), (1, &origin, "2xx"));
    let recording = |reader| Arc::new(Runtime::new(Limits::default(), Arc::new(reader)).unwrap().recording());
    let runtime = recording(granting(&service.origin));
    let digest = runtime.load(fixture("misbehave")).await.unwrap();
    let out = runtime.execute(&digest, "misbehave", &info(1), &http, TIMEOUT).await;
    assert_eq!(
        out.recorded.requests,
        vec![OutboundRequest {
            method: "GET".into(),
            url: format!("{}/", service.origin),
            status: Some(200),
            error: None
        }]
    );
    // A denied request is recorded with the reason; logs are kept as the host logs them.
    let runtime = recording(FakeReader::default());
    let digest = runtime.load(fixture("misbehave")).await.unwrap();
    let out = runtime.execute(&digest, "misbehave", &info(1), &http, TIMEOUT).await;
    assert_eq!(out.recorded.requests.len(), 1);
    assert_eq!(out.recorded.requests[0].status, None);
    assert_eq!(out.recorded.requests[0].error.as_deref(), Some("HttpRequestDenied"));
    let made: Vec<_> = out.requests.iter().map(|r| (r.origin.as_str(), r.outcome)).collect();
    assert_eq!(made, [("-", "denied")], "a plugin's URL is no label unless granted");
    let out = execute(&runtime, &digest, "log-flood").await;
    assert_eq!(out.recorded.logs.len(), Limits::default().log_lines as usize);
    assert!(out.recorded.logs_dropped > 0);
    assert!(out.recorded.logs.iter().all(|l| !l.level.is_empty() && !l.message.is_empty()));
}

/// A call of a component that cannot reach another service has its reads checked (and so may
/// have them answered from memory), and hands the checked reads to its commit, whatever
/// its outcome (a rejection that came of a stale value is as wrong as a success); a
/// component importing outbound HTTP is never given such answers (a stale value must not
/// reach another service), and neither is a runtime whose reader does not guess.
#[tokio::test]
async fn reads_answered_from_memory_go_to_the_commit_and_only_for_calls_that_stay_in_the_host() {
    let reader = FakeReader { guesses: true, ..FakeReader::default() };
    let runtime = Arc::new(Runtime::new(Limits::default(), Arc::new(reader)).unwrap());
    let inventory = runtime.load(fixture("inventory")).await.unwrap();
    let order = |sku: &str| json!({"input": {"items": [{"sku": sku, "quantity": 1}]}, "steps": {}}).to_string();
    let info = CallInfo { saga_id: "o-1".into(), ..info(1) };
    let out = runtime.execute(&inventory, "inventory", &info, &order("A-1"), TIMEOUT).await;
    assert_eq!(out.label, "done", "{:?}", out.result);
    assert_eq!(out.checks, vec![("reservation/o-1".to_owned(), None)], "the reservation was read absent");
    assert_eq!(out.writes.len(), 1);
    let out = runtime.execute(&inventory, "inventory", &info, &order("OOS-1"), TIMEOUT).await;
    assert_eq!(out.label, "rejected", "{:?}", out.result);
    assert!(out.writes.is_empty());
    assert_eq!(out.checks, vec![("reservation/o-1".to_owned(), None)], "a rejection carries its reads too");

    let (runtime, misbehave) =
        misbehave(Limits::default(), FakeReader { guesses: true, ..FakeReader::default() }).await;
    assert!(runtime.capabilities(&misbehave).unwrap().outbound_http);
    let out = execute(&runtime, &misbehave, "read-state").await;
    assert_eq!(out.label, "done", "{:?}", out.result);
    assert!(out.checks.is_empty(), "{:?}", out.checks);
}

/// A runtime keeping spares (`spare.rs`), with `misbehave` loaded; its digest and the number of
/// spares made so far.
async fn sparing(limits: Limits) -> (Arc<Runtime>, String, Arc<std::sync::atomic::AtomicUsize>) {
    let made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&made);
    let runtime =
        Runtime::new(limits, Arc::new(FakeReader::default())).unwrap().keeping_spares(Some(Arc::new(move |took| {
            assert!(took > Duration::ZERO);
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })));
    let runtime = Arc::new(runtime);
    let digest = runtime.load(fixture("misbehave")).await.unwrap();
    (runtime, digest, made)
}

/// Waits (yielding to the spares' and releases' tasks) until `runtime` holds `spares` spares.
async fn spares_ready(runtime: &Runtime, spares: usize) {
    let started = std::time::Instant::now();
    while runtime.spares.as_ref().unwrap().len() != spares {
        assert!(started.elapsed() < Duration::from_secs(10), "{spares} spares were never made");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test]
async fn a_spare_takes_the_instantiation_off_the_next_calls_path_and_serves_that_call_only() {
    let (runtime, digest, made) = sparing(Limits::default()).await;
    let first = execute(&runtime, &digest, "fine").await;
    assert_eq!(first.label, "done", "{:?}", first.result);
    assert!(first.phases.instantiate > Duration::ZERO, "no spare yet: the first call instantiates");
    assert_eq!(first.phases.spare, Some(false), "a miss");
    spares_ready(&runtime, 1).await;
    // A trap in a spare's instance reaches no other call: each call below takes a spare made
    // after the call before it, and leaves it to be given back.
    for mode in ["panic", "fine", "panic", "fine"] {
        let out = execute(&runtime, &digest, mode).await;
        assert_eq!(out.phases.instantiate, Duration::ZERO, "{mode}: the call took a spare");
        assert_eq!(out.phases.spare, Some(true), "{mode}");
        match mode {
            "panic" => assert!(trapped(&out).contains("misbehave: panic on attempt 1"), "{}", trapped(&out)),
            _ => assert_eq!(out.label, "done", "{:?}", out.result),
        }
        // The call took the only spare, and one is made to replace it.
        spares_ready(&runtime, 1).await;
    }
    assert_eq!(made.load(std::sync::atomic::Ordering::Relaxed), 5, "one spare per call");
    // Every instance of the pool is a spare or is given back with its call's slot.
    let started = std::time::Instant::now();
    loop {
        let held = runtime.engine.pooling_allocator_metrics().unwrap().component_instances();
        if held == 1 && runtime.slots.available_permits() == Limits::default().concurrent_calls as usize {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{held} instances held, not the one spare");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test]
async fn a_runtime_told_to_keep_no_spares_instantiates_every_call_in_a_pool_without_their_slots() {
    let limits = Limits { concurrent_calls: 2, spares: 0, ..Limits::default() };
    let (runtime, digest, made) = sparing(limits).await;
    assert!(runtime.spares.is_none());
    for _ in 0..3 {
        let out = execute(&runtime, &digest, "fine").await;
        assert_eq!(out.label, "done", "{:?}", out.result);
        assert!(out.phases.instantiate > Duration::ZERO);
        assert_eq!(out.phases.spare, None, "no spares are kept: neither taken nor missed");
    }
    assert_eq!(made.load(std::sync::atomic::Ordering::Relaxed), 0);
    // The pool has the two calls' slots and no more: a third instance is refused.
    released(&runtime, 2).await;
    let info = info(1);
    let component = wasmtime::component::Component::new(&runtime.engine, memories_component(1, 1)).unwrap();
    let _taken = (
        occupy_slot(&runtime, &component, &info).await.unwrap(),
        occupy_slot(&runtime, &component, &info).await.unwrap(),
    );
    let refused = occupy_slot(&runtime, &component, &info).await;
    assert!(refused.is_err_and(|e| e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some()));
}

#[tokio::test]
async fn the_spares_of_an_unloaded_component_are_thrown_away_with_it() {
    let (runtime, digest, _) = sparing(Limits::default()).await;
    assert_eq!(execute(&runtime, &digest, "fine").await.label, "done");
    spares_ready(&runtime, 1).await;
    // A version still bound stays loaded, and keeps its spare.
    assert!(runtime.unload_idle(Duration::ZERO, |_| true).is_empty());
    assert_eq!(runtime.spares.as_ref().unwrap().len(), 1);
    // Unloaded (an idle version no longer bound), its spare goes too: it would keep the
    // compiled component in memory and hold a pool slot for good.
    assert_eq!(runtime.unload_idle(Duration::ZERO, |_| false), vec![digest.clone()]);
    let spares = runtime.spares.as_ref().unwrap();
    assert_eq!(spares.len(), 0);
    assert_eq!(spares.free_slots(), spare::SPARES as usize, "its slot is free again");
    // The call's own sandbox is given back by a task of its own; then the pool holds nothing.
    released(&runtime, Limits::default().concurrent_calls as usize).await;
    // Loaded again, it is a new component: its first call instantiates, and makes a spare.
    let again = runtime.load(fixture("misbehave")).await.unwrap();
    let out = execute(&runtime, &again, "fine").await;
    assert_eq!((out.label, out.phases.spare), ("done", Some(false)));
    spares_ready(&runtime, 1).await;
}

#[tokio::test]
async fn a_call_that_finds_no_spare_makes_one_more_up_to_the_components_bound() {
    let (runtime, digest, _) = sparing(Limits::default()).await;
    // Calls at once: each that finds no spare makes one more, up to the bound; one that takes
    // a spare makes its replacement.
    let calls = spare::PER_COMPONENT + 4;
    let mut running = tokio::task::JoinSet::new();
    for _ in 0..calls {
        let (runtime, digest) = (Arc::clone(&runtime), digest.clone());
        running.spawn(async move { execute(&runtime, &digest, "fine").await });
    }
    let mut missed = 0;
    while let Some(out) = running.join_next().await {
        let out = out.unwrap();
        assert_eq!(out.label, "done", "{:?}", out.result);
        missed += usize::from(out.phases.instantiate > Duration::ZERO);
    }
    assert!(missed > 0);
    let kept = missed.min(spare::PER_COMPONENT);
    spares_ready(&runtime, kept).await;
    // Taken one by one, each is replaced.
    for _ in 0..3 {
        assert_eq!(execute(&runtime, &digest, "fine").await.phases.instantiate, Duration::ZERO);
    }
    spares_ready(&runtime, kept).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(runtime.spares.as_ref().unwrap().len(), kept, "no more than the bound");
}

/// A component whose instantiation fails, or reaches for WASI (as a start function could).
struct Unsparable {
    reaches_wasi: bool,
    no_spares: std::sync::atomic::AtomicBool,
}

struct NeverCalled;

impl wit::Instance for NeverCalled {
    fn call<'a>(
        &'a self,
        _: &'a mut wasmtime::Store<call::CallState>,
        _: &'a CallInfo,
        _: wit::Export<'a>,
    ) -> wit::Answering<'a> {
        unreachable!("a spare that reached the host is never handed to a call")
    }
}

impl wit::Prepared for Unsparable {
    fn instantiate<'a>(&'a self, store: &'a mut wasmtime::Store<call::CallState>) -> wit::Instantiating<'a> {
        Box::pin(async move {
            if !self.reaches_wasi {
                return Err(wasmtime::format_err!("the component failed to instantiate"));
            }
            let _ = wasmtime_wasi::WasiView::ctx(store.data_mut());
            Ok(Box::new(NeverCalled) as Box<dyn wit::Instance>)
        })
    }

    fn no_spares(&self) -> &std::sync::atomic::AtomicBool {
        &self.no_spares
    }
}

#[tokio::test]
async fn no_spare_is_kept_of_a_component_whose_instantiation_fails_or_reaches_the_host() {
    let (runtime, _, made) = sparing(Limits::default()).await;
    let spares = runtime.spares.as_ref().unwrap();
    for reaches_wasi in [false, true] {
        let component: Arc<dyn wit::Prepared> =
            Arc::new(Unsparable { reaches_wasi, no_spares: std::sync::atomic::AtomicBool::new(false) });
        spares.refill(&component, false);
        let started = std::time::Instant::now();
        while !component.no_spares().load(std::sync::atomic::Ordering::Relaxed) {
            assert!(started.elapsed() < Duration::from_secs(10), "the spare's failure was never noted");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(spares.take(&component).is_none());
        // Its calls instantiate it themselves from now on: no more are made.
        spares.refill(&component, false);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(spares.take(&component).is_none());
    }
    assert_eq!(spares.len(), 0);
    assert_eq!(made.load(std::sync::atomic::Ordering::Relaxed), 0);
    // Their slots were given back: all of them are free for spares of other components.
    assert_eq!(spares.free_slots(), spare::SPARES as usize);
}

#[tokio::test]
async fn an_instance_made_ahead_of_a_call_cannot_reach_the_host() {
    let runtime = Runtime::new(Limits::default(), Arc::new(FakeReader::default())).unwrap();
    let reader: Arc<dyn PluginReader> = Arc::new(FakeReader::default());
    let mut store = call::spare_store(&runtime.engine, &runtime.limits, &reader);
    assert!(store.data().ahead && !store.data().touched);
    use wasmtime::AsContextMut as _;
    let err = host::in_a_call(&store.as_context_mut()).expect_err("the sagahost imports trap");
    assert!(err.to_string().contains("instantiated ahead of a call"), "{err}");
    // A WASI or wasi:http import marks the spare, which is then thrown away.
    let _ = wasmtime_wasi::WasiView::ctx(store.data_mut());
    assert!(store.data().touched);
    let mut store = call::spare_store(&runtime.engine, &runtime.limits, &reader);
    let _ = wasmtime_wasi_http::WasiHttpView::http(store.data_mut());
    assert!(store.data().touched);
    // A call's own store is not ahead: its imports are served.
    let info = info(1);
    let mut store = call::new_store(&runtime.call("sha256:test", "test", &info, TIMEOUT));
    host::in_a_call(&store.as_context_mut()).expect("a call's store reaches the host");
    let _ = wasmtime_wasi::WasiView::ctx(store.data_mut());
    assert!(!store.data().touched);
}
