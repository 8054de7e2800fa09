//! Forwarding: deliver queued calls upstream in batches per writeKey, with retry and backoff,
//! and take them off the queue only once upstream has them.
//!
//! One task, the [`Forwarder`], owns the delivery state, on a thread of its own
//! ([`run_on_own_thread`]: its sled calls can wait on sled's locks, and must not hold up the
//! workers that answer requests). It reads the queue in order into a *lane* per writeKey,
//! sends a lane's head as a batch when the batch is full (by count or bytes) or its oldest
//! call has waited `flush_interval`, and keeps at most one batch per lane in flight, so each
//! writeKey's calls arrive in queue order. Up to `concurrency` batches are in flight across
//! lanes.
//!
//! - **2xx**: the batch's calls are removed from the queue in one atomic step.
//! - **Retryable** (network error, timeout, 408, 410, 429, 460, 5xx but 501/505): the lane
//!   waits (exponential backoff with jitter from the `backoff` crate, or what upstream asked
//!   for, capped) and sends the same calls again with a fresh `sentAt`. It never gives up by
//!   elapsed time; other lanes keep flowing meanwhile.
//! - **Refused** (other 4xx, 501, 505): a batch of several calls is bisected until the calls
//!   upstream refuses are alone; each such call moves to the dead-letter store atomically.
//! - **Too old** (`max_age`): moved to the dead-letter store as `expired` instead of sent.
//!
//! A crash between "upstream said yes" and "removed" resends that batch (same messageIds,
//! which upstream dedupes); it never loses it.

mod connect;
mod lane;
pub mod proxy;
mod settings;
mod settle;
pub mod upstream;

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::queue::{Queue, QueuedCall, Shown, Visit};
use crate::shutdown::Shutdown;
pub use connect::load_ca_file;
use lane::Lane;
pub use settings::{ForwardSettings, MAX_BATCH_BYTES, MAX_BATCH_EVENTS};
use upstream::{Outcome, Upstream};

/// Calls read from the queue per read.
const READ_CHUNK: usize = 1024;
/// Reads per pass of the loop, so that a large backlog does not stall sending.
const READS_PER_PASS: usize = 16;
/// How far past a blocked lane's calls the reader looks for other writeKeys' calls.
const SKIP_WINDOW: u64 = 20_000;
/// Between reads that only skip past blocked lanes' calls.
const SKIP_SCAN_PAUSE: Duration = Duration::from_millis(50);
/// Before reading again after the queue failed to read.
const ERROR_PAUSE: Duration = Duration::from_secs(1);
/// Beyond the upstream timeout, what settling the batches in flight may take at shutdown
/// (compressing a batch before its request, removing it from the queue after).
pub const SETTLE_MARGIN: Duration = Duration::from_secs(2);
/// The soonest the loop wakes by timer.
const MIN_WAKE: Duration = Duration::from_millis(1);

/// What the forwarder last saw of upstream, for `grouprelay status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UpstreamHealth {
    /// Some writeKey's batch waits to be retried until then (ms since the epoch; the latest
    /// such time).
    pub backing_off_until_ms: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_at_ms: Option<u64>,
    pub last_delivery_at_ms: Option<u64>,
    /// The egress proxy in use (`http://host:port`, never its credentials), if any.
    pub proxy: Option<String>,
    /// Since when every batch has failed (ms since the epoch); `None` while upstream takes
    /// batches.
    pub unreachable_since_ms: Option<u64>,
}

/// A finished upstream request.
struct Sent {
    write_key: String,
    calls: Vec<QueuedCall>,
    outcome: Outcome,
}

/// The delivery side's single owner of state.
pub struct Forwarder {
    queue: Queue,
    upstream: Upstream,
    settings: ForwardSettings,
    lanes: BTreeMap<String, Lane>,
    /// The next queue id to read.
    cursor: u64,
    /// The lane that started the last batch: the next search starts after it (fairness).
    last_started: Option<String>,
    in_flight: JoinSet<Sent>,
    /// Whether the last read found only calls of lanes that could not take them.
    only_skipping: bool,
    /// Which lane and first queue id each send task carries, to recover if one fails.
    sending: HashMap<tokio::task::Id, (String, u64)>,
    lane_capacity: usize,
    /// Published to `/stats` and `grouprelay status`; only the forwarder writes it.
    health: tokio::sync::watch::Sender<UpstreamHealth>,
}

impl Forwarder {
    /// What the forwarder last saw of upstream, kept up to date while it runs.
    pub fn health(&self) -> tokio::sync::watch::Receiver<UpstreamHealth> {
        self.health.subscribe()
    }

    /// A forwarder for `queue`'s calls; it delivers nothing until [`Forwarder::run`].
    pub fn new(queue: Queue, upstream: Upstream, settings: ForwardSettings) -> Forwarder {
        let health = UpstreamHealth {
            proxy: upstream.proxy().map(str::to_owned),
            ..UpstreamHealth::default()
        };
        Forwarder {
            lane_capacity: settings.max_batch_events * 2,
            queue,
            upstream,
            settings,
            lanes: BTreeMap::new(),
            cursor: 0,
            last_started: None,
            in_flight: JoinSet::new(),
            sending: HashMap::new(),
            only_skipping: false,
            health: tokio::sync::watch::Sender::new(health),
        }
    }

    /// Delivers the queue until `shutdown` fires, then keeps delivering for up to
    /// `drain_timeout` (sending partial batches at once); then starts no new batch, settles
    /// those in flight, and leaves the rest queued.
    pub async fn run(mut self, mut shutdown: Shutdown) {
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        loop {
            let queue = self.queue.clone();
            let appended = queue.appended();
            tokio::pin!(appended);
            appended.as_mut().enable();
            let draining = drain_deadline.is_some();
            if drain_deadline.is_some_and(|deadline| tokio::time::Instant::now() >= deadline) {
                // Checked here too: another branch may win the select below once the
                // deadline is due, and no batch may start after it.
                self.stop_at_drain_deadline().await;
                return;
            }
            let read_again = self.read_new();
            self.refill_lanes();
            self.start_sends(draining);
            if draining && self.is_idle() {
                tracing::info!("queue drained");
                return;
            }
            let wake_at = self.wake_at(read_again, draining);
            tokio::select! {
                Some(done) = self.in_flight.join_next_with_id() => match done {
                    Ok((id, sent)) => {
                        self.sending.remove(&id);
                        self.finish(sent);
                    }
                    Err(e) => self.lost(e),
                },
                _ = &mut appended => {}
                _ = sleep_until(wake_at) => {}
                _ = shutdown.recv(), if !draining => {
                    tracing::info!(timeout_ms = self.settings.drain_timeout.as_millis() as u64, "draining the queue upstream");
                    drain_deadline = Some(tokio::time::Instant::now() + self.settings.drain_timeout);
                }
                _ = sleep_until(drain_deadline), if draining => {
                    self.stop_at_drain_deadline().await;
                    return;
                }
            }
        }
    }

    /// Reads newly readable calls into their lanes. Returns when to read again if more may
    /// be waiting: at once while calls are being buffered, after a pause while the reads only
    /// skip past blocked lanes' calls (looking for other writeKeys), so that a long outage
    /// does not turn into reading the whole queue back to back.
    fn read_new(&mut self) -> Option<Duration> {
        let mut buffered_any = false;
        for _ in 0..READS_PER_PASS {
            // Stop once the lanes that can send hold enough work: reading further would only
            // skip their calls and read them again later.
            let sendable: usize = self
                .lanes
                .values()
                .filter(|l| l.retry_at.is_none() && l.skipped_from.is_none())
                .map(Lane::occupancy)
                .sum();
            if sendable >= self.lane_capacity {
                return None;
            }
            // While reads find only blocked lanes' calls, look at most SKIP_WINDOW calls past
            // the first one skipped: reading a whole outage's backlog just to skip it costs
            // memory (sled holds on to what it read) and is unlikely to find other writeKeys.
            // Reads that do find other writeKeys' calls go on past the window.
            let window_end = self
                .lanes
                .values()
                .filter_map(|l| l.skipped_from)
                .min()
                .map_or(u64::MAX, |from| from.saturating_add(SKIP_WINDOW));
            if self.only_skipping && self.cursor >= window_end {
                return None;
            }
            let (mut shown, mut buffered_here) = (0, false);
            let read = self.queue.visit(self.cursor, |call| {
                self.cursor = call.id + 1;
                shown += 1;
                buffered_here |=
                    buffer_shown(&mut self.lanes, &self.settings, self.lane_capacity, call);
                if shown == READ_CHUNK {
                    Visit::Stop
                } else {
                    Visit::Next
                }
            });
            buffered_any |= buffered_here;
            if let Err(e) = read {
                tracing::error!(error = %e, "cannot read the queue");
                return Some(ERROR_PAUSE);
            }
            self.only_skipping = !buffered_here;
            if shown < READ_CHUNK {
                return None;
            }
        }
        Some(if buffered_any {
            Duration::ZERO
        } else {
            SKIP_SCAN_PAUSE
        })
    }

    /// Reads skipped calls back into lanes that have room again.
    fn refill_lanes(&mut self) {
        let cursor = self.cursor;
        let capacity = self.lane_capacity;
        for (key, lane) in self.lanes.iter_mut() {
            while let Some(from) = lane.skipped_from {
                if lane.occupancy() >= capacity / 2 {
                    break;
                }
                lane.skipped_from = None;
                let (mut shown, mut last) = (0, None);
                let read = self.queue.visit(from, |call| {
                    if call.id >= cursor {
                        return Visit::Stop;
                    }
                    last = Some(call.id);
                    shown += 1;
                    if call.view.write_key == key.as_str() {
                        if lane.occupancy() >= capacity {
                            lane.skipped_from = Some(call.id);
                            return Visit::Stop;
                        }
                        lane.push(call.to_queued());
                    }
                    if shown == READ_CHUNK {
                        Visit::Stop
                    } else {
                        Visit::Next
                    }
                });
                if let Err(e) = read {
                    // Read again from where this read got to.
                    lane.skipped_from = lane.skipped_from.or(Some(last.map_or(from, |id| id + 1)));
                    tracing::error!(error = %e, "cannot read the queue");
                    return;
                }
                // Not at the cursor yet: carry on from after the last call looked at.
                if lane.skipped_from.is_none() {
                    if let Some(last) = last.filter(|&id| id + 1 < cursor) {
                        lane.skipped_from = Some(last + 1);
                    }
                }
                if last.is_none() {
                    break;
                }
            }
        }
    }

    /// Starts a batch on every lane that is ready, while there is room in flight.
    fn start_sends(&mut self, draining: bool) {
        let now = Instant::now();
        for key in self.lanes_in_turn() {
            if self.in_flight.len() >= self.settings.concurrency {
                break;
            }
            if self.lanes.get(&key).is_none_or(|lane| !lane.can_start(now)) {
                continue;
            }
            self.expire(&key);
            self.start_batch(key, now, draining);
        }
    }

    /// The lanes' keys in the order they take turns: from just after the lane that started
    /// the last batch, round to it.
    fn lanes_in_turn(&self) -> Vec<String> {
        match &self.last_started {
            Some(last) => self
                .lanes
                .range::<String, _>((Bound::Excluded(last), Bound::Unbounded))
                .chain(self.lanes.range::<String, _>(..=last))
                .map(|(k, _)| k.clone())
                .collect(),
            None => self.lanes.keys().cloned().collect(),
        }
    }

    /// Sends the head of `key`'s lane if it makes a batch now: full, or its oldest call has
    /// waited `flush_interval`, or draining, or a retry. Forgets a lane that holds nothing.
    fn start_batch(&mut self, key: String, now: Instant, draining: bool) {
        let Some(lane) = self.lanes.get_mut(&key) else {
            return;
        };
        let limit = lane.batch_limit(self.settings.max_batch_events);
        let count = lane.batch_len(self.settings.max_batch_events);
        if count == 0 {
            if lane.buffered.is_empty() && lane.skipped_from.is_none() {
                self.lanes.remove(&key);
            }
            return;
        }
        let full = count < lane.buffered.len() || count == limit || lane.skipped_from.is_some();
        let due = lane
            .pending_since
            .is_none_or(|since| now.duration_since(since) >= self.settings.flush_interval);
        if !(full || due || draining || lane.attempts > 0) {
            return;
        }
        let calls = lane.take_batch(count);
        self.spawn_send(key, calls);
    }

    /// Sends a lane's batch upstream in a task of its own.
    fn spawn_send(&mut self, key: String, calls: Vec<QueuedCall>) {
        let upstream = self.upstream.clone();
        let write_key = key.clone();
        let first_id = calls[0].id;
        let task = self.in_flight.spawn(async move {
            let bodies: Vec<&[u8]> = calls.iter().map(|c| c.record.call.as_slice()).collect();
            let outcome = upstream.send(&write_key, &bodies).await;
            Sent {
                write_key,
                calls,
                outcome,
            }
        });
        self.sending.insert(task.id(), (key.clone(), first_id));
        self.last_started = Some(key);
    }

    /// A send task died (a panic): its calls are still queued on disk, so the lane forgets
    /// what it held and reads again from the lost batch.
    fn lost(&mut self, error: tokio::task::JoinError) {
        tracing::error!(error = %error, "send task failed; re-reading its calls from the queue");
        let Some((key, first_id)) = self.sending.remove(&error.id()) else {
            return;
        };
        if let Some(lane) = self.lanes.get_mut(&key) {
            lane.in_flight = 0;
            lane.buffered.clear();
            lane.pending_since = None;
            lane.skipped_from = Some(first_id);
        }
    }

    /// When the loop wakes by timer: when reading must go on (`read_again` from now), or
    /// what `next_wake` says, whichever comes first.
    fn wake_at(
        &self,
        read_again: Option<Duration>,
        draining: bool,
    ) -> Option<tokio::time::Instant> {
        let now = Instant::now();
        let wake = match (
            read_again.map(|pause| now + pause),
            self.next_wake(draining),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        wake.map(tokio::time::Instant::from_std)
    }

    /// When the loop must look again without an event: a lane's retry time, or the moment
    /// a partial batch has waited `flush_interval`.
    fn next_wake(&self, draining: bool) -> Option<Instant> {
        // With every slot busy, only a finishing send can let another start.
        if self.in_flight.len() >= self.settings.concurrency {
            return None;
        }
        let now = Instant::now();
        self.lanes
            .values()
            .filter(|lane| lane.in_flight == 0 && !lane.buffered.is_empty())
            .map(|lane| match (lane.retry_at, lane.pending_since) {
                (Some(at), _) => at,
                (None, _) if draining => now,
                (None, Some(since)) => since + self.settings.flush_interval,
                (None, None) => now,
            })
            .min()
            // Never a time already past: a lane that could not start must not spin the loop.
            .map(|at| at.max(now + MIN_WAKE))
    }

    /// At the drain deadline: no batch starts any more; those in flight are settled.
    async fn stop_at_drain_deadline(&mut self) {
        tracing::info!(
            in_flight = self.in_flight.len(),
            "drain timeout reached; settling the batches in flight, the rest stays queued"
        );
        self.settle_in_flight().await;
    }

    /// At the drain deadline: each batch in flight is waited for (its request is bounded by
    /// `--upstream-timeout-ms`) and settled. Abandoning one would send it again after the
    /// restart, although upstream most likely took it a moment later.
    async fn settle_in_flight(&mut self) {
        let bound = self.upstream.timeout() + SETTLE_MARGIN;
        let settle = async {
            while let Some(done) = self.in_flight.join_next_with_id().await {
                match done {
                    Ok((id, sent)) => {
                        self.sending.remove(&id);
                        self.finish(sent);
                    }
                    Err(e) => self.lost(e),
                }
            }
        };
        if tokio::time::timeout(bound, settle).await.is_err() {
            tracing::warn!("batches in flight did not finish; they stay queued and are sent again");
            self.in_flight.shutdown().await;
        }
    }

    /// Nothing buffered, skipped or in flight, and nothing new to read.
    fn is_idle(&self) -> bool {
        self.in_flight.is_empty()
            && self
                .lanes
                .values()
                .all(|l| l.buffered.is_empty() && l.skipped_from.is_none())
            && self.queue.read(self.cursor, 1).is_ok_and(|c| c.is_empty())
    }
}

/// Runs the forwarder on a thread of its own, under a single-threaded runtime. Its queue
/// reads and settlements are synchronous sled calls, and sled makes them wait on its locks
/// while a write holds them: on this thread they hold up only the forwarder, never the
/// async workers that answer requests. The receiver gets, once the forwarder has stopped,
/// `Err` with the panic's message if it panicked.
pub fn run_on_own_thread(
    forwarder: Forwarder,
    shutdown: Shutdown,
) -> std::io::Result<tokio::sync::oneshot::Receiver<Result<(), String>>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (stopped, finished) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("forwarder".into())
        .spawn(move || {
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                runtime.block_on(forwarder.run(shutdown))
            }));
            // A gzip task still running after the settle deadline is not waited for.
            runtime.shutdown_timeout(Duration::from_secs(1));
            let _ = stopped.send(ran.map_err(|panic| panic_message(&*panic)));
        })?;
    Ok(finished)
}

/// What a panic said, as `JoinError` shows it for a task.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(message), _) => (*message).to_owned(),
        (_, Some(message)) => message.clone(),
        _ => "a panic without a message".to_owned(),
    }
}

/// Puts a call the reader is shown into its lane, or marks it skipped where the lane is full
/// (or already skipping): a skipped call is not copied, and is read again once the lane has
/// room. Returns whether the call was buffered.
fn buffer_shown(
    lanes: &mut BTreeMap<String, Lane>,
    settings: &ForwardSettings,
    capacity: usize,
    call: Shown<'_>,
) -> bool {
    let key = call.view.write_key;
    let lane = match lanes.get_mut(key) {
        Some(lane) => lane,
        None => lanes
            .entry(key.to_owned())
            .or_insert_with_key(|key| Lane::new(settings, key)),
    };
    if lane.skipped_from.is_some() {
        return false;
    }
    if lane.occupancy() >= capacity {
        lane.skipped_from = Some(call.id);
        return false;
    }
    lane.push(call.to_queued());
    true
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
