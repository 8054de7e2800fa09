//! Test helpers: the real `grouprelay` binary on a free loopback port with a temp data dir,
//! a raw HTTP/1.1 client (so tests control every byte), and a look into the queue on disk.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use grouprelay::queue::{CallRecord, DeadRecord, Queue, QueueOptions, RejectedRecord};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const BIN: &str = env!("CARGO_BIN_EXE_grouprelay");

/// A running daemon. Killed when dropped, so a failing test leaves no process behind.
pub struct Daemon {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    /// Everything the daemon has written to stderr so far.
    pub log: Arc<Log>,
}

/// The daemon's stderr, and a way to wait for a line.
#[derive(Default)]
pub struct Log {
    text: Mutex<String>,
    grew: Condvar,
}

impl Log {
    fn push(&self, line: &str) {
        let mut text = self.text.lock().unwrap();
        text.push_str(line);
        text.push('\n');
        self.grew.notify_all();
    }
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
        let mut child = Command::new(BIN)
            .arg("run")
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(defaults)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start grouprelay");
        let log = Arc::new(Log::default());
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut addr = None;
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
                break;
            }
        }
        let Some(addr) = addr else {
            let status = child.wait().unwrap();
            return Err(format!(
                "grouprelay exited ({status}) before listening:\n{}",
                log.text.lock().unwrap()
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

    pub fn log_text(&self) -> String {
        self.log.text.lock().unwrap().clone()
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
        tokio::task::spawn_blocking(move || {
            let text = log.text.lock().unwrap();
            let (text, timeout) = log
                .grew
                .wait_timeout_while(text, Duration::from_secs(60), |t| {
                    t.lines().filter(|l| l.contains(&needle)).count() < count
                })
                .unwrap();
            assert!(
                !timeout.timed_out(),
                "the daemon never logged {needle:?}:\n{text}"
            );
        })
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

/// The seed of a randomised test: `GROUPRELAY_TEST_SEED` when set (to replay a run), else
/// the clock. Tests print it, so that any run can be replayed.
pub fn test_seed() -> u64 {
    std::env::var("GROUPRELAY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

/// Runs the binary to completion with `args` and returns (status, stderr).
pub fn run_to_exit(args: &[&str]) -> (ExitStatus, String) {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run grouprelay");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Builds a request with `Content-Length` and `Connection: close`.
pub fn post(path: &str, write_key: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(key) = write_key {
        use base64::Engine;
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{key}:"));
        head.push_str(&format!("Authorization: Basic {encoded}\r\n"));
    }
    head.push_str("\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    request
}

pub fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").into_bytes()
}

pub async fn send_tcp(addr: SocketAddr, request: &[u8]) -> Response {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    exchange(stream, request).await.expect("HTTP exchange")
}

pub async fn send_unix(path: &Path, request: &[u8]) -> Response {
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .expect("connect");
    exchange(stream, request).await.expect("HTTP exchange")
}

/// Writes `request`, then reads one response (by Content-Length, else to EOF).
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    request: &[u8],
) -> std::io::Result<Response> {
    stream.write_all(request).await?;
    let mut buf = Vec::new();
    let header_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before a response",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = buf[header_end..].to_vec();
    let length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse::<usize>().expect("content-length"));
    match length {
        Some(length) => {
            while body.len() < length {
                let mut chunk = vec![0u8; length - body.len()];
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        }
        None => {
            stream.read_to_end(&mut body).await?;
        }
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// What a stopped daemon left on disk: the queued calls in order, the rejected ones and the
/// dead letters.
pub struct OnDisk {
    pub calls: Vec<CallRecord>,
    pub rejected: Vec<RejectedRecord>,
    pub dead: Vec<DeadRecord>,
}

impl OnDisk {
    /// The queued calls' bodies as JSON.
    pub fn call_json(&self) -> Vec<serde_json::Value> {
        self.calls
            .iter()
            .map(|c| serde_json::from_slice(&c.call).expect("queued call is JSON"))
            .collect()
    }
}

/// Opens the queue of a daemon that is no longer running and reads everything in it.
pub async fn on_disk(data_dir: &Path) -> OnDisk {
    let queue = Queue::open(QueueOptions::new(data_dir)).expect("open queue");
    let calls = queue
        .read(0, usize::MAX)
        .expect("read queue")
        .into_iter()
        .map(|c| c.record)
        .collect();
    let rejected = queue.rejected().expect("read rejected");
    let dead = queue.dead().expect("read dead letters");
    queue.close().await.expect("close queue");
    OnDisk {
        calls,
        rejected,
        dead,
    }
}

/// A stand-in for Segment's API: a real hyper server on loopback that records every request
/// and answers each from a script.
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<UpstreamState>,
    task: tokio::task::JoinHandle<()>,
}

/// A request the stand-in received, with what it answered.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub headers: hyper::HeaderMap,
    /// The body as sent (possibly gzip).
    pub raw_len: usize,
    /// The body after gzip decoding.
    pub body_len: usize,
    pub body: serde_json::Value,
    pub answered: u16,
}

impl Recorded {
    pub fn calls(&self) -> &[serde_json::Value] {
        self.body["batch"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    pub fn write_key(&self) -> String {
        use base64::Engine;
        let auth = self.headers["authorization"].to_str().unwrap();
        let encoded = auth.strip_prefix("Basic ").expect("Basic auth");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        let decoded = String::from_utf8(decoded).unwrap();
        decoded.strip_suffix(':').expect("writeKey:").to_owned()
    }
}

/// How the stand-in answers one request.
pub enum Reply {
    Status(u16),
    WithHeaders(u16, Vec<(&'static str, String)>),
    /// Never answer (the client's timeout must fire).
    Stall,
}

type Script = Box<dyn FnMut(&Recorded) -> Reply + Send>;

struct UpstreamState {
    requests: Mutex<Vec<Recorded>>,
    script: Mutex<Script>,
    changed: tokio::sync::Notify,
}

impl Upstream {
    pub async fn start(script: impl FnMut(&Recorded) -> Reply + Send + 'static) -> Upstream {
        Upstream::start_on("127.0.0.1:0".parse().unwrap(), script).await
    }

    pub async fn start_on(
        addr: SocketAddr,
        script: impl FnMut(&Recorded) -> Reply + Send + 'static,
    ) -> Upstream {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind stand-in");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpstreamState {
            requests: Mutex::new(Vec::new()),
            script: Mutex::new(Box::new(script)),
            changed: tokio::sync::Notify::new(),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { answer(state, req).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Calls in requests the stand-in answered with 2xx, in arrival order.
    pub fn delivered(&self) -> Vec<serde_json::Value> {
        self.requests()
            .iter()
            .filter(|r| (200..300).contains(&r.answered))
            .flat_map(|r| r.calls().to_vec())
            .collect()
    }

    /// Waits until `done` holds for the requests received (at most 60 s, then panics).
    pub async fn wait_until(&self, what: &str, done: impl Fn(&[Recorded]) -> bool) {
        let wait = async {
            loop {
                let changed = self.state.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if done(&self.state.requests.lock().unwrap()) {
                    return;
                }
                changed.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .is_err()
        {
            panic!(
                "stand-in upstream: timed out waiting for {what}; got {} requests",
                self.requests().len()
            );
        }
    }

    /// Waits until every call with one of these messageIds was delivered (answered 2xx).
    pub async fn wait_delivered_ids(&self, ids: &std::collections::HashSet<String>) {
        let expected = ids.clone();
        self.wait_until("the expected calls delivered", move |requests| {
            let delivered: std::collections::HashSet<&str> = requests
                .iter()
                .filter(|r| (200..300).contains(&r.answered))
                .flat_map(|r| r.calls())
                .filter_map(|c| c["messageId"].as_str())
                .collect();
            expected.iter().all(|id| delivered.contains(id.as_str()))
        })
        .await
    }

    /// Waits until at least `n` calls were delivered.
    pub async fn wait_delivered(&self, n: usize) {
        self.wait_until(&format!("{n} delivered calls"), |requests| {
            requests
                .iter()
                .filter(|r| (200..300).contains(&r.answered))
                .map(|r| r.calls().len())
                .sum::<usize>()
                >= n
        })
        .await
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

async fn answer(
    state: Arc<UpstreamState>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible> {
    use http_body_util::BodyExt;
    use std::io::Read;
    let (parts, body) = req.into_parts();
    let raw = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let gzip = parts
        .headers
        .get("content-encoding")
        .is_some_and(|v| v == "gzip");
    let decoded = if gzip {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .expect("upstream body is valid gzip");
        out
    } else {
        raw.to_vec()
    };
    let mut recorded = Recorded {
        headers: parts.headers,
        raw_len: raw.len(),
        body_len: decoded.len(),
        body: serde_json::from_slice(&decoded).expect("upstream body is JSON"),
        answered: 0,
    };
    let reply = (state.script.lock().unwrap())(&recorded);
    let (status, headers) = match reply {
        Reply::Status(status) => (status, Vec::new()),
        Reply::WithHeaders(status, headers) => (status, headers),
        Reply::Stall => {
            recorded.answered = 0;
            state.requests.lock().unwrap().push(recorded);
            state.changed.notify_waiters();
            std::future::pending::<()>().await;
            unreachable!()
        }
    };
    recorded.answered = status;
    state.requests.lock().unwrap().push(recorded);
    state.changed.notify_waiters();
    let body = if (200..300).contains(&status) {
        r#"{"success":true}"#
    } else {
        r#"{"success":false,"code":"scripted","message":"scripted failure"}"#
    };
    let mut response = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    for (name, value) in headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    Ok(response)
}
