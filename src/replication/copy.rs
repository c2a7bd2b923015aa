//! The copy engine: one image (a manifest or index, its blobs, its
//! children, its tag and its referrers) from a [`Source`] to a [`Target`].
//!
//! Order, so that the target never holds a manifest whose content is
//! missing: blobs first (skipped when present, mounted when the target has
//! them in another repository, else streamed in chunks), then an index's
//! child manifests, then the manifest by digest, then the tag, then the
//! referrers. The tag is moved only if the source's tag still points at
//! the digest that was copied: a run that lost a race with a newer push
//! never sets an older digest.

use std::collections::HashSet;

use async_trait::async_trait;
use bytes::Bytes;

use crate::oci::manifest::{Descriptor, Manifest};
use crate::oci::{Digest, Reference, RepoName};
use crate::storage::ByteStream;
use crate::upstream::UpstreamError;

/// Referrers of referrers are followed this deep (a signature of an SBOM
/// of an image is depth 2).
const MAX_REFERRER_DEPTH: usize = 3;

#[derive(Debug, Clone, thiserror::Error)]
pub enum CopyError {
    /// The target is unreachable, overloaded or failing (connection,
    /// timeout, TLS, 429, 5xx): wait for it; the job is not at fault.
    #[error("{0}")]
    Unavailable(String),
    /// Refused for good until something changes (credentials, permission).
    #[error("{0}")]
    Permanent(String),
    /// Anything else: retried, counting an attempt.
    #[error("{0}")]
    Retry(String),
}

impl CopyError {
    /// Classifies an error from the target registry.
    pub fn target(what: &str, e: UpstreamError) -> CopyError {
        let msg = format!("{what}: {e}");
        match e {
            UpstreamError::Unauthorized(m) => CopyError::Permanent(format!(
                "{what}: the destination rejected the credentials: {m}"
            )),
            UpstreamError::Denied(m) => {
                CopyError::Permanent(format!("{what}: the destination denied access: {m}"))
            }
            e if e.is_unavailable() => CopyError::Unavailable(msg),
            _ => CopyError::Retry(msg),
        }
    }
    /// Classifies an error reading the source.
    pub fn source(what: &str, e: impl std::fmt::Display) -> CopyError {
        CopyError::Retry(format!("reading {what} at the source: {e}"))
    }
}

pub type Result<T, E = CopyError> = std::result::Result<T, E>;

/// Where content comes from.
#[async_trait]
pub trait Source: Send + Sync {
    /// The digest `reference` points at now; `None` if it does not exist.
    async fn resolve(&self, repo: &RepoName, reference: &Reference) -> Result<Option<Digest>>;
    /// A manifest's media type and bytes.
    async fn manifest(&self, repo: &RepoName, digest: &Digest) -> Result<(String, Bytes)>;
    async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<u64>;
    /// `len` bytes of a blob from `offset`.
    async fn blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<ByteStream>;
    /// Manifests whose subject is `digest`.
    async fn referrers(&self, repo: &RepoName, digest: &Digest) -> Result<Vec<Descriptor>>;
}

/// Where content goes.
#[async_trait]
pub trait Target: Send + Sync {
    async fn has_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool>;
    /// Copies a blob of `size` bytes from `source`; returns the bytes sent.
    async fn put_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        source: &dyn Source,
        source_repo: &RepoName,
    ) -> Result<u64>;
    /// The digest `reference` has at the target, if any.
    async fn manifest_digest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<Digest>>;
    async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        media_type: &str,
        body: Bytes,
    ) -> Result<()>;
}

/// What one copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Copied {
    /// The digest copied (`None`: the reference no longer exists at the
    /// source, nothing to do).
    pub digest: Option<Digest>,
    /// The source's tag moved during the copy: the tag was left alone (the
    /// newer push has its own job).
    pub superseded: bool,
    pub blobs_sent: usize,
    pub bytes_sent: u64,
    pub manifests_sent: usize,
}

/// One copy between a source repository and a target repository.
pub struct Copy<'a> {
    pub source: &'a dyn Source,
    pub source_repo: &'a RepoName,
    pub target: &'a dyn Target,
    pub target_repo: &'a RepoName,
    /// Only these platforms of an index (empty: every entry).
    platforms: &'a [Platform],
    seen: HashSet<Digest>,
    out: Copied,
}

/// A platform filter, `os/arch[/variant]` (a filter without a variant
/// matches every variant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl std::str::FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
            return Err(format!("platform {s:?} is not os/arch or os/arch/variant"));
        }
        Ok(Platform {
            os: parts[0].to_string(),
            architecture: parts[1].to_string(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }
}

impl Platform {
    fn matches(&self, p: &serde_json::Value) -> bool {
        p["os"].as_str() == Some(&self.os)
            && p["architecture"].as_str() == Some(&self.architecture)
            && (self.variant.is_none() || p["variant"].as_str() == self.variant.as_deref())
    }
}

impl<'a> Copy<'a> {
    pub fn new(
        source: &'a dyn Source,
        source_repo: &'a RepoName,
        target: &'a dyn Target,
        target_repo: &'a RepoName,
    ) -> Copy<'a> {
        Copy {
            source,
            source_repo,
            target,
            target_repo,
            platforms: &[],
            seen: HashSet::new(),
            out: Copied::default(),
        }
    }

    /// Copies only these platforms of an index: when the filter leaves
    /// entries out, the target gets an index of the chosen entries (whose
    /// digest differs from the source's), and the tag points at it.
    pub fn platforms(mut self, platforms: &'a [Platform]) -> Copy<'a> {
        self.platforms = platforms;
        self
    }

    /// Copies the root manifest; returns the digest, media type and bytes
    /// to tag.
    async fn root(&mut self, digest: &Digest) -> Result<(Digest, String, Bytes)> {
        let (media_type, body) = self.source.manifest(self.source_repo, digest).await?;
        let is_index = Manifest::parse(&body, Some(&media_type))
            .map(|m| m.kind == crate::oci::manifest::ManifestKind::Index)
            .unwrap_or(false);
        if self.platforms.is_empty() || !is_index {
            self.manifest(digest).await?;
            return Ok((digest.clone(), media_type, body));
        }
        let mut index: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| CopyError::Permanent(format!("index {digest}: {e}")))?;
        let entries = index["manifests"].as_array().cloned().unwrap_or_default();
        let kept: Vec<serde_json::Value> = entries
            .iter()
            .filter(|e| self.platforms.iter().any(|p| p.matches(&e["platform"])))
            .cloned()
            .collect();
        if kept.is_empty() {
            return Err(CopyError::Permanent(format!(
                "no entry of index {digest} matches the platforms filter"
            )));
        }
        if kept.len() == entries.len() {
            self.manifest(digest).await?;
            return Ok((digest.clone(), media_type, body));
        }
        index["manifests"] = serde_json::Value::Array(kept.clone());
        let filtered = Bytes::from(
            serde_json::to_vec(&index).map_err(|e| CopyError::Permanent(e.to_string()))?,
        );
        let filtered_digest = Digest::sha256_of(&filtered);
        for e in &kept {
            let child: Digest = e["digest"]
                .as_str()
                .unwrap_or_default()
                .parse()
                .map_err(|e| CopyError::Permanent(format!("index {digest}: {e}")))?;
            if !self.seen.contains(&child) {
                self.manifest(&child).await?;
            }
        }
        let as_ref = Reference::Digest(filtered_digest.clone());
        if self
            .target
            .manifest_digest(self.target_repo, &as_ref)
            .await?
            .is_none()
        {
            self.target
                .put_manifest(self.target_repo, &as_ref, &media_type, filtered.clone())
                .await?;
            self.out.manifests_sent += 1;
        }
        Ok((filtered_digest, media_type, filtered))
    }

    /// Copies what `reference` points at now, then moves the tag (for a
    /// tag), then the referrers.
    pub async fn run(mut self, reference: &Reference) -> Result<Copied> {
        let Some(source_digest) = self.source.resolve(self.source_repo, reference).await? else {
            return Ok(self.out);
        };
        let (digest, media_type, body) = self.root(&source_digest).await?;
        if let Reference::Tag(_) = reference {
            let now = self.source.resolve(self.source_repo, reference).await?;
            if now.as_ref() != Some(&source_digest) {
                self.out.superseded = true;
            } else {
                let there = self
                    .target
                    .manifest_digest(self.target_repo, reference)
                    .await?;
                if there.as_ref() != Some(&digest) {
                    self.target
                        .put_manifest(self.target_repo, reference, &media_type, body)
                        .await?;
                    self.out.manifests_sent += 1;
                }
            }
        }
        let roots: Vec<Digest> = self.seen.iter().cloned().collect();
        for root in roots {
            self.referrers(&root, 0).await?;
        }
        self.out.digest = Some(digest);
        Ok(self.out)
    }

    /// The referrers of `subject` (and theirs, to a depth).
    async fn referrers(&mut self, subject: &Digest, depth: usize) -> Result<()> {
        if depth >= MAX_REFERRER_DEPTH {
            return Ok(());
        }
        for r in self.source.referrers(self.source_repo, subject).await? {
            if self.seen.contains(&r.digest) {
                continue;
            }
            self.manifest(&r.digest).await?;
            Box::pin(self.referrers(&r.digest, depth + 1)).await?;
        }
        Ok(())
    }

    /// Copies a manifest by digest with everything it needs first.
    /// Returns its media type.
    async fn manifest(&mut self, digest: &Digest) -> Result<String> {
        if self.seen.contains(digest) {
            let (media_type, _) = self.source.manifest(self.source_repo, digest).await?;
            return Ok(media_type);
        }
        self.seen.insert(digest.clone());
        let (media_type, body) = self.source.manifest(self.source_repo, digest).await?;
        let as_ref = Reference::Digest(digest.clone());
        if self
            .target
            .manifest_digest(self.target_repo, &as_ref)
            .await?
            .is_some()
        {
            // A registry holds a manifest only with its content.
            return Ok(media_type);
        }
        let m = Manifest::parse(&body, Some(&media_type))
            .map_err(|e| CopyError::Permanent(format!("manifest {digest} at the source: {e}")))?;
        for blob in &m.blobs {
            if self.target.has_blob(self.target_repo, blob).await? {
                continue;
            }
            let size = self.source.blob_size(self.source_repo, blob).await?;
            let sent = self
                .target
                .put_blob(self.target_repo, blob, size, self.source, self.source_repo)
                .await?;
            self.out.blobs_sent += 1;
            self.out.bytes_sent += sent;
        }
        for child in &m.children {
            if !self.seen.contains(child) {
                Box::pin(self.manifest(child)).await?;
            }
        }
        self.target
            .put_manifest(self.target_repo, &as_ref, &media_type, body)
            .await?;
        self.out.manifests_sent += 1;
        Ok(media_type)
    }
}
