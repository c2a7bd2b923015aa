//! The metadata store in the S3 bucket, shared by every replica: one small
//! JSON object per record under `<prefix>/meta/`.
//!
//! Layout (`<repo>` is the repository name with `/` written as `!`, a
//! character no repository name contains, so each repository is one flat
//! key segment; `<d>` is a digest as `<algorithm>-<hex>`):
//! - `repos/<repo>`: the repository's kind (created once, `If-None-Match`);
//! - `tags/<repo>/<tag>`: the tag's digest and its write count; an empty
//!   object is a deleted tag (a tombstone, so that deletion is a
//!   conditional write too);
//! - `checked/<repo>/<tag>`: last upstream check of a cached tag;
//! - `links/<repo>/<d>`, `manifests/<repo>/<d>`,
//!   `referrers/<repo>/<subject d>/<d>`;
//! - `pins/<d>`: `1` once a push pinned the blob; while the cache's
//!   evictor deletes it, its claim (JSON: token and expiry); empty when
//!   the claim ended. Changed only by compare-and-swap, so a pin and an
//!   eviction claim never both succeed (ARCHITECTURE.md, invariant 10);
//! - `cache/<d>`, `uploads/<id>`.
//!
//! **Concurrency.** Records that two replicas can race on are changed by
//! compare-and-swap: read the object and its ETag, write with `If-Match`
//! (or `If-None-Match: *` when absent), and start again on a precondition
//! failure. Tags are the main case: concurrent retags never lose a write,
//! which each tag's write count makes observable. Content-addressed records
//! (links, manifest records, referrers) are idempotent and written
//! plainly.
//!
//! **No transactions.** Where the redb store uses one transaction, this
//! store orders its writes so that a crash between two leaves nothing that
//! points at a missing record: `put_manifest` writes the repository, the
//! manifest record and the referrer entry before it moves the tag;
//! `delete_manifest` removes the tags before the record; `link_blob` pins
//! before it links.
//!
//! Listings read the keys under a prefix and sort them here (S3 lists in
//! byte order, but not every compatible store promises it).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    GetOptions, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    UpdateVersion,
};
use serde::{Deserialize, Serialize};

use super::s3::{Keys, os_err};
use super::{
    CacheEntry, EvictionClaim, ManifestRecord, MetaStore, RepoKind, Result, StorageError,
    UploadRecord,
};
use crate::oci::manifest::Descriptor;
use crate::oci::{Digest, RepoName, Tag, UploadId};

/// Concurrent GETs when a listing reads record bodies.
const READ_CONCURRENCY: usize = 16;
/// Compare-and-swap attempts before giving up.
const CAS_ATTEMPTS: u32 = 1000;

fn meta_err(e: impl std::fmt::Display) -> StorageError {
    StorageError::Meta(e.to_string())
}

pub(crate) fn enc_repo(repo: &str) -> String {
    repo.replace('/', "!")
}

fn dec_repo(s: &str) -> String {
    s.replace('!', "/")
}

fn enc_digest(d: &Digest) -> String {
    format!("{}-{}", d.algorithm().as_str(), d.hex())
}

fn dec_digest(s: &str) -> Option<Digest> {
    let (alg, hex) = s.split_once('-')?;
    format!("{alg}:{hex}").parse().ok()
}

#[derive(Serialize, Deserialize)]
struct RepoRecord {
    kind: String,
}

impl RepoRecord {
    fn kind(&self) -> RepoKind {
        if self.kind == "cached" {
            RepoKind::Cached
        } else {
            RepoKind::Hosted
        }
    }
}

/// What a tag object holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub digest: Digest,
    /// How many times the tag was written since it was created: every
    /// successful compare-and-swap adds one, so a lost update would show.
    pub writes: u64,
}

#[derive(Serialize, Deserialize)]
struct CacheRecord {
    size: u64,
    accessed: u64,
}

/// The state of a blob's `pins/<d>` record.
enum PinState {
    /// Absent or empty: neither pinned nor being evicted.
    Free,
    /// `1`: a push pinned it.
    Pinned,
    /// JSON [`Evicting`]: an evictor claimed it until `expires`.
    Evicting(Evicting),
}

/// An evictor's claim on a blob.
#[derive(Serialize, Deserialize)]
struct Evicting {
    evicting: String,
    /// Unix milliseconds (wall clock: replicas compare it).
    expires: u64,
}

fn pin_state(body: Option<&[u8]>) -> PinState {
    match body {
        None | Some(b"") => PinState::Free,
        Some(b) => match serde_json::from_slice::<Evicting>(b) {
            Ok(e) => PinState::Evicting(e),
            // `1`, or anything else: pinned (never evict on doubt).
            Err(_) => PinState::Pinned,
        },
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How long an eviction claim lasts: a pin waits at most this long for an
/// evictor that died mid-eviction.
const EVICTION_CLAIM: Duration = Duration::from_secs(60);

/// An object's body and version, for compare-and-swap.
struct Versioned {
    body: Bytes,
    version: UpdateVersion,
}

pub struct S3Meta {
    store: Arc<dyn ObjectStore>,
    keys: Keys,
    /// Compare-and-swaps of one key from this process take turns (by key
    /// hash): they would only race each other, and a store's conditional
    /// writes are then contended by one writer per replica.
    turns: Box<[tokio::sync::Mutex<()>]>,
    /// Kinds of repositories seen: a repository's record is created once
    /// and never changed or removed, so what was read stays true.
    kinds: std::sync::Mutex<std::collections::HashMap<String, RepoKind>>,
    /// How long an eviction claim lasts.
    eviction_claim: Duration,
}

/// Stripes of [`S3Meta::turns`].
const TURNS: usize = 64;

impl S3Meta {
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str) -> S3Meta {
        S3Meta {
            store,
            keys: Keys::new(prefix),
            turns: (0..TURNS).map(|_| tokio::sync::Mutex::new(())).collect(),
            kinds: Default::default(),
            eviction_claim: EVICTION_CLAIM,
        }
    }

    /// With eviction claims lasting `ttl` (tests of an evictor that dies).
    pub fn with_eviction_claim(mut self, ttl: Duration) -> S3Meta {
        self.eviction_claim = ttl;
        self
    }

    fn pin_key(&self, d: &Digest) -> Path {
        self.key(&format!("pins/{}", enc_digest(d)))
    }

    pub(crate) fn key(&self, rel: &str) -> Path {
        self.keys.path(&format!("meta/{rel}"))
    }

    fn repo_key(&self, repo: &str) -> Path {
        self.key(&format!("repos/{}", enc_repo(repo)))
    }

    fn tag_key(&self, repo: &RepoName, tag: &str) -> Path {
        self.key(&format!("tags/{}/{tag}", enc_repo(repo.as_str())))
    }

    pub(crate) async fn get(&self, key: &Path) -> Result<Option<Bytes>> {
        match self.store.get(key).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(os_err)?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(os_err(e)),
        }
    }

    async fn get_versioned(&self, key: &Path) -> Result<Option<Versioned>> {
        match self.store.get_opts(key, GetOptions::default()).await {
            Ok(r) => {
                let version = UpdateVersion {
                    e_tag: r.meta.e_tag.clone(),
                    version: r.meta.version.clone(),
                };
                let body = r.bytes().await.map_err(os_err)?;
                Ok(Some(Versioned { body, version }))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(os_err(e)),
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, key: &Path) -> Result<Option<T>> {
        match self.get(key).await? {
            Some(b) => Ok(Some(serde_json::from_slice(&b).map_err(meta_err)?)),
            None => Ok(None),
        }
    }

    pub(crate) async fn put(&self, key: &Path, body: impl Into<Bytes>) -> Result<()> {
        self.store
            .put(key, PutPayload::from(body.into()))
            .await
            .map_err(os_err)?;
        Ok(())
    }

    async fn put_json<T: Serialize>(&self, key: &Path, v: &T) -> Result<()> {
        self.put(key, serde_json::to_vec(v).map_err(meta_err)?)
            .await
    }

    async fn exists(&self, key: &Path) -> Result<bool> {
        match self.store.head(key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(os_err(e)),
        }
    }

    /// Deletes `key`; returns whether it existed.
    pub(crate) async fn remove(&self, key: &Path) -> Result<bool> {
        if !self.exists(key).await? {
            return Ok(false);
        }
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(true),
            Err(e) => Err(os_err(e)),
        }
    }

    /// Every object under `rel/` (relative to `meta/`), with its name
    /// relative to that prefix.
    pub(crate) async fn list(&self, rel: &str) -> Result<Vec<(String, ObjectMeta)>> {
        let dir = self.key(rel);
        let base = format!("{}/", dir.as_ref());
        let objects: Vec<ObjectMeta> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(os_err)?;
        let mut out: Vec<(String, ObjectMeta)> = objects
            .into_iter()
            .filter_map(|o| {
                let name = o.location.as_ref().strip_prefix(base.as_str())?.to_string();
                Some((name, o))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Reads the bodies of `objects` (concurrently, in order).
    pub(crate) async fn bodies(&self, objects: Vec<ObjectMeta>) -> Result<Vec<Bytes>> {
        futures::stream::iter(objects)
            .map(|o| async move { self.get(&o.location).await })
            .buffered(READ_CONCURRENCY)
            .try_filter_map(|b| async move { Ok(b) })
            .try_collect()
            .await
    }

    /// Compare-and-swap on `key`: `f` maps the current body (`None` when
    /// absent) to the new one (`None`: leave it, and return `Ok(false)`).
    /// Retried until the write lands on the version `f` saw.
    pub(crate) async fn update<F>(&self, key: &Path, mut f: F) -> Result<bool>
    where
        F: FnMut(Option<&[u8]>) -> Result<Option<Vec<u8>>> + Send,
    {
        let stripe = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            key.as_ref().hash(&mut h);
            h.finish() as usize % TURNS
        };
        let _turn = self.turns[stripe].lock().await;
        for attempt in 0..CAS_ATTEMPTS {
            let current = self.get_versioned(key).await?;
            let Some(new) = f(current.as_ref().map(|v| &v.body[..]))? else {
                return Ok(false);
            };
            let mode = match current {
                Some(v) => PutMode::Update(v.version),
                None => PutMode::Create,
            };
            let opts = PutOptions {
                mode,
                ..Default::default()
            };
            match self.store.put_opts(key, PutPayload::from(new), opts).await {
                Ok(_) => return Ok(true),
                Err(object_store::Error::Precondition { .. })
                | Err(object_store::Error::AlreadyExists { .. }) => {
                    // Lost the race: back off a little, with jitter, and
                    // read again.
                    let jitter = uuid::Uuid::new_v4().as_u128() as u64 % 1000;
                    let max = 2_000u64 << attempt.min(5);
                    tokio::time::sleep(Duration::from_micros(jitter * max / 1000)).await;
                }
                Err(e) => return Err(os_err(e)),
            }
        }
        Err(StorageError::Meta(format!(
            "{key}: gave up after {CAS_ATTEMPTS} conflicting concurrent updates"
        )))
    }

    /// Creates the repository with `kind` unless it exists (its kind never
    /// changes); refuses a repository of the other kind.
    async fn ensure_repo(&self, repo: &str, kind: RepoKind) -> Result<()> {
        if let Some(k) = self.known_kind(repo) {
            return k.admit(repo, kind);
        }
        let rec = RepoRecord {
            kind: match kind {
                RepoKind::Hosted => "hosted",
                RepoKind::Cached => "cached",
            }
            .to_string(),
        };
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let body = serde_json::to_vec(&rec).map_err(meta_err)?;
        match self
            .store
            .put_opts(&self.repo_key(repo), PutPayload::from(body), opts)
            .await
        {
            Ok(_) => {
                self.remember_kind(repo, kind);
                Ok(())
            }
            // Some stores answer a lost create race with 412.
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => self.require_kind(repo, kind).await,
            Err(e) => Err(os_err(e)),
        }
    }

    /// Refuses a write of `kind` into an existing repository of the other
    /// kind; an unknown repository passes. The record is created once and
    /// never changed, so a kind read once stays true.
    async fn require_kind(&self, repo: &str, kind: RepoKind) -> Result<()> {
        if let Some(k) = self.known_kind(repo) {
            return k.admit(repo, kind);
        }
        let rec: Option<RepoRecord> = self.get_json(&self.repo_key(repo)).await?;
        match rec {
            Some(r) => {
                let k = r.kind();
                self.remember_kind(repo, k);
                k.admit(repo, kind)
            }
            None => Ok(()),
        }
    }

    fn known_kind(&self, repo: &str) -> Option<RepoKind> {
        self.kinds.lock().expect("kinds lock").get(repo).copied()
    }

    fn remember_kind(&self, repo: &str, kind: RepoKind) {
        let mut kinds = self.kinds.lock().expect("kinds lock");
        // Bounded: a forgotten kind is read again from the bucket.
        if kinds.len() >= 65_536 {
            kinds.clear();
        }
        kinds.insert(repo.to_string(), kind);
    }

    /// The record of a tag, tombstones read as absent.
    pub async fn tag_record(&self, repo: &RepoName, tag: &Tag) -> Result<Option<TagRecord>> {
        match self.get(&self.tag_key(repo, tag.as_str())).await? {
            Some(b) if !b.is_empty() => Ok(Some(serde_json::from_slice(&b).map_err(meta_err)?)),
            _ => Ok(None),
        }
    }

    /// Points `tag` at `digest` by compare-and-swap.
    async fn set_tag(&self, repo: &RepoName, tag: &Tag, digest: &Digest) -> Result<()> {
        self.update(&self.tag_key(repo, tag.as_str()), |cur| {
            let writes = match cur {
                Some(b) if !b.is_empty() => {
                    serde_json::from_slice::<TagRecord>(b)
                        .map_err(meta_err)?
                        .writes
                }
                _ => 0,
            };
            let rec = TagRecord {
                digest: digest.clone(),
                writes: writes + 1,
            };
            Ok(Some(serde_json::to_vec(&rec).map_err(meta_err)?))
        })
        .await?;
        Ok(())
    }

    /// Turns the tag into a tombstone if `pred` holds for its digest;
    /// returns whether it did.
    async fn clear_tag_if(
        &self,
        repo: &RepoName,
        tag: &str,
        pred: impl Fn(&Digest) -> bool + Send + Sync,
    ) -> Result<bool> {
        self.update(&self.tag_key(repo, tag), |cur| match cur {
            Some(b) if !b.is_empty() => {
                let rec: TagRecord = serde_json::from_slice(b).map_err(meta_err)?;
                Ok(pred(&rec.digest).then(Vec::new))
            }
            _ => Ok(None),
        })
        .await
    }
}

#[async_trait]
impl MetaStore for S3Meta {
    async fn repository(&self, repo: &RepoName) -> Result<Option<RepoKind>> {
        if let Some(k) = self.known_kind(repo.as_str()) {
            return Ok(Some(k));
        }
        let rec: Option<RepoRecord> = self.get_json(&self.repo_key(repo.as_str())).await?;
        Ok(rec.map(|r| {
            let k = r.kind();
            self.remember_kind(repo.as_str(), k);
            k
        }))
    }

    async fn link_blob(&self, repo: &RepoName, kind: RepoKind, digest: &Digest) -> Result<()> {
        self.ensure_repo(repo.as_str(), kind).await?;
        if kind == RepoKind::Hosted {
            self.pin_blob(digest).await?;
        }
        let link = self.key(&format!(
            "links/{}/{}",
            enc_repo(repo.as_str()),
            enc_digest(digest)
        ));
        self.put(&link, "1").await
    }

    async fn blob_linked(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        self.exists(&self.key(&format!(
            "links/{}/{}",
            enc_repo(repo.as_str()),
            enc_digest(digest)
        )))
        .await
    }

    async fn unlink_blob(&self, repo: &RepoName, kind: RepoKind, digest: &Digest) -> Result<bool> {
        self.require_kind(repo.as_str(), kind).await?;
        self.remove(&self.key(&format!(
            "links/{}/{}",
            enc_repo(repo.as_str()),
            enc_digest(digest)
        )))
        .await
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
        let r = enc_repo(repo.as_str());
        self.ensure_repo(repo.as_str(), kind).await?;
        self.put_json(
            &self.key(&format!("manifests/{r}/{}", enc_digest(digest))),
            record,
        )
        .await?;
        if let (Some(desc), Some(subject)) = (referrer, &record.subject) {
            self.put_json(
                &self.key(&format!(
                    "referrers/{r}/{}/{}",
                    enc_digest(subject),
                    enc_digest(digest)
                )),
                desc,
            )
            .await?;
        }
        // Last: a tag never points at a manifest that is not recorded.
        if let Some(t) = tag {
            self.set_tag(repo, t, digest).await?;
        }
        Ok(())
    }

    async fn manifest(&self, repo: &RepoName, digest: &Digest) -> Result<Option<ManifestRecord>> {
        self.get_json(&self.key(&format!(
            "manifests/{}/{}",
            enc_repo(repo.as_str()),
            enc_digest(digest)
        )))
        .await
    }

    async fn delete_manifest(
        &self,
        repo: &RepoName,
        kind: RepoKind,
        digest: &Digest,
    ) -> Result<bool> {
        self.require_kind(repo.as_str(), kind).await?;
        let r = enc_repo(repo.as_str());
        let key = self.key(&format!("manifests/{r}/{}", enc_digest(digest)));
        let Some(record) = self.get_json::<ManifestRecord>(&key).await? else {
            return Ok(false);
        };
        // Tags first (each cleared only if it still points here, so a
        // concurrent retag elsewhere is kept), then the referrer entry,
        // then the record.
        for (tag, meta) in self.list(&format!("tags/{r}")).await? {
            if meta.size > 0 {
                self.clear_tag_if(repo, &tag, |d| d == digest).await?;
            }
        }
        if let Some(subject) = &record.subject {
            self.remove(&self.key(&format!(
                "referrers/{r}/{}/{}",
                enc_digest(subject),
                enc_digest(digest)
            )))
            .await?;
        }
        Ok(self.remove(&key).await?)
    }

    async fn resolve_tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>> {
        Ok(self.tag_record(repo, tag).await?.map(|r| r.digest))
    }

    async fn tag_checked(&self, repo: &RepoName, tag: &Tag) -> Result<Option<u64>> {
        self.get_json(&self.key(&format!(
            "checked/{}/{}",
            enc_repo(repo.as_str()),
            tag.as_str()
        )))
        .await
    }

    async fn set_tag_checked(&self, repo: &RepoName, tag: &Tag, unix_secs: u64) -> Result<()> {
        self.put_json(
            &self.key(&format!(
                "checked/{}/{}",
                enc_repo(repo.as_str()),
                tag.as_str()
            )),
            &unix_secs,
        )
        .await
    }

    async fn delete_tag(&self, repo: &RepoName, kind: RepoKind, tag: &Tag) -> Result<bool> {
        self.require_kind(repo.as_str(), kind).await?;
        self.clear_tag_if(repo, tag.as_str(), |_| true).await
    }

    async fn tags(
        &self,
        repo: &RepoName,
        last: Option<&str>,
        n: usize,
    ) -> Result<Option<Vec<String>>> {
        if self.repository(repo).await?.is_none() {
            return Ok(None);
        }
        let all = self
            .list(&format!("tags/{}", enc_repo(repo.as_str())))
            .await?;
        Ok(Some(
            all.into_iter()
                // Empty objects are deleted tags.
                .filter(|(name, meta)| meta.size > 0 && last.is_none_or(|l| name.as_str() > l))
                .map(|(name, _)| name)
                .take(n)
                .collect(),
        ))
    }

    async fn repositories(&self, last: Option<&str>, n: usize) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .list("repos")
            .await?
            .into_iter()
            .map(|(name, _)| dec_repo(&name))
            .collect();
        names.sort();
        Ok(names
            .into_iter()
            .filter(|name| last.is_none_or(|l| name.as_str() > l))
            .take(n)
            .collect())
    }

    async fn referrers(&self, repo: &RepoName, subject: &Digest) -> Result<Vec<Descriptor>> {
        let found = self
            .list(&format!(
                "referrers/{}/{}",
                enc_repo(repo.as_str()),
                enc_digest(subject)
            ))
            .await?;
        let bodies = self
            .bodies(found.into_iter().map(|(_, m)| m).collect())
            .await?;
        bodies
            .iter()
            .map(|b| serde_json::from_slice(b).map_err(meta_err))
            .collect()
    }

    async fn blob_pinned(&self, digest: &Digest) -> Result<bool> {
        let body = self.get(&self.pin_key(digest)).await?;
        Ok(matches!(pin_state(body.as_deref()), PinState::Pinned))
    }

    async fn pin_blob(&self, digest: &Digest) -> Result<()> {
        let key = self.pin_key(digest);
        let mut wait = Duration::from_millis(5);
        loop {
            let mut claimed = false;
            self.update(&key, |cur| {
                claimed = false;
                match pin_state(cur) {
                    PinState::Pinned => Ok(None),
                    PinState::Evicting(e) if e.expires >= now_ms() => {
                        claimed = true;
                        Ok(None)
                    }
                    // Free, or a claim whose evictor is gone.
                    _ => Ok(Some(b"1".to_vec())),
                }
            })
            .await?;
            if !claimed {
                return Ok(());
            }
            // An eviction is deleting the blob: wait until it is done.
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(500));
        }
    }

    async fn claim_eviction(&self, digest: &Digest) -> Result<EvictionClaim> {
        let token = uuid::Uuid::new_v4().to_string();
        // Read before the claim is written: its expiry, and the evictor's
        // deadline (a third of the claim, so the delete lands well before a
        // waiting push may take the claim over), both count from here.
        let claimed_at = std::time::SystemTime::now();
        let at_ms = claimed_at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut found = EvictionClaim::Busy;
        self.update(&self.pin_key(digest), |cur| match pin_state(cur) {
            PinState::Pinned => {
                found = EvictionClaim::Pinned;
                Ok(None)
            }
            PinState::Evicting(e) if e.expires >= now_ms() => {
                found = EvictionClaim::Busy;
                Ok(None)
            }
            _ => {
                found = EvictionClaim::Claimed {
                    token: token.clone(),
                    deadline: Some(claimed_at + self.eviction_claim / 3),
                };
                let claim = Evicting {
                    evicting: token.clone(),
                    expires: at_ms + self.eviction_claim.as_millis() as u64,
                };
                Ok(Some(serde_json::to_vec(&claim).map_err(meta_err)?))
            }
        })
        .await?;
        Ok(found)
    }

    async fn end_eviction(&self, digest: &Digest, token: &str) -> Result<()> {
        self.update(&self.pin_key(digest), |cur| match pin_state(cur) {
            PinState::Evicting(e) if e.evicting == token => Ok(Some(Vec::new())),
            _ => Ok(None),
        })
        .await?;
        Ok(())
    }

    async fn cache_entries(&self) -> Result<Vec<(Digest, CacheEntry)>> {
        let found = self.list("cache").await?;
        let digests: Vec<Option<Digest>> = found.iter().map(|(n, _)| dec_digest(n)).collect();
        let bodies = futures::stream::iter(found)
            .map(|(_, o)| async move { self.get(&o.location).await })
            .buffered(READ_CONCURRENCY)
            .try_collect::<Vec<_>>()
            .await?;
        let mut out = Vec::new();
        for (d, b) in digests.into_iter().zip(bodies) {
            let (Some(d), Some(b)) = (d, b) else {
                continue;
            };
            let rec: CacheRecord = serde_json::from_slice(&b).map_err(meta_err)?;
            out.push((
                d,
                CacheEntry {
                    size: rec.size,
                    accessed: rec.accessed,
                },
            ));
        }
        Ok(out)
    }

    async fn put_cache_entries(&self, entries: &[(Digest, CacheEntry)]) -> Result<()> {
        let writes: Vec<(Path, CacheRecord)> = entries
            .iter()
            .map(|(d, e)| {
                (
                    self.key(&format!("cache/{}", enc_digest(d))),
                    CacheRecord {
                        size: e.size,
                        accessed: e.accessed,
                    },
                )
            })
            .collect();
        futures::stream::iter(writes)
            .map(|(key, rec)| async move { self.put_json(&key, &rec).await })
            .buffer_unordered(READ_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    async fn delete_cache_entry(&self, digest: &Digest) -> Result<()> {
        match self
            .store
            .delete(&self.key(&format!("cache/{}", enc_digest(digest))))
            .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(os_err(e)),
        }
    }

    async fn put_upload(&self, id: &UploadId, record: &UploadRecord) -> Result<()> {
        self.put_json(&self.key(&format!("uploads/{}", id.as_str())), record)
            .await
    }

    async fn upload(&self, id: &UploadId) -> Result<Option<UploadRecord>> {
        self.get_json(&self.key(&format!("uploads/{}", id.as_str())))
            .await
    }

    async fn delete_upload(&self, id: &UploadId) -> Result<()> {
        match self
            .store
            .delete(&self.key(&format!("uploads/{}", id.as_str())))
            .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(os_err(e)),
        }
    }

    async fn uploads(&self) -> Result<Vec<(UploadId, UploadRecord)>> {
        let found = self.list("uploads").await?;
        let ids: Vec<Option<UploadId>> = found.iter().map(|(n, _)| n.parse().ok()).collect();
        let bodies = futures::stream::iter(found)
            .map(|(_, o)| async move { self.get(&o.location).await })
            .buffered(READ_CONCURRENCY)
            .try_collect::<Vec<_>>()
            .await?;
        let mut out = Vec::new();
        for (id, b) in ids.into_iter().zip(bodies) {
            if let (Some(id), Some(b)) = (id, b) {
                out.push((id, serde_json::from_slice(&b).map_err(meta_err)?));
            }
        }
        Ok(out)
    }
}
