//! A real forward proxy for the egress tests: Debian's `tinyproxy`, started in the
//! foreground with a configuration of the test's, its log kept to read.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::log::Log;

/// A running tinyproxy; killed when dropped.
pub struct TinyProxy {
    pub addr: SocketAddr,
    child: Child,
    log: Arc<Log>,
}

/// What the proxy asks of its clients.
pub enum Access {
    /// Anyone on loopback.
    Open,
    /// Basic credentials: user, password.
    Password(&'static str, &'static str),
    /// Nobody: every request is refused (403).
    Denied,
}

/// tinyproxy's path, or `None` outside CI when it is not installed (the test says so and
/// is skipped); in CI (`$CI` set) a missing tinyproxy fails the test.
pub fn tinyproxy() -> Option<PathBuf> {
    let found = ["/usr/bin/tinyproxy", "/usr/sbin/tinyproxy"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "tinyproxy is missing: .ci/run installs it (apt-get install tinyproxy)"
        );
        eprintln!("skipping: tinyproxy is not installed (apt-get install tinyproxy)");
    }
    found
}

impl TinyProxy {
    /// Starts tinyproxy on a free loopback port with `access`, its files in `dir`.
    pub fn start(binary: &Path, dir: &Path, access: Access) -> TinyProxy {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let rules = match access {
            Access::Open => "Allow 127.0.0.1\n".to_owned(),
            Access::Password(user, password) => {
                format!("Allow 127.0.0.1\nBasicAuth {user} {password}\n")
            }
            // tinyproxy answers 403 to a client no Allow line names.
            Access::Denied => "Allow 10.255.255.1\n".to_owned(),
        };
        let config = dir.join(format!("tinyproxy-{port}.conf"));
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 64\nLogLevel Info\n{rules}"
            ),
        )
        .unwrap();
        let mut child = Command::new(binary)
            .args(["-d", "-c"])
            .arg(&config)
            .stdin(Stdio::null())
            // In the foreground tinyproxy logs to stdout, a line at a time.
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tinyproxy");
        let log = Arc::new(Log::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let writer = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("Starting main loop") {
                    let _ = ready_tx.send(());
                }
                writer.push(&line);
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("tinyproxy ready within 10 s");
        TinyProxy {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
            log,
        }
    }

    /// `http://[credentials@]127.0.0.1:port`.
    pub fn url(&self, credentials: Option<(&str, &str)>) -> String {
        match credentials {
            Some((user, password)) => format!("http://{user}:{password}@{}", self.addr),
            None => format!("http://{}", self.addr),
        }
    }

    /// What tinyproxy has logged so far.
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// Waits (at most 60 s) until tinyproxy's log holds `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        self.log.wait_for("tinyproxy", needle, 1)
    }
}

impl Drop for TinyProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
