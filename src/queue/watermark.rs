//! The durable watermark: one past the last call id a flush has made durable, kept in a
//! small file of its own beside sled's, so that a restart can tell when sled recovered fewer
//! calls than it had made durable.
//!
//! sled checks each log message's checksum at start and stops recovering at the first bad
//! one, as if it were the torn end of the log: a byte changed on disk in the middle of the
//! file silently drops everything written after it. The watermark turns that silence into
//! an error in the log and a count (`lost_on_disk`) in the counters.
//!
//! It is written after each flush that moved it, without an fsync of its own: it is never
//! ahead of what sled made durable, and after a power loss it can only be behind (a missed
//! alarm, never a false one).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) struct Watermark {
    file: File,
    written: AtomicU64,
}

impl Watermark {
    /// Opens (or creates) the file, and returns what it held.
    pub(crate) fn open(path: &Path) -> std::io::Result<(Watermark, Option<u64>)> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let previous = <[u8; 8]>::try_from(bytes.as_slice())
            .ok()
            .map(u64::from_be_bytes);
        let watermark = Watermark {
            file,
            written: AtomicU64::new(previous.unwrap_or(0)),
        };
        Ok((watermark, previous))
    }

    /// Records that every id below `end` is durable, if that moves the mark.
    pub(crate) fn record(&self, end: u64) {
        if self.written.fetch_max(end, Ordering::SeqCst) >= end {
            return;
        }
        if let Err(e) = self.file.write_all_at(&end.to_be_bytes(), 0) {
            tracing::warn!(error = %e, "cannot record the queue's durable watermark");
        }
    }
}
