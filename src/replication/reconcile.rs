//! Reconciliation: compares every rule's repositories and tags with each
//! destination and enqueues what is missing or points elsewhere. It repairs
//! misses (a job lost to an operator's `rm`, content pushed before the rule
//! existed) and runs periodically and on demand (`wharf replication sync`).
//!
//! Tags are compared by digest with one `HEAD` each; a destination that
//! cannot be reached is skipped for this pass (its queued jobs wait anyway).
//! Untagged manifests are not compared: they replicate through their push
//! jobs and as the referrers and children of tagged ones.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Replication;
use crate::oci::{Reference, RepoName};
use crate::registry::{MAX_PAGE, Registry};
use crate::storage::jobs::JobKey;

/// One thing found missing or different.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Planned {
    pub destination: String,
    pub repository: String,
    pub reference: String,
    /// `missing` at the destination, or `different` (another digest).
    pub reason: &'static str,
}

/// What a pass found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Plan {
    pub planned: Vec<Planned>,
    /// Repositories and tags compared.
    pub repositories: usize,
    pub tags: usize,
    /// Destinations skipped because they could not be reached.
    pub unreachable: Vec<String>,
}

/// Compares the repositories of rule `only` (every rule when `None`) with
/// their destinations; enqueues the differences unless `dry_run`.
pub async fn reconcile(
    rep: &Replication,
    registry: &Registry,
    only: Option<usize>,
    dry_run: bool,
) -> anyhow::Result<Plan> {
    if let Some(i) = only
        && i >= rep.rules.len()
    {
        anyhow::bail!(
            "there is no replication rule {i} ({} rules)",
            rep.rules.len()
        );
    }
    let mut plan = Plan::default();
    // Only PENDING and RUNNING jobs are active.
    let active: HashSet<JobKey> = rep
        .jobs
        .active()
        .await?
        .into_iter()
        .map(|j| j.key)
        .collect();
    let mut repos = Vec::new();
    let mut last: Option<String> = None;
    loop {
        let page = registry.catalog(last.as_deref(), Some(MAX_PAGE)).await?;
        last = page.items.last().cloned();
        repos.extend(page.items.iter().filter_map(|r| r.parse::<RepoName>().ok()));
        if !page.more {
            break;
        }
    }
    let mut seen: HashSet<JobKey> = HashSet::new();
    let mut unreachable: HashSet<String> = HashSet::new();
    for (i, rule) in rep.rules.iter().enumerate() {
        if only.is_some_and(|o| o != i) {
            continue;
        }
        for repo in repos.iter().filter(|r| rule.matches(r)) {
            if registry.is_cached(repo).await? && !rule.include_pulled_through {
                continue;
            }
            plan.repositories += 1;
            let tags = registry.local_tags(repo).await?;
            for tag in tags {
                plan.tags += 1;
                let Some(digest) = registry.local_tag(repo, &tag).await? else {
                    continue;
                };
                let reference = Reference::Tag(tag.clone());
                for name in &rule.destinations {
                    if unreachable.contains(name) {
                        continue;
                    }
                    let Some(dest) = rep.destinations.get(name) else {
                        continue;
                    };
                    let key = JobKey {
                        destination: name.clone(),
                        repository: repo.clone(),
                        reference: reference.clone(),
                    };
                    if active.contains(&key) || !seen.insert(key.clone()) {
                        continue;
                    }
                    let Ok(target_repo) = dest.repository(repo) else {
                        continue;
                    };
                    let there = match dest
                        .client
                        .manifest_digest_if_present(&target_repo, &reference)
                        .await
                    {
                        Ok(d) => d,
                        Err(e) if e.is_unavailable() => {
                            tracing::warn!(destination = %name, error = %e, "reconciliation skips an unreachable destination");
                            unreachable.insert(name.clone());
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(destination = %name, repository = %repo, tag = %tag, error = %e, "reconciliation could not compare a tag");
                            continue;
                        }
                    };
                    let reason = match there {
                        None => "missing",
                        Some(d) if d != digest => "different",
                        Some(_) => continue,
                    };
                    plan.planned.push(Planned {
                        destination: name.clone(),
                        repository: repo.to_string(),
                        reference: reference.to_string(),
                        reason,
                    });
                    if !dry_run {
                        rep.enqueue(&[key]).await?;
                    }
                }
            }
        }
    }
    plan.unreachable = unreachable.into_iter().collect();
    plan.unreachable.sort();
    Ok(plan)
}

/// Reconciles every `interval` (first pass right after start), until
/// `stop`.
pub async fn run_periodic(
    rep: Arc<Replication>,
    registry: Registry,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let pass = tokio::select! {
            r = reconcile(&rep, &registry, None, false) => r,
            () = stop.cancelled() => return,
        };
        match pass {
            Ok(p) if p.planned.is_empty() => {
                tracing::debug!(
                    repositories = p.repositories,
                    tags = p.tags,
                    "reconciliation found nothing to do"
                )
            }
            Ok(p) => tracing::info!(
                enqueued = p.planned.len(),
                repositories = p.repositories,
                tags = p.tags,
                "reconciliation enqueued what destinations were missing"
            ),
            Err(e) => tracing::warn!(error = %e, "reconciliation failed"),
        }
    }
}
