//! The queue against an in-memory model: random runs of appends, removals, dead-letterings,
//! reads and reopenings on a real sled database, with every observable checked after each step.
//!
//! The model is what the queue promises (`src/queue/mod.rs`): ids handed out one per accepted
//! call, in order, never reused; a call pending until removed or dead-lettered, and settling a
//! call twice changing nothing; `accepted = delivered + dead + pending`; and stored bytes that
//! are exactly the live chunks plus the dead letters.

mod common;

use std::collections::BTreeMap;

use common::{balanced, numbered, open_again};
use grouprelay::queue::{
    ChunkRef, DeadReason, Durability, Queue, QueueError, QueueOptions, QueuedCall,
};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;

/// Write keys of different lengths (and one not ASCII), since a record carries its key.
const KEYS: [&str; 3] = ["key-a", "wk_0123456789abcdef0123456789", "ключ-c"];

/// Bytes the queue counts against its limit for each stored value besides the value itself.
/// Mirrors `KEY_OVERHEAD` in `src/queue/mod.rs`: the byte check below needs it, and a change
/// there should be a deliberate change here.
const KEY_OVERHEAD: u64 = 16;

/// Bytes a call record takes besides its write key and its JSON: format, `received_ms`, key
/// length (`record::encode_call`), and its length prefix inside a chunk.
const RECORD_OVERHEAD: u64 = 1 + 8 + 2 + 4;

/// Bytes a chunk takes besides its records: its header, and its key as the limit counts it.
const CHUNK_OVERHEAD: u64 = 1 + 4 + KEY_OVERHEAD;

/// One step of a run.
#[derive(Debug, Clone)]
enum Op {
    /// One request: a call per entry, each padded by that many bytes. A large pad (past the
    /// appender's chunks: at most 80,659 bytes in a new database) makes a chunk of one call.
    Append { key: usize, pads: Vec<usize> },
    /// Delivered: `queue.remove`.
    Remove(Pick),
    /// Given up on: `queue.dead_letter` as `expired`.
    DeadLetter(Pick),
    /// `close`, drop, and open the same directory again.
    Reopen,
    /// `read(from, limit)`, with `from` near a pending call's id (or past the end).
    ReadFrom { at: Index, shift: i64, limit: usize },
}

/// Which calls a removal or a dead-lettering hands the queue.
#[derive(Debug, Clone)]
struct Pick {
    select: Select,
    /// How many calls settled earlier to hand in again (settling twice must change nothing).
    stale: usize,
    stale_at: Index,
    /// Hand the calls in reverse id order.
    reverse: bool,
    /// Hand every call in twice in the same request.
    twice: bool,
}

/// Which of the currently pending calls (in id order) to pick.
#[derive(Debug, Clone)]
enum Select {
    None,
    All,
    /// Call `i` if bit `i % 64` is set.
    Mask(u64),
    /// `len` calls from a position.
    Range(Index, usize),
}

fn select() -> impl Strategy<Value = Select> {
    prop_oneof![
        1 => Just(Select::None),
        2 => Just(Select::All),
        5 => any::<u64>().prop_map(Select::Mask),
        4 => (any::<Index>(), 1usize..12).prop_map(|(at, len)| Select::Range(at, len)),
    ]
}

fn pick() -> impl Strategy<Value = Pick> {
    (
        select(),
        prop_oneof![3 => Just(0usize), 1 => 1usize..4],
        any::<Index>(),
        any::<bool>(),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(select, stale, stale_at, reverse, twice)| Pick {
            select,
            stale,
            stale_at,
            reverse,
            twice,
        })
}

fn op() -> impl Strategy<Value = Op> {
    let pad = prop_oneof![15 => 0usize..600, 1 => 600usize..40_000, 1 => 81_000usize..90_000];
    prop_oneof![
        4 => (0..KEYS.len(), prop::collection::vec(pad, 1..=20))
            .prop_map(|(key, pads)| Op::Append { key, pads }),
        3 => pick().prop_map(Op::Remove),
        2 => pick().prop_map(Op::DeadLetter),
        1 => Just(Op::Reopen),
        2 => (any::<Index>(), -3i64..=3, prop_oneof![0usize..8, Just(usize::MAX)])
            .prop_map(|(at, shift, limit)| Op::ReadFrom { at, shift, limit }),
    ]
}

/// A call as the queue must give it back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expected {
    write_key: &'static str,
    received_ms: u64,
    call: Vec<u8>,
}

impl Expected {
    fn of(call: &QueuedCall) -> (u64, Expected) {
        let key = KEYS
            .iter()
            .find(|k| **k == call.record.write_key)
            .copied()
            .unwrap_or("<a write key never appended>");
        (
            call.id,
            Expected {
                write_key: key,
                received_ms: call.record.received_ms,
                call: call.record.call.clone(),
            },
        )
    }
}

/// What the queue should hold.
#[derive(Default)]
struct Model {
    /// The id the next call gets: ids start at 0 and are never reused, so this is also the
    /// count of calls ever accepted.
    next_id: u64,
    pending: BTreeMap<u64, Expected>,
    delivered: u64,
    /// Dead-lettered calls, in the order they were dead-lettered (the dead store's order).
    dead: Vec<(u64, Expected)>,
    /// Calls already removed or dead-lettered, as the queue handed them out: handed in again
    /// to check that settling is idempotent.
    settled: Vec<QueuedCall>,
    /// Makes every call's JSON unique.
    calls_made: u64,
}

impl Model {
    fn make_call(&mut self, pad: usize) -> Vec<u8> {
        let call = numbered(self.calls_made);
        self.calls_made += 1;
        match pad {
            0 => call.bytes(),
            pad => call.pad(pad).bytes(),
        }
    }

    /// The calls a pick hands the queue, given the pending calls as the queue read them.
    fn picked(&self, pick: &Pick, pending: &[QueuedCall]) -> Vec<QueuedCall> {
        let mut calls: Vec<QueuedCall> = match pick.select {
            Select::None => Vec::new(),
            Select::All => pending.to_vec(),
            Select::Mask(mask) => pending
                .iter()
                .enumerate()
                .filter(|(i, _)| mask >> (i % 64) & 1 == 1)
                .map(|(_, c)| c.clone())
                .collect(),
            Select::Range(at, len) if !pending.is_empty() => {
                let start = at.index(pending.len());
                pending[start..(start + len).min(pending.len())].to_vec()
            }
            Select::Range(..) => Vec::new(),
        };
        // Calls settled before, whether their chunk is still stored or already gone: settling
        // them again must change nothing.
        let stale: Vec<&QueuedCall> = self.settled.iter().collect();
        if pick.stale > 0 && !stale.is_empty() {
            let start = pick.stale_at.index(stale.len());
            let end = (start + pick.stale).min(stale.len());
            calls.extend(stale[start..end].iter().map(|c| (*c).clone()));
        }
        if pick.reverse {
            calls.reverse();
        }
        if pick.twice {
            calls.extend_from_slice(&calls.clone());
        }
        calls
    }

    /// Settles `calls` in the order given: a call not pending is left alone. Returns the
    /// calls newly settled, in that order.
    fn settle(&mut self, calls: &[QueuedCall]) -> Vec<(u64, Expected)> {
        let mut settled = Vec::new();
        for call in calls {
            if let Some(expected) = self.pending.remove(&call.id) {
                settled.push((call.id, expected));
                self.settled.push(call.clone());
            }
        }
        settled
    }
}

fn queue_error(what: &str, e: QueueError) -> TestCaseError {
    TestCaseError::fail(format!("{what}: {e}"))
}

/// Every observable of the queue against the model.
fn check(queue: &Queue, model: &Model) -> Result<(), TestCaseError> {
    let all = queue
        .read(0, usize::MAX)
        .map_err(|e| queue_error("read", e))?;
    let got: Vec<(u64, Expected)> = all.iter().map(Expected::of).collect();
    let want: Vec<(u64, Expected)> = model
        .pending
        .iter()
        .map(|(id, e)| (*id, e.clone()))
        .collect();
    prop_assert_eq!(got, want, "read(0, MAX) differs from the pending calls");

    // Each call lies in the chunk it names; the chunks named do not overlap and lie below
    // the next id; a chunk holds at least the pending calls in it.
    let mut chunks: BTreeMap<u64, (ChunkRef, u64)> = BTreeMap::new();
    for call in &all {
        let chunk = call.chunk;
        prop_assert!(
            chunk.first <= call.id && call.id < chunk.end(),
            "call {} is outside its chunk {:?}",
            call.id,
            chunk
        );
        let size =
            RECORD_OVERHEAD + call.record.write_key.len() as u64 + call.record.call.len() as u64;
        let entry = chunks.entry(chunk.first).or_insert((chunk, CHUNK_OVERHEAD));
        prop_assert_eq!(entry.0, chunk, "one chunk, two descriptions");
        entry.1 += size;
    }
    let mut end = 0;
    for (chunk, least) in chunks.values() {
        prop_assert!(
            chunk.first >= end,
            "chunk {:?} overlaps the one before",
            chunk
        );
        end = chunk.end();
        prop_assert!(
            chunk.stored_bytes >= *least,
            "chunk {:?} is smaller than its pending calls ({} bytes)",
            chunk,
            least
        );
    }
    prop_assert!(end <= model.next_id, "a chunk ends past the last id");

    let counts = queue.counts();
    // Zeros left out: a dead-lettering that settles nothing still records its reason, at 0.
    let dead: BTreeMap<&str, u64> = counts
        .dead
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(reason, n)| (reason.as_str(), *n))
        .collect();
    let want_dead: BTreeMap<&str, u64> = match model.dead.len() as u64 {
        0 => BTreeMap::new(),
        n => BTreeMap::from([("expired", n)]),
    };
    prop_assert_eq!(counts.accepted, model.next_id, "accepted");
    prop_assert_eq!(counts.delivered, model.delivered, "delivered");
    prop_assert_eq!(dead, want_dead, "dead");
    prop_assert_eq!(counts.pending, model.pending.len() as u64, "pending");
    balanced(&counts).map_err(TestCaseError::fail)?;
    prop_assert_eq!(counts.rejected, 0, "rejected");

    let letters = queue.dead().map_err(|e| queue_error("dead", e))?;
    let got: Vec<(u64, &str, u64, &[u8])> = letters
        .iter()
        .map(|d| {
            (
                d.queue_id,
                d.write_key.as_str(),
                d.received_ms,
                d.call.get().as_bytes(),
            )
        })
        .collect();
    let want: Vec<(u64, &str, u64, &[u8])> = model
        .dead
        .iter()
        .map(|(id, e)| (*id, e.write_key, e.received_ms, e.call.as_slice()))
        .collect();
    prop_assert_eq!(
        got,
        want,
        "the dead letters differ from the calls dead-lettered"
    );
    for letter in &letters {
        prop_assert_eq!(letter.reason.as_str(), "expired");
        prop_assert_eq!(letter.status, None);
        prop_assert_eq!(letter.attempts, 1);
    }

    // Stored bytes are exactly the live chunks (each call's chunk names its size on disk)
    // and the dead letters as stored.
    let chunk_bytes: u64 = chunks.values().map(|(c, _)| c.stored_bytes).sum();
    let mut dead_bytes = 0;
    for letter in &letters {
        let stored = serde_json::to_vec(letter).map_err(|e| TestCaseError::fail(e.to_string()))?;
        dead_bytes += stored.len() as u64 + KEY_OVERHEAD;
    }
    prop_assert_eq!(
        queue.stored_bytes(),
        chunk_bytes + dead_bytes,
        "stored bytes are not the live chunks ({}) plus the dead letters ({})",
        chunk_bytes,
        dead_bytes
    );
    Ok(())
}

fn options(dir: &std::path::Path) -> QueueOptions {
    QueueOptions {
        // Every acknowledged append is durable, so read sees it at once.
        durability: Durability::Fsync,
        cache_bytes: 8 << 20,
        ..QueueOptions::new(dir)
    }
}

/// Opens the queue, waiting out sled's file lock (see `common::open_again`).
async fn open(dir: &std::path::Path) -> Result<Queue, TestCaseError> {
    open_again(options(dir))
        .await
        .map_err(|e| queue_error("open", e))
}

/// Closes the queue, checks it refuses appends and still reads, and opens it again.
async fn reopen(
    queue: Queue,
    model: &Model,
    dir: &std::path::Path,
) -> Result<Queue, TestCaseError> {
    queue.close().await.map_err(|e| queue_error("close", e))?;
    let refused = queue.append(KEYS[0], 0, &[b"{}".to_vec()], &[]).await;
    prop_assert!(refused.is_err(), "an append after close was accepted");
    check(&queue, model)?;
    drop(queue);
    open(dir).await
}

const DEAD: DeadReason = DeadReason {
    reason: "expired",
    status: None,
    response: String::new(),
    attempts: 1,
};

async fn apply(
    op: &Op,
    step: usize,
    queue: Queue,
    model: &mut Model,
    dir: &std::path::Path,
) -> Result<Queue, TestCaseError> {
    match op {
        Op::Append { key, pads } => {
            let write_key = KEYS[*key];
            let received_ms = 1_700_000_000_000 + step as u64;
            let calls: Vec<Vec<u8>> = pads.iter().map(|&pad| model.make_call(pad)).collect();
            queue
                .append(write_key, received_ms, &calls, &[])
                .await
                .map_err(|e| queue_error("append", e))?;
            for call in calls {
                let expected = Expected {
                    write_key,
                    received_ms,
                    call,
                };
                model.pending.insert(model.next_id, expected);
                model.next_id += 1;
            }
        }
        Op::Remove(pick) | Op::DeadLetter(pick) => {
            let pending = queue
                .read(0, usize::MAX)
                .map_err(|e| queue_error("read", e))?;
            let calls = model.picked(pick, &pending);
            if let Op::Remove(_) = op {
                queue.remove(&calls).map_err(|e| queue_error("remove", e))?;
                model.delivered += model.settle(&calls).len() as u64;
            } else {
                queue
                    .dead_letter(&calls, &DEAD)
                    .map_err(|e| queue_error("dead_letter", e))?;
                let settled = model.settle(&calls);
                model.dead.extend(settled);
            }
        }
        Op::Reopen => return reopen(queue, model, dir).await,
        Op::ReadFrom { at, shift, limit } => {
            let ids: Vec<u64> = model.pending.keys().copied().collect();
            let near = if ids.is_empty() {
                model.next_id
            } else {
                ids[at.index(ids.len())]
            };
            let from = near.saturating_add_signed(*shift);
            let got: Vec<(u64, Expected)> = queue
                .read(from, *limit)
                .map_err(|e| queue_error("read", e))?
                .iter()
                .map(Expected::of)
                .collect();
            let want: Vec<(u64, Expected)> = model
                .pending
                .range(from..)
                .take(*limit)
                .map(|(id, e)| (*id, e.clone()))
                .collect();
            prop_assert_eq!(got, want, "read({}, {})", from, limit);
        }
    }
    Ok(queue)
}

async fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let dir = dir.path();
    let mut model = Model::default();
    let mut queue = open(dir).await?;
    check(&queue, &model)?;
    for (step, op) in ops.iter().enumerate() {
        queue = apply(op, step, queue, &mut model, dir).await?;
        check(&queue, &model)
            .map_err(|e| TestCaseError::fail(format!("after step {step} ({op:?}): {e}")))?;
    }

    // Settle everything: the queue empties, and stays empty across a reopen, with only the
    // dead letters left counted against the limit.
    let pending = queue
        .read(0, usize::MAX)
        .map_err(|e| queue_error("read", e))?;
    queue
        .remove(&pending)
        .map_err(|e| queue_error("remove", e))?;
    model.delivered += model.settle(&pending).len() as u64;
    check(&queue, &model)?;
    queue = reopen(queue, &model, dir).await?;
    check(&queue, &model)?;
    prop_assert_eq!(queue.counts().pending, 0);
    prop_assert!(queue
        .read(0, usize::MAX)
        .map_err(|e| queue_error("read", e))?
        .is_empty());

    // An empty queue still does not hand out an id twice.
    let call = model.make_call(0);
    queue
        .append(KEYS[0], 1, std::slice::from_ref(&call), &[])
        .await
        .map_err(|e| queue_error("append", e))?;
    let read = queue
        .read(0, usize::MAX)
        .map_err(|e| queue_error("read", e))?;
    prop_assert_eq!(read.len(), 1);
    prop_assert_eq!(
        read[0].id,
        model.next_id,
        "an id was reused after the queue emptied"
    );
    prop_assert_eq!(&read[0].record.call, &call);
    queue.remove(&read).map_err(|e| queue_error("remove", e))?;
    queue.close().await.map_err(|e| queue_error("close", e))?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        // A failure prints its shrunk run; no regression file is written beside the tests.
        failure_persistence: None,
        // Each run does real fsyncs: bound the time spent shrinking a failure.
        max_shrink_time: 120_000,
        ..ProptestConfig::default()
    })]

    /// Random runs of up to 30 steps, each on a fresh database.
    #[test]
    fn the_queue_behaves_like_its_model(ops in prop::collection::vec(op(), 1..=30)) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        runtime.block_on(run(&ops))?;
    }
}

/// A delivered call handed to `remove` a second time, after its chunk was removed, must change
/// nothing. (It once counted as newly done: `delivered` went past `accepted` and the chunk's
/// bytes were given back twice, wrapping the byte count so every later append was `Full`.)
#[tokio::test]
async fn settling_a_call_again_after_its_chunk_is_gone_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(options(dir.path())).unwrap();
    let call = br#"{"type":"group","userId":"u","groupId":"g","messageId":"m"}"#.to_vec();
    queue
        .append(KEYS[0], 1, std::slice::from_ref(&call), &[])
        .await
        .unwrap();
    let calls = queue.read(0, usize::MAX).unwrap();
    queue.remove(&calls).unwrap();
    let (stored, counts) = (queue.stored_bytes(), queue.counts());

    queue.remove(&calls).unwrap();
    assert_eq!(queue.stored_bytes(), stored);
    assert_eq!(queue.counts(), counts);
    queue.dead_letter(&calls, &DEAD).unwrap();
    assert_eq!(queue.stored_bytes(), stored);
    assert_eq!(queue.counts(), counts);
    assert!(queue.dead().unwrap().is_empty());
    queue.append(KEYS[0], 2, &[call], &[]).await.unwrap();
    queue.close().await.unwrap();
}
