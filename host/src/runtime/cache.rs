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
use std::sync::{Arc, RwLock};

use wasmtime::component::Component;
use wasmtime::Engine;

use super::wit::Prepared;
use super::{Capabilities, LoadError};

/// A compiled plugin and what it may do.
type Entry = (Arc<dyn Prepared>, Capabilities);

/// Compiled plugins by digest, with what each may do.
pub(super) struct Cache {
    ready: RwLock<HashMap<String, Entry>>,
}

impl Cache {
    pub(super) fn new() -> Cache {
        Cache { ready: RwLock::new(HashMap::new()) }
    }

    pub(super) fn contains(&self, digest: &str) -> bool {
        self.ready.read().unwrap_or_else(|e| e.into_inner()).contains_key(digest)
    }

    pub(super) fn get(&self, digest: &str) -> Option<Arc<dyn Prepared>> {
        self.ready.read().unwrap_or_else(|e| e.into_inner()).get(digest).map(|(ready, _)| Arc::clone(ready))
    }

    pub(super) fn capabilities(&self, digest: &str) -> Option<Capabilities> {
        self.ready.read().unwrap_or_else(|e| e.into_inner()).get(digest).map(|(_, caps)| *caps)
    }

    pub(super) fn insert(&self, digest: String, ready: Arc<dyn Prepared>, caps: Capabilities) {
        self.ready.write().unwrap_or_else(|e| e.into_inner()).insert(digest, (ready, caps));
    }

    /// The compiled component of `wasm`: compiled now (tens of milliseconds of CPU).
    pub(super) fn component(&self, engine: &Engine, wasm: &[u8]) -> Result<Component, LoadError> {
        Component::new(engine, wasm).map_err(|e| LoadError::Invalid(format!("{e:#}")))
    }
}
