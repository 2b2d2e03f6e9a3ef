//! The demo plugins shipped inside the binary, and the built-in `order` saga definition that
//! binds them (SPEC §1 and §7).
//!
//! The components are built from `plugins/` by `host/build.rs` and embedded, so the binary
//! runs with no files beside it.

use super::{Catalog, Error};
use crate::engine::{PluginRef, RetryPolicy, SagaDefinition, StepDefinition};

/// `(plugin name, component bytes)` of each demo plugin.
pub const PLUGINS: [(&str, &[u8]); 3] = [
    ("inventory", include_bytes!(concat!(env!("OUT_DIR"), "/inventory.wasm"))),
    ("payment", include_bytes!(concat!(env!("OUT_DIR"), "/payment.wasm"))),
    ("shipment", include_bytes!(concat!(env!("OUT_DIR"), "/shipment.wasm"))),
];

/// How long a payment may wait for its confirmation signal (`tok_3ds`) before it is rejected,
/// unless configured otherwise (`--payment-deadline-secs`).
pub const PAYMENT_DEADLINE_MS: u64 = 15 * 60 * 1000;

/// Stores and loads the demo plugins; returns the built-in `order` definition bound to them.
pub(super) async fn install(catalog: &Catalog, payment_deadline_ms: u64) -> Result<SagaDefinition, Error> {
    let mut refs = Vec::new();
    for (name, wasm) in PLUGINS {
        let (digest, _) = catalog.install_plugin(name, wasm.to_vec()).await?;
        refs.push(PluginRef { plugin: name.to_owned(), digest });
    }
    Ok(order_definition(&refs[0], &refs[1], &refs[2], payment_deadline_ms))
}

/// The `order` saga: cart -> inventory -> payment -> shipment.
pub fn order_definition(
    inventory: &PluginRef,
    payment: &PluginRef,
    shipment: &PluginRef,
    payment_deadline_ms: u64,
) -> SagaDefinition {
    let step = |name: &str, state: &str, plugin: &PluginRef, deadline_ms: Option<u64>| StepDefinition {
        name: name.to_owned(),
        state: state.to_owned(),
        execute: plugin.clone(),
        compensate: plugin.clone(),
        retry: RetryPolicy::EXECUTE,
        compensate_retry: RetryPolicy::COMPENSATE,
        timeout_ms: 2_000,
        deadline_ms,
    };
    SagaDefinition {
        saga_type: "order".to_owned(),
        steps: vec![
            step("inventory", "INVENTORY_RESERVED", inventory, None),
            step("payment", "PAYMENT_CHARGED", payment, Some(payment_deadline_ms)),
            step("shipment", "SHIPMENT_CREATED", shipment, None),
        ],
    }
}
