//! A raw HTTP/1.1 client, so that tests control every byte: requests built by hand, sent
//! over TCP or a Unix socket, and the response parsed.

use std::net::SocketAddr;
use std::path::Path;

use base64::Engine;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
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

/// The value of the first header called `name` (in any case).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// `Authorization: Basic base64(write_key:)`, as Segment's clients send a writeKey.
pub fn basic_auth(write_key: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{write_key}:"));
    format!("Authorization: Basic {encoded}")
}

/// The credentials (`user:password`) in an `Authorization: Basic` value.
pub fn basic_credentials(authorization: &str) -> String {
    let encoded = authorization.strip_prefix("Basic ").expect("Basic auth");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("base64");
    String::from_utf8(decoded).expect("UTF-8 credentials")
}

/// A request with `method`, `path`, `Host` and `Connection: close`, then the header lines
/// given, then `body` as is.
pub fn request(method: &str, path: &str, headers: &[String], body: &[u8]) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for header in headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    request
}

/// A JSON POST with `Content-Length`, and the writeKey in Basic auth if given.
pub fn post(path: &str, write_key: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut headers = vec![
        "Content-Type: application/json".to_owned(),
        format!("Content-Length: {}", body.len()),
    ];
    headers.extend(write_key.map(basic_auth));
    request("POST", path, &headers, body)
}

pub fn get(path: &str) -> Vec<u8> {
    request("GET", path, &[], b"")
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
    let length =
        header(&headers, "content-length").map(|v| v.parse::<usize>().expect("content-length"));
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
