//! Recently committed plugin state, kept in memory so that a plugin's read of a key a
//! recent commit wrote needs no database round trip.
//!
//! The common case is a compensation: `payment.compensate` reads the `charge/{saga id}` that
//! `payment.execute` wrote moments before. On SQLite that read is a round trip to a reader
//! connection's thread, and it made a compensating call 5-20x as long as an executing one
//! (measured: 280-450 µs against 35-90 µs at 100 sagas/s, 1.2-13 ms under load; BENCHMARKS.md,
//! session 16). [`KeyFilter`](super::keys::KeyFilter) answers reads of keys never written;
//! this answers reads of keys written lately.
//!
//! Like the key filter it is exact only when every write of plugin state goes through this
//! store (SQLite opened by a serving host). Where hosts share the database (PostgreSQL
//! replicas) another host may have changed a value since, so there an answer from here is a
//! guess the commit checks (`StateRead::checked`, `Commit::plugin_checks`): a commit that
//! finds a value changed is refused and the key forgotten ([`StateCache::forget`]), and the
//! steps run again reading the database. (Every read of such a call is checked, wherever it
//! was answered: the check is what keeps two sagas from losing each other's updates.) The
//! rules below keep the cache exact with respect to this host's own commits either way.
//! It is filled only by commits, never by reads: a read could return a value that a
//! commit replaces while the read is on its way back, and caching that would serve the old
//! value after the new one committed. The rules that keep it exact (a read answered from
//! here returns what a database read at that moment would):
//!
//! - A commit that writes a key announces it BEFORE it is queued ([`StateCache::begin`]):
//!   the key's value is dropped and the key is marked pending. Reads of a pending key go to
//!   the database, which holds the last committed value whether or not the commit has
//!   committed yet.
//! - Only when the commit is known durable (its caller got `Ok`) does the value go in
//!   ([`Pending::committed`]); a commit that failed, was fenced or whose caller went away
//!   leaves the key uncached ([`Pending`]'s drop).
//! - Two commits that write the same key while either is pending may commit in either order
//!   relative to the order their callers learn it; neither stores its value (the key is
//!   "tainted" until no commit of it is pending), and the next read goes to the database.
//! - Memory is bounded ([`StateCache::new`]'s budget): the oldest stored values go first, and
//!   a value over a size limit is never stored. An evicted key is read from the database
//!   again, as before.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{last_writes, StateWrite};

/// How much a serving host keeps: 64 MiB of values (a demo order's records are ~100 bytes,
/// so hundreds of thousands of them), none larger than 64 KiB.
pub(super) const BUDGET: usize = 64 << 20;
pub(super) const LARGEST: usize = 64 << 10;

/// Bytes counted per stored value beyond its plugin name, key and value: the map entries,
/// the eviction queue's item and the allocations' headers, roughly.
const ENTRY_OVERHEAD: usize = 128;

/// The cache; see the module docs.
pub(super) struct StateCache {
    inner: Mutex<Inner>,
    budget: usize,
    /// The largest value stored, in [`size`]'s bytes.
    largest: usize,
    hits: AtomicU64,
}

#[derive(Default)]
struct Inner {
    /// plugin -> key -> entry. Two levels so a lookup borrows its `&str`s.
    plugins: HashMap<String, HashMap<String, Entry>>,
    /// Stored values, oldest first, as (plugin, key, generation); an item whose generation
    /// is no longer its entry's is stale and skipped.
    order: VecDeque<(String, String, u64)>,
    /// Bytes of the stored values, as [`size`] counts them.
    bytes: usize,
    next_generation: u64,
}

#[derive(Default)]
struct Entry {
    /// The committed value (`Some(None)`: the key was deleted), when stored.
    value: Option<Option<Vec<u8>>>,
    /// Commits of the key announced and not yet resolved.
    pending: u32,
    /// A commit began while another was pending: no value until none is.
    tainted: bool,
    generation: u64,
}

/// A write a commit announced: (plugin, key, the value to store once it is durable); `None`
/// for a value over the size limit, which is never stored (nor copied).
type Announced = (String, String, Option<Option<Vec<u8>>>);

fn size(plugin: &str, key: &str, value: &Option<Vec<u8>>) -> usize {
    plugin.len() + key.len() + value.as_ref().map_or(0, Vec::len) + ENTRY_OVERHEAD
}

impl StateCache {
    /// An empty cache that stores at most about `budget` bytes, none of its values larger
    /// than `largest`.
    pub(super) fn new(budget: usize, largest: usize) -> StateCache {
        StateCache { inner: Mutex::default(), budget, largest, hits: AtomicU64::new(0) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves counters, not broken invariants, behind;
        // keep serving rather than poison every later read.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The committed value of `key` (`Some(None)`: known absent), if stored and no commit of
    /// it is pending; `None`: ask the database.
    pub(super) fn get(&self, plugin: &str, key: &str) -> Option<Option<Vec<u8>>> {
        let inner = self.lock();
        let entry = inner.plugins.get(plugin)?.get(key)?;
        if entry.pending > 0 {
            return None;
        }
        let value = entry.value.clone()?;
        drop(inner);
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(value)
    }

    /// Stops answering `key` (its stored value is dropped): another writer may have changed
    /// it. A pending commit of it is left to resolve as it would.
    pub(super) fn forget(&self, plugin: &str, key: &str) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(keys) = inner.plugins.get_mut(plugin) else { return };
        let Some(entry) = keys.get_mut(key) else { return };
        if let Some(value) = entry.value.take() {
            inner.bytes -= size(plugin, key, &value);
        }
        if entry.pending == 0 {
            keys.remove(key);
            if keys.is_empty() {
                inner.plugins.remove(plugin);
            }
        }
    }

    /// Reads answered from the cache since it was made.
    pub(super) fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Announces a commit of `writes` ((plugin, writes) in order; a later write of a key
    /// wins): call it before the commit is queued, and resolve the returned [`Pending`] once
    /// the commit's outcome is known.
    pub(super) fn begin(self: &Arc<Self>, writes: &[(&str, &[StateWrite])]) -> Pending {
        // Only values that may be stored are copied.
        let last: Vec<Announced> = last_writes(writes)
            .into_iter()
            .map(|(plugin, key, value)| {
                let keep = size(plugin, key, value) <= self.largest;
                (plugin.to_owned(), key.to_owned(), keep.then(|| value.clone()))
            })
            .collect();
        if !last.is_empty() {
            let mut inner = self.lock();
            for (plugin, key, _) in &last {
                let entry = inner.plugins.entry(plugin.clone()).or_default().entry(key.clone()).or_default();
                let dropped = entry.value.take().map(|v| size(plugin, key, &v));
                if entry.pending > 0 {
                    entry.tainted = true;
                }
                entry.pending += 1;
                if let Some(bytes) = dropped {
                    inner.bytes -= bytes;
                }
            }
        }
        Pending { cache: Arc::clone(self), writes: last, resolved: false }
    }

    /// Ends one pending commit of each of `writes`, storing their values if `store`.
    fn resolve(&self, writes: &mut Vec<Announced>, store: bool) {
        if writes.is_empty() {
            return;
        }
        let mut inner = self.lock();
        let inner = &mut *inner;
        for (plugin, key, value) in writes.drain(..) {
            let Some(keys) = inner.plugins.get_mut(&plugin) else { continue };
            let Some(entry) = keys.get_mut(&key) else { continue };
            entry.pending -= 1;
            if let (true, false, Some(value)) = (store, entry.tainted, value) {
                let bytes = size(&plugin, &key, &value);
                // None stored while this commit was pending (another would have tainted it).
                if let Some(old) = entry.value.replace(value) {
                    inner.bytes -= size(&plugin, &key, &old);
                }
                entry.generation = inner.next_generation;
                inner.next_generation += 1;
                inner.bytes += bytes;
                inner.order.push_back((plugin.clone(), key.clone(), entry.generation));
            }
            if entry.pending == 0 {
                entry.tainted = false;
                if entry.value.is_none() {
                    keys.remove(&key);
                    if keys.is_empty() {
                        inner.plugins.remove(&plugin);
                    }
                }
            }
        }
        inner.evict(self.budget);
    }

    /// (values stored, bytes they take), for tests.
    #[cfg(test)]
    fn stored(&self) -> (usize, usize) {
        let inner = self.lock();
        let values = inner.plugins.values().flat_map(HashMap::values).filter(|e| e.value.is_some()).count();
        (values, inner.bytes)
    }
}

impl Inner {
    /// Drops the oldest stored values until they fit in `budget`, and the queue's stale
    /// items when they outnumber the live ones.
    fn evict(&mut self, budget: usize) {
        while self.bytes > budget {
            let Some((plugin, key, generation)) = self.order.pop_front() else { break };
            let Some(keys) = self.plugins.get_mut(&plugin) else { continue };
            let Some(entry) = keys.get_mut(&key) else { continue };
            if entry.generation != generation {
                continue;
            }
            let Some(value) = entry.value.take() else { continue };
            self.bytes -= size(&plugin, &key, &value);
            if entry.pending == 0 {
                keys.remove(&key);
                if keys.is_empty() {
                    self.plugins.remove(&plugin);
                }
            }
        }
        let live: usize = self.plugins.values().map(HashMap::len).sum();
        if self.order.len() > 2 * live + 1024 {
            let plugins = &self.plugins;
            self.order.retain(|(plugin, key, generation)| {
                plugins
                    .get(plugin)
                    .and_then(|keys| keys.get(key))
                    .is_some_and(|e| e.generation == *generation && e.value.is_some())
            });
        }
    }
}

/// One announced commit's keys ([`StateCache::begin`]). [`Pending::committed`] once the
/// commit is durable; dropped otherwise, which leaves its keys uncached.
pub(super) struct Pending {
    cache: Arc<StateCache>,
    writes: Vec<Announced>,
    resolved: bool,
}

impl Pending {
    /// The commit is durable: its values may be served.
    pub(super) fn committed(mut self) {
        self.resolved = true;
        self.cache.resolve(&mut self.writes, true);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.resolved {
            self.cache.resolve(&mut self.writes, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str) -> StateWrite {
        (key.to_owned(), Some(value.as_bytes().to_vec()))
    }

    fn cache() -> Arc<StateCache> {
        Arc::new(StateCache::new(1 << 20, 1 << 10))
    }

    fn bytes(v: &str) -> Option<Option<Vec<u8>>> {
        Some(Some(v.as_bytes().to_vec()))
    }

    /// A step of a run against the cache and a model of the database.
    #[derive(Debug, Clone)]
    enum Op {
        /// A commit of `key` announced (its value is the op's index).
        Begin {
            key: u8,
        },
        /// The announced commit at this position (modulo those open) commits in the database.
        Land(usize),
        /// ... is resolved: durable (`Ok`, only if it landed) or an error (landed or not).
        Resolve(usize, bool),
        Read {
            key: u8,
        },
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0u8..3).prop_map(|key| Op::Begin { key }),
            any::<usize>().prop_map(Op::Land),
            (any::<usize>(), any::<bool>()).prop_map(|(i, ok)| Op::Resolve(i, ok)),
            (0u8..3).prop_map(|key| Op::Read { key }),
        ]
    }

    proptest::proptest! {
        /// Whatever the interleaving of commits announced, landing in the database and
        /// resolved, a read answered from the cache is the database's value at that moment.
        #[test]
        fn a_cached_answer_is_always_the_databases_current_value(ops in proptest::collection::vec(op(), 1..200)) {
            let c = Arc::new(StateCache::new(4 * (ENTRY_OVERHEAD + 8), 1 << 10));
            let mut database: HashMap<u8, Vec<u8>> = HashMap::new();
            // (key, value, landed, pending)
            let mut open: Vec<(u8, Vec<u8>, bool, Pending)> = Vec::new();
            for (i, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Begin { key } => {
                        let value = i.to_string().into_bytes();
                        let pending = c.begin(&[("p", &[(key.to_string(), Some(value.clone()))])]);
                        open.push((key, value, false, pending));
                    }
                    Op::Land(n) if !open.is_empty() => {
                        let n = n % open.len();
                        if !open[n].2 {
                            open[n].2 = true;
                            database.insert(open[n].0, open[n].1.clone());
                        }
                    }
                    Op::Resolve(n, ok) if !open.is_empty() => {
                        let (_, _, landed, pending) = open.remove(n % open.len());
                        if ok && landed {
                            pending.committed();
                        } else {
                            drop(pending);
                        }
                    }
                    Op::Read { key } => {
                        if let Some(answer) = c.get("p", &key.to_string()) {
                            proptest::prop_assert_eq!(answer.as_ref(), database.get(&key));
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn a_durable_commit_is_served_and_a_later_delete_answers_absent() {
        let c = cache();
        assert_eq!(c.get("p", "k"), None, "nothing stored: ask the database");
        c.begin(&[("p", &[put("k", "v1")])]).committed();
        assert_eq!(c.get("p", "k"), bytes("v1"));
        assert_eq!(c.get("other", "k"), None, "plugins have their own keys");
        c.begin(&[("p", &[("k".to_owned(), None)])]).committed();
        assert_eq!(c.get("p", "k"), Some(None));
        assert_eq!(c.hits(), 2);
    }

    #[test]
    fn a_pending_commit_sends_reads_to_the_database_until_it_is_resolved() {
        let c = cache();
        c.begin(&[("p", &[put("k", "v1")])]).committed();
        let pending = c.begin(&[("p", &[put("k", "v2")])]);
        // Committed or not, the database has the answer; v1 may already be replaced.
        assert_eq!(c.get("p", "k"), None);
        pending.committed();
        assert_eq!(c.get("p", "k"), bytes("v2"));
    }

    #[test]
    fn a_commit_that_failed_leaves_its_keys_uncached_not_at_the_old_value() {
        let c = cache();
        c.begin(&[("p", &[put("k", "v1")])]).committed();
        // Failed, fenced or abandoned: it may even have committed (a caller that went away).
        drop(c.begin(&[("p", &[put("k", "v2")])]));
        assert_eq!(c.get("p", "k"), None);
        assert_eq!(c.stored(), (0, 0));
    }

    #[test]
    fn overlapping_commits_of_one_key_store_nothing_whatever_order_they_resolve_in() {
        for first_resolved in [0, 1] {
            let c = cache();
            let a = c.begin(&[("p", &[put("k", "a")])]);
            let b = c.begin(&[("p", &[put("k", "b")])]);
            let (x, y) = if first_resolved == 0 { (a, b) } else { (b, a) };
            x.committed();
            assert_eq!(c.get("p", "k"), None);
            y.committed();
            assert_eq!(c.get("p", "k"), None, "which committed last is not known here");
            // The next commit alone stores again.
            c.begin(&[("p", &[put("k", "c")])]).committed();
            assert_eq!(c.get("p", "k"), bytes("c"));
        }
    }

    #[test]
    fn the_last_write_of_a_key_in_one_commit_is_the_one_stored() {
        let c = cache();
        c.begin(&[("p", &[put("k", "v1"), put("j", "w")]), ("p", &[put("k", "v2")])]).committed();
        assert_eq!(c.get("p", "k"), bytes("v2"));
        assert_eq!(c.get("p", "j"), bytes("w"));
    }

    #[test]
    fn the_oldest_values_go_first_when_the_budget_is_full_and_values_over_the_limit_never_go_in() {
        // Each value takes ENTRY_OVERHEAD + 5 bytes: "p", "kN", "vv".
        let c = Arc::new(StateCache::new(3 * (ENTRY_OVERHEAD + 5) + 10, 1 << 10));
        for k in ["k1", "k2", "k3", "k4"] {
            c.begin(&[("p", &[put(k, "vv")])]).committed();
        }
        assert_eq!(c.get("p", "k1"), None, "evicted");
        for k in ["k2", "k3", "k4"] {
            assert_eq!(c.get("p", k), bytes("vv"), "{k}");
        }
        let (values, used) = c.stored();
        assert_eq!((values, used), (3, 3 * (ENTRY_OVERHEAD + 5)));
        // Rewriting a key many times leaves no pile of stale queue items behind.
        for i in 0..5000 {
            c.begin(&[("p", &[put("k4", &format!("{:02}", i % 100))])]).committed();
        }
        assert!(c.lock().order.len() <= 2 * 3 + 1024 + 1);
        let big = cache();
        big.begin(&[("p", &[("k".to_owned(), Some(vec![0; 2 << 10]))])]).committed();
        assert_eq!(big.get("p", "k"), None, "over the size limit");
        assert_eq!(big.stored(), (0, 0));
    }
}
