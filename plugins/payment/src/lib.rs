//! `payment`: the second step of the built-in `order` saga.
//!
//! Its behaviour is part of the product contract (SPEC §7):
//!
//! - execute charges the order total, the sum of `quantity * unit_price_cents`
//!   (a total past `u64` rejects with `order total overflows`). By payment
//!   token:
//!   - `tok_decline`: rejected, `card declined`;
//!   - `tok_flaky`: retryable (`payment gateway unavailable`) on attempts 1
//!     and 2, charges on attempt 3 and later;
//!   - `tok_3ds`: without a signal, waits for the signal `payment-confirmed`
//!     and writes nothing; once woken by it, charges;
//!   - anything else: charges.
//!
//!   A charge writes state `charge/{order_id}` =
//!   `{"amount_cents": n, "currency": "USD", "status": "charged"}` and outputs
//!   `{"charge_id": "ch_{order_id}", "amount_cents": n, "currency": "USD"}`.
//!   A second execute for the same order writes nothing and returns the same
//!   output.
//! - compensate refunds a charge once (status `refunded`) and returns
//!   `{"refunded_cents": n}`, or `{"refunded_cents": 0}` when nothing is
//!   charged (never charged, or already refunded).
//!
//! The order id is the saga id.

use sagahost_plugin_sdk::state::{HostStore, Store};
use sagahost_plugin_sdk::{
    done, input, log, to_json, CallContext, Guest, StepError, StepOutcome, WaitRequest,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Status of a charge that holds the money.
const CHARGED: &str = "charged";
/// Status of a charge that was given back.
const REFUNDED: &str = "refunded";
/// The signal a `tok_3ds` payment waits for.
const CONFIRMATION_SIGNAL: &str = "payment-confirmed";
/// Attempts before which a `tok_flaky` payment fails retryably.
const FLAKY_FAILURES: u32 = 2;

/// The part of the order this step reads.
#[derive(Debug, Deserialize)]
struct Order {
    items: Vec<PricedItem>,
    currency: String,
    payment: Payment,
}

/// An order line, as far as its price goes.
#[derive(Debug, Clone, Copy, Deserialize)]
struct PricedItem {
    quantity: u64,
    unit_price_cents: u64,
}

/// How the customer pays.
#[derive(Debug, Deserialize)]
struct Payment {
    token: String,
}

/// The record under `charge/{order_id}`.
#[derive(Debug, Serialize, Deserialize)]
struct Charge {
    amount_cents: u64,
    currency: String,
    status: String,
}

/// The order total in cents: `sum(quantity * unit_price_cents)`, or `None`
/// if it does not fit in a `u64`.
fn order_total(items: &[PricedItem]) -> Option<u64> {
    items.iter().try_fold(0u64, |total, item| {
        item.quantity
            .checked_mul(item.unit_price_cents)
            .and_then(|line| total.checked_add(line))
    })
}

/// The state key of an order's charge.
fn charge_key(order_id: &str) -> String {
    format!("charge/{order_id}")
}

/// The execute output for a charge.
fn output(order_id: &str, charge: &Charge) -> Value {
    json!({
        "charge_id": format!("ch_{order_id}"),
        "amount_cents": charge.amount_cents,
        "currency": charge.currency,
    })
}

/// Charges the order (see the crate docs).
fn execute(
    store: &mut impl Store,
    ctx: &CallContext,
    raw_input: &str,
) -> Result<StepOutcome, StepError> {
    let order_id = ctx.saga_id.as_str();
    let order = input::parse::<Order>(raw_input)?.input;

    let key = charge_key(order_id);
    if let Some(existing) = store.try_get_json::<Charge>(&key)? {
        return done(&output(order_id, &existing));
    }
    let amount_cents = order_total(&order.items)
        .ok_or_else(|| StepError::Rejected("order total overflows".to_string()))?;
    match order.payment.token.as_str() {
        "tok_decline" => return Err(StepError::Rejected("card declined".to_string())),
        "tok_flaky" if ctx.attempt <= FLAKY_FAILURES => {
            return Err(StepError::Retryable(
                "payment gateway unavailable".to_string(),
            ))
        }
        "tok_3ds" if ctx.signal.is_none() => {
            return Ok(StepOutcome::Wait(WaitRequest {
                delay_ms: None,
                signal: Some(CONFIRMATION_SIGNAL.to_string()),
            }))
        }
        _ => {}
    }
    let charge = Charge {
        amount_cents,
        currency: order.currency,
        status: CHARGED.to_string(),
    };
    store.set_json(&key, &charge)?;
    done(&output(order_id, &charge))
}

/// Refunds the order's charge, if it holds (see the crate docs).
fn compensate(store: &mut impl Store, ctx: &CallContext) -> Result<String, StepError> {
    let key = charge_key(&ctx.saga_id);
    let refunded_cents = match store.try_get_json::<Charge>(&key)? {
        Some(mut charge) if charge.status == CHARGED => {
            charge.status = REFUNDED.to_string();
            store.set_json(&key, &charge)?;
            charge.amount_cents
        }
        _ => 0,
    };
    to_json(&json!({ "refunded_cents": refunded_cents }))
}

struct PaymentStep;

impl Guest for PaymentStep {
    fn execute(ctx: CallContext, input: String) -> Result<StepOutcome, StepError> {
        log::execution("payment", &ctx, execute(&mut HostStore, &ctx, &input))
    }

    fn compensate(ctx: CallContext, _input: String, _output: String) -> Result<String, StepError> {
        log::compensation("payment", &ctx, compensate(&mut HostStore, &ctx))
    }
}

sagahost_plugin_sdk::export!(PaymentStep);

#[cfg(test)]
mod tests {
    use super::*;
    use sagahost_plugin_sdk::state::MemoryStore;
    use sagahost_plugin_sdk::testing;

    fn ctx(attempt: u32, signal: Option<&str>) -> CallContext {
        let ctx = testing::execute_context("o-1", "payment").with_attempt(attempt);
        match signal {
            Some(payload) => ctx.with_signal(CONFIRMATION_SIGNAL, payload),
            None => ctx,
        }
    }

    fn order(token: &str, items: Value) -> String {
        json!({
            "input": {"customer_id": "c-42", "items": items, "currency": "USD",
                      "payment": {"token": token}},
            "steps": {"inventory": {"reservation_id": "o-1", "items": 2}},
        })
        .to_string()
    }

    fn standard(token: &str) -> String {
        order(
            token,
            json!([{"sku": "SKU-1", "quantity": 2, "unit_price_cents": 1250},
                   {"sku": "SKU-2", "quantity": 1, "unit_price_cents": 99}]),
        )
    }

    const CHARGED_OUTPUT: &str = r#"{"amount_cents":2599,"charge_id":"ch_o-1","currency":"USD"}"#;

    #[test]
    fn total_is_checked() {
        let item = |quantity, unit_price_cents| PricedItem {
            quantity,
            unit_price_cents,
        };
        assert_eq!(order_total(&[]), Some(0));
        assert_eq!(order_total(&[item(2, 1250), item(3, 1)]), Some(2503));
        assert_eq!(order_total(&[item(u64::MAX, 2)]), None);
        assert_eq!(order_total(&[item(1, u64::MAX), item(1, 1)]), None);
        assert_eq!(order_total(&[item(1, u64::MAX)]), Some(u64::MAX));
    }

    #[test]
    fn charges_once_and_refunds_once() {
        let mut store = MemoryStore::new();
        let first = execute(&mut store, &ctx(1, None), &standard("tok_visa")).unwrap();
        assert_eq!(first, StepOutcome::Done(CHARGED_OUTPUT.into()));
        assert_eq!(
            store.json("charge/o-1").unwrap(),
            json!({"amount_cents": 2599, "currency": "USD", "status": "charged"})
        );
        assert_eq!(
            execute(&mut store, &ctx(2, None), &standard("tok_visa")).unwrap(),
            first
        );
        assert_eq!(store.writes, 1);

        assert_eq!(
            compensate(&mut store, &ctx(1, None)).unwrap(),
            r#"{"refunded_cents":2599}"#
        );
        assert_eq!(store.json("charge/o-1").unwrap()["status"], "refunded");
        assert_eq!(
            compensate(&mut store, &ctx(2, None)).unwrap(),
            r#"{"refunded_cents":0}"#
        );
        assert_eq!(store.writes, 2);
    }

    #[test]
    fn decline_and_overflow_reject() {
        let mut store = MemoryStore::new();
        assert_eq!(
            execute(&mut store, &ctx(1, None), &standard("tok_decline")),
            Err(StepError::Rejected("card declined".into()))
        );
        let huge = order(
            "tok_visa",
            json!([{"sku": "A", "quantity": u64::MAX, "unit_price_cents": 2}]),
        );
        assert_eq!(
            execute(&mut store, &ctx(1, None), &huge),
            Err(StepError::Rejected("order total overflows".into()))
        );
        assert_eq!(store.writes, 0);
        assert_eq!(
            compensate(&mut store, &ctx(1, None)).unwrap(),
            r#"{"refunded_cents":0}"#
        );
    }

    #[test]
    fn flaky_fails_twice_then_charges() {
        let mut store = MemoryStore::new();
        for attempt in [1, 2] {
            assert_eq!(
                execute(&mut store, &ctx(attempt, None), &standard("tok_flaky")),
                Err(StepError::Retryable("payment gateway unavailable".into()))
            );
        }
        assert_eq!(store.writes, 0);
        let third = execute(&mut store, &ctx(3, None), &standard("tok_flaky")).unwrap();
        assert_eq!(third, StepOutcome::Done(CHARGED_OUTPUT.into()));
    }

    #[test]
    fn three_ds_waits_for_the_signal() {
        let mut store = MemoryStore::new();
        assert_eq!(
            execute(&mut store, &ctx(1, None), &standard("tok_3ds")).unwrap(),
            StepOutcome::Wait(WaitRequest {
                delay_ms: None,
                signal: Some("payment-confirmed".into())
            })
        );
        assert_eq!(store.writes, 0);
        let woken = execute(
            &mut store,
            &ctx(1, Some(r#"{"ok":true}"#)),
            &standard("tok_3ds"),
        );
        assert_eq!(woken.unwrap(), StepOutcome::Done(CHARGED_OUTPUT.into()));
    }

    #[test]
    fn malformed_input_is_rejected() {
        let mut store = MemoryStore::new();
        for bad in [
            r#"{"input": {"items": [], "currency": "USD"}}"#,
            r#"{"input": {"items": [{"quantity": 1}], "currency": "USD", "payment": {"token": "t"}}}"#,
            r#"{"steps": {}}"#,
        ] {
            match execute(&mut store, &ctx(1, None), bad) {
                Err(StepError::Rejected(m)) => assert!(m.starts_with("invalid input: "), "{m}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
