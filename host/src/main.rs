//! The `sagahost` binary: parses flags (each also an environment variable) and runs the app,
//! the load generator (`sagahost bench`, in the library's `bench` module), a plugin author's
//! local tools (`sagahost plugin run|check`, in the library's `runner` module), or one of the
//! operator commands against a running host (`sagahost orders|plugins|sagas|audit|dead-letters`, in the
//! library's `cli` module).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use sagahost::flags::Secret;
use tokio_util::sync::CancellationToken;

/// mimalloc rather than glibc's malloc: the host allocates small, short-lived buffers on
/// many threads (requests, scripts, a store per plugin call), and glibc's arenas spent 11% of
/// the process's samples in malloc and free at 1,000 sagas/s (BENCHMARKS.md, session 16). C
/// libraries (SQLite, librdkafka) keep the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "sagahost", version, about = "Saga orchestrator with WebAssembly steps")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant, reason = "made once, from the command line")]
enum Command {
    /// Run the host: HTTP API, saga driver and outbox relay.
    Serve(Serve),
    /// Load-test a running host: closed or open loop, latency percentiles, throughput, errors.
    Bench(sagahost::bench::Args),
    /// A plugin author's tools, local and without a host: run one call of a component, or
    /// check it as an upload would.
    Plugin(sagahost::runner::Args),
    #[command(flatten)]
    Client(sagahost::cli::Command),
}

#[derive(Parser)]
struct Serve {
    /// Address to listen on.
    #[arg(long, env = "SAGAHOST_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Once the host is ready to serve, write the address it listens on (`IP:PORT` and a
    /// newline) to this file: with `--listen 127.0.0.1:0` the system picks a free port, and a
    /// supervisor or a test reads it here. Removed at start-up (a file left by a crash never
    /// names a port this process does not hold) and on an orderly stop.
    #[arg(long, env = "SAGAHOST_ADDR_FILE")]
    addr_file: Option<PathBuf>,
    /// Directory for the SQLite database, events.jsonl and the host identity.
    #[arg(long, env = "SAGAHOST_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// Database URL: sqlite:PATH, or postgres://USER[:PASSWORD]@HOST[:PORT]/DB for production
    /// (any number of replicas may share one PostgreSQL database). Default: a SQLite file in the
    /// data directory.
    #[arg(long, env = "SAGAHOST_DATABASE", hide_env_values = true)]
    database: Option<String>,
    /// Connections this process may open to PostgreSQL.
    #[arg(long, env = "SAGAHOST_DATABASE_MAX_CONNECTIONS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(2..))]
    database_max_connections: u32,
    /// How long start-up waits for an unreachable database, or for a lock its schema migration
    /// needs (another replica migrating), before giving up, in seconds.
    #[arg(long, env = "SAGAHOST_DATABASE_WAIT_SECS", default_value_t = 30)]
    database_wait_secs: u64,
    /// This process's identity in saga and relay leases. Default: one kept in
    /// <data-dir>/host-id. Replicas on one database need distinct identities.
    #[arg(long, env = "SAGAHOST_HOST_ID")]
    host_id: Option<String>,
    /// How long a replica's claim on a saga lasts without renewal, in milliseconds: how soon a
    /// dead replica's sagas are taken over. Renewed every third of it while a step runs.
    #[arg(long, env = "SAGAHOST_LEASE_MS", default_value_t = 60_000, value_parser = clap::value_parser!(i64).range(300..))]
    lease_ms: i64,
    /// How long the relay lease lasts without renewal, in milliseconds: how soon another
    /// replica takes over publishing events when the publishing one dies.
    #[arg(long, env = "SAGAHOST_RELAY_LEASE_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(300..))]
    relay_lease_ms: u64,
    /// Most events the relay reads, publishes and marks as one batch (one read, one fsync of
    /// events.jsonl or one round of Kafka acknowledgements, one mark).
    #[arg(long, env = "SAGAHOST_RELAY_BATCH_SIZE", default_value_t = sagahost::relay::RelayOptions::default().batch_size, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    relay_batch_size: u32,
    /// How often to look for plugins and bindings changed through other replicas, in ms.
    #[arg(long, env = "SAGAHOST_CATALOG_REFRESH_MS", default_value_t = 250, value_parser = clap::value_parser!(u64).range(10..))]
    catalog_refresh_ms: u64,
    /// Bearer token for the admin routes (/admin/...). Without one, admin routes answer 403.
    #[arg(long, env = "SAGAHOST_ADMIN_TOKEN", hide_env_values = true, value_parser = bearer_token)]
    admin_token: Option<String>,
    /// Bearer token that opens the client routes (/orders, /sagas); repeat the flag (or
    /// comma-separate in the environment variable) for several. Without one they are open.
    #[arg(long = "api-token", env = "SAGAHOST_API_TOKENS", hide_env_values = true, value_delimiter = ',', value_parser = bearer_token)]
    api_token: Vec<String>,
    /// A name requests may be addressed to (the Host header), besides localhost and IP
    /// addresses, while --listen is a loopback address: a DNS name pointing at 127.0.0.1
    /// (through a reverse proxy that keeps Host, say); other names are refused (403
    /// host_not_allowed), a defence against DNS rebinding. Repeat the flag (or comma-separate
    /// in the environment variable) for several; '*' lets any name through. Listed on another
    /// address, only the listed names (and localhost, IP addresses) are served.
    #[arg(long = "allowed-host", env = "SAGAHOST_ALLOWED_HOSTS", value_delimiter = ',', value_parser = sagahost::http::origin::check_allowed_host)]
    allowed_host: Vec<String>,
    /// Kafka bootstrap servers (host:port[,host:port]). Without them, events go to
    /// <data-dir>/events.jsonl.
    #[arg(long, env = "SAGAHOST_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// Kafka topic for the events.
    #[arg(long, env = "SAGAHOST_KAFKA_TOPIC", default_value = "sagahost.events")]
    kafka_topic: String,
    /// Extra librdkafka producer setting, KEY=VALUE (repeat the flag; its value may hold commas),
    /// e.g. security.protocol=SASL_SSL or compression.type=lz4. Without the flag, the
    /// environment variable SAGAHOST_KAFKA_CONFIG holds them comma-separated.
    #[arg(long = "kafka-config", value_parser = Secret(parse_setting))]
    kafka_config: Vec<(String, String)>,
    /// SAGAHOST_KAFKA_CONFIG, read when no --kafka-config is given.
    #[arg(long = "kafka-config-list", env = "SAGAHOST_KAFKA_CONFIG", hide = true, hide_env_values = true, value_parser = Secret(parse_settings))]
    kafka_config_list: Option<Settings>,
    /// Rotate <data-dir>/events.jsonl once it has reached this size, in MiB: between two
    /// batches it is renamed events.jsonl.1 and a new file begins. 0 never rotates.
    #[arg(long, env = "SAGAHOST_EVENTS_FILE_MAX_MIB", default_value_t = 256)]
    events_file_max_mib: u64,
    /// How many rotated events files to keep: events.jsonl.1 (the newest) to events.jsonl.N.
    #[arg(long, env = "SAGAHOST_EVENTS_FILE_KEEP", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    events_file_keep: u32,
    /// How long published outbox rows are kept, in hours (at most 876000, a hundred years).
    #[arg(long, env = "SAGAHOST_OUTBOX_RETENTION_HOURS", default_value_t = 24, value_parser = clap::value_parser!(u64).range(0..=MAX_HOURS))]
    outbox_retention_hours: u64,
    /// How long finished sagas (COMPLETED, CANCELLED) are kept, in hours, once their events are
    /// published; then they are deleted with their steps and events. Unset keeps them for ever.
    /// At least 1: a client told 201 polls its saga for the outcome, which must still be there.
    #[arg(long, env = "SAGAHOST_SAGA_RETENTION_HOURS", value_parser = clap::value_parser!(u64).range(1..=MAX_HOURS))]
    saga_retention_hours: Option<u64>,
    /// How long idempotency keys are remembered, in hours (at least 24 is recommended; at
    /// least 1, so that a key outlives the lock of a request still working under it).
    #[arg(long, env = "SAGAHOST_IDEMPOTENCY_TTL_HOURS", default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=MAX_HOURS))]
    idempotency_ttl_hours: u64,
    /// Memory limit of one plugin call (all its linear memories and tables together), in MiB
    /// (1 to 16384).
    #[arg(long, env = "SAGAHOST_PLUGIN_MEMORY_MIB", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=16384))]
    plugin_memory_mib: u64,
    /// Largest output a plugin call may return, in KiB (1 to 65536).
    #[arg(long, env = "SAGAHOST_PLUGIN_OUTPUT_KIB", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65536))]
    plugin_output_kib: u64,
    /// Log lines kept per plugin call.
    #[arg(long, env = "SAGAHOST_PLUGIN_LOG_LINES", default_value_t = 100)]
    plugin_log_lines: u32,
    /// Plugin instances made ahead of their calls, kept at most at once (0 to 1024; 0: none,
    /// each call instantiates its plugin on the saga's path). Each takes a sandbox slot of its
    /// own; making them costs CPU off the saga's path, which the calls' instantiation no
    /// longer takes on it.
    #[arg(long, env = "SAGAHOST_PLUGIN_SPARES", default_value_t = 64, value_parser = clap::value_parser!(u32).range(0..=1024))]
    plugin_spares: u32,
    /// HTTP requests one plugin call may make (sagahost:plugin@0.2.0); past it, requests fail
    /// inside the plugin and the step's last_error names the limit.
    #[arg(long, env = "SAGAHOST_PLUGIN_HTTP_MAX_REQUESTS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    plugin_http_max_requests: u32,
    /// Largest response body one plugin HTTP request may return, in bytes.
    #[arg(long, env = "SAGAHOST_PLUGIN_HTTP_MAX_RESPONSE_BYTES", default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(1..=(64 << 20)))]
    plugin_http_max_response_bytes: u64,
    /// A PEM file of certificate authorities that plugins' https requests may also chain to,
    /// besides the public ones (Mozilla's set): the private CA of the services your steps call.
    /// Read at start; a file that cannot be read or holds no certificate stops the host.
    #[arg(long, env = "SAGAHOST_OUTBOUND_CA_FILE", value_name = "PEM", value_parser = sagahost::runtime::TlsTrust::from_flag)]
    outbound_ca_file: Option<sagahost::runtime::TlsTrust>,
    /// A PEM file of the certificate (its chain, the host's own first) that the host presents
    /// to https services asking for a client certificate (mutual TLS); with
    /// --outbound-client-key. Read at start (a new certificate takes a restart).
    #[arg(long, env = "SAGAHOST_OUTBOUND_CLIENT_CERT", value_name = "PEM", requires = "outbound_client_key", value_parser = sagahost::runtime::ClientCertChain::from_flag)]
    outbound_client_cert: Option<sagahost::runtime::ClientCertChain>,
    /// A PEM file of that certificate's private key (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "SAGAHOST_OUTBOUND_CLIENT_KEY", value_name = "PEM", requires = "outbound_client_cert", value_parser = sagahost::runtime::ClientKey::from_flag)]
    outbound_client_key: Option<sagahost::runtime::ClientKey>,
    /// An HTTP forward proxy that plugins' outbound requests go through, as
    /// http://[user:password@]host:port: https services through a CONNECT tunnel (TLS end to
    /// end, the service's certificate checked as without it), http requests in absolute form.
    /// The user info, percent-encoded, is sent to the proxy as Basic credentials. Default:
    /// none, requests go straight to their services.
    #[arg(long, env = "SAGAHOST_OUTBOUND_PROXY", hide_env_values = true, value_name = "URL", value_parser = Secret(sagahost::runtime::Proxy::parse))]
    outbound_proxy: Option<sagahost::runtime::Proxy>,
    /// Destinations reached without the proxy: a comma-separated list of host names (each with
    /// every name under it: corp.internal matches pay.corp.internal), IP addresses, CIDR blocks
    /// (matched against IP addresses in URLs; names are not resolved for it), or * for all.
    #[arg(long, env = "SAGAHOST_OUTBOUND_NO_PROXY", value_name = "LIST", requires = "outbound_proxy", value_parser = sagahost::runtime::NoProxy::from_flag)]
    outbound_no_proxy: Option<sagahost::runtime::NoProxy>,
    /// A directory of secrets, one per file, named by the file (a Kubernetes secret volume of
    /// its own, a Docker secret), for the credentials granted to plugins (`PUT
    /// /admin/plugins/{name}/grants`): the host sets them as headers on the plugins' requests,
    /// so a plugin never sees one. Hold only plugins' credentials there: the admin token can
    /// grant any of them to any origin. Each file is read when a request needs it, so a
    /// rotated secret takes effect without a restart. Default: none, no credential can be
    /// granted.
    #[arg(long, env = "SAGAHOST_OUTBOUND_SECRETS_DIR", value_name = "DIR", value_parser = sagahost::secrets::Secrets::from_flag)]
    outbound_secrets_dir: Option<sagahost::secrets::Secrets>,
    /// How many sagas run at once in this process.
    #[arg(long, env = "SAGAHOST_MAX_CONCURRENT_SAGAS", default_value_t = 64)]
    max_concurrent_sagas: usize,
    /// How many sagas created here may wait for one of those places; past it, creating a saga
    /// answers 503 with Retry-After at once, before any write (load shedding).
    #[arg(long, env = "SAGAHOST_MAX_QUEUED_SAGAS", default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    max_queued_sagas: u64,
    /// Most transitions of one saga committed together (a chain of host-only steps); 1 commits
    /// every transition alone.
    #[arg(long, env = "SAGAHOST_MAX_CHAIN", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=256))]
    max_chain: u64,
    /// HTTP requests handled at once; more are answered 503 with Retry-After at once.
    #[arg(long, env = "SAGAHOST_MAX_IN_FLIGHT_REQUESTS", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    max_in_flight_requests: u64,
    /// The longest one HTTP request may take, its body included; then 503. A plugin upload, which
    /// compiles the component, gets at least 300 s. At most 1800: a keyed request's key is held
    /// for its deadline plus 30 s, well within the shortest time to live of a key (1 h).
    #[arg(long, env = "SAGAHOST_REQUEST_TIMEOUT_SECS", default_value_t = 45, value_parser = clap::value_parser!(u64).range(31..=1800))]
    request_timeout_secs: u64,
    /// Requests waiting with `Prefer: wait` at once; more are answered without waiting.
    #[arg(long, env = "SAGAHOST_MAX_WAITERS", default_value_t = 512)]
    max_waiters: usize,
    /// How long a client may take to send a request's line and headers; then the connection
    /// is closed.
    #[arg(long, env = "SAGAHOST_HEADER_READ_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    header_read_timeout_secs: u64,
    /// How long writing an answer may make no progress (the client reads none of it) before
    /// the connection is closed: a client that stops reading cannot hold a connection.
    #[arg(long, env = "SAGAHOST_WRITE_STALL_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    write_stall_timeout_secs: u64,
    /// Open HTTP connections; more wait to be accepted.
    #[arg(long, env = "SAGAHOST_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// Log format: text or json.
    #[arg(long, env = "SAGAHOST_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// OpenTelemetry collector to send traces to over OTLP/HTTP (protobuf), e.g.
    /// http://localhost:4318 (`/v1/traces` is appended). Without one, no traces are made.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

/// Writes `--addr-file`: whole or not at all (a temporary file renamed over it), so that a
/// reader never sees half an address.
fn write_addr_file(path: &Path, addr: SocketAddr) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{addr}\n")).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

fn remove_addr_file(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing the address file {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// The longest retention or time to live a flag takes, in hours (a hundred years): in
/// milliseconds past any clock's now, it is still far from overflowing an `i64`.
const MAX_HOURS: u64 = 876_000;

/// One `--kafka-config KEY=VALUE`. The value may be a secret (`sasl.password`): an error never
/// repeats it.
fn parse_setting(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
        Some(_) => Err("expected KEY=VALUE, got a setting without a key".to_owned()),
        None => Err("expected KEY=VALUE, got a setting without '='".to_owned()),
    }
}

/// `SAGAHOST_KAFKA_CONFIG`: comma-separated `KEY=VALUE` settings, each parsed by
/// [`parse_setting`]. (On the command line `--kafka-config` takes one setting per flag, and
/// its value may hold commas.)
fn parse_settings(s: &str) -> Result<Settings, String> {
    s.split(',').filter(|part| !part.trim().is_empty()).map(parse_setting).collect::<Result<_, _>>().map(Settings)
}

/// Settings parsed from one comma-separated list.
#[derive(Clone, Debug)]
struct Settings(Vec<(String, String)>);

/// A bearer token as a client can present it: without the spaces and line ends around it (a
/// token read from a secret file often ends with a newline, and a header's value never
/// carries them), and refused if it holds what no header can carry.
fn bearer_token(s: &str) -> Result<String, String> {
    let token = s.trim();
    // An empty token (an unset variable in `--admin-token "$TOKEN"`) would turn the admin API
    // on with a token no client can send: every call 401, for a reason nobody can see.
    if token.is_empty() {
        return Err("a token cannot be empty (leave the flag out to run without one)".to_owned());
    }
    if token.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
        return Err("a token is printable ASCII without spaces (what an Authorization header carries)".to_owned());
    }
    Ok(token.to_owned())
}

/// The app's configuration from the flags; an error says which flags do not go together.
fn config(args: Serve) -> Result<sagahost::Config, String> {
    let mut config = sagahost::Config::embedded(&args.data_dir);
    config.listen = args.listen;
    config.database = args.database;
    config.host_id = args.host_id;
    config.database_max_connections = args.database_max_connections;
    config.database_wait = Duration::from_secs(args.database_wait_secs);
    config.driver.lease_ms = args.lease_ms;
    config.relay.lease = Duration::from_millis(args.relay_lease_ms);
    config.relay.batch_size = args.relay_batch_size;
    config.catalog_refresh = Duration::from_millis(args.catalog_refresh_ms);
    config.admin_token = args.admin_token;
    config.api_tokens = args.api_token;
    config.allowed_hosts = args.allowed_host;
    config.kafka = args.kafka_brokers.map(|brokers| sagahost::relay::kafka::KafkaOptions {
        brokers,
        topic: args.kafka_topic,
        settings: match args.kafka_config.is_empty() {
            true => args.kafka_config_list.map(|list| list.0).unwrap_or_default(),
            false => args.kafka_config,
        },
    });
    config.events_file = sagahost::relay::jsonl::JsonlOptions {
        max_bytes: args.events_file_max_mib.saturating_mul(1 << 20),
        keep: args.events_file_keep,
    };
    // In range (the flags' bounds), so none of these products overflows.
    config.outbox_retention = Duration::from_secs(args.outbox_retention_hours * 3600);
    config.saga_retention = args.saga_retention_hours.map(|h| Duration::from_secs(h * 3600));
    config.idempotency_ttl = Duration::from_secs(args.idempotency_ttl_hours * 3600);
    config.limits.memory_bytes = usize::try_from(args.plugin_memory_mib << 20).unwrap_or(usize::MAX);
    config.limits.output_bytes = usize::try_from(args.plugin_output_kib << 10).unwrap_or(usize::MAX);
    config.limits.log_lines = args.plugin_log_lines;
    config.limits.spares = args.plugin_spares;
    let trust = args.outbound_ca_file.clone().unwrap_or_else(sagahost::runtime::TlsTrust::public);
    config.limits.http = sagahost::runtime::HttpLimits {
        max_requests: args.plugin_http_max_requests,
        max_response_bytes: args.plugin_http_max_response_bytes,
        trust: match (&args.outbound_client_cert, &args.outbound_client_key) {
            (Some(chain), Some(key)) => trust.presenting(chain, key)?,
            _ => trust,
        },
        proxy: args.outbound_proxy.map(|p| Arc::new(p.bypassing(args.outbound_no_proxy.unwrap_or_default()))),
        secrets: args.outbound_secrets_dir,
    };
    config.driver.max_concurrency = args.max_concurrent_sagas.max(1);
    config.driver.max_queued = usize::try_from(args.max_queued_sagas).unwrap_or(usize::MAX);
    config.driver.chain_max = args.max_chain as usize;
    // A pooled sandbox per call the driver may run at once (each saga makes one call at a
    // time), never fewer than the default pool.
    config.limits.concurrent_calls =
        u32::try_from(config.driver.max_concurrency).unwrap_or(u32::MAX).max(config.limits.concurrent_calls);
    config.serve = sagahost::http::limits::ServeLimits {
        max_in_flight: args.max_in_flight_requests as usize,
        request_timeout: Duration::from_secs(args.request_timeout_secs),
        max_waiters: args.max_waiters,
        max_connections: args.max_connections as usize,
        header_read_timeout: Duration::from_secs(args.header_read_timeout_secs),
        write_stall_timeout: Duration::from_secs(args.write_stall_timeout_secs),
    };
    Ok(config)
}

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let args = match Cli::parse().command {
        Command::Serve(args) => args,
        Command::Bench(args) => return Ok(sagahost::bench::run(args).await),
        Command::Plugin(args) => return Ok(sagahost::runner::run(args).await),
        Command::Client(command) => return Ok(sagahost::cli::run(command).await),
    };
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn".into());
    // Lines go to stdout in batches from a thread of their own (`logs.rs`); the guard writes
    // out what is still buffered when main returns.
    let (stdout, _log_guard) = sagahost::logs::stdout()?;
    let logs = if args.log_format == "json" {
        tracing_subscriber::fmt::layer().json().with_writer(stdout).boxed()
    } else {
        tracing_subscriber::fmt::layer().with_writer(stdout).boxed()
    };
    // Traces: only with an endpoint; the log filter does not thin them out.
    let exporter = match args.otlp_endpoint.as_deref().filter(|e| !e.trim().is_empty()) {
        Some(endpoint) => Some(sagahost::telemetry::Exporter::new(endpoint)?),
        None => None,
    };
    let traces = exporter.as_ref().map(|e| {
        let targets = tracing_subscriber::filter::Targets::new().with_target("sagahost", tracing::Level::INFO);
        e.layer().with_filter(targets)
    });
    tracing_subscriber::registry().with(logs.with_filter(filter)).with(traces).init();

    let addr_file = args.addr_file.clone();
    if let Some(path) = &addr_file {
        remove_addr_file(path)?;
    }
    let config = config(args).unwrap_or_else(|e| {
        use clap::CommandFactory as _;
        Cli::command().error(clap::error::ErrorKind::ArgumentConflict, e).exit()
    });
    let app = sagahost::App::build(config).await?;
    if let Some(path) = &addr_file {
        write_addr_file(path, app.local_addr())?;
    }
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing SIGTERM handler");
        #[cfg(unix)]
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        signal.cancel();
    });
    let ran = app.run(shutdown).await;
    if let Some(exporter) = exporter {
        exporter.shutdown().await;
    }
    let removed = addr_file.as_deref().map_or(Ok(()), remove_addr_file);
    // The run's own error, if any, is the one to report.
    ran?;
    removed?;
    // The last line; the log guard writes it out as main returns.
    tracing::info!("sagahost stopped");
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn flags_that_carry_secrets_never_show_their_environment_values_in_help() {
        let cli = Cli::command();
        let serve = cli.find_subcommand("serve").expect("a serve subcommand");
        let mut secret = 0;
        for arg in serve.get_arguments() {
            let id = arg.get_id().as_str();
            if ["admin_token", "kafka_config_list", "database", "api_token", "outbound_proxy"].contains(&id) {
                secret += 1;
                assert!(arg.is_hide_env_values_set(), "--{id} would print its secret in `serve --help`");
            }
        }
        assert!(secret >= 2, "the secret-bearing flags were not found");
    }

    #[test]
    fn a_token_read_from_a_secret_file_loses_its_newline_and_one_no_header_carries_is_refused() {
        let parse = |args: &[&str]| {
            let mut argv = vec!["sagahost", "serve"];
            argv.extend_from_slice(args);
            match Cli::try_parse_from(argv).map(|c| c.command) {
                Ok(Command::Serve(serve)) => Ok((serve.admin_token, serve.api_token)),
                Ok(_) => panic!("not a serve command"),
                Err(e) => Err(e.to_string()),
            }
        };
        let (admin, api) = parse(&["--admin-token", "s3cret\n", "--api-token", " t1\r\n"]).unwrap();
        assert_eq!(admin.as_deref(), Some("s3cret"));
        assert_eq!(api, ["t1"]);
        for bad in ["two words", "tab\tinside", "zoë"] {
            let e = parse(&["--admin-token", bad]).expect_err(bad);
            assert!(e.contains("printable ASCII"), "{bad}: {e}");
        }
        for (flag, empty) in [("--admin-token", ""), ("--admin-token", " \n"), ("--api-token", "t1,,t2")] {
            let e = parse(&[flag, empty]).expect_err(empty);
            assert!(e.contains("a token cannot be empty"), "{flag} {empty:?}: {e}");
        }
    }

    #[test]
    fn the_cli_is_well_formed_and_bench_hides_its_token_too() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        let bench = cli.find_subcommand("bench").expect("a bench subcommand");
        let token = bench.get_arguments().find(|a| a.get_id() == "api_token").expect("bench --api-token");
        assert!(token.is_hide_env_values_set(), "--api-token would print its secret in `bench --help`");
    }

    #[test]
    fn the_client_commands_hide_their_tokens_and_take_global_flags_before_or_after_the_subcommand() {
        let cli = Cli::command();
        for group in ["orders", "plugins", "sagas", "audit"] {
            let sub = cli.find_subcommand(group).unwrap_or_else(|| panic!("a {group} subcommand"));
            for id in ["admin_token", "api_token"] {
                let arg = sub.get_arguments().find(|a| a.get_id() == id).unwrap_or_else(|| panic!("{group} --{id}"));
                assert!(arg.is_hide_env_values_set(), "{group} --{id} would print its secret in --help");
            }
        }
        for args in [
            &["sagahost", "orders", "--url", "http://h:1", "-o", "json", "get", "x"][..],
            &["sagahost", "orders", "get", "x", "--url", "http://h:1", "--output", "json"],
        ] {
            let Command::Client(sagahost::cli::Command::Orders(orders)) = Cli::try_parse_from(args).unwrap().command
            else {
                panic!("{args:?} parsed as another command")
            };
            assert_eq!(orders.global.url, "http://h:1");
            assert_eq!(orders.global.output, sagahost::cli::Output::Json);
        }
        // `serve` and `bench` are untouched by the client commands, and no subcommand is still
        // a usage error (exit 2), not a client command.
        assert!(matches!(Cli::try_parse_from(["sagahost", "serve"]).unwrap().command, Command::Serve(_)));
        assert!(matches!(Cli::try_parse_from(["sagahost", "bench"]).unwrap().command, Command::Bench(_)));
        let usage = |args: &[&str]| Cli::try_parse_from(args).map(|_| ()).unwrap_err().exit_code();
        assert_eq!(usage(&["sagahost"]), 2);
        assert_eq!(usage(&["sagahost", "orders", "list", "--limit", "0"]), 2);
        assert_eq!(usage(&["sagahost", "orders", "get", "x", "--url", "https://h"]), 2);
        assert_eq!(usage(&["sagahost", "plugins", "upload", "f.wasm", "--name", "p", "--compensate-only"]), 2);
        assert_eq!(usage(&["sagahost", "plugins", "bind", "order/payment"]), 2);
        assert_eq!(usage(&["sagahost", "sagas", "resolve", "x"]), 2);
        // A key forgotten at once would let its retry create a second saga.
        assert_eq!(usage(&["sagahost", "serve", "--idempotency-ttl-hours", "0"]), 2);
        // A saga deleted a minute after it finished: its client, told 201, polls a 404.
        assert_eq!(usage(&["sagahost", "serve", "--saga-retention-hours", "0"]), 2);
        // Hours past the bound would overflow into a retention in the future (every row
        // deleted at once) or a key that expires before it is stored.
        for flag in ["--outbox-retention-hours", "--saga-retention-hours", "--idempotency-ttl-hours"] {
            assert_eq!(usage(&["sagahost", "serve", flag, "99999999999999"]), 2, "{flag}");
            assert_eq!(usage(&["sagahost", "serve", flag, "18446744073709551615"]), 2, "{flag}");
        }
        // A limit shifted past a usize's bits would wrap to nothing.
        assert_eq!(usage(&["sagahost", "serve", "--plugin-memory-mib", "17592186044416"]), 2);
        assert_eq!(usage(&["sagahost", "serve", "--plugin-output-kib", "0"]), 2);
        // Each spare reserves a sandbox slot's address space (4 GiB).
        assert_eq!(usage(&["sagahost", "serve", "--plugin-spares", "1025"]), 2);
        // A key held past its time to live would be forgotten while its request runs.
        assert_eq!(usage(&["sagahost", "serve", "--request-timeout-secs", "1801"]), 2);
    }

    #[test]
    fn a_kafka_setting_on_the_command_line_keeps_its_commas_and_the_environment_list_is_split() {
        let settings = |flags: &[&str]| config_of(flags).kafka.expect("brokers given").settings;
        assert_eq!(
            settings(&[
                "--kafka-brokers",
                "b:9092",
                "--kafka-config",
                "ssl.cipher.suites=A,B",
                "--kafka-config",
                "acks=all"
            ]),
            [("ssl.cipher.suites".to_owned(), "A,B".to_owned()), ("acks".to_owned(), "all".to_owned())]
        );
        // SAGAHOST_KAFKA_CONFIG is read through this hidden flag.
        assert_eq!(
            settings(&["--kafka-brokers", "b:9092", "--kafka-config-list", "linger.ms=10, acks=all,"]),
            [("linger.ms".to_owned(), "10".to_owned()), ("acks".to_owned(), "all".to_owned())]
        );
        // A mistyped secret is not repeated in the error.
        let Err(e) = Cli::try_parse_from(["sagahost", "serve", "--kafka-config", "hunter2"]) else {
            panic!("a setting without '=' was accepted")
        };
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    fn config_of(flags: &[&str]) -> sagahost::Config {
        let cli = Cli::try_parse_from(["sagahost", "serve"].iter().chain(flags)).unwrap();
        let Command::Serve(args) = cli.command else { unreachable!("parsed as serve") };
        config(args).unwrap()
    }

    #[test]
    fn the_plugin_limit_flags_reach_the_runtimes_limits() {
        let limits = config_of(&[
            "--plugin-memory-mib",
            "3",
            "--plugin-output-kib",
            "5",
            "--plugin-log-lines",
            "7",
            "--plugin-http-max-requests",
            "2",
            "--plugin-http-max-response-bytes",
            "100",
            "--plugin-spares",
            "0",
        ])
        .limits;
        assert_eq!((limits.memory_bytes, limits.output_bytes, limits.log_lines), (3 << 20, 5 << 10, 7));
        assert_eq!(limits.spares, 0);
        assert_eq!((limits.http.max_requests, limits.http.max_response_bytes), (2, 100));
        // The flags' defaults are the library's defaults.
        let (flags, library) = (config_of(&[]).limits, sagahost::runtime::Limits::default());
        assert_eq!(
            (flags.memory_bytes, flags.output_bytes, flags.log_lines, flags.spares),
            (library.memory_bytes, library.output_bytes, library.log_lines, library.spares)
        );
        assert_eq!(
            (flags.http.max_requests, flags.http.max_response_bytes),
            (library.http.max_requests, library.http.max_response_bytes)
        );
        assert_eq!(format!("{:?}", flags.http.trust), "TlsTrust { public CAs and 0 added }");
    }

    #[test]
    fn a_client_certificate_is_presented_only_with_its_own_key() {
        let tls = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tls/");
        let (cert, key, other_key) =
            (format!("{tls}client.pem"), format!("{tls}client.key"), format!("{tls}localhost.key"));
        let trust = config_of(&["--outbound-client-cert", &cert, "--outbound-client-key", &key]).limits.http.trust;
        assert_eq!(format!("{trust:?}"), "TlsTrust { public CAs and 0 added, presenting a client certificate }");
        // One without the other is a usage error, and so is a file that holds no such thing.
        for flags in [vec!["--outbound-client-cert", &cert], vec!["--outbound-client-key", &key]] {
            let err = Cli::try_parse_from(["sagahost", "serve"].iter().chain(&flags)).err().expect("refused");
            assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument, "{err}");
        }
        let err =
            Cli::try_parse_from(["sagahost", "serve", "--outbound-client-cert", &key, "--outbound-client-key", &key]);
        assert!(err.err().expect("refused").to_string().contains("no certificate"));
        let err =
            Cli::try_parse_from(["sagahost", "serve", "--outbound-client-cert", &cert, "--outbound-client-key", &cert]);
        assert!(err.err().expect("refused").to_string().contains("no private key"));
        // Another certificate's key: refused when the flags are put together.
        let cli = ["sagahost", "serve", "--outbound-client-cert", &cert, "--outbound-client-key", &other_key];
        let Command::Serve(args) = Cli::try_parse_from(cli).unwrap().command else { unreachable!() };
        let err = config(args).err().expect("a key that is not the certificate's");
        assert!(err.contains("cannot be used together"), "{err}");
    }

    #[test]
    fn the_proxy_flags_parse_and_the_bypass_list_needs_a_proxy() {
        let proxy = config_of(&[
            "--outbound-proxy",
            "http://u:secret@proxy.internal:3128",
            "--outbound-no-proxy",
            "corp.internal,10.0.0.0/8",
        ])
        .limits
        .http
        .proxy
        .expect("a proxy");
        assert_eq!(format!("{proxy:?}"), "Proxy { http://proxy.internal:3128 with credentials, 2 bypassing }");
        let err =
            Cli::try_parse_from(["sagahost", "serve", "--outbound-no-proxy", "corp.internal"]).err().expect("refused");
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument, "{err}");
        let err = Cli::try_parse_from(["sagahost", "serve", "--outbound-proxy", "https://u:hunter2@proxy:3128"])
            .err()
            .expect("refused");
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{err}");
        assert!(err.to_string().contains("plain http") && !err.to_string().contains("hunter2"), "{err}");
        assert!(config_of(&[]).limits.http.proxy.is_none());
    }

    #[test]
    fn outbound_ca_file_adds_its_certificates_and_a_bad_one_stops_the_host() {
        let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tls/ca.pem");
        let trust = config_of(&["--outbound-ca-file", ca]).limits.http.trust;
        assert_eq!(format!("{trust:?}"), "TlsTrust { public CAs and 1 added }");
        let key = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tls/localhost.key");
        for (file, why) in [("/nonexistent/ca.pem", "cannot read"), (key, "no certificate")] {
            let err = Cli::try_parse_from(["sagahost", "serve", "--outbound-ca-file", file]).err().expect("refused");
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{err}");
            assert!(err.to_string().contains(why) && err.to_string().contains(file), "{err}");
        }
    }
}
