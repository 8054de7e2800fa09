//! Delivered calls leave the queue: marked done, and their chunks removed once nothing in
//! them is pending, in one atomic write with the counters.

use std::collections::HashSet;

use super::error::QueueError;
use super::keys::{chunk_key, LEDGER_KEY};
use super::ledger::{Books, QueuedCall};
use super::settle::{encode_counters, settle_into};
use super::{Inner, Queue};

impl Queue {
    /// Marks delivered calls done, and removes the chunks left with nothing pending, in one
    /// atomic step with the counters.
    pub fn remove(&self, calls: &[QueuedCall]) -> Result<(), QueueError> {
        let removed = self.with_books(|inner, books| inner.remove(books, calls));
        self.settled();
        removed
    }
}

impl Inner {
    /// [`Queue::remove`] on this database, its books locked.
    fn remove(&self, books: &mut Books, calls: &[QueuedCall]) -> Result<(), QueueError> {
        let gone = self.gone_chunks(books, calls)?;
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
        self.tree.apply_batch(batch)?;
        books.apply(&settlement, counters);
        crate::metrics::metrics()
            .calls_delivered
            .inc_by(settlement.newly_done.len() as u64);
        self.budget.free(settlement.freed_bytes());
        self.commit.mark_dirty();
        Ok(())
    }

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
