//! The queue on disk, opened by the test itself: what a stopped daemon left, and an open that
//! waits out sled's file lock for a queue this process closed a moment ago.

use std::fmt::Display;
use std::path::Path;
use std::time::{Duration, Instant};

use grouprelay::queue::{CallRecord, DeadRecord, Queue, QueueError, QueueOptions, RejectedRecord};

/// What a stopped daemon left on disk: the queued calls in order, the rejected ones and the
/// dead letters.
pub struct OnDisk {
    pub calls: Vec<CallRecord>,
    pub rejected: Vec<RejectedRecord>,
    pub dead: Vec<DeadRecord>,
}

impl OnDisk {
    /// The queued calls' bodies as JSON.
    pub fn call_json(&self) -> Vec<serde_json::Value> {
        self.calls
            .iter()
            .map(|c| serde_json::from_slice(&c.call).expect("queued call is JSON"))
            .collect()
    }
}

/// Opens the queue of a daemon that is no longer running and reads everything in it.
pub async fn on_disk(data_dir: &Path) -> OnDisk {
    stopped_queue(data_dir, |queue| OnDisk {
        calls: queue
            .read(0, usize::MAX)
            .expect("read queue")
            .into_iter()
            .map(|c| c.record)
            .collect(),
        rejected: queue.rejected().expect("read rejected"),
        dead: queue.dead().expect("read dead letters"),
    })
    .await
}

/// Opens the queue of a daemon that is no longer running, reads it with `read`, and closes
/// it again. Tests call it several times in a row, so the open waits out the lock a close in
/// this process a moment ago may still hold (see [`open_again`]).
pub async fn stopped_queue<T>(data_dir: &Path, read: impl FnOnce(&Queue) -> T) -> T {
    let queue = open_again(QueueOptions::new(data_dir))
        .await
        .expect("open queue");
    let out = read(&queue);
    queue.close().await.expect("close queue");
    out
}

/// Opens a queue this process closed a moment ago. sled's own I/O threads (or its truncation
/// thread) can hold the database file, and its lock, briefly after `close` and drop, so that
/// an open right away fails with "could not acquire lock" (about one open in 200). A new
/// process never meets this: a process's locks go with it.
pub async fn open_again(options: QueueOptions) -> Result<Queue, QueueError> {
    past_the_lock(|| Queue::open(options.clone())).await
}

/// sled on a queue database this process closed a moment ago (see [`open_again`]), with the
/// segment size the database has (sled refuses another).
pub async fn sled_open_again(path: &Path) -> sled::Db {
    let config = sled::Config::new()
        .path(path)
        .segment_size(grouprelay::queue::segment_bytes(path));
    past_the_lock(|| config.open()).await.unwrap()
}

/// Runs `open` again while it fails on sled's file lock, for at most 10 s.
async fn past_the_lock<T, E: Display>(mut open: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match open() {
            Err(e)
                if (e.to_string().contains("could not acquire lock")
                    || e.to_string().contains("another grouprelay is using"))
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            result => return result,
        }
    }
}
