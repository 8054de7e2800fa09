//! The appender: packs the calls of every request waiting at one moment into a few chunks
//! and writes them with one sled operation.
//!
//! There is no writer thread to hand work to (each hand-off between threads costs a wake-up,
//! which measured more than the write itself). A request puts its records on the pending
//! list; if no one is writing, it becomes the writer: it yields once, so that the requests
//! its worker has ready add theirs, then writes rounds until the list is empty, the calls
//! of requests that arrived meanwhile included. A round takes everything pending, packs it
//! into chunks of at most [`CHUNK_BYTES`] and writes them: a single `insert` when one chunk
//! holds the round, else one atomic `apply_batch`. So the calls of a request are stored all
//! together or not at all, ids follow arrival order, and 64 concurrent requests cost a few
//! sled writes instead of 64.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, Notify};

use super::commit::GroupCommit;
use super::record::{self, CHUNK_ENTRY_OVERHEAD, CHUNK_HEADER_LEN};
use super::{chunk_key, Durability, QueueError, KEY_OVERHEAD};

/// Most record bytes in one chunk. sled 0.34 splits a leaf past 16 keys and writes any log
/// message over a quarter of a 512 KiB segment as a separate *blob* file; 17 chunks of this
/// size stay under that, so chunks live in sled's log like any small value.
pub const CHUNK_BYTES: usize = 7_000;

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
    pub stored_bytes: Arc<AtomicU64>,
    pub commit: Arc<GroupCommit>,
    pub durability: Durability,
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
    /// Only the current writer takes it.
    target: Mutex<Target>,
    /// Woken when a writer finds the list empty and stops.
    idle: Notify,
}

impl Appender {
    pub fn start(target: Target) -> Result<Arc<Appender>, QueueError> {
        Ok(Arc::new(Appender {
            pending: Mutex::new(Pending {
                round: Vec::new(),
                writing: false,
                closed: false,
            }),
            target: Mutex::new(target),
            idle: Notify::new(),
        }))
    }

    /// Writes the records (not yet durable: the caller waits for that).
    pub async fn append(self: &Arc<Self>, records: Vec<Vec<u8>>) -> Result<(), QueueError> {
        let (reply, answer) = oneshot::channel();
        let lead = {
            let mut pending = self.pending.lock().expect("appender lock");
            if pending.closed {
                return Err(closed());
            }
            pending.round.push((records, reply));
            !std::mem::replace(&mut pending.writing, true)
        };
        if lead {
            // Let the other requests this worker has ready run first, so that they join the
            // round: without this, under 64 connections a round held 1.1 calls on average
            // (a sled key each); with it, about 8 (bench: CPU per request about -20 %).
            let lead = Lead(self.clone());
            tokio::task::yield_now().await;
            drop(lead);
        }
        answer.await.map_err(|_| closed())?
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
                Err(_) => answer(
                    round,
                    Err(QueueError::Storage(
                        "an earlier queue write failed part way; restart grouprelay".into(),
                    )),
                ),
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
/// of every later one waiting for a writer that is gone; the requests pending then get an
/// error (their answer channels are dropped). Forgotten on every normal exit, so it acts
/// only when the write itself unwinds, not when a [`Lead`] writes while its thread unwinds
/// from something else.
struct WriterGuard<'a>(&'a Appender);

impl Drop for WriterGuard<'_> {
    fn drop(&mut self) {
        let mut pending = self
            .0
            .pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        pending.round.clear();
        pending.writing = false;
        drop(pending);
        self.0.idle.notify_waiters();
    }
}

fn closed() -> QueueError {
    QueueError::Storage("the queue is closed".into())
}

type Round = Vec<(Vec<Vec<u8>>, oneshot::Sender<Result<(), QueueError>>)>;

impl Target {
    fn write(&mut self, round: Round) {
        if round.is_empty() {
            return;
        }
        let mut chunks: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut first = self.next_id;
        let mut packing: Vec<&[u8]> = Vec::new();
        let mut packed = 0;
        let mut seal = |packing: &mut Vec<&[u8]>, first: &mut u64| {
            let count = u32::try_from(packing.len()).expect("a chunk holds few calls");
            let key = chunk_key(*first, count);
            chunks.push((key.to_vec(), record::encode_chunk(packing.iter().copied())));
            *first += u64::from(count);
            packing.clear();
        };
        for record in round.iter().flat_map(|(records, _)| records) {
            if !packing.is_empty() && packed + record.len() + CHUNK_ENTRY_OVERHEAD > CHUNK_BYTES {
                seal(&mut packing, &mut first);
                packed = 0;
            }
            packing.push(record);
            packed += record.len() + CHUNK_ENTRY_OVERHEAD;
        }
        if !packing.is_empty() {
            seal(&mut packing, &mut first);
        }
        let chunk_count = chunks.len() as u64;
        crate::failpoint::panic_at("queue-write-panics");
        let written = if chunks.len() == 1 {
            // One insert is atomic by itself, and far cheaper than a batch of one: sled's
            // `apply_batch` seals a batch marker into its log every time.
            let (key, value) = chunks.pop().expect("one chunk");
            self.tree.insert(key, value).map(|_| ())
        } else {
            let mut batch = sled::Batch::default();
            for (key, value) in chunks {
                batch.insert(key, value);
            }
            self.tree.apply_batch(batch)
        };
        let result = match written {
            Ok(()) => {
                crate::failpoint::hit("queue-after-write");
                self.next_id = first;
                // The requests reserved their records' bytes; the chunks' own overhead is
                // counted here, so that a removed chunk gives back exactly what it took.
                self.stored_bytes.fetch_add(
                    chunk_count * (CHUNK_HEADER_LEN as u64 + KEY_OVERHEAD),
                    Ordering::SeqCst,
                );
                self.inserted_end.store(first, Ordering::SeqCst);
                if self.durability == Durability::Interval {
                    self.commit.mark_dirty();
                }
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "queue insert failed");
                Err(QueueError::from(e))
            }
        };
        answer(round, result);
    }
}

fn answer(round: Round, result: Result<(), QueueError>) {
    for (_, reply) in round {
        let _ = reply.send(result.clone());
    }
}
