//! Settling: calls marked done (delivered or dead-lettered), chunks left with nothing pending
//! removed, and the counters moved, in one atomic write, so that after a crash every call is
//! in exactly one state and `accepted = delivered + dead + pending` still holds.

use std::collections::HashSet;

use super::keys::{chunk_key, done_key, LEDGER_KEY};
use super::ledger::{self, Books, Counters, Settlement};
use super::{Inner, Queue, QueueError, QueuedCall};

impl Queue {
    /// Marks delivered calls done, and removes the chunks left with nothing pending, in one
    /// atomic step with the counters.
    pub fn remove(&self, calls: &[QueuedCall]) -> Result<(), QueueError> {
        let inner = &self.inner;
        let mut books = inner.books.lock().expect("books lock");
        let gone = inner.gone_chunks(&books, calls)?;
        let settlement = books.settle(calls, |chunk| !gone.contains(&chunk.first));
        if settlement.newly_done.is_empty() {
            return Ok(());
        }
        let mut counters = books.counters.clone();
        counters.delivered += settlement.newly_done.len() as u64;
        let mut batch = sled::Batch::default();
        settle_into(&settlement, &mut counters, |key, value| match value {
            Some(value) => batch.insert(key, value),
            None => batch.remove(key),
        });
        batch.insert(LEDGER_KEY, encode_counters(&counters)?);
        inner.tree.apply_batch(batch)?;
        books.apply(&settlement, counters);
        crate::metrics::metrics()
            .calls_delivered
            .inc_by(settlement.newly_done.len() as u64);
        inner.budget.free(settlement.freed_bytes());
        inner.commit.mark_dirty();
        Ok(())
    }
}

impl Inner {
    /// The chunks of `calls` that are no longer in the queue: every call of theirs was
    /// settled before, so settling them again must change nothing.
    pub(super) fn gone_chunks(
        &self,
        books: &Books,
        calls: &[QueuedCall],
    ) -> Result<HashSet<u64>, QueueError> {
        let mut gone = HashSet::new();
        let mut seen = HashSet::new();
        for chunk in calls.iter().map(|c| c.chunk) {
            if books.done.contains_key(&chunk.first) || !seen.insert(chunk.first) {
                continue;
            }
            if !self
                .tree
                .contains_key(chunk_key(chunk.first, chunk.count))?
            {
                gone.insert(chunk.first);
            }
        }
        Ok(gone)
    }
}

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
    serde_json::to_vec(counters).map_err(|e| QueueError::Storage(e.to_string()))
}
