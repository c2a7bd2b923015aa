//! The HTTP face of the registry: parse the route, call the registry, map
//! the result onto the distribution API's responses. Health endpoints live
//! here too. The listener, TLS and shutdown are in [`server`].

mod admin;
pub use admin::split_ref;
pub mod error;
mod sendfile;
pub mod server;

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, BodyStream, Empty, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};

use crate::metrics::{Metrics, RequestLabels, ServerMetrics, UpstreamMetrics};
use crate::oci::manifest::{MAX_MANIFEST_SIZE, OCI_INDEX};
use crate::oci::{Digest, ErrorCode, Reference, RepoName, Route, UploadId, UploadRange};
use crate::registry::{MountOutcome, Page, Registry, RegistryError};
use crate::storage::ByteStream;
use error::{error_response, range_header, registry_error};

/// Response bodies: in-memory or streamed from storage.
pub type Body = UnsyncBoxBody<Bytes, io::Error>;
pub type Resp = Response<Body>;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn stream_body(s: ByteStream) -> Body {
    StreamBody::new(s.map_ok(Frame::data)).boxed_unsync()
}

const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");
const API_VERSION_HEADER: HeaderName = HeaderName::from_static("docker-distribution-api-version");
const CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
const UPLOAD_UUID: HeaderName = HeaderName::from_static("docker-upload-uuid");
const OCI_SUBJECT: HeaderName = HeaderName::from_static("oci-subject");

/// The metrics label of a method, borrowed for the standard ones.
fn method_label(m: &Method) -> std::borrow::Cow<'static, str> {
    const STANDARD: [Method; 7] = [
        Method::GET,
        Method::HEAD,
        Method::PUT,
        Method::POST,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
    ];
    const NAMES: [&str; 7] = ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS"];
    match STANDARD.iter().position(|s| s == m) {
        Some(i) => NAMES[i].into(),
        None => m.as_str().to_owned().into(),
    }
}

/// `"<digest>"`, the ETag of content addressed by `digest`.
fn etag(digest: &Digest) -> HeaderValue {
    let mut s = String::with_capacity(digest.as_str().len() + 2);
    s.push('"');
    s.push_str(digest.as_str());
    s.push('"');
    hv(&s)
}

/// Everything a request handler needs.
#[derive(Clone)]
pub struct App {
    pub registry: Registry,
    metrics: Arc<Metrics>,
    counters: ServerMetrics,
    replication: Option<Arc<crate::replication::Replication>>,
    sync: Vec<Arc<crate::replication::sync::SyncEntry>>,
    /// Held while `POST /_wharf/fsck` runs (one at a time).
    fsck_running: Arc<tokio::sync::Mutex<()>>,
}

impl App {
    /// An app whose metrics cover only itself and the registry's cache.
    pub fn new(registry: Registry) -> App {
        App::with_metrics(registry, &UpstreamMetrics::default())
    }

    /// An app whose `/metrics` also reports `upstream` (the counters the
    /// upstream clients were built with).
    pub fn with_metrics(registry: Registry, upstream: &UpstreamMetrics) -> App {
        App::with_replication(registry, upstream, None)
    }

    /// Like [`App::with_metrics`], also serving replication's status and
    /// operations and reporting its metrics.
    pub fn with_replication(
        registry: Registry,
        upstream: &UpstreamMetrics,
        replication: Option<Arc<crate::replication::Replication>>,
    ) -> App {
        let counters = ServerMetrics::default();
        let mut components: Vec<&dyn crate::metrics::Report> = Vec::new();
        if let Some(c) = registry.cache() {
            components.push(&**c);
        }
        if let Some(r) = &replication {
            components.push(&r.metrics);
        }
        if let Some(h) = registry.hot_metrics() {
            components.push(h);
        }
        let metrics = Arc::new(Metrics::new(&counters, upstream, &components));
        App {
            registry,
            metrics,
            counters,
            replication,
            sync: Vec::new(),
            fsck_running: Arc::default(),
        }
    }

    /// Also reports the scheduled sync entries at `/_wharf/sync/status`.
    pub fn with_sync(mut self, sync: Vec<Arc<crate::replication::sync::SyncEntry>>) -> App {
        self.sync = sync;
        self
    }

    /// Handles one request. Never fails: errors become responses.
    pub async fn handle<B>(&self, req: Request<B>) -> Result<Resp, Infallible>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let started = Instant::now();
        let method = req.method().clone();
        let uri = req.uri().clone();
        let mut resp = self.dispatch(req).await;
        resp.headers_mut().insert(API_VERSION_HEADER, API_VERSION);
        self.counters
            .requests
            .get_or_create(&RequestLabels {
                method: method_label(&method),
                status: resp.status().as_u16(),
            })
            .inc();
        tracing::info!(
            target: "wharf::access",
            %method,
            path = uri.path(),
            status = resp.status().as_u16(),
            ms = started.elapsed().as_secs_f64() * 1e3,
        );
        Ok(resp)
    }

    async fn dispatch<B>(&self, req: Request<B>) -> Resp
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let path = req.uri().path();
        if !path.starts_with("/v2")
            && let Some(resp) = self.operations(req.method(), path, req.uri().query()).await
        {
            return resp;
        }
        let route = match Route::parse(path) {
            Ok(r) => r,
            Err(e) => {
                let status = match e.code {
                    ErrorCode::NameUnknown | ErrorCode::BlobUploadUnknown => StatusCode::NOT_FOUND,
                    // A reference that is not a valid tag names no manifest:
                    // reading or deleting it is a 404, only a PUT is invalid.
                    ErrorCode::ManifestInvalid if req.method() != Method::PUT => {
                        return error_response(
                            StatusCode::NOT_FOUND,
                            ErrorCode::ManifestUnknown,
                            &format!("manifest unknown: {}", e.message),
                        );
                    }
                    _ => StatusCode::BAD_REQUEST,
                };
                return error_response(status, e.code, &e.message);
            }
        };
        let query = Query::parse(req.uri().query());
        let ns = query.get("ns").map(str::to_string);
        let ns = ns.as_deref();
        let result = match (req.method().clone(), route) {
            (Method::GET | Method::HEAD, Route::Base) => Ok(json(StatusCode::OK, "{}")),
            (Method::GET, Route::Catalog) => self.catalog(&query).await,
            (m @ (Method::GET | Method::HEAD), Route::Manifest { name, reference }) => {
                self.get_manifest(&name, &reference, req.headers(), m == Method::HEAD, ns)
                    .await
            }
            (Method::PUT, Route::Manifest { name, reference }) => {
                self.put_manifest(&name, &reference, req, ns).await
            }
            (Method::DELETE, Route::Manifest { name, reference }) => {
                match self.registry.hosted(&name, ns).await {
                    Ok(repo) => repo.delete_manifest(&reference).await,
                    Err(e) => Err(e),
                }
                .map(|()| status_only(StatusCode::ACCEPTED))
            }
            (m @ (Method::GET | Method::HEAD), Route::Blob { name, digest }) => {
                self.get_blob(&name, &digest, req.headers(), m == Method::HEAD, ns)
                    .await
            }
            (Method::DELETE, Route::Blob { name, digest }) => {
                match self.registry.hosted(&name, ns).await {
                    Ok(repo) => repo.delete_blob(&digest).await,
                    Err(e) => Err(e),
                }
                .map(|()| status_only(StatusCode::ACCEPTED))
            }
            (Method::POST, Route::UploadStart { name }) => {
                self.post_upload(&name, &query, req, ns).await
            }
            (Method::GET, Route::Upload { name, id }) => self
                .registry
                .upload_status(&name, &id)
                .await
                .map(|size| upload_accepted(StatusCode::NO_CONTENT, &name, &id, size)),
            (Method::PATCH, Route::Upload { name, id }) => {
                self.patch_upload(&name, &id, req, ns).await
            }
            (Method::PUT, Route::Upload { name, id }) => {
                self.put_upload(&name, &id, &query, req, ns).await
            }
            (Method::DELETE, Route::Upload { name, id }) => {
                match self.registry.session_repo(&name, ns) {
                    Ok(repo) => repo.cancel_upload(&id).await,
                    Err(e) => Err(e),
                }
                .map(|()| status_only(StatusCode::NO_CONTENT))
            }
            (Method::GET, Route::TagsList { name }) => self.tags(&name, &query, ns).await,
            (Method::GET, Route::Referrers { name, digest }) => {
                self.referrers(&name, &digest, &query, ns).await
            }
            (m, _) => Err(RegistryError::Unsupported(format!(
                "method {m} is not supported on this endpoint"
            ))),
        };
        result.unwrap_or_else(|e| registry_error(&e))
    }

    async fn get_manifest(
        &self,
        name: &RepoName,
        reference: &Reference,
        headers: &HeaderMap,
        head: bool,
        ns: Option<&str>,
    ) -> Result<Resp, RegistryError> {
        let accept = joined(headers, header::ACCEPT);
        let hit = self
            .registry
            .manifest(name, reference, accept.as_deref(), ns)
            .await?;
        let body = if head {
            empty()
        } else {
            let bytes = self.registry.manifest_body(&hit).await?;
            self.counters.bytes_served.inc_by(bytes.len() as u64);
            full(bytes)
        };
        let mut r = Response::new(body);
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, hv(&hit.media_type));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(hit.size));
        h.insert(CONTENT_DIGEST, hv(hit.digest.as_str()));
        h.insert(header::ETAG, etag(&hit.digest));
        Ok(r)
    }

    async fn put_manifest<B>(
        &self,
        name: &RepoName,
        reference: &Reference,
        req: Request<B>,
        ns: Option<&str>,
    ) -> Result<Resp, RegistryError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let repo = self.registry.hosted(name, ns).await?;
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if content_length(req.headers()).is_some_and(|l| l > MAX_MANIFEST_SIZE as u64) {
            return Err(RegistryError::ManifestTooLarge);
        }
        let body = match Limited::new(req.into_body(), MAX_MANIFEST_SIZE)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(RegistryError::ManifestTooLarge);
            }
            Err(e) => return Err(RegistryError::Body(io::Error::other(e))),
        };
        let pushed = repo
            .put_manifest(reference, content_type.as_deref(), body)
            .await?;
        let mut r = status_only(StatusCode::CREATED);
        let h = r.headers_mut();
        h.insert(
            header::LOCATION,
            hv(&format!("/v2/{name}/manifests/{}", pushed.digest)),
        );
        h.insert(CONTENT_DIGEST, hv(pushed.digest.as_str()));
        if let Some(subject) = pushed.subject {
            h.insert(OCI_SUBJECT, hv(subject.as_str()));
        }
        Ok(r)
    }

    async fn get_blob(
        &self,
        name: &RepoName,
        digest: &Digest,
        headers: &HeaderMap,
        head: bool,
        ns: Option<&str>,
    ) -> Result<Resp, RegistryError> {
        if head {
            let size = self.registry.blob_size(name, digest, ns).await?;
            let mut r = Response::new(empty());
            blob_headers(r.headers_mut(), digest, size);
            return Ok(r);
        }
        if let Some(url) = self.registry.blob_url(name, digest, ns).await? {
            // Like ECR's GetDownloadUrlForLayer: the client fetches the bytes
            // (with its Range, if any) from the store.
            let mut r = status_only(StatusCode::TEMPORARY_REDIRECT);
            r.headers_mut().insert(header::LOCATION, hv(&url));
            r.headers_mut()
                .insert("docker-content-digest", hv(digest.as_str()));
            return Ok(r);
        }
        let range = headers
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .filter(|_| if_range_holds(headers, digest));
        let blob = self.registry.blob(name, digest, range, ns).await?;
        let served = self.counters.bytes_served.clone();
        let stream = blob
            .stream
            .inspect_ok(move |chunk| {
                served.inc_by(chunk.len() as u64);
            })
            .boxed();
        let mut r = Response::new(stream_body(stream));
        match blob.range {
            Some(range) => {
                *r.status_mut() = StatusCode::PARTIAL_CONTENT;
                blob_headers(r.headers_mut(), digest, range.end - range.start);
                r.headers_mut().insert(
                    header::CONTENT_RANGE,
                    hv(&format!(
                        "bytes {}-{}/{}",
                        range.start,
                        range.end - 1,
                        blob.size
                    )),
                );
            }
            None => blob_headers(r.headers_mut(), digest, blob.size),
        }
        Ok(r)
    }

    async fn post_upload<B>(
        &self,
        name: &RepoName,
        query: &Query,
        req: Request<B>,
        ns: Option<&str>,
    ) -> Result<Resp, RegistryError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let repo = self.registry.hosted(name, ns).await?;
        if let Some(mount) = query.get("mount") {
            let digest = parse_digest(mount)?;
            let from = match query.get("from") {
                Some(f) => Some(f.parse::<RepoName>().map_err(|e| {
                    RegistryError::NameInvalid(format!("invalid from repository {f:?}: {e}"))
                })?),
                None => None,
            };
            return Ok(match repo.mount(&digest, from.as_ref()).await? {
                MountOutcome::Mounted => blob_created(name, &digest),
                MountOutcome::Session(id) => upload_accepted(StatusCode::ACCEPTED, name, &id, 0),
            });
        }
        if let Some(d) = query.get("digest") {
            let digest = parse_digest(d)?;
            let length = content_length(req.headers());
            repo.monolithic_upload(&digest, length, body_stream(req.into_body()))
                .await?;
            return Ok(blob_created(name, &digest));
        }
        let id = repo.start_upload().await?;
        Ok(upload_accepted(StatusCode::ACCEPTED, name, &id, 0))
    }

    async fn patch_upload<B>(
        &self,
        name: &RepoName,
        id: &UploadId,
        req: Request<B>,
        ns: Option<&str>,
    ) -> Result<Resp, RegistryError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let repo = self.registry.session_repo(name, ns)?;
        let range = content_range(req.headers())?;
        let length = content_length(req.headers());
        let size = repo
            .append_upload(id, range, length, body_stream(req.into_body()))
            .await?;
        Ok(upload_accepted(StatusCode::ACCEPTED, name, id, size))
    }

    async fn put_upload<B>(
        &self,
        name: &RepoName,
        id: &UploadId,
        query: &Query,
        req: Request<B>,
        ns: Option<&str>,
    ) -> Result<Resp, RegistryError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let repo = self.registry.session_repo(name, ns)?;
        let digest = parse_digest(query.get("digest").ok_or_else(|| {
            RegistryError::DigestInvalid("the digest query parameter is required".into())
        })?)?;
        let range = content_range(req.headers())?;
        let length = content_length(req.headers());
        let has_body = length != Some(0)
            && (length.is_some()
                || range.is_some()
                || req.headers().contains_key(header::TRANSFER_ENCODING));
        let last = has_body.then(|| (range, length, body_stream(req.into_body())));
        repo.finish_upload(id, &digest, last).await?;
        Ok(blob_created(name, &digest))
    }

    async fn tags(
        &self,
        name: &RepoName,
        query: &Query,
        ns: Option<&str>,
    ) -> Result<Resp, RegistryError> {
        let n = query.page_size()?;
        let last = query.get("last");
        let page = self.registry.tags(name, last, n, ns).await?;
        let body = serde_json::json!({ "name": name.as_str(), "tags": page.items }).to_string();
        let mut r = json(StatusCode::OK, body);
        link_next(&mut r, &format!("/v2/{name}/tags/list"), &page, n, ns);
        Ok(r)
    }

    async fn catalog(&self, query: &Query) -> Result<Resp, RegistryError> {
        let n = query.page_size()?;
        let last = query.get("last");
        let page = self.registry.catalog(last, n).await?;
        let body = serde_json::json!({ "repositories": page.items }).to_string();
        let mut r = json(StatusCode::OK, body);
        link_next(&mut r, "/v2/_catalog", &page, n, None);
        Ok(r)
    }

    async fn referrers(
        &self,
        name: &RepoName,
        digest: &Digest,
        query: &Query,
        ns: Option<&str>,
    ) -> Result<Resp, RegistryError> {
        let filter = query.get("artifactType");
        let n = query.page_size()?;
        let last = query.get("last").map(parse_digest).transpose()?;
        let page = self
            .registry
            .referrers_page(name, digest, filter, last.as_ref(), n, ns)
            .await?;
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": page.manifests,
        })
        .to_string();
        let mut r = json(StatusCode::OK, body);
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(OCI_INDEX));
        if let (true, Some(last)) = (page.more, page.manifests.last()) {
            // The spec's pagination: the next page's URL in `Link`, carrying
            // the filter (and `ns`, so a mirror's next page routes alike).
            let n = n
                .unwrap_or(crate::registry::REFERRERS_PAGE)
                .min(crate::registry::REFERRERS_PAGE);
            let mut next = format!("/v2/{name}/referrers/{digest}?n={n}&last={}", last.digest);
            if let Some(f) = filter {
                next.push_str(&format!("&artifactType={}", query_value(f)));
            }
            if let Some(ns) = ns {
                next.push_str(&format!("&ns={}", query_value(ns)));
            }
            r.headers_mut()
                .insert(header::LINK, hv(&format!("<{next}>; rel=\"next\"")));
        }
        if filter.is_some() {
            r.headers_mut().insert(
                "oci-filters-applied",
                HeaderValue::from_static("artifactType"),
            );
        }
        Ok(r)
    }
}

/// Decoded query parameters.
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    pub(crate) fn parse(q: Option<&str>) -> Query {
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        Query(
            q.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (decode(k), decode(v)),
                    None => (decode(p), String::new()),
                })
                .collect(),
        )
    }

    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn page_size(&self) -> Result<Option<usize>, RegistryError> {
        match self.get("n") {
            None => Ok(None),
            Some(n) => n.parse().map(Some).map_err(|_| {
                RegistryError::ParamInvalid(format!("n must be a non-negative integer, got {n:?}"))
            }),
        }
    }
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

pub(crate) fn json(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn status_only(status: StatusCode) -> Resp {
    let mut r = Response::new(empty());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    r
}

fn blob_headers(h: &mut HeaderMap, digest: &Digest, len: u64) {
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(CONTENT_DIGEST, hv(digest.as_str()));
    h.insert(header::ETAG, etag(digest));
}

fn blob_created(name: &RepoName, digest: &Digest) -> Resp {
    let mut r = status_only(StatusCode::CREATED);
    r.headers_mut()
        .insert(header::LOCATION, hv(&format!("/v2/{name}/blobs/{digest}")));
    r.headers_mut().insert(CONTENT_DIGEST, hv(digest.as_str()));
    r
}

fn upload_accepted(status: StatusCode, name: &RepoName, id: &UploadId, size: u64) -> Resp {
    let mut r = status_only(status);
    let h = r.headers_mut();
    h.insert(
        header::LOCATION,
        hv(&format!("/v2/{name}/blobs/uploads/{id}")),
    );
    h.insert(header::RANGE, range_header(size));
    h.insert(UPLOAD_UUID, hv(id.as_str()));
    r
}

/// `v` as a query value of a `Link` this server sends.
fn query_value(v: &str) -> String {
    percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The spec's `Link` to the next page, carrying `ns` so a mirror's next
/// page routes as the first did.
fn link_next(r: &mut Resp, path: &str, page: &Page, n: Option<usize>, ns: Option<&str>) {
    if let (true, Some(last)) = (page.more, page.items.last()) {
        let n = n.unwrap_or(page.items.len());
        // Names and tags are URL-safe by their grammars.
        let mut next = format!("{path}?n={n}&last={last}");
        if let Some(ns) = ns {
            next.push_str(&format!("&ns={}", query_value(ns)));
        }
        r.headers_mut()
            .insert(header::LINK, hv(&format!("<{next}>; rel=\"next\"")));
    }
}

/// Whether a `Range` may be honoured under the request's `If-Range`
/// (RFC 9110, 13.1.5): yes without one; with an entity-tag, only if it is
/// strongly equal to the blob's ETag (`"<digest>"`; a weak tag never is);
/// with a date, never, since blobs are served without `Last-Modified` and a
/// date is therefore no strong validator of them. When it does not hold the
/// whole blob is sent (200), as if no `Range` had come.
fn if_range_holds(h: &HeaderMap, digest: &Digest) -> bool {
    let Some(v) = h.get(header::IF_RANGE) else {
        return true;
    };
    let Ok(v) = v.to_str() else {
        return false;
    };
    let v = v.trim();
    v.len() == digest.as_str().len() + 2
        && v.starts_with('"')
        && v.ends_with('"')
        && &v[1..v.len() - 1] == digest.as_str()
}

fn parse_digest(s: &str) -> Result<Digest, RegistryError> {
    s.parse()
        .map_err(|e| RegistryError::DigestInvalid(format!("invalid digest {s:?}: {e}")))
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

fn content_range(h: &HeaderMap) -> Result<Option<UploadRange>, RegistryError> {
    match h.get(header::CONTENT_RANGE) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or_else(|| {
                RegistryError::UploadInvalid("Content-Range must be <start>-<end>".into())
            }),
    }
}

/// All values of a header joined with `,`.
fn joined(h: &HeaderMap, name: header::HeaderName) -> Option<String> {
    let vals: Vec<&str> = h
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!vals.is_empty()).then(|| vals.join(","))
}

/// A request body as a byte stream.
fn body_stream<B>(body: B) -> ByteStream
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    BodyStream::new(body)
        .try_filter_map(|frame| futures::future::ready(Ok(frame.into_data().ok())))
        .map_err(io::Error::other)
        .boxed()
}

/// Convenience for hyper's service: incoming requests.
pub type IncomingRequest = Request<Incoming>;

#[cfg(test)]
mod tests {
    use super::Query;
    use percent_encoding::{AsciiSet, CONTROLS, NON_ALPHANUMERIC, utf8_percent_encode};
    use proptest::prelude::*;

    /// The least a client must escape in a query component: the
    /// separators, `%`, `#`, space and controls (non-ASCII is always
    /// escaped). `+` is left bare: the parser is percent-decoding, not
    /// form-decoding, so a bare `+` (as in `artifactType=...+json`) stays.
    const MINIMAL: &AsciiSet = &CONTROLS.add(b' ').add(b'%').add(b'&').add(b'=').add(b'#');

    fn encode(pairs: &[(String, String)], set: &'static AsciiSet) -> String {
        pairs
            .iter()
            .map(|(k, v)| {
                format!(
                    "{}={}",
                    utf8_percent_encode(k, set),
                    utf8_percent_encode(v, set)
                )
            })
            .collect::<Vec<_>>()
            .join("&")
    }

    fn pairs() -> impl Strategy<Value = Vec<(String, String)>> {
        proptest::collection::vec((".{0,12}", ".{0,24}"), 0..8)
    }

    #[test]
    fn query_basics() {
        let q = Query::parse(Some(
            "n=10&last=a%2Fb&flag&&n=20&artifactType=application/x+json",
        ));
        assert_eq!(q.get("n"), Some("10"));
        assert_eq!(q.get("last"), Some("a/b"));
        assert_eq!(q.get("flag"), Some(""));
        assert_eq!(q.get("artifactType"), Some("application/x+json"));
        assert_eq!(q.get("missing"), None);
        assert!(Query::parse(None).0.is_empty());
        assert!(Query::parse(Some("")).0.is_empty());
    }

    proptest! {
        #[test]
        fn query_round_trip(pairs in pairs(), minimal in any::<bool>()) {
            let set = if minimal { MINIMAL } else { NON_ALPHANUMERIC };
            let q = Query::parse(Some(&encode(&pairs, set)));
            prop_assert_eq!(&q.0, &pairs);
            for (k, _) in &pairs {
                let first = pairs.iter().find(|(k2, _)| k2 == k).map(|(_, v)| v.as_str());
                prop_assert_eq!(q.get(k), first);
            }
        }

        #[test]
        fn empty_segments_are_ignored(pairs in pairs(), pads in proptest::collection::vec(0usize..3, 9)) {
            // Stray `&`s (leading, trailing, doubled) change nothing.
            let mut s = "&".repeat(pads[0]);
            for (i, (k, v)) in pairs.iter().enumerate() {
                if i > 0 {
                    s.push_str(&"&".repeat(1 + pads[i % pads.len()]));
                }
                s.push_str(&encode(&[(k.clone(), v.clone())], NON_ALPHANUMERIC));
            }
            s.push_str(&"&".repeat(pads[8]));
            prop_assert_eq!(Query::parse(Some(&s)).0, pairs);
        }

        #[test]
        fn key_without_value(keys in proptest::collection::vec(".{1,12}", 1..6)) {
            // `k` alone means `k=` (a present, empty value).
            let s = keys
                .iter()
                .map(|k| utf8_percent_encode(k, NON_ALPHANUMERIC).to_string())
                .collect::<Vec<_>>()
                .join("&");
            let q = Query::parse(Some(&s));
            let expected: Vec<(String, String)> =
                keys.iter().map(|k| (k.clone(), String::new())).collect();
            prop_assert_eq!(q.0, expected);
        }

        #[test]
        fn query_never_panics(s in ".{0,100}|[%&=a-f0-9+]{0,40}") {
            let q = Query::parse(Some(&s));
            let _ = q.get("n");
            let _ = q.page_size();
        }
    }
}
