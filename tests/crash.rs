//! Crash safety: `wharf serve` is SIGKILLed, round after round, over one
//! data directory while clients push blobs and images and a large upload is
//! being streamed. After every restart:
//!
//! * every blob and manifest whose push was acknowledged (201) is served,
//!   byte-identical, by tag and by digest;
//! * the interrupted large upload's digest is not served, and no push cut
//!   short by the kill is visible in part (it is absent, or complete);
//! * an interrupted chunked upload session resumes from the offset the
//!   server reports and completes to the right digest;
//! * `wharf fsck` finds every stored blob intact.
//!
//! The kill points come from a seed printed at the start; `CRASH_SEED=N`
//! replays a run.

mod common;

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

const MIB: usize = 1024 * 1024;
const ROUNDS: u64 = 5;
/// Size of the upload that every round interrupts.
const BIG: usize = 64 * MIB;
/// The large upload is streamed in pieces of this size.
const PIECE: usize = 256 * 1024;
/// Where the large uploads go.
const BIG_REPO: &str = "crash/big";
/// Rounds in which the kill is timed by manifest pushes.
const MANIFEST_ROUNDS: [u64; 2] = [2, 3];
const PATIENCE: Duration = Duration::from_secs(30);
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// splitmix64: reproducible choices and contents.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform-ish in `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

fn write_config(dir: &Path) -> PathBuf {
    let config = dir.join("wharf.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[storage]\ntype = \"filesystem\"\npath = {:?}\n",
            dir.join("data").display().to_string()
        ),
    )
    .expect("write config");
    config
}

/// A `wharf` command without `WHARF_*` configuration inherited from the
/// caller, with quiet logs.
use common::wharf_cmd;

/// A `wharf serve` process over the test's directory. Killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(config: &Path) -> Server {
        let (child, addr) = common::start(config, &[]);
        Server { child, addr }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn terminate(&mut self) -> ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -TERM failed");
        common::exited_within(&mut self.child, PATIENCE).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `wharf fsck --config CONFIG`, which must pass.
fn assert_fsck(config: &Path, when: &str) {
    let mut child = wharf_cmd()
        .arg("fsck")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fsck");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("fsck {when} did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = Output {
        status,
        stdout: out.join().unwrap_or_default().into_bytes(),
        stderr: err.join().unwrap_or_default().into_bytes(),
    };
    assert!(
        output.status.success(),
        "fsck {when} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn blob_path(data: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    data.join("blobs").join("sha256").join(&hex[..2]).join(hex)
}

/// Staged upload sessions on disk: `(id, bytes)`.
fn staged(data: &Path) -> Vec<(String, u64)> {
    let Ok(entries) = std::fs::read_dir(data.join("uploads")) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let m = std::fs::metadata(e.path().join("data")).ok()?;
            Some((e.file_name().to_string_lossy().into_owned(), m.len()))
        })
        .collect()
}

/// The largest staged upload not among `old` (sessions left by earlier
/// rounds), in bytes.
fn largest_new_staged(data: &Path, old: &[String]) -> u64 {
    staged(data)
        .into_iter()
        .filter(|(id, _)| !old.contains(id))
        .map(|(_, n)| n)
        .max()
        .unwrap_or(0)
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    fn error_code(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("<no code in {:?}>", String::from_utf8_lossy(&self.body)))
    }
}

impl std::fmt::Debug for Resp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = if self.body.len() > 300 {
            format!("<{} bytes>", self.body.len())
        } else {
            String::from_utf8_lossy(&self.body).into_owned()
        };
        write!(f, "{} {:?} {body}", self.status, self.headers)
    }
}

/// An HTTP client whose requests may fail (the server gets killed under
/// them) instead of panicking.
#[derive(Clone)]
struct TryClient {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl TryClient {
    fn new(addr: SocketAddr) -> TryClient {
        TryClient {
            base: format!("http://{addr}"),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Resp, String> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
            Ok(Resp {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(PATIENCE, exchange)
            .await
            .map_err(|_| "request timed out".to_string())?
    }

    async fn get(&self, path: &str) -> Resp {
        self.send(Method::GET, path, &[], Bytes::new())
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }
}

fn with_query(loc: &str, q: &str) -> String {
    let sep = if loc.contains('?') { '&' } else { '?' };
    format!("{loc}{sep}{q}")
}

// ---------------------------------------------------------------------------
// What was pushed
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Blob {
    repo: String,
    digest: String,
    size: u64,
}

#[derive(Clone, Debug)]
struct Image {
    repo: String,
    tag: String,
    digest: String,
    body: Bytes,
    blobs: Vec<Blob>,
}

/// Everything the clients were told, and everything left in doubt.
#[derive(Default, Clone)]
struct Ledger {
    /// 201 received: must be served, intact, forever.
    blobs: Vec<Blob>,
    images: Vec<Image>,
    /// Under way at a kill: absent, or present and complete.
    doubtful_blobs: Vec<Blob>,
    doubtful_images: Vec<Image>,
    /// Cut short by a kill: must not be served.
    interrupted: Vec<Blob>,
}

type Shared = Arc<Mutex<Ledger>>;

fn ledger(shared: &Shared) -> std::sync::MutexGuard<'_, Ledger> {
    shared.lock().expect("ledger lock")
}

/// Pushes one blob, by `way % 3`: a monolithic `POST ?digest=`; `POST` then
/// `PUT ?digest=` with the body; `POST`, three `PATCH`es, closing `PUT`.
/// `Err` once the server is gone.
async fn push_blob(c: &TryClient, repo: &str, data: &[u8], way: u64) -> Result<(), String> {
    let digest = common::sha256(data);
    let octets = ("content-type", "application/octet-stream");
    let expect = |r: &Resp, want: StatusCode, what: &str| -> Result<(), String> {
        // Any answer other than the expected one is a bug, not a crash.
        assert_eq!(r.status, want, "{what}: {r:?}");
        Ok(())
    };
    let way = way % 3;
    if way == 0 {
        let r = c
            .send(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/?digest={digest}"),
                &[octets],
                Bytes::copy_from_slice(data),
            )
            .await?;
        return expect(&r, StatusCode::CREATED, "monolithic POST");
    }
    let r = c
        .send(
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/"),
            &[],
            Bytes::new(),
        )
        .await?;
    expect(&r, StatusCode::ACCEPTED, "start upload")?;
    let loc = r.header("location").expect("Location").to_string();
    if way == 1 {
        let r = c
            .send(
                Method::PUT,
                &with_query(&loc, &format!("digest={digest}")),
                &[octets],
                Bytes::copy_from_slice(data),
            )
            .await?;
        return expect(&r, StatusCode::CREATED, "PUT with body");
    }
    let third = data.len() / 3;
    for (start, end) in [(0, third), (third, 2 * third), (2 * third, data.len())] {
        let range = format!("{start}-{}", end - 1);
        let r = c
            .send(
                Method::PATCH,
                &loc,
                &[octets, ("content-range", &range)],
                Bytes::copy_from_slice(&data[start..end]),
            )
            .await?;
        expect(&r, StatusCode::ACCEPTED, "PATCH")?;
    }
    let r = c
        .send(
            Method::PUT,
            &with_query(&loc, &format!("digest={digest}")),
            &[],
            Bytes::new(),
        )
        .await?;
    expect(&r, StatusCode::CREATED, "closing PUT")
}

/// Pushes random 1–8 MiB blobs until the server dies; records each in the
/// ledger only once its 201 arrived. Two run side by side.
async fn blob_pusher(c: TryClient, shared: Shared, seed: u64, round: u64) {
    let mut rng = Rng(seed);
    let repo = format!("crash/blobs-{round}");
    for i in 0.. {
        let data = random_bytes(
            rng.range(MIB as u64, 8 * MIB as u64 + 1) as usize,
            rng.next(),
        );
        let blob = Blob {
            repo: repo.clone(),
            digest: common::sha256(&data),
            size: data.len() as u64,
        };
        ledger(&shared).doubtful_blobs.push(blob.clone());
        if push_blob(&c, &repo, &data, i).await.is_err() {
            return;
        }
        let mut l = ledger(&shared);
        l.doubtful_blobs.retain(|b| b.digest != blob.digest);
        l.blobs.push(blob);
    }
}

/// Pushes small images (layer, config, manifest by tag) until the server
/// dies; records each only once the manifest's 201 arrived.
async fn image_pusher(c: TryClient, shared: Shared, seed: u64, round: u64, acked: Arc<AtomicU64>) {
    let mut rng = Rng(seed);
    let repo = format!("crash/images-{round}");
    for i in 0.. {
        let layer = random_bytes(rng.range(1024, 256 * 1024) as usize, rng.next());
        let layer_digest = common::sha256(&layer);
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
            "config": {"Labels": {"round": round.to_string(), "image": i.to_string()}},
        })
        .to_string()
        .into_bytes();
        let config_digest = common::sha256(&config);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": layer.len(),
            }],
        })
        .to_string();
        let blobs = vec![
            Blob {
                repo: repo.clone(),
                digest: layer_digest,
                size: layer.len() as u64,
            },
            Blob {
                repo: repo.clone(),
                digest: config_digest,
                size: config.len() as u64,
            },
        ];
        let image = Image {
            repo: repo.clone(),
            tag: format!("r{round}-{i}"),
            digest: common::sha256(manifest.as_bytes()),
            body: Bytes::from(manifest),
            blobs,
        };
        ledger(&shared).doubtful_images.push(image.clone());
        let pushed = async {
            push_blob(&c, &repo, &layer, i).await?;
            push_blob(&c, &repo, &config, 0).await?;
            c.send(
                Method::PUT,
                &format!("/v2/{repo}/manifests/{}", image.tag),
                &[("content-type", OCI_MANIFEST)],
                image.body.clone(),
            )
            .await
        }
        .await;
        let Ok(r) = pushed else { return };
        assert_eq!(r.status, StatusCode::CREATED, "manifest PUT: {r:?}");
        assert_eq!(
            r.header("docker-content-digest"),
            Some(image.digest.as_str())
        );
        let mut l = ledger(&shared);
        l.doubtful_images.retain(|m| m.tag != image.tag);
        l.images.push(image);
        acked.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Stream {
    /// `POST ?digest=` with a Content-Length body.
    Monolithic,
    /// A `PATCH` with a chunked body to an upload session.
    Chunked,
}

/// Streams `data` to the server over a raw connection, `PIECE` at a time,
/// counting what was written into `sent`. Never sends the last piece: the
/// upload stays unfinished until the kill.
async fn stream_big(
    addr: SocketAddr,
    head: String,
    data: Arc<Vec<u8>>,
    how: Stream,
    sent: Arc<AtomicU64>,
) {
    let Ok(mut conn) = TcpStream::connect(addr).await else {
        return;
    };
    if conn.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    for piece in data[..data.len() - PIECE].chunks(PIECE) {
        let mut frame = Vec::with_capacity(piece.len() + 16);
        if how == Stream::Chunked {
            frame.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        }
        frame.extend_from_slice(piece);
        if how == Stream::Chunked {
            frame.extend_from_slice(b"\r\n");
        }
        if conn.write_all(&frame).await.is_err() {
            return;
        }
        sent.fetch_add(piece.len() as u64, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    // Stall with the upload unfinished until the server dies.
    let mut sink = [0u8; 1024];
    let _ = tokio::io::AsyncReadExt::read(&mut conn, &mut sink).await;
}

// ---------------------------------------------------------------------------
// Checks after a restart
// ---------------------------------------------------------------------------

async fn assert_blob_intact(c: &TryClient, b: &Blob, what: &str) {
    let r = c.get(&format!("/v2/{}/blobs/{}", b.repo, b.digest)).await;
    assert_eq!(r.status, StatusCode::OK, "{what} blob {b:?}: {r:?}");
    assert_eq!(r.body.len() as u64, b.size, "{what} blob {b:?}: length");
    assert_eq!(
        common::sha256(&r.body),
        b.digest,
        "{what} blob {b:?}: content"
    );
}

async fn assert_image_intact(c: &TryClient, m: &Image, what: &str) {
    for reference in [&m.tag, &m.digest] {
        let r = c
            .send(
                Method::GET,
                &format!("/v2/{}/manifests/{reference}", m.repo),
                &[("accept", OCI_MANIFEST)],
                Bytes::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("GET manifest: {e}"));
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{what} image {}:{reference}: {r:?}",
            m.repo
        );
        assert_eq!(r.body, m.body, "{what} image {}:{reference}: body", m.repo);
        assert_eq!(r.header("docker-content-digest"), Some(m.digest.as_str()));
    }
    for b in &m.blobs {
        assert_blob_intact(c, b, what).await;
    }
}

/// Everything acknowledged is there; nothing interrupted is; nothing in
/// doubt is there in part.
async fn verify(c: &TryClient, data: &Path, l: &Ledger) {
    for b in &l.blobs {
        assert_blob_intact(c, b, "acknowledged").await;
    }
    for m in &l.images {
        assert_image_intact(c, m, "acknowledged").await;
    }
    for b in &l.doubtful_blobs {
        let r = c.get(&format!("/v2/{}/blobs/{}", b.repo, b.digest)).await;
        match r.status {
            StatusCode::NOT_FOUND => assert_eq!(r.error_code(), "BLOB_UNKNOWN", "{r:?}"),
            StatusCode::OK => assert_blob_intact(c, b, "half-pushed").await,
            _ => panic!("half-pushed blob {b:?}: {r:?}"),
        }
    }
    for m in &l.doubtful_images {
        let r = c
            .send(
                Method::GET,
                &format!("/v2/{}/manifests/{}", m.repo, m.tag),
                &[("accept", OCI_MANIFEST)],
                Bytes::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("GET manifest: {e}"));
        match r.status {
            StatusCode::NOT_FOUND => assert_eq!(r.error_code(), "MANIFEST_UNKNOWN", "{r:?}"),
            StatusCode::OK => assert_image_intact(c, m, "half-pushed").await,
            _ => panic!("half-pushed image {m:?}: {r:?}"),
        }
    }
    for b in &l.interrupted {
        for method in [Method::GET, Method::HEAD] {
            let r = c
                .send(
                    method.clone(),
                    &format!("/v2/{}/blobs/{}", b.repo, b.digest),
                    &[],
                    Bytes::new(),
                )
                .await
                .unwrap_or_else(|e| panic!("{method} interrupted blob: {e}"));
            assert_eq!(
                r.status,
                StatusCode::NOT_FOUND,
                "{method} interrupted {b:?}: {r:?}"
            );
            if method == Method::GET {
                assert_eq!(r.error_code(), "BLOB_UNKNOWN", "{r:?}");
            }
        }
        assert!(
            !blob_path(data, &b.digest).exists(),
            "interrupted upload {} was published",
            b.digest
        );
    }
}

/// An interrupted chunked upload, to resume after the restart.
struct Unfinished {
    blob: Blob,
    location: String,
    data: Arc<Vec<u8>>,
    /// Staged bytes seen on disk at the kill, and bytes written to the socket.
    on_disk_at_kill: u64,
    sent: u64,
}

/// Resumes from the offset the server reports and completes the upload.
async fn resume(c: &TryClient, u: &Unfinished) {
    let r = c.get(&u.location).await;
    assert_eq!(
        r.status,
        StatusCode::NO_CONTENT,
        "interrupted session after restart: {r:?}"
    );
    let range = r.header("range").expect("Range").to_string();
    let end: u64 = range
        .strip_prefix("0-")
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("Range {range:?}"));
    let have = end + 1;
    assert!(
        have >= u.on_disk_at_kill && have <= u.sent,
        "session reports {have} bytes; {} were on disk at the kill, {} sent",
        u.on_disk_at_kill,
        u.sent
    );
    let loc = r.header("location").unwrap_or(&u.location).to_string();
    let rest = Bytes::copy_from_slice(&u.data[have as usize..]);
    let range = format!("{have}-{}", u.data.len() - 1);
    let r = c
        .send(
            Method::PATCH,
            &loc,
            &[
                ("content-type", "application/octet-stream"),
                ("content-range", &range),
            ],
            rest,
        )
        .await
        .expect("resume PATCH");
    assert_eq!(r.status, StatusCode::ACCEPTED, "resume PATCH: {r:?}");
    let r = c
        .send(
            Method::PUT,
            &with_query(&loc, &format!("digest={}", u.blob.digest)),
            &[],
            Bytes::new(),
        )
        .await
        .expect("closing PUT");
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "completing the resumed upload (staged prefix must be what was sent): {r:?}"
    );
    assert_blob_intact(c, &u.blob, "resumed").await;
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill_and_interrupted_ones_leave_no_trace() {
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("crash test seed: {seed} (CRASH_SEED={seed} replays it)");
    let mut rng = Rng(seed);
    let started = Instant::now();

    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let data = dir.path().join("data");
    let shared: Shared = Arc::default();
    let mut unfinished: Option<Unfinished> = None;

    for round in 0..=ROUNDS {
        let mut server = Server::start(&config);
        let c = TryClient::new(server.addr);
        if round == 0 {
            // The large uploads go to a repository that exists, so "not
            // served" is about the blob, not about an unknown repository.
            let anchor = random_bytes(1000, rng.next());
            push_blob(&c, BIG_REPO, &anchor, 0)
                .await
                .expect("push anchor blob");
            ledger(&shared).blobs.push(Blob {
                repo: BIG_REPO.to_string(),
                digest: common::sha256(&anchor),
                size: anchor.len() as u64,
            });
        }
        let snapshot = ledger(&shared).clone();
        verify(&c, &data, &snapshot).await;
        if let Some(u) = unfinished.take() {
            resume(&c, &u).await;
            let mut l = ledger(&shared);
            l.interrupted.retain(|b| b.digest != u.blob.digest);
            l.blobs.push(u.blob);
        }
        if round == ROUNDS {
            // The last restart only checks; then a clean stop.
            let status = server.terminate().await;
            assert!(status.success(), "exit status after SIGTERM: {status:?}");
            assert_fsck(&config, "after the last round");
            break;
        }

        // Sessions left behind by earlier kills.
        let old_sessions: Vec<String> = staged(&data).into_iter().map(|(id, _)| id).collect();
        // The large upload this round interrupts.
        let how = if round % 2 == 0 {
            Stream::Monolithic
        } else {
            Stream::Chunked
        };
        let repo = BIG_REPO.to_string();
        let big = Arc::new(random_bytes(BIG, rng.next()));
        let big_blob = Blob {
            repo: repo.clone(),
            digest: common::sha256(&big),
            size: BIG as u64,
        };
        let (head, location) = match how {
            Stream::Monolithic => (
                format!(
                    "POST /v2/{repo}/blobs/uploads/?digest={} HTTP/1.1\r\nHost: {}\r\n\
                     Content-Type: application/octet-stream\r\nContent-Length: {BIG}\r\n\r\n",
                    big_blob.digest, server.addr
                ),
                None,
            ),
            Stream::Chunked => {
                let r = c
                    .send(
                        Method::POST,
                        &format!("/v2/{repo}/blobs/uploads/"),
                        &[],
                        Bytes::new(),
                    )
                    .await
                    .expect("start upload");
                assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
                let loc = r.header("location").expect("Location").to_string();
                (
                    format!(
                        "PATCH {loc} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\n\
                         Transfer-Encoding: chunked\r\n\r\n",
                        server.addr
                    ),
                    Some(loc),
                )
            }
        };
        let sent = Arc::new(AtomicU64::new(0));
        let images_acked = Arc::new(AtomicU64::new(0));
        let blobs_before = ledger(&shared).blobs.len();

        let mut tasks = vec![
            tokio::spawn(stream_big(
                server.addr,
                head,
                big.clone(),
                how,
                sent.clone(),
            )),
            tokio::spawn(blob_pusher(c.clone(), shared.clone(), rng.next(), round)),
            tokio::spawn(blob_pusher(c.clone(), shared.clone(), rng.next(), round)),
        ];
        let by_manifests = MANIFEST_ROUNDS.contains(&round);
        if by_manifests {
            tasks.push(tokio::spawn(image_pusher(
                c.clone(),
                shared.clone(),
                rng.next(),
                round,
                images_acked.clone(),
            )));
        }

        // The kill point: somewhere in the middle of the large upload (its
        // staged bytes exceed any other upload's 8 MiB) once at least one
        // other blob was acknowledged; in manifest rounds, a few random
        // milliseconds after an image was acknowledged, inside the push of
        // the next one.
        let kill_at = rng.range(12 * MIB as u64, (BIG - 8 * MIB) as u64);
        let images_before_kill = rng.range(2, 7);
        let delay_after_ack = Duration::from_millis(rng.range(0, 20));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let staged = largest_new_staged(&data, &old_sessions);
            let blobs_now = ledger(&shared).blobs.len();
            let ready = if by_manifests {
                staged > 9 * MIB as u64 && images_acked.load(Ordering::SeqCst) >= images_before_kill
            } else {
                staged >= kill_at && blobs_now > blobs_before
            };
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: kill condition never met (staged {staged}, blobs {blobs_now})"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if by_manifests {
            let n = images_acked.load(Ordering::SeqCst);
            while images_acked.load(Ordering::SeqCst) == n {
                assert!(
                    Instant::now() < deadline,
                    "round {round}: image pushes stalled"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tokio::time::sleep(delay_after_ack).await;
        }
        let on_disk_at_kill = largest_new_staged(&data, &old_sessions);
        server.kill9();
        for t in tasks {
            tokio::time::timeout(PATIENCE, t)
                .await
                .expect("a client did not notice the kill")
                .expect("client task panicked");
        }
        let sent = sent.load(Ordering::SeqCst);
        {
            let l = ledger(&shared);
            eprintln!(
                "round {round}: killed during a {how:?} upload at {} MiB on disk ({} MiB sent); \
                 acknowledged so far: {} blobs, {} images; in doubt: {} blobs, {} images",
                on_disk_at_kill / MIB as u64,
                sent / MIB as u64,
                l.blobs.len(),
                l.images.len(),
                l.doubtful_blobs.len(),
                l.doubtful_images.len(),
            );
        }
        ledger(&shared).interrupted.push(big_blob.clone());
        if let Some(location) = location {
            unfinished = Some(Unfinished {
                blob: big_blob,
                location,
                data: big,
                on_disk_at_kill,
                sent,
            });
        }
        assert_fsck(&config, &format!("after the kill in round {round}"));
    }
    let l = ledger(&shared);
    assert!(l.blobs.len() as u64 >= ROUNDS, "too few acknowledged blobs");
    assert!(l.images.len() >= 4, "too few acknowledged images");
    eprintln!("crash test: {:?} in all", started.elapsed());
}

/// Bytes of every file under `dir`, recursively.
fn disk_usage(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => disk_usage(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

/// A monolithic push (`POST ?digest=`) killed by SIGKILL mid-body leaves
/// its staged bytes on disk, and no client can ever resume it: the next
/// start removes them, so the disk usage is back at once (not after
/// `storage.upload_max_age`). A chunked session whose client holds its
/// Location survives the same restart and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_monolithic_push_leaves_no_orphan_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let data = dir.path().join("data");
    let repo = "crash/orphans";
    let mut server = Server::start(&config);
    let c = TryClient::new(server.addr);
    let uploads_before = disk_usage(&data.join("uploads"));

    let chunked = random_bytes(2 * MIB, 11);
    let r = c
        .send(
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/"),
            &[],
            Bytes::new(),
        )
        .await
        .expect("start upload");
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    let loc = r.header("location").expect("Location").to_string();
    let session = loc.rsplit('/').next().unwrap().to_string();
    let r = c
        .send(
            Method::PATCH,
            &loc,
            &[("content-range", &format!("0-{}", MIB - 1))],
            Bytes::copy_from_slice(&chunked[..MIB]),
        )
        .await
        .expect("patch");
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");

    let big = Arc::new(random_bytes(BIG, 12));
    let head = format!(
        "POST /v2/{repo}/blobs/uploads/?digest={} HTTP/1.1\r\nHost: {}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {BIG}\r\n\r\n",
        common::sha256(&big),
        server.addr
    );
    let sent = Arc::new(AtomicU64::new(0));
    let streamer = tokio::spawn(stream_big(
        server.addr,
        head,
        big.clone(),
        Stream::Monolithic,
        sent,
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    while largest_new_staged(&data, std::slice::from_ref(&session)) < 24 * MIB as u64 {
        assert!(
            Instant::now() < deadline,
            "the monolithic push never staged 24 MiB"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill9();
    tokio::time::timeout(PATIENCE, streamer)
        .await
        .expect("the streamer did not notice the kill")
        .expect("streamer panicked");
    let left = disk_usage(&data.join("uploads"));
    assert!(
        left >= uploads_before + 24 * MIB as u64,
        "the kill left {left} bytes staged"
    );

    // The orphan is gone by the time the restarted server listens.
    let mut server = Server::start(&config);
    let c = TryClient::new(server.addr);
    assert_eq!(
        staged(&data),
        vec![(session.clone(), MIB as u64)],
        "only the chunked session is left"
    );
    let usage = disk_usage(&data.join("uploads"));
    assert!(
        usage <= uploads_before + MIB as u64,
        "{usage} bytes staged after the restart (before the pushes: {uploads_before})"
    );
    assert_eq!(
        c.get(&format!("/v2/{repo}/blobs/{}", common::sha256(&big)))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    // The chunked session resumes where it was.
    let r = c.get(&loc).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    assert_eq!(r.header("range"), Some(format!("0-{}", MIB - 1).as_str()));
    let r = c
        .send(
            Method::PUT,
            &with_query(&loc, &format!("digest={}", common::sha256(&chunked))),
            &[("content-range", &format!("{MIB}-{}", 2 * MIB - 1))],
            Bytes::copy_from_slice(&chunked[MIB..]),
        )
        .await
        .expect("finish");
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let b = Blob {
        repo: repo.to_string(),
        digest: common::sha256(&chunked),
        size: chunked.len() as u64,
    };
    assert_blob_intact(&c, &b, "resumed").await;
    assert!(server.terminate().await.success());
}
