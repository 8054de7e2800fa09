//! Keeping systemd informed while the daemon runs: queue depth in `STATUS=`, the watchdog,
//! and more time for the drain once stopping.

use std::sync::Arc;

use crate::clock;
use crate::human::{bytes, count, duration};
use crate::notify::Notifier;
use crate::queue::Queue;
use crate::shutdown::Shutdown;

/// What `systemctl status` shows.
pub(super) fn status_line(queue: &Queue) -> String {
    let counts = queue.counts();
    format!(
        "{} queued ({} stored), {} delivered",
        count(counts.pending, "call"),
        bytes(queue.stored_bytes()),
        counts.delivered
    )
}

/// Keeps systemd and the log informed while the daemon runs: the queue depth in `STATUS=`
/// every few seconds, `WATCHDOG=1` from this event loop when `WatchdogSec=` is set (so a
/// stuck runtime gets restarted), `STOPPING=1` with more time for the drain once shutdown
/// begins, and in the log a summary of deliveries every minute there were some (the
/// forwarder logs each batch at DEBUG only).
pub(super) async fn supervise(
    notifier: Arc<Notifier>,
    queue: Queue,
    mut shutdown: Shutdown,
    forwarder_stop: std::time::Duration,
) {
    const STATUS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
    let watchdog = Notifier::watchdog_interval();
    let tick = watchdog.map_or(STATUS_EVERY, |w| w.min(STATUS_EVERY));
    let mut ticker = tokio::time::interval(tick);
    let mut stopping = false;
    let mut last_status = tokio::time::Instant::now();
    let mut summary = DeliverySummary::new(&queue);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.recv(), if !stopping => {
                stopping = true;
                // In-flight client requests (up to 10 s), the forwarder's drain and its
                // batches in flight, the final flush (5 s), the committer's stop (5 s), and a
                // margin.
                let extend = forwarder_stop + std::time::Duration::from_secs(25);
                notifier.notify(&format!(
                    "STOPPING=1\nEXTEND_TIMEOUT_USEC={}\nSTATUS=stopping: draining {} upstream",
                    extend.as_micros(),
                    count(queue.counts().pending, "queued call")
                ));
                continue;
            }
        }
        if watchdog.is_some() {
            notifier.notify("WATCHDOG=1");
        }
        if !stopping && last_status.elapsed() >= STATUS_EVERY {
            last_status = tokio::time::Instant::now();
            notifier.notify(&format!("STATUS={}", status_line(&queue)));
        }
        summary.log_when_due(&queue);
    }
}

/// How often deliveries are summed up in the log.
const SUMMARY_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// The periodic INFO line on deliveries: calls delivered since the last one, queue depth,
/// the oldest call's age.
struct DeliverySummary {
    at: tokio::time::Instant,
    delivered: u64,
}

impl DeliverySummary {
    fn new(queue: &Queue) -> DeliverySummary {
        DeliverySummary {
            at: tokio::time::Instant::now(),
            delivered: queue.counts().delivered,
        }
    }

    fn log_when_due(&mut self, queue: &Queue) {
        if self.at.elapsed() < SUMMARY_EVERY {
            return;
        }
        let counts = queue.counts();
        let delivered = counts.delivered.saturating_sub(self.delivered);
        if delivered > 0 {
            let oldest = queue
                .oldest_received_ms()
                .ok()
                .flatten()
                .map(|received| {
                    let now = clock::unix_ms(std::time::SystemTime::now());
                    format!(
                        ", the oldest waiting {}",
                        duration(now.saturating_sub(received))
                    )
                })
                .unwrap_or_default();
            tracing::info!(
                "delivered {} in the last {}; {} queued ({} stored){oldest}",
                count(delivered, "call"),
                duration(self.at.elapsed().as_millis() as u64),
                count(counts.pending, "call"),
                bytes(queue.stored_bytes())
            );
        }
        *self = DeliverySummary {
            at: tokio::time::Instant::now(),
            delivered: counts.delivered,
        };
    }
}
