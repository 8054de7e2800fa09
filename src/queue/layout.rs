//! Where the queue lives on disk: its directory, files, sled trees and meta keys, and the
//! format number of what is stored in them.

use std::path::{Path, PathBuf};

/// The data dir's lock: held (`flock`) by the process whose queue it is, from before a
/// rebuild's leftovers are looked at until the queue is dropped, so that a second grouprelay
/// never touches a directory a rebuild is switching.
pub const LOCK_FILE: &str = "grouprelay.lock";
/// Name of the sled database directory inside the data dir.
pub const DB_DIR: &str = "queue";
/// The durable watermark's file, beside sled's inside the database directory, so that it
/// moves with the queue (see `watermark`).
pub const WATERMARK_FILE: &str = "grouprelay.watermark";
/// Chunks of queued calls, their done-bits and the counters: one tree, so that a call's
/// state and the counters change in one atomic batch.
pub(super) const QUEUE_TREE: &str = "queue";
pub(super) const REJECTED_TREE: &str = "rejected";
pub(super) const DEAD_TREE: &str = "dead";
/// Chunks that could not be read: `reason \n original bytes`, under their queue key.
pub(super) const QUARANTINE_TREE: &str = "quarantine";
pub(super) const META_TREE: &str = "meta";
pub(super) const FORMAT_KEY: &str = "format";
/// The database format this build writes and reads: 2 = calls in chunks.
pub(super) const DB_FORMAT: u8 = 2;
/// What a rebuilt database adds to sled's `generate_id` for its store keys (u64, big-endian):
/// the next id of the database it was copied from.
pub(super) const ID_BASE_KEY: &str = "store_id_base";
/// Written by a clean `close`: the exact stored-bytes count. Removed at open, so that its
/// absence tells a crash (and a recount) apart.
pub(super) const CLEAN_CLOSE_KEY: &str = "clean_close_stored_bytes";

/// The sled database's directory inside the data dir.
pub(super) fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join(DB_DIR)
}

/// Bytes of disk the files under `dir` take (their allocated blocks), 0 if it is not there.
pub fn files_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => files_bytes(&entry.path()),
            Ok(meta) => meta.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}
