//! `http-inventory`: the first step of the `order-http` saga. It reserves the
//! order's items at the demo inventory service (`sagahost-demo-services`) over
//! HTTP, where the `inventory` plugin only writes host state.
//!
//! - The service's base URL is `config.base_url` of the step in the saga
//!   definition, by default `http://127.0.0.1:9001`. The plugin must be
//!   granted its origin (`PUT /admin/plugins/{name}/grants`).
//! - execute sends `POST {base_url}/reservations` with
//!   `{"order_id": <order id>, "items": [{"sku", "quantity"}, ...]}`. A 2xx
//!   answer is the output, as the service sent it:
//!   `{"reservation_id": "res_{order_id}", "order_id", "items", "status": "reserved"}`.
//!   `409 {"error": "out of stock", "sku": "OOS-1"}` rejects the step with
//!   `out of stock: OOS-1`; any other 4xx rejects it with the service's
//!   `error`. 408, 425, 429, 5xx and no answer at all (refused, timed out, not
//!   granted) are retryable.
//! - compensate sends `POST {base_url}/reservations/{order_id}/release` with
//!   `{}` and returns the service's answer (`{"order_id", "status":
//!   "released", "released": true}`, or `"status": "none", "released": false`
//!   when nothing was reserved). Any failure is retried.
//!
//! The plugin keeps no state: the service is the record. Each call is safe to
//! repeat because the host sends the step's idempotency key with every request
//! (`{order_id}:{step}:execute`, `...:compensate`) and the service replays its
//! first answer to a key. The order id is the saga id.

use sagahost_plugin_sdk::http::{self, Request, Response};
use sagahost_plugin_sdk::input::{self, StepInput};
use sagahost_plugin_sdk::{log, CallContext, Guest, StepError, StepOutcome};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Where the demo inventory service listens unless `config.base_url` says.
const DEFAULT_BASE_URL: &str = "http://127.0.0.1:9001";

/// The part of the order this step reads.
#[derive(Debug, Deserialize)]
struct Order {
    items: Vec<Item>,
}

/// An order line as the service wants it (the price stays behind).
#[derive(Debug, Deserialize, Serialize)]
struct Item {
    sku: String,
    quantity: u64,
}

/// The service's answer to a reservation it refused for stock.
#[derive(Debug, Deserialize)]
struct OutOfStock {
    error: String,
    sku: String,
}

/// `config.base_url`, without a trailing `/`, or the default.
fn base_url<T>(step: &StepInput<T>) -> Result<String, StepError> {
    let url = step.config_str("base_url")?.unwrap_or(DEFAULT_BASE_URL);
    Ok(url.trim_end_matches('/').to_string())
}

/// `POST /reservations` for the order.
fn reserve_request(base_url: &str, order_id: &str, order: &Order) -> Request {
    Request::post(format!("{base_url}/reservations"))
        .json(&json!({ "order_id": order_id, "items": order.items }))
}

/// The step's outcome for the service's answer to `POST /reservations`.
fn reserved(response: Response) -> Result<StepOutcome, StepError> {
    if response.status == 409 {
        if let Ok(refusal) = response.json::<OutOfStock>() {
            return Err(StepError::Rejected(format!(
                "{}: {}",
                refusal.error, refusal.sku
            )));
        }
    }
    response.done()
}

/// `POST /reservations/{order_id}/release`.
fn release_request(base_url: &str, order_id: &str) -> Request {
    Request::post(format!(
        "{base_url}/reservations/{}/release",
        http::path_segment(order_id)
    ))
    .json(&json!({}))
}

fn execute(ctx: &CallContext, raw_input: &str) -> Result<StepOutcome, StepError> {
    let step = input::parse::<Order>(raw_input)?;
    let request = reserve_request(&base_url(&step)?, &ctx.saga_id, &step.input);
    reserved(request.send()?)
}

fn compensate(ctx: &CallContext, raw_input: &str) -> Result<String, StepError> {
    let step = input::parse::<IgnoredAny>(raw_input)?;
    release_request(&base_url(&step)?, &ctx.saga_id)
        .send()?
        .output()
}

struct HttpInventory;

impl Guest for HttpInventory {
    fn execute(ctx: CallContext, input: String) -> Result<StepOutcome, StepError> {
        log::execution("http-inventory", &ctx, execute(&ctx, &input))
    }

    fn compensate(ctx: CallContext, input: String, _output: String) -> Result<String, StepError> {
        log::compensation("http-inventory", &ctx, compensate(&ctx, &input))
    }
}

sagahost_plugin_sdk::export!(HttpInventory);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const RESERVE: &str = "POST http://127.0.0.1:9001/reservations";

    fn step(config: Value) -> StepInput<Order> {
        let raw = json!({
            "input": {"customer_id": "c-42", "currency": "USD",
                      "items": [{"sku": "SKU-1", "quantity": 2, "unit_price_cents": 1250},
                                {"sku": "OOS-1", "quantity": 1, "unit_price_cents": 5}]},
            "steps": {},
            "config": config,
        });
        input::parse(&raw.to_string()).unwrap()
    }

    fn body(request: &Request) -> Value {
        serde_json::from_slice(request.body_bytes().unwrap()).unwrap()
    }

    #[test]
    fn reserves_sku_and_quantity_at_the_configured_service() {
        let default = step(json!({}));
        let request = reserve_request(&base_url(&default).unwrap(), "o-1", &default.input);
        assert_eq!(request.describe(), RESERVE);
        assert_eq!(
            body(&request),
            json!({"order_id": "o-1", "items": [{"sku": "SKU-1", "quantity": 2},
                                                {"sku": "OOS-1", "quantity": 1}]})
        );
        assert_eq!(
            request.header_value("idempotency-key"),
            None,
            "the host adds it"
        );

        let configured = step(json!({"base_url": "http://10.0.0.7:8001/"}));
        assert_eq!(base_url(&configured).unwrap(), "http://10.0.0.7:8001");
        assert_eq!(
            release_request(&base_url(&configured).unwrap(), "o-1").describe(),
            "POST http://10.0.0.7:8001/reservations/o-1/release"
        );
        assert!(base_url(&step(json!({"base_url": 9001}))).is_err());
    }

    #[test]
    fn answers_map_to_outcomes() {
        let created =
            r#"{"reservation_id":"res_o-1","order_id":"o-1","items":[],"status":"reserved"}"#;
        assert_eq!(
            reserved(Response::new(RESERVE, 201, created)),
            Ok(StepOutcome::Done(created.into()))
        );
        assert_eq!(
            reserved(Response::new(
                RESERVE,
                409,
                r#"{"error":"out of stock","sku":"OOS-1"}"#
            )),
            Err(StepError::Rejected("out of stock: OOS-1".into()))
        );
        assert_eq!(
            reserved(Response::new(
                RESERVE,
                422,
                r#"{"error":"Idempotency-Key reused with a different request"}"#
            )),
            Err(StepError::Rejected(
                "Idempotency-Key reused with a different request".into()
            ))
        );
        assert_eq!(
            reserved(Response::new(
                RESERVE,
                503,
                r#"{"error":"inventory temporarily unavailable"}"#
            )),
            Err(StepError::Retryable(format!(
                "{RESERVE} answered 503: inventory temporarily unavailable"
            )))
        );
    }

    #[test]
    fn malformed_orders_are_rejected() {
        let raw = r#"{"input": {"items": [{"sku": "A"}]}, "steps": {}}"#;
        match input::parse::<Order>(raw) {
            Err(StepError::Rejected(m)) => assert!(m.starts_with("invalid input: "), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
