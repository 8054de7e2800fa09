//! The processes a benchmark runs: the do-nothing baseline, the stack's floor, grouprelay
//! itself, and the local upstream sink that grouprelay forwards to.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// How processes are placed on the 2 cores.
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    /// Pin servers to CPU 0 (the load runs on CPU 1).
    pub pinned: bool,
}

impl Placement {
    fn command(&self, program: &Path) -> Command {
        if self.pinned {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", "0"]).arg(program);
            cmd
        } else {
            Command::new(program)
        }
    }
}

/// A server process under test, killed when dropped.
pub struct Server {
    pub child: Child,
    pub tcp: SocketAddr,
    pub unix: PathBuf,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory in bytes, and its peak, from /proc.
    pub fn rss(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Context switches (voluntary and not) over every thread of the server so far: each
    /// is a thread waking up or being put off the CPU.
    pub fn context_switches(&self) -> u64 {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return 0;
        };
        tasks
            .filter_map(Result::ok)
            .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
            .flat_map(|status| {
                status
                    .lines()
                    .filter(|l| l.contains("ctxt_switches"))
                    .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .collect::<Vec<_>>()
            })
            .sum()
    }

    /// Bytes the server has caused to be written to storage so far (`write_bytes` of
    /// `/proc/PID/io`: counted as it dirties the page cache, so sockets are not in it).
    pub fn written_bytes(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/io", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// CPU time (user + system) the server has used so far, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let ticks: u64 = after
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|v| v.parse::<u64>().ok())
            .sum();
        ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }

    pub fn stop(mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the baseline: this binary's `baseline` subcommand.
pub fn start_baseline(placement: Placement, dir: &Path) -> Server {
    start_own(placement, &["baseline"], &dir.join("baseline.sock"))
}

/// Starts the stack's floor in `mode` on a fresh database at `data` (see `floor.rs`): this
/// binary's `floor` subcommand.
pub fn start_floor(placement: Placement, mode: &str, data: &Path) -> Server {
    let data_arg = data.display().to_string();
    start_own(
        placement,
        &["floor", "--mode", mode, "--data-dir", &data_arg],
        &data.with_extension("sock"),
    )
}

/// Starts one of this binary's server subcommands, which prints its TCP address first.
fn start_own(placement: Placement, args: &[&str], unix: &Path) -> Server {
    let exe = std::env::current_exe().unwrap();
    let mut child = placement
        .command(&exe)
        .args(args)
        .arg("--unix")
        .arg(unix)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start baseline");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let tcp = line.trim().parse().expect("server address");
    Server {
        child,
        tcp,
        unix: unix.to_owned(),
    }
}

/// Starts the real grouprelay binary (next to this one in `target/release`).
pub fn start_grouprelay(
    placement: Placement,
    data_dir: &Path,
    upstream: &str,
    args: &[&str],
) -> Server {
    let exe = std::env::current_exe()
        .unwrap()
        .with_file_name("grouprelay");
    start_grouprelay_binary(&exe, placement, data_dir, upstream, args)
}

/// [`start_grouprelay`] with another build of grouprelay: `--candidate`'s, for a same-run A/B.
pub fn start_grouprelay_binary(
    exe: &Path,
    placement: Placement,
    data_dir: &Path,
    upstream: &str,
    args: &[&str],
) -> Server {
    assert!(
        exe.exists(),
        "{} is missing: run `cargo build --release` first (bench/run does)",
        exe.display()
    );
    let unix = data_dir.with_extension("sock");
    let mut child = placement
        .command(exe)
        .arg("run")
        .args(["--listen", "127.0.0.1:0", "--listen"])
        .arg(format!("unix:{}", unix.display()))
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--upstream", upstream])
        .args(args)
        .env("RUST_LOG", "warn,grouprelay::daemon=info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start grouprelay");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut tcp = None;
    let mut said = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        said.push(line.clone());
        if let Some(rest) = line.split("listening on http://").nth(1) {
            tcp = Some(rest.trim().parse().unwrap());
        }
        if line.contains("grouprelay ready") {
            break;
        }
    }
    let Some(tcp) = tcp else {
        panic!(
            "grouprelay did not start ({:?}):\n{}",
            child.wait(),
            said.join("\n")
        )
    };
    // Keep draining stderr so the daemon never blocks on a full pipe, and pass on what it
    // says (warnings, a panic): a daemon that died mid-run shows why.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            eprintln!("grouprelay: {line}");
        }
    });
    Server { child, tcp, unix }
}

/// The baseline server: reads each body and answers `200 {"success":true}`, persisting nothing.
pub async fn serve_baseline(unix: PathBuf) {
    serve(
        unix,
        |req: hyper::Request<hyper::body::Incoming>| async move {
            let _ = req.into_body().collect().await;
            let mut response =
                hyper::Response::new(Full::new(Bytes::from_static(br#"{"success":true}"#)));
            response
                .headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            Ok::<_, std::convert::Infallible>(response)
        },
    )
    .await
}

/// Serves `handle` over HTTP/1 on a loopback TCP port and on the Unix socket `unix`, and
/// prints the TCP address once both listen (the parent reads it).
pub async fn serve<F, Fut>(unix: PathBuf, handle: F)
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<hyper::Response<Full<Bytes>>, std::convert::Infallible>>
        + Send
        + 'static,
{
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _ = std::fs::remove_file(&unix);
    let uds = tokio::net::UnixListener::bind(&unix).unwrap();
    println!("{}", tcp.local_addr().unwrap());
    let unix_loop = {
        let handle = handle.clone();
        async move {
            loop {
                let (stream, _) = uds.accept().await.unwrap();
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service_fn(handle.clone())),
                );
            }
        }
    };
    let tcp_loop = async move {
        loop {
            let (stream, _) = tcp.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(handle.clone())),
            );
        }
    };
    tokio::join!(unix_loop, tcp_loop);
}

/// A local upstream that answers 200 at once and counts the calls it was sent.
pub struct Sink {
    pub addr: SocketAddr,
    pub calls: Arc<AtomicU64>,
    pub changed: Arc<tokio::sync::Notify>,
}

impl Sink {
    pub async fn start() -> Sink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicU64::new(0));
        let changed = Arc::new(tokio::sync::Notify::new());
        let (count, notify) = (calls.clone(), changed.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (count, notify) = (count.clone(), notify.clone());
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (count, notify) = (count.clone(), notify.clone());
                    async move {
                        let gzip = req
                            .headers()
                            .get("content-encoding")
                            .is_some_and(|v| v == "gzip");
                        let body = read_body(req.into_body()).await;
                        let text = if gzip {
                            let mut out = Vec::new();
                            flate2::read::GzDecoder::new(&body[..])
                                .read_to_end(&mut out)
                                .unwrap();
                            out
                        } else {
                            body.to_vec()
                        };
                        let n = count_calls(&text);
                        count.fetch_add(n, Ordering::SeqCst);
                        notify.notify_waiters();
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(br#"{"success":true}"#),
                        )))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Sink {
            addr,
            calls,
            changed,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until `n` calls have arrived, or `limit` passes; returns whether they did.
    pub async fn wait_for(&self, n: u64, limit: Duration) -> bool {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if self.calls.load(Ordering::SeqCst) >= n {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }
}

/// A request's whole body; empty if it broke off.
pub async fn read_body(body: hyper::body::Incoming) -> Bytes {
    body.collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default()
}

/// Each benchmark call has exactly one `"messageId":` key.
fn count_calls(body: &[u8]) -> u64 {
    let needle = br#""messageId":"#;
    body.windows(needle.len()).filter(|w| w == needle).count() as u64
}
