//! Fill coalescing: one upstream fetch per digest, however many clients ask
//! and from however many repositories. The fetch runs detached from every
//! client, appends to a staged blob while hashing, and advances a watermark;
//! every waiter streams from the staged bytes up to the watermark as it
//! grows. At the end the digest is verified: match → the waiters get their
//! last bytes at once, then the blob is made durable and published atomically
//! (the fill takes new waiters until it is); mismatch → nothing published,
//! and every waiter's stream ends in an error (its response is aborted,
//! never cleanly ended).
//!
//! Explicit states (after pingora's cache lock): connecting, streaming,
//! verified, done, failed; a waiter also gives up on a wait timeout (no progress), a fill
//! older than the age timeout takes no new waiters, and a fill whose task
//! vanished (its status sender dropped without a final state) is reported
//! as abandoned and replaced by the next request.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use prometheus_client::metrics::counter::Counter;

use super::budget::Budget;
use crate::oci::{Digest, RepoName};
use crate::storage::{
    ByteStream, FillLeases, FillStore, LeaseState, MetaStore, RepoKind, StagedReader,
};
use crate::upstream::{UpstreamClient, UpstreamError};

/// How many times a fill resumes (with a Range request) after the upstream
/// connection breaks.
const MAX_RESUMES: u32 = 5;
/// Chunk size served to waiters from the staged bytes.
const SERVE_CHUNK: usize = 512 * 1024;
/// Cluster-wide fills: the size of the parts the lease holder publishes,
/// and how often the other replicas look for new parts.
const CLUSTER_PART: usize = 8 * 1024 * 1024;
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// Fills shared by the replicas over one bucket.
struct Cluster {
    leases: Arc<dyn FillLeases>,
    /// How long a lease lasts unless renewed.
    ttl: Duration,
    /// This process, as a lease holder.
    holder: String,
}

/// Why a fill failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FillFailure {
    /// Upstream does not have the blob.
    NotFound,
    /// Upstream unreachable, refusing, or sending broken or wrong bytes.
    Failed(Arc<str>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Connecting,
    Streaming,
    /// Every byte is staged and matches the digest: waiters may finish;
    /// the blob is being made durable and published.
    Verified,
    /// Published. (When publishing fails after `Verified`, the phase
    /// stays `Verified`: the waiters keep their verified bytes, and the
    /// next request, finding no fill, fetches again.)
    Done,
    Failed(FillFailure),
}

impl Phase {
    /// Whether the staged bytes are complete and verified.
    pub fn complete(&self) -> bool {
        matches!(self, Phase::Verified | Phase::Done)
    }
}

/// What every waiter observes.
#[derive(Debug, Clone)]
pub struct FillStatus {
    /// The blob's size, once upstream has said it.
    pub total: Option<u64>,
    /// Bytes staged and readable.
    pub written: u64,
    pub phase: Phase,
}

/// One fill in progress (or just finished).
pub struct Fill {
    pub digest: Digest,
    status: watch::Receiver<FillStatus>,
    reader: Arc<dyn StagedReader>,
    started: Instant,
    /// Cached repositories to link the blob into once it is published.
    repos: Mutex<Vec<RepoName>>,
}

/// Counters the fills keep (read by metrics and `cache stats`).
#[derive(Debug, Default)]
pub struct FillCounters {
    pub started: Counter,
    pub coalesced: Counter,
    pub failed: Counter,
    pub corrupt: Counter,
    pub upstream_bytes: Counter,
    /// Fills whose bytes came from another replica's fill (no upstream
    /// request).
    pub followed: Counter,
}

pub struct Fills {
    store: Arc<dyn FillStore>,
    meta: Arc<dyn MetaStore>,
    budget: Arc<Budget>,
    active: Mutex<HashMap<Digest, Arc<Fill>>>,
    wait_timeout: Duration,
    max_age: Duration,
    stop: CancellationToken,
    /// Every fill task (and staging aborts), joined by [`Fills::shutdown`].
    tasks: tokio_util::task::TaskTracker,
    pub counters: Arc<FillCounters>,
    cluster: std::sync::OnceLock<Cluster>,
    /// The staging space running fills reserved: each fill's size and its
    /// status (bytes already staged are in the file system's used space,
    /// so only the rest counts against what is free).
    reserved: Mutex<HashMap<u64, (u64, watch::Receiver<FillStatus>)>>,
    next_reservation: std::sync::atomic::AtomicU64,
}

/// Space kept free where fills stage, beyond what the fills reserve.
const STAGING_MARGIN: u64 = 256 * 1024 * 1024;

/// The staging space a fill reserved, given back when it ends.
struct Reservation<'a> {
    fills: &'a Fills,
    id: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.fills
            .reserved
            .lock()
            .expect("reserved lock")
            .remove(&self.id);
    }
}

fn bump(c: &Counter, n: u64) {
    c.inc_by(n);
}

impl Fills {
    pub fn new(
        store: Arc<dyn FillStore>,
        meta: Arc<dyn MetaStore>,
        budget: Arc<Budget>,
        wait_timeout: Duration,
        max_age: Duration,
        stop: CancellationToken,
    ) -> Fills {
        Fills {
            store,
            meta,
            budget,
            active: Mutex::new(HashMap::new()),
            wait_timeout,
            max_age,
            stop,
            tasks: tokio_util::task::TaskTracker::new(),
            counters: Arc::default(),
            cluster: std::sync::OnceLock::new(),
            reserved: Mutex::default(),
            next_reservation: Default::default(),
        }
    }

    /// Reserves staging space for a blob of `size` bytes before its first
    /// byte is fetched: refused when it does not fit beside what the other
    /// fills reserved (an upstream announcing a huge size, honestly or not,
    /// never fills the disk).
    /// `staged` is the fill's status, whose bytes written stop counting as
    /// reserved once they are in the file system.
    async fn reserve(
        &self,
        size: u64,
        staged: watch::Receiver<FillStatus>,
    ) -> Result<Reservation<'_>, FillFailure> {
        let free = self
            .store
            .staging_space()
            .await
            .map_err(|e| FillFailure::Failed(format!("staging space: {e}").into()))?;
        let mut all = self.reserved.lock().expect("reserved lock");
        let reserved: u64 = all
            .values()
            .map(|(size, st)| size.saturating_sub(st.borrow().written))
            .sum();
        if let Some(free) = free {
            let room = free.saturating_sub(STAGING_MARGIN).saturating_sub(reserved);
            if size > room {
                return Err(FillFailure::Failed(
                    format!(
                        "the blob is {size} bytes; where fills stage {free} bytes are free, \
                         {reserved} still reserved by other fills"
                    )
                    .into(),
                ));
            }
        }
        let id = self
            .next_reservation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        all.insert(id, (size, staged));
        Ok(Reservation { fills: self, id })
    }

    /// Makes fills cluster-wide: one replica holding `leases`' lease of a
    /// digest fetches it from upstream and publishes its parts, the others
    /// stream those parts. Set once, before the first fill.
    pub fn set_cluster(&self, leases: Arc<dyn FillLeases>, ttl: Duration) {
        let _ = self.cluster.set(Cluster {
            leases,
            ttl,
            holder: uuid::Uuid::new_v4().to_string(),
        });
    }

    /// Waits until every fill task has ended. Each ends at the stop token
    /// given to [`Fills::new`]: cancel it first.
    pub async fn shutdown(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// How many fills are running.
    pub fn active_count(&self) -> usize {
        self.active.lock().expect("fills lock").len()
    }

    /// The fill in progress for `digest`, if any (for HEAD and eviction).
    pub fn in_progress(&self, digest: &Digest) -> Option<Arc<Fill>> {
        self.active.lock().expect("fills lock").get(digest).cloned()
    }

    /// Joins the fill for `digest`, or starts one fetching it from
    /// `upstream_repo` on `upstream`. `local` is linked to the blob when the
    /// fill publishes it. `size` is the blob's size when the caller knows
    /// it (a manifest's descriptor); without it the fill asks upstream with
    /// a `HEAD` first. Either way the fill takes exactly that many bytes: a `GET`
    /// announcing another size, or a body that goes on past it, fails the
    /// fill.
    pub async fn join_or_start(
        self: &Arc<Self>,
        digest: &Digest,
        size: Option<u64>,
        upstream: &UpstreamClient,
        upstream_repo: &RepoName,
        local: &RepoName,
    ) -> Result<Arc<Fill>, crate::storage::StorageError> {
        if let Some(f) = self.join(digest, local) {
            return Ok(f);
        }
        let writer = self.store.begin_fill().await?;
        let (tx, rx) = watch::channel(FillStatus {
            total: None,
            written: 0,
            phase: Phase::Connecting,
        });
        let fill = Arc::new(Fill {
            digest: digest.clone(),
            status: rx,
            reader: writer.staged(),
            started: Instant::now(),
            repos: Mutex::new(vec![local.clone()]),
        });
        {
            let mut active = self.active.lock().expect("fills lock");
            // Another request may have started one while we staged.
            if let Some(f) = active.get(digest).filter(|f| f.joinable(self.max_age)) {
                let f = f.clone();
                drop(active);
                self.tasks.spawn(writer.abort());
                bump(&self.counters.coalesced, 1);
                f.add_repo(local);
                return Ok(f);
            }
            active.insert(digest.clone(), fill.clone());
        }
        bump(&self.counters.started, 1);
        let this = self.clone();
        let task = FillTask {
            digest: digest.clone(),
            size,
            upstream: upstream.clone(),
            repo: upstream_repo.clone(),
            tx,
        };
        let f = fill.clone();
        self.tasks.spawn(async move {
            // The task ends by itself at the stop token (see `run`).
            task.run(writer, &this, &f).await;
            let mut active = this.active.lock().expect("fills lock");
            if active.get(&f.digest).is_some_and(|x| Arc::ptr_eq(x, &f)) {
                active.remove(&f.digest);
            }
        });
        Ok(fill)
    }

    /// Joins the fill running for `digest`, if there is one that takes
    /// new waiters; `local` is linked to the blob when it is published.
    pub fn join(&self, digest: &Digest, local: &RepoName) -> Option<Arc<Fill>> {
        let f = {
            let active = self.active.lock().expect("fills lock");
            active
                .get(digest)
                .filter(|f| f.joinable(self.max_age))
                .cloned()?
        };
        bump(&self.counters.coalesced, 1);
        f.add_repo(local);
        Some(f)
    }

    /// A stream of the blob's bytes `start..end` (end = the blob's end when
    /// `None`) as the fill stages them.
    pub fn stream(&self, fill: Arc<Fill>, start: u64, end: Option<u64>) -> ByteStream {
        let wait = self.wait_timeout;
        let rx = fill.status.clone();
        futures::stream::unfold(
            (fill, rx, start, false),
            move |(fill, mut rx, pos, finished)| async move {
                if finished {
                    return None;
                }
                loop {
                    let st = rx.borrow_and_update().clone();
                    if let Phase::Failed(why) = &st.phase {
                        let msg = match why {
                            FillFailure::NotFound => "blob not found upstream".to_string(),
                            FillFailure::Failed(m) => m.to_string(),
                        };
                        return Some((Err(io::Error::other(msg)), (fill, rx, pos, true)));
                    }
                    let limit = match (end, st.total) {
                        (Some(e), _) => e,
                        (None, Some(t)) => t,
                        (None, None) => u64::MAX,
                    };
                    let done = st.phase.complete();
                    if done && pos >= limit.min(st.written) {
                        return None;
                    }
                    // The last byte waits for verification, so that a client
                    // never receives a complete body of unverified bytes.
                    let cap = if done { limit } else { limit.saturating_sub(1) };
                    let available = st.written.min(cap);
                    if available > pos {
                        let len = (available - pos).min(SERVE_CHUNK as u64) as usize;
                        return match fill.reader.read_at(pos, len).await {
                            Ok(b) if !b.is_empty() => {
                                let n = b.len() as u64;
                                Some((Ok(b), (fill, rx, pos + n, false)))
                            }
                            Ok(_) => Some((
                                Err(io::Error::other("staged bytes vanished")),
                                (fill, rx, pos, true),
                            )),
                            Err(e) => Some((Err(io::Error::other(e)), (fill, rx, pos, true))),
                        };
                    }
                    match tokio::time::timeout(wait, rx.changed()).await {
                        Ok(Ok(())) => continue,
                        Ok(Err(_)) => {
                            // Sender gone without a final state: check once more.
                            let st = rx.borrow().clone();
                            if st.phase.complete() || matches!(st.phase, Phase::Failed(_)) {
                                continue;
                            }
                            return Some((
                                Err(io::Error::other("the upstream fetch was abandoned")),
                                (fill, rx, pos, true),
                            ));
                        }
                        Err(_) => {
                            return Some((
                                Err(io::Error::other(format!(
                                    "no progress from upstream for {wait:?}"
                                ))),
                                (fill, rx, pos, true),
                            ));
                        }
                    }
                }
            },
        )
        .boxed()
    }

    /// Waits until the fill knows the blob's size (or failed).
    pub async fn wait_started(&self, fill: &Fill) -> Result<u64, FillFailure> {
        let mut rx = fill.status.clone();
        let wait = self.wait_timeout;
        loop {
            {
                let st = rx.borrow_and_update();
                match (&st.phase, st.total) {
                    (Phase::Failed(f), _) => return Err(f.clone()),
                    (_, Some(t)) => return Ok(t),
                    (p, None) if p.complete() => return Ok(st.written),
                    _ => {}
                }
            }
            match tokio::time::timeout(wait, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    let st = rx.borrow().clone();
                    return match (st.phase, st.total) {
                        (Phase::Failed(f), _) => Err(f),
                        (_, Some(t)) => Ok(t),
                        _ => Err(FillFailure::Failed(
                            "the upstream fetch was abandoned".into(),
                        )),
                    };
                }
                Err(_) => {
                    return Err(FillFailure::Failed(
                        format!("upstream did not answer within {wait:?}").into(),
                    ));
                }
            }
        }
    }

    pub fn meta(&self) -> &Arc<dyn MetaStore> {
        &self.meta
    }
}

impl Fill {
    fn add_repo(&self, repo: &RepoName) {
        let mut repos = self.repos.lock().expect("repos lock");
        if !repos.contains(repo) {
            repos.push(repo.clone());
        }
    }

    /// Whether the blob was asked for through `repo` (the fill links it
    /// there once published).
    pub fn serves(&self, repo: &RepoName) -> bool {
        self.repos.lock().expect("repos lock").contains(repo)
    }

    fn joinable(&self, max_age: Duration) -> bool {
        let st = self.status.borrow();
        let alive = self.status.has_changed().is_ok()
            || st.phase.complete()
            || matches!(st.phase, Phase::Failed(_));
        let failed = matches!(st.phase, Phase::Failed(_));
        alive && !failed && self.started.elapsed() < max_age
    }

    pub fn status(&self) -> FillStatus {
        self.status.borrow().clone()
    }
}

struct FillTask {
    digest: Digest,
    /// The blob's size, when the fill was started knowing it.
    size: Option<u64>,
    upstream: UpstreamClient,
    repo: RepoName,
    tx: watch::Sender<FillStatus>,
}

impl FillTask {
    async fn run(
        self,
        mut writer: Box<dyn crate::storage::FillWriter>,
        fills: &Fills,
        fill: &Fill,
    ) {
        let cluster = fills.cluster.get();
        // The lease this fill holds, renewed until the blob is published.
        let mut keeper: Option<LeaseKeeper> = None;
        let fetched = async {
            match cluster {
                None => self.fetch(&mut *writer, fills, None).await.map(|_| ()),
                Some(c) => {
                    self.fetch_clustered(c, &mut *writer, fills, &mut keeper)
                        .await
                }
            }
        };
        // At shutdown the fetch stops and the fill fails like any other:
        // its waiters' bodies end in an error, its staging is removed and
        // its lease released, before `Fills::shutdown` returns.
        let outcome = tokio::select! {
            biased;
            o = fetched => o,
            () = fills.stop.cancelled() => {
                Err(FillFailure::Failed("wharf is shutting down".into()))
            }
        };
        // Verified bytes are released to the waiters at once: making them
        // durable and publishing them (an fsync of the whole blob, or an
        // upload to the bucket) happens after, off the clients' path.
        let outcome = match outcome {
            Ok(()) => match writer.verify(&self.digest).await {
                Ok(()) => Ok(()),
                Err(crate::storage::StorageError::DigestMismatch { computed, .. }) => {
                    bump(&fills.counters.corrupt, 1);
                    tracing::error!(
                        digest = %self.digest, %computed, upstream = self.upstream.host(),
                        repo = %self.repo, "upstream sent bytes that do not match the digest; nothing stored"
                    );
                    Err(FillFailure::Failed(
                        format!("upstream content hashes to {computed}, not {}", self.digest)
                            .into(),
                    ))
                }
                Err(e) => Err(FillFailure::Failed(
                    format!("verifying the blob failed: {e}").into(),
                )),
            },
            Err(f) => Err(f),
        };
        let outcome = match outcome {
            Ok(()) => {
                self.tx.send_modify(|s| s.phase = Phase::Verified);
                self.publish(writer, fills, fill).await
            }
            Err(f) => {
                writer.abort().await;
                Err(f)
            }
        };
        if let Some(k) = keeper {
            k.stop().await;
        }
        if let Some(c) = cluster {
            // Only the holder's lease and parts go; followers keep reading
            // the rest from the published blob.
            if let Err(e) = c.leases.release(&self.digest, &c.holder).await {
                tracing::warn!(digest = %self.digest, error = %e, "could not release the fill lease");
            }
        }
        match outcome {
            Ok(()) => {
                self.tx.send_modify(|s| s.phase = Phase::Done);
            }
            Err(f) => {
                bump(&fills.counters.failed, 1);
                tracing::warn!(digest = %self.digest, repo = %self.repo, failure = ?f, "fill failed");
                // After verification the waiters keep their bytes: only a
                // failure before it ends their responses in an error.
                if self.tx.borrow().phase != Phase::Verified {
                    self.tx.send_modify(|s| s.phase = Phase::Failed(f));
                }
            }
        }
    }

    /// Makes the verified blob durable, publishes it, counts it in the
    /// budget and links it into the repositories that asked for it.
    async fn publish(
        &self,
        writer: Box<dyn crate::storage::FillWriter>,
        fills: &Fills,
        fill: &Fill,
    ) -> Result<(), FillFailure> {
        let size = writer
            .commit(&self.digest)
            .await
            .map_err(|e| FillFailure::Failed(format!("storing the blob failed: {e}").into()))?;
        let mut recorded = fills.budget.add(&self.digest, size).await;
        // Repositories only join the list; one that joins while these are
        // linked is linked too.
        for i in 0.. {
            let Some(r) = fill.repos.lock().expect("repos lock").get(i).cloned() else {
                break;
            };
            let linked = fills
                .meta
                .link_blob(&r, RepoKind::Cached, &self.digest)
                .await;
            recorded = recorded.and(linked);
        }
        recorded.map_err(|e| FillFailure::Failed(format!("recording the blob failed: {e}").into()))
    }

    /// Streams the blob from upstream into `writer`, resuming with Range
    /// requests when the connection breaks. With a `publisher` (this
    /// replica holds the cluster's lease), stops at once with
    /// [`Fetched::Demoted`] when the lease is lost.
    async fn fetch(
        &self,
        writer: &mut dyn crate::storage::FillWriter,
        fills: &Fills,
        mut publisher: Option<&mut Publisher<'_>>,
    ) -> Result<Fetched, FillFailure> {
        let mut resumes = 0u32;
        let size = match self.size {
            Some(size) => size,
            None => match self.upstream.head_blob(&self.repo, &self.digest).await {
                Ok(size) => size,
                Err(UpstreamError::NotFound) => return Err(FillFailure::NotFound),
                Err(e) => return Err(FillFailure::Failed(format!("upstream: {e}").into())),
            },
        };
        let _reserved = fills.reserve(size, self.tx.subscribe()).await?;
        let mut announced = false;
        // Cancelled when the lease is lost (never without a publisher).
        let lost = publisher
            .as_ref()
            .map_or_else(CancellationToken::new, |p| p.lost.clone());
        loop {
            let offset = writer.written();
            let resp = tokio::select! {
                biased;
                () = lost.cancelled() => return Ok(Fetched::Demoted),
                r = self.upstream.get_blob(&self.repo, &self.digest, offset, size) => r,
            };
            let resp = match resp {
                Ok(r) => r,
                Err(UpstreamError::NotFound) => return Err(FillFailure::NotFound),
                Err(e) => {
                    if offset > 0 && resumes < MAX_RESUMES && e.is_retryable() {
                        resumes += 1;
                        continue;
                    }
                    return Err(FillFailure::Failed(format!("upstream: {e}").into()));
                }
            };
            // The size is announced to the waiters (and to clients as
            // their `Content-Length`) once upstream's answer agrees with it.
            if !announced {
                announced = true;
                self.tx.send_modify(|s| {
                    s.total = Some(size);
                    s.phase = Phase::Streaming;
                });
                if let Some(p) = publisher.as_deref_mut() {
                    p.total(Some(size));
                }
            }
            let mut stream = resp;
            let mut broken = None;
            loop {
                let chunk = tokio::select! {
                    biased;
                    () = lost.cancelled() => return Ok(Fetched::Demoted),
                    c = stream.next() => c,
                };
                let Some(chunk) = chunk else { break };
                match chunk {
                    // The stream ends in an error rather than go past `size`.
                    Ok(b) => {
                        write(writer, &b).await?;
                        if let Some(p) = publisher.as_deref_mut() {
                            p.wrote(&b).await;
                        }
                        bump(&fills.counters.upstream_bytes, b.len() as u64);
                        let w = writer.written();
                        self.tx.send_modify(|s| s.written = w);
                    }
                    Err(e) => {
                        broken = Some(e);
                        break;
                    }
                }
            }
            // A body longer than the blob is not resumed: it is wrong, not
            // broken.
            if let Some(e) = broken
                .as_ref()
                .filter(|e| e.kind() == io::ErrorKind::InvalidData)
            {
                return Err(FillFailure::Failed(format!("upstream: {e}").into()));
            }
            if writer.written() == size {
                if let Some(p) = publisher.as_deref_mut() {
                    p.finish(size).await;
                    if p.lost.is_cancelled() {
                        return Ok(Fetched::Demoted);
                    }
                }
                return Ok(Fetched::Complete);
            }
            resumes += 1;
            let why = broken.map_or("body ended early".to_string(), |e| e.to_string());
            if resumes > MAX_RESUMES {
                return Err(FillFailure::Failed(
                    format!("upstream connection kept breaking: {why}").into(),
                ));
            }
            tracing::info!(digest = %self.digest, offset = writer.written(), %why, "resuming fill with a Range request");
        }
    }
}

impl FillTask {
    /// A fill shared by the cluster: take the lease and fetch from upstream
    /// (publishing parts), or follow the holder's parts; take over from a
    /// holder that stopped renewing its lease, resuming where the bytes
    /// received so far end.
    async fn fetch_clustered(
        &self,
        c: &Cluster,
        writer: &mut dyn crate::storage::FillWriter,
        fills: &Fills,
        keeper: &mut Option<LeaseKeeper>,
    ) -> Result<(), FillFailure> {
        let lease_err = |e: crate::storage::StorageError| {
            FillFailure::Failed(format!("fill lease: {e}").into())
        };
        let mut followed = false;
        loop {
            let state = c
                .leases
                .acquire(&self.digest, &c.holder, c.ttl)
                .await
                .map_err(lease_err)?;
            match state {
                LeaseState::Ours => {
                    let k = LeaseKeeper::start(c, &self.digest, &fills.stop);
                    // First the bytes already in the bucket: the parts of
                    // a holder that died, or the blob of one that
                    // published it and released its lease just before.
                    // Upstream is asked only for the rest.
                    if self.follow(c, fills, writer, None, false).await? {
                        *keeper = Some(k);
                        return Ok(());
                    }
                    let mut p = Publisher {
                        c,
                        digest: &self.digest,
                        buf: bytes::BytesMut::new(),
                        published: writer.written(),
                        lost: k.lost.clone(),
                        total: k.total.clone(),
                        resign: k.stop.clone(),
                        resigned: false,
                    };
                    match self.fetch(writer, fills, Some(&mut p)).await? {
                        Fetched::Complete => {
                            *keeper = Some(k);
                            return Ok(());
                        }
                        Fetched::Demoted => {
                            k.stop().await;
                            tracing::warn!(digest = %self.digest, offset = writer.written(), "lost the fill's lease to another replica; following it");
                        }
                    }
                }
                LeaseState::Theirs { total } => {
                    if !followed {
                        followed = true;
                        bump(&fills.counters.followed, 1);
                    }
                    if self.follow(c, fills, writer, total, true).await? {
                        return Ok(());
                    }
                    tracing::info!(digest = %self.digest, offset = writer.written(), "the fill's lease expired; taking it over");
                }
            }
        }
    }

    /// Streams another replica's parts into `writer`. `Ok(true)` once every
    /// byte is there; `Ok(false)` when the holder's lease expired or it gave
    /// up without publishing. Without `poll`, takes only what is there now
    /// (`Ok(false)` at the first part missing).
    async fn follow(
        &self,
        c: &Cluster,
        fills: &Fills,
        writer: &mut dyn crate::storage::FillWriter,
        mut total: Option<u64>,
        poll: bool,
    ) -> Result<bool, FillFailure> {
        // A follower stages the whole blob too: its size is reserved where
        // fills stage as soon as it is known, before more bytes are staged.
        let mut reserved = None;
        let lease_err = |e: crate::storage::StorageError| {
            FillFailure::Failed(format!("reading another replica's fill: {e}").into())
        };
        let announce = |total: Option<u64>, tx: &watch::Sender<FillStatus>| {
            if total.is_some() {
                tx.send_modify(|s| {
                    s.total = total;
                    s.phase = Phase::Streaming;
                });
            }
        };
        announce(total, &self.tx);
        loop {
            if let (None, Some(t)) = (&reserved, total) {
                reserved = Some(fills.reserve(t, self.tx.subscribe()).await?);
            }
            let offset = writer.written();
            if total.is_some_and(|t| offset >= t) {
                return Ok(true);
            }
            if let Some((b, size)) = c
                .leases
                .part(&self.digest, offset)
                .await
                .map_err(lease_err)?
                && !b.is_empty()
            {
                if total.is_none() && size.is_some() {
                    total = size;
                    announce(total, &self.tx);
                    if let Some(t) = total {
                        reserved = Some(fills.reserve(t, self.tx.subscribe()).await?);
                    }
                }
                if total.is_some_and(|t| offset + b.len() as u64 > t) {
                    return Err(FillFailure::Failed(
                        "another replica's fill has more bytes than announced".into(),
                    ));
                }
                write(writer, &b).await?;
                let w = writer.written();
                self.tx.send_modify(|s| s.written = w);
                continue;
            }
            let state = c.leases.state(&self.digest).await.map_err(lease_err)?;
            if let Some((_, t)) = state
                && total.is_none()
                && t.is_some()
            {
                total = t;
                announce(total, &self.tx);
            }
            if total.is_some_and(|t| offset >= t) {
                return Ok(true);
            }
            if !poll {
                return Ok(false);
            }
            match state {
                Some((true, _)) => {}
                // Expired, or released without the blob: take over.
                Some((false, _)) | None => return Ok(false),
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    }
}

/// How a fetch ended (without a failure).
enum Fetched {
    /// Every byte is staged.
    Complete,
    /// This replica lost the cluster's lease: it fetched and published
    /// nothing more once it knew.
    Demoted,
}

/// The renewals of a lease this replica holds: a task renewing it every
/// third of its lifetime, whether bytes arrive or not, until stopped (or
/// at shutdown). `lost` is cancelled when the lease is no longer ours
/// (another replica holds it) or when renewals failed for two thirds of
/// it, before another replica may take it over; the holder then stops
/// fetching and publishing at once.
struct LeaseKeeper {
    lost: CancellationToken,
    /// The blob's size once known, recorded in the lease at once.
    total: watch::Sender<Option<u64>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    fn start(c: &Cluster, digest: &Digest, shutdown: &CancellationToken) -> LeaseKeeper {
        let lost = CancellationToken::new();
        let stop = shutdown.child_token();
        let (total, mut total_rx) = watch::channel(None);
        let (leases, holder, ttl) = (c.leases.clone(), c.holder.clone(), c.ttl);
        let (digest, lost2, stop2) = (digest.clone(), lost.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut renewed = Instant::now();
            loop {
                tokio::select! {
                    () = stop2.cancelled() => return,
                    () = tokio::time::sleep(ttl / 3) => {}
                    r = total_rx.changed() => if r.is_err() { return },
                }
                let total = *total_rx.borrow_and_update();
                // A renewal that hangs (a slow bucket) counts as failed
                // once a third of the lease is gone, so a holder whose
                // lease may have ended stops instead of fetching on.
                let renewal =
                    tokio::time::timeout(ttl / 3, leases.renew(&digest, &holder, ttl, total));
                let outcome = tokio::select! {
                    () = stop2.cancelled() => return,
                    r = renewal => r.unwrap_or_else(|_| {
                        Err(crate::storage::StorageError::Io(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the lease renewal did not answer in a third of the lease",
                        )))
                    }),
                };
                match outcome {
                    Ok(true) => renewed = Instant::now(),
                    Ok(false) => {
                        tracing::warn!(%digest, "the fill's lease is another replica's now");
                        lost2.cancel();
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(%digest, error = %e, "could not renew the fill lease");
                        if renewed.elapsed() >= ttl * 2 / 3 {
                            lost2.cancel();
                            return;
                        }
                    }
                }
            }
        });
        LeaseKeeper {
            lost,
            total,
            stop,
            task,
        }
    }

    /// Stops renewing (the lease then ends by release or expiry) and
    /// waits for a renewal in flight.
    async fn stop(mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
}

impl Drop for LeaseKeeper {
    /// A fill that fails or is cancelled stops renewing too.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The lease holder's side of a cluster-wide fill: parts of
/// [`CLUSTER_PART`] bytes published as the bytes arrive, each written once
/// (create-only), so a holder that was demoted without knowing yet cannot
/// change what the new holder wrote; finding a part already there means
/// exactly that, and this holder stops. A part that cannot be written
/// makes the holder resign: it stops publishing and renewing, keeps
/// fetching for its own clients, and another replica takes the lease over
/// when it expires.
struct Publisher<'a> {
    c: &'a Cluster,
    digest: &'a Digest,
    buf: bytes::BytesMut,
    /// Offset of `buf`'s first byte.
    published: u64,
    lost: CancellationToken,
    total: watch::Sender<Option<u64>>,
    /// Stops the renewals.
    resign: CancellationToken,
    resigned: bool,
}

impl Publisher<'_> {
    async fn wrote(&mut self, b: &[u8]) {
        if self.resigned {
            return;
        }
        self.buf.extend_from_slice(b);
        if self.buf.len() >= CLUSTER_PART {
            self.flush().await;
        }
    }

    async fn flush(&mut self) {
        if self.buf.is_empty() || self.resigned || self.lost.is_cancelled() {
            return;
        }
        let part = self.buf.split().freeze();
        let n = part.len() as u64;
        match self
            .c
            .leases
            .put_part(self.digest, self.published, part)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(digest = %self.digest, offset = self.published, "another replica wrote this fill part: it holds the lease now");
                self.lost.cancel();
            }
            Err(e) => {
                tracing::warn!(digest = %self.digest, error = %e, "could not publish a fill part; leaving the fill to another replica");
                self.resigned = true;
                // No more renewals: the lease expires and another replica
                // takes it over from the parts published so far.
                self.resign.cancel();
            }
        }
        self.published += n;
    }

    /// Records the blob's size in the lease (at once, by the renewals).
    fn total(&mut self, total: Option<u64>) {
        if total.is_some() {
            self.total.send_replace(total);
        }
    }

    async fn finish(&mut self, total: u64) {
        self.flush().await;
        if !self.resigned {
            self.total(Some(total));
        }
    }
}

async fn write(writer: &mut dyn crate::storage::FillWriter, b: &Bytes) -> Result<(), FillFailure> {
    writer
        .write(b)
        .await
        .map_err(|e| FillFailure::Failed(format!("staging failed: {e}").into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Result as StorageResult;

    /// Leases whose renewals never answer (a bucket that hangs).
    struct Hanging;

    #[async_trait::async_trait]
    impl FillLeases for Hanging {
        async fn acquire(&self, _: &Digest, _: &str, _: Duration) -> StorageResult<LeaseState> {
            unimplemented!("not used by the keeper")
        }
        async fn renew(
            &self,
            _: &Digest,
            _: &str,
            _: Duration,
            _: Option<u64>,
        ) -> StorageResult<bool> {
            std::future::pending().await
        }
        async fn state(&self, _: &Digest) -> StorageResult<Option<(bool, Option<u64>)>> {
            unimplemented!("not used by the keeper")
        }
        async fn put_part(&self, _: &Digest, _: u64, _: Bytes) -> StorageResult<bool> {
            unimplemented!("not used by the keeper")
        }
        async fn part(&self, _: &Digest, _: u64) -> StorageResult<Option<(Bytes, Option<u64>)>> {
            unimplemented!("not used by the keeper")
        }
        async fn release(&self, _: &Digest, _: &str) -> StorageResult<()> {
            unimplemented!("not used by the keeper")
        }
    }

    /// A renewal that hangs counts as failed: the holder stops (its lease
    /// is taken as lost) before the lease it could not renew ends, so no
    /// second replica fetches while it still does.
    #[tokio::test(start_paused = true)]
    async fn a_hanging_renewal_stops_the_holder_before_its_lease_ends() {
        let ttl = Duration::from_secs(30);
        let c = Cluster {
            leases: Arc::new(Hanging),
            ttl,
            holder: "replica-a".into(),
        };
        let shutdown = CancellationToken::new();
        let k = LeaseKeeper::start(&c, &Digest::sha256_of(b"blob"), &shutdown);
        let started = Instant::now();
        tokio::time::timeout(ttl, k.lost.cancelled())
            .await
            .expect("the holder stops before its lease ends");
        assert!(started.elapsed() < ttl);
    }
}
