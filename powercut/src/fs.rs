//! The FUSE filesystem: passes every operation through to the backing directory and records in
//! the model what the operation did to durability.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions, Permissions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::model::{Bytes, FileOp, NodeId, NodeKind, Tree};

/// Entry and attribute time-to-live: zero, so the kernel asks again every time and its caches
/// never hide (or outlive) our state.
const TTL: Duration = Duration::ZERO;

/// Flags for every opened file. `FOPEN_NOFLUSH`: `close(2)` sends no FUSE_FLUSH (it would make
/// nothing durable anyway). That matters when the serving process itself has files open on the
/// mount as it dies: the kernel waits for a FLUSH answer without interruption, and the dead
/// server would never give one, leaving the process stuck in its exit forever.
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

/// Everything the filesystem and the [`crate::PowerCut`] handle share, under one lock: an
/// operation (backing syscall plus model update) and a cut never interleave.
pub(crate) struct State {
    pub(crate) tree: Tree,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    /// Set by a cut: from then on every operation fails with EIO, so the program under test
    /// can make nothing more durable.
    pub(crate) frozen: bool,
}

/// The lock shared by the filesystem thread and the handle.
pub(crate) type Shared = Arc<Mutex<State>>;

impl State {
    /// A state over a freshly scanned tree.
    pub(crate) fn new(tree: Tree) -> State {
        State {
            tree,
            handles: HashMap::new(),
            next_fh: 1,
            frozen: false,
        }
    }
}

/// An open file or directory.
enum Handle {
    /// A real fd on the backing file; an unlinked file stays usable through it.
    File { node: NodeId, file: File },
    /// A directory listing, snapshotted at opendir so offsets stay stable.
    Dir {
        entries: Vec<(NodeId, FileType, OsString)>,
    },
}

/// Where a metadata operation goes: an fd (preferred; the only way to an unlinked file) or the
/// backing path.
enum Target {
    Fd(File),
    Path(PathBuf),
}

/// The `fuser` filesystem.
pub(crate) struct PowerFs {
    state: Shared,
    /// Our own uid and gid: nodes created for another caller are handed to that caller.
    uid: u32,
    gid: u32,
}

impl PowerFs {
    pub(crate) fn new(state: Shared) -> PowerFs {
        // SAFETY: geteuid and getegid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        PowerFs { state, uid, gid }
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, Errno> {
        self.state.lock().map_err(|_| Errno::EIO)
    }

    /// Runs `f` on the state unless frozen (then EIO).
    fn with<T>(&self, f: impl FnOnce(&mut State) -> Result<T, Errno>) -> Result<T, Errno> {
        let mut state = self.lock()?;
        if state.frozen {
            return Err(Errno::EIO);
        }
        f(&mut state)
    }

    /// Gives a node just created (by us, as root) to the calling user, as a kernel filesystem
    /// would have created it.
    fn give_to_caller(&self, req: &Request, path: &Path) -> io::Result<()> {
        if (req.uid(), req.gid()) == (self.uid, self.gid) {
            return Ok(());
        }
        std::os::unix::fs::lchown(path, Some(req.uid()), Some(req.gid()))
    }
}

fn io_errno(error: io::Error) -> Errno {
    Errno::from(error)
}

fn c_path(path: &Path) -> Result<CString, Errno> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)
}

fn last_errno() -> Errno {
    Errno::from(io::Error::last_os_error())
}

fn system_time(secs: i64, nsecs: i64) -> SystemTime {
    let nanos = Duration::from_nanos(nsecs.clamp(0, 999_999_999) as u64);
    let time = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs as u64))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    time.and_then(|t| t.checked_add(nanos))
        .unwrap_or(UNIX_EPOCH)
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// FUSE attributes of node `id` from the backing file's metadata. The inode number is ours.
fn attr(id: NodeId, meta: &fs::Metadata) -> FileAttr {
    FileAttr {
        ino: INodeNo(id),
        size: meta.size(),
        blocks: meta.blocks(),
        atime: system_time(meta.atime(), meta.atime_nsec()),
        mtime: system_time(meta.mtime(), meta.mtime_nsec()),
        ctime: system_time(meta.ctime(), meta.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind: file_type(meta.mode()),
        perm: (meta.mode() & 0o7777) as u16,
        nlink: meta.nlink() as u32,
        uid: meta.uid(),
        gid: meta.gid(),
        rdev: meta.rdev() as u32,
        blksize: meta.blksize() as u32,
        flags: 0,
    }
}

fn timespec(time: Option<TimeOrNow>) -> libc::timespec {
    let (tv_sec, tv_nsec) = match time {
        None => (0, libc::UTIME_OMIT),
        Some(TimeOrNow::Now) => (0, libc::UTIME_NOW),
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as i64, i64::from(d.subsec_nanos())),
            Err(before) => {
                let d = before.duration();
                let (secs, nanos) = (d.as_secs() as i64, i64::from(d.subsec_nanos()));
                if nanos == 0 {
                    (-secs, 0)
                } else {
                    (-secs - 1, 1_000_000_000 - nanos)
                }
            }
        },
    };
    libc::timespec { tv_sec, tv_nsec }
}

impl State {
    fn add_handle(&mut self, handle: Handle) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, handle);
        fh
    }

    /// The backing file behind file handle `fh`, which must be open on node `id`.
    fn file(&self, id: NodeId, fh: FileHandle) -> Result<&File, Errno> {
        match self.handles.get(&fh.0) {
            Some(Handle::File { node, file }) if *node == id => Ok(file),
            _ => Err(Errno::EBADF),
        }
    }

    /// A duplicate of any fd open on node `id`.
    fn any_fd(&self, id: NodeId) -> Option<File> {
        self.handles.values().find_map(|h| match h {
            Handle::File { node, file } if *node == id => file.try_clone().ok(),
            _ => None,
        })
    }

    fn target(&self, id: NodeId, fh: Option<FileHandle>) -> Result<Target, Errno> {
        if let Some(file) = fh.and_then(|fh| self.file(id, fh).ok()) {
            return file.try_clone().map(Target::Fd).map_err(io_errno);
        }
        if let Some(path) = self.tree.path(id) {
            return Ok(Target::Path(path));
        }
        self.any_fd(id).map(Target::Fd).ok_or(Errno::ENOENT)
    }

    fn stat(&self, id: NodeId, fh: Option<FileHandle>) -> Result<FileAttr, Errno> {
        let meta = match self.target(id, fh)? {
            Target::Fd(file) => file.metadata(),
            Target::Path(path) => fs::symlink_metadata(path),
        };
        meta.map(|m| attr(id, &m)).map_err(io_errno)
    }

    /// The backing path for a new entry `name` in directory `parent`.
    fn new_entry_path(&self, parent: NodeId, name: &OsStr) -> Result<PathBuf, Errno> {
        if self.tree.node(parent).is_none() {
            return Err(Errno::ENOENT);
        }
        if !self.tree.is_dir(parent) {
            return Err(Errno::ENOTDIR);
        }
        if self.tree.child(parent, name).is_some() {
            return Err(Errno::EEXIST);
        }
        self.tree
            .path(parent)
            .map(|p| p.join(name))
            .ok_or(Errno::ENOENT)
    }

    /// Links a just-created backing node into the model and counts the kernel's lookup on it.
    fn link_new(
        &mut self,
        parent: NodeId,
        name: &OsStr,
        kind: NodeKind,
        path: &Path,
    ) -> Result<(NodeId, FileAttr), Errno> {
        let meta = fs::symlink_metadata(path).map_err(io_errno)?;
        let id = self.tree.insert(parent, name, kind);
        if let Some(node) = self.tree.node_mut(id) {
            node.lookups += 1;
        }
        Ok((id, attr(id, &meta)))
    }

    fn kind_of(&self, id: NodeId) -> FileType {
        match self.tree.node(id).map(|n| &n.kind) {
            Some(NodeKind::Dir { .. }) => FileType::Directory,
            Some(NodeKind::Symlink { .. }) => FileType::Symlink,
            Some(NodeKind::Special { mode, .. }) => file_type(*mode),
            _ => FileType::RegularFile,
        }
    }

    fn is_file(&self, id: NodeId) -> Result<(), Errno> {
        match self.tree.node(id).map(|n| &n.kind) {
            Some(NodeKind::File { .. }) => Ok(()),
            Some(NodeKind::Dir { .. }) => Err(Errno::EISDIR),
            Some(_) => Err(Errno::EINVAL),
            None => Err(Errno::ENOENT),
        }
    }

    fn open(&mut self, id: NodeId, flags: i32) -> Result<u64, Errno> {
        self.is_file(id)?;
        let mut options = OpenOptions::new();
        options.read(true);
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            // Write-only opens get a read-write fd: the kernel may read through any handle.
            options.write(true);
        }
        // O_APPEND is deliberately not passed on: the kernel computes each write's offset, and a
        // backing fd with O_APPEND would ignore it. O_SYNC/O_DIRECT mean nothing for the
        // backing copy; durability is the model's business.
        let file = match self.tree.path(id) {
            Some(path) => options.open(path),
            // Unlinked but open (reopened through /proc/self/fd): reopen our own fd.
            None => {
                let fd = self.any_fd(id).ok_or(Errno::ENOENT)?;
                options.open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            }
        }
        .map_err(io_errno)?;
        if flags & libc::O_TRUNC != 0 {
            file.set_len(0).map_err(io_errno)?;
            self.tree.record(id, FileOp::SetLen(0));
        }
        if let Some(node) = self.tree.node_mut(id) {
            node.open += 1;
        }
        Ok(self.add_handle(Handle::File { node: id, file }))
    }

    fn write(
        &mut self,
        id: NodeId,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        flags: i32,
    ) -> Result<u32, Errno> {
        let file = self.file(id, fh)?;
        let mut done = 0;
        while done < data.len() {
            match file.write_at(&data[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if done == 0 => return Err(io_errno(e)),
                Err(_) => break,
            }
        }
        self.tree.record(
            id,
            FileOp::Write {
                offset,
                bytes: data[..done].to_vec(),
            },
        );
        if flags & libc::O_DSYNC != 0 {
            // O_SYNC / O_DSYNC (O_SYNC includes the O_DSYNC bit): durable on return. The kernel
            // also follows such writes with an FSYNC; this does not depend on it.
            self.tree.sync_file(id);
        }
        u32::try_from(done).map_err(|_| Errno::EIO)
    }

    fn read(&self, id: NodeId, fh: FileHandle, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let file = self.file(id, fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_errno(e)),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &mut self,
        id: NodeId,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> Result<FileAttr, Errno> {
        let target = self.target(id, fh)?;
        if let Some(size) = size {
            self.is_file(id)?;
            match &target {
                Target::Fd(file) => file.set_len(size),
                Target::Path(path) => OpenOptions::new()
                    .write(true)
                    .open(path)
                    .and_then(|f| f.set_len(size)),
            }
            .map_err(io_errno)?;
            self.tree.record(id, FileOp::SetLen(size));
        }
        let is_symlink = matches!(
            self.tree.node(id).map(|n| &n.kind),
            Some(NodeKind::Symlink { .. })
        );
        if let Some(mode) = mode.filter(|_| !is_symlink) {
            let permissions = Permissions::from_mode(mode & 0o7777);
            match &target {
                Target::Fd(file) => file.set_permissions(permissions),
                Target::Path(path) => fs::set_permissions(path, permissions),
            }
            .map_err(io_errno)?;
        }
        if uid.is_some() || gid.is_some() {
            match &target {
                Target::Fd(file) => std::os::unix::fs::fchown(file, uid, gid),
                Target::Path(path) => std::os::unix::fs::lchown(path, uid, gid),
            }
            .map_err(io_errno)?;
        }
        if atime.is_some() || mtime.is_some() {
            let times = [timespec(atime), timespec(mtime)];
            let rc = match &target {
                // SAFETY: the fd is open and `times` is two valid timespecs.
                Target::Fd(file) => unsafe { libc::futimens(file.as_raw_fd(), times.as_ptr()) },
                Target::Path(path) => {
                    let c = c_path(path)?;
                    // SAFETY: `c` is NUL-terminated and `times` is two valid timespecs.
                    unsafe {
                        libc::utimensat(
                            libc::AT_FDCWD,
                            c.as_ptr(),
                            times.as_ptr(),
                            libc::AT_SYMLINK_NOFOLLOW,
                        )
                    }
                }
            };
            if rc != 0 {
                return Err(last_errno());
            }
        }
        let meta = match target {
            Target::Fd(file) => file.metadata(),
            Target::Path(path) => fs::symlink_metadata(path),
        };
        meta.map(|m| attr(id, &m)).map_err(io_errno)
    }

    fn remove(&mut self, parent: NodeId, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let id = self.tree.child(parent, name).ok_or(Errno::ENOENT)?;
        let path = self.tree.path(id).ok_or(Errno::ENOENT)?;
        match (dir, self.tree.is_dir(id)) {
            (true, false) => return Err(Errno::ENOTDIR),
            (false, true) => return Err(Errno::EISDIR),
            (true, true) => fs::remove_dir(path),
            (false, false) => fs::remove_file(path),
        }
        .map_err(io_errno)?;
        self.tree.remove(parent, name);
        Ok(())
    }

    fn rename(
        &mut self,
        parent: NodeId,
        name: &OsStr,
        new_parent: NodeId,
        new_name: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return Err(Errno::EINVAL);
        }
        let id = self.tree.child(parent, name).ok_or(Errno::ENOENT)?;
        if !self.tree.is_dir(new_parent) {
            return Err(Errno::ENOTDIR);
        }
        let existing = self.tree.child(new_parent, new_name);
        if existing.is_some() && flags.contains(RenameFlags::RENAME_NOREPLACE) {
            return Err(Errno::EEXIST);
        }
        if existing == Some(id) {
            return Ok(()); // Same file: rename does nothing.
        }
        let from = self.tree.path(id).ok_or(Errno::ENOENT)?;
        let to = self
            .tree
            .path(new_parent)
            .ok_or(Errno::ENOENT)?
            .join(new_name);
        fs::rename(from, to).map_err(io_errno)?;
        self.tree
            .rename(parent, name, new_parent, new_name)
            .ok_or(Errno::EIO)
    }

    fn opendir(&mut self, id: NodeId) -> Result<u64, Errno> {
        let node = self.tree.node(id).ok_or(Errno::ENOENT)?;
        let parent = node.parent.unwrap_or(id);
        let children = self.tree.children(id).ok_or(Errno::ENOTDIR)?;
        let mut entries = vec![
            (id, FileType::Directory, OsString::from(".")),
            (parent, FileType::Directory, OsString::from("..")),
        ];
        entries.extend(
            children
                .iter()
                .map(|(name, &child)| (child, self.kind_of(child), name.clone())),
        );
        Ok(self.add_handle(Handle::Dir { entries }))
    }

    fn fallocate(
        &mut self,
        id: NodeId,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<(), Errno> {
        // Plain preallocation only. Punching holes, zeroing, collapsing or inserting ranges
        // would change contents in ways the model does not record.
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let file = self.file(id, fh)?;
        let before = file.metadata().map_err(io_errno)?.len();
        let offset = libc::off_t::try_from(offset).map_err(|_| Errno::EFBIG)?;
        let length = libc::off_t::try_from(length).map_err(|_| Errno::EFBIG)?;
        // SAFETY: the fd is open for the duration of the call.
        if unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, length) } != 0 {
            return Err(last_errno());
        }
        let after = file.metadata().map_err(io_errno)?.len();
        if after != before {
            self.tree.record(id, FileOp::SetLen(after));
        }
        Ok(())
    }
}

impl Filesystem for PowerFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let result = self.with(|st| {
            if !st.tree.is_dir(parent.0) {
                return Err(Errno::ENOTDIR);
            }
            let id = st.tree.child(parent.0, name).ok_or(Errno::ENOENT)?;
            let attr = st.stat(id, None)?;
            if let Some(node) = st.tree.node_mut(id) {
                node.lookups += 1;
            }
            Ok(attr)
        });
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        // Counted even when frozen: forgetting makes nothing durable.
        if let Ok(mut st) = self.lock() {
            if let Some(node) = st.tree.node_mut(ino.0) {
                node.lookups = node.lookups.saturating_sub(nlookup);
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.with(|st| st.stat(ino.0, fh)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.with(|st| st.setattr(ino.0, mode, uid, gid, size, atime, mtime, fh)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let result = self.with(|st| match st.tree.node(ino.0).map(|n| &n.kind) {
            Some(NodeKind::Symlink { target }) => Ok(target.as_os_str().as_bytes().to_vec()),
            Some(_) => Err(Errno::EINVAL),
            None => Err(Errno::ENOENT),
        });
        match result {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let result = self.with(|st| {
            let path = st.new_entry_path(parent.0, name)?;
            let c = c_path(&path)?;
            // SAFETY: `c` is NUL-terminated.
            if unsafe { libc::mknod(c.as_ptr(), mode as libc::mode_t, libc::dev_t::from(rdev)) }
                != 0
            {
                return Err(last_errno());
            }
            let done = fs::set_permissions(&path, Permissions::from_mode(mode & 0o7777))
                .and_then(|()| self.give_to_caller(req, &path))
                .and_then(|()| fs::symlink_metadata(&path));
            let meta = match done {
                Ok(meta) => meta,
                Err(e) => {
                    let _ = fs::remove_file(&path);
                    return Err(io_errno(e));
                }
            };
            let kind = if mode & libc::S_IFMT == libc::S_IFREG {
                NodeKind::File {
                    durable: Bytes::default(),
                    pending: Vec::new(),
                }
            } else {
                NodeKind::Special {
                    mode: meta.mode(),
                    rdev: meta.rdev(),
                }
            };
            st.link_new(parent.0, name, kind, &path)
        });
        answer_entry(reply, result);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let result = self.with(|st| {
            let path = st.new_entry_path(parent.0, name)?;
            fs::DirBuilder::new()
                .mode(mode & 0o7777)
                .create(&path)
                .map_err(io_errno)?;
            let done = fs::set_permissions(&path, Permissions::from_mode(mode & 0o7777))
                .and_then(|()| self.give_to_caller(req, &path));
            if let Err(e) = done {
                let _ = fs::remove_dir(&path);
                return Err(io_errno(e));
            }
            st.link_new(parent.0, name, Tree::new_dir(), &path)
        });
        answer_entry(reply, result);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer(reply, self.with(|st| st.remove(parent.0, name, false)));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer(reply, self.with(|st| st.remove(parent.0, name, true)));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let result = self.with(|st| {
            let path = st.new_entry_path(parent.0, link_name)?;
            std::os::unix::fs::symlink(target, &path).map_err(io_errno)?;
            if let Err(e) = self.give_to_caller(req, &path) {
                let _ = fs::remove_file(&path);
                return Err(io_errno(e));
            }
            let kind = NodeKind::Symlink {
                target: target.to_path_buf(),
            };
            st.link_new(parent.0, link_name, kind, &path)
        });
        answer_entry(reply, result);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        answer(
            reply,
            self.with(|st| st.rename(parent.0, name, newparent.0, newname, flags)),
        );
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        // Hard links would give a node several live names; the model keeps one. Nothing the
        // project runs makes hard links.
        reply.error(Errno::EOPNOTSUPP);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.with(|st| st.open(ino.0, flags.0)) {
            Ok(fh) => reply.opened(FileHandle(fh), OPEN_FLAGS),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.with(|st| st.read(ino.0, fh, offset, size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.with(|st| st.write(ino.0, fh, offset, data, flags.0)) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Not sent while FOPEN_NOFLUSH is honoured (Linux 5.16+). close() makes nothing durable.
        match self.with(|_| Ok(())) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // The fd is closed even when frozen: closing makes nothing durable.
        let frozen = match self.lock() {
            Ok(mut st) => {
                if let Some(Handle::File { node, .. }) = st.handles.remove(&fh.0) {
                    if let Some(node) = st.tree.node_mut(node) {
                        node.open = node.open.saturating_sub(1);
                    }
                }
                st.frozen
            }
            Err(_) => true,
        };
        answer(reply, if frozen { Err(Errno::EIO) } else { Ok(()) });
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // fsync and fdatasync alike make the file's data and size durable (not its name: that
        // takes an fsync of the directory).
        let result = self.with(|st| {
            st.is_file(ino.0)?;
            st.tree.sync_file(ino.0);
            Ok(())
        });
        answer(reply, result);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.with(|st| st.opendir(ino.0)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let result = self.with(|st| match st.handles.get(&fh.0) {
            Some(Handle::Dir { entries }) => {
                for (i, (id, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(*id), i as u64 + 1, *kind, name) {
                        break;
                    }
                }
                Ok(())
            }
            _ => Err(Errno::EBADF),
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let frozen = match self.lock() {
            Ok(mut st) => {
                st.handles.remove(&fh.0);
                st.frozen
            }
            Err(_) => true,
        };
        answer(reply, if frozen { Err(Errno::EIO) } else { Ok(()) });
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let result = self.with(|st| {
            if !st.tree.is_dir(ino.0) {
                return Err(Errno::ENOTDIR);
            }
            st.tree.sync_dir(ino.0);
            Ok(())
        });
        answer(reply, result);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let result = self.with(|st| {
            let c = c_path(st.tree.backing())?;
            // SAFETY: statvfs is plain data; the kernel fills it.
            let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
            // SAFETY: `c` is NUL-terminated and `s` is a valid statvfs to fill.
            if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
                return Err(last_errno());
            }
            Ok(s)
        });
        match result {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let result = self.with(|st| {
            let Some(path) = st.tree.path(ino.0) else {
                // Unlinked but open: nothing to check against but the fd we hold.
                return if st.tree.node(ino.0).is_some() {
                    Ok(())
                } else {
                    Err(Errno::ENOENT)
                };
            };
            let c = c_path(&path)?;
            // SAFETY: `c` is NUL-terminated.
            if unsafe { libc::access(c.as_ptr(), mask.bits()) } != 0 {
                return Err(last_errno());
            }
            Ok(())
        });
        answer(reply, result);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let result = self.with(|st| {
            let path = st.new_entry_path(parent.0, name)?;
            // O_EXCL always: the kernel only asks to create a name it found missing, and the
            // model must never take an existing backing file for a new one.
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(mode & 0o7777)
                .open(&path)
                .map_err(io_errno)?;
            let done = file
                .set_permissions(Permissions::from_mode(mode & 0o7777))
                .and_then(|()| self.give_to_caller(req, &path));
            if let Err(e) = done {
                let _ = fs::remove_file(&path);
                return Err(io_errno(e));
            }
            let kind = NodeKind::File {
                durable: Bytes::default(),
                pending: Vec::new(),
            };
            let (id, attr) = st.link_new(parent.0, name, kind, &path)?;
            if let Some(node) = st.tree.node_mut(id) {
                node.open += 1;
            }
            let fh = st.add_handle(Handle::File { node: id, file });
            Ok((attr, fh))
        });
        match result {
            Ok((attr, fh)) => reply.created(&TTL, &attr, Generation(0), FileHandle(fh), OPEN_FLAGS),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        answer(
            reply,
            self.with(|st| st.fallocate(ino.0, fh, offset, length, mode)),
        );
    }
}

/// Answers an operation that returns nothing but success or an error.
fn answer(reply: ReplyEmpty, result: Result<(), Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

/// Answers an operation that made a new entry: its attributes, or the error.
fn answer_entry<T>(reply: ReplyEntry, result: Result<(T, FileAttr), Errno>) {
    match result {
        Ok((_, attr)) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}
