//! Saga definitions as data: the ordered steps, their plugin bindings and policies.
//!
//! A definition is validated once, when it is registered; the engine trusts it afterwards.
//! Nothing here does IO.

use serde::{Deserialize, Serialize};

/// Which plugin version a step calls: the plugin's name (its state space) and the
/// SHA-256 digest of the exact component bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginRef {
    pub plugin: String,
    /// `sha256:<64 hex digits>`.
    pub digest: String,
}

/// Exponential backoff with jitter: attempt `n` (1-based) that failed waits
/// `min(max_backoff, initial * 2^(n-1))`, of which the upper half is jittered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Total attempts, including the first. At least 1.
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
}

impl RetryPolicy {
    /// The default for forward steps.
    pub const EXECUTE: RetryPolicy = RetryPolicy { max_attempts: 5, initial_backoff_ms: 100, max_backoff_ms: 5_000 };
    /// The default compensation budget: compensations must finish, so they get more room.
    pub const COMPENSATE: RetryPolicy =
        RetryPolicy { max_attempts: 20, initial_backoff_ms: 100, max_backoff_ms: 30_000 };

    /// The delay before the attempt after `failed_attempt`, given a jitter draw in `[0, 1)`.
    ///
    /// "Equal jitter": half the exponential delay is fixed, half is random. The fixed half
    /// keeps a floor under retry storms; the random half spreads sagas that failed together.
    pub fn backoff_ms(&self, failed_attempt: u32, jitter: f64) -> u64 {
        let exp = failed_attempt.saturating_sub(1).min(62);
        let base = self.initial_backoff_ms.saturating_mul(1u64 << exp).min(self.max_backoff_ms);
        let half = base / 2;
        let jitter = jitter.clamp(0.0, 1.0);
        half + ((base - half) as f64 * jitter) as u64
    }
}

/// One step of a saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepDefinition {
    /// Unique within the definition; later steps see this step's output under this name.
    pub name: String,
    /// The saga status label reached when this step completes, e.g. `PAYMENT_CHARGED`.
    pub state: String,
    pub execute: PluginRef,
    pub compensate: PluginRef,
    pub retry: RetryPolicy,
    pub compensate_retry: RetryPolicy,
    /// Wall-clock limit of one plugin call.
    pub timeout_ms: u64,
    /// Limit on the whole step, waits and retries included, from its first attempt.
    pub deadline_ms: Option<u64>,
    /// Settings the step's plugin receives in its input under `config` (for example the base
    /// URL of the service it calls). Not secret: shown by the admin API.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub config: serde_json::Map<String, serde_json::Value>,
}

/// Largest `config` of one step, as JSON.
pub const MAX_CONFIG_BYTES: usize = 16 << 10;

impl StepDefinition {
    /// The compensate binding a saga that pinned `self` uses now, given the step as the saga
    /// type's current definition has it (if it still has it).
    ///
    /// The current binding, so that a fixed compensation can be bound and applied to sagas in
    /// flight or stuck (SPEC §3), but only when it is a version of the plugin that executed:
    /// compensation must see the state its execute wrote (a refund needs the charge record).
    /// A step rebound to another plugin keeps compensating in flight sagas with the pinned one.
    pub fn compensate_binding(&self, current: Option<&StepDefinition>) -> PluginRef {
        match current {
            Some(now) if now.compensate.plugin == self.execute.plugin => now.compensate.clone(),
            _ => self.compensate.clone(),
        }
    }
}

/// An ordered list of steps under a saga type name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaDefinition {
    /// The saga type, e.g. `order`; also the URL segment of `/sagas/{type}`.
    pub saga_type: String,
    pub steps: Vec<StepDefinition>,
    /// Sensitive input fields, as JSON pointers (e.g. `/payment/token`): plugins receive
    /// them, but every response, event and log shows [`REDACTED`] in their place (SPEC §8).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sensitive: Vec<String>,
}

/// What a sensitive field shows instead of its value.
pub const REDACTED: &str = "[redacted]";

/// Status labels the engine reserves; step states may not reuse them.
pub const RESERVED_STATES: [&str; 5] = ["CREATED", "COMPLETED", "COMPENSATING", "CANCELLED", "COMPENSATION_FAILED"];

/// Why a definition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefinitionError {
    /// A field breaks the rules of its own (a name, a label, a bound).
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// Execute and compensate are versions of two plugins: each digest is fine on its own,
    /// but together they cannot work (compensate would not see execute's state).
    #[error("{field}: {message}")]
    PluginMismatch { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> DefinitionError {
    DefinitionError::Invalid { field: field.into(), message: message.into() }
}

fn mismatch(field: impl Into<String>, message: impl Into<String>) -> DefinitionError {
    DefinitionError::PluginMismatch { field: field.into(), message: message.into() }
}

/// Saga type names and step names: lowercase ASCII, digits, `-` and `_`, 1-64 characters.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_lowercase()
}

fn is_valid_state(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 64
        && label.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        && label.as_bytes()[0].is_ascii_uppercase()
}

fn validate_policy(field: &str, p: &RetryPolicy) -> Result<(), DefinitionError> {
    if p.max_attempts == 0 || p.max_attempts > 1_000 {
        return Err(invalid(format!("{field}.max_attempts"), "must be between 1 and 1000"));
    }
    if p.initial_backoff_ms == 0 || p.initial_backoff_ms > p.max_backoff_ms {
        return Err(invalid(format!("{field}.initial_backoff_ms"), "must be at least 1 and at most max_backoff_ms"));
    }
    if p.max_backoff_ms > 24 * 3_600_000 {
        return Err(invalid(format!("{field}.max_backoff_ms"), "must be at most 24 hours"));
    }
    Ok(())
}

impl SagaDefinition {
    /// Every status a saga of this definition can have: the engine's own, then each step's
    /// label in step order.
    pub fn status_labels(&self) -> Vec<&str> {
        RESERVED_STATES.iter().copied().chain(self.steps.iter().map(|s| s.state.as_str())).collect()
    }

    /// Checks the step labels of a definition whose labels are new or changed (a PUT that adds
    /// or renames steps): each the step's own and never an engine event type. Apart from
    /// [`SagaDefinition::validate`] so that a definition stored before these rules keeps taking
    /// binds (a hot swap must not wait for a rename its consumers would see).
    pub fn validate_labels(&self) -> Result<(), DefinitionError> {
        for (i, step) in self.steps.iter().enumerate() {
            let f = |name: &str| format!("steps[{i}].{name}");
            // The label is the saga's status once the step succeeds and, in PascalCase, the
            // type of the event saying so: two steps with one label (or labels with one
            // PascalCase form, `A_B` and `A__B`) make both ambiguous, and a label whose event
            // type is one of the engine's own (`REFUND_COMPLETED` in a `refund` saga, or
            // `STEP_STARTED`) makes a step's success read as the saga's end or another step's
            // start to every consumer.
            let event = pascal(&step.state);
            if let Some(j) = self.steps[..i].iter().position(|s| pascal(&s.state) == event) {
                return Err(invalid(
                    f("state"),
                    format!(
                        "label '{}' is step {j}'s already (as its event type, {event}); give each step its own",
                        step.state
                    ),
                ));
            }
            if self.engine_event_types().contains(&event) {
                return Err(invalid(
                    f("state"),
                    format!("label '{}' gives the event type {event}, which the engine uses for its own events; choose another", step.state),
                ));
            }
        }
        Ok(())
    }

    /// Checks everything the engine relies on; the error names the offending field.
    pub fn validate(&self) -> Result<(), DefinitionError> {
        if !is_valid_name(&self.saga_type) {
            return Err(invalid("name", "use 1-64 lowercase letters, digits, '-' or '_', starting with a letter"));
        }
        if self.steps.is_empty() || self.steps.len() > 64 {
            return Err(invalid("steps", "a saga needs between 1 and 64 steps"));
        }
        for (i, step) in self.steps.iter().enumerate() {
            let f = |name: &str| format!("steps[{i}].{name}");
            if !is_valid_name(&step.name) {
                return Err(invalid(
                    f("name"),
                    "use 1-64 lowercase letters, digits, '-' or '_', starting with a letter",
                ));
            }
            if self.steps[..i].iter().any(|s| s.name == step.name) {
                return Err(invalid(f("name"), format!("step name '{}' is used twice", step.name)));
            }
            if !is_valid_state(&step.state) || RESERVED_STATES.contains(&step.state.as_str()) {
                return Err(invalid(
                    f("state"),
                    "use an UPPER_SNAKE_CASE label that is not one of CREATED, COMPLETED, COMPENSATING, CANCELLED, COMPENSATION_FAILED",
                ));
            }
            // Execute and compensate share the plugin's state space: compensation must see the
            // records its execute wrote, so both bindings are versions of one plugin.
            if step.execute.plugin != step.compensate.plugin {
                return Err(mismatch(
                    f("compensate"),
                    format!(
                        "is a version of plugin '{}' but execute is a version of '{}'; both must be versions of one plugin, \
                         so that compensate sees the state execute wrote",
                        step.compensate.plugin, step.execute.plugin
                    ),
                ));
            }
            validate_policy(&f("retry"), &step.retry)?;
            validate_policy(&f("compensate_retry"), &step.compensate_retry)?;
            if step.timeout_ms == 0 || step.timeout_ms > 3_600_000 {
                return Err(invalid(f("timeout_ms"), "must be between 1 ms and 1 hour"));
            }
            if step.deadline_ms == Some(0) {
                return Err(invalid(f("deadline_ms"), "must be positive or null"));
            }
            if serde_json::to_vec(&step.config).map_or(true, |json| json.len() > MAX_CONFIG_BYTES) {
                return Err(invalid(f("config"), format!("must be at most {MAX_CONFIG_BYTES} bytes of JSON")));
            }
        }
        if self.sensitive.len() > 64 {
            return Err(invalid("sensitive", "name at most 64 sensitive fields"));
        }
        for (i, pointer) in self.sensitive.iter().enumerate() {
            if !pointer.starts_with('/') || pointer.chars().count() > 256 || pointer.chars().any(char::is_control) {
                return Err(invalid(
                    format!("sensitive[{i}]"),
                    "use a JSON pointer into the input such as /payment/token (at most 256 characters)",
                ));
            }
        }
        Ok(())
    }

    /// `input` with every sensitive field that it has replaced by [`REDACTED`].
    pub fn redact(&self, input: &serde_json::Value) -> serde_json::Value {
        let mut out = input.clone();
        for pointer in &self.sensitive {
            if let Some(v) = out.pointer_mut(pointer) {
                *v = serde_json::Value::String(REDACTED.to_owned());
            }
        }
        out
    }

    /// The index of a step by name.
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }

    /// `order` -> `Order`, `account-onboarding` -> `AccountOnboarding`: the prefix of saga-level event types.
    pub fn event_prefix(&self) -> String {
        pascal(&self.saga_type)
    }

    /// The event types the engine gives its own events in a saga of this type (a step's
    /// success is the PascalCase of its label). Keep in step with `engine::apply`.
    pub fn engine_event_types(&self) -> Vec<String> {
        let prefix = self.event_prefix();
        let saga = ["Created", "Compensating", "Completed", "Cancelled", "CompensationFailed", "Resolved"];
        let fixed = [
            "StepStarted",
            "StepWaiting",
            "StepRetryScheduled",
            "StepCompensated",
            "StepCompensationRetryScheduled",
            "SignalReceived",
            "CompensationRetried",
        ];
        saga.iter().map(|s| format!("{prefix}{s}")).chain(fixed.iter().map(|s| (*s).to_owned())).collect()
    }
}

/// `PAYMENT_CHARGED` -> `PaymentCharged`, `account-onboarding` -> `AccountOnboarding`.
pub fn pascal(s: &str) -> String {
    s.split(['_', '-'])
        .filter(|w| !w.is_empty())
        .map(|w| {
            let lower = w.to_ascii_lowercase();
            let mut chars = lower.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_keeps_a_floor() {
        let p = RetryPolicy { max_attempts: 10, initial_backoff_ms: 100, max_backoff_ms: 1_000 };
        assert_eq!(p.backoff_ms(1, 0.0), 50);
        assert_eq!(p.backoff_ms(1, 0.999_999), 99);
        assert_eq!(p.backoff_ms(2, 0.0), 100);
        assert_eq!(p.backoff_ms(3, 0.5), 300);
        assert_eq!(p.backoff_ms(10, 0.0), 500);
        assert_eq!(p.backoff_ms(60, 1.0), 1_000);
        assert_eq!(p.backoff_ms(u32::MAX, 1.0), 1_000);
    }

    #[test]
    fn pascal_case() {
        assert_eq!(pascal("PAYMENT_CHARGED"), "PaymentCharged");
        assert_eq!(pascal("refund"), "Refund");
        assert_eq!(pascal("account-onboarding"), "AccountOnboarding");
    }

    #[test]
    fn execute_and_compensate_must_be_one_plugin() {
        let p = |name: &str| PluginRef { plugin: name.into(), digest: format!("sha256:{name}") };
        let mut def = SagaDefinition {
            sensitive: vec![],
            saga_type: "refund".into(),
            steps: vec![StepDefinition {
                name: "pay".into(),
                state: "PAID".into(),
                execute: p("payment"),
                compensate: p("payment"),
                retry: RetryPolicy::EXECUTE,
                compensate_retry: RetryPolicy::COMPENSATE,
                timeout_ms: 1000,
                deadline_ms: None,
                config: Default::default(),
            }],
        };
        assert_eq!(def.validate(), Ok(()));
        def.steps[0].compensate = p("other");
        let DefinitionError::PluginMismatch { field, .. } = def.validate().unwrap_err() else {
            panic!("a plugin mismatch")
        };
        assert_eq!(field, "steps[0].compensate");
    }

    #[test]
    fn names() {
        assert!(is_valid_name("refund"));
        assert!(is_valid_name("a-b_c9"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("Order"));
        assert!(!is_valid_name("9a"));
        assert!(!is_valid_name("a/b"));
    }
}

#[cfg(test)]
mod binding_tests {
    use super::*;

    pub(super) fn step(plugin: &str, digest: &str) -> StepDefinition {
        let r = PluginRef { plugin: plugin.into(), digest: digest.into() };
        StepDefinition {
            name: "payment".into(),
            state: "PAID".into(),
            execute: r.clone(),
            compensate: r,
            retry: RetryPolicy::EXECUTE,
            compensate_retry: RetryPolicy::COMPENSATE,
            timeout_ms: 1,
            deadline_ms: None,
            config: Default::default(),
        }
    }

    #[test]
    fn compensation_follows_a_rebinding_only_within_the_plugin_that_executed() {
        let pinned = step("payment", "sha256:v1");
        // A fixed version of the same plugin is used by sagas in flight.
        assert_eq!(pinned.compensate_binding(Some(&step("payment", "sha256:v2"))).digest, "sha256:v2");
        // Another plugin never saw the charge: the pinned compensation stays.
        assert_eq!(pinned.compensate_binding(Some(&step("payments-ng", "sha256:x"))).digest, "sha256:v1");
        // The step is gone from the current definition: the pinned one.
        assert_eq!(pinned.compensate_binding(None).digest, "sha256:v1");
    }
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    #[test]
    fn sensitive_fields_are_redacted_wherever_they_are_and_the_rest_is_kept() {
        let def = SagaDefinition {
            saga_type: "refund".into(),
            steps: vec![],
            sensitive: vec!["/payment/token".into(), "/cards/0/pan".into(), "/absent".into()],
        };
        let input = serde_json::json!({"payment": {"token": "tok_visa"}, "cards": [{"pan": "4242"}], "x": 1});
        let out = def.redact(&input);
        assert_eq!(out["payment"]["token"], REDACTED);
        assert_eq!(out["cards"][0]["pan"], REDACTED);
        assert_eq!(out["x"], 1);
        assert!(out.get("absent").is_none(), "redaction adds no fields");
        assert_eq!(input["payment"]["token"], "tok_visa", "the input itself is untouched");
    }

    #[test]
    fn a_sensitive_field_must_be_a_json_pointer() {
        let mut def =
            SagaDefinition { saga_type: "refund".into(), steps: vec![], sensitive: vec!["payment.token".into()] };
        def.steps.push(StepDefinition {
            name: "a".into(),
            state: "A_DONE".into(),
            execute: PluginRef { plugin: "p".into(), digest: "sha256:x".into() },
            compensate: PluginRef { plugin: "p".into(), digest: "sha256:x".into() },
            retry: RetryPolicy::EXECUTE,
            compensate_retry: RetryPolicy::COMPENSATE,
            timeout_ms: 1,
            deadline_ms: None,
            config: Default::default(),
        });
        let DefinitionError::Invalid { field, .. } = def.validate().unwrap_err() else { panic!("invalid") };
        assert_eq!(field, "sensitive[0]");
        def.sensitive = vec!["/payment/token".into()];
        def.validate().unwrap();
    }

    /// A label names the saga's status and, in PascalCase, the event of its step's success:
    /// it must be the step's own and not read as one of the engine's events.
    #[test]
    fn labels_are_unique_and_never_an_engine_event_type() {
        let def = |labels: &[&str]| SagaDefinition {
            saga_type: "refund".into(),
            steps: labels
                .iter()
                .enumerate()
                .map(|(i, label)| StepDefinition {
                    name: format!("s{i}"),
                    state: (*label).into(),
                    ..binding_tests::step("p", "sha256:x")
                })
                .collect(),
            sensitive: vec![],
        };
        def(&["REQUESTED", "REFUNDED"]).validate_labels().unwrap();
        for (labels, field, says) in [
            (&["PAID", "PAID"][..], "steps[1].state", "step 0's already"),
            (&["A_B", "A__B"][..], "steps[1].state", "step 0's already (as its event type, AB)"),
            (&["REFUND_COMPLETED"][..], "steps[0].state", "RefundCompleted, which the engine uses"),
            (&["OK", "STEP_STARTED"][..], "steps[1].state", "StepStarted, which the engine uses"),
            (&["SIGNAL_RECEIVED"][..], "steps[0].state", "SignalReceived"),
        ] {
            let Err(DefinitionError::Invalid { field: got, message }) = def(labels).validate_labels() else {
                panic!("{labels:?} accepted")
            };
            assert_eq!(got, field, "{labels:?}");
            assert!(message.contains(says), "{labels:?}: {message}");
        }
    }

    #[test]
    fn a_steps_config_is_bounded() {
        let mut def = SagaDefinition {
            saga_type: "refund".into(),
            steps: vec![binding_tests::step("p", "sha256:x")],
            sensitive: vec![],
        };
        def.steps[0].config.insert("base_url".into(), "http://127.0.0.1:9002".into());
        def.validate().unwrap();
        def.steps[0].config.insert("padding".into(), "x".repeat(MAX_CONFIG_BYTES).into());
        let DefinitionError::Invalid { field, .. } = def.validate().unwrap_err() else { panic!("invalid") };
        assert_eq!(field, "steps[0].config");
    }
}
