//! A plugin's stderr: the first few KiB kept to explain a trap (a Rust panic prints its
//! message there), the rest dropped, and every write reported done.
//!
//! wasmtime-wasi's `MemoryOutputPipe` refuses a write past its capacity and then reports the
//! stream closed; a Rust plugin's `eprintln!` panics on that, so a plugin that printed more
//! than the kept part (a debug print in a loop) failed its attempt for it, its own message
//! lost. Here the stream stays open and takes everything.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// How much one write may hand over at once (WASI streams ask before they write).
const WRITE_PERMIT: usize = 64 << 10;

/// The kept head of a call's stderr; clones share it.
#[derive(Clone)]
pub(super) struct StderrHead(MemoryOutputPipe);

impl StderrHead {
    pub(super) fn new(capacity: usize) -> StderrHead {
        StderrHead(MemoryOutputPipe::new(capacity))
    }

    /// What was kept: the first bytes written, up to the capacity.
    pub(super) fn contents(&self) -> Bytes {
        self.0.contents()
    }

    /// Keeps what fits of `bytes`; drops the rest.
    fn keep(&mut self, bytes: &[u8]) {
        let room = self.0.check_write().unwrap_or(0);
        let kept = &bytes[..bytes.len().min(room)];
        if !kept.is_empty() {
            // Within the room just asked for: the pipe takes it.
            let _ = self.0.write(Bytes::copy_from_slice(kept));
        }
    }
}

impl IsTerminal for StderrHead {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for StderrHead {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

impl OutputStream for StderrHead {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.keep(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(WRITE_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for StderrHead {
    async fn ready(&mut self) {}
}

impl AsyncWrite for StderrHead {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.get_mut().keep(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
