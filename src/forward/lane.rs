//! A lane: one writeKey's calls between the queue and upstream.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use backoff::ExponentialBackoff;

use super::ForwardSettings;
use crate::queue::QueuedCall;

/// The calls of one writeKey on their way upstream.
pub(super) struct Lane {
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
    pub(super) backoff: ExponentialBackoff,
    /// Attempts made for the batch at the head.
    pub(super) attempts: u32,
    /// Bisecting a refused batch: send at most `.0` calls until the head passes id `.1`.
    pub(super) probe: Option<(usize, u64)>,
}

impl Lane {
    pub(super) fn new(settings: &ForwardSettings) -> Lane {
        Lane {
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
}
