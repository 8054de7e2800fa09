//! Rebuilding the database into a fresh copy and switching the copy in: how the queue gives
//! disk space back, since sled never shrinks its files.
//!
//! # The steps, and what a crash at each leaves
//! 1. No append under way (the queue's append lock, held alone), everything written made
//!    durable, and the old database's books locked: no delivery-side write either.
//! 2. Every tree copied into a fresh `queue.next/`, with a store-id base past the old one's
//!    ids; flushed, fdatasynced, its names and its own name synced. A crash here leaves
//!    `queue/` whole and `queue.next/` perhaps half built: open deletes `queue.next/`.
//! 3. `queue/` renamed to `queue.old/`, the data dir synced. A crash after leaves
//!    `queue.old/` and a whole `queue.next/`: open renames `queue.next/` to `queue/`.
//! 4. `queue.next/` renamed to `queue/`, the data dir synced. From here the copy is the
//!    queue; a crash leaves `queue.old/` beside it, which open deletes.
//! 5. The copy opened and swapped in; the old database's books marked retired, so that a
//!    delivery-side write that waited for them goes to the copy; `queue.old/` deleted.
//!
//! At every moment one whole database on disk holds every acknowledged call: the old one
//! until the copy is whole and durable, the copy after; the data dir is synced between the
//! renames, so no crash can keep the second without the first. The copy holds the same ids,
//! counters, dead letters and rejected calls: nothing a client or operator sees changes but
//! the disk used.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::QueueError;
use super::layout::{db_path, files_bytes, CLEAN_CLOSE_KEY, ID_BASE_KEY, META_TREE};
use super::open::open_database;
use super::options::QueueOptions;
use super::{sled_config, Inner, Queue};

/// Where the copy is built, beside the database.
const NEXT_DIR: &str = "queue.next";
/// Where the old database goes while the copy takes its name.
const OLD_DIR: &str = "queue.old";
/// Entries copied per sled batch.
const COPY_BATCH: usize = 1_000;
/// How long the copy's open waits for sled's threads to let go of the files the copying
/// handle held (see `tests/common/disk.rs`: a few ms, rarely).
const REOPEN_WAIT: Duration = Duration::from_secs(10);

/// What a rebuild gave back.
#[derive(Debug, Clone, Copy)]
pub struct Rebuilt {
    /// The database's files before and after, in bytes of disk.
    pub files_before: u64,
    pub files_after: u64,
    /// Bytes of stored records copied.
    pub copied: u64,
    /// How long appends waited.
    pub paused: Duration,
}

impl Queue {
    /// Rebuilds the database into a fresh copy and switches it in (see the module's steps).
    /// Appends wait meanwhile; reads and settling go on with whichever database is in use.
    pub async fn rebuild(&self) -> Result<Rebuilt, QueueError> {
        let started = Instant::now();
        let alone = self.shared.appends.write().await;
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(QueueError::Closed);
        }
        let old = self.inner();
        old.commit
            .durable()
            .await
            .map_err(|e| QueueError::NotDurable(e.to_string()))?;
        let queue = self.clone();
        let switched = old.clone();
        let rebuilt = tokio::task::spawn_blocking(move || queue.switch_from(&switched))
            .await
            .map_err(|e| QueueError::Storage(format!("the rebuild failed: {e}")))??;
        // The copy is the queue: appends go on, into it.
        let paused = started.elapsed();
        drop(alone);
        // The old database is no longer the queue: stop its appender and committer.
        if let Err(e) = old.close().await {
            tracing::warn!(error = %e, "the rebuilt queue's old database did not close cleanly");
        }
        self.shared
            .earlier_flushes
            .fetch_add(old.commit.flushes(), Ordering::SeqCst);
        self.shared.rebuilds.fetch_add(1, Ordering::SeqCst);
        drop(old);
        give_memory_back();
        // Readers waiting for calls look again, now in the copy.
        self.shared.advanced.notify_waiters();
        Ok(Rebuilt { paused, ..rebuilt })
    }

    /// Steps 2 to 5, with `old`'s books locked throughout.
    fn switch_from(&self, old: &Arc<Inner>) -> Result<Rebuilt, QueueError> {
        let options = &self.shared.options;
        let books = old.books.lock().expect("books lock");
        let paths = Paths::of(&options.data_dir);
        let files_before = files_bytes(&paths.db);
        let copied = old.budget.stored();
        remove_if_there(&paths.next)?;
        remove_if_there(&paths.old)?;
        if let Err(e) = copy_database(old, &paths.next, options) {
            let _ = std::fs::remove_dir_all(&paths.next);
            return Err(e);
        }
        crate::failpoint::hit("rebuild-before-switch");
        self.rename_both(&paths, old)?;
        crate::failpoint::hit("rebuild-after-switch");
        let new = match open_copy(options, self.shared.advanced.clone()) {
            Ok(new) => new,
            Err(e) => {
                // On disk the copy is the queue now: the old database must take no more
                // calls. Until a restart opens the copy, appends are refused.
                old.closed.store(true, Ordering::SeqCst);
                tracing::error!(error = %e, "the rebuilt queue cannot be opened: restart grouprelay");
                return Err(e);
            }
        };
        *self.shared.current.write().expect("queue lock") = Arc::new(new);
        old.retired.store(true, Ordering::SeqCst);
        drop(books);
        if let Err(e) = std::fs::remove_dir_all(&paths.old) {
            tracing::warn!(error = %e, dir = %paths.old.display(), "cannot delete the queue's old database (the next start does)");
        }
        Ok(Rebuilt {
            files_before,
            files_after: files_bytes(&paths.db),
            copied,
            paused: Duration::ZERO,
        })
    }
}

impl Queue {
    /// Steps 3 and 4. On an error the old database stays the queue, on disk and here, or, if
    /// its name cannot be given back, it refuses appends until a restart: a call it took
    /// then would be in a directory the next start deletes.
    fn rename_both(&self, paths: &Paths, old: &Inner) -> Result<(), QueueError> {
        let data_dir = &self.shared.options.data_dir;
        let renamed = std::fs::rename(&paths.db, &paths.old)
            .and_then(|()| crate::dirsync::sync_dir(data_dir))
            .map(|()| crate::failpoint::hit("rebuild-between-renames"))
            .and_then(|()| std::fs::rename(&paths.next, &paths.db));
        let Err(e) = renamed else {
            // The copy has the name: whichever of the two states a crash keeps is whole.
            if let Err(e) = crate::dirsync::sync_dir(data_dir) {
                tracing::warn!(error = %e, "cannot sync the data dir after the queue's rebuild");
            }
            return Ok(());
        };
        let error = QueueError::Storage(format!("cannot switch the rebuilt queue in: {e}"));
        // A copy left beside a missing `queue/` would be switched in by the next start.
        let undone = remove_if_there(&paths.next).and_then(|()| match paths.db.exists() {
            true => Ok(()),
            false => rename_synced(&paths.old, &paths.db, data_dir),
        });
        if let Err(e) = undone {
            old.closed.store(true, Ordering::SeqCst);
            tracing::error!(error = %e, "a failed rebuild left the queue's directory renamed: new calls are refused; restart grouprelay");
        }
        Err(error)
    }
}

/// Completes, at open, a switch that a crash cut short (see the module's steps): afterwards
/// `queue/` is the one whole database and nothing else of a rebuild is left.
pub(super) fn finish_switch(data_dir: &Path) -> std::io::Result<()> {
    let paths = Paths::of(data_dir);
    let (db, next, old) = (paths.db.exists(), paths.next.exists(), paths.old.exists());
    if !db && next {
        // Step 3 was durable, so the copy was whole: finish step 4.
        std::fs::rename(&paths.next, &paths.db)?;
        crate::dirsync::sync_dir(data_dir)?;
        tracing::info!("finished the queue's rebuild that a stop cut short");
    } else if !db && old {
        std::fs::rename(&paths.old, &paths.db)?;
        crate::dirsync::sync_dir(data_dir)?;
    }
    remove_if_there(&paths.next).map_err(std::io::Error::other)?;
    remove_if_there(&paths.old).map_err(std::io::Error::other)
}

/// The three directories a rebuild uses.
struct Paths {
    db: PathBuf,
    next: PathBuf,
    old: PathBuf,
}

impl Paths {
    fn of(data_dir: &Path) -> Paths {
        Paths {
            db: db_path(data_dir),
            next: data_dir.join(NEXT_DIR),
            old: data_dir.join(OLD_DIR),
        }
    }
}

/// Step 2: every tree of `old` into a fresh database at `to`, made durable with its names.
fn copy_database(old: &Inner, to: &Path, options: &QueueOptions) -> Result<(), QueueError> {
    let storage = |e: std::io::Error| {
        QueueError::Storage(format!(
            "cannot build the rebuilt queue in {}: {e}",
            to.display()
        ))
    };
    crate::dirsync::create_dir_all(to, 0o700).map_err(storage)?;
    let segment_bytes = sled_config::segment_bytes(to);
    let db = sled_config::config(to, options.cache_bytes, segment_bytes).open()?;
    for name in old.db.tree_names() {
        let (from, into) = (old.db.open_tree(&name)?, db.open_tree(&name)?);
        let mut batch = sled::Batch::default();
        for (i, item) in from.iter().enumerate() {
            let (key, value) = item?;
            batch.insert(key, value);
            if (i + 1) % COPY_BATCH == 0 {
                into.apply_batch(std::mem::take(&mut batch))?;
            }
        }
        into.apply_batch(batch)?;
    }
    let meta = db.open_tree(META_TREE)?;
    // The copy's sled counts ids from 0 again: its keys start past the old one's.
    meta.insert(ID_BASE_KEY, &old.next_store_id()?.to_be_bytes())?;
    // The byte count, exact now that nothing writes; after a write that failed part way only
    // a recount knows it, as after a crash.
    match old.appender.broken() {
        true => meta.remove(CLEAN_CLOSE_KEY)?,
        false => meta.insert(CLEAN_CLOSE_KEY, &old.budget.stored().to_be_bytes())?,
    };
    db.flush()?;
    if crate::failpoint::skips("rebuild-skip-sync") {
        return Ok(());
    }
    db.sync_data()?;
    drop((meta, db));
    crate::dirsync::sync_dir(to).map_err(storage)?;
    let blobs = to.join("blobs");
    if blobs.exists() {
        crate::dirsync::sync_dir(&blobs).map_err(storage)?;
    }
    crate::dirsync::sync_dir(&options.data_dir).map_err(storage)
}

/// Opens the copy at the queue's own path, waiting while sled's threads still hold the
/// files the copying handle had open.
fn open_copy(
    options: &QueueOptions,
    advanced: Arc<tokio::sync::Notify>,
) -> Result<Inner, QueueError> {
    let deadline = Instant::now() + REOPEN_WAIT;
    let mut pause = Duration::from_millis(1);
    loop {
        match open_database(options, advanced.clone()) {
            Err(QueueError::InUse { .. }) if Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            opened => return opened,
        }
    }
}

/// A rename made durable: the directory holding both names synced.
fn rename_synced(from: &Path, to: &Path, data_dir: &Path) -> Result<(), QueueError> {
    std::fs::rename(from, to)
        .and_then(|()| crate::dirsync::sync_dir(data_dir))
        .map_err(|e| {
            QueueError::Storage(format!(
                "cannot rename {} to {}: {e}",
                from.display(),
                to.display()
            ))
        })
}

fn remove_if_there(dir: &Path) -> Result<(), QueueError> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(QueueError::Storage(format!(
            "cannot delete {}: {e}",
            dir.display()
        ))),
        _ => Ok(()),
    }
}

/// Hands the allocator's free pages back to the system: the old database's page cache and
/// page table were freed in many small pieces, which glibc keeps unless asked.
fn give_memory_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; no pointer is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}
