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
//!   order in *chunks* of a few calls each (see [`record`]). [`Queue::read`] hands out only
//!   calls that a flush has covered, so a reader never sees a call a crash could take back.
//! - **Removed only on request.** Calls leave the queue only through [`Queue::remove`] or
//!   [`Queue::dead_letter`] (or quarantine, for a chunk that cannot be read), each one atomic
//!   step that also updates the counters.
//! - **Exact accounting.** `accepted = delivered + dead + pending` at every moment and after
//!   any crash ([`Queue::counts`]; see `ledger`).
//! - **Bounded.** Appends past `max_bytes` of stored records are refused with
//!   [`QueueError::Full`]; nothing already queued is touched.
//! - **Versioned.** The database records its format; one written by a newer grouprelay is
//!   refused at open.

mod appender;
mod budget;
mod commit;
mod dead;
pub mod keys;
mod ledger;
pub mod record;
mod space;
mod watermark;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::spec::RejectedCall;
use appender::{Appender, Target};
use budget::{stored_size, Budget};
use commit::{AppendError, GroupCommit};
use dead::rejected_record;
use keys::{
    chunk_key, decode_chunk_key, decode_done_key, done_key, CHUNK_PREFIX, DONE_PREFIX, LEDGER_KEY,
};
use ledger::{Books, Settlement};
pub use ledger::{ChunkRef, Counters};
pub use record::{CallRecord, DeadRecord, DecodeError, RejectedRecord};
use space::FreeSpace;
use watermark::Watermark;

/// Why calls are dead-lettered.
#[derive(Debug, Clone)]
pub struct DeadReason {
    /// `rejected_by_upstream` or `expired`.
    pub reason: &'static str,
    /// Upstream's status, when it answered.
    pub status: Option<u16>,
    /// The first 1 KB of upstream's answer.
    pub response: String,
    pub attempts: u32,
}

/// Name of the sled database directory inside the data dir.
pub const DB_DIR: &str = "queue";
/// The durable watermark's file, beside sled's inside the database directory, so that it
/// moves with the queue (see `watermark`).
pub const WATERMARK_FILE: &str = "grouprelay.watermark";
/// Chunks of queued calls, their done-bits and the counters: one tree, so that a call's
/// state and the counters change in one atomic batch.
const QUEUE_TREE: &str = "queue";
const REJECTED_TREE: &str = "rejected";
const DEAD_TREE: &str = "dead";
/// Chunks that could not be read: `reason \n original bytes`, under their queue key.
const QUARANTINE_TREE: &str = "quarantine";
const META_TREE: &str = "meta";
const FORMAT_KEY: &str = "format";
/// The database format this build writes and reads: 2 = calls in chunks.
const DB_FORMAT: u8 = 2;
/// Written by a clean `close`: the exact stored-bytes count. Removed at open, so that its
/// absence tells a crash (and a recount) apart.
const CLEAN_CLOSE_KEY: &str = "clean_close_stored_bytes";

/// When an append counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// After a flush and an fdatasync that cover the call (group commit).
    Fsync,
    /// After the insert; a periodic flush makes it durable.
    Interval,
}

/// How to open the queue.
#[derive(Debug, Clone)]
pub struct QueueOptions {
    /// The data dir; the database lives in its `queue/` subdirectory.
    pub data_dir: PathBuf,
    pub durability: Durability,
    /// Most bytes of stored records (queued, rejected and dead-lettered calls) before appends
    /// are refused.
    pub max_bytes: u64,
    /// sled's page cache. Its 1 GiB default would let a large backlog cost a large RSS.
    pub cache_bytes: u64,
    /// Free bytes the data dir's filesystem must keep; appends below it are refused
    /// (0: no floor).
    pub min_free_bytes: u64,
    /// How often `interval` mode flushes (and how soon removals of delivered calls are
    /// made durable in either mode).
    pub sync_interval: Duration,
}

impl QueueOptions {
    pub fn new(data_dir: impl Into<PathBuf>) -> QueueOptions {
        QueueOptions {
            data_dir: data_dir.into(),
            durability: Durability::Fsync,
            max_bytes: 1 << 30,
            cache_bytes: 16 << 20,
            min_free_bytes: 0,
            sync_interval: Duration::from_millis(200),
        }
    }
}

#[derive(Debug, Clone)]
pub enum QueueError {
    /// The byte limit would be passed: try again later.
    Full { stored: u64, limit: u64 },
    /// The filesystem's free space is below the floor: try again later.
    DiskLow { free: u64, floor: u64 },
    /// The queue was closed (grouprelay is stopping) before the calls could be written.
    Closed,
    /// An earlier write panicked part way: the next id and the byte count may no longer match
    /// what sled holds, so writes are refused until a restart reads the state back from disk.
    Broken,
    /// The calls were written, or perhaps written, but no flush is known to have made them
    /// durable (a flush failed, or did not finish in time). They may still be delivered.
    NotDurable(String),
    /// Bytes read back from the database cannot be decoded: a damaged key, counters, a dead
    /// letter or a stored record.
    Damaged(String),
    /// sled or the filesystem failed.
    Storage(String),
    /// The database was written by a newer grouprelay.
    NewerFormat(u8),
    /// The database was written by an unreleased format this build does not read.
    OlderFormat(u8),
}

impl std::fmt::Display for QueueError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueueError::Full { stored, limit } => {
                write!(f, "queue is full ({stored} of {limit} bytes stored)")
            }
            QueueError::DiskLow { free, floor } => write!(
                f,
                "the data dir's filesystem has {free} bytes free, below the floor of {floor}"
            ),
            QueueError::Closed => f.write_str("the queue is closed"),
            QueueError::Broken => {
                f.write_str("an earlier queue write failed part way; restart grouprelay")
            }
            QueueError::NotDurable(e) => write!(
                f,
                "calls not known to be durable ({e}); they may still be delivered"
            ),
            QueueError::Damaged(e) => write!(f, "damaged queue data: {e}"),
            QueueError::Storage(e) => write!(f, "queue storage error: {e}"),
            QueueError::NewerFormat(v) => write!(
                f,
                "the queue was written by a newer grouprelay (format {v}; this build reads up to {DB_FORMAT})"
            ),
            QueueError::OlderFormat(v) => write!(
                f,
                "the queue was written by a development build (format {v}) that this build cannot read; move the data dir's queue/ away"
            ),
        }
    }
}

impl std::error::Error for QueueError {}

impl From<sled::Error> for QueueError {
    fn from(e: sled::Error) -> Self {
        QueueError::Storage(e.to_string())
    }
}

/// A call handed out by [`Queue::read`].
#[derive(Debug, Clone)]
pub struct QueuedCall {
    pub id: u64,
    pub record: CallRecord,
    /// The chunk it is stored in; [`Queue::remove`] needs it.
    pub chunk: ChunkRef,
}

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
    inner: Arc<Inner>,
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
}

impl Queue {
    /// Opens (or creates) the queue in `options.data_dir`. Must run inside a tokio runtime:
    /// it starts the committer task.
    pub fn open(options: QueueOptions) -> Result<Queue, QueueError> {
        let path = db_path(&options.data_dir);
        crate::dirsync::create_dir_all(&path, 0o700)
            .map_err(|e| QueueError::Storage(format!("cannot create {}: {e}", path.display())))?;
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(options.cache_bytes)
            // The committer owns flushing: sled's own flusher would race it.
            .flush_every_ms(None)
            .open()?;
        let meta = db.open_tree(META_TREE)?;
        match meta.get(FORMAT_KEY)?.as_deref() {
            Some([v]) if *v > DB_FORMAT => return Err(QueueError::NewerFormat(*v)),
            Some([v]) if *v < DB_FORMAT => return Err(QueueError::OlderFormat(*v)),
            Some(_) => {}
            None => {
                meta.insert(FORMAT_KEY, &[DB_FORMAT])?;
            }
        }
        let tree = db.open_tree(QUEUE_TREE)?;
        let rejected = db.open_tree(REJECTED_TREE)?;
        let dead = db.open_tree(DEAD_TREE)?;
        let mut books = read_books(&tree)?;
        let mut next_id = match tree.scan_prefix([CHUNK_PREFIX]).next_back() {
            Some(item) => decode_chunk_key(&item?.0)?.end(),
            None => 0,
        }
        .max(books.counters.next_id_floor);
        let watermark_path = path.join(WATERMARK_FILE);
        let (watermark, durable_before) = Watermark::open(&watermark_path).map_err(|e| {
            QueueError::Storage(format!("cannot open {}: {e}", watermark_path.display()))
        })?;
        if let Some(durable) = durable_before.filter(|&durable| durable > next_id) {
            // sled recovered less than it had made durable: damage on disk cut its log short.
            let lost = durable - next_id;
            tracing::error!(
                lost_calls = lost,
                recovered_up_to = next_id,
                durable_up_to = durable,
                "the queue's database came back shorter than it was made durable: calls were lost to damage on disk"
            );
            *books
                .counters
                .dead
                .entry("lost_on_disk".into())
                .or_default() += lost;
            books.counters.next_id_floor = durable;
            tree.insert(LEDGER_KEY, encode_counters(&books.counters)?)?;
            next_id = durable;
        }
        // sled made its files and renamed its snapshot without syncing a directory; no call
        // is acknowledged before their names are durable.
        sync_names(&options.data_dir, &path).map_err(|e| {
            QueueError::Storage(format!(
                "cannot make the queue's files durable in {}: {e}",
                path.display()
            ))
        })?;
        let budget = Arc::new(Budget::new(budget::at_open(&meta, &db)?, options.max_bytes));
        let rejected_count = AtomicU64::new(rejected.len() as u64);
        db.flush()?;
        let inserted_end = Arc::new(AtomicU64::new(next_id));
        let written = inserted_end.clone();
        let before_flush = move || written.load(Ordering::SeqCst);
        let (commit, committer) = GroupCommit::start(
            db.clone(),
            options.sync_interval,
            Box::new(before_flush),
            Box::new(move |durable_end| watermark.record(durable_end)),
        );
        let appender = Appender::start(Target {
            tree: tree.clone(),
            next_id,
            inserted_end: inserted_end.clone(),
            budget: budget.clone(),
            commit: commit.clone(),
            durability: options.durability,
        })?;
        Ok(Queue {
            inner: Arc::new(Inner {
                db,
                meta,
                tree,
                rejected,
                dead,
                durability: options.durability,
                budget,
                free_space: FreeSpace::new(&options.data_dir, options.min_free_bytes),
                inserted_end,
                appender,
                books: Mutex::new(books),
                rejected_count,
                closed: AtomicBool::new(false),
                commit,
                committer: Mutex::new(Some(committer)),
            }),
        })
    }

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
        let inner = &self.inner;
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
            let count = rejected_records.len() as u64;
            let mut batch = sled::Batch::default();
            let written = (|| {
                for record in rejected_records {
                    batch.insert(&inner.db.generate_id()?.to_be_bytes(), record);
                }
                inner.rejected.apply_batch(batch)
            })();
            if let Err(e) = written {
                inner.budget.release(size);
                tracing::error!(error = %e, "cannot keep rejected calls");
                return Err(e.into());
            }
            inner.rejected_count.fetch_add(count, Ordering::SeqCst);
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
        let appended = inner.appender.append(records);
        let appended = match inner.durability {
            // After an I/O error (a full disk, say) sled's flush can wait forever: answer
            // with an error in bounded time rather than hang the request.
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
        };
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

    /// Up to `limit` pending durable calls with ids of `from` or more, in queue order. A call
    /// is handed out only once a flush covers it, so nothing is delivered that a crash could
    /// still take back (and that its client would then send again).
    pub fn read(&self, mut from: u64, limit: usize) -> Result<Vec<QueuedCall>, QueueError> {
        let mut out = Vec::new();
        // One unreadable chunk must not stop delivery of the rest: quarantine it, read on.
        while let Some(damaged) = self.read_into(from, limit, &mut out)? {
            from = damaged.chunk.end();
            self.quarantine(damaged)?;
        }
        Ok(out)
    }

    /// Reads into `out` until `limit`, the end, or a chunk that cannot be read.
    fn read_into(
        &self,
        from: u64,
        limit: usize,
        out: &mut Vec<QueuedCall>,
    ) -> Result<Option<Damaged>, QueueError> {
        let inner = &self.inner;
        let end = inner
            .inserted_end
            .load(Ordering::SeqCst)
            .min(inner.commit.durable_end());
        if from >= end || out.len() >= limit {
            return Ok(None);
        }
        // Start at the chunk that holds `from`, if one does.
        let holding = inner
            .tree
            .range(chunk_key(0, 0)..=chunk_key(from, u32::MAX))
            .next_back()
            .transpose()?
            .map(|(key, _)| decode_chunk_key(&key))
            .transpose()?
            .filter(|chunk| chunk.end() > from);
        let start = holding.map_or(from, |chunk| chunk.first);
        let books = inner.books.lock().expect("books lock");
        for item in inner.tree.range(chunk_key(start, 0)..chunk_key(end, 0)) {
            let (key, value) = item?;
            let mut chunk = decode_chunk_key(&key)?;
            chunk.stored_bytes = stored_size(value.len());
            let records = match record::decode_chunk(&value) {
                Ok(records) if records.len() == chunk.count as usize => records,
                Ok(_) => {
                    return Ok(Some(Damaged::new(
                        chunk,
                        &value,
                        "call count differs from its key",
                    )))
                }
                Err(e) => return Ok(Some(Damaged::new(chunk, &value, &e.to_string()))),
            };
            for (index, bytes) in records.into_iter().enumerate() {
                let id = chunk.first + index as u64;
                if id < from || books.is_done(chunk.first, index) {
                    continue;
                }
                match record::decode_call(bytes) {
                    Ok(record) => out.push(QueuedCall { id, record, chunk }),
                    Err(e) => {
                        // Drop what this chunk gave: it goes to quarantine whole.
                        out.retain(|c| c.chunk.first != chunk.first);
                        return Ok(Some(Damaged::new(chunk, &value, &e.to_string())));
                    }
                }
                if out.len() >= limit {
                    return Ok(None);
                }
            }
        }
        Ok(None)
    }

    /// Moves a chunk that cannot be read out of the queue, atomically, into the `quarantine`
    /// tree (same key, its bytes and the reason), for an operator to inspect; its pending
    /// calls count as dead, reason `quarantined`.
    fn quarantine(&self, damaged: Damaged) -> Result<(), QueueError> {
        use sled::transaction::ConflictableTransactionError;
        use sled::Transactional;
        let inner = &self.inner;
        let chunk = damaged.chunk;
        tracing::error!(
            first_id = chunk.first,
            calls = chunk.count,
            reason = %damaged.reason,
            "unreadable queued chunk moved to quarantine"
        );
        let quarantine = inner.db.open_tree(QUARANTINE_TREE)?;
        let mut books = inner.books.lock().expect("books lock");
        let key = chunk_key(chunk.first, chunk.count);
        if inner.tree.get(key)?.as_deref() != Some(damaged.value.as_slice()) {
            // Another reader moved it meanwhile: count it once.
            return Ok(());
        }
        let lost = u64::from(chunk.count).saturating_sub(books.done_in(chunk.first));
        let mut counters = books.counters.clone();
        *counters.dead.entry("quarantined".into()).or_default() += lost;
        counters.next_id_floor = counters.next_id_floor.max(chunk.end());
        let ledger = encode_counters(&counters)?;
        let mut entry = Vec::with_capacity(damaged.reason.len() + 1 + damaged.value.len());
        entry.extend_from_slice(damaged.reason.as_bytes());
        entry.push(b'\n');
        entry.extend_from_slice(&damaged.value);
        (&inner.tree, &quarantine)
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
                reason: "quarantined",
            })
            .inc_by(lost);
        inner.budget.add(stored_size(entry.len()));
        inner.budget.release(chunk.stored_bytes);
        inner.commit.mark_dirty();
        Ok(())
    }

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

    /// Whether new calls would be taken now; `Err` says why not (for `GET /ready`).
    pub fn readiness(&self) -> Result<(), String> {
        let inner = &self.inner;
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

    /// When the oldest pending durable call was received (ms since the epoch), if any.
    pub fn oldest_received_ms(&self) -> Result<Option<u64>, QueueError> {
        Ok(self.read(0, 1)?.first().map(|c| c.record.received_ms))
    }

    /// Every call's fate so far.
    pub fn counts(&self) -> Counts {
        let books = self.inner.books.lock().expect("books lock");
        let accepted = self.inner.inserted_end.load(Ordering::SeqCst);
        let counters = &books.counters;
        Counts {
            accepted,
            delivered: counters.delivered,
            dead: counters.dead.clone(),
            pending: accepted
                .saturating_sub(counters.delivered)
                .saturating_sub(counters.dead_total()),
            rejected: self.inner.rejected_count.load(Ordering::SeqCst),
        }
    }

    /// Resolves when more calls become readable (durable) after it was created and
    /// `enable`d or first polled.
    pub fn appended(&self) -> tokio::sync::futures::Notified<'_> {
        self.inner.commit.advanced.notified()
    }

    /// Bytes of stored records counted against the limit.
    pub fn stored_bytes(&self) -> u64 {
        self.inner.budget.stored()
    }

    /// The same count, made again from what the database holds (reads it all).
    pub fn recount_stored_bytes(&self) -> Result<u64, QueueError> {
        budget::recount(&self.inner.db)
    }

    /// Flushes run so far: with group commit, far fewer than appends under concurrency.
    pub fn flushes(&self) -> u64 {
        self.inner.commit.flushes()
    }

    /// Makes everything written so far durable, then stops the appender and the committer.
    /// Appends after this fail; reads still work.
    pub async fn close(&self) -> Result<(), QueueError> {
        let inner = &self.inner;
        inner.closed.store(true, Ordering::SeqCst);
        inner.appender.close().await;
        // Everything is written: the count is exact, and the next open may take it as is;
        // unless a write panicked part way, when only a recount knows.
        if !inner.appender.broken() {
            let bytes = inner.budget.stored();
            if let Err(e) = inner.meta.insert(CLEAN_CLOSE_KEY, &bytes.to_be_bytes()) {
                tracing::warn!(error = %e, "cannot record the queue's byte count");
            }
        }
        let result = inner.commit.durable().await;
        inner.commit.stop();
        let committer = inner.committer.lock().expect("committer lock").take();
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
        result.map_err(|e| QueueError::Storage(e.to_string()))
    }
}

impl Inner {
    /// The chunks of `calls` that are no longer in the queue: every call of theirs was
    /// settled before, so settling them again must change nothing.
    fn gone_chunks(
        &self,
        books: &Books,
        calls: &[QueuedCall],
    ) -> Result<std::collections::HashSet<u64>, QueueError> {
        let mut gone = std::collections::HashSet::new();
        let mut seen = std::collections::HashSet::new();
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

/// The writes a settlement makes in the queue tree (`None`: remove the key), and the id
/// floor it moves.
fn settle_into(
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

/// The counters and the done-bits as stored.
fn read_books(tree: &sled::Tree) -> Result<Books, QueueError> {
    let counters = match tree.get(LEDGER_KEY)? {
        Some(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| QueueError::Damaged(format!("queue counters: {e}")))?,
        None => Counters::default(),
    };
    let mut books = Books {
        counters,
        ..Books::default()
    };
    for item in tree.scan_prefix([DONE_PREFIX]) {
        let (key, bits) = item?;
        books
            .done
            .insert(decode_done_key(&key)?, ledger::decode_bits(&bits));
    }
    Ok(books)
}

fn encode_counters(counters: &Counters) -> Result<Vec<u8>, QueueError> {
    serde_json::to_vec(counters).map_err(|e| QueueError::Storage(e.to_string()))
}

/// A two-tree move's error, as the queue reports it.
fn transaction_error(e: sled::transaction::TransactionError<()>) -> QueueError {
    match e {
        sled::transaction::TransactionError::Storage(e) => QueueError::from(e),
        sled::transaction::TransactionError::Abort(()) => {
            QueueError::Storage("transaction aborted".into())
        }
    }
}

/// Makes durable the names sled and the watermark created at open (`docs/sled.md`): those in
/// the database directory (`db`, `blobs`, the watermark; the patched sled syncs `conf` and
/// its snapshot's rename itself) and the database directory's own name in the data dir.
/// Once per open: the per-request cost is unchanged.
fn sync_names(data_dir: &Path, db_dir: &Path) -> std::io::Result<()> {
    crate::dirsync::sync_dir(db_dir)?;
    crate::dirsync::sync_dir(data_dir)
}

fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join(DB_DIR)
}
