//! Outbound HTTP of `sagahost:plugin@0.2.0` plugins: the hooks behind
//! `wasi:http/outgoing-handler` (SPEC §4.1).
//!
//! wasmtime-wasi-http turns the plugin's request into an `http::Request` and hands it to
//! [`Outbound::send_request`]; everything the host decides about it happens here, in order:
//! 1. the request count of the call ([`HttpLimits::max_requests`]);
//! 2. the headers the host adds: `Idempotency-Key` (the call's key, `:{n}` from the second
//!    request on) unless the plugin set one, and a W3C `traceparent` of the attempt;
//! 3. the grant: the plugin's granted origins, read from the database on its first request of
//!    the call, must contain the request's origin exactly; otherwise `HTTP-request-denied`
//!    and no connection is opened. The credentials granted for that origin are then set as
//!    headers, replacing the plugin's own of those names, their secrets read from the host's
//!    secrets directory now (`crate::secrets`): the plugin never sees them, and a secret
//!    that cannot be read is the host's failure (the call is unavailable, no attempt spent);
//! 4. the address: a host name is resolved here, and a link-local or metadata address is
//!    refused unless a grant names that very IP; the request then connects to one of the
//!    addresses that were checked (no second lookup that could rebind the name), trying them
//!    in turn ([`connect_first`]); `https` then verifies the server's certificate against the
//!    name the plugin asked for, chained to the public CAs or an operator's own
//!    ([`TlsTrust`], `--outbound-ca-file`);
//! 5. time: every request ends when the call's timeout does, and so does reading its body,
//!    never later: time credited back for slow state reads lets the plugin's code run on,
//!    but not its requests ([`Deadline::outbound_until`]), which the driver promised to have
//!    over before it may compensate the step; a request made after that fails at once;
//! 6. size: a response body past [`HttpLimits::max_response_bytes`] fails with
//!    `HTTP-response-body-size` as it streams, so it is never held whole.
//!
//! Every request is counted for metrics ([`RequestMade`]: the granted origin, the status class
//! or why no response came, the time to its head); the driver records them per plugin.
//!
//! What the plugin did wrong against a limit is kept in [`Notes::limit`] and prefixed to the
//! attempt's error by `call.rs`, so `last_error` says which limit; a grant read that failed
//! for the database's sake is kept in [`Notes::host_error`] and makes the call unavailable
//! (one cut short because the call's own time was running out fails the request instead).
//!
//! Memory: a request the plugin builds but has not sent is held by the host (a body's
//! buffered write up to [`BODY_CHUNK_BYTES`], a header set up to [`FIELDS_BYTES`], a method
//! and an authority up to [`super::call::MAX_REQUEST_PART_BYTES`] each, a path up to its
//! parser's 64 KiB), outside the call's memory limit; the call's resource table holds at
//! most [`HttpLimits::max_resources`] of them, and a plugin past it traps. What is counted of
//! each request for metrics (and recorded by `plugin run`) stops at the first request past
//! [`HttpLimits::max_requests`].
//!
//! This module must not name a world version's generated types.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest as _, Sha256};
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use super::call::Deadline;
use super::proxy::{Blame, Proxy};
use super::{OutboundRequest, PluginReader, RequestMade};
use crate::grants::{self, Host, Origin, Scheme};

/// Limits on a call's outbound HTTP, and whom its `https` requests trust. Configurable on the
/// command line.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Requests one call may make.
    pub max_requests: u32,
    /// Largest response body one request may return, in bytes.
    pub max_response_bytes: u64,
    /// The certificate authorities an `https` server's certificate must chain to.
    pub trust: TlsTrust,
    /// The egress proxy requests go through, if any (`--outbound-proxy`).
    pub proxy: Option<Arc<Proxy>>,
    /// Where the secrets that credentials name are read (`--outbound-secrets-dir`).
    pub secrets: Option<crate::secrets::Secrets>,
}

/// The certificate authorities an `https` request's server must chain to: the public ones
/// browsers trust (Mozilla's set, from webpki-roots) and any an operator adds for services
/// whose certificates a private CA issued (`--outbound-ca-file`). One TLS client configuration,
/// built at start-up and shared by every call (its session cache with it).
#[derive(Clone)]
pub struct TlsTrust {
    config: Arc<rustls::ClientConfig>,
    roots: Arc<rustls::RootCertStore>,
    /// How many certificates the operator added (for `Debug`).
    added: usize,
    /// Whether the host presents a client certificate to servers that ask for one.
    presents: bool,
}

/// The certificate chain the host presents to `https` services that ask for a client
/// certificate (mutual TLS, `--outbound-client-cert`): the host's own certificate first, and
/// the file it was read from (watched for a renewal: [`ClientIdentity`]).
#[derive(Clone)]
pub struct ClientCertChain {
    path: PathBuf,
    /// The file as it was just before it was read.
    stamp: FileStamp,
    certs: Vec<CertificateDer<'static>>,
}

/// The private key of that certificate (`--outbound-client-key`), and its file.
#[derive(Clone)]
pub struct ClientKey {
    path: PathBuf,
    stamp: FileStamp,
    key: Arc<PrivateKeyDer<'static>>,
}

impl ClientCertChain {
    /// `--outbound-client-cert`'s parser: a PEM file of one or more certificates, read at once.
    pub fn from_flag(path: &str) -> Result<ClientCertChain, String> {
        let path = PathBuf::from(path);
        let stamp = stamp(&path);
        let certs = read_certificates(&path).map_err(|e| format!("{e:#}"))?;
        Ok(ClientCertChain { path, stamp, certs })
    }
}

impl ClientKey {
    /// `--outbound-client-key`'s parser: a PEM file holding a private key (PKCS#8, PKCS#1 or
    /// SEC1), read at once.
    pub fn from_flag(path: &str) -> Result<ClientKey, String> {
        let path = PathBuf::from(path);
        let stamp = stamp(&path);
        let key = read_private_key(&path)?;
        Ok(ClientKey { path, stamp, key: Arc::new(key) })
    }
}

/// The private key of a PEM file; an error names the file and never shows the key.
fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    use rustls::pki_types::pem::PemObject as _;
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("{}: no private key in it (a PEM `BEGIN PRIVATE KEY` block): {e}", path.display()))
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientKey({})", self.path.display())
    }
}

impl std::fmt::Debug for ClientCertChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientCertChain({} certificates from {})", self.certs.len(), self.path.display())
    }
}

/// How often the client certificate's files are looked at for a renewal.
const IDENTITY_RECHECK: Duration = Duration::from_secs(10);

/// What tells a file's content changed without reading it: its inode, size, modification
/// and change times (a copy that keeps the modification time still changes the change time
/// or the inode); `None` while it cannot be read.
type FileStamp = Option<(u64, u64, i64, i64, i64, i64)>;

fn stamp(path: &Path) -> FileStamp {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.size(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()))
}

/// The host's client certificate as rustls asks for it at each handshake with a service that
/// wants one: the pair read at start, replaced when a renewal is read. A handshake only
/// clones what is there (no file is touched on the way): a thread of its own
/// ([`watch_identity`]) looks at the files every [`IDENTITY_RECHECK`] and reads them when
/// they changed, so a renewed certificate (cert-manager rewriting a Kubernetes secret, a cron
/// job) is presented from the next handshake on, without a restart, and a hung mount holds up
/// that thread alone. A renewal that cannot be used (a key that is not the certificate's, as
/// while one file is written and not yet the other, or a file that does not parse) is logged,
/// and the previous pair is presented until a usable one is there: never none.
#[derive(Debug)]
struct ClientIdentity {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl rustls::client::ResolvesClientCert for ClientIdentity {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner())))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The TLS sessions the host may resume, forgotten when the client certificate is renewed: a
/// resumed session skips client authentication and carries the identity of the handshake that
/// made it, so with the sessions kept, a renewed certificate would not be presented to a
/// service for as long as it keeps issuing tickets.
#[derive(Debug)]
struct Sessions(std::sync::RwLock<Arc<rustls::client::ClientSessionMemoryCache>>);

impl Sessions {
    fn new() -> Sessions {
        Sessions(std::sync::RwLock::new(Sessions::empty()))
    }

    /// As many as rustls keeps by default.
    fn empty() -> Arc<rustls::client::ClientSessionMemoryCache> {
        Arc::new(rustls::client::ClientSessionMemoryCache::new(256))
    }

    fn now(&self) -> Arc<rustls::client::ClientSessionMemoryCache> {
        Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn forget(&self) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Sessions::empty();
    }
}

impl rustls::client::ClientSessionStore for Sessions {
    fn set_kx_hint(&self, server: rustls::pki_types::ServerName<'static>, group: rustls::NamedGroup) {
        self.now().set_kx_hint(server, group);
    }

    fn kx_hint(&self, server: &rustls::pki_types::ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.now().kx_hint(server)
    }

    fn set_tls12_session(
        &self,
        server: rustls::pki_types::ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.now().set_tls12_session(server, value);
    }

    fn tls12_session(
        &self,
        server: &rustls::pki_types::ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.now().tls12_session(server)
    }

    fn remove_tls12_session(&self, server: &rustls::pki_types::ServerName<'static>) {
        self.now().remove_tls12_session(server);
    }

    fn insert_tls13_ticket(
        &self,
        server: rustls::pki_types::ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.now().insert_tls13_ticket(server, value);
    }

    fn take_tls13_ticket(
        &self,
        server: &rustls::pki_types::ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.now().take_tls13_ticket(server)
    }
}

/// What the watching thread needs; it holds the identity and the sessions weakly, and ends
/// once the configuration that uses them is gone.
struct Watch {
    cert: PathBuf,
    key: PathBuf,
    stamps: [FileStamp; 2],
    provider: Arc<rustls::crypto::CryptoProvider>,
    identity: std::sync::Weak<ClientIdentity>,
    sessions: std::sync::Weak<Sessions>,
    every: Duration,
}

/// Every `every`, reads the pair again if either file changed, and on success presents it
/// from then on (the sessions made with the old one forgotten). A failed read leaves the
/// stamps as they were, so it is tried again at the next look while the files stay changed.
fn watch_identity(mut w: Watch) {
    loop {
        std::thread::sleep(w.every);
        let (Some(identity), Some(sessions)) = (w.identity.upgrade(), w.sessions.upgrade()) else { return };
        let stamps = [stamp(&w.cert), stamp(&w.key)];
        if stamps == w.stamps {
            continue;
        }
        let renewed = read_certificates(&w.cert)
            .map_err(|e| format!("{e:#}"))
            .and_then(|certs| certified(certs, read_private_key(&w.key)?, &w.provider));
        match renewed {
            Ok(renewed) => {
                *identity.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(renewed);
                sessions.forget();
                w.stamps = stamps;
                tracing::info!(cert = %w.cert.display(), "client certificate renewed: presenting the new one");
            }
            Err(e) => tracing::warn!(cert = %w.cert.display(), error = %e,
                "the client certificate's files changed but cannot be used; presenting the previous one"),
        }
    }
}

/// A certificate chain and its key as one identity, refused when the key is not the
/// certificate's or is of a kind rustls cannot sign with.
fn certified(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<rustls::sign::CertifiedKey, String> {
    rustls::sign::CertifiedKey::from_der(certs, key, provider)
        .map_err(|e| format!("the client certificate and key cannot be used together: {e}"))
}

/// Every certificate of a PEM file, at least one. An error names the file and says what is
/// wrong: unreadable, not PEM, no certificate in it.
fn read_certificates(path: &std::path::Path) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject as _;
    let pem = std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{}: no certificate in it (a PEM `BEGIN CERTIFICATE` block)", path.display());
    }
    Ok(certs)
}

impl TlsTrust {
    /// The public CAs only.
    pub fn public() -> TlsTrust {
        static PUBLIC: std::sync::OnceLock<TlsTrust> = std::sync::OnceLock::new();
        PUBLIC.get_or_init(|| TlsTrust::with(Vec::new()).expect("no certificate added")).clone()
    }

    /// The public CAs and every certificate of a PEM file. An error names the file and says
    /// what is wrong: unreadable, not PEM, no certificate in it, or one rustls cannot use as
    /// a trust anchor.
    pub fn with_pem_file(path: &std::path::Path) -> anyhow::Result<TlsTrust> {
        let certs = read_certificates(path)?;
        TlsTrust::with(certs).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// The same trust, presenting `chain` and its `key` to servers that ask for a client
    /// certificate (mutual TLS); servers that do not ask are sent nothing. Refused when the
    /// key is not the certificate's, or of a kind rustls cannot sign with. The pair's files
    /// are read again when they change ([`ClientIdentity`]).
    pub fn presenting(&self, chain: &ClientCertChain, key: &ClientKey) -> Result<TlsTrust, String> {
        self.presenting_rechecked(chain, key, IDENTITY_RECHECK)
    }

    fn presenting_rechecked(
        &self,
        chain: &ClientCertChain,
        key: &ClientKey,
        every: Duration,
    ) -> Result<TlsTrust, String> {
        let builder = rustls::ClientConfig::builder().with_root_certificates(Arc::clone(&self.roots));
        let provider = Arc::clone(builder.crypto_provider());
        let pair = certified(chain.certs.clone(), key.key.clone_key(), &provider)?;
        let identity = Arc::new(ClientIdentity { current: std::sync::RwLock::new(Arc::new(pair)) });
        let sessions = Arc::new(Sessions::new());
        let mut config =
            builder.with_client_cert_resolver(Arc::clone(&identity) as Arc<dyn rustls::client::ResolvesClientCert>);
        config.resumption =
            rustls::client::Resumption::store(Arc::clone(&sessions) as Arc<dyn rustls::client::ClientSessionStore>);
        let watch = Watch {
            cert: chain.path.clone(),
            key: key.path.clone(),
            stamps: [chain.stamp, key.stamp],
            provider,
            identity: Arc::downgrade(&identity),
            sessions: Arc::downgrade(&sessions),
            every,
        };
        std::thread::Builder::new()
            .name("client-cert-watch".into())
            .spawn(move || watch_identity(watch))
            .map_err(|e| format!("cannot start watching the client certificate: {e}"))?;
        Ok(TlsTrust { config: Arc::new(config), presents: true, ..self.clone() })
    }

    /// `--outbound-ca-file`'s parser (serve and `plugin run`): the file read at once, so a bad
    /// one stops the command before it starts, saying why.
    pub fn from_flag(path: &str) -> Result<TlsTrust, String> {
        TlsTrust::with_pem_file(std::path::Path::new(path)).map_err(|e| format!("{e:#}"))
    }

    fn with(added: Vec<rustls::pki_types::CertificateDer<'static>>) -> Result<TlsTrust, rustls::Error> {
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        let count = added.len();
        for cert in added {
            roots.add(cert)?;
        }
        let roots = Arc::new(roots);
        let config = rustls::ClientConfig::builder().with_root_certificates(Arc::clone(&roots)).with_no_client_auth();
        Ok(TlsTrust { config: Arc::new(config), roots, added: count, presents: false })
    }
}

impl std::fmt::Debug for TlsTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let presents = if self.presents { ", presenting a client certificate" } else { "" };
        write!(f, "TlsTrust {{ public CAs and {} added{presents} }}", self.added)
    }
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_requests: 16,
            max_response_bytes: 1 << 20,
            trust: TlsTrust::public(),
            proxy: None,
            secrets: None,
        }
    }
}

/// The most bytes one write to an outgoing request's body may hand the host, which holds it
/// until the request is sent (wasi-http's default is 1 MiB). A body is streamed, so a larger
/// body takes more writes; the host holds at most this much of each body it was not sent yet.
pub(super) const BODY_CHUNK_BYTES: usize = 64 << 10;

/// The largest header set (`fields`) a plugin may build, in bytes (wasi-http's default is
/// 128 KiB): enough for any header a service expects, a bearer token included.
pub(super) const FIELDS_BYTES: usize = 32 << 10;

impl HttpLimits {
    /// How many host resources (requests, header sets, bodies, streams, pollables, and WASI's
    /// own) one call may hold at once. Every one costs the host memory outside the call's
    /// memory limit (a body up to [`BODY_CHUNK_BYTES`], a header set up to [`FIELDS_BYTES`]),
    /// and a plugin can make them without sending anything: without a bound, one call could
    /// hold gigabytes. A request and what it takes to read its answer is about ten, most
    /// dropped as soon as it is read; the standard streams and clocks a few more.
    pub fn max_resources(&self) -> usize {
        256 + 8 * self.max_requests as usize
    }
}

/// What the host noticed during a call's requests, read by `call.rs` when the call ends.
#[derive(Debug, Default)]
pub(super) struct Notes {
    /// The first limit the plugin ran into, worded for `last_error`.
    pub(super) limit: Option<String>,
    /// The host could not read the plugin's grants (its database failed).
    pub(super) host_error: Option<String>,
    /// A request left the host (it passed the grant check and a connection was tried): if
    /// the call fails, the service may have applied it.
    pub(super) reached_out: bool,
    /// The call ended and its notes were read ([`Outbound::notes`]): no request leaves the
    /// host after that. A request the plugin left running when it returned goes on in a task
    /// of its own until the store is dropped; had it left after `reached_out` was read, the
    /// step would count as never having reached the service (a charge with no refund).
    closed: bool,
}

/// The hooks of one call's store.
pub(super) struct Outbound {
    call: Arc<CallFacts>,
}

/// What every request of one call needs; shared with the tasks that send them.
struct CallFacts {
    plugin: String,
    idempotency_key: String,
    saga_id: String,
    attempt: u32,
    /// Computed on the first request: most calls make none.
    traceparent: std::sync::OnceLock<HeaderValue>,
    reader: Arc<dyn PluginReader>,
    limits: HttpLimits,
    deadline: Arc<Deadline>,
    sent: AtomicU32,
    /// The plugin's granted origins and credentials, parsed; read on its first request.
    grants: tokio::sync::OnceCell<Result<grants::Granted, Option<String>>>,
    notes: Mutex<Notes>,
    /// Every request and how it went, when the runtime records calls (`Runtime::recording`).
    recorded: Option<Mutex<Vec<OutboundRequest>>>,
    /// Every request's origin, outcome and time, for metrics: a tally opened when the plugin
    /// sends it, closed when it ends.
    made: Mutex<Vec<Tally>>,
}

/// One request as metrics count it, while the call runs (see [`RequestMade`]).
struct Tally {
    origin: Option<Origin>,
    started: Instant,
    /// Set by the host on the way: the request failed at the egress proxy (`proxy`), or was
    /// made after the call's time for requests was up (`late`).
    why: Option<&'static str>,
    /// How it ended and when; `None` while it has not (or never will: dropped unanswered).
    ended: Option<(&'static str, Duration, bool)>,
}

impl Outbound {
    pub(super) fn new(
        plugin: &str,
        info: &super::CallInfo,
        reader: Arc<dyn PluginReader>,
        limits: HttpLimits,
        deadline: Arc<Deadline>,
        record: bool,
    ) -> Outbound {
        Outbound {
            call: Arc::new(CallFacts {
                plugin: plugin.to_owned(),
                idempotency_key: info.idempotency_key.clone(),
                saga_id: info.saga_id.clone(),
                attempt: info.attempt,
                traceparent: std::sync::OnceLock::new(),
                reader,
                limits,
                deadline,
                sent: AtomicU32::new(0),
                grants: tokio::sync::OnceCell::new(),
                notes: Mutex::new(Notes::default()),
                recorded: record.then(|| Mutex::new(Vec::new())),
                made: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The requests recorded during the call (none unless it records). Taken once, when the
    /// call ends.
    pub(super) fn requests(&self) -> Vec<OutboundRequest> {
        match &self.call.recorded {
            Some(list) => std::mem::take(&mut *list.lock().unwrap_or_else(|e| e.into_inner())),
            None => Vec::new(),
        }
    }

    /// Every request the call made, for metrics. Taken once, when the call ends: a request
    /// still out then (its future dropped by the plugin, or the call over) is `abandoned`, timed
    /// until now. Its origin is named only if the plugin is granted it: a label value a plugin
    /// cannot make up.
    pub(super) fn made(&self) -> Vec<RequestMade> {
        let tallies = std::mem::take(&mut *self.call.made.lock().unwrap_or_else(|e| e.into_inner()));
        let granted = match self.call.grants.get() {
            Some(Ok(granted)) => granted.origins.as_slice(),
            _ => &[],
        };
        tallies
            .into_iter()
            .map(|t| {
                let origin = match &t.origin {
                    Some(origin) if grants::is_granted(granted, origin) => origin.to_string(),
                    _ => "-".to_owned(),
                };
                let (outcome, elapsed, responded) = t.ended.unwrap_or(("abandoned", t.started.elapsed(), false));
                RequestMade { origin, outcome, elapsed, responded }
            })
            .collect()
    }

    /// Notes that the plugin set a request's `part` (its method or authority) `len` bytes long,
    /// over [`super::call::MAX_REQUEST_PART_BYTES`], and was refused.
    pub(super) fn refused_part(&self, part: &str, len: usize) {
        self.call.note_limit(format!(
            "the plugin set a request {part} of {len} bytes (at most {} are taken)",
            super::call::MAX_REQUEST_PART_BYTES
        ));
    }

    /// What was noticed during the call. Taken once, when the call ends: from then on no
    /// request leaves the host ([`Notes::closed`]).
    pub(super) fn notes(&self) -> Notes {
        let mut notes = self.call.notes.lock().unwrap_or_else(|e| e.into_inner());
        notes.closed = true;
        Notes {
            limit: notes.limit.take(),
            host_error: notes.host_error.take(),
            reached_out: notes.reached_out,
            closed: true,
        }
    }
}

/// A W3C `traceparent` for one attempt: the trace is the saga (the same id on every attempt
/// and step, so a service's traces group by saga), the parent span is the attempt.
fn traceparent(saga_id: &str, idempotency_key: &str, attempt: u32) -> HeaderValue {
    let trace = Sha256::digest(saga_id.as_bytes());
    let span = Sha256::digest(format!("{idempotency_key}:{attempt}").as_bytes());
    let value = format!("00-{}-{}-01", hex::encode(&trace[..16]), hex::encode(&span[..8]));
    HeaderValue::from_str(&value).expect("hex digits are a valid header value")
}

type Sent = Result<(http::Response<WasiBody>, Box<dyn Future<Output = Result<(), Error>> + Send>), Error>;

impl WasiHttpHooks for Outbound {
    fn p2_outgoing_body_chunk_size(&mut self) -> usize {
        BODY_CHUNK_BYTES
    }

    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        _options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Box<dyn Future<Output = Sent> + Send> {
        // Counted for metrics, whatever becomes of it ([`Outbound::made`]); past the first
        // request over the call's limit (refused, `limit`) no more: a plugin looping on
        // refused requests would grow the list without bound, outside its memory limit.
        let slot = {
            let mut made = self.call.made.lock().unwrap_or_else(|e| e.into_inner());
            if made.len() <= self.call.limits.max_requests as usize {
                made.push(Tally {
                    origin: request_origin(request.uri()),
                    started: Instant::now(),
                    why: None,
                    ended: None,
                });
                made.len() - 1
            } else {
                usize::MAX
            }
        };
        let call = Arc::clone(&self.call);
        let sending = Box::into_pin(self.record(request, slot));
        Box::new(async move {
            let sent = sending.await;
            let mut made = call.made.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(tally) = made.get_mut(slot) {
                let (outcome, responded) = match &sent {
                    Ok((response, _)) => (status_class(response.status()), true),
                    Err(e) => (tally.why.unwrap_or_else(|| failure_kind(e)), false),
                };
                tally.ended = Some((outcome, tally.started.elapsed(), responded));
            }
            drop(made);
            sent
        })
    }
}

/// A request's origin, if its URL has one.
fn request_origin(uri: &http::Uri) -> Option<Origin> {
    let scheme = uri.scheme_str().and_then(Scheme::parse)?;
    Origin::from_authority(scheme, uri.authority()?.as_str()).ok()
}

/// `2xx` and the like: a response's status class, the label metrics count it under.
fn status_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Why no response came, in a word for metrics (the host's own reasons, `proxy` and `late`,
/// are set on the way: [`CallFacts::tally_why`]).
fn failure_kind(e: &Error) -> &'static str {
    match e {
        Error::HttpRequestDenied => "denied",
        Error::ConnectionLimitReached => "limit",
        Error::HttpRequestUriInvalid => "invalid",
        Error::DnsTimeout | Error::DnsError { .. } | Error::DestinationNotFound => "dns",
        Error::Connect(_)
        | Error::ConnectionRefused
        | Error::ConnectionTerminated
        | Error::DestinationUnavailable
        | Error::DestinationIpProhibited
        | Error::DestinationIpUnroutable => "connect",
        Error::TlsCertificateError | Error::TlsProtocolError | Error::TlsAlertReceived { .. } | Error::Tls(_) => "tls",
        Error::ConnectionTimeout | Error::ConnectionReadTimeout | Error::ConnectionWriteTimeout => "timeout",
        Error::HttpProtocolError => "protocol",
        // The connection under the request: closed or reset before the answer, an answer that
        // is not HTTP, or hyper's own timeout.
        Error::Hyper(e) if e.is_timeout() => "timeout",
        Error::Hyper(e) if e.is_parse() || e.is_parse_status() || e.is_parse_too_large() => "protocol",
        Error::Hyper(_) => "connect",
        Error::ConfigurationError => "proxy",
        _ => "error",
    }
}

impl Outbound {
    /// [`Outbound::send`], its request kept in the call's record when the runtime records
    /// calls (`sagahost plugin run`).
    fn record(&mut self, request: http::Request<WasiBody>, slot: usize) -> Box<dyn Future<Output = Sent> + Send> {
        if self.call.recorded.is_none() {
            return self.send(request, slot);
        }
        // Taken before the host rewrites the URI to the checked address.
        let (method, url) = (request.method().clone(), request.uri().to_string());
        let call = Arc::clone(&self.call);
        let sending = self.send(request, slot);
        let Some(recorded) = &call.recorded else { return sending };
        let index = {
            // As the tallies: the requests over the limit past the first are not kept.
            let mut list = recorded.lock().unwrap_or_else(|e| e.into_inner());
            if list.len() > call.limits.max_requests as usize {
                return sending;
            }
            list.push(OutboundRequest { method: method.to_string(), url, status: None, error: None });
            list.len() - 1
        };
        Box::new(async move {
            let sent = Box::into_pin(sending).await;
            if let Some(recorded) = &call.recorded {
                let mut list = recorded.lock().unwrap_or_else(|e| e.into_inner());
                // Gone when the call ended first (the list was taken).
                if let Some(entry) = list.get_mut(index) {
                    match &sent {
                        Ok((response, _)) => entry.status = Some(response.status().as_u16()),
                        Err(e) => entry.error = Some(format!("{e:?}")),
                    }
                }
            }
            sent
        })
    }
}

impl Outbound {
    /// Sends one request of the plugin's (steps 1 to 6 of the module's doc).
    /// `slot`: the request's tally ([`CallFacts::made`]).
    fn send(&mut self, mut request: http::Request<WasiBody>, slot: usize) -> Box<dyn Future<Output = Sent> + Send> {
        let call = Arc::clone(&self.call);
        let n = call.sent.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if n > call.limits.max_requests {
            call.note_limit(format!(
                "the plugin made more than {} HTTP requests in one call (the limit; see --plugin-http-max-requests)",
                call.limits.max_requests
            ));
            return Box::new(async { Err(Error::ConnectionLimitReached) });
        }
        let headers = request.headers_mut();
        if !headers.contains_key("idempotency-key") {
            let key = match n {
                1 => call.idempotency_key.clone(),
                n => format!("{}:{n}", call.idempotency_key),
            };
            // The key is made of the saga id and step name, which are checked printable.
            if let Ok(key) = HeaderValue::from_str(&key) {
                headers.insert(HeaderName::from_static("idempotency-key"), key);
            }
        }
        // With traces on, each request is a span (a child of the plugin call's) and carries
        // its context; otherwise a `traceparent` derived from the saga and the attempt.
        let span = crate::telemetry::enabled().then(|| {
            let uri = request.uri();
            tracing::info_span!(
                "http.client",
                otel.name = %format!("{} {}", request.method(), uri.host().unwrap_or("")),
                otel.kind = "client",
                http.request.method = %request.method(),
                url.full = %uri,
                plugin = %call.plugin,
                http.response.status_code = tracing::field::Empty,
            )
        });
        let headers = request.headers_mut();
        if !headers.contains_key("traceparent") {
            let traced = span.as_ref().and_then(crate::telemetry::traceparent_of);
            match traced.and_then(|tp| HeaderValue::from_str(&tp).ok()) {
                Some(value) => {
                    headers.insert(HeaderName::from_static("traceparent"), value);
                }
                None => {
                    let value = call
                        .traceparent
                        .get_or_init(|| traceparent(&call.saga_id, &call.idempotency_key, call.attempt));
                    headers.insert(HeaderName::from_static("traceparent"), value.clone());
                }
            }
        }
        match span {
            Some(span) => Box::new(tracing::Instrument::instrument(
                async move {
                    let sent = call.send(request, slot).await;
                    if let Ok((response, _)) = &sent {
                        tracing::Span::current().record("http.response.status_code", response.status().as_u16());
                    }
                    sent
                },
                span,
            )),
            None => Box::new(async move { call.send(request, slot).await }),
        }
    }
}

impl CallFacts {
    fn note_limit(&self, why: String) {
        let mut notes = self.notes.lock().unwrap_or_else(|e| e.into_inner());
        notes.limit.get_or_insert(why);
    }

    /// Notes that a request leaves the host now, unless the call has ended
    /// ([`Notes::closed`]): then it must not, and fails.
    fn reach_out(&self) -> Result<(), Error> {
        let mut notes = self.notes.lock().unwrap_or_else(|e| e.into_inner());
        if notes.closed {
            return Err(Error::ConnectionTerminated);
        }
        notes.reached_out = true;
        Ok(())
    }

    /// The host failed this call (not the plugin): it is unavailable, not an attempt.
    fn note_host_error(&self, why: String) {
        let mut notes = self.notes.lock().unwrap_or_else(|e| e.into_inner());
        notes.host_error.get_or_insert(why);
    }

    /// Time left to have requests out ([`Deadline::outbound_until`]).
    fn remaining(&self) -> Duration {
        self.deadline.outbound_until().saturating_duration_since(Instant::now())
    }

    /// The plugin's granted origins and credentials, read and parsed once per call.
    async fn grants(&self) -> Result<&grants::Granted, Error> {
        let read = self
            .grants
            .get_or_init(|| async {
                // Bounded by the call's time left. Past a bound of half the call's timeout or
                // more, or in a call whose state reads were already slow, the database is slow
                // or gone (the host's failure: the attempt does not count); within a shorter
                // bound the plugin's own work used up, the call itself ran out of time.
                let bound = self.remaining();
                match tokio::time::timeout(bound, self.reader.grants(&self.plugin)).await {
                    Ok(Ok(granted)) => Ok(grants::parse_all(&granted)),
                    Ok(Err(e)) => Err(Some(format!("reading the plugin's grants failed: {e:#}"))),
                    Err(_) if bound < self.deadline.timeout() / 2 && !self.deadline.credited() => Err(None),
                    Err(_) => Err(Some("reading the plugin's grants took longer than the call's timeout".to_owned())),
                }
            })
            .await;
        match read {
            Ok(granted) => Ok(granted),
            Err(None) => Err(Error::ConnectionTimeout),
            Err(Some(why)) => {
                let mut notes = self.notes.lock().unwrap_or_else(|e| e.into_inner());
                notes.host_error.get_or_insert_with(|| why.clone());
                Err(Error::InternalError(Some("the host could not check this plugin's grants".to_owned())))
            }
        }
    }

    /// Says why request `slot` failed, for metrics, where the error alone would mislead.
    fn tally_why(&self, slot: usize, why: &'static str) {
        if let Some(tally) = self.made.lock().unwrap_or_else(|e| e.into_inner()).get_mut(slot) {
            tally.why.get_or_insert(why);
        }
    }

    async fn send(self: Arc<Self>, request: http::Request<WasiBody>, slot: usize) -> Sent {
        if self.remaining().is_zero() {
            self.tally_why(slot, "late");
            return Err(Error::ConnectionTimeout);
        }
        let uri = request.uri();
        let scheme = uri.scheme_str().and_then(Scheme::parse).ok_or(Error::HttpProtocolError)?;
        let authority = uri.authority().ok_or(Error::HttpRequestUriInvalid)?;
        let origin = Origin::from_authority(scheme, authority.as_str()).map_err(|_| Error::HttpRequestUriInvalid)?;
        let granted = self.grants().await?;
        if !grants::is_granted(&granted.origins, &origin) {
            tracing::info!(plugin = %self.plugin, %origin, "outbound request denied: origin not granted");
            return Err(Error::HttpRequestDenied);
        }
        let mut request = request;
        self.add_credentials(granted, &origin, &mut request).await.inspect_err(|e| {
            if !matches!(e, Error::HttpRequestDenied) {
                self.tally_why(slot, "credential");
            }
        })?;
        // Through the egress proxy, unless the destination bypasses it: the proxy's addresses
        // then, and the proxy resolves the service's name.
        let proxy = self.limits.proxy.as_deref().filter(|p| p.applies_to(&origin));
        let addresses = match proxy {
            Some(proxy) => self.resolve_proxy(proxy).await.inspect_err(|_| self.tally_why(slot, "proxy"))?,
            None => self.resolve(&origin).await?,
        };
        let at = self.deadline.outbound_until();
        // Over a connection to an address just checked: a second lookup could answer otherwise.
        // The Host header keeps the name the plugin asked for, and so does TLS (its SNI and the
        // name the certificate must be for).
        // The call has reached out once the request may leave: on a connection, past TLS's
        // handshake (no early data). A refused connection or an untrusted certificate sent
        // the service nothing, so a step failing at it has nothing out there to undo.
        let reached_out = || self.reach_out();
        let sending = async {
            let stream = connect_first(addresses).await.inspect_err(|e| {
                if let Some(proxy) = proxy {
                    self.tally_why(slot, "proxy");
                    self.note_host_error(format!("the outbound proxy {} could not be reached: {e}", proxy.origin()));
                }
            })?;
            match (scheme, proxy) {
                (Scheme::Http, None) => {
                    reached_out()?;
                    send_over(request, stream, Target::Origin).await
                }
                (Scheme::Http, Some(proxy)) => {
                    proxy.address(&mut request);
                    reached_out()?;
                    let sent = send_over(request, stream, Target::Absolute).await?;
                    // A 407 is a proxy's answer (RFC 9110 §15.5.8), most likely this one's to the
                    // host's credentials: said so, and an error to the plugin rather than a
                    // response it would read as the service's refusal. A failed attempt, not
                    // the host's failure: it may come from a proxy further on, or from the
                    // service itself, and must not make the step run again for ever. Its other
                    // answers (a 502 when it cannot reach the service, a 403 by its policy) are
                    // the plugin's to read, as behind any HTTP proxy.
                    if sent.0.status() == http::StatusCode::PROXY_AUTHENTICATION_REQUIRED {
                        self.tally_why(slot, "proxy");
                        self.note_limit(format!(
                            "the outbound proxy {} answered a request to {origin} with 407 Proxy Authentication \
                             Required (check the credentials in --outbound-proxy)",
                            proxy.origin()
                        ));
                        return Err(Error::ConfigurationError);
                    }
                    Ok(sent)
                }
                (Scheme::Https, None) => {
                    let stream = tls_handshake(stream, &origin.host, &self.limits.trust).await?;
                    reached_out()?;
                    send_over(request, stream, Target::Origin).await
                }
                (Scheme::Https, Some(proxy)) => {
                    let tunnel = proxy.tunnel(stream, &origin).await.map_err(|refused| {
                        // The proxy refused or failed the tunnel; one it could not open to the
                        // service (502: `destination unavailable`) is the service's to count.
                        if !matches!(refused.error, Error::DestinationUnavailable) {
                            self.tally_why(slot, "proxy");
                        }
                        match refused.why {
                            Some(Blame::Request(why)) => self.note_limit(why),
                            Some(Blame::Host(why)) => self.note_host_error(why),
                            None => {}
                        }
                        refused.error
                    })?;
                    let stream = tls_handshake(tunnel, &origin.host, &self.limits.trust).await?;
                    reached_out()?;
                    send_over(request, stream, Target::Origin).await
                }
            }
        };
        let (response, io) =
            tokio::time::timeout_at(at.into(), sending).await.map_err(|_| Error::ConnectionTimeout)??;
        let limit = self.limits.max_response_bytes;
        let response = response.map(|body| {
            Limited {
                inner: body,
                left: limit,
                limit,
                deadline: Box::pin(tokio::time::sleep_until(at.into())),
                call: Arc::clone(&self),
            }
            .boxed_unsync()
        });
        Ok((response, io))
    }

    /// Sets the headers of the credentials granted for `origin` (step 3 of the module's doc),
    /// replacing any the plugin set of those names, each rendered with its secrets read now.
    /// A secret that cannot be read (or a stored credential that no longer passes) is the
    /// host's failure, not the plugin's: the request is not sent, the call is unavailable
    /// (tried again in about a second, no attempt spent) and the reason, which names the secret
    /// and never its value, goes to the host's log. A `TRACE` request, which a server answers
    /// with the request it received, is refused where credentials would go: it would hand
    /// them to the plugin.
    async fn add_credentials(
        &self,
        granted: &grants::Granted,
        origin: &Origin,
        request: &mut http::Request<WasiBody>,
    ) -> Result<(), Error> {
        let mut credentials = granted.credentials_for(origin).peekable();
        // The standard echo methods, in any case (an extension method's name is the plugin's).
        let echoes = ["TRACE", "TRACK"].iter().any(|m| request.method().as_str().eq_ignore_ascii_case(m));
        if credentials.peek().is_some() && echoes {
            tracing::info!(plugin = %self.plugin, %origin, "outbound TRACE denied: the origin has credentials");
            self.note_limit(format!(
                "a {} request to {origin} was refused: the host adds credentials there, and TRACE echoes them",
                request.method()
            ));
            return Err(Error::HttpRequestDenied);
        }
        for (header, template) in credentials {
            let rendered = match HeaderName::from_bytes(header.as_bytes()) {
                Ok(name) => crate::secrets::render(self.limits.secrets.as_ref(), template).await.map(|v| (name, v)),
                Err(_) => Err(crate::secrets::Error::Template(format!("{header:?} is not a header name"))),
            };
            match rendered {
                Ok((name, value)) => {
                    request.headers_mut().insert(name, value);
                }
                Err(e) => {
                    let why = format!("the credential {header} for {origin} cannot be added: {e}");
                    tracing::error!(plugin = %self.plugin, %origin, %header, error = %e, "outbound credential unavailable");
                    self.note_host_error(why);
                    return Err(Error::InternalError(Some(
                        "the host could not add this request's credentials".to_owned(),
                    )));
                }
            }
        }
        Ok(())
    }

    /// The addresses to connect to of a granted origin: its IP itself (granted by exact
    /// address, so even a link-local one may be reached), or every address its name resolves
    /// to, in the resolver's order, provided none of them is link-local or metadata.
    async fn resolve(&self, origin: &Origin) -> Result<Vec<SocketAddr>, Error> {
        let name = match &origin.host {
            Host::Ip(ip) => return Ok(vec![SocketAddr::new(*ip, origin.port)]),
            Host::Name(name) => name.clone(),
        };
        let found = self.look_up(name, origin).await?;
        if let Some(bad) = found.iter().find(|a| Origin::needs_exact_grant(a.ip())) {
            tracing::warn!(plugin = %self.plugin, %origin, address = %bad.ip(), "outbound request denied: the name resolves to a link-local or metadata address");
            // Said first in the attempt's error: the plugin only learns "denied", and the
            // SDK's reading of that ("not granted") would send the operator to the grants.
            self.note_limit(format!(
                "{origin} resolved to {}, a link-local, metadata or unspecified address, which only a grant of that \
                 exact address reaches",
                bad.ip()
            ));
            return Err(Error::HttpRequestDenied);
        }
        Ok(found)
    }

    /// The egress proxy's addresses: the operator named it, so none is refused. A name that
    /// does not resolve is the host's failure (every request through it fails alike); a lookup
    /// cut short by the call's own time is the call's, as any slow request is.
    async fn resolve_proxy(&self, proxy: &Proxy) -> Result<Vec<SocketAddr>, Error> {
        match &proxy.host {
            Host::Ip(ip) => Ok(vec![SocketAddr::new(*ip, proxy.port)]),
            Host::Name(name) => self.look_up(name.clone(), &proxy.origin()).await.inspect_err(|e| {
                if matches!(e, Error::DestinationNotFound) {
                    self.note_host_error(format!("the outbound proxy {}'s name does not resolve", proxy.origin()));
                }
            }),
        }
    }

    /// Every address `name` resolves to (`origin` names what for, in messages), within the
    /// call's time and the bound on lookups in flight; at least one.
    async fn look_up(&self, name: String, origin: &Origin) -> Result<Vec<SocketAddr>, Error> {
        let Ok(permit) = tokio::time::timeout(self.remaining(), LOOKUPS.acquire()).await else {
            // The host's failure, not the plugin's: the slots may be held by another plugin's
            // lookups of a name whose DNS server is down, and this step must not spend its
            // attempts on that (not an attempt: it runs again, like a call with no sandbox slot).
            let mut notes = self.notes.lock().unwrap_or_else(|e| e.into_inner());
            notes.host_error.get_or_insert_with(|| {
                format!(
                    "{MAX_LOOKUPS} DNS lookups were in flight on this host (the system resolver is slow or down), \
                     and {origin} could not be looked up in the call's time"
                )
            });
            return Err(Error::DnsTimeout);
        };
        let permit = permit.expect("the lookups' semaphore is never closed");
        let found = tokio::time::timeout(self.remaining(), lookup(name, origin.port, permit))
            .await
            .map_err(|_| Error::DnsTimeout)?
            .map_err(|_| Error::DestinationNotFound)?;
        if found.is_empty() {
            return Err(Error::DestinationNotFound);
        }
        Ok(found)
    }
}

/// DNS lookups in flight at once, across every call. A lookup is the system resolver's
/// (`getaddrinfo`) on a thread of tokio's blocking pool, and nothing can stop one: with its
/// DNS server down it holds the thread for tens of seconds, whatever the call's timeout. Calls
/// retrying against such a name would otherwise fill the pool (512 threads), which also writes
/// the JSONL relay's files and compiles plugins. Past the bound a lookup waits, within its
/// call's time; a call that could not start one is the host's failure (not an attempt).
pub(super) const MAX_LOOKUPS: usize = 32;
pub(super) static LOOKUPS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_LOOKUPS);

/// The addresses `name` resolves to, looked up on the blocking pool holding `permit` (given
/// back when the lookup ends, not when its caller stops waiting).
async fn lookup(
    name: String,
    port: u16,
    permit: tokio::sync::SemaphorePermit<'static>,
) -> std::io::Result<Vec<SocketAddr>> {
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        std::net::ToSocketAddrs::to_socket_addrs(&(name.as_str(), port)).map(Iterator::collect)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// How long a connection attempt to one address has before the next address is tried beside
/// it (RFC 8305's "Connection Attempt Delay"): an address that drops packets (an IPv6 route
/// that goes nowhere) costs a quarter second, not the call's whole timeout.
const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// A connection to the first of `addresses` that takes one: they are tried in order, each
/// [`ATTEMPT_DELAY`] after the one before it or as soon as it failed, and the first to connect
/// wins (the others are dropped). A name with an IPv6 and an IPv4 address whose service
/// listens on one of them only is reached either way. Unbounded in time: the caller bounds it.
async fn connect_first(addresses: Vec<SocketAddr>) -> Result<tokio::net::TcpStream, Error> {
    let mut left = addresses.into_iter();
    let mut attempts = tokio::task::JoinSet::new();
    let mut last_error = None;
    loop {
        if attempts.is_empty() {
            match left.next() {
                Some(address) => {
                    attempts.spawn(tokio::net::TcpStream::connect(address));
                }
                None => {
                    let error = last_error.unwrap_or_else(|| std::io::Error::other("no address to connect to"));
                    return Err(Error::Connect(error));
                }
            }
        }
        tokio::select! {
            done = attempts.join_next() => match done {
                Some(Ok(Ok(stream))) => return Ok(stream),
                Some(Ok(Err(e))) => last_error = Some(e),
                Some(Err(e)) => last_error = Some(std::io::Error::other(e)),
                None => {}
            },
            () = tokio::time::sleep(ATTEMPT_DELAY), if left.len() > 0 => {
                if let Some(address) = left.next() {
                    attempts.spawn(tokio::net::TcpStream::connect(address));
                }
            }
        }
    }
}

/// The TLS client handshake on a connection to a checked address (or a tunnel to one through
/// the egress proxy): the server must present a
/// certificate for `host` (the name the plugin asked for, or the granted IP) that chains to
/// `trust`. Errors say which way it failed: the certificate (expired, another name, an
/// unknown issuer), an alert from the server, or the protocol.
async fn tls_handshake<S>(stream: S, host: &Host, trust: &TlsTrust) -> Result<tokio_rustls::client::TlsStream<S>, Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use rustls::pki_types::ServerName;
    let name = match host {
        Host::Ip(ip) => ServerName::IpAddress((*ip).into()),
        Host::Name(name) => ServerName::try_from(name.clone()).map_err(|_| Error::HttpRequestUriInvalid)?,
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&trust.config));
    connector.connect(name, stream).await.map_err(tls_error)
}

/// A failed handshake as the wasi-http error the plugin sees.
fn tls_error(e: std::io::Error) -> Error {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(_)) => Error::TlsCertificateError,
        Some(rustls::Error::AlertReceived(alert)) => {
            Error::TlsAlertReceived { alert_id: Some(u8::from(*alert)), alert_message: Some(format!("{alert:?}")) }
        }
        Some(_) => Error::TlsProtocolError,
        // The connection failed under the handshake (reset, closed).
        None => Error::Tls(e),
    }
}

/// How a request line names its target (RFC 9112 §3.2).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    /// The path only, the origin being in the Host header: to the service itself.
    Origin,
    /// The whole URL: to a forward proxy.
    Absolute,
}

/// Sends a request over HTTP/1.1 on an open connection (plain, TLS, or to a proxy). Returns
/// the response and the connection's worker, which must run for the body to arrive. Unbounded
/// in time: the caller bounds it (and the body, [`Limited`]).
async fn send_over<S>(
    mut request: http::Request<WasiBody>,
    stream: S,
    target: Target,
) -> Result<(http::Response<WasiBody>, Box<dyn Future<Output = Result<(), Error>> + Send>), Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    if target == Target::Origin {
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
        *request.uri_mut() =
            http::Uri::builder().path_and_query(path).build().map_err(|_| Error::HttpRequestUriInvalid)?;
    }
    // The connection is driven while the response head is awaited; if it ends first (the
    // service answered and closed it), the response (or the reason there is none) is ready.
    // It may end in an error after the whole response arrived: a TLS peer that closes without
    // `close_notify` (many do) after a response framed by its length. The response counts;
    // the connection's error only when there is none.
    let mut conn = Box::pin(conn);
    let sending = sender.send_request(request);
    tokio::pin!(sending);
    let (response, conn) = tokio::select! {
        response = &mut sending => (response?, Some(conn)),
        ended = &mut conn => match (sending.await, ended) {
            (Ok(response), _) => (response, None),
            (Err(_), Err(e)) | (Err(e), Ok(())) => return Err(e.into()),
        }
    };
    let worker: Box<dyn Future<Output = Result<(), Error>> + Send> = Box::new(async move {
        match conn {
            Some(conn) => conn.await.map_err(Error::from),
            None => Ok(()),
        }
    });
    Ok((response.map(|body| body.map_err(Error::from).boxed_unsync()), worker))
}

/// A response body cut off at the size limit and at the call's deadline.
struct Limited {
    inner: WasiBody,
    left: u64,
    limit: u64,
    deadline: Pin<Box<tokio::time::Sleep>>,
    call: Arc<CallFacts>,
}

impl Body for Limited {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                if len > this.left {
                    this.call.note_limit(format!(
                        "a response body was larger than {} bytes (the limit; see --plugin-http-max-response-bytes)",
                        this.limit
                    ));
                    this.left = 0;
                    return Poll::Ready(Some(Err(Error::HttpResponseBodySize(Some(this.limit)))));
                }
                this.left -= len;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Error::HttpResponseTimeout))),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An address nothing listens on (a port just freed).
    async fn closed_address() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    #[tokio::test]
    async fn a_name_whose_first_address_refuses_is_reached_on_the_next() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();
        let closed = closed_address().await;
        let stream = tokio::time::timeout(Duration::from_secs(5), connect_first(vec![closed, open]))
            .await
            .expect("a refused address is passed at once, not after the attempt delay")
            .expect("the second address listens");
        assert_eq!(stream.peer_addr().unwrap(), open);
    }

    #[tokio::test]
    async fn a_name_whose_every_address_refuses_fails_with_the_reason() {
        let (a, b) = (closed_address().await, closed_address().await);
        match connect_first(vec![a, b]).await {
            Err(Error::Connect(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused),
            other => panic!("expected a refused connection, got {:?}", other.map(|_| ())),
        }
    }

    /// Reads one request's head from `socket`, answers `hello`, and returns the head; `None`
    /// when the client closed before its request ended.
    async fn answer_hello(mut socket: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
        }
        socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello").await.unwrap();
        socket.flush().await.unwrap();
        Some(String::from_utf8(head).unwrap())
    }

    /// A `GET` of `url` with the Host header wasi-http sets (the URL's authority).
    fn get(url: &str) -> http::Request<WasiBody> {
        let body = http_body_util::Empty::<Bytes>::new().map_err(|never| match never {}).boxed_unsync();
        let uri: http::Uri = url.parse().unwrap();
        let host = uri.authority().unwrap().to_string();
        http::Request::get(uri).header("host", host).body(body).unwrap()
    }

    /// The response's status and body, its connection driven meanwhile.
    async fn read(
        sent: (http::Response<WasiBody>, Box<dyn Future<Output = Result<(), Error>> + Send>),
    ) -> (u16, Bytes) {
        let (response, worker) = sent;
        tokio::spawn(Box::into_pin(worker));
        let status = response.status().as_u16();
        (status, response.into_body().collect().await.unwrap().to_bytes())
    }

    #[test]
    fn metrics_count_a_response_by_its_class_and_a_failure_by_its_kind() {
        let classes: Vec<_> = [101, 200, 204, 302, 404, 429, 500, 503]
            .map(|s| status_class(http::StatusCode::from_u16(s).unwrap()))
            .into();
        assert_eq!(classes, ["1xx", "2xx", "2xx", "3xx", "4xx", "4xx", "5xx", "5xx"]);
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        for (error, kind) in [
            (Error::HttpRequestDenied, "denied"),
            (Error::ConnectionLimitReached, "limit"),
            (Error::DestinationNotFound, "dns"),
            (Error::DnsTimeout, "dns"),
            (Error::Connect(refused), "connect"),
            (Error::ConnectionTerminated, "connect"),
            (Error::DestinationUnavailable, "connect"),
            (Error::TlsCertificateError, "tls"),
            (Error::ConnectionTimeout, "timeout"),
            (Error::HttpProtocolError, "protocol"),
            (Error::HttpRequestUriInvalid, "invalid"),
            (Error::ConfigurationError, "proxy"),
            (Error::InternalError(None), "error"),
        ] {
            assert_eq!(failure_kind(&error), kind, "{error:?}");
        }
    }

    #[tokio::test]
    async fn plain_http_reaches_the_service_on_a_later_address_and_reads_its_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { answer_hello(listener.accept().await.unwrap().0).await });
        let stream = connect_first(vec![closed_address().await, open]).await.unwrap();
        let (status, got) =
            read(send_over(get("http://inventory.internal/stock?sku=1"), stream, Target::Origin).await.unwrap()).await;
        assert_eq!((status, &got[..]), (200, &b"hello"[..]));
        let head = server.await.unwrap().expect("the request came whole");
        assert!(head.starts_with("GET /stock?sku=1 HTTP/1.1\r\n"), "the request line names the path only: {head}");
        assert!(
            head.to_ascii_lowercase().contains("host: inventory.internal\r\n"),
            "the name the plugin asked for: {head}"
        );
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tls").join(name)
    }

    /// A TLS server on 127.0.0.1 presenting the fixture certificate for `localhost` (issued by
    /// the fixture CA, `tests/fixtures/tls`): it answers one request with `hello` and returns
    /// the request's head, or `None` when the client gave up during the handshake.
    async fn tls_server() -> (SocketAddr, tokio::task::JoinHandle<Option<String>>) {
        tls_server_asking(None).await
    }

    /// The same, asking clients for a certificate issued by the fixture CA `client_ca` (mutual
    /// TLS) when given.
    async fn tls_server_asking(client_ca: Option<&str>) -> (SocketAddr, tokio::task::JoinHandle<Option<String>>) {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<_> =
            CertificateDer::pem_file_iter(fixture("localhost.pem")).unwrap().collect::<Result<_, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_file(fixture("localhost.key")).unwrap();
        let builder = rustls::ServerConfig::builder();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(CertificateDer::from_pem_file(fixture(ca)).unwrap()).unwrap();
                builder.with_client_cert_verifier(
                    rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build().unwrap(),
                )
            }
        };
        let config = builder.with_single_cert(certs, key).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let tls = acceptor.accept(socket).await.ok()?;
            answer_hello(tls).await
        });
        (addr, server)
    }

    #[tokio::test]
    async fn https_verifies_the_server_against_an_added_ca_and_reads_its_answer() {
        let trust = TlsTrust::with_pem_file(&fixture("ca.pem")).unwrap();
        let (open, server) = tls_server().await;
        let stream = connect_first(vec![closed_address().await, open]).await.unwrap();
        let host = Host::Name("localhost".into());
        let tls = tls_handshake(stream, &host, &trust).await.expect("the server's certificate is for localhost");
        let url = format!("https://localhost:{}/charges/o-1", open.port());
        let (status, got) = read(send_over(get(&url), tls, Target::Origin).await.unwrap()).await;
        assert_eq!((status, &got[..]), (200, &b"hello"[..]));
        let head = server.await.unwrap().expect("the handshake succeeded and the request came whole");
        assert!(head.starts_with("GET /charges/o-1 HTTP/1.1\r\n"), "{head}");
        // A granted IP is checked as the certificate's IP address.
        let (open, server) = tls_server().await;
        let stream = connect_first(vec![open]).await.unwrap();
        tls_handshake(stream, &Host::Ip(open.ip()), &trust).await.expect("the certificate names 127.0.0.1");
        drop(server);
    }

    #[tokio::test]
    async fn https_refuses_a_certificate_from_an_unknown_ca_or_for_another_name() {
        let (open, _server) = tls_server().await;
        let stream = connect_first(vec![open]).await.unwrap();
        match tls_handshake(stream, &Host::Name("localhost".into()), &TlsTrust::public()).await {
            Err(Error::TlsCertificateError) => {}
            other => panic!("the fixture CA is not a public one: {:?}", other.map(|_| ())),
        }
        let trust = TlsTrust::with_pem_file(&fixture("ca.pem")).unwrap();
        let (open, _server) = tls_server().await;
        let stream = connect_first(vec![open]).await.unwrap();
        match tls_handshake(stream, &Host::Name("payments.internal".into()), &trust).await {
            Err(Error::TlsCertificateError) => {}
            other => panic!("the certificate is for localhost only: {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn a_ca_file_that_is_missing_or_holds_no_certificate_is_refused_naming_it() {
        let missing = TlsTrust::with_pem_file(&fixture("absent.pem")).unwrap_err().to_string();
        assert!(missing.contains("cannot read") && missing.contains("absent.pem"), "{missing}");
        // A key is PEM, but no certificate.
        let key = TlsTrust::with_pem_file(&fixture("localhost.key")).unwrap_err().to_string();
        assert!(key.contains("no certificate") && key.contains("localhost.key"), "{key}");
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n").unwrap();
        let err = TlsTrust::with_pem_file(&garbage).unwrap_err().to_string();
        assert!(err.contains("garbage.pem"), "{err}");
        let trust = TlsTrust::with_pem_file(&fixture("ca.pem")).unwrap();
        assert_eq!(format!("{trust:?}"), "TlsTrust { public CAs and 1 added }");
    }

    #[tokio::test]
    async fn mutual_tls_presents_the_host_s_certificate_to_a_service_that_asks() {
        let trust = TlsTrust::with_pem_file(&fixture("ca.pem")).unwrap();
        let (cert, key) = (fixture("client.pem"), fixture("client.key"));
        let chain = ClientCertChain::from_flag(cert.to_str().unwrap()).unwrap();
        let key = ClientKey::from_flag(key.to_str().unwrap()).unwrap();
        let presenting = trust.presenting(&chain, &key).unwrap();
        let host = Host::Name("localhost".into());
        let call = |open: SocketAddr, trust: TlsTrust| {
            let host = host.clone();
            async move {
                let stream = connect_first(vec![open]).await?;
                let tls = tls_handshake(stream, &host, &trust).await?;
                let url = format!("https://localhost:{}/charges/o-1", open.port());
                Ok::<_, Error>(read(send_over(get(&url), tls, Target::Origin).await?).await)
            }
        };
        let (open, server) = tls_server_asking(Some("client-ca.pem")).await;
        let (status, got) = call(open, presenting.clone()).await.expect("the service took the host's certificate");
        assert_eq!((status, &got[..]), (200, &b"hello"[..]));
        assert!(server.await.unwrap().is_some());
        // Without it the service ends the handshake, and nothing of the request is read.
        let (open, server) = tls_server_asking(Some("client-ca.pem")).await;
        assert!(call(open, trust).await.is_err(), "a service that asks is refused without one");
        assert!(server.await.unwrap().is_none(), "the service refused the handshake");
        // A service that does not ask is reached as before.
        let (open, server) = tls_server().await;
        assert_eq!(call(open, presenting).await.unwrap().0, 200);
        assert!(server.await.unwrap().is_some());
    }

    /// A TLS server that asks for a client certificate of either fixture client CA and sends
    /// the one it was shown (DER) for each connection, `None` if none. One configuration for
    /// all its connections, so a client may resume a session it had with it (rustls servers
    /// keep sessions by default), and a resumed one shows the certificate it was made with.
    async fn tls_server_recording_clients() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Option<Vec<u8>>>) {
        use rustls::pki_types::pem::PemObject as _;
        let certs: Vec<_> =
            CertificateDer::pem_file_iter(fixture("localhost.pem")).unwrap().collect::<Result<_, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_file(fixture("localhost.key")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for ca in ["client-ca.pem", "client-ca-2.pem"] {
            roots.add(CertificateDer::from_pem_file(fixture(ca)).unwrap()).unwrap();
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build().unwrap();
        let config =
            rustls::ServerConfig::builder().with_client_cert_verifier(verifier).with_single_cert(certs, key).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else { return };
                let shown = match acceptor.accept(socket).await {
                    Ok(tls) => tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()),
                    Err(_) => None,
                };
                let _ = tx.send(shown);
            }
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn a_renewed_client_certificate_is_presented_without_a_restart_and_a_broken_renewal_is_not() {
        use rustls::pki_types::pem::PemObject as _;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::copy(fixture("client.pem"), &cert).unwrap();
        std::fs::copy(fixture("client.key"), &key).unwrap();
        let chain = ClientCertChain::from_flag(cert.to_str().unwrap()).unwrap();
        let pair = ClientKey::from_flag(key.to_str().unwrap()).unwrap();
        let trust = TlsTrust::with_pem_file(&fixture("ca.pem")).unwrap();
        let presenting = trust.presenting_rechecked(&chain, &pair, Duration::from_millis(20)).unwrap();
        let der = |name: &str| Some(CertificateDer::from_pem_file(fixture(name)).unwrap().to_vec());
        let (open, server) = tls_server_recording_clients().await;
        let server = Arc::new(tokio::sync::Mutex::new(server));
        // One handshake, a request and its answer read (so TLS 1.3 tickets arrive and the next
        // handshake may resume): the certificate the service was shown.
        let shown = |trust: TlsTrust| {
            let server = Arc::clone(&server);
            async move {
                let stream = connect_first(vec![open]).await.unwrap();
                if let Ok(mut tls) = tls_handshake(stream, &Host::Name("localhost".into()), &trust).await {
                    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                    let _ = tls.write_all(b"ping").await;
                    let _ = tokio::time::timeout(Duration::from_millis(100), tls.read(&mut [0u8; 16])).await;
                }
                server.lock().await.recv().await.unwrap()
            }
        };
        // The watcher looks every 20 ms: what a handshake shows once it had its chance.
        let shown_soon = |trust: TlsTrust, want: Option<Vec<u8>>| async move {
            let start = Instant::now();
            loop {
                let got = shown(trust.clone()).await;
                if got == want || start.elapsed() > Duration::from_secs(5) {
                    return got;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        assert_eq!(shown(presenting.clone()).await, der("client.pem"));
        // Resumed with it meanwhile: a renewal must not go unseen for as long as tickets last.
        assert_eq!(shown(presenting.clone()).await, der("client.pem"));

        // Renewed: a later handshake presents the new pair.
        std::fs::copy(fixture("client-2.pem"), &cert).unwrap();
        std::fs::copy(fixture("client-2.key"), &key).unwrap();
        assert_eq!(shown_soon(presenting.clone(), der("client-2.pem")).await, der("client-2.pem"));

        // Half-written (a certificate without its key), or not PEM: the last good pair goes on,
        // look after look.
        std::fs::copy(fixture("client.pem"), &cert).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(shown(presenting.clone()).await, der("client-2.pem"));
        std::fs::write(&key, "not a key").unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(shown(presenting.clone()).await, der("client-2.pem"));
        // Once both files agree again, they are taken.
        std::fs::copy(fixture("client.key"), &key).unwrap();
        assert_eq!(shown_soon(presenting, der("client.pem")).await, der("client.pem"));
    }

    /// Reads one request head from `socket` a byte at a time (nothing past it is consumed).
    async fn read_head(socket: &mut tokio::net::TcpStream) -> String {
        use tokio::io::AsyncReadExt;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(socket.read_u8().await.unwrap());
        }
        String::from_utf8(head).unwrap()
    }

    /// A forward proxy on 127.0.0.1 for one connection: a CONNECT is answered 200 and relayed
    /// to `tunnel_to` when given, with `refusal` (a status line) otherwise. Returns the
    /// request head it read.
    async fn proxy_for_one(
        tunnel_to: Option<SocketAddr>,
        refusal: &'static str,
    ) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let head = read_head(&mut socket).await;
            match tunnel_to {
                Some(service) if head.starts_with("CONNECT ") => {
                    let mut upstream = tokio::net::TcpStream::connect(service).await.unwrap();
                    socket.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut socket, &mut upstream).await;
                }
                _ => socket.write_all(format!("{refusal}\r\ncontent-length: 0\r\n\r\n").as_bytes()).await.unwrap(),
            }
            head
        });
        (addr, proxy)
    }

    #[tokio::test]
    async fn https_through_the_proxy_tunnels_to_the_service_and_still_checks_its_certificate() {
        let trust = TlsTrust::with_pem_file(&fixture("ca.pem")).unwrap();
        let (service, server) = tls_server().await;
        let (at, proxy_seen) = proxy_for_one(Some(service), "").await;
        let proxy = Proxy::parse(&format!("http://svc:s3cret@{at}")).unwrap();
        let origin = Origin::parse(&format!("https://localhost:{}", service.port())).unwrap();
        let stream = connect_first(vec![at]).await.unwrap();
        let tunnel = proxy.tunnel(stream, &origin).await.expect("the proxy opened it");
        let tls = tls_handshake(tunnel, &origin.host, &trust).await.expect("the service's own certificate");
        let url = format!("https://localhost:{}/charges/o-1", service.port());
        let (status, got) = read(send_over(get(&url), tls, Target::Origin).await.unwrap()).await;
        assert_eq!((status, &got[..]), (200, &b"hello"[..]));
        let inside = server.await.unwrap().expect("the request came through the tunnel");
        assert!(inside.starts_with("GET /charges/o-1 HTTP/1.1\r\n"), "{inside}");
        assert!(
            !inside.to_ascii_lowercase().contains("proxy-authorization"),
            "credentials stay with the proxy: {inside}"
        );
        let seen = proxy_seen.await.unwrap();
        let target = format!("localhost:{}", service.port());
        assert!(seen.starts_with(&format!("CONNECT {target} HTTP/1.1\r\n")), "{seen}");
        assert!(seen.to_ascii_lowercase().contains(&format!("host: {target}\r\n")), "{seen}");
        assert!(seen.contains("proxy-authorization: Basic c3ZjOnMzY3JldA==\r\n"), "svc:s3cret: {seen}");
        // Through the tunnel, a certificate for another name is refused as without a proxy.
        let (service, _server) = tls_server().await;
        let (at, _proxy) = proxy_for_one(Some(service), "").await;
        let origin = Origin::parse(&format!("https://payments.internal:{}", service.port())).unwrap();
        let tunnel = proxy.tunnel(connect_first(vec![at]).await.unwrap(), &origin).await.unwrap();
        assert!(matches!(tls_handshake(tunnel, &origin.host, &trust).await, Err(Error::TlsCertificateError)));
    }

    #[tokio::test]
    async fn a_tunnel_the_proxy_refuses_says_what_the_proxy_answered_and_whose_failure_it_is() {
        let (at, seen) = proxy_for_one(None, "HTTP/1.1 403 Forbidden").await;
        let proxy = Proxy::parse(&format!("http://{at}")).unwrap();
        let origin = Origin::parse("https://payments.example.com").unwrap();
        let refused = proxy.tunnel(connect_first(vec![at]).await.unwrap(), &origin).await.expect_err("refused");
        let why =
            format!("the outbound proxy http://{at} answered CONNECT payments.example.com:443 with 403 Forbidden");
        assert_eq!(refused.why, Some(Blame::Request(why)));
        assert!(matches!(refused.error, Error::ConnectionRefused), "{:?}", refused.error);
        assert!(!seen.await.unwrap().to_ascii_lowercase().contains("proxy-authorization"), "no credentials configured");
        // Credentials refused are the host's failure (every request would fail alike); a
        // proxy that cannot reach the service, the request's.
        for (status, host_fault) in
            [("HTTP/1.1 407 Proxy Authentication Required", true), ("HTTP/1.1 502 Bad Gateway", false)]
        {
            let (at, _) = proxy_for_one(None, status).await;
            let proxy = Proxy::parse(&format!("http://{at}")).unwrap();
            let refused = proxy.tunnel(connect_first(vec![at]).await.unwrap(), &origin).await.expect_err(status);
            let why = format!(
                "the outbound proxy http://{at} answered CONNECT payments.example.com:443 with {}",
                &status[9..]
            );
            match refused.why {
                Some(Blame::Host(w)) if host_fault => assert_eq!(w, why),
                Some(Blame::Request(w)) if !host_fault => assert_eq!(w, why),
                other => panic!("{status}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn plain_http_through_the_proxy_names_the_whole_url_and_carries_only_the_host_s_credentials() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        let proxy_seen = tokio::spawn(async move { answer_hello(listener.accept().await.unwrap().0).await });
        let proxy = Proxy::parse(&format!("http://svc:s3cret@{at}")).unwrap();
        let mut request = get("http://inventory.internal:9001/stock?sku=1");
        request.headers_mut().insert("proxy-authorization", HeaderValue::from_static("Basic forged"));
        proxy.address(&mut request);
        let stream = connect_first(vec![at]).await.unwrap();
        let (status, got) = read(send_over(request, stream, Target::Absolute).await.unwrap()).await;
        assert_eq!((status, &got[..]), (200, &b"hello"[..]));
        let head = proxy_seen.await.unwrap().unwrap();
        assert!(head.starts_with("GET http://inventory.internal:9001/stock?sku=1 HTTP/1.1\r\n"), "{head}");
        assert!(head.to_ascii_lowercase().contains("host: inventory.internal:9001\r\n"), "{head}");
        assert!(head.contains("proxy-authorization: Basic c3ZjOnMzY3JldA==\r\n") && !head.contains("forged"), "{head}");
    }

    #[test]
    fn traceparent_is_w3c_shaped_and_stable_per_attempt() {
        let a = traceparent("o-1", "o-1:payment:execute", 1);
        let b = traceparent("o-1", "o-1:payment:execute", 2);
        let c = traceparent("o-1", "o-1:shipment:execute", 1);
        let parts: Vec<&str> = a.to_str().unwrap().split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!((parts[0], parts[1].len(), parts[2].len(), parts[3]), ("00", 32, 16, "01"));
        assert_eq!(a, traceparent("o-1", "o-1:payment:execute", 1), "the same attempt, the same span");
        let trace = |v: &HeaderValue| v.to_str().unwrap().split('-').nth(1).unwrap().to_owned();
        assert_eq!(trace(&a), trace(&b));
        assert_eq!(trace(&a), trace(&c), "one trace per saga");
        assert_ne!(a, b, "one span per attempt");
    }
}
