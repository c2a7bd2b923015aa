//! The storage conformance suite. Every backend runs it from its own tests:
//! `blob_store_suite` for blob and upload stores, `meta_store_suite` for
//! metadata stores. The assertions are the traits' contracts.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;

use super::jobs::{Job, JobFilter, JobKey, JobState, JobStore, Outcome, UploadCheckpoint};
use super::{
    BlobStore, ByteStream, CacheEntry, EvictionClaim, FillStore, ManifestRecord, MetaStore,
    RepoKind, StorageError, UploadRecord, UploadStore,
};
use crate::oci::manifest::Descriptor;
use crate::oci::{Algorithm, Digest, Reference, RepoName, Tag, UploadId};

fn stream_of(chunks: Vec<&[u8]>) -> ByteStream {
    let owned: Vec<io::Result<Bytes>> = chunks
        .into_iter()
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    futures::stream::iter(owned).boxed()
}

async fn collect(s: ByteStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut s = s;
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.expect("read chunk"));
    }
    out
}

/// Runs the blob and upload contract against one backend.
pub async fn blob_store_suite(blobs: Arc<dyn BlobStore>, uploads: Arc<dyn UploadStore>) {
    // Absent blobs.
    let absent = Digest::sha256_of(b"absent");
    assert_eq!(blobs.stat(&absent).await.unwrap(), None);
    assert!(matches!(
        blobs.read(&absent, None).await,
        Err(StorageError::NotFound)
    ));
    assert!(!blobs.delete(&absent).await.unwrap());

    // put verifies.
    let data = b"manifest bytes".to_vec();
    let d = Digest::sha256_of(&data);
    let wrong = Digest::sha256_of(b"other");
    assert!(matches!(
        blobs.put(&wrong, Bytes::from(data.clone())).await,
        Err(StorageError::DigestMismatch { .. })
    ));
    assert_eq!(
        blobs.stat(&wrong).await.unwrap(),
        None,
        "a mismatched put stores nothing"
    );
    blobs.put(&d, Bytes::from(data.clone())).await.unwrap();
    blobs.put(&d, Bytes::from(data.clone())).await.unwrap(); // idempotent
    assert_eq!(blobs.stat(&d).await.unwrap(), Some(data.len() as u64));
    assert_eq!(collect(blobs.read(&d, None).await.unwrap()).await, data);
    assert_eq!(
        collect(blobs.read(&d, Some(2..6)).await.unwrap()).await,
        &data[2..6]
    );

    // Uploads: offsets, sizes, all-or-nothing chunks.
    let id = UploadId::new_random();
    assert!(matches!(
        uploads.size(&id).await,
        Err(StorageError::NotFound)
    ));
    uploads.create(&id).await.unwrap();
    assert_eq!(uploads.size(&id).await.unwrap(), 0);
    assert!(matches!(
        uploads.append(&id, 3, None, stream_of(vec![b"abc"])).await,
        Err(StorageError::OffsetMismatch {
            current: 0,
            requested: 3
        })
    ));
    assert!(matches!(
        uploads
            .append(&id, 0, Some(10), stream_of(vec![b"abc"]))
            .await,
        Err(StorageError::SizeMismatch { .. })
    ));
    assert_eq!(
        uploads.size(&id).await.unwrap(),
        0,
        "a short chunk is rolled back"
    );
    let failing: ByteStream = futures::stream::iter(vec![
        Ok(Bytes::from_static(b"partial")),
        Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "client went away",
        )),
    ])
    .boxed();
    assert!(matches!(
        uploads.append(&id, 0, None, failing).await,
        Err(StorageError::Body(_))
    ));
    assert_eq!(
        uploads.size(&id).await.unwrap(),
        0,
        "a broken chunk is rolled back"
    );

    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let n1 = uploads
        .append(
            &id,
            0,
            Some(1_000_000),
            stream_of(vec![&big[..500_000], &big[500_000..1_000_000]]),
        )
        .await
        .unwrap();
    assert_eq!(n1, 1_000_000);
    let n2 = uploads
        .append(&id, n1, None, stream_of(vec![&big[1_000_000..]]))
        .await
        .unwrap();
    assert_eq!(n2, big.len() as u64);
    assert!(uploads.list().await.unwrap().iter().any(|(i, _)| i == &id));
    let big_digest = Digest::sha256_of(&big);
    assert_eq!(
        blobs.stat(&big_digest).await.unwrap(),
        None,
        "no blob before commit"
    );

    // A request dropped mid-body (its connection gone, hyper drops the
    // handler) leaves the session as it was: neither the bytes nor the
    // running hash keep any of it, and the upload still commits.
    {
        let id = UploadId::new_random();
        uploads.create(&id).await.unwrap();
        let n = uploads
            .append(&id, 0, None, stream_of(vec![&big[..1_000_000]]))
            .await
            .unwrap();
        let stalled: ByteStream =
            futures::stream::iter(vec![Ok(Bytes::from_static(b"never sent"))])
                .chain(futures::stream::pending())
                .boxed();
        assert!(
            tokio::time::timeout(
                std::time::Duration::from_millis(200),
                uploads.append(&id, n, None, stalled)
            )
            .await
            .is_err(),
            "a stalled body never completes"
        );
        assert_eq!(
            uploads.size(&id).await.unwrap(),
            n,
            "a dropped chunk leaves nothing"
        );
        uploads
            .append(&id, n, None, stream_of(vec![&big[1_000_000..]]))
            .await
            .unwrap();
        assert_eq!(
            uploads.commit(&id, &big_digest).await.unwrap(),
            big.len() as u64,
            "the upload commits after a dropped chunk"
        );
        assert!(blobs.delete(&big_digest).await.unwrap());
    }

    // A commit with the wrong digest publishes nothing and ends the session.
    assert!(matches!(
        uploads.commit(&id, &wrong).await,
        Err(StorageError::DigestMismatch { .. })
    ));
    assert_eq!(blobs.stat(&wrong).await.unwrap(), None);
    assert_eq!(blobs.stat(&big_digest).await.unwrap(), None);
    assert!(matches!(
        uploads.size(&id).await,
        Err(StorageError::NotFound)
    ));

    // A good commit publishes; sha512 works too.
    for algo in [Algorithm::Sha256, Algorithm::Sha512] {
        let id = UploadId::new_random();
        uploads.create(&id).await.unwrap();
        uploads
            .append(&id, 0, None, stream_of(vec![&big]))
            .await
            .unwrap();
        let d = Digest::of(algo, &big);
        assert_eq!(uploads.commit(&id, &d).await.unwrap(), big.len() as u64);
        assert_eq!(blobs.stat(&d).await.unwrap(), Some(big.len() as u64));
        assert_eq!(collect(blobs.read(&d, None).await.unwrap()).await, big);
        assert!(blobs.list().await.unwrap().contains(&d));
    }

    // Two sessions committing the same content.
    let (a, b) = (UploadId::new_random(), UploadId::new_random());
    let same = b"same content in two uploads";
    let sd = Digest::sha256_of(same);
    for id in [&a, &b] {
        uploads.create(id).await.unwrap();
        uploads
            .append(id, 0, None, stream_of(vec![same]))
            .await
            .unwrap();
    }
    let (ra, rb) = tokio::join!(uploads.commit(&a, &sd), uploads.commit(&b, &sd));
    assert_eq!(
        (ra.unwrap(), rb.unwrap()),
        (same.len() as u64, same.len() as u64)
    );
    assert_eq!(collect(blobs.read(&sd, None).await.unwrap()).await, same);

    // Abort, delete, quarantine.
    let c = UploadId::new_random();
    uploads.create(&c).await.unwrap();
    uploads.abort(&c).await.unwrap();
    uploads.abort(&c).await.unwrap();
    assert!(matches!(
        uploads.size(&c).await,
        Err(StorageError::NotFound)
    ));
    assert!(blobs.delete(&sd).await.unwrap());
    assert_eq!(blobs.stat(&sd).await.unwrap(), None);
    blobs.quarantine(&d).await.unwrap();
    assert_eq!(blobs.stat(&d).await.unwrap(), None);
    assert!(!blobs.list().await.unwrap().contains(&d));
}

/// Runs the metadata contract against one backend.
pub async fn meta_store_suite(meta: Arc<dyn MetaStore>) {
    let repo: RepoName = "suite/repo".parse().unwrap();
    let other: RepoName = "suite/repo2".parse().unwrap();
    let d1 = Digest::sha256_of(b"one");
    let d2 = Digest::sha256_of(b"two");

    assert_eq!(
        meta.tags(&repo, None, 100).await.unwrap(),
        None,
        "unknown repository"
    );
    assert_eq!(meta.repository(&repo).await.unwrap(), None);
    let cached: RepoName = "suite/cached".parse().unwrap();
    meta.link_blob(&cached, RepoKind::Cached, &d1)
        .await
        .unwrap();
    assert_eq!(
        meta.repository(&cached).await.unwrap(),
        Some(RepoKind::Cached),
        "the first write gives the kind"
    );
    assert!(!meta.blob_linked(&repo, &d1).await.unwrap());
    meta.link_blob(&repo, RepoKind::Hosted, &d1).await.unwrap();
    assert!(meta.blob_linked(&repo, &d1).await.unwrap());
    assert_eq!(
        meta.repository(&repo).await.unwrap(),
        Some(RepoKind::Hosted)
    );
    assert_eq!(
        meta.repository(&repo).await.unwrap(),
        Some(RepoKind::Hosted),
        "kind never changes"
    );
    assert!(
        !meta.blob_linked(&other, &d1).await.unwrap(),
        "links are per repository"
    );
    assert_eq!(meta.tags(&repo, None, 100).await.unwrap(), Some(vec![]));
    assert!(
        meta.unlink_blob(&repo, RepoKind::Hosted, &d1)
            .await
            .unwrap()
    );
    assert!(
        !meta
            .unlink_blob(&repo, RepoKind::Hosted, &d1)
            .await
            .unwrap()
    );

    // Manifests, tags and pagination.
    let rec = |subject: Option<Digest>| ManifestRecord {
        media_type: crate::oci::manifest::OCI_MANIFEST.to_string(),
        size: 10,
        subject,
        index_depth: None,
    };
    let tags: Vec<String> = ["b", "a", "c", "a1", "Z"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for t in &tags {
        let tag: Tag = t.parse().unwrap();
        meta.put_manifest(&repo, RepoKind::Hosted, &d1, &rec(None), Some(&tag), None)
            .await
            .unwrap();
    }
    let all = meta.tags(&repo, None, 100).await.unwrap().unwrap();
    assert_eq!(all, vec!["Z", "a", "a1", "b", "c"], "tags in lexical order");
    assert_eq!(
        meta.tags(&repo, None, 2).await.unwrap().unwrap(),
        vec!["Z", "a"]
    );
    assert_eq!(
        meta.tags(&repo, Some("a"), 2).await.unwrap().unwrap(),
        vec!["a1", "b"]
    );
    assert_eq!(
        meta.tags(&repo, Some("c"), 2).await.unwrap().unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        meta.tags(&repo, None, 0).await.unwrap().unwrap(),
        Vec::<String>::new()
    );
    let a: Tag = "a".parse().unwrap();
    assert_eq!(meta.tag_checked(&repo, &a).await.unwrap(), None);
    meta.set_tag_checked(&repo, &a, 1234).await.unwrap();
    assert_eq!(meta.tag_checked(&repo, &a).await.unwrap(), Some(1234));
    assert_eq!(meta.tag_checked(&other, &a).await.unwrap(), None);
    assert_eq!(meta.resolve_tag(&repo, &a).await.unwrap(), Some(d1.clone()));
    assert_eq!(meta.resolve_tag(&other, &a).await.unwrap(), None);
    assert_eq!(meta.manifest(&repo, &d1).await.unwrap(), Some(rec(None)));
    let by_tag = Reference::Tag(a.clone());
    assert_eq!(
        meta.find_manifest(&repo, &by_tag).await.unwrap(),
        Some((d1.clone(), rec(None))),
        "a tag resolves to its manifest and record"
    );
    assert_eq!(
        meta.find_manifest(&repo, &Reference::Digest(d1.clone()))
            .await
            .unwrap(),
        Some((d1.clone(), rec(None)))
    );
    assert_eq!(meta.find_manifest(&other, &by_tag).await.unwrap(), None);
    assert_eq!(
        meta.find_manifest(&repo, &Reference::Tag("nope".parse().unwrap()))
            .await
            .unwrap(),
        None
    );

    // Content of one kind never goes into a repository of the other: the
    // write is refused and changes nothing.
    let wrong = |r: Result<bool, StorageError>| {
        assert!(
            matches!(r, Err(StorageError::WrongKind { .. })),
            "a write of the other kind is refused: {r:?}"
        )
    };
    wrong(
        meta.put_manifest(&repo, RepoKind::Cached, &d2, &rec(None), Some(&a), None)
            .await
            .map(|()| true),
    );
    wrong(meta.delete_tag(&repo, RepoKind::Cached, &a).await);
    wrong(meta.delete_manifest(&repo, RepoKind::Cached, &d1).await);
    wrong(
        meta.link_blob(&repo, RepoKind::Cached, &d2)
            .await
            .map(|()| true),
    );
    wrong(meta.unlink_blob(&cached, RepoKind::Hosted, &d1).await);
    wrong(
        meta.put_manifest(&cached, RepoKind::Hosted, &d2, &rec(None), Some(&a), None)
            .await
            .map(|()| true),
    );
    assert_eq!(
        meta.resolve_tag(&repo, &a).await.unwrap(),
        Some(d1.clone()),
        "a refused write leaves the tag"
    );
    assert_eq!(meta.manifest(&repo, &d2).await.unwrap(), None);
    assert!(!meta.blob_linked(&repo, &d2).await.unwrap());
    assert!(meta.blob_linked(&cached, &d1).await.unwrap());
    assert_eq!(meta.resolve_tag(&cached, &a).await.unwrap(), None);
    assert_eq!(
        meta.repository(&repo).await.unwrap(),
        Some(RepoKind::Hosted)
    );
    assert_eq!(
        meta.repository(&cached).await.unwrap(),
        Some(RepoKind::Cached)
    );

    // Retag moves the tag.
    meta.put_manifest(&repo, RepoKind::Hosted, &d2, &rec(None), Some(&a), None)
        .await
        .unwrap();
    assert_eq!(meta.resolve_tag(&repo, &a).await.unwrap(), Some(d2.clone()));
    assert!(meta.delete_tag(&repo, RepoKind::Hosted, &a).await.unwrap());
    assert!(!meta.delete_tag(&repo, RepoKind::Hosted, &a).await.unwrap());
    assert_eq!(
        meta.manifest(&repo, &d2).await.unwrap(),
        Some(rec(None)),
        "tag delete keeps the manifest"
    );

    // Deleting a manifest removes the tags pointing at it.
    assert!(
        meta.delete_manifest(&repo, RepoKind::Hosted, &d1)
            .await
            .unwrap()
    );
    assert!(
        !meta
            .delete_manifest(&repo, RepoKind::Hosted, &d1)
            .await
            .unwrap()
    );
    assert_eq!(
        meta.tags(&repo, None, 100).await.unwrap().unwrap(),
        Vec::<String>::new()
    );

    // Referrers.
    let sig = Digest::sha256_of(b"sig");
    let desc = Descriptor {
        media_type: crate::oci::manifest::OCI_MANIFEST.to_string(),
        digest: sig.clone(),
        size: 10,
        artifact_type: Some("application/x.sig".into()),
        annotations: Default::default(),
    };
    meta.put_manifest(
        &repo,
        RepoKind::Hosted,
        &sig,
        &rec(Some(d2.clone())),
        None,
        Some(&desc),
    )
    .await
    .unwrap();
    assert_eq!(
        meta.referrers(&repo, &d2).await.unwrap(),
        vec![desc.clone()]
    );
    assert!(meta.referrers(&other, &d2).await.unwrap().is_empty());
    assert!(meta.referrers(&repo, &d1).await.unwrap().is_empty());
    assert!(
        meta.delete_manifest(&repo, RepoKind::Hosted, &sig)
            .await
            .unwrap()
    );
    assert!(meta.referrers(&repo, &d2).await.unwrap().is_empty());

    // Catalog.
    meta.link_blob(&other, RepoKind::Hosted, &d1).await.unwrap();
    let extra: RepoName = "suite/a".parse().unwrap();
    meta.link_blob(&extra, RepoKind::Hosted, &d1).await.unwrap();
    let repos = meta.repositories(None, 100).await.unwrap();
    let ours: Vec<&String> = repos.iter().filter(|r| r.starts_with("suite/")).collect();
    assert_eq!(
        ours,
        vec!["suite/a", "suite/cached", "suite/repo", "suite/repo2"]
    );
    assert_eq!(
        meta.repositories(Some("suite/a"), 2).await.unwrap(),
        vec!["suite/cached", "suite/repo"]
    );

    // Upload sessions.
    let id = UploadId::new_random();
    assert_eq!(meta.upload(&id).await.unwrap(), None);
    let r = UploadRecord {
        repository: repo.to_string(),
        started: 42,
    };
    meta.put_upload(&id, &r).await.unwrap();
    assert_eq!(meta.upload(&id).await.unwrap(), Some(r.clone()));
    assert!(meta.uploads().await.unwrap().contains(&(id.clone(), r)));
    meta.delete_upload(&id).await.unwrap();
    assert_eq!(meta.upload(&id).await.unwrap(), None);

    // Pins: a link into a hosted repository pins the blob; a link into a
    // cached one does not.
    let d3 = Digest::sha256_of(b"cached only");
    meta.link_blob(&cached, RepoKind::Cached, &d3)
        .await
        .unwrap();
    assert!(
        !meta.blob_pinned(&d3).await.unwrap(),
        "cached links do not pin"
    );
    assert!(
        meta.blob_pinned(&d1).await.unwrap(),
        "a hosted link pins, and the pin outlives the link (unlinked above)"
    );

    // Eviction claims: refused for a pinned blob and while another
    // stands; a pin waits until the claim ends, and then refuses claims.
    let d4 = Digest::sha256_of(b"evicted");
    assert_eq!(
        meta.claim_eviction(&d1).await.unwrap(),
        EvictionClaim::Pinned
    );
    let EvictionClaim::Claimed { token, .. } = meta.claim_eviction(&d4).await.unwrap() else {
        panic!("an unpinned blob can be claimed");
    };
    assert_eq!(meta.claim_eviction(&d4).await.unwrap(), EvictionClaim::Busy);
    let mut pin = {
        let meta = meta.clone();
        let d4 = d4.clone();
        tokio::spawn(async move { meta.pin_blob(&d4).await })
    };
    if let Ok(r) = tokio::time::timeout(std::time::Duration::from_millis(300), &mut pin).await {
        panic!("a pin went through an eviction claim: {r:?}");
    }
    assert!(
        !meta.blob_pinned(&d4).await.unwrap(),
        "not pinned while claimed"
    );
    meta.end_eviction(&d4, "not the claim's token")
        .await
        .unwrap();
    assert_eq!(meta.claim_eviction(&d4).await.unwrap(), EvictionClaim::Busy);
    meta.end_eviction(&d4, &token).await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), pin)
        .await
        .expect("the pin goes through once the claim ends")
        .unwrap()
        .unwrap();
    assert!(meta.blob_pinned(&d4).await.unwrap());
    assert_eq!(
        meta.claim_eviction(&d4).await.unwrap(),
        EvictionClaim::Pinned
    );

    // Cache budget entries.
    let e = |size, accessed| CacheEntry { size, accessed };
    meta.put_cache_entries(&[(d2.clone(), e(10, 1)), (d3.clone(), e(20, 2))])
        .await
        .unwrap();
    meta.put_cache_entries(&[(d2.clone(), e(10, 5))])
        .await
        .unwrap();
    let mut entries = meta.cache_entries().await.unwrap();
    entries.sort_by_key(|(_, e)| e.accessed);
    assert_eq!(
        entries,
        vec![(d3.clone(), e(20, 2)), (d2.clone(), e(10, 5))]
    );
    meta.delete_cache_entry(&d3).await.unwrap();
    meta.delete_cache_entry(&d3).await.unwrap();
    assert_eq!(meta.cache_entries().await.unwrap(), vec![(d2, e(10, 5))]);
}

/// Runs the fill contract: staged bytes readable while written, nothing
/// visible before a verified commit, nothing published on a mismatch.
pub async fn fill_store_suite(fills: Arc<dyn FillStore>, blobs: Arc<dyn BlobStore>) {
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 241) as u8).collect();
    let d = Digest::sha256_of(&data);
    let mut w = fills.begin_fill().await.unwrap();
    let reader = w.staged();
    w.write(&data[..1000]).await.unwrap();
    assert_eq!(w.written(), 1000);
    assert_eq!(&reader.read_at(0, 1000).await.unwrap()[..], &data[..1000]);
    assert_eq!(
        &reader.read_at(500, 10_000).await.unwrap()[..],
        &data[500..1000],
        "short read past the written end"
    );
    assert_eq!(
        blobs.stat(&d).await.unwrap(),
        None,
        "nothing visible while filling"
    );
    w.write(&data[1000..]).await.unwrap();
    assert_eq!(w.commit(&d).await.unwrap(), data.len() as u64);
    assert_eq!(collect(blobs.read(&d, None).await.unwrap()).await, data);
    assert_eq!(
        &reader.read_at(1_999_000, 1000).await.unwrap()[..],
        &data[1_999_000..],
        "readers survive the commit"
    );

    // A mismatch publishes nothing.
    let other = Digest::sha256_of(b"expected something else");
    let mut w = fills.begin_fill().await.unwrap();
    w.write(b"corrupt bytes").await.unwrap();
    assert!(matches!(
        w.commit(&other).await,
        Err(StorageError::DigestMismatch { .. })
    ));
    assert_eq!(blobs.stat(&other).await.unwrap(), None);
    assert_eq!(
        blobs
            .stat(&Digest::sha256_of(b"corrupt bytes"))
            .await
            .unwrap(),
        None
    );

    let mut w = fills.begin_fill().await.unwrap();
    w.write(b"abandoned").await.unwrap();
    w.abort().await;
    assert_eq!(
        blobs.stat(&Digest::sha256_of(b"abandoned")).await.unwrap(),
        None
    );
}

fn job_key(dest: &str, repo: &str, reference: &str) -> JobKey {
    JobKey {
        destination: dest.into(),
        repository: repo.parse().unwrap(),
        reference: reference.parse().unwrap(),
    }
}

/// Runs the replication queue's contract against one backend (an empty
/// queue).
pub async fn job_store_suite(q: Arc<dyn JobStore>) {
    let a = job_key("eu", "prod/app", "1");
    q.enqueue(&[a.clone(), a.clone()], 10).await.unwrap();
    let active = q.active().await.unwrap();
    assert_eq!(active.len(), 1, "one job per key");
    assert_eq!(active[0].state, JobState::Pending);
    assert_eq!(active[0].key, a);

    // A run, and a push in the middle of it.
    let run = q.start(&a, None, 11).await.unwrap().unwrap();
    assert_eq!(run.state, JobState::Running);
    assert!(
        q.start(&a, None, 11).await.unwrap().is_none(),
        "one run at a time"
    );
    assert!(q.renew(&a, 11).await.unwrap(), "the runner holds its job");
    q.enqueue(std::slice::from_ref(&a), 12).await.unwrap();
    let j = q
        .finish(&a, run.seq, Outcome::Complete { digest: None }, 13)
        .await
        .unwrap();
    assert_eq!(j.state, JobState::Pending, "the newer request runs again");
    assert_eq!(j.enqueued_ms, 10, "lag counts from the oldest request");
    assert_eq!(q.active().await.unwrap().len(), 1);

    let run = q.start(&a, None, 14).await.unwrap().unwrap();
    let j = q
        .finish(
            &a,
            run.seq,
            Outcome::Retry {
                error: "down".into(),
                not_before_ms: 16,
            },
            15,
        )
        .await
        .unwrap();
    assert_eq!((j.state, j.attempts), (JobState::Pending, 1));
    assert_eq!(j.not_before_ms, Some(16));
    assert!(
        q.start(&a, None, 15).await.unwrap().is_none(),
        "started during its backoff"
    );
    let run = q.start(&a, None, 16).await.unwrap().unwrap();
    let at = UploadCheckpoint {
        digest: Digest::sha256_of(b"layer"),
        location: "/v2/prod/app/blobs/uploads/x?_state=1".into(),
    };
    q.checkpoint(&a, Some(at.clone())).await.unwrap();
    assert_eq!(q.get(&a).await.unwrap().unwrap().upload, Some(at));
    let j = q
        .finish(
            &a,
            run.seq,
            Outcome::Failed {
                error: "denied".into(),
            },
            18,
        )
        .await
        .unwrap();
    assert_eq!((j.state, j.attempts), (JobState::Failed, 2));
    assert_eq!(j.error.as_deref(), Some("denied"));
    assert_eq!(j.upload, None, "an ended job keeps no checkpoint");
    assert!(q.active().await.unwrap().is_empty());
    let other = JobFilter {
        destination: Some("us".into()),
        ..Default::default()
    };
    assert_eq!(q.retry_failed(&other, 19).await.unwrap(), 0);
    assert_eq!(q.retry_failed(&JobFilter::default(), 19).await.unwrap(), 1);
    let run = q.start(&a, None, 20).await.unwrap().unwrap();
    assert_eq!(run.attempts, 0, "a retried job starts afresh");
    let d = Digest::sha256_of(b"m");
    let j = q
        .finish(
            &a,
            run.seq,
            Outcome::Complete {
                digest: Some(d.clone()),
            },
            21,
        )
        .await
        .unwrap();
    assert_eq!((j.state, j.digest), (JobState::Complete, Some(d.clone())));
    assert!(q.active().await.unwrap().is_empty());

    // Several keys: a digest reference, another destination and repository;
    // listings in key order.
    let b = job_key("eu", "prod/app", d.as_str());
    let c = job_key("us", "prod/other", "latest");
    q.enqueue(&[c.clone(), b.clone()], 30).await.unwrap();
    let active: Vec<JobKey> = q
        .active()
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.key)
        .collect();
    assert_eq!(active, vec![a.clone(), b.clone(), c.clone()][1..].to_vec());
    let all: Vec<JobKey> = q
        .list(None)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.key)
        .collect();
    let mut want = vec![a.clone(), b.clone(), c.clone()];
    want.sort_by_key(|k| {
        (
            k.destination.clone(),
            k.repository.to_string(),
            k.reference.to_string(),
        )
    });
    assert_eq!(all, want);
    let of_app = q.list(Some(&"prod/app".parse().unwrap())).await.unwrap();
    assert_eq!(of_app.len(), 2);
    assert!(
        q.list(Some(&"prod".parse().unwrap()))
            .await
            .unwrap()
            .is_empty(),
        "a repository's jobs are not its parent's"
    );
    assert_eq!(q.get(&b).await.unwrap().unwrap().key, b);
    assert_eq!(q.get(&job_key("eu", "nope", "1")).await.unwrap(), None);

    // Given up without a run (its destination is gone): only a pending job.
    q.fail_pending(&c, "no destination".into(), 40)
        .await
        .unwrap();
    let j = q.get(&c).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.error.as_deref()),
        (JobState::Failed, Some("no destination"))
    );
    let run = q.start(&b, None, 41).await.unwrap().unwrap();
    q.fail_pending(&b, "no destination".into(), 42)
        .await
        .unwrap();
    assert_eq!(q.get(&b).await.unwrap().unwrap().state, JobState::Running);
    q.finish(&b, run.seq, Outcome::Complete { digest: None }, 43)
        .await
        .unwrap();
    assert!(q.active().await.unwrap().is_empty());
}

/// Runs the contract of a queue shared by replicas: `replica(ttl)` opens
/// one more replica's handle on one queue (empty at first), whose leases
/// last `ttl`.
pub async fn shared_job_store_suite(replica: impl Fn(std::time::Duration) -> Arc<dyn JobStore>) {
    // Leases long enough to outlast the race below (a store may take
    // seconds to settle concurrent conditional writes to one object).
    let long = std::time::Duration::from_secs(120);
    let (x, y) = (replica(long), replica(long));
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    assert_eq!(x.lease_ttl(), Some(long));
    let k = job_key("eu", "prod/shared", "1");
    x.enqueue(std::slice::from_ref(&k), now()).await.unwrap();
    assert_eq!(y.active().await.unwrap().len(), 1, "one queue for both");

    // Both replicas race to start it, many times over: one run.
    let tries = (0..16).map(|i| {
        let q = if i % 2 == 0 { x.clone() } else { y.clone() };
        let k = k.clone();
        async move { (i % 2, q.start(&k, None, now()).await.unwrap()) }
    });
    let won: Vec<(usize, Job)> = futures::future::join_all(tries)
        .await
        .into_iter()
        .filter_map(|(who, j)| j.map(|j| (who, j)))
        .collect();
    assert_eq!(won.len(), 1, "exactly one replica runs the job");
    let (holder, other) = if won[0].0 == 0 {
        (x.clone(), y.clone())
    } else {
        (y.clone(), x.clone())
    };
    let run = won[0].1.clone();
    assert_eq!(run.state, JobState::Running);
    assert!(run.holder.is_some());

    // The other replica can neither take, renew, checkpoint nor end it.
    assert!(other.start(&k, None, now()).await.unwrap().is_none());
    assert!(!other.renew(&k, now()).await.unwrap());
    let at = UploadCheckpoint {
        digest: Digest::sha256_of(b"l"),
        location: "/v2/x/blobs/uploads/1".into(),
    };
    other.checkpoint(&k, Some(at.clone())).await.unwrap();
    let j = other
        .finish(&k, run.seq, Outcome::Complete { digest: None }, now())
        .await
        .unwrap();
    assert_eq!(j.state, JobState::Running, "a non-holder ended the job");
    assert_eq!(j.upload, None, "a non-holder wrote a checkpoint");
    assert!(holder.renew(&k, now()).await.unwrap());
    let j = holder
        .finish(&k, run.seq, Outcome::Complete { digest: None }, now())
        .await
        .unwrap();
    assert_eq!(j.state, JobState::Complete);

    // Short leases, on two other replicas.
    let ttl = std::time::Duration::from_secs(2);
    let (holder, other) = (replica(ttl), replica(ttl));
    let k = job_key("eu", "prod/shared", "2");
    other
        .enqueue(std::slice::from_ref(&k), now())
        .await
        .unwrap();
    let run = holder.start(&k, None, now()).await.unwrap().unwrap();

    // Renewed, the lease outlives its first term.
    holder.checkpoint(&k, Some(at.clone())).await.unwrap();
    tokio::time::sleep(ttl / 2).await;
    assert!(holder.renew(&k, now()).await.unwrap());
    tokio::time::sleep(ttl * 3 / 4).await;
    assert!(
        other.start(&k, None, now()).await.unwrap().is_none(),
        "a renewed lease was taken over"
    );

    // The holder is lost (stops renewing): once its lease ends, the other
    // replica takes the job over, with its checkpoint.
    tokio::time::sleep(ttl + std::time::Duration::from_millis(200)).await;
    let taken = other
        .start(&k, None, now())
        .await
        .unwrap()
        .expect("take over");
    assert_eq!(
        taken.upload,
        Some(at),
        "the checkpoint survives the takeover"
    );
    assert_eq!(taken.seq, run.seq);
    assert_ne!(taken.holder, run.holder);
    assert!(
        !holder.renew(&k, now()).await.unwrap(),
        "the old holder must stop"
    );
    // The old holder's run ends late, with its own outcome.
    let late = || {
        holder.finish(
            &k,
            run.seq,
            Outcome::Failed {
                error: "late".into(),
            },
            now(),
        )
    };
    let j = late().await.unwrap();
    assert_eq!(
        j.state,
        JobState::Running,
        "the old holder's outcome counted"
    );
    let j = other
        .finish(&k, taken.seq, Outcome::Complete { digest: None }, now())
        .await
        .unwrap();
    assert_eq!(j.state, JobState::Complete);
    let j = late().await.unwrap();
    assert_eq!(
        j.state,
        JobState::Complete,
        "a late outcome undid the new run's"
    );
    assert!(x.active().await.unwrap().is_empty());
    assert!(y.active().await.unwrap().is_empty());

    // A backoff recorded by one replica holds for the other.
    let k = job_key("eu", "prod/backoff", "1");
    x.enqueue(std::slice::from_ref(&k), now()).await.unwrap();
    let run = x.start(&k, None, now()).await.unwrap().unwrap();
    let until = now() + 60_000;
    x.finish(
        &k,
        run.seq,
        Outcome::Retry {
            error: "503".into(),
            not_before_ms: until,
        },
        now(),
    )
    .await
    .unwrap();
    assert!(y.start(&k, None, now()).await.unwrap().is_none());
    let run = y.start(&k, None, until).await.unwrap().unwrap();
    y.finish(&k, run.seq, Outcome::Complete { digest: None }, until)
        .await
        .unwrap();

    // Enqueues racing with the scheduler's reading of the markers, and with
    // the end of a run, are never lost.
    for round in 0..5 {
        let k = job_key("eu", "prod/new", &format!("n{round}"));
        let (enq, act) = tokio::join!(x.enqueue(std::slice::from_ref(&k), now()), y.active());
        enq.unwrap();
        act.unwrap();
        let active = y.active().await.unwrap();
        assert!(
            active.iter().any(|j| j.key == k),
            "round {round}: a new job lost its marker: {active:?}"
        );
        let run = y.start(&k, None, now()).await.unwrap().unwrap();
        y.finish(&k, run.seq, Outcome::Complete { digest: None }, now())
            .await
            .unwrap();
    }
    for round in 0..5 {
        let k = job_key("eu", "prod/race", &format!("r{round}"));
        x.enqueue(std::slice::from_ref(&k), now()).await.unwrap();
        let run = x.start(&k, None, now()).await.unwrap().unwrap();
        let (fin, enq) = tokio::join!(
            x.finish(&k, run.seq, Outcome::Complete { digest: None }, now()),
            y.enqueue(std::slice::from_ref(&k), now())
        );
        fin.unwrap();
        enq.unwrap();
        let active = y.active().await.unwrap();
        assert!(
            active
                .iter()
                .any(|j| j.key == k && j.state == JobState::Pending),
            "round {round}: the enqueue during the finish was lost: {active:?}"
        );
        let run = y.start(&k, None, now()).await.unwrap().unwrap();
        y.finish(&k, run.seq, Outcome::Complete { digest: None }, now())
            .await
            .unwrap();
    }
    assert!(x.active().await.unwrap().is_empty());
}

/// A request body that announces when the store first reads it (the store
/// has looked at the session by then) and holds its last byte back until
/// released.
fn gated(
    data: &[u8],
) -> (
    ByteStream,
    tokio::sync::oneshot::Receiver<()>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (polled_tx, polled) = tokio::sync::oneshot::channel();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let data = Bytes::copy_from_slice(data);
    let (head, tail) = (data.slice(..data.len() - 1), data.slice(data.len() - 1..));
    let body = futures::stream::once(async move {
        let _ = polled_tx.send(());
        Ok(head)
    })
    .chain(futures::stream::once(async move {
        let _ = released.await;
        Ok(tail)
    }))
    .boxed();
    (body, polled, release)
}

/// One replica's handles on a store shared by several replicas.
pub type Replica = (Arc<dyn BlobStore>, Arc<dyn UploadStore>);

/// Two chunks at offset 0 of one session, `x` on replica `a` and `y` on
/// replica `b`, both sent before either is stored (each replica has looked
/// at the session and found it empty); `a`'s request ends first. Returns
/// the session and both outcomes.
async fn race_at_zero(
    a: &Replica,
    b: &Replica,
    x: &[u8],
    y: &[u8],
) -> (UploadId, super::Result<u64>, super::Result<u64>) {
    let id = UploadId::new_random();
    a.1.create(&id).await.unwrap();
    let (bx, polled_x, release_x) = gated(x);
    let (by, polled_y, release_y) = gated(y);
    let (ua, ub) = (a.1.clone(), b.1.clone());
    let (ia, ib) = (id.clone(), id.clone());
    let (lx, ly) = (x.len() as u64, y.len() as u64);
    let ta = tokio::spawn(async move { ua.append(&ia, 0, Some(lx), bx).await });
    polled_x.await.expect("replica a reads the first chunk");
    let tb = tokio::spawn(async move { ub.append(&ib, 0, Some(ly), by).await });
    polled_y.await.expect("replica b reads the second chunk");
    release_x.send(()).unwrap();
    let ra = ta.await.unwrap();
    release_y.send(()).unwrap();
    let rb = tb.await.unwrap();
    (id, ra, rb)
}

/// Runs the contract of an upload store shared by replicas (`a` and `b`,
/// two handles on one store): two chunks at one offset of one session,
/// whatever their sizes and whichever ends first, leave exactly one of
/// them in the session, and a commit publishes under a digest only the
/// bytes that hash to it.
pub async fn shared_upload_store_suite(a: Replica, b: Replica) {
    let bytes = |len: usize, seed: u32| -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
            .collect()
    };
    // Larger than a multipart part of the S3 backend (8 MiB), and small.
    let large = 9 * 1024 * 1024 + 17;
    let small = 300_000;

    // Equal length, both large: the first to end wins; the other is refused.
    let (x, y) = (bytes(large, 1), bytes(large, 2));
    let (dx, dy) = (Digest::sha256_of(&x), Digest::sha256_of(&y));
    let (id, rx, ry) = race_at_zero(&a, &b, &x, &y).await;
    // The replica that hashed `x` commits it: what is published under
    // d(x) is x, never the other request's bytes.
    match a.1.commit(&id, &dx).await {
        Ok(n) => {
            assert_eq!(n, x.len() as u64);
            let stored = collect(b.0.read(&dx, None).await.unwrap()).await;
            assert!(
                stored == x,
                "bytes that do not hash to {dx} were published under it"
            );
        }
        Err(e) => panic!("the first chunk to end was not kept: {e} ({rx:?}, {ry:?})"),
    }
    assert_eq!(
        rx.unwrap(),
        x.len() as u64,
        "the first chunk to end is kept"
    );
    assert!(
        matches!(ry, Err(StorageError::OffsetMismatch { current, requested: 0 }) if current == x.len() as u64),
        "a second chunk at one offset is refused with the session's size: {ry:?}"
    );
    assert_eq!(a.0.stat(&dy).await.unwrap(), None);
    assert!(b.0.delete(&dx).await.unwrap());

    // The refused replica commits its own digest: nothing is published
    // under it; the session's content commits from the other replica.
    let (id, rx, ry) = race_at_zero(&b, &a, &y, &x).await;
    assert_eq!(rx.unwrap(), y.len() as u64);
    assert!(ry.is_err());
    assert!(matches!(
        a.1.commit(&id, &dx).await,
        Err(StorageError::DigestMismatch { .. })
    ));
    assert_eq!(b.0.stat(&dx).await.unwrap(), None, "nothing under d(x)");
    assert_eq!(a.0.stat(&dy).await.unwrap(), None);

    // A small chunk (one write) racing a large one (a multipart upload), in
    // both orders: exactly one is kept, the other is refused, and the
    // session goes on from the kept one.
    let (s, l) = (bytes(small, 3), bytes(large, 4));
    for small_first in [true, false] {
        let (first, second) = if small_first { (&s, &l) } else { (&l, &s) };
        let (id, r1, r2) = race_at_zero(&a, &b, first, second).await;
        assert_eq!(
            r1.unwrap(),
            first.len() as u64,
            "small first: {small_first}: the first chunk to end is kept"
        );
        assert!(
            matches!(r2, Err(StorageError::OffsetMismatch { current, requested: 0 }) if current == first.len() as u64),
            "small first: {small_first}: a second chunk at one offset is refused: {r2:?}"
        );
        assert_eq!(b.1.size(&id).await.unwrap(), first.len() as u64);
        // The refused replica continues the session where it stands.
        let tail = bytes(1000, 5);
        b.1.append(&id, first.len() as u64, None, stream_of(vec![&tail]))
            .await
            .unwrap();
        let mut whole = first.clone();
        whole.extend_from_slice(&tail);
        let d = Digest::sha256_of(&whole);
        assert_eq!(a.1.commit(&id, &d).await.unwrap(), whole.len() as u64);
        assert_eq!(collect(b.0.read(&d, None).await.unwrap()).await, whole);
        assert!(a.0.delete(&d).await.unwrap());
        let lost = Digest::sha256_of(second);
        assert_eq!(a.0.stat(&lost).await.unwrap(), None);
    }
}

/// Runs the rule that a stored blob is proof of its content only if it
/// can be (ARCHITECTURE.md, invariant 1): a blob stored with another size
/// than its digest's verified bytes (which wharf never writes; `plant`
/// writes it past the store) is replaced by the next verified publication
/// of that digest, on every path that publishes.
pub async fn wrong_size_blob_suite(
    blobs: Arc<dyn BlobStore>,
    uploads: Arc<dyn UploadStore>,
    fills: Arc<dyn FillStore>,
    plant: impl Fn(Digest, Vec<u8>) -> futures::future::BoxFuture<'static, ()>,
) {
    for path in ["put", "commit", "fill"] {
        let data = format!("the verified bytes published by {path}").into_bytes();
        let d = Digest::sha256_of(&data);
        plant(d.clone(), b"not these bytes".to_vec()).await;
        assert_eq!(blobs.stat(&d).await.unwrap(), Some(15));
        match path {
            "put" => blobs.put(&d, Bytes::from(data.clone())).await.unwrap(),
            "commit" => {
                let id = UploadId::new_random();
                uploads.create(&id).await.unwrap();
                uploads
                    .append(&id, 0, None, stream_of(vec![&data]))
                    .await
                    .unwrap();
                assert_eq!(uploads.commit(&id, &d).await.unwrap(), data.len() as u64);
            }
            _ => {
                let mut w = fills.begin_fill().await.unwrap();
                w.write(&data).await.unwrap();
                assert_eq!(w.commit(&d).await.unwrap(), data.len() as u64);
            }
        }
        assert_eq!(
            collect(blobs.read(&d, None).await.unwrap()).await,
            data,
            "{path}: a stored blob of another size was taken for the verified bytes"
        );
        assert!(blobs.delete(&d).await.unwrap());
    }
}
