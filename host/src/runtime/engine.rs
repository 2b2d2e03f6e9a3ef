//! The wasmtime `Engine`: its configuration and the epoch ticker that drives call timeouts.
//!
//! Owns the process-wide engine settings only. It must not know about plugins, calls or the
//! WIT worlds: what a call may do is decided in `call.rs`, what a plugin may import in
//! `policy.rs`.

use std::time::Duration;

use wasmtime::{Config, Engine};

/// How often the epoch advances: the granularity of call timeouts and of yields to tokio.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Deep recursion must trap inside the plugin, well before the host thread's stack.
const MAX_WASM_STACK: usize = 1 << 20;

/// A new engine with epoch interruption on, and a thread that advances its epoch every
/// [`EPOCH_TICK`].
///
/// Epoch interruption, not fuel, bounds calls: we need wall-clock timeouts, and epochs cost
/// about half of fuel. The ticker holds only a weak reference, so it stops when the engine is
/// dropped.
pub(super) fn new() -> anyhow::Result<Engine> {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.max_wasm_stack(MAX_WASM_STACK);
    let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let weak = engine.weak();
    std::thread::Builder::new().name("sagahost-epoch".into()).spawn(move || loop {
        std::thread::sleep(EPOCH_TICK);
        match weak.upgrade() {
            Some(engine) => engine.increment_epoch(),
            None => break,
        }
    })?;
    Ok(engine)
}
