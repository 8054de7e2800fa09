//! The cut: turns the model into the on-disk image a power cut at this moment could leave.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{CString, OsString};
use std::fmt;
use std::fs::{self, File, Permissions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::model::{Bytes, FileOp, NodeId, NodeKind, Tree, BLOCK, ROOT};
use crate::rng::Rng;

/// Which of the states a power cut could leave is written out. Every variation keeps all that
/// was made durable (fsynced data, fsynced directory entries) and differs only in what it does
/// with what was not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variation {
    /// Every unsynced write, size change and directory operation is lost: the durable state
    /// exactly.
    LoseAll,
    /// Unsynced writes reached the disk in 4 KiB-aligned pieces, in any order: each piece of
    /// each pending write, and each pending size change, is kept or lost by the seed, and the
    /// kept ones are applied in their original order. Each directory keeps a seeded prefix of its
    /// log of unsynced entry operations (a journal keeps operations in order).
    KeepSomeBlocks,
    /// Each file keeps a seeded prefix of its unsynced operations, and the last kept one, if a
    /// write, is torn: only a seeded strict prefix of its bytes (possibly none) is kept.
    /// Directories keep a seeded prefix of their logs, as in `KeepSomeBlocks`.
    TornWrite,
}

impl Variation {
    /// All variations, for tests that loop over them.
    pub const ALL: [Variation; 3] = [
        Variation::LoseAll,
        Variation::KeepSomeBlocks,
        Variation::TornWrite,
    ];

    /// The variation [`crate::PowerCut::cut`] picks for `seed`.
    pub(crate) fn from_seed(seed: u64) -> Variation {
        Variation::ALL[(Rng::new(seed).next_u64() % 3) as usize]
    }
}

impl fmt::Display for Variation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What a cut kept and lost. Counts of unsynced operations cover every file and directory of
/// the model, including those that did not make it into the image (whose operations are lost).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CutReport {
    /// The variation written.
    pub variation: Variation,
    /// The seed that chose what survived.
    pub seed: u64,
    /// Unsynced writes applied whole.
    pub writes_kept: u64,
    /// Unsynced writes applied in part (some 4 KiB pieces, or torn).
    pub writes_partial: u64,
    /// Unsynced writes lost whole.
    pub writes_lost: u64,
    /// Bytes of unsynced writes applied.
    pub bytes_kept: u64,
    /// Bytes of unsynced writes lost.
    pub bytes_lost: u64,
    /// Unsynced size changes (truncate, extend) applied.
    pub size_changes_kept: u64,
    /// Unsynced size changes lost.
    pub size_changes_lost: u64,
    /// Unsynced directory operations (create, unlink, rename, ...) applied.
    pub dir_ops_kept: u64,
    /// Unsynced directory operations lost.
    pub dir_ops_lost: u64,
    /// Regular files in the image (a file reachable by two names counts once).
    pub files: u64,
    /// Directories in the image, the root included.
    pub dirs: u64,
    /// Regular files the live mount showed at the cut that the image does not have at all.
    pub live_files_missing: u64,
}

impl CutReport {
    fn new(variation: Variation, seed: u64) -> CutReport {
        CutReport {
            variation,
            seed,
            writes_kept: 0,
            writes_partial: 0,
            writes_lost: 0,
            bytes_kept: 0,
            bytes_lost: 0,
            size_changes_kept: 0,
            size_changes_lost: 0,
            dir_ops_kept: 0,
            dir_ops_lost: 0,
            files: 0,
            dirs: 0,
            live_files_missing: 0,
        }
    }

    /// Counts one unsynced write of `len` bytes of which `kept` were applied.
    fn count_write(&mut self, len: u64, kept: u64) {
        self.bytes_kept += kept;
        self.bytes_lost += len - kept;
        if kept == 0 {
            self.writes_lost += 1;
        } else if kept == len {
            self.writes_kept += 1;
        } else {
            self.writes_partial += 1;
        }
    }

    fn count_lost(&mut self, ops: &[FileOp]) {
        for op in ops {
            match op {
                FileOp::Write { bytes, .. } => self.count_write(bytes.len() as u64, 0),
                FileOp::SetLen(_) => self.size_changes_lost += 1,
            }
        }
    }
}

impl fmt::Display for CutReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "power cut {} seed {}: unsynced writes kept {} partial {} lost {} \
             ({} bytes kept, {} lost), size changes kept {} lost {}, dir ops kept {} lost {}; \
             image has {} files in {} dirs; {} live files missing",
            self.variation,
            self.seed,
            self.writes_kept,
            self.writes_partial,
            self.writes_lost,
            self.bytes_kept,
            self.bytes_lost,
            self.size_changes_kept,
            self.size_changes_lost,
            self.dir_ops_kept,
            self.dir_ops_lost,
            self.files,
            self.dirs,
            self.live_files_missing,
        )
    }
}

/// Writes the image of `tree` under `variation` and `seed` into the existing, empty `out`.
pub(crate) fn write_image(
    tree: &Tree,
    variation: Variation,
    seed: u64,
    out: &Path,
) -> io::Result<CutReport> {
    let mut writer = ImageWriter {
        tree,
        variation,
        seed,
        report: CutReport::new(variation, seed),
        files: HashMap::new(),
        dirs: HashSet::new(),
    };
    writer.dirs.insert(ROOT);
    writer.write_dir(ROOT, out)?;
    // Operations of nodes the image does not hold are all lost.
    for id in tree.ids() {
        match tree.node(id).map(|n| &n.kind) {
            Some(NodeKind::File { pending, .. }) if !writer.files.contains_key(&id) => {
                writer.report.count_lost(pending);
                if tree.path(id).is_some() {
                    writer.report.live_files_missing += 1;
                }
            }
            Some(NodeKind::Dir { log, .. }) if !writer.dirs.contains(&id) => {
                writer.report.dir_ops_lost += log.len() as u64;
            }
            _ => {}
        }
    }
    writer.report.files = writer.files.len() as u64;
    writer.report.dirs = writer.dirs.len() as u64;
    Ok(writer.report)
}

struct ImageWriter<'a> {
    tree: &'a Tree,
    variation: Variation,
    seed: u64,
    report: CutReport,
    /// Files written, with their first path (a second durable name becomes a hard link).
    files: HashMap<NodeId, PathBuf>,
    /// Directories written. A directory reachable twice (possible when a cross-directory rename
    /// is durable on one side only) is written once; the second name is left out.
    dirs: HashSet<NodeId>,
}

impl ImageWriter<'_> {
    fn write_dir(&mut self, id: NodeId, out: &Path) -> io::Result<()> {
        let entries = self.entries_after_cut(id);
        for (name, child) in entries {
            let Some(node) = self.tree.node(child) else {
                continue;
            };
            let path = out.join(&name);
            match &node.kind {
                NodeKind::Dir { .. } => {
                    if !self.dirs.insert(child) {
                        continue;
                    }
                    fs::create_dir(&path)?;
                    self.write_dir(child, &path)?;
                    self.copy_mode(child, &path, 0o755)?;
                }
                NodeKind::File { durable, pending } => {
                    if let Some(first) = self.files.get(&child) {
                        fs::hard_link(first, &path)?;
                        continue;
                    }
                    let data = self.file_after_cut(child, durable, pending);
                    let file = File::create_new(&path)?;
                    data.write_to(&file)?;
                    drop(file);
                    self.copy_mode(child, &path, 0o644)?;
                    self.files.insert(child, path);
                }
                NodeKind::Symlink { target } => std::os::unix::fs::symlink(target, &path)?,
                NodeKind::Special { mode, rdev } => mknod(&path, *mode, *rdev)?,
            }
        }
        Ok(())
    }

    /// Permission bits are metadata the model does not track: take the live ones when the node
    /// still has a live path, else a default.
    fn copy_mode(&self, id: NodeId, path: &Path, default: u32) -> io::Result<()> {
        let mode = self
            .tree
            .path(id)
            .and_then(|live| fs::symlink_metadata(live).ok())
            .map_or(default, |meta| meta.mode() & 0o7777);
        fs::set_permissions(path, Permissions::from_mode(mode))
    }

    /// Directory `id`'s entries in the image: the durable ones, then a prefix of the log.
    fn entries_after_cut(&mut self, id: NodeId) -> BTreeMap<OsString, NodeId> {
        let Some(NodeKind::Dir { durable, log, .. }) = self.tree.node(id).map(|n| &n.kind) else {
            return BTreeMap::new();
        };
        let mut entries = durable.clone();
        let keep = match self.variation {
            Variation::LoseAll => 0,
            Variation::KeepSomeBlocks | Variation::TornWrite => {
                Rng::for_node(self.seed, id).below(log.len() as u64 + 1) as usize
            }
        };
        for op in &log[..keep] {
            op.apply(&mut entries);
        }
        self.report.dir_ops_kept += keep as u64;
        self.report.dir_ops_lost += (log.len() - keep) as u64;
        entries
    }

    /// File `id`'s contents in the image: the durable bytes, then what the variation keeps of
    /// the pending operations.
    fn file_after_cut(&mut self, id: NodeId, durable: &Bytes, pending: &[FileOp]) -> Bytes {
        let mut data = durable.clone();
        let mut rng = Rng::for_node(self.seed, id);
        match self.variation {
            Variation::LoseAll => self.report.count_lost(pending),
            Variation::KeepSomeBlocks => {
                for op in pending {
                    match op {
                        FileOp::Write { offset, bytes } => {
                            let mut kept = 0;
                            for (start, piece) in pieces(*offset, bytes) {
                                if rng.coin() {
                                    data.write(start, piece);
                                    kept += piece.len() as u64;
                                }
                            }
                            self.report.count_write(bytes.len() as u64, kept);
                        }
                        FileOp::SetLen(len) => {
                            if rng.coin() {
                                data.set_len(*len);
                                self.report.size_changes_kept += 1;
                            } else {
                                self.report.size_changes_lost += 1;
                            }
                        }
                    }
                }
            }
            Variation::TornWrite => {
                let keep = rng.below(pending.len() as u64 + 1) as usize;
                for (i, op) in pending[..keep].iter().enumerate() {
                    match op {
                        FileOp::Write { offset, bytes } if i + 1 == keep => {
                            let torn = rng.below(bytes.len() as u64) as usize;
                            data.write(*offset, &bytes[..torn]);
                            self.report.count_write(bytes.len() as u64, torn as u64);
                        }
                        FileOp::Write { bytes, .. } => {
                            op.apply(&mut data);
                            self.report
                                .count_write(bytes.len() as u64, bytes.len() as u64);
                        }
                        FileOp::SetLen(_) => {
                            op.apply(&mut data);
                            self.report.size_changes_kept += 1;
                        }
                    }
                }
                self.report.count_lost(&pending[keep..]);
            }
        }
        data
    }
}

/// Splits a write at `offset` into its pieces, each within one 4 KiB-aligned block.
fn pieces(offset: u64, bytes: &[u8]) -> Vec<(u64, &[u8])> {
    let mut out = Vec::new();
    let mut pos = offset;
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = std::cmp::min(rest.len() as u64, BLOCK - pos % BLOCK) as usize;
        out.push((pos, &rest[..n]));
        pos += n as u64;
        rest = &rest[n..];
    }
    out
}

/// Creates a FIFO, socket or device node.
fn mknod(path: &Path, mode: u32, rdev: u64) -> io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: c_path is a valid NUL-terminated string for the duration of the call.
    let rc = unsafe { libc::mknod(c_path.as_ptr(), mode as libc::mode_t, rdev as libc::dev_t) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_are_block_aligned() {
        let data = vec![1u8; 10000];
        let p = pieces(4000, &data);
        let bounds: Vec<(u64, usize)> = p.iter().map(|(o, b)| (*o, b.len())).collect();
        assert_eq!(
            bounds,
            vec![(4000, 96), (4096, 4096), (8192, 4096), (12288, 1712)]
        );
        assert!(pieces(0, &[]).is_empty());
    }

    #[test]
    fn every_variation_can_come_from_a_seed() {
        let seen: HashSet<Variation> = (0..64).map(Variation::from_seed).collect();
        assert_eq!(seen.len(), 3);
    }
}
