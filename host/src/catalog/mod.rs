//! The catalog: which plugin components exist and which saga definitions use them.
//!
//! It owns the path from bytes to a runnable step: store the component by digest, compile it
//! in the runtime, and check that definitions only bind loaded components. Definitions are
//! cached in memory; the store is the source of truth, so every replica can rebuild it.
//!
//! Replicas: every upload and definition change bumps a version counter in the same
//! transaction. [`Catalog::watch`] polls that one row (every 250 ms by default) and reloads
//! what changed: new plugin versions are fetched and compiled, definitions are re-read. A
//! replica that meets a digest it does not know yet (a binding made through another replica a
//! moment ago) refreshes on the spot instead of failing.
//!
//! Changes to a definition are compare-and-set on its stored version: a bind or a definition
//! based on the version this replica last saw commits only if nobody changed it since, so two
//! admins (or two replicas) cannot silently overwrite each other; the loser gets
//! [`Error::Conflict`], and the cache is refreshed so that a retry sees the winner's change.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::engine::definition::DefinitionError;
use crate::engine::SagaDefinition;
use crate::runtime::{LoadError, Runtime};
use crate::store::{self, AuditEntry, CatalogStore, DefinitionSource};

/// Why the catalog refused something.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Definition(#[from] DefinitionError),
    #[error("{field}: plugin {digest} is not uploaded; upload it first")]
    UnknownPlugin { field: String, digest: String },
    #[error("these bytes are already uploaded as plugin '{existing}'; a version belongs to one plugin, so upload them under that name")]
    NameMismatch { existing: String },
    #[error("no saga type '{0}' is registered")]
    UnknownSagaType(String),
    #[error("saga type '{saga_type}' has no step '{step}'")]
    UnknownStep { saga_type: String, step: String },
    #[error("the definition of saga type '{0}' was changed by someone else meanwhile; read it again and retry")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] store::Error),
    /// A stored version this replica cannot load, or the catalog could not be read.
    #[error(transparent)]
    NotLoaded(NotLoaded),
}

/// A version no definition binds is unloaded once no call used it for this long.
pub const UNLOAD_IDLE: Duration = Duration::from_secs(600);

/// How often [`Catalog::watch`] looks for such versions.
const UNLOAD_SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Why a stored plugin version cannot run on this host ([`Catalog::ensure_loaded`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotLoaded {
    /// Stored, but this build refused to compile it (a world it does not serve, a component
    /// an older release cannot read): it never will, until the host is upgraded. A call of it
    /// is left to a replica that can load it, and fails as an attempt once none has for
    /// minutes (`driver`, `Inner::not_loaded`), so that the retry policy and compensation
    /// decide.
    #[error("this host cannot load plugin {plugin} version {digest}: {reason}")]
    Refused { plugin: String, digest: String, reason: String },
    /// No replica stored this version.
    #[error("plugin version {0} is not stored (bind an uploaded version)")]
    Unknown(String),
    /// The catalog could not be read (its database failed): no attempt, try again.
    #[error("reading the plugin catalog failed: {0}")]
    Unavailable(String),
}

/// Plugins and definitions, shared by the HTTP layer and the driver.
pub struct Catalog {
    store: Arc<dyn CatalogStore>,
    runtime: Arc<Runtime>,
    clock: Arc<dyn Clock>,
    /// Definitions by saga type, with the stored version each was read at.
    definitions: RwLock<HashMap<String, (Arc<SagaDefinition>, i64)>>,
    /// digest -> plugin name, for every stored version (loaded or not).
    plugin_names: RwLock<HashMap<String, String>>,
    /// digest -> (plugin name, why it did not compile here), for stored versions this build
    /// refused: tried again on the next catalog change.
    refused: RwLock<HashMap<String, (String, String)>>,
    /// The store's catalog version this cache reflects (at least).
    version: AtomicI64,
    /// One refresh at a time, each serving every caller that asked before it began.
    refreshing: Refreshes,
    /// One compile at a time ([`Catalog::compile`]): two at once would hold two compilations'
    /// memory (hundreds of MiB for a JavaScript or Python component) on a small host, and a
    /// version wanted twice is compiled once. Apart from `refreshing`, so that a refresh that
    /// needs no compile (a bind of a version loaded here) never waits behind one a call
    /// started (a version unloaded while idle, seconds for a large component).
    compiling: Arc<tokio::sync::Mutex<()>>,
}

/// Refreshes shared by their callers. A caller (a compensation catching up, the periodic
/// watch, a bind after a conflict) needs a refresh whose read of the store began after it
/// asked: that one sees every change acknowledged before. One runs at a time, and each that
/// succeeds serves every caller that was waiting when it began, so N callers at once cost
/// two reads (the one under way when they came, which may predate them, and the next), not N
/// in a queue. At the PostgreSQL peak every compensation caught up through one lock, a
/// database round trip each: the queue added tens of milliseconds to each compensating saga.
#[derive(Default)]
struct Refreshes {
    /// One refresh at a time.
    one: tokio::sync::Mutex<()>,
    /// How many refreshes began (counted before their read).
    begun: AtomicU64,
    /// The `begun` count of the last refresh that succeeded.
    succeeded: AtomicU64,
}

impl Refreshes {
    /// Runs `refresh`, one at a time, unless one that began after this call succeeded by the
    /// time it is this call's turn.
    async fn run<E, F: std::future::Future<Output = Result<(), E>>>(
        &self,
        refresh: impl FnOnce() -> F,
    ) -> Result<(), E> {
        let asked = self.begun.load(Ordering::SeqCst);
        let _one = self.one.lock().await;
        if self.succeeded.load(Ordering::SeqCst) > asked {
            return Ok(());
        }
        let this = self.begun.fetch_add(1, Ordering::SeqCst) + 1;
        refresh().await?;
        self.succeeded.store(this, Ordering::SeqCst);
        Ok(())
    }
}

/// Whether host release `a` is newer than `b` by semver precedence (a pre-release before the
/// release itself, build metadata ignored). Not newer when either cannot be read: the host then
/// upgrades as it always did.
fn newer_release(a: &str, b: &str) -> bool {
    match (semver::Version::parse(a), semver::Version::parse(b)) {
        (Ok(a), Ok(b)) => a.cmp_precedence(&b).is_gt(),
        _ => false,
    }
}

impl Catalog {
    /// Loads every stored plugin into the runtime and every definition into memory, and
    /// installs the built-in saga types ([`crate::builtin::ALL`]) with their plugins.
    pub async fn open(
        store: Arc<dyn CatalogStore>,
        runtime: Arc<Runtime>,
        clock: Arc<dyn Clock>,
    ) -> Result<Catalog, Error> {
        let catalog = Catalog {
            store,
            runtime,
            clock,
            definitions: RwLock::new(HashMap::new()),
            plugin_names: RwLock::new(HashMap::new()),
            refused: RwLock::new(HashMap::new()),
            version: AtomicI64::new(i64::MIN),
            refreshing: Refreshes::default(),
            compiling: Arc::new(tokio::sync::Mutex::new(())),
        };
        catalog.refresh().await?;
        for builtin in crate::builtin::ALL {
            catalog.install_builtin(builtin).await?;
        }
        catalog.refresh().await?;
        Ok(catalog)
    }

    /// Stores and loads a built-in's plugins and registers its definition, unless an admin
    /// replaced it: a definition the host installed is upgraded in place to this release's.
    async fn install_builtin(&self, builtin: &crate::builtin::Builtin) -> Result<(), Error> {
        let mut refs = HashMap::new();
        for (name, wasm) in builtin.plugins {
            let digest = match self.install_plugin(name, wasm.to_vec()).await {
                Ok((digest, _)) => digest,
                // These very bytes were uploaded as another plugin (a canary of the demo, say):
                // they stay that plugin's, and the built-in's plugin cannot take them under its
                // own name. The built-in keeps what it has (an older release's definition, or
                // none: then the host is not ready), rather than every replica of this release
                // failing to start.
                Err(Error::NameMismatch { existing }) => {
                    tracing::error!(
                        saga_type = builtin.saga_type,
                        plugin = name,
                        existing = %existing,
                        "a built-in plugin's component was uploaded under another name; the built-in saga type is not \
                         installed or upgraded (upload it again under its own name, or remove the other)"
                    );
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            refs.insert(*name, crate::engine::PluginRef { plugin: (*name).to_owned(), digest });
        }
        let def = (builtin.definition)(&|name| {
            refs.get(name)
                .cloned()
                .unwrap_or_else(|| panic!("built-in {} binds plugin {name}, which it does not ship", builtin.saga_type))
        });
        // Compare and set: replicas starting together install or upgrade it once; the others
        // find it done.
        let ours = env!("CARGO_PKG_VERSION");
        let installed = match self.store.definition(&def.saga_type).await? {
            Some(current) if current.source == DefinitionSource::Builtin && current.definition != def => {
                // Never back to an older release's: during a rolling upgrade a replica of the
                // old release that restarts (a crash, a node drained) put its plugins back for
                // every replica, and the next new one flipped them again, unaudited.
                if let Some(theirs) = current.builtin_release.as_deref().filter(|r| newer_release(r, ours)) {
                    tracing::info!(
                        saga_type = %def.saga_type,
                        installed_by = theirs,
                        "the built-in definition is a newer release's; this release leaves it as it is"
                    );
                    return Ok(());
                }
                tracing::info!(saga_type = %def.saga_type, "upgrading the built-in definition to this release's plugins");
                let audit = AuditEntry {
                    actor: format!("sagahost {ours}"),
                    action: "saga.define".to_owned(),
                    target: def.saga_type.clone(),
                    before: serde_json::to_value(&current.definition).ok(),
                    after: serde_json::to_value(&def).ok(),
                    note: Some(format!(
                        "built-in upgraded to release {ours}'s plugins (it was release {}'s)",
                        current.builtin_release.as_deref().unwrap_or("an unrecorded")
                    )),
                    answer: None,
                };
                self.put_definition_checked(def, DefinitionSource::Builtin, Some(current.version), Some(&audit)).await
            }
            None => self.put_definition_checked(def, DefinitionSource::Builtin, Some(0), None).await,
            Some(_) => Ok(0),
        };
        match installed {
            Ok(_) | Err(Error::Conflict(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Brings the cache up to the store's catalog version: learns the plugin versions stored
    /// through other replicas, re-reads the definitions, and compiles the versions they bind.
    /// Cheap when nothing changed (one single-row read). Versions no definition binds now
    /// (older uploads, a canary not bound yet, what sagas in flight still pin) are compiled
    /// when a call needs them ([`Catalog::ensure_loaded`]): a host's memory and start-up time
    /// follow what is bound, not every version ever uploaded.
    ///
    /// Callers share refreshes: one that began after a call was made serves it too
    /// ([`Refreshes`]).
    pub async fn refresh(&self) -> Result<(), Error> {
        self.refreshing.run(|| self.refresh_now()).await
    }

    async fn refresh_now(&self) -> Result<(), Error> {
        // Read the version first: a change committed while we load bumps it again, and the
        // next refresh picks that up.
        let version = self.store.catalog_version().await?;
        if version == self.version.load(Ordering::Acquire) {
            return Ok(());
        }
        {
            let versions = self.store.plugin_versions().await?;
            let mut names = self.plugin_names.write().unwrap_or_else(|e| e.into_inner());
            for info in versions {
                names.insert(info.digest, info.name);
            }
        }
        let definitions = self.store.definitions().await?;
        // A version refused before is tried again on a catalog change (an upgrade of another
        // replica does not make this build take it, but the attempt is cheap and rare).
        self.refused.write().unwrap_or_else(|e| e.into_inner()).clear();
        // What the definitions bind is compiled before they are served: a saga created on a
        // definition served first would wait for the compile (seconds for a large component),
        // and a waiting request past its time with it.
        let bound: std::collections::HashSet<&str> =
            definitions.iter().flat_map(|d| digests_bound_by(&d.definition)).collect();
        for digest in bound {
            if !self.runtime.is_loaded(digest) {
                self.compile(digest).await?;
            }
        }
        // Merged through `cache`: a change made through this process while the read ran is
        // cached already and may be newer than what was read. (Definitions are never deleted,
        // so merging loses nothing.)
        for d in definitions {
            self.cache(d.definition, d.version);
        }
        self.version.store(version, Ordering::Release);
        Ok(())
    }

    /// Every digest a current definition binds (execute or compensate).
    fn bound(&self) -> std::collections::HashSet<String> {
        let defs = self.definitions.read().unwrap_or_else(|e| e.into_inner());
        defs.values().flat_map(|(d, _)| digests_bound_by(d)).map(str::to_owned).collect()
    }

    /// [`Catalog::load`], one compile at a time (`compiling`), unless it is loaded by then.
    async fn compile(&self, digest: &str) -> Result<bool, Error> {
        let one = Arc::clone(&self.compiling).lock_owned().await;
        if self.runtime.is_loaded(digest) {
            return Ok(true);
        }
        self.load(digest, one).await
    }

    /// Compiles a stored version, or notes why this build refuses it ([`NotLoaded::Refused`]);
    /// `Ok(false)` if no replica stored it. Only a failed read is an error. `one` (the compile
    /// lock) is held by the compile itself, to its end, even if this caller goes away first.
    async fn load(&self, digest: &str, one: tokio::sync::OwnedMutexGuard<()>) -> Result<bool, Error> {
        let Some(row) = self.store.plugin(digest).await? else { return Ok(false) };
        self.plugin_names.write().unwrap_or_else(|e| e.into_inner()).insert(row.digest.clone(), row.name.clone());
        match self.runtime.load_holding(row.wasm, one).await {
            Ok(_) => {
                self.refused.write().unwrap_or_else(|e| e.into_inner()).remove(&row.digest);
            }
            // A component that this build cannot load must not stop the host: sagas bound
            // to it fail their attempts visibly instead ([`NotLoaded::Refused`]).
            Err(e) => {
                tracing::error!(digest = %row.digest, plugin = %row.name, error = %e, "stored plugin failed to load");
                self.refused.write().unwrap_or_else(|e| e.into_inner()).insert(row.digest, (row.name, e.to_string()));
            }
        }
        Ok(true)
    }

    /// Unloads the versions no current definition binds and no call used for `idle`
    /// ([`Runtime::unload_idle`]); a call that needs one again loads it first. Returns how
    /// many were unloaded.
    pub fn unload_idle(&self, idle: Duration) -> usize {
        let bound = self.bound();
        let unloaded = self.runtime.unload_idle(idle, |digest| bound.contains(digest));
        if !unloaded.is_empty() {
            tracing::info!(count = unloaded.len(), "unloaded plugin versions no step binds and no call used lately");
        }
        unloaded.len()
    }

    /// Refreshes every `interval` until `shutdown`, so a change made through any replica
    /// reaches this one within about `interval`.
    pub async fn watch(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let mut failing = false;
        let mut swept = std::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            if swept.elapsed() >= UNLOAD_SWEEP_EVERY {
                swept = std::time::Instant::now();
                self.unload_idle(UNLOAD_IDLE);
            }
            match self.refresh().await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("catalog refresh works again");
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "refreshing the catalog failed; serving the cached one");
                }
                Err(_) => {}
            }
        }
    }

    /// Brings the cache up to the store before a choice that must not rest on an older catalog
    /// than a change any replica has acknowledged (the compensate binding a compensation runs:
    /// SPEC §5.3, "every compensation from now on"). Nothing to do where this process is its
    /// database's only host (every change goes through it and is cached as it commits); else
    /// one refresh, a single-row read when nothing changed. A failure is logged and the cache
    /// serves, as it would until the next refresh anyway: false then (the cache may be
    /// behind).
    pub async fn catch_up(&self) -> bool {
        if !self.store.shared_by_hosts() {
            return true;
        }
        match self.refresh().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "catching up with the stored catalog failed; using the cached one");
                false
            }
        }
    }

    /// [`Catalog::definition`]; for a type this cache does not know, the store's once caught
    /// up ([`Catalog::catch_up`]): a type registered through another replica a moment ago is
    /// found here too (a deploy script registering a type, then sending a saga through a load
    /// balancer, got 404 until the next refresh).
    pub async fn find_definition(&self, saga_type: &str) -> Option<Arc<SagaDefinition>> {
        if let Some(def) = self.definition(saga_type) {
            return Some(def);
        }
        if !crate::engine::definition::is_valid_name(saga_type) {
            return None;
        }
        let _ = self.catch_up().await;
        self.definition(saga_type)
    }

    /// The store's catalog version this cache reflects.
    pub fn version(&self) -> i64 {
        self.version.load(Ordering::Acquire)
    }

    /// [`Catalog::version`] where other hosts share the store, so that the cache may be a
    /// refresh behind it: what is read from the cache after this call is at least that new,
    /// and a commit that finds the store still at it ([`crate::store::Commit::catalog_check`])
    /// acted on a current catalog. `None` where this host owns its database: every change
    /// goes through this cache, which is always current.
    pub fn version_to_check(&self) -> Option<i64> {
        self.store.shared_by_hosts().then(|| self.version())
    }

    /// Makes sure a digest is loaded if any replica stored it (a version uploaded through
    /// another replica a moment ago, one not bound, one unloaded while idle: fetched and
    /// compiled now); otherwise says why not.
    pub async fn ensure_loaded(&self, digest: &str) -> Result<(), NotLoaded> {
        if self.runtime.is_loaded(digest) {
            return Ok(());
        }
        let refused = |this: &Self| {
            this.refused.read().unwrap_or_else(|e| e.into_inner()).get(digest).map(|(plugin, reason)| {
                NotLoaded::Refused { plugin: plugin.clone(), digest: digest.to_owned(), reason: reason.clone() }
            })
        };
        // Tried already (it is tried again on a catalog change).
        if let Some(refused) = refused(self) {
            return Err(refused);
        }
        // One compile at a time, and none twice (another call may be loading it right now).
        let stored = self.compile(digest).await;
        match stored {
            Err(e) => {
                tracing::warn!(%digest, error = %e, "reading a plugin version to load it failed");
                Err(NotLoaded::Unavailable(e.to_string()))
            }
            Ok(false) => Err(NotLoaded::Unknown(digest.to_owned())),
            Ok(true) if self.runtime.is_loaded(digest) => Ok(()),
            Ok(true) => Err(refused(self).unwrap_or_else(|| NotLoaded::Unknown(digest.to_owned()))),
        }
    }

    /// Stores and compiles a component. Returns its digest and whether it was new.
    pub async fn install_plugin(&self, name: &str, wasm: Vec<u8>) -> Result<(String, bool), Error> {
        self.install_plugin_audited(name, wasm, None).await
    }

    /// [`Catalog::install_plugin`], writing `audit` in the upload's transaction if the version
    /// is new (and only then).
    pub async fn install_plugin_audited(
        &self,
        name: &str,
        wasm: Vec<u8>,
        audit: Option<AuditEntry>,
    ) -> Result<(String, bool), Error> {
        if let Some(existing) = self.plugin_name(&crate::runtime::digest_of(&wasm)) {
            if existing != name {
                return Err(Error::NameMismatch { existing });
            }
        }
        // Compile first: nothing invalid is ever stored (a version loaded here already is not
        // compiled again). One compile at a time, as every compile of this host
        // ([`Catalog::compile`]): uploads at once each held a compilation's memory (hundreds of
        // MiB for a JavaScript or Python component), held by the compile itself: an upload
        // dropped at its deadline leaves its compile running, and its retry waits for it (and
        // finds the version loaded) instead of compiling it again beside it.
        let digest = {
            let one = Arc::clone(&self.compiling).lock_owned().await;
            self.runtime.load_holding(wasm.clone(), one).await?
        };
        let new = self.store.put_plugin(&digest, name, &wasm, self.clock.now_ms(), audit.as_ref()).await?;
        if !new {
            // Stored before, perhaps through another replica this one has not caught up with:
            // the stored name decides.
            if let Some(row) = self.store.plugin(&digest).await? {
                if row.name != name {
                    return Err(Error::NameMismatch { existing: row.name });
                }
            }
        }
        self.plugin_names.write().unwrap_or_else(|e| e.into_inner()).insert(digest.clone(), name.to_owned());
        Ok((digest, new))
    }

    /// A loaded plugin version as a step binding.
    /// What a plugin version targets and may do (its world, whether it can call HTTP).
    pub fn capabilities(&self, digest: &str) -> Option<crate::runtime::Capabilities> {
        self.runtime.capabilities(digest)
    }

    pub fn plugin_ref(&self, digest: &str) -> Option<crate::engine::PluginRef> {
        self.plugin_name(digest).map(|plugin| crate::engine::PluginRef { plugin, digest: digest.to_owned() })
    }

    /// Rebinds a step's execute and/or compensate to other versions. Returns the step's
    /// bindings before and after. New sagas use the new execute binding; every compensation
    /// from now on uses the new compensate binding. `audit` makes the audit entry from the
    /// bindings before and after; it commits with the change. [`Error::Conflict`] if the
    /// definition changed since this replica read it.
    pub async fn bind(
        &self,
        saga_type: &str,
        step: &str,
        execute: Option<&str>,
        compensate: Option<&str>,
        audit: impl FnOnce(&crate::engine::StepDefinition, &crate::engine::StepDefinition) -> AuditEntry,
    ) -> Result<(crate::engine::StepDefinition, crate::engine::StepDefinition), Error> {
        for digest in execute.iter().chain(compensate.iter()) {
            // What is not loaded is refused below, by name.
            let _ = self.ensure_loaded(digest).await;
        }
        // Read your writes through any replica: a type or step registered through another one
        // a moment ago exists here too (as for a definition's PUT). Refreshed only then: a
        // bind from a stale version of a known step is a conflict, retried on the fresh one.
        let known = |(d, _): &(Arc<SagaDefinition>, i64)| d.step_index(step).is_some();
        if !self.versioned_definition(saga_type).is_some_and(|v| known(&v)) {
            self.refresh().await?;
        }
        let (current, version) =
            self.versioned_definition(saga_type).ok_or_else(|| Error::UnknownSagaType(saga_type.to_owned()))?;
        let mut def = (*current).clone();
        let i = def
            .step_index(step)
            .ok_or_else(|| Error::UnknownStep { saga_type: saga_type.to_owned(), step: step.to_owned() })?;
        let before = def.steps[i].clone();
        let resolve = |field: &str, digest: &str| {
            self.plugin_ref(digest)
                .ok_or_else(|| Error::UnknownPlugin { field: field.to_owned(), digest: digest.to_owned() })
        };
        if let Some(d) = execute {
            def.steps[i].execute = resolve("execute", d)?;
        }
        if let Some(d) = compensate {
            def.steps[i].compensate = resolve("compensate", d)?;
        }
        let after = def.steps[i].clone();
        let entry = audit(&before, &after);
        self.put_definition_checked(def, DefinitionSource::Admin, Some(version), Some(&entry)).await?;
        Ok((before, after))
    }

    /// Every current definition, by saga type.
    pub fn definitions(&self) -> Vec<Arc<SagaDefinition>> {
        self.versioned_definitions().into_iter().map(|(d, _)| d).collect()
    }

    /// Every current definition with its stored version, by type name.
    pub fn versioned_definitions(&self) -> Vec<(Arc<SagaDefinition>, i64)> {
        let mut defs: Vec<_> = self.definitions.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        defs.sort_by(|(a, _), (b, _)| a.saga_type.cmp(&b.saga_type));
        defs
    }

    /// The plugin name a digest was uploaded under.
    pub fn plugin_name(&self, digest: &str) -> Option<String> {
        self.plugin_names.read().unwrap_or_else(|e| e.into_inner()).get(digest).cloned()
    }

    /// Validates and stores a definition, whatever is stored now; new sagas of its type use it
    /// from now on.
    pub async fn put_definition(&self, def: SagaDefinition, source: DefinitionSource) -> Result<(), Error> {
        self.put_definition_checked(def, source, None, None).await.map(drop)
    }

    /// Validates and stores a definition if the stored one is still at `expected_version` (0:
    /// none stored yet; `None`: whatever is stored), with `audit` in the same transaction.
    /// Returns the new version. [`Error::Conflict`] if someone changed it meanwhile; the cache
    /// is then refreshed, so a retry works from the current definition.
    pub async fn put_definition_checked(
        &self,
        def: SagaDefinition,
        source: DefinitionSource,
        expected_version: Option<i64>,
        audit: Option<&AuditEntry>,
    ) -> Result<i64, Error> {
        def.validate()?;
        // The label rules hold for labels new or changed here (not for a bind, which changes
        // no label, of a definition stored before they were: see `validate_labels`).
        let labels = |d: &SagaDefinition| d.steps.iter().map(|s| s.state.clone()).collect::<Vec<_>>();
        if self.definition(&def.saga_type).is_none_or(|current| labels(&current) != labels(&def)) {
            def.validate_labels()?;
        }
        for (i, step) in def.steps.iter().enumerate() {
            for (which, plugin) in [("execute", &step.execute), ("compensate", &step.compensate)] {
                match self.ensure_loaded(&plugin.digest).await {
                    Ok(()) => {}
                    Err(NotLoaded::Unknown(_)) => {
                        return Err(Error::UnknownPlugin {
                            field: format!("steps[{i}].{which}"),
                            digest: plugin.digest.clone(),
                        })
                    }
                    Err(other) => return Err(Error::NotLoaded(other)),
                }
            }
        }
        match self.store.put_definition(&def, source, expected_version, self.clock.now_ms(), audit).await {
            Ok(version) => {
                self.cache(def, version);
                Ok(version)
            }
            Err(store::Error::Conflict) => {
                if let Err(e) = self.refresh().await {
                    tracing::warn!(error = %e, "refreshing the catalog after a conflict failed");
                }
                Err(Error::Conflict(def.saga_type))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn cache(&self, def: SagaDefinition, version: i64) {
        let mut defs = self.definitions.write().unwrap_or_else(|e| e.into_inner());
        // Never replace a newer version a concurrent refresh brought in.
        if defs.get(&def.saga_type).is_none_or(|(_, v)| *v <= version) {
            defs.insert(def.saga_type.clone(), (Arc::new(def), version));
        }
    }

    /// The current definition of a saga type.
    pub fn definition(&self, saga_type: &str) -> Option<Arc<SagaDefinition>> {
        self.versioned_definition(saga_type).map(|(d, _)| d)
    }

    /// The current definition of a saga type with its stored version, the one to pass to
    /// [`Catalog::put_definition_checked`] for a change based on it.
    pub fn versioned_definition(&self, saga_type: &str) -> Option<(Arc<SagaDefinition>, i64)> {
        self.definitions.read().unwrap_or_else(|e| e.into_inner()).get(saga_type).cloned()
    }
}

/// The plugin versions a definition binds (execute and compensate of every step).
fn digests_bound_by(def: &SagaDefinition) -> impl Iterator<Item = &str> {
    def.steps.iter().flat_map(|s| [s.execute.digest.as_str(), s.compensate.digest.as_str()])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::engine::StepDefinition;

    /// Plugin state for a runtime whose plugins read none.
    pub(crate) struct NoState;

    #[async_trait::async_trait]
    impl crate::runtime::PluginReader for NoState {
        async fn get(&self, _: &str, _: &str, _: bool) -> anyhow::Result<crate::store::StateRead> {
            Ok(crate::store::StateRead { value: None, checked: false })
        }

        async fn scan(&self, _: &str, _: &str, _: Option<&str>, _: u32) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
            Ok(Vec::new())
        }

        async fn grants(&self, _: &str) -> anyhow::Result<crate::grants::Grants> {
            Ok(Default::default())
        }
    }

    pub(crate) fn audit(before: &StepDefinition, _: &StepDefinition) -> AuditEntry {
        AuditEntry {
            actor: "test".into(),
            action: "binding.change".into(),
            target: format!("order/{}", before.name),
            before: None,
            after: None,
            note: None,
            answer: None,
        }
    }

    /// Callers that come while a refresh runs share the next one: it began after they asked,
    /// so it sees what they must see; the one under way when they came, which may have read
    /// the store before, serves none of them. A refresh that fails serves nobody.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_waiting_for_a_refresh_share_the_next_one_not_the_one_under_way() {
        use std::sync::atomic::AtomicUsize;
        let refreshes = Arc::new(Refreshes::default());
        // What the store says, and what the latest refresh read of it.
        let stored = Arc::new(AtomicUsize::new(1));
        let read = Arc::new(AtomicUsize::new(0));
        let runs = Arc::new(AtomicUsize::new(0));
        // The next refresh to run fails, once; a gated one waits for the gate after its read.
        let fail_next = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let refresh = |gated: bool| {
            let (stored, read, runs, fail_next, gate) =
                (stored.clone(), read.clone(), runs.clone(), fail_next.clone(), gate.clone());
            move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                let seen = stored.load(Ordering::SeqCst);
                let fail = fail_next.swap(false, Ordering::SeqCst);
                if gated {
                    gate.acquire().await.unwrap().forget();
                }
                if fail {
                    return Err("the store did not answer");
                }
                read.store(seen, Ordering::SeqCst);
                Ok(())
            }
        };
        for fail in [false, true] {
            runs.store(0, Ordering::SeqCst);
            // A refresh under way (it read the store before the change below) ...
            let first = tokio::spawn({
                let (refreshes, refresh) = (refreshes.clone(), refresh(true));
                async move { refreshes.run(refresh).await }
            });
            let started = async {
                while runs.load(Ordering::SeqCst) == 0 {
                    tokio::task::yield_now().await;
                }
            };
            tokio::time::timeout(Duration::from_secs(10), started).await.expect("the first refresh never ran");
            // ... when a change is acknowledged and 50 callers ask (the first refresh for them
            // fails, the second time round).
            stored.fetch_add(1, Ordering::SeqCst);
            let asking = Arc::new(AtomicUsize::new(0));
            let waiting: Vec<_> = (0..50)
                .map(|_| {
                    let (refreshes, refresh, read, asking) =
                        (refreshes.clone(), refresh(false), read.clone(), asking.clone());
                    tokio::spawn(async move {
                        // Counted in the same poll as `run` notes what has begun.
                        asking.fetch_add(1, Ordering::SeqCst);
                        refreshes.run(refresh).await.map(|()| read.load(Ordering::SeqCst))
                    })
                })
                .collect();
            let asked = async {
                while asking.load(Ordering::SeqCst) < 50 {
                    tokio::task::yield_now().await;
                }
            };
            tokio::time::timeout(Duration::from_secs(10), asked).await.expect("the callers never asked");
            fail_next.store(fail, Ordering::SeqCst);
            gate.add_permits(1);
            first.await.unwrap().unwrap();
            let mut failed = 0;
            for w in waiting {
                match w.await.unwrap() {
                    Ok(seen) => {
                        assert_eq!(seen, stored.load(Ordering::SeqCst), "served by a refresh that read before it asked")
                    }
                    Err(_) => failed += 1,
                }
            }
            // The one under way, one for all who waited, and after a failed one another.
            let expected = if fail { 3 } else { 2 };
            assert_eq!((runs.load(Ordering::SeqCst), failed), (expected, usize::from(fail)), "fail {fail}");
        }
    }

    /// A store in `dir`, a runtime without state, and the system clock: what a catalog opens on.
    async fn parts(dir: &std::path::Path) -> (Arc<dyn crate::store::Store>, Arc<Runtime>, Arc<dyn Clock>) {
        let store = crate::store::open(None, dir).await.unwrap();
        let runtime = Arc::new(Runtime::new(Default::default(), Arc::new(NoState)).unwrap());
        (store, runtime, Arc::new(crate::clock::SystemClock))
    }

    /// `wasm` with a custom section appended: the same component, another digest (another
    /// upload of the same code).
    pub(crate) fn another_version(wasm: &[u8], tag: &str) -> Vec<u8> {
        let payload = [&[1u8, b'v'][..], tag.as_bytes()].concat();
        assert!(payload.len() < 128, "one LEB128 byte");
        [wasm, &[0u8, payload.len() as u8][..], &payload].concat()
    }

    /// A host compiles the versions its definitions bind, not every version ever uploaded
    /// (memory and start-up time grew with the upload history); one it needs later is compiled
    /// then, and one that nothing binds and no call used for a while is unloaded again.
    #[tokio::test]
    async fn only_bound_versions_are_compiled_at_start_the_rest_on_demand_and_idle_ones_unloaded() {
        let dir = tempfile::tempdir().unwrap();
        let (store, runtime, clock) = parts(dir.path()).await;
        let old = another_version(crate::builtin::order::PLUGINS[1].1, "old");
        let digest = crate::runtime::digest_of(&old);
        store.put_plugin(&digest, "payment", &old, 0, None).await.unwrap();
        let catalog = Catalog::open(store.clone(), Arc::clone(&runtime), clock).await.unwrap();
        let bound = catalog.definition(crate::builtin::order::SAGA_TYPE).unwrap().steps[1].execute.digest.clone();
        assert!(runtime.is_loaded(&bound));
        assert!(!runtime.is_loaded(&digest), "a version nothing binds was compiled at start");
        assert_eq!(catalog.plugin_name(&digest).as_deref(), Some("payment"), "known as stored all the same");
        // A saga pinned to it (or a bind) needs it: compiled now.
        catalog.ensure_loaded(&digest).await.unwrap();
        assert!(runtime.is_loaded(&digest));
        // Idle and unbound: unloaded; what is bound stays.
        assert!(catalog.unload_idle(Duration::ZERO) >= 1);
        assert!(!runtime.is_loaded(&digest));
        assert!(runtime.is_loaded(&bound), "a bound version was unloaded");
        catalog.ensure_loaded(&digest).await.unwrap();
        // Used a moment ago: kept.
        assert_eq!(catalog.unload_idle(Duration::from_secs(600)), 0);
        assert!(runtime.is_loaded(&digest));
    }

    /// A built-in plugin's bytes uploaded under another name leave that built-in type
    /// uninstalled; the host still starts, with every other type.
    #[tokio::test]
    async fn a_built_in_plugins_bytes_under_another_name_do_not_stop_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let (store, runtime, clock) = parts(dir.path()).await;
        let payment = crate::builtin::order::PLUGINS[1].1;
        let digest = crate::runtime::digest_of(payment);
        store.put_plugin(&digest, "payment-canary", payment, 0, None).await.unwrap();
        let catalog = Catalog::open(store.clone(), runtime, clock).await.expect("the host starts");
        assert!(catalog.definition(crate::builtin::order::SAGA_TYPE).is_none());
        assert!(catalog.definition(crate::builtin::order_http::SAGA_TYPE).is_some());
        assert_eq!(catalog.plugin_name(&digest).as_deref(), Some("payment-canary"));
    }

    /// A replica serves a definition only once it has compiled what the definition binds: a
    /// saga created on it would otherwise wait for that compile before its first call (seconds
    /// for a large component; a waiting request's time ran out meanwhile).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_definition_is_served_only_once_what_it_binds_is_compiled() {
        let dir = tempfile::tempdir().unwrap();
        let (store, runtime, clock) = parts(dir.path()).await;
        let a = Catalog::open(store.clone(), runtime, Arc::clone(&clock)).await.unwrap();
        // Another replica: a runtime of its own, which must compile the new version itself.
        let theirs = Arc::new(Runtime::new(Default::default(), Arc::new(NoState)).unwrap());
        let b = Arc::new(Catalog::open(store.clone(), Arc::clone(&theirs), clock).await.unwrap());
        let new = another_version(crate::builtin::order::PLUGINS[1].1, "new");
        let (digest, _) = a.install_plugin("payment", new).await.unwrap();
        a.bind(crate::builtin::order::SAGA_TYPE, "payment", Some(&digest), None, audit).await.unwrap();
        let refresh = tokio::spawn({
            let b = Arc::clone(&b);
            async move { b.refresh().await }
        });
        loop {
            // Whether the refresh had ended, read before what is served: it may end between
            // the two reads, and then the next round sees the new binding.
            let finished = refresh.is_finished();
            let served = b.definition(crate::builtin::order::SAGA_TYPE).unwrap().steps[1].execute.digest.clone();
            if served == digest {
                assert!(theirs.is_loaded(&digest), "served before it was compiled");
                break;
            }
            assert!(!finished, "the refresh ended without serving the new binding");
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        refresh.await.unwrap().unwrap();
    }

    /// A replica's cache can be a refresh behind a compensation bound through another replica
    /// (and behind what a saga created there since pins): it catches up before a compensation
    /// picks its binding, so the compensation the bind replaced is not run again. A host that
    /// owns its database has nothing to catch up on: it read nothing.
    #[tokio::test]
    async fn a_replica_catches_up_on_a_compensation_bound_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let (store, runtime, clock) = parts(dir.path()).await;
        let a = Catalog::open(store.clone(), runtime, Arc::clone(&clock)).await.unwrap();
        // A replica on a database other hosts share (the wrapper says so; no read is slow).
        let shared: Arc<dyn CatalogStore> = Arc::new(SlowRead::shared(store.clone()));
        assert!(shared.shared_by_hosts() && !store.shared_by_hosts());
        let new_runtime = || Arc::new(Runtime::new(Default::default(), Arc::new(NoState)).unwrap());
        let b = Catalog::open(shared, new_runtime(), Arc::clone(&clock)).await.unwrap();
        let own = Catalog::open(store.clone(), new_runtime(), clock).await.unwrap();
        let fix = another_version(crate::builtin::order::PLUGINS[1].1, "fixed refund");
        let (digest, _) = a.install_plugin("payment", fix).await.unwrap();
        a.bind(crate::builtin::order::SAGA_TYPE, "payment", None, Some(&digest), audit).await.unwrap();
        let compensate =
            |c: &Catalog| c.definition(crate::builtin::order::SAGA_TYPE).unwrap().steps[1].compensate.digest.clone();
        assert_ne!(compensate(&b), digest, "the replica has not refreshed yet");
        assert!(b.catch_up().await);
        assert_eq!(compensate(&b), digest, "the compensation runs the binding replaced a moment ago");
        // A type registered through the other replica is found at once, not after a refresh.
        let mut refund = (*a.definition(crate::builtin::order::SAGA_TYPE).unwrap()).clone();
        refund.saga_type = "refund".into();
        a.put_definition(refund, DefinitionSource::Admin).await.unwrap();
        assert!(b.definition("refund").is_none(), "the replica has not refreshed yet");
        assert!(b.find_definition("refund").await.is_some(), "registered a moment ago through another replica");
        assert!(b.find_definition("no-such-type").await.is_none());
        let before = own.version();
        assert!(own.catch_up().await);
        assert_eq!(own.version(), before, "a host owning its database read the catalog");
    }

    /// The label rules (each step's own, never an engine event type) came after definitions
    /// were stored: one stored before them keeps taking binds (a hot swap must not wait for a
    /// rename its consumers would see), while a PUT that changes its labels must follow them.
    #[tokio::test]
    async fn a_definition_stored_before_the_label_rules_still_takes_binds() {
        let dir = tempfile::tempdir().unwrap();
        let (store, runtime, clock) = parts(dir.path()).await;
        let catalog = Catalog::open(store.clone(), runtime, clock).await.unwrap();
        let mut old = (*catalog.definition(crate::builtin::order::SAGA_TYPE).unwrap()).clone();
        old.saga_type = "legacy".into();
        for step in &mut old.steps {
            step.state = "DONE".into();
        }
        // Stored as an earlier release stored it (no label rules then).
        store.put_definition(&old, DefinitionSource::Admin, None, 0, None).await.unwrap();
        catalog.refresh().await.unwrap();
        let payment = old.steps[1].execute.digest.clone();
        catalog.bind("legacy", "payment", None, Some(&payment), audit).await.expect("a bind changes no label");
        let mut renamed = (*catalog.definition("legacy").unwrap()).clone();
        renamed.steps[0].state = "RESERVED".into();
        let refused = catalog.put_definition(renamed.clone(), DefinitionSource::Admin).await.unwrap_err();
        assert!(refused.to_string().contains("is step 1's already"), "{refused}");
        for (i, label) in ["RESERVED", "PAID", "SHIPPED"].iter().enumerate() {
            renamed.steps[i].state = (*label).into();
        }
        catalog.put_definition(renamed, DefinitionSource::Admin).await.expect("labels of its own");
    }

    #[test]
    fn releases_compare_as_versions() {
        assert!(newer_release("0.2.0", "0.1.9"));
        assert!(newer_release("0.10.0", "0.9.0"), "by number, not by text");
        assert!(newer_release("1.0.0", "1.0.0-rc.1"), "a release after its pre-releases");
        assert!(newer_release("1.0.0-rc.2", "1.0.0-rc.1"));
        assert!(!newer_release("0.1.0", "0.1.0") && !newer_release("0.1.0+build.2", "0.1.0"));
        assert!(!newer_release("0.1.0", "0.2.0") && !newer_release("1.0.0-rc.1", "1.0.0"));
        assert!(
            !newer_release("garbage", "0.1.0") && !newer_release("9.9", "0.1.0") && !newer_release("1.2.3.4", "0.1.0")
        );
    }

    /// During a rolling upgrade a replica of the old release that restarts must not put its
    /// built-in plugins back for every replica (the next new one flipped them again, and
    /// nothing was audited). A release upgrades a built-in stored by an older or the same one,
    /// in the audit trail.
    #[tokio::test]
    async fn a_built_in_stored_by_a_newer_release_is_not_downgraded() {
        let dir = tempfile::tempdir().unwrap();
        let (store, runtime, clock) = parts(dir.path()).await;
        let ty = crate::builtin::order::SAGA_TYPE;
        Catalog::open(store.clone(), Arc::clone(&runtime), Arc::clone(&clock)).await.unwrap();
        let ours = store.definition(ty).await.unwrap().unwrap();
        assert_eq!(ours.builtin_release.as_deref(), Some(env!("CARGO_PKG_VERSION")));
        // The next release's built-in binds another payment version.
        let next = another_version(crate::builtin::order::PLUGINS[1].1, "next release");
        let digest = crate::runtime::digest_of(&next);
        store.put_plugin(&digest, "payment", &next, 0, None).await.unwrap();
        let mut theirs = ours.definition.clone();
        theirs.steps[1].execute.digest = digest.clone();
        theirs.steps[1].compensate.digest = digest.clone();
        store.put_definition(&theirs, DefinitionSource::Builtin, Some(ours.version), 1, None).await.unwrap();
        let payment = |d: &store::StoredDefinition| d.definition.steps[1].execute.digest.clone();

        // This (older) release restarts on a store where that release stored it: left alone.
        let newer: Arc<dyn CatalogStore> = Arc::new(SlowRead {
            inner: store.clone(),
            slow: String::new(),
            builtins_by: Some("99.0.0"),
            versions_read: Default::default(),
        });
        Catalog::open(newer, Arc::clone(&runtime), Arc::clone(&clock)).await.unwrap();
        assert_eq!(payment(&store.definition(ty).await.unwrap().unwrap()), digest, "downgraded by an older release");

        // Stored by this very release (a different build of it): upgraded, and audited.
        Catalog::open(store.clone(), runtime, clock).await.unwrap();
        let now = store.definition(ty).await.unwrap().unwrap();
        assert_eq!(payment(&now), payment(&ours), "not upgraded to this release's plugins");
        let trail = store.audit_log(Some(ty), None, 10).await.unwrap();
        let entry = &trail.first().expect("the upgrade is audited").entry;
        assert_eq!(entry.action, "saga.define");
        assert_eq!(entry.actor, format!("sagahost {}", env!("CARGO_PKG_VERSION")));
    }

    /// A catalog store whose read of one plugin version's bytes takes two seconds (a large
    /// component on a slow database); other hosts may change the catalog it reads.
    pub(crate) struct SlowRead {
        inner: Arc<dyn crate::store::Store>,
        slow: String,
        /// The release the stored built-ins say installed them, if not what was stored.
        builtins_by: Option<&'static str>,
        /// How often the catalog version was read.
        pub(crate) versions_read: std::sync::atomic::AtomicUsize,
    }

    impl SlowRead {
        /// `inner` as a store other hosts share, no read slow.
        pub(crate) fn shared(inner: Arc<dyn crate::store::Store>) -> SlowRead {
            SlowRead { inner, slow: String::new(), builtins_by: None, versions_read: Default::default() }
        }
    }

    #[async_trait::async_trait]
    impl CatalogStore for SlowRead {
        async fn put_plugin(
            &self,
            d: &str,
            n: &str,
            w: &[u8],
            now: i64,
            a: Option<&AuditEntry>,
        ) -> store::Result<bool> {
            self.inner.put_plugin(d, n, w, now, a).await
        }
        async fn plugins(&self) -> store::Result<Vec<store::PluginRow>> {
            self.inner.plugins().await
        }
        async fn plugin(&self, digest: &str) -> store::Result<Option<store::PluginRow>> {
            if digest == self.slow {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            self.inner.plugin(digest).await
        }
        async fn plugin_versions(&self) -> store::Result<Vec<store::PluginInfo>> {
            self.inner.plugin_versions().await
        }
        async fn definition(&self, t: &str) -> store::Result<Option<store::StoredDefinition>> {
            Ok(self.inner.definition(t).await?.map(|mut d| {
                if let (Some(release), DefinitionSource::Builtin) = (self.builtins_by, d.source) {
                    d.builtin_release = Some(release.to_owned());
                }
                d
            }))
        }
        async fn definitions(&self) -> store::Result<Vec<store::StoredDefinition>> {
            self.inner.definitions().await
        }
        async fn put_definition(
            &self,
            def: &SagaDefinition,
            source: DefinitionSource,
            expected: Option<i64>,
            now: i64,
            audit: Option<&AuditEntry>,
        ) -> store::Result<i64> {
            self.inner.put_definition(def, source, expected, now, audit).await
        }
        async fn catalog_version(&self) -> store::Result<i64> {
            self.versions_read.fetch_add(1, Ordering::SeqCst);
            self.inner.catalog_version().await
        }
    }

    /// A refresh that needs no compile (the newly bound version is loaded here already) is not
    /// held up by a compile a call started meanwhile (an idle version loaded again): the bind
    /// reaches this replica within a refresh, not after the compile.
    #[tokio::test]
    async fn a_refresh_needing_no_compile_does_not_wait_behind_one() {
        let dir = tempfile::tempdir().unwrap();
        let (store, runtime, clock) = parts(dir.path()).await;
        let old = another_version(crate::builtin::order::PLUGINS[1].1, "old");
        let old_digest = crate::runtime::digest_of(&old);
        store.put_plugin(&old_digest, "payment", &old, 0, None).await.unwrap();
        let a = Catalog::open(store.clone(), Arc::clone(&runtime), Arc::clone(&clock)).await.unwrap();
        let slow: Arc<dyn CatalogStore> = Arc::new(SlowRead {
            inner: store.clone(),
            slow: old_digest.clone(),
            builtins_by: None,
            versions_read: Default::default(),
        });
        let theirs = Arc::new(Runtime::new(Default::default(), Arc::new(NoState)).unwrap());
        let b = Arc::new(Catalog::open(slow, Arc::clone(&theirs), clock).await.unwrap());
        let new = another_version(crate::builtin::order::PLUGINS[1].1, "new");
        let (digest, _) = a.install_plugin("payment", new).await.unwrap();
        b.ensure_loaded(&digest).await.unwrap();
        // A call needs the old, unbound version: its read takes two seconds.
        let loading = tokio::spawn({
            let (b, old_digest) = (Arc::clone(&b), old_digest.clone());
            async move { b.ensure_loaded(&old_digest).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        a.bind(crate::builtin::order::SAGA_TYPE, "payment", Some(&digest), None, audit).await.unwrap();
        tokio::time::timeout(Duration::from_millis(1000), b.refresh())
            .await
            .expect("the refresh waited for a compile it did not need")
            .unwrap();
        assert_eq!(b.definition(crate::builtin::order::SAGA_TYPE).unwrap().steps[1].execute.digest, digest);
        loading.await.unwrap().unwrap();
        assert!(theirs.is_loaded(&old_digest));
    }

    /// Two catalogs on one store, as two replicas have; they share one runtime so the demo
    /// plugins compile once.
    #[tokio::test]
    async fn of_two_binds_from_the_same_version_one_conflicts_and_its_retry_works() {
        let dir = tempfile::tempdir().unwrap();
        let (store, runtime, clock) = parts(dir.path()).await;
        let a = Catalog::open(store.clone(), Arc::clone(&runtime), Arc::clone(&clock)).await.unwrap();
        let b = Catalog::open(store.clone(), runtime, clock).await.unwrap();
        let order = a.definition(crate::builtin::order::SAGA_TYPE).unwrap();
        let (step, digest) = (order.steps[0].name.clone(), order.steps[0].execute.digest.clone());

        // Concurrent binds through one catalog: both start from the version it holds.
        let (one, two) = tokio::join!(
            a.bind(crate::builtin::order::SAGA_TYPE, &step, Some(&digest), None, audit),
            a.bind(crate::builtin::order::SAGA_TYPE, &step, None, Some(&digest), audit)
        );
        let conflicts = [&one, &two].iter().filter(|r| matches!(r, Err(Error::Conflict(_)))).count();
        assert_eq!((conflicts, one.is_ok() || two.is_ok()), (1, true), "{one:?} {two:?}");

        // A replica that has not caught up yet binds from a stale version: conflict, and the
        // catalog refreshes, so the retry commits.
        let lost = b.bind(crate::builtin::order::SAGA_TYPE, &step, Some(&digest), None, audit).await;
        assert!(matches!(lost, Err(Error::Conflict(_))), "{lost:?}");
        b.bind(crate::builtin::order::SAGA_TYPE, &step, Some(&digest), None, audit).await.unwrap();
        // Exactly the committed binds are audited.
        let binds = store.audit_log(None, None, 10).await.unwrap();
        assert_eq!(binds.iter().filter(|r| r.entry.action == "binding.change").count(), 2);

        // A type registered through `a` a moment ago can be bound through `b` at once.
        let mut refund = (*order).clone();
        refund.saga_type = "refund".into();
        a.put_definition(refund, DefinitionSource::Admin).await.unwrap();
        b.bind("refund", &step, Some(&digest), None, audit).await.expect("bound through the other replica");
    }
}
