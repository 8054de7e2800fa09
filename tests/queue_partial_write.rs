//! A round of appends whose sled writes fail part way: the requests written are queued and
//! answered, the rest refused, and ids and the byte count follow exactly what was written.
//!
//! Its own test binary: the failpoint is armed for the whole process.

mod common;

use common::group;
use grouprelay::queue::{Queue, QueueOptions};

/// A call of about `pad` bytes.
fn call(i: usize, pad: usize) -> Vec<u8> {
    group("u").id(format!("m{i}")).pad(pad).bytes()
}

#[tokio::test(flavor = "current_thread")]
async fn a_write_failing_part_way_through_a_round_refuses_only_the_unwritten_requests() {
    // The third sled write from now fails: requests 0 and 1 are written, 2 is not, and 3 to 5
    // are never tried (their round stops at the failure).
    std::env::set_var("GROUPRELAY_FAILPOINTS", "queue-unit-write-fails=3");
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(QueueOptions::new(dir.path())).unwrap();
    assert_eq!(queue.stored_bytes(), queue.recount_stored_bytes().unwrap());

    // Six requests of 45 KB: no two fit in one chunk (at most 80,659 bytes in a new
    // database, a 26th of its 2 MiB log segment), so each is a sled write of its own. On
    // this one thread all six are pending before the first (the writer, which yields once)
    // writes, so they make one round.
    let appends: Vec<_> = (0..6)
        .map(|i| {
            let queue = queue.clone();
            tokio::spawn(async move { queue.append("key", 1, &[call(i, 45_000)], &[]).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for append in appends {
        outcomes.push(append.await.unwrap().is_ok());
    }
    assert_eq!(outcomes, [true, true, false, false, false, false]);

    let queued = queue.read(0, usize::MAX).unwrap();
    let ids: Vec<u64> = queued.iter().map(|c| c.id).collect();
    assert_eq!(ids, [0, 1]);
    for (i, c) in queued.iter().enumerate() {
        assert!(std::str::from_utf8(&c.record.call)
            .unwrap()
            .contains(&format!(r#""messageId":"m{i}""#)));
    }
    assert_eq!(queue.counts().accepted, 2);
    // The refused requests gave their bytes back.
    assert_eq!(queue.stored_bytes(), queue.recount_stored_bytes().unwrap());

    // The queue goes on: the next call follows the written ones.
    queue.append("key", 1, &[call(6, 100)], &[]).await.unwrap();
    let ids: Vec<u64> = queue
        .read(0, usize::MAX)
        .unwrap()
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, [0, 1, 2]);
    assert_eq!(queue.stored_bytes(), queue.recount_stored_bytes().unwrap());
    queue.close().await.unwrap();
}
