//! Reading the queue for delivery: answered calls in order (`fsync` mode: durable ones), and
//! quarantine for a chunk that cannot be read, so that one damaged chunk never stops the
//! rest.

use std::sync::atomic::Ordering;

use super::budget::stored_size;
use super::error::{transaction_error, QueueError};
use super::keys::{chunk_key, decode_chunk_key, done_key, LEDGER_KEY};
use super::layout::QUARANTINE_TREE;
use super::ledger::ChunkRef;
use super::ledger::{Books, QueuedCall};
use super::record::{self, CallView, DeadCause};
use super::settle::encode_counters;
use super::{Durability, Inner, Queue};

/// What a reader of [`Queue::visit`] wants after a call: the next, or no more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visit {
    Next,
    Stop,
}

/// A pending call as [`Queue::visit`] shows it, in place: a reader that passes over it
/// copies nothing.
#[derive(Debug, Clone, Copy)]
pub struct Shown<'a> {
    pub id: u64,
    pub view: CallView<'a>,
    pub chunk: ChunkRef,
}

impl Shown<'_> {
    /// The call, copied out to be kept.
    pub fn to_queued(&self) -> QueuedCall {
        QueuedCall {
            id: self.id,
            record: self.view.to_record(),
            chunk: self.chunk,
        }
    }
}

impl Queue {
    /// Up to `limit` pending readable calls (see [`Queue::visit`]) with ids of `from` or
    /// more, in queue order.
    pub fn read(&self, from: u64, limit: usize) -> Result<Vec<QueuedCall>, QueueError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        self.visit(from, |shown| {
            out.push(shown.to_queued());
            if out.len() >= limit {
                Visit::Stop
            } else {
                Visit::Next
            }
        })?;
        Ok(out)
    }

    /// Shows `visit` the pending calls with ids of `from` or more, in queue order and in
    /// place, until it says [`Visit::Stop`] or none is left. A call is shown no earlier than
    /// it is answered: in `fsync` mode once a flush covers it, so nothing is delivered that a
    /// crash could still take back (and that its client would then send again); in
    /// `interval` mode once written (`Inner::readable_end`).
    ///
    /// The delivery side looks at far more calls than it keeps (another writeKey's, while
    /// its lane is full), so only what it keeps is copied. A chunk that cannot be read is
    /// moved to quarantine before any of its calls is shown, and the rest is shown on.
    pub fn visit(
        &self,
        mut from: u64,
        mut visit: impl FnMut(Shown<'_>) -> Visit,
    ) -> Result<(), QueueError> {
        // One unreadable chunk must not stop delivery of the rest: quarantine it, read on.
        while let Some(damaged) =
            self.with_books(|inner, books| inner.visit(books, from, &mut visit))?
        {
            from = damaged.chunk.end();
            self.quarantine(damaged)?;
        }
        Ok(())
    }

    /// Moves a chunk that cannot be read out of the queue (see [`Inner::quarantine`]).
    fn quarantine(&self, damaged: Damaged) -> Result<(), QueueError> {
        let moved = self.with_books(|inner, books| inner.quarantine(books, damaged));
        self.settled();
        moved
    }
}

impl Inner {
    /// One past the last call a reader may see. In `fsync` mode a call is shown once a flush
    /// has covered it, as it is answered. In `interval` mode it is shown once written, as it
    /// is answered: delivering it before the periodic flush reads it while sled still caches
    /// it, and a crash before that flush takes back its removal with it (sled recovers a
    /// prefix of its log), so the books stay exact and nothing acknowledged is lost that
    /// `interval` mode did not already allow to be lost.
    fn readable_end(&self) -> u64 {
        let inserted = self.inserted_end.load(Ordering::SeqCst);
        match self.durability {
            Durability::Fsync => inserted.min(self.commit.durable_end()),
            Durability::Interval => inserted,
        }
    }

    /// [`Queue::visit`] on this database, its books locked, up to a chunk that cannot be
    /// read (returned to be quarantined).
    fn visit(
        &self,
        books: &Books,
        from: u64,
        visit: &mut impl FnMut(Shown<'_>) -> Visit,
    ) -> Result<Option<Damaged>, QueueError> {
        let end = self.readable_end();
        if from >= end {
            return Ok(None);
        }
        // Start at the chunk that holds `from`, if one does.
        let holding = self
            .tree
            .range(chunk_key(0, 0)..=chunk_key(from, u32::MAX))
            .next_back()
            .transpose()?
            .map(|(key, _)| decode_chunk_key(&key))
            .transpose()?
            .filter(|chunk| chunk.end() > from);
        let start = holding.map_or(from, |chunk| chunk.first);
        for item in self.tree.range(chunk_key(start, 0)..chunk_key(end, 0)) {
            let (key, value) = item?;
            let mut chunk = decode_chunk_key(&key)?;
            chunk.stored_bytes = stored_size(value.len());
            let calls = match read_chunk(&value, chunk) {
                Ok(calls) => calls,
                Err(reason) => return Ok(Some(Damaged::new(chunk, &value, &reason))),
            };
            for (index, view) in calls.into_iter().enumerate() {
                let id = chunk.first + index as u64;
                if id < from || books.is_done(chunk.first, index) {
                    continue;
                }
                if visit(Shown { id, view, chunk }) == Visit::Stop {
                    return Ok(None);
                }
            }
        }
        Ok(None)
    }

    /// Moves a chunk that cannot be read out of the queue, atomically, into the `quarantine`
    /// tree (same key, its bytes and the reason), for an operator to inspect; its pending
    /// calls count as dead, reason `quarantined`.
    fn quarantine(&self, books: &mut Books, damaged: Damaged) -> Result<(), QueueError> {
        use sled::transaction::ConflictableTransactionError;
        use sled::Transactional;
        let chunk = damaged.chunk;
        tracing::error!(
            first_id = chunk.first,
            calls = chunk.count,
            reason = %damaged.reason,
            "unreadable queued chunk moved to quarantine"
        );
        let quarantine = self.db.open_tree(QUARANTINE_TREE)?;
        let key = chunk_key(chunk.first, chunk.count);
        if self.tree.get(key)?.as_deref() != Some(damaged.value.as_slice()) {
            // Another reader moved it meanwhile: count it once.
            return Ok(());
        }
        let lost = u64::from(chunk.count).saturating_sub(books.done_in(chunk.first));
        let mut counters = books.counters.clone();
        *counters
            .dead
            .entry(DeadCause::Quarantined.as_str().into())
            .or_default() += lost;
        counters.next_id_floor = counters.next_id_floor.max(chunk.end());
        let ledger = encode_counters(&counters)?;
        let mut entry = Vec::with_capacity(damaged.reason.len() + 1 + damaged.value.len());
        entry.extend_from_slice(damaged.reason.as_bytes());
        entry.push(b'\n');
        entry.extend_from_slice(&damaged.value);
        (&self.tree, &quarantine)
            .transaction(|(tree, quarantine)| {
                tree.remove(&key[..])?;
                tree.remove(&done_key(chunk.first)[..])?;
                tree.insert(LEDGER_KEY, ledger.as_slice())?;
                quarantine.insert(&key[..], entry.as_slice())?;
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(transaction_error)?;
        books.done.remove(&chunk.first);
        books.counters = counters;
        crate::metrics::metrics()
            .dead_letters
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: DeadCause::Quarantined.as_str(),
            })
            .inc_by(lost);
        self.budget.add(stored_size(entry.len()));
        self.budget.release(chunk.stored_bytes);
        self.commit.mark_dirty();
        Ok(())
    }
}

/// A chunk's calls in place, all checked before any is shown, or why it cannot be read.
fn read_chunk(value: &[u8], chunk: ChunkRef) -> Result<Vec<CallView<'_>>, String> {
    let records = record::decode_chunk(value).map_err(|e| e.to_string())?;
    if records.len() != chunk.count as usize {
        return Err("call count differs from its key".into());
    }
    records
        .into_iter()
        .map(|bytes| record::view_call(bytes).map_err(|e| e.to_string()))
        .collect()
}

/// A chunk that could not be read, on its way to quarantine.
struct Damaged {
    chunk: ChunkRef,
    value: Vec<u8>,
    reason: String,
}

impl Damaged {
    fn new(chunk: ChunkRef, value: &[u8], reason: &str) -> Damaged {
        Damaged {
            chunk,
            value: value.to_vec(),
            reason: reason.to_owned(),
        }
    }
}
