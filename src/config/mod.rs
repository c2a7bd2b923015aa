//! Configuration: TOML file → environment overrides → typed, validated
//! [`Config`]. Unknown keys and bad values are refused with their key path.
//!
//! Every key has a default, so wharf runs with no file at all. Environment
//! variables `WHARF_<SECTION>_<KEY>` (for example `WHARF_SERVER_LISTEN`)
//! override the file; the full list is [`ENV_OVERRIDES`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::oci::RepoName;
use crate::oci::manifest::Platform;
use crate::oci::name::TagPattern;

/// A string deserialized through `T::from_str`. Values are parsed once,
/// here, into the types the rest of wharf uses; a bad one is refused with
/// its key path and the parser's reason.
struct Parsed<T>(T);

impl<'de, T> Deserialize<'de> for Parsed<T>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(Parsed).map_err(serde::de::Error::custom)
    }
}

fn parsed<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    Ok(Parsed::<T>::deserialize(d)?.0)
}

/// [`parsed`] for an optional value.
fn parsed_opt<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    Ok(Option::<Parsed<T>>::deserialize(d)?.map(|p| p.0))
}

/// [`parsed`] for a list (the key path names the element).
fn parsed_vec<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    Ok(Vec::<Parsed<T>>::deserialize(d)?
        .into_iter()
        .map(|p| p.0)
        .collect())
}

/// Where a pull-through rule serves: `ROOT` (every repository that is not
/// hosted) or a repository namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RulePrefix {
    Root,
    Namespace(RepoName),
}

impl RulePrefix {
    pub fn namespace(&self) -> Option<&RepoName> {
        match self {
            RulePrefix::Root => None,
            RulePrefix::Namespace(n) => Some(n),
        }
    }
}

impl std::str::FromStr for RulePrefix {
    type Err = String;
    fn from_str(s: &str) -> Result<RulePrefix, String> {
        if s == "ROOT" {
            return Ok(RulePrefix::Root);
        }
        s.parse()
            .map(RulePrefix::Namespace)
            .map_err(|e| format!("must be ROOT or a repository namespace: {e}"))
    }
}

impl std::fmt::Display for RulePrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RulePrefix::Root => f.write_str("ROOT"),
            RulePrefix::Namespace(n) => f.write_str(n.as_str()),
        }
    }
}

/// An upstream registry's base URL: `http(s)://host[:port]`, no path, no
/// query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl(http::Uri);

impl UpstreamUrl {
    pub fn uri(&self) -> &http::Uri {
        &self.0
    }
}

impl std::str::FromStr for UpstreamUrl {
    type Err = String;
    fn from_str(url: &str) -> Result<UpstreamUrl, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
        let scheme_ok = matches!(uri.scheme_str(), Some("http") | Some("https"));
        let path_ok = matches!(uri.path(), "" | "/") && uri.query().is_none();
        if !scheme_ok || uri.authority().is_none() || !path_ok {
            return Err("must be http(s)://host[:port] with no path".to_string());
        }
        Ok(UpstreamUrl(uri))
    }
}

impl std::fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.0.to_string();
        f.write_str(s.strip_suffix('/').unwrap_or(&s))
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    /// Pull-through cache rules. Absent: the built-in rules
    /// ([`default_rules`]); `pull_through = []` disables the cache.
    #[serde(default = "default_rules")]
    pub pull_through: Vec<PullThroughRule>,
    /// Push replication to other registries.
    #[serde(default)]
    pub replication: ReplicationConfig,
    /// Scheduled pull sync of upstream repositories into hosted ones.
    #[serde(default)]
    pub sync: Vec<SyncConfig>,
}

/// Keeps local hosted copies of upstream repositories fresh.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// Base URL of the upstream registry (`https://host[:port]`).
    #[serde(deserialize_with = "parsed")]
    pub upstream: UpstreamUrl,
    #[serde(default)]
    pub credentials: Option<CredentialsConfig>,
    /// Extra PEM CA certificate trusted for this upstream.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Hosts besides the registry's own that may be its token realm (the
    /// host a Bearer challenge sends wharf to for a token). A realm on
    /// another host is refused, with or without credentials;
    /// `auth.docker.io` is allowed for Docker Hub without being listed.
    #[serde(default)]
    pub token_realm_hosts: Vec<String>,
    /// Repository names upstream.
    #[serde(deserialize_with = "parsed_vec")]
    pub repositories: Vec<RepoName>,
    /// Prepended to each name locally (`<local_prefix>/<repository>`).
    #[serde(default, deserialize_with = "parsed_opt")]
    pub local_prefix: Option<RepoName>,
    /// Tag patterns: globs (`1.*`), or regular expressions after `regex:`.
    /// None: every tag.
    #[serde(default, deserialize_with = "parsed_vec")]
    pub tags: Vec<TagPattern>,
    /// Platforms (`os/arch[/variant]`) kept from multi-platform indexes.
    /// None: every platform, with the upstream's digests.
    #[serde(default, deserialize_with = "parsed_vec")]
    pub platforms: Vec<Platform>,
    /// Time between passes (the first runs at start).
    #[serde(default = "default_sync_interval", with = "humantime_serde")]
    pub interval: Duration,
}

impl SyncConfig {
    /// The local name of upstream repository `r`:
    /// `<local_prefix>/<r>`, or `r`.
    pub fn local_name(&self, r: &RepoName) -> Result<RepoName, String> {
        match &self.local_prefix {
            Some(p) => format!("{p}/{r}").parse().map_err(|e| format!("{e}")),
            None => Ok(r.clone()),
        }
    }
}

fn default_sync_interval() -> Duration {
    Duration::from_secs(3600)
}

/// Replication: rules pick repositories by prefix and send them to
/// destinations (other regions or accounts).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    #[serde(default)]
    pub destinations: Vec<DestinationConfig>,
    #[serde(default)]
    pub rules: Vec<ReplicationRule>,
    /// How often every rule's repositories are compared with each
    /// destination, and what is missing or different is enqueued. `0s`
    /// turns the periodic comparison off (`wharf replication sync` still
    /// runs it on demand).
    #[serde(default = "default_reconcile_interval", with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// With S3 storage, where the queue is shared by every replica: how
    /// long a replica's hold on a running job lasts unless renewed (it is
    /// renewed at a third of that). A lost replica's jobs are taken over by
    /// another one this long after it stopped renewing.
    #[serde(default = "default_job_lease", with = "humantime_serde")]
    pub job_lease: Duration,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            destinations: Vec::new(),
            rules: Vec::new(),
            reconcile_interval: default_reconcile_interval(),
            job_lease: default_job_lease(),
        }
    }
}

/// A registry that receives replicated content.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// Referenced by rules, shown in status and metrics.
    pub name: String,
    /// `https://host[:port]` (`http://` only with `insecure`, on loopback).
    #[serde(deserialize_with = "parsed")]
    pub url: UpstreamUrl,
    /// Informational: the destination's region.
    #[serde(default)]
    pub region: Option<String>,
    /// Informational: the destination's account (ECR registry id).
    #[serde(default)]
    pub registry_id: Option<String>,
    /// Basic credentials, or the username and secret sent to the token
    /// realm of the registry token flow; absent: anonymous.
    #[serde(default)]
    pub credentials: Option<CredentialsConfig>,
    /// Prepended to every repository name at the destination
    /// (`prod/app` → `<prefix>/prod/app`).
    #[serde(default, deserialize_with = "parsed_opt")]
    pub repository_prefix: Option<RepoName>,
    /// Extra PEM CA certificate trusted for this destination.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Hosts besides the registry's own that may be its token realm (the
    /// host a Bearer challenge sends wharf to for a token). A realm on
    /// another host is refused, with or without credentials;
    /// `auth.docker.io` is allowed for Docker Hub without being listed.
    #[serde(default)]
    pub token_realm_hosts: Vec<String>,

    /// Allows a plain `http://` URL; only for a loopback address.
    #[serde(default)]
    pub insecure: bool,
    /// Jobs of this destination running at once.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// Blobs are sent in `PATCH` chunks of at most this size.
    #[serde(default = "default_chunk_size")]
    pub chunk_size: bytesize::ByteSize,
    /// Attempts of a job that failed through its own fault (not the
    /// destination being unreachable) before it is FAILED.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First delay after a failure; doubled each time (with jitter).
    #[serde(default = "default_retry_initial", with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Longest delay between attempts (and between probes of a destination
    /// that is down).
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
}

/// Which repositories go where.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationRule {
    /// Repository filters (PREFIX_MATCH); none means every repository.
    #[serde(default)]
    pub filters: Vec<RepositoryFilter>,
    /// Names of `[[replication.destinations]]`.
    pub destinations: Vec<String>,
    /// Also replicate repositories filled by the pull-through cache.
    #[serde(default)]
    pub include_pulled_through: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryFilter {
    /// Repositories whose name starts with this string.
    pub prefix: String,
}

fn default_reconcile_interval() -> Duration {
    Duration::from_secs(3600)
}
fn default_job_lease() -> Duration {
    Duration::from_secs(30)
}
fn default_max_concurrency() -> usize {
    4
}
fn default_chunk_size() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(16)
}
fn default_max_attempts() -> u32 {
    10
}
fn default_retry_initial() -> Duration {
    Duration::from_secs(1)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(600)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Budget for content pulled through the cache (pushed content is not
    /// counted).
    #[serde(default = "default_cache_max_size")]
    pub max_size: bytesize::ByteSize,
    /// Serving a manifest starts background fills of the blobs it names.
    #[serde(default)]
    pub prefetch: bool,
    /// A client waiting on a fill gives up when no byte arrives for this long.
    #[serde(default = "default_fill_wait_timeout", with = "humantime_serde")]
    pub fill_wait_timeout: Duration,
    /// A fill older than this no longer takes new waiters; a new one starts.
    #[serde(default = "default_fill_max_age", with = "humantime_serde")]
    pub fill_max_age: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_size: default_cache_max_size(),
            prefetch: false,
            fill_wait_timeout: default_fill_wait_timeout(),
            fill_max_age: default_fill_max_age(),
        }
    }
}

/// One pull-through rule: `<prefix>/<repo>` is served from
/// `<upstream>/<upstream_prefix>/<repo>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullThroughRule {
    /// Local namespace, e.g. `docker-hub`, or `ROOT` for every repository
    /// that is not hosted (the Docker daemon mirror case).
    #[serde(deserialize_with = "parsed")]
    pub prefix: RulePrefix,
    /// Base URL of the upstream registry (`https://host[:port]`).
    #[serde(deserialize_with = "parsed")]
    pub upstream: UpstreamUrl,
    /// Namespace prepended upstream, e.g. `myorg`.
    #[serde(default, deserialize_with = "parsed_opt")]
    pub upstream_prefix: Option<RepoName>,
    /// A manifest fetched by tag is served without asking upstream for this long.
    #[serde(default = "default_tag_ttl", with = "humantime_serde")]
    pub tag_ttl: Duration,
    /// When upstream is down, a cached tag is served this long after its
    /// last successful check.
    #[serde(default = "default_max_stale", with = "humantime_serde")]
    pub max_stale: Duration,
    #[serde(default)]
    pub credentials: Option<CredentialsConfig>,
    /// Extra PEM CA certificate trusted for this upstream.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Hosts besides the registry's own that may be its token realm (the
    /// host a Bearer challenge sends wharf to for a token). A realm on
    /// another host is refused, with or without credentials;
    /// `auth.docker.io` is allowed for Docker Hub without being listed.
    #[serde(default)]
    pub token_realm_hosts: Vec<String>,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default = "default_response_timeout", with = "humantime_serde")]
    pub response_timeout: Duration,
    #[serde(default = "default_read_timeout", with = "humantime_serde")]
    pub read_timeout: Duration,
}

/// Upstream credentials; the secret comes from an environment variable or a
/// file, never from the configuration itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsConfig {
    pub username: String,
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// The rules wharf ships with: Docker Hub (also as ROOT, so wharf works as
/// a Docker daemon mirror out of the box), GHCR, Quay, registry.k8s.io and
/// ECR Public.
pub fn default_rules() -> Vec<PullThroughRule> {
    [
        ("docker-hub", "https://registry-1.docker.io"),
        ("ROOT", "https://registry-1.docker.io"),
        ("ghcr", "https://ghcr.io"),
        ("quay", "https://quay.io"),
        ("k8s", "https://registry.k8s.io"),
        ("ecr-public", "https://public.ecr.aws"),
    ]
    .into_iter()
    .map(|(prefix, upstream)| PullThroughRule {
        prefix: prefix.parse().expect("a default rule's prefix"),
        upstream: upstream.parse().expect("a default rule's upstream"),
        upstream_prefix: None,
        tag_ttl: default_tag_ttl(),
        max_stale: default_max_stale(),
        credentials: None,
        ca_file: None,
        token_realm_hosts: Vec::new(),
        connect_timeout: default_connect_timeout(),
        response_timeout: default_response_timeout(),
        read_timeout: default_read_timeout(),
    })
    .collect()
}

fn default_cache_max_size() -> bytesize::ByteSize {
    bytesize::ByteSize::gib(50)
}
fn default_fill_wait_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_fill_max_age() -> Duration {
    Duration::from_secs(3600)
}
fn default_tag_ttl() -> Duration {
    Duration::from_secs(600)
}
fn default_max_stale() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_response_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_read_timeout() -> Duration {
    Duration::from_secs(60)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address and port to listen on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Serve HTTPS (HTTP/1.1 and HTTP/2 by ALPN) with this certificate and key.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// How long in-flight requests may run after SIGTERM/SIGINT.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// A client must send its request headers within this time.
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Largest request head (request line plus headers) accepted; larger
    /// gets 431.
    #[serde(default = "default_max_header_size")]
    pub max_header_size: bytesize::ByteSize,
    /// A request body that sends no bytes for this long fails, and its
    /// connection is closed.
    #[serde(default = "default_body_read_timeout", with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Connections served at once; more are answered 503 and closed.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// `text` (human) or `json` logs.
    #[serde(default)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Storage backend: `filesystem` or `s3`.
    #[serde(rename = "type", default)]
    pub kind: StorageKind,
    /// Data directory of the filesystem backend; with `s3`, local scratch
    /// space only (staging files of pull-through fills).
    #[serde(default = "default_path")]
    pub path: PathBuf,
    /// The bucket of the `s3` backend; required with `type = "s3"` and
    /// refused otherwise.
    #[serde(default)]
    pub s3: Option<S3Config>,
    /// Upload sessions idle for longer than this are purged.
    #[serde(default = "default_upload_max_age", with = "humantime_serde")]
    pub upload_max_age: Duration,
    /// How often to look for abandoned uploads.
    #[serde(default = "default_upload_purge_interval", with = "humantime_serde")]
    pub upload_purge_interval: Duration,
    /// Upload sessions open at once; a new one beyond answers 429.
    #[serde(default = "default_max_upload_sessions")]
    pub max_upload_sessions: usize,
}

fn default_max_upload_sessions() -> usize {
    10_000
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    #[default]
    Filesystem,
    S3,
}

/// An S3-compatible bucket (AWS S3, SeaweedFS, MinIO, Ceph RGW) shared by
/// every replica: blobs, upload sessions and metadata all live in it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Bucket name (it must exist).
    pub bucket: String,
    /// Key prefix inside the bucket, e.g. `wharf/prod` (no leading or
    /// trailing `/`). Empty: the bucket's root.
    #[serde(default)]
    pub prefix: String,
    /// `http(s)://host[:port]` of an S3-compatible service; absent: AWS S3
    /// in `region`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Signing region.
    #[serde(default = "default_s3_region")]
    pub region: String,
    /// Path-style requests (`endpoint/bucket/key`), which most
    /// self-hosted stores need; `false`: virtual-hosted style
    /// (`bucket.endpoint/key`).
    #[serde(default = "default_true")]
    pub path_style: bool,
    /// Static credentials; absent: the standard AWS chain (`AWS_*`
    /// environment variables, web identity, container or instance
    /// credentials).
    #[serde(default)]
    pub credentials: Option<S3Credentials>,
    /// Extra PEM CA bundle trusted for the endpoint (in addition to the
    /// system roots). Absent: `AWS_CA_BUNDLE` when set.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Connecting to the store must take no longer than this.
    #[serde(default = "default_s3_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest silence inside a response from the store (there is no
    /// bound on a whole request: blobs stream for as long as they need).
    #[serde(default = "default_s3_read_timeout", with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Blob GETs of hosted repositories answer 307 with a presigned URL of
    /// the store, so the bytes flow from the store and not through wharf.
    /// The endpoint must then be reachable by the clients.
    #[serde(default)]
    pub redirect: bool,
    /// How long a presigned URL stays valid.
    #[serde(default = "default_redirect_ttl", with = "humantime_serde")]
    pub redirect_ttl: Duration,
    /// Size of a local-disk tier in front of the bucket (under
    /// `storage.path`/hot): blobs read are copied there, verified, and
    /// evicted least recently read first. Absent: no tier.
    #[serde(default)]
    pub hot_tier_max_size: Option<bytesize::ByteSize>,
    /// Pull-through with several replicas: how long the lease of a fill
    /// (the one replica fetching a blob from upstream for the cluster)
    /// lasts unless renewed. Its holder renews it every third of it, while
    /// bytes arrive or not; when a holder dies, another replica takes the
    /// fill over this long after it stopped renewing.
    #[serde(default = "default_fill_lease", with = "humantime_serde")]
    pub fill_lease: Duration,
}

/// Static S3 credentials. The key id may be written inline; the secret
/// comes only from an environment variable or a file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Credentials {
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub access_key_id_env: Option<String>,
    #[serde(default)]
    pub secret_access_key_env: Option<String>,
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
}

impl S3Credentials {
    /// The key id and secret, read from their variables or file.
    pub fn resolve(&self) -> Result<(String, String), String> {
        let id = match (&self.access_key_id, &self.access_key_id_env) {
            (Some(id), None) => id.clone(),
            (None, Some(var)) => std::env::var(var).map_err(|_| {
                format!("environment variable {var} (access_key_id_env) is not set")
            })?,
            _ => return Err("set exactly one of access_key_id and access_key_id_env".into()),
        };
        let secret = match (&self.secret_access_key_env, &self.secret_access_key_file) {
            (Some(var), None) => std::env::var(var).map_err(|_| {
                format!("environment variable {var} (secret_access_key_env) is not set")
            })?,
            (None, Some(file)) => std::fs::read_to_string(file)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|e| {
                    format!("cannot read secret_access_key_file {}: {e}", file.display())
                })?,
            _ => {
                return Err(
                    "set exactly one of secret_access_key_env and secret_access_key_file".into(),
                );
            }
        };
        if id.is_empty() || secret.is_empty() {
            return Err("the access key id and the secret must not be empty".into());
        }
        Ok((id, secret))
    }
}

fn default_s3_region() -> String {
    "us-east-1".to_string()
}
fn default_true() -> bool {
    true
}
fn default_s3_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_s3_read_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_fill_lease() -> Duration {
    Duration::from_secs(30)
}
fn default_redirect_ttl() -> Duration {
    Duration::from_secs(15 * 60)
}

fn default_listen() -> SocketAddr {
    "127.0.0.1:5000".parse().expect("default address")
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_header_size() -> bytesize::ByteSize {
    bytesize::ByteSize::kib(64)
}
fn default_body_read_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_connections() -> usize {
    1024
}
fn default_path() -> PathBuf {
    PathBuf::from("./wharf-data")
}
fn default_upload_max_age() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_upload_purge_interval() -> Duration {
    Duration::from_secs(3600)
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            tls: None,
            shutdown_timeout: default_shutdown_timeout(),
            header_read_timeout: default_header_read_timeout(),
            max_header_size: default_max_header_size(),
            body_read_timeout: default_body_read_timeout(),
            max_connections: default_max_connections(),
            log_format: LogFormat::default(),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            kind: StorageKind::default(),
            path: default_path(),
            s3: None,
            upload_max_age: default_upload_max_age(),
            upload_purge_interval: default_upload_purge_interval(),
            max_upload_sessions: default_max_upload_sessions(),
        }
    }
}

/// Every key an environment variable may override, as a dotted path.
/// The variable is `WHARF_` + the path upper-cased with `.` → `_`.
pub const ENV_OVERRIDES: &[&str] = &[
    "server.listen",
    "server.tls.cert",
    "server.tls.key",
    "server.shutdown_timeout",
    "server.header_read_timeout",
    "server.max_header_size",
    "server.body_read_timeout",
    "server.max_connections",
    "server.log_format",
    "storage.type",
    "storage.path",
    "storage.upload_max_age",
    "storage.upload_purge_interval",
    "storage.max_upload_sessions",
    "storage.s3.bucket",
    "storage.s3.prefix",
    "storage.s3.endpoint",
    "storage.s3.region",
    "storage.s3.path_style",
    "storage.s3.ca_file",
    "storage.s3.connect_timeout",
    "storage.s3.read_timeout",
    "storage.s3.redirect",
    "storage.s3.redirect_ttl",
    "storage.s3.hot_tier_max_size",
    "storage.s3.fill_lease",
    "cache.max_size",
    "cache.prefetch",
    "cache.fill_wait_timeout",
    "cache.fill_max_age",
    "replication.reconcile_interval",
    "replication.job_lease",
];

/// Overridable keys whose value is a boolean.
const ENV_BOOLS: &[&str] = &[
    "cache.prefetch",
    "storage.s3.path_style",
    "storage.s3.redirect",
];

/// Overridable keys whose value is an integer.
const ENV_INTS: &[&str] = &["server.max_connections", "storage.max_upload_sessions"];

/// Variables with the `WHARF_` prefix that are not configuration keys.
const ENV_RESERVED: &[&str] = &["WHARF_LOG"];

/// The values of every `*_env` key in `v` (the names of the environment
/// variables that hold secrets).
fn secret_env_names(v: &toml::Value, out: &mut Vec<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                match v {
                    toml::Value::String(name) if k.ends_with("_env") => out.push(name.clone()),
                    other => secret_env_names(other, out),
                }
            }
        }
        toml::Value::Array(a) => a.iter().for_each(|v| secret_env_names(v, out)),
        _ => {}
    }
}

fn env_name(path: &str) -> String {
    format!("WHARF_{}", path.replace('.', "_").to_ascii_uppercase())
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    #[error("unknown environment variable {0}; known: {known}", known = ENV_OVERRIDES.iter().map(|p| env_name(p)).collect::<Vec<_>>().join(", "))]
    UnknownEnv(String),
}

impl Config {
    /// Loads `file` (or the embedded defaults when `None`), applies the
    /// `WHARF_*` variables from `env`, and validates.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Syntax {
                        path: path.to_path_buf(),
                        message: e.to_string().trim().to_string(),
                    })?
            }
            None => toml::Table::new(),
        };
        // Variables the file names as holding a secret (`password_env`,
        // `secret_access_key_env`, ...) are not overrides, whatever their name.
        let mut secrets = Vec::new();
        secret_env_names(&toml::Value::Table(table.clone()), &mut secrets);
        for (name, value) in env {
            if !name.starts_with("WHARF_")
                || ENV_RESERVED.contains(&name.as_str())
                || secrets.contains(&name)
            {
                continue;
            }
            let path = ENV_OVERRIDES
                .iter()
                .find(|p| env_name(p) == name)
                .ok_or_else(|| ConfigError::UnknownEnv(name.clone()))?;
            // Every other overridable key takes a string (durations and sizes too).
            let value = match (ENV_BOOLS.contains(path), value.as_str()) {
                (true, "true") => toml::Value::Boolean(true),
                (true, "false") => toml::Value::Boolean(false),
                // Not a number: left a string, which the key then refuses.
                _ if ENV_INTS.contains(path) => value
                    .parse()
                    .map(toml::Value::Integer)
                    .unwrap_or(toml::Value::String(value)),
                _ => toml::Value::String(value),
            };
            set_path(&mut table, path, value);
        }
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                ConfigError::Invalid {
                    key: e.path().to_string(),
                    message: e.inner().to_string(),
                }
            })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| ConfigError::Invalid {
            key: key.to_string(),
            message: message.to_string(),
        };
        if self.server.max_header_size.as_u64() < 8192 {
            return Err(invalid("server.max_header_size", "must be at least 8KiB"));
        }
        if self.server.header_read_timeout.is_zero() {
            return Err(invalid(
                "server.header_read_timeout",
                "must be greater than zero",
            ));
        }
        if self.server.body_read_timeout.is_zero() {
            return Err(invalid(
                "server.body_read_timeout",
                "must be greater than zero",
            ));
        }
        if !(1..=1_000_000).contains(&self.server.max_connections) {
            return Err(invalid(
                "server.max_connections",
                "must be between 1 and 1000000",
            ));
        }
        if self.storage.max_upload_sessions == 0 {
            return Err(invalid("storage.max_upload_sessions", "must be at least 1"));
        }
        if self.storage.upload_purge_interval.is_zero() {
            return Err(invalid(
                "storage.upload_purge_interval",
                "must be greater than zero",
            ));
        }
        if self.storage.path.as_os_str().is_empty() {
            return Err(invalid("storage.path", "must not be empty"));
        }
        match (self.storage.kind, &self.storage.s3) {
            (StorageKind::S3, None) => {
                return Err(invalid(
                    "storage.s3",
                    "type = \"s3\" needs a [storage.s3] table with at least `bucket`",
                ));
            }
            (StorageKind::Filesystem, Some(_)) => {
                return Err(invalid(
                    "storage.s3",
                    "only used with type = \"s3\" (type is \"filesystem\")",
                ));
            }
            (StorageKind::S3, Some(s3)) => s3.validate()?,
            (StorageKind::Filesystem, None) => {}
        }
        let mut prefixes = std::collections::HashSet::new();
        for (i, rule) in self.pull_through.iter().enumerate() {
            let key = |k: &str| format!("pull_through[{i}].{k}");
            let fail = |k: &str, m: String| ConfigError::Invalid {
                key: key(k),
                message: m,
            };
            if !prefixes.insert(&rule.prefix) {
                return Err(fail(
                    "prefix",
                    format!("{:?} is used by two rules", rule.prefix.to_string()),
                ));
            }
            check_realm_hosts(&rule.token_realm_hosts).map_err(|m| fail("token_realm_hosts", m))?;
            if let Some(c) = &rule.credentials {
                c.password().map_err(|m| fail("credentials", m))?;
            }
        }
        self.replication.validate()?;
        for (i, e) in self.sync.iter().enumerate() {
            let fail = |k: &str, m: String| ConfigError::Invalid {
                key: format!("sync[{i}].{k}"),
                message: m,
            };
            check_realm_hosts(&e.token_realm_hosts).map_err(|m| fail("token_realm_hosts", m))?;
            if let Some(c) = &e.credentials {
                c.password().map_err(|m| fail("credentials", m))?;
            }
            if e.repositories.is_empty() {
                return Err(fail("repositories", "name at least one repository".into()));
            }
            for (j, r) in e.repositories.iter().enumerate() {
                let local = e
                    .local_name(r)
                    .map_err(|err| fail(&format!("repositories[{j}]"), err))?;
                if let Some(ns) = self.pull_through.iter().find_map(|p| {
                    p.prefix
                        .namespace()
                        .filter(|ns| local.as_str().starts_with(&format!("{ns}/")))
                }) {
                    return Err(fail(
                        &format!("repositories[{j}]"),
                        format!(
                            "{local} is inside the pull-through namespace {:?}; use local_prefix",
                            ns.as_str()
                        ),
                    ));
                }
            }
            if e.interval.is_zero() {
                return Err(fail("interval", "must be greater than zero".into()));
            }
        }
        Ok(())
    }
}

/// `token_realm_hosts` are host names or IP addresses (IPv6 in brackets),
/// without scheme, port or path.
fn check_realm_hosts(hosts: &[String]) -> Result<(), String> {
    for h in hosts {
        let ok = match h.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => {
                !h.is_empty()
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
            }
        };
        if !ok {
            return Err(format!(
                "{h:?}: name a host (e.g. auth.example.com), without scheme, port or path"
            ));
        }
    }
    Ok(())
}

impl ReplicationConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.job_lease < Duration::from_secs(3) {
            return Err(ConfigError::Invalid {
                key: "replication.job_lease".into(),
                message: "must be at least 3s (it is renewed every third of it)".into(),
            });
        }
        let mut names = std::collections::HashSet::new();
        for (i, d) in self.destinations.iter().enumerate() {
            let fail = |k: &str, m: String| ConfigError::Invalid {
                key: format!("replication.destinations[{i}].{k}"),
                message: m,
            };
            let name_ok = !d.name.is_empty()
                && d.name.len() <= 64
                && d.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !name_ok {
                return Err(fail(
                    "name",
                    format!("{:?}: use 1 to 64 letters, digits, '-', '_' or '.'", d.name),
                ));
            }
            if !names.insert(d.name.as_str()) {
                return Err(fail("name", format!("{:?} names two destinations", d.name)));
            }
            check_realm_hosts(&d.token_realm_hosts).map_err(|m| fail("token_realm_hosts", m))?;
            let uri = d.url.uri();
            let Some(host) = uri.host() else {
                return Err(fail(
                    "url",
                    "must be https://host[:port] with no path".into(),
                ));
            };
            let loopback = host == "localhost"
                || host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            match uri.scheme_str() {
                Some("https") => {}
                Some("http") if d.insecure => {}
                Some("http") => {
                    return Err(fail(
                        "url",
                        "plain http needs `insecure = true` (loopback only)".into(),
                    ));
                }
                _ => return Err(fail("url", "the scheme must be https (or http)".into())),
            }
            if d.insecure && !loopback {
                return Err(fail(
                    "insecure",
                    format!("only allowed for a loopback address, not {host}"),
                ));
            }
            if let Some(c) = &d.credentials {
                c.password().map_err(|m| fail("credentials", m))?;
            }
            if d.max_concurrency == 0 {
                return Err(fail("max_concurrency", "must be at least 1".into()));
            }
            if d.chunk_size.as_u64() < 64 * 1024 {
                return Err(fail("chunk_size", "must be at least 64KiB".into()));
            }
            if d.max_attempts == 0 {
                return Err(fail("max_attempts", "must be at least 1".into()));
            }
            if d.retry_initial.is_zero() || d.retry_max < d.retry_initial {
                return Err(fail(
                    "retry_max",
                    "retry_initial must be > 0 and retry_max at least retry_initial".into(),
                ));
            }
        }
        for (i, r) in self.rules.iter().enumerate() {
            let fail = |k: &str, m: String| ConfigError::Invalid {
                key: format!("replication.rules[{i}].{k}"),
                message: m,
            };
            if r.destinations.is_empty() {
                return Err(fail("destinations", "name at least one destination".into()));
            }
            for (j, name) in r.destinations.iter().enumerate() {
                if !names.contains(name.as_str()) {
                    return Err(fail(
                        &format!("destinations[{j}]"),
                        format!("no [[replication.destinations]] is named {name:?}"),
                    ));
                }
                if r.destinations[..j].contains(name) {
                    return Err(fail(
                        &format!("destinations[{j}]"),
                        format!("{name:?} is listed twice"),
                    ));
                }
            }
            for (j, f) in r.filters.iter().enumerate() {
                if f.prefix.is_empty() {
                    return Err(fail(
                        &format!("filters[{j}].prefix"),
                        "must not be empty (no filters means every repository)".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl S3Config {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: format!("storage.s3.{key}"),
            message,
        };
        // S3's bucket naming rules (lower case, digits, dots, hyphens).
        let b = &self.bucket;
        let bucket_ok = (3..=63).contains(&b.len())
            && b.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
            && b.as_bytes()[0].is_ascii_alphanumeric()
            && b.as_bytes()[b.len() - 1].is_ascii_alphanumeric();
        if !bucket_ok {
            return Err(invalid(
                "bucket",
                format!("{b:?} is not a bucket name (3-63 lower-case letters, digits, '.' or '-')"),
            ));
        }
        let p = &self.prefix;
        if !p.is_empty()
            && (p.split('/').any(|seg| {
                seg.is_empty()
                    || seg == "."
                    || seg == ".."
                    || !seg
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
            }))
        {
            return Err(invalid(
                "prefix",
                format!(
                    "{p:?} must be segments of letters, digits, '-', '_' or '.' joined by '/', with no leading or trailing '/'"
                ),
            ));
        }
        if let Some(e) = &self.endpoint {
            let uri: http::Uri = e
                .parse()
                .map_err(|err| invalid("endpoint", format!("not a URL: {err}")))?;
            let scheme_ok = matches!(uri.scheme_str(), Some("http") | Some("https"));
            let path_ok = matches!(uri.path(), "" | "/") && uri.query().is_none();
            if !scheme_ok || uri.authority().is_none() || !path_ok {
                return Err(invalid(
                    "endpoint",
                    "must be http(s)://host[:port] with no path".to_string(),
                ));
            }
        }
        if self.region.is_empty() {
            return Err(invalid("region", "must not be empty".to_string()));
        }
        if self.connect_timeout.is_zero() {
            return Err(invalid(
                "connect_timeout",
                "must be greater than zero".to_string(),
            ));
        }
        if self.fill_lease < Duration::from_secs(1) {
            return Err(invalid(
                "fill_lease",
                "must be at least 1s (it is renewed every third of it)".to_string(),
            ));
        }
        // SigV4 presigned URLs live at most 7 days.
        if self.redirect_ttl < Duration::from_secs(1)
            || self.redirect_ttl > Duration::from_secs(7 * 24 * 3600)
        {
            return Err(invalid(
                "redirect_ttl",
                "must be between 1s and 7d (the longest a presigned URL can live)".to_string(),
            ));
        }
        if self
            .hot_tier_max_size
            .is_some_and(|s| s.as_u64() < 1024 * 1024)
        {
            return Err(invalid(
                "hot_tier_max_size",
                "must be at least 1MiB (leave it out for no hot tier)".to_string(),
            ));
        }
        if self.read_timeout.is_zero() {
            return Err(invalid(
                "read_timeout",
                "must be greater than zero".to_string(),
            ));
        }
        if let Some(c) = &self.credentials {
            c.resolve().map_err(|m| invalid("credentials", m))?;
        }
        if let Some(ca) = &self.ca_file {
            std::fs::metadata(ca)
                .map_err(|e| invalid("ca_file", format!("cannot read {}: {e}", ca.display())))?;
        }
        Ok(())
    }
}

impl CredentialsConfig {
    /// Reads the secret from its environment variable or file.
    pub fn password(&self) -> Result<String, String> {
        match (&self.password_env, &self.password_file) {
            (Some(var), None) => std::env::var(var)
                .map_err(|_| format!("environment variable {var} (password_env) is not set")),
            (None, Some(file)) => std::fs::read_to_string(file)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|e| format!("cannot read password_file {}: {e}", file.display())),
            _ => Err("set exactly one of password_env and password_file".to_string()),
        }
    }
}

fn set_path(table: &mut toml::Table, path: &str, value: toml::Value) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().expect("non-empty path");
    let mut t = table;
    for p in parts {
        let entry = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        t = entry.as_table_mut().expect("table");
    }
    t.insert(last.to_string(), value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(s: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.toml");
        std::fs::write(&p, s).unwrap();
        Config::load(
            Some(&p),
            env.iter().map(|(a, b)| (a.to_string(), b.to_string())),
        )
    }

    /// Asserts that `text` is refused with an error about `key`.
    fn assert_refused(text: &str, key: &str) {
        let e = load_str(text, &[]).unwrap_err().to_string();
        assert!(e.starts_with(key), "{key}: {e}\n{text}");
    }

    #[test]
    fn defaults() {
        let c = Config::load(None, Vec::new()).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(c.storage.path, PathBuf::from("./wharf-data"));
        assert_eq!(c.storage.kind, StorageKind::Filesystem);
    }

    #[test]
    fn the_shipped_example_is_valid_and_documents_every_override() {
        let text = include_str!("../../config/wharf.toml");
        let c = load_str(text, &[]).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:5000".parse().unwrap());
        for path in ENV_OVERRIDES {
            let key = path.rsplit('.').next().unwrap();
            assert!(
                text.contains(key),
                "config/wharf.toml does not document {path}"
            );
        }
    }

    #[test]
    fn the_replication_example_is_valid() {
        let text = include_str!("../../config/examples/replication.toml")
            .replace(
                "password_env = \"WHARF_EU_PASSWORD\"",
                "password_env = \"PATH\"",
            )
            .replace(
                "password_file = \"/etc/wharf/dr-password\"",
                "password_env = \"PATH\"",
            );
        let c = load_str(&text, &[]).unwrap();
        assert_eq!(c.replication.destinations.len(), 2);
        assert_eq!(c.replication.rules.len(), 2);
        assert_eq!(c.sync.len(), 1);
    }

    #[test]
    fn pull_through_rules() {
        let c = Config::load(None, Vec::new()).unwrap();
        let prefixes: Vec<String> = c
            .pull_through
            .iter()
            .map(|r| r.prefix.to_string())
            .collect();
        assert_eq!(
            prefixes,
            ["docker-hub", "ROOT", "ghcr", "quay", "k8s", "ecr-public"]
        );
        let c = load_str("pull_through = []\n", &[]).unwrap();
        assert!(c.pull_through.is_empty());
        let c = load_str(
            "[[pull_through]]\nprefix = \"up\"\nupstream = \"http://127.0.0.1:5001\"\ntag_ttl = \"1m\"\n",
            &[("WHARF_CACHE_PREFETCH", "true")],
        )
        .unwrap();
        assert_eq!(c.pull_through.len(), 1);
        assert_eq!(c.pull_through[0].tag_ttl, Duration::from_secs(60));
        assert!(c.cache.prefetch);
        for (body, key) in [
            (
                "prefix = \"Bad\"\nupstream = \"http://h\"",
                "pull_through[0].prefix",
            ),
            (
                "prefix = \"a\"\nupstream = \"ftp://h\"",
                "pull_through[0].upstream",
            ),
            (
                "prefix = \"a\"\nupstream = \"http://h/path\"",
                "pull_through[0].upstream",
            ),
            (
                "prefix = \"a\"\nupstream = \"http://h\"\ncredentials = { username = \"u\" }",
                "pull_through[0].credentials",
            ),
            (
                "prefix = \"a\"\nupstream = \"http://h\"\ncredentials = { username = \"u\", password_env = \"WHARF_TEST_SURELY_UNSET\" }",
                "pull_through[0].credentials",
            ),
            (
                "prefix = \"a\"\nupstream = \"http://h\"\ntag_ttl = \"x\"",
                "pull_through[0].tag_ttl",
            ),
            (
                "prefix = \"a\"\nupstream = \"http://h\"\nbogus = 1",
                "pull_through[0]",
            ),
        ] {
            assert_refused(&format!("[[pull_through]]\n{body}\n"), key);
        }
        assert_refused(
            "[[pull_through]]\nprefix = \"a\"\nupstream = \"http://h\"\n[[pull_through]]\nprefix = \"a\"\nupstream = \"http://g\"\n",
            "pull_through[1].prefix",
        );
    }

    const S3_OK: &str = "[storage]\ntype = \"s3\"\n[storage.s3]\nbucket = \"wharf\"\nendpoint = \"http://127.0.0.1:8333\"\n";

    #[test]
    fn s3_storage() {
        let c = load_str(S3_OK, &[]).unwrap();
        assert_eq!(c.storage.kind, StorageKind::S3);
        let s3 = c.storage.s3.unwrap();
        assert_eq!(s3.bucket, "wharf");
        assert_eq!(s3.region, "us-east-1");
        assert!(s3.path_style);
        assert!(s3.credentials.is_none());
        assert_eq!(s3.read_timeout, Duration::from_secs(60));
        // Environment overrides, including a whole s3 backend from nothing.
        let c = Config::load(
            None,
            [
                ("WHARF_STORAGE_TYPE", "s3"),
                ("WHARF_STORAGE_S3_BUCKET", "other-bucket"),
                ("WHARF_STORAGE_S3_PREFIX", "a/b"),
                ("WHARF_STORAGE_S3_PATH_STYLE", "false"),
                (
                    "WHARF_STORAGE_S3_ENDPOINT",
                    "https://s3.example.internal:9000",
                ),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string())),
        )
        .unwrap();
        let s3 = c.storage.s3.unwrap();
        assert_eq!(
            (s3.bucket.as_str(), s3.prefix.as_str()),
            ("other-bucket", "a/b")
        );
        assert!(!s3.path_style);
        // PATH is always set: a stand-in for a secret variable.
        let c = load_str(
            &format!(
                "{S3_OK}credentials = {{ access_key_id = \"K\", secret_access_key_env = \"PATH\" }}\n"
            ),
            &[],
        )
        .unwrap();
        let (id, secret) = c
            .storage
            .s3
            .unwrap()
            .credentials
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(id, "K");
        assert!(!secret.is_empty());
    }

    #[test]
    fn bad_s3_storage_is_refused_with_the_key_path() {
        for (toml, key) in [
            ("[storage]\ntype = \"s3\"\n", "storage.s3:"),
            (
                "[storage]\ntype = \"filesystem\"\n[storage.s3]\nbucket = \"wharf\"\n",
                "storage.s3:",
            ),
            (
                "[storage]\ntype = \"s3\"\n[storage.s3]\nprefix = \"x\"\n",
                "storage.s3:",
            ),
            (
                "[storage]\ntype = \"s3\"\n[storage.s3]\nbucket = \"Bad_Bucket\"\n",
                "storage.s3.bucket:",
            ),
            (
                &format!("{S3_OK}prefix = \"/lead\"\n"),
                "storage.s3.prefix:",
            ),
            (&format!("{S3_OK}prefix = \"a//b\"\n"), "storage.s3.prefix:"),
            (
                &format!("{S3_OK}prefix = \"a/../b\"\n"),
                "storage.s3.prefix:",
            ),
            (
                "[storage]\ntype = \"s3\"\n[storage.s3]\nbucket = \"wharf\"\nendpoint = \"ftp://h\"\n",
                "storage.s3.endpoint:",
            ),
            (
                "[storage]\ntype = \"s3\"\n[storage.s3]\nbucket = \"wharf\"\nendpoint = \"http://h/path\"\n",
                "storage.s3.endpoint:",
            ),
            (&format!("{S3_OK}region = \"\"\n"), "storage.s3.region:"),
            (
                &format!("{S3_OK}read_timeout = \"0s\"\n"),
                "storage.s3.read_timeout:",
            ),
            (
                &format!("{S3_OK}connect_timeout = \"soon\"\n"),
                "storage.s3.connect_timeout:",
            ),
            (
                &format!("{S3_OK}path_style = \"yes\"\n"),
                "storage.s3.path_style:",
            ),
            (
                &format!("{S3_OK}ca_file = \"/surely/not/here.pem\"\n"),
                "storage.s3.ca_file:",
            ),
            // Features that are not built are refused, not ignored.
            (&format!("{S3_OK}redirect = 1\n"), "storage.s3.redirect:"),
            (
                &format!("{S3_OK}redirect_ttl = \"8d\"\n"),
                "storage.s3.redirect_ttl:",
            ),
            (&format!("{S3_OK}hot_tier = \"x\"\n"), "storage.s3"),
            (
                &format!("{S3_OK}hot_tier_max_size = \"1KiB\"\n"),
                "storage.s3.hot_tier_max_size:",
            ),
            (
                &format!("{S3_OK}hot_tier_max_size = \"lots\"\n"),
                "storage.s3.hot_tier_max_size:",
            ),
            (
                &format!("{S3_OK}credentials = {{ access_key_id = \"K\" }}\n"),
                "storage.s3.credentials:",
            ),
            (
                &format!(
                    "{S3_OK}credentials = {{ access_key_id = \"K\", secret_access_key = \"inline\" }}\n"
                ),
                "storage.s3.credentials",
            ),
            (
                &format!(
                    "{S3_OK}credentials = {{ access_key_id = \"K\", secret_access_key_env = \"WHARF_TEST_SURELY_UNSET\" }}\n"
                ),
                "storage.s3.credentials:",
            ),
            (
                &format!(
                    "{S3_OK}credentials = {{ access_key_id = \"K\", access_key_id_env = \"X\", secret_access_key_env = \"PATH\" }}\n"
                ),
                "storage.s3.credentials:",
            ),
        ] {
            let e = load_str(toml, &[]).unwrap_err().to_string();
            assert!(e.starts_with(key), "{toml}\n→ {e}");
        }
        let e = load_str(S3_OK, &[("WHARF_STORAGE_S3_PATH_STYLE", "maybe")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("storage.s3.path_style:"), "{e}");
        let e = load_str(S3_OK, &[("WHARF_STORAGE_S3_BUKET", "x")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("WHARF_STORAGE_S3_BUKET"), "{e}");
    }

    #[test]
    fn token_realm_hosts() {
        let rule = |hosts: &str| {
            format!(
                "[[pull_through]]\nprefix = \"p\"\nupstream = \"https://r.example\"\ntoken_realm_hosts = {hosts}\n"
            )
        };
        let c = load_str(&rule(r#"["auth.example", "[::1]", "10.0.0.1"]"#), &[]).unwrap();
        assert_eq!(c.pull_through[0].token_realm_hosts.len(), 3);
        for bad in [
            r#"["https://auth.example"]"#,
            r#"["auth.example:443"]"#,
            r#"["auth.example/token"]"#,
            r#"[""]"#,
        ] {
            let e = load_str(&rule(bad), &[]).unwrap_err().to_string();
            assert!(
                e.starts_with("pull_through[0].token_realm_hosts:"),
                "{bad} → {e}"
            );
        }
        let sync = "[[sync]]\nupstream = \"https://r.example\"\nrepositories = [\"a\"]\ntoken_realm_hosts = [\"a b\"]\n";
        let e = load_str(sync, &[]).unwrap_err().to_string();
        assert!(e.starts_with("sync[0].token_realm_hosts:"), "{e}");
        let dest = "[[replication.destinations]]\nname = \"eu\"\nurl = \"https://r.eu.example\"\ntoken_realm_hosts = [\"x/y\"]\n";
        let e = load_str(dest, &[]).unwrap_err().to_string();
        assert!(
            e.starts_with("replication.destinations[0].token_realm_hosts:"),
            "{e}"
        );
    }

    #[test]
    fn replication() {
        let dest = |name: &str, url: &str, extra: &str| {
            format!("[[replication.destinations]]\nname = \"{name}\"\nurl = \"{url}\"\n{extra}\n")
        };
        let ok = format!(
            "{}{}[[replication.rules]]\nfilters = [{{ prefix = \"prod/\" }}]\ndestinations = [\"eu\", \"local\"]\n",
            dest(
                "eu",
                "https://r.eu.example",
                "region = \"eu-west-1\"\nregistry_id = \"2222\"\nrepository_prefix = \"mirror\"\nmax_concurrency = 2"
            ),
            dest(
                "local",
                "http://127.0.0.1:5001",
                "insecure = true\nretry_initial = \"100ms\""
            ),
        );
        let c = load_str(&ok, &[]).unwrap();
        assert_eq!(c.replication.destinations.len(), 2);
        assert_eq!(c.replication.destinations[0].max_concurrency, 2);
        assert_eq!(c.replication.destinations[1].max_attempts, 10);
        assert!(!c.replication.rules[0].include_pulled_through);
        assert_eq!(c.replication.reconcile_interval, Duration::from_secs(3600));

        let eu = dest("eu", "https://r.eu.example", "");
        for (text, key) in [
            (
                format!("{eu}{}", dest("eu", "https://x", "")),
                "replication.destinations[1].name",
            ),
            (
                dest("e u", "https://x", ""),
                "replication.destinations[0].name",
            ),
            (dest("eu", "ftp://x", ""), "replication.destinations[0].url"),
            (
                dest("eu", "https://x/path", ""),
                "replication.destinations[0].url",
            ),
            (
                dest("eu", "not a url", ""),
                "replication.destinations[0].url",
            ),
            (
                dest("eu", "http://r.example", ""),
                "replication.destinations[0].url",
            ),
            (
                dest("eu", "http://r.example", "insecure = true"),
                "replication.destinations[0].insecure",
            ),
            (
                dest("eu", "https://x", "repository_prefix = \"Bad\""),
                "replication.destinations[0].repository_prefix",
            ),
            (
                dest("eu", "https://x", "max_concurrency = 0"),
                "replication.destinations[0].max_concurrency",
            ),
            (
                dest(
                    "eu",
                    "https://x",
                    "credentials = { username = \"u\", password_env = \"WHARF_TEST_SURELY_UNSET\" }",
                ),
                "replication.destinations[0].credentials",
            ),
            (
                dest("eu", "https://x", "bogus = 1"),
                "replication.destinations[0]",
            ),
            (
                format!("{eu}[[replication.rules]]\ndestinations = [\"us\"]\n"),
                "replication.rules[0].destinations[0]",
            ),
            (
                format!("{eu}[[replication.rules]]\ndestinations = []\n"),
                "replication.rules[0].destinations",
            ),
            (
                format!("{eu}[[replication.rules]]\ndestinations = [\"eu\", \"eu\"]\n"),
                "replication.rules[0].destinations[1]",
            ),
            (
                format!(
                    "{eu}[[replication.rules]]\nfilters = [{{ prefix = \"\" }}]\ndestinations = [\"eu\"]\n"
                ),
                "replication.rules[0].filters[0].prefix",
            ),
            (
                format!(
                    "{eu}[[replication.rules]]\nfilters = [{{ regex = \"x\" }}]\ndestinations = [\"eu\"]\n"
                ),
                "replication.rules[0].filters[0]",
            ),
            (
                "[replication]\nreconcile_interval = \"soon\"\n".to_string(),
                "replication.reconcile_interval",
            ),
            (
                "[replication]\njob_lease = \"1s\"\n".to_string(),
                "replication.job_lease",
            ),
        ] {
            assert_refused(&text, key);
        }
    }

    /// A secret's variable may have any name, `WHARF_` ones too: it is not
    /// taken for an unknown override (the example configuration does this).
    #[test]
    fn secret_variables_are_not_overrides() {
        let text = "[[replication.destinations]]\nname = \"eu\"\nurl = \"https://r.eu.example\"\ncredentials = { username = \"u\", password_env = \"WHARF_EU_PASSWORD\" }\n";
        // Not an unknown override; refused here only because this test's
        // own process environment does not hold the secret.
        match load_str(text, &[("WHARF_EU_PASSWORD", "secret")]) {
            Err(ConfigError::Invalid { key, .. }) => {
                assert_eq!(key, "replication.destinations[0].credentials")
            }
            other => panic!("{other:?}"),
        }
        let e = load_str(text, &[("WHARF_EU_PASSWROD", "typo")]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("unknown environment variable WHARF_EU_PASSWROD"),
            "{e}"
        );
    }

    #[test]
    fn sync_entries() {
        let ok = "pull_through = []\n[[sync]]\nupstream = \"https://r.example\"\nrepositories = [\"library/alpine\"]\nlocal_prefix = \"mirror\"\ntags = [\"3.*\", \"regex:^v[0-9]+$\"]\nplatforms = [\"linux/amd64\", \"linux/arm/v7\"]\ninterval = \"5m\"\n";
        let c = load_str(ok, &[]).unwrap();
        assert_eq!(c.sync[0].interval, Duration::from_secs(300));
        for (body, key) in [
            (
                "upstream = \"ftp://x\"\nrepositories = [\"a\"]",
                "sync[0].upstream",
            ),
            (
                "upstream = \"https://x\"\nrepositories = []",
                "sync[0].repositories",
            ),
            (
                "upstream = \"https://x\"\nrepositories = [\"Bad\"]",
                "sync[0].repositories[0]",
            ),
            (
                "upstream = \"https://x\"\nrepositories = [\"a\"]\nlocal_prefix = \"-x\"",
                "sync[0].local_prefix",
            ),
            (
                "upstream = \"https://x\"\nrepositories = [\"a\"]\ntags = [\"regex:(\"]",
                "sync[0].tags[0]",
            ),
            (
                "upstream = \"https://x\"\nrepositories = [\"a\"]\nplatforms = [\"linux\"]",
                "sync[0].platforms[0]",
            ),
            (
                "upstream = \"https://x\"\nrepositories = [\"a\"]\ninterval = \"0s\"",
                "sync[0].interval",
            ),
            (
                "upstream = \"https://x\"\nrepositories = [\"a\"]\nbogus = 1",
                "sync[0]",
            ),
        ] {
            assert_refused(&format!("pull_through = []\n[[sync]]\n{body}\n"), key);
        }
        // A local name inside a pull-through namespace is refused.
        assert_refused(
            "[[sync]]\nupstream = \"https://x\"\nrepositories = [\"ghcr/app\"]\n",
            "sync[0].repositories[0]",
        );
    }

    #[test]
    fn env_overrides_file() {
        let c = load_str(
            "[server]\nlisten = \"127.0.0.1:1\"\n",
            &[
                ("WHARF_SERVER_LISTEN", "127.0.0.1:7000"),
                ("WHARF_STORAGE_UPLOAD_MAX_AGE", "2h"),
                ("WHARF_SERVER_TLS_CERT", "c.pem"),
                ("WHARF_SERVER_TLS_KEY", "k.pem"),
                ("WHARF_LOG", "debug"),
                ("PATH", "/bin"),
                ("WHARF_REPLICATION_RECONCILE_INTERVAL", "5m"),
            ],
        )
        .unwrap();
        assert_eq!(c.replication.reconcile_interval, Duration::from_secs(300));
        assert_eq!(c.server.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(c.storage.upload_max_age, Duration::from_secs(7200));
        assert_eq!(c.server.tls.unwrap().cert, PathBuf::from("c.pem"));
    }

    #[test]
    fn connection_limits_have_defaults_overrides_and_bounds() {
        let c = load_str("", &[]).unwrap();
        assert_eq!(c.server.body_read_timeout, Duration::from_secs(60));
        assert_eq!(c.server.max_connections, 1024);
        let c = load_str(
            "[server]\nmax_connections = 10\nbody_read_timeout = \"5s\"\n",
            &[("WHARF_SERVER_MAX_CONNECTIONS", "300")],
        )
        .unwrap();
        assert_eq!(c.server.max_connections, 300);
        assert_eq!(c.server.body_read_timeout, Duration::from_secs(5));
        let c = load_str("", &[("WHARF_SERVER_BODY_READ_TIMEOUT", "2m")]).unwrap();
        assert_eq!(c.server.body_read_timeout, Duration::from_secs(120));
        for (toml, env, key) in [
            (
                "[server]\nmax_connections = 0\n",
                None,
                "server.max_connections:",
            ),
            (
                "[server]\nmax_connections = -3\n",
                None,
                "server.max_connections:",
            ),
            (
                "",
                Some(("WHARF_SERVER_MAX_CONNECTIONS", "many")),
                "server.max_connections:",
            ),
            (
                "[server]\nbody_read_timeout = \"0s\"\n",
                None,
                "server.body_read_timeout:",
            ),
            (
                "[server]\nbody_read_timeout = 5\n",
                None,
                "server.body_read_timeout:",
            ),
        ] {
            let env: Vec<_> = env.into_iter().collect();
            let e = load_str(toml, &env).unwrap_err().to_string();
            assert!(e.starts_with(key), "{toml:?} {env:?}: {e}");
        }
    }

    #[test]
    fn refuses_unknown_keys_and_bad_values_with_the_key_path() {
        let e = load_str("[server]\nlisen = \"x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("server"), "{e}");
        assert!(e.contains("lisen"), "{e}");
        let e = load_str("[server]\nlisten = \"nope\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("server.listen:"), "{e}");
        let e = load_str("[storage]\nupload_max_age = \"soon\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("storage.upload_max_age:"), "{e}");
        let e = load_str("[storage]\ntype = \"floppy\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("storage.type:"), "{e}");
        let e = load_str("[nope]\n", &[]).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        let e = load_str("", &[("WHARF_SERVER_LISTEN", "bad")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("server.listen:"), "{e}");
        let e = load_str("", &[("WHARF_SERVER_NOPE", "1")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("WHARF_SERVER_NOPE"), "{e}");
        let e = load_str("[server\n", &[]).unwrap_err().to_string();
        assert!(e.contains("w.toml"), "{e}");
        let e = load_str("[server]\nmax_header_size = \"1KiB\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("server.max_header_size:"), "{e}");
    }
}
