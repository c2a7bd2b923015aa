//! A local-disk hot tier in front of a remote blob store (S3): blobs read
//! through it are copied to local disk in the background, verified against
//! their digest while they are copied, and served from disk afterwards. Its
//! size is bounded; over the bound the least recently read blobs leave the
//! tier (never the remote store).
//!
//! The remote store stays the authority: `stat` asks it (a blob deleted
//! remotely is gone for every replica), writes and deletions go to it, and
//! a deletion also drops the local copy. The local copies are an
//! [`FsStore`], so they are published by rename only after verification,
//! and survive restarts (they are re-indexed at start, oldest first).
//!
//! At most [`MAX_COPIES`] copies run at once; a read that would start one
//! more is served from the remote store without a copy (a later read copies
//! it). The copies are tracked: [`HotTier::shutdown`] cancels them and
//! waits until every one has ended.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::fs::FsStore;
use super::{BlobStore, ByteStream, FillStore, Result};
use crate::oci::Digest;

/// Most copies from the remote store in flight at once.
pub const MAX_COPIES: usize = 4;

#[derive(Default)]
struct State {
    /// Local blobs: size and last read (a logical clock).
    entries: HashMap<Digest, (u64, u64)>,
    total: u64,
    clock: u64,
    /// Copies in progress.
    filling: HashSet<Digest>,
}

/// Counters of the hot tier.
#[derive(Debug, Default, Clone)]
pub struct HotMetrics {
    pub hits: Counter,
    pub misses: Counter,
    pub evictions: Counter,
    /// Copies that did not match their digest (nothing was kept).
    pub rejected: Counter,
}

pub struct HotTier {
    remote: Arc<dyn BlobStore>,
    local: Arc<FsStore>,
    max: u64,
    state: Mutex<State>,
    pub metrics: HotMetrics,
    /// The copies in flight, and what stops them.
    copies: TaskTracker,
    stop: CancellationToken,
}

impl HotTier {
    /// A tier of at most `max` bytes in `dir` in front of `remote`.
    pub fn open(remote: Arc<dyn BlobStore>, dir: PathBuf, max: u64) -> std::io::Result<HotTier> {
        let local = FsStore::open(&dir)?;
        // Re-index what a previous process left, oldest read first.
        let mut found = Vec::new();
        for algo in std::fs::read_dir(dir.join("blobs"))? {
            let algo = algo?;
            let algo_name = algo.file_name().to_string_lossy().into_owned();
            for prefix in std::fs::read_dir(algo.path())? {
                for blob in std::fs::read_dir(prefix?.path())? {
                    let blob = blob?;
                    let name = blob.file_name().to_string_lossy().into_owned();
                    let meta = blob.metadata()?;
                    if let Ok(d) = format!("{algo_name}:{name}").parse::<Digest>() {
                        let t = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                        found.push((t, d, meta.len()));
                    }
                }
            }
        }
        found.sort();
        let mut state = State::default();
        for (_, d, size) in found {
            state.clock += 1;
            state.total += size;
            state.entries.insert(d, (size, state.clock));
        }
        Ok(HotTier {
            remote,
            local: Arc::new(local),
            max,
            state: Mutex::new(state),
            metrics: HotMetrics::default(),
            copies: TaskTracker::new(),
            stop: CancellationToken::new(),
        })
    }

    /// Cancels the copies in flight (nothing half-copied is kept) and
    /// waits until all have ended; no copy starts afterwards.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.copies.close();
        self.copies.wait().await;
    }

    /// Copies in flight.
    pub fn copies_in_flight(&self) -> usize {
        self.lock().filling.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `digest` is in the tier (marks it read).
    fn touch(&self, digest: &Digest) -> bool {
        let mut st = self.lock();
        st.clock += 1;
        let now = st.clock;
        match st.entries.get_mut(digest) {
            Some(e) => {
                e.1 = now;
                true
            }
            None => false,
        }
    }

    /// Bytes held locally.
    pub fn size(&self) -> u64 {
        self.lock().total
    }

    /// Whether `digest` is held locally.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.lock().entries.contains_key(digest)
    }

    /// Copies `digest` (of `size` bytes) from the remote store to local
    /// disk, verifying it, then evicts down to the bound. In the
    /// background; at most one copy per digest, at most [`MAX_COPIES`] in
    /// all (none is started beyond), none after shutdown.
    fn start_fill(self: &Arc<Self>, digest: &Digest, size: u64) {
        if size > self.max || self.stop.is_cancelled() {
            return;
        }
        {
            let mut st = self.lock();
            if st.entries.contains_key(digest)
                || st.filling.len() >= MAX_COPIES
                || !st.filling.insert(digest.clone())
            {
                return;
            }
        }
        let me = self.clone();
        let digest = digest.clone();
        self.copies.spawn(async move {
            let outcome = me.fill(&digest).await;
            me.finish_fill(&digest, outcome);
            me.evict().await;
        });
    }

    fn finish_fill(&self, digest: &Digest, outcome: Result<u64>) {
        let me = self;
        let digest = digest.clone();
        {
            let mut st = me.lock();
            st.filling.remove(&digest);
            match outcome {
                Ok(size) => {
                    st.clock += 1;
                    let now = st.clock;
                    if st.entries.insert(digest.clone(), (size, now)).is_none() {
                        st.total += size;
                    }
                }
                Err(e) => {
                    if matches!(e, super::StorageError::DigestMismatch { .. }) {
                        me.metrics.rejected.inc();
                    }
                    tracing::warn!(%digest, error = %e, "hot tier: copy failed; nothing kept");
                }
            }
        }
    }

    /// One copy; at shutdown it stops where it is and removes its staging.
    async fn fill(&self, digest: &Digest) -> Result<u64> {
        let stopped = || super::StorageError::Io(std::io::Error::other("shutting down"));
        let mut w = self.local.begin_fill().await?;
        let mut stream = tokio::select! {
            s = self.remote.read(digest, None) => match s {
                Ok(s) => s,
                Err(e) => {
                    w.abort().await;
                    return Err(e);
                }
            },
            () = self.stop.cancelled() => {
                w.abort().await;
                return Err(stopped());
            }
        };
        loop {
            let chunk = tokio::select! {
                c = stream.next() => c,
                () = self.stop.cancelled() => {
                    w.abort().await;
                    return Err(stopped());
                }
            };
            match chunk {
                None => break,
                Some(Ok(c)) => {
                    if let Err(e) = w.write(&c).await {
                        w.abort().await;
                        return Err(e);
                    }
                }
                Some(Err(e)) => {
                    w.abort().await;
                    return Err(e.into());
                }
            }
        }
        // Verified: published locally only if the bytes hash to `digest`.
        w.commit(digest).await
    }

    /// Drops the least recently read local copies until under the bound.
    async fn evict(&self) {
        loop {
            let victim = {
                let st = self.lock();
                if st.total <= self.max {
                    return;
                }
                st.entries
                    .iter()
                    .min_by_key(|(_, (_, t))| *t)
                    .map(|(d, (s, _))| (d.clone(), *s))
            };
            let Some((digest, size)) = victim else {
                return;
            };
            {
                let mut st = self.lock();
                if st.entries.remove(&digest).is_some() {
                    st.total -= size;
                }
            }
            // A response streaming the file keeps its mapping (unlink only).
            if let Err(e) = self.local.delete(&digest).await {
                tracing::warn!(%digest, error = %e, "hot tier: could not remove a copy");
            }
            self.metrics.evictions.inc();
        }
    }

    async fn drop_local(&self, digest: &Digest) -> Result<()> {
        let removed = {
            let mut st = self.lock();
            st.entries.remove(digest)
        };
        if let Some((size, _)) = removed {
            self.lock().total -= size;
        }
        self.local.delete(digest).await?;
        Ok(())
    }
}

/// The tier as a [`BlobStore`] (it needs itself in an `Arc` to start
/// background copies).
pub struct HotBlobs(pub Arc<HotTier>);

#[async_trait]
impl BlobStore for HotBlobs {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        self.0.remote.stat(digest).await
    }

    async fn read(&self, digest: &Digest, range: Option<Range<u64>>) -> Result<ByteStream> {
        let t = &self.0;
        if t.touch(digest) {
            match t.local.read(digest, range.clone()).await {
                Ok(s) => {
                    t.metrics.hits.inc();
                    return Ok(s);
                }
                // Evicted in between: read remotely.
                Err(super::StorageError::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        t.metrics.misses.inc();
        let stream = t.remote.read(digest, range).await?;
        if let Some(size) = t.remote.stat(digest).await? {
            t.start_fill(digest, size);
        }
        Ok(stream)
    }

    async fn put(&self, digest: &Digest, bytes: Bytes) -> Result<()> {
        self.0.remote.put(digest, bytes).await
    }

    async fn delete(&self, digest: &Digest) -> Result<bool> {
        self.0.drop_local(digest).await?;
        self.0.remote.delete(digest).await
    }

    async fn list(&self) -> Result<Vec<Digest>> {
        self.0.remote.list().await
    }

    async fn quarantine(&self, digest: &Digest) -> Result<()> {
        self.0.drop_local(digest).await?;
        self.0.remote.quarantine(digest).await
    }
}

impl crate::metrics::Report for HotMetrics {
    fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "hot_tier_hits",
            "Blob reads served from the local hot tier",
            self.hits.clone(),
        );
        r.register(
            "hot_tier_misses",
            "Blob reads served from the bucket (then copied to the hot tier)",
            self.misses.clone(),
        );
        r.register(
            "hot_tier_evictions",
            "Copies dropped from the hot tier to keep its size",
            self.evictions.clone(),
        );
        r.register(
            "hot_tier_rejected",
            "Copies into the hot tier that did not match their digest (nothing kept)",
            self.rejected.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A remote store whose reads send one chunk and then stall, counting
    /// the streams still open.
    struct Stalling {
        inner: FsStore,
        open: Arc<AtomicUsize>,
    }

    struct Open(Arc<AtomicUsize>);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[async_trait]
    impl BlobStore for Stalling {
        async fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
            self.inner.stat(digest).await
        }
        async fn read(&self, _: &Digest, _: Option<Range<u64>>) -> Result<ByteStream> {
            self.open.fetch_add(1, Ordering::SeqCst);
            let open = Open(self.open.clone());
            let first = futures::stream::once(async { Ok(Bytes::from_static(b"x")) });
            Ok(first
                .chain(futures::stream::pending())
                .map(move |c| {
                    let _ = &open;
                    c
                })
                .boxed())
        }
        async fn put(&self, digest: &Digest, bytes: Bytes) -> Result<()> {
            self.inner.put(digest, bytes).await
        }
        async fn delete(&self, digest: &Digest) -> Result<bool> {
            self.inner.delete(digest).await
        }
        async fn list(&self) -> Result<Vec<Digest>> {
            self.inner.list().await
        }
        async fn quarantine(&self, digest: &Digest) -> Result<()> {
            self.inner.quarantine(digest).await
        }
    }

    async fn until(what: &str, cond: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !cond() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("never: {what}"));
    }

    /// Reads of many blobs whose copies cannot finish start at most
    /// MAX_COPIES copies; shutdown cancels them, waits for them, keeps
    /// nothing half-copied, and no copy starts after it.
    #[tokio::test]
    async fn copies_are_bounded_and_shutdown_ends_them() {
        let dir = tempfile::tempdir().unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let remote = Arc::new(Stalling {
            inner: FsStore::open(dir.path().join("remote")).unwrap(),
            open: open.clone(),
        });
        let mut digests = Vec::new();
        for i in 0..10u8 {
            let bytes = Bytes::from(vec![i; 1000]);
            let d = Digest::sha256_of(&bytes);
            remote.put(&d, bytes).await.unwrap();
            digests.push(d);
        }
        let hot_dir = dir.path().join("hot");
        let tier = Arc::new(HotTier::open(remote, hot_dir.clone(), 1 << 20).unwrap());
        let blobs = HotBlobs(tier.clone());
        for d in &digests {
            drop(blobs.read(d, None).await.unwrap());
        }
        // Whether a read starts a copy is decided within the read.
        assert_eq!(tier.copies_in_flight(), MAX_COPIES);
        assert_eq!(tier.copies.len(), MAX_COPIES, "tasks tracked");
        until("the copies read the remote store", || {
            open.load(Ordering::SeqCst) == MAX_COPIES
        })
        .await;

        tokio::time::timeout(Duration::from_secs(10), tier.shutdown())
            .await
            .expect("shutdown waits only for the cancelled copies");
        assert_eq!(tier.copies_in_flight(), 0);
        assert_eq!(open.load(Ordering::SeqCst), 0, "every copy's read ended");
        assert!(digests.iter().all(|d| !tier.contains(d)));
        let staging: Vec<_> = std::fs::read_dir(hot_dir.join("uploads"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(staging.is_empty(), "half copies left: {staging:?}");
        drop(blobs.read(&digests[0], None).await.unwrap());
        assert_eq!(tier.copies_in_flight(), 0, "no copy after shutdown");
        assert!(tier.copies.is_empty());
    }
}
