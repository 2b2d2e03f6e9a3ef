//! Time, injectable: production reads the system clock, tests move a manual one.
//!
//! Everything that decides by time (timers, backoff, deadlines, idempotency retention) asks a
//! [`Clock`] rather than the system, so tests can jump hours ahead without sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        chrono::Utc::now().timestamp_millis()
    }
}

/// The system clock plus an offset that tests can advance.
#[derive(Debug, Default, Clone)]
pub struct OffsetClock {
    offset_ms: Arc<AtomicI64>,
}

impl OffsetClock {
    pub fn new() -> OffsetClock {
        OffsetClock::default()
    }

    /// Moves this clock (and every clone of it) forward.
    pub fn advance(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for OffsetClock {
    fn now_ms(&self) -> i64 {
        SystemClock.now_ms() + self.offset_ms.load(Ordering::SeqCst)
    }
}

/// A clock that keeps to the database's: the system clock (or a test's) plus the measured
/// difference between the database server's clock and this host's.
///
/// Replicas decide by time against each other: one commits a step's `in_flight_until` or a
/// retry's `next_run_at`, another compares it with its own now. With the system clock, a
/// replica running 2 s ahead compensated a step while the replica that called it could still
/// be sending its request (the engine's grace is 1 s), and fired every wait, backoff and
/// deadline early. Leases already count in the database's time; with this clock, so does the
/// engine, every replica within a round trip's half of the database and of each other.
pub struct SyncedClock {
    inner: Arc<dyn Clock>,
    offset_ms: AtomicI64,
}

/// An offset closer than this to the one in use is not applied: measurements jitter by a
/// fraction of a millisecond, and time going back and forth by that much helps nobody.
pub const SYNC_TOLERANCE_MS: i64 = 5;

/// A measurement whose round trip took longer than this says too little about the offset
/// (half of it is the uncertainty); it is not used.
pub const SYNC_MAX_ROUND_TRIP: std::time::Duration = std::time::Duration::from_millis(200);

impl SyncedClock {
    pub fn new(inner: Arc<dyn Clock>) -> SyncedClock {
        SyncedClock { inner, offset_ms: AtomicI64::new(0) }
    }

    /// The offset applied now: the database's clock minus the system's, in ms.
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Acquire)
    }

    /// Measures the offset with `samples` reads of the database's clock (`read`: its now in ms,
    /// `None` if it could not be read), keeping the one with the shortest round trip, and applies
    /// it if it moved by more than [`SYNC_TOLERANCE_MS`]. Returns the offset measured, if any
    /// read was usable. Relative to the system clock, so a test clock's own offset stays.
    pub async fn sync<F, Fut>(&self, samples: usize, mut read: F) -> Option<i64>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<i64>>,
    {
        let mut best: Option<(std::time::Duration, i64)> = None;
        for _ in 0..samples.max(1) {
            let (sent, began) = (SystemClock.now_ms(), std::time::Instant::now());
            let Some(database) = read().await else { continue };
            let round_trip = began.elapsed();
            if round_trip > SYNC_MAX_ROUND_TRIP {
                continue;
            }
            let half = i64::try_from(round_trip.as_millis() / 2).unwrap_or(0);
            let offset = database - (sent + half);
            if best.is_none_or(|(rt, _)| round_trip < rt) {
                best = Some((round_trip, offset));
            }
        }
        let (_, offset) = best?;
        if (offset - self.offset_ms()).abs() > SYNC_TOLERANCE_MS {
            self.offset_ms.store(offset, Ordering::Release);
        }
        Some(offset)
    }
}

impl Clock for SyncedClock {
    fn now_ms(&self) -> i64 {
        self.inner.now_ms().saturating_add(self.offset_ms.load(Ordering::Acquire))
    }
}

/// Formats milliseconds since the epoch as RFC 3339 with millisecond precision.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_synced_clock_keeps_to_the_database_and_ignores_jitter_and_slow_reads() {
        let clock = SyncedClock::new(Arc::new(SystemClock));
        // A database whose clock runs 5 s ahead of this host's.
        let measured = clock.sync(3, || async { Some(SystemClock.now_ms() + 5_000) }).await;
        assert!(measured.is_some_and(|m| (m - 5_000).abs() <= 2), "{measured:?}");
        assert!(
            (clock.now_ms() - (SystemClock.now_ms() + 5_000)).abs() <= 2,
            "the clock did not move to the database's"
        );
        // A measurement within the tolerance of the offset in use changes nothing.
        let before = clock.offset_ms();
        clock.sync(1, || async { Some(SystemClock.now_ms() + 5_002) }).await;
        assert_eq!(clock.offset_ms(), before);
        // Reads that fail, or come back too late to say anything, leave it as it is.
        assert_eq!(clock.sync(2, || async { None }).await, None);
        let slow = clock
            .sync(1, || async {
                tokio::time::sleep(SYNC_MAX_ROUND_TRIP + std::time::Duration::from_millis(50)).await;
                Some(SystemClock.now_ms() - 60_000)
            })
            .await;
        assert_eq!((slow, clock.offset_ms()), (None, before));
        // A database behind this host's clock moves it back.
        clock.sync(1, || async { Some(SystemClock.now_ms() - 3_000) }).await;
        assert!((clock.offset_ms() + 3_000).abs() <= 2, "{}", clock.offset_ms());
    }

    #[tokio::test]
    async fn a_test_clock_keeps_its_own_offset_under_the_databases() {
        let inner = OffsetClock::new();
        let clock = SyncedClock::new(Arc::new(inner.clone()));
        clock.sync(1, || async { Some(SystemClock.now_ms() + 1_000) }).await;
        inner.advance(3_600_000);
        let expected = SystemClock.now_ms() + 3_600_000 + 1_000;
        assert!((clock.now_ms() - expected).abs() <= 2, "the test clock's hour was lost");
    }
}
