//! `wharf cache warm|stats|refresh`: talks to a running wharf over HTTP
//! (its registry API and its `/_wharf/cache/...` operations API).

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use futures::{StreamExt, TryStreamExt};
use http::{Method, StatusCode};
use indicatif::{ProgressBar, ProgressStyle};

use crate::api::split_ref;
use crate::cache::ACCEPT_ALL;
use crate::oci::manifest::{Manifest, ManifestKind, Platform};
use crate::oci::{Digest, Reference, RepoName};
use crate::upstream::{UpstreamClient, UpstreamSettings};

/// Blobs fetched at once by `warm`.
const WARM_CONCURRENCY: usize = 4;

#[derive(Subcommand)]
pub enum CacheCommand {
    /// Pull images through a running wharf so that their manifests and
    /// blobs are cached. Refs are local names, e.g.
    /// `docker-hub/library/alpine:3.20` or `ghcr/org/app@sha256:...`.
    Warm {
        #[arg(required = true)]
        refs: Vec<String>,
        /// Only these platforms of a multi-platform image (`os/arch` or
        /// `os/arch/variant`; repeatable). Default: every platform.
        #[arg(long = "platform", short = 'p')]
        platforms: Vec<String>,
        /// The wharf to talk to.
        #[arg(long, default_value = "http://127.0.0.1:5000")]
        server: String,
    },
    /// Show the cache's budget, hits and misses, fills and evictions.
    Stats {
        #[arg(long, default_value = "http://127.0.0.1:5000")]
        server: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Fetch cached tags (or manifests by digest) from upstream now,
    /// whatever their age.
    Refresh {
        #[arg(required = true)]
        refs: Vec<String>,
        #[arg(long, default_value = "http://127.0.0.1:5000")]
        server: String,
    },
}

pub async fn run(cmd: CacheCommand) -> anyhow::Result<()> {
    match cmd {
        CacheCommand::Warm {
            refs,
            platforms,
            server,
        } => warm(&client(&server)?, &refs, &platforms).await,
        CacheCommand::Stats { server, json } => stats(&client(&server)?, json).await,
        CacheCommand::Refresh { refs, server } => refresh(&client(&server)?, &refs).await,
    }
}

pub(super) fn client(server: &str) -> anyhow::Result<UpstreamClient> {
    let url = server
        .parse()
        .with_context(|| format!("--server {server:?} is not a URL"))?;
    UpstreamClient::new(UpstreamSettings::new(url)).with_context(|| format!("--server {server}"))
}

/// The `message` of a spec JSON error body, or the body itself.
fn error_text(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<Error>,
    }
    #[derive(serde::Deserialize)]
    struct Error {
        code: String,
        message: String,
    }
    match serde_json::from_slice::<Errors>(body) {
        Ok(e) if !e.errors.is_empty() => e
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.code, e.message))
            .collect::<Vec<_>>()
            .join("; "),
        _ => String::from_utf8_lossy(body).trim().to_string(),
    }
}

pub(super) async fn call_json(
    client: &UpstreamClient,
    method: Method,
    path: &str,
) -> anyhow::Result<serde_json::Value> {
    let (status, body) = client
        .call(method, path)
        .await
        .with_context(|| format!("talking to wharf at {}", client.host()))?;
    if status != StatusCode::OK {
        bail!("{status}: {}", error_text(&body));
    }
    serde_json::from_slice(&body).context("wharf answered with invalid JSON")
}

async fn stats(client: &UpstreamClient, raw: bool) -> anyhow::Result<()> {
    let v = call_json(client, Method::GET, "/_wharf/cache/stats").await?;
    if raw {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let n = |p: &str| v.pointer(p).and_then(|x| x.as_u64()).unwrap_or(0);
    let size = bytesize::ByteSize(n("/budget/size_bytes"));
    let max = bytesize::ByteSize(n("/budget/max_size_bytes"));
    println!(
        "size         {size} of {max} ({} blobs)",
        n("/budget/blobs")
    );
    for kind in ["blobs", "manifests"] {
        let (h, m) = (n(&format!("/{kind}/hits")), n(&format!("/{kind}/misses")));
        let rate = if h + m > 0 {
            format!("{:.1}%", 100.0 * h as f64 / (h + m) as f64)
        } else {
            "-".into()
        };
        println!("{kind:<12} {h} hits, {m} misses (hit rate {rate})");
    }
    println!(
        "fills        {} started, {} in progress, {} coalesced waiters, {} failed, {} corrupt",
        n("/fills/started"),
        n("/fills/in_progress"),
        n("/fills/coalesced_waiters"),
        n("/fills/failed"),
        n("/fills/corrupt")
    );
    println!(
        "upstream     {} received",
        bytesize::ByteSize(n("/fills/upstream_bytes"))
    );
    println!(
        "evictions    {} ({})",
        n("/evictions"),
        bytesize::ByteSize(n("/evicted_bytes"))
    );
    println!(
        "stale serves {}; revalidations {}",
        n("/stale_serves"),
        n("/revalidations")
    );
    if let Some(rules) = v.get("rules").and_then(|r| r.as_array()) {
        for r in rules {
            println!(
                "rule         {} -> {}",
                r["prefix"].as_str().unwrap_or("?"),
                r["upstream"].as_str().unwrap_or("?")
            );
        }
    }
    Ok(())
}

async fn refresh(client: &UpstreamClient, refs: &[String]) -> anyhow::Result<()> {
    let mut failed = 0;
    for r in refs {
        let q = percent_encoding::utf8_percent_encode(r, percent_encoding::NON_ALPHANUMERIC);
        match call_json(
            client,
            Method::POST,
            &format!("/_wharf/cache/refresh?ref={q}"),
        )
        .await
        {
            Ok(v) => println!("{r}: {}", v["digest"].as_str().unwrap_or("?")),
            Err(e) => {
                failed += 1;
                eprintln!("{r}: {e:#}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} refreshes failed", refs.len());
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct IndexEntry {
    digest: Digest,
    #[serde(default)]
    platform: Option<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct Index {
    manifests: Vec<IndexEntry>,
}

#[derive(serde::Deserialize)]
struct Sized {
    digest: Digest,
    size: u64,
}

#[derive(serde::Deserialize)]
struct ImageBlobs {
    config: Sized,
    #[serde(default)]
    layers: Vec<Sized>,
}

/// The blobs (with sizes) of `reference` in `repo`, following an index to
/// the children that match `platforms`.
async fn plan(
    client: &UpstreamClient,
    repo: &RepoName,
    reference: &Reference,
    platforms: &[Platform],
    blobs: &mut BTreeMap<Digest, (RepoName, u64)>,
) -> anyhow::Result<usize> {
    let (meta, body) = client
        .get_manifest(repo, reference, ACCEPT_ALL)
        .await
        .with_context(|| format!("{repo}:{reference}"))?;
    let m = Manifest::parse(&body, Some(&meta.media_type))
        .with_context(|| format!("{repo}:{reference}: manifest"))?;
    let mut images = Vec::new();
    match m.kind {
        ManifestKind::Image => images.push(body),
        ManifestKind::Index => {
            let index: Index = serde_json::from_slice(&body)
                .with_context(|| format!("{repo}:{reference}: index"))?;
            let mut chosen = 0;
            for entry in index.manifests {
                let wanted = platforms.is_empty()
                    || entry
                        .platform
                        .as_ref()
                        .is_some_and(|p| platforms.iter().any(|f| f.matches(p)));
                if !wanted {
                    continue;
                }
                chosen += 1;
                let child = Reference::Digest(entry.digest.clone());
                let (_, body) = client
                    .get_manifest(repo, &child, ACCEPT_ALL)
                    .await
                    .with_context(|| format!("{repo}@{}", entry.digest))?;
                images.push(body);
            }
            if chosen == 0 {
                bail!("{repo}:{reference}: no platform of the index matches the --platform filter");
            }
        }
    }
    for body in &images {
        // An artifact or nested index child has no config: nothing to warm.
        let Ok(img) = serde_json::from_slice::<ImageBlobs>(body) else {
            continue;
        };
        for b in std::iter::once(img.config).chain(img.layers) {
            blobs.entry(b.digest).or_insert((repo.clone(), b.size));
        }
    }
    Ok(images.len())
}

async fn warm(
    client: &UpstreamClient,
    refs: &[String],
    platforms: &[String],
) -> anyhow::Result<()> {
    let platforms = platforms
        .iter()
        .map(|p| p.parse().map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<Platform>>>()?;
    let mut blobs = BTreeMap::new();
    let mut manifests = 0;
    for r in refs {
        let (repo, reference) = split_ref(r).map_err(anyhow::Error::msg)?;
        manifests += plan(client, &repo, &reference, &platforms, &mut blobs).await?;
    }
    let total: u64 = blobs.values().map(|(_, s)| s).sum();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("{} blobs", blobs.len()));
    let count = blobs.len();
    futures::stream::iter(blobs)
        .map(|(digest, (repo, size))| {
            let bar = bar.clone();
            async move {
                let mut stream = client
                    .get_blob(&repo, &digest, 0, size)
                    .await
                    .with_context(|| format!("{repo}@{digest}"))?;
                let mut hasher = digest.algorithm().hasher();
                while let Some(chunk) = stream
                    .try_next()
                    .await
                    .with_context(|| format!("{repo}@{digest}"))?
                {
                    hasher.update(&chunk);
                    bar.inc(chunk.len() as u64);
                }
                let computed = hasher.finish();
                if computed != digest {
                    bail!("{repo}@{digest}: content hashes to {computed}");
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(WARM_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    bar.finish_and_clear();
    println!(
        "warmed {} image manifests, {count} blobs, {}",
        manifests,
        bytesize::ByteSize(total)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_parse_and_match() {
        let p: Platform = "linux/arm64".parse().unwrap();
        let entry = |variant: Option<&str>| serde_json::json!({"os": "linux", "architecture": "arm64", "variant": variant});
        assert!(p.matches(&entry(None)));
        assert!(p.matches(&entry(Some("v8"))));
        let v7: Platform = "linux/arm64/v7".parse().unwrap();
        assert!(!v7.matches(&entry(Some("v8"))));
        assert!("linux".parse::<Platform>().is_err());
        assert!("linux//".parse::<Platform>().is_err());
        assert!("a/b/c/d".parse::<Platform>().is_err());
        assert!("linux/arm64/".parse::<Platform>().is_err());
    }

    proptest::proptest! {
        #[test]
        fn platform_round_trip(
            os in "[a-z0-9]{1,8}",
            arch in "[a-z0-9_]{1,8}",
            variant in proptest::option::of("[a-z0-9]{1,4}"),
        ) {
            let s = match &variant {
                Some(v) => format!("{os}/{arch}/{v}"),
                None => format!("{os}/{arch}"),
            };
            let p: Platform = s.parse().unwrap();
            proptest::prop_assert_eq!(p, Platform { os, architecture: arch, variant });
        }

        #[test]
        fn platform_rejects_malformed(s in "[a-z/]{0,12}") {
            let parts: Vec<&str> = s.split('/').collect();
            let ok = (parts.len() == 2 || parts.len() == 3) && parts.iter().all(|p| !p.is_empty());
            proptest::prop_assert_eq!(s.parse::<Platform>().is_ok(), ok, "{}", s);
        }
    }
}
