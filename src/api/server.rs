//! The listener: HTTP/1.1 and HTTP/2 (h2c, or ALPN over rustls), header-read
//! timeout, request-body idle timeout, idle-connection close, a connection
//! limit, header size limit, and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper::service::service_fn;

use super::sendfile::SendfileStream;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::error::error_response;
use super::{App, Resp};
use crate::oci::ErrorCode;

/// Connection-level settings.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// A request head must arrive within this time; a connection with no
    /// request in flight for this long is closed (HTTP/1 keep-alive and
    /// HTTP/2 alike).
    pub header_read_timeout: Duration,
    pub max_header_size: usize,
    pub shutdown_timeout: Duration,
    /// How long a TLS handshake may take.
    pub tls_handshake_timeout: Duration,
    /// A request body that delivers no bytes for this long (while the
    /// handler waits for them) fails with a timed-out error.
    pub body_read_timeout: Duration,
    /// Connections served at once. See [`run`] for the ones beyond.
    pub max_connections: usize,
}

/// Connections beyond `max_connections` that are answered 503 at once;
/// beyond these, the listener stops accepting until a connection ends.
pub const REFUSING: usize = 64;
/// HTTP/2 connections are pinged this often, and closed when a ping goes
/// unanswered for [`H2_PING_TIMEOUT`] (a peer that vanished).
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

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

/// What an accepted connection gets: served, or answered 503.
enum Slot {
    Serve(OwnedSemaphorePermit),
    Refuse(OwnedSemaphorePermit),
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops
/// accepting and gives in-flight requests up to `shutdown_timeout`.
///
/// At most `max_connections` connections are served at once. One more is
/// still accepted and answered `503 Service Unavailable` (`Retry-After`,
/// code `TOOMANYREQUESTS`) on its first request, then closed, so that a
/// client learns the server is busy instead of failing in the middle of
/// a request; up to [`REFUSING`] such refusals run at once, each within
/// `header_read_timeout`. When those are taken too, the listener waits
/// for a connection to end before it accepts again (new clients wait in
/// the kernel's listen backlog). Connections already accepted are never
/// affected: the limit only decides what new ones get.
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
        .keep_alive_interval(Some(H2_PING_INTERVAL))
        .keep_alive_timeout(H2_PING_TIMEOUT)
        .max_header_list_size(opts.max_header_size as u32);
    let mut refuser = builder.clone();
    refuser.http1().keep_alive(false);
    let builder = Arc::new(builder);
    let refuser = Arc::new(refuser);
    let opts = Arc::new(opts);
    let stop = CancellationToken::new();
    let max = opts
        .max_connections
        .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    open_files_for(max);
    let served = Arc::new(Semaphore::new(max));
    let refusing = Arc::new(Semaphore::new(REFUSING));
    tokio::pin!(shutdown);
    loop {
        // A slot before the connection: when every slot is taken, stop
        // accepting rather than accept what cannot be answered.
        let slot = tokio::select! {
            biased;
            () = &mut shutdown => break,
            p = served.clone().acquire_owned() => Slot::Serve(p.expect("never closed")),
            p = refusing.clone().acquire_owned() => Slot::Refuse(p.expect("never closed")),
        };
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
        // A connection may have ended while this one was awaited.
        let slot = match slot {
            Slot::Refuse(p) => match served.clone().try_acquire_owned() {
                Ok(s) => Slot::Serve(s),
                Err(_) => Slot::Refuse(p),
            },
            s => s,
        };
        let _ = stream.set_nodelay(true);
        let accepted = Accepted {
            stream,
            peer,
            tls: tls.clone(),
            opts: opts.clone(),
        };
        match slot {
            Slot::Serve(permit) => {
                let (builder, app, stop) = (builder.clone(), app.clone(), stop.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    accepted
                        .run(|io, opts, peer| serve(builder, io, app, opts, stop, peer))
                        .await;
                });
            }
            Slot::Refuse(permit) => {
                tracing::debug!(%peer, max, "connection limit reached (server.max_connections); answering 503");
                let (refuser, stop) = (refuser.clone(), stop.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let limit = accepted.opts.header_read_timeout;
                    let refused = accepted.run(|io, _, peer| refuse(refuser, io, peer));
                    tokio::select! {
                        _ = tokio::time::timeout(limit, refused) => {}
                        () = stop.cancelled() => {}
                    }
                });
            }
        }
    }
    drop(listener);
    stop.cancel();
    tracing::info!("shutting down: no longer accepting; waiting for requests in flight");
    // Every connection holds a permit until it ends.
    let all_closed = async {
        let _ = served.acquire_many(max as u32).await;
        let _ = refusing.acquire_many(REFUSING as u32).await;
    };
    tokio::select! {
        () = all_closed => tracing::info!("all connections closed"),
        () = tokio::time::sleep(opts.shutdown_timeout) => {
            tracing::warn!(timeout = ?opts.shutdown_timeout, "shutdown deadline passed; closing remaining connections");
        }
    }
}

/// Open files a process serving `max` connections may need: a socket and
/// a file for each (an upload's staging file, a blob being read), the
/// refused ones, and room for the stores and the rest.
fn open_files_needed(max: usize) -> u64 {
    2 * max as u64 + REFUSING as u64 + 256
}

/// Raises the soft open-file limit to the hard one when it is too low for
/// `max` connections (as the Go runtime does at every start; the soft limit
/// is often 1024), and warns when even the hard limit is: past it, accepted
/// connections fail to open files.
fn open_files_for(max: usize) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let needed = open_files_needed(max);
    let limit = getrlimit(Resource::Nofile);
    let Some(current) = limit.current else {
        return; // unlimited
    };
    if current >= needed {
        return;
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    let now = match setrlimit(Resource::Nofile, raised) {
        Ok(()) => limit.maximum,
        Err(e) => {
            tracing::debug!(error = %e, "cannot raise the open-file limit");
            Some(current)
        }
    };
    if let Some(now) = now.filter(|&n| n < needed) {
        tracing::warn!(
            max_connections = max,
            open_file_limit = now,
            needed,
            "the open-file limit is too low for server.max_connections: lower it, or raise the limit (ulimit -n, LimitNOFILE=)"
        );
    }
}

/// An accepted TCP connection, before TLS and the protocol.
struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    opts: Arc<ServerOptions>,
}

impl Accepted {
    /// Completes the TLS handshake if any, then hands the stream (with the
    /// preface timeout) to `then`.
    async fn run<F, Fut>(self, then: F)
    where
        F: FnOnce(Box<dyn Io>, Arc<ServerOptions>, SocketAddr) -> Fut,
        Fut: Future<Output = ()>,
    {
        let Accepted {
            stream,
            peer,
            tls,
            opts,
        } = self;
        let timeout = opts.header_read_timeout;
        let stall = opts.body_read_timeout;
        match tls {
            None => {
                let io = PrefaceTimeout::new(SendfileStream::new(stream), timeout)
                    .with_write_stall(stall);
                then(Box::new(io), opts, peer).await;
            }
            Some(acceptor) => {
                let handshake = acceptor.accept(stream);
                let tls = match tokio::time::timeout(opts.tls_handshake_timeout, handshake).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return log_handshake(peer, &e.to_string()),
                    Err(_) => return log_handshake(peer, "timed out"),
                };
                let io = PrefaceTimeout::new(tls, timeout).with_write_stall(stall);
                then(Box::new(io), opts, peer).await;
            }
        }
    }
}

/// A connection's byte stream, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Serves one connection until it ends: closed gracefully at shutdown,
/// or once it has had no request in flight for `header_read_timeout`; a
/// connection still open after closing began is dropped once it has had
/// no request in flight for `header_read_timeout` more.
async fn serve(
    builder: Arc<auto::Builder<TokioExecutor>>,
    io: Box<dyn Io>,
    app: App,
    opts: Arc<ServerOptions>,
    stop: CancellationToken,
    peer: SocketAddr,
) {
    let activity = Activity::default();
    let body_timeout = opts.body_read_timeout;
    let service = {
        let activity = activity.clone();
        service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let in_flight = activity.begin();
            let app = app.clone();
            async move {
                let req = req.map(|b| IdleTimeout::new(b, body_timeout));
                let resp = app.handle(req).await?;
                // The request is in flight until its response body is
                // done with (sent, or dropped with the stream).
                Ok::<_, Infallible>(resp.map(|b| InFlightBody::boxed(b, in_flight)))
            }
        })
    };
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut closing = false;
    let ended = loop {
        tokio::select! {
            ended = conn.as_mut() => break ended,
            () = stop.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            () = activity.idle_for(opts.header_read_timeout), if !closing => {
                tracing::debug!(%peer, "closing an idle connection");
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            // A graceful close can wait on the peer: HTTP/2's GOAWAY
            // handshake waits for the ACK of a PING, which a peer may never
            // send (then only the keep-alive ping's timeout would end it,
            // after 30s + 20s). Once closing, a connection with no request
            // in flight for another `header_read_timeout` is dropped.
            () = activity.idle_for(opts.header_read_timeout), if closing => {
                tracing::debug!(%peer, "dropping a connection that did not close");
                break Ok(());
            }
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Answers a connection over the limit: its first request gets 503, then
/// the connection is closed (HTTP/1 without keep-alive, HTTP/2 by GOAWAY).
async fn refuse(builder: Arc<auto::Builder<TokioExecutor>>, io: Box<dyn Io>, peer: SocketAddr) {
    let asked = Arc::new(Notify::new());
    let service = {
        let asked = asked.clone();
        service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
            asked.notify_one();
            std::future::ready(Ok::<_, Infallible>(busy()))
        })
    };
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        () = asked.notified() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "refused connection ended with an error");
    }
}

/// The answer to a request on a connection over the limit.
fn busy() -> Resp {
    let mut r = error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::TooManyRequests,
        "the server is serving its maximum number of connections; retry later",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// Requests in flight on one connection.
#[derive(Clone, Default)]
struct Activity(Arc<watch::Sender<usize>>);

/// One request in flight, until dropped.
struct InFlight(Arc<watch::Sender<usize>>);

impl Activity {
    fn begin(&self) -> InFlight {
        self.0.send_modify(|n| *n += 1);
        InFlight(self.0.clone())
    }

    /// Resolves once no request has been in flight for `idle`.
    async fn idle_for(&self, idle: Duration) {
        let mut rx = self.0.subscribe();
        loop {
            if rx.wait_for(|n| *n == 0).await.is_err() {
                return std::future::pending().await;
            }
            // Any request starting (or ending) restarts the wait.
            if tokio::time::timeout(idle, rx.changed()).await.is_err() {
                return;
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// A response body that keeps its request counted as in flight.
struct InFlightBody {
    inner: super::Body,
    _in_flight: InFlight,
}

impl InFlightBody {
    fn boxed(inner: super::Body, in_flight: InFlight) -> super::Body {
        InFlightBody {
            inner,
            _in_flight: in_flight,
        }
        .boxed_unsync()
    }
}

impl HttpBody for InFlightBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that fails once it has delivered no bytes for `timeout`
/// while being waited on. Every request body goes through it, whatever
/// reads it (uploads, manifests), so a client that stops sending mid-body
/// cannot hold its connection, its upload's file and its buffers forever:
/// the reader sees an error (an upload's partial chunk is cut away, as for
/// a dropped connection), the response says why, and an HTTP/1 connection
/// whose body was not read to its end is closed. Time spent while the
/// reader is busy (writing to storage) does not count.
pub(crate) struct IdleTimeout<B> {
    inner: B,
    timeout: Duration,
    /// Armed while a read is waiting; `None` until the first wait.
    timer: Option<Pin<Box<Sleep>>>,
    waiting: bool,
}

impl<B> IdleTimeout<B> {
    pub(crate) fn new(inner: B, timeout: Duration) -> Self {
        IdleTimeout {
            inner,
            timeout,
            timer: None,
            waiting: false,
        }
    }
}

impl<B> HttpBody for IdleTimeout<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.waiting = false;
            return Poll::Ready(frame.map(|f| f.map_err(io::Error::other)));
        }
        let deadline = tokio::time::Instant::now() + this.timeout;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !this.waiting {
            timer.as_mut().reset(deadline);
            this.waiting = true;
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no request body bytes for {:?} (server.body_read_timeout)",
                    this.timeout
                ),
            )))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
/// protocol is known, reads pass straight through. Writes that make no
/// progress for the write-stall time (a client that stopped reading a
/// response: its receive window stays full) fail, which closes the
/// connection and frees what the response held.
struct PrefaceTimeout<T> {
    inner: T,
    deadline: Option<Pin<Box<Sleep>>>,
    matched: usize,
    write_stall: Option<Duration>,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> PrefaceTimeout<T> {
    fn new(inner: T, timeout: Duration) -> Self {
        PrefaceTimeout {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
            matched: 0,
            write_stall: None,
            stalled: None,
        }
    }

    /// Fails writes that make no progress for `limit`.
    fn with_write_stall(mut self, limit: Duration) -> Self {
        self.write_stall = Some(limit);
        self
    }

    /// Passes a write's outcome on; a write pending for longer than the
    /// write-stall time becomes an error.
    fn progress<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        let Some(limit) = self.write_stall else {
            return r;
        };
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {limit:?} (server.body_read_timeout)"),
            )));
        }
        Poll::Pending
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
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.progress(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.progress(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.progress(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;
    use tokio::sync::mpsc;

    /// A request body fed by hand: `Some(bytes)` sends a chunk.
    fn channel_body() -> (
        mpsc::Sender<Bytes>,
        IdleTimeout<impl HttpBody<Data = Bytes, Error = io::Error> + Unpin>,
    ) {
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, io::Error>(Frame::data(b)), rx))
        });
        let body = StreamBody::new(Box::pin(stream));
        (tx, IdleTimeout::new(body, Duration::from_secs(10)))
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_fails_after_the_idle_timeout_without_bytes_and_not_before() {
        let (tx, mut body) = channel_body();
        let start = tokio::time::Instant::now();
        // Bytes arriving more often than the timeout keep it alive, however
        // long the body takes in all (the reader waits on each of them).
        let sender = tokio::spawn(async move {
            for i in 0..5u8 {
                tokio::time::sleep(Duration::from_secs(9)).await;
                tx.send(Bytes::from(vec![i])).await.unwrap();
            }
            tx
        });
        for i in 0..5u8 {
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), Bytes::from(vec![i]));
        }
        let tx = sender.await.unwrap();
        assert!(start.elapsed() >= Duration::from_secs(45));
        // Then the client stops sending: the read fails once 10s pass.
        let stalled = tokio::time::Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(stalled.elapsed(), Duration::from_secs(10));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_reader_spends_elsewhere_does_not_count() {
        let (tx, mut body) = channel_body();
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        body.frame().await.unwrap().unwrap();
        // The reader is busy (writing to storage) for longer than the
        // timeout; the next chunk is already there when it asks.
        tokio::time::advance(Duration::from_secs(30)).await;
        tx.send(Bytes::from_static(b"b")).await.unwrap();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"b"));
        // An ended body ends.
        drop(tx);
        assert!(body.frame().await.is_none());
    }

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
