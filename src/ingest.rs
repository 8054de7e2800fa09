//! Ingest: the HTTP side of grouprelay, as Segment's Tracking API looks to its clients.
//!
//! One request's way: route it, take the writeKey from Basic auth, read the body within its
//! limit (decoding gzip without inflating past the limit), hand it to [`crate::spec`], append
//! the calls to the [`Queue`], and only then answer `200 {"success":true}`. Every refusal is a
//! JSON body `{"success":false,"code":...,"message":...}` with the status the official
//! clients treat correctly (`docs/http-api.md`, "Responses").

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::io::Read;
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderValue, ALLOW, AUTHORIZATION, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE,
    RETRY_AFTER,
};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;

use crate::admin::Admin;
use crate::clock;
use crate::forward::UpstreamHealth;
use crate::metrics::{metrics, CodeLabel, RequestLabels};
use crate::queue::{Queue, QueueError};
use crate::spec::{self, Endpoint, Receipt};

/// How long a client may take to send its body once the headers are in.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// What a 429 asks the client to wait, in seconds.
const RETRY_AFTER_SECS: u64 = 5;
/// Most bytes of request headers (names and values); real clients send well under 1 KiB.
const MAX_HEADER_BYTES: usize = 32 * 1024;
/// Longest writeKey accepted; real keys are about 32 characters.
const MAX_WRITE_KEY_BYTES: usize = 1024;

/// Largest request body after gzip decoding: 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

/// Which writeKeys are taken, and how large a body.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    /// For requests that carry none (never logged).
    pub write_key: Option<String>,
    /// `None`: any writeKey.
    pub allowed_write_keys: Option<HashSet<String>>,
    /// After gzip decoding.
    pub max_body_bytes: usize,
}

impl Default for IngestSettings {
    fn default() -> IngestSettings {
        IngestSettings {
            write_key: None,
            allowed_write_keys: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

/// The request handler, shared by every connection.
pub struct Ingest {
    queue: Queue,
    admin: Admin,
    settings: IngestSettings,
}

/// A refused request: its status and the JSON error body.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code,
            message: message.into(),
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    success: bool,
    code: &'a str,
    message: &'a str,
}

#[derive(Serialize)]
struct AcceptedBody<'a> {
    success: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    rejected: Vec<RejectedItem<'a>>,
}

#[derive(Serialize)]
struct RejectedItem<'a> {
    index: usize,
    code: &'a str,
    message: &'a str,
}

/// `GET /stats`: every call's fate, from the queue's durable counters.
#[derive(Serialize)]
struct StatsBody {
    accepted: u64,
    delivered: u64,
    dead: BTreeMap<String, u64>,
    dead_total: u64,
    pending: u64,
    rejected: u64,
    stored_bytes: u64,
}

/// What a path is for.
enum Route {
    Admin,
    Health,
    Ready,
    Stats,
    Metrics,
    Calls(Endpoint),
    NotFound,
}

impl Ingest {
    pub fn new(
        queue: Queue,
        settings: IngestSettings,
        upstream: tokio::sync::watch::Receiver<UpstreamHealth>,
    ) -> Ingest {
        Ingest {
            admin: Admin::new(queue.clone(), upstream),
            queue,
            settings,
        }
    }

    /// Answers one request. Never fails: every error becomes a JSON response.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let started = std::time::Instant::now();
        let route = route(req.uri().path());
        let label = route.label();
        let is_call = matches!(route, Route::Calls(_));
        let response = self.answer(route, req).await;
        let metrics = metrics();
        metrics
            .requests
            .get_or_create(&RequestLabels {
                path: label,
                status: response.status().as_u16(),
            })
            .inc();
        if is_call {
            metrics
                .ingest_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        Ok(response)
    }

    async fn answer(&self, route: Route, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let header_bytes: usize = req
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        if header_bytes > MAX_HEADER_BYTES {
            return refuse(Refusal::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                format!("the request headers take {header_bytes} bytes; at most {MAX_HEADER_BYTES} are accepted"),
            ));
        }
        match (route, req.method()) {
            (Route::Admin, _) => self.admin.handle(req).await,
            (Route::Health, &Method::GET | &Method::HEAD) => {
                json(StatusCode::OK, br#"{"status":"ok"}"#.to_vec())
            }
            (Route::Stats, &Method::GET | &Method::HEAD) => self.stats(),
            (Route::Metrics, &Method::GET | &Method::HEAD) => self.metrics(),
            (Route::Ready, &Method::GET | &Method::HEAD) => match self.queue.readiness() {
                Ok(()) => json(StatusCode::OK, br#"{"status":"ready"}"#.to_vec()),
                Err(reason) => json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::to_vec(
                        &serde_json::json!({"status": "not_ready", "reason": reason}),
                    )
                    .expect("serialize"),
                ),
            },
            (Route::Calls(endpoint), &Method::POST) => match self.ingest(endpoint, req).await {
                Ok(response) => response,
                Err(refusal) => {
                    metrics()
                        .calls_rejected
                        .get_or_create(&CodeLabel { code: refusal.code })
                        .inc();
                    refuse(refusal)
                }
            },
            (Route::Health | Route::Ready | Route::Stats | Route::Metrics, _) => {
                method_not_allowed("GET")
            }
            (Route::Calls(_), _) => method_not_allowed("POST"),
            (Route::NotFound, _) => refuse(Refusal::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no such endpoint: {}", req.uri().path()),
            )),
        }
    }

    /// The Prometheus exposition, with the queue's gauges read now.
    fn metrics(&self) -> Response<Full<Bytes>> {
        let metrics = metrics();
        let counts = self.queue.counts();
        metrics
            .queue_calls
            .set(i64::try_from(counts.pending).unwrap_or(i64::MAX));
        metrics
            .queue_bytes
            .set(i64::try_from(self.queue.stored_bytes()).unwrap_or(i64::MAX));
        let now = clock::unix_ms(SystemTime::now());
        let oldest_age = match self.queue.oldest_received_ms() {
            Ok(Some(received)) => now.saturating_sub(received) as f64 / 1000.0,
            _ => 0.0,
        };
        metrics.queue_oldest_age_seconds.set(oldest_age);
        let mut response = Response::new(Full::new(Bytes::from(metrics.encode())));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        response
    }

    fn stats(&self) -> Response<Full<Bytes>> {
        let counts = self.queue.counts();
        let body = StatsBody {
            accepted: counts.accepted,
            delivered: counts.delivered,
            dead_total: counts.dead.values().sum(),
            dead: counts.dead,
            pending: counts.pending,
            rejected: counts.rejected,
            stored_bytes: self.queue.stored_bytes(),
        };
        json(
            StatusCode::OK,
            serde_json::to_vec(&body).expect("stats serialize"),
        )
    }

    async fn ingest(
        &self,
        endpoint: Endpoint,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Refusal> {
        let header_key = basic_auth_write_key(req.headers())?;
        let bytes = self.read_body(req).await?;
        let received = SystemTime::now();
        let timestamp = clock::rfc3339_millis(received);
        let mut new_message_id = || uuid::Uuid::new_v4().to_string();
        let body = spec::parse_body(
            endpoint,
            &bytes,
            &mut Receipt {
                timestamp: &timestamp,
                new_message_id: &mut new_message_id,
            },
        )
        .map_err(|v| Refusal::new(StatusCode::BAD_REQUEST, v.code, v.message))?;
        let write_key = header_key
            .or(body.write_key)
            .or_else(|| self.settings.write_key.clone())
            .ok_or_else(|| {
                Refusal::new(
                    StatusCode::UNAUTHORIZED,
                    "missing_write_key",
                    "no writeKey: send Basic auth, a writeKey in the body, or start grouprelay with --write-key",
                )
            })?;
        if self
            .settings
            .allowed_write_keys
            .as_ref()
            .is_some_and(|allowed| !allowed.contains(&write_key))
        {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "write_key_not_allowed",
                "this writeKey is not in grouprelay's --allowed-write-keys",
            ));
        }
        if write_key.len() > MAX_WRITE_KEY_BYTES {
            return Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                "invalid_write_key",
                format!("the writeKey is longer than {MAX_WRITE_KEY_BYTES} bytes"),
            ));
        }
        for rejected in &body.rejected {
            tracing::debug!(
                index = rejected.index,
                code = rejected.violation.code,
                "call rejected at ingest"
            );
        }
        self.queue
            .append(
                &write_key,
                clock::unix_ms(received),
                &body.calls,
                &body.rejected,
            )
            .await
            .map_err(|e| match e {
                QueueError::Full { .. } => Refusal::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "queue_full",
                    format!("grouprelay's queue is full; retry in {RETRY_AFTER_SECS} s"),
                ),
                QueueError::DiskLow { .. } => {
                    tracing::warn!(error = %e, "refusing calls until disk space returns");
                    Refusal::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "disk_space_low",
                        format!("grouprelay's disk is nearly full; retry in {RETRY_AFTER_SECS} s"),
                    )
                }
                other => {
                    tracing::error!(error = %other, "could not persist calls");
                    Refusal::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "storage_error",
                        "grouprelay could not persist the calls; retry",
                    )
                }
            })?;
        let metrics = metrics();
        metrics.calls_accepted.inc_by(body.calls.len() as u64);
        for rejected in &body.rejected {
            metrics
                .calls_rejected
                .get_or_create(&CodeLabel {
                    code: rejected.violation.code,
                })
                .inc();
        }
        let accepted = AcceptedBody {
            success: true,
            rejected: body
                .rejected
                .iter()
                .map(|r| RejectedItem {
                    index: r.index,
                    code: r.violation.code,
                    message: &r.violation.message,
                })
                .collect(),
        };
        Ok(json(
            StatusCode::OK,
            serde_json::to_vec(&accepted).expect("serializable"),
        ))
    }

    /// Reads the whole body within the limit, decoding `Content-Encoding: gzip`.
    async fn read_body(&self, req: Request<Incoming>) -> Result<Bytes, Refusal> {
        let limit = self.settings.max_body_bytes;
        let too_large = || {
            Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body is over {limit} bytes"),
            )
        };
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let encoding = match req.headers().get(CONTENT_ENCODING).map(HeaderValue::to_str) {
            None => Encoding::Identity,
            Some(Ok(v)) if v.trim().eq_ignore_ascii_case("identity") => Encoding::Identity,
            Some(Ok(v)) if matches!(v.trim().to_ascii_lowercase().as_str(), "gzip" | "x-gzip") => {
                Encoding::Gzip
            }
            Some(v) => {
                return Err(Refusal::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_encoding",
                    format!(
                        "Content-Encoding {:?} is not supported; send gzip or nothing",
                        v.unwrap_or("?")
                    ),
                ))
            }
        };
        let collected =
            tokio::time::timeout(BODY_TIMEOUT, Limited::new(req.into_body(), limit).collect())
                .await
                .map_err(|_| {
                    Refusal::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "body_timeout",
                        format!(
                            "the body did not arrive within {} s",
                            BODY_TIMEOUT.as_secs()
                        ),
                    )
                })?;
        let bytes = match collected {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
            Err(e) => {
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    format!("the body could not be read: {e}"),
                ))
            }
        };
        match encoding {
            Encoding::Identity => Ok(bytes),
            Encoding::Gzip => match inflate_gzip(&bytes, limit) {
                Ok(inflated) => Ok(Bytes::from(inflated)),
                Err(Inflate::TooLarge) => Err(too_large()),
                Err(Inflate::Invalid(e)) => Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_gzip",
                    format!("the gzip body could not be decoded: {e}"),
                )),
            },
        }
    }
}

/// Why a gzip body could not be used.
#[derive(Debug)]
pub enum Inflate {
    /// It inflates past the limit (a bomb is cut off there, never inflated in full).
    TooLarge,
    Invalid(std::io::Error),
}

/// Inflates a (possibly multi-member) gzip body, reading one byte past `limit` to tell "too
/// large" from "exactly the limit".
pub fn inflate_gzip(bytes: &[u8], limit: usize) -> Result<Vec<u8>, Inflate> {
    let mut inflated = Vec::with_capacity(bytes.len().saturating_mul(4).min(limit));
    flate2::read::MultiGzDecoder::new(bytes)
        .take(limit as u64 + 1)
        .read_to_end(&mut inflated)
        .map_err(Inflate::Invalid)?;
    if inflated.len() > limit {
        return Err(Inflate::TooLarge);
    }
    Ok(inflated)
}

enum Encoding {
    Identity,
    Gzip,
}

impl Route {
    /// The route as a metric label: a fixed set, whatever paths clients send.
    fn label(&self) -> &'static str {
        match self {
            Route::Admin => "/admin",
            Route::Health => "/health",
            Route::Ready => "/ready",
            Route::Stats => "/stats",
            Route::Metrics => "/metrics",
            Route::Calls(Endpoint::Batch) => "/v1/batch",
            Route::Calls(Endpoint::Single(t)) => match t {
                spec::CallType::Identify => "/v1/identify",
                spec::CallType::Track => "/v1/track",
                spec::CallType::Page => "/v1/page",
                spec::CallType::Screen => "/v1/screen",
                spec::CallType::Group => "/v1/group",
                spec::CallType::Alias => "/v1/alias",
            },
            Route::NotFound => "other",
        }
    }
}

/// Maps a path to what it is for. Any prefix before `/v1/` is allowed: Node's client lets
/// users set one (e.g. `/relay/v1/batch`).
fn route(path: &str) -> Route {
    match path {
        "/health" => return Route::Health,
        "/stats" => return Route::Stats,
        "/ready" => return Route::Ready,
        "/metrics" => return Route::Metrics,
        _ if path.starts_with("/admin/") => return Route::Admin,
        _ => {}
    }
    let mut segments = path.trim_end_matches('/').rsplit('/');
    match (segments.next(), segments.next()) {
        (Some(name), Some("v1")) => Endpoint::from_name(name)
            .map(Route::Calls)
            .unwrap_or(Route::NotFound),
        _ => Route::NotFound,
    }
}

/// The writeKey from `Authorization: Basic base64(writeKey:)`, the colon optional.
fn basic_auth_write_key(headers: &HeaderMap) -> Result<Option<String>, Refusal> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Ok(None);
    };
    let invalid = |why: &str| {
        Refusal::new(
            StatusCode::UNAUTHORIZED,
            "invalid_authorization",
            format!("the Authorization header {why}; send Basic base64(writeKey:)"),
        )
    };
    let value = value.to_str().map_err(|_| invalid("is not ASCII"))?;
    let (scheme, credentials) = value
        .trim()
        .split_once(' ')
        .ok_or_else(|| invalid("has no credentials"))?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(invalid("is not Basic"));
    }
    let credentials = credentials.trim();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(credentials)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(credentials))
        .map_err(|_| invalid("is not valid base64"))?;
    let decoded = String::from_utf8(decoded).map_err(|_| invalid("is not UTF-8"))?;
    let key = match decoded.split_once(':') {
        Some((user, _password)) => user,
        None => decoded.as_str(),
    };
    Ok((!key.is_empty()).then(|| key.to_owned()))
}

fn json(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn refuse(refusal: Refusal) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&ErrorBody {
        success: false,
        code: refusal.code,
        message: &refusal.message,
    })
    .expect("serializable");
    let mut response = json(refusal.status, body);
    if refusal.status == StatusCode::TOO_MANY_REQUESTS {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    }
    response
}

fn method_not_allowed(allowed: &'static str) -> Response<Full<Bytes>> {
    let mut response = refuse(Refusal::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("this endpoint takes {allowed}"),
    ));
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allowed));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_with_and_without_colon() {
        let mut headers = HeaderMap::new();
        let key = |h: &HeaderMap| basic_auth_write_key(h).map_err(|r| r.code);
        assert_eq!(key(&headers), Ok(None));
        headers.insert(
            AUTHORIZATION,
            HeaderValue::from_static("Basic V1JJVEVLRVlfZ29fdGVzdDo="),
        );
        assert_eq!(key(&headers), Ok(Some("WRITEKEY_go_test".into())));
        headers.insert(AUTHORIZATION, HeaderValue::from_static("basic a2V5"));
        assert_eq!(key(&headers), Ok(Some("key".into())));
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert_eq!(key(&headers), Err("invalid_authorization"));
    }

    #[test]
    fn routes_take_any_prefix_before_v1() {
        assert!(matches!(route("/v1/batch"), Route::Calls(Endpoint::Batch)));
        assert!(matches!(
            route("/relay/v1/import"),
            Route::Calls(Endpoint::Batch)
        ));
        assert!(matches!(
            route("/v1/group"),
            Route::Calls(Endpoint::Single(spec::CallType::Group))
        ));
        assert!(matches!(route("/v2/batch"), Route::NotFound));
        assert!(matches!(route("/v1/nope"), Route::NotFound));
        assert!(matches!(route("/health"), Route::Health));
        assert!(matches!(route("/stats"), Route::Stats));
    }
}
