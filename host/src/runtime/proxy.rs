//! An HTTP forward proxy for plugins' outbound requests (`--outbound-proxy`), and the
//! destinations that bypass it (`--outbound-no-proxy`).
//!
//! Many networks let nothing out except through an egress proxy. With one configured, a
//! granted request goes to the proxy instead of its service:
//! - `https`: a `CONNECT host:port` tunnel through the proxy, then TLS to the service inside
//!   it, end to end: the certificate is still checked against the name the plugin asked for,
//!   and the proxy sees neither the request nor its answer.
//! - `http`: the request itself, its target in absolute form (`GET http://host:port/path`), as
//!   RFC 9112 §3.2.2 has clients address a proxy.
//!
//! Requests to the host's own machine (`localhost`, loopback addresses) and to the proxy
//! itself never go through it, nor those to destinations in the bypass list.
//!
//! The grant is checked first, on the service's origin, exactly as without a proxy. The host
//! does not resolve the service's name then (the proxy does; inside such networks the host often
//! cannot), so the refusal of names that resolve to link-local or metadata addresses is the
//! proxy's job there: the docs say so. The proxy's own name is resolved by the host (bounded
//! like any lookup). A plugin cannot speak to the proxy itself: a `Proxy-Authorization` header
//! it set is dropped, and the host's own credentials (from the proxy URL's user info) are sent
//! instead, to the proxy only (never inside the tunnel).

use std::net::IpAddr;

use bytes::Bytes;
use http::header::{HeaderValue, HOST, PROXY_AUTHORIZATION};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use wasmtime_wasi_http::Error;

use crate::grants::{self, Host, Origin, Scheme};

/// A forward proxy: where it is, how to authenticate to it, and who bypasses it.
#[derive(Clone)]
pub struct Proxy {
    pub(super) host: Host,
    pub(super) port: u16,
    /// `Basic` credentials from the URL's user info, marked sensitive.
    authorization: Option<HeaderValue>,
    bypass: NoProxy,
}

impl std::fmt::Debug for Proxy {
    /// The proxy's origin; credentials are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let auth = if self.authorization.is_some() { " with credentials" } else { "" };
        write!(f, "Proxy {{ {}{auth}, {} bypassing }}", self.origin(), self.bypass.0.len())
    }
}

impl Proxy {
    /// Parses `http://[user[:password]@]host:port` (user and password percent-encoded, as in
    /// any URL). The port must be given (proxies listen on all sorts: 3128, 8080, ...); only
    /// `http` is spoken to the proxy itself (`https` services are still reached over TLS,
    /// through a tunnel).
    pub fn parse(url: &str) -> Result<Proxy, String> {
        // Errors never repeat the URL whole: it may hold a password.
        let (scheme, rest) =
            url.split_once("://").ok_or("not a proxy URL: write http://host:port, e.g. http://proxy.internal:3128")?;
        if !scheme.eq_ignore_ascii_case("http") {
            return Err("the proxy is spoken to over plain http (https services are still reached over TLS, \
                 through a CONNECT tunnel): write http://host:port"
                .to_owned());
        }
        let (userinfo, address) = match rest.rsplit_once('@') {
            Some((userinfo, address)) => (Some(userinfo), address),
            None => (None, rest),
        };
        let shown = format!("http://{address}");
        let origin = Origin::parse(&shown).map_err(|e| format!("the proxy URL: {e}"))?;
        // A port is a ':' after the host (after an IPv6 address's closing bracket).
        if !address.rsplit(']').next().is_some_and(|after_host| after_host.contains(':')) {
            return Err(format!("{shown:?}: give the proxy's port, e.g. http://proxy.internal:3128"));
        }
        let authorization = match userinfo {
            None => None,
            Some(userinfo) => {
                let decode = |s: &str| {
                    percent_encoding::percent_decode_str(s)
                        .decode_utf8()
                        .map(|s| s.into_owned())
                        .map_err(|_| "the proxy URL's user info is not UTF-8 once percent-decoded".to_owned())
                };
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                let (user, password) = (decode(user)?, decode(password)?);
                if user.is_empty() || user.contains(':') {
                    return Err("the proxy URL's user name is empty or holds a ':'".to_owned());
                }
                use base64::Engine as _;
                let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
                let mut value = HeaderValue::from_str(&format!("Basic {token}")).expect("base64 is a header value");
                value.set_sensitive(true);
                Some(value)
            }
        };
        Ok(Proxy { host: origin.host, port: origin.port, authorization, bypass: NoProxy::default() })
    }

    /// The proxy, with `bypass` as the destinations reached without it.
    pub fn bypassing(self, bypass: NoProxy) -> Proxy {
        Proxy { bypass, ..self }
    }

    /// `http://host:port`: how the proxy is named in messages (never with credentials).
    pub(super) fn origin(&self) -> Origin {
        Origin { scheme: Scheme::Http, host: self.host.clone(), port: self.port }
    }

    /// Whether a request to `origin` goes through the proxy. Never one to the host's own
    /// machine (`localhost`, a name under it, a loopback address: through the proxy it would
    /// reach the proxy's machine instead, its admin pages), nor one to the proxy itself (it
    /// would carry the host's credentials to whatever the proxy serves there); as Go's
    /// `ProxyFromEnvironment` does. Nor one the bypass list names.
    pub(super) fn applies_to(&self, origin: &Origin) -> bool {
        let own_machine = match &origin.host {
            Host::Ip(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()) => true,
            Host::Ip(ip) => ip.is_loopback(),
            Host::Name(name) => name == "localhost" || name.ends_with(".localhost"),
        };
        let the_proxy = origin.host == self.host && origin.port == self.port;
        !own_machine && !the_proxy && !self.bypass.matches(&origin.host)
    }

    /// Makes `request` (to `http://` `origin`) one for the proxy: absolute form (its URI keeps
    /// the scheme and authority), the plugin's own `Proxy-Authorization` replaced by the host's.
    pub(super) fn address<B>(&self, request: &mut http::Request<B>) {
        let headers = request.headers_mut();
        headers.remove(PROXY_AUTHORIZATION);
        if let Some(auth) = &self.authorization {
            headers.insert(PROXY_AUTHORIZATION, auth.clone());
        }
    }

    /// Opens a tunnel to `origin` through the proxy, on `stream` (a connection to the proxy):
    /// `CONNECT host:port`, and the connection itself once the proxy answers 2xx. Unbounded
    /// in time: the caller bounds it.
    pub(super) async fn tunnel(
        &self,
        stream: tokio::net::TcpStream,
        origin: &Origin,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, Refused> {
        let target = authority(origin);
        let failed = |e: hyper::Error| Refused { why: None, error: e.into() };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(failed)?;
        let mut request = http::Request::connect(target.as_str())
            .header(HOST, target.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|_| Refused { why: None, error: Error::HttpRequestUriInvalid })?;
        self.address(&mut request);
        // The connection is driven while the answer is awaited. It ends on its own once the
        // proxy answered 2xx (handing the connection over to the tunnel), or when the proxy
        // closed it: then the answer, if there is one, is ready.
        let mut conn = std::pin::pin!(conn.with_upgrades());
        let mut sending = std::pin::pin!(sender.send_request(request));
        let (answer, ended) = tokio::select! {
            answer = &mut sending => (answer, None),
            ended = &mut conn => (sending.await, Some(ended)),
        };
        let conn_ended = ended.is_some();
        let response = match (answer, ended) {
            (Ok(response), _) => response,
            (Err(e), None) => return Err(failed(e)),
            (Err(e), Some(ended)) => {
                let how = match ended {
                    Ok(()) => format!("closed the connection ({e})"),
                    Err(conn) => format!("failed ({conn})"),
                };
                // Many proxies and firewalls answer a destination they refuse so: this
                // destination's failure, not every request's.
                let why = format!("the outbound proxy {} {how} before answering CONNECT {target}", self.origin());
                return Err(Refused { why: Some(Blame::Request(why)), error: Error::ConnectionTerminated });
            }
        };
        let status = response.status();
        if !status.is_success() {
            let why = format!("the outbound proxy {} answered CONNECT {target} with {status}", self.origin());
            return Err(match status.as_u16() {
                // The host's credentials are wrong or missing: every request through the
                // proxy fails alike until an operator fixes them.
                407 => Refused { why: Some(Blame::Host(why)), error: Error::ConfigurationError },
                // The proxy's policy does not let this destination through.
                403 => Refused { why: Some(Blame::Request(why)), error: Error::ConnectionRefused },
                // It could not reach the service (502, 504, ...).
                _ => Refused { why: Some(Blame::Request(why)), error: Error::DestinationUnavailable },
            });
        }
        let upgraded = if conn_ended {
            hyper::upgrade::on(response).await
        } else {
            let (upgraded, ended) = tokio::join!(hyper::upgrade::on(response), conn);
            ended.map_err(failed)?;
            upgraded
        };
        upgraded.map(TokioIo::new).map_err(failed)
    }
}

/// A tunnel not opened: the error the plugin sees and, when the proxy said why, whose
/// failure it is and the words for the step's `last_error`.
#[derive(Debug)]
pub(super) struct Refused {
    pub(super) why: Option<Blame>,
    pub(super) error: Error,
}

/// Whose failure a refused tunnel is.
#[derive(Debug, PartialEq)]
pub(super) enum Blame {
    /// This request's: the proxy will not, or cannot, reach its destination. The attempt
    /// counts, as any failed request does.
    Request(String),
    /// The host's: its proxy is unreachable or refuses its credentials, and every request
    /// through it fails alike. The call is unavailable (not an attempt), as when the
    /// database is down, and runs again later.
    Host(String),
}

/// `host:port` of an origin, an IPv6 address in brackets: a CONNECT request's target.
fn authority(origin: &Origin) -> String {
    match &origin.host {
        Host::Name(name) => format!("{name}:{}", origin.port),
        Host::Ip(IpAddr::V4(ip)) => format!("{ip}:{}", origin.port),
        Host::Ip(IpAddr::V6(ip)) => format!("[{ip}]:{}", origin.port),
    }
}

/// Destinations reached without the proxy (`--outbound-no-proxy`): a comma-separated list of
/// host names, each matching itself and every name under it (`corp.internal` and
/// `.corp.internal` both match `pay.corp.internal`), IP addresses, CIDR blocks (`10.0.0.0/8`,
/// matched against IP addresses in URLs only: no name is resolved to decide), and `*` for
/// every destination. Ports are not part of an entry.
#[derive(Debug, Clone, Default)]
pub struct NoProxy(Vec<Bypass>);

#[derive(Debug, Clone, PartialEq)]
enum Bypass {
    All,
    Domain(String),
    Net(IpAddr, u8),
}

impl NoProxy {
    /// Parses the list; an entry that is none of the forms above is refused, naming it.
    pub fn parse(list: &str) -> Result<NoProxy, String> {
        let mut entries = Vec::new();
        let all: Vec<&str> = list.split(',').map(str::trim).filter(|e| !e.is_empty()).collect();
        if all.len() > 1 && all.contains(&"*") {
            return Err("`*` (every destination) stands alone, as curl reads it".to_owned());
        }
        for entry in all {
            entries.push(Bypass::parse(entry).map_err(|e| format!("no-proxy entry {entry:?}: {e}"))?);
        }
        Ok(NoProxy(entries))
    }

    /// `--outbound-no-proxy`'s parser.
    pub fn from_flag(list: &str) -> Result<NoProxy, String> {
        NoProxy::parse(list)
    }

    fn matches(&self, host: &Host) -> bool {
        self.0.iter().any(|b| b.matches(host))
    }
}

impl Bypass {
    fn parse(entry: &str) -> Result<Bypass, String> {
        if entry == "*" {
            return Ok(Bypass::All);
        }
        if let Some((net, bits)) = entry.split_once('/') {
            let net: IpAddr = net.parse().map_err(|_| "a CIDR block is an IP address, '/' and a prefix length")?;
            if matches!(net, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some()) {
                return Err("write an IPv4 block as IPv4 (10.0.0.0/8), not IPv4-mapped IPv6".to_owned());
            }
            let max = if net.is_ipv4() { 32 } else { 128 };
            let bits =
                bits.parse::<u8>().ok().filter(|b| *b <= max).ok_or_else(|| format!("the prefix is 0 to {max}"))?;
            return Ok(Bypass::Net(net, bits));
        }
        let bare = entry.strip_prefix('[').and_then(|e| e.strip_suffix(']')).unwrap_or(entry);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(Bypass::Net(ip, if ip.is_ipv4() { 32 } else { 128 }));
        }
        if entry.contains(':') {
            return Err("a port is not part of an entry (write the host alone)".to_owned());
        }
        let domain = entry.strip_prefix("*.").or_else(|| entry.strip_prefix('.')).unwrap_or(entry);
        match grants::parse_host(domain)? {
            Host::Name(name) => Ok(Bypass::Domain(name)),
            Host::Ip(_) => Err("not a host name".to_owned()),
        }
    }

    fn matches(&self, host: &Host) -> bool {
        match (self, host) {
            (Bypass::All, _) => true,
            (Bypass::Domain(domain), Host::Name(name)) => {
                name == domain || name.strip_suffix(domain.as_str()).is_some_and(|head| head.ends_with('.'))
            }
            (Bypass::Net(net, bits), Host::Ip(ip)) => in_block(*ip, *net, *bits),
            _ => false,
        }
    }
}

/// Whether `ip` is in the block `net/bits` (an IPv4-mapped IPv6 address counts as its IPv4).
fn in_block(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> Host {
        Origin::parse(&format!("http://{s}")).unwrap().host
    }

    #[test]
    fn a_proxy_url_needs_http_a_host_and_a_port_and_hides_its_credentials() {
        let p = Proxy::parse("http://proxy.corp.internal:3128").unwrap();
        assert_eq!(
            (p.origin().to_string(), p.authorization.is_none()),
            ("http://proxy.corp.internal:3128".into(), true)
        );
        let p = Proxy::parse("http://svc%40corp:p%3Ass@10.0.0.5:8080/").unwrap();
        assert_eq!(p.origin().to_string(), "http://10.0.0.5:8080");
        let auth = p.authorization.as_ref().unwrap();
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD.encode("svc@corp:p:ss");
        assert_eq!(auth.to_str().unwrap(), format!("Basic {token}"));
        assert!(auth.is_sensitive());
        let shown = format!("{p:?}");
        assert!(!shown.contains("p:ss") && !shown.contains(&token) && shown.contains("with credentials"), "{shown}");
        assert_eq!(Proxy::parse("http://[::1]:3128").unwrap().origin().to_string(), "http://[::1]:3128");
        for (bad, why) in [
            ("proxy:3128", "not a proxy URL"),
            ("https://proxy:3128", "plain http"),
            ("socks5://proxy:1080", "plain http"),
            ("http://proxy.internal", "give the proxy's port"),
            ("http://[::1]", "give the proxy's port"),
            ("http://proxy:3128/path", "without a path"),
            ("http://proxy:0", "port"),
            ("http://:pw@proxy:3128", "user name is empty"),
            ("http://u:%ff@proxy:3128", "not UTF-8"),
        ] {
            let err = Proxy::parse(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn the_host_s_own_machine_and_the_proxy_itself_are_never_reached_through_it() {
        let p = Proxy::parse("http://proxy.internal:3128").unwrap().bypassing(NoProxy::parse("corp.internal").unwrap());
        for (url, through) in [
            ("http://payments.example.com", true),
            ("https://10.1.2.3:8443", true),
            ("http://localhost:9001", false),
            ("http://api.localhost:9001", false),
            ("http://127.0.0.1:9001", false),
            ("http://127.8.9.1", false),
            ("http://[::1]:9001", false),
            ("http://[::ffff:127.0.0.1]:9001", false),
            ("http://proxy.internal:3128", false),
            ("http://proxy.internal:8080", true),
            ("https://pay.corp.internal", false),
        ] {
            assert_eq!(p.applies_to(&Origin::parse(url).unwrap()), through, "{url}");
        }
    }

    #[test]
    fn no_proxy_matches_names_under_a_domain_addresses_and_blocks() {
        let list = NoProxy::parse(" corp.internal, .svc.local ,*.mesh, 10.0.0.0/8, 192.168.1.7, [fd00::1], ,").unwrap();
        for (h, bypassed) in [
            ("corp.internal", true),
            ("pay.corp.internal", true),
            ("a.b.corp.internal", true),
            ("xcorp.internal", false),
            ("corp.internal.evil.com", false),
            ("svc.local", true),
            ("api.svc.local", true),
            ("x.mesh", true),
            ("10.20.30.40", true),
            ("11.0.0.1", false),
            ("192.168.1.7", true),
            ("192.168.1.8", false),
            ("[fd00::1]", true),
            ("[::ffff:10.1.1.1]", true),
            ("payments.example.com", false),
        ] {
            assert_eq!(list.matches(&host(h)), bypassed, "{h}");
        }
        assert!(NoProxy::parse("*").unwrap().matches(&host("anything.example")));
        assert!(NoProxy::parse("corp.internal,*").unwrap_err().contains("stands alone"));
        assert!(NoProxy::parse("::ffff:10.0.0.0/104").unwrap_err().contains("IPv4"));
        assert!(!NoProxy::parse("").unwrap().matches(&host("anything.example")));
        assert!(NoProxy::parse("0.0.0.0/0").unwrap().matches(&host("8.8.8.8")));
        for (bad, why) in [
            ("corp.internal:8080", "port"),
            ("10.0.0.0/33", "prefix"),
            ("nonsense/8", "CIDR"),
            ("bad_name", "host name"),
            ("1.2.3", "IPv4"),
        ] {
            let err = NoProxy::parse(bad).expect_err(bad);
            assert!(err.contains(why) && err.contains(bad), "{bad}: {err}");
        }
    }
}
