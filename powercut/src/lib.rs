//! `powercut`: a FUSE filesystem that can cut the power, for testing crash safety.
//!
//! In the spirit of LazyFS (the FUSE filesystem Jepsen uses to simulate power loss by dropping
//! unsynced writes), [`PowerCut::mount`] mounts a **passthrough** filesystem over a *backing
//! directory*: every read, write, create, rename and unlink goes through to the real files
//! there, so programs on the mount see an ordinary filesystem. Beside it, in memory, powercut
//! keeps a **model of what is durable**, and [`PowerCut::cut`] writes out, as a plain directory
//! tree, the on-disk state a power cut at that moment could leave. Mounting that image as the
//! backing directory of a fresh `PowerCut` is the "reboot".
//!
//! It exists to test that grouprelay never loses a call it answered 200, even across power loss:
//! run the daemon with its data directory on the mount, cut at any moment, restart it on the
//! image, and check every acknowledged call is there.
//!
//! # The durability model
//!
//! Strict POSIX, not the kindness of a particular filesystem (ext4's journal often makes more
//! durable, sooner, than this model allows; a program must not rely on that):
//!
//! - **File data and size** are durable up to the file's last `fsync` or `fdatasync` (both
//!   arrive as FUSE_FSYNC and are treated the same), or as they are written through an fd opened
//!   `O_SYNC`/`O_DSYNC`. Each file keeps its durable bytes and the list of operations since:
//!   writes (`pwrite` at an offset) and size changes (`truncate`, `ftruncate`, `O_TRUNC`,
//!   setattr size, `fallocate` growing the file). An fsync applies the pending list in order:
//!   it costs O(bytes written since the last one), never O(file size).
//! - **A directory entry** (create, mkdir, mknod, symlink, rename, unlink, rmdir) is durable
//!   only after an fsync of its parent directory (FUSE_FSYNCDIR; `File::open(dir)?.sync_all()`).
//!   So a file created, written and fsynced in a directory that was never fsynced is **lost**
//!   at a cut; a rename without a directory fsync **reverts**; an unlinked file whose directory
//!   was not fsynced **comes back**, with its durable bytes. A new directory's own entry needs
//!   an fsync of *its* parent; its entries need an fsync of itself.
//! - A rename across two directories is two entry operations, one in each directory; each is
//!   durable when its own directory is fsynced. If only one side is, the image can hold the
//!   file under both names (written as a hard link) or under neither.
//! - **`sync_file_range` makes nothing durable**: it has no FUSE operation, so powercut cannot
//!   even see it. That is right by construction: POSIX and Linux promise nothing from it (it
//!   does not flush the disk cache nor metadata). Likewise `sync(2)`/`syncfs(2)` do not reach
//!   powercut (current kernels send FUSE_SYNCFS only to virtiofs), so here they make nothing
//!   durable: stricter than a real disk, never kinder.
//! - Shared writable `mmap`: dirty pages reach powercut as writes only when the kernel writes
//!   them back; `msync(MS_SYNC)` and `fsync` send FUSE_FSYNC after writing them.
//! - **Everything in the backing directory at mount time is durable** (that is how an image is
//!   mounted again).
//!
//! # The cut
//!
//! [`PowerCut::cut`] (or [`PowerCut::cut_with`] to choose the [`Variation`]) takes the
//! filesystem's lock and **freezes** it: from that instant every operation from any process
//! fails with EIO, so the program under test can make nothing more durable after the cut
//! moment. Then it writes into `out` (an empty or absent directory, not on the mount nor in the
//! backing directory) what the disk could hold:
//!
//! - [`Variation::LoseAll`]: the durable state exactly; every unsynced write, size change and
//!   directory operation is lost.
//! - [`Variation::KeepSomeBlocks`]: writes reach the platter in 4 KiB-aligned pieces and out of
//!   order: each piece of each unsynced write, and each unsynced size change, is kept or lost by
//!   the seed; the kept ones are applied in their original order over the durable bytes. Each
//!   directory keeps a seeded *prefix* of its log of unsynced operations (a journal keeps
//!   operations in order).
//! - [`Variation::TornWrite`]: each file keeps a seeded prefix of its unsynced operations, and
//!   the last kept one, if a write, is torn: a seeded strict prefix of its bytes (possibly none,
//!   at byte granularity, which is harsher than a disk's 512-byte sectors). Directories keep a
//!   seeded prefix of their logs.
//!
//! Data that was made durable survives every variation. Only what is reachable from the root
//! through the image's entries is written. Files and directories are cut independently: a later
//! unsynced write to one file can survive while an earlier one to another is lost, as on a real
//! disk. The same state, variation and seed always give the
//! same image; each file's and directory's choices come from its own stream derived from the
//! seed, so they do not depend on what else is in the filesystem. `cut` may be called again
//! after the first: the filesystem stays frozen, so every call images the same moment (with
//! another seed, another possible outcome). The returned [`CutReport`] says what was kept and
//! lost.
//!
//! # What it does not model
//!
//! - A disk that lies about flushing its cache, or mount options that weaken fsync
//!   (`nobarrier`; ext4 `data=writeback` exposing stale blocks after a crash): powercut assumes
//!   a completed fsync is on stable storage, and that unwritten blocks read as zeros.
//! - Metadata: mtime, atime, ctime, ownership, xattrs are not modeled. The image takes each
//!   node's permission bits from its live backing file (a default for unlinked nodes). Extended
//!   attributes are not supported (ENOSYS).
//! - Hard links (`link` fails with EOPNOTSUPP), `fallocate` modes other than plain allocation
//!   and `FALLOC_FL_KEEP_SIZE` (EOPNOTSUPP: punching or zeroing would change contents
//!   unrecorded), `RENAME_EXCHANGE`/`RENAME_WHITEOUT` (EINVAL).
//! - Anything done to the backing directory behind the mount's back while mounted: don't.
//! - Reads the kernel answers from its page cache after the freeze (they change nothing).
//!
//! # How the kernel is kept honest
//!
//! Entry and attribute TTLs are zero, so the kernel asks for every lookup and stat. Writeback
//! caching is not enabled, so every `write(2)` reaches powercut as it happens (split into
//! requests of at most the kernel's max write size, each recorded as its own write). FUSE
//! passthrough (kernel-side I/O on the backing fd) is not used. `fsync`/`fsyncdir` are always
//! implemented: answering ENOSYS would make the kernel stop sending them and report success.
//!
//! File locks: powercut does not negotiate FUSE_FLOCK_LOCKS or FUSE_POSIX_LOCKS, so the kernel
//! handles `flock(2)` and `fcntl` locks itself, locally to this mount. That is what sled's
//! exclusive lock needs: a second `flock(LOCK_EX | LOCK_NB)` from another open file description
//! fails with EWOULDBLOCK (tested). Locks are not shared with the backing directory.
//!
//! # Mounting, unmounting, and cleaning up
//!
//! It needs root and `/dev/fuse` (no libfuse: `fuser` speaks the protocol itself and mounts
//! with `mount(2)`). Options: `fsname=powercut` (so `grep powercut /proc/mounts` finds it),
//! `allow_other` with `default_permissions` (harmless for root; lets a program that dropped
//! privileges use the mount with ordinary permission checks; nodes it creates are chowned to
//! it). [`PowerCut::mount`] returns once the mount is live (a `statfs` of the mountpoint shows
//! the FUSE magic). The filesystem is served by a background thread of the calling process.
//!
//! [`PowerCut::unmount`] (and `Drop`, so a panicking test unwinds into it) first unmounts with
//! `MNT_FORCE`, which for FUSE aborts the connection (requests in flight fail, nobody is left
//! waiting on the server), then, if files are still open there, detaches the mount
//! (`MNT_DETACH`). It never waits on processes that still have files open on the mount (they
//! get errors from then on) and never hangs on a killed one.
//!
//! A process that dies without unmounting (SIGKILL, abort, a test harness timeout) is covered by
//! a watchdog each mount starts: `sh`, in its own process group (so killing the test's group
//! does not kill it), checking once a second whether this process is gone or a zombie, and then
//! running `umount -f` (aborting the connection, which also frees a thread of the dead process
//! stuck on the mount it served) and `umount -l`. A normal unmount kills the watchdog first.
//! fuser's own `AutoUnmount` is not used: it keeps `fusermount3` around to unmount by path when
//! a socket closes, which can race a new mount on the same mountpoint, and cannot free a process
//! stuck on its own mount. Opened files are marked `FOPEN_NOFLUSH`, so a process closing its
//! files on its own mount as it dies does not wait on itself for FUSE_FLUSH answers.
//!
//! Serving FUSE from the test process itself means a thread of that process must never block
//! on the mount while the process is going down; keep each `PowerCut` alive (not leaked) until
//! the program using the mount is stopped, and drop it before the process exits.
//!
//! # Use
//!
//! ```no_run
//! use powercut::{PowerCut, Variation};
//! # fn main() -> std::io::Result<()> {
//! let dir = tempfile::tempdir()?;
//! let (backing, mnt, image) = (dir.path().join("b"), dir.path().join("m"), dir.path().join("i"));
//! std::fs::create_dir(&backing)?;
//! std::fs::create_dir(&mnt)?;
//! let fs = PowerCut::mount(&backing, &mnt)?;
//! // ... run the program under test with its data directory inside `mnt` ...
//! let report = fs.cut_with(Variation::KeepSomeBlocks, 42, &image)?; // frozen from here on
//! println!("{report}");
//! // ... kill the program: everything it does on the mount now fails with EIO (a library
//! // that unwraps I/O errors in its destructors, as sled does, may panic) ...
//! fs.unmount()?;
//! // "Reboot": the image is the new disk.
//! let mnt2 = dir.path().join("m2");
//! std::fs::create_dir(&mnt2)?;
//! let rebooted = PowerCut::mount(&image, &mnt2)?;
//! // ... restart the program on `mnt2` and check what it promised is there ...
//! # drop(rebooted);
//! # Ok(())
//! # }
//! ```
//!
//! Costs: the model holds every file's durable bytes in memory (sparse, 4 KiB blocks) and every
//! byte written since that file's last fsync; all operations are serialized under one lock and
//! served by one thread. Fine for test-sized data (tens of MB).

mod fs;
mod image;
mod model;
mod rng;

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, Config, MountOption, SessionACL};

pub use image::{CutReport, Variation};

/// `statfs` magic of a FUSE mount.
const FUSE_SUPER_MAGIC: libc::c_long = 0x6573_5546;

/// How long unmount waits for the serving thread to end (it ends as soon as the connection is
/// aborted) before leaving it behind.
const UNMOUNT_WAIT: Duration = Duration::from_secs(2);

/// A mounted power-cut filesystem. Unmounts on drop.
pub struct PowerCut {
    state: fs::Shared,
    session: Option<BackgroundSession>,
    watchdog: Option<Child>,
    mountpoint: PathBuf,
    backing: PathBuf,
}

impl fmt::Debug for PowerCut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PowerCut")
            .field("backing", &self.backing)
            .field("mountpoint", &self.mountpoint)
            .field("mounted", &self.session.is_some())
            .finish()
    }
}

fn error(kind: io::ErrorKind, message: String) -> io::Error {
    io::Error::new(kind, message)
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| error(io::ErrorKind::InvalidInput, e.to_string()))
}

impl PowerCut {
    /// Mounts a power-cut filesystem over `backing` at `mountpoint` (both existing
    /// directories, neither inside the other). Everything in `backing` counts as durable.
    /// Returns once the mount is live. Needs root and `/dev/fuse`.
    pub fn mount(backing: &Path, mountpoint: &Path) -> io::Result<PowerCut> {
        let backing = backing.canonicalize().map_err(|e| {
            error(
                e.kind(),
                format!("powercut: backing dir {}: {e}", backing.display()),
            )
        })?;
        let mountpoint = mountpoint.canonicalize().map_err(|e| {
            error(
                e.kind(),
                format!("powercut: mountpoint {}: {e}", mountpoint.display()),
            )
        })?;
        if backing.starts_with(&mountpoint) || mountpoint.starts_with(&backing) {
            return Err(error(
                io::ErrorKind::InvalidInput,
                format!(
                    "powercut: backing dir {} and mountpoint {} must not contain one another",
                    backing.display(),
                    mountpoint.display()
                ),
            ));
        }
        let tree = model::Tree::scan(&backing).map_err(|e| {
            error(
                e.kind(),
                format!("powercut: reading backing dir {}: {e}", backing.display()),
            )
        })?;
        let state = Arc::new(Mutex::new(fs::State::new(tree)));
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("powercut".to_string()),
            MountOption::DefaultPermissions,
        ];
        config.acl = SessionACL::All;
        let session = fuser::spawn_mount(fs::PowerFs::new(state.clone()), &mountpoint, &config)
            .map_err(|e| {
                error(
                    e.kind(),
                    format!(
                        "powercut: cannot mount FUSE at {}: {e} (it needs root, /dev/fuse and the \
                         fuse kernel module)",
                        mountpoint.display()
                    ),
                )
            })?;
        let mut mounted = PowerCut {
            state,
            session: Some(session),
            watchdog: None,
            mountpoint,
            backing,
        };
        // On error, dropping `mounted` unmounts.
        mounted.check_live()?;
        mounted.watchdog = spawn_watchdog(&mounted.mountpoint).ok();
        Ok(mounted)
    }

    /// The mountpoint (canonical).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    fn check_live(&self) -> io::Result<()> {
        let c = c_path(&self.mountpoint)?;
        // SAFETY: statfs is plain data; the kernel fills it.
        let mut s: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is NUL-terminated and `s` is a valid statfs to fill.
        if unsafe { libc::statfs(c.as_ptr(), &mut s) } != 0 {
            let e = io::Error::last_os_error();
            return Err(error(
                e.kind(),
                format!(
                    "powercut: statfs of the new mount {}: {e}",
                    self.mountpoint.display()
                ),
            ));
        }
        if s.f_type as libc::c_long != FUSE_SUPER_MAGIC {
            return Err(error(
                io::ErrorKind::Other,
                format!(
                    "powercut: {} is not showing the FUSE mount (f_type {:#x})",
                    self.mountpoint.display(),
                    s.f_type
                ),
            ));
        }
        Ok(())
    }

    /// Cuts the power now, with the variation chosen by `seed`: freezes the filesystem (every
    /// later operation fails with EIO) and writes into `out` the on-disk state the cut leaves.
    pub fn cut(&self, seed: u64, out: &Path) -> io::Result<CutReport> {
        self.cut_with(Variation::from_seed(seed), seed, out)
    }

    /// Cuts the power now with `variation`: freezes the filesystem (every later operation
    /// fails with EIO) and writes into `out`, an empty or absent directory outside the mount
    /// and the backing directory, the on-disk state the cut leaves. Calling it again images the
    /// same frozen moment.
    pub fn cut_with(&self, variation: Variation, seed: u64, out: &Path) -> io::Result<CutReport> {
        self.prepare_out(out)?;
        let mut state = self
            .state
            .lock()
            .map_err(|_| error(io::ErrorKind::Other, "powercut: state lock poisoned".into()))?;
        state.frozen = true;
        image::write_image(&state.tree, variation, seed, out).map_err(|e| {
            error(
                e.kind(),
                format!("powercut: writing the image to {}: {e}", out.display()),
            )
        })
    }

    /// Checks `out` is outside the mount and the backing directory (writing the image there
    /// would deadlock or pollute the live state), then makes sure it exists and is empty.
    fn prepare_out(&self, out: &Path) -> io::Result<()> {
        let absolute = std::path::absolute(out)?;
        // Canonicalize the deepest existing ancestor; the rest does not exist yet. Nothing here
        // touches the mount: paths under it are rejected before anything is created.
        let mut existing = absolute.as_path();
        let mut missing = Vec::new();
        while std::fs::symlink_metadata(existing).is_err() {
            match (existing.parent(), existing.file_name()) {
                (Some(parent), Some(name)) => {
                    missing.push(name);
                    existing = parent;
                }
                _ => break,
            }
        }
        let mut resolved = existing.canonicalize()?;
        resolved.extend(missing.iter().rev());
        if resolved.starts_with(&self.mountpoint) || resolved.starts_with(&self.backing) {
            return Err(error(
                io::ErrorKind::InvalidInput,
                format!(
                    "powercut: image dir {} must be outside the mount and the backing dir",
                    out.display()
                ),
            ));
        }
        std::fs::create_dir_all(out)?;
        if std::fs::read_dir(out)?.next().is_some() {
            return Err(error(
                io::ErrorKind::AlreadyExists,
                format!("powercut: image dir {} is not empty", out.display()),
            ));
        }
        Ok(())
    }

    /// Unmounts and stops serving: aborts the FUSE connection (processes still using the mount
    /// get errors from then on; none is left waiting), unmounts, detaching if files are still
    /// open. Never hangs.
    pub fn unmount(mut self) -> io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let c = c_path(&self.mountpoint)?;
        // MNT_FORCE first: for FUSE it aborts the connection before anything else, so requests
        // in flight fail, no process (this one included) can be left waiting on the server, and
        // the serving thread sees the device go away. If files are still open the unmount
        // itself then fails with EBUSY, and MNT_DETACH removes the mount from the namespace.
        // SAFETY: `c` is NUL-terminated.
        let forced = unsafe { libc::umount2(c.as_ptr(), libc::MNT_FORCE) } == 0;
        // SAFETY: as above.
        let result = if forced || unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            Ok(())
        } else {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                Ok(()) // Not mounted any more (unmounted by hand, or by the watchdog).
            } else {
                Err(error(
                    e.kind(),
                    format!("powercut: unmounting {}: {e}", self.mountpoint.display()),
                ))
            }
        };
        self.disarm_watchdog();
        let deadline = Instant::now() + UNMOUNT_WAIT;
        while !session.guard.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if session.guard.is_finished() {
            // The thread's own result does not matter any more: the mount is gone.
            let _ = session.join();
        }
        // Otherwise dropping the session leaves the thread to end on its own.
        result
    }

    fn disarm_watchdog(&mut self) {
        if let Some(mut child) = self.watchdog.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PowerCut {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// The watchdog: polls this process's state once a second; when the process is gone or a
/// zombie (dead, or dying with a thread stuck on the mount it served), it force-unmounts
/// (aborting the FUSE connection, which frees any such thread) and detaches the mount.
const WATCHDOG: &str = r#"
pid=$1 mnt=$2
while read -r line < "/proc/$pid/stat"; do
    rest=${line##*") "}
    case ${rest%% *} in Z|X|x) break ;; esac
    sleep 1
done 2>/dev/null
umount -f "$mnt" 2>/dev/null
umount -l "$mnt" 2>/dev/null
"#;

/// Starts the watchdog for `mountpoint`. It has its own process group, so a signal to the
/// test's group does not take it down too. A normal unmount kills it first.
fn spawn_watchdog(mountpoint: &Path) -> io::Result<Child> {
    Command::new("sh")
        .arg("-c")
        .arg(WATCHDOG)
        .arg("powercut-watchdog")
        .arg(std::process::id().to_string())
        .arg(mountpoint)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
}

#[cfg(test)]
mod tests {
    #[test]
    fn handle_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<super::PowerCut>();
        check::<super::CutReport>();
    }
}
