//! Store tests, run against every backend: a fresh SQLite file and a fresh PostgreSQL database
//! per test. The PostgreSQL server is `SAGAHOST_TEST_POSTGRES` (an admin URL; default
//! `postgres://postgres@127.0.0.1:5432/postgres`). `SAGAHOST_TEST_POSTGRES=off` skips it, for
//! a machine without PostgreSQL; `./scripts/test` never sets that.

use std::sync::Arc;

use super::*;
use crate::engine::{PluginRef, RetryPolicy, SagaDefinition, StepDefinition};

pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// One store under test; dropping the PostgreSQL database when the test is done.
struct Backend {
    name: &'static str,
    store: Arc<dyn Store>,
    _dir: tempfile::TempDir,
    pg: Option<(String, String)>,
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
    let sqlite: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("t.db")).await.unwrap());
    let mut out = vec![Backend { name: "sqlite", store: sqlite, _dir: dir, pg: None }];
    let admin = std::env::var("SAGAHOST_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned());
    if admin != "off" {
        let url = postgres::scratch_database(&admin, "sagahost_test").await.unwrap_or_else(|e| {
            panic!("PostgreSQL at {admin} is needed for the store tests ({e}); SAGAHOST_TEST_POSTGRES=off skips them")
        });
        let pg: Arc<dyn Store> = Arc::new(PgStore::open(&url).await.unwrap());
        out.push(Backend { name: "postgres", store: pg, _dir: tempfile::tempdir().unwrap(), pg: Some((admin, url)) });
    }
    out
}

fn def() -> SagaDefinition {
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
        }],
    }
}

fn new_saga(id: &str) -> NewSaga {
    let d = def();
    NewSaga {
        id: id.into(),
        state: SagaState::new(&d, 0),
        definition: d,
        input: "{}".into(),
        event: EventSpec { event_type: "OrderCreated".into(), data: serde_json::json!({}) },
        event_id: format!("ev-{id}"),
        now: 0,
    }
}

fn commit<'a>(
    state: &'a SagaState,
    names: &'a [String],
    event: &'a EventSpec,
    fence: Fence,
    id: &'a str,
) -> Commit<'a> {
    Commit {
        saga_id: "s1",
        saga_type: "order",
        fence,
        state,
        step_names: names,
        changed_steps: &[0],
        plugin_writes: None,
        event,
        event_id: id,
        now: 1,
        audit: None,
    }
}

#[tokio::test]
async fn a_live_lease_blocks_others_an_expired_one_is_taken_over_and_the_old_holder_is_fenced() {
    for b in backends().await {
        let store = &b.store;
        assert_eq!(store.create_saga(&new_saga("s1"), None, 0).await.unwrap(), CreateOutcome::Created);
        let claimed = store.claim_due("a", 0, 200, 10).await.unwrap();
        assert_eq!(claimed, vec![("s1".to_owned(), 1)], "{}", b.name);
        assert!(store.claim_due("b", 0, 200, 10).await.unwrap().is_empty(), "{}: a live lease blocks others", b.name);
        // Leases run on the database's clock: wait it out for real.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let taken = store.claim_due("b", 0, 200, 10).await.unwrap();
        assert_eq!(taken, vec![("s1".to_owned(), 2)], "{}: an expired lease is taken over with a new epoch", b.name);

        let rec = store.saga("s1").await.unwrap().unwrap();
        let names = vec!["only".to_owned()];
        let event = EventSpec { event_type: "X".into(), data: serde_json::json!({}) };
        // The old holder cannot commit, renew or release.
        let stale = commit(&rec.state, &names, &event, Fence::Lease(1), "e2");
        assert!(matches!(store.commit(&stale).await, Err(Error::Fenced)), "{}", b.name);
        assert!(!store.renew_lease("s1", 1, 1000).await.unwrap(), "{}", b.name);
        // The new holder commits; seq continues gapless.
        let fresh = commit(&rec.state, &names, &event, Fence::Lease(2), "e3");
        assert_eq!(store.commit(&fresh).await.unwrap(), 2, "{}", b.name);
        // An outside event takes over: the epoch moves and the holder is fenced out.
        let outside = commit(&rec.state, &names, &event, Fence::Takeover(2), "e4");
        assert_eq!(store.commit(&outside).await.unwrap(), 3, "{}", b.name);
        let late = commit(&rec.state, &names, &event, Fence::Lease(2), "e5");
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
        store.complete_idempotency("c", "POST /orders", "k", 201, b"body").await.unwrap();
        assert_eq!(
            create("b", "f1", 300).await,
            CreateOutcome::Replay { status: 201, body: b"body".to_vec(), saga_id: Some("a".into()) },
            "{}",
            b.name
        );
        assert!(store.saga("b").await.unwrap().is_none(), "{}: never a second saga for one key", b.name);
        // Past retention the key is forgotten and may be used afresh.
        assert_eq!(create("c", "f2", 20_000).await, CreateOutcome::Created, "{}", b.name);
        // Keys that create nothing: claim, take over when abandoned, release.
        let other = IdempotencyClaim { route: "POST /x".into(), ..claim("f9", None) };
        assert_eq!(store.claim_key(&other, 0).await.unwrap(), CreateOutcome::Created, "{}", b.name);
        assert_eq!(store.claim_key(&other, 50).await.unwrap(), CreateOutcome::InFlight, "{}", b.name);
        assert_eq!(store.claim_key(&other, 150).await.unwrap(), CreateOutcome::Created, "{}", b.name);
        store.release_key("c", "POST /x", "k").await.unwrap();
        assert_eq!(store.claim_key(&other, 160).await.unwrap(), CreateOutcome::Created, "{}", b.name);
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

#[tokio::test]
async fn workers_claiming_at_once_take_disjoint_sagas() {
    for b in backends().await {
        for i in 0..60 {
            b.store.create_saga(&new_saga(&format!("s{i:02}")), None, 0).await.unwrap();
        }
        let tasks: Vec<_> = (0..3)
            .map(|w| {
                let store = Arc::clone(&b.store);
                tokio::spawn(async move {
                    let mut mine = vec![];
                    loop {
                        let got = store.claim_due(&format!("w{w}"), 0, 60_000, 7).await.unwrap();
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
        let expected: Vec<String> = (0..60).map(|i| format!("s{i:02}")).collect();
        assert_eq!(all, expected, "{}: every due saga claimed exactly once", b.name);
        b.cleanup().await;
    }
}

#[tokio::test]
async fn one_relay_lease_holder_at_a_time_and_takeover_after_expiry() {
    for b in backends().await {
        let s = &b.store;
        let first = s.relay_lease("a", 200).await.unwrap();
        assert_eq!(first, Some(1), "{}", b.name);
        assert_eq!(s.relay_lease("b", 200).await.unwrap(), None, "{}: b waits while a's lease lives", b.name);
        assert_eq!(s.relay_lease("a", 200).await.unwrap(), Some(1), "{}: renewal keeps the epoch", b.name);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(s.relay_lease("b", 200).await.unwrap(), Some(2), "{}: b takes over an expired lease", b.name);
        assert_eq!(s.relay_lease("a", 200).await.unwrap(), None, "{}: a lost it", b.name);
        s.relay_release("b").await.unwrap();
        assert_eq!(s.relay_lease("a", 200).await.unwrap(), Some(3), "{}: a released lease is free at once", b.name);
        b.cleanup().await;
    }
}

#[tokio::test]
async fn uploads_and_definition_changes_bump_the_catalog_version() {
    for b in backends().await {
        let s = &b.store;
        let v0 = s.catalog_version().await.unwrap();
        assert!(s.put_plugin("sha256:p", "p", b"wasm", 1).await.unwrap(), "{}", b.name);
        let v1 = s.catalog_version().await.unwrap();
        assert!(v1 > v0, "{}", b.name);
        assert!(!s.put_plugin("sha256:p", "p", b"wasm", 2).await.unwrap(), "{}: the same bytes twice", b.name);
        assert_eq!(s.catalog_version().await.unwrap(), v1, "{}: nothing new, no bump", b.name);
        s.put_definition(&def(), DefinitionSource::Admin, 3).await.unwrap();
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
        let event = EventSpec { event_type: "X".into(), data: serde_json::json!({}) };
        let writes: Vec<StateWrite> = ["a%/1", "a%/2", "ab/1", "a_/1", "b/1"]
            .iter()
            .map(|k| (k.to_string(), Some(k.as_bytes().to_vec())))
            .collect();
        let mut c = commit(&rec.state, &names, &event, Fence::Takeover(0), "e2");
        c.plugin_writes = Some(("p", &writes));
        s.commit(&c).await.unwrap();
        let keys: Vec<String> = s.state_list("p", "a%/", 10).await.unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["a%/1", "a%/2"], "{}", b.name);
        assert_eq!(s.state_get("p", "b/1").await.unwrap().as_deref(), Some(b"b/1".as_slice()), "{}", b.name);
        b.cleanup().await;
    }
}

#[tokio::test]
async fn an_unreachable_database_or_unknown_scheme_is_a_clear_error_without_the_password() {
    let err =
        PgStore::open("postgres://postgres:secret@127.0.0.1:1/x").await.err().expect("port 1 refuses").to_string();
    assert!(err.contains("127.0.0.1:1") && err.to_lowercase().contains("refused"), "{err}");
    assert!(!err.contains("secret"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let err = open(Some("mysql://u:secret@h/db"), dir.path()).await.err().expect("not supported").to_string();
    assert!(err.contains("'mysql:'") && !err.contains("secret"), "{err}");
}
