//! A plain TCP connection that sends file-backed body chunks with
//! `sendfile(2)`. hyper hands the response body's `Bytes` to the writer
//! unchanged (vectored writes queue them rather than copy them); when a
//! chunk is a live window of a published blob
//! ([`crate::storage::window`]), the kernel sends the file's pages by
//! reference instead of copying the mapped memory into the socket. The
//! bytes are the same either way: the window maps exactly those file bytes,
//! and published blobs never change.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::storage::window;

/// Slices shorter than this are written as memory, without looking them
/// up: headers and manifests never pay for the window registry's lock, and
/// a short tail of a window is copied as cheaply as it is sent.
const SENDFILE_MIN: usize = 16 * 1024;

/// The file and offset behind `buf` when it is worth a `sendfile`.
fn file_backed(buf: &[u8]) -> Option<(std::sync::Arc<std::fs::File>, u64)> {
    if buf.len() < SENDFILE_MIN {
        return None;
    }
    window::lookup(buf)
}

pub struct SendfileStream {
    tcp: TcpStream,
}

impl SendfileStream {
    pub fn new(tcp: TcpStream) -> Self {
        SendfileStream { tcp }
    }

    /// Sends `buf`, a slice of a window of `file` at `offset`, from the file.
    fn poll_sendfile(
        &self,
        cx: &mut Context<'_>,
        file: &std::fs::File,
        mut offset: u64,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            let sent = self.tcp.try_io(Interest::WRITABLE, || {
                rustix::fs::sendfile(&self.tcp, file, Some(&mut offset), len)
                    .map_err(io::Error::from)
            });
            match sent {
                // The file is shorter than its window: never for a published
                // blob, but never loop on it either.
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncRead for SendfileStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendfileStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match file_backed(buf) {
            Some((file, offset)) => self.poll_sendfile(cx, &file, offset, buf.len()),
            None => Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf),
        }
    }

    /// Writes the leading slices that are ordinary memory in one vectored
    /// write, or, when the first slice is a file window, sends that slice
    /// from the file. Either way a prefix of `bufs` is written, as the
    /// contract asks.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let Some(first) = bufs.iter().position(|b| !b.is_empty()) else {
            return Poll::Ready(Ok(0));
        };
        if let Some((file, offset)) = file_backed(&bufs[first]) {
            return self.poll_sendfile(cx, &file, offset, bufs[first].len());
        }
        let plain = bufs[first..]
            .iter()
            .position(|b| file_backed(b).is_some())
            .map_or(bufs.len(), |i| first + i);
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, &bufs[first..plain])
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Mixed writes (headers from the heap, chunks from file windows, a
    /// window slice that starts mid-window) arrive byte for byte in order.
    #[tokio::test]
    async fn file_windows_and_heap_bytes_arrive_in_order() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
        f.write_all(&data).unwrap();
        let f = Arc::new(f);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut w = SendfileStream::new(TcpStream::connect(addr).await.unwrap());
        let a = window::map(&f, 0, 1_000_000).unwrap();
        let b = window::map(&f, 1_000_000, 2_000_000)
            .unwrap()
            .slice(500_000..);
        let mut expected = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        expected.extend_from_slice(&data[..1_000_000]);
        expected.extend_from_slice(b"--");
        expected.extend_from_slice(&data[1_500_000..3_000_000]);
        let mut parts: Vec<&[u8]> = vec![b"HTTP/1.1 200 OK\r\n\r\n", &a, b"--", &b];
        while !parts.is_empty() {
            let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
            let mut n = w.write_vectored(&slices).await.unwrap();
            assert!(n > 0);
            while n > 0 {
                if n >= parts[0].len() {
                    n -= parts[0].len();
                    parts.remove(0);
                } else {
                    parts[0] = &parts[0][n..];
                    n = 0;
                }
            }
        }
        w.shutdown().await.unwrap();
        drop(w);
        let got = reader.await.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes differ");
    }
}
