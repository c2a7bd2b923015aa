//! The pull-through cache: routes repositories to upstream registries by
//! rule, fills blob misses once per digest while streaming to every waiter,
//! and keeps manifests by tag fresh (`tag_ttl`, then a HEAD revalidation;
//! served stale up to `max_stale` while upstream is failing).

pub mod budget;
pub mod fill;
pub mod rules;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::metrics::{self, KindLabels};
use crate::oci::manifest::{Descriptor, Manifest, ManifestKind};
use crate::oci::{Digest, Reference, RepoName, Tag};
use crate::storage::{BlobStore, FillStore, ManifestRecord, MetaStore, RepoKind, StorageError};
use crate::upstream::{UpstreamClient, UpstreamError};
use budget::{Budget, Hold};
use fill::{Fill, FillFailure, Fills};
pub use rules::{Routed, Rule, Rules, Target};

/// Every manifest type, asked of upstream so the cache stores what the
/// upstream has (the client's own `Accept` is applied locally).
pub const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// Counters for metrics and `wharf cache stats`.
#[derive(Debug, Default)]
pub struct CacheCounters {
    /// By kind (`blob`, `manifest`).
    pub hits: Family<KindLabels, Counter>,
    pub misses: Family<KindLabels, Counter>,
    pub revalidations: Counter,
    pub stale_serves: Counter,
}

impl CacheCounters {
    fn hit(&self, kind: &KindLabels) {
        self.hits.get_or_create(kind).inc();
    }

    fn miss(&self, kind: &KindLabels) {
        self.misses.get_or_create(kind).inc();
    }

    /// Hits and misses of `kind` so far.
    pub fn get(&self, kind: &KindLabels) -> (u64, u64) {
        (
            self.hits.get_or_create(kind).get(),
            self.misses.get_or_create(kind).get(),
        )
    }
}

/// Why the cache could not answer.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{0}")]
    NotFound(String),
    #[error("upstream {host}: {source}")]
    Upstream {
        host: String,
        #[source]
        source: UpstreamError,
    },
    #[error("{0}")]
    Fill(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// A manifest the cache can serve (its bytes are in the blob store).
#[derive(Debug, Clone)]
pub struct CachedManifest {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
}

/// A blob being served from the cache.
pub enum CachedBlob {
    /// Stored: read it from the blob store (under `hold`).
    Stored { size: u64, hold: Hold },
    /// Being filled: stream it as it arrives.
    Filling {
        size: u64,
        fill: Arc<Fill>,
        hold: Hold,
    },
}

pub struct Cache {
    rules: Rules,
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    pub fills: Arc<Fills>,
    /// When each cached tag was last confirmed upstream.
    checked: Mutex<HashMap<(RepoName, Tag), Instant>>,
    /// One revalidation per tag at a time; others wait and look again.
    revalidating: Mutex<HashMap<(RepoName, Tag), RevalidationLock>>,
    prefetch: bool,
    pub counters: CacheCounters,
    pub budget: Arc<Budget>,
    observer: Option<Arc<dyn PullObserver>>,
}

/// Held by the one revalidation of a tag in flight.
type RevalidationLock = Arc<tokio::sync::Mutex<()>>;

/// Told about every manifest the cache stores from upstream (replication
/// rules with `include_pulled_through` enqueue here). Failures are the
/// observer's to handle: a pull never fails because of it.
#[async_trait::async_trait]
pub trait PullObserver: Send + Sync + 'static {
    async fn manifest_pulled(&self, repo: &RepoName, tag: Option<&Tag>, digest: &Digest);
}

impl Cache {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rules: Rules,
        blobs: Arc<dyn BlobStore>,
        fill_store: Arc<dyn FillStore>,
        meta: Arc<dyn MetaStore>,
        prefetch: bool,
        fill_wait_timeout: Duration,
        fill_max_age: Duration,
        budget: Arc<Budget>,
        stop: CancellationToken,
    ) -> Cache {
        let fills = Arc::new(Fills::new(
            fill_store,
            meta.clone(),
            budget.clone(),
            fill_wait_timeout,
            fill_max_age,
            stop,
        ));
        Cache {
            rules,
            blobs,
            meta,
            fills,
            checked: Mutex::new(HashMap::new()),
            revalidating: Mutex::new(HashMap::new()),
            prefetch,
            counters: CacheCounters::default(),
            budget,
            observer: None,
        }
    }

    /// Tells `observer` about every manifest stored from upstream.
    pub fn with_observer(mut self, observer: Arc<dyn PullObserver>) -> Cache {
        self.observer = Some(observer);
        self
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    fn upstream(&self, t: &Target) -> &UpstreamClient {
        &self.rules.0[t.rule].upstream
    }

    fn upstream_err(&self, t: &Target, source: UpstreamError) -> CacheError {
        match source {
            UpstreamError::NotFound => CacheError::NotFound(format!(
                "{} not found upstream at {}",
                t.upstream,
                self.upstream(t).host()
            )),
            source => CacheError::Upstream {
                host: self.upstream(t).host().to_string(),
                source,
            },
        }
    }

    // ---- manifests ----

    /// Finds a manifest through the cache.
    pub async fn manifest(
        &self,
        t: &Target,
        reference: &Reference,
    ) -> Result<CachedManifest, CacheError> {
        let found = match reference {
            Reference::Digest(d) => self.manifest_by_digest(t, d).await?,
            Reference::Tag(tag) => self.manifest_by_tag(t, tag).await?,
        };
        if self.prefetch {
            self.prefetch_blobs(t, &found.digest).await;
        }
        Ok(found)
    }

    async fn local_manifest(
        &self,
        t: &Target,
        d: &Digest,
    ) -> Result<Option<CachedManifest>, CacheError> {
        match self.meta.manifest(&t.local, d).await? {
            Some(r) if self.blobs.stat(d).await?.is_some() => Ok(Some(CachedManifest {
                digest: d.clone(),
                media_type: r.media_type,
                size: r.size,
            })),
            _ => Ok(None),
        }
    }

    async fn manifest_by_digest(
        &self,
        t: &Target,
        d: &Digest,
    ) -> Result<CachedManifest, CacheError> {
        if let Some(m) = self.local_manifest(t, d).await? {
            self.counters.hit(&metrics::MANIFEST);
            return Ok(m);
        }
        self.counters.miss(&metrics::MANIFEST);
        self.fetch_manifest(t, &Reference::Digest(d.clone()), None)
            .await
    }

    /// Fetches a manifest from upstream and stores it (and `tag` → it).
    async fn fetch_manifest(
        &self,
        t: &Target,
        reference: &Reference,
        tag: Option<&Tag>,
    ) -> Result<CachedManifest, CacheError> {
        let (meta, body) = self
            .upstream(t)
            .get_manifest(&t.upstream, reference, ACCEPT_ALL)
            .await
            .map_err(|e| self.upstream_err(t, e))?;
        self.store_manifest(t, &meta.digest, &meta.media_type, body, tag)
            .await
    }

    async fn store_manifest(
        &self,
        t: &Target,
        digest: &Digest,
        media_type: &str,
        body: Bytes,
        tag: Option<&Tag>,
    ) -> Result<CachedManifest, CacheError> {
        let computed = Digest::of(digest.algorithm(), &body);
        if &computed != digest {
            return Err(CacheError::Fill(format!(
                "upstream manifest hashes to {computed}, not {digest}"
            )));
        }
        let parsed = Manifest::parse(&body, Some(media_type))
            .map_err(|e| CacheError::Fill(format!("upstream sent an invalid manifest: {e}")))?;
        let size = body.len() as u64;
        self.blobs.put(digest, body).await?;
        let record = ManifestRecord {
            media_type: parsed.media_type.to_string(),
            size,
            subject: parsed.subject.as_ref().map(|s| s.digest.clone()),
            index_depth: None,
        };
        let referrer = parsed.subject.as_ref().map(|_| Descriptor {
            media_type: parsed.media_type.to_string(),
            digest: digest.clone(),
            size,
            artifact_type: parsed.artifact_type.clone(),
            annotations: parsed.annotations.clone(),
        });
        self.meta
            .put_manifest(
                &t.local,
                RepoKind::Cached,
                digest,
                &record,
                tag,
                referrer.as_ref(),
            )
            .await?;
        if let Some(tag) = tag {
            self.mark_checked(t, tag).await;
        }
        if let Some(o) = &self.observer {
            o.manifest_pulled(&t.local, tag, digest).await;
        }
        Ok(CachedManifest {
            digest: digest.clone(),
            media_type: record.media_type,
            size,
        })
    }

    async fn mark_checked(&self, t: &Target, tag: &Tag) {
        self.checked
            .lock()
            .expect("checked lock")
            .insert((t.local.clone(), tag.clone()), Instant::now());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if let Err(e) = self.meta.set_tag_checked(&t.local, tag, now).await {
            tracing::warn!(error = %e, "could not record the tag check time");
        }
    }

    /// How long ago `tag` was last confirmed upstream (`None`: never).
    async fn checked_ago(&self, t: &Target, tag: &Tag) -> Option<Duration> {
        let key = (t.local.clone(), tag.clone());
        if let Some(at) = self.checked.lock().expect("checked lock").get(&key) {
            return Some(at.elapsed());
        }
        // After a restart: the persisted wall-clock time.
        let at = self.meta.tag_checked(&t.local, tag).await.ok()??;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
        let ago = Duration::from_secs(now.saturating_sub(at));
        let instant = Instant::now().checked_sub(ago).unwrap_or_else(Instant::now);
        self.checked
            .lock()
            .expect("checked lock")
            .insert(key, instant);
        Some(ago)
    }

    async fn manifest_by_tag(&self, t: &Target, tag: &Tag) -> Result<CachedManifest, CacheError> {
        let ttl = self.rules.0[t.rule].tag_ttl;
        if let Some(m) = self.fresh(t, tag, ttl).await? {
            self.counters.hit(&metrics::MANIFEST);
            return Ok(m);
        }
        // One revalidation per tag; the others wait, then look again.
        let lock = self
            .revalidating
            .lock()
            .expect("revalidating lock")
            .entry((t.local.clone(), tag.clone()))
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        if let Some(m) = self.fresh(t, tag, ttl).await? {
            self.counters.hit(&metrics::MANIFEST);
            return Ok(m);
        }
        let result = self.revalidate(t, tag).await;
        self.revalidating
            .lock()
            .expect("revalidating lock")
            .remove(&(t.local.clone(), tag.clone()));
        result
    }

    /// The cached manifest for `tag` if it was confirmed within `ttl`.
    async fn fresh(
        &self,
        t: &Target,
        tag: &Tag,
        ttl: Duration,
    ) -> Result<Option<CachedManifest>, CacheError> {
        let Some(d) = self.meta.resolve_tag(&t.local, tag).await? else {
            return Ok(None);
        };
        match self.checked_ago(t, tag).await {
            Some(ago) if ago < ttl => self.local_manifest(t, &d).await,
            _ => Ok(None),
        }
    }

    async fn revalidate(&self, t: &Target, tag: &Tag) -> Result<CachedManifest, CacheError> {
        self.counters.revalidations.inc();
        let cached = match self.meta.resolve_tag(&t.local, tag).await? {
            Some(d) => self.local_manifest(t, &d).await?,
            None => None,
        };
        let reference = Reference::Tag(tag.clone());
        let upstream = match &cached {
            // HEAD does not count against Docker Hub's pull limits.
            Some(_) => self
                .upstream(t)
                .head_manifest(&t.upstream, &reference, ACCEPT_ALL)
                .await
                .map(Some),
            None => Ok(None),
        };
        match (upstream, cached) {
            (Ok(Some(head)), Some(c)) if head.digest == c.digest => {
                self.mark_checked(t, tag).await;
                Ok(c)
            }
            (Ok(Some(head)), _) => {
                self.counters.miss(&metrics::MANIFEST);
                // Fetch by digest: the tag may move again meanwhile.
                let (meta, body) = self
                    .upstream(t)
                    .get_manifest(
                        &t.upstream,
                        &Reference::Digest(head.digest.clone()),
                        ACCEPT_ALL,
                    )
                    .await
                    .map_err(|e| self.upstream_err(t, e))?;
                self.store_manifest(t, &meta.digest, &meta.media_type, body, Some(tag))
                    .await
            }
            (Ok(None), _) => {
                self.counters.miss(&metrics::MANIFEST);
                self.fetch_manifest(t, &reference, Some(tag)).await
            }
            (Err(UpstreamError::NotFound), _) => {
                // Gone upstream: stop serving the tag.
                let _ = self.meta.delete_tag(&t.local, RepoKind::Cached, tag).await;
                Err(self.upstream_err(t, UpstreamError::NotFound))
            }
            (Err(e), Some(c)) => {
                let max_stale = self.rules.0[t.rule].max_stale;
                let ago = self.checked_ago(t, tag).await.unwrap_or(Duration::MAX);
                if ago <= max_stale {
                    self.counters.stale_serves.inc();
                    tracing::warn!(repo = %t.local, %tag, error = %e, ?ago, "upstream failing; serving the cached manifest");
                    Ok(c)
                } else {
                    Err(self.upstream_err(t, e))
                }
            }
            (Err(e), None) => Err(self.upstream_err(t, e)),
        }
    }

    /// Forgets when `tag` was checked, so the next pull asks upstream.
    pub fn expire_tag(&self, local: &RepoName, tag: &Tag) {
        self.checked
            .lock()
            .expect("checked lock")
            .remove(&(local.clone(), tag.clone()));
    }

    /// Re-fetches a tag (or a manifest by digest) from upstream now.
    pub async fn refresh(
        &self,
        t: &Target,
        reference: &Reference,
    ) -> Result<CachedManifest, CacheError> {
        match reference {
            Reference::Tag(tag) => {
                self.expire_tag(&t.local, tag);
                let _ = self.meta.set_tag_checked(&t.local, tag, 0).await;
                self.manifest_by_tag(t, tag).await
            }
            Reference::Digest(_) => self.fetch_manifest(t, reference, None).await,
        }
    }

    async fn prefetch_blobs(&self, t: &Target, digest: &Digest) {
        let Ok(Some(body)) = self.manifest_bytes(digest).await else {
            return;
        };
        let Ok(m) = Manifest::parse(&body, None) else {
            return;
        };
        if m.kind != ManifestKind::Image {
            return;
        }
        // Each fill is bounded by the size the (verified) manifest declares.
        for b in m.blobs {
            if matches!(self.blobs.stat(&b.digest).await, Ok(Some(_))) {
                continue;
            }
            if let Err(e) = self
                .fills
                .join_or_start(
                    &b.digest,
                    Some(b.size),
                    self.upstream(t),
                    &t.upstream,
                    &t.local,
                )
                .await
            {
                tracing::warn!(digest = %b.digest, error = %e, "prefetch failed to start");
            }
        }
    }

    async fn manifest_bytes(&self, digest: &Digest) -> Result<Option<Bytes>, StorageError> {
        use futures::StreamExt;
        let mut s = match self.blobs.read(digest, None).await {
            Ok(s) => s,
            Err(StorageError::NotFound) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut out = bytes::BytesMut::new();
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(Some(out.freeze()))
    }

    // ---- blobs ----

    /// Size of a blob through the cache, without fetching its bytes.
    pub async fn blob_size(&self, t: &Target, digest: &Digest) -> Result<u64, CacheError> {
        if let Some(size) = self.linked_size(t, digest).await? {
            return Ok(size);
        }
        match self.fills.in_progress(digest) {
            Some(f) => {
                if let Some(total) = f.status().total {
                    return Ok(total);
                }
            }
            None => {
                // A fill that ended since the lookup above has published
                // and linked the blob.
                if let Some(size) = self.linked_size(t, digest).await? {
                    return Ok(size);
                }
            }
        }
        self.upstream(t)
            .head_blob(&t.upstream, digest)
            .await
            .map_err(|e| self.upstream_err(t, e))
    }

    async fn linked_size(&self, t: &Target, digest: &Digest) -> Result<Option<u64>, CacheError> {
        let Some(size) = self.blobs.stat(digest).await? else {
            return Ok(None);
        };
        if self.meta.blob_linked(&t.local, digest).await? {
            return Ok(Some(size));
        }
        // Just published by a verified fill for this repository, which
        // links it next.
        if self
            .fills
            .in_progress(digest)
            .is_some_and(|f| f.status().phase.complete() && f.serves(&t.local))
        {
            return Ok(Some(size));
        }
        // Stored through another repository: serve it here only if
        // upstream confirms this repository has it.
        match self.upstream(t).head_blob(&t.upstream, digest).await {
            Ok(_) => {
                self.meta
                    .link_blob(&t.local, RepoKind::Cached, digest)
                    .await?;
                Ok(Some(size))
            }
            Err(UpstreamError::NotFound) => Err(self.upstream_err(t, UpstreamError::NotFound)),
            Err(e) => Err(self.upstream_err(t, e)),
        }
    }

    /// Opens a blob: stored, or joined to (or starting) its fill.
    pub async fn blob(&self, t: &Target, digest: &Digest) -> Result<CachedBlob, CacheError> {
        // Held from before the lookup, so the blob cannot be evicted between
        // finding it and streaming it.
        let hold = self.budget.hold(digest).await;
        if let Some(size) = self.linked_size(t, digest).await? {
            self.counters.hit(&metrics::BLOB);
            return Ok(CachedBlob::Stored { size, hold });
        }
        let fill = match self.fills.join(digest, &t.local) {
            Some(fill) => {
                // A fill whose bytes are all here and verified (it is being
                // published) serves this request locally: a hit.
                if fill.status().phase.complete() {
                    self.counters.hit(&metrics::BLOB);
                } else {
                    self.counters.miss(&metrics::BLOB);
                }
                fill
            }
            None => {
                // No fill is running: one that ended since the lookup above
                // has published and linked the blob.
                if let Some(size) = self.linked_size(t, digest).await? {
                    self.counters.hit(&metrics::BLOB);
                    return Ok(CachedBlob::Stored { size, hold });
                }
                self.counters.miss(&metrics::BLOB);
                self.fills
                    .join_or_start(digest, None, self.upstream(t), &t.upstream, &t.local)
                    .await?
            }
        };
        match self.fills.wait_started(&fill).await {
            Ok(size) => Ok(CachedBlob::Filling { size, fill, hold }),
            Err(FillFailure::NotFound) => Err(self.upstream_err(t, UpstreamError::NotFound)),
            Err(FillFailure::Failed(m)) => Err(CacheError::Fill(m.to_string())),
        }
    }

    // ---- listings ----

    /// Tags: from upstream when reachable, otherwise from the cache.
    pub async fn tags(
        &self,
        t: &Target,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<(Vec<String>, bool), CacheError> {
        match self.upstream(t).tags(&t.upstream, n, last).await {
            Ok(page) => Ok((page.tags, page.more)),
            Err(e) if e.is_unavailable() => {
                self.counters.stale_serves.inc();
                let n = n.unwrap_or(crate::oci::MAX_PAGE);
                let mut tags = self
                    .meta
                    .tags(&t.local, last, n.saturating_add(1))
                    .await?
                    .ok_or_else(|| self.upstream_err(t, e))?;
                let more = tags.len() > n;
                tags.truncate(n);
                Ok((tags, more))
            }
            Err(e) => Err(self.upstream_err(t, e)),
        }
    }

    /// Referrers: from upstream when reachable, otherwise from the cache.
    pub async fn referrers(
        &self,
        t: &Target,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Descriptor>, CacheError> {
        #[derive(serde::Deserialize)]
        struct Index {
            #[serde(default)]
            manifests: Vec<Descriptor>,
        }
        let mut list = match self
            .upstream(t)
            .referrers(&t.upstream, subject, artifact_type)
            .await
        {
            Ok(body) => {
                serde_json::from_slice::<Index>(&body)
                    .map_err(|e| {
                        CacheError::Fill(format!("upstream sent an invalid referrers index: {e}"))
                    })?
                    .manifests
            }
            Err(UpstreamError::NotFound) => Vec::new(),
            Err(e) if e.is_unavailable() => {
                self.counters.stale_serves.inc();
                self.meta.referrers(&t.local, subject).await?
            }
            Err(e) => return Err(self.upstream_err(t, e)),
        };
        if let Some(a) = artifact_type {
            list.retain(|d| d.artifact_type.as_deref() == Some(a));
        }
        Ok(list)
    }
}

impl crate::metrics::Report for Cache {
    fn register(&self, r: &mut prometheus_client::registry::Registry) {
        let c = &self.counters;
        r.register(
            "cache_hits",
            "Requests answered from the cache, by kind",
            c.hits.clone(),
        );
        r.register(
            "cache_misses",
            "Requests that went to upstream, by kind",
            c.misses.clone(),
        );
        r.register(
            "cache_revalidations",
            "Tags past tag_ttl revalidated with upstream",
            c.revalidations.clone(),
        );
        r.register(
            "cache_stale_serves",
            "Answers served from the cache because upstream was failing",
            c.stale_serves.clone(),
        );
        let f = &self.fills.counters;
        r.register(
            "cache_fills",
            "Upstream blob fetches started",
            f.started.clone(),
        );
        r.register(
            "cache_coalesced_waiters",
            "Blob requests that joined a fetch already in progress",
            f.coalesced.clone(),
        );
        r.register(
            "cache_fill_failures",
            "Blob fetches that failed (nothing stored)",
            f.failed.clone(),
        );
        r.register(
            "cache_fill_corrupt",
            "Blob fetches whose content did not match the digest (nothing stored)",
            f.corrupt.clone(),
        );
        r.register(
            "cache_fills_followed",
            "Blob fetches served from another replica's fill over the bucket (no upstream request)",
            f.followed.clone(),
        );
        r.register(
            "upstream_bytes",
            "Blob bytes received from upstreams",
            f.upstream_bytes.clone(),
        );
        let b = &self.budget.metrics;
        r.register(
            "cache_size_bytes",
            "Bytes of pulled-through blobs stored",
            b.size_bytes.clone(),
        );
        r.register(
            "cache_blobs",
            "Pulled-through blobs stored",
            b.entries.clone(),
        );
        r.register(
            "cache_evictions",
            "Blobs evicted to keep cache.max_size",
            b.evictions.clone(),
        );
        r.register(
            "cache_evicted_bytes",
            "Bytes evicted to keep cache.max_size",
            b.evicted_bytes.clone(),
        );
    }
}
