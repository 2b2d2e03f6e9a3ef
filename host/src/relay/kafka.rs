//! The Kafka sink: publishes outbox events with rdkafka's idempotent producer.
//!
//! Message key = saga id, so one saga's events land on one partition and stay in order there.
//! Headers carry `event_id`, `type` and `seq`; the value is the event JSON (SPEC §6).
//!
//! Ordering: a batch is enqueued in outbox order and its delivery reports are awaited in that
//! order. With `enable.idempotence=true` librdkafka keeps produce order per partition across
//! its internal retries, and a message that fails for good fails the ones queued behind it on
//! that partition too, so `seq` n+1 is never acknowledged ahead of an unacknowledged n. The
//! relay marks only the acknowledged prefix; everything after the first failure is sent again
//! (at least once: consumers drop repeats by `event_id`). We do not use Kafka transactions:
//! the outbox plus consumer-side dedupe gives the same effect with fewer failure modes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::{Published, Sink};
use crate::store::OutboxRow;

/// Where and how to publish.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// `host:port[,host:port]`.
    pub brokers: String,
    pub topic: String,
    /// Extra librdkafka settings (`security.protocol`, `compression.type`, ...), applied last,
    /// so they override the defaults below.
    pub settings: Vec<(String, String)>,
}

/// Publishes to Kafka.
pub struct KafkaSink {
    options: KafkaOptions,
    producer: Mutex<Arc<FutureProducer>>,
}

fn producer(options: &KafkaOptions) -> anyhow::Result<FutureProducer> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &options.brokers)
        // Exactly-once per producer session and produce order per partition; implies acks=all,
        // unlimited retries and at most 5 in-flight requests.
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // Report a delivery failure after a minute rather than librdkafka's five, so an outage
        // shows in the relay's log (and its lag) while nothing is lost: failed rows stay unmarked.
        .set("message.timeout.ms", "60000")
        .set("linger.ms", "5")
        .set("client.id", "sagahost");
    for (k, v) in &options.settings {
        config.set(k, v);
    }
    config.create().context("creating the Kafka producer (check --kafka-brokers and --kafka-config)")
}

impl KafkaSink {
    pub fn new(options: KafkaOptions) -> anyhow::Result<KafkaSink> {
        let p = producer(&options)?;
        Ok(KafkaSink { options, producer: Mutex::new(Arc::new(p)) })
    }

    fn current(&self) -> Arc<FutureProducer> {
        Arc::clone(&self.producer.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// An idempotent producer that hit a fatal error cannot continue: start a new session.
    fn renew_if_fatal(&self, p: &FutureProducer) {
        if let Some((code, reason)) = p.client().fatal_error() {
            tracing::warn!(?code, %reason, "Kafka producer hit a fatal error; starting a new producer session");
            match producer(&self.options) {
                Ok(fresh) => *self.producer.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh),
                Err(e) => tracing::error!(error = %format!("{e:#}"), "could not recreate the Kafka producer"),
            }
        }
    }
}

#[async_trait]
impl Sink for KafkaSink {
    fn name(&self) -> String {
        format!("kafka:{}/{}", self.options.brokers, self.options.topic)
    }

    async fn publish(&self, rows: &[OutboxRow]) -> Published {
        let p = self.current();
        let mut pending = Vec::with_capacity(rows.len());
        let mut enqueue_error = None;
        let mut enqueue_refused = None;
        for row in rows {
            let seq = row.seq.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header { key: "event_id", value: Some(row.event_id.as_str()) })
                .insert(Header { key: "type", value: Some(row.event_type.as_str()) })
                .insert(Header { key: "seq", value: Some(seq.as_str()) });
            let mut record = FutureRecord::to(&self.options.topic)
                .key(row.saga_id.as_str())
                .payload(row.payload.as_str())
                .headers(headers);
            // Enqueue; when librdkafka's local queue is full, wait for it to drain a little.
            let delivery = loop {
                match p.send_result(record) {
                    Ok(d) => break Ok(d),
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err((e, _)) => break Err(e),
                }
            };
            match delivery {
                Ok(d) => pending.push(d),
                Err(e) => {
                    enqueue_refused = refused(&e).map(|why| (pending.len(), why));
                    enqueue_error = Some(anyhow::Error::new(e).context("enqueueing an event"));
                    break;
                }
            }
        }
        let mut acked = 0;
        for delivery in pending {
            match delivery.await {
                Ok(Ok(_)) => acked += 1,
                Ok(Err((e, _))) => {
                    self.renew_if_fatal(&p);
                    return Published {
                        acked,
                        refused: refused(&e),
                        error: Some(anyhow::Error::new(e).context("the broker did not acknowledge an event")),
                    };
                }
                Err(_) => {
                    return Published {
                        acked,
                        error: Some(anyhow::anyhow!("the Kafka producer went away")),
                        refused: None,
                    }
                }
            }
        }
        // Only a refusal of the row right after the acknowledged prefix counts as one.
        let refused = enqueue_refused.filter(|&(i, _)| i == acked).map(|(_, why)| why);
        Published { acked, error: enqueue_error, refused }
    }
}

/// Why Kafka will never take a message, if the error says so: it is too large for the
/// producer's or the broker's limit, or malformed. Anything else (a broker down, a timeout, a
/// leader election) may pass, and the batch is sent again.
fn refused(e: &KafkaError) -> Option<String> {
    let code = e.rdkafka_error_code()?;
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::MessageBatchTooLarge
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidMessage
    )
    .then(|| format!("Kafka refuses this event for good: {e}"))
}
