//! File-backed byte windows. A published blob is served as `Bytes` whose
//! memory is a read-only mapping of the blob's file. Each live window is
//! registered by address, so a writer that owns a plain TCP socket can send
//! the same bytes with `sendfile(2)` (page cache to socket, by reference)
//! instead of copying them through the mapping with `write(2)`: see
//! `api::sendfile`. Any other writer (TLS, HTTP/2 framing) reads the
//! mapping like ordinary memory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Live windows by start address: `(len, file, file offset)`.
type Registry = BTreeMap<usize, (usize, Arc<File>, u64)>;

static WINDOWS: Mutex<Registry> = Mutex::new(BTreeMap::new());

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    WINDOWS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A mapped window of a published blob; unregistered, then unmapped, on drop.
struct Window {
    map: memmap2::Mmap,
}

impl AsRef<[u8]> for Window {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // Unregistered before `map` is unmapped, so the address range is
        // never looked up once it can be reused.
        registry().remove(&(self.map.as_ptr() as usize));
    }
}

/// `len` bytes of `file` at `offset` (a published blob, or written bytes of
/// a fill's staging file), as a mapped, registered window.
pub fn map(file: &Arc<File>, offset: u64, len: usize) -> io::Result<Bytes> {
    let map = map_window(file, offset, len)?;
    if len > 0 {
        registry().insert(map.as_ptr() as usize, (len, file.clone(), offset));
    }
    Ok(Bytes::from_owner(Window { map }))
}

/// Tells the kernel `len` bytes at `offset` will be read soon.
pub fn will_need(file: &File, offset: u64, len: usize) {
    if let Ok(m) = map_window(file, offset, len) {
        let _ = m.advise(memmap2::Advice::WillNeed);
    }
}

/// The file and file offset behind `bytes`, if they lie wholly inside one
/// live window.
pub fn lookup(bytes: &[u8]) -> Option<(Arc<File>, u64)> {
    if bytes.is_empty() {
        return None;
    }
    let at = bytes.as_ptr() as usize;
    let reg = registry();
    let (&start, (len, file, offset)) = reg.range(..=at).next_back()?;
    (at + bytes.len() <= start + len).then(|| (file.clone(), offset + (at - start) as u64))
}

/// Maps `len` bytes of `file` at `offset` (any offset: the mapping is
/// page-aligned internally).
#[allow(unsafe_code)]
fn map_window(file: &File, offset: u64, len: usize) -> io::Result<memmap2::Mmap> {
    // SAFETY: a mapping is undefined behaviour only if the mapped bytes
    // change under it. Callers map either published blobs
    // (content-addressed, written once through a staging file and renamed
    // into place, never opened for writing, truncated or rewritten
    // afterwards) or bytes of a fill's staging file below its current
    // size (the fill only appends: written bytes are never rewritten, and
    // the file is never truncated). Deletion (eviction, quarantine, an
    // aborted fill) unlinks the name; the mapping keeps the inode.
    unsafe {
        memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            .map(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn windows_are_found_by_address_and_forgotten_on_drop() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let f = Arc::new(f);
        let w = map(&f, 5000, 8000).unwrap();
        assert_eq!(&w[..], &data[5000..13000]);
        let (_, off) = lookup(&w).expect("whole window");
        assert_eq!(off, 5000);
        let (_, off) = lookup(&w[100..200]).expect("inside");
        assert_eq!(off, 5100);
        let sub = w.slice(7000..);
        assert_eq!(lookup(&sub).unwrap().1, 12000);
        let other = vec![0u8; 10];
        assert!(lookup(&other).is_none(), "heap memory is not a window");
        let addr = w.as_ptr() as usize;
        drop((w, sub));
        assert!(!registry().contains_key(&addr));
    }
}
