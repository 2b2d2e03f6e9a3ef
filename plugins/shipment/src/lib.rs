//! `shipment`: the last step of the built-in `order` saga.
//!
//! Its behaviour is part of the product contract (SPEC §7):
//!
//! - execute creates the shipment. A `ship_to.country` of `XX` rejects the
//!   step (`no carrier for XX`) and nothing is written. Otherwise state
//!   `shipment/{order_id}` = `{"status": "created", "tracking": "TRK-..."}` and
//!   the output is `{"tracking": "TRK-..."}`. The tracking number is derived
//!   from the order id alone (`TRK-` and 16 upper-case hex digits of the
//!   64-bit FNV-1a hash of the id), so it is the same on every retry. A second
//!   execute for the same order writes nothing and returns the same output.
//! - compensate cancels a created shipment once and returns
//!   `{"cancelled": true}`; otherwise it changes nothing and returns
//!   `{"cancelled": false}`.
//!
//! The order id is the saga id.

use sagahost_plugin_sdk::state::{HostStore, Store};
use sagahost_plugin_sdk::{done, input, log, to_json, CallContext, Guest, StepError, StepOutcome};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Status of a shipment that will go out.
const CREATED: &str = "created";
/// Status of a shipment that was called off.
const CANCELLED: &str = "cancelled";
/// The country no carrier serves (a demo hook for rejections).
const UNSERVED_COUNTRY: &str = "XX";

/// The part of the order this step reads.
#[derive(Debug, Deserialize)]
struct Order {
    ship_to: ShipTo,
}

/// Where the order goes, as far as this step needs.
#[derive(Debug, Deserialize)]
struct ShipTo {
    country: String,
}

/// The record under `shipment/{order_id}`.
#[derive(Debug, Serialize, Deserialize)]
struct Shipment {
    status: String,
    tracking: String,
}

/// The tracking number of an order: `TRK-` and the 64-bit FNV-1a hash of the
/// order id as 16 upper-case hex digits. Deterministic: no clock, no randomness.
fn tracking_number(order_id: &str) -> String {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = order_id.bytes().fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    });
    format!("TRK-{hash:016X}")
}

/// The state key of an order's shipment.
fn shipment_key(order_id: &str) -> String {
    format!("shipment/{order_id}")
}

/// Creates the order's shipment (see the crate docs).
fn execute(
    store: &mut impl Store,
    ctx: &CallContext,
    raw_input: &str,
) -> Result<StepOutcome, StepError> {
    let order_id = ctx.saga_id.as_str();
    let order = input::parse::<Order>(raw_input)?.input;

    let key = shipment_key(order_id);
    if let Some(existing) = store.try_get_json::<Shipment>(&key)? {
        return done(&json!({ "tracking": existing.tracking }));
    }
    let country = order.ship_to.country;
    if country == UNSERVED_COUNTRY {
        return Err(StepError::Rejected(format!("no carrier for {country}")));
    }
    let shipment = Shipment {
        status: CREATED.to_string(),
        tracking: tracking_number(order_id),
    };
    store.set_json(&key, &shipment)?;
    done(&json!({ "tracking": shipment.tracking }))
}

/// Cancels the order's shipment, if it was created (see the crate docs).
fn compensate(store: &mut impl Store, ctx: &CallContext) -> Result<String, StepError> {
    let key = shipment_key(&ctx.saga_id);
    let cancelled = match store.try_get_json::<Shipment>(&key)? {
        Some(mut shipment) if shipment.status == CREATED => {
            shipment.status = CANCELLED.to_string();
            store.set_json(&key, &shipment)?;
            true
        }
        _ => false,
    };
    to_json(&json!({ "cancelled": cancelled }))
}

struct ShipmentStep;

impl Guest for ShipmentStep {
    fn execute(ctx: CallContext, input: String) -> Result<StepOutcome, StepError> {
        log::execution("shipment", &ctx, execute(&mut HostStore, &ctx, &input))
    }

    fn compensate(ctx: CallContext, _input: String, _output: String) -> Result<String, StepError> {
        log::compensation("shipment", &ctx, compensate(&mut HostStore, &ctx))
    }
}

sagahost_plugin_sdk::export!(ShipmentStep);

#[cfg(test)]
mod tests {
    use super::*;
    use sagahost_plugin_sdk::state::MemoryStore;
    use sagahost_plugin_sdk::testing;
    use serde_json::Value;

    fn ctx(order_id: &str) -> CallContext {
        testing::execute_context(order_id, "shipment")
    }

    fn order(country: &str) -> String {
        json!({
            "input": {"customer_id": "c-42",
                      "ship_to": {"name": "Ada", "line1": "1 Main St", "city": "Springfield",
                                  "postal_code": "12345", "country": country}},
            "steps": {},
        })
        .to_string()
    }

    #[test]
    fn tracking_is_deterministic() {
        // FNV-1a 64 of the empty string is the offset basis.
        assert_eq!(tracking_number(""), "TRK-CBF29CE484222325");
        assert_eq!(tracking_number("a"), "TRK-AF63DC4C8601EC8C");
        assert_eq!(tracking_number("o-1"), tracking_number("o-1"));
        assert_ne!(tracking_number("o-1"), tracking_number("o-2"));
        assert_eq!(tracking_number("anything").len(), 20);
    }

    #[test]
    fn creates_once_and_cancels_once() {
        let mut store = MemoryStore::new();
        let first = execute(&mut store, &ctx("o-1"), &order("US")).unwrap();
        let StepOutcome::Done(output) = &first else {
            panic!("{first:?}")
        };
        let output: Value = serde_json::from_str(output).unwrap();
        assert_eq!(output, json!({"tracking": tracking_number("o-1")}));
        assert_eq!(
            store.json("shipment/o-1").unwrap(),
            json!({"status": "created", "tracking": tracking_number("o-1")})
        );
        assert_eq!(
            execute(&mut store, &ctx("o-1"), &order("US")).unwrap(),
            first
        );
        assert_eq!(store.writes, 1);

        assert_eq!(
            compensate(&mut store, &ctx("o-1")).unwrap(),
            r#"{"cancelled":true}"#
        );
        assert_eq!(store.json("shipment/o-1").unwrap()["status"], "cancelled");
        assert_eq!(
            compensate(&mut store, &ctx("o-1")).unwrap(),
            r#"{"cancelled":false}"#
        );
        assert_eq!(store.writes, 2);
    }

    #[test]
    fn unserved_country_rejects_and_writes_nothing() {
        let mut store = MemoryStore::new();
        assert_eq!(
            execute(&mut store, &ctx("o-1"), &order("XX")),
            Err(StepError::Rejected("no carrier for XX".into()))
        );
        assert_eq!(store.writes, 0);
        assert_eq!(
            compensate(&mut store, &ctx("o-1")).unwrap(),
            r#"{"cancelled":false}"#
        );
    }

    #[test]
    fn malformed_input_is_rejected() {
        let mut store = MemoryStore::new();
        for bad in [
            r#"{"input": {}}"#,
            r#"{"input": {"ship_to": {"country": 7}}}"#,
            "[]",
        ] {
            match execute(&mut store, &ctx("o-1"), bad) {
                Err(StepError::Rejected(m)) => assert!(m.starts_with("invalid input: "), "{m}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
