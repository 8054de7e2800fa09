//! The admin socket: where it is, its mode and group, and who may use it (the peer's
//! credentials, `SO_PEERCRED`). Reading and deleting stored calls is the operator's alone;
//! sending calls stays open to every local service.
//!
//! Two checks, so that either alone keeps others out: the socket file's mode (0600, or 0660
//! with the admin group as its group) lets only the operator connect, and on every
//! connection the peer must be root, the daemon's own user, or a member of the admin group,
//! even if the mode was loosened by hand.

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::net::unix::UCred;
use tokio::net::UnixListener;

/// The admin socket's file name, in the runtime directory or the data dir.
pub const ADMIN_SOCKET: &str = "admin.sock";
/// Where the packaged service's admin socket is (its `RuntimeDirectory`): where the admin
/// commands look first when nothing says otherwise.
pub const SERVICE_ADMIN_SOCKET: &str = "/run/grouprelay/admin.sock";

/// Where the admin socket goes and who may use it, as configured.
#[derive(Debug, Clone, Default)]
pub struct AdminSettings {
    /// `--admin-listen unix:PATH`; `None`: the default place.
    pub listen: Option<PathBuf>,
    /// `--admin-group NAME`: its members may use the admin socket.
    pub group: Option<String>,
}

impl AdminSettings {
    /// Where the daemon puts its admin socket: as configured, else in systemd's runtime
    /// directory (`$RUNTIME_DIRECTORY`), else in the data dir.
    pub fn path(&self, data_dir: &Path) -> PathBuf {
        if let Some(path) = &self.listen {
            return path.clone();
        }
        match runtime_directory() {
            Some(dir) => dir.join(ADMIN_SOCKET),
            None => data_dir.join(ADMIN_SOCKET),
        }
    }

    /// Where the admin commands look for it: as configured, else where the daemon would put
    /// it, else where the packaged service puts it, if that socket exists.
    pub fn path_for_client(&self, data_dir: &Path) -> PathBuf {
        let path = self.path(data_dir);
        if self.listen.is_none() && !path.exists() && Path::new(SERVICE_ADMIN_SOCKET).exists() {
            return PathBuf::from(SERVICE_ADMIN_SOCKET);
        }
        path
    }

    /// How an operator is told to get access: "run as root or as a member of GROUP".
    pub fn who_may(&self) -> String {
        match &self.group {
            Some(group) => format!("run as root or as a member of {group}"),
            None => "run as root or as grouprelay's own user".to_owned(),
        }
    }
}

/// Who may use the admin socket at `path`, as its file says: the members of its group when
/// the group may use it. For the admin commands, which may not be allowed to read the
/// daemon's config file; `None` when the file cannot be looked at.
pub fn who_may_use(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    if meta.permissions().mode() & 0o060 != 0o060 {
        return Some(AdminSettings::default().who_may());
    }
    let name = group_name(meta.gid())?;
    Some(format!("run as root or as a member of {name}"))
}

/// The name of the group `gid`.
fn group_name(gid: u32) -> Option<String> {
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; GROUP_BUFFER];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; the buffer's length is passed.
    let rc = unsafe {
        libc::getgrgid_r(
            gid,
            &mut group,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return None;
    }
    // SAFETY: gr_name points into `buffer`, NUL-terminated, as getgrgid_r filled it.
    let name = unsafe { CStr::from_ptr(group.gr_name) };
    Some(name.to_string_lossy().into_owned())
}

/// `$RUNTIME_DIRECTORY`'s first entry (systemd sets it from `RuntimeDirectory=`).
fn runtime_directory() -> Option<PathBuf> {
    let dirs = std::env::var_os("RUNTIME_DIRECTORY")?;
    let first = dirs.to_str()?.split(':').next()?.to_owned();
    (!first.is_empty()).then(|| PathBuf::from(first))
}

/// `unix:PATH` as `--admin-listen` takes it.
pub fn parse_admin_listen(text: &str) -> Result<PathBuf, String> {
    match text.strip_prefix("unix:") {
        Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
        _ => Err(format!(
            "{text:?} is not unix:PATH (the admin API answers only on a Unix socket)"
        )),
    }
}

/// Room for one group or user entry from the system's databases (a group with many members
/// takes more than the 1 KiB `sysconf` usually suggests).
const GROUP_BUFFER: usize = 256 * 1024;

/// A group by name.
#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    pub gid: u32,
}

impl Group {
    /// Looks the group up in the system's group database.
    pub fn named(name: &str) -> Result<Group, String> {
        let c_name = CString::new(name).map_err(|_| format!("{name:?} is not a group name"))?;
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut buffer = vec![0 as libc::c_char; GROUP_BUFFER];
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; the buffer's length is passed.
        let rc = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &mut group,
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut found,
            )
        };
        if rc != 0 {
            let error = io::Error::from_raw_os_error(rc);
            return Err(format!("cannot look up the group {name:?}: {error}"));
        }
        if found.is_null() {
            return Err(format!("no group named {name:?} on this host"));
        }
        Ok(Group {
            name: name.to_owned(),
            gid: group.gr_gid,
        })
    }
}

/// The admin socket, ready to be bound.
#[derive(Debug, Clone)]
pub struct AdminSocket {
    pub path: PathBuf,
    pub group: Option<Group>,
}

impl AdminSocket {
    /// Binds the socket: a stale file from an earlier run replaced, mode 0600, or 0660 with
    /// the admin group as the file's group. The mode is set before anyone can connect: the
    /// socket is made under a umask that leaves it to its owner alone.
    pub fn bind(&self) -> io::Result<UnixListener> {
        super::listen::remove_stale_socket(&self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // SAFETY: umask only changes the process's file-creation mask; restored below.
        let before = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(&self.path);
        unsafe { libc::umask(before) };
        let listener = bound?;
        if let Some(group) = &self.group {
            std::os::unix::fs::chown(&self.path, None, Some(group.gid))?;
            std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o660))?;
        }
        Ok(listener)
    }

    /// Whether the peer may use the admin API: root, the daemon's own user, or a member of
    /// the admin group (its primary group, or one of its user's groups).
    pub fn admits(&self, peer: &UCred) -> bool {
        // SAFETY: geteuid cannot fail.
        let own = unsafe { libc::geteuid() };
        if peer.uid() == 0 || peer.uid() == own {
            return true;
        }
        let Some(group) = &self.group else {
            return false;
        };
        peer.gid() == group.gid || user_groups(peer.uid(), peer.gid()).contains(&group.gid)
    }
}

/// The groups of the user `uid` (whose primary group is `gid`), from the group database.
fn user_groups(uid: u32, gid: u32) -> Vec<u32> {
    let mut passwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; GROUP_BUFFER];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; the buffer's length is passed.
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &mut passwd,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Vec::new();
    }
    // SAFETY: pw_name points into `buffer`, NUL-terminated, as getpwuid_r filled it.
    let name: &CStr = unsafe { CStr::from_ptr(passwd.pw_name) };
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut count = groups.len() as libc::c_int;
    // SAFETY: `groups` holds `count` entries; getgrouplist writes at most that many.
    let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
    if rc < 0 {
        return Vec::new();
    }
    groups.truncate(count.max(0) as usize);
    groups
}
