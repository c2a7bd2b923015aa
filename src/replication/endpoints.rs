//! The ends the copy engine works with: this registry's own content as a
//! [`Source`] (replication) or a [`Target`] (scheduled sync), and another
//! registry, through the upstream client, as a [`Target`] (replication) or
//! a [`Source`] (scheduled sync).

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::copy::{CopyError, Result, Source, Target};
use crate::oci::manifest::Descriptor;
use crate::oci::{Digest, Reference, RepoName};
use crate::registry::{Registry, RegistryError};
use crate::storage::ByteStream;
use crate::storage::jobs::UploadCheckpoint;
use crate::upstream::{UploadStart, UpstreamClient};
use futures::future::BoxFuture;

/// Restarts of one blob's upload (after a failed chunk or commit) before
/// the attempt gives up.
const MAX_BLOB_RESTARTS: u32 = 4;

/// This registry's content.
pub struct LocalSource {
    pub registry: Registry,
}

#[async_trait]
impl Source for LocalSource {
    async fn resolve(&self, repo: &RepoName, reference: &Reference) -> Result<Option<Digest>> {
        match self.registry.manifest(repo, reference, None, None).await {
            Ok(hit) => Ok(Some(hit.digest)),
            Err(RegistryError::ManifestUnknown | RegistryError::NameUnknown) => Ok(None),
            Err(e) => Err(CopyError::source(&format!("{repo}:{reference}"), e)),
        }
    }

    async fn manifest(&self, repo: &RepoName, digest: &Digest) -> Result<(String, Bytes)> {
        let what = || format!("{repo}@{digest}");
        let hit = self
            .registry
            .manifest(repo, &Reference::Digest(digest.clone()), None, None)
            .await
            .map_err(|e| CopyError::source(&what(), e))?;
        let body = self
            .registry
            .manifest_body(&hit)
            .await
            .map_err(|e| CopyError::source(&what(), e))?;
        Ok((hit.media_type, body))
    }

    async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<u64> {
        self.registry
            .blob_size(repo, digest, None)
            .await
            .map_err(|e| CopyError::source(&format!("blob {digest}"), e))
    }

    async fn blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        _size: u64,
        offset: u64,
        len: u64,
    ) -> Result<ByteStream> {
        if len == 0 {
            return Ok(futures::stream::empty().boxed());
        }
        let range = format!("bytes={}-{}", offset, offset + len - 1);
        let body = self
            .registry
            .blob(repo, digest, Some(&range), None)
            .await
            .map_err(|e| CopyError::source(&format!("blob {digest}"), e))?;
        Ok(body.stream)
    }

    async fn referrers(&self, repo: &RepoName, digest: &Digest) -> Result<Vec<Descriptor>> {
        self.registry
            .referrers(repo, digest, None, None)
            .await
            .map_err(|e| CopyError::source(&format!("referrers of {digest}"), e))
    }
}

/// Another registry, shared by every job of a destination.
pub struct RemoteTarget {
    pub client: UpstreamClient,
    pub chunk_size: u64,
    /// Blobs known to be at the destination, and in which repository (for
    /// cross-repository mounts).
    pub known: moka::sync::Cache<Digest, RepoName>,
    /// Called with the size of every chunk sent.
    pub on_sent: Box<dyn Fn(u64) + Send + Sync>,
}

impl RemoteTarget {
    /// Copies a blob: resumes the upload `cp` has for it if the destination
    /// still knows the session, else mounts it from a repository where it
    /// is known to be, else uploads it in a new session.
    async fn put_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        source: &dyn Source,
        source_repo: &RepoName,
        cp: &Checkpoints,
    ) -> Result<u64> {
        let resume = cp
            .resume
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .filter(|r| &r.digest == digest);
        if let Some(r) = resume
            && let Ok(Some(offset)) = self.client.upload_offset(repo, &r.location).await
            && offset <= size
        {
            tracing::info!(%digest, offset, "resuming a blob upload interrupted by a restart");
            let sent = self
                .upload(
                    repo,
                    digest,
                    size,
                    source,
                    source_repo,
                    r.location,
                    offset,
                    cp,
                )
                .await?;
            self.known.insert(digest.clone(), repo.clone());
            return Ok(sent);
        }
        let from = self.known.get(digest).filter(|r| r != repo);
        let start = self
            .client
            .start_upload(repo, from.as_ref().map(|f| (digest, f)))
            .await
            .map_err(|e| CopyError::target(&format!("opening an upload for {digest}"), e))?;
        let sent = match start {
            UploadStart::Mounted => 0,
            UploadStart::Session(location) => {
                self.upload(repo, digest, size, source, source_repo, location, 0, cp)
                    .await?
            }
        };
        self.known.insert(digest.clone(), repo.clone());
        Ok(sent)
    }

    #[allow(clippy::too_many_arguments)]
    async fn upload(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        source: &dyn Source,
        source_repo: &RepoName,
        mut location: String,
        mut offset: u64,
        cp: &Checkpoints,
    ) -> Result<u64> {
        let c = &self.client;
        let what = format!("uploading blob {digest}");
        let save = |location: &str| {
            (cp.save)(Some(UploadCheckpoint {
                digest: digest.clone(),
                location: location.to_string(),
            }))
        };
        save(&location).await;
        let mut sent = 0u64;
        let mut restarts = 0u32;
        loop {
            let mut failed = None;
            while offset < size {
                let len = self.chunk_size.min(size - offset);
                let body = source.blob(source_repo, digest, size, offset, len).await?;
                match c.upload_chunk(repo, &location, offset, len, body).await {
                    Ok(next) => {
                        location = next;
                        offset += len;
                        sent += len;
                        (self.on_sent)(len);
                        save(&location).await;
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            let err = match failed {
                None => match c.finish_upload(repo, &location, digest).await {
                    Ok(()) => {
                        (cp.save)(None).await;
                        return Ok(sent);
                    }
                    Err(e) => e,
                },
                Some(e) => e,
            };
            let err = CopyError::target(&what, err);
            restarts += 1;
            if restarts > MAX_BLOB_RESTARTS || matches!(err, CopyError::Permanent(_)) {
                return Err(err);
            }
            tracing::debug!(%digest, error = %err, offset, "blob upload interrupted; resuming");
            // Resume where the destination says the session is, or start
            // a new session.
            match c.upload_offset(repo, &location).await {
                Ok(Some(n)) if n <= size && offset < size => offset = n,
                Ok(_) | Err(_) => {
                    c.cancel_upload(repo, &location).await;
                    match c.start_upload(repo, None).await {
                        Ok(UploadStart::Session(l)) => {
                            location = l;
                            save(&location).await;
                        }
                        Ok(UploadStart::Mounted) => return Ok(sent),
                        Err(e) => return Err(CopyError::target(&what, e)),
                    }
                    offset = 0;
                }
            }
        }
    }
}

/// Where a job's blob upload stands: the checkpoint the job had when it
/// started (resumed if it is for the blob being sent), and how to record
/// a new one.
pub struct Checkpoints {
    pub resume: std::sync::Mutex<Option<UploadCheckpoint>>,
    pub save: Box<dyn Fn(Option<UploadCheckpoint>) -> BoxFuture<'static, ()> + Send + Sync>,
}

/// The destination as seen by one job run: uploads are checkpointed in the
/// job, and one interrupted by a crash resumes at the offset the
/// destination reports.
pub struct JobTarget<'a> {
    pub remote: &'a RemoteTarget,
    pub checkpoints: Checkpoints,
}

#[async_trait]
impl Target for JobTarget<'_> {
    async fn has_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        let present = self
            .remote
            .client
            .blob_size_if_present(repo, digest)
            .await
            .map_err(|e| CopyError::target(&format!("checking blob {digest}"), e))?
            .is_some();
        if present {
            self.remote.known.insert(digest.clone(), repo.clone());
        }
        Ok(present)
    }

    async fn put_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        source: &dyn Source,
        source_repo: &RepoName,
    ) -> Result<u64> {
        self.remote
            .put_blob(repo, digest, size, source, source_repo, &self.checkpoints)
            .await
    }

    async fn manifest_digest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<Digest>> {
        self.remote
            .client
            .manifest_digest_if_present(repo, reference)
            .await
            .map_err(|e| CopyError::target(&format!("checking manifest {reference}"), e))
    }

    async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        media_type: &str,
        body: Bytes,
    ) -> Result<()> {
        self.remote
            .client
            .put_manifest(repo, reference, media_type, body)
            .await
            .map_err(|e| CopyError::target(&format!("pushing manifest {reference}"), e))?;
        Ok(())
    }
}

/// Another registry as a source (scheduled sync).
pub struct UpstreamSource {
    pub client: UpstreamClient,
}

fn upstream_err(what: &str, e: crate::upstream::UpstreamError) -> CopyError {
    if e.is_unavailable() {
        CopyError::Unavailable(format!("{what} upstream: {e}"))
    } else {
        CopyError::Retry(format!("{what} upstream: {e}"))
    }
}

#[async_trait]
impl Source for UpstreamSource {
    async fn resolve(&self, repo: &RepoName, reference: &Reference) -> Result<Option<Digest>> {
        match self
            .client
            .head_manifest(repo, reference, crate::upstream::MANIFEST_TYPES)
            .await
        {
            Ok(m) => Ok(Some(m.digest)),
            Err(crate::upstream::UpstreamError::NotFound) => Ok(None),
            Err(e) => Err(upstream_err(&format!("resolving {repo}:{reference}"), e)),
        }
    }

    async fn manifest(&self, repo: &RepoName, digest: &Digest) -> Result<(String, Bytes)> {
        let (meta, body) = self
            .client
            .get_manifest(
                repo,
                &Reference::Digest(digest.clone()),
                crate::upstream::MANIFEST_TYPES,
            )
            .await
            .map_err(|e| upstream_err(&format!("reading {repo}@{digest}"), e))?;
        Ok((meta.media_type, body))
    }

    async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<u64> {
        self.client
            .head_blob(repo, digest)
            .await
            .map_err(|e| upstream_err(&format!("checking blob {digest}"), e))
    }

    async fn blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        offset: u64,
        len: u64,
    ) -> Result<ByteStream> {
        let stream = self
            .client
            .get_blob(repo, digest, offset, size)
            .await
            .map_err(|e| upstream_err(&format!("reading blob {digest}"), e))?;
        // The stream holds at most the blob's `size` bytes; exactly `len`
        // of them are taken, the rest of the body is dropped.
        let stream = stream
            .scan(len, |left, chunk| {
                let out = match chunk {
                    _ if *left == 0 => None,
                    Ok(mut b) => {
                        if b.len() as u64 > *left {
                            b.truncate(*left as usize);
                        }
                        *left -= b.len() as u64;
                        Some(Ok(b))
                    }
                    Err(e) => Some(Err(e)),
                };
                futures::future::ready(out)
            })
            .boxed();
        Ok(stream)
    }

    async fn referrers(&self, repo: &RepoName, digest: &Digest) -> Result<Vec<Descriptor>> {
        // Registries without the referrers API answer 404: nothing to copy.
        let Ok(body) = self.client.referrers(repo, digest, None).await else {
            return Ok(Vec::new());
        };
        #[derive(serde::Deserialize)]
        struct Index {
            #[serde(default)]
            manifests: Vec<Descriptor>,
        }
        Ok(serde_json::from_slice::<Index>(&body)
            .map(|i| i.manifests)
            .unwrap_or_default())
    }
}

/// This registry as a target (scheduled sync): content goes through the
/// same verified push path as a client's.
pub struct LocalTarget {
    pub registry: Registry,
}

fn local_err(what: &str, e: RegistryError) -> CopyError {
    match e {
        RegistryError::Denied(m) => CopyError::Permanent(format!("{what}: {m}")),
        e => CopyError::Retry(format!("{what}: {e}")),
    }
}

#[async_trait]
impl Target for LocalTarget {
    async fn has_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        self.registry
            .has_local_blob(repo, digest)
            .await
            .map_err(|e| local_err("checking a local blob", e))
    }

    async fn put_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        source: &dyn Source,
        source_repo: &RepoName,
    ) -> Result<u64> {
        let stream = source.blob(source_repo, digest, size, 0, size).await?;
        self.registry
            .hosted(repo, None)
            .await
            .map_err(|e| local_err(&format!("pushing into {repo}"), e))?
            .monolithic_upload(digest, Some(size), stream)
            .await
            .map_err(|e| local_err(&format!("storing blob {digest}"), e))?;
        Ok(size)
    }

    async fn manifest_digest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<Digest>> {
        let r = match reference {
            Reference::Digest(d) => self
                .registry
                .has_local_manifest(repo, d)
                .await
                .map(|has| has.then(|| d.clone())),
            Reference::Tag(t) => self.registry.local_tag(repo, t).await,
        };
        r.map_err(|e| local_err("checking a local manifest", e))
    }

    async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        media_type: &str,
        body: Bytes,
    ) -> Result<()> {
        self.registry
            .hosted(repo, None)
            .await
            .map_err(|e| local_err(&format!("pushing into {repo}"), e))?
            .put_manifest(reference, Some(media_type), body)
            .await
            .map_err(|e| local_err(&format!("storing manifest {reference}"), e))?;
        Ok(())
    }
}
