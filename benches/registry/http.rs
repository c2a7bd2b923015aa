//! A minimal HTTP/1.1 client over blocking TCP, used for seeding, blob
//! streams and pushes. It is deliberately thin — one `read` per 1 MiB into a
//! reused buffer, no framing layers — so that the client costs the same,
//! and as little as possible, against every server.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Size of the client's read buffer and of each body write.
pub const IO_BUF: usize = 1024 * 1024;

/// A parsed response head.
#[derive(Debug, Clone)]
pub struct Head {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn content_length(&self) -> Option<u64> {
        self.header("content-length")?.trim().parse().ok()
    }
    pub fn chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// Parses a response head at the start of `buf`. `None` until the blank line
/// that ends it has arrived; otherwise the head and its length in bytes.
pub fn parse_head(buf: &[u8]) -> Option<io::Result<(Head, usize)>> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    Some(parse_head_text(&buf[..end]).map(|h| (h, end)))
}

fn parse_head_text(raw: &[u8]) -> io::Result<Head> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let text = std::str::from_utf8(raw).map_err(|_| bad("response head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(bad(&format!("not an HTTP/1.x response: {status_line:?}")));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(&format!("bad status line {status_line:?}")))?;
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Head { status, headers })
}

/// A response whose body was read into memory.
#[derive(Debug)]
pub struct Response {
    pub head: Head,
    pub body: Vec<u8>,
}

impl Response {
    pub fn status(&self) -> u16 {
        self.head.status
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A request body.
pub enum Body<'a> {
    None,
    Bytes(&'a [u8]),
}

impl Body<'_> {
    fn len(&self) -> Option<usize> {
        match self {
            Body::None => None,
            Body::Bytes(b) => Some(b.len()),
        }
    }
}

/// One keep-alive connection.
pub struct Conn {
    addr: SocketAddr,
    stream: TcpStream,
    /// Bytes received but not consumed yet, from `pos`.
    buf: Vec<u8>,
    pos: usize,
    /// Set when the server said it will close the connection.
    closing: bool,
}

impl Conn {
    pub fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        stream.set_write_timeout(Some(Duration::from_secs(120)))?;
        Ok(Conn {
            addr,
            stream,
            buf: Vec::with_capacity(IO_BUF),
            pos: 0,
            closing: false,
        })
    }

    fn reconnect_if_closing(&mut self) -> io::Result<()> {
        if self.closing {
            *self = Conn::connect(self.addr)?;
        }
        Ok(())
    }

    /// Writes a request head and body.
    fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &Body<'_>,
    ) -> io::Result<()> {
        self.reconnect_if_closing()?;
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.addr);
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(len) = body.len() {
            head.push_str(&format!("Content-Length: {len}\r\n"));
        } else if matches!(method, "PUT" | "POST" | "PATCH") {
            head.push_str("Content-Length: 0\r\n");
        }
        head.push_str("\r\n");
        match body {
            Body::Bytes(b) if b.len() <= 64 * 1024 => {
                let mut all = head.into_bytes();
                all.extend_from_slice(b);
                self.stream.write_all(&all)?;
            }
            Body::Bytes(b) => {
                self.stream.write_all(head.as_bytes())?;
                for chunk in b.chunks(IO_BUF) {
                    self.stream.write_all(chunk)?;
                }
            }
            Body::None => self.stream.write_all(head.as_bytes())?,
        }
        Ok(())
    }

    /// Reads more bytes into `buf`; errors on EOF.
    fn fill(&mut self) -> io::Result<()> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        let len = self.buf.len();
        self.buf.resize(len + IO_BUF, 0);
        let n = self.stream.read(&mut self.buf[len..]);
        let n = match n {
            Ok(n) => n,
            Err(e) => {
                self.buf.truncate(len);
                return Err(e);
            }
        };
        self.buf.truncate(len + n);
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            ));
        }
        Ok(())
    }

    fn read_head(&mut self) -> io::Result<Head> {
        loop {
            if let Some(parsed) = parse_head(&self.buf[self.pos..]) {
                let (head, len) = parsed?;
                self.pos += len;
                if head.closes() {
                    self.closing = true;
                }
                return Ok(head);
            }
            self.fill()?;
        }
    }

    /// Passes up to `n` body bytes to `sink`; reads straight from the socket
    /// once the buffered bytes are used up.
    fn body_exact(&mut self, mut n: u64, sink: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        let buffered = ((self.buf.len() - self.pos) as u64).min(n) as usize;
        if buffered > 0 {
            sink(&self.buf[self.pos..self.pos + buffered]);
            self.pos += buffered;
            n -= buffered as u64;
        }
        if n == 0 {
            return Ok(());
        }
        // The buffer is drained: reuse it as the read buffer.
        self.buf.clear();
        self.pos = 0;
        self.buf.resize(IO_BUF, 0);
        while n > 0 {
            let want = (n as usize).min(IO_BUF);
            let got = self.stream.read(&mut self.buf[..want])?;
            if got == 0 {
                self.buf.clear();
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("body ended {n} bytes early"),
                ));
            }
            sink(&self.buf[..got]);
            n -= got as u64;
        }
        self.buf.clear();
        Ok(())
    }

    fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = self.buf[self.pos..].windows(2).position(|w| w == b"\r\n") {
                let s = String::from_utf8_lossy(&self.buf[self.pos..self.pos + i]).into_owned();
                self.pos += i + 2;
                return Ok(s);
            }
            self.fill()?;
        }
    }

    fn body(&mut self, method: &str, head: &Head, sink: &mut dyn FnMut(&[u8])) -> io::Result<u64> {
        let mut total = 0u64;
        let mut counted = |b: &[u8]| {
            total += b.len() as u64;
            sink(b)
        };
        if method == "HEAD" || head.status == 204 || head.status == 304 || head.status < 200 {
            // No body.
        } else if head.chunked() {
            loop {
                let size_line = self.line()?;
                let size =
                    u64::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| {
                            io::Error::new(io::ErrorKind::InvalidData, "bad chunk size")
                        })?;
                if size == 0 {
                    // Trailers, then the blank line.
                    while !self.line()?.is_empty() {}
                    break;
                }
                self.body_exact(size, &mut counted)?;
                self.line()?;
            }
        } else if let Some(len) = head.content_length() {
            self.body_exact(len, &mut counted)?;
        } else {
            // Delimited by the end of the connection.
            self.closing = true;
            loop {
                match self.fill() {
                    Ok(()) => {
                        counted(&self.buf[self.pos..]);
                        self.pos = self.buf.len();
                    }
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(total)
    }

    /// Sends a request and reads the whole response into memory.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Body<'_>,
    ) -> io::Result<Response> {
        self.send(method, path, headers, &body)?;
        let head = self.read_head()?;
        let mut out = Vec::new();
        self.body(method, &head, &mut |b| out.extend_from_slice(b))?;
        Ok(Response { head, body: out })
    }

    /// Sends a request and passes the response body to `sink` as it
    /// arrives. Returns the head and the number of body bytes.
    pub fn stream(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        sink: &mut dyn FnMut(&[u8]),
    ) -> io::Result<(Head, u64)> {
        self.send(method, path, headers, &Body::None)?;
        let head = self.read_head()?;
        let n = self.body(method, &head, sink)?;
        Ok((head, n))
    }
}

/// One request on a fresh connection.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Body<'_>,
) -> io::Result<Response> {
    Conn::connect(addr)?.request(method, path, headers, body)
}

/// The path and query of a `Location` header, which may be absolute
/// (Distribution) or relative (wharf).
pub fn location_path(loc: &str) -> String {
    match loc.split_once("://") {
        Some((_, rest)) => match rest.find('/') {
            Some(i) => rest[i..].to_string(),
            None => "/".to_string(),
        },
        None => loc.to_string(),
    }
}

/// Adds `key=value` to a path that may already have a query.
pub fn with_query(path: &str, key: &str, value: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{path}{sep}{key}={value}")
}

/// Checks run by `cargo test` (this target has no libtest harness).
pub fn self_check() {
    {
        let raw = b"HTTP/1.1 201 Created\r\nLocation: /v2/x\r\nContent-Length: 0\r\n\r\nrest";
        let (h, n) = parse_head(raw).unwrap().unwrap();
        assert_eq!(h.status, 201);
        assert_eq!(h.header("location"), Some("/v2/x"));
        assert_eq!(&raw[n..], b"rest");
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n").is_none());
        assert_eq!(
            location_path("http://127.0.0.1:5/v2/a/blobs/uploads/u?_state=x"),
            "/v2/a/blobs/uploads/u?_state=x"
        );
        assert_eq!(
            with_query("/u?_state=x", "digest", "d"),
            "/u?_state=x&digest=d"
        );
        assert_eq!(with_query("/u", "digest", "d"), "/u?digest=d");
    }
}
