//! A scripted OCI registry on 127.0.0.1 for tests of the upstream client and
//! the pull-through cache.
//!
//! It serves seeded blobs and manifests (GET/HEAD, single ranges, tag
//! lists with `n`/`last`/`Link`, referrers, `/v2/`), can demand Bearer
//! tokens from its own `/token` realm or Basic credentials, injects faults
//! (status with `Retry-After`, slow, stalled, truncated, corrupted or reset
//! bodies, endless or mis-announced bodies, delayed headers, redirects,
//! ignored ranges, a token realm under another authority) per path or digest and
//! optionally for the next N requests only, and records every request.
//!
//! It runs on its own thread with its own runtime (and its own clock), so it
//! works the same from sync tests and from `#[tokio::test]`, with or without
//! paused time. Every method is synchronous and cheap; `stop` and `restart`
//! wait briefly for the server thread to act.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use wharf::oci::Digest;

type Body = UnsyncBoxBody<Bytes, io::Error>;

/// The `service` parameter of the fake's Bearer challenges.
pub const SERVICE: &str = "fake-registry";

/// A fault injected into matching requests (see [`FakeUpstream::fault`]).
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status (and `Retry-After` when given) instead.
    Status {
        status: u16,
        retry_after: Option<String>,
    },
    /// Wait this long before sending the response headers.
    DelayHeaders(Duration),
    /// Send the body `chunk` bytes at a time, waiting `delay` before each
    /// chunk after the first.
    SlowBody { chunk: usize, delay: Duration },
    /// Announce the full `Content-Length`, send `after` bytes, then close
    /// the connection.
    Truncate { after: usize },
    /// Send `after` bytes, then reset the connection (TCP RST).
    Reset { after: usize },
    /// Send different bytes of the same length.
    WrongBytes,
    /// Answer ranged requests with 200 and the whole body.
    IgnoreRange,
    /// Redirect to `location` (a path on this server or an absolute URL).
    Redirect { status: u16, location: String },
    /// GET only: no `Content-Length`, the content's bytes, then zeros
    /// forever, 64 KiB at a time (each after the `SlowBody` delay, if any);
    /// HEAD still tells the true length.
    Endless,
    /// GET only: announce this `Content-Length` whatever the content's
    /// length, send the content, then nothing more on an open connection
    /// (HEAD still tells the true length).
    ContentLength(u64),
    /// GET only: no `Content-Length` (a chunked or close-delimited body).
    NoContentLength,
    /// HEAD only: announce this `Content-Length` whatever the content's
    /// length (a lying HEAD).
    HeadLength(u64),
    /// Send `after` bytes, then nothing until `release` is opened (the
    /// connection stays open).
    Hold { after: usize, release: Release },
}

/// Releases the bodies held by [`Fault::Hold`].
#[derive(Debug, Clone)]
pub struct Release(Arc<tokio::sync::watch::Sender<bool>>);

impl Release {
    pub fn new() -> Release {
        Release(Arc::new(tokio::sync::watch::Sender::new(false)))
    }

    /// Lets every held body (now and later) go on.
    pub fn open(&self) {
        self.0.send_replace(true);
    }

    async fn wait(&self) {
        let _ = self.0.subscribe().wait_for(|open| *open).await;
    }
}

impl Default for Release {
    fn default() -> Release {
        Release::new()
    }
}

impl Fault {
    /// A status with no `Retry-After`.
    pub fn status(status: u16) -> Fault {
        Fault::Status {
            status,
            retry_after: None,
        }
    }
    /// A status with a `Retry-After` value (seconds or an HTTP date).
    pub fn retry_after(status: u16, value: impl Into<String>) -> Fault {
        Fault::Status {
            status,
            retry_after: Some(value.into()),
        }
    }
    /// About `n` bytes per second, in tenths of a second.
    pub fn bytes_per_second(n: usize) -> Fault {
        Fault::SlowBody {
            chunk: (n / 10).max(1),
            delay: Duration::from_millis(100),
        }
    }
    /// Sends `after` bytes, then nothing for an hour (the connection stays
    /// open).
    pub fn stall_after(after: usize) -> Fault {
        Fault::SlowBody {
            chunk: after,
            delay: Duration::from_secs(3600),
        }
    }
    /// A 307 redirect.
    pub fn redirect(location: impl Into<String>) -> Fault {
        Fault::Redirect {
            status: 307,
            location: location.into(),
        }
    }
}

/// Which token fields the realm sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenField {
    Token,
    AccessToken,
    Both,
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub version: http::Version,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    /// Path and query, as sent.
    pub fn uri(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

#[derive(Debug, Clone)]
enum AuthMode {
    None,
    Basic { user: String, pass: String },
    Bearer { user: String, pass: String },
}

struct FaultRule {
    target: String,
    fault: Fault,
    remaining: Option<usize>,
}

#[derive(Default)]
struct Repo {
    blobs: HashSet<String>,
    /// digest → (media type, bytes)
    manifests: HashMap<String, (String, Bytes)>,
    tags: BTreeMap<String, String>,
}

struct State {
    addr: SocketAddr,
    /// `http` or `https`.
    scheme: &'static str,
    blobs: HashMap<String, Bytes>,
    repos: HashMap<String, Repo>,
    auth: AuthMode,
    anonymous_tokens: bool,
    token_expires_in: Option<u64>,
    token_issued_at: Option<Duration>,
    token_field: TokenField,
    /// token → granted scopes
    tokens: HashMap<String, Vec<String>>,
    next_token: u64,
    faults: Vec<FaultRule>,
    log: Vec<Recorded>,
    digest_header: bool,
    /// Host (and port) named in Bearer challenges' realm instead of this
    /// server's address.
    realm_authority: Option<String>,
}

enum Ctl {
    Stop(std::sync::mpsc::Sender<()>),
    Start(std::sync::mpsc::Sender<io::Result<()>>),
}

/// A running fake registry. Shut down on drop.
pub struct FakeUpstream {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    ctl: Option<mpsc::UnboundedSender<Ctl>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeUpstream {
    /// Starts an empty registry without auth on 127.0.0.1 and a free port
    /// (plain HTTP/1.1 and h2c).
    pub fn start() -> FakeUpstream {
        Self::launch(None)
    }

    /// Like [`start`](Self::start), over TLS with the given PEM certificate
    /// chain and key, offering HTTP/2 and HTTP/1.1 by ALPN.
    pub fn start_tls(cert: &Path, key: &Path) -> FakeUpstream {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(cert)
            .expect("read certificate")
            .collect::<Result<Vec<_>, _>>()
            .expect("parse certificate");
        let key = PrivateKeyDer::from_pem_file(key).expect("read key");
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("certificate and key");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Self::launch(Some(TlsAcceptor::from(Arc::new(config))))
    }

    fn launch(tls: Option<TlsAcceptor>) -> FakeUpstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake upstream");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State {
            addr,
            scheme: if tls.is_some() { "https" } else { "http" },
            blobs: HashMap::new(),
            repos: HashMap::new(),
            auth: AuthMode::None,
            anonymous_tokens: false,
            token_expires_in: Some(300),
            token_issued_at: Some(Duration::ZERO),
            token_field: TokenField::Both,
            tokens: HashMap::new(),
            next_token: 1,
            faults: Vec::new(),
            log: Vec::new(),
            digest_header: true,
            realm_authority: None,
        }));
        let (tx, rx) = mpsc::unbounded_channel();
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fake-upstream-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("fake upstream runtime");
                rt.block_on(serve(listener, addr, tls, st, rx));
            })
            .expect("spawn fake upstream thread");
        FakeUpstream {
            addr,
            state,
            ctl: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }
    /// `http://127.0.0.1:PORT` (`https://` with TLS).
    pub fn url(&self) -> String {
        format!("{}://{}", self.state().scheme, self.addr)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- content ----

    /// Stores a blob and links it into `repo`. Returns its digest.
    pub fn add_blob(&self, repo: &str, bytes: impl Into<Bytes>) -> Digest {
        let bytes = bytes.into();
        let digest = Digest::sha256_of(&bytes);
        let mut s = self.state();
        s.blobs.insert(digest.to_string(), bytes);
        s.repos
            .entry(repo.to_string())
            .or_default()
            .blobs
            .insert(digest.to_string());
        digest
    }

    /// Stores a manifest in `repo` (and points `tag` at it). Returns its
    /// digest.
    pub fn add_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        bytes: impl Into<Bytes>,
    ) -> Digest {
        let bytes = bytes.into();
        let digest = Digest::sha256_of(&bytes);
        let mut s = self.state();
        let r = s.repos.entry(repo.to_string()).or_default();
        r.manifests
            .insert(digest.to_string(), (media_type.to_string(), bytes));
        if let Some(tag) = tag {
            r.tags.insert(tag.to_string(), digest.to_string());
        }
        digest
    }

    /// Points `tag` at a manifest already in `repo`.
    pub fn set_tag(&self, repo: &str, tag: &str, digest: &Digest) {
        let mut s = self.state();
        s.repos
            .entry(repo.to_string())
            .or_default()
            .tags
            .insert(tag.to_string(), digest.to_string());
    }

    pub fn delete_tag(&self, repo: &str, tag: &str) {
        if let Some(r) = self.state().repos.get_mut(repo) {
            r.tags.remove(tag);
        }
    }

    /// Removes a manifest and the tags pointing at it.
    pub fn delete_manifest(&self, repo: &str, digest: &Digest) {
        if let Some(r) = self.state().repos.get_mut(repo) {
            r.manifests.remove(digest.as_str());
            r.tags.retain(|_, d| d != digest.as_str());
        }
    }

    /// Unlinks a blob from `repo` (other repositories keep it).
    pub fn delete_blob(&self, repo: &str, digest: &Digest) {
        if let Some(r) = self.state().repos.get_mut(repo) {
            r.blobs.remove(digest.as_str());
        }
    }

    /// Whether manifest responses carry `Docker-Content-Digest` (default
    /// yes).
    pub fn send_digest_header(&self, yes: bool) {
        self.state().digest_header = yes;
    }

    // ---- auth ----

    /// No authentication (the default).
    pub fn no_auth(&self) {
        self.state().auth = AuthMode::None;
    }

    /// Every `/v2/` request needs a Bearer token from `/token` on this
    /// server; the realm accepts Basic `user:pass` (and anonymous requests
    /// when [`allow_anonymous`](Self::allow_anonymous) is on).
    pub fn require_bearer(&self, user: &str, pass: &str) {
        self.state().auth = AuthMode::Bearer {
            user: user.into(),
            pass: pass.into(),
        };
    }

    /// Names `authority` (`host:port`) instead of this server's address in
    /// the realm of Bearer challenges, e.g. `localhost:PORT` for this same
    /// server under another host name, or another server.
    pub fn realm_authority(&self, authority: &str) {
        self.state().realm_authority = Some(authority.to_string());
    }

    /// Whether the token realm issues tokens to requests without
    /// credentials (default no).
    pub fn allow_anonymous(&self, yes: bool) {
        self.state().anonymous_tokens = yes;
    }

    /// Every `/v2/` request needs Basic `user:pass`.
    pub fn require_basic(&self, user: &str, pass: &str) {
        self.state().auth = AuthMode::Basic {
            user: user.into(),
            pass: pass.into(),
        };
    }

    /// `expires_in` of issued tokens (`None`: left out). Default 300.
    pub fn token_expires_in(&self, secs: Option<u64>) {
        self.state().token_expires_in = secs;
    }

    /// `issued_at` of issued tokens: `age` before now, or left out with
    /// `None`. Default: now.
    pub fn token_issued_at(&self, age: Option<Duration>) {
        self.state().token_issued_at = age;
    }

    /// Which of `token` / `access_token` the realm sends. Default both.
    pub fn token_field(&self, field: TokenField) {
        self.state().token_field = field;
    }

    /// Invalidates every token issued so far (the fake does not expire
    /// tokens by itself).
    pub fn revoke_tokens(&self) {
        self.state().tokens.clear();
    }

    // ---- faults ----

    /// Injects `fault` into every request whose path (without query) equals
    /// `target` or ends with it (a digest, `/manifests/latest`, ...); `"*"`
    /// matches everything. Faults of different kinds combine; a status or
    /// redirect fault answers in place of the content. A HEAD is answered
    /// by status, delay and redirect faults only (and uses up no other).
    pub fn fault(&self, target: &str, fault: Fault) {
        self.add_fault(target, fault, None);
    }

    /// Like [`fault`](Self::fault), for the next `times` matching requests
    /// only.
    pub fn fault_times(&self, target: &str, fault: Fault, times: usize) {
        self.add_fault(target, fault, Some(times));
    }

    fn add_fault(&self, target: &str, fault: Fault, remaining: Option<usize>) {
        self.state().faults.push(FaultRule {
            target: target.to_string(),
            fault,
            remaining,
        });
    }

    pub fn clear_faults(&self) {
        self.state().faults.clear();
    }

    // ---- observations ----

    /// Requests received with `method` (`"*"`: any) to `path`. A `path`
    /// with `?` is compared with the path and query, else with the path.
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.state()
            .log
            .iter()
            .filter(|r| method == "*" || r.method.eq_ignore_ascii_case(method))
            .filter(|r| {
                if path.contains('?') {
                    r.uri() == path
                } else {
                    r.path == path
                }
            })
            .count()
    }

    /// Every request received.
    pub fn total(&self) -> usize {
        self.state().log.len()
    }

    /// Requests to the token realm.
    pub fn token_requests(&self) -> usize {
        self.count("GET", "/token")
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state().log.clone()
    }

    /// The `Range` header (if any) of each GET of `path`, in order.
    pub fn ranges(&self, path: &str) -> Vec<Option<String>> {
        self.state()
            .log
            .iter()
            .filter(|r| r.path == path && r.method == "GET")
            .map(|r| r.header("range").map(str::to_string))
            .collect()
    }

    pub fn reset_counters(&self) {
        self.state().log.clear();
    }

    // ---- availability ----

    /// Closes the listener and every open connection: connections are
    /// refused until [`restart`](Self::restart).
    pub fn stop(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if let Some(ctl) = &self.ctl {
            let _ = ctl.send(Ctl::Stop(tx));
            let _ = rx.recv_timeout(Duration::from_secs(10));
        }
    }

    /// Listens again on the same port.
    pub fn restart(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if let Some(ctl) = &self.ctl {
            let _ = ctl.send(Ctl::Start(tx));
            rx.recv_timeout(Duration::from_secs(10))
                .expect("fake upstream thread answers")
                .expect("rebind the fake upstream's port");
        }
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        // Closing the channel ends the server loop.
        self.ctl.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---- server ----

/// A TCP stream that closes with RST instead of FIN once `reset` is set.
struct ResettableIo {
    inner: TcpStream,
    reset: Arc<AtomicBool>,
}

impl Drop for ResettableIo {
    fn drop(&mut self) {
        if self.reset.load(Ordering::SeqCst) {
            let _ = self.inner.set_zero_linger();
        }
    }
}

impl AsyncRead for ResettableIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn accept(listener: &Option<TcpListener>) -> io::Result<TcpStream> {
    match listener {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

async fn serve(
    listener: std::net::TcpListener,
    addr: SocketAddr,
    tls: Option<TlsAcceptor>,
    state: Arc<Mutex<State>>,
    mut ctl: mpsc::UnboundedReceiver<Ctl>,
) {
    let mut listener = Some(TcpListener::from_std(listener).expect("tokio listener"));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            cmd = ctl.recv() => match cmd {
                None => break,
                Some(Ctl::Stop(ack)) => {
                    listener = None;
                    conns.abort_all();
                    while conns.join_next().await.is_some() {}
                    let _ = ack.send(());
                }
                Some(Ctl::Start(ack)) => {
                    let r = match listener {
                        Some(_) => Ok(()),
                        None => TcpListener::bind(addr).await.map(|l| { listener = Some(l); }),
                    };
                    let _ = ack.send(r);
                }
            },
            accepted = accept(&listener) => {
                let Ok(stream) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let reset = Arc::new(AtomicBool::new(false));
                let io = ResettableIo { inner: stream, reset: reset.clone() };
                let state = state.clone();
                let tls = tls.clone();
                conns.spawn(async move {
                    match tls {
                        None => serve_io(io, state, reset).await,
                        Some(acceptor) => {
                            if let Ok(io) = acceptor.accept(io).await {
                                serve_io(io, state, reset).await;
                            }
                        }
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.abort_all();
}

/// Serves HTTP/1.1 and HTTP/2 on one connection.
async fn serve_io<I>(io: I, state: Arc<Mutex<State>>, reset: Arc<AtomicBool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let state = state.clone();
        let reset = reset.clone();
        async move { Ok::<_, Infallible>(handle(state, reset, req).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let _ = builder.serve_connection(TokioIo::new(io), svc).await;
}

fn full(b: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

fn oci_error(status: u16, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(full(body))
        .expect("response")
}

fn query_params(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let s = s.trim().trim_end_matches('=');
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = ALPHABET.iter().position(|&a| a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// `user:pass` of a Basic `Authorization` header.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let v = headers.get("authorization")?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(base64_decode(rest)?).ok()?;
    let (u, p) = decoded.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("authorization")?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim().to_string())
}

/// The repository a `/v2/<name>/...` path is about.
fn repo_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    for marker in ["/manifests/", "/blobs/", "/tags/list", "/referrers/"] {
        if let Some((name, _)) = rest.rsplit_once(marker) {
            return Some(name);
        }
    }
    None
}

fn grants(scopes: &[String], repo: &str) -> bool {
    scopes.iter().flat_map(|s| s.split(' ')).any(|s| {
        let mut parts = s.splitn(3, ':');
        parts.next() == Some("repository")
            && parts.next() == Some(repo)
            && parts
                .next()
                .is_some_and(|a| a.split(',').any(|a| a == "pull" || a == "*"))
    })
}

/// Applies the configured authentication. `Some(response)` rejects.
fn check_auth(s: &mut State, path: &str, headers: &HeaderMap) -> Option<Response<Body>> {
    let repo = repo_of(path);
    match s.auth.clone() {
        AuthMode::None => None,
        AuthMode::Basic { user, pass } => {
            if basic_credentials(headers) == Some((user, pass)) {
                return None;
            }
            let mut r = oci_error(401, "UNAUTHORIZED", "authentication required");
            r.headers_mut().insert(
                "www-authenticate",
                "Basic realm=\"fake\"".parse().expect("header"),
            );
            Some(r)
        }
        AuthMode::Bearer { .. } => {
            if let Some(t) = bearer_token(headers)
                && let Some(scopes) = s.tokens.get(&t)
            {
                match repo {
                    None => return None,
                    Some(repo) if grants(scopes, repo) => return None,
                    Some(_) => {}
                }
            }
            let authority = s
                .realm_authority
                .clone()
                .unwrap_or_else(|| s.addr.to_string());
            let mut challenge = format!(
                "Bearer realm=\"{}://{authority}/token\",service=\"{SERVICE}\"",
                s.scheme
            );
            if let Some(repo) = repo {
                challenge.push_str(&format!(",scope=\"repository:{repo}:pull\""));
            }
            let mut r = oci_error(401, "UNAUTHORIZED", "authentication required");
            r.headers_mut()
                .insert("www-authenticate", challenge.parse().expect("header"));
            Some(r)
        }
    }
}

fn token_endpoint(s: &mut State, query: Option<&str>, headers: &HeaderMap) -> Response<Body> {
    let AuthMode::Bearer { user, pass } = s.auth.clone() else {
        return oci_error(404, "NOT_FOUND", "no token realm");
    };
    let params = query_params(query);
    if !params.iter().any(|(k, v)| k == "service" && v == SERVICE) {
        return Response::builder()
            .status(400)
            .body(full(r#"{"details":"unknown service"}"#))
            .expect("response");
    }
    let authorized = match basic_credentials(headers) {
        Some(c) => c == (user, pass),
        None => headers.get("authorization").is_none() && s.anonymous_tokens,
    };
    if !authorized {
        return Response::builder()
            .status(401)
            .header("content-type", "application/json")
            .body(full(r#"{"details":"incorrect username or password"}"#))
            .expect("response");
    }
    let scopes: Vec<String> = params
        .into_iter()
        .filter(|(k, _)| k == "scope")
        .map(|(_, v)| v)
        .collect();
    let token = format!("tok-{}", s.next_token);
    s.next_token += 1;
    s.tokens.insert(token.clone(), scopes);
    let mut body = serde_json::Map::new();
    if matches!(s.token_field, TokenField::Token | TokenField::Both) {
        body.insert("token".into(), token.clone().into());
    }
    if matches!(s.token_field, TokenField::AccessToken | TokenField::Both) {
        body.insert("access_token".into(), token.into());
    }
    if let Some(e) = s.token_expires_in {
        body.insert("expires_in".into(), e.into());
    }
    if let Some(age) = s.token_issued_at {
        let at = SystemTime::now() - age;
        body.insert(
            "issued_at".into(),
            humantime::format_rfc3339_seconds(at).to_string().into(),
        );
    }
    Response::builder()
        .header("content-type", "application/json")
        .body(full(serde_json::Value::Object(body).to_string()))
        .expect("response")
}

/// The faults matching `path`, consuming one use of each. A HEAD neither
/// gets nor uses up faults of the body.
fn take_faults(s: &mut State, path: &str, head: bool) -> Vec<Fault> {
    let mut out = Vec::new();
    for rule in &mut s.faults {
        let matches = rule.target == "*" || path == rule.target || path.ends_with(&rule.target);
        if !matches || rule.remaining == Some(0) {
            continue;
        }
        let body_only = !matches!(
            rule.fault,
            Fault::Status { .. }
                | Fault::DelayHeaders(_)
                | Fault::Redirect { .. }
                | Fault::HeadLength(_)
        );
        if head && body_only {
            continue;
        }
        if let Some(n) = &mut rule.remaining {
            *n -= 1;
        }
        out.push(rule.fault.clone());
    }
    s.faults.retain(|r| r.remaining != Some(0));
    out
}

/// How the body of a content response is sent.
#[derive(Default, Clone)]
struct BodyPlan {
    chunk: Option<(usize, Duration)>,
    /// Stop after this many bytes: reset (true) or close (false).
    cut: Option<(usize, bool)>,
    wrong: bool,
    ignore_range: bool,
    endless: bool,
    content_length: Option<u64>,
    head_length: Option<u64>,
    no_length: bool,
    /// Hold after this many bytes until released.
    hold: Option<(usize, Release)>,
}

async fn handle(
    state: Arc<Mutex<State>>,
    reset: Arc<AtomicBool>,
    req: Request<Incoming>,
) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let headers = req.headers().clone();
    let (faults, early) = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.log.push(Recorded {
            version: req.version(),
            method: method.to_string(),
            path: path.clone(),
            query: query.clone(),
            headers: headers.clone(),
        });
        let rejected = if path == "/token" {
            None
        } else {
            check_auth(&mut s, &path, &headers)
        };
        match rejected {
            Some(r) => (Vec::new(), Some(r)),
            None => (take_faults(&mut s, &path, method == Method::HEAD), None),
        }
    };
    if let Some(r) = early {
        return r;
    }
    let mut plan = BodyPlan::default();
    for f in &faults {
        match f {
            Fault::DelayHeaders(d) => tokio::time::sleep(*d).await,
            Fault::SlowBody { chunk, delay } => plan.chunk = Some(((*chunk).max(1), *delay)),
            Fault::Truncate { after } => plan.cut = Some((*after, false)),
            Fault::Reset { after } => plan.cut = Some((*after, true)),
            Fault::WrongBytes => plan.wrong = true,
            Fault::IgnoreRange => plan.ignore_range = true,
            Fault::Endless => plan.endless = true,
            Fault::ContentLength(n) => plan.content_length = Some(*n),
            Fault::NoContentLength => plan.no_length = true,
            Fault::HeadLength(n) => plan.head_length = Some(*n),
            Fault::Hold { after, release } => plan.hold = Some((*after, release.clone())),
            Fault::Status { .. } | Fault::Redirect { .. } => {}
        }
    }
    for f in &faults {
        match f {
            Fault::Status {
                status,
                retry_after,
            } => {
                let code = match status {
                    429 => "TOOMANYREQUESTS",
                    401 => "UNAUTHORIZED",
                    403 => "DENIED",
                    404 => "NAME_UNKNOWN",
                    _ => "UNAVAILABLE",
                };
                let mut r = oci_error(*status, code, "injected fault");
                if let Some(v) = retry_after {
                    r.headers_mut()
                        .insert("retry-after", v.parse().expect("retry-after value"));
                }
                return r;
            }
            Fault::Redirect { status, location } => {
                return Response::builder()
                    .status(*status)
                    .header("location", location)
                    .body(empty())
                    .expect("response");
            }
            _ => {}
        }
    }
    if path == "/token" {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        return token_endpoint(&mut s, query.as_deref(), &headers);
    }
    route(
        &state,
        &method,
        &path,
        query.as_deref(),
        &headers,
        plan,
        reset,
    )
}

fn route(
    state: &Arc<Mutex<State>>,
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    plan: BodyPlan,
    reset: Arc<AtomicBool>,
) -> Response<Body> {
    let head = method == Method::HEAD;
    if method != Method::GET && !head {
        return oci_error(405, "UNSUPPORTED", "the fake upstream only reads");
    }
    if path == "/v2/" || path == "/v2" {
        return Response::builder()
            .header("content-type", "application/json")
            .body(full("{}"))
            .expect("response");
    }
    let s = state.lock().unwrap_or_else(|e| e.into_inner());
    let Some(rest) = path.strip_prefix("/v2/") else {
        return oci_error(404, "NOT_FOUND", "not found");
    };
    if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        let found = s
            .repos
            .get(name)
            .filter(|r| r.blobs.contains(digest))
            .and_then(|_| s.blobs.get(digest));
        let Some(data) = found.cloned() else {
            return oci_error(404, "BLOB_UNKNOWN", "blob unknown");
        };
        drop(s);
        return content(
            data,
            "application/octet-stream",
            Some(digest),
            head,
            headers,
            plan,
            reset,
        );
    }
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        let Some(repo) = s.repos.get(name) else {
            return oci_error(404, "NAME_UNKNOWN", "repository unknown");
        };
        let digest = if reference.contains(':') {
            reference.to_string()
        } else {
            match repo.tags.get(reference) {
                Some(d) => d.clone(),
                None => return oci_error(404, "MANIFEST_UNKNOWN", "tag unknown"),
            }
        };
        let Some((media_type, data)) = repo.manifests.get(&digest).cloned() else {
            return oci_error(404, "MANIFEST_UNKNOWN", "manifest unknown");
        };
        let digest_header = s.digest_header;
        drop(s);
        return content(
            data,
            &media_type,
            digest_header.then_some(digest.as_str()),
            head,
            headers,
            plan,
            reset,
        );
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        let Some(repo) = s.repos.get(name) else {
            return oci_error(404, "NAME_UNKNOWN", "repository unknown");
        };
        let params = query_params(query);
        let get = |k: &str| {
            params
                .iter()
                .find(|(pk, _)| pk == k)
                .map(|(_, v)| v.clone())
        };
        let n: Option<usize> = get("n").and_then(|n| n.parse().ok());
        let last = get("last");
        let after: Vec<&String> = repo
            .tags
            .keys()
            .filter(|t| last.as_ref().is_none_or(|l| t.as_str() > l.as_str()))
            .collect();
        let page: Vec<&String> = match n {
            Some(n) => after.iter().take(n).copied().collect(),
            None => after.clone(),
        };
        let more = page.len() < after.len();
        let body = serde_json::json!({"name": name, "tags": page}).to_string();
        let mut r = Response::builder().header("content-type", "application/json");
        if more && let (Some(n), Some(l)) = (n, page.last()) {
            r = r.header(
                "link",
                format!("</v2/{name}/tags/list?n={n}&last={l}>; rel=\"next\""),
            );
        }
        return r.body(full(body)).expect("response");
    }
    if let Some((name, subject)) = rest.rsplit_once("/referrers/") {
        let filter = query_params(query)
            .into_iter()
            .find(|(k, _)| k == "artifactType")
            .map(|(_, v)| v);
        let mut descriptors = Vec::new();
        if let Some(repo) = s.repos.get(name) {
            let mut digests: Vec<&String> = repo.manifests.keys().collect();
            digests.sort();
            for d in digests {
                let (media_type, bytes) = &repo.manifests[d];
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
                    continue;
                };
                if v["subject"]["digest"].as_str() != Some(subject) {
                    continue;
                }
                let artifact_type = v["artifactType"]
                    .as_str()
                    .or(v["config"]["mediaType"].as_str())
                    .unwrap_or_default()
                    .to_string();
                if filter.as_ref().is_some_and(|f| *f != artifact_type) {
                    continue;
                }
                let mut desc = serde_json::json!({
                    "mediaType": media_type,
                    "digest": d,
                    "size": bytes.len(),
                    "artifactType": artifact_type,
                });
                if v["annotations"].is_object() {
                    desc["annotations"] = v["annotations"].clone();
                }
                descriptors.push(desc);
            }
        }
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": descriptors,
        })
        .to_string();
        let mut r =
            Response::builder().header("content-type", "application/vnd.oci.image.index.v1+json");
        if filter.is_some() {
            r = r.header("oci-filters-applied", "artifactType");
        }
        return r.body(full(body)).expect("response");
    }
    oci_error(404, "NOT_FOUND", "not found")
}

/// A single `bytes=a-b` / `bytes=a-` / `bytes=-n` range resolved against
/// `len`: `Ok(None)` for no (or an unsupported) range, `Err` when
/// unsatisfiable.
fn parse_range(headers: &HeaderMap, len: usize) -> Result<Option<(usize, usize)>, ()> {
    let Some(v) = headers.get("range").and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let n: usize = b.parse().map_err(|_| ())?;
        if n == 0 || len == 0 {
            return Err(());
        }
        return Ok(Some((len.saturating_sub(n), len)));
    }
    let start: usize = a.parse().map_err(|_| ())?;
    let end = if b.is_empty() {
        len
    } else {
        (b.parse::<usize>().map_err(|_| ())? + 1).min(len)
    };
    if start >= len || end <= start {
        return Err(());
    }
    Ok(Some((start, end)))
}

fn content(
    data: Bytes,
    media_type: &str,
    digest: Option<&str>,
    head: bool,
    headers: &HeaderMap,
    plan: BodyPlan,
    reset: Arc<AtomicBool>,
) -> Response<Body> {
    let total = data.len();
    let data = if plan.wrong {
        Bytes::from(data.iter().map(|b| b ^ 0xff).collect::<Vec<u8>>())
    } else {
        data
    };
    let range = if plan.ignore_range {
        Ok(None)
    } else {
        parse_range(headers, total)
    };
    let mut r = Response::builder()
        .header("content-type", media_type)
        .header("accept-ranges", "bytes");
    if let Some(d) = digest {
        r = r.header("docker-content-digest", d);
    }
    let body = match range {
        Err(()) => {
            return Response::builder()
                .status(416)
                .header("content-range", format!("bytes */{total}"))
                .body(empty())
                .expect("response");
        }
        Ok(Some((start, end))) => {
            r = r.status(206).header(
                "content-range",
                format!("bytes {start}-{}/{total}", end - 1),
            );
            data.slice(start..end)
        }
        Ok(None) => data,
    };
    if head {
        r = r.header(
            "content-length",
            plan.head_length.unwrap_or(body.len() as u64),
        );
        return r.body(empty()).expect("response");
    }
    match plan.content_length {
        _ if plan.endless || plan.no_length => {}
        Some(n) => r = r.header("content-length", n),
        None => r = r.header("content-length", body.len()),
    }
    r.body(stream_body(body, plan, reset)).expect("response")
}

struct Sending {
    data: Bytes,
    pos: usize,
    plan: BodyPlan,
    reset: Arc<AtomicBool>,
    failed: bool,
}

/// Streams `data` per `plan` (never with a known length, so a cut body is
/// not caught by hyper before it reaches the wire).
fn stream_body(data: Bytes, plan: BodyPlan, reset: Arc<AtomicBool>) -> Body {
    let st = Sending {
        data,
        pos: 0,
        plan,
        reset,
        failed: false,
    };
    let s = futures::stream::unfold(st, |mut st| async move {
        if st.failed {
            return None;
        }
        if st.plan.content_length.is_some() && st.pos >= st.data.len() {
            // A body shorter than its announced length: the connection
            // stays open (ending it would keep hyper from sending even the
            // head).
            std::future::pending::<()>().await;
        }
        if st.plan.endless && st.pos >= st.data.len() {
            static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
            if let Some((_, delay)) = st.plan.chunk {
                tokio::time::sleep(delay).await;
            }
            st.pos += ZEROS.len();
            return Some((Ok(Frame::data(Bytes::from_static(&ZEROS))), st));
        }
        let limit = st
            .plan
            .cut
            .map_or(st.data.len(), |(k, _)| k.min(st.data.len()));
        if st.pos >= limit {
            let (_, is_reset) = st.plan.cut?;
            if st.pos >= st.data.len() {
                return None;
            }
            // Let the bytes sent so far reach the client, then break off.
            tokio::time::sleep(Duration::from_millis(50)).await;
            if is_reset {
                st.reset.store(true, Ordering::SeqCst);
            }
            st.failed = true;
            let e = io::Error::new(io::ErrorKind::ConnectionAborted, "injected cut");
            return Some((Err(e), st));
        }
        if let Some((after, release)) = &st.plan.hold
            && st.pos >= *after
        {
            release.wait().await;
        }
        let n = match st.plan.chunk {
            Some((chunk, delay)) => {
                if st.pos > 0 {
                    tokio::time::sleep(delay).await;
                }
                chunk
            }
            None => 64 * 1024,
        };
        let mut end = (st.pos + n).min(limit);
        if let Some((after, _)) = &st.plan.hold
            && st.pos < *after
        {
            end = end.min(*after);
        }
        let piece = st.data.slice(st.pos..end);
        st.pos = end;
        Some((Ok(Frame::data(piece)), st))
    });
    StreamBody::new(s).boxed_unsync()
}

/// A throwaway CA and a server certificate it signed for IP 127.0.0.1 (and
/// the name `localhost`), made
/// with the `openssl` tool (valid for a day).
pub struct TestPki {
    /// The CA certificate (PEM), to trust.
    pub ca: PathBuf,
    /// The server certificate (PEM).
    pub cert: PathBuf,
    /// The server key (PEM).
    pub key: PathBuf,
}

impl TestPki {
    pub fn generate(dir: &Path) -> TestPki {
        let openssl = super::require_tool("openssl");
        let run = |args: &[&str]| {
            let out = std::process::Command::new(&openssl)
                .current_dir(dir)
                .args(args)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run(&[
            &["req", "-x509"][..],
            &ec,
            &[
                "-subj",
                "/CN=wharf test CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "1",
            ],
        ]
        .concat());
        run(&[
            &["req"][..],
            &ec,
            &[
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                "key.pem",
                "-out",
                "server.csr",
            ],
        ]
        .concat());
        std::fs::write(
            dir.join("server.ext"),
            "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write extensions");
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "cert.pem",
            "-days",
            "1",
            "-extfile",
            "server.ext",
        ]);
        TestPki {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }
}
