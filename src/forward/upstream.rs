//! The upstream client: one `POST {upstream}/v1/batch` per batch, and what its answer means.
//!
//! Follows `docs/http-api.md` ("Upstream: how to forward"): Basic auth with the
//! batch's writeKey, `sentAt` set at each attempt, optional gzip, and a status table that
//! says which answers are retried and which are final.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{
    HeaderValue, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, PROXY_AUTHORIZATION, RETRY_AFTER,
    USER_AGENT,
};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::connect::{self, UpstreamConnector};
use super::proxy::{Proxy, ProxySetting};
use crate::clock;

/// What upstream's answer means for the batch.
#[derive(Debug)]
pub enum Outcome {
    /// 2xx: upstream has the calls.
    Delivered,
    /// Worth trying again: a network error, a timeout, 408, 410, 429, 460, most 5xx.
    Retry {
        cause: String,
        /// What upstream asked for (`Retry-After`, `X-RateLimit-Reset`), uncapped.
        after: Option<Duration>,
    },
    /// Final: upstream will never take this batch as it is.
    Refused { status: u16, response: String },
}

/// Most of upstream's answer kept with a dead letter.
const RESPONSE_SNIPPET_BYTES: usize = 1024;

/// Where and how batches are sent.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// The Segment API's base URL, without a trailing `/`.
    pub url: String,
    /// Whether request bodies are gzipped.
    pub gzip: bool,
    /// How long one request may take.
    pub timeout: Duration,
    /// The egress proxy, if any.
    pub proxy: ProxySetting,
    /// PEM certificates trusted beside the system's roots.
    pub ca_file: Option<PathBuf>,
}

/// Segment's API.
pub const DEFAULT_URL: &str = "https://api.segment.io";
/// How long one upstream request may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for UpstreamSettings {
    fn default() -> UpstreamSettings {
        UpstreamSettings {
            url: DEFAULT_URL.to_owned(),
            gzip: true,
            timeout: DEFAULT_TIMEOUT,
            proxy: ProxySetting::default(),
            ca_file: None,
        }
    }
}

/// Sends batches to one upstream base URL.
#[derive(Clone)]
pub struct Upstream {
    client: Client<UpstreamConnector, Full<Bytes>>,
    batch_url: hyper::Uri,
    gzip: bool,
    timeout: Duration,
    user_agent: HeaderValue,
    /// The proxy in use, as logs and status show it.
    proxy_shown: Option<String>,
    /// For an `http` upstream through a proxy: requests go to the proxy in absolute form,
    /// with its credentials; and its own refusals (407, 403) are told from upstream's.
    absolute_form_proxy: Option<Option<HeaderValue>>,
}

impl Upstream {
    /// A client for `settings.url` (`https://api.segment.io`), through the proxy the
    /// settings and the environment choose, trusting the system's root certificates and
    /// `settings.ca_file`.
    pub fn new(settings: &UpstreamSettings) -> Result<Upstream, String> {
        let batch_url: hyper::Uri = format!("{}/v1/batch", settings.url.trim_end_matches('/'))
            .parse()
            .map_err(|e| format!("upstream URL: {e}"))?;
        let https = batch_url.scheme_str() == Some("https");
        let proxy = settings.proxy.resolve(&batch_url)?;
        let connector = connect::connector(proxy.as_ref(), settings.ca_file.as_deref(), https)?;
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Upstream {
            client,
            batch_url,
            gzip: settings.gzip,
            timeout: settings.timeout,
            user_agent: HeaderValue::from_static(concat!("grouprelay/", env!("CARGO_PKG_VERSION"))),
            proxy_shown: proxy.as_ref().map(Proxy::shown),
            absolute_form_proxy: proxy.filter(|_| !https).map(|p| p.authorization),
        })
    }

    /// How long one request may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The proxy in use (`http://host:port`, never its credentials), if any.
    pub fn proxy(&self) -> Option<&str> {
        self.proxy_shown.as_deref()
    }

    /// Sends one batch. `calls` are the queued calls' JSON bytes, in order.
    pub async fn send(&self, write_key: &str, calls: &[&[u8]]) -> Outcome {
        let body = batch_body(calls, SystemTime::now());
        let body = if self.gzip {
            // A few milliseconds of CPU per large batch: off the async workers, so ingest
            // latency does not wait behind it.
            tokio::task::spawn_blocking(move || gzip(&body))
                .await
                .expect("gzip task")
        } else {
            body
        };
        let credentials = base64::engine::general_purpose::STANDARD.encode(format!("{write_key}:"));
        let mut request = Request::post(self.batch_url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, self.user_agent.clone());
        if let Ok(auth) = HeaderValue::from_str(&format!("Basic {credentials}")) {
            request = request.header(AUTHORIZATION, auth);
        }
        if self.gzip {
            request = request.header(CONTENT_ENCODING, "gzip");
        }
        if let Some(Some(authorization)) = &self.absolute_form_proxy {
            request = request.header(PROXY_AUTHORIZATION, authorization.clone());
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .expect("a valid request");
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| failure_cause(&e))?;
            let status = response.status();
            let after = wait_hint(status, response.headers(), SystemTime::now());
            let body = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok::<_, String>((status, after, body))
        };
        let metrics = crate::metrics::metrics();
        metrics.batches_sent.inc();
        let answered = tokio::time::timeout(self.timeout, exchange).await;
        let class = match &answered {
            Ok(Ok((status, _, _))) => crate::metrics::status_class(status.as_u16()),
            _ => "error",
        };
        metrics
            .upstream_responses
            .get_or_create(&crate::metrics::ClassLabel { class })
            .inc();
        match answered {
            Err(_) => Outcome::Retry {
                cause: format!("no answer within {} ms", self.timeout.as_millis()),
                after: None,
            },
            Ok(Err(cause)) => Outcome::Retry { cause, after: None },
            Ok(Ok((status, after, body))) => match self.proxy_refusal(status, &body) {
                Some(cause) => Outcome::Retry { cause, after },
                None => classify(status, after, &body),
            },
        }
    }

    /// Through a proxy in absolute form, the proxy's own refusals come back as answers:
    /// 407 (it wants credentials) always, and a 403 that is not upstream's JSON. They are
    /// failures to reach upstream, retried, never a verdict on the calls.
    fn proxy_refusal(&self, status: StatusCode, body: &[u8]) -> Option<String> {
        self.absolute_form_proxy.as_ref()?;
        let proxy = self.proxy_shown.as_deref().unwrap_or("?");
        let from_proxy = status == StatusCode::PROXY_AUTHENTICATION_REQUIRED
            || (status == StatusCode::FORBIDDEN
                && serde_json::from_slice::<serde_json::Value>(body).is_err());
        from_proxy.then(|| format!("the proxy {proxy} refused the request: {status}"))
    }
}

/// Why a request got no answer, on one line; a certificate upstream's TLS is not trusted
/// with says so first.
fn failure_cause(error: &hyper_util::client::legacy::Error) -> String {
    let chain = connect::error_chain(error);
    if chain.contains("certificate") {
        format!("upstream's TLS certificate is not trusted (see --upstream-ca-file): {chain}")
    } else {
        chain
    }
}

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    encoder
        .write_all(body)
        .and_then(|_| encoder.finish())
        .expect("gzip into a Vec cannot fail")
}

/// `{"batch":[...],"sentAt":"..."}` from the calls' bytes, without re-serializing them.
pub fn batch_body(calls: &[&[u8]], now: SystemTime) -> Vec<u8> {
    let size: usize = calls.iter().map(|c| c.len() + 1).sum();
    let mut body = Vec::with_capacity(size + BATCH_ENVELOPE_BYTES);
    body.extend_from_slice(b"{\"batch\":[");
    for (i, call) in calls.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(call);
    }
    body.extend_from_slice(b"],\"sentAt\":\"");
    body.extend_from_slice(clock::rfc3339_millis(now).as_bytes());
    body.extend_from_slice(b"\"}");
    body
}

/// Bytes of a batch body beside its calls and their commas.
pub const BATCH_ENVELOPE_BYTES: usize = 64;

fn classify(status: StatusCode, after: Option<Duration>, body: &[u8]) -> Outcome {
    let code = status.as_u16();
    let retry = match code {
        200..=299 => return Outcome::Delivered,
        408 | 410 | 429 | 460 => true,
        501 | 505 => false,
        500..=599 => true,
        400..=499 => false,
        // 1xx and 3xx: not an answer about the calls (a redirect is not followed); keep them.
        _ => true,
    };
    if retry {
        Outcome::Retry {
            cause: format!("upstream answered {status}"),
            after,
        }
    } else {
        let end = body.len().min(RESPONSE_SNIPPET_BYTES);
        Outcome::Refused {
            status: code,
            response: String::from_utf8_lossy(&body[..end]).into_owned(),
        }
    }
}

/// How long upstream asked us to wait: `Retry-After` (seconds or an HTTP date), else, on a
/// 429, `X-RateLimit-Reset` (seconds to wait, or a Unix time in seconds).
fn wait_hint(status: StatusCode, headers: &hyper::HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(value) = text(RETRY_AFTER.as_str()) {
        if let Ok(secs) = value.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        if let Ok(at) = httpdate::parse_http_date(value) {
            return Some(at.duration_since(now).unwrap_or(Duration::ZERO));
        }
    }
    if status != StatusCode::TOO_MANY_REQUESTS {
        return None;
    }
    let reset = text("x-ratelimit-reset")?.parse::<u64>().ok()?;
    // Large values are an epoch time rather than a delay.
    if reset > 1_000_000_000 {
        let at = std::time::UNIX_EPOCH + Duration::from_secs(reset);
        return Some(at.duration_since(now).unwrap_or(Duration::ZERO));
    }
    Some(Duration::from_secs(reset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_per_the_spec() {
        let retried = [408, 410, 429, 460, 500, 502, 503, 504, 599];
        let refused = [400, 401, 403, 404, 413, 422, 418, 501, 505];
        for code in retried {
            let status = StatusCode::from_u16(code).unwrap();
            assert!(
                matches!(classify(status, None, b""), Outcome::Retry { .. }),
                "{code}"
            );
        }
        for code in refused {
            let status = StatusCode::from_u16(code).unwrap();
            assert!(
                matches!(classify(status, None, b""), Outcome::Refused { .. }),
                "{code}"
            );
        }
        assert!(matches!(
            classify(StatusCode::OK, None, b""),
            Outcome::Delivered
        ));
    }

    #[test]
    fn wait_hints_read_seconds_dates_and_rate_limit_resets() {
        let now = SystemTime::now();
        let mut headers = hyper::HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        let hint = |h: &hyper::HeaderMap| wait_hint(StatusCode::TOO_MANY_REQUESTS, h, now);
        assert_eq!(hint(&headers), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        let dated = hint(&headers).unwrap();
        assert!(dated <= Duration::from_secs(30) && dated >= Duration::from_secs(28));
        headers.clear();
        headers.insert("x-ratelimit-reset", HeaderValue::from_static("3"));
        assert_eq!(hint(&headers), Some(Duration::from_secs(3)));
        // A rate-limit reset means nothing on other statuses.
        assert_eq!(
            wait_hint(StatusCode::SERVICE_UNAVAILABLE, &headers, now),
            None
        );
    }

    #[test]
    fn the_batch_body_keeps_calls_byte_for_byte() {
        let body = batch_body(&[br#"{"a":1}"#, br#"{"b":null}"#], std::time::UNIX_EPOCH);
        assert_eq!(
            body,
            br#"{"batch":[{"a":1},{"b":null}],"sentAt":"1970-01-01T00:00:00.000Z"}"#
        );
    }
}
