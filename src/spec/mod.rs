//! The Segment call: parse a request body, normalise each call and validate it against the spec.
//!
//! The facts followed here are in `docs/group-call.md` and `docs/http-api.md`.
//! A body is never turned into a `serde_json::Value` tree: each object is read as an ordered
//! list of `(key, raw value)` pairs borrowed from the request bytes, checked by looking at the
//! raw values, and written back only when normalising has to change something. Values we do
//! not touch (traits, unknown keys, `null`s, numbers) therefore reach the queue byte for byte.
//!
//! A call's bytes are read by serde once, which checks the JSON (a batch's calls come out as
//! raw text), then once by the split of the call into its pairs, which trusts that check and
//! notes each value's breach of the depth and number limits as it goes, so that the call as
//! it will be sent is judged from its parts; and once more as they are copied out. Only a
//! batch's shared `context` and `integrations`, merged into each call that takes them, are
//! read again for each such call.
//!
//! # Parts
//! | file | what it is |
//! |---|---|
//! | `mod.rs` | this design, and the wiring |
//! | `body.rs` | `parse_body`: a single call or a batch; a body's `writeKey`; a batch's calls |
//! | `normalise.rs` | one call: its type, kept or rewritten, batch objects merged, limits checked |
//! | `validate.rs` | the fields each call type requires; the JSON types of the others |
//! | `split.rs` | a call's object, already checked by serde, split into its pairs in one pass, each value's breach of the limits noted |
//! | `pairs.rs` | an object as its ordered `(key, raw value)` pairs through serde; a batch body in one pass |
//! | `value.rs` | a raw value's JSON kind, its presence, its text as a string |
//! | `scan.rs` | the limits' scan of JSON bytes: nesting depth and the range of numbers |
//! | `writer.rs` | a JSON object written from keys and already-serialized values |
//! | `call.rs` | the call's types (call types, endpoints, violations, a parsed body) and limits |
//!
//! A part uses only the parts below it in this table.

mod body;
mod call;
mod normalise;
mod pairs;
mod scan;
mod split;
mod validate;
mod value;
mod writer;

pub use body::parse_body;
pub use call::{
    Body, CallType, Endpoint, Receipt, RejectedCall, Violation, MAX_CALLS_PER_REQUEST,
    MAX_CALL_BYTES, MAX_JSON_DEPTH,
};
