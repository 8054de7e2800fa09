//! A request body read whole within its limit, with `Content-Encoding: gzip` decoded
//! without inflating past the limit.

use std::io::Read;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_ENCODING, CONTENT_LENGTH};
use hyper::{Request, StatusCode};

use super::answer::ApiError;

/// How long a client may take to send its body once the headers are in.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// How the body is encoded.
enum Encoding {
    Identity,
    Gzip,
}

/// Most bytes of a refused request's body read and thrown away before the answer.
const MAX_DRAIN_BYTES: u64 = 32 << 20;
/// Longest time spent throwing a refused request's body away.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the whole body, at most `limit` bytes after decoding. A body refused for its size
/// or encoding is read to its end (within bounds) before the refusal is returned: see
/// [`drain`].
pub async fn read(req: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is over {limit} bytes"),
        )
    };
    let declared = declared_length(&req);
    let continues = expects_continue(&req);
    let encoding = match encoding(req.headers().get(CONTENT_ENCODING)) {
        Ok(encoding) => encoding,
        Err(refusal) => {
            drain(req.into_body(), declared, continues).await;
            return Err(refusal);
        }
    };
    let mut body = req.into_body();
    if declared.is_some_and(|n| n > limit as u64) {
        drain(body, declared, continues).await;
        return Err(too_large());
    }
    let collected = tokio::time::timeout(BODY_TIMEOUT, collect_within(&mut body, limit))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the body did not arrive within {} s",
                    BODY_TIMEOUT.as_secs()
                ),
            )
        })?;
    let bytes = match collected {
        Ok(bytes) => bytes,
        Err(Collect::TooLarge) => {
            // Reading has begun: the client was told to continue, whatever it expected.
            drain(body, None, false).await;
            return Err(too_large());
        }
        Err(Collect::Failed(e)) => {
            return Err(ApiError::new(
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
            Err(Inflate::Invalid(e)) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_gzip",
                format!("the gzip body could not be decoded: {e}"),
            )),
        },
    }
}

/// Why a body was not collected.
enum Collect {
    /// It is longer than the limit; what is left of it is still unread.
    TooLarge,
    Failed(hyper::Error),
}

/// The body's frames, joined, as long as they stay within `limit` bytes.
async fn collect_within(body: &mut Incoming, limit: usize) -> Result<Bytes, Collect> {
    let mut frames: Vec<Bytes> = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(Collect::Failed)?.into_data() else {
            continue;
        };
        total += data.len();
        if total > limit {
            return Err(Collect::TooLarge);
        }
        frames.push(data);
    }
    Ok(match frames.len() {
        // One frame, the common case for a small body: no copy.
        1 => frames.pop().unwrap_or_default(),
        _ => Bytes::from(frames.concat()),
    })
}

/// Reads and throws away what is left of a refused request's body, at most
/// [`MAX_DRAIN_BYTES`] for at most [`DRAIN_TIMEOUT`]. A client that writes its whole request
/// before it reads the answer (Python's `http.client` and `requests`, among others) would
/// otherwise have its connection reset under the body it is still sending, and never see
/// the answer. A body declared longer than the bound is not read at all.
async fn drain(mut body: Incoming, declared: Option<u64>, expects_continue: bool) {
    // A client that asked `Expect: 100-continue` waits for leave to send its body: reading it
    // would give that leave (hyper answers 100 on the first read), inviting an upload only to
    // refuse it. Unread, the client gets the refusal at once and sends nothing.
    if expects_continue || body.is_end_stream() || declared.is_some_and(|n| n > MAX_DRAIN_BYTES) {
        return;
    }
    let discard = async {
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |data| data.len() as u64);
            if seen > MAX_DRAIN_BYTES {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, discard).await;
}

/// Throws away the body of a request refused before its body was read (see [`drain`]).
pub async fn discard(req: Request<Incoming>) {
    let declared = declared_length(&req);
    let expects_continue = expects_continue(&req);
    drain(req.into_body(), declared, expects_continue).await;
}

/// Whether the client waits for `100 Continue` before it sends the body.
fn expects_continue(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(hyper::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// The body's length as the client declared it (`Content-Length`), if it did.
fn declared_length(req: &Request<Incoming>) -> Option<u64> {
    req.headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// `identity` (or none) and `gzip` are taken; anything else is refused.
fn encoding(header: Option<&HeaderValue>) -> Result<Encoding, ApiError> {
    match header.map(HeaderValue::to_str) {
        None => Ok(Encoding::Identity),
        Some(Ok(v)) if v.trim().eq_ignore_ascii_case("identity") => Ok(Encoding::Identity),
        Some(Ok(v)) if matches!(v.trim().to_ascii_lowercase().as_str(), "gzip" | "x-gzip") => {
            Ok(Encoding::Gzip)
        }
        Some(v) => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_encoding",
            format!(
                "Content-Encoding {:?} is not supported; send gzip or nothing",
                v.unwrap_or("?")
            ),
        )),
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
