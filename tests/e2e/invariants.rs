//! What must hold after any number of crashes: every order settles as its trigger says, each
//! plugin effect happened exactly once, the outbox has exactly one event per transition with a
//! gapless `seq`, and the published stream (deduplicated by `event_id`) is exactly the outbox.

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

    pub fn body(self) -> Value {
        match self {
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
            Kind::Good | Kind::Flaky | Kind::Confirmed3ds => "COMPLETED",
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
        }
    }

    /// The plugin state records the order must leave: (plugin, key prefix, expected status).
    fn effects(self) -> [(&'static str, &'static str, Option<&'static str>); 3] {
        let (inv, pay, ship) = match self {
            Kind::Good | Kind::Flaky | Kind::Confirmed3ds => (Some("reserved"), Some("charged"), Some("created")),
            Kind::OutOfStock => (None, None, None),
            Kind::Declined | Kind::Cancelled3ds => (Some("released"), None, None),
            Kind::NoCarrier => (Some("released"), Some("refunded"), None),
        };
        [("inventory", "reservation/", inv), ("payment", "charge/", pay), ("shipment", "shipment/", ship)]
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
    let all = store.list_sagas("order", None, None, 100_000).await.unwrap();
    if all.len() != expected_sagas {
        bad.push(format!("{} sagas in the database, expected {expected_sagas}", all.len()));
    }

    // The published stream, deduplicated.
    let published: String =
        event_dirs.iter().map(|d| std::fs::read_to_string(d.join("events.jsonl")).unwrap_or_default()).collect();
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
