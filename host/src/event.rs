//! The published event envelope (SPEC §6): what a consumer of `sagahost.events` (Kafka, or
//! `events.jsonl`) receives for every saga state change.
//!
//! The engine decides which event a transition publishes ([`EventSpec`]: its type and data);
//! this module wraps it into the envelope with the event id, saga, `seq`, status and time.
//! The JSON is built once, before the commit, and stored in the outbox row exactly as it is
//! published, so a redelivery is byte for byte the first delivery.
//!
//! It must not do IO: the store writes the row, the relay publishes it.

use crate::engine::{EventSpec, SagaStatus};

/// One outbox event, ready to be written with its transition and published as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// A UUIDv7, unique per event: consumers drop repeats by it.
    pub event_id: String,
    /// The event type, e.g. `PaymentCharged` (also a Kafka header).
    pub event_type: String,
    /// The envelope JSON exactly as it must be published.
    pub payload: String,
}

/// What the envelope says about the saga besides the event itself.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    pub saga_id: &'a str,
    pub saga_type: &'a str,
    /// The event's position in the saga's stream: 1 for the first, no gaps.
    pub seq: i64,
    /// The saga's status after the transition.
    pub status: &'a SagaStatus,
    /// Commit time, milliseconds since the Unix epoch.
    pub at: i64,
}

impl Envelope<'_> {
    /// Wraps `spec` into a new event with a fresh id.
    pub fn wrap(&self, spec: &EventSpec) -> OutboxEvent {
        let event_id = uuid::Uuid::now_v7().to_string();
        let payload = serde_json::json!({
            "event_id": event_id,
            "saga_id": self.saga_id,
            "saga_type": self.saga_type,
            "seq": self.seq,
            "type": spec.event_type,
            "status": self.status.as_str(),
            "at": crate::clock::rfc3339(self.at),
            "data": spec.data,
        })
        .to_string();
        OutboxEvent { event_id, event_type: spec.event_type.clone(), payload }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_envelope_carries_every_field_of_spec_section_6() {
        let status = SagaStatus::Reached("PAYMENT_CHARGED".to_owned());
        let spec =
            EventSpec { event_type: "PaymentCharged".to_owned(), data: serde_json::json!({ "step": "payment" }) };
        let env = Envelope { saga_id: "s-1", saga_type: "refund", seq: 3, status: &status, at: 0 };
        let e = env.wrap(&spec);
        let v: serde_json::Value = serde_json::from_str(&e.payload).unwrap();
        assert_eq!(v["event_id"], e.event_id.as_str());
        assert_eq!(v["saga_id"], "s-1");
        assert_eq!(v["saga_type"], "refund");
        assert_eq!(v["seq"], 3);
        assert_eq!(v["type"], "PaymentCharged");
        assert_eq!(v["status"], "PAYMENT_CHARGED");
        assert_eq!(v["at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["data"]["step"], "payment");
        assert_eq!(e.event_type, "PaymentCharged");
        assert_ne!(env.wrap(&spec).event_id, e.event_id, "every event gets its own id");
    }
}
