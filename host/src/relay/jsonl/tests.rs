//! The sink against a file system that fails: writes that stop half-way, fsyncs that report
//! EIO, truncations, creations and renames refused; and one real file system refusing a write.

use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};

use super::fs::{Fs, LogFile, RealFs};
use super::*;

/// Faults to inject, each once: the operation that takes it fails and clears it.
#[derive(Default)]
struct Faults {
    /// The next write stores this many bytes, then fails with "no space left on device".
    write_stops_after: Option<usize>,
    /// The next fsync of the file fails with EIO.
    sync_fails: bool,
    /// The next truncation fails.
    set_len_fails: bool,
    /// The next open (creation) of a file fails.
    open_fails: bool,
    /// The next rename onto this path fails.
    rename_onto_fails: Option<PathBuf>,
}

/// The real file system with [`Faults`] injected.
#[derive(Clone, Default)]
struct FaultyFs(Arc<Mutex<Faults>>);

impl FaultyFs {
    fn arm(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.0.lock().unwrap());
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.0.lock().unwrap()
    }
}

impl Fs for FaultyFs {
    fn open(&self, path: &Path) -> io::Result<Box<dyn LogFile>> {
        if std::mem::take(&mut self.faults().open_fails) {
            return Err(io::Error::other("injected: cannot create the file"));
        }
        Ok(Box::new(FaultyFile { inner: RealFs.open(path)?, fs: self.clone() }))
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        RealFs.exists(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut faults = self.faults();
        if faults.rename_onto_fails.as_deref() == Some(to) {
            faults.rename_onto_fails = None;
            return Err(io::Error::other("injected: rename refused"));
        }
        RealFs.rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        RealFs.sync_dir(dir)
    }
}

struct FaultyFile {
    inner: Box<dyn LogFile>,
    fs: FaultyFs,
}

impl LogFile for FaultyFile {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_exact_at(offset, buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let stop = self.fs.faults().write_stops_after.take();
        match stop {
            Some(n) => {
                self.inner.write_all(&buf[..n.min(buf.len())])?;
                Err(io::Error::new(io::ErrorKind::StorageFull, "injected: no space left on device"))
            }
            None => self.inner.write_all(buf),
        }
    }

    fn sync_data(&mut self) -> io::Result<()> {
        if std::mem::take(&mut self.fs.faults().sync_fails) {
            return Err(io::Error::other("injected: input/output error"));
        }
        self.inner.sync_data()
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        if std::mem::take(&mut self.fs.faults().set_len_fails) {
            return Err(io::Error::other("injected: cannot truncate"));
        }
        self.inner.set_len(len)
    }
}

const NEVER: JsonlOptions = JsonlOptions { max_bytes: 0, keep: 5 };

fn row(id: i64) -> OutboxRow {
    OutboxRow {
        id,
        event_id: format!("ev-{id}"),
        saga_id: "s1".into(),
        seq: id,
        event_type: "X".into(),
        payload: format!(r#"{{"event_id":"ev-{id}","seq":{id}}}"#),
        created_at: 0,
    }
}

fn batch(ids: RangeInclusive<i64>) -> Vec<OutboxRow> {
    ids.map(row).collect()
}

/// The events in a file, by `seq`; every line must be whole.
fn seqs(path: &Path) -> Vec<i64> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.is_empty() || text.ends_with('\n'), "{} ends with an unfinished line", path.display());
    text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"].as_i64().unwrap()).collect()
}

fn len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

fn rotated(path: &Path, n: u32) -> PathBuf {
    PathBuf::from(format!("{}.{n}", path.display()))
}

struct Setup {
    _dir: tempfile::TempDir,
    path: PathBuf,
    fs: FaultyFs,
    sink: JsonlSink,
}

async fn setup(options: JsonlOptions) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let fs = FaultyFs::default();
    let sink = JsonlSink::open_with(&path, options, Arc::new(fs.clone())).await.unwrap();
    Setup { _dir: dir, path, fs, sink }
}

/// Publishes and insists the sink took all of it.
async fn publish(sink: &JsonlSink, rows: &[OutboxRow]) {
    let p = sink.publish(rows).await;
    assert!(p.error.is_none(), "{:?}", p.error);
    assert_eq!(p.acked, rows.len());
}

/// Publishes and insists the sink took none of it.
async fn refused(sink: &JsonlSink, rows: &[OutboxRow]) {
    let p = sink.publish(rows).await;
    assert_eq!(p.acked, 0, "nothing of a failed batch may be acknowledged");
    assert!(p.error.is_some(), "a refused batch says why");
}

#[tokio::test]
async fn a_write_that_stops_half_way_is_not_acknowledged_cut_off_and_sent_again_cleanly() {
    let s = setup(NEVER).await;
    publish(&s.sink, &batch(1..=2)).await;
    let good = len(&s.path);
    s.fs.arm(|f| f.write_stops_after = Some(10));
    refused(&s.sink, &batch(3..=5)).await;
    assert_eq!(len(&s.path), good, "the file ends at the last acknowledged batch");
    publish(&s.sink, &batch(3..=5)).await;
    assert_eq!(seqs(&s.path), [1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn a_failed_fsync_is_not_acknowledged_and_the_batch_is_cut_off() {
    let s = setup(NEVER).await;
    publish(&s.sink, &batch(1..=2)).await;
    let good = len(&s.path);
    s.fs.arm(|f| f.sync_fails = true);
    refused(&s.sink, &batch(3..=5)).await;
    assert_eq!(len(&s.path), good, "the file ends at the last acknowledged batch");
    publish(&s.sink, &batch(3..=5)).await;
    assert_eq!(seqs(&s.path), [1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn a_failed_batch_that_could_not_be_cut_off_then_is_cut_before_the_next_write() {
    let s = setup(NEVER).await;
    publish(&s.sink, &batch(1..=2)).await;
    let good = len(&s.path);
    s.fs.arm(|f| {
        f.write_stops_after = Some(10);
        f.set_len_fails = true;
    });
    refused(&s.sink, &batch(3..=5)).await;
    assert_eq!(len(&s.path), good + 10, "the cut failed too (the fault works)");
    publish(&s.sink, &batch(3..=5)).await;
    assert_eq!(seqs(&s.path), [1, 2, 3, 4, 5]);
}

/// Makes `path` a sparse file one byte short of the largest size its file system allows,
/// ending in a newline, so that the next write of more than one byte stops half-way with EFBIG
/// (while fsync keeps succeeding). Returns its length.
fn one_byte_short_of_the_size_limit(path: &Path) -> u64 {
    let file = std::fs::File::create(path).unwrap();
    let (mut fits, mut too_big) = (0u64, i64::MAX as u64 + 1);
    while too_big - fits > 1 {
        let mid = fits + (too_big - fits) / 2;
        if file.set_len(mid).is_ok() {
            fits = mid;
        } else {
            too_big = mid;
        }
    }
    file.set_len(fits - 2).unwrap();
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    io::Write::write_all(&mut file, b"\n").unwrap();
    fits - 1
}

/// The same on a real file system: tokio's `write_all` used to return before the write was
/// done, and its `sync_data` succeeded after the write had failed, so this batch was
/// acknowledged without being in the file.
#[tokio::test]
async fn a_write_a_real_file_system_refuses_is_never_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let good = one_byte_short_of_the_size_limit(&path);
    let sink = JsonlSink::open(&path, NEVER).await.unwrap();
    refused(&sink, &batch(1..=2)).await;
    assert_eq!(len(&path), good, "the half-written batch is cut off");
}

#[tokio::test]
async fn an_unfinished_last_line_left_by_a_crash_is_cut_off_when_the_file_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let whole = format!("{}\n{}\n", row(1).payload, row(2).payload);
    std::fs::write(&path, format!("{whole}{}", &row(3).payload[..7])).unwrap();
    let sink = JsonlSink::open(&path, NEVER).await.unwrap();
    assert_eq!(len(&path), whole.len() as u64);
    publish(&sink, &batch(3..=4)).await;
    assert_eq!(seqs(&path), [1, 2, 3, 4]);

    // A file that is nothing but an unfinished line is emptied.
    drop(sink);
    std::fs::write(&path, &row(1).payload[..7]).unwrap();
    drop(JsonlSink::open(&path, NEVER).await.unwrap());
    assert_eq!(len(&path), 0);
}

/// A torn write of the largest event a host can write (an output of 64 MiB, the flag's bound,
/// whose numbers grew when re-serialized) is cut, not refused: the host starts again after it.
#[tokio::test]
async fn a_torn_write_of_the_largest_legal_event_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    std::fs::write(&path, b"{}\n").unwrap();
    let file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    // 64 MiB of `1e15,` re-serialized: 3.8 times as long, and torn before its newline.
    file.set_len(3 + (64 << 20) / 5 * 19).unwrap();
    drop(JsonlSink::open(&path, NEVER).await.expect("a torn event of a legal size is cut"));
    assert_eq!(len(&path), 3, "cut back to the last whole line");
}

#[tokio::test]
async fn a_file_ending_in_a_huge_unfinished_line_is_refused_not_cut() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    std::fs::write(&path, b"{}\n").unwrap();
    let file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    let size = 3 + MAX_TORN_TAIL + 1;
    file.set_len(size).unwrap();
    let Err(e) = JsonlSink::open(&path, NEVER).await else { panic!("a file not written by sagahost was opened") };
    assert!(e.to_string().contains("move the file aside"), "{e}");
    assert_eq!(len(&path), size, "nothing was cut");
}

/// Three events of these ids make 84 to 90 bytes: two batches of three pass 100 bytes.
const SMALL: JsonlOptions = JsonlOptions { max_bytes: 100, keep: 2 };

#[tokio::test]
async fn the_file_rotates_between_batches_and_keeps_the_newest_files() {
    let s = setup(SMALL).await;
    for b in 0..10 {
        publish(&s.sink, &batch(b * 3 + 1..=b * 3 + 3)).await;
    }
    // Each file took batches until it reached 100 bytes: two batches, six events. Ten batches
    // made five files; the two oldest (events 1 to 12) were dropped, keep = 2.
    assert_eq!(seqs(&s.path), (25..=30).collect::<Vec<_>>());
    assert_eq!(seqs(&rotated(&s.path, 1)), (19..=24).collect::<Vec<_>>());
    assert_eq!(seqs(&rotated(&s.path, 2)), (13..=18).collect::<Vec<_>>());
    assert!(!rotated(&s.path, 3).exists(), "only `keep` rotated files stay");
}

#[tokio::test]
async fn a_batch_larger_than_the_limit_is_never_split() {
    let s = setup(SMALL).await;
    publish(&s.sink, &batch(1..=10)).await;
    publish(&s.sink, &batch(11..=12)).await;
    assert_eq!(seqs(&rotated(&s.path, 1)), (1..=10).collect::<Vec<_>>());
    assert_eq!(seqs(&s.path), [11, 12]);
}

#[tokio::test]
async fn a_failed_batch_left_in_a_full_file_is_cut_off_before_the_file_is_rotated() {
    let s = setup(SMALL).await;
    publish(&s.sink, &batch(1..=10)).await; // over the limit: the next batch rotates first
    let good = len(&s.path);
    // That rotation fails, so the next batch goes into the full file; it fails half-way, and
    // so does cutting it off.
    let onto = rotated(&s.path, 1);
    s.fs.arm(|f| {
        f.rename_onto_fails = Some(onto);
        f.write_stops_after = Some(10);
        f.set_len_fails = true;
    });
    refused(&s.sink, &batch(11..=12)).await;
    assert!(len(&s.path) > good, "the cut failed too (the fault works)");
    publish(&s.sink, &batch(11..=12)).await;
    // Whole lines in both files, the refused batch's first copy in neither.
    assert_eq!(seqs(&rotated(&s.path, 1)), (1..=10).collect::<Vec<_>>());
    assert_eq!(seqs(&s.path), [11, 12]);
}

#[tokio::test]
async fn a_limit_of_zero_never_rotates() {
    let s = setup(NEVER).await;
    for b in 0..20 {
        publish(&s.sink, &batch(b * 3 + 1..=b * 3 + 3)).await;
    }
    assert_eq!(seqs(&s.path), (1..=60).collect::<Vec<_>>());
    assert!(!rotated(&s.path, 1).exists());
}

/// The file was renamed to `.1` and the new one could not be created (a crash at that point
/// looks the same to the next start): every acknowledged event is in `.1`, the batch is
/// refused, and the next start creates the new file.
#[tokio::test]
async fn a_crash_between_the_rename_and_the_new_file_loses_nothing_acknowledged() {
    let s = setup(JsonlOptions { max_bytes: 100, keep: 5 }).await;
    publish(&s.sink, &batch(1..=3)).await;
    publish(&s.sink, &batch(4..=6)).await;
    s.fs.arm(|f| f.open_fails = true);
    refused(&s.sink, &batch(7..=9)).await;
    assert!(!s.path.exists(), "the full file was renamed, its successor not created");
    assert_eq!(seqs(&rotated(&s.path, 1)), (1..=6).collect::<Vec<_>>());

    // The running sink creates it at the next batch.
    publish(&s.sink, &batch(7..=9)).await;
    assert_eq!(seqs(&s.path), [7, 8, 9]);

    // And a restart in that state does too.
    let Setup { _dir, path, fs, sink } = s;
    publish(&sink, &batch(10..=12)).await;
    fs.arm(|f| f.open_fails = true);
    refused(&sink, &batch(13..=15)).await;
    drop(sink);
    assert!(!path.exists());
    let sink = JsonlSink::open(&path, JsonlOptions { max_bytes: 100, keep: 5 }).await.unwrap();
    publish(&sink, &batch(13..=15)).await;
    assert_eq!(seqs(&rotated(&path, 2)), (1..=6).collect::<Vec<_>>());
    assert_eq!(seqs(&rotated(&path, 1)), (7..=12).collect::<Vec<_>>());
    assert_eq!(seqs(&path), [13, 14, 15]);
}

/// A rotation that moved the older files up but failed to rename the current one leaves a gap
/// at `.1`; the next rotation must fill it, not shift the older files over each other.
#[tokio::test]
async fn an_interrupted_rotation_overwrites_no_file_it_should_keep() {
    let s = setup(JsonlOptions { max_bytes: 100, keep: 3 }).await;
    for b in 0..8 {
        publish(&s.sink, &batch(b * 3 + 1..=b * 3 + 3)).await;
    }
    // .3 = events 1..=6, .2 = 7..=12, .1 = 13..=18, current = 19..=24.
    s.fs.arm(|f| f.rename_onto_fails = Some(rotated(&s.path, 1)));
    // The rotation fails at its last rename: the batch goes to the current file all the same.
    publish(&s.sink, &batch(25..=27)).await;
    assert!(!rotated(&s.path, 1).exists());
    publish(&s.sink, &batch(28..=30)).await;
    // Only the oldest file (1..=6) is gone, as a rotation with keep = 3 demands.
    assert_eq!(seqs(&rotated(&s.path, 3)), (7..=12).collect::<Vec<_>>());
    assert_eq!(seqs(&rotated(&s.path, 2)), (13..=18).collect::<Vec<_>>());
    assert_eq!(seqs(&rotated(&s.path, 1)), (19..=27).collect::<Vec<_>>());
    assert_eq!(seqs(&s.path), [28, 29, 30]);
}

/// Two processes appending to one events file would each cut it back to what they wrote
/// themselves, deleting the other's acknowledged events: the second sink on a file refuses to
/// open while the first lives, saying what to do.
#[tokio::test]
async fn a_second_sink_on_the_same_file_refuses_to_open_until_the_first_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let first = JsonlSink::open(&path, NEVER).await.unwrap();
    publish(&first, &batch(1..=2)).await;
    let second = JsonlSink::open(&path, NEVER).await.err().expect("a second sink on the same file opened");
    assert_eq!(second.kind(), io::ErrorKind::ResourceBusy);
    assert!(second.to_string().contains("--data-dir"), "{second}");
    drop(first);
    let again = JsonlSink::open(&path, NEVER).await.unwrap();
    publish(&again, &batch(3..=3)).await;
    assert_eq!(seqs(&path), [1, 2, 3], "nothing the first sink acknowledged was cut");
}
