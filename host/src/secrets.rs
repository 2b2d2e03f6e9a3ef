//! The host's secrets: the files of one directory (`--outbound-secrets-dir`), each a secret
//! named by its file name, such as a Kubernetes secret mounted as a volume, Docker's
//! `/run/secrets` or systemd's `$CREDENTIALS_DIRECTORY`.
//!
//! Owns reading a secret and rendering a credential's value (`crate::grants::Credential`)
//! with it. A secret is read from its file every time a request needs it, so a rotated
//! secret (Kubernetes swaps the volume's files atomically) is used from the next request on,
//! with no restart and no cache to go stale; the files are small and on a memory file system
//! in every one of those deployments. A value never leaves this module except as the header
//! value it renders (marked sensitive, so it is not indexed by HTTP/2's header compression nor
//! shown by `Debug`): errors name the secret and its file, never its content.
//!
//! It must not know plugins, grants' storage or HTTP routes: the runtime renders the headers
//! of a request, and the admin API checks that the secrets a credential names exist here.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderValue;

use crate::grants::{self, Piece};

/// The largest secret file read, in bytes.
pub const MAX_SECRET_BYTES: u64 = 8 << 10;

/// The largest header value a credential renders to, in bytes: what servers take at most in
/// one header (nginx's default buffer is 8 KiB).
pub const MAX_RENDERED_BYTES: usize = 8 << 10;

/// How long reading one secret may take: the directory is a memory file system in every
/// deployment it is meant for, so a read this slow is a hung mount, and the request should
/// not wait on it (the read's thread may stay blocked; the request does not).
const READ_BOUND: Duration = Duration::from_secs(2);

/// Most reads of secrets at once, stuck ones included (see [`Secrets::read`]).
const MAX_READS: usize = 8;

/// Why a secret's file could not be read.
enum Unreadable {
    Missing,
    Other(String),
}

/// Reads at most [`MAX_SECRET_BYTES`] + 1 bytes of a regular file (blocking). The check that
/// it is one comes before the open, so a FIFO is not opened (and does not block the open); a
/// file swapped for a FIFO in between blocks this thread only until [`READ_BOUND`] gives up
/// on it, and holds one of the [`MAX_READS`] permits while it does.
fn read_file(path: &Path) -> Result<Vec<u8>, Unreadable> {
    use std::io::Read as _;
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(Unreadable::Other("it is not a regular file".to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Unreadable::Missing),
        Err(e) => return Err(Unreadable::Other(format!("cannot read it: {e}"))),
    }
    let file = std::fs::File::open(path).map_err(|e| Unreadable::Other(format!("cannot read it: {e}")))?;
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Unreadable::Other(format!("cannot read it: {e}")))?;
    Ok(bytes)
}

/// Why a secret or a credential could not be used. Never holds a secret's content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The directory has no file of that name.
    #[error("no secret named {name:?} in {dir} (the host's --outbound-secrets-dir)")]
    Missing { name: String, dir: String },
    /// The file exists but cannot serve as (part of) a header value.
    #[error("the secret {name:?} ({path}) cannot be used: {why}")]
    Unusable { name: String, path: String, why: String },
    /// The credential's value is not a valid template (the admin API refuses those).
    #[error("the credential's value is not valid: {0}")]
    Template(String),
    /// The value names a secret but this host has no secrets directory.
    #[error("this host has no secrets directory (--outbound-secrets-dir), so it has no secret {name:?}")]
    NoDirectory { name: String },
}

/// The directory secrets are read from. Cheap to clone.
#[derive(Clone)]
pub struct Secrets {
    dir: Arc<Path>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({})", self.dir.display())
    }
}

impl Secrets {
    /// `--outbound-secrets-dir`'s parser: the directory must exist, so that a typo stops the
    /// host at start rather than failing every request that needs a credential.
    pub fn from_flag(path: &str) -> Result<Secrets, String> {
        let dir = PathBuf::from(path);
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => Ok(Secrets { dir: dir.into() }),
            Ok(_) => Err(format!("{path} is not a directory")),
            Err(e) => Err(format!("cannot read the directory {path}: {e}")),
        }
    }

    /// The directory, for logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads secret `name`: its file's content, one trailing line break dropped (files are
    /// usually written with one). Refused when it is not a regular file (a FIFO would block
    /// the read), empty, larger than [`MAX_SECRET_BYTES`], or holds anything but visible ASCII
    /// and spaces: a header value may hold nothing else, and a line break in it would let a
    /// secret's file add headers of its own.
    ///
    /// The read is one blocking task holding one of [`MAX_READS`] permits until it ends, and
    /// the request waits for it at most [`READ_BOUND`]: on a hung mount the reads still stuck
    /// keep their threads, but never more than [`MAX_READS`] of them, so the blocking pool
    /// (DNS lookups, compiles, the events file) is never filled by held-back steps retrying.
    pub async fn read(&self, name: &str) -> Result<String, Error> {
        grants::check_secret_name(name).map_err(|why| self.unusable(name, why))?;
        static READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_READS);
        let Ok(permit) = READS.try_acquire() else {
            return Err(self.unusable(
                name,
                format!("{MAX_READS} reads of secrets are still stuck: is the directory on a hung mount?"),
            ));
        };
        let path = self.dir.join(name);
        let reading = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            read_file(&path)
        });
        match tokio::time::timeout(READ_BOUND, reading).await {
            Ok(Ok(Ok(bytes))) => self.checked(name, bytes),
            Ok(Ok(Err(Unreadable::Missing))) => {
                Err(Error::Missing { name: name.to_owned(), dir: self.dir.display().to_string() })
            }
            Ok(Ok(Err(Unreadable::Other(why)))) => Err(self.unusable(name, why)),
            Ok(Err(e)) => Err(self.unusable(name, format!("reading it failed: {e}"))),
            Err(_) => Err(self.unusable(name, format!("reading it took over {READ_BOUND:?}"))),
        }
    }

    /// A secret file's bytes as a secret, or why they cannot be one.
    fn checked(&self, name: &str, bytes: Vec<u8>) -> Result<String, Error> {
        if bytes.len() as u64 > MAX_SECRET_BYTES {
            return Err(self.unusable(name, format!("it is larger than {MAX_SECRET_BYTES} bytes")));
        }
        let bytes = match bytes.strip_suffix(b"\r\n").or_else(|| bytes.strip_suffix(b"\n")) {
            Some(trimmed) => trimmed,
            None => &bytes,
        };
        if bytes.is_empty() {
            return Err(self.unusable(name, "it is empty".to_owned()));
        }
        if !bytes.iter().all(|b| matches!(b, b' '..=b'~')) {
            return Err(self.unusable(
                name,
                "it holds a line break, a control character or non-ASCII, which a header value may not".to_owned(),
            ));
        }
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn unusable(&self, name: &str, why: String) -> Error {
        Error::Unusable { name: name.to_owned(), path: self.dir.join(name).display().to_string(), why }
    }
}

/// Renders a credential's value (checked by [`grants::pieces`]): its text with each `${name}`
/// replaced by that secret, read now, once per name (a secret named twice is the same value
/// twice, even while its file is being replaced). `None` for `secrets` (the host has no
/// directory) fails on the first reference. At most [`MAX_RENDERED_BYTES`].
pub async fn render(secrets: Option<&Secrets>, template: &str) -> Result<HeaderValue, Error> {
    let pieces = grants::pieces(template).map_err(Error::Template)?;
    let mut read: Vec<(&str, String)> = Vec::new();
    let mut value = String::with_capacity(template.len() + 64);
    for piece in pieces {
        match piece {
            Piece::Text(text) => value.push_str(text),
            Piece::Secret(name) => {
                let at = match read.iter().position(|(n, _)| *n == name) {
                    Some(at) => at,
                    None => {
                        let secrets = secrets.ok_or_else(|| Error::NoDirectory { name: name.to_owned() })?;
                        read.push((name, secrets.read(name).await?));
                        read.len() - 1
                    }
                };
                value.push_str(&read[at].1);
            }
        }
        if value.len() > MAX_RENDERED_BYTES {
            return Err(Error::Template(format!(
                "with its secrets the value is larger than {MAX_RENDERED_BYTES} bytes"
            )));
        }
    }
    // Both parts were checked to be visible ASCII and spaces: always a valid value.
    let mut header = HeaderValue::from_str(&value)
        .map_err(|_| Error::Template("the rendered value is not a valid header value".to_owned()))?;
    header.set_sensitive(true);
    Ok(header)
}

/// Checks that every secret `template` names can be read now (the admin API's check when a
/// credential is granted). The first that cannot, and why.
pub async fn check(secrets: Option<&Secrets>, template: &str) -> Result<(), Error> {
    render(secrets, template).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &[u8])]) -> (tempfile::TempDir, Secrets) {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        let secrets = Secrets::from_flag(dir.path().to_str().unwrap()).unwrap();
        (dir, secrets)
    }

    #[tokio::test]
    async fn a_secret_is_its_file_without_the_trailing_line_break() {
        let (_dir, secrets) =
            dir_with(&[("plain", b"sk_live_1"), ("newline", b"sk_live_2\n"), ("crlf", b"sk_live_3\r\n")]);
        assert_eq!(secrets.read("plain").await.unwrap(), "sk_live_1");
        assert_eq!(secrets.read("newline").await.unwrap(), "sk_live_2");
        assert_eq!(secrets.read("crlf").await.unwrap(), "sk_live_3");
        let header = render(Some(&secrets), "Bearer ${newline}").await.unwrap();
        assert_eq!(header, "Bearer sk_live_2");
        assert!(header.is_sensitive());
        assert_eq!(render(Some(&secrets), "${plain}:${crlf}").await.unwrap(), "sk_live_1:sk_live_3");
    }

    #[tokio::test]
    async fn a_rotated_secret_is_read_anew() {
        let (dir, secrets) = dir_with(&[("key", b"old")]);
        assert_eq!(secrets.read("key").await.unwrap(), "old");
        std::fs::write(dir.path().join("key"), b"new\n").unwrap();
        assert_eq!(secrets.read("key").await.unwrap(), "new");
    }

    #[tokio::test]
    async fn unusable_secrets_are_refused_without_showing_their_content() {
        let big = vec![b'k'; MAX_SECRET_BYTES as usize + 1];
        let (dir, secrets) = dir_with(&[
            ("empty", b"\n"),
            ("two-lines", b"sk_hidden_1\nX-Evil: yes\n"),
            ("control", b"sk_hidden_2\x07"),
            ("utf8", "sk_hidden_\u{e9}".as_bytes()),
            ("tab", b"sk_hidden_3\tx"),
            ("big", &big),
        ]);
        std::fs::create_dir(dir.path().join("a-dir")).unwrap();
        for (name, why) in [
            ("empty", "empty"),
            ("two-lines", "line break"),
            ("control", "control character"),
            ("utf8", "non-ASCII"),
            ("tab", "control character"),
            ("big", "larger than"),
            ("a-dir", "not a regular file"),
        ] {
            let e = secrets.read(name).await.expect_err(name).to_string();
            assert!(e.contains(why) && e.contains(name), "{name}: {e}");
            assert!(!e.contains("sk_hidden") && !e.contains("kkkk"), "{name}: {e}");
        }
        let missing = secrets.read("absent").await.unwrap_err();
        assert!(matches!(missing, Error::Missing { .. }), "{missing}");
        assert!(secrets.read("../etc").await.unwrap_err().to_string().contains("not a secret name"));
        let e = render(None, "Bearer ${key}").await.unwrap_err();
        assert_eq!(e, Error::NoDirectory { name: "key".into() });
        assert!(check(Some(&secrets), "Bearer ${absent}").await.is_err());
        // A FIFO would block a read: refused without opening it.
        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        assert!(secrets.read("fifo").await.unwrap_err().to_string().contains("not a regular file"));
        // Named many times, a secret may not blow a header up.
        std::fs::write(dir.path().join("k4"), "k".repeat(4 << 10)).unwrap();
        let e = render(Some(&secrets), "${k4}${k4}${k4}").await.unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
    }

    #[test]
    fn the_directory_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(Secrets::from_flag(dir.path().to_str().unwrap()).is_ok());
        assert!(Secrets::from_flag(file.to_str().unwrap()).unwrap_err().contains("not a directory"));
        assert!(Secrets::from_flag("/no/such/dir").unwrap_err().contains("cannot read"));
    }
}
