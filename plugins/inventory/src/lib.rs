//! `inventory`: the first step of the built-in `order` saga.
//!
//! Its behaviour is part of the product contract (SPEC §7):
//!
//! - execute reserves every item of the order. An item whose SKU starts with
//!   `OOS-` rejects the step (`out of stock: <sku>`) and nothing is written.
//!   Otherwise state `reservation/{order_id}` =
//!   `{"items": [...], "status": "reserved"}` and the output is
//!   `{"reservation_id": "<order_id>", "items": <count>}`. A second execute for
//!   the same order writes nothing and returns the same output.
//! - compensate sets the reservation's status to `released` once and returns
//!   `{"released": true}`; when there is nothing reserved (absent or already
//!   released) it changes nothing and returns `{"released": false}`.
//!
//! The order id is the saga id.

use sagahost_plugin_sdk::state::{HostStore, Store};
use sagahost_plugin_sdk::{done, input, log, to_json, CallContext, Guest, StepError, StepOutcome};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Status of a reservation that holds its items.
const RESERVED: &str = "reserved";
/// Status of a reservation whose items were given back.
const RELEASED: &str = "released";

/// The part of the order this step reads.
#[derive(Debug, Deserialize)]
struct Order {
    items: Vec<Value>,
}

/// The fields of an item this step needs; the item is stored as given.
#[derive(Debug, Deserialize)]
struct Item {
    sku: String,
    #[allow(dead_code)] // required to be present and a non-negative integer
    quantity: u64,
}

/// The record under `reservation/{order_id}`.
#[derive(Debug, Serialize, Deserialize)]
struct Reservation {
    items: Vec<Value>,
    status: String,
}

/// The state key of an order's reservation.
fn reservation_key(order_id: &str) -> String {
    format!("reservation/{order_id}")
}

/// The execute output for a reservation of `count` items.
fn output(order_id: &str, count: usize) -> Value {
    json!({"reservation_id": order_id, "items": count})
}

/// Reserves the order's items (see the crate docs).
fn execute(
    store: &mut impl Store,
    ctx: &CallContext,
    raw_input: &str,
) -> Result<StepOutcome, StepError> {
    let order_id = ctx.saga_id.as_str();
    let order = input::parse::<Order>(raw_input)?.input;
    let mut skus = Vec::with_capacity(order.items.len());
    for (i, item) in order.items.iter().enumerate() {
        let item =
            Item::deserialize(item).map_err(|e| input::invalid(format!("items[{i}]: {e}")))?;
        skus.push(item.sku);
    }

    let key = reservation_key(order_id);
    if let Some(existing) = store.try_get_json::<Reservation>(&key)? {
        return done(&output(order_id, existing.items.len()));
    }
    if let Some(sku) = skus.iter().find(|sku| sku.starts_with("OOS-")) {
        return Err(StepError::Rejected(format!("out of stock: {sku}")));
    }
    let count = order.items.len();
    store.set_json(
        &key,
        &Reservation {
            items: order.items,
            status: RESERVED.to_string(),
        },
    )?;
    done(&output(order_id, count))
}

/// Releases the order's reservation, if it holds (see the crate docs).
fn compensate(store: &mut impl Store, ctx: &CallContext) -> Result<String, StepError> {
    let key = reservation_key(&ctx.saga_id);
    let released = match store.try_get_json::<Reservation>(&key)? {
        Some(mut reservation) if reservation.status == RESERVED => {
            reservation.status = RELEASED.to_string();
            store.set_json(&key, &reservation)?;
            true
        }
        _ => false,
    };
    to_json(&json!({ "released": released }))
}

struct Inventory;

impl Guest for Inventory {
    fn execute(ctx: CallContext, input: String) -> Result<StepOutcome, StepError> {
        log::execution("inventory", &ctx, execute(&mut HostStore, &ctx, &input))
    }

    fn compensate(ctx: CallContext, _input: String, _output: String) -> Result<String, StepError> {
        log::compensation("inventory", &ctx, compensate(&mut HostStore, &ctx))
    }
}

sagahost_plugin_sdk::export!(Inventory);

#[cfg(test)]
mod tests {
    use super::*;
    use sagahost_plugin_sdk::state::MemoryStore;
    use sagahost_plugin_sdk::testing;

    fn ctx() -> CallContext {
        testing::execute_context("o-1", "inventory")
    }

    fn order(skus: &[&str]) -> String {
        let items: Vec<Value> = skus
            .iter()
            .map(|sku| json!({"sku": sku, "quantity": 2, "unit_price_cents": 1250}))
            .collect();
        json!({"input": {"customer_id": "c-42", "items": items}, "steps": {}}).to_string()
    }

    #[test]
    fn reserves_once_and_releases_once() {
        let mut store = MemoryStore::new();
        let input = order(&["SKU-1", "SKU-2"]);
        let first = execute(&mut store, &ctx(), &input).unwrap();
        assert_eq!(
            first,
            StepOutcome::Done(r#"{"items":2,"reservation_id":"o-1"}"#.into())
        );
        let record = store.json("reservation/o-1").unwrap();
        assert_eq!(record["status"], "reserved");
        assert_eq!(record["items"][1]["sku"], "SKU-2");
        assert_eq!(store.writes, 1);

        assert_eq!(execute(&mut store, &ctx(), &input).unwrap(), first);
        assert_eq!(store.writes, 1, "a replay writes nothing");

        assert_eq!(
            compensate(&mut store, &ctx()).unwrap(),
            r#"{"released":true}"#
        );
        assert_eq!(store.json("reservation/o-1").unwrap()["status"], "released");
        assert_eq!(
            compensate(&mut store, &ctx()).unwrap(),
            r#"{"released":false}"#
        );
        assert_eq!(store.writes, 2);
    }

    #[test]
    fn out_of_stock_rejects_and_writes_nothing() {
        let mut store = MemoryStore::new();
        let err = execute(&mut store, &ctx(), &order(&["SKU-1", "OOS-9"])).unwrap_err();
        assert_eq!(err, StepError::Rejected("out of stock: OOS-9".into()));
        assert_eq!(store.writes, 0);
        assert_eq!(
            compensate(&mut store, &ctx()).unwrap(),
            r#"{"released":false}"#
        );
    }

    #[test]
    fn malformed_input_is_rejected() {
        let mut store = MemoryStore::new();
        for bad in [
            "nope",
            r#"{"input": {}}"#,
            r#"{"input": {"items": [{"quantity": 1}]}}"#,
            r#"{"input": {"items": [{"sku": "A", "quantity": -1}]}}"#,
        ] {
            match execute(&mut store, &ctx(), bad) {
                Err(StepError::Rejected(m)) => assert!(m.starts_with("invalid input: "), "{m}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert_eq!(store.writes, 0);
    }
}
