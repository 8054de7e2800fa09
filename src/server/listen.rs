//! Where to listen (`HOST:PORT` or `unix:PATH`, and the loopback rule), and the listeners
//! bound there.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
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
    /// The socket file is removed when the listener stops.
    Unix(UnixListener, PathBuf),
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
                Ok(Listener::Unix(listener, path.clone()))
            }
        }
    }

    /// Where this listener actually listens (the real port when bound to port 0).
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match self {
            Listener::Tcp(l) => Ok(ListenAddr::Tcp(l.local_addr()?)),
            Listener::Unix(_, path) => Ok(ListenAddr::Unix(path.clone())),
        }
    }
}

fn remove_stale_socket(path: &Path) -> io::Result<()> {
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
