//! Which plugin state keys may exist: a filter that answers most state reads of absent keys
//! without the database.
//!
//! A step's first read is usually of a key that does not exist yet: an idempotent step looks
//! for its own record of this saga (`reservation/{saga id}`) before making it. On SQLite that
//! read is a round trip to a reader connection's thread, and under load most of a plugin call
//! (measured: 270 µs of a ~350 µs call at 100 sagas/s, 1.5 ms under load; BENCHMARKS.md).
//!
//! [`KeyFilter`] is a scalable Bloom filter (Almeida et al., "Scalable Bloom Filters", 2007)
//! of every (plugin, key) written since the store opened, seeded with every key stored when it
//! opened. "Absent" is certain; "maybe" means read the database. It is exact only when every
//! write of plugin state goes through this store: SQLite opened by a serving host, which holds
//! the file's lock ([`super::open_exclusive`]). Where hosts share the database (PostgreSQL
//! replicas, each serving host with its own filter), a key another host wrote since this one
//! opened is missing, so there "absent" is a guess the commit checks (`StateRead::checked`):
//! a commit that finds the key present after all is refused, the key goes into the filter,
//! and the steps run again reading the database. The rules that keep it exact with respect
//! to this host's own commits:
//!
//! - A key goes into the filter BEFORE the commit that writes it runs, so whoever can see the
//!   committed row can see the key. A read that finds the key absent just before is ordered
//!   before the commit, as a database read at that moment would be.
//! - Nothing is ever taken out: a deleted key stays "maybe" (one database read, as before).
//!   A rolled-back or fenced commit leaves its keys in too, harmlessly.
//! - It never fills up: when the newest layer holds its capacity, a layer twice as large with
//!   a tighter false-positive rate is added, and a lookup asks every layer. The overall false
//!   positive rate stays under 2%; memory is 10-20 bits per key of capacity (each layer a power
//!   of two of bits), and the first layer holds twice the keys stored at open.

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// Keys the first layer is sized for at least.
const MIN_CAPACITY: u64 = 1 << 16;

/// The filter; see the module docs.
pub(super) struct KeyFilter {
    layers: RwLock<Vec<Layer>>,
    hasher: std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>,
}

/// One Bloom filter of `capacity` keys with `hashes` probes per key.
struct Layer {
    bits: Box<[AtomicU64]>,
    /// The number of bits minus one (a power of two minus one).
    mask: u64,
    hashes: u32,
    capacity: u64,
    count: AtomicU64,
}

impl Layer {
    /// Layer `level` (0 for the first): 10 bits and 7 probes per key at level 0 (about 0.8%
    /// false positives when full), then each level halves that rate (1.5 bits and one probe
    /// more per key) so the sum over all levels stays under twice the first's.
    fn new(capacity: u64, level: u32) -> Layer {
        let bits_per_key = 10 + (3 * u64::from(level)).div_ceil(2);
        let bits = (capacity * bits_per_key).next_power_of_two().max(64);
        let words = (bits / 64) as usize;
        Layer {
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
            mask: bits - 1,
            hashes: 7 + level,
            capacity,
            count: AtomicU64::new(0),
        }
    }

    /// The bit positions of a key's hash (double hashing: h1 + i * h2).
    fn probes(&self, hash: u64) -> impl Iterator<Item = u64> + '_ {
        let h1 = hash;
        let h2 = splitmix64(hash) | 1;
        (0..u64::from(self.hashes)).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) & self.mask)
    }

    /// Sets the key's bits; true when this insert filled the layer.
    fn insert(&self, hash: u64) -> bool {
        for bit in self.probes(hash) {
            self.bits[(bit / 64) as usize].fetch_or(1 << (bit % 64), Ordering::Release);
        }
        self.count.fetch_add(1, Ordering::Relaxed) + 1 == self.capacity
    }

    fn may_contain(&self, hash: u64) -> bool {
        self.probes(hash).all(|bit| self.bits[(bit / 64) as usize].load(Ordering::Acquire) & (1 << (bit % 64)) != 0)
    }
}

/// A 64-bit mixer (Steele et al.), for the second hash of double hashing.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl KeyFilter {
    /// An empty filter whose first layer holds `expected` keys (at least [`MIN_CAPACITY`]).
    pub(super) fn with_capacity(expected: u64) -> KeyFilter {
        let capacity = expected.saturating_mul(2).max(MIN_CAPACITY);
        KeyFilter { layers: RwLock::new(vec![Layer::new(capacity, 0)]), hasher: Default::default() }
    }

    fn hash(&self, plugin: &str, key: &str) -> u64 {
        let mut h = self.hasher.build_hasher();
        // `str`'s Hash writes a terminator, so ("ab", "c") and ("a", "bc") differ.
        plugin.hash(&mut h);
        key.hash(&mut h);
        h.finish()
    }

    /// Records that `key` of `plugin` may exist from now on.
    ///
    /// A key the filter already answers "maybe" for is not added again: a layer counts the
    /// keys it holds, and a plugin rewriting one key on every call (a counter, a status) would
    /// otherwise fill layer after layer with that one key, memory that grew with the writes
    /// and was never given back.
    pub(super) fn insert(&self, plugin: &str, key: &str) {
        let hash = self.hash(plugin, key);
        let full = {
            let layers = self.layers.read().unwrap_or_else(|e| e.into_inner());
            if layers.iter().any(|layer| layer.may_contain(hash)) {
                return;
            }
            layers.last().expect("a filter has a layer").insert(hash)
        };
        if full {
            let mut layers = self.layers.write().unwrap_or_else(|e| e.into_inner());
            let last = layers.last().expect("a filter has a layer");
            // Only the insert that filled the layer gets here; it adds the next one.
            let (capacity, level) = (last.capacity * 2, layers.len() as u32);
            layers.push(Layer::new(capacity, level));
        }
    }

    /// False when `key` of `plugin` certainly does not exist.
    pub(super) fn may_contain(&self, plugin: &str, key: &str) -> bool {
        let hash = self.hash(plugin, key);
        let layers = self.layers.read().unwrap_or_else(|e| e.into_inner());
        layers.iter().any(|layer| layer.may_contain(hash))
    }

    /// (layers, bytes), for the log.
    pub(super) fn size(&self) -> (usize, usize) {
        let layers = self.layers.read().unwrap_or_else(|e| e.into_inner());
        (layers.len(), layers.iter().map(|l| l.bits.len() * 8).sum())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rewriting_one_key_does_not_grow_the_filter() {
        let f = super::KeyFilter::with_capacity(0);
        for _ in 0..super::MIN_CAPACITY * 5 {
            f.insert("counter", "total");
        }
        assert_eq!(f.size().0, 1, "one key took more than one layer");
        assert!(f.may_contain("counter", "total"));
    }

    use super::*;

    #[test]
    fn every_inserted_key_is_found_across_growth_and_few_absent_ones_are() {
        let f = KeyFilter::with_capacity(0);
        let n = MIN_CAPACITY * 5; // three layers deep
        for i in 0..n {
            f.insert("inventory", &format!("reservation/{i}"));
        }
        assert!(f.size().0 >= 3, "the filter grew: {:?}", f.size());
        for i in 0..n {
            assert!(f.may_contain("inventory", &format!("reservation/{i}")), "key {i} lost");
        }
        let absent = 100_000;
        let false_positives = (0..absent).filter(|i| f.may_contain("inventory", &format!("reservation/x{i}"))).count();
        let rate = false_positives as f64 / absent as f64;
        assert!(rate < 0.03, "false positive rate {rate}");
    }

    #[test]
    fn the_plugin_is_part_of_the_key() {
        let f = KeyFilter::with_capacity(10);
        f.insert("payment", "charge/1");
        assert!(f.may_contain("payment", "charge/1"));
        assert!(!f.may_contain("inventory", "charge/1"));
        assert!(!f.may_contain("paymentcharge/1", ""));
    }

    #[test]
    fn concurrent_inserts_are_all_found() {
        let f = std::sync::Arc::new(KeyFilter::with_capacity(0));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let f = std::sync::Arc::clone(&f);
                std::thread::spawn(move || {
                    for i in 0..MIN_CAPACITY {
                        f.insert("p", &format!("{t}/{i}"));
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        for t in 0..4 {
            for i in 0..MIN_CAPACITY {
                assert!(f.may_contain("p", &format!("{t}/{i}")));
            }
        }
    }
}
