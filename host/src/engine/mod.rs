//! The saga state machine: a pure function from (definition, state, event, now) to the next
//! state and the one event it publishes.
//!
//! Architecture invariant: this module does no IO, reads no clock and draws no random numbers.
//! Time and jitter arrive in the arguments, so every transition can be tested from data and
//! replayed exactly. The driver owns everything else: plugin calls, commits and timers.
//!
//! The two halves of [`next_action`] and [`apply`] form a loop: the driver asks what is due,
//! performs it (a plugin call, or nothing), and feeds the result back as an [`Event`].

pub mod definition;

use serde::{Deserialize, Serialize};
use serde_json::json;

pub use definition::{PluginRef, RetryPolicy, SagaDefinition, StepDefinition};

/// Where the saga is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Running forward steps.
    Forward,
    /// Running compensations of completed steps, in reverse order.
    Compensating,
    /// Terminal: every step completed.
    Completed,
    /// Terminal: every completed step was compensated.
    Cancelled,
    /// Stuck: a compensation spent its budget. An operator must act.
    CompensationFailed,
}

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Completed | Phase::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Compensating => "compensating",
            Phase::Completed => "completed",
            Phase::Cancelled => "cancelled",
            Phase::CompensationFailed => "compensation_failed",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        Some(match s {
            "forward" => Phase::Forward,
            "compensating" => Phase::Compensating,
            "completed" => Phase::Completed,
            "cancelled" => Phase::Cancelled,
            "compensation_failed" => Phase::CompensationFailed,
            _ => return None,
        })
    }
}

/// The public status label of a saga: CREATED, the state label of the last completed step
/// (e.g. PAYMENT_CHARGED), COMPENSATING, COMPLETED, CANCELLED or COMPENSATION_FAILED.
/// Serialised as that label, exactly as the API, the events and the database show it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SagaStatus {
    Created,
    /// A forward step completed; its definition's `state` label.
    Reached(String),
    Compensating,
    Completed,
    Cancelled,
    CompensationFailed,
}

impl SagaStatus {
    pub fn as_str(&self) -> &str {
        match self {
            SagaStatus::Created => "CREATED",
            SagaStatus::Reached(label) => label,
            SagaStatus::Compensating => "COMPENSATING",
            SagaStatus::Completed => "COMPLETED",
            SagaStatus::Cancelled => "CANCELLED",
            SagaStatus::CompensationFailed => "COMPENSATION_FAILED",
        }
    }

    /// The status a label names. Step labels may not take the reserved names
    /// ([`definition::RESERVED_STATES`]), so every label parses to exactly one status.
    pub fn parse(label: &str) -> SagaStatus {
        match label {
            "CREATED" => SagaStatus::Created,
            "COMPENSATING" => SagaStatus::Compensating,
            "COMPLETED" => SagaStatus::Completed,
            "CANCELLED" => SagaStatus::Cancelled,
            "COMPENSATION_FAILED" => SagaStatus::CompensationFailed,
            other => SagaStatus::Reached(other.to_owned()),
        }
    }
}

impl std::fmt::Display for SagaStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for SagaStatus {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for SagaStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for SagaStatus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SagaStatus, D::Error> {
        Ok(SagaStatus::parse(&String::deserialize(d)?))
    }
}

/// Where one step is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not started.
    Pending,
    /// An execute attempt failed retryably; another is scheduled.
    Retrying,
    /// Execute returned `wait`; parked until a delay passes or a signal arrives.
    Waiting,
    /// Execute returned `done`.
    Succeeded,
    /// Execute was rejected (or gave up); this step is not compensated.
    Failed,
    /// A compensate attempt failed; another is scheduled.
    Compensating,
    /// Compensate succeeded.
    Compensated,
    /// Compensate spent its budget.
    CompensationFailed,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Retrying => "retrying",
            StepStatus::Waiting => "waiting",
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::Compensating => "compensating",
            StepStatus::Compensated => "compensated",
            StepStatus::CompensationFailed => "compensation_failed",
        }
    }

    pub fn parse(s: &str) -> Option<StepStatus> {
        Some(match s {
            "pending" => StepStatus::Pending,
            "retrying" => StepStatus::Retrying,
            "waiting" => StepStatus::Waiting,
            "succeeded" => StepStatus::Succeeded,
            "failed" => StepStatus::Failed,
            "compensating" => StepStatus::Compensating,
            "compensated" => StepStatus::Compensated,
            "compensation_failed" => StepStatus::CompensationFailed,
            _ => return None,
        })
    }

    /// Steps whose execute committed something, and so must be undone when compensating.
    fn needs_compensation(self) -> bool {
        matches!(
            self,
            StepStatus::Succeeded | StepStatus::Waiting | StepStatus::Compensating | StepStatus::CompensationFailed
        )
    }
}

impl StepState {
    /// May this step's execute have had effects? A `done` did; so did a `wait`, even if a later
    /// attempt of the same step failed or was rejected (its writes stay); so may a failed
    /// attempt that had sent requests out, and an attempt that may reach out and started but
    /// whose result never committed (a cancel took the saga over mid-call, or the host died):
    /// either way it is compensated.
    fn needs_compensation(&self) -> bool {
        self.status.needs_compensation()
            || ((self.waited || self.in_flight_until.is_some())
                && matches!(self.status, StepStatus::Pending | StepStatus::Retrying | StepStatus::Failed))
    }
}

/// The durable state of one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepState {
    pub status: StepStatus,
    /// Execute calls made so far (the plugin's `attempt` is this plus one).
    pub attempts: u32,
    /// Execute calls that failed (retryable error or trap): what the retry policy counts, so
    /// that a step polling with `wait` does not use up its retries.
    pub failures: u32,
    /// The step may have had effects although it never completed: it returned `wait` at least
    /// once (so it committed writes), or one of its failed attempts had sent requests out of
    /// the host (a timeout or a cut-off answer says nothing of whether the service applied
    /// them). Such a step is compensated when the saga compensates, with `null` for output.
    /// (Stored as `waited`, its first meaning.)
    pub waited: bool,
    /// An execute attempt that may send requests out of the host started
    /// ([`Event::Started`]) and its result has not committed: until this time (ms since the
    /// Unix epoch: the attempt's start, its timeout and [`CALL_GRACE_MS`]) it may still be
    /// sending them. Such a step is compensated if the saga compensates, and not before this
    /// time, so that the undo cannot overtake the request it undoes. Cleared by the attempt's
    /// result.
    pub in_flight_until: Option<i64>,
    /// Compensate attempts made in the current compensation round.
    pub compensate_attempts: u32,
    /// Execute's output JSON once `done`.
    pub output: Option<String>,
    /// Compensate's output JSON once compensated.
    pub compensate_output: Option<String>,
    pub last_error: Option<String>,
    /// The signal a waiting step waits for.
    pub wait_signal: Option<String>,
    /// A delivered signal payload, handed to the next execute attempt.
    pub signal_payload: Option<String>,
    /// Digest of the component that ran the last execute attempt.
    pub execute_digest: Option<String>,
    /// Digest of the component that ran the last compensate attempt.
    pub compensate_digest: Option<String>,
    /// When the first execute attempt started (ms since the Unix epoch); the deadline counts from here.
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub updated_at: Option<i64>,
}

impl StepState {
    pub fn pending() -> StepState {
        StepState {
            status: StepStatus::Pending,
            attempts: 0,
            failures: 0,
            waited: false,
            in_flight_until: None,
            compensate_attempts: 0,
            output: None,
            compensate_output: None,
            last_error: None,
            wait_signal: None,
            signal_payload: None,
            execute_digest: None,
            compensate_digest: None,
            started_at: None,
            finished_at: None,
            updated_at: None,
        }
    }
}

/// The durable state of one saga, as far as the engine cares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaState {
    /// The public status label.
    pub status: SagaStatus,
    pub phase: Phase,
    /// Why the saga compensates, once it does.
    pub reason: Option<String>,
    pub steps: Vec<StepState>,
    /// When the driver should next look at this saga; `None` when only an outside event
    /// (a signal, an operator) can move it.
    pub next_run_at: Option<i64>,
}

impl SagaState {
    /// A new saga: nothing done, first step due now.
    pub fn new(def: &SagaDefinition, now: i64) -> SagaState {
        SagaState {
            status: SagaStatus::Created,
            phase: Phase::Forward,
            reason: None,
            steps: def.steps.iter().map(|_| StepState::pending()).collect(),
            next_run_at: Some(now),
        }
    }
}

/// The result of an execute call, as the driver classified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecuteOutcome {
    Done(String),
    Wait {
        delay_ms: Option<u64>,
        signal: Option<String>,
    },
    Retryable(String),
    Rejected(String),
    /// The plugin trapped, timed out, ran out of memory or broke a host limit.
    Trapped(String),
}

/// The result of a compensate call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompensateOutcome {
    Done(String),
    /// Any error or trap: compensation is retried within its budget whatever the cause.
    Failed(String),
}

/// Something that happened to a saga.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An execute attempt that may send requests out of the host (outbound HTTP) is about to
    /// start: recorded durably before the call, so that whatever happens to the call's result
    /// (a cancel takes the saga over, the host dies), the step counts as possibly applied.
    Started {
        step: usize,
        attempt: u32,
    },
    Executed {
        step: usize,
        attempt: u32,
        started_at: i64,
        digest: String,
        outcome: ExecuteOutcome,
        jitter: f64,
        /// The attempt sent requests out of the host (outbound HTTP): if it failed, whatever
        /// it asked for may have been applied.
        reached_out: bool,
    },
    Compensated {
        step: usize,
        attempt: u32,
        digest: String,
        outcome: CompensateOutcome,
        jitter: f64,
    },
    /// Every forward step completed (-> COMPLETED) or every compensation did (-> CANCELLED).
    Finish,
    /// The current step's deadline passed.
    DeadlineExceeded {
        step: usize,
    },
    /// A client asked to cancel.
    Cancel {
        reason: String,
    },
    /// A named signal arrived for a waiting step.
    Signal {
        name: String,
        payload: String,
    },
    /// An operator asks to run the failed compensations again.
    RetryCompensation,
    /// An operator marks a stuck saga as handled by hand.
    Resolve {
        note: String,
    },
}

impl Event {
    /// The same attempt, failed for `reason` and with nothing to commit: what the driver
    /// records when the store refuses a plugin call's result for good (text a database cannot
    /// hold, a value too large), so that the refusal counts as a failed attempt instead of
    /// being retried forever. `None` for events that are not plugin calls.
    pub fn into_failure(self, reason: String) -> Option<Event> {
        match self {
            Event::Executed { step, attempt, started_at, digest, jitter, reached_out, .. } => Some(Event::Executed {
                step,
                attempt,
                started_at,
                digest,
                outcome: ExecuteOutcome::Trapped(reason),
                jitter,
                reached_out,
            }),
            Event::Compensated { step, attempt, digest, jitter, .. } => {
                Some(Event::Compensated { step, attempt, digest, outcome: CompensateOutcome::Failed(reason), jitter })
            }
            _ => None,
        }
    }
}

/// What the driver should do next for a saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing is due (terminal, waiting for a signal, or a timer in the future).
    Idle,
    Execute {
        step: usize,
        attempt: u32,
    },
    Compensate {
        step: usize,
        attempt: u32,
    },
    Finish,
    DeadlineExceeded {
        step: usize,
    },
}

/// The outbox event a transition publishes (the store adds id, seq and time).
#[derive(Debug, Clone, PartialEq)]
pub struct EventSpec {
    pub event_type: String,
    pub data: serde_json::Value,
}

/// The outcome of [`apply`]: the next state, which steps changed, and the one event to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub state: SagaState,
    pub changed_steps: Vec<usize>,
    pub event: EventSpec,
}

/// Why an event cannot be applied to a saga in its current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("the saga is {0}; it can no longer be cancelled")]
    NotCancellable(String),
    #[error("no step of this saga is waiting for signal '{0}'")]
    NotWaitingForSignal(String),
    #[error("step '{0}' is past its deadline: it is rejected and the saga compensates")]
    DeadlinePassed(String),
    #[error("only a saga in COMPENSATION_FAILED can be retried or resolved; this one is {0}")]
    NotStuck(String),
    #[error("the event does not match the saga's current action (stale or duplicate)")]
    Stale,
}

/// Whether the step's deadline rejects it at `now`: the deadline has passed, and no signal
/// delivered before it waits to be acted on (what committed first wins).
fn deadline_rejects(def: &StepDefinition, step: &StepState, now: i64) -> bool {
    step.signal_payload.is_none() && past_deadline(def, step, now)
}

fn past_deadline(def: &StepDefinition, step: &StepState, now: i64) -> bool {
    deadline_at(def, step).is_some_and(|d| now >= d)
}

fn deadline_at(def: &StepDefinition, step: &StepState) -> Option<i64> {
    let started = step.started_at?;
    let deadline = def.deadline_ms?;
    Some(started.saturating_add(i64::try_from(deadline).unwrap_or(i64::MAX)))
}

/// The step that forward execution is at: the first that has not succeeded.
fn current_forward_step(state: &SagaState) -> Option<usize> {
    state.steps.iter().position(|s| s.status != StepStatus::Succeeded)
}

/// The step compensation is at: the last one that committed something and is not undone.
fn current_compensation_step(state: &SagaState) -> Option<usize> {
    state.steps.iter().rposition(StepState::needs_compensation)
}

/// What is due for this saga at `now`.
pub fn next_action(def: &SagaDefinition, state: &SagaState, now: i64) -> Action {
    match state.phase {
        Phase::Completed | Phase::Cancelled | Phase::CompensationFailed => Action::Idle,
        Phase::Forward => {
            let Some(i) = current_forward_step(state) else {
                return Action::Finish;
            };
            let step = &state.steps[i];
            if deadline_rejects(&def.steps[i], step, now) {
                return Action::DeadlineExceeded { step: i };
            }
            if state.next_run_at.is_none_or(|t| t > now) {
                return Action::Idle;
            }
            Action::Execute { step: i, attempt: step.attempts + 1 }
        }
        Phase::Compensating => {
            if state.next_run_at.is_none_or(|t| t > now) {
                return Action::Idle;
            }
            match current_compensation_step(state) {
                Some(i) => Action::Compensate { step: i, attempt: state.steps[i].compensate_attempts + 1 },
                None => Action::Finish,
            }
        }
    }
}

/// How long after an attempt's timeout a compensation of a step whose attempt was in flight
/// still waits: for the commit that recorded the start (the driver gives it at most half of
/// this), for a request the attempt sent to reach the service and be applied there, and for
/// the clock difference between replicas.
pub const CALL_GRACE_MS: i64 = 1_000;

/// When compensation may go on: now, unless the step it is at has an attempt in flight that
/// may still be sending requests ([`StepState::in_flight_until`]); then once that has ended.
fn compensation_due(state: &SagaState, now: i64) -> i64 {
    current_compensation_step(state).and_then(|i| state.steps[i].in_flight_until).map_or(now, |until| until.max(now))
}

/// The shortest delay a `wait` gets: a step that asks for less (polling with `delay-ms: 0`)
/// runs again after this long, not at once.
pub const MIN_WAIT_DELAY_MS: u64 = 100;

/// Whether a step may wait for a signal of this name: `POST .../signals/{name}` takes 1 to 128
/// characters (not bytes) and no control characters, so a wait for any other name could never
/// end. One rule for the route and for a plugin's `wait`.
pub fn is_signal_name(name: &str) -> bool {
    !name.is_empty() && name.chars().count() <= 128 && !name.chars().any(char::is_control)
}

/// The first event of every saga, published with its creation: `{Type}Created` with the
/// input, its sensitive fields redacted.
pub fn created(def: &SagaDefinition, input: &serde_json::Value) -> EventSpec {
    EventSpec { event_type: format!("{}Created", def.event_prefix()), data: json!({ "input": def.redact(input) }) }
}

fn start_compensating(def: &SagaDefinition, state: &mut SagaState, reason: String, now: i64) -> EventSpec {
    state.phase = Phase::Compensating;
    state.status = SagaStatus::Compensating;
    state.reason = Some(reason.clone());
    state.next_run_at = Some(compensation_due(state, now));
    EventSpec { event_type: format!("{}Compensating", def.event_prefix()), data: json!({ "reason": reason }) }
}

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Whether `attempt` of step `i` is the execute attempt due: forward, at that step, the next
/// attempt number.
fn is_next_attempt(state: &SagaState, i: usize, attempt: u32) -> bool {
    state.phase == Phase::Forward && current_forward_step(state) == Some(i) && state.steps[i].attempts + 1 == attempt
}

/// Applies one event. Pure: the same inputs always give the same transition.
pub fn apply(def: &SagaDefinition, state: &SagaState, event: Event, now: i64) -> Result<Transition, Error> {
    let mut next = state.clone();
    let mut changed = Vec::new();
    let event = match event {
        Event::Started { step: i, attempt } => {
            if !is_next_attempt(state, i, attempt) {
                return Err(Error::Stale);
            }
            let sdef = &def.steps[i];
            let step = &mut next.steps[i];
            changed.push(i);
            // An earlier start of this attempt never got its result committed (the host died,
            // or could not serve the call): it may have sent requests. The result of this
            // start will not say so, so remember it: the step stays compensable.
            step.waited |= step.in_flight_until.is_some();
            let until = now.saturating_add(ms(sdef.timeout_ms)).saturating_add(CALL_GRACE_MS);
            step.in_flight_until = Some(until);
            // The driver that recorded the start calls at once, whatever this says. Anyone
            // else (a replica taking the saga over from one that froze or died mid-call) runs
            // the attempt again only once this call is over: never two at once with one key.
            next.next_run_at = Some(until);
            // The step's deadline counts from its first attempt's start.
            step.started_at.get_or_insert(now);
            step.updated_at = Some(now);
            EventSpec {
                event_type: "StepStarted".to_owned(),
                data: json!({ "step": sdef.name, "attempt": attempt, "until": until }),
            }
        }
        Event::Executed { step: i, attempt, started_at, digest, outcome, jitter, reached_out } => {
            if !is_next_attempt(state, i, attempt) {
                return Err(Error::Stale);
            }
            let sdef = &def.steps[i];
            let step = &mut next.steps[i];
            changed.push(i);
            step.attempts = attempt;
            // The attempt's result is here: what it may have done out there is `reached_out`.
            step.in_flight_until = None;
            step.started_at.get_or_insert(started_at);
            step.execute_digest = Some(digest);
            // Consumed by this attempt, unless it fails and is retried (below): the retry is
            // the same attempt run again, and the sender will not send the signal twice.
            let signal = step.signal_payload.take();
            step.updated_at = Some(now);
            let deadline = deadline_at(sdef, step);
            let cap = |t: i64| deadline.map_or(t, |d| t.min(d));
            // A trap or a retryable error is retried until the attempts run out; then it
            // counts as a rejection, so the saga compensates rather than hang.
            if matches!(outcome, ExecuteOutcome::Retryable(_) | ExecuteOutcome::Trapped(_)) {
                step.failures += 1;
                // Its requests may have been applied: undo them if the saga compensates.
                step.waited |= reached_out;
            }
            let failures = step.failures;
            let outcome = match outcome {
                ExecuteOutcome::Retryable(e) | ExecuteOutcome::Trapped(e) if failures >= sdef.retry.max_attempts => {
                    ExecuteOutcome::Rejected(format!("gave up after {failures} failed attempts: {e}"))
                }
                other => other,
            };
            match outcome {
                ExecuteOutcome::Done(output) => {
                    step.status = StepStatus::Succeeded;
                    step.output = Some(output.clone());
                    step.last_error = None;
                    step.wait_signal = None;
                    step.finished_at = Some(now);
                    next.status = SagaStatus::Reached(sdef.state.clone());
                    next.next_run_at = Some(now);
                    let output: serde_json::Value = serde_json::from_str(&output).unwrap_or(serde_json::Value::Null);
                    EventSpec {
                        event_type: definition::pascal(&sdef.state),
                        data: json!({ "step": sdef.name, "attempt": attempt, "output": output }),
                    }
                }
                ExecuteOutcome::Wait { delay_ms, signal } => {
                    step.status = StepStatus::Waiting;
                    step.waited = true;
                    step.wait_signal = signal.clone();
                    // A plugin that polls with a zero or tiny delay would otherwise re-run in a
                    // tight loop, a commit and an event per pass, holding the writer.
                    let wake = delay_ms.map(|d| now.saturating_add(ms(d.max(MIN_WAIT_DELAY_MS))));
                    // Never before now: a wait that comes after the deadline (its call outlasted
                    // it) is due at once, for the deadline, not at a time already past.
                    next.next_run_at = match wake {
                        Some(t) => Some(cap(t)),
                        None => deadline,
                    }
                    .map(|t| t.max(now));
                    EventSpec {
                        event_type: "StepWaiting".to_owned(),
                        data: json!({ "step": sdef.name, "attempt": attempt, "signal": signal, "wake_at": wake }),
                    }
                }
                ExecuteOutcome::Retryable(e) | ExecuteOutcome::Trapped(e) => {
                    step.status = StepStatus::Retrying;
                    step.last_error = Some(e.clone());
                    let retry_at = now.saturating_add(ms(sdef.retry.backoff_ms(failures, jitter)));
                    // A retry is capped by the deadline, where the deadline rejects the step;
                    // but one that keeps its signal is not rejected by it (the signal came in
                    // time), so past the deadline it backs off like any retry, never at once.
                    // (A failure that comes after the deadline is due at once, for the deadline:
                    // its retry is not scheduled at a time already past.)
                    let at = match (&signal, deadline) {
                        (Some(_), Some(d)) if d <= now => retry_at,
                        _ => cap(retry_at).max(now),
                    };
                    step.signal_payload = signal;
                    next.next_run_at = Some(at);
                    EventSpec {
                        event_type: "StepRetryScheduled".to_owned(),
                        data: json!({ "step": sdef.name, "attempt": attempt, "error": e, "retry_at": at }),
                    }
                }
                ExecuteOutcome::Rejected(e) => {
                    step.status = StepStatus::Failed;
                    step.last_error = Some(e.clone());
                    step.wait_signal = None;
                    step.finished_at = Some(now);
                    start_compensating(def, &mut next, format!("{}: {e}", sdef.name), now)
                }
            }
        }
        Event::Compensated { step: i, attempt, digest, outcome, jitter } => {
            if state.phase != Phase::Compensating
                || current_compensation_step(state) != Some(i)
                || state.steps[i].compensate_attempts + 1 != attempt
            {
                return Err(Error::Stale);
            }
            let sdef = &def.steps[i];
            let step = &mut next.steps[i];
            changed.push(i);
            step.compensate_attempts = attempt;
            step.compensate_digest = Some(digest);
            step.updated_at = Some(now);
            match outcome {
                CompensateOutcome::Done(output) => {
                    step.status = StepStatus::Compensated;
                    step.compensate_output = Some(output.clone());
                    step.last_error = None;
                    step.wait_signal = None;
                    step.finished_at = Some(now);
                    next.next_run_at = Some(compensation_due(&next, now));
                    let output: serde_json::Value = serde_json::from_str(&output).unwrap_or(serde_json::Value::Null);
                    EventSpec {
                        event_type: "StepCompensated".to_owned(),
                        data: json!({ "step": sdef.name, "attempt": attempt, "output": output }),
                    }
                }
                CompensateOutcome::Failed(e) if attempt >= sdef.compensate_retry.max_attempts => {
                    step.status = StepStatus::CompensationFailed;
                    step.last_error = Some(e.clone());
                    next.phase = Phase::CompensationFailed;
                    next.status = SagaStatus::CompensationFailed;
                    next.next_run_at = None;
                    EventSpec {
                        event_type: format!("{}CompensationFailed", def.event_prefix()),
                        data: json!({ "step": sdef.name, "attempts": attempt, "error": e, "reason": next.reason }),
                    }
                }
                CompensateOutcome::Failed(e) => {
                    step.status = StepStatus::Compensating;
                    step.last_error = Some(e.clone());
                    let at = now.saturating_add(ms(sdef.compensate_retry.backoff_ms(attempt, jitter)));
                    next.next_run_at = Some(at);
                    EventSpec {
                        event_type: "StepCompensationRetryScheduled".to_owned(),
                        data: json!({ "step": sdef.name, "attempt": attempt, "error": e, "retry_at": at }),
                    }
                }
            }
        }
        Event::Finish => match state.phase {
            Phase::Forward if current_forward_step(state).is_none() => {
                next.phase = Phase::Completed;
                next.status = SagaStatus::Completed;
                next.next_run_at = None;
                EventSpec { event_type: format!("{}Completed", def.event_prefix()), data: json!({}) }
            }
            Phase::Compensating if current_compensation_step(state).is_none() => {
                next.phase = Phase::Cancelled;
                next.status = SagaStatus::Cancelled;
                next.next_run_at = None;
                EventSpec {
                    event_type: format!("{}Cancelled", def.event_prefix()),
                    data: json!({ "reason": next.reason }),
                }
            }
            _ => return Err(Error::Stale),
        },
        Event::DeadlineExceeded { step: i } => {
            let due = state.phase == Phase::Forward
                && current_forward_step(state) == Some(i)
                && deadline_rejects(&def.steps[i], &state.steps[i], now);
            if !due {
                return Err(Error::Stale);
            }
            let sdef = &def.steps[i];
            let step = &mut next.steps[i];
            changed.push(i);
            let msg = format!("deadline of {} ms passed", sdef.deadline_ms.unwrap_or_default());
            // A step that waited committed its writes (or may have had effects: `waited`), so
            // it stays compensable; one that only failed retryably within the host did nothing.
            if step.status != StepStatus::Waiting {
                step.status = StepStatus::Failed;
            }
            step.last_error = Some(msg.clone());
            step.updated_at = Some(now);
            start_compensating(def, &mut next, format!("{}: {msg}", sdef.name), now)
        }
        Event::Cancel { reason } => match state.phase {
            Phase::Forward => start_compensating(def, &mut next, reason, now),
            _ => return Err(Error::NotCancellable(state.status.to_string())),
        },
        Event::Signal { name, payload } => {
            let waiting = (state.phase == Phase::Forward).then(|| current_forward_step(state)).flatten().filter(|&i| {
                // A signal already delivered (and not yet consumed) is not delivered twice.
                let s = &state.steps[i];
                s.status == StepStatus::Waiting && s.wait_signal.as_deref() == Some(&name) && s.signal_payload.is_none()
            });
            let Some(i) = waiting else {
                return Err(Error::NotWaitingForSignal(name));
            };
            // Too late: the deadline wins, and the sender is told so rather than accepted and
            // then overruled.
            if past_deadline(&def.steps[i], &state.steps[i], now) {
                return Err(Error::DeadlinePassed(def.steps[i].name.clone()));
            }
            let step = &mut next.steps[i];
            changed.push(i);
            step.signal_payload = Some(payload);
            step.updated_at = Some(now);
            // An attempt of the step may be running (its wait's delay ran out and it polls the
            // service): it is fenced off by this event, but its requests may still be out. The
            // woken attempt runs once that one can no longer be sending, never beside it with
            // the same idempotency key.
            next.next_run_at = Some(step.in_flight_until.map_or(now, |until| until.max(now)));
            EventSpec {
                event_type: "SignalReceived".to_owned(),
                data: json!({ "step": def.steps[i].name, "signal": name }),
            }
        }
        Event::RetryCompensation => {
            if state.phase != Phase::CompensationFailed {
                return Err(Error::NotStuck(state.status.to_string()));
            }
            for (i, step) in next.steps.iter_mut().enumerate() {
                if step.status == StepStatus::CompensationFailed {
                    step.status = StepStatus::Compensating;
                    step.compensate_attempts = 0;
                    step.updated_at = Some(now);
                    changed.push(i);
                }
            }
            next.phase = Phase::Compensating;
            next.status = SagaStatus::Compensating;
            next.next_run_at = Some(compensation_due(&next, now));
            EventSpec { event_type: "CompensationRetried".to_owned(), data: json!({}) }
        }
        Event::Resolve { note } => {
            if state.phase != Phase::CompensationFailed {
                return Err(Error::NotStuck(state.status.to_string()));
            }
            next.phase = Phase::Cancelled;
            next.status = SagaStatus::Cancelled;
            next.next_run_at = None;
            EventSpec {
                event_type: format!("{}Resolved", def.event_prefix()),
                data: json!({ "note": note, "reason": next.reason }),
            }
        }
    };
    Ok(Transition { state: next, changed_steps: changed, event })
}

#[cfg(test)]
mod tests;
