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

pub use crate::oci::manifest::Platform;
use std::collections::HashSet;

use async_trait::async_trait;
use bytes::Bytes;

use crate::oci::manifest::{Descriptor, MAX_INDEX_DEPTH, Manifest, ManifestKind};
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
            // A token realm or redirect outside the destination's trust
            // boundary: configuration (`token_realm_hosts`) decides, not time.
            UpstreamError::Refused(m) => CopyError::Permanent(format!("{what}: {m}")),
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

/// Runs `f`; a panic inside it comes back as `Err` with the panic's
/// message, so that a bug met by one job (or one synced tag) fails that
/// one and not the process. (A stack overflow cannot be caught: the walks
/// here keep their own stacks instead of recursing.)
pub async fn catch_panic<T>(f: impl Future<Output = T>) -> std::result::Result<T, String> {
    use futures::FutureExt;
    std::panic::AssertUnwindSafe(f)
        .catch_unwind()
        .await
        .map_err(|panic| {
            panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into())
        })
}

/// Where content comes from.
#[async_trait]
pub trait Source: Send + Sync {
    /// The digest `reference` points at now; `None` if it does not exist.
    async fn resolve(&self, repo: &RepoName, reference: &Reference) -> Result<Option<Digest>>;
    /// A manifest's media type and bytes.
    async fn manifest(&self, repo: &RepoName, digest: &Digest) -> Result<(String, Bytes)>;
    async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<u64>;
    /// `len` bytes from `offset` of a blob of `size` bytes (as
    /// [`blob_size`](Self::blob_size) said).
    async fn blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
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
            .map(|m| m.kind == ManifestKind::Index)
            .unwrap_or(false);
        if self.platforms.is_empty() || !is_index {
            let read = Some((media_type.clone(), body.clone()));
            self.tree(vec![(digest.clone(), read)], 0).await?;
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
            let read = Some((media_type.clone(), body.clone()));
            self.tree(vec![(digest.clone(), read)], 0).await?;
            return Ok((digest.clone(), media_type, body));
        }
        index["manifests"] = serde_json::Value::Array(kept.clone());
        let filtered = Bytes::from(
            serde_json::to_vec(&index).map_err(|e| CopyError::Permanent(e.to_string()))?,
        );
        let filtered_digest = Digest::sha256_of(&filtered);
        let mut children = Vec::with_capacity(kept.len());
        for e in &kept {
            let child: Digest = e["digest"]
                .as_str()
                .unwrap_or_default()
                .parse()
                .map_err(|e| CopyError::Permanent(format!("index {digest}: {e}")))?;
            children.push((child, None));
        }
        // The kept entries sit one index (the filtered one) down.
        self.tree(children, 1).await?;
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
        self.referrers().await?;
        self.out.digest = Some(digest);
        Ok(self.out)
    }

    /// The referrers of every manifest copied (and theirs, to a depth),
    /// from a work list rather than by recursion.
    async fn referrers(&mut self) -> Result<()> {
        let mut subjects: Vec<(Digest, usize)> = self.seen.iter().map(|d| (d.clone(), 0)).collect();
        while let Some((subject, depth)) = subjects.pop() {
            if depth >= MAX_REFERRER_DEPTH {
                continue;
            }
            for r in self.source.referrers(self.source_repo, &subject).await? {
                if self.seen.contains(&r.digest) {
                    continue;
                }
                self.tree(vec![(r.digest.clone(), None)], 0).await?;
                subjects.push((r.digest, depth + 1));
            }
        }
        Ok(())
    }

    /// Copies manifests by digest, each with everything it needs first
    /// (blobs, then children, then the manifest; each manifest once per
    /// copy). `roots` may come with their media type and bytes already
    /// read; `above` is how many indexes sit above them.
    ///
    /// The walk keeps its own stack, so a deep tree costs heap, not the
    /// thread's stack, and it fails at an index nested deeper than
    /// [`MAX_INDEX_DEPTH`]: neither that index nor any above it is sent
    /// (content beside it in the tree may have been).
    async fn tree(
        &mut self,
        roots: Vec<(Digest, Option<(String, Bytes)>)>,
        above: usize,
    ) -> Result<()> {
        enum Step {
            /// Look at a manifest: skip it, or send its blobs and queue its
            /// children and then itself.
            Visit {
                digest: Digest,
                read: Option<(String, Bytes)>,
                above: usize,
            },
            /// Send a manifest whose content is at the target.
            Put {
                digest: Digest,
                media_type: String,
                body: Bytes,
            },
        }
        let mut stack: Vec<Step> = roots
            .into_iter()
            .rev()
            .map(|(digest, read)| Step::Visit {
                digest,
                read,
                above,
            })
            .collect();
        while let Some(step) = stack.pop() {
            let (digest, read, above) = match step {
                Step::Put {
                    digest,
                    media_type,
                    body,
                } => {
                    let as_ref = Reference::Digest(digest);
                    self.target
                        .put_manifest(self.target_repo, &as_ref, &media_type, body)
                        .await?;
                    self.out.manifests_sent += 1;
                    continue;
                }
                Step::Visit {
                    digest,
                    read,
                    above,
                } => (digest, read, above),
            };
            if !self.seen.insert(digest.clone()) {
                continue;
            }
            let as_ref = Reference::Digest(digest.clone());
            if self
                .target
                .manifest_digest(self.target_repo, &as_ref)
                .await?
                .is_some()
            {
                // A registry holds a manifest only with its content.
                continue;
            }
            let (media_type, body) = match read {
                Some(r) => r,
                None => self.source.manifest(self.source_repo, &digest).await?,
            };
            let m = Manifest::parse(&body, Some(&media_type)).map_err(|e| {
                CopyError::Permanent(format!("manifest {digest} at the source: {e}"))
            })?;
            let below = above + usize::from(m.kind == ManifestKind::Index);
            if below > MAX_INDEX_DEPTH {
                return Err(CopyError::Permanent(format!(
                    "indexes are nested more than {MAX_INDEX_DEPTH} levels deep at the source \
                     (index {digest} is level {below}); at most {MAX_INDEX_DEPTH} are copied"
                )));
            }
            for blob in &m.blobs {
                if self.target.has_blob(self.target_repo, &blob.digest).await? {
                    continue;
                }
                let size = self
                    .source
                    .blob_size(self.source_repo, &blob.digest)
                    .await?;
                let sent = self
                    .target
                    .put_blob(
                        self.target_repo,
                        &blob.digest,
                        size,
                        self.source,
                        self.source_repo,
                    )
                    .await?;
                self.out.blobs_sent += 1;
                self.out.bytes_sent += sent;
            }
            stack.push(Step::Put {
                digest,
                media_type,
                body,
            });
            stack.extend(m.children.into_iter().rev().map(|c| Step::Visit {
                digest: c.digest,
                read: None,
                above: below,
            }));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use futures::StreamExt;
    use serde_json::json;

    use super::*;

    const IMAGE: &str = "application/vnd.oci.image.manifest.v1+json";
    const INDEX: &str = "application/vnd.oci.image.index.v1+json";

    #[derive(Default)]
    struct MemSource {
        manifests: HashMap<Digest, (String, Bytes)>,
        blobs: HashMap<Digest, Bytes>,
        referrers: HashMap<Digest, Vec<Descriptor>>,
        tags: Mutex<HashMap<String, Digest>>,
        /// Moves a tag on the first blob read: (tag, new digest).
        move_on_read: Mutex<Option<(String, Digest)>>,
    }

    impl MemSource {
        fn blob(&mut self, data: &[u8]) -> (Digest, usize) {
            let d = Digest::sha256_of(data);
            self.blobs.insert(d.clone(), Bytes::copy_from_slice(data));
            (d, data.len())
        }
        fn manifest(&mut self, media_type: &str, v: serde_json::Value) -> (Digest, usize) {
            let body = Bytes::from(serde_json::to_vec(&v).unwrap());
            let d = Digest::sha256_of(&body);
            let n = body.len();
            self.manifests
                .insert(d.clone(), (media_type.to_string(), body));
            (d, n)
        }
        fn image(
            &mut self,
            arch: &str,
            layer: &[u8],
            subject: Option<(&Digest, usize)>,
        ) -> (Digest, usize) {
            let (c, cn) = self.blob(format!("{{\"architecture\":\"{arch}\"}}").as_bytes());
            let (l, ln) = self.blob(layer);
            let mut m = json!({
                "schemaVersion": 2, "mediaType": IMAGE,
                "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": c.as_str(), "size": cn },
                "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": l.as_str(), "size": ln }],
            });
            if let Some((s, n)) = subject {
                m["subject"] = json!({ "mediaType": IMAGE, "digest": s.as_str(), "size": n });
            }
            let (d, n) = self.manifest(IMAGE, m);
            if let Some((s, _)) = subject {
                self.referrers
                    .entry(s.clone())
                    .or_default()
                    .push(Descriptor {
                        media_type: IMAGE.into(),
                        digest: d.clone(),
                        size: n as u64,
                        artifact_type: None,
                        annotations: Default::default(),
                    });
            }
            (d, n)
        }
    }

    #[async_trait]
    impl Source for MemSource {
        async fn resolve(&self, _: &RepoName, reference: &Reference) -> Result<Option<Digest>> {
            Ok(match reference {
                Reference::Digest(d) => self.manifests.contains_key(d).then(|| d.clone()),
                Reference::Tag(t) => self.tags.lock().unwrap().get(t.as_str()).cloned(),
            })
        }
        async fn manifest(&self, _: &RepoName, digest: &Digest) -> Result<(String, Bytes)> {
            self.manifests
                .get(digest)
                .cloned()
                .ok_or_else(|| CopyError::Retry(format!("no manifest {digest}")))
        }
        async fn blob_size(&self, _: &RepoName, digest: &Digest) -> Result<u64> {
            Ok(self.blobs[digest].len() as u64)
        }
        async fn blob(
            &self,
            _: &RepoName,
            digest: &Digest,
            _size: u64,
            offset: u64,
            len: u64,
        ) -> Result<ByteStream> {
            if let Some((tag, d)) = self.move_on_read.lock().unwrap().take() {
                self.tags.lock().unwrap().insert(tag, d);
            }
            let b = self.blobs[digest].slice(offset as usize..(offset + len) as usize);
            Ok(futures::stream::once(async move { Ok(b) }).boxed())
        }
        async fn referrers(&self, _: &RepoName, digest: &Digest) -> Result<Vec<Descriptor>> {
            Ok(self.referrers.get(digest).cloned().unwrap_or_default())
        }
    }

    /// Refuses (panics on) a manifest whose blobs or children it lacks.
    #[derive(Default)]
    struct MemTarget {
        blobs: Mutex<HashSet<Digest>>,
        manifests: Mutex<HashMap<Digest, Bytes>>,
        tags: Mutex<HashMap<String, Digest>>,
    }

    #[async_trait]
    impl Target for MemTarget {
        async fn has_blob(&self, _: &RepoName, digest: &Digest) -> Result<bool> {
            Ok(self.blobs.lock().unwrap().contains(digest))
        }
        async fn put_blob(
            &self,
            repo: &RepoName,
            digest: &Digest,
            size: u64,
            source: &dyn Source,
            source_repo: &RepoName,
        ) -> Result<u64> {
            let mut s = source.blob(source_repo, digest, size, 0, size).await?;
            let mut h = digest.algorithm().hasher();
            while let Some(c) = s.next().await {
                h.update(&c.unwrap());
            }
            assert_eq!(&h.finish(), digest, "{repo}: blob content");
            self.blobs.lock().unwrap().insert(digest.clone());
            Ok(size)
        }
        async fn manifest_digest(
            &self,
            _: &RepoName,
            reference: &Reference,
        ) -> Result<Option<Digest>> {
            Ok(match reference {
                Reference::Digest(d) => self
                    .manifests
                    .lock()
                    .unwrap()
                    .contains_key(d)
                    .then(|| d.clone()),
                Reference::Tag(t) => self.tags.lock().unwrap().get(t.as_str()).cloned(),
            })
        }
        async fn put_manifest(
            &self,
            _: &RepoName,
            reference: &Reference,
            media_type: &str,
            body: Bytes,
        ) -> Result<()> {
            let m = Manifest::parse(&body, Some(media_type)).unwrap();
            for b in m.blobs.iter().map(|b| &b.digest) {
                assert!(
                    self.blobs.lock().unwrap().contains(b),
                    "manifest before its blob {b}"
                );
            }
            for c in m.children.iter().map(|c| &c.digest) {
                assert!(
                    self.manifests.lock().unwrap().contains_key(c),
                    "index before its child {c}"
                );
            }
            let d = Digest::sha256_of(&body);
            self.manifests.lock().unwrap().insert(d.clone(), body);
            if let Reference::Tag(t) = reference {
                self.tags.lock().unwrap().insert(t.to_string(), d);
            }
            Ok(())
        }
    }

    fn repo() -> RepoName {
        "prod/app".parse().unwrap()
    }

    fn multi_arch(src: &mut MemSource) -> (Digest, Digest, Digest, Digest) {
        let (amd, an) = src.image("amd64", b"amd layer", None);
        let (arm, rn) = src.image("arm64", b"arm layer", None);
        let (index, n) = src.manifest(INDEX, json!({
            "schemaVersion": 2, "mediaType": INDEX,
            "manifests": [
                { "mediaType": IMAGE, "digest": amd.as_str(), "size": an, "platform": { "os": "linux", "architecture": "amd64" } },
                { "mediaType": IMAGE, "digest": arm.as_str(), "size": rn, "platform": { "os": "linux", "architecture": "arm64" } },
            ],
        }));
        let (sig, _) = src.image("sig", b"signature", Some((&index, n)));
        src.tags.lock().unwrap().insert("v1".into(), index.clone());
        (index, amd, arm, sig)
    }

    #[tokio::test]
    async fn an_index_its_children_and_referrers_arrive_in_order() {
        let mut src = MemSource::default();
        let (index, amd, arm, sig) = multi_arch(&mut src);
        let dst = MemTarget::default();
        let r = repo();
        let out = Copy::new(&src, &r, &dst, &r)
            .run(&"v1".parse().unwrap())
            .await
            .unwrap();
        assert_eq!(out.digest.as_ref(), Some(&index));
        assert!(!out.superseded);
        assert_eq!(dst.tags.lock().unwrap()["v1"], index);
        for d in [&index, &amd, &arm, &sig] {
            assert!(dst.manifests.lock().unwrap().contains_key(d));
        }
        // Idempotent: a second run sends nothing.
        let again = Copy::new(&src, &r, &dst, &r)
            .run(&"v1".parse().unwrap())
            .await
            .unwrap();
        assert_eq!((again.manifests_sent, again.blobs_sent), (0, 0));
    }

    #[tokio::test]
    async fn a_tag_moved_during_the_copy_is_left_for_the_newer_run() {
        let mut src = MemSource::default();
        let (old, _) = src.image("amd64", b"old", None);
        let (new, _) = src.image("amd64", b"new", None);
        src.tags
            .lock()
            .unwrap()
            .insert("latest".into(), old.clone());
        *src.move_on_read.lock().unwrap() = Some(("latest".into(), new.clone()));
        let dst = MemTarget::default();
        let r = repo();
        let out = Copy::new(&src, &r, &dst, &r)
            .run(&"latest".parse().unwrap())
            .await
            .unwrap();
        assert!(out.superseded);
        assert!(
            dst.tags.lock().unwrap().get("latest").is_none(),
            "the older digest was tagged"
        );
        let out = Copy::new(&src, &r, &dst, &r)
            .run(&"latest".parse().unwrap())
            .await
            .unwrap();
        assert!(!out.superseded);
        assert_eq!(dst.tags.lock().unwrap()["latest"], new);
    }

    #[tokio::test]
    async fn a_platform_filter_tags_an_index_of_the_kept_entries() {
        let mut src = MemSource::default();
        let (index, amd, arm, _) = multi_arch(&mut src);
        let dst = MemTarget::default();
        let r = repo();
        let platforms = ["linux/amd64".parse::<Platform>().unwrap()];
        let out = Copy::new(&src, &r, &dst, &r)
            .platforms(&platforms)
            .run(&"v1".parse().unwrap())
            .await
            .unwrap();
        let tagged = dst.tags.lock().unwrap()["v1"].clone();
        assert_ne!(tagged, index);
        assert_eq!(out.digest, Some(tagged.clone()));
        {
            let m = dst.manifests.lock().unwrap();
            assert!(m.contains_key(&amd) && !m.contains_key(&arm));
            let body: serde_json::Value = serde_json::from_slice(&m[&tagged]).unwrap();
            assert_eq!(body["manifests"].as_array().unwrap().len(), 1);
        }
        let none = ["windows/amd64".parse::<Platform>().unwrap()];
        let e = Copy::new(&src, &r, &MemTarget::default(), &r)
            .platforms(&none)
            .run(&"v1".parse().unwrap())
            .await
            .unwrap_err();
        assert!(matches!(e, CopyError::Permanent(_)), "{e}");
    }

    /// An image under `levels` indexes, each the only entry of the next;
    /// the outermost is tagged `deep`.
    fn nested(src: &mut MemSource, levels: usize) -> Digest {
        let (mut d, mut n) = src.image("amd64", b"at the bottom", None);
        let mut mt = IMAGE;
        for _ in 0..levels {
            (d, n) = src.manifest(
                INDEX,
                json!({
                    "schemaVersion": 2, "mediaType": INDEX,
                    "manifests": [{ "mediaType": mt, "digest": d.as_str(), "size": n }],
                }),
            );
            mt = INDEX;
        }
        src.tags.lock().unwrap().insert("deep".into(), d.clone());
        d
    }

    #[tokio::test]
    async fn indexes_nested_to_the_limit_are_copied() {
        let mut src = MemSource::default();
        let top = nested(&mut src, MAX_INDEX_DEPTH);
        let dst = MemTarget::default();
        let r = repo();
        let out = Copy::new(&src, &r, &dst, &r)
            .run(&"deep".parse().unwrap())
            .await
            .unwrap();
        assert_eq!(out.digest, Some(top.clone()));
        assert_eq!(out.manifests_sent, MAX_INDEX_DEPTH + 2);
        assert_eq!(dst.tags.lock().unwrap()["deep"], top);
    }

    /// Thousands of nested indexes neither overflow the stack (the walk
    /// keeps its own) nor reach the target: the run fails for good with
    /// the reason, before anything of the tree is sent.
    #[tokio::test]
    async fn an_index_nested_past_the_limit_fails_without_sending_anything() {
        for levels in [MAX_INDEX_DEPTH + 1, 3000] {
            let mut src = MemSource::default();
            nested(&mut src, levels);
            let dst = MemTarget::default();
            let r = repo();
            let e = Copy::new(&src, &r, &dst, &r)
                .run(&"deep".parse().unwrap())
                .await
                .unwrap_err();
            assert!(
                matches!(&e, CopyError::Permanent(m) if m.contains("nested") && m.contains(&MAX_INDEX_DEPTH.to_string())),
                "{levels}: {e}"
            );
            assert!(dst.manifests.lock().unwrap().is_empty(), "{levels}");
            assert!(dst.blobs.lock().unwrap().is_empty(), "{levels}");
            assert!(dst.tags.lock().unwrap().is_empty(), "{levels}");
        }
    }

    #[tokio::test]
    async fn a_panic_comes_back_as_its_message() {
        let ok = catch_panic(async { 7 }).await;
        assert_eq!(ok, Ok(7));
        let n = 3;
        let e = catch_panic(async move {
            if n == 3 {
                panic!("bad state {n}");
            }
        })
        .await;
        assert_eq!(e, Err("bad state 3".to_string()));
        let e = catch_panic(async { std::panic::panic_any(5u8) }).await;
        assert_eq!(e, Err("(no message)".to_string()));
    }
}
