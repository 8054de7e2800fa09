//! The queue's on-disk record formats, versioned so that a later format can be told apart.
//!
//! A queued call is a small binary envelope in front of the call's JSON bytes:
//!
//! ```text
//! [format: u8 = 1][received_ms: u64 BE][write_key_len: u16 BE][write_key][call JSON]
//! ```
//!
//! Rejected calls are rare and read by people, so they are stored as JSON with a `version`.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The record format this build writes, and the newest one it reads.
pub const FORMAT_VERSION: u8 = 1;
const HEADER_LEN: usize = 1 + 8 + 2;

/// A queued call as stored: its writeKey travels beside the call, never inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    /// Milliseconds since the Unix epoch when grouprelay received the call.
    pub received_ms: u64,
    pub write_key: String,
    /// The normalised call, as JSON bytes.
    pub call: Vec<u8>,
}

/// Why a stored value could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Written by a newer grouprelay: refuse rather than guess.
    NewerFormat(u8),
    /// Bytes that are not a record of any known format.
    Damaged(&'static str),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::NewerFormat(v) => write!(
                f,
                "record format {v} is newer than this grouprelay reads ({FORMAT_VERSION})"
            ),
            DecodeError::Damaged(why) => write!(f, "damaged record: {why}"),
        }
    }
}

/// Encodes a call record. A writeKey longer than 65,535 bytes cannot be stored; ingest
/// refuses such keys long before (they are far past any real key).
pub fn encode_call(write_key: &str, received_ms: u64, call: &[u8]) -> Vec<u8> {
    let key_len = u16::try_from(write_key.len()).expect("writeKey length checked at ingest");
    let mut out = Vec::with_capacity(HEADER_LEN + write_key.len() + call.len());
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&received_ms.to_be_bytes());
    out.extend_from_slice(&key_len.to_be_bytes());
    out.extend_from_slice(write_key.as_bytes());
    out.extend_from_slice(call);
    out
}

pub fn decode_call(bytes: &[u8]) -> Result<CallRecord, DecodeError> {
    match bytes.first() {
        None => return Err(DecodeError::Damaged("empty value")),
        Some(&FORMAT_VERSION) => {}
        Some(&v) if v > FORMAT_VERSION => return Err(DecodeError::NewerFormat(v)),
        Some(_) => return Err(DecodeError::Damaged("unknown format byte")),
    }
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Damaged("shorter than its header"));
    }
    let received_ms = u64::from_be_bytes(bytes[1..9].try_into().expect("8 bytes"));
    let key_len = u16::from_be_bytes(bytes[9..11].try_into().expect("2 bytes")) as usize;
    let rest = &bytes[HEADER_LEN..];
    if rest.len() < key_len {
        return Err(DecodeError::Damaged("writeKey runs past the end"));
    }
    let write_key = std::str::from_utf8(&rest[..key_len])
        .map_err(|_| DecodeError::Damaged("writeKey is not UTF-8"))?
        .to_owned();
    Ok(CallRecord {
        received_ms,
        write_key,
        call: rest[key_len..].to_vec(),
    })
}

/// A call that ingest refused inside an accepted batch, kept so that nothing is dropped
/// silently.
#[derive(Debug, Serialize, Deserialize)]
pub struct RejectedRecord {
    pub version: u8,
    pub received_ms: u64,
    pub write_key: String,
    /// Position in the request's batch.
    pub index: usize,
    pub code: String,
    pub message: String,
    /// The call exactly as the client sent it.
    pub call: Box<RawValue>,
}

/// A call that will not be delivered: refused by upstream, or too old to send safely. Kept
/// for an operator to inspect, replay or purge.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeadRecord {
    pub version: u8,
    /// Its key in the queue when it was moved.
    pub queue_id: u64,
    pub received_ms: u64,
    pub write_key: String,
    /// `rejected_by_upstream` or `expired`.
    pub reason: String,
    pub status: Option<u16>,
    /// The first 1 KB of upstream's answer.
    pub response: String,
    pub attempts: u32,
    pub dead_at_ms: u64,
    pub call: Box<RawValue>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_record_round_trips() {
        let encoded = encode_call("key", 1_700_000_000_123, br#"{"type":"group"}"#);
        let decoded = decode_call(&encoded).unwrap();
        assert_eq!(decoded.write_key, "key");
        assert_eq!(decoded.received_ms, 1_700_000_000_123);
        assert_eq!(decoded.call, br#"{"type":"group"}"#);
    }

    #[test]
    fn newer_and_damaged_records_are_told_apart() {
        let mut encoded = encode_call("key", 1, b"{}");
        encoded[0] = FORMAT_VERSION + 1;
        assert_eq!(
            decode_call(&encoded),
            Err(DecodeError::NewerFormat(FORMAT_VERSION + 1))
        );
        assert!(matches!(
            decode_call(&[FORMAT_VERSION, 0, 0]),
            Err(DecodeError::Damaged(_))
        ));
        let mut short_key = encode_call("key", 1, b"");
        short_key.truncate(12);
        assert!(matches!(
            decode_call(&short_key),
            Err(DecodeError::Damaged(_))
        ));
    }
}
