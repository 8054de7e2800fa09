//! The real `grouprelay` binary: a daemon on a free loopback port with a temp data dir,
//! killed when dropped, its log to wait on; and a run of the binary to its exit.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;

use super::http::{send_tcp, Response};
use super::log::Log;

pub const BIN: &str = env!("CARGO_BIN_EXE_grouprelay");

/// A running daemon. Killed when dropped, so a failing test leaves no process behind.
pub struct Daemon {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    /// Everything the daemon has written to stderr so far.
    pub log: Arc<Log>,
}

impl Daemon {
    /// Starts the daemon on `127.0.0.1:0` with its queue in `data_dir`, and waits until it
    /// logs its listening address (it listens only once the queue is open).
    pub fn start(data_dir: &Path, args: &[&str]) -> Daemon {
        Daemon::start_with_env(data_dir, args, &[])
    }

    /// Like [`Daemon::start`], with extra environment variables for the daemon alone.
    ///
    /// Unless `args` say otherwise, the upstream is a closed loopback port and shutdown does
    /// not wait to drain, so accepted calls stay in the queue for the test to read, and there
    /// is no free-space floor.
    pub fn start_with_env(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::try_start_with_env(data_dir, args, env).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Daemon::start_with_env`], but a daemon that exits before it is ready is an
    /// `Err` holding its exit status and log, for tests where a refusal to start is an
    /// outcome to report rather than a broken test.
    pub fn try_start_with_env(
        data_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Daemon, String> {
        let mut command = Command::new(BIN);
        command.arg("run").args(["--listen", "127.0.0.1:0"]);
        Daemon::spawn(command, data_dir, args, env)
    }

    /// Starts the daemon as systemd's socket activation would: `sockets` (listening
    /// descriptors the test holds) passed as descriptors 3, 4, ... with `LISTEN_FDS` and
    /// `LISTEN_PID`, and no `--listen` of its own unless `args` give one.
    pub fn start_with_sockets(data_dir: &Path, args: &[&str], sockets: &[RawFd]) -> Daemon {
        Daemon::try_start_with_sockets(data_dir, args, sockets).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Daemon::start_with_sockets`]; a daemon that refuses to start is an `Err` with
    /// its exit status and log.
    pub fn try_start_with_sockets(
        data_dir: &Path,
        args: &[&str],
        sockets: &[RawFd],
    ) -> Result<Daemon, String> {
        let mut command = Command::new("/bin/sh");
        // `$$` is the shell's pid, which `exec` hands on to grouprelay.
        command.args([
            "-c",
            &format!(
                "LISTEN_PID=$$ LISTEN_FDS={} exec \"$0\" run \"$@\"",
                sockets.len()
            ),
            BIN,
        ]);
        let sockets = sockets.to_vec();
        // SAFETY: only dup and dup2, which are async-signal-safe, run between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // Out of the way first: a socket may already sit at 3 or 4.
                let mut moved = Vec::with_capacity(sockets.len());
                for &fd in &sockets {
                    let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                    if high < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    moved.push(high);
                }
                for (i, &fd) in moved.iter().enumerate() {
                    if libc::dup2(fd, 3 + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        Daemon::spawn(command, data_dir, args, &[])
    }

    /// Spawns `command` (grouprelay, told to run) with the test defaults, and waits until
    /// it is ready.
    fn spawn(
        mut command: Command,
        data_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Daemon, String> {
        let mut defaults = Vec::new();
        // No free-space floor unless a test asks: test machines may have little disk free.
        for (flag, value) in [
            ("--upstream", "http://127.0.0.1:9"),
            ("--drain-timeout-ms", "0"),
            ("--min-free-disk-bytes", "0"),
        ] {
            if !args.contains(&flag) {
                defaults.extend([flag, value]);
            }
        }
        let mut child = command
            .arg("--data-dir")
            .arg(data_dir)
            .args(defaults)
            .args(args)
            .env("RUST_LOG", "info")
            // The test's own environment must not send upstream calls through a proxy.
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            // The admin socket goes in the data dir, whatever runs the tests.
            .env_remove("RUNTIME_DIRECTORY")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start grouprelay");
        let log = Arc::new(Log::default());
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut addr = None;
        let mut ready = false;
        for line in lines.by_ref() {
            let line = line.expect("read daemon stderr");
            log.push(&line);
            if let Some(rest) = line.split("listening on http://").nth(1) {
                // The first TCP listener is the one the helper asked for.
                // Text or JSON logs: the address runs to the first character it cannot hold.
                let end = rest
                    .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
                    .unwrap_or(rest.len());
                addr = addr.or(Some(rest[..end].parse().expect("listen address")));
            }
            if line.contains("grouprelay ready") {
                ready = true;
                break;
            }
        }
        let (Some(addr), true) = (addr, ready) else {
            let status = child.wait().unwrap();
            return Err(format!(
                "grouprelay exited ({status}) before it was ready:\n{}",
                log.text()
            ));
        };
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.push(&line);
            }
        });
        Ok(Daemon {
            child: Some(child),
            addr,
            data_dir: data_dir.to_path_buf(),
            log,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap()
    }

    /// Waits for the process to exit by itself (a failpoint's abort, say), off the async
    /// runtime so that a stand-in upstream on it keeps answering meanwhile.
    pub async fn wait_exit(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap()
    }

    /// Sends SIGKILL and waits for the process to be gone.
    pub fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub async fn send(&self, request: &[u8]) -> Response {
        send_tcp(self.addr, request).await
    }

    /// The admin socket, where the daemon puts it by default: in its data dir.
    pub fn admin_socket(&self) -> PathBuf {
        self.data_dir.join("admin.sock")
    }

    /// `--url` for the admin commands: the admin socket.
    pub fn admin_url(&self) -> String {
        format!("unix:{}", self.admin_socket().display())
    }

    /// Sends a request over the admin socket (as this test process's user: root in CI).
    pub async fn send_admin(&self, request: &[u8]) -> Response {
        super::http::send_unix(&self.admin_socket(), request).await
    }

    pub fn log_text(&self) -> String {
        self.log.text()
    }

    /// Waits until the daemon has logged a line containing `needle` (at most 60 s, then
    /// panics with the log).
    pub async fn wait_for_log(&self, needle: &str) {
        self.wait_for_log_count(needle, 1).await
    }

    /// Waits until the daemon has logged `count` lines containing `needle`.
    pub async fn wait_for_log_count(&self, needle: &str, count: usize) {
        let log = self.log.clone();
        let needle = needle.to_owned();
        tokio::task::spawn_blocking(move || log.wait_for("the daemon", &needle, count))
            .await
            .unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the binary to completion with `args`: its status, stdout and stderr.
pub fn run_output(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run grouprelay")
}

/// Runs the binary to completion with `args` and returns (status, stderr).
pub fn run_to_exit(args: &[&str]) -> (ExitStatus, String) {
    let out = run_output(args);
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
