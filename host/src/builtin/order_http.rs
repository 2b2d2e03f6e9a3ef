//! The built-in `order-http` saga: the order of [`super::order`], run against real services.
//!
//! Same input, validation and redaction as `order`; its three steps are the `http-*` plugins
//! (`plugins/http-inventory`, `http-payment`, `http-shipment`, sagahost:plugin@0.2.0), which
//! call the inventory, payment and shipping services over HTTP with the step's idempotency
//! key. The demo services (`demo/services`, binary `sagahost-demo-services`) implement them.
//!
//! Each step's `config.base_url` says where its service is; the defaults are the demo
//! services' default addresses. A plugin reaches nothing until an admin grants it the origin
//! (`PUT /admin/plugins/{name}/grants`), so a fresh host runs `order-http` sagas only after
//! the grants: until then every step fails with "denied" and the saga compensates.

use super::{order, Builtin};
use crate::engine::{PluginRef, RetryPolicy, SagaDefinition, StepDefinition};

/// The saga type.
pub const SAGA_TYPE: &str = "order-http";

/// The registration in the list of built-ins.
pub const BUILTIN: Builtin = Builtin {
    saga_type: SAGA_TYPE,
    noun: "order",
    route: None,
    plugins: &PLUGINS,
    definition,
    validate: |input| order::parse(input).map(drop),
    sensitive: &["/payment/token"],
};

/// `(plugin name, component bytes)` of each http plugin.
pub const PLUGINS: [(&str, &[u8]); 3] = [
    ("http-inventory", include_bytes!(concat!(env!("OUT_DIR"), "/http_inventory.wasm"))),
    ("http-payment", include_bytes!(concat!(env!("OUT_DIR"), "/http_payment.wasm"))),
    ("http-shipment", include_bytes!(concat!(env!("OUT_DIR"), "/http_shipment.wasm"))),
];

/// Where the demo services listen by default (`sagahost-demo-services`).
pub const DEFAULT_INVENTORY_URL: &str = "http://127.0.0.1:9001";
pub const DEFAULT_PAYMENT_URL: &str = "http://127.0.0.1:9002";
pub const DEFAULT_SHIPPING_URL: &str = "http://127.0.0.1:9003";

/// The `order-http` definition, bound to the http plugins `plugin` names.
pub fn definition(plugin: &dyn Fn(&str) -> PluginRef) -> SagaDefinition {
    let step = |name: &str, plugin_name: &str, state: &str, base_url: &str, deadline_ms: Option<u64>| StepDefinition {
        name: name.to_owned(),
        state: state.to_owned(),
        execute: plugin(plugin_name),
        compensate: plugin(plugin_name),
        retry: RetryPolicy::EXECUTE,
        compensate_retry: RetryPolicy::COMPENSATE,
        // A network call: more room than the host-state demo's 2 s.
        timeout_ms: 5_000,
        deadline_ms,
        config: serde_json::Map::from_iter([("base_url".to_owned(), base_url.into())]),
    };
    SagaDefinition {
        saga_type: SAGA_TYPE.to_owned(),
        steps: vec![
            step("inventory", "http-inventory", "INVENTORY_RESERVED", DEFAULT_INVENTORY_URL, None),
            step("payment", "http-payment", "PAYMENT_CHARGED", DEFAULT_PAYMENT_URL, Some(order::PAYMENT_DEADLINE_MS)),
            step("shipment", "http-shipment", "SHIPMENT_CREATED", DEFAULT_SHIPPING_URL, None),
        ],
        sensitive: BUILTIN.sensitive.iter().map(|&p| p.to_owned()).collect(),
    }
}
