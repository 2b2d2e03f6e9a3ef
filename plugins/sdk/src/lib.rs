//! The SDK for sagahost saga step plugins.
//!
//! A plugin is a WebAssembly component meeting the WIT world `step` of package
//! `sagahost:plugin@0.1.0` (see `wit/step.wit` in the repository). This crate
//! generates the bindings for that world once, re-exports its types, and adds
//! small helpers for the chores every step has: parsing the `input` JSON,
//! reading and writing typed JSON state, logging, and building outcomes.
//!
//! A plugin crate is a `cdylib` built for `wasm32-wasip2`:
//!
//! ```no_run
//! use sagahost_plugin_sdk::{log, CallContext, Guest, StepError, StepOutcome};
//!
//! struct Hello;
//!
//! impl Guest for Hello {
//!     fn execute(ctx: CallContext, _input: String) -> Result<StepOutcome, StepError> {
//!         log::info(&format!("hello from {}", ctx.saga_id));
//!         sagahost_plugin_sdk::done(&serde_json::json!({"ok": true}))
//!     }
//!
//!     fn compensate(_ctx: CallContext, _input: String, _output: String) -> Result<String, StepError> {
//!         Ok("{}".to_string())
//!     }
//! }
//!
//! sagahost_plugin_sdk::export!(Hello);
//! ```
//!
//! The helpers that touch the host (`state`, `log`) only work inside a
//! component. Keep the step's logic in functions that take a
//! [`state::Store`]; unit tests can then run it natively against a
//! [`state::MemoryStore`].

use serde::Serialize;

/// The bindings generated from `wit/step.wit` (world `step`).
///
/// Most plugins need only the re-exports at the crate root; this module is
/// public so that [`export!`] can find the generated glue.
#[allow(missing_docs, unsafe_code, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/0.1.0",
        world: "step",
        pub_export_macro: true,
        default_bindings_module: "sagahost_plugin_sdk::bindings",
        additional_derives: [PartialEq, Eq],
    });
}

pub use bindings::sagahost::plugin::types::{CallContext, StepError, StepOutcome, WaitRequest};
pub use bindings::Guest;

/// Exports a type implementing [`Guest`] as the component's `execute` and
/// `compensate`: `sagahost_plugin_sdk::export!(MyPlugin);` once, at the root of
/// the plugin crate.
pub use bindings::export;

/// Serializes `output` and returns it as a `done` outcome.
///
/// Serialization only fails for types that cannot be JSON (e.g. maps with
/// non-string keys); that is reported as a rejection naming the cause.
pub fn done<T: Serialize + ?Sized>(output: &T) -> Result<StepOutcome, StepError> {
    to_json(output).map(StepOutcome::Done)
}

/// Serializes `value` as a JSON string, e.g. for `compensate`'s result.
///
/// A value that cannot be serialized gives `StepError::Rejected`.
pub fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<String, StepError> {
    serde_json::to_string(value)
        .map_err(|e| StepError::Rejected(format!("output is not serializable: {e}")))
}

/// Parsing the `input` argument of `execute` and `compensate`.
pub mod input {
    use serde::de::DeserializeOwned;
    use serde::Deserialize;
    use serde_json::{Map, Value};

    use crate::StepError;

    /// The `input` JSON a step receives:
    /// `{"input": <saga input>, "steps": {"<step>": <output>, ...}}`.
    #[derive(Debug, Clone, Deserialize)]
    pub struct StepInput<T> {
        /// The saga's input (for the `order` saga, the order).
        pub input: T,
        /// The outputs of the steps completed before this one, by step name.
        #[serde(default)]
        pub steps: Map<String, Value>,
    }

    /// Parses the `input` argument, deserializing the saga input as `T`.
    ///
    /// Malformed JSON or a saga input that does not fit `T` gives
    /// `StepError::Rejected("invalid input: ...")`: retrying cannot fix it.
    pub fn parse<T: DeserializeOwned>(input: &str) -> Result<StepInput<T>, StepError> {
        serde_json::from_str(input).map_err(invalid)
    }

    /// A rejection for malformed input: `invalid input: {reason}`.
    pub fn invalid(reason: impl std::fmt::Display) -> StepError {
        StepError::Rejected(format!("invalid input: {reason}"))
    }
}

/// The plugin's durable key-value state, as raw bytes or typed JSON.
///
/// Writes are buffered by the host and committed with the step's result; they
/// vanish if the call fails (see the WIT `state` interface).
pub mod state {
    use std::collections::BTreeMap;

    use serde::de::DeserializeOwned;
    use serde::Serialize;

    use crate::bindings::sagahost::plugin::state as host;
    use crate::StepError;

    /// Reads a key from the host's state. `None` if absent.
    pub fn get(key: &str) -> Option<Vec<u8>> {
        host::get(key)
    }

    /// Writes a key in the host's state.
    pub fn set(key: &str, value: &[u8]) {
        host::set(key, value)
    }

    /// Deletes a key from the host's state.
    pub fn delete(key: &str) {
        host::delete(key)
    }

    /// Reads a key from the host's state and parses it as JSON.
    ///
    /// `None` if the key is absent or does not hold a valid `T`; use
    /// [`Store::try_get_json`] to tell the two apart.
    pub fn get_json<T: DeserializeOwned>(key: &str) -> Option<T> {
        HostStore.try_get_json(key).ok().flatten()
    }

    /// Writes `value` as JSON under a key in the host's state.
    ///
    /// # Panics
    ///
    /// If `value` cannot be serialized as JSON (a map with non-string keys, for
    /// example); use [`Store::set_json`] to get an error instead.
    pub fn set_json<T: Serialize + ?Sized>(key: &str, value: &T) {
        if let Err(e) = HostStore.set_json(key, value) {
            panic!("state::set_json({key}): {e:?}");
        }
    }

    /// A key-value store a step's logic runs against: the host's state in a
    /// component ([`HostStore`]), a map in unit tests ([`MemoryStore`]).
    pub trait Store {
        /// Reads a key. `None` if absent.
        fn get(&self, key: &str) -> Option<Vec<u8>>;
        /// Writes a key.
        fn set(&mut self, key: &str, value: &[u8]);
        /// Deletes a key.
        fn delete(&mut self, key: &str);

        /// Reads a key as JSON: `Ok(None)` if absent, `Err` (retryable, since
        /// a later plugin version may fix it) if the stored bytes are not a
        /// valid `T`.
        fn try_get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StepError> {
            match self.get(key) {
                None => Ok(None),
                Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                    StepError::Retryable(format!("state {key} holds unexpected data: {e}"))
                }),
            }
        }

        /// Writes `value` as JSON under a key.
        fn set_json<T: Serialize + ?Sized>(
            &mut self,
            key: &str,
            value: &T,
        ) -> Result<(), StepError> {
            let bytes = serde_json::to_vec(value).map_err(|e| {
                StepError::Rejected(format!("state {key}: value is not serializable: {e}"))
            })?;
            self.set(key, &bytes);
            Ok(())
        }
    }

    /// The host's state, through the `state` import. Only usable in a component.
    #[derive(Debug, Default, Clone, Copy)]
    pub struct HostStore;

    impl Store for HostStore {
        fn get(&self, key: &str) -> Option<Vec<u8>> {
            host::get(key)
        }
        fn set(&mut self, key: &str, value: &[u8]) {
            host::set(key, value)
        }
        fn delete(&mut self, key: &str) {
            host::delete(key)
        }
    }

    /// An in-memory store for unit tests of a step's logic.
    #[derive(Debug, Default, Clone, PartialEq, Eq)]
    pub struct MemoryStore {
        /// The stored keys and values.
        pub entries: BTreeMap<String, Vec<u8>>,
        /// How many `set` and `delete` calls were made.
        pub writes: usize,
    }

    impl MemoryStore {
        /// An empty store.
        pub fn new() -> Self {
            Self::default()
        }

        /// The value under `key` parsed as JSON, if present and valid.
        pub fn json(&self, key: &str) -> Option<serde_json::Value> {
            self.entries
                .get(key)
                .and_then(|b| serde_json::from_slice(b).ok())
        }
    }

    impl Store for MemoryStore {
        fn get(&self, key: &str) -> Option<Vec<u8>> {
            self.entries.get(key).cloned()
        }
        fn set(&mut self, key: &str, value: &[u8]) {
            self.writes += 1;
            self.entries.insert(key.to_string(), value.to_vec());
        }
        fn delete(&mut self, key: &str) {
            self.writes += 1;
            self.entries.remove(key);
        }
    }
}

/// Logging into the host's log (tagged by the host with saga id and step).
///
/// The host caps lines per call; lines past the cap are dropped.
pub mod log {
    use crate::bindings::sagahost::plugin::log as host;

    pub use host::Level;

    /// Writes one line at `level`.
    pub fn log(level: Level, message: &str) {
        host::log(level, message)
    }

    /// Writes one line at level `trace`.
    pub fn trace(message: &str) {
        log(Level::Trace, message)
    }

    /// Writes one line at level `debug`.
    pub fn debug(message: &str) {
        log(Level::Debug, message)
    }

    /// Writes one line at level `info`.
    pub fn info(message: &str) {
        log(Level::Info, message)
    }

    /// Writes one line at level `warn`.
    pub fn warn(message: &str) {
        log(Level::Warn, message)
    }

    /// Writes one line at level `error`.
    pub fn error(message: &str) {
        log(Level::Error, message)
    }
}

/// A one-line description of an `execute` result, for logs.
pub fn describe_outcome(result: &Result<StepOutcome, StepError>) -> String {
    match result {
        Ok(StepOutcome::Done(output)) => format!("done {output}"),
        Ok(StepOutcome::Wait(w)) => match (&w.signal, w.delay_ms) {
            (Some(s), Some(d)) => format!("wait for signal {s} or {d} ms"),
            (Some(s), None) => format!("wait for signal {s}"),
            (None, Some(d)) => format!("wait {d} ms"),
            (None, None) => "wait".to_string(),
        },
        Err(e) => describe_error(e),
    }
}

/// A one-line description of a `compensate` result, for logs.
pub fn describe_compensation(result: &Result<String, StepError>) -> String {
    match result {
        Ok(output) => format!("ok {output}"),
        Err(e) => describe_error(e),
    }
}

fn describe_error(error: &StepError) -> String {
    match error {
        StepError::Retryable(m) => format!("retryable: {m}"),
        StepError::Rejected(m) => format!("rejected: {m}"),
    }
}

#[cfg(test)]
mod tests {
    use super::state::{MemoryStore, Store};
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Order {
        customer_id: String,
    }

    #[test]
    fn parses_input_and_steps() {
        let parsed = input::parse::<Order>(r#"{"input": {"customer_id": "c-1"}}"#).unwrap();
        assert_eq!(
            parsed.input,
            Order {
                customer_id: "c-1".into()
            }
        );
        assert!(parsed.steps.is_empty());

        let parsed =
            input::parse::<Order>(r#"{"input": {"customer_id": "c-1"}, "steps": {"a": 1}}"#)
                .unwrap();
        assert_eq!(parsed.steps["a"], 1);
    }

    #[test]
    fn malformed_input_is_a_rejection() {
        for bad in ["", "{}", r#"{"input": {"customer_id": 5}}"#] {
            match input::parse::<Order>(bad) {
                Err(StepError::Rejected(m)) => assert!(m.starts_with("invalid input: "), "{m}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn json_state_round_trips() {
        let mut store = MemoryStore::new();
        assert_eq!(store.try_get_json::<u32>("k"), Ok(None));
        store.set_json("k", &42u32).unwrap();
        assert_eq!(store.try_get_json::<u32>("k"), Ok(Some(42)));
        store.set("bad", b"not json");
        assert!(matches!(
            store.try_get_json::<u32>("bad"),
            Err(StepError::Retryable(_))
        ));
        store.delete("k");
        assert_eq!(store.try_get_json::<u32>("k"), Ok(None));
        assert_eq!(store.writes, 3);
    }

    #[test]
    fn outcomes_serialize_and_describe() {
        let outcome = done(&serde_json::json!({"a": 1}));
        assert_eq!(outcome, Ok(StepOutcome::Done(r#"{"a":1}"#.into())));
        assert_eq!(describe_outcome(&outcome), r#"done {"a":1}"#);
        let wait = Ok(StepOutcome::Wait(WaitRequest {
            delay_ms: None,
            signal: Some("s".into()),
        }));
        assert_eq!(describe_outcome(&wait), "wait for signal s");
        let failed: Result<String, StepError> = Err(StepError::Rejected("no".into()));
        assert_eq!(describe_compensation(&failed), "rejected: no");
    }
}
