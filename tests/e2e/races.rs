//! Outside events racing the driver: every commit must apply only to the state it was
//! computed from (issue: a cancel computed before the last step landed on top of COMPLETED,
//! and a COMPLETED order was then refunded and released).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::harness::{fixture, good_order, key, TestHost};

/// A random whole number below `n`, without another dependency.
fn below(n: u64) -> u64 {
    (uuid::Uuid::new_v4().as_u128() % u128::from(n.max(1))) as u64
}

/// Posts an order, sleeps `delay`, cancels it; returns the id and the cancel's answer.
async fn order_then_cancel(client: reqwest::Client, base: String, delay: Duration) -> (String, StatusCode) {
    let mut order = good_order();
    order["customer_id"] = serde_json::json!("busy-short"); // the `slow` step's mode
    let r = client
        .post(format!("{base}/orders"))
        .header("Idempotency-Key", key())
        .json(&order)
        .send()
        .await
        .expect("order sent");
    assert_eq!(r.status(), StatusCode::CREATED);
    let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(delay).await;
    let cancel = client.post(format!("{base}/orders/{id}/cancel")).send().await.expect("cancel sent");
    (id, cancel.status())
}

// On several threads, as the host runs: the `slow` step's computing holds the thread it runs
// on, and on a test's one thread no cancel could be served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_racing_the_last_step_never_compensates_a_completed_order() {
    // At least MIN_WAVES waves, and more (up to MAX_WAVES) until each side of the race was
    // seen a few times: on a fast build few cancels beat the last step even at once.
    const MIN_WAVES: usize = 12;
    const MAX_WAVES: usize = 60;
    const EACH_SIDE: usize = 3;
    const PER_WAVE: usize = 10;
    // One commit per step, so the last step has a commit of its own to race. With chains the
    // three demo steps commit together well under a millisecond after the 201 (their first
    // state reads answer from memory), and every cancel came too late: the race was not run.
    let host = TestHost::start_with(|c| c.driver.chain_max = 1).await;
    // And a last step that takes a while (the `misbehave` fixture computing for some 10-25
    // ms): on an idle machine the demo steps completed before a cancel sent the moment the 201
    // arrived, every time (600 orders, not one cancelled).
    let (slow, _) = host.catalog.install_plugin("slow", fixture("misbehave")).await.unwrap();
    let mut def = (*host.catalog.definition("order").unwrap()).clone();
    let mut last = def.steps[2].clone();
    last.name = "slow".into();
    last.state = "SLOW_DONE".into();
    last.execute = sagahost::engine::PluginRef { plugin: "slow".into(), digest: slow };
    last.compensate = last.execute.clone();
    // The fixture may call out (it imports wasi:http): a cancel during its call compensates
    // once the call's time is over (its timeout and a second's grace), so keep that short.
    last.timeout_ms = 1_000;
    def.steps.push(last);
    host.catalog.put_definition(def, sagahost::store::DefinitionSource::Admin).await.unwrap();
    // Each cancel comes at a random moment in [0, window). The window adapts, so that the
    // cancels straddle the orders' completion on any machine and build: it grows while every
    // cancel wins and shrinks while every order completes first.
    let mut window_us: u64 = 20_000;
    let (mut cancelled, mut completed, mut waves) = (0, 0, 0);
    while waves < MIN_WAVES || (waves < MAX_WAVES && (cancelled < EACH_SIDE || completed < EACH_SIDE)) {
        waves += 1;
        let tasks: Vec<_> = (0..PER_WAVE)
            .map(|_| {
                let delay = Duration::from_micros(below(window_us));
                tokio::spawn(order_then_cancel(host.client.clone(), host.url(""), delay))
            })
            .collect();
        let (mut wave_cancelled, mut wave_completed) = (0, 0);
        for task in tasks {
            let (id, answer) = task.await.unwrap();
            let o = host.wait_settled(&id).await;
            let types = host.event_types(&id).await;
            let charge = host.state("payment", &format!("charge/{id}")).await;
            let reservation = host.state("inventory", &format!("reservation/{id}")).await;
            if answer.is_success() {
                wave_cancelled += 1;
                assert_eq!(o["status"], "CANCELLED", "cancel answered {answer} for {id}: {o:#}");
                assert!(!types.iter().any(|t| t == "OrderCompleted"), "a cancelled order had completed: {types:?}");
                assert!(charge.as_ref().is_none_or(|c| c["status"] == "refunded"), "{id}: {charge:?}");
                assert!(reservation.as_ref().is_none_or(|r| r["status"] == "released"), "{id}: {reservation:?}");
            } else {
                wave_completed += 1;
                assert_eq!(answer, StatusCode::CONFLICT, "{id}");
                assert_eq!(o["status"], "COMPLETED", "cancel answered 409 for {id}: {o:#}");
                assert!(
                    !types.iter().any(|t| t == "OrderCompensating" || t == "OrderCancelled"),
                    "a completed order compensated: {types:?}"
                );
                assert_eq!(charge.expect("a completed order was charged")["status"], "charged", "{id}");
                assert_eq!(reservation.expect("a completed order reserved")["status"], "reserved", "{id}");
            }
        }
        if wave_completed == 0 {
            window_us = window_us.saturating_mul(2).max(100);
        } else if wave_cancelled == 0 {
            window_us /= 2; // down to 0: cancel as soon as the order is created
        }
        cancelled += wave_cancelled;
        completed += wave_completed;
    }
    eprintln!("races: orders={} cancelled={cancelled} completed={completed} window_us={window_us}", waves * PER_WAVE);
    // Both sides of the race were run.
    assert!(cancelled > 0 && completed > 0, "cancelled={cancelled} completed={completed}: the race was not run");
}
