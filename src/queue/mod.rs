//! The durable queue: every accepted call, in order, in one sled database, until delivered.
//!
//! # Guarantees
//! - **Durable before acknowledged.** In [`Durability::Fsync`] mode, [`Queue::append`] returns
//!   `Ok` only after a sled flush that started after the calls were written *and* an
//!   `fdatasync` of sled's files. A call whose append returned `Ok` survives `kill -9` and
//!   power loss. In [`Durability::Interval`] mode, append returns after the write and a flush
//!   runs every `sync_interval`: calls acknowledged within that window before a crash can be
//!   lost.
//! - **All or nothing per request.** The calls of one append are written in one atomic sled
//!   operation: after a crash either all of them are queued or none.
//! - **FIFO.** Each call gets the next id (a `u64`) in arrival order, and calls are stored in
//!   order in *chunks* of several calls each (see [`record`]). [`Queue::visit`] shows (and
//!   [`Queue::read`] hands out) a call no earlier than it is answered: in `fsync` mode once a
//!   flush has covered it, so a reader never sees a call a crash could take back; in
//!   `interval` mode once written (a crash then takes back its removal with it).
//! - **Removed only on request.** Calls leave the queue only through [`Queue::remove`] or
//!   [`Queue::dead_letter`] (or quarantine, for a chunk that cannot be read), each one atomic
//!   step that also updates the counters.
//! - **Exact accounting.** `accepted = delivered + dead + pending` at every moment and after
//!   any crash ([`Queue::counts`]; see `ledger`).
//! - **Bounded.** Appends past `max_bytes` of stored records are refused with
//!   [`QueueError::Full`]; nothing already queued is touched.
//! - **Versioned.** The database records its format; one written by a newer grouprelay is
//!   refused at open.
//! - **Gives disk back.** sled never shrinks its files: after a backlog they keep the space
//!   it once held. Once they take more than `rebuild_above_bytes` and several times what
//!   they store, the database is *rebuilt*: copied into a fresh one beside it, which is made
//!   durable and then switched in by two renames (see `rebuild`). Appends wait during the
//!   copy; every id, counter and dead letter is the same after; a crash at any step leaves
//!   one whole database, the old or the new, that the next open completes the switch to.
//!
//! # Parts
//! | file | what it is |
//! |---|---|
//! | `mod.rs` | the `Queue` type and its counts, append, close; the database in use, swapped by a rebuild |
//! | `options.rs` | how the queue is opened: durability mode, limits, their defaults |
//! | `open.rs` | open and recovery: format, books, byte count, damage on disk, names made durable |
//! | `sled_config.rs` | sled's settings for a queue database; the log segment size, which bounds the chunks |
//! | `rebuild.rs` | a fresh copy of the database switched in, giving disk back; a switch a crash cut short, completed |
//! | `reclaim.rs` | when to rebuild: the task that weighs the database's files against what they store |
//! | `keys.rs` | the queue tree's key layout and codecs |
//! | `record.rs` | the stored record formats (calls, chunks, dead letters, rejected calls) |
//! | `appender.rs` | the waiting requests' calls packed into chunks and written |
//! | `commit.rs` | group commit: the flushes, and the answers they release |
//! | `read.rs` | answered calls shown in order, in place; quarantine of unreadable chunks |
//! | `ledger.rs` | the counters and done-bits, and what settling changes in them |
//! | `settle.rs` | settling: done-bits, finished chunks and counters in one atomic write |
//! | `dead.rs` | the dead-letter and rejected stores |
//! | `budget.rs` | the byte count against `max_bytes`: the only code that changes it |
//! | `space.rs` | the free-space floor |
//! | `watermark.rs` | the durable watermark that tells damage on disk from a short log |
//! | `error.rs` | why an operation failed |

mod appender;
mod budget;
mod commit;
mod dead;
mod error;
pub mod keys;
mod layout;
mod ledger;
mod open;
mod options;
mod read;
mod rebuild;
mod reclaim;
pub mod record;
mod remove;
mod settle;
mod sled_config;
mod space;
mod watermark;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::spec::RejectedCall;
use appender::Appender;
use budget::{stored_size, Budget};
use commit::{AppendError, GroupCommit};
pub use error::QueueError;
use layout::CLEAN_CLOSE_KEY;
pub use layout::{files_bytes, DB_DIR, LOCK_FILE, WATERMARK_FILE};
use ledger::Books;
pub use ledger::{ChunkRef, Counters, QueuedCall};
pub use options::{
    Durability, QueueOptions, DEFAULT_REBUILD_ABOVE_BYTES, REBUILD_GARBAGE_FACTOR,
    REBUILD_MAX_COPY_BYTES,
};
pub use read::{Shown, Visit};
pub use rebuild::Rebuilt;
use record::rejected_record;
pub use record::{
    CallRecord, CallView, DeadCause, DeadReason, DeadRecord, DecodeError, RejectedRecord,
};
pub use sled_config::{segment_bytes, LEGACY_SEGMENT_BYTES, SEGMENT_BYTES};
use space::FreeSpace;

/// Every call's fate so far, from the durable counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counts {
    /// Calls ever queued (acknowledged, in `fsync` mode).
    pub accepted: u64,
    pub delivered: u64,
    /// Calls moved out without delivery, by reason.
    pub dead: BTreeMap<String, u64>,
    /// Calls still queued: `accepted - delivered - dead`.
    pub pending: u64,
    /// Calls refused at ingest inside accepted batches (kept in the `rejected` store).
    pub rejected: u64,
}

/// A handle on the queue; clones share it.
#[derive(Clone)]
pub struct Queue {
    shared: Arc<Shared>,
}

/// What outlives a rebuild: the database in use, and what every one of them shares.
struct Shared {
    /// The database in use; a rebuild swaps it.
    current: RwLock<Arc<Inner>>,
    /// Appends hold it shared for their whole way; a rebuild and `close` take it alone, so
    /// that no append is under way while they run.
    appends: tokio::sync::RwLock<()>,
    options: QueueOptions,
    /// Woken when more calls become readable (each database's committer wakes it).
    advanced: Arc<Notify>,
    /// Woken when calls are settled: the reclaim task weighs the files again.
    settled: Arc<Notify>,
    /// Set by `close`: no rebuild starts after it.
    closed: AtomicBool,
    /// Flushes of the databases a rebuild replaced.
    earlier_flushes: AtomicU64,
    /// Rebuilds done since open.
    rebuilds: AtomicU64,
    /// The reclaim task, stopped by `close`.
    reclaim: Mutex<Option<JoinHandle<()>>>,
    /// The data dir's lock, held as long as the queue is.
    _lock: std::fs::File,
}

struct Inner {
    db: sled::Db,
    meta: sled::Tree,
    /// Chunks, done-bits and counters.
    tree: sled::Tree,
    rejected: sled::Tree,
    dead: sled::Tree,
    durability: Durability,
    /// The bytes of stored records, against `max_bytes`.
    budget: Arc<Budget>,
    free_space: FreeSpace,
    /// One past the last call id written (not necessarily durable yet).
    inserted_end: Arc<AtomicU64>,
    appender: Arc<Appender>,
    /// Counters and done-bits; also serialises the delivery side's writes.
    books: Mutex<Books>,
    rejected_count: AtomicU64,
    /// Set by `close`: appends after it are refused.
    closed: AtomicBool,
    commit: Arc<GroupCommit>,
    committer: Mutex<Option<JoinHandle<()>>>,
    /// Added to sled's `generate_id` for dead-letter and rejected-call keys: a rebuilt
    /// database's sled counts from 0 again, so it carries the old one's next id here.
    id_base: u64,
    /// Set, under the books lock, once a rebuild has switched a newer database in: whoever
    /// waited for this one's books must take the new one's.
    retired: AtomicBool,
}

impl Queue {
    /// Queues one request's calls (and keeps its rejected calls), durably per the
    /// durability mode. Either every call is queued or none is.
    ///
    /// An error after the write (the flush failed: a full disk, say) leaves the calls queued:
    /// the client will likely send them again, and upstream dedupes by `messageId`.
    pub async fn append(
        &self,
        write_key: &str,
        received_ms: u64,
        calls: &[Vec<u8>],
        rejected: &[RejectedCall],
    ) -> Result<(), QueueError> {
        // Held until answered: a rebuild copies only once no append is under way.
        let _append = self.shared.appends.read().await;
        let inner = self.inner();
        if inner.closed.load(Ordering::SeqCst) {
            return Err(QueueError::Closed);
        }
        let records: Vec<Vec<u8>> = calls
            .iter()
            .map(|call| record::encode_call(write_key, received_ms, call))
            .collect();
        let rejected_records = rejected
            .iter()
            .map(|r| rejected_record(write_key, received_ms, r))
            .collect::<Result<Vec<_>, _>>()?;
        let calls_size = record::entries_size(&records) as u64;
        let rejected_size: u64 = rejected_records.iter().map(|r| stored_size(r.len())).sum();
        let size = calls_size + rejected_size;
        if let Err(free) = inner.free_space.check(size) {
            return Err(QueueError::DiskLow {
                free,
                floor: inner.free_space.floor(),
            });
        }
        inner.budget.reserve(size)?;

        if !rejected_records.is_empty() {
            inner.keep_rejected(rejected_records, size)?;
        }
        if records.is_empty() {
            // Only rejected calls: they too are answered once durable.
            return match inner.durability {
                Durability::Fsync => inner
                    .commit
                    .durable()
                    .await
                    .map_err(|e| QueueError::NotDurable(format!("rejected calls: {e}"))),
                Durability::Interval => {
                    inner.commit.mark_dirty();
                    Ok(())
                }
            };
        }
        let appended = inner.appended_in_time(records).await;
        match appended {
            Ok(()) => Ok(()),
            Err(AppendError::NotWritten(e)) => {
                inner.budget.release(calls_size);
                Err(e)
            }
            // Its bytes stay counted: the calls are (or may be) stored.
            Err(AppendError::NotDurable(e)) => Err(QueueError::NotDurable(e.to_string())),
        }
    }

    /// Whether new calls would be taken now; `Err` says why not (for `GET /ready`).
    pub fn readiness(&self) -> Result<(), String> {
        let inner = self.inner();
        if inner.closed.load(Ordering::SeqCst) {
            return Err("the queue is closed: grouprelay is stopping".into());
        }
        if inner.appender.broken() {
            return Err("a queue write failed part way: restart grouprelay".into());
        }
        if inner.budget.is_full() {
            return Err(format!(
                "the queue is full: {} of {} bytes stored",
                inner.budget.stored(),
                inner.budget.limit()
            ));
        }
        if let Err(free) = inner.free_space.check(0) {
            return Err(format!(
                "the data dir's filesystem has {free} bytes free, below the floor of {}",
                inner.free_space.floor()
            ));
        }
        Ok(())
    }

    /// When the oldest pending readable call was received (ms since the epoch), if any.
    pub fn oldest_received_ms(&self) -> Result<Option<u64>, QueueError> {
        Ok(self.read(0, 1)?.first().map(|c| c.record.received_ms))
    }

    /// Every call's fate so far.
    pub fn counts(&self) -> Counts {
        let inner = self.inner();
        let books = inner.books.lock().expect("books lock");
        let accepted = inner.inserted_end.load(Ordering::SeqCst);
        let counters = &books.counters;
        Counts {
            accepted,
            delivered: counters.delivered,
            dead: counters.dead.clone(),
            pending: accepted
                .saturating_sub(counters.delivered)
                .saturating_sub(counters.dead_total()),
            rejected: inner.rejected_count.load(Ordering::SeqCst),
        }
    }

    /// Resolves when more calls become readable (see [`Queue::visit`]) after it was created and
    /// `enable`d or first polled.
    pub fn appended(&self) -> tokio::sync::futures::Notified<'_> {
        self.shared.advanced.notified()
    }

    /// Bytes of stored records counted against the limit.
    pub fn stored_bytes(&self) -> u64 {
        self.inner().budget.stored()
    }

    /// The same count, made again from what the database holds (reads it all).
    pub fn recount_stored_bytes(&self) -> Result<u64, QueueError> {
        budget::recount(&self.inner().db)
    }

    /// Flushes run so far: with group commit, far fewer than appends under concurrency.
    pub fn flushes(&self) -> u64 {
        self.shared.earlier_flushes.load(Ordering::SeqCst) + self.inner().commit.flushes()
    }

    /// Rebuilds since open: each gave back the disk space sled had kept.
    pub fn rebuilds(&self) -> u64 {
        self.shared.rebuilds.load(Ordering::SeqCst)
    }

    /// Makes everything written so far durable, then stops the appender and the committer.
    /// Appends after this fail; reads still work.
    pub async fn close(&self) -> Result<(), QueueError> {
        self.shared.closed.store(true, Ordering::SeqCst);
        // A rebuild under way finishes first; appends under way are answered first.
        let _alone = self.shared.appends.write().await;
        // No rebuild is under way, nor can one start: the reclaim task can go. Ended here,
        // it does not hold the queue past `close` (the database's files close with the
        // last handle).
        let reclaim = self.shared.reclaim.lock().expect("reclaim lock").take();
        if let Some(task) = reclaim {
            task.abort();
            let _ = task.await;
        }
        self.inner().close().await
    }

    /// Tells the reclaim task that calls left the queue: the files may be worth a rebuild.
    fn settled(&self) {
        self.shared.settled.notify_one();
    }

    /// The database in use.
    fn inner(&self) -> Arc<Inner> {
        self.shared.current.read().expect("queue lock").clone()
    }

    /// Runs `settle` on the database in use with its books locked: the delivery side's
    /// writes (and reads) go through here. A rebuild holds the old database's books while it
    /// copies and switches, so a caller that waited for them takes the new one's.
    fn with_books<T>(
        &self,
        settle: impl FnOnce(&Inner, &mut Books) -> Result<T, QueueError>,
    ) -> Result<T, QueueError> {
        loop {
            let inner = self.inner();
            let mut books = inner.books.lock().expect("books lock");
            if inner.retired.load(Ordering::SeqCst) {
                continue;
            }
            return settle(&inner, &mut books);
        }
    }
}

impl Inner {
    /// Makes everything written so far durable, then stops the appender and the committer.
    async fn close(&self) -> Result<(), QueueError> {
        self.closed.store(true, Ordering::SeqCst);
        self.appender.close().await;
        // Everything is written: the count is exact, and the next open may take it as is;
        // unless a write panicked part way, when only a recount knows.
        if !self.appender.broken() {
            let bytes = self.budget.stored();
            if let Err(e) = self.meta.insert(CLEAN_CLOSE_KEY, &bytes.to_be_bytes()) {
                tracing::warn!(error = %e, "cannot record the queue's byte count");
            }
        }
        let result = self.commit.durable().await;
        self.commit.stop();
        let committer = self.committer.lock().expect("committer lock").take();
        if let Some(task) = committer {
            // A flush stuck after an I/O error must not keep the process from exiting.
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                return Err(QueueError::NotDurable(
                    "the last flush did not finish".into(),
                ));
            }
        }
        result.map_err(|e| QueueError::NotDurable(e.to_string()))
    }

    /// A key for a dead letter or a rejected call: never one this queue handed out before,
    /// in any database it was rebuilt from.
    fn next_store_id(&self) -> Result<u64, QueueError> {
        Ok(self.id_base + self.db.generate_id()?)
    }

    /// Hands calls to the appender and waits for its answer: in `fsync` mode for at most
    /// [`commit::FLUSH_WAIT_LIMIT`], since after an I/O error (a full disk, say) sled's flush
    /// can wait forever, and a request must get an error in bounded time rather than hang.
    async fn appended_in_time(&self, records: Vec<Vec<u8>>) -> Result<(), AppendError> {
        let appended = self.appender.append(records);
        match self.durability {
            Durability::Fsync => tokio::time::timeout(commit::FLUSH_WAIT_LIMIT, appended)
                .await
                .unwrap_or_else(|_| {
                    // If the calls turn out not written, the appender gives their bytes back.
                    Err(AppendError::NotDurable(Arc::from(format!(
                        "no answer within {} s",
                        commit::FLUSH_WAIT_LIMIT.as_secs()
                    ))))
                }),
            Durability::Interval => appended.await,
        }
    }
}
