//! Admin routes for plugins, bindings and saga definitions (SPEC §5.3). Every change is
//! audited: who, when, and the state before and after; the audit row commits in the change's
//! own transaction. Binds and definition changes are compare-and-set on the definition's
//! version: of two concurrent changes, the second gets 409 instead of undoing the first.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::admin::{audit, ActorHeader};
use super::error::{body_rejection, ApiError, ApiPath, ErrorBody};
use super::openapi::OptionalKey;
use super::sagas::{answered_in_commit, idempotent, idempotent_within, json_response, parse_body, to_json};
use super::AppState;
use crate::catalog;
use crate::clock::rfc3339;
use crate::engine::definition::{is_valid_name, DefinitionError};
use crate::engine::{RetryPolicy, SagaDefinition, StepDefinition};
use crate::store::DefinitionSource;

/// Largest plugin upload body (SPEC §8), as sent: compressed, when it is.
pub const PLUGIN_BODY_LIMIT: usize = 16 << 20;

/// Largest component, once a compressed upload is decompressed. JavaScript and Python
/// components carry their language's runtime (12-19 MiB before any library), so they are
/// uploaded compressed (`Content-Encoding: zstd`, which `sagahost plugins upload` sends).
pub const PLUGIN_COMPONENT_LIMIT: usize = 64 << 20;

/// The component bytes of an upload body: the body itself, or its zstd decompression when
/// `Content-Encoding: zstd` says so (at most [`PLUGIN_COMPONENT_LIMIT`] bytes, checked while
/// decompressing, so a small bomb cannot make the host allocate more).
async fn component_bytes(headers: &HeaderMap, body: Bytes) -> Result<Bytes, ApiError> {
    let encoding = match headers.get(axum::http::header::CONTENT_ENCODING) {
        None => return Ok(body),
        Some(v) => v.to_str().unwrap_or("").trim().to_ascii_lowercase(),
    };
    match encoding.as_str() {
        "identity" => Ok(body),
        "zstd" => tokio::task::spawn_blocking(move || decompress(&body))
            .await
            .map_err(|e| ApiError::internal(format!("the decompression task failed: {e}")))?,
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_encoding",
            format!(
                "Content-Encoding '{encoding}' is not supported; send the component as is, or compressed with \
                 Content-Encoding: zstd"
            ),
        )),
    }
}

fn decompress(body: &[u8]) -> Result<Bytes, ApiError> {
    use std::io::Read;
    let invalid = |e: std::io::Error| {
        ApiError::invalid("", format!("the body is not valid zstd data (Content-Encoding: zstd): {e}"))
    };
    let decoder = zstd::stream::read::Decoder::with_buffer(body).map_err(invalid)?;
    let mut component = Vec::new();
    decoder.take(PLUGIN_COMPONENT_LIMIT as u64 + 1).read_to_end(&mut component).map_err(invalid)?;
    if component.len() > PLUGIN_COMPONENT_LIMIT {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "component_too_large",
            format!("the component is over {} MiB once decompressed", PLUGIN_COMPONENT_LIMIT >> 20),
        ));
    }
    Ok(Bytes::from(component))
}

fn catalog_error(e: catalog::Error) -> ApiError {
    match e {
        catalog::Error::Load(e) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_plugin", e.to_string()),
        catalog::Error::Definition(DefinitionError::Invalid { field, message }) => ApiError::invalid(field, message),
        // Both digests are valid on their own; what they name on this server does not fit.
        catalog::Error::Definition(DefinitionError::PluginMismatch { field, message }) => ApiError {
            field: Some(field.clone()),
            ..ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "plugin_mismatch", format!("{field}: {message}"))
        },
        catalog::Error::UnknownPlugin { .. } => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "unknown_plugin", e.to_string())
        }
        catalog::Error::NameMismatch { .. } => ApiError::conflict("plugin_name_mismatch", e.to_string()),
        catalog::Error::UnknownSagaType(_) | catalog::Error::UnknownStep { .. } => ApiError::not_found(e.to_string()),
        catalog::Error::Conflict(_) => ApiError::conflict("definition_changed", e.to_string()),
        catalog::Error::Store(e) => e.into(),
        catalog::Error::NotLoaded(catalog::NotLoaded::Unavailable(why)) => ApiError::unavailable(why),
        catalog::Error::NotLoaded(not) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "plugin_not_loadable", not.to_string())
        }
    }
}

/// The body of an upload: the component's bytes.
pub struct ComponentBytes;

impl utoipa::PartialSchema for ComponentBytes {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .min_length(Some(1))
            .max_length(Some(PLUGIN_BODY_LIMIT))
            .description(Some(
                "A WebAssembly component meeting the step world (wit/), as is or compressed with zstd \
                 (Content-Encoding: zstd; at most 64 MiB once decompressed)",
            ))
            .into()
    }
}

impl ToSchema for ComponentBytes {}

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
///
/// The request's `Content-Type` is not checked: `application/wasm` and
/// `application/octet-stream` are the documented ones. The body may be compressed with zstd
/// (`Content-Encoding: zstd`): the 16 MiB limit applies to the body as sent, 64 MiB to the
/// component; the digest and `size` are the component's.
#[utoipa::path(post, path = "/admin/plugins/{name}", tag = "admin", params(
           ("name" = String, Path, description = "A plugin name: 1-64 lowercase letters, digits, `-` or `_`, starting with a letter", pattern = "^[a-z][a-z0-9_-]{0,63}$"), ActorHeader, OptionalKey),
    request_body(content((ComponentBytes = "application/wasm"), (ComponentBytes = "application/octet-stream"))),
    responses((status = 201, description = "Uploaded", body = UploadedPlugin),
              (status = 200, description = "Already uploaded", body = UploadedPlugin),
              (status = 400, description = "An invalid plugin name or an empty body", body = ErrorBody),
              (status = 409, description = "These bytes are uploaded under another name, or a request with this key is still in flight", body = ErrorBody,
               headers(("Retry-After" = u64, description = "Seconds to wait before retrying (a key in flight)"))),
              (status = 413, description = "The body is over 16 MiB, or the component over 64 MiB once decompressed", body = ErrorBody),
              (status = 415, description = "A Content-Encoding other than zstd or identity", body = ErrorBody),
              (status = 422, description = "Not a component meeting the step world, or it imports what the host does not grant", body = ErrorBody)))]
pub async fn upload_plugin(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
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
    let body = component_bytes(&headers, body).await?;
    let size = body.len();
    let digest = crate::runtime::digest_of(&body);
    let route = format!("POST /admin/plugins/{name}");
    // The request is its bytes: keyed by their digest (SPEC §5.1).
    let fingerprint = serde_json::json!({ "digest": digest });
    // An upload compiles before it answers: its key is held for an upload's deadline.
    let deadline = state.gates.deadline(true);
    let (state, headers, name, digest, body) = (&state, &headers, &name, &digest, &body);
    idempotent_within(state, headers, route, &fingerprint, deadline, |key| async move {
        let answer = to_json(&UploadedPlugin { name: name.clone(), digest: digest.clone(), size })?;
        let mut entry =
            audit(headers, "plugin.upload", digest, None, Some(serde_json::json!({ "name": name, "size": size })));
        // The 201 of a new version is stored with it (the entry is written only then); a
        // version stored before answers 200, stored afterwards.
        entry.answer = key.as_ref().map(|k| k.answer(StatusCode::CREATED, &answer));
        // A component the host refuses is a validation error: not stored under the key.
        let (_, new) = state
            .catalog
            .install_plugin_audited(name, body.to_vec(), Some(entry))
            .await
            .map_err(|e| catalog_error(e).provisional())?;
        if new {
            return Ok(answered_in_commit(json_response(StatusCode::CREATED, answer, None), key.as_ref()));
        }
        Ok(json_response(StatusCode::OK, answer, None))
    })
    .await
}

/// One version of a plugin.
#[derive(Debug, Serialize, ToSchema)]
pub struct PluginVersion {
    pub digest: String,
    pub size: i64,
    pub uploaded_at: String,
    /// The `sagahost:plugin` version it targets (`0.1.0`, `0.2.0`); null if this replica has
    /// not loaded it.
    #[schema(example = "0.2.0")]
    pub world: Option<String>,
    /// It imports `wasi:http/outgoing-handler`: it can call the origins granted to the plugin
    /// (`/admin/plugins/{name}/grants`); null if this replica has not loaded it.
    pub outbound_http: Option<bool>,
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
        let caps = state.catalog.capabilities(&v.digest);
        let version = PluginVersion {
            digest: v.digest,
            size: v.size,
            uploaded_at: rfc3339(v.uploaded_at),
            world: caps.map(|c| c.world.to_owned()),
            outbound_http: caps.map(|c| c.outbound_http),
        };
        match out.last_mut() {
            Some(p) if p.name == v.name => p.versions.push(version),
            _ => out.push(PluginView { name: v.name, versions: vec![version] }),
        }
    }
    Ok(out)
}

/// Every plugin and its versions.
#[derive(Debug, Serialize, ToSchema)]
pub struct PluginList {
    pub data: Vec<PluginView>,
}

/// List plugins and their versions.
#[utoipa::path(get, path = "/admin/plugins", tag = "admin", responses((status = 200, body = PluginList)))]
pub async fn list_plugins(State(state): State<AppState>) -> Result<Response, ApiError> {
    let data = plugin_views(&state).await?;
    Ok(json_response(StatusCode::OK, to_json(&PluginList { data })?, None))
}

/// 404 for a plugin name that is not valid: it names no plugin.
pub(super) fn check_plugin_name(name: &str) -> Result<(), ApiError> {
    if is_valid_name(name) {
        return Ok(());
    }
    Err(ApiError::not_found(
        "no such plugin; plugin names are 1-64 lowercase letters, digits, '-' or '_', starting with a letter",
    ))
}

/// One plugin's versions.
#[utoipa::path(get, path = "/admin/plugins/{name}", tag = "admin", params(
           ("name" = String, Path, description = "A plugin name: 1-64 lowercase letters, digits, `-` or `_`, starting with a letter", pattern = "^[a-z][a-z0-9_-]{0,63}$")),
    responses((status = 200, body = PluginView), (status = 404, description = "No plugin of this name", body = ErrorBody)))]
pub async fn get_plugin(State(state): State<AppState>, ApiPath(name): ApiPath<String>) -> Result<Response, ApiError> {
    check_plugin_name(&name)?;
    let view = plugin_views(&state).await?.into_iter().find(|p| p.name == name);
    let view = view.ok_or_else(|| {
        ApiError::not_found(format!("no plugin named '{name}'; upload one with POST /admin/plugins/{name}"))
    })?;
    Ok(json_response(StatusCode::OK, to_json(&view)?, None))
}

/// Query of the state view.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StateQuery {
    /// Only keys starting with this prefix.
    #[param(max_length = 1024, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*$")]
    pub prefix: Option<String>,
    /// At most this many entries (1-1000, default 100), fewer once their values reach 4 MiB.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page: the entries after it.
    #[param(max_length = 8192, pattern = "^([0-9a-f]{2})*$")]
    pub cursor: Option<String>,
}

/// One entry of a plugin's state.
#[derive(Debug, Serialize, ToSchema)]
pub struct StateEntry {
    pub key: String,
    /// The value as JSON if it is JSON, else a string of its UTF-8 (lossy).
    pub value: serde_json::Value,
}

/// Entries of a plugin's state, by key.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatePage {
    pub data: Vec<StateEntry>,
    /// Pass as `cursor` for the next page; `null` on the last one. Opaque (hex: a key may
    /// hold any character but NUL, which a URL or a terminal would not carry as it is).
    pub next_cursor: Option<String>,
}

/// Read-only view of a plugin's state. Values that are JSON are shown as JSON, others as a
/// string of their UTF-8 (lossy). A plugin that has no state (or does not exist) has no entries.
#[utoipa::path(get, path = "/admin/plugins/{name}/state", tag = "admin", params(
           ("name" = String, Path, description = "A plugin name: 1-64 lowercase letters, digits, `-` or `_`, starting with a letter", pattern = "^[a-z][a-z0-9_-]{0,63}$"), StateQuery),
    responses((status = 200, description = "Entries by key", body = StatePage),
              (status = 400, description = "A query parameter is out of bounds", body = ErrorBody),
              (status = 404, description = "Not a valid plugin name", body = ErrorBody)))]
pub async fn plugin_state(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    q: Result<Query<StateQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    check_plugin_name(&name)?;
    let q = super::error::query(q)?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit", "must be from 1 to 1000"));
    }
    let prefix = q.prefix.as_deref().unwrap_or("");
    // A NUL cannot be stored in PostgreSQL text: refuse control characters up front.
    if prefix.chars().count() > 1024 || prefix.chars().any(char::is_control) {
        return Err(ApiError::invalid("prefix", "must be at most 1024 characters without control characters"));
    }
    let after = match &q.cursor {
        None => None,
        Some(cursor) => {
            let bytes = hex::decode(cursor).map_err(|_| {
                ApiError::invalid(
                    "cursor",
                    "is not a cursor this API returned; pass next_cursor from the previous page",
                )
            })?;
            // The API's cursors are keys. Any other hex still reads as a place in key order:
            // up to a NUL (no key holds one, so the keys after "a\0..." are those after "a";
            // and PostgreSQL text cannot carry it), invalid UTF-8 read leniently.
            let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
            Some(String::from_utf8_lossy(&bytes[..end]).into_owned())
        }
    };
    // One more than asked, to know whether there are more; a page whose values reached the
    // store's page bound may have been cut there, so it says where to go on too.
    let mut rows = state.store.state_scan(&name, prefix, after.as_deref(), limit + 1).await?;
    let cut = rows.iter().map(|(_, v)| v.len()).sum::<usize>() >= crate::store::STATE_PAGE_BYTES;
    let more = rows.len() > limit as usize || cut;
    rows.truncate(limit as usize);
    let next_cursor = if more { rows.last().map(|(key, _)| hex::encode(key)) } else { None };
    let data = rows
        .into_iter()
        .map(|(key, value)| {
            let value = serde_json::from_slice(&value)
                .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&value).into_owned()));
            StateEntry { key, value }
        })
        .collect();
    Ok(json_response(StatusCode::OK, to_json(&StatePage { data, next_cursor })?, None))
}

/// `PUT /admin/sagas/{type}/steps/{step}` body: either binding may be omitted, not both.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingRequest {
    /// `sha256:...` of an uploaded plugin version.
    pub execute: Option<String>,
    pub compensate: Option<String>,
}

impl utoipa::PartialSchema for BindingRequest {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        binding_request_schema().into()
    }
}

impl ToSchema for BindingRequest {}

/// A plugin digest as the API writes it.
pub const DIGEST_PATTERN: &str = "^sha256:[0-9a-f]{64}$";

/// `BindingRequest`: at least one of the two is a digest (the other may be absent or null).
fn binding_request_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{AdditionalProperties, AllOfBuilder, AnyOfBuilder, ObjectBuilder, SchemaType, Type};
    let digest = || ObjectBuilder::new().schema_type(Type::String).pattern(Some(DIGEST_PATTERN));
    let nullable = |description: &str| {
        ObjectBuilder::new()
            .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
            .pattern(Some(DIGEST_PATTERN))
            .description(Some(description))
    };
    let requires = |field: &str| ObjectBuilder::new().property(field, digest()).required(field);
    let fields = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("execute", nullable("`sha256:...` of an uploaded plugin version for execute"))
        .property("compensate", nullable("`sha256:...` of an uploaded plugin version for compensate"))
        .additional_properties(Some(AdditionalProperties::FreeForm(false)));
    AllOfBuilder::new()
        .item(fields)
        .item(AnyOfBuilder::new().item(requires("execute")).item(requires("compensate")))
        .description(Some("Either binding may be omitted or null, not both"))
        .into()
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
    params(
           ("type" = String, Path, description = "A saga type name: 1-64 lowercase letters, digits, `-` or `_`, starting with a letter", pattern = "^[a-z][a-z0-9_-]{0,63}$"), 
           ("step" = String, Path, description = "A step name: 1-64 lowercase letters, digits, `-` or `_`, starting with a letter", pattern = "^[a-z][a-z0-9_-]{0,63}$"), ActorHeader, OptionalKey), request_body = BindingRequest,
    responses((status = 200, description = "Bound", body = BindingView),
              (status = 400, description = "The body is not a binding", body = ErrorBody),
              (status = 404, description = "No such saga type or step", body = ErrorBody),
              (status = 409, description = "The definition changed meanwhile, or the plugin's name differs from the bound one", body = ErrorBody),
              (status = 422, description = "A digest names no uploaded plugin version", body = ErrorBody)))]
pub async fn bind_step(
    State(state): State<AppState>,
    ApiPath((saga_type, step)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let value = parse_body(body)?;
    let req: BindingRequest = serde_json::from_value(value).map_err(|e| ApiError::invalid("", e))?;
    if req.execute.is_none() && req.compensate.is_none() {
        return Err(ApiError::invalid("", "send at least one of \"execute\" and \"compensate\" (a sha256: digest)"));
    }
    // Before anything is written under the key (a name the database would refuse is a 404
    // here, not a 500 there).
    if !is_valid_name(&saga_type) || !is_valid_name(&step) {
        return Err(ApiError::not_found(format!(
            "no step '{}' in a saga type '{}'; names are 1-64 lowercase letters, digits, '-' or '_'",
            step.chars().filter(|c| !c.is_control()).take(64).collect::<String>(),
            saga_type.chars().filter(|c| !c.is_control()).take(64).collect::<String>()
        )));
    }
    let view =
        |s: &StepDefinition| serde_json::json!({ "execute": s.execute.digest, "compensate": s.compensate.digest });
    let target = format!("{saga_type}/{step}");
    let route = format!("PUT /admin/sagas/{saga_type}/steps/{step}");
    let fingerprint = serde_json::json!({ "execute": req.execute, "compensate": req.compensate });
    let (state, headers, saga_type, step, target, req) = (&state, &headers, &saga_type, &step, &target, &req);
    let answer = |after: &StepDefinition| {
        let out = BindingView {
            saga_type: saga_type.clone(),
            step: step.clone(),
            execute: after.execute.digest.clone(),
            compensate: after.compensate.digest.clone(),
        };
        serde_json::to_vec(&out).unwrap_or_default()
    };
    idempotent(state, headers, route, &fingerprint, |key| async move {
        // Refusals (an unknown digest, another plugin's version, a concurrent change) are not
        // stored under the key; the answer is, with the change.
        let (_, after) = state
            .catalog
            .bind(saga_type, step, req.execute.as_deref(), req.compensate.as_deref(), |before, after| {
                let mut entry = audit(headers, "binding.change", target, Some(view(before)), Some(view(after)));
                entry.answer = key.as_ref().map(|k| k.answer(StatusCode::OK, &answer(after)));
                entry
            })
            .await
            .map_err(|e| catalog_error(e).provisional())?;
        tracing::info!(saga_type, step, execute = %after.execute.digest, compensate = %after.compensate.digest, "binding changed");
        Ok(answered_in_commit(json_response(StatusCode::OK, answer(&after), None), key.as_ref()))
    })
    .await
}

/// A step of a saga definition as the admin API shows and accepts it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// Unique within the definition.
    #[schema(pattern = "^[a-z][a-z0-9_-]{0,63}$")]
    pub name: String,
    /// Status label reached when the step completes, unique within the definition and not one
    /// of CREATED, COMPLETED, COMPENSATING, CANCELLED, COMPENSATION_FAILED. Default:
    /// `<NAME>_DONE`.
    #[schema(pattern = "^[A-Z0-9_]{1,64}$")]
    pub state: Option<String>,
    /// The plugin whose newest version `execute` defaults to. Default: the step's name.
    /// Ignored when `execute` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "http-payment")]
    pub plugin: Option<String>,
    /// Digest of the execute plugin. Default: the version the type's current definition binds
    /// for this step (of the same plugin); for a new step, the newest version of `plugin`.
    #[schema(pattern = "^sha256:[0-9a-f]{64}$")]
    pub execute: Option<String>,
    /// Digest of the compensate plugin, a version of the same plugin. Default: the compensation
    /// bound now when `execute` is the version bound now; else the execute digest.
    #[schema(pattern = "^sha256:[0-9a-f]{64}$")]
    pub compensate: Option<String>,
    /// Default: 5 attempts, backoff 100 ms to 5 s.
    pub retry: Option<RetrySpec>,
    /// Default: 20 attempts, backoff 100 ms to 30 s.
    pub compensate_retry: Option<RetrySpec>,
    /// One call's time limit: 1 ms to 1 hour. Default 2000.
    #[schema(minimum = 1, maximum = 3_600_000)]
    pub timeout_ms: Option<u64>,
    /// How long the step may take in all (waits included) before it is rejected; none by default.
    #[schema(minimum = 1)]
    pub deadline_ms: Option<u64>,
    /// Settings the plugin receives in its input under `config`, e.g. `{"base_url":
    /// "http://127.0.0.1:9002"}`: at most 16 KiB of JSON. Not secret: it is shown here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>, example = json!({"base_url": "http://127.0.0.1:9002"}))]
    pub config: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A retry policy as the admin API shows and accepts it: exponential backoff with jitter
/// (attempt n waits up to `min(max_backoff_ms, initial_backoff_ms * 2^(n-1))`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Total attempts, including the first: 1 to 1000.
    #[schema(minimum = 1, maximum = 1000)]
    pub max_attempts: u32,
    /// At least 1 and at most `max_backoff_ms`.
    #[schema(minimum = 1, maximum = 86_400_000)]
    pub initial_backoff_ms: u64,
    /// At most 24 hours.
    #[schema(minimum = 1, maximum = 86_400_000)]
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
    /// 1 to 64 steps, run in order.
    #[schema(min_items = 1, max_items = 64)]
    pub steps: Vec<StepSpec>,
    /// Sensitive input fields as JSON pointers (e.g. `/payment/token`): plugins receive them;
    /// responses, events and logs show `"[redacted]"` instead. At most 64. Omitted on PUT: the
    /// current definition's stay. A built-in type's own (the order's `/payment/token`) are
    /// always kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_items = 64, inline, value_type = Option<Vec<SensitivePointer>>)]
    pub sensitive: Option<Vec<String>>,
    /// The stored definition's version: set on GET (also as the `ETag`) and in PUT's answer.
    /// On PUT, optional: the version the change was made from (a definition read, edited and
    /// sent back carries it); if the stored one is another by now, 409 `definition_changed`
    /// and nothing is stored, so an edit never undoes a change made since (a compensation
    /// hot-swapped meanwhile). `If-Match: "N"` says the same. 0: the type must not exist yet.
    /// Left out, the change replaces whatever is stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub version: Option<i64>,
}

/// A JSON pointer into the input, at most 256 characters, no control characters.
pub struct SensitivePointer;

impl utoipa::PartialSchema for SensitivePointer {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^/[^\\x00-\\x1f\\x7f-\\x9f]{0,255}$"))
            .description(Some("A JSON pointer into the input, e.g. /payment/token"))
            .into()
    }
}

impl ToSchema for SensitivePointer {}

/// Every saga definition.
#[derive(Debug, Serialize, ToSchema)]
pub struct DefinitionList {
    pub data: Vec<DefinitionSpec>,
}

/// `def` as the API shows it, with its stored `version` when there is one to show.
fn spec_of(def: &SagaDefinition, version: Option<i64>) -> DefinitionSpec {
    DefinitionSpec {
        version,
        saga_type: Some(def.saga_type.clone()),
        steps: def
            .steps
            .iter()
            .map(|s| StepSpec {
                name: s.name.clone(),
                plugin: Some(s.execute.plugin.clone()),
                state: Some(s.state.clone()),
                execute: Some(s.execute.digest.clone()),
                compensate: Some(s.compensate.digest.clone()),
                retry: Some(s.retry.into()),
                compensate_retry: Some(s.compensate_retry.into()),
                timeout_ms: Some(s.timeout_ms),
                deadline_ms: s.deadline_ms,
                config: (!s.config.is_empty()).then(|| s.config.clone()),
            })
            .collect(),
        sensitive: (!def.sensitive.is_empty()).then(|| def.sensitive.clone()),
    }
}

/// The version a PUT was made from: its `If-Match: "N"` or its body's `version` (the same if
/// both are given), if any.
fn expected_version(headers: &HeaderMap, body: Option<i64>) -> Result<Option<i64>, ApiError> {
    let bad = |why: &str| ApiError::invalid("If-Match", why);
    let header = match headers.get(axum::http::header::IF_MATCH) {
        None => None,
        Some(v) => {
            let v = v.to_str().map_err(|_| bad("not text"))?.trim();
            let n = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).and_then(|n| n.parse::<i64>().ok());
            Some(n.filter(|n| *n >= 0).ok_or_else(|| {
                bad("must be the definition's ETag, a version in quotes (\"3\"), as GET /admin/sagas/{type} gives it")
            })?)
        }
    };
    match (header, body) {
        (Some(h), Some(b)) if h != b => Err(ApiError::invalid(
            "version",
            format!("the body says version {b} and If-Match says {h}: which one was the change made from?"),
        )),
        (_, Some(v)) if v < 0 => Err(ApiError::invalid("version", "a version is 0 or more")),
        (h, b) => Ok(h.or(b)),
    }
}

/// The definition `spec` describes, completed from the type's current one (as this replica
/// read it, refreshed just now), and that current one with its version: the change must
/// replace exactly it.
async fn definition_of(
    state: &AppState,
    saga_type: &str,
    spec: DefinitionSpec,
) -> Result<(SagaDefinition, Option<(Arc<SagaDefinition>, i64)>), ApiError> {
    // Plugins uploaded through another replica a moment ago count as uploaded.
    state.catalog.refresh().await.map_err(catalog_error)?;
    let versions = state.store.plugin_versions().await?;
    // What a step leaves out keeps what the type's current definition has for that step (an
    // upload changes nothing until it is bound, SPEC §5.3; a bound compensation stays bound):
    // only a new type or a new step takes the newest uploaded version.
    let read = state.catalog.versioned_definition(saga_type);
    let current = read.as_ref().map(|(d, _)| d);
    let mut steps = Vec::with_capacity(spec.steps.len());
    for (i, s) in spec.steps.into_iter().enumerate() {
        let field = |f: &str| format!("steps[{i}].{f}");
        let was = current
            .and_then(|d| d.steps.iter().find(|c| c.name == s.name))
            .filter(|c| s.plugin.as_deref().is_none_or(|p| c.execute.plugin == p));
        let execute = match (s.execute, was) {
            (Some(d), _) => d,
            (None, Some(was)) => was.execute.digest.clone(),
            (None, None) => {
                let (name, f) = match &s.plugin {
                    Some(plugin) => (plugin, "plugin"),
                    None => (&s.name, "execute"),
                };
                versions.iter().rev().find(|v| v.name == *name).map(|v| v.digest.clone()).ok_or_else(|| {
                    ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "unknown_plugin",
                        format!("{}: no plugin named '{name}' is uploaded; upload it or give a digest", field(f)),
                    )
                })?
            }
        };
        // A hot-swapped compensation stays bound while the step executes the same version.
        let compensate = s.compensate.unwrap_or_else(|| match was {
            Some(was) if was.execute.digest == execute => was.compensate.digest.clone(),
            _ => execute.clone(),
        });
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
            config: s.config.unwrap_or_default(),
        });
    }
    let mut sensitive = match spec.sensitive {
        Some(given) => given,
        None => current.map(|d| d.sensitive.clone()).unwrap_or_default(),
    };
    for required in crate::builtin::required_sensitive(saga_type) {
        if !sensitive.iter().any(|p| p == required) {
            sensitive.push((*required).to_owned());
        }
    }
    Ok((SagaDefinition { saga_type: saga_type.to_owned(), steps, sensitive }, read))
}

/// Register or replace a saga definition. New sagas use it; running ones keep theirs.
///
/// Every plugin a step names (by digest, or by the step's name) must be uploaded first.
#[utoipa::path(put, path = "/admin/sagas/{type}", tag = "admin", params(
           ("type" = String, Path, description = "A saga type name: 1-64 lowercase letters, digits, `-` or `_`, starting with a letter", pattern = "^[a-z][a-z0-9_-]{0,63}$"), ActorHeader, OptionalKey,
           ("If-Match" = Option<String>, Header, description = "The definition's ETag (`\"N\"`): replace only that version, as the body's `version` says")), request_body = DefinitionSpec,
    responses((status = 200, description = "Registered", body = DefinitionSpec),
              (status = 400, description = "The body is not a valid definition (the error names the field), or If-Match is not a version or contradicts the body's", body = ErrorBody),
              (status = 409, description = "The definition changed meanwhile (or since the version given); read it again and retry", body = ErrorBody),
              (status = 422, description = "A step names a plugin that is not uploaded", body = ErrorBody)))]
pub async fn put_definition(
    State(state): State<AppState>,
    ApiPath(saga_type): ApiPath<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let value = super::sagas::integral_numbers(parse_body(body)?);
    let mut fingerprint = value.clone();
    let spec: DefinitionSpec = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        ApiError::invalid(if path == "." { String::new() } else { path }, e.into_inner())
    })?;
    let given = expected_version(&headers, spec.version)?;
    // The same body made from another version is another request.
    if let (Some(version), Some(fields)) = (given, fingerprint.as_object_mut()) {
        fields.insert("version".to_owned(), version.into());
    }
    let (def, current) = definition_of(&state, &saga_type, spec).await?;
    // Checked before anything is written under the key: a refused definition is not stored
    // (SPEC §5.1), nor a type name the database would refuse (a NUL byte) as a 500.
    def.validate().map_err(|e| catalog_error(catalog::Error::Definition(e)))?;
    let route = format!("PUT /admin/sagas/{saga_type}");
    let (state, headers, saga_type, def) = (&state, &headers, &saga_type, &def);
    idempotent(state, headers, route, &fingerprint, |key| async move {
        // The change replaces the version it was made from (the request's, else the one
        // definition_of completed it from, refreshed just now): if anything replaced that
        // meanwhile (another admin, a bind), 409, not stored under the key: read and retry. A
        // newer version would lose what changed in between.
        let stored = current.as_ref().map_or(0, |(_, version)| *version);
        let expected = given.unwrap_or(stored);
        if expected != stored {
            let now = match stored {
                0 => "none is stored".to_owned(),
                v => format!("the stored one is version {v}"),
            };
            let made_from = match expected {
                0 => "as a new type".to_owned(),
                v => format!("from version {v}"),
            };
            return Err(ApiError::conflict(
                "definition_changed",
                format!(
                    "this definition of '{saga_type}' was made {made_from}, and {now}: read it again \
                     (GET /admin/sagas/{saga_type}) and edit that, or leave `version` out to replace whatever is stored"
                ),
            )
            .provisional());
        }
        let before = current.as_ref().map(|(d, _)| serde_json::to_value(spec_of(d, None)).unwrap_or_default());
        let after = serde_json::to_value(spec_of(def, None)).unwrap_or_default();
        // The answer is committed with the change, so it says the version the change makes:
        // the store's next, which the commit checks.
        let answer = to_json(&spec_of(def, Some(expected + 1)))?;
        let mut entry = audit(headers, "saga.define", saga_type, before, Some(after));
        entry.answer = key.as_ref().map(|k| k.answer(StatusCode::OK, &answer));
        let version = state
            .catalog
            .put_definition_checked(def.clone(), DefinitionSource::Admin, Some(expected), Some(&entry))
            .await
            .map_err(|e| catalog_error(e).provisional())?;
        debug_assert_eq!(version, expected + 1);
        Ok(answered_in_commit(json_response(StatusCode::OK, answer, None), key.as_ref()))
    })
    .await
}

/// List saga definitions.
#[utoipa::path(get, path = "/admin/sagas", tag = "admin", responses((status = 200, description = "Definitions", body = DefinitionList)))]
pub async fn list_definitions(State(state): State<AppState>) -> Result<Response, ApiError> {
    // Read your writes through any replica: a change made elsewhere shows at once.
    state.catalog.refresh().await.map_err(catalog_error)?;
    let data: Vec<DefinitionSpec> =
        state.catalog.versioned_definitions().iter().map(|(d, version)| spec_of(d, Some(*version))).collect();
    Ok(json_response(StatusCode::OK, to_json(&DefinitionList { data })?, None))
}

/// One saga definition.
#[utoipa::path(get, path = "/admin/sagas/{type}", tag = "admin", params(
           ("type" = String, Path, description = "A saga type name: 1-64 lowercase letters, digits, `-` or `_`, starting with a letter", pattern = "^[a-z][a-z0-9_-]{0,63}$")),
    responses((status = 200, body = DefinitionSpec, headers(("ETag" = String, description = "The definition's version in quotes, for If-Match"))),
              (status = 404, description = "No saga type of this name", body = ErrorBody)))]
pub async fn get_definition(
    State(state): State<AppState>,
    ApiPath(saga_type): ApiPath<String>,
) -> Result<Response, ApiError> {
    state.catalog.refresh().await.map_err(catalog_error)?;
    let (def, version) = state.catalog.versioned_definition(&saga_type).ok_or_else(|| {
        ApiError::not_found(format!("no saga type '{saga_type}'; register it with PUT /admin/sagas/{saga_type}"))
    })?;
    let mut response = json_response(StatusCode::OK, to_json(&spec_of(&def, Some(version)))?, None);
    let etag = axum::http::HeaderValue::from_str(&format!("\"{version}\"")).expect("digits in quotes");
    response.headers_mut().insert(axum::http::header::ETAG, etag);
    Ok(response)
}
