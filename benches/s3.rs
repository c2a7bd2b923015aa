//! S3 benchmark: push and pull one big blob (1 GiB) through wharf on a
//! SeaweedFS bucket and through CNCF Distribution's s3 driver on the same
//! SeaweedFS, in the same run; each with and without redirects (wharf's
//! `redirect = true`, Distribution's default `redirect` of blob GETs).
//!
//!     cargo bench --bench s3 [-- --quick | --size-mib N | --reps N]
//!
//! Writes a markdown report to stdout and to `target/bench-s3-report.md`.
//! Under `cargo test` (no `--bench` argument) it does nothing.
//!
//! Every push is the Docker client's: `POST`, one `PATCH` with the whole
//! blob, `PUT ?digest=`. Every pull is a `GET` that follows a `307` to the
//! store when there is one; the bytes received are hashed (after the clock
//! stops) and must match.

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use common::seaweedfs::{ACCESS_KEY, BUCKET, SECRET_KEY, SeaweedFs};

type Http = Client<HttpConnector, Full<Bytes>>;

struct Target {
    name: String,
    base: String,
    _guard: Box<dyn std::any::Any>,
}

/// Distribution with its s3 driver on the bucket, under `root`.
struct Distribution(Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Distribution {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn distribution(sw: &SeaweedFs, root: &str, redirect: bool) -> (Distribution, String) {
    let program = common::require_tool("docker-registry");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  s3:\n    accesskey: {ACCESS_KEY}\n    secretkey: {SECRET_KEY}\n    region: us-east-1\n    regionendpoint: {}\n    bucket: {BUCKET}\n    rootdirectory: /{root}\n    secure: false\n    v4auth: true\n  delete:\n    enabled: true\n  redirect:\n    disable: {}\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: 127.0.0.1:{port}\n",
        sw.endpoint(),
        !redirect
    );
    std::fs::write(dir.path().join("config.yml"), config).unwrap();
    // Its s3 driver panics at start when AWS_CA_BUNDLE is set.
    let child = Command::new(program)
        .arg("serve")
        .arg(dir.path().join("config.yml"))
        .env_remove("AWS_CA_BUNDLE")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn docker-registry");
    (Distribution(child, dir), format!("http://127.0.0.1:{port}"))
}

async fn wait_ready(http: &Http, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let req = http::Request::get(format!("{base}/v2/"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        if let Ok(r) = http.request(req).await
            && r.status().is_success()
        {
            return;
        }
        assert!(Instant::now() < deadline, "{base} did not answer /v2/");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn absolute(base: &str, loc: &str) -> String {
    if loc.starts_with("http") {
        loc.to_string()
    } else {
        format!("{base}{loc}")
    }
}

async fn send(http: &Http, method: http::Method, url: &str, body: Bytes) -> http::Response<Bytes> {
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/octet-stream")
        .body(Full::new(body))
        .unwrap();
    let r = http.request(req).await.expect("request");
    let (parts, body) = r.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    http::Response::from_parts(parts, body)
}

/// POST, one PATCH with everything, PUT ?digest=. Returns the seconds.
async fn push(http: &Http, base: &str, repo: &str, blob: &Bytes, digest: &str) -> f64 {
    let start = Instant::now();
    let r = send(
        http,
        http::Method::POST,
        &format!("{base}/v2/{repo}/blobs/uploads/"),
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status(), 202, "POST on {base}");
    let loc = absolute(base, r.headers()["location"].to_str().unwrap());
    let r = send(http, http::Method::PATCH, &loc, blob.clone()).await;
    assert_eq!(r.status(), 202, "PATCH on {base}");
    let loc = absolute(base, r.headers()["location"].to_str().unwrap());
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = send(
        http,
        http::Method::PUT,
        &format!("{loc}{sep}digest={digest}"),
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status(), 201, "PUT on {base}: {:?}", r.body());
    start.elapsed().as_secs_f64()
}

/// GET (following one redirect). Returns the seconds and whether it was
/// redirected; checks the digest after the clock stopped.
async fn pull(http: &Http, base: &str, repo: &str, digest: &str, size: usize) -> (f64, bool) {
    let start = Instant::now();
    let mut url = format!("{base}/v2/{repo}/blobs/{digest}");
    let mut redirected = false;
    let mut body = Vec::with_capacity(size);
    loop {
        let req = http::Request::get(&url)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = http.request(req).await.expect("GET");
        if r.status().is_redirection() {
            url = absolute(base, r.headers()["location"].to_str().unwrap());
            redirected = true;
            continue;
        }
        assert_eq!(r.status(), 200, "GET {url}");
        let mut b = r.into_body();
        while let Some(frame) = b.frame().await {
            if let Ok(data) = frame.expect("frame").into_data() {
                body.extend_from_slice(&data);
            }
        }
        break;
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(body.len(), size);
    assert_eq!(common::sha256(&body), digest, "pulled bytes from {base}");
    (secs, redirected)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok())
    };
    let size = arg("--size-mib").unwrap_or(if quick { 256 } else { 1024 }) * 1024 * 1024;
    let reps = arg("--reps").unwrap_or(if quick { 1 } else { 3 });
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(size, reps));
}

async fn run(size: usize, reps: usize) {
    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    eprintln!("starting SeaweedFS");
    let sw = SeaweedFs::start().await;
    let env = [("WHARF_LOG", "warn")];
    let mut targets = Vec::new();
    for (name, extra) in [
        ("wharf", ""),
        ("wharf, redirect = true", "redirect = true\n"),
    ] {
        let w = sw.spawn_wharf(&format!("bench-{}", targets.len()), extra, &env, &[]);
        targets.push(Target {
            name: name.to_string(),
            base: w.url(),
            _guard: Box::new(w),
        });
    }
    for (name, redirect) in [
        ("Distribution s3", false),
        ("Distribution s3, redirect", true),
    ] {
        let (d, base) = distribution(&sw, &format!("distribution-{}", targets.len()), redirect);
        wait_ready(&http, &base).await;
        targets.push(Target {
            name: name.to_string(),
            base,
            _guard: Box::new(d),
        });
    }
    eprintln!("generating {} MiB", size >> 20);
    let blob = Bytes::from(common::cache::random_bytes(size, 42));
    let digest = common::sha256(&blob);
    let mut rows = Vec::new();
    for t in &targets {
        let (mut pushes, mut pulls) = (Vec::new(), Vec::new());
        let mut redirected = false;
        for rep in 0..reps {
            let repo = format!("bench/r{rep}");
            eprintln!("{}: push {}", t.name, rep + 1);
            pushes.push(push(&http, &t.base, &repo, &blob, &digest).await);
            eprintln!("{}: pull {}", t.name, rep + 1);
            let (secs, r) = pull(&http, &t.base, &repo, &digest, size).await;
            pulls.push(secs);
            redirected |= r;
        }
        rows.push((t.name.clone(), median(pushes), median(pulls), redirected));
    }
    let mib = (size >> 20) as f64;
    let mut report = format!(
        "# S3 benchmark\n\n{} MiB blob, median of {reps}, SeaweedFS `weed mini` on loopback, {} cores, load average at start {}.\n\n| server | push | push MiB/s | pull | pull MiB/s | pull redirected |\n|---|---|---|---|---|---|\n",
        size >> 20,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    );
    for (name, push, pull, redirected) in &rows {
        report.push_str(&format!(
            "| {name} | {push:.2} s | {:.0} | {pull:.2} s | {:.0} | {} |\n",
            mib / push,
            mib / pull,
            if *redirected { "yes" } else { "no" }
        ));
    }
    println!("{report}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-s3-report.md");
    let _ = std::fs::write(&out, &report);
    eprintln!("report written to {}", out.display());
}
