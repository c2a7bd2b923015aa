//! A fault-injecting wrapper around the storage traits, to prove the
//! invariants under failure: [`Faulty`] wraps a [`BlobStore`], an
//! [`UploadStore`], a [`MetaStore`] or a [`FillStore`] and consults one
//! shared, scriptable [`FaultPlan`] on every call.
//!
//! Every call is one operation, numbered from 0 in the order calls arrive.
//! The plan can fail one operation or every operation from one on (a crash:
//! nothing after it reaches the store) with an I/O error, or let one reach
//! the store and lose its answer before failing the rest (a crash after the
//! work, before the acknowledgement); truncate the bytes
//! of one operation (a write that silently keeps only the first `k` bytes
//! while reporting success, a read whose stream ends cleanly after `k`
//! bytes); and stall the next call of a named operation, before or after it
//! reached the store, at a [`Gate`] the test opens. No fault waits on time.
//!
//! `tests/faults.rs` drives the registry over it on every backend.

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
    lose_answer: Option<u64>,
    truncate: HashMap<u64, usize>,
    stalls: HashMap<(&'static str, Stall), Gate>,
}

/// What one operation was told to do.
struct Entered {
    n: u64,
    op: &'static str,
    truncate: Option<usize>,
    after: Option<Gate>,
    lose_answer: bool,
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

    /// Operation `n` reaches the store, but its caller gets an I/O error
    /// instead of the answer, and every later operation fails: the process
    /// died after the store did the work, before it was acknowledged.
    pub fn crash_after(&self, n: u64) {
        let mut s = self.state();
        s.lose_answer = Some(n);
        s.fail_from = Some(n + 1);
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
        s.lose_answer = None;
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
                op,
                truncate: s.truncate.get(&n).copied(),
                after: s.stalls.get(&(op, Stall::After)).cloned(),
                lose_answer: s.lose_answer == Some(n),
            };
            (entered, s.stalls.get(&(op, Stall::Before)).cloned(), fail)
        };
        if let Some(gate) = before {
            gate.pass().await;
        }
        if fail {
            return Err(injected(entered.n, op));
        }
        Ok(entered)
    }
}

fn injected(n: u64, op: &str) -> StorageError {
    StorageError::Io(io::Error::other(format!(
        "injected fault at operation {n} ({op})"
    )))
}

impl Entered {
    async fn leave<T>(self, result: Result<T>) -> Result<T> {
        if let Some(gate) = self.after {
            gate.pass().await;
        }
        if self.lose_answer {
            return Err(injected(self.n, self.op));
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
    async fn staging_space(&self) -> Result<Option<u64>> {
        self.inner.staging_space().await
    }

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
            let _ = e.leave(Ok(())).await;
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
    async fn pin_blob(&self, digest: &Digest) -> Result<()> {
        meta_op!(self, "meta.pin_blob", self.inner.pin_blob(digest))
    }
    async fn claim_eviction(&self, digest: &Digest) -> Result<super::EvictionClaim> {
        meta_op!(
            self,
            "meta.claim_eviction",
            self.inner.claim_eviction(digest)
        )
    }
    async fn end_eviction(&self, digest: &Digest, token: &str) -> Result<()> {
        meta_op!(
            self,
            "meta.end_eviction",
            self.inner.end_eviction(digest, token)
        )
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
