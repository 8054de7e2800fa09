//! The dead-letter and rejected stores: calls moved out of the queue for good (refused by
//! upstream, or too old), and calls ingest refused inside accepted batches; how they are
//! moved, read, purged and replayed.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde_json::value::RawValue;

use super::budget::stored_size;
use super::error::{transaction_error, QueueError};
use super::keys::{decode_id, LEDGER_KEY};
use super::ledger::{Books, QueuedCall};
use super::record::DeadReason;
use super::record::{self, DeadRecord, RejectedRecord};
use super::settle::{encode_counters, settle_into};
use super::{Inner, Queue};

impl Queue {
    /// Moves calls from the queue to the dead-letter store in one atomic step with the
    /// counters: after a crash each call is in exactly one of the two.
    pub fn dead_letter(&self, calls: &[QueuedCall], reason: &DeadReason) -> Result<(), QueueError> {
        let moved = self.with_books(|inner, books| inner.dead_letter(books, calls, reason));
        self.settled();
        moved
    }

    /// The dead letters, oldest first.
    pub fn dead(&self) -> Result<Vec<DeadRecord>, QueueError> {
        read_json_tree(&self.inner().dead, "dead letter")
    }

    /// The dead letters with their ids, oldest first.
    pub fn dead_entries(&self) -> Result<Vec<(u64, DeadRecord)>, QueueError> {
        self.inner()
            .dead
            .iter()
            .map(|item| {
                let (key, value) = item?;
                Ok((decode_id(&key)?, decode_dead(&value)?))
            })
            .collect()
    }

    /// One dead letter.
    pub fn dead_entry(&self, id: u64) -> Result<Option<DeadRecord>, QueueError> {
        self.inner()
            .dead
            .get(id.to_be_bytes())?
            .map(|value| decode_dead(&value))
            .transpose()
    }

    /// Deletes dead letters for good; ids that are not there are skipped. Returns how many
    /// were deleted.
    pub fn purge_dead(&self, ids: &[u64]) -> Result<usize, QueueError> {
        let purged = self.with_books(|inner, _| inner.purge_dead(ids));
        self.settled();
        purged
    }

    /// Queues dead letters again, with the same call (same `messageId`) and writeKey, then
    /// deletes them from the dead-letter store. They count as newly accepted, received now
    /// (so that an expired call is not expired again at once). A crash between the two
    /// steps leaves a call both queued and dead-lettered: delivered once more at worst, never
    /// lost. Returns how many were queued.
    pub async fn replay_dead(&self, ids: &[u64]) -> Result<usize, QueueError> {
        let now = crate::clock::unix_ms(std::time::SystemTime::now());
        let mut by_key: BTreeMap<String, Vec<(u64, Vec<u8>)>> = BTreeMap::new();
        let unique: std::collections::BTreeSet<u64> = ids.iter().copied().collect();
        for id in unique {
            if let Some(record) = self.dead_entry(id)? {
                by_key
                    .entry(record.write_key)
                    .or_default()
                    .push((id, record.call.get().as_bytes().to_vec()));
            }
        }
        let mut replayed = 0;
        for (write_key, letters) in by_key {
            let calls: Vec<Vec<u8>> = letters.iter().map(|(_, call)| call.clone()).collect();
            self.append(&write_key, now, &calls, &[]).await?;
            let done: Vec<u64> = letters.iter().map(|(id, _)| *id).collect();
            self.purge_dead(&done)?;
            replayed += done.len();
        }
        Ok(replayed)
    }

    /// The calls ingest refused inside accepted batches, oldest first.
    pub fn rejected(&self) -> Result<Vec<RejectedRecord>, QueueError> {
        read_json_tree(&self.inner().rejected, "rejected record")
    }
}

/// A call as JSON for a dead letter; bytes that are not JSON (a damaged record) are kept as
/// a JSON string rather than lost.
fn call_json(call: &[u8]) -> Box<RawValue> {
    let text = String::from_utf8_lossy(call).into_owned();
    RawValue::from_string(text.clone()).unwrap_or_else(|_| {
        let quoted = serde_json::to_string(&text).expect("a string serializes");
        RawValue::from_string(quoted).expect("a JSON string is JSON")
    })
}

impl Inner {
    /// [`Queue::purge_dead`] on this database, its books locked (so that a rebuild never
    /// copies a purge half done).
    fn purge_dead(&self, ids: &[u64]) -> Result<usize, QueueError> {
        let mut freed = 0;
        let mut purged = 0;
        let unique: std::collections::BTreeSet<u64> = ids.iter().copied().collect();
        for id in unique {
            // One key at a time, counting only what this removal took: an id named twice, or
            // purged by two operators at once, frees its bytes once.
            if let Some(value) = self.dead.remove(id.to_be_bytes())? {
                freed += stored_size(value.len());
                purged += 1;
            }
        }
        self.budget.free(freed);
        self.commit.mark_dirty();
        Ok(purged)
    }

    /// [`Queue::dead_letter`] on this database, its books locked.
    fn dead_letter(
        &self,
        books: &mut Books,
        calls: &[QueuedCall],
        reason: &DeadReason,
    ) -> Result<(), QueueError> {
        use sled::transaction::ConflictableTransactionError;
        use sled::Transactional;
        let now_ms = crate::clock::unix_ms(std::time::SystemTime::now());
        let gone = self.gone_chunks(books, calls)?;
        let settlement = books.settle(calls, |chunk| !gone.contains(&chunk.first));
        if settlement.newly_done.is_empty() {
            return Ok(());
        }
        let mut letters = Vec::with_capacity(settlement.newly_done.len());
        for &i in &settlement.newly_done {
            let call = &calls[i];
            let record = DeadRecord {
                version: record::FORMAT_VERSION,
                queue_id: call.id,
                received_ms: call.record.received_ms,
                write_key: call.record.write_key.clone(),
                reason: reason.reason.to_owned(),
                status: reason.status,
                response: reason.response.clone(),
                attempts: reason.attempts,
                dead_at_ms: now_ms,
                call: call_json(&call.record.call),
            };
            let value =
                serde_json::to_vec(&record).map_err(|e| QueueError::Encode(e.to_string()))?;
            letters.push((self.next_store_id()?.to_be_bytes(), value));
        }
        let mut counters = books.counters.clone();
        *counters.dead.entry(reason.reason.to_owned()).or_default() +=
            settlement.newly_done.len() as u64;
        let mut writes = Vec::new();
        settle_into(&settlement, &mut counters, |key, value| {
            writes.push((key, value))
        });
        let ledger = encode_counters(&counters)?;
        (&self.tree, &self.dead)
            .transaction(|(tree, dead)| {
                for (key, value) in &writes {
                    match value {
                        Some(value) => tree.insert(key.as_slice(), value.as_slice())?,
                        None => tree.remove(key.as_slice())?,
                    };
                }
                tree.insert(LEDGER_KEY, ledger.as_slice())?;
                for (id, value) in &letters {
                    dead.insert(&id[..], value.as_slice())?;
                }
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(transaction_error)?;
        books.apply(&settlement, counters);
        crate::metrics::metrics()
            .dead_letters
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: reason.reason,
            })
            .inc_by(settlement.newly_done.len() as u64);
        let added: u64 = letters.iter().map(|(_, v)| stored_size(v.len())).sum();
        // Dead letters still count against the limit, as they still take disk.
        self.budget.add(added);
        self.budget.release(settlement.freed_bytes());
        self.commit.mark_dirty();
        Ok(())
    }

    /// Keeps a request's rejected calls in the rejected store, in one batch; on failure
    /// gives back the `reserved` bytes (the whole request's), since nothing of it is kept.
    pub(super) fn keep_rejected(
        &self,
        records: Vec<Vec<u8>>,
        reserved: u64,
    ) -> Result<(), QueueError> {
        let count = records.len() as u64;
        let mut batch = sled::Batch::default();
        let written = (|| {
            for record in records {
                batch.insert(&self.next_store_id()?.to_be_bytes(), record);
            }
            Ok::<_, QueueError>(self.rejected.apply_batch(batch)?)
        })();
        if let Err(e) = written {
            self.budget.release(reserved);
            tracing::error!(error = %e, "cannot keep rejected calls");
            return Err(e);
        }
        self.rejected_count.fetch_add(count, Ordering::SeqCst);
        Ok(())
    }
}

/// Every record of a tree of JSON records, in key order.
fn read_json_tree<T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    what: &str,
) -> Result<Vec<T>, QueueError> {
    tree.iter()
        .values()
        .map(|value| {
            let value = value?;
            serde_json::from_slice(&value).map_err(|e| QueueError::Damaged(format!("{what}: {e}")))
        })
        .collect()
}

fn decode_dead(value: &[u8]) -> Result<DeadRecord, QueueError> {
    serde_json::from_slice(value).map_err(|e| QueueError::Damaged(format!("dead letter: {e}")))
}
