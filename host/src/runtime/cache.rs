//! The compile cache: components ready to instantiate, by digest, in memory; and compiled
//! artifacts on disk, so a restart does not compile every plugin again.
//!
//! Owns the only `unsafe` of the host: loading an artifact this process (or an earlier one with
//! the same engine) compiled. It must not decide whether a component is acceptable (that is
//! `policy.rs` and `wit/`) and must not run anything.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use wasmtime::component::Component;
use wasmtime::Engine;

use super::wit::Prepared;
use super::LoadError;

/// Compiled plugins by digest, plus where their artifacts are kept.
pub(super) struct Cache {
    ready: RwLock<HashMap<String, Arc<dyn Prepared>>>,
    /// Where compiled artifacts are kept, by digest and engine compatibility hash.
    dir: Option<PathBuf>,
}

impl Cache {
    pub(super) fn new(dir: Option<PathBuf>) -> std::io::Result<Cache> {
        if let Some(dir) = &dir {
            std::fs::create_dir_all(dir)?;
        }
        Ok(Cache { ready: RwLock::new(HashMap::new()), dir })
    }

    pub(super) fn contains(&self, digest: &str) -> bool {
        self.ready.read().unwrap_or_else(|e| e.into_inner()).contains_key(digest)
    }

    pub(super) fn get(&self, digest: &str) -> Option<Arc<dyn Prepared>> {
        self.ready.read().unwrap_or_else(|e| e.into_inner()).get(digest).cloned()
    }

    pub(super) fn insert(&self, digest: String, ready: Arc<dyn Prepared>) {
        self.ready.write().unwrap_or_else(|e| e.into_inner()).insert(digest, ready);
    }

    /// The compiled component of `wasm` (whose digest is `digest`): from the artifact cache if
    /// this engine compiled it before, else compiled now (tens of milliseconds of CPU) and
    /// cached.
    pub(super) fn component(&self, engine: &Engine, digest: &str, wasm: &[u8]) -> Result<Component, LoadError> {
        if let Some(c) = self.load_artifact(engine, digest) {
            return Ok(c);
        }
        let c = Component::new(engine, wasm).map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
        self.store_artifact(engine, digest, &c);
        Ok(c)
    }

    fn artifact_path(&self, engine: &Engine, digest: &str) -> Option<PathBuf> {
        use std::hash::{Hash, Hasher};
        let dir = self.dir.as_ref()?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        Some(dir.join(format!("{hex}-{:016x}.cwasm", h.finish())))
    }

    /// A compiled artifact of this digest for this engine, if one was cached.
    #[allow(unsafe_code)]
    fn load_artifact(&self, engine: &Engine, digest: &str) -> Option<Component> {
        let path = self.artifact_path(engine, digest)?;
        if !path.exists() {
            return None;
        }
        // SAFETY: `deserialize_file` trusts its input to be an artifact wasmtime produced. The
        // cache directory is written only by `store_artifact` below, from a component this
        // process compiled, under a name that includes the engine's compatibility hash; wasmtime
        // also checks the artifact's header and refuses artifacts of another version or config.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "ignoring an unusable compiled artifact");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Writes a compiled artifact atomically (temp file, then rename), so a crash never leaves
    /// a torn artifact under the final name.
    fn store_artifact(&self, engine: &Engine, digest: &str, component: &Component) {
        let Some(path) = self.artifact_path(engine, digest) else { return };
        let result = component.serialize().map_err(|e| anyhow::anyhow!("{e:#}")).and_then(|bytes| {
            let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4()));
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, &path)?;
            Ok(())
        });
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "could not cache a compiled plugin");
        }
    }
}
