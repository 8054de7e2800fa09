//! The server: binds the listeners and serves the [`Api`] on each until shutdown.
//!
//! Each listener runs one accept loop; each connection is an HTTP/1.1 connection with a
//! header read timeout, watched by a graceful-shutdown guard so that on shutdown the loop
//! stops accepting and waits for in-flight requests to be answered. Each request carries
//! the [`Channel`] it came in on: a listener for calls, or the admin socket with whether the
//! peer's credentials admit it (`operator.rs`).

mod listen;
pub mod operator;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::http::{Api, Channel};
use crate::shutdown::Shutdown;
pub use listen::{
    open, take_inherited, Inherited, ListenAddr, Listener, SocketFile, DEFAULT_LISTEN,
};

/// The connection's read buffer.
const MAX_READ_BUFFER: usize = 64 * 1024;
/// How long shutdown waits for in-flight requests before dropping their connections.
const DRAIN_REQUESTS_TIMEOUT: Duration = Duration::from_secs(10);

/// How connections are served.
#[derive(Debug, Clone, Copy)]
pub struct ServerSettings {
    /// A client must send a request's headers within this time (slow-loris guard).
    pub header_read_timeout: Duration,
    /// Connections open at once, over every listener; past it the accept loops wait, and
    /// new clients queue in the kernel's listen backlog.
    pub max_connections: usize,
}

/// A client must send a request's headers within this time.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Client connections open at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

impl Default for ServerSettings {
    fn default() -> ServerSettings {
        ServerSettings {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// What every accept loop shares.
struct Shared {
    api: Arc<Api>,
    settings: ServerSettings,
    connections: Arc<Semaphore>,
}

/// Serves every listener until `shutdown` fires, then waits for in-flight requests.
pub async fn run(
    listeners: Vec<Listener>,
    api: Arc<Api>,
    settings: ServerSettings,
    shutdown: Shutdown,
) {
    let shared = Arc::new(Shared {
        api,
        settings,
        connections: Arc::new(Semaphore::new(settings.max_connections)),
    });
    let tasks: Vec<_> = listeners
        .into_iter()
        .map(|listener| tokio::spawn(serve(listener, shared.clone(), shutdown.clone())))
        .collect();
    for task in tasks {
        let _ = task.await;
    }
}

async fn serve(listener: Listener, shared: Arc<Shared>, mut shutdown: Shutdown) {
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.recv() => break,
            permit = shared.connections.clone().acquire_owned() => permit.expect("never closed"),
        };
        let accepted = tokio::select! {
            _ = shutdown.recv() => break,
            accepted = accept(&listener) => accepted,
        };
        match accepted {
            Ok(Stream::Tcp(stream)) => {
                let _ = stream.set_nodelay(true);
                serve_connection(stream, Channel::Calls, &shared, permit, &graceful);
            }
            Ok(Stream::Unix(stream)) => {
                let channel = match &listener {
                    Listener::Admin(_, socket) => Channel::Admin {
                        operator: stream.peer_cred().is_ok_and(|peer| socket.admits(&peer)),
                    },
                    _ => Channel::Calls,
                };
                serve_connection(stream, channel, &shared, permit, &graceful)
            }
            Err(e) => {
                // Usually EMFILE: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    match &listener {
        Listener::Unix(_, path, SocketFile::Ours) => {
            let _ = std::fs::remove_file(path);
        }
        Listener::Admin(_, socket) => {
            let _ = std::fs::remove_file(&socket.path);
        }
        _ => {}
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_REQUESTS_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish in time; closing their connections");
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> io::Result<Stream> {
    match listener {
        Listener::Tcp(l) => l.accept().await.map(|(s, _)| Stream::Tcp(s)),
        Listener::Unix(l, _, _) | Listener::Admin(l, _) => {
            l.accept().await.map(|(s, _)| Stream::Unix(s))
        }
    }
}

fn serve_connection<S>(
    stream: S,
    channel: Channel,
    shared: &Shared,
    permit: OwnedSemaphorePermit,
    graceful: &GracefulShutdown,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let api = shared.api.clone();
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let api = api.clone();
        req.extensions_mut().insert(channel);
        async move { api.handle(req).await }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.settings.header_read_timeout)
        // Headers still arriving when the buffer is full get hyper's 431 (bodies stream
        // through it in pieces); headers read whole are held to a limit in `http`.
        .max_buf_size(MAX_READ_BUFFER)
        .serve_connection(TokioIo::new(stream), service);
    let connection = graceful.watch(connection);
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
        drop(permit);
    });
}
