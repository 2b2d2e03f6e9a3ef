//! The Kafka sink: publishes outbox events with rdkafka's idempotent producer.
//!
//! Message key = saga id, so one saga's events land on one partition and stay in order there.
//! Headers carry `event_id`, `type` and `seq`; the value is the event JSON (SPEC §6).
//!
//! Ordering: a batch is enqueued in outbox order and its delivery reports are awaited in that
//! order. With `enable.idempotence=true` librdkafka keeps produce order per partition across
//! its internal retries. The relay marks the acknowledged prefix and, past the first failure,
//! only what was confirmed delivered of sagas with nothing failed before it in the batch;
//! everything else is sent again (at least once: consumers drop repeats by `event_id`). A publish
//! returns only once every message of its batch is settled (acknowledged or failed): nothing
//! of a batch is still in librdkafka's queue when the relay acts on the outcome, so a retry
//! does not send again what is still on its way (one copy per retry, not one per retry and
//! queued copy), a row sent alone before it is dead-lettered travels alone, and a producer
//! renewed after a fatal error leaves no messages of the old session in flight beside the new
//! one's. The outcomes after the first failure are reported ([`Published::delivered_after`],
//! [`Published::confirmed_after`]). A row librdkafka refuses at enqueue for good (larger than
//! `message.max.bytes`) holds back only its own saga's later rows; the other sagas' rows
//! behind it are still sent, so that while an earlier row waits for a partition that does not
//! answer (and the refused row cannot yet be dead-lettered) the rest still flows.
//!
//! What idempotence does not promise: when a message fails for good (a refusal, a message
//! timeout) while a later message of the same partition travels in a later request, librdkafka
//! (without the experimental `enable.gapless.guarantee`, which would stop the producer on
//! every refusal) bumps its producer epoch and delivers the later one all the same. If that
//! later message is the same saga's, its `seq` n+1 reached the topic before n, which the relay
//! sends again after it: the one case where a saga's first deliveries are out of order. It
//! takes a permanent failure of one request while the next request of the partition
//! succeeds; the relay logs it (`a later event of its saga was delivered before it`).
//!
//! We do not use Kafka transactions: the outbox plus consumer-side dedupe gives the same
//! effect with fewer failure modes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};

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
    fn renew_if_fatal(&self) {
        if let Some((code, reason)) = self.current().client().fatal_error() {
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
        // A producer session that turned fatal (at a delivery, at enqueue, or between
        // publishes: its producer id refused at start) fails every send from then on: it is
        // replaced here, before the next batch, with nothing of the last one in flight.
        self.renew_if_fatal();
        let p = self.current();
        // (index in the batch, delivery) of each row enqueued.
        let mut pending = Vec::with_capacity(rows.len());
        let mut enqueue_error = None;
        let mut enqueue_refused = None;
        // Sagas with a row refused at enqueue: their later rows wait (they must not overtake
        // it), other sagas' rows are still sent, so that a refused row behind a partition that
        // does not answer holds back only its own saga (the relay dead-letters it once every
        // row before it is settled; until then it is sent again with the rest).
        let mut held_back = std::collections::HashSet::new();
        for (i, row) in rows.iter().enumerate() {
            if held_back.contains(row.saga_id.as_str()) {
                continue;
            }
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
                Ok(d) => pending.push((i, d)),
                Err(e) => {
                    let why = refused(&e);
                    let for_good = why.is_some();
                    if enqueue_error.is_none() {
                        enqueue_refused = why.map(|why| (i, why));
                        enqueue_error = Some(anyhow::Error::new(e).context("enqueueing an event"));
                    }
                    if !for_good {
                        // The producer cannot take anything now (a fatal session, an unknown
                        // topic): the rest of the batch waits for the next try.
                        break;
                    }
                    held_back.insert(row.saga_id.as_str());
                }
            }
        }
        // Await every delivery of the batch, also after the first failure: messages behind it
        // (other sagas', on other partitions) may still be on their way (module docs). Those
        // delivered (or gone with the producer, unknown) are reported for the relay's refusal
        // rule; those confirmed delivered are published unless an earlier event of their saga
        // failed (the rest are sent again). The acknowledged prefix ends at the first row that
        // failed or was never enqueued.
        let mut acked = 0;
        let mut failed = None;
        let mut delivered_after = Vec::new();
        let mut confirmed_after = Vec::new();
        for (i, delivery) in pending {
            let outcome = delivery.await;
            if failed.is_none() && i != acked {
                // Row `acked` was refused at enqueue (the first such row: a row held back
                // follows its saga's refused one).
                failed = Some(Published {
                    acked,
                    refused: enqueue_refused.take().filter(|&(r, _)| r == acked).map(|(_, why)| why),
                    error: enqueue_error.take(),
                    delivered_after: Vec::new(),
                    confirmed_after: Vec::new(),
                });
            }
            if failed.is_some() {
                if !matches!(outcome, Ok(Err(_))) {
                    delivered_after.push(i);
                }
                if matches!(outcome, Ok(Ok(_))) {
                    confirmed_after.push(i);
                }
                continue;
            }
            match outcome {
                Ok(Ok(_)) => acked += 1,
                Ok(Err((e, _))) => {
                    failed = Some(Published {
                        acked,
                        refused: refused(&e),
                        error: Some(anyhow::Error::new(e).context("the broker did not acknowledge an event")),
                        delivered_after: Vec::new(),
                        confirmed_after: Vec::new(),
                    });
                }
                Err(_) => {
                    failed = Some(Published {
                        acked,
                        error: Some(anyhow::anyhow!("the Kafka producer went away")),
                        refused: None,
                        delivered_after: Vec::new(),
                        confirmed_after: Vec::new(),
                    })
                }
            }
        }
        if let Some(failed) = failed {
            return Published { delivered_after, confirmed_after, ..failed };
        }
        // Every row enqueued was acknowledged: the prefix ends at a row refused at enqueue (a
        // refusal of that row), or where enqueueing stopped.
        let refused = enqueue_refused.filter(|&(i, _)| i == acked).map(|(_, why)| why);
        Published { acked, error: enqueue_error, refused, delivered_after, confirmed_after }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    use rdkafka::ClientConfig;

    use super::{KafkaOptions, KafkaSink, Sink};
    use crate::store::OutboxRow;

    const TOPIC: &str = "saga-events";

    fn row(id: i64, saga: &str) -> OutboxRow {
        OutboxRow {
            id,
            event_id: format!("event-{id}"),
            saga_id: saga.to_string(),
            seq: 1,
            event_type: "SagaStarted".into(),
            payload: format!("{{\"id\":{id}}}"),
            created_at: 0,
        }
    }

    /// The `nth` (from 0) saga id whose events land on `partition` (librdkafka's default
    /// partitioner hashes the key), found by producing with the same defaults.
    async fn key_on(bootstrap: &str, partition: i32, nth: usize) -> String {
        let probe: FutureProducer = ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
        let mut found = 0;
        for i in 0..64 {
            let key = format!("saga-{i}");
            let record = FutureRecord::to(TOPIC).key(key.as_str()).payload("probe");
            let delivered = probe.send(record, Duration::from_secs(10)).await.unwrap();
            if delivered.partition == partition {
                if found == nth {
                    return key;
                }
                found += 1;
            }
        }
        panic!("fewer than {} keys of 64 landed on partition {partition}", nth + 1);
    }

    /// The first row of a batch is refused while the second (another saga's, on a partition
    /// whose broker is down) is still queued: the publish reports the refusal only once the
    /// second row's delivery is settled too (so the relay's next send of the batch is the only
    /// copy in flight), and reports that it was delivered.
    #[tokio::test]
    async fn a_failed_publish_returns_only_once_every_message_of_its_batch_is_settled() {
        let cluster = MockCluster::new(2).unwrap();
        cluster.create_topic(TOPIC, 2, 1).unwrap();
        cluster.partition_leader(TOPIC, 0, Some(1)).unwrap();
        cluster.partition_leader(TOPIC, 1, Some(2)).unwrap();
        let bootstrap = cluster.bootstrap_servers();
        let (first, second) = (key_on(&bootstrap, 0, 0).await, key_on(&bootstrap, 1, 0).await);

        cluster.broker_down(2).unwrap();
        cluster.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE]);
        let sink = KafkaSink::new(KafkaOptions { brokers: bootstrap, topic: TOPIC.into(), settings: vec![] }).unwrap();
        let rows = [row(1, &first), row(2, &second)];
        let outage = Duration::from_millis(500);
        let started = std::time::Instant::now();
        let publish = async {
            let published = sink.publish(&rows).await;
            (published, started.elapsed())
        };
        let recovery = async {
            tokio::time::sleep(outage).await;
            cluster.broker_up(2).unwrap();
        };
        let ((published, took), ()) = tokio::join!(publish, recovery);

        assert_eq!(published.acked, 0, "{published:?}");
        assert!(published.refused.is_some(), "the first row is refused for its size: {published:?}");
        assert!(took >= outage, "returned after {took:?}, before the second row could be delivered");
        assert_eq!(published.delivered_after, [1], "the second row's delivery is reported: {published:?}");
    }

    /// A row Kafka refuses at enqueue (larger than `message.max.bytes`) behind a row waiting
    /// for a partition that does not answer: another saga's row after the refused one is still
    /// sent, and confirmed (so the relay marks it), while the refused row's own saga waits. (It
    /// had stopped the whole batch there: every saga's events behind a refused one waited for
    /// as long as the partition was down.)
    #[tokio::test]
    async fn a_row_refused_at_enqueue_holds_back_only_its_own_saga() {
        let cluster = MockCluster::new(2).unwrap();
        cluster.create_topic(TOPIC, 2, 1).unwrap();
        cluster.partition_leader(TOPIC, 0, Some(1)).unwrap();
        cluster.partition_leader(TOPIC, 1, Some(2)).unwrap();
        let bootstrap = cluster.bootstrap_servers();
        let stuck = key_on(&bootstrap, 1, 0).await;
        let (big, other) = (key_on(&bootstrap, 0, 0).await, key_on(&bootstrap, 0, 1).await);
        // The stuck row times out after `message.timeout.ms`, and so does any row the producer
        // has not delivered by then: 5 s, so that the other saga's row is delivered even on a
        // loaded machine (with 1 s, a CI run once timed it out too).
        let settings = vec![("message.max.bytes".into(), "10000".into()), ("message.timeout.ms".into(), "5000".into())];
        let sink = KafkaSink::new(KafkaOptions { brokers: bootstrap, topic: TOPIC.into(), settings }).unwrap();
        // The idempotent producer's id is taken while both brokers answer (asked of the broker
        // that goes down, it would hold back every message until they all timed out).
        assert_eq!(sink.publish(&[row(9, &other)]).await.acked, 1);
        cluster.broker_down(2).unwrap();
        let mut large = row(2, &big);
        large.payload = format!("{{\"pad\":\"{}\"}}", "x".repeat(20_000));
        let mut after_large = row(4, &big);
        after_large.seq = 2;
        let rows = [row(1, &stuck), large, row(3, &other), after_large];

        let published = sink.publish(&rows).await;
        assert_eq!(published.acked, 0, "the first row's partition does not answer: {published:?}");
        assert!(published.refused.is_none(), "the first row timed out, it is not refused: {published:?}");
        assert_eq!(published.confirmed_after, [2], "the other saga's row went out: {published:?}");
        assert_eq!(published.delivered_after, [2], "nothing of the refused row's saga was sent: {published:?}");
    }

    /// A producer session that turned fatal before any publish (the broker refused its
    /// producer id) fails every send at enqueue, so no failed delivery would ever replace it:
    /// the next publish starts a new session, and goes through once the broker accepts it.
    #[tokio::test]
    async fn a_producer_that_turned_fatal_between_publishes_is_replaced() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic(TOPIC, 1, 1).unwrap();
        let refused = RDKafkaRespErr::RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED;
        cluster.request_errors(RDKafkaApiKey::InitProducerId, &[refused]);
        let options = KafkaOptions { brokers: cluster.bootstrap_servers(), topic: TOPIC.into(), settings: vec![] };
        let sink = KafkaSink::new(options).unwrap();
        let start = std::time::Instant::now();
        while sink.current().client().fatal_error().is_none() {
            assert!(start.elapsed() < Duration::from_secs(10), "the refused producer id never made the session fatal");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cluster.clear_request_errors(RDKafkaApiKey::InitProducerId);

        let published = sink.publish(&[row(1, "saga-a")]).await;
        assert_eq!(published.acked, 1, "{published:?}");
        assert!(published.error.is_none(), "{published:?}");
    }
}
