//! The cache budget: `cache.max_size` bounds the bytes of blobs pulled
//! through the cache; over budget, the least recently used are evicted.
//!
//! What is never evicted:
//! - pushed content: a push pins its blob in the metadata store before it
//!   publishes or links it, and the evictor deletes a blob only under an
//!   eviction claim that the metadata store refuses for a pinned blob; a
//!   pin waits while a claim stands (the claim ends once the blob is
//!   deleted), so a push on any replica either pins first and the blob
//!   is never deleted, or pins after the delete and publishes the blob
//!   again (see `MetaStore::pin_blob` and ARCHITECTURE.md, invariant 10);
//! - a blob held by a [`Hold`]: every response streaming it, every fill in
//!   progress and every push committing or linking it holds it. Taking a
//!   hold waits while the blob is being evicted, and the evictor only starts
//!   on a blob nobody holds, so the two never overlap.
//!
//! Only blobs that fills published are budgeted (manifests are metadata of
//! a few KiB and stay). Sizes and access times live in the metadata store,
//! so the budget survives restarts; access times are flushed in batches.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::oci::Digest;
use crate::storage::{BlobStore, CacheEntry, EvictionClaim, MetaStore, Result, StorageError};

/// How often the evictor wakes on its own (to flush access times, and to
/// retry blobs that were held at its last pass).
const PASS_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct State {
    entries: HashMap<Digest, CacheEntry>,
    total: u64,
    /// Holds by digest.
    held: HashMap<Digest, u32>,
    /// Blobs being deleted right now: no new hold until they are gone.
    evicting: HashSet<Digest>,
    /// Digests whose access time changed since the last flush.
    dirty: HashSet<Digest>,
    /// Last access stamp given out (strictly increasing).
    clock: u64,
}

impl State {
    /// A strictly increasing microsecond stamp, so that the order of
    /// accesses is exact even within one clock tick.
    fn stamp(&mut self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        self.clock = now.max(self.clock + 1);
        self.clock
    }
}

/// Metrics of the budget.
#[derive(Debug, Default, Clone)]
pub struct BudgetMetrics {
    pub size_bytes: Gauge,
    pub entries: Gauge,
    pub evictions: Counter,
    pub evicted_bytes: Counter,
}

/// What became of a blob the evictor chose.
enum Evicted {
    Deleted,
    /// A push pinned it: it is kept and leaves the budget.
    Pinned,
    /// Another replica's evictor has claimed it: it stays budgeted here.
    Busy,
}

pub struct Budget {
    max: u64,
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    state: Mutex<State>,
    /// Woken when a hold is released or an eviction finishes.
    released: Notify,
    /// Woken when the budget may be exceeded.
    over: Notify,
    pub metrics: BudgetMetrics,
}

/// Keeps a blob from being evicted while it is alive.
pub struct Hold {
    budget: Arc<Budget>,
    digest: Digest,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut st = self.budget.lock();
        if let Some(n) = st.held.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                st.held.remove(&self.digest);
            }
        }
        drop(st);
        self.budget.released.notify_waiters();
    }
}

/// What `cache stats` shows of the budget.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BudgetStats {
    pub max_size_bytes: u64,
    pub size_bytes: u64,
    pub blobs: usize,
    pub held: usize,
}

impl Budget {
    /// Loads the budgeted entries from `meta`.
    pub async fn open(
        max: u64,
        blobs: Arc<dyn BlobStore>,
        meta: Arc<dyn MetaStore>,
    ) -> Result<Arc<Budget>> {
        let mut state = State::default();
        for (digest, entry) in meta.cache_entries().await? {
            state.total += entry.size;
            state.clock = state.clock.max(entry.accessed);
            state.entries.insert(digest, entry);
        }
        let metrics = BudgetMetrics::default();
        metrics.size_bytes.set(state.total as i64);
        metrics.entries.set(state.entries.len() as i64);
        Ok(Arc::new(Budget {
            max,
            blobs,
            meta,
            state: Mutex::new(state),
            released: Notify::new(),
            over: Notify::new(),
            metrics,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish_size(&self, st: &State) {
        self.metrics.size_bytes.set(st.total as i64);
        self.metrics.entries.set(st.entries.len() as i64);
    }

    /// Holds `digest` (waiting while it is being evicted) and marks it used.
    pub async fn hold(self: &Arc<Self>, digest: &Digest) -> Hold {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            {
                let mut st = self.lock();
                if !st.evicting.contains(digest) {
                    *st.held.entry(digest.clone()).or_default() += 1;
                    let stamp = st.stamp();
                    if let Some(e) = st.entries.get_mut(digest) {
                        e.accessed = stamp;
                        st.dirty.insert(digest.clone());
                    }
                    return Hold {
                        budget: self.clone(),
                        digest: digest.clone(),
                    };
                }
            }
            released.await;
        }
    }

    /// Budgets a blob a fill has just published.
    pub async fn add(&self, digest: &Digest, size: u64) -> Result<()> {
        let entry = {
            let mut st = self.lock();
            let accessed = st.stamp();
            let entry = CacheEntry { size, accessed };
            if let Some(old) = st.entries.insert(digest.clone(), entry) {
                st.total -= old.size;
            }
            st.total += size;
            st.dirty.remove(digest);
            self.publish_size(&st);
            entry
        };
        self.meta
            .put_cache_entries(&[(digest.clone(), entry)])
            .await?;
        if self.over_budget() {
            self.over.notify_one();
        }
        Ok(())
    }

    /// Takes a blob out of the budget because a push pinned it: pushed
    /// content is neither counted nor evicted.
    pub async fn pinned(&self, digest: &Digest) -> Result<()> {
        let was = {
            let mut st = self.lock();
            let was = st.entries.remove(digest);
            if let Some(e) = was {
                st.total -= e.size;
                st.dirty.remove(digest);
                self.publish_size(&st);
            }
            was
        };
        if was.is_some() {
            self.meta.delete_cache_entry(digest).await?;
        }
        Ok(())
    }

    fn over_budget(&self) -> bool {
        self.lock().total > self.max
    }

    pub fn stats(&self) -> BudgetStats {
        let st = self.lock();
        BudgetStats {
            max_size_bytes: self.max,
            size_bytes: st.total,
            blobs: st.entries.len(),
            held: st.held.len(),
        }
    }

    /// Writes changed access times to the metadata store.
    pub async fn flush(&self) -> Result<()> {
        let batch: Vec<(Digest, CacheEntry)> = {
            let mut st = self.lock();
            let dirty = std::mem::take(&mut st.dirty);
            dirty
                .into_iter()
                .filter_map(|d| st.entries.get(&d).map(|e| (d, *e)))
                .collect()
        };
        if batch.is_empty() {
            return Ok(());
        }
        self.meta.put_cache_entries(&batch).await
    }

    /// Evicts least recently used blobs until the budget holds (or nothing
    /// evictable is left). `filling` tells whether a fill is staging a
    /// digest. Returns the number of blobs evicted.
    pub async fn evict(&self, filling: &(dyn Fn(&Digest) -> bool + Sync)) -> Result<usize> {
        if !self.over_budget() {
            return Ok(0);
        }
        let mut order: Vec<(u64, Digest)> = {
            let st = self.lock();
            st.entries
                .iter()
                .map(|(d, e)| (e.accessed, d.clone()))
                .collect()
        };
        order.sort_unstable();
        let mut evicted = 0;
        for (seen, digest) in order {
            // Claim it: only if still budgeted, untouched since the snapshot,
            // and held by nobody.
            let entry = {
                let mut st = self.lock();
                if st.total <= self.max {
                    break;
                }
                let Some(entry) = st.entries.get(&digest).copied() else {
                    continue;
                };
                if entry.accessed != seen || st.held.contains_key(&digest) || filling(&digest) {
                    continue;
                }
                st.entries.remove(&digest);
                st.total -= entry.size;
                st.dirty.remove(&digest);
                st.evicting.insert(digest.clone());
                self.publish_size(&st);
                entry
            };
            let outcome = self.evict_one(&digest).await;
            {
                let mut st = self.lock();
                st.evicting.remove(&digest);
                // Pinned meanwhile: not budgeted any more. Failed, or
                // another replica's evictor has it (and may yet keep it):
                // still budgeted here.
                if matches!(outcome, Err(_) | Ok(Evicted::Busy)) {
                    st.total += entry.size;
                    st.entries.insert(digest.clone(), entry);
                    self.publish_size(&st);
                }
            }
            self.released.notify_waiters();
            match outcome {
                Ok(Evicted::Deleted) => {
                    evicted += 1;
                    self.metrics.evictions.inc();
                    self.metrics.evicted_bytes.inc_by(entry.size);
                    tracing::debug!(%digest, size = entry.size, "evicted from the cache");
                }
                Ok(Evicted::Pinned | Evicted::Busy) => {}
                Err(e) => {
                    tracing::warn!(%digest, error = %e, "evicting a cached blob failed");
                    return Err(e);
                }
            }
        }
        Ok(evicted)
    }

    /// Deletes one blob unless a push pinned it, under an eviction claim
    /// in the metadata store (pushes on every replica wait for it before
    /// they pin).
    async fn evict_one(&self, digest: &Digest) -> Result<Evicted> {
        let (token, deadline) = match self.meta.claim_eviction(digest).await? {
            EvictionClaim::Pinned => {
                self.meta.delete_cache_entry(digest).await?;
                return Ok(Evicted::Pinned);
            }
            EvictionClaim::Busy => return Ok(Evicted::Busy),
            EvictionClaim::Claimed { token, deadline } => (token, deadline),
        };
        let too_late = || {
            Err(StorageError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "deleting the blob took longer than its eviction claim allows",
            )))
        };
        let deleted = match deadline {
            None => self.blobs.delete(digest).await,
            // The time left is measured now, after the claim was written:
            // none left (a slow claim write), no delete is even started.
            Some(d) => match d.duration_since(std::time::SystemTime::now()) {
                Ok(left) if !left.is_zero() => {
                    match tokio::time::timeout(left, self.blobs.delete(digest)).await {
                        Ok(r) => r,
                        Err(_) => too_late(),
                    }
                }
                _ => too_late(),
            },
        };
        if let Err(e) = deleted {
            // Whether a delete still lands is unknown with a deadline: the
            // claim is left to expire, never ended early. Without one (a
            // single process), nothing is in flight any more.
            if deadline.is_none() {
                self.meta.end_eviction(digest, &token).await?;
            }
            return Err(e);
        }
        self.meta.end_eviction(digest, &token).await?;
        self.meta.delete_cache_entry(digest).await?;
        Ok(Evicted::Deleted)
    }

    /// Runs until `stop`: evicts whenever the budget is exceeded, and
    /// flushes access times.
    pub async fn run(
        self: Arc<Self>,
        filling: impl Fn(&Digest) -> bool + Send + Sync + 'static,
        stop: CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = self.over.notified() => {}
                () = tokio::time::sleep(PASS_INTERVAL) => {}
                // Still over budget because everything evictable was held:
                // look again as soon as a hold is released.
                () = self.released.notified(), if self.over_budget() => {}
                () = stop.cancelled() => {
                    if let Err(e) = self.flush().await {
                        tracing::warn!(error = %e, "saving cache access times failed");
                    }
                    return;
                }
            }
            match self.evict(&filling).await {
                Ok(0) => {}
                Ok(n) => {
                    let st = self.stats();
                    tracing::info!(
                        evicted = n,
                        size = st.size_bytes,
                        max = st.max_size_bytes,
                        "cache over budget: evicted least recently used blobs"
                    );
                }
                Err(_) => {}
            }
            if let Err(e) = self.flush().await {
                tracing::warn!(error = %e, "saving cache access times failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::RepoName;
    use crate::storage::fs::FsStore;
    use crate::storage::meta::RedbMeta;

    struct Setup {
        _dir: tempfile::TempDir,
        store: Arc<FsStore>,
        meta: Arc<RedbMeta>,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FsStore::open(dir.path()).unwrap());
        let meta = Arc::new(RedbMeta::open(&dir.path().join("meta.redb")).unwrap());
        Setup {
            _dir: dir,
            store,
            meta,
        }
    }

    /// Stores `n` bytes as a cached blob and budgets it.
    async fn cached(s: &Setup, budget: &Budget, seed: u8, n: usize) -> Digest {
        let data = vec![seed; n];
        let d = Digest::sha256_of(&data);
        s.store.put(&d, data.into()).await.unwrap();
        let repo: RepoName = "up/app".parse().unwrap();
        s.meta
            .link_blob(&repo, crate::storage::RepoKind::Cached, &d)
            .await
            .unwrap();
        budget.add(&d, n as u64).await.unwrap();
        d
    }

    async fn exists(s: &Setup, d: &Digest) -> bool {
        s.store.stat(d).await.unwrap().is_some()
    }

    fn none(_: &Digest) -> bool {
        false
    }

    #[tokio::test]
    async fn evicts_least_recently_used_until_within_budget() {
        let s = setup();
        let b = Budget::open(250, s.store.clone(), s.meta.clone())
            .await
            .unwrap();
        let a = cached(&s, &b, 1, 100).await;
        let c = cached(&s, &b, 2, 100).await;
        drop(b.hold(&a).await); // a used after c: c is now the oldest
        let d = cached(&s, &b, 3, 100).await;
        assert_eq!(b.stats().size_bytes, 300);
        assert_eq!(b.evict(&none).await.unwrap(), 1);
        assert!(!exists(&s, &c).await, "the least recently used went");
        assert!(exists(&s, &a).await && exists(&s, &d).await);
        assert_eq!(b.stats().size_bytes, 200);
        assert_eq!(b.metrics.evictions.get(), 1);
        assert_eq!(b.metrics.evicted_bytes.get(), 100);
        assert_eq!(b.evict(&none).await.unwrap(), 0, "within budget");
    }

    #[tokio::test]
    async fn held_filling_and_pinned_blobs_are_never_evicted() {
        let s = setup();
        let b = Budget::open(50, s.store.clone(), s.meta.clone())
            .await
            .unwrap();
        let held = cached(&s, &b, 1, 100).await;
        let filling = cached(&s, &b, 2, 100).await;
        let pinned = cached(&s, &b, 3, 100).await;
        // A push links the third into a hosted repository.
        s.meta
            .link_blob(
                &"mine/app".parse().unwrap(),
                crate::storage::RepoKind::Hosted,
                &pinned,
            )
            .await
            .unwrap();
        let hold = b.hold(&held).await;
        let f = filling.clone();
        let n = b.evict(&move |d: &Digest| d == &f).await.unwrap();
        assert_eq!(n, 0);
        assert!(exists(&s, &held).await, "held: kept");
        assert!(exists(&s, &filling).await, "filling: kept");
        assert!(exists(&s, &pinned).await, "pinned: kept");
        assert_eq!(
            b.stats().size_bytes,
            200,
            "the pinned blob left the budget, the others stay budgeted"
        );
        drop(hold);
        assert_eq!(b.evict(&none).await.unwrap(), 2);
        assert!(!exists(&s, &held).await && !exists(&s, &filling).await);
        assert!(exists(&s, &pinned).await);
        assert_eq!(b.stats().size_bytes, 0);
    }

    #[tokio::test]
    async fn a_hold_waits_for_an_eviction_in_progress() {
        let s = setup();
        let b = Budget::open(0, s.store.clone(), s.meta.clone())
            .await
            .unwrap();
        let d = cached(&s, &b, 1, 10).await;
        // Simulate the evictor's claim, then release it from another task.
        b.lock().evicting.insert(d.clone());
        let waiter = {
            let b = b.clone();
            let d = d.clone();
            tokio::spawn(async move {
                let _h = b.hold(&d).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "no hold while evicting");
        b.lock().evicting.remove(&d);
        b.released.notify_waiters();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the hold is granted once the eviction ends")
            .unwrap();
    }

    #[tokio::test]
    async fn the_budget_and_access_order_survive_a_restart() {
        let s = setup();
        let b = Budget::open(150, s.store.clone(), s.meta.clone())
            .await
            .unwrap();
        let a = cached(&s, &b, 1, 100).await;
        let c = cached(&s, &b, 2, 100).await;
        drop(b.hold(&a).await);
        b.flush().await.unwrap();
        drop(b);
        let b = Budget::open(150, s.store.clone(), s.meta.clone())
            .await
            .unwrap();
        assert_eq!(b.stats().size_bytes, 200);
        assert_eq!(b.stats().blobs, 2);
        assert_eq!(b.evict(&none).await.unwrap(), 1);
        assert!(exists(&s, &a).await, "a was used last, before the restart");
        assert!(!exists(&s, &c).await);
    }
}
