//! `sagahost plugin run|check|new` (SPEC §9): a plugin author's tools, local and without a host.
//!
//! `check` validates a component as an upload does (`POST /admin/plugins/{name}`): not empty,
//! at most [`PLUGIN_COMPONENT_LIMIT`] and, compressed if it is over [`PLUGIN_BODY_LIMIT`] (as
//! `sagahost plugins upload` sends it), a body of at most that, a component of a `sagahost:plugin` world version the host
//! serves, importing nothing it does not grant. `run` then makes one `execute` or
//! `compensate` call with the host's own [`Runtime`] and [`Limits`], its state read from a
//! JSON file instead of a database, and prints everything the call did.
//!
//! Unlike `cli/`, which is a client of a running host over HTTP, this module uses the runtime
//! itself, so what it runs is what the host runs. `new` (a project from a template) lives in
//! `scaffold`. Exit codes: [`RAN`], [`PLUGIN_FAILED`],
//! [`USAGE`], [`INVALID`] (docs/cli.md).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};

use crate::engine::{CompensateOutcome, ExecuteOutcome};
use crate::http::plugins::{PLUGIN_BODY_LIMIT, PLUGIN_COMPONENT_LIMIT};
use crate::runtime::{CallInfo, CallOutcome, Capabilities, Limits, PluginReader, Runtime};

/// The call ran and the plugin succeeded (`done` or `wait`); `check`: the component is valid.
pub const RAN: u8 = 0;
/// The call ran and the plugin failed: `retryable`, `rejected` or a trap (a timeout, memory
/// or another limit included).
pub const PLUGIN_FAILED: u8 = 1;
/// Bad flags, or a file or JSON argument that cannot be read or parsed.
pub const USAGE: u8 = 2;
/// The component would be refused on upload; the reason is on stderr.
pub const INVALID: u8 = 9;

const EXIT_HELP: &str = "\
Exit status: 0 the call ran and the plugin succeeded (done or wait) / the component is valid,
1 the plugin failed (retryable, rejected, trap), 2 usage (flags, unreadable file, bad JSON),
9 the component would be refused on upload. See docs/cli.md.";

/// `sagahost plugin ...`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: PluginCommand,
}

#[derive(clap::Subcommand, Debug)]
enum PluginCommand {
    /// Run one execute or compensate call of a component locally, with the host's runtime and
    /// limits, and print what it did.
    #[command(after_help = EXIT_HELP)]
    Run(Box<RunArgs>),
    /// Validate a component as an upload does (world, version, imports), and say why not.
    #[command(after_help = EXIT_HELP)]
    Check(CheckArgs),
    /// Create a new step project from a template (Rust, JavaScript or Python) that builds
    /// with one command.
    New(crate::scaffold::NewArgs),
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Export {
    Execute,
    Compensate,
}

impl Export {
    fn name(self) -> &'static str {
        match self {
            Export::Execute => "execute",
            Export::Compensate => "compensate",
        }
    }
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// The component (.wasm), as `cargo build --target wasm32-wasip2` makes it.
    component: PathBuf,
    /// The whole step input JSON as the host builds it:
    /// {"input": <saga input>, "steps": {<earlier step>: <its output>}, "config": <step config>};
    /// @FILE reads it from a file.
    #[arg(long, value_name = "JSON")]
    input: String,
    /// Which export to call.
    #[arg(long = "call", value_enum, default_value_t = Export::Execute)]
    call: Export,
    /// Execute's output JSON, which compensate receives (required with --call compensate).
    #[arg(long = "output", value_name = "JSON", required_if_eq("call", "compensate"))]
    execute_output: Option<String>,
    /// A JSON object of the plugin's committed state: key -> value. A string value is stored
    /// as its UTF-8 bytes; any other value as its JSON text.
    #[arg(long)]
    state: Option<PathBuf>,
    /// An origin the plugin may reach (sagahost:plugin@0.2.0), e.g. http://127.0.0.1:9001;
    /// repeat the flag for several. Default: none.
    #[arg(long = "allow-host")]
    allow_host: Vec<String>,
    /// A header the host sets on the plugin's requests to a granted origin, as
    /// 'ORIGIN HEADER: VALUE' with ${name} for the file `name` of --outbound-secrets-dir, e.g.
    /// 'https://api.stripe.com Authorization: Bearer ${stripe-key}' (in single quotes); repeat
    /// the flag for several.
    #[arg(long = "credential", value_name = "'ORIGIN HEADER: VALUE'", value_parser = crate::grants::parse_credential_flag)]
    credential: Vec<crate::grants::Credential>,
    /// The directory of the secrets credentials name (serve's --outbound-secrets-dir).
    #[arg(long, value_name = "DIR", value_parser = crate::secrets::Secrets::from_flag)]
    outbound_secrets_dir: Option<crate::secrets::Secrets>,
    /// A PEM file of certificate authorities the plugin's https requests may also chain to,
    /// besides the public ones (serve's --outbound-ca-file).
    #[arg(long, value_name = "PEM", value_parser = crate::runtime::TlsTrust::from_flag)]
    outbound_ca_file: Option<crate::runtime::TlsTrust>,
    /// A PEM certificate (chain) to present to https services that ask for one (mutual TLS;
    /// serve's --outbound-client-cert); with --outbound-client-key.
    #[arg(long, value_name = "PEM", requires = "outbound_client_key", value_parser = crate::runtime::ClientCertChain::from_flag)]
    outbound_client_cert: Option<crate::runtime::ClientCertChain>,
    /// That certificate's private key (serve's --outbound-client-key).
    #[arg(long, value_name = "PEM", requires = "outbound_client_cert", value_parser = crate::runtime::ClientKey::from_flag)]
    outbound_client_key: Option<crate::runtime::ClientKey>,
    /// An HTTP forward proxy the plugin's requests go through, http://[user:password@]host:port
    /// (serve's --outbound-proxy).
    #[arg(long, value_name = "URL", value_parser = crate::flags::Secret(crate::runtime::Proxy::parse))]
    outbound_proxy: Option<crate::runtime::Proxy>,
    /// Destinations reached without the proxy (serve's --outbound-no-proxy).
    #[arg(long, value_name = "LIST", requires = "outbound_proxy", value_parser = crate::runtime::NoProxy::from_flag)]
    outbound_no_proxy: Option<crate::runtime::NoProxy>,
    /// Whose state space the call uses (the plugin's name). Default: the file's name.
    #[arg(long)]
    plugin: Option<String>,
    /// Saga id of the call context.
    #[arg(long, default_value = "saga-1")]
    saga_id: String,
    /// Saga type of the call context.
    #[arg(long, default_value = "local")]
    saga_type: String,
    /// Step name of the call context.
    #[arg(long, default_value = "step")]
    step: String,
    /// Attempt number of the call context (1 on the first try).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    attempt: u32,
    /// Payload of the signal that woke the step.
    #[arg(long)]
    signal: Option<String>,
    /// Name of the signal that woke the step.
    #[arg(long)]
    signal_name: Option<String>,
    /// The call's timeout, in milliseconds (a step definition's timeout_ms).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    timeout_ms: u64,
    /// Memory limit of the call, in MiB (serve's --plugin-memory-mib).
    #[arg(long, default_value_t = 64)]
    plugin_memory_mib: usize,
    /// Largest output the call may return, in KiB (serve's --plugin-output-kib).
    #[arg(long, default_value_t = 256)]
    plugin_output_kib: usize,
    /// Print one JSON object instead of text, for tools.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct CheckArgs {
    /// The component (.wasm).
    component: PathBuf,
    /// Print one JSON object instead of text, for tools.
    #[arg(long)]
    json: bool,
}

/// Why a command stopped before (or instead of) a call: an exit code and a message.
#[derive(Debug)]
struct Stop {
    exit: u8,
    message: String,
}

fn usage(message: impl Into<String>) -> Stop {
    Stop { exit: USAGE, message: message.into() }
}

/// Runs `sagahost plugin ...`; returns the exit code.
pub async fn run(args: Args) -> ExitCode {
    let result = match args.command {
        PluginCommand::Run(args) => run_call(*args).await,
        PluginCommand::Check(args) => check(args).await,
        PluginCommand::New(args) => Ok(crate::scaffold::new(args)),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(stop) => {
            let message = crate::text::shown(&stop.message);
            eprintln!("error: {message}");
            ExitCode::from(stop.exit)
        }
    }
}

/// A plugin's committed state and grants, held in memory.
struct Seeded {
    state: BTreeMap<String, Vec<u8>>,
    grants: crate::grants::Grants,
}

#[async_trait]
impl PluginReader for Seeded {
    async fn get(&self, _plugin: &str, key: &str, _guess: bool) -> anyhow::Result<crate::store::StateRead> {
        Ok(crate::store::StateRead { value: self.state.get(key).cloned(), checked: false })
    }

    async fn scan(
        &self,
        _plugin: &str,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        Ok(self
            .state
            .iter()
            .filter(|(k, _)| k.starts_with(prefix) && after.is_none_or(|a| k.as_str() > a))
            .take(limit as usize)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    async fn grants(&self, _plugin: &str) -> anyhow::Result<crate::grants::Grants> {
        Ok(self.grants.clone())
    }
}

/// The state a `--state` file seeds: a JSON object; a string value is its UTF-8 bytes, any
/// other value its JSON text.
fn parse_state(text: &str) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(map) = value else {
        return Err("must be a JSON object of key -> value".to_owned());
    };
    Ok(map
        .into_iter()
        .map(|(k, v)| {
            let bytes = match v {
                Value::String(s) => s.into_bytes(),
                other => other.to_string().into_bytes(),
            };
            (k, bytes)
        })
        .collect())
}

/// A state value for printing: its JSON if it is JSON, else its text (lossy UTF-8).
fn shown(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// Reads a component file; a missing or unreadable file is a usage error.
fn read_component(path: &Path) -> Result<Vec<u8>, Stop> {
    std::fs::read(path).map_err(|e| usage(format!("cannot read {}: {e}", path.display())))
}

/// Loads a component as an upload would, refusing what an upload refuses.
async fn load(runtime: &Arc<Runtime>, wasm: Vec<u8>) -> Result<(String, Capabilities), Stop> {
    let invalid = |message: String| Stop { exit: INVALID, message };
    if wasm.is_empty() {
        return Err(invalid("the file is empty; it must hold the component's bytes".to_owned()));
    }
    if wasm.len() > PLUGIN_COMPONENT_LIMIT {
        return Err(invalid(format!(
            "the component has {} bytes; the host takes components of at most {PLUGIN_COMPONENT_LIMIT}",
            wasm.len()
        )));
    }
    if wasm.len() > PLUGIN_BODY_LIMIT {
        // Uploaded compressed (`sagahost plugins upload` does): the body must still fit.
        let packed =
            zstd::bulk::compress(&wasm, 0).map_err(|e| invalid(format!("cannot compress the component: {e}")))?;
        if packed.len() > PLUGIN_BODY_LIMIT {
            return Err(invalid(format!(
                "the component has {} bytes, {} compressed with zstd; an upload body takes at most {PLUGIN_BODY_LIMIT}",
                wasm.len(),
                packed.len()
            )));
        }
    }
    let digest = runtime.load(wasm).await.map_err(|e| invalid(e.to_string()))?;
    let caps = runtime.capabilities(&digest).ok_or_else(|| invalid("the component did not load".to_owned()))?;
    Ok((digest, caps))
}

fn new_runtime(limits: Limits, reader: Seeded) -> Result<Arc<Runtime>, Stop> {
    let runtime = Runtime::new(limits, Arc::new(reader))
        .map_err(|e| Stop { exit: PLUGIN_FAILED, message: format!("the runtime did not start: {e:#}") })?;
    Ok(Arc::new(runtime.recording()))
}

async fn check(args: CheckArgs) -> Result<u8, Stop> {
    let wasm = read_component(&args.component)?;
    let size = wasm.len();
    // One call at a time: a single pooled slot is enough, and no spare (no next call).
    let limits = Limits { concurrent_calls: 1, spares: 0, ..Limits::default() };
    let runtime = new_runtime(limits, Seeded { state: BTreeMap::new(), grants: Default::default() })?;
    let (digest, caps) = load(&runtime, wasm).await?;
    let report = json!({
        "valid": true,
        "digest": digest,
        "size": size,
        "world": format!("sagahost:plugin@{}", caps.world),
        "outbound_http": caps.outbound_http,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("a JSON value serialises"));
    } else {
        println!(
            "ok: {} is a valid sagahost:plugin@{} component{}\ndigest: {digest}\nsize:   {size} bytes",
            args.component.display(),
            caps.world,
            if caps.outbound_http { " (imports wasi:http/outgoing-handler: needs grants)" } else { "" },
        );
    }
    Ok(RAN)
}

async fn run_call(args: RunArgs) -> Result<u8, Stop> {
    let input = match args.input.strip_prefix('@') {
        Some(path) => {
            std::fs::read_to_string(path).map_err(|e| usage(format!("cannot read the input file {path}: {e}")))?
        }
        None => args.input.clone(),
    };
    let input: Value = serde_json::from_str(&input).map_err(|e| usage(format!("--input is not JSON: {e}")))?;
    let execute_output = match &args.execute_output {
        Some(text) => {
            Some(serde_json::from_str::<Value>(text).map_err(|e| usage(format!("--output is not JSON: {e}")))?)
        }
        None => None,
    };
    if execute_output.is_some() && args.call == Export::Execute {
        return Err(usage("--output is execute's output, for --call compensate only"));
    }
    let state = match &args.state {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| usage(format!("cannot read the state file {}: {e}", path.display())))?;
            parse_state(&text).map_err(|e| usage(format!("the state file {}: {e}", path.display())))?
        }
        None => BTreeMap::new(),
    };
    let allowed_hosts = crate::grants::normalize(&args.allow_host).map_err(|e| usage(format!("--allow-host: {e}")))?;
    let credentials = crate::grants::normalize_credentials(&allowed_hosts, &args.credential)
        .map_err(|(field, e)| usage(format!("--credential ({field}): {e}")))?;
    for c in &credentials {
        crate::secrets::check(args.outbound_secrets_dir.as_ref(), &c.value)
            .await
            .map_err(|e| usage(format!("--credential for {} {}: {e}", c.origin, c.header)))?;
    }
    let grants = crate::grants::Grants { allowed_hosts, credentials };
    let wasm = read_component(&args.component)?;
    let plugin = args.plugin.clone().unwrap_or_else(|| {
        args.component.file_stem().map_or_else(|| "plugin".to_owned(), |s| s.to_string_lossy().into_owned())
    });
    let mut trust = args.outbound_ca_file.clone().unwrap_or_else(crate::runtime::TlsTrust::public);
    if let (Some(chain), Some(key)) = (&args.outbound_client_cert, &args.outbound_client_key) {
        trust = trust.presenting(chain, key).map_err(usage)?;
    }
    let limits = Limits {
        memory_bytes: args.plugin_memory_mib << 20,
        output_bytes: args.plugin_output_kib << 10,
        concurrent_calls: 1,
        // One call: no next call to make an instance ahead of.
        spares: 0,
        http: crate::runtime::HttpLimits {
            trust,
            proxy: args
                .outbound_proxy
                .clone()
                .map(|p| std::sync::Arc::new(p.bypassing(args.outbound_no_proxy.clone().unwrap_or_default()))),
            secrets: args.outbound_secrets_dir.clone(),
            ..crate::runtime::HttpLimits::default()
        },
        ..Limits::default()
    };
    let memory_limit = limits.memory_bytes;
    let runtime = new_runtime(limits, Seeded { state, grants: grants.clone() })?;
    let loading = std::time::Instant::now();
    let (digest, caps) = load(&runtime, wasm).await?;
    let load_ms = millis(loading.elapsed());
    let info = CallInfo {
        idempotency_key: format!("{}:{}:{}", args.saga_id, args.step, args.call.name()),
        saga_id: args.saga_id.clone(),
        saga_type: args.saga_type.clone(),
        step: args.step.clone(),
        attempt: args.attempt,
        signal: args.signal.clone(),
        signal_name: args.signal_name.clone(),
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    let input = input.to_string();
    let (report, ok) = match (args.call, execute_output) {
        (Export::Compensate, Some(output)) => {
            let outcome = runtime.compensate(&digest, &plugin, &info, &input, &output.to_string(), timeout).await;
            let (ok, output, error) = match &outcome.result {
                Ok(CompensateOutcome::Done(out)) => (true, Some(out.as_str()), None),
                Ok(CompensateOutcome::Failed(e)) => (false, None, Some(e.clone())),
                Err(e) => (false, None, Some(e.0.clone())),
            };
            (report(&outcome, output, None, error), ok)
        }
        _ => {
            let outcome = runtime.execute(&digest, &plugin, &info, &input, timeout).await;
            let (ok, output, wait, error) = match &outcome.result {
                Ok(ExecuteOutcome::Done(out)) => (true, Some(out.as_str()), None, None),
                Ok(ExecuteOutcome::Wait { delay_ms, signal }) => {
                    (true, None, Some(json!({ "delay_ms": delay_ms, "signal": signal })), None)
                }
                Ok(ExecuteOutcome::Retryable(e) | ExecuteOutcome::Rejected(e) | ExecuteOutcome::Trapped(e)) => {
                    (false, None, None, Some(e.clone()))
                }
                Err(e) => (false, None, None, Some(e.0.clone())),
            };
            (report(&outcome, output, wait, error), ok)
        }
    };
    let mut report = report;
    let header = json!({
        "component": args.component.display().to_string(),
        "digest": digest,
        "world": format!("sagahost:plugin@{}", caps.world),
        "plugin": plugin,
        "call": args.call.name(),
        "context": {
            "saga_id": info.saga_id, "saga_type": info.saga_type, "step": info.step,
            "attempt": info.attempt, "idempotency_key": info.idempotency_key,
            "signal": info.signal, "signal_name": info.signal_name,
        },
        "allowed_hosts": grants.allowed_hosts,
        "credentials": grants.credentials,
        "timeout_ms": args.timeout_ms,
        "memory_limit_bytes": memory_limit,
        "load_ms": load_ms,
    });
    if let (Value::Object(report), Value::Object(header)) = (&mut report, header) {
        for (k, v) in header {
            report.insert(k, v);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("a JSON value serialises"));
    } else {
        print!("{}", human(&report));
    }
    Ok(if ok { RAN } else { PLUGIN_FAILED })
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The report of one call, as `--json` prints it.
fn report<T>(outcome: &CallOutcome<T>, output: Option<&str>, wait: Option<Value>, error: Option<String>) -> Value {
    let writes: Vec<Value> = outcome
        .writes
        .iter()
        .map(|(key, value)| match value {
            Some(v) => json!({ "key": key, "op": "set", "value": shown(v) }),
            None => json!({ "key": key, "op": "delete", "value": null }),
        })
        .collect();
    let logs: Vec<Value> =
        outcome.recorded.logs.iter().map(|l| json!({ "level": l.level, "message": l.message })).collect();
    let requests: Vec<Value> = outcome
        .recorded
        .requests
        .iter()
        .map(|r| json!({ "method": r.method, "url": r.url, "status": r.status, "error": r.error }))
        .collect();
    let p = outcome.phases;
    json!({
        "outcome": outcome.label,
        "output": output.map(|o| serde_json::from_str::<Value>(o).unwrap_or_else(|_| Value::String(o.to_owned()))),
        "wait": wait,
        "error": error,
        "state_writes": writes,
        "logs": logs,
        "logs_dropped": outcome.recorded.logs_dropped,
        "wall_ms": millis(outcome.elapsed),
        "phases_ms": {
            "setup": millis(p.setup), "instantiate": millis(p.instantiate),
            "run": millis(p.run), "collect": millis(p.collect),
        },
        "cpu_ms": p.cpu.map(millis),
        "peak_memory_bytes": outcome.peak_memory_bytes,
        "outbound": requests,
        "reached_out": outcome.reached_out,
    })
}

/// The text report of one call.
fn human(r: &Value) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let _ = writeln!(
        s,
        "{} {} of {} ({})",
        r["plugin"].as_str().unwrap_or(""),
        r["call"].as_str().unwrap_or(""),
        text(&r["component"]),
        text(&r["world"])
    );
    let _ = writeln!(s, "outcome:  {}", text(&r["outcome"]));
    if !r["error"].is_null() {
        let _ = writeln!(s, "error:    {}", text(&r["error"]));
    }
    if !r["output"].is_null() {
        let _ = writeln!(s, "output:   {}", r["output"]);
    }
    if !r["wait"].is_null() {
        let _ = writeln!(s, "wait:     {}", r["wait"]);
    }
    let empty = Vec::new();
    let writes = r["state_writes"].as_array().unwrap_or(&empty);
    let _ = writeln!(s, "state writes: {}", writes.len());
    for w in writes {
        match w["op"].as_str() {
            Some("delete") => {
                let _ = writeln!(s, "  delete {}", text(&w["key"]));
            }
            _ => {
                let _ = writeln!(s, "  set    {} = {}", text(&w["key"]), w["value"]);
            }
        }
    }
    let logs = r["logs"].as_array().unwrap_or(&empty);
    let _ = writeln!(s, "logs: {}", logs.len());
    for l in logs {
        let _ = writeln!(s, "  {:5} {}", text(&l["level"]), text(&l["message"]));
    }
    if r["logs_dropped"].as_u64().unwrap_or(0) > 0 {
        let _ = writeln!(s, "  ({} more dropped over the per-call limit)", r["logs_dropped"]);
    }
    let requests = r["outbound"].as_array().unwrap_or(&empty);
    let _ = writeln!(s, "outbound requests: {}", requests.len());
    for q in requests {
        let result = if q["status"].is_null() { text(&q["error"]) } else { text(&q["status"]) };
        let _ = writeln!(s, "  {} {} -> {}", text(&q["method"]), text(&q["url"]), result);
    }
    let ph = &r["phases_ms"];
    let _ = writeln!(
        s,
        "wall time: {:.3} ms (setup {:.3}, instantiate {:.3}, run {:.3}, collect {:.3}); CPU time {:.3} ms",
        r["wall_ms"].as_f64().unwrap_or(0.0),
        ph["setup"].as_f64().unwrap_or(0.0),
        ph["instantiate"].as_f64().unwrap_or(0.0),
        ph["run"].as_f64().unwrap_or(0.0),
        ph["collect"].as_f64().unwrap_or(0.0),
        r["cpu_ms"].as_f64().unwrap_or(0.0),
    );
    let mib = |v: &Value| v.as_f64().unwrap_or(0.0) / f64::from(1 << 20);
    let _ = writeln!(
        s,
        "peak memory: {} bytes ({:.1} MiB of the {:.0} MiB limit)",
        r["peak_memory_bytes"],
        mib(&r["peak_memory_bytes"]),
        mib(&r["memory_limit_bytes"])
    );
    let _ = writeln!(
        s,
        "compile: {:.1} ms (before the call, once per version on a host)",
        r["load_ms"].as_f64().unwrap_or(0.0)
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_store_strings_raw_and_other_values_as_json() {
        let state = parse_state(r#"{"a": "text", "b": {"n": 1}, "c": 2}"#).unwrap();
        assert_eq!(state["a"], b"text");
        assert_eq!(state["b"], br#"{"n":1}"#);
        assert_eq!(state["c"], b"2");
        assert!(parse_state("[1]").unwrap_err().contains("object"));
        assert!(parse_state("{").unwrap_err().contains("not JSON"));
    }

    #[test]
    fn values_show_as_json_when_they_are_json() {
        assert_eq!(shown(br#"{"n":1}"#), json!({"n": 1}));
        assert_eq!(shown(b"plain"), json!("plain"));
    }

    #[tokio::test]
    async fn the_seeded_reader_scans_in_order_after_a_key() {
        let state = parse_state(r#"{"a/1": 1, "a/2": 2, "a/3": 3, "b/1": 4}"#).unwrap();
        let reader = Seeded { state, grants: Default::default() };
        let keys: Vec<String> =
            reader.scan("p", "a/", Some("a/1"), 10).await.unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["a/2", "a/3"]);
        assert_eq!(reader.scan("p", "a/", None, 1).await.unwrap().len(), 1);
        assert_eq!(reader.get("p", "b/1", false).await.unwrap().value, Some(b"4".to_vec()));
    }

    #[tokio::test]
    async fn bytes_that_are_no_component_are_refused_as_an_upload_would_be() {
        let runtime = new_runtime(
            Limits { concurrent_calls: 1, ..Limits::default() },
            Seeded { state: BTreeMap::new(), grants: Default::default() },
        )
        .unwrap();
        let stop = load(&runtime, Vec::new()).await.unwrap_err();
        assert_eq!(stop.exit, INVALID);
        let stop = load(&runtime, b"not wasm".to_vec()).await.unwrap_err();
        assert_eq!(stop.exit, INVALID);
        assert!(stop.message.contains("not a WebAssembly component"), "{}", stop.message);
    }
}
