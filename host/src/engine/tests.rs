//! The state machine tested from data, and with proptest against a simple model.

use super::*;
use proptest::prelude::*;

fn policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy { max_attempts, initial_backoff_ms: 100, max_backoff_ms: 1_000 }
}

fn plugin(name: &str) -> PluginRef {
    PluginRef { plugin: name.to_owned(), digest: format!("sha256:{name}") }
}

fn def_with(n: usize, retry: u32, comp_retry: u32) -> SagaDefinition {
    let names = ["inventory", "payment", "shipment", "notify", "audit", "extra"];
    let states = ["INVENTORY_RESERVED", "PAYMENT_CHARGED", "SHIPMENT_CREATED", "NOTIFIED", "AUDITED", "EXTRA_DONE"];
    SagaDefinition {
        sensitive: vec![],
        saga_type: "order".into(),
        steps: (0..n)
            .map(|i| StepDefinition {
                name: names[i].into(),
                state: states[i].into(),
                execute: plugin(names[i]),
                compensate: plugin(names[i]),
                retry: policy(retry),
                compensate_retry: policy(comp_retry),
                timeout_ms: 1_000,
                deadline_ms: None,
                config: Default::default(),
            })
            .collect(),
    }
}

fn order_def() -> SagaDefinition {
    def_with(3, 3, 3)
}

/// Feeds an event and returns the transition, panicking on error.
fn step(def: &SagaDefinition, s: &SagaState, e: Event, now: i64) -> Transition {
    apply(def, s, e, now).expect("event applies")
}

fn executed(i: usize, attempt: u32, outcome: ExecuteOutcome) -> Event {
    Event::Executed {
        step: i,
        attempt,
        started_at: 0,
        digest: "sha256:x".into(),
        outcome,
        jitter: 0.0,
        reached_out: false,
    }
}

fn compensated(i: usize, attempt: u32, outcome: CompensateOutcome) -> Event {
    Event::Compensated { step: i, attempt, digest: "sha256:y".into(), outcome, jitter: 0.0 }
}

fn done() -> ExecuteOutcome {
    ExecuteOutcome::Done(r#"{"ok":true}"#.into())
}

#[test]
fn happy_path_walks_every_state_label_then_completes() {
    let def = order_def();
    let mut s = SagaState::new(&def, 0);
    assert_eq!(s.status, "CREATED");
    let mut types = vec![];
    for i in 0..3 {
        assert_eq!(next_action(&def, &s, 0), Action::Execute { step: i, attempt: 1 });
        let t = step(&def, &s, executed(i, 1, done()), 0);
        assert_eq!(t.changed_steps, vec![i]);
        types.push(t.event.event_type.clone());
        s = t.state;
        assert_eq!(s.status, SagaStatus::Reached(def.steps[i].state.clone()));
    }
    assert_eq!(next_action(&def, &s, 0), Action::Finish);
    let t = step(&def, &s, Event::Finish, 0);
    types.push(t.event.event_type);
    assert_eq!(t.state.status, "COMPLETED");
    assert_eq!(t.state.next_run_at, None);
    assert_eq!(next_action(&def, &t.state, i64::MAX), Action::Idle);
    assert_eq!(types, ["InventoryReserved", "PaymentCharged", "ShipmentCreated", "OrderCompleted"]);
}

#[test]
fn rejection_compensates_completed_steps_in_reverse_then_cancels() {
    let def = order_def();
    let mut s = SagaState::new(&def, 0);
    s = step(&def, &s, executed(0, 1, done()), 0).state;
    s = step(&def, &s, executed(1, 1, done()), 0).state;
    let t = step(&def, &s, executed(2, 1, ExecuteOutcome::Rejected("no carrier for XX".into())), 5);
    assert_eq!(t.state.status, "COMPENSATING");
    assert_eq!(t.state.reason.as_deref(), Some("shipment: no carrier for XX"));
    assert_eq!(t.event.event_type, "OrderCompensating");
    s = t.state;
    // The rejected step itself is not compensated: payment first, then inventory.
    assert_eq!(next_action(&def, &s, 5), Action::Compensate { step: 1, attempt: 1 });
    s = step(&def, &s, compensated(1, 1, CompensateOutcome::Done("{}".into())), 5).state;
    assert_eq!(next_action(&def, &s, 5), Action::Compensate { step: 0, attempt: 1 });
    s = step(&def, &s, compensated(0, 1, CompensateOutcome::Done("{}".into())), 5).state;
    assert_eq!(next_action(&def, &s, 5), Action::Finish);
    let t = step(&def, &s, Event::Finish, 5);
    assert_eq!(t.state.status, "CANCELLED");
    assert_eq!(t.event.event_type, "OrderCancelled");
    let statuses: Vec<_> = t.state.steps.iter().map(|s| s.status).collect();
    assert_eq!(statuses, [StepStatus::Compensated, StepStatus::Compensated, StepStatus::Failed]);
}

#[test]
fn rejection_at_first_step_compensates_nothing() {
    let def = order_def();
    let s = SagaState::new(&def, 0);
    let s = step(&def, &s, executed(0, 1, ExecuteOutcome::Rejected("out of stock".into())), 0).state;
    assert_eq!(next_action(&def, &s, 0), Action::Finish);
    assert_eq!(step(&def, &s, Event::Finish, 0).state.status, "CANCELLED");
}

#[test]
fn retryable_errors_back_off_then_give_up_as_rejection() {
    let def = order_def(); // 3 attempts
    let mut s = SagaState::new(&def, 0);
    let t = step(&def, &s, executed(0, 1, ExecuteOutcome::Retryable("flaky".into())), 1_000);
    assert_eq!(t.event.event_type, "StepRetryScheduled");
    assert_eq!(t.state.steps[0].status, StepStatus::Retrying);
    assert_eq!(t.state.next_run_at, Some(1_050)); // 100 ms base, equal jitter at 0
    s = t.state;
    assert_eq!(next_action(&def, &s, 1_049), Action::Idle);
    assert_eq!(next_action(&def, &s, 1_050), Action::Execute { step: 0, attempt: 2 });
    s = step(&def, &s, executed(0, 2, ExecuteOutcome::Trapped("wasm trap: unreachable".into())), 2_000).state;
    assert_eq!(s.next_run_at, Some(2_100));
    let t = step(&def, &s, executed(0, 3, ExecuteOutcome::Trapped("wasm trap: unreachable".into())), 3_000);
    assert_eq!(t.state.status, "COMPENSATING");
    assert_eq!(t.state.reason.as_deref(), Some("inventory: gave up after 3 failed attempts: wasm trap: unreachable"));
    assert_eq!(t.state.steps[0].status, StepStatus::Failed);
}

#[test]
fn flaky_step_succeeds_on_third_attempt() {
    let def = order_def();
    let mut s = SagaState::new(&def, 0);
    s = step(&def, &s, executed(0, 1, ExecuteOutcome::Retryable("x".into())), 0).state;
    s = step(&def, &s, executed(0, 2, ExecuteOutcome::Retryable("x".into())), 0).state;
    s = step(&def, &s, executed(0, 3, done()), 0).state;
    assert_eq!(s.status, "INVENTORY_RESERVED");
    assert_eq!(s.steps[0].attempts, 3);
    assert_eq!(s.steps[0].last_error, None);
}

#[test]
fn compensation_budget_spent_is_compensation_failed_and_operator_can_retry() {
    let def = order_def();
    let mut s = SagaState::new(&def, 0);
    s = step(&def, &s, executed(0, 1, done()), 0).state;
    s = step(&def, &s, executed(1, 1, ExecuteOutcome::Rejected("card declined".into())), 0).state;
    for attempt in 1..=3 {
        assert_eq!(next_action(&def, &s, i64::MAX - 1), Action::Compensate { step: 0, attempt });
        s = step(&def, &s, compensated(0, attempt, CompensateOutcome::Failed("boom".into())), 0).state;
    }
    assert_eq!(s.status, "COMPENSATION_FAILED");
    assert_eq!(s.phase, Phase::CompensationFailed);
    assert_eq!(s.steps[0].status, StepStatus::CompensationFailed);
    assert_eq!(s.next_run_at, None);
    assert_eq!(next_action(&def, &s, i64::MAX - 1), Action::Idle);
    // Only a stuck saga can be retried; a retry restarts the budget.
    let t = step(&def, &s, Event::RetryCompensation, 10);
    assert_eq!(t.state.status, "COMPENSATING");
    assert_eq!(next_action(&def, &t.state, 10), Action::Compensate { step: 0, attempt: 1 });
    let s2 = step(&def, &t.state, compensated(0, 1, CompensateOutcome::Done("{}".into())), 10).state;
    assert_eq!(step(&def, &s2, Event::Finish, 10).state.status, "CANCELLED");
    assert_eq!(apply(&def, &s2, Event::RetryCompensation, 0), Err(Error::NotStuck("COMPENSATING".into())));
}

#[test]
fn resolve_marks_a_stuck_saga_cancelled() {
    let def = def_with(2, 1, 1);
    let mut s = SagaState::new(&def, 0);
    s = step(&def, &s, executed(0, 1, done()), 0).state;
    s = step(&def, &s, executed(1, 1, ExecuteOutcome::Rejected("no".into())), 0).state;
    s = step(&def, &s, compensated(0, 1, CompensateOutcome::Failed("boom".into())), 0).state;
    let t = step(&def, &s, Event::Resolve { note: "refunded by hand".into() }, 0);
    assert_eq!(t.state.status, "CANCELLED");
    assert_eq!(t.event.event_type, "OrderResolved");
}

#[test]
fn stale_and_duplicate_events_are_refused() {
    let def = order_def();
    let s = SagaState::new(&def, 0);
    assert_eq!(apply(&def, &s, executed(1, 1, done()), 0), Err(Error::Stale));
    assert_eq!(apply(&def, &s, executed(0, 2, done()), 0), Err(Error::Stale));
    assert_eq!(apply(&def, &s, Event::Finish, 0), Err(Error::Stale));
    let s = step(&def, &s, executed(0, 1, done()), 0).state;
    assert_eq!(apply(&def, &s, executed(0, 1, done()), 0), Err(Error::Stale));
    assert_eq!(apply(&def, &s, compensated(0, 1, CompensateOutcome::Done("{}".into())), 0), Err(Error::Stale));
}

#[test]
fn wait_for_signal_then_resume_with_payload() {
    let def = order_def();
    let mut s = SagaState::new(&def, 0);
    s = step(&def, &s, executed(0, 1, done()), 0).state;
    let wait = ExecuteOutcome::Wait { delay_ms: None, signal: Some("payment-confirmed".into()) };
    let t = step(&def, &s, executed(1, 1, wait), 0);
    assert_eq!(t.event.event_type, "StepWaiting");
    s = t.state;
    assert_eq!(s.steps[1].status, StepStatus::Waiting);
    assert_eq!(s.next_run_at, None);
    assert_eq!(next_action(&def, &s, i64::MAX - 1), Action::Idle);
    assert_eq!(
        apply(&def, &s, Event::Signal { name: "other".into(), payload: "{}".into() }, 0),
        Err(Error::NotWaitingForSignal("other".into()))
    );
    s = step(&def, &s, Event::Signal { name: "payment-confirmed".into(), payload: r#"{"ok":1}"#.into() }, 7).state;
    assert_eq!(s.steps[1].signal_payload.as_deref(), Some(r#"{"ok":1}"#));
    // A repeated signal before the step consumed the first is refused, not delivered twice.
    assert_eq!(
        apply(&def, &s, Event::Signal { name: "payment-confirmed".into(), payload: "{}".into() }, 7),
        Err(Error::NotWaitingForSignal("payment-confirmed".into()))
    );
    assert_eq!(next_action(&def, &s, 7), Action::Execute { step: 1, attempt: 2 });
    s = step(&def, &s, executed(1, 2, done()), 8).state;
    assert_eq!(s.steps[1].signal_payload, None);
    assert_eq!(s.status, "PAYMENT_CHARGED");
}

#[test]
fn the_attempt_a_signal_woke_keeps_the_signal_when_it_is_retried() {
    let mut def = order_def();
    def.steps[1].deadline_ms = Some(10_000);
    let mut s = SagaState::new(&def, 0);
    s = step(&def, &s, executed(0, 1, done()), 0).state;
    let wait = ExecuteOutcome::Wait { delay_ms: None, signal: Some("payment-confirmed".into()) };
    s = step(&def, &s, executed(1, 1, wait), 0).state;
    s = step(&def, &s, Event::Signal { name: "payment-confirmed".into(), payload: r#"{"ok":1}"#.into() }, 7).state;
    // The woken attempt fails (the service answered 503): its retry is woken by the same
    // signal, which its sender will not send again.
    s = step(&def, &s, executed(1, 2, ExecuteOutcome::Retryable("503".into())), 8).state;
    assert_eq!((s.steps[1].status, s.steps[1].signal_payload.as_deref()), (StepStatus::Retrying, Some(r#"{"ok":1}"#)));
    assert_eq!(
        apply(&def, &s, Event::Signal { name: "payment-confirmed".into(), payload: "{}".into() }, 9),
        Err(Error::NotWaitingForSignal("payment-confirmed".into())),
        "delivered once"
    );
    let retry_at = s.next_run_at.unwrap();
    assert_eq!(next_action(&def, &s, retry_at), Action::Execute { step: 1, attempt: 3 });
    let charged = step(&def, &s, executed(1, 3, done()), retry_at).state;
    assert_eq!((charged.steps[1].signal_payload.as_deref(), charged.status.as_str()), (None, "PAYMENT_CHARGED"));
    // Past the step's deadline (the signal came in time, so the deadline does not reject the
    // step), a retry still backs off: never a burst of calls to a failing service.
    let deadline = s.steps[1].started_at.unwrap() + def.steps[1].deadline_ms.unwrap() as i64;
    let late = step(&def, &s, executed(1, 3, ExecuteOutcome::Retryable("503".into())), deadline + 5).state;
    assert_eq!(late.steps[1].status, StepStatus::Retrying);
    assert!(late.next_run_at.unwrap() > deadline + 5, "a retry due at once: {:?}", late.next_run_at);
    assert_eq!(next_action(&def, &late, deadline + 5), Action::Idle);
}

#[test]
fn a_signal_for_a_step_whose_attempt_is_in_flight_wakes_it_once_that_attempt_is_over() {
    let def = order_def(); // timeout 1,000 ms
    let mut s = SagaState::new(&def, 0);
    s = step(&def, &s, executed(0, 1, done()), 0).state;
    // Payment polls: wait 1 s or for the signal; at 1,000 its poll starts (and may reach out).
    let wait = ExecuteOutcome::Wait { delay_ms: Some(1_000), signal: Some("payment-confirmed".into()) };
    s = step(&def, &s, executed(1, 1, wait), 0).state;
    s = step(&def, &s, Event::Started { step: 1, attempt: 2 }, 1_000).state;
    let until = s.steps[1].in_flight_until.unwrap();
    // The webhook's signal arrives mid-poll: the woken attempt runs once the poll is over,
    // never beside it with the same idempotency key.
    s = step(&def, &s, Event::Signal { name: "payment-confirmed".into(), payload: "{}".into() }, 1_100).state;
    assert_eq!(s.next_run_at, Some(until));
    assert_eq!(next_action(&def, &s, 1_100), Action::Idle);
    assert_eq!(next_action(&def, &s, until), Action::Execute { step: 1, attempt: 2 });
}

#[test]
fn a_start_whose_result_never_came_leaves_the_step_compensable() {
    let def = order_def();
    let mut s = SagaState::new(&def, 0);
    s = step(&def, &s, executed(0, 1, done()), 0).state;
    // Attempt 1 of payment starts and may charge; its result never commits (the host could not
    // serve the call after it had sent its request). It starts again and, this time, fails
    // without reaching out, for good.
    s = step(&def, &s, Event::Started { step: 1, attempt: 1 }, 100).state;
    s = step(&def, &s, Event::Started { step: 1, attempt: 1 }, 3_000).state;
    let rejected = ExecuteOutcome::Rejected("the service is gone".into());
    // `executed` reports `reached_out: false`.
    s = step(&def, &s, executed(1, 1, rejected), 3_100).state;
    // The first start's charge may stand: payment is refunded before inventory is released.
    assert_eq!(next_action(&def, &s, 3_100), Action::Compensate { step: 1, attempt: 1 });
}

#[test]
fn deadline_rejects_a_waiting_step_and_compensates_it() {
    let mut def = order_def();
    def.steps[1].deadline_ms = Some(900_000);
    let mut s = SagaState::new(&def, 0);
    s = step(&def, &s, executed(0, 1, done()), 0).state;
    let wait = ExecuteOutcome::Wait { delay_ms: None, signal: Some("payment-confirmed".into()) };
    s = step(
        &def,
        &s,
        Event::Executed {
            step: 1,
            attempt: 1,
            started_at: 100,
            digest: "d".into(),
            outcome: wait,
            jitter: 0.0,
            reached_out: false,
        },
        100,
    )
    .state;
    // Waiting for a signal alone still wakes at the deadline.
    assert_eq!(s.next_run_at, Some(900_100));
    assert_eq!(next_action(&def, &s, 900_099), Action::Idle);
    assert_eq!(next_action(&def, &s, 900_100), Action::DeadlineExceeded { step: 1 });
    s = step(&def, &s, Event::DeadlineExceeded { step: 1 }, 900_100).state;
    assert_eq!(s.reason.as_deref(), Some("payment: deadline of 900000 ms passed"));
    // The waiting step committed its writes, so it is compensated (with output null), then inventory.
    assert_eq!(next_action(&def, &s, 900_100), Action::Compensate { step: 1, attempt: 1 });
}

#[test]
fn a_signal_before_the_deadline_wins_even_if_its_run_comes_after_and_a_late_one_is_refused() {
    let mut def = order_def();
    def.steps[1].deadline_ms = Some(1_000);
    let mut s = SagaState::new(&def, 0);
    s = step(&def, &s, executed(0, 1, done()), 0).state;
    let wait = ExecuteOutcome::Wait { delay_ms: None, signal: Some("payment-confirmed".into()) };
    let waiting = step(&def, &s, executed(1, 1, wait), 0).state; // started at 0: deadline 1,000
    let confirm = || Event::Signal { name: "payment-confirmed".into(), payload: "{}".into() };
    // Accepted at 999; the step's run comes after the deadline (a busy host): the signal wins.
    let signalled = step(&def, &waiting, confirm(), 999).state;
    assert_eq!(next_action(&def, &signalled, 1_500), Action::Execute { step: 1, attempt: 2 });
    assert_eq!(apply(&def, &signalled, Event::DeadlineExceeded { step: 1 }, 1_500).err(), Some(Error::Stale));
    let done_late = step(&def, &signalled, executed(1, 2, done()), 1_500).state;
    assert_eq!(done_late.status, "PAYMENT_CHARGED");
    // Had that run asked to wait again, the deadline would apply at once.
    let wait = ExecuteOutcome::Wait { delay_ms: None, signal: Some("payment-confirmed".into()) };
    let again = step(&def, &signalled, executed(1, 2, wait), 1_500).state;
    assert_eq!(next_action(&def, &again, 1_500), Action::DeadlineExceeded { step: 1 });
    // A signal at the deadline is refused, and says why: nothing was accepted.
    assert_eq!(apply(&def, &waiting, confirm(), 1_000).err(), Some(Error::DeadlinePassed("payment".into())));
}

#[test]
fn waiting_does_not_use_up_retries_and_a_step_that_waited_is_compensated_even_after_failing() {
    let def = order_def(); // 3 attempts
    let mut s = SagaState::new(&def, 0);
    s = step(&def, &s, executed(0, 1, done()), 0).state;
    let poll = || ExecuteOutcome::Wait { delay_ms: Some(10), signal: None };
    for attempt in 1..=4 {
        s = step(&def, &s, executed(1, attempt, poll()), 0).state;
    }
    // Four waits, then a retryable error: the first failure, not the fifth attempt.
    s = step(&def, &s, executed(1, 5, ExecuteOutcome::Retryable("busy".into())), 0).state;
    assert_eq!(s.steps[1].status, StepStatus::Retrying);
    assert_eq!(s.steps[1].failures, 1);
    s = step(&def, &s, executed(1, 6, ExecuteOutcome::Rejected("no".into())), 0).state;
    // It waited (committed writes), so it is compensated before inventory.
    assert_eq!(next_action(&def, &s, 0), Action::Compensate { step: 1, attempt: 1 });
    s = step(&def, &s, compensated(1, 1, CompensateOutcome::Done("{}".into())), 0).state;
    assert_eq!(next_action(&def, &s, 0), Action::Compensate { step: 0, attempt: 1 });
}

#[test]
fn a_step_whose_failed_attempt_reached_out_is_compensated_after_giving_up_and_one_that_did_not_is_not() {
    let def = order_def(); // 3 attempts
    let failed_out = |attempt| match executed(1, attempt, ExecuteOutcome::Trapped("timed out after 2000 ms".into())) {
        Event::Executed { step, attempt, started_at, digest, outcome, jitter, .. } => {
            Event::Executed { step, attempt, started_at, digest, outcome, jitter, reached_out: true }
        }
        other => other,
    };
    let mut s = SagaState::new(&def, 0);
    s = step(&def, &s, executed(0, 1, done()), 0).state;
    // A retryable failure within the host, then one after requests went out, then a give-up.
    s = step(&def, &s, executed(1, 1, ExecuteOutcome::Retryable("busy".into())), 0).state;
    assert!(!s.steps[1].waited, "nothing left the host yet");
    s = step(&def, &s, failed_out(2), 0).state;
    s = step(&def, &s, failed_out(3), 0).state;
    assert_eq!(s.steps[1].status, StepStatus::Failed);
    // The service may have applied payment's request: it is undone (output null) before inventory.
    assert_eq!(next_action(&def, &s, 0), Action::Compensate { step: 1, attempt: 1 });
    s = step(&def, &s, compensated(1, 1, CompensateOutcome::Done("{}".into())), 0).state;
    assert_eq!(next_action(&def, &s, 0), Action::Compensate { step: 0, attempt: 1 });

    // The same failures without requests out of the host: only inventory is undone.
    let mut s = SagaState::new(&def, 0);
    s = step(&def, &s, executed(0, 1, done()), 0).state;
    for attempt in 1..=3 {
        s = step(&def, &s, executed(1, attempt, ExecuteOutcome::Trapped("t".into())), 0).state;
    }
    assert_eq!(next_action(&def, &s, 0), Action::Compensate { step: 0, attempt: 1 });
}

#[test]
fn retry_backoff_is_capped_by_the_deadline() {
    let mut def = order_def();
    def.steps[0].deadline_ms = Some(30);
    let s = SagaState::new(&def, 0);
    let t = step(&def, &s, executed(0, 1, ExecuteOutcome::Retryable("x".into())), 10);
    assert_eq!(t.state.next_run_at, Some(30));
}

/// A result that comes after the step's deadline (its call outlasted it) schedules nothing in
/// the past: the retry or the wake-up is due at once, and what is due then is the deadline.
#[test]
fn a_result_after_the_deadline_schedules_nothing_in_the_past() {
    let mut def = order_def();
    def.steps[0].deadline_ms = Some(30);
    let s = SagaState::new(&def, 0);
    let started = step(&def, &s, executed(0, 1, ExecuteOutcome::Retryable("x".into())), 10).state;
    for late in [
        ExecuteOutcome::Retryable("slow".into()),
        ExecuteOutcome::Trapped("timed out".into()),
        ExecuteOutcome::Wait { delay_ms: Some(5_000), signal: None },
        ExecuteOutcome::Wait { delay_ms: None, signal: Some("go".into()) },
    ] {
        let t = step(&def, &started, executed(0, 2, late.clone()), 1_000);
        assert_eq!(t.state.next_run_at, Some(1_000), "{late:?}");
        if let Some(at) = t.event.data.get("retry_at") {
            assert_eq!(at, 1_000, "{late:?}: a retry announced in the past");
        }
        assert_eq!(next_action(&def, &t.state, 1_000), Action::DeadlineExceeded { step: 0 }, "{late:?}");
    }
}

#[test]
fn cancel_compensates_from_forward_and_is_refused_when_terminal() {
    let def = order_def();
    let mut s = SagaState::new(&def, 0);
    s = step(&def, &s, executed(0, 1, done()), 0).state;
    let t = step(&def, &s, Event::Cancel { reason: "cancelled by client".into() }, 0);
    assert_eq!(t.state.status, "COMPENSATING");
    assert_eq!(next_action(&def, &t.state, 0), Action::Compensate { step: 0, attempt: 1 });
    let mut c = SagaState::new(&def, 0);
    for i in 0..3 {
        c = step(&def, &c, executed(i, 1, done()), 0).state;
    }
    c = step(&def, &c, Event::Finish, 0).state;
    assert_eq!(
        apply(&def, &c, Event::Cancel { reason: "x".into() }, 0),
        Err(Error::NotCancellable("COMPLETED".into()))
    );
}

#[test]
fn a_cancel_while_an_outbound_attempt_is_in_flight_undoes_it_once_the_call_has_ended() {
    let def = order_def(); // timeout 1,000 ms
    let mut s = SagaState::new(&def, 0);
    s = step(&def, &s, executed(0, 1, done()), 0).state;
    // Payment may reach out: its start is recorded before it calls, at 100.
    let t = step(&def, &s, Event::Started { step: 1, attempt: 1 }, 100);
    let until = 100 + 1_000 + CALL_GRACE_MS;
    assert_eq!(t.event.event_type, "StepStarted");
    assert_eq!(t.event.data["until"], until);
    assert_eq!((t.state.steps[1].in_flight_until, t.state.steps[1].started_at), (Some(until), Some(100)));
    assert_eq!(t.state.steps[1].status, StepStatus::Pending);
    // Run again (by a replica that took the saga over from one that froze or died mid-call)
    // only once the call is over: never a second run beside it with the same idempotency key.
    assert_eq!(t.state.next_run_at, Some(until));
    assert_eq!(next_action(&def, &t.state, until - 1), Action::Idle);
    assert_eq!(next_action(&def, &t.state, until), Action::Execute { step: 1, attempt: 1 }, "the same attempt");
    // A cancel takes the saga over mid-call (the call's result will be fenced off): payment
    // is undone, but only once its call can no longer be sending anything; then inventory.
    let c = step(&def, &t.state, Event::Cancel { reason: "cancelled by client".into() }, 150).state;
    assert_eq!(c.next_run_at, Some(until));
    assert_eq!(next_action(&def, &c, until - 1), Action::Idle);
    assert_eq!(next_action(&def, &c, until), Action::Compensate { step: 1, attempt: 1 });
    let c = step(&def, &c, compensated(1, 1, CompensateOutcome::Done("{}".into())), until).state;
    assert_eq!(
        (c.next_run_at, next_action(&def, &c, until)),
        (Some(until), Action::Compensate { step: 0, attempt: 1 })
    );
    // The host died instead, and the deadline passed before the step ran again: also undone.
    let mut d = def.clone();
    d.steps[1].deadline_ms = Some(10);
    let x = step(&d, &t.state, Event::DeadlineExceeded { step: 1 }, 5_000).state;
    assert_eq!(next_action(&d, &x, 5_000), Action::Compensate { step: 1, attempt: 1 });
    // The attempt's result clears the mark: a definite refusal leaves nothing to undo.
    let r = step(&def, &t.state, executed(1, 1, ExecuteOutcome::Rejected("card declined".into())), 200).state;
    assert_eq!(r.steps[1].in_flight_until, None);
    assert_eq!(next_action(&def, &r, 200), Action::Compensate { step: 0, attempt: 1 });
    // A start for another attempt or step is stale.
    assert_eq!(apply(&def, &s, Event::Started { step: 1, attempt: 2 }, 0).err(), Some(Error::Stale));
    assert_eq!(apply(&def, &s, Event::Started { step: 2, attempt: 1 }, 0).err(), Some(Error::Stale));
}

// ---------------------------------------------------------------------------------------
// Property: driving the engine with arbitrary plugin outcomes agrees with a simple model.

#[derive(Debug, Clone, Copy)]
enum Exec {
    Done,
    Retry,
    Trap,
    Reject,
}

fn exec_strategy() -> impl Strategy<Value = Exec> {
    prop_oneof![4 => Just(Exec::Done), 2 => Just(Exec::Retry), 1 => Just(Exec::Trap), 1 => Just(Exec::Reject)]
}

/// What the model says the saga ends as.
#[derive(Debug, PartialEq)]
struct Expected {
    phase: Phase,
    statuses: Vec<StepStatus>,
    compensation_order: Vec<usize>,
}

fn model(n: usize, max: u32, comp_max: u32, execs: &[Exec], comps: &[bool]) -> Expected {
    let mut execs = execs.iter().cycle();
    let mut comps = comps.iter().cycle();
    let mut statuses = vec![StepStatus::Pending; n];
    let mut failed_at = None;
    'steps: for (i, status) in statuses.iter_mut().enumerate() {
        for attempt in 1..=max {
            match execs.next().unwrap() {
                Exec::Done => {
                    *status = StepStatus::Succeeded;
                    continue 'steps;
                }
                Exec::Reject => break,
                Exec::Retry | Exec::Trap if attempt == max => break,
                Exec::Retry | Exec::Trap => {}
            }
        }
        *status = StepStatus::Failed;
        failed_at = Some(i);
        break;
    }
    let Some(k) = failed_at else {
        return Expected { phase: Phase::Completed, statuses, compensation_order: vec![] };
    };
    let mut order = vec![];
    for i in (0..k).rev() {
        order.push(i);
        let ok = (1..=comp_max).any(|_| *comps.next().unwrap());
        if !ok {
            statuses[i] = StepStatus::CompensationFailed;
            return Expected { phase: Phase::CompensationFailed, statuses, compensation_order: order };
        }
        statuses[i] = StepStatus::Compensated;
    }
    Expected { phase: Phase::Cancelled, statuses, compensation_order: order }
}

proptest! {
    #[test]
    fn engine_agrees_with_model(
        n in 1usize..=5,
        max in 1u32..=4,
        comp_max in 1u32..=3,
        execs in prop::collection::vec(exec_strategy(), 1..12),
        comps in prop::collection::vec(prop::bool::weighted(0.7), 1..8),
        jitter in 0.0f64..1.0,
    ) {
        let def = def_with(n, max, comp_max);
        let expected = model(n, max, comp_max, &execs, &comps);
        let mut state = SagaState::new(&def, 0);
        let mut now = 0i64;
        let mut exec_iter = execs.iter().cycle();
        let mut comp_iter = comps.iter().cycle();
        let mut compensation_order = vec![];
        let mut events = 0usize;
        for _ in 0..500 {
            if let Some(t) = state.next_run_at { now = now.max(t); }
            let event = match next_action(&def, &state, now) {
                Action::Idle => break,
                Action::Execute { step, attempt } => {
                    let outcome = match exec_iter.next().unwrap() {
                        Exec::Done => ExecuteOutcome::Done("{}".into()),
                        Exec::Retry => ExecuteOutcome::Retryable("r".into()),
                        Exec::Trap => ExecuteOutcome::Trapped("t".into()),
                        Exec::Reject => ExecuteOutcome::Rejected("x".into()),
                    };
                    Event::Executed { step, attempt, started_at: now, digest: "d".into(), outcome, jitter, reached_out: false }
                }
                Action::Compensate { step, attempt } => {
                    if attempt == 1 { compensation_order.push(step); }
                    let outcome = if *comp_iter.next().unwrap() {
                        CompensateOutcome::Done("{}".into())
                    } else {
                        CompensateOutcome::Failed("f".into())
                    };
                    Event::Compensated { step, attempt, digest: "d".into(), outcome, jitter }
                }
                Action::Finish => Event::Finish,
                Action::DeadlineExceeded { step } => Event::DeadlineExceeded { step },
            };
            let before = state.clone();
            let t = apply(&def, &state, event, now).expect("the action's event applies");
            events += 1;
            // Time never runs backwards and a live saga always has somewhere to go.
            if let Some(at) = t.state.next_run_at { prop_assert!(at >= now); }
            prop_assert!(t.state.phase.is_terminal() || t.state.phase == Phase::CompensationFailed || t.state.next_run_at.is_some());
            // Only the steps the transition names changed.
            for (i, (a, b)) in before.steps.iter().zip(&t.state.steps).enumerate() {
                if a != b { prop_assert!(t.changed_steps.contains(&i)); }
            }
            state = t.state;
        }
        prop_assert!(events > 0);
        prop_assert_eq!(state.phase, expected.phase);
        let statuses: Vec<_> = state.steps.iter().map(|s| s.status).collect();
        prop_assert_eq!(statuses, expected.statuses);
        prop_assert_eq!(compensation_order, expected.compensation_order);
        let label_ok = match state.phase {
            Phase::Completed => state.status == "COMPLETED",
            Phase::Cancelled => state.status == "CANCELLED",
            Phase::CompensationFailed => state.status == "COMPENSATION_FAILED",
            _ => false,
        };
        prop_assert!(label_ok, "status {} for phase {:?}", state.status, state.phase);
    }
}

#[test]
fn a_wait_with_no_delay_does_not_spin_the_step() {
    let def = order_def();
    let mut s = SagaState::new(&def, 0);
    s = step(&def, &s, executed(0, 1, done()), 0).state;
    let t = step(&def, &s, executed(1, 1, ExecuteOutcome::Wait { delay_ms: Some(0), signal: None }), 1_000);
    assert_eq!(t.state.next_run_at, Some(1_000 + MIN_WAIT_DELAY_MS as i64));
    assert_eq!(next_action(&def, &t.state, 1_000), Action::Idle, "re-run at once: a tight loop");
    let t = step(&def, &s, executed(1, 1, ExecuteOutcome::Wait { delay_ms: Some(5_000), signal: None }), 1_000);
    assert_eq!(t.state.next_run_at, Some(6_000), "longer delays are kept as asked");
}

// ---------------------------------------------------------------------------------------
// Property: the driver's actions interleaved with outside events (cancel, signal, a deadline
// passing, an operator's retry and resolve) agree, event by event, with a step-wise model.

/// One thing that happens to the saga.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// The driver performs what is due (advancing time to the next timer if nothing is due
    /// now); the plugin answers `exec` if it executes, `comp_ok` if it compensates.
    Drive { exec: ExecOp, comp_ok: bool },
    /// The driver records that an execute attempt that may reach out starts, and its result
    /// is lost (the host dies, or an outside event takes the saga over mid-call).
    Start,
    /// The host that recorded the current step's start died in the call: time runs to the
    /// start's end, where another driver takes the attempt up and records its start again.
    Restart,
    /// A client cancels.
    Cancel,
    /// The signal the waiting step asked for (`go`), or another one.
    Signal { right_name: bool },
    /// Time moves past the current step's deadline.
    Deadline,
    /// An operator retries the failed compensations.
    Retry,
    /// An operator resolves the saga by hand.
    Resolve,
}

/// A plugin's answer to execute, `Wait` being a wait for the signal `go`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ExecOp {
    Done,
    Wait,
    Retry,
    /// A retryable failure of an attempt that had sent requests out of the host.
    RetryOut,
    Trap,
    Reject,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let exec = prop_oneof![
        4 => Just(ExecOp::Done), 2 => Just(ExecOp::Wait), 2 => Just(ExecOp::Retry),
        1 => Just(ExecOp::RetryOut), 1 => Just(ExecOp::Trap), 1 => Just(ExecOp::Reject)
    ];
    prop_oneof![
        8 => (exec, prop::bool::weighted(0.7)).prop_map(|(exec, comp_ok)| Op::Drive { exec, comp_ok }),
        1 => Just(Op::Cancel),
        2 => Just(Op::Start),
        1 => Just(Op::Restart),
        2 => prop::bool::weighted(0.8).prop_map(|right_name| Op::Signal { right_name }),
        1 => Just(Op::Deadline),
        1 => Just(Op::Retry),
        1 => Just(Op::Resolve),
    ]
}

/// The model: what each step and the saga are, written from SPEC's rules rather than from
/// the engine's code.
#[derive(Debug, Clone)]
struct Model {
    phase: Phase,
    status: Vec<StepStatus>,
    /// The step returned `wait` at some point: it committed writes, so it is compensated
    /// even if it later failed.
    waited: Vec<bool>,
    /// The step has been attempted (its deadline clock runs).
    started: Vec<bool>,
    /// An attempt that may reach out started and its result never came: it may have had
    /// effects, so it is compensated.
    in_flight: Vec<bool>,
    failures: Vec<u32>,
    comp_attempts: Vec<u32>,
    /// A signal arrived for the waiting step and was not consumed yet.
    signalled: bool,
    max: u32,
    comp_max: u32,
}

/// What the model says the driver must do next.
#[derive(Debug, PartialEq)]
enum Due {
    Idle,
    Execute(usize),
    Compensate(usize),
    Finish,
}

impl Model {
    fn new(n: usize, max: u32, comp_max: u32) -> Model {
        Model {
            phase: Phase::Forward,
            status: vec![StepStatus::Pending; n],
            waited: vec![false; n],
            started: vec![false; n],
            in_flight: vec![false; n],
            failures: vec![0; n],
            comp_attempts: vec![0; n],
            signalled: false,
            max,
            comp_max,
        }
    }

    fn forward_step(&self) -> Option<usize> {
        self.status.iter().position(|s| *s != StepStatus::Succeeded)
    }

    /// Compensated: whatever committed something and is not undone yet, last first.
    fn compensation_step(&self) -> Option<usize> {
        (0..self.status.len()).rev().find(|&i| {
            matches!(
                self.status[i],
                StepStatus::Succeeded | StepStatus::Waiting | StepStatus::Compensating | StepStatus::CompensationFailed
            ) || ((self.waited[i] || self.in_flight[i])
                && matches!(self.status[i], StepStatus::Pending | StepStatus::Retrying | StepStatus::Failed))
        })
    }

    /// The driver's next action once every timer short of a deadline has fired: a step
    /// waiting for a signal that has not come stays parked (only the `Deadline` op moves
    /// time that far).
    fn due(&self) -> Due {
        match self.phase {
            Phase::Forward => match self.forward_step() {
                None => Due::Finish,
                Some(i) if self.status[i] == StepStatus::Waiting && !self.signalled => Due::Idle,
                Some(i) => Due::Execute(i),
            },
            Phase::Compensating => self.compensation_step().map_or(Due::Finish, Due::Compensate),
            _ => Due::Idle,
        }
    }

    fn compensate_from_here(&mut self) {
        self.phase = Phase::Compensating;
        self.signalled = false;
    }

    fn execute(&mut self, i: usize, outcome: ExecOp) {
        self.started[i] = true;
        // The attempt's result is known now.
        self.in_flight[i] = false;
        // A delivered signal is consumed, unless the attempt it woke is retried.
        let signalled = std::mem::take(&mut self.signalled);
        let failed = matches!(outcome, ExecOp::Retry | ExecOp::RetryOut | ExecOp::Trap);
        if failed {
            self.failures[i] += 1;
        }
        // Its requests may have been applied: the step must be undone if the saga compensates.
        if outcome == ExecOp::RetryOut {
            self.waited[i] = true;
        }
        match outcome {
            ExecOp::Done => self.status[i] = StepStatus::Succeeded,
            ExecOp::Wait => {
                self.status[i] = StepStatus::Waiting;
                self.waited[i] = true;
            }
            // Out of attempts, a failure counts as a rejection.
            ExecOp::Retry | ExecOp::RetryOut | ExecOp::Trap if self.failures[i] < self.max => {
                self.status[i] = StepStatus::Retrying;
                self.signalled = signalled;
            }
            _ => {
                self.status[i] = StepStatus::Failed;
                self.compensate_from_here();
            }
        }
    }

    fn compensate(&mut self, i: usize, ok: bool) {
        self.comp_attempts[i] += 1;
        if ok {
            self.status[i] = StepStatus::Compensated;
        } else if self.comp_attempts[i] >= self.comp_max {
            self.status[i] = StepStatus::CompensationFailed;
            self.phase = Phase::CompensationFailed;
        } else {
            self.status[i] = StepStatus::Compensating;
        }
    }

    fn finish(&mut self) {
        self.phase = if self.phase == Phase::Forward { Phase::Completed } else { Phase::Cancelled };
    }

    /// The deadline of the current step passed: a step that waited stays compensable, any
    /// other is failed; the saga compensates.
    fn deadline(&mut self, i: usize) {
        if self.status[i] != StepStatus::Waiting {
            self.status[i] = StepStatus::Failed;
        }
        self.compensate_from_here();
    }

    /// Whether a deadline can pass now: a forward step that has started, unless a signal
    /// delivered before the deadline waits to be acted on.
    fn deadline_runs(&self) -> Option<usize> {
        (self.phase == Phase::Forward)
            .then(|| self.forward_step())
            .flatten()
            .filter(|&i| self.started[i] && !self.signalled)
    }

    fn cancel(&mut self) -> bool {
        let ok = self.phase == Phase::Forward;
        if ok {
            self.compensate_from_here();
        }
        ok
    }

    fn signal(&mut self, right_name: bool) -> bool {
        let waiting = self.phase == Phase::Forward
            && self.forward_step().is_some_and(|i| self.status[i] == StepStatus::Waiting)
            && !self.signalled;
        let ok = waiting && right_name;
        if ok {
            self.signalled = true;
        }
        ok
    }

    fn retry(&mut self) -> bool {
        let ok = self.phase == Phase::CompensationFailed;
        if ok {
            for i in 0..self.status.len() {
                if self.status[i] == StepStatus::CompensationFailed {
                    self.status[i] = StepStatus::Compensating;
                    self.comp_attempts[i] = 0;
                }
            }
            self.phase = Phase::Compensating;
        }
        ok
    }

    fn resolve(&mut self) -> bool {
        let ok = self.phase == Phase::CompensationFailed;
        if ok {
            self.phase = Phase::Cancelled;
        }
        ok
    }
}

/// The deadline every step gets: far beyond any backoff, so only a wait or the `Deadline` op
/// reaches it.
const DEADLINE_MS: u64 = 1_000_000;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]
    #[test]
    fn engine_agrees_with_model_under_outside_events(
        n in 1usize..=4,
        max in 1u32..=3,
        comp_max in 1u32..=3,
        ops in prop::collection::vec(op_strategy(), 1..60),
        jitter in 0.0f64..1.0,
    ) {
        let mut def = def_with(n, max, comp_max);
        for s in &mut def.steps {
            s.deadline_ms = Some(DEADLINE_MS);
        }
        let mut model = Model::new(n, max, comp_max);
        let mut state = SagaState::new(&def, 0);
        let mut now = 0i64;
        for op in ops {
            let result = match op {
                Op::Drive { exec, comp_ok } => {
                    // Time runs to the next timer when nothing is due now (a backoff), but
                    // not as far as the current step's deadline: that is the `Deadline` op's.
                    if next_action(&def, &state, now) == Action::Idle {
                        let deadline = (state.phase == Phase::Forward)
                            .then(|| current_forward_step(&state))
                            .flatten()
                            .and_then(|i| state.steps[i].started_at)
                            .map(|t| t + DEADLINE_MS as i64);
                        if let Some(t) = state.next_run_at.filter(|&t| deadline.is_none_or(|d| t < d)) {
                            now = now.max(t);
                        }
                    }
                    let action = next_action(&def, &state, now);
                    let due = model.due();
                    let event = match (&action, &due) {
                        (Action::Idle, Due::Idle) => None,
                        (Action::Execute { step, attempt }, Due::Execute(i)) if step == i => {
                            model.execute(*i, exec);
                            let outcome = match exec {
                                ExecOp::Done => ExecuteOutcome::Done("{}".into()),
                                ExecOp::Wait => ExecuteOutcome::Wait { delay_ms: None, signal: Some("go".into()) },
                                ExecOp::Retry | ExecOp::RetryOut => ExecuteOutcome::Retryable("r".into()),
                                ExecOp::Trap => ExecuteOutcome::Trapped("t".into()),
                                ExecOp::Reject => ExecuteOutcome::Rejected("x".into()),
                            };
                            let reached_out = exec == ExecOp::RetryOut;
                            Some(Event::Executed { step: *step, attempt: *attempt, started_at: now, digest: "d".into(), outcome, jitter, reached_out })
                        }
                        (Action::Compensate { step, attempt }, Due::Compensate(i)) if step == i => {
                            // An undo never overtakes the attempt it undoes.
                            let until = state.steps[*i].in_flight_until;
                            prop_assert!(until.is_none_or(|u| now >= u), "compensating at {} before {:?}", now, until);
                            model.compensate(*i, comp_ok);
                            let outcome = if comp_ok {
                                CompensateOutcome::Done("{}".into())
                            } else {
                                CompensateOutcome::Failed("f".into())
                            };
                            Some(Event::Compensated { step: *step, attempt: *attempt, digest: "d".into(), outcome, jitter })
                        }
                        (Action::Finish, Due::Finish) => {
                            model.finish();
                            Some(Event::Finish)
                        }
                        _ => {
                            prop_assert!(false, "engine wants {:?}, model expects {:?} in {:?}", action, due, model);
                            None
                        }
                    };
                    event.map(|e| apply(&def, &state, e, now).map_err(|e| format!("{e}")))
                }
                Op::Start | Op::Restart => {
                    if matches!(op, Op::Restart) && state.phase == Phase::Forward {
                        if let Some(until) = current_forward_step(&state).and_then(|i| state.steps[i].in_flight_until) {
                            now = now.max(until);
                        }
                    }
                    match (next_action(&def, &state, now), model.due()) {
                    (Action::Execute { step, attempt }, Due::Execute(i)) if step == i => {
                        model.started[i] = true;
                        // A start whose result never came may have had effects.
                        model.waited[i] |= model.in_flight[i];
                        model.in_flight[i] = true;
                        Some(apply(&def, &state, Event::Started { step, attempt }, now).map_err(|e| format!("{e}")))
                    }
                    // Nothing is due now, or not an execute: the driver starts no call.
                    _ => None,
                    }
                }
                Op::Deadline => {
                    let cur = current_forward_step(&state).unwrap_or(0);
                    match model.deadline_runs() {
                        Some(i) => {
                            let started = state.steps[i].started_at.expect("a started step has a start time");
                            now = now.max(started + DEADLINE_MS as i64);
                            prop_assert_eq!(next_action(&def, &state, now), Action::DeadlineExceeded { step: i });
                            model.deadline(i);
                            Some(apply(&def, &state, Event::DeadlineExceeded { step: i }, now).map_err(|e| format!("{e}")))
                        }
                        None => {
                            // No deadline can pass: a deadline event is refused as stale.
                            let r = apply(&def, &state, Event::DeadlineExceeded { step: cur }, now);
                            prop_assert_eq!(r.err(), Some(Error::Stale));
                            None
                        }
                    }
                }
                Op::Cancel => {
                    let expected = model.cancel();
                    let r = apply(&def, &state, Event::Cancel { reason: "client".into() }, now);
                    prop_assert_eq!(r.is_ok(), expected, "cancel in {:?}: {:?}", state.phase, r.as_ref().err());
                    if !expected {
                        prop_assert!(matches!(r, Err(Error::NotCancellable(_))));
                    }
                    r.ok().map(Ok)
                }
                Op::Signal { right_name } => {
                    let expected = model.signal(right_name);
                    let name = if right_name { "go" } else { "other" };
                    let r = apply(&def, &state, Event::Signal { name: name.into(), payload: "{}".into() }, now);
                    prop_assert_eq!(r.is_ok(), expected, "signal {} in {:?}", name, state);
                    if !expected {
                        prop_assert!(matches!(r, Err(Error::NotWaitingForSignal(_))));
                    }
                    r.ok().map(Ok)
                }
                Op::Retry | Op::Resolve => {
                    let (expected, event) = match op {
                        Op::Retry => (model.retry(), Event::RetryCompensation),
                        _ => (model.resolve(), Event::Resolve { note: "by hand".into() }),
                    };
                    let r = apply(&def, &state, event, now);
                    prop_assert_eq!(r.is_ok(), expected, "{:?} in {:?}", op, state.phase);
                    if !expected {
                        prop_assert!(matches!(r, Err(Error::NotStuck(_))));
                    }
                    r.ok().map(Ok)
                }
            };
            if let Some(result) = result {
                let t = match result {
                    Ok(t) => t,
                    Err(e) => {
                        prop_assert!(false, "{:?} was refused ({}) in {:?}", op, e, state);
                        unreachable!()
                    }
                };
                if let Some(at) = t.state.next_run_at { prop_assert!(at >= now, "a timer in the past"); }
                state = t.state;
            }
            prop_assert_eq!(state.phase, model.phase, "phase after {:?}", op);
            let statuses: Vec<_> = state.steps.iter().map(|s| s.status).collect();
            prop_assert_eq!(&statuses, &model.status, "step statuses after {:?}", op);
            let label_ok = match state.phase {
                Phase::Completed => state.status == "COMPLETED",
                Phase::Cancelled => state.status == "CANCELLED",
                Phase::CompensationFailed => state.status == "COMPENSATION_FAILED",
                Phase::Compensating => state.status == "COMPENSATING",
                Phase::Forward => !matches!(state.status.to_string().as_str(), "COMPLETED" | "CANCELLED" | "COMPENSATING" | "COMPENSATION_FAILED"),
            };
            prop_assert!(label_ok, "status {} for phase {:?}", state.status, state.phase);
        }
    }
}
