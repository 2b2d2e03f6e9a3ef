//! The processor time of one plugin call: the calling thread's CPU clock read around every
//! poll of the call's future, summed.
//!
//! A call's wall-clock time holds its own work and everything the machine made it wait for:
//! a core (both busy at the peak), a thread wake-up, a preemption by another thread, a state
//! read. Its CPU time holds only the first; the gap between them is the load. A call's
//! future runs its wasm on a fiber inside `poll`, on the polling thread, so the thread's clock
//! counts the plugin's code, the host's imports and wasmtime's own work, and not the waits
//! between polls (which may be on other threads).
//!
//! Each poll reads the clock twice (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`, a system call
//! of about 1.5 µs on this project's 2-core VM); a demo plugin's call is one or two polls.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// Whether the platform has a per-thread CPU clock ([`thread_time`] answers).
pub(super) const AVAILABLE: bool = cfg!(unix);

/// The calling thread's CPU time so far, if the platform has a per-thread clock.
#[cfg(unix)]
pub(super) fn thread_time() -> Option<Duration> {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Some(Duration::new(u64::try_from(ts.tv_sec).ok()?, u32::try_from(ts.tv_nsec).ok()?))
}

#[cfg(not(unix))]
pub(super) fn thread_time() -> Option<Duration> {
    None
}

/// `inner`, counting the CPU time of its polls into `spent`.
pub(super) struct Timed<'a, F> {
    inner: Pin<&'a mut F>,
    spent: &'a mut Duration,
}

impl<'a, F: Future> Timed<'a, F> {
    pub(super) fn new(inner: Pin<&'a mut F>, spent: &'a mut Duration) -> Self {
        Timed { inner, spent }
    }
}

impl<F: Future> Future for Timed<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let before = thread_time();
        let polled = self.inner.as_mut().poll(cx);
        if let (Some(before), Some(after)) = (before, thread_time()) {
            *self.spent += after.saturating_sub(before);
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Busy work counts, sleeping does not: the clock is the thread's, not the wall's.
    #[tokio::test]
    async fn polls_count_their_work_and_not_the_waits_between_them() {
        if !AVAILABLE {
            return;
        }
        let mut spent = Duration::ZERO;
        // Spins until the thread's own clock has moved 20 ms: a loaded machine may stretch the
        // wall time, never the work.
        let work = async {
            let begun = thread_time().unwrap();
            let mut x = 0u64;
            while thread_time().unwrap() - begun < Duration::from_millis(20) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            x
        };
        tokio::pin!(work);
        let started = std::time::Instant::now();
        Timed::new(work, &mut spent).await;
        let wall = started.elapsed();
        assert!(wall >= Duration::from_millis(220), "{wall:?}");
        // The 20 ms spin (and a little polling around it), and far from the 200 ms sleep.
        assert!(spent >= Duration::from_millis(20) && spent < Duration::from_millis(150), "{spent:?} of {wall:?}");
    }
}
