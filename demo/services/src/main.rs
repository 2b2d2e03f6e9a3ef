//! The `sagahost-demo-services` binary: parses the command line, starts the services, prints
//! one `listening <service> http://<addr>` line per service on stdout and serves until SIGTERM
//! or ctrl-c. Logs go to stderr (`RUST_LOG` filters them), so stdout carries only those lines.

use std::io::{IsTerminal as _, Write as _};

use clap::Parser as _;
use sagahost_demo_services::{Config, Services};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = Config::parse();
    let services = Services::build(&config).await?;
    let mut stdout = std::io::stdout().lock();
    for (name, addr) in services.addrs() {
        writeln!(stdout, "listening {name} http://{addr}")?;
    }
    stdout.flush()?;
    drop(stdout);
    tracing::info!(data_dir = %config.data_dir.display(), "demo services started");
    services.run(shutdown_signal()).await?;
    tracing::info!("demo services stopped");
    Ok(())
}

/// Completes on SIGTERM or ctrl-c (SIGINT).
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("ctrl-c: shutting down"),
        () = term => tracing::info!("SIGTERM: shutting down"),
    }
}
