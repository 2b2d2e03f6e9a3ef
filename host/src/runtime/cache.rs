//! The compile cache: components ready to instantiate, by digest, in memory.
//!
//! Nothing compiled is kept on disk. A compiled artifact is native code, and loading one is
//! `unsafe`: whoever can write the file gets to run code in the host. Artifacts in the data
//! directory would hand that to anyone who can write the data directory, and a digest kept in
//! the database would not help the embedded default, whose database lives in the same
//! directory. Compiling costs tens of milliseconds per plugin at start-up; the host has no
//! `unsafe` at all.
//!
//! It must not decide whether a component is acceptable (that is `policy.rs` and `wit/`) and
//! must not run anything.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use wasmtime::component::Component;
use wasmtime::Engine;

use super::wit::Prepared;
use super::{Capabilities, LoadError};

/// A compiled plugin, what it may do, and when it was last handed to a call (ms since the
/// cache was made).
struct Entry {
    ready: Arc<dyn Prepared>,
    caps: Capabilities,
    used: AtomicU64,
}

/// Compiled plugins by digest, with what each may do.
pub(super) struct Cache {
    ready: RwLock<HashMap<String, Entry>>,
    since: Instant,
}

impl Cache {
    pub(super) fn new() -> Cache {
        Cache { ready: RwLock::new(HashMap::new()), since: Instant::now() }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(super) fn contains(&self, digest: &str) -> bool {
        self.ready.read().unwrap_or_else(|e| e.into_inner()).contains_key(digest)
    }

    /// The compiled plugin and what it may do, for a call: marks it used now.
    pub(super) fn get(&self, digest: &str) -> Option<(Arc<dyn Prepared>, Capabilities)> {
        let ready = self.ready.read().unwrap_or_else(|e| e.into_inner());
        let entry = ready.get(digest)?;
        entry.used.store(self.now(), Ordering::Relaxed);
        Some((Arc::clone(&entry.ready), entry.caps))
    }

    pub(super) fn capabilities(&self, digest: &str) -> Option<Capabilities> {
        self.ready.read().unwrap_or_else(|e| e.into_inner()).get(digest).map(|e| e.caps)
    }

    pub(super) fn insert(&self, digest: String, ready: Arc<dyn Prepared>, caps: Capabilities) {
        let entry = Entry { ready, caps, used: AtomicU64::new(self.now()) };
        self.ready.write().unwrap_or_else(|e| e.into_inner()).insert(digest, entry);
    }

    /// Drops the plugins not handed to a call (nor loaded) for `idle`, but those `keep` names;
    /// returns their digests and components. A call running one keeps its share until it ends.
    pub(super) fn drop_idle(&self, idle: Duration, keep: impl Fn(&str) -> bool) -> Vec<(String, Arc<dyn Prepared>)> {
        let cutoff = self.now().saturating_sub(u64::try_from(idle.as_millis()).unwrap_or(u64::MAX));
        let mut ready = self.ready.write().unwrap_or_else(|e| e.into_inner());
        let idle: Vec<String> = ready
            .iter()
            .filter(|(digest, e)| e.used.load(Ordering::Relaxed) <= cutoff && !keep(digest))
            .map(|(digest, _)| digest.clone())
            .collect();
        idle.into_iter().filter_map(|digest| ready.remove(&digest).map(|entry| (digest, entry.ready))).collect()
    }

    /// The compiled component of `wasm`: compiled now (tens of milliseconds of CPU).
    pub(super) fn component(&self, engine: &Engine, wasm: &[u8]) -> Result<Component, LoadError> {
        Component::new(engine, wasm).map_err(|e| LoadError::Invalid(format!("{e:#}")))
    }
}
