//! The content every server holds, how it gets there, and the scenarios.
//!
//! All three servers hold byte-identical content under the same paths:
//! wharf and Distribution receive it through the distribution API (the
//! same pushes), nginx gets the same bytes as files under
//! `root/v2/<repo>/blobs/<digest>` and `root/v2/<repo>/manifests/<ref>`.

use std::path::Path;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use wharf::oci::{Algorithm, Digest};

use crate::http::{self, Body, Conn, location_path, with_query};
use crate::load;
use crate::report::{Better, Figure, Pair};
use crate::servers::{Kind, Server};

pub const REPO: &str = "bench/app";
pub const TAG: &str = "v1";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// What containerd sends when it resolves a tag.
pub const ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*";

const MIB: f64 = 1024.0 * 1024.0;

pub fn size_text(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

pub fn log(msg: impl AsRef<str>) {
    eprintln!("==> {}", msg.as_ref());
}

/// Fills `buf` with fast pseudo-random bytes (xorshift64), distinct per seed.
pub fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

#[derive(Debug, Clone)]
pub struct Blob {
    pub digest: Digest,
    pub size: u64,
}

impl Blob {
    pub fn path(&self) -> String {
        format!("/v2/{REPO}/blobs/{}", self.digest)
    }
}

/// What was seeded.
pub struct Content {
    pub big: Blob,
    /// The big blob's bytes, kept for the push scenario.
    pub big_data: Vec<u8>,
    pub small: Vec<Blob>,
    pub manifest: Vec<u8>,
    pub manifest_digest: Digest,
}

impl Content {
    pub fn manifest_path(&self, by_digest: bool) -> String {
        if by_digest {
            format!("/v2/{REPO}/manifests/{}", self.manifest_digest)
        } else {
            format!("/v2/{REPO}/manifests/{TAG}")
        }
    }
}

/// POST, then PUT with the whole body: the spec's monolithic upload.
pub fn push_monolithic(s: &Server, data: &[u8], digest: &Digest) -> anyhow::Result<()> {
    let mut c = Conn::connect(s.addr)?;
    let r = c.request(
        "POST",
        &format!("/v2/{REPO}/blobs/uploads/"),
        &[],
        Body::None,
    )?;
    ensure!(
        r.status() == 202,
        "{}: POST upload: {} {}",
        s.name(),
        r.status(),
        r.text()
    );
    let loc = location_path(r.header("location").context("POST upload: no Location")?);
    let r = c.request(
        "PUT",
        &with_query(&loc, "digest", digest.as_str()),
        &[("Content-Type", "application/octet-stream")],
        Body::Bytes(data),
    )?;
    ensure!(
        r.status() == 201,
        "{}: PUT upload: {} {}",
        s.name(),
        r.status(),
        r.text()
    );
    Ok(())
}

/// POST, one PATCH per `chunk` bytes with Content-Range, then an empty PUT.
pub fn push_chunked(s: &Server, data: &[u8], digest: &Digest, chunk: usize) -> anyhow::Result<()> {
    let mut c = Conn::connect(s.addr)?;
    let r = c.request(
        "POST",
        &format!("/v2/{REPO}/blobs/uploads/"),
        &[],
        Body::None,
    )?;
    ensure!(
        r.status() == 202,
        "{}: POST upload: {} {}",
        s.name(),
        r.status(),
        r.text()
    );
    let mut loc = location_path(r.header("location").context("POST upload: no Location")?);
    for (i, part) in data.chunks(chunk).enumerate() {
        let start = i * chunk;
        let range = format!("{}-{}", start, start + part.len() - 1);
        let r = c.request(
            "PATCH",
            &loc,
            &[
                ("Content-Type", "application/octet-stream"),
                ("Content-Range", &range),
            ],
            Body::Bytes(part),
        )?;
        ensure!(
            r.status() == 202,
            "{}: PATCH {range}: {} {}",
            s.name(),
            r.status(),
            r.text()
        );
        loc = location_path(r.header("location").context("PATCH: no Location")?);
    }
    let r = c.request(
        "PUT",
        &with_query(&loc, "digest", digest.as_str()),
        &[],
        Body::None,
    )?;
    ensure!(
        r.status() == 201,
        "{}: PUT upload: {} {}",
        s.name(),
        r.status(),
        r.text()
    );
    Ok(())
}

/// Puts one blob into every server.
pub fn seed_blob(servers: &[Server], data: &[u8]) -> anyhow::Result<Blob> {
    let blob = Blob {
        digest: Digest::sha256_of(data),
        size: data.len() as u64,
    };
    for s in servers {
        if s.kind.is_registry() {
            push_monolithic(s, data, &blob.digest)?;
            let r = http::request(s.addr, "HEAD", &blob.path(), &[], Body::None)?;
            ensure!(
                r.status() == 200 && r.head.content_length() == Some(blob.size),
                "{}: HEAD after push: {}",
                s.name(),
                r.status()
            );
        } else {
            let dir = s.nginx_root().join(format!("v2/{REPO}/blobs"));
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join(blob.digest.as_str()), data)?;
        }
    }
    Ok(blob)
}

/// Generates the content and puts it, identically, into every server.
pub fn seed(servers: &[Server], big: u64, small: u64, streams: usize) -> anyhow::Result<Content> {
    log(format!(
        "seeding: 1 × {} + {streams} × {} blobs, a config and a manifest",
        size_text(big),
        size_text(small)
    ));
    let mut big_data = vec![0u8; big as usize];
    fill(&mut big_data, 1);
    let big_blob = seed_blob(servers, &big_data)?;
    let mut small_blobs = Vec::with_capacity(streams);
    let mut buf = vec![0u8; small as usize];
    for i in 0..streams {
        fill(&mut buf, 100 + i as u64);
        small_blobs.push(seed_blob(servers, &buf)?);
    }
    drop(buf);

    // An image manifest of a realistic size (~1 KiB): config + 4 layers.
    let layers: Vec<&Blob> = std::iter::once(&big_blob)
        .chain(small_blobs.iter().take(3))
        .collect();
    let diff_ids: Vec<String> = layers.iter().map(|b| format!("\"{}\"", b.digest)).collect();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Cmd":["/bin/sh"]}},"rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
        diff_ids.join(",")
    );
    let config_blob = seed_blob(servers, config.as_bytes())?;
    let layer_json: Vec<String> = layers
        .iter()
        .map(|b| {
            format!(
                r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}"#,
                b.digest, b.size
            )
        })
        .collect();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{}],"annotations":{{"org.opencontainers.image.title":"wharf benchmark"}}}}"#,
        config_blob.digest,
        config_blob.size,
        layer_json.join(",")
    )
    .into_bytes();
    let manifest_digest = Digest::sha256_of(&manifest);
    for s in servers {
        if s.kind.is_registry() {
            let r = http::request(
                s.addr,
                "PUT",
                &format!("/v2/{REPO}/manifests/{TAG}"),
                &[("Content-Type", OCI_MANIFEST)],
                Body::Bytes(&manifest),
            )?;
            ensure!(
                r.status() == 201,
                "{}: PUT manifest: {} {}",
                s.name(),
                r.status(),
                r.text()
            );
            ensure!(
                r.header("docker-content-digest") == Some(manifest_digest.as_str()),
                "{}: manifest digest {:?}, expected {manifest_digest}",
                s.name(),
                r.header("docker-content-digest")
            );
        } else {
            let dir = s.nginx_root().join(format!("v2/{REPO}/manifests"));
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join(TAG), &manifest)?;
            std::fs::write(dir.join(manifest_digest.as_str()), &manifest)?;
        }
    }
    sync();
    Ok(Content {
        big: big_blob,
        big_data,
        small: small_blobs,
        manifest,
        manifest_digest,
    })
}

/// Flushes dirty pages, so one server's writes are not flushed on
/// another's time.
pub fn sync() {
    let _ = std::process::Command::new("sync").status();
}

/// The order in which `n` servers take turns over `reps` rounds: round `r`
/// starts with server `r mod n` (A B C, B C A, ...). Yields (round, server
/// index).
pub fn turns(n: usize, reps: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..reps).flat_map(move |r| (0..n).map(move |i| (r, (i + r) % n)))
}

/// Runs `f` `reps` times per server, the servers taking turns (A B C,
/// B C A, ...). `f` returns the figure values of one run.
pub fn alternate(
    servers: &[&Server],
    reps: usize,
    mut f: impl FnMut(&Server, usize) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    for (r, i) in turns(servers.len(), reps) {
        f(servers[i], r)?;
    }
    Ok(())
}

/// Runs `f(i)` for `i` in `0..n`, each on its own thread, all released
/// together. Returns the release instant, the time from it until the last
/// thread ended, and every thread's result.
///
/// The release instant is the earliest clock reading taken right after the
/// barrier, by any thread: with more threads than cores, the thread that
/// started the clock could otherwise be scheduled well after the others.
pub fn together<T: Send>(
    n: usize,
    f: impl Fn(usize) -> T + Sync,
) -> anyhow::Result<(Instant, Duration, Vec<T>)> {
    let barrier = Barrier::new(n + 1);
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (barrier, f) = (&barrier, &f);
                sc.spawn(move || {
                    barrier.wait();
                    let released = Instant::now();
                    (released, f(i))
                })
            })
            .collect();
        barrier.wait();
        let mut t0 = Instant::now();
        let mut out = Vec::with_capacity(n);
        for h in handles {
            let (released, r) = h
                .join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
            t0 = t0.min(released);
            out.push(r);
        }
        Ok((t0, t0.elapsed(), out))
    })
}

/// Peak RSS and CPU time of each server while `f` runs.
pub struct Usage {
    pub per: Vec<(Kind, f64, f64)>,
}

pub fn tracked<T>(servers: &[&Server], f: impl FnOnce() -> T) -> (T, Usage) {
    let reset_ok = servers.iter().all(|s| s.reset_peak());
    let cpu0: Vec<f64> = servers.iter().map(|s| s.cpu_seconds()).collect();
    let sampled: Vec<AtomicU64> = servers
        .iter()
        .map(|s| AtomicU64::new(s.rss_kib()))
        .collect();
    let stop = AtomicBool::new(false);
    let out = std::thread::scope(|sc| {
        if !reset_ok {
            // Without clear_refs, sample VmRSS instead.
            sc.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    for (s, m) in servers.iter().zip(&sampled) {
                        m.fetch_max(s.rss_kib(), Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
        let out = f();
        stop.store(true, Ordering::Relaxed);
        out
    });
    let per = servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let peak = if reset_ok {
                s.peak_kib()
            } else {
                sampled[i].load(Ordering::Relaxed)
            };
            (s.kind, peak as f64 / 1024.0, s.cpu_seconds() - cpu0[i])
        })
        .collect();
    (out, Usage { per })
}

// ---- start-to-ready and idle memory ----

pub fn startup(
    servers: &mut [Server],
    reps: usize,
    settle: Duration,
) -> anyhow::Result<(Figure, Figure)> {
    let mut ready = Figure::new(
        "start_ms",
        "Start-to-ready (spawn → first 200 on GET /v2/, content present)",
        "ms",
        Better::Lower,
        1,
    );
    let mut idle = Figure::new(
        "idle_rss",
        "Idle RSS after start (before any load)",
        "MiB",
        Better::Lower,
        1,
    );
    for (_, i) in turns(servers.len(), reps) {
        let s = &mut servers[i];
        s.stop();
        let t = s.start()?;
        ready.push(s.kind, t.as_secs_f64() * 1e3);
        std::thread::sleep(settle);
        idle.push(s.kind, s.rss_kib() as f64 / 1024.0);
    }
    Ok((ready, idle))
}

// ---- blobs ----

/// When a blob GET received its first body byte and its last.
#[derive(Debug, Clone, Copy)]
pub struct Fetched {
    pub first_byte: Instant,
    pub done: Instant,
}

/// GETs a blob at `path` on a fresh connection, streaming the body (never
/// held in memory). With `verify`, hashes the body as it arrives and checks
/// it against the digest.
pub fn fetch_blob(s: &Server, path: &str, blob: &Blob, verify: bool) -> anyhow::Result<Fetched> {
    let mut conn = Conn::connect(s.addr)?;
    let mut hasher = verify.then(|| Algorithm::Sha256.hasher());
    let mut first_byte = None;
    let (head, n) = conn.stream("GET", path, &[], &mut |b| {
        if first_byte.is_none() && !b.is_empty() {
            first_byte = Some(Instant::now());
        }
        if let Some(h) = hasher.as_mut() {
            h.update(b);
        }
    })?;
    let done = Instant::now();
    ensure!(
        head.status == 200,
        "{}: GET blob: status {}",
        s.name(),
        head.status
    );
    ensure!(
        n == blob.size,
        "{}: GET blob: {n} bytes, expected {}",
        s.name(),
        blob.size
    );
    if let Some(h) = hasher {
        let got = h.finish();
        ensure!(
            got == blob.digest,
            "{}: GET blob: content hashes to {got}",
            s.name()
        );
    }
    Ok(Fetched {
        first_byte: first_byte.unwrap_or(done),
        done,
    })
}

/// GETs a blob on a fresh connection. With `verify`, hashes the body and
/// checks it. Returns the time from connect to the last byte.
fn get_blob(s: &Server, blob: &Blob, verify: bool) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let got = fetch_blob(s, &blob.path(), blob, verify)?;
    Ok(got.done - t0)
}

/// One stream of the big blob.
pub fn blob_single(servers: &[&Server], c: &Content, reps: usize) -> anyhow::Result<Figure> {
    let mut f = Figure::new(
        "blob1",
        &format!("Warm blob GET, 1 stream × {}", size_text(c.big.size)),
        "MiB/s",
        Better::Higher,
        0,
    );
    for s in servers {
        get_blob(s, &c.big, true)?; // verifies content, warms the cache
    }
    alternate(servers, reps, |s, _| {
        let t = get_blob(s, &c.big, false)?;
        f.push(s.kind, c.big.size as f64 / MIB / t.as_secs_f64());
        Ok(())
    })?;
    Ok(f)
}

/// N concurrent streams, one per small blob; aggregate throughput.
pub fn blob_streams(servers: &[&Server], c: &Content, reps: usize) -> anyhow::Result<Figure> {
    let n = c.small.len();
    let size = c.small.first().map(|b| b.size).unwrap_or(0);
    let mut f = Figure::new(
        "blob16",
        &format!(
            "Warm blob GET, {n} concurrent streams × {} (aggregate)",
            size_text(size)
        ),
        "MiB/s",
        Better::Higher,
        0,
    );
    for s in servers {
        for b in &c.small {
            get_blob(s, b, true)?;
        }
    }
    alternate(servers, reps, |s, _| {
        let (_, wall, results) = together(n, |i| get_blob(s, &c.small[i], false))?;
        for r in results {
            r?;
        }
        f.push(s.kind, (n as u64 * size) as f64 / MIB / wall.as_secs_f64());
        Ok(())
    })?;
    Ok(f)
}

// ---- manifests ----

pub struct LoadOpts {
    pub connections: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub client_threads: usize,
}

/// Checks that every server answers the manifest identically.
fn verify_manifest(servers: &[&Server], c: &Content) -> anyhow::Result<()> {
    for s in servers {
        for by_digest in [false, true] {
            let path = c.manifest_path(by_digest);
            let r = http::request(s.addr, "GET", &path, &[("Accept", ACCEPT)], Body::None)?;
            ensure!(
                r.status() == 200,
                "{}: GET {path}: {} {}",
                s.name(),
                r.status(),
                r.text()
            );
            ensure!(
                r.body == c.manifest,
                "{}: GET {path}: different bytes",
                s.name()
            );
            if s.kind.is_registry() {
                ensure!(
                    r.header("docker-content-digest") == Some(c.manifest_digest.as_str()),
                    "{}: GET {path}: wrong Docker-Content-Digest",
                    s.name()
                );
            }
            let r = http::request(s.addr, "HEAD", &path, &[("Accept", ACCEPT)], Body::None)?;
            ensure!(
                r.status() == 200 && r.head.content_length() == Some(c.manifest.len() as u64),
                "{}: HEAD {path}: {} (Content-Length {:?})",
                s.name(),
                r.status(),
                r.head.content_length()
            );
        }
    }
    Ok(())
}

/// GET and HEAD, by tag and by digest: req/s, p50 and p99 for each.
pub fn manifests(
    servers: &[&Server],
    c: &Content,
    reps: usize,
    o: &LoadOpts,
    notes: &mut Vec<String>,
) -> anyhow::Result<Vec<Figure>> {
    verify_manifest(servers, c)?;
    let mut figures = Vec::new();
    for (method, by_digest) in [
        ("GET", false),
        ("HEAD", false),
        ("GET", true),
        ("HEAD", true),
    ] {
        let what = if by_digest { "digest" } else { "tag" };
        let id = format!("manifest_{}_{what}", method.to_lowercase());
        let label = format!("Manifest {method} by {what}, {} connections", o.connections);
        let mut rps = Figure::new(&format!("{id}_rps"), &label, "req/s", Better::Higher, 0);
        let mut p50 = Figure::new(
            &format!("{id}_p50"),
            &format!("{label}: p50"),
            "ms",
            Better::Lower,
            2,
        );
        let mut p99 = Figure::new(
            &format!("{id}_p99"),
            &format!("{label}: p99"),
            "ms",
            Better::Lower,
            2,
        );
        let path = c.manifest_path(by_digest);
        let headers = [("Accept", ACCEPT)];
        log(format!("manifest {method} by {what}"));
        for s in servers {
            load::run(
                s.addr,
                method,
                &path,
                &headers,
                o.connections,
                o.warmup,
                o.client_threads,
            )?;
        }
        alternate(servers, reps, |s, _| {
            let r = load::run(
                s.addr,
                method,
                &path,
                &headers,
                o.connections,
                o.duration,
                o.client_threads,
            )?;
            ensure!(
                r.ok > 0,
                "{label} on {}: no request succeeded (first error: {})",
                s.name(),
                r.first_error.as_deref().unwrap_or("?")
            );
            if r.errors > 0 {
                notes.push(format!(
                    "{label} on {}: {} failed requests in one run (first: {}).",
                    s.name(),
                    r.errors,
                    r.first_error.as_deref().unwrap_or("?")
                ));
            }
            rps.push(s.kind, r.rps);
            p50.push(s.kind, r.p50_ms);
            p99.push(s.kind, r.p99_ms);
            Ok(())
        })?;
        figures.extend([rps, p50, p99]);
    }
    Ok(figures)
}

/// `wrk` on GET by tag, as a cross-check of the load generator.
pub fn wrk_cross_check(
    servers: &[&Server],
    c: &Content,
    reps: usize,
    o: &LoadOpts,
    notes: &mut Vec<String>,
) -> anyhow::Result<Vec<Figure>> {
    let label = format!(
        "Manifest GET by tag, {} connections, measured by wrk",
        o.connections
    );
    let mut rps = Figure::new("wrk_get_tag_rps", &label, "req/s", Better::Higher, 0);
    let mut p99 = Figure::new(
        "wrk_get_tag_p99",
        &format!("{label}: p99"),
        "ms",
        Better::Lower,
        2,
    );
    let path = c.manifest_path(false);
    alternate(servers, reps, |s, _| {
        let secs = o.duration.as_secs_f64().round().max(1.0) as u64;
        let out = std::process::Command::new("wrk")
            .args([
                &format!("-t{}", o.client_threads.max(1)),
                &format!("-c{}", o.connections),
                &format!("-d{secs}s"),
                "--latency",
                "-H",
                &format!("Accept: {ACCEPT}"),
                &format!("{}{path}", s.url()),
            ])
            .output()
            .context("running wrk")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let parsed = parse_wrk(&text).with_context(|| {
            format!(
                "unexpected wrk output:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        if let Some(bad) = parsed.problems {
            notes.push(format!("wrk against {}: {bad}", s.name()));
        }
        rps.push(s.kind, parsed.rps);
        p99.push(s.kind, parsed.p99_ms);
        Ok(())
    })?;
    Ok(vec![rps, p99])
}

struct Wrk {
    rps: f64,
    p99_ms: f64,
    problems: Option<String>,
}

fn wrk_ms(v: &str) -> Option<f64> {
    let (num, unit) = v.split_at(v.find(|ch: char| ch.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

fn parse_wrk(text: &str) -> Option<Wrk> {
    let mut rps = None;
    let mut p99 = None;
    let mut problems = Vec::new();
    for l in text.lines() {
        let t = l.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().ok();
        } else if let Some(v) = t.strip_prefix("99%") {
            p99 = wrk_ms(v.trim());
        } else if t.starts_with("Non-2xx") || t.starts_with("Socket errors") {
            problems.push(t.to_string());
        }
    }
    Some(Wrk {
        rps: rps?,
        p99_ms: p99?,
        problems: (!problems.is_empty()).then(|| problems.join("; ")),
    })
}

// ---- push ----

/// Pushes of the big blob, monolithic and chunked. Each repetition pushes
/// different content (its last 8 bytes are a counter), so nothing is
/// deduplicated; the pushed blob's file is removed afterwards, off the
/// clock, to bound disk use, and `sync` runs before every push.
pub fn push(
    servers: &[&Server],
    data: &mut [u8],
    reps: usize,
    chunk: usize,
) -> anyhow::Result<Vec<Figure>> {
    let size = data.len();
    ensure!(size > 8, "push data too small");
    let mut prefix = Algorithm::Sha256.hasher();
    prefix.update(&data[..size - 8]);
    let mut counter = 0u64;
    let mut figures = Vec::new();
    for chunked in [false, true] {
        let (id, label) = if chunked {
            (
                "push_chunked",
                format!(
                    "Push {}, chunked ({} PATCHes of {})",
                    size_text(size as u64),
                    size.div_ceil(chunk),
                    size_text(chunk as u64)
                ),
            )
        } else {
            (
                "push_mono",
                format!(
                    "Push {}, monolithic (POST + one PUT)",
                    size_text(size as u64)
                ),
            )
        };
        log(label.clone());
        let mut f = Figure::new(id, &label, "MiB/s", Better::Higher, 0);
        alternate(servers, reps, |s, _| {
            counter += 1;
            data[size - 8..].copy_from_slice(&counter.to_le_bytes());
            let mut h = prefix.clone();
            h.update(&data[size - 8..]);
            let digest = h.finish();
            sync();
            let t0 = Instant::now();
            if chunked {
                push_chunked(s, data, &digest, chunk)?;
            } else {
                push_monolithic(s, data, &digest)?;
            }
            let t = t0.elapsed();
            let blob = Blob {
                digest: digest.clone(),
                size: size as u64,
            };
            let r = http::request(s.addr, "HEAD", &blob.path(), &[], Body::None)?;
            ensure!(
                r.status() == 200,
                "{}: pushed blob not found: {}",
                s.name(),
                r.status()
            );
            if let Some(file) = s.blob_file(digest.hex()) {
                match std::fs::remove_file(&file) {
                    Ok(()) => {}
                    Err(e) => bail!("{}: removing pushed blob {}: {e}", s.name(), file.display()),
                }
            }
            f.push(s.kind, size as f64 / MIB / t.as_secs_f64());
            Ok(())
        })?;
        figures.push(f);
    }
    Ok(figures)
}

// ---- hashing ----

/// sha256 throughput: wharf's hasher in process against `sha256sum` on the
/// same bytes (a page-cached file).
pub fn hashing(data: &[u8], work: &Path, reps: usize) -> anyhow::Result<Pair> {
    let file = work.join("hash-input.bin");
    std::fs::write(&file, data)?;
    let expected = Digest::sha256_of(data);
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let run_sha256sum = || -> anyhow::Result<f64> {
        let t0 = Instant::now();
        let out = std::process::Command::new("sha256sum")
            .arg(&file)
            .output()?;
        let t = t0.elapsed();
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.starts_with(expected.hex()),
            "sha256sum printed {text:?}"
        );
        Ok(data.len() as f64 / MIB / t.as_secs_f64())
    };
    let run_ours = || -> anyhow::Result<f64> {
        let t0 = Instant::now();
        let mut h = Algorithm::Sha256.hasher();
        // The chunk size the blob store reads with.
        for c in data.chunks(512 * 1024) {
            h.update(c);
        }
        let d = h.finish();
        let t = t0.elapsed();
        ensure!(d == expected, "hash mismatch");
        Ok(data.len() as f64 / MIB / t.as_secs_f64())
    };
    run_sha256sum()?; // warm the file and the binary
    for r in 0..reps {
        if r % 2 == 0 {
            ours.push(run_ours()?);
            theirs.push(run_sha256sum()?);
        } else {
            theirs.push(run_sha256sum()?);
            ours.push(run_ours()?);
        }
    }
    let _ = std::fs::remove_file(&file);
    Ok(Pair {
        label: format!(
            "sha256 of {} (in memory / page-cached file)",
            size_text(data.len() as u64)
        ),
        unit: "MiB/s",
        decimals: 0,
        a: ("wharf hasher (sha2, in process)", ours),
        b: ("sha256sum", theirs),
    })
}

/// Checks run by `cargo test`.
pub fn self_check() {
    let w = parse_wrk(
        "  Latency Distribution\n     50%  250.00us\n     99%    1.50ms\nRequests/sec:  1234.50\n",
    )
    .unwrap();
    assert_eq!(w.rps, 1234.5);
    assert_eq!(w.p99_ms, 1.5);
    assert!(w.problems.is_none());
    assert_eq!(wrk_ms("2.00s"), Some(2000.0));
    let mut a = [0u8; 13];
    let mut b = [0u8; 13];
    fill(&mut a, 1);
    fill(&mut b, 2);
    assert_ne!(a, b);
    assert_eq!(size_text(1 << 30), "1 GiB");
    assert_eq!(size_text(64 << 20), "64 MiB");
    let order: Vec<(usize, usize)> = turns(2, 2).collect();
    assert_eq!(order, [(0, 0), (0, 1), (1, 1), (1, 0)]);
    let (_, _, out) = together(3, |i| i * 2).unwrap();
    assert_eq!(out, [0, 2, 4]);
}
