//! The listener: HTTP/1.1 and HTTP/2 (h2c, or ALPN over rustls), header-read
//! timeout, header size limit, and graceful shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;

use super::sendfile::SendfileStream;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;

use super::App;

/// Connection-level settings.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub header_read_timeout: Duration,
    pub max_header_size: usize,
    pub shutdown_timeout: Duration,
    /// How long a TLS handshake may take.
    pub tls_handshake_timeout: Duration,
}

/// Loads a PEM certificate chain and key into a TLS acceptor offering h2
/// and http/1.1.
pub fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    use anyhow::Context as _;
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading certificate {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificate {}", cert.display()))?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in {}", cert.display());
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading private key {}", key.display()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("certificate and key do not form a usable pair")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops
/// accepting and gives in-flight requests up to `shutdown_timeout`.
pub async fn run(
    listener: TcpListener,
    app: App,
    tls: Option<TlsAcceptor>,
    opts: ServerOptions,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .max_buf_size(opts.max_header_size);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(opts.max_header_size as u32);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = service_fn(move |req| {
            let app = app.clone();
            async move { app.handle(req).await }
        });
        match &tls {
            None => {
                let io = PrefaceTimeout::new(SendfileStream::new(stream), opts.header_read_timeout);
                let conn = builder.serve_connection(TokioIo::new(io), service);
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let builder = builder.clone();
                let watcher = graceful.watcher();
                let timeout = opts.tls_handshake_timeout;
                let header_read_timeout = opts.header_read_timeout;
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => return log_handshake(peer, &e.to_string()),
                        Err(_) => return log_handshake(peer, "timed out"),
                    };
                    let io = PrefaceTimeout::new(tls, header_read_timeout);
                    let conn = builder.serve_connection(TokioIo::new(io), service);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
        }
    }
    drop(listener);
    tracing::info!("shutting down: no longer accepting; waiting for requests in flight");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(opts.shutdown_timeout) => {
            tracing::warn!(timeout = ?opts.shutdown_timeout, "shutdown deadline passed; closing remaining connections");
        }
    }
}

fn log_handshake(peer: SocketAddr, why: &str) {
    tracing::debug!(%peer, why, "TLS handshake failed");
}

/// The HTTP/2 connection preface. Until a connection's first bytes either
/// complete it or depart from it, the protocol is unknown and neither
/// hyper's HTTP/1 header-read timeout nor HTTP/2's settings apply.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Closes a connection whose protocol is not settled within `timeout`: a
/// client that connects and sends nothing (or a stalled fragment of the
/// HTTP/2 preface) would otherwise hold a socket open forever. Once the
/// protocol is known, reads pass straight through.
struct PrefaceTimeout<T> {
    inner: T,
    deadline: Option<Pin<Box<Sleep>>>,
    matched: usize,
}

impl<T> PrefaceTimeout<T> {
    fn new(inner: T, timeout: Duration) -> Self {
        PrefaceTimeout {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
            matched: 0,
        }
    }

    /// Feeds newly read bytes to the preface matcher; true once settled.
    fn observe(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            if H2_PREFACE.get(self.matched) != Some(&b) {
                return true;
            }
            self.matched += 1;
            if self.matched == H2_PREFACE.len() {
                return true;
            }
        }
        false
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for PrefaceTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(deadline) = this.deadline.as_mut() else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        if deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no request within the header-read timeout",
            )));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let filled = buf.filled();
            let fresh = &filled[before..];
            // End of stream also settles it: there is nothing left to wait for.
            if fresh.is_empty() || this.observe(fresh) {
                this.deadline = None;
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for PrefaceTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn preface_matcher_settles_on_first_departure_or_full_preface() {
        let mut p = PrefaceTimeout::new((), Duration::from_secs(1));
        assert!(!p.observe(b"PRI * HT"));
        assert!(!p.observe(b"TP/2.0\r\n\r\nSM\r\n"));
        assert!(p.observe(b"\r\n"));
        let mut p = PrefaceTimeout::new((), Duration::from_secs(1));
        assert!(p.observe(b"GET / HTTP/1.1"));
        let mut p = PrefaceTimeout::new((), Duration::from_secs(1));
        assert!(!p.observe(b"P"));
        assert!(p.observe(b"U"));
    }
}
