//! Storage: a content-addressed blob store with verified upload staging, and
//! a metadata store for repositories, tags, links, referrers and upload
//! sessions. Blobs are keyed only by digest; repository names never reach the
//! blob store.
//!
//! Backends: [`fs`] (blobs on a local filesystem) and [`meta`] (an embedded
//! redb database) for one machine; [`s3`] and [`s3meta`] (an S3-compatible
//! bucket shared by several replicas), with [`hot`] as an optional local
//! disk tier in front of it. [`jobs`] is the durable replication queue.
//! [`conformance`] is the suite every backend must pass; [`faulty`] wraps a
//! backend to inject faults (failures, truncation, stalls) under it.

pub mod conformance;
pub mod faulty;
pub mod fs;
pub mod fsck;
pub mod hot;
pub mod jobs;
pub mod meta;
pub mod s3;
pub mod s3jobs;
pub mod s3lease;
pub mod s3meta;
pub mod window;

use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use crate::oci::manifest::Descriptor;
use crate::oci::{Digest, Reference, RepoName, Tag, UploadId};

pub use crate::oci::ByteStream;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("not found")]
    NotFound,
    #[error("upload is at offset {current}, chunk starts at {requested}")]
    OffsetMismatch { current: u64, requested: u64 },
    #[error("digest mismatch: expected {expected}, content hashes to {computed}")]
    DigestMismatch { expected: Digest, computed: Digest },
    #[error("size mismatch: expected {expected} bytes, received {actual}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("reading the request body failed: {0}")]
    Body(io::Error),
    #[error("storage I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("metadata store error: {0}")]
    Meta(String),
    /// A write of one kind of content (pushed or pulled through) into a
    /// repository of the other kind. Nothing was written.
    #[error("repository {repo} holds {} content; it takes no {} writes", .kind.describe(), .kind.other().describe())]
    WrongKind { repo: String, kind: RepoKind },
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Published, verified blobs keyed by digest.
///
/// Contract: a blob is visible (to `stat`, `read`, `list`) only once its full
/// content has been verified against its digest and made durable; no caller
/// can ever observe a partially written or unverified blob. Publishing the
/// same digest twice is a no-op. Because of this, a stored blob is proof of
/// its content: publishing verified bytes finds the digest stored with
/// their size and writes nothing (a stored blob of another size is
/// replaced).
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Size of the blob, or `None` if it is not stored.
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>>;
    /// Streams `range` (already resolved against the size) or the whole
    /// blob. `NotFound` if absent.
    async fn read(&self, digest: &Digest, range: Option<Range<u64>>) -> Result<ByteStream>;
    /// Stores small content held in memory (manifests). Fails with
    /// `DigestMismatch` unless `bytes` hash to `digest`.
    async fn put(&self, digest: &Digest, bytes: Bytes) -> Result<()>;
    /// Removes a blob. Returns whether it existed.
    async fn delete(&self, digest: &Digest) -> Result<bool>;
    /// Every stored digest (for fsck and garbage collection).
    async fn list(&self) -> Result<Vec<Digest>>;
    /// Moves a blob out of service, keeping its bytes for inspection.
    async fn quarantine(&self, digest: &Digest) -> Result<()>;
}

/// Blob stores whose published blobs clients can fetch directly, without
/// the bytes passing through wharf (presigned URLs of an object store).
#[async_trait]
pub trait BlobUrls: Send + Sync + 'static {
    /// A URL that answers `GET` (with `Range`) with the blob's bytes for
    /// `ttl`. Does not check that the blob exists.
    async fn read_url(&self, digest: &Digest, ttl: std::time::Duration) -> Result<String>;
}

/// Upload sessions: bytes staged next to the blob store, hashed as they
/// arrive, published into the [`BlobStore`] only by a verified commit.
///
/// Contract: `append` is all-or-nothing (a failed or short chunk leaves the
/// session as it was) and durable before it returns; a session survives a
/// restart; `commit` publishes atomically only if the content matches the
/// expected digest (and size), and consumes the session either way.
#[async_trait]
pub trait UploadStore: Send + Sync + 'static {
    async fn create(&self, id: &UploadId) -> Result<()>;
    /// Bytes received so far. `NotFound` for an unknown session.
    async fn size(&self, id: &UploadId) -> Result<u64>;
    /// Appends a chunk that must start at `offset` (the current size) and,
    /// when `expected_len` is given, be exactly that long. Returns the new size.
    async fn append(
        &self,
        id: &UploadId,
        offset: u64,
        expected_len: Option<u64>,
        body: ByteStream,
    ) -> Result<u64>;
    /// Verifies the staged content against `expected` and publishes it.
    /// Returns the blob's size. On mismatch nothing is published and the
    /// session is removed.
    async fn commit(&self, id: &UploadId, expected: &Digest) -> Result<u64>;
    /// Drops a session and its staged bytes. Unknown ids are not an error.
    async fn abort(&self, id: &UploadId) -> Result<()>;
    /// Every session with the time it last received bytes.
    async fn list(&self) -> Result<Vec<(UploadId, SystemTime)>>;
}

/// Blobs filled from elsewhere (the pull-through cache): one sequential
/// writer, concurrent readers of the bytes written so far, publication only
/// by a verified commit.
#[async_trait]
pub trait FillStore: Send + Sync + 'static {
    /// Starts staging a new blob.
    async fn begin_fill(&self) -> Result<Box<dyn FillWriter>>;
    /// Bytes free where fills stage (`None`: not known), so that a fill
    /// too large for it is refused before its first byte.
    async fn staging_space(&self) -> Result<Option<u64>> {
        Ok(None)
    }
}

/// Bytes free on the file system holding `dir` (for unprivileged writers).
pub(crate) fn free_space(dir: &std::path::Path) -> Result<Option<u64>> {
    match rustix::fs::statvfs(dir) {
        Ok(s) => Ok(Some(s.f_bavail.saturating_mul(s.f_frsize))),
        Err(e) => Err(StorageError::Io(e.into())),
    }
}

/// The writer of one fill. Dropping it without `commit` leaves staged bytes
/// that are never published (the store removes them at the next start).
#[async_trait]
pub trait FillWriter: Send + Sync {
    /// Appends `data`, hashing it; once this returns, readers from
    /// [`FillWriter::staged`] can read it.
    async fn write(&mut self, data: &[u8]) -> Result<()>;
    /// Bytes written so far.
    fn written(&self) -> u64;
    /// A reader of the staged bytes, valid as long as it is held, including
    /// after `commit` or `abort`.
    fn staged(&self) -> Arc<dyn StagedReader>;
    /// Checks the bytes written against `expected` (a `DigestMismatch`
    /// otherwise), without making them durable or publishing them.
    async fn verify(&self, expected: &Digest) -> Result<()>;
    /// Makes the bytes durable, verifies them against `expected` and
    /// publishes them. Nothing is published on a mismatch.
    async fn commit(self: Box<Self>, expected: &Digest) -> Result<u64>;
    /// Discards the staged bytes.
    async fn abort(self: Box<Self>);
}

/// Whose a cluster-wide fill is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// This replica fetches the blob and publishes its parts.
    Ours,
    /// Another replica does; `total` is the size once it learnt it.
    Theirs { total: Option<u64> },
}

/// Leases and growing parts of fills shared by several replicas (one
/// upstream fetch per blob for the whole cluster).
///
/// Contract: at most one unexpired lease per digest; parts are written at
/// increasing offsets by the lease holder, each once (create-only), and
/// never change; `part` returns bytes starting at `offset` (the rest of
/// the part that holds it, or a piece of the published blob once the
/// holder published it and removed its parts), or `None` if they are not
/// there yet.
#[async_trait]
pub trait FillLeases: Send + Sync + 'static {
    /// Takes the lease of `digest` if it is free or expired.
    async fn acquire(
        &self,
        digest: &Digest,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<LeaseState>;
    /// Extends the lease (and records the size once known). `false` if it
    /// is no longer ours.
    async fn renew(
        &self,
        digest: &Digest,
        holder: &str,
        ttl: std::time::Duration,
        total: Option<u64>,
    ) -> Result<bool>;
    /// Whether a lease exists: `(unexpired, total)`.
    async fn state(&self, digest: &Digest) -> Result<Option<(bool, Option<u64>)>>;
    /// Writes the part at `offset` unless one is there: `false` if it was
    /// (another holder wrote it, so this one is no longer the holder).
    async fn put_part(&self, digest: &Digest, offset: u64, bytes: Bytes) -> Result<bool>;
    /// With the blob's size when the bytes came from the published blob.
    async fn part(&self, digest: &Digest, offset: u64) -> Result<Option<(Bytes, Option<u64>)>>;
    /// Removes the lease and the parts (only the holder's).
    async fn release(&self, digest: &Digest, holder: &str) -> Result<()>;
}

/// Reads the bytes of a fill in progress.
#[async_trait]
pub trait StagedReader: Send + Sync {
    /// Up to `len` bytes at `offset`; fewer only past what is written.
    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes>;
}

/// What a repository knows about one of its manifests.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ManifestRecord {
    pub media_type: String,
    pub size: u64,
    /// The subject this manifest refers to, if it is a referrer.
    #[serde(default)]
    pub subject: Option<Digest>,
    /// Levels of index nesting (0: an image manifest; 1: an index of
    /// images; ...), as checked when it was pushed. `None` where it was not
    /// recorded (records of the cache, or written before depths were).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_depth: Option<u32>,
}

/// A blob the cache budget accounts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheEntry {
    pub size: u64,
    /// Last access, Unix microseconds (strictly increasing within a process).
    pub accessed: u64,
}

/// What [`MetaStore::claim_eviction`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvictionClaim {
    /// The blob is the evictor's to delete: it must have deleted it
    /// before `deadline` (`None`: no deadline) and then end the claim with
    /// `token`; past the deadline it must not delete it any more. The
    /// deadline is wall-clock time, like the claim's expiry other replicas
    /// compare, and counts from before the claim was written: a claim
    /// whose write was slow leaves less time, or none.
    Claimed {
        token: String,
        deadline: Option<std::time::SystemTime>,
    },
    /// A push pinned it: it is never evicted.
    Pinned,
    /// Another evictor's claim stands.
    Busy,
}

/// An upload session's metadata.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UploadRecord {
    pub repository: String,
    /// Unix seconds.
    pub started: u64,
}

/// Whether a repository holds pushed content or content pulled through the
/// cache. A repository keeps the kind it was created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Hosted = 1,
    Cached = 2,
}

impl RepoKind {
    pub fn describe(self) -> &'static str {
        match self {
            RepoKind::Hosted => "pushed",
            RepoKind::Cached => "pulled-through",
        }
    }

    /// Refuses a write of `wanted` content into `repo`, a repository of
    /// this kind, unless the kinds agree.
    pub fn admit(self, repo: &str, wanted: RepoKind) -> Result<()> {
        if self == wanted {
            Ok(())
        } else {
            Err(StorageError::WrongKind {
                repo: repo.to_string(),
                kind: self,
            })
        }
    }

    pub fn other(self) -> RepoKind {
        match self {
            RepoKind::Hosted => RepoKind::Cached,
            RepoKind::Cached => RepoKind::Hosted,
        }
    }
}

/// Repositories, tags, blob links, manifests, referrers and upload sessions.
///
/// Contract: every mutating call is atomic and durable when it returns Ok;
/// listings are in lexical (byte) order.
///
/// Every call that changes a repository's content names the kind of content
/// it writes (`RepoKind`): the first such write creates the repository with
/// that kind, which never changes, and a write of the other kind fails with
/// `StorageError::WrongKind` and changes nothing, checked in the same
/// transaction (or, over a bucket, against the repository's create-once
/// record). So the cache can never write into a repository holding pushed
/// content, whatever routed it there, and a push never into a cached one.
#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    /// The kind of a known repository.
    async fn repository(&self, repo: &RepoName) -> Result<Option<RepoKind>>;
    /// Makes `digest` readable through `repo` (creating the repository with
    /// `kind`). Linking into a hosted repository also pins the blob first
    /// (as `pin_blob` does, waiting out an eviction claim): the cache budget
    /// never evicts a pinned blob.
    async fn link_blob(&self, repo: &RepoName, kind: RepoKind, digest: &Digest) -> Result<()>;
    async fn blob_linked(&self, repo: &RepoName, digest: &Digest) -> Result<bool>;
    /// Returns whether a link existed.
    async fn unlink_blob(&self, repo: &RepoName, kind: RepoKind, digest: &Digest) -> Result<bool>;

    /// Records a manifest in `repo` (created with `kind`), optionally points
    /// `tag` at it, and indexes it as a referrer of its subject — all in one
    /// transaction.
    async fn put_manifest(
        &self,
        repo: &RepoName,
        kind: RepoKind,
        digest: &Digest,
        record: &ManifestRecord,
        tag: Option<&Tag>,
        referrer: Option<&Descriptor>,
    ) -> Result<()>;
    async fn manifest(&self, repo: &RepoName, digest: &Digest) -> Result<Option<ManifestRecord>>;
    /// The manifest `reference` names in `repo` and its digest: a tag is
    /// resolved and its record read. Backends that can should answer from
    /// one consistent snapshot (this is the hot path of every pull).
    async fn find_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<(Digest, ManifestRecord)>> {
        let digest = match reference {
            Reference::Digest(d) => d.clone(),
            Reference::Tag(t) => match self.resolve_tag(repo, t).await? {
                Some(d) => d,
                None => return Ok(None),
            },
        };
        Ok(self.manifest(repo, &digest).await?.map(|r| (digest, r)))
    }
    /// Removes a manifest, every tag pointing at it and its referrer entry.
    async fn delete_manifest(
        &self,
        repo: &RepoName,
        kind: RepoKind,
        digest: &Digest,
    ) -> Result<bool>;
    async fn resolve_tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>>;
    /// When a cached tag was last confirmed upstream (Unix seconds).
    async fn tag_checked(&self, repo: &RepoName, tag: &Tag) -> Result<Option<u64>>;
    async fn set_tag_checked(&self, repo: &RepoName, tag: &Tag, unix_secs: u64) -> Result<()>;
    async fn delete_tag(&self, repo: &RepoName, kind: RepoKind, tag: &Tag) -> Result<bool>;
    /// Up to `n` tags after `last`; `None` if the repository is unknown.
    async fn tags(
        &self,
        repo: &RepoName,
        last: Option<&str>,
        n: usize,
    ) -> Result<Option<Vec<String>>>;
    /// Up to `n` repository names after `last`.
    async fn repositories(&self, last: Option<&str>, n: usize) -> Result<Vec<String>>;
    /// Manifests in `repo` whose subject is `subject`.
    async fn referrers(&self, repo: &RepoName, subject: &Digest) -> Result<Vec<Descriptor>>;

    /// Whether `digest` was ever linked into a hosted repository.
    async fn blob_pinned(&self, digest: &Digest) -> Result<bool>;
    /// Pins `digest` before a push publishes or links it. While an
    /// eviction claim on it stands, this waits until the claim ends (the
    /// blob then deleted or kept) or expires; once it returns, no evictor
    /// deletes `digest`, so a blob the caller finds stored (or publishes)
    /// after this stays. The pin is durable once the caller's next
    /// mutation (a link, a manifest record) returns.
    async fn pin_blob(&self, digest: &Digest) -> Result<()>;
    /// Claims `digest` for deletion by the cache's evictor: refused if it
    /// is pinned or another claim stands. A claim makes `pin_blob` wait.
    async fn claim_eviction(&self, digest: &Digest) -> Result<EvictionClaim>;
    /// Ends a claim `claim_eviction` gave (a claim taken over since is
    /// left alone).
    async fn end_eviction(&self, digest: &Digest, token: &str) -> Result<()>;
    /// Every blob the cache budget accounts for.
    async fn cache_entries(&self) -> Result<Vec<(Digest, CacheEntry)>>;
    /// Inserts or replaces budget entries, in one transaction.
    async fn put_cache_entries(&self, entries: &[(Digest, CacheEntry)]) -> Result<()>;
    async fn delete_cache_entry(&self, digest: &Digest) -> Result<()>;

    async fn put_upload(&self, id: &UploadId, record: &UploadRecord) -> Result<()>;
    async fn upload(&self, id: &UploadId) -> Result<Option<UploadRecord>>;
    async fn delete_upload(&self, id: &UploadId) -> Result<()>;
    async fn uploads(&self) -> Result<Vec<(UploadId, UploadRecord)>>;
}
