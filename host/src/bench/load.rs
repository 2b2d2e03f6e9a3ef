//! The two ways of sending load, and the tally of what came back.
//!
//! Closed loop: `clients` tasks, each sending its next saga when the last one settled; the
//! latency of a saga runs from its send. Open loop: one dispatcher keeps the arrival schedule
//! ([`Schedule`]) and hands every send to its own task, so a slow answer never delays the
//! next send; the latency runs from the time the send was *due*. Both stop early when the
//! stop token fires (Ctrl-C): sagas in flight are then abandoned and counted as such.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use http::HeaderValue;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::client::{Answer, Client};
use super::mix::{Bodies, Expected, Mix, Trigger};
use super::schedule::Schedule;

/// Failure descriptions kept per run, for the report: enough to see what went wrong.
const SAMPLES: usize = 10;

/// What every saga of every run shares: the client, the mix and the numbering.
pub struct Generator {
    pub client: Client,
    pub mix: Mix,
    pub seed: u64,
    pub bodies: Bodies,
    /// Prefix of every idempotency key: unique per invocation, so reruns never replay.
    pub key_prefix: String,
    /// The number of the next saga, over warm-up and every run: picks its trigger, its target
    /// and its key.
    pub next: AtomicU64,
    /// How long one saga may take, from its send (its due time in an open loop).
    pub timeout: Duration,
    /// Fired by Ctrl-C.
    pub stop: CancellationToken,
}

/// How one saga ended, as far as the generator is concerned.
#[derive(Debug)]
enum Outcome {
    /// The final status its trigger should give.
    AsExpected,
    /// Another final status (COMPENSATION_FAILED, or COMPLETED for a trigger that must cancel).
    Mismatch(String),
    Unsettled,
    Http(u16, String),
    Transport(String),
    /// In flight when the run was stopped.
    Abandoned,
}

impl Generator {
    /// Sends saga number `n` and follows it until it settles, `started` being when it was
    /// sent (closed loop) or due (open loop); with the GETs that took.
    async fn one(&self, n: u64, started: Instant) -> (Trigger, Outcome, u32) {
        let trigger = self.mix.pick(self.seed, n);
        let key = HeaderValue::try_from(format!("{}-{n}", self.key_prefix)).expect("the key prefix is ASCII");
        let (answer, polls) = tokio::select! {
            settled = self.client.settle(n, key, self.bodies.get(trigger), started, started + self.timeout) => settled,
            () = self.stop.cancelled() => return (trigger, Outcome::Abandoned, 0),
        };
        let expected = trigger.expected();
        let outcome = match answer {
            Answer::Settled { status, .. } if status == expected.status() => Outcome::AsExpected,
            Answer::Settled { status, reason } => {
                let reason = reason.map(|r| format!(" ({r})")).unwrap_or_default();
                Outcome::Mismatch(format!("{trigger}: expected {}, got {status}{reason}", expected.status()))
            }
            Answer::Unsettled => Outcome::Unsettled,
            Answer::Http { status, body } => Outcome::Http(status, body),
            Answer::Transport(e) => Outcome::Transport(e),
        };
        (trigger, outcome, polls)
    }
}

/// Per-trigger counts and latency.
pub struct TriggerTally {
    pub sent: u64,
    pub as_expected: u64,
    /// Microseconds, of the sagas that ended as expected.
    pub latency: Histogram<u64>,
}

/// Everything counted in one run.
pub struct Tally {
    /// Sends started (open loop: due), including the dropped ones.
    pub sent: u64,
    /// Ended COMPLETED as expected.
    pub completed: u64,
    /// Ended CANCELLED as expected (compensated or rejected before any step completed).
    pub compensated: u64,
    pub mismatched: u64,
    /// Not final when the generator's timeout ran out.
    pub unsettled: u64,
    pub http_errors: BTreeMap<u16, u64>,
    pub transport_errors: u64,
    /// Open loop: not sent because `--max-in-flight` sagas were already in flight.
    pub dropped: u64,
    pub abandoned: u64,
    /// Sagas whose POST answered before they settled, followed by polling.
    pub polled: u64,
    /// The GETs those polls sent: load the generator added.
    pub polls: u64,
    /// Microseconds, of the sagas that ended as expected.
    pub latency: Histogram<u64>,
    /// Microseconds, of every saga sent that came to an end, failures included (each at the
    /// time it took to fail; an unsettled one at the timeout): the latency of successes alone
    /// looks healthy when most sends fail fast.
    pub latency_all: Histogram<u64>,
    pub triggers: BTreeMap<Trigger, TriggerTally>,
    pub samples: Vec<String>,
    /// When the last saga of the run ended (any outcome).
    pub last_end: Option<Instant>,
    /// When the last saga that ended as expected did.
    pub last_ok_end: Option<Instant>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to an hour at 3 significant digits: fixed size, no resizing while recording.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

impl Tally {
    pub fn new() -> Tally {
        Tally {
            sent: 0,
            completed: 0,
            compensated: 0,
            mismatched: 0,
            unsettled: 0,
            http_errors: BTreeMap::new(),
            transport_errors: 0,
            dropped: 0,
            abandoned: 0,
            polled: 0,
            polls: 0,
            latency: histogram(),
            latency_all: histogram(),
            triggers: BTreeMap::new(),
            samples: Vec::new(),
            last_end: None,
            last_ok_end: None,
        }
    }

    fn trigger(&mut self, trigger: Trigger) -> &mut TriggerTally {
        self.triggers.entry(trigger).or_insert_with(|| TriggerTally { sent: 0, as_expected: 0, latency: histogram() })
    }

    fn sent(&mut self, trigger: Trigger) {
        self.sent += 1;
        self.trigger(trigger).sent += 1;
    }

    fn sample(&mut self, what: String) {
        if self.samples.len() < SAMPLES {
            self.samples.push(what);
        }
    }

    fn record(&mut self, trigger: Trigger, outcome: Outcome, latency: Duration, polls: u32, now: Instant) {
        self.last_end = Some(now);
        self.polled += u64::from(polls > 0);
        self.polls += u64::from(polls);
        let us = latency.as_micros().max(1) as u64;
        if !matches!(outcome, Outcome::Abandoned) {
            self.latency_all.saturating_record(us);
        }
        match outcome {
            Outcome::AsExpected => {
                self.last_ok_end = Some(now);
                self.latency.saturating_record(us);
                let t = self.trigger(trigger);
                t.as_expected += 1;
                t.latency.saturating_record(us);
                match trigger.expected() {
                    Expected::Completed => self.completed += 1,
                    Expected::Cancelled => self.compensated += 1,
                }
            }
            Outcome::Mismatch(what) => {
                self.mismatched += 1;
                self.sample(what);
            }
            Outcome::Unsettled => {
                self.unsettled += 1;
                self.sample(format!("{trigger}: not final within the timeout"));
            }
            Outcome::Http(status, body) => {
                *self.http_errors.entry(status).or_insert(0) += 1;
                self.sample(format!("{trigger}: HTTP {status}: {body}"));
            }
            Outcome::Transport(e) => {
                self.transport_errors += 1;
                self.sample(format!("{trigger}: {e}"));
            }
            Outcome::Abandoned => self.abandoned += 1,
        }
    }

    /// Sagas that ended as their trigger says.
    pub fn ok(&self) -> u64 {
        self.completed + self.compensated
    }

    /// Sagas that did not: every outcome but success and abandonment.
    pub fn failed(&self) -> u64 {
        self.mismatched + self.unsettled + self.http_errors.values().sum::<u64>() + self.transport_errors + self.dropped
    }

    /// The share of the sends that came to an end (abandoned ones aside) that failed, 0 to 1.
    pub fn failed_share(&self) -> f64 {
        let ended = self.ok() + self.failed();
        if ended == 0 {
            0.0
        } else {
            self.failed() as f64 / ended as f64
        }
    }
}

impl Default for Tally {
    fn default() -> Tally {
        Tally::new()
    }
}

/// When a run stops sending: after `sagas` sends, after `duration`, whichever comes first.
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    pub sagas: Option<u64>,
    pub duration: Option<Duration>,
}

/// What a run measured.
pub struct Measured {
    pub tally: Tally,
    /// From the first send to the end of the last saga.
    pub elapsed: Duration,
    /// From the first send to the end of the last saga that ended as expected: what the
    /// throughput is over (one saga hung until its timeout, a failure, stretched a 4 s run of
    /// 10,000 to a minute and its throughput to a fifteenth).
    pub ok_elapsed: Duration,
    /// Open loop: how late the dispatcher sent, in microseconds after the due time.
    pub send_lag: Option<Histogram<u64>>,
}

fn lock(tally: &Mutex<Tally>) -> std::sync::MutexGuard<'_, Tally> {
    // A panic elsewhere never leaves the tally half-updated in a way that matters here.
    tally.lock().unwrap_or_else(|e| e.into_inner())
}

fn finish(tally: Arc<Mutex<Tally>>, start: Instant, send_lag: Option<Histogram<u64>>) -> Measured {
    let tally =
        Arc::try_unwrap(tally).map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner())).unwrap_or_else(|arc| {
            // Every task has ended; a leftover reference would be a bug, but the counts are still right.
            std::mem::take(&mut *lock(&arc))
        });
    let since_start =
        |end: Option<Instant>| end.map_or_else(|| start.elapsed(), |e| e.saturating_duration_since(start));
    let (elapsed, ok_elapsed) = (since_start(tally.last_end), since_start(tally.last_ok_end));
    Measured { tally, elapsed, ok_elapsed, send_lag }
}

/// Closed loop: `clients` concurrent clients, each sending its next saga once the last one
/// settled.
pub async fn closed(generator: &Arc<Generator>, clients: usize, limit: Limit) -> Measured {
    let tally = Arc::new(Mutex::new(Tally::new()));
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = limit.duration.map(|d| start + d);
    let tracker = TaskTracker::new();
    for _ in 0..clients {
        let (generator, tally, issued) = (generator.clone(), tally.clone(), issued.clone());
        tracker.spawn(async move {
            loop {
                if generator.stop.is_cancelled() || end.is_some_and(|end| Instant::now() >= end) {
                    break;
                }
                if limit.sagas.is_some_and(|max| issued.fetch_add(1, Ordering::Relaxed) >= max) {
                    break;
                }
                let n = generator.next.fetch_add(1, Ordering::Relaxed);
                lock(&tally).sent(generator.mix.pick(generator.seed, n));
                let sent_at = Instant::now();
                let (trigger, outcome, polls) = generator.one(n, sent_at).await;
                let now = Instant::now();
                lock(&tally).record(trigger, outcome, now - sent_at, polls, now);
            }
        });
    }
    tracker.close();
    tracker.wait().await;
    finish(tally, start, None)
}

/// How often a pacer waiting for a distant send looks at the stop token.
const STOP_CHECK: Duration = Duration::from_millis(50);

/// Sends the numbers `0..total` at their due times (`start + schedule.due(i)`), from a thread
/// that sleeps with the operating system's timer (send lag p50 ~0.1 ms at 100/s). Tokio's
/// timer keeps millisecond ticks and rounds every deadline up to the next one, so a send
/// paced by it went out late (send lag p50 1.6 ms at 100/s, BENCHMARKS.md session 15), and
/// as an open loop's latency counts from the due time, that lateness of the generator was
/// charged to the server. A number is never sent before its due time. The channel ends after
/// `total`, when the stop token fires, or when the receiver is dropped.
fn pace(start: Instant, schedule: Schedule, total: u64, stop: CancellationToken) -> mpsc::UnboundedReceiver<u64> {
    let (tx, rx) = mpsc::unbounded_channel();
    let start = start.into_std();
    tokio::task::spawn_blocking(move || {
        for i in 0..total {
            let due = start + schedule.due(i);
            loop {
                if stop.is_cancelled() || tx.is_closed() {
                    return;
                }
                let now = std::time::Instant::now();
                if now >= due {
                    break;
                }
                std::thread::sleep((due - now).min(STOP_CHECK));
            }
            if tx.send(i).is_err() {
                return;
            }
        }
    });
    rx
}

/// Open loop: sends at `schedule`'s rate, each send due at a fixed time, latency from then.
/// At most `max_in_flight` sagas are in flight; a send due beyond that is dropped and counted.
pub async fn open(generator: &Arc<Generator>, schedule: Schedule, max_in_flight: usize, limit: Limit) -> Measured {
    let total = match (limit.sagas, limit.duration) {
        (Some(n), Some(d)) => n.min(schedule.sends_within(d)),
        (Some(n), None) => n,
        (None, Some(d)) => schedule.sends_within(d),
        (None, None) => 0,
    };
    let tally = Arc::new(Mutex::new(Tally::new()));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut send_lag = histogram();
    let tracker = TaskTracker::new();
    let start = Instant::now();
    let mut ticks = pace(start, schedule, total, generator.stop.clone());
    loop {
        let i = tokio::select! {
            tick = ticks.recv() => match tick {
                Some(i) => i,
                None => break,
            },
            () = generator.stop.cancelled() => break,
        };
        let due = start + schedule.due(i);
        let n = generator.next.fetch_add(1, Ordering::Relaxed);
        let trigger = generator.mix.pick(generator.seed, n);
        {
            let mut t = lock(&tally);
            t.sent(trigger);
            if in_flight.load(Ordering::Relaxed) >= max_in_flight {
                t.dropped += 1;
                t.sample(format!("{trigger}: dropped, {max_in_flight} sagas already in flight (--max-in-flight)"));
                continue;
            }
        }
        send_lag.saturating_record(Instant::now().saturating_duration_since(due).as_micros() as u64);
        in_flight.fetch_add(1, Ordering::Relaxed);
        let (generator, tally, in_flight) = (generator.clone(), tally.clone(), in_flight.clone());
        tracker.spawn(async move {
            let (trigger, outcome, polls) = generator.one(n, due).await;
            let now = Instant::now();
            lock(&tally).record(trigger, outcome, now.saturating_duration_since(due), polls, now);
            in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
    tracker.close();
    tracker.wait().await;
    let mut measured = finish(tally, start, Some(send_lag));
    // The run lasts at least its schedule: without this, n sends that all kept up would count
    // n-1 intervals plus one latency, and a run would seem to achieve more than it was offered.
    if !generator.stop.is_cancelled() {
        measured.elapsed = measured.elapsed.max(schedule.due(total));
        measured.ok_elapsed = measured.ok_elapsed.max(schedule.due(total));
    }
    measured
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 99 sagas in the first second and one left hanging until its timeout a minute later:
    /// the throughput is the 99's (the failure is counted as one), not 100 over a minute.
    #[test]
    fn a_saga_hung_until_its_timeout_does_not_stretch_the_throughput() {
        let start = Instant::now();
        let mut tally = Tally::new();
        for i in 0..99u64 {
            tally.sent(Trigger::Complete);
            let end = start + Duration::from_millis(10 * (i + 1));
            tally.record(Trigger::Complete, Outcome::AsExpected, Duration::from_millis(10), 0, end);
        }
        tally.sent(Trigger::Complete);
        tally.record(
            Trigger::Complete,
            Outcome::Unsettled,
            Duration::from_secs(60),
            0,
            start + Duration::from_secs(60),
        );
        let measured = finish(Arc::new(Mutex::new(tally)), start, None);
        assert_eq!(measured.elapsed, Duration::from_secs(60));
        let run = super::super::report::Run::new("closed", Some(1), None, &measured);
        assert_eq!((run.ok, run.failed), (99, 1));
        assert!(run.summary().contains("1.0% of the sends failed"), "{}", run.summary());
        assert!((run.throughput_per_s - 100.0).abs() < 0.01, "{}", run.throughput_per_s);
    }

    /// Nine sends in ten shed at once (503 in a millisecond), one in ten completing in 50 ms:
    /// the successes' latency alone reads healthy. The run carries the latency of every
    /// answered send and the failed share, and its summary and sweep line say so.
    #[test]
    fn failures_are_in_the_latency_of_all_sends_and_the_summary_warns() {
        let start = Instant::now();
        let mut tally = Tally::new();
        for i in 0..100u64 {
            tally.sent(Trigger::Complete);
            let (outcome, latency) = if i % 10 == 0 {
                (Outcome::AsExpected, Duration::from_millis(50))
            } else {
                (Outcome::Http(503, "overloaded".into()), Duration::from_millis(1))
            };
            tally.record(Trigger::Complete, outcome, latency, 0, start + latency);
        }
        tally.sent(Trigger::Complete);
        tally.record(Trigger::Complete, Outcome::Abandoned, Duration::from_secs(9), 0, start);
        let measured = finish(Arc::new(Mutex::new(tally)), start, None);
        let run = super::super::report::Run::new("open", None, Some(100.0), &measured);
        assert_eq!((run.ok, run.failed, run.abandoned), (10, 90, 1));
        assert!((run.failed_share - 0.9).abs() < 1e-9, "{}", run.failed_share);
        let ok = run.latency_ms.unwrap();
        let all = run.latency_all_ms.unwrap();
        assert_eq!(ok.count, 10);
        assert_eq!(all.count, 100, "every answered send, the abandoned one aside");
        assert!((49.0..51.0).contains(&ok.p50), "{ok:?}");
        assert!(all.p50 < 1.1 && all.p99 > 49.0, "{all:?}");
        let summary = run.summary();
        assert!(summary.contains("(successes, from the scheduled send)"), "{summary}");
        assert!(summary.contains("(every answered send, failures included, from the scheduled send)"), "{summary}");
        assert!(summary.contains("90.0% of the sends failed"), "{summary}");
        let table = super::super::report::sweep_table(std::slice::from_ref(&run));
        assert!(table.contains("90.0% failed; p99 of all 50.0"), "{table}");
    }

    #[tokio::test]
    async fn the_pacer_sends_every_number_in_order_and_none_before_it_is_due() {
        let schedule = Schedule::new(2000.0).unwrap();
        let start = Instant::now();
        let mut ticks = pace(start, schedule, 40, CancellationToken::new());
        let mut got = Vec::new();
        while let Some(i) = ticks.recv().await {
            let now = Instant::now();
            assert!(now >= start + schedule.due(i), "number {i} came {:?} early", start + schedule.due(i) - now);
            got.push(i);
        }
        assert_eq!(got, (0..40).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn the_pacer_stops_when_told_without_waiting_for_the_next_send() {
        // One send a minute: the second is due long after the test gives up.
        let schedule = Schedule::new(1.0 / 60.0).unwrap();
        let stop = CancellationToken::new();
        let mut ticks = pace(Instant::now(), schedule, 10, stop.clone());
        assert_eq!(ticks.recv().await, Some(0));
        stop.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(5), ticks.recv()).await;
        assert_eq!(ended, Ok(None), "the pacer went on after the stop");
    }
}
