//! A client for other OCI registries: the upstreams of the pull-through
//! cache and of scheduled sync, and the destinations of replication
//! (`push.rs`).
//!
//! One [`UpstreamClient`] talks to one registry: pooled connections over
//! HTTP/1.1 or HTTP/2 (ALPN), TLS with the system roots plus an optional CA,
//! the registry token flow (`WWW-Authenticate: Bearer` → realm → cached
//! token) and Basic auth, retries with `Retry-After` or backoff, redirects
//! (to a CDN) without leaking credentials, and timeouts on tokio's clock.
//! What the upstream may make wharf do is bounded (`guard.rs`): token
//! realms only on its host or its `token_realm_hosts`, connections to
//! loopback, private and link-local addresses only when the upstream is of
//! that kind, and blob bodies of exactly the size the caller knows.
//!
//! Retries only happen before a response is handed to the caller: a blob
//! body is a stream that fails (never ends cleanly) when the connection
//! drops, the body is shorter than announced, or the upstream goes silent.
//! Resuming with a range request is the caller's job.
//!
//! Depends only on `oci` (and the [`ByteStream`] alias of `storage`).

pub mod auth;
mod client;
pub mod guard;
mod push;
pub mod retry;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, LINK, RANGE};

pub use auth::{Credentials, Secret};
pub use push::{MANIFEST_TYPES, UploadStart};

use crate::oci::ByteStream;
use crate::oci::{Digest, Reference, RepoName};
use client::{Failure, Inner, Op};

/// Largest manifest accepted from an upstream.
pub const MAX_MANIFEST_SIZE: usize = 4 * 1024 * 1024;
/// Largest tag list or referrers index accepted from an upstream.
pub const MAX_LISTING_SIZE: usize = 16 * 1024 * 1024;
/// Redirects followed for one request.
pub const MAX_REDIRECTS: usize = 5;

const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// How to reach one upstream registry.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// Scheme and authority only, e.g. `https://registry-1.docker.io`.
    pub url: http::Uri,
    pub credentials: Option<Credentials>,
    /// A PEM file of extra CA certificates, trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// Establishing a TCP connection.
    pub connect_timeout: Duration,
    /// From sending a request (including connecting and the TLS handshake
    /// on a fresh connection) to its response headers.
    pub response_timeout: Duration,
    /// Longest silence between two chunks of a body.
    pub read_timeout: Duration,
    /// Retries after the first attempt, for retryable failures.
    pub max_retries: u32,
    /// Hosts besides the upstream's own that may be its token realm
    /// (`auth.docker.io` is added for Docker Hub). A realm elsewhere is
    /// refused, with or without credentials.
    pub token_realm_hosts: Vec<String>,
    /// Where requests are counted (shared by every upstream client).
    pub metrics: crate::metrics::UpstreamMetrics,
}

impl UpstreamSettings {
    /// Settings with the default timeouts (connect 10 s, response 30 s,
    /// read 60 s), 3 retries, no credentials and no extra CA.
    pub fn new(url: http::Uri) -> UpstreamSettings {
        UpstreamSettings {
            url,
            credentials: None,
            ca_file: None,
            metrics: Default::default(),
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
            max_retries: 3,
            token_realm_hosts: Vec::new(),
        }
    }
}

/// What an upstream says about a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestMeta {
    pub digest: Digest,
    /// The `Content-Type` without parameters (for a GET without one, the
    /// body's `mediaType`).
    pub media_type: String,
    pub size: u64,
}

/// One page of a tag listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagPage {
    pub tags: Vec<String>,
    /// The upstream announced a next page (`Link: <...>; rel="next"`).
    pub more: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("not found upstream")]
    NotFound,
    #[error("upstream authentication failed: {0}")]
    Unauthorized(String),
    #[error("upstream denied access: {0}")]
    Denied(String),
    #[error("upstream rate limit hit{}", retry_after.map(|d| format!(" (retry after {} s)", d.as_secs())).unwrap_or_default())]
    TooManyRequests { retry_after: Option<Duration> },
    #[error("upstream answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("upstream timed out ({0})")]
    Timeout(&'static str),
    #[error("cannot reach upstream: {0}")]
    Connect(String),
    #[error("TLS with upstream failed: {0}")]
    Tls(String),
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    #[error("upstream response is too large")]
    TooLarge,
    /// A blob response announced another size than the one the blob is
    /// known to have.
    #[error("upstream announced {announced} bytes for a blob of {expected}")]
    SizeMismatch { expected: u64, announced: u64 },
    /// wharf refused to contact a host (a redirect or token realm outside
    /// the upstream's trust boundary).
    #[error("refused: {0}")]
    Refused(String),
    #[error("upstream content does not match its digest: expected {expected}, computed {computed}")]
    DigestMismatch { expected: Digest, computed: Digest },
    /// Only from [`UpstreamClient::new`]: the settings cannot be used.
    #[error("invalid upstream settings: {0}")]
    InvalidSettings(String),
}

impl UpstreamError {
    /// Worth trying again: rate limits, 502/503/504, timeouts, connection
    /// failures.
    pub fn is_retryable(&self) -> bool {
        match self {
            UpstreamError::TooManyRequests { .. }
            | UpstreamError::Timeout(_)
            | UpstreamError::Connect(_) => true,
            UpstreamError::Status { status, .. } => matches!(status, 502..=504),
            _ => false,
        }
    }

    /// The upstream is down or failing (connection, timeout, TLS, 5xx,
    /// 429): a cache may serve stale content instead.
    pub fn is_unavailable(&self) -> bool {
        match self {
            UpstreamError::TooManyRequests { .. }
            | UpstreamError::Timeout(_)
            | UpstreamError::Connect(_)
            | UpstreamError::Tls(_) => true,
            UpstreamError::Status { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// Pages of a referrers listing followed at most (wharf pages 250 at a time).
pub const MAX_REFERRER_PAGES: usize = 1000;

/// A client for one upstream registry. Cheap to clone (shared pool, token
/// cache and settings).
#[derive(Clone)]
pub struct UpstreamClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("url", &self.inner.base)
            .finish_non_exhaustive()
    }
}

fn repo_scope(repo: &RepoName) -> String {
    format!("repository:{repo}:pull")
}

fn header_str(
    resp: &http::Response<hyper::body::Incoming>,
    name: impl http::header::AsHeaderName,
) -> Option<&str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

fn content_length(
    resp: &http::Response<hyper::body::Incoming>,
) -> Result<Option<u64>, UpstreamError> {
    header_str(resp, CONTENT_LENGTH)
        .map(|v| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| UpstreamError::Protocol(format!("bad Content-Length {v:?}")))
        })
        .transpose()
}

fn media_type_of(resp: &http::Response<hyper::body::Incoming>) -> Option<String> {
    header_str(resp, CONTENT_TYPE)
        .map(|v| v.split(';').next().unwrap_or_default().trim().to_string())
        .filter(|v| !v.is_empty())
}

fn header_digest(
    resp: &http::Response<hyper::body::Incoming>,
) -> Result<Option<Digest>, UpstreamError> {
    header_str(resp, DOCKER_CONTENT_DIGEST)
        .map(|v| {
            v.trim().parse::<Digest>().map_err(|e| {
                UpstreamError::Protocol(format!("bad Docker-Content-Digest {v:?}: {e}"))
            })
        })
        .transpose()
}

/// Percent-encodes a query parameter value.
fn query_value(v: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(v, SET).to_string()
}

impl UpstreamClient {
    /// Builds the client (TLS roots are loaded here). Connects lazily.
    pub fn new(settings: UpstreamSettings) -> Result<Self, UpstreamError> {
        Ok(UpstreamClient {
            inner: Arc::new(Inner::new(settings)?),
        })
    }

    /// The upstream's authority, e.g. `registry-1.docker.io` or
    /// `127.0.0.1:5001`.
    pub fn host(&self) -> &str {
        self.inner
            .base
            .authority()
            .map(|a| a.as_str())
            .unwrap_or_default()
    }

    /// `HEAD` of a manifest. The digest comes from `Docker-Content-Digest`
    /// (or the reference, when it is a digest); the two must agree.
    pub async fn head_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        accept: &str,
    ) -> Result<ManifestMeta, UpstreamError> {
        let op = Op::new(
            Method::HEAD,
            format!("/v2/{repo}/manifests/{reference}"),
            Some(repo_scope(repo)),
        )
        .header(ACCEPT, accept);
        self.inner
            .with_retries(&op, || async {
                let resp = self.inner.execute(&op).await?;
                let size = content_length(&resp)?.ok_or_else(|| {
                    UpstreamError::Protocol("manifest HEAD without Content-Length".into())
                })?;
                let media_type = media_type_of(&resp).ok_or_else(|| {
                    UpstreamError::Protocol("manifest HEAD without Content-Type".into())
                })?;
                let digest = match (header_digest(&resp)?, reference) {
                    (Some(h), Reference::Digest(d)) if h != *d => {
                        return Err(UpstreamError::DigestMismatch {
                            expected: d.clone(),
                            computed: h,
                        }
                        .into());
                    }
                    (_, Reference::Digest(d)) => d.clone(),
                    (Some(h), Reference::Tag(_)) => h,
                    (None, Reference::Tag(_)) => {
                        return Err(UpstreamError::Protocol(
                            "manifest HEAD by tag without Docker-Content-Digest".into(),
                        )
                        .into());
                    }
                };
                client::drain(resp.into_body(), self.inner.read_timeout()).await;
                Ok(ManifestMeta {
                    digest,
                    media_type,
                    size,
                })
            })
            .await
    }

    /// `GET` of a manifest (at most [`MAX_MANIFEST_SIZE`]). The body is
    /// verified against the reference when it is a digest, else against
    /// `Docker-Content-Digest` when present; otherwise its sha256 is the
    /// digest.
    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        accept: &str,
    ) -> Result<(ManifestMeta, Bytes), UpstreamError> {
        let op = Op::new(
            Method::GET,
            format!("/v2/{repo}/manifests/{reference}"),
            Some(repo_scope(repo)),
        )
        .header(ACCEPT, accept);
        self.inner
            .with_retries(&op, || async {
                let resp = self.inner.execute(&op).await?;
                if content_length(&resp)?.is_some_and(|n| n > MAX_MANIFEST_SIZE as u64) {
                    return Err(UpstreamError::TooLarge.into());
                }
                let expected = match reference {
                    Reference::Digest(d) => Some(d.clone()),
                    Reference::Tag(_) => header_digest(&resp)?,
                };
                let media_type = media_type_of(&resp);
                let body = client::read_body(
                    resp.into_body(),
                    MAX_MANIFEST_SIZE,
                    self.inner.read_timeout(),
                )
                .await?;
                let digest = match expected {
                    Some(expected) => {
                        let computed = Digest::of(expected.algorithm(), &body);
                        if computed != expected {
                            return Err(UpstreamError::DigestMismatch { expected, computed }.into());
                        }
                        expected
                    }
                    None => Digest::sha256_of(&body),
                };
                let media_type = media_type
                    .or_else(|| {
                        #[derive(serde::Deserialize)]
                        struct M {
                            #[serde(rename = "mediaType")]
                            media_type: Option<String>,
                        }
                        serde_json::from_slice::<M>(&body).ok()?.media_type
                    })
                    .ok_or_else(|| {
                        UpstreamError::Protocol(
                            "manifest has neither Content-Type nor mediaType".into(),
                        )
                    })?;
                Ok((
                    ManifestMeta {
                        digest,
                        media_type,
                        size: body.len() as u64,
                    },
                    body,
                ))
            })
            .await
    }

    /// `GET` of a blob of `size` bytes from byte `offset` on. Sends
    /// `Range: bytes=offset-` when `offset > 0`; a `200` to that is handled
    /// by skipping `offset` bytes. Redirects (to a CDN) are followed.
    ///
    /// `size` is what the caller knows of the blob (a manifest's
    /// descriptor, or a `HEAD`), never what this response says: a response
    /// announcing another size (`Content-Length`, `Content-Range`) is
    /// refused with [`UpstreamError::SizeMismatch`], and the stream fails as
    /// soon as the body goes past `size` or ends before it, whether or not
    /// the upstream announced a length.
    pub async fn get_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        offset: u64,
        size: u64,
    ) -> Result<ByteStream, UpstreamError> {
        if offset > size {
            return Err(UpstreamError::Protocol(format!(
                "offset {offset} is past the blob's {size} bytes"
            )));
        }
        let mut op = Op::new(
            Method::GET,
            format!("/v2/{repo}/blobs/{digest}"),
            Some(repo_scope(repo)),
        );
        if offset > 0 {
            op = op.header(RANGE, &format!("bytes={offset}-"));
        }
        self.inner
            .with_retries(&op, || async {
                let resp = self.inner.execute(&op).await?;
                let len = content_length(&resp)?;
                let mismatch = |announced: u64| UpstreamError::SizeMismatch {
                    expected: size,
                    announced,
                };
                // The body's first byte, as a position in the blob.
                let start = match resp.status().as_u16() {
                    206 => {
                        let cr =
                            header_str(&resp, http::header::CONTENT_RANGE).ok_or_else(|| {
                                UpstreamError::Protocol("206 without Content-Range".into())
                            })?;
                        let (start, total) = client::parse_content_range(cr).ok_or_else(|| {
                            UpstreamError::Protocol(format!("bad Content-Range {cr:?}"))
                        })?;
                        if start > offset {
                            return Err(UpstreamError::Protocol(format!(
                                "asked for bytes from {offset}, got a range from {start}"
                            ))
                            .into());
                        }
                        if let Some(total) = total.filter(|t| *t != size) {
                            return Err(mismatch(total).into());
                        }
                        start
                    }
                    200 => 0,
                    s => {
                        return Err(UpstreamError::Protocol(format!(
                            "unexpected status {s} for a blob"
                        ))
                        .into());
                    }
                };
                let expected = size - start;
                if let Some(len) = len.filter(|l| *l != expected) {
                    return Err(mismatch(start + len).into());
                }
                Ok(client::body_stream(
                    resp.into_body(),
                    offset - start,
                    expected,
                    self.inner.read_timeout(),
                ))
            })
            .await
    }

    /// `HEAD` of a blob: its size (`Content-Length`). Redirects are
    /// followed.
    pub async fn head_blob(&self, repo: &RepoName, digest: &Digest) -> Result<u64, UpstreamError> {
        let op = Op::new(
            Method::HEAD,
            format!("/v2/{repo}/blobs/{digest}"),
            Some(repo_scope(repo)),
        );
        self.inner
            .with_retries(&op, || async {
                let resp = self.inner.execute(&op).await?;
                let size = content_length(&resp)?.ok_or_else(|| {
                    UpstreamError::Protocol("blob HEAD without Content-Length".into())
                })?;
                client::drain(resp.into_body(), self.inner.read_timeout()).await;
                Ok(size)
            })
            .await
    }

    /// One page of `tags/list`.
    pub async fn tags(
        &self,
        repo: &RepoName,
        n: Option<usize>,
        last: Option<&str>,
    ) -> Result<TagPage, UpstreamError> {
        let mut query = Vec::new();
        if let Some(n) = n {
            query.push(format!("n={n}"));
        }
        if let Some(last) = last {
            query.push(format!("last={}", query_value(last)));
        }
        let mut path = format!("/v2/{repo}/tags/list");
        if !query.is_empty() {
            path.push('?');
            path.push_str(&query.join("&"));
        }
        let op =
            Op::new(Method::GET, path, Some(repo_scope(repo))).header(ACCEPT, "application/json");
        self.inner
            .with_retries(&op, || async {
                let resp = self.inner.execute(&op).await?;
                let more = resp
                    .headers()
                    .get_all(LINK)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .any(client::link_has_next);
                let body = client::read_body(
                    resp.into_body(),
                    MAX_LISTING_SIZE,
                    self.inner.read_timeout(),
                )
                .await?;
                #[derive(serde::Deserialize)]
                struct List {
                    #[serde(default)]
                    tags: Option<Vec<String>>,
                }
                let list: List = serde_json::from_slice(&body)
                    .map_err(|e| UpstreamError::Protocol(format!("bad tag list: {e}")))?;
                Ok(TagPage {
                    tags: list.tags.unwrap_or_default(),
                    more,
                })
            })
            .await
    }

    /// The referrers index of `digest`: every page the upstream announces
    /// (`Link: <...>; rel="next"`, as wharf itself pages them) followed and
    /// merged into one index, up to [`MAX_REFERRER_PAGES`] pages. A next
    /// link is followed only on this upstream, under the same referrers path.
    pub async fn referrers(
        &self,
        repo: &RepoName,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Bytes, UpstreamError> {
        let base = format!("/v2/{repo}/referrers/{digest}");
        let mut path = base.clone();
        if let Some(t) = artifact_type {
            path.push_str("?artifactType=");
            path.push_str(&query_value(t));
        }
        let mut merged: Option<serde_json::Value> = None;
        let mut pages = 0;
        loop {
            let (body, next) = self.referrers_page(repo, &path).await?;
            pages += 1;
            let next = next.and_then(|n| self.same_listing(&n, &base));
            if merged.is_none() && next.is_none() {
                return Ok(body);
            }
            let page: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| UpstreamError::Protocol(format!("bad referrers index: {e}")))?;
            match &mut merged {
                None => merged = Some(page),
                Some(all) => {
                    let more = page["manifests"].as_array().cloned().unwrap_or_default();
                    match all["manifests"].as_array_mut() {
                        Some(list) => list.extend(more),
                        None => all["manifests"] = serde_json::Value::Array(more),
                    }
                }
            }
            match next {
                Some(_) if pages >= MAX_REFERRER_PAGES => {
                    return Err(UpstreamError::Protocol(format!(
                        "the referrers of {digest} span more than {MAX_REFERRER_PAGES} pages"
                    )));
                }
                Some(n) => path = n,
                None => break,
            }
        }
        let all = merged.expect("merged after the first page");
        Ok(Bytes::from(serde_json::to_vec(&all).map_err(|e| {
            UpstreamError::Protocol(format!("referrers index: {e}"))
        })?))
    }

    /// One page of a referrers listing and its next link, if any.
    async fn referrers_page(
        &self,
        repo: &RepoName,
        path: &str,
    ) -> Result<(Bytes, Option<String>), UpstreamError> {
        let op = Op::new(Method::GET, path.to_string(), Some(repo_scope(repo)))
            .header(ACCEPT, OCI_INDEX);
        self.inner
            .with_retries(&op, || async {
                let resp = self.inner.execute(&op).await?;
                let next = resp
                    .headers()
                    .get_all(LINK)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .find_map(client::link_next);
                let body = client::read_body(
                    resp.into_body(),
                    MAX_LISTING_SIZE,
                    self.inner.read_timeout(),
                )
                .await?;
                Ok((body, next))
            })
            .await
    }

    /// A next link's path and query, if it stays on this upstream under
    /// `base` (a path, or an absolute URL of this upstream's authority).
    fn same_listing(&self, next: &str, base: &str) -> Option<String> {
        let path_and_query = if next.starts_with('/') {
            next.to_string()
        } else {
            let uri: http::Uri = next.parse().ok()?;
            if uri.scheme() != self.inner.base.scheme()
                || uri.authority() != self.inner.base.authority()
            {
                return None;
            }
            uri.path_and_query()?.as_str().to_string()
        };
        let path = path_and_query.split('?').next().unwrap_or("");
        (path == base).then_some(path_and_query)
    }

    /// `GET /v2/`: the upstream answers (a 401 counts as reachable).
    /// A bodiless request to a path outside the registry API of the same
    /// server, e.g. wharf's `/_wharf/...`: the status and body, unjudged.
    pub async fn call(
        &self,
        method: Method,
        path_and_query: &str,
    ) -> Result<(http::StatusCode, Bytes), UpstreamError> {
        self.inner.call(method, path_and_query).await
    }

    pub async fn ping(&self) -> Result<(), UpstreamError> {
        let op = Op::new(Method::GET, "/v2/".to_string(), None);
        self.inner
            .with_retries(&op, || async {
                let resp = self.inner.execute(&op).await?;
                client::drain(resp.into_body(), self.inner.read_timeout()).await;
                Ok::<_, Failure>(())
            })
            .await
    }
}
