//! `PUT` and `GET /admin/plugins/{name}/grants`: the origins a plugin may reach over outbound
//! HTTP (SPEC §4.1), and the credentials the host adds to its requests there. Default none;
//! empty lists revoke every grant.
//!
//! Validation and the canonical form are `crate::grants`'s; this module only reads the body,
//! checks that the plugin exists and that every secret a credential names can be read on this
//! host (`crate::secrets`), and hands the canonical grants to the store. Grants live only in
//! the database (`GrantStore`), never in the catalog, so a change made through one replica
//! holds on every replica from the next read on. Every change is audited (`plugin.grants`,
//! with the grants before and after: credentials' templates, never a secret) in the
//! transaction that makes it.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::admin::{actor, ActorHeader};
use super::error::{ApiError, ApiPath, ErrorBody};
use super::openapi::OptionalKey;
use super::plugins::check_plugin_name;
use super::sagas::{answered_in_commit, idempotent, json_response, parse_body, to_json};
use super::AppState;
use crate::grants::{self, Credential, Grants};
use crate::store::AuditEntry;

// The document below states the bounds literally (utoipa takes literals only): keep them equal.
const _: () = assert!(grants::MAX_GRANTS == 64);
const _: () = assert!(grants::MAX_CREDENTIALS == 16);
const _: () = assert!(
    grants::MAX_ORIGIN_BYTES == 256
        && grants::MAX_HEADER_NAME_BYTES == 128
        && grants::MAX_CREDENTIAL_VALUE_BYTES == 1024
);

/// `PUT /admin/plugins/{name}/grants` body: the whole grants, replacing those before.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"allowed_hosts": ["http://127.0.0.1:9001", "https://api.stripe.com"],
                          "credentials": [{"origin": "https://api.stripe.com", "header": "Authorization",
                                           "value": "Bearer ${stripe-key}"}]}))]
pub struct GrantsRequest {
    /// Origins the plugin may reach: `http` or `https`, a host name or IP address, and an
    /// optional port; no path, query or user info. At most 64; duplicates count once. An empty
    /// list revokes every grant.
    #[schema(max_items = 64, inline, value_type = Vec<GrantedOrigin>)]
    pub allowed_hosts: Vec<String>,
    /// Headers the host sets on the plugin's requests to granted origins, their values naming
    /// secrets of the host's `--outbound-secrets-dir`, which the plugin never sees. At most
    /// 16; one per origin and header. Absent or empty: none (a change of `allowed_hosts`
    /// alone drops them: send them with every change).
    #[serde(default)]
    #[schema(max_items = 16)]
    pub credentials: Vec<Credential>,
}

/// One granted origin, as sent.
pub struct GrantedOrigin;

impl utoipa::PartialSchema for GrantedOrigin {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        // Every origin `grants::Origin::parse` accepts starts like this and is at most
        // MAX_ORIGIN_BYTES long; the server refuses the rest with 422 and the reason.
        ObjectBuilder::new()
            .schema_type(Type::String)
            .max_length(Some(grants::MAX_ORIGIN_BYTES))
            .pattern(Some("^[hH][tT][tT][pP][sS]?://"))
            .description(Some("An origin such as http://127.0.0.1:9001 or https://payments.example.com"))
            .into()
    }
}

impl ToSchema for GrantedOrigin {}

/// A plugin's grants, in their canonical form: lower case, the port always written, IPv6 in
/// brackets, header names lower case. Credentials show their templates, never a secret.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"plugin": "payment",
                          "allowed_hosts": ["http://127.0.0.1:9001", "https://api.stripe.com:443"],
                          "credentials": [{"origin": "https://api.stripe.com:443", "header": "authorization",
                                           "value": "Bearer ${stripe-key}"}]}))]
pub struct GrantsView {
    pub plugin: String,
    pub allowed_hosts: Vec<String>,
    pub credentials: Vec<Credential>,
}

impl GrantsView {
    fn of(plugin: &str, grants: Grants) -> GrantsView {
        GrantsView { plugin: plugin.to_owned(), allowed_hosts: grants.allowed_hosts, credentials: grants.credentials }
    }
}

/// A 422 for `field` of the body.
fn invalid_grant(code: &'static str, field: String, reason: String) -> ApiError {
    let mut e = ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, format!("{field}: {reason}"));
    e.field = Some(field);
    e
}

/// 404 unless some version of the plugin was uploaded (the built-in demo plugins are, at
/// start-up), as `GET /admin/plugins/{name}` decides.
async fn check_uploaded(state: &AppState, name: &str) -> Result<(), ApiError> {
    check_plugin_name(name)?;
    if state.store.plugin_versions().await?.iter().any(|v| v.name == name) {
        return Ok(());
    }
    Err(ApiError::not_found(format!("no plugin named '{name}'; upload one with POST /admin/plugins/{name} first")))
}

/// Grant a plugin the origins it may reach over outbound HTTP and the credentials the host
/// adds to its requests there, replacing its grants (audited).
///
/// The grants are stored in their canonical form (lower case, explicit port) and shared by
/// every replica at once: a call reads them at its first request and checks every request
/// against them before any connection is opened, so a change applies to the calls that make
/// their first request after it (one in progress keeps what it read, at most for its
/// timeout). Empty lists revoke every grant. Link-local, cloud metadata and unspecified
/// addresses (169.254.0.0/16, fe80::/10, fd00:ec2::/32, 100.100.100.200, 168.63.129.16,
/// 0.0.0.0/8, ::) are reachable only when granted by that exact address.
///
/// A credential is a header the host sets on every request to its origin, replacing the
/// plugin's own, its value a template such as `Bearer ${stripe-key}`: each `${name}` is the
/// file `name` of the host's secrets directory (`--outbound-secrets-dir`), read when the
/// request is sent, so a rotated file takes effect on the next request. The plugin never sees
/// the value; this API, the audit trail and the database hold only the template. Every secret
/// named must be readable on the replica that takes this request (422 `unknown_secret`
/// otherwise); a replica that cannot read one when a request needs it holds the step back
/// (no attempt spent) and logs why.
#[utoipa::path(put, path = "/admin/plugins/{name}/grants", tag = "admin", params(
           ("name" = String, Path, description = "A plugin name: 1-64 lowercase letters, digits, `-` or `_`, starting with a letter", pattern = "^[a-z][a-z0-9_-]{0,63}$"), ActorHeader, OptionalKey),
    request_body = GrantsRequest,
    responses((status = 200, description = "Granted; the list in force now", body = GrantsView),
              (status = 400, description = "The body is not `{\"allowed_hosts\": [...]}`", body = ErrorBody),
              (status = 404, description = "No version of this plugin was ever uploaded", body = ErrorBody),
              (status = 409, description = "A request with this key is still in flight", body = ErrorBody,
               headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
              (status = 422, description = "An entry is not an http(s) origin, there are more than 64, a credential is not valid, or it names a secret this host cannot read; nothing changed", body = ErrorBody)))]
pub async fn put_grants(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_plugin_name(&name)?;
    let value = parse_body(body)?;
    let fingerprint = value.clone();
    let req: GrantsRequest = serde_json::from_value(value).map_err(|e| ApiError::invalid("", e))?;
    let allowed_hosts = grants::normalize(&req.allowed_hosts)
        .map_err(|reason| invalid_grant("invalid_grant", "allowed_hosts".to_owned(), reason))?;
    let credentials = grants::normalize_credentials(&allowed_hosts, &req.credentials)
        .map_err(|(field, reason)| invalid_grant("invalid_grant", field, reason))?;
    check_uploaded(&state, &name).await?;
    let granted = Grants { allowed_hosts, credentials };
    let route = format!("PUT /admin/plugins/{name}/grants");
    let (state, headers, name, granted) = (&state, &headers, &name, &granted);
    idempotent(state, headers, route, &fingerprint, |key| async move {
        // Inside the key's claim: a retry of a change that committed replays its answer, even
        // where the secrets cannot be read now (another replica, a file rotated away since).
        // Not stored: the answer depends on the files, not the request (a secret may reach
        // the pod after this), so a retry with the key checks again.
        for (i, credential) in granted.credentials.iter().enumerate() {
            crate::secrets::check(state.config.secrets.as_ref(), &credential.value).await.map_err(|e| {
                let code = match e {
                    crate::secrets::Error::Template(_) => "invalid_grant",
                    _ => "unknown_secret",
                };
                invalid_grant(code, format!("credentials[{i}].value"), e.to_string()).provisional()
            })?;
        }
        let who = actor(headers);
        let body = to_json(&GrantsView::of(name, granted.clone()))?;
        let entry = AuditEntry {
            actor: who.clone(),
            action: "plugin.grants".to_owned(),
            target: name.clone(),
            // The store sets `before` to the list this change replaces, read in its transaction.
            before: None,
            after: Some(serde_json::json!(granted)),
            note: None,
            // Stored with the change: a retry of a request that died after it replays this
            // answer rather than setting the grants again over a later change.
            answer: key.as_ref().map(|k| k.answer(StatusCode::OK, &body)),
        };
        let previous = state.store.put_grants(name, granted, &entry, state.clock.now_ms()).await?;
        tracing::info!(plugin = %name, actor = %who, before = ?previous, after = ?granted, "plugin grants changed");
        Ok(answered_in_commit(json_response(StatusCode::OK, body, None), key.as_ref()))
    })
    .await
}

/// The origins a plugin may reach over outbound HTTP and the credentials the host adds there
/// (empty: none). Credentials show their templates, never a secret.
#[utoipa::path(get, path = "/admin/plugins/{name}/grants", tag = "admin", params(
           ("name" = String, Path, description = "A plugin name: 1-64 lowercase letters, digits, `-` or `_`, starting with a letter", pattern = "^[a-z][a-z0-9_-]{0,63}$")),
    responses((status = 200, description = "The grants in force", body = GrantsView),
              (status = 404, description = "No version of this plugin was ever uploaded", body = ErrorBody)))]
pub async fn get_grants(State(state): State<AppState>, ApiPath(name): ApiPath<String>) -> Result<Response, ApiError> {
    check_uploaded(&state, &name).await?;
    let granted = state.store.grants(&name).await?;
    Ok(json_response(StatusCode::OK, to_json(&GrantsView::of(&name, granted))?, None))
}
