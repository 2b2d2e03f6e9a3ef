//! `http-payment`: the second step of the `order-http` saga. It charges the
//! order total at the demo payment service (`sagahost-demo-services`) over
//! HTTP, where the `payment` plugin only writes host state.
//!
//! - The service's base URL is `config.base_url` of the step in the saga
//!   definition, by default `http://127.0.0.1:9002`. The plugin must be
//!   granted its origin (`PUT /admin/plugins/{name}/grants`).
//! - execute, unless woken by the signal `payment-confirmed`, sends
//!   `POST {base_url}/charges` with `{"order_id", "amount_cents", "currency",
//!   "token"}`, where `amount_cents` is the sum of `quantity *
//!   unit_price_cents` (a total past `u64` rejects with `order total
//!   overflows`, before any request). By answer:
//!   - 2xx but 202: done, with the service's charge as the output
//!     (`{"charge_id": "ch_{order_id}", "order_id", "amount_cents", "currency",
//!     "status": "charged"}`);
//!   - 202 (`requires_action`: 3-D Secure): waits for the signal
//!     `payment-confirmed`, with no delay (the step's deadline bounds the wait).
//!     When the 202 is a replay (`Idempotent-Replayed: true`: this call
//!     repeats an earlier one, whose signal may already have come and gone),
//!     the charge's current status decides instead, as below;
//!   - 402 (`card declined`) and any other 4xx: rejected with the service's
//!     `error`;
//!   - 408, 425, 429, 5xx and no answer at all: retryable.
//! - execute woken by the signal `payment-confirmed` (`call-context.signal-name`)
//!   sends `GET {base_url}/charges/{order_id}` and decides by the charge's
//!   `status`: `charged` is done (the record is the output),
//!   `requires_action` waits for the signal again, anything else (`refunded`,
//!   `cancelled`) rejects with `charge is <status>`; a 404 rejects with the
//!   service's `error`.
//! - compensate sends `POST {base_url}/refunds` with `{"order_id"}` and
//!   returns the service's answer (`{"order_id", "status": "refunded",
//!   "refunded_cents": n}`; `"cancelled"` for a charge still waiting for 3-D
//!   Secure; `"none"` when nothing was charged). Any failure is retried.
//!
//! The plugin keeps no state: the service is the record. Each call is safe to
//! repeat because the host sends the step's idempotency key with every request
//! and the service replays its first answer to a key, so a charge re-sent
//! after a crash or a retry is applied once. The order id is the saga id.

use sagahost_plugin_sdk::http::{self, Request, Response};
use sagahost_plugin_sdk::input::{self, StepInput};
use sagahost_plugin_sdk::{log, CallContext, Guest, StepError, StepOutcome, WaitRequest};
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::json;

/// Where the demo payment service listens unless `config.base_url` says.
const DEFAULT_BASE_URL: &str = "http://127.0.0.1:9002";
/// The signal the service sends once the customer finished 3-D Secure.
const CONFIRMED: &str = "payment-confirmed";

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

/// The part of the service's charge record this step reads.
#[derive(Debug, Deserialize)]
struct Charge {
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

/// `config.base_url`, without a trailing `/`, or the default.
fn base_url<T>(step: &StepInput<T>) -> Result<String, StepError> {
    let url = step.config_str("base_url")?.unwrap_or(DEFAULT_BASE_URL);
    Ok(url.trim_end_matches('/').to_string())
}

/// `POST /charges` for the order's total.
fn charge_request(base_url: &str, order_id: &str, order: &Order) -> Result<Request, StepError> {
    let amount_cents = order_total(&order.items)
        .ok_or_else(|| StepError::Rejected("order total overflows".to_string()))?;
    Ok(Request::post(format!("{base_url}/charges")).json(&json!({
        "order_id": order_id,
        "amount_cents": amount_cents,
        "currency": order.currency,
        "token": order.payment.token,
    })))
}

/// `GET /charges/{order_id}`.
fn status_request(base_url: &str, order_id: &str) -> Request {
    Request::get(format!(
        "{base_url}/charges/{}",
        http::path_segment(order_id)
    ))
}

/// Park the step until the customer confirms.
fn wait_for_confirmation() -> StepOutcome {
    StepOutcome::Wait(WaitRequest {
        delay_ms: None,
        signal: Some(CONFIRMED.to_string()),
    })
}

/// The outcome of the answer to `POST /charges`, or `None` when only the
/// charge's current status can tell (a replayed 202).
fn charged(response: Response) -> Result<Option<StepOutcome>, StepError> {
    if response.status == 202 {
        if response.header("idempotent-replayed") == Some("true") {
            return Ok(None);
        }
        return Ok(Some(wait_for_confirmation()));
    }
    response.done().map(Some)
}

/// The outcome of the answer to `GET /charges/{order_id}`.
fn current(response: Response) -> Result<StepOutcome, StepError> {
    let response = response.error_for_status()?;
    match response.json::<Charge>()?.status.as_str() {
        "charged" => response.done(),
        "requires_action" => Ok(wait_for_confirmation()),
        other => Err(StepError::Rejected(format!("charge is {other}"))),
    }
}

fn execute(ctx: &CallContext, raw_input: &str) -> Result<StepOutcome, StepError> {
    let step = input::parse::<Order>(raw_input)?;
    let base_url = base_url(&step)?;
    if ctx.signal_name.as_deref() != Some(CONFIRMED) {
        let charge = charge_request(&base_url, &ctx.saga_id, &step.input)?;
        if let Some(outcome) = charged(charge.send()?)? {
            return Ok(outcome);
        }
    }
    current(status_request(&base_url, &ctx.saga_id).send()?)
}

fn compensate(ctx: &CallContext, raw_input: &str) -> Result<String, StepError> {
    let step = input::parse::<IgnoredAny>(raw_input)?;
    Request::post(format!("{}/refunds", base_url(&step)?))
        .json(&json!({ "order_id": ctx.saga_id }))
        .send()?
        .output()
}

struct HttpPayment;

impl Guest for HttpPayment {
    fn execute(ctx: CallContext, input: String) -> Result<StepOutcome, StepError> {
        log::execution("http-payment", &ctx, execute(&ctx, &input))
    }

    fn compensate(ctx: CallContext, input: String, _output: String) -> Result<String, StepError> {
        log::compensation("http-payment", &ctx, compensate(&ctx, &input))
    }
}

sagahost_plugin_sdk::export!(HttpPayment);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const CHARGES: &str = "POST http://127.0.0.1:9002/charges";
    const STATUS: &str = "GET http://127.0.0.1:9002/charges/o-1";
    const CHARGED: &str = r#"{"charge_id":"ch_o-1","order_id":"o-1","amount_cents":2599,"currency":"USD","status":"charged"}"#;

    fn step(items: Value) -> StepInput<Order> {
        let raw = json!({
            "input": {"customer_id": "c-42", "items": items, "currency": "USD",
                      "payment": {"token": "tok_visa"}},
            "steps": {"inventory": {"reservation_id": "res_o-1"}},
        });
        input::parse(&raw.to_string()).unwrap()
    }

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
    fn charges_the_total_with_the_token() {
        let order = step(
            json!([{"sku": "SKU-1", "quantity": 2, "unit_price_cents": 1250},
                                {"sku": "SKU-2", "quantity": 1, "unit_price_cents": 99}]),
        );
        let base = base_url(&order).unwrap();
        let request = charge_request(&base, "o-1", &order.input).unwrap();
        assert_eq!(request.describe(), CHARGES);
        assert_eq!(
            serde_json::from_slice::<Value>(request.body_bytes().unwrap()).unwrap(),
            json!({"order_id": "o-1", "amount_cents": 2599, "currency": "USD", "token": "tok_visa"})
        );
        assert_eq!(
            request.header_value("idempotency-key"),
            None,
            "the host adds it"
        );
        assert_eq!(status_request(&base, "o-1").describe(), STATUS);

        let huge = step(json!([{"sku": "A", "quantity": u64::MAX, "unit_price_cents": 2}]));
        assert_eq!(
            charge_request(&base, "o-1", &huge.input).unwrap_err(),
            StepError::Rejected("order total overflows".into())
        );
    }

    #[test]
    fn charge_answers_map_to_outcomes() {
        assert_eq!(
            charged(Response::new(CHARGES, 201, CHARGED)),
            Ok(Some(StepOutcome::Done(CHARGED.into())))
        );
        let three_ds = r#"{"charge_id":"ch_o-1","status":"requires_action"}"#;
        assert_eq!(
            charged(Response::new(CHARGES, 202, three_ds)),
            Ok(Some(wait_for_confirmation()))
        );
        assert_eq!(
            wait_for_confirmation(),
            StepOutcome::Wait(WaitRequest {
                delay_ms: None,
                signal: Some("payment-confirmed".into())
            })
        );
        // A replayed 202: the signal may have come already; ask the service.
        assert_eq!(
            charged(
                Response::new(CHARGES, 202, three_ds).with_header("Idempotent-Replayed", "true")
            ),
            Ok(None)
        );
        assert_eq!(
            charged(Response::new(CHARGES, 402, r#"{"error":"card declined"}"#)),
            Err(StepError::Rejected("card declined".into()))
        );
        assert_eq!(
            charged(Response::new(
                CHARGES,
                503,
                r#"{"error":"payment gateway unavailable"}"#
            )),
            Err(StepError::Retryable(format!(
                "{CHARGES} answered 503: payment gateway unavailable"
            )))
        );
    }

    #[test]
    fn the_charge_status_decides_after_the_signal() {
        assert_eq!(
            current(Response::new(STATUS, 200, CHARGED)),
            Ok(StepOutcome::Done(CHARGED.into()))
        );
        assert_eq!(
            current(Response::new(
                STATUS,
                200,
                r#"{"status":"requires_action"}"#
            )),
            Ok(wait_for_confirmation())
        );
        assert_eq!(
            current(Response::new(STATUS, 200, r#"{"status":"cancelled"}"#)),
            Err(StepError::Rejected("charge is cancelled".into()))
        );
        assert_eq!(
            current(Response::new(STATUS, 404, r#"{"error":"no such charge"}"#)),
            Err(StepError::Rejected("no such charge".into()))
        );
        assert!(matches!(
            current(Response::new(STATUS, 500, "")),
            Err(StepError::Retryable(_))
        ));
        assert!(matches!(
            current(Response::new(STATUS, 200, "{}")),
            Err(StepError::Retryable(_))
        ));
    }
}
