//! The workers: a scheduler that starts due jobs within each destination's
//! concurrency limit, and one task per running job.
//!
//! A destination's pause is on tokio's clock; the timestamps kept in the
//! durable queue are wall-clock: enqueue time (status and lag), a job's
//! backoff (so that every replica of a shared queue honours it, and it
//! survives a restart) and the leases of a queue shared through the bucket.
//! After a restart every job is due at once: jobs cut short by a crash
//! (still RUNNING in the queue) run again. In a queue shared by several
//! replicas a run holds a lease that its task renews; the scheduler looks
//! again when another replica's lease ends, so a lost replica's jobs are
//! taken over, and a run whose lease was taken stops.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::copy::{Copy, CopyError, catch_panic};
use super::endpoints::{Checkpoints, JobTarget, LocalSource, RemoteTarget};
use super::{Destination, Replication, ReplicationMetrics, unix_ms};
use crate::registry::Registry;
use crate::storage::jobs::{Job, JobKey, JobState, JobStore, Outcome};
use crate::upstream::retry::backoff_between;

/// The scheduler looks at the queue at least this often (it is also woken
/// by every enqueue and every finished job).
const POLL: Duration = Duration::from_secs(30);

struct Shared {
    rep: Arc<Replication>,
    source: LocalSource,
    targets: HashMap<String, Arc<RemoteTarget>>,
    in_flight: Mutex<HashSet<JobKey>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs jobs until `stop`.
pub async fn run(rep: Arc<Replication>, registry: Registry, stop: CancellationToken) {
    match rep.jobs.recover().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            jobs = n,
            "resuming replication jobs interrupted by a restart"
        ),
        Err(e) => tracing::error!(error = %e, "could not recover replication jobs"),
    }
    let targets = rep
        .destinations
        .values()
        .map(|d| {
            let metrics = rep.metrics.clone();
            let labels = ReplicationMetrics::labels(&d.name);
            let target = RemoteTarget {
                client: d.client.clone(),
                chunk_size: d.chunk_size,
                known: moka::sync::Cache::new(100_000),
                on_sent: Box::new(move |n| {
                    metrics.bytes_sent.get_or_create(&labels).inc_by(n);
                }),
            };
            (d.name.clone(), Arc::new(target))
        })
        .collect();
    let shared = Arc::new(Shared {
        rep: rep.clone(),
        source: LocalSource { registry },
        targets,
        in_flight: Mutex::new(HashSet::new()),
    });
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let next = schedule(&shared, &mut tasks, &stop).await;
        while let Some(done) = tasks.try_join_next() {
            if let Err(e) = done {
                tracing::error!(error = %e, "a replication task ended abnormally");
            }
        }
        tokio::select! {
            () = rep.wake.notified() => {}
            () = tokio::time::sleep_until(next) => {}
            () = stop.cancelled() => break,
        }
    }
    // Running jobs see `stop` and end; they stay RUNNING in a queue of one
    // process and run again after the next start (a shared queue gets them
    // back as PENDING at once).
    while tasks.join_next().await.is_some() {}
}

/// Starts every due job that has a free slot; returns when to look again.
async fn schedule(
    shared: &Arc<Shared>,
    tasks: &mut tokio::task::JoinSet<()>,
    stop: &CancellationToken,
) -> Instant {
    let rep = &shared.rep;
    let now = Instant::now();
    let mut next = now + POLL;
    let active = match rep.jobs.active().await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "reading the replication queue failed");
            return now + Duration::from_secs(1);
        }
    };
    record_queue(rep, &active);
    let now_ms = unix_ms();
    for job in active {
        if lock(&shared.in_flight).contains(&job.key) {
            continue;
        }
        if !job.runnable(now_ms) {
            // Backing off, or held by another replica: look again when the
            // backoff or the lease ends.
            let until = match job.state {
                JobState::Pending => job.not_before_ms,
                _ => job.lease_until_ms,
            };
            if let Some(until) = until {
                next = next.min(now + Duration::from_millis(until.saturating_sub(now_ms) + 100));
            }
            continue;
        }
        let Some(dest) = rep.destinations.get(&job.key.destination).cloned() else {
            let error = format!(
                "destination {:?} is no longer configured",
                job.key.destination
            );
            let _ = rep.jobs.fail_pending(&job.key, error, unix_ms()).await;
            continue;
        };
        let paused_until = lock(&rep.paused).get(&dest.name).map(|p| p.0);
        if let Some(t) = paused_until
            && t > now
        {
            next = next.min(t);
            continue;
        }
        let Ok(permit) = rep.permits[&dest.name].clone().try_acquire_owned() else {
            continue;
        };
        lock(&shared.in_flight).insert(job.key.clone());
        let (shared, stop) = (shared.clone(), stop.clone());
        tasks.spawn(async move {
            // Released however the task ends, a panic included.
            let _in_flight = InFlight {
                shared: shared.clone(),
                key: job.key.clone(),
                permit: Some(permit),
            };
            run_job(&shared, &dest, job, &stop).await;
        });
    }
    next
}

/// A job this process is running: its slot of the destination's
/// concurrency and its place in `in_flight`, given back on drop (so that a
/// task that panicked does not keep them) and the scheduler woken.
struct InFlight {
    shared: Arc<Shared>,
    key: JobKey,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // The slot first, so the woken scheduler finds it free.
        drop(self.permit.take());
        lock(&self.shared.in_flight).remove(&self.key);
        self.shared.rep.wake.notify_one();
    }
}

/// Queue depth and lag gauges, by destination.
fn record_queue(rep: &Replication, active: &[Job]) {
    let now = unix_ms();
    let mut by_dest: HashMap<&str, (i64, u64)> = rep
        .destinations
        .keys()
        .map(|d| (d.as_str(), (0, now)))
        .collect();
    for j in active {
        if let Some(e) = by_dest.get_mut(j.key.destination.as_str()) {
            e.0 += 1;
            e.1 = e.1.min(j.enqueued_ms);
        }
    }
    for (d, (depth, oldest)) in by_dest {
        let labels = ReplicationMetrics::labels(d);
        rep.metrics.queue_depth.get_or_create(&labels).set(depth);
        let lag = (now.saturating_sub(oldest) / 1000) as i64;
        rep.metrics.lag_seconds.get_or_create(&labels).set(lag);
    }
}

/// Renews this replica's lease of a running job until the queue says it
/// is no longer ours (another replica took it over after the lease ran
/// out); never returns while the lease holds. Pending forever without
/// leases.
async fn hold_lease(jobs: &dyn JobStore, key: &JobKey) {
    let Some(ttl) = jobs.lease_ttl() else {
        return std::future::pending().await;
    };
    // Renewed at a third of its lifetime; a run that could not renew it
    // for two thirds stops before another replica may take the job over.
    let mut renewed = Instant::now();
    loop {
        tokio::time::sleep(ttl / 3).await;
        match jobs.renew(key, unix_ms()).await {
            Ok(true) => renewed = Instant::now(),
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(error = %e, "renewing a replication job's lease failed");
                if renewed.elapsed() >= ttl * 2 / 3 {
                    return;
                }
            }
        }
    }
}

async fn run_job(shared: &Shared, dest: &Destination, job: Job, stop: &CancellationToken) {
    let rep = &shared.rep;
    let key = job.key.clone();
    let started = match rep.jobs.start(&key, None, unix_ms()).await {
        Ok(Some(j)) => j,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(error = %e, "starting a replication job failed");
            return;
        }
    };
    if job.state == JobState::Running {
        tracing::info!(
            destination = %dest.name,
            repository = %key.repository,
            reference = %key.reference,
            previous_holder = job.holder.as_deref().unwrap_or("-"),
            "took over a replication job whose lease had ended"
        );
    }
    // A bug met by this run (a panic anywhere in it) fails this job with
    // the panic's message, instead of leaving it RUNNING for ever.
    let outcome = match catch_panic(attempt(shared, dest, &started, stop)).await {
        Ok(Some(outcome)) => outcome,
        Ok(None) => return,
        Err(panic) => {
            let labels = ReplicationMetrics::labels(&dest.name);
            rep.metrics.failures.get_or_create(&labels).inc();
            let error = format!("the replication run panicked: {panic}");
            tracing::error!(
                destination = %dest.name,
                repository = %key.repository,
                reference = %key.reference,
                %error,
                "replication job failed"
            );
            Outcome::Failed { error }
        }
    };
    if let Err(e) = rep.jobs.finish(&key, started.seq, outcome, unix_ms()).await {
        tracing::error!(error = %e, "recording a replication outcome failed");
    }
}

/// One run of a started job: the copy, and the outcome to record. `None`:
/// the run stopped (shutdown, or its lease was lost) and records nothing.
async fn attempt(
    shared: &Shared,
    dest: &Destination,
    started: &Job,
    stop: &CancellationToken,
) -> Option<Outcome> {
    let rep = &shared.rep;
    let key = &started.key;
    let labels = ReplicationMetrics::labels(&dest.name);
    let result = match dest.repository(&key.repository) {
        Err(e) => Err(CopyError::Permanent(e)),
        Ok(target_repo) => {
            let jobs = rep.jobs.clone();
            let checkpoint_key = key.clone();
            let target = JobTarget {
                remote: &shared.targets[&dest.name],
                checkpoints: Checkpoints {
                    resume: Mutex::new(started.upload.clone()),
                    save: Box::new(move |at| {
                        let (jobs, key) = (jobs.clone(), checkpoint_key.clone());
                        Box::pin(async move {
                            if let Err(e) = jobs.checkpoint(&key, at).await {
                                tracing::warn!(error = %e, "recording an upload checkpoint failed");
                            }
                        })
                    }),
                },
            };
            let copy = Copy::new(&shared.source, &key.repository, &target, &target_repo);
            tokio::select! {
                r = copy.run(&key.reference) => r,
                () = stop.cancelled() => {
                    if rep.jobs.lease_ttl().is_some() {
                        // A shared queue: hand the job back now rather than
                        // when the lease ends.
                        let outcome = Outcome::Wait {
                            error: "the replica running it shut down".into(),
                            not_before_ms: unix_ms(),
                        };
                        let _ = rep.jobs.finish(key, started.seq, outcome, unix_ms()).await;
                    }
                    return None;
                }
                () = hold_lease(&*rep.jobs, key) => {
                    tracing::warn!(
                        destination = %dest.name,
                        repository = %key.repository,
                        reference = %key.reference,
                        "lost the lease of a replication job to another replica; stopping this run"
                    );
                    return None;
                }
            }
        }
    };
    Some(match result {
        Ok(copied) => {
            lock(&rep.paused).remove(&dest.name);
            if !copied.superseded {
                rep.metrics.completed.get_or_create(&labels).inc();
            }
            tracing::info!(
                destination = %dest.name,
                repository = %key.repository,
                reference = %key.reference,
                digest = copied.digest.as_ref().map(|d| d.as_str()).unwrap_or("-"),
                blobs = copied.blobs_sent,
                bytes = copied.bytes_sent,
                manifests = copied.manifests_sent,
                superseded = copied.superseded,
                "replicated"
            );
            if copied.superseded {
                // The source's tag moved during the copy: run again for
                // its new target (a push that moved it also re-armed the
                // job; this covers any other way).
                Outcome::Wait {
                    error: "the tag moved during the copy; copying its new target".into(),
                    not_before_ms: unix_ms(),
                }
            } else {
                Outcome::Complete {
                    digest: copied.digest,
                }
            }
        }
        Err(e) => {
            rep.metrics.failures.get_or_create(&labels).inc();
            let now = Instant::now();
            let outcome = match e {
                CopyError::Unavailable(error) => {
                    let mut paused = lock(&rep.paused);
                    let streak = paused.get(&dest.name).map_or(0, |p| p.1);
                    let delay = backoff_between(streak, dest.retry_initial, dest.retry_max);
                    paused.insert(dest.name.clone(), (now + delay, streak + 1, error.clone()));
                    Outcome::Wait {
                        error,
                        not_before_ms: unix_ms() + delay.as_millis() as u64,
                    }
                }
                CopyError::Permanent(error) => Outcome::Failed { error },
                CopyError::Retry(error) if started.attempts + 1 >= dest.max_attempts => {
                    Outcome::Failed {
                        error: format!("{error} (after {} attempts)", started.attempts + 1),
                    }
                }
                CopyError::Retry(error) => {
                    let delay =
                        backoff_between(started.attempts, dest.retry_initial, dest.retry_max);
                    Outcome::Retry {
                        error,
                        not_before_ms: unix_ms() + delay.as_millis() as u64,
                    }
                }
            };
            tracing::warn!(
                destination = %dest.name,
                repository = %key.repository,
                reference = %key.reference,
                outcome = ?outcome,
                "replication attempt failed"
            );
            outcome
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::oci::{Digest, RepoName};
    use crate::storage::jobs::{JobFilter, UploadCheckpoint};
    use crate::storage::{Result, StorageError};

    /// A shared queue whose bucket no longer answers this replica's
    /// renewals (only `lease_ttl` and `renew` are called).
    struct Unreachable {
        renewals: AtomicU32,
    }

    #[async_trait]
    impl JobStore for Unreachable {
        fn lease_ttl(&self) -> Option<Duration> {
            Some(Duration::from_secs(30))
        }
        async fn renew(&self, _: &JobKey, _: u64) -> Result<bool> {
            self.renewals.fetch_add(1, Ordering::SeqCst);
            Err(StorageError::Meta("connection refused".into()))
        }
        async fn enqueue(&self, _: &[JobKey], _: u64) -> Result<()> {
            unreachable!()
        }
        async fn active(&self) -> Result<Vec<Job>> {
            unreachable!()
        }
        async fn list(&self, _: Option<&RepoName>) -> Result<Vec<Job>> {
            unreachable!()
        }
        async fn get(&self, _: &JobKey) -> Result<Option<Job>> {
            unreachable!()
        }
        async fn start(&self, _: &JobKey, _: Option<&Digest>, _: u64) -> Result<Option<Job>> {
            unreachable!()
        }
        async fn finish(&self, _: &JobKey, _: u64, _: Outcome, _: u64) -> Result<Job> {
            unreachable!()
        }
        async fn fail_pending(&self, _: &JobKey, _: String, _: u64) -> Result<()> {
            unreachable!()
        }
        async fn checkpoint(&self, _: &JobKey, _: Option<UploadCheckpoint>) -> Result<()> {
            unreachable!()
        }
        async fn recover(&self) -> Result<usize> {
            unreachable!()
        }
        async fn retry_failed(&self, _: &JobFilter, _: u64) -> Result<usize> {
            unreachable!()
        }
    }

    /// A run whose renewals fail gives the job up before its lease ends
    /// (another replica may take it over then), not when the bucket
    /// answers again.
    #[tokio::test(start_paused = true)]
    async fn a_run_that_cannot_renew_stops_before_its_lease_ends() {
        let jobs = Unreachable {
            renewals: AtomicU32::new(0),
        };
        let key = JobKey {
            destination: "eu".into(),
            repository: "prod/app".parse().unwrap(),
            reference: "1".parse().unwrap(),
        };
        let t0 = Instant::now();
        tokio::time::timeout(Duration::from_secs(30), hold_lease(&jobs, &key))
            .await
            .expect("still running when the lease ended");
        let held = t0.elapsed();
        assert!(held >= Duration::from_secs(20), "gave up after {held:?}");
        assert_eq!(jobs.renewals.load(Ordering::SeqCst), 2);
    }

    /// A run that panics (here: a destination missing from the targets
    /// the scheduler built, a broken invariant) ends FAILED with the
    /// panic's message, instead of unwinding out of the job's task and
    /// leaving the job RUNNING.
    #[tokio::test]
    async fn a_run_that_panics_ends_failed_with_the_message() {
        use crate::registry::Registry;
        use crate::storage::fs::FsStore;
        use crate::storage::jobs::RedbJobs;
        use crate::storage::meta::RedbMeta;
        use crate::upstream::{UpstreamClient, UpstreamSettings};

        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FsStore::open(dir.path()).unwrap());
        let meta = Arc::new(RedbMeta::open(&dir.path().join("meta.redb")).unwrap());
        let jobs = Arc::new(RedbJobs::open(meta.database()).unwrap());
        let client =
            UpstreamClient::new(UpstreamSettings::new("http://127.0.0.1:9".parse().unwrap()))
                .unwrap();
        let dest = Destination {
            name: "eu".into(),
            url: "http://127.0.0.1:9".into(),
            region: None,
            registry_id: None,
            client,
            repository_prefix: None,
            max_concurrency: 1,
            chunk_size: 1 << 20,
            max_attempts: 3,
            retry_initial: Duration::from_millis(10),
            retry_max: Duration::from_millis(10),
        };
        let rep = Arc::new(Replication::new(
            vec![dest],
            Vec::new(),
            jobs,
            Duration::ZERO,
        ));
        let key = JobKey {
            destination: "eu".into(),
            repository: "prod/app".parse().unwrap(),
            reference: "1".parse().unwrap(),
        };
        rep.enqueue(std::slice::from_ref(&key)).await.unwrap();
        let shared = Shared {
            rep: rep.clone(),
            source: LocalSource {
                registry: Registry::new(store.clone(), store, meta),
            },
            targets: HashMap::new(),
            in_flight: Mutex::new(HashSet::new()),
        };
        let job = rep.jobs.get(&key).await.unwrap().unwrap();
        let dest = rep.destinations["eu"].clone();
        run_job(&shared, &dest, job, &CancellationToken::new()).await;
        let job = rep.jobs.get(&key).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Failed);
        let error = job.error.unwrap_or_default();
        assert!(
            error.contains("panicked") && error.contains("no entry found for key"),
            "{error}"
        );
    }
}
