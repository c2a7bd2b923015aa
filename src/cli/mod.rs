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
    /// match their digest. Exits non-zero if any did not.
    Fsck {
        #[arg(long, short)]
        config: Option<PathBuf>,
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
        Command::Fsck { config } => fsck(config.as_deref()),
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
    if let Some(tls) = &config.server.tls {
        server::tls_acceptor(&tls.cert, &tls.key).context("server.tls")?;
    }
    println!("{}: ok", file.display());
    Ok(ExitCode::SUCCESS)
}

/// Where the replication queue lives: the metadata database, or the
/// bucket (shared by every replica).
enum JobsAt {
    Database(Arc<redb::Database>),
    Bucket(Arc<dyn object_store::ObjectStore>, String),
}

/// Builds replication from the configuration, with its queue where the
/// metadata is. `None` without rules.
fn open_replication(
    config: &Config,
    jobs_at: JobsAt,
    upstream_metrics: &UpstreamMetrics,
) -> anyhow::Result<Option<Arc<Replication>>> {
    let rc = &config.replication;
    if rc.rules.is_empty() {
        return Ok(None);
    }
    let jobs: Arc<dyn JobStore> = match jobs_at {
        JobsAt::Database(db) => {
            Arc::new(RedbJobs::open(db).context("opening the replication queue")?)
        }
        JobsAt::Bucket(client, prefix) => {
            Arc::new(S3Jobs::new(S3Meta::new(client, &prefix), rc.job_lease))
        }
    };
    let mut destinations = Vec::new();
    for (i, d) in rc.destinations.iter().enumerate() {
        let ctx = || format!("replication.destinations[{i}] ({})", d.name);
        let settings = client_settings(
            &d.url,
            d.credentials.as_ref(),
            d.ca_file.as_ref(),
            upstream_metrics,
        )
        .with_context(ctx)?;
        let client = UpstreamClient::new(settings).with_context(ctx)?;
        destinations.push(Destination {
            name: d.name.clone(),
            url: d.url.clone(),
            region: d.region.clone(),
            registry_id: d.registry_id.clone(),
            client,
            repository_prefix: d
                .repository_prefix
                .as_deref()
                .map(str::parse)
                .transpose()
                .with_context(ctx)?,
            max_concurrency: d.max_concurrency,
            chunk_size: d.chunk_size.as_u64(),
            max_attempts: d.max_attempts,
            retry_initial: d.retry_initial,
            retry_max: d.retry_max,
        });
    }
    let rules = rc
        .rules
        .iter()
        .map(|r| ReplicationRule {
            prefixes: r.filters.iter().map(|f| f.prefix.clone()).collect(),
            destinations: r.destinations.clone(),
            include_pulled_through: r.include_pulled_through,
        })
        .collect();
    Ok(Some(Arc::new(Replication::new(
        destinations,
        rules,
        jobs,
        rc.reconcile_interval,
    ))))
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
    url: &str,
    creds: Option<&CredentialsConfig>,
    ca_file: Option<&PathBuf>,
    metrics: &UpstreamMetrics,
) -> anyhow::Result<UpstreamSettings> {
    let mut settings = UpstreamSettings::new(url.parse()?);
    settings.credentials = credentials(creds)?;
    settings.ca_file = ca_file.cloned();
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
            &e.upstream,
            e.credentials.as_ref(),
            e.ca_file.as_ref(),
            upstream_metrics,
        )
        .with_context(ctx)?;
        let mut repositories = Vec::new();
        for r in &e.repositories {
            let local = match &e.local_prefix {
                Some(p) => format!("{p}/{r}"),
                None => r.clone(),
            };
            repositories.push((
                r.parse().with_context(ctx)?,
                local.parse().with_context(ctx)?,
            ));
        }
        out.push(Arc::new(crate::replication::sync::SyncEntry {
            url: e.upstream.clone(),
            upstream: UpstreamClient::new(settings).with_context(ctx)?,
            repositories,
            tags: e
                .tags
                .iter()
                .map(|t| t.parse().map_err(anyhow::Error::msg))
                .collect::<anyhow::Result<_>>()
                .with_context(ctx)?,
            platforms: e
                .platforms
                .iter()
                .map(|p| p.parse().map_err(anyhow::Error::msg))
                .collect::<anyhow::Result<_>>()
                .with_context(ctx)?,
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

fn open_stores(config: &Config) -> anyhow::Result<Stores> {
    let root = &config.storage.path;
    match (config.storage.kind, &config.storage.s3) {
        (StorageKind::S3, Some(s3)) => {
            let opts = s3_options(s3)?;
            let client = crate::storage::s3::connect(&opts).context("storage.s3")?;
            let store = Arc::new(
                S3Store::new(client.clone(), &opts.prefix, root.clone()).with_context(|| {
                    format!("opening the local scratch directory {}", root.display())
                })?,
            );
            let mut hot = None;
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
                    Arc::new(crate::storage::hot::HotBlobs(Arc::new(tier)))
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
                redirects,
                jobs_at: JobsAt::Bucket(client, opts.prefix.clone()),
                location: format!("s3://{}/{}", s3.bucket, s3.prefix),
            })
        }
        _ => {
            let store = Arc::new(
                FsStore::open(root)
                    .with_context(|| format!("opening storage at {}", root.display()))?,
            );
            let meta = Arc::new(RedbMeta::open(&root.join("meta.redb")).with_context(|| {
                format!("opening metadata at {}", root.join("meta.redb").display())
            })?);
            Ok(Stores {
                blobs: store.clone(),
                uploads: store.clone(),
                fills: store,
                jobs_at: JobsAt::Database(meta.database()),
                meta,
                leases: None,
                hot: None,
                redirects: None,
                location: root.display().to_string(),
            })
        }
    }
}

/// Opens the configured stores, replication (when rules are configured)
/// and, when pull-through rules are configured, the cache in front of them.
async fn open_registry(
    config: &Config,
    upstream_metrics: &UpstreamMetrics,
    stop: &CancellationToken,
) -> anyhow::Result<(Registry, Option<Arc<Replication>>)> {
    let Stores {
        blobs,
        uploads,
        fills,
        meta,
        redirects,
        hot,
        leases,
        jobs_at,
        ..
    } = open_stores(config)?;
    if config.storage.kind == StorageKind::S3 {
        // Fail at start, not at the first request, when the bucket does not
        // answer (wrong endpoint, credentials, bucket or CA).
        meta.repositories(None, 1)
            .await
            .context("storage.s3: the bucket does not answer")?;
    }
    let replication = open_replication(config, jobs_at, upstream_metrics)?;
    let mut registry = Registry::new(blobs.clone(), uploads, meta.clone());
    if let Some(r) = &replication {
        registry = registry.with_observer(r.clone());
    }
    if let Some((urls, ttl)) = redirects {
        registry = registry.with_redirects(urls, ttl);
    }
    if let Some(metrics) = hot {
        registry = registry.with_hot_metrics(metrics);
    }
    if config.pull_through.is_empty() {
        return Ok((registry, replication));
    }
    let mut rules = Vec::new();
    for (i, r) in config.pull_through.iter().enumerate() {
        let ctx = || format!("pull_through[{i}] ({})", r.prefix);
        let credentials = credentials(r.credentials.as_ref()).with_context(ctx)?;
        let upstream = UpstreamClient::new(UpstreamSettings {
            url: r.upstream.parse().with_context(ctx)?,
            credentials,
            ca_file: r.ca_file.clone(),
            connect_timeout: r.connect_timeout,
            response_timeout: r.response_timeout,
            read_timeout: r.read_timeout,
            max_retries: 3,
            metrics: upstream_metrics.clone(),
        })
        .with_context(ctx)?;
        let docker_hub = crate::cache::rules::is_docker_hub(upstream.host());
        rules.push(Rule {
            prefix: match r.prefix.as_str() {
                "ROOT" => None,
                p => Some(p.parse().with_context(ctx)?),
            },
            upstream_prefix: r
                .upstream_prefix
                .as_deref()
                .map(str::parse)
                .transpose()
                .with_context(ctx)?,
            upstream,
            tag_ttl: r.tag_ttl,
            max_stale: r.max_stale,
            docker_hub,
        });
    }
    let budget = Budget::open(config.cache.max_size.as_u64(), blobs.clone(), meta.clone())
        .await
        .context("loading the cache budget")?;
    let mut cache = Cache::new(
        Rules(rules),
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
    tokio::spawn(budget.run(move |d| fills.in_progress(d).is_some(), stop.clone()));
    Ok((registry.with_cache(cache), replication))
}

fn serve(file: Option<&Path>, log_format: Option<LogFormatArg>) -> anyhow::Result<ExitCode> {
    let config = load(file)?;
    init_logs(match log_format {
        Some(LogFormatArg::Json) => LogFormat::Json,
        Some(LogFormatArg::Text) => LogFormat::Text,
        None => config.server.log_format,
    });
    let tls = match &config.server.tls {
        Some(t) => Some(server::tls_acceptor(&t.cert, &t.key).context("server.tls")?),
        None => None,
    };
    let rt = runtime()?;
    let _guard = rt.enter();
    let stop = CancellationToken::new();
    rt.block_on(async move {
        let upstream_metrics = UpstreamMetrics::default();
        let (registry, replication) = open_registry(&config, &upstream_metrics, &stop).await?;
        let sync_entries = open_sync(&config, &upstream_metrics)?;
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
        };
        let app =
            App::with_replication(registry, &upstream_metrics, replication).with_sync(sync_entries);
        server::run(listener, app, tls, opts, shutdown_signal()).await;
        stop.cancel();
        for task in background {
            let _ = task.await;
        }
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
    let stores = open_stores(&config)?;
    tracing::debug!(storage = %stores.location, "fsck");
    let store = stores.blobs;
    rt.block_on(async move {
        let digests = store.list().await?;
        let mut bad = 0usize;
        for digest in &digests {
            let mut stream = store.read(digest, None).await?;
            let mut hasher = digest.algorithm().hasher();
            while let Some(chunk) = stream.next().await {
                hasher.update(&chunk?);
            }
            let computed = hasher.finish();
            if &computed != digest {
                bad += 1;
                store.quarantine(digest).await?;
                println!("CORRUPT {digest}: content hashes to {computed}; quarantined");
            }
        }
        println!("checked {} blobs: {} corrupt", digests.len(), bad);
        Ok(if bad == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })
}
