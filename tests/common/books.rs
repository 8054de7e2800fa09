//! The books of a queue: its counters against what it holds. `accepted = delivered + dead +
//! pending`, `pending` is the calls it holds, and the byte count it keeps is a recount's.

use std::path::Path;

use grouprelay::queue::{Counts, Queue};

use super::disk::stopped_queue;

/// A queue's counters, and what it holds.
#[derive(Debug)]
pub struct Books {
    pub counts: Counts,
    /// The calls the queue holds, read back.
    pub pending: u64,
    /// The byte count the queue keeps.
    pub stored_bytes: u64,
    /// The bytes a recount of the database finds.
    pub recounted_bytes: u64,
}

impl Books {
    /// Reads the books of an open queue.
    pub fn of(queue: &Queue) -> Books {
        Books {
            counts: queue.counts(),
            pending: queue.read(0, usize::MAX).expect("read queue").len() as u64,
            stored_bytes: queue.stored_bytes(),
            recounted_bytes: queue.recount_stored_bytes().expect("recount stored bytes"),
        }
    }

    /// The counters against the queue: `pending` is what it holds, and they balance.
    pub fn balance(&self) -> Result<(), String> {
        if self.counts.pending != self.pending {
            return Err(format!(
                "the counters say {} pending, the queue holds {}",
                self.counts.pending, self.pending
            ));
        }
        balanced(&self.counts)
    }

    /// The byte count the queue keeps against a recount (a count carried over a crash, or
    /// released twice, would drift from it).
    pub fn bytes_agree(&self) -> Result<(), String> {
        match (self.stored_bytes, self.recounted_bytes) {
            (stored, recount) if stored == recount => Ok(()),
            (stored, recount) => Err(format!(
                "stored_bytes {stored} but a recount finds {recount}"
            )),
        }
    }
}

/// Opens the queue of a daemon that is no longer running and reads its books.
pub async fn books(data_dir: &Path) -> Books {
    stopped_queue(data_dir, Books::of).await
}

/// `accepted = delivered + dead + pending`.
pub fn balanced(counts: &Counts) -> Result<(), String> {
    let dead: u64 = counts.dead.values().sum();
    if counts.accepted == counts.delivered + dead + counts.pending {
        Ok(())
    } else {
        Err(format!("the books do not balance: {counts:?}"))
    }
}
