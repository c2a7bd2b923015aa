//! Replication: rule-based push replication to other registries, durable
//! and idempotent.
//!
//! - [`Replication::manifest_pushed`] (the registry's [`PushObserver`])
//!   enqueues one job per matching destination in the durable
//!   [`JobStore`] before the push is acknowledged.
//! - [`worker`] runs jobs: per-destination concurrency, backoff with
//!   jitter, a destination that is down pauses its jobs without spending
//!   their attempts, FAILED after `max_attempts` (or at once when refused).
//! - [`copy`] is the copy engine (blobs, children, manifest, tag,
//!   referrers); [`endpoints`] its local source and remote target.
//! - [`reconcile`] compares the source with each destination and enqueues
//!   what is missing or different.
//!
//! A job names (destination, repository, reference) and nothing else: the
//! worker copies whatever the reference points at when it runs, so
//! repeated pushes coalesce and a tag's destination ends at its newest
//! digest.

pub mod copy;
pub mod endpoints;
pub mod reconcile;
pub mod sync;
pub mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use crate::oci::{Digest, Reference, RepoName};
use crate::registry::PushObserver;
use crate::storage::StorageError;
use crate::storage::jobs::{Job, JobFilter, JobKey, JobState, JobStore};
use crate::upstream::UpstreamClient;

/// A destination, ready to use.
pub struct Destination {
    pub name: String,
    pub url: String,
    pub region: Option<String>,
    pub registry_id: Option<String>,
    pub client: UpstreamClient,
    /// Prepended to repository names at the destination.
    pub repository_prefix: Option<RepoName>,
    pub max_concurrency: usize,
    pub chunk_size: u64,
    pub max_attempts: u32,
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

impl Destination {
    /// The repository's name at this destination.
    pub fn repository(&self, repo: &RepoName) -> Result<RepoName, String> {
        match &self.repository_prefix {
            None => Ok(repo.clone()),
            Some(p) => format!("{p}/{repo}")
                .parse()
                .map_err(|e| format!("{p}/{repo} is not a valid repository name: {e}")),
        }
    }
}

/// A rule: repositories by prefix → destinations.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Empty: every repository.
    pub prefixes: Vec<String>,
    pub destinations: Vec<String>,
    pub include_pulled_through: bool,
}

impl Rule {
    pub fn matches(&self, repo: &RepoName) -> bool {
        self.prefixes.is_empty() || self.prefixes.iter().any(|p| repo.as_str().starts_with(p))
    }
}

/// Per-destination labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabels {
    pub destination: String,
}

/// What replication counts, by destination.
#[derive(Clone, Debug, Default)]
pub struct ReplicationMetrics {
    /// Jobs waiting or running.
    pub queue_depth: Family<DestinationLabels, Gauge>,
    /// Seconds since the oldest push not yet replicated.
    pub lag_seconds: Family<DestinationLabels, Gauge>,
    pub bytes_sent: Family<DestinationLabels, Counter>,
    /// Failed attempts (each retry counts) and jobs marked FAILED.
    pub failures: Family<DestinationLabels, Counter>,
    pub completed: Family<DestinationLabels, Counter>,
}

impl ReplicationMetrics {
    pub fn labels(dest: &str) -> DestinationLabels {
        DestinationLabels {
            destination: dest.to_string(),
        }
    }
}

/// Replication as a whole: destinations, rules, the queue, and the wake-up
/// signal of the workers.
pub struct Replication {
    pub destinations: HashMap<String, Arc<Destination>>,
    pub rules: Vec<Rule>,
    pub jobs: Arc<dyn JobStore>,
    pub wake: Arc<Notify>,
    pub metrics: ReplicationMetrics,
    /// Jobs of each destination running at once.
    pub(crate) permits: HashMap<String, Arc<Semaphore>>,
    /// Destinations that are down: not tried again before this instant.
    pub(crate) paused: Mutex<HashMap<String, (Instant, u32, String)>>,
    pub reconcile_interval: Duration,
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Replication {
    pub fn new(
        destinations: Vec<Destination>,
        rules: Vec<Rule>,
        jobs: Arc<dyn JobStore>,
        reconcile_interval: Duration,
    ) -> Replication {
        let permits = destinations
            .iter()
            .map(|d| (d.name.clone(), Arc::new(Semaphore::new(d.max_concurrency))))
            .collect();
        Replication {
            destinations: destinations
                .into_iter()
                .map(|d| (d.name.clone(), Arc::new(d)))
                .collect(),
            rules,
            jobs,
            wake: Arc::new(Notify::new()),
            metrics: ReplicationMetrics::default(),
            permits,
            paused: Mutex::new(HashMap::new()),
            reconcile_interval,
        }
    }

    /// Destinations of the rules matching a pushed (hosted) repository,
    /// or, when `pulled`, of the rules that replicate `repo` when it holds
    /// content pulled through the cache (`include_pulled_through`).
    pub fn destinations_for(&self, repo: &RepoName, pulled: bool) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for rule in self
            .rules
            .iter()
            .filter(|r| (!pulled || r.include_pulled_through) && r.matches(repo))
        {
            for d in &rule.destinations {
                if !out.contains(d) {
                    out.push(d.clone());
                }
            }
        }
        out
    }

    /// One job key per destination of `repo` (see
    /// [`Replication::destinations_for`]) for `reference`.
    fn job_keys(&self, repo: &RepoName, reference: &Reference, pulled: bool) -> Vec<JobKey> {
        self.destinations_for(repo, pulled)
            .into_iter()
            .map(|destination| JobKey {
                destination,
                repository: repo.clone(),
                reference: reference.clone(),
            })
            .collect()
    }

    /// Enqueues `keys` durably and wakes the workers.
    pub async fn enqueue(&self, keys: &[JobKey]) -> Result<(), StorageError> {
        if keys.is_empty() {
            return Ok(());
        }
        self.jobs.enqueue(keys, unix_ms()).await?;
        self.wake.notify_one();
        Ok(())
    }

    /// Puts FAILED jobs matching `filter` back in the queue.
    pub async fn retry(&self, filter: &JobFilter) -> Result<usize, StorageError> {
        let n = self.jobs.retry_failed(filter, unix_ms()).await?;
        self.wake.notify_one();
        Ok(n)
    }

    /// Status of the jobs of `repo` (every job when `None`), optionally of
    /// one reference: a tag, or a digest (matching jobs by digest too).
    pub async fn status(
        &self,
        repo: Option<&RepoName>,
        reference: Option<&Reference>,
    ) -> Result<Vec<Job>, StorageError> {
        let mut jobs = self.jobs.list(repo).await?;
        if let Some(r) = reference {
            jobs.retain(|j| {
                j.key.reference == *r
                    || matches!(r, Reference::Digest(d) if j.digest.as_ref() == Some(d))
            });
        }
        Ok(jobs)
    }

    /// The state of a destination that is down: until when it waits, and
    /// why.
    pub fn pause_of(&self, dest: &str) -> Option<(Duration, String)> {
        let paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        paused.get(dest).and_then(|(until, _, why)| {
            let now = Instant::now();
            (*until > now).then(|| (*until - now, why.clone()))
        })
    }
}

/// The status ECR reports for a job: IN_PROGRESS, COMPLETE or FAILED.
pub fn status_name(state: JobState) -> &'static str {
    match state {
        JobState::Pending | JobState::Running => "IN_PROGRESS",
        JobState::Complete => "COMPLETE",
        JobState::Failed => "FAILED",
    }
}

#[async_trait]
impl crate::cache::PullObserver for Replication {
    async fn manifest_pulled(
        &self,
        repo: &RepoName,
        tag: Option<&crate::oci::Tag>,
        digest: &Digest,
    ) {
        let reference = match tag {
            Some(t) => Reference::Tag(t.clone()),
            None => Reference::Digest(digest.clone()),
        };
        let keys = self.job_keys(repo, &reference, true);
        if let Err(e) = self.enqueue(&keys).await {
            // Reconciliation picks it up later.
            tracing::warn!(repository = %repo, error = %e, "could not enqueue pulled-through content for replication");
        }
    }
}

#[async_trait]
impl PushObserver for Replication {
    async fn manifest_pushed(
        &self,
        repo: &RepoName,
        reference: &Reference,
        _digest: &Digest,
    ) -> Result<(), StorageError> {
        self.enqueue(&self.job_keys(repo, reference, false)).await
    }
}

impl crate::metrics::Report for ReplicationMetrics {
    fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "replication_queue_depth",
            "Replication jobs waiting or running, by destination",
            self.queue_depth.clone(),
        );
        r.register(
            "replication_lag_seconds",
            "Seconds since the oldest push not yet replicated, by destination",
            self.lag_seconds.clone(),
        );
        r.register(
            "replication_bytes_sent",
            "Blob bytes sent to replication destinations",
            self.bytes_sent.clone(),
        );
        r.register(
            "replication_failures",
            "Failed replication attempts, by destination",
            self.failures.clone(),
        );
        r.register(
            "replication_completed",
            "Replication jobs completed, by destination",
            self.completed.clone(),
        );
    }
}
