//! The driver: the IO loop around the pure engine.
//!
//! It claims due sagas from the store (a lease plus a fencing epoch), asks the engine what to
//! do, calls the plugin, feeds the result back to the engine, and commits the transition:
//! saga row, step rows, the plugin's state writes and the outbox events, in ONE transaction.
//! Then it goes on with the same saga while work is due now, and releases it when the next
//! step lies in the future (a backoff, a wait) or the saga is terminal.
//!
//! # Commit chains
//!
//! Plugin steps touch only host state, so the steps of one saga that follow each other
//! without a pause need not wait for a durable commit each: the driver stages each
//! transition ([`Sagas::stage`]) and commits a chain of them at once
//! ([`Sagas::commit_staged`]), one outbox event per transition, in order. A chain ends (is
//! committed) when:
//! - nothing more is due now (the saga is terminal, parked, or backing off): the commit also
//!   releases the claim;
//! - a call reached another service (outbound HTTP): its effect out there is recorded before
//!   anything else happens;
//! - the next call is an execute that may reach another service: its start
//!   ([`Event::Started`]) is committed before it calls, so that a step whose result never
//!   commits (a cancel took the saga over mid-call, the host died) is still compensated, and
//!   not before the call can no longer be sending anything;
//! - the next call is a compensation that may reach another service: the chain that decided
//!   to compensate is committed before it calls, so that no refund goes out for a decision a
//!   crash could undo (the rejected step, rerun, might succeed) or a signal accepted
//!   meanwhile could overtake (the saga would then complete with its charge refunded);
//! - the next call is to a plugin with staged writes: a plugin reads its own state, and must
//!   read it committed (there is no overlay of uncommitted writes);
//! - it holds `chain_max` transitions or is `chain_max_age` old ([`DriverOptions`]).
//!
//! A saga created by a request that waits for it arrives uncommitted ([`Deferred`]): its
//! first chain's commit creates it, and a call that may reach another service waits for the
//! creation to be durable (ARCHITECTURE.md, "A waiting request's saga is created by its first
//! commit").
//!
//! A crash or a lost claim before the commit loses the whole chain, as it would lose one
//! transition: its steps run again with the same idempotency keys. So does a chain whose commit
//! finds a plugin state value its calls read changed since (another saga's commit, or on a
//! shared database another replica, wrote it): the saga is reloaded and the steps run again on
//! the current values (`Flushed::Reloaded`; after refusals in a row, a short pause first,
//! `Staged::stale_read_pause`). Nobody sees a chain's
//! middle: events, step rows and statuses appear at its commit, and a client waiting on the
//! saga is answered only after it. If the store refuses a chain's data for good, the saga is
//! reloaded and its transitions run again one commit each, so that the refused one is known
//! and counted as a failed attempt.
//!
//! Architecture invariant: a plugin's state writes are durable only together with the step
//! result that produced them. A crash before the commit leaves no trace; the step runs again
//! with the same idempotency key.
//!
//! Architecture invariant: the driver never holds a database transaction open across a plugin
//! call. Calls take milliseconds to seconds; the single SQLite writer must not wait on them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::catalog::Catalog;
use crate::clock::Clock;
use crate::engine::{self, Action, CompensateOutcome, Event, ExecuteOutcome};
use crate::runtime::{CallInfo, Runtime};
use crate::saga::{self, Deferred, Sagas, Staged, Touched};
use crate::store::{SagaRecord, SagaStore};

/// How long shutdown waits for plugin calls in progress.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A chain is committed once its calls wrote this many state keys: with the last call's at
/// most [`crate::runtime::MAX_STATE_KEYS`] more, a commit carries at most about 3,000 rows of
/// state, 12,000 statement arguments, well within PostgreSQL's 65,535 (SQLite's bundled
/// build takes 250,000).
const CHAIN_MAX_STATE_KEYS: usize = 2 * crate::runtime::MAX_STATE_KEYS;

/// Tuning of the driver.
#[derive(Debug, Clone)]
pub struct DriverOptions {
    /// Identity of this host process in lease columns.
    pub owner: String,
    /// How long a claim lasts without a commit before another worker may take the saga over.
    pub lease_ms: i64,
    /// The longest the driver sleeps without looking for due work.
    pub poll_interval: Duration,
    /// How many sagas this process runs at once.
    pub max_concurrency: usize,
    /// How many sagas created here may wait for one of those places. Past it, creating a
    /// saga is refused at once ([`DriverHandle::admit`]): the host sheds new work instead of
    /// queueing more than it can start soon.
    pub max_queued: usize,
    /// Most transitions of one saga staged before they are committed together; 1 commits each
    /// transition alone.
    pub chain_max: usize,
    /// The longest a chain stays uncommitted: a slow step must not hold the results of the
    /// steps before it back from the outbox (and from readers) for long.
    pub chain_max_age: Duration,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            owner: format!("host-{}", uuid::Uuid::new_v4()),
            lease_ms: 60_000,
            poll_interval: Duration::from_millis(500),
            max_concurrency: 64,
            max_queued: 512,
            chain_max: 16,
            chain_max_age: Duration::from_millis(50),
        }
    }
}

/// A committed status change, for whoever watches that saga (`Prefer: wait`).
#[derive(Debug, Clone)]
pub struct StatusChange {
    pub saga_id: String,
    /// This process stopped running the saga (it parked, gave its claim back or lost it):
    /// its next changes may be committed by another process, which only a read of the store
    /// sees. Nothing else is set then.
    pub left: bool,
    /// Terminal, or stuck until an operator acts: no point waiting further.
    pub settled: bool,
    /// The saga as committed, when settled: a waiter answers with it without reading it back.
    pub record: Option<Arc<SagaRecord>>,
    /// The response body (status 200) this commit stored under the idempotency key of the
    /// watcher that registered a [`Responder`]: that watcher answers with exactly it.
    pub response: Option<Arc<Vec<u8>>>,
}

/// What a request that waits for its saga (`Prefer: wait`) would store as its response under
/// its idempotency key once the saga settles. The commit that settles the saga stores it in
/// the same transaction (the saga service asks [`DriverHandle::responder`]), so a waiting
/// request costs no write of its own; a request that stops waiting first stores its own, and
/// the first one stored stands.
pub struct Responder {
    pub caller: String,
    pub route: String,
    pub key: String,
    /// The body of the 200 response for the settled saga.
    pub render: Render,
}

/// Renders the 200 response's body for a settled saga ([`Responder::render`]).
pub type Render = Box<dyn Fn(&SagaRecord) -> Option<Vec<u8>> + Send + Sync>;

/// A cheap, cloneable handle to wake the driver and follow status changes.
#[derive(Clone)]
pub struct DriverHandle {
    wake: Arc<Notify>,
    /// Woken on every commit (the relay: new events to publish).
    committed: Arc<Notify>,
    /// Who watches which saga. Only a saga's own watchers hear of its changes: a waiter
    /// must not wake for every other saga's transitions (thousands a second).
    watchers: Arc<Mutex<Watchers>>,
    /// Set once a [`Driver`] runs behind this handle: new sagas are created already claimed
    /// by it and handed over in-process.
    adoption: Arc<OnceLock<Adoption>>,
}

#[derive(Default)]
struct Watchers {
    next: u64,
    by_saga: HashMap<String, Vec<Watcher>>,
}

/// One watcher of a saga: its token (to unregister), where its changes go, and the response
/// it wants stored by the settling commit, if any.
type Watcher = (u64, mpsc::UnboundedSender<StatusChange>, Option<Arc<Responder>>);

/// The changes of one saga, from [`DriverHandle::watch`] on; unregisters itself when dropped.
pub struct Watch {
    id: String,
    token: u64,
    changes: mpsc::UnboundedReceiver<StatusChange>,
    watchers: Arc<Mutex<Watchers>>,
}

impl Watch {
    pub fn saga_id(&self) -> &str {
        &self.id
    }

    /// The next committed change of the saga (`None` only if the host is stopping).
    pub async fn next(&mut self) -> Option<StatusChange> {
        self.changes.recv().await
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = w.by_saga.get_mut(&self.id) {
            list.retain(|(token, _, _)| *token != self.token);
            if list.is_empty() {
                w.by_saga.remove(&self.id);
            }
        }
    }
}

/// How a new saga reaches the driver of the process that created it without a database
/// round trip: the saga service inserts it claimed for `owner` (epoch 1, a lease of
/// `lease_ms`) and sends the record here. The driver runs it like a saga it claimed itself.
struct Adoption {
    owner: String,
    lease_ms: i64,
    sagas: mpsc::UnboundedSender<Adopted>,
    /// Places in the queue of handed-over sagas the driver has not started yet.
    queue: Arc<Semaphore>,
    max_queued: usize,
    /// The driver's places for sagas it runs at once ([`DriverOptions::max_concurrency`]).
    running: Arc<Semaphore>,
    /// Set when the driver stops: sagas created from then on are created unclaimed, for any
    /// replica (or this one restarted) to claim from the store.
    stopped: std::sync::atomic::AtomicBool,
}

/// A saga handed over: the record, its place in the queue, and its creation when that is
/// still to commit ([`Deferred`]).
type Adopted = (SagaRecord, OwnedSemaphorePermit, Option<Deferred>);

/// Admission of a new saga ([`DriverHandle::admit`]): how to create it, and its place in the
/// queue of the driver that will run it.
pub struct Admitted {
    /// The claim to create the saga with, (owner, lease in ms), when a driver runs behind the
    /// handle to adopt it; `None` otherwise (then the driver claims it from the store).
    pub claim: Option<(String, i64)>,
    /// Whether the driver has a place to start the saga at once (none is free while as many
    /// sagas as it runs at once are running, or as many handed over before wait for one).
    pub starts_at_once: bool,
    place: Option<OwnedSemaphorePermit>,
}

/// Refused admission: as many sagas created here wait for the driver as it queues.
#[derive(Debug, Clone, Copy)]
pub struct Overloaded {
    pub queued: usize,
}

impl Default for DriverHandle {
    fn default() -> Self {
        DriverHandle {
            wake: Arc::new(Notify::new()),
            committed: Arc::new(Notify::new()),
            watchers: Arc::default(),
            adoption: Arc::new(OnceLock::new()),
        }
    }
}

impl DriverHandle {
    /// Tells the driver that new work may be due now (a new saga, a signal, a cancel).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Follows the committed changes of saga `id` from now on. Watch before reading the saga,
    /// so a change between the read and the wait is not missed.
    pub fn watch(&self, id: &str) -> Watch {
        self.watch_with(id, None)
    }

    /// [`DriverHandle::watch`] for the request that created the saga and waits for it: the
    /// commit that settles the saga while the watch lives also stores `responder`'s response.
    pub fn watch_responding(&self, id: &str, responder: Responder) -> Watch {
        self.watch_with(id, Some(Arc::new(responder)))
    }

    fn watch_with(&self, id: &str, responder: Option<Arc<Responder>>) -> Watch {
        let (sender, changes) = mpsc::unbounded_channel();
        let mut w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        w.next += 1;
        let token = w.next;
        w.by_saga.entry(id.to_owned()).or_default().push((token, sender, responder));
        Watch { id: id.to_owned(), token, changes, watchers: Arc::clone(&self.watchers) }
    }

    /// The responder of a request waiting for saga `id` in this process, if any.
    pub fn responder(&self, id: &str) -> Option<Arc<Responder>> {
        let w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        w.by_saga.get(id)?.iter().find_map(|(_, _, r)| r.clone())
    }

    /// Resolves after the next commit of any saga (or at once if one happened since the last
    /// call): the relay's cue that new events may wait.
    pub async fn committed(&self) {
        self.committed.notified().await
    }

    /// Announces a committed change (the saga service does, for every commit and creation).
    pub fn announce(&self, change: StatusChange) {
        self.committed.notify_one();
        self.tell_watchers(change);
    }

    /// Sends `change` to the watchers of its saga, if any.
    fn tell_watchers(&self, change: StatusChange) {
        let w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = w.by_saga.get(&change.saga_id) {
            for (_, sender, _) in list {
                let _ = sender.send(change.clone());
            }
        }
    }

    /// Whether a driver runs behind this handle: sagas created through it are created claimed
    /// by that driver and run in this process (until [`StatusChange::left`]).
    pub fn adopts(&self) -> bool {
        self.adoption.get().is_some_and(|a| !a.stopped.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Admits a new saga: its claim and its place in the driver's queue, or `Overloaded` when
    /// [`DriverOptions::max_queued`] sagas created here wait for the driver already. Load
    /// past what the host can run is shed here, before it costs a write: admitted without a
    /// bound, new sagas would take the database from the sagas in progress and slow every one
    /// of them (the host did ever less the more it was offered).
    pub fn admit(&self) -> Result<Admitted, Overloaded> {
        let Some(a) = self.adoption.get().filter(|a| !a.stopped.load(std::sync::atomic::Ordering::Acquire)) else {
            return Ok(Admitted { claim: None, starts_at_once: false, place: None });
        };
        match Arc::clone(&a.queue).try_acquire_owned() {
            Ok(place) => {
                // This saga's place included.
                let queued = a.max_queued - a.queue.available_permits();
                let starts_at_once = a.running.available_permits() >= queued;
                Ok(Admitted { claim: Some((a.owner.clone(), a.lease_ms)), starts_at_once, place: Some(place) })
            }
            Err(_) => Err(Overloaded { queued: a.max_queued }),
        }
    }

    /// Hands a saga created with [`DriverHandle::admit`]'s claim (at `rec.epoch`) to the
    /// driver. If the driver has stopped, the claim simply expires and the saga is claimed
    /// from the store (by this process after a restart, or by another replica). With
    /// `deferred` the creation is not committed yet: the driver commits it with the saga's
    /// first transitions (dropping it unanswered if the driver has stopped).
    pub fn adopt(&self, rec: SagaRecord, admitted: Admitted, deferred: Option<Deferred>) {
        match (self.adoption.get(), admitted.place) {
            (Some(a), Some(place)) => {
                let _ = a.sagas.send((rec, place, deferred));
            }
            _ => self.wake(),
        }
    }

    /// Announces that this process stopped running saga `id` ([`StatusChange::left`]).
    fn left(&self, id: &str) {
        self.tell_watchers(StatusChange {
            saga_id: id.to_owned(),
            left: true,
            settled: false,
            record: None,
            response: None,
        });
    }
}

/// The saga driver. Build it, hand out [`Driver::handle`]s, then [`Driver::run`] it.
pub struct Driver {
    inner: Arc<Inner>,
    /// Sagas created claimed by this driver, handed over by the saga service, each with its
    /// place in the queue (given back when the saga starts).
    adopted: mpsc::UnboundedReceiver<Adopted>,
    /// Places for the sagas it runs at once (shared with the handle's admission).
    permits: Arc<Semaphore>,
}

struct Inner {
    store: Arc<dyn SagaStore>,
    sagas: Arc<Sagas>,
    runtime: Arc<Runtime>,
    catalog: Arc<Catalog>,
    clock: Arc<dyn Clock>,
    metrics: Arc<crate::metrics::Metrics>,
    options: DriverOptions,
    handle: DriverHandle,
    /// Cancelled when the driver stops: sagas in progress give their claims back between
    /// steps.
    stopping: CancellationToken,
    /// When this replica first found a call's plugin version refused, by the call (saga id,
    /// step, and the step's attempts and compensation attempts then, so that a step that moved
    /// on starts afresh): see [`Inner::not_loaded`].
    refused_since: std::sync::Mutex<HashMap<(String, usize, u32, u32), i64>>,
}

impl Driver {
    /// A driver that commits through `sagas` and is woken through the saga service's handle.
    pub fn new(
        store: Arc<dyn SagaStore>,
        sagas: Arc<Sagas>,
        runtime: Arc<Runtime>,
        catalog: Arc<Catalog>,
        clock: Arc<dyn Clock>,
        metrics: Arc<crate::metrics::Metrics>,
        options: DriverOptions,
    ) -> Driver {
        let handle = sagas.handle();
        let (sender, adopted) = mpsc::unbounded_channel();
        let max_queued = options.max_queued.max(1);
        let permits = Arc::new(Semaphore::new(options.max_concurrency));
        let adoption = Adoption {
            owner: options.owner.clone(),
            lease_ms: options.lease_ms,
            sagas: sender,
            queue: Arc::new(Semaphore::new(max_queued)),
            max_queued,
            running: Arc::clone(&permits),
            stopped: std::sync::atomic::AtomicBool::new(false),
        };
        if handle.adoption.set(adoption).is_err() {
            tracing::warn!("a second driver on one handle: it claims its sagas from the store only");
        }
        let stopping = CancellationToken::new();
        let refused_since = std::sync::Mutex::new(HashMap::new());
        let inner = Arc::new(Inner {
            store,
            sagas,
            runtime,
            catalog,
            clock,
            metrics,
            options,
            handle,
            stopping,
            refused_since,
        });
        Driver { inner, adopted, permits }
    }

    pub fn handle(&self) -> DriverHandle {
        self.inner.handle.clone()
    }

    /// Gives back the claims a previous process with this identity died holding, so that the
    /// driver claims those sagas from the store. Call it before serving requests: a saga a
    /// request creates here is born claimed by this identity too, and releasing that claim
    /// would let the store hand the saga out again while this process runs it.
    pub async fn release_stale_claims(&self) {
        if let Err(e) = self.inner.store.release_owner(&self.inner.options.owner).await {
            tracing::warn!(error = %e, "could not release stale claims");
        }
    }

    /// Runs until `shutdown`; then lets the sagas in progress finish their current call and
    /// commit, for up to ten seconds (or not: a crash at any point is safe too).
    pub async fn run(self, shutdown: CancellationToken) {
        let Driver { inner, mut adopted, permits } = self;
        let tasks = TaskTracker::new();
        // Fired past the shutdown grace: what still runs is dropped before its claims are
        // given back.
        let abort = CancellationToken::new();
        // Whether to look in the store for due work: at start, when woken (a signal, a cancel,
        // a saga of ours parked on a timer), when the timer for the earliest due saga fires,
        // and while a claim may have left due work behind. Not for a saga handed over: it is
        // claimed already, and a claim and a read per new saga would cost more than the saga's
        // own commits.
        let mut poll = true;
        let mut deadline = tokio::time::Instant::now();
        loop {
            // Sagas this process just created, already claimed: no claim, no read.
            while let Ok(permit) = Arc::clone(&permits).try_acquire_owned() {
                let Ok((rec, place, deferred)) = adopted.try_recv() else {
                    drop(permit);
                    break;
                };
                drop(place);
                let inner = Arc::clone(&inner);
                spawn_with(&tasks, &abort, permit, async move { inner.run_adopted(rec, deferred).await });
            }
            let free = permits.available_permits();
            if poll && free > 0 {
                poll = false;
                let now = inner.clock.now_ms();
                match inner.store.claim_due(&inner.options.owner, now, inner.options.lease_ms, free as u32).await {
                    Ok(due) => {
                        // As many as asked for: there may be more, look again once a permit frees.
                        poll = due.len() == free;
                        for (id, epoch) in due {
                            let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                                poll = true;
                                break;
                            };
                            let inner = Arc::clone(&inner);
                            spawn_with(&tasks, &abort, permit, async move { inner.run_saga(id, epoch).await });
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "claiming due sagas failed");
                        // Not again at once: a database that refuses writes but answers reads
                        // (disk full, a read-only standby) reports sagas due now, and the loop
                        // made a failing claim after another, thousands a second.
                        deadline = tokio::time::Instant::now() + inner.options.poll_interval;
                        continue;
                    }
                }
                deadline = tokio::time::Instant::now() + inner.sleep_for().await;
            }
            if permits.available_permits() == 0 {
                // Every permit is taken: wait for one, not a timer (sagas in progress are due,
                // so a timer would not sleep).
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    p = Arc::clone(&permits).acquire_owned() => drop(p),
                }
                poll |= tokio::time::Instant::now() >= deadline;
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = inner.handle.wake.notified() => poll = true,
                _ = tokio::time::sleep_until(deadline) => poll = true,
                // A permit is free here (the wait above takes over otherwise).
                Some((rec, place, deferred)) = adopted.recv() => {
                    drop(place);
                    let permit = Arc::clone(&permits).try_acquire_owned().expect("a free permit");
                    let inner = Arc::clone(&inner);
                    spawn_with(&tasks, &abort, permit, async move { inner.run_adopted(rec, deferred).await });
                }
            }
        }
        // New sagas are created unclaimed from now on, and those in progress give their claims
        // back between steps.
        if let Some(a) = inner.handle.adoption.get() {
            a.stopped.store(true, std::sync::atomic::Ordering::Release);
        }
        inner.stopping.cancel();
        tasks.close();
        // Calls in progress get a moment to finish and commit; a step with a long timeout must
        // not hold the process hostage. Whatever is still running is simply dropped: that is a
        // crash from the saga's point of view, and crashes are safe (the step runs again).
        if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait()).await.is_err() {
            tracing::warn!(
                running = tasks.len(),
                "shutting down with plugin calls still running; they are dropped and run again elsewhere or after restart"
            );
            // Dropped before the claims go back below: a call still sending (a compensation
            // records no start to hold others off) must not run beside another replica's
            // run of it with the same key.
            abort.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await;
        }
        // Every claim this process still holds is given back: the sagas handed over and never
        // started, and those whose calls outlasted the grace (a late result of theirs commits
        // only if nobody claimed the saga meanwhile: a claim bumps the epoch). Without it they
        // waited a whole lease (--lease-ms) for another replica, a replica removed for good or
        // replaced under another name (a rolling deploy's new pod) included.
        drop(adopted);
        give_back_claims(inner.store.as_ref(), &inner.options.owner, "sagas not finished here").await;
    }
}

impl Inner {
    /// Until the next timer is due, at most the poll interval.
    async fn sleep_for(&self) -> Duration {
        let max = self.options.poll_interval;
        match self.store.next_due().await {
            Ok(Some(at)) => {
                let ms = (at - self.clock.now_ms()).clamp(0, max.as_millis() as i64);
                Duration::from_millis(ms as u64)
            }
            _ => max,
        }
    }

    /// Loads a saga claimed from the store and runs it.
    async fn run_saga(&self, id: String, epoch: i64) {
        let claimed_at = self.clock.now_ms();
        match self.store.saga(&id).await {
            Ok(Some(rec)) if rec.epoch == epoch => self.run_here(rec, None, claimed_at).await,
            Ok(_) => {} // gone or taken over since the claim
            Err(e) => {
                tracing::error!(saga_id = %id, error = %e, "loading a claimed saga failed");
                self.release_later(&id, epoch).await;
            }
        }
    }

    /// Runs a saga handed over at its creation, claimed by this driver since then.
    async fn run_adopted(&self, rec: SagaRecord, deferred: Option<Deferred>) {
        let claimed_at = rec.created_at;
        self.run_here(rec, deferred, claimed_at).await
    }

    /// [`Inner::run_claimed`], then tells the saga's watchers that this process no longer runs
    /// it: from then on they must read the store to see its changes.
    async fn run_here(&self, rec: SagaRecord, deferred: Option<Deferred>, claimed_at: i64) {
        let id = rec.id.clone();
        self.run_claimed(rec, deferred, claimed_at).await;
        self.handle.left(&id);
    }

    /// Runs one saga claimed at `rec.epoch`, as last committed (`rec`), for as long as work is
    /// due now. Transitions are staged and committed in chains (see the module docs).
    ///
    /// `creating`: the saga's creation is not committed yet ([`Deferred`]): its first chain
    /// commits it, and a step that may call another service waits for it. Returning with it
    /// unanswered (dropped) leaves the creation to the request (`Sagas::create`).
    ///
    /// `claimed_at` (clock ms): when the claim (its lease) began. A saga handed over at its
    /// creation may have waited in the driver's queue since, past its lease even, and been
    /// claimed from the store by another driver meanwhile: its lease is renewed before
    /// anything runs, and a lost claim ends the run before a step does.
    async fn run_claimed(&self, mut rec: SagaRecord, mut creating: Option<Deferred>, claimed_at: i64) {
        if creating.as_ref().is_some_and(|pending| !pending.start()) {
            // Its request withdrew the creation (no place came free in time) and commits it
            // alone, unclaimed: a driver claims the saga from the store then.
            return;
        }
        let (id, epoch) = (rec.id.clone(), rec.epoch);
        let mut renewed = std::time::Instant::now();
        let renew_every = Duration::from_millis((self.options.lease_ms / 3).max(50) as u64);
        let held = Duration::from_millis(self.clock.now_ms().saturating_sub(claimed_at).max(0) as u64);
        let mut renew_first = held >= renew_every;
        let mut staged = Staged::default();
        let mut chain_began = std::time::Instant::now();
        // Cleared when the store refused a chain's data: then every transition commits alone,
        // so that the one it refuses is known and counted as a failed attempt.
        let mut chaining = self.options.chain_max > 1;
        let chain_max = self.options.chain_max.max(1);
        loop {
            if self.stopping.is_cancelled() {
                // The host is stopping: what the chain did is committed, and the saga is
                // given back now (in that commit), not held until its lease runs out: another
                // replica goes on with it at once. A creation still to commit is left to its
                // request, which commits it alone.
                if !staged.is_empty() {
                    self.flush(&mut rec, epoch, &mut staged, false, &mut creating).await;
                } else if creating.is_none() {
                    self.release(&id, epoch).await;
                }
                return;
            }
            if creating.is_none() && (renew_first || renewed.elapsed() >= renew_every) {
                match self.store.renew_lease(&id, epoch, self.options.lease_ms).await {
                    Ok(true) => renewed = std::time::Instant::now(),
                    Ok(false) => return, // taken over
                    Err(e) if renew_first => {
                        // The claim may have lapsed and been taken: run nothing on it.
                        tracing::warn!(saga_id = %id, error = %e, "renewing a stale claim failed; giving the saga back");
                        self.release_later(&id, epoch).await;
                        return;
                    }
                    Err(e) => tracing::warn!(saga_id = %id, error = %e, "renewing a lease failed"),
                }
                renew_first = false;
            }
            let now = self.clock.now_ms();
            let began = std::time::Instant::now();
            let action = engine::next_action(&rec.definition, &rec.state, now);
            // A compensation's binding, resolved once for the decision below and the call: a
            // refresh between two lookups could swap a version that stays within the host for
            // one that reaches out, and the refund would go out before the decision to
            // compensate is durable. Resolved on a current catalog, or on the cache with the
            // catalog version its commit must find unchanged (`catalog_check`).
            let mut catalog_check = None;
            let compensating = match &action {
                Action::Compensate { step, .. } => {
                    let (binding, check) = self.compensation_binding(&rec, *step, staged.catalog_refused()).await;
                    catalog_check = check;
                    Some(binding)
                }
                _ => None,
            };
            // A plugin reads its own state: a call must not run while staged writes of its
            // plugin are uncommitted, and with nothing due the chain ends here too. A
            // compensation that may reach another service runs only once what led to it is
            // durable: its effect out there (a refund) must not precede a decision to
            // compensate that a crash, or a signal taking the saga over meanwhile, could undo.
            // (An execute that may reach out commits its start first, below.)
            let flush_first = !staged.is_empty()
                && match &action {
                    Action::Idle => true,
                    Action::Execute { step, .. } => staged.wrote(&rec.definition.steps[*step].execute.plugin),
                    Action::Compensate { .. } => {
                        let binding = compensating.as_ref().expect("resolved for a compensation");
                        staged.wrote(&binding.plugin) || self.reaches_out(&binding.digest)
                    }
                    Action::Finish | Action::DeadlineExceeded { .. } => false,
                };
            if flush_first {
                let keep = !matches!(action, Action::Idle);
                match self.flush(&mut rec, epoch, &mut staged, keep, &mut creating).await {
                    Flushed::Done if keep => {
                        chain_began = std::time::Instant::now();
                        continue;
                    }
                    Flushed::Done | Flushed::Stop => return,
                    Flushed::Reloaded => continue,
                    Flushed::Refused => {
                        chaining = false;
                        if !self.reload(&mut rec, epoch).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            // A step that may reach another service runs only once the saga exists durably:
            // its effect out there must belong to a saga that a retry of the request finds.
            // (An execute commits the creation with its start, below.)
            if creating.is_some()
                && !matches!(action, Action::Execute { .. })
                && self.may_reach_out(&rec, &action, compensating.as_ref())
            {
                if let Some(pending) = creating.take_if(|_| staged.is_empty()) {
                    let outcome = self.sagas.create_deferred(&pending).await;
                    if !self.created_alone(&id, epoch, pending, outcome).await {
                        return;
                    }
                } else {
                    match self.flush(&mut rec, epoch, &mut staged, true, &mut creating).await {
                        Flushed::Done => {
                            chain_began = std::time::Instant::now();
                            continue;
                        }
                        Flushed::Reloaded => continue,
                        Flushed::Stop | Flushed::Refused => return,
                    }
                }
            }
            if staged.is_empty() {
                chain_began = began;
            }
            // An execute that may reach another service is recorded as started, durably, before
            // it calls (with the saga's creation, if that is still pending): if its result never
            // commits (a cancel takes the saga over mid-call, the host dies), the step still
            // counts as possibly applied, and it is compensated once the call can no longer be
            // sending anything (`StepState::in_flight_until`, which also bounds the call).
            let mut in_flight_until = None;
            if let Action::Execute { step, attempt } = action {
                // Loaded first (a version bound through another replica a moment ago), so that
                // what it imports is known. One this host cannot load is not called (its
                // attempt fails, below), so it has no start to record.
                let loaded = self.catalog.ensure_loaded(&rec.definition.steps[step].execute.digest).await.is_ok();
                if loaded && self.may_reach_out(&rec, &action, None) {
                    if let Err(e) = self.sagas.stage(&mut rec, &mut staged, Event::Started { step, attempt }, None) {
                        tracing::error!(saga_id = %id, error = %e, "the engine refused the driver's own event; the steps will run again");
                        self.release_later(&id, epoch).await;
                        return;
                    }
                    match self.flush(&mut rec, epoch, &mut staged, true, &mut creating).await {
                        Flushed::Done => chain_began = std::time::Instant::now(),
                        Flushed::Refused if creating.is_none() => {
                            chaining = false;
                            if !self.reload(&mut rec, epoch).await {
                                return;
                            }
                            continue;
                        }
                        Flushed::Reloaded => continue,
                        Flushed::Refused | Flushed::Stop => return,
                    }
                    in_flight_until = rec.state.steps[step].in_flight_until;
                }
            }
            let action_result = match action {
                Action::Idle => {
                    self.release(&id, epoch).await;
                    self.parked(&rec);
                    return;
                }
                Action::Finish => Ok(Called::host(Event::Finish)),
                Action::DeadlineExceeded { step } => Ok(Called::host(Event::DeadlineExceeded { step })),
                Action::Execute { step, attempt } => {
                    let call = traced(
                        attempt_span(&rec, step, attempt, "execute"),
                        self.execute(&rec, step, attempt, now, in_flight_until),
                    );
                    let Some(out) = self.call(&id, epoch, renewed, &mut creating, chain_began, call).await else {
                        return;
                    };
                    crate::failpoint!("driver-after-call");
                    out
                }
                Action::Compensate { step, attempt } => {
                    let binding = compensating.clone().expect("resolved for a compensation");
                    let call = traced(
                        attempt_span(&rec, step, attempt, "compensate"),
                        self.compensate(&rec, step, attempt, binding, catalog_check),
                    );
                    let Some(out) = self.call(&id, epoch, renewed, &mut creating, chain_began, call).await else {
                        return;
                    };
                    crate::failpoint!("driver-after-compensate-call");
                    out
                }
            };
            let called = match action_result {
                Ok(called) => called,
                Err(unavailable) => {
                    // The host, not the plugin, failed (a state read lost its database
                    // connection): nothing to commit for this call, and the attempt does not
                    // count. What the chain did before it is committed (or rerun) first.
                    tracing::warn!(saga_id = %id, error = %unavailable.why, "the host could not serve a plugin call; retrying the step shortly");
                    // (Refused: nothing was written; those steps run again after the pause.)
                    if !staged.is_empty()
                        && matches!(self.flush(&mut rec, epoch, &mut staged, true, &mut creating).await, Flushed::Stop)
                    {
                        return;
                    }
                    if creating.is_some() {
                        // Never created: the request creates it, and a driver claims it.
                        return;
                    }
                    match unavailable.not_before {
                        Some(at) => {
                            if let Err(e) = self.store.release_until(&id, epoch, at).await {
                                tracing::warn!(saga_id = %id, error = %e, "giving a saga back for later failed; its claim will expire");
                            }
                        }
                        None => self.release_later(&id, epoch).await,
                    }
                    return;
                }
            };
            let Called { event, touched, call_time, reached_out } = called;
            // Kept for the refused-data path: a chain of one whose data the store refuses is
            // recorded as a failed attempt of this call, under the checks of its reads (the
            // refused data may have come of a stale value) and of its binding.
            let first = staged.is_empty().then(|| {
                let checks = touched.as_ref().map(|t| Touched {
                    plugin: t.plugin.clone(),
                    writes: Vec::new(),
                    checks: t.checks.clone(),
                    catalog: t.catalog,
                });
                (event.clone(), checks)
            });
            let keep = match self.sagas.stage(&mut rec, &mut staged, event, touched) {
                Ok(keep) => keep,
                Err(e) => {
                    // Cannot happen for an event built from the action just computed. Discard
                    // the chain (its steps run again) and let a fresh claim reload the saga.
                    tracing::error!(saga_id = %id, error = %e, "the engine refused the driver's own event; the steps will run again");
                    self.release_later(&id, epoch).await;
                    return;
                }
            };
            self.metrics.transition(began.elapsed().saturating_sub(call_time));
            // A call that reached another service ends the chain: what it did out there is
            // recorded durably before anything else happens.
            // Bounded in state keys too: each is a row of the commit, and a commit's statement
            // takes a bounded number of arguments (see `runtime::MAX_STATE_KEYS`).
            let full = staged.len() >= chain_max
                || chain_began.elapsed() >= self.options.chain_max_age
                || staged.write_count() >= CHAIN_MAX_STATE_KEYS;
            if keep && chaining && !reached_out && !full {
                continue;
            }
            let chained = staged.len();
            match self.flush(&mut rec, epoch, &mut staged, keep, &mut creating).await {
                Flushed::Done => {
                    chain_began = std::time::Instant::now();
                    if !keep {
                        return;
                    }
                }
                Flushed::Stop => return,
                Flushed::Reloaded => continue,
                Flushed::Refused => {
                    // The store refuses this data for good (it would on every retry). Reload
                    // the saga as committed; a chain runs again one commit per transition, so
                    // the refusal is pinned on one call.
                    chaining = false;
                    if !self.reload(&mut rec, epoch).await {
                        return;
                    }
                    let Some(failed) = first.filter(|_| chained == 1) else { continue };
                    // That one call's result is recorded as a failed attempt, without its
                    // writes, so that the retry policy and then compensation decide rather than a
                    // hot loop.
                    let reason = "the host could not store this attempt's result (the host log says why)".to_owned();
                    tracing::warn!(saga_id = %id, "a plugin call's result cannot be stored; counting the attempt as failed");
                    let (failed, checks) = failed;
                    let Some(failed) = failed.into_failure(reason) else {
                        self.release_later(&id, epoch).await;
                        return;
                    };
                    let keep = match self.sagas.stage(&mut rec, &mut staged, failed, checks) {
                        Ok(keep) => keep,
                        Err(e) => {
                            tracing::error!(saga_id = %id, error = %e, "the engine refused a failed attempt");
                            self.release_later(&id, epoch).await;
                            return;
                        }
                    };
                    match self.flush(&mut rec, epoch, &mut staged, keep, &mut creating).await {
                        Flushed::Done if keep => {}
                        Flushed::Reloaded => {}
                        Flushed::Done | Flushed::Stop => return,
                        Flushed::Refused => {
                            self.release_later(&id, epoch).await;
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Commits the staged chain (`keep`: keeping the claim, else releasing it). `Refused`: the
    /// store refuses the chain's data for good; nothing was written and `rec` must be
    /// reloaded. `Reloaded`: a state value the chain read had changed (or the catalog its
    /// compensations took their bindings from); nothing was written and `rec` is reloaded,
    /// still this driver's. `Stop`: the saga is no longer
    /// this driver's to run (fenced, or a store error after which the claim is given back
    /// shortly).
    ///
    /// With `creating` (the saga's creation not committed yet) the creation commits in the
    /// same transaction, and the request waiting for it is answered; if its idempotency key
    /// was not new, or a value the chain read had changed, nothing was written
    /// and the saga is dropped (`Stop`): the request learns what the key holds, or creates
    /// the saga alone for a driver to claim.
    async fn flush(
        &self,
        rec: &mut SagaRecord,
        epoch: i64,
        staged: &mut Staged,
        keep: bool,
        creating: &mut Option<Deferred>,
    ) -> Flushed {
        let (n, began) = (staged.len(), std::time::Instant::now());
        match self.sagas.commit_staged(rec, epoch, staged, keep, creating.as_ref()).await {
            Ok(()) => {
                if let Some(pending) = creating.take() {
                    pending.answer(crate::store::CreateOutcome::Created);
                }
                crate::failpoint!("driver-after-commit");
                self.metrics.commit(began.elapsed(), n);
                if !keep {
                    self.parked(rec);
                }
                let phase = rec.state.phase;
                if phase.is_terminal() || phase == engine::Phase::CompensationFailed {
                    self.metrics.settled(&rec.saga_type, rec.state.status.as_str());
                }
                Flushed::Done
            }
            Err(saga::Error::Fenced) if creating.is_some() => {
                tracing::debug!(saga_id = %rec.id, "a request with the same idempotency key created its saga first");
                Flushed::Stop
            }
            Err(saga::Error::Fenced) => {
                self.metrics.stale_commit();
                tracing::warn!(saga_id = %rec.id, epoch, transitions = n, "lost the saga to a newer claim; discarding this result");
                Flushed::Stop
            }
            // A creation's request creates the saga itself once the deferral is dropped (with
            // `creating`, on return), and a driver claims it: its steps then run again.
            Err(saga::Error::StaleRead) if creating.is_some() => {
                tracing::info!(saga_id = %rec.id, transitions = n, "a state value the steps read, or the catalog a compensation took its binding from, changed, or a request with the same idempotency key created its saga first; the request creates the saga alone if it is new");
                Flushed::Stop
            }
            // Or the fence refused it (the check cannot tell): the reload says which.
            Err(saga::Error::StaleRead) => {
                // Refused again and again (a key every saga writes), the steps wait a little
                // before they run again (well within the lease: at most 300 ms).
                let pause = staged.stale_read_pause(rand::random::<f64>());
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
                if self.reload(rec, epoch).await {
                    tracing::info!(saga_id = %rec.id, transitions = n, pause_ms = pause.as_millis() as u64, "a state value the steps read, or the catalog a compensation took its binding from, changed; running them again");
                    Flushed::Reloaded
                } else {
                    self.metrics.stale_commit();
                    tracing::warn!(saga_id = %rec.id, epoch, transitions = n, "lost the saga to a newer claim; discarding this result");
                    Flushed::Stop
                }
            }
            Err(saga::Error::Store(e)) if e.is_refused_data() => {
                tracing::warn!(saga_id = %rec.id, error = %e, transitions = n, "the store refuses a commit's data");
                Flushed::Refused
            }
            Err(e) => {
                // A store error: let a fresh claim reload the saga after a pause; the steps
                // run again.
                tracing::error!(saga_id = %rec.id, error = %e, transitions = n, "committing failed; the steps will run again");
                self.release_later(&rec.id, epoch).await;
                Flushed::Stop
            }
        }
    }

    /// A saga this driver gave back with a timer (a retry's backoff, a wait's deadline): the
    /// driver's loop looks for due work only when woken or at the earliest timer it knew of,
    /// so it is told to look again.
    fn parked(&self, rec: &SagaRecord) {
        if rec.state.next_run_at.is_some() {
            self.handle.wake();
        }
    }

    /// Reads the saga back as committed after a refused commit; false (and the claim given up
    /// when possible) unless it is still this driver's at `epoch`.
    async fn reload(&self, rec: &mut SagaRecord, epoch: i64) -> bool {
        match self.store.saga(&rec.id).await {
            Ok(Some(fresh)) if fresh.epoch == epoch => {
                *rec = fresh;
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::error!(saga_id = %rec.id, error = %e, "reloading a saga failed");
                self.release_later(&rec.id, epoch).await;
                false
            }
        }
    }

    /// Whether the call `action` makes may reach another service: its plugin version imports
    /// outbound HTTP (or is not loaded here yet, so nobody knows).
    /// `compensating`: a compensation's binding as resolved for it.
    fn may_reach_out(&self, rec: &SagaRecord, action: &Action, compensating: Option<&engine::PluginRef>) -> bool {
        match action {
            Action::Execute { step, .. } => self.reaches_out(&rec.definition.steps[*step].execute.digest),
            // Resolved by the caller for every compensation; none given, nobody knows.
            Action::Compensate { .. } => compensating.is_none_or(|binding| self.reaches_out(&binding.digest)),
            Action::Idle | Action::Finish | Action::DeadlineExceeded { .. } => false,
        }
    }

    /// Whether a call of plugin version `digest` may reach another service: it imports
    /// outbound HTTP, or is not loaded here yet (so nobody knows).
    fn reaches_out(&self, digest: &str) -> bool {
        self.runtime.capabilities(digest).is_none_or(|c| c.outbound_http)
    }

    /// The compensate binding of `step` for a compensation about to run, and the catalog
    /// version its commit must find unchanged, if any ([`crate::store::Commit::catalog_check`]).
    ///
    /// A replica's cache may be a refresh behind a bind another replica acknowledged (even
    /// behind the version the saga pinned, created there after the bind) and would run the
    /// compensation the bind replaced. A binding whose effects stay within the host until its
    /// commit is taken from the cache as it is, with the catalog version the cache reflects
    /// (read first: the bindings are at least that new); its commit is refused if the catalog
    /// moved since, and nothing it did is kept. One that may reach another service (a refund
    /// out there cannot be taken back) is resolved after catching the catalog up, no check
    /// needed; so is every compensation of a run after a refused check (`careful`), which
    /// bounds the refusals at one however often the catalog changes. Should the catch-up
    /// fail (the database unreachable a moment), a host-only binding is checked at its commit
    /// all the same. Catching up costs a read of the shared catalog version, for which
    /// hundreds of compensations a second queued on a busy pool (session 39); where this
    /// host owns its database there is nothing to catch up on or check.
    async fn compensation_binding(
        &self,
        rec: &SagaRecord,
        step: usize,
        careful: bool,
    ) -> (engine::PluginRef, Option<i64>) {
        if !careful {
            if let Some(version) = self.catalog.version_to_check() {
                let binding = self.compensate_binding(rec, step);
                if !self.reaches_out(&binding.digest) {
                    return (binding, Some(version));
                }
            }
        }
        let caught_up = self.catalog.catch_up().await;
        // Read before the binding, as above.
        let version = self.catalog.version_to_check().filter(|_| !caught_up);
        let binding = self.compensate_binding(rec, step);
        let check = version.filter(|_| !self.reaches_out(&binding.digest));
        (binding, check)
    }

    /// The compensate binding of `step` in force now: the current definition's, by step name,
    /// else the one pinned when the saga started.
    fn compensate_binding(&self, rec: &SagaRecord, step: usize) -> engine::PluginRef {
        let sdef = &rec.definition.steps[step];
        let current = self.catalog.definition(&rec.saga_type);
        sdef.compensate_binding(current.as_ref().and_then(|c| c.steps.iter().find(|s| s.name == sdef.name)))
    }

    /// Runs a plugin call of a saga claimed at `epoch` (see [`Inner::heartbeat`]).
    ///
    /// With the saga's creation still to commit (`creating`), the call runs without a lease
    /// (there is none yet). A call that outlasts `chain_max_age` from `chain_began` does not
    /// hold the creation back: it commits alone meanwhile, and the waiting request is
    /// answered, so that it can answer by its `Prefer: wait` deadline (SPEC §5.1: 201 once N
    /// seconds pass) whatever the step takes. The rest of the call then renews the lease.
    /// `None`: the saga is not this driver's to run; the request learns what the key holds,
    /// or creates the saga itself.
    async fn call<F: std::future::Future>(
        &self,
        id: &str,
        epoch: i64,
        renewed: std::time::Instant,
        creating: &mut Option<Deferred>,
        chain_began: std::time::Instant,
        call: F,
    ) -> Option<F::Output> {
        let Some(pending) = creating.take() else {
            return Some(self.heartbeat(id, epoch, renewed, call).await);
        };
        tokio::pin!(call);
        let due = tokio::time::Instant::from_std(chain_began + self.options.chain_max_age);
        tokio::select! {
            biased;
            out = &mut call => {
                *creating = Some(pending);
                return Some(out);
            }
            () = tokio::time::sleep_until(due) => {}
        }
        // The call goes on while the creation commits; a commit once begun is never dropped.
        let mut finished = None;
        let outcome = {
            let created = self.sagas.create_deferred(&pending);
            tokio::pin!(created);
            loop {
                tokio::select! {
                    out = &mut call, if finished.is_none() => finished = Some(out),
                    outcome = &mut created => break outcome,
                }
            }
        };
        if !self.created_alone(id, epoch, pending, outcome).await {
            return None; // the call (host-only) is dropped with the saga
        }
        Some(match finished {
            Some(out) => out,
            // Claimed by the creation's commit just now.
            None => self.heartbeat(id, epoch, std::time::Instant::now(), call).await,
        })
    }

    /// Runs a plugin call while renewing the saga's lease every third of its length, so a long
    /// call keeps its claim. If the claim is lost anyway (the process stalled), the call still
    /// finishes but its commit will be fenced and discarded.
    ///
    /// The renewals run beside the call, not in its turn: a renewal that waits for the
    /// database (a busy pool, a locked row) must not stop the call meanwhile, whose timeout is
    /// wall-clock time (the wait was charged to the plugin, and counted as its failed attempt).
    ///
    /// `renewed`: when the lease was last taken or renewed. The first renewal is a third of a
    /// lease after it, not after the call began: what ran in between (a binding resolved, a
    /// catalog caught up) is already part of the lease's age.
    async fn heartbeat<F: std::future::Future>(
        &self,
        id: &str,
        epoch: i64,
        renewed: std::time::Instant,
        call: F,
    ) -> F::Output {
        let lease_ms = self.options.lease_ms;
        let period = Duration::from_millis((lease_ms / 3).max(50) as u64);
        let renewing = async {
            let first = tokio::time::Instant::from_std(renewed + period).max(tokio::time::Instant::now());
            let mut tick = tokio::time::interval_at(first, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match self.store.renew_lease(id, epoch, lease_ms).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(saga_id = %id, "lost the claim during a plugin call; its result will be discarded")
                    }
                    Err(e) => tracing::warn!(saga_id = %id, error = %e, "renewing a lease failed"),
                }
            }
        };
        tokio::pin!(call, renewing);
        tokio::select! {
            out = &mut call => out,
            () = &mut renewing => unreachable!("the renewals never end"),
        }
    }

    /// Answers the request waiting for `pending` with how its creation, committed alone (for
    /// this driver, claimed at `epoch`), went; true when the saga now exists. Otherwise the
    /// driver drops the saga: another request's saga holds the key (the request learns what
    /// the key holds), or the commit failed (the request creates the saga itself).
    ///
    /// A commit that failed may have landed all the same (on PostgreSQL the connection can drop
    /// after COMMIT): the saga then exists, claimed by this driver, which has dropped it, and
    /// nobody would run it until its lease ran out. So the claim is given back, before the
    /// request hears: had nothing landed, the release finds no saga, and the creation the
    /// request then commits itself (unclaimed) cannot be claimed by somebody at `epoch` yet and
    /// released under them. One try, bounded: with the database gone the request must not wait
    /// on it (the claim then expires with its lease, as before).
    async fn created_alone(
        &self,
        id: &str,
        epoch: i64,
        pending: Deferred,
        outcome: Result<crate::store::CreateOutcome, saga::Error>,
    ) -> bool {
        match outcome {
            Ok(outcome) => {
                let created = outcome == crate::store::CreateOutcome::Created;
                pending.answer(outcome);
                created
            }
            Err(e) => {
                tracing::debug!(saga_id = %id, error = %e, "committing a creation alone failed; the request creates the saga");
                saga::give_back_landed(self.store.as_ref(), id, epoch).await;
                drop(pending);
                false
            }
        }
    }

    /// After an unexpected failure, wait a little before giving the saga back, so that a
    /// persistent fault (disk full, database down) does not become a hot loop.
    async fn release_later(&self, id: &str, epoch: i64) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.release(id, epoch).await;
    }

    /// Gives a claim back, trying a few times: a release that fails (its connection was just
    /// killed; the pool opens a new one) would otherwise leave the saga untouched until its
    /// lease expires, a minute by default.
    async fn release(&self, id: &str, epoch: i64) {
        let mut pause = Duration::from_millis(50);
        for attempt in 1..=4 {
            match self.store.release(id, epoch).await {
                Ok(()) => return,
                Err(e) if attempt == 4 => {
                    tracing::warn!(saga_id = %id, error = %e, "releasing a saga failed; its claim will expire");
                }
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause *= 4;
                }
            }
        }
    }

    /// Counts a plugin call and its latency by outcome, and its outbound requests.
    fn record<T>(
        &self,
        rec: &SagaRecord,
        step: &str,
        plugin: &str,
        call: &'static str,
        out: &crate::runtime::CallOutcome<T>,
    ) {
        let labels = crate::metrics::CallLabels {
            saga_type: rec.saga_type.clone(),
            step: step.to_owned(),
            call,
            outcome: out.label,
        };
        self.metrics.call(labels, out.elapsed, &out.phases);
        self.metrics.http_requests(plugin, &out.requests);
    }

    /// Runs execute attempt `attempt` of `step`. `in_flight_until`: the attempt was recorded as
    /// started ([`Event::Started`]) and must be over by then, less half of
    /// [`engine::CALL_GRACE_MS`].
    async fn execute(
        &self,
        rec: &SagaRecord,
        step: usize,
        attempt: u32,
        started_at: i64,
        in_flight_until: Option<i64>,
    ) -> Result<Called, Unserved> {
        let sdef = &rec.definition.steps[step];
        let woken = &rec.state.steps[step];
        // A payload is set only once the signal the step waits for arrived: its name is the
        // one the step waits for.
        let signal = woken.signal_payload.clone().map(|payload| (woken.wait_signal.clone(), payload));
        let info = call_info(rec, &sdef.name, attempt, "execute", signal);
        let input = step_input(rec, step);
        // Loaded before the call's time is reckoned: a version unloaded since the start was
        // recorded is compiled again here (seconds for a large component), and a timeout fixed
        // before that would let the call run past `in_flight_until`, when another replica may
        // already be compensating the step.
        let loaded = self.catalog.ensure_loaded(&sdef.execute.digest).await;
        let mut timeout = Duration::from_millis(sdef.timeout_ms);
        if let Some(until) = in_flight_until {
            // The call ends at least half the grace before `until`: the commit that recorded
            // its start may use the other half; one that took longer shortens the call.
            let latest_end = until.saturating_sub(engine::CALL_GRACE_MS / 2);
            let left = latest_end.saturating_sub(self.clock.now_ms());
            if left <= 0 {
                // The commit took the call's whole time: the host's slowness, not a failed
                // attempt of the plugin's. Nothing is called; the step runs again later.
                return Err(Unserved::from(format!(
                    "recording the attempt's start took longer than the step's timeout of {} ms",
                    sdef.timeout_ms
                )));
            }
            timeout = timeout.min(Duration::from_millis(u64::try_from(left).unwrap_or(0)));
        }
        if loaded.is_ok()
            && in_flight_until.is_none()
            && self.runtime.capabilities(&sdef.execute.digest).is_none_or(|c| c.outbound_http)
        {
            // Loaded only now (the first look failed on a database blip): no start was
            // recorded for a call that may reach out, so it must not be made; next time.
            return Err(Unserved::from("the step's plugin was loaded after its start could be recorded".to_owned()));
        }
        if let Err(why) = loaded {
            // A start recorded before (by a replica that could load the version, then died or
            // froze mid-call) may have had effects, and this failure, made up by the host, is
            // the event that clears its mark: it must say so, or the step would not be
            // compensated (a charge never refunded). Only a start's own call knows better.
            let pending_start = woken.in_flight_until.is_some();
            return self.not_loaded(rec, step, why, |reason| Event::Executed {
                step,
                attempt,
                started_at,
                digest: sdef.execute.digest.clone(),
                outcome: ExecuteOutcome::Trapped(reason),
                jitter: rand::random::<f64>(),
                reached_out: pending_start,
            });
        }
        let call = self.runtime.execute(&sdef.execute.digest, &sdef.execute.plugin, &info, &input, timeout);
        let out = traced(plugin_span(&sdef.execute, "execute"), call).await;
        tracing::debug!(saga_id = %rec.id, step = %sdef.name, attempt, elapsed_us = out.elapsed.as_micros() as u64, "execute returned");
        self.record(rec, &sdef.name, &sdef.execute.plugin, "execute", &out);
        let outcome = out.result.map_err(|e| e.0)?;
        if let ExecuteOutcome::Trapped(e) = &outcome {
            tracing::warn!(saga_id = %rec.id, step = %sdef.name, attempt, error = %e, "plugin trapped");
        }
        let event = Event::Executed {
            step,
            attempt,
            started_at,
            digest: sdef.execute.digest.clone(),
            outcome,
            jitter: rand::random::<f64>(),
            reached_out: out.reached_out,
        };
        let touched = Some(Touched {
            plugin: sdef.execute.plugin.clone(),
            writes: out.writes,
            checks: out.checks,
            catalog: None,
        });
        Ok(Called { event, touched, call_time: out.elapsed, reached_out: out.reached_out })
    }

    /// A call of a plugin version this host cannot load; nothing is called.
    /// - Stored by no replica: a failed attempt, so that the retry policy and then
    ///   compensation (or an operator, rebinding) decide.
    /// - Stored, but this build refuses it (a newer release's plugin during a rolling upgrade,
    ///   or a rollback's): not an attempt (a replica of the newer release runs it), and the
    ///   saga is given back for [`NOT_LOADABLE_PAUSE`], so that it is neither failed by an old
    ///   replica nor claimed by it again at once (such sagas, always the most overdue, were
    ///   claimed before any other, every second). Unless no replica has run it for
    ///   [`NOT_LOADABLE_GIVE_UP`] (this replica refused the same call that long: the step has
    ///   not moved): then no replica can, and its attempt fails, saying why, so that the retry
    ///   policy, compensation and at last COMPENSATION_FAILED decide and show it, and a step's
    ///   deadline is not waited out forever.
    /// - The catalog could not be read: the host's failure, retried shortly.
    fn not_loaded(
        &self,
        rec: &SagaRecord,
        step: usize,
        why: crate::catalog::NotLoaded,
        failed: impl FnOnce(String) -> Event,
    ) -> Result<Called, Unserved> {
        let index = step;
        let step = &rec.definition.steps[step].name;
        match why {
            crate::catalog::NotLoaded::Unavailable(e) => Err(Unserved::from(e)),
            refused @ crate::catalog::NotLoaded::Refused { .. } => {
                self.metrics.not_loadable();
                let now = self.clock.now_ms();
                let state = &rec.state.steps[index];
                let call = (rec.id.clone(), index, state.attempts, state.compensate_attempts);
                if let Some(refused_for) = self.refused_too_long(call, now) {
                    let minutes = refused_for / 60_000;
                    tracing::error!(saga_id = %rec.id, %step, error = %refused, minutes, "a step's plugin has run on no replica for minutes; its attempt fails");
                    let event = failed(format!("{refused}; no replica has run it for {minutes} minutes"));
                    return Ok(Called { event, touched: None, call_time: Duration::ZERO, reached_out: false });
                }
                tracing::error!(saga_id = %rec.id, %step, error = %refused, pause_s = NOT_LOADABLE_PAUSE.as_secs(), "a step's plugin cannot run on this host; leaving the saga to a replica that can");
                let pause = i64::try_from(NOT_LOADABLE_PAUSE.as_millis()).unwrap_or(i64::MAX);
                Err(Unserved { why: refused.to_string(), not_before: Some(now.saturating_add(pause)) })
            }
            unknown @ crate::catalog::NotLoaded::Unknown(_) => {
                tracing::warn!(saga_id = %rec.id, %step, error = %unknown, "a step's plugin version is stored nowhere; its attempt fails");
                let event = failed(unknown.to_string());
                Ok(Called { event, touched: None, call_time: Duration::ZERO, reached_out: false })
            }
        }
    }

    /// How long this replica has found `call`'s plugin version refused, once that is
    /// [`NOT_LOADABLE_GIVE_UP`] or more; the call's timing then starts afresh. The first
    /// refusal of a call is timed from `now` (unless [`REFUSED_SAGAS_KEPT`] calls are timed
    /// already, after dropping those refused long ago: they were run elsewhere, or failed).
    fn refused_too_long(&self, call: (String, usize, u32, u32), now: i64) -> Option<i64> {
        let give_up = i64::try_from(NOT_LOADABLE_GIVE_UP.as_millis()).unwrap_or(i64::MAX);
        let mut map = self.refused_since.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= REFUSED_SAGAS_KEPT {
            map.retain(|_, first| now.saturating_sub(*first) < give_up.saturating_mul(2));
        }
        let first = match map.get(&call) {
            Some(first) => *first,
            None => {
                if map.len() < REFUSED_SAGAS_KEPT {
                    map.insert(call.clone(), now);
                }
                now
            }
        };
        let refused_for = now.saturating_sub(first);
        if refused_for < give_up {
            return None;
        }
        map.remove(&call);
        Some(refused_for)
    }

    /// Runs compensate attempt `attempt` of `step` with `binding`, the compensate binding in
    /// force ([`Inner::compensation_binding`], resolved once by the caller), and `catalog`, the
    /// catalog version its commit must find unchanged, if any: a failed attempt the host makes
    /// up because the version cannot be loaded here is checked too (it came of the same
    /// binding).
    async fn compensate(
        &self,
        rec: &SagaRecord,
        step: usize,
        attempt: u32,
        binding: engine::PluginRef,
        catalog: Option<i64>,
    ) -> Result<Called, Unserved> {
        let sdef = &rec.definition.steps[step];
        let info = call_info(rec, &sdef.name, attempt, "compensate", None);
        let input = step_input(rec, step);
        let output = rec.state.steps[step].output.clone().unwrap_or_else(|| "null".to_owned());
        let timeout = Duration::from_millis(sdef.timeout_ms);
        if let Err(why) = self.catalog.ensure_loaded(&binding.digest).await {
            let called = self.not_loaded(rec, step, why, |reason| Event::Compensated {
                step,
                attempt,
                digest: binding.digest.clone(),
                outcome: CompensateOutcome::Failed(reason),
                jitter: rand::random::<f64>(),
            })?;
            let touched = Touched { plugin: binding.plugin.clone(), catalog, ..Touched::default() };
            return Ok(Called { touched: Some(touched), ..called });
        }
        let call = self.runtime.compensate(&binding.digest, &binding.plugin, &info, &input, &output, timeout);
        let out = traced(plugin_span(&binding, "compensate"), call).await;
        self.record(rec, &sdef.name, &binding.plugin, "compensate", &out);
        let outcome = out.result.map_err(|e| e.0)?;
        if let CompensateOutcome::Failed(e) = &outcome {
            tracing::warn!(saga_id = %rec.id, step = %sdef.name, attempt, error = %e, "compensation failed");
        }
        let event = Event::Compensated {
            step,
            attempt,
            digest: binding.digest.clone(),
            outcome,
            jitter: rand::random::<f64>(),
        };
        Ok(Called {
            event,
            touched: Some(Touched { plugin: binding.plugin, writes: out.writes, checks: out.checks, catalog }),
            call_time: out.elapsed,
            reached_out: out.reached_out,
        })
    }
}

/// Runs `work` in `span` when traces are on; as it is otherwise (no span is built then).
async fn traced<F: std::future::Future>(span: Option<tracing::Span>, work: F) -> F::Output {
    use tracing::Instrument as _;
    match span {
        Some(span) => work.instrument(span).await,
        None => work.await,
    }
}

/// The span of one step attempt (with traces on): a child of the saga's stored context, so
/// that every attempt, on whichever replica and after whichever restart, is in the saga's
/// trace. Log lines inside it carry the saga and trace ids.
fn attempt_span(rec: &SagaRecord, step: usize, attempt: u32, call: &'static str) -> Option<tracing::Span> {
    if !crate::telemetry::enabled() {
        return None;
    }
    let parent = crate::telemetry::saga_context(&rec.id, rec.trace_parent.as_deref());
    let trace_id = {
        use opentelemetry::trace::TraceContextExt as _;
        parent.span().span_context().trace_id().to_string()
    };
    let step_name = &rec.definition.steps[step].name;
    let span = tracing::info_span!(
        "saga.step",
        otel.name = %format!("{call} {step_name}"),
        saga_id = %rec.id,
        saga_type = %rec.saga_type,
        trace_id = %trace_id,
        step = %step_name,
        attempt,
        call,
    );
    crate::telemetry::set_parent(&span, parent);
    Some(span)
}

/// The span of one plugin call (with traces on), a child of the attempt's span.
fn plugin_span(binding: &engine::PluginRef, call: &'static str) -> Option<tracing::Span> {
    crate::telemetry::enabled().then(|| {
        tracing::info_span!(
            "plugin.call",
            otel.name = %format!("plugin {} {call}", binding.plugin),
            plugin = %binding.plugin,
            digest = %binding.digest,
            call,
        )
    })
}

/// Releases every claim `owner` holds ([`SagaStore::release_owner`]) as a process stops,
/// logging how many (`what` they were) or why it could not: then they expire with their lease.
pub(crate) async fn give_back_claims(store: &dyn SagaStore, owner: &str, what: &str) {
    match store.release_owner(owner).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(sagas = n, "gave back the claims of {what}"),
        Err(e) => tracing::warn!(error = %e, "could not give back this process's claims; they expire with their lease"),
    }
}

/// Runs `work` in `tasks`, holding `permit` (one of the driver's concurrency slots) until it ends.
fn spawn_with(
    tasks: &TaskTracker,
    abort: &CancellationToken,
    permit: tokio::sync::OwnedSemaphorePermit,
    work: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let abort = abort.clone();
    tasks.spawn(async move {
        // Dropped when `abort` fires: as if the process had died there.
        tokio::select! {
            () = abort.cancelled() => {}
            () = work => {}
        }
        drop(permit);
    });
}

/// How long a saga whose plugin this host cannot load is left for other replicas before any
/// replica claims it again.
const NOT_LOADABLE_PAUSE: Duration = Duration::from_secs(30);

/// How long a saga may wait, unmoved, for a replica that can load its plugin version before
/// its attempt fails ([`Inner::not_loaded`]): longer than a rolling upgrade takes.
const NOT_LOADABLE_GIVE_UP: Duration = Duration::from_secs(10 * 60);

/// Sagas whose refusal a replica times at once ([`Inner::not_loaded`]); past it, a refusal
/// is not timed here (another replica's may be) until old entries are dropped.
const REFUSED_SAGAS_KEPT: usize = 100_000;

/// A call the host could not serve (not the plugin's failure: no attempt is counted), and
/// when the saga may be claimed again (`None`: after a short pause).
#[derive(Debug)]
struct Unserved {
    why: String,
    not_before: Option<i64>,
}

impl From<String> for Unserved {
    fn from(why: String) -> Unserved {
        Unserved { why, not_before: None }
    }
}

/// What an action produced for the engine.
struct Called {
    event: Event,
    /// The state writes to commit with the event, and the reads its commit checks.
    touched: Option<Touched>,
    /// The plugin call's wall-clock time.
    call_time: Duration,
    /// The call made an outbound request: it ends the chain.
    reached_out: bool,
}

impl Called {
    /// An action of the host alone: no call, no writes.
    fn host(event: Event) -> Called {
        Called { event, touched: None, call_time: Duration::ZERO, reached_out: false }
    }
}

/// How a chain's commit went.
enum Flushed {
    Done,
    Refused,
    /// Nothing was written: a state value the chain's calls read had changed (another saga's
    /// commit, or another replica, wrote it), or the catalog had. `rec` is the saga as
    /// committed, still this driver's; its steps run again on the current values.
    Reloaded,
    Stop,
}

/// The call context of one attempt. The idempotency key, `{saga-id}:{step}:{execute|compensate}`,
/// is part of the plugin contract: the same on every retry and after every restart.
/// `signal` is the (name, payload) of the signal that woke the step.
fn call_info(
    rec: &SagaRecord,
    step: &str,
    attempt: u32,
    export: &str,
    signal: Option<(Option<String>, String)>,
) -> CallInfo {
    let (signal_name, signal) = match signal {
        Some((name, payload)) => (name, Some(payload)),
        None => (None, None),
    };
    CallInfo {
        saga_id: rec.id.clone(),
        saga_type: rec.saga_type.clone(),
        step: step.to_owned(),
        attempt,
        idempotency_key: format!("{}:{step}:{export}", rec.id),
        signal,
        signal_name,
    }
}

/// The `input` argument of a call to step `step`: `{"input": <saga input>, "steps":
/// {"<step>": <output>}, "config": <the step's config>}` with the outputs of the steps before
/// it. Compensation gets the same input its execute got, whatever later steps did.
pub fn step_input(rec: &SagaRecord, step: usize) -> String {
    let mut steps = serde_json::Map::new();
    for (def, state) in rec.definition.steps.iter().zip(&rec.state.steps).take(step) {
        if let Some(output) = &state.output {
            let value = serde_json::from_str(output).unwrap_or(serde_json::Value::Null);
            steps.insert(def.name.clone(), value);
        }
    }
    let input: serde_json::Value = serde_json::from_str(&rec.input).unwrap_or(serde_json::Value::Null);
    let config = rec.definition.steps.get(step).map(|d| d.config.clone()).unwrap_or_default();
    serde_json::json!({ "input": input, "steps": steps, "config": config }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SQLite store in `dir`, the saga service, and a driver that is never run: it admits
    /// sagas (with free places) but never gets to them.
    async fn idle_driver(dir: &std::path::Path) -> (Arc<dyn crate::store::Store>, Arc<Sagas>, Driver) {
        let store = crate::store::open(None, dir).await.unwrap();
        let clock: Arc<dyn Clock> = Arc::new(crate::clock::SystemClock);
        let runtime = Arc::new(
            Runtime::new(crate::runtime::Limits::default(), Arc::new(crate::catalog::tests::NoState)).unwrap(),
        );
        let catalog = Arc::new(Catalog::open(store.clone(), Arc::clone(&runtime), Arc::clone(&clock)).await.unwrap());
        let sagas = Arc::new(Sagas::new(store.clone(), Arc::clone(&clock), DriverHandle::default()));
        let metrics = crate::metrics::Metrics::new();
        let driver =
            Driver::new(store.clone(), Arc::clone(&sagas), runtime, catalog, clock, metrics, DriverOptions::default());
        (store, sagas, driver)
    }

    /// Runs `driver` until `done` says the saga is where the test wants it (at most 20 s).
    async fn drive_until(
        store: &Arc<dyn crate::store::Store>,
        driver: Driver,
        id: &str,
        done: impl Fn(&SagaRecord) -> bool,
    ) -> SagaRecord {
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(driver.run(shutdown.clone()));
        let reached = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let rec = store.saga(id).await.unwrap().expect("created");
                if done(&rec) {
                    return rec;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        shutdown.cancel();
        running.await.unwrap();
        reached.expect("the saga never got there")
    }

    /// A step bound to a version no replica stored: its attempts fail, each saying why, with no
    /// start recorded, and the saga compensates. It ran again every second, for ever, uncounted,
    /// a `StepStarted` committed each time, and such sagas, always the most overdue, were
    /// claimed before any other.
    #[tokio::test]
    async fn a_step_bound_to_a_version_stored_nowhere_fails_its_attempts_and_the_saga_compensates() {
        let dir = tempfile::tempdir().unwrap();
        let (store, sagas, driver) = idle_driver(dir.path()).await;
        // `def()`'s step runs plugin "p" at "sha256:p", which nobody stored.
        let mut def = crate::store::tests::def();
        def.steps[0].retry = engine::RetryPolicy { max_attempts: 2, initial_backoff_ms: 10, max_backoff_ms: 10 };
        let draft = sagas.draft(&def, &serde_json::json!({}));
        sagas.create(&draft, None, false).await.unwrap();
        let settled =
            drive_until(&store, driver, &draft.record.id, |r| r.state.phase == engine::Phase::Cancelled).await;
        let step = &settled.state.steps[0];
        assert_eq!(step.attempts, 2, "both attempts counted");
        let error = step.last_error.as_deref().unwrap_or_default();
        assert!(error.contains("plugin version sha256:p is not stored"), "{error}");
        let events: Vec<String> = store.outbox_pending(1000).await.unwrap().into_iter().map(|r| r.event_type).collect();
        assert!(!events.iter().any(|e| e == "StepStarted"), "a start was recorded for a call never made: {events:?}");
    }

    /// A replica that could load the step's version recorded its start and died mid-call; the
    /// version is stored nowhere this replica can find, so its attempt fails without a call.
    /// That failure clears the start's mark: it must keep the step compensable (the dead
    /// replica's request may have been applied), not settle the saga as if nothing happened.
    #[tokio::test]
    async fn a_failure_without_a_call_keeps_a_recorded_starts_step_compensable() {
        let dir = tempfile::tempdir().unwrap();
        let (store, sagas, driver) = idle_driver(dir.path()).await;
        let mut def = crate::store::tests::def();
        def.steps[0].retry = engine::RetryPolicy { max_attempts: 1, initial_backoff_ms: 10, max_backoff_ms: 10 };
        let mut draft = sagas.draft(&def, &serde_json::json!({}));
        // The dead replica's start: its call's time is long over.
        draft.record.state.steps[0].in_flight_until = Some(1);
        sagas.create(&draft, None, false).await.unwrap();
        let settled = drive_until(&store, driver, &draft.record.id, |r| r.state.phase != engine::Phase::Forward).await;
        let step = &settled.state.steps[0];
        assert_eq!(step.attempts, 1);
        assert!(step.waited, "the recorded start's possible effects were forgotten: {step:?}");
        assert_ne!(settled.state.phase, engine::Phase::Cancelled, "settled without compensating the step");
    }

    /// A stored version this build refuses to compile (a newer release's plugin, during a
    /// rolling upgrade): not an attempt here (a replica of that release runs it), no start
    /// recorded, and the saga is given back for a while rather than claimed again at once.
    #[tokio::test]
    async fn a_step_whose_plugin_this_build_refuses_is_left_to_other_replicas_for_a_while() {
        let dir = tempfile::tempdir().unwrap();
        let (store, sagas, driver) = idle_driver(dir.path()).await;
        assert!(store.put_plugin("sha256:p", "p", b"not a component", 0, None).await.unwrap());
        let draft = sagas.draft(&crate::store::tests::def(), &serde_json::json!({}));
        sagas.create(&draft, None, false).await.unwrap();
        let before = crate::clock::SystemClock.now_ms();
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(driver.run(shutdown.clone()));
        // Given back (nobody holds it), and nobody may claim it for about half a minute.
        let given_back = tokio::time::timeout(Duration::from_secs(20), async {
            while store.next_due().await.unwrap().is_none_or(|due| due < before + 29_000) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        shutdown.cancel();
        running.await.unwrap();
        given_back.expect("the saga was not given back for a while");
        let rec = store.saga(&draft.record.id).await.unwrap().expect("created");
        assert_eq!(rec.epoch, 1, "claimed once, not again right after");
        assert_eq!(
            (rec.state.steps[0].attempts, rec.state.steps[0].last_error.as_deref()),
            (0, None),
            "not an attempt"
        );
        let events: Vec<String> = store.outbox_pending(1000).await.unwrap().into_iter().map(|r| r.event_type).collect();
        assert!(!events.iter().any(|e| e == "StepStarted"), "a start was recorded for a call never made: {events:?}");
    }

    /// A driver that admits sagas (with free places) but never gets to them, as when sagas it
    /// claims from the store take every place first: a waiting request's deferred creation must
    /// not wait for it. Its request withdraws the creation and commits it alone, unclaimed.
    #[tokio::test]
    async fn a_deferred_creation_the_driver_does_not_start_is_withdrawn_and_created_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (store, sagas, mut driver) = idle_driver(dir.path()).await;
        let draft = sagas.draft(&crate::store::tests::def(), &serde_json::json!({}));
        let created = tokio::time::timeout(Duration::from_secs(5), sagas.create(&draft, None, true)).await;
        let created = created.expect("the creation waited for a driver that never started it").unwrap();
        assert_eq!(created, crate::store::CreateOutcome::Created);
        let rec = store.saga(&draft.record.id).await.unwrap().expect("created");
        assert_eq!(rec.epoch, 0, "created unclaimed, for a driver to claim from the store");
        // The withdrawn hand-over, if the driver gets to it after all, is not run.
        let (_, _, pending) = driver.adopted.try_recv().expect("handed over");
        assert!(!pending.expect("deferred").start(), "withdrawn: the driver must not run it");
    }

    /// A chain whose commit failed is gone: nothing of it was written, and the driver, which
    /// reloads the saga and runs its steps again, must not commit it later on top of their
    /// new results (a refused chain of one was committed with its failure after it, the
    /// writes of the "failed" call included).
    #[tokio::test]
    async fn a_chain_whose_commit_failed_is_not_committed_later() {
        let dir = tempfile::tempdir().unwrap();
        let (store, sagas, _driver) = idle_driver(dir.path()).await;
        let draft = sagas.draft(&crate::store::tests::def(), &serde_json::json!({}));
        sagas.create(&draft, None, false).await.unwrap();
        let mut rec = store.saga(&draft.record.id).await.unwrap().expect("created");
        let mut staged = saga::Staged::default();
        let writes = Some(Touched {
            plugin: "p".to_owned(),
            writes: vec![("k".to_owned(), Some(b"v".to_vec()))],
            ..Touched::default()
        });
        sagas.stage(&mut rec, &mut staged, Event::Started { step: 0, attempt: 1 }, writes).unwrap();
        // Not claimed at epoch 7: the commit is refused, as any failed commit.
        let failed = sagas.commit_staged(&mut rec, 7, &mut staged, false, None).await;
        assert!(matches!(failed, Err(saga::Error::Fenced)), "{failed:?}");
        assert!(staged.is_empty(), "the failed chain is still staged: {} transitions", staged.len());
        assert_eq!(staged.write_count(), 0);
    }

    /// A deferred creation whose commit landed although the store reported a failure (on
    /// PostgreSQL the connection can drop after COMMIT): the request's own creation then finds
    /// its key in flight with its own saga, and must answer with that saga (`Created`), not 409
    /// "in flight" for its own request. Simulated by the saga and its claim being there already.
    #[tokio::test]
    async fn a_creation_that_finds_its_own_saga_under_its_key_was_created() {
        let dir = tempfile::tempdir().unwrap();
        let (store, sagas, _driver) = idle_driver(dir.path()).await;
        let draft = sagas.draft(&crate::store::tests::def(), &serde_json::json!({}));
        let claim = crate::store::IdempotencyClaim {
            caller: "c".into(),
            route: "POST /sagas/t".into(),
            key: "k".into(),
            fingerprint: "f".into(),
            lock_ms: 60_000,
            ttl_ms: 600_000,
            response: None,
        };
        let landed = crate::store::NewSaga {
            id: draft.record.id.clone(),
            definition: draft.record.definition.clone(),
            input: draft.record.input.clone(),
            state: draft.record.state.clone(),
            event: crate::event::OutboxEvent { event_id: "e1".into(), event_type: "X".into(), payload: "{}".into() },
            now: draft.record.created_at,
            lease: None,
            trace_parent: None,
        };
        let now = draft.record.created_at;
        assert_eq!(store.create_saga(&landed, Some(&claim), now).await.unwrap(), crate::store::CreateOutcome::Created);
        let created = tokio::time::timeout(Duration::from_secs(5), sagas.create(&draft, Some(&claim), true)).await;
        assert_eq!(created.expect("no answer").unwrap(), crate::store::CreateOutcome::Created);
        // Another request's draft under the same key is still told the key is in flight.
        let other = sagas.draft(&crate::store::tests::def(), &serde_json::json!({}));
        let again = tokio::time::timeout(Duration::from_secs(5), sagas.create(&other, Some(&claim), true)).await;
        assert_eq!(again.expect("no answer").unwrap(), crate::store::CreateOutcome::InFlight);
    }

    /// A saga store whose next creation commits and then reports a failure, as on PostgreSQL
    /// when the connection drops after COMMIT; with `refuse_writes`, one that answers reads
    /// (a saga is due now) and refuses every claim, as a full disk or a read-only standby
    /// does, counting the claims.
    struct LandsThenFails {
        inner: Arc<dyn crate::store::Store>,
        fail_next_create: std::sync::atomic::AtomicBool,
        refuse_writes: bool,
        claims: std::sync::atomic::AtomicU64,
        /// How long each lease renewal takes (a busy database).
        renew_delay: Duration,
        renewals: std::sync::atomic::AtomicU64,
    }

    impl LandsThenFails {
        fn new(inner: Arc<dyn crate::store::Store>, fail_next_create: bool, refuse_writes: bool) -> LandsThenFails {
            LandsThenFails {
                inner,
                fail_next_create: fail_next_create.into(),
                refuse_writes,
                claims: 0.into(),
                renew_delay: Duration::ZERO,
                renewals: 0.into(),
            }
        }
    }

    #[async_trait::async_trait]
    impl SagaStore for LandsThenFails {
        async fn create_saga(
            &self,
            saga: &crate::store::NewSaga,
            claim: Option<&crate::store::IdempotencyClaim>,
            now: i64,
        ) -> crate::store::Result<crate::store::CreateOutcome> {
            let outcome = self.inner.create_saga(saga, claim, now).await?;
            if self.fail_next_create.swap(false, std::sync::atomic::Ordering::SeqCst) {
                return Err(crate::store::Error::Unsupported("the connection dropped after COMMIT".into()));
            }
            Ok(outcome)
        }
        async fn saga(&self, id: &str) -> crate::store::Result<Option<SagaRecord>> {
            self.inner.saga(id).await
        }
        async fn list_sagas(
            &self,
            saga_type: &str,
            status: Option<&str>,
            before: Option<&str>,
            limit: u32,
        ) -> crate::store::Result<Vec<crate::store::SagaSummary>> {
            self.inner.list_sagas(saga_type, status, before, limit).await
        }
        async fn claim_due(
            &self,
            owner: &str,
            now: i64,
            lease_ms: i64,
            limit: u32,
        ) -> crate::store::Result<Vec<(String, i64)>> {
            self.claims.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.refuse_writes {
                return Err(crate::store::Error::Unsupported("database or disk is full".into()));
            }
            self.inner.claim_due(owner, now, lease_ms, limit).await
        }
        async fn renew_lease(&self, id: &str, epoch: i64, lease_ms: i64) -> crate::store::Result<bool> {
            self.renewals.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(self.renew_delay).await;
            self.inner.renew_lease(id, epoch, lease_ms).await
        }
        async fn release(&self, id: &str, epoch: i64) -> crate::store::Result<()> {
            self.inner.release(id, epoch).await
        }
        async fn release_until(&self, id: &str, epoch: i64, at: i64) -> crate::store::Result<()> {
            self.inner.release_until(id, epoch, at).await
        }
        async fn release_owner(&self, owner: &str) -> crate::store::Result<u64> {
            self.inner.release_owner(owner).await
        }
        async fn database_now_ms(&self) -> crate::store::Result<Option<i64>> {
            self.inner.database_now_ms().await
        }
        async fn next_due(&self) -> crate::store::Result<Option<i64>> {
            if self.refuse_writes {
                return Ok(Some(0));
            }
            self.inner.next_due().await
        }
        async fn commit(&self, c: &crate::store::Commit<'_>) -> crate::store::Result<i64> {
            self.inner.commit(c).await
        }
    }

    /// Plugin state that takes `0` to read (and holds nothing).
    struct SlowState(Duration);

    #[async_trait::async_trait]
    impl crate::runtime::PluginReader for SlowState {
        async fn get(&self, _: &str, _: &str, _: bool) -> anyhow::Result<crate::store::StateRead> {
            tokio::time::sleep(self.0).await;
            Ok(crate::store::StateRead { value: None, checked: false })
        }
        async fn scan(&self, _: &str, _: &str, _: Option<&str>, _: u32) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
            tokio::time::sleep(self.0).await;
            Ok(Vec::new())
        }
        async fn grants(&self, _: &str) -> anyhow::Result<crate::grants::Grants> {
            Ok(Default::default())
        }
    }

    /// A driver and its sagas over a fresh SQLite store seen through a [`LandsThenFails`],
    /// the demo order's definition, and plugin state that takes `read` per read.
    struct Rig {
        _dir: tempfile::TempDir,
        store: Arc<dyn crate::store::Store>,
        faulty: Arc<LandsThenFails>,
        sagas: Arc<Sagas>,
        def: Arc<crate::engine::SagaDefinition>,
        driver: Driver,
    }

    impl Rig {
        /// Creates a completing order (its request waiting for it, or handing it over at once)
        /// while the driver runs: the creation's answer (within 10 s), the saga once it
        /// completed (`None` when not within 20 s), and the faulty store.
        async fn create_and_run(
            self,
            wait: bool,
        ) -> (Result<crate::store::CreateOutcome, saga::Error>, Option<SagaRecord>, Arc<LandsThenFails>) {
            let draft = self.order();
            let shutdown = CancellationToken::new();
            let running = tokio::spawn(self.driver.run(shutdown.clone()));
            let created = tokio::time::timeout(Duration::from_secs(10), self.sagas.create(&draft, None, wait)).await;
            let created = created.expect("no answer");
            let done = completed(self.store.as_ref(), &draft.record.id).await;
            shutdown.cancel();
            running.await.unwrap();
            (created, done, self.faulty)
        }

        async fn new(
            faulty: impl FnOnce(Arc<dyn crate::store::Store>) -> LandsThenFails,
            read: Duration,
            options: DriverOptions,
        ) -> Rig {
            Rig::reading(faulty, Arc::new(SlowState(read)), options).await
        }

        /// [`Rig::new`] with the plugins reading their state through `reader`.
        async fn reading(
            faulty: impl FnOnce(Arc<dyn crate::store::Store>) -> LandsThenFails,
            reader: Arc<dyn crate::runtime::PluginReader>,
            options: DriverOptions,
        ) -> Rig {
            let dir = tempfile::tempdir().unwrap();
            let store = crate::store::open(None, dir.path()).await.unwrap();
            let clock: Arc<dyn Clock> = Arc::new(crate::clock::SystemClock);
            let runtime = Arc::new(Runtime::new(crate::runtime::Limits::default(), reader).unwrap());
            let catalog =
                Arc::new(Catalog::open(store.clone(), Arc::clone(&runtime), Arc::clone(&clock)).await.unwrap());
            let def = catalog.definition(crate::builtin::order::SAGA_TYPE).expect("the demo order saga");
            let faulty = Arc::new(faulty(store.clone()));
            let sagas = Arc::new(Sagas::new(faulty.clone(), Arc::clone(&clock), DriverHandle::default()));
            let metrics = crate::metrics::Metrics::new();
            let driver = Driver::new(faulty.clone(), Arc::clone(&sagas), runtime, catalog, clock, metrics, options);
            Rig { _dir: dir, store, faulty, sagas, def, driver }
        }

        /// A draft of a completing order.
        fn order(&self) -> crate::saga::Draft {
            let input = serde_json::json!({"customer_id": "c-42",
                "items": [{"sku": "SKU-1", "quantity": 2, "unit_price_cents": 1250}],
                "currency": "USD", "payment": {"token": "tok_visa"},
                "ship_to": {"name": "Ada", "line1": "1 Main St", "city": "Springfield", "postal_code": "12345", "country": "US"}});
            self.sagas.draft(&self.def, &input)
        }
    }

    /// Saga `id` once COMPLETED, within 20 s.
    async fn completed(store: &dyn crate::store::Store, id: &str) -> Option<SagaRecord> {
        let completed = async {
            loop {
                if let Some(rec) = store.saga(id).await.unwrap() {
                    if rec.state.phase == engine::Phase::Completed {
                        return rec;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), completed).await.ok()
    }

    /// A waiting request's creation, committed alone while its first step computes (the step
    /// outlasts the chain's age), which landed although the store reported a failure: the
    /// request answers with its saga, and the saga must run now. It stayed claimed by the
    /// driver that had dropped it, run by nobody until its lease (a minute) ran out.
    #[tokio::test]
    async fn a_creation_committed_alone_that_landed_though_reported_failed_runs_at_once() {
        // The inventory step reads its reservation first: 300 ms, six times the chain's age.
        let options = DriverOptions::default();
        assert!(options.chain_max_age < Duration::from_millis(300) && options.lease_ms >= 30_000);
        let rig = Rig::new(|s| LandsThenFails::new(s, true, false), Duration::from_millis(300), options).await;
        let (created, done, faulty) = rig.create_and_run(true).await;
        assert_eq!(created.unwrap(), crate::store::CreateOutcome::Created);
        let failed = !faulty.fail_next_create.load(std::sync::atomic::Ordering::SeqCst);
        assert!(failed, "the creation went another way");
        let rec = done.expect("the saga was not run within 20 s (its lease is a minute)");
        assert!(rec.epoch >= 2, "claimed again after the claim was given back: epoch {}", rec.epoch);
    }

    /// Plugin state as a replica's memory may hold it on PostgreSQL: the first read of a
    /// reservation that a call lets it guess is answered, checked, with a reservation of five
    /// items the database never held; every other read finds nothing (as the database holds
    /// nothing else a completing order reads).
    #[derive(Default)]
    struct StaleOnce(std::sync::atomic::AtomicBool);

    #[async_trait::async_trait]
    impl crate::runtime::PluginReader for StaleOnce {
        async fn get(&self, _: &str, key: &str, guess: bool) -> anyhow::Result<crate::store::StateRead> {
            use std::sync::atomic::Ordering::SeqCst;
            if guess && key.starts_with("reservation/") && !self.0.swap(true, SeqCst) {
                let stale = serde_json::json!({"items": [{}, {}, {}, {}, {}], "status": "reserved"});
                return Ok(crate::store::StateRead { value: Some(stale.to_string().into_bytes()), checked: true });
            }
            Ok(crate::store::StateRead { value: None, checked: false })
        }
        async fn scan(&self, _: &str, _: &str, _: Option<&str>, _: u32) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
            Ok(Vec::new())
        }
        async fn grants(&self, _: &str) -> anyhow::Result<crate::grants::Grants> {
            Ok(Default::default())
        }
    }

    /// A chain whose inventory step read a stale reservation from memory (it saw five items
    /// reserved where the database holds none) is refused at its commit, and its steps run
    /// again reading the database, at once: the order completes with its one item reserved.
    /// Both with the saga created before its steps ran (the chain is reloaded and rerun) and
    /// with its creation deferred to its first commit (the request then creates it alone and
    /// a driver claims it). Without the rerun the saga sat claimed until its lease (a minute)
    /// ran out, or completed with the stale reservation's output.
    #[tokio::test]
    async fn a_chain_that_read_a_stale_value_from_memory_runs_again_from_the_database() {
        for wait in [false, true] {
            let reader = Arc::new(StaleOnce::default());
            let options = DriverOptions::default();
            assert!(options.lease_ms >= 30_000);
            let rig = Rig::reading(|s| LandsThenFails::new(s, false, false), reader.clone(), options).await;
            let store = rig.store.clone();
            let (created, done, _) = rig.create_and_run(wait).await;
            assert_eq!(created.unwrap(), crate::store::CreateOutcome::Created, "wait {wait}");
            assert!(reader.0.load(std::sync::atomic::Ordering::SeqCst), "wait {wait}: the stale answer was given");
            let rec = done.unwrap_or_else(|| panic!("wait {wait}: not completed within 20 s"));
            let output = rec.state.steps[0].output.clone().unwrap_or_default();
            assert!(output.contains(r#""items":1"#), "wait {wait}: the inventory step's output is {output}");
            let reserved = store.state_get("inventory", &format!("reservation/{}", rec.id)).await.unwrap();
            assert!(reserved.is_some(), "wait {wait}: the reservation was made");
        }
    }

    /// A database that answers reads (a saga is due now) but refuses every write: the driver
    /// tries to claim once per poll interval, not in a tight loop.
    #[tokio::test]
    async fn a_failing_claim_is_tried_again_after_the_poll_interval_not_at_once() {
        let options = DriverOptions { poll_interval: Duration::from_millis(200), ..DriverOptions::default() };
        let rig = Rig::new(|s| LandsThenFails::new(s, false, true), Duration::ZERO, options).await;
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(rig.driver.run(shutdown.clone()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        shutdown.cancel();
        running.await.unwrap();
        let claims = rig.faulty.claims.load(std::sync::atomic::Ordering::SeqCst);
        assert!((1..=7).contains(&claims), "{claims} claims in a second at a 200 ms poll interval");
    }

    /// A creation handed to the driver at once (no wait), whose commit landed although the
    /// store reported a failure: the request fails, and the saga must still run now. It stayed
    /// claimed by this driver, which never got it, until its lease (a minute) ran out.
    #[tokio::test]
    async fn a_handed_over_creation_that_landed_though_reported_failed_runs_at_once() {
        let options = DriverOptions::default();
        assert!(options.lease_ms >= 30_000);
        let rig = Rig::new(|s| LandsThenFails::new(s, true, false), Duration::ZERO, options).await;
        let (created, done, _) = rig.create_and_run(false).await;
        assert!(created.is_err(), "the store reported the creation failed");
        let rec = done.expect("the saga was not run within 20 s (its lease is a minute)");
        assert!(rec.epoch >= 2, "claimed again after the claim was given back: epoch {}", rec.epoch);
    }

    /// A lease renewal that waits for the database does not stop the plugin call beside it
    /// (its timeout is wall-clock time: the wait was charged to the plugin).
    #[tokio::test]
    async fn a_slow_lease_renewal_does_not_hold_the_call_up() {
        let slow = |s| LandsThenFails { renew_delay: Duration::from_secs(2), ..LandsThenFails::new(s, false, false) };
        // Renewals every 100 ms.
        let rig = Rig::new(slow, Duration::ZERO, DriverOptions { lease_ms: 300, ..DriverOptions::default() }).await;
        let started = std::time::Instant::now();
        let call = async { tokio::time::sleep(Duration::from_millis(150)).await };
        let heartbeat = rig.driver.inner.heartbeat("s", 1, std::time::Instant::now(), call);
        tokio::time::timeout(Duration::from_secs(5), heartbeat).await.expect("the call ended");
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1000), "a 150 ms call took {took:?} beside a 2 s renewal");
    }

    /// A call's first renewal comes a third of a lease after the lease was last renewed, not
    /// after the call began: a lease renewed most of a period before the call is renewed early
    /// in it.
    #[tokio::test]
    async fn a_call_renews_a_third_of_a_lease_after_the_last_renewal_not_after_it_began() {
        // Renewals every second.
        let options = DriverOptions { lease_ms: 3_000, ..DriverOptions::default() };
        let rig = Rig::new(|s| LandsThenFails::new(s, false, false), Duration::ZERO, options).await;
        let renewed = std::time::Instant::now() - Duration::from_millis(900);
        let call = async { tokio::time::sleep(Duration::from_millis(400)).await };
        rig.driver.inner.heartbeat("s", 1, renewed, call).await;
        let renewals = rig.faulty.renewals.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(renewals, 1, "the lease, 900 ms old when the call began, was renewed during its 400 ms");
    }

    /// A replica's catalog cache may be a refresh behind a compensation bound through
    /// another replica. A compensation whose plugin stays within the host picks its binding
    /// from the cache without reading the shared catalog (hundreds of such reads a second
    /// queued on a busy PostgreSQL pool), and its commit checks that the catalog has not
    /// moved since: after a bind elsewhere it is refused, nothing it did is kept, and it runs
    /// again on the new binding. A driver that committed the stale binding's result would
    /// run the compensation the bind replaced (SPEC 5.3: every compensation from then on
    /// uses the new binding).
    #[tokio::test]
    async fn a_compensation_picked_from_a_stale_catalog_is_refused_at_its_commit_and_runs_on_the_new_binding() {
        use crate::builtin::order::{PLUGINS, SAGA_TYPE};
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open(None, dir.path()).await.unwrap();
        let clock: Arc<dyn Clock> = Arc::new(crate::clock::SystemClock);
        let reader = Arc::new(crate::StoreReader(store.clone()));
        let new_runtime = || Arc::new(Runtime::new(crate::runtime::Limits::default(), reader.clone()).unwrap());
        // Another replica's catalog, and this one's, on a store it shares with other hosts.
        let theirs = Catalog::open(store.clone(), new_runtime(), Arc::clone(&clock)).await.unwrap();
        let shared = Arc::new(crate::catalog::tests::SlowRead::shared(store.clone()));
        let runtime = new_runtime();
        let ours = Arc::new(Catalog::open(shared.clone(), Arc::clone(&runtime), Arc::clone(&clock)).await.unwrap());
        let sagas = Arc::new(Sagas::new(store.clone(), Arc::clone(&clock), DriverHandle::default()));
        let options = DriverOptions::default();
        let driver = || {
            let metrics = crate::metrics::Metrics::new();
            let (catalog, runtime) = (Arc::clone(&ours), Arc::clone(&runtime));
            Driver::new(
                store.clone(),
                Arc::clone(&sagas),
                runtime,
                catalog,
                Arc::clone(&clock),
                metrics,
                options.clone(),
            )
        };
        let def = ours.definition(SAGA_TYPE).unwrap();
        let refund = |rec: &SagaRecord| {
            let payment = &rec.state.steps[1];
            (payment.compensate_digest.clone().unwrap_or_default(), payment.compensate_attempts)
        };
        // No carrier for XX: the payment is refunded, the reservation released.
        let input = serde_json::json!({"customer_id": "c-42",
            "items": [{"sku": "SKU-1", "quantity": 2, "unit_price_cents": 1250}],
            "currency": "USD", "payment": {"token": "tok_visa"},
            "ship_to": {"name": "Ada", "line1": "1 Main St", "city": "Springfield", "postal_code": "12345", "country": "XX"}});
        let cancelled = |r: &SagaRecord| r.state.phase == engine::Phase::Cancelled;

        // Nothing changed: the compensations read no catalog version.
        let draft = sagas.draft(&def, &input);
        sagas.create(&draft, None, false).await.unwrap();
        let reads = shared.versions_read.load(SeqCst);
        let settled = drive_until(&store, driver(), &draft.record.id, cancelled).await;
        assert_eq!(refund(&settled), (def.steps[1].compensate.digest.clone(), 1));
        assert_eq!(shared.versions_read.load(SeqCst), reads, "a compensation read the shared catalog");

        // Another replica binds a fixed refund; this replica's cache has not refreshed.
        let fix = crate::catalog::tests::another_version(PLUGINS[1].1, "fixed refund");
        let (fixed, _) = theirs.install_plugin("payment", fix).await.unwrap();
        theirs.bind(SAGA_TYPE, "payment", None, Some(&fixed), crate::catalog::tests::audit).await.unwrap();
        assert_ne!(ours.definition(SAGA_TYPE).unwrap().steps[1].compensate.digest, fixed, "refreshed already");
        let draft = sagas.draft(&def, &input);
        sagas.create(&draft, None, false).await.unwrap();
        let settled = drive_until(&store, driver(), &draft.record.id, cancelled).await;
        assert_eq!(refund(&settled), (fixed, 1), "the refund ran the binding replaced before it, or twice");
        let refunded = store.state_get("payment", &format!("charge/{}", draft.record.id)).await.unwrap();
        let refunded: serde_json::Value = serde_json::from_slice(&refunded.expect("charged")).unwrap();
        assert_eq!(refunded["status"], "refunded", "{refunded}");
    }
}
