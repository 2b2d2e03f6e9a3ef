//! The SDK for sagahost saga step plugins.
//!
//! A plugin is a WebAssembly component meeting the WIT world `step` of package
//! `sagahost:plugin@0.2.0` (see `wit/0.2.0/step.wit` in the repository). This
//! crate generates the bindings for that world once, re-exports its types, and
//! adds small helpers for the chores every step has: parsing the `input` JSON,
//! reading and writing typed JSON state, logging, building outcomes, and
//! calling HTTP services ([`http`]).
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
//! The helpers that touch the host (`state`, `log`, `http::Request::send`)
//! only work inside a component. Keep the step's logic in functions that take
//! a [`state::Store`], build an [`http::Request`] or read an
//! [`http::Response`]; unit tests can then run it natively against a
//! [`state::MemoryStore`] and hand-made responses.
//!
//! A component imports only what its code calls: a plugin that never sends a
//! request does not import `wasi:http`, although the world offers it.

use serde::Serialize;

/// The bindings generated from `wit/0.2.0/step.wit` (world `step`), including
/// `wasi:http` and the `wasi:io` pieces it uses.
///
/// Most plugins need only the re-exports at the crate root and [`http`]; this
/// module is public so that [`export!`] can find the generated glue, and so
/// that a plugin can reach the raw `wasi:http` API if the helper does not fit.
#[allow(missing_docs, unsafe_code, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/0.2.0",
        world: "step",
        pub_export_macro: true,
        default_bindings_module: "sagahost_plugin_sdk::bindings",
        // Equality for the step's own types, so tests can compare outcomes
        // (not for all types: the `wasi:io` error resource has none).
        additional_type_attributes: {
            "sagahost:plugin/types@0.2.0/call-context": [#[derive(PartialEq, Eq)]],
            "sagahost:plugin/types@0.2.0/step-outcome": [#[derive(PartialEq, Eq)]],
            "sagahost:plugin/types@0.2.0/wait-request": [#[derive(PartialEq, Eq)]],
            "sagahost:plugin/types@0.2.0/step-error": [#[derive(PartialEq, Eq)]],
        },
        // The world's `wasi:*` imports (http and the io, clocks pieces it
        // uses) are generated here too; no other crate provides them.
        generate_all,
    });
}

pub use bindings::sagahost::plugin::types::{CallContext, StepError, StepOutcome, WaitRequest};
pub use bindings::Guest;

/// Exports a type implementing [`Guest`] as the component's `execute` and
/// `compensate`: `sagahost_plugin_sdk::export!(MyPlugin);` once, at the root of
/// the plugin crate.
pub use bindings::export;

pub mod http;

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
    /// `{"input": <saga input>, "steps": {"<step>": <output>, ...}, "config": {...}}`.
    #[derive(Debug, Clone, Deserialize)]
    pub struct StepInput<T> {
        /// The saga's input (for the `order` saga, the order).
        pub input: T,
        /// The outputs of the steps completed before this one, by step name.
        #[serde(default)]
        pub steps: Map<String, Value>,
        /// The step's `config` object from the saga definition (for example
        /// the base URL of the service it calls); empty when it has none.
        #[serde(default, deserialize_with = "null_as_empty")]
        pub config: Map<String, Value>,
    }

    impl<T> StepInput<T> {
        /// The string under `key` in [`config`](Self::config): `Ok(None)` when
        /// absent or `null`, a rejection (`invalid input: config.<key> must be a
        /// string`) when it is something else.
        pub fn config_str(&self, key: &str) -> Result<Option<&str>, StepError> {
            match self.config.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(_) => Err(invalid(format!("config.{key} must be a string"))),
            }
        }
    }

    /// `config` may be absent or `null` as well as an object: both mean empty.
    fn null_as_empty<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Map<String, Value>, D::Error> {
        Ok(Option::<Map<String, Value>>::deserialize(deserializer)?.unwrap_or_default())
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
    use std::ops::Bound;

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

    /// Lists up to `limit` keys of the host's state that start with `prefix`,
    /// in byte order, strictly after `after` when given, with their values.
    /// See [`Store::scan`].
    pub fn scan(prefix: &str, after: Option<&str>, limit: u32) -> Vec<(String, Vec<u8>)> {
        host::scan(prefix, after, limit)
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

    /// The most entries one `scan` returns, whatever `limit` asks for.
    pub const MAX_SCAN_LIMIT: u32 = 1000;

    /// A key-value store a step's logic runs against: the host's state in a
    /// component ([`HostStore`]), a map in unit tests ([`MemoryStore`]).
    pub trait Store {
        /// Reads a key. `None` if absent.
        fn get(&self, key: &str) -> Option<Vec<u8>>;
        /// Writes a key.
        fn set(&mut self, key: &str, value: &[u8]);
        /// Deletes a key.
        fn delete(&mut self, key: &str);
        /// One page of the keys starting with `prefix`, in byte order, with
        /// their values: the keys strictly after `after` (when given), at most
        /// `limit` of them (the host caps `limit` at [`MAX_SCAN_LIMIT`]). To
        /// page on, pass the last key of a page as the next `after`; an empty
        /// page means there is nothing more.
        fn scan(&self, prefix: &str, after: Option<&str>, limit: u32) -> Vec<(String, Vec<u8>)>;

        /// Reads a key as JSON: `Ok(None)` if absent, `Err` (retryable) if the
        /// stored bytes are not a valid `T`. Retrying helps `compensate`, which
        /// runs the version bound when each call starts: a fixed version bound
        /// meanwhile takes over. `execute` is pinned per saga, so a saga in
        /// flight retries the same version until its retry budget is spent,
        /// and then the step counts as rejected and the saga compensates.
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
        fn scan(&self, prefix: &str, after: Option<&str>, limit: u32) -> Vec<(String, Vec<u8>)> {
            host::scan(prefix, after, limit)
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
        fn scan(&self, prefix: &str, after: Option<&str>, limit: u32) -> Vec<(String, Vec<u8>)> {
            // `str` orders by bytes, as the host does. Start at the prefix, or
            // just past `after` when that lies at or beyond it.
            let start = match after {
                Some(after) if after >= prefix => Bound::Excluded(after),
                _ => Bound::Included(prefix),
            };
            let limit = limit.min(MAX_SCAN_LIMIT) as usize;
            self.entries
                .range::<str, _>((start, Bound::Unbounded))
                .take_while(|(key, _)| key.starts_with(prefix))
                .take(limit)
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect()
        }
    }
}

/// Call contexts for unit tests of a step's logic, as the host builds them.
///
/// ```
/// use sagahost_plugin_sdk::testing;
///
/// let first = testing::execute_context("o-1", "payment");
/// assert_eq!(first.idempotency_key, "o-1:payment:execute");
/// let third = first.with_attempt(3);
/// let woken = testing::execute_context("o-1", "payment")
///     .with_signal("payment-confirmed", r#"{"ok":true}"#);
/// let undo = testing::compensate_context("o-1", "payment");
/// # assert_eq!((third.attempt, woken.signal_name.as_deref()), (3, Some("payment-confirmed")));
/// # assert_eq!(undo.idempotency_key, "o-1:payment:compensate");
/// ```
pub mod testing {
    use crate::CallContext;

    /// The saga type these contexts carry unless [`CallContext::with_saga_type`] says otherwise.
    pub const SAGA_TYPE: &str = "test";

    fn context(saga_id: &str, step: &str, export: &str) -> CallContext {
        CallContext {
            saga_id: saga_id.to_string(),
            saga_type: SAGA_TYPE.to_string(),
            step: step.to_string(),
            attempt: 1,
            idempotency_key: format!("{saga_id}:{step}:{export}"),
            signal: None,
            signal_name: None,
        }
    }

    /// The context of the first `execute` attempt of `step` in saga `saga_id`:
    /// attempt 1, idempotency key `{saga_id}:{step}:execute`, no signal.
    pub fn execute_context(saga_id: &str, step: &str) -> CallContext {
        context(saga_id, step, "execute")
    }

    /// The context of the first `compensate` attempt of `step` in saga `saga_id`:
    /// attempt 1, idempotency key `{saga_id}:{step}:compensate`.
    pub fn compensate_context(saga_id: &str, step: &str) -> CallContext {
        context(saga_id, step, "compensate")
    }

    impl CallContext {
        /// The same context on attempt `attempt` (the host counts from 1; the
        /// idempotency key stays the same on every attempt).
        pub fn with_attempt(mut self, attempt: u32) -> Self {
            self.attempt = attempt;
            self
        }

        /// The same context woken by the signal `name` with JSON `payload`.
        pub fn with_signal(mut self, name: &str, payload: &str) -> Self {
            self.signal_name = Some(name.to_string());
            self.signal = Some(payload.to_string());
            self
        }

        /// The same context for a saga of type `saga_type` (default [`SAGA_TYPE`]).
        pub fn with_saga_type(mut self, saga_type: &str) -> Self {
            self.saga_type = saga_type.to_string();
            self
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

    /// Logs `{step} execute attempt {n}: {outcome}` at `info` and hands `result` back: the one
    /// line a step's `execute` usually logs, e.g.
    /// `log::execution("inventory", &ctx, execute(&ctx, &input))`.
    pub fn execution(
        step: &str,
        ctx: &crate::CallContext,
        result: Result<crate::StepOutcome, crate::StepError>,
    ) -> Result<crate::StepOutcome, crate::StepError> {
        info(&format!(
            "{step} execute attempt {}: {}",
            ctx.attempt,
            crate::describe_outcome(&result)
        ));
        result
    }

    /// Logs `{step} compensate attempt {n}: {result}` at `info` and hands `result` back.
    pub fn compensation(
        step: &str,
        ctx: &crate::CallContext,
        result: Result<String, crate::StepError>,
    ) -> Result<String, crate::StepError> {
        info(&format!(
            "{step} compensate attempt {}: {}",
            ctx.attempt,
            crate::describe_compensation(&result)
        ));
        result
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
    fn config_defaults_to_empty() {
        for raw in [
            r#"{"input": {"customer_id": "c-1"}}"#,
            r#"{"input": {"customer_id": "c-1"}, "config": null}"#,
            r#"{"input": {"customer_id": "c-1"}, "config": {}}"#,
        ] {
            let parsed = input::parse::<Order>(raw).unwrap();
            assert!(parsed.config.is_empty(), "{raw}");
            assert_eq!(parsed.config_str("base_url"), Ok(None));
        }
        let parsed = input::parse::<Order>(
            r#"{"input": {"customer_id": "c-1"}, "config": {"base_url": "http://h:1", "n": 2}}"#,
        )
        .unwrap();
        assert_eq!(parsed.config_str("base_url"), Ok(Some("http://h:1")));
        assert_eq!(
            parsed.config_str("n"),
            Err(StepError::Rejected(
                "invalid input: config.n must be a string".into()
            ))
        );
        assert!(input::parse::<Order>(r#"{"input": {"customer_id": "c"}, "config": []}"#).is_err());
    }

    #[test]
    fn scan_pages_in_byte_order() {
        let mut store = MemoryStore::new();
        for key in ["b/2", "a/1", "b/1", "b/10", "b/\u{e9}", "b0", "c/1", "b/"] {
            store.set(key, key.as_bytes());
        }
        let keys = |page: Vec<(String, Vec<u8>)>| -> Vec<String> {
            page.into_iter()
                .map(|(k, v)| {
                    assert_eq!(k.as_bytes(), v.as_slice());
                    k
                })
                .collect()
        };
        assert_eq!(
            keys(store.scan("b/", None, 100)),
            ["b/", "b/1", "b/10", "b/2", "b/\u{e9}"]
        );
        assert_eq!(keys(store.scan("b/", None, 2)), ["b/", "b/1"]);
        assert_eq!(keys(store.scan("b/", Some("b/1"), 2)), ["b/10", "b/2"]);
        assert_eq!(keys(store.scan("b/", Some("b/2"), 2)), ["b/\u{e9}"]);
        assert!(store.scan("b/", Some("b/\u{e9}"), 2).is_empty());
        // `after` before the prefix starts at the prefix; past it, nothing.
        assert_eq!(keys(store.scan("b/", Some("a"), 1)), ["b/"]);
        assert!(store.scan("b/", Some("c"), 10).is_empty());
        assert!(store.scan("b/", None, 0).is_empty());
        assert_eq!(store.scan("", None, 100).len(), 8);
        assert_eq!(store.writes, 8, "scans write nothing");

        for i in 0..1005 {
            store.set(&format!("many/{i:04}"), b"");
        }
        assert_eq!(store.scan("many/", None, u32::MAX).len(), 1000);
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
