//! Scheduled pull sync (like zot's sync or Quay's repository mirroring):
//! every `interval`, the tags of chosen upstream repositories that match
//! the patterns are copied into local hosted repositories with the copy
//! engine ([`super::copy`]), through the registry's verified push path.
//! Locally they are ordinary repositories: served while the upstream is
//! down, and replicated by the rules that match them.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::copy::{Copy, CopyError, Platform, catch_panic};
use super::endpoints::{LocalTarget, UpstreamSource};
pub use crate::oci::name::TagPattern;
use crate::oci::{Reference, RepoName, Tag};
use crate::registry::Registry;
use crate::upstream::UpstreamClient;

/// Tags asked for per page of an upstream tag listing.
const TAG_PAGE: usize = 1000;

/// One `[[sync]]` entry, ready to run.
pub struct SyncEntry {
    /// The upstream URL, for status.
    pub url: String,
    pub upstream: UpstreamClient,
    /// (upstream repository, local repository)
    pub repositories: Vec<(RepoName, RepoName)>,
    /// Empty: every tag.
    pub tags: Vec<TagPattern>,
    pub platforms: Vec<Platform>,
    pub interval: Duration,
    pub status: std::sync::Mutex<SyncStatus>,
}

impl SyncEntry {
    /// The entry's status, for reading or updating.
    pub fn status(&self) -> std::sync::MutexGuard<'_, SyncStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the passes of an entry did, for `/_wharf/sync/status`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct SyncStatus {
    pub passes: u64,
    pub running: bool,
    /// Unix ms.
    pub last_started_ms: Option<u64>,
    pub last_finished_ms: Option<u64>,
    pub last: Option<PassOutcome>,
    /// The last failure's message.
    pub last_error: Option<String>,
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct PassOutcome {
    pub tags_checked: usize,
    pub tags_copied: usize,
    pub failures: usize,
}

/// Syncs `entry` every `interval` (the first pass at once) until `stop`.
pub async fn run(entry: Arc<SyncEntry>, registry: Registry, stop: CancellationToken) {
    let mut tick = tokio::time::interval(entry.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        {
            let mut st = entry.status();
            st.running = true;
            st.last_started_ms = Some(super::unix_ms());
        }
        let out = tokio::select! {
            o = pass(&entry, &registry) => o,
            () = stop.cancelled() => return,
        };
        {
            let mut st = entry.status();
            st.running = false;
            st.passes += 1;
            st.last_finished_ms = Some(super::unix_ms());
            st.last = Some(out);
        }
        tracing::info!(
            upstream = entry.upstream.host(),
            checked = out.tags_checked,
            copied = out.tags_copied,
            failures = out.failures,
            "sync pass done"
        );
    }
}

/// One pass over every repository of `entry`.
pub async fn pass(entry: &SyncEntry, registry: &Registry) -> PassOutcome {
    let source = UpstreamSource {
        client: entry.upstream.clone(),
    };
    let target = LocalTarget {
        registry: registry.clone(),
    };
    let mut out = PassOutcome::default();
    for (upstream_repo, local_repo) in &entry.repositories {
        let tags = match list_tags(&entry.upstream, upstream_repo).await {
            Ok(t) => t,
            Err(e) => {
                out.failures += 1;
                tracing::warn!(repository = %upstream_repo, error = %e, "sync could not list upstream tags");
                entry.status().last_error = Some(format!("{upstream_repo}: listing tags: {e}"));
                continue;
            }
        };
        for tag in tags {
            if !entry.tags.is_empty() && !entry.tags.iter().any(|p| p.matches(tag.as_str())) {
                continue;
            }
            out.tags_checked += 1;
            let reference = Reference::Tag(tag.clone());
            // Unchanged upstream and nothing filtered: nothing to do.
            if entry.platforms.is_empty()
                && let (Ok(Some(up)), Ok(Some(here))) = (
                    entry
                        .upstream
                        .manifest_digest_if_present(upstream_repo, &reference)
                        .await,
                    registry.local_tag(local_repo, &tag).await,
                )
                && up == here
            {
                continue;
            }
            let copy =
                Copy::new(&source, upstream_repo, &target, local_repo).platforms(&entry.platforms);
            let copied = catch_panic(copy.run(&reference))
                .await
                .unwrap_or_else(|panic| Err(CopyError::Permanent(format!("panicked: {panic}"))));
            match copied {
                Ok(c) => {
                    if c.manifests_sent > 0 {
                        out.tags_copied += 1;
                        tracing::info!(
                            repository = %local_repo,
                            tag = %tag,
                            digest = c.digest.as_ref().map(|d| d.as_str()).unwrap_or("-"),
                            blobs = c.blobs_sent,
                            bytes = c.bytes_sent,
                            "synced from upstream"
                        );
                    }
                }
                Err(e) => {
                    out.failures += 1;
                    tracing::warn!(repository = %local_repo, tag = %tag, error = %e, "sync of a tag failed");
                    entry.status().last_error = Some(format!("{upstream_repo}:{tag}: {e}"));
                }
            }
        }
    }
    out
}

async fn list_tags(
    client: &UpstreamClient,
    repo: &RepoName,
) -> Result<Vec<Tag>, crate::upstream::UpstreamError> {
    let mut out = Vec::new();
    let mut last: Option<String> = None;
    loop {
        let page = client.tags(repo, Some(TAG_PAGE), last.as_deref()).await?;
        let done = !page.more || page.tags.is_empty();
        last = page.tags.last().cloned();
        out.extend(page.tags.iter().filter_map(|t| t.parse::<Tag>().ok()));
        if done {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TagPattern;

    #[test]
    fn globs_and_regexes_match_whole_tags() {
        let p: TagPattern = "1.*".parse().unwrap();
        assert!(p.matches("1.0") && p.matches("1.") && !p.matches("11.0") && !p.matches("v1.0"));
        let p: TagPattern = "v?".parse().unwrap();
        assert!(p.matches("v1") && !p.matches("v10"));
        let p: TagPattern = "regex:v[0-9]+\\.[0-9]+".parse().unwrap();
        assert!(p.matches("v1.22") && !p.matches("v1.22-rc1") && !p.matches("xv1.2"));
        let p: TagPattern = "regex:a|b".parse().unwrap();
        assert!(p.matches("a") && p.matches("b") && !p.matches("ab"));
        assert!("regex:(".parse::<TagPattern>().is_err());
    }
}
