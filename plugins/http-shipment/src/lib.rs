//! `http-shipment`: the third step of the `order-http` saga. It creates the
//! order's shipment at the demo shipping service (`sagahost-demo-services`)
//! over HTTP, where the `shipment` plugin only writes host state.
//!
//! - The service's base URL is `config.base_url` of the step in the saga
//!   definition, by default `http://127.0.0.1:9003`. The plugin must be
//!   granted its origin (`PUT /admin/plugins/{name}/grants`).
//! - execute sends `POST {base_url}/shipments` with
//!   `{"order_id", "ship_to", "items"}` (`ship_to` and `items` as the order
//!   has them). A 2xx answer is the output, as the service sent it:
//!   `{"shipment_id": "shp_{order_id}", "order_id", "tracking": "TRK-{order_id}",
//!   "status": "created"}`. `422 {"error": "no carrier for XX"}` and any other
//!   4xx reject the step with the service's `error`; 408, 425, 429, 5xx and
//!   no answer at all are retryable.
//! - compensate sends `POST {base_url}/shipments/{order_id}/cancel` with `{}`
//!   and returns the service's answer (`{"order_id", "status": "cancelled"}`,
//!   or `{"status": "none"}` when nothing was created). Any failure is
//!   retried.
//!
//! The plugin keeps no state: the service is the record. Each call is safe to
//! repeat because the host sends the step's idempotency key with every request
//! and the service replays its first answer to a key. The order id is the saga
//! id.

use sagahost_plugin_sdk::http::{self, Request};
use sagahost_plugin_sdk::input::{self, StepInput};
use sagahost_plugin_sdk::{log, CallContext, Guest, StepError, StepOutcome};
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{json, Value};

/// Where the demo shipping service listens unless `config.base_url` says.
const DEFAULT_BASE_URL: &str = "http://127.0.0.1:9003";

/// The part of the order this step reads, passed on as it is.
#[derive(Debug, Deserialize)]
struct Order {
    ship_to: Value,
    items: Vec<Value>,
}

/// `config.base_url`, without a trailing `/`, or the default.
fn base_url<T>(step: &StepInput<T>) -> Result<String, StepError> {
    let url = step.config_str("base_url")?.unwrap_or(DEFAULT_BASE_URL);
    Ok(url.trim_end_matches('/').to_string())
}

/// `POST /shipments` for the order.
fn create_request(base_url: &str, order_id: &str, order: &Order) -> Request {
    Request::post(format!("{base_url}/shipments")).json(&json!({
        "order_id": order_id,
        "ship_to": order.ship_to,
        "items": order.items,
    }))
}

/// `POST /shipments/{order_id}/cancel`.
fn cancel_request(base_url: &str, order_id: &str) -> Request {
    Request::post(format!(
        "{base_url}/shipments/{}/cancel",
        http::path_segment(order_id)
    ))
    .json(&json!({}))
}

fn execute(ctx: &CallContext, raw_input: &str) -> Result<StepOutcome, StepError> {
    let step = input::parse::<Order>(raw_input)?;
    create_request(&base_url(&step)?, &ctx.saga_id, &step.input)
        .send()?
        .done()
}

fn compensate(ctx: &CallContext, raw_input: &str) -> Result<String, StepError> {
    let step = input::parse::<IgnoredAny>(raw_input)?;
    cancel_request(&base_url(&step)?, &ctx.saga_id)
        .send()?
        .output()
}

struct HttpShipment;

impl Guest for HttpShipment {
    fn execute(ctx: CallContext, input: String) -> Result<StepOutcome, StepError> {
        log::execution("http-shipment", &ctx, execute(&ctx, &input))
    }

    fn compensate(ctx: CallContext, input: String, _output: String) -> Result<String, StepError> {
        log::compensation("http-shipment", &ctx, compensate(&ctx, &input))
    }
}

sagahost_plugin_sdk::export!(HttpShipment);

#[cfg(test)]
mod tests {
    use super::*;
    use sagahost_plugin_sdk::http::Response;

    const CREATE: &str = "POST http://127.0.0.1:9003/shipments";

    fn step(country: &str, config: Value) -> StepInput<Order> {
        let raw = json!({
            "input": {"customer_id": "c-42",
                      "items": [{"sku": "SKU-1", "quantity": 2, "unit_price_cents": 1250}],
                      "ship_to": {"name": "Ada", "line1": "1 Main St", "city": "Springfield",
                                  "postal_code": "12345", "country": country}},
            "steps": {},
            "config": config,
        });
        input::parse(&raw.to_string()).unwrap()
    }

    #[test]
    fn sends_the_address_and_items_as_given() {
        let order = step("US", json!({}));
        let request = create_request(&base_url(&order).unwrap(), "o-1", &order.input);
        assert_eq!(request.describe(), CREATE);
        assert_eq!(
            serde_json::from_slice::<Value>(request.body_bytes().unwrap()).unwrap(),
            json!({"order_id": "o-1",
                   "ship_to": {"name": "Ada", "line1": "1 Main St", "city": "Springfield",
                               "postal_code": "12345", "country": "US"},
                   "items": [{"sku": "SKU-1", "quantity": 2, "unit_price_cents": 1250}]})
        );
        let configured = step("US", json!({"base_url": "http://ship.internal"}));
        assert_eq!(
            cancel_request(&base_url(&configured).unwrap(), "o-1").describe(),
            "POST http://ship.internal/shipments/o-1/cancel"
        );
    }

    #[test]
    fn answers_map_to_outcomes() {
        let created =
            r#"{"shipment_id":"shp_o-1","order_id":"o-1","tracking":"TRK-o-1","status":"created"}"#;
        assert_eq!(
            Response::new(CREATE, 201, created).done(),
            Ok(StepOutcome::Done(created.into()))
        );
        assert_eq!(
            Response::new(CREATE, 422, r#"{"error":"no carrier for XX"}"#).done(),
            Err(StepError::Rejected("no carrier for XX".into()))
        );
        assert!(matches!(
            Response::new(CREATE, 502, "bad gateway").done(),
            Err(StepError::Retryable(_))
        ));
    }
}
