//! The pull-through cache against a scripted fake upstream: coalescing
//! (one upstream GET for many concurrent cold pulls, streamed to every
//! waiter), verification (corrupt upstream bytes are never stored or served
//! whole), resumption after a broken upstream connection, stale serving with
//! upstream down, tag revalidation (with paused tokio time), routing (`ns`,
//! ROOT, prefixes) and refused pushes.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cache::{random_bytes, rule, seed_image, stored_blobs};
use common::fake_upstream::{FakeUpstream, Fault, Release};
use common::http::{HttpClient, Method, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_concurrent_cold_pulls_make_one_upstream_get() {
    let fake = FakeUpstream::start();
    let layer = random_bytes(6 * 1024 * 1024, 1);
    let (_, ld, _) = seed_image(&fake, "team/app", "v1", &layer);
    // Slow enough that every client joins while the fill runs.
    fake.fault(&ld, Fault::bytes_per_second(4 * 1024 * 1024));
    let w = common::spawn_wharf(&rule("up", &fake, ""));
    let http = HttpClient::new(w.url());
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let http = http.clone();
        let path = format!("/v2/up/team/app/blobs/{ld}");
        tasks.push(tokio::spawn(async move { http.get(&path).await }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body.len(), layer.len());
        assert_eq!(
            common::sha256(&r.body),
            ld,
            "every body hashes to the digest"
        );
    }
    assert_eq!(
        fake.count("GET", &format!("/v2/team/app/blobs/{ld}")),
        1,
        "exactly one upstream GET for 32 concurrent cold pulls"
    );
    // Warm now: served from the store, no new upstream request.
    let r = http.get(&format!("/v2/up/team/app/blobs/{ld}")).await;
    assert_eq!(common::sha256(&r.body), ld);
    assert_eq!(fake.count("GET", &format!("/v2/team/app/blobs/{ld}")), 1);
    assert!(stored_blobs(&w.data_dir()).contains(&ld));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_gets_its_first_byte_before_the_fill_ends() {
    let fake = FakeUpstream::start();
    let layer = random_bytes(4 * 1024 * 1024, 2);
    let (_, ld, _) = seed_image(&fake, "app", "v1", &layer);
    // The upstream sends the first MiB, then holds the rest until released:
    // the fill cannot end before that.
    let release = Release::new();
    fake.fault(
        &ld,
        Fault::Hold {
            after: 1024 * 1024,
            release: release.clone(),
        },
    );
    let w = common::spawn_wharf(&rule("up", &fake, ""));
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let url: http::Uri = format!("{}/v2/up/app/blobs/{ld}", w.url()).parse().unwrap();

    let (started, first_byte) = tokio::sync::oneshot::channel();
    let first = {
        let client = client.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let mut body = client.get(url).await.unwrap().into_body();
            let mut got = Vec::new();
            let mut started = Some(started);
            while let Some(f) = body.frame().await {
                got.extend_from_slice(&f.unwrap().into_data().unwrap());
                if let Some(s) = started.take() {
                    let _ = s.send(());
                }
            }
            got
        })
    };
    // The fill runs once the first client has bytes.
    first_byte.await.unwrap();
    // A wharf that held the bytes back until the fill ended would never
    // answer here (the fill waits for the release below).
    let held = Duration::from_secs(30);
    let resp = tokio::time::timeout(held, client.get(url))
        .await
        .expect("the late joiner got no response while the fill ran")
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-length"],
        layer.len().to_string().as_str()
    );
    let mut body = resp.into_body();
    let frame = tokio::time::timeout(held, body.frame())
        .await
        .expect("the late joiner got no byte while the fill ran")
        .unwrap()
        .unwrap();
    let mut late = frame.into_data().unwrap().to_vec();
    assert!(!late.is_empty());
    assert!(
        late.len() <= 1024 * 1024 && !first.is_finished(),
        "the late joiner streamed while the upstream still held the rest"
    );
    release.open();
    while let Some(f) = body.frame().await {
        late.extend_from_slice(&f.unwrap().into_data().unwrap());
    }
    let first_body = first.await.unwrap();
    assert_eq!(common::sha256(&late), ld);
    assert_eq!(common::sha256(&first_body), ld);
    assert_eq!(fake.count("GET", &format!("/v2/app/blobs/{ld}")), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_upstream_bytes_are_never_stored_and_fail_every_client() {
    let fake = FakeUpstream::start();
    let layer = random_bytes(2 * 1024 * 1024, 3);
    let (_, ld, _) = seed_image(&fake, "app", "v1", &layer);
    fake.fault(&ld, Fault::WrongBytes);
    fake.fault(&ld, Fault::bytes_per_second(2 * 1024 * 1024));
    let w = common::spawn_wharf(&rule("up", &fake, ""));
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let url: http::Uri = format!("{}/v2/up/app/blobs/{ld}", w.url()).parse().unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let client = client.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            match client.get(url).await {
                Err(_) => Ok(0usize),
                Ok(resp) => match resp.into_body().collect().await {
                    Ok(b) => Err(b.to_bytes().len()),
                    Err(_) => Ok(1),
                },
            }
        }));
    }
    for t in tasks {
        let outcome = t.await.unwrap();
        assert!(
            outcome.is_ok(),
            "a client received a cleanly ended body of {:?} bytes from a corrupt upstream",
            outcome
        );
    }
    assert!(stored_blobs(&w.data_dir()).is_empty(), "nothing stored");
    // Still corrupt upstream: still refused.
    let r = HttpClient::new(w.url())
        .head(&format!("/v2/up/app/blobs/{ld}"))
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "HEAD asks upstream for the size only"
    );
    assert!(stored_blobs(&w.data_dir()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_upstream_connection_is_resumed_with_a_range_request() {
    let fake = FakeUpstream::start();
    let layer = random_bytes(3 * 1024 * 1024, 4);
    let (_, ld, _) = seed_image(&fake, "app", "v1", &layer);
    fake.fault_times(&ld, Fault::Reset { after: 1024 * 1024 }, 1);
    let w = common::spawn_wharf(&rule("up", &fake, ""));
    let r = HttpClient::new(w.url())
        .get(&format!("/v2/up/app/blobs/{ld}"))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(common::sha256(&r.body), ld);
    let path = format!("/v2/app/blobs/{ld}");
    let ranges = fake.ranges(&path);
    assert_eq!(ranges.len(), 2, "{ranges:?}");
    assert_eq!(ranges[0], None);
    let resumed = ranges[1].clone().expect("the second GET is ranged");
    let start: u64 = resumed
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(start > 0 && start <= 1024 * 1024, "resumed at {start}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_request_for_an_uncached_blob_gets_the_right_bytes() {
    let fake = FakeUpstream::start();
    let layer = random_bytes(1024 * 1024, 5);
    let (_, ld, _) = seed_image(&fake, "app", "v1", &layer);
    let w = common::spawn_wharf(&rule("up", &fake, ""));
    let r = HttpClient::new(w.url())
        .send(
            Method::GET,
            &format!("/v2/up/app/blobs/{ld}"),
            &[("range", "bytes=1000-1999")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.header("content-range"), Some("bytes 1000-1999/1048576"));
    assert_eq!(&r.body[..], &layer[1000..2000]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_images_still_pull_with_upstream_down() {
    let fake = FakeUpstream::start();
    let layer = random_bytes(512 * 1024, 6);
    let (md, ld, m) = seed_image(&fake, "library/busybox", "1", &layer);
    // tag_ttl 0: every pull revalidates, so the stale path is exercised.
    let w = common::spawn_wharf(&rule("ROOT", &fake, "tag_ttl = \"0s\"\nmax_stale = \"1h\""));
    let http = HttpClient::new(w.url());
    let blob_path = format!("/v2/library/busybox/blobs/{ld}");
    let pull = |http: HttpClient| {
        let blob_path = blob_path.clone();
        async move {
            let r = http.get("/v2/library/busybox/manifests/1").await;
            assert_eq!(
                r.status,
                StatusCode::OK,
                "{:?}",
                String::from_utf8_lossy(&r.body)
            );
            let b = http.get(&blob_path).await;
            (r, b)
        }
    };
    let (r, b) = pull(http.clone()).await;
    assert_eq!(r.header("docker-content-digest"), Some(md.as_str()));
    assert_eq!(&r.body[..], &m[..]);
    assert_eq!(common::sha256(&b.body), ld);
    fake.stop();
    let (r, b) = pull(http.clone()).await;
    assert_eq!(r.header("docker-content-digest"), Some(md.as_str()));
    assert_eq!(common::sha256(&b.body), ld);
    let r = http.get("/v2/library/busybox/tags/list").await;
    assert_eq!(
        r.json()["tags"],
        json!(["1"]),
        "tags from the cache while upstream is down"
    );
    // Never cached: a clear 404.
    let r = http.get("/v2/library/other/manifests/1").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error_code(), "MANIFEST_UNKNOWN");
    fake.restart();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_ns_root_prefixes_and_refused_pushes() {
    let fake = FakeUpstream::start();
    let (md, _, _) = seed_image(&fake, "library/alpine", "3", b"alpine layer");
    let w = common::spawn_wharf(&format!(
        "{}{}",
        rule("hub", &fake, ""),
        rule("ROOT", &fake, "")
    ));
    let http = HttpClient::new(w.url());
    // containerd mirror: ?ns=<host>.
    let r = http
        .get(&format!(
            "/v2/library/alpine/manifests/3?ns={}",
            fake.host()
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("docker-content-digest"), Some(md.as_str()));
    let before = fake.total();
    let r = http
        .get("/v2/library/alpine/manifests/3?ns=evil.example.com")
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "an unknown ns is a 404");
    assert_eq!(fake.total(), before);
    // Prefix and ROOT.
    assert_eq!(
        http.get("/v2/hub/library/alpine/manifests/3").await.status,
        StatusCode::OK
    );
    assert_eq!(
        http.get("/v2/library/alpine/manifests/3").await.status,
        StatusCode::OK
    );
    // Pushes into a pull-through prefix are refused.
    let r = http
        .send(
            Method::POST,
            "/v2/hub/library/mine/blobs/uploads/",
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.error_code(), "DENIED");
    let r = http
        .send(
            Method::POST,
            "/v2/library/alpine/blobs/uploads/",
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(
        r.error_code(),
        "DENIED",
        "a repository holding cached content takes no pushes"
    );
    // Hosted repositories win over ROOT and never reach upstream.
    let before = fake.total();
    let d = http.push_blob("mine/app", b"hosted bytes").await;
    let r = http.get(&format!("/v2/mine/app/blobs/{d}")).await;
    assert_eq!(&r.body[..], b"hosted bytes");
    let r = http.get("/v2/mine/app/manifests/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        fake.total(),
        before,
        "hosted repositories never fall through"
    );
}

/// Tag freshness, with tokio's clock paused and advanced past `tag_ttl`.
#[tokio::test]
async fn tags_are_fresh_for_tag_ttl_then_revalidated_with_head() {
    use wharf::cache::{Cache, Rule, Rules};
    use wharf::oci::Reference;
    use wharf::registry::Registry;
    use wharf::storage::fs::FsStore;
    use wharf::storage::meta::RedbMeta;
    use wharf::upstream::{UpstreamClient, UpstreamSettings};

    let fake = FakeUpstream::start();
    let (d1, _, _) = seed_image(&fake, "app", "v1", b"first");
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FsStore::open(dir.path()).unwrap());
    let meta = Arc::new(RedbMeta::open(&dir.path().join("meta.redb")).unwrap());
    let upstream = UpstreamClient::new(UpstreamSettings::new(fake.url().parse().unwrap())).unwrap();
    let rules = Rules(vec![Rule {
        prefix: Some("up".parse().unwrap()),
        upstream,
        upstream_prefix: None,
        tag_ttl: Duration::from_secs(600),
        max_stale: Duration::from_secs(3600),
        docker_hub: false,
    }]);
    let stop = tokio_util::sync::CancellationToken::new();
    let budget = wharf::cache::budget::Budget::open(u64::MAX, store.clone(), meta.clone())
        .await
        .unwrap();
    let cache = Arc::new(Cache::new(
        rules,
        store.clone(),
        store.clone(),
        meta.clone(),
        false,
        Duration::from_secs(60),
        Duration::from_secs(3600),
        budget,
        stop.clone(),
    ));
    let registry = Registry::new(store.clone(), store, meta).with_cache(cache.clone());
    let repo = "up/app".parse().unwrap();
    let tag: Reference = "v1".parse().unwrap();
    let manifest_path = "/v2/app/manifests/v1";

    let hit = registry.manifest(&repo, &tag, None, None).await.unwrap();
    assert_eq!(hit.digest.to_string(), d1.to_string());
    assert_eq!(fake.count("GET", manifest_path), 1);

    // The tag moves upstream; within tag_ttl wharf does not ask.
    let (d2, _, _) = seed_image(&fake, "app", "v1", b"second");
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(599)).await;
    tokio::time::resume();
    let hit = registry.manifest(&repo, &tag, None, None).await.unwrap();
    assert_eq!(
        hit.digest.to_string(),
        d1.to_string(),
        "fresh: served from the cache"
    );
    assert_eq!(fake.count("HEAD", manifest_path), 0);

    // Past tag_ttl: a HEAD finds the new digest, which is fetched by digest.
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(2)).await;
    tokio::time::resume();
    let hit = registry.manifest(&repo, &tag, None, None).await.unwrap();
    assert_eq!(hit.digest.to_string(), d2.to_string(), "revalidated");
    assert_eq!(fake.count("HEAD", manifest_path), 1);
    assert_eq!(fake.count("GET", &format!("/v2/app/manifests/{d2}")), 1);

    // Concurrent revalidations of one tag are coalesced into one HEAD.
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(601)).await;
    tokio::time::resume();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let registry = registry.clone();
        let repo = repo.clone();
        let tag = tag.clone();
        tasks.push(tokio::spawn(async move {
            registry.manifest(&repo, &tag, None, None).await.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().digest.to_string(), d2.to_string());
    }
    assert_eq!(
        fake.count("HEAD", manifest_path),
        2,
        "one HEAD for 8 concurrent revalidations"
    );
    stop.cancel();
}

/// The fill's store, with publication held until the test opens a gate
/// (an fsync of a large blob can take seconds), or failing.
mod gated {
    use std::sync::Arc;

    use async_trait::async_trait;
    use tokio::sync::Semaphore;
    use wharf::oci::Digest;
    use wharf::storage::{FillStore, FillWriter, Result, StagedReader, StorageError};

    pub struct GatedStore {
        pub inner: Arc<dyn FillStore>,
        /// `commit` waits for a permit.
        pub gate: Arc<Semaphore>,
        pub fail: bool,
    }

    struct GatedWriter {
        inner: Box<dyn FillWriter>,
        gate: Arc<Semaphore>,
        fail: bool,
    }

    #[async_trait]
    impl FillStore for GatedStore {
        async fn begin_fill(&self) -> Result<Box<dyn FillWriter>> {
            Ok(Box::new(GatedWriter {
                inner: self.inner.begin_fill().await?,
                gate: self.gate.clone(),
                fail: self.fail,
            }))
        }
    }

    #[async_trait]
    impl FillWriter for GatedWriter {
        async fn write(&mut self, data: &[u8]) -> Result<()> {
            self.inner.write(data).await
        }
        fn written(&self) -> u64 {
            self.inner.written()
        }
        fn staged(&self) -> Arc<dyn StagedReader> {
            self.inner.staged()
        }
        async fn verify(&self, expected: &Digest) -> Result<()> {
            self.inner.verify(expected).await
        }
        async fn commit(self: Box<Self>, expected: &Digest) -> Result<u64> {
            let _permit = self.gate.acquire().await.expect("gate");
            if self.fail {
                self.inner.abort().await;
                return Err(StorageError::Meta("disk full".into()));
            }
            self.inner.commit(expected).await
        }
        async fn abort(self: Box<Self>) {
            self.inner.abort().await
        }
    }
}

/// A cold pull's client gets its whole, verified body without waiting for
/// the blob to be made durable and published; a request meanwhile is served
/// from the verified bytes (a hit, no upstream request); and a publication
/// that fails after verification leaves the clients' bodies whole, stores
/// nothing, and the next pull fetches again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_get_verified_bytes_before_the_blob_is_published() {
    use futures::StreamExt;
    use wharf::cache::budget::Budget;
    use wharf::cache::fill::{Fills, Phase};
    use wharf::storage::fs::FsStore;
    use wharf::storage::meta::RedbMeta;
    use wharf::storage::{BlobStore, FillStore, MetaStore};
    use wharf::upstream::{UpstreamClient, UpstreamSettings};

    let fake = FakeUpstream::start();
    let layer = random_bytes(3 * 1024 * 1024, 77);
    let digest = fake.add_blob("lib/app", layer.clone());
    let path = format!("/v2/lib/app/blobs/{digest}");
    let upstream = UpstreamClient::new(UpstreamSettings::new(fake.url().parse().unwrap())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FsStore::open(dir.path()).unwrap());
    let meta: Arc<dyn MetaStore> = Arc::new(RedbMeta::open(&dir.path().join("meta.redb")).unwrap());
    let repo: wharf::oci::RepoName = "up/lib/app".parse().unwrap();
    let upstream_repo: wharf::oci::RepoName = "lib/app".parse().unwrap();
    let fills_with = |fail: bool, gate: Arc<tokio::sync::Semaphore>| {
        let meta = meta.clone();
        let store = store.clone();
        async move {
            let budget = Budget::open(u64::MAX, store.clone(), meta.clone())
                .await
                .unwrap();
            let gated: Arc<dyn FillStore> = Arc::new(gated::GatedStore {
                inner: store,
                gate,
                fail,
            });
            Arc::new(Fills::new(
                gated,
                meta,
                budget,
                Duration::from_secs(10),
                Duration::from_secs(600),
                tokio_util::sync::CancellationToken::new(),
            ))
        }
    };
    let read_all = |s: wharf::storage::ByteStream| async move {
        let mut body = Vec::new();
        let mut s = s;
        while let Some(chunk) = s.next().await {
            body.extend_from_slice(&chunk.expect("a clean body"));
        }
        body
    };

    // Publication held: the client still gets every byte, verified.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let fills = fills_with(false, gate.clone()).await;
    let fill = fills
        .join_or_start(&digest, None, &upstream, &upstream_repo, &repo)
        .await
        .unwrap();
    let body = tokio::time::timeout(
        Duration::from_secs(10),
        read_all(fills.stream(fill.clone(), 0, None)),
    )
    .await
    .expect("the body waited for publication");
    assert_eq!(body.len(), layer.len());
    assert_eq!(common::sha256(&body), digest.to_string());
    assert_eq!(fill.status().phase, Phase::Verified);
    assert_eq!(store.stat(&digest).await.unwrap(), None, "published early");
    // A second client meanwhile joins the verified fill: no upstream GET.
    let again = fills.join(&digest, &repo).expect("the fill takes waiters");
    let body = read_all(fills.stream(again, 0, None)).await;
    assert_eq!(common::sha256(&body), digest.to_string());
    assert_eq!(fake.count("GET", &path), 1);

    // Published once the gate opens: stored, linked, budgeted.
    gate.add_permits(1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while fills.in_progress(&digest).is_some() {
        assert!(Instant::now() < deadline, "never published");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fill.status().phase, Phase::Done);
    assert_eq!(store.stat(&digest).await.unwrap(), Some(layer.len() as u64));
    assert!(meta.blob_linked(&repo, &digest).await.unwrap());

    // A publication that fails after verification: whole bodies, nothing
    // stored, and the next pull fetches again.
    let other = random_bytes(2 * 1024 * 1024, 78);
    let d2 = fake.add_blob("lib/app", other.clone());
    let gate = Arc::new(tokio::sync::Semaphore::new(1));
    let fills = fills_with(true, gate).await;
    let fill = fills
        .join_or_start(&d2, None, &upstream, &upstream_repo, &repo)
        .await
        .unwrap();
    let body = read_all(fills.stream(fill.clone(), 0, None)).await;
    assert_eq!(common::sha256(&body), d2.to_string());
    let deadline = Instant::now() + Duration::from_secs(10);
    while fills.in_progress(&d2).is_some() {
        assert!(Instant::now() < deadline, "the fill never ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(store.stat(&d2).await.unwrap(), None);
    assert!(!meta.blob_linked(&repo, &d2).await.unwrap());
    assert_eq!(fills.counters.failed.get(), 1, "the failure is counted");
    let fill = fills
        .join_or_start(&d2, None, &upstream, &upstream_repo, &repo)
        .await
        .unwrap();
    read_all(fills.stream(fill, 0, None)).await;
    assert_eq!(fake.count("GET", &format!("/v2/lib/app/blobs/{d2}")), 2);
}

/// The value of a counter in wharf's `/metrics`.
async fn counter(http: &HttpClient, series: &str) -> f64 {
    let text = String::from_utf8(http.get("/metrics").await.body.to_vec()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// How a GET of a blob through wharf ended: its status and head, and
/// whether its body ended cleanly (with the bytes).
async fn get_outcome(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    url: http::Uri,
) -> (http::StatusCode, http::HeaderMap, Result<Bytes, ()>) {
    let resp = client.get(url).await.expect("wharf answers");
    let (head, body) = resp.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).map_err(|_| ());
    (head.status, head.headers, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_upstream_body_is_cut_at_the_blob_size_and_nothing_is_stored() {
    let fake = FakeUpstream::start();
    let layer = random_bytes(512 * 1024, 7);
    let (_, ld, _) = seed_image(&fake, "app", "v1", &layer);
    // No Content-Length, the layer's bytes, then zeros without end (64 KiB
    // every 10 ms, so that a wharf without a bound writes about 6 MB/s to
    // its staging file instead of filling the disk).
    fake.fault(&ld, Fault::Endless);
    fake.fault(
        &ld,
        Fault::SlowBody {
            chunk: 64 * 1024,
            delay: Duration::from_millis(10),
        },
    );
    let w = common::spawn_wharf(&rule("up", &fake, ""));
    let http = HttpClient::new(w.url());
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let url: http::Uri = format!("{}/v2/up/app/blobs/{ld}", w.url()).parse().unwrap();
    let (status, headers, body) =
        tokio::time::timeout(Duration::from_secs(30), get_outcome(&client, url.clone()))
            .await
            .expect("wharf ends the response instead of waiting for the body's end");
    // The size HEAD told is the one clients see, and the response never
    // ends cleanly: the fill failed at the first byte past the blob.
    if status == StatusCode::OK {
        assert_eq!(headers["content-length"], layer.len().to_string().as_str());
        assert!(
            body.is_err(),
            "a cleanly ended body from an endless upstream"
        );
    } else {
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    assert!(stored_blobs(&w.data_dir()).is_empty(), "nothing stored");
    let received = counter(&http, "wharf_upstream_bytes_total").await;
    assert!(
        received <= layer.len() as f64,
        "{received} bytes taken from upstream for a blob of {}",
        layer.len()
    );
    assert_eq!(counter(&http, "wharf_cache_fill_failures_total").await, 1.0);
    assert_eq!(
        fake.count("GET", &format!("/v2/app/blobs/{ld}")),
        1,
        "a body longer than the blob is not resumed"
    );

    // Once upstream behaves, the blob is filled and verified.
    fake.clear_faults();
    let r = http.get(&format!("/v2/up/app/blobs/{ld}")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(common::sha256(&r.body), ld);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bogus_upstream_content_length_is_never_passed_to_clients() {
    let fake = FakeUpstream::start();
    let layer = random_bytes(256 * 1024, 8);
    let (_, ld, _) = seed_image(&fake, "app", "v1", &layer);
    // HEAD tells the true size; GET announces a terabyte.
    fake.fault(&ld, Fault::ContentLength(1_000_000_000_000));
    let w = common::spawn_wharf(&rule("up", &fake, ""));
    let http = HttpClient::new(w.url());
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let url: http::Uri = format!("{}/v2/up/app/blobs/{ld}", w.url()).parse().unwrap();
    // Only the head is read: the upstream's body never ends.
    let resp = tokio::time::timeout(Duration::from_secs(30), client.get(url))
        .await
        .expect("wharf answers")
        .expect("wharf answers");
    let (status, headers) = (resp.status(), resp.headers().clone());
    drop(resp);
    assert_ne!(
        headers.get("content-length").and_then(|v| v.to_str().ok()),
        Some("1000000000000"),
        "the upstream's Content-Length reached the client"
    );
    // The fill failed before a byte was sent: a clean 404 for mirror
    // clients to fall back on.
    assert_eq!(status, StatusCode::NOT_FOUND);
    let r = http.head(&format!("/v2/up/app/blobs/{ld}")).await;
    assert_eq!(
        r.header("content-length"),
        Some(layer.len().to_string().as_str())
    );
    assert!(stored_blobs(&w.data_dir()).is_empty(), "nothing stored");

    fake.clear_faults();
    let r = http.get(&format!("/v2/up/app/blobs/{ld}")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(common::sha256(&r.body), ld);
}

/// A mirror's tag listing (`?ns=`) is paginated like any other, and its
/// next-page link carries `ns`, so following it routes to the same upstream
/// (without it the next page would be a hosted or ROOT lookup).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_pages_of_a_mirror_request_keep_ns() {
    let fake = FakeUpstream::start();
    for tag in ["a", "b", "c"] {
        seed_image(&fake, "team/tool", tag, format!("layer {tag}").as_bytes());
    }
    let w = common::spawn_wharf(&rule("up", &fake, ""));
    let http = HttpClient::new(w.url());
    let mut path = format!("/v2/team/tool/tags/list?n=1&ns={}", fake.host());
    let mut tags = Vec::new();
    for _ in 0..10 {
        let r = http.get(&path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {r:?}");
        for t in r.json()["tags"].as_array().unwrap() {
            tags.push(t.as_str().unwrap().to_string());
        }
        let Some(link) = r.header("link") else { break };
        assert!(link.contains("ns="), "the next page keeps ns: {link}");
        path = link
            .trim_start_matches('<')
            .split('>')
            .next()
            .unwrap()
            .to_string();
    }
    assert_eq!(tags, ["a", "b", "c"]);
}

/// A fill still fetching when wharf is asked to stop ends with the process:
/// once `server.shutdown_timeout` is over for the client streaming it,
/// `serve` stops the fill and waits for it; the client's body ends in an
/// error (never a clean short body), nothing is published, and its staging
/// file is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_running_at_shutdown_ends_and_leaves_no_staging() {
    let fake = FakeUpstream::start();
    let layer = random_bytes(4 * 1024 * 1024, 9);
    let (_, ld, _) = seed_image(&fake, "app", "v1", &layer);
    let release = Release::new();
    fake.fault(
        &ld,
        Fault::Hold {
            after: 1024 * 1024,
            release: release.clone(),
        },
    );
    let mut w = common::spawn_wharf_with("shutdown_timeout = \"1s\"", &rule("up", &fake, ""));
    let uploads = w.data_dir().join("uploads");
    let staging = move || -> Vec<(String, u64)> {
        std::fs::read_dir(&uploads)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().starts_with(".fill-"))
                    .map(|e| {
                        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                        (e.file_name().to_string_lossy().into_owned(), len)
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let url: http::Uri = format!("{}/v2/up/app/blobs/{ld}", w.url()).parse().unwrap();
    let pull = tokio::spawn(async move {
        let resp = client.get(url).await.unwrap();
        resp.into_body().collect().await.map(|b| b.to_bytes().len())
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !staging().iter().any(|(_, len)| *len >= 1024 * 1024) {
        assert!(
            Instant::now() < deadline,
            "the fill never staged its first MiB"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, w) = tokio::task::spawn_blocking(move || (w.terminate(), w))
        .await
        .unwrap();
    assert!(status.success(), "wharf stopped cleanly: {status:?}");
    assert!(
        pull.await.unwrap().is_err(),
        "the client's body ends in an error, not a clean short body"
    );
    assert_eq!(staging(), Vec::new(), "no staging left behind");
    assert!(
        !stored_blobs(&w.data_dir()).contains(&ld),
        "nothing published"
    );
    release.open();
}

/// An upstream whose HEAD and GET both announce an enormous blob (10^12
/// bytes) and then stream without end cannot fill the disk: a fill reserves
/// the announced size where fills stage before its first byte and is refused
/// when it does not fit. The client never sees the bogus length, upstream is
/// not asked for the body, and nothing is staged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_larger_than_the_staging_space_is_refused_before_its_first_byte() {
    let fake = FakeUpstream::start();
    let (_, ld, _) = seed_image(&fake, "app", "v1", b"small layer");
    fake.fault(&ld, Fault::HeadLength(1_000_000_000_000));
    fake.fault(&ld, Fault::Endless);
    let w = common::spawn_wharf(&rule("up", &fake, ""));
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let url: http::Uri = format!("{}/v2/up/app/blobs/{ld}", w.url()).parse().unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), client.get(url))
        .await
        .expect("an answer")
        .unwrap();
    assert_ne!(resp.status(), 200, "{:?}", resp.headers());
    assert_ne!(
        resp.headers().get("content-length").map(|v| v.as_bytes()),
        Some(&b"1000000000000"[..]),
        "the bogus length never reaches the client"
    );
    assert_eq!(
        fake.count("GET", &format!("/v2/app/blobs/{ld}")),
        0,
        "the body is not fetched"
    );
    let staged: Vec<_> = std::fs::read_dir(w.data_dir().join("uploads"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".fill-"))
        .collect();
    assert!(staged.is_empty(), "staged: {staged:?}");
}
