//! The embedded metadata store, on redb: one file, ACID transactions, each
//! commit durable (fsync) before it returns.
//!
//! Keys join their parts with NUL, which no repository name, tag or digest
//! contains, so a repository's entries form one contiguous key range in
//! lexical order.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{
    CacheEntry, EvictionClaim, ManifestRecord, MetaStore, RepoKind, Result, StorageError,
    UploadRecord,
};
use crate::oci::manifest::Descriptor;
use crate::oci::{Digest, Reference, RepoName, Tag, UploadId};

const REPOS: TableDefinition<&str, u8> = TableDefinition::new("repositories");
/// `repo\0tag` → digest
const TAGS: TableDefinition<&str, &str> = TableDefinition::new("tags");
/// `repo\0digest` → 1
const LINKS: TableDefinition<&str, u8> = TableDefinition::new("blob_links");
/// `repo\0digest` → JSON [`ManifestRecord`]
const MANIFESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("manifests");
/// `repo\0subject\0referrer` → JSON [`Descriptor`]
const REFERRERS: TableDefinition<&str, &[u8]> = TableDefinition::new("referrers");
/// `repo\0tag` → Unix seconds of the last upstream check (cache repositories)
const CHECKED: TableDefinition<&str, u64> = TableDefinition::new("tag_checked");
/// digest → 1: linked into a hosted repository at least once
const PINNED: TableDefinition<&str, u8> = TableDefinition::new("pinned_blobs");
/// digest → token of the evictor's claim: blobs being evicted right now
const EVICTING: TableDefinition<&str, &str> = TableDefinition::new("evicting_blobs");
/// digest → (size, last access in Unix µs): blobs the cache budget counts
const CACHE: TableDefinition<&str, (u64, u64)> = TableDefinition::new("cache_entries");
/// upload id → JSON [`UploadRecord`]
const UPLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("uploads");

fn meta_err(e: impl std::fmt::Display) -> StorageError {
    StorageError::Meta(e.to_string())
}

fn key(a: &str, b: &str) -> String {
    let mut k = String::with_capacity(a.len() + b.len() + 1);
    k.push_str(a);
    k.push('\0');
    k.push_str(b);
    k
}

/// The key range of everything under `prefix\0`.
fn prefix_range(prefix: &str) -> (String, String) {
    (format!("{prefix}\0"), format!("{prefix}\u{1}"))
}

pub struct RedbMeta {
    db: Arc<Database>,
    /// Woken when an eviction claim ends (pins wait for it).
    evictions_ended: Arc<tokio::sync::Notify>,
}

impl RedbMeta {
    /// Opens or creates the database file.
    pub fn open(path: &Path) -> Result<RedbMeta> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let db = Database::create(path).map_err(|e| match e {
            // Another process holds the file's lock (a running wharf).
            redb::DatabaseError::DatabaseAlreadyOpen => StorageError::Io(std::io::Error::new(
                std::io::ErrorKind::ResourceBusy,
                format!("{} is open in another process", path.display()),
            )),
            e => meta_err(e),
        })?;
        let txn = db.begin_write().map_err(meta_err)?;
        {
            txn.open_table(REPOS).map_err(meta_err)?;
            txn.open_table(TAGS).map_err(meta_err)?;
            txn.open_table(LINKS).map_err(meta_err)?;
            txn.open_table(MANIFESTS).map_err(meta_err)?;
            txn.open_table(REFERRERS).map_err(meta_err)?;
            txn.open_table(UPLOADS).map_err(meta_err)?;
            txn.open_table(CHECKED).map_err(meta_err)?;
            txn.open_table(PINNED).map_err(meta_err)?;
            txn.open_table(CACHE).map_err(meta_err)?;
            // The database is this process's alone: a claim left by an
            // earlier run has no evictor any more.
            txn.delete_table(EVICTING).map_err(meta_err)?;
            txn.open_table(EVICTING).map_err(meta_err)?;
        }
        txn.commit().map_err(meta_err)?;
        Ok(RedbMeta {
            db: Arc::new(db),
            evictions_ended: Arc::default(),
        })
    }

    /// The database, for other tables kept in the same file (the
    /// replication queue, [`super::jobs::RedbJobs`]).
    pub fn database(&self) -> Arc<Database> {
        self.db.clone()
    }

    /// Runs a read transaction inline: reads are served from redb's page
    /// cache or the OS's in microseconds, cheaper than a thread hop.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&Database) -> Result<T>,
    {
        f(&self.db)
    }

    /// Runs blocking database work (write transactions, which fsync) off the
    /// async threads.
    async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(meta_err)?
    }
}

fn write<T>(db: &Database, f: impl FnOnce(&redb::WriteTransaction) -> Result<T>) -> Result<T> {
    let txn = db.begin_write().map_err(meta_err)?;
    let out = f(&txn)?;
    txn.commit().map_err(meta_err)?;
    Ok(out)
}

fn kind_of(v: u8) -> RepoKind {
    if v == RepoKind::Cached as u8 {
        RepoKind::Cached
    } else {
        RepoKind::Hosted
    }
}

/// Creates `repo` with `kind` unless it exists; refuses a repository of the
/// other kind (the caller's transaction then writes nothing).
fn ensure_repo(txn: &redb::WriteTransaction, repo: &str, kind: RepoKind) -> Result<()> {
    let mut t = txn.open_table(REPOS).map_err(meta_err)?;
    let existing = t.get(repo).map_err(meta_err)?.map(|v| kind_of(v.value()));
    match existing {
        None => {
            t.insert(repo, kind as u8).map_err(meta_err)?;
            Ok(())
        }
        Some(k) => k.admit(repo, kind),
    }
}

/// Refuses a write of `kind` into an existing repository of another kind;
/// an unknown repository passes (there is nothing to change in it).
fn require_kind(txn: &redb::WriteTransaction, repo: &str, kind: RepoKind) -> Result<()> {
    let t = txn.open_table(REPOS).map_err(meta_err)?;
    match t.get(repo).map_err(meta_err)?.map(|v| kind_of(v.value())) {
        Some(k) => k.admit(repo, kind),
        None => Ok(()),
    }
}

/// Pins `digest` unless an eviction claim on it stands (then `false`, and
/// nothing is written).
fn pin(txn: &redb::WriteTransaction, digest: &str) -> Result<bool> {
    if txn
        .open_table(EVICTING)
        .map_err(meta_err)?
        .get(digest)
        .map_err(meta_err)?
        .is_some()
    {
        return Ok(false);
    }
    txn.open_table(PINNED)
        .map_err(meta_err)?
        .insert(digest, 1)
        .map_err(meta_err)?;
    Ok(true)
}

#[async_trait]
impl MetaStore for RedbMeta {
    async fn repository(&self, repo: &RepoName) -> Result<Option<RepoKind>> {
        let repo = repo.to_string();
        self.read(move |db| {
            let txn = db.begin_read().map_err(meta_err)?;
            let t = txn.open_table(REPOS).map_err(meta_err)?;
            Ok(t.get(repo.as_str())
                .map_err(meta_err)?
                .map(|v| kind_of(v.value())))
        })
        .await
    }

    async fn link_blob(&self, repo: &RepoName, kind: RepoKind, digest: &Digest) -> Result<()> {
        let (repo, k) = (repo.to_string(), key(repo.as_str(), digest.as_str()));
        let digest = digest.to_string();
        loop {
            let ended = self.evictions_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let (repo, k, digest) = (repo.clone(), k.clone(), digest.clone());
            let linked = self
                .run(move |db| {
                    write(db, |txn| {
                        ensure_repo(txn, &repo, kind)?;
                        let hosted = kind == RepoKind::Hosted;
                        if hosted && !pin(txn, &digest)? {
                            return Ok(false);
                        }
                        txn.open_table(LINKS)
                            .map_err(meta_err)?
                            .insert(k.as_str(), 1)
                            .map_err(meta_err)?;
                        Ok(true)
                    })
                })
                .await?;
            if linked {
                return Ok(());
            }
            ended.await;
        }
    }

    async fn blob_linked(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        let k = key(repo.as_str(), digest.as_str());
        self.read(move |db| {
            let txn = db.begin_read().map_err(meta_err)?;
            let t = txn.open_table(LINKS).map_err(meta_err)?;
            Ok(t.get(k.as_str()).map_err(meta_err)?.is_some())
        })
        .await
    }

    async fn unlink_blob(&self, repo: &RepoName, kind: RepoKind, digest: &Digest) -> Result<bool> {
        let (repo, k) = (repo.to_string(), key(repo.as_str(), digest.as_str()));
        self.run(move |db| {
            write(db, |txn| {
                require_kind(txn, &repo, kind)?;
                let mut t = txn.open_table(LINKS).map_err(meta_err)?;
                Ok(t.remove(k.as_str()).map_err(meta_err)?.is_some())
            })
        })
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
        let repo = repo.to_string();
        let digest = digest.to_string();
        let referrer = match (referrer, &record.subject) {
            (Some(desc), Some(subject)) => Some((
                format!("{repo}\0{subject}\0{digest}"),
                serde_json::to_vec(desc).map_err(meta_err)?,
            )),
            _ => None,
        };
        let record = serde_json::to_vec(record).map_err(meta_err)?;
        let tag = tag.map(|t| key(&repo, t.as_str()));
        self.run(move |db| {
            write(db, |txn| {
                ensure_repo(txn, &repo, kind)?;
                txn.open_table(MANIFESTS)
                    .map_err(meta_err)?
                    .insert(key(&repo, &digest).as_str(), record.as_slice())
                    .map_err(meta_err)?;
                if let Some(t) = &tag {
                    txn.open_table(TAGS)
                        .map_err(meta_err)?
                        .insert(t.as_str(), digest.as_str())
                        .map_err(meta_err)?;
                }
                if let Some((k, v)) = &referrer {
                    txn.open_table(REFERRERS)
                        .map_err(meta_err)?
                        .insert(k.as_str(), v.as_slice())
                        .map_err(meta_err)?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn manifest(&self, repo: &RepoName, digest: &Digest) -> Result<Option<ManifestRecord>> {
        let k = key(repo.as_str(), digest.as_str());
        self.read(move |db| {
            let txn = db.begin_read().map_err(meta_err)?;
            let t = txn.open_table(MANIFESTS).map_err(meta_err)?;
            match t.get(k.as_str()).map_err(meta_err)? {
                Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(meta_err)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn find_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<(Digest, ManifestRecord)>> {
        self.read(|db| {
            let txn = db.begin_read().map_err(meta_err)?;
            let digest = match reference {
                Reference::Digest(d) => d.clone(),
                Reference::Tag(tag) => {
                    let t = txn.open_table(TAGS).map_err(meta_err)?;
                    match t
                        .get(key(repo.as_str(), tag.as_str()).as_str())
                        .map_err(meta_err)?
                    {
                        Some(v) => v.value().parse().map_err(meta_err)?,
                        None => return Ok(None),
                    }
                }
            };
            let t = txn.open_table(MANIFESTS).map_err(meta_err)?;
            let record = match t
                .get(key(repo.as_str(), digest.as_str()).as_str())
                .map_err(meta_err)?
            {
                Some(v) => serde_json::from_slice(v.value()).map_err(meta_err)?,
                None => return Ok(None),
            };
            Ok(Some((digest, record)))
        })
        .await
    }

    async fn delete_manifest(
        &self,
        repo: &RepoName,
        kind: RepoKind,
        digest: &Digest,
    ) -> Result<bool> {
        let repo = repo.to_string();
        let digest = digest.to_string();
        self.run(move |db| {
            write(db, |txn| {
                require_kind(txn, &repo, kind)?;
                let mut manifests = txn.open_table(MANIFESTS).map_err(meta_err)?;
                let Some(old) = manifests
                    .remove(key(&repo, &digest).as_str())
                    .map_err(meta_err)?
                else {
                    return Ok(false);
                };
                let record: ManifestRecord =
                    serde_json::from_slice(old.value()).map_err(meta_err)?;
                drop(old);
                let mut tags = txn.open_table(TAGS).map_err(meta_err)?;
                let (lo, hi) = prefix_range(&repo);
                tags.retain_in(lo.as_str()..hi.as_str(), |_, v| v != digest)
                    .map_err(meta_err)?;
                if let Some(subject) = record.subject {
                    txn.open_table(REFERRERS)
                        .map_err(meta_err)?
                        .remove(format!("{repo}\0{subject}\0{digest}").as_str())
                        .map_err(meta_err)?;
                }
                Ok(true)
            })
        })
        .await
    }

    async fn resolve_tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>> {
        let k = key(repo.as_str(), tag.as_str());
        self.read(move |db| {
            let txn = db.begin_read().map_err(meta_err)?;
            let t = txn.open_table(TAGS).map_err(meta_err)?;
            match t.get(k.as_str()).map_err(meta_err)? {
                Some(v) => Ok(Some(v.value().parse().map_err(meta_err)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn tag_checked(&self, repo: &RepoName, tag: &Tag) -> Result<Option<u64>> {
        let k = key(repo.as_str(), tag.as_str());
        self.read(move |db| {
            let txn = db.begin_read().map_err(meta_err)?;
            let t = txn.open_table(CHECKED).map_err(meta_err)?;
            Ok(t.get(k.as_str()).map_err(meta_err)?.map(|v| v.value()))
        })
        .await
    }

    async fn set_tag_checked(&self, repo: &RepoName, tag: &Tag, unix_secs: u64) -> Result<()> {
        let k = key(repo.as_str(), tag.as_str());
        self.run(move |db| {
            write(db, |txn| {
                txn.open_table(CHECKED)
                    .map_err(meta_err)?
                    .insert(k.as_str(), unix_secs)
                    .map_err(meta_err)?;
                Ok(())
            })
        })
        .await
    }

    async fn delete_tag(&self, repo: &RepoName, kind: RepoKind, tag: &Tag) -> Result<bool> {
        let (repo, k) = (repo.to_string(), key(repo.as_str(), tag.as_str()));
        self.run(move |db| {
            write(db, |txn| {
                require_kind(txn, &repo, kind)?;
                let mut t = txn.open_table(TAGS).map_err(meta_err)?;
                Ok(t.remove(k.as_str()).map_err(meta_err)?.is_some())
            })
        })
        .await
    }

    async fn tags(
        &self,
        repo: &RepoName,
        last: Option<&str>,
        n: usize,
    ) -> Result<Option<Vec<String>>> {
        let repo = repo.to_string();
        let last = last.map(str::to_string);
        self.read(move |db| {
            let txn = db.begin_read().map_err(meta_err)?;
            if txn
                .open_table(REPOS)
                .map_err(meta_err)?
                .get(repo.as_str())
                .map_err(meta_err)?
                .is_none()
            {
                return Ok(None);
            }
            let t = txn.open_table(TAGS).map_err(meta_err)?;
            let (lo, hi) = prefix_range(&repo);
            let start = match &last {
                Some(l) => key(&repo, l),
                None => lo,
            };
            let mut out = Vec::new();
            for entry in t.range(start.as_str()..hi.as_str()).map_err(meta_err)? {
                if out.len() >= n {
                    break;
                }
                let (k, _) = entry.map_err(meta_err)?;
                let tag = &k.value()[repo.len() + 1..];
                if last.as_deref() == Some(tag) {
                    continue;
                }
                out.push(tag.to_string());
            }
            Ok(Some(out))
        })
        .await
    }

    async fn repositories(&self, last: Option<&str>, n: usize) -> Result<Vec<String>> {
        let last = last.map(str::to_string);
        self.read(move |db| {
            let txn = db.begin_read().map_err(meta_err)?;
            let t = txn.open_table(REPOS).map_err(meta_err)?;
            let mut out = Vec::new();
            let iter = match &last {
                Some(l) => t.range(l.as_str()..).map_err(meta_err)?,
                None => t.iter().map_err(meta_err)?,
            };
            for entry in iter {
                if out.len() >= n {
                    break;
                }
                let (k, _) = entry.map_err(meta_err)?;
                let name = k.value();
                if last.as_deref() == Some(name) {
                    continue;
                }
                out.push(name.to_string());
            }
            Ok(out)
        })
        .await
    }

    async fn referrers(&self, repo: &RepoName, subject: &Digest) -> Result<Vec<Descriptor>> {
        let prefix = key(repo.as_str(), subject.as_str());
        self.read(move |db| {
            let txn = db.begin_read().map_err(meta_err)?;
            let t = txn.open_table(REFERRERS).map_err(meta_err)?;
            let (lo, hi) = prefix_range(&prefix);
            let mut out = Vec::new();
            for entry in t.range(lo.as_str()..hi.as_str()).map_err(meta_err)? {
                let (_, v) = entry.map_err(meta_err)?;
                out.push(serde_json::from_slice(v.value()).map_err(meta_err)?);
            }
            Ok(out)
        })
        .await
    }

    async fn blob_pinned(&self, digest: &Digest) -> Result<bool> {
        let digest = digest.to_string();
        self.read(move |db| {
            let txn = db.begin_read().map_err(meta_err)?;
            let t = txn.open_table(PINNED).map_err(meta_err)?;
            Ok(t.get(digest.as_str()).map_err(meta_err)?.is_some())
        })
        .await
    }

    async fn pin_blob(&self, digest: &Digest) -> Result<()> {
        if self.blob_pinned(digest).await? {
            return Ok(());
        }
        loop {
            let ended = self.evictions_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let d = digest.to_string();
            // Not fsynced by itself: every caller commits a link or a
            // manifest record next, before it answers, and that durable
            // commit persists this one too.
            let pinned = self
                .run(move |db| {
                    let mut txn = db.begin_write().map_err(meta_err)?;
                    txn.set_durability(redb::Durability::None)
                        .map_err(meta_err)?;
                    let pinned = pin(&txn, &d)?;
                    txn.commit().map_err(meta_err)?;
                    Ok(pinned)
                })
                .await?;
            if pinned {
                return Ok(());
            }
            ended.await;
        }
    }

    async fn claim_eviction(&self, digest: &Digest) -> Result<EvictionClaim> {
        let d = digest.to_string();
        self.run(move |db| {
            write(db, |txn| {
                if txn
                    .open_table(PINNED)
                    .map_err(meta_err)?
                    .get(d.as_str())
                    .map_err(meta_err)?
                    .is_some()
                {
                    return Ok(EvictionClaim::Pinned);
                }
                let mut t = txn.open_table(EVICTING).map_err(meta_err)?;
                if t.get(d.as_str()).map_err(meta_err)?.is_some() {
                    return Ok(EvictionClaim::Busy);
                }
                let token = uuid::Uuid::new_v4().to_string();
                t.insert(d.as_str(), token.as_str()).map_err(meta_err)?;
                // One process: the claim lasts as long as its evictor.
                Ok(EvictionClaim::Claimed {
                    token,
                    deadline: None,
                })
            })
        })
        .await
    }

    async fn end_eviction(&self, digest: &Digest, token: &str) -> Result<()> {
        let (d, token) = (digest.to_string(), token.to_string());
        self.run(move |db| {
            write(db, |txn| {
                let mut t = txn.open_table(EVICTING).map_err(meta_err)?;
                let mine = t
                    .get(d.as_str())
                    .map_err(meta_err)?
                    .is_some_and(|v| v.value() == token);
                if mine {
                    t.remove(d.as_str()).map_err(meta_err)?;
                }
                Ok(())
            })
        })
        .await?;
        self.evictions_ended.notify_waiters();
        Ok(())
    }

    async fn cache_entries(&self) -> Result<Vec<(Digest, CacheEntry)>> {
        self.run(move |db| {
            let txn = db.begin_read().map_err(meta_err)?;
            let t = txn.open_table(CACHE).map_err(meta_err)?;
            let mut out = Vec::new();
            for row in t.iter().map_err(meta_err)? {
                let (k, v) = row.map_err(meta_err)?;
                let Ok(digest) = k.value().parse::<Digest>() else {
                    continue;
                };
                let (size, accessed) = v.value();
                out.push((digest, CacheEntry { size, accessed }));
            }
            Ok(out)
        })
        .await
    }

    async fn put_cache_entries(&self, entries: &[(Digest, CacheEntry)]) -> Result<()> {
        let entries: Vec<(String, (u64, u64))> = entries
            .iter()
            .map(|(d, e)| (d.to_string(), (e.size, e.accessed)))
            .collect();
        self.run(move |db| {
            write(db, |txn| {
                let mut t = txn.open_table(CACHE).map_err(meta_err)?;
                for (k, v) in &entries {
                    t.insert(k.as_str(), *v).map_err(meta_err)?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn delete_cache_entry(&self, digest: &Digest) -> Result<()> {
        let digest = digest.to_string();
        self.run(move |db| {
            write(db, |txn| {
                txn.open_table(CACHE)
                    .map_err(meta_err)?
                    .remove(digest.as_str())
                    .map_err(meta_err)?;
                Ok(())
            })
        })
        .await
    }

    async fn put_upload(&self, id: &UploadId, record: &UploadRecord) -> Result<()> {
        let id = id.to_string();
        let v = serde_json::to_vec(record).map_err(meta_err)?;
        self.run(move |db| {
            write(db, |txn| {
                txn.open_table(UPLOADS)
                    .map_err(meta_err)?
                    .insert(id.as_str(), v.as_slice())
                    .map_err(meta_err)?;
                Ok(())
            })
        })
        .await
    }

    async fn upload(&self, id: &UploadId) -> Result<Option<UploadRecord>> {
        let id = id.to_string();
        self.read(move |db| {
            let txn = db.begin_read().map_err(meta_err)?;
            let t = txn.open_table(UPLOADS).map_err(meta_err)?;
            match t.get(id.as_str()).map_err(meta_err)? {
                Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(meta_err)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn delete_upload(&self, id: &UploadId) -> Result<()> {
        let id = id.to_string();
        self.run(move |db| {
            write(db, |txn| {
                txn.open_table(UPLOADS)
                    .map_err(meta_err)?
                    .remove(id.as_str())
                    .map_err(meta_err)?;
                Ok(())
            })
        })
        .await
    }

    async fn uploads(&self) -> Result<Vec<(UploadId, UploadRecord)>> {
        self.read(move |db| {
            let txn = db.begin_read().map_err(meta_err)?;
            let t = txn.open_table(UPLOADS).map_err(meta_err)?;
            let mut out = Vec::new();
            for entry in t.iter().map_err(meta_err)? {
                let (k, v) = entry.map_err(meta_err)?;
                if let Ok(id) = k.value().parse() {
                    out.push((id, serde_json::from_slice(v.value()).map_err(meta_err)?));
                }
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let meta = RedbMeta::open(&dir.path().join("meta.redb")).unwrap();
        crate::storage::conformance::meta_store_suite(Arc::new(meta)).await;
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let repo: RepoName = "a/b".parse().unwrap();
        let d = Digest::sha256_of(b"x");
        {
            let m = RedbMeta::open(&path).unwrap();
            m.link_blob(&repo, RepoKind::Hosted, &d).await.unwrap();
        }
        let m = RedbMeta::open(&path).unwrap();
        assert!(m.blob_linked(&repo, &d).await.unwrap());
    }
}
