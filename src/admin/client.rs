//! The admin commands' side: one HTTP/1.1 request to the running daemon's admin endpoints,
//! over TCP or its Unix socket.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

/// How long an admin command waits for the daemon.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Where the daemon listens.
#[derive(Debug, Clone)]
pub enum Target {
    Tcp(String),
    Unix(PathBuf),
}

impl Target {
    /// `http://HOST:PORT` or `unix:PATH`.
    pub fn parse(url: &str) -> Result<Target, String> {
        if let Some(path) = url.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(Target::Unix(PathBuf::from(path)));
        }
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url:?} is neither http://HOST:PORT nor unix:PATH"))?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(format!("{url:?} is not http://HOST:PORT"));
        }
        Ok(Target::Tcp(authority.to_owned()))
    }
}

/// Why a request got no answer.
#[derive(Debug)]
pub enum RequestError {
    /// The socket's permissions keep this user out.
    Denied(String),
    /// Anything else: nothing listens, the exchange broke, no answer in time.
    Failed(String),
}

impl From<String> for RequestError {
    fn from(message: String) -> RequestError {
        RequestError::Failed(message)
    }
}

/// Sends one request (a JSON body, if any) and returns the status and the answer's bytes.
pub async fn request(
    target: &Target,
    method: Method,
    path: &str,
    body: Option<Bytes>,
) -> Result<(u16, Bytes), RequestError> {
    let exchange = async {
        let host = match target {
            Target::Tcp(authority) => authority.clone(),
            Target::Unix(_) => "localhost".to_owned(),
        };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| e.to_string())?;
        let response = match target {
            Target::Tcp(authority) => {
                let stream = tokio::net::TcpStream::connect(authority)
                    .await
                    .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
                send(stream, request).await?
            }
            Target::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path).await.map_err(|e| {
                    let message = format!("cannot connect to {}: {e}", path.display());
                    match e.kind() {
                        std::io::ErrorKind::PermissionDenied => RequestError::Denied(message),
                        _ => RequestError::Failed(message),
                    }
                })?;
                send(stream, request).await?
            }
        };
        Ok::<_, RequestError>(response)
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| RequestError::Failed(format!("no answer within {} s", TIMEOUT.as_secs())))?
}

async fn send<S>(stream: S, request: Request<Full<Bytes>>) -> Result<(u16, Bytes), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the answer failed: {e}"))?
        .to_bytes();
    Ok((status, bytes))
}
