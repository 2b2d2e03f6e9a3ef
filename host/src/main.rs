//! The `sagahost` binary: parses flags (each also an environment variable) and runs the app.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "sagahost", version, about = "Saga orchestrator with WebAssembly steps")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the host: HTTP API, saga driver and outbox relay.
    Serve(Serve),
}

#[derive(Parser)]
struct Serve {
    /// Address to listen on.
    #[arg(long, env = "SAGAHOST_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
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
    /// How long start-up waits for an unreachable database before giving up, in seconds.
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
    /// How often to look for plugins and bindings changed through other replicas, in ms.
    #[arg(long, env = "SAGAHOST_CATALOG_REFRESH_MS", default_value_t = 250, value_parser = clap::value_parser!(u64).range(10..))]
    catalog_refresh_ms: u64,
    /// Bearer token for the admin routes (/admin/...). Without one, admin routes answer 403.
    #[arg(long, env = "SAGAHOST_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// How long the order saga's payment may wait for its confirmation signal, in seconds.
    #[arg(long, env = "SAGAHOST_PAYMENT_DEADLINE_SECS", default_value_t = 900)]
    payment_deadline_secs: u64,
    /// Kafka bootstrap servers (host:port[,host:port]). Without them, events go to
    /// <data-dir>/events.jsonl.
    #[arg(long, env = "SAGAHOST_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// Kafka topic for the events.
    #[arg(long, env = "SAGAHOST_KAFKA_TOPIC", default_value = "sagahost.events")]
    kafka_topic: String,
    /// Extra librdkafka producer setting, KEY=VALUE (repeat the flag, or comma-separate in the
    /// environment variable), e.g. security.protocol=SASL_SSL or compression.type=lz4.
    #[arg(long = "kafka-config", env = "SAGAHOST_KAFKA_CONFIG", value_delimiter = ',', value_parser = parse_setting)]
    kafka_config: Vec<(String, String)>,
    /// Rotate <data-dir>/events.jsonl once it has reached this size, in MiB: between two
    /// batches it is renamed events.jsonl.1 and a new file begins. 0 never rotates.
    #[arg(long, env = "SAGAHOST_EVENTS_FILE_MAX_MIB", default_value_t = 256)]
    events_file_max_mib: u64,
    /// How many rotated events files to keep: events.jsonl.1 (the newest) to events.jsonl.N.
    #[arg(long, env = "SAGAHOST_EVENTS_FILE_KEEP", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    events_file_keep: u32,
    /// How long published outbox rows are kept, in hours.
    #[arg(long, env = "SAGAHOST_OUTBOX_RETENTION_HOURS", default_value_t = 24)]
    outbox_retention_hours: u64,
    /// How long idempotency keys are remembered, in hours (at least 24 is recommended).
    #[arg(long, env = "SAGAHOST_IDEMPOTENCY_TTL_HOURS", default_value_t = 24)]
    idempotency_ttl_hours: u64,
    /// Linear memory limit of one plugin call, in MiB.
    #[arg(long, env = "SAGAHOST_PLUGIN_MEMORY_MIB", default_value_t = 64)]
    plugin_memory_mib: usize,
    /// Largest output a plugin call may return, in KiB.
    #[arg(long, env = "SAGAHOST_PLUGIN_OUTPUT_KIB", default_value_t = 256)]
    plugin_output_kib: usize,
    /// Log lines kept per plugin call.
    #[arg(long, env = "SAGAHOST_PLUGIN_LOG_LINES", default_value_t = 100)]
    plugin_log_lines: u32,
    /// How many sagas run at once in this process.
    #[arg(long, env = "SAGAHOST_MAX_CONCURRENT_SAGAS", default_value_t = 64)]
    max_concurrent_sagas: usize,
    /// Log format: text or json.
    #[arg(long, env = "SAGAHOST_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn parse_setting(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
        _ => Err(format!("expected KEY=VALUE, got '{s}'")),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Command::Serve(args) = Cli::parse().command;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn".into());
    if args.log_format == "json" {
        tracing_subscriber::fmt().json().with_env_filter(filter).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }

    let mut config = sagahost::Config::embedded(&args.data_dir);
    config.listen = args.listen;
    config.database = args.database;
    config.host_id = args.host_id;
    config.database_max_connections = args.database_max_connections;
    config.database_wait = Duration::from_secs(args.database_wait_secs);
    config.driver.lease_ms = args.lease_ms;
    config.relay.lease = Duration::from_millis(args.relay_lease_ms);
    config.catalog_refresh = Duration::from_millis(args.catalog_refresh_ms);
    config.admin_token = args.admin_token;
    config.kafka = args.kafka_brokers.map(|brokers| sagahost::relay::kafka::KafkaOptions {
        brokers,
        topic: args.kafka_topic,
        settings: args.kafka_config,
    });
    config.events_file = sagahost::relay::jsonl::JsonlOptions {
        max_bytes: args.events_file_max_mib.saturating_mul(1 << 20),
        keep: args.events_file_keep,
    };
    config.outbox_retention = Duration::from_secs(args.outbox_retention_hours * 3600);
    config.payment_deadline = Duration::from_secs(args.payment_deadline_secs.max(1));
    config.idempotency_ttl = Duration::from_secs(args.idempotency_ttl_hours * 3600);
    config.limits.memory_bytes = args.plugin_memory_mib << 20;
    config.limits.output_bytes = args.plugin_output_kib << 10;
    config.limits.log_lines = args.plugin_log_lines;
    config.driver.max_concurrency = args.max_concurrent_sagas.max(1);

    let app = sagahost::App::build(config).await?;
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
    app.run(shutdown).await
}
