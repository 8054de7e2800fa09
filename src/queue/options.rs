//! How the queue is opened: its directory, durability mode and limits, each default named once.

use std::path::PathBuf;
use std::time::Duration;

/// Stored bytes past which appends are refused: 1 GiB.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
/// Free bytes the data dir's filesystem must keep: 512 MiB.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 512 << 20;
/// How often `interval` mode flushes.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(200);
/// sled's page cache. sled's own 1 GiB default would let a large backlog cost a large RSS;
/// 8 MiB held 14-20 MB less than 16 under batch load, as fast (README, "Performance").
pub const DEFAULT_CACHE_BYTES: u64 = 8 << 20;
/// Disk the database's files may take before it is rebuilt to give space back: 64 MiB
/// (and only once they take [`REBUILD_GARBAGE_FACTOR`] times what it stores).
pub const DEFAULT_REBUILD_ABOVE_BYTES: u64 = 64 << 20;
/// The database is rebuilt only when its files take more than this many times the bytes it
/// stores: most of the file is then space sled freed but keeps.
pub const REBUILD_GARBAGE_FACTOR: u64 = 4;
/// The most stored bytes a rebuild copies. New calls wait while it copies, so this bounds
/// that pause (the benchmark's `rebuild` scenario measures it); a queue storing more waits
/// for delivery to bring it down.
pub const REBUILD_MAX_COPY_BYTES: u64 = 16 << 20;

/// When an append counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// After a flush and an fdatasync that cover the call (group commit).
    #[default]
    Fsync,
    /// After the insert; a periodic flush makes it durable.
    Interval,
}

impl Durability {
    /// The name a setting gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Fsync => "fsync",
            Durability::Interval => "interval",
        }
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Durability {
    type Err = String;

    fn from_str(text: &str) -> Result<Durability, String> {
        match text {
            "fsync" => Ok(Durability::Fsync),
            "interval" => Ok(Durability::Interval),
            other => Err(format!("expected \"fsync\" or \"interval\", got {other:?}")),
        }
    }
}

/// How to open the queue.
#[derive(Debug, Clone)]
pub struct QueueOptions {
    /// The data dir; the database lives in its `queue/` subdirectory.
    pub data_dir: PathBuf,
    pub durability: Durability,
    /// Most bytes of stored records (queued, rejected and dead-lettered calls) before appends
    /// are refused.
    pub max_bytes: u64,
    /// sled's page cache.
    pub cache_bytes: u64,
    /// Free bytes the data dir's filesystem must keep; appends below it are refused
    /// (0: no floor).
    pub min_free_bytes: u64,
    /// How often `interval` mode flushes (and how soon removals of delivered calls are
    /// made durable in either mode).
    pub sync_interval: Duration,
    /// Disk the database's files may take before it is rebuilt into a fresh one, giving
    /// back the space sled keeps after a backlog (0: never rebuilt).
    pub rebuild_above_bytes: u64,
}

impl QueueOptions {
    /// The defaults, for a queue in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> QueueOptions {
        QueueOptions {
            data_dir: data_dir.into(),
            durability: Durability::default(),
            max_bytes: DEFAULT_MAX_BYTES,
            cache_bytes: DEFAULT_CACHE_BYTES,
            min_free_bytes: DEFAULT_MIN_FREE_BYTES,
            sync_interval: DEFAULT_SYNC_INTERVAL,
            rebuild_above_bytes: DEFAULT_REBUILD_ABOVE_BYTES,
        }
    }
}
