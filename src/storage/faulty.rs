//! A fault-injecting wrapper around the storage traits, to prove the
//! invariants under failure: [`Faulty`] wraps a [`BlobStore`], an
//! [`UploadStore`], a [`MetaStore`] or a [`FillStore`] and consults one
//! shared, scriptable [`FaultPlan`] on every call.
//!
//! Every call is one operation, numbered from 0 in the order calls arrive.
//! The plan can fail one operation or every operation from one on (a crash:
//! nothing after it reaches the store) with an I/O error; truncate the bytes
//! of one operation (a write that silently keeps only the first `k` bytes
//! while reporting success, a read whose stream ends cleanly after `k`
//! bytes); and stall the next call of a named operation, before or after it
//! reached the store, at a [`Gate`] the test opens. No fault waits on time.

use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;

use super::{
    BlobStore, ByteStream, CacheEntry, FillStore, FillWriter, ManifestRecord, MetaStore, RepoKind,
    Result, StagedReader, StorageError, UploadRecord, UploadStore,
};
use crate::oci::manifest::Descriptor;
use crate::oci::{Digest, Reference, RepoName, Tag, UploadId};

/// Where a stalled operation waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stall {
    /// Before the call reaches the wrapped store: it has had no effect yet.
    Before,
    /// After the wrapped store answered, before the answer is returned: the
    /// effect is there but the caller has not been told.
    After,
}

/// A point where a stalled operation waits until the test opens it.
#[derive(Clone)]
pub struct Gate {
    reached: watch::Sender<bool>,
    opened: watch::Sender<bool>,
}

impl Gate {
    fn new() -> Gate {
        Gate {
            reached: watch::Sender::new(false),
            opened: watch::Sender::new(false),
        }
    }

    /// Waits until an operation is held at the gate.
    pub async fn reached(&self) {
        let mut rx = self.reached.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Releases the held operation (and any later one).
    pub fn open(&self) {
        self.opened.send_replace(true);
    }

    async fn pass(&self) {
        self.reached.send_replace(true);
        let mut rx = self.opened.subscribe();
        let _ = rx.wait_for(|o| *o).await;
    }
}

#[derive(Default)]
struct State {
    next: u64,
    log: Vec<&'static str>,
    fail_at: Option<u64>,
    fail_from: Option<u64>,
    truncate: HashMap<u64, usize>,
    stalls: HashMap<(&'static str, Stall), Gate>,
}

/// What one operation was told to do.
struct Entered {
    n: u64,
    truncate: Option<usize>,
    after: Option<Gate>,
}

/// The faults to inject, shared by every wrapper built on it.
#[derive(Clone, Default)]
pub struct FaultPlan(Arc<Mutex<State>>);

impl FaultPlan {
    pub fn new() -> FaultPlan {
        FaultPlan::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Operations seen so far (the number the next one gets).
    pub fn ops(&self) -> u64 {
        self.state().next
    }

    /// The names of the operations seen so far, in order.
    pub fn log(&self) -> Vec<&'static str> {
        self.state().log.clone()
    }

    /// Operation `n` fails with an I/O error before reaching the store.
    pub fn fail_at(&self, n: u64) {
        self.state().fail_at = Some(n);
    }

    /// Every operation from `n` on fails before reaching the store: the
    /// process died at that point.
    pub fn fail_from(&self, n: u64) {
        self.state().fail_from = Some(n);
    }

    /// Operation `n` keeps only its first `k` bytes: a write stores `k`
    /// bytes and reports the whole chunk written, a read ends cleanly after
    /// `k` bytes. Other operations ignore it.
    pub fn truncate_at(&self, n: u64, k: usize) {
        self.state().truncate.insert(n, k);
    }

    /// The next calls of `op` (as named in [`FaultPlan::log`]) wait at the
    /// returned gate, at `position`, until it is opened.
    pub fn stall(&self, op: &'static str, position: Stall) -> Gate {
        let gate = Gate::new();
        self.state().stalls.insert((op, position), gate.clone());
        gate
    }

    /// Removes every fault (the count and the log go on).
    pub fn clear(&self) {
        let mut s = self.state();
        s.fail_at = None;
        s.fail_from = None;
        s.truncate.clear();
        for (_, gate) in s.stalls.drain() {
            gate.open();
        }
    }

    async fn enter(&self, op: &'static str) -> Result<Entered> {
        let (entered, before, fail) = {
            let mut s = self.state();
            let n = s.next;
            s.next += 1;
            s.log.push(op);
            let fail = s.fail_at == Some(n) || s.fail_from.is_some_and(|f| n >= f);
            let entered = Entered {
                n,
                truncate: s.truncate.get(&n).copied(),
                after: s.stalls.get(&(op, Stall::After)).cloned(),
            };
            (entered, s.stalls.get(&(op, Stall::Before)).cloned(), fail)
        };
        if let Some(gate) = before {
            gate.pass().await;
        }
        if fail {
            return Err(StorageError::Io(io::Error::other(format!(
                "injected fault at operation {} ({op})",
                entered.n
            ))));
        }
        Ok(entered)
    }
}

impl Entered {
    async fn leave<T>(self, result: T) -> T {
        if let Some(gate) = self.after {
            gate.pass().await;
        }
        result
    }
}

/// A storage backend whose every call goes through a [`FaultPlan`].
pub struct Faulty<T: ?Sized> {
    inner: Arc<T>,
    plan: FaultPlan,
}

impl<T: ?Sized> Faulty<T> {
    pub fn new(inner: Arc<T>, plan: FaultPlan) -> Faulty<T> {
        Faulty { inner, plan }
    }
}

/// The first `k` bytes of `stream`; the rest is read to its end and dropped.
/// `seen` counts every byte read.
fn keep_first(stream: ByteStream, k: usize, seen: Arc<AtomicU64>) -> ByteStream {
    futures::stream::unfold((stream, k), move |(mut s, mut left)| {
        let seen = seen.clone();
        async move {
            loop {
                match s.next().await? {
                    Ok(mut b) => {
                        seen.fetch_add(b.len() as u64, Ordering::SeqCst);
                        if left == 0 {
                            continue;
                        }
                        b.truncate(left);
                        left -= b.len();
                        return Some((Ok(b), (s, left)));
                    }
                    Err(e) => return Some((Err(e), (s, 0))),
                }
            }
        }
    })
    .boxed()
}

/// `stream` ending cleanly after `k` bytes.
fn cut(stream: ByteStream, k: usize) -> ByteStream {
    futures::stream::unfold((stream, k), |(mut s, left)| async move {
        if left == 0 {
            return None;
        }
        match s.next().await? {
            Ok(mut b) => {
                if b.len() > left {
                    b.truncate(left);
                }
                let left = left - b.len();
                Some((Ok(b), (s, left)))
            }
            Err(e) => Some((Err(e), (s, 0))),
        }
    })
    .boxed()
}

#[async_trait]
impl<T: BlobStore + ?Sized> BlobStore for Faulty<T> {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        let e = self.plan.enter("blobs.stat").await?;
        e.leave(self.inner.stat(digest).await).await
    }

    async fn read(&self, digest: &Digest, range: Option<Range<u64>>) -> Result<ByteStream> {
        let e = self.plan.enter("blobs.read").await?;
        let k = e.truncate;
        let r = self.inner.read(digest, range).await;
        e.leave(r.map(|s| match k {
            Some(k) => cut(s, k),
            None => s,
        }))
        .await
    }

    async fn put(&self, digest: &Digest, bytes: Bytes) -> Result<()> {
        let e = self.plan.enter("blobs.put").await?;
        let bytes = match e.truncate {
            Some(k) => bytes.slice(..k.min(bytes.len())),
            None => bytes,
        };
        e.leave(self.inner.put(digest, bytes).await).await
    }

    async fn delete(&self, digest: &Digest) -> Result<bool> {
        let e = self.plan.enter("blobs.delete").await?;
        e.leave(self.inner.delete(digest).await).await
    }

    async fn list(&self) -> Result<Vec<Digest>> {
        let e = self.plan.enter("blobs.list").await?;
        e.leave(self.inner.list().await).await
    }

    async fn quarantine(&self, digest: &Digest) -> Result<()> {
        let e = self.plan.enter("blobs.quarantine").await?;
        e.leave(self.inner.quarantine(digest).await).await
    }
}

#[async_trait]
impl<T: UploadStore + ?Sized> UploadStore for Faulty<T> {
    async fn create(&self, id: &UploadId) -> Result<()> {
        let e = self.plan.enter("uploads.create").await?;
        e.leave(self.inner.create(id).await).await
    }

    async fn size(&self, id: &UploadId) -> Result<u64> {
        let e = self.plan.enter("uploads.size").await?;
        e.leave(self.inner.size(id).await).await
    }

    async fn append(
        &self,
        id: &UploadId,
        offset: u64,
        expected_len: Option<u64>,
        body: ByteStream,
    ) -> Result<u64> {
        let e = self.plan.enter("uploads.append").await?;
        let Some(k) = e.truncate else {
            return e
                .leave(self.inner.append(id, offset, expected_len, body).await)
                .await;
        };
        // A lying disk: the store gets the first `k` bytes (the rest of the
        // body is read and dropped), the caller is told the chunk was written.
        let seen = Arc::new(AtomicU64::new(0));
        let stored = keep_first(body, k, seen.clone());
        let r = match self.inner.append(id, offset, None, stored).await {
            Ok(_) => {
                let whole = seen.load(Ordering::SeqCst);
                match expected_len {
                    Some(l) if l != whole => Err(StorageError::SizeMismatch {
                        expected: l,
                        actual: whole,
                    }),
                    _ => Ok(offset + whole),
                }
            }
            Err(e) => Err(e),
        };
        e.leave(r).await
    }

    async fn commit(&self, id: &UploadId, expected: &Digest) -> Result<u64> {
        let e = self.plan.enter("uploads.commit").await?;
        e.leave(self.inner.commit(id, expected).await).await
    }

    async fn abort(&self, id: &UploadId) -> Result<()> {
        let e = self.plan.enter("uploads.abort").await?;
        e.leave(self.inner.abort(id).await).await
    }

    async fn list(&self) -> Result<Vec<(UploadId, SystemTime)>> {
        let e = self.plan.enter("uploads.list").await?;
        e.leave(self.inner.list().await).await
    }
}

#[async_trait]
impl<T: FillStore + ?Sized> FillStore for Faulty<T> {
    async fn begin_fill(&self) -> Result<Box<dyn FillWriter>> {
        let e = self.plan.enter("fills.begin").await?;
        let r = self.inner.begin_fill().await.map(|w| {
            Box::new(FaultyFill {
                inner: w,
                plan: self.plan.clone(),
            }) as Box<dyn FillWriter>
        });
        e.leave(r).await
    }
}

struct FaultyFill {
    inner: Box<dyn FillWriter>,
    plan: FaultPlan,
}

#[async_trait]
impl FillWriter for FaultyFill {
    async fn write(&mut self, data: &[u8]) -> Result<()> {
        let e = self.plan.enter("fills.write").await?;
        let data = match e.truncate {
            Some(k) => &data[..k.min(data.len())],
            None => data,
        };
        let r = self.inner.write(data).await;
        e.leave(r).await
    }

    fn written(&self) -> u64 {
        self.inner.written()
    }

    fn staged(&self) -> Arc<dyn StagedReader> {
        Arc::new(FaultyStaged {
            inner: self.inner.staged(),
            plan: self.plan.clone(),
        })
    }

    async fn verify(&self, expected: &Digest) -> Result<()> {
        let e = self.plan.enter("fills.verify").await?;
        e.leave(self.inner.verify(expected).await).await
    }

    async fn commit(self: Box<Self>, expected: &Digest) -> Result<u64> {
        let e = self.plan.enter("fills.commit").await?;
        e.leave(self.inner.commit(expected).await).await
    }

    async fn abort(self: Box<Self>) {
        if let Ok(e) = self.plan.enter("fills.abort").await {
            self.inner.abort().await;
            e.leave(()).await
        }
    }
}

struct FaultyStaged {
    inner: Arc<dyn StagedReader>,
    plan: FaultPlan,
}

#[async_trait]
impl StagedReader for FaultyStaged {
    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let e = self.plan.enter("fills.read_at").await?;
        let r = self
            .inner
            .read_at(offset, len)
            .await
            .map(|b| match e.truncate {
                Some(k) => b.slice(..k.min(b.len())),
                None => b,
            });
        e.leave(r).await
    }
}

/// Forwards a metadata call through the plan.
macro_rules! meta_op {
    ($self:ident, $name:literal, $call:expr) => {{
        let e = $self.plan.enter($name).await?;
        e.leave($call.await).await
    }};
}

#[async_trait]
impl<T: MetaStore + ?Sized> MetaStore for Faulty<T> {
    async fn repository(&self, repo: &RepoName) -> Result<Option<RepoKind>> {
        meta_op!(self, "meta.repository", self.inner.repository(repo))
    }
    async fn link_blob(&self, repo: &RepoName, kind: RepoKind, digest: &Digest) -> Result<()> {
        meta_op!(
            self,
            "meta.link_blob",
            self.inner.link_blob(repo, kind, digest)
        )
    }
    async fn blob_linked(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        meta_op!(
            self,
            "meta.blob_linked",
            self.inner.blob_linked(repo, digest)
        )
    }
    async fn unlink_blob(&self, repo: &RepoName, kind: RepoKind, digest: &Digest) -> Result<bool> {
        meta_op!(
            self,
            "meta.unlink_blob",
            self.inner.unlink_blob(repo, kind, digest)
        )
    }
    async fn put_manifest(
        &self,
        repo: &RepoName,
        kind: RepoKind,
        digest: &Digest,
        record: &ManifestRecord,
        tag: Option<&Tag>,
        referrer: Option<&Descriptor>,
    ) -> Result<()> {
        meta_op!(
            self,
            "meta.put_manifest",
            self.inner
                .put_manifest(repo, kind, digest, record, tag, referrer)
        )
    }
    async fn manifest(&self, repo: &RepoName, digest: &Digest) -> Result<Option<ManifestRecord>> {
        meta_op!(self, "meta.manifest", self.inner.manifest(repo, digest))
    }
    async fn find_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<(Digest, ManifestRecord)>> {
        meta_op!(
            self,
            "meta.find_manifest",
            self.inner.find_manifest(repo, reference)
        )
    }
    async fn delete_manifest(
        &self,
        repo: &RepoName,
        kind: RepoKind,
        digest: &Digest,
    ) -> Result<bool> {
        meta_op!(
            self,
            "meta.delete_manifest",
            self.inner.delete_manifest(repo, kind, digest)
        )
    }
    async fn resolve_tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>> {
        meta_op!(self, "meta.resolve_tag", self.inner.resolve_tag(repo, tag))
    }
    async fn tag_checked(&self, repo: &RepoName, tag: &Tag) -> Result<Option<u64>> {
        meta_op!(self, "meta.tag_checked", self.inner.tag_checked(repo, tag))
    }
    async fn set_tag_checked(&self, repo: &RepoName, tag: &Tag, unix_secs: u64) -> Result<()> {
        meta_op!(
            self,
            "meta.set_tag_checked",
            self.inner.set_tag_checked(repo, tag, unix_secs)
        )
    }
    async fn delete_tag(&self, repo: &RepoName, kind: RepoKind, tag: &Tag) -> Result<bool> {
        meta_op!(
            self,
            "meta.delete_tag",
            self.inner.delete_tag(repo, kind, tag)
        )
    }
    async fn tags(
        &self,
        repo: &RepoName,
        last: Option<&str>,
        n: usize,
    ) -> Result<Option<Vec<String>>> {
        meta_op!(self, "meta.tags", self.inner.tags(repo, last, n))
    }
    async fn repositories(&self, last: Option<&str>, n: usize) -> Result<Vec<String>> {
        meta_op!(self, "meta.repositories", self.inner.repositories(last, n))
    }
    async fn referrers(&self, repo: &RepoName, subject: &Digest) -> Result<Vec<Descriptor>> {
        meta_op!(self, "meta.referrers", self.inner.referrers(repo, subject))
    }
    async fn blob_pinned(&self, digest: &Digest) -> Result<bool> {
        meta_op!(self, "meta.blob_pinned", self.inner.blob_pinned(digest))
    }
    async fn cache_entries(&self) -> Result<Vec<(Digest, CacheEntry)>> {
        meta_op!(self, "meta.cache_entries", self.inner.cache_entries())
    }
    async fn put_cache_entries(&self, entries: &[(Digest, CacheEntry)]) -> Result<()> {
        meta_op!(
            self,
            "meta.put_cache_entries",
            self.inner.put_cache_entries(entries)
        )
    }
    async fn delete_cache_entry(&self, digest: &Digest) -> Result<()> {
        meta_op!(
            self,
            "meta.delete_cache_entry",
            self.inner.delete_cache_entry(digest)
        )
    }
    async fn put_upload(&self, id: &UploadId, record: &UploadRecord) -> Result<()> {
        meta_op!(self, "meta.put_upload", self.inner.put_upload(id, record))
    }
    async fn upload(&self, id: &UploadId) -> Result<Option<UploadRecord>> {
        meta_op!(self, "meta.upload", self.inner.upload(id))
    }
    async fn delete_upload(&self, id: &UploadId) -> Result<()> {
        meta_op!(self, "meta.delete_upload", self.inner.delete_upload(id))
    }
    async fn uploads(&self) -> Result<Vec<(UploadId, UploadRecord)>> {
        meta_op!(self, "meta.uploads", self.inner.uploads())
    }
}

/// The invariants under faults, on both backends (a filesystem with redb,
/// and the S3 backend over an in-memory object store): a push is driven
/// through the real registry while the plan fails, truncates or stalls its
/// storage operations, then the stores are checked without faults.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::UploadRange;
    use crate::registry::{Registry, RegistryError};
    use crate::storage::fs::FsStore;
    use crate::storage::meta::RedbMeta;
    use crate::storage::s3::S3Store;
    use crate::storage::s3meta::S3Meta;
    use object_store::memory::InMemory;

    const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

    #[derive(Clone, Copy, Debug)]
    enum Kind {
        Fs,
        S3,
    }

    /// Where a backend keeps its state across a simulated crash.
    struct Backend {
        dir: tempfile::TempDir,
        bucket: Arc<InMemory>,
        kind: Kind,
    }

    #[derive(Clone)]
    struct Stores {
        blobs: Arc<dyn BlobStore>,
        uploads: Arc<dyn UploadStore>,
        meta: Arc<dyn MetaStore>,
    }

    impl Backend {
        fn new(kind: Kind) -> Backend {
            Backend {
                dir: tempfile::tempdir().unwrap(),
                bucket: Arc::new(InMemory::new()),
                kind,
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
                        uploads: fs,
                        meta: Arc::new(meta),
                    }
                }
                Kind::S3 => {
                    let s3 = Arc::new(
                        S3Store::new(
                            self.bucket.clone(),
                            "wharf",
                            self.dir.path().join("scratch"),
                        )
                        .unwrap(),
                    );
                    Stores {
                        blobs: s3.clone(),
                        uploads: s3,
                        meta: Arc::new(S3Meta::new(self.bucket.clone(), "wharf")),
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
        futures::stream::iter([Ok(Bytes::copy_from_slice(a)), Ok(Bytes::copy_from_slice(b))])
            .boxed()
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
            let repo = repo();
            let id = reg.start_upload(&repo, None).await?;
            let half = img.layer.len() / 2;
            let first: UploadRange = format!("0-{}", half - 1).parse().unwrap();
            reg.append_upload(
                &repo,
                &id,
                Some(first),
                Some(half as u64),
                body(&img.layer[..half]),
            )
            .await?;
            let rest = img.layer.len() - half;
            let second: UploadRange = format!("{half}-{}", img.layer.len() - 1).parse().unwrap();
            reg.append_upload(
                &repo,
                &id,
                Some(second),
                Some(rest as u64),
                body(&img.layer[half..]),
            )
            .await?;
            reg.finish_upload(&repo, &id, &img.ld, None).await?;
            acked.blobs.push(img.ld.clone());
            reg.monolithic_upload(
                &repo,
                &img.cd,
                Some(img.config.len() as u64),
                body(&img.config),
                None,
            )
            .await?;
            acked.blobs.push(img.cd.clone());
            reg.put_manifest(
                &repo,
                &Reference::Tag(tag()),
                Some(OCI_MANIFEST),
                Bytes::from(img.manifest.clone()),
                None,
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
                Some(img.manifest.len() as u64)
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
    async fn clean_push_log(kind: Kind) -> Vec<&'static str> {
        let b = Backend::new(kind);
        let plan = FaultPlan::new();
        let (acked, r) = push(&faulty(&b.open(), &plan), &image()).await;
        r.unwrap();
        assert!(acked.manifest);
        plan.log()
    }

    /// A crash at every operation of a push: whatever was acknowledged is
    /// there after a restart, nothing partial is, and the push then succeeds.
    async fn crash_sweep(kind: Kind) {
        let img = image();
        let total = clean_push_log(kind).await.len() as u64;
        assert!(total > 10, "{total}");
        for n in 0..total {
            let b = Backend::new(kind);
            let plan = FaultPlan::new();
            plan.fail_from(n);
            let acked = {
                let (acked, r) = push(&faulty(&b.open(), &plan), &img).await;
                assert!(r.is_err(), "{kind:?}: a push with a crash at {n} succeeded");
                acked
            };
            let what = format!(
                "{kind:?}, crash at operation {n} ({})",
                plan.log()[n as usize]
            );
            let s = b.open();
            check(&s, &img, &acked, &what).await;
            let (acked, r) = push(&registry(&s), &img).await;
            r.unwrap_or_else(|e| panic!("{what}: the push after the restart failed: {e}"));
            check(&s, &img, &acked, &what).await;
        }
    }

    /// One failed operation at every point of a push: the push fails
    /// cleanly, nothing partial is visible, and pushing again succeeds
    /// without a restart.
    async fn failure_sweep(kind: Kind) {
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
    async fn truncated_writes(kind: Kind) {
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
    async fn truncated_reads(kind: Kind) {
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
    async fn stalled_writes(kind: Kind) {
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
            plain
                .delete_manifest(&repo, &Reference::Digest(img.md.clone()), None)
                .await
                .unwrap();
            for d in [&img.ld, &img.cd] {
                plain.delete_blob(&repo, d, None).await.unwrap();
            }
        }
    }

    #[tokio::test]
    async fn fs_a_crash_anywhere_in_a_push_loses_nothing_acknowledged() {
        crash_sweep(Kind::Fs).await;
    }

    #[tokio::test]
    async fn s3_a_crash_anywhere_in_a_push_loses_nothing_acknowledged() {
        crash_sweep(Kind::S3).await;
    }

    #[tokio::test]
    async fn fs_a_failure_anywhere_in_a_push_leaves_nothing_partial() {
        failure_sweep(Kind::Fs).await;
    }

    #[tokio::test]
    async fn s3_a_failure_anywhere_in_a_push_leaves_nothing_partial() {
        failure_sweep(Kind::S3).await;
    }

    #[tokio::test]
    async fn fs_truncated_writes_never_publish_wrong_bytes() {
        truncated_writes(Kind::Fs).await;
    }

    #[tokio::test]
    async fn s3_truncated_writes_never_publish_wrong_bytes() {
        truncated_writes(Kind::S3).await;
    }

    #[tokio::test]
    async fn fs_a_truncated_read_never_ends_cleanly() {
        truncated_reads(Kind::Fs).await;
    }

    #[tokio::test]
    async fn s3_a_truncated_read_never_ends_cleanly() {
        truncated_reads(Kind::S3).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fs_readers_never_see_a_write_half_done() {
        stalled_writes(Kind::Fs).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn s3_readers_never_see_a_write_half_done() {
        stalled_writes(Kind::S3).await;
    }
}
