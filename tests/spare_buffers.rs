//! sled's spare log segment buffers: kept for reuse while the queue is written, and freed by
//! the committer once the database has been clean for a while, after every busy spell, not
//! only the first. (A test binary of its own: the spares are one list per process.)

use std::time::{Duration, Instant};

use grouprelay::queue::{Durability, Queue, QueueOptions};

/// Longest the committer may take to free the spares once the queue is clean: its wait
/// (a second) and plenty of room for a loaded machine.
const RELEASE_DEADLINE: Duration = Duration::from_secs(15);
/// A call of about 16 KB, so that a few hundred fill a 2 MiB segment.
fn big_call(i: usize) -> Vec<u8> {
    format!(r#"{{"n":{i},"pad":"{}"}}"#, "x".repeat(16_000)).into_bytes()
}

/// Appends calls until sled has kept a freed segment buffer for reuse.
async fn write_until_a_buffer_is_spare(queue: &Queue) {
    for i in 0..4_000 {
        queue.append("key", 1, &[big_call(i)], &[]).await.unwrap();
        if sled::spare_io_buffers() > 0 {
            return;
        }
    }
    panic!("64 MB written and no segment buffer kept for reuse");
}

/// Whether the spares are all freed within [`RELEASE_DEADLINE`]. The list is sled's, with no
/// event to wait on, so it is looked at every 20 ms.
async fn spares_freed() -> bool {
    let deadline = Instant::now() + RELEASE_DEADLINE;
    while Instant::now() < deadline {
        if sled::spare_io_buffers() == 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

async fn freed_after_every_spell(durability: Durability) {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(QueueOptions {
        durability,
        sync_interval: Duration::from_millis(50),
        ..QueueOptions::new(dir.path())
    })
    .unwrap();
    for spell in 1..=3 {
        write_until_a_buffer_is_spare(&queue).await;
        assert!(
            spares_freed().await,
            "{durability:?}, busy spell {spell}: {} segment buffers still kept {RELEASE_DEADLINE:?} \
             after the last write",
            sled::spare_io_buffers()
        );
    }
    queue.close().await.unwrap();
}

/// Both modes in one test: the spares are one list per process, so two tests at once would
/// see each other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_queue_keeps_no_spare_buffers_after_any_busy_spell() {
    freed_after_every_spell(Durability::Fsync).await;
    freed_after_every_spell(Durability::Interval).await;
}
