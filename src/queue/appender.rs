//! The appender: packs the calls of every request waiting at one moment into a few chunks
//! and writes them, a sled insert per chunk (or one batch, when a request needs several).
//!
//! There is no writer thread to hand work to (each hand-off between threads costs a wake-up,
//! which costs more than the write itself). A request puts its records on the pending
//! list; if no one is writing, it becomes the writer: it yields once, so that the requests
//! its worker has ready add theirs, then writes rounds until the list is empty, the calls
//! of requests that arrived meanwhile included. A round takes everything pending and packs
//! it into chunks of at most [`chunk_bytes`], a request's calls all in one chunk when they
//! fit (else in chunks of their own), and writes each chunk with one `insert`; a round in
//! which some request needs several chunks goes in one atomic `apply_batch` instead. So the
//! calls of a request are stored all together or not at all, ids follow arrival order, and
//! 64 concurrent requests cost a few sled writes instead of 64.
//!
//! Why not always one batch: sled's `apply_batch` seals its log buffer before and after, and
//! each seal is a `pwrite` and a `sync_file_range` on an I/O thread, so a batch costs far
//! more than an insert. (The figures behind this file's choices are in the README,
//! "Performance".)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, Notify};

use super::budget::{Budget, KEY_OVERHEAD};
use super::commit::{AppendError, GroupCommit, Reply};
use super::error::QueueError;
use super::keys::chunk_key;
use super::options::Durability;
use super::record::{self, CHUNK_HEADER_LEN};
use super::sled_config::LEAF_SPLIT_BYTES;

/// A chunk's record bytes are at most this share of sled's log segment, where leaves of such
/// chunks stay under a quarter of a segment, past which sled writes a leaf to a blob file of
/// its own at every change (see `sled_config`). Our sled splits a leaf past
/// [`LEAF_SPLIT_BYTES`] once it has 4 keys, so a leaf holds at most that and one more
/// chunk, and a merge can add one more: with 2 MiB segments a 26th, 80,659 bytes, so that a
/// 100-call request (about 65 KB) is one chunk and one sled insert.
const CHUNKS_PER_SEGMENT: usize = 26;

/// The share for segments too small for [`CHUNKS_PER_SEGMENT`] (a database created before
/// 2026-12-03 has 512 KiB ones): a 75th, 6,990 bytes, which the leaf's key count bounds
/// instead (sled splits past 16 keys; 18 chunks, with a merge, are under a quarter).
const CHUNKS_PER_SMALL_SEGMENT: usize = 75;

/// Room for sled's own framing of a leaf: its keys, lengths and message header.
const LEAF_FRAMING_BYTES: usize = 16 << 10;

/// Most record bytes in one chunk of a database whose log segments are `segment_bytes`.
pub fn chunk_bytes(segment_bytes: usize) -> usize {
    let blob_bytes = segment_bytes / 4;
    let chunk = segment_bytes / CHUNKS_PER_SEGMENT;
    let largest_leaf = LEAF_SPLIT_BYTES as usize + 2 * chunk + LEAF_FRAMING_BYTES;
    if largest_leaf < blob_bytes {
        chunk
    } else {
        segment_bytes / CHUNKS_PER_SMALL_SEGMENT
    }
}

/// Rounds one writer writes before it hands the rest to a fresh task, so that its own
/// request is not held up behind a steady stream of others.
const ROUNDS_PER_WRITER: usize = 8;

/// What the appender writes into, shared with the queue.
pub(crate) struct Target {
    pub tree: sled::Tree,
    /// The next call id.
    pub next_id: u64,
    /// One past the last id whose chunk is written; readers stop there.
    pub inserted_end: Arc<AtomicU64>,
    pub budget: Arc<Budget>,
    pub commit: Arc<GroupCommit>,
    pub durability: Durability,
    /// Most record bytes in one chunk: [`chunk_bytes`] of the database's segment size.
    pub chunk_bytes: usize,
}

struct Pending {
    round: Round,
    /// Someone is writing: new requests only join the list.
    writing: bool,
    /// Set by `close`: appends are refused.
    closed: bool,
}

pub(crate) struct Appender {
    pending: Mutex<Pending>,
    /// The queue's byte count, to give back the bytes of requests refused unwritten.
    budget: Arc<Budget>,
    /// Only the current writer takes it.
    target: Mutex<Target>,
    /// Woken when a writer finds the list empty and stops.
    idle: Notify,
}

impl Appender {
    pub fn start(target: Target) -> Result<Arc<Appender>, QueueError> {
        Ok(Arc::new(Appender {
            budget: target.budget.clone(),
            pending: Mutex::new(Pending {
                round: Vec::new(),
                writing: false,
                closed: false,
            }),
            target: Mutex::new(target),
            idle: Notify::new(),
        }))
    }

    /// Writes the records; in `fsync` mode returns only once a flush has covered them.
    pub async fn append(self: &Arc<Self>, records: Vec<Vec<u8>>) -> Result<(), AppendError> {
        let (reply, answer) = oneshot::channel();
        let lead = {
            let mut pending = self.pending.lock().expect("appender lock");
            if pending.closed {
                return Err(AppendError::NotWritten(QueueError::Closed));
            }
            pending.round.push((records, reply));
            !std::mem::replace(&mut pending.writing, true)
        };
        if lead {
            // Let the other requests this worker has ready run first, so that they join the
            // round: without this a round holds about one call, and each call costs a sled
            // key of its own.
            let lead = Lead(self.clone());
            tokio::task::yield_now().await;
            drop(lead);
        }
        // Dropped unanswered: the write panicked part way, or the committer did.
        answer.await.unwrap_or_else(|_| {
            Err(AppendError::NotDurable(Arc::from(
                "the write or its flush was interrupted",
            )))
        })
    }

    /// Writes rounds until nothing is pending, or hands on to a new task after
    /// [`ROUNDS_PER_WRITER`].
    fn write_rounds(self: &Arc<Self>) {
        let unwinding = WriterGuard(self);
        for _ in 0..ROUNDS_PER_WRITER {
            let round = {
                let mut pending = self
                    .pending
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                if pending.round.is_empty() {
                    pending.writing = false;
                    drop(pending);
                    self.idle.notify_waiters();
                    std::mem::forget(unwinding);
                    return;
                }
                std::mem::take(&mut pending.round)
            };
            match self.target.lock() {
                Ok(mut target) => target.write(round),
                // An earlier write panicked part way: the next id and the byte count may no
                // longer match what sled holds, and writing on could overwrite stored calls.
                // Refuse (503) until a restart reads the state back from disk.
                Err(_) => {
                    for (records, reply) in round {
                        refuse(&self.budget, &records, reply, QueueError::Broken);
                    }
                }
            }
        }
        std::mem::forget(unwinding);
        let next = self.clone();
        tokio::spawn(async move { next.write_rounds() });
    }

    /// A write panicked part way, and appends are refused until a restart.
    pub fn broken(&self) -> bool {
        self.target.is_poisoned()
    }

    /// Refuses appends from now on and waits until every one already pending is written.
    pub async fn close(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            {
                let mut pending = self.pending.lock().expect("appender lock");
                pending.closed = true;
                if !pending.writing {
                    return;
                }
            }
            idle.await;
        }
    }
}

/// The writing duty of the request that found no one writing, carried out when dropped: so
/// that a request dropped while it yields (its client gone) still writes the round, which
/// would otherwise be left without a writer.
struct Lead(Arc<Appender>);

impl Drop for Lead {
    fn drop(&mut self) {
        self.0.write_rounds();
    }
}

/// Should a write panic (inside sled, say), lets the next request become the writer instead
/// of every later one waiting for a writer that is gone; the requests still pending are
/// refused, unwritten (those of the round being written learn only that it was interrupted:
/// part of it may be stored). Forgotten on every normal exit, so it acts only when the write
/// itself unwinds, not when a [`Lead`] writes while its thread unwinds from something else.
struct WriterGuard<'a>(&'a Appender);

impl Drop for WriterGuard<'_> {
    fn drop(&mut self) {
        let mut pending = self
            .0
            .pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let round = std::mem::take(&mut pending.round);
        pending.writing = false;
        drop(pending);
        self.0.idle.notify_waiters();
        for (records, reply) in round {
            refuse(&self.0.budget, &records, reply, QueueError::Broken);
        }
    }
}

/// Answers a request whose calls were not written; if it is gone (it timed out), gives back
/// the bytes it reserved, which it would have done itself.
fn refuse(budget: &Budget, records: &[Vec<u8>], reply: Reply, error: QueueError) {
    if reply.send(Err(AppendError::NotWritten(error))).is_err() {
        budget.release(record::entries_size(records) as u64);
    }
}

type Round = Vec<(Vec<Vec<u8>>, Reply)>;

impl Target {
    fn write(&mut self, round: Round) {
        if round.is_empty() {
            return;
        }
        let (units, needs) = pack(&round, self.next_id, self.chunk_bytes);
        crate::failpoint::panic_at("queue-write-panics");
        // Units are written one by one, in id order: an `insert` each, or one `apply_batch`
        // (see the module's notes). A crash between two units keeps a prefix of them, as
        // between two rounds.
        let mut written = 0;
        let mut error = None;
        for unit in units {
            let end = unit.end;
            let chunk_count = unit.chunks.len() as u64;
            let result = match <[_; 1]>::try_from(unit.chunks) {
                _ if crate::failpoint::fails_at("queue-unit-write-fails") => Err(sled::Error::Io(
                    std::io::Error::other("failpoint queue-unit-write-fails"),
                )),
                Ok([(key, value)]) => self.tree.insert(key, value).map(|_| ()),
                Err(chunks) => {
                    let mut batch = sled::Batch::default();
                    for (key, value) in chunks {
                        batch.insert(key, value);
                    }
                    self.tree.apply_batch(batch)
                }
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "queue insert failed");
                error = Some(QueueError::from(e));
                break;
            }
            written += 1;
            self.next_id = end;
            // The requests reserved their records' bytes; the chunks' own overhead is
            // counted here, so that a removed chunk gives back exactly what it took.
            self.budget
                .add(chunk_count * (CHUNK_HEADER_LEN as u64 + KEY_OVERHEAD));
        }
        if written > 0 {
            self.inserted_end.store(self.next_id, Ordering::SeqCst);
            if self.durability == Durability::Interval {
                self.commit.mark_dirty();
                // Readable once written in this mode (`Inner::readable_end`).
                self.commit.announce_readable();
            }
        }
        if error.is_none() {
            crate::failpoint::hit("queue-after-write");
        }
        let mut stored = Vec::with_capacity(round.len());
        for ((records, reply), needs) in round.into_iter().zip(needs) {
            match &error {
                Some(e) if needs > written => refuse(&self.budget, &records, reply, e.clone()),
                _ => stored.push(reply),
            }
        }
        match self.durability {
            Durability::Fsync => self.commit.answer_after_flush(stored),
            Durability::Interval => {
                for reply in stored {
                    let _ = reply.send(Ok(()));
                }
            }
        }
    }
}

/// Chunks written in one sled operation.
struct Unit {
    chunks: Vec<(Vec<u8>, Vec<u8>)>,
    /// One past the last id it holds.
    end: u64,
}

/// Packs a round's records into chunks of at most `chunk_bytes` (a record bigger than
/// that alone in one), keeping each request's records in one unit: in one chunk when they
/// fit in one, else in chunks of their own; and when any request needs several chunks, the
/// whole round in one unit. Returns the units and, for each request, how many units must be
/// written for all its records to be.
fn pack(round: &Round, first_id: u64, chunk_bytes: usize) -> (Vec<Unit>, Vec<usize>) {
    let mut units = Vec::new();
    let mut needs = Vec::with_capacity(round.len());
    let mut next_id = first_id;
    let mut packing: Vec<&[u8]> = Vec::new();
    let mut packed = 0;
    let mut seal = |packing: &mut Vec<&[u8]>, chunks: &mut Vec<(Vec<u8>, Vec<u8>)>| {
        let count = u32::try_from(packing.len()).expect("a chunk holds few calls");
        let key = chunk_key(next_id, count);
        chunks.push((key.to_vec(), record::encode_chunk(packing.iter().copied())));
        next_id += u64::from(count);
        packing.clear();
        next_id
    };
    for (records, _) in round {
        let size = record::entries_size(records);
        if packed + size > chunk_bytes && !packing.is_empty() {
            let mut chunks = Vec::with_capacity(1);
            let end = seal(&mut packing, &mut chunks);
            units.push(Unit { chunks, end });
            packed = 0;
        }
        if size <= chunk_bytes {
            packing.extend(records.iter().map(Vec::as_slice));
            packed += size;
            needs.push(units.len() + usize::from(!packing.is_empty()));
            continue;
        }
        // Too big for one chunk (a batch, say): chunks of its own, written atomically.
        let mut chunks = Vec::new();
        for record in records {
            if !packing.is_empty() && packed + record::entry_size(record) > chunk_bytes {
                seal(&mut packing, &mut chunks);
                packed = 0;
            }
            packing.push(record);
            packed += record::entry_size(record);
        }
        // `records` is not empty (its size is over a chunk), so neither is `packing`.
        let end = seal(&mut packing, &mut chunks);
        packed = 0;
        units.push(Unit { chunks, end });
        needs.push(units.len());
    }
    if !packing.is_empty() {
        let mut chunks = Vec::with_capacity(1);
        let end = seal(&mut packing, &mut chunks);
        units.push(Unit { chunks, end });
    }
    if units.len() > 1 && units.iter().any(|unit| unit.chunks.len() > 1) {
        // A batch is written anyway, and its cost is per batch, not per chunk: one for the
        // whole round.
        let end = units.last().map_or(first_id, |unit| unit.end);
        let chunks = units.into_iter().flat_map(|unit| unit.chunks).collect();
        return (vec![Unit { chunks, end }], vec![1; needs.len()]);
    }
    (units, needs)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::queue::sled_config::{LEGACY_SEGMENT_BYTES, SEGMENT_BYTES};

    fn round_of(requests: &[Vec<usize>]) -> Round {
        requests
            .iter()
            .enumerate()
            .map(|(i, sizes)| {
                let records = sizes.iter().map(|&n| vec![i as u8; n]).collect();
                (records, oneshot::channel().0)
            })
            .collect()
    }

    proptest! {
        /// Whatever the mix of request sizes: every record is stored once, in order, under
        /// consecutive ids; each request lies in one unit (so it is written atomically); no
        /// chunk is over the limit unless it holds a single record; a round has at most one
        /// several-chunk unit, and then no other; and a request is told its unit.
        #[test]
        fn packing_keeps_each_request_in_one_unit(
            requests in prop::collection::vec(
                prop::collection::vec(0usize..36_000, 0..12), 1..40),
            first_id in 0u64..1_000_000,
            segment_bytes in prop::sample::select(vec![LEGACY_SEGMENT_BYTES, SEGMENT_BYTES]),
        ) {
            let round = round_of(&requests);
            let limit = chunk_bytes(segment_bytes);
            let (units, needs) = pack(&round, first_id, limit);
            prop_assert_eq!(needs.len(), requests.len());
            // Batches cost per batch: a round has at most one, and then only that.
            if units.iter().any(|unit| unit.chunks.len() > 1) {
                prop_assert_eq!(units.len(), 1);
            }
            let mut next_id = first_id;
            let mut stored = Vec::new();
            for unit in &units {
                prop_assert!(!unit.chunks.is_empty());
                for (key, value) in &unit.chunks {
                    let chunk = crate::queue::keys::decode_chunk_key(key).unwrap();
                    prop_assert_eq!(chunk.first, next_id);
                    let records = record::decode_chunk(value).unwrap();
                    prop_assert_eq!(records.len(), chunk.count as usize);
                    let size: usize = records.iter().map(|r| record::entry_size(r)).sum();
                    prop_assert!(size <= limit || records.len() == 1);
                    next_id = chunk.end();
                    stored.extend(records.iter().map(|r| (r.to_vec(), units_index(&units, unit))));
                }
                prop_assert_eq!(unit.end, next_id);
            }
            let sent: Vec<(usize, usize)> = requests
                .iter()
                .enumerate()
                .flat_map(|(i, sizes)| sizes.iter().map(move |&n| (i, n)))
                .collect();
            prop_assert_eq!(stored.len(), sent.len());
            for ((record, unit), (request, size)) in stored.iter().zip(&sent) {
                prop_assert_eq!(record.len(), *size);
                prop_assert!(record.iter().all(|&b| b == *request as u8));
                // One unit per request, and the request is told that one.
                let units_of_request: std::collections::BTreeSet<usize> = stored
                    .iter()
                    .zip(&sent)
                    .filter(|(_, (r, _))| r == request)
                    .map(|((_, u), _)| *u)
                    .collect();
                prop_assert_eq!(units_of_request.len(), 1);
                prop_assert_eq!(needs[*request], *unit + 1);
            }
        }
    }

    fn units_index(units: &[Unit], unit: &Unit) -> usize {
        units
            .iter()
            .position(|u| std::ptr::eq(u, unit))
            .expect("unit of the list")
    }
}
