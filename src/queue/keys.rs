//! The queue tree's key layout: which key holds what, and the codecs between keys and ids.
//!
//! One sled tree holds a call's chunk, the chunk's done-bits and the counters, so that one
//! atomic batch can change a call's state and the counters together. Ids are stored
//! big-endian, so that byte order is numeric order and a scan walks chunks in id order.
//!
//! ```text
//! c | first id (u64 BE) | call count (u32 BE)   a chunk of calls
//! a | first id (u64 BE)                         that chunk's done-bits
//! l                                             the counters (JSON)
//! ```

use super::error::QueueError;
use super::ledger::ChunkRef;

/// The first byte of a chunk's key.
pub const CHUNK_PREFIX: u8 = b'c';
/// The first byte of a chunk's done-bits key.
pub const DONE_PREFIX: u8 = b'a';
/// The counters' key.
pub const LEDGER_KEY: &[u8] = b"l";

/// A chunk's key: its first id, then its call count, so that key order is id order.
pub fn chunk_key(first: u64, count: u32) -> [u8; 13] {
    let mut key = [0u8; 13];
    key[0] = CHUNK_PREFIX;
    key[1..9].copy_from_slice(&first.to_be_bytes());
    key[9..].copy_from_slice(&count.to_be_bytes());
    key
}

/// The chunk a chunk key names (its stored size unknown: 0).
pub fn decode_chunk_key(key: &[u8]) -> Result<ChunkRef, QueueError> {
    match key {
        [CHUNK_PREFIX, first @ .., c0, c1, c2, c3] if first.len() == 8 => Ok(ChunkRef {
            first: u64::from_be_bytes(first.try_into().expect("8 bytes")),
            count: u32::from_be_bytes([*c0, *c1, *c2, *c3]),
            stored_bytes: 0,
        }),
        _ => Err(QueueError::Damaged(format!(
            "queue key of {} bytes is not a chunk key",
            key.len()
        ))),
    }
}

/// The key of the done-bits of the chunk starting at `first`.
pub fn done_key(first: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = DONE_PREFIX;
    key[1..].copy_from_slice(&first.to_be_bytes());
    key
}

/// The first id of the chunk a done-bits key belongs to.
pub fn decode_done_key(key: &[u8]) -> Result<u64, QueueError> {
    match key {
        [DONE_PREFIX, first @ ..] => decode_id(first),
        _ => Err(QueueError::Damaged("done-bits key".into())),
    }
}

/// An id stored as a key on its own (the rejected and dead-letter trees).
pub fn decode_id(key: &[u8]) -> Result<u64, QueueError> {
    <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| QueueError::Damaged(format!("a key of {} bytes is not an id", key.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_read_back_and_sort_in_id_order() {
        let chunk = decode_chunk_key(&chunk_key(258, 7)).unwrap();
        assert_eq!((chunk.first, chunk.count), (258, 7));
        assert_eq!(decode_done_key(&done_key(258)).unwrap(), 258);
        assert!(chunk_key(255, 9) < chunk_key(256, 1));
        assert!(decode_chunk_key(&done_key(1)).is_err());
        assert!(decode_done_key(&chunk_key(1, 1)).is_err());
    }
}
