//! The S3 backend: blobs and upload sessions in an S3-compatible bucket
//! (AWS S3, SeaweedFS, MinIO, Ceph RGW) shared by every wharf replica.
//! Built on `object_store`; nothing here speaks HTTP or signs requests.
//!
//! Layout under the configured prefix:
//! - `blobs/<algorithm>/<hex>`: published, verified blobs;
//! - `uploads/<id>/session`: marks an open upload session;
//! - `uploads/<id>/c<offset, 20 digits>-<unique>`: one object per chunk
//!   received, under a key no other request writes, written whole or not
//!   at all (a multipart upload completed only when the chunk's body
//!   arrived in full and had the announced length);
//! - `uploads/<id>/<offset, 20 digits>`: the record that makes a chunk
//!   object part of the session (its name and size, and the sha256 of the
//!   session's first bytes up to its end when the replica that wrote it had
//!   hashed all of them), written by a create-only write once the chunk
//!   object is complete;
//! - `quarantine/<algorithm>-<hex>`: blobs fsck found corrupt;
//! - `meta/...`: the metadata store ([`super::s3meta`]).
//!
//! **Why one object per chunk.** A chunked push may send its chunks to
//! different replicas, and a replica may die between two of them: the
//! session's state has to be in the bucket, and a SHA-256 state cannot be
//! serialised with the `sha2` crate. Each chunk is therefore its own
//! immutable object, and the size of a session is the sum of its chunks.
//! The replica that received bytes `0..n` in order records their digest
//! with the last chunk, so the common pushes (one chunk, or every chunk on
//! one replica) know their digest at commit without reading anything back.
//!
//! **One chunk per offset.** Two requests may append at the same offset at
//! once on two replicas. Each writes its chunk to a key of its own, then
//! claims the offset with a create-only record naming that key: one record
//! wins, the other request is refused (416 with the session's size) and
//! its object removed. A chunk object is never overwritten, so a digest
//! recorded with a chunk, or a replica's running hash, describes exactly
//! the objects the session is made of, and a commit publishes the bytes
//! that were hashed.
//!
//! **Publishing.** A blob appears at `blobs/...` only through an atomic
//! S3 operation performed after the digest matched: a server-side copy of
//! the chunk object of a single-chunk session whose digest (the running
//! hash of the replica that wrote it, or the one recorded with it)
//! matches, or otherwise a multipart upload to the final key that streams
//! the chunks back through a hasher and is completed only if the computed
//! digest matches (aborted otherwise). No reader ever sees a partial or
//! unverified blob. The cost of a multi-chunk push is that its bytes cross
//! wharf twice at commit; a single-chunk push (the usual `docker push` and
//! monolithic uploads) of up to 5 GiB (S3's limit for one copy) is
//! published by a server-side copy.
//! Parts are 8 MiB and S3 allows 10,000 of them: one chunk, or one blob
//! assembled at commit, is at most 78 GiB.
//!
//! **Fills** (pull-through) stage in a local file, because the waiters of a
//! fill read the growing bytes; the verified file is then uploaded to the
//! final key with a multipart upload. A replica that dies mid-fill leaves
//! only a local file, removed at the next start.
//!
//! Incomplete multipart uploads left by a replica killed mid-chunk are
//! invisible and never published; a bucket lifecycle rule
//! (`AbortIncompleteMultipartUpload`) reclaims their space.

use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode,
    PutOptions, PutPayload, RetryConfig, WriteMultipart,
};

use super::fs::{Sessions, StagingFile};
use super::{
    BlobStore, BlobUrls, ByteStream, FillStore, FillWriter, Result, StagedReader, StorageError,
    UploadStore,
};
use crate::oci::{Algorithm, Digest, Hasher, UploadId};

/// Size of the parts of multipart uploads (S3's minimum is 5 MiB).
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts of one multipart upload in flight at once.
const PART_CONCURRENCY: usize = 4;
/// Largest object a single server-side copy may make (S3's CopyObject
/// limit); larger single-chunk sessions are assembled instead.
const MAX_COPY: u64 = 5 * 1024 * 1024 * 1024;
/// Read size when uploading a local staging file.
const FILE_READ: usize = 1024 * 1024;

/// How to reach the bucket.
#[derive(Clone)]
pub struct S3Options {
    pub bucket: String,
    /// Key prefix without leading or trailing `/`; empty for the root.
    pub prefix: String,
    /// `http(s)://host[:port]`; `None` for AWS S3.
    pub endpoint: Option<String>,
    pub region: String,
    pub path_style: bool,
    /// Static (access key id, secret); `None`: the standard AWS chain.
    pub credentials: Option<(String, String)>,
    /// Extra PEM CA bundle to trust.
    pub ca_pem: Option<Vec<u8>>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .finish_non_exhaustive()
    }
}

/// Connects an `object_store` client to the bucket described by `opts`
/// (no request is sent yet).
pub fn connect(opts: &S3Options) -> Result<Arc<AmazonS3>> {
    let mut b = match &opts.credentials {
        Some(_) => AmazonS3Builder::new(),
        // The AWS chain: AWS_* variables, web identity, container and
        // instance credentials.
        None => AmazonS3Builder::from_env(),
    };
    let mut client = ClientOptions::new()
        .with_connect_timeout(opts.connect_timeout)
        .with_read_timeout(opts.read_timeout)
        .with_timeout_disabled();
    if let Some(pem) = &opts.ca_pem {
        let certs = object_store::Certificate::from_pem_bundle(pem)
            .map_err(|e| StorageError::Io(io::Error::other(format!("CA bundle: {e}"))))?;
        for cert in certs {
            client = client.with_root_certificate(cert);
        }
    }
    b = b
        .with_client_options(client)
        .with_bucket_name(&opts.bucket)
        .with_region(&opts.region)
        .with_virtual_hosted_style_request(!opts.path_style)
        .with_conditional_put(S3ConditionalPut::ETagMatch)
        // Transient failures are retried, for at most 30 s per request (a
        // store that is down fails requests, and start-up, quickly).
        .with_retry(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 5,
            retry_timeout: Duration::from_secs(30),
        });
    if let Some(e) = &opts.endpoint {
        b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
    }
    if let Some((id, secret)) = &opts.credentials {
        b = b.with_access_key_id(id).with_secret_access_key(secret);
    }
    let store = b
        .build()
        .map_err(|e| StorageError::Io(io::Error::other(e)))?;
    Ok(Arc::new(store))
}

/// Maps an `object_store` error: a missing object is `NotFound`, the rest
/// is I/O.
pub(crate) fn os_err(e: object_store::Error) -> StorageError {
    match e {
        object_store::Error::NotFound { .. } => StorageError::NotFound,
        other => StorageError::Io(io::Error::other(other)),
    }
}

/// Joins the configured prefix and a relative key.
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Keys {
        let prefix = prefix.trim_matches('/');
        Keys {
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
        }
    }

    pub(crate) fn path(&self, rel: &str) -> Path {
        Path::from(format!("{}{rel}", self.prefix))
    }

    /// The key relative to the prefix, if it is under it.
    pub(crate) fn relative<'a>(&self, p: &'a Path) -> Option<&'a str> {
        p.as_ref().strip_prefix(self.prefix.as_str())
    }
}

fn blob_key(keys: &Keys, d: &Digest) -> Path {
    keys.path(&format!("blobs/{}/{}", d.algorithm().as_str(), d.hex()))
}

/// Presigned GET URLs of published blobs: clients fetch the bytes from the
/// store itself (`storage.s3.redirect`).
pub struct S3Urls {
    signer: Arc<AmazonS3>,
    keys: Keys,
}

impl S3Urls {
    pub fn new(signer: Arc<AmazonS3>, prefix: &str) -> S3Urls {
        S3Urls {
            signer,
            keys: Keys::new(prefix),
        }
    }
}

#[async_trait]
impl BlobUrls for S3Urls {
    async fn read_url(&self, digest: &Digest, ttl: Duration) -> Result<String> {
        let url = self
            .signer
            .signed_url(
                object_store::signer::Method::GET,
                &blob_key(&self.keys, digest),
                ttl,
            )
            .await
            .map_err(os_err)?;
        Ok(url.to_string())
    }
}

/// The record that makes one chunk object part of a session, at
/// `uploads/<id>/<offset, 20 digits>`: written once, by a create-only
/// write, after the chunk object is complete. Whoever creates it owns the
/// offset; the record never changes until the session ends.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Claim {
    /// File name of the chunk object (`c<offset>-<unique>`), written by one
    /// request and nothing else.
    chunk: String,
    size: u64,
    /// The sha256 of the session's first `offset + size` bytes, when the
    /// replica that wrote the chunk had hashed every one of them (the
    /// chunks it owns, whose objects it wrote itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    digest: Option<Digest>,
}

/// One accepted chunk of an upload session.
#[derive(Debug, Clone)]
struct Part {
    /// The chunk object.
    path: Path,
}

/// What the bucket holds of one upload session.
struct Session {
    parts: Vec<Part>,
    /// The digest recorded with the last chunk (of all `size` bytes).
    digest: Option<Digest>,
    size: u64,
}

impl Session {
    fn chunks(&self) -> Vec<Path> {
        self.parts.iter().map(|p| p.path.clone()).collect()
    }
}

/// A replica's running hash of a session: valid while the session's chunk
/// objects are exactly `chunks`, the objects it hashed as it wrote them.
#[derive(Default)]
struct Hashed {
    hasher: Option<Hasher>,
    chunks: Vec<Path>,
}

/// Chunk records read by this replica (immutable while their session
/// lasts), so a session's listing reads each one once.
const CLAIM_CACHE: u64 = 100_000;

pub struct S3Store {
    store: Arc<dyn ObjectStore>,
    keys: Keys,
    /// Local scratch directory (fill staging files).
    scratch: PathBuf,
    /// Hash state of the sessions whose bytes arrived at this replica.
    sessions: Sessions<Hashed>,
    claims: moka::sync::Cache<Path, Claim>,
}

impl S3Store {
    /// A store over `store` under `prefix`, staging fills in `scratch`
    /// (created if needed; leftovers of a previous process are removed).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str, scratch: PathBuf) -> io::Result<S3Store> {
        let fills = scratch.join("fills");
        std::fs::create_dir_all(&fills)?;
        for entry in std::fs::read_dir(&fills)? {
            let _ = std::fs::remove_file(entry?.path());
        }
        Ok(S3Store {
            store,
            keys: Keys::new(prefix),
            scratch,
            sessions: Sessions::default(),
            claims: moka::sync::Cache::new(CLAIM_CACHE),
        })
    }

    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    fn blob_key(&self, d: &Digest) -> Path {
        blob_key(&self.keys, d)
    }

    fn upload_dir(&self, id: &UploadId) -> Path {
        self.keys.path(&format!("uploads/{}", id.as_str()))
    }

    fn session_state(&self, id: &UploadId) -> Arc<tokio::sync::Mutex<Hashed>> {
        self.sessions.get(id)
    }

    fn forget(&self, id: &UploadId) {
        self.sessions.forget(id);
    }

    /// Reads the session's objects: the chunks whose offsets are claimed,
    /// in order. `NotFound` without a session marker.
    async fn session(&self, id: &UploadId) -> Result<Session> {
        let dir = self.upload_dir(id);
        let objects: Vec<_> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(os_err)?;
        let mut marker = false;
        let mut claims = Vec::new();
        let mut chunks = HashMap::new();
        for o in objects {
            let Some(name) = o.location.filename() else {
                continue;
            };
            if name == "session" {
                marker = true;
            } else if name.starts_with('c') {
                chunks.insert(name.to_string(), o.size);
            } else if let Ok(offset) = name.parse::<u64>() {
                claims.push((offset, o.location.clone()));
            }
        }
        if !marker {
            return Err(StorageError::NotFound);
        }
        claims.sort_by_key(|(offset, _)| *offset);
        let paths: Vec<Path> = claims.iter().map(|(_, p)| p.clone()).collect();
        let records: Vec<Claim> = futures::stream::iter(paths)
            .map(|p| async move { self.claim(&p).await })
            .buffered(8)
            .try_collect()
            .await?;
        let mut parts = Vec::with_capacity(records.len());
        let mut size = 0;
        let mut digest = None;
        for ((offset, _), c) in claims.iter().zip(records) {
            if *offset != size {
                return Err(StorageError::Io(io::Error::other(format!(
                    "upload {id}: chunk at offset {offset} follows {size} bytes"
                ))));
            }
            if chunks.get(&c.chunk) != Some(&c.size) {
                return Err(StorageError::Io(io::Error::other(format!(
                    "upload {id}: the chunk at offset {offset} ({}, {} bytes) is missing",
                    c.chunk, c.size
                ))));
            }
            parts.push(Part {
                path: Path::from(format!("{dir}/{}", c.chunk)),
            });
            size += c.size;
            digest = c.digest;
        }
        Ok(Session {
            parts,
            digest,
            size,
        })
    }

    /// A chunk record (cached: it never changes while its session lasts).
    async fn claim(&self, path: &Path) -> Result<Claim> {
        if let Some(c) = self.claims.get(path) {
            return Ok(c);
        }
        let body = self
            .store
            .get(path)
            .await
            .map_err(os_err)?
            .bytes()
            .await
            .map_err(os_err)?;
        // A session of an older layout (its chunk bytes at this key) is one
        // this version cannot finish: unknown, so the client pushes again.
        let c: Claim = serde_json::from_slice(&body).map_err(|e| {
            tracing::warn!(%path, error = %e, "not a chunk record (an older wharf's session?)");
            StorageError::NotFound
        })?;
        self.claims.insert(path.clone(), c.clone());
        Ok(c)
    }

    /// Claims an offset of a session for a complete chunk object by a
    /// create-only write: `false` if another request's chunk holds it.
    async fn claim_offset(&self, path: &Path, claim: &Claim) -> Result<bool> {
        let body = serde_json::to_vec(claim).map_err(|e| StorageError::Io(io::Error::other(e)))?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(path, PutPayload::from(body), opts)
            .await
        {
            Ok(_) => {
                self.claims.insert(path.clone(), claim.clone());
                Ok(true)
            }
            // Ours if a retry of this very write found it there.
            Err(object_store::Error::AlreadyExists { .. }) => {
                Ok(self.claim(path).await?.chunk == claim.chunk)
            }
            Err(e) => Err(os_err(e)),
        }
    }

    /// Deletes every object under `dir`.
    async fn delete_all(&self, dir: &Path) -> Result<()> {
        let claims = self.claims.clone();
        let locations = self
            .store
            .list(Some(dir))
            .map_ok(move |m| {
                claims.invalidate(&m.location);
                m.location
            })
            .boxed();
        let mut deleted = self.store.delete_stream(locations);
        while let Some(r) = deleted.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(os_err(e)),
            }
        }
        Ok(())
    }

    /// Writes one chunk object from `body` at `path`, a key no other request
    /// writes: a single PUT when it fits in a part, a multipart upload
    /// otherwise; nothing is visible unless the whole body arrived with the
    /// expected length. Returns its length.
    async fn write_chunk(
        &self,
        path: &Path,
        mut body: ByteStream,
        expected_len: Option<u64>,
        hasher: &mut Option<Hasher>,
    ) -> Result<u64> {
        let mut received = 0u64;
        let check = |n: usize, received: &mut u64| -> Result<()> {
            *received += n as u64;
            match expected_len {
                Some(exp) if *received > exp => Err(StorageError::SizeMismatch {
                    expected: exp,
                    actual: *received,
                }),
                _ => Ok(()),
            }
        };
        // First part in memory: small chunks are one PUT.
        let mut first = BytesMut::new();
        let mut ended = true;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(StorageError::Body)?;
            check(chunk.len(), &mut received)?;
            first.extend_from_slice(&chunk);
            if first.len() >= PART_SIZE {
                ended = false;
                break;
            }
        }
        if ended {
            if let Some(exp) = expected_len
                && received != exp
            {
                return Err(StorageError::SizeMismatch {
                    expected: exp,
                    actual: received,
                });
            }
            if let Some(h) = hasher.as_mut() {
                h.update(&first);
            }
            self.store
                .put(path, PutPayload::from(first.freeze()))
                .await
                .map_err(os_err)?;
            return Ok(received);
        }
        let upload = self.store.put_multipart(path).await.map_err(os_err)?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        // Hash only what is known good; the hash state is restored by the
        // caller if anything fails.
        let mut local = hasher.clone();
        let result: Result<()> = async {
            if let Some(h) = local.as_mut() {
                h.update(&first);
            }
            w.put(first.freeze());
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(StorageError::Body)?;
                check(chunk.len(), &mut received)?;
                if let Some(h) = local.as_mut() {
                    h.update(&chunk);
                }
                w.wait_for_capacity(PART_CONCURRENCY)
                    .await
                    .map_err(os_err)?;
                w.put(chunk);
            }
            if let Some(exp) = expected_len
                && received != exp
            {
                return Err(StorageError::SizeMismatch {
                    expected: exp,
                    actual: received,
                });
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                w.finish().await.map_err(os_err)?;
                *hasher = local;
                Ok(received)
            }
            Err(e) => {
                let _ = w.abort().await;
                Err(e)
            }
        }
    }

    /// Streams every chunk of a session, in order, through a hasher into a
    /// multipart upload at the blob's final key, completed only if the
    /// content hashes to `expected`.
    async fn assemble(&self, s: &Session, expected: &Digest) -> Result<()> {
        let dest = self.blob_key(expected);
        let upload = self.store.put_multipart(&dest).await.map_err(os_err)?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut h = expected.algorithm().hasher();
        let result: Result<u64> = async {
            let mut total = 0u64;
            for p in &s.parts {
                let mut stream = self.store.get(&p.path).await.map_err(os_err)?.into_stream();
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(os_err)?;
                    total += chunk.len() as u64;
                    h.update(&chunk);
                    w.wait_for_capacity(PART_CONCURRENCY)
                        .await
                        .map_err(os_err)?;
                    w.put(chunk);
                }
            }
            Ok(total)
        }
        .await;
        let total = match result {
            Ok(t) => t,
            Err(e) => {
                let _ = w.abort().await;
                return Err(e);
            }
        };
        let computed = h.finish();
        if &computed != expected || total != s.size {
            let _ = w.abort().await;
            return Err(StorageError::DigestMismatch {
                expected: expected.clone(),
                computed,
            });
        }
        w.finish().await.map_err(os_err)?;
        Ok(())
    }

    /// Whether `digest` is stored with `size` bytes, so that verified bytes
    /// of that size need not be published again. A stored blob is proof of
    /// its content because every object under `blobs/` was verified before
    /// it was published (ARCHITECTURE.md, invariant 1); one of another size
    /// contradicts its digest and is replaced by the caller.
    async fn stored(&self, digest: &Digest, size: u64) -> Result<bool> {
        match self.stat(digest).await? {
            Some(s) if s == size => Ok(true),
            Some(s) => {
                tracing::warn!(%digest, stored = s, verified = size, "a stored blob has another size than its verified bytes: replacing it");
                Ok(false)
            }
            None => Ok(false),
        }
    }

    /// Uploads a verified local file to the blob's final key.
    async fn upload_file(&self, file: &std::path::Path, digest: &Digest) -> Result<()> {
        let dest = self.blob_key(digest);
        let upload = self.store.put_multipart(&dest).await.map_err(os_err)?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let result: Result<()> = async {
            let mut f = tokio::fs::File::open(file).await?;
            loop {
                let mut buf = BytesMut::zeroed(FILE_READ);
                let n = tokio::io::AsyncReadExt::read(&mut f, &mut buf).await?;
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                w.wait_for_capacity(PART_CONCURRENCY)
                    .await
                    .map_err(os_err)?;
                w.put(buf.freeze());
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                w.finish().await.map_err(os_err)?;
                Ok(())
            }
            Err(e) => {
                let _ = w.abort().await;
                Err(e)
            }
        }
    }
}

#[async_trait]
impl BlobStore for S3Store {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        match self.store.head(&self.blob_key(digest)).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(os_err(e)),
        }
    }

    async fn read(&self, digest: &Digest, range: Option<Range<u64>>) -> Result<ByteStream> {
        let key = self.blob_key(digest);
        if let Some(r) = &range {
            if r.start > r.end {
                return Err(StorageError::Io(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("range {r:?} is empty"),
                )));
            }
            if r.start == r.end {
                self.store.head(&key).await.map_err(os_err)?;
                return Ok(futures::stream::empty().boxed());
            }
        }
        let opts = GetOptions {
            range: range.clone().map(GetRange::Bounded),
            ..Default::default()
        };
        let got = self.store.get_opts(&key, opts).await.map_err(os_err)?;
        if let Some(r) = &range
            && &got.range != r
        {
            return Err(StorageError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("range {r:?} is outside the blob's {} bytes", got.meta.size),
            )));
        }
        Ok(got
            .into_stream()
            .map(|c| c.map_err(io::Error::other))
            .boxed())
    }

    async fn put(&self, digest: &Digest, bytes: Bytes) -> Result<()> {
        let computed = Digest::of(digest.algorithm(), &bytes);
        if &computed != digest {
            return Err(StorageError::DigestMismatch {
                expected: digest.clone(),
                computed,
            });
        }
        if self.stored(digest, bytes.len() as u64).await? {
            return Ok(());
        }
        // One PUT is atomic: the object appears whole or not at all.
        self.store
            .put(&self.blob_key(digest), PutPayload::from(bytes))
            .await
            .map_err(os_err)?;
        Ok(())
    }

    async fn delete(&self, digest: &Digest) -> Result<bool> {
        let key = self.blob_key(digest);
        match self.store.head(&key).await {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(os_err(e)),
        }
        match self.store.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(true),
            Err(e) => Err(os_err(e)),
        }
    }

    async fn list(&self) -> Result<Vec<Digest>> {
        let root = self.keys.path("blobs");
        let objects: Vec<_> = self
            .store
            .list(Some(&root))
            .try_collect()
            .await
            .map_err(os_err)?;
        let mut out: Vec<Digest> = objects
            .iter()
            .filter_map(|o| {
                let rel = self.keys.relative(&o.location)?;
                let mut parts = rel.split('/');
                let (_, algo, hex) = (parts.next()?, parts.next()?, parts.next()?);
                format!("{algo}:{hex}").parse().ok()
            })
            .collect();
        out.sort();
        Ok(out)
    }

    async fn quarantine(&self, digest: &Digest) -> Result<()> {
        let dest = self.keys.path(&format!(
            "quarantine/{}-{}",
            digest.algorithm().as_str(),
            digest.hex()
        ));
        let key = self.blob_key(digest);
        self.store.copy(&key, &dest).await.map_err(os_err)?;
        self.store.delete(&key).await.map_err(os_err)?;
        Ok(())
    }
}

#[async_trait]
impl UploadStore for S3Store {
    async fn create(&self, id: &UploadId) -> Result<()> {
        let marker = Path::from(format!("{}/session", self.upload_dir(id)));
        self.store
            .put(&marker, PutPayload::default())
            .await
            .map_err(os_err)?;
        *self.session_state(id).lock().await = Hashed::default();
        Ok(())
    }

    async fn size(&self, id: &UploadId) -> Result<u64> {
        Ok(self.session(id).await?.size)
    }

    async fn append(
        &self,
        id: &UploadId,
        offset: u64,
        expected_len: Option<u64>,
        body: ByteStream,
    ) -> Result<u64> {
        let state = self.session_state(id);
        let mut state = state.lock().await;
        let session = self.session(id).await?;
        let current = session.size;
        if current != offset {
            return Err(StorageError::OffsetMismatch {
                current,
                requested: offset,
            });
        }
        // The running hash is usable only if this replica wrote (and
        // hashed) every chunk object of the session so far; a session's
        // first chunk always qualifies.
        let mut chunks = session.chunks();
        let mut hasher = if current == 0 {
            Some(Algorithm::Sha256.hasher())
        } else if state.chunks == chunks {
            state.hasher.clone()
        } else {
            None
        };
        // The chunk goes to a key of its own; the offset is taken only once
        // the whole chunk is there, by a create-only record naming it. Two
        // requests at one offset (on two replicas) cannot replace each
        // other's bytes: one record wins, the other request is refused.
        let dir = self.upload_dir(id);
        let name = format!("c{current:020}-{}", UploadId::new_random());
        let chunk = Path::from(format!("{dir}/{name}"));
        let n = self
            .write_chunk(&chunk, body, expected_len, &mut hasher)
            .await?;
        let end = current + n;
        let claim = Claim {
            chunk: name,
            size: n,
            // Lets any replica commit without reading the chunks back.
            digest: hasher.as_ref().map(|h| h.clone().finish()),
        };
        let record = Path::from(format!("{dir}/{current:020}"));
        // On an error the outcome is unknown: the chunk object stays (the
        // end of the session removes it).
        if !self.claim_offset(&record, &claim).await? {
            if let Err(e) = self.store.delete(&chunk).await {
                tracing::warn!(upload = %id, error = %e, "could not remove a refused chunk");
            }
            return Err(StorageError::OffsetMismatch {
                current: self.session(id).await?.size,
                requested: offset,
            });
        }
        chunks.push(chunk);
        *state = Hashed { hasher, chunks };
        Ok(end)
    }

    async fn commit(&self, id: &UploadId, expected: &Digest) -> Result<u64> {
        let state = self.session_state(id);
        let state = state.lock().await;
        let session = self.session(id).await?;
        let size = session.size;
        // A digest known for these very chunk objects: this replica's
        // running hash over the objects it wrote, or the one recorded with
        // the last chunk's record.
        let known = if session.parts.is_empty() {
            // An empty blob, in any algorithm.
            Some(Digest::of(expected.algorithm(), b""))
        } else if expected.algorithm() == Algorithm::Sha256 {
            match &state.hasher {
                Some(h) if state.chunks == session.chunks() => Some(h.clone().finish()),
                _ => session.digest.clone(),
            }
        } else {
            None
        };
        drop(state);
        let outcome = match known {
            Some(d) if &d != expected => Err(StorageError::DigestMismatch {
                expected: expected.clone(),
                computed: d,
            }),
            Some(_) if self.stored(expected, size).await? => Ok(size),
            Some(_) if session.parts.is_empty() => self
                .store
                .put(&self.blob_key(expected), PutPayload::default())
                .await
                .map(|_| size)
                .map_err(os_err),
            // The single chunk object hashed to the digest as it was
            // written: publish it by a server-side copy (atomic; the bytes
            // stay in the store).
            Some(_) if session.parts.len() == 1 && size <= MAX_COPY => self
                .store
                .copy(&session.parts[0].path, &self.blob_key(expected))
                .await
                .map(|()| size)
                .map_err(os_err),
            _ => self.assemble(&session, expected).await.map(|()| size),
        };
        if let Err(e) = self.delete_all(&self.upload_dir(id)).await {
            tracing::warn!(upload = %id, error = %e, "could not remove the upload's chunks");
        }
        self.forget(id);
        outcome
    }

    async fn abort(&self, id: &UploadId) -> Result<()> {
        let state = self.session_state(id);
        let _guard = state.lock().await;
        self.delete_all(&self.upload_dir(id)).await?;
        self.forget(id);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<(UploadId, SystemTime)>> {
        let root = self.keys.path("uploads");
        let objects: Vec<_> = self
            .store
            .list(Some(&root))
            .try_collect()
            .await
            .map_err(os_err)?;
        let mut latest: HashMap<UploadId, SystemTime> = HashMap::new();
        for o in objects {
            let Some(rel) = self.keys.relative(&o.location) else {
                continue;
            };
            let Some(id) = rel
                .split('/')
                .nth(1)
                .and_then(|s| s.parse::<UploadId>().ok())
            else {
                continue;
            };
            let t = SystemTime::UNIX_EPOCH
                + Duration::from_millis(o.last_modified.timestamp_millis().max(0) as u64);
            let e = latest.entry(id).or_insert(t);
            *e = (*e).max(t);
        }
        Ok(latest.into_iter().collect())
    }
}

/// A fill staged in a local file, uploaded to the bucket on a verified
/// commit.
struct S3Fill {
    store: Arc<S3Store>,
    staging: StagingFile,
}

/// The fill side of [`S3Store`]; needs the store in an `Arc`.
pub struct S3Fills(pub Arc<S3Store>);

#[async_trait]
impl FillStore for S3Fills {
    async fn staging_space(&self) -> Result<Option<u64>> {
        crate::storage::free_space(&self.0.scratch.join("fills"))
    }

    async fn begin_fill(&self) -> Result<Box<dyn FillWriter>> {
        let path = self
            .0
            .scratch
            .join("fills")
            .join(format!(".fill-{}", UploadId::new_random()));
        Ok(Box::new(S3Fill {
            store: self.0.clone(),
            staging: StagingFile::create(path)?,
        }))
    }
}

#[async_trait]
impl FillWriter for S3Fill {
    async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.staging.write(data)
    }

    fn written(&self) -> u64 {
        self.staging.written()
    }

    fn staged(&self) -> Arc<dyn StagedReader> {
        self.staging.reader()
    }

    async fn verify(&self, expected: &Digest) -> Result<()> {
        self.staging.verify(expected).await
    }

    async fn commit(self: Box<Self>, expected: &Digest) -> Result<u64> {
        let size = self.staging.written();
        let outcome = match self.staging.verify(expected).await {
            Err(e) => Err(e),
            Ok(()) if self.store.stored(expected, size).await? => Ok(size),
            Ok(()) => self
                .store
                .upload_file(&self.staging.path, expected)
                .await
                .map(|()| size),
        };
        // Readers keep their open handle; the name can go.
        let _ = tokio::fs::remove_file(&self.staging.path).await;
        outcome
    }

    async fn abort(self: Box<Self>) {
        let _ = tokio::fs::remove_file(&self.staging.path).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::conformance;
    use object_store::memory::InMemory;

    /// The store over an in-memory bucket: the suites, and two replicas
    /// (two stores over one bucket) racing chunks at one offset.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_on_in_memory() {
        let bucket: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let (sa, sb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = Arc::new(S3Store::new(bucket.clone(), "p", sa.path().to_path_buf()).unwrap());
        let b = Arc::new(S3Store::new(bucket, "p", sb.path().to_path_buf()).unwrap());
        conformance::blob_store_suite(a.clone(), a.clone()).await;
        conformance::fill_store_suite(Arc::new(S3Fills(a.clone())), a.clone()).await;
        conformance::shared_upload_store_suite((a.clone(), a.clone()), (b.clone(), b)).await;
        let planted = a.object_store().clone();
        conformance::wrong_size_blob_suite(
            a.clone(),
            a.clone(),
            Arc::new(S3Fills(a)),
            |d, bytes| {
                let (bucket, key) = (planted.clone(), blob_key(&Keys::new("p"), &d));
                Box::pin(async move {
                    bucket.put(&key, PutPayload::from(bytes)).await.unwrap();
                })
            },
        )
        .await;
    }

    /// A session an older wharf started (its first chunk's bytes at
    /// `uploads/<id>/0`, where this version keeps a chunk record) is
    /// unknown to this version, not a storage failure: the client's next
    /// request answers 404 and it pushes again.
    #[tokio::test]
    async fn an_older_layouts_session_is_unknown() {
        let bucket: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let scratch = tempfile::tempdir().unwrap();
        let s = S3Store::new(bucket.clone(), "p", scratch.path().to_path_buf()).unwrap();
        let id = UploadId::new_random();
        s.create(&id).await.unwrap();
        let old_chunk = s.upload_dir(&id).clone().join("0");
        bucket
            .put(
                &old_chunk,
                PutPayload::from_static(b"chunk bytes of the old layout"),
            )
            .await
            .unwrap();
        assert!(matches!(s.size(&id).await, Err(StorageError::NotFound)));
        let body = futures::stream::once(async { Ok(Bytes::from_static(b"more")) }).boxed();
        assert!(matches!(
            s.append(&id, 29, None, body).await,
            Err(StorageError::NotFound | StorageError::OffsetMismatch { .. })
        ));
    }
}
