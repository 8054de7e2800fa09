//! The queue on disk, opened by the test itself: what a stopped daemon left.

use std::path::Path;

use grouprelay::queue::{CallRecord, DeadRecord, Queue, QueueOptions, RejectedRecord};

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
    let queue = Queue::open(QueueOptions::new(data_dir)).expect("open queue");
    let calls = queue
        .read(0, usize::MAX)
        .expect("read queue")
        .into_iter()
        .map(|c| c.record)
        .collect();
    let rejected = queue.rejected().expect("read rejected");
    let dead = queue.dead().expect("read dead letters");
    queue.close().await.expect("close queue");
    OnDisk {
        calls,
        rejected,
        dead,
    }
}
