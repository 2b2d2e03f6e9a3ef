//! The sagahost demo services: inventory, payment and shipping as three small HTTP services,
//! each with its own SQLite database, a server-side idempotency table, an effects counter and
//! the triggers the end-to-end tests use. The HTTP contract is in this crate's README.
//!
//! Shape: [`Config`] (the command line) -> [`Services::build`] (open databases, bind ports)
//! -> [`Services::run`] (serve until shutdown). `main.rs` and the tests start exactly this.
//!
//! Code map: `server` holds what the services share (state, keyed-request gate, common routes),
//! `idempotency` the key rules, `effects` the counters, one module per service, and `webhook`
//! the payment service's signal to sagahost.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod effects;
mod error;
mod idempotency;
mod inventory;
mod payment;
mod server;
mod shipping;
mod webhook;

pub use idempotency::REPLAYED_HEADER;
pub use inventory::HUGE_PADDING;

/// Which services one process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    /// All three, each on its own port.
    All,
    /// Only the inventory service.
    Inventory,
    /// Only the payment service.
    Payment,
    /// Only the shipping service.
    Shipping,
}

/// The command line.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "sagahost-demo-services",
    version,
    about = "Demo inventory, payment and shipping services for sagahost"
)]
pub struct Config {
    /// Which services to run.
    #[arg(long, value_enum, default_value_t = Which::All)]
    pub service: Which,
    /// Directory of the SQLite files (inventory.db, payment.db, shipping.db); created if missing.
    #[arg(long, default_value = "./demo-data")]
    pub data_dir: PathBuf,
    /// Address of the inventory service (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:9001")]
    pub inventory_addr: SocketAddr,
    /// Address of the payment service.
    #[arg(long, default_value = "127.0.0.1:9002")]
    pub payment_addr: SocketAddr,
    /// Address of the shipping service.
    #[arg(long, default_value = "127.0.0.1:9003")]
    pub shipping_addr: SocketAddr,
    /// Base URL of sagahost, for the payment webhook.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub sagahost_url: String,
    /// Bearer token for the payment webhook, if sagahost requires one.
    #[arg(long)]
    pub sagahost_token: Option<String>,
    /// The saga type the payment webhook signals.
    #[arg(long, default_value = "order-http")]
    pub saga_type: String,
    /// How long the first request of a key with a `SLOW-` SKU sleeps, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub slow_ms: u64,
    /// How long a `tok_hold` charge holds its answer after committing, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub hold_ms: u64,
    /// A file holding the payment service's API key: when set, charges and refunds need
    /// `Authorization: Bearer <key>` (401 otherwise), as a real payment provider's API does.
    /// The file is read on every request, so replacing it rotates the key.
    #[arg(long, value_name = "FILE")]
    pub payment_api_key_file: Option<PathBuf>,
}

/// The services, built and bound, not yet serving.
pub struct Services {
    bound: Vec<Bound>,
    webhook: Option<webhook::Webhook>,
    shutdown: CancellationToken,
}

struct Bound {
    name: &'static str,
    listener: TcpListener,
    app: axum::Router,
}

impl Services {
    /// Opens the databases (creating the data directory and tables) and binds the ports.
    pub async fn build(config: &Config) -> anyhow::Result<Services> {
        tokio::fs::create_dir_all(&config.data_dir)
            .await
            .with_context(|| format!("cannot create the data directory {}", config.data_dir.display()))?;
        let shutdown = CancellationToken::new();
        let runs = |w: Which| config.service == Which::All || config.service == w;
        let mut bound = Vec::new();
        let mut hook = None;
        if runs(Which::Inventory) {
            let core = server::Core::open(
                inventory::NAME,
                &config.data_dir,
                inventory::SCHEMA,
                inventory::EFFECTS,
                shutdown.clone(),
            )
            .await?;
            let app = server::app(core.clone(), inventory::routes(core, Duration::from_millis(config.slow_ms)));
            bound.push(Bound { name: inventory::NAME, listener: bind(config.inventory_addr).await?, app });
        }
        if runs(Which::Payment) {
            let core = server::Core::open(
                payment::NAME,
                &config.data_dir,
                &payment::schema(),
                payment::EFFECTS,
                shutdown.clone(),
            )
            .await?;
            let webhook = webhook::Webhook::new(
                &config.sagahost_url,
                config.sagahost_token.clone(),
                config.saga_type.clone(),
                core.db.clone(),
                shutdown.clone(),
            )?;
            let routes = payment::routes(
                core.clone(),
                webhook.clone(),
                Duration::from_millis(config.hold_ms),
                config.payment_api_key_file.clone(),
            );
            hook = Some(webhook);
            bound.push(Bound {
                name: payment::NAME,
                listener: bind(config.payment_addr).await?,
                app: server::app(core, routes),
            });
        }
        if runs(Which::Shipping) {
            let core = server::Core::open(
                shipping::NAME,
                &config.data_dir,
                shipping::SCHEMA,
                shipping::EFFECTS,
                shutdown.clone(),
            )
            .await?;
            let app = server::app(core.clone(), shipping::routes(core));
            bound.push(Bound { name: shipping::NAME, listener: bind(config.shipping_addr).await?, app });
        }
        Ok(Services { bound, webhook: hook, shutdown })
    }

    /// Each running service's name and bound address, in the order inventory, payment, shipping.
    pub fn addrs(&self) -> Vec<(&'static str, SocketAddr)> {
        self.bound.iter().filter_map(|b| b.listener.local_addr().ok().map(|a| (b.name, a))).collect()
    }

    /// Serves until `shutdown` completes, then stops accepting, ends trigger sleeps early and
    /// lets open requests finish. Pending webhooks of an earlier run are sent again first.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        if let Some(webhook) = &self.webhook {
            webhook.resume().await.context("cannot read the pending payment webhooks")?;
        }
        let token = self.shutdown.clone();
        tokio::spawn(async move {
            shutdown.await;
            token.cancel();
        });
        let mut servers = tokio::task::JoinSet::new();
        for b in self.bound {
            let token = self.shutdown.clone();
            servers.spawn(async move { server::serve(b.listener, b.app, token).await.map_err(|e| (b.name, e)) });
        }
        let mut result = Ok(());
        while let Some(joined) = servers.join_next().await {
            match joined.context("a service task panicked")? {
                Ok(()) => {}
                Err((name, e)) => {
                    // One service failing takes the others down: a half-running demo confuses.
                    self.shutdown.cancel();
                    result = Err(anyhow::Error::new(e).context(format!("the {name} service stopped")));
                }
            }
        }
        result
    }
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))
}
