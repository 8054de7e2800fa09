//! What operators and supervisors read: `/health`, `/ready`, `/stats` and `/metrics`.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};

use super::answer::{json, json_bytes, Answer};
use crate::metrics::metrics;
use crate::queue::Queue;
use crate::status::Status;

/// `GET /health`: the process is up and answering.
pub fn health() -> Answer {
    json_bytes(StatusCode::OK, &br#"{"status":"ok"}"#[..])
}

/// `GET /ready`: 200 while new calls would be taken, else 503 with the reason.
pub fn ready(queue: &Queue) -> Answer {
    match queue.readiness() {
        Ok(()) => json_bytes(StatusCode::OK, &br#"{"status":"ready"}"#[..]),
        Err(reason) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"status": "not_ready", "reason": reason}),
        ),
    }
}

/// `GET /stats`: every call's fate, from the queue's durable counters.
pub fn stats(status: &Status) -> Answer {
    json(StatusCode::OK, &status.stats())
}

/// `GET /metrics`: the Prometheus exposition, with the queue's gauges set from `status`.
pub fn metrics_exposition(status: &Status) -> Answer {
    let metrics = metrics();
    metrics
        .queue_calls
        .set(i64::try_from(status.pending).unwrap_or(i64::MAX));
    metrics
        .queue_bytes
        .set(i64::try_from(status.stored_bytes).unwrap_or(i64::MAX));
    metrics
        .queue_oldest_age_seconds
        .set(status.oldest_call_age_seconds.unwrap_or(0.0));
    let mut response = Response::new(Full::new(Bytes::from(metrics.encode())));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}
