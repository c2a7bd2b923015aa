//! The S3 backend on a real SeaweedFS spawned by each test: the storage
//! conformance suite, conditional writes, and several wharf replicas over
//! one bucket (push on one and pull on another, tag races, uploads moving
//! between replicas, a replica killed mid-upload).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::seaweedfs::SeaweedFs;
use wharf::storage::RepoKind;
use wharf::storage::conformance;
use wharf::storage::s3::{S3Fills, S3Store};
use wharf::storage::s3jobs::S3Jobs;
use wharf::storage::s3meta::S3Meta;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_conformance_on_seaweedfs() {
    let sw = SeaweedFs::start().await;
    let scratch = tempfile::tempdir().unwrap();
    let client = sw.object_store();
    let store = Arc::new(
        S3Store::new(client.clone(), "conformance", scratch.path().to_path_buf()).unwrap(),
    );
    conformance::blob_store_suite(store.clone(), store.clone()).await;
    conformance::fill_store_suite(Arc::new(S3Fills(store.clone())), store.clone()).await;
    // A second replica over the same bucket.
    let other_scratch = tempfile::tempdir().unwrap();
    let other = Arc::new(
        S3Store::new(
            client.clone(),
            "conformance",
            other_scratch.path().to_path_buf(),
        )
        .unwrap(),
    );
    conformance::shared_upload_store_suite((store.clone(), store.clone()), (other.clone(), other))
        .await;
    let planted = client.clone();
    conformance::wrong_size_blob_suite(
        store.clone(),
        store.clone(),
        Arc::new(S3Fills(store.clone())),
        |d, bytes| {
            let bucket = planted.clone();
            let key =
                object_store::path::Path::from(format!("conformance/blobs/sha256/{}", d.hex()));
            Box::pin(async move {
                object_store::ObjectStoreExt::put(&*bucket, &key, bytes.into())
                    .await
                    .unwrap();
            })
        },
    )
    .await;
    conformance::meta_store_suite(Arc::new(S3Meta::new(client.clone(), "conformance"))).await;
    let jobs = S3Jobs::new(S3Meta::new(client, "conformance"), Duration::from_secs(30));
    conformance::job_store_suite(Arc::new(jobs)).await;
}

/// The replication queue in the bucket, as two replicas see it: one run
/// at a time, leases renewed and taken over when they end, no enqueue lost
/// to a concurrent finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_queue_shared_by_two_replicas_on_seaweedfs() {
    let sw = SeaweedFs::start().await;
    let x = S3Jobs::new(
        S3Meta::new(sw.object_store(), "shared"),
        Duration::from_secs(1),
    );
    let y = S3Jobs::new(
        S3Meta::new(sw.object_store(), "shared"),
        Duration::from_secs(1),
    );
    assert_ne!(
        x.holder(),
        y.holder(),
        "every replica has its own holder id"
    );
    conformance::shared_job_store_suite(|ttl| {
        Arc::new(S3Jobs::new(S3Meta::new(sw.object_store(), "shared"), ttl))
    })
    .await;
}

fn stream_of(chunks: Vec<Vec<u8>>) -> wharf::storage::ByteStream {
    use futures::StreamExt;
    futures::stream::iter(
        chunks
            .into_iter()
            .map(|c| Ok(bytes::Bytes::from(c)))
            .collect::<Vec<std::io::Result<bytes::Bytes>>>(),
    )
    .boxed()
}

async fn read_all(s: wharf::storage::ByteStream) -> Vec<u8> {
    use futures::StreamExt;
    let mut s = s;
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.unwrap());
    }
    out
}

/// What the suite cannot see: chunks larger than a multipart part, chunks
/// of one session spread over two stores (two replicas), commits by a
/// store that never saw the bytes, and a chunk cut short in the middle of a
/// multipart upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_spread_over_two_stores() {
    use wharf::oci::{Digest, UploadId};
    use wharf::storage::{BlobStore, StorageError, UploadStore};
    let sw = SeaweedFs::start().await;
    let (sa, sb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = S3Store::new(sw.object_store(), "two", sa.path().to_path_buf()).unwrap();
    let b = S3Store::new(sw.object_store(), "two", sb.path().to_path_buf()).unwrap();
    let data = common::cache::random_bytes(21 * 1024 * 1024 + 12345, 7);
    let digest = Digest::sha256_of(&data);

    // One 21 MiB chunk (a multipart upload of three parts) on A, committed
    // on B from the digest A recorded.
    let id = UploadId::new_random();
    a.create(&id).await.unwrap();
    let pieces: Vec<Vec<u8>> = data.chunks(1 << 20).map(|c| c.to_vec()).collect();
    assert_eq!(
        a.append(&id, 0, Some(data.len() as u64), stream_of(pieces.clone()))
            .await
            .unwrap(),
        data.len() as u64
    );
    assert_eq!(b.size(&id).await.unwrap(), data.len() as u64);
    assert_eq!(b.stat(&digest).await.unwrap(), None);
    assert_eq!(b.commit(&id, &digest).await.unwrap(), data.len() as u64);
    assert_eq!(read_all(a.read(&digest, None).await.unwrap()).await, data);
    assert_eq!(
        read_all(a.read(&digest, Some(9_000_000..9_000_100)).await.unwrap()).await,
        &data[9_000_000..9_000_100]
    );
    assert!(b.delete(&digest).await.unwrap());

    // Chunks alternating between A and B: nobody has the whole hash, the
    // commit streams the chunks back through a hasher.
    let id = UploadId::new_random();
    a.create(&id).await.unwrap();
    let cuts = [0, 3_000_000, 12_000_000, 12_000_001, data.len()];
    for (i, w) in cuts.windows(2).enumerate() {
        let s: &S3Store = if i % 2 == 0 { &a } else { &b };
        let n = s
            .append(
                &id,
                w[0] as u64,
                None,
                stream_of(vec![data[w[0]..w[1]].to_vec()]),
            )
            .await
            .unwrap();
        assert_eq!(n, w[1] as u64);
    }
    // A stale offset from the other replica's point of view is refused.
    assert!(matches!(
        a.append(&id, 5, None, stream_of(vec![b"x".to_vec()])).await,
        Err(StorageError::OffsetMismatch { current, .. }) if current == data.len() as u64
    ));
    // A body cut short in the middle of a multipart chunk leaves nothing.
    let broken: wharf::storage::ByteStream = {
        use futures::StreamExt;
        let mut items: Vec<std::io::Result<bytes::Bytes>> = (0..12)
            .map(|_| Ok(bytes::Bytes::from(vec![7u8; 1 << 20])))
            .collect();
        items.push(Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "client went away",
        )));
        futures::stream::iter(items).boxed()
    };
    assert!(matches!(
        b.append(&id, data.len() as u64, None, broken).await,
        Err(StorageError::Body(_))
    ));
    assert_eq!(a.size(&id).await.unwrap(), data.len() as u64);
    // A wrong digest publishes nothing, even after streaming everything.
    let wrong = Digest::sha256_of(b"not this");
    let id2 = UploadId::new_random();
    a.create(&id2).await.unwrap();
    for (i, w) in cuts.windows(2).enumerate() {
        let s: &S3Store = if i % 2 == 0 { &b } else { &a };
        s.append(
            &id2,
            w[0] as u64,
            None,
            stream_of(vec![data[w[0]..w[1]].to_vec()]),
        )
        .await
        .unwrap();
    }
    assert!(matches!(
        b.commit(&id2, &wrong).await,
        Err(StorageError::DigestMismatch { .. })
    ));
    assert_eq!(a.stat(&wrong).await.unwrap(), None);
    assert_eq!(a.stat(&digest).await.unwrap(), None);
    assert_eq!(a.commit(&id, &digest).await.unwrap(), data.len() as u64);
    assert_eq!(read_all(b.read(&digest, None).await.unwrap()).await, data);
    // An empty upload committed elsewhere, in another algorithm.
    let id3 = UploadId::new_random();
    a.create(&id3).await.unwrap();
    let empty512 = Digest::of(wharf::oci::Algorithm::Sha512, b"");
    assert_eq!(b.commit(&id3, &empty512).await.unwrap(), 0);
    assert_eq!(a.stat(&empty512).await.unwrap(), Some(0));
    // Sessions are gone from the bucket.
    assert!(UploadStore::list(&a).await.unwrap().is_empty());
}

/// SeaweedFS honours conditional writes, and tag updates from two clients
/// (two replicas) never lose a write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_writes_and_concurrent_tag_updates() {
    use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
    use wharf::oci::{Digest, RepoName, Tag};
    use wharf::storage::MetaStore;
    let sw = SeaweedFs::start().await;
    let store = sw.object_store();
    let key = object_store::path::Path::from("cas/probe");
    let create = || PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    let first = store
        .put_opts(&key, PutPayload::from("1"), create())
        .await
        .unwrap();
    assert!(matches!(
        store.put_opts(&key, PutPayload::from("x"), create()).await,
        Err(object_store::Error::AlreadyExists { .. })
    ));
    let update = |e_tag: Option<String>| PutOptions {
        mode: PutMode::Update(UpdateVersion {
            e_tag,
            version: None,
        }),
        ..Default::default()
    };
    let second = store
        .put_opts(&key, PutPayload::from("2"), update(first.e_tag.clone()))
        .await
        .unwrap();
    assert!(matches!(
        store
            .put_opts(&key, PutPayload::from("3"), update(first.e_tag.clone()))
            .await,
        Err(object_store::Error::Precondition { .. })
    ));
    assert_ne!(first.e_tag, second.e_tag);
    let got = store.get(&key).await.unwrap().bytes().await.unwrap();
    assert_eq!(&got[..], b"2", "the stale update did not land");

    // 60 concurrent retags through two independent clients.
    let a = Arc::new(S3Meta::new(sw.object_store(), "cas"));
    let b = Arc::new(S3Meta::new(sw.object_store(), "cas"));
    let repo: RepoName = "race/repo".parse().unwrap();
    let tag: Tag = "latest".parse().unwrap();
    let rec = wharf::storage::ManifestRecord {
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        size: 2,
        subject: None,
        index_depth: None,
    };
    let digests: Vec<Digest> = (0..60)
        .map(|i| Digest::sha256_of(format!("m{i}").as_bytes()))
        .collect();
    let tasks: Vec<_> = digests
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let m = if i % 2 == 0 { a.clone() } else { b.clone() };
            let (repo, tag, rec, d) = (repo.clone(), tag.clone(), rec.clone(), d.clone());
            tokio::spawn(async move {
                m.put_manifest(&repo, RepoKind::Hosted, &d, &rec, Some(&tag), None)
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let last = a.tag_record(&repo, &tag).await.unwrap().unwrap();
    assert!(digests.contains(&last.digest));
    assert_eq!(last.writes, 60, "every write landed on the one before it");
    assert_eq!(
        b.resolve_tag(&repo, &tag).await.unwrap(),
        Some(last.digest.clone())
    );
    // Deleting the manifest clears the tag; deleting again finds nothing.
    assert!(
        a.delete_manifest(&repo, RepoKind::Hosted, &last.digest)
            .await
            .unwrap()
    );
    assert_eq!(b.resolve_tag(&repo, &tag).await.unwrap(), None);
    assert_eq!(b.tags(&repo, None, 10).await.unwrap(), Some(vec![]));
}

// ---- several wharf replicas over one bucket ----

use bytes::Bytes;
use common::http::{HttpClient, Method, StatusCode};
use common::{Wharf, sha256, spawn_wharf_config};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// The configuration of a replica over `sw`'s bucket under `prefix`.
fn replica_config(sw: &SeaweedFs, prefix: &str, dir: &std::path::Path) -> String {
    sw.wharf_config(prefix, dir, "")
}

/// Spawns a replica over `sw`'s bucket under `prefix`.
fn replica(sw: &SeaweedFs, prefix: &str) -> Wharf {
    replica_with(sw, prefix, &[], &[])
}

fn replica_with(sw: &SeaweedFs, prefix: &str, env: &[(&str, &str)], remove: &[&str]) -> Wharf {
    sw.spawn_wharf(prefix, "", env, remove)
}

fn manifest(config: (&str, usize), layer: (&str, usize), note: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.0, "size": config.1},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer.0, "size": layer.1}],
        "annotations": {"note": note},
    }))
    .unwrap()
}

fn location(r: &common::http::Resp) -> String {
    r.header("location").expect("location").to_string()
}

fn with_query(loc: &str, q: &str) -> String {
    let sep = if loc.contains('?') { '&' } else { '?' };
    format!("{loc}{sep}{q}")
}

/// A chunked push of `data` in `chunks` pieces through `clients` in turn
/// (POST on the first); returns the digest.
async fn chunked_push(clients: &[&HttpClient], repo: &str, data: &[u8], chunks: usize) -> String {
    let digest = sha256(data);
    let r = clients[0]
        .send(
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    let mut loc = location(&r);
    let step = data.len().div_ceil(chunks);
    for (i, piece) in data.chunks(step).enumerate() {
        let c = clients[i % clients.len()];
        let start = i * step;
        let range = format!("{}-{}", start, start + piece.len() - 1);
        let r = c
            .send(
                Method::PATCH,
                &loc,
                &[
                    ("content-type", "application/octet-stream"),
                    ("content-range", &range),
                ],
                Bytes::copy_from_slice(piece),
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "chunk {i}: {r:?}");
        assert_eq!(
            r.header("range"),
            Some(format!("0-{}", start + piece.len() - 1).as_str())
        );
        loc = location(&r);
    }
    let last = clients[chunks % clients.len()];
    let r = last
        .send(
            Method::PUT,
            &with_query(&loc, &format!("digest={digest}")),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    digest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_on_one_replica_pull_on_another() {
    let sw = SeaweedFs::start().await;
    let a = replica(&sw, "cluster");
    // B has a local hot tier in front of the bucket.
    let dir = tempfile::tempdir().unwrap();
    let body = replica_config(&sw, "cluster", dir.path()) + "hot_tier_max_size = \"64MiB\"\n";
    let b = spawn_wharf_config(
        dir,
        &body,
        &[("S3_TEST_SECRET", common::seaweedfs::SECRET_KEY)],
        &[],
    );
    let (ca, cb) = (HttpClient::new(a.url()), HttpClient::new(b.url()));
    let repo = "team/app";
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let layer = common::cache::random_bytes(18 * 1024 * 1024 + 3, 11);
    let config_digest = ca.push_blob(repo, &config).await;
    // Chunked, every chunk through A.
    let layer_digest = chunked_push(&[&ca], repo, &layer, 3).await;
    let m = manifest(
        (&config_digest, config.len()),
        (&layer_digest, layer.len()),
        "v1",
    );
    let r = ca.put_manifest(repo, "v1", OCI_MANIFEST, &m).await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let manifest_digest = sha256(&m);

    // B serves everything A stored, byte for byte.
    let r = cb.get(&format!("/v2/{repo}/manifests/v1")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], &m[..]);
    assert_eq!(
        r.header("docker-content-digest"),
        Some(manifest_digest.as_str())
    );
    let r = cb.get(&format!("/v2/{repo}/blobs/{layer_digest}")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(sha256(&r.body), layer_digest);
    assert_eq!(r.body.len(), layer.len());
    let r = cb
        .send(
            Method::GET,
            &format!("/v2/{repo}/blobs/{layer_digest}"),
            &[("range", "bytes=10000000-10000999")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(&r.body[..], &layer[10_000_000..10_001_000]);
    // The layer was copied to B's hot tier, and is served from there.
    let copy = b
        .dir
        .path()
        .join("scratch/hot/blobs/sha256")
        .join(&layer_digest[7..9])
        .join(&layer_digest[7..]);
    for _ in 0..100 {
        if copy.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(sha256(&std::fs::read(&copy).unwrap()), layer_digest);
    let r = cb.get(&format!("/v2/{repo}/blobs/{layer_digest}")).await;
    assert_eq!(sha256(&r.body), layer_digest);
    let metrics = String::from_utf8_lossy(&cb.get("/metrics").await.body).into_owned();
    let hits: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("wharf_hot_tier_hits_total "))
        .expect("hot tier hits in /metrics")
        .trim()
        .parse()
        .unwrap();
    assert!(hits >= 1, "{metrics}");
    let r = cb.get(&format!("/v2/{repo}/tags/list")).await;
    assert_eq!(r.json()["tags"], serde_json::json!(["v1"]));
    let r = cb.get("/v2/_catalog").await;
    assert_eq!(r.json()["repositories"], serde_json::json!(["team/app"]));
    // A blob pushed to another repository is not readable through this one.
    let other = cb.push_blob("team/other", b"elsewhere").await;
    assert_eq!(
        ca.head(&format!("/v2/{repo}/blobs/{other}")).await.status,
        StatusCode::NOT_FOUND
    );

    // Deleting on B is seen on A.
    let r = cb.delete(&format!("/v2/{repo}/manifests/v1")).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    assert_eq!(
        ca.get(&format!("/v2/{repo}/manifests/v1")).await.status,
        StatusCode::NOT_FOUND
    );
    let r = ca
        .get(&format!("/v2/{repo}/manifests/{manifest_digest}"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "the manifest outlives its tag");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retags_across_replicas_lose_no_write() {
    let sw = SeaweedFs::start().await;
    let (a, b) = (replica(&sw, "race"), replica(&sw, "race"));
    let (ca, cb) = (HttpClient::new(a.url()), HttpClient::new(b.url()));
    let repo = "race/app";
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let layer = b"one small layer".to_vec();
    let cd = ca.push_blob(repo, &config).await;
    let ld = ca.push_blob(repo, &layer).await;
    let bodies: Vec<Vec<u8>> = (0..100)
        .map(|i| {
            manifest(
                (&cd, config.len()),
                (&ld, layer.len()),
                &format!("write {i}"),
            )
        })
        .collect();
    let digests: Vec<String> = bodies.iter().map(|m| sha256(m)).collect();
    let tasks: Vec<_> = bodies
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let c = if i % 2 == 0 { ca.clone() } else { cb.clone() };
            tokio::spawn(async move { c.put_manifest(repo, "latest", OCI_MANIFEST, &m).await })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    }
    let fa = ca.head(&format!("/v2/{repo}/manifests/latest")).await;
    let fb = cb.head(&format!("/v2/{repo}/manifests/latest")).await;
    let final_a = fa.header("docker-content-digest").unwrap().to_string();
    assert_eq!(fb.header("docker-content-digest"), Some(final_a.as_str()));
    assert!(
        digests.contains(&final_a),
        "the tag holds one of the written values"
    );
    // The tag's history: 100 acknowledged writes, each on top of the last.
    let meta = S3Meta::new(sw.object_store(), "race");
    let rec = meta
        .tag_record(&repo.parse().unwrap(), &"latest".parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.digest.to_string(), final_a);
    assert_eq!(rec.writes, 100, "no write was lost");
    // Every manifest is there by digest.
    for d in &digests {
        assert_eq!(
            cb.head(&format!("/v2/{repo}/manifests/{d}")).await.status,
            StatusCode::OK
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_started_on_one_replica_finished_on_another() {
    let sw = SeaweedFs::start().await;
    let (a, b) = (replica(&sw, "moves"), replica(&sw, "moves"));
    let (ca, cb) = (HttpClient::new(a.url()), HttpClient::new(b.url()));
    let repo = "moves/app";
    // Chunks alternate A, B, A, B; the PUT lands on B.
    let data = common::cache::random_bytes(11 * 1024 * 1024 + 77, 3);
    let digest = chunked_push(&[&ca, &cb], repo, &data, 4).await;
    let r = ca.get(&format!("/v2/{repo}/blobs/{digest}")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], &data[..]);

    // POST on A, PATCH on B, status on A, PUT with the last chunk on A.
    let data = common::cache::random_bytes(300_000, 4);
    let digest = sha256(&data);
    let r = ca
        .send(
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/"),
            &[],
            Bytes::new(),
        )
        .await;
    let loc = location(&r);
    let r = cb
        .send(
            Method::PATCH,
            &loc,
            &[("content-range", "0-99999")],
            Bytes::copy_from_slice(&data[..100_000]),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    let r = ca.get(&loc).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    assert_eq!(r.header("range"), Some("0-99999"));
    // A chunk at a stale offset is refused by the other replica too.
    let r = ca
        .send(
            Method::PATCH,
            &loc,
            &[("content-range", "0-9")],
            Bytes::from_static(b"0123456789"),
        )
        .await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE, "{r:?}");
    let r = ca
        .send(
            Method::PUT,
            &with_query(&loc, &format!("digest={digest}")),
            &[("content-range", "100000-299999")],
            Bytes::copy_from_slice(&data[100_000..]),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let r = cb.get(&format!("/v2/{repo}/blobs/{digest}")).await;
    assert_eq!(sha256(&r.body), digest);
    // The session is over on both.
    assert_eq!(cb.get(&loc).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_killed_mid_upload_another_finishes_it() {
    use tokio::io::AsyncWriteExt;
    let sw = SeaweedFs::start().await;
    let (mut a, b) = (replica(&sw, "kill"), replica(&sw, "kill"));
    let (ca, cb) = (HttpClient::new(a.url()), HttpClient::new(b.url()));
    let repo = "kill/app";
    let data = common::cache::random_bytes(40 * 1024 * 1024, 5);
    let digest = sha256(&data);
    let first = 5 * 1024 * 1024;
    let r = ca
        .send(
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/"),
            &[],
            Bytes::new(),
        )
        .await;
    let loc = location(&r);
    let r = ca
        .send(
            Method::PATCH,
            &loc,
            &[("content-range", &format!("0-{}", first - 1))],
            Bytes::copy_from_slice(&data[..first]),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");

    // The second chunk announces everything left, sends 20 MiB (A is then
    // in the middle of a multipart upload) and A dies.
    let mut sock = tokio::net::TcpStream::connect(a.addr).await.unwrap();
    let rest = data.len() - first;
    let head = format!(
        "PATCH {loc} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/octet-stream\r\ncontent-range: {first}-{}\r\ncontent-length: {rest}\r\n\r\n",
        a.addr,
        data.len() - 1
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(&data[first..first + 20 * 1024 * 1024])
        .await
        .unwrap();
    sock.flush().await.unwrap();
    // With 20 MiB written, A has read all but what the socket buffers hold
    // (a few MiB): it is well into the chunk, whose multipart upload it
    // started on reading the head (the chunk announces more than 8 MiB).
    a.kill9();
    drop(sock);

    // B sees the session with exactly the first chunk: nothing of the cut one.
    let r = cb.get(&loc).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    assert_eq!(r.header("range"), Some(format!("0-{}", first - 1).as_str()));
    assert_eq!(
        cb.head(&format!("/v2/{repo}/blobs/{digest}")).await.status,
        StatusCode::NOT_FOUND
    );
    // B takes the rest and publishes the verified blob.
    let r = cb
        .send(
            Method::PATCH,
            &loc,
            &[("content-range", &format!("{first}-{}", data.len() - 1))],
            Bytes::copy_from_slice(&data[first..]),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    let r = cb
        .send(
            Method::PUT,
            &with_query(&loc, &format!("digest={digest}")),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let r = cb.get(&format!("/v2/{repo}/blobs/{digest}")).await;
    assert_eq!(r.body.len(), data.len());
    assert_eq!(sha256(&r.body), digest);
    // A restarts over the same bucket and serves it too.
    let a2 = replica(&sw, "kill");
    let r = HttpClient::new(a2.url())
        .get(&format!("/v2/{repo}/blobs/{digest}"))
        .await;
    assert_eq!(sha256(&r.body), digest);
}

/// Runs `wharf serve` expecting it to fail at start; returns its stderr.
fn fails_to_start(body: &str, env: &[(&str, &str)], remove: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("wharf.toml");
    std::fs::write(&config, body).unwrap();
    let mut cmd = std::process::Command::new(common::wharf_bin());
    cmd.args(["serve", "--config"]).arg(&config);
    for k in remove {
        cmd.env_remove(k);
    }
    cmd.env("S3_TEST_SECRET", common::seaweedfs::SECRET_KEY)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success(), "wharf was expected to fail at start");
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("wharf neither started nor failed within 90 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening on"),
        "it must not listen"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// This machine kind sets `AWS_CA_BUNDLE` (Distribution's S3 driver panics
/// on it). wharf starts with it set and unset, and honours it as the AWS
/// SDKs do: an extra CA bundle for the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_with_and_without_aws_ca_bundle() {
    let certs = tempfile::tempdir().unwrap();
    let common::fake_upstream::TestPki { ca, cert, key } =
        common::fake_upstream::TestPki::generate(certs.path());
    let sw = SeaweedFs::start_with_tls(Some((&cert, &key))).await;
    let cert_s = ca.display().to_string();
    let with = [("AWS_CA_BUNDLE", cert_s.as_str())];

    // Plain HTTP endpoint: the bundle is loaded and harmless; unset is fine.
    let a = replica_with(&sw, "ca", &with, &[]);
    let b = replica_with(&sw, "ca", &[], &["AWS_CA_BUNDLE"]);
    let digest = HttpClient::new(a.url())
        .push_blob("ca/app", b"bundle")
        .await;
    let r = HttpClient::new(b.url())
        .get(&format!("/v2/ca/app/blobs/{digest}"))
        .await;
    assert_eq!(&r.body[..], b"bundle");
    let bad = fails_to_start(
        &replica_config(&sw, "ca", certs.path()),
        &[("AWS_CA_BUNDLE", "/surely/not/a/bundle.pem")],
        &[],
    );
    assert!(bad.contains("AWS_CA_BUNDLE"), "{bad}");

    // HTTPS endpoint with a private CA: trusted through AWS_CA_BUNDLE or
    // ca_file, refused without either.
    let https = |dir: &std::path::Path, extra: &str| {
        replica_config(&sw, "ca", dir).replace(&sw.endpoint(), &sw.https_endpoint()) + extra
    };
    let dir = tempfile::tempdir().unwrap();
    let c = spawn_wharf_config(
        dir,
        &https(certs.path(), ""),
        &[with[0], ("S3_TEST_SECRET", common::seaweedfs::SECRET_KEY)],
        &[],
    );
    let r = HttpClient::new(c.url())
        .get(&format!("/v2/ca/app/blobs/{digest}"))
        .await;
    assert_eq!(&r.body[..], b"bundle", "read over HTTPS");
    let dir = tempfile::tempdir().unwrap();
    let d = spawn_wharf_config(
        dir,
        &https(certs.path(), &format!("ca_file = {cert_s:?}\n")),
        &[("S3_TEST_SECRET", common::seaweedfs::SECRET_KEY)],
        &["AWS_CA_BUNDLE"],
    );
    let r = HttpClient::new(d.url())
        .get(&format!("/v2/ca/app/blobs/{digest}"))
        .await;
    assert_eq!(&r.body[..], b"bundle", "read over HTTPS with ca_file");
    let err = fails_to_start(&https(certs.path(), ""), &[], &["AWS_CA_BUNDLE"]);
    assert!(err.contains("storage.s3"), "{err}");
}

/// A bucket that cannot be used stops wharf at start, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_bucket_fails_at_start() {
    let sw = SeaweedFs::start().await;
    let dir = tempfile::tempdir().unwrap();
    let good = replica_config(&sw, "x", dir.path());
    let e = fails_to_start(&good, &[("S3_TEST_SECRET", "wrong secret")], &[]);
    assert!(e.contains("storage.s3"), "{e}");
    let e = fails_to_start(
        &good.replace("bucket = \"wharf\"", "bucket = \"no-such-bucket\""),
        &[],
        &[],
    );
    assert!(e.contains("storage.s3"), "{e}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let e = fails_to_start(
        &good.replace(&sw.endpoint(), &format!("http://{closed}")),
        &[],
        &[],
    );
    assert!(e.contains("storage.s3"), "{e}");
    // And a type = "s3" without its table.
    let e = fails_to_start(
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\ntype = \"s3\"\n",
        &[],
        &[],
    );
    assert!(e.contains("storage.s3:"), "{e}");
}

/// `redirect = true`: blob GETs answer 307 with a presigned URL and the
/// bytes come from SeaweedFS; HEAD, manifests and errors stay with wharf.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_gets_redirect_to_presigned_urls() {
    let sw = SeaweedFs::start().await;
    let dir = tempfile::tempdir().unwrap();
    let body =
        replica_config(&sw, "redir", dir.path()) + "redirect = true\nredirect_ttl = \"5m\"\n";
    let a = spawn_wharf_config(
        dir,
        &body,
        &[("S3_TEST_SECRET", common::seaweedfs::SECRET_KEY)],
        &[],
    );
    let plain = replica(&sw, "redir");
    let ca = HttpClient::new(a.url());
    let data = common::cache::random_bytes(3 * 1024 * 1024 + 5, 9);
    let digest = chunked_push(&[&ca], "redir/app", &data, 2).await;

    let r = ca.get(&format!("/v2/redir/app/blobs/{digest}")).await;
    assert_eq!(r.status, StatusCode::TEMPORARY_REDIRECT, "{r:?}");
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    let url = r.header("location").unwrap().to_string();
    assert!(url.starts_with(&sw.endpoint()), "{url}");
    assert!(url.contains("X-Amz-Signature="), "{url}");
    assert!(url.contains("X-Amz-Expires=300"), "{url}");
    // The store serves the bytes, whole and by range, to a client without
    // credentials.
    let got = ca.get(&url).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(sha256(&got.body), digest);
    let part = ca
        .send(
            Method::GET,
            &url,
            &[("range", "bytes=100-199")],
            Bytes::new(),
        )
        .await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(&part.body[..], &data[100..200]);
    // HEAD is answered by wharf; unknown blobs are 404, not redirects.
    let r = ca.head(&format!("/v2/redir/app/blobs/{digest}")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.header("content-length"),
        Some(data.len().to_string().as_str())
    );
    let r = ca.get(&format!("/v2/redir/other/blobs/{digest}")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error_code(), "BLOB_UNKNOWN");
    // A replica without redirects streams the same bytes itself.
    let r = HttpClient::new(plain.url())
        .get(&format!("/v2/redir/app/blobs/{digest}"))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(sha256(&r.body), digest);
}

/// Pull-through over S3 with two replicas: concurrent cold pulls of one
/// blob on both reach upstream once for the whole cluster (one replica
/// holds the fill's lease, the other streams its parts from the bucket),
/// and once it is in the bucket any replica serves it without upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cold_pulls_on_two_replicas_fetch_once_per_cluster() {
    use common::fake_upstream::{FakeUpstream, Fault};
    let sw = SeaweedFs::start().await;
    let fake = FakeUpstream::start();
    let layer = common::cache::random_bytes(6 * 1024 * 1024, 21);
    let (_, ld, _) = common::cache::seed_image(&fake, "team/app", "v1", &layer);
    fake.fault(&ld, Fault::bytes_per_second(4 * 1024 * 1024));
    let spawn = || sw.spawn_pull_through("pull", &common::cache::rule("up", &fake, ""));
    let (a, b) = (spawn(), spawn());
    let path = format!("/v2/up/team/app/blobs/{ld}");
    let mut tasks = Vec::new();
    for i in 0..16 {
        let c = HttpClient::new(if i % 2 == 0 { a.url() } else { b.url() });
        let path = path.clone();
        tasks.push(tokio::spawn(async move { c.get(&path).await }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(sha256(&r.body), ld, "every body hashes to the digest");
    }
    let gets = fake.count("GET", &format!("/v2/team/app/blobs/{ld}"));
    assert_eq!(gets, 1, "{gets} upstream GETs for two replicas");
    // In the bucket now: a third replica serves it without upstream.
    let c = spawn();
    let r = HttpClient::new(c.url()).get(&path).await;
    assert_eq!(sha256(&r.body), ld);
    assert_eq!(fake.count("GET", &format!("/v2/team/app/blobs/{ld}")), gets);
}

/// A slow upstream (longer silences between bytes than the fill lease
/// lasts): the holder renews its lease on a timer, not as bytes arrive, so
/// the other replica keeps following it and the cluster still fetches the
/// blob once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_upstream_keeps_one_fetch_per_cluster() {
    use common::fake_upstream::{FakeUpstream, Fault};
    let sw = SeaweedFs::start().await;
    let fake = FakeUpstream::start();
    let layer = common::cache::random_bytes(1024 * 1024, 22);
    let (_, ld, _) = common::cache::seed_image(&fake, "team/app", "v1", &layer);
    // Four pieces, 2.5 s apart: 2.5 times the lease between two bytes.
    fake.fault(
        &ld,
        Fault::SlowBody {
            chunk: 256 * 1024,
            delay: Duration::from_millis(2500),
        },
    );
    let spawn = || {
        sw.spawn_pull_through_with(
            "slow",
            &common::cache::rule("up", &fake, ""),
            &[("WHARF_STORAGE_S3_FILL_LEASE", "1s")],
        )
    };
    let (a, b) = (spawn(), spawn());
    let path = format!("/v2/up/team/app/blobs/{ld}");
    let upstream_path = format!("/v2/team/app/blobs/{ld}");
    let ca = HttpClient::new(a.url());
    let p = path.clone();
    let first = tokio::spawn(async move { ca.get(&p).await });
    // B asks once A is fetching (and so holds the lease).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while fake.count("GET", &upstream_path) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "A never asked upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cb = HttpClient::new(b.url());
    let p = path.clone();
    let second = tokio::spawn(async move { cb.get(&p).await });
    for r in [first.await.unwrap(), second.await.unwrap()] {
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(sha256(&r.body), ld, "every body hashes to the digest");
    }
    assert_eq!(
        fake.count("GET", &upstream_path),
        1,
        "one upstream GET for the cluster: {:?}",
        fake.ranges(&upstream_path)
    );
}

/// A holder that loses its lease (another replica took it over while
/// this one stalled) stops fetching from upstream at once and finishes
/// from the new holder's parts, from wherever its own bytes end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_demoted_fill_holder_stops_fetching_and_follows() {
    use common::fake_upstream::{FakeUpstream, Fault};
    use object_store::{ObjectStoreExt, PutPayload};
    let sw = SeaweedFs::start().await;
    let fake = FakeUpstream::start();
    let layer = common::cache::random_bytes(1024 * 1024, 23);
    let (_, ld, _) = common::cache::seed_image(&fake, "team/app", "v1", &layer);
    // Eight pieces 4 s apart: upstream needs 28 s for the whole blob.
    fake.fault(
        &ld,
        Fault::SlowBody {
            chunk: 128 * 1024,
            delay: Duration::from_secs(4),
        },
    );
    let a = sw.spawn_pull_through_with(
        "demoted",
        &common::cache::rule("up", &fake, ""),
        &[("WHARF_STORAGE_S3_FILL_LEASE", "3s")],
    );
    let upstream_path = format!("/v2/team/app/blobs/{ld}");
    let ca = HttpClient::new(a.url());
    let p = format!("/v2/up/team/app/blobs/{ld}");
    let pull = tokio::spawn(async move { ca.get(&p).await });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while fake.count("GET", &upstream_path) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "A never asked upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another holder takes the lease and publishes the whole blob as one
    // part.
    let store = sw.object_store();
    let dir = format!(
        "demoted/fills/sha256-{}",
        ld.strip_prefix("sha256:").unwrap()
    );
    store
        .put(
            &object_store::path::Path::from(format!("{dir}/{:020}", 0)),
            PutPayload::from(layer.clone()),
        )
        .await
        .unwrap();
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 60_000;
    let lease =
        serde_json::json!({"holder": "another replica", "expires": expires, "total": layer.len()});
    store
        .put(
            &object_store::path::Path::from(format!("{dir}/lease")),
            PutPayload::from(serde_json::to_vec(&lease).unwrap()),
        )
        .await
        .unwrap();
    let stolen = std::time::Instant::now();
    let r = pull.await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(sha256(&r.body), ld, "the body hashes to the digest");
    assert!(
        stolen.elapsed() < Duration::from_secs(15),
        "A finished from the new holder's part instead of upstream: {:?} after the lease was taken",
        stolen.elapsed()
    );
    assert_eq!(fake.count("GET", &upstream_path), 1);
}

/// A replica that finds the expired lease of a holder that died, with the
/// parts it published, takes those bytes from the bucket and asks
/// upstream only for the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holders_parts_are_not_fetched_again() {
    use common::fake_upstream::FakeUpstream;
    use object_store::{ObjectStoreExt, PutPayload};
    let sw = SeaweedFs::start().await;
    let fake = FakeUpstream::start();
    let layer = common::cache::random_bytes(1024 * 1024, 24);
    let (_, ld, _) = common::cache::seed_image(&fake, "team/app", "v1", &layer);
    let store = sw.object_store();
    let dir = format!("dead/fills/sha256-{}", ld.strip_prefix("sha256:").unwrap());
    let published = 300 * 1024;
    store
        .put(
            &object_store::path::Path::from(format!("{dir}/{:020}", 0)),
            PutPayload::from(layer[..published].to_vec()),
        )
        .await
        .unwrap();
    let expired = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        - 1000;
    let lease =
        serde_json::json!({"holder": "a dead replica", "expires": expired, "total": layer.len()});
    store
        .put(
            &object_store::path::Path::from(format!("{dir}/lease")),
            PutPayload::from(serde_json::to_vec(&lease).unwrap()),
        )
        .await
        .unwrap();
    let a = sw.spawn_pull_through("dead", &common::cache::rule("up", &fake, ""));
    let r = HttpClient::new(a.url())
        .get(&format!("/v2/up/team/app/blobs/{ld}"))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(sha256(&r.body), ld);
    assert_eq!(
        fake.ranges(&format!("/v2/team/app/blobs/{ld}")),
        vec![Some(format!("bytes={published}-"))],
        "one upstream GET, for the bytes the dead holder had not published"
    );
}

/// Fill parts are written once: a holder that lost its lease (and does
/// not know yet) cannot overwrite the part the new holder wrote, and
/// learns from the refusal that it was demoted; a follower reads from any
/// offset, also inside a part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_parts_are_written_once() {
    use wharf::storage::FillLeases;
    use wharf::storage::s3lease::S3Leases;
    let sw = SeaweedFs::start().await;
    let leases = S3Leases::new(sw.object_store(), "parts");
    let d = wharf::oci::Digest::sha256_of(b"parts");
    let new_holder = Bytes::from_static(b"new holder's bytes");
    assert!(leases.put_part(&d, 0, new_holder.clone()).await.unwrap());
    assert!(
        !leases
            .put_part(&d, 0, Bytes::from_static(b"stale holder bytes"))
            .await
            .unwrap(),
        "a second write of a part is refused"
    );
    let (b, _) = leases.part(&d, 0).await.unwrap().unwrap();
    assert_eq!(b, new_holder, "the first part stays");
    let (b, _) = leases.part(&d, 4).await.unwrap().unwrap();
    assert_eq!(b, new_holder.slice(4..), "read from inside a part");
    assert!(
        leases
            .part(&d, new_holder.len() as u64)
            .await
            .unwrap()
            .is_none()
    );
}

/// Two replicas over one bucket: replica A's evictor evicts blobs it
/// pulled through the cache while replica B pushes the same digests into
/// a hosted repository, many times, at varying offsets. Every push that
/// was acknowledged keeps its blob, and its image (a manifest naming the
/// blob) is whole afterwards.
async fn pushes_race_evictions(client: Arc<dyn object_store::ObjectStore>, rounds: u64) {
    let scratch = tempfile::tempdir().unwrap();
    let store =
        |n: &str| Arc::new(S3Store::new(client.clone(), "race", scratch.path().join(n)).unwrap());
    let (blobs_a, blobs_b) = (store("a"), store("b"));
    let meta_a = Arc::new(S3Meta::new(client.clone(), "race"));
    let meta_b = Arc::new(S3Meta::new(client.clone(), "race"));
    // Over budget with any blob: A evicts every cached blob it can.
    let budget = Budget::open(0, blobs_a.clone(), meta_a.clone())
        .await
        .unwrap();
    let b = Registry::new(blobs_b.clone(), blobs_b.clone(), meta_b);
    race_rounds(blobs_a, meta_a, budget, b, rounds).await;
}

use wharf::cache::budget::Budget;
use wharf::registry::Registry;
use wharf::storage::{BlobStore, MetaStore};

/// The rounds of [`pushes_race_evictions`]: `budget` evicts from
/// `blobs_a` (described by `meta_a`) while `b` pushes.
async fn race_rounds(
    blobs_a: Arc<dyn BlobStore>,
    meta_a: Arc<dyn MetaStore>,
    budget: Arc<Budget>,
    b: Registry,
    rounds: u64,
) {
    use wharf::oci::{Digest, Reference, RepoName};
    let b = Arc::new(b);
    let cached: RepoName = "up/app".parse().unwrap();
    let hosted: RepoName = "team/app".parse().unwrap();
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let config_digest = Digest::sha256_of(&config);
    b.hosted(&hosted, None)
        .await
        .unwrap()
        .monolithic_upload(
            &config_digest,
            Some(config.len() as u64),
            stream_of(vec![config.clone()]),
        )
        .await
        .unwrap();
    let mut acknowledged = Vec::new();
    for round in 0..rounds {
        let layer = common::cache::random_bytes(64 * 1024, 1000 + round);
        let d = Digest::sha256_of(&layer);
        // A pulled it through the cache: stored, linked into a cached
        // repository, budgeted.
        blobs_a.put(&d, Bytes::from(layer.clone())).await.unwrap();
        meta_a
            .link_blob(&cached, RepoKind::Cached, &d)
            .await
            .unwrap();
        budget.add(&d, layer.len() as u64).await.unwrap();
        // A evicts while B pushes, starting a little later each round.
        // Odd rounds by a few task switches (stores in memory answer in
        // microseconds), even ones by up to 10 ms (a bucket's requests).
        let (yields, delay) = match round % 2 {
            1 => (round % 64, Duration::ZERO),
            _ => (0, Duration::from_micros((round / 2 % 20) * 500)),
        };
        let evict = {
            let budget = budget.clone();
            tokio::spawn(async move {
                for _ in 0..yields {
                    tokio::task::yield_now().await;
                }
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                budget.evict(&|_: &Digest| false).await
            })
        };
        let push = {
            let (b, d, hosted, layer) = (b.clone(), d.clone(), hosted.clone(), layer.clone());
            tokio::spawn(async move {
                b.hosted(&hosted, None)
                    .await?
                    .monolithic_upload(&d, Some(layer.len() as u64), stream_of(vec![layer]))
                    .await
            })
        };
        let pushed = push.await.unwrap();
        evict.await.unwrap().unwrap();
        if pushed.is_ok() {
            let m = manifest(
                (config_digest.as_str(), config.len()),
                (d.as_str(), layer.len()),
                &format!("round {round}"),
            );
            let tag: Reference = format!("r{round}").parse().unwrap();
            let image = match b.hosted(&hosted, None).await {
                Ok(repo) => {
                    repo.put_manifest(&tag, Some(OCI_MANIFEST), Bytes::from(m))
                        .await
                }
                Err(e) => Err(e),
            };
            acknowledged.push((round, d, layer, image.is_ok()));
        }
    }
    assert!(!acknowledged.is_empty(), "no push was acknowledged");
    assert!(
        budget.metrics.evictions.get() > 0,
        "the evictor deleted blobs (pushes that came later published them again)"
    );
    let mut lost = Vec::new();
    for (round, d, layer, image) in &acknowledged {
        let whole = match blobs_a.stat(d).await.unwrap() {
            Some(_) => read_all(blobs_a.read(d, None).await.unwrap()).await == *layer,
            None => false,
        };
        if !whole || !image {
            lost.push((*round, whole, *image));
        }
    }
    assert!(
        lost.is_empty(),
        "acknowledged pushes that lost their blob or image (round, blob whole, image pushed): {lost:?} of {}",
        acknowledged.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushes_racing_evictions_keep_every_blob_on_seaweedfs() {
    let sw = SeaweedFs::start().await;
    pushes_race_evictions(sw.object_store(), 60).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushes_racing_evictions_keep_every_blob_in_memory() {
    pushes_race_evictions(Arc::new(object_store::memory::InMemory::new()), 1500).await;
}

/// The same race in one process over the filesystem and redb, where the
/// registry also holds the blob in the cache budget while it pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushes_racing_evictions_keep_every_blob_on_the_filesystem() {
    use wharf::cache::Cache;
    use wharf::cache::rules::Rules;
    use wharf::storage::fs::FsStore;
    use wharf::storage::meta::RedbMeta;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FsStore::open(dir.path()).unwrap());
    let meta = Arc::new(RedbMeta::open(&dir.path().join("meta.redb")).unwrap());
    let budget = Budget::open(0, store.clone(), meta.clone()).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let cache = Cache::new(
        Rules(Vec::new()),
        store.clone(),
        store.clone(),
        meta.clone(),
        false,
        Duration::from_secs(60),
        Duration::from_secs(3600),
        budget.clone(),
        stop,
    );
    let b = Registry::new(store.clone(), store.clone(), meta.clone()).with_cache(Arc::new(cache));
    race_rounds(store, meta, budget, b, 200).await;
}

/// An evictor that dies holding its claim: a push of the digest waits
/// for the claim to expire, then pins it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_eviction_claim_expires() {
    use wharf::oci::Digest;
    use wharf::storage::{EvictionClaim, MetaStore};
    let client: Arc<dyn object_store::ObjectStore> =
        Arc::new(object_store::memory::InMemory::new());
    let evictor =
        S3Meta::new(client.clone(), "stale").with_eviction_claim(Duration::from_millis(300));
    let pusher = S3Meta::new(client, "stale");
    let d = Digest::sha256_of(b"stale claim");
    let before = std::time::SystemTime::now();
    let EvictionClaim::Claimed { deadline, .. } = evictor.claim_eviction(&d).await.unwrap() else {
        panic!("an unpinned blob can be claimed");
    };
    let deadline = deadline.expect("a claim over the bucket has a deadline");
    assert!(
        deadline <= before + Duration::from_millis(100) + Duration::from_secs(1)
            && deadline <= std::time::SystemTime::now() + Duration::from_millis(100),
        "a third of the claim, counted from before its write"
    );
    assert_eq!(
        pusher.claim_eviction(&d).await.unwrap(),
        EvictionClaim::Busy
    );
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), pusher.pin_blob(&d))
        .await
        .expect("the pin takes the expired claim over")
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "the pin waited for the claim: {:?}",
        started.elapsed()
    );
    assert!(pusher.blob_pinned(&d).await.unwrap());
    assert_eq!(
        evictor.claim_eviction(&d).await.unwrap(),
        EvictionClaim::Pinned
    );
}

/// The local hot tier in front of S3: the conformance suite through it;
/// blobs copied on first read and served from disk after; verified copies
/// only; the size bound kept by evicting the least recently read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_tier_copies_verifies_and_evicts() {
    use object_store::{ObjectStoreExt, PutPayload};
    use wharf::oci::Digest;
    use wharf::storage::BlobStore;
    use wharf::storage::hot::{HotBlobs, HotTier};
    let sw = SeaweedFs::start().await;
    let scratch = tempfile::tempdir().unwrap();
    let s3 = Arc::new(S3Store::new(sw.object_store(), "hot", scratch.path().join("s")).unwrap());
    let hot_dir = scratch.path().join("hot");
    let tier = Arc::new(HotTier::open(s3.clone(), hot_dir.clone(), 2_500_000).unwrap());
    conformance::blob_store_suite(Arc::new(HotBlobs(tier.clone())), s3.clone()).await;

    let tier = Arc::new(HotTier::open(s3.clone(), hot_dir.clone(), 2_500_000).unwrap());
    let hot = HotBlobs(tier.clone());
    let blobs: Vec<(Digest, Vec<u8>)> = (0..3)
        .map(|i| {
            let b = common::cache::random_bytes(1_000_000, 100 + i);
            (Digest::sha256_of(&b), b)
        })
        .collect();
    for (d, b) in &blobs {
        hot.put(d, Bytes::from(b.clone())).await.unwrap();
    }
    let wait_evictions = |n: u64| {
        let tier = tier.clone();
        async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while tier.metrics.evictions.get() < n {
                assert!(std::time::Instant::now() < deadline, "no eviction {n}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    };
    let wait_for = |d: Digest| {
        let tier = tier.clone();
        async move {
            for _ in 0..100 {
                if tier.contains(&d) {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            panic!("{d} was not copied to the hot tier");
        }
    };
    let (d0, b0) = &blobs[0];
    assert_eq!(read_all(hot.read(d0, None).await.unwrap()).await, *b0);
    assert_eq!(tier.metrics.misses.get(), 1);
    wait_for(d0.clone()).await;
    assert_eq!(
        read_all(hot.read(d0, Some(10..20)).await.unwrap()).await,
        &b0[10..20]
    );
    assert_eq!(tier.metrics.hits.get(), 1, "the second read came from disk");
    for (d, b) in &blobs[1..] {
        assert_eq!(read_all(hot.read(d, None).await.unwrap()).await, *b);
        wait_for(d.clone()).await;
    }
    // 3 MB read, 2.5 MB allowed: the least recently read copy left (the
    // eviction runs after the copy; its file is gone once it is counted).
    wait_evictions(1).await;
    assert!(tier.size() <= 2_500_000, "{}", tier.size());
    assert!(!tier.contains(d0));
    assert!(tier.contains(&blobs[1].0) && tier.contains(&blobs[2].0));
    assert!(tier.metrics.evictions.get() >= 1);
    // Evicted from the tier only: the bucket still serves it (and the read
    // copies it back, evicting the least recently read other copy).
    assert_eq!(read_all(hot.read(d0, None).await.unwrap()).await, *b0);
    wait_for(d0.clone()).await;
    wait_evictions(2).await;

    // A copy whose bytes do not match the digest is never kept.
    let good = common::cache::random_bytes(500_000, 7);
    let d = Digest::sha256_of(&good);
    sw.object_store()
        .put(
            &object_store::path::Path::from(format!("hot/blobs/sha256/{}", d.hex())),
            PutPayload::from(vec![0u8; 500_000]),
        )
        .await
        .unwrap();
    let _ = read_all(hot.read(&d, None).await.unwrap()).await;
    for _ in 0..100 {
        if tier.metrics.rejected.get() > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(tier.metrics.rejected.get(), 1);
    assert!(!tier.contains(&d));

    // Deleting drops both copies; a restart re-indexes what is on disk.
    let (d2, _) = &blobs[2];
    assert!(hot.delete(d2).await.unwrap());
    assert!(!tier.contains(d2));
    assert_eq!(hot.stat(d2).await.unwrap(), None);
    // Every background copy and eviction was awaited above: the disk is
    // what the tier says.
    let reopened = HotTier::open(s3.clone(), hot_dir, 2_500_000).unwrap();
    assert!(!reopened.contains(d2));
    assert_eq!(reopened.size(), tier.size());
    for (d, _) in &blobs {
        assert_eq!(reopened.contains(d), tier.contains(d), "{d}");
    }
    assert!(reopened.size() > 0);
}

/// `wharf fsck` over the bucket: re-hashes every blob, quarantines the
/// corrupt one (out of `blobs/`, kept under `quarantine/`) and exits non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsck_quarantines_corrupt_blobs_in_the_bucket() {
    use object_store::{ObjectStoreExt, PutPayload};
    let sw = SeaweedFs::start().await;
    let w = replica(&sw, "fsck");
    let c = HttpClient::new(w.url());
    let good = c.push_blob("fsck/app", b"good bytes").await;
    let bad = c.push_blob("fsck/app", b"bytes that will rot").await;
    let store = sw.object_store();
    let bad_key = object_store::path::Path::from(format!("fsck/blobs/sha256/{}", &bad[7..]));
    store
        .put(&bad_key, PutPayload::from("rotten"))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("wharf.toml");
    std::fs::write(&config, replica_config(&sw, "fsck", dir.path())).unwrap();
    let out = std::process::Command::new(common::wharf_bin())
        .args(["fsck", "--config"])
        .arg(&config)
        .env("S3_TEST_SECRET", common::seaweedfs::SECRET_KEY)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains(&format!("CORRUPT {bad}")), "{stdout}");
    assert!(stdout.contains("checked 2 blobs: 1 corrupt"), "{stdout}");
    assert!(matches!(
        store.head(&bad_key).await,
        Err(object_store::Error::NotFound { .. })
    ));
    let kept = object_store::path::Path::from(format!("fsck/quarantine/sha256-{}", &bad[7..]));
    assert_eq!(
        &store.get(&kept).await.unwrap().bytes().await.unwrap()[..],
        b"rotten"
    );
    let r = c.get(&format!("/v2/fsck/app/blobs/{good}")).await;
    assert_eq!(&r.body[..], b"good bytes");
    assert_eq!(
        c.head(&format!("/v2/fsck/app/blobs/{bad}")).await.status,
        StatusCode::NOT_FOUND
    );
}

/// The replica holding a fill's lease dies mid-fill: the replica following
/// it takes the lease over once it expires and fetches only the rest from
/// upstream (a Range request from where the published parts end).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fill_lease_taken_over_when_its_holder_dies() {
    use common::fake_upstream::{FakeUpstream, Fault};
    let sw = SeaweedFs::start().await;
    let fake = FakeUpstream::start();
    let layer = common::cache::random_bytes(20 * 1024 * 1024, 33);
    let (_, ld, _) = common::cache::seed_image(&fake, "team/app", "v1", &layer);
    fake.fault(&ld, Fault::bytes_per_second(4 * 1024 * 1024));
    let spawn = || sw.spawn_pull_through("takeover", &common::cache::rule("up", &fake, ""));
    let (mut a, b) = (spawn(), spawn());
    let path = format!("/v2/up/team/app/blobs/{ld}");
    let ca = HttpClient::new(a.url());
    let p = path.clone();
    // Its response dies with A (the task's panic is expected).
    let first = tokio::spawn(async move { ca.get(&p).await });
    // A fetches from upstream only once it holds the fill's lease.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while fake.count("GET", &format!("/v2/team/app/blobs/{ld}")) == 0 {
        assert!(std::time::Instant::now() < deadline, "A never fetched");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let cb = HttpClient::new(b.url());
    let p = path.clone();
    let second = tokio::spawn(async move { cb.get(&p).await });
    // Once A has published its first part (after ~2 s), it dies.
    let store = sw.object_store();
    let fills = object_store::path::Path::from("takeover/fills");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        use futures::TryStreamExt;
        let names: Vec<object_store::ObjectMeta> =
            store.list(Some(&fills)).try_collect().await.unwrap();
        if names.iter().any(|o| {
            o.location
                .filename()
                .is_some_and(|n| n.bytes().all(|c| c.is_ascii_digit()))
        }) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "A published no part");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    a.kill9();
    let _ = first.await;
    let r = second.await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), layer.len());
    assert_eq!(sha256(&r.body), ld, "B finished the blob A started");
    let ranges = fake.ranges(&format!("/v2/team/app/blobs/{ld}"));
    assert_eq!(ranges.len(), 2, "{ranges:?}");
    let resumed = ranges[1].clone().expect("B resumed with a Range request");
    let from: usize = resumed
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{resumed}"));
    assert!(
        (8 * 1024 * 1024..layer.len()).contains(&from),
        "B fetched only what A had not published: {resumed}"
    );
}

/// Replication over S3: the queue lives in the bucket, shared by the
/// replicas. The replica that acknowledged a push runs its job alone; when
/// it is killed in the middle of the copy, another replica takes the job
/// over once the lease ends, resumes the upload where it stood at the
/// destination, and completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_job_taken_over_when_its_replica_is_lost() {
    use common::replication::{
        all, blob_digest, destination, manifest, metric, push_image, rule, spawn_region, status,
        wait_for,
    };
    let sw = SeaweedFs::start().await;
    let d = spawn_region("");
    let replication = format!(
        "\n[replication]\nreconcile_interval = \"0s\"\njob_lease = \"3s\"\n{}{}",
        destination("d", &d.url(), "chunk_size = \"64KiB\""),
        rule(&["prod/"], &["d"]),
    );
    let mut a = sw.spawn_wharf("rep", &replication, &[], &[]);
    let b = sw.spawn_wharf("rep", &replication, &[], &[]);
    let (ca, cb, cd) = (
        HttpClient::new(a.url()),
        HttpClient::new(b.url()),
        HttpClient::new(d.url()),
    );
    let size = 32 << 20;
    let big = common::cache::random_bytes(size, 43);
    let img = push_image(&ca, "prod/big", Some("1"), &[big], "amd64").await;

    // A copies; B sees the same queue and leaves the job to A.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let sent = loop {
        let n = metric(&ca, "wharf_replication_bytes_sent_total", "d").await;
        if n >= 1 << 20 {
            break n;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replication never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let seen = status(&cb, "").await;
    let jobs = seen["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1, "B does not see A's job: {seen}");
    assert_eq!(jobs[0]["status"], "IN_PROGRESS");
    assert!(jobs[0]["running"].as_bool().unwrap());
    assert!(jobs[0]["holder"].is_string(), "no holder shown: {seen}");
    a.kill9();
    assert!(
        sent < size as u64,
        "the copy ended before the kill ({sent} bytes)"
    );
    assert_eq!(
        metric(&cb, "wharf_replication_bytes_sent_total", "d").await,
        0,
        "B copied while A held the job"
    );
    assert!(manifest(&cd, "prod/big", "1").await.is_none());

    // B takes it over after the lease ends and completes it.
    let jobs = wait_for(&cb, Duration::from_secs(90), "the job taken over", |j| {
        all(j, 1, "COMPLETE")
    })
    .await;
    assert_eq!(jobs[0]["digest"], img.digest.as_str());
    let (digest, body) = manifest(&cd, "prod/big", "1").await.unwrap();
    assert_eq!((digest, body), (img.digest.clone(), img.manifest.clone()));
    for blob in &img.blobs {
        assert_eq!(
            blob_digest(&cd, "prod/big", blob).await.as_deref(),
            Some(blob.as_str())
        );
    }
    // B resumed A's upload from the checkpoint in the bucket (which may
    // trail the kill by a chunk) instead of sending the layer again.
    let after = metric(&cb, "wharf_replication_bytes_sent_total", "d").await;
    assert!(after > 0, "B sent nothing");
    assert!(
        after + sent <= size as u64 + (64 << 10) + 4096,
        "B resent the layer from the start: {sent} bytes by A, {after} by B"
    );
}

/// An evictor whose claim write is slow (it lands after the claim would
/// have expired, as a loaded bucket's retries can make it) must not delete:
/// a push on another replica took the expired claim over, pinned the blob
/// and was acknowledged meanwhile. The evictor's deadline counts from
/// before the claim was written, so it has no time left and deletes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eviction_claim_written_late_deletes_nothing() {
    use wharf::cache::budget::Budget;
    use wharf::oci::Digest;
    use wharf::storage::faulty::{FaultPlan, Faulty, Stall};
    use wharf::storage::{BlobStore, MetaStore};
    let bucket: Arc<dyn object_store::ObjectStore> =
        Arc::new(object_store::memory::InMemory::new());
    let scratch = tempfile::tempdir().unwrap();
    let blobs: Arc<dyn BlobStore> =
        Arc::new(S3Store::new(bucket.clone(), "late", scratch.path().to_path_buf()).unwrap());
    let plan = FaultPlan::new();
    let evictor_meta: Arc<dyn MetaStore> = Arc::new(Faulty::new(
        Arc::new(
            S3Meta::new(bucket.clone(), "late").with_eviction_claim(Duration::from_millis(300)),
        ),
        plan.clone(),
    ));
    let pusher = S3Meta::new(bucket, "late");
    let layer = b"a blob a push needs".to_vec();
    let d = Digest::sha256_of(&layer);
    blobs.put(&d, Bytes::from(layer.clone())).await.unwrap();
    let budget = Arc::new(Budget::open(0, blobs.clone(), evictor_meta).await.unwrap());
    budget.add(&d, layer.len() as u64).await.unwrap();
    // The claim reaches the bucket, but its answer is held.
    let gate = plan.stall("meta.claim_eviction", Stall::After);
    let evict = {
        let budget = budget.clone();
        tokio::spawn(async move { budget.evict(&|_: &Digest| false).await })
    };
    gate.reached().await;
    // Meanwhile the claim expires and a push takes it over and pins.
    tokio::time::timeout(Duration::from_secs(10), pusher.pin_blob(&d))
        .await
        .expect("the pin takes the expired claim over")
        .unwrap();
    assert!(
        blobs.stat(&d).await.unwrap().is_some(),
        "stored when the push is acknowledged"
    );
    gate.open();
    let _ = evict.await.unwrap();
    assert_eq!(
        blobs.stat(&d).await.unwrap(),
        Some(layer.len() as u64),
        "the late evictor deleted nothing"
    );
}

/// A holder whose lease has expired deletes nothing when it releases: by
/// the time its deletes land the lease may be another replica's (which
/// then reads the parts already there instead of fetching them again); a
/// holder whose lease stands removes the lease and its parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_standing_lease_is_released() {
    use wharf::storage::s3lease::S3Leases;
    use wharf::storage::{FillLeases, LeaseState};
    let bucket: Arc<dyn object_store::ObjectStore> =
        Arc::new(object_store::memory::InMemory::new());
    let leases = S3Leases::new(bucket, "release");
    let d = wharf::oci::Digest::sha256_of(b"released");
    let part = Bytes::from_static(b"the first part");
    let ttl = Duration::from_millis(300);
    assert!(matches!(
        leases.acquire(&d, "a", ttl).await.unwrap(),
        LeaseState::Ours
    ));
    assert!(leases.put_part(&d, 0, part.clone()).await.unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while leases
        .state(&d)
        .await
        .unwrap()
        .is_some_and(|(unexpired, _)| unexpired)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    leases.release(&d, "a").await.unwrap();
    assert!(
        leases.state(&d).await.unwrap().is_some(),
        "the expired lease stays"
    );
    assert_eq!(
        leases.part(&d, 0).await.unwrap().map(|(b, _)| b),
        Some(part.clone())
    );
    // Taken over: the new holder's release removes everything.
    assert!(matches!(
        leases
            .acquire(&d, "b", Duration::from_secs(30))
            .await
            .unwrap(),
        LeaseState::Ours
    ));
    leases.release(&d, "b").await.unwrap();
    assert!(leases.state(&d).await.unwrap().is_none());
    assert!(leases.part(&d, 0).await.unwrap().is_none());
}

/// A blob another replica's evictor has claimed stays in this replica's
/// budget (that eviction may yet fail or run out of time and keep the
/// blob): the budget goes on counting it instead of letting the bucket
/// grow past `cache.max_size` unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_another_evictor_claimed_stays_budgeted() {
    use wharf::cache::budget::Budget;
    use wharf::oci::Digest;
    use wharf::storage::{BlobStore, EvictionClaim, MetaStore};
    let bucket: Arc<dyn object_store::ObjectStore> =
        Arc::new(object_store::memory::InMemory::new());
    let scratch = tempfile::tempdir().unwrap();
    let blobs: Arc<dyn BlobStore> =
        Arc::new(S3Store::new(bucket.clone(), "busy", scratch.path().to_path_buf()).unwrap());
    let mine: Arc<dyn MetaStore> = Arc::new(S3Meta::new(bucket.clone(), "busy"));
    let other = S3Meta::new(bucket, "busy");
    let layer = b"claimed by the other replica".to_vec();
    let d = Digest::sha256_of(&layer);
    blobs.put(&d, Bytes::from(layer.clone())).await.unwrap();
    let budget = Budget::open(0, blobs.clone(), mine).await.unwrap();
    budget.add(&d, layer.len() as u64).await.unwrap();
    assert!(matches!(
        other.claim_eviction(&d).await.unwrap(),
        EvictionClaim::Claimed { .. }
    ));
    assert_eq!(budget.evict(&|_: &Digest| false).await.unwrap(), 0);
    assert_eq!(budget.stats().blobs, 1, "still budgeted here");
    assert_eq!(budget.stats().size_bytes, layer.len() as u64);
    assert!(
        blobs.stat(&d).await.unwrap().is_some(),
        "not deleted by this replica"
    );
}
