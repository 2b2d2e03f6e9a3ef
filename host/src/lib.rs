//! sagahost: a saga orchestrator whose steps are sandboxed WebAssembly components.
//!
//! The library is the whole application; `main.rs` only parses flags. [`App::build`] wires the
//! parts from a [`Config`] and [`App::run`] serves until the shutdown token fires, so tests
//! start exactly what production starts. See ARCHITECTURE.md for the map.

pub mod bench;
pub mod builtin;
pub mod catalog;
pub mod cli;
pub mod clock;
pub mod driver;
pub mod engine;
pub mod event;
pub mod failpoint;
pub mod flags;
pub mod grants;
pub mod http;
pub mod logs;
pub mod metrics;
pub mod relay;
pub mod runner;
pub mod runtime;
pub mod saga;
pub mod scaffold;
pub mod secrets;
pub mod store;
pub mod telemetry;
pub mod text;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::clock::{Clock, SyncedClock, SystemClock};
use crate::driver::{Driver, DriverHandle, DriverOptions};
use crate::relay::{Relay, RelayOptions, Sink};
use crate::runtime::{PluginReader, Runtime};
use crate::store::{JanitorStore, Store};

/// Everything needed to build an [`App`].
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Holds the SQLite file, `events.jsonl` and the host identity.
    pub data_dir: PathBuf,
    /// A `sqlite:` or `postgres://` URL; `None` means `<data_dir>/sagahost.db`.
    pub database: Option<String>,
    /// Size of the PostgreSQL connection pool of this process.
    pub database_max_connections: u32,
    /// How long start-up keeps retrying a database it cannot reach (it may be starting too).
    pub database_wait: Duration,
    /// This process's identity in leases; `None` keeps one in `<data_dir>/host-id`. Replicas
    /// on one database must have different identities (different data dirs do that).
    pub host_id: Option<String>,
    /// How often the catalog checks the store for plugins and definitions changed through
    /// other replicas.
    pub catalog_refresh: Duration,
    pub idempotency_ttl: Duration,
    /// Bearer token for the admin routes; `None` turns them off.
    pub admin_token: Option<String>,
    /// Bearer tokens for the client routes; empty leaves them open.
    pub api_tokens: Vec<String>,
    /// Names requests may be addressed to besides `localhost` and IP addresses, while the
    /// host listens on a loopback address (`--allowed-host`; `http::origin`).
    pub allowed_hosts: Vec<String>,
    /// Publish events to Kafka instead of `<data_dir>/events.jsonl`.
    pub kafka: Option<relay::kafka::KafkaOptions>,
    /// When `<data_dir>/events.jsonl` rotates (unused with Kafka).
    pub events_file: relay::jsonl::JsonlOptions,
    /// How long published outbox rows are kept before they are deleted.
    pub outbox_retention: Duration,
    /// How long finished sagas (COMPLETED, CANCELLED) are kept, with their steps and events,
    /// once their events are published; `None` keeps them for ever.
    pub saga_retention: Option<Duration>,
    pub limits: runtime::Limits,
    /// How much the HTTP layer takes on at once, and for how long.
    pub serve: http::limits::ServeLimits,
    pub driver: DriverOptions,
    pub relay: RelayOptions,
    pub clock: Arc<dyn Clock>,
}

impl Config {
    /// The embedded default: 127.0.0.1:8080, SQLite and events.jsonl under `data_dir`.
    pub fn embedded(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: data_dir.into(),
            database: None,
            database_max_connections: store::postgres::DEFAULT_MAX_CONNECTIONS,
            database_wait: Duration::from_secs(30),
            host_id: None,
            catalog_refresh: Duration::from_millis(250),
            idempotency_ttl: Duration::from_secs(24 * 3600),
            admin_token: None,
            api_tokens: Vec::new(),
            allowed_hosts: Vec::new(),
            kafka: None,
            events_file: relay::jsonl::JsonlOptions::default(),
            outbox_retention: Duration::from_secs(24 * 3600),
            saga_retention: None,
            limits: runtime::Limits::default(),
            serve: http::limits::ServeLimits::default(),
            driver: DriverOptions::default(),
            relay: RelayOptions::default(),
            clock: Arc::new(SystemClock),
        }
    }
}

/// Lets the runtime read plugin state and grants through the store without depending on it.
pub(crate) struct StoreReader(pub(crate) Arc<dyn Store>);

#[async_trait]
impl PluginReader for StoreReader {
    async fn get(&self, plugin: &str, key: &str, guess: bool) -> anyhow::Result<crate::store::StateRead> {
        Ok(self.0.state_read(plugin, key, guess).await?)
    }

    async fn scan(
        &self,
        plugin: &str,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        Ok(self.0.state_scan(plugin, prefix, after, limit).await?)
    }

    async fn grants(&self, plugin: &str) -> anyhow::Result<crate::grants::Grants> {
        Ok(self.0.grants(plugin).await?)
    }
}

/// A built, not yet running, sagahost.
pub struct App {
    listener: http::limits::LimitedListener,
    router: axum::Router,
    driver: Driver,
    relay: Relay,
    store: Arc<dyn Store>,
    catalog: Arc<Catalog>,
    handle: DriverHandle,
    clock: Arc<dyn Clock>,
    /// The clock kept to the database's, when replicas may share it, and where its offset is
    /// reported.
    clock_sync: Option<(Arc<SyncedClock>, Arc<metrics::Metrics>)>,
    /// This process's identity in leases.
    owner: String,
    outbox_retention: Duration,
    saga_retention: Option<Duration>,
    serve: http::limits::ServeLimits,
    catalog_refresh: Duration,
}

/// Opens the configured store, retrying for `database_wait` while the server cannot be reached
/// (a database that starts with the hosts, a failover) or the schema's migration waits past
/// the session's lock timeout (another replica migrates, or holds a lock a migration needs);
/// any other error ends start-up at once. A failed attempt's connections close with it, and
/// the locks they held with them.
async fn open_store(config: &Config) -> Result<Arc<dyn Store>, store::Error> {
    let started = std::time::Instant::now();
    loop {
        match store::open_exclusive(config.database.as_deref(), &config.data_dir, config.database_max_connections).await
        {
            Err(e @ store::Error::Connect(_)) if started.elapsed() < config.database_wait => {
                tracing::warn!(error = %e, "the database is not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e @ store::Error::Migrate(_)) if e.is_transient() && started.elapsed() < config.database_wait => {
                tracing::warn!(error = %e, "the schema's migration waited too long for a lock (another replica migrating?); retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}

/// A stable identity for this data directory's host process, so that a restarted process
/// recognises (and releases at once) the claims its predecessor died holding.
fn host_identity(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = data_dir.join("host-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
        _ => {
            let id = format!("host-{}", uuid::Uuid::new_v4());
            std::fs::write(&path, &id).with_context(|| format!("writing {}", path.display()))?;
            Ok(id)
        }
    }
}

impl App {
    /// Opens the database (running migrations), loads the plugins, and binds the listener.
    pub async fn build(mut config: Config) -> anyhow::Result<App> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
        let store = open_store(&config).await.context("opening the database")?;
        config.driver.owner = match config.host_id.clone().filter(|id| !id.trim().is_empty()) {
            Some(id) => id,
            None => host_identity(&config.data_dir)?,
        };
        config.relay.owner = config.driver.owner.clone();
        // Compiled artifacts were kept here by earlier versions; nothing loads them any more.
        let _ = std::fs::remove_dir_all(config.data_dir.join("cache"));
        let metrics = metrics::Metrics::new();
        // Replicas on one database decide by its clock, not each by its own.
        let clock_sync = match store.database_now_ms().await {
            Ok(None) => None,
            // Only a shared database answers (or fails to): keep to its clock. A failed first
            // read is measured again in 30 s.
            shared => {
                let synced = Arc::new(SyncedClock::new(Arc::clone(&config.clock)));
                match shared {
                    Ok(_) => sync_clock(&synced, store.as_ref(), &metrics).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the database's clock failed; measuring it again in 30 s")
                    }
                }
                config.clock = Arc::clone(&synced) as Arc<dyn Clock>;
                Some(synced)
            }
        };
        let (released, made) = (Arc::clone(&metrics), Arc::clone(&metrics));
        let runtime = Runtime::new(config.limits.clone(), Arc::new(StoreReader(store.clone())))?
            .observing_releases(Arc::new(move |took| released.sandbox_released(took)))
            .keeping_spares(Some(Arc::new(move |took| made.spare_made(took))));
        let runtime = Arc::new(runtime);
        let catalog = Arc::new(Catalog::open(store.clone(), Arc::clone(&runtime), Arc::clone(&config.clock)).await?);
        let sagas = Arc::new(saga::Sagas::new(store.clone(), Arc::clone(&config.clock), DriverHandle::default()));
        let driver = Driver::new(
            store.clone(),
            Arc::clone(&sagas),
            runtime,
            Arc::clone(&catalog),
            Arc::clone(&config.clock),
            Arc::clone(&metrics),
            config.driver.clone(),
        );
        let handle = driver.handle();
        let sink: Arc<dyn Sink> = match &config.kafka {
            Some(kafka) => Arc::new(relay::kafka::KafkaSink::new(kafka.clone())?),
            None => Arc::new(
                relay::jsonl::JsonlSink::open(&config.data_dir.join("events.jsonl"), config.events_file).await?,
            ),
        };
        let relay = Relay::new(
            store.clone(),
            sink,
            Arc::clone(&config.clock),
            handle.clone(),
            Arc::clone(&metrics),
            config.relay.clone(),
        );
        let metrics_for_clock = Arc::clone(&metrics);
        let state = http::AppState {
            store: Arc::clone(&store),
            sagas,
            catalog: Arc::clone(&catalog),
            driver: handle.clone(),
            clock: Arc::clone(&config.clock),
            metrics,
            gates: Arc::new(http::limits::Gates::new(config.serve.clone())),
            config: Arc::new(http::HttpConfig {
                idempotency_ttl: config.idempotency_ttl,
                admin_token: config.admin_token.clone().filter(|t| !t.is_empty()),
                api_tokens: config.api_tokens.iter().filter(|t| !t.is_empty()).cloned().collect(),
                shared_database: config.database.as_deref().is_some_and(|url| url.starts_with("postgres")),
                secrets: config.limits.http.secrets.clone(),
                browsers: Arc::new(http::origin::Browsers::new(config.listen, &config.allowed_hosts)),
            }),
        };
        let listener =
            tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
        let listener = http::limits::LimitedListener::new(
            listener,
            config.serve.max_connections,
            config.serve.write_stall_timeout,
        );
        Ok(App {
            listener,
            router: http::router(state),
            driver,
            relay,
            store,
            catalog,
            handle,
            clock: config.clock,
            clock_sync: clock_sync.map(|synced| (synced, metrics_for_clock)),
            owner: config.driver.owner.clone(),
            outbox_retention: config.outbox_retention,
            saga_retention: config.saga_retention,
            catalog_refresh: config.catalog_refresh,
            serve: config.serve.clone(),
        })
    }

    /// The address the HTTP server listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        axum::serve::Listener::local_addr(&self.listener).expect("a bound listener has an address")
    }

    pub fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store)
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        Arc::clone(&self.catalog)
    }

    pub fn driver(&self) -> DriverHandle {
        self.handle.clone()
    }

    /// Serves HTTP, drives sagas and relays events until `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        // Before the first request is served (`Driver::release_stale_claims`).
        self.driver.release_stale_claims().await;
        tracing::info!(addr = %self.local_addr(), "sagahost listening");
        let driver = tokio::spawn(self.driver.run(shutdown.clone()));
        let relay = tokio::spawn(self.relay.run(shutdown.clone()));
        let catalog = tokio::spawn(Arc::clone(&self.catalog).watch(self.catalog_refresh, shutdown.clone()));
        let retention = Retention { outbox: self.outbox_retention, sagas: self.saga_retention };
        let janitor = tokio::spawn(janitor(
            self.store.clone(),
            Arc::clone(&self.clock),
            retention,
            self.owner.clone(),
            shutdown.clone(),
        ));
        let clock = tokio::spawn(keep_clock(self.clock_sync, self.store.clone(), shutdown.clone()));
        let drain = self.serve.request_timeout;
        http::limits::serve(self.listener, self.router, &self.serve, shutdown.clone(), drain).await;
        shutdown.cancel();
        let _ = tokio::join!(driver, relay, janitor, catalog, clock);
        // Once more, now that no request is left: a saga created claimed by a request admitted
        // just before the driver stopped may have committed after the driver gave its claims
        // back.
        driver::give_back_claims(self.store.as_ref(), &self.owner, "sagas created while stopping").await;
        Ok(())
    }
}

/// How often a replica measures its clock against the database's again.
const CLOCK_SYNC_EVERY: Duration = Duration::from_secs(30);

/// One measurement of this host's clock against the database's ([`SyncedClock::sync`]), its
/// offset reported in `sagahost_clock_offset_seconds` and, past a second, in the log (the
/// host's time service is off; sagahost keeps to the database's clock regardless).
async fn sync_clock(clock: &SyncedClock, store: &dyn Store, metrics: &metrics::Metrics) {
    let before = clock.offset_ms();
    let measured = clock.sync(5, || async { store.database_now_ms().await.ok().flatten() }).await;
    let Some(offset) = measured else {
        tracing::warn!(
            "could not measure this host's clock against the database's (every read failed or took over 200 ms); \
             keeping the last offset"
        );
        return;
    };
    metrics.clock_offset(offset);
    if clock.offset_ms() != before {
        if offset.abs() > 1_000 {
            tracing::warn!(offset_ms = offset, "this host's clock is off the database's by more than a second (check its time service); keeping to the database's");
        } else {
            tracing::info!(offset_ms = offset, "keeping to the database's clock");
        }
    }
}

/// Measures the clock against the database's every [`CLOCK_SYNC_EVERY`] until `shutdown`.
async fn keep_clock(
    sync: Option<(Arc<SyncedClock>, Arc<metrics::Metrics>)>,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
) {
    let Some((clock, metrics)) = sync else { return };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(CLOCK_SYNC_EVERY) => sync_clock(&clock, store.as_ref(), &metrics).await,
        }
    }
}

/// What the janitor keeps, and for how long.
#[derive(Debug, Clone, Copy)]
struct Retention {
    outbox: Duration,
    sagas: Option<Duration>,
}

/// Rows the janitor deletes per statement: small enough that no transaction holds the single
/// SQLite writer (or PostgreSQL row locks) for long.
const JANITOR_BATCH: u32 = 1000;

/// How long the janitor's lease lasts past its last renewal (database time): longer than
/// [`JANITOR_EVERY`], so a live janitor keeps it from one pass to the next (it renews it at
/// each pass and between batches), and a replica that died leaves the work to another one
/// within about three minutes (or at once after a clean shutdown, which gives it up).
const JANITOR_LEASE: Duration = Duration::from_secs(120);

/// How often the janitor makes a pass.
const JANITOR_EVERY: Duration = Duration::from_secs(60);

/// Periodic housekeeping, once a minute: forgets idempotency keys, published outbox rows and
/// (if configured) finished sagas past their retention. Each kind is deleted in batches until
/// none is left, yielding between batches so that other work gets the writer in between.
///
/// One replica at a time: a pass runs only under the janitor's lease
/// ([`JanitorStore::janitor_lease`]), renewed between batches, and stops where the lease is
/// lost. Replicas started together would otherwise purge together every minute, doing the
/// same work twice, and on PostgreSQL an outbox purge (published rows, in the order it finds
/// them) and a saga purge (one saga's rows after another's, in one transaction) can lock the
/// same rows in opposite orders and deadlock.
async fn janitor(
    store: Arc<dyn JanitorStore>,
    clock: Arc<dyn Clock>,
    retention: Retention,
    owner: String,
    shutdown: CancellationToken,
) {
    let lease = Lease::Held { owner: &owner };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(JANITOR_EVERY) => {}
        }
        janitor_pass(store.as_ref(), clock.now_ms(), &retention, &shutdown, &lease).await;
    }
    if let Err(e) = store.janitor_release(&owner).await {
        tracing::debug!(error = %e, "giving the janitor's lease up failed; it expires by itself");
    }
}

/// Whether a janitor pass runs under the replicas' shared lease.
enum Lease<'a> {
    /// The running host's janitor: only while `owner` holds the lease.
    Held { owner: &'a str },
    /// A pass made on request ([`run_janitor_once`]), under no lease.
    None,
}

impl Lease<'_> {
    /// Takes or renews the lease: whether the pass may go on.
    async fn renew(&self, store: &dyn JanitorStore) -> bool {
        let Lease::Held { owner } = self else { return true };
        match store.janitor_lease(owner, JANITOR_LEASE.as_millis() as i64).await {
            Ok(true) => true,
            Ok(false) => {
                tracing::debug!("another replica's janitor holds the lease; skipping this pass");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "taking the janitor's lease failed; trying again in a minute");
                false
            }
        }
    }
}

/// What one janitor pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Janitored {
    /// Idempotency keys past their time to live.
    pub expired_keys: u64,
    /// Published outbox rows older than the retention.
    pub purged_events: u64,
    /// Finished sagas older than their retention (when one is set).
    pub purged_sagas: u64,
}

/// One pass of the janitor at `now_ms`, keeping published events for `outbox_retention` and
/// every finished saga (the running app makes a pass every minute; tests call this to make
/// one now). Failures are logged and count as nothing removed: the next pass tries again.
pub async fn run_janitor_once(store: &dyn JanitorStore, now_ms: i64, outbox_retention: Duration) -> Janitored {
    let retention = Retention { outbox: outbox_retention, sagas: None };
    janitor_pass(store, now_ms, &retention, &CancellationToken::new(), &Lease::None).await
}

async fn janitor_pass(
    store: &dyn JanitorStore,
    now: i64,
    retention: &Retention,
    shutdown: &CancellationToken,
    lease: &Lease<'_>,
) -> Janitored {
    if !lease.renew(store).await {
        return Janitored::default();
    }
    let go_on = move || async move { !shutdown.is_cancelled() && lease.renew(store).await };
    let expired_keys = drain("expired idempotency keys", go_on, JANITOR_BATCH, |n| {
        let batch = store.expire_idempotency(now, n);
        async move { batch.await.map(|d| (d, d == u64::from(n))) }
    })
    .await;
    let before = now - retention.outbox.as_millis() as i64;
    let purged_events = drain("published outbox rows", go_on, JANITOR_BATCH, |n| {
        let batch = store.outbox_purge(before, n);
        async move { batch.await.map(|d| (d, d == u64::from(n))) }
    })
    .await;
    let purged_sagas = match retention.sagas {
        Some(keep) => {
            let before = now - keep.as_millis() as i64;
            // Fewer sagas per batch: each is three deletes (events, steps, row); and a bound on
            // the events, which a saga that polled for hours has by the ten thousand.
            drain("finished sagas", go_on, JANITOR_BATCH / 10, |n| {
                let batch = store.purge_finished_sagas(before, n, JANITOR_BATCH * 2);
                async move { batch.await.map(|p| (p.sagas, p.more)) }
            })
            .await
        }
        None => 0,
    };
    Janitored { expired_keys, purged_events, purged_sagas }
}

/// Runs `batch(limit)` until a batch says no more is due (it deleted less than it may, and
/// hit no other bound), fails, or `go_on` says stop (shutdown, the lease lost), asked before
/// each batch after the first; returns how many it deleted. A batch answers (deleted, more).
async fn drain<F, Fut, G, GoOn>(what: &str, go_on: G, limit: u32, mut batch: F) -> u64
where
    F: FnMut(u32) -> Fut,
    Fut: std::future::Future<Output = Result<(u64, bool), store::Error>>,
    G: Fn() -> GoOn,
    GoOn: std::future::Future<Output = bool>,
{
    let mut total = 0;
    loop {
        match batch(limit).await {
            Ok((n, more)) => {
                total += n;
                if !more || !go_on().await {
                    break;
                }
                tokio::task::yield_now().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "deleting {what} failed; trying again in a minute");
                break;
            }
        }
    }
    if total > 0 {
        tracing::debug!(deleted = total, "deleted {what} past retention");
    }
    total
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    #[tokio::test]
    async fn the_janitor_repeats_full_batches_until_one_comes_back_short() {
        let left = AtomicU64::new(2_500);
        let calls = AtomicU64::new(0);
        let batch = |limit: u32| {
            calls.fetch_add(1, Ordering::SeqCst);
            let n = left.load(Ordering::SeqCst).min(u64::from(limit));
            left.fetch_sub(n, Ordering::SeqCst);
            async move { Ok((n, n == u64::from(limit))) }
        };
        drain("rows", || async { true }, 1000, batch).await;
        assert_eq!((left.load(Ordering::SeqCst), calls.load(Ordering::SeqCst)), (0, 3));
    }

    /// A `JanitorStore` whose every kind has `due` rows left, and whose lease answers come from
    /// a list (then "held elsewhere").
    struct Due {
        due: AtomicU64,
        lease: std::sync::Mutex<Vec<bool>>,
        deletes: AtomicU64,
    }

    impl Due {
        fn new(due: u64, lease: &[bool]) -> Due {
            let lease = lease.iter().rev().copied().collect();
            Due { due: AtomicU64::new(due), lease: std::sync::Mutex::new(lease), deletes: AtomicU64::new(0) }
        }

        fn delete(&self, limit: u32) -> u64 {
            self.deletes.fetch_add(1, Ordering::SeqCst);
            let n = self.due.load(Ordering::SeqCst).min(u64::from(limit));
            self.due.fetch_sub(n, Ordering::SeqCst);
            n
        }
    }

    #[async_trait::async_trait]
    impl JanitorStore for Due {
        async fn janitor_lease(&self, owner: &str, _: i64) -> store::Result<bool> {
            assert_eq!(owner, "a");
            Ok(self.lease.lock().unwrap().pop().unwrap_or(false))
        }
        async fn janitor_release(&self, _: &str) -> store::Result<()> {
            Ok(())
        }
        async fn expire_idempotency(&self, _: i64, limit: u32) -> store::Result<u64> {
            Ok(self.delete(limit))
        }
        async fn outbox_purge(&self, _: i64, limit: u32) -> store::Result<u64> {
            Ok(self.delete(limit))
        }
        async fn purge_finished_sagas(&self, _: i64, limit: u32, _: u32) -> store::Result<store::Purged> {
            let n = self.delete(limit);
            Ok(store::Purged { sagas: n, more: n == u64::from(limit) })
        }
    }

    const KEEP: Retention = Retention { outbox: Duration::from_secs(3600), sagas: Some(Duration::from_secs(3600)) };

    /// Replicas purge one at a time: a janitor whose lease another replica holds deletes
    /// nothing, however much is due.
    #[tokio::test]
    async fn a_janitor_without_the_lease_purges_nothing() {
        let store = Due::new(5_000, &[false]);
        let held = Lease::Held { owner: "a" };
        let pass = janitor_pass(&store, 0, &KEEP, &CancellationToken::new(), &held).await;
        assert_eq!(pass, Janitored::default());
        assert_eq!(store.deletes.load(Ordering::SeqCst), 0);
        // The same store with the lease: the whole backlog goes, renewing between batches.
        let store = Due::new(2_500, &[true; 8]);
        let pass = janitor_pass(&store, 0, &KEEP, &CancellationToken::new(), &held).await;
        assert_eq!(pass.expired_keys, 2_500);
        assert_eq!(store.due.load(Ordering::SeqCst), 0);
    }

    /// A pass stops where its lease is lost (its renewal between two batches finds another
    /// replica holding it): the new holder goes on from there.
    #[tokio::test]
    async fn a_janitor_pass_stops_where_its_lease_is_lost() {
        // Taken at the start, renewed after the first batch, lost at the second renewal.
        let store = Due::new(10_000, &[true, true, false]);
        let held = Lease::Held { owner: "a" };
        let pass = janitor_pass(&store, 0, &KEEP, &CancellationToken::new(), &held).await;
        assert_eq!(pass.expired_keys, 2 * u64::from(JANITOR_BATCH));
        // Each later kind makes its one batch and asks again (lost: it stops).
        assert_eq!(store.deletes.load(Ordering::SeqCst), 4);
        // A pass made on request takes no lease.
        let store = Due::new(1_500, &[]);
        let pass = janitor_pass(&store, 0, &KEEP, &CancellationToken::new(), &Lease::None).await;
        assert_eq!(pass.expired_keys, 1_500);
    }

    /// A batch cut short by another bound (the saga purge's budget of events) says more is due:
    /// the pass goes on, rather than leaving the rest for the next pass a minute later.
    #[tokio::test]
    async fn the_janitor_goes_on_while_a_batch_says_more_is_due() {
        let calls = AtomicU64::new(0);
        let batch = |_: u32| {
            let call = calls.fetch_add(1, Ordering::SeqCst);
            async move { Ok((u64::from(call == 3), call < 3)) }
        };
        assert_eq!(drain("sagas", || async { true }, 100, batch).await, 1);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }
}
