//! Listen addresses: `HOST:PORT` or `unix:PATH`, and the loopback rule.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

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
