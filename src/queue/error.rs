//! Why a queue operation failed: one variant per cause, each saying when it happens.

use std::path::PathBuf;

use super::layout::DB_FORMAT;

/// A queue operation's failure. Ingest answers `Full` and `DiskLow` with 429, the rest with
/// 503 `storage_error`.
#[derive(Debug, Clone)]
pub enum QueueError {
    /// The byte limit would be passed: try again later.
    Full { stored: u64, limit: u64 },
    /// The filesystem's free space is below the floor: try again later.
    DiskLow { free: u64, floor: u64 },
    /// The queue was closed (grouprelay is stopping) before the calls could be written.
    Closed,
    /// An earlier write panicked part way: the next id and the byte count may no longer match
    /// what sled holds, so writes are refused until a restart reads the state back from disk.
    Broken,
    /// The calls were written, or perhaps written, but no flush is known to have made them
    /// durable (a flush failed, or did not finish in time). They may still be delivered.
    NotDurable(String),
    /// Bytes read back from the database cannot be decoded: a damaged key, counters, a dead
    /// letter or a stored record.
    Damaged(String),
    /// A record could not be encoded for storage: a rejected call whose bytes are not JSON,
    /// or counters or a dead letter that would not serialise.
    Encode(String),
    /// Another process has the database open (sled's file lock): most likely a second
    /// grouprelay on the same data dir. The lock holder's pid, when `/proc/locks` tells.
    InUse { dir: PathBuf, pid: Option<u32> },
    /// sled or the filesystem failed.
    Storage(String),
    /// The database was written by a newer grouprelay.
    NewerFormat(u8),
    /// The database was written by an unreleased format this build does not read.
    OlderFormat(u8),
}

impl std::fmt::Display for QueueError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueueError::Full { stored, limit } => {
                write!(f, "queue is full ({stored} of {limit} bytes stored)")
            }
            QueueError::DiskLow { free, floor } => write!(
                f,
                "the data dir's filesystem has {free} bytes free, below the floor of {floor}"
            ),
            QueueError::Closed => f.write_str("the queue is closed"),
            QueueError::Broken => {
                f.write_str("an earlier queue write failed part way; restart grouprelay")
            }
            QueueError::NotDurable(e) => write!(
                f,
                "calls not known to be durable ({e}); they may still be delivered"
            ),
            QueueError::Damaged(e) => write!(f, "damaged queue data: {e}"),
            QueueError::Encode(e) => write!(f, "cannot encode a queue record: {e}"),
            QueueError::InUse { dir, pid } => {
                write!(f, "another grouprelay is using {}", dir.display())?;
                match pid {
                    Some(pid) => write!(f, " (pid {pid})"),
                    None => Ok(()),
                }
            }
            QueueError::Storage(e) => write!(f, "queue storage error: {e}"),
            QueueError::NewerFormat(v) => write!(
                f,
                "the queue was written by a newer grouprelay (format {v}; this build reads up to {DB_FORMAT})"
            ),
            QueueError::OlderFormat(v) => write!(
                f,
                "the queue was written by a development build (format {v}) that this build cannot read; move the data dir's queue/ away"
            ),
        }
    }
}

impl std::error::Error for QueueError {}

impl From<sled::Error> for QueueError {
    fn from(e: sled::Error) -> Self {
        QueueError::Storage(e.to_string())
    }
}

/// A two-tree move's error, as the queue reports it.
pub(super) fn transaction_error(e: sled::transaction::TransactionError<()>) -> QueueError {
    match e {
        sled::transaction::TransactionError::Storage(e) => QueueError::from(e),
        sled::transaction::TransactionError::Abort(()) => {
            QueueError::Storage("transaction aborted".into())
        }
    }
}
