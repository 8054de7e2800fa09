//! How forwarding behaves: its settings with their defaults, and upstream's batch limits.

use std::time::Duration;

/// Upstream refuses request bodies of 500 KB and more.
pub const MAX_BATCH_BYTES: usize = 500 * 1000;
/// Upstream takes at most this many calls per batch (it drops the rest silently).
pub const MAX_BATCH_EVENTS: usize = 2_500;
/// How forwarding behaves; see the README for each setting.
#[derive(Debug, Clone)]
pub struct ForwardSettings {
    pub max_batch_events: usize,
    pub flush_interval: Duration,
    pub concurrency: usize,
    pub retry_max_interval: Duration,
    pub max_age: Duration,
    pub drain_timeout: Duration,
}

/// Most calls in one upstream batch.
pub const DEFAULT_MAX_BATCH_EVENTS: usize = 500;
/// How long a partial batch may wait.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(500);
/// Upstream batches in flight at once.
pub const DEFAULT_CONCURRENCY: usize = 2;
/// Longest wait between retries.
pub const DEFAULT_RETRY_MAX_INTERVAL: Duration = Duration::from_secs(60);
/// Calls older than this are dead-lettered as expired: 7 days.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 86_400);
/// On shutdown, how long to keep delivering.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

impl Default for ForwardSettings {
    fn default() -> ForwardSettings {
        ForwardSettings {
            max_batch_events: DEFAULT_MAX_BATCH_EVENTS,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            concurrency: DEFAULT_CONCURRENCY,
            retry_max_interval: DEFAULT_RETRY_MAX_INTERVAL,
            max_age: DEFAULT_MAX_AGE,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }
}
