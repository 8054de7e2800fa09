//! When to rebuild: a task that, whenever calls have been settled (and once at open), weighs
//! the database's files against the bytes it stores, and rebuilds it once most of the files
//! is space sled freed but keeps.
//!
//! A rebuild is worth its pause only when it gives much back, so all of these must hold:
//! the files take more than `rebuild_above_bytes`; more than [`REBUILD_GARBAGE_FACTOR`]
//! times the stored bytes; twice what the last rebuild left (so a queue whose copy is
//! itself large is not rebuilt over and over); and the stored bytes are at most
//! [`REBUILD_MAX_COPY_BYTES`], which bounds how long appends wait for the copy. The task
//! sleeps while nothing is settled: an idle daemon does not wake for it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::layout::{db_path, files_bytes};
use super::options::{REBUILD_GARBAGE_FACTOR, REBUILD_MAX_COPY_BYTES};
use super::Queue;
use crate::human;

/// The least time between two weighings: settling goes on many times a second during a
/// drain, and reading the directory each time would be waste.
const WEIGH_GAP: Duration = Duration::from_secs(1);

/// Starts the task (unless `rebuild_above_bytes` is 0). It holds the queue only while it
/// weighs or rebuilds; `close` ends it, and so does the queue's drop.
pub(super) fn start(queue: &Queue) -> Option<JoinHandle<()>> {
    let above = queue.shared.options.rebuild_above_bytes;
    if above == 0 {
        return None;
    }
    let shared = Arc::downgrade(&queue.shared);
    let settled = queue.shared.settled.clone();
    Some(tokio::spawn(async move {
        // The files the last rebuild left.
        let mut left = 0;
        loop {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            if shared.closed.load(Ordering::SeqCst) {
                return;
            }
            let queue = Queue { shared };
            if let Some(files) = worth_rebuilding(&queue, above, left) {
                left = rebuild(&queue).await.unwrap_or(files);
            }
            drop(queue);
            settled.notified().await;
            tokio::time::sleep(WEIGH_GAP).await;
        }
    }))
}

/// The files' bytes, if a rebuild is worth it now.
fn worth_rebuilding(queue: &Queue, above: u64, left: u64) -> Option<u64> {
    let files = files_bytes(&db_path(&queue.shared.options.data_dir));
    worth(files, queue.stored_bytes(), above, left).then_some(files)
}

/// The rule (see the module's notes): files of `files` bytes storing `stored`, past `above`,
/// with `left` bytes of files after the last rebuild.
fn worth(files: u64, stored: u64, above: u64, left: u64) -> bool {
    files > above
        && files > stored.saturating_mul(REBUILD_GARBAGE_FACTOR)
        && files > left.saturating_mul(2)
        && stored <= REBUILD_MAX_COPY_BYTES
}

/// Rebuilds and logs what it gave back; the files it left, if it succeeded.
async fn rebuild(queue: &Queue) -> Option<u64> {
    match queue.rebuild().await {
        Ok(rebuilt) => {
            tracing::info!(
                files_before = rebuilt.files_before,
                files_after = rebuilt.files_after,
                copied_bytes = rebuilt.copied,
                paused_ms = rebuilt.paused.as_millis() as u64,
                "queue rebuilt: {} of disk given back ({} now), new calls waited {}",
                human::bytes(rebuilt.files_before.saturating_sub(rebuilt.files_after)),
                human::bytes(rebuilt.files_after),
                human::duration(rebuilt.paused.as_millis() as u64),
            );
            Some(rebuilt.files_after)
        }
        Err(e) => {
            tracing::warn!(error = %e, "the queue could not be rebuilt; its disk space was not given back");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    #[test]
    fn a_rebuild_is_worth_it_only_when_most_of_large_files_is_free_space() {
        // After a backlog: 1 GB of files for a few KB stored.
        assert!(worth(1024 * MB, 4096, 64 * MB, 0));
        // Under the threshold, or files mostly holding what they store: no.
        assert!(!worth(60 * MB, 0, 64 * MB, 0));
        assert!(!worth(200 * MB, 60 * MB, 64 * MB, 0));
        // More stored than a rebuild may copy: wait for delivery.
        assert!(!worth(1024 * MB, REBUILD_MAX_COPY_BYTES + 1, 64 * MB, 0));
        // Not yet twice what the last rebuild left.
        assert!(!worth(70 * MB, 0, 64 * MB, 40 * MB));
        assert!(worth(81 * MB, 0, 64 * MB, 40 * MB));
    }
}
