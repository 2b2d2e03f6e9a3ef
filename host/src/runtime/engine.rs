//! The wasmtime `Engine`: its configuration, the pool its calls' sandboxes come from, and the
//! epoch ticker that drives call timeouts.
//!
//! Owns the process-wide engine settings only. It must not know about plugins or the WIT
//! worlds: what a call may do is decided in `call.rs`, what a plugin may import in
//! `policy.rs`. It does know how much one call's store may hold ([`PER_CALL`]), because the
//! pool is sized from it.

use std::time::Duration;

use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::Limits;

/// How often the epoch advances: the granularity of call timeouts and of yields to tokio.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Deep recursion must trap inside the plugin, well before the host thread's stack.
const MAX_WASM_STACK: usize = 1 << 20;

/// What one call's store may create. A Rust component has a handful of core instances, one
/// linear memory and a few tables; a componentize-py (Python) one has 44 core instances (the
/// interpreter's libraries and a trapping stub per stubbed WASI interface), hence 64. These
/// bound what a hand-made component could ask for.
/// Enforced twice: by the call's limiter (`call.rs`) and by the pool's per-component limits,
/// so one call can never take more than its share of the pool.
pub(super) struct PerCall {
    pub(super) instances: u32,
    pub(super) memories: u32,
    pub(super) tables: u32,
    /// Elements one table may have.
    pub(super) table_elements: usize,
}

pub(super) const PER_CALL: PerCall = PerCall { instances: 64, memories: 4, tables: 16, table_elements: 100_000 };

/// Bytes of a linear memory that are reset in place when its pool slot is given back, rather
/// than handed back to the kernel with `madvise`: the next call in the slot then finds those
/// pages mapped instead of faulting each one in again (measured: a third of a demo plugin's
/// call). A Rust plugin's stack is the first MiB of its memory, its data and heap follow, so a
/// few MiB cover all a small step touches; a plugin that touches more has the rest released.
/// With the kernel's `PAGEMAP_SCAN` (Linux 6.7+) only pages the call wrote are reset, so the
/// range can be generous; without it every byte of the range within the memory's size is
/// copied back from the initial image on every release.
const KEEP_RESIDENT_WITH_PAGEMAP: usize = 4 << 20;
const KEEP_RESIDENT_WITHOUT_PAGEMAP: usize = 2 << 20;

/// Bytes of a table reset in place on release (a Rust component's tables hold a few hundred
/// function references: 8 bytes each).
const TABLE_KEEP_RESIDENT: usize = 64 << 10;

/// A new engine with the pooling allocator and epoch interruption on, and a thread that
/// advances its epoch every [`EPOCH_TICK`].
///
/// Epoch interruption, not fuel, bounds calls: we need wall-clock timeouts, and epochs cost
/// about half of fuel. The ticker holds only a weak reference, so it stops when the engine is
/// dropped.
///
/// Why a pool: every call gets a fresh instance (a trap must never poison another call), and
/// on-demand allocation makes that expensive: each instance mmaps a 4 GiB reservation for its
/// memory and a fiber stack, page-faults in every page it touches, and munmaps it all again,
/// with a TLB shootdown across cores each time. The pooling allocator reserves the address
/// space once; an instance takes a slot, and giving it back resets the slot's memory to the
/// module's initial image (copy-on-write from an in-memory image, `memory_init_cow`), so
/// nothing a call wrote is ever visible to the next call in that slot. Slots prefer the module
/// they last held, whose image is then already mapped.
///
/// The pool holds `limits.concurrent_calls` calls' worth of everything a call may create
/// ([`PER_CALL`]), and the runtime admits at most that many calls at once, so the pool cannot
/// run out; and `limits.spares` more for the spare instances made ahead of calls
/// (`spare.rs`), which have slots of their own. Address space: one memory slot is a 4 GiB
/// reservation plus a 32 MiB guard (which lets Cranelift drop bounds checks on 32-bit
/// memories), so 256 calls and 64 spares reserve about 5 TiB of the 128 TiB a Linux process
/// can address, none of it backed until used.
pub(super) fn new(limits: &Limits) -> anyhow::Result<Engine> {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.max_wasm_stack(MAX_WASM_STACK);
    // The default, stated because the pool's cheap instantiation depends on it.
    config.memory_init_cow(true);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool(limits)));
    let engine = Engine::new(&config).map_err(|e| {
        anyhow::anyhow!(
            "could not set up the sandbox pool for {} calls at once ({e:?}); if the process's address space is \
             limited (ulimit -v), lift the limit or run fewer calls at once",
            limits.concurrent_calls
        )
    })?;
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

/// The pool for `limits.concurrent_calls` calls at once, and the spare instances made ahead of
/// calls (`spare.rs`), which have slots of their own.
fn pool(limits: &Limits) -> PoolingAllocationConfig {
    let calls = limits.concurrent_calls.max(1).saturating_add(limits.spares);
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(calls)
        .total_core_instances(calls.saturating_mul(PER_CALL.instances))
        .total_memories(calls.saturating_mul(PER_CALL.memories))
        .total_tables(calls.saturating_mul(PER_CALL.tables))
        .total_stacks(calls)
        .max_core_instances_per_component(PER_CALL.instances)
        .max_memories_per_component(PER_CALL.memories)
        .max_tables_per_component(PER_CALL.tables)
        .table_elements(PER_CALL.table_elements)
        // One memory may take the whole call's budget, never more (and a 32-bit memory never
        // more than 4 GiB, the reservation).
        .max_memory_size(limits.memory_bytes.min(4 << 30))
        .table_keep_resident(TABLE_KEEP_RESIDENT);
    if PoolingAllocationConfig::is_pagemap_scan_available() {
        pool.pagemap_scan(Enabled::Yes).linear_memory_keep_resident(KEEP_RESIDENT_WITH_PAGEMAP);
    } else {
        pool.linear_memory_keep_resident(KEEP_RESIDENT_WITHOUT_PAGEMAP);
    }

    pool
}
