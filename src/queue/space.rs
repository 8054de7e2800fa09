//! The free-space floor: refuse new calls while the data dir's filesystem is nearly full.
//!
//! sled 0.34 does not recover gracefully from a full disk (after ENOSPC its flushes stop
//! making progress), so grouprelay stops taking calls *before* the disk fills: below the
//! floor, appends are refused (ingest answers 429) while delivery, which frees space, goes on.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use crate::clock;

/// How long a reading above the floor is trusted before the filesystem is asked again.
const RECHECK_MS: u64 = 1_000;
/// Disk bytes one byte of calls is assumed to cost until the next reading: sled writes a
/// value to its log, then again as part of its rewritten pages.
const WRITE_AMPLIFICATION: u64 = 4;

pub(crate) struct FreeSpace {
    path: CString,
    floor: u64,
    checked_ms: AtomicU64,
    /// Call bytes that may still be taken before the filesystem is asked again: the last
    /// reading's room above the floor, divided by [`WRITE_AMPLIFICATION`]. A second is not
    /// enough on its own: a fast writer fills a small disk in less.
    budget: AtomicU64,
}

impl FreeSpace {
    /// `floor` 0 turns the check off.
    pub(crate) fn new(path: &Path, floor: u64) -> FreeSpace {
        FreeSpace {
            path: CString::new(path.as_os_str().as_bytes()).unwrap_or_default(),
            floor,
            checked_ms: AtomicU64::new(0),
            budget: AtomicU64::new(0),
        }
    }

    pub(crate) fn floor(&self) -> u64 {
        self.floor
    }

    /// `Err(free bytes)` when taking `size` more bytes would go below the floor. A reading
    /// above the floor is reused for a second, and for calls of at most a quarter of its room;
    /// below it, every call asks again, so calls are taken again as soon as space returns.
    pub(crate) fn check(&self, size: u64) -> Result<(), u64> {
        if self.floor == 0 {
            return Ok(());
        }
        let now = clock::unix_ms(SystemTime::now());
        let fresh = now.saturating_sub(self.checked_ms.load(Ordering::Relaxed)) < RECHECK_MS;
        if fresh && self.take_from_budget(size) {
            return Ok(());
        }
        let Some(free) = self.free_bytes() else {
            // Unknown is not "full": the byte limit and sled's own errors still apply.
            return Ok(());
        };
        let above = free >= self.floor.saturating_add(size);
        let room = free.saturating_sub(self.floor).saturating_sub(size);
        self.budget
            .store(room / WRITE_AMPLIFICATION, Ordering::Relaxed);
        // Below the floor, the next call asks again.
        self.checked_ms
            .store(if above { now } else { 0 }, Ordering::Relaxed);
        if above {
            Ok(())
        } else {
            Err(free)
        }
    }

    fn take_from_budget(&self, size: u64) -> bool {
        self.budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(size)
            })
            .is_ok()
    }

    /// Bytes available to unprivileged writers on the filesystem, per statvfs.
    fn free_bytes(&self) -> Option<u64> {
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a NUL-terminated path and a properly sized, writable statvfs struct.
        let rc = unsafe { libc::statvfs(self.path.as_ptr(), &mut stat) };
        (rc == 0).then(|| stat.f_bavail as u64 * stat.f_frsize as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Below the floor a reading is never reused, not even for a call of no bytes (the
    /// `/ready` probe), so calls are taken again as soon as space returns.
    #[test]
    fn below_the_floor_every_check_reads_again_and_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let space = FreeSpace::new(dir.path(), u64::MAX / 2);
        assert!(space.check(0).is_err());
        assert!(space.check(0).is_err());
        assert!(space.check(1).is_err());
    }

    /// Above the floor a reading is reused only for calls of a quarter of its room: a call
    /// bigger than that asks again (and here is refused, as it would pass the floor).
    #[test]
    fn a_reading_is_reused_for_a_quarter_of_its_room_only() {
        let dir = tempfile::tempdir().unwrap();
        let free = FreeSpace::new(dir.path(), 1).free_bytes().unwrap();
        // A floor that leaves 400 MB of room (free space moves meanwhile: wide margins).
        let space = FreeSpace::new(dir.path(), free.saturating_sub(400_000_000));
        assert!(space.check(0).is_ok());
        // About 100 MB of budget: taken from it without asking.
        assert!(space.check(40_000_000).is_ok());
        assert!(space.check(40_000_000).is_ok());
        // Past the budget the filesystem is asked again: 300 MB fits in the room...
        assert!(space.check(300_000_000).is_ok());
        // ...and a call beyond the room is refused at once, though within the second.
        assert!(space.check(600_000_000).is_err());
    }
}
