//! The filesystem blob and upload store.
//!
//! Layout under the root:
//! - `blobs/<algorithm>/<hex[0..2]>/<hex>`: published, verified blobs;
//! - `uploads/<id>/data`: staged bytes of an upload session (same filesystem,
//!   so publishing is a `rename`);
//! - `quarantine/<algorithm>-<hex>`: blobs fsck found corrupt.
//!
//! Every publish is: write, `fsync` the file, verify, `rename`, `fsync` the
//! directory.

use std::collections::HashMap;
use std::io::{self, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use super::{
    BlobStore, ByteStream, FillStore, FillWriter, Result, StagedReader, StorageError, UploadStore,
};
use crate::oci::{Algorithm, Digest, Hasher, UploadId};

/// Size of the mapped windows a published blob is served from.
const MAP_WINDOW: u64 = 1024 * 1024;
/// Staged uploads are written in pieces of up to this size.
const WRITE_BUF: usize = 1024 * 1024;
/// The write buffer's first allocation (it doubles from there).
const WRITE_BUF_MIN: usize = 16 * 1024;

/// Coalesces an upload's body chunks into writes of up to `limit` bytes.
/// Unlike a `BufWriter`, it allocates as bytes arrive (doubling, never
/// past `limit`), so an upload whose client stalls holds only what it was
/// sent; chunks of `limit` bytes or more are written as they are.
struct ChunkBuffer {
    buf: Vec<u8>,
    limit: usize,
}

impl ChunkBuffer {
    fn new(limit: usize) -> Self {
        ChunkBuffer {
            buf: Vec::new(),
            limit,
        }
    }

    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Adds `chunk`, writing to `out` what no longer fits.
    async fn write<W: tokio::io::AsyncWrite + Unpin>(
        &mut self,
        out: &mut W,
        chunk: &[u8],
    ) -> io::Result<()> {
        if self.buf.len() + chunk.len() > self.limit {
            self.flush(out).await?;
        }
        if chunk.len() >= self.limit {
            return out.write_all(chunk).await;
        }
        let needed = self.buf.len() + chunk.len();
        if needed > self.buf.capacity() {
            let grown = (self.buf.capacity() * 2)
                .max(needed)
                .max(WRITE_BUF_MIN)
                .min(self.limit);
            self.buf.reserve_exact(grown - self.buf.len());
        }
        self.buf.extend_from_slice(chunk);
        Ok(())
    }

    /// Writes out what is buffered.
    async fn flush<W: tokio::io::AsyncWrite + Unpin>(&mut self, out: &mut W) -> io::Result<()> {
        if !self.buf.is_empty() {
            out.write_all(&self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }
}

/// In-memory hash state of an upload in this process, valid while `hashed`
/// equals the staged size. After a restart it is absent and commit reads the
/// staged bytes again (shared with the S3 backend).
#[derive(Clone, Default)]
pub(crate) struct HashState {
    pub(crate) hasher: Option<Hasher>,
    pub(crate) hashed: u64,
}

/// The hash state of the upload sessions this process has seen, each
/// behind its own lock (which also orders a session's appends and commit).
///
/// Bounded: a session committed or aborted by another replica is never
/// forgotten here by `forget`, so past [`MAX_SESSIONS`] entries the least
/// recently used that no request holds are dropped. A dropped state only
/// costs a re-hash at commit (as after a restart); an entry a request holds
/// is never dropped, so its lock keeps ordering that session.
pub(crate) struct Sessions<T = HashState>(Mutex<HashMap<UploadId, SessionEntry<T>>>);

struct SessionEntry<T> {
    state: Arc<tokio::sync::Mutex<T>>,
    used: tokio::time::Instant,
}

/// Hash states kept before unused ones are dropped.
pub(crate) const MAX_SESSIONS: usize = 4096;

impl<T> Default for Sessions<T> {
    fn default() -> Self {
        Sessions(Mutex::default())
    }
}

impl<T: Default> Sessions<T> {
    pub(crate) fn get(&self, id: &UploadId) -> Arc<tokio::sync::Mutex<T>> {
        let mut map = self.0.lock().expect("sessions lock");
        let now = tokio::time::Instant::now();
        if map.len() >= MAX_SESSIONS && !map.contains_key(id) {
            // Drop the older half of the entries nobody holds.
            let mut idle: Vec<(tokio::time::Instant, UploadId)> = map
                .iter()
                .filter(|(_, e)| Arc::strong_count(&e.state) == 1)
                .map(|(k, e)| (e.used, k.clone()))
                .collect();
            idle.sort_unstable_by_key(|(used, _)| *used);
            let drop = idle.len().div_ceil(2);
            for (_, k) in idle.into_iter().take(drop) {
                map.remove(&k);
            }
        }
        let e = map.entry(id.clone()).or_insert_with(|| SessionEntry {
            state: Arc::default(),
            used: now,
        });
        e.used = now;
        e.state.clone()
    }

    pub(crate) fn forget(&self, id: &UploadId) {
        self.0.lock().expect("sessions lock").remove(id);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().expect("sessions lock").len()
    }
}

pub struct FsStore {
    root: PathBuf,
    sessions: Sessions,
}

fn not_found_is(e: io::Error) -> StorageError {
    if e.kind() == io::ErrorKind::NotFound {
        StorageError::NotFound
    } else {
        StorageError::Io(e)
    }
}

async fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
        .await
        .map_err(io::Error::other)?
}

/// Hashes a file from disk with `algorithm`.
async fn hash_file(path: &Path, algorithm: Algorithm) -> io::Result<(Digest, u64)> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&path)?;
        let mut h = algorithm.hasher();
        let mut buf = vec![0u8; 1024 * 1024];
        let mut total = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            total += n as u64;
        }
        Ok((h.finish(), total))
    })
    .await
    .map_err(io::Error::other)?
}

impl FsStore {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<FsStore> {
        let root = root.into();
        for d in ["blobs", "uploads", "quarantine"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        // Staging files of fills and puts that a previous process never
        // finished: nothing refers to them.
        for entry in std::fs::read_dir(root.join("uploads"))? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".fill-") || name.starts_with(".put-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(FsStore {
            root,
            sessions: Sessions::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        blob_path(&self.root, d)
    }

    fn upload_dir(&self, id: &UploadId) -> PathBuf {
        self.root.join("uploads").join(id.as_str())
    }

    fn session(&self, id: &UploadId) -> Arc<tokio::sync::Mutex<HashState>> {
        self.sessions.get(id)
    }

    fn forget(&self, id: &UploadId) {
        self.sessions.forget(id);
    }

    /// Moves a fully written, fsynced staging file into place as `digest`.
    async fn publish(&self, staged: &Path, digest: &Digest) -> Result<()> {
        publish(&self.root, staged, digest).await
    }
}

fn blob_path(root: &Path, d: &Digest) -> PathBuf {
    let hex = d.hex();
    root.join("blobs")
        .join(d.algorithm().as_str())
        .join(&hex[..2])
        .join(hex)
}

/// Whether `digest` is stored at `dest` with `size` bytes, so that verified
/// bytes of that size need not be published again. A stored blob is proof
/// of its content because every file under `blobs/` was verified before it
/// was published (ARCHITECTURE.md, invariant 1); one of another size
/// contradicts its digest and is replaced by the caller (a rename over it).
async fn stored(dest: &Path, digest: &Digest, size: u64) -> Result<bool> {
    match tokio::fs::metadata(dest).await {
        Ok(m) if m.len() == size => Ok(true),
        Ok(m) => {
            tracing::warn!(%digest, stored = m.len(), verified = size, "a stored blob has another size than its verified bytes: replacing it");
            Ok(false)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}

async fn publish(root: &Path, staged: &Path, digest: &Digest) -> Result<()> {
    let dest = blob_path(root, digest);
    let parent = dest.parent().expect("blob path has a parent").to_path_buf();
    let size = tokio::fs::metadata(staged).await?.len();
    if stored(&dest, digest, size).await? {
        // Content-addressed: the stored copy is identical.
        tokio::fs::remove_file(staged).await?;
        return Ok(());
    }
    tokio::fs::create_dir_all(&parent).await?;
    tokio::fs::rename(staged, &dest).await?;
    sync_dir(&parent).await?;
    Ok(())
}

#[async_trait]
impl BlobStore for FsStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        match tokio::fs::metadata(self.blob_path(digest)).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn read(&self, digest: &Digest, range: Option<Range<u64>>) -> Result<ByteStream> {
        let file = tokio::fs::File::open(self.blob_path(digest))
            .await
            .map_err(not_found_is)?
            .into_std()
            .await;
        let size = file.metadata()?.len();
        let range = range.unwrap_or(0..size);
        if range.end > size || range.start > range.end {
            return Err(StorageError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("range {range:?} is outside the blob's {size} bytes"),
            )));
        }
        Ok(mapped_stream(Arc::new(file), range))
    }

    async fn put(&self, digest: &Digest, bytes: Bytes) -> Result<()> {
        let computed = Digest::of(digest.algorithm(), &bytes);
        if &computed != digest {
            return Err(StorageError::DigestMismatch {
                expected: digest.clone(),
                computed,
            });
        }
        if stored(&self.blob_path(digest), digest, bytes.len() as u64).await? {
            return Ok(());
        }
        let staged = self
            .root
            .join("uploads")
            .join(format!(".put-{}", UploadId::new_random()));
        let mut f = tokio::fs::File::create(&staged).await?;
        let written = async {
            f.write_all(&bytes).await?;
            f.sync_all().await
        }
        .await;
        drop(f);
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&staged).await;
            return Err(e.into());
        }
        self.publish(&staged, digest).await
    }

    async fn delete(&self, digest: &Digest) -> Result<bool> {
        match tokio::fs::remove_file(self.blob_path(digest)).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn list(&self) -> Result<Vec<Digest>> {
        let root = self.root.join("blobs");
        let found = tokio::task::spawn_blocking(move || -> io::Result<Vec<Digest>> {
            let mut out = Vec::new();
            for algo in std::fs::read_dir(&root)? {
                let algo = algo?;
                let algo_name = algo.file_name().to_string_lossy().into_owned();
                for prefix in std::fs::read_dir(algo.path())? {
                    for blob in std::fs::read_dir(prefix?.path())? {
                        let name = blob?.file_name().to_string_lossy().into_owned();
                        if let Ok(d) = format!("{algo_name}:{name}").parse() {
                            out.push(d);
                        }
                    }
                }
            }
            out.sort();
            Ok(out)
        })
        .await
        .map_err(io::Error::other)??;
        Ok(found)
    }

    async fn quarantine(&self, digest: &Digest) -> Result<()> {
        let dest = self.root.join("quarantine").join(format!(
            "{}-{}",
            digest.algorithm().as_str(),
            digest.hex()
        ));
        tokio::fs::rename(self.blob_path(digest), &dest)
            .await
            .map_err(not_found_is)?;
        sync_dir(&self.root.join("quarantine")).await?;
        Ok(())
    }
}

#[async_trait]
impl UploadStore for FsStore {
    async fn create(&self, id: &UploadId) -> Result<()> {
        let dir = self.upload_dir(id);
        tokio::fs::create_dir_all(&dir).await?;
        let f = tokio::fs::File::create(dir.join("data")).await?;
        f.sync_all().await?;
        sync_dir(&dir).await?;
        sync_dir(&self.root.join("uploads")).await?;
        *self.session(id).lock().await = HashState {
            hasher: Some(Algorithm::Sha256.hasher()),
            hashed: 0,
        };
        Ok(())
    }

    async fn size(&self, id: &UploadId) -> Result<u64> {
        let m = tokio::fs::metadata(self.upload_dir(id).join("data"))
            .await
            .map_err(not_found_is)?;
        Ok(m.len())
    }

    async fn append(
        &self,
        id: &UploadId,
        offset: u64,
        expected_len: Option<u64>,
        mut body: ByteStream,
    ) -> Result<u64> {
        let session = self.session(id);
        let mut state = session.lock().await;
        let path = self.upload_dir(id).join("data");
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .await
            .map_err(not_found_is)?;
        let current = file.metadata().await?.len();
        if current != offset {
            return Err(StorageError::OffsetMismatch {
                current,
                requested: offset,
            });
        }
        // The running hash is advanced on a copy and stored only when the
        // chunk is complete: a request dropped mid-body (its connection
        // gone) must not leave bytes in the session's hash that never
        // reached the file.
        let mut hasher = if state.hashed == current {
            state.hasher.clone()
        } else {
            None
        };
        let mut out = file;
        out.seek(io::SeekFrom::Start(current)).await?;
        let mut buf = ChunkBuffer::new(WRITE_BUF);
        let mut received = 0u64;
        let result: Result<()> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(StorageError::Body)?;
                received += chunk.len() as u64;
                if let Some(exp) = expected_len
                    && received > exp
                {
                    return Err(StorageError::SizeMismatch {
                        expected: exp,
                        actual: received,
                    });
                }
                if let Some(h) = hasher.as_mut() {
                    h.update(&chunk);
                }
                buf.write(&mut out, &chunk).await?;
            }
            if let Some(exp) = expected_len
                && received != exp
            {
                return Err(StorageError::SizeMismatch {
                    expected: exp,
                    actual: received,
                });
            }
            buf.flush(&mut out).await?;
            out.flush().await?;
            out.sync_data().await?;
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                state.hasher = hasher;
                state.hashed = current + received;
                Ok(current + received)
            }
            Err(e) => {
                // All-or-nothing: cut the file back (the hash state was
                // never touched; what is still buffered is dropped).
                let _ = out.flush().await;
                out.set_len(current).await?;
                out.sync_data().await?;
                Err(e)
            }
        }
    }

    async fn commit(&self, id: &UploadId, expected: &Digest) -> Result<u64> {
        let session = self.session(id);
        let state = session.lock().await;
        let dir = self.upload_dir(id);
        let path = dir.join("data");
        let size = tokio::fs::metadata(&path)
            .await
            .map_err(not_found_is)?
            .len();
        let computed = match &state.hasher {
            Some(h) if state.hashed == size && expected.algorithm() == h.algorithm() => {
                h.clone().finish()
            }
            _ => hash_file(&path, expected.algorithm()).await?.0,
        };
        drop(state);
        let outcome = if &computed == expected {
            self.publish(&path, expected).await.map(|()| size)
        } else {
            Err(StorageError::DigestMismatch {
                expected: expected.clone(),
                computed,
            })
        };
        let _ = tokio::fs::remove_dir_all(&dir).await;
        self.forget(id);
        outcome
    }

    async fn abort(&self, id: &UploadId) -> Result<()> {
        let session = self.session(id);
        let _guard = session.lock().await;
        match tokio::fs::remove_dir_all(self.upload_dir(id)).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        self.forget(id);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<(UploadId, SystemTime)>> {
        let dir = self.root.join("uploads");
        let found =
            tokio::task::spawn_blocking(move || -> io::Result<Vec<(UploadId, SystemTime)>> {
                let mut out = Vec::new();
                for entry in std::fs::read_dir(&dir)? {
                    let entry = entry?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let Ok(id) = name.parse::<UploadId>() else {
                        continue;
                    };
                    let modified = std::fs::metadata(entry.path().join("data"))
                        .or_else(|_| entry.metadata())?
                        .modified()?;
                    out.push((id, modified));
                }
                Ok(out)
            })
            .await
            .map_err(io::Error::other)??;
        Ok(found)
    }
}

struct FsFill {
    root: PathBuf,
    staging: StagingFile,
}

/// The local staging file of a fill (shared with the S3 backend, whose
/// fills stage locally too): written in order and hashed as written,
/// readable by offset while it grows.
pub(crate) struct StagingFile {
    pub(crate) path: PathBuf,
    file: std::fs::File,
    reader: Arc<FsStaged>,
    hasher: Hasher,
    written: u64,
    /// The digest the bytes were last verified against, and how many
    /// bytes that was: a fill verifies before it commits, and a digest of
    /// another algorithm than the running hash costs a read of the file.
    verified: std::sync::Mutex<Option<(Digest, u64)>>,
}

impl StagingFile {
    pub(crate) fn create(path: PathBuf) -> Result<StagingFile> {
        let file = std::fs::File::create(&path)?;
        let reader = std::fs::File::open(&path)?;
        Ok(StagingFile {
            path,
            file,
            reader: Arc::new(FsStaged {
                file: Arc::new(reader),
            }),
            hasher: Algorithm::Sha256.hasher(),
            written: 0,
            verified: std::sync::Mutex::new(None),
        })
    }

    /// Appends and hashes `data`; readers see it when this returns. The
    /// write goes to the page cache from the calling thread: a memory copy,
    /// cheaper than a hop to the blocking pool for every upstream frame.
    pub(crate) fn write(&mut self, data: &[u8]) -> Result<()> {
        use std::io::Write as _;
        self.file.write_all(data)?;
        self.hasher.update(data);
        self.written += data.len() as u64;
        Ok(())
    }

    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    pub(crate) fn reader(&self) -> Arc<FsStaged> {
        self.reader.clone()
    }

    /// Fails with `DigestMismatch` unless the bytes written hash to
    /// `expected`.
    pub(crate) async fn verify(&self, expected: &Digest) -> Result<()> {
        let done = (expected.clone(), self.written);
        if self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            == Some(&done)
        {
            return Ok(());
        }
        let computed = if expected.algorithm() == self.hasher.algorithm() {
            self.hasher.clone().finish()
        } else {
            hash_file(&self.path, expected.algorithm()).await?.0
        };
        if &computed != expected {
            return Err(StorageError::DigestMismatch {
                expected: expected.clone(),
                computed,
            });
        }
        *self.verified.lock().unwrap_or_else(|e| e.into_inner()) = Some(done);
        Ok(())
    }

    /// Makes the written bytes durable.
    pub(crate) async fn sync(&self) -> Result<()> {
        let file = self.file.try_clone()?;
        tokio::task::spawn_blocking(move || file.sync_all())
            .await
            .map_err(io::Error::other)??;
        Ok(())
    }
}

/// Reads a local staging file by offset.
pub(crate) struct FsStaged {
    file: Arc<std::fs::File>,
}

#[async_trait]
impl FillStore for FsStore {
    async fn staging_space(&self) -> Result<Option<u64>> {
        super::free_space(&self.root.join("uploads"))
    }

    async fn begin_fill(&self) -> Result<Box<dyn FillWriter>> {
        let path = self
            .root
            .join("uploads")
            .join(format!(".fill-{}", UploadId::new_random()));
        Ok(Box::new(FsFill {
            root: self.root.clone(),
            staging: StagingFile::create(path)?,
        }))
    }
}

#[async_trait]
impl FillWriter for FsFill {
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
        if let Err(e) = self.staging.verify(expected).await {
            let _ = tokio::fs::remove_file(&self.staging.path).await;
            return Err(e);
        }
        self.staging.sync().await?;
        publish(&self.root, &self.staging.path, expected).await?;
        Ok(self.staging.written())
    }

    async fn abort(self: Box<Self>) {
        let _ = tokio::fs::remove_file(&self.staging.path).await;
    }
}

#[async_trait]
impl StagedReader for FsStaged {
    /// A mapped window of the staging file (see [`super::window`]): no copy
    /// into a buffer, and over plain TCP the waiters' bytes go out by
    /// `sendfile` like a published blob's.
    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let size = self.file.metadata()?.len();
        let len = size.saturating_sub(offset).min(len as u64) as usize;
        Ok(super::window::map(&self.file, offset, len)?)
    }
}

/// Serves `range` of a published blob as mapped windows of [`MAP_WINDOW`]
/// bytes (see [`super::window`]): over plain TCP the bytes go from the page
/// cache to the socket by `sendfile`; otherwise with one copy (in the
/// kernel's socket write) instead of a read into a buffer first. Each window
/// is unmapped when hyper drops its chunk, so at most the windows in flight
/// are mapped. The next window is announced to the kernel (`WillNeed`) so
/// readahead runs ahead of the socket.
fn mapped_stream(file: Arc<std::fs::File>, range: Range<u64>) -> ByteStream {
    futures::stream::unfold(
        (file, range.start, range.end),
        |(file, pos, end)| async move {
            if pos >= end {
                return None;
            }
            let len = (end - pos).min(MAP_WINDOW) as usize;
            let window = super::window::map(&file, pos, len);
            let next_pos = pos + len as u64;
            if window.is_ok() && next_pos < end {
                let next = (end - next_pos).min(MAP_WINDOW) as usize;
                super::window::will_need(&file, next_pos, next);
            }
            Some((window, (file, next_pos, end)))
        },
    )
    .boxed()
}

#[cfg(test)]
mod tests {
    /// Hash states of sessions finished elsewhere (another replica) are
    /// never forgotten by `forget`; the table stays bounded, and a state a
    /// request holds is never dropped.
    #[tokio::test]
    async fn session_states_are_bounded_and_held_ones_kept() {
        let sessions: Sessions = Sessions::default();
        let held_id = UploadId::new_random();
        let held = sessions.get(&held_id);
        for _ in 0..3 * MAX_SESSIONS {
            drop(sessions.get(&UploadId::new_random()));
        }
        assert!(
            sessions.len() <= MAX_SESSIONS,
            "{} states kept",
            sessions.len()
        );
        assert!(
            Arc::ptr_eq(&held, &sessions.get(&held_id)),
            "a held state is the one the next request gets"
        );
    }

    use super::*;

    /// Records the size of every write it receives.
    #[derive(Default)]
    struct Writes(Vec<usize>, Vec<u8>);

    impl tokio::io::AsyncWrite for Writes {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.0.push(buf.len());
            this.1.extend_from_slice(buf);
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn write_buffer_grows_with_the_bytes_received_and_writes_in_large_pieces() {
        let mut out = Writes::default();
        let mut buf = ChunkBuffer::new(WRITE_BUF);
        // Nothing is allocated before the first byte, and a stalled upload
        // holds about what it was sent, not the whole write size.
        assert_eq!(buf.capacity(), 0);
        buf.write(&mut out, &[1u8; 100]).await.unwrap();
        assert!(buf.capacity() <= WRITE_BUF_MIN, "{}", buf.capacity());
        buf.write(&mut out, &[2u8; 40_000]).await.unwrap();
        assert!(
            buf.capacity() < 4 * 40_100,
            "40 KB received, {} bytes held",
            buf.capacity()
        );
        assert!(out.0.is_empty(), "written before the buffer filled");
        // Many small chunks still go out as writes of the full size, and
        // the buffer never grows past it.
        let mut sent: Vec<u8> = vec![1u8; 100];
        sent.extend_from_slice(&[2u8; 40_000]);
        for i in 0..1000u32 {
            let chunk = vec![(i % 251) as u8; 3_000 + (i as usize % 7)];
            buf.write(&mut out, &chunk).await.unwrap();
            sent.extend_from_slice(&chunk);
            assert!(buf.capacity() <= WRITE_BUF);
        }
        // A chunk larger than the write size is written as it is.
        let big = vec![9u8; WRITE_BUF + 1];
        buf.write(&mut out, &big).await.unwrap();
        sent.extend_from_slice(&big);
        buf.flush(&mut out).await.unwrap();
        assert_eq!(out.1, sent, "bytes written in order, none lost");
        let (last, full) = out.0.split_last().unwrap();
        assert_eq!(*last, WRITE_BUF + 1);
        // Every write but the one before the big chunk is at least nearly
        // the full size.
        let small = full.iter().filter(|&&n| n < WRITE_BUF - 4096).count();
        assert!(small <= 1, "write sizes: {full:?}");
    }

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FsStore::open(dir.path()).unwrap());
        crate::storage::conformance::blob_store_suite(store.clone(), store.clone()).await;
        crate::storage::conformance::fill_store_suite(store.clone(), store.clone()).await;
        let root = dir.path().to_path_buf();
        crate::storage::conformance::wrong_size_blob_suite(
            store.clone(),
            store.clone(),
            store,
            |d, bytes| {
                let path = blob_path(&root, &d);
                Box::pin(async move {
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    std::fs::write(path, bytes).unwrap();
                })
            },
        )
        .await;
    }

    #[tokio::test]
    async fn upload_resumes_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let id = UploadId::new_random();
        let data = b"hello, resumable world".to_vec();
        {
            let s = FsStore::open(dir.path()).unwrap();
            UploadStore::create(&s, &id).await.unwrap();
            let chunk = Bytes::copy_from_slice(&data[..5]);
            s.append(&id, 0, Some(5), futures::stream::iter([Ok(chunk)]).boxed())
                .await
                .unwrap();
        }
        // A new process: no in-memory hash state.
        let s = FsStore::open(dir.path()).unwrap();
        assert_eq!(s.size(&id).await.unwrap(), 5);
        let chunk = Bytes::copy_from_slice(&data[5..]);
        s.append(&id, 5, None, futures::stream::iter([Ok(chunk)]).boxed())
            .await
            .unwrap();
        let d = Digest::sha256_of(&data);
        assert_eq!(s.commit(&id, &d).await.unwrap(), data.len() as u64);
        assert_eq!(s.stat(&d).await.unwrap(), Some(data.len() as u64));
    }
}
