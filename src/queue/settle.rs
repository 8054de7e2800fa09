//! The writes a settlement makes: done-bits set, finished chunks removed and the counters
//! moved, all put into the one atomic write of whoever settles (delivery, dead-lettering,
//! quarantine), so that after a crash every call is in exactly one state and
//! `accepted = delivered + dead + pending` still holds.

use super::error::QueueError;
use super::keys::{chunk_key, done_key};
use super::ledger::{self, Counters, Settlement};

/// The writes a settlement makes in the queue tree (`None`: remove the key), and the id
/// floor it moves.
pub(super) fn settle_into(
    settlement: &Settlement,
    counters: &mut Counters,
    mut write: impl FnMut(Vec<u8>, Option<Vec<u8>>),
) {
    for (first, bits) in &settlement.partly_done {
        write(done_key(*first).to_vec(), Some(ledger::encode_bits(bits)));
    }
    for chunk in &settlement.finished {
        write(chunk_key(chunk.first, chunk.count).to_vec(), None);
        write(done_key(chunk.first).to_vec(), None);
        counters.next_id_floor = counters.next_id_floor.max(chunk.end());
    }
}

/// The counters as stored.
pub(super) fn encode_counters(counters: &Counters) -> Result<Vec<u8>, QueueError> {
    serde_json::to_vec(counters).map_err(|e| QueueError::Encode(e.to_string()))
}
