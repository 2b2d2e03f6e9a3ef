//! What must hold after any number of crashes: every order settles as its trigger says, each
//! plugin effect happened exactly once, the outbox has exactly one event per transition with a
//! gapless `seq`, the published stream (deduplicated by `event_id`) is exactly the outbox, and
//! each saga's events were first delivered in `seq` order.
//!
//! The demo plugins are idempotent (they return early when their record exists), so their
//! records cannot show a step that ran twice. The `counted` saga type runs the `counter`
//! fixture, which counts every committed call; its counters must read exactly 1 per completed
//! step and per compensated step.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use sagahost::store::Store;
use serde_json::{json, Value};

use crate::harness::order;

/// The triggers of SPEC §7, and what each order must end as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Good,
    OutOfStock,
    Declined,
    NoCarrier,
    Flaky,
    /// `tok_3ds`, confirmed by a signal.
    Confirmed3ds,
    /// `tok_3ds`, cancelled by the client while it waits.
    Cancelled3ds,
    /// A `counted` saga whose three steps complete.
    Counted,
    /// A `counted` saga whose step `three` is rejected: `two` and `one` are compensated.
    CountedRejected,
    /// A `counted` saga whose step `two` fails twice (retryable), then completes.
    CountedFlaky,
}

/// The saga type that runs the `counter` fixture in its three steps.
pub const COUNTED: &str = "counted";
/// The steps of the `counted` saga, in order.
const COUNTED_STEPS: [&str; 3] = ["one", "two", "three"];

/// Uploads the `counter` fixture through `base` and registers the `counted` saga type with it
/// in every step (`admin_token` opens the admin routes).
pub async fn register_counted(base: &str, admin_token: &str) {
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{base}/admin/plugins/counter"))
        .bearer_auth(admin_token)
        .header("content-type", "application/wasm")
        .body(crate::harness::fixture("counter"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "uploading the counter fixture: {}", r.status());
    let digest = r.json::<Value>().await.unwrap()["digest"].as_str().unwrap().to_owned();
    let retry = json!({"max_attempts": 5, "initial_backoff_ms": 10, "max_backoff_ms": 50});
    let steps: Vec<Value> =
        COUNTED_STEPS.iter().map(|s| json!({"name": s, "execute": digest, "retry": retry})).collect();
    let r = http
        .put(format!("{base}/admin/sagas/{COUNTED}"))
        .bearer_auth(admin_token)
        .json(&json!({ "steps": steps }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "registering the counted saga: {}", r.status());
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Good,
        Kind::OutOfStock,
        Kind::Declined,
        Kind::NoCarrier,
        Kind::Flaky,
        Kind::Confirmed3ds,
        Kind::Cancelled3ds,
    ];

    /// The kinds that run the `counter` fixture (the `counted` saga type).
    pub const COUNTED: [Kind; 3] = [Kind::Counted, Kind::CountedRejected, Kind::CountedFlaky];

    /// The saga type this kind creates.
    pub fn saga_type(self) -> &'static str {
        if Kind::COUNTED.contains(&self) {
            COUNTED
        } else {
            "order"
        }
    }

    /// The route that creates a saga of this kind.
    pub fn create_path(self) -> String {
        match self.saga_type() {
            "order" => "/orders".to_owned(),
            t => format!("/sagas/{t}"),
        }
    }

    pub fn body(self) -> Value {
        match self {
            Kind::Counted => json!({"customer_id": "counted"}),
            Kind::CountedRejected => json!({"customer_id": "counted", "reject": "three"}),
            Kind::CountedFlaky => json!({"customer_id": "counted", "flaky": "two"}),
            Kind::Good => order("tok_visa", "SKU-1", "US"),
            Kind::OutOfStock => order("tok_visa", "OOS-7", "US"),
            Kind::Declined => order("tok_decline", "SKU-1", "US"),
            Kind::NoCarrier => order("tok_visa", "SKU-1", "XX"),
            Kind::Flaky => order("tok_flaky", "SKU-1", "US"),
            Kind::Confirmed3ds | Kind::Cancelled3ds => order("tok_3ds", "SKU-1", "US"),
        }
    }

    pub fn final_status(self) -> &'static str {
        match self {
            Kind::Good | Kind::Flaky | Kind::Confirmed3ds | Kind::Counted | Kind::CountedFlaky => "COMPLETED",
            _ => "CANCELLED",
        }
    }

    /// The exact event types of the saga, in seq order: one per transition.
    pub fn events(self) -> Vec<&'static str> {
        match self {
            Kind::Good => {
                vec!["OrderCreated", "InventoryReserved", "PaymentCharged", "ShipmentCreated", "OrderCompleted"]
            }
            Kind::OutOfStock => vec!["OrderCreated", "OrderCompensating", "OrderCancelled"],
            Kind::Declined => {
                vec!["OrderCreated", "InventoryReserved", "OrderCompensating", "StepCompensated", "OrderCancelled"]
            }
            Kind::NoCarrier => vec![
                "OrderCreated",
                "InventoryReserved",
                "PaymentCharged",
                "OrderCompensating",
                "StepCompensated",
                "StepCompensated",
                "OrderCancelled",
            ],
            Kind::Flaky => vec![
                "OrderCreated",
                "InventoryReserved",
                "StepRetryScheduled",
                "StepRetryScheduled",
                "PaymentCharged",
                "ShipmentCreated",
                "OrderCompleted",
            ],
            Kind::Confirmed3ds => vec![
                "OrderCreated",
                "InventoryReserved",
                "StepWaiting",
                "SignalReceived",
                "PaymentCharged",
                "ShipmentCreated",
                "OrderCompleted",
            ],
            Kind::Cancelled3ds => vec![
                "OrderCreated",
                "InventoryReserved",
                "StepWaiting",
                "OrderCompensating",
                "StepCompensated",
                "StepCompensated",
                "OrderCancelled",
            ],
            Kind::Counted => vec!["CountedCreated", "OneDone", "TwoDone", "ThreeDone", "CountedCompleted"],
            Kind::CountedRejected => vec![
                "CountedCreated",
                "OneDone",
                "TwoDone",
                "CountedCompensating",
                "StepCompensated",
                "StepCompensated",
                "CountedCancelled",
            ],
            Kind::CountedFlaky => vec![
                "CountedCreated",
                "OneDone",
                "StepRetryScheduled",
                "StepRetryScheduled",
                "TwoDone",
                "ThreeDone",
                "CountedCompleted",
            ],
        }
    }

    /// The committed calls of the `counter` fixture a `counted` saga must leave, per step:
    /// (step, executes, compensates). A rejected or failed attempt's count is discarded with
    /// its other state writes, so it must not show.
    fn counts(self) -> Vec<(&'static str, u64, u64)> {
        match self {
            Kind::Counted | Kind::CountedFlaky => vec![("one", 1, 0), ("two", 1, 0), ("three", 1, 0)],
            Kind::CountedRejected => vec![("one", 1, 1), ("two", 1, 1), ("three", 0, 0)],
            _ => vec![],
        }
    }

    /// The plugin state records the order must leave: (plugin, key prefix, expected status).
    fn effects(self) -> Vec<(&'static str, &'static str, Option<&'static str>)> {
        let (inv, pay, ship) = match self {
            Kind::Counted | Kind::CountedRejected | Kind::CountedFlaky => return vec![],
            Kind::Good | Kind::Flaky | Kind::Confirmed3ds => (Some("reserved"), Some("charged"), Some("created")),
            Kind::OutOfStock => (None, None, None),
            Kind::Declined | Kind::Cancelled3ds => (Some("released"), None, None),
            Kind::NoCarrier => (Some("released"), Some("refunded"), None),
        };
        vec![("inventory", "reservation/", inv), ("payment", "charge/", pay), ("shipment", "shipment/", ship)]
    }
}

/// Violations found, as readable lines; empty means every invariant holds.
pub async fn check(data_dir: &Path, orders: &HashMap<String, Kind>, expected_sagas: usize) -> Vec<String> {
    let store = crate::harness::open_store(data_dir).await;
    check_with(store.as_ref(), &[data_dir], orders, expected_sagas).await
}

/// [`check`] for replicas: one store, and the events.jsonl of every replica's data dir (each
/// relay lease holder appends to its own file; together they are the published stream).
pub async fn check_with(
    store: &dyn Store,
    event_dirs: &[&Path],
    orders: &HashMap<String, Kind>,
    expected_sagas: usize,
) -> Vec<String> {
    let mut bad = Vec::new();

    // Never two sagas for one key: the database holds exactly the sagas the clients created.
    let mut all = 0;
    for saga_type in ["order", COUNTED] {
        all += store.list_sagas(saga_type, None, None, 100_000).await.unwrap().len();
    }
    if all != expected_sagas {
        bad.push(format!("{all} sagas in the database, expected {expected_sagas}"));
    }

    // Arrival order: in each events.jsonl (one per relay lease holder), the first delivery of
    // each event of a saga comes in `seq` order. Redeliveries may repeat older events later,
    // but an event must never be first published before one with a lower seq: that is the
    // per-saga order a consumer relies on. (Across replicas' files there is no common clock,
    // so each file is checked on its own.)
    let files: Vec<String> =
        event_dirs.iter().map(|d| std::fs::read_to_string(d.join("events.jsonl")).unwrap_or_default()).collect();
    for (dir, text) in event_dirs.iter().zip(&files) {
        let complete = event_dirs.len() == 1;
        bad.extend(arrival_order_violations(text, complete).into_iter().map(|v| format!("{}: {v}", dir.display())));
    }

    // The published stream, deduplicated.
    let published: String = files.concat();
    let mut by_id: HashMap<String, Value> = HashMap::new();
    for line in published.lines() {
        let e: Value = match serde_json::from_str(line) {
            Ok(e) => e,
            Err(err) => {
                bad.push(format!("events.jsonl has a line that is not JSON ({err}): {line}"));
                continue;
            }
        };
        let id = e["event_id"].as_str().unwrap_or_default().to_owned();
        if let Some(prev) = by_id.get(&id) {
            if prev != &e {
                bad.push(format!("event {id} published twice with different contents"));
            }
        }
        by_id.insert(id, e);
    }
    let mut published_by_saga: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for e in by_id.into_values() {
        published_by_saga.entry(e["saga_id"].as_str().unwrap_or_default().to_owned()).or_default().push(e);
    }

    for (id, kind) in orders {
        let Some(rec) = store.saga(id).await.unwrap() else {
            bad.push(format!("{id} ({kind:?}): missing"));
            continue;
        };
        if rec.state.status != kind.final_status() {
            bad.push(format!("{id} ({kind:?}): status {} reason {:?}", rec.state.status, rec.state.reason));
        }
        let outbox = store.outbox_for_saga(id).await.unwrap();
        let seqs: Vec<i64> = outbox.iter().map(|r| r.seq).collect();
        if seqs != (1..=outbox.len() as i64).collect::<Vec<_>>() {
            bad.push(format!("{id}: outbox seq not gapless from 1: {seqs:?}"));
        }
        let types: Vec<&str> = outbox.iter().map(|r| r.event_type.as_str()).collect();
        if types != kind.events() {
            bad.push(format!("{id} ({kind:?}): events {types:?}, expected {:?}", kind.events()));
        }
        let mut stream = published_by_saga.remove(id).unwrap_or_default();
        stream.sort_by_key(|e| e["seq"].as_i64());
        let outbox_json: Vec<Value> = outbox.iter().map(|r| serde_json::from_str(&r.payload).unwrap()).collect();
        if stream != outbox_json {
            bad.push(format!(
                "{id}: published stream ({} events) differs from the outbox ({})",
                stream.len(),
                outbox.len()
            ));
        }
        for (step, executes, compensates) in kind.counts() {
            for (export, expected) in [("execute", executes), ("compensate", compensates)] {
                let key = format!("calls/{id}/{step}/{export}");
                let got = store.state_get("counter", &key).await.unwrap();
                let got = got.map(|b| serde_json::from_slice::<u64>(&b).expect("a count")).unwrap_or(0);
                if got != expected {
                    bad.push(format!("{id} ({kind:?}): {got} committed {export} calls of {step}, expected {expected}"));
                }
            }
        }
        for (plugin, prefix, expected) in kind.effects() {
            let got = store.state_get(plugin, &format!("{prefix}{id}")).await.unwrap();
            let status = got.map(|b| serde_json::from_slice::<Value>(&b).unwrap()["status"].clone());
            if status != expected.map(|s| json!(s)) {
                bad.push(format!("{id} ({kind:?}): {plugin} {prefix} status {status:?}, expected {expected:?}"));
            }
        }
    }
    if !published_by_saga.is_empty() {
        let unknown: HashSet<_> = published_by_saga.keys().collect();
        bad.push(format!("events published for sagas no client created: {unknown:?}"));
    }
    bad
}

/// Per-saga arrival order of one events.jsonl: the first delivery of each event_id, taken in
/// line order, must have a strictly increasing `seq` within its saga; with `complete` (the
/// file is the whole published stream: one host) it must be exactly 1, 2, 3, ... Returns the
/// violations.
pub fn arrival_order_violations(text: &str, complete: bool) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut bad = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let Ok(e) = serde_json::from_str::<Value>(line) else { continue };
        if !seen.insert(e["event_id"].as_str().unwrap_or_default().to_owned()) {
            continue; // a redelivery
        }
        let saga = e["saga_id"].as_str().unwrap_or_default().to_owned();
        let seq = e["seq"].as_i64().unwrap_or(-1);
        let prev = last.get(&saga).copied();
        let in_order = match (prev, complete) {
            (None, true) => seq == 1,
            (None, false) => true,
            (Some(p), true) => seq == p + 1,
            (Some(p), false) => seq > p,
        };
        if !in_order {
            bad.push(format!("line {}: saga {saga} seq {seq} first published after seq {prev:?}", n + 1));
        }
        last.insert(saga, prev.map_or(seq, |p| p.max(seq)));
    }
    bad
}

/// How many events.jsonl lines repeat an earlier event_id (at-least-once redeliveries).
pub fn duplicate_deliveries(data_dir: &Path) -> usize {
    duplicate_deliveries_in(&[data_dir])
}

/// [`duplicate_deliveries`] over several replicas' files.
pub fn duplicate_deliveries_in(data_dirs: &[&Path]) -> usize {
    let text: String =
        data_dirs.iter().map(|d| std::fs::read_to_string(d.join("events.jsonl")).unwrap_or_default()).collect();
    let mut seen = HashSet::new();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| !seen.insert(e["event_id"].as_str().unwrap_or_default().to_owned()))
        .count()
}
