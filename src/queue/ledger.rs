//! The queue's books: durable counters of every call's fate, and which calls of each stored
//! chunk are already done (delivered or dead-lettered).
//!
//! Both live in the queue's own sled tree and change in the same atomic write as the state
//! they describe, so `accepted = delivered + dead + pending` holds after any crash: ids are
//! handed out one per accepted call, a chunk's calls are pending until their bits are set, and
//! a chunk leaves the tree only when every bit is.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::record::CallRecord;

/// A call handed out by `Queue::read`, or copied out of what `Queue::visit` shows.
#[derive(Debug, Clone)]
pub struct QueuedCall {
    pub id: u64,
    pub record: CallRecord,
    /// The chunk it is stored in; `Queue::remove` needs it.
    pub chunk: ChunkRef,
}

/// Counters kept in the queue tree under the ledger key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Calls that left the queue because upstream took them.
    pub delivered: u64,
    /// Calls moved out of the queue without delivery, by reason (`rejected_by_upstream`,
    /// `expired`, `quarantined`).
    pub dead: BTreeMap<String, u64>,
    /// One past the last id of any chunk ever removed: where ids go on when no chunk is left.
    pub next_id_floor: u64,
}

impl Counters {
    pub fn dead_total(&self) -> u64 {
        self.dead.values().sum()
    }
}

/// Where a queued call sits: its chunk's first id, call count and stored size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    pub first: u64,
    pub count: u32,
    /// Bytes the chunk holds against the queue's limit, given back when it is removed.
    pub stored_bytes: u64,
}

impl ChunkRef {
    pub fn end(&self) -> u64 {
        self.first + u64::from(self.count)
    }
}

/// The counters and the done-bits of chunks that are partly done, in memory; the queue
/// writes every change to sled before it applies it here.
#[derive(Debug, Default)]
pub struct Books {
    pub counters: Counters,
    /// Chunk first id → one bit per call, set once the call is done.
    pub done: HashMap<u64, Vec<u64>>,
}

/// What marking some calls done changes, computed before anything is written.
#[derive(Debug, Default)]
pub struct Settlement {
    /// Chunks left with some calls pending: their new done-bits.
    pub partly_done: Vec<(u64, Vec<u64>)>,
    /// Chunks with every call done: removed along with their done-bits.
    pub finished: Vec<ChunkRef>,
    /// The calls that were not yet done (a call settled twice counts once).
    pub newly_done: Vec<usize>,
}

impl Settlement {
    /// Bytes the finished chunks give back to the limit.
    pub fn freed_bytes(&self) -> u64 {
        self.finished.iter().map(|c| c.stored_bytes).sum()
    }
}

impl Books {
    /// Whether call `index` of the chunk starting at `first` is done.
    pub fn is_done(&self, first: u64, index: usize) -> bool {
        self.done.get(&first).is_some_and(|bits| {
            bits.get(index / 64)
                .is_some_and(|w| w & (1 << (index % 64)) != 0)
        })
    }

    /// Calls of the chunk starting at `first` already done.
    pub fn done_in(&self, first: u64) -> u64 {
        self.done.get(&first).map_or(0, |bits| {
            bits.iter().map(|w| u64::from(w.count_ones())).sum()
        })
    }

    /// What settling `calls` would change (indexes into `calls` in `newly_done`).
    ///
    /// `stored` tells whether a chunk with no done-bits is still in the queue: one that is
    /// not had every call settled already, so its calls are skipped (a call settled twice
    /// counts once, even after its chunk is gone).
    pub fn settle(&self, calls: &[QueuedCall], stored: impl Fn(&ChunkRef) -> bool) -> Settlement {
        let mut chunks: BTreeMap<u64, Option<(ChunkRef, Vec<u64>)>> = BTreeMap::new();
        let mut settlement = Settlement::default();
        for (i, call) in calls.iter().enumerate() {
            let chunk = call.chunk;
            let entry =
                chunks
                    .entry(chunk.first)
                    .or_insert_with(|| match self.done.get(&chunk.first) {
                        Some(bits) => Some((chunk, bits.clone())),
                        None if stored(&chunk) => {
                            Some((chunk, vec![0; (chunk.count as usize).div_ceil(64)]))
                        }
                        None => None,
                    });
            let Some((_, bits)) = entry else {
                continue;
            };
            let index = (call.id - chunk.first) as usize;
            let (word, bit) = (index / 64, 1u64 << (index % 64));
            if bits[word] & bit == 0 {
                bits[word] |= bit;
                settlement.newly_done.push(i);
            }
        }
        for (first, (chunk, bits)) in chunks
            .into_iter()
            .filter_map(|(first, entry)| entry.map(|e| (first, e)))
        {
            let done: u32 = bits.iter().map(|w| w.count_ones()).sum();
            if done == chunk.count {
                settlement.finished.push(chunk);
            } else {
                settlement.partly_done.push((first, bits));
            }
        }
        settlement
    }

    /// Takes a settlement that has been written.
    pub fn apply(&mut self, settlement: &Settlement, counters: Counters) {
        for (first, bits) in &settlement.partly_done {
            self.done.insert(*first, bits.clone());
        }
        for chunk in &settlement.finished {
            self.done.remove(&chunk.first);
        }
        self.counters = counters;
    }
}

/// Done-bits as stored: little-endian u64 words.
pub fn encode_bits(bits: &[u64]) -> Vec<u8> {
    bits.iter().flat_map(|w| w.to_le_bytes()).collect()
}

pub fn decode_bits(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks(8)
        .map(|w| {
            let mut word = [0u8; 8];
            word[..w.len()].copy_from_slice(w);
            u64::from_le_bytes(word)
        })
        .collect()
}
