//! The daemon's state in numbers, read in one place for `/stats`, `/metrics`,
//! `/admin/status` and `grouprelay status`.
//!
//! The queue's durable counters say what became of every call; the forwarder's published
//! [`UpstreamHealth`] says how upstream answers. [`Status::read`] takes both at once, so
//! every view of the daemon shows the same numbers.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::clock;
use crate::forward::UpstreamHealth;
use crate::queue::{DeadCause, Queue};

/// What `GET /admin/status` answers and `grouprelay status` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub up: bool,
    pub version: String,
    /// Calls queued, not yet delivered or dead-lettered.
    pub pending: u64,
    /// Bytes of stored records (queued, rejected and dead-lettered calls).
    pub stored_bytes: u64,
    /// How long the oldest queued call has waited; `None` when the queue is empty.
    pub oldest_call_age_seconds: Option<f64>,
    /// Calls ever queued.
    pub accepted: u64,
    pub delivered: u64,
    /// Dead letters by reason.
    pub dead: BTreeMap<String, u64>,
    /// Calls refused at ingest inside accepted batches.
    pub rejected: u64,
    pub upstream: UpstreamStatus,
}

/// What the forwarder last saw of upstream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpstreamStatus {
    /// `healthy` or `backing_off`.
    pub state: String,
    pub backing_off_until_ms: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_at_ms: Option<u64>,
    pub last_delivery_at_ms: Option<u64>,
    /// The egress proxy in use (`http://host:port`, never its credentials), if any.
    #[serde(default)]
    pub proxy: Option<String>,
}

/// `GET /stats`: every call's fate, from the queue's durable counters.
#[derive(Debug, Serialize)]
pub struct Stats {
    pub accepted: u64,
    pub delivered: u64,
    pub dead: BTreeMap<String, u64>,
    pub dead_total: u64,
    pub pending: u64,
    pub rejected: u64,
    pub stored_bytes: u64,
}

impl Status {
    /// The queue's numbers and upstream's state, now.
    pub fn read(queue: &Queue, health: &UpstreamHealth) -> Status {
        let counts = queue.counts();
        let now = clock::unix_ms(SystemTime::now());
        let oldest = queue
            .oldest_received_ms()
            .ok()
            .flatten()
            .map(|received| now.saturating_sub(received) as f64 / 1000.0);
        Status {
            up: true,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pending: counts.pending,
            stored_bytes: queue.stored_bytes(),
            oldest_call_age_seconds: oldest,
            accepted: counts.accepted,
            delivered: counts.delivered,
            dead: counts.dead,
            rejected: counts.rejected,
            upstream: UpstreamStatus::at(health, now),
        }
    }

    /// Dead letters over every reason.
    pub fn dead_total(&self) -> u64 {
        self.dead.values().sum()
    }

    /// The counters alone, as `GET /stats` shows them: every listed dead-letter cause, with
    /// 0 where there is none.
    pub fn stats(&self) -> Stats {
        let mut dead = self.dead.clone();
        for cause in DeadCause::LISTED {
            dead.entry(cause.as_str().to_owned()).or_insert(0);
        }
        Stats {
            accepted: self.accepted,
            delivered: self.delivered,
            dead,
            dead_total: self.dead_total(),
            pending: self.pending,
            rejected: self.rejected,
            stored_bytes: self.stored_bytes,
        }
    }
}

impl UpstreamStatus {
    /// `health` as of `now_ms`: backing off only while the latest retry time is ahead.
    fn at(health: &UpstreamHealth, now_ms: u64) -> UpstreamStatus {
        let backing_off = health.backing_off_until_ms.filter(|&until| until > now_ms);
        UpstreamStatus {
            state: if backing_off.is_some() {
                "backing_off"
            } else {
                "healthy"
            }
            .into(),
            backing_off_until_ms: backing_off,
            last_error: health.last_error.clone(),
            last_error_at_ms: health.last_error_at_ms,
            last_delivery_at_ms: health.last_delivery_at_ms,
            proxy: health.proxy.clone(),
        }
    }
}
