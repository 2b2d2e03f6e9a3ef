//! The HTTP API (axum): routes, shared state, limits and the OpenAPI document.
//!
//! The web console (`ui.rs`, `/ui/`) is served from here too: files embedded at build time.
//!
//! Architecture invariant: handlers never call plugins or Kafka. They validate, read and write
//! through the store, and wake the driver; the driver does the work.

pub mod admin;
pub mod dead_letters;
pub mod error;
pub mod grants;
pub mod history;
pub mod idempotency;
pub mod limits;
pub mod openapi;
pub mod orders;
pub mod origin;
pub mod plugins;
pub mod sagas;
pub mod ui;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::catalog::Catalog;
use crate::clock::Clock;
use crate::driver::DriverHandle;
use crate::store::Store;
use error::ApiError;

/// Largest body on order and saga routes (SPEC §8).
pub const SAGA_BODY_LIMIT: usize = 64 << 10;

/// Settings the HTTP layer needs.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// How long idempotency keys are remembered (at least 24 h in production).
    pub idempotency_ttl: Duration,
    /// Bearer token of the admin routes; `None` turns them off (403).
    pub admin_token: Option<String>,
    /// Bearer tokens of the client routes (`/orders`, `/sagas`); empty leaves them open.
    pub api_tokens: Vec<String>,
    /// Other processes may commit to the same database (PostgreSQL replicas): `Prefer: wait`
    /// must re-read the store to see their progress, not only listen to this process.
    pub shared_database: bool,
    /// The secrets directory credentials name (`--outbound-secrets-dir`): a grant's
    /// credential must name secrets found there.
    pub secrets: Option<crate::secrets::Secrets>,
    /// What requests from browsers must show ([`origin`]).
    pub browsers: Arc<origin::Browsers>,
}

/// Shared state of every handler: cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    /// Every saga change goes through here.
    pub sagas: Arc<crate::saga::Sagas>,
    pub catalog: Arc<Catalog>,
    pub driver: DriverHandle,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub config: Arc<HttpConfig>,
    pub gates: Arc<limits::Gates>,
}

/// Builds the router and the OpenAPI document from the same route list.
pub fn router(state: AppState) -> Router {
    let (saga_routes, mut api) = OpenApiRouter::new()
        .routes(routes!(orders::create_order, orders::list_orders))
        .routes(routes!(orders::get_order))
        .routes(routes!(orders::cancel_order))
        .routes(routes!(orders::signal_order))
        .routes(routes!(sagas::create_saga, sagas::list_sagas))
        .routes(routes!(sagas::get_saga))
        .routes(routes!(sagas::cancel_saga))
        .routes(routes!(sagas::signal_saga))
        .routes(routes!(history::saga_events))
        .layer(DefaultBodyLimit::max(SAGA_BODY_LIMIT))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), admin::require_client))
        .split_for_parts();
    openapi::client_routes(&mut api);
    let (upload_routes, mut upload_api) = OpenApiRouter::new()
        .routes(routes!(plugins::upload_plugin))
        .layer(DefaultBodyLimit::max(plugins::PLUGIN_BODY_LIMIT))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), admin::require_admin))
        .split_for_parts();
    openapi::admin_routes(&mut upload_api, "16 MiB");
    api.merge(upload_api);
    let (admin_routes, mut admin_api) = OpenApiRouter::new()
        .routes(routes!(admin::retry_saga))
        .routes(routes!(admin::resolve_saga))
        .routes(routes!(admin::audit_log))
        .routes(routes!(dead_letters::list_dead_letters))
        .routes(routes!(dead_letters::redeliver_dead_letter))
        .routes(routes!(dead_letters::discard_dead_letter))
        .routes(routes!(plugins::list_plugins))
        .routes(routes!(plugins::get_plugin))
        .routes(routes!(plugins::plugin_state))
        .routes(routes!(grants::put_grants, grants::get_grants))
        .routes(routes!(plugins::bind_step))
        .routes(routes!(plugins::put_definition, plugins::get_definition))
        .routes(routes!(plugins::list_definitions))
        .layer(DefaultBodyLimit::max(SAGA_BODY_LIMIT))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), admin::require_admin))
        .split_for_parts();
    openapi::admin_routes(&mut admin_api, "64 KiB");
    api.merge(admin_api);
    let (health_routes, health_api) = OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .split_for_parts();
    api.merge(health_api);
    openapi::every_route(&mut api);
    let mut doc = openapi::ApiDoc::openapi();
    doc.merge(api);
    let mut doc = serde_json::to_value(doc).expect("the OpenAPI document serialises");
    openapi::links(&mut doc);
    let api = Arc::new(doc);
    Router::new()
        .merge(saga_routes)
        .merge(admin_routes)
        .merge(upload_routes)
        .merge(health_routes)
        .merge(ui::routes())
        .route("/openapi.json", axum::routing::get(move || async move { Json(api.as_ref().clone()) }))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state.gates), limits::guard))
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state.config.browsers), origin::guard))
        .layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(request_span))
        .with_state(state)
}

/// The span of one request: as tower-http's default (debug) with traces off; with traces on an
/// exported server span whose parent is the request's `traceparent`, when it has one. A saga
/// created by the request is a child of it, so a client's trace contains the saga's.
fn request_span(req: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    if !crate::telemetry::enabled() {
        return tracing::debug_span!("request", method = %req.method(), uri = %req.uri(), version = ?req.version());
    }
    // Named by the route template (`GET /orders/{id}`), never the path itself, as
    // OpenTelemetry's HTTP conventions ask: span names are grouped on, and a path carries ids
    // (and whatever a scanner sends). A request no route matched is named by its method only.
    let name = match req.extensions().get::<axum::extract::MatchedPath>() {
        Some(route) => format!("{} {}", req.method(), route.as_str()),
        None => req.method().to_string(),
    };
    let span = tracing::info_span!(
        "request",
        otel.name = %name,
        otel.kind = "server",
        method = %req.method(),
        uri = %req.uri(),
    );
    if let Some(parent) = crate::telemetry::context_from_headers(req.headers()) {
        crate::telemetry::set_parent(&span, parent);
    }
    span
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see /openapi.json for the API")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method; see /openapi.json",
    )
}

/// The body of `/healthz` and `/readyz`.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct Status {
    /// `ok` (healthz) or `ready` (readyz).
    #[schema(example = "ok")]
    status: &'static str,
}

/// Liveness: the process is up.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "The process is up", body = Status)))]
async fn healthz() -> Json<Status> {
    Json(Status { status: "ok" })
}

/// Metrics in the OpenMetrics text format: sagas by status, plugin calls by outcome and their
/// latency, events published, outbox backlog and relay lag.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "OpenMetrics text", body = String,
               content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8")))]
async fn metrics(State(state): State<AppState>) -> Response {
    // Types registered since the start (here or through another replica) count from 0 too.
    state.metrics.saga_types(state.catalog.definitions().iter().map(|d| d.saga_type.as_str()));
    match state.metrics.render(state.store.as_ref(), state.clock.now_ms(), state.catalog.version()).await {
        Ok(text) => {
            ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
                .into_response()
        }
        Err(e) => ApiError::unavailable(e).into_response(),
    }
}

/// Readiness: the database answers and the plugins are loaded.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "Ready", body = Status),
              (status = 503, description = "Not ready: the database does not answer or the plugins are not loaded yet", body = error::ErrorBody,
               headers(("Retry-After" = u64, description = "Seconds to wait before asking again")))))]
async fn readyz(State(state): State<AppState>) -> Response {
    if let Err(e) = state.store.ping().await {
        return ApiError::unavailable(e).into_response();
    }
    if crate::builtin::ALL.iter().any(|b| state.catalog.definition(b.saga_type).is_none()) {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "plugins are not loaded yet; retry shortly",
        )
        .with_retry_after(1)
        .into_response();
    }
    Json(Status { status: "ready" }).into_response()
}
