//! What happens to a lane's calls once their fate is known: a finished request's outcome
//! (delivered, retried, bisected, dead-lettered) and expiry past `max_age`.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::lane::{last_id, Lane};
use super::settings::ForwardSettings;
use super::upstream::Outcome;
use super::{Forwarder, Sent, UpstreamHealth};
use crate::clock;
use crate::human;
use crate::queue::{DeadCause, DeadReason, Queue, QueuedCall};

/// The forwarder's parts that settle a lane's calls, borrowed apart from the lanes so that
/// a lane can change alongside.
struct Settler<'a> {
    queue: &'a Queue,
    settings: &'a ForwardSettings,
    health: &'a watch::Sender<UpstreamHealth>,
}

impl Forwarder {
    /// Applies a finished request's outcome to the queue and its lane.
    pub(super) fn finish(&mut self, sent: Sent) {
        let Sent {
            write_key,
            calls,
            outcome,
        } = sent;
        let (lanes, settler) = self.lanes_and_settler();
        let lane = lanes
            .entry(write_key)
            .or_insert_with_key(|key| Lane::new(settler.settings, key));
        lane.in_flight = 0;
        match outcome {
            Outcome::Delivered => settler.delivered(lane, calls),
            Outcome::Retry { cause, after } => settler.retry(lane, calls, cause, after),
            Outcome::Refused { status, .. } if calls.len() > 1 => {
                refused_batch(lane, calls, status)
            }
            Outcome::Refused { status, response } => {
                settler.refused_call(lane, calls, status, response)
            }
        }
    }

    /// Dead-letters the calls at a lane's head that are older than `max_age`.
    pub(super) fn expire(&mut self, key: &str) {
        let (lanes, settler) = self.lanes_and_settler();
        if let Some(lane) = lanes.get_mut(key) {
            settler.expire(lane);
        }
    }

    /// The lanes, and apart from them what settles their calls.
    fn lanes_and_settler(&mut self) -> (&mut BTreeMap<String, Lane>, Settler<'_>) {
        let settler = Settler {
            queue: &self.queue,
            settings: &self.settings,
            health: &self.health,
        };
        (&mut self.lanes, settler)
    }
}

impl Settler<'_> {
    /// 2xx: the calls leave the queue, and the lane's next batch starts afresh.
    fn delivered(&self, lane: &mut Lane, calls: Vec<QueuedCall>) {
        crate::failpoint::hit("forward-after-delivered");
        let now = clock::unix_ms(SystemTime::now());
        let mut unreachable_for = None;
        self.health.send_modify(|health| {
            health.last_delivery_at_ms = Some(now);
            if health
                .backing_off_until_ms
                .is_some_and(|until| until <= now)
            {
                health.backing_off_until_ms = None;
            }
            unreachable_for = health
                .unreachable_since_ms
                .take()
                .map(|since| now.saturating_sub(since));
        });
        if let Some(ms) = unreachable_for {
            tracing::info!(
                "upstream back after {}; delivering {}",
                human::duration(ms),
                human::count(self.queue.counts().pending, "call")
            );
        }
        if let Err(e) = self.queue.remove(&calls) {
            // They were delivered; at worst they are sent again after a restart.
            tracing::error!(error = %e, "cannot remove delivered calls from the queue");
        }
        tracing::debug!(
            lane = %lane.fingerprint,
            calls = calls.len(),
            attempts = lane.attempts + 1,
            "batch delivered"
        );
        lane.delivered(last_id(&calls));
    }

    /// Worth trying again: the calls wait at the lane's head until the delay is over.
    fn retry(
        &self,
        lane: &mut Lane,
        calls: Vec<QueuedCall>,
        cause: String,
        after: Option<Duration>,
    ) {
        crate::metrics::metrics().retries.inc();
        let delay = lane.attempt_failed(after, self.settings.retry_max_interval);
        tracing::warn!(
            lane = %lane.fingerprint,
            %cause,
            delay_ms = delay.as_millis() as u64,
            attempt = lane.attempts,
            calls = calls.len(),
            "upstream batch failed; retrying"
        );
        lane.retry_later(calls, delay);
        let now = clock::unix_ms(SystemTime::now());
        let until = now + u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        let mut newly_unreachable = false;
        self.health.send_modify(|health| {
            if health.unreachable_since_ms.is_none() {
                health.unreachable_since_ms = Some(now);
                newly_unreachable = true;
            }
            health.last_error = Some(cause);
            health.last_error_at_ms = Some(now);
            health.backing_off_until_ms = Some(
                health
                    .backing_off_until_ms
                    .filter(|&t| t > now)
                    .map_or(until, |t| t.max(until)),
            );
        });
        if newly_unreachable {
            tracing::warn!(
                "upstream unreachable since {} ({} waiting)",
                clock::rfc3339_millis(SystemTime::now()),
                human::count(self.queue.counts().pending, "call")
            );
        }
    }

    /// Upstream refused a call sent alone: it moves to the dead-letter store (if that fails,
    /// it stays at the lane's head, and the lane waits before trying again).
    fn refused_call(&self, lane: &mut Lane, calls: Vec<QueuedCall>, status: u16, response: String) {
        let reason = DeadReason::new(
            DeadCause::RejectedByUpstream,
            Some(status),
            response,
            lane.attempts + 1,
        );
        match self.queue.dead_letter(&calls, &reason) {
            Ok(()) => tracing::warn!(
                lane = %lane.fingerprint,
                status,
                "upstream refused a call; moved to the dead-letter store"
            ),
            Err(e) => {
                tracing::error!(error = %e, "cannot dead-letter a refused call; it stays queued");
                lane.retry_later(calls, self.settings.retry_max_interval);
                return;
            }
        }
        lane.dead_lettered(last_id(&calls));
    }

    /// Dead-letters the calls at the lane's head that are older than `max_age`; if that
    /// fails they stay at the head, and the lane waits before trying again.
    fn expire(&self, lane: &mut Lane) {
        let max_age_ms = u64::try_from(self.settings.max_age.as_millis()).unwrap_or(u64::MAX);
        let oldest_allowed = clock::unix_ms(SystemTime::now()).saturating_sub(max_age_ms);
        let expired = lane
            .buffered
            .iter()
            .take_while(|c| c.record.received_ms < oldest_allowed)
            .count();
        if expired == 0 {
            return;
        }
        let calls = lane.take_head(expired);
        let reason = DeadReason::new(DeadCause::Expired, None, String::new(), lane.attempts);
        match self.queue.dead_letter(&calls, &reason) {
            Ok(()) => tracing::warn!(
                calls = calls.len(),
                max_age_s = self.settings.max_age.as_secs(),
                "calls older than --max-age moved to the dead-letter store as expired"
            ),
            Err(e) => {
                tracing::error!(error = %e, "cannot dead-letter expired calls; they stay queued");
                lane.retry_later(calls, self.settings.retry_max_interval);
            }
        }
    }
}

/// Upstream refused a batch of several calls: the lane sends them again in halves, to find
/// the calls it refuses.
fn refused_batch(lane: &mut Lane, calls: Vec<QueuedCall>, status: u16) {
    tracing::warn!(
        status,
        calls = calls.len(),
        "upstream refused a batch; splitting it to find the calls it refuses"
    );
    lane.bisect(calls);
}
