//! Traces: the real binary exports OpenTelemetry spans over OTLP/HTTP to a receiver in the
//! test, and a compensated order is one trace under the client's `traceparent`, across a
//! crash and restart too.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;
use serde_json::Value;

use crate::harness::{key, order};
use crate::process::HostProcess;

/// One received span, reduced to what the tests check.
#[derive(Debug, Clone)]
struct Span {
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    attrs: HashMap<String, String>,
}

impl Span {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attrs.get(key).map(String::as_str)
    }
}

/// An OTLP/HTTP (protobuf) receiver on 127.0.0.1: `POST /v1/traces`.
struct Receiver {
    endpoint: String,
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let sink = Arc::clone(&spans);
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let sink = Arc::clone(&sink);
                async move {
                    let req = ExportTraceServiceRequest::decode(body).expect("an ExportTraceServiceRequest");
                    let mut sink = sink.lock().unwrap();
                    for span in req.resource_spans.iter().flat_map(|r| &r.scope_spans).flat_map(|s| &s.spans) {
                        let attrs = span
                            .attributes
                            .iter()
                            .map(|kv| {
                                let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                    Some(AnyValue::StringValue(s)) => s.clone(),
                                    Some(AnyValue::IntValue(i)) => i.to_string(),
                                    Some(AnyValue::BoolValue(b)) => b.to_string(),
                                    Some(AnyValue::DoubleValue(d)) => d.to_string(),
                                    other => format!("{other:?}"),
                                };
                                (kv.key.clone(), v)
                            })
                            .collect();
                        sink.push(Span {
                            trace_id: hex(&span.trace_id),
                            span_id: hex(&span.span_id),
                            parent: hex(&span.parent_span_id),
                            name: span.name.clone(),
                            attrs,
                        });
                    }
                    (
                        [("content-type", "application/x-protobuf")],
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { endpoint, spans }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// The host's environment: export here, in small batches at once.
    fn env(&self) -> [(&'static str, &str); 2] {
        [("OTEL_EXPORTER_OTLP_ENDPOINT", self.endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "50")]
    }

    /// Waits until the spans received satisfy `done`, at most 20 s; the spans either way.
    async fn wait_for(&self, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let start = Instant::now();
        loop {
            let spans = self.spans();
            if done(&spans) || start.elapsed() > Duration::from_secs(20) {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// Submits `body` with the client's `traceparent`; the new order's id.
async fn submit(http: &reqwest::Client, base: &str, body: &Value) -> String {
    post_order(http, base, body, &key()).await.expect("the order is answered")
}

/// Posts an order under `key` with the client's `traceparent`: the saga's id, or `None` if
/// the answer never came (the host died).
async fn post_order(http: &reqwest::Client, base: &str, body: &Value, key: &str) -> Option<String> {
    let r = http
        .post(format!("{base}/orders"))
        .header("Idempotency-Key", key)
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .json(body)
        .send()
        .await
        .ok()?;
    assert_eq!(r.status(), 201);
    let answer = r.json::<Value>().await.ok()?;
    Some(answer["id"].as_str().expect("the saga's id").to_owned())
}

async fn wait_status(http: &reqwest::Client, base: &str, id: &str, status: &str) {
    let start = Instant::now();
    loop {
        let o: Value = http.get(format!("{base}/orders/{id}")).send().await.unwrap().json().await.unwrap();
        if o["status"] == status {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "order {id} is not {status} after 30 s: {o:#}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The spans of saga `id`: those naming it, and the plugin calls under its step spans.
fn saga_spans(spans: &[Span], id: &str) -> Vec<Span> {
    let own: Vec<&Span> = spans.iter().filter(|s| s.attr("saga_id") == Some(id)).collect();
    let steps: HashSet<&str> = own.iter().filter(|s| s.attr("step").is_some()).map(|s| s.span_id.as_str()).collect();
    let calls = spans.iter().filter(|s| s.attr("digest").is_some() && steps.contains(s.parent.as_str()));
    own.into_iter().cloned().chain(calls.cloned()).collect()
}

/// The step attempt spans of `call` (`execute`/`compensate`) of `step`.
fn attempts<'a>(spans: &'a [Span], step: &str, call: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| s.attr("step") == Some(step) && s.attr("call") == Some(call) && s.attr("saga_id").is_some())
        .collect()
}

/// Whether the spans of a declined order's life are all in: its steps and the commit that
/// cancelled it.
fn complete(spans: &[Span], id: &str) -> bool {
    let saga = saga_spans(spans, id);
    let call_of = |step: &Span| saga.iter().any(|c| c.parent == step.span_id && c.attr("digest").is_some());
    let attempt_done = |step, call| attempts(&saga, step, call).iter().any(|s| call_of(s));
    attempt_done("inventory", "execute")
        && attempt_done("payment", "execute")
        && attempt_done("inventory", "compensate")
        && saga.iter().any(|s| s.name == "saga.commit" && s.attr("status") == Some("CANCELLED"))
}

/// Checks the tree of a declined order's spans under `root` (the span every saga span
/// descends from): one trace, the client's; every step attempt of inventory, payment and the
/// inventory compensation with a plugin-call child carrying the digest; commits; every parent
/// link within the tree. `crashed`: the process that took the request died mid-request, so
/// the request's own span (the intake span's parent) may never have been exported; the
/// intake span must still be in the client's trace.
fn check_tree(spans: &[Span], id: &str, root: &str, crashed: bool) {
    let saga = saga_spans(spans, id);
    let dump = || saga.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join("\n");
    assert!(complete(spans, id), "not every span of the order arrived:\n{}", dump());
    for s in &saga {
        assert_eq!(s.trace_id, CLIENT_TRACE, "a span of the saga is in another trace: {s:?}");
    }
    // One tree: every parent is the root or another span of the trace.
    let in_trace: HashSet<&str> =
        spans.iter().filter(|s| s.trace_id == CLIENT_TRACE).map(|s| s.span_id.as_str()).collect();
    for s in &saga {
        if crashed && s.name == "saga.intake" {
            continue;
        }
        assert!(
            s.parent == root || in_trace.contains(s.parent.as_str()),
            "span {s:?} hangs off neither {root} nor another span of the trace:\n{}",
            dump()
        );
    }
    for (step, call) in [("inventory", "execute"), ("payment", "execute"), ("inventory", "compensate")] {
        for attempt in attempts(&saga, step, call) {
            assert_eq!(attempt.parent, root, "{call} {step} is a child of the saga's stored context");
            let plugin = saga.iter().find(|c| c.parent == attempt.span_id && c.attr("digest").is_some());
            let plugin = plugin.unwrap_or_else(|| panic!("{call} {step} has no plugin call span:\n{}", dump()));
            assert!(plugin.attr("digest").unwrap().starts_with("sha256:"), "{plugin:?}");
            assert_eq!(plugin.attr("plugin"), Some(step), "{plugin:?}");
        }
    }
    let commits: Vec<&Span> = saga.iter().filter(|s| s.name == "saga.commit").collect();
    assert!(!commits.is_empty(), "no commit spans:\n{}", dump());
    for c in commits {
        assert_eq!(c.parent, root, "a commit is a child of the saga's stored context: {c:?}");
    }
}

#[tokio::test]
async fn a_compensated_order_is_one_trace_under_the_clients_traceparent() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let host = HostProcess::spawn(dir.path(), None, &receiver.env()).await;
    let http = reqwest::Client::new();
    let id = submit(&http, &host.base, &order("tok_decline", "SKU-1", "US")).await;
    wait_status(&http, &host.base, &id, "CANCELLED").await;
    // `wait_status` polls GET /orders/{id}: its spans are named by the route, not the path.
    let spans = receiver.wait_for(|s| complete(s, &id) && s.iter().any(|s| s.name == "GET /orders/{id}")).await;
    let named_by_path: Vec<&str> = spans.iter().map(|s| s.name.as_str()).filter(|n| n.contains(&id)).collect();
    assert!(named_by_path.is_empty(), "span names carry the saga id: {named_by_path:?}");
    // The intake span: a child of the request's span, whose parent is the client's span.
    let intake = spans
        .iter()
        .find(|s| s.name == "saga.intake" && s.attr("saga_id") == Some(id.as_str()))
        .unwrap_or_else(|| panic!("no intake span among {spans:#?}"));
    assert_eq!(intake.trace_id, CLIENT_TRACE);
    let request = spans.iter().find(|s| s.span_id == intake.parent).expect("the request span of POST /orders");
    assert_eq!((request.name.as_str(), request.trace_id.as_str()), ("POST /orders", CLIENT_TRACE));
    assert_eq!(request.parent, CLIENT_SPAN, "the request's span is a child of the client's");
    check_tree(&spans, &id, &intake.span_id, false);
    // A graceful stop flushes the exporter and still exits 0.
    let status = host.terminate(Duration::from_secs(20)).await;
    assert!(status.success(), "SIGTERM with traces on must exit 0, got {status}");
}

#[tokio::test]
async fn a_saga_resumed_after_a_crash_stays_in_its_trace() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The host dies after the second plugin call (payment), before committing it.
    let mut host = HostProcess::spawn(dir.path(), Some("driver-after-call=abort@2"), &receiver.env()).await;
    let http = reqwest::Client::new();
    let body = order("tok_decline", "SKU-1", "US");
    let idempotency_key = key();
    // The two calls can be over before the 201 is written (they take microseconds): then the
    // abort cuts the answer off, and the client asks again with the same key, as any would.
    let first = {
        let (http, base, body, k) = (http.clone(), host.base.clone(), body.clone(), idempotency_key.clone());
        tokio::spawn(async move { post_order(&http, &base, &body, &k).await })
    };
    host.wait_failpoint("driver-after-call", 2, Duration::from_secs(30)).await;
    // Restarted, another process (another tracer) finishes the saga: in the same trace, under
    // the intake span whose context was stored with the saga.
    let host = HostProcess::spawn(dir.path(), None, &receiver.env()).await;
    let id = match first.await.unwrap() {
        Some(id) => id,
        None => post_order(&http, &host.base, &body, &idempotency_key).await.expect("the retry is answered"),
    };
    wait_status(&http, &host.base, &id, "CANCELLED").await;
    let store = crate::harness::open_store(dir.path()).await;
    let stored = store.saga(&id).await.unwrap().unwrap().trace_parent.expect("a stored trace context");
    let parts: Vec<&str> = stored.split('-').collect();
    assert_eq!(parts[1], CLIENT_TRACE, "the stored context is in the client's trace: {stored}");
    let spans = receiver.wait_for(|s| complete(s, &id)).await;
    check_tree(&spans, &id, parts[2], true);
    host.kill().await;
}

/// A plugin's outbound requests are spans under its call, and carry their context: the
/// `order-http` saga against the demo services, declined, so that a compensation calls out too.
#[tokio::test]
async fn outbound_requests_of_plugins_are_spans_under_their_call() {
    use crate::services::{Api, Services, TOKEN};
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = receiver.env().to_vec();
    env.push(("SAGAHOST_ADMIN_TOKEN", TOKEN));
    let host = HostProcess::spawn(dir.path(), None, &env).await;
    let api = Api::new(&host.base);
    let services = Services::start(&host.base, &[], &[]).await;
    services.grant(&api).await;
    api.define("order-http", &services.definition()).await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/sagas/order-http", host.base))
        .header("Idempotency-Key", key())
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .json(&order("tok_decline", "SKU-1", "US"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let start = Instant::now();
    loop {
        let url = format!("{}/sagas/order-http/{id}", host.base);
        let s: Value = http.get(url).send().await.unwrap().json().await.unwrap();
        if s["status"] == "CANCELLED" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "saga {id} is not CANCELLED after 30 s: {s:#}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Each plugin call of inventory (reserve, then release) made a request: a client span,
    // a child of the call, in the client's trace, with the service's answer.
    let outbound_of = |spans: &[Span], step: &str, call: &str| -> Vec<Span> {
        let saga = saga_spans(spans, &id);
        let attempts: HashSet<String> = attempts(&saga, step, call).iter().map(|s| s.span_id.clone()).collect();
        let calls: HashSet<String> = saga
            .iter()
            .filter(|c| c.attr("digest").is_some() && attempts.contains(&c.parent))
            .map(|c| c.span_id.clone())
            .collect();
        spans.iter().filter(|s| calls.contains(&s.parent) && s.attr("url.full").is_some()).cloned().collect()
    };
    let spans = receiver
        .wait_for(|s| {
            !outbound_of(s, "inventory", "execute").is_empty() && !outbound_of(s, "inventory", "compensate").is_empty()
        })
        .await;
    for call in ["execute", "compensate"] {
        let out = outbound_of(&spans, "inventory", call);
        assert!(!out.is_empty(), "no outbound span under inventory's {call} call among {spans:#?}");
        for s in out {
            assert_eq!(s.trace_id, CLIENT_TRACE, "{s:?}");
            assert!(s.attr("url.full").unwrap().starts_with("http://127.0.0.1:"), "{s:?}");
            assert!(s.attr("http.response.status_code").is_some(), "{s:?}");
        }
    }
    host.kill().await;
}
