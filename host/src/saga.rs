//! One way in for every saga change.
//!
//! Every path that changes a saga goes through [`Sagas`]: creating one (with its first event
//! and its idempotency claim), applying an outside event (a client's cancel or signal, an
//! operator's retry or resolve), and committing a transition the driver computed after a
//! plugin call. Each reads the saga, decides with the pure engine and commits conditional on
//! exactly what it read; the HTTP handlers and the driver only call this module, and never
//! `engine::apply` or `Store::commit` themselves.
//!
//! Architecture invariant: a commit applies only to the state it was computed from. The
//! store refuses it (`Fenced`) when the saga's `seq` moved since the read, and, for the
//! driver, when its claim (the `epoch`) was taken over. A cancel computed from the state
//! before the last step can therefore never land on top of COMPLETED: it is recomputed from
//! the new state, and refused there.
//!
//! The event envelope is built here, once, before the commit ([`crate::event`]); the
//! status change is announced here, once, after it ([`DriverHandle::announce`]).
//!
//! It must not call plugins: the driver does, and hands the outcome in as an engine event.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Clock;
use crate::driver::{DriverHandle, StatusChange};
use crate::engine::{self, Event, EventSpec, SagaDefinition, SagaState};
use crate::event::{Envelope, OutboxEvent};
use crate::store::{
    self, AuditEntry, Commit, CreateOutcome, Creation, Fence, IdempotencyClaim, NewSaga, SagaRecord, SagaStore,
    StateCheck, StateWrite, StoredResponse,
};

/// How often an outside event is recomputed when the saga keeps changing under it.
const OUTSIDE_EVENT_TRIES: usize = 10;

/// The answer a keyed request gives once its outside event is applied (a cancel, a signal,
/// an operator action with an `Idempotency-Key`): [`Sagas::apply`] stores it under the key
/// in the event's own commit ([`Commit::answer`]), so a request that dies after the commit
/// leaves its key answered. The request answers with the same status and body.
pub struct KeyedAnswer<'a> {
    pub caller: &'a str,
    pub route: &'a str,
    pub key: &'a str,
    pub status: u16,
    /// The body for the saga as the commit leaves it.
    pub render: fn(&SagaRecord) -> Option<Vec<u8>>,
}

/// Why an outside event was not applied.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No saga with that id (of that type).
    #[error("no such saga")]
    NotFound,
    /// The engine refuses the event in the saga's current state (e.g. cancelling a
    /// COMPLETED saga); the saga as it is now comes along.
    #[error("{0}")]
    Refused(engine::Error, Box<SagaRecord>),
    /// The saga changed under the event every time it was recomputed.
    #[error("the saga is changing rapidly; retry the request")]
    Busy,
    /// The driver's claim was taken over, or the saga moved on, since it was read: nothing
    /// was written, and the result it carried is discarded.
    #[error("the saga was changed by someone else; its result was discarded")]
    Fenced,
    /// A chain whose calls read plugin state, or whose compensations took their bindings
    /// from the catalog cache, was refused: a value they read had changed (another saga's
    /// commit, or another replica, wrote it), or the catalog had (another replica bound a
    /// plugin), or the saga moved on. Nothing was written; the values checked are no longer
    /// answered from memory. Reload the saga and run its steps again
    /// ([`store::Error::StaleRead`]).
    #[error(
        "a state value the steps read, or the catalog their compensations' bindings came from, changed, or the saga \
         was changed; their results were discarded"
    )]
    StaleRead,
    /// A new saga was refused: this many sagas created here wait for the driver already
    /// ([`crate::driver::DriverOptions::max_queued`]). Nothing was written.
    #[error("{0} new sagas wait for this host to start them; retry shortly")]
    Overloaded(usize),
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// Who acts, when an outside event is an audited operator action.
#[derive(Debug, Clone)]
pub struct Actor {
    pub name: String,
    /// e.g. `saga.retry`, `saga.resolve`.
    pub action: String,
    pub note: Option<String>,
}

/// A saga about to be created: the record it will be, and its first event.
#[derive(Debug, Clone)]
pub struct Draft {
    pub record: SagaRecord,
    event: EventSpec,
}

/// The saga service. Cheap to share behind an `Arc` (and to clone).
#[derive(Clone)]
pub struct Sagas {
    store: Arc<dyn SagaStore>,
    clock: Arc<dyn Clock>,
    driver: DriverHandle,
}

impl Sagas {
    pub fn new(store: Arc<dyn SagaStore>, clock: Arc<dyn Clock>, driver: DriverHandle) -> Sagas {
        Sagas { store, clock, driver }
    }

    /// The handle through which commits are announced and the driver is woken.
    pub fn handle(&self) -> DriverHandle {
        self.driver.clone()
    }

    /// The saga a create request would start: a fresh id, the definition pinned, nothing run.
    pub fn draft(&self, def: &SagaDefinition, input: &serde_json::Value) -> Draft {
        let now = self.clock.now_ms();
        let record = SagaRecord {
            id: uuid::Uuid::now_v7().to_string(),
            saga_type: def.saga_type.clone(),
            definition: def.clone(),
            input: input.to_string(),
            state: SagaState::new(def, now),
            seq: 1,
            epoch: 0,
            created_at: now,
            updated_at: now,
            trace_parent: None,
        };
        Draft { record, event: engine::created(def, input) }
    }

    /// Creates a drafted saga with its first event, under an idempotency key when one is
    /// given: the claim, the saga and (when known) the stored response commit together.
    ///
    /// `deferred`: the caller waits for the saga to settle anyway (`Prefer: wait`), so the
    /// creation may commit together with the saga's first transitions, one durable commit
    /// instead of two: the saga is handed to this process's driver uncommitted
    /// ([`Deferred`]), which runs its first steps and commits them with the creation, and
    /// this returns once that commit is durable. Nothing of it exists before: a crash loses
    /// it all, and the client's retry with its key starts again. A step that may call another
    /// service never runs before the creation is durable (the driver commits it first), so no
    /// effect out there can belong to a saga that was never created. Deferred only while the
    /// driver has a place to start it at once; otherwise committed alone first, as without
    /// `deferred`, so that neither the saga nor its request waits uncommitted behind sagas
    /// that hold every place. When the driver does not
    /// commit the creation (a duplicate request's key won, the store failed, the host stops),
    /// the creation is done here alone, as without `deferred`, unclaimed: the key then says
    /// what it holds, or the saga is created and a driver claims it from the store.
    pub async fn create(
        &self,
        draft: &Draft,
        claim: Option<&IdempotencyClaim>,
        deferred: bool,
    ) -> Result<CreateOutcome, Error> {
        let rec = &draft.record;
        let envelope = Envelope {
            saga_id: &rec.id,
            saga_type: &rec.saga_type,
            seq: 1,
            status: &rec.state.status,
            at: rec.created_at,
        };
        // Created claimed by this process's driver, which gets it handed over below: no
        // claim and no read of what was just written. Unless the driver's queue is full.
        let admitted = self.driver.admit().map_err(|o| Error::Overloaded(o.queued))?;
        // The intake span: a child of the request's (whose parent is the client's
        // `traceparent`), stored with the saga as the parent of all its later spans.
        let intake = if crate::telemetry::enabled() {
            tracing::info_span!("saga.intake", saga_id = %rec.id, saga_type = %rec.saga_type)
        } else {
            tracing::Span::none()
        };
        let trace_parent = crate::telemetry::traceparent_of(&intake);
        let new = NewSaga {
            id: rec.id.clone(),
            definition: rec.definition.clone(),
            input: rec.input.clone(),
            state: rec.state.clone(),
            event: envelope.wrap(&draft.event),
            now: rec.created_at,
            lease: admitted.claim.clone(),
            trace_parent: trace_parent.clone(),
        };
        let adopted = SagaRecord { epoch: 1, trace_parent, ..rec.clone() };
        use tracing::Instrument as _;
        // Deferred only when the driver starts it at once: behind sagas that hold every one of
        // its places, the creation would wait uncommitted (and the request with it) for as
        // long as they run. A place seen free may still be taken before the driver gets to
        // this saga (sagas it claims from the store): then the request withdraws the creation.
        if deferred && admitted.claim.is_some() && admitted.starts_at_once {
            let (reply, mut created) = tokio::sync::oneshot::channel();
            let new = Arc::new(new);
            let state = Arc::new(AtomicU8::new(QUEUED));
            let pending = Deferred { saga: Arc::clone(&new), claim: claim.cloned(), reply, state: Arc::clone(&state) };
            self.driver.adopt(adopted, admitted, Some(pending));
            let outcome = async {
                tokio::select! {
                    outcome = &mut created => outcome.ok(),
                    _ = tokio::time::sleep(DEFERRAL_START_MAX) => {
                        match state.compare_exchange(QUEUED, WITHDRAWN, Ordering::AcqRel, Ordering::Acquire) {
                            Ok(_) => None,
                            // Started: its commit is on its way.
                            Err(_) => (&mut created).await.ok(),
                        }
                    }
                }
            }
            .instrument(intake.clone())
            .await;
            if let Some(outcome) = outcome {
                return Ok(outcome);
            }
            // Not committed by the driver, or withdrawn before it started: created here, for a
            // driver to claim from the store. (A driver that ran it dropped its share before
            // the reply: no copy is made.)
            let mut new = Arc::unwrap_or_clone(new);
            new.lease = None;
            let outcome = self.create_now(new, claim, None).instrument(intake).await;
            // The driver's commit may have landed although the store reported a failure (on
            // PostgreSQL the connection can drop after COMMIT): this creation then finds the key
            // in flight with this very saga (and fails to insert it again). It was created.
            let maybe_ours = matches!(outcome, Ok(CreateOutcome::InFlight) | Err(Error::Store(_)));
            if maybe_ours && matches!(self.store.saga(&rec.id).await, Ok(Some(_))) {
                return Ok(CreateOutcome::Created);
            }
            return outcome;
        }
        self.create_now(new, claim, Some((adopted, admitted))).instrument(intake).await
    }

    /// Commits a creation alone; hands the saga to the driver (`adopt`) when created.
    ///
    /// With `adopt` the saga is created claimed by this process's driver, so the commit and the
    /// hand-over run as a task of their own, which the request only awaits: a request dropped
    /// in between (its client hung up, its deadline passed) while the commit still lands (the
    /// SQLite writer finishes a queued commit regardless) would otherwise leave the saga
    /// claimed by a driver that never got it, run by nobody until its lease ran out.
    async fn create_now(
        &self,
        new: NewSaga,
        claim: Option<&IdempotencyClaim>,
        adopt: Option<(SagaRecord, crate::driver::Admitted)>,
    ) -> Result<CreateOutcome, Error> {
        let Some((rec, admitted)) = adopt else {
            let outcome = self.store_creation(&new, claim).await?;
            if outcome == CreateOutcome::Created {
                self.driver.wake();
            }
            return Ok(outcome);
        };
        let this = self.clone();
        let claim = claim.cloned();
        use tracing::Instrument as _;
        let task = tokio::spawn(
            async move {
                let outcome = this.store_creation(&new, claim.as_ref()).await;
                match &outcome {
                    Ok(CreateOutcome::Created) => this.driver.adopt(rec, admitted, None),
                    Ok(_) => {}
                    // The commit may have landed although the store reported a failure (on
                    // PostgreSQL the connection can drop after COMMIT): the saga would sit
                    // claimed by this process's driver, which never got it, run by nobody
                    // until its lease ran out. The claim is given back (fenced by its epoch:
                    // nothing happens where nothing landed) and the driver looks for due work.
                    Err(_) => {
                        if give_back_landed(this.store.as_ref(), &rec.id, rec.epoch).await {
                            this.driver.wake();
                        }
                    }
                }
                outcome
            }
            .in_current_span(),
        );
        match task.await {
            Ok(outcome) => outcome,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Only when the runtime shuts down under the request.
            Err(e) => Err(Error::Store(store::Error::Unsupported(format!("the host is shutting down: {e}")))),
        }
    }

    /// Commits a deferred creation alone, for the driver running it (claimed at epoch 1):
    /// before a step that may call another service. `Created`, or what the key holds (then
    /// the saga does not exist).
    pub async fn create_deferred(&self, pending: &Deferred) -> Result<CreateOutcome, Error> {
        self.store_creation(&pending.saga, pending.claim.as_ref()).await
    }

    /// The creation's own commit, announced when it created the saga.
    async fn store_creation(&self, new: &NewSaga, claim: Option<&IdempotencyClaim>) -> Result<CreateOutcome, Error> {
        let outcome = self.store.create_saga(new, claim, new.now).await?;
        if outcome == CreateOutcome::Created {
            self.driver.announce(StatusChange {
                saga_id: new.id.clone(),
                left: false,
                settled: false,
                record: None,
                response: None,
            });
        }
        Ok(outcome)
    }

    /// Reads a saga; `saga_type` `None` matches any type (operator routes address sagas by
    /// id alone).
    pub async fn get(&self, saga_type: Option<&str>, id: &str) -> Result<Option<SagaRecord>, store::Error> {
        Ok(self.store.saga(id).await?.filter(|rec| saga_type.is_none_or(|t| rec.saga_type == t)))
    }

    /// Applies an outside event (cancel, signal, operator retry or resolve): read, decide with
    /// the engine, commit conditional on exactly the state read; on a conflict, read again
    /// and decide again. The commit takes the saga over from a driver that may be mid-call:
    /// that call's result is discarded and its step runs again from the new state. `answer`,
    /// the keyed request's answer, is stored under its key by the same commit.
    pub async fn apply(
        &self,
        saga_type: Option<&str>,
        id: &str,
        event: Event,
        actor: Option<&Actor>,
        answer: Option<&KeyedAnswer<'_>>,
    ) -> Result<SagaRecord, Error> {
        for _ in 0..OUTSIDE_EVENT_TRIES {
            let mut rec = self.get(saga_type, id).await?.ok_or(Error::NotFound)?;
            let now = self.clock.now_ms();
            let t = match engine::apply(&rec.definition, &rec.state, event.clone(), now) {
                Ok(t) => t,
                Err(e) => return Err(Error::Refused(e, Box::new(rec))),
            };
            let audit = actor.map(|a| AuditEntry {
                actor: a.name.clone(),
                action: a.action.clone(),
                target: id.to_owned(),
                before: Some(serde_json::json!({ "status": rec.state.status })),
                after: Some(serde_json::json!({ "status": t.state.status })),
                note: a.note.clone(),
                answer: None,
            });
            let seq = rec.seq + 1;
            let envelope =
                Envelope { saga_id: &rec.id, saga_type: &rec.saga_type, seq, status: &t.state.status, at: now };
            let event = envelope.wrap(&t.event);
            rec.state = t.state;
            let outside = Outside { audit: audit.as_ref(), answer };
            let calls = Calls::default();
            match self.commit(&mut rec, Fence::Takeover, &[event], &t.changed_steps, calls, outside, None).await {
                Ok(()) => {
                    crate::failpoint!("apply-after-commit");
                    self.driver.wake();
                    return Ok(rec);
                }
                Err(store::Error::Fenced) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Busy)
    }

    /// Stages what the driver did for a saga it claimed: the engine event for the action it
    /// performed (a plugin call's outcome, a finish, a deadline), with the state writes of that
    /// call, applied to `rec.state` but not committed; [`Sagas::commit_staged`] commits every
    /// staged transition at once. `rec.seq` stays the seq the chain was read at. Returns
    /// whether more work is due now (the driver keeps its claim and may go on), as of the
    /// driver's clock.
    pub fn stage(
        &self,
        rec: &mut SagaRecord,
        staged: &mut Staged,
        event: Event,
        touched: Option<Touched>,
    ) -> Result<bool, Error> {
        let now = self.clock.now_ms();
        let t = match engine::apply(&rec.definition, &rec.state, event, now) {
            Ok(t) => t,
            Err(e) => return Err(Error::Refused(e, Box::new(rec.clone()))),
        };
        let seq = rec.seq + staged.events.len() as i64 + 1;
        let envelope = Envelope { saga_id: &rec.id, saga_type: &rec.saga_type, seq, status: &t.state.status, at: now };
        staged.events.push(envelope.wrap(&t.event));
        for i in t.changed_steps {
            if !staged.changed.contains(&i) {
                staged.changed.push(i);
            }
        }
        if let Some(Touched { plugin, writes, checks, catalog }) = touched {
            // The earliest version the chain's bindings were picked at: the cache only moves
            // forward, so the store still at it means none of them was replaced since.
            if let Some(version) = catalog {
                staged.catalog.get_or_insert(version);
            }
            if !checks.is_empty() {
                staged.checks.push((plugin.clone(), checks));
            }
            if !writes.is_empty() {
                staged.writes.push((plugin, writes));
            }
        }
        rec.state = t.state;
        Ok(rec.state.next_run_at.is_some_and(|at| at <= now))
    }

    /// Commits the transitions staged on `rec` by the driver holding its claim at `epoch`, in
    /// one transaction, keeping the claim when `keep` (more work is due) and releasing it
    /// otherwise. `staged` is empty afterwards, whatever the outcome: on success `rec` is the
    /// saga as committed; on an error nothing was written, the chain is gone, and `rec.state`
    /// holds uncommitted changes and must be reloaded (the steps run again).
    ///
    /// `creating`: the saga's creation ([`Deferred`]) goes into the same transaction; then
    /// `Err(Fenced)` means its idempotency key was not new, and nothing was written.
    /// `Err(StaleRead)`: the chain carried checks of its calls' state reads, or of
    /// the catalog version its compensations picked their bindings at, and was refused (a
    /// value or the catalog changed, or the fence refused it); nothing was written. After a
    /// refused catalog check, [`Staged::catalog_refused`] holds for the rest of the run.
    pub async fn commit_staged(
        &self,
        rec: &mut SagaRecord,
        epoch: i64,
        staged: &mut Staged,
        keep: bool,
        creating: Option<&Deferred>,
    ) -> Result<(), Error> {
        let fence = if keep { Fence::Lease(epoch) } else { Fence::LeaseRelease(epoch) };
        let writes: Vec<(&str, &[StateWrite])> =
            staged.writes.iter().map(|(p, w)| (p.as_str(), w.as_slice())).collect();
        let checks: Vec<(&str, &[StateCheck])> =
            staged.checks.iter().map(|(p, c)| (p.as_str(), c.as_slice())).collect();
        let creation = creating.map(|d| Creation { saga: &d.saga, claim: d.claim.as_ref() });
        let catalog_checked = staged.catalog.is_some();
        let calls = Calls { writes: &writes, checks: &checks, catalog: staged.catalog };
        let committed =
            self.commit(rec, fence, &staged.events, &staged.changed, calls, Outside::default(), creation).await;
        staged.clear();
        match committed {
            Ok(()) => {
                staged.refused_in_a_row = 0;
                Ok(())
            }
            Err(store::Error::Fenced) => Err(Error::Fenced),
            Err(store::Error::StaleRead) => {
                staged.catalog_refused |= catalog_checked;
                staged.refused_in_a_row = staged.refused_in_a_row.saturating_add(1);
                Err(Error::StaleRead)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Commits the events of transitions already applied to `rec.state` (computed from the
    /// saga as read at `rec.seq`), with the plugins' state writes that produced them, and
    /// announces the status change. On success `rec` is the saga as committed. `Err(Fenced)`
    /// means the saga moved on since it was read (or the claim was lost): nothing was written.
    #[allow(clippy::too_many_arguments, reason = "the parts of one commit, each a different kind; two callers")]
    async fn commit(
        &self,
        rec: &mut SagaRecord,
        fence: Fence,
        events: &[OutboxEvent],
        changed_steps: &[usize],
        calls: Calls<'_>,
        outside: Outside<'_>,
        creation: Option<Creation<'_>>,
    ) -> Result<(), store::Error> {
        let now = self.clock.now_ms();
        let step_names: Vec<String> = rec.definition.steps.iter().map(|s| s.name.clone()).collect();
        // A waiting create is answered 200 once its saga is COMPLETED or CANCELLED (SPEC
        // §5.2), not when it is stuck in COMPENSATION_FAILED: that wait runs out (201).
        let settled = rec.state.phase.is_terminal();
        // A request of this process waits for this saga to settle: its response goes into this
        // commit, rendered from the saga as it will be committed.
        let read_updated_at = rec.updated_at;
        rec.updated_at = now;
        let responder = settled.then(|| self.driver.responder(&rec.id)).flatten();
        let response = responder.as_ref().and_then(|r| (r.render)(rec).map(|body| (r, body)));
        let answer = outside.answer.and_then(|a| (a.render)(rec).map(|body| (a, body)));
        let commit = Commit {
            saga_id: &rec.id,
            fence,
            read_seq: rec.seq,
            state: &rec.state,
            step_names: &step_names,
            changed_steps,
            plugin_writes: calls.writes,
            plugin_checks: calls.checks,
            catalog_check: calls.catalog,
            events,
            now,
            audit: outside.audit,
            response: response.as_ref().map(|(r, body)| StoredResponse {
                caller: &r.caller,
                route: &r.route,
                key: &r.key,
                status: 200,
                body,
            }),
            answer: answer.as_ref().map(|(a, body)| StoredResponse {
                caller: a.caller,
                route: a.route,
                key: a.key,
                status: a.status,
                body,
            }),
            creation,
        };
        let seq = if crate::telemetry::enabled() {
            use tracing::Instrument as _;
            let span = tracing::info_span!(
                "saga.commit",
                saga_id = %rec.id,
                transitions = events.len(),
                status = %rec.state.status,
                seq = tracing::field::Empty,
            );
            crate::telemetry::set_parent(&span, crate::telemetry::saga_context(&rec.id, rec.trace_parent.as_deref()));
            let seq = self.store.commit(&commit).instrument(span.clone()).await;
            if let Ok(seq) = seq {
                span.record("seq", seq);
            }
            seq
        } else {
            self.store.commit(&commit).await
        };
        let seq = match seq {
            Ok(seq) => seq,
            Err(e) => {
                rec.updated_at = read_updated_at;
                return Err(e);
            }
        };
        tracing::debug!(saga_id = %rec.id, seq, transitions = events.len(), status = %rec.state.status, "committed");
        rec.seq = seq;
        if matches!(fence, Fence::Takeover) {
            rec.epoch += 1;
        }
        self.driver.announce(StatusChange {
            saga_id: rec.id.clone(),
            left: false,
            settled,
            record: settled.then(|| Arc::new(rec.clone())),
            response: response.map(|(_, body)| Arc::new(body)),
        });
        Ok(())
    }
}

/// What a driver's chain of calls leaves for its commit besides events: the plugins' state
/// writes, and what the commit must find still true (the [`Touched`] of each call).
#[derive(Default, Clone, Copy)]
struct Calls<'a> {
    writes: &'a [(&'a str, &'a [StateWrite])],
    checks: &'a [(&'a str, &'a [StateCheck])],
    catalog: Option<i64>,
}

/// What an outside event's commit carries besides the saga's change: the operator action's
/// audit entry and the keyed request's answer.
#[derive(Default, Clone, Copy)]
struct Outside<'a> {
    audit: Option<&'a AuditEntry>,
    answer: Option<&'a KeyedAnswer<'a>>,
}

/// How long a deferred creation waits for the driver to start it before its request
/// withdraws it and commits the creation alone (every place of the driver was taken after all).
const DEFERRAL_START_MAX: std::time::Duration = std::time::Duration::from_millis(100);

/// [`Deferred::state`]: in the driver's queue, run by the driver, or withdrawn by its request.
const QUEUED: u8 = 0;
const STARTED: u8 = 1;
const WITHDRAWN: u8 = 2;

/// A saga handed to the driver before its creation committed ([`Sagas::create`] with
/// `deferred`): what its first commit must create, and the request waiting for that.
pub struct Deferred {
    /// Shared with the request, which creates the saga itself if this is dropped. Declared
    /// before `reply`, so dropped first.
    saga: Arc<NewSaga>,
    claim: Option<IdempotencyClaim>,
    /// Sent the outcome once the creation committed; dropped when the driver did not commit
    /// it (the request then creates the saga itself).
    reply: tokio::sync::oneshot::Sender<CreateOutcome>,
    /// Who has it: the driver's queue, the driver, or (withdrawn) the request again.
    state: Arc<AtomicU8>,
}

impl Deferred {
    /// The driver starts running it: false if its request withdrew it first (then the
    /// request creates the saga, unclaimed, and the driver must not run it).
    pub fn start(&self) -> bool {
        self.state.compare_exchange(QUEUED, STARTED, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Tells the waiting request how the creation went.
    pub fn answer(self, outcome: CreateOutcome) {
        let _ = self.reply.send(outcome);
    }
}

/// What a plugin call leaves for its commit, besides its event: its plugin's state writes,
/// and what the commit must find still true: the reads it made
/// ([`store::StateRead::checked`]) and, for a compensation that picked its binding from a
/// catalog cache that may be behind the store, the catalog version it was picked at
/// ([`store::Commit::catalog_check`]).
#[derive(Debug, Default)]
pub struct Touched {
    /// Whose state space.
    pub plugin: String,
    pub writes: Vec<StateWrite>,
    pub checks: Vec<StateCheck>,
    pub catalog: Option<i64>,
}

/// Transitions of one saga staged by the driver and not yet committed: a commit chain.
#[derive(Debug, Default)]
pub struct Staged {
    events: Vec<OutboxEvent>,
    changed: Vec<usize>,
    writes: Vec<(String, Vec<StateWrite>)>,
    checks: Vec<(String, Vec<StateCheck>)>,
    /// The catalog version to check ([`Touched::catalog`]): the earliest of the chain's.
    catalog: Option<i64>,
    /// A chain of this run was refused while it carried a catalog check: a compensation's
    /// binding may have been replaced (another replica bound one), so the rest of the run
    /// catches the catalog up before each compensation instead of checking it at the
    /// commit. Kept across chains (not cleared with them): one refusal, then progress,
    /// however often the catalog changes.
    catalog_refused: bool,
    /// Chains of this run refused in a row ([`Error::StaleRead`]): each waits longer before
    /// the steps run again ([`Staged::stale_read_pause`]). Kept across chains; a commit that
    /// applies ends the row.
    refused_in_a_row: u32,
}

/// The first pause before steps whose commit was refused for a changed state value run
/// again ([`Staged::stale_read_pause`]), and the longest.
const STALE_READ_PAUSE: (Duration, Duration) = (Duration::from_millis(5), Duration::from_millis(200));

impl Staged {
    /// How many transitions are staged.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Whether a staged transition wrote to `plugin`'s state: a call of that plugin must not
    /// run before they commit, or it would read its state without them.
    pub fn wrote(&self, plugin: &str) -> bool {
        self.writes.iter().any(|(p, _)| p == plugin)
    }

    /// State keys the staged calls write or had checked, counted per call (a key two calls
    /// write counts twice): each is a row or a condition of the commit's statements.
    pub fn write_count(&self) -> usize {
        self.writes.iter().map(|(_, w)| w.len()).sum::<usize>()
            + self.checks.iter().map(|(_, c)| c.len()).sum::<usize>()
    }

    /// See [`Staged::catalog_refused`] (the field).
    pub fn catalog_refused(&self) -> bool {
        self.catalog_refused
    }

    /// How long to wait before running the steps of a refused chain again: nothing after the
    /// first refusal of a row ([`Staged::refused_in_a_row`], counted by `commit_staged`; a
    /// value changed once, and the rerun reads the new one), then 5 ms doubling up to 200 ms,
    /// each stretched by up to half at random (`jitter` in 0..1), so sagas whose calls keep
    /// meeting on one key (a count all of them write) stop running in step: every refusal
    /// means another commit got in first, but without the pause the slowest call could lose
    /// every time, and each rerun is a whole plugin call.
    pub fn stale_read_pause(&self, jitter: f64) -> Duration {
        let Some(doublings) = self.refused_in_a_row.checked_sub(2) else {
            return Duration::ZERO;
        };
        let (first, longest) = STALE_READ_PAUSE;
        let pause = first.saturating_mul(1 << doublings.min(16)).min(longest);
        pause.mul_f64(1.0 + jitter.clamp(0.0, 1.0) / 2.0)
    }

    fn clear(&mut self) {
        self.events.clear();
        self.changed.clear();
        self.writes.clear();
        self.checks.clear();
        self.catalog = None;
    }
}

/// Gives back the claim (`epoch`) of a creation whose commit reported a failure but may have
/// landed (on PostgreSQL the connection can drop after COMMIT): the saga would otherwise sit
/// claimed by a driver that never got it, run by nobody until its lease ran out. Fenced by the
/// epoch, so nothing happens where nothing landed. One try, bounded: with the database gone
/// the caller must not wait on it (the claim then expires with its lease). True when done.
pub(crate) async fn give_back_landed(store: &dyn SagaStore, id: &str, epoch: i64) -> bool {
    match tokio::time::timeout(std::time::Duration::from_secs(1), store.release(id, epoch)).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(saga_id = %id, error = %e, "releasing a creation that may have landed failed; its claim will expire");
            false
        }
        Err(_) => {
            tracing::warn!(saga_id = %id, "releasing a creation that may have landed took over 1 s; its claim will expire");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_chains_wait_longer_each_time_in_a_row_up_to_a_bound() {
        let refused = |n: u32| Staged { refused_in_a_row: n, ..Staged::default() };
        let pauses: Vec<u128> = (1..=10).map(|n| refused(n).stale_read_pause(0.0).as_millis()).collect();
        assert_eq!(pauses, [0, 5, 10, 20, 40, 80, 160, 200, 200, 200]);
        // The jitter stretches a pause by up to half, never shortens it.
        let staged = refused(4);
        assert_eq!(staged.stale_read_pause(1.0).as_millis(), 30);
        let staged = refused(u32::MAX);
        assert_eq!(staged.stale_read_pause(7.0).as_millis(), 300, "the bound, and jitter clamped");
    }
}
