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
//! alarm, never a false one). A power cut can also tear the write itself, leaving old and new
//! bytes mixed into a number larger than either; so the mark is stored with its bitwise
//! complement (16 bytes), and a file whose two halves disagree is read as no mark at all.
//! (The 8-byte files of earlier versions, without the check, are still read.)

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
        let previous = decode(&bytes);
        if previous.is_none() && !bytes.is_empty() {
            tracing::warn!(
                path = %path.display(),
                "the queue's durable watermark is torn (a power cut during its write?); ignored"
            );
        }
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
        if let Err(e) = self.file.write_all_at(&encode(end), 0) {
            tracing::warn!(error = %e, "cannot record the queue's durable watermark");
        }
    }
}

/// The mark, then its complement: a write torn anywhere leaves halves that disagree.
fn encode(end: u64) -> [u8; 16] {
    let mut bytes = [0; 16];
    bytes[..8].copy_from_slice(&end.to_be_bytes());
    bytes[8..].copy_from_slice(&(!end).to_be_bytes());
    bytes
}

fn decode(bytes: &[u8]) -> Option<u64> {
    let half = |range: std::ops::Range<usize>| {
        bytes
            .get(range)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes)
    };
    match bytes.len() {
        // Written by grouprelay before the check was added.
        8 => half(0..8),
        16 => half(0..8).filter(|&end| half(8..16) == Some(!end)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_reads_back() {
        for end in [0, 1, 255, 256, u64::MAX - 1] {
            assert_eq!(decode(&encode(end)), Some(end));
        }
        assert_eq!(decode(&300u64.to_be_bytes()), Some(300));
        assert_eq!(decode(b""), None);
    }

    /// Every way a write of a new mark over an old one can tear (a prefix of the new bytes
    /// over the old) reads as the old mark, the new one, or none: never a larger number.
    #[test]
    fn a_torn_write_never_reads_as_a_larger_mark() {
        for (old, new) in [
            (0xFFu64, 0x100u64),
            (0x00FF_FFFF, 0x0100_0000),
            (7, 8),
            (1 << 40, (1 << 40) + 1),
        ] {
            let (old_bytes, new_bytes) = (encode(old), encode(new));
            for kept in 0..=16 {
                let mut torn = old_bytes;
                torn[..kept].copy_from_slice(&new_bytes[..kept]);
                let read = decode(&torn);
                assert!(
                    read.is_none() || read == Some(old) || read == Some(new),
                    "{old} -> {new} torn after {kept} bytes read as {read:?}"
                );
            }
        }
    }
}
