//! The free-space floor: refuse new calls while the data dir's filesystem is nearly full.
//!
//! sled 0.34 does not recover gracefully from a full disk (after ENOSPC its flushes stop
//! making progress), so grouprelay stops taking calls *before* the disk fills: below the
//! floor, appends are refused (ingest answers 429) while delivery, which frees space, goes on.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use crate::clock;

/// How long a reading above the floor is trusted before the filesystem is asked again.
const RECHECK_MS: u64 = 1_000;

pub(crate) struct FreeSpace {
    path: CString,
    floor: u64,
    checked_ms: AtomicU64,
    above_floor: AtomicBool,
}

impl FreeSpace {
    /// `floor` 0 turns the check off.
    pub(crate) fn new(path: &Path, floor: u64) -> FreeSpace {
        FreeSpace {
            path: CString::new(path.as_os_str().as_bytes()).unwrap_or_default(),
            floor,
            checked_ms: AtomicU64::new(0),
            above_floor: AtomicBool::new(false),
        }
    }

    pub(crate) fn floor(&self) -> u64 {
        self.floor
    }

    /// `Err(free bytes)` when taking `size` more bytes would go below the floor. A reading
    /// above the floor is reused for a second; below it, every call asks again, so calls are
    /// taken again as soon as space returns.
    pub(crate) fn check(&self, size: u64) -> Result<(), u64> {
        if self.floor == 0 {
            return Ok(());
        }
        let now = clock::unix_ms(SystemTime::now());
        let fresh = now.saturating_sub(self.checked_ms.load(Ordering::Relaxed)) < RECHECK_MS;
        if fresh && self.above_floor.load(Ordering::Relaxed) {
            return Ok(());
        }
        let Some(free) = self.free_bytes() else {
            // Unknown is not "full": the byte limit and sled's own errors still apply.
            return Ok(());
        };
        let above = free >= self.floor.saturating_add(size);
        self.above_floor.store(above, Ordering::Relaxed);
        self.checked_ms.store(now, Ordering::Relaxed);
        if above {
            Ok(())
        } else {
            Err(free)
        }
    }

    /// Bytes available to unprivileged writers on the filesystem, per statvfs.
    fn free_bytes(&self) -> Option<u64> {
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a NUL-terminated path and a properly sized, writable statvfs struct.
        let rc = unsafe { libc::statvfs(self.path.as_ptr(), &mut stat) };
        (rc == 0).then(|| stat.f_bavail as u64 * stat.f_frsize as u64)
    }
}
