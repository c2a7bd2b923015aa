//! The `wharf` command line: `serve`, `check-config`, `fsck`, `cache` and
//! `replication`.

mod cache;
mod replication;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::App;
use crate::api::server::{self, ServerOptions};
use crate::cache::budget::Budget;
use crate::cache::{Cache, Rule, Rules};
use crate::config::StorageKind;
use crate::config::{Config, CredentialsConfig, LogFormat};
use crate::metrics::UpstreamMetrics;
use crate::registry::Registry;
use crate::replication::{Destination, Replication, Rule as ReplicationRule};
use crate::storage::fs::FsStore;
use crate::storage::jobs::{JobStore, RedbJobs};
use crate::storage::meta::RedbMeta;
use crate::storage::s3::{S3Fills, S3Options, S3Store, S3Urls};
use crate::storage::s3jobs::S3Jobs;
use crate::storage::s3meta::S3Meta;
use crate::storage::{BlobStore, FillStore, MetaStore, UploadStore};
use crate::upstream::{Credentials, Secret, UpstreamClient, UpstreamSettings};

#[derive(Parser)]
#[command(
    name = "wharf",
    version,
    about = "OCI registry, pull-through cache and replication daemon"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the registry server.
    Serve {
        /// Configuration file (TOML). Without it, the embedded defaults:
        /// 127.0.0.1:5000 and ./wharf-data.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Log format; overrides server.log_format.
        #[arg(long, value_enum)]
        log_format: Option<LogFormatArg>,
    },
    /// Validate a configuration file (and the WHARF_* environment) offline.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Operate a running wharf's pull-through cache.
    Cache {
        #[command(subcommand)]
        command: cache::CacheCommand,
    },
    /// Operate a running wharf's replication: status, retry, sync.
    Replication {
        #[command(subcommand)]
        command: replication::ReplicationCommand,
    },
    /// Re-hash every stored blob; quarantine and report any that do not
    /// match their digest. Exits non-zero if any did not. Offline over the
    /// configured storage, or with --server by the running wharf.
    Fsck {
        #[arg(long, short, conflicts_with = "server")]
        config: Option<PathBuf>,
        /// A running wharf to do it (`POST /_wharf/fsck`), e.g.
        /// http://127.0.0.1:5000; needed beside a running server on
        /// filesystem storage.
        #[arg(long)]
        server: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config, log_format } => serve(config.as_deref(), log_format),
        Command::CheckConfig { file } => check_config(&file),
        Command::Fsck {
            server: Some(server),
            ..
        } => runtime().and_then(|rt| rt.block_on(fsck_server(&server))),
        Command::Fsck { config, .. } => fsck(config.as_deref()),
        Command::Cache { command } => runtime()
            .and_then(|rt| rt.block_on(cache::run(command)))
            .map(|()| ExitCode::SUCCESS),
        Command::Replication { command } => runtime()
            .and_then(|rt| rt.block_on(replication::run(command)))
            .map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("wharf: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(file: Option<&Path>) -> anyhow::Result<Config> {
    Ok(Config::load(file, std::env::vars())?)
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WHARF_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn check_config(file: &Path) -> anyhow::Result<ExitCode> {
    let config = load(Some(file))?;
    prepare(&config, &UpstreamMetrics::default())?;
    println!("{}: ok", file.display());
    Ok(ExitCode::SUCCESS)
}

/// Everything `serve` builds from the configuration before it opens storage
/// or binds its address: the TLS acceptor, the S3 options (secrets and CA
/// read), the pull-through rules, replication's destinations and rules and
/// the sync entries, each with its upstream client. `check-config` builds
/// the same and drops it, so both accept exactly the same configurations;
/// only what needs the storage or the network is left to `serve`.
struct Prepared {
    tls: Option<tokio_rustls::TlsAcceptor>,
    s3: Option<S3Options>,
    pull_through: Vec<Rule>,
    /// `None` without replication rules (destinations are checked anyway).
    replication: Option<(Vec<Destination>, Vec<ReplicationRule>)>,
    sync: Vec<Arc<crate::replication::sync::SyncEntry>>,
}

fn prepare(config: &Config, upstream_metrics: &UpstreamMetrics) -> anyhow::Result<Prepared> {
    let tls = match &config.server.tls {
        Some(t) => Some(server::tls_acceptor(&t.cert, &t.key).context("server.tls")?),
        None => None,
    };
    let s3 = storage_s3(config)?;
    let destinations = replication_destinations(config, upstream_metrics)?;
    let replication = (!config.replication.rules.is_empty()).then(|| {
        let rules = config
            .replication
            .rules
            .iter()
            .map(|r| ReplicationRule {
                prefixes: r.filters.iter().map(|f| f.prefix.clone()).collect(),
                destinations: r.destinations.clone(),
                include_pulled_through: r.include_pulled_through,
            })
            .collect();
        (destinations, rules)
    });
    Ok(Prepared {
        tls,
        s3,
        pull_through: pull_through_rules(config, upstream_metrics)?,
        replication,
        sync: open_sync(config, upstream_metrics)?,
    })
}

/// Where the replication queue lives: the metadata database, or the
/// bucket (shared by every replica).
enum JobsAt {
    Database(Arc<redb::Database>),
    Bucket(Arc<dyn object_store::ObjectStore>, String),
}

/// Builds replication from its prepared destinations and rules, with its
/// queue where the metadata is. `None` without rules.
fn open_replication(
    config: &Config,
    prepared: Option<(Vec<Destination>, Vec<ReplicationRule>)>,
    jobs_at: JobsAt,
) -> anyhow::Result<Option<Arc<Replication>>> {
    let rc = &config.replication;
    let Some((destinations, rules)) = prepared else {
        return Ok(None);
    };
    let jobs: Arc<dyn JobStore> = match jobs_at {
        JobsAt::Database(db) => {
            Arc::new(RedbJobs::open(db).context("opening the replication queue")?)
        }
        JobsAt::Bucket(client, prefix) => {
            Arc::new(S3Jobs::new(S3Meta::new(client, &prefix), rc.job_lease))
        }
    };
    Ok(Some(Arc::new(Replication::new(
        destinations,
        rules,
        jobs,
        rc.reconcile_interval,
    ))))
}

/// Replication's destinations, each with its client.
fn replication_destinations(
    config: &Config,
    upstream_metrics: &UpstreamMetrics,
) -> anyhow::Result<Vec<Destination>> {
    let rc = &config.replication;
    let mut destinations = Vec::new();
    for (i, d) in rc.destinations.iter().enumerate() {
        let ctx = || format!("replication.destinations[{i}] ({})", d.name);
        let settings = client_settings(
            d.url.uri(),
            d.credentials.as_ref(),
            d.ca_file.as_ref(),
            &d.token_realm_hosts,
            upstream_metrics,
        )
        .with_context(ctx)?;
        let client = UpstreamClient::new(settings).with_context(ctx)?;
        destinations.push(Destination {
            name: d.name.clone(),
            url: d.url.to_string(),
            region: d.region.clone(),
            registry_id: d.registry_id.clone(),
            client,
            repository_prefix: d.repository_prefix.clone(),
            max_concurrency: d.max_concurrency,
            chunk_size: d.chunk_size.as_u64(),
            max_attempts: d.max_attempts,
            retry_initial: d.retry_initial,
            retry_max: d.retry_max,
        });
    }
    Ok(destinations)
}

/// The client credentials of a configuration entry, the secret read.
fn credentials(c: Option<&CredentialsConfig>) -> anyhow::Result<Option<Credentials>> {
    c.map(|c| {
        Ok(Credentials {
            username: c.username.clone(),
            password: Secret::new(c.password().map_err(anyhow::Error::msg)?),
        })
    })
    .transpose()
}

/// Client settings (default timeouts) for a replication destination or a
/// sync upstream.
fn client_settings(
    url: &http::Uri,
    creds: Option<&CredentialsConfig>,
    ca_file: Option<&PathBuf>,
    token_realm_hosts: &[String],
    metrics: &UpstreamMetrics,
) -> anyhow::Result<UpstreamSettings> {
    let mut settings = UpstreamSettings::new(url.clone());
    settings.credentials = credentials(creds)?;
    settings.ca_file = ca_file.cloned();
    settings.token_realm_hosts = token_realm_hosts.to_vec();
    settings.metrics = metrics.clone();
    Ok(settings)
}

/// Builds the `[[sync]]` entries.
fn open_sync(
    config: &Config,
    upstream_metrics: &UpstreamMetrics,
) -> anyhow::Result<Vec<Arc<crate::replication::sync::SyncEntry>>> {
    let mut out = Vec::new();
    for (i, e) in config.sync.iter().enumerate() {
        let ctx = || format!("sync[{i}] ({})", e.upstream);
        let settings = client_settings(
            e.upstream.uri(),
            e.credentials.as_ref(),
            e.ca_file.as_ref(),
            &e.token_realm_hosts,
            upstream_metrics,
        )
        .with_context(ctx)?;
        let repositories = e
            .repositories
            .iter()
            .map(|r| Ok((r.clone(), e.local_name(r).map_err(anyhow::Error::msg)?)))
            .collect::<anyhow::Result<_>>()
            .with_context(ctx)?;
        out.push(Arc::new(crate::replication::sync::SyncEntry {
            url: e.upstream.to_string(),
            upstream: UpstreamClient::new(settings).with_context(ctx)?,
            repositories,
            tags: e.tags.clone(),
            platforms: e.platforms.clone(),
            interval: e.interval,
            status: Default::default(),
        }));
    }
    Ok(out)
}

/// The configured backend's stores.
struct Stores {
    blobs: Arc<dyn BlobStore>,
    uploads: Arc<dyn UploadStore>,
    fills: Arc<dyn FillStore>,
    meta: Arc<dyn MetaStore>,
    /// Leases of cluster-wide fills (one upstream fetch per blob for every
    /// replica over the bucket), with how long a lease lasts unless renewed.
    leases: Option<(Arc<dyn crate::storage::FillLeases>, std::time::Duration)>,
    /// Counters of the hot tier, when there is one.
    hot: Option<crate::storage::hot::HotMetrics>,
    /// The hot tier, to shut its copies down.
    hot_tier: Option<Arc<crate::storage::hot::HotTier>>,
    /// Presigned URLs for redirected blob GETs, with their lifetime.
    redirects: Option<(Arc<dyn crate::storage::BlobUrls>, std::time::Duration)>,
    /// Where the replication queue lives.
    jobs_at: JobsAt,
    /// Where the data lives, for the logs.
    location: String,
}

/// The S3 connection settings of the configuration, with the secrets and
/// the CA bundle read. Without `ca_file`, `AWS_CA_BUNDLE` (as the AWS SDKs
/// read it) names an extra bundle.
fn s3_options(s3: &crate::config::S3Config) -> anyhow::Result<S3Options> {
    let credentials = match &s3.credentials {
        Some(c) => Some(
            c.resolve()
                .map_err(anyhow::Error::msg)
                .context("storage.s3.credentials")?,
        ),
        None => None,
    };
    let ca_pem =
        match (&s3.ca_file, std::env::var_os("AWS_CA_BUNDLE")) {
            (Some(f), _) => Some(
                std::fs::read(f).with_context(|| format!("storage.s3.ca_file: {}", f.display()))?,
            ),
            (None, Some(f)) if !f.is_empty() => Some(std::fs::read(&f).with_context(|| {
                format!("AWS_CA_BUNDLE: cannot read {}", Path::new(&f).display())
            })?),
            _ => None,
        };
    Ok(S3Options {
        bucket: s3.bucket.clone(),
        prefix: s3.prefix.clone(),
        endpoint: s3.endpoint.clone(),
        region: s3.region.clone(),
        path_style: s3.path_style,
        credentials,
        ca_pem,
        connect_timeout: s3.connect_timeout,
        read_timeout: s3.read_timeout,
    })
}

/// The S3 options when storage is `s3`.
fn storage_s3(config: &Config) -> anyhow::Result<Option<S3Options>> {
    match (config.storage.kind, &config.storage.s3) {
        (StorageKind::S3, Some(s3)) => Ok(Some(s3_options(s3)?)),
        _ => Ok(None),
    }
}

fn open_stores(config: &Config, s3_opts: Option<S3Options>) -> anyhow::Result<Stores> {
    let root = &config.storage.path;
    match (&config.storage.s3, s3_opts) {
        (Some(s3), Some(opts)) => {
            let client = crate::storage::s3::connect(&opts).context("storage.s3")?;
            let store = Arc::new(
                S3Store::new(client.clone(), &opts.prefix, root.clone()).with_context(|| {
                    format!("opening the local scratch directory {}", root.display())
                })?,
            );
            let mut hot = None;
            let mut hot_tier = None;
            let blobs: Arc<dyn BlobStore> = match s3.hot_tier_max_size {
                Some(max) => {
                    let dir = root.join("hot");
                    let tier = crate::storage::hot::HotTier::open(
                        store.clone(),
                        dir.clone(),
                        max.as_u64(),
                    )
                    .with_context(|| format!("opening the hot tier at {}", dir.display()))?;
                    hot = Some(tier.metrics.clone());
                    let tier = Arc::new(tier);
                    hot_tier = Some(tier.clone());
                    Arc::new(crate::storage::hot::HotBlobs(tier))
                }
                None => store.clone(),
            };
            let redirects = s3.redirect.then(|| {
                let urls: Arc<dyn crate::storage::BlobUrls> =
                    Arc::new(S3Urls::new(client.clone(), &opts.prefix));
                (urls, s3.redirect_ttl)
            });
            Ok(Stores {
                blobs,
                uploads: store.clone(),
                fills: Arc::new(S3Fills(store)),
                meta: Arc::new(S3Meta::new(client.clone(), &opts.prefix)),
                leases: Some((
                    Arc::new(crate::storage::s3lease::S3Leases::new(
                        client.clone(),
                        &opts.prefix,
                    )),
                    s3.fill_lease,
                )),
                hot,
                hot_tier,
                redirects,
                jobs_at: JobsAt::Bucket(client, opts.prefix.clone()),
                location: format!("s3://{}/{}", s3.bucket, s3.prefix),
            })
        }
        _ => {
            // The database first: its lock says whether another wharf uses
            // the directory, before opening the store clears staging files
            // that would be that process's work in progress.
            let meta = match RedbMeta::open(&root.join("meta.redb")) {
                Ok(meta) => Arc::new(meta),
                Err(crate::storage::StorageError::Io(e))
                    if e.kind() == std::io::ErrorKind::ResourceBusy =>
                {
                    anyhow::bail!(
                        "the data directory {} is in use by another wharf process \
                         (a running `wharf serve`; {e}): stop that process first, \
                         or run `wharf fsck --server URL` to have it check its blobs \
                         (a second `wharf serve` needs another directory)",
                        root.display()
                    );
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("opening metadata at {}", root.join("meta.redb").display())
                    });
                }
            };
            let store = Arc::new(
                FsStore::open(root)
                    .with_context(|| format!("opening storage at {}", root.display()))?,
            );
            Ok(Stores {
                blobs: store.clone(),
                uploads: store.clone(),
                fills: store,
                jobs_at: JobsAt::Database(meta.database()),
                meta,
                leases: None,
                hot: None,
                hot_tier: None,
                redirects: None,
                location: root.display().to_string(),
            })
        }
    }
}

/// Opens the configured stores, replication (when rules are configured)
/// and, when pull-through rules are configured, the cache in front of them.
/// Their background work (the evictor, fills, hot-tier copies) stops at
/// `stop` and is tracked by `tasks`, which serve waits for at shutdown.
async fn open_registry(
    config: &Config,
    s3: Option<S3Options>,
    pull_through: Vec<Rule>,
    replication: Option<(Vec<Destination>, Vec<ReplicationRule>)>,
    stop: &CancellationToken,
    tasks: &TaskTracker,
) -> anyhow::Result<(Registry, Option<Arc<Replication>>)> {
    let Stores {
        blobs,
        uploads,
        fills,
        meta,
        redirects,
        hot,
        hot_tier,
        leases,
        jobs_at,
        ..
    } = open_stores(config, s3)?;
    if let Some(tier) = hot_tier {
        let stop = stop.clone();
        tasks.spawn(async move {
            stop.cancelled().await;
            tier.shutdown().await;
        });
    }
    if config.storage.kind == StorageKind::S3 {
        // Fail at start, not at the first request, when the bucket does not
        // answer (wrong endpoint, credentials, bucket or CA).
        meta.repositories(None, 1)
            .await
            .context("storage.s3: the bucket does not answer")?;
    }
    let replication = open_replication(config, replication, jobs_at)?;
    let mut registry = Registry::new(blobs.clone(), uploads, meta.clone())
        .with_max_upload_sessions(config.storage.max_upload_sessions);
    if let Some(r) = &replication {
        registry = registry.with_observer(r.clone());
    }
    if let Some((urls, ttl)) = redirects {
        registry = registry.with_redirects(urls, ttl);
    }
    if let Some(metrics) = hot {
        registry = registry.with_hot_metrics(metrics);
    }
    if pull_through.is_empty() {
        return Ok((registry, replication));
    }
    let budget = Budget::open(config.cache.max_size.as_u64(), blobs.clone(), meta.clone())
        .await
        .context("loading the cache budget")?;
    let mut cache = Cache::new(
        Rules(pull_through),
        blobs,
        fills,
        meta,
        config.cache.prefetch,
        config.cache.fill_wait_timeout,
        config.cache.fill_max_age,
        budget.clone(),
        stop.clone(),
    );
    if let Some(r) = &replication {
        cache = cache.with_observer(r.clone());
    }
    let cache = Arc::new(cache);
    if let Some((leases, ttl)) = leases {
        cache.fills.set_cluster(leases, ttl);
    }
    let fills = cache.fills.clone();
    tasks.spawn(budget.run(move |d| fills.in_progress(d).is_some(), stop.clone()));
    let fills = cache.fills.clone();
    let fills_stop = stop.clone();
    tasks.spawn(async move {
        fills_stop.cancelled().await;
        fills.shutdown().await;
    });
    Ok((registry.with_cache(cache), replication))
}

/// The pull-through rules, each with its upstream client.
fn pull_through_rules(
    config: &Config,
    upstream_metrics: &UpstreamMetrics,
) -> anyhow::Result<Vec<Rule>> {
    let mut rules = Vec::new();
    for (i, r) in config.pull_through.iter().enumerate() {
        let ctx = || format!("pull_through[{i}] ({})", r.prefix);
        let credentials = credentials(r.credentials.as_ref()).with_context(ctx)?;
        let upstream = UpstreamClient::new(UpstreamSettings {
            url: r.upstream.uri().clone(),
            credentials,
            ca_file: r.ca_file.clone(),
            connect_timeout: r.connect_timeout,
            response_timeout: r.response_timeout,
            read_timeout: r.read_timeout,
            max_retries: 3,
            token_realm_hosts: r.token_realm_hosts.clone(),
            metrics: upstream_metrics.clone(),
        })
        .with_context(ctx)?;
        let docker_hub = crate::cache::rules::is_docker_hub(upstream.host());
        rules.push(Rule {
            prefix: r.prefix.namespace().cloned(),
            upstream_prefix: r.upstream_prefix.clone(),
            upstream,
            tag_ttl: r.tag_ttl,
            max_stale: r.max_stale,
            docker_hub,
        });
    }
    Ok(rules)
}

fn serve(file: Option<&Path>, log_format: Option<LogFormatArg>) -> anyhow::Result<ExitCode> {
    let config = load(file)?;
    init_logs(match log_format {
        Some(LogFormatArg::Json) => LogFormat::Json,
        Some(LogFormatArg::Text) => LogFormat::Text,
        None => config.server.log_format,
    });
    let rt = runtime()?;
    let _guard = rt.enter();
    let stop = CancellationToken::new();
    rt.block_on(async move {
        let upstream_metrics = UpstreamMetrics::default();
        let Prepared {
            tls,
            s3,
            pull_through,
            replication,
            sync: sync_entries,
        } = prepare(&config, &upstream_metrics)?;
        let tasks = TaskTracker::new();
        let (registry, replication) =
            open_registry(&config, s3, pull_through, replication, &stop, &tasks).await?;
        if config.storage.kind != StorageKind::S3 {
            // This process holds the directory (the database's lock):
            // staging no upload record names is an orphan of a crash.
            match registry.discard_orphan_uploads().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "removed orphaned upload staging"),
                Err(e) => tracing::warn!(error = %e, "removing orphaned upload staging failed"),
            }
        }
        registry
            .count_upload_sessions()
            .await
            .context("counting the open upload sessions")?;
        let listener = tokio::net::TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("binding {}", config.server.listen))?;
        let addr = listener.local_addr()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let storage = match &config.storage.s3 {
            Some(s3) if config.storage.kind == StorageKind::S3 => {
                format!("s3://{}/{}", s3.bucket, s3.prefix)
            }
            _ => config.storage.path.display().to_string(),
        };
        tracing::info!(%addr, scheme, %storage, "wharf ready");
        {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "listening on {scheme}://{addr}");
            let _ = out.flush();
        }
        let purge = tokio::spawn(purge_uploads(
            registry.clone(),
            config.storage.upload_max_age,
            config.storage.upload_purge_interval,
            stop.clone(),
        ));
        let mut background = vec![purge];
        for entry in sync_entries.clone() {
            background.push(tokio::spawn(crate::replication::sync::run(
                entry,
                registry.clone(),
                stop.clone(),
            )));
        }
        if let Some(rep) = &replication {
            background.push(tokio::spawn(crate::replication::worker::run(
                rep.clone(),
                registry.clone(),
                stop.clone(),
            )));
            if !rep.reconcile_interval.is_zero() {
                background.push(tokio::spawn(crate::replication::reconcile::run_periodic(
                    rep.clone(),
                    registry.clone(),
                    rep.reconcile_interval,
                    stop.clone(),
                )));
            }
        }
        let opts = ServerOptions {
            header_read_timeout: config.server.header_read_timeout,
            max_header_size: config.server.max_header_size.as_u64() as usize,
            shutdown_timeout: config.server.shutdown_timeout,
            tls_handshake_timeout: config.server.header_read_timeout,
            body_read_timeout: config.server.body_read_timeout,
            max_connections: config.server.max_connections,
        };
        let app =
            App::with_replication(registry, &upstream_metrics, replication).with_sync(sync_entries);
        server::run(listener, app, tls, opts, shutdown_signal()).await;
        stop.cancel();
        for task in background {
            let _ = task.await;
        }
        // The evictor (which saves access times last), fills and hot-tier
        // copies.
        tasks.close();
        tasks.wait().await;
        tracing::info!("stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = which, "shutdown requested");
}

/// Periodically drops abandoned upload sessions, until `stop`.
async fn purge_uploads(
    registry: Registry,
    max_age: std::time::Duration,
    every: std::time::Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        match registry.purge_uploads(max_age).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "purged abandoned uploads"),
            Err(e) => tracing::warn!(error = %e, "purging abandoned uploads failed"),
        }
    }
}

fn fsck(file: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = load(file)?;
    let rt = runtime()?;
    let _guard = rt.enter();
    let stores = open_stores(&config, storage_s3(&config)?)?;
    tracing::debug!(storage = %stores.location, "fsck");
    let store = stores.blobs;
    rt.block_on(async move {
        let mut checks = std::pin::pin!(crate::storage::fsck::check_all(store));
        let (mut checked, mut bad) = (0u64, 0u64);
        while let Some(c) = checks.next().await {
            let c = c?;
            checked += 1;
            if let Some(computed) = c.corrupt {
                bad += 1;
                println!(
                    "CORRUPT {}: content hashes to {computed}; quarantined",
                    c.digest
                );
            }
        }
        println!("checked {checked} blobs: {bad} corrupt");
        Ok(if bad == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })
}

/// `wharf fsck --server URL`: the running wharf re-hashes its blobs and
/// streams what it finds; printed like the offline fsck.
async fn fsck_server(server: &str) -> anyhow::Result<ExitCode> {
    let client = cache::client(server)?;
    let (status, body) = client
        .call(http::Method::POST, "/_wharf/fsck")
        .await
        .with_context(|| format!("talking to wharf at {server}"))?;
    if status != http::StatusCode::OK {
        anyhow::bail!("{status}: {}", String::from_utf8_lossy(&body).trim());
    }
    let mut summary = None;
    for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value =
            serde_json::from_slice(line).context("wharf answered with invalid JSON")?;
        if let Some(d) = v["corrupt"].as_str().filter(|_| v["computed"].is_string()) {
            println!(
                "CORRUPT {d}: content hashes to {}; quarantined",
                v["computed"].as_str().unwrap_or_default()
            );
        } else if let Some(e) = v["error"].as_str() {
            anyhow::bail!("fsck failed in the server: {e}");
        } else {
            summary = Some((v["checked"].as_u64(), v["corrupt"].as_u64()));
        }
    }
    let Some((Some(checked), Some(bad))) = summary else {
        anyhow::bail!("the server's answer ended before its summary");
    };
    println!("checked {checked} blobs: {bad} corrupt");
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
