//! The built-in `order` saga (SPEC §1, §5.2, §7): cart -> inventory -> payment -> shipment.
//!
//! Everything the host knows about orders lives here: the demo plugins it binds (built from
//! `plugins/` by `host/build.rs` and embedded, so the binary runs with no files beside it),
//! its definition (with the payment step's deadline), and its input's JSON shape and
//! validation rules. The generic host finds it through [`super::ALL`].
//!
//! Validation happens before anything is stored: a 400 names the field and changes nothing.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Builtin, InputError};
use crate::engine::{PluginRef, RetryPolicy, SagaDefinition, StepDefinition};

/// The saga type of orders.
pub const SAGA_TYPE: &str = "order";

/// The registration of the order saga in the list of built-ins.
pub const BUILTIN: Builtin = Builtin {
    saga_type: SAGA_TYPE,
    noun: "order",
    route: Some("/orders"),
    plugins: &PLUGINS,
    definition,
    validate: |input| parse(input).map(drop),
    sensitive: &["/payment/token"],
};

/// `(plugin name, component bytes)` of each demo plugin.
pub const PLUGINS: [(&str, &[u8]); 3] = [
    ("inventory", include_bytes!(concat!(env!("OUT_DIR"), "/inventory.wasm"))),
    ("payment", include_bytes!(concat!(env!("OUT_DIR"), "/payment.wasm"))),
    ("shipment", include_bytes!(concat!(env!("OUT_DIR"), "/shipment.wasm"))),
];

/// How long a payment may wait for its confirmation signal (`tok_3ds`) before it is rejected:
/// the payment step's deadline (SPEC §7). An operator who needs another one registers the
/// definition with a different `deadline_ms` through `PUT /admin/sagas/order`.
pub const PAYMENT_DEADLINE_MS: u64 = 15 * 60 * 1000;

/// The `order` definition, bound to the demo plugins `plugin` names.
pub fn definition(plugin: &dyn Fn(&str) -> PluginRef) -> SagaDefinition {
    let step = |name: &str, state: &str, deadline_ms: Option<u64>| StepDefinition {
        name: name.to_owned(),
        state: state.to_owned(),
        execute: plugin(name),
        compensate: plugin(name),
        retry: RetryPolicy::EXECUTE,
        compensate_retry: RetryPolicy::COMPENSATE,
        timeout_ms: 2_000,
        deadline_ms,
        config: Default::default(),
    };
    SagaDefinition {
        saga_type: SAGA_TYPE.to_owned(),
        steps: vec![
            step("inventory", "INVENTORY_RESERVED", None),
            step("payment", "PAYMENT_CHARGED", Some(PAYMENT_DEADLINE_MS)),
            step("shipment", "SHIPMENT_CREATED", None),
        ],
        // The payment token reaches the payment plugin only (SPEC §8).
        sensitive: BUILTIN.sensitive.iter().map(|&p| p.to_owned()).collect(),
    }
}

/// `POST /orders` body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderRequest {
    /// Not blank, no control characters.
    #[schema(
        example = "c-42",
        min_length = 1,
        max_length = 128,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*[^\\s\\x00-\\x1f\\x7f-\\x9f][^\\x00-\\x1f\\x7f-\\x9f]*$"
    )]
    pub customer_id: String,
    /// 1 to 100 lines.
    #[schema(min_items = 1, max_items = 100)]
    pub items: Vec<OrderItem>,
    /// ISO 4217 code, one of the currencies the saga accepts.
    #[schema(
        example = "USD",
        pattern = "^(AUD|BRL|CAD|CHF|CNY|CZK|DKK|EUR|GBP|HKD|INR|JPY|MXN|NOK|NZD|PLN|SEK|SGD|USD|ZAR)$"
    )]
    pub currency: String,
    pub payment: Payment,
    pub ship_to: Address,
}

/// One order line.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderItem {
    #[schema(
        example = "SKU-1",
        min_length = 1,
        max_length = 64,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*[^\\s\\x00-\\x1f\\x7f-\\x9f][^\\x00-\\x1f\\x7f-\\x9f]*$"
    )]
    pub sku: String,
    #[schema(example = 2, minimum = 1, maximum = 10_000)]
    pub quantity: u32,
    #[schema(example = 1250, minimum = 0, maximum = 10_000_000_000_u64)]
    pub unit_price_cents: u64,
}

/// How the customer pays.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Payment {
    /// A payment token, e.g. `tok_visa`.
    #[schema(
        example = "tok_visa",
        min_length = 1,
        max_length = 128,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*[^\\s\\x00-\\x1f\\x7f-\\x9f][^\\x00-\\x1f\\x7f-\\x9f]*$"
    )]
    pub token: String,
}

/// Where the order ships.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Address {
    #[schema(
        example = "Ada",
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*[^\\s\\x00-\\x1f\\x7f-\\x9f][^\\x00-\\x1f\\x7f-\\x9f]*$"
    )]
    pub name: String,
    #[schema(
        example = "1 Main St",
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*[^\\s\\x00-\\x1f\\x7f-\\x9f][^\\x00-\\x1f\\x7f-\\x9f]*$"
    )]
    pub line1: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 200)]
    pub line2: Option<String>,
    #[schema(
        example = "Springfield",
        min_length = 1,
        max_length = 100,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*[^\\s\\x00-\\x1f\\x7f-\\x9f][^\\x00-\\x1f\\x7f-\\x9f]*$"
    )]
    pub city: String,
    #[schema(
        example = "12345",
        min_length = 1,
        max_length = 20,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*[^\\s\\x00-\\x1f\\x7f-\\x9f][^\\x00-\\x1f\\x7f-\\x9f]*$"
    )]
    pub postal_code: String,
    /// ISO 3166-1 alpha-2 in upper case, e.g. `US`.
    #[schema(example = "US", pattern = "^[A-Z]{2}$")]
    pub country: String,
}

/// Currencies the order saga accepts (ISO 4217).
pub const CURRENCIES: &[&str] = &[
    "AUD", "BRL", "CAD", "CHF", "CNY", "CZK", "DKK", "EUR", "GBP", "HKD", "INR", "JPY", "MXN", "NOK", "NZD", "PLN",
    "SEK", "SGD", "USD", "ZAR",
];

const MAX_ITEMS: usize = 100;
const MAX_QUANTITY: u32 = 10_000;
const MAX_UNIT_PRICE: u64 = 10_000_000_000;

fn text(field: &str, value: &str, max: usize) -> Result<(), InputError> {
    // Blank by the schemas' measure too (`is_blank`), not Rust's `trim`.
    if super::is_blank(value) {
        return Err(InputError::new(field, "must not be empty"));
    }
    if value.chars().count() > max {
        return Err(InputError::new(field, format!("must be at most {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(InputError::new(field, "must not contain control characters"));
    }
    Ok(())
}

/// Parses and validates an order; the error names the first offending field.
pub fn parse(body: &serde_json::Value) -> Result<OrderRequest, InputError> {
    let order: OrderRequest = serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        InputError::new(path, e.into_inner())
    })?;
    text("customer_id", &order.customer_id, 128)?;
    if order.items.is_empty() {
        return Err(InputError::new("items", "an order needs at least one item"));
    }
    if order.items.len() > MAX_ITEMS {
        return Err(InputError::new("items", format!("an order has at most {MAX_ITEMS} items")));
    }
    let mut total: u64 = 0;
    for (i, item) in order.items.iter().enumerate() {
        text(&format!("items[{i}].sku"), &item.sku, 64)?;
        if item.quantity < 1 || item.quantity > MAX_QUANTITY {
            return Err(InputError::new(
                format!("items[{i}].quantity"),
                format!("must be between 1 and {MAX_QUANTITY}"),
            ));
        }
        if item.unit_price_cents > MAX_UNIT_PRICE {
            return Err(InputError::new(
                format!("items[{i}].unit_price_cents"),
                format!("must be at most {MAX_UNIT_PRICE}"),
            ));
        }
        total = total.saturating_add(u64::from(item.quantity) * item.unit_price_cents);
    }
    if total > i64::MAX as u64 {
        return Err(InputError::new("items", "the order total is too large"));
    }
    if !CURRENCIES.contains(&order.currency.as_str()) {
        return Err(InputError::new(
            "currency",
            format!("unknown currency '{}'; use one of {}", order.currency, CURRENCIES.join(", ")),
        ));
    }
    text("payment.token", &order.payment.token, 128)?;
    text("ship_to.name", &order.ship_to.name, 200)?;
    text("ship_to.line1", &order.ship_to.line1, 200)?;
    if let Some(line2) = &order.ship_to.line2 {
        if line2.chars().count() > 200 {
            return Err(InputError::new("ship_to.line2", "must be at most 200 characters"));
        }
    }
    text("ship_to.city", &order.ship_to.city, 100)?;
    text("ship_to.postal_code", &order.ship_to.postal_code, 20)?;
    let country = &order.ship_to.country;
    if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(InputError::new("ship_to.country", "must be a two-letter ISO 3166-1 code in upper case, e.g. US"));
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn valid() -> serde_json::Value {
        json!({"customer_id": "c-42",
               "items": [{"sku": "SKU-1", "quantity": 2, "unit_price_cents": 1250}],
               "currency": "USD", "payment": {"token": "tok_visa"},
               "ship_to": {"name": "Ada", "line1": "1 Main St", "city": "Springfield", "postal_code": "12345", "country": "US"}})
    }

    fn field_of(v: serde_json::Value) -> Option<String> {
        parse(&v).err().map(|e| e.field).filter(|f| !f.is_empty())
    }

    #[test]
    fn accepts_the_spec_example() {
        assert!(parse(&valid()).is_ok());
    }

    #[test]
    fn names_the_offending_field() {
        let mut v = valid();
        v["items"] = json!([]);
        assert_eq!(field_of(v).as_deref(), Some("items"));
        let mut v = valid();
        v["items"][0]["quantity"] = json!(0);
        assert_eq!(field_of(v).as_deref(), Some("items[0].quantity"));
        let mut v = valid();
        v["items"][0]["quantity"] = json!("two");
        assert_eq!(field_of(v).as_deref(), Some("items[0].quantity"));
        let mut v = valid();
        v["currency"] = json!("XYZ");
        assert_eq!(field_of(v).as_deref(), Some("currency"));
        let mut v = valid();
        v["ship_to"]["country"] = json!("usa");
        assert_eq!(field_of(v).as_deref(), Some("ship_to.country"));
        let mut v = valid();
        v.as_object_mut().unwrap().remove("payment");
        assert!(parse(&v).unwrap_err().message.contains("payment"));
        let mut v = valid();
        v["extra"] = json!(1);
        assert!(parse(&v).unwrap_err().message.contains("extra"));
    }

    #[test]
    fn text_of_white_space_only_is_empty_by_the_schemas_measure_too() {
        // U+FEFF is white space to the schemas' ECMAScript `\s`, not to Rust's `trim`.
        for blank in ["", "  ", "\u{feff}", " \u{feff}\u{3000}"] {
            let mut v = valid();
            v["customer_id"] = json!(blank);
            assert_eq!(field_of(v).as_deref(), Some("customer_id"), "{blank:?}");
        }
        let mut v = valid();
        v["customer_id"] = json!(" c\u{feff}42 ");
        assert!(parse(&v).is_ok());
    }
}
