//! Built-in saga types: definitions that ship with the host, each in its own module and
//! registered in [`ALL`].
//!
//! The generic host (catalog, HTTP, driver) knows no saga type by name. It installs what
//! [`ALL`] lists at start-up, looks up input validation by saga type ([`validate_input`]), and
//! asks here where a saga's resource lives ([`location`]). A second built-in touches only
//! [`ALL`] and its own module.
//!
//! This module must not do IO: the catalog stores and compiles the plugins it names.

pub mod order;
pub mod order_http;

use crate::engine::{PluginRef, SagaDefinition};

/// The installed version of a built-in's plugin, by plugin name.
pub type PluginsByName<'a> = dyn Fn(&str) -> PluginRef + 'a;

/// A saga type that ships with the host.
pub struct Builtin {
    pub saga_type: &'static str,
    /// What one saga of this type is called in messages, e.g. `order`.
    pub noun: &'static str,
    /// The collection route of its own, e.g. `/orders`, besides `/sagas/{type}`.
    pub route: Option<&'static str>,
    /// `(plugin name, component bytes)`: the components its definition binds, embedded.
    pub plugins: &'static [(&'static str, &'static [u8])],
    /// The definition, given the installed version of each of its plugins by name.
    pub definition: fn(&PluginsByName) -> SagaDefinition,
    /// Checks a saga input before anything is stored.
    pub validate: fn(&serde_json::Value) -> Result<(), InputError>,
    /// Input fields (JSON pointers) redacted whatever an operator's definition says (SPEC §8:
    /// an order's payment token never shows).
    pub sensitive: &'static [&'static str],
}

/// The input fields a definition of `saga_type` always redacts: a built-in type's, else none.
pub fn required_sensitive(saga_type: &str) -> &'static [&'static str] {
    ALL.iter().find(|b| b.saga_type == saga_type).map_or(&[], |b| b.sensitive)
}

/// Every built-in saga type.
pub const ALL: &[Builtin] = &[order::BUILTIN, order_http::BUILTIN];

/// Why a saga input was refused: the offending field (a path such as `items[0].quantity`;
/// empty for the whole input) and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", if field.is_empty() { String::new() } else { format!("{field}: ") })]
pub struct InputError {
    pub field: String,
    pub message: String,
}

impl InputError {
    pub fn new(field: impl Into<String>, message: impl std::fmt::Display) -> InputError {
        InputError { field: field.into(), message: message.to_string() }
    }
}

/// Is this text blank: every character white space by Unicode (Rust's `char::is_whitespace`)
/// or U+FEFF? Exactly the characters the API's schema patterns do not count as text: they are
/// ECMAScript regexes, whose `\s` takes U+FEFF but not U+0085 (the patterns exclude U+0085
/// by name or as a control character). So a client validating against the OpenAPI document
/// and the server agree on what is blank.
pub fn is_blank(text: &str) -> bool {
    text.chars().all(|c| c.is_whitespace() || c == '\u{feff}')
}

/// The built-in of a saga type, if it is one.
pub fn find(saga_type: &str) -> Option<&'static Builtin> {
    ALL.iter().find(|b| b.saga_type == saga_type)
}

/// Validates a saga input: a built-in's own rules, otherwise any JSON object.
pub fn validate_input(saga_type: &str, input: &serde_json::Value) -> Result<(), InputError> {
    match find(saga_type) {
        Some(b) => (b.validate)(input),
        None if input.is_object() => Ok(()),
        None => Err(InputError::new("", "the saga input must be a JSON object")),
    }
}

/// The collection a saga type's sagas are listed under: its own route, or `/sagas/{type}`.
pub fn collection(saga_type: &str) -> String {
    match find(saga_type).and_then(|b| b.route) {
        Some(route) => route.to_owned(),
        None => format!("/sagas/{saga_type}"),
    }
}

/// Where one saga lives, e.g. `/orders/{id}` or `/sagas/{type}/{id}`.
pub fn location(saga_type: &str, id: &str) -> String {
    format!("{}/{id}", collection(saga_type))
}

/// What one saga of a type is called in messages: its built-in noun, or `{type} saga`.
pub fn noun(saga_type: &str) -> String {
    match find(saga_type) {
        Some(b) => b.noun.to_owned(),
        None => format!("{saga_type} saga"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_is_what_the_schema_patterns_do_not_count_as_text() {
        // The characters where Unicode's white space and ECMAScript's `\s` differ.
        assert!(is_blank("\u{85}"), "NEL: white space by Unicode; the pattern excludes it by name");
        assert!(is_blank("\u{feff}"), "BOM: ECMAScript's \\s takes it");
        assert!(is_blank(" \t\n\u{a0}\u{2028}\u{3000}"));
        assert!(is_blank(""));
        assert!(!is_blank(" refunded "));
        assert!(!is_blank("\u{200b}"), "zero-width space is not white space to either");
    }

    #[test]
    fn routes_and_nouns_come_from_the_builtin_list() {
        assert_eq!(location(order::SAGA_TYPE, "x"), "/orders/x");
        assert_eq!(location("refund", "x"), "/sagas/refund/x");
        assert_eq!(noun(order::SAGA_TYPE), order::BUILTIN.noun);
        assert_eq!(noun("refund"), "refund saga");
    }

    #[test]
    fn custom_types_take_any_object_and_builtins_their_own_rules() {
        assert!(validate_input("refund", &serde_json::json!({ "a": 1 })).is_ok());
        assert_eq!(validate_input("refund", &serde_json::json!([1])).unwrap_err().field, "");
        assert!(validate_input(order::SAGA_TYPE, &serde_json::json!({ "a": 1 })).is_err());
    }

    #[test]
    fn every_builtin_definition_is_valid_and_binds_only_its_own_plugins() {
        for b in ALL {
            let def = (b.definition)(&|name| PluginRef { plugin: name.to_owned(), digest: format!("sha256:{name}") });
            assert_eq!(def.saga_type, b.saga_type);
            def.validate().unwrap();
            def.validate_labels().unwrap();
            for step in &def.steps {
                assert!(b.plugins.iter().any(|(name, _)| *name == step.execute.plugin), "{}", step.name);
            }
        }
    }
}
