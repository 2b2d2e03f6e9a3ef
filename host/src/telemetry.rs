//! Traces: OpenTelemetry over OTLP/HTTP (protobuf), when an endpoint is configured
//! (`--otlp-endpoint`, or the standard `OTEL_EXPORTER_OTLP_ENDPOINT`).
//!
//! One trace per saga, for its whole life: the intake span's W3C `traceparent` is stored with
//! the saga (`sagas.trace_parent`), and every later span of the saga (a step attempt, its
//! plugin call, the call's outbound requests, a commit) is created with that stored context
//! as its parent. A restart, or another replica taking the saga over, therefore continues the
//! same trace. A saga stored without a context (created with tracing off) gets a trace id
//! derived from its id, the one its outbound `traceparent` always carried.
//!
//! With no endpoint nothing is exported and no span of this module is created: [`enabled`]
//! is one relaxed atomic load, checked before any span is built.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use sha2::{Digest as _, Sha256};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether traces are exported: spans of sagas are built only then.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The exporting tracer provider. Flush it on shutdown with [`Exporter::shutdown`].
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// An OTLP/HTTP exporter to `endpoint` (the collector's base URL; `/v1/traces` is
    /// appended, as for `OTEL_EXPORTER_OTLP_ENDPOINT`), batching on the Tokio runtime. The
    /// `OTEL_BSP_*` variables tune the batches. Must be called inside the runtime.
    pub fn new(endpoint: &str) -> anyhow::Result<Exporter> {
        let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(url)
            .build()?;
        let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
        // `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` are honoured; the name defaults
        // to `sagahost`.
        let mut resource = opentelemetry_sdk::Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("sagahost");
        }
        let resource = resource.build();
        let provider = SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build();
        ENABLED.store(true, Ordering::Relaxed);
        Ok(Exporter { provider })
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans for this exporter.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("sagahost"))
    }

    /// Exports the spans still queued and stops. Blocks a thread of its own, not the runtime.
    pub async fn shutdown(self) {
        let provider = self.provider;
        match tokio::task::spawn_blocking(move || provider.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "flushing traces failed"),
            Err(e) => tracing::warn!(error = %e, "flushing traces failed"),
        }
    }
}

/// The context a W3C `traceparent` names, as a remote parent.
pub fn context_of(traceparent: &str) -> opentelemetry::Context {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    TraceContextPropagator::new().extract(&carrier)
}

/// The context of a saga: the one stored with it, else one derived from its id.
pub fn saga_context(saga_id: &str, stored: Option<&str>) -> opentelemetry::Context {
    match stored {
        Some(tp) => context_of(tp),
        None => context_of(&derived_traceparent(saga_id)),
    }
}

/// A `traceparent` derived from the saga id alone: its trace id is the first 16 bytes of
/// SHA-256(saga id), the trace the saga's outbound requests carry with tracing off.
pub fn derived_traceparent(saga_id: &str) -> String {
    let trace = Sha256::digest(saga_id.as_bytes());
    let span = Sha256::digest(format!("{saga_id}:saga").as_bytes());
    format!("00-{}-{}-01", hex::encode(&trace[..16]), hex::encode(&span[..8]))
}

/// The W3C `traceparent` of `span`, if it is an exported span.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// The trace id in a `traceparent` (for log lines).
pub fn trace_id(traceparent: &str) -> &str {
    traceparent.split('-').nth(1).unwrap_or("")
}

/// Makes `span` a child of `parent` (a context from another process, or stored).
pub fn set_parent(span: &tracing::Span, parent: opentelemetry::Context) {
    let _ = span.set_parent(parent);
}

/// The context of an incoming request's `traceparent` header, if it has one.
pub fn context_from_headers(headers: &http::HeaderMap) -> Option<opentelemetry::Context> {
    let tp = headers.get("traceparent")?.to_str().ok()?;
    let cx = context_of(tp);
    cx.span().span_context().is_valid().then_some(cx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_derived_traceparent_is_w3c_shaped_and_round_trips() {
        let tp = derived_traceparent("o-1");
        let cx = context_of(&tp);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote());
        assert_eq!(sc.trace_id().to_string(), trace_id(&tp));
        assert_eq!(tp, derived_traceparent("o-1"));
    }

    /// What the host's spans do with a stored context: a span parented on it is in its trace
    /// with a span id of its own, and the `traceparent` of a span under it (what an outbound
    /// request carries) names that span's trace and the child's id.
    #[test]
    fn spans_parented_on_a_stored_context_continue_its_trace() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let provider = SdkTracerProvider::builder().build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")));
        tracing::subscriber::with_default(subscriber, || {
            let stored = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
            let step = tracing::info_span!("step");
            set_parent(&step, context_of(stored));
            let step_tp = traceparent_of(&step).expect("an exported span has a context");
            assert_eq!(trace_id(&step_tp), trace_id(stored));
            assert_ne!(step_tp, stored, "a span of its own");
            let out = step.in_scope(|| tracing::info_span!("http.client"));
            let out_tp = traceparent_of(&out).unwrap();
            assert_eq!(trace_id(&out_tp), trace_id(stored));
            assert_ne!(out_tp, step_tp);
            assert_eq!(traceparent_of(&tracing::Span::none()), None, "no span, no context");
        });
    }
}
