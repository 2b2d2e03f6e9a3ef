//! Calling HTTP services from a step: a small client over `wasi:http`.
//!
//! ```no_run
//! use sagahost_plugin_sdk::{http, CallContext, StepError, StepOutcome};
//! use serde_json::json;
//!
//! fn reserve(ctx: &CallContext, base_url: &str) -> Result<StepOutcome, StepError> {
//!     http::post_json(
//!         &format!("{base_url}/reservations"),
//!         &json!({"order_id": ctx.saga_id, "items": [{"sku": "SKU-1", "quantity": 2}]}),
//!     )? // a transport failure (refused, timed out, denied) is `retryable`
//!     .done() // 2xx: done with the body; 408, 425, 429, 5xx: retryable; other 4xx: rejected
//! }
//! ```
//!
//! What this module owns: building a request ([`Request`]), sending it and
//! reading the whole answer ([`Response`]), and turning answers and failures
//! into step outcomes by one rule ([`Response::error_for_status`],
//! `From<HttpError> for StepError`):
//!
//! | answer | step error |
//! |--------|------------|
//! | 2xx | none |
//! | 408, 425, 429, 5xx | `retryable("{METHOD} {url} answered {status}: {message}")` |
//! | any other 4xx (402, 404, 409, 422, ...) | `rejected("{message}")`: a business refusal |
//! | 1xx, 3xx (redirects are not followed) | `retryable` |
//! | no answer (refused, timed out, denied, reset, body over the limit) | `retryable` |
//! | a request that cannot be sent (bad URL, bad header) | `rejected` |
//!
//! `{message}` is the `"error"` field of a JSON body, or the body's text, cut
//! to 200 characters ([`Response::error_message`]).
//!
//! What it must not do: add an `Idempotency-Key`. The host adds the step's key
//! to every request that has none (`{key}:{n}` for the n-th request of a
//! call), so a re-sent call carries the same keys; a plugin may still set one
//! itself with [`Request::idempotency_key`]. Nor does it retry: the host
//! retries the whole call with backoff, and bounds every request by the
//! call's timeout, the number of requests per call, and the size of a
//! response body.
//!
//! Only [`Request::send`] (and [`get`], [`post_json`]) talk to the host; the
//! rest is plain data, so a step's request building and answer handling can
//! be unit-tested natively with hand-made [`Response`]s.

use std::borrow::Cow;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{StepError, StepOutcome};

mod transport;

pub use crate::bindings::wasi::http::types::Method;

/// How many characters of a service's error message a step error keeps.
const MESSAGE_CHARS: usize = 200;

/// Sends `GET url` and reads the answer.
pub fn get(url: &str) -> Result<Response, HttpError> {
    Request::get(url).send()
}

/// Sends `POST url` with `body` as JSON and reads the answer.
pub fn post_json<T: Serialize + ?Sized>(url: &str, body: &T) -> Result<Response, HttpError> {
    Request::post(url).json(body).send()
}

/// `text` made safe as one segment of a URL path: every byte but the
/// unreserved `A-Z a-z 0-9 - . _ ~` percent-encoded. For ids in paths:
/// `format!("{base}/charges/{}", http::path_segment(&ctx.saga_id))`.
pub fn path_segment(text: &str) -> Cow<'_, str> {
    let unreserved = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
    if text.bytes().all(unreserved) {
        return Cow::Borrowed(text);
    }
    let mut encoded = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if unreserved(b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    Cow::Owned(encoded)
}

/// An HTTP request to build and [`send`](Request::send).
///
/// A builder: every method takes and returns the request. Mistakes made while
/// building (a body that is not serializable) surface when it is sent.
#[derive(Debug, Clone)]
pub struct Request {
    method: Method,
    url: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
    /// The first mistake made while building, reported by `send`.
    invalid: Option<String>,
}

impl Request {
    /// A request with `method` to `url` (`http://host[:port]/path?query`, or
    /// `https://...`), no headers and no body.
    pub fn new(method: Method, url: impl Into<String>) -> Self {
        Self {
            method,
            url: url.into(),
            headers: Vec::new(),
            body: None,
            invalid: None,
        }
    }

    /// `GET url`.
    pub fn get(url: impl Into<String>) -> Self {
        Self::new(Method::Get, url)
    }

    /// `POST url`.
    pub fn post(url: impl Into<String>) -> Self {
        Self::new(Method::Post, url)
    }

    /// `PUT url`.
    pub fn put(url: impl Into<String>) -> Self {
        Self::new(Method::Put, url)
    }

    /// `DELETE url`.
    pub fn delete(url: impl Into<String>) -> Self {
        Self::new(Method::Delete, url)
    }

    /// Adds a header (a name may be given more than once). The host refuses
    /// the hop-by-hop headers (`Connection`, `Host`, `Transfer-Encoding`, ...),
    /// which makes [`send`](Self::send) fail.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the `Idempotency-Key` header. Usually unnecessary: the host sends
    /// the step's own key when the request has none.
    pub fn idempotency_key(self, key: impl Into<String>) -> Self {
        self.header("Idempotency-Key", key)
    }

    /// Sets the body to `value` as JSON, with `Content-Type: application/json`
    /// unless a content type was set already.
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(bytes) => {
                if self.header_value("content-type").is_none() {
                    self = self.header("Content-Type", "application/json");
                }
                self.body = Some(bytes);
            }
            Err(e) => {
                self.invalid
                    .get_or_insert(format!("the body is not serializable as JSON: {e}"));
            }
        }
        self
    }

    /// Sets the body to raw bytes (set a `Content-Type` with
    /// [`header`](Self::header)).
    pub fn body(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.body = Some(bytes.into());
        self
    }

    /// The method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The URL, as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The headers set so far, in order.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The first value of a header, by case-insensitive name.
    pub fn header_value(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The body, if one was set.
    pub fn body_bytes(&self) -> Option<&[u8]> {
        self.body.as_deref()
    }

    /// `{METHOD} {url}`, as messages name the request.
    pub fn describe(&self) -> String {
        format!("{} {}", method_name(&self.method), self.url)
    }

    /// Sends the request through the host and reads the whole answer, body
    /// included. Blocks until the answer is in, the request fails, or the
    /// call's timeout ends the call.
    ///
    /// Any status is an `Ok` answer; see [`Response::error_for_status`] to
    /// turn it into a step outcome. Errors mean there was no answer.
    pub fn send(self) -> Result<Response, HttpError> {
        let request = self.describe();
        let fail = |kind| HttpError {
            request: request.clone(),
            kind,
        };
        if let Some(reason) = &self.invalid {
            return Err(fail(HttpErrorKind::InvalidRequest(reason.clone())));
        }
        let target =
            Target::parse(&self.url).map_err(|e| fail(HttpErrorKind::InvalidRequest(e)))?;
        let answer = transport::send(&self, &target).map_err(fail)?;
        Ok(Response {
            request,
            status: answer.status,
            headers: answer.headers,
            body: answer.body,
        })
    }
}

/// The whole answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// `{METHOD} {url}` of the request this answers, for messages.
    pub request: String,
    /// The status code.
    pub status: u16,
    /// The headers, in order; values that are not UTF-8 are decoded lossily.
    pub headers: Vec<(String, String)>,
    /// The whole body.
    pub body: Vec<u8>,
}

impl Response {
    /// An answer built by hand, for unit tests of the code that reads one.
    pub fn new(request: impl Into<String>, status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            request: request.into(),
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// Adds a header to a hand-made answer.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// `true` for a 2xx status.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }

    /// The body parsed as JSON into `T`, whatever the status. A body that is
    /// not a valid `T` is an [`HttpErrorKind::InvalidResponse`] (retryable).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HttpError> {
        serde_json::from_slice(&self.body).map_err(|e| HttpError {
            request: self.request.clone(),
            kind: HttpErrorKind::InvalidResponse(format!("the body is not the expected JSON: {e}")),
        })
    }

    /// What the service said went wrong: the `"error"` field of a JSON body
    /// (or its `"message"`), else the body's text, cut to 200 characters; for
    /// an empty body, `{METHOD} {url} answered {status}`.
    pub fn error_message(&self) -> String {
        self.service_message()
            .unwrap_or_else(|| format!("{} answered {}", self.request, self.status))
    }

    /// The answer if its status is 2xx; otherwise the step error the status
    /// means: `retryable` for 408, 425, 429 and 5xx (the service may answer
    /// differently later), `rejected` with [`error_message`](Self::error_message)
    /// for any other 4xx (a business refusal: `card declined`), and
    /// `retryable` for anything else (1xx, 3xx).
    pub fn error_for_status(self) -> Result<Self, StepError> {
        match self.status {
            200..=299 => Ok(self),
            408 | 425 | 429 | 500..=599 => Err(StepError::Retryable(self.describe_failure())),
            400..=499 => Err(StepError::Rejected(self.error_message())),
            _ => Err(StepError::Retryable(self.describe_failure())),
        }
    }

    /// The body as the step's output: [`error_for_status`](Self::error_for_status),
    /// then the body as the service sent it (surrounding whitespace trimmed),
    /// which must be JSON (else `retryable`). For `compensate`.
    pub fn output(self) -> Result<String, StepError> {
        let response = self.error_for_status()?;
        let invalid = |reason: String| HttpError {
            request: response.request.clone(),
            kind: HttpErrorKind::InvalidResponse(reason),
        };
        let text = std::str::from_utf8(&response.body)
            .map_err(|e| invalid(format!("the body is not UTF-8: {e}")))?;
        serde_json::from_str::<serde::de::IgnoredAny>(text)
            .map_err(|e| invalid(format!("the body is not the expected JSON: {e}")))?;
        Ok(text.trim().to_string())
    }

    /// [`output`](Self::output) as a `done` outcome. For `execute`.
    pub fn done(self) -> Result<StepOutcome, StepError> {
        self.output().map(StepOutcome::Done)
    }

    /// `{request} answered {status}[: {message}]`.
    fn describe_failure(&self) -> String {
        match self.service_message() {
            Some(message) => format!("{} answered {}: {message}", self.request, self.status),
            None => format!("{} answered {}", self.request, self.status),
        }
    }

    /// The service's own words, if the body has any.
    fn service_message(&self) -> Option<String> {
        let from_json = serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|body| {
                ["error", "message"]
                    .iter()
                    .find_map(|field| match &body[field] {
                        serde_json::Value::String(s) => Some(s.clone()),
                        // `{"error": {"message": "..."}}`, another common shape.
                        serde_json::Value::Object(inner) => {
                            inner.get("message")?.as_str().map(str::to_string)
                        }
                        _ => None,
                    })
            });
        let message = from_json.unwrap_or_else(|| self.text().into_owned());
        let message = message.trim();
        (!message.is_empty()).then(|| cut(message, MESSAGE_CHARS))
    }
}

/// Why a request got no answer, or an answer that could not be read.
///
/// Becomes a `retryable` step error through `?` (a `rejected` one for
/// [`HttpErrorKind::InvalidRequest`]), with [`Display`](fmt::Display) as the
/// message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    /// `{METHOD} {url}` of the failed request.
    pub request: String,
    /// What went wrong.
    pub kind: HttpErrorKind,
}

/// What went wrong with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HttpErrorKind {
    /// The request could not be built or sent as given (a bad URL, a header
    /// the host forbids, a body that is not serializable). Not retried.
    InvalidRequest(String),
    /// The host refused the request: its origin is not granted to this
    /// plugin (`HTTP-request-denied`). No connection was opened.
    Denied,
    /// The service refused the connection (it is down or not listening).
    ConnectionRefused,
    /// Connecting, sending or waiting for the answer took too long.
    Timeout,
    /// The response body was larger than the host allows a plugin to read.
    BodyTooLarge,
    /// Any other failure on the way (DNS, TLS, a reset connection, a limit of
    /// the host such as the number of requests per call).
    Transport(String),
    /// An answer came, but not in the shape the step expected.
    InvalidResponse(String),
}

impl HttpError {
    /// Whether the step should be tried again: everything but
    /// [`HttpErrorKind::InvalidRequest`].
    pub fn is_retryable(&self) -> bool {
        !matches!(self.kind, HttpErrorKind::InvalidRequest(_))
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let request = &self.request;
        match &self.kind {
            HttpErrorKind::InvalidRequest(reason) => write!(f, "{request} was not sent: {reason}"),
            HttpErrorKind::Denied => write!(
                f,
                "{request} was denied: the origin is not granted to this plugin \
                 (an admin grants it with PUT /admin/plugins/{{name}}/grants)"
            ),
            HttpErrorKind::ConnectionRefused => write!(f, "{request} failed: connection refused"),
            HttpErrorKind::Timeout => write!(f, "{request} failed: timed out"),
            HttpErrorKind::BodyTooLarge => write!(
                f,
                "{request} failed: response body larger than the host's limit"
            ),
            HttpErrorKind::Transport(reason) => write!(f, "{request} failed: {reason}"),
            HttpErrorKind::InvalidResponse(reason) => write!(f, "{request}: {reason}"),
        }
    }
}

impl std::error::Error for HttpError {}

impl From<HttpError> for StepError {
    fn from(error: HttpError) -> Self {
        if error.is_retryable() {
            StepError::Retryable(error.to_string())
        } else {
            StepError::Rejected(error.to_string())
        }
    }
}

/// Where a request goes, split the way `wasi:http` wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    https: bool,
    /// `host[:port]`.
    authority: String,
    /// `/path?query`, at least `/`.
    path_with_query: String,
}

impl Target {
    /// Splits `http[s]://authority/path?query#fragment`; the fragment is
    /// dropped, as clients do.
    fn parse(url: &str) -> Result<Self, String> {
        if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("the URL contains spaces or control characters".to_string());
        }
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("{url:?} is not an absolute http:// or https:// URL"))?;
        let https = match scheme.to_ascii_lowercase().as_str() {
            "http" => false,
            "https" => true,
            _ => return Err(format!("the scheme {scheme:?} is not http or https")),
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        if authority.is_empty() {
            return Err("the URL has no host".to_string());
        }
        if authority.contains('@') {
            return Err("credentials in the URL are not supported; send a header".to_string());
        }
        let tail = tail.split('#').next().unwrap_or_default();
        let path_with_query = if tail.starts_with('/') {
            tail.to_string()
        } else {
            format!("/{tail}")
        };
        Ok(Self {
            https,
            authority: authority.to_string(),
            path_with_query,
        })
    }
}

/// The wire name of a method.
fn method_name(method: &Method) -> &str {
    match method {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Post => "POST",
        Method::Put => "PUT",
        Method::Delete => "DELETE",
        Method::Connect => "CONNECT",
        Method::Options => "OPTIONS",
        Method::Trace => "TRACE",
        Method::Patch => "PATCH",
        Method::Other(name) => name,
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// `text` cut to at most `max` characters (`max` >= 1), the last one `…` when
/// cut.
fn cut(text: &str, max: usize) -> String {
    if text.chars().nth(max).is_none() {
        return text.to_string();
    }
    let end = text
        .char_indices()
        .nth(max - 1)
        .map_or(text.len(), |(i, _)| i);
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests;
