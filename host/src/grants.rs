//! Outbound HTTP grants: which origins a plugin may reach (SPEC §4.1), and the credentials
//! the host adds to its requests there.
//!
//! Owns the [`Origin`] type (parsing, the canonical form stored and shown, matching a request
//! against it), the rule for link-local and metadata addresses, and [`Credential`]: a header
//! the host sets on every request to one granted origin, its value a template naming secrets
//! (`Bearer ${stripe-key}`) that only the host reads (`crate::secrets`), so the plugin never
//! sees them. It must not do I/O: the admin API validates grants with it, the store keeps
//! their canonical form, and the runtime checks each outgoing request with it before any
//! connection is opened.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use http::header::HeaderName;
use serde::{Deserialize, Serialize};

/// Most origins one plugin may be granted.
pub const MAX_GRANTS: usize = 64;

/// Longest origin accepted, in bytes.
pub const MAX_ORIGIN_BYTES: usize = 256;

/// Most credentials one plugin may be granted.
pub const MAX_CREDENTIALS: usize = 16;

/// Longest credential value (the template, before its secrets are read), in bytes.
pub const MAX_CREDENTIAL_VALUE_BYTES: usize = 1024;

/// Longest secret name, in bytes.
pub const MAX_SECRET_NAME_BYTES: usize = 128;

/// Longest header name a credential may set, in bytes.
pub const MAX_HEADER_NAME_BYTES: usize = 128;

/// Everything granted to one plugin: the origins it may reach and the credentials the host
/// adds to its requests there. Serialized as the audit trail's `before` and `after`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Grants {
    /// Canonical origins ([`normalize`]).
    pub allowed_hosts: Vec<String>,
    /// Canonical credentials ([`normalize_credentials`]), each for one of `allowed_hosts`.
    pub credentials: Vec<Credential>,
}

/// A header the host sets on every request of the plugin's to one granted origin, replacing
/// any the plugin set of that name. Its value is a template: text and `${name}` references to
/// secrets the host reads from its secrets directory when it sends the request. The plugin
/// never sees the value, and nothing the host shows or stores holds more than the template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"origin": "https://api.stripe.com", "header": "Authorization", "value": "Bearer ${stripe-key}"}))]
pub struct Credential {
    /// One of the granted origins (any spelling of it; shown canonical).
    #[schema(max_length = 256)]
    pub origin: String,
    /// The header's name (any case; shown lower case). Not one the host manages itself:
    /// `host`, the framing and hop-by-hop headers, `proxy-*`, `idempotency-key`, `traceparent`,
    /// `tracestate`.
    #[schema(max_length = 128)]
    pub header: String,
    /// Visible ASCII text with at least one `${name}` reference to a secret of the host's
    /// secrets directory (`--outbound-secrets-dir`): a name is 1-128 letters, digits, `.`,
    /// `_` or `-`, starting with a letter or digit. At most 1,024 bytes.
    #[schema(max_length = 1024)]
    pub value: String,
}

/// One part of a credential's value: literal text or a secret's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    Text(&'a str),
    Secret(&'a str),
}

/// Headers the host sets or the connection owns: a credential may not name them.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "expect",
    "idempotency-key",
    "traceparent",
    "tracestate",
];

/// Checks a secret's name: 1-128 letters, digits, `.`, `_` or `-`, starting with a letter or
/// digit (so never `.`, `..` or Kubernetes' `..data`: a name is a file of the secrets
/// directory, never a path).
pub fn check_secret_name(name: &str) -> Result<(), String> {
    let first_ok = name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric());
    let rest_ok = name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !first_ok || !rest_ok || name.len() > MAX_SECRET_NAME_BYTES {
        return Err(format!(
            "{name:?} is not a secret name: 1-{MAX_SECRET_NAME_BYTES} letters, digits, '.', '_' or '-', starting \
             with a letter or digit"
        ));
    }
    Ok(())
}

/// Splits a credential's value into text and secret references, checking it: visible ASCII
/// and spaces around `${name}` references (there is no escape: a value cannot hold a literal
/// `${`), at least one reference (a value naming no secret
/// is not a credential: the plugin can set such a header itself; it is also what a shell
/// leaves of `"Bearer ${key}"` in double quotes), at most [`MAX_CREDENTIAL_VALUE_BYTES`].
pub fn pieces(value: &str) -> Result<Vec<Piece<'_>>, String> {
    if value.len() > MAX_CREDENTIAL_VALUE_BYTES {
        return Err(format!("a credential's value has at most {MAX_CREDENTIAL_VALUE_BYTES} bytes"));
    }
    if let Some(bad) = value.chars().find(|c| !matches!(c, ' '..='~')) {
        return Err(format!(
            "a credential's value is visible ASCII text and ${{name}} references; {bad:?} is not allowed"
        ));
    }
    let mut out = Vec::new();
    let mut rest = value;
    while let Some(at) = rest.find("${") {
        if at > 0 {
            out.push(Piece::Text(&rest[..at]));
        }
        let after = &rest[at + 2..];
        let end = after.find('}').ok_or("a credential's value has a ${ without its closing }")?;
        let name = &after[..end];
        check_secret_name(name)?;
        out.push(Piece::Secret(name));
        rest = &after[end + 1..];
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    if !out.iter().any(|p| matches!(p, Piece::Secret(_))) {
        return Err("a credential's value names no secret: write ${name} for the secret's file in the host's \
             --outbound-secrets-dir (in a shell, inside single quotes)"
            .to_owned());
    }
    Ok(out)
}

/// Parses a credential as the command line writes it, `ORIGIN HEADER: VALUE`
/// (`https://api.stripe.com Authorization: Bearer ${stripe-key}`): an origin, spaces, then
/// the header line as `curl -H` takes it. Checked by [`normalize_credentials`] afterwards.
pub fn parse_credential_flag(s: &str) -> Result<Credential, String> {
    let form =
        "a credential is 'ORIGIN HEADER: VALUE', e.g. 'https://api.stripe.com Authorization: Bearer ${stripe-key}'";
    let (origin, line) = s.trim().split_once(char::is_whitespace).ok_or(form)?;
    let (header, value) = line.trim_start().split_once(':').ok_or(form)?;
    Ok(Credential { origin: origin.to_owned(), header: header.trim().to_owned(), value: value.trim().to_owned() })
}

/// Checks and normalizes a plugin's credentials against its granted origins (canonical, as
/// [`normalize`] returns them): the origin canonical and granted, the header name lower case
/// and not one the host manages, one credential per (origin, header), the value a valid
/// template. An error names the entry (`credentials[1].header`) and says why.
pub fn normalize_credentials(
    allowed_hosts: &[String],
    credentials: &[Credential],
) -> Result<Vec<Credential>, (String, String)> {
    if credentials.len() > MAX_CREDENTIALS {
        return Err(("credentials".to_owned(), format!("at most {MAX_CREDENTIALS} credentials per plugin")));
    }
    let mut out: Vec<Credential> = Vec::with_capacity(credentials.len());
    for (i, c) in credentials.iter().enumerate() {
        let at = |field: &str| format!("credentials[{i}].{field}");
        let origin = Origin::parse(&c.origin).map_err(|e| (at("origin"), e))?.to_string();
        if !allowed_hosts.contains(&origin) {
            return Err((at("origin"), format!("{origin} is not among allowed_hosts: grant the origin too")));
        }
        if c.header.len() > MAX_HEADER_NAME_BYTES {
            return Err((at("header"), format!("a header name has at most {MAX_HEADER_NAME_BYTES} bytes")));
        }
        let header = HeaderName::from_bytes(c.header.as_bytes())
            .map_err(|_| (at("header"), format!("{:?} is not an HTTP header name", c.header)))?;
        let header = header.as_str();
        if RESERVED_HEADERS.contains(&header) || header.starts_with("proxy-") {
            return Err((at("header"), format!("{header} is set by the host or the connection, not by a credential")));
        }
        pieces(&c.value).map_err(|e| (at("value"), e))?;
        if out.iter().any(|o| o.origin == origin && o.header == header) {
            return Err((at("header"), format!("{origin} has two credentials for {header}: one per header")));
        }
        out.push(Credential { origin, header: header.to_owned(), value: c.value.clone() });
    }
    Ok(out)
}

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

/// A plugin's grants parsed once, for the checks of one call.
#[derive(Debug, Default)]
pub struct Granted {
    pub origins: Vec<Origin>,
    /// Each credential's origin, header name and value template, the last two as stored: the
    /// runtime checks them when it sets the header, and one that no longer passes holds the
    /// request back (the host's failure) rather than letting it go without its credential.
    pub credentials: Vec<(Origin, String, String)>,
}

impl Granted {
    /// The credentials to add to a request to `origin`: (header name, value template).
    pub fn credentials_for<'a>(&'a self, origin: &'a Origin) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.credentials.iter().filter(move |(o, _, _)| o == origin).map(|(_, h, v)| (h.as_str(), v.as_str()))
    }
}

/// Parses stored grants (canonical, as [`normalize`] and [`normalize_credentials`] return
/// them). Origins that no longer parse are dropped: they grant nothing, and no request can be
/// made to them.
pub fn parse_all(granted: &Grants) -> Granted {
    Granted {
        origins: granted.allowed_hosts.iter().filter_map(|g| Origin::parse(g).ok()).collect(),
        credentials: granted
            .credentials
            .iter()
            .filter_map(|c| Some((Origin::parse(&c.origin).ok()?, c.header.clone(), c.value.clone())))
            .collect(),
    }
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
        let allowed_hosts = normalize(&["http://127.0.0.1:9001".into(), "https://api.example.com".into()]).unwrap();
        let granted = parse_all(&Grants { allowed_hosts, credentials: vec![] }).origins;
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

    fn credential(origin: &str, header: &str, value: &str) -> Credential {
        Credential { origin: origin.into(), header: header.into(), value: value.into() }
    }

    #[test]
    fn a_credential_value_is_text_around_secret_references() {
        assert_eq!(pieces("Bearer ${stripe-key}").unwrap(), [Piece::Text("Bearer "), Piece::Secret("stripe-key")]);
        assert_eq!(
            pieces("${user}:${pass.v2}$x").unwrap(),
            [Piece::Secret("user"), Piece::Text(":"), Piece::Secret("pass.v2"), Piece::Text("$x")]
        );
        for (bad, why) in [
            ("Bearer key", "names no secret"),
            ("Bearer ", "names no secret"),
            ("Bearer ${key", "closing }"),
            ("${}", "not a secret name"),
            ("${../etc/passwd}", "not a secret name"),
            ("${..data}", "not a secret name"),
            ("${.hidden}", "not a secret name"),
            ("${a b}", "not a secret name"),
            ("Bearer ${key}\r\nX-Evil: 1", "not allowed"),
            ("caf\u{e9} ${key}", "not allowed"),
            ("Bearer\t${key}", "not allowed"),
        ] {
            let e = pieces(bad).expect_err(bad);
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(pieces(&format!("${{k}}{}", "x".repeat(MAX_CREDENTIAL_VALUE_BYTES))).is_err());
        assert!(check_secret_name(&"k".repeat(MAX_SECRET_NAME_BYTES)).is_ok());
        assert!(check_secret_name(&"k".repeat(MAX_SECRET_NAME_BYTES + 1)).is_err());
    }

    #[test]
    fn credentials_normalize_against_the_granted_origins() {
        let allowed = normalize(&["https://api.example.com".into(), "http://127.0.0.1:9002".into()]).unwrap();
        let got = normalize_credentials(
            &allowed,
            &[
                credential("HTTPS://API.example.com/", "Authorization", "Bearer ${api}"),
                credential("http://127.0.0.1:9002", "X-Api-Key", "${key}"),
            ],
        )
        .unwrap();
        assert_eq!(
            got,
            [
                credential("https://api.example.com:443", "authorization", "Bearer ${api}"),
                credential("http://127.0.0.1:9002", "x-api-key", "${key}"),
            ]
        );
        let refused = |c: Credential, field: &str, why: &str| {
            let (at, e) = normalize_credentials(&allowed, &[credential("https://api.example.com", "x-a", "${a}"), c])
                .expect_err(field);
            assert_eq!(at, format!("credentials[1].{field}"), "{e}");
            assert!(e.contains(why), "{field}: {e}");
        };
        refused(credential("https://other.example.com", "x-b", "${b}"), "origin", "not among allowed_hosts");
        refused(credential("api.example.com", "x-b", "${b}"), "origin", "not an origin");
        refused(credential("https://api.example.com", "X-A", "${b}"), "header", "two credentials");
        refused(credential("https://api.example.com", "bad header", "${b}"), "header", "not an HTTP header");
        refused(credential("https://api.example.com", &"x".repeat(129), "${b}"), "header", "at most 128");
        for reserved in
            ["Host", "Content-Length", "Transfer-Encoding", "Proxy-Authorization", "Idempotency-Key", "traceparent"]
        {
            refused(credential("https://api.example.com", reserved, "${b}"), "header", "set by the host");
        }
        refused(credential("https://api.example.com", "x-b", "plain"), "value", "names no secret");
        let many = vec![credential("https://api.example.com", "x-a", "${a}"); MAX_CREDENTIALS + 1];
        assert_eq!(normalize_credentials(&allowed, &many).unwrap_err().0, "credentials");
    }

    #[test]
    fn a_credential_flag_is_an_origin_and_a_header_line() {
        assert_eq!(
            parse_credential_flag("https://api.stripe.com  Authorization: Bearer ${stripe-key} ").unwrap(),
            credential("https://api.stripe.com", "Authorization", "Bearer ${stripe-key}")
        );
        assert_eq!(
            parse_credential_flag("http://127.0.0.1:9002 X-Api-Key:${k}").unwrap(),
            credential("http://127.0.0.1:9002", "X-Api-Key", "${k}")
        );
        for bad in ["https://api.stripe.com", "https://api.stripe.com Authorization", ""] {
            assert!(parse_credential_flag(bad).unwrap_err().contains("ORIGIN HEADER: VALUE"), "{bad}");
        }
    }

    #[test]
    fn parsed_grants_give_each_origin_its_own_credentials() {
        let allowed_hosts = normalize(&["https://api.example.com".into(), "http://127.0.0.1:9002".into()]).unwrap();
        let credentials = normalize_credentials(
            &allowed_hosts,
            &[credential("https://api.example.com", "authorization", "Bearer ${api}")],
        )
        .unwrap();
        let granted = parse_all(&Grants { allowed_hosts, credentials });
        let api = Origin::parse("https://api.example.com").unwrap();
        let local = Origin::parse("http://127.0.0.1:9002").unwrap();
        let got: Vec<_> = granted.credentials_for(&api).collect();
        assert_eq!(got, [("authorization", "Bearer ${api}")]);
        // A stored credential that no longer passes is kept, for the runtime to refuse.
        let stale = Grants {
            allowed_hosts: vec![api.to_string()],
            credentials: vec![credential(&api.to_string(), "bad header", "${x}")],
        };
        assert_eq!(parse_all(&stale).credentials_for(&api).count(), 1);
        assert_eq!(granted.credentials_for(&local).count(), 0);
    }
}
