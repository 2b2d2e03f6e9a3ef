//! The acknowledged-prefix rule: only what the sink acknowledged, counted from the start of the
//! batch, is marked published; the rest goes out again next time, in order, so `seq` n+1 is
//! never published ahead of an unacknowledged n.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::Mutex;

use super::*;
use crate::clock::SystemClock;
use crate::engine::SagaState;
use crate::event::OutboxEvent;
use crate::metrics::Metrics;
use crate::store::{Commit, DeadLetter, Fence, NewSaga, Store};

fn reply(acked: usize, error: bool) -> Published {
    Published {
        acked,
        error: error.then(|| anyhow::anyhow!("the sink failed")),
        refused: None,
        delivered_after: vec![],
        confirmed_after: vec![],
    }
}

#[test]
fn settle_marks_the_acknowledged_prefix_and_never_more_than_the_batch() {
    // (batch length, acked, sink error) -> (rows marked, error reported)
    let cases = [
        (5, 5, false, 5, false),
        (5, 0, true, 0, true),
        (5, 2, true, 2, true),
        (5, 5, true, 5, true),
        // A sink that stops short without saying why is failing all the same.
        (5, 2, false, 2, true),
        (5, 0, false, 0, true),
        // A sink that claims more than it was given: the batch, no more.
        (5, 7, false, 5, false),
        (5, 7, true, 5, true),
        (0, 0, false, 0, false),
        (1, 1, false, 1, false),
    ];
    for (len, acked, error, marked, reported) in cases {
        let (m, e) = settle(len, reply(acked, error));
        assert_eq!((m, e.is_some()), (marked, reported), "batch of {len}, acked {acked}, sink error {error}");
    }
}

#[test]
fn an_event_delivered_after_its_sagas_failed_one_is_an_inversion() {
    let row = |saga: &str, seq: i64| OutboxRow {
        id: seq,
        event_id: format!("{saga}-{seq}"),
        saga_id: saga.into(),
        seq,
        event_type: "X".into(),
        payload: "{}".into(),
        created_at: 0,
    };
    // a1 acked | a2 failed, b1 delivered, a3 delivered, b2 failed, c1 delivered
    let rows = [row("a", 1), row("a", 2), row("b", 1), row("a", 3), row("b", 2), row("c", 1)];
    let found: Vec<_> =
        inversions(&rows, 1, &[2, 3, 5]).into_iter().map(|(e, l)| (e.event_id.clone(), l.event_id.clone())).collect();
    assert_eq!(found, [("a-2".to_owned(), "a-3".to_owned())], "only a3 overtook its saga's failed a2");
    assert!(inversions(&rows, 1, &[]).is_empty(), "nothing delivered past the failure");
    assert!(inversions(&rows, 1, &[1, 2, 3]).is_empty(), "a listed row is not a failed one");
}

/// What [`ScriptedSink`] answers to one batch.
#[derive(Debug, Clone, Copy)]
enum Reply {
    /// Acknowledges the first `n` rows and says nothing about the rest.
    Prefix(usize),
    /// Acknowledges the first `n` rows, then fails.
    ErrorAfter(usize),
    /// Acknowledges the first `n` rows and refuses the next for good, as a broker does when the
    /// request they travelled in is too large; a batch of one row is not too large. With
    /// `true`, every row after the refused one was delivered all the same (it travelled in
    /// another request); with `false`, none was (it failed with the refused one).
    TooLargeAfter(usize, bool),
    /// Refuses the first row for good, whatever the batch.
    RefusedFirst,
    /// Acknowledges the first `n` rows; row `n` is not delivered (its partition does not
    /// answer), every row after it is (other partitions).
    StuckAt(usize),
}

/// A sink that answers from a script, then acknowledges everything; it records every batch.
#[derive(Default)]
struct ScriptedSink {
    script: Mutex<VecDeque<Reply>>,
    batches: Mutex<Vec<Vec<OutboxRow>>>,
}

#[async_trait]
impl Sink for ScriptedSink {
    fn name(&self) -> String {
        "scripted".into()
    }

    async fn publish(&self, rows: &[OutboxRow]) -> Published {
        self.batches.lock().unwrap().push(rows.to_vec());
        let refusal = |acked: usize, later_delivered: bool| Published {
            acked,
            error: Some(anyhow::anyhow!("refused")),
            refused: Some("too large".into()),
            delivered_after: if later_delivered { (acked + 1..rows.len()).collect() } else { vec![] },
            confirmed_after: if later_delivered { (acked + 1..rows.len()).collect() } else { vec![] },
        };
        let next = self.script.lock().unwrap().pop_front();
        match next {
            Some(Reply::Prefix(n)) => reply(n, false),
            Some(Reply::ErrorAfter(n)) => reply(n, true),
            Some(Reply::TooLargeAfter(n, later)) if rows.len() > 1 => {
                // Asked again right after: the same answer, until a batch of one comes.
                self.script.lock().unwrap().push_front(Reply::TooLargeAfter(n, later));
                refusal(n, later)
            }
            Some(Reply::TooLargeAfter(..)) => reply(rows.len(), false),
            Some(Reply::RefusedFirst) => {
                self.script.lock().unwrap().push_front(Reply::RefusedFirst);
                refusal(0, false)
            }
            Some(Reply::StuckAt(n)) => Published {
                acked: n,
                error: Some(anyhow::anyhow!("message timed out")),
                refused: None,
                delivered_after: (n + 1..rows.len()).collect(),
                confirmed_after: (n + 1..rows.len()).collect(),
            },
            None => reply(rows.len(), false),
        }
    }
}

/// A fresh SQLite store whose outbox holds the events of three sagas, interleaved as
/// concurrent sagas commit: a1 b1 c1 a2 b2 a3 c2 b3 a4 c3 b4 a5.
/// An outbox event with a readable id, `{saga}-{seq}`.
fn event(saga: &str, seq: i64) -> OutboxEvent {
    let event_id = format!("{saga}-{seq}");
    let payload = serde_json::json!({ "event_id": event_id, "saga_id": saga, "seq": seq, "type": "X" }).to_string();
    OutboxEvent { event_id, event_type: "X".into(), payload }
}

async fn store_with_interleaved_events(dir: &Path) -> Arc<dyn Store> {
    let store = crate::store::open(None, dir).await.unwrap();
    let def = crate::store::tests::def();
    for id in ["a", "b", "c"] {
        let saga = NewSaga {
            id: id.into(),
            definition: def.clone(),
            input: "{}".into(),
            state: SagaState::new(&def, 0),
            event: event(id, 1),
            now: 0,
            lease: None,
            trace_parent: None,
        };
        store.create_saga(&saga, None, 0).await.unwrap();
    }
    let names = vec!["only".to_owned()];
    for id in ["a", "b", "a", "c", "b", "a", "c", "b", "a"] {
        let rec = store.saga(id).await.unwrap().unwrap();
        let event = event(id, rec.seq + 1);
        let commit = Commit {
            saga_id: id,
            fence: Fence::Takeover,
            read_seq: rec.seq,
            state: &rec.state,
            step_names: &names,
            changed_steps: &[0],
            plugin_writes: &[],
            plugin_checks: &[],
            catalog_check: None,
            events: std::slice::from_ref(&event),
            now: 1,
            audit: None,
            response: None,
            answer: None,
            creation: None,
        };
        store.commit(&commit).await.unwrap();
    }
    store
}

/// Takes the relay lease for `options.owner`, as the relay does before it publishes: its epoch.
async fn lease(store: &dyn OutboxStore, options: &RelayOptions) -> i64 {
    store.relay_lease(&options.owner, 3_600_000).await.unwrap().expect("the relay lease is free")
}

async fn pending(store: &dyn Store) -> Vec<i64> {
    store.outbox_pending(1000).await.unwrap().iter().map(|r| r.id).collect()
}

/// Per saga, the `seq`s marked published so far; they must be 1..=n, with no hole.
async fn marked(store: &dyn Store, all: &[OutboxRow]) -> BTreeMap<String, Vec<i64>> {
    let unpublished: HashSet<i64> = pending(store).await.into_iter().collect();
    let mut out: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for row in all.iter().filter(|r| !unpublished.contains(&r.id)) {
        out.entry(row.saga_id.clone()).or_default().push(row.seq);
    }
    out
}

#[tokio::test]
async fn only_the_acknowledged_prefix_is_marked_and_the_rest_is_sent_again_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_interleaved_events(dir.path()).await;
    let all = store.outbox_pending(1000).await.unwrap();
    assert_eq!(all.len(), 12);
    let script = [
        Reply::Prefix(2),
        Reply::ErrorAfter(1),
        Reply::ErrorAfter(0),
        Reply::Prefix(0),
        Reply::ErrorAfter(3),
        Reply::Prefix(1),
    ];
    let sink = ScriptedSink { script: Mutex::new(script.into()), ..ScriptedSink::default() };
    let options = RelayOptions { batch_size: 4, ..RelayOptions::default() };
    let metrics = Metrics::new();
    let epoch = lease(&*store, &options).await;

    let mut acknowledged = 0;
    for (call, reply) in script.iter().enumerate() {
        let result = publish_once(&*store, &sink, &SystemClock, &metrics, &options, epoch).await;
        let n = match *reply {
            Reply::Prefix(n) | Reply::ErrorAfter(n) => n,
            Reply::TooLargeAfter(..) | Reply::RefusedFirst | Reply::StuckAt(_) => unreachable!("not in this script"),
        };
        assert!(result.is_err(), "call {call}: a batch not acknowledged whole is an error ({reply:?})");
        let sent = sink.batches.lock().unwrap()[call].clone();
        let expected = &all[acknowledged..(acknowledged + 4).min(all.len())];
        assert_eq!(sent, expected, "call {call}: the batch starts at the first unacknowledged event, in outbox order");
        acknowledged += n;
        assert_eq!(
            pending(&*store).await,
            all[acknowledged..].iter().map(|r| r.id).collect::<Vec<_>>(),
            "call {call}: exactly the acknowledged prefix is marked"
        );
        for (saga, seqs) in marked(&*store, &all).await {
            assert_eq!(
                seqs,
                (1..=seqs.len() as i64).collect::<Vec<_>>(),
                "call {call}: saga {saga} has a published seq past an unpublished one"
            );
        }
    }
    // The script is spent: the sink takes everything now.
    while !pending(&*store).await.is_empty() {
        publish_once(&*store, &sink, &SystemClock, &metrics, &options, epoch).await.unwrap();
    }
    // The first delivery of every event was in outbox order, so in `seq` order per saga.
    let mut seen = HashSet::new();
    let first: Vec<i64> =
        sink.batches.lock().unwrap().iter().flatten().filter(|r| seen.insert(r.id)).map(|r| r.id).collect();
    assert_eq!(first, all.iter().map(|r| r.id).collect::<Vec<_>>());
}

/// One partition that does not answer holds back only its own sagas' events: what the sink
/// delivered of the other sagas is marked published (not sent again), and each saga's events
/// stay published in `seq` order, without gaps.
#[tokio::test]
async fn events_delivered_past_a_stuck_one_are_marked_for_every_saga_with_nothing_stuck_before_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_interleaved_events(dir.path()).await;
    // a1 b1 c1 a2 b2 a3 c2 b3 a4 c3 b4 a5; b1 (index 1) is stuck, a1 went out before it.
    let all = store.outbox_pending(1000).await.unwrap();
    let sink = ScriptedSink { script: Mutex::new([Reply::StuckAt(1)].into()), ..ScriptedSink::default() };
    let options = RelayOptions { batch_size: 12, ..RelayOptions::default() };
    let metrics = Metrics::new();
    let epoch = lease(&*store, &options).await;
    assert!(
        publish_once(&*store, &sink, &SystemClock, &metrics, &options, epoch).await.is_err(),
        "a stuck event is an error"
    );
    let left: Vec<String> = store.outbox_pending(1000).await.unwrap().iter().map(|r| r.event_id.clone()).collect();
    let b: Vec<String> = all.iter().filter(|r| r.saga_id == "b").map(|r| r.event_id.clone()).collect();
    assert_eq!(left, b, "only saga b's events wait behind its stuck one");
    for (saga, seqs) in marked(&*store, &all).await {
        assert_eq!(
            seqs,
            (1..=seqs.len() as i64).collect::<Vec<_>>(),
            "saga {saga} has a published seq past an unpublished one"
        );
    }
    // Next round the sink takes everything: only saga b's events are sent again.
    publish_once(&*store, &sink, &SystemClock, &metrics, &options, epoch).await.unwrap();
    let again: Vec<String> = sink.batches.lock().unwrap()[1].iter().map(|r| r.event_id.clone()).collect();
    assert_eq!(again, b);
    assert!(pending(&*store).await.is_empty());
}

/// A batch ends at its byte budget as at its row count, and says it was full either way: the
/// relay then reads the next one at once instead of waiting for a commit or its poll interval
/// (a backlog of large events drained one batch per 200 ms otherwise).
#[tokio::test]
async fn a_batch_cut_by_its_byte_budget_is_full_and_the_rest_follows_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_interleaved_events(dir.path()).await;
    let all = store.outbox_pending(1000).await.unwrap();
    let three: usize = all[..3].iter().map(|r| r.payload.len()).sum();
    let options = RelayOptions { batch_size: 100, max_batch_bytes: three, ..RelayOptions::default() };
    let (metrics, sink) = (Metrics::new(), ScriptedSink::default());
    let epoch = lease(&*store, &options).await;
    let mut batches = Vec::new();
    loop {
        let batch = publish_once(&*store, &sink, &SystemClock, &metrics, &options, epoch).await.unwrap();
        batches.push(batch);
        if !batch.full {
            break;
        }
    }
    // No batch said "not full" while rows were left, and none went past its budget: each
    // row but its last started under it.
    assert!(pending(&*store).await.is_empty(), "{batches:?}");
    let sent = sink.batches.lock().unwrap().clone();
    assert_eq!(sent.concat(), all, "every row once, in order");
    assert!(sent.len() >= 4, "cut by bytes, not by the 100 rows: {batches:?}");
    for rows in &sent {
        let before_last: usize = rows[..rows.len() - 1].iter().map(|r| r.payload.len()).sum();
        assert!(before_last < three, "{} rows", rows.len());
    }
    // By count: a batch of exactly `batch_size` rows is full.
    let options = RelayOptions { batch_size: 12, ..RelayOptions::default() };
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_interleaved_events(dir.path()).await;
    let epoch = lease(&*store, &options).await;
    let batch = publish_once(&*store, &sink, &SystemClock, &metrics, &options, epoch).await.unwrap();
    assert_eq!(batch, Batch { marked: 12, full: true });
}

#[tokio::test]
async fn a_row_refused_with_its_batch_is_sent_alone_before_it_is_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_interleaved_events(dir.path()).await;
    // a1 b1 c1 a2 | b2 a3 c2 b3 | a4 c3 b4 a5
    let all = store.outbox_pending(1000).await.unwrap();
    let options = RelayOptions { batch_size: 4, ..RelayOptions::default() };
    let metrics = Metrics::new();
    let sink = ScriptedSink::default();
    let epoch = lease(&*store, &options).await;
    let dead =
        || async { store.dead_letters(None, 10).await.unwrap().into_iter().map(|d| d.event_id).collect::<Vec<_>>() };
    let sent = |i: usize| sink.batches.lock().unwrap()[i].clone();
    // The broker takes a1 b1, then calls c1's request too large; alone it fits.
    sink.script.lock().unwrap().push_back(Reply::TooLargeAfter(2, false));
    assert_eq!(publish_once(&*store, &sink, &SystemClock, &metrics, &options, epoch).await.unwrap().marked, 3);
    assert_eq!(sent(1), all[2..3], "the refused row went alone");
    assert!(dead().await.is_empty(), "a row that fits alone is not dead-lettered");
    assert_eq!(pending(&*store).await, all[3..].iter().map(|r| r.id).collect::<Vec<_>>());
    // a2 refused with a3 of its saga behind it in the batch, and a3 failed with it (a chain
    // commit's events share a request): a2 goes alone, and fits.
    sink.script.lock().unwrap().push_back(Reply::TooLargeAfter(0, false));
    assert_eq!(publish_once(&*store, &sink, &SystemClock, &metrics, &options, epoch).await.unwrap().marked, 1);
    assert_eq!(sent(3), all[3..4], "a2 went alone");
    assert!(dead().await.is_empty(), "a2 fits alone");
    sink.script.lock().unwrap().clear();
    // b2 refused with b3 of its saga behind it, and b3 delivered all the same: b2 sent now
    // would land after it. Not sent again: a gap keeps the order. What was delivered of the
    // other sagas (a3, c2) is published; b3 waits behind the dead letter.
    sink.script.lock().unwrap().push_back(Reply::TooLargeAfter(0, true));
    assert_eq!(publish_once(&*store, &sink, &SystemClock, &metrics, &options, epoch).await.unwrap().marked, 3);
    assert_eq!(sink.batches.lock().unwrap().len(), 5, "b2 was not sent alone");
    assert_eq!(dead().await, [all[4].event_id.clone()]);
    assert_eq!(pending(&*store).await, all[7..].iter().map(|r| r.id).collect::<Vec<_>>());
    sink.script.lock().unwrap().clear();
    // The rest up to b4, then b4 refused even alone: dead-lettered (once), a5 flows on.
    sink.script.lock().unwrap().push_back(Reply::Prefix(3));
    let _ = publish_once(&*store, &sink, &SystemClock, &metrics, &options, epoch).await; // short: an error
    assert_eq!(pending(&*store).await, all[10..].iter().map(|r| r.id).collect::<Vec<_>>());
    sink.script.lock().unwrap().push_back(Reply::RefusedFirst);
    assert_eq!(publish_once(&*store, &sink, &SystemClock, &metrics, &options, epoch).await.unwrap().marked, 1);
    let last = sink.batches.lock().unwrap().len() - 1;
    assert_eq!(sent(last), all[10..11], "b4 was tried alone");
    assert_eq!(dead().await.len(), 2);
    assert!(dead().await.contains(&all[10].event_id));
    sink.script.lock().unwrap().clear();
    publish_once(&*store, &sink, &SystemClock, &metrics, &options, epoch).await.unwrap();
    assert!(pending(&*store).await.is_empty());
}

/// An operator sends a dead letter again once the sink takes it: its row is back in line (the
/// same row, or written again where the janitor purged it), the relay publishes it, and a sink
/// that refuses it again dead-letters it again. Discarding one deletes it. Both are audited,
/// and an event with no dead letter changes nothing.
#[tokio::test]
async fn a_dead_letter_is_redelivered_or_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_interleaved_events(dir.path()).await;
    let all = store.outbox_pending(1000).await.unwrap();
    // a1 b1 c1 ...: the first two rows are refused for good, each when it comes first.
    let (a1, b1, now) = (all[0].clone(), all[1].clone(), SystemClock.now_ms());
    let (options, metrics, sink) = (RelayOptions::default(), Metrics::new(), ScriptedSink::default());
    let epoch = lease(&*store, &options).await;
    let dead =
        || async { store.dead_letters(None, 10).await.unwrap().into_iter().map(|d| d.event_id).collect::<Vec<_>>() };
    let audit = |action: &str, target: &str| crate::store::AuditEntry {
        actor: "ops".into(),
        action: action.into(),
        target: target.into(),
        before: None,
        after: None,
        note: None,
        answer: None,
    };
    let redeliver = |id: String| {
        let entry = audit("dead_letter.redeliver", &id);
        let store = Arc::clone(&store);
        async move { store.dead_letter_redeliver(&id, now, &entry).await.unwrap() }
    };
    let publish = || publish_once(&*store, &sink, &SystemClock, &metrics, &options, epoch);
    let sent_since = |n: usize| sink.batches.lock().unwrap()[n..].concat();
    // (The scripted refusal holds until the script is cleared: each pass dead-letters the row
    // it finds first.)
    sink.script.lock().unwrap().push_back(Reply::RefusedFirst);
    let _ = publish().await;
    assert_eq!(dead().await, std::slice::from_ref(&a1.event_id));
    let _ = publish().await;
    sink.script.lock().unwrap().clear();
    while !pending(&*store).await.is_empty() {
        publish().await.unwrap();
    }
    assert_eq!(dead().await, [b1.event_id.clone(), a1.event_id.clone()], "newest first");
    assert_eq!(store.dead_letter(&a1.event_id).await.unwrap().map(|d| d.seq), Some(a1.seq));
    assert_eq!(store.dead_letter(&all[2].event_id).await.unwrap(), None, "c1 was never refused");

    // Redelivered: the same row is back in line; the sink refuses it again: a dead letter again.
    assert!(redeliver(a1.event_id.clone()).await);
    assert_eq!((dead().await, pending(&*store).await), (vec![b1.event_id.clone()], vec![a1.id]));
    // The janitor's purge of published rows past their retention leaves it (its condition is
    // on the row: on PostgreSQL a purge that picked the row before the redelivery checks it
    // again as it is now).
    store.outbox_purge(SystemClock.now_ms() + 1_000, 1000).await.unwrap();
    assert_eq!(pending(&*store).await, [a1.id], "a redelivered event was purged");
    sink.script.lock().unwrap().push_back(Reply::RefusedFirst);
    let n = sink.batches.lock().unwrap().len();
    let _ = publish().await;
    sink.script.lock().unwrap().clear();
    assert!(sent_since(n).iter().all(|r| *r == a1), "sent again as it was: {:?}", sent_since(n));
    assert!(dead().await.contains(&a1.event_id) && pending(&*store).await.is_empty());

    // The janitor purges its row (published as it was dead-lettered again): a redelivery
    // writes the row again, under a new id, the same event; this time the sink takes it.
    let later = SystemClock.now_ms() + 1_000;
    assert_eq!(store.outbox_purge(later, 1000).await.unwrap(), 1, "a1's row, published as it was refused again");
    assert!(redeliver(a1.event_id.clone()).await);
    let back = store.outbox_pending(10).await.unwrap();
    assert_eq!(back.len(), 1);
    assert_ne!(back[0].id, a1.id, "written again");
    assert_eq!((&back[0].event_id, back[0].seq, &back[0].payload), (&a1.event_id, a1.seq, &a1.payload));
    let n = sink.batches.lock().unwrap().len();
    publish().await.unwrap();
    assert_eq!(sent_since(n).iter().map(|r| &r.event_id).collect::<Vec<_>>(), [&a1.event_id]);
    assert!(pending(&*store).await.is_empty());
    assert!(!redeliver(a1.event_id.clone()).await, "no dead letter left to redeliver");

    // Discarded: gone for good; once.
    let discard = audit("dead_letter.discard", &b1.event_id);
    assert!(store.dead_letter_discard(&b1.event_id, now, &discard).await.unwrap());
    assert!(dead().await.is_empty() && pending(&*store).await.is_empty());
    assert!(!store.dead_letter_discard(&b1.event_id, now, &discard).await.unwrap());
    let trail = |id: &str| {
        let store = Arc::clone(&store);
        let id = id.to_owned();
        async move {
            store.audit_log(Some(&id), None, 10).await.unwrap().into_iter().map(|r| r.entry.action).collect::<Vec<_>>()
        }
    };
    assert_eq!(trail(&a1.event_id).await, ["dead_letter.redeliver", "dead_letter.redeliver"]);
    assert_eq!(trail(&b1.event_id).await, ["dead_letter.discard"]);
}

/// A store whose writes of one kind fail (its database went away just then); the rest works.
/// Its lease calls never answer while `hang_lease` is set (a database gone away: each call
/// waits for a pool connection far longer than a stop may).
struct FailingWrites {
    inner: Arc<dyn Store>,
    mark: bool,
    dead_letter: bool,
    hang_lease: std::sync::atomic::AtomicBool,
}

impl FailingWrites {
    fn new(inner: &Arc<dyn Store>, mark: bool, dead_letter: bool) -> FailingWrites {
        FailingWrites { inner: Arc::clone(inner), mark, dead_letter, hang_lease: Default::default() }
    }

    async fn maybe_hang(&self) {
        if self.hang_lease.load(std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }
}

fn gone() -> crate::store::Error {
    crate::store::Error::Unsupported("the database went away".into())
}

#[async_trait]
impl OutboxStore for FailingWrites {
    async fn relay_lease(&self, owner: &str, lease_ms: i64) -> crate::store::Result<Option<i64>> {
        self.maybe_hang().await;
        self.inner.relay_lease(owner, lease_ms).await
    }
    async fn relay_release(&self, owner: &str) -> crate::store::Result<()> {
        self.maybe_hang().await;
        self.inner.relay_release(owner).await
    }
    async fn outbox_batch(&self, limit: u32, max_bytes: usize) -> crate::store::Result<Vec<OutboxRow>> {
        self.inner.outbox_batch(limit, max_bytes).await
    }
    async fn outbox_mark_published(&self, ids: &[i64], now: i64) -> crate::store::Result<()> {
        if self.mark {
            return Err(gone());
        }
        self.inner.outbox_mark_published(ids, now).await
    }
    async fn outbox_page(&self, saga_id: &str, after: i64, limit: u32) -> crate::store::Result<Vec<OutboxRow>> {
        self.inner.outbox_page(saga_id, after, limit).await
    }
    async fn outbox_dead_letter(
        &self,
        id: i64,
        reason: &str,
        now: i64,
        owner: &str,
        epoch: i64,
    ) -> crate::store::Result<bool> {
        if self.dead_letter {
            return Err(gone());
        }
        self.inner.outbox_dead_letter(id, reason, now, owner, epoch).await
    }
    async fn dead_letters(&self, before: Option<i64>, limit: u32) -> crate::store::Result<Vec<DeadLetter>> {
        self.inner.dead_letters(before, limit).await
    }
    async fn dead_letter(&self, event_id: &str) -> crate::store::Result<Option<DeadLetter>> {
        self.inner.dead_letter(event_id).await
    }
    async fn dead_letter_redeliver(
        &self,
        event_id: &str,
        now: i64,
        audit: &crate::store::AuditEntry,
    ) -> crate::store::Result<bool> {
        self.inner.dead_letter_redeliver(event_id, now, audit).await
    }
    async fn dead_letter_discard(
        &self,
        event_id: &str,
        now: i64,
        audit: &crate::store::AuditEntry,
    ) -> crate::store::Result<bool> {
        self.inner.dead_letter_discard(event_id, now, audit).await
    }
}

/// Every failed batch counts in `sagahost_relay_failures_total` (the alert on a relay that
/// does not move watches it), also when what fails is the store's write on the refused-row
/// path: the row's mark after it went alone, or its move to the dead letters. Nothing is
/// marked or dead-lettered then; the batch goes again.
#[tokio::test]
async fn a_store_failure_on_the_refused_row_path_counts_as_a_relay_failure() {
    let dir = tempfile::tempdir().unwrap();
    let inner = store_with_interleaved_events(dir.path()).await;
    let all = inner.outbox_pending(1000).await.unwrap();
    let options = RelayOptions { batch_size: 4, ..RelayOptions::default() };
    let metrics = Metrics::new();
    let sink = ScriptedSink::default();
    let epoch = lease(&*inner, &options).await;
    // a1 refused with its batch, fits alone, and its mark fails.
    let store = FailingWrites::new(&inner, true, false);
    sink.script.lock().unwrap().push_back(Reply::TooLargeAfter(0, false));
    assert!(publish_once(&store, &sink, &SystemClock, &metrics, &options, epoch).await.is_err());
    assert_eq!(metrics.relay_failures(), 1, "a failed mark of the row sent alone");
    sink.script.lock().unwrap().clear();
    // a1 refused even alone, and its move to the dead letters fails.
    let store = FailingWrites::new(&inner, false, true);
    sink.script.lock().unwrap().push_back(Reply::RefusedFirst);
    assert!(publish_once(&store, &sink, &SystemClock, &metrics, &options, epoch).await.is_err());
    assert_eq!(metrics.relay_failures(), 2, "a failed move to the dead letters");
    assert!(inner.dead_letters(None, 10).await.unwrap().is_empty());
    assert_eq!(pending(&*inner).await, all.iter().map(|r| r.id).collect::<Vec<_>>(), "nothing was marked");
}

/// A relay whose lease moved on while the sink was refusing a row (it paused; another replica
/// took the lease) does not dead-letter the row: it is the new holder's to send, and that
/// holder dead-letters it if the sink refuses it again. The stale relay's batch marks nothing
/// and counts nothing.
#[tokio::test]
async fn a_relay_that_lost_its_lease_mid_publish_leaves_a_refused_row_to_the_new_holder() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_interleaved_events(dir.path()).await;
    let all = store.outbox_pending(1000).await.unwrap();
    let a = RelayOptions { batch_size: 4, owner: "a".into(), ..RelayOptions::default() };
    let b = RelayOptions { batch_size: 4, owner: "b".into(), ..RelayOptions::default() };
    let (metrics, sink) = (Metrics::new(), ScriptedSink::default());
    let a_epoch = lease(&*store, &a).await;
    // a read its batch under its lease; by the time the refusal comes, b holds the lease.
    store.relay_release("a").await.unwrap();
    let b_epoch = lease(&*store, &b).await;
    sink.script.lock().unwrap().push_back(Reply::RefusedFirst);
    let batch = publish_once(&*store, &sink, &SystemClock, &metrics, &a, a_epoch).await.unwrap();
    assert_eq!(batch, Batch { marked: 0, full: false }, "not full: no reading again at once");
    assert!(store.dead_letters(None, 10).await.unwrap().is_empty(), "a dead-lettered a row under a lost lease");
    assert_eq!(pending(&*store).await, all.iter().map(|r| r.id).collect::<Vec<_>>(), "nothing marked");
    assert_eq!(metrics.dead_letters_written(), 0, "counted");
    // b gets the same refusal: its dead letter, counted.
    let batch = publish_once(&*store, &sink, &SystemClock, &metrics, &b, b_epoch).await.unwrap();
    assert_eq!(batch.marked, 1, "{batch:?}");
    let dead: Vec<_> = store.dead_letters(None, 10).await.unwrap().into_iter().map(|d| d.outbox_id).collect();
    assert_eq!(dead, [all[0].id]);
    assert_eq!(metrics.dead_letters_written(), 1, "not counted");
}

/// `sagahost_events_published_total` counts rows once they are marked: a batch the sink took
/// whose mark failed is sent again, and counted then, once.
#[tokio::test]
async fn a_batch_whose_mark_failed_is_counted_published_once_it_is_marked() {
    let dir = tempfile::tempdir().unwrap();
    let inner = store_with_interleaved_events(dir.path()).await;
    let options = RelayOptions { batch_size: 4, ..RelayOptions::default() };
    let metrics = Metrics::new();
    let sink = ScriptedSink::default();
    let epoch = lease(&*inner, &options).await;
    let failing = FailingWrites::new(&inner, true, false);
    assert!(publish_once(&failing, &sink, &SystemClock, &metrics, &options, epoch).await.is_err());
    assert_eq!(metrics.events_published(), 0, "taken by the sink, but not marked");
    let batch = publish_once(&*inner, &sink, &SystemClock, &metrics, &options, epoch).await.unwrap();
    assert_eq!((batch.marked, metrics.events_published()), (4, 4));
}

/// The relay's cue with a commit already announced (`committed` ready), `linger` and a long
/// poll interval; resolves to what `cue` answered and when.
async fn cue_after_a_commit(linger: Duration, shutdown: &CancellationToken) -> (bool, std::time::Duration) {
    let options = RelayOptions { linger, poll_interval: Duration::from_secs(3600), ..RelayOptions::default() };
    let started = std::time::Instant::now();
    let answer = cue(std::future::ready(()), &options, shutdown).await;
    (answer, started.elapsed())
}

#[tokio::test]
async fn a_commit_cues_the_relay_after_the_linger_so_commits_meanwhile_share_its_batch() {
    let shutdown = CancellationToken::new();
    let (answer, waited) = cue_after_a_commit(Duration::from_millis(150), &shutdown).await;
    assert!(answer);
    assert!(waited >= Duration::from_millis(150), "read before the linger ended: {waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    // Without a linger the relay reads at once.
    let (answer, waited) = cue_after_a_commit(Duration::ZERO, &shutdown).await;
    assert!(answer);
    // Generous for a loaded machine; without the cue the relay would wait for its poll.
    assert!(waited < Duration::from_secs(2), "{waited:?}");
}

#[tokio::test]
async fn shutdown_ends_the_linger_at_once() {
    let shutdown = CancellationToken::new();
    let stopper = shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        stopper.cancel();
    });
    let (answer, waited) = cue_after_a_commit(Duration::from_secs(3600), &shutdown).await;
    assert!(!answer, "a stopped relay must not publish another batch");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
}

#[tokio::test]
async fn without_a_commit_the_relay_looks_every_poll_interval() {
    let shutdown = CancellationToken::new();
    let options = RelayOptions {
        linger: Duration::from_secs(3600),
        poll_interval: Duration::from_millis(50),
        ..RelayOptions::default()
    };
    let started = std::time::Instant::now();
    // A commit that never comes: the poll interval cues the relay, and no linger follows it.
    assert!(cue(std::future::pending(), &options, &shutdown).await);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(50) && waited < Duration::from_secs(5), "{waited:?}");
}

/// A sink whose every publish takes `delay` before it acknowledges the batch; it counts the
/// publishes it started.
struct SlowSink {
    delay: Duration,
    started: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl Sink for SlowSink {
    fn name(&self) -> String {
        "slow".into()
    }

    async fn publish(&self, rows: &[OutboxRow]) -> Published {
        self.started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        reply(rows.len(), false)
    }
}

/// A relay on `store` publishing to `sink` as `a`, with a [`TEST_LEASE`], running until
/// `shutdown`.
fn slow_relay(
    store: &Arc<dyn Store>,
    sink: &Arc<SlowSink>,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let options = RelayOptions { lease: TEST_LEASE, owner: "a".into(), ..RelayOptions::default() };
    let store: Arc<dyn OutboxStore> = store.clone();
    let sink: Arc<dyn Sink> = sink.clone();
    let relay = Relay::new(store, sink, Arc::new(SystemClock), DriverHandle::default(), Metrics::new(), options);
    tokio::spawn(relay.run(shutdown.clone()))
}

/// [`slow_relay`] on [`store_with_interleaved_events`] in `dir`, its sink taking `delay` per
/// publish, once its first publish has begun.
async fn relay_publishing(
    dir: &Path,
    delay: Duration,
) -> (Arc<dyn Store>, Arc<SlowSink>, CancellationToken, tokio::task::JoinHandle<()>) {
    let store = store_with_interleaved_events(dir).await;
    let sink = Arc::new(SlowSink { delay, started: Default::default() });
    let shutdown = CancellationToken::new();
    let relay = slow_relay(&store, &sink, &shutdown);
    while sink.started.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (store, sink, shutdown, relay)
}

/// The lease of [`slow_relay`]: long enough that a renewal (an fsync on SQLite's one writer,
/// on a loaded machine) is never late by a whole lease.
const TEST_LEASE: Duration = Duration::from_millis(1500);

/// A publish that takes three leases holds the lease throughout: no other replica starts
/// publishing the same rows meanwhile.
#[tokio::test]
async fn a_publish_longer_than_the_lease_keeps_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _sink, shutdown, relay) = relay_publishing(dir.path(), TEST_LEASE * 3).await;
    for _ in 0..8 {
        tokio::time::sleep(TEST_LEASE / 3).await;
        assert_eq!(store.relay_lease("b", 300).await.unwrap(), None, "another replica took the lease mid-publish");
    }
    shutdown.cancel();
    relay.await.unwrap();
}

/// A lease that changed hands while a publish was on its way drops the publish, even though
/// the relay's renewal then takes the lease back: another replica may have published (and may
/// still be publishing) the same rows under the epoch between. Nothing of the dropped batch is
/// marked; the relay starts over under its new epoch.
#[tokio::test]
async fn a_lease_that_changed_hands_mid_publish_drops_the_publish() {
    let dir = tempfile::tempdir().unwrap();
    let (store, sink, _shutdown, relay) = relay_publishing(dir.path(), Duration::from_secs(60)).await;
    // Between two of `a`'s renewals, `b` takes the lease and gives it up again: `a`'s next
    // renewal takes it back under a later epoch.
    store.relay_release("a").await.unwrap();
    assert!(store.relay_lease("b", 60_000).await.unwrap().is_some(), "b could not take the released lease");
    store.relay_release("b").await.unwrap();
    let restarted = async {
        while sink.started.load(std::sync::atomic::Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(TEST_LEASE * 3, restarted)
        .await
        .expect("the publish went on under a lease that had changed hands");
    assert_eq!(pending(&*store).await.len(), 12, "a dropped publish marks nothing");
    relay.abort(); // the second publish would hold a stop for its whole grace
}

/// A publish that would take a minute does not hold the host's shutdown past the grace; the
/// lease is kept through the grace and then handed over at once.
#[tokio::test]
async fn a_stopping_relay_drops_a_publish_past_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _sink, shutdown, relay) = relay_publishing(dir.path(), Duration::from_secs(60)).await;
    let stopping = std::time::Instant::now();
    shutdown.cancel();
    let during = async {
        tokio::time::sleep(STOP_GRACE - Duration::from_secs(1)).await;
        store.relay_lease("b", 300).await.unwrap()
    };
    let (stopped, during) = tokio::join!(tokio::time::timeout(STOP_GRACE + Duration::from_secs(5), relay), during);
    stopped.expect("the relay did not stop").unwrap();
    assert!(stopping.elapsed() >= STOP_GRACE, "the publish was dropped before its grace");
    assert_eq!(during, None, "the lease lapsed during the grace (more than a lease long)");
    assert_eq!(pending(&*store).await.len(), 12, "a dropped publish marks nothing");
    assert!(store.relay_lease("b", 300).await.unwrap().is_some(), "the stopping relay handed its lease over");
}

/// A stopping relay whose database stopped answering (its lease renewals and the hand-over
/// hang) stops within the grace and the hand-over's bound, not when a store call gives up.
#[tokio::test]
async fn a_stopping_relay_does_not_wait_for_a_database_that_does_not_answer() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_interleaved_events(dir.path()).await;
    let hanging = Arc::new(FailingWrites::new(&store, false, false));
    let sink = Arc::new(SlowSink { delay: Duration::from_secs(60), started: Default::default() });
    let options = RelayOptions { lease: TEST_LEASE, owner: "a".into(), ..RelayOptions::default() };
    let (outbox, published): (Arc<dyn OutboxStore>, Arc<dyn Sink>) = (hanging.clone(), sink.clone());
    let relay = Relay::new(outbox, published, Arc::new(SystemClock), DriverHandle::default(), Metrics::new(), options);
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(relay.run(shutdown.clone()));
    while sink.started.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    hanging.hang_lease.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(TEST_LEASE / 3 + Duration::from_millis(100)).await; // a renewal is hanging now
    let stopping = std::time::Instant::now();
    shutdown.cancel();
    tokio::time::timeout(STOP_GRACE + RELEASE_BOUND + Duration::from_secs(3), relay)
        .await
        .expect("the stop waited for the database")
        .unwrap();
    assert!(stopping.elapsed() >= STOP_GRACE, "the grace was not given");
    assert_eq!(pending(&*store).await.len(), 12, "a dropped publish marks nothing");
}

/// Dead letters page newest first by their outbox id: following the cursor reads each once.
#[tokio::test]
async fn dead_letters_page_by_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_interleaved_events(dir.path()).await;
    let epoch = store.relay_lease("a", 60_000).await.unwrap().unwrap();
    for row in store.outbox_pending(5).await.unwrap() {
        assert!(store.outbox_dead_letter(row.id, "too large", 1, "a", epoch).await.unwrap());
    }
    let all: Vec<i64> = store.dead_letters(None, 100).await.unwrap().iter().map(|d| d.outbox_id).collect();
    assert_eq!(all.len(), 5);
    assert!(all.windows(2).all(|w| w[0] > w[1]), "newest first: {all:?}");
    let (mut paged, mut cursor) = (Vec::new(), None);
    loop {
        let page = store.dead_letters(cursor, 2).await.unwrap();
        paged.extend(page.iter().map(|d| d.outbox_id));
        match page.last() {
            Some(last) if page.len() == 2 => cursor = Some(last.outbox_id),
            _ => break,
        }
    }
    assert_eq!(paged, all);
}
