//! The Segment call's types and limits: call types, endpoints, violations, a parsed body.

use std::fmt;

/// Largest serialized call upstream accepts (`http-api.md`, "Sizes").
pub const MAX_CALL_BYTES: usize = 32 * 1024;
/// Most calls one request may carry. No official client sends more than 250; upstream takes
/// at most 2,500 per batch.
pub const MAX_CALLS_PER_REQUEST: usize = 2_500;
/// `messageId` must be shorter than this many characters.
pub(super) const MAX_MESSAGE_ID_CHARS: usize = 100;
/// Deepest nesting of JSON objects and arrays in a call (the call's own braces count as one).
/// The spec sets no limit; calls nest a few levels (the call, its traits or context, their
/// values), and a call nested thousands deep is an attack on whoever parses it next
/// (upstream, or an operator's tools reading the dead letters), not data.
pub const MAX_JSON_DEPTH: usize = 64;

/// The six Segment call types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallType {
    Identify,
    Track,
    Page,
    Screen,
    Group,
    Alias,
}

impl CallType {
    pub fn from_name(name: &str) -> Option<CallType> {
        Some(match name {
            "identify" => CallType::Identify,
            "track" => CallType::Track,
            "page" => CallType::Page,
            "screen" => CallType::Screen,
            "group" => CallType::Group,
            "alias" => CallType::Alias,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CallType::Identify => "identify",
            CallType::Track => "track",
            CallType::Page => "page",
            CallType::Screen => "screen",
            CallType::Group => "group",
            CallType::Alias => "alias",
        }
    }
}

/// What kind of body a path takes: a batch (`/v1/batch`, `/v1/import`, `/v1/b`) or one call
/// whose type the path names (`/v1/group`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Batch,
    Single(CallType),
}

impl Endpoint {
    /// The endpoint for the last path segment after `/v1/`.
    pub fn from_name(name: &str) -> Option<Endpoint> {
        match name {
            "batch" | "import" | "b" => Some(Endpoint::Batch),
            other => CallType::from_name(other).map(Endpoint::Single),
        }
    }
}

/// Why a call, or a whole body, breaks the spec: a stable machine-readable `code` and a
/// message for a human that names the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub code: &'static str,
    pub message: String,
}

impl Violation {
    pub(super) fn new(code: &'static str, message: impl Into<String>) -> Violation {
        Violation {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// A call refused inside an otherwise good batch. It is kept, with its reason, in the
/// queue's rejected store: never dropped silently.
#[derive(Debug, Clone)]
pub struct RejectedCall {
    /// Position in the request's `batch` array (0 for a single-call path).
    pub index: usize,
    pub violation: Violation,
    /// The call as the client sent it.
    pub raw: Vec<u8>,
}

/// A parsed, normalised request body.
#[derive(Debug, Default)]
pub struct Body {
    /// The body's own `writeKey`, when it has one (used only when no Basic auth came).
    pub write_key: Option<String>,
    /// Normalised calls, ready to queue, in request order.
    pub calls: Vec<Vec<u8>>,
    /// Calls that break the spec (batches only: a single-call path refuses the body).
    pub rejected: Vec<RejectedCall>,
}

/// Per-request facts normalising needs.
pub struct Receipt<'a> {
    /// The time of receipt, RFC 3339 with milliseconds, stamped on calls without `timestamp`.
    pub timestamp: &'a str,
    /// Makes a `messageId` for calls that have none.
    pub new_message_id: &'a mut dyn FnMut() -> String,
}
