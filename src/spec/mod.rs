//! The Segment call: parse a request body, normalise each call and validate it against the spec.
//!
//! The facts followed here are in `docs/group-call.md` and `docs/http-api.md`.
//! A body is never turned into a `serde_json::Value` tree: each object is read as an ordered
//! list of `(key, raw value)` pairs borrowed from the request bytes, checked by looking at the
//! raw values, and written back only when normalising has to change something. Values we do
//! not touch (traits, unknown keys, `null`s, numbers) therefore reach the queue byte for byte.
//!
//! # Parts
//! | file | what it is |
//! |---|---|
//! | `mod.rs` | the public types and limits; `parse_body`: a body's `writeKey`, a batch's calls |
//! | `normalise.rs` | one call: its type, kept or rewritten, batch objects merged, limits checked |
//! | `validate.rs` | the fields each call type requires; the JSON types of the others |
//! | `pairs.rs` | an object as its ordered `(key, raw value)` pairs; a batch body in one pass |
//! | `value.rs` | a raw value's JSON kind, its presence, its text as a string |
//! | `scan.rs` | the pre-scan of a call's bytes: nesting depth and the range of numbers |
//! | `writer.rs` | a JSON object written from keys and already-serialized values |
//!
//! A part uses only the parts below it in this table, and what `mod.rs` defines.

mod normalise;
mod pairs;
mod scan;
mod validate;
mod value;
mod writer;

use std::fmt;

use serde_json::value::RawValue;

use normalise::{normalise, Shared};
use pairs::{BatchField, BatchTop, Entries};
use validate::object_field;
use value::{kind, Kind};

/// Largest serialized call upstream accepts (`http-api.md`, "Sizes").
pub const MAX_CALL_BYTES: usize = 32 * 1024;
/// Most calls one request may carry. No official client sends more than 250; upstream takes
/// at most 2,500 per batch.
pub const MAX_CALLS_PER_REQUEST: usize = 2_500;
/// `messageId` must be shorter than this many characters.
const MAX_MESSAGE_ID_CHARS: usize = 100;
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
    fn new(code: &'static str, message: impl Into<String>) -> Violation {
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

/// Parses, normalises and validates one request body.
///
/// `Err` refuses the whole body (unparseable JSON, a batch that is not an array, or a bad
/// call on a single-call path); `Ok` may still carry rejected calls of a batch.
pub fn parse_body(
    endpoint: Endpoint,
    bytes: &[u8],
    receipt: &mut Receipt<'_>,
) -> Result<Body, Violation> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| Violation::new("invalid_json", "the body is not valid UTF-8"))?;
    match endpoint {
        Endpoint::Single(call_type) => single_body(text, call_type, receipt),
        Endpoint::Batch => batch_body(text, receipt),
    }
}

/// A single-call path's body: the call itself, which may carry a `writeKey`.
fn single_body(
    text: &str,
    call_type: CallType,
    receipt: &mut Receipt<'_>,
) -> Result<Body, Violation> {
    let top = Entries::parse(text).map_err(not_parsed)?;
    let write_key = write_key(&top)?;
    let call = normalise(&top, Some(call_type), None, receipt)?;
    Ok(Body {
        write_key,
        calls: vec![call],
        rejected: Vec::new(),
    })
}

/// A batch body: its `writeKey`, the `context` and `integrations` its calls share, and its
/// calls, each normalised or rejected on its own.
fn batch_body(text: &str, receipt: &mut Receipt<'_>) -> Result<Body, Violation> {
    // A batch's calls are split out while the body is read: reading `batch` as one raw
    // value and then splitting it would read the whole body twice.
    let BatchTop {
        entries: top,
        batch,
    } = BatchTop::parse(text)
        .or_else(|_| BatchTop::parse_in_two_steps(text))
        .map_err(not_parsed)?;
    let write_key = write_key(&top)?;
    let shared = Shared {
        context: object_field(&top, "context", "invalid_context")?,
        integrations: object_field(&top, "integrations", "invalid_integrations")?,
    };
    let items = batch_calls(batch)?;
    let mut body = Body {
        write_key,
        calls: Vec::with_capacity(items.len()),
        rejected: Vec::new(),
    };
    for (index, item) in items.into_iter().enumerate() {
        match batch_call(index, item, &shared, receipt) {
            Ok(call) => body.calls.push(call),
            Err(violation) => body.rejected.push(RejectedCall {
                index,
                violation,
                raw: item.get().as_bytes().to_vec(),
            }),
        }
    }
    Ok(body)
}

/// The calls in a batch body's `batch`: an array of one to [`MAX_CALLS_PER_REQUEST`] values.
fn batch_calls(batch: Option<BatchField<'_>>) -> Result<Vec<&RawValue>, Violation> {
    let items = match batch {
        None => return Err(Violation::new("missing_batch", "the body has no batch")),
        Some(BatchField::Calls(items)) => items,
        Some(BatchField::NotArray) => {
            return Err(Violation::new(
                "invalid_batch",
                "batch must be an array of calls",
            ))
        }
    };
    if items.is_empty() {
        return Err(Violation::new("empty_batch", "batch has no calls"));
    }
    if items.len() > MAX_CALLS_PER_REQUEST {
        return Err(Violation::new(
            "too_many_calls",
            format!(
                "batch has {} calls; at most {MAX_CALLS_PER_REQUEST} are accepted per request",
                items.len()
            ),
        ));
    }
    Ok(items)
}

/// One call of a batch, normalised with what the batch shares.
fn batch_call(
    index: usize,
    item: &RawValue,
    shared: &Shared<'_>,
    receipt: &mut Receipt<'_>,
) -> Result<Vec<u8>, Violation> {
    match Entries::parse(item.get()) {
        Ok(fields) => normalise(&fields, None, Some(shared), receipt),
        Err(_) => Err(Violation::new(
            "invalid_call",
            format!("batch[{index}] is not a JSON object"),
        )),
    }
}

/// The body's own `writeKey`: `None` when it is absent, `null` or empty.
fn write_key(top: &Entries<'_>) -> Result<Option<String>, Violation> {
    match top.get("writeKey") {
        None => Ok(None),
        Some(raw) => match kind(raw) {
            Kind::Null => Ok(None),
            Kind::String => {
                let key: String = serde_json::from_str(raw.get())
                    .map_err(|_| Violation::new("invalid_write_key", "writeKey is not a string"))?;
                Ok((!key.is_empty()).then_some(key))
            }
            _ => Err(Violation::new(
                "invalid_write_key",
                "writeKey must be a string",
            )),
        },
    }
}

/// Why a body that did not parse is refused: it is not JSON, or it is JSON but not an object.
fn not_parsed(e: serde_json::Error) -> Violation {
    match e.classify() {
        serde_json::error::Category::Data => {
            Violation::new("invalid_body", "the body must be a JSON object")
        }
        _ => Violation::new("invalid_json", format!("the body is not valid JSON: {e}")),
    }
}
