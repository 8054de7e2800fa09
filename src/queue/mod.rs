//! The durable queue: every accepted call, in order, in one sled database, until delivered.
//!
//! # Guarantees
//! - **Durable before acknowledged.** In [`Durability::Fsync`] mode, [`Queue::append`] returns
//!   `Ok` only after a sled flush that started after the calls were inserted *and* an
//!   `fdatasync` of sled's data file. A call whose append returned `Ok` survives `kill -9`
//!   and power loss. In [`Durability::Interval`] mode, append returns after the insert and a
//!   flush runs every `sync_interval`: calls acknowledged within that window before a crash
//!   can be lost.
//! - **All or nothing per request.** The calls of one append are inserted in one atomic
//!   sled batch: after a crash either all of them are queued or none.
//! - **FIFO.** Calls are keyed by a big-endian `u64` sequence, so key order is arrival order.
//!   [`Queue::read`] hands out only calls whose whole append has been inserted, so a reader
//!   never skips a call that a slower concurrent request is still writing.
//! - **Removed only on request.** Calls leave the queue only through [`Queue::remove`], in one
//!   atomic batch, called once upstream has taken them.
//! - **Bounded.** Appends past `max_bytes` of stored records are refused with
//!   [`QueueError::Full`]; nothing already queued is touched.
//! - **Versioned.** Every record carries a format byte; a database written by a newer format
//!   is refused at open.

mod commit;
pub mod record;
mod space;

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::task::JoinHandle;

use crate::spec::RejectedCall;
use commit::GroupCommit;
pub use record::{CallRecord, DeadRecord, DecodeError, RejectedRecord};
use space::FreeSpace;

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
const CALLS_TREE: &str = "calls";
const REJECTED_TREE: &str = "rejected";
const DEAD_TREE: &str = "dead";
/// Records that could not be read: `reason \n original bytes`, under their queue key.
const QUARANTINE_TREE: &str = "quarantine";
const META_TREE: &str = "meta";
const FORMAT_KEY: &str = "format";
/// The stored-bytes count as of the last flush.
const STORED_BYTES_KEY: &str = "stored_bytes";
/// Stored size of a key, counted with each record against the byte limit.
const KEY_LEN: u64 = 8;

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
            cache_bytes: 64 << 20,
            min_free_bytes: 0,
            sync_interval: Duration::from_millis(200),
        }
    }
}

#[derive(Debug)]
pub enum QueueError {
    /// The byte limit would be passed: try again later.
    Full { stored: u64, limit: u64 },
    /// The filesystem's free space is below the floor: try again later.
    DiskLow { free: u64, floor: u64 },
    /// sled or the filesystem failed.
    Storage(String),
    /// The database was written by a newer grouprelay.
    NewerFormat(u8),
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
            QueueError::Storage(e) => write!(f, "queue storage error: {e}"),
            QueueError::NewerFormat(v) => write!(
                f,
                "the queue was written by a newer grouprelay (format {v}; this build reads up to {})",
                record::FORMAT_VERSION
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
    /// Bytes this call holds against the limit; give it back to [`Queue::remove`].
    pub stored_bytes: u64,
}

/// Hands out sequence numbers, and tells how far the queue may be read: up to the first
/// append still being inserted.
struct Sequencer {
    next: u64,
    inserting: BTreeSet<u64>,
}

impl Sequencer {
    /// One past the last id a reader may see: every id below it is fully inserted.
    fn readable_end(&self) -> u64 {
        self.inserting.first().copied().unwrap_or(self.next)
    }
}

/// A handle on the queue; clones share it.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    calls: sled::Tree,
    rejected: sled::Tree,
    dead: sled::Tree,
    durability: Durability,
    max_bytes: u64,
    stored_bytes: Arc<AtomicU64>,
    free_space: FreeSpace,
    sequencer: Arc<Mutex<Sequencer>>,
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
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(options.cache_bytes)
            // The committer owns flushing: sled's own flusher would race it.
            .flush_every_ms(None)
            .open()?;
        let meta = db.open_tree(META_TREE)?;
        match meta.get(FORMAT_KEY)?.as_deref() {
            Some([v]) if *v > record::FORMAT_VERSION => return Err(QueueError::NewerFormat(*v)),
            Some(_) => {}
            None => {
                meta.insert(FORMAT_KEY, &[record::FORMAT_VERSION])?;
            }
        }
        let calls = db.open_tree(CALLS_TREE)?;
        let rejected = db.open_tree(REJECTED_TREE)?;
        let dead = db.open_tree(DEAD_TREE)?;
        let next = match calls.last()? {
            Some((key, _)) => decode_key(&key)? + 1,
            None => 0,
        };
        let stored = Arc::new(AtomicU64::new(stored_bytes_at_open(
            &meta,
            [&calls, &rejected, &dead],
        )?));
        db.flush()?;
        let data_file = File::open(path.join("db")).map_err(|e| {
            QueueError::Storage(format!("cannot open {}: {e}", path.join("db").display()))
        })?;
        let sequencer = Arc::new(Mutex::new(Sequencer {
            next,
            inserting: BTreeSet::new(),
        }));
        let (readable, counted) = (sequencer.clone(), stored.clone());
        let before_flush = move || {
            // The byte count rides along with every flush, so a restart need not read the
            // whole queue to know it (a crash can leave it off by the calls in flight).
            let bytes = counted.load(Ordering::SeqCst);
            if let Err(e) = meta.insert(STORED_BYTES_KEY, &bytes.to_be_bytes()) {
                tracing::warn!(error = %e, "cannot record the queue's byte count");
            }
            readable.lock().expect("sequencer lock").readable_end()
        };
        let (commit, committer) = GroupCommit::start(
            db.clone(),
            data_file,
            options.sync_interval,
            Box::new(before_flush),
        );
        Ok(Queue {
            inner: Arc::new(Inner {
                db,
                calls,
                rejected,
                dead,
                durability: options.durability,
                max_bytes: options.max_bytes,
                stored_bytes: stored,
                free_space: FreeSpace::new(&options.data_dir, options.min_free_bytes),
                sequencer,
                closed: AtomicBool::new(false),
                commit,
                committer: Mutex::new(Some(committer)),
            }),
        })
    }

    /// Queues one request's calls (and keeps its rejected calls), durably per the
    /// durability mode. Either every call is queued or, on error, none is.
    pub async fn append(
        &self,
        write_key: &str,
        received_ms: u64,
        calls: &[Vec<u8>],
        rejected: &[RejectedCall],
    ) -> Result<(), QueueError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::SeqCst) {
            return Err(QueueError::Storage("the queue is closed".into()));
        }
        let records: Vec<Vec<u8>> = calls
            .iter()
            .map(|call| record::encode_call(write_key, received_ms, call))
            .collect();
        let rejected_records = rejected
            .iter()
            .map(|r| rejected_record(write_key, received_ms, r))
            .collect::<Result<Vec<_>, _>>()?;
        let size: u64 = records
            .iter()
            .chain(&rejected_records)
            .map(|r| r.len() as u64 + KEY_LEN)
            .sum();
        if let Err(free) = inner.free_space.check(size) {
            return Err(QueueError::DiskLow {
                free,
                floor: inner.free_space.floor(),
            });
        }
        self.reserve(size)?;

        let mut inserted_ids = 0..0;
        let inserted = (|| -> Result<(), QueueError> {
            if !rejected_records.is_empty() {
                let mut batch = sled::Batch::default();
                for record in rejected_records {
                    batch.insert(&inner.db.generate_id()?.to_be_bytes(), record);
                }
                inner.rejected.apply_batch(batch)?;
            }
            if !records.is_empty() {
                let first = inner.begin_insert(records.len() as u64);
                let result = if records.len() == 1 {
                    // One insert is atomic by itself, and about 8x cheaper than a batch of
                    // one: `apply_batch` seals a batch marker into sled's log each time.
                    let record = records.into_iter().next().expect("one record");
                    inner.calls.insert(first.to_be_bytes(), record).map(|_| ())
                } else {
                    let mut batch = sled::Batch::default();
                    for (id, record) in (first..).zip(records) {
                        batch.insert(&id.to_be_bytes(), record);
                    }
                    inner.calls.apply_batch(batch)
                };
                inner.end_insert(first);
                result?;
                inserted_ids = first..first + calls.len() as u64;
            }
            Ok(())
        })();
        if let Err(e) = inserted {
            inner.stored_bytes.fetch_sub(size, Ordering::SeqCst);
            tracing::error!(error = %e, "queue insert failed");
            return Err(e);
        }
        match inner.durability {
            Durability::Fsync => {
                let Err(e) = inner.commit.durable().await else {
                    return Ok(());
                };
                // The client will send these again: take them back out, so that a later
                // flush cannot make them durable and have them delivered twice. One key at a
                // time: with a flush stuck after an I/O error, sled's `apply_batch` would
                // wait for that flush forever.
                let removed = inserted_ids
                    .map(|id| inner.calls.remove(id.to_be_bytes()))
                    .all(|r| r.is_ok());
                if removed {
                    inner.stored_bytes.fetch_sub(size, Ordering::SeqCst);
                }
                Err(QueueError::Storage(format!("calls not made durable: {e}")))
            }
            Durability::Interval => {
                inner.commit.mark_dirty();
                Ok(())
            }
        }
    }

    /// Takes `size` bytes of the limit, or refuses without touching anything.
    fn reserve(&self, size: u64) -> Result<(), QueueError> {
        let limit = self.inner.max_bytes;
        self.inner
            .stored_bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |stored| {
                stored.checked_add(size).filter(|&total| total <= limit)
            })
            .map(|_| ())
            .map_err(|stored| QueueError::Full { stored, limit })
    }

    /// Up to `limit` durable calls with ids of `from` or more, in queue order. A call is
    /// handed out only once a flush covers it, so nothing is delivered that a crash could
    /// still take back (and that its client would then send again).
    pub fn read(&self, from: u64, limit: usize) -> Result<Vec<QueuedCall>, QueueError> {
        let end = self
            .inner
            .readable_end()
            .min(self.inner.commit.durable_end());
        let mut out = Vec::new();
        if from >= end {
            return Ok(out);
        }
        for item in self
            .inner
            .calls
            .range(from.to_be_bytes()..end.to_be_bytes())
            .take(limit)
        {
            let (key, value) = item?;
            let id = decode_key(&key)?;
            match record::decode_call(&value) {
                Ok(record) => out.push(QueuedCall {
                    id,
                    record,
                    stored_bytes: value.len() as u64 + KEY_LEN,
                }),
                // One bad record must not stop delivery of the rest.
                Err(e) => self.quarantine(id, &value, &e.to_string())?,
            }
        }
        Ok(out)
    }

    /// Moves a record that cannot be read out of the queue, atomically, into the
    /// `quarantine` tree (same key, its bytes and the reason), for an operator to inspect.
    fn quarantine(&self, id: u64, value: &[u8], reason: &str) -> Result<(), QueueError> {
        use sled::transaction::ConflictableTransactionError;
        use sled::Transactional;
        tracing::error!(
            queue_id = id,
            reason,
            "unreadable queued record moved to quarantine"
        );
        let quarantine = self.inner.db.open_tree(QUARANTINE_TREE)?;
        let mut entry = Vec::with_capacity(reason.len() + 1 + value.len());
        entry.extend_from_slice(reason.as_bytes());
        entry.push(b'\n');
        entry.extend_from_slice(value);
        (&self.inner.calls, &quarantine)
            .transaction(|(calls, quarantine)| {
                calls.remove(&id.to_be_bytes())?;
                quarantine.insert(&id.to_be_bytes(), entry.as_slice())?;
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(transaction_error)
    }

    /// Removes delivered calls in one atomic step and gives their bytes back to the limit.
    pub fn remove(&self, calls: &[QueuedCall]) -> Result<(), QueueError> {
        let mut batch = sled::Batch::default();
        for call in calls {
            batch.remove(&call.id.to_be_bytes());
        }
        self.inner.calls.apply_batch(batch)?;
        let freed: u64 = calls.iter().map(|c| c.stored_bytes).sum();
        self.inner.stored_bytes.fetch_sub(freed, Ordering::SeqCst);
        self.inner.commit.mark_dirty();
        Ok(())
    }

    /// Moves calls from the queue to the dead-letter store in one atomic step: after a crash
    /// each call is in exactly one of the two.
    pub fn dead_letter(&self, calls: &[QueuedCall], reason: &DeadReason) -> Result<(), QueueError> {
        use sled::transaction::ConflictableTransactionError;
        use sled::Transactional;
        let now_ms = crate::clock::unix_ms(std::time::SystemTime::now());
        let mut moves = Vec::with_capacity(calls.len());
        for call in calls {
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
                serde_json::to_vec(&record).map_err(|e| QueueError::Storage(e.to_string()))?;
            moves.push((call.id, self.inner.db.generate_id()?, value));
        }
        let added: u64 = moves.iter().map(|(_, _, v)| v.len() as u64 + KEY_LEN).sum();
        (&self.inner.calls, &self.inner.dead)
            .transaction(|(calls, dead)| {
                for (queue_id, dead_id, value) in &moves {
                    calls.remove(&queue_id.to_be_bytes())?;
                    dead.insert(&dead_id.to_be_bytes(), value.as_slice())?;
                }
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(transaction_error)?;
        let freed: u64 = calls.iter().map(|c| c.stored_bytes).sum();
        // Dead letters still count against the limit, as they still take disk.
        self.inner.stored_bytes.fetch_add(added, Ordering::SeqCst);
        self.inner.stored_bytes.fetch_sub(freed, Ordering::SeqCst);
        self.inner.commit.mark_dirty();
        Ok(())
    }

    /// The dead letters, oldest first.
    pub fn dead(&self) -> Result<Vec<DeadRecord>, QueueError> {
        read_json_tree(&self.inner.dead, "dead letter")
    }

    /// Resolves when more calls become readable (durable) after it was created and
    /// `enable`d or first polled.
    pub fn appended(&self) -> tokio::sync::futures::Notified<'_> {
        self.inner.commit.advanced.notified()
    }

    /// Bytes of stored records counted against the limit.
    pub fn stored_bytes(&self) -> u64 {
        self.inner.stored_bytes.load(Ordering::SeqCst)
    }

    /// Flushes run so far: with group commit, far fewer than appends under concurrency.
    pub fn flushes(&self) -> u64 {
        self.inner.commit.flushes()
    }

    /// The calls ingest refused inside accepted batches, oldest first.
    pub fn rejected(&self) -> Result<Vec<RejectedRecord>, QueueError> {
        read_json_tree(&self.inner.rejected, "rejected record")
    }

    /// Makes everything inserted so far durable, then stops the committer. Appends after
    /// this fail; reads still work.
    pub async fn close(&self) -> Result<(), QueueError> {
        let inner = &self.inner;
        inner.closed.store(true, Ordering::SeqCst);
        let result = inner.commit.durable().await;
        inner.commit.stop();
        let committer = inner.committer.lock().expect("committer lock").take();
        if let Some(task) = committer {
            // A flush stuck after an I/O error must not keep the process from exiting.
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                return Err(QueueError::Storage(
                    "the last flush did not finish; what it covered may not be durable".into(),
                ));
            }
        }
        result.map_err(|e| QueueError::Storage(e.to_string()))
    }
}

impl Inner {
    fn begin_insert(&self, count: u64) -> u64 {
        let mut seq = self.sequencer.lock().expect("sequencer lock");
        let first = seq.next;
        seq.next += count;
        seq.inserting.insert(first);
        first
    }

    fn end_insert(&self, first: u64) {
        self.sequencer
            .lock()
            .expect("sequencer lock")
            .inserting
            .remove(&first);
    }

    fn readable_end(&self) -> u64 {
        self.sequencer
            .lock()
            .expect("sequencer lock")
            .readable_end()
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

fn rejected_record(
    write_key: &str,
    received_ms: u64,
    rejected: &RejectedCall,
) -> Result<Vec<u8>, QueueError> {
    let call = RawValue::from_string(String::from_utf8_lossy(&rejected.raw).into_owned())
        .map_err(|e| QueueError::Storage(format!("rejected call is not JSON: {e}")))?;
    serde_json::to_vec(&RejectedRecord {
        version: record::FORMAT_VERSION,
        received_ms,
        write_key: write_key.to_owned(),
        index: rejected.index,
        code: rejected.violation.code.to_owned(),
        message: rejected.violation.message.clone(),
        call,
    })
    .map_err(|e| QueueError::Storage(e.to_string()))
}

/// Bytes counted against the limit: the count recorded at the last flush, or, for a database
/// without one, a full count.
fn stored_bytes_at_open(meta: &sled::Tree, trees: [&sled::Tree; 3]) -> Result<u64, QueueError> {
    if trees.iter().all(|t| t.is_empty()) {
        return Ok(0);
    }
    if let Some(recorded) = meta.get(STORED_BYTES_KEY)? {
        if let Ok(bytes) = <[u8; 8]>::try_from(recorded.as_ref()) {
            return Ok(u64::from_be_bytes(bytes));
        }
    }
    let mut stored = 0;
    for tree in trees {
        for value in tree.iter().values() {
            stored += value?.len() as u64 + KEY_LEN;
        }
    }
    Ok(stored)
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
            serde_json::from_slice(&value)
                .map_err(|e| QueueError::Storage(format!("damaged {what}: {e}")))
        })
        .collect()
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

fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join(DB_DIR)
}

fn decode_key(key: &[u8]) -> Result<u64, QueueError> {
    key.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| QueueError::Storage(format!("queue key of {} bytes", key.len())))
}
