//! The two ends the copy engine works with here: this registry's own
//! content as a [`Source`], and another registry (through the upstream
//! client) as a [`Target`].

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::copy::{CopyError, Result, Source, Target};
use crate::oci::manifest::Descriptor;
use crate::oci::{Digest, Reference, RepoName};
use crate::registry::{Registry, RegistryError};
use crate::storage::ByteStream;
use crate::upstream::{UploadStart, UpstreamClient};

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

/// Another registry.
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
    async fn upload(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        source: &dyn Source,
        source_repo: &RepoName,
        mut location: String,
    ) -> Result<u64> {
        let c = &self.client;
        let what = format!("uploading blob {digest}");
        let mut offset = 0u64;
        let mut sent = 0u64;
        let mut restarts = 0u32;
        loop {
            let mut failed = None;
            while offset < size {
                let len = self.chunk_size.min(size - offset);
                let body = source.blob(source_repo, digest, offset, len).await?;
                match c.upload_chunk(repo, &location, offset, len, body).await {
                    Ok(next) => {
                        location = next;
                        offset += len;
                        sent += len;
                        (self.on_sent)(len);
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            let err = match failed {
                None => match c.finish_upload(repo, &location, digest).await {
                    Ok(()) => return Ok(sent),
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
                        Ok(UploadStart::Session(l)) => location = l,
                        Ok(UploadStart::Mounted) => return Ok(sent),
                        Err(e) => return Err(CopyError::target(&what, e)),
                    }
                    offset = 0;
                }
            }
        }
    }
}

#[async_trait]
impl Target for RemoteTarget {
    async fn has_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        let present = self
            .client
            .blob_size_if_present(repo, digest)
            .await
            .map_err(|e| CopyError::target(&format!("checking blob {digest}"), e))?
            .is_some();
        if present {
            self.known.insert(digest.clone(), repo.clone());
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
        let from = self.known.get(digest).filter(|r| r != repo);
        let start = self
            .client
            .start_upload(repo, from.as_ref().map(|f| (digest, f)))
            .await
            .map_err(|e| CopyError::target(&format!("opening an upload for {digest}"), e))?;
        let sent = match start {
            UploadStart::Mounted => 0,
            UploadStart::Session(location) => {
                self.upload(repo, digest, size, source, source_repo, location)
                    .await?
            }
        };
        self.known.insert(digest.clone(), repo.clone());
        Ok(sent)
    }

    async fn manifest_digest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<Digest>> {
        self.client
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
        self.client
            .put_manifest(repo, reference, media_type, body)
            .await
            .map_err(|e| CopyError::target(&format!("pushing manifest {reference}"), e))?;
        Ok(())
    }
}
