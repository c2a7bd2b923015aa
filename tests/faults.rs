//! The storage invariants under injected faults, on every backend: the
//! filesystem with redb, the S3 backend over an in-memory object store, and
//! the S3 backend over a real SeaweedFS. A push is driven through the real
//! registry while a [`FaultPlan`] fails, truncates or stalls the operations
//! under it, then the stores are checked without faults (after reopening
//! them, for a crash):
//!
//! - invariant 1: no blob is visible whose bytes do not hash to its digest,
//!   whatever write was cut short;
//! - invariant 2: no manifest is visible with a blob missing, no tag names a
//!   missing manifest, no reader sees a write half done, and a store read
//!   that ends early never reaches a client as a complete body;
//! - invariant 4: whatever was acknowledged is there after a crash at any
//!   operation (a crash between operations: durability against power loss
//!   is the backends' fsync, which these tests cannot observe).

mod common;

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use object_store::ObjectStore;
use object_store::memory::InMemory;
use wharf::oci::{Digest, Reference, RepoName, Tag, UploadRange};
use wharf::registry::{Registry, RegistryError};
use wharf::storage::faulty::{FaultPlan, Faulty, Stall};
use wharf::storage::fs::FsStore;
use wharf::storage::meta::RedbMeta;
use wharf::storage::s3::{S3Fills, S3Store};
use wharf::storage::s3meta::S3Meta;
use wharf::storage::{BlobStore, ByteStream, FillStore, MetaStore, StorageError, UploadStore};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A backend to run on.
#[derive(Clone)]
enum Kind {
    /// Blobs on a local filesystem, metadata in redb.
    Fs,
    /// The S3 backend over `object_store`'s in-memory store.
    Memory,
    /// The S3 backend over a real SeaweedFS bucket.
    Seaweed(Arc<dyn ObjectStore>),
}

impl std::fmt::Debug for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Fs => "fs",
            Kind::Memory => "s3 (in memory)",
            Kind::Seaweed(_) => "s3 (SeaweedFS)",
        })
    }
}

/// Where a backend keeps its state across a simulated crash.
struct Backend {
    dir: tempfile::TempDir,
    /// The bucket and the prefix of this backend in it (S3 kinds).
    bucket: Arc<dyn ObjectStore>,
    prefix: String,
    kind: Kind,
}

#[derive(Clone)]
struct Stores {
    blobs: Arc<dyn BlobStore>,
    uploads: Arc<dyn UploadStore>,
    meta: Arc<dyn MetaStore>,
    fills: Arc<dyn FillStore>,
}

impl Backend {
    fn new(kind: &Kind) -> Backend {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let bucket: Arc<dyn ObjectStore> = match kind {
            Kind::Seaweed(store) => store.clone(),
            _ => Arc::new(InMemory::new()),
        };
        Backend {
            dir: tempfile::tempdir().unwrap(),
            bucket,
            prefix: format!("faults-{}-{n}", std::process::id()),
            kind: kind.clone(),
        }
    }

    /// Opens the stores, as a process starting over this state does.
    fn open(&self) -> Stores {
        match self.kind {
            Kind::Fs => {
                let fs = Arc::new(FsStore::open(self.dir.path()).unwrap());
                let meta = RedbMeta::open(&self.dir.path().join("meta.redb")).unwrap();
                Stores {
                    blobs: fs.clone(),
                    uploads: fs.clone(),
                    meta: Arc::new(meta),
                    fills: fs,
                }
            }
            Kind::Memory | Kind::Seaweed(_) => {
                let s3 = Arc::new(
                    S3Store::new(
                        self.bucket.clone(),
                        &self.prefix,
                        self.dir.path().join("scratch"),
                    )
                    .unwrap(),
                );
                Stores {
                    blobs: s3.clone(),
                    uploads: s3.clone(),
                    meta: Arc::new(S3Meta::new(self.bucket.clone(), &self.prefix)),
                    fills: Arc::new(S3Fills(s3)),
                }
            }
        }
    }
}

fn registry(s: &Stores) -> Registry {
    Registry::new(s.blobs.clone(), s.uploads.clone(), s.meta.clone())
}

fn faulty(s: &Stores, plan: &FaultPlan) -> Registry {
    Registry::new(
        Arc::new(Faulty::new(s.blobs.clone(), plan.clone())),
        Arc::new(Faulty::new(s.uploads.clone(), plan.clone())),
        Arc::new(Faulty::new(s.meta.clone(), plan.clone())),
    )
}

struct Image {
    layer: Vec<u8>,
    config: Vec<u8>,
    manifest: Vec<u8>,
    ld: Digest,
    cd: Digest,
    md: Digest,
}

fn image() -> Image {
    let layer: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let (ld, cd) = (Digest::sha256_of(&layer), Digest::sha256_of(&config));
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": cd.as_str(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": ld.as_str(), "size": layer.len()}],
    }))
    .unwrap();
    let md = Digest::sha256_of(&manifest);
    Image {
        layer,
        config,
        manifest,
        ld,
        cd,
        md,
    }
}

fn repo() -> RepoName {
    "team/app".parse().unwrap()
}

fn tag() -> Tag {
    "v1".parse().unwrap()
}

fn body(bytes: &[u8]) -> ByteStream {
    // Two pieces, so a truncation can fall inside a chunk.
    let (a, b) = bytes.split_at(bytes.len() / 3);
    futures::stream::iter([Ok(Bytes::copy_from_slice(a)), Ok(Bytes::copy_from_slice(b))]).boxed()
}

/// What a push had acknowledged when it stopped.
#[derive(Debug, Default)]
struct Acked {
    blobs: Vec<Digest>,
    manifest: bool,
}

/// A push as a client does it: the layer in two chunks, the config in
/// one request, the manifest by tag. Stops at the first error.
async fn push(reg: &Registry, img: &Image) -> (Acked, std::result::Result<(), RegistryError>) {
    let mut acked = Acked::default();
    let r = async {
        let repo = reg.hosted(&repo(), None).await?;
        let id = repo.start_upload().await?;
        let half = img.layer.len() / 2;
        let first: UploadRange = format!("0-{}", half - 1).parse().unwrap();
        repo.append_upload(
            &id,
            Some(first),
            Some(half as u64),
            body(&img.layer[..half]),
        )
        .await?;
        let rest = img.layer.len() - half;
        let second: UploadRange = format!("{half}-{}", img.layer.len() - 1).parse().unwrap();
        repo.append_upload(
            &id,
            Some(second),
            Some(rest as u64),
            body(&img.layer[half..]),
        )
        .await?;
        repo.finish_upload(&id, &img.ld, None).await?;
        acked.blobs.push(img.ld.clone());
        repo.monolithic_upload(&img.cd, Some(img.config.len() as u64), body(&img.config))
            .await?;
        acked.blobs.push(img.cd.clone());
        repo.put_manifest(
            &Reference::Tag(tag()),
            Some(OCI_MANIFEST),
            Bytes::from(img.manifest.clone()),
        )
        .await?;
        acked.manifest = true;
        Ok(())
    }
    .await;
    (acked, r)
}

async fn collect(mut s: ByteStream) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c?);
    }
    Ok(out)
}

/// Everything `acked` names is readable and right; nothing partial is
/// visible: no blob whose bytes do not hash to its digest, no manifest
/// with a missing blob, no tag to a missing manifest.
async fn check(s: &Stores, img: &Image, acked: &Acked, what: &str) {
    let reg = registry(s);
    let repo = repo();
    for d in &acked.blobs {
        let b = reg.blob(&repo, d, None, None).await;
        let b = b.unwrap_or_else(|e| panic!("{what}: acknowledged blob {d} is gone: {e}"));
        let bytes = collect(b.stream).await.unwrap();
        assert_eq!(&Digest::sha256_of(&bytes), d, "{what}: blob {d}");
    }
    if acked.manifest {
        let hit = reg
            .manifest(&repo, &Reference::Tag(tag()), None, None)
            .await
            .unwrap_or_else(|e| panic!("{what}: acknowledged manifest is gone: {e}"));
        assert_eq!(hit.digest, img.md, "{what}");
        assert_eq!(
            reg.manifest_body(&hit).await.unwrap(),
            img.manifest,
            "{what}"
        );
    }
    for d in s.blobs.list().await.unwrap() {
        let bytes = collect(s.blobs.read(&d, None).await.unwrap())
            .await
            .unwrap();
        assert_eq!(
            Digest::sha256_of(&bytes),
            d,
            "{what}: a visible blob is wrong"
        );
    }
    if let Some(tags) = s.meta.tags(&repo, None, 100).await.unwrap() {
        for t in tags {
            let t: Tag = t.parse().unwrap();
            let d = s.meta.resolve_tag(&repo, &t).await.unwrap().unwrap();
            assert!(
                s.meta.manifest(&repo, &d).await.unwrap().is_some(),
                "{what}: tag {t} names a missing manifest"
            );
        }
    }
    if s.meta.manifest(&repo, &img.md).await.unwrap().is_some() {
        assert_eq!(
            s.blobs.stat(&img.md).await.unwrap(),
            Some(img.manifest.len() as u64),
            "{what}: a visible manifest's body is missing"
        );
        for (d, len) in [(&img.ld, img.layer.len()), (&img.cd, img.config.len())] {
            assert!(
                s.meta.blob_linked(&repo, d).await.unwrap(),
                "{what}: a visible manifest's blob {d} is not in the repository"
            );
            assert_eq!(s.blobs.stat(d).await.unwrap(), Some(len as u64), "{what}");
        }
    }
}

/// The operations of one clean push.
async fn clean_push_log(kind: &Kind) -> Vec<&'static str> {
    let b = Backend::new(kind);
    let plan = FaultPlan::new();
    let (acked, r) = push(&faulty(&b.open(), &plan), &image()).await;
    r.unwrap();
    assert!(acked.manifest);
    plan.log()
}

/// A crash at every operation of a push, before the operation reached the
/// store and after it did (its answer lost): whatever was acknowledged is
/// there after a restart, nothing partial is, and the push then succeeds.
async fn crash_sweep(kind: &Kind) {
    let img = image();
    let total = clean_push_log(kind).await.len() as u64;
    assert!(total > 10, "{total}");
    for n in 0..total {
        for done in [false, true] {
            let b = Backend::new(kind);
            let plan = FaultPlan::new();
            if done {
                plan.crash_after(n);
            } else {
                plan.fail_from(n);
            }
            let acked = {
                let (acked, r) = push(&faulty(&b.open(), &plan), &img).await;
                assert!(r.is_err(), "{kind:?}: a push with a crash at {n} succeeded");
                acked
            };
            let what = format!(
                "{kind:?}, crash {} operation {n} ({})",
                if done { "after" } else { "before" },
                plan.log()[n as usize]
            );
            let s = b.open();
            check(&s, &img, &acked, &what).await;
            let (acked, r) = push(&registry(&s), &img).await;
            r.unwrap_or_else(|e| panic!("{what}: the push after the restart failed: {e}"));
            check(&s, &img, &acked, &what).await;
        }
    }
}

/// One failed operation at every point of a push: the push fails
/// cleanly, nothing partial is visible, and pushing again succeeds
/// without a restart.
async fn failure_sweep(kind: &Kind) {
    let img = image();
    let total = clean_push_log(kind).await.len() as u64;
    for n in 0..total {
        let b = Backend::new(kind);
        let s = b.open();
        let plan = FaultPlan::new();
        plan.fail_at(n);
        let reg = faulty(&s, &plan);
        let (acked, r) = push(&reg, &img).await;
        let what = format!(
            "{kind:?}, failure at operation {n} ({})",
            plan.log()[n as usize]
        );
        // Some failures are tolerated (a session record left behind is
        // purged later); then the push is acknowledged and must hold.
        let _ = r;
        check(&s, &img, &acked, &what).await;
        let (acked, r) = push(&reg, &img).await;
        r.unwrap_or_else(|e| panic!("{what}: pushing again failed: {e}"));
        check(&s, &img, &acked, &what).await;
    }
}

/// Every write of a push silently keeps fewer bytes than it was given:
/// the push fails, and no blob with wrong bytes ever becomes visible.
async fn truncated_writes(kind: &Kind) {
    let img = image();
    let log = clean_push_log(kind).await;
    let writes: Vec<u64> = (0..log.len() as u64)
        .filter(|&n| matches!(log[n as usize], "uploads.append" | "blobs.put"))
        .collect();
    assert_eq!(writes.len(), 4, "{log:?}");
    for &n in &writes {
        for k in [0, 1, 20] {
            let b = Backend::new(kind);
            let s = b.open();
            let plan = FaultPlan::new();
            plan.truncate_at(n, k);
            let (acked, r) = push(&faulty(&s, &plan), &img).await;
            let what = format!(
                "{kind:?}, {} (operation {n}) keeps {k} bytes",
                log[n as usize]
            );
            assert!(r.is_err(), "{what}: the push succeeded");
            check(&s, &img, &acked, &what).await;
            drop(s);
            check(&b.open(), &img, &acked, &format!("{what}, after a restart")).await;
        }
    }
}

/// A read of the store that ends early never reaches a client as a
/// complete body: the blob stream fails, the manifest read fails.
async fn truncated_reads(kind: &Kind) {
    let img = image();
    let b = Backend::new(kind);
    let s = b.open();
    push(&registry(&s), &img).await.1.unwrap();
    let plan = FaultPlan::new();
    let repo = repo();
    for (d, len) in [(&img.ld, img.layer.len()), (&img.cd, img.config.len())] {
        // Find the read among the operations of one blob request.
        let reg = faulty(&s, &plan);
        let start = plan.ops();
        let whole = reg.blob(&repo, d, None, None).await.unwrap();
        assert_eq!(collect(whole.stream).await.unwrap().len(), len);
        let at = plan.log()[start as usize..]
            .iter()
            .position(|o| *o == "blobs.read")
            .unwrap() as u64;
        let start = plan.ops();
        plan.truncate_at(start + at, len / 2);
        let got = reg.blob(&repo, d, None, None).await.unwrap();
        assert_eq!(got.size, len as u64);
        let r = collect(got.stream).await;
        assert!(
            r.is_err(),
            "{kind:?}: a blob read cut at {} ended cleanly",
            len / 2
        );
    }
    // A fresh registry (no manifest in memory) whose manifest read is cut.
    let reg = faulty(&s, &plan);
    let hit = reg
        .manifest(&repo, &Reference::Tag(tag()), None, None)
        .await
        .unwrap();
    plan.truncate_at(plan.ops(), 10);
    assert!(
        reg.manifest_body(&hit).await.is_err(),
        "{kind:?}: a cut manifest read was served"
    );
    // And the cut read was not remembered: the next read is whole.
    assert_eq!(reg.manifest_body(&hit).await.unwrap(), img.manifest);
}

/// Readers while a write is held half-way: an upload whose commit is
/// stalled is not visible in the repository, nor is a manifest whose
/// record is not written yet; once released, both are whole.
async fn stalled_writes(kind: &Kind) {
    let img = image();
    let b = Backend::new(kind);
    let s = b.open();
    let plain = registry(&s);
    let repo = repo();
    for (op, position) in [
        ("uploads.commit", Stall::Before),
        ("uploads.commit", Stall::After),
        ("meta.put_manifest", Stall::Before),
    ] {
        let plan = FaultPlan::new();
        let gate = plan.stall(op, position);
        let reg = faulty(&s, &plan);
        let img2 = image();
        let pusher = tokio::spawn(async move { push(&reg, &img2).await.1 });
        gate.reached().await;
        if op == "uploads.commit" {
            let stat = s.blobs.stat(&img.ld).await.unwrap();
            assert!(
                stat.is_none() || stat == Some(img.layer.len() as u64),
                "{kind:?}: a partial blob is visible: {stat:?}"
            );
            if position == Stall::Before {
                assert_eq!(stat, None, "{kind:?}: visible before its commit");
            }
            assert!(matches!(
                plain.blob(&repo, &img.ld, None, None).await,
                Err(RegistryError::BlobUnknown)
            ));
        } else {
            assert!(matches!(
                plain
                    .manifest(&repo, &Reference::Tag(tag()), None, None)
                    .await,
                Err(RegistryError::ManifestUnknown)
            ));
        }
        gate.open();
        pusher.await.unwrap().unwrap();
        check(
            &s,
            &img,
            &Acked {
                blobs: vec![img.ld.clone(), img.cd.clone()],
                manifest: true,
            },
            op,
        )
        .await;
        // Start the next round from an empty repository.
        let hosted = plain.hosted(&repo, None).await.unwrap();
        hosted
            .delete_manifest(&Reference::Digest(img.md.clone()))
            .await
            .unwrap();
        for d in [&img.ld, &img.cd] {
            hosted.delete_blob(d).await.unwrap();
        }
    }
}

/// A pull-through fill whose write silently keeps fewer bytes, or whose
/// commit fails, publishes nothing; a staged read that ends early is seen
/// as short, and the next fill of the blob publishes it whole.
async fn faulty_fills(kind: &Kind) {
    let b = Backend::new(kind);
    let s = b.open();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let d = Digest::sha256_of(&data);
    let plan = FaultPlan::new();
    let fills = Faulty::new(s.fills.clone(), plan.clone());

    // The second write keeps 10 bytes and says it wrote them all.
    let mut w = fills.begin_fill().await.unwrap();
    plan.truncate_at(plan.ops() + 1, 10);
    for piece in data.chunks(100_000) {
        w.write(piece).await.unwrap();
    }
    assert!(matches!(
        w.commit(&d).await,
        Err(StorageError::DigestMismatch { .. } | StorageError::SizeMismatch { .. })
    ));
    assert_eq!(s.blobs.stat(&d).await.unwrap(), None, "{kind:?}: published");

    // A commit that fails publishes nothing.
    let mut w = fills.begin_fill().await.unwrap();
    for piece in data.chunks(100_000) {
        w.write(piece).await.unwrap();
    }
    let staged = w.staged();
    plan.truncate_at(plan.ops(), 5);
    assert_eq!(staged.read_at(0, 100).await.unwrap().len(), 5);
    plan.fail_at(plan.ops());
    assert!(w.commit(&d).await.is_err());
    assert_eq!(s.blobs.stat(&d).await.unwrap(), None, "{kind:?}: published");

    // Without faults the same bytes are published, verified.
    let mut w = fills.begin_fill().await.unwrap();
    for piece in data.chunks(100_000) {
        w.write(piece).await.unwrap();
    }
    assert_eq!(w.commit(&d).await.unwrap(), data.len() as u64);
    let back = collect(s.blobs.read(&d, None).await.unwrap())
        .await
        .unwrap();
    assert_eq!(back, data);
}

#[tokio::test]
async fn fs_a_crash_anywhere_in_a_push_loses_nothing_acknowledged() {
    crash_sweep(&Kind::Fs).await;
}

#[tokio::test]
async fn s3_a_crash_anywhere_in_a_push_loses_nothing_acknowledged() {
    crash_sweep(&Kind::Memory).await;
}

#[tokio::test]
async fn fs_a_failure_anywhere_in_a_push_leaves_nothing_partial() {
    failure_sweep(&Kind::Fs).await;
}

#[tokio::test]
async fn s3_a_failure_anywhere_in_a_push_leaves_nothing_partial() {
    failure_sweep(&Kind::Memory).await;
}

#[tokio::test]
async fn fs_truncated_writes_never_publish_wrong_bytes() {
    truncated_writes(&Kind::Fs).await;
}

#[tokio::test]
async fn s3_truncated_writes_never_publish_wrong_bytes() {
    truncated_writes(&Kind::Memory).await;
}

#[tokio::test]
async fn fs_a_truncated_read_never_ends_cleanly() {
    truncated_reads(&Kind::Fs).await;
}

#[tokio::test]
async fn s3_a_truncated_read_never_ends_cleanly() {
    truncated_reads(&Kind::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_readers_never_see_a_write_half_done() {
    stalled_writes(&Kind::Fs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_readers_never_see_a_write_half_done() {
    stalled_writes(&Kind::Memory).await;
}

#[tokio::test]
async fn fs_faulty_fills_publish_nothing_wrong() {
    faulty_fills(&Kind::Fs).await;
}

#[tokio::test]
async fn s3_faulty_fills_publish_nothing_wrong() {
    faulty_fills(&Kind::Memory).await;
}

/// The same sweeps over a real bucket (conditional writes, multipart and
/// server-side copies as SeaweedFS does them), one SeaweedFS for all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seaweedfs_every_fault_keeps_the_invariants() {
    let sw = common::seaweedfs::SeaweedFs::start().await;
    let kind = Kind::Seaweed(sw.object_store());
    crash_sweep(&kind).await;
    failure_sweep(&kind).await;
    truncated_writes(&kind).await;
    truncated_reads(&kind).await;
    stalled_writes(&kind).await;
    faulty_fills(&kind).await;
}
