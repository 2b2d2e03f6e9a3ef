//! The outbox relay: publishes committed outbox rows to a [`Sink`] and marks them published.
//!
//! Delivery is at least once. A row is marked only after the sink confirmed it (for the
//! JSON-lines file: written and fsynced), so a crash between publishing and marking publishes
//! the row again; consumers drop repeats by `event_id`.
//!
//! Order: rows are read oldest first (by outbox id) and a batch is published in that order.
//! One saga's transitions commit one after another, so its rows' ids rise with `seq`. Only the
//! prefix of a batch the sink acknowledged is marked ([`settle`]); the rest is read again, first,
//! by the next batch: `seq` n+1 is never marked ahead of n, and never sent in a batch that does
//! not carry n or come after n was acknowledged. (Within one batch a sink may still deliver n+1
//! when n failed: Kafka can, see the `kafka` module docs; the relay logs it.)
//!
//! The sink is a trait so that Kafka is a second sink beside the file, not a rewrite.
//!
//! Replicas: only the holder of the relay lease (a row in the store, measured in database
//! time and renewed every third of its length) publishes; the others stand by and take over when the
//! holder stops renewing. Per-saga order does not rest on the lease, though: a publisher sends
//! only rows that were unpublished when it read them, in `seq` order, and a row is marked only
//! after the sink acknowledged it, so every `seq` below the first one of any batch was already
//! acknowledged. A stale holder that wakes up (SIGSTOP, a long stall) can only repeat events
//! that were delivered before (or, like any publisher, dead-letter a refused one). The lease
//! keeps the repeats rare; it is renewed while a publish is on its way
//! ([`Relay::publish_leased`]).

#[cfg(test)]
mod bench_tests;
pub mod jsonl;
pub mod kafka;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::driver::DriverHandle;
use crate::metrics::{Metrics, RelayPhase};
use crate::store::{OutboxRow, OutboxStore};

/// What a sink did with a batch.
#[derive(Debug)]
pub struct Published {
    /// How many rows, from the start of the batch, are durably accepted. Only these are
    /// marked; the rest are sent again later, so a sink may accept a row twice.
    pub acked: usize,
    /// Why the sink stopped short of the whole batch.
    pub error: Option<anyhow::Error>,
    /// The sink refused the row right after the acknowledged prefix for good (it would refuse
    /// it on every retry: larger than the broker accepts, say), for this reason. The relay
    /// dead-letters that row and goes on with the rest; see [`publish_once`].
    pub refused: Option<String>,
    /// Rows after the acknowledged prefix (indexes into the batch) that were delivered all the
    /// same, or may have been: a sink that sends rows side by side (Kafka, to other
    /// partitions) learns some outcomes after the first failure. A sink that cannot tell lists
    /// every row it may have sent. A refused row is sent alone only if no later row of its
    /// saga is listed, so that it never lands behind one; see [`publish_once`].
    pub delivered_after: Vec<usize>,
    /// Of those, the rows the sink confirms delivered (not "may have been"): these are marked
    /// published when nothing of their saga before them failed ([`delivered_beyond`]).
    pub confirmed_after: Vec<usize>,
}

/// Where events go.
#[async_trait]
pub trait Sink: Send + Sync + 'static {
    /// A short name for logs, e.g. `jsonl:/data/events.jsonl`.
    fn name(&self) -> String;
    /// Publishes the rows in order and reports the acknowledged prefix.
    async fn publish(&self, rows: &[OutboxRow]) -> Published;
}

/// Tuning of the relay.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Most rows of one batch: one read, one publish (one fsync of `events.jsonl`, one round of
    /// Kafka acknowledgements) and one mark for all of them.
    pub batch_size: u32,
    /// A batch ends early at the row whose payload brings it to this size (at least one row):
    /// events carry step outputs, up to the plugin output limit each.
    pub max_batch_bytes: usize,
    /// The longest the relay sleeps without looking for new rows.
    pub poll_interval: Duration,
    /// How long the relay waits after a commit woke it before it reads, so that the commits
    /// landing meanwhile share its batch: one read, one publish (one fsync of `events.jsonl`,
    /// one round of Kafka produce acknowledgements) and one mark for all of them, instead of
    /// each for every commit (Kafka producers' `linger.ms`, for the same reason). Adds at most
    /// this much to an event's delay; nothing to a saga's (it is acknowledged once committed).
    /// Zero reads at once.
    pub linger: Duration,
    /// Backoff after a failed publish, doubling up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Relay lag (age of the oldest unpublished event) above which the relay warns.
    pub lag_warning: Duration,
    /// How long the relay lease lasts without renewal: how soon another replica takes over
    /// publishing when the holder dies.
    pub lease: Duration,
    /// This process's identity in the relay lease (the driver's owner id).
    pub owner: String,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            // Measured at the closed-loop peak (BENCHMARKS.md, session 32): with 256 the Kafka
            // relay published ~8,700 events/s of ~16,000 made, and the backlog grew for as long
            // as the peak lasted; with 1,024 it kept up (~15,000/s, lag under 50 ms).
            batch_size: 1024,
            max_batch_bytes: 8 << 20,
            poll_interval: Duration::from_millis(200),
            // Measured at 1,000 sagas/s (BENCHMARKS.md): 2 ms and 5 ms take the same ~11% off
            // the host's CPU per saga; more only delays events.
            linger: Duration::from_millis(2),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            lag_warning: Duration::from_secs(5),
            lease: Duration::from_secs(5),
            owner: format!("host-{}", uuid::Uuid::new_v4()),
        }
    }
}

/// The relay loop.
pub struct Relay {
    store: Arc<dyn OutboxStore>,
    sink: Arc<dyn Sink>,
    clock: Arc<dyn Clock>,
    driver: DriverHandle,
    metrics: Arc<crate::metrics::Metrics>,
    options: RelayOptions,
}

impl Relay {
    pub fn new(
        store: Arc<dyn OutboxStore>,
        sink: Arc<dyn Sink>,
        clock: Arc<dyn Clock>,
        driver: DriverHandle,
        metrics: Arc<crate::metrics::Metrics>,
        options: RelayOptions,
    ) -> Relay {
        Relay { store, sink, clock, driver, metrics, options }
    }

    /// Publishes until `shutdown`. Wakes on every committed status change, and polls.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = self.options.initial_backoff;
        let mut leading: Option<i64> = None;
        // Renewing is a database write: do it every third of the lease, not on every batch
        // (on SQLite every write is an fsync on the one writer).
        let renew_every = self.options.lease / 3;
        let mut renewed = tokio::time::Instant::now();
        tracing::info!(sink = %self.sink.name(), "relay started");
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let lease_ms = self.options.lease.as_millis() as i64;
            let due = leading.is_none() || renewed.elapsed() >= renew_every;
            let lease = if due {
                let leasing = self.store.relay_lease(&self.options.owner, lease_ms);
                // None: stopping, and the database did not answer within the grace.
                let Some(lease) = within_grace(&shutdown, &mut None, leasing).await else { break };
                Some(lease)
            } else {
                None
            };
            if let Some(Ok(Some(_))) = lease {
                renewed = tokio::time::Instant::now();
                // Held (again): a long backoff may have reported it lapsed.
                self.metrics.relay_leader(true);
            }
            match lease.unwrap_or(Ok(leading)) {
                Ok(epoch) if epoch != leading => {
                    match epoch {
                        Some(epoch) => tracing::info!(epoch, "this replica now publishes the outbox"),
                        None if leading.is_some() => tracing::warn!("lost the relay lease; standing by"),
                        None => tracing::info!("another replica publishes the outbox; standing by"),
                    }
                    leading = epoch;
                    self.metrics.relay_leader(epoch.is_some());
                }
                Ok(_) => {}
                Err(e) => {
                    // Without the lease we cannot know whether we still hold it: stop publishing
                    // until the store answers again.
                    tracing::warn!(error = %e, "renewing the relay lease failed");
                    leading = None;
                    self.metrics.relay_leader(false);
                }
            }
            let Some(epoch) = leading else {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(self.options.poll_interval) => {}
                }
                continue;
            };
            let Some(published) = self.publish_leased(&shutdown, epoch, renew_every, &mut renewed).await else {
                // The lease was lost (or the host is stopping) while the batch was on its way:
                // what it delivered is unmarked and goes out again (at least once).
                if shutdown.is_cancelled() {
                    break;
                }
                leading = None;
                self.metrics.relay_leader(false);
                continue;
            };
            match published {
                Ok(Batch { full: true, .. }) => {
                    backoff = self.options.initial_backoff;
                    continue; // more may be waiting
                }
                Ok(_) => backoff = self.options.initial_backoff,
                Err(e) => {
                    tracing::warn!(sink = %self.sink.name(), error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "publishing events failed; will retry");
                    // The lease is not renewed while this process waits: once it may lapse,
                    // another replica may lead, and two must not both report leading.
                    if renewed.elapsed() + backoff >= self.options.lease {
                        self.metrics.relay_leader(false);
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.options.max_backoff);
                    continue;
                }
            }
            if !cue(self.driver.committed(), &self.options, &shutdown).await {
                break;
            }
        }
        if leading.is_some() {
            // Hand over at once instead of letting the lease run out; a database that does not
            // answer soon (unreachable: a pool's acquire waits far longer) does not hold the
            // host's stop, and the lease expires on its own.
            match tokio::time::timeout(RELEASE_BOUND, self.store.relay_release(&self.options.owner)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "releasing the relay lease failed; it expires on its own"),
                Err(_) => tracing::warn!("releasing the relay lease did not finish in time; it expires on its own"),
            }
        }
    }

    /// [`Relay::publish_batch`] while renewing the relay lease every `renew_every`: a publish
    /// may take as long as the sink's own timeout (Kafka's `message.timeout.ms`, a minute),
    /// many leases. `None` when the publish was dropped: the lease was lost or changed hands
    /// since `epoch` (another replica may publish the same rows) or could not be renewed, or
    /// the host is stopping and the publish took [`STOP_GRACE`] more (renewing meanwhile).
    /// Dropping a publish is as safe as a crash: nothing is marked. (A Kafka publish's
    /// messages still queued in the producer may go out all the same: repeats only.)
    async fn publish_leased(
        &self,
        shutdown: &CancellationToken,
        epoch: i64,
        renew_every: Duration,
        renewed: &mut tokio::time::Instant,
    ) -> Option<anyhow::Result<Batch>> {
        let publishing = self.publish_batch(epoch);
        tokio::pin!(publishing);
        let lease_ms = self.options.lease.as_millis() as i64;
        let mut grace: Option<tokio::time::Instant> = None;
        loop {
            let current = grace;
            let stop = async move {
                match current {
                    Some(until) => tokio::time::sleep_until(until).await,
                    None => shutdown.cancelled().await,
                }
            };
            tokio::select! {
                published = &mut publishing => return Some(published),
                () = tokio::time::sleep_until(*renewed + renew_every) => {
                    let renewal = self.store.relay_lease(&self.options.owner, lease_ms);
                    let Some(renewal) = within_grace(shutdown, &mut grace, renewal).await else {
                        tracing::warn!("stopping, and renewing the relay lease took longer than the grace; dropping the batch");
                        return None;
                    };
                    match renewal {
                        Ok(Some(now)) if now == epoch => *renewed = tokio::time::Instant::now(),
                        Ok(_) => {
                            tracing::warn!("lost the relay lease while publishing; dropping the batch");
                            return None;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "renewing the relay lease while publishing failed; dropping the batch");
                            return None;
                        }
                    }
                }
                () = stop => match grace {
                    None => grace = Some(tokio::time::Instant::now() + STOP_GRACE),
                    Some(_) => return None,
                },
            }
        }
    }

    /// Publishes one batch as the holder of the relay lease at `epoch` (what
    /// [`OutboxStore::relay_lease`] returned to this relay's owner): its dead letters are
    /// fenced by it.
    pub async fn publish_batch(&self, epoch: i64) -> anyhow::Result<Batch> {
        publish_once(&*self.store, &*self.sink, &*self.clock, &self.metrics, &self.options, epoch).await
    }
}

/// How long a publish under way may go on once the host stops, before it is dropped; and
/// how long any of the relay's store calls may take then.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// How long the stopping relay's hand-over of its lease may take: one short write, so a
/// database that takes longer is not answering (the lease then expires on its own).
const RELEASE_BOUND: Duration = Duration::from_secs(2);

/// `call`'s answer, unless the host stops first and `call` then takes more than the grace:
/// until `grace` when the stop began already, else [`STOP_GRACE`] after `shutdown`, which
/// then sets `grace` (the stop has one grace, whatever it is spent on). `None` when cut
/// short. A store call waits for a pool connection far longer than a stop may (a database
/// that went away: sqlx's acquire timeout), and the relay's stop holds the host's.
async fn within_grace<T>(
    shutdown: &CancellationToken,
    grace: &mut Option<tokio::time::Instant>,
    call: impl Future<Output = T>,
) -> Option<T> {
    tokio::pin!(call);
    if grace.is_none() {
        tokio::select! {
            answer = &mut call => return Some(answer),
            () = shutdown.cancelled() => *grace = Some(tokio::time::Instant::now() + STOP_GRACE),
        }
    }
    let until = grace.expect("set above");
    tokio::select! {
        answer = &mut call => Some(answer),
        () = tokio::time::sleep_until(until) => None,
    }
}

/// Waits for the next cue to look for rows: a commit (`committed` resolves), then
/// [`RelayOptions::linger`] more so that the commits landing meanwhile share the batch; or
/// [`RelayOptions::poll_interval`] without one. False when `shutdown` fired first.
async fn cue(committed: impl Future<Output = ()>, options: &RelayOptions, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => return false,
        _ = committed => {}
        _ = tokio::time::sleep(options.poll_interval) => return true,
    }
    if options.linger.is_zero() {
        return true;
    }
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(options.linger) => true,
    }
}

/// What one batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    /// Rows marked published (or dead-lettered).
    pub marked: usize,
    /// The read filled the batch (its row count or its bytes): more rows may be waiting.
    pub full: bool,
}

/// Publishes one batch: reads the oldest pending rows, hands them to the sink and marks the
/// prefix it acknowledged (see [`settle`]). Apart from the [`Relay`] so tests can run it
/// without a driver. `epoch` is the relay lease's, as `options.owner` took it: a row the sink
/// refused for good is dead-lettered only while that lease holds.
async fn publish_once(
    store: &dyn OutboxStore,
    sink: &dyn Sink,
    clock: &dyn Clock,
    metrics: &Metrics,
    options: &RelayOptions,
    epoch: i64,
) -> anyhow::Result<Batch> {
    let began = std::time::Instant::now();
    let read = store.outbox_batch(options.batch_size, options.max_batch_bytes).await;
    // Reads that found nothing (a poll, a cue for rows another batch took) are no batch's.
    if read.as_ref().map_or(true, |rows| !rows.is_empty()) {
        metrics.relay_phase(RelayPhase::Read, began.elapsed());
    }
    let rows = match read {
        Ok(rows) => rows,
        Err(e) => {
            metrics.relay_failed();
            return Err(e.into());
        }
    };
    let Some(oldest) = rows.first() else {
        return Ok(Batch { marked: 0, full: false });
    };
    // Cut short by the byte budget (the store stops at the row reaching it) or full by count.
    let full = rows.len() == options.batch_size as usize
        || rows.iter().map(|r| r.payload.len()).sum::<usize>() >= options.max_batch_bytes;
    let batch = |marked| Batch { marked, full };
    // Lag: how long the oldest unpublished event has waited, for the warning (the metric
    // `sagahost_outbox_lag_seconds` is read from the store at scrape time).
    let lag_ms = (clock.now_ms() - oldest.created_at).max(0);
    if lag_ms as u128 > options.lag_warning.as_millis() {
        tracing::warn!(sink = %sink.name(), lag_ms, pending = rows.len(), "relay is behind");
    }
    let mut published = timed(metrics, RelayPhase::Publish, sink.publish(&rows)).await;
    let refused = published.refused.clone().filter(|_| published.acked < rows.len());
    let delivered_after = std::mem::take(&mut published.delivered_after);
    let confirmed_after = std::mem::take(&mut published.confirmed_after);
    warn_of_inversions(&rows, published.acked, &delivered_after);
    let (acked, error) = settle(rows.len(), published);
    crate::failpoint!("relay-after-publish");
    // The acknowledged prefix, and past it what was delivered of sagas with nothing undelivered
    // before it in the batch.
    let beyond = delivered_beyond(&rows, acked, &confirmed_after);
    let marked = acked + beyond.len();
    if marked > 0 {
        let ids: Vec<i64> = rows[..acked].iter().chain(beyond.iter().map(|&i| &rows[i])).map(|r| r.id).collect();
        if let Err(e) = timed(metrics, RelayPhase::Mark, store.outbox_mark_published(&ids, clock.now_ms())).await {
            metrics.relay_failed();
            return Err(e.into());
        }
        // Counted once marked: a batch whose mark failed is sent again, and counted then.
        metrics.published(marked);
        tracing::debug!(count = marked, lag_ms, "published events");
    }
    // A row the sink will never take must not stop every saga's events behind it: it goes to
    // the dead letters (an operator sees it there and in the metric) and the relay moves on.
    // Its saga's later events are still published, so consumers see a gap in that saga's
    // `seq` where the dead letter is; every other event keeps its order.
    if let Some(mut reason) = refused {
        let row = &rows[acked];
        // The refusal may be of the request the row travelled in, not of the row (a broker's
        // "batch too large" names the first row it could not take): sent alone, the row gets
        // the last word, and is dead-lettered only if the sink refuses it by itself too. Not
        // when a later event of its saga was (or may have been) delivered with the batch:
        // the row sent now would land behind it (a gap keeps the order). Later events of its
        // saga that failed with it (a chain commit's events share a partition's request) are
        // no such obstacle: they are sent again after it.
        let later_of_its_saga =
            delivered_after.iter().any(|&i| i > acked && rows.get(i).is_some_and(|r| r.saga_id == row.saga_id));
        if rows.len() - acked > 1 && !later_of_its_saga {
            let alone = timed(metrics, RelayPhase::Publish, sink.publish(std::slice::from_ref(row))).await;
            if alone.acked >= 1 {
                let id = [row.id];
                if let Err(e) = timed(metrics, RelayPhase::Mark, store.outbox_mark_published(&id, clock.now_ms())).await
                {
                    metrics.relay_failed();
                    return Err(e.into());
                }
                metrics.published(1);
                return Ok(batch(marked + 1));
            }
            match alone.refused {
                Some(again) => reason = again,
                None => {
                    metrics.relay_failed();
                    return Err(alone
                        .error
                        .unwrap_or_else(|| anyhow::anyhow!("the sink took no event of a batch of one")));
                }
            }
        }
        let moving = store.outbox_dead_letter(row.id, &reason, clock.now_ms(), &options.owner, epoch);
        match timed(metrics, RelayPhase::Mark, moving).await {
            Ok(true) => metrics.dead_lettered(),
            // Not this relay's to move any more: the lease changed hands since `epoch` (the new
            // holder sends the row itself), or the row was delivered, dead-lettered, purged or
            // redelivered meanwhile. Nothing written, nothing counted.
            Ok(false) => {
                tracing::warn!(saga_id = %row.saga_id, seq = row.seq, event_id = %row.event_id, %reason, "the sink refused an event for good, but it is not this relay's to dead-letter any more (the relay lease moved on, or the event was handled meanwhile)");
                // Not full: read again after the next cue, not at once (a relay that lost its
                // lease would send the same batch again and again until its next renewal).
                return Ok(Batch { marked, full: false });
            }
            Err(e) => {
                metrics.relay_failed();
                return Err(e.into());
            }
        }
        tracing::error!(saga_id = %row.saga_id, seq = row.seq, event_id = %row.event_id, %reason, "the sink refused an event for good; it is in the dead letters");
        return Ok(batch(marked + 1));
    }
    if error.is_some() {
        metrics.relay_failed();
    }
    match error {
        Some(e) => Err(e),
        None => Ok(batch(acked)),
    }
}

/// `work`'s outcome, its time recorded as the relay's `phase`.
async fn timed<T>(metrics: &Metrics, phase: RelayPhase, work: impl Future<Output = T>) -> T {
    let began = std::time::Instant::now();
    let out = work.await;
    metrics.relay_phase(phase, began.elapsed());
    out
}

/// The rows past the acknowledged prefix (`acked`) that are published all the same: delivered
/// (`confirmed`, the sink's word) with every earlier row of their saga in the batch
/// acknowledged or delivered too. Each saga's order holds: the batch is the oldest pending
/// rows and a saga's ids rise with its `seq`, so its rows before the batch are all published.
/// Without it, one partition that did not answer (no leader, too few in-sync replicas) held
/// back every saga's events behind its first row, each round a Kafka message timeout long,
/// and sent the rest again every time.
fn delivered_beyond(rows: &[OutboxRow], acked: usize, confirmed: &[usize]) -> Vec<usize> {
    let mut delivered = vec![false; rows.len()];
    for &i in confirmed {
        if let Some(d) = delivered.get_mut(i) {
            *d = true;
        }
    }
    let mut blocked = std::collections::HashSet::new();
    let mut beyond = Vec::new();
    for (i, row) in rows.iter().enumerate().skip(acked) {
        if delivered[i] && !blocked.contains(row.saga_id.as_str()) {
            beyond.push(i);
        } else {
            blocked.insert(row.saga_id.as_str());
        }
    }
    beyond
}

/// Logs each event delivered after the failure of an earlier event of its saga in the same
/// batch ([`inversions`]): that earlier one is sent again behind it, so consumers see the
/// saga's `seq` out of order once. Kafka's idempotent producer can do this (module docs of
/// `kafka`); the relay cannot undo it, only say so.
fn warn_of_inversions(rows: &[OutboxRow], acked: usize, delivered_after: &[usize]) {
    for (earlier, later) in inversions(rows, acked, delivered_after) {
        tracing::warn!(saga_id = %later.saga_id, delivered_seq = later.seq, failed_seq = earlier.seq, "a later event of its saga was delivered before it; it is sent again after that one, out of order");
    }
}

/// The (failed, delivered) pairs of one saga's events where the delivered one comes later in
/// the batch: past the acknowledged prefix `acked`, a row is delivered if `delivered_after`
/// lists it, and failed otherwise.
fn inversions<'a>(
    rows: &'a [OutboxRow],
    acked: usize,
    delivered_after: &[usize],
) -> Vec<(&'a OutboxRow, &'a OutboxRow)> {
    let mut found = Vec::new();
    for &i in delivered_after {
        let Some(later) = rows.get(i).filter(|_| i > acked) else { continue };
        let mut failed_before = (acked..i).filter(|j| !delivered_after.contains(j)).map(|j| &rows[j]);
        if let Some(earlier) = failed_before.find(|r| r.saga_id == later.saga_id) {
            found.push((earlier, later));
        }
    }
    found
}

/// The acknowledged-prefix rule: of a batch of `len` rows, how many, counted from its start,
/// may be marked published after the sink answered `published`, and the error to report. Never
/// more than the batch. The rest stays pending and is read again, first, by the next batch: so
/// a row is never marked while one before it in the outbox is not, and `seq` n+1 of a saga is
/// never marked ahead of n.
///
/// A sink that stops short without an error breaks the [`Published`] contract; it counts as a
/// failure all the same, so the relay logs it and backs off instead of taking the batch as done
/// and waiting for the next poll.
fn settle(len: usize, published: Published) -> (usize, Option<anyhow::Error>) {
    let acked = published.acked.min(len);
    let error = match published.error {
        None if acked < len => Some(anyhow::anyhow!(
            "the sink acknowledged {acked} of {len} events without saying why; the rest are sent again"
        )),
        error => error,
    };
    (acked, error)
}
