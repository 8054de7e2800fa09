//! The queue's on-disk record formats, versioned so that a later format can be told apart.
//!
//! A queued call is a small binary envelope in front of the call's JSON bytes:
//!
//! ```text
//! [format: u8 = 1][received_ms: u64 BE][write_key_len: u16 BE][write_key][call JSON]
//! ```
//!
//! Calls are stored several to a sled value, in a *chunk*, because sled's cost is per key far
//! more than per byte:
//!
//! ```text
//! [format: u8 = 2][count: u32 BE] then, count times: [len: u32 BE][call record]
//! ```
//!
//! Rejected calls and dead letters are rare and read by people, so they are stored as JSON
//! with a `version`.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::error::QueueError;
use crate::spec::RejectedCall;

/// The record format this build writes, and the newest one it reads.
pub const FORMAT_VERSION: u8 = 1;
const HEADER_LEN: usize = 1 + 8 + 2;
/// The chunk format this build writes, and the newest one it reads.
pub const CHUNK_FORMAT: u8 = 2;
/// Bytes of a chunk in front of its records.
pub const CHUNK_HEADER_LEN: usize = 1 + 4;
/// Bytes in front of each record in a chunk.
const CHUNK_ENTRY_OVERHEAD: usize = 4;

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

/// A call record read in place: what a reader needs to decide on a call before it copies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallView<'a> {
    pub received_ms: u64,
    pub write_key: &'a str,
    pub call: &'a [u8],
}

impl CallView<'_> {
    /// The record, copied out of the bytes it was read from.
    pub fn to_record(&self) -> CallRecord {
        CallRecord {
            received_ms: self.received_ms,
            write_key: self.write_key.to_owned(),
            call: self.call.to_vec(),
        }
    }
}

/// Reads a call record in place, without copying it.
pub fn view_call(bytes: &[u8]) -> Result<CallView<'_>, DecodeError> {
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
        .map_err(|_| DecodeError::Damaged("writeKey is not UTF-8"))?;
    Ok(CallView {
        received_ms,
        write_key,
        call: &rest[key_len..],
    })
}

/// Bytes a record takes in a chunk: what a request reserves against the queue's limit, and
/// what is given back when it is refused or delivered, so all must count it alike.
pub fn entry_size(record: &[u8]) -> usize {
    record.len() + CHUNK_ENTRY_OVERHEAD
}

/// [`entry_size`] of a request's records.
pub fn entries_size(records: &[Vec<u8>]) -> usize {
    records.iter().map(|r| entry_size(r)).sum()
}

/// Encodes records as one chunk.
pub fn encode_chunk<'a>(records: impl Iterator<Item = &'a [u8]> + Clone) -> Vec<u8> {
    let size: usize = records.clone().map(entry_size).sum();
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + size);
    out.push(CHUNK_FORMAT);
    out.extend_from_slice(&[0; 4]);
    let mut count: u32 = 0;
    for record in records {
        let len = u32::try_from(record.len()).expect("a record is far below 4 GiB");
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(record);
        count += 1;
    }
    out[1..5].copy_from_slice(&count.to_be_bytes());
    out
}

/// The records of a chunk, in order, without copying them.
pub fn decode_chunk(bytes: &[u8]) -> Result<Vec<&[u8]>, DecodeError> {
    match bytes.first() {
        None => return Err(DecodeError::Damaged("empty chunk")),
        Some(&CHUNK_FORMAT) => {}
        Some(&v) if v > CHUNK_FORMAT => return Err(DecodeError::NewerFormat(v)),
        Some(_) => return Err(DecodeError::Damaged("unknown chunk format byte")),
    }
    if bytes.len() < CHUNK_HEADER_LEN {
        return Err(DecodeError::Damaged("chunk shorter than its header"));
    }
    let count = u32::from_be_bytes(bytes[1..5].try_into().expect("4 bytes")) as usize;
    let mut rest = &bytes[CHUNK_HEADER_LEN..];
    let mut records = Vec::with_capacity(count.min(rest.len() / CHUNK_ENTRY_OVERHEAD));
    for _ in 0..count {
        if rest.len() < CHUNK_ENTRY_OVERHEAD {
            return Err(DecodeError::Damaged("chunk ends before its last record"));
        }
        let len = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        rest = &rest[CHUNK_ENTRY_OVERHEAD..];
        if rest.len() < len {
            return Err(DecodeError::Damaged("chunk record runs past the end"));
        }
        records.push(&rest[..len]);
        rest = &rest[len..];
    }
    if !rest.is_empty() {
        return Err(DecodeError::Damaged("bytes after a chunk's last record"));
    }
    Ok(records)
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

/// Why calls left the queue without being delivered: the names the counters, the
/// dead-letter store, `/stats` and `grouprelay dead` use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadCause {
    /// Upstream refused the call sent alone.
    RejectedByUpstream,
    /// The call waited longer than `--max-age`.
    Expired,
    /// Its chunk could not be read back (kept in the quarantine tree, not the dead letters).
    Quarantined,
    /// The database came back shorter than it was made durable (damage on disk).
    LostOnDisk,
}

impl DeadCause {
    /// The causes `/stats` always lists, with 0 where there are none.
    pub const LISTED: [DeadCause; 3] = [
        DeadCause::RejectedByUpstream,
        DeadCause::Expired,
        DeadCause::Quarantined,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadCause::RejectedByUpstream => "rejected_by_upstream",
            DeadCause::Expired => "expired",
            DeadCause::Quarantined => "quarantined",
            DeadCause::LostOnDisk => "lost_on_disk",
        }
    }
}

/// Why calls are dead-lettered.
#[derive(Debug, Clone)]
pub struct DeadReason {
    /// A [`DeadCause`]'s name: `rejected_by_upstream` or `expired`.
    pub reason: &'static str,
    /// Upstream's status, when it answered.
    pub status: Option<u16>,
    /// The first 1 KB of upstream's answer.
    pub response: String,
    pub attempts: u32,
}

impl DeadReason {
    pub fn new(cause: DeadCause, status: Option<u16>, response: String, attempts: u32) -> Self {
        DeadReason {
            reason: cause.as_str(),
            status,
            response,
            attempts,
        }
    }
}

/// A call ingest refused inside an accepted batch, as the rejected store keeps it.
pub(super) fn rejected_record(
    write_key: &str,
    received_ms: u64,
    rejected: &RejectedCall,
) -> Result<Vec<u8>, QueueError> {
    let call = RawValue::from_string(String::from_utf8_lossy(&rejected.raw).into_owned())
        .map_err(|e| QueueError::Encode(format!("rejected call is not JSON: {e}")))?;
    serde_json::to_vec(&RejectedRecord {
        version: FORMAT_VERSION,
        received_ms,
        write_key: write_key.to_owned(),
        index: rejected.index,
        code: rejected.violation.code.to_owned(),
        message: rejected.violation.message.clone(),
        call,
    })
    .map_err(|e| QueueError::Encode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_record_round_trips() {
        let encoded = encode_call("key", 1_700_000_000_123, br#"{"type":"group"}"#);
        let decoded = view_call(&encoded).unwrap();
        assert_eq!(decoded.write_key, "key");
        assert_eq!(decoded.received_ms, 1_700_000_000_123);
        assert_eq!(decoded.call, br#"{"type":"group"}"#);
    }

    #[test]
    fn chunks_round_trip_and_refuse_damage() {
        let records: Vec<Vec<u8>> = (0..3).map(|i| encode_call("k", i, b"{}")).collect();
        let chunk = encode_chunk(records.iter().map(Vec::as_slice));
        let decoded = decode_chunk(&chunk).unwrap();
        assert_eq!(
            decoded,
            records.iter().map(Vec::as_slice).collect::<Vec<_>>()
        );
        assert!(matches!(
            decode_chunk(&chunk[..chunk.len() - 1]),
            Err(DecodeError::Damaged(_))
        ));
        let mut longer = chunk.clone();
        longer.push(0);
        assert!(matches!(
            decode_chunk(&longer),
            Err(DecodeError::Damaged(_))
        ));
        let mut newer = chunk;
        newer[0] = CHUNK_FORMAT + 1;
        assert_eq!(
            decode_chunk(&newer),
            Err(DecodeError::NewerFormat(CHUNK_FORMAT + 1))
        );
    }

    #[test]
    fn newer_and_damaged_records_are_told_apart() {
        let mut encoded = encode_call("key", 1, b"{}");
        encoded[0] = FORMAT_VERSION + 1;
        assert_eq!(
            view_call(&encoded),
            Err(DecodeError::NewerFormat(FORMAT_VERSION + 1))
        );
        assert!(matches!(
            view_call(&[FORMAT_VERSION, 0, 0]),
            Err(DecodeError::Damaged(_))
        ));
        let mut short_key = encode_call("key", 1, b"");
        short_key.truncate(12);
        assert!(matches!(
            view_call(&short_key),
            Err(DecodeError::Damaged(_))
        ));
    }
}
