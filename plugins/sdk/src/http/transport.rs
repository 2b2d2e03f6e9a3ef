//! Sending a request through `wasi:http/outgoing-handler` and reading the whole
//! answer: the only part of [`http`](super) that calls the host.
//!
//! `wasi:http` hands out child resources (a body's stream, a response's
//! headers, a future's pollable) that must be dropped before their parent;
//! the scopes below are arranged for that.

use crate::bindings::wasi::http::outgoing_handler;
use crate::bindings::wasi::http::types::{
    http_error_code, ErrorCode, Fields, FutureIncomingResponse, HeaderError, IncomingBody,
    IncomingResponse, OutgoingBody, OutgoingRequest, Scheme,
};
use crate::bindings::wasi::io::error::Error as IoError;
use crate::bindings::wasi::io::streams::StreamError;

use super::{HttpErrorKind, Request, Target};

/// The most bytes asked of the response stream at once.
const READ_CHUNK: u64 = 64 * 1024;
/// The most bytes `blocking-write-and-flush` takes at once (WASI says 4096).
const WRITE_CHUNK: usize = 4096;

/// An answer, read to the end of its body.
pub(super) struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Sends `request` to `target` and reads the answer.
pub(super) fn send(request: &Request, target: &Target) -> Result<Answer, HttpErrorKind> {
    let outgoing = outgoing_request(request, target)?;
    // The body must be taken before `handle` consumes the request, and written
    // after it: the host streams it to the service as it is written.
    let body = match request.body_bytes() {
        Some(_) => Some(
            outgoing
                .body()
                .map_err(|()| transport("the request body was already taken"))?,
        ),
        None => None,
    };
    let future = outgoing_handler::handle(outgoing, None).map_err(kind_of)?;
    if let (Some(body), Some(bytes)) = (body, request.body_bytes()) {
        if let Err(written) = write_body(body, bytes) {
            // A refused request (denied, connection refused) also breaks its
            // body stream; the response future says why, so prefer it.
            return Err(match wait(&future) {
                Err(why) => why,
                Ok(_) => written,
            });
        }
    }
    read(wait(&future)?)
}

/// The `outgoing-request` for `request`, with every header set. A
/// `Content-Length` is added for a body, so services that need one get it.
fn outgoing_request(request: &Request, target: &Target) -> Result<OutgoingRequest, HttpErrorKind> {
    let mut entries: Vec<(String, Vec<u8>)> = request
        .headers()
        .iter()
        .map(|(name, value)| (name.clone(), value.clone().into_bytes()))
        .collect();
    if let Some(body) = request.body_bytes() {
        if request.header_value("content-length").is_none() {
            entries.push((
                "Content-Length".to_string(),
                body.len().to_string().into_bytes(),
            ));
        }
    }
    let headers = Fields::from_list(&entries).map_err(|e| {
        invalid(match e {
            HeaderError::Forbidden => {
                "a header is one the host sets itself (Host, Connection, Transfer-Encoding, ...)"
            }
            HeaderError::InvalidSyntax | HeaderError::Immutable => {
                "a header name or value is not valid"
            }
        })
    })?;
    let outgoing = OutgoingRequest::new(headers);
    let scheme = if target.https {
        Scheme::Https
    } else {
        Scheme::Http
    };
    outgoing
        .set_method(request.method())
        .map_err(|()| invalid("the method is not valid"))?;
    outgoing
        .set_scheme(Some(&scheme))
        .map_err(|()| invalid("the scheme is not valid"))?;
    outgoing
        .set_authority(Some(&target.authority))
        .map_err(|()| invalid("the host or port is not valid"))?;
    outgoing
        .set_path_with_query(Some(&target.path_with_query))
        .map_err(|()| invalid("the path or query is not valid"))?;
    Ok(outgoing)
}

/// Writes the whole body and finishes it.
fn write_body(body: OutgoingBody, bytes: &[u8]) -> Result<(), HttpErrorKind> {
    {
        let stream = body
            .write()
            .map_err(|()| transport("the request body stream was already taken"))?;
        for chunk in bytes.chunks(WRITE_CHUNK) {
            stream
                .blocking_write_and_flush(chunk)
                .map_err(stream_failure)?;
        }
    } // The stream is a child of the body: gone before `finish`.
    OutgoingBody::finish(body, None).map_err(kind_of)
}

/// Blocks until the response (or the reason there is none) is in.
fn wait(future: &FutureIncomingResponse) -> Result<IncomingResponse, HttpErrorKind> {
    loop {
        match future.get() {
            Some(Ok(Ok(response))) => return Ok(response),
            Some(Ok(Err(code))) => return Err(kind_of(code)),
            Some(Err(())) => return Err(transport("the response was already taken")),
            None => future.subscribe().block(),
        }
    }
}

/// Reads status, headers and the whole body, to the end of the stream. The
/// host bounds the body's size and the time it takes.
fn read(response: IncomingResponse) -> Result<Answer, HttpErrorKind> {
    let status = response.status();
    let headers = response
        .headers()
        .entries()
        .into_iter()
        .map(|(name, value)| (name, String::from_utf8_lossy(&value).into_owned()))
        .collect();
    let body = response
        .consume()
        .map_err(|()| transport("the response body was already taken"))?;
    let mut bytes = Vec::new();
    {
        let stream = body
            .stream()
            .map_err(|()| transport("the response body stream was already taken"))?;
        loop {
            match stream.read(READ_CHUNK) {
                Ok(chunk) if chunk.is_empty() => stream.subscribe().block(),
                Ok(chunk) => bytes.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(error)) => return Err(io_failure(&error)),
            }
        }
    } // The stream is a child of the body: gone before `finish`.
    drop(IncomingBody::finish(body)); // trailers are not used
    Ok(Answer {
        status,
        headers,
        body: bytes,
    })
}

/// The kind of failure a `wasi:http` error code means.
pub(super) fn kind_of(code: ErrorCode) -> HttpErrorKind {
    match code {
        ErrorCode::HttpRequestDenied => HttpErrorKind::Denied,
        ErrorCode::ConnectionRefused => HttpErrorKind::ConnectionRefused,
        ErrorCode::DnsTimeout
        | ErrorCode::ConnectionTimeout
        | ErrorCode::ConnectionReadTimeout
        | ErrorCode::ConnectionWriteTimeout
        | ErrorCode::HttpResponseTimeout => HttpErrorKind::Timeout,
        ErrorCode::HttpResponseBodySize(_) => HttpErrorKind::BodyTooLarge,
        other => HttpErrorKind::Transport(describe(&other)),
    }
}

/// Words for the error codes that are not a kind of their own.
fn describe(code: &ErrorCode) -> String {
    let text = match code {
        ErrorCode::DnsError(payload) => {
            return match &payload.rcode {
                Some(rcode) => format!("DNS error ({rcode})"),
                None => "DNS error".to_string(),
            }
        }
        ErrorCode::InternalError(Some(message)) => return message.clone(),
        ErrorCode::InternalError(None) => "internal error",
        ErrorCode::DestinationNotFound => "destination not found",
        ErrorCode::DestinationUnavailable => "destination unavailable",
        ErrorCode::DestinationIpProhibited => "destination IP address prohibited",
        ErrorCode::DestinationIpUnroutable => "destination IP address unroutable",
        ErrorCode::ConnectionTerminated => "connection terminated",
        ErrorCode::ConnectionLimitReached => "connection limit reached",
        ErrorCode::TlsProtocolError => "TLS protocol error",
        ErrorCode::TlsCertificateError => "TLS certificate error",
        ErrorCode::TlsAlertReceived(_) => "TLS alert received",
        ErrorCode::HttpRequestMethodInvalid => "the method is not valid",
        ErrorCode::HttpRequestUriInvalid => "the URL is not valid",
        ErrorCode::HttpRequestUriTooLong => "the URL is too long",
        ErrorCode::HttpRequestBodySize(_) => "the request body is larger than allowed",
        ErrorCode::HttpResponseIncomplete => "the response ended early",
        ErrorCode::HttpProtocolError => "HTTP protocol error",
        ErrorCode::ConfigurationError => "configuration error",
        other => return format!("{other:?}"),
    };
    text.to_string()
}

/// A failed stream operation: the `wasi:http` error code behind it if there
/// is one, else the host's description.
fn io_failure(error: &IoError) -> HttpErrorKind {
    match http_error_code(error) {
        Some(code) => kind_of(code),
        None => transport(&error.to_debug_string()),
    }
}

fn stream_failure(error: StreamError) -> HttpErrorKind {
    match error {
        StreamError::Closed => transport("the connection closed while the request was sent"),
        StreamError::LastOperationFailed(error) => io_failure(&error),
    }
}

fn invalid(reason: &str) -> HttpErrorKind {
    HttpErrorKind::InvalidRequest(reason.to_string())
}

fn transport(reason: &str) -> HttpErrorKind {
    HttpErrorKind::Transport(reason.to_string())
}
