//! systemd's notify protocol: `READY=1`, `STATUS=`, `WATCHDOG=1` and `STOPPING=1` datagrams
//! to `$NOTIFY_SOCKET`, for `Type=notify` units. Outside systemd (no `$NOTIFY_SOCKET`) every
//! call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where systemd listens, if it does.
pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`: a path, or `@name` for an abstract socket.
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|target| {
            let target = target.to_string_lossy().into_owned();
            let addr = match target.strip_prefix('@') {
                Some(name) => {
                    use std::os::linux::net::SocketAddrExt;
                    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                }
                None => std::os::unix::net::SocketAddr::from_pathname(&target),
            };
            match (UnixDatagram::unbound(), addr) {
                (Ok(socket), Ok(addr)) => Some((socket, addr)),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, notify_socket = %target, "cannot use NOTIFY_SOCKET");
                    None
                }
            }
        });
        Notifier { socket }
    }

    /// Sends one notification (newline-separated `KEY=value` lines); best effort.
    pub fn notify(&self, state: &str) {
        if let Some((socket, addr)) = &self.socket {
            if let Err(e) = socket.send_to_addr(state.as_bytes(), addr) {
                tracing::warn!(error = %e, "cannot notify systemd");
            }
        }
    }

    /// How often systemd wants `WATCHDOG=1` (half its `WatchdogSec=`), when it does and the
    /// watchdog is meant for this process.
    pub fn watchdog_interval() -> Option<Duration> {
        if let Ok(pid) = std::env::var("WATCHDOG_PID") {
            if pid.trim() != std::process::id().to_string() {
                return None;
            }
        }
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
        // Never a zero period (a timer cannot tick at it); systemd's own minimum is far above.
        (usec > 0).then(|| Duration::from_micros(usec / 2).max(Duration::from_millis(10)))
    }
}
