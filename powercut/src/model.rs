//! The model: the live namespace the mount shows and, beside it, what a power cut would keep.
//!
//! Every node (file, directory, symlink, special file) has an id, which is also its FUSE inode
//! number. The *live* side (`parent`, `name`, a directory's `children`) mirrors the backing
//! directory and lets the filesystem compute backing paths. The *durable* side is what strict
//! POSIX promises after a crash: a file's bytes as of its last fsync plus the list of operations
//! since; a directory's entries as of its last fsync plus the log of entry operations since.

use std::cmp::{max, min};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

/// A node id; also the inode number the kernel sees.
pub(crate) type NodeId = u64;

/// The root directory's id (FUSE's root inode is always 1).
pub(crate) const ROOT: NodeId = 1;

/// Block size of the sparse file store, and the granularity at which `KeepSomeBlocks` splits
/// unsynced writes (a write reaching the platter in 4 KiB pieces, in any order).
pub(crate) const BLOCK: u64 = 4096;

/// File contents held sparsely in 4 KiB blocks: a block never written reads as zeros and costs
/// nothing, so a program that truncates a file up to gigabytes does not make the model allocate
/// them. Invariant: bytes of a block at or past `len` are zero.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Bytes {
    len: u64,
    blocks: BTreeMap<u64, Box<[u8]>>,
}

impl Bytes {
    /// The file size.
    #[cfg(test)]
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// `pwrite(data, offset)`: overwrites, extending the size when it writes past the end.
    /// Cost is O(data.len()), whatever the file size.
    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) {
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let index = pos / BLOCK;
            let within = (pos % BLOCK) as usize;
            let n = min(rest.len(), BLOCK as usize - within);
            let block = self
                .blocks
                .entry(index)
                .or_insert_with(|| vec![0; BLOCK as usize].into_boxed_slice());
            block[within..within + n].copy_from_slice(&rest[..n]);
            pos = pos.saturating_add(n as u64);
            rest = &rest[n..];
        }
        if !data.is_empty() {
            self.len = max(self.len, pos);
        }
    }

    /// `ftruncate(len)`: shrinking drops the bytes past `len`; growing adds zeros.
    pub(crate) fn set_len(&mut self, len: u64) {
        if len < self.len {
            // Blocks starting at or after the new end go; the block holding it is zero-filled
            // past the end, keeping the invariant.
            drop(self.blocks.split_off(&len.div_ceil(BLOCK)));
            let within = (len % BLOCK) as usize;
            if within != 0 {
                if let Some(block) = self.blocks.get_mut(&(len / BLOCK)) {
                    block[within..].fill(0);
                }
            }
        }
        self.len = len;
    }

    /// All bytes, materialised (for tests and small files).
    #[cfg(test)]
    pub(crate) fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0; self.len as usize];
        for (index, block) in &self.blocks {
            let start = (index * BLOCK) as usize;
            let end = min(start + block.len(), out.len());
            if start < end {
                out[start..end].copy_from_slice(&block[..end - start]);
            }
        }
        out
    }

    /// Reads a whole file, keeping all-zero blocks as holes.
    pub(crate) fn read_from(path: &Path) -> io::Result<Bytes> {
        let mut file = File::open(path)?;
        let mut bytes = Bytes::default();
        let mut buf = vec![0u8; BLOCK as usize];
        let mut offset = 0u64;
        loop {
            let mut filled = 0;
            while filled < buf.len() {
                match file.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if filled == 0 {
                break;
            }
            if buf[..filled].iter().any(|&b| b != 0) {
                bytes.write(offset, &buf[..filled]);
            }
            offset += filled as u64;
            if filled < buf.len() {
                break;
            }
        }
        bytes.set_len(offset);
        Ok(bytes)
    }

    /// Writes these bytes into `file` (fresh and empty), leaving holes where no block is stored.
    pub(crate) fn write_to(&self, file: &File) -> io::Result<()> {
        file.set_len(self.len)?;
        for (index, block) in &self.blocks {
            let start = index * BLOCK;
            if start >= self.len {
                break;
            }
            let n = min(BLOCK, self.len - start) as usize;
            file.write_all_at(&block[..n], start)?;
        }
        Ok(())
    }
}

/// One operation on a file's contents that is not yet durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum FileOp {
    /// A `pwrite` of `bytes` at `offset`.
    Write { offset: u64, bytes: Vec<u8> },
    /// A size change: truncate, ftruncate, `O_TRUNC`, setattr size, or fallocate extending.
    SetLen(u64),
}

impl FileOp {
    /// Applies this operation to `data`.
    pub(crate) fn apply(&self, data: &mut Bytes) {
        match self {
            FileOp::Write { offset, bytes } => data.write(*offset, bytes),
            FileOp::SetLen(len) => data.set_len(*len),
        }
    }
}

/// One operation on a directory's entries that is not yet durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum DirOp {
    /// An entry appeared: create, mkdir, mknod, symlink, or the target side of a rename from
    /// another directory (replacing any entry of that name).
    Link { name: OsString, node: NodeId },
    /// An entry went: unlink, rmdir, or the source side of a rename to another directory.
    Unlink { name: OsString },
    /// A rename within this directory: one operation, so a journal keeps it whole or not at all.
    Rename {
        from: OsString,
        to: OsString,
        node: NodeId,
    },
}

impl DirOp {
    /// Applies this operation to a directory's entries.
    pub(crate) fn apply(&self, entries: &mut BTreeMap<OsString, NodeId>) {
        match self {
            DirOp::Link { name, node } => {
                entries.insert(name.clone(), *node);
            }
            DirOp::Unlink { name } => {
                entries.remove(name);
            }
            DirOp::Rename { from, to, node } => {
                entries.remove(from);
                entries.insert(to.clone(), *node);
            }
        }
    }

    /// The node this operation makes an entry point to, if any.
    fn target(&self) -> Option<NodeId> {
        match self {
            DirOp::Link { node, .. } | DirOp::Rename { node, .. } => Some(*node),
            DirOp::Unlink { .. } => None,
        }
    }
}

/// What a node is, with its live and durable state.
#[derive(Debug)]
pub(crate) enum NodeKind {
    /// A regular file: its durable bytes and the operations since its last fsync.
    File {
        durable: Bytes,
        pending: Vec<FileOp>,
    },
    /// A directory: its live entries, its durable entries, and the log of entry operations
    /// since its last fsync (durable + log replayed = live).
    Dir {
        children: BTreeMap<OsString, NodeId>,
        durable: BTreeMap<OsString, NodeId>,
        log: Vec<DirOp>,
    },
    /// A symbolic link (its target never changes).
    Symlink { target: PathBuf },
    /// A FIFO, socket or device node: `mode` holds its `S_IFMT` type and permission bits.
    Special { mode: u32, rdev: u64 },
}

/// One node of the tree.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) kind: NodeKind,
    /// The live parent directory; `None` for the root and for nodes no longer linked anywhere
    /// (which may still be open, or still reachable through durable entries).
    pub(crate) parent: Option<NodeId>,
    /// The live name in `parent`.
    pub(crate) name: OsString,
    /// Lookups the kernel holds on this node (entry replies minus forgets).
    pub(crate) lookups: u64,
    /// Open file handles on this node.
    pub(crate) open: u64,
}

impl Node {
    fn new(kind: NodeKind, parent: Option<NodeId>, name: OsString) -> Node {
        Node {
            kind,
            parent,
            name,
            lookups: 0,
            open: 0,
        }
    }

    fn empty_dir() -> NodeKind {
        NodeKind::Dir {
            children: BTreeMap::new(),
            durable: BTreeMap::new(),
            log: Vec::new(),
        }
    }
}

/// All nodes, live and durable.
#[derive(Debug)]
pub(crate) struct Tree {
    backing: PathBuf,
    nodes: HashMap<NodeId, Node>,
    next_id: NodeId,
    /// Nodes with no live parent; the only candidates for garbage collection.
    orphans: HashSet<NodeId>,
}

impl Tree {
    /// Builds the tree from the backing directory. Everything in it is durable: that is how a
    /// cut image is mounted again after the "reboot".
    pub(crate) fn scan(backing: &Path) -> io::Result<Tree> {
        let mut tree = Tree {
            backing: backing.to_path_buf(),
            nodes: HashMap::new(),
            next_id: ROOT + 1,
            orphans: HashSet::new(),
        };
        tree.nodes
            .insert(ROOT, Node::new(Node::empty_dir(), None, OsString::new()));
        tree.scan_dir(ROOT, backing)?;
        Ok(tree)
    }

    fn scan_dir(&mut self, dir: NodeId, path: &Path) -> io::Result<()> {
        let mut entries = Vec::new();
        for entry in fs::read_dir(path)? {
            let entry = entry?;
            entries.push((entry.file_name(), entry.file_type()?));
        }
        // Sorted, so ids (and with them every seeded choice of a cut) do not depend on the
        // order the backing filesystem lists entries in.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, file_type) in entries {
            let child_path = path.join(&name);
            let kind = if file_type.is_dir() {
                Node::empty_dir()
            } else if file_type.is_file() {
                NodeKind::File {
                    durable: Bytes::read_from(&child_path)?,
                    pending: Vec::new(),
                }
            } else if file_type.is_symlink() {
                NodeKind::Symlink {
                    target: fs::read_link(&child_path)?,
                }
            } else {
                let meta = fs::symlink_metadata(&child_path)?;
                NodeKind::Special {
                    mode: meta.mode(),
                    rdev: meta.rdev(),
                }
            };
            let is_dir = matches!(kind, NodeKind::Dir { .. });
            let id = self.alloc(Node::new(kind, Some(dir), name.clone()));
            if let Some(NodeKind::Dir {
                children, durable, ..
            }) = self.nodes.get_mut(&dir).map(|n| &mut n.kind)
            {
                children.insert(name.clone(), id);
                durable.insert(name, id);
            }
            if is_dir {
                self.scan_dir(id, &child_path)?;
            }
        }
        Ok(())
    }

    fn alloc(&mut self, node: Node) -> NodeId {
        let id = self.next_id;
        self.next_id += 1;
        self.nodes.insert(id, node);
        id
    }

    /// The backing directory.
    pub(crate) fn backing(&self) -> &Path {
        &self.backing
    }

    /// A node.
    pub(crate) fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(&id)
    }

    /// A node, mutably.
    pub(crate) fn node_mut(&mut self, id: NodeId) -> Option<&mut Node> {
        self.nodes.get_mut(&id)
    }

    /// Ids of all nodes, sorted (a deterministic order for cuts).
    pub(crate) fn ids(&self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The node's live path in the backing directory; `None` once it is unlinked.
    pub(crate) fn path(&self, id: NodeId) -> Option<PathBuf> {
        let mut names: Vec<&OsStr> = Vec::new();
        let mut current = id;
        while current != ROOT {
            // Bounded: a corrupt parent chain must not loop forever.
            if names.len() > self.nodes.len() {
                return None;
            }
            let node = self.nodes.get(&current)?;
            names.push(&node.name);
            current = node.parent?;
        }
        let mut path = self.backing.clone();
        path.extend(names.iter().rev());
        Some(path)
    }

    /// The live entries of directory `id`; `None` if it is not a directory.
    pub(crate) fn children(&self, id: NodeId) -> Option<&BTreeMap<OsString, NodeId>> {
        match &self.nodes.get(&id)?.kind {
            NodeKind::Dir { children, .. } => Some(children),
            _ => None,
        }
    }

    /// Whether `id` is a directory.
    pub(crate) fn is_dir(&self, id: NodeId) -> bool {
        self.children(id).is_some()
    }

    /// The live child `name` of directory `parent`.
    pub(crate) fn child(&self, parent: NodeId, name: &OsStr) -> Option<NodeId> {
        self.children(parent)?.get(name).copied()
    }

    fn dir_mut(
        &mut self,
        id: NodeId,
    ) -> Option<(&mut BTreeMap<OsString, NodeId>, &mut Vec<DirOp>)> {
        match &mut self.nodes.get_mut(&id)?.kind {
            NodeKind::Dir { children, log, .. } => Some((children, log)),
            _ => None,
        }
    }

    /// Links a new node as `parent/name` (the backing entry already exists). Not durable until
    /// `parent` is fsynced.
    pub(crate) fn insert(&mut self, parent: NodeId, name: &OsStr, kind: NodeKind) -> NodeId {
        let id = self.alloc(Node::new(kind, Some(parent), name.to_os_string()));
        let replaced = self.dir_mut(parent).and_then(|(children, log)| {
            log.push(DirOp::Link {
                name: name.to_os_string(),
                node: id,
            });
            children.insert(name.to_os_string(), id)
        });
        if let Some(old) = replaced {
            self.orphan(old);
        }
        id
    }

    /// A new, empty directory node kind.
    pub(crate) fn new_dir() -> NodeKind {
        Node::empty_dir()
    }

    /// Removes the live entry `parent/name` (unlink, rmdir). The node stays while open or
    /// reachable through durable entries.
    pub(crate) fn remove(&mut self, parent: NodeId, name: &OsStr) -> Option<NodeId> {
        let (children, log) = self.dir_mut(parent)?;
        let id = children.remove(name)?;
        log.push(DirOp::Unlink {
            name: name.to_os_string(),
        });
        self.orphan(id);
        Some(id)
    }

    /// Moves the live entry `from_parent/from` to `to_parent/to`, replacing what was there.
    pub(crate) fn rename(
        &mut self,
        from_parent: NodeId,
        from: &OsStr,
        to_parent: NodeId,
        to: &OsStr,
    ) -> Option<()> {
        let (children, log) = self.dir_mut(from_parent)?;
        let id = children.remove(from)?;
        if from_parent == to_parent {
            log.push(DirOp::Rename {
                from: from.to_os_string(),
                to: to.to_os_string(),
                node: id,
            });
        } else {
            log.push(DirOp::Unlink {
                name: from.to_os_string(),
            });
        }
        let replaced = match self.dir_mut(to_parent) {
            Some((children, log)) => {
                if from_parent != to_parent {
                    log.push(DirOp::Link {
                        name: to.to_os_string(),
                        node: id,
                    });
                }
                children.insert(to.to_os_string(), id)
            }
            None => None,
        };
        if let Some(old) = replaced {
            self.orphan(old);
        }
        let node = self.nodes.get_mut(&id)?;
        node.parent = Some(to_parent);
        node.name = to.to_os_string();
        Some(())
    }

    fn orphan(&mut self, id: NodeId) {
        if let Some(node) = self.nodes.get_mut(&id) {
            node.parent = None;
            self.orphans.insert(id);
        }
    }

    /// Records an unsynced operation on file `id`'s contents.
    pub(crate) fn record(&mut self, id: NodeId, op: FileOp) {
        if let Some(NodeKind::File { pending, .. }) = self.nodes.get_mut(&id).map(|n| &mut n.kind) {
            pending.push(op);
        }
    }

    /// fsync / fdatasync of file `id`: its pending operations become durable, in order.
    /// O(bytes written since the last fsync), never O(file size).
    pub(crate) fn sync_file(&mut self, id: NodeId) {
        if let Some(NodeKind::File { durable, pending }) =
            self.nodes.get_mut(&id).map(|n| &mut n.kind)
        {
            for op in pending.drain(..) {
                op.apply(durable);
            }
        }
    }

    /// fsync of directory `id`: its live entries become its durable entries.
    pub(crate) fn sync_dir(&mut self, id: NodeId) {
        if let Some(NodeKind::Dir {
            children,
            durable,
            log,
        }) = self.nodes.get_mut(&id).map(|n| &mut n.kind)
        {
            durable.clone_from(children);
            log.clear();
        }
        self.collect_garbage();
    }

    /// Drops nodes nothing can reach any more: not live, not open, not known to the kernel, and
    /// not reachable from the root through durable entries or logged directory operations (a
    /// cut could bring those back). Only a directory fsync makes nodes durably unreachable, so
    /// it runs there.
    fn collect_garbage(&mut self) {
        if self.orphans.is_empty() {
            return;
        }
        let mut stack = vec![ROOT];
        for &id in &self.orphans {
            if let Some(node) = self.nodes.get(&id) {
                if node.lookups > 0 || node.open > 0 {
                    stack.push(id);
                }
            }
        }
        let mut marked = HashSet::new();
        while let Some(id) = stack.pop() {
            if !marked.insert(id) {
                continue;
            }
            if let Some(NodeKind::Dir {
                children,
                durable,
                log,
            }) = self.nodes.get(&id).map(|n| &n.kind)
            {
                stack.extend(children.values());
                stack.extend(durable.values());
                stack.extend(log.iter().filter_map(DirOp::target));
            }
        }
        self.nodes.retain(|id, _| marked.contains(id));
        self.orphans.retain(|id| marked.contains(id));
    }

    /// The number of nodes held (for tests of the garbage collection).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_write_truncate_extend() {
        let mut b = Bytes::default();
        b.write(4090, b"0123456789");
        assert_eq!(b.len(), 4100);
        assert_eq!(&b.to_vec()[4090..], b"0123456789");
        b.set_len(4093);
        b.set_len(5000);
        let v = b.to_vec();
        assert_eq!(&v[4090..4093], b"012");
        assert!(
            v[4093..].iter().all(|&x| x == 0),
            "truncate must zero the tail"
        );
        b.set_len(0);
        assert_eq!(b.to_vec(), Vec::<u8>::new());
        b.set_len(1 << 40);
        assert_eq!(b.len(), 1 << 40, "a huge size costs no memory");
        b.write(10, b"");
        assert_eq!(b.len(), 1 << 40);
    }

    #[test]
    fn sync_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"hello").unwrap();
        let mut t = Tree::scan(dir.path()).unwrap();
        let a = t.child(ROOT, OsStr::new("a")).unwrap();
        t.record(
            a,
            FileOp::Write {
                offset: 5,
                bytes: b" world".to_vec(),
            },
        );
        t.sync_file(a);
        match &t.node(a).unwrap().kind {
            NodeKind::File { durable, pending } => {
                assert_eq!(durable.to_vec(), b"hello world");
                assert!(pending.is_empty());
            }
            other => panic!("not a file: {other:?}"),
        }
        let b = t.insert(
            ROOT,
            OsStr::new("b"),
            NodeKind::File {
                durable: Bytes::default(),
                pending: vec![],
            },
        );
        t.remove(ROOT, OsStr::new("b"));
        assert!(t.node(b).is_some());
        t.sync_dir(ROOT);
        assert!(t.node(b).is_none(), "an unreachable node is collected");
        t.remove(ROOT, OsStr::new("a"));
        assert!(t.path(a).is_none());
        assert_eq!(
            t.len(),
            2,
            "a stays: the durable root entry still reaches it"
        );
    }
}
