//! Spare instances: components instantiated ahead of their calls, off the saga's path.
//!
//! Every call runs in a fresh instance of its component, never used before (a trap or a
//! plugin's leftovers must never reach another call). Instantiation is a third of a demo
//! plugin's call; nothing in it depends on the call, so a runtime that keeps spares
//! ([`super::Runtime::keeping_spares`]) makes the next call's instance after a call, in a
//! task the worker runs once the saga's task yields (mostly while it waits for its commit),
//! and the next call of that component takes it instead of instantiating. A spare is still
//! an instance no call has touched: it was made in a store of its own, with no call's
//! context, and is handed over with that store, which [`super::call`] then fits to the call
//! (its context, deadline and limits).
//!
//! Instantiation can run a component's own code (a start function). Made ahead, that code
//! has no call whose state it could read: the `sagahost:plugin` imports trap (`host.rs`) and
//! a WASI or wasi:http import marks the store (`CallState::touched`). Either way the spare is
//! thrown away and the component is instantiated by its calls from then on
//! ([`super::wit::Prepared::no_spares`]), as before; so a spare differs from an instance made
//! at the call in nothing the plugin can see but the time it was made.
//!
//! Bounds: [`Limits::spares`] spares at once ([`SPARES`] by default; `--plugin-spares`), from
//! slots of the engine's pool set aside for them (`engine.rs`), so spares never take a call's
//! slot; at most [`PER_COMPONENT`] of one component. A call that finds none makes one more (up
//! to that bound), a call that takes one makes its replacement; a new spare that finds every
//! slot taken evicts the oldest. The spares of a component the runtime unloads (an idle
//! version no longer bound: [`super::Runtime::unload_idle`]) are thrown away with it.
//!
//! This module must not name a world version's generated types: it sees components only
//! through [`Prepared`].

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::{Engine, PoolConcurrencyLimitError, Store};

use super::call::{spare_store, CallState};
use super::wit::{Instance, Prepared};
use super::{Limits, PluginReader};

/// The most spares a runtime keeps at once unless told otherwise ([`Limits::spares`]); the
/// engine's pool has that many slots more than the calls it admits at once.
pub(super) const SPARES: u32 = 64;

/// The most spares of one component: enough for the calls of one step that arrive together
/// under load, few enough that many plugins share [`SPARES`].
pub(super) const PER_COMPONENT: usize = 16;

/// Told how long each spare took to make ([`super::Runtime::keeping_spares`]).
pub type SpareObserver = Arc<dyn Fn(Duration) + Send + Sync>;

/// A component instantiated in a store of its own, waiting for a call. Fields drop in order:
/// the store (resetting its slot) before the slot's permit.
pub(super) struct Spare {
    component: Arc<dyn Prepared>,
    store: Store<CallState>,
    instance: Box<dyn Instance>,
    /// One of [`Spares::permits`], held until the call that takes it gives its sandbox back.
    permit: OwnedSemaphorePermit,
}

impl Spare {
    /// The store, the instance and the slot's permit, for the call that took it.
    pub(super) fn into_parts(self) -> (Store<CallState>, Box<dyn Instance>, OwnedSemaphorePermit) {
        (self.store, self.instance, self.permit)
    }
}

/// The spares of one runtime.
pub(super) struct Spares {
    engine: Engine,
    limits: Limits,
    reader: Arc<dyn PluginReader>,
    /// One per pool slot set aside for spares.
    permits: Arc<Semaphore>,
    /// Oldest first.
    ready: Mutex<VecDeque<Spare>>,
    made: Option<SpareObserver>,
}

/// Whether two handles are the same component (`Arc::ptr_eq` on a trait object also compares
/// vtables, which may differ between codegen units for the same value).
fn same(a: &Arc<dyn Prepared>, b: &Arc<dyn Prepared>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

/// Whether `ready` holds [`PER_COMPONENT`] spares of `component`.
fn full(ready: &VecDeque<Spare>, component: &Arc<dyn Prepared>) -> bool {
    ready.iter().filter(|spare| same(&spare.component, component)).count() >= PER_COMPONENT
}

impl Spares {
    pub(super) fn new(
        engine: Engine,
        limits: Limits,
        reader: Arc<dyn PluginReader>,
        made: Option<SpareObserver>,
    ) -> Spares {
        let permits = Arc::new(Semaphore::new(limits.spares as usize));
        Spares { engine, limits, reader, permits, ready: Mutex::new(VecDeque::new()), made }
    }

    fn ready(&self) -> std::sync::MutexGuard<'_, VecDeque<Spare>> {
        // A panic while the lock was held left a queue of whole spares: still usable.
        self.ready.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A spare of `component`, if one is ready: the newest, whose memory is likeliest still in
    /// the processor's caches (taking the oldest cycled every spare through them).
    pub(super) fn take(&self, component: &Arc<dyn Prepared>) -> Option<Spare> {
        let mut ready = self.ready();
        let at = ready.iter().rposition(|spare| same(&spare.component, component))?;
        ready.remove(at)
    }

    /// After a call of `component` took a spare (`took`) or found none: make one more, in a
    /// task. Never waits: without a free slot it evicts the oldest spare, and when every slot
    /// is held by spares being made it makes none.
    pub(super) fn refill(self: &Arc<Self>, component: &Arc<dyn Prepared>, took: bool) {
        if component.no_spares().load(Ordering::Relaxed) {
            return;
        }
        let evicted = {
            let mut ready = self.ready();
            if !took && full(&ready, component) {
                return;
            }
            match Arc::clone(&self.permits).try_acquire_owned() {
                Ok(permit) => Err(permit),
                Err(_) => match ready.pop_front() {
                    Some(oldest) => Ok(oldest),
                    None => return,
                },
            }
        };
        let spares = Arc::clone(self);
        let component = Arc::clone(component);
        tokio::spawn(async move {
            let permit = match evicted {
                Err(permit) => permit,
                Ok(oldest) => {
                    let Spare { store, instance, permit, .. } = oldest;
                    drop(instance);
                    drop(store);
                    permit
                }
            };
            spares.make(component, permit).await;
        });
    }

    async fn make(&self, component: Arc<dyn Prepared>, permit: OwnedSemaphorePermit) {
        let started = Instant::now();
        let mut store = spare_store(&self.engine, &self.limits, &self.reader);
        match component.instantiate(&mut store).await {
            Ok(instance) if !store.data().touched => {
                if let Some(made) = &self.made {
                    made(started.elapsed());
                }
                let mut ready = self.ready();
                // Calls that found none at once each asked for one: past the bound, the last
                // made is dropped (here: a spare's reset is this task's, not a call's).
                if !full(&ready, &component) {
                    ready.push_back(Spare { component, store, instance, permit });
                }
            }
            // The pool is short (it should not be: spares have slots of their own): try again
            // after a later call.
            Err(e) if e.downcast_ref::<PoolConcurrencyLimitError>().is_some() => {}
            // It reached for the host, or failed: its calls instantiate it themselves, and a
            // failure is theirs to report.
            Ok(_) | Err(_) => component.no_spares().store(true, Ordering::Relaxed),
        }
    }

    /// Throws away the spares of `components` (unloaded: no call will take them), giving their
    /// slots back. Spares being made when this runs are kept, and so are their components,
    /// until evicted as the oldest.
    pub(super) fn forget(&self, components: &[Arc<dyn Prepared>]) {
        if components.is_empty() {
            return;
        }
        let forgotten: VecDeque<Spare> = {
            let mut ready = self.ready();
            let (gone, kept): (VecDeque<Spare>, VecDeque<Spare>) = std::mem::take(&mut *ready)
                .into_iter()
                .partition(|spare| components.iter().any(|component| same(&spare.component, component)));
            *ready = kept;
            gone
        };
        // Each spare's store is reset and its slot freed here, outside the lock.
        drop(forgotten);
    }

    /// How many spares are ready.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.ready().len()
    }

    /// How many slots for spares are neither held by a spare nor by one being made.
    #[cfg(test)]
    pub(super) fn free_slots(&self) -> usize {
        self.permits.available_permits()
    }
}
