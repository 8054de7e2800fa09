//! Where to listen (`HOST:PORT` or `unix:PATH`, and the loopback rule), the sockets the
//! service manager passes (systemd's socket activation), and the listeners on them.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, UnixListener};

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// The default listen address: loopback, port 8788.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8788);

impl ListenAddr {
    /// Parses `HOST:PORT` (an IP address, or `localhost`) or `unix:PATH`.
    pub fn parse(addr: &str) -> Result<ListenAddr, String> {
        if let Some(path) = addr.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Ok(socket) = addr.parse::<SocketAddr>() {
            return Ok(ListenAddr::Tcp(socket));
        }
        match addr.rsplit_once(':') {
            Some(("localhost", port)) => {
                let port = port
                    .parse::<u16>()
                    .map_err(|_| format!("{addr:?}: the port is not a number"))?;
                Ok(ListenAddr::Tcp(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    port,
                )))
            }
            _ => Err(format!(
                "{addr:?} is neither HOST:PORT (an IP address) nor unix:PATH"
            )),
        }
    }

    /// Whether only this host can reach it: a loopback address or a Unix socket.
    pub fn is_local(&self) -> bool {
        match self {
            ListenAddr::Tcp(socket) => socket.ip().is_loopback(),
            ListenAddr::Unix(_) => true,
        }
    }

    /// As a setting writes it: `127.0.0.1:8788` or `unix:/run/grouprelay/grouprelay.sock`.
    pub fn as_setting(&self) -> String {
        match self {
            ListenAddr::Tcp(socket) => socket.to_string(),
            ListenAddr::Unix(path) => format!("unix:{}", path.display()),
        }
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "http://{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A bound listener.
pub enum Listener {
    Tcp(TcpListener),
    /// A socket file grouprelay made is removed when the listener stops; one the service
    /// manager passed (see [`take_inherited`]) stays, the manager's to keep.
    Unix(UnixListener, PathBuf, SocketFile),
    /// The admin socket (see `operator`): its file is removed when the listener stops.
    Admin(UnixListener, std::sync::Arc<super::operator::AdminSocket>),
}

/// Who made a Unix listener's socket file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketFile {
    /// grouprelay bound it: removed when the listener stops.
    Ours,
    /// The service manager passed it: left in place.
    Inherited,
}

/// The first file descriptor the service manager passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// A listening socket the service manager passed, not yet on the runtime.
pub struct Inherited {
    pub addr: ListenAddr,
    socket: InheritedSocket,
}

enum InheritedSocket {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

/// Takes the listening sockets passed by systemd's socket activation protocol
/// (`LISTEN_PID` naming this process, `LISTEN_FDS` counting descriptors from 3), and
/// removes the variables so that no child process takes them too. None when there are none.
/// Call it before any other thread starts.
pub fn take_inherited() -> Result<Vec<Inherited>, String> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|pid| pid.trim().parse::<u32>().ok())
        == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.trim().parse::<RawFd>().ok());
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(name);
    }
    match (ours, count) {
        (true, Some(count)) if count > 0 => (LISTEN_FDS_START..LISTEN_FDS_START + count)
            .map(inherit)
            .collect(),
        _ => Ok(Vec::new()),
    }
}

/// One passed descriptor: a listening TCP or Unix stream socket, or an error naming it.
fn inherit(fd: RawFd) -> Result<Inherited, String> {
    let what = |problem: &str| format!("passed socket {fd}: {problem}");
    let listening = socket_option(fd, libc::SO_ACCEPTCONN).map_err(|e| what(&e.to_string()))?;
    let stream = socket_option(fd, libc::SO_TYPE).map_err(|e| what(&e.to_string()))?;
    if listening != 1 || stream != libc::SOCK_STREAM {
        return Err(what("not a listening stream socket"));
    }
    let domain = socket_option(fd, libc::SO_DOMAIN).map_err(|e| what(&e.to_string()))?;
    // SAFETY: the service manager passed this descriptor to this process to own, and it is
    // taken once (the variables that name it are removed above).
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    match domain {
        libc::AF_INET | libc::AF_INET6 => {
            // SAFETY: as above; a listening TCP socket.
            let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
            let addr = listener.local_addr().map_err(|e| what(&e.to_string()))?;
            Ok(Inherited {
                addr: ListenAddr::Tcp(addr),
                socket: InheritedSocket::Tcp(listener),
            })
        }
        libc::AF_UNIX => {
            // SAFETY: as above; a listening Unix stream socket.
            let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
            let addr = listener.local_addr().map_err(|e| what(&e.to_string()))?;
            let path = addr
                .as_pathname()
                .ok_or_else(|| what("a Unix socket without a path"))?
                .to_path_buf();
            Ok(Inherited {
                addr: ListenAddr::Unix(path),
                socket: InheritedSocket::Unix(listener),
            })
        }
        _ => Err(what("neither TCP nor a Unix socket")),
    }
}

/// An integer socket option of `fd`.
fn socket_option(fd: RawFd, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`.
    let result = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

impl Inherited {
    /// The socket on the runtime, as a listener.
    pub fn into_listener(self) -> io::Result<Listener> {
        match self.socket {
            InheritedSocket::Tcp(listener) => {
                listener.set_nonblocking(true)?;
                Ok(Listener::Tcp(TcpListener::from_std(listener)?))
            }
            InheritedSocket::Unix(listener) => {
                listener.set_nonblocking(true)?;
                let path = match &self.addr {
                    ListenAddr::Unix(path) => path.clone(),
                    ListenAddr::Tcp(_) => PathBuf::new(),
                };
                Ok(Listener::Unix(
                    UnixListener::from_std(listener)?,
                    path,
                    SocketFile::Inherited,
                ))
            }
        }
    }
}

impl Listener {
    /// Binds `addr`. A Unix socket gets mode 0660; a stale socket file left by a dead
    /// process is replaced, but a live one, or a file that is not a socket, is an error.
    pub async fn bind(addr: &ListenAddr) -> io::Result<Listener> {
        match addr {
            ListenAddr::Tcp(socket) => Ok(Listener::Tcp(TcpListener::bind(socket).await?)),
            ListenAddr::Unix(path) => {
                remove_stale_socket(path)?;
                let listener = UnixListener::bind(path)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
                Ok(Listener::Unix(listener, path.clone(), SocketFile::Ours))
            }
        }
    }

    /// Where this listener actually listens (the real port when bound to port 0).
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match self {
            Listener::Tcp(l) => Ok(ListenAddr::Tcp(l.local_addr()?)),
            Listener::Unix(_, path, _) => Ok(ListenAddr::Unix(path.clone())),
            Listener::Admin(_, socket) => Ok(ListenAddr::Unix(socket.path.clone())),
        }
    }
}

/// The listeners to serve: every inherited socket, then the `listen` addresses not among
/// them, bound here. With inherited sockets, `listen` is bound only when `listen_given` (the
/// default address is the manager's to decide then).
pub async fn open(
    listen: &[ListenAddr],
    listen_given: bool,
    inherited: Vec<Inherited>,
) -> Result<Vec<Listener>, String> {
    let taken: Vec<ListenAddr> = inherited.iter().map(|i| i.addr.clone()).collect();
    let mut listeners = Vec::with_capacity(listen.len() + inherited.len());
    for socket in inherited {
        let addr = socket.addr.clone();
        let listener = socket
            .into_listener()
            .map_err(|e| format!("cannot serve the passed socket {addr}: {e}"))?;
        listeners.push(listener);
    }
    if !taken.is_empty() && !listen_given {
        return Ok(listeners);
    }
    for addr in listen.iter().filter(|addr| !taken.contains(addr)) {
        let listener = Listener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Removes a socket file an earlier run left; refuses one another process listens on, and
/// anything that is not a socket.
pub(super) fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another process is listening on {}", path.display()),
        ));
    }
    std::fs::remove_file(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            ListenAddr::parse("localhost:1").unwrap(),
            ListenAddr::Tcp("127.0.0.1:1".parse().unwrap())
        );
        assert_eq!(
            ListenAddr::parse("unix:/run/x.sock").unwrap(),
            ListenAddr::Unix("/run/x.sock".into())
        );
        assert!(ListenAddr::parse("[::1]:8788").unwrap().is_local());
        assert!(!ListenAddr::parse("0.0.0.0:8788").unwrap().is_local());
        assert!(ListenAddr::parse("example.com:80").is_err());
        assert!(ListenAddr::parse("unix:").is_err());
    }
}
