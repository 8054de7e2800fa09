//! The queue's guarantees, tested as properties on a real sled database in a temp dir.

mod common;

use std::future::Future;
use std::path::Path;

use common::{numbered, open_again, sled_open_again};
use grouprelay::queue::keys::{chunk_key, LEDGER_KEY};
use grouprelay::queue::{Durability, Queue, QueueError, QueueOptions};

fn call(i: usize) -> Vec<u8> {
    numbered(i).bytes()
}

/// `interval` mode, with a flush period long enough that no periodic flush runs during a
/// test.
fn interval_without_flushes(dir: &Path) -> QueueOptions {
    QueueOptions {
        durability: Durability::Interval,
        sync_interval: std::time::Duration::from_secs(3600),
        ..QueueOptions::new(dir)
    }
}

/// Bytes no chunk decodes from.
const GARBAGE: &[u8] = b"\x07garbage";

/// Writes a queue of three calls in `dir`, one request after another, so that each is its
/// own chunk, and closes it.
async fn three_chunks(dir: &Path) {
    let queue = Queue::open(QueueOptions::new(dir)).unwrap();
    for i in 0..3 {
        queue.append("key", 1, &[call(i)], &[]).await.unwrap();
    }
    queue.close().await.unwrap();
}

/// Overwrites the middle one of [`three_chunks`] with [`GARBAGE`] on disk; returns the
/// database (not yet flushed) and what the chunk held.
async fn damage_the_middle_chunk(dir: &Path) -> (sled::Db, Option<sled::IVec>) {
    let db = sled_open_again(&dir.join(grouprelay::queue::DB_DIR)).await;
    let old = db
        .open_tree("queue")
        .unwrap()
        .insert(chunk_key(1, 1), GARBAGE)
        .unwrap();
    (db, old)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_flushes_and_read_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(QueueOptions::new(dir.path())).unwrap();
    let writers: Vec<_> = (0..64)
        .map(|w| {
            let queue = queue.clone();
            tokio::spawn(async move {
                for i in 0..10 {
                    let batch = vec![call(w * 100 + i * 2), call(w * 100 + i * 2 + 1)];
                    queue.append("key", 1, &batch, &[]).await.unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    // 640 durable appends; group commit shares flushes between the waiting writers.
    let flushes = queue.flushes();
    assert!(flushes < 640 / 2, "{flushes} flushes for 640 appends");

    let calls = queue.read(0, usize::MAX).unwrap();
    assert_eq!(calls.len(), 1280);
    assert!(calls.windows(2).all(|w| w[0].id < w[1].id));
    // Each append's two calls are adjacent and in request order.
    for pair in calls.chunks(2) {
        let a: serde_json::Value = serde_json::from_slice(&pair[0].record.call).unwrap();
        let b: serde_json::Value = serde_json::from_slice(&pair[1].record.call).unwrap();
        let n =
            |v: &serde_json::Value| v["userId"].as_str().unwrap()[1..].parse::<usize>().unwrap();
        assert_eq!(n(&a) + 1, n(&b));
    }
    queue.close().await.unwrap();
}

#[tokio::test]
async fn calls_survive_reopen_and_leave_only_when_removed() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(QueueOptions::new(dir.path())).unwrap();
    let batch: Vec<_> = (0..5).map(call).collect();
    queue.append("key-a", 42, &batch, &[]).await.unwrap();
    queue.close().await.unwrap();
    drop(queue);

    let queue = open_again(QueueOptions::new(dir.path())).await.unwrap();
    let calls = queue.read(0, usize::MAX).unwrap();
    assert_eq!(calls.len(), 5);
    assert_eq!(calls[0].record.write_key, "key-a");
    assert_eq!(calls[0].record.received_ms, 42);
    assert_eq!(calls[3].record.call, call(3));
    queue.remove(&calls[..2]).unwrap();
    // Appends after a reopen continue after the last key.
    queue.append("key-b", 43, &[call(9)], &[]).await.unwrap();
    queue.close().await.unwrap();
    drop(queue);

    let queue = open_again(QueueOptions::new(dir.path())).await.unwrap();
    let calls = queue.read(0, usize::MAX).unwrap();
    let ids: Vec<_> = calls
        .iter()
        .map(|c| String::from_utf8(c.record.call.clone()).unwrap())
        .collect();
    assert_eq!(
        ids,
        [call(2), call(3), call(4), call(9)].map(|c| String::from_utf8(c).unwrap())
    );
    assert_eq!(calls[3].record.write_key, "key-b");
    // Reading from an id skips the ones before it.
    assert_eq!(queue.read(calls[1].id, 2).unwrap().len(), 2);
    queue.close().await.unwrap();
}

#[tokio::test]
async fn the_byte_limit_refuses_new_calls_and_frees_on_remove() {
    let dir = tempfile::tempdir().unwrap();
    let options = QueueOptions {
        max_bytes: 1_000,
        ..QueueOptions::new(dir.path())
    };
    let queue = Queue::open(options).unwrap();
    let mut accepted = 0;
    loop {
        match queue.append("key", 1, &[call(accepted)], &[]).await {
            Ok(()) => accepted += 1,
            Err(QueueError::Full { stored, limit }) => {
                assert_eq!(limit, 1_000);
                assert!(stored <= limit);
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(accepted > 5, "only {accepted} calls fit");
    // Nothing already queued is touched by a refusal.
    let calls = queue.read(0, usize::MAX).unwrap();
    assert_eq!(calls.len(), accepted);
    queue.remove(&calls[..1]).unwrap();
    queue.append("key", 1, &[call(0)], &[]).await.unwrap();
    assert!(queue.append("key", 1, &[call(0)], &[]).await.is_err());
    queue.close().await.unwrap();
}

#[tokio::test]
async fn interval_mode_acknowledges_before_the_flush_and_still_persists_on_close() {
    let dir = tempfile::tempdir().unwrap();
    let options = interval_without_flushes(dir.path());
    let queue = Queue::open(options.clone()).unwrap();
    for i in 0..20 {
        queue.append("key", 1, &[call(i)], &[]).await.unwrap();
    }
    assert_eq!(
        queue.flushes(),
        0,
        "interval mode must not flush per append"
    );
    queue.close().await.unwrap();
    drop(queue);
    let queue = open_again(options).await.unwrap();
    assert_eq!(queue.read(0, usize::MAX).unwrap().len(), 20);
    queue.close().await.unwrap();
}

/// The first of several concurrent appends writes for all of them, after letting the others
/// join. A request dropped at that moment (its client gone) must still write what it and the
/// others handed over, and must not leave later appends waiting for a writer that never comes.
#[tokio::test]
async fn an_append_dropped_before_it_writes_still_writes_and_unblocks_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let options = QueueOptions {
        durability: Durability::Interval,
        ..QueueOptions::new(dir.path())
    };
    let queue = Queue::open(options).unwrap();
    // Poll the append once (it becomes the writer and yields), then drop it.
    let first = [call(1)];
    let mut dropped = Box::pin(queue.append("key", 1, &first, &[]));
    let first_poll =
        std::future::poll_fn(|cx| std::task::Poll::Ready(dropped.as_mut().poll(cx))).await;
    assert!(
        first_poll.is_pending(),
        "the append should yield before it writes"
    );
    drop(dropped);
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        queue.append("key", 1, &[call(2)], &[]),
    )
    .await
    .expect("a later append waits for a writer that is gone")
    .unwrap();
    queue.close().await.unwrap();
    let calls = queue.read(0, usize::MAX).unwrap();
    let users: Vec<String> = calls
        .iter()
        .map(|c| {
            let v: serde_json::Value = serde_json::from_slice(&c.record.call).unwrap();
            v["userId"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(users, ["u1", "u2"]);
}

#[tokio::test]
async fn a_newer_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path().join(grouprelay::queue::DB_DIR)).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("format", &[9u8])
            .unwrap();
        db.flush().unwrap();
    }
    match open_again(QueueOptions::new(dir.path())).await {
        Err(QueueError::NewerFormat(9)) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a newer format was opened"),
    }
}

/// In `fsync` mode an append answers only after a flush that covers it: from that moment a
/// reader (which sees only flushed calls) finds every one of its calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fsync_append_answers_only_once_a_flush_covers_it() {
    let dir = tempfile::tempdir().unwrap();
    let options = QueueOptions {
        // No periodic flush to cover a call by chance.
        sync_interval: std::time::Duration::from_secs(3600),
        ..QueueOptions::new(dir.path())
    };
    let queue = Queue::open(options).unwrap();
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let queue = queue.clone();
            tokio::spawn(async move {
                for i in 0..20 {
                    let n = w * 100 + i;
                    queue.append("key", 1, &[call(n)], &[]).await.unwrap();
                    let wanted = format!(r#""messageId":"m{n}""#);
                    let visible = queue.read(0, usize::MAX).unwrap().iter().any(|c| {
                        std::str::from_utf8(&c.record.call)
                            .unwrap()
                            .contains(&wanted)
                    });
                    assert!(visible, "m{n} was acknowledged before a flush covered it");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    queue.close().await.unwrap();
}

#[tokio::test]
async fn interval_mode_hands_out_calls_once_written() {
    let dir = tempfile::tempdir().unwrap();
    let options = interval_without_flushes(dir.path());
    let queue = Queue::open(options.clone()).unwrap();
    queue.append("key", 1, &[call(1)], &[]).await.unwrap();
    queue.append("key", 2, &[call(2)], &[]).await.unwrap();
    // Acknowledged and written, and no flush has run: readable already, so that the
    // forwarder reads it while sled still caches it.
    let read = queue.read(0, 10).unwrap();
    assert_eq!(read.len(), 2);
    assert_eq!(read[1].record.call, call(2));
    queue.remove(&read[..1]).unwrap();
    queue.close().await.unwrap();
    drop(queue);
    let queue = open_again(options).await.unwrap();
    let read = queue.read(0, 10).unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].record.call, call(2));
    common::balanced(&queue.counts()).unwrap();
    queue.close().await.unwrap();
}

#[tokio::test]
async fn an_unreadable_chunk_is_quarantined_counted_and_the_rest_still_read() {
    let dir = tempfile::tempdir().unwrap();
    three_chunks(dir.path()).await;
    {
        let (db, old) = damage_the_middle_chunk(dir.path()).await;
        assert!(old.is_some(), "the chunk layout changed; fix this test");
        db.flush().unwrap();
    }
    let queue = open_again(QueueOptions::new(dir.path())).await.unwrap();
    let read = queue.read(0, 10).unwrap();
    let ids: Vec<u64> = read.iter().map(|c| c.id).collect();
    assert_eq!(ids, [0, 2]);
    assert_eq!(read[1].record.call, call(2));
    let counts = queue.counts();
    assert_eq!(counts.accepted, 3);
    assert_eq!(counts.dead.get("quarantined"), Some(&1));
    assert_eq!(counts.pending, 2);
    queue.close().await.unwrap();
    drop(queue);
    let db = sled_open_again(&dir.path().join(grouprelay::queue::DB_DIR)).await;
    let quarantined = db
        .open_tree("quarantine")
        .unwrap()
        .get(chunk_key(1, 1))
        .unwrap()
        .expect("the damaged chunk is kept in quarantine");
    assert!(quarantined.ends_with(GARBAGE));
    assert!(db
        .open_tree("queue")
        .unwrap()
        .get(chunk_key(1, 1))
        .unwrap()
        .is_none());
}

/// Many writers and a deleter at once: every call appended is read back and removed, and
/// nothing hangs (bounded in work and in time). This is the kind of load under which sled
/// 0.34.7's file truncation deadlocked every writer (vendor/README.md), but the deadlock is
/// timing-dependent: this test did not reproduce it against unpatched sled in 3 runs of 10x
/// this size; the benchmark did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_churn_of_appends_and_removals_does_not_deadlock() {
    let dir = tempfile::tempdir().unwrap();
    let options = QueueOptions {
        durability: Durability::Interval,
        sync_interval: std::time::Duration::from_millis(50),
        ..QueueOptions::new(dir.path())
    };
    let queue = Queue::open(options).unwrap();
    let work = async {
        let writers: Vec<_> = (0..64)
            .map(|w| {
                let queue = queue.clone();
                tokio::spawn(async move {
                    for i in 0..400 {
                        queue
                            .append("key", 1, &[call(w * 1000 + i)], &[])
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        let deleter = {
            let queue = queue.clone();
            tokio::spawn(async move {
                let mut removed = 0;
                while removed < 64 * 400 {
                    let appended = queue.appended();
                    tokio::pin!(appended);
                    appended.as_mut().enable();
                    let calls = queue.read(0, 500).unwrap();
                    if calls.is_empty() {
                        appended.await;
                        continue;
                    }
                    queue.remove(&calls).unwrap();
                    removed += calls.len();
                }
            })
        };
        for writer in writers {
            writer.await.unwrap();
        }
        deleter.await.unwrap();
    };
    tokio::time::timeout(std::time::Duration::from_secs(120), work)
        .await
        .expect("appends and removals deadlocked");
    assert!(queue.read(0, 1).unwrap().is_empty());
    queue.close().await.unwrap();
}

/// Dead letters named twice, in one purge or replay, are purged or queued once: their bytes
/// come back once (a double release once wrapped the count and refused every append).
#[tokio::test]
async fn dead_letters_named_twice_count_once() {
    use grouprelay::queue::DeadReason;
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(QueueOptions::new(dir.path())).unwrap();
    queue
        .append("key", 1, &[call(1), call(2)], &[])
        .await
        .unwrap();
    let calls = queue.read(0, usize::MAX).unwrap();
    let reason = DeadReason {
        reason: "expired",
        status: None,
        response: String::new(),
        attempts: 1,
    };
    queue.dead_letter(&calls, &reason).unwrap();
    let ids: Vec<u64> = queue
        .dead_entries()
        .unwrap()
        .iter()
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(queue.replay_dead(&[ids[0], ids[0]]).await.unwrap(), 1);
    assert_eq!(queue.counts().accepted, 3);
    assert_eq!(queue.purge_dead(&[ids[1], ids[1]]).unwrap(), 1);
    assert!(queue.dead_entries().unwrap().is_empty());
    assert_eq!(queue.stored_bytes(), queue.recount_stored_bytes().unwrap());
    // The replayed call is queued, with its messageId.
    let pending = queue.read(0, usize::MAX).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].record.call, call(1));
    queue.close().await.unwrap();
}

/// Two readers meeting the same damaged chunk at once quarantine it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_chunk_read_by_two_at_once_is_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    three_chunks(dir.path()).await;
    damage_the_middle_chunk(dir.path()).await.0.flush().unwrap();
    for _ in 0..20 {
        // Fresh copies of the damaged database, so each round races anew.
        let queue = open_again(QueueOptions::new(dir.path())).await.unwrap();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (queue, barrier) = (queue.clone(), barrier.clone());
                tokio::task::spawn_blocking(move || {
                    barrier.wait();
                    queue.read(0, 10).unwrap().len()
                })
            })
            .collect();
        for reader in readers {
            assert_eq!(reader.await.unwrap(), 2);
        }
        let counts = queue.counts();
        assert_eq!(counts.dead.get("quarantined"), Some(&1), "{counts:?}");
        assert_eq!(counts.pending, 2);
        queue.close().await.unwrap();
        drop(queue);
        // Put the damaged chunk back for the next round.
        let (db, _) = damage_the_middle_chunk(dir.path()).await;
        let ledger = db.open_tree("queue").unwrap().remove(LEDGER_KEY).unwrap();
        assert!(ledger.is_some());
        db.open_tree("quarantine").unwrap().clear().unwrap();
        db.flush().unwrap();
    }
}
