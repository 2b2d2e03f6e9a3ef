//! Admin routes for plugins, bindings and saga definitions (SPEC §5.3). Every change is
//! audited: who, when, and the state before and after; the audit row commits in the change's
//! own transaction. Binds and definition changes are compare-and-set on the definition's
//! version: of two concurrent changes, the second gets 409 instead of undoing the first.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::admin::actor;
use super::error::{body_rejection, ApiError, ErrorBody};
use super::sagas::{json_response, parse_body, to_json};
use super::AppState;
use crate::catalog;
use crate::clock::rfc3339;
use crate::engine::definition::is_valid_name;
use crate::engine::{RetryPolicy, SagaDefinition, StepDefinition};
use crate::store::{AuditEntry, DefinitionSource};

/// Largest plugin upload (SPEC §8).
pub const PLUGIN_BODY_LIMIT: usize = 16 << 20;

fn catalog_error(e: catalog::Error) -> ApiError {
    match e {
        catalog::Error::Load(e) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_plugin", e.to_string()),
        catalog::Error::Definition(e) => {
            let crate::engine::definition::DefinitionError::Invalid { field, message } = e;
            ApiError::invalid(field, message)
        }
        catalog::Error::UnknownPlugin { .. } => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "unknown_plugin", e.to_string())
        }
        catalog::Error::NameMismatch { .. } => ApiError::conflict("plugin_name_mismatch", e.to_string()),
        catalog::Error::UnknownSagaType(_) | catalog::Error::UnknownStep { .. } => ApiError::not_found(e.to_string()),
        catalog::Error::Conflict(_) => ApiError::conflict("definition_changed", e.to_string()),
        catalog::Error::Store(e) => e.into(),
    }
}

fn audit(
    headers: &HeaderMap,
    action: &str,
    target: &str,
    before: Option<serde_json::Value>,
    after: Option<serde_json::Value>,
) -> AuditEntry {
    AuditEntry {
        actor: actor(headers),
        action: action.to_owned(),
        target: target.to_owned(),
        before,
        after,
        note: None,
    }
}

/// An uploaded plugin version.
#[derive(Debug, Serialize, ToSchema)]
pub struct UploadedPlugin {
    pub name: String,
    /// `sha256:<hex>` of the component bytes.
    pub digest: String,
    pub size: usize,
}

/// Upload a plugin version (the component bytes, `application/wasm`).
///
/// Validates that the bytes are a component meeting the `step` world and importing only what
/// the host grants (422 with the reason if not), stores it by digest and compiles it. Uploading
/// the same bytes again is a no-op (200). An upload never changes what runs until it is bound.
#[utoipa::path(post, path = "/admin/plugins/{name}", tag = "admin", params(("name" = String, Path)),
    request_body(content = Vec<u8>, content_type = "application/wasm"),
    security(("admin_token" = [])),
    responses((status = 201, body = UploadedPlugin), (status = 200, description = "Already uploaded", body = UploadedPlugin),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn upload_plugin(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if !is_valid_name(&name) {
        return Err(ApiError::invalid(
            "name",
            "use 1-64 lowercase letters, digits, '-' or '_', starting with a letter",
        ));
    }
    let body = body.map_err(body_rejection)?;
    if body.is_empty() {
        return Err(ApiError::invalid(
            "",
            "the body is empty; send the component bytes (Content-Type: application/wasm)",
        ));
    }
    let size = body.len();
    let entry = audit(
        &headers,
        "plugin.upload",
        &crate::runtime::digest_of(&body),
        None,
        Some(serde_json::json!({ "name": name, "size": size })),
    );
    let (digest, new) =
        state.catalog.install_plugin_audited(&name, body.to_vec(), Some(entry)).await.map_err(catalog_error)?;
    let status = if new { StatusCode::CREATED } else { StatusCode::OK };
    Ok(json_response(status, to_json(&UploadedPlugin { name, digest, size })?, None))
}

/// One version of a plugin.
#[derive(Debug, Serialize, ToSchema)]
pub struct PluginVersion {
    pub digest: String,
    pub size: i64,
    pub uploaded_at: String,
}

/// A plugin and its versions, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct PluginView {
    pub name: String,
    pub versions: Vec<PluginVersion>,
}

async fn plugin_views(state: &AppState) -> Result<Vec<PluginView>, ApiError> {
    let mut out: Vec<PluginView> = Vec::new();
    for v in state.store.plugin_versions().await? {
        let version = PluginVersion { digest: v.digest, size: v.size, uploaded_at: rfc3339(v.uploaded_at) };
        match out.last_mut() {
            Some(p) if p.name == v.name => p.versions.push(version),
            _ => out.push(PluginView { name: v.name, versions: vec![version] }),
        }
    }
    Ok(out)
}

/// List plugins and their versions.
#[utoipa::path(get, path = "/admin/plugins", tag = "admin", security(("admin_token" = [])),
    responses((status = 200, body = Vec<PluginView>), (status = 401, body = ErrorBody)))]
pub async fn list_plugins(State(state): State<AppState>) -> Result<Response, ApiError> {
    let views = plugin_views(&state).await?;
    Ok(json_response(StatusCode::OK, to_json(&serde_json::json!({ "data": views }))?, None))
}

/// One plugin's versions.
#[utoipa::path(get, path = "/admin/plugins/{name}", tag = "admin", params(("name" = String, Path)), security(("admin_token" = [])),
    responses((status = 200, body = PluginView), (status = 404, body = ErrorBody)))]
pub async fn get_plugin(State(state): State<AppState>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let view = plugin_views(&state).await?.into_iter().find(|p| p.name == name);
    let view = view.ok_or_else(|| {
        ApiError::not_found(format!("no plugin named '{name}'; upload one with POST /admin/plugins/{name}"))
    })?;
    Ok(json_response(StatusCode::OK, to_json(&view)?, None))
}

/// Query of the state view.
#[derive(Debug, Deserialize, IntoParams)]
pub struct StateQuery {
    /// Only keys starting with this prefix.
    pub prefix: Option<String>,
    /// At most this many entries (1-1000, default 100).
    pub limit: Option<u32>,
}

/// Read-only view of a plugin's state. Values that are JSON are shown as JSON, others as a
/// string of their UTF-8 (lossy).
#[utoipa::path(get, path = "/admin/plugins/{name}/state", tag = "admin", params(("name" = String, Path), StateQuery),
    security(("admin_token" = [])), responses((status = 200, description = "Entries by key"), (status = 400, body = ErrorBody)))]
pub async fn plugin_state(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<StateQuery>,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit", "must be from 1 to 1000"));
    }
    let rows = state.store.state_list(&name, q.prefix.as_deref().unwrap_or(""), limit).await?;
    let data: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|(key, value)| {
            let value = serde_json::from_slice(&value)
                .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&value).into_owned()));
            serde_json::json!({ "key": key, "value": value })
        })
        .collect();
    Ok(json_response(StatusCode::OK, to_json(&serde_json::json!({ "data": data }))?, None))
}

/// `PUT /admin/sagas/{type}/steps/{step}` body: either binding may be omitted.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BindingRequest {
    /// `sha256:...` of an uploaded plugin version.
    pub execute: Option<String>,
    pub compensate: Option<String>,
}

/// A step's bindings.
#[derive(Debug, Serialize, ToSchema)]
pub struct BindingView {
    pub saga_type: String,
    pub step: String,
    pub execute: String,
    pub compensate: String,
}

/// Bind plugin versions to a step (audited, reversible by binding the old digests again).
///
/// New sagas use the new execute binding; every compensation from now on uses the new
/// compensate binding, including those of sagas in flight or stuck.
#[utoipa::path(put, path = "/admin/sagas/{type}/steps/{step}", tag = "admin",
    params(("type" = String, Path), ("step" = String, Path)), request_body = BindingRequest, security(("admin_token" = [])),
    responses((status = 200, body = BindingView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 422, body = ErrorBody)))]
pub async fn bind_step(
    State(state): State<AppState>,
    Path((saga_type, step)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let value = parse_body(body)?;
    let req: BindingRequest = serde_json::from_value(value).map_err(|e| ApiError::invalid("", e))?;
    if req.execute.is_none() && req.compensate.is_none() {
        return Err(ApiError::invalid("", "send at least one of \"execute\" and \"compensate\" (a sha256: digest)"));
    }
    let view =
        |s: &StepDefinition| serde_json::json!({ "execute": s.execute.digest, "compensate": s.compensate.digest });
    let target = format!("{saga_type}/{step}");
    let (_, after) = state
        .catalog
        .bind(&saga_type, &step, req.execute.as_deref(), req.compensate.as_deref(), |before, after| {
            audit(&headers, "binding.change", &target, Some(view(before)), Some(view(after)))
        })
        .await
        .map_err(catalog_error)?;
    tracing::info!(saga_type, step, execute = %after.execute.digest, compensate = %after.compensate.digest, "binding changed");
    let out = BindingView { saga_type, step, execute: after.execute.digest, compensate: after.compensate.digest };
    Ok(json_response(StatusCode::OK, to_json(&out)?, None))
}

/// A step of a saga definition as the admin API shows and accepts it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    pub name: String,
    /// Status label reached when the step completes. Default: `<NAME>_DONE`.
    pub state: Option<String>,
    /// Digest of the execute plugin. Default: the newest version of the plugin named like the step.
    pub execute: Option<String>,
    /// Digest of the compensate plugin. Default: the execute digest.
    pub compensate: Option<String>,
    pub retry: Option<RetrySpec>,
    pub compensate_retry: Option<RetrySpec>,
    /// Default 2000.
    pub timeout_ms: Option<u64>,
    pub deadline_ms: Option<u64>,
}

/// A retry policy as the admin API shows and accepts it: exponential backoff with jitter
/// (attempt n waits up to `min(max_backoff_ms, initial_backoff_ms * 2^(n-1))`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Total attempts, including the first: 1 to 1000.
    pub max_attempts: u32,
    /// At least 1 and at most `max_backoff_ms`.
    pub initial_backoff_ms: u64,
    /// At most 24 hours.
    pub max_backoff_ms: u64,
}

impl From<RetrySpec> for RetryPolicy {
    fn from(r: RetrySpec) -> RetryPolicy {
        RetryPolicy {
            max_attempts: r.max_attempts,
            initial_backoff_ms: r.initial_backoff_ms,
            max_backoff_ms: r.max_backoff_ms,
        }
    }
}

impl From<RetryPolicy> for RetrySpec {
    fn from(r: RetryPolicy) -> RetrySpec {
        RetrySpec {
            max_attempts: r.max_attempts,
            initial_backoff_ms: r.initial_backoff_ms,
            max_backoff_ms: r.max_backoff_ms,
        }
    }
}

/// A saga definition as the admin API shows and accepts it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DefinitionSpec {
    /// Ignored on PUT (the path names the type); set on GET.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub saga_type: Option<String>,
    pub steps: Vec<StepSpec>,
    /// Sensitive input fields as JSON pointers (e.g. `/payment/token`): plugins receive them;
    /// responses, events and logs show `"[redacted]"` instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sensitive: Vec<String>,
}

fn spec_of(def: &SagaDefinition) -> DefinitionSpec {
    DefinitionSpec {
        saga_type: Some(def.saga_type.clone()),
        steps: def
            .steps
            .iter()
            .map(|s| StepSpec {
                name: s.name.clone(),
                state: Some(s.state.clone()),
                execute: Some(s.execute.digest.clone()),
                compensate: Some(s.compensate.digest.clone()),
                retry: Some(s.retry.into()),
                compensate_retry: Some(s.compensate_retry.into()),
                timeout_ms: Some(s.timeout_ms),
                deadline_ms: s.deadline_ms,
            })
            .collect(),
        sensitive: def.sensitive.clone(),
    }
}

async fn definition_of(state: &AppState, saga_type: &str, spec: DefinitionSpec) -> Result<SagaDefinition, ApiError> {
    // Plugins uploaded through another replica a moment ago count as uploaded.
    state.catalog.refresh().await.map_err(catalog_error)?;
    let versions = state.store.plugin_versions().await?;
    let mut steps = Vec::with_capacity(spec.steps.len());
    for (i, s) in spec.steps.into_iter().enumerate() {
        let field = |f: &str| format!("steps[{i}].{f}");
        let execute = match s.execute {
            Some(d) => d,
            None => versions.iter().rev().find(|v| v.name == s.name).map(|v| v.digest.clone()).ok_or_else(|| {
                ApiError::invalid(field("execute"), format!("no plugin named '{}' is uploaded; give a digest", s.name))
            })?,
        };
        let compensate = s.compensate.unwrap_or_else(|| execute.clone());
        let resolve = |f: &str, d: &str| {
            state.catalog.plugin_ref(d).ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "unknown_plugin",
                    format!("{}: plugin {d} is not uploaded; upload it first", field(f)),
                )
            })
        };
        steps.push(StepDefinition {
            state: s.state.unwrap_or_else(|| format!("{}_DONE", s.name.to_ascii_uppercase().replace('-', "_"))),
            execute: resolve("execute", &execute)?,
            compensate: resolve("compensate", &compensate)?,
            name: s.name,
            retry: s.retry.map_or(RetryPolicy::EXECUTE, Into::into),
            compensate_retry: s.compensate_retry.map_or(RetryPolicy::COMPENSATE, Into::into),
            timeout_ms: s.timeout_ms.unwrap_or(2_000),
            deadline_ms: s.deadline_ms,
        });
    }
    Ok(SagaDefinition { saga_type: saga_type.to_owned(), steps, sensitive: spec.sensitive })
}

/// Register or replace a saga definition. New sagas use it; running ones keep theirs.
#[utoipa::path(put, path = "/admin/sagas/{type}", tag = "admin", params(("type" = String, Path)), request_body = DefinitionSpec,
    security(("admin_token" = [])),
    responses((status = 200, body = DefinitionSpec), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn put_definition(
    State(state): State<AppState>,
    Path(saga_type): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let value = parse_body(body)?;
    let spec: DefinitionSpec = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        ApiError::invalid(if path == "." { String::new() } else { path }, e.into_inner())
    })?;
    let def = definition_of(&state, &saga_type, spec).await?;
    // The change replaces what this replica read just now (definition_of refreshed it); if
    // someone else replaced it meanwhile, 409.
    let current = state.catalog.versioned_definition(&saga_type);
    let before = current.as_ref().map(|(d, _)| serde_json::to_value(spec_of(d)).unwrap_or_default());
    let expected = current.map_or(0, |(_, version)| version);
    let after = serde_json::to_value(spec_of(&def)).unwrap_or_default();
    let entry = audit(&headers, "saga.define", &saga_type, before, Some(after));
    state
        .catalog
        .put_definition_checked(def.clone(), DefinitionSource::Admin, Some(expected), Some(&entry))
        .await
        .map_err(catalog_error)?;
    Ok(json_response(StatusCode::OK, to_json(&spec_of(&def))?, None))
}

/// List saga definitions.
#[utoipa::path(get, path = "/admin/sagas", tag = "admin", security(("admin_token" = [])),
    responses((status = 200, description = "Definitions", body = Vec<DefinitionSpec>)))]
pub async fn list_definitions(State(state): State<AppState>) -> Result<Response, ApiError> {
    // Read your writes through any replica: a change made elsewhere shows at once.
    state.catalog.refresh().await.map_err(catalog_error)?;
    let data: Vec<DefinitionSpec> = state.catalog.definitions().iter().map(|d| spec_of(d)).collect();
    Ok(json_response(StatusCode::OK, to_json(&serde_json::json!({ "data": data }))?, None))
}

/// One saga definition.
#[utoipa::path(get, path = "/admin/sagas/{type}", tag = "admin", params(("type" = String, Path)), security(("admin_token" = [])),
    responses((status = 200, body = DefinitionSpec), (status = 404, body = ErrorBody)))]
pub async fn get_definition(
    State(state): State<AppState>,
    Path(saga_type): Path<String>,
) -> Result<Response, ApiError> {
    state.catalog.refresh().await.map_err(catalog_error)?;
    let def = state.catalog.definition(&saga_type).ok_or_else(|| {
        ApiError::not_found(format!("no saga type '{saga_type}'; register it with PUT /admin/sagas/{saga_type}"))
    })?;
    Ok(json_response(StatusCode::OK, to_json(&spec_of(&def))?, None))
}
