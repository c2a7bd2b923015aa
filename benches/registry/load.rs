//! A closed-loop HTTP/1.1 load generator for small responses (manifests):
//! N keep-alive connections, each with one request in flight, for a fixed
//! time, every latency recorded. It does what `wrk --latency` does, and also
//! handles HEAD (wrk 4.1 waits for a HEAD response's body and stalls).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http::parse_head;

#[derive(Debug, Clone)]
pub struct LoadResult {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Completed requests with a 2xx answer.
    pub ok: u64,
    /// Non-2xx answers and broken connections.
    pub errors: u64,
    pub first_error: Option<String>,
}

#[derive(Default)]
struct ConnStats {
    latencies_us: Vec<u32>,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
}

impl ConnStats {
    fn error(&mut self, e: String) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }
}

/// Runs the load for `duration` on `threads` client threads (1 behaves like
/// `wrk -t1`).
pub fn run(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    connections: usize,
    duration: Duration,
    threads: usize,
) -> anyhow::Result<LoadResult> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let req: &'static [u8] = Box::leak(req.into_bytes().into_boxed_slice());
    let head_only = method == "HEAD";

    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    let (stats, elapsed) = rt.block_on(async move {
        let started = Instant::now();
        let deadline = started + duration;
        let tasks: Vec<_> = (0..connections)
            .map(|_| tokio::spawn(connection(addr, req, head_only, deadline)))
            .collect();
        let mut all = Vec::with_capacity(connections);
        for t in tasks {
            all.push(t.await.unwrap_or_default());
        }
        (all, started.elapsed())
    });
    let mut lat: Vec<u32> = Vec::new();
    let (mut ok, mut errors, mut first_error) = (0, 0, None);
    for s in stats {
        lat.extend_from_slice(&s.latencies_us);
        ok += s.ok;
        errors += s.errors;
        if first_error.is_none() {
            first_error = s.first_error;
        }
    }
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i] as f64 / 1000.0
    };
    Ok(LoadResult {
        rps: ok as f64 / elapsed.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        ok,
        errors,
        first_error,
    })
}

async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One connection's loop: request, whole response, repeat until `deadline`.
async fn connection(
    addr: SocketAddr,
    req: &'static [u8],
    head_only: bool,
    deadline: Instant,
) -> ConnStats {
    let mut st = ConnStats {
        latencies_us: Vec::with_capacity(64 * 1024),
        ..ConnStats::default()
    };
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut stream: Option<TcpStream> = None;
    while Instant::now() < deadline {
        let s = match &mut stream {
            Some(s) => s,
            None => match connect(addr).await {
                Ok(s) => {
                    buf.clear();
                    stream.insert(s)
                }
                Err(e) => {
                    st.error(format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let t0 = Instant::now();
        match exchange(s, req, head_only, &mut buf).await {
            Ok((status, close)) => {
                let us = t0.elapsed().as_micros().min(u32::MAX as u128) as u32;
                if (200..300).contains(&status) {
                    st.ok += 1;
                    st.latencies_us.push(us);
                } else {
                    st.error(format!("status {status}"));
                }
                if close {
                    stream = None;
                }
            }
            Err(e) => {
                st.error(e.to_string());
                stream = None;
            }
        }
    }
    st
}

/// Sends one request and reads its response. Returns the status and
/// whether the server will close the connection.
async fn exchange(
    s: &mut TcpStream,
    req: &[u8],
    head_only: bool,
    buf: &mut Vec<u8>,
) -> std::io::Result<(u16, bool)> {
    s.write_all(req).await?;
    let (head, head_len) = loop {
        if let Some(parsed) = parse_head(buf) {
            break parsed?;
        }
        if s.read_buf(buf).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before the response head",
            ));
        }
    };
    if head.chunked() && !head_only {
        return Err(std::io::Error::other(
            "chunked responses are not supported by the load generator",
        ));
    }
    let body_len = if head_only || head.status == 204 || head.status == 304 {
        0
    } else {
        head.content_length()
            .ok_or_else(|| std::io::Error::other("response without Content-Length"))?
            as usize
    };
    let total = head_len + body_len;
    while buf.len() < total {
        if s.read_buf(buf).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed inside the response body",
            ));
        }
    }
    buf.drain(..total);
    Ok((head.status, head.closes()))
}
