//! `{{name}}`: a sagahost saga step.
//!
//! `execute` does the step's work and `compensate` undoes it. Both may be called more than once
//! for the same saga (a retry, a host restart): make them idempotent, keyed by the saga id or
//! by `ctx.idempotency_key`, and keep everything durable in `state`, whose writes commit with
//! the step's result.

use sagahost_plugin_sdk::state::{HostStore, Store};
use sagahost_plugin_sdk::{done, input, log, to_json, CallContext, Guest, StepError, StepOutcome};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// What this step remembers per saga, under `record/{saga_id}`.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    status: String,
}

fn record_key(saga_id: &str) -> String {
    format!("record/{saga_id}")
}

/// The forward action. `raw_input` is `{"input": <saga input>, "steps": {...}, "config": {...}}`.
fn execute(store: &mut impl Store, ctx: &CallContext, raw_input: &str) -> Result<StepOutcome, StepError> {
    let step_input = input::parse::<Value>(raw_input)?;
    let key = record_key(&ctx.saga_id);
    if store.try_get_json::<Record>(&key)?.is_none() {
        // A real step calls its service here (see the SDK's `http` module) and rejects with
        // `StepError::Rejected` for a business "no", or `StepError::Retryable` for a hiccup.
        store.set_json(&key, &Record { status: "done".to_string() })?;
    }
    done(&json!({ "saga_id": ctx.saga_id, "fields": step_input.input.as_object().map_or(0, |o| o.len()) }))
}

/// The compensating action: undoes `execute`, once, whatever happened before.
fn compensate(store: &mut impl Store, ctx: &CallContext) -> Result<String, StepError> {
    let key = record_key(&ctx.saga_id);
    let undone = match store.try_get_json::<Record>(&key)? {
        Some(record) if record.status == "done" => {
            store.set_json(&key, &Record { status: "undone".to_string() })?;
            true
        }
        _ => false,
    };
    to_json(&json!({ "undone": undone }))
}

struct Step;

impl Guest for Step {
    fn execute(ctx: CallContext, input: String) -> Result<StepOutcome, StepError> {
        log::execution("{{name}}", &ctx, execute(&mut HostStore, &ctx, &input))
    }

    fn compensate(ctx: CallContext, _input: String, _output: String) -> Result<String, StepError> {
        log::compensation("{{name}}", &ctx, compensate(&mut HostStore, &ctx))
    }
}

sagahost_plugin_sdk::export!(Step);

#[cfg(test)]
mod tests {
    use super::*;
    use sagahost_plugin_sdk::state::MemoryStore;
    use sagahost_plugin_sdk::testing;

    const INPUT: &str = r#"{"input": {"customer_id": "c-1"}, "steps": {}}"#;

    #[test]
    fn execute_records_once_and_compensate_undoes_once() {
        let mut store = MemoryStore::new();
        let ctx = testing::execute_context("s-1", "{{name}}");
        let first = execute(&mut store, &ctx, INPUT).unwrap();
        assert_eq!(first, StepOutcome::Done(r#"{"fields":1,"saga_id":"s-1"}"#.to_string()));
        // A retry (or a rerun after a crash) writes nothing more and answers the same.
        assert_eq!(execute(&mut store, &ctx.clone().with_attempt(2), INPUT).unwrap(), first);
        assert_eq!(store.writes, 1);

        let undo = testing::compensate_context("s-1", "{{name}}");
        assert_eq!(compensate(&mut store, &undo).unwrap(), r#"{"undone":true}"#);
        assert_eq!(compensate(&mut store, &undo.with_attempt(2)).unwrap(), r#"{"undone":false}"#);
    }

    #[test]
    fn malformed_input_is_rejected() {
        let err = execute(&mut MemoryStore::new(), &testing::execute_context("s-1", "{{name}}"), "{").unwrap_err();
        assert!(matches!(err, StepError::Rejected(m) if m.starts_with("invalid input")));
    }
}
