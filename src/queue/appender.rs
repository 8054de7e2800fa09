//! The appender: the one thread that writes calls into the queue, packing the calls of
//! every request waiting at that moment into a few chunks.
//!
//! Requests hand their encoded records over a channel and wait for the answer. The thread
//! takes everything queued up (up to [`ROUND_BYTES`]), packs it into chunks of at most
//! [`CHUNK_BYTES`] and writes them in one sled operation: a single `insert` when one chunk
//! holds the round, else one atomic `apply_batch`. So the calls of a request are stored all
//! together or not at all, ids follow arrival order, and 64 concurrent requests cost a few
//! sled writes instead of 64.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::commit::GroupCommit;
use super::record::{self, CHUNK_ENTRY_OVERHEAD, CHUNK_HEADER_LEN};
use super::{chunk_key, Durability, QueueError, KEY_OVERHEAD};

/// Most record bytes in one chunk. sled 0.34 splits a leaf past 16 keys and writes any log
/// message over a quarter of a 512 KiB segment as a separate *blob* file; 17 chunks of this
/// size stay under that, so chunks live in sled's log like any small value.
pub const CHUNK_BYTES: usize = 7_000;
/// Most record bytes written in one round; the rest waits for the next.
const ROUND_BYTES: usize = 4 << 20;

enum Job {
    Append {
        records: Vec<Vec<u8>>,
        reply: oneshot::Sender<Result<(), QueueError>>,
    },
    /// Answered once every append sent before it is written; later ones are refused.
    Close(oneshot::Sender<()>),
}

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

pub(crate) struct Appender {
    jobs: mpsc::Sender<Job>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Appender {
    pub fn start(target: Target) -> Result<Appender, QueueError> {
        let (jobs, receiver) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("grouprelay-appender".into())
            .spawn(move || run(receiver, target))
            .map_err(|e| QueueError::Storage(format!("cannot start the appender: {e}")))?;
        Ok(Appender {
            jobs,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// Writes the records (not yet durable: the caller waits for that).
    pub async fn append(&self, records: Vec<Vec<u8>>) -> Result<(), QueueError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job::Append { records, reply })
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    /// Writes every append sent before, refuses those after, and ends the thread (so that
    /// its handle on the database is gone when this returns).
    pub async fn close(&self) {
        let (reply, answer) = oneshot::channel();
        if self.jobs.send(Job::Close(reply)).is_ok() {
            let _ = answer.await;
        }
        let thread = self.thread.lock().expect("appender lock").take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

fn closed() -> QueueError {
    QueueError::Storage("the queue is closed".into())
}

fn run(jobs: mpsc::Receiver<Job>, mut target: Target) {
    while let Ok(first) = jobs.recv() {
        let mut round = Vec::new();
        let mut bytes = 0;
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Append { records, reply } => {
                    bytes += records.iter().map(Vec::len).sum::<usize>();
                    round.push((records, reply));
                }
                Job::Close(reply) => {
                    target.write(round);
                    let _ = reply.send(());
                    return;
                }
            }
            if bytes < ROUND_BYTES {
                next = jobs.try_recv().ok();
            }
        }
        target.write(round);
    }
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
        for (_, reply) in round {
            let _ = reply.send(result.clone());
        }
    }
}
