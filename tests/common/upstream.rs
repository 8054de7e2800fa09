//! A stand-in for Segment's API: a real hyper server on loopback that records every request
//! and answers each from a script.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::http::basic_credentials;

/// The stand-in, listening until stopped or dropped with the runtime.
pub struct Upstream {
    pub addr: SocketAddr,
    /// Whether it speaks TLS (`https://`).
    tls: bool,
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
        let auth = self.headers["authorization"].to_str().unwrap();
        let credentials = basic_credentials(auth);
        credentials.strip_suffix(':').expect("writeKey:").to_owned()
    }

    /// Whether the stand-in took this request (answered 2xx).
    pub fn was_delivered(&self) -> bool {
        (200..300).contains(&self.answered)
    }
}

/// How the stand-in answers one request.
pub enum Reply {
    Status(u16),
    WithHeaders(u16, Vec<(&'static str, String)>),
    /// Never answer (the client's timeout must fire).
    Stall,
    /// Take the request at once (it is recorded as answered with the status, whatever
    /// becomes of the connection), and answer after the delay: an upstream that has the
    /// calls before the client hears so.
    After(Duration, u16),
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
        Upstream::serve(addr, None, script).await
    }

    /// A stand-in that speaks TLS with `server`'s certificate (see `TestCa`).
    pub async fn start_tls(
        server: Arc<rustls::ServerConfig>,
        script: impl FnMut(&Recorded) -> Reply + Send + 'static,
    ) -> Upstream {
        Upstream::serve("127.0.0.1:0".parse().unwrap(), Some(server), script).await
    }

    async fn serve(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
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
        let is_tls = tls.is_some();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = shared.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { answer(state, req).await }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    let _ = match acceptor {
                        // A client that does not trust the certificate fails the handshake.
                        Some(acceptor) => match acceptor.accept(stream).await {
                            Ok(tls) => {
                                http.serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                                    .await
                            }
                            Err(_) => return,
                        },
                        None => {
                            http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await
                        }
                    };
                });
            }
        });
        Upstream {
            addr,
            tls: is_tls,
            state,
            task,
        }
    }

    /// A stand-in that answers 200 while the switch it returns is on, else 503.
    pub async fn switched(on: bool) -> (Upstream, Arc<AtomicBool>) {
        let switch = Arc::new(AtomicBool::new(on));
        let up = switch.clone();
        let upstream = Upstream::start(move |_| match up.load(Ordering::SeqCst) {
            true => Reply::Status(200),
            false => Reply::Status(503),
        })
        .await;
        (upstream, switch)
    }

    /// A stand-in that refuses (400) any batch holding a call of user `poison` until the
    /// returned switch is turned on ("forgiving"), and takes everything else: dead letters
    /// for the admin tests to manage.
    pub async fn refusing_poison() -> (Upstream, Arc<AtomicBool>) {
        let forgiving = Arc::new(AtomicBool::new(false));
        let accept_all = forgiving.clone();
        let upstream = Upstream::start(move |request| {
            let poisoned = request.calls().iter().any(|c| c["userId"] == "poison");
            match poisoned && !accept_all.load(Ordering::SeqCst) {
                true => Reply::Status(400),
                false => Reply::Status(200),
            }
        })
        .await;
        (upstream, forgiving)
    }

    /// Like [`Upstream::switched`], but refusing for good (400) any batch that holds a call
    /// whose messageId starts with `bad-`, whatever the switch.
    pub async fn switched_refusing_bad(on: bool) -> (Upstream, Arc<AtomicBool>) {
        let switch = Arc::new(AtomicBool::new(on));
        let up = switch.clone();
        let upstream = Upstream::start(move |request| {
            let bad = |c: &serde_json::Value| {
                c["messageId"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("bad-"))
            };
            if request.calls().iter().any(bad) {
                Reply::Status(400)
            } else if up.load(Ordering::SeqCst) {
                Reply::Status(200)
            } else {
                Reply::Status(503)
            }
        })
        .await;
        (upstream, switch)
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Calls in requests the stand-in answered with 2xx, in arrival order.
    pub fn delivered(&self) -> Vec<serde_json::Value> {
        self.requests()
            .iter()
            .filter(|r| r.was_delivered())
            .flat_map(|r| r.calls().to_vec())
            .collect()
    }

    /// The distinct messageIds of the calls delivered (answered 2xx).
    pub fn delivered_ids(&self) -> HashSet<String> {
        delivered_ids(&self.state.requests.lock().unwrap())
            .into_iter()
            .map(str::to_owned)
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
    pub async fn wait_delivered_ids(&self, ids: &HashSet<String>) {
        let expected = ids.clone();
        self.wait_until("the expected calls delivered", move |requests| {
            let delivered = delivered_ids(requests);
            expected.iter().all(|id| delivered.contains(id.as_str()))
        })
        .await
    }

    /// Waits until at least `n` calls were delivered.
    pub async fn wait_delivered(&self, n: usize) {
        self.wait_until(&format!("{n} delivered calls"), |requests| {
            requests
                .iter()
                .filter(|r| r.was_delivered())
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

/// The distinct messageIds of the calls in the requests answered 2xx.
pub fn delivered_ids(requests: &[Recorded]) -> HashSet<&str> {
    requests
        .iter()
        .filter(|r| r.was_delivered())
        .flat_map(|r| r.calls())
        .filter_map(|c| c["messageId"].as_str())
        .collect()
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
        Reply::After(delay, status) => {
            recorded.answered = status;
            state.requests.lock().unwrap().push(recorded);
            state.changed.notify_waiters();
            tokio::time::sleep(delay).await;
            return Ok(scripted_answer(status, Vec::new()));
        }
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
    Ok(scripted_answer(status, headers))
}

/// The stand-in's answer: `{"success":true}` for 2xx, a JSON error otherwise.
fn scripted_answer(
    status: u16,
    headers: Vec<(&'static str, String)>,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
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
    response
}
