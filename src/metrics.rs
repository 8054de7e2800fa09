//! Metrics: what `GET /metrics` serves, in Prometheus' text format (`prometheus-client`).
//!
//! One process-wide set, like the default registry of every Prometheus client: the places
//! that count (ingest, the queue, the forwarder, the upstream client) reach it through
//! [`metrics()`] rather than each holding a handle. Counters start at zero with the process;
//! the queue's lifetime totals, which survive restarts, are at `GET /stats`. No label ever
//! holds a writeKey.

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route (`/v1/batch`, `/v1/group`, ..., `other`), never the raw path.
    pub path: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    /// `2xx`, `4xx`, `5xx`, ... or `error` (no answer: a network error or a timeout).
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

pub struct Metrics {
    registry: Registry,
    pub calls_accepted: Counter,
    pub calls_rejected: Family<CodeLabel, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub ingest_seconds: Histogram,
    pub queue_calls: Gauge,
    pub queue_bytes: Gauge,
    pub queue_oldest_age_seconds: FloatGauge,
    pub flush_seconds: Histogram,
    pub batches_sent: Counter,
    pub upstream_responses: Family<ClassLabel, Counter>,
    pub calls_delivered: Counter,
    pub retries: Counter,
    pub dead_letters: Family<ReasonLabel, Counter>,
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Metrics {
        // 50 µs to about 1.6 s: a request answered from the page cache up to a slow fsync.
        let latency = || Histogram::new(exponential_buckets(0.00005, 2.0, 16));
        let metrics = Metrics {
            registry: Registry::default(),
            calls_accepted: Counter::default(),
            calls_rejected: Family::default(),
            requests: Family::default(),
            ingest_seconds: latency(),
            queue_calls: Gauge::default(),
            queue_bytes: Gauge::default(),
            queue_oldest_age_seconds: FloatGauge::default(),
            flush_seconds: latency(),
            batches_sent: Counter::default(),
            upstream_responses: Family::default(),
            calls_delivered: Counter::default(),
            retries: Counter::default(),
            dead_letters: Family::default(),
        };
        let mut registry = Registry::with_prefix("grouprelay");
        metrics.register_ingest(&mut registry);
        metrics.register_queue(&mut registry);
        metrics.register_delivery(&mut registry);
        Metrics {
            registry,
            ..metrics
        }
    }

    /// What the call path counts.
    fn register_ingest(&self, registry: &mut Registry) {
        registry.register(
            "calls_accepted",
            "Calls queued (answered 200)",
            self.calls_accepted.clone(),
        );
        registry.register(
            "calls_rejected",
            "Calls refused at ingest, by code (a refused request counts once)",
            self.calls_rejected.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests, by route and status",
            self.requests.clone(),
        );
        registry.register(
            "ingest_duration_seconds",
            "Time from a call request's arrival to its answer",
            self.ingest_seconds.clone(),
        );
    }

    /// The queue's gauges and flushes.
    fn register_queue(&self, registry: &mut Registry) {
        registry.register(
            "queue_calls",
            "Calls waiting in the queue",
            self.queue_calls.clone(),
        );
        registry.register(
            "queue_stored_bytes",
            "Bytes counted against --max-queue-bytes",
            self.queue_bytes.clone(),
        );
        registry.register(
            "queue_oldest_call_age_seconds",
            "Age of the oldest call waiting in the queue (0 when empty)",
            self.queue_oldest_age_seconds.clone(),
        );
        registry.register(
            "queue_flush_duration_seconds",
            "Time of one queue flush (sled flush and fdatasync)",
            self.flush_seconds.clone(),
        );
    }

    /// What the forwarder counts.
    fn register_delivery(&self, registry: &mut Registry) {
        registry.register(
            "upstream_batches",
            "Batches sent upstream, retries included",
            self.batches_sent.clone(),
        );
        registry.register(
            "upstream_responses",
            "Upstream answers, by status class (error: none came)",
            self.upstream_responses.clone(),
        );
        registry.register(
            "calls_delivered",
            "Calls upstream accepted",
            self.calls_delivered.clone(),
        );
        registry.register(
            "upstream_retries",
            "Batches to be sent again after a failure",
            self.retries.clone(),
        );
        registry.register(
            "dead_letters",
            "Calls moved to the dead-letter store, by reason",
            self.dead_letters.clone(),
        );
    }

    /// The text exposition, after `refresh` has set the gauges read at scrape time.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// `2xx`, `4xx`, ... for a status code.
pub fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}
