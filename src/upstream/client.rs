//! The request machinery behind [`super::UpstreamClient`]: the pooled
//! hyper client, one request with authentication and redirects, retries,
//! and reading bodies with size limits and read timeouts.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::future::FutureExt;
use http::header::{
    AUTHORIZATION, HeaderName, HeaderValue, LOCATION, RETRY_AFTER, USER_AGENT, WWW_AUTHENTICATE,
};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::GaiResolver;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::time::Instant;

use super::auth::{
    AuthScheme, Credentials, Secret, Token, TokenCache, TokenResponse, parse_www_authenticate,
};
use super::guard::{GuardedConnector, GuardedResolver, Policy, Refused, normal_host};
use super::retry::{MAX_RETRY_AFTER, backoff, parse_retry_after};
use super::{MAX_REDIRECTS, UpstreamError, UpstreamSettings};
use crate::oci::ByteStream;

/// Request bodies: empty, bytes held in memory (replayable), or a stream
/// (sent once).
pub type ReqBody = UnsyncBoxBody<Bytes, io::Error>;

type HttpClient = Client<HttpsConnector<GuardedConnector<HttpConnector<GuardedResolver>>>, ReqBody>;

fn empty_body() -> ReqBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

fn bytes_body(b: Bytes) -> ReqBody {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

fn stream_body(s: ByteStream) -> ReqBody {
    use futures::TryStreamExt as _;
    StreamBody::new(s.map_ok(hyper::body::Frame::data)).boxed_unsync()
}

const AGENT: &str = concat!("wharf/", env!("CARGO_PKG_VERSION"));
/// Error bodies and discarded bodies are read up to this size.
const SMALL_BODY: usize = 64 * 1024;
/// Largest token response accepted.
const MAX_TOKEN_RESPONSE: usize = 1024 * 1024;

/// A failed attempt, with how long the upstream asked us to wait.
#[derive(Debug)]
pub struct Failure {
    pub error: UpstreamError,
    pub retry_after: Option<Duration>,
}

impl From<UpstreamError> for Failure {
    fn from(error: UpstreamError) -> Self {
        let retry_after = match &error {
            UpstreamError::TooManyRequests { retry_after } => *retry_after,
            _ => None,
        };
        Failure { error, retry_after }
    }
}

/// One logical request: method, path and query on the upstream, extra
/// headers, and the token scope (`None`: no auth flow, and a 401 is
/// returned as a response).
pub struct Op {
    method: Method,
    path_and_query: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    scope: Option<String>,
    /// A body held in memory, sent again on every attempt.
    body: Option<Bytes>,
}

impl Op {
    pub fn new(method: Method, path_and_query: String, scope: Option<String>) -> Op {
        Op {
            method,
            path_and_query,
            headers: Vec::new(),
            scope,
            body: None,
        }
    }
    /// A body small enough to hold (a manifest): replayable, so the request
    /// may be retried and may answer an auth challenge.
    pub fn body(mut self, body: Bytes) -> Op {
        self.body = Some(body);
        self
    }
    /// Adds a header; empty or invalid values are left out.
    pub fn header(mut self, name: HeaderName, value: &str) -> Op {
        if !value.is_empty()
            && let Ok(v) = HeaderValue::from_str(value)
        {
            self.headers.push((name, v));
        }
        self
    }
}

/// The shared state of one upstream client.
pub struct Inner {
    pub base: Uri,
    /// Built on first use (it needs the system roots).
    http: std::sync::OnceLock<HttpClient>,
    extra_roots: Vec<CertificateDer<'static>>,
    connect_timeout: Duration,
    response_timeout: Duration,
    read_timeout: Duration,
    max_retries: u32,
    credentials: Option<Credentials>,
    metrics: crate::metrics::UpstreamMetrics,
    /// Hosts besides the upstream's own that may be its token realm.
    realm_hosts: Arc<[String]>,
    /// Where connections may go (the upstream, its realms, public
    /// addresses, and addresses of the upstream's own kind).
    policy: Arc<Policy>,
    /// How the upstream authenticates, once a challenge told us.
    scheme: Mutex<Option<AuthScheme>>,
    tokens: TokenCache,
}

fn invalid(msg: impl Into<String>) -> UpstreamError {
    UpstreamError::InvalidSettings(msg.into())
}

/// The system's trusted roots, loaded once per process on first use (every
/// upstream client shares them; loading takes milliseconds, so it is kept
/// off the start-up path).
fn native_roots() -> &'static rustls::RootCertStore {
    static ROOTS: std::sync::OnceLock<rustls::RootCertStore> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::debug!(error = %e, "skipping unreadable system certificate");
        }
        roots.add_parsable_certificates(native.certs);
        roots
    })
}

/// Reads the extra CA file of `settings` (checked when the client is made,
/// so a bad file stops the start).
fn extra_roots(settings: &UpstreamSettings) -> Result<Vec<CertificateDer<'static>>, UpstreamError> {
    let Some(path) = &settings.ca_file else {
        return Ok(Vec::new());
    };
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| invalid(format!("reading CA file {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(format!(
            "no certificate in CA file {}",
            path.display()
        )));
    }
    let mut check = rustls::RootCertStore::empty();
    for cert in &certs {
        check
            .add(cert.clone())
            .map_err(|e| invalid(format!("CA file {}: {e}", path.display())))?;
    }
    Ok(certs)
}

fn build_http(
    extra: &[CertificateDer<'static>],
    connect_timeout: Duration,
    policy: Arc<Policy>,
) -> HttpClient {
    let mut roots = native_roots().clone();
    for cert in extra {
        // Checked by `extra_roots`.
        let _ = roots.add(cert.clone());
    }
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut tcp = HttpConnector::new_with_resolver(GuardedResolver {
        inner: GaiResolver::new(),
        policy: policy.clone(),
    });
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(GuardedConnector { inner: tcp, policy });
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(https)
}

/// Whether `uri` has the same scheme and authority as `base`.
fn same_origin(uri: &Uri, base: &Uri) -> bool {
    uri.scheme() == base.scheme() && uri.authority() == base.authority()
}

impl Inner {
    pub fn new(settings: UpstreamSettings) -> Result<Inner, UpstreamError> {
        let url = &settings.url;
        match url.scheme_str() {
            Some("http") | Some("https") => {}
            _ => return Err(invalid(format!("{url}: the scheme must be http or https"))),
        }
        let authority = url
            .authority()
            .ok_or_else(|| invalid(format!("{url}: no host")))?;
        if authority.as_str().contains('@') {
            return Err(invalid("credentials go in `credentials`, not in the URL"));
        }
        if !matches!(url.path(), "" | "/") || url.query().is_some() {
            return Err(invalid(format!(
                "{url}: only a scheme and a host are allowed, no path or query"
            )));
        }
        let base = Uri::builder()
            .scheme(url.scheme_str().unwrap_or("https"))
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        let host = normal_host(authority.host());
        let mut realm_hosts: Vec<String> = settings
            .token_realm_hosts
            .iter()
            .map(|h| normal_host(h))
            .collect();
        if DOCKER_HUB_HOSTS.contains(&host.as_str()) {
            realm_hosts.push(DOCKER_HUB_REALM.to_string());
        }
        Ok(Inner {
            policy: Arc::new(Policy::new(&host, &realm_hosts)),
            realm_hosts: realm_hosts.into(),
            http: std::sync::OnceLock::new(),
            extra_roots: extra_roots(&settings)?,
            connect_timeout: settings.connect_timeout,
            base,
            response_timeout: settings.response_timeout,
            read_timeout: settings.read_timeout,
            max_retries: settings.max_retries,
            credentials: settings.credentials,
            metrics: settings.metrics,
            scheme: Mutex::new(None),
            tokens: TokenCache::default(),
        })
    }

    fn http(&self) -> &HttpClient {
        self.http.get_or_init(|| {
            build_http(&self.extra_roots, self.connect_timeout, self.policy.clone())
        })
    }

    pub fn read_timeout(&self) -> Duration {
        self.read_timeout
    }

    fn url(&self, path_and_query: &str) -> Result<Uri, UpstreamError> {
        Uri::builder()
            .scheme(self.base.scheme_str().unwrap_or("https"))
            .authority(
                self.base
                    .authority()
                    .map(|a| a.as_str())
                    .unwrap_or_default(),
            )
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| UpstreamError::Protocol(format!("bad request path: {e}")))
    }

    /// Runs `attempt` until it succeeds, fails for good, or `max_retries`
    /// retries are spent. Waits `Retry-After` (when the upstream sent one of
    /// at most [`MAX_RETRY_AFTER`]) or an exponential backoff with jitter.
    pub async fn with_retries<T, F, Fut>(&self, op: &Op, mut attempt: F) -> Result<T, UpstreamError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut retries = 0;
        loop {
            let failure = match attempt().await {
                Ok(v) => return Ok(v),
                Err(f) => f,
            };
            if retries >= self.max_retries || !failure.error.is_retryable() {
                return Err(failure.error);
            }
            let delay = match failure.retry_after {
                Some(d) if d > MAX_RETRY_AFTER => return Err(failure.error),
                Some(d) => d,
                None => backoff(retries),
            };
            tracing::debug!(
                method = %op.method,
                path = %op.path_and_query,
                error = %failure.error,
                retry = retries + 1,
                delay_ms = delay.as_millis() as u64,
                "retrying upstream request"
            );
            tokio::time::sleep(delay).await;
            retries += 1;
        }
    }

    /// Sends `op`, answering auth challenges and following redirects, and
    /// returns a successful response (any 2xx; for an `Op` without scope
    /// also a 401). Other statuses become errors.
    pub async fn execute(&self, op: &Op) -> Result<Response<Incoming>, Failure> {
        let mut uri = self.url(&op.path_and_query)?;
        let mut authz = match &op.scope {
            Some(scope) => self.preemptive_auth(scope).await?,
            None => None,
        };
        let mut challenged = false;
        let mut redirects = 0;
        loop {
            let origin = same_origin(&uri, &self.base);
            let mut req = Request::builder()
                .method(op.method.clone())
                .uri(uri.clone())
                .header(USER_AGENT, AGENT);
            for (k, v) in &op.headers {
                req = req.header(k, v);
            }
            if origin && let Some(a) = &authz {
                let mut v = HeaderValue::from_str(a.header.expose()).map_err(|_| {
                    UpstreamError::Protocol("credentials are not a valid header value".into())
                })?;
                v.set_sensitive(true);
                req = req.header(AUTHORIZATION, v);
            }
            let body = match &op.body {
                Some(b) => bytes_body(b.clone()),
                None => empty_body(),
            };
            let req = req
                .body(body)
                .map_err(|e| UpstreamError::Protocol(format!("building the request: {e}")))?;
            let resp = self.send(req).await?;
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            if status == StatusCode::UNAUTHORIZED && origin {
                let Some(scope) = &op.scope else {
                    return Ok(resp);
                };
                let scheme = resp
                    .headers()
                    .get_all(WWW_AUTHENTICATE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .filter_map(|v| parse_www_authenticate(v).ok())
                    .find_map(|c| AuthScheme::from_challenges(&c));
                if !challenged && let Some(scheme) = scheme {
                    challenged = true;
                    drain(resp.into_body(), self.read_timeout).await;
                    if let Some(rejected) = authz.as_ref().and_then(|a| a.token.as_ref()) {
                        self.tokens.invalidate(scope, rejected);
                    }
                    *self.scheme.lock().unwrap_or_else(|e| e.into_inner()) = Some(scheme.clone());
                    authz = Some(self.authorize(&scheme, scope).await?);
                    continue;
                }
                let msg = error_message(resp, self.read_timeout).await;
                return Err(UpstreamError::Unauthorized(msg).into());
            }
            if matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
                redirects += 1;
                if redirects > MAX_REDIRECTS {
                    return Err(UpstreamError::Protocol(format!(
                        "more than {MAX_REDIRECTS} redirects"
                    ))
                    .into());
                }
                let next = resp
                    .headers()
                    .get(LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| UpstreamError::Protocol(format!("{status} without Location")))
                    .and_then(|loc| resolve(&uri, loc))?;
                if uri.scheme_str() == Some("https") && next.scheme_str() != Some("https") {
                    return Err(UpstreamError::Protocol(
                        "refusing a redirect from https to http".into(),
                    )
                    .into());
                }
                drain(resp.into_body(), self.read_timeout).await;
                tracing::debug!(
                    from = %op.path_and_query,
                    to_host = next.host().unwrap_or_default(),
                    "following upstream redirect"
                );
                uri = next;
                continue;
            }
            return Err(status_failure(resp, self.read_timeout).await);
        }
    }

    /// Sends `op` once with a streamed body of `len` bytes: no retry, no
    /// redirect, no answer to a challenge (the stream cannot be replayed).
    /// Authorization is what earlier challenges taught for the op's scope
    /// (the caller opens the upload session with a bodiless request first).
    /// A 401 drops the rejected token, so a new attempt fetches a fresh one;
    /// the caller restarts from an offset the server confirms.
    pub async fn execute_stream(
        &self,
        op: &Op,
        body: ByteStream,
        len: u64,
    ) -> Result<Response<Incoming>, Failure> {
        let uri = self.url(&op.path_and_query)?;
        let authz = match &op.scope {
            Some(scope) => self.preemptive_auth(scope).await?,
            None => None,
        };
        let mut req = Request::builder()
            .method(op.method.clone())
            .uri(uri)
            .header(USER_AGENT, AGENT)
            .header(http::header::CONTENT_LENGTH, len);
        for (k, v) in &op.headers {
            req = req.header(k, v);
        }
        if let Some(a) = &authz {
            let mut v = HeaderValue::from_str(a.header.expose()).map_err(|_| {
                UpstreamError::Protocol("credentials are not a valid header value".into())
            })?;
            v.set_sensitive(true);
            req = req.header(AUTHORIZATION, v);
        }
        let req = req
            .body(stream_body(body))
            .map_err(|e| UpstreamError::Protocol(format!("building the request: {e}")))?;
        let resp = self.send(req).await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        if status == StatusCode::UNAUTHORIZED {
            if let (Some(scope), Some(token)) =
                (&op.scope, authz.as_ref().and_then(|a| a.token.as_ref()))
            {
                self.tokens.invalidate(scope, token);
            }
            let msg = error_message(resp, self.read_timeout).await;
            return Err(UpstreamError::Unauthorized(msg).into());
        }
        Err(status_failure(resp, self.read_timeout).await)
    }

    /// Authorization to send before any challenge, from what earlier
    /// challenges taught.
    async fn preemptive_auth(&self, scope: &str) -> Result<Option<Authorization>, UpstreamError> {
        let scheme = self
            .scheme
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match scheme {
            None => Ok(None),
            Some(AuthScheme::Basic) => Ok(self.credentials.as_ref().map(|c| Authorization {
                header: c.basic_header(),
                token: None,
            })),
            Some(scheme @ AuthScheme::Bearer { .. }) => {
                self.authorize(&scheme, scope).await.map(Some)
            }
        }
    }

    /// The `Authorization` value answering `scheme` for `scope`.
    async fn authorize(
        &self,
        scheme: &AuthScheme,
        scope: &str,
    ) -> Result<Authorization, UpstreamError> {
        match scheme {
            AuthScheme::Basic => self
                .credentials
                .as_ref()
                .map(|c| Authorization {
                    header: c.basic_header(),
                    token: None,
                })
                .ok_or_else(|| {
                    UpstreamError::Unauthorized(
                        "upstream requires Basic credentials and none are configured".into(),
                    )
                }),
            AuthScheme::Bearer {
                realm,
                service,
                scope: challenge_scope,
            } => {
                let mut scopes = vec![scope.to_string()];
                if let Some(s) = challenge_scope
                    && s != scope
                {
                    scopes.push(s.clone());
                }
                let fetch = TokenFetch {
                    http: self.http().clone(),
                    response_timeout: self.response_timeout,
                    read_timeout: self.read_timeout,
                    credentials: self.credentials.clone(),
                    realm: realm.clone(),
                    service: service.clone(),
                    scopes,
                    base: self.base.clone(),
                    realm_hosts: self.realm_hosts.clone(),
                };
                let token = self
                    .tokens
                    .get_or_fetch(scope, move || fetch.run().boxed())
                    .await?;
                Ok(Authorization {
                    header: Secret::new(format!("Bearer {}", token.expose())),
                    token: Some(token),
                })
            }
        }
    }

    /// One bodiless request to `path_and_query`, without auth or retries;
    /// returns the status and a body of at most 1 MiB whatever the status
    /// (for wharf's own operations API).
    pub async fn call(
        &self,
        method: Method,
        path_and_query: &str,
    ) -> Result<(StatusCode, Bytes), UpstreamError> {
        let req = Request::builder()
            .method(method)
            .uri(self.url(path_and_query)?)
            .header(USER_AGENT, AGENT)
            .body(empty_body())
            .map_err(|e| UpstreamError::Protocol(format!("building the request: {e}")))?;
        let resp = self.send(req).await?;
        let status = resp.status();
        let body = read_body(resp.into_body(), 1 << 20, self.read_timeout).await?;
        Ok((status, body))
    }

    async fn send(&self, req: Request<ReqBody>) -> Result<Response<Incoming>, UpstreamError> {
        let sent = send(self.http(), req, self.response_timeout).await;
        let outcome = match &sent {
            Ok(resp) => Ok(resp.status().as_u16()),
            Err(UpstreamError::Timeout(_)) => Err("timeout"),
            Err(UpstreamError::Connect(_)) => Err("connect"),
            Err(UpstreamError::Tls(_)) => Err("tls"),
            Err(_) => Err("error"),
        };
        let host = self.base.authority().map_or("", |a| a.as_str());
        self.metrics.record(host, outcome);
        sent
    }
}

/// An `Authorization` header value, and the bearer token inside it.
struct Authorization {
    header: Secret,
    token: Option<Secret>,
}

/// One request to a token realm.
struct TokenFetch {
    http: HttpClient,
    response_timeout: Duration,
    read_timeout: Duration,
    credentials: Option<Credentials>,
    realm: String,
    service: Option<String>,
    scopes: Vec<String>,
    /// The upstream.
    base: Uri,
    /// Hosts besides the upstream's that may be its token realm.
    realm_hosts: Arc<[String]>,
}

impl TokenFetch {
    async fn run(self) -> Result<Token, UpstreamError> {
        let mut url = self.realm.clone();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        let mut add = |k: &str, v: &str| {
            url.push(sep);
            url.push_str(k);
            url.push('=');
            url.push_str(&super::query_value(v));
            sep = '&';
        };
        if let Some(service) = &self.service {
            add("service", service);
        }
        for scope in &self.scopes {
            add("scope", scope);
        }
        let uri: Uri = url
            .parse()
            .map_err(|e| UpstreamError::Protocol(format!("bad token realm: {e}")))?;
        realm_allowed(
            &uri,
            &self.base,
            &self.realm_hosts,
            self.credentials.is_some(),
        )?;
        tracing::debug!(
            realm_host = uri.host().unwrap_or_default(),
            scopes = ?self.scopes,
            with_credentials = self.credentials.is_some(),
            "fetching upstream token"
        );
        let mut req = Request::get(uri)
            .header(USER_AGENT, AGENT)
            .header(http::header::ACCEPT, "application/json");
        if let Some(c) = &self.credentials {
            let mut v = HeaderValue::from_str(c.basic_header().expose()).map_err(|_| {
                UpstreamError::Protocol("credentials are not a valid header value".into())
            })?;
            v.set_sensitive(true);
            req = req.header(AUTHORIZATION, v);
        }
        let req = req
            .body(empty_body())
            .map_err(|e| UpstreamError::Protocol(format!("building the token request: {e}")))?;
        let resp = send(&self.http, req, self.response_timeout).await?;
        let status = resp.status();
        if status.is_success() {
            let body = read_body(resp.into_body(), MAX_TOKEN_RESPONSE, self.read_timeout).await?;
            let parsed: TokenResponse = serde_json::from_slice(&body)
                .map_err(|e| UpstreamError::Protocol(format!("bad token response: {e}")))?;
            return parsed.into_token(Instant::now(), SystemTime::now());
        }
        match status.as_u16() {
            401 => Err(UpstreamError::Unauthorized(format!(
                "token realm rejected the request: {}",
                error_message(resp, self.read_timeout).await
            ))),
            404 => Err(UpstreamError::Status {
                status: 404,
                message: "token realm not found".into(),
            }),
            _ => Err(status_failure(resp, self.read_timeout).await.error),
        }
    }
}

/// Docker Hub's registry hosts, whose token realm is [`DOCKER_HUB_REALM`].
const DOCKER_HUB_HOSTS: &[&str] = &[
    "docker.io",
    "registry-1.docker.io",
    "index.docker.io",
    "registry.docker.io",
];
const DOCKER_HUB_REALM: &str = "auth.docker.io";

/// Whether a token may be fetched from `realm` for the upstream `base`: the
/// realm is on the upstream's host (any port) or on one of `realm_hosts`,
/// with or without credentials (wharf contacts no host its configuration
/// does not name). Credentials go over plain http only to the upstream's
/// own host, and only when the upstream itself is plain http.
fn realm_allowed(
    realm: &Uri,
    base: &Uri,
    realm_hosts: &[String],
    with_credentials: bool,
) -> Result<(), UpstreamError> {
    let host = normal_host(realm.host().unwrap_or_default());
    let same_host = host == normal_host(base.host().unwrap_or_default());
    if !same_host && !realm_hosts.contains(&host) {
        return Err(UpstreamError::Refused(format!(
            "the token realm {host} is neither the upstream's host nor one of its \
             `token_realm_hosts`"
        )));
    }
    match realm.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if !with_credentials => Ok(()),
        Some("http") if same_host && base.scheme_str() == Some("http") => Ok(()),
        Some("http") => Err(UpstreamError::Refused(format!(
            "not sending credentials over plain http to the token realm {host}"
        ))),
        _ => Err(UpstreamError::Protocol(
            "token realm is not an http(s) URL".into(),
        )),
    }
}

/// Resolves a `Location` against the request URI.
fn resolve(base: &Uri, location: &str) -> Result<Uri, UpstreamError> {
    let bad = |e: &dyn std::fmt::Display| {
        UpstreamError::Protocol(format!("bad Location {location:?}: {e}"))
    };
    let loc: Uri = location.parse().map_err(|e| bad(&e))?;
    if loc.scheme().is_some() {
        if loc.authority().is_none() {
            return Err(bad(&"no host"));
        }
        return Ok(loc);
    }
    let (scheme, authority) = (
        base.scheme_str().unwrap_or("https"),
        base.authority().map(|a| a.as_str()).unwrap_or_default(),
    );
    let path = if let Some(rest) = location.strip_prefix("//") {
        // Scheme-relative.
        return format!("{scheme}://{rest}").parse().map_err(|e| bad(&e));
    } else if location.starts_with('/') {
        location.to_string()
    } else {
        // Relative to the current path's directory.
        let dir = base.path().rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        format!("{dir}/{location}")
    };
    Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|e| bad(&e))
}

/// Sends one request, bounded by `timeout` until the response headers.
async fn send(
    http: &HttpClient,
    req: Request<ReqBody>,
    timeout: Duration,
) -> Result<Response<Incoming>, UpstreamError> {
    match tokio::time::timeout(timeout, http.request(req)).await {
        Err(_) => Err(UpstreamError::Timeout("waiting for response headers")),
        Ok(Err(e)) => Err(map_client_error(&e)),
        Ok(Ok(resp)) => Ok(resp),
    }
}

/// Every error in a chain, looking inside `io::Error`s (whose `source()`
/// skips the error they wrap).
fn error_chain<'a>(top: &'a (dyn StdError + 'static)) -> Vec<&'a (dyn StdError + 'static)> {
    let mut out = Vec::new();
    let mut next = Some(top);
    while let Some(e) = next {
        out.push(e);
        next = match e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => e.source(),
        };
    }
    out
}

fn chain_message(chain: &[&(dyn StdError + 'static)]) -> String {
    let mut parts: Vec<String> = Vec::new();
    for e in chain {
        let s = e.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

fn map_client_error(e: &hyper_util::client::legacy::Error) -> UpstreamError {
    let chain = error_chain(e);
    if let Some(refused) = chain.iter().find_map(|e| e.downcast_ref::<Refused>()) {
        return UpstreamError::Refused(refused.0.clone());
    }
    if let Some(tls) = chain.iter().find_map(|e| e.downcast_ref::<rustls::Error>()) {
        return UpstreamError::Tls(tls.to_string());
    }
    let timed_out = chain
        .iter()
        .filter_map(|e| e.downcast_ref::<io::Error>())
        .any(|io| io.kind() == io::ErrorKind::TimedOut);
    let msg = chain_message(&chain[1..]);
    if e.is_connect() {
        if timed_out {
            UpstreamError::Timeout("connecting")
        } else {
            UpstreamError::Connect(msg)
        }
    } else {
        UpstreamError::Connect(format!("connection failed before the response: {msg}"))
    }
}

/// Turns a non-success response into the matching error.
async fn status_failure(resp: Response<Incoming>, read_timeout: Duration) -> Failure {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    let error = match status {
        404 => {
            drain(resp.into_body(), read_timeout).await;
            UpstreamError::NotFound
        }
        429 => {
            drain(resp.into_body(), read_timeout).await;
            UpstreamError::TooManyRequests { retry_after }
        }
        403 => UpstreamError::Denied(error_message(resp, read_timeout).await),
        401 => UpstreamError::Unauthorized(error_message(resp, read_timeout).await),
        _ => UpstreamError::Status {
            status,
            message: error_message(resp, read_timeout).await,
        },
    };
    Failure { error, retry_after }
}

/// A readable message from an error response: the OCI error body's first
/// code and message, a token realm's `details`, or the text itself.
async fn error_message(resp: Response<Incoming>, read_timeout: Duration) -> String {
    let status = resp.status();
    let fallback = || status.canonical_reason().unwrap_or("error").to_string();
    let Ok(body) = read_body(resp.into_body(), SMALL_BODY, read_timeout).await else {
        return fallback();
    };
    #[derive(serde::Deserialize)]
    struct OciError {
        #[serde(default)]
        code: Option<String>,
        #[serde(default)]
        message: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Body {
        #[serde(default)]
        errors: Vec<OciError>,
        #[serde(default)]
        details: Option<String>,
        #[serde(default)]
        message: Option<String>,
        #[serde(default)]
        error: Option<String>,
    }
    if let Ok(b) = serde_json::from_slice::<Body>(&body) {
        if let Some(e) = b.errors.first() {
            let parts: Vec<&str> = [e.code.as_deref(), e.message.as_deref()]
                .into_iter()
                .flatten()
                .filter(|s| !s.is_empty())
                .collect();
            if !parts.is_empty() {
                return parts.join(": ");
            }
        }
        if let Some(m) = b
            .details
            .or(b.message)
            .or(b.error)
            .filter(|m| !m.is_empty())
        {
            return m;
        }
    }
    let text = String::from_utf8_lossy(&body);
    let text: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(200)
        .collect();
    if text.is_empty() { fallback() } else { text }
}

/// Reads a whole body of at most `limit` bytes, waiting at most
/// `read_timeout` for each chunk.
pub async fn read_body(
    mut body: Incoming,
    limit: usize,
    read_timeout: Duration,
) -> Result<Bytes, UpstreamError> {
    let mut buf = BytesMut::new();
    loop {
        match tokio::time::timeout(read_timeout, body.frame()).await {
            Err(_) => return Err(UpstreamError::Timeout("reading the body")),
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(e))) => {
                return Err(UpstreamError::Connect(format!(
                    "connection lost while reading the body: {}",
                    chain_message(&error_chain(&e))
                )));
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    if buf.len() + data.len() > limit {
                        return Err(UpstreamError::TooLarge);
                    }
                    buf.extend_from_slice(&data);
                }
            }
        }
    }
}

/// Reads and discards a small body so the connection can be reused; a
/// large or slow one is dropped with its connection instead.
pub async fn drain(body: Incoming, read_timeout: Duration) {
    let _ = read_body(body, SMALL_BODY, read_timeout.min(Duration::from_secs(5))).await;
}

struct BodyState {
    body: Incoming,
    /// Bytes still to drop from the front (a 200 to a ranged request).
    skip: u64,
    /// Bytes the body still has to bring (from the blob's known size).
    remaining: u64,
    read_timeout: Duration,
    done: bool,
}

fn body_error(e: &hyper::Error) -> io::Error {
    let kind = if e.is_incomplete_message() {
        io::ErrorKind::UnexpectedEof
    } else {
        error_chain(e)
            .iter()
            .filter_map(|e| e.downcast_ref::<io::Error>())
            .map(|io| io.kind())
            .next()
            .unwrap_or(io::ErrorKind::Other)
    };
    io::Error::new(
        kind,
        format!("upstream body failed: {}", chain_message(&error_chain(e))),
    )
}

/// The body as a [`ByteStream`] of exactly `expected` bytes (before
/// skipping): it skips `skip` bytes, fails as soon as a chunk goes past
/// `expected` (an endless body is cut there, whatever the upstream
/// announced), and fails instead of ending when the body is shorter,
/// breaks, or stays silent for `read_timeout`.
pub fn body_stream(body: Incoming, skip: u64, expected: u64, read_timeout: Duration) -> ByteStream {
    let state = BodyState {
        body,
        skip,
        remaining: expected,
        read_timeout,
        done: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            match tokio::time::timeout(st.read_timeout, st.body.frame()).await {
                Err(_) => {
                    st.done = true;
                    let e = io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("upstream sent no data for {:?}", st.read_timeout),
                    );
                    return Some((Err(e), st));
                }
                Ok(None) => {
                    st.done = true;
                    if st.remaining > 0 || st.skip > 0 {
                        let e = io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "upstream body ended {} bytes before the blob's end",
                                st.remaining
                            ),
                        );
                        return Some((Err(e), st));
                    }
                    return None;
                }
                Ok(Some(Err(e))) => {
                    st.done = true;
                    return Some((Err(body_error(&e)), st));
                }
                Ok(Some(Ok(frame))) => {
                    let Ok(mut data) = frame.into_data() else {
                        continue;
                    };
                    let n = data.len() as u64;
                    if n > st.remaining {
                        st.done = true;
                        let e = io::Error::new(
                            io::ErrorKind::InvalidData,
                            "upstream body is longer than the blob",
                        );
                        return Some((Err(e), st));
                    }
                    st.remaining -= n;
                    if st.skip > 0 {
                        let n = st.skip.min(data.len() as u64);
                        data = data.slice(n as usize..);
                        st.skip -= n;
                    }
                    if data.is_empty() {
                        continue;
                    }
                    return Some((Ok(data), st));
                }
            }
        }
    })
    .boxed()
}

/// `Content-Range: bytes <start>-<end>/<total or *>` → (start, total).
pub fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.trim().split_once('-')?;
    let digits = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let (start, end) = (digits(start)?, digits(end)?);
    if end < start {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => {
            let t = digits(t)?;
            if end >= t {
                return None;
            }
            Some(t)
        }
    };
    Some((start, total))
}

/// Whether a `Link` header value (RFC 8288) has a `rel="next"` (or
/// `rel=next`) link.
pub fn link_has_next(v: &str) -> bool {
    link_next(v).is_some()
}

/// The target of the `rel="next"` link of a `Link` header value (RFC 8288).
/// `,` and `;` inside the `<URI-Reference>` or inside a quoted parameter
/// value are data, not separators.
pub fn link_next(v: &str) -> Option<String> {
    let mut chars = v.chars().peekable();
    loop {
        // Each link-value: `<uri>` then `; name=value` parameters.
        while chars.next_if(|c| *c == ',' || c.is_whitespace()).is_some() {}
        if chars.next() != Some('<') {
            return None;
        }
        let target: String = chars.by_ref().take_while(|c| *c != '>').collect();
        loop {
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            match chars.next() {
                Some(';') => {}
                Some(',') => break,
                _ => return None,
            }
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            let mut name = String::new();
            while let Some(c) =
                chars.next_if(|c| !matches!(c, '=' | ';' | ',') && !c.is_whitespace())
            {
                name.push(c);
            }
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            let mut value = String::new();
            if chars.next_if_eq(&'=').is_some() {
                while chars.next_if(|c| c.is_whitespace()).is_some() {}
                if chars.next_if_eq(&'"').is_some() {
                    loop {
                        match chars.next() {
                            Some('\\') => value.extend(chars.next()),
                            Some('"') => break,
                            Some(c) => value.push(c),
                            None => return None,
                        }
                    }
                } else {
                    while let Some(c) =
                        chars.next_if(|c| !matches!(c, ';' | ',') && !c.is_whitespace())
                    {
                        value.push(c);
                    }
                }
            }
            if name.eq_ignore_ascii_case("rel")
                && value
                    .split_whitespace()
                    .any(|r| r.eq_ignore_ascii_case("next"))
            {
                return Some(target);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 300-999/1000"),
            Some((300, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 0-0/*"), Some((0, None)));
        for bad in [
            "bytes 5-4/10",
            "bytes 0-10/10",
            "bytes */10",
            "items 0-1/2",
            "bytes -1-2/3",
            "",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn links() {
        assert!(link_has_next(r#"</v2/x/tags/list?n=2&last=b>; rel="next""#));
        assert!(link_has_next("</a>; rel=next"));
        assert!(link_has_next(r#"</a>; rel="prev", </b>; rel="next""#));
        assert!(!link_has_next(r#"</a>; rel="prev""#));
        assert!(!link_has_next(""));
    }

    // ---- properties ----

    use proptest::prelude::*;

    /// `start <= end < total`, over the whole u64 range and near zero.
    fn satisfied_range() -> impl Strategy<Value = (u64, u64, u64)> {
        prop_oneof![1u64..=u64::MAX, 1u64..64]
            .prop_flat_map(|total| (0..total, Just(total)))
            .prop_flat_map(|(end, total)| (0..=end, Just(end), Just(total)))
    }

    proptest! {
        #[test]
        fn content_range_round_trip((start, end, total) in satisfied_range()) {
            // The tuple is (first byte position, complete length if known).
            prop_assert_eq!(
                parse_content_range(&format!("bytes {start}-{end}/{total}")),
                Some((start, Some(total)))
            );
            prop_assert_eq!(
                parse_content_range(&format!("bytes {start}-{end}/*")),
                Some((start, None))
            );
        }

        #[test]
        fn content_range_rejects_inverted(end in 0u64..u64::MAX, d in 1u64..1 << 20, total in any::<u64>()) {
            let start = end.saturating_add(d);
            prop_assume!(start > end);
            prop_assert_eq!(parse_content_range(&format!("bytes {start}-{end}/{total}")), None);
            prop_assert_eq!(parse_content_range(&format!("bytes {start}-{end}/*")), None);
        }

        #[test]
        fn content_range_rejects_end_past_total(start in any::<u64>(), extra in any::<u64>(), short in 0u64..4) {
            // end >= total: the range does not fit the representation.
            let end = start.saturating_add(extra);
            let total = end.saturating_sub(short);
            prop_assert_eq!(parse_content_range(&format!("bytes {start}-{end}/{total}")), None);
        }

        #[test]
        fn content_range_rejects_overflow((start, end, total) in satisfied_range(), which in 0usize..3) {
            // A position past u64::MAX is refused, not wrapped.
            let mut parts = [start.to_string(), end.to_string(), total.to_string()];
            parts[which] = format!("{}0", u64::MAX);
            let [s, e, t] = parts;
            prop_assert_eq!(parse_content_range(&format!("bytes {s}-{e}/{t}")), None);
        }

        #[test]
        fn content_range_never_panics(s in ".{0,64}|bytes [0-9*/ +-]{0,40}") {
            if let Some((start, total)) = parse_content_range(&s)
                && let Some(total) = total {
                    prop_assert!(start < total);
                }
        }
    }

    /// Relation types, some next-like but not `next`.
    const RELS: &[&str] = &[
        "prev",
        "previous",
        "first",
        "last",
        "alternate",
        "self",
        "next-archive",
        "prev-archive",
        "nextpage",
        "nofollow",
    ];

    #[derive(Debug, Clone)]
    struct Link {
        target: String,
        /// Relation types of the `rel` param, if any.
        rel: Option<Vec<String>>,
        /// Whether `next` is among them (in some letter case).
        next: bool,
        /// Other params, rendered, and where the rel param goes among them.
        others: Vec<String>,
        rel_at: usize,
        quoted: bool,
        rel_key: String,
    }

    impl Link {
        fn render(&self) -> String {
            let mut params = self.others.clone();
            if let Some(rels) = &self.rel {
                let v = rels.join(" ");
                let p = if self.quoted || rels.len() != 1 {
                    format!("{}=\"{v}\"", self.rel_key)
                } else {
                    format!("{}={v}", self.rel_key)
                };
                params.insert(self.rel_at.min(params.len()), p);
            }
            let mut s = format!("<{}>", self.target);
            for p in params {
                s.push_str("; ");
                s.push_str(&p);
            }
            s
        }
    }

    fn link() -> impl Strategy<Value = Link> {
        let other = prop_oneof![
            // Quoted strings without `"`, `\\` (kept simple) or `;` `,`.
            "[ !#-+\\--:<-\\[\\]-~]{0,20}".prop_map(|v| format!("title=\"{v}\"")),
            Just("type=\"application/json\"".to_string()),
            Just("hreflang=en".to_string()),
            "[a-z/]{0,10}".prop_map(|v| format!("anchor=\"/{v}\"")),
        ];
        let rels = proptest::collection::vec(proptest::sample::select(RELS.to_vec()), 0..3);
        let next = prop_oneof![
            Just(None),
            Just(Some("next")),
            Just(Some("NEXT")),
            Just(Some("Next"))
        ];
        (
            "/v2/[a-z0-9/]{1,20}(\\?n=[0-9]{1,3}(&last=[A-Za-z0-9._-]{1,12})?)?",
            proptest::option::of((rels, next, any::<proptest::sample::Index>())),
            proptest::collection::vec(other, 0..3),
            any::<usize>(),
            any::<bool>(),
            proptest::sample::select(vec!["rel", "REL", "Rel"]),
        )
            .prop_map(|(target, rel, others, rel_at, quoted, rel_key)| {
                let (rel, next) = match rel {
                    None => (None, false),
                    Some((mut rels, next, at)) => {
                        let rels: Vec<String> = match next {
                            Some(n) => {
                                let i = at.index(rels.len() + 1);
                                rels.insert(i, n);
                                rels.into_iter().map(String::from).collect()
                            }
                            None if rels.is_empty() => vec!["prev".into()],
                            None => rels.into_iter().map(String::from).collect(),
                        };
                        (Some(rels), next.is_some())
                    }
                };
                Link {
                    target,
                    rel,
                    next,
                    others,
                    rel_at,
                    quoted,
                    rel_key: rel_key.into(),
                }
            })
    }

    fn join(links: &[Link], sep: &str) -> String {
        links.iter().map(Link::render).collect::<Vec<_>>().join(sep)
    }

    proptest! {
        #[test]
        fn link_next_found(links in proptest::collection::vec(link(), 0..5), sep in prop_oneof![Just(", "), Just(","), Just(" ,  ")]) {
            let expected = links.iter().any(|l| l.next);
            let header = join(&links, sep);
            prop_assert_eq!(link_has_next(&header), expected, "{}", header);
        }

        #[test]
        fn link_without_next(links in proptest::collection::vec(link(), 1..5)) {
            let links: Vec<Link> = links.into_iter().filter(|l| !l.next).collect();
            prop_assert!(!link_has_next(&join(&links, ", ")));
        }

        #[test]
        fn link_next_anywhere(mut links in proptest::collection::vec(link(), 0..4), at in any::<proptest::sample::Index>()) {
            // One rel="next" link among any others is enough.
            let next = "</v2/r/tags/list?n=2&last=b>; rel=\"next\"".to_string();
            let mut parts: Vec<String> = links.drain(..).map(|l| l.render()).collect();
            let i = at.index(parts.len() + 1);
            parts.insert(i, next);
            prop_assert!(link_has_next(&parts.join(", ")));
        }

        // `,` and `;` inside the URI or a quoted value are data.
        #[test]
        fn link_next_not_fooled_by_uri_or_quotes(
            links in proptest::collection::vec(link(), 0..3),
            path in "[a-z0-9/]{0,10}",
            trap in 0usize..4,
        ) {
            let links: Vec<Link> = links.into_iter().filter(|l| !l.next).collect();
            let trap = match trap {
                0 => format!("</v2/{path};rel=next;v=1>; rel=\"prev\""),
                1 => format!("</v2/{path};rel=next,v=1>; rel=\"prev\""),
                2 => format!("</v2/{path}>; rel=\"prev\"; title=\"x; rel=next\""),
                _ => format!("</v2/{path}>; rel=\"prev\"; title=\"x, </y>; rel=next\""),
            };
            let mut parts: Vec<String> = links.iter().map(Link::render).collect();
            parts.push(trap);
            let header = parts.join(", ");
            prop_assert!(!link_has_next(&header), "{}", header);
        }

        #[test]
        fn link_never_panics(s in ".{0,120}|[<>;,= \"a-zA-Z/]{0,60}") {
            let _ = link_has_next(&s);
        }
    }

    #[test]
    fn redirect_targets() {
        let base: Uri = "http://127.0.0.1:5000/v2/a/blobs/sha256:x".parse().unwrap();
        assert_eq!(
            resolve(&base, "https://cdn.example/data?sig=1")
                .unwrap()
                .to_string(),
            "https://cdn.example/data?sig=1"
        );
        assert_eq!(
            resolve(&base, "/other?x=1").unwrap().to_string(),
            "http://127.0.0.1:5000/other?x=1"
        );
        assert_eq!(
            resolve(&base, "sibling").unwrap().to_string(),
            "http://127.0.0.1:5000/v2/a/blobs/sibling"
        );
        assert_eq!(
            resolve(&base, "//cdn.example/p").unwrap().to_string(),
            "http://cdn.example/p"
        );
        assert!(resolve(&base, "http://").is_err());
    }

    #[test]
    fn token_realms_stay_inside_the_upstreams_trust_boundary() {
        let realm = |s: &str| -> Uri { s.parse().unwrap() };
        let hub = Inner::new(UpstreamSettings::new(
            "https://registry-1.docker.io".parse().unwrap(),
        ))
        .unwrap();
        // Docker Hub's realm is allowed without configuration, for Docker
        // Hub only.
        for creds in [true, false] {
            assert!(
                realm_allowed(
                    &realm("https://auth.docker.io/token"),
                    &hub.base,
                    &hub.realm_hosts,
                    creds
                )
                .is_ok()
            );
        }
        let other =
            Inner::new(UpstreamSettings::new("https://r.example".parse().unwrap())).unwrap();
        let refused = |r: &str, inner: &Inner, creds: bool| {
            matches!(
                realm_allowed(&realm(r), &inner.base, &inner.realm_hosts, creds),
                Err(UpstreamError::Refused(_))
            )
        };
        assert!(refused("https://auth.docker.io/token", &other, false));
        assert!(refused("https://evil.example/token", &hub, true));
        assert!(refused("https://evil.example/token", &hub, false));
        // The upstream's own host, any port.
        assert!(
            realm_allowed(
                &realm("https://r.example:8443/t"),
                &other.base,
                &other.realm_hosts,
                true
            )
            .is_ok()
        );
        // A downgrade to http with credentials, even on the same host.
        assert!(refused("http://r.example/token", &other, true));
        assert!(
            realm_allowed(
                &realm("http://r.example/token"),
                &other.base,
                &other.realm_hosts,
                false
            )
            .is_ok()
        );
        // Listed hosts, case-insensitively.
        let mut s = UpstreamSettings::new("http://127.0.0.1:5000".parse().unwrap());
        s.token_realm_hosts = vec!["Auth.Example".into()];
        let listed = Inner::new(s).unwrap();
        assert!(
            realm_allowed(
                &realm("https://auth.example/t"),
                &listed.base,
                &listed.realm_hosts,
                true
            )
            .is_ok()
        );
        // Over plain http only to the (plain http) upstream's own host.
        assert!(refused("http://auth.example/t", &listed, true));
        assert!(
            realm_allowed(
                &realm("http://auth.example/t"),
                &listed.base,
                &listed.realm_hosts,
                false
            )
            .is_ok()
        );
        assert!(
            realm_allowed(
                &realm("http://127.0.0.1:5001/t"),
                &listed.base,
                &listed.realm_hosts,
                true
            )
            .is_ok()
        );
    }

    #[test]
    fn origins() {
        let base: Uri = "https://r.example/".parse().unwrap();
        assert!(same_origin(
            &"https://r.example/v2/".parse().unwrap(),
            &base
        ));
        assert!(!same_origin(
            &"https://r.example:444/v2/".parse().unwrap(),
            &base
        ));
        assert!(!same_origin(
            &"http://r.example/v2/".parse().unwrap(),
            &base
        ));
        assert!(!same_origin(
            &"https://cdn.example/v2/".parse().unwrap(),
            &base
        ));
    }
}

/// The waits between retries, on tokio's paused clock (no socket: a client
/// over a real socket cannot run on a paused clock, whose auto-advance fires
/// the response timeout while bytes are in flight).
#[cfg(test)]
mod retry_waits {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn inner(max_retries: u32) -> Inner {
        let mut s = UpstreamSettings::new("http://127.0.0.1:9".parse().unwrap());
        s.max_retries = max_retries;
        Inner::new(s).unwrap()
    }

    fn op() -> Op {
        Op::new(Method::GET, "/v2/r/manifests/t".into(), None)
    }

    fn too_many(after: Option<Duration>) -> Failure {
        UpstreamError::TooManyRequests { retry_after: after }.into()
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_waited_exactly_then_the_request_is_sent_again() {
        let c = inner(3);
        let calls = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let r = c
            .with_retries(&op(), || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    match n {
                        0 | 1 => Err(too_many(Some(Duration::from_secs(7)))),
                        _ => Ok(n),
                    }
                }
            })
            .await;
        assert_eq!(r.unwrap(), 2);
        assert_eq!(start.elapsed(), Duration::from_secs(14), "two waits of 7 s");
    }

    #[tokio::test(start_paused = true)]
    async fn without_retry_after_the_backoff_grows_and_the_retries_end() {
        let c = inner(2);
        let calls = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let err = c
            .with_retries(&op(), || {
                calls.fetch_add(1, Ordering::SeqCst);
                async {
                    Err::<(), _>(Failure::from(UpstreamError::Status {
                        status: 503,
                        message: String::new(),
                    }))
                }
            })
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamError::Status { status: 503, .. }));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "the first try and 2 retries"
        );
        // backoff(0) + backoff(1): 100..200 ms + 200..400 ms.
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited <= Duration::from_millis(600),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_beyond_the_limit_ends_the_attempts_without_waiting() {
        let c = inner(3);
        let calls = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let far = crate::upstream::retry::MAX_RETRY_AFTER + Duration::from_secs(1);
        let err = c
            .with_retries(&op(), || {
                calls.fetch_add(1, Ordering::SeqCst);
                async move { Err::<(), _>(too_many(Some(far))) }
            })
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamError::TooManyRequests { .. }));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
