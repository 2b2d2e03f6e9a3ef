//! The web console (SPEC §9) at `/ui/`: a page, a script and a style sheet from `host/ui/`,
//! embedded in the binary at build time, so the host serves it with no files, build step or
//! CDN at run time.
//!
//! The console is a client of the public API like any other: it reads `/sagas/...` and
//! `/admin/...` from the browser with the tokens the operator types in (kept in the page's
//! memory only). This module serves bytes and nothing else: it must not read the store or
//! decide anything.
//!
//! Deep links work when opened directly: every page of the console (`/ui/`,
//! `/ui/sagas/{type}/{id}`, `/ui/plugins`, `/ui/stuck`) is answered with `index.html`, whose
//! script reads the location and draws that page. Any other path under `/ui/` is a 404 (with
//! the page, which says so, unless it names a file).

use std::sync::LazyLock;

use axum::body::Bytes;
use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest as _, Sha256};

/// What a console page may do: load its own script, style sheet and icon, and call this host's
/// API. No inline script or style, no other origin, no frames, no forms posting anywhere, no
/// plugins. The page builds every piece of data into the DOM as text, and this policy is the
/// second line if that ever slips.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    body: LazyLock<Bytes>,
    content_type: &'static str,
    /// A strong validator, the content's hash, so a browser revalidates with one small request.
    etag: LazyLock<String>,
}

impl Asset {
    const fn new(body: fn() -> Bytes, etag: fn() -> String, content_type: &'static str) -> Asset {
        Asset { body: LazyLock::new(body), content_type, etag: LazyLock::new(etag) }
    }
}

/// The strong validator of `body`.
fn etag_of(body: &[u8]) -> String {
    format!("\"{}\"", &hex::encode(Sha256::digest(body))[..32])
}

macro_rules! asset {
    ($file:literal, $content_type:literal) => {
        Asset::new(
            || Bytes::from_static(include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/ui/", $file))),
            || etag_of(include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/ui/", $file))),
            $content_type,
        )
    };
}

/// The page, with the saga type it shows when none is asked for: the first built-in one (the
/// script names no saga type itself).
fn index() -> Bytes {
    let page = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/ui/index.html"));
    Bytes::from(page.replace("{{default-saga-type}}", crate::builtin::ALL[0].saga_type))
}

static INDEX: Asset = Asset::new(index, || etag_of(&INDEX.body), "text/html; charset=utf-8");
static SCRIPT: Asset = asset!("app.js", "text/javascript; charset=utf-8");
static STYLE: Asset = asset!("app.css", "text/css; charset=utf-8");
static ICON: Asset = asset!("icon.svg", "image/svg+xml");

/// The console's routes; merged into the API router, behind the same load-shedding guard.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(|headers: HeaderMap| async move { serve(&INDEX, StatusCode::OK, &headers) }))
        .route("/ui/{*path}", get(path))
}

async fn path(Path(path): Path<String>, headers: HeaderMap) -> Response {
    match path.as_str() {
        "app.js" => serve(&SCRIPT, StatusCode::OK, &headers),
        "app.css" => serve(&STYLE, StatusCode::OK, &headers),
        "icon.svg" => serve(&ICON, StatusCode::OK, &headers),
        // A file the console does not have: a plain 404, not a page a script tag would run.
        // (No page's path has a dot: saga ids are UUIDs, type names have none.)
        p if p.rsplit('/').next().is_some_and(|last| last.contains('.')) => {
            super::error::ApiError::not_found("the console has no such file").into_response()
        }
        p if is_page(p) => serve(&INDEX, StatusCode::OK, &headers),
        // Not a page of the console: the page itself, which says so, with a 404.
        _ => serve(&INDEX, StatusCode::NOT_FOUND, &headers),
    }
}

/// The console's pages (paths under `/ui/`), which the script draws from the location.
fn is_page(path: &str) -> bool {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    match segments.as_slice() {
        ["plugins"] | ["stuck"] => true,
        ["sagas", saga_type, id] => {
            crate::engine::definition::is_valid_name(saga_type) && !id.is_empty() && id.len() <= 64
        }
        _ => false,
    }
}

fn serve(asset: &Asset, status: StatusCode, headers: &HeaderMap) -> Response {
    let etag = asset.etag.as_str();
    let fresh = status == StatusCode::OK
        && headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut r =
        if fresh { StatusCode::NOT_MODIFIED.into_response() } else { (status, asset.body.clone()).into_response() };
    let h = r.headers_mut();
    if !fresh {
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    }
    h.insert(header::ETAG, HeaderValue::from_str(etag).expect("a hex etag is a header value"));
    // Revalidate on every use: a new host version must never run with an old script. The
    // ETag makes that a 304 of a few bytes.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_pages_are_recognised_and_nothing_else() {
        for p in
            ["plugins", "stuck", "stuck/", "sagas/order/0190f0d2-0000-7000-8000-000000000000", "sagas/order-http/x"]
        {
            assert!(is_page(p), "{p}");
        }
        for p in ["", "nope", "sagas", "sagas/order", "sagas/Order/x", "sagas/order/x/y", "plugins/x"] {
            assert!(!is_page(p), "{p}");
        }
    }

    #[test]
    fn the_page_loads_only_embedded_files() {
        let html = std::str::from_utf8(&INDEX.body).unwrap();
        for needed in ["/ui/app.js", "/ui/app.css", "/ui/icon.svg"] {
            assert!(html.contains(needed), "index.html does not load {needed}");
        }
        // No inline script or style (the policy would block them), nothing from elsewhere.
        assert!(!html.contains("<script>") && !html.contains("style="), "inline code in index.html");
        assert!(!html.contains("http://") && !html.contains("https://"), "index.html loads from another origin");
    }

    #[test]
    fn a_matching_etag_is_answered_with_304() {
        let mut h = HeaderMap::new();
        assert_eq!(serve(&SCRIPT, StatusCode::OK, &h).status(), StatusCode::OK);
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_str(&SCRIPT.etag).unwrap());
        let r = serve(&SCRIPT, StatusCode::OK, &h);
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(r.headers()[header::ETAG], SCRIPT.etag.as_str());
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert_eq!(serve(&SCRIPT, StatusCode::OK, &h).status(), StatusCode::OK);
    }
}
