//! Requests that web pages of other sites make through a user's browser are refused.
//!
//! The client routes are open unless `--api-token` is set, and the default listener is
//! 127.0.0.1. Without these checks any web page its operator visits could:
//!
//! - send a "simple" request (a POST whose body is `text/plain` needs no CORS preflight, and
//!   the JSON body is parsed all the same) that cancels or signals an order by its id: a
//!   cross-site request forgery;
//! - point a name of its own at 127.0.0.1 (DNS rebinding), become same-origin with the API in
//!   the browser's eyes, and read `GET /orders` (customers, addresses, step outputs).
//!
//! Two checks, before anything else runs ([`guard`]):
//!
//! - **Origin.** A browser names the page's origin (`Origin`) on every cross-origin request,
//!   and on every same-origin one but `GET` and `HEAD`. A request whose `Origin` is not the
//!   host it was addressed to (`Host`, or `X-Forwarded-Host` from a proxy in front) is
//!   refused: 403 `cross_origin`, unless the browser itself says it is same-origin
//!   (`Sec-Fetch-Site: same-origin`, which no page can set; a proxy that rewrites `Host`
//!   hides the match otherwise) or it carries `Authorization` (a page can add that header to
//!   a cross-origin request only through a CORS preflight, which this host never grants).
//!   The console is served by the host itself, so its own requests pass; no CORS header is
//!   ever sent, so no other page could read an answer anyway. Requests without `Origin`
//!   (curl, the CLI, services) are not a page's.
//! - **Host.** While the host listens on a loopback address only, a request must be addressed
//!   to `localhost` (or a `*.localhost` name), an IP address, or a name `--allowed-host` lists:
//!   any other name reaching a loopback listener was pointed at it by someone else's DNS.
//!   403 `host_not_allowed`, saying which flag serves the name. On other addresses every
//!   name passes, unless `--allowed-host` lists some.
//!
//! It must not know about routes: it sees request heads only.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// Which names requests may be addressed to (the `Host` check).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Browsers {
    /// `None`: any name. `Some(names)`: `localhost`, `*.localhost`, IP addresses and `names`
    /// (lowercase; `*` among them lets any name pass).
    hosts: Option<Vec<String>>,
}

impl Browsers {
    /// The checks for a host listening on `listen`, serving the names `allowed` too (the
    /// `--allowed-host` flags, already checked by [`check_allowed_host`]).
    pub fn new(listen: SocketAddr, allowed: &[String]) -> Browsers {
        let names: Vec<String> = allowed.iter().map(|n| n.trim_end_matches('.').to_ascii_lowercase()).collect();
        let hosts = if names.iter().any(|n| n == "*") {
            None
        } else if listen.ip().is_loopback() || !names.is_empty() {
            Some(names)
        } else {
            None
        };
        Browsers { hosts }
    }

    /// Why a request with `headers`, addressed to `authority`, is refused; `None` if it is not.
    fn refusal(&self, authority: Option<&str>, headers: &HeaderMap) -> Option<ApiError> {
        let target = authority.and_then(Target::parse);
        if let (Some(names), Some(target)) = (&self.hosts, &target) {
            if !host_allowed(names, &target.host) {
                return Some(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "host_not_allowed",
                    format!(
                        "this host answers requests addressed to localhost, an IP address or a name --allowed-host \
                         lists (SAGAHOST_ALLOWED_HOSTS), not {} (a defence against DNS rebinding while it listens \
                         on a loopback address); to serve that name, start it with --allowed-host {}",
                        shown(&target.host),
                        shown(&target.host)
                    ),
                ));
            }
        }
        let origin = headers.get("origin")?;
        let vouched = headers.get("sec-fetch-site").is_some_and(|v| v.as_bytes() == b"same-origin");
        if vouched || headers.contains_key(axum::http::header::AUTHORIZATION) {
            return None;
        }
        let same = origin.to_str().ok().and_then(Target::from_origin).is_some_and(|origin| {
            let forwarded = headers
                .get("x-forwarded-host")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .and_then(|v| Target::parse(v.trim()));
            target.iter().chain(forwarded.iter()).any(|t| *t == origin)
        });
        if same {
            return None;
        }
        let named = String::from_utf8_lossy(origin.as_bytes()).into_owned();
        Some(ApiError::new(
            StatusCode::FORBIDDEN,
            "cross_origin",
            format!(
                "a request from a web page of another origin ({}) is refused: this API takes no cross-origin \
                 requests from browsers (call it from a server or a script, or use the console this host serves)",
                shown(&named)
            ),
        ))
    }
}

/// At most 200 characters of a name from a request, for an error message.
fn shown(name: &str) -> String {
    name.chars().take(200).collect()
}

/// Whether a request may be addressed to `host` (lowercase, no trailing dot): `localhost`, a
/// `*.localhost` name, an IP address, or one of `names`.
fn host_allowed(names: &[String], host: &str) -> bool {
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    host == "localhost"
        || host.ends_with(".localhost")
        || bare.parse::<IpAddr>().is_ok()
        || names.iter().any(|n| n == host)
}

/// Where a request went, or where a page came from: a host name and its port, the default
/// ports (80, 443) as none. Behind a proxy the port the client used is not known here, so a
/// `Host` without one matches an `Origin` on either default port.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    /// Lowercase, without a trailing dot; an IPv6 address in brackets.
    host: String,
    port: Option<u16>,
}

impl Target {
    /// `host[:port]` (a `Host` header, a URI's authority).
    fn parse(authority: &str) -> Option<Target> {
        let authority: axum::http::uri::Authority = authority.parse().ok()?;
        if authority.as_str().contains('@') {
            return None;
        }
        let host = authority.host().trim_end_matches('.').to_ascii_lowercase();
        let port = authority.port_u16().filter(|p| *p != 80 && *p != 443);
        Some(Target { host, port })
    }

    /// `scheme://host[:port]` (an `Origin` header); `None` for `null` and anything else.
    fn from_origin(origin: &str) -> Option<Target> {
        let rest = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"))?;
        if rest.is_empty() || rest.contains('/') {
            return None;
        }
        Target::parse(rest)
    }
}

/// The middleware: refuses what [`Browsers`] refuses, 403, before anything else runs.
pub async fn guard(State(browsers): State<Arc<Browsers>>, req: Request, next: Next) -> Response {
    // HTTP/2 carries the authority in the URI; HTTP/1.1 in `Host`.
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| req.headers().get("host").and_then(|h| h.to_str().ok()).map(str::to_owned));
    match browsers.refusal(authority.as_deref(), req.headers()) {
        Some(refused) => refused.into_response(),
        None => next.run(req).await,
    }
}

/// Checks an `--allowed-host` value: a host name (letters, digits, `-`, `.`), or `*` for any.
pub fn check_allowed_host(name: &str) -> Result<String, String> {
    let name = name.trim();
    let name = name.strip_suffix('.').filter(|n| !n.is_empty()).unwrap_or(name);
    let valid = name == "*"
        || (!name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty() && label.len() <= 63 && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }));
    if valid {
        Ok(name.to_ascii_lowercase())
    } else {
        Err(format!(
            "{name:?} is not a host name (letters, digits, '-' and '.'; no scheme, port or path), nor '*' for any name"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn loopback(allowed: &[&str]) -> Browsers {
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        Browsers::new("127.0.0.1:8080".parse().unwrap(), &allowed)
    }

    fn code(b: &Browsers, authority: Option<&str>, h: &[(&'static str, &str)]) -> Option<&'static str> {
        b.refusal(authority, &headers(h)).map(|e| e.code)
    }

    #[test]
    fn a_loopback_listener_answers_localhost_ip_addresses_and_listed_names_only() {
        let b = loopback(&["api.example.com"]);
        for ok in ["localhost:8080", "LOCALHOST", "app.localhost:8080", "127.0.0.1:8080", "[::1]:8080", "10.0.0.5"] {
            assert_eq!(code(&b, Some(ok), &[]), None, "{ok}");
        }
        assert_eq!(code(&b, Some("api.example.com"), &[]), None);
        assert_eq!(code(&b, Some("API.example.com.:8080"), &[]), None, "case and a trailing dot");
        for refused in ["rebind.evil.example:8080", "evil.example", "localhost.evil.example", "example.com"] {
            assert_eq!(code(&b, Some(refused), &[]), Some("host_not_allowed"), "{refused}");
        }
        assert_eq!(code(&b, None, &[]), None, "no authority: not a browser's request");
        // Any name with `*`; any name on another address unless names are listed.
        assert_eq!(code(&loopback(&["*"]), Some("evil.example"), &[]), None);
        let open = Browsers::new("0.0.0.0:8080".parse().unwrap(), &[]);
        assert_eq!(code(&open, Some("evil.example"), &[]), None);
        let listed = Browsers::new("0.0.0.0:8080".parse().unwrap(), &["api.example.com".into()]);
        assert_eq!(code(&listed, Some("evil.example"), &[]), Some("host_not_allowed"));
    }

    #[test]
    fn a_request_from_a_page_of_another_origin_is_refused_and_one_from_the_same_passes() {
        let b = loopback(&["api.example.com"]);
        let from = |origin: &str, authority: &str| code(&b, Some(authority), &[("origin", origin)]);
        assert_eq!(from("http://127.0.0.1:8080", "127.0.0.1:8080"), None, "the console");
        assert_eq!(from("http://LOCALHOST:8080", "localhost:8080"), None);
        assert_eq!(from("https://api.example.com", "api.example.com"), None, "behind TLS, default ports");
        assert_eq!(from("http://api.example.com:80", "api.example.com:443"), None, "default ports are no port");
        for (origin, authority) in [
            ("https://evil.example", "127.0.0.1:8080"),
            ("http://127.0.0.1:3000", "127.0.0.1:8080"),
            ("http://localhost:8080", "127.0.0.1:8080"),
            ("null", "127.0.0.1:8080"),
            ("file://", "127.0.0.1:8080"),
            ("http://127.0.0.1:8080/path", "127.0.0.1:8080"),
            ("http://user@127.0.0.1:8080", "127.0.0.1:8080"),
            ("", "127.0.0.1:8080"),
        ] {
            assert_eq!(from(origin, authority), Some("cross_origin"), "{origin} -> {authority}");
        }
        // A proxy that addresses the host by IP names what the client asked for.
        let proxied = [("origin", "https://api.example.com"), ("x-forwarded-host", "api.example.com, other")];
        assert_eq!(code(&b, Some("127.0.0.1:8080"), &proxied), None);
        let forged = [("origin", "https://evil.example"), ("x-forwarded-host", "api.example.com")];
        assert_eq!(code(&b, Some("127.0.0.1:8080"), &forged), Some("cross_origin"));
        // A proxy that rewrites Host and says nothing: the browser's own word, or a token.
        let rewritten = Some("127.0.0.1:8080");
        let vouched = [("origin", "https://api.example.com:8443"), ("sec-fetch-site", "same-origin")];
        assert_eq!(code(&b, rewritten, &vouched), None);
        let cross = [("origin", "https://evil.example"), ("sec-fetch-site", "cross-site")];
        assert_eq!(code(&b, rewritten, &cross), Some("cross_origin"));
        let token = [("origin", "https://api.example.com"), ("authorization", "Bearer t")];
        assert_eq!(code(&b, rewritten, &token), None);
    }

    #[test]
    fn allowed_host_flags_are_host_names() {
        assert_eq!(check_allowed_host(" API.example.com ").as_deref(), Ok("api.example.com"));
        assert_eq!(check_allowed_host("*").as_deref(), Ok("*"));
        assert_eq!(check_allowed_host("api.example.com.").as_deref(), Ok("api.example.com"));
        for bad in ["", "http://api.example.com", "api.example.com:8080", "a/b", "a..b", "a b", "[::1]"] {
            assert!(check_allowed_host(bad).is_err(), "{bad:?}");
        }
    }
}
