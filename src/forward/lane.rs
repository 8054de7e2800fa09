//! A lane: one writeKey's calls between the queue and upstream, and the bisection that
//! finds the calls upstream refuses in a refused batch.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;

use super::settings::{ForwardSettings, MAX_BATCH_BYTES};
use super::upstream::BATCH_ENVELOPE_BYTES;
use crate::queue::QueuedCall;

/// The shortest wait before a retry, whatever upstream asked.
const MIN_RETRY_DELAY: Duration = Duration::from_millis(500);
/// Past this backoff, a lane checks upstream with one call this often instead (see
/// `Lane::attempt_failed`).
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// The calls of one writeKey on their way upstream.
pub(super) struct Lane {
    /// Names the lane in logs: see [`fingerprint`].
    pub(super) fingerprint: String,
    /// Read from the queue, not yet delivered, in queue order (excluding the batch in flight).
    pub(super) buffered: VecDeque<QueuedCall>,
    /// Calls in the batch in flight (at most one batch per lane, for order).
    pub(super) in_flight: usize,
    /// When the oldest buffered call was read (monotonic, so a clock step cannot hold a
    /// partial batch back).
    pub(super) pending_since: Option<Instant>,
    /// The first of this key's calls that the read cursor passed without buffering, because
    /// the lane was full; read again from here once there is room.
    pub(super) skipped_from: Option<u64>,
    /// While backing off: not before this.
    pub(super) retry_at: Option<Instant>,
    backoff: ExponentialBackoff,
    /// Attempts made for the batch at the head.
    pub(super) attempts: u32,
    /// While bisecting a refused batch: how far, and in batches of at most how many calls.
    probe: Option<Probe>,
    /// Upstream has failed long enough that the next batch is one call, sent after at most
    /// [`CHECK_EVERY`]: see [`Lane::attempt_failed`].
    checking: bool,
}

/// Bisecting a refused batch: the lane sends smaller batches until each call upstream
/// refuses is sent alone (and dead-lettered), delivering the others on the way.
#[derive(Debug, Clone, Copy)]
struct Probe {
    /// The most calls a batch may hold while bisecting.
    size: usize,
    /// The last queue id of the refused batches: once a batch that reaches it is settled,
    /// every refused call has been sorted out and the lane sends full batches again.
    until_id: u64,
}

impl Probe {
    /// After a refused batch of `len` calls ending at `last_id`: half as many calls, until
    /// past the furthest call refused so far (a probe under way may reach further).
    fn split(current: Option<Probe>, len: usize, last_id: u64) -> Probe {
        Probe {
            size: len.div_ceil(2),
            until_id: current.map_or(last_id, |probe| probe.until_id.max(last_id)),
        }
    }

    /// Whether a settled batch ending at `last_id` took the head past the refused calls.
    fn is_done(self, last_id: u64) -> bool {
        last_id >= self.until_id
    }

    /// After a delivered batch ending at `last_id`: over once past the refused calls, else
    /// twice as wide, so that the rest of them does not go one by one.
    fn after_delivery(self, last_id: u64) -> Option<Probe> {
        if self.is_done(last_id) {
            None
        } else {
            Some(Probe {
                size: self.size * 2,
                ..self
            })
        }
    }
}

impl Lane {
    pub(super) fn new(settings: &ForwardSettings, write_key: &str) -> Lane {
        Lane {
            fingerprint: fingerprint(write_key),
            buffered: VecDeque::new(),
            in_flight: 0,
            pending_since: None,
            skipped_from: None,
            retry_at: None,
            backoff: ExponentialBackoff {
                initial_interval: Duration::from_millis(500),
                current_interval: Duration::from_millis(500),
                multiplier: 1.5,
                randomization_factor: 0.5,
                max_interval: settings.retry_max_interval,
                // A durable queue never gives up by elapsed time; `max_age` decides.
                max_elapsed_time: None,
                ..ExponentialBackoff::default()
            },
            attempts: 0,
            probe: None,
            checking: false,
        }
    }

    /// Calls the lane holds: buffered and in flight.
    pub(super) fn occupancy(&self) -> usize {
        self.buffered.len() + self.in_flight
    }

    /// Appends a call read from the queue.
    pub(super) fn push(&mut self, call: QueuedCall) {
        if self.buffered.is_empty() {
            self.pending_since = Some(Instant::now());
        }
        self.buffered.push_back(call);
    }

    /// Puts an unsent batch back at the head, in order.
    pub(super) fn put_back(&mut self, calls: Vec<QueuedCall>) {
        if !calls.is_empty() && self.pending_since.is_none() {
            self.pending_since = Some(Instant::now());
        }
        for call in calls.into_iter().rev() {
            self.buffered.push_front(call);
        }
    }

    /// Puts an unsettled batch back at the head, to be tried again after `delay`.
    pub(super) fn retry_later(&mut self, calls: Vec<QueuedCall>, delay: Duration) {
        self.retry_at = Some(Instant::now() + delay);
        self.put_back(calls);
    }

    /// Whether a batch may start now: none in flight and not backing off.
    pub(super) fn can_start(&self, now: Instant) -> bool {
        self.in_flight == 0 && self.retry_at.is_none_or(|at| at <= now)
    }

    /// How many calls from the head the next batch holds: at most `max_events` (fewer while
    /// bisecting) and under `MAX_BATCH_BYTES`.
    pub(super) fn batch_len(&self, max_events: usize) -> usize {
        let limit = self.batch_limit(max_events);
        let mut count = 0;
        let mut bytes = BATCH_ENVELOPE_BYTES;
        for call in &self.buffered {
            if count == limit || bytes + call.record.call.len() + 1 > MAX_BATCH_BYTES {
                break;
            }
            count += 1;
            bytes += call.record.call.len() + 1;
        }
        count
    }

    /// The most calls the next batch may hold: `max_events`, or fewer while bisecting.
    pub(super) fn batch_limit(&self, max_events: usize) -> usize {
        if self.checking {
            return 1;
        }
        match self.probe {
            Some(probe) => probe.size.min(max_events),
            None => max_events,
        }
    }

    /// Takes the first `count` buffered calls as the batch in flight.
    pub(super) fn take_batch(&mut self, count: usize) -> Vec<QueuedCall> {
        let calls = self.take_head(count);
        self.in_flight = count;
        self.retry_at = None;
        calls
    }

    /// Takes the first `count` buffered calls off the lane without sending them.
    pub(super) fn take_head(&mut self, count: usize) -> Vec<QueuedCall> {
        let calls: Vec<QueuedCall> = self.buffered.drain(..count).collect();
        if self.buffered.is_empty() {
            self.pending_since = None;
        }
        calls
    }

    /// After a delivered batch ending at `last_id`: the next batch starts afresh.
    pub(super) fn delivered(&mut self, last_id: u64) {
        self.attempts = 0;
        self.checking = false;
        self.backoff.reset();
        self.probe = self.probe.and_then(|probe| probe.after_delivery(last_id));
    }

    /// Counts a failed attempt worth repeating and says how long to wait before the next:
    /// what upstream `asked` for, else the next backoff step, at most `cap`.
    ///
    /// Once the backoff grows past [`CHECK_EVERY`] (and upstream asked for nothing), the lane
    /// waits only that long and its next batch is a single call: a cheap check that notices
    /// upstream's return within seconds, where a batch every `cap` would take up to a minute.
    pub(super) fn attempt_failed(&mut self, asked: Option<Duration>, cap: Duration) -> Duration {
        self.attempts += 1;
        // The backoff advances either way, so a run of failures keeps slowing down.
        let backoff = self.backoff.next_backoff().unwrap_or(cap);
        let delay = match asked {
            Some(asked) => asked.max(MIN_RETRY_DELAY),
            None => backoff,
        }
        .min(cap);
        self.checking = asked.is_none() && delay > CHECK_EVERY;
        if self.checking {
            CHECK_EVERY
        } else {
            delay
        }
    }

    /// Upstream refused a batch of several calls: send them again in halves.
    pub(super) fn bisect(&mut self, calls: Vec<QueuedCall>) {
        self.probe = Some(Probe::split(self.probe, calls.len(), last_id(&calls)));
        self.attempts += 1;
        self.put_back(calls);
    }

    /// After a refused call (queue id `last_id`) went to the dead-letter store: attempts
    /// count from zero again, and bisecting ends once past the refused calls.
    pub(super) fn dead_lettered(&mut self, last_id: u64) {
        self.attempts = 0;
        // Upstream answered: it is back.
        self.checking = false;
        if self.probe.is_some_and(|probe| probe.is_done(last_id)) {
            self.probe = None;
        }
    }
}

/// The queue id of a batch's last call (0 for none).
pub(super) fn last_id(calls: &[QueuedCall]) -> u64 {
    calls.last().map(|c| c.id).unwrap_or(0)
}

/// A writeKey's fingerprint: the first 8 hex digits of its SHA-256. It tells lanes apart in
/// logs without giving the key away (it cannot be turned back into the key).
pub fn fingerprint(write_key: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, write_key.as_bytes());
    digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
