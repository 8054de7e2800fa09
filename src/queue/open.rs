//! Opening the queue: the database created or recovered, its format checked, the books and
//! the byte count read back, damage on disk noticed, the names made durable, and the
//! appender and committer started.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Notify;

use super::appender::{self, Appender, Target};
use super::budget::{self, Budget};
use super::commit::GroupCommit;
use super::error::QueueError;
use super::keys::{
    decode_chunk_key, decode_done_key, decode_id, CHUNK_PREFIX, DONE_PREFIX, LEDGER_KEY,
};
use super::layout::{
    db_path, DB_FORMAT, DEAD_TREE, FORMAT_KEY, ID_BASE_KEY, LOCK_FILE, META_TREE, QUEUE_TREE,
    REJECTED_TREE, WATERMARK_FILE,
};
use super::ledger::{self, Books, Counters};
use super::options::QueueOptions;
use super::record::DeadCause;
use super::settle::encode_counters;
use super::space::FreeSpace;
use super::watermark::Watermark;
use super::{rebuild, reclaim, sled_config, Inner, Queue, Shared};

impl Queue {
    /// Opens (or creates) the queue in `options.data_dir`, first completing a rebuild's
    /// switch that a crash cut short. Must run inside a tokio runtime: it starts the
    /// committer and reclaim tasks.
    pub fn open(options: QueueOptions) -> Result<Queue, QueueError> {
        let lock = lock_data_dir(&options.data_dir)?;
        rebuild::finish_switch(&options.data_dir).map_err(|e| {
            QueueError::Storage(format!(
                "cannot finish the queue's rebuild in {}: {e}",
                options.data_dir.display()
            ))
        })?;
        let advanced = Arc::new(Notify::new());
        let inner = open_database(&options, advanced.clone())?;
        let queue = Queue {
            shared: Arc::new(Shared {
                current: RwLock::new(Arc::new(inner)),
                appends: tokio::sync::RwLock::new(()),
                options,
                advanced,
                settled: Arc::new(Notify::new()),
                closed: AtomicBool::new(false),
                earlier_flushes: AtomicU64::new(0),
                rebuilds: AtomicU64::new(0),
                reclaim: Mutex::new(None),
                _lock: lock,
            }),
        };
        let task = reclaim::start(&queue);
        *queue.shared.reclaim.lock().expect("reclaim lock") = task;
        Ok(queue)
    }
}

/// Opens (or creates) the database in `options.data_dir` and starts its appender and
/// committer; the committer wakes `advanced` when calls become readable.
pub(super) fn open_database(
    options: &QueueOptions,
    advanced: Arc<Notify>,
) -> Result<Inner, QueueError> {
    let path = db_path(&options.data_dir);
    crate::dirsync::create_dir_all(&path, 0o700)
        .map_err(|e| QueueError::Storage(format!("cannot create {}: {e}", path.display())))?;
    let segment_bytes = sled_config::segment_bytes(&path);
    let db = sled_config::config(&path, options.cache_bytes, segment_bytes)
        .open()
        .map_err(|e| in_use(e, &options.data_dir, &path))?;
    let meta = db.open_tree(META_TREE)?;
    check_format(&meta)?;
    let tree = db.open_tree(QUEUE_TREE)?;
    let rejected = db.open_tree(REJECTED_TREE)?;
    let dead = db.open_tree(DEAD_TREE)?;
    let mut books = read_books(&tree)?;
    let watermark_path = path.join(WATERMARK_FILE);
    let (watermark, durable_before) = Watermark::open(&watermark_path).map_err(|e| {
        QueueError::Storage(format!("cannot open {}: {e}", watermark_path.display()))
    })?;
    let next_id = recovered_end(&tree, &mut books, durable_before)?;
    // sled made its files and renamed its snapshot without syncing a directory; no call
    // is acknowledged before their names are durable.
    sync_names(&options.data_dir, &path).map_err(|e| {
        QueueError::Storage(format!(
            "cannot make the queue's files durable in {}: {e}",
            path.display()
        ))
    })?;
    let budget = Arc::new(Budget::new(budget::at_open(&meta, &db)?, options.max_bytes));
    let id_base = match meta.get(ID_BASE_KEY)? {
        Some(bytes) => decode_id(&bytes)?,
        None => 0,
    };
    db.flush()?;
    let recovered = Recovered {
        db,
        meta,
        tree,
        rejected,
        dead,
        books,
        next_id,
        budget,
        watermark,
        id_base,
        chunk_bytes: appender::chunk_bytes(segment_bytes),
    };
    recovered.start(options, advanced)
}

/// What open found on disk, ready to take appends once the appender and committer run.
struct Recovered {
    db: sled::Db,
    meta: sled::Tree,
    tree: sled::Tree,
    rejected: sled::Tree,
    dead: sled::Tree,
    books: Books,
    /// The id the next call gets.
    next_id: u64,
    budget: Arc<Budget>,
    watermark: Watermark,
    id_base: u64,
    /// Most record bytes in one chunk, for this database's segment size.
    chunk_bytes: usize,
}

impl Recovered {
    /// Starts the committer and the appender: the database is ready for the queue.
    fn start(self, options: &QueueOptions, advanced: Arc<Notify>) -> Result<Inner, QueueError> {
        let rejected_count = AtomicU64::new(self.rejected.len() as u64);
        let inserted_end = Arc::new(AtomicU64::new(self.next_id));
        let written = inserted_end.clone();
        let before_flush = move || written.load(Ordering::SeqCst);
        let (commit, committer) = GroupCommit::start(
            self.db.clone(),
            options.sync_interval,
            advanced,
            Box::new(before_flush),
            Box::new(move |durable_end| self.watermark.record(durable_end)),
        );
        let appender = Appender::start(Target {
            tree: self.tree.clone(),
            next_id: self.next_id,
            inserted_end: inserted_end.clone(),
            budget: self.budget.clone(),
            commit: commit.clone(),
            durability: options.durability,
            chunk_bytes: self.chunk_bytes,
        })?;
        Ok(Inner {
            db: self.db,
            meta: self.meta,
            tree: self.tree,
            rejected: self.rejected,
            dead: self.dead,
            durability: options.durability,
            budget: self.budget,
            free_space: FreeSpace::new(&options.data_dir, options.min_free_bytes),
            inserted_end,
            appender,
            books: Mutex::new(self.books),
            rejected_count,
            closed: AtomicBool::new(false),
            commit,
            committer: Mutex::new(Some(committer)),
            id_base: self.id_base,
            retired: AtomicBool::new(false),
        })
    }
}

/// Takes the data dir's lock ([`LOCK_FILE`]), creating the data dir if need be; held while
/// the file stays open.
fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File, QueueError> {
    use std::os::fd::AsRawFd;
    let path = data_dir.join(LOCK_FILE);
    let storage =
        |e: std::io::Error| QueueError::Storage(format!("cannot lock {}: {e}", path.display()));
    crate::dirsync::create_dir_all(data_dir, 0o700).map_err(storage)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(storage)?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let error = std::io::Error::last_os_error();
        if error.kind() == std::io::ErrorKind::WouldBlock {
            return Err(QueueError::InUse {
                dir: data_dir.to_path_buf(),
                pid: lock_holder(&path),
            });
        }
        return Err(storage(error));
    }
    Ok(file)
}

/// sled's "could not acquire lock" in plain words, with the holder's pid when the kernel's
/// lock table names it.
fn in_use(error: sled::Error, data_dir: &Path, db_dir: &Path) -> QueueError {
    if !error.to_string().contains("could not acquire lock") {
        return error.into();
    }
    QueueError::InUse {
        dir: data_dir.to_path_buf(),
        pid: lock_holder(&db_dir.join("db")),
    }
}

/// The pid holding a lock on `file`, from `/proc/locks` (`N: FLOCK ADVISORY WRITE pid
/// major:minor:inode ...`).
fn lock_holder(file: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(file).ok()?.ino().to_string();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (pid, device_inode) = (fields.get(4)?, fields.get(5)?);
        (device_inode.rsplit(':').next()? == inode).then(|| pid.parse().ok())?
    })
}

/// Refuses a database in another format; marks a new one with this build's.
fn check_format(meta: &sled::Tree) -> Result<(), QueueError> {
    match meta.get(FORMAT_KEY)?.as_deref() {
        Some([v]) if *v > DB_FORMAT => Err(QueueError::NewerFormat(*v)),
        Some([v]) if *v < DB_FORMAT => Err(QueueError::OlderFormat(*v)),
        Some(_) => Ok(()),
        None => {
            meta.insert(FORMAT_KEY, &[DB_FORMAT])?;
            Ok(())
        }
    }
}

/// The id the next call gets: past the last stored chunk and every id ever settled, and
/// past every id the watermark says was made durable. Ids durable but not recovered were
/// lost to damage on disk: they are counted dead as `lost_on_disk`, so the books still add up.
fn recovered_end(
    tree: &sled::Tree,
    books: &mut Books,
    durable_before: Option<u64>,
) -> Result<u64, QueueError> {
    let next_id = match tree.scan_prefix([CHUNK_PREFIX]).next_back() {
        Some(item) => decode_chunk_key(&item?.0)?.end(),
        None => 0,
    }
    .max(books.counters.next_id_floor);
    let Some(durable) = durable_before.filter(|&durable| durable > next_id) else {
        return Ok(next_id);
    };
    // sled recovered less than it had made durable: damage on disk cut its log short.
    let lost = durable - next_id;
    tracing::error!(
        lost_calls = lost,
        recovered_up_to = next_id,
        durable_up_to = durable,
        "the queue's database came back shorter than it was made durable: calls were lost to damage on disk"
    );
    *books
        .counters
        .dead
        .entry(DeadCause::LostOnDisk.as_str().into())
        .or_default() += lost;
    books.counters.next_id_floor = durable;
    tree.insert(LEDGER_KEY, encode_counters(&books.counters)?)?;
    Ok(durable)
}

/// The counters and the done-bits as stored.
fn read_books(tree: &sled::Tree) -> Result<Books, QueueError> {
    let counters = match tree.get(LEDGER_KEY)? {
        Some(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| QueueError::Damaged(format!("queue counters: {e}")))?,
        None => Counters::default(),
    };
    let mut books = Books {
        counters,
        ..Books::default()
    };
    for item in tree.scan_prefix([DONE_PREFIX]) {
        let (key, bits) = item?;
        books
            .done
            .insert(decode_done_key(&key)?, ledger::decode_bits(&bits));
    }
    Ok(books)
}

/// Makes durable the names sled and the watermark created at open (`docs/sled.md`): those in
/// the database directory (`db`, `blobs`, the watermark; the patched sled syncs `conf` and
/// its snapshot's rename itself) and the database directory's own name in the data dir.
/// Once per open: the per-request cost is unchanged.
fn sync_names(data_dir: &Path, db_dir: &Path) -> std::io::Result<()> {
    crate::dirsync::sync_dir(db_dir)?;
    crate::dirsync::sync_dir(data_dir)
}
