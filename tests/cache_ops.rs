//! Operating the pull-through cache, against the real binary and a scripted
//! fake upstream: the `cache.max_size` budget (LRU eviction that never
//! deletes pushed content, and never a blob a response is streaming),
//! `/metrics`, `/healthz`, `/readyz`, the admin API (`/_wharf/cache/stats`,
//! `/_wharf/cache/refresh`) and the `wharf cache stats|refresh|warm`
//! commands.
//!
//! The evictor runs in the background, so budget assertions poll
//! `/_wharf/cache/stats` until a state is reached (or a deadline passes);
//! no assertion depends on a sleep.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cache::{
    random_bytes, rule, seed_image, seed_index, seed_platform_image, stored_blobs,
};
use common::fake_upstream::{FakeUpstream, Fault};
use common::http::{HttpClient, Method, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

const MIB: usize = 1024 * 1024;

/// How long the evictor (or anything else asynchronous) may take to reach
/// a state. Generous: CI runs two test binaries' tests at once on 2 cores.
const DEADLINE: Duration = Duration::from_secs(60);

/// How long one `wharf cache ...` command may run.
const CLI_TIMEOUT: Duration = Duration::from_secs(120);

// ---- helpers ----

/// `GET /_wharf/cache/stats`, which must answer 200 with JSON.
async fn stats(http: &HttpClient) -> Value {
    let r = http.get("/_wharf/cache/stats").await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

/// Polls the stats until `done` holds; panics with the last stats after
/// [`DEADLINE`].
async fn wait_for_stats(http: &HttpClient, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let s = stats(http).await;
        // Only once every fill is published (see `settled`).
        if s["fills"]["in_progress"] == json!(0) && done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {DEADLINE:?}; last stats: {s:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The stats once no fill is in progress. A client gets a pulled blob's
/// bytes as soon as they are verified; the cache counts the blob (budget,
/// stats) once it is durable and published, a moment later.
async fn settled(http: &HttpClient) -> Value {
    wait_for_stats(http, "fills published", |_| true).await
}

/// Whether the budget holds (`size_bytes <= max_size_bytes`).
fn within_budget(s: &Value) -> bool {
    s["budget"]["size_bytes"].as_u64().unwrap() <= s["budget"]["max_size_bytes"].as_u64().unwrap()
}

/// The `/metrics` exposition (checked to be OpenMetrics text).
async fn metrics(http: &HttpClient) -> String {
    let r = http.get("/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    let ct = r.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("application/openmetrics-text"),
        "content-type {ct:?}"
    );
    String::from_utf8(r.body.to_vec()).expect("metrics are UTF-8")
}

/// The value of one series (its name and labels exactly as exposed, e.g.
/// `wharf_cache_hits_total{kind="blob"}`), if present.
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}

/// Like [`sample`], panicking with the exposition when the series is absent.
fn value(exposition: &str, series: &str) -> f64 {
    sample(exposition, series)
        .unwrap_or_else(|| panic!("no series {series} in /metrics:\n{exposition}"))
}

/// Runs `wharf ARGS...` (a `cache` subcommand) to completion off the async
/// runtime, killing it after [`CLI_TIMEOUT`].
async fn wharf_cli(args: &[&str]) -> Output {
    let child = Command::new(common::wharf_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wharf");
    let pid = child.id();
    let waited = tokio::time::timeout(
        CLI_TIMEOUT,
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    match waited {
        Ok(out) => out.expect("join").expect("wait for wharf"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("wharf {args:?} did not finish within {CLI_TIMEOUT:?}");
        }
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// GETs a blob through wharf and checks it is complete and hashes to
/// `digest`.
async fn get_blob(http: &HttpClient, repo: &str, digest: &str) {
    let r = http.get(&format!("/v2/{repo}/blobs/{digest}")).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "GET {repo}@{digest}: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(common::sha256(&r.body), digest, "{repo}@{digest}: body");
}

/// GETs a manifest through wharf; returns its `Docker-Content-Digest`
/// (checked against the body).
async fn get_manifest(http: &HttpClient, repo: &str, reference: &str) -> String {
    let r = http.get(&format!("/v2/{repo}/manifests/{reference}")).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "GET {repo}:{reference}: {}",
        String::from_utf8_lossy(&r.body)
    );
    let d = r
        .header("docker-content-digest")
        .expect("docker-content-digest")
        .to_string();
    assert_eq!(common::sha256(&r.body), d, "{repo}:{reference}: body");
    d
}

/// Pulls an image's manifest and layer (not its config: configs are
/// budgeted too, and would make the LRU arithmetic depend on them).
async fn pull(http: &HttpClient, repo: &str, layer: &str) {
    get_manifest(http, repo, "v1").await;
    get_blob(http, repo, layer).await;
}

fn has(data: &std::path::Path, digest: &str) -> bool {
    stored_blobs(data).iter().any(|d| d == digest)
}

/// A POST with the whole blob and `?digest=` (a monolithic upload).
async fn push_monolithic(http: &HttpClient, repo: &str, data: &[u8]) -> String {
    let digest = common::sha256(data);
    let len = data.len().to_string();
    let r = http
        .send(
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/?digest={digest}"),
            &[
                ("content-type", "application/octet-stream"),
                ("content-length", &len),
            ],
            Bytes::copy_from_slice(data),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "monolithic upload: {r:?}");
    digest
}

// ---- the budget ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lru_eviction_keeps_the_budget_and_never_touches_pushed_content() {
    let fake = FakeUpstream::start();
    // Five upstream images a..e, each with a 1 MiB layer.
    let names = ["a", "b", "c", "d", "e"];
    let mut layer = std::collections::HashMap::new();
    let mut bytes = std::collections::HashMap::new();
    for (i, n) in names.iter().enumerate() {
        let data = random_bytes(MIB, 100 + i as u64);
        let (_, ld, _) = seed_image(&fake, n, "v1", &data);
        layer.insert(*n, ld);
        bytes.insert(*n, data);
    }
    let w = common::spawn_wharf(&format!(
        "[cache]\nmax_size = \"2560KiB\"\n\n{}",
        rule("up", &fake, "")
    ));
    let http = HttpClient::new(w.url());
    let data = w.data_dir();
    let (a, b, c, d, e) = (
        layer["a"].as_str(),
        layer["b"].as_str(),
        layer["c"].as_str(),
        layer["d"].as_str(),
        layer["e"].as_str(),
    );
    let upstream_gets = |n: &str| fake.count("GET", &format!("/v2/{n}/blobs/{}", layer[n]));

    // Pushed content: never budgeted, never evicted.
    let p_bytes = random_bytes(MIB, 99);
    let p = http.push_blob("mine/app", &p_bytes).await;
    let s = stats(&http).await;
    assert_eq!(s["budget"]["max_size_bytes"], json!(2560 * 1024));
    assert_eq!(
        s["budget"]["size_bytes"],
        json!(0),
        "pushes are not budgeted"
    );

    pull(&http, "up/a", a).await;
    pull(&http, "up/b", b).await;
    let s = settled(&http).await;
    assert_eq!(s["budget"]["size_bytes"], json!(2 * MIB));
    assert_eq!(s["evictions"], json!(0));
    // a is used again: b is now the least recently used.
    get_blob(&http, "up/a", a).await;
    assert_eq!(upstream_gets("a"), 1, "the second GET of a is a hit");
    pull(&http, "up/c", c).await;

    let s = wait_for_stats(&http, "eviction after c", |s| {
        within_budget(s) && s["evictions"].as_u64() >= Some(1)
    })
    .await;
    assert_eq!(s["evictions"], json!(1), "one eviction was enough: {s:#}");
    assert_eq!(s["evicted_bytes"], json!(MIB));
    assert_eq!(s["budget"]["size_bytes"], json!(2 * MIB));
    assert_eq!(s["budget"]["blobs"], json!(2));
    assert!(!has(&data, b), "b, the least recently used, was evicted");
    assert!(has(&data, a) && has(&data, c), "a and c stay");
    assert!(has(&data, &p), "the pushed blob stays");
    let m = metrics(&http).await;
    assert_eq!(value(&m, "wharf_cache_evictions_total"), 1.0);
    assert_eq!(value(&m, "wharf_cache_evicted_bytes_total"), MIB as f64);
    assert_eq!(value(&m, "wharf_cache_size_bytes"), (2 * MIB) as f64);

    // b again: fetched anew, whole and right. a is used first so that c,
    // not a, is the next to go: a must still be cached when it is pushed
    // below.
    get_blob(&http, "up/a", a).await;
    get_blob(&http, "up/b", b).await;
    assert_eq!(upstream_gets("b"), 2, "an evicted blob is fetched again");
    let s = wait_for_stats(&http, "eviction after b's refetch", |s| {
        within_budget(s) && s["evictions"].as_u64() >= Some(2)
    })
    .await;
    assert_eq!(s["evictions"], json!(2), "{s:#}");
    assert!(!has(&data, c), "c was the least recently used");
    assert!(has(&data, a) && has(&data, b) && has(&data, &p));

    // Pin: the very bytes of cached blob a are pushed into a hosted
    // repository. From now on a is pushed content: never evicted, and not
    // counted (config/wharf.toml: "Pushed blobs are neither counted nor
    // evicted"), so b and d fit and nothing needs evicting.
    let pinned = push_monolithic(&http, "mine/copy", &bytes["a"]).await;
    assert_eq!(pinned, a);
    pull(&http, "up/d", d).await;
    let s = wait_for_stats(&http, "budget after d", within_budget).await;
    assert!(has(&data, a), "a pushed blob is never evicted (after d)");
    assert!(
        has(&data, b),
        "b was evicted although only b and d (2 MiB of 2.5) count once a is pushed: {s:#}"
    );
    assert_eq!(s["evictions"], json!(2), "{s:#}");
    assert_eq!(s["budget"]["size_bytes"], json!(2 * MIB), "b and d: {s:#}");
    pull(&http, "up/e", e).await;
    let s = wait_for_stats(&http, "eviction after e", |s| {
        within_budget(s) && s["evictions"].as_u64() >= Some(3)
    })
    .await;
    assert_eq!(s["evictions"], json!(3), "{s:#}");
    assert_eq!(s["budget"]["size_bytes"], json!(2 * MIB), "d and e");
    assert!(!has(&data, b), "b went again");
    assert!(has(&data, a), "a pushed blob is never evicted (after e)");
    assert!(has(&data, d) && has(&data, e) && has(&data, &p));

    // a is served through the hosted repository and, from the store,
    // through the cached one; the pushed blob is intact.
    get_blob(&http, "mine/copy", a).await;
    get_blob(&http, "up/a", a).await;
    assert_eq!(upstream_gets("a"), 1, "a was never fetched again");
    get_blob(&http, "mine/app", &p).await;
    assert_eq!(
        value(&metrics(&http).await, "wharf_cache_evictions_total"),
        3.0
    );
}

/// A client that reads a blob response with a pause in the middle: through
/// a connection with a small receive buffer, it reads at least
/// `stall_after` bytes, reports that on `stalled`, reads nothing more until
/// `resume` turns true, then reads the rest at about `rate` bytes per
/// second. `Err` says where the body broke.
async fn stalling_get(
    url: http::Uri,
    stall_after: usize,
    rate: f64,
    stalled: tokio::sync::mpsc::Sender<()>,
    mut resume: tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<u8>, String> {
    let mut connector = HttpConnector::new();
    connector.set_recv_buffer_size(Some(32 * 1024));
    let client = Client::builder(TokioExecutor::new()).build::<_, Empty<Bytes>>(connector);
    let resp = client.get(url).await.map_err(|e| format!("request: {e}"))?;
    if resp.status() != 200 {
        return Err(format!("status {}", resp.status()));
    }
    let mut body = resp.into_body();
    let mut out = Vec::new();
    let mut paced_from: Option<(tokio::time::Instant, usize)> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body broke after {} bytes: {e}", out.len()))?;
        if let Some(d) = frame.data_ref() {
            out.extend_from_slice(d);
        }
        match paced_from {
            None if out.len() >= stall_after => {
                let _ = stalled.send(()).await;
                resume
                    .wait_for(|go| *go)
                    .await
                    .map_err(|_| "the test ended".to_string())?;
                paced_from = Some((tokio::time::Instant::now(), out.len()));
            }
            None => {}
            Some((at, from)) => {
                let due = at + Duration::from_secs_f64((out.len() - from) as f64 / rate);
                tokio::time::sleep_until(due).await;
            }
        }
    }
    Ok(out)
}

/// Pulls each of `blobs` (under `up/y<i>`) twice, then the one before it
/// again, from three concurrent clients: every pull of an evicted blob
/// fetches and budgets it anew, so the evictor keeps running.
async fn churn(http: &HttpClient, blobs: &[String]) {
    let tasks: Vec<_> = (0..3)
        .map(|t| {
            let http = http.clone();
            let blobs = blobs.to_vec();
            tokio::spawn(async move {
                for i in (t..blobs.len()).step_by(3) {
                    get_blob(&http, &format!("up/y{i}"), &blobs[i]).await;
                    get_blob(&http, &format!("up/y{i}"), &blobs[i]).await;
                    let j = (i + blobs.len() - 1) % blobs.len();
                    get_blob(&http, &format!("up/y{j}"), &blobs[j]).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await
            .expect("a concurrent pull got a wrong or incomplete body");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eviction_under_load_never_cuts_a_blob_mid_stream() {
    let fake = FakeUpstream::start();
    // X alone is over the budget: whenever nobody streams it, the evictor
    // wants it gone. It is also larger than what the kernel buffers on a
    // loopback connection (tcp_wmem's maximum is typically 4 MiB), so a
    // client that stops reading early keeps wharf's response streaming it.
    let x_len = 8 * MIB;
    let x_bytes = random_bytes(x_len, 200);
    let (_, x, _) = seed_image(&fake, "x", "v1", &x_bytes);
    let others: Vec<String> = (0..6)
        .map(|i| seed_image(&fake, &format!("y{i}"), "v1", &random_bytes(MIB, 300 + i)).1)
        .collect();
    let w = common::spawn_wharf(&format!(
        "[cache]\nmax_size = \"1536KiB\"\n\n{}",
        rule("up", &fake, "")
    ));
    let http = HttpClient::new(w.url());

    // Eight clients read the first MiB of X and stall.
    let url: http::Uri = format!("{}/v2/up/x/blobs/{x}", w.url()).parse().unwrap();
    let (stalled_tx, mut stalled) = tokio::sync::mpsc::channel(8);
    let (resume, resume_rx) = tokio::sync::watch::channel(false);
    let readers: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(stalling_get(
                url.clone(),
                MIB,
                8.0 * MIB as f64,
                stalled_tx.clone(),
                resume_rx.clone(),
            ))
        })
        .collect();
    drop(stalled_tx);
    for _ in 0..8 {
        tokio::time::timeout(DEADLINE, stalled.recv())
            .await
            .expect("every reader of X gets its first MiB")
            .expect("a reader of X failed early; see its result below");
    }

    // While they stall, the other blobs are pulled: every one of them is
    // evicted once released, X never, although it alone is over budget.
    churn(&http, &others).await;
    let s = wait_for_stats(&http, "everything but X evicted", |s| {
        s["fills"]["in_progress"] == json!(0) && s["budget"]["blobs"].as_u64() <= Some(1)
    })
    .await;
    assert_eq!(
        s["budget"]["held"],
        json!(1),
        "precondition: the stalled responses still stream X (if not, the kernel buffered \
         all of it: make X larger than net.ipv4.tcp_wmem's maximum): {s:#}"
    );
    assert_eq!(s["budget"]["blobs"], json!(1), "{s:#}");
    assert_eq!(
        s["budget"]["size_bytes"],
        json!(x_len),
        "X is budgeted, over max_size, and kept while streamed: {s:#}"
    );
    assert!(has(&w.data_dir(), &x), "X stays stored while streamed");
    assert!(s["evictions"].as_u64().unwrap() >= 6, "{s:#}");

    // The readers resume while the churn goes on.
    resume.send(true).unwrap();
    churn(&http, &others).await;
    for (i, r) in readers.into_iter().enumerate() {
        let body = r
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("reader {i} of X: {e}"));
        assert_eq!(body.len(), x_len, "reader {i}: X is complete");
        assert_eq!(common::sha256(&body), x, "reader {i}: X hashes right");
    }
    assert_eq!(
        fake.count("GET", &format!("/v2/x/blobs/{x}")),
        1,
        "X was fetched once: it stayed while the readers needed it"
    );

    // Everything released: the budget converges, which means X went too.
    let s = wait_for_stats(&http, "budget after the load", |s| {
        within_budget(s) && s["budget"]["held"] == json!(0)
    })
    .await;
    assert!(!has(&w.data_dir(), &x), "X is evictable once released");
    let m = metrics(&http).await;
    assert_eq!(
        value(&m, "wharf_cache_evictions_total"),
        s["evictions"].as_u64().unwrap() as f64
    );
    // X is fetched again, whole.
    get_blob(&http, "up/x", &x).await;
    assert_eq!(fake.count("GET", &format!("/v2/x/blobs/{x}")), 2);
}

// ---- metrics, health, stats ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_stats_report_the_cache() {
    let fake = FakeUpstream::start();
    let layer = random_bytes(MIB, 400);
    let (md, ld, m) = seed_image(&fake, "app", "v1", &layer);
    let w = common::spawn_wharf(&format!(
        "[cache]\nmax_size = \"2560KiB\"\n\n{}",
        rule("up", &fake, "")
    ));
    let http = HttpClient::new(w.url());
    let host = fake.host();

    for path in ["/healthz", "/readyz"] {
        let r = http.get(path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_eq!(r.header("content-type"), Some("application/json"), "{path}");
        assert!(r.json()["status"].is_string(), "{path}: {:?}", r.json());
    }

    assert_eq!(get_manifest(&http, "up/app", "v1").await, md);
    get_blob(&http, "up/app", &ld).await; // cold: a miss
    get_blob(&http, "up/app", &ld).await; // warm: a hit
    settled(&http).await;
    let upstream_requests = fake.total();

    let text = metrics(&http).await;
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    assert_eq!(
        value(&text, r#"wharf_cache_misses_total{kind="blob"}"#),
        1.0
    );
    assert_eq!(value(&text, r#"wharf_cache_hits_total{kind="blob"}"#), 1.0);
    assert_eq!(
        value(&text, r#"wharf_cache_misses_total{kind="manifest"}"#),
        1.0
    );
    let ok = format!(r#"wharf_upstream_requests_total{{upstream="{host}",status="200"}}"#);
    assert_eq!(
        value(&text, &ok),
        upstream_requests as f64,
        "every upstream request is counted once"
    );
    assert!(upstream_requests >= 2, "a manifest and a blob");
    assert_eq!(
        value(&text, "wharf_cache_size_bytes"),
        layer.len() as f64,
        "the one pulled-through blob (manifests are not budgeted)"
    );
    assert_eq!(value(&text, "wharf_cache_blobs"), 1.0);
    assert_eq!(
        value(&text, "wharf_bytes_served_total"),
        (2 * layer.len() + m.len()) as f64
    );
    assert_eq!(value(&text, "wharf_cache_fills_total"), 1.0);
    assert_eq!(
        value(&text, "wharf_upstream_bytes_total"),
        layer.len() as f64
    );
    assert_eq!(value(&text, "wharf_cache_evictions_total"), 0.0);
    assert_eq!(
        sample(&text, "wharf_upstream_errors_total"),
        None,
        "no upstream errors yet:\n{text}"
    );

    // The stats API has the same numbers.
    let s = stats(&http).await;
    assert_eq!(s["blobs"], json!({"hits": 1, "misses": 1}));
    assert_eq!(s["manifests"], json!({"hits": 0, "misses": 1}));
    assert_eq!(s["budget"]["size_bytes"], json!(layer.len()));
    assert_eq!(s["budget"]["max_size_bytes"], json!(2560 * 1024));
    assert_eq!(s["budget"]["blobs"], json!(1));
    assert_eq!(s["fills"]["started"], json!(1));
    assert_eq!(s["fills"]["in_progress"], json!(0));
    assert_eq!(s["fills"]["upstream_bytes"], json!(layer.len()));
    assert_eq!(s["evictions"], json!(0));
    assert_eq!(s["rules"], json!([{"prefix": "up", "upstream": host}]));

    // `wharf cache stats` prints them.
    let out = wharf_cli(&["cache", "stats", "--server", &w.url()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    let size_line = format!(
        "size         {} of {} (1 blobs)",
        bytesize::ByteSize(layer.len() as u64),
        bytesize::ByteSize(2560 * 1024)
    );
    assert!(
        printed.lines().any(|l| l == size_line),
        "no line {size_line:?} in:\n{printed}"
    );
    assert!(
        printed
            .lines()
            .any(|l| l == "blobs        1 hits, 1 misses (hit rate 50.0%)"),
        "{printed}"
    );
    assert!(
        printed
            .lines()
            .any(|l| l == format!("rule         up -> {host}")),
        "{printed}"
    );
    let out = wharf_cli(&["cache", "stats", "--json", "--server", &w.url()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let printed: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(printed, stats(&http).await);

    // An upstream answering 500 is counted as an error, by status.
    let broken = fake.add_blob("broken", random_bytes(1000, 401));
    let broken_path = format!("/v2/broken/blobs/{broken}");
    fake.fault(&broken_path, Fault::status(500));
    let r = http.get(&format!("/v2/up/broken/blobs/{broken}")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{r:?}");
    assert_eq!(r.error_code(), "BLOB_UNKNOWN");
    // The fill's HEAD (or GET) is what fails.
    let failed = fake.count("*", &broken_path);
    assert!(failed >= 1);
    let text = metrics(&http).await;
    let e500 = format!(r#"wharf_upstream_errors_total{{upstream="{host}",status="500"}}"#);
    assert_eq!(value(&text, &e500), failed as f64, "{text}");
    let r500 = format!(r#"wharf_upstream_requests_total{{upstream="{host}",status="500"}}"#);
    assert_eq!(value(&text, &r500), failed as f64);
    assert_eq!(value(&text, &ok), upstream_requests as f64, "unchanged");
    assert_eq!(value(&text, "wharf_cache_fill_failures_total"), 1.0);
    assert_eq!(stats(&http).await["fills"]["failed"], json!(1));

    // Bad input.
    for (method, path) in [
        (Method::PUT, "/metrics"),
        (Method::POST, "/healthz"),
        (Method::DELETE, "/_wharf/cache/stats"),
    ] {
        let r = http.send(method.clone(), path, &[], Bytes::new()).await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.error_code(), "UNSUPPORTED", "{method} {path}");
        assert!(r.json()["errors"][0]["message"].is_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pull_through_rules_the_cache_admin_api_is_a_404() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("wharf.toml");
    // `pull_through = []` is a top-level key: it must precede every table.
    std::fs::write(
        &config,
        format!(
            "pull_through = []\n\n[server]\nlisten = \"127.0.0.1:0\"\n\n[storage]\ntype = \"filesystem\"\npath = {:?}\n",
            dir.path().join("data").display().to_string()
        ),
    )
    .unwrap();
    let (child, addr) = common::start(&config, &[]);
    let w = common::Wharf {
        child,
        addr,
        dir,
        config,
    };
    let http = HttpClient::new(w.url());
    let r = http.get("/_wharf/cache/stats").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.error_code(), "NAME_UNKNOWN");
    let r = http
        .send(
            Method::POST,
            "/_wharf/cache/refresh?ref=up/app:v1",
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error_code(), "NAME_UNKNOWN");
    // Metrics and probes still answer, without cache series.
    let text = metrics(&http).await;
    assert_eq!(
        sample(&text, r#"wharf_cache_hits_total{kind="blob"}"#),
        None
    );
    assert!(text.contains("wharf_bytes_served_total"), "{text}");
    assert_eq!(http.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(http.get("/readyz").await.status, StatusCode::OK);
    // The command says why.
    let out = wharf_cli(&["cache", "stats", "--server", &w.url()]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("NAME_UNKNOWN") && stderr(&out).contains("pull-through"),
        "{}",
        stderr(&out)
    );
}

// ---- forced refresh ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_refresh_fetches_a_fresh_tag_from_upstream_now() {
    let fake = FakeUpstream::start();
    let (d1, _, m1) = seed_image(&fake, "app", "v1", &random_bytes(1000, 500));
    let w = common::spawn_wharf(&rule("up", &fake, "tag_ttl = \"1h\""));
    let http = HttpClient::new(w.url());
    let tag_path = "/v2/app/manifests/v1";

    assert_eq!(get_manifest(&http, "up/app", "v1").await, d1);
    // The tag moves upstream; within tag_ttl wharf does not ask.
    let (d2, _, m2) = seed_image(&fake, "app", "v1", &random_bytes(1000, 501));
    assert_ne!(d1, d2);
    let before = fake.total();
    assert_eq!(get_manifest(&http, "up/app", "v1").await, d1, "fresh");
    assert_eq!(fake.count("HEAD", tag_path), 0);
    assert_eq!(fake.total(), before, "a fresh tag asks nothing upstream");

    // Bad input changes nothing.
    let refresh = |q: &str| {
        let http = http.clone();
        let q = q.to_string();
        async move {
            http.send(
                Method::POST,
                &format!("/_wharf/cache/refresh{q}"),
                &[],
                Bytes::new(),
            )
            .await
        }
    };
    let r = refresh("").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error_code(), "NAME_INVALID");
    for q in [
        "?ref=Bad/Name:1",
        "?ref=up/app:bad%20tag",
        "?ref=up/app@sha256:short",
    ] {
        let r = refresh(q).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}");
        assert_eq!(r.error_code(), "NAME_INVALID", "{q}");
    }
    http.push_blob("mine/app", b"hosted").await;
    let r = refresh("?ref=mine/app:v1").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "a hosted repository");
    assert_eq!(r.error_code(), "NAME_UNKNOWN");
    let r = http.get("/_wharf/cache/refresh?ref=up/app:v1").await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.error_code(), "UNSUPPORTED");
    let out = wharf_cli(&["cache", "refresh", "--server", &w.url(), "Bad/Name:1"]).await;
    assert!(!out.status.success(), "an invalid ref fails the command");
    let err = stderr(&out);
    assert!(
        err.contains("Bad/Name:1") && err.contains("invalid repository name"),
        "{err}"
    );
    assert_eq!(fake.total(), before, "no failed call reached upstream");
    assert_eq!(get_manifest(&http, "up/app", "v1").await, d1, "unchanged");
    // A tag upstream does not have: 404, and v1 is untouched.
    let r = refresh("?ref=up/app:nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error_code(), "MANIFEST_UNKNOWN");
    assert_eq!(fake.count("*", tag_path), 1, "v1 was not asked for");
    assert_eq!(get_manifest(&http, "up/app", "v1").await, d1, "unchanged");

    // The command refreshes now, whatever the tag's age.
    let out = wharf_cli(&["cache", "refresh", "--server", &w.url(), "up/app:v1"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("up/app:v1: {d2}\n"));
    assert_eq!(fake.count("HEAD", tag_path), 1, "one HEAD found the move");
    assert_eq!(fake.count("GET", &format!("/v2/app/manifests/{d2}")), 1);
    let r = http.get("/v2/up/app/manifests/v1").await;
    assert_eq!(r.header("docker-content-digest"), Some(d2.as_str()));
    assert_eq!(&r.body[..], &m2[..]);
    let after = fake.total();

    // The API, by tag and by digest.
    let r = refresh("?ref=up/app:v1").await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let v = r.json();
    assert_eq!(v["name"], json!("up/app"));
    assert_eq!(v["reference"], json!("v1"));
    assert_eq!(v["digest"], json!(d2));
    assert_eq!(v["size"], json!(m2.len()));
    let r = refresh(&format!("?ref=up/app@{d1}")).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.json()["digest"], json!(d1));
    assert_eq!(r.json()["size"], json!(m1.len()));
    assert!(fake.total() > after, "a refresh always asks upstream");
    assert_eq!(get_manifest(&http, "up/app", "v1").await, d2);
}

// ---- warm ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_warm_pulls_the_chosen_platforms_once() {
    let fake = FakeUpstream::start();
    let amd = seed_platform_image(
        &fake,
        "multi",
        None,
        "linux",
        "amd64",
        &random_bytes(300 * 1024, 600),
    );
    let arm = seed_platform_image(
        &fake,
        "multi",
        None,
        "linux",
        "arm64",
        &random_bytes(300 * 1024, 601),
    );
    let (index, _) = seed_index(
        &fake,
        "multi",
        "1",
        &[(&amd, "linux", "amd64"), (&arm, "linux", "arm64")],
    );
    let w = common::spawn_wharf(&rule("up", &fake, ""));
    let http = HttpClient::new(w.url());
    let url = w.url();
    let gets = |d: &str| fake.count("GET", &format!("/v2/multi/blobs/{d}"));

    // Bad input first: nothing is fetched.
    let out = wharf_cli(&[
        "cache",
        "warm",
        "--server",
        &url,
        "-p",
        "linux",
        "up/multi:1",
    ])
    .await;
    assert!(!out.status.success(), "a malformed platform fails");
    assert!(
        stderr(&out).contains("\"linux\"") && stderr(&out).contains("os/arch"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fake.total(), 0);
    let out = wharf_cli(&["cache", "warm", "--server", &url, "up/multi:nope"]).await;
    assert!(!out.status.success(), "a missing tag fails");
    assert!(stderr(&out).contains("up/multi:nope"), "{}", stderr(&out));
    let out = wharf_cli(&[
        "cache",
        "warm",
        "--server",
        &url,
        "-p",
        "windows/amd64",
        "up/multi:1",
    ])
    .await;
    assert!(!out.status.success(), "no platform matches");
    assert!(stderr(&out).contains("platform"), "{}", stderr(&out));
    for d in [&amd.config, &amd.layer, &arm.config, &arm.layer] {
        assert_eq!(gets(d), 0, "failed warms fetch no blob");
    }

    // One platform.
    let out = wharf_cli(&[
        "cache",
        "warm",
        "--server",
        &url,
        "-p",
        "linux/arm64",
        "up/multi:1",
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("warmed 1 image manifests, 2 blobs"),
        "{}",
        stdout(&out)
    );
    assert_eq!(gets(&arm.layer), 1);
    assert_eq!(gets(&arm.config), 1);
    assert_eq!(gets(&amd.layer), 0, "the other platform is left alone");
    assert_eq!(gets(&amd.config), 0);

    // Every platform: only what is missing is fetched.
    let out = wharf_cli(&["cache", "warm", "--server", &url, "up/multi:1"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("warmed 2 image manifests, 4 blobs"),
        "{}",
        stdout(&out)
    );
    assert_eq!(gets(&amd.layer), 1);
    assert_eq!(gets(&amd.config), 1);
    assert_eq!(gets(&arm.layer), 1, "warm blobs are not fetched again");
    assert_eq!(gets(&arm.config), 1);
    for m in [&amd.manifest, &arm.manifest] {
        assert_eq!(
            fake.count("GET", &format!("/v2/multi/manifests/{m}")),
            1,
            "each platform's manifest is fetched once"
        );
    }

    // Upstream gone: everything still pulls, whole.
    fake.stop();
    assert_eq!(get_manifest(&http, "up/multi", "1").await, index);
    for m in [&amd.manifest, &arm.manifest] {
        assert_eq!(&get_manifest(&http, "up/multi", m).await, m);
    }
    for d in [&amd.config, &amd.layer, &arm.config, &arm.layer] {
        get_blob(&http, "up/multi", d).await;
    }
}

/// Hosted repositories win whatever the query: a mirror read (`?ns=`, as
/// containerd sends) of a pushed repository is served from what was pushed,
/// never revalidated against upstream. Under the ROOT rule a cached
/// repository's local name is the repository's own, so such a read once
/// moved the pushed tag to upstream's digest, and deleted it when upstream
/// answered 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_reads_never_change_a_hosted_tag() {
    use common::replication::push_image;
    let fake = FakeUpstream::start();
    // Upstream holds other content under the same name and tag.
    let (upstream_v1, _, _) = seed_image(&fake, "team/app", "v1", b"upstream layer");
    let w = common::spawn_wharf(&rule("ROOT", &fake, "tag_ttl = \"0s\""));
    let http = HttpClient::new(w.url());
    let v1 = push_image(
        &http,
        "team/app",
        Some("v1"),
        &[b"pushed".to_vec()],
        "amd64",
    )
    .await;
    // And a tag upstream does not have (it answers 404 for it).
    let only = push_image(
        &http,
        "team/app",
        Some("only-here"),
        &[b"mine".to_vec()],
        "arm64",
    )
    .await;
    assert_ne!(v1.digest, upstream_v1);
    let before = fake.total();
    let ns = fake.host();
    for _ in 0..2 {
        for (tag, want) in [("v1", &v1.digest), ("only-here", &only.digest)] {
            for method in [Method::GET, Method::HEAD] {
                let path = format!("/v2/team/app/manifests/{tag}?ns={ns}");
                let r = http.send(method.clone(), &path, &[], Bytes::new()).await;
                assert_eq!(r.status, StatusCode::OK, "{method} {path}: {r:?}");
                assert_eq!(
                    r.header("docker-content-digest"),
                    Some(want.as_str()),
                    "{method} {path} answers what was pushed"
                );
            }
        }
        let path = format!("/v2/team/app/blobs/{}?ns={ns}", v1.blobs[1]);
        assert_eq!(&http.get(&path).await.body[..], b"pushed");
    }
    for (tag, want) in [("v1", &v1.digest), ("only-here", &only.digest)] {
        let r = http.get(&format!("/v2/team/app/manifests/{tag}")).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "the hosted tag {tag} is still there"
        );
        assert_eq!(r.header("docker-content-digest"), Some(want.as_str()));
    }
    let r = http.get("/v2/team/app/tags/list").await;
    let tags: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(tags["tags"], json!(["only-here", "v1"]));
    assert_eq!(
        fake.total(),
        before,
        "reads of a hosted repository never reach upstream"
    );
}
