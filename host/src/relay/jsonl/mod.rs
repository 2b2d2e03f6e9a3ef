//! The embedded sink: appends each event as one JSON line to `events.jsonl` in the data
//! directory, and rotates that file by size.
//!
//! What "published" means for the file: a batch is acknowledged only when all of its bytes were
//! written and `fdatasync` returned success, each step checked. The writes and the fsync run
//! synchronously on a `std::fs::File` on tokio's blocking pool (see `fs.rs` for why not
//! `tokio::fs`). When any step fails, nothing of the batch is acknowledged and the file is cut
//! back to its length after the last acknowledged batch, so a half-written batch never stays
//! in front of the next one; the relay sends the batch again. The file therefore holds whole
//! lines only, and every acknowledged event, in outbox order; it may hold an event twice (a
//! crash after the fsync and before the outbox row was marked). A line cut short by a crash in
//! the middle of a write is removed when the sink opens the file again.
//!
//! Rotation: once the file has reached `max_bytes`, before the next batch is written (never in
//! the middle of one), it is renamed to `events.jsonl.1`, older files move up one number
//! (`.1` to `.2`, ...) and the one beyond `keep` is dropped, and a new `events.jsonl` is
//! created. Every rename is atomic and made durable (the directory is fsynced) before the next
//! step, so a crash at any point leaves each acknowledged event in exactly one file; a crash
//! after the rename and before the new file exists leaves no `events.jsonl`, which the next
//! start creates.

mod fs;
#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;

use self::fs::{Fs, LogFile, RealFs};
use super::{Published, Sink};
use crate::store::OutboxRow;

/// When to rotate the events file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonlOptions {
    /// Rotate once the file has reached this many bytes; 0 never rotates.
    pub max_bytes: u64,
    /// How many rotated files to keep: `events.jsonl.1` (the newest) to `events.jsonl.<keep>`.
    /// At least 1.
    pub keep: u32,
}

impl Default for JsonlOptions {
    fn default() -> Self {
        JsonlOptions { max_bytes: 256 << 20, keep: 5 }
    }
}

/// Appends events to a JSON-lines file and fsyncs before confirming.
pub struct JsonlSink {
    path: PathBuf,
    /// A std mutex: it is only ever held on the blocking pool, around one batch.
    writer: Arc<Mutex<Writer>>,
    /// `<file>.lock`, flocked while the sink lives ([`lock`]).
    _lock: Option<std::fs::File>,
}

impl JsonlSink {
    /// Opens (or creates) the events file, cutting off a line a crash left unfinished.
    /// One process at a time: a second one on the same file (replicas on one PostgreSQL
    /// database sharing a data directory) fails here, since each cuts the file back to what it
    /// wrote itself and would delete the other's acknowledged events.
    pub async fn open(path: &Path, options: JsonlOptions) -> io::Result<JsonlSink> {
        // A restart whose predecessor is still shutting down gets a moment, as for the
        // SQLite file's lock.
        let started = std::time::Instant::now();
        let lock = loop {
            match lock(path) {
                Err(e) if e.kind() == io::ErrorKind::ResourceBusy && started.elapsed() < LOCK_WAIT => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                other => break other?,
            }
        };
        let sink = JsonlSink::open_with(path, options, Arc::new(RealFs)).await?;
        Ok(JsonlSink { _lock: Some(lock), ..sink })
    }

    async fn open_with(path: &Path, options: JsonlOptions, fs: Arc<dyn Fs>) -> io::Result<JsonlSink> {
        let mut writer = Writer {
            fs,
            path: path.to_owned(),
            options: JsonlOptions { keep: options.keep.max(1), ..options },
            file: None,
            good_len: 0,
        };
        let writer = tokio::task::spawn_blocking(move || writer.open_current().map(|()| writer))
            .await
            .map_err(io::Error::other)??;
        Ok(JsonlSink { path: path.to_owned(), writer: Arc::new(Mutex::new(writer)), _lock: None })
    }
}

/// How long a sink waits for another process's lock on its file before it gives up.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Takes `<path>.lock` with flock(2), without waiting: the kernel drops it with the process,
/// however it ends. Taken before the file is opened (and its torn tail cut).
fn lock(path: &Path) -> io::Result<std::fs::File> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!(
                "the events file {} is in use by another sagahost process (it holds {}); each process \
                 needs its own --data-dir, or replicas publish to Kafka (--kafka-brokers)",
                path.display(),
                lock_path.display()
            ),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

#[async_trait]
impl Sink for JsonlSink {
    fn name(&self) -> String {
        format!("jsonl:{}", self.path.display())
    }

    async fn publish(&self, rows: &[OutboxRow]) -> Published {
        let mut buf = Vec::with_capacity(rows.iter().map(|r| r.payload.len() + 1).sum());
        for row in rows {
            buf.extend_from_slice(row.payload.as_bytes());
            buf.push(b'\n');
        }
        let writer = Arc::clone(&self.writer);
        // A panic in an earlier append poisons the mutex but cannot leave the writer wrong:
        // `good_len` only moves after a batch is on disk, and every append first cuts the file
        // back to it.
        let appended =
            tokio::task::spawn_blocking(move || writer.lock().unwrap_or_else(PoisonError::into_inner).append(&buf))
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)));
        match appended {
            Ok(()) => Published {
                acked: rows.len(),
                error: None,
                refused: None,
                delivered_after: Vec::new(),
                confirmed_after: Vec::new(),
            },
            // The file is cut back to its last good length before the next append: nothing of
            // a failed one stands.
            Err(e) => Published {
                acked: 0,
                refused: None,
                delivered_after: Vec::new(),
                confirmed_after: Vec::new(),
                error: Some(anyhow::Error::new(e).context(format!("appending to {}", self.path.display()))),
            },
        }
    }
}

/// An unfinished last line longer than this was not left by a crash of sagahost: what a torn
/// write leaves after the last newline is part of one event, and an event is smaller. Its
/// largest part is one plugin output (at most 64 MiB, `--plugin-output-kib`'s bound), which
/// the event holds re-serialized, and that can grow it: a number written `1e15` becomes
/// `1000000000000000.0`, at most 4.5 times its text. (It was 64 MiB, which a legal event of a
/// host run with the largest output limit passes: a crash in its write left a file the host
/// refused to start on.) The sink refuses to guess and asks for the file to be moved aside
/// rather than cutting it off.
const MAX_TORN_TAIL: u64 = 384 << 20;

/// The open events file and what is known to be on disk in it.
struct Writer {
    fs: Arc<dyn Fs>,
    path: PathBuf,
    options: JsonlOptions,
    /// `None` after the full file was renamed away and its successor could not be created
    /// yet; the next batch creates it.
    file: Option<Box<dyn LogFile>>,
    /// The file's length after the last acknowledged batch: everything before it is on disk.
    good_len: u64,
}

impl Writer {
    /// Appends one batch and fsyncs it: on `Ok` all of it is on disk; on `Err` none of it is
    /// left in the file (or, if even cutting it off failed, the next append cuts it first).
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        if let Some(file) = self.file.as_mut() {
            let len = file.len()?;
            if len > self.good_len {
                // An earlier failed batch that could not be cut off then: cut before anything
                // else, the rotation below included (a rotated file holds whole lines only).
                file.set_len(self.good_len)?;
            } else if len < self.good_len {
                tracing::warn!(path = %self.path.display(), expected = self.good_len, found = len, "the events file was truncated by someone else; appending after what is left");
                self.good_len = len;
            }
        }
        if self.file.is_some() && self.options.max_bytes > 0 && self.good_len >= self.options.max_bytes {
            if let Err(e) = self.rotate() {
                // Until its own rename, the full file stays where it is: keep appending to it
                // rather than stop publishing over housekeeping, and try again next batch.
                tracing::warn!(path = %self.path.display(), error = %e, "rotating the events file failed; will retry after the next batch");
            }
        }
        if self.file.is_none() {
            self.open_current()?;
        }
        // (A file opened here was cut back to its last whole line by `open_current`.)
        let file = self.file.as_mut().expect("opened above");
        match file.write_all(buf).and_then(|()| file.sync_data()) {
            Ok(()) => {
                self.good_len += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                // The fsync of the cut is best effort: should it not reach the disk before a
                // crash, the reopen cuts a torn line and whole lines left are repeats.
                if let Err(cut) = file.set_len(self.good_len).and_then(|()| file.sync_data()) {
                    tracing::warn!(path = %self.path.display(), error = %cut, "could not cut a failed batch off the events file; will before the next write");
                }
                Err(e)
            }
        }
    }

    /// Opens (creating) the current file and makes its directory entry durable, so events
    /// fsynced into a new file cannot vanish with it in a power loss.
    fn open_current(&mut self) -> io::Result<()> {
        let mut file = self.fs.open(&self.path)?;
        let len = cut_torn_tail(&mut *file, &self.path)?;
        // Whatever a predecessor wrote without fsyncing, and the cut, are on disk before they
        // count as acknowledged.
        file.sync_data()?;
        self.fs.sync_dir(self.dir())?;
        self.file = Some(file);
        self.good_len = len;
        Ok(())
    }

    /// Renames the current file to `.1`, moving older ones up to make room.
    fn rotate(&mut self) -> io::Result<()> {
        // Shift only up to the first free number: after a crash in the middle of an earlier
        // rotation there is a gap, and shifting across it would overwrite a file to be kept.
        // With no gap, `.keep` is the one replaced (dropped).
        let mut free = self.options.keep;
        for i in 1..self.options.keep {
            if !self.fs.exists(&self.rotated(i))? {
                free = i;
                break;
            }
        }
        for i in (1..free).rev() {
            self.fs.rename(&self.rotated(i), &self.rotated(i + 1))?;
            self.fs.sync_dir(self.dir())?;
        }
        self.fs.rename(&self.path, &self.rotated(1))?;
        // The full file is `.1` now: a crash from here until the new file exists leaves no
        // current file, which the next start (or batch) creates.
        self.file = None;
        self.fs.sync_dir(self.dir())?;
        tracing::info!(path = %self.path.display(), bytes = self.good_len, "rotated the events file");
        Ok(())
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    fn dir(&self) -> &Path {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        }
    }
}

/// Cuts off an unfinished last line and returns the length left. A process killed in the
/// middle of a write leaves a line without its newline, to which the next batch would be glued.
/// Its events were never acknowledged (they are sent again), so it goes. Whole lines of an
/// unacknowledged batch stay: they are repeats, which at-least-once delivery allows.
fn cut_torn_tail(file: &mut dyn LogFile, path: &Path) -> io::Result<u64> {
    let len = file.len()?;
    let mut chunk = vec![0u8; 64 << 10];
    let mut end = len;
    while end > 0 {
        let n = (chunk.len() as u64).min(end) as usize;
        let start = end - n as u64;
        file.read_exact_at(start, &mut chunk[..n])?;
        if let Some(i) = chunk[..n].iter().rposition(|&b| b == b'\n') {
            let keep = start + i as u64 + 1;
            if keep < len {
                file.set_len(keep)?;
                tracing::warn!(path = %path.display(), bytes = len - keep, "cut off an unfinished last line of the events file (its events are sent again)");
            }
            return Ok(keep);
        }
        if len - start >= MAX_TORN_TAIL {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} ends with more than {} MiB without a newline, which sagahost never writes; move the file aside",
                    path.display(),
                    MAX_TORN_TAIL >> 20
                ),
            ));
        }
        end = start;
    }
    if len > 0 {
        file.set_len(0)?;
        tracing::warn!(path = %path.display(), bytes = len, "cut off an unfinished only line of the events file (its events are sent again)");
    }
    Ok(0)
}
