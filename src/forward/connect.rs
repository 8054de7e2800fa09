//! How the upstream client reaches upstream: directly, or through an HTTP proxy (a CONNECT
//! tunnel for an `https` upstream, the request in absolute form for an `http` one); then
//! TLS for `https`, trusting the system's roots and any `--upstream-ca-file`.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::Uri;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;
use tokio::net::TcpStream;

use super::proxy::Proxy;

/// What the upstream client connects with.
pub type UpstreamConnector = HttpsConnector<ProxyConnector>;

/// The connector for upstream: TLS over [`ProxyConnector`].
pub fn connector(
    proxy: Option<&Proxy>,
    ca_file: Option<&Path>,
    https: bool,
) -> Result<UpstreamConnector, String> {
    let roots = roots(ca_file, https)?;
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    // The scheme is the TLS layer's business: this one carries https too.
    http.enforce_http(false);
    let via = match proxy {
        None => Via::Direct,
        Some(proxy) if https => {
            let mut tunnel = Tunnel::new(proxy.uri.clone(), http.clone());
            if let Some(authorization) = &proxy.authorization {
                tunnel = tunnel.with_auth(authorization.clone());
            }
            Via::Tunnel(tunnel, proxy.shown())
        }
        Some(proxy) => Via::AbsoluteForm(proxy.uri.clone(), proxy.shown()),
    };
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(ProxyConnector { http, via }))
}

/// The system's root certificates, and the certificates of `ca_file` beside them.
fn roots(ca_file: Option<&Path>, https: bool) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        for cert in load_ca_file(path)? {
            roots
                .add(cert)
                .map_err(|e| format!("{}: a certificate cannot be used: {e}", path.display()))?;
        }
    } else if added == 0 && https {
        let why = native
            .errors
            .first()
            .map_or_else(|| "none found".to_owned(), ToString::to_string);
        return Err(format!("no usable system root certificates: {why}"));
    }
    Ok(roots)
}

/// The PEM certificates in `path`; an error names the file and says what is wrong with it.
pub fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// Connects to upstream as the proxy setting says; TLS, if any, goes on top.
#[derive(Clone)]
pub struct ProxyConnector {
    http: HttpConnector,
    via: Via,
}

/// The way to upstream, with the proxy as logs show it.
#[derive(Clone)]
enum Via {
    Direct,
    /// `CONNECT host:port` through the proxy, for an `https` upstream.
    Tunnel(Tunnel<HttpConnector>, String),
    /// To the proxy itself, requests in absolute form, for an `http` upstream.
    AbsoluteForm(Uri, String),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for ProxyConnector {
    type Response = ProxyStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<ProxyStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let mut http = self.http.clone();
        let via = self.via.clone();
        Box::pin(async move {
            let (stream, absolute_form) = match via {
                Via::Direct => (http.call(dst).await?, false),
                Via::Tunnel(mut tunnel, shown) => {
                    let stream = tunnel
                        .call(dst)
                        .await
                        .map_err(|e| format!("through the proxy {shown}: {}", error_chain(&e)))?;
                    (stream, false)
                }
                Via::AbsoluteForm(proxy, shown) => {
                    let stream = http.call(proxy).await.map_err(|e| {
                        format!("cannot reach the proxy {shown}: {}", error_chain(&e))
                    })?;
                    (stream, true)
                }
            };
            Ok(ProxyStream {
                inner: stream,
                absolute_form,
            })
        })
    }
}

/// An error and its sources, on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text = format!("{text}: {inner}");
        source = inner.source();
    }
    text
}

/// A connection to upstream or to the proxy; one to the proxy for an `http` upstream tells
/// hyper to write requests in absolute form.
pub struct ProxyStream {
    inner: TokioIo<TcpStream>,
    absolute_form: bool,
}

impl Connection for ProxyStream {
    fn connected(&self) -> Connected {
        self.inner.connected().proxy(self.absolute_form)
    }
}

impl hyper::rt::Read for ProxyStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for ProxyStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
