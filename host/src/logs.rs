//! Where the host's log lines go: standard output, written in batches by a thread of its own.
//!
//! A line is formatted where it is logged (often inside a plugin call: every `log` import is
//! a line) and appended to a shared buffer: a lock and a copy, no system call. The
//! `sagahost-log` thread writes the buffer out [`FLUSH_EVERY`] after its first line, every
//! line gathered by then in one `write(2)`. Measured with the synchronous writer this
//! replaces, a demo plugin's one line per call was 15% of the call's processor time, two
//! thirds of it the write itself (BENCHMARKS.md, session 13); and a slow reader of standard
//! output (a full pipe) blocked the tokio worker that logged, and every task queued on it.
//! A queue with a message per line and a wake-up per message (`tracing-appender`) cost more
//! than it saved on this 2-core machine: the batching needs the wait.
//!
//! What it gives up, on purpose:
//! - Lines of the last [`FLUSH_EVERY`] are lost when the process is killed (`SIGKILL`, a
//!   power cut). An orderly exit (return from `main`, `SIGTERM`, a panic unwinding out of
//!   `main`) drops the [`Guard`], which writes everything out first. Nothing durable depends
//!   on a log line: the database and the outbox are the record.
//! - When the reader falls so far behind that [`MAX_BUFFERED`] bytes wait, further lines are
//!   dropped rather than blocking the host, and counted: [`lines_dropped`], exported as
//!   `sagahost_log_lines_dropped_total`.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::Duration;

/// How long a line may wait to be written: the batch a write gathers.
pub const FLUSH_EVERY: Duration = Duration::from_millis(10);

/// Bytes that may wait for the writer before new lines are dropped.
pub const MAX_BUFFERED: usize = 4 << 20;

/// The lines [`stdout`] buffers, for [`lines_dropped`].
static STDOUT: OnceLock<Arc<Shared>> = OnceLock::new();

/// The buffer lines are appended to and the writer thread takes them from.
struct Shared {
    pending: Mutex<Pending>,
    /// Signalled when the first line lands in an empty buffer, and on close.
    woken: Condvar,
    dropped: AtomicU64,
    limit: usize,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    closed: bool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves only bytes behind: still fine to write.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends one line (the fmt layer writes each event with one `write_all`).
    fn append(&self, line: &[u8]) {
        let mut pending = self.lock();
        if pending.bytes.len() + line.len() > self.limit {
            drop(pending);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let was_empty = pending.bytes.is_empty();
        pending.bytes.extend_from_slice(line);
        drop(pending);
        if was_empty {
            self.woken.notify_one();
        }
    }
}

/// The writer for the log layer (`tracing_subscriber::fmt::layer().with_writer(..)`).
#[derive(Clone)]
pub struct Buffered(Arc<Shared>);

impl Write for Buffered {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buffered {
    type Writer = Buffered;

    fn make_writer(&'a self) -> Buffered {
        self.clone()
    }
}

/// Writes everything buffered out and stops the writer thread when dropped.
pub struct Guard {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.woken.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A writer for the log layer whose lines go to standard output in batches. Keep the guard
/// until the process exits: dropping it writes the rest out.
pub fn stdout() -> std::io::Result<(Buffered, Guard)> {
    let (writer, guard) = batched(std::io::stdout(), MAX_BUFFERED, FLUSH_EVERY)?;
    let _ = STDOUT.set(Arc::clone(&writer.0));
    Ok((writer, guard))
}

/// Log lines dropped so far because standard output's reader fell behind (0 when logs are
/// not batched).
pub fn lines_dropped() -> u64 {
    STDOUT.get().map_or(0, |s| s.dropped.load(Ordering::Relaxed))
}

/// Lines for `out`, written by a thread of its own `every` after the first of a batch, with
/// at most `limit` bytes waiting.
fn batched<W: Write + Send + 'static>(mut out: W, limit: usize, every: Duration) -> std::io::Result<(Buffered, Guard)> {
    let shared =
        Arc::new(Shared { pending: Mutex::default(), woken: Condvar::new(), dropped: AtomicU64::new(0), limit });
    let theirs = Arc::clone(&shared);
    let thread = std::thread::Builder::new().name("sagahost-log".into()).spawn(move || {
        let mut batch = Vec::new();
        loop {
            let mut pending = theirs.lock();
            while pending.bytes.is_empty() && !pending.closed {
                pending = theirs.woken.wait(pending).unwrap_or_else(PoisonError::into_inner);
            }
            if !pending.closed {
                // Let the batch gather (a close cuts the wait short).
                pending = theirs.woken.wait_timeout(pending, every).unwrap_or_else(PoisonError::into_inner).0;
            }
            let closed = pending.closed;
            std::mem::swap(&mut batch, &mut pending.bytes);
            drop(pending);
            // A reader that is gone (a closed pipe) loses the lines; the host goes on.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
            if closed && theirs.lock().bytes.is_empty() {
                return;
            }
        }
    })?;
    Ok((Buffered(shared.clone()), Guard { shared, thread: Some(thread) }))
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// A writer that blocks until the test lets it go, then keeps what it was given.
    struct Stalled {
        go: Arc<Mutex<()>>,
        got: Arc<Mutex<Vec<u8>>>,
        writes: Arc<AtomicU64>,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _wait = self.go.lock().unwrap();
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.got.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A stalled writer and its handles: the gate it waits at, what it got, how many writes.
    type StalledParts = (Stalled, Arc<Mutex<()>>, Arc<Mutex<Vec<u8>>>, Arc<AtomicU64>);

    fn stalled() -> StalledParts {
        let (go, got, writes) = (Arc::default(), Arc::default(), Arc::default());
        let out = Stalled { go: Arc::clone(&go), got: Arc::clone(&got), writes: Arc::clone(&writes) };
        (out, go, got, writes)
    }

    /// Logs `lines` lines through a fmt subscriber writing to `writer`, on a thread of its
    /// own; fails if that takes 10 s (logging blocked).
    fn log_lines(writer: Buffered, lines: usize) {
        let (done, finished) = mpsc::channel();
        let logging = std::thread::spawn(move || {
            let subscriber = tracing_subscriber::fmt().with_writer(writer).with_ansi(false).finish();
            tracing::subscriber::with_default(subscriber, || {
                for i in 0..lines {
                    tracing::info!("line {i}");
                }
            });
            done.send(()).unwrap();
        });
        finished.recv_timeout(Duration::from_secs(10)).expect("logging blocked on the reader");
        logging.join().unwrap();
    }

    fn numbers(got: &Mutex<Vec<u8>>) -> Vec<usize> {
        let text = String::from_utf8(got.lock().unwrap().clone()).unwrap();
        text.lines().map(|l| l.rsplit(' ').next().unwrap().parse().unwrap()).collect()
    }

    /// Lines logged together are written together, in order, and all of them once the guard
    /// is dropped.
    #[test]
    fn lines_are_written_in_batches_in_order_and_all_by_the_guard() {
        let (out, _go, got, writes) = stalled();
        // A batch lingers long enough that even a loaded machine logs all 1,000 lines in a few
        // batches; dropping the guard writes out the last one at once.
        let (writer, guard) = batched(out, 1 << 20, Duration::from_secs(10)).unwrap();
        log_lines(writer, 1000);
        drop(guard);
        assert_eq!(numbers(&got), (0..1000).collect::<Vec<_>>());
        // Without batching this was 1,000 writes.
        assert!(writes.load(Ordering::Relaxed) <= 5, "{} writes", writes.load(Ordering::Relaxed));
    }

    /// A reader that stops reading must not stop the host: lines past the buffer's limit are
    /// dropped and counted, the ones buffered are written once it reads again.
    #[test]
    fn a_stalled_reader_drops_lines_past_the_limit_instead_of_blocking() {
        let (out, go, got, _) = stalled();
        let held = go.lock().unwrap();
        // A line is about 60 bytes: the limit holds ten or so.
        let (writer, guard) = batched(out, 600, Duration::from_millis(1)).unwrap();
        let shared = Arc::clone(&writer.0);
        log_lines(writer, 1000);
        let dropped = shared.dropped.load(Ordering::Relaxed) as usize;
        assert!(dropped >= 950, "dropped {dropped}");
        drop(held);
        drop(guard);
        let written = numbers(&got);
        assert_eq!(written.len(), 1000 - dropped, "{written:?}");
        assert_eq!(written[0], 0, "{written:?}");
        assert!(written.windows(2).all(|w| w[0] < w[1]), "in order: {written:?}");
    }
}
