//! The OpenAPI document (served at `/openapi.json`) and the parts of it no single handler
//! states: the answers of the layers every route sits behind (authentication, body limits,
//! load shedding), and the shared shapes of parameters.
//!
//! The document must tell the truth: every status code, content type and bound the server
//! uses is in it, and every request it calls valid is one the server accepts. The e2e fuzz
//! test (`tests/e2e/fuzz.rs`, schemathesis with all its checks) holds it to that.
//!
//! It must not decide anything: handlers and layers decide, this module only describes them.

use serde::Deserialize;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::Operation;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr};
use utoipa::IntoParams;

/// Saga and step type names (`engine::definition::is_valid_name`).
pub const NAME_PATTERN: &str = "^[a-z][a-z0-9_-]{0,63}$";

#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "sagahost", description = "Saga orchestrator: WebAssembly steps, durable state, idempotent intake, transactional outbox."),
    tags((name = "orders", description = "The built-in order saga"), (name = "sagas", description = "Sagas of any registered type"),
         (name = "admin", description = "Operators and plugin management (bearer admin token)"),
         (name = "health", description = "Liveness, readiness and metrics")),
    components(schemas(super::error::ErrorBody)),
    modifiers(&Security),
)]
pub struct ApiDoc;

/// Declares the bearer schemes: the admin token, and the API tokens that may close the
/// client routes (`--api-token`).
struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for name in ["admin_token", "api_token"] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

/// An error response: `{"error": {"code", "message"}}`, optionally with `Retry-After`.
fn error(description: &str, retry_after: bool, www_authenticate: bool) -> RefOr<Response> {
    let mut r = ResponseBuilder::new()
        .description(description)
        .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build());
    if retry_after {
        r = r.header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0)))
                .description(Some("Seconds to wait before retrying"))
                .build(),
        );
    }
    if www_authenticate {
        r = r.header(
            "WWW-Authenticate",
            HeaderBuilder::new().schema(ObjectBuilder::new().schema_type(Type::String)).build(),
        );
    }
    RefOr::T(r.build())
}

fn operations(api: &mut OpenApi) -> impl Iterator<Item = &mut Operation> {
    api.paths.paths.values_mut().flat_map(|item| {
        [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch]
            .into_iter()
            .filter_map(Option::as_mut)
    })
}

/// Adds `status` to every operation that does not document it already (a handler's own
/// wording wins).
fn add(op: &mut Operation, status: &str, response: RefOr<Response>) {
    op.responses.responses.entry(status.to_owned()).or_insert(response);
}

/// Routes behind `admin::require_client`: 401 when `--api-token` closes them; the bearer
/// token is optional in the document because the route is open without `--api-token`.
pub fn client_routes(api: &mut OpenApi) {
    for op in operations(api) {
        add(op, "401", error("--api-token is set and the request has none of the tokens", false, true));
        op.security =
            Some(vec![SecurityRequirement::default(), SecurityRequirement::new("api_token", [] as [&str; 0])]);
    }
    body_limit(api, "64 KiB");
}

/// Routes behind `admin::require_admin`: 401 without the admin token, 403 when admin is off.
pub fn admin_routes(api: &mut OpenApi, limit: &str) {
    for op in operations(api) {
        add(op, "401", error("The admin token is missing or wrong", false, true));
        add(op, "403", error("Admin routes are off: the host has no --admin-token", false, false));
        op.security = Some(vec![SecurityRequirement::new("admin_token", [] as [&str; 0])]);
    }
    body_limit(api, limit);
}

/// Routes that read a body: 413 past the limit (`DefaultBodyLimit`).
fn body_limit(api: &mut OpenApi, limit: &str) {
    for op in operations(api).filter(|op| op.request_body.is_some()) {
        add(op, "413", error(&format!("The body is larger than {limit}"), false, false));
    }
}

/// Every route, behind `limits::guard`: 503 when overloaded, past the request deadline or
/// when the database is unavailable for a moment; 500 for a failure the client cannot fix.
pub fn every_route(api: &mut OpenApi) {
    for op in operations(api) {
        // `http::origin` answers it on every route (an admin route's 403 is described above).
        add(
            op,
            "403",
            error(
                "A browser's request from a page of another origin (cross_origin), or one addressed to a name \
                 this host does not serve while it listens on a loopback address (host_not_allowed)",
                false,
                false,
            ),
        );
        add(
            op,
            "503",
            error(
                "Overloaded, past the request deadline, or the database is unavailable; retry after Retry-After",
                true,
                false,
            ),
        );
        add(
            op,
            "500",
            error(
                "The server failed; the cause is logged. Retrying with the same Idempotency-Key is safe",
                false,
                false,
            ),
        );
    }
}

/// Links from a created saga to what can be done with it (OpenAPI links), so that clients
/// and stateful fuzzing (schemathesis) follow a saga from its creation to its reads, cancel,
/// signals and operator actions. Written into the JSON document: utoipa 5.5 serialises a
/// link's `operationId` as `operation_id`.
pub fn links(doc: &mut serde_json::Value) {
    // (operation, whether it also takes the saga type from the response)
    let for_sagas = [("get_saga", true), ("cancel_saga", true), ("signal_saga", true)];
    let operator = [("retry_saga", false), ("resolve_saga", false)];
    for (path, targets) in [super::orders::LINKS, ("/sagas/{type}", for_sagas)] {
        for status in ["200", "201"] {
            let Some(response) =
                doc.pointer_mut(&format!("/paths/{}/post/responses/{status}", path.replace('/', "~1")))
            else {
                continue;
            };
            let links: serde_json::Map<String, serde_json::Value> = targets
                .iter()
                .chain(&operator)
                .map(|(operation, typed)| {
                    let mut parameters = serde_json::json!({ "id": "$response.body#/id" });
                    if *typed {
                        parameters["type"] = "$response.body#/saga_type".into();
                    }
                    ((*operation).to_owned(), serde_json::json!({ "operationId": operation, "parameters": parameters }))
                })
                .collect();
            response["links"] = links.into();
        }
    }
}

/// The `Idempotency-Key` header where it is required (creating a saga).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct RequiredKey {
    /// Unique per request (a UUID); reuse it when retrying. Printable ASCII, at most 255
    /// characters.
    #[param(
        rename = "Idempotency-Key",
        min_length = 1,
        max_length = 255,
        pattern = "^[\\x20-\\x7e]*[\\x21-\\x7e][\\x20-\\x7e]*$"
    )]
    pub key: String,
}

/// The `Idempotency-Key` header where it is honoured but optional (other mutations).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct OptionalKey {
    /// With a key, a retry gets the first response back (`Idempotent-Replayed: true`).
    /// Printable ASCII, at most 255 characters.
    #[param(
        rename = "Idempotency-Key",
        min_length = 1,
        max_length = 255,
        pattern = "^[\\x20-\\x7e]*[\\x21-\\x7e][\\x20-\\x7e]*$"
    )]
    pub key: Option<String>,
}

#[cfg(test)]
mod tests {
    use utoipa::PartialSchema;

    use crate::builtin::order::{OrderRequest, CURRENCIES};

    /// The document's currency pattern is the list the order saga accepts.
    #[test]
    fn currency_pattern_lists_the_accepted_currencies() {
        let schema = serde_json::to_value(OrderRequest::schema()).unwrap();
        let pattern = &schema["properties"]["currency"]["pattern"];
        assert_eq!(pattern.as_str(), Some(format!("^({})$", CURRENCIES.join("|")).as_str()), "{schema:#}");
    }
}
