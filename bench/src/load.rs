//! The load generator: N keep-alive HTTP/1.1 connections POSTing Group calls for a fixed time.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

/// Where the load goes.
#[derive(Debug, Clone)]
pub enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// What each request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// One call on `/v1/group`.
    Single,
    /// 100 calls on `/v1/batch`.
    Batch100,
}

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Single => "group",
            Shape::Batch100 => "batch100",
        }
    }

    fn calls(self) -> usize {
        match self {
            Shape::Single => 1,
            Shape::Batch100 => 100,
        }
    }
}

#[derive(Debug)]
pub struct LoadResult {
    pub requests: u64,
    pub calls: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latency: Histogram<u64>,
}

impl LoadResult {
    pub fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    pub fn calls_per_sec(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }
    /// A latency quantile in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }
}

/// The complete Group call of `docs/group-call.md` ("A complete Group call"), about 700
/// bytes, with a fresh messageId.
pub fn group_call(message_id: &str) -> String {
    format!(
        r#"{{"anonymousId":"507f191e810c19729de860ea","channel":"browser","context":{{"ip":"8.8.8.8","userAgent":"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_9_5) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/40.0.2214.115 Safari/537.36"}},"integrations":{{"All":true,"Mixpanel":false,"Salesforce":false}},"messageId":"{message_id}","receivedAt":"2015-02-23T22:28:55.387Z","sentAt":"2015-02-23T22:28:55.111Z","timestamp":"2015-02-23T22:28:55.111Z","traits":{{"name":"Initech","industry":"Technology","employees":329,"plan":"enterprise","total billed":830}},"type":"group","userId":"97980cfea0067","groupId":"0e8c78ea9d97a7b8185e8632","version":"1.1"}}"#
    )
}

fn body(shape: Shape, conn: usize, seq: &mut u64) -> Vec<u8> {
    let mut next_id = || {
        *seq += 1;
        format!("bench-{conn}-{seq}-0000-0000-000000000000")
    };
    match shape {
        Shape::Single => group_call(&next_id()).into_bytes(),
        Shape::Batch100 => {
            let calls: Vec<String> = (0..100).map(|_| group_call(&next_id())).collect();
            format!(r#"{{"batch":[{}]}}"#, calls.join(",")).into_bytes()
        }
    }
}

/// Runs `conns` connections against `target` for `warmup + duration`; only the `duration`
/// part is measured.
pub async fn run(
    target: Target,
    shape: Shape,
    conns: usize,
    warmup: Duration,
    duration: Duration,
) -> LoadResult {
    let start = Instant::now() + warmup;
    let end = start + duration;
    let tasks: Vec<_> = (0..conns)
        .map(|conn| tokio::spawn(connection(target.clone(), shape, conn, start, end)))
        .collect();
    let mut total = LoadResult {
        requests: 0,
        calls: 0,
        errors: 0,
        elapsed: duration,
        latency: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
    };
    for task in tasks {
        let r = task.await.expect("load task");
        total.requests += r.requests;
        total.calls += r.calls;
        total.errors += r.errors;
        total.latency.add(&r.latency).unwrap();
    }
    total
}

async fn connection(
    target: Target,
    shape: Shape,
    conn: usize,
    start: Instant,
    end: Instant,
) -> LoadResult {
    let mut result = LoadResult {
        requests: 0,
        calls: 0,
        errors: 0,
        elapsed: end - start,
        latency: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
    };
    let mut sender = connect(&target).await;
    let mut seq = 0u64;
    let path = match shape {
        Shape::Single => "/v1/group",
        Shape::Batch100 => "/v1/batch",
    };
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let request = Request::post(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            // base64("BENCH_KEY:")
            .header("authorization", "Basic QkVOQ0hfS0VZOg==")
            .body(Full::new(Bytes::from(body(shape, conn, &mut seq))))
            .unwrap();
        let sent = Instant::now();
        let outcome = match sender.send_request(request).await {
            Ok(response) => {
                let ok = response.status() == 200;
                let _ = response.into_body().collect().await;
                ok
            }
            Err(e) => {
                if result.errors == 0 {
                    eprintln!("request failed, reconnecting: {e}");
                }
                sender = connect(&target).await;
                false
            }
        };
        if sent >= start {
            let micros = sent.elapsed().as_micros().max(1) as u64;
            result.latency.record(micros.min(60_000_000)).unwrap();
            if outcome {
                result.requests += 1;
                result.calls += shape.calls() as u64;
            } else {
                result.errors += 1;
            }
        }
    }
    result
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(target: &Target) -> Sender {
    match target {
        Target::Tcp(addr) => {
            let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            stream.set_nodelay(true).unwrap();
            handshake(stream).await
        }
        Target::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .expect("connect");
            handshake(stream).await
        }
    }
}

async fn handshake<S>(stream: S) -> Sender
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    sender
}
