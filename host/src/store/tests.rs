//! Store tests, run against every backend: a fresh SQLite file and a fresh PostgreSQL database
//! per test. The PostgreSQL server is `SAGAHOST_TEST_POSTGRES` (an admin URL; default
//! `postgres://postgres@127.0.0.1:5432/postgres`). `SAGAHOST_TEST_POSTGRES=off` skips it, for
//! a machine without PostgreSQL; `./scripts/test` never sets that.

use std::sync::Arc;

use super::*;
use crate::engine::{EventSpec, PluginRef, RetryPolicy, SagaDefinition, StepDefinition};
use crate::event::Envelope;

pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// One store under test; dropping the PostgreSQL database when the test is done.
struct Backend {
    name: &'static str,
    store: Arc<dyn Store>,
    _dir: tempfile::TempDir,
    /// (admin URL, database URL) of a PostgreSQL scratch database.
    pg: Option<(String, String)>,
    /// The SQLite file.
    file: Option<std::path::PathBuf>,
}

impl Backend {
    async fn cleanup(self) {
        let Backend { store, pg, .. } = self;
        drop(store);
        if let Some((admin, url)) = pg {
            postgres::drop_database(&admin, &url).await.expect("drop the scratch database");
        }
    }
}

/// Every backend this machine runs, each empty and migrated.
async fn backends() -> Vec<Backend> {
    let dir = tempfile::tempdir().unwrap();
    // As a serving host opens it: the file locked, state reads of unwritten keys filtered.
    let sqlite = open_exclusive(None, dir.path(), postgres::DEFAULT_MAX_CONNECTIONS).await.unwrap();
    let file = Some(dir.path().join("sagahost.db"));
    let mut out = vec![Backend { name: "sqlite", store: sqlite, _dir: dir, pg: None, file }];
    let admin = std::env::var("SAGAHOST_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned());
    if admin != "off" {
        let url = postgres::scratch_database(&admin, "sagahost_test").await.unwrap_or_else(|e| {
            panic!("PostgreSQL at {admin} is needed for the store tests ({e}); SAGAHOST_TEST_POSTGRES=off skips them")
        });
        let dir = tempfile::tempdir().unwrap();
        let pg = open(Some(&url), dir.path()).await.unwrap();
        out.push(Backend { name: "postgres", store: pg, _dir: dir, pg: Some((admin, url)), file: None });
    }
    out
}

/// A one-step definition for tests (the relay's tests use it too).
pub(crate) fn def() -> SagaDefinition {
    let p = PluginRef { plugin: "p".into(), digest: "sha256:p".into() };
    SagaDefinition {
        saga_type: "order".into(),
        sensitive: vec![],
        steps: vec![StepDefinition {
            name: "only".into(),
            state: "DONE_ONE".into(),
            execute: p.clone(),
            compensate: p,
            retry: RetryPolicy::EXECUTE,
            compensate_retry: RetryPolicy::COMPENSATE,
            timeout_ms: 1000,
            deadline_ms: None,
            config: Default::default(),
        }],
    }
}

fn new_saga(id: &str) -> NewSaga {
    let d = def();
    let state = SagaState::new(&d, 0);
    let spec = EventSpec { event_type: "OrderCreated".into(), data: serde_json::json!({}) };
    let event = Envelope { saga_id: id, saga_type: "order", seq: 1, status: &state.status, at: 0 }.wrap(&spec);
    NewSaga { id: id.into(), state, definition: d, input: "{}".into(), event, now: 0, lease: None, trace_parent: None }
}

/// The claim of a `Prefer: wait` request for key `k` (no response yet).
fn waiting_claim() -> IdempotencyClaim {
    IdempotencyClaim {
        caller: "c".into(),
        route: "POST /orders".into(),
        key: "k".into(),
        fingerprint: "f".into(),
        lock_ms: 60_000,
        ttl_ms: 600_000,
        response: None,
    }
}

/// The event of the transition from `read_seq`, as a caller builds it.
fn event(id: &str, state: &SagaState, read_seq: i64) -> OutboxEvent {
    let spec = EventSpec { event_type: "X".into(), data: serde_json::json!({}) };
    Envelope { saga_id: id, saga_type: "order", seq: read_seq + 1, status: &state.status, at: 1 }.wrap(&spec)
}

fn commit<'a>(
    state: &'a SagaState,
    names: &'a [String],
    event: &'a OutboxEvent,
    fence: Fence,
    read_seq: i64,
) -> Commit<'a> {
    Commit {
        saga_id: "s1",
        fence,
        read_seq,
        state,
        step_names: names,
        changed_steps: &[0],
        plugin_writes: &[],
        plugin_checks: &[],
        catalog_check: None,
        events: std::slice::from_ref(event),
        now: 1,
        audit: None,
        response: None,
        answer: None,
        creation: None,
    }
}

fn entry(action: &str, target: &str) -> AuditEntry {
    AuditEntry {
        actor: "admin".into(),
        action: action.into(),
        target: target.into(),
        before: None,
        after: Some(serde_json::json!({ "x": 1 })),
        note: None,
        answer: None,
    }
}

#[tokio::test]
async fn a_live_lease_blocks_others_an_expired_one_is_taken_over_and_the_old_holder_is_fenced() {
    for b in backends().await {
        let store = &b.store;
        assert_eq!(store.create_saga(&new_saga("s1"), None, 0).await.unwrap(), CreateOutcome::Created);
        // A lease that must outlive the next statement is a minute long (a slow machine must not
        // let it lapse in between); the one meant to expire is renewed short first.
        let claimed = store.claim_due("a", 0, 60_000, 10).await.unwrap();
        assert_eq!(claimed, vec![("s1".to_owned(), 1)], "{}", b.name);
        assert!(
            store.claim_due("b", 0, 60_000, 10).await.unwrap().is_empty(),
            "{}: a live lease blocks others",
            b.name
        );
        assert!(store.renew_lease("s1", 1, 50).await.unwrap(), "{}", b.name);
        // Leases run on the database's clock: wait it out for real.
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        let taken = store.claim_due("b", 0, 60_000, 10).await.unwrap();
        assert_eq!(taken, vec![("s1".to_owned(), 2)], "{}: an expired lease is taken over with a new epoch", b.name);

        let rec = store.saga("s1").await.unwrap().unwrap();
        let names = vec!["only".to_owned()];
        // The old holder cannot commit, renew or release.
        let e2 = event("s1", &rec.state, 1);
        let stale = commit(&rec.state, &names, &e2, Fence::Lease(1), 1);
        assert!(matches!(store.commit(&stale).await, Err(Error::Fenced)), "{}", b.name);
        assert!(!store.renew_lease("s1", 1, 1000).await.unwrap(), "{}", b.name);
        // The new holder commits; seq continues gapless.
        let fresh = commit(&rec.state, &names, &e2, Fence::Lease(2), 1);
        assert_eq!(store.commit(&fresh).await.unwrap(), 2, "{}", b.name);
        // An outside event takes over: the epoch moves and the holder is fenced out.
        let e3 = event("s1", &rec.state, 2);
        let outside = commit(&rec.state, &names, &e3, Fence::Takeover, 2);
        assert_eq!(store.commit(&outside).await.unwrap(), 3, "{}", b.name);
        let e4 = event("s1", &rec.state, 3);
        let late = commit(&rec.state, &names, &e4, Fence::Lease(2), 3);
        assert!(matches!(store.commit(&late).await, Err(Error::Fenced)), "{}", b.name);
        let seqs: Vec<i64> = store.outbox_for_saga("s1").await.unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2, 3], "{}", b.name);
        // A fenced commit left nothing behind: the saga reads back whole.
        let rec = store.saga("s1").await.unwrap().unwrap();
        assert_eq!((rec.seq, rec.epoch), (3, 3), "{}", b.name);
        b.cleanup().await;
    }
}

#[tokio::test]
async fn a_chain_of_transitions_commits_whole_in_order_or_not_at_all() {
    for b in backends().await {
        let s = &b.store;
        s.create_saga(&new_saga("s1"), None, 0).await.unwrap();
        assert_eq!(s.claim_due("a", 0, 60_000, 1).await.unwrap(), vec![("s1".to_owned(), 1)], "{}", b.name);
        let rec = s.saga("s1").await.unwrap().unwrap();
        let names = vec!["only".to_owned()];
        let mut last = rec.state.clone();
        last.reason = Some("after three".into());
        // Three transitions from the read at seq 1, as the driver chains host-only steps.
        let events: Vec<OutboxEvent> = (1..=3).map(|n| event("s1", &last, n)).collect();
        let (pay, ship): (Vec<StateWrite>, Vec<StateWrite>) =
            (vec![("k".into(), Some(b"1".to_vec())), ("gone".into(), None)], vec![("k".into(), Some(b"2".to_vec()))]);
        let writes =
            [("pay", pay.as_slice()), ("ship", ship.as_slice()), ("pay", &[("k".into(), Some(b"3".to_vec()))][..])];

        // A chain computed from a stale read is fenced: none of it lands.
        let mut stale = commit(&last, &names, &events[0], Fence::Lease(2), 1);
        stale.events = &events;
        stale.plugin_writes = &writes;
        assert!(matches!(s.commit(&stale).await, Err(Error::Fenced)), "{}", b.name);
        assert_eq!(s.outbox_for_saga("s1").await.unwrap().len(), 1, "{}: no event of a fenced chain", b.name);
        assert_eq!(s.state_get("pay", "k").await.unwrap(), None, "{}: no write of a fenced chain", b.name);

        let mut chain = commit(&last, &names, &events[0], Fence::Lease(1), 1);
        chain.events = &events;
        chain.plugin_writes = &writes;
        assert_eq!(s.commit(&chain).await.unwrap(), 4, "{}: seq moves by the chain's length", b.name);
        let rows = s.outbox_for_saga("s1").await.unwrap();
        let got: Vec<(i64, &str)> = rows.iter().map(|r| (r.seq, r.event_id.as_str())).collect();
        let want: Vec<(i64, &str)> = (1..=4)
            .zip(std::iter::once(rows[0].event_id.as_str()).chain(events.iter().map(|e| e.event_id.as_str())))
            .collect();
        assert_eq!(got, want, "{}: one outbox row per transition, in seq order", b.name);
        assert!(rows.windows(2).all(|w| w[0].id < w[1].id), "{}: outbox ids follow seq", b.name);
        // Writes apply in call order: the later write of a key wins.
        assert_eq!(s.state_get("pay", "k").await.unwrap().as_deref(), Some(b"3".as_slice()), "{}", b.name);
        assert_eq!(s.state_get("ship", "k").await.unwrap().as_deref(), Some(b"2".as_slice()), "{}", b.name);
        let rec = s.saga("s1").await.unwrap().unwrap();
        assert_eq!((rec.seq, rec.state.reason.as_deref()), (4, Some("after three")), "{}", b.name);
        // The next commit continues from the chain's seq.
        let e5 = event("s1", &last, 4);
        assert_eq!(s.commit(&commit(&last, &names, &e5, Fence::Lease(1), 4)).await.unwrap(), 5, "{}", b.name);
        b.cleanup().await;
    }
}

#[tokio::test]
async fn a_settling_commit_stores_the_waiting_requests_response_once_and_never_when_fenced() {
    for b in backends().await {
        let s = &b.store;
        let claim = waiting_claim();
        assert_eq!(s.create_saga(&new_saga("s1"), Some(&claim), 0).await.unwrap(), CreateOutcome::Created);
        let names = vec!["only".to_owned()];
        let state = s.saga("s1").await.unwrap().unwrap().state;
        let e = event("s1", &state, 1);
        let response = |body: &'static [u8]| {
            Some(StoredResponse { caller: "c", route: "POST /orders", key: "k", status: 200, body })
        };
        let second = new_saga("s2");
        let again = || s.create_saga(&second, Some(&claim), 10);
        // Fenced (computed from a stale seq): nothing is stored, the key stays in flight.
        let stale = Commit { response: response(b"stale"), ..commit(&state, &names, &e, Fence::Takeover, 7) };
        assert!(matches!(s.commit(&stale).await, Err(Error::Fenced)), "{}", b.name);
        assert_eq!(again().await.unwrap(), CreateOutcome::InFlight, "{}", b.name);
        // Committed: stored with it, and replayed from then on.
        let c = Commit { response: response(b"settled"), ..commit(&state, &names, &e, Fence::Takeover, 1) };
        assert_eq!(s.commit(&c).await.unwrap(), 2, "{}", b.name);
        let replay = CreateOutcome::Replay { status: 200, body: b"settled".to_vec(), saga_id: Some("s1".into()) };
        assert_eq!(again().await.unwrap(), replay, "{}", b.name);
        // A stored response is never replaced, by a later commit or by the waiting request.
        let e3 = event("s1", &state, 2);
        let later = Commit { response: response(b"later"), ..commit(&state, &names, &e3, Fence::Takeover, 2) };
        assert_eq!(s.commit(&later).await.unwrap(), 3, "{}", b.name);
        let stored = s.complete_idempotency("c", "POST /orders", "k", 201, b"timed out").await.unwrap();
        assert_eq!(stored, Some((200, b"settled".to_vec())), "{}", b.name);
        assert_eq!(again().await.unwrap(), replay, "{}", b.name);
        b.cleanup().await;
    }
}

/// An outside event's commit stores its keyed request's answer beside a waiting create's
/// response (a cancel that settles the saga answers both), and neither when it is fenced.
#[tokio::test]
async fn an_outside_events_commit_stores_its_requests_answer_with_it_and_never_when_fenced() {
    for b in backends().await {
        let s = &b.store;
        assert_eq!(s.create_saga(&new_saga("s1"), Some(&waiting_claim()), 0).await.unwrap(), CreateOutcome::Created);
        let cancel = IdempotencyClaim { route: "POST /orders/s1/cancel".into(), ..waiting_claim() };
        assert_eq!(s.claim_key(&cancel, 0).await.unwrap(), CreateOutcome::Created, "{}", b.name);
        let names = vec!["only".to_owned()];
        let state = s.saga("s1").await.unwrap().unwrap().state;
        let e = event("s1", &state, 1);
        let answer = |body: &'static [u8]| {
            Some(StoredResponse { caller: "c", route: "POST /orders/s1/cancel", key: "k", status: 202, body })
        };
        let waiter = Some(StoredResponse { caller: "c", route: "POST /orders", key: "k", status: 200, body: b"w" });
        let stale = Commit { answer: answer(b"stale"), ..commit(&state, &names, &e, Fence::Takeover, 7) };
        assert!(matches!(s.commit(&stale).await, Err(Error::Fenced)), "{}", b.name);
        assert_eq!(s.claim_key(&cancel, 10).await.unwrap(), CreateOutcome::InFlight, "{}: still in flight", b.name);

        let c =
            Commit { answer: answer(b"cancelled"), response: waiter, ..commit(&state, &names, &e, Fence::Takeover, 1) };
        assert_eq!(s.commit(&c).await.unwrap(), 2, "{}", b.name);
        let replay = CreateOutcome::Replay { status: 202, body: b"cancelled".to_vec(), saga_id: None };
        assert_eq!(s.claim_key(&cancel, 10).await.unwrap(), replay, "{}", b.name);
        let created = CreateOutcome::Replay { status: 200, body: b"w".to_vec(), saga_id: Some("s1".into()) };
        assert_eq!(s.create_saga(&new_saga("s2"), Some(&waiting_claim()), 10).await.unwrap(), created, "{}", b.name);
        // The request's own completion afterwards finds its answer stored, and keeps it.
        let stored = s.complete_idempotency("c", "POST /orders/s1/cancel", "k", 202, b"other").await.unwrap();
        assert_eq!(stored, Some((202, b"cancelled".to_vec())), "{}", b.name);
        b.cleanup().await;
    }
}

#[tokio::test]
async fn a_first_commit_creates_its_saga_in_the_same_transaction_or_writes_nothing() {
    for b in backends().await {
        let s = &b.store;
        let claim = waiting_claim();
        let names = vec!["only".to_owned()];
        // Created claimed (as the driver's hand-over does) and its first two transitions.
        let first = NewSaga { lease: Some(("a".into(), 60_000)), ..new_saga("s1") };
        let mut last = first.state.clone();
        last.reason = Some("after two".into());
        let events: Vec<OutboxEvent> = (1..=2).map(|n| event("s1", &last, n)).collect();
        let writes = [("pay", &[("k".into(), Some(b"1".to_vec()))][..])];
        let response = StoredResponse { caller: "c", route: "POST /orders", key: "k", status: 200, body: b"done" };
        let mut c = commit(&last, &names, &events[0], Fence::LeaseRelease(1), 1);
        c.events = &events;
        c.plugin_writes = &writes;
        c.response = Some(response);
        c.creation = Some(Creation { saga: &first, claim: Some(&claim) });
        assert_eq!(s.commit(&c).await.unwrap(), 3, "{}: seq 1 (creation) plus two", b.name);
        let rec = s.saga("s1").await.unwrap().unwrap();
        assert_eq!((rec.seq, rec.epoch, rec.state.reason.as_deref()), (3, 1, Some("after two")), "{}", b.name);
        let seqs: Vec<i64> = s.outbox_for_saga("s1").await.unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2, 3], "{}", b.name);
        assert_eq!(s.state_get("pay", "k").await.unwrap().as_deref(), Some(b"1".as_slice()), "{}", b.name);
        let replay = CreateOutcome::Replay { status: 200, body: b"done".to_vec(), saga_id: Some("s1".into()) };
        assert_eq!(s.create_saga(&new_saga("s9"), Some(&claim), 10).await.unwrap(), replay, "{}", b.name);
        // Released by the commit (it is still due: anyone may claim it, at the next epoch).
        let claimed = s.claim_due("b", 0, 60_000, 10).await.unwrap();
        assert_eq!(claimed, vec![("s1".to_owned(), 2)], "{}: released by the commit", b.name);

        // The same key for another saga (a duplicate request that ran its steps too): the
        // key is not new, so nothing of it is written, its state writes included.
        let dup = NewSaga { lease: Some(("a".into(), 60_000)), ..new_saga("s2") };
        let other = [("pay", &[("k2".into(), Some(b"2".to_vec()))][..])];
        let mut c2 = commit(&last, &names, &events[0], Fence::Lease(1), 1);
        c2.saga_id = "s2";
        c2.plugin_writes = &other;
        c2.creation = Some(Creation { saga: &dup, claim: Some(&claim) });
        assert!(matches!(s.commit(&c2).await, Err(Error::Fenced)), "{}", b.name);
        assert!(s.saga("s2").await.unwrap().is_none(), "{}: no saga for a key that was not new", b.name);
        assert!(s.outbox_for_saga("s2").await.unwrap().is_empty(), "{}: no event", b.name);
        assert_eq!(s.state_get("pay", "k2").await.unwrap(), None, "{}: no state write", b.name);

        // A new key, the claim kept (more work is due): created as the commit leaves it, still
        // held by its driver at epoch 1, its one step row as the state says, and no response
        // stored (none was given: the request is still waiting).
        let other_key = IdempotencyClaim { key: "k3".into(), ..waiting_claim() };
        let kept = NewSaga { lease: Some(("a".into(), 60_000)), ..new_saga("s3") };
        let mut running = kept.state.clone();
        running.steps[0].attempts = 1;
        running.next_run_at = Some(0);
        let events3 = [event("s3", &running, 1)];
        let mut c3 = commit(&running, &names, &events3[0], Fence::Lease(1), 1);
        c3.saga_id = "s3";
        c3.creation = Some(Creation { saga: &kept, claim: Some(&other_key) });
        assert_eq!(s.commit(&c3).await.unwrap(), 2, "{}", b.name);
        let rec = s.saga("s3").await.unwrap().unwrap();
        assert_eq!((rec.seq, rec.epoch, rec.state.steps[0].attempts), (2, 1, 1), "{}", b.name);
        assert!(s.claim_due("b", 0, 60_000, 10).await.unwrap().is_empty(), "{}: still held by its driver", b.name);
        assert!(s.renew_lease("s3", 1, 60_000).await.unwrap(), "{}: held at epoch 1", b.name);
        let seqs: Vec<i64> = s.outbox_for_saga("s3").await.unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2], "{}", b.name);
        let again = s.create_saga(&new_saga("s9"), Some(&other_key), 10).await.unwrap();
        assert_eq!(again, CreateOutcome::InFlight, "{}: the waiting request's key is in flight", b.name);
        b.cleanup().await;
    }
}

#[tokio::test]
async fn idempotency_claims_replay_mismatch_in_flight_and_abandoned() {
    for b in backends().await {
        let store = &b.store;
        let claim = |fp: &str, response: Option<(u16, Vec<u8>)>| IdempotencyClaim {
            caller: "c".into(),
            route: "POST /orders".into(),
            key: "k".into(),
            fingerprint: fp.into(),
            lock_ms: 100,
            ttl_ms: 10_000,
            response,
        };
        let create = |id: &'static str, fp: &'static str, now: i64| {
            let store = Arc::clone(store);
            let c = claim(fp, None);
            async move { store.create_saga(&new_saga(id), Some(&c), now).await.unwrap() }
        };
        assert_eq!(create("a", "f1", 0).await, CreateOutcome::Created, "{}", b.name);
        assert_eq!(create("b", "f1", 50).await, CreateOutcome::InFlight, "{}", b.name);
        assert_eq!(create("b", "f2", 50).await, CreateOutcome::Mismatch, "{}", b.name);
        assert_eq!(create("b", "f1", 200).await, CreateOutcome::Abandoned { saga_id: "a".into() }, "{}", b.name);
        let stored = store.complete_idempotency("c", "POST /orders", "k", 201, b"body").await.unwrap();
        assert_eq!(stored, None, "{}: stored now", b.name);
        // A second response for the key does not replace the first; it is handed back.
        let again = store.complete_idempotency("c", "POST /orders", "k", 200, b"later").await.unwrap();
        assert_eq!(again, Some((201, b"body".to_vec())), "{}: the first response stands", b.name);
        assert_eq!(
            create("b", "f1", 300).await,
            CreateOutcome::Replay { status: 201, body: b"body".to_vec(), saga_id: Some("a".into()) },
            "{}",
            b.name
        );
        assert!(store.saga("b").await.unwrap().is_none(), "{}: never a second saga for one key", b.name);
        // Past retention the key is forgotten and may be used afresh.
        assert_eq!(create("c", "f2", 20_000).await, CreateOutcome::Created, "{}", b.name);
        assert!(store.saga("c").await.unwrap().is_some(), "{}: the replaced key's saga", b.name);
        assert_eq!(create("d", "f2", 20_050).await, CreateOutcome::InFlight, "{}: the new claim holds", b.name);
        // Keys that create nothing: claim, take over when abandoned, release.
        let other = IdempotencyClaim { route: "POST /x".into(), ..claim("f9", None) };
        assert_eq!(store.claim_key(&other, 0).await.unwrap(), CreateOutcome::Created, "{}", b.name);
        assert_eq!(store.claim_key(&other, 50).await.unwrap(), CreateOutcome::InFlight, "{}", b.name);
        assert_eq!(store.claim_key(&other, 150).await.unwrap(), CreateOutcome::Created, "{}", b.name);
        store.release_key("c", "POST /x", "k").await.unwrap();
        assert_eq!(store.claim_key(&other, 160).await.unwrap(), CreateOutcome::Created, "{}", b.name);
        // Taken over just before its time to live ran out, the key lives a whole one again.
        assert_eq!(store.claim_key(&other, 10_100).await.unwrap(), CreateOutcome::Created, "{}", b.name);
        store.expire_idempotency(10_180, 100).await.unwrap();
        assert_eq!(store.claim_key(&other, 10_180).await.unwrap(), CreateOutcome::InFlight, "{}: forgotten", b.name);
        b.cleanup().await;
    }
}

#[tokio::test]
async fn one_key_raced_from_many_connections_creates_one_saga() {
    for b in backends().await {
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let store = Arc::clone(&b.store);
                tokio::spawn(async move {
                    let c = IdempotencyClaim {
                        caller: "c".into(),
                        route: "POST /orders".into(),
                        key: "raced".into(),
                        fingerprint: "f".into(),
                        lock_ms: 60_000,
                        ttl_ms: 60_000,
                        response: None,
                    };
                    store.create_saga(&new_saga(&format!("r{i}")), Some(&c), 0).await.unwrap()
                })
            })
            .collect();
        let mut created = 0;
        for t in tasks {
            match t.await.unwrap() {
                CreateOutcome::Created => created += 1,
                CreateOutcome::InFlight => {}
                other => panic!("{}: unexpected {other:?}", b.name),
            }
        }
        assert_eq!(created, 1, "{}", b.name);
        assert_eq!(b.store.list_sagas("order", None, None, 100).await.unwrap().len(), 1, "{}", b.name);
        b.cleanup().await;
    }
}

/// Makes the next claim of an idempotency key find the key taken and then lose it: a trigger
/// deletes the row the claim would conflict with and drops the claim's insert, as when the
/// request holding the key releases it (or the janitor expires it) after the claim statement
/// and before the read of what the key holds. Reads back whether the armed trigger fired.
struct KeyVanishes;

impl KeyVanishes {
    const SQLITE: [&'static str; 2] = [
        "CREATE TABLE IF NOT EXISTS vanish_once (n INTEGER)",
        "CREATE TRIGGER IF NOT EXISTS vanish BEFORE INSERT ON idempotency_keys \
         WHEN EXISTS (SELECT 1 FROM vanish_once) BEGIN \
         DELETE FROM vanish_once; \
         DELETE FROM idempotency_keys WHERE caller = NEW.caller AND route = NEW.route AND key = NEW.key; \
         SELECT RAISE(IGNORE); END",
    ];
    const POSTGRES: [&'static str; 3] = [
        "CREATE TABLE IF NOT EXISTS vanish_once (n INTEGER)",
        "CREATE OR REPLACE FUNCTION vanish_claimed_key() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         DELETE FROM vanish_once; \
         IF FOUND THEN \
           DELETE FROM idempotency_keys WHERE caller = NEW.caller AND route = NEW.route AND key = NEW.key; \
           RETURN NULL; \
         END IF; \
         RETURN NEW; END $$",
        "CREATE OR REPLACE TRIGGER vanish BEFORE INSERT ON idempotency_keys \
         FOR EACH ROW EXECUTE FUNCTION vanish_claimed_key()",
    ];

    async fn arm(b: &Backend) {
        let mut statements: Vec<&str> = if b.file.is_some() { Self::SQLITE.to_vec() } else { Self::POSTGRES.to_vec() };
        statements.push("INSERT INTO vanish_once (n) VALUES (1)");
        Self::run(b, &statements).await;
    }

    async fn fired(b: &Backend) -> bool {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM vanish_once")
            .fetch_one(&mut Self::connect(b).await)
            .await
            .unwrap();
        left == 0
    }

    async fn run(b: &Backend, statements: &[&str]) {
        use sqlx::Executor as _;
        let mut conn = Self::connect(b).await;
        for s in statements {
            conn.execute(*s).await.unwrap();
        }
    }

    /// A connection of its own to the backend's database, beside the store's.
    async fn connect(b: &Backend) -> sqlx::AnyConnection {
        use sqlx::Connection as _;
        let url = match (&b.file, &b.pg) {
            (Some(file), _) => sqlite::file_url(file),
            (None, Some((_, url))) => url.clone(),
            (None, None) => unreachable!("a backend is a file or a database"),
        };
        sqlx::AnyConnection::connect(&url).await.unwrap()
    }
}

/// A key found taken by a claim and gone before the claim reads what it holds (its holder
/// released it, or it expired) is free: the claim is made again and goes in. On PostgreSQL a
/// creation's claim is one statement outside a transaction, so another request's release can
/// land there; it failed the request with an internal error.
#[tokio::test]
async fn a_key_gone_between_a_claim_and_the_read_of_what_it_holds_is_claimed_again() {
    for b in backends().await {
        let c = waiting_claim();
        assert_eq!(b.store.create_saga(&new_saga("a"), Some(&c), 0).await.unwrap(), CreateOutcome::Created);
        KeyVanishes::arm(&b).await;
        let again = b.store.create_saga(&new_saga("b"), Some(&c), 10).await;
        assert!(KeyVanishes::fired(&b).await, "{}: the claim never met the vanishing key", b.name);
        assert_eq!(again.unwrap(), CreateOutcome::Created, "{}: a creation whose key went", b.name);
        assert!(b.store.saga("b").await.unwrap().is_some(), "{}: the saga of the key claimed again", b.name);
        let replay = b.store.create_saga(&new_saga("c"), Some(&c), 20).await.unwrap();
        assert_eq!(replay, CreateOutcome::InFlight, "{}: the key is held for the new saga", b.name);

        // A key of a request that creates nothing, claimed in a transaction.
        let other = IdempotencyClaim { route: "POST /x".into(), ..waiting_claim() };
        assert_eq!(b.store.claim_key(&other, 0).await.unwrap(), CreateOutcome::Created, "{}", b.name);
        KeyVanishes::arm(&b).await;
        let again = b.store.claim_key(&other, 10).await;
        assert!(KeyVanishes::fired(&b).await, "{}: the key claim never met the vanishing key", b.name);
        assert_eq!(again.unwrap(), CreateOutcome::Created, "{}: a key claim whose key went", b.name);
        assert_eq!(b.store.claim_key(&other, 20).await.unwrap(), CreateOutcome::InFlight, "{}", b.name);
        b.cleanup().await;
    }
}

#[tokio::test]
async fn workers_claiming_at_once_take_disjoint_sagas() {
    for b in backends().await {
        for i in 0..200 {
            b.store.create_saga(&new_saga(&format!("s{i:03}")), None, 0).await.unwrap();
        }
        // Eight claimers at once, on PostgreSQL each on its own connection: no call may return
        // more than its limit (issue 11 item 19), and no saga may go to two of them.
        let tasks: Vec<_> = (0..8)
            .map(|w| {
                let store = Arc::clone(&b.store);
                tokio::spawn(async move {
                    let mut mine = vec![];
                    loop {
                        let got = store.claim_due(&format!("w{w}"), 0, 60_000, 7).await.unwrap();
                        assert!(got.len() <= 7, "a claim returned {} sagas for a limit of 7", got.len());
                        if got.is_empty() {
                            return mine;
                        }
                        mine.extend(got.into_iter().map(|(id, _)| id));
                    }
                })
            })
            .collect();
        let mut all = vec![];
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort();
        let expected: Vec<String> = (0..200).map(|i| format!("s{i:03}")).collect();
        assert_eq!(all, expected, "{}: every due saga claimed exactly once", b.name);
        b.cleanup().await;
    }
}

#[tokio::test]
async fn one_relay_lease_holder_at_a_time_and_takeover_after_expiry() {
    const LIVE: i64 = 60_000;
    for b in backends().await {
        let s = &b.store;
        // A lease that must still be alive at the next call is a minute long, so a slow machine
        // cannot let it lapse between two statements (a 200 ms one once did, under CI load);
        // only the lease meant to expire is short, and the sleep outlasts it.
        let first = s.relay_lease("a", LIVE).await.unwrap();
        assert_eq!(first, Some(1), "{}", b.name);
        assert_eq!(s.relay_lease("b", LIVE).await.unwrap(), None, "{}: b waits while a's lease lives", b.name);
        assert_eq!(s.relay_lease("a", 50).await.unwrap(), Some(1), "{}: renewal keeps the epoch", b.name);
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        assert_eq!(s.relay_lease("b", LIVE).await.unwrap(), Some(2), "{}: b takes over an expired lease", b.name);
        assert_eq!(s.relay_lease("a", LIVE).await.unwrap(), None, "{}: a lost it", b.name);
        s.relay_release("b").await.unwrap();
        assert_eq!(s.relay_lease("a", LIVE).await.unwrap(), Some(3), "{}: a released lease is free at once", b.name);
        b.cleanup().await;
    }
}

/// A row the sink refused is dead-lettered only by the relay lease's holder, under the epoch
/// it took the lease at, and only while the row is still unpublished: a former holder that
/// wakes from a pause (its refusal came before the lease moved on) writes nothing, neither
/// over an event another relay delivered meanwhile nor over an operator's redelivery.
#[tokio::test]
async fn a_dead_letter_is_written_only_under_the_relay_lease_and_only_for_an_unpublished_row() {
    const LIVE: i64 = 60_000;
    for b in backends().await {
        let s = &b.store;
        for id in ["d1", "d2", "d3"] {
            s.create_saga(&new_saga(id), None, 0).await.unwrap();
        }
        let rows = s.outbox_pending(10).await.unwrap();
        let (r1, r2, r3) = (&rows[0], &rows[1], &rows[2]);
        let dead =
            || async { s.dead_letters(None, 10).await.unwrap().into_iter().map(|d| d.outbox_id).collect::<Vec<_>>() };
        let pending = || async { s.outbox_pending(10).await.unwrap().into_iter().map(|r| r.id).collect::<Vec<_>>() };
        let a = s.relay_lease("a", LIVE).await.unwrap().unwrap();
        // Not the holder, or not its epoch: nothing written.
        assert!(!s.outbox_dead_letter(r1.id, "refused", 1, "b", a).await.unwrap(), "{}: b never held it", b.name);
        assert!(!s.outbox_dead_letter(r1.id, "refused", 1, "a", a + 1).await.unwrap(), "{}: another epoch", b.name);
        assert_eq!((dead().await, pending().await.len()), (vec![], 3), "{}", b.name);
        // Delivered meanwhile (marked by whoever sent it): not a dead letter.
        s.outbox_mark_published(&[r1.id], 1).await.unwrap();
        assert!(!s.outbox_dead_letter(r1.id, "refused", 1, "a", a).await.unwrap(), "{}: r1 was delivered", b.name);
        assert_eq!(dead().await, Vec::<i64>::new(), "{}", b.name);
        // The holder, an unpublished row: moved, once.
        assert!(s.outbox_dead_letter(r2.id, "refused", 1, "a", a).await.unwrap(), "{}", b.name);
        assert!(!s.outbox_dead_letter(r2.id, "refused", 1, "a", a).await.unwrap(), "{}: twice", b.name);
        assert_eq!((dead().await, pending().await), (vec![r2.id], vec![r3.id]), "{}", b.name);
        // An operator sends it again; meanwhile a's lease lapsed and b took it over. a, waking
        // with the refusal it got before, must not undo the redelivery; b may dead-letter.
        assert!(s.dead_letter_redeliver(&r2.event_id, 2, &entry("dead_letter.redeliver", &r2.event_id)).await.unwrap());
        s.relay_release("a").await.unwrap();
        let b_epoch = s.relay_lease("b", LIVE).await.unwrap().unwrap();
        assert!(b_epoch > a, "{}", b.name);
        for id in [r2.id, r3.id] {
            assert!(!s.outbox_dead_letter(id, "refused", 3, "a", a).await.unwrap(), "{}: a lost the lease", b.name);
        }
        assert_eq!((dead().await, pending().await), (vec![], vec![r2.id, r3.id]), "{}", b.name);
        assert!(s.outbox_dead_letter(r3.id, "refused", 3, "b", b_epoch).await.unwrap(), "{}", b.name);
        assert_eq!((dead().await, pending().await), (vec![r3.id], vec![r2.id]), "{}", b.name);
        b.cleanup().await;
    }
}

/// An operator's redelivery or discard of a dead letter happens once: again (a double click,
/// two operators) it answers false and writes nothing, neither an outbox row nor an audit
/// entry; and where writes share a transaction, that refusal leaves the others in it alone.
#[tokio::test]
async fn a_dead_letter_is_redelivered_or_discarded_once_and_a_second_try_writes_nothing() {
    const LIVE: i64 = 60_000;
    for b in backends().await {
        let s = &b.store;
        for id in ["e1", "e2"] {
            s.create_saga(&new_saga(id), None, 0).await.unwrap();
        }
        let rows = s.outbox_pending(10).await.unwrap();
        let (r1, r2) = (rows[0].clone(), rows[1].clone());
        let a = s.relay_lease("a", LIVE).await.unwrap().unwrap();
        let audited = || async { s.audit_log(None, None, 100).await.unwrap().len() };
        let pending = || async { s.outbox_pending(10).await.unwrap().into_iter().map(|r| r.id).collect::<Vec<_>>() };
        assert!(s.outbox_dead_letter(r1.id, "refused", 1, "a", a).await.unwrap(), "{}", b.name);
        assert!(s.outbox_dead_letter(r2.id, "refused", 1, "a", a).await.unwrap(), "{}", b.name);
        let redeliver = entry("dead_letter.redeliver", &r1.event_id);
        assert!(s.dead_letter_redeliver(&r1.event_id, 2, &redeliver).await.unwrap(), "{}", b.name);
        assert_eq!((pending().await, audited().await), (vec![r1.id], 1), "{}", b.name);
        // Again, alone and beside a write that commits in the same batch (SQLite).
        assert!(!s.dead_letter_redeliver(&r1.event_id, 3, &redeliver).await.unwrap(), "{}: twice", b.name);
        let e3 = new_saga("e3");
        let (again, created) =
            tokio::join!(s.dead_letter_redeliver(&r1.event_id, 3, &redeliver), s.create_saga(&e3, None, 3));
        assert!(!again.unwrap(), "{}: beside another write", b.name);
        assert_eq!(created.unwrap(), CreateOutcome::Created, "{}", b.name);
        assert_eq!(pending().await.len(), 2, "{}: r1 once, and e3's event", b.name);
        assert_eq!(audited().await, 1, "{}", b.name);
        let discard = entry("dead_letter.discard", &r2.event_id);
        assert!(s.dead_letter_discard(&r2.event_id, 4, &discard).await.unwrap(), "{}", b.name);
        assert!(!s.dead_letter_discard(&r2.event_id, 5, &discard).await.unwrap(), "{}: twice", b.name);
        assert!(!s.dead_letter_redeliver(&r2.event_id, 5, &redeliver).await.unwrap(), "{}: discarded", b.name);
        assert!(s.dead_letters(None, 10).await.unwrap().is_empty(), "{}", b.name);
        assert!(!pending().await.contains(&r2.id), "{}: a discarded event stays unsent", b.name);
        assert_eq!(audited().await, 2, "{}", b.name);
        b.cleanup().await;
    }
}

/// The janitor's lease is a row of its own: one replica's janitor at a time, whoever holds
/// the relay's.
#[tokio::test]
async fn one_janitor_lease_holder_at_a_time_apart_from_the_relays_lease() {
    const LIVE: i64 = 60_000;
    for b in backends().await {
        let s = &b.store;
        assert!(s.janitor_lease("a", LIVE).await.unwrap(), "{}", b.name);
        assert!(!s.janitor_lease("b", LIVE).await.unwrap(), "{}: b waits while a's lease lives", b.name);
        assert_eq!(s.relay_lease("b", LIVE).await.unwrap(), Some(1), "{}: the relay's lease is another row", b.name);
        assert!(s.janitor_lease("a", 50).await.unwrap(), "{}: a renews its own", b.name);
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        assert!(s.janitor_lease("b", LIVE).await.unwrap(), "{}: b takes over an expired lease", b.name);
        assert!(!s.janitor_lease("a", LIVE).await.unwrap(), "{}: a lost it", b.name);
        s.janitor_release("a").await.unwrap();
        assert!(!s.janitor_lease("a", LIVE).await.unwrap(), "{}: only the holder gives it up", b.name);
        s.janitor_release("b").await.unwrap();
        assert!(s.janitor_lease("a", LIVE).await.unwrap(), "{}: a released lease is free at once", b.name);
        assert_eq!(s.relay_lease("a", LIVE).await.unwrap(), None, "{}: b still holds the relay's", b.name);
        b.cleanup().await;
    }
}

#[tokio::test]
async fn uploads_and_definition_changes_bump_the_catalog_version() {
    for b in backends().await {
        let s = &b.store;
        let v0 = s.catalog_version().await.unwrap();
        assert!(s.put_plugin("sha256:p", "p", b"wasm", 1, None).await.unwrap(), "{}", b.name);
        let v1 = s.catalog_version().await.unwrap();
        assert!(v1 > v0, "{}", b.name);
        assert!(!s.put_plugin("sha256:p", "p", b"wasm", 2, None).await.unwrap(), "{}: the same bytes twice", b.name);
        assert_eq!(s.catalog_version().await.unwrap(), v1, "{}: nothing new, no bump", b.name);
        s.put_definition(&def(), DefinitionSource::Admin, None, 3, None).await.unwrap();
        assert!(s.catalog_version().await.unwrap() > v1, "{}", b.name);
        let row = s.plugin("sha256:p").await.unwrap().unwrap();
        assert_eq!((row.name.as_str(), row.wasm.as_slice()), ("p", b"wasm".as_slice()), "{}", b.name);
        assert!(s.plugin("sha256:nope").await.unwrap().is_none(), "{}", b.name);
        b.cleanup().await;
    }
}

#[tokio::test]
async fn plugin_state_prefix_scans_treat_like_wildcards_literally() {
    for b in backends().await {
        let s = &b.store;
        s.create_saga(&new_saga("s1"), None, 0).await.unwrap();
        let rec = s.saga("s1").await.unwrap().unwrap();
        let names = vec!["only".to_owned()];
        let e = event("s1", &rec.state, 1);
        let writes: Vec<StateWrite> = ["a%/1", "a%/2", "ab/1", "a_/1", "b/1"]
            .iter()
            .map(|k| (k.to_string(), Some(k.as_bytes().to_vec())))
            .collect();
        let mut c = commit(&rec.state, &names, &e, Fence::Takeover, 1);
        let plugin_writes = [("p", writes.as_slice())];
        c.plugin_writes = &plugin_writes;
        s.commit(&c).await.unwrap();
        let keys: Vec<String> = s.state_list("p", "a%/", 10).await.unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["a%/1", "a%/2"], "{}", b.name);
        assert_eq!(s.state_get("p", "b/1").await.unwrap().as_deref(), Some(b"b/1".as_slice()), "{}", b.name);
        b.cleanup().await;
    }
}

/// Commits `keys` (each key its own value) to `plugin`'s state, as saga `s1`'s next transition.
async fn write_state(s: &Arc<dyn Store>, plugin: &str, keys: &[&str]) {
    let writes: Vec<StateWrite> = keys.iter().map(|k| (k.to_string(), Some(k.as_bytes().to_vec()))).collect();
    commit_state(s, plugin, &writes, false).await.unwrap();
}

#[tokio::test]
async fn state_scans_page_through_a_prefix_in_byte_order_within_one_plugin() {
    let keys = [
        "a%/1",
        "a%/10",
        "a%/2",
        "a%/_",
        "a%/%",
        "a%/z",
        "a%/é",
        "a%/日本",
        "a%/\u{D7FF}",
        "a%/\u{E000}",
        "a%/\u{10FFFF}",
        "a%/\u{10FFFF}x",
        "a%",
        "a%0",
        "a_/1",
        "ab/1",
        "a&",
        "b/1",
    ];
    let prefix = "a%/";
    let mut expected: Vec<String> = keys.iter().filter(|k| k.starts_with(prefix)).map(|k| k.to_string()).collect();
    expected.sort(); // Rust orders strings by their bytes
    for b in backends().await {
        let s = &b.store;
        write_state(s, "p", &keys).await;
        // Another plugin holds keys under the same prefix, and one whose name extends "p".
        write_state(s, "q", &["a%/1", "a%/0", "a%/zz"]).await;
        write_state(s, "p2", &["a%/11"]).await;

        let scan = |prefix: &'static str, after: Option<String>, limit: u32| {
            let s = Arc::clone(s);
            async move {
                let rows = s.state_scan("p", prefix, after.as_deref(), limit).await.unwrap();
                rows.into_iter()
                    .map(|(k, v)| {
                        assert_eq!(v, k.as_bytes(), "the value of {k}");
                        k
                    })
                    .collect::<Vec<String>>()
            }
        };
        // Page through the prefix, 3 at a time, each page after the last key of the previous.
        let mut pages = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = scan(prefix, after.clone(), 3).await;
            assert!(page.len() <= 3, "{}", b.name);
            after = page.last().cloned();
            let last = page.len() < 3;
            pages.extend(page);
            if last {
                break;
            }
        }
        assert_eq!(pages, expected, "{}: every key of the prefix once, in byte order", b.name);
        assert_eq!(scan(prefix, None, 100).await, expected, "{}", b.name);
        assert_eq!(s.state_list("p", prefix, 100).await.unwrap().len(), expected.len(), "{}", b.name);
        // `after` below the prefix is the start of the prefix; past its end, nothing.
        assert_eq!(scan(prefix, Some("a".into()), 100).await, expected, "{}", b.name);
        assert_eq!(scan(prefix, Some("a%/z".into()), 100).await, expected[6..], "{}", b.name);
        assert!(scan(prefix, Some("a%0".into()), 100).await.is_empty(), "{}", b.name);
        assert!(scan(prefix, None, 0).await.is_empty(), "{}: limit 0", b.name);
        // Wildcards of LIKE are literal, and a prefix ending in a multi-byte character works.
        assert_eq!(scan("a_", None, 100).await, ["a_/1"], "{}", b.name);
        assert_eq!(scan("a%/\u{10FFFF}", None, 100).await, ["a%/\u{10FFFF}", "a%/\u{10FFFF}x"], "{}", b.name);
        assert_eq!(scan("a%/日", None, 100).await, ["a%/日本"], "{}", b.name);
        // The empty prefix is the whole space of the plugin, and only of this plugin.
        let mut all: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        all.sort();
        assert_eq!(scan("", None, 100).await, all, "{}", b.name);
        assert_eq!(scan("", Some("a%/z".into()), 2).await, ["a%/é", "a%/日本"], "{}", b.name);
        let q: Vec<String> = s.state_scan("q", prefix, None, 100).await.unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(q, ["a%/0", "a%/1", "a%/zz"], "{}", b.name);
        assert!(s.state_scan("nobody", "", None, 100).await.unwrap().is_empty(), "{}", b.name);
        b.cleanup().await;
    }
}

/// A page of state ends once its values reach `STATE_PAGE_BYTES`, so that large values are
/// never read a thousand at a time; paging on from its last key reads the rest.
#[tokio::test]
async fn a_state_page_ends_at_its_byte_budget_and_paging_reads_the_rest() {
    let mib = 1 << 20;
    let per_page = super::STATE_PAGE_BYTES / mib; // values of a MiB before the cut
    for b in backends().await {
        let s = &b.store;
        let writes: Vec<StateWrite> =
            (0..per_page + 3).map(|i| (format!("big/{i:02}"), Some(vec![b'v'; mib]))).collect();
        // A commit's writes are capped by what a call may write, not here: several commits.
        for chunk in writes.chunks(2) {
            commit_state(s, "p", chunk, false).await.unwrap();
        }
        let first = s.state_scan("p", "big/", None, 1000).await.unwrap();
        assert_eq!(first.len(), per_page, "{}: the page holds {} values of a MiB", b.name, first.len());
        let rest = s.state_scan("p", "big/", Some(&first.last().unwrap().0), 1000).await.unwrap();
        let keys: Vec<String> = first.iter().chain(&rest).map(|(k, _)| k.clone()).collect();
        let expected: Vec<String> = (0..per_page + 3).map(|i| format!("big/{i:02}")).collect();
        assert_eq!(keys, expected, "{}", b.name);
        assert!(first.iter().chain(&rest).all(|(_, v)| v.len() == mib), "{}", b.name);
        // One value past the budget still comes, alone: a page is never empty before the end.
        commit_state(s, "p", &[("huge/1".into(), Some(vec![b'h'; super::STATE_PAGE_BYTES + 1]))], false).await.unwrap();
        assert_eq!(s.state_scan("p", "huge/", None, 10).await.unwrap().len(), 1, "{}", b.name);
        b.cleanup().await;
    }
}

#[test]
fn the_end_of_a_prefix_range_is_the_least_string_above_it() {
    let end = |p: &str| super::sql::prefix_end(p);
    assert_eq!(end("a%/").as_deref(), Some("a%0"));
    assert_eq!(end("ab").as_deref(), Some("ac"));
    assert_eq!(end("a\u{D7FF}").as_deref(), Some("a\u{E000}"));
    assert_eq!(end("a\u{10FFFF}\u{10FFFF}").as_deref(), Some("b"));
    assert_eq!(end("\u{10FFFF}"), None);
    assert_eq!(end(""), None);
}

fn grant_entry(target: &str, after: &Grants) -> AuditEntry {
    AuditEntry {
        actor: "admin".into(),
        action: "plugin.grants".into(),
        target: target.into(),
        before: None,
        after: Some(serde_json::json!(after)),
        note: None,
        answer: None,
    }
}

fn granting(origins: &[&str], credentials: &[(&str, &str, &str)]) -> Grants {
    Grants {
        allowed_hosts: origins.iter().map(|o| (*o).to_owned()).collect(),
        credentials: credentials
            .iter()
            .map(|(origin, header, value)| crate::grants::Credential {
                origin: (*origin).into(),
                header: (*header).into(),
                value: (*value).into(),
            })
            .collect(),
    }
}

#[tokio::test]
async fn grants_default_to_none_are_replaced_whole_and_audited_with_what_they_replaced() {
    let one = granting(
        &["http://127.0.0.1:9001", "https://payments.example.com:443"],
        &[("https://payments.example.com:443", "authorization", "Bearer ${pay-key}")],
    );
    let two = granting(&["http://[::1]:9002"], &[]);
    let none = Grants::default();
    for b in backends().await {
        let s = &b.store;
        assert_eq!(s.grants("payment").await.unwrap(), none, "{}: none by default", b.name);
        assert_eq!(s.put_grants("payment", &one, &grant_entry("payment", &one), 1).await.unwrap(), none, "{}", b.name);
        assert_eq!(s.grants("payment").await.unwrap(), one, "{}: in the order given", b.name);
        assert_eq!(s.grants("inventory").await.unwrap(), none, "{}: grants are per plugin", b.name);
        assert_eq!(s.put_grants("payment", &two, &grant_entry("payment", &two), 2).await.unwrap(), one, "{}", b.name);
        assert_eq!(s.grants("payment").await.unwrap(), two, "{}: the credentials went with the origins", b.name);
        // Empty lists revoke everything.
        assert_eq!(s.put_grants("payment", &none, &grant_entry("payment", &none), 3).await.unwrap(), two, "{}", b.name);
        assert_eq!(s.grants("payment").await.unwrap(), none, "{}", b.name);

        let log = s.audit_log(Some("payment"), None, 10).await.unwrap();
        let got: Vec<_> = log
            .iter()
            .map(|r| (r.at, r.entry.action.as_str(), r.entry.before.clone(), r.entry.after.clone()))
            .collect();
        let json = |g: &Grants| Some(serde_json::json!(g));
        assert_eq!(
            got,
            [
                (3, "plugin.grants", json(&two), json(&none)),
                (2, "plugin.grants", json(&one), json(&two)),
                (1, "plugin.grants", json(&none), json(&one)),
            ],
            "{}",
            b.name
        );
        assert_eq!(
            json(&one).unwrap()["credentials"][0],
            serde_json::json!({"origin": "https://payments.example.com:443", "header": "authorization",
                               "value": "Bearer ${pay-key}"}),
            "the audit trail holds the template, as the API shows it"
        );
        b.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_grant_changes_each_audit_the_list_they_replaced() {
    for b in backends().await {
        let s = &b.store;
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let s = Arc::clone(s);
                tokio::spawn(async move {
                    let origin = format!("http://127.0.0.1:{}", 9000 + i);
                    let granted = granting(&[&origin], &[(&origin, "x-key", "${k}")]);
                    s.put_grants("p", &granted, &grant_entry("p", &granted), i).await.unwrap()
                })
            })
            .collect();
        let mut replaced = Vec::new();
        for t in tasks {
            replaced.push(t.await.unwrap());
        }
        // In commit order (audit ids), every change replaced the one before it: no lost update.
        let mut log = s.audit_log(Some("p"), None, 100).await.unwrap();
        log.reverse();
        assert_eq!(log.len(), 8, "{}", b.name);
        assert_eq!(log[0].entry.before, Some(serde_json::json!(Grants::default())), "{}", b.name);
        for pair in log.windows(2) {
            assert_eq!(pair[1].entry.before, pair[0].entry.after, "{}: {log:#?}", b.name);
        }
        let last = log.last().unwrap().entry.after.clone().unwrap();
        assert_eq!(serde_json::json!(s.grants("p").await.unwrap()), last, "{}", b.name);
        assert_eq!(
            replaced.iter().filter(|r| **r == Grants::default()).count(),
            1,
            "{}: exactly one found none",
            b.name
        );
        b.cleanup().await;
    }
}

#[tokio::test]
async fn an_unreachable_database_or_unknown_scheme_is_a_clear_error_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let err = open(Some("postgres://postgres:secret@127.0.0.1:1/x"), dir.path())
        .await
        .err()
        .expect("port 1 refuses")
        .to_string();
    assert!(err.contains("127.0.0.1:1") && err.to_lowercase().contains("refused"), "{err}");
    assert!(!err.contains("secret"), "{err}");
    assert!(
        open(Some("postgres://postgres@127.0.0.1:1/x"), dir.path()).await.err().unwrap().is_transient(),
        "a refused connection is worth retrying"
    );
    let err = open(Some("mysql://u:secret@h/db"), dir.path()).await.err().expect("not supported").to_string();
    assert!(err.contains("'mysql:'") && !err.contains("secret"), "{err}");
}

#[tokio::test]
async fn a_commit_from_a_stale_read_is_fenced_and_leaves_nothing() {
    for b in backends().await {
        let s = &b.store;
        s.create_saga(&new_saga("s1"), None, 0).await.unwrap();
        let claimed = s.claim_due("a", 0, 60_000, 1).await.unwrap();
        assert_eq!(claimed, vec![("s1".to_owned(), 1)], "{}", b.name);
        let rec = s.saga("s1").await.unwrap().unwrap();
        let names = vec!["only".to_owned()];
        // The driver commits a transition read at seq 1 and keeps its claim.
        let e2 = event("s1", &rec.state, 1);
        assert_eq!(s.commit(&commit(&rec.state, &names, &e2, Fence::Lease(1), 1)).await.unwrap(), 2, "{}", b.name);
        // The same holder, epoch still right, commits another transition computed from the old
        // read (seq 1): fenced by seq, with its plugin writes and event discarded.
        let mut changed = rec.state.clone();
        changed.reason = Some("stale".into());
        let writes: Vec<StateWrite> = vec![("k".into(), Some(b"v".to_vec()))];
        let stale_event = event("s1", &changed, 1);
        let mut stale = commit(&changed, &names, &stale_event, Fence::Lease(1), 1);
        let plugin_writes = [("p", writes.as_slice())];
        stale.plugin_writes = &plugin_writes;
        let retry = entry("saga.retry", "s1");
        stale.audit = Some(&retry);
        let audit_before = s.audit_log(None, None, 10).await.unwrap().len();
        assert!(matches!(s.commit(&stale).await, Err(Error::Fenced)), "{}", b.name);
        assert_eq!(s.state_get("p", "k").await.unwrap(), None, "{}: no plugin state", b.name);
        let events = s.outbox_for_saga("s1").await.unwrap();
        assert_eq!(events.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2], "{}: no outbox row", b.name);
        assert!(events.iter().all(|r| r.event_id != stale_event.event_id), "{}", b.name);
        assert_eq!(s.audit_log(None, None, 10).await.unwrap().len(), audit_before, "{}: no audit row", b.name);
        let now = s.saga("s1").await.unwrap().unwrap();
        assert_eq!((now.seq, now.epoch, now.state.reason), (2, 1, None), "{}", b.name);
        // The event row holds the caller's payload exactly.
        assert_eq!(events[1].payload, e2.payload, "{}", b.name);
        b.cleanup().await;
    }
}

#[tokio::test]
async fn a_takeover_computed_before_a_driver_commit_is_fenced() {
    for b in backends().await {
        let s = &b.store;
        s.create_saga(&new_saga("s1"), None, 0).await.unwrap();
        s.claim_due("a", 0, 60_000, 1).await.unwrap();
        // A cancel reads the saga at seq 1 ...
        let read = s.saga("s1").await.unwrap().unwrap();
        let names = vec!["only".to_owned()];
        // ... the driver commits meanwhile ...
        let e2 = event("s1", &read.state, 1);
        assert_eq!(s.commit(&commit(&read.state, &names, &e2, Fence::Lease(1), 1)).await.unwrap(), 2, "{}", b.name);
        // ... so the cancel, computed from seq 1, must not overwrite the driver's transition.
        let e_cancel = event("s1", &read.state, 1);
        let takeover = commit(&read.state, &names, &e_cancel, Fence::Takeover, read.seq);
        assert!(matches!(s.commit(&takeover).await, Err(Error::Fenced)), "{}", b.name);
        // Read again, apply again: it commits, bumps the epoch and clears the lease.
        let reread = s.saga("s1").await.unwrap().unwrap();
        let e3 = event("s1", &reread.state, reread.seq);
        let takeover = commit(&reread.state, &names, &e3, Fence::Takeover, reread.seq);
        assert_eq!(s.commit(&takeover).await.unwrap(), 3, "{}", b.name);
        assert_eq!(s.saga("s1").await.unwrap().unwrap().epoch, 2, "{}", b.name);
        assert!(!s.renew_lease("s1", 1, 1000).await.unwrap(), "{}: the driver's claim is gone", b.name);
        b.cleanup().await;
    }
}

#[tokio::test]
async fn definitions_are_compare_and_set_on_their_version() {
    for b in backends().await {
        let s = &b.store;
        assert!(s.definition("order").await.unwrap().is_none(), "{}", b.name);
        // 0 means "none stored yet".
        assert_eq!(s.put_definition(&def(), DefinitionSource::Admin, Some(0), 1, None).await.unwrap(), 1, "{}", b.name);
        assert!(
            matches!(s.put_definition(&def(), DefinitionSource::Admin, Some(0), 2, None).await, Err(Error::Conflict)),
            "{}: it exists now",
            b.name
        );
        let mut changed = def();
        changed.steps[0].timeout_ms = 5;
        // Two changes based on version 1: the first wins, the second conflicts and changes nothing.
        assert_eq!(
            s.put_definition(&changed, DefinitionSource::Admin, Some(1), 3, None).await.unwrap(),
            2,
            "{}",
            b.name
        );
        let v = s.catalog_version().await.unwrap();
        let bind = entry("binding.change", "order/only");
        let lost = s.put_definition(&def(), DefinitionSource::Admin, Some(1), 4, Some(&bind)).await;
        assert!(matches!(lost, Err(Error::Conflict)), "{}", b.name);
        assert_eq!(s.catalog_version().await.unwrap(), v, "{}: a lost race bumps nothing", b.name);
        assert!(s.audit_log(None, None, 10).await.unwrap().is_empty(), "{}: and audits nothing", b.name);
        let stored = s.definition("order").await.unwrap().unwrap();
        assert_eq!((stored.version, stored.definition.steps[0].timeout_ms), (2, 5), "{}", b.name);
        assert!(
            matches!(s.put_definition(&def(), DefinitionSource::Admin, Some(7), 5, None).await, Err(Error::Conflict)),
            "{}: a version from the future",
            b.name
        );
        // No expectation: an unconditional replace, still counted.
        assert_eq!(s.put_definition(&def(), DefinitionSource::Builtin, None, 6, None).await.unwrap(), 3, "{}", b.name);
        let all = s.definitions().await.unwrap();
        assert_eq!((all.len(), all[0].version, all[0].source), (1, 3, DefinitionSource::Builtin), "{}", b.name);
        b.cleanup().await;
    }
}

#[tokio::test]
async fn catalog_changes_are_audited_in_their_own_transaction() {
    for b in backends().await {
        let s = &b.store;
        let upload = entry("plugin.upload", "sha256:p");
        assert!(s.put_plugin("sha256:p", "p", b"wasm", 1, Some(&upload)).await.unwrap(), "{}", b.name);
        // The same bytes again change nothing, so they are not audited either.
        assert!(!s.put_plugin("sha256:p", "p", b"wasm", 2, Some(&upload)).await.unwrap(), "{}", b.name);
        let define = entry("saga.define", "order");
        s.put_definition(&def(), DefinitionSource::Admin, Some(0), 3, Some(&define)).await.unwrap();
        // A change that loses its compare-and-set is not audited.
        let conflict = s.put_definition(&def(), DefinitionSource::Admin, Some(0), 4, Some(&define)).await;
        assert!(matches!(conflict, Err(Error::Conflict)), "{}", b.name);
        let log = s.audit_log(None, None, 10).await.unwrap();
        let got: Vec<(&str, i64)> = log.iter().map(|r| (r.entry.action.as_str(), r.at)).collect();
        assert_eq!(got, [("saga.define", 3), ("plugin.upload", 1)], "{}", b.name);
        b.cleanup().await;
    }
}

#[tokio::test]
async fn finished_sagas_past_retention_go_with_their_steps_and_published_events() {
    for b in backends().await {
        let s = &b.store;
        let names = vec!["only".to_owned()];
        // s1: completed long ago, events published. s2: completed long ago, one event
        // unpublished. s3: completed recently. s4: still running.
        for (id, finished_at) in [("s1", 10), ("s2", 10), ("s3", 1_000), ("s4", 0)] {
            s.create_saga(&new_saga(id), None, 0).await.unwrap();
            if id == "s4" {
                continue;
            }
            let mut done = s.saga(id).await.unwrap().unwrap().state;
            done.phase = crate::engine::Phase::Completed;
            done.status = SagaStatus::Completed;
            done.next_run_at = None;
            let e = event(id, &done, 1);
            let mut c = commit(&done, &names, &e, Fence::Takeover, 1);
            c.saga_id = id;
            c.now = finished_at;
            s.commit(&c).await.unwrap();
        }
        let ids: Vec<i64> = s
            .outbox_pending(100)
            .await
            .unwrap()
            .iter()
            .filter(|r| !(r.saga_id == "s2" && r.seq == 2))
            .map(|r| r.id)
            .collect();
        s.outbox_mark_published(&ids, 20).await.unwrap();
        assert_eq!(s.purge_finished_sagas(500, 100, 1000).await.unwrap().sagas, 1, "{}", b.name);
        assert!(s.saga("s1").await.unwrap().is_none(), "{}", b.name);
        assert!(s.outbox_for_saga("s1").await.unwrap().is_empty(), "{}: its events went too", b.name);
        for kept in ["s2", "s3", "s4"] {
            assert!(s.saga(kept).await.unwrap().is_some(), "{}: {kept} is kept", b.name);
        }
        // Batches: at most `limit` per call.
        s.outbox_mark_published(&s.outbox_pending(100).await.unwrap().iter().map(|r| r.id).collect::<Vec<_>>(), 30)
            .await
            .unwrap();
        assert_eq!(s.purge_finished_sagas(5_000, 1, 1000).await.unwrap().sagas, 1, "{}", b.name);
        assert_eq!(s.purge_finished_sagas(5_000, 1, 1000).await.unwrap().sagas, 1, "{}", b.name);
        assert_eq!(s.purge_finished_sagas(5_000, 1, 1000).await.unwrap().sagas, 0, "{}: running sagas stay", b.name);
        assert!(s.saga("s4").await.unwrap().is_some(), "{}", b.name);

        // s5, finished long ago, created by a request whose host died before it answered: its
        // key still waits for the retry, which answers from the saga. Kept until answered.
        s.create_saga(&new_saga("s5"), Some(&waiting_claim()), 0).await.unwrap();
        let mut done = s.saga("s5").await.unwrap().unwrap().state;
        done.phase = crate::engine::Phase::Completed;
        done.status = SagaStatus::Completed;
        done.next_run_at = None;
        let e = event("s5", &done, 1);
        let c = Commit { saga_id: "s5", now: 10, ..commit(&done, &names, &e, Fence::Takeover, 1) };
        s.commit(&c).await.unwrap();
        s.outbox_mark_published(&s.outbox_pending(100).await.unwrap().iter().map(|r| r.id).collect::<Vec<_>>(), 30)
            .await
            .unwrap();
        assert_eq!(s.purge_finished_sagas(5_000, 10, 1000).await.unwrap().sagas, 0, "{}: its key waits for it", b.name);
        s.complete_idempotency("c", "POST /orders", "k", 200, b"done").await.unwrap();
        assert_eq!(s.purge_finished_sagas(5_000, 10, 1000).await.unwrap().sagas, 1, "{}: answered, it goes", b.name);

        // s6's events exceed a call's budget of rows: they go over several calls (each says
        // more is due), the saga row with the last of them.
        s.create_saga(&new_saga("s6"), None, 0).await.unwrap();
        let mut done = s.saga("s6").await.unwrap().unwrap().state;
        done.phase = crate::engine::Phase::Completed;
        done.status = SagaStatus::Completed;
        done.next_run_at = None;
        let e = event("s6", &done, 1);
        s.commit(&Commit { saga_id: "s6", now: 10, ..commit(&done, &names, &e, Fence::Takeover, 1) }).await.unwrap();
        s.outbox_mark_published(&s.outbox_pending(100).await.unwrap().iter().map(|r| r.id).collect::<Vec<_>>(), 30)
            .await
            .unwrap();
        assert_eq!(s.outbox_for_saga("s6").await.unwrap().len(), 2, "{}", b.name);
        let partial = Purged { sagas: 0, more: true };
        assert_eq!(s.purge_finished_sagas(5_000, 10, 1).await.unwrap(), partial, "{}", b.name);
        assert_eq!(s.outbox_for_saga("s6").await.unwrap().len(), 1, "{}: one row per call", b.name);
        assert_eq!(s.purge_finished_sagas(5_000, 10, 1).await.unwrap(), partial, "{}", b.name);
        assert!(s.saga("s6").await.unwrap().is_some(), "{}: the saga row goes last", b.name);
        assert_eq!(s.purge_finished_sagas(5_000, 10, 1).await.unwrap(), Purged { sagas: 1, more: false }, "{}", b.name);
        assert!(s.saga("s6").await.unwrap().is_none(), "{}", b.name);
        b.cleanup().await;
    }
}

/// The relay's read stops at its row limit, and at the row whose payload brings the batch to
/// its byte budget: a row goes in while the rows before it are under the budget, so the first
/// one always does, however large. (Events carry step outputs of up to the plugin output limit:
/// a count alone let a batch hold hundreds of MiB.)
#[tokio::test]
async fn the_relays_batch_is_bounded_by_rows_and_by_bytes() {
    for b in backends().await {
        let s = &b.store;
        for id in ["b1", "b2", "b3"] {
            let mut saga = new_saga(id);
            // Payloads of different sizes: the cut must follow their sum, not their count.
            if id == "b2" {
                saga.event.payload = format!("{{\"pad\": \"{}\"}}", "x".repeat(500));
            }
            s.create_saga(&saga, None, 0).await.unwrap();
        }
        let all = s.outbox_pending(100).await.unwrap();
        assert_eq!(all.len(), 3, "{}", b.name);
        let len: Vec<usize> = all.iter().map(|r| r.payload.len()).collect();
        let ids = |rows: Vec<OutboxRow>| rows.iter().map(|r| r.id).collect::<Vec<_>>();
        let batch = |limit, bytes| s.outbox_batch(limit, bytes);
        let first_two = vec![all[0].id, all[1].id];
        assert_eq!(ids(batch(100, usize::MAX).await.unwrap()), ids(all.clone()), "{}", b.name);
        assert_eq!(ids(batch(2, usize::MAX).await.unwrap()), first_two, "{}: the row limit", b.name);
        assert_eq!(ids(batch(100, 1).await.unwrap()), [all[0].id], "{}: the first row however large", b.name);
        assert_eq!(ids(batch(100, len[0]).await.unwrap()), [all[0].id], "{}: full at the first", b.name);
        assert_eq!(ids(batch(100, len[0] + 1).await.unwrap()), first_two, "{}: the large second row goes in", b.name);
        assert_eq!(ids(batch(100, len[0] + len[1]).await.unwrap()), first_two, "{}", b.name);
        assert_eq!(ids(batch(100, len[0] + len[1] + 1).await.unwrap()), ids(all.clone()), "{}", b.name);
        // Published rows are not read again.
        s.outbox_mark_published(&[all[0].id], 1).await.unwrap();
        assert_eq!(ids(batch(100, 1).await.unwrap()), [all[1].id], "{}", b.name);
        b.cleanup().await;
    }
}

/// The relay's reads keep a connection from one batch to the next; a read dropped at any point
/// (the relay stopped halfway) leaves no half-read connection behind for the next one.
#[tokio::test]
async fn relay_reads_dropped_halfway_leave_the_next_read_whole() {
    for b in backends().await {
        let s = &b.store;
        for i in 0..20 {
            s.create_saga(&new_saga(&format!("r{i:02}")), None, 0).await.unwrap();
        }
        let ids = |rows: Vec<OutboxRow>| rows.iter().map(|r| r.id).collect::<Vec<_>>();
        let all = ids(s.outbox_pending(100).await.unwrap());
        assert_eq!(all.len(), 20, "{}", b.name);
        let mut dropped = 0;
        for polls in 1..=12 {
            // Polled `polls` times, yielding in between (the query is on its way meanwhile),
            // then dropped unless it finished.
            let mut read = s.outbox_batch(100, usize::MAX);
            let mut finished = None;
            for _ in 0..polls {
                let poll =
                    std::future::poll_fn(|cx| std::task::Poll::Ready(std::future::Future::poll(read.as_mut(), cx)))
                        .await;
                if let std::task::Poll::Ready(rows) = poll {
                    finished = Some(rows);
                    break;
                }
                tokio::task::yield_now().await;
            }
            match finished {
                Some(rows) => assert_eq!(ids(rows.unwrap()), all, "{}: a whole read", b.name),
                None => dropped += 1,
            }
            drop(read);
            assert_eq!(ids(s.outbox_batch(100, usize::MAX).await.unwrap()), all, "{}: after {polls} polls", b.name);
        }
        assert!(dropped > 0, "{}: no read was dropped halfway", b.name);
        b.cleanup().await;
    }
}

/// A mark is one statement whatever its size (its ids travel as one value): it publishes
/// exactly the rows it lists, however many, and nothing else; ids listed twice, or of rows
/// already published, change nothing more.
#[tokio::test]
async fn a_mark_publishes_exactly_the_rows_it_lists() {
    for b in backends().await {
        let s = &b.store;
        for i in 0..150 {
            s.create_saga(&new_saga(&format!("m{i}")), None, 0).await.unwrap();
        }
        let all: Vec<i64> = s.outbox_pending(1_000).await.unwrap().iter().map(|r| r.id).collect();
        assert_eq!(all.len(), 150, "{}", b.name);
        s.outbox_mark_published(&[], 1).await.unwrap();
        assert_eq!(s.outbox_pending(1_000).await.unwrap().len(), 150, "{}: an empty mark", b.name);
        // Every row but each seventh, the first one listed twice.
        let (kept, marked): (Vec<i64>, Vec<i64>) = all.iter().partition(|&&id| id % 7 == 3);
        assert!(!kept.is_empty() && !marked.is_empty(), "{}", b.name);
        let mut listed = marked.clone();
        listed.push(marked[0]);
        s.outbox_mark_published(&listed, 2).await.unwrap();
        let pending: Vec<i64> = s.outbox_pending(1_000).await.unwrap().iter().map(|r| r.id).collect();
        assert_eq!(pending, kept, "{}", b.name);
        // The rest, with some published ones again.
        let mut rest = kept.clone();
        rest.extend(&marked[..10]);
        s.outbox_mark_published(&rest, 3).await.unwrap();
        assert!(s.outbox_pending(1_000).await.unwrap().is_empty(), "{}", b.name);
        b.cleanup().await;
    }
}

#[tokio::test]
async fn housekeeping_deletes_in_batches_of_at_most_the_limit() {
    for b in backends().await {
        let s = &b.store;
        for i in 0..5 {
            let c = IdempotencyClaim {
                caller: "c".into(),
                route: "POST /x".into(),
                key: format!("k{i}"),
                fingerprint: "f".into(),
                lock_ms: 0,
                ttl_ms: 10,
                response: Some((200, vec![])),
            };
            s.claim_key(&c, 0).await.unwrap();
        }
        assert_eq!(s.expire_idempotency(100, 2).await.unwrap(), 2, "{}", b.name);
        assert_eq!(s.expire_idempotency(100, 2).await.unwrap(), 2, "{}", b.name);
        assert_eq!(s.expire_idempotency(100, 2).await.unwrap(), 1, "{}", b.name);
        assert_eq!(s.expire_idempotency(100, 2).await.unwrap(), 0, "{}", b.name);
        b.cleanup().await;
    }
}

#[tokio::test]
async fn expiring_keys_spares_a_key_claimed_again_while_the_delete_waited_for_it() {
    use sqlx::{Connection as _, Executor as _};
    for b in backends().await {
        let Some((_, url)) = &b.pg else {
            // SQLite: one writer, so the delete's read and its write are one step.
            b.cleanup().await;
            continue;
        };
        let c = IdempotencyClaim {
            caller: "c".into(),
            route: "POST /x".into(),
            key: "k".into(),
            fingerprint: "f".into(),
            lock_ms: 0,
            ttl_ms: 10,
            response: Some((200, vec![])),
        };
        b.store.claim_key(&c, 0).await.unwrap();
        // A request claims the expired key again (the claim replaces the row in place) and
        // has not committed yet when the janitor's delete, which picked the key as expired,
        // reaches the row.
        let mut claimer = sqlx::PgConnection::connect(url).await.unwrap();
        claimer.execute("BEGIN").await.unwrap();
        claimer.execute("UPDATE idempotency_keys SET expires_at = 1000000 WHERE key = 'k'").await.unwrap();
        let store = Arc::clone(&b.store);
        let janitor = tokio::spawn(async move { store.expire_idempotency(100, 10).await.unwrap() });
        let mut watcher = sqlx::PgConnection::connect(url).await.unwrap();
        let started = std::time::Instant::now();
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND query LIKE 'DELETE FROM idempotency_keys%'",
            )
            .fetch_one(&mut watcher)
            .await
            .unwrap();
            if waiting > 0 {
                break;
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(10), "the delete never waited for the row");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        claimer.execute("COMMIT").await.unwrap();
        assert_eq!(janitor.await.unwrap(), 0, "the key claimed again was deleted");
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys WHERE key = 'k'")
            .fetch_one(&mut watcher)
            .await
            .unwrap();
        assert_eq!(left, 1);
        drop((claimer, watcher));
        b.cleanup().await;
    }
}

/// The janitor's outbox purge reads only the rows it deletes: by an index, never the whole
/// outbox (its last batch of a pass otherwise read every row kept for the retention, on SQLite
/// holding the one writer meanwhile). Checked on the query plan, with sequential scans priced
/// out on PostgreSQL so that only a missing index can make one.
#[tokio::test]
async fn the_outbox_purge_finds_its_rows_by_an_index_not_a_scan() {
    use sqlx::{Connection as _, Executor as _, Row as _};
    for b in backends().await {
        let plan: Vec<String> = if let Some(file) = &b.file {
            let mut conn = sqlx::SqliteConnection::connect(&sqlite::file_url(file)).await.unwrap();
            let rows = sqlx::query(&format!("EXPLAIN QUERY PLAN {}", sql::OUTBOX_PURGE))
                .bind(0_i64)
                .bind(1000_i64)
                .fetch_all(&mut conn)
                .await
                .unwrap();
            rows.iter().map(|r| r.get::<String, _>("detail")).collect()
        } else {
            let (_, url) = b.pg.as_ref().unwrap();
            let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
            conn.execute("SET enable_seqscan = off").await.unwrap();
            let rows = sqlx::query(&format!("EXPLAIN {}", sql::OUTBOX_PURGE))
                .bind(0_i64)
                .bind(1000_i64)
                .fetch_all(&mut conn)
                .await
                .unwrap();
            rows.iter().map(|r| r.get::<String, _>(0)).collect()
        };
        let text = plan.join("\n");
        assert!(text.contains("outbox_published"), "{}: the purge does not use the index:\n{text}", b.name);
        assert!(
            !plan
                .iter()
                .any(|line| line.trim_start().starts_with("SCAN outbox") || line.contains("Seq Scan on outbox")),
            "{}: the purge scans the outbox:\n{text}",
            b.name
        );
        b.cleanup().await;
    }
}

/// A process giving back its claims (at every start and stop) finds them by an index, not by
/// reading every saga kept (seconds at millions, delaying a start or outlasting a stop's grace).
#[tokio::test]
async fn claims_are_given_back_by_an_index_not_a_scan() {
    use sqlx::{Connection as _, Executor as _, Row as _};
    for b in backends().await {
        let plan: Vec<String> = if let Some(file) = &b.file {
            let mut conn = sqlx::SqliteConnection::connect(&sqlite::file_url(file)).await.unwrap();
            let rows = sqlx::query(&format!("EXPLAIN QUERY PLAN {}", sql::RELEASE_OWNER))
                .bind("me")
                .fetch_all(&mut conn)
                .await
                .unwrap();
            rows.iter().map(|r| r.get::<String, _>("detail")).collect()
        } else {
            let (_, url) = b.pg.as_ref().unwrap();
            let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
            conn.execute("SET enable_seqscan = off").await.unwrap();
            let rows =
                sqlx::query(&format!("EXPLAIN {}", sql::RELEASE_OWNER)).bind("me").fetch_all(&mut conn).await.unwrap();
            rows.iter().map(|r| r.get::<String, _>(0)).collect()
        };
        let text = plan.join("\n");
        assert!(text.contains("sagas_leased"), "{}: giving back claims does not use the index:\n{text}", b.name);
        assert!(
            !plan.iter().any(|line| line.trim_start().starts_with("SCAN sagas") || line.contains("Seq Scan on sagas")),
            "{}: giving back claims scans the sagas:\n{text}",
            b.name
        );
        b.cleanup().await;
    }
}

/// A page of one status, or the page after a cursor, is read by an index bound, on SQLite too
/// (a statement with `($2 IS NULL OR status = $2)` walked every saga of the type).
#[tokio::test]
async fn saga_list_pages_are_index_bounds_on_sqlite() {
    use sqlx::Connection as _;
    for b in backends().await {
        if let Some(file) = &b.file {
            let mut conn = sqlx::SqliteConnection::connect(&sqlite::file_url(file)).await.unwrap();
            for (status, before, index) in
                [(true, false, "sagas_by_status"), (true, true, "sagas_by_status"), (false, true, "sagas_by_type")]
            {
                let explain = format!("EXPLAIN QUERY PLAN {}", sql::list_sagas_sql(status, before));
                let mut query = sqlx::query_as::<_, (i64, i64, i64, String)>(&explain).bind("order");
                if status {
                    query = query.bind("COMPENSATION_FAILED");
                }
                if before {
                    query = query.bind("01900000-0000-7000-8000-000000000000");
                }
                let plan: Vec<String> =
                    query.bind(100_i64).fetch_all(&mut conn).await.unwrap().into_iter().map(|r| r.3).collect();
                let text = plan.join("\n");
                let bound = if status { "status=?" } else { "id<?" };
                assert!(
                    text.contains(index) && text.contains(bound),
                    "status {status}, cursor {before}: not a bound on {index}:\n{text}"
                );
            }
        }
        b.cleanup().await;
    }
}

/// A `BEGIN` whose caller gave up while it was on the wire (a request whose client hung up, a
/// timeout) leaves no transaction open on the pooled connection: a single statement run on it
/// afterwards is committed, visible to others. (sqlx forgot such a `BEGIN`: the statements
/// after it ran in a transaction nobody committed.)
#[tokio::test]
async fn a_begin_given_up_half_way_leaves_no_transaction_open_on_its_connection() {
    use sqlx::Connection as _;
    for b in backends().await {
        if let Some((_, url)) = &b.pg {
            sqlx::any::install_default_drivers();
            let pool = sqlx::any::AnyPoolOptions::new().max_connections(1).connect(url).await.unwrap();
            sqlx::query("CREATE TABLE given_up (n INT)").execute(&pool).await.unwrap();
            let mut watcher = sqlx::PgConnection::connect(url).await.unwrap();
            for n in 0..40_i32 {
                // Given up at once or after a few tens of microseconds: some while `BEGIN` is on
                // the wire.
                let after = std::time::Duration::from_micros(u64::try_from(n % 8).unwrap() * 25);
                let _ = tokio::time::timeout(after, dialect::begin(&pool, None)).await;
                sqlx::query("INSERT INTO given_up (n) VALUES ($1)").bind(n).execute(&pool).await.unwrap();
                let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM given_up WHERE n = $1")
                    .bind(n)
                    .fetch_one(&mut watcher)
                    .await
                    .unwrap();
                assert_eq!(seen, 1, "insert {n} ran in a transaction a given-up BEGIN left open");
            }
            pool.close().await;
        }
        b.cleanup().await;
    }
}

/// The audit trail pages newest first by id, with and without a target: following the
/// cursor reads every entry once.
#[tokio::test]
async fn the_audit_trail_pages_by_cursor() {
    for b in backends().await {
        let s = &b.store;
        for i in 0..5 {
            s.audit(&entry("saga.retry", if i % 2 == 0 { "even" } else { "odd" }), i).await.unwrap();
        }
        for target in [None, Some("even")] {
            let all: Vec<i64> = s.audit_log(target, None, 100).await.unwrap().iter().map(|r| r.id).collect();
            assert_eq!(all.len(), if target.is_some() { 3 } else { 5 }, "{}", b.name);
            let (mut paged, mut cursor) = (Vec::new(), None);
            loop {
                let page = s.audit_log(target, cursor, 2).await.unwrap();
                paged.extend(page.iter().map(|r| r.id));
                match page.last() {
                    Some(last) if page.len() == 2 => cursor = Some(last.id),
                    _ => break,
                }
            }
            assert_eq!(paged, all, "{}: {target:?}", b.name);
        }
        b.cleanup().await;
    }
}

#[tokio::test]
async fn busy_locked_and_lock_timeouts_are_transient_other_errors_are_not() {
    use sqlx::{Connection as _, Executor as _};
    assert!(Error::from(sqlx::Error::PoolTimedOut).is_transient());
    assert!(!Error::from(sqlx::Error::RowNotFound).is_transient());
    assert!(!Error::Fenced.is_transient() && !Error::Conflict.is_transient());
    for b in backends().await {
        if let Some(file) = &b.file {
            // Another connection holds the write lock; ours does not wait for it.
            let url = sqlite::file_url(file);
            let mut holder = sqlx::SqliteConnection::connect(&url).await.unwrap();
            holder.execute("BEGIN IMMEDIATE").await.unwrap();
            let mut other = sqlx::SqliteConnection::connect(&url).await.unwrap();
            other.execute("PRAGMA busy_timeout = 0").await.unwrap();
            let busy = Error::from(other.execute("BEGIN IMMEDIATE").await.unwrap_err());
            assert!(busy.is_transient(), "sqlite: {busy}");
            holder.execute("ROLLBACK").await.unwrap();
        }
        if let Some((_, url)) = &b.pg {
            let mut holder = sqlx::PgConnection::connect(url).await.unwrap();
            holder.execute("BEGIN; LOCK TABLE catalog_version").await.unwrap();
            let mut other = sqlx::PgConnection::connect(url).await.unwrap();
            other.execute("SET lock_timeout = '10ms'").await.unwrap();
            let timeout = Error::from(other.execute("SELECT version FROM catalog_version").await.unwrap_err());
            assert!(timeout.is_transient(), "postgres: {timeout}");
            holder.execute("ROLLBACK").await.unwrap();
            let unique = other.execute("INSERT INTO catalog_version (id, version) VALUES (1, 0)").await.unwrap_err();
            let unique = Error::from(unique);
            assert!(!unique.is_transient(), "postgres: a unique violation is permanent");
            assert!(!unique.is_refused_data(), "postgres: a unique violation is not about the data's form");
            // Data no retry can store: a NUL in text, an index row too large.
            let nul = other.execute("SELECT convert_from('\\x00'::bytea, 'UTF8')").await.unwrap_err();
            let nul = Error::from(nul);
            assert!(nul.is_refused_data(), "postgres: a NUL is refused data");
            // A request whose data the database refuses is the client's to change: 422, not a
            // 500 that invites the same retry.
            let answer = crate::http::error::ApiError::from(nul);
            assert_eq!((answer.status.as_u16(), answer.code), (422, "refused_data"), "postgres");
            let unique = Error::from(
                other.execute("INSERT INTO catalog_version (id, version) VALUES (1, 0)").await.unwrap_err(),
            );
            assert_eq!(
                crate::http::error::ApiError::from(unique).status.as_u16(),
                500,
                "postgres: other errors stay 500"
            );
            // A statement on a connection left in a failed transaction block is transient, and
            // arms the pool's check of its connections before their next use.
            let mut stuck = sqlx::PgConnection::connect(url).await.unwrap();
            stuck.execute("BEGIN").await.unwrap();
            stuck.execute("SELECT 1 / 0").await.unwrap_err();
            let aborted = Error::from(stuck.execute("SELECT 1").await.unwrap_err());
            assert!(aborted.is_transient(), "postgres: {aborted}");
            assert!(postgres::stray_checks_armed(), "postgres: a stuck transaction block did not arm the checks");
            // A session ended for idling in a transaction (a frozen process) is transient.
            other.execute("SET idle_in_transaction_session_timeout = '50ms'").await.unwrap();
            other.execute("BEGIN").await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let ended = Error::from(other.execute("SELECT 1").await.unwrap_err());
            assert!(ended.is_transient() && !ended.is_refused_data(), "postgres: {ended}");
        }
        b.cleanup().await;
    }
}

/// The PostgreSQL pool pings only connections idle for half a second, so right after the
/// server ended every session each pooled connection is dead without the pool knowing: a
/// read that draws one runs again on another (each dead one fails at once) and succeeds.
#[tokio::test]
async fn reads_right_after_the_server_ended_every_session_succeed() {
    use sqlx::Connection as _;
    for b in backends().await {
        if let Some((admin, url)) = &b.pg {
            let s = &b.store;
            s.create_saga(&new_saga("s1"), None, 0).await.unwrap();
            // Several connections in the pool, all used a moment ago.
            let (a, c, d, e) =
                tokio::join!(s.state_get("p", "k"), s.state_get("p", "k"), s.saga("s1"), s.state_get("p", "k"));
            assert!(a.is_ok() && c.is_ok() && d.unwrap().is_some() && e.is_ok());
            let db = url.rsplit('/').next().unwrap();
            let mut conn = sqlx::PgConnection::connect(admin).await.unwrap();
            let ended: Vec<bool> = sqlx::query_scalar(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND application_name = 'sagahost'",
            )
            .bind(db)
            .fetch_all(&mut conn)
            .await
            .unwrap();
            assert!(ended.len() >= 2, "the pool held {} connections", ended.len());
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            s.ping().await.expect("ping after the sessions ended");
            assert!(s.saga("s1").await.expect("a saga read after the sessions ended").is_some());
            assert_eq!(s.state_get("p", "k").await.expect("a state read after the sessions ended"), None);
            s.state_list("p", "", 10).await.expect("a state scan after the sessions ended");
        }
        b.cleanup().await;
    }
}

/// The relay's reads keep their connection, out of the pool's sight: one the server ended
/// while it was kept (a restart, a failover) fails its read, which runs again on another.
#[tokio::test]
async fn a_relay_read_whose_kept_connection_the_server_ended_is_read_again() {
    use sqlx::Connection as _;
    for b in backends().await {
        if let Some((admin, url)) = &b.pg {
            let s = &b.store;
            s.create_saga(&new_saga("s1"), None, 0).await.unwrap();
            let before = s.outbox_batch(100, usize::MAX).await.unwrap();
            assert_eq!(before.len(), 1);
            let db = url.rsplit('/').next().unwrap();
            let mut conn = sqlx::PgConnection::connect(admin).await.unwrap();
            let ended: Vec<bool> = sqlx::query_scalar(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND application_name = 'sagahost'",
            )
            .bind(db)
            .fetch_all(&mut conn)
            .await
            .unwrap();
            assert!(!ended.is_empty());
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let after = s.outbox_batch(100, usize::MAX).await.expect("a relay read after the sessions ended");
            assert_eq!(after.iter().map(|r| r.id).collect::<Vec<_>>(), before.iter().map(|r| r.id).collect::<Vec<_>>());
        }
        b.cleanup().await;
    }
}

/// Architecture invariant: only `store/` speaks to the database. Checked in code, so that a
/// `sqlx::` path outside it (a leaked error type, a stray query) fails the build's tests.
#[test]
fn no_module_outside_the_store_names_sqlx() {
    fn visit(dir: &std::path::Path, found: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if !path.ends_with("store") {
                    visit(&path, found);
                }
            } else if path.extension().is_some_and(|e| e == "rs")
                && std::fs::read_to_string(&path).unwrap().contains("sqlx::")
            {
                found.push(path.display().to_string());
            }
        }
    }
    let mut found = vec![];
    visit(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut found);
    assert!(found.is_empty(), "sqlx outside host/src/store/: {found:?}; go through a store trait");
}

/// Commits from many tasks at once: each applies exactly as if alone (seq 2 and one outbox row
/// for each fresh one), the stale ones are fenced without disturbing the others, and on SQLite
/// they shared transactions (group commit).
#[tokio::test]
async fn concurrent_commits_apply_each_alone_and_a_fenced_one_does_not_disturb_the_rest() {
    for b in backends().await {
        const N: usize = 40;
        for i in 0..N {
            b.store.create_saga(&new_saga(&format!("g{i:02}")), None, 0).await.unwrap();
        }
        let before = b.store.write_stats();
        let tasks: Vec<_> = (0..N + 10)
            .map(|i| {
                let store = Arc::clone(&b.store);
                tokio::spawn(async move {
                    // The last ten present a seq that was never read: fenced.
                    let (id, read_seq) = if i < N { (format!("g{i:02}"), 1) } else { (format!("g{:02}", i - N), 7) };
                    let state = SagaState::new(&def(), 0);
                    let names = vec!["only".to_owned()];
                    let e = event(&id, &state, read_seq);
                    let c = Commit { saga_id: &id, ..commit(&state, &names, &e, Fence::Takeover, read_seq) };
                    store.commit(&c).await
                })
            })
            .collect();
        let mut fenced = 0;
        for (i, t) in tasks.into_iter().enumerate() {
            match t.await.unwrap() {
                Ok(seq) => assert!(i < N && seq == 2, "{}: commit {i} gave seq {seq}", b.name),
                Err(Error::Fenced) => {
                    assert!(i >= N, "{}: fresh commit {i} was fenced", b.name);
                    fenced += 1;
                }
                Err(e) => panic!("{}: commit {i}: {e}", b.name),
            }
        }
        assert_eq!(fenced, 10, "{}", b.name);
        for i in 0..N {
            let seqs: Vec<i64> =
                b.store.outbox_for_saga(&format!("g{i:02}")).await.unwrap().iter().map(|r| r.seq).collect();
            assert_eq!(seqs, [1, 2], "{}: saga g{i:02}", b.name);
        }
        let after = b.store.write_stats();
        assert_eq!(after.jobs - before.jobs, (N + 10) as u64, "{}", b.name);
        if b.name == "sqlite" {
            assert!(
                after.transactions - before.transactions < after.jobs - before.jobs,
                "{}: {N} concurrent commits never shared a transaction ({before:?} -> {after:?})",
                b.name
            );
        }
        b.cleanup().await;
    }
}

/// A write that fails halfway (a saga id that exists, after its idempotency claim was
/// inserted) fails alone: its claim is not left behind, and the writes that shared its
/// transaction are committed all the same.
#[tokio::test]
async fn a_write_failing_halfway_fails_alone_and_leaves_nothing() {
    for b in backends().await {
        b.store.create_saga(&new_saga("taken"), None, 0).await.unwrap();
        let claim = |key: String| IdempotencyClaim {
            caller: "c".into(),
            route: "POST /orders".into(),
            key,
            fingerprint: "f".into(),
            lock_ms: 60_000,
            ttl_ms: 60_000,
            response: None,
        };
        let tasks: Vec<_> = (0..21)
            .map(|i| {
                let store = Arc::clone(&b.store);
                let c = claim(format!("k{i}"));
                tokio::spawn(async move {
                    // Number 10 reuses an existing saga id: its insert fails after its claim.
                    let id = if i == 10 { "taken".to_owned() } else { format!("n{i:02}") };
                    store.create_saga(&new_saga(&id), Some(&c), 0).await
                })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            let out = t.await.unwrap();
            if i == 10 {
                let e = out.expect_err("a duplicate saga id is refused");
                assert!(matches!(e, Error::Database(_)), "{}: {e:?}", b.name);
            } else {
                assert_eq!(out.unwrap(), CreateOutcome::Created, "{}: create {i}", b.name);
            }
        }
        // The failed write's claim was rolled back with it: the key is free.
        assert_eq!(b.store.claim_key(&claim("k10".into()), 1).await.unwrap(), CreateOutcome::Created, "{}", b.name);
        assert_eq!(b.store.list_sagas("order", None, None, 100).await.unwrap().len(), 21, "{}", b.name);
        b.cleanup().await;
    }
}

/// Between batches the SQLite writer sits in the transaction its last commit began for the
/// next batch (`COMMIT; BEGIN`): deferred, it must hold back nothing. Another connection takes
/// the write lock at once and a checkpoint copies and truncates the whole WAL (neither could
/// if that transaction held a lock or a snapshot), and the next write commits as ever.
#[tokio::test]
async fn the_sqlite_writers_idle_transaction_holds_no_lock_and_no_snapshot() {
    use sqlx::{Connection as _, Executor as _, Row as _};
    for b in backends().await {
        let Some(file) = &b.file else {
            b.cleanup().await;
            continue;
        };
        for i in 0..3 {
            b.store.create_saga(&new_saga(&format!("idle{i}")), None, 0).await.unwrap();
        }
        let mut other = sqlx::SqliteConnection::connect(&sqlite::file_url(file)).await.unwrap();
        other.execute("PRAGMA busy_timeout = 0").await.unwrap();
        other.execute("BEGIN IMMEDIATE").await.expect("the idle writer holds no lock");
        other.execute("ROLLBACK").await.unwrap();
        // The store's own checkpointer may be copying right now: wait for it, not for ever.
        other.execute("PRAGMA busy_timeout = 2000").await.unwrap();
        let row = other.fetch_one("PRAGMA wal_checkpoint(TRUNCATE)").await.unwrap();
        let (busy, log, copied): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!((busy, log, copied), (0, 0, 0), "sqlite: the WAL was not truncated: a snapshot held it back");
        other.close().await.unwrap();
        b.store.create_saga(&new_saga("idle3"), None, 0).await.unwrap();
        assert_eq!(b.store.list_sagas("order", None, None, 100).await.unwrap().len(), 4, "sqlite");
        b.cleanup().await;
    }
}

/// A saga created with a lease is born claimed (epoch 1, owned), so no other claimer takes
/// it while the lease runs; without one it is free for the first claim.
#[tokio::test]
async fn a_saga_created_with_a_lease_is_born_claimed() {
    for b in backends().await {
        let owned = NewSaga { lease: Some(("me".into(), 60_000)), ..new_saga("owned") };
        b.store.create_saga(&owned, None, 0).await.unwrap();
        b.store.create_saga(&new_saga("free"), None, 0).await.unwrap();
        let rec = b.store.saga("owned").await.unwrap().unwrap();
        assert_eq!((rec.seq, rec.epoch), (1, 1), "{}", b.name);
        assert_eq!(b.store.claim_due("other", 0, 60_000, 10).await.unwrap(), [("free".to_owned(), 1)], "{}", b.name);
        // The owner commits at epoch 1 like after a claim, and a restart under its identity
        // releases the claim.
        let names = vec!["only".to_owned()];
        let e = event("owned", &rec.state, 1);
        let c = Commit { saga_id: "owned", ..commit(&rec.state, &names, &e, Fence::Lease(1), 1) };
        assert_eq!(b.store.commit(&c).await.unwrap(), 2, "{}", b.name);
        assert_eq!(b.store.release_owner("me").await.unwrap(), 1, "{}", b.name);
        assert_eq!(b.store.claim_due("other", 0, 60_000, 10).await.unwrap(), [("owned".to_owned(), 2)], "{}", b.name);
        b.cleanup().await;
    }
}

/// During a rolling upgrade a replica of the previous release that restarts finds migrations
/// it does not know applied (a later release's): it starts all the same (sqlx refused with
/// `VersionMissing`, and the replica crash-looped until upgraded). A migration it knows that
/// was changed would still be refused (checked as before).
#[tokio::test]
async fn a_database_a_later_release_migrated_further_still_opens() {
    use sqlx::{Connection as _, Executor as _};
    let later = "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
                 VALUES (99999, 'a later release', TRUE, X'00', 0)";
    let dir = tempfile::tempdir().unwrap();
    drop(open(None, dir.path()).await.unwrap());
    let mut conn = sqlx::SqliteConnection::connect(&sqlite::file_url(&dir.path().join("sagahost.db"))).await.unwrap();
    conn.execute(later).await.unwrap();
    drop(conn);
    let store = open_exclusive(None, dir.path(), 1).await.expect("SQLite: the previous release starts");
    assert!(store.saga("none").await.unwrap().is_none());
    let admin = std::env::var("SAGAHOST_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned());
    if admin != "off" {
        let url = postgres::scratch_database(&admin, "sagahost_test").await.unwrap();
        drop(open(Some(&url), dir.path()).await.unwrap());
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        conn.execute(later.replace("X'00'", "'\\x00'::bytea").as_str()).await.unwrap();
        drop(conn);
        let store = open(Some(&url), dir.path()).await.expect("PostgreSQL: the previous release starts");
        assert!(store.saga("none").await.unwrap().is_none());
        drop(store);
        postgres::drop_database(&admin, &url).await.unwrap();
    }
}

/// A serving host owns its SQLite file: a second host on it is refused with a clear error (a
/// plain open, to read it, is not), and the lock goes with the store.
#[tokio::test]
async fn a_sqlite_file_serves_one_host_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let first = open_exclusive(None, dir.path(), 1).await.unwrap();
    let e = open_exclusive(None, dir.path(), 1).await.err().expect("a second host on the file is refused");
    assert!(matches!(e, Error::InUse(_)), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("sagahost.db") && text.contains("another sagahost process"), "{text}");
    let reader = open(None, dir.path()).await.unwrap();
    assert!(reader.saga("none").await.unwrap().is_none());
    drop(first);
    open_exclusive(None, dir.path(), 1).await.expect("the lock went with the store");
}

/// A serving SQLite host answers state reads of keys it never wrote without the database,
/// and finds every key it wrote, before and after a restart. The proof that it does not ask
/// the database: a key written behind its back (by a plain open, which a serving host's lock
/// does not stop) stays invisible to it until it restarts and loads the keys again.
#[tokio::test]
async fn a_serving_sqlite_host_knows_which_state_keys_exist() {
    let dir = tempfile::tempdir().unwrap();
    let host = open_exclusive(None, dir.path(), 1).await.unwrap();
    write_state(&host, "inventory", &["reservation/1"]).await;
    assert_eq!(
        host.state_get("inventory", "reservation/1").await.unwrap().as_deref(),
        Some(b"reservation/1".as_slice())
    );
    assert_eq!(host.state_get("inventory", "reservation/2").await.unwrap(), None);
    let behind = open(None, dir.path()).await.unwrap();
    write_state(&behind, "inventory", &["reservation/2"]).await;
    assert_eq!(
        behind.state_get("inventory", "reservation/2").await.unwrap().as_deref(),
        Some(b"reservation/2".as_slice())
    );
    assert_eq!(host.state_get("inventory", "reservation/2").await.unwrap(), None, "answered without a query");
    drop((host, behind));
    let host = open_exclusive(None, dir.path(), 1).await.unwrap();
    for key in ["reservation/1", "reservation/2"] {
        assert_eq!(
            host.state_get("inventory", key).await.unwrap().as_deref(),
            Some(key.as_bytes()),
            "{key} after a restart"
        );
    }
    assert_eq!(host.state_get("payment", "reservation/1").await.unwrap(), None);
}

/// Commits `writes` of `plugin` on saga s1 (created if missing), fenced when `stale`.
async fn commit_state(s: &Arc<dyn Store>, plugin: &str, writes: &[StateWrite], stale: bool) -> Result<i64> {
    commit_call(s, plugin, writes, &[], stale).await
}

/// Commits `writes` and `checks` of `plugin` on saga s1 (created if missing), as the driver
/// commits what a call did.
async fn commit_checked(s: &Arc<dyn Store>, plugin: &str, writes: &[StateWrite], checks: &[StateCheck]) -> Result<i64> {
    commit_call(s, plugin, writes, checks, false).await
}

/// Commits what a call of `plugin` did on saga s1 (created if missing), fenced when `stale`.
async fn commit_call(
    s: &Arc<dyn Store>,
    plugin: &str,
    writes: &[StateWrite],
    checks: &[StateCheck],
    stale: bool,
) -> Result<i64> {
    let rec = match s.saga("s1").await.unwrap() {
        Some(rec) => rec,
        None => {
            s.create_saga(&new_saga("s1"), None, 0).await.unwrap();
            s.saga("s1").await.unwrap().unwrap()
        }
    };
    let names = vec!["only".to_owned()];
    let read_seq = if stale { rec.seq - 1 } else { rec.seq };
    let e = event("s1", &rec.state, read_seq);
    let mut c = commit(&rec.state, &names, &e, Fence::Takeover, read_seq);
    let plugin_writes = [(plugin, writes)];
    let plugin_checks = [(plugin, checks)];
    c.plugin_writes = &plugin_writes;
    c.plugin_checks = &plugin_checks;
    s.commit(&c).await
}

/// A serving SQLite host answers state reads of values it committed from memory: a
/// compensation reads what its step's execute wrote, without a round trip to the database.
/// The proof that it does not ask the database is the same as the key filter's: a value
/// written behind its back stays invisible to it. A fenced commit leaves the key to the
/// database (whatever the host held before may be stale), a committed delete answers
/// absent, and a restart starts empty.
#[tokio::test]
async fn a_serving_sqlite_host_answers_reads_of_state_it_committed_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    let host = open_exclusive(None, dir.path(), 1).await.unwrap();
    let put = |v: &str| vec![("charge/1".to_owned(), Some(v.as_bytes().to_vec()))];
    let get = || async { host.state_get("payment", "charge/1").await.unwrap().map(|v| String::from_utf8(v).unwrap()) };
    commit_state(&host, "payment", &put("charged"), false).await.unwrap();
    let before = host.state_read_stats();
    assert_eq!(get().await.as_deref(), Some("charged"));
    let after = host.state_read_stats();
    assert_eq!((after.cache - before.cache, after.database - before.database), (1, 0), "answered from memory");

    let behind = open(None, dir.path()).await.unwrap();
    commit_state(&behind, "payment", &put("behind its back"), false).await.unwrap();
    assert_eq!(get().await.as_deref(), Some("charged"), "the host's own commit, not the database's row");

    // A fenced commit wrote nothing, and the host no longer trusts what it held.
    assert!(matches!(commit_state(&host, "payment", &put("fenced"), true).await, Err(Error::Fenced)));
    let before = host.state_read_stats();
    assert_eq!(get().await.as_deref(), Some("behind its back"), "read from the database");
    assert_eq!(host.state_read_stats().database - before.database, 1);

    commit_state(&host, "payment", &put("refunded"), false).await.unwrap();
    assert_eq!(get().await.as_deref(), Some("refunded"));
    commit_state(&host, "payment", &[("charge/1".to_owned(), None)], false).await.unwrap();
    let before = host.state_read_stats();
    assert_eq!(get().await, None, "a committed delete");
    assert_eq!(host.state_read_stats().cache - before.cache, 1);

    drop((host, behind));
    let host = open_exclusive(None, dir.path(), 1).await.unwrap();
    commit_state(&host, "payment", &put("after a restart"), false).await.unwrap();
    drop(host);
    let host = open_exclusive(None, dir.path(), 1).await.unwrap();
    assert_eq!(host.state_get("payment", "charge/1").await.unwrap().as_deref(), Some(b"after a restart".as_slice()));
    assert_eq!(
        host.state_read_stats(),
        StateReadStats { cache: 0, filter: 0, database: 1, checks_refused: 0, catalog_checks_refused: 0 },
        "a restart starts empty"
    );
}

/// The driver sleeps until `next_due`: a saga under someone's live lease is not due (it is
/// running), so it must not make the driver poll again at once; once the lease is released
/// or expires it counts again.
#[tokio::test]
async fn next_due_skips_sagas_under_a_live_lease() {
    for b in backends().await {
        let s = &b.store;
        assert_eq!(s.next_due().await.unwrap(), None, "{}", b.name);
        let owned = NewSaga { lease: Some(("me".into(), 60_000)), ..new_saga("owned") };
        s.create_saga(&owned, None, 0).await.unwrap();
        assert_eq!(s.next_due().await.unwrap(), None, "{}: a running saga is not due", b.name);
        let mut later = new_saga("later");
        later.state.next_run_at = Some(5_000);
        s.create_saga(&later, None, 0).await.unwrap();
        assert_eq!(s.next_due().await.unwrap(), Some(5_000), "{}: the free saga's timer", b.name);
        assert_eq!(s.release_owner("me").await.unwrap(), 1, "{}", b.name);
        assert_eq!(s.next_due().await.unwrap(), Some(0), "{}: released, the saga is due again", b.name);
        // Held for a minute (so a slow machine cannot let it lapse before the checks), then
        // renewed short to let it expire.
        let short = NewSaga { lease: Some(("gone".into(), 60_000)), ..new_saga("short") };
        s.create_saga(&short, None, 0).await.unwrap();
        assert_eq!(s.claim_due("me", 10_000, 60_000, 10).await.unwrap().len(), 2, "{}", b.name);
        assert_eq!(s.next_due().await.unwrap(), None, "{}: every saga is held", b.name);
        assert!(s.renew_lease("short", 1, 50).await.unwrap(), "{}", b.name);
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        assert_eq!(s.next_due().await.unwrap(), Some(0), "{}: an expired lease is due", b.name);
        b.cleanup().await;
    }
}

/// The trace context of the intake span is stored with the saga and read back with it, with
/// and without an idempotency key; a saga created with tracing off has none.
#[tokio::test]
async fn a_sagas_trace_parent_is_stored_with_it() {
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    for b in backends().await {
        let traced = NewSaga { trace_parent: Some(tp.into()), ..new_saga("traced") };
        b.store.create_saga(&traced, None, 0).await.unwrap();
        let keyed = NewSaga { trace_parent: Some(tp.into()), ..new_saga("keyed") };
        let claim = IdempotencyClaim {
            caller: "c".into(),
            route: "POST /orders".into(),
            key: "kt".into(),
            fingerprint: "f".into(),
            lock_ms: 100,
            ttl_ms: 10_000,
            response: None,
        };
        assert_eq!(b.store.create_saga(&keyed, Some(&claim), 0).await.unwrap(), CreateOutcome::Created, "{}", b.name);
        b.store.create_saga(&new_saga("plain"), None, 0).await.unwrap();
        for (id, want) in [("traced", Some(tp)), ("keyed", Some(tp)), ("plain", None)] {
            let rec = b.store.saga(id).await.unwrap().unwrap();
            assert_eq!(rec.trace_parent.as_deref(), want, "{}: {id}", b.name);
        }
        b.cleanup().await;
    }
}

/// Holds a SQLite database's write lock from a connection of its own, for tests of what waits
/// for the writer (modules outside the store do not name sqlx).
pub(crate) struct WriteLock(sqlx::SqliteConnection);

impl WriteLock {
    pub(crate) async fn take(file: &std::path::Path) -> WriteLock {
        use sqlx::{Connection as _, Executor as _};
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(file);
        let mut conn = sqlx::SqliteConnection::connect_with(&options).await.unwrap();
        conn.execute("BEGIN IMMEDIATE").await.unwrap();
        WriteLock(conn)
    }

    pub(crate) async fn release(mut self) {
        use sqlx::Executor as _;
        self.0.execute("ROLLBACK").await.unwrap();
    }
}

/// A commit that carries state checks applies only while each checked key still holds the
/// value read (or is still absent), as the database stood before the commit's own writes;
/// otherwise it writes nothing ([`Error::StaleRead`]). So does a saga's creation with its
/// first commit: not even its idempotency key is claimed (its request creates the saga alone
/// and finds the key new).
#[tokio::test]
async fn a_commit_applies_only_while_the_state_values_it_checks_still_stand() {
    for b in backends().await {
        let s = &b.store;
        let put = |k: &str, v: &str| (k.to_owned(), Some(v.as_bytes().to_vec()));
        commit_state(s, "p", &[put("a", "1")], false).await.unwrap();
        let seq = s.saga("s1").await.unwrap().unwrap().seq;

        for (checks, what) in [
            (vec![("a".to_owned(), Some(b"0".to_vec()))], "a value changed"),
            (vec![("a".to_owned(), None)], "a key read absent exists"),
            (vec![("b".to_owned(), Some(b"1".to_vec()))], "a key read present is gone"),
            (vec![("b".to_owned(), None), ("a".to_owned(), Some(b"0".to_vec()))], "one of two"),
        ] {
            let refused = commit_checked(s, "p", &[put("b", "x")], &checks).await;
            assert!(matches!(refused, Err(Error::StaleRead)), "{}: {what}: {refused:?}", b.name);
            assert_eq!(s.saga("s1").await.unwrap().unwrap().seq, seq, "{}: {what}: no transition", b.name);
            assert_eq!(s.state_get("p", "b").await.unwrap(), None, "{}: {what}: no write", b.name);
        }
        // The checks see the database before the commit's own writes: "b absent" holds
        // although the commit writes it, and "a is 1" although the commit changes it.
        let checks = [("a".to_owned(), Some(b"1".to_vec())), ("b".to_owned(), None)];
        commit_checked(s, "p", &[put("a", "2"), put("b", "x")], &checks).await.unwrap();
        assert_eq!(s.state_get("p", "a").await.unwrap().as_deref(), Some(b"2".as_slice()), "{}", b.name);
        assert_eq!(s.state_get("p", "b").await.unwrap().as_deref(), Some(b"x".as_slice()), "{}", b.name);

        // A creation with its first commit, keyed and not: refused whole, then let through.
        let names = vec!["only".to_owned()];
        for (id, keyed) in [("s2", true), ("s3", false)] {
            let first = NewSaga { lease: Some(("a".into(), 60_000)), ..new_saga(id) };
            let events = [event(id, &first.state, 1)];
            let writes = [("p", &[put(&format!("made/{id}"), "1")][..])];
            let stale = [("a".to_owned(), Some(b"1".to_vec()))];
            let current = [("a".to_owned(), Some(b"2".to_vec()))];
            for (checks, ok) in [(&stale, false), (&current, true)] {
                let claim = keyed.then(|| IdempotencyClaim { key: format!("{id}-{ok}"), ..waiting_claim() });
                let checks = [("p", &checks[..])];
                let mut c = commit(&first.state, &names, &events[0], Fence::LeaseRelease(1), 1);
                c.saga_id = id;
                c.plugin_writes = &writes;
                c.plugin_checks = &checks;
                c.creation = Some(Creation { saga: &first, claim: claim.as_ref() });
                let done = s.commit(&c).await;
                landed_whole_or_not_at_all(s, b.name, id, claim.as_ref(), done, ok).await;
            }
        }
        b.cleanup().await;
    }
}

/// After a creation's first commit `done` of saga `id` (with state write `made/{id}` of plugin
/// `p`, keyed by `claim` if any), which should have landed when `ok`: it did, or it wrote
/// nothing and was [`Error::StaleRead`], not even its key claimed (the request's own creation
/// then finds the key new).
async fn landed_whole_or_not_at_all(
    s: &Arc<dyn Store>,
    backend: &str,
    id: &str,
    claim: Option<&IdempotencyClaim>,
    done: Result<i64>,
    ok: bool,
) {
    assert_eq!(done.is_ok(), ok, "{backend} {id}: {done:?}");
    assert_eq!(s.saga(id).await.unwrap().is_some(), ok, "{backend} {id}");
    assert_eq!(s.state_get("p", &format!("made/{id}")).await.unwrap().is_some(), ok, "{backend} {id}");
    if !ok {
        assert!(matches!(done, Err(Error::StaleRead)), "{backend} {id}: {done:?}");
        if let Some(claim) = claim {
            let alone = s.create_saga(&new_saga(&format!("{id}-alone")), Some(claim), 10).await.unwrap();
            assert_eq!(alone, CreateOutcome::Created, "{backend} {id}: the key was not claimed");
        }
    }
}

/// A commit that carries a catalog check (a compensation's binding picked from a cache that
/// may be behind the store) applies only while the stored catalog version is still the one
/// checked: after any catalog change it writes nothing ([`Error::StaleRead`]), nor does a
/// creation with its first commit (not even its key is claimed).
#[tokio::test]
async fn a_commit_applies_only_while_the_catalog_version_it_checks_stands() {
    for b in backends().await {
        let s = &b.store;
        let put = |k: &str| (k.to_owned(), Some(b"1".to_vec()));
        commit_state(s, "p", &[put("a")], false).await.unwrap();
        let names = &["only".to_owned()];
        // Commits a write of `key`, checking `version`.
        let checked = |version: i64, key: &'static str| async move {
            let rec = s.saga("s1").await.unwrap().unwrap();
            let e = event("s1", &rec.state, rec.seq);
            let writes = [("p", &[put(key)][..])];
            let c = Commit {
                plugin_writes: &writes,
                catalog_check: Some(version),
                ..commit(&rec.state, names, &e, Fence::Takeover, rec.seq)
            };
            s.commit(&c).await
        };
        let v1 = s.catalog_version().await.unwrap();
        checked(v1, "first").await.unwrap();
        assert!(s.state_get("p", "first").await.unwrap().is_some(), "{}", b.name);
        // Another host uploads a version: the catalog moved on.
        assert!(s.put_plugin("sha256:q", "q", b"wasm", 1, None).await.unwrap(), "{}", b.name);
        let v2 = s.catalog_version().await.unwrap();
        assert!(v2 > v1, "{}", b.name);
        let seq = s.saga("s1").await.unwrap().unwrap().seq;
        let before = s.state_read_stats();
        let refused = checked(v1, "stale").await;
        assert!(matches!(refused, Err(Error::StaleRead)), "{}: {refused:?}", b.name);
        assert_eq!(s.saga("s1").await.unwrap().unwrap().seq, seq, "{}: no transition", b.name);
        assert_eq!(s.state_get("p", "stale").await.unwrap(), None, "{}: no write", b.name);
        let after = s.state_read_stats();
        let counted = (
            after.catalog_checks_refused - before.catalog_checks_refused,
            after.checks_refused - before.checks_refused,
        );
        assert_eq!(counted, (1, 0), "{}: counted as a catalog refusal only", b.name);
        checked(v2, "current").await.unwrap();
        assert!(s.state_get("p", "current").await.unwrap().is_some(), "{}", b.name);

        // A creation with its first commit, keyed and not: refused whole, then let through.
        for (id, keyed) in [("s2", true), ("s3", false)] {
            let first = NewSaga { lease: Some(("a".into(), 60_000)), ..new_saga(id) };
            let events = [event(id, &first.state, 1)];
            let writes = [("p", &[put(&format!("made/{id}"))][..])];
            for (version, ok) in [(v1, false), (v2, true)] {
                let claim = keyed.then(|| IdempotencyClaim { key: format!("{id}-{ok}"), ..waiting_claim() });
                let c = Commit {
                    saga_id: id,
                    plugin_writes: &writes,
                    catalog_check: Some(version),
                    creation: Some(Creation { saga: &first, claim: claim.as_ref() }),
                    ..commit(&first.state, names, &events[0], Fence::LeaseRelease(1), 1)
                };
                let done = s.commit(&c).await;
                landed_whole_or_not_at_all(s, b.name, id, claim.as_ref(), done, ok).await;
            }
        }
        b.cleanup().await;
    }
}

/// Two sagas' calls read one key, both compute from the value read, both commit: the second
/// commit must not replace the first's value with one computed from the value before it (a
/// lost update). Every read of a caller whose commit can check it is checked, however it was
/// answered (memory or database), and the commit that finds the value changed is refused.
#[tokio::test]
async fn a_commit_computed_from_a_value_another_commit_changed_since_is_refused() {
    for b in backends().await {
        let s = &b.store;
        let put = |v: &str| vec![("total".to_owned(), Some(v.as_bytes().to_vec()))];
        let read =
            |value: Option<&str>, checked: bool| StateRead { value: value.map(|v| v.as_bytes().to_vec()), checked };
        // Both read the absent key, and both the value the first committed.
        assert_eq!(s.state_read("counter", "total", true).await.unwrap(), read(None, true), "{}", b.name);
        commit_checked(s, "counter", &put("1"), &[("total".to_owned(), None)]).await.unwrap();
        let refused = commit_checked(s, "counter", &put("1"), &[("total".to_owned(), None)]).await;
        assert!(matches!(refused, Err(Error::StaleRead)), "{}: created meanwhile: {refused:?}", b.name);
        // The refusal dropped the key from memory: this read asks the database, checked too.
        let before = s.state_read_stats().database;
        let seen = s.state_read("counter", "total", true).await.unwrap();
        assert_eq!(seen, read(Some("1"), true), "{}", b.name);
        assert_eq!(s.state_read_stats().database - before, 1, "{}: read from the database", b.name);
        let (first, second) = (seen.value.clone(), seen.value);
        commit_checked(s, "counter", &put("2"), &[("total".to_owned(), first)]).await.unwrap();
        let refused = commit_checked(s, "counter", &put("2"), &[("total".to_owned(), second)]).await;
        assert!(matches!(refused, Err(Error::StaleRead)), "{}: changed meanwhile: {refused:?}", b.name);
        assert_eq!(s.state_get("counter", "total").await.unwrap().as_deref(), Some(b"2".as_slice()), "{}", b.name);
        // A caller that cannot have its reads checked (it may reach another service) reads
        // the stored value, unchecked.
        assert_eq!(s.state_read("counter", "total", false).await.unwrap(), read(Some("2"), false), "{}", b.name);
        b.cleanup().await;
    }
}

/// A commit that runs while another commit of a key it read is under way, not yet committed:
/// on PostgreSQL its statement's snapshot does not see that commit, so a check made against
/// that snapshot alone passed, and its write then waited for the other's row and replaced it
/// (a lost update, a delete undone, a created value overwritten). Now the check of a value
/// read waits for the row and looks at it as the other commit left it, and a key read absent
/// is inserted plainly, which fails on the row the other made: refused either way, and the
/// other commit's write stands. On SQLite the commit waits for the other writer and then sees
/// its write. The other commit is a transaction of its own connection, held open until this
/// commit is seen waiting. A key a commit only reads is not held on PostgreSQL (readers of a
/// hot key do not queue): that commit goes through while the other is still open.
#[tokio::test]
async fn a_commit_running_while_another_commit_writes_a_key_it_read_is_refused() {
    use sqlx::{Connection as _, Executor as _};
    for b in backends().await {
        let s = &b.store;
        let v = |s: &str| Some(s.as_bytes().to_vec());
        let seeded = [("total".to_owned(), v("1")), ("gone".to_owned(), v("x"))];
        commit_checked(s, "counter", &seeded, &[]).await.unwrap();
        let update = "UPDATE plugin_state SET value = $1 WHERE plugin = 'counter' AND key = 'total'";
        let delete = "DELETE FROM plugin_state WHERE plugin = 'counter' AND key = 'gone'";
        let insert = "INSERT INTO plugin_state (plugin, key, value, updated_at) VALUES ('counter', 'fresh', $1, 0)";
        // (key, the value this commit read, the other commit's statement, what then stands)
        let cases =
            [("total", v("1"), update, v("2")), ("gone", v("x"), delete, None), ("fresh", None, insert, v("2"))];
        for (key, seen, other, stands) in cases {
            let mut conn = KeyVanishes::connect(&b).await;
            let mut tx = conn.begin().await.unwrap();
            let other = sqlx::query(other);
            tx.execute(if stands.is_some() { other.bind(b"2".to_vec()) } else { other }).await.unwrap();
            let commit = {
                let (s, key, seen) = (s.clone(), key.to_owned(), seen.clone());
                tokio::spawn(async move {
                    let writes = [(key.clone(), Some(b"from a stale read".to_vec()))];
                    commit_checked(&s, "counter", &writes, &[(key, seen)]).await
                })
            };
            if let Some((_, url)) = &b.pg {
                // Seen waiting for the other's row: its statement began before that commit.
                store_waits_for_a_lock(url, &format!("{key}: the commit")).await;
            } else {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                assert!(!commit.is_finished(), "{key}: the commit did not wait for the other writer");
            }
            tx.commit().await.unwrap();
            let refused = commit.await.unwrap();
            assert!(matches!(refused, Err(Error::StaleRead)), "{}: {key}: {refused:?}", b.name);
            assert_eq!(
                s.state_get("counter", key).await.unwrap(),
                stands,
                "{}: {key}: the other's write stands",
                b.name
            );
        }
        if b.pg.is_some() {
            let mut conn = KeyVanishes::connect(&b).await;
            let mut tx = conn.begin().await.unwrap();
            let other = "UPDATE plugin_state SET value = $1 WHERE plugin = 'counter' AND key = 'total'";
            tx.execute(sqlx::query(other).bind(b"3".to_vec())).await.unwrap();
            let writes = [("elsewhere".to_owned(), v("e"))];
            let read = [("total".to_owned(), v("2"))];
            let read_only = commit_checked(s, "counter", &writes, &read);
            let done = tokio::time::timeout(std::time::Duration::from_secs(5), read_only).await;
            assert!(matches!(done, Ok(Ok(_))), "a commit that only read the key waited for it: {done:?}");
            tx.commit().await.unwrap();
        }
        b.cleanup().await;
    }
}

/// Waits (10 s at most) until one of the store's connections to the PostgreSQL database at
/// `url` waits for a lock; `who` names the statement in the failure message.
async fn store_waits_for_a_lock(url: &str, who: &str) {
    use sqlx::Connection as _;
    let start = std::time::Instant::now();
    let mut watch = sqlx::AnyConnection::connect(url).await.unwrap();
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND datname = current_database() AND application_name = 'sagahost'",
        )
        .fetch_one(&mut watch)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        assert!(start.elapsed().as_secs() < 10, "{who} never waited for a lock");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// On PostgreSQL a commit's check of a key it writes takes that row's lock, so the commit can
/// deadlock with another transaction that holds a key the commit writes without having read
/// it and then wants the checked one. The database fails one side: a commit carrying checks
/// that is failed so is refused like a stale read (the steps run again on a reload), not
/// failed as a broken commit, and writes nothing; the other side's writes stand.
#[tokio::test]
async fn a_checked_commit_failed_to_break_a_deadlock_is_refused_as_a_stale_read() {
    use sqlx::{Connection as _, Executor as _};
    for b in backends().await {
        let Some((_, url)) = &b.pg else {
            b.cleanup().await;
            continue;
        };
        let s = &b.store;
        let v = |s: &str| Some(s.as_bytes().to_vec());
        commit_checked(s, "counter", &[("a".to_owned(), v("1")), ("b".to_owned(), v("1"))], &[]).await.unwrap();
        let before = s.state_read_stats().checks_refused;
        let mut conn = KeyVanishes::connect(&b).await;
        // This side looks for a deadlock only after 30 s of waiting: the commit's side (1 s,
        // the server's default) finds it first, and PostgreSQL fails the side that finds it.
        conn.execute("SET deadlock_timeout = '30s'").await.unwrap();
        let mut tx = conn.begin().await.unwrap();
        let update = |key: &'static str| {
            sqlx::query("UPDATE plugin_state SET value = $1 WHERE plugin = 'counter' AND key = $2")
                .bind(b"2".to_vec())
                .bind(key)
        };
        tx.execute(update("b")).await.unwrap();
        // The commit checks `a` (its row lock taken) and writes `b` unread: it waits for `b`.
        let commit = {
            let s = s.clone();
            tokio::spawn(async move {
                let writes = [("a".to_owned(), Some(b"mine".to_vec())), ("b".to_owned(), Some(b"mine".to_vec()))];
                commit_checked(&s, "counter", &writes, &[("a".to_owned(), Some(b"1".to_vec()))]).await
            })
        };
        store_waits_for_a_lock(url, "the commit, for b's row,").await;
        // Now this side wants `a`, which the commit holds: a deadlock, which fails the commit
        // (this statement goes on once it has).
        tx.execute(update("a")).await.unwrap();
        let refused = commit.await.unwrap();
        assert!(matches!(refused, Err(Error::StaleRead)), "{refused:?}");
        assert_eq!(s.state_read_stats().checks_refused, before + 1);
        tx.commit().await.unwrap();
        for key in ["a", "b"] {
            assert_eq!(s.state_get("counter", key).await.unwrap(), v("2"), "{key}: the other side's write stands");
        }
        b.cleanup().await;
    }
}

/// PostgreSQL replicas answer a call's state reads from memory (values they committed, keys
/// they never saw) when the call's reads are checked (`checked`): another replica may have
/// changed the value. The commit that checks a stale answer is refused and writes nothing,
/// and from then on the key is read from the database (still checked); reads of a caller
/// that cannot be checked always ask the database.
#[tokio::test]
async fn postgresql_replicas_answer_reads_from_memory_subject_to_the_commits_check() {
    let admin = std::env::var("SAGAHOST_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned());
    if admin == "off" {
        return;
    }
    let url = postgres::scratch_database(&admin, "sagahost_test").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let a = open_exclusive(Some(&url), dir.path(), 4).await.unwrap();
    let b = open_exclusive(Some(&url), dir.path(), 4).await.unwrap();
    let put = |k: &str, v: &str| (k.to_owned(), Some(v.as_bytes().to_vec()));
    let read = |value: Option<&str>, checked: bool| StateRead { value: value.map(|v| v.as_bytes().to_vec()), checked };

    commit_state(&a, "payment", &[put("charge/1", "charged")], false).await.unwrap();
    let before = a.state_read_stats();
    assert_eq!(a.state_read("payment", "charge/1", true).await.unwrap(), read(Some("charged"), true));
    assert_eq!(a.state_read("payment", "charge/2", true).await.unwrap(), read(None, true), "never seen");
    let after = a.state_read_stats();
    assert_eq!((after.cache - before.cache, after.filter - before.filter, after.database - before.database), (1, 1, 0));
    // No guess: the database.
    assert_eq!(a.state_read("payment", "charge/1", false).await.unwrap(), read(Some("charged"), false));
    assert_eq!(a.state_read_stats().database - after.database, 1);

    // Another replica changes one and creates the other; A's memory still says otherwise.
    commit_state(&b, "payment", &[put("charge/1", "refunded"), put("charge/2", "new")], false).await.unwrap();
    assert_eq!(a.state_read("payment", "charge/1", true).await.unwrap(), read(Some("charged"), true));
    assert_eq!(a.state_read("payment", "charge/2", true).await.unwrap(), read(None, true));
    assert_eq!(a.state_get("payment", "charge/1").await.unwrap().as_deref(), Some(b"refunded".as_slice()));

    // A commit checking those answers is refused, and A asks the database from then on.
    for (key, seen, now) in [("charge/1", Some("charged"), "refunded"), ("charge/2", None, "new")] {
        let checks = [(key.to_owned(), seen.map(|v| v.as_bytes().to_vec()))];
        let refused = commit_checked(&a, "payment", &[put("other", "x")], &checks).await;
        assert!(matches!(refused, Err(Error::StaleRead)), "{key}: {refused:?}");
        assert_eq!(a.state_get("payment", "other").await.unwrap(), None, "{key}: nothing written");
        // From the database now, and still checked: every read of a checked caller is.
        assert_eq!(a.state_read("payment", key, true).await.unwrap(), read(Some(now), true), "{key}");
    }
    assert_eq!(a.state_read_stats().checks_refused, 2);

    // Answers that still stand commit, and what A commits it answers from memory again.
    let checks = [("charge/3".to_owned(), None)];
    commit_checked(&a, "payment", &[put("charge/3", "third")], &checks).await.unwrap();
    assert_eq!(a.state_read("payment", "charge/3", true).await.unwrap(), read(Some("third"), true));
    assert_eq!(b.state_get("payment", "charge/3").await.unwrap().as_deref(), Some(b"third".as_slice()));
    drop((a, b));
    postgres::drop_database(&admin, &url).await.unwrap();
}
