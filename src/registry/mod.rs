//! The operations the API exposes, with OCI semantics, over the storage
//! traits. No HTTP types here: bodies are byte streams, results are domain
//! values and [`RegistryError`]s.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;

use crate::cache::budget::Hold;
use crate::cache::{Cache, CacheError, CachedBlob, Routed, Target};
use crate::oci::manifest::{
    Descriptor, MAX_INDEX_DEPTH, MAX_MANIFEST_SIZE, Manifest, ManifestError, ManifestKind,
};
use crate::oci::{
    Algorithm, ByteRange, Digest, MediaType, Reference, RepoName, Tag, UploadId, UploadRange,
};
use crate::storage::{
    BlobStore, BlobUrls, ByteStream, ManifestRecord, MetaStore, RepoKind, StorageError,
    UploadRecord, UploadStore,
};
use crate::upstream::UpstreamError;

/// The empty JSON object `{}`, the config of many OCI artifacts. wharf
/// stores it on demand rather than rejecting manifests that assume it.
pub const EMPTY_JSON_DIGEST: &str =
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";

pub use crate::oci::MAX_PAGE;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("blob unknown to this repository")]
    BlobUnknown,
    #[error("manifest unknown")]
    ManifestUnknown,
    #[error("{0}")]
    ManifestNotAcceptable(String),
    #[error("repository name not known to registry")]
    NameUnknown,
    #[error("{0}")]
    NameUnknownWhy(String),
    #[error("upload session unknown")]
    UploadUnknown,
    #[error("{0}")]
    DigestInvalid(String),
    #[error("{0}")]
    ManifestInvalid(String),
    #[error("manifest is larger than {MAX_MANIFEST_SIZE} bytes")]
    ManifestTooLarge,
    #[error("manifest references {0}, which is not in this repository")]
    ManifestBlobUnknown(Digest),
    #[error("{0}")]
    SizeInvalid(String),
    #[error("{0}")]
    UploadInvalid(String),
    /// A chunk that does not start where the upload ends; carries the size.
    #[error("chunk must start at offset {current}")]
    ChunkOutOfOrder { current: u64 },
    /// A blob range beyond the end; carries the blob size.
    #[error("requested range not satisfiable")]
    RangeNotSatisfiable { size: u64 },
    #[error("{0}")]
    Unsupported(String),
    /// A query parameter with a value the endpoint cannot take (`n=abc`):
    /// 400 with the spec's UNSUPPORTED ("invalid set of parameters").
    #[error("{0}")]
    ParamInvalid(String),
    /// A repository name in a parameter (`from=`) that is not valid.
    #[error("{0}")]
    NameInvalid(String),
    /// A write into a pull-through namespace.
    #[error("{0}")]
    Denied(String),
    /// The cache could not get content from upstream (not there, or upstream
    /// failing with nothing cached); `what` says which kind of content.
    #[error("{message}")]
    Upstream { what: Missing, message: String },
    #[error("{0}")]
    TooManyRequests(String),
    #[error("reading the request body failed: {0}")]
    Body(std::io::Error),
    #[error(transparent)]
    Storage(StorageError),
}

impl From<StorageError> for RegistryError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Body(e) => RegistryError::Body(e),
            // A write of the wrong kind of content: refused, nothing written.
            e @ StorageError::WrongKind { .. } => RegistryError::Denied(e.to_string()),
            other => RegistryError::Storage(other),
        }
    }
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// The kind of content a failed upstream request was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    Manifest,
    Blob,
    Name,
}

fn cache_err(what: Missing, e: CacheError) -> RegistryError {
    match e {
        CacheError::Storage(e) => e.into(),
        CacheError::Upstream {
            host,
            source: UpstreamError::TooManyRequests { .. },
        } => RegistryError::TooManyRequests(format!("upstream {host} is rate limiting")),
        other => RegistryError::Upstream {
            what,
            message: other.to_string(),
        },
    }
}

/// A manifest found by reference.
#[derive(Debug, Clone)]
pub struct ManifestHit {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
}

/// What a manifest push stored.
#[derive(Debug, Clone)]
pub struct ManifestPushed {
    pub digest: Digest,
    pub subject: Option<Digest>,
}

/// A blob read: the whole size, the served range and the bytes.
pub struct BlobBody {
    pub size: u64,
    /// `Some` for a 206 partial response.
    pub range: Option<std::ops::Range<u64>>,
    pub stream: ByteStream,
}

/// The result of `POST .../blobs/uploads/?mount=&from=`.
pub enum MountOutcome {
    Mounted,
    /// The blob could not be mounted; a fresh upload session was opened.
    Session(UploadId),
}

/// Most referrers in one response of the referrers API, and the page size
/// when the client asks for none (`n`); the rest follow by `Link`.
pub const REFERRERS_PAGE: usize = 250;

/// A page of referrers, ordered by digest, and whether more follow.
pub struct ReferrersPage {
    pub manifests: Vec<Descriptor>,
    pub more: bool,
}

/// A page of names, and whether more follow.
pub struct Page {
    pub items: Vec<String>,
    pub more: bool,
}

/// Told about every manifest a push stored, before the push is
/// acknowledged (replication enqueues its jobs here).
#[async_trait::async_trait]
pub trait PushObserver: Send + Sync + 'static {
    /// Returns Ok only once whatever must follow the push is durable; an
    /// error fails the push (the client retries it; the manifest is
    /// already stored, so the retry is idempotent).
    async fn manifest_pushed(
        &self,
        repo: &RepoName,
        reference: &Reference,
        digest: &Digest,
    ) -> std::result::Result<(), StorageError>;
}

/// Bytes of manifest bodies kept in memory (content-addressed, so entries
/// never go stale).
const MANIFEST_CACHE_BYTES: u64 = 32 * 1024 * 1024;

#[derive(Clone)]
pub struct Registry {
    blobs: Arc<dyn BlobStore>,
    uploads: Arc<dyn UploadStore>,
    meta: Arc<dyn MetaStore>,
    manifests: moka::sync::Cache<Digest, Bytes>,
    cache: Option<Arc<Cache>>,
    observer: Option<Arc<dyn PushObserver>>,
    /// Blob GETs of hosted repositories answer with a URL of the store
    /// valid this long, instead of the bytes.
    redirects: Option<(Arc<dyn BlobUrls>, Duration)>,
    /// Counters of the local hot tier in front of the blob store, if any.
    hot: Option<crate::storage::hot::HotMetrics>,
    /// Upload sessions open (recounted from the store by
    /// [`Registry::count_upload_sessions`]) and how many may be.
    open_sessions: Arc<std::sync::atomic::AtomicUsize>,
    max_sessions: usize,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Registry {
    pub fn new(
        blobs: Arc<dyn BlobStore>,
        uploads: Arc<dyn UploadStore>,
        meta: Arc<dyn MetaStore>,
    ) -> Registry {
        let manifests = moka::sync::Cache::builder()
            .max_capacity(MANIFEST_CACHE_BYTES)
            .weigher(|_, v: &Bytes| u32::try_from(v.len()).unwrap_or(u32::MAX))
            .build();
        Registry {
            blobs,
            uploads,
            meta,
            manifests,
            cache: None,
            observer: None,
            redirects: None,
            hot: None,
            open_sessions: Arc::default(),
            max_sessions: usize::MAX,
        }
    }

    /// Tells `observer` about every manifest push before acknowledging it.
    pub fn with_observer(mut self, observer: Arc<dyn PushObserver>) -> Registry {
        self.observer = Some(observer);
        self
    }

    /// Every tag `repo` holds here (hosted or cached), without asking any
    /// upstream. Empty for an unknown repository.
    pub async fn local_tags(&self, repo: &RepoName) -> Result<Vec<Tag>> {
        let mut out = Vec::new();
        let mut last: Option<String> = None;
        loop {
            let page = self
                .meta
                .tags(repo, last.as_deref(), MAX_PAGE)
                .await?
                .unwrap_or_default();
            let done = page.len() < MAX_PAGE;
            last = page.last().cloned();
            out.extend(page.iter().filter_map(|t| t.parse().ok()));
            if done {
                return Ok(out);
            }
        }
    }

    /// The digest `tag` points at here, without asking any upstream.
    pub async fn local_tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>> {
        Ok(self.meta.resolve_tag(repo, tag).await?)
    }

    /// Whether `repo` holds manifest `digest` here (no upstream asked).
    pub async fn has_local_manifest(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        Ok(self.meta.manifest(repo, digest).await?.is_some())
    }

    /// Whether blob `digest` is readable through `repo` here (no upstream
    /// asked).
    pub async fn has_local_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        Ok(self.meta.blob_linked(repo, digest).await? && self.blobs.stat(digest).await?.is_some())
    }

    /// Whether `repo` holds content pulled through the cache.
    pub async fn is_cached(&self, repo: &RepoName) -> Result<bool> {
        Ok(self.meta.repository(repo).await? == Some(RepoKind::Cached))
    }

    /// Reports the counters of a hot tier in front of the blob store.
    pub fn with_hot_metrics(mut self, metrics: crate::storage::hot::HotMetrics) -> Registry {
        self.hot = Some(metrics);
        self
    }

    pub fn hot_metrics(&self) -> Option<&crate::storage::hot::HotMetrics> {
        self.hot.as_ref()
    }

    /// Answers blob GETs of hosted repositories with URLs of `urls` valid
    /// for `ttl` (the bytes then flow from the store, not through wharf).
    pub fn with_redirects(mut self, urls: Arc<dyn BlobUrls>, ttl: Duration) -> Registry {
        self.redirects = Some((urls, ttl));
        self
    }

    /// Serves repositories that are not hosted through `cache`.
    pub fn with_cache(mut self, cache: Arc<Cache>) -> Registry {
        self.cache = Some(cache);
        self
    }

    /// Re-hashes every stored blob, quarantining those that do not match
    /// (see [`crate::storage::fsck`]).
    pub fn fsck(
        &self,
    ) -> impl futures::Stream<
        Item = std::result::Result<crate::storage::fsck::Checked, StorageError>,
    > + Send
    + use<> {
        crate::storage::fsck::check_all(self.blobs.clone())
    }

    pub fn cache(&self) -> Option<&Arc<Cache>> {
        self.cache.as_ref()
    }

    /// How reads of `repo` are served. `ns` is containerd's `?ns=`.
    pub async fn route(&self, repo: &RepoName, ns: Option<&str>) -> Result<Routed> {
        let Some(cache) = &self.cache else {
            return Ok(Routed::Hosted);
        };
        let kind = self.meta.repository(repo).await?;
        Ok(cache
            .rules()
            .route(repo, ns, kind == Some(RepoKind::Hosted)))
    }

    async fn cached(
        &self,
        repo: &RepoName,
        ns: Option<&str>,
    ) -> Result<Option<(&Arc<Cache>, Target)>> {
        match self.route(repo, ns).await? {
            Routed::Hosted => Ok(None),
            Routed::Cached(t) => Ok(Some((self.cache.as_ref().expect("routed to the cache"), t))),
            // No rule serves that registry: the repository is unknown here,
            // whatever was asked of it (containerd falls back on the 404).
            Routed::UnknownNamespace => Err(RegistryError::Upstream {
                what: Missing::Name,
                message: format!(
                    "no pull-through rule serves registry {:?}",
                    ns.unwrap_or("")
                ),
            }),
        }
    }

    /// The repository `repo` as one that takes pushes, or why it does not:
    /// the one routing decision for writes. Every write operation exists
    /// only on the [`Hosted`] this returns, so no path writes into a
    /// pull-through namespace or answers a mirror request with a write.
    pub async fn hosted(&self, repo: &RepoName, ns: Option<&str>) -> Result<Hosted<'_>> {
        self.check_push(repo, ns)?;
        if self.cache.is_some() && self.meta.repository(repo).await? == Some(RepoKind::Cached) {
            return Err(RegistryError::Denied(format!(
                "{repo} holds content pulled through the cache; push to another repository"
            )));
        }
        Ok(Hosted {
            registry: self,
            repo: repo.clone(),
        })
    }

    /// The repository of an upload session in progress (PATCH, PUT, DELETE
    /// of `/blobs/uploads/<id>`), without reading the repository's kind
    /// again: the session was started through [`Registry::hosted`], and its
    /// commit links the blob by a write the metadata store refuses for a
    /// repository of cached content. So a chunk costs no metadata read.
    pub fn session_repo(&self, repo: &RepoName, ns: Option<&str>) -> Result<Hosted<'_>> {
        self.check_push(repo, ns)?;
        Ok(Hosted {
            registry: self,
            repo: repo.clone(),
        })
    }

    /// Refuses writes into pull-through namespaces and mirror requests.
    /// What refuses a write without reading storage: mirror requests and
    /// pull-through namespaces.
    fn check_push(&self, repo: &RepoName, ns: Option<&str>) -> Result<()> {
        let Some(cache) = &self.cache else {
            return Ok(());
        };
        if let Some(ns) = ns {
            return Err(RegistryError::Denied(format!(
                "requests for registry {ns:?} (?ns=) are mirror reads; pushes are not accepted"
            )));
        }
        if let Some(rule) = cache.rules().forbids_push(repo) {
            let prefix = rule.prefix.as_ref().map_or("ROOT", |p| p.as_str());
            return Err(RegistryError::Denied(format!(
                "{prefix}/ is a pull-through cache of {}; push to a repository outside it",
                rule.upstream.host()
            )));
        }
        Ok(())
    }

    pub fn blob_store(&self) -> &Arc<dyn BlobStore> {
        &self.blobs
    }

    /// Whether storage answers: the metadata store reads and the blob store
    /// stats (for readiness probes).
    pub async fn ready(&self) -> Result<()> {
        self.meta.repositories(None, 1).await?;
        self.blobs.stat(&Digest::sha256_of(b"")).await?;
        Ok(())
    }

    /// Re-fetches a cached tag (or manifest by digest) from upstream now,
    /// whatever its age. Only for repositories served by a pull-through rule.
    pub async fn refresh(&self, repo: &RepoName, reference: &Reference) -> Result<ManifestHit> {
        let Some((cache, t)) = self.cached(repo, None).await? else {
            return Err(RegistryError::NameUnknownWhy(format!(
                "{repo} is not served by a pull-through rule; only cached repositories refresh"
            )));
        };
        let m = cache
            .refresh(&t, reference)
            .await
            .map_err(|e| cache_err(Missing::Manifest, e))?;
        Ok(ManifestHit {
            digest: m.digest,
            media_type: m.media_type,
            size: m.size,
        })
    }

    // ---- manifests ----

    /// Finds a manifest. `accept` is the request's combined `Accept` header:
    /// a tag whose manifest type the client lists no way of accepting is
    /// answered MANIFEST_UNKNOWN, as Distribution does; a digest pins content
    /// and is always served.
    pub async fn manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        accept: Option<&str>,
        ns: Option<&str>,
    ) -> Result<ManifestHit> {
        let (digest, record) = match self.cached(repo, ns).await? {
            Some((cache, t)) => {
                let m = cache
                    .manifest(&t, reference)
                    .await
                    .map_err(|e| cache_err(Missing::Manifest, e))?;
                let record = ManifestRecord {
                    media_type: m.media_type,
                    size: m.size,
                    subject: None,
                    index_depth: None,
                };
                (m.digest, record)
            }
            None => self
                .meta
                .find_manifest(repo, reference)
                .await?
                .ok_or(RegistryError::ManifestUnknown)?,
        };
        if let (Reference::Tag(_), Some(accept)) = (reference, accept) {
            let mt = MediaType::new(&record.media_type);
            let lists_manifest_types = accept.split(',').any(|a| {
                MediaType::new(a.split(';').next().unwrap_or("").trim())
                    .kind()
                    .is_some()
            });
            if lists_manifest_types && !mt.accepted_by(accept) {
                return Err(RegistryError::ManifestNotAcceptable(format!(
                    "manifest is {}, which the Accept header does not list",
                    record.media_type
                )));
            }
        }
        Ok(ManifestHit {
            digest,
            media_type: record.media_type,
            size: record.size,
        })
    }

    /// The bytes of a manifest found by [`Registry::manifest`].
    pub async fn manifest_body(&self, hit: &ManifestHit) -> Result<Bytes> {
        if let Some(b) = self.manifests.get(&hit.digest) {
            return Ok(b);
        }
        let mut stream = match self.blobs.read(&hit.digest, None).await {
            Ok(s) => s,
            Err(StorageError::NotFound) => return Err(RegistryError::ManifestUnknown),
            Err(e) => return Err(e.into()),
        };
        let mut body = bytes::BytesMut::with_capacity(hit.size as usize);
        while let Some(chunk) = stream.next().await {
            body.extend_from_slice(&chunk.map_err(StorageError::Io)?);
            if body.len() > MAX_MANIFEST_SIZE {
                return Err(RegistryError::ManifestTooLarge);
            }
        }
        let body = body.freeze();
        // Manifests are small: what is served and remembered is checked.
        let computed = Digest::of(hit.digest.algorithm(), &body);
        if computed != hit.digest {
            return Err(StorageError::Io(std::io::Error::other(format!(
                "the stored manifest {} reads back as {computed}",
                hit.digest
            )))
            .into());
        }
        self.manifests.insert(hit.digest.clone(), body.clone());
        Ok(body)
    }

    /// Validates and stores a manifest, by tag or by digest.
    async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<ManifestPushed> {
        if body.len() > MAX_MANIFEST_SIZE {
            return Err(RegistryError::ManifestTooLarge);
        }
        let manifest = Manifest::parse(&body, content_type).map_err(|e| match e {
            ManifestError::TooLarge => RegistryError::ManifestTooLarge,
            ManifestError::Digest(m) => RegistryError::ManifestInvalid(m),
            other => RegistryError::ManifestInvalid(other.to_string()),
        })?;
        let algorithm = match reference {
            Reference::Digest(d) => d.algorithm(),
            Reference::Tag(_) => Algorithm::Sha256,
        };
        let digest = Digest::of(algorithm, &body);
        if let Reference::Digest(d) = reference
            && d != &digest
        {
            return Err(RegistryError::DigestInvalid(format!(
                "manifest content hashes to {digest}, not {d}"
            )));
        }
        // The empty config is stored on demand, once every check passed.
        let mut store_empty = false;
        for blob in &manifest.blobs {
            let stored = if self.meta.blob_linked(repo, &blob.digest).await? {
                self.blobs.stat(&blob.digest).await?
            } else {
                None
            };
            let size = match stored {
                Some(size) => size,
                None if blob.digest.as_str() == EMPTY_JSON_DIGEST => {
                    store_empty = true;
                    2
                }
                None => return Err(RegistryError::ManifestBlobUnknown(blob.digest.clone())),
            };
            if size != blob.size {
                return Err(RegistryError::ManifestInvalid(format!(
                    "the descriptor of blob {} declares {} bytes, but the blob is {size} bytes",
                    blob.digest, blob.size
                )));
            }
        }
        let mut deepest_child = 0;
        for child in &manifest.children {
            let Some(record) = self.meta.manifest(repo, &child.digest).await? else {
                return Err(RegistryError::ManifestBlobUnknown(child.digest.clone()));
            };
            if record.size != child.size {
                return Err(RegistryError::ManifestInvalid(format!(
                    "the descriptor of manifest {} declares {} bytes, but the manifest is {} bytes",
                    child.digest, child.size, record.size
                )));
            }
            let depth = self
                .stored_index_depth(repo, &child.digest, &record)
                .await?;
            deepest_child = deepest_child.max(depth);
        }
        // A subject may be pushed later; one that is here must be the size
        // its descriptor declares, like every other descriptor.
        if let Some(subject) = &manifest.subject
            && let Some(record) = self.meta.manifest(repo, &subject.digest).await?
            && record.size != subject.size
        {
            return Err(RegistryError::ManifestInvalid(format!(
                "the subject descriptor of manifest {} declares {} bytes, but the manifest is {} bytes",
                subject.digest, subject.size, record.size
            )));
        }
        let index_depth = match manifest.kind {
            ManifestKind::Image => 0,
            ManifestKind::Index => deepest_child + 1,
        };
        if index_depth > MAX_INDEX_DEPTH {
            return Err(RegistryError::ManifestInvalid(format!(
                "this index nests indexes more than {MAX_INDEX_DEPTH} levels deep; at most \
                 {MAX_INDEX_DEPTH} are accepted"
            )));
        }
        if store_empty {
            let empty: Digest = EMPTY_JSON_DIGEST.parse().expect("a valid digest");
            self.meta.pin_blob(&empty).await?;
            self.blobs.put(&empty, Bytes::from_static(b"{}")).await?;
            self.meta.link_blob(repo, RepoKind::Hosted, &empty).await?;
        }
        let size = body.len() as u64;
        // Pinned first, like a pushed blob (a blob of the same digest
        // pulled through the cache is then never evicted).
        self.meta.pin_blob(&digest).await?;
        self.blobs.put(&digest, body.clone()).await?;
        self.manifests.insert(digest.clone(), body);
        let record = ManifestRecord {
            media_type: manifest.media_type.to_string(),
            size,
            subject: manifest.subject.as_ref().map(|s| s.digest.clone()),
            index_depth: Some(index_depth as u32),
        };
        let referrer = manifest.subject.as_ref().map(|_| Descriptor {
            media_type: manifest.media_type.to_string(),
            digest: digest.clone(),
            size,
            artifact_type: manifest.artifact_type.clone(),
            annotations: manifest.annotations.clone(),
        });
        let tag = match reference {
            Reference::Tag(t) => Some(t),
            Reference::Digest(_) => None,
        };
        self.meta
            .put_manifest(
                repo,
                RepoKind::Hosted,
                &digest,
                &record,
                tag,
                referrer.as_ref(),
            )
            .await?;
        if let Some(o) = &self.observer {
            o.manifest_pushed(repo, reference, &digest).await?;
        }
        Ok(ManifestPushed {
            digest,
            subject: manifest.subject.map(|s| s.digest),
        })
    }

    /// The index depth of a manifest stored in `repo` (0 for an image
    /// manifest): recorded at its push, else (a record from before depths
    /// were kept) found by walking its stored children one level at a
    /// time, each manifest once per level, and never more than one level
    /// past [`MAX_INDEX_DEPTH`] (a result above it means "too deep").
    async fn stored_index_depth(
        &self,
        repo: &RepoName,
        digest: &Digest,
        record: &ManifestRecord,
    ) -> Result<usize> {
        let is_index =
            |r: &ManifestRecord| MediaType::new(&r.media_type).kind() == Some(ManifestKind::Index);
        if let Some(d) = record.index_depth {
            return Ok(d as usize);
        }
        if !is_index(record) {
            return Ok(0);
        }
        let mut deepest = 1;
        // Indexes without a recorded depth, `at` levels down from `digest`
        // (itself at level 1).
        let mut level: Vec<(Digest, ManifestRecord)> = vec![(digest.clone(), record.clone())];
        let mut at = 1;
        while !level.is_empty() && at <= MAX_INDEX_DEPTH {
            let mut next: Vec<(Digest, ManifestRecord)> = Vec::new();
            let mut queued: HashSet<Digest> = HashSet::new();
            for (d, r) in &level {
                let hit = ManifestHit {
                    digest: d.clone(),
                    media_type: r.media_type.clone(),
                    size: r.size,
                };
                let body = self.manifest_body(&hit).await?;
                let m = Manifest::parse(&body, Some(&r.media_type)).map_err(|e| {
                    RegistryError::ManifestInvalid(format!(
                        "stored manifest {d}, below this index, cannot be read: {e}"
                    ))
                })?;
                for c in m.children {
                    let Some(cr) = self.meta.manifest(repo, &c.digest).await? else {
                        continue;
                    };
                    match cr.index_depth {
                        Some(cd) => deepest = deepest.max(at + cd as usize),
                        None if is_index(&cr) => {
                            deepest = deepest.max(at + 1);
                            if queued.insert(c.digest.clone()) {
                                next.push((c.digest, cr));
                            }
                        }
                        None => {}
                    }
                }
            }
            level = next;
            at += 1;
        }
        Ok(deepest)
    }

    /// Deletes a tag (by tag) or a manifest and every tag pointing at it (by
    /// digest).
    async fn delete_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<()> {
        let found = match reference {
            Reference::Tag(t) => self.meta.delete_tag(repo, RepoKind::Hosted, t).await?,
            Reference::Digest(d) => self.meta.delete_manifest(repo, RepoKind::Hosted, d).await?,
        };
        if found {
            Ok(())
        } else {
            Err(RegistryError::ManifestUnknown)
        }
    }

    // ---- blobs ----

    /// Size of a blob readable through `repo`.
    pub async fn blob_size(
        &self,
        repo: &RepoName,
        digest: &Digest,
        ns: Option<&str>,
    ) -> Result<u64> {
        if let Some((cache, t)) = self.cached(repo, ns).await? {
            return cache
                .blob_size(&t, digest)
                .await
                .map_err(|e| cache_err(Missing::Blob, e));
        }
        if !self.meta.blob_linked(repo, digest).await? {
            return Err(RegistryError::BlobUnknown);
        }
        self.blobs
            .stat(digest)
            .await?
            .ok_or(RegistryError::BlobUnknown)
    }

    /// Opens a blob readable through `repo`, honouring a `Range` header.
    pub async fn blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        range: Option<&str>,
        ns: Option<&str>,
    ) -> Result<BlobBody> {
        // A malformed or multi-range header is ignored (full body), per RFC 9110.
        let wanted = range.and_then(|r| r.parse::<ByteRange>().ok());
        let resolve = |size: u64| match wanted {
            Some(r) => r
                .resolve(size)
                .map(Some)
                .ok_or(RegistryError::RangeNotSatisfiable { size }),
            None => Ok(None),
        };
        if let Some((cache, t)) = self.cached(repo, ns).await? {
            match cache
                .blob(&t, digest)
                .await
                .map_err(|e| cache_err(Missing::Blob, e))?
            {
                CachedBlob::Filling { size, fill, hold } => {
                    let range = resolve(size)?;
                    let (start, end) = range.as_ref().map_or((0, None), |r| (r.start, Some(r.end)));
                    let stream = held(cache.fills.stream(fill, start, end), hold);
                    return Ok(BlobBody {
                        size,
                        range,
                        stream,
                    });
                }
                CachedBlob::Stored { size, hold } => {
                    let range = resolve(size)?;
                    let stream = self.read_blob(digest, size, range.clone()).await?;
                    return Ok(BlobBody {
                        size,
                        range,
                        stream: held(stream, hold),
                    });
                }
            }
        } else if !self.meta.blob_linked(repo, digest).await? {
            return Err(RegistryError::BlobUnknown);
        }
        let size = self
            .blobs
            .stat(digest)
            .await?
            .ok_or(RegistryError::BlobUnknown)?;
        let range = resolve(size)?;
        let stream = self.read_blob(digest, size, range.clone()).await?;
        Ok(BlobBody {
            size,
            range,
            stream,
        })
    }

    /// Where the client should fetch a blob instead, when redirects are
    /// configured and `repo` is hosted (pushed blobs are never evicted, so
    /// the URL stays good for its lifetime). `None`: serve it here. Errors
    /// as [`Registry::blob`] for blobs the repository does not hold.
    pub async fn blob_url(
        &self,
        repo: &RepoName,
        digest: &Digest,
        ns: Option<&str>,
    ) -> Result<Option<String>> {
        let Some((urls, ttl)) = &self.redirects else {
            return Ok(None);
        };
        if self.cached(repo, ns).await?.is_some() {
            return Ok(None);
        }
        if !self.meta.blob_linked(repo, digest).await? || self.blobs.stat(digest).await?.is_none() {
            return Err(RegistryError::BlobUnknown);
        }
        Ok(Some(urls.read_url(digest, *ttl).await?))
    }

    /// Streams `range` of a blob of `size` bytes, or the whole blob; a
    /// stream that does not yield exactly that many bytes fails.
    async fn read_blob(
        &self,
        digest: &Digest,
        size: u64,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<ByteStream> {
        let len = range.as_ref().map_or(size, |r| r.end - r.start);
        match self.blobs.read(digest, range).await {
            Ok(s) => Ok(exact_length(s, len)),
            Err(StorageError::NotFound) => Err(RegistryError::BlobUnknown),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes a blob from a repository (the bytes stay for other repositories).
    async fn delete_blob(&self, repo: &RepoName, digest: &Digest) -> Result<()> {
        if self
            .meta
            .unlink_blob(repo, RepoKind::Hosted, digest)
            .await?
        {
            Ok(())
        } else {
            Err(RegistryError::BlobUnknown)
        }
    }

    /// Keeps `digest` from being evicted by the cache budget while alive.
    async fn hold(&self, digest: &Digest) -> Option<Hold> {
        match &self.cache {
            Some(c) => Some(c.budget.hold(digest).await),
            None => None,
        }
    }

    /// Pins `digest` (see [`MetaStore::pin_blob`]) and tells whether it is
    /// stored: if so, it stays stored.
    async fn pinned_and_stored(&self, digest: &Digest) -> Result<bool> {
        self.meta.pin_blob(digest).await?;
        Ok(self.blobs.stat(digest).await?.is_some())
    }

    /// A push linked `digest` into a hosted repository (which pinned it):
    /// it leaves the cache budget.
    async fn unbudget(&self, digest: &Digest) -> Result<()> {
        if let Some(c) = &self.cache {
            c.budget.pinned(digest).await?;
        }
        Ok(())
    }

    // ---- uploads ----

    async fn start_upload(&self, repo: &RepoName) -> Result<UploadId> {
        use std::sync::atomic::Ordering;
        let max = self.max_sessions;
        if self
            .open_sessions
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            return Err(RegistryError::TooManyRequests(format!(
                "{max} upload sessions are open (storage.max_upload_sessions); finish or \
                 cancel one, or wait until idle ones are purged"
            )));
        }
        let started = self.create_session(repo).await;
        if started.is_err() {
            self.session_ended();
        }
        started
    }

    async fn create_session(&self, repo: &RepoName) -> Result<UploadId> {
        let id = UploadId::new_random();
        self.uploads.create(&id).await?;
        self.meta
            .put_upload(
                &id,
                &UploadRecord {
                    repository: repo.to_string(),
                    started: unix_now(),
                },
            )
            .await?;
        Ok(id)
    }

    async fn check_session(&self, repo: &RepoName, id: &UploadId) -> Result<()> {
        match self.meta.upload(id).await? {
            Some(r) if r.repository == repo.as_str() => Ok(()),
            _ => Err(RegistryError::UploadUnknown),
        }
    }

    fn session_ended(&self) {
        let _ = self.open_sessions.fetch_update(
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
            |n| Some(n.saturating_sub(1)),
        );
    }

    /// Counts the upload sessions the store records (at start, and after
    /// every purge: sessions other replicas ended are then forgotten here).
    pub async fn count_upload_sessions(&self) -> Result<usize> {
        let n = self.meta.uploads().await?.len();
        self.open_sessions
            .store(n, std::sync::atomic::Ordering::SeqCst);
        Ok(n)
    }

    /// Refuses new upload sessions once `max` are open.
    pub fn with_max_upload_sessions(mut self, max: usize) -> Registry {
        self.max_sessions = max;
        self
    }

    async fn end_session(&self, id: &UploadId) {
        self.session_ended();
        if let Err(e) = self.meta.delete_upload(id).await {
            tracing::warn!(upload = %id, error = %e, "could not remove upload record");
        }
    }

    /// Bytes received so far by an upload session.
    pub async fn upload_status(&self, repo: &RepoName, id: &UploadId) -> Result<u64> {
        self.check_session(repo, id).await?;
        match self.uploads.size(id).await {
            Ok(n) => Ok(n),
            Err(StorageError::NotFound) => Err(RegistryError::UploadUnknown),
            Err(e) => Err(e.into()),
        }
    }

    /// Appends a chunk (PATCH). `range` is the `Content-Range`, `length` the
    /// `Content-Length`; without a range the chunk goes at the end.
    async fn append_upload(
        &self,
        repo: &RepoName,
        id: &UploadId,
        range: Option<UploadRange>,
        length: Option<u64>,
        body: ByteStream,
    ) -> Result<u64> {
        let current = self.upload_status(repo, id).await?;
        let (offset, expected) = match range {
            Some(r) => {
                if r.start != current {
                    return Err(RegistryError::ChunkOutOfOrder { current });
                }
                if length.is_some_and(|l| l != r.len()) {
                    return Err(RegistryError::SizeInvalid(format!(
                        "Content-Range covers {} bytes but Content-Length is {}",
                        r.len(),
                        length.unwrap_or(0)
                    )));
                }
                (r.start, Some(r.len()))
            }
            None => (current, length),
        };
        self.append(id, offset, expected, body).await
    }

    async fn append(
        &self,
        id: &UploadId,
        offset: u64,
        expected: Option<u64>,
        body: ByteStream,
    ) -> Result<u64> {
        match self.uploads.append(id, offset, expected, body).await {
            Ok(n) => Ok(n),
            Err(StorageError::OffsetMismatch { current, .. }) => {
                Err(RegistryError::ChunkOutOfOrder { current })
            }
            Err(StorageError::SizeMismatch { expected, actual }) => Err(
                RegistryError::SizeInvalid(format!("expected {expected} bytes, received {actual}")),
            ),
            Err(StorageError::NotFound) => Err(RegistryError::UploadUnknown),
            Err(e) => Err(e.into()),
        }
    }

    /// Completes an upload (PUT ?digest=), with an optional last chunk.
    async fn finish_upload(
        &self,
        repo: &RepoName,
        id: &UploadId,
        digest: &Digest,
        last_chunk: Option<(Option<UploadRange>, Option<u64>, ByteStream)>,
    ) -> Result<()> {
        if let Some((range, length, body)) = last_chunk {
            self.append_upload(repo, id, range, length, body).await?;
        } else {
            self.check_session(repo, id).await?;
        }
        self.commit_upload(repo, id, digest, true).await
    }

    /// Verifies and publishes a staged upload, links the blob into `repo`;
    /// `recorded`: the session has an upload record, which ends with it.
    async fn commit_upload(
        &self,
        repo: &RepoName,
        id: &UploadId,
        digest: &Digest,
        recorded: bool,
    ) -> Result<()> {
        // Publishing and linking happen under a hold, so the cache budget
        // cannot evict a pulled-through copy of the same digest in between;
        // the pin comes first, so no replica's evictor deletes the blob
        // once the commit found it stored or published it.
        let _hold = self.hold(digest).await;
        self.meta.pin_blob(digest).await?;
        let result = self.uploads.commit(id, digest).await;
        if recorded {
            self.end_session(id).await;
        }
        match result {
            Ok(_) => {
                self.meta.link_blob(repo, RepoKind::Hosted, digest).await?;
                self.unbudget(digest).await?;
                Ok(())
            }
            Err(StorageError::DigestMismatch { expected, computed }) => {
                Err(RegistryError::DigestInvalid(format!(
                    "content hashes to {computed}, not {expected}"
                )))
            }
            Err(StorageError::NotFound) => Err(RegistryError::UploadUnknown),
            Err(e) => Err(e.into()),
        }
    }

    /// A whole blob in one request (`POST ?digest=`). Its staging has no
    /// upload record: the session's id never leaves this request, so no
    /// client can resume it, and staging without a record is an orphan that
    /// [`Registry::discard_orphan_uploads`] removes at start (a push cut
    /// short by a crash leaves nothing for long).
    async fn monolithic_upload(
        &self,
        repo: &RepoName,
        digest: &Digest,
        length: Option<u64>,
        body: ByteStream,
    ) -> Result<()> {
        let id = UploadId::new_random();
        self.uploads.create(&id).await?;
        let appended = self.append(&id, 0, length, body).await;
        if let Err(e) = appended {
            let _ = self.uploads.abort(&id).await;
            return Err(e);
        }
        self.commit_upload(repo, &id, digest, false).await
    }

    /// Removes staged uploads that have no upload record (monolithic pushes
    /// and session starts cut short by a crash: no client holds their id)
    /// and records whose staging is gone. Returns how many stagings went.
    ///
    /// Only for a store no other process uses while this runs (the
    /// filesystem backend at start, which the database's lock guarantees):
    /// beside another replica, its monolithic pushes in progress look the
    /// same. Over S3 the periodic purge (`storage.upload_max_age`) removes
    /// them instead.
    pub async fn discard_orphan_uploads(&self) -> Result<usize> {
        let records = self.meta.uploads().await?;
        let staged = self.uploads.list().await?;
        let mut discarded = 0;
        for (id, _) in &staged {
            if !records.iter().any(|(r, _)| r == id) {
                self.uploads.abort(id).await?;
                discarded += 1;
            }
        }
        for (id, _) in &records {
            if !staged.iter().any(|(s, _)| s == id) {
                self.end_session(id).await;
            }
        }
        Ok(discarded)
    }

    /// Cancels an upload session.
    async fn cancel_upload(&self, repo: &RepoName, id: &UploadId) -> Result<()> {
        self.check_session(repo, id).await?;
        self.uploads.abort(id).await?;
        self.end_session(id).await;
        Ok(())
    }

    /// Cross-repository mount; falls back to a new session when `from` does
    /// not hold the blob (or is not given).
    async fn mount(
        &self,
        repo: &RepoName,
        digest: &Digest,
        from: Option<&RepoName>,
    ) -> Result<MountOutcome> {
        if let Some(from) = from {
            let _hold = self.hold(digest).await;
            // Stored after the pin: no evictor deletes it any more.
            if self.meta.blob_linked(from, digest).await?
                && self.blobs.stat(digest).await?.is_some()
                && self.pinned_and_stored(digest).await?
            {
                self.meta.link_blob(repo, RepoKind::Hosted, digest).await?;
                self.unbudget(digest).await?;
                return Ok(MountOutcome::Mounted);
            }
        }
        Ok(MountOutcome::Session(self.start_upload(repo).await?))
    }

    /// Drops upload sessions idle for longer than `max_age`. Returns how many.
    pub async fn purge_uploads(&self, max_age: Duration) -> Result<usize> {
        let now = SystemTime::now();
        let mut purged = 0;
        let staged = self.uploads.list().await?;
        for (id, modified) in &staged {
            let idle = now.duration_since(*modified).unwrap_or_default();
            if idle > max_age {
                self.uploads.abort(id).await?;
                self.end_session(id).await;
                purged += 1;
            }
        }
        // Records whose staged bytes are gone. A session created after the
        // listing above has its record but was not listed: only drop a record
        // whose staging is confirmed absent now.
        for (id, _) in self.meta.uploads().await? {
            if !staged.iter().any(|(s, _)| s == &id)
                && matches!(self.uploads.size(&id).await, Err(StorageError::NotFound))
            {
                self.end_session(&id).await;
            }
        }
        self.count_upload_sessions().await?;
        Ok(purged)
    }

    // ---- listings ----

    pub async fn tags(
        &self,
        repo: &RepoName,
        last: Option<&str>,
        n: Option<usize>,
        ns: Option<&str>,
    ) -> Result<Page> {
        if let Some((cache, t)) = self.cached(repo, ns).await? {
            let (items, more) = cache
                .tags(&t, n, last)
                .await
                .map_err(|e| cache_err(Missing::Name, e))?;
            return Ok(Page { items, more });
        }
        let n = n.unwrap_or(MAX_PAGE).min(MAX_PAGE);
        let mut items = self
            .meta
            .tags(repo, last, n.saturating_add(1))
            .await?
            .ok_or(RegistryError::NameUnknown)?;
        let more = items.len() > n;
        items.truncate(n);
        Ok(Page { items, more })
    }

    pub async fn catalog(&self, last: Option<&str>, n: Option<usize>) -> Result<Page> {
        let n = n.unwrap_or(1000).min(MAX_PAGE);
        let mut items = self.meta.repositories(last, n.saturating_add(1)).await?;
        let more = items.len() > n;
        items.truncate(n);
        Ok(Page { items, more })
    }

    /// Referrers of `subject` in `repo`, optionally filtered by artifact type.
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
        ns: Option<&str>,
    ) -> Result<Vec<Descriptor>> {
        if let Some((cache, t)) = self.cached(repo, ns).await? {
            return cache
                .referrers(&t, subject, artifact_type)
                .await
                .map_err(|e| cache_err(Missing::Manifest, e));
        }
        let mut all = self.meta.referrers(repo, subject).await?;
        if let Some(t) = artifact_type {
            all.retain(|d| d.artifact_type.as_deref() == Some(t));
        }
        Ok(all)
    }
}

impl Registry {
    /// One page of [`Registry::referrers`]: ordered by digest, those after
    /// `last`, at most `n` (and at most [`REFERRERS_PAGE`]). A referrer
    /// pushed while a client pages lands in its place in the order, so the
    /// pages of one listing never repeat a referrer nor skip one that was
    /// there throughout.
    pub async fn referrers_page(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
        last: Option<&Digest>,
        n: Option<usize>,
        ns: Option<&str>,
    ) -> Result<ReferrersPage> {
        let mut all = self.referrers(repo, subject, artifact_type, ns).await?;
        all.sort_by(|a, b| a.digest.cmp(&b.digest));
        all.dedup_by(|a, b| a.digest == b.digest);
        let n = n.unwrap_or(REFERRERS_PAGE).min(REFERRERS_PAGE);
        let start = last.map_or(0, |l| all.partition_point(|d| &d.digest <= l));
        let more = all.len() - start > n;
        all.truncate(start + n.min(all.len() - start));
        all.drain(..start);
        Ok(ReferrersPage {
            manifests: all,
            more,
        })
    }
}

/// A repository that takes pushes, made only by [`Registry::hosted`] after
/// the routing decision: the registry's write operations exist here and
/// nowhere else. (Below it, the metadata store refuses a write of pushed
/// content into a repository holding cached content, whatever the path.)
pub struct Hosted<'r> {
    registry: &'r Registry,
    repo: RepoName,
}

impl Hosted<'_> {
    pub fn name(&self) -> &RepoName {
        &self.repo
    }

    /// Validates and stores a manifest, by tag or by digest.
    pub async fn put_manifest(
        &self,
        reference: &Reference,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<ManifestPushed> {
        self.registry
            .put_manifest(&self.repo, reference, content_type, body)
            .await
    }

    /// Deletes a tag (by tag) or a manifest and every tag pointing at it (by
    /// digest).
    pub async fn delete_manifest(&self, reference: &Reference) -> Result<()> {
        self.registry.delete_manifest(&self.repo, reference).await
    }

    /// Removes a blob from the repository (the bytes stay for others).
    pub async fn delete_blob(&self, digest: &Digest) -> Result<()> {
        self.registry.delete_blob(&self.repo, digest).await
    }

    pub async fn start_upload(&self) -> Result<UploadId> {
        self.registry.start_upload(&self.repo).await
    }

    /// Appends a chunk (PATCH); see [`Registry::append_upload`].
    pub async fn append_upload(
        &self,
        id: &UploadId,
        range: Option<UploadRange>,
        length: Option<u64>,
        body: ByteStream,
    ) -> Result<u64> {
        self.registry
            .append_upload(&self.repo, id, range, length, body)
            .await
    }

    /// Completes an upload (PUT ?digest=), with an optional last chunk.
    pub async fn finish_upload(
        &self,
        id: &UploadId,
        digest: &Digest,
        last_chunk: Option<(Option<UploadRange>, Option<u64>, ByteStream)>,
    ) -> Result<()> {
        self.registry
            .finish_upload(&self.repo, id, digest, last_chunk)
            .await
    }

    /// A whole blob in one request (`POST ?digest=`).
    pub async fn monolithic_upload(
        &self,
        digest: &Digest,
        length: Option<u64>,
        body: ByteStream,
    ) -> Result<()> {
        self.registry
            .monolithic_upload(&self.repo, digest, length, body)
            .await
    }

    pub async fn cancel_upload(&self, id: &UploadId) -> Result<()> {
        self.registry.cancel_upload(&self.repo, id).await
    }

    /// Cross-repository mount; falls back to a new session when `from` does
    /// not hold the blob (or is not given).
    pub async fn mount(&self, digest: &Digest, from: Option<&RepoName>) -> Result<MountOutcome> {
        self.registry.mount(&self.repo, digest, from).await
    }
}

/// `stream`, failing (instead of ending cleanly) unless it yields exactly
/// `len` bytes: a store read that ends early or runs long never reaches a
/// client as a complete body.
fn exact_length(stream: ByteStream, len: u64) -> ByteStream {
    futures::stream::unfold(
        (stream, 0u64, false),
        move |(mut s, seen, done)| async move {
            if done {
                return None;
            }
            match s.next().await {
                Some(Ok(b)) => {
                    let seen = seen + b.len() as u64;
                    if seen > len {
                        let e =
                            std::io::Error::other(format!("blob read ran past its {len} bytes"));
                        return Some((Err(e), (s, seen, true)));
                    }
                    Some((Ok(b), (s, seen, false)))
                }
                Some(Err(e)) => Some((Err(e), (s, seen, true))),
                None if seen < len => {
                    let e = std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("blob read ended after {seen} of {len} bytes"),
                    );
                    Some((Err(e), (s, seen, true)))
                }
                None => None,
            }
        },
    )
    .boxed()
}

/// `stream`, keeping `hold` alive until the stream is dropped: the cache
/// budget never evicts a blob while a response streams it.
fn held(stream: ByteStream, hold: Hold) -> ByteStream {
    stream
        .map(move |chunk| {
            let _ = &hold;
            chunk
        })
        .boxed()
}
