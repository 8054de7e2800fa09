//! Every JSON answer the API gives, and the one shape of its errors.
//!
//! A refusal is `{"success":false,"code":...,"message":...}` with the status the official
//! clients treat correctly (`docs/http-api.md`, "Responses"): each retries 429 and 5xx and
//! drops other 4xx, and each reads a JSON body if it reads one at all.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};
use serde::Serialize;

/// What every handler answers.
pub type Answer = Response<Full<Bytes>>;

/// What a 429 asks the client to wait, in seconds.
pub const RETRY_AFTER_SECS: u64 = 5;

/// A request that cannot be done as asked: its status, a stable code, and a message for
/// people.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    success: bool,
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// The JSON error answer; a 429 also says when to retry.
    pub fn answer(&self) -> Answer {
        let mut response = json(
            self.status,
            &ErrorBody {
                success: false,
                code: self.code,
                message: &self.message,
            },
        );
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}

/// `body` as JSON with `status`.
pub fn json(status: StatusCode, body: &impl Serialize) -> Answer {
    match serde_json::to_vec(body) {
        Ok(bytes) => json_bytes(status, bytes),
        Err(e) => json_bytes(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({"success": false, "code": "internal", "message": e.to_string()})
                .to_string(),
        ),
    }
}

/// JSON already serialised.
pub fn json_bytes(status: StatusCode, body: impl Into<Bytes>) -> Answer {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// 405, naming the method the endpoint takes.
pub fn method_not_allowed(allowed: &'static str) -> Answer {
    let mut response = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("this endpoint takes {allowed}"),
    )
    .answer();
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allowed));
    response
}
