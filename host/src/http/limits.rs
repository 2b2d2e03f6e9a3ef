//! Serving limits: how much work the HTTP layer accepts at once and for how long.
//!
//! - In-flight requests are capped: past the cap a request is shed at once with 503 and
//!   `Retry-After`, rather than queueing without bound in front of the database.
//! - Every request has a deadline (reading its body included): past it the client gets 503 and
//!   the handler is dropped. Dropping a handler is as safe as a crash: a saga it committed
//!   is kept, and the client's retry with its idempotency key gets the stored answer or
//!   rebuilds it from the saga.
//! - `Prefer: wait` waiters are capped separately: past the cap a request is answered at once
//!   (201, the saga runs on) instead of waiting.
//! - Connections are capped by the listener ([`LimitedListener`]): past the cap, accepting
//!   waits until one closes.
//! - A request's head (request line and headers) must arrive within a deadline, so a client
//!   that trickles its headers (slowloris) cannot hold a connection; [`serve`] sets it on
//!   hyper, which axum's own `serve` does not expose.
//! - Writing an answer must make progress: a connection whose client reads nothing of it for
//!   [`ServeLimits::write_stall_timeout`] is closed ([`LimitedIo`]). Hyper has no write
//!   deadline, and a client that pipelined requests for large answers and never read them
//!   held its connection (its place under the connection cap) for ever.
//!
//! It must not know about routes: it sees requests and connections only.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;

/// The limits, configurable on the command line.
#[derive(Debug, Clone)]
pub struct ServeLimits {
    /// Requests handled at once; more are shed with 503.
    pub max_in_flight: usize,
    /// The longest one request may take, its body included (longer than the longest
    /// `Prefer: wait`).
    pub request_timeout: Duration,
    /// Requests waiting with `Prefer: wait` at once; more are answered without waiting.
    pub max_waiters: usize,
    /// Open connections; more wait to be accepted.
    pub max_connections: usize,
    /// How long a client may take to send a request's head; then the connection is closed.
    pub header_read_timeout: Duration,
    /// How long writing to a client may make no progress; then the connection is closed.
    pub write_stall_timeout: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_in_flight: 1024,
            request_timeout: Duration::from_secs(45),
            max_waiters: 512,
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
            write_stall_timeout: Duration::from_secs(30),
        }
    }
}

/// The shared counters behind [`ServeLimits`].
pub struct Gates {
    limits: ServeLimits,
    in_flight: Arc<Semaphore>,
    waiters: Arc<Semaphore>,
    /// Probes served past the in-flight cap ([`PROBES_PAST_CAP`]).
    probes: Arc<Semaphore>,
}

/// Probes served at once once the in-flight cap is reached: `/readyz` and `/metrics` each ask
/// the database, and unbounded, a flood of them (they need no token) went past the cap meant
/// to protect it.
pub const PROBES_PAST_CAP: usize = 8;

impl Gates {
    pub fn new(limits: ServeLimits) -> Gates {
        Gates {
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight.max(1))),
            waiters: Arc::new(Semaphore::new(limits.max_waiters)),
            probes: Arc::new(Semaphore::new(PROBES_PAST_CAP)),
            limits,
        }
    }

    /// The longest a request may take: `request_timeout`, or for a plugin upload
    /// [`UPLOAD_TIMEOUT`] if that is longer.
    pub fn deadline(&self, upload: bool) -> Duration {
        if upload {
            self.limits.request_timeout.max(UPLOAD_TIMEOUT)
        } else {
            self.limits.request_timeout
        }
    }

    /// A place among the `Prefer: wait` waiters, if one is free.
    pub fn waiter(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.waiters).try_acquire_owned().ok()
    }
}

/// The deadline of a plugin upload, when `request_timeout` is shorter: an upload compiles the
/// component before it answers, which takes seconds for a JavaScript or Python step
/// (BENCHMARKS.md, "Steps per language") and more on a busy machine.
pub const UPLOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// Is this `POST /admin/plugins/{name}`, a plugin upload?
fn is_upload(req: &Request) -> bool {
    req.method() == axum::http::Method::POST
        && req.uri().path().strip_prefix("/admin/plugins/").is_some_and(|name| !name.is_empty() && !name.contains('/'))
}

/// `GET /healthz`: asks nothing of the database, so it is served past every cap.
fn is_liveness(req: &Request) -> bool {
    req.method() == axum::http::Method::GET && req.uri().path() == "/healthz"
}

/// The routes an orchestrator's probes and the metrics scraper use: not shed at the in-flight
/// cap, so that a busy but healthy host is neither restarted by a liveness probe nor dark on
/// its dashboards while it sheds load (each is cheap, and few are sent); past the cap at most
/// [`PROBES_PAST_CAP`] at once, but `/healthz` ([`is_liveness`]) always.
fn is_probe(req: &Request) -> bool {
    req.method() == axum::http::Method::GET && matches!(req.uri().path(), "/healthz" | "/readyz" | "/metrics")
}

/// Middleware: sheds requests past the in-flight cap (but the probes, [`is_probe`]) and ends
/// those past their deadline (`request_timeout`, or [`UPLOAD_TIMEOUT`] for a plugin upload if
/// that is longer).
pub async fn guard(State(gates): State<Arc<Gates>>, req: Request, next: Next) -> Response {
    let permit = match Arc::clone(&gates.in_flight).try_acquire_owned() {
        // Liveness asks nothing of anyone: never shed, whatever else waits.
        Err(_) if is_liveness(&req) => Ok(None),
        Err(_) if is_probe(&req) => Arc::clone(&gates.probes).try_acquire_owned().map(Some),
        taken => taken.map(Some),
    };
    let _permit = match permit {
        Ok(permit) => permit,
        Err(_) => {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "the server is handling as many requests as it accepts at once; retry after the Retry-After delay",
            )
            .with_retry_after(1)
            .into_response()
        }
    };
    let deadline = gates.deadline(is_upload(&req));
    match tokio::time::timeout(deadline, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            "the request took longer than the server allows; retry with the same Idempotency-Key, it is safe",
        )
        .with_retry_after(1)
        .into_response(),
    }
}

/// A TCP listener that holds at most `max` connections open: past that, accepting waits
/// until one closes, so a flood of idle connections cannot exhaust file descriptors.
pub struct LimitedListener {
    inner: tokio::net::TcpListener,
    permits: Arc<Semaphore>,
    write_stall: Duration,
}

impl LimitedListener {
    /// At most `max` connections, each closed once a write to it makes no progress for
    /// `write_stall`.
    pub fn new(inner: tokio::net::TcpListener, max: usize, write_stall: Duration) -> LimitedListener {
        LimitedListener { inner, permits: Arc::new(Semaphore::new(max.max(1))), write_stall }
    }
}

/// A connection of a [`LimitedListener`]; its place is freed when it closes. A write that
/// waits for the client longer than its `write_stall` fails, which ends the connection.
pub struct LimitedIo {
    stream: tokio::net::TcpStream,
    _permit: OwnedSemaphorePermit,
    write_stall: Duration,
    /// Since when a write has waited for the client, as the timer that ends the wait.
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl LimitedIo {
    /// `polled` (a write's, or a flush's), failed once the write has made no progress for
    /// the connection's `write_stall`.
    fn within_stall<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        polled: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future as _;
        use std::task::Poll;
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let stall = self.write_stall;
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client read nothing of its answer for {} s", stall.as_secs()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedIo;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (LimitedIo, std::net::SocketAddr) {
        let permit = Arc::clone(&self.permits).acquire_owned().await.expect("the semaphore is never closed");
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let io = LimitedIo { stream, _permit: permit, write_stall: self.write_stall, stalled: None };
                    return (io, addr);
                }
                // Out of file descriptors and the like: wait a moment rather than spin.
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }
}

impl tokio::io::AsyncRead for LimitedIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for LimitedIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.stream).poll_write(cx, buf);
        self.within_stall(cx, polled)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let polled = std::pin::Pin::new(&mut self.stream).poll_flush(cx);
        self.within_stall(cx, polled)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.within_stall(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Serves `router` on `listener` until `shutdown`: then accepts no more connections and lets
/// those open finish the requests they are in (at most `drain`). Each connection has the
/// header read deadline of `limits`.
pub async fn serve(
    mut listener: LimitedListener,
    router: axum::Router,
    limits: &ServeLimits,
    shutdown: tokio_util::sync::CancellationToken,
    drain: Duration,
) {
    use axum::serve::Listener as _;
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    loop {
        let (io, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let service = TowerToHyperService::new(router.clone());
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(io), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::trace!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!("connections still open at shutdown were closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, path: &str) -> Request {
        Request::builder().method(method).uri(path).body(axum::body::Body::empty()).unwrap()
    }

    /// Past the in-flight cap the probes are still served, but at most [`PROBES_PAST_CAP`] at
    /// once: a flood of `/readyz` (each a database round trip, no token needed) went past the
    /// cap without bound.
    #[tokio::test]
    async fn probes_past_the_in_flight_cap_are_served_a_few_at_a_time() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tower::ServiceExt as _;
        let limits = ServeLimits { max_in_flight: 1, ..ServeLimits::default() };
        let gates = Arc::new(Gates::new(limits));
        let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (n, p) = (Arc::clone(&now), Arc::clone(&peak));
        let slow = move || {
            let (now, peak) = (Arc::clone(&n), Arc::clone(&p));
            async move {
                let at = now.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(at, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                "ok"
            }
        };
        let router = axum::Router::new()
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .route("/readyz", axum::routing::get(slow.clone()))
            .route("/orders", axum::routing::get(slow))
            .layer(axum::middleware::from_fn_with_state(Arc::clone(&gates), guard));
        let held = tokio::spawn(router.clone().oneshot(request("GET", "/orders")));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut probes = tokio::task::JoinSet::new();
        for _ in 0..50 {
            probes.spawn(router.clone().oneshot(request("GET", "/readyz")));
        }
        let mut served = 0;
        while let Some(answer) = probes.join_next().await {
            served += usize::from(answer.unwrap().unwrap().status() == StatusCode::OK);
        }
        assert_eq!(served, PROBES_PAST_CAP, "probes served while the cap was reached");
        assert_eq!(peak.load(Ordering::SeqCst), PROBES_PAST_CAP + 1, "the held request and the probes");
        // Liveness is never shed, however many readiness probes hold their places past the cap.
        let mut hold = tokio::task::JoinSet::new();
        hold.spawn(router.clone().oneshot(request("GET", "/orders")));
        tokio::time::sleep(Duration::from_millis(20)).await;
        for _ in 0..PROBES_PAST_CAP {
            hold.spawn(router.clone().oneshot(request("GET", "/readyz")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let shed = router.clone().oneshot(request("GET", "/readyz")).await.unwrap();
        assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE, "the probes' places are all taken");
        let live = router.clone().oneshot(request("GET", "/healthz")).await.unwrap();
        assert_eq!(live.status(), StatusCode::OK);
        while hold.join_next().await.is_some() {}
        assert_eq!(held.await.unwrap().unwrap().status(), StatusCode::OK);
    }

    #[test]
    fn only_a_plugin_upload_gets_the_upload_deadline() {
        assert!(is_upload(&request("POST", "/admin/plugins/payment")));
        assert!(!is_upload(&request("GET", "/admin/plugins/payment")));
        assert!(!is_upload(&request("POST", "/admin/plugins/")));
        assert!(!is_upload(&request("PUT", "/admin/plugins/payment/grants")));
        assert!(!is_upload(&request("POST", "/admin/plugins/payment/grants")));
        assert!(!is_upload(&request("POST", "/orders")));
    }
}
