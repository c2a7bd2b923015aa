//! The server as an operator runs it: the real `wharf` binary, driven over
//! raw TCP, hyper and curl.
//!
//! * request heads over `server.max_header_size` get 431 and store nothing;
//! * clients that are slow to send their request head are disconnected after
//!   `server.header_read_timeout`, while everyone else is served;
//! * request bodies that stall are cut off after `server.body_read_timeout`
//!   (the upload session keeps only its complete chunks); connections beyond
//!   `server.max_connections` are answered 503 while the accepted ones
//!   complete; idle HTTP/2 connections are closed; a stalled upload holds no
//!   preallocated write buffer;
//! * SIGTERM lets requests in flight finish, refuses new connections, is not
//!   held up by idle connections, and gives up after `server.shutdown_timeout`;
//!   the process exits 0;
//! * TLS (HTTP/2 and HTTP/1.1 by ALPN) and cleartext HTTP/2 (h2c);
//! * configuration errors stop `serve` and `check-config` with the key path;
//!   environment overrides are validated and applied;
//! * `fsck` finds and quarantines corrupt blobs, which are then not served;
//! * upload sessions survive a SIGKILL and are purged once abandoned.

mod common;

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::http::{HttpClient, Method, StatusCode};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Upper bound for anything that should take a second or two; generous so a
/// loaded machine does not make the tests flaky.
const PATIENCE: Duration = Duration::from_secs(20);
const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (splitmix64).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `DIR/wharf.toml` listening on a free port with its data in
/// `DIR/data`. `server_extra` goes into `[server]` (it may open
/// `[server.tls]`), `storage_extra` into `[storage]`.
fn write_config(dir: &Path, server_extra: &str, storage_extra: &str) -> PathBuf {
    let config = dir.join("wharf.toml");
    let data = dir.join("data");
    std::fs::write(
        &config,
        format!(
            "[storage]\ntype = \"filesystem\"\npath = {:?}\n{storage_extra}\n\n\
             [server]\nlisten = \"127.0.0.1:0\"\n{server_extra}\n",
            data.display().to_string()
        ),
    )
    .expect("write config");
    config
}

/// A `wharf` command whose environment carries no `WHARF_*` configuration
/// from the caller (only what the test sets), and quiet logs.
use common::wharf_cmd;

/// Runs a command to completion, killing it and failing the test if it takes
/// longer than `limit` (a `serve` that should have refused to start must not
/// hang the suite).
fn run_cmd(cmd: &mut Command, limit: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {limit:?}; stderr: {}",
                String::from_utf8_lossy(&err.join().unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A `wharf serve` process over a directory the test owns (so it can be
/// restarted over the same data). Killed on drop.
struct Server {
    child: Child,
    /// As printed on stdout: `http://ADDR` or `https://ADDR`.
    url: String,
    addr: SocketAddr,
}

impl Server {
    fn start(config: &Path) -> Server {
        Server::start_env(config, &[])
    }

    fn start_env(config: &Path, env: &[(&str, &str)]) -> Server {
        let (child, url) = common::start_url(config, env);
        let addr = url
            .split_once("://")
            .map(|(_, a)| a)
            .unwrap_or(&url)
            .parse()
            .unwrap_or_else(|e| panic!("address in {url:?}: {e}"));
        Server { child, url, addr }
    }

    fn client(&self) -> HttpClient {
        HttpClient::new(format!("http://{}", self.addr))
    }

    fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -TERM failed");
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (without blocking the runtime) for the process to exit.
    async fn exited_within(&mut self, limit: Duration) -> ExitStatus {
        common::exited_within(&mut self.child, limit).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Upload sessions staged on disk: `(id, staged bytes)`.
fn staged_uploads(data: &Path) -> Vec<(String, u64)> {
    let Ok(entries) = std::fs::read_dir(data.join("uploads")) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .map(|e| {
            let size = std::fs::metadata(e.path().join("data"))
                .map(|m| m.len())
                .unwrap_or(0);
            (e.file_name().to_string_lossy().into_owned(), size)
        })
        .collect()
}

/// Polls `cond` every 20 ms until it holds, failing after `limit`.
async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The on-disk path of a published blob.
fn blob_path(data: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    data.join("blobs").join("sha256").join(&hex[..2]).join(hex)
}

/// Starts an upload session; returns its Location (a path) and id.
async fn start_upload(client: &HttpClient, repo: &str) -> (String, String) {
    let r = client
        .send(
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "start upload: {r:?}");
    let loc = r.header("location").expect("Location").to_string();
    let id = loc
        .split('?')
        .next()
        .and_then(|p| p.rsplit('/').next())
        .expect("upload id")
        .to_string();
    (loc, id)
}

fn with_query(loc: &str, q: &str) -> String {
    let sep = if loc.contains('?') { '&' } else { '?' };
    format!("{loc}{sep}{q}")
}

/// GETs a blob and checks it is exactly `expected`.
async fn assert_blob(client: &HttpClient, repo: &str, expected: &[u8]) {
    let digest = common::sha256(expected);
    let r = client.get(&format!("/v2/{repo}/blobs/{digest}")).await;
    assert_eq!(r.status, StatusCode::OK, "GET {digest}: {r:?}");
    assert_eq!(r.body.len(), expected.len(), "length of {digest}");
    assert_eq!(common::sha256(&r.body), digest, "content of {digest}");
}

/// A hand-driven HTTP/1.1 connection, for requests whose timing matters.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

#[derive(Debug)]
struct RawResp {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl RawResp {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Sends `data` as HTTP/1.1 chunks of 64 KiB.
    async fn send_chunked(&mut self, data: &[u8]) -> std::io::Result<()> {
        for part in data.chunks(64 * 1024) {
            let mut frame = format!("{:x}\r\n", part.len()).into_bytes();
            frame.extend_from_slice(part);
            frame.extend_from_slice(b"\r\n");
            self.send(&frame).await?;
        }
        Ok(())
    }

    /// Reads one response (its body by Content-Length).
    async fn response(&mut self) -> std::io::Result<RawResp> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = text(&self.buf[..end]);
                let status = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
                let mut resp = RawResp {
                    status,
                    head,
                    body: Vec::new(),
                };
                let len: usize = resp
                    .header("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let start = end + 4;
                while self.buf.len() < start + len {
                    self.fill().await?;
                }
                resp.body = self.buf[start..start + len].to_vec();
                self.buf.drain(..start + len);
                return Ok(resp);
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Waits for the server to close the connection. `Some(bytes received
    /// before the close)`, or `None` if it is still open after `limit`.
    async fn closed_within(&mut self, limit: Duration) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut got = std::mem::take(&mut self.buf);
        loop {
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
                Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

fn curl() -> PathBuf {
    common::require_tool("curl")
}

/// Runs curl with `-sS` and the given arguments; returns stdout (the `-w`
/// output). Fails the test if curl itself fails.
fn run_curl(args: &[&str]) -> String {
    let out = run_cmd(
        Command::new(curl()).arg("-sS").args(args),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "curl {} failed: {}",
        shorten(args),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Arguments for messages, long ones (header padding) cut short.
fn shorten(args: &[&str]) -> String {
    args.iter()
        .map(|a| match a.char_indices().nth(120) {
            Some((i, _)) => format!("{}...", &a[..i]),
            None => a.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A self-signed P-256 certificate for IP 127.0.0.1: `(cert.pem, key.pem)`.
fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let openssl = common::require_tool("openssl");
    let out = run_cmd(
        Command::new(openssl).current_dir(dir).args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
            "-days",
            "1",
        ]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "openssl: {}", text(&out.stderr));
    (dir.join("cert.pem"), dir.join("key.pem"))
}

fn tls_section(cert: &Path, key: &Path) -> String {
    format!(
        "[server.tls]\ncert = {:?}\nkey = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    )
}

// ---------------------------------------------------------------------------
// Request head limits
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_head_over_max_header_size_gets_431_and_stores_nothing() {
    let w = common::spawn_wharf_with("max_header_size = \"16KiB\"", "");
    let client = HttpClient::new(w.url());
    let repo = "limits/big-head";
    let blob = random_bytes(64 * 1024, 1);
    let digest = common::sha256(&blob);
    let padding = "a".repeat(20 * 1024);
    // The repository exists, so a 404 below is about the blob.
    client.push_blob(repo, b"anchor").await;

    // HTTP/1.1: a complete blob upload whose head carries 20 KiB of padding.
    let mut raw = Raw::connect(w.addr).await;
    let head = format!(
        "POST /v2/{repo}/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: {}\r\n\
         X-Padding: {padding}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {}\r\n\r\n",
        w.host(),
        blob.len()
    );
    raw.send(head.as_bytes()).await.expect("send head");
    let resp = tokio::time::timeout(PATIENCE, raw.response())
        .await
        .expect("no response to an oversized head")
        .expect("response to an oversized head");
    assert_eq!(resp.status, 431, "{resp:?}");
    // The body is never read as a request: sending it is at most refused.
    let _ = raw.send(&blob).await;
    assert!(
        raw.closed_within(PATIENCE).await.is_some(),
        "connection left open after 431"
    );

    // HTTP/2 (h2c): an oversized head gets 431 too. (With a request body,
    // h2 also resets the stream: the client exceeded the advertised
    // SETTINGS_MAX_HEADER_LIST_SIZE. Whatever curl makes of that, nothing
    // may be stored.)
    let dir = tempfile::tempdir().expect("tempdir");
    let resp_file = dir.path().join("resp");
    let resp_file = resp_file.to_str().expect("utf-8 path");
    let padding_header = format!("X-Padding: {padding}");
    let out = run_curl(&[
        "--http2-prior-knowledge",
        "-o",
        resp_file,
        "-w",
        "%{http_code} %{http_version}",
        "-H",
        &padding_header,
        &format!("{}/v2/", w.url()),
    ]);
    assert_eq!(out, "431 2", "h2c oversized head");
    let body_file = dir.path().join("blob");
    std::fs::write(&body_file, &blob).expect("write blob file");
    let _ = run_cmd(
        Command::new(curl()).args([
            "-sS",
            "--http2-prior-knowledge",
            "-o",
            resp_file,
            "-H",
            &padding_header,
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &format!("@{}", body_file.display()),
            &format!("{}/v2/{repo}/blobs/uploads/?digest={digest}", w.url()),
        ]),
        Duration::from_secs(60),
    );

    // Nothing was stored: no blob, no upload session.
    let r = client.head(&format!("/v2/{repo}/blobs/{digest}")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{r:?}");
    assert!(!blob_path(&w.data_dir(), &digest).exists());
    assert_eq!(staged_uploads(&w.data_dir()), Vec::new());

    // New connections are served normally, heads just under the limit too.
    let r = client
        .send(
            Method::GET,
            "/v2/",
            &[("x-padding", &"b".repeat(12 * 1024))],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "12 KiB head under a 16 KiB limit");
    client.push_blob(repo, &blob).await;
    assert_blob(&client, repo, &blob).await;
}

// ---------------------------------------------------------------------------
// Slow clients
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_heads_are_cut_off_while_other_clients_are_served() {
    let w = common::spawn_wharf_with("header_read_timeout = \"1s\"", "");
    let client = HttpClient::new(w.url());
    let started = Instant::now();

    // One client sends half a head and stalls.
    let mut stalled = Raw::connect(w.addr).await;
    stalled
        .send(format!("GET /v2/ HTTP/1.1\r\nHost: {}\r\nX-Slow: ", w.host()).as_bytes())
        .await
        .expect("send partial head");

    // Another keeps trickling header bytes, one every 200 ms, forever.
    let trickler = TcpStream::connect(w.addr).await.expect("connect");
    let (mut trickle_rd, mut trickle_wr) = trickler.into_split();
    let host = w.host();
    let writer = tokio::spawn(async move {
        let head = format!("PUT /v2/slow/manifests/latest HTTP/1.1\r\nHost: {host}\r\nX-Slow: ");
        if trickle_wr.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if trickle_wr.write_all(b"a").await.is_err() {
                return;
            }
        }
    });

    // Everyone else is served meanwhile.
    for _ in 0..5 {
        let r = client.get("/v2/").await;
        assert_eq!(r.status, StatusCode::OK);
        let r = client.get("/healthz").await;
        assert_eq!(r.status, StatusCode::OK);
    }

    // "Cut off" means within a few seconds of the 1s timeout.
    let cut_off = Duration::from_secs(10);
    let got = stalled
        .closed_within(cut_off)
        .await
        .expect("a stalled request head was never cut off");
    let stalled_after = started.elapsed();
    let mut trickle_got = Vec::new();
    let trickle_closed = tokio::time::timeout(cut_off, trickle_rd.read_to_end(&mut trickle_got))
        .await
        .is_ok();
    let trickle_after = started.elapsed();
    writer.abort();
    assert!(trickle_closed, "a trickled request head was never cut off");
    for (what, got, after) in [
        ("stalled", got, stalled_after),
        ("trickled", trickle_got, trickle_after),
    ] {
        assert!(
            got.is_empty() || text(&got).starts_with("HTTP/1.1 408"),
            "{what} head: expected a close or 408, got {:?}",
            text(&got)
        );
        assert!(
            after >= Duration::from_millis(900),
            "{what} head cut off after {after:?}, before the 1s timeout"
        );
    }

    // And the server is still fine.
    let r = client.get("/v2/").await;
    assert_eq!(r.status, StatusCode::OK);
}

/// A client that connects and sends nothing (or only the beginning of the
/// HTTP/2 preface) has not sent its request head within
/// `header_read_timeout` either; it must not hold a connection forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_that_sends_nothing_is_closed_after_header_read_timeout() {
    let w = common::spawn_wharf_with("header_read_timeout = \"1s\"", "");
    let mut silent = Raw::connect(w.addr).await;
    let mut preface = Raw::connect(w.addr).await;
    preface.send(b"PRI * HTTP/2.0\r\n").await.expect("send");
    let silent_closed = silent.closed_within(Duration::from_secs(8)).await.is_some();
    let preface_closed = preface
        .closed_within(Duration::from_secs(2))
        .await
        .is_some();
    assert!(
        silent_closed,
        "a connection that sent no bytes was still open 8s after connecting (header_read_timeout = 1s)"
    );
    assert!(
        preface_closed,
        "a connection that sent half the HTTP/2 preface was still open 10s later (header_read_timeout = 1s)"
    );
}

// ---------------------------------------------------------------------------
// Stalled bodies, the connection limit, idle HTTP/2 connections
// ---------------------------------------------------------------------------

/// Sends a request head whose body is `len` bytes long.
fn head_with_body(method: &str, path: &str, host: &str, len: usize, extra: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {len}\r\n{extra}\r\n"
    )
    .into_bytes()
}

/// A client that stops sending in the middle of a request body (a chunk of
/// an upload, a monolithic upload, a manifest) is cut off once
/// `body_read_timeout` passes without a byte, instead of holding its
/// connection, its staging file and its buffers forever. The upload session
/// it was writing keeps only its complete chunks and takes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_is_cut_off_and_its_upload_session_stays_usable() {
    let w = common::spawn_wharf_with("body_read_timeout = \"1s\"", "");
    let client = HttpClient::new(w.url());
    let host = w.host();
    let repo = "stall/blob";
    let blob = random_bytes(3 * MIB + 1000, 21);
    let digest = common::sha256(&blob);
    let (loc, id) = start_upload(&client, repo).await;

    // A first chunk is accepted whole.
    let first = 1000;
    let r = client
        .send(
            Method::PATCH,
            &loc,
            &[
                ("content-type", "application/octet-stream"),
                ("content-range", &format!("0-{}", first - 1)),
            ],
            Bytes::copy_from_slice(&blob[..first]),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");

    // The second announces the rest, sends 2 MiB of it and stalls.
    let rest = blob.len() - first;
    let mut stalled = Raw::connect(w.addr).await;
    let range = format!("Content-Range: {first}-{}\r\n", blob.len() - 1);
    stalled
        .send(&head_with_body("PATCH", &loc, &host, rest, &range))
        .await
        .expect("send head");
    stalled
        .send(&blob[first..first + 2 * MIB])
        .await
        .expect("send part of the body");
    // Its bytes are being staged (so there is a partial chunk to take back).
    let data = w.data_dir();
    wait_until("the partial chunk to reach staging", PATIENCE, || {
        staged_uploads(&data)
            .iter()
            .any(|(i, size)| i == &id && *size > first as u64)
    })
    .await;

    // A monolithic upload and a manifest stall too.
    let mut monolithic = Raw::connect(w.addr).await;
    let path = format!("/v2/{repo}/blobs/uploads/?digest={digest}");
    monolithic
        .send(&head_with_body("POST", &path, &host, blob.len(), ""))
        .await
        .expect("send head");
    monolithic.send(&blob[..4096]).await.expect("send");
    let mut manifest = Raw::connect(w.addr).await;
    let ct = "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n";
    let head = format!(
        "PUT /v2/{repo}/manifests/v1 HTTP/1.1\r\nHost: {host}\r\n{ct}Content-Length: 2000\r\n\r\n{{\"schemaVersion\":"
    );
    manifest.send(head.as_bytes()).await.expect("send");

    // Each is answered with an error (or just closed), and closed.
    let cut_off = Duration::from_secs(10);
    for (what, raw) in [
        ("chunk", &mut stalled),
        ("monolithic upload", &mut monolithic),
        ("manifest", &mut manifest),
    ] {
        let got = raw
            .closed_within(cut_off)
            .await
            .unwrap_or_else(|| panic!("a stalled {what} body was still open {cut_off:?} later"));
        let got = text(&got);
        assert!(
            got.is_empty() || got.starts_with("HTTP/1.1 4"),
            "stalled {what}: expected a 4xx or a close, got {got:?}"
        );
    }

    // The session holds exactly its first chunk, on disk and by its status.
    let staged: Vec<_> = staged_uploads(&data)
        .into_iter()
        .filter(|(i, _)| i == &id)
        .collect();
    assert_eq!(
        staged,
        vec![(id.clone(), first as u64)],
        "staged after the cut-off"
    );
    let r = client.get(&loc).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    assert_eq!(r.header("range"), Some(format!("0-{}", first - 1).as_str()));
    // And it completes.
    let r = client
        .send(
            Method::PATCH,
            &loc,
            &[
                ("content-type", "application/octet-stream"),
                ("content-range", &format!("{first}-{}", blob.len() - 1)),
            ],
            Bytes::copy_from_slice(&blob[first..]),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    let r = client
        .send(
            Method::PUT,
            &with_query(&loc, &format!("digest={digest}")),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_blob(&client, repo, &blob).await;
    // Nothing of the stalled manifest was stored.
    let r = client.get(&format!("/v2/{repo}/manifests/v1")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{r:?}");
}

/// With `max_connections = 2`, a third connection is answered 503 with
/// `Retry-After` and closed, while the two accepted ones, each in the
/// middle of an upload, finish it; once they are gone, new connections are
/// served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_max_connections_get_503_while_accepted_ones_complete() {
    let w = common::spawn_wharf_with("max_connections = 2", "");
    let host = w.host();
    let blobs = [random_bytes(MIB + 3, 31), random_bytes(MIB + 5, 32)];

    // Two connections, each served (a session started) and mid-chunk.
    let mut accepted = Vec::new();
    for (i, blob) in blobs.iter().enumerate() {
        let mut raw = Raw::connect(w.addr).await;
        let repo = format!("limit/b{i}");
        raw.send(&head_with_body(
            "POST",
            &format!("/v2/{repo}/blobs/uploads/"),
            &host,
            0,
            "",
        ))
        .await
        .expect("send");
        let r = raw.response().await.expect("start upload");
        assert_eq!(r.status, 202, "{r:?}");
        let loc = r.header("location").expect("Location").to_string();
        raw.send(&head_with_body("PATCH", &loc, &host, blob.len(), ""))
            .await
            .expect("send head");
        raw.send(&blob[..blob.len() / 2]).await.expect("send");
        accepted.push((raw, repo, loc));
    }

    // A third is refused cleanly: a 503 in the spec's format, then a close.
    let mut third = Raw::connect(w.addr).await;
    third
        .send(format!("GET /v2/ HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let r = third
        .response()
        .await
        .expect("a response to the third connection");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("retry-after"), Some("1"), "{r:?}");
    assert!(text(&r.body).contains("TOOMANYREQUESTS"), "{r:?}");
    assert!(
        third.closed_within(PATIENCE).await.is_some(),
        "the refused connection was left open"
    );

    // The accepted two finish their uploads on their own connections.
    for ((raw, repo, loc), blob) in accepted.iter_mut().zip(&blobs) {
        raw.send(&blob[blob.len() / 2..])
            .await
            .expect("send the rest");
        let r = raw.response().await.expect("PATCH response");
        assert_eq!(r.status, 202, "{r:?}");
        let put = with_query(loc, &format!("digest={}", common::sha256(blob)));
        raw.send(
            format!("PUT {put} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n").as_bytes(),
        )
        .await
        .expect("send PUT");
        let r = raw.response().await.expect("PUT response");
        assert_eq!(r.status, 201, "{r:?}");
        let _ = repo;
    }
    drop(accepted);

    // Their slots come back: new connections are served (each blob intact).
    let client = HttpClient::new(w.url());
    let mut served = false;
    let deadline = Instant::now() + PATIENCE;
    while !served && Instant::now() < deadline {
        served = client.get("/v2/").await.status == StatusCode::OK;
        if !served {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(
        served,
        "no connection was served after the accepted ones closed"
    );
    for (i, blob) in blobs.iter().enumerate() {
        assert_blob(&client, &format!("limit/b{i}"), blob).await;
    }
}

/// Sockets the process `pid` holds open (its listener and connections).
fn open_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|l| l.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

/// Sends the second half of `blob` on a connection whose PATCH of it is in
/// flight, then commits it there.
async fn finish_upload((raw, loc): &mut (Raw, String), blob: &[u8], host: &str) {
    raw.send(&blob[blob.len() / 2..])
        .await
        .expect("send the rest");
    let r = raw.response().await.expect("PATCH response");
    assert_eq!(r.status, 202, "{r:?}");
    let put = with_query(loc, &format!("digest={}", common::sha256(blob)));
    raw.send(format!("PUT {put} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n").as_bytes())
        .await
        .expect("send PUT");
    let r = raw.response().await.expect("PUT response");
    assert_eq!(r.status, 201, "{r:?}");
}

/// A flood of connections far beyond `max_connections` cannot make the
/// server hold more than the served ones plus the 64 it answers or times
/// out at once (the rest wait in the listen backlog, and are shed in
/// turn), and the connections it serves finish their uploads meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_holds_a_bounded_number_of_sockets() {
    const REFUSING: usize = 64;
    let w = common::spawn_wharf_with("max_connections = 2\nheader_read_timeout = \"1s\"", "");
    let pid = w.child.id();
    // The listener and the runtime's own (signal handling).
    let idle = open_sockets(pid);
    let host = w.host();
    let blobs = [random_bytes(MIB + 7, 51), random_bytes(MIB + 9, 52)];
    let mut busy = Vec::new();
    for (i, blob) in blobs.iter().enumerate() {
        let mut raw = Raw::connect(w.addr).await;
        let path = format!("/v2/flood/b{i}/blobs/uploads/");
        raw.send(&head_with_body("POST", &path, &host, 0, ""))
            .await
            .expect("send");
        let r = raw.response().await.expect("start upload");
        assert_eq!(r.status, 202, "{r:?}");
        let loc = r.header("location").expect("Location").to_string();
        raw.send(&head_with_body("PATCH", &loc, &host, blob.len(), ""))
            .await
            .expect("send head");
        raw.send(&blob[..blob.len() / 2]).await.expect("send");
        busy.push((raw, loc));
    }

    // 200 clients connect and send nothing.
    let mut flood = Vec::new();
    for _ in 0..200 {
        flood.push(TcpStream::connect(w.addr).await.expect("connect"));
    }
    let bound = idle + blobs.len() + REFUSING;
    wait_until("the server to take up its refusal slots", PATIENCE, || {
        open_sockets(pid) >= bound
    })
    .await;
    // A round trip on a served connection (the accept loop ran meanwhile),
    // then the count: never more than the bound.
    let (first, second) = busy.split_at_mut(1);
    finish_upload(&mut first[0], &blobs[0], &host).await;
    let held = open_sockets(pid);
    assert!(
        held <= bound,
        "the server holds {held} sockets with max_connections = 2 (at most {bound} expected, {idle} of them its own)"
    );

    // Every flooding connection is closed by the server in turn.
    let closes = flood.into_iter().map(|mut s| async move {
        let mut buf = [0u8; 1024];
        matches!(
            tokio::time::timeout(PATIENCE, s.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    });
    let closed = futures::future::join_all(closes).await;
    let open = closed.iter().filter(|c| !**c).count();
    assert_eq!(open, 0, "flooding connections never closed");

    // And the other served upload, in flight all along, completes.
    finish_upload(&mut second[0], &blobs[1], &host).await;
    drop(busy);
    let client = HttpClient::new(w.url());
    for (i, blob) in blobs.iter().enumerate() {
        assert_blob(&client, &format!("flood/b{i}"), blob).await;
    }
}

/// An HTTP/2 connection with no stream open is closed after
/// `header_read_timeout`, as an idle HTTP/1.1 one is; one whose request is
/// still in flight past that time is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_are_closed_and_busy_ones_are_not() {
    use http_body_util::{BodyExt as _, StreamBody};
    use hyper::body::Frame;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let w = common::spawn_wharf_with("header_read_timeout = \"1s\"", "");
    let client = HttpClient::new(w.url());
    let repo = "h2/idle";
    let (loc, _) = start_upload(&client, repo).await;

    let tcp = TcpStream::connect(w.addr).await.expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    let mut conn = tokio::spawn(conn);

    // A chunk trickled over 3 s (three idle timeouts): the connection stays
    // up while the request is in flight.
    let blob = random_bytes(30_000, 41);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let body = StreamBody::new(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(Frame::data(b)), rx))
    })))
    .boxed();
    let req = http::Request::builder()
        .method(Method::PATCH)
        .uri(format!("{}{loc}", w.url()))
        .header("content-type", "application/octet-stream")
        .header("content-length", blob.len())
        .body(body)
        .expect("request");
    let response = tokio::spawn(send.send_request(req));
    for part in blob.chunks(3_000) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.send(Bytes::copy_from_slice(part))
            .await
            .expect("send part");
    }
    drop(tx);
    let r = response.await.expect("join").expect("PATCH over h2");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let _ = r.into_body().collect().await;
    // Still open for new requests (no GOAWAY was sent meanwhile).
    send.ready().await.expect("connection still usable");
    let get = http::Request::builder()
        .uri(format!("{}/v2/", w.url()))
        .body(http_body_util::Empty::new().boxed())
        .expect("request");
    let r = send
        .send_request(get)
        .await
        .expect("a request after a long one on the same connection");
    assert_eq!(r.status(), StatusCode::OK);
    let _ = r.into_body().collect().await;

    // Then nothing: the server closes it.
    let closed = tokio::time::timeout(Duration::from_secs(10), &mut conn).await;
    assert!(
        closed.is_ok(),
        "an idle HTTP/2 connection was still open 10s after its last request (header_read_timeout = 1s)"
    );
}

/// An HTTP/2 client that completes the preface and then neither opens a
/// stream nor answers the server's PINGs (the GOAWAY handshake of a
/// graceful close waits for a PING's ACK) is still closed soon after
/// `header_read_timeout`, not only when the keep-alive ping times out
/// (30s + 20s): otherwise every such connection holds a connection slot
/// five times as long as an idle HTTP/1.1 one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_that_ignores_pings_is_closed_too() {
    let w = common::spawn_wharf_with("header_read_timeout = \"1s\"", "");
    let mut h2 = Raw::connect(w.addr).await;
    // The preface and an empty SETTINGS frame; nothing more, ever.
    h2.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .expect("send");
    let closed = h2.closed_within(Duration::from_secs(8)).await;
    let got = closed.expect(
        "an idle HTTP/2 connection that ignores PINGs was still open 8s after connecting \
         (header_read_timeout = 1s)",
    );
    // It was told why: a GOAWAY frame (type 7) came before the close.
    let mut frames = Vec::new();
    let mut at = 0;
    while at + 9 <= got.len() {
        let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
        frames.push(got[at + 3]);
        at += 9 + len;
    }
    assert!(
        frames.contains(&7),
        "no GOAWAY before the close: frame types {frames:?}"
    );
    // The server still serves others.
    let r = HttpClient::new(w.url()).get("/v2/").await;
    assert_eq!(r.status, StatusCode::OK);
}

/// Counts the bytes allocated and not yet freed by each thread, so that a
/// test can see what one operation holds.
mod live_bytes {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
    }

    pub struct Counting;

    fn add(n: isize) {
        // Never panics or allocates: a thread being torn down is skipped.
        let _ = LIVE.try_with(|c| c.set(c.get() + n));
    }

    // SAFETY: every call is forwarded to the system allocator unchanged;
    // the counter is a plain thread-local integer.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            add(layout.size() as isize);
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            add(-(layout.size() as isize));
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            add(layout.size() as isize);
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            add(new_size as isize - layout.size() as isize);
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    /// Bytes this thread holds now.
    pub fn now() -> isize {
        LIVE.with(Cell::get)
    }
}

#[global_allocator]
static ALLOCATOR: live_bytes::Counting = live_bytes::Counting;

/// An upload whose client sent a few bytes and stalled holds about those
/// bytes, not a write buffer sized for a full chunk: 1,500 stalled uploads
/// once held 1.4 GiB that way.
#[test]
fn a_stalled_upload_holds_only_the_bytes_it_received() {
    use futures::StreamExt as _;
    use wharf::storage::UploadStore as _;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = wharf::storage::fs::FsStore::open(dir.path()).expect("store");
        let id = wharf::oci::UploadId::new_random();
        store.create(&id).await.expect("create");

        // A body that yields 100 bytes, then says when it is waited on again
        // (the store holds what it will hold while the client stalls).
        let (stalled_tx, stalled_rx) = tokio::sync::oneshot::channel::<()>();
        let mut stalled_tx = Some(stalled_tx);
        let mut sent = false;
        let body = futures::stream::poll_fn(move |_| {
            if !sent {
                sent = true;
                return std::task::Poll::Ready(Some(Ok(Bytes::from(vec![7u8; 100]))));
            }
            if let Some(tx) = stalled_tx.take() {
                let _ = tx.send(());
            }
            std::task::Poll::Pending
        })
        .boxed();

        let before = live_bytes::now();
        let append = store.append(&id, 0, Some(10 * MIB as u64), body);
        tokio::pin!(append);
        tokio::select! {
            r = &mut append => panic!("the append ended without its body: {:?}", r.err()),
            _ = stalled_rx => {}
        }
        let held = live_bytes::now() - before;
        assert!(
            held < 128 * 1024,
            "a stalled upload that received 100 bytes holds {held} bytes"
        );
    });
}

// ---------------------------------------------------------------------------
// Graceful shutdown
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_uploads_in_flight_finish_and_refuses_new_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "", "");
    let data = dir.path().join("data");
    let mut server = Server::start(&config);
    let client = server.client();
    let repo = "shutdown/in-flight";
    let half = 4 * MIB;

    // A: a chunk of an upload session, streamed with chunked encoding.
    let a = random_bytes(8 * MIB, 2);
    let (a_loc, a_id) = start_upload(&client, repo).await;
    let mut conn_a = Raw::connect(server.addr).await;
    conn_a
        .send(
            format!(
                "PATCH {a_loc} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\n\
                 Transfer-Encoding: chunked\r\n\r\n",
                server.addr
            )
            .as_bytes(),
        )
        .await
        .expect("PATCH head");
    conn_a
        .send_chunked(&a[..half])
        .await
        .expect("first half of A");

    // B: a whole blob in one POST ?digest=, its Content-Length body in parts.
    let b = random_bytes(8 * MIB, 3);
    let b_digest = common::sha256(&b);
    let mut conn_b = Raw::connect(server.addr).await;
    conn_b
        .send(
            format!(
                "POST /v2/{repo}/blobs/uploads/?digest={b_digest} HTTP/1.1\r\nHost: {}\r\n\
                 Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                server.addr,
                b.len()
            )
            .as_bytes(),
        )
        .await
        .expect("POST head");
    conn_b.send(&b[..half]).await.expect("first half of B");

    // Both requests are demonstrably in their handlers: bytes are on disk.
    wait_until("both uploads to reach the disk", PATIENCE, || {
        let staged = staged_uploads(&data);
        let a_on_disk = staged.iter().any(|(id, n)| id == &a_id && *n >= MIB as u64);
        let b_on_disk = staged.iter().any(|(id, n)| id != &a_id && *n >= MIB as u64);
        a_on_disk && b_on_disk
    })
    .await;

    server.sigterm();
    let signalled = Instant::now();
    // New connections are refused (the signal is handled asynchronously).
    loop {
        match TcpStream::connect(server.addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            // Caught in the backlog as the listener closed: try again.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connect after SIGTERM: unexpected error {e}"),
            Ok(probe) => drop(probe),
        }
        assert!(
            signalled.elapsed() < PATIENCE,
            "still accepting connections {PATIENCE:?} after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        server.child.try_wait().expect("try_wait").is_none(),
        "wharf exited with two requests in flight"
    );

    // The requests in flight go on: send the rest.
    conn_a.send_chunked(&a[half..]).await.expect("rest of A");
    conn_a.send(b"0\r\n\r\n").await.expect("last chunk of A");
    conn_b.send(&b[half..]).await.expect("rest of B");
    let ra = tokio::time::timeout(PATIENCE, conn_a.response())
        .await
        .expect("PATCH response in time")
        .expect("PATCH response");
    assert_eq!(ra.status, 202, "PATCH in flight at SIGTERM: {ra:?}");
    assert_eq!(
        ra.header("range"),
        Some(format!("0-{}", a.len() - 1).as_str())
    );
    let rb = tokio::time::timeout(PATIENCE, conn_b.response())
        .await
        .expect("POST response in time")
        .expect("POST response");
    assert_eq!(rb.status, 201, "POST in flight at SIGTERM: {rb:?}");
    assert_eq!(rb.header("docker-content-digest"), Some(b_digest.as_str()));

    let status = server.exited_within(PATIENCE).await;
    assert!(status.success(), "exit status after SIGTERM: {status:?}");

    // What they stored is all there after a restart.
    let server = Server::start(&config);
    let client = server.client();
    let r = client.get(&a_loc).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    assert_eq!(
        r.header("range"),
        Some(format!("0-{}", a.len() - 1).as_str())
    );
    let a_digest = common::sha256(&a);
    let r = client
        .send(
            Method::PUT,
            &with_query(&a_loc, &format!("digest={a_digest}")),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_blob(&client, repo, &a).await;
    assert_blob(&client, repo, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_gives_up_on_a_request_that_never_finishes_after_shutdown_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "shutdown_timeout = \"1s\"", "");
    let data = dir.path().join("data");
    let mut server = Server::start(&config);
    let repo = "shutdown/stuck";
    let blob = random_bytes(MIB, 4);
    let digest = common::sha256(&blob);
    // The repository exists, so the 404 at the end is about the blob.
    server.client().push_blob(repo, b"anchor").await;

    let mut stuck = Raw::connect(server.addr).await;
    stuck
        .send(
            format!(
                "POST /v2/{repo}/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: {}\r\n\
                 Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                server.addr,
                blob.len()
            )
            .as_bytes(),
        )
        .await
        .expect("POST head");
    stuck.send(&blob[..1024]).await.expect("first KiB");
    // The handler is running once it has opened its upload session.
    wait_until("the upload session to be created", PATIENCE, || {
        !staged_uploads(&data).is_empty()
    })
    .await;

    server.sigterm();
    let signalled = Instant::now();
    let status = server.exited_within(PATIENCE).await;
    let took = signalled.elapsed();
    assert!(status.success(), "exit status: {status:?}");
    assert!(
        took >= Duration::from_millis(900),
        "exited after {took:?}, without waiting shutdown_timeout (1s) for the request in flight"
    );
    assert!(
        stuck.closed_within(PATIENCE).await.is_some(),
        "connection still open after exit"
    );

    // The unfinished blob was not published.
    let server = Server::start(&config);
    let r = server
        .client()
        .get(&format!("/v2/{repo}/blobs/{digest}"))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{r:?}");
    assert!(!blob_path(&data, &digest).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_not_held_up_by_idle_connections() {
    // The default shutdown_timeout (30s) must not be waited out for
    // connections with nothing in flight.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "", "");
    let mut server = Server::start(&config);

    // Connected, nothing sent. Accepted before `keep_alive` below is served
    // (the listener accepts in order).
    let mut silent = Raw::connect(server.addr).await;
    // A keep-alive connection after one request.
    let mut keep_alive = Raw::connect(server.addr).await;
    keep_alive
        .send(format!("GET /v2/ HTTP/1.1\r\nHost: {}\r\n\r\n", server.addr).as_bytes())
        .await
        .expect("GET");
    let r = tokio::time::timeout(PATIENCE, keep_alive.response())
        .await
        .expect("response in time")
        .expect("response");
    assert_eq!(r.status, 200);

    server.sigterm();
    let signalled = Instant::now();
    let status = server.exited_within(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status: {status:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "took {:?} to exit",
        signalled.elapsed()
    );
    assert!(silent.closed_within(PATIENCE).await.is_some());
    assert!(keep_alive.closed_within(PATIENCE).await.is_some());
}

// ---------------------------------------------------------------------------
// TLS and HTTP/2
// ---------------------------------------------------------------------------

#[test]
fn tls_serves_http2_and_http1_and_round_trips_blobs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed_cert(dir.path());
    let config = write_config(dir.path(), &tls_section(&cert, &key), "");
    let server = Server::start(&config);
    assert!(
        server.url.starts_with("https://"),
        "stdout says {:?}",
        server.url
    );
    let base = server.url.clone();
    let cacert = cert.to_str().expect("utf-8 path");
    let file = |name: &str| dir.path().join(name).to_str().expect("utf-8").to_string();

    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let out = run_curl(&[
            "--cacert",
            cacert,
            flag,
            "-o",
            &file("base"),
            "-w",
            "%{http_code} %{http_version}",
            &format!("{base}/v2/"),
        ]);
        assert_eq!(out, format!("200 {version}"), "GET /v2/ with {flag}");
        assert_eq!(std::fs::read(file("base")).expect("body"), b"{}");
    }

    // Push one blob over each protocol, read each back over the other.
    let repo = "tls/blobs";
    let blobs = [
        ("--http2", "2", random_bytes(3 * MIB + 17, 5)),
        ("--http1.1", "1.1", random_bytes(MIB + 3, 6)),
    ];
    for (i, (flag, version, blob)) in blobs.iter().enumerate() {
        let digest = common::sha256(blob);
        let upload = file(&format!("upload-{i}"));
        std::fs::write(&upload, blob).expect("write upload");
        let out = run_curl(&[
            "--cacert",
            cacert,
            flag,
            "-X",
            "POST",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &format!("@{upload}"),
            "-o",
            &file("push-resp"),
            "-w",
            "%{http_code} %{http_version}",
            &format!("{base}/v2/{repo}/blobs/uploads/?digest={digest}"),
        ]);
        assert_eq!(out, format!("201 {version}"), "push over {flag}");
    }
    for (i, (_, _, blob)) in blobs.iter().enumerate() {
        let (flag, version) = if i == 0 {
            ("--http1.1", "1.1")
        } else {
            ("--http2", "2")
        };
        let digest = common::sha256(blob);
        let got = file(&format!("got-{i}"));
        let out = run_curl(&[
            "--cacert",
            cacert,
            flag,
            "-o",
            &got,
            "-w",
            "%{http_code} %{http_version}",
            &format!("{base}/v2/{repo}/blobs/{digest}"),
        ]);
        assert_eq!(out, format!("200 {version}"), "GET {digest} over {flag}");
        let got = std::fs::read(&got).expect("downloaded blob");
        assert!(got == *blob, "blob read back over {flag} differs");
    }
}

#[test]
fn tls_with_a_missing_key_file_stops_serve_naming_server_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, _) = self_signed_cert(dir.path());
    let missing = dir.path().join("no-such-key.pem");
    let config = write_config(dir.path(), &tls_section(&cert, &missing), "");
    for sub in [&["serve", "--config"][..], &["check-config"][..]] {
        let out = run_cmd(wharf_cmd().args(sub).arg(&config), PATIENCE);
        let stderr = text(&out.stderr);
        assert!(
            !out.status.success(),
            "{sub:?} succeeded with a missing key"
        );
        assert!(stderr.contains("server.tls"), "{sub:?} stderr: {stderr}");
        assert!(
            !text(&out.stdout).contains("listening on"),
            "{sub:?} started listening"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_that_never_handshakes_is_cut_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed_cert(dir.path());
    let extra = format!("header_read_timeout = \"1s\"\n{}", tls_section(&cert, &key));
    let config = write_config(dir.path(), &extra, "");
    let server = Server::start(&config);
    let mut silent = Raw::connect(server.addr).await;
    assert!(
        silent.closed_within(PATIENCE).await.is_some(),
        "a TLS connection without a handshake was never closed"
    );
}

/// After a completed TLS handshake, a client that sends no request must be
/// cut off like any other slow client.
#[test]
fn tls_connection_that_sends_nothing_after_the_handshake_is_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed_cert(dir.path());
    let extra = format!("header_read_timeout = \"1s\"\n{}", tls_section(&cert, &key));
    let config = write_config(dir.path(), &extra, "");
    let server = Server::start(&config);
    for alpn in ["http/1.1", "h2"] {
        // s_client exits when the server closes; its stdin stays open (and
        // silent) until then.
        let mut client = Command::new(common::require_tool("openssl"))
            .args(["s_client", "-quiet", "-alpn", alpn, "-connect"])
            .arg(server.addr.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn openssl s_client");
        let deadline = Instant::now() + Duration::from_secs(8);
        let closed = loop {
            if client.try_wait().expect("try_wait").is_some() {
                break true;
            }
            if Instant::now() > deadline {
                let _ = client.kill();
                let _ = client.wait();
                break false;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            closed,
            "a TLS connection (ALPN {alpn}) that sent nothing after the handshake was still open \
             after 8s (header_read_timeout = 1s)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleartext_http2_with_prior_knowledge_is_served() {
    let w = common::spawn_wharf("");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = |name: &str| dir.path().join(name).to_str().expect("utf-8").to_string();
    let out = tokio::task::spawn_blocking({
        let url = w.url();
        let body = file("base");
        move || {
            run_curl(&[
                "--http2-prior-knowledge",
                "-o",
                &body,
                "-w",
                "%{http_code} %{http_version}",
                &format!("{url}/v2/"),
            ])
        }
    })
    .await
    .expect("curl");
    assert_eq!(out, "200 2");
    assert_eq!(std::fs::read(file("base")).expect("body"), b"{}");

    // A blob pushed over HTTP/1.1 reads back identical over h2c.
    let blob = random_bytes(2 * MIB + 5, 7);
    let digest = HttpClient::new(w.url()).push_blob("h2c/blob", &blob).await;
    let out = tokio::task::spawn_blocking({
        let url = format!("{}/v2/h2c/blob/blobs/{digest}", w.url());
        let got = file("got");
        move || {
            run_curl(&[
                "--http2-prior-knowledge",
                "-o",
                &got,
                "-w",
                "%{http_code} %{http_version}",
                &url,
            ])
        }
    })
    .await
    .expect("curl");
    assert_eq!(out, "200 2");
    assert!(std::fs::read(file("got")).expect("blob") == blob);
}

// ---------------------------------------------------------------------------
// Configuration errors and overrides
// ---------------------------------------------------------------------------

#[test]
fn unknown_config_keys_stop_serve_and_name_the_key_path() {
    for (server_extra, storage_extra, path) in [
        ("lisen = \"127.0.0.1:0\"", "", "server.lisen"),
        ("", "upload_max_agee = \"1h\"", "storage.upload_max_agee"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = write_config(dir.path(), server_extra, storage_extra);
        let out = run_cmd(
            wharf_cmd().arg("serve").arg("--config").arg(&config),
            PATIENCE,
        );
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "serve accepted {path}");
        assert!(
            stderr.contains(path),
            "stderr does not name {path}: {stderr}"
        );
        assert!(!text(&out.stdout).contains("listening on"));
        assert!(
            !dir.path().join("data").exists(),
            "storage was created by a refused configuration"
        );
    }
}

#[test]
fn check_config_accepts_the_shipped_example_and_names_bad_values() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/wharf.toml");
    let out = run_cmd(wharf_cmd().arg("check-config").arg(&example), PATIENCE);
    assert!(
        out.status.success(),
        "config/wharf.toml: {}",
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("ok"), "{}", text(&out.stdout));

    let dir = tempfile::tempdir().expect("tempdir");
    for (body, path) in [
        ("[server]\nlisten = \"nope\"\n", "server.listen"),
        (
            "[server]\nmax_header_size = \"1KiB\"\n",
            "server.max_header_size",
        ),
        (
            "[storage]\nupload_max_age = \"soon\"\n",
            "storage.upload_max_age",
        ),
    ] {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, body).expect("write");
        let out = run_cmd(wharf_cmd().arg("check-config").arg(&file), PATIENCE);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "check-config accepted {body:?}");
        assert!(
            stderr.contains(path),
            "stderr does not name {path}: {stderr}"
        );
    }
}

/// `check-config` runs the validation `serve` runs: every configuration
/// `serve` refuses at start (here: credentials in an upstream's URL, a CA
/// file that is missing) `check-config` refuses too, with the same entry
/// named and the same reason; and `serve` refuses before it creates storage.
#[test]
fn check_config_refuses_what_serve_refuses() {
    for (extra, named, reason) in [
        (
            "[[pull_through]]\nprefix = \"hub\"\nupstream = \"https://user:secret@registry.example\"\n",
            "pull_through[0] (hub)",
            "not in the URL",
        ),
        (
            "[[pull_through]]\nprefix = \"hub\"\nupstream = \"https://registry.example\"\n\
             ca_file = \"/nonexistent/ca.pem\"\n",
            "pull_through[0] (hub)",
            "/nonexistent/ca.pem",
        ),
        (
            "[[replication.destinations]]\nname = \"eu\"\n\
             url = \"https://user:secret@wharf.eu.example\"\n\
             [[replication.rules]]\nfilters = [{ prefix = \"prod/\" }]\ndestinations = [\"eu\"]\n",
            "replication.destinations[0] (eu)",
            "not in the URL",
        ),
        (
            "[[sync]]\nupstream = \"https://user:secret@registry.example\"\n\
             repositories = [\"library/alpine\"]\ntags = [\"3.*\"]\n",
            "sync[0]",
            "not in the URL",
        ),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = write_config(dir.path(), "", "");
        let mut body = std::fs::read_to_string(&config).unwrap();
        body.push_str(extra);
        std::fs::write(&config, &body).unwrap();
        let serve = run_cmd(
            wharf_cmd().arg("serve").arg("--config").arg(&config),
            PATIENCE,
        );
        let serve_err = text(&serve.stderr);
        assert!(!serve.status.success(), "serve accepted {extra}");
        assert!(!text(&serve.stdout).contains("listening on"));
        assert!(
            serve_err.contains(named) && serve_err.contains(reason),
            "serve: {serve_err}"
        );
        assert!(
            !dir.path().join("data").exists(),
            "serve created storage before refusing {extra}"
        );
        let check = run_cmd(wharf_cmd().arg("check-config").arg(&config), PATIENCE);
        let check_err = text(&check.stderr);
        assert!(!check.status.success(), "check-config accepted {extra}");
        assert!(
            check_err.contains(named) && check_err.contains(reason),
            "check-config: {check_err}"
        );
        assert!(!dir.path().join("data").exists());
    }
}

#[test]
fn bad_environment_overrides_are_refused_with_the_key_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "", "");
    for (var, value, named) in [
        ("WHARF_SERVER_LISTEN", "bad", "server.listen"),
        (
            "WHARF_SERVER_SHUTDOWN_TIMEOUT",
            "later",
            "server.shutdown_timeout",
        ),
        ("WHARF_SERVER_LISTN", "127.0.0.1:0", "WHARF_SERVER_LISTN"),
    ] {
        let out = run_cmd(
            wharf_cmd()
                .arg("serve")
                .arg("--config")
                .arg(&config)
                .env(var, value),
            PATIENCE,
        );
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "serve accepted {var}={value}");
        assert!(stderr.contains(named), "{var}={value}: stderr: {stderr}");
        let out = run_cmd(
            wharf_cmd().arg("check-config").arg(&config).env(var, value),
            PATIENCE,
        );
        assert!(!out.status.success(), "check-config accepted {var}={value}");
        assert!(text(&out.stderr).contains(named));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_path_environment_override_moves_the_data_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "", "");
    let in_file = dir.path().join("data");
    let elsewhere = dir.path().join("elsewhere");
    let elsewhere_s = elsewhere.to_str().expect("utf-8 path").to_string();
    let server = Server::start_env(&config, &[("WHARF_STORAGE_PATH", &elsewhere_s)]);
    let blob = random_bytes(100_000, 8);
    let digest = server.client().push_blob("env/moved", &blob).await;
    assert!(
        blob_path(&elsewhere, &digest).is_file(),
        "blob not under WHARF_STORAGE_PATH"
    );
    assert!(elsewhere.join("meta.redb").is_file());
    assert!(
        !in_file.exists(),
        "the data dir of the file was used despite WHARF_STORAGE_PATH"
    );
    drop(server);

    // Without the override the same file uses its own (empty) data dir.
    let server = Server::start(&config);
    let r = server.client().get("/v2/_catalog").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["repositories"], serde_json::json!([]), "{r:?}");
    assert!(in_file.join("meta.redb").is_file());
    assert!(!blob_path(&in_file, &digest).exists());
}

// ---------------------------------------------------------------------------
// fsck
// ---------------------------------------------------------------------------

fn fsck(config: &Path) -> Output {
    run_cmd(
        wharf_cmd().arg("fsck").arg("--config").arg(config),
        Duration::from_secs(60),
    )
}

/// `fsck` (and a second `serve`) over the data directory of a running
/// server: refused with an error that says what to do, before touching
/// anything (the running server's staging files survive); `fsck --server`
/// has the running server do it (a corrupt blob is found, quarantined and
/// no longer served); after the server stops, the offline fsck runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsck_while_serve_runs_says_to_stop_the_server_and_touches_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "", "");
    let data = dir.path().join("data");
    let mut server = Server::start(&config);
    let client = server.client();
    let blob = random_bytes(100_000, 7);
    client.push_blob("fsck/live", &blob).await;
    // Work in progress of the running server, as a fill stages it.
    let staging = data.join("uploads").join(".fill-in-progress");
    std::fs::write(&staging, b"partial").unwrap();
    for sub in ["fsck", "serve"] {
        let out = run_cmd(wharf_cmd().arg(sub).arg("--config").arg(&config), PATIENCE);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{sub} ran beside a server");
        assert!(
            stderr.contains("in use by another wharf process")
                && stderr.contains("stop")
                && stderr.contains("wharf fsck --server"),
            "{sub}: {stderr}"
        );
        assert!(staging.exists(), "{sub} removed the server's staging file");
    }
    assert_blob(&client, "fsck/live", &blob).await;

    let server_url = format!("http://{}", server.addr);
    let out = run_cmd(
        wharf_cmd().args(["fsck", "--server", &server_url]),
        PATIENCE,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("checked 1 blobs: 0 corrupt"));
    let rotten = random_bytes(50_000, 8);
    client.push_blob("fsck/live", &rotten).await;
    let rotten_digest = common::sha256(&rotten);
    let mut flipped = rotten.clone();
    flipped[25_000] ^= 0xff;
    std::fs::write(blob_path(&data, &rotten_digest), &flipped).unwrap();
    let out = run_cmd(
        wharf_cmd().args(["fsck", "--server", &server_url]),
        PATIENCE,
    );
    let stdout = text(&out.stdout);
    assert!(!out.status.success(), "a corrupt blob passed: {stdout}");
    assert!(
        stdout.contains(&format!("CORRUPT {rotten_digest}"))
            && stdout.contains("checked 2 blobs: 1 corrupt"),
        "{stdout}"
    );
    let r = client
        .get(&format!("/v2/fsck/live/blobs/{rotten_digest}"))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{r:?}");
    assert_blob(&client, "fsck/live", &blob).await;

    server.sigterm();
    assert!(server.exited_within(PATIENCE).await.success());
    let out = fsck(&config);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("checked 1 blobs: 0 corrupt"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsck_quarantines_corrupt_blobs_which_are_then_not_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "", "");
    let data = dir.path().join("data");
    let repo = "fsck/blobs";
    let blobs: Vec<Vec<u8>> = (0..4)
        .map(|i| random_bytes(200_000 + i * 70_001, 100 + i as u64))
        .collect();
    let mut server = Server::start(&config);
    let client = server.client();
    for b in &blobs {
        client.push_blob(repo, b).await;
    }
    server.sigterm();
    assert!(server.exited_within(PATIENCE).await.success());

    let out = fsck(&config);
    assert!(out.status.success(), "fsck of a healthy store: {out:?}");

    // Flip one byte of blob 0; cut blob 1 short.
    let digests: Vec<String> = blobs.iter().map(|b| common::sha256(b)).collect();
    let flipped = blob_path(&data, &digests[0]);
    let mut bytes = std::fs::read(&flipped).expect("read blob file");
    bytes[1234] ^= 0x01;
    std::fs::write(&flipped, &bytes).expect("corrupt blob");
    let truncated = blob_path(&data, &digests[1]);
    let bytes = std::fs::read(&truncated).expect("read blob file");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("truncate blob");

    let out = fsck(&config);
    let stdout = text(&out.stdout);
    assert!(
        !out.status.success(),
        "fsck passed a corrupt store: {stdout}"
    );
    for (i, d) in digests.iter().enumerate() {
        if i < 2 {
            assert!(
                stdout.contains(d.as_str()),
                "fsck output does not name {d}: {stdout}"
            );
            assert!(!blob_path(&data, d).exists(), "{d} still in place");
            let hex = d.strip_prefix("sha256:").expect("sha256");
            assert!(
                data.join("quarantine")
                    .join(format!("sha256-{hex}"))
                    .is_file(),
                "{d} not in quarantine"
            );
        } else {
            assert!(
                !stdout.contains(d.as_str()),
                "fsck blames a good blob: {stdout}"
            );
            assert!(blob_path(&data, d).is_file());
        }
    }

    let out = fsck(&config);
    assert!(
        out.status.success(),
        "second fsck after quarantine: {}",
        text(&out.stdout)
    );

    let server = Server::start(&config);
    let client = server.client();
    for (i, (b, d)) in blobs.iter().zip(&digests).enumerate() {
        if i < 2 {
            for method in [Method::GET, Method::HEAD] {
                let r = client
                    .send(
                        method.clone(),
                        &format!("/v2/{repo}/blobs/{d}"),
                        &[],
                        Bytes::new(),
                    )
                    .await;
                assert_eq!(
                    r.status,
                    StatusCode::NOT_FOUND,
                    "{method} quarantined {d}: {r:?}"
                );
                if method == Method::GET {
                    assert_eq!(r.error_code(), "BLOB_UNKNOWN");
                }
            }
        } else {
            assert_blob(&client, repo, b).await;
        }
    }
}

// ---------------------------------------------------------------------------
// Upload sessions across restarts and purges
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_session_survives_sigkill_and_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "", "");
    let repo = "resume/after-crash";
    let blob = random_bytes(3 * MIB + 123, 9);
    let digest = common::sha256(&blob);
    let first = MIB + 77;

    let mut server = Server::start(&config);
    let client = server.client();
    let (loc, _) = start_upload(&client, repo).await;
    let r = client
        .send(
            Method::PATCH,
            &loc,
            &[
                ("content-type", "application/octet-stream"),
                ("content-range", &format!("0-{}", first - 1)),
            ],
            Bytes::copy_from_slice(&blob[..first]),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    assert_eq!(r.header("range"), Some(format!("0-{}", first - 1).as_str()));
    server.kill9();

    let server = Server::start(&config);
    let client = server.client();
    let r = client.get(&loc).await;
    assert_eq!(
        r.status,
        StatusCode::NO_CONTENT,
        "status after restart: {r:?}"
    );
    assert_eq!(r.header("range"), Some(format!("0-{}", first - 1).as_str()));
    let loc = r.header("location").map(str::to_string).unwrap_or(loc);
    let r = client
        .send(
            Method::PATCH,
            &loc,
            &[
                ("content-type", "application/octet-stream"),
                ("content-range", &format!("{first}-{}", blob.len() - 1)),
            ],
            Bytes::copy_from_slice(&blob[first..]),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    assert_eq!(
        r.header("range"),
        Some(format!("0-{}", blob.len() - 1).as_str())
    );
    let r = client
        .send(
            Method::PUT,
            &with_query(&loc, &format!("digest={digest}")),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_blob(&client, repo, &blob).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_upload_is_purged_and_an_active_one_is_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        "",
        "upload_max_age = \"3s\"\nupload_purge_interval = \"1s\"",
    );
    let data = dir.path().join("data");
    let server = Server::start(&config);
    let client = server.client();
    let repo = "purge/uploads";

    let (idle_loc, idle_id) = start_upload(&client, repo).await;
    let r = client.get(&idle_loc).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "fresh upload: {r:?}");
    assert!(data.join("uploads").join(&idle_id).is_dir());

    // Another session receives a small chunk every 250 ms meanwhile: it is
    // never idle long enough to be purged.
    let (active_loc, _) = start_upload(&client, repo).await;
    let mut sent: Vec<u8> = Vec::new();
    let started = Instant::now();
    let purged_after = loop {
        let chunk = random_bytes(1000, sent.len() as u64);
        let r = client
            .send(
                Method::PATCH,
                &active_loc,
                &[
                    ("content-type", "application/octet-stream"),
                    (
                        "content-range",
                        &format!("{}-{}", sent.len(), sent.len() + chunk.len() - 1),
                    ),
                ],
                Bytes::copy_from_slice(&chunk),
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "active upload: {r:?}");
        sent.extend_from_slice(&chunk);
        if !data.join("uploads").join(&idle_id).exists() {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < PATIENCE,
            "idle upload not purged within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        purged_after >= Duration::from_millis(2500),
        "idle upload purged after {purged_after:?}, before upload_max_age (3s)"
    );

    let r = client.get(&idle_loc).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "purged upload: {r:?}");
    assert_eq!(r.error_code(), "BLOB_UPLOAD_UNKNOWN");
    let r = client
        .send(
            Method::PATCH,
            &idle_loc,
            &[("content-type", "application/octet-stream")],
            Bytes::from_static(b"late"),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "PATCH to a purged upload: {r:?}"
    );

    // The active one survived every purge and completes.
    let digest = common::sha256(&sent);
    let r = client
        .send(
            Method::PUT,
            &with_query(&active_loc, &format!("digest={digest}")),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "active upload: {r:?}");
    assert_blob(&client, repo, &sent).await;
}

/// Sessions younger than `upload_max_age` are never purged, also when they
/// start while a purge pass is busy removing many abandoned ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_younger_than_max_age_survive_busy_purge_passes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        "",
        "upload_max_age = \"2s\"\nupload_purge_interval = \"1s\"",
    );
    let data = dir.path().join("data");
    let server = Server::start(&config);
    let client = server.client();
    let repo = "purge/busy";
    let young = Duration::from_millis(200)..Duration::from_millis(1200);

    // Sessions are started steadily and abandoned (work for every purge
    // pass); each is checked once while it is well under 2s old.
    let started = Instant::now();
    let mut unchecked: Vec<(String, String, Instant)> = Vec::new();
    let mut checked = 0;
    let mut lost = Vec::new();
    while started.elapsed() < Duration::from_secs(5) && lost.is_empty() {
        for _ in 0..5 {
            let (loc, id) = start_upload(&client, repo).await;
            unchecked.push((loc, id, Instant::now()));
        }
        let mut later = Vec::new();
        for (loc, id, at) in unchecked.drain(..) {
            let age = at.elapsed();
            if age < young.start {
                later.push((loc, id, at));
            } else if age < young.end {
                let r = client.get(&loc).await;
                checked += 1;
                if r.status != StatusCode::NO_CONTENT {
                    let staged = data.join("uploads").join(&id).exists();
                    lost.push(format!(
                        "{id}, {age:?} old: {} (staged bytes still on disk: {staged})",
                        r.status
                    ));
                }
            }
        }
        unchecked = later;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(checked > 50, "only {checked} sessions checked");
    assert!(
        lost.is_empty(),
        "upload sessions younger than upload_max_age (2s) were purged: {lost:?}"
    );
}

// ---------------------------------------------------------------------------
// Background work at shutdown
// ---------------------------------------------------------------------------

/// SIGTERM waits for the cache's background work: the evictor saves the
/// access times it keeps in memory before the process exits, so the least
/// recently used order survives a clean restart. Several rounds over one
/// data directory, each reading the two blobs in the other order: every
/// round's last read must be the most recent after the exit. (Before the
/// evictor was joined, its last save raced the process's exit and was lost
/// in about one round of three.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_the_cache_evictor_to_save_access_times() {
    use wharf::storage::MetaStore as _;
    let fake = common::fake_upstream::FakeUpstream::start();
    let first = common::cache::random_bytes(50_000, 1);
    let second = common::cache::random_bytes(50_000, 2);
    let a = fake.add_blob("lib/app", first.clone());
    let b = fake.add_blob("lib/app", second.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "", "");
    let mut body = std::fs::read_to_string(&config).unwrap();
    body.push_str(&common::cache::rule("up", &fake, ""));
    std::fs::write(&config, body).unwrap();
    for round in 0..6 {
        let (newest, older) = if round % 2 == 0 {
            ((&a, &first), (&b, &second))
        } else {
            ((&b, &second), (&a, &first))
        };
        let mut server = Server::start(&config);
        let client = server.client();
        for (i, (d, bytes)) in [newest, older, newest].iter().enumerate() {
            if i == 2 {
                // Both blobs are published and budgeted (a fill does that
                // after its clients had every byte): this read is the latest.
                let deadline = Instant::now() + PATIENCE;
                loop {
                    let r = client.get("/_wharf/cache/stats").await;
                    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                    if v["budget"]["blobs"] == 2 && v["fills"]["in_progress"] == 0 {
                        break;
                    }
                    assert!(Instant::now() < deadline, "fills never finished: {v}");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            let r = client.get(&format!("/v2/up/lib/app/blobs/{d}")).await;
            assert_eq!(r.status, StatusCode::OK, "{r:?}");
            assert_eq!(&r.body[..], &bytes[..]);
        }
        server.sigterm();
        assert!(server.exited_within(PATIENCE).await.success());
        let meta =
            wharf::storage::meta::RedbMeta::open(&dir.path().join("data/meta.redb")).unwrap();
        let entries = meta.cache_entries().await.unwrap();
        let accessed = |d: &wharf::oci::Digest| {
            entries
                .iter()
                .find(|(e, _)| e == d)
                .unwrap_or_else(|| panic!("{d} is not budgeted: {entries:?}"))
                .1
                .accessed
        };
        assert!(
            accessed(newest.0) > accessed(older.0),
            "round {round}: the last read of {} was not saved at shutdown: {entries:?}",
            newest.0
        );
    }
}

/// A client that asks for a blob and then reads nothing (its receive window
/// stays full) is disconnected once the response makes no progress for
/// `server.body_read_timeout`; it no longer holds its socket (nor its
/// connection slot, nor what the response held), over HTTP/1 and HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_response_is_disconnected() {
    let w = common::spawn_wharf_with("body_read_timeout = \"1s\"", "");
    let pid = w.child.id();
    let client = HttpClient::new(w.url());
    // Far more than the socket buffers on both sides hold.
    let blob = random_bytes(48 * MIB, 77);
    let digest = client.push_blob("stuck/reader", &blob).await;
    let idle = open_sockets(pid);
    let host = w.host();
    let mut stuck = Vec::new();
    // HTTP/1: a GET, then nothing read.
    let mut h1 = TcpStream::connect(w.addr).await.expect("connect");
    let get = format!("GET /v2/stuck/reader/blobs/{digest} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut h1, get.as_bytes())
        .await
        .expect("send");
    stuck.push(h1);
    // HTTP/2 (prior knowledge): the preface, SETTINGS, a HEADERS frame for
    // the GET (HPACK literals without indexing), then nothing read.
    let mut h2 = TcpStream::connect(w.addr).await.expect("connect");
    let mut frames = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frames.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "GET".to_string()),
        (":scheme", "http".to_string()),
        (":authority", host.clone()),
        (":path", format!("/v2/stuck/reader/blobs/{digest}")),
    ] {
        block.push(0x00);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    let len = block.len();
    frames.extend_from_slice(&[
        (len >> 16) as u8,
        (len >> 8) as u8,
        len as u8,
        1,
        0x5,
        0,
        0,
        0,
        1,
    ]);
    frames.extend_from_slice(&block);
    tokio::io::AsyncWriteExt::write_all(&mut h2, &frames)
        .await
        .expect("send");
    stuck.push(h2);
    let deadline = Instant::now() + Duration::from_secs(20);
    while open_sockets(pid) < idle + stuck.len() {
        assert!(
            Instant::now() < deadline,
            "the connections were never accepted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while open_sockets(pid) > idle {
        assert!(
            Instant::now() < deadline,
            "wharf still holds {} sockets for clients that read nothing",
            open_sockets(pid) - idle
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The server still serves.
    let r = client
        .get(&format!("/v2/stuck/reader/blobs/{digest}"))
        .await;
    assert_eq!(r.body.len(), blob.len());
    drop(stuck);
}
