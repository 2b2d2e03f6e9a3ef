//! The file operations the JSON-lines sink performs, behind a small trait so that tests can make
//! them fail the way disks do: a write that stops half-way (ENOSPC), an fsync that reports EIO,
//! a file that cannot be created, a rename refused.
//!
//! [`RealFs`] is what production uses: plain blocking `std::fs` calls, which the sink runs on
//! tokio's blocking pool. We do not use `tokio::fs` here: its `write_all` returns once the write
//! is queued, and a failure of that background write is only reported by a later call on the
//! file, not by the `sync_data` that follows it, so a batch could be confirmed that never
//! reached the disk.

use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::Path;

/// The directory-level operations: opening the events file, renaming it, making renames durable.
pub(super) trait Fs: Send + Sync + 'static {
    /// Opens `path` for appending (and for reading its tail), creating it when missing.
    fn open(&self, path: &Path) -> io::Result<Box<dyn LogFile>>;
    /// Does `path` exist?
    fn exists(&self, path: &Path) -> io::Result<bool>;
    /// Renames `from` to `to` atomically, replacing `to` if it exists.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the entries of `dir` (files created or renamed in it) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// An open events file. Every write goes to the end of the file (it is opened in append mode).
pub(super) trait LogFile: Send {
    fn len(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`.
    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Appends all of `buf`; on error, any part of it may have been written.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// `fdatasync`: the data written so far, and the length, are on disk.
    fn sync_data(&mut self) -> io::Result<()>;
    /// Truncates (or extends) the file to `len` bytes.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
}

/// The real file system.
pub(super) struct RealFs;

impl Fs for RealFs {
    fn open(&self, path: &Path) -> io::Result<Box<dyn LogFile>> {
        let file = std::fs::OpenOptions::new().create(true).append(true).read(true).open(path)?;
        Ok(Box::new(file))
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        // A directory is fsynced through a read-only handle on Unix. Windows has no such call;
        // NTFS journals renames and creations itself.
        #[cfg(unix)]
        std::fs::File::open(dir)?.sync_all()?;
        #[cfg(not(unix))]
        let _ = dir;
        Ok(())
    }
}

impl LogFile for std::fs::File {
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        // Moving the cursor does not affect writes: in append mode every write goes to the end.
        self.seek(SeekFrom::Start(offset))?;
        self.read_exact(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        io::Write::write_all(self, buf)?;
        self.flush()
    }

    fn sync_data(&mut self) -> io::Result<()> {
        std::fs::File::sync_data(self)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        std::fs::File::set_len(self, len)
    }
}
