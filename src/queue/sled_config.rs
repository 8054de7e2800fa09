//! sled's configuration for a queue database, in one place so that every open and a
//! rebuild's copy agree; and the log segment size, which a database keeps for life.
//!
//! The segment size bounds the chunks: sled writes a log message over a quarter of a segment
//! (a leaf, say) to a *blob* file of its own, synced on its own, and sled splits a leaf past
//! 16 keys, or, as we ask our sled to, past [`LEAF_SPLIT_BYTES`]. So chunks stay small
//! enough that a full leaf of them is an ordinary log message (`appender::chunk_bytes`), and
//! bigger segments allow bigger chunks: fewer sled keys per request, and sled's cost is per
//! key far more than per byte.

use std::path::Path;

/// sled's log segment for a database created now: 2 MiB, so that a 100-call batch request
/// (about 65 KB) is one chunk rather than ten.
pub const SEGMENT_BYTES: usize = 2 << 20;
/// The segment of every database created before [`SEGMENT_BYTES`] (sled's default). Such a
/// database keeps it (sled refuses to open a database with another) until a rebuild copies
/// it into a new one.
pub const LEGACY_SEGMENT_BYTES: usize = 512 << 10;
/// A leaf of the queue splits once its keys and values pass this many bytes (and it has 4
/// keys), not only past 16 keys: so a leaf of 2 MiB-segment chunks, up to 80 KB each, stays
/// under a quarter of the segment, which lets a 100-call request be one chunk. Not recorded
/// in the database: it only decides when sled splits and merges leaves.
pub const LEAF_SPLIT_BYTES: u64 = 300_000;
/// A writer waits (up to a second) before it adds to sled's log while more than this much of
/// the log is reserved but not yet written to the file: four 2 MiB segments. Without it,
/// writers that outrun the disk (`interval` mode under heavy batch load) pile sealed segment
/// buffers up in memory: hundreds of MB for a moment, and p99 past half a second.
pub const MAX_UNWRITTEN_LOG_BYTES: u64 = 8 << 20;
/// Where sled keeps a database's settings, beside its log.
const SLED_CONF_FILE: &str = "conf";
/// sled's log file.
const SLED_LOG_FILE: &str = "db";

/// The sled configuration for the database at `path`, whose segment size is
/// `segment_bytes` (see [`segment_bytes`]), with no flusher of sled's own (the committer
/// owns flushing: sled's flusher would race it), leaves split by bytes too, and writers held
/// back while the disk is behind.
pub(super) fn config(path: &Path, cache_bytes: u64, segment_bytes: usize) -> sled::Config {
    sled::Config::new()
        .path(path)
        .cache_capacity(cache_bytes)
        .segment_size(segment_bytes)
        .flush_every_ms(None)
        .leaf_split_bytes(Some(LEAF_SPLIT_BYTES))
        .max_unwritten_log_bytes(Some(MAX_UNWRITTEN_LOG_BYTES))
}

/// The segment size of the database at `path`: what sled recorded when it created it, or
/// [`SEGMENT_BYTES`] for a new one (no settings file and no log). A settings file that cannot
/// be read, or a log without one, gives the legacy size, the only one an older grouprelay
/// wrote; sled checks a recorded size against its file at open.
pub fn segment_bytes(path: &Path) -> usize {
    match std::fs::read(path.join(SLED_CONF_FILE)) {
        Ok(bytes) => recorded_segment_bytes(&bytes).unwrap_or(LEGACY_SEGMENT_BYTES),
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound && !path.join(SLED_LOG_FILE).exists() =>
        {
            SEGMENT_BYTES
        }
        Err(_) => LEGACY_SEGMENT_BYTES,
    }
}

/// The `segment_size: N` line of sled's settings file (`key: value` lines, then a CRC).
fn recorded_segment_bytes(conf: &[u8]) -> Option<usize> {
    conf.split(|&b| b == b'\n')
        .filter_map(|line| std::str::from_utf8(line).ok())
        .find_map(|line| line.strip_prefix("segment_size: "))
        .and_then(|value| value.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_database_gets_the_new_segment_and_an_old_one_keeps_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("new");
        assert_eq!(segment_bytes(&new), SEGMENT_BYTES);
        drop(config(&new, 1 << 20, segment_bytes(&new)).open().unwrap());
        assert_eq!(segment_bytes(&new), SEGMENT_BYTES);

        let old = dir.path().join("old");
        drop(
            sled::Config::new()
                .path(&old)
                .segment_size(LEGACY_SEGMENT_BYTES)
                .open()
                .unwrap(),
        );
        assert_eq!(segment_bytes(&old), LEGACY_SEGMENT_BYTES);
        // sled refuses a database with another segment size: ours must match it.
        config(&old, 1 << 20, segment_bytes(&old)).open().unwrap();

        // A log without its settings file is taken for an older database's.
        let bare = dir.path().join("bare");
        std::fs::create_dir_all(&bare).unwrap();
        std::fs::write(bare.join(SLED_LOG_FILE), b"").unwrap();
        assert_eq!(segment_bytes(&bare), LEGACY_SEGMENT_BYTES);
    }

    /// The chunk bound holds: leaves of chunks at the limit, appended and removed as the
    /// queue does, never go to blob files, whatever the segment size.
    #[test]
    fn leaves_of_the_largest_chunks_stay_in_the_log() {
        use crate::queue::appender::chunk_bytes;
        use crate::queue::record::CHUNK_HEADER_LEN;
        let dir = tempfile::tempdir().unwrap();
        for segment in [LEGACY_SEGMENT_BYTES, SEGMENT_BYTES] {
            let path = dir.path().join(segment.to_string());
            let db = config(&path, 1 << 20, segment).open().unwrap();
            // The largest chunk: the limit's record bytes, a length prefix for each of a
            // few records, the header.
            let value = vec![7u8; chunk_bytes(segment) + 4 * 4 + CHUNK_HEADER_LEN];
            for id in 0u64..200 {
                db.insert(id.to_be_bytes(), value.as_slice()).unwrap();
                if id >= 50 && id % 3 == 0 {
                    db.remove((id - 50).to_be_bytes()).unwrap();
                }
            }
            db.flush().unwrap();
            let blobs = std::fs::read_dir(path.join("blobs"))
                .map(|entries| entries.count())
                .unwrap_or(0);
            assert_eq!(
                blobs, 0,
                "{segment}-byte segments: leaves went to blob files"
            );
        }
    }
}
