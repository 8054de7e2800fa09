//! A request body read whole within its limit, with `Content-Encoding: gzip` decoded
//! without inflating past the limit.

use std::io::Read;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
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

/// Reads the whole body, at most `limit` bytes after decoding.
pub async fn read(req: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
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
    let encoding = encoding(req.headers().get(CONTENT_ENCODING))?;
    let collected =
        tokio::time::timeout(BODY_TIMEOUT, Limited::new(req.into_body(), limit).collect())
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
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
        Err(e) => {
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
