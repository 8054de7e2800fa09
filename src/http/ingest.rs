//! The call path: a Tracking API request's calls, from writeKey and body to the queue, and
//! the 200 that is sent only once they are stored.

use std::collections::HashSet;
use std::time::SystemTime;

use base64::Engine;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, AUTHORIZATION};
use hyper::{Request, StatusCode};
use serde::Serialize;

use super::answer::{json, Answer, ApiError, RETRY_AFTER_SECS};
use super::body;
use crate::clock;
use crate::metrics::{metrics, CodeLabel};
use crate::queue::{Queue, QueueError};
use crate::spec::{self, Body, Endpoint, Receipt};

/// Largest request body after gzip decoding: 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;
/// Longest writeKey accepted; real keys are about 32 characters.
const MAX_WRITE_KEY_BYTES: usize = 1024;

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

/// `200 {"success":true}`, with the calls refused inside an accepted batch, if any.
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

/// Takes calls into the queue.
pub struct Ingest {
    queue: Queue,
    settings: IngestSettings,
}

impl Ingest {
    pub fn new(queue: Queue, settings: IngestSettings) -> Ingest {
        Ingest { queue, settings }
    }

    /// Answers a `POST` to a call endpoint, counting what it accepts and refuses.
    pub async fn handle(&self, endpoint: Endpoint, req: Request<Incoming>) -> Answer {
        match self.take(endpoint, req).await {
            Ok(answer) => answer,
            Err(refusal) => {
                metrics()
                    .calls_rejected
                    .get_or_create(&CodeLabel { code: refusal.code })
                    .inc();
                refusal.answer()
            }
        }
    }

    async fn take(&self, endpoint: Endpoint, req: Request<Incoming>) -> Result<Answer, ApiError> {
        let header_key = match basic_auth_write_key(req.headers()) {
            Ok(key) => key,
            Err(refusal) => {
                body::discard(req).await;
                return Err(refusal);
            }
        };
        let bytes = body::read(req, self.settings.max_body_bytes).await?;
        let received = SystemTime::now();
        let timestamp = clock::rfc3339_millis(received);
        let mut new_message_id = || uuid::Uuid::new_v4().to_string();
        let mut body = spec::parse_body(
            endpoint,
            &bytes,
            &mut Receipt {
                timestamp: &timestamp,
                new_message_id: &mut new_message_id,
            },
        )
        .map_err(|v| ApiError::new(StatusCode::BAD_REQUEST, v.code, v.message))?;
        let write_key = self.write_key(header_key.or_else(|| body.write_key.take()))?;
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
            .map_err(storage_refusal)?;
        Ok(accepted(&body))
    }

    /// The request's writeKey (from Basic auth or the body), else `--write-key`; checked
    /// against `--allowed-write-keys`.
    fn write_key(&self, given: Option<String>) -> Result<String, ApiError> {
        let write_key = given
            .or_else(|| self.settings.write_key.clone())
            .ok_or_else(|| {
                ApiError::new(
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
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "write_key_not_allowed",
                "this writeKey is not in grouprelay's --allowed-write-keys",
            ));
        }
        if write_key.len() > MAX_WRITE_KEY_BYTES {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_write_key",
                format!("the writeKey is longer than {MAX_WRITE_KEY_BYTES} bytes"),
            ));
        }
        Ok(write_key)
    }
}

/// The 200 for stored calls, counted.
fn accepted(body: &Body) -> Answer {
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
    json(
        StatusCode::OK,
        &AcceptedBody {
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
        },
    )
}

/// Why the queue did not take the calls, as the client should see it: 429 (retry later)
/// when it is full or the disk is low, 503 when storage failed.
fn storage_refusal(error: QueueError) -> ApiError {
    match error {
        QueueError::Full { .. } => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "queue_full",
            format!("grouprelay's queue is full; retry in {RETRY_AFTER_SECS} s"),
        ),
        QueueError::DiskLow { .. } => {
            tracing::warn!(error = %error, "refusing calls until disk space returns");
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "disk_space_low",
                format!("grouprelay's disk is nearly full; retry in {RETRY_AFTER_SECS} s"),
            )
        }
        other => {
            tracing::error!(error = %other, "could not persist calls");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_error",
                "grouprelay could not persist the calls; retry",
            )
        }
    }
}

/// The writeKey from `Authorization: Basic base64(writeKey:)`, the colon optional.
fn basic_auth_write_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Ok(None);
    };
    let invalid = |why: &str| {
        ApiError::new(
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

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

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
}
