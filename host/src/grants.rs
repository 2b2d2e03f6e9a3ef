//! Outbound HTTP grants: which origins a plugin may reach (SPEC §4.1).
//!
//! Owns the [`Origin`] type (parsing, the canonical form stored and shown, matching a request
//! against it) and the rule for link-local and metadata addresses. It must not do I/O: the
//! admin API validates grants with it, the store keeps their canonical strings, and the
//! runtime checks each outgoing request with it before any connection is opened.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

/// Most origins one plugin may be granted.
pub const MAX_GRANTS: usize = 64;

/// Longest origin accepted, in bytes.
pub const MAX_ORIGIN_BYTES: usize = 256;

/// `http` or `https`: nothing else is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    /// `http` or `https`, any case; `None` for anything else.
    pub fn parse(s: &str) -> Option<Scheme> {
        if s.eq_ignore_ascii_case("http") {
            Some(Scheme::Http)
        } else if s.eq_ignore_ascii_case("https") {
            Some(Scheme::Https)
        } else {
            None
        }
    }
}

/// A host: a lower-case DNS name or an IP address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Name(String),
    Ip(IpAddr),
}

/// `scheme://host:port`, with the port made explicit: two spellings of one origin are equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    pub scheme: Scheme,
    pub host: Host,
    pub port: u16,
}

impl Origin {
    /// Parses a granted origin such as `http://127.0.0.1:9001`, `https://payments.example.com`
    /// or `http://[::1]:8080`. A path (other than a lone `/`), query, fragment or user info is
    /// refused: a grant names a whole origin, nothing finer.
    pub fn parse(s: &str) -> Result<Origin, String> {
        if s.len() > MAX_ORIGIN_BYTES {
            return Err(format!("an origin has at most {MAX_ORIGIN_BYTES} bytes"));
        }
        let (scheme, rest) =
            s.split_once("://").ok_or_else(|| format!("{s:?} is not an origin like http://host:port"))?;
        let scheme = Scheme::parse(scheme).ok_or_else(|| format!("{s:?}: the scheme must be http or https"))?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#']) {
            return Err(format!(
                "{s:?}: a grant is an origin (scheme, host and port) without a path, query or fragment"
            ));
        }
        if authority.contains('@') {
            return Err(format!("{s:?}: user info is not allowed in an origin"));
        }
        Origin::from_authority(scheme, authority).map_err(|e| format!("{s:?}: {e}"))
    }

    /// The origin of a request: its scheme and its `host[:port]` authority.
    pub fn from_authority(scheme: Scheme, authority: &str) -> Result<Origin, String> {
        let (host, port) = split_host_port(authority)?;
        let port = match port {
            None => scheme.default_port(),
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(format!("port {p:?} is not a number from 1 to 65535")),
            },
        };
        Ok(Origin { scheme, host: parse_host(host)?, port })
    }

    /// Whether reaching this address needs a grant naming it exactly: link-local addresses
    /// (169.254.0.0/16, fe80::/10) and the clouds' other metadata and agent endpoints
    /// (100.100.100.200, 168.63.129.16, fd00:ec2::/32) hand out credentials, and the
    /// unspecified "this host" addresses (0.0.0.0/8, ::) reach the host's own services; a grant
    /// of a DNS name that happens to resolve there does not cover them.
    pub fn needs_exact_grant(ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => needs_exact_grant_v4(v4),
            IpAddr::V6(v6) => {
                if let Some(v4) = v6.to_ipv4_mapped() {
                    return needs_exact_grant_v4(v4);
                }
                let s = v6.segments();
                v6.is_unspecified() || (s[0] & 0xffc0) == 0xfe80 || (s[0], s[1]) == (0xfd00, 0x0ec2)
            }
        }
    }
}

/// 169.254.0.0/16 (link-local: AWS, GCP, Azure and Oracle metadata), 0.0.0.0/8, Alibaba
/// Cloud's metadata (100.100.100.200) and Azure's WireServer (168.63.129.16).
fn needs_exact_grant_v4(v4: Ipv4Addr) -> bool {
    let o = v4.octets();
    (o[0] == 169 && o[1] == 254)
        || o[0] == 0
        || v4 == Ipv4Addr::new(100, 100, 100, 200)
        || v4 == Ipv4Addr::new(168, 63, 129, 16)
}

/// The canonical form: lower case, the port always written, IPv6 in brackets.
impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = self.scheme.as_str();
        match &self.host {
            Host::Name(name) => write!(f, "{scheme}://{name}:{}", self.port),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{scheme}://{ip}:{}", self.port),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "{scheme}://[{ip}]:{}", self.port),
        }
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(authority: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("an IPv6 address needs a closing ]")?;
        return match after {
            "" => Ok((host, None)),
            _ => after.strip_prefix(':').map(|p| (host, Some(p))).ok_or_else(|| "junk after ]".to_owned()),
        };
    }
    Ok(match authority.rsplit_once(':') {
        // "fd00::1:10" is an IPv6 address without its brackets: which part is the port?
        Some((host, _)) if host.contains(':') => return Err("an IPv6 address goes in brackets: [v6]:port".to_owned()),
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    })
}

/// A host name (lower-cased, a trailing dot dropped) or an IP address; anything else is refused.
pub(crate) fn parse_host(host: &str) -> Result<Host, String> {
    if host.is_empty() {
        return Err("the host is empty".to_owned());
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(Host::Ip(ip));
    }
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    let valid_label =
        |l: &str| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if name.is_empty() || name.len() > 253 || !name.split('.').all(valid_label) {
        return Err(format!("{host:?} is not a host name or an IP address"));
    }
    // A name made only of digits and dots is an IP address spelt oddly ("127.1"): refused,
    // so that no grant depends on how a resolver reads it.
    if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!("{host:?} is not a valid IPv4 address"));
    }
    Ok(Host::Name(name))
}

/// Parses and normalizes a list of granted origins: canonical form, duplicates dropped, order
/// kept. Refuses more than [`MAX_GRANTS`].
pub fn normalize(allowed: &[String]) -> Result<Vec<String>, String> {
    if allowed.len() > MAX_GRANTS {
        return Err(format!("at most {MAX_GRANTS} origins may be granted to one plugin"));
    }
    let mut out: Vec<String> = Vec::with_capacity(allowed.len());
    for origin in allowed {
        let canonical = Origin::parse(origin)?.to_string();
        if !out.contains(&canonical) {
            out.push(canonical);
        }
    }
    Ok(out)
}

/// Parses stored grants (canonical, as [`normalize`] returns them) once, for the checks of
/// one call. Strings that no longer parse are dropped: they grant nothing.
pub fn parse_all(granted: &[String]) -> Vec<Origin> {
    granted.iter().filter_map(|g| Origin::parse(g).ok()).collect()
}

/// Is a request to `origin` granted? Only an exact match is. A granted origin whose host is
/// an IP address names that very address, so it may be link-local; a granted name covers only
/// what it resolves to outside the link-local ranges (the caller checks the addresses).
pub fn is_granted(granted: &[Origin], origin: &Origin) -> bool {
    granted.contains(origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_normalize_to_one_spelling() {
        let got = normalize(&[
            "HTTP://LocalHost:80".into(),
            "http://localhost".into(),
            "https://Payments.Example.com/".into(),
            "http://[::1]:9001".into(),
            "http://127.0.0.1:9001".into(),
        ])
        .unwrap();
        assert_eq!(
            got,
            ["http://localhost:80", "https://payments.example.com:443", "http://[::1]:9001", "http://127.0.0.1:9001"]
        );
    }

    #[test]
    fn anything_finer_or_other_than_an_origin_is_refused() {
        for bad in [
            "127.0.0.1:9001",
            "ftp://example.com",
            "http://example.com/path",
            "http://example.com?q",
            "http://example.com#f",
            "http://user@example.com",
            "http://",
            "http://example.com:0",
            "http://example.com:70000",
            "http://exa mple.com",
            "http://127.1",
            "http://[::1",
            "http://*.example.com",
            "http://fd00::1:10",
            "http://::1",
        ] {
            assert!(Origin::parse(bad).is_err(), "{bad} must be refused");
        }
        assert!(normalize(&vec!["http://a.example".to_owned(); MAX_GRANTS + 1]).is_err());
    }

    #[test]
    fn a_request_matches_only_its_exact_origin() {
        let granted =
            parse_all(&normalize(&["http://127.0.0.1:9001".into(), "https://api.example.com".into()]).unwrap());
        let at = |s: Scheme, a: &str| is_granted(&granted, &Origin::from_authority(s, a).unwrap());
        assert!(at(Scheme::Http, "127.0.0.1:9001"));
        assert!(at(Scheme::Https, "API.example.com"));
        assert!(at(Scheme::Https, "api.example.com:443"));
        assert!(!at(Scheme::Http, "127.0.0.1:9002"));
        assert!(!at(Scheme::Https, "127.0.0.1:9001"));
        assert!(!at(Scheme::Http, "api.example.com"));
        assert!(!at(Scheme::Https, "evil.api.example.com"));
    }

    #[test]
    fn link_local_and_metadata_addresses_need_an_exact_grant() {
        for ip in [
            "169.254.169.254",
            "169.254.0.1",
            "fe80::1",
            "fd00:ec2::254",
            "fd00:ec2::23",
            "::ffff:169.254.169.254",
            "100.100.100.200",
            "168.63.129.16",
            "0.0.0.0",
            "::",
            "::ffff:0.0.0.0",
        ] {
            assert!(Origin::needs_exact_grant(ip.parse().unwrap()), "{ip}");
        }
        // Loopback and private addresses are where a company's own services live.
        for ip in ["127.0.0.1", "10.0.0.1", "192.168.1.1", "::1", "fd00:ec3::1", "8.8.8.8", "100.100.100.201"] {
            assert!(!Origin::needs_exact_grant(ip.parse().unwrap()), "{ip}");
        }
    }
}
