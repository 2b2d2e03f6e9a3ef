//! Serving limits: in-flight requests, request deadline, `Prefer: wait` waiters, connections.

use std::time::Duration;

use reqwest::StatusCode;

use crate::harness::{key, order, TestHost};

/// Posts a `tok_3ds` order (it waits for a signal) with `Prefer: wait=secs`.
async fn post_waiting(host: &TestHost, secs: u64) -> crate::harness::Resp {
    host.post_order_raw(Some(&key()), order("tok_3ds", "SKU-1", "US").to_string().as_bytes(), Some(secs)).await
}

#[tokio::test]
async fn requests_past_the_in_flight_cap_are_shed_with_503_and_retry_after() {
    let host = TestHost::start_with(|c| c.serve.max_in_flight = 1).await;
    let waiting = post_waiting(&host, 3);
    let probe = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let probes = (host.get("/healthz").await, host.get("/readyz").await, host.get("/metrics").await);
        (host.get("/orders").await, probes)
    };
    let (held, (shed, (healthz, readyz, metrics))) = tokio::join!(waiting, probe);
    assert_eq!(held.status, StatusCode::CREATED, "the waiting order itself is served");
    assert_eq!(shed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(shed.json()["error"]["code"], "overloaded");
    assert_eq!(shed.header("retry-after").as_deref(), Some("1"));
    // A busy host is not a dead one: probes and the scraper are still answered.
    assert_eq!(
        (healthz.status, readyz.status, metrics.status),
        (StatusCode::OK, StatusCode::OK, StatusCode::OK),
        "probes are never shed"
    );
    assert_eq!(host.get("/orders").await.status, StatusCode::OK, "the slot is free again");
}

#[tokio::test]
async fn a_request_past_its_deadline_gets_503_and_the_saga_it_created_is_kept() {
    let host = TestHost::start_with(|c| c.serve.request_timeout = Duration::from_millis(700)).await;
    let started = std::time::Instant::now();
    let r = post_waiting(&host, 10).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json()["error"]["code"], "timeout");
    assert!(started.elapsed() < Duration::from_secs(5), "the deadline did not end the request");
    let page = host.get("/orders").await.json();
    assert_eq!(page["data"].as_array().unwrap().len(), 1, "the accepted saga is kept: {page:#}");
}

/// Retries `body` under `k` (no `Prefer`) while the key answers 409 (in flight), for up to 5 s,
/// and checks that the answer is the one saga the first request created, replayed.
async fn the_retry_gets_the_saga(host: &TestHost, k: &str, body: &str) {
    let started = std::time::Instant::now();
    let retry = loop {
        let r = host.post_order_raw(Some(k), body.as_bytes(), None).await;
        if r.status != StatusCode::CONFLICT || started.elapsed() > Duration::from_secs(5) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(retry.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&retry.bytes));
    assert_eq!(retry.header("idempotent-replayed").as_deref(), Some("true"));
    let sagas = host.store.list_sagas("order", None, None, 10).await.unwrap();
    assert_eq!(sagas.len(), 1, "one saga for one key");
    assert_eq!(retry.json()["id"], sagas[0].id.as_str());
}

#[tokio::test]
async fn a_waiting_request_cut_off_by_its_deadline_leaves_its_key_answered_for_the_retry() {
    // The 503 says "retry with the same Idempotency-Key": the retry must get the saga the cut-off
    // request created, not 409 "in flight" for as long as that request could have waited (+30 s).
    let host = TestHost::start_with(|c| c.serve.request_timeout = Duration::from_millis(700)).await;
    let (k, body) = (key(), order("tok_3ds", "SKU-1", "US").to_string());
    let r = host.post_order_raw(Some(&k), body.as_bytes(), Some(10)).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    the_retry_gets_the_saga(&host, &k, &body).await;
}

#[tokio::test]
async fn a_waiting_request_whose_client_hung_up_leaves_its_key_answered_for_the_retry() {
    let host = TestHost::start().await;
    let (k, body) = (key(), order("tok_3ds", "SKU-1", "US").to_string());
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(500)).build().unwrap();
    let gone = impatient
        .post(host.url("/orders"))
        .header("content-type", "application/json")
        .header("Idempotency-Key", &k)
        .header("Prefer", "wait=10")
        .body(body.clone())
        .send()
        .await;
    assert!(gone.is_err(), "the client was meant to give up first: {gone:?}");
    the_retry_gets_the_saga(&host, &k, &body).await;
}

#[tokio::test]
async fn a_saga_whose_request_was_cut_off_after_its_commit_still_runs_at_once() {
    // A request deadline so short that requests are cut off while their creation waits in the
    // SQLite writer's queue: the commit lands all the same, and the saga, born claimed by this
    // process, must still reach its driver (before, nobody ran it until its lease ran out:
    // 60 s). Bursts until one such saga exists (a 503 whose saga was created). On PostgreSQL
    // the commit runs in the request's task, and one cut off after its COMMIT is the case.
    let host = TestHost::start_with(|c| c.serve.request_timeout = Duration::from_millis(3)).await;
    let body = order("tok_visa", "SKU-1", "US").to_string();
    let (mut created, mut bursts) = (0, 0);
    loop {
        bursts += 1;
        let keys: Vec<String> = (0..40).map(|_| key()).collect();
        let answers =
            futures::future::join_all(keys.iter().map(|k| host.post_order_raw(Some(k), body.as_bytes(), None))).await;
        created += answers.iter().filter(|r| r.status == StatusCode::CREATED).count();
        let stored = host.store.list_sagas("order", None, None, 10_000).await.unwrap().len();
        if stored > created || bursts == 20 {
            assert!(stored > created, "no request was cut off after its commit in {bursts} bursts: nothing was tested");
            break;
        }
    }
    let started = std::time::Instant::now();
    loop {
        let sagas = host.store.list_sagas("order", None, None, 10_000).await.unwrap();
        let running: Vec<_> = sagas.iter().filter(|s| s.status.as_str() != "COMPLETED").collect();
        if running.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{} of {} sagas did not run: {running:?}",
            running.len(),
            sagas.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn past_the_waiter_cap_prefer_wait_is_answered_at_once() {
    let host = TestHost::start_with(|c| c.serve.max_waiters = 0).await;
    let started = std::time::Instant::now();
    let r = post_waiting(&host, 10).await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.header("preference-applied"), None);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn connections_past_the_cap_wait_to_be_accepted() {
    let host = TestHost::start_with(|c| c.serve.max_connections = 1).await;
    let addr = host.url("").trim_start_matches("http://").to_owned();
    let idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let url = host.url("/healthz");
    let blocked = tokio::time::timeout(Duration::from_millis(700), fresh.get(&url).send()).await;
    assert!(blocked.is_err(), "a second connection was served past the cap");
    drop(idle);
    let r = tokio::time::timeout(Duration::from_secs(5), fresh.get(&url).send()).await;
    assert_eq!(r.expect("served once the first connection closed").unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn a_client_that_trickles_its_headers_is_cut_off_at_the_header_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = TestHost::start_with(|c| c.serve.header_read_timeout = Duration::from_millis(500)).await;
    let addr = host.url("").trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // A request line and one header, then nothing: the head never ends.
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: sagahost\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf)).await;
    let n = read.expect("the connection was held open past the header deadline").unwrap_or(0);
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || answer.starts_with("HTTP/1.1 408"), "expected the connection closed, got {answer:?}");
    assert!(started.elapsed() >= Duration::from_millis(400), "closed before the deadline");
    // A client that sends its head in time is served as usual.
    assert_eq!(host.get("/healthz").await.status, StatusCode::OK);
}

/// A client that pipelines requests for large answers and reads none of them cannot hold its
/// connection for ever (hyper has no write deadline): once writing to it makes no progress for
/// the write-stall timeout, it is closed, and its place under the connection cap goes to the
/// next client.
#[tokio::test]
async fn a_client_that_reads_nothing_is_cut_off_at_the_write_stall_timeout() {
    use tokio::io::AsyncWriteExt;
    let host = TestHost::start_with(|c| {
        c.serve.max_connections = 1;
        c.serve.write_stall_timeout = Duration::from_secs(1);
    })
    .await;
    let addr: std::net::SocketAddr = host.url("").trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut greedy = socket.connect(addr).await.unwrap();
    // 400 answers of the console's script (about 40 KB each): far more than the kernel's
    // buffers on both sides hold.
    let requests = "GET /ui/app.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".repeat(400);
    greedy.write_all(requests.as_bytes()).await.unwrap();
    let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let started = std::time::Instant::now();
    let served = tokio::time::timeout(Duration::from_secs(20), fresh.get(host.url("/healthz")).send()).await;
    let served = served.expect("a client that reads nothing kept the only connection").unwrap();
    assert_eq!(served.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(900), "served before the stall timeout: was the cap held?");
    drop(greedy);
}
