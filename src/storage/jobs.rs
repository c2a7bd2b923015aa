//! The durable replication queue: one job per (destination, repository,
//! reference), behind the narrow [`JobStore`] trait, with a redb
//! implementation that shares the metadata database file.

use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Result, StorageError};
use crate::oci::{Digest, Reference, RepoName};

/// `dest\0repo\0reference` → JSON [`Stored`]
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("replication_jobs");
/// `dest\0repo\0reference` → seq, for every PENDING or RUNNING job
const ACTIVE: TableDefinition<&str, u64> = TableDefinition::new("replication_active");
/// `"seq"` → the last sequence number handed out
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("replication_counters");

/// What a job replicates: one reference of one repository, to one
/// destination. Repeated requests for the same key coalesce into one job.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobKey {
    pub destination: String,
    pub repository: RepoName,
    pub reference: Reference,
}

impl JobKey {
    fn encode(&self) -> String {
        format!(
            "{}\0{}\0{}",
            self.destination, self.repository, self.reference
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    /// Waiting for a worker (also after a failed attempt, until retried).
    Pending,
    /// A worker is copying it.
    Running,
    Complete,
    /// Gave up: `max_attempts` spent or a permanent error. Kept with its
    /// reason until retried.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub key: JobKey,
    pub state: JobState,
    /// Bumped by every enqueue of the key: a run that started at an older
    /// seq cannot complete the job.
    pub seq: u64,
    /// Failed attempts since the job was last enqueued.
    pub attempts: u32,
    /// Unix ms of the oldest request not yet replicated.
    pub enqueued_ms: u64,
    /// Unix ms of the last change.
    pub updated_ms: u64,
    /// The digest last replicated (COMPLETE) or being replicated.
    pub digest: Option<Digest>,
    /// Why the last attempt failed.
    pub error: Option<String>,
    /// The blob upload in progress at the destination, to resume after a
    /// crash.
    pub upload: Option<UploadCheckpoint>,
    /// Who runs it, while RUNNING in a queue shared by several replicas.
    pub holder: Option<String>,
    /// Unix ms when the holder's lease ends unless renewed: a RUNNING job
    /// whose lease has ended (its replica was lost) can be taken over.
    /// `None`: held until the process restarts (a queue of one process).
    pub lease_until_ms: Option<u64>,
    /// Unix ms before which it waits (backoff after a failed attempt, or a
    /// destination that is down), whichever replica looks at it.
    pub not_before_ms: Option<u64>,
}

impl Job {
    /// Whether a worker may start it now: PENDING and past its backoff, or
    /// RUNNING under a lease that has ended.
    pub fn runnable(&self, now_ms: u64) -> bool {
        match self.state {
            JobState::Pending => self.not_before_ms.is_none_or(|t| t <= now_ms),
            JobState::Running => self.lease_until_ms.is_some_and(|t| t < now_ms),
            JobState::Complete | JobState::Failed => false,
        }
    }

    /// The job `enqueue` leaves for `key`, given what the queue held.
    pub(crate) fn rearmed(old: Option<Job>, key: JobKey, seq: u64, now_ms: u64) -> Job {
        match old {
            Some(old) => Job {
                state: if old.state == JobState::Running {
                    // The run in progress cannot complete it (its seq is
                    // older); it goes back to PENDING then.
                    JobState::Running
                } else {
                    JobState::Pending
                },
                seq,
                attempts: 0,
                enqueued_ms: match old.state {
                    JobState::Pending | JobState::Running => old.enqueued_ms,
                    _ => now_ms,
                },
                updated_ms: now_ms,
                error: None,
                ..old
            },
            None => Job {
                key,
                state: JobState::Pending,
                seq,
                attempts: 0,
                enqueued_ms: now_ms,
                updated_ms: now_ms,
                digest: None,
                error: None,
                upload: None,
                holder: None,
                lease_until_ms: None,
                not_before_ms: None,
            },
        }
    }

    /// Starts a run for `holder` (with a lease until `lease_until_ms`), if
    /// the job is [`runnable`](Job::runnable).
    pub(crate) fn started(
        mut self,
        digest: Option<&Digest>,
        now_ms: u64,
        holder: Option<&str>,
        lease_until_ms: Option<u64>,
    ) -> Option<Job> {
        if !self.runnable(now_ms) {
            return None;
        }
        self.state = JobState::Running;
        self.updated_ms = now_ms;
        if let Some(d) = digest {
            self.digest = Some(d.clone());
        }
        self.holder = holder.map(str::to_string);
        self.lease_until_ms = lease_until_ms;
        Some(self)
    }

    /// Ends the run that started at `seq` with `outcome` (see
    /// [`JobStore`]'s contract for a job re-enqueued meanwhile).
    pub(crate) fn finished(mut self, seq: u64, outcome: Outcome, now_ms: u64) -> Job {
        self.updated_ms = now_ms;
        self.holder = None;
        self.lease_until_ms = None;
        self.not_before_ms = match &outcome {
            Outcome::Retry { not_before_ms, .. } | Outcome::Wait { not_before_ms, .. } => {
                Some(*not_before_ms)
            }
            Outcome::Complete { .. } | Outcome::Failed { .. } => None,
        };
        if self.seq != seq {
            // Re-enqueued during the run: run again for the newer request.
            self.state = JobState::Pending;
            if let Outcome::Complete { digest } = outcome {
                self.digest = digest;
            }
            return self;
        }
        match outcome {
            Outcome::Complete { digest } => {
                self.upload = None;
                self.state = JobState::Complete;
                self.digest = digest;
                self.error = None;
                self.attempts = 0;
            }
            Outcome::Retry { error, .. } => {
                self.state = JobState::Pending;
                self.attempts += 1;
                self.error = Some(error);
            }
            Outcome::Wait { error, .. } => {
                self.state = JobState::Pending;
                self.error = Some(error);
            }
            Outcome::Failed { error } => {
                self.upload = None;
                self.state = JobState::Failed;
                self.attempts += 1;
                self.error = Some(error);
            }
        }
        self
    }

    /// PENDING → FAILED without a run; `None` when not pending.
    pub(crate) fn given_up(mut self, error: String, now_ms: u64) -> Option<Job> {
        if self.state != JobState::Pending {
            return None;
        }
        self.state = JobState::Failed;
        self.upload = None;
        self.not_before_ms = None;
        self.error = Some(error);
        self.updated_ms = now_ms;
        Some(self)
    }

    /// FAILED → PENDING with no attempts spent.
    pub(crate) fn retried(mut self, now_ms: u64) -> Job {
        self.state = JobState::Pending;
        self.not_before_ms = None;
        self.attempts = 0;
        self.enqueued_ms = now_ms;
        self.updated_ms = now_ms;
        self
    }
}

/// Where a blob upload stands at the destination: the blob and the upload
/// session's latest location (its offset is asked of the destination).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UploadCheckpoint {
    pub digest: Digest,
    pub location: String,
}

/// Picks jobs: every field that is set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    pub destination: Option<String>,
    pub repository: Option<RepoName>,
    pub reference: Option<Reference>,
}

impl JobFilter {
    pub fn matches(&self, key: &JobKey) -> bool {
        self.destination
            .as_ref()
            .is_none_or(|d| *d == key.destination)
            && self
                .repository
                .as_ref()
                .is_none_or(|r| *r == key.repository)
            && self.reference.as_ref().is_none_or(|r| *r == key.reference)
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Complete {
        digest: Option<Digest>,
    },
    /// Try again from `not_before_ms` (Unix ms); counts an attempt.
    Retry {
        error: String,
        not_before_ms: u64,
    },
    /// Try again from `not_before_ms` without counting an attempt (the
    /// destination was down; the job is not at fault).
    Wait {
        error: String,
        not_before_ms: u64,
    },
    /// Give up.
    Failed {
        error: String,
    },
}

/// The replication queue.
///
/// Contract: every mutating call is atomic and durable when it returns Ok
/// (a job enqueued before a push is acknowledged survives kill -9). A key
/// has at most one job; enqueueing an existing key re-arms it (PENDING,
/// attempts 0, a new `seq`) and keeps the enqueue time of a job still
/// waiting. `finish` with a `seq` older than the job's leaves it PENDING:
/// a request that arrived during a run is never lost.
///
/// A queue shared by several replicas hands a job to one of them at a time:
/// `start` gives the caller a lease of [`lease_ttl`](JobStore::lease_ttl),
/// which its worker keeps with `renew`. When a replica is lost its leases
/// end, and another replica's `start` takes the job over. `finish` and
/// `checkpoint` from a replica that no longer holds the job change nothing.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Creates or re-arms one job per key, in one transaction.
    async fn enqueue(&self, keys: &[JobKey], now_ms: u64) -> Result<()>;
    /// Every PENDING or RUNNING job, in key order.
    async fn active(&self) -> Result<Vec<Job>>;
    /// Every job (of `repository`, when given), in key order.
    async fn list(&self, repository: Option<&RepoName>) -> Result<Vec<Job>>;
    async fn get(&self, key: &JobKey) -> Result<Option<Job>>;
    /// How long a run's lease lasts unless renewed; `None` for a queue of
    /// one process (a run lasts until `finish` or a restart).
    fn lease_ttl(&self) -> Option<std::time::Duration> {
        None
    }
    /// PENDING → RUNNING (or takes over a RUNNING job whose lease ended).
    /// `None` when the job is not [`runnable`](Job::runnable).
    async fn start(
        &self,
        key: &JobKey,
        digest: Option<&Digest>,
        now_ms: u64,
    ) -> Result<Option<Job>>;
    /// Ends the run that started at `seq` with `outcome` (see the trait's
    /// contract for a job re-enqueued meanwhile). Returns the job.
    async fn finish(&self, key: &JobKey, seq: u64, outcome: Outcome, now_ms: u64) -> Result<Job>;
    /// PENDING → FAILED with `error`, without a run (its destination is no
    /// longer configured). Other jobs are left as they are.
    async fn fail_pending(&self, key: &JobKey, error: String, now_ms: u64) -> Result<()>;
    /// Records (or clears) the blob upload a running job has in progress.
    async fn checkpoint(&self, key: &JobKey, upload: Option<UploadCheckpoint>) -> Result<()>;
    /// Extends this replica's lease of a running job; `false` when it no
    /// longer holds the job (its run must stop). Always `true` without
    /// leases.
    async fn renew(&self, key: &JobKey, now_ms: u64) -> Result<bool>;
    /// At start: RUNNING → PENDING for the runs of this process that a
    /// crash cut short (a shared queue lets their leases end instead).
    /// Returns how many.
    async fn recover(&self) -> Result<usize>;
    /// FAILED → PENDING (attempts 0) for the jobs `select` picks. Returns
    /// how many.
    async fn retry_failed(&self, filter: &JobFilter, now_ms: u64) -> Result<usize>;
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    state: JobState,
    seq: u64,
    attempts: u32,
    enqueued_ms: u64,
    updated_ms: u64,
    #[serde(default)]
    digest: Option<Digest>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    upload: Option<UploadCheckpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    holder: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease_until_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    not_before_ms: Option<u64>,
}

impl Stored {
    fn of(job: &Job) -> Stored {
        Stored {
            state: job.state,
            seq: job.seq,
            attempts: job.attempts,
            enqueued_ms: job.enqueued_ms,
            updated_ms: job.updated_ms,
            digest: job.digest.clone(),
            error: job.error.clone(),
            upload: job.upload.clone(),
            holder: job.holder.clone(),
            lease_until_ms: job.lease_until_ms,
            not_before_ms: job.not_before_ms,
        }
    }

    fn into_job(self, key: JobKey) -> Job {
        Job {
            key,
            state: self.state,
            seq: self.seq,
            attempts: self.attempts,
            enqueued_ms: self.enqueued_ms,
            updated_ms: self.updated_ms,
            digest: self.digest,
            error: self.error,
            upload: self.upload,
            holder: self.holder,
            lease_until_ms: self.lease_until_ms,
            not_before_ms: self.not_before_ms,
        }
    }
}

/// A job as one self-contained JSON document (key included), for stores
/// that keep one object per job.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct JobDocument {
    destination: String,
    repository: String,
    reference: String,
    #[serde(flatten)]
    stored: Stored,
}

impl JobDocument {
    pub(crate) fn encode(job: &Job) -> Result<Vec<u8>> {
        serde_json::to_vec(&JobDocument {
            destination: job.key.destination.clone(),
            repository: job.key.repository.to_string(),
            reference: job.key.reference.to_string(),
            stored: Stored::of(job),
        })
        .map_err(meta_err)
    }

    pub(crate) fn decode(body: &[u8]) -> Result<Job> {
        let d: JobDocument = serde_json::from_slice(body).map_err(meta_err)?;
        let key = JobKey {
            destination: d.destination,
            repository: d.repository.parse().map_err(meta_err)?,
            reference: d.reference.parse().map_err(meta_err)?,
        };
        Ok(d.stored.into_job(key))
    }
}

fn meta_err(e: impl std::fmt::Display) -> StorageError {
    StorageError::Meta(e.to_string())
}

fn decode(k: &str, v: &[u8]) -> Result<Job> {
    let mut parts = k.splitn(3, '\0');
    let (Some(d), Some(r), Some(f)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(meta_err(format!("bad job key {k:?}")));
    };
    let s: Stored = serde_json::from_slice(v).map_err(meta_err)?;
    Ok(s.into_job(JobKey {
        destination: d.to_string(),
        repository: r.parse().map_err(meta_err)?,
        reference: f.parse().map_err(meta_err)?,
    }))
}

fn encode(job: &Job) -> Result<Vec<u8>> {
    serde_json::to_vec(&Stored::of(job)).map_err(meta_err)
}

/// The redb queue, in the metadata database (see
/// [`super::meta::RedbMeta::database`]).
pub struct RedbJobs {
    db: Arc<Database>,
}

impl RedbJobs {
    pub fn open(db: Arc<Database>) -> Result<RedbJobs> {
        let txn = db.begin_write().map_err(meta_err)?;
        {
            txn.open_table(JOBS).map_err(meta_err)?;
            txn.open_table(ACTIVE).map_err(meta_err)?;
            txn.open_table(COUNTERS).map_err(meta_err)?;
        }
        txn.commit().map_err(meta_err)?;
        Ok(RedbJobs { db })
    }

    async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&redb::WriteTransaction) -> Result<T> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().map_err(meta_err)?;
            let out = f(&txn)?;
            txn.commit().map_err(meta_err)?;
            Ok(out)
        })
        .await
        .map_err(meta_err)?
    }

    fn read_all(&self, only_active: bool, repo: Option<&RepoName>) -> Result<Vec<Job>> {
        let txn = self.db.begin_read().map_err(meta_err)?;
        let jobs = txn.open_table(JOBS).map_err(meta_err)?;
        let mut out = Vec::new();
        if only_active {
            let active = txn.open_table(ACTIVE).map_err(meta_err)?;
            for row in active.iter().map_err(meta_err)? {
                let (k, _) = row.map_err(meta_err)?;
                if let Some(v) = jobs.get(k.value()).map_err(meta_err)? {
                    out.push(decode(k.value(), v.value())?);
                }
            }
        } else {
            for row in jobs.iter().map_err(meta_err)? {
                let (k, v) = row.map_err(meta_err)?;
                let job = decode(k.value(), v.value())?;
                if repo.is_none_or(|r| *r == job.key.repository) {
                    out.push(job);
                }
            }
        }
        Ok(out)
    }
}

fn get_job(txn: &redb::WriteTransaction, k: &str) -> Result<Option<Job>> {
    let t = txn.open_table(JOBS).map_err(meta_err)?;
    let v = t.get(k).map_err(meta_err)?;
    v.map(|v| decode(k, v.value())).transpose()
}

fn put_job(txn: &redb::WriteTransaction, job: &Job) -> Result<()> {
    let k = job.key.encode();
    let v = encode(job)?;
    txn.open_table(JOBS)
        .map_err(meta_err)?
        .insert(k.as_str(), v.as_slice())
        .map_err(meta_err)?;
    let mut active = txn.open_table(ACTIVE).map_err(meta_err)?;
    match job.state {
        JobState::Pending | JobState::Running => {
            active.insert(k.as_str(), job.seq).map_err(meta_err)?;
        }
        JobState::Complete | JobState::Failed => {
            active.remove(k.as_str()).map_err(meta_err)?;
        }
    }
    Ok(())
}

#[async_trait]
impl JobStore for RedbJobs {
    async fn enqueue(&self, keys: &[JobKey], now_ms: u64) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let keys = keys.to_vec();
        self.run(move |txn| {
            let mut counters = txn.open_table(COUNTERS).map_err(meta_err)?;
            let mut seq = counters
                .get("seq")
                .map_err(meta_err)?
                .map_or(0, |v| v.value());
            for key in keys {
                seq += 1;
                let old = get_job(txn, &key.encode())?;
                put_job(txn, &Job::rearmed(old, key, seq, now_ms))?;
            }
            counters.insert("seq", seq).map_err(meta_err)?;
            Ok(())
        })
        .await
    }

    async fn active(&self) -> Result<Vec<Job>> {
        self.read_all(true, None)
    }

    async fn list(&self, repository: Option<&RepoName>) -> Result<Vec<Job>> {
        self.read_all(false, repository)
    }

    async fn get(&self, key: &JobKey) -> Result<Option<Job>> {
        let k = key.encode();
        let txn = self.db.begin_read().map_err(meta_err)?;
        let t = txn.open_table(JOBS).map_err(meta_err)?;
        let v = t.get(k.as_str()).map_err(meta_err)?;
        v.map(|v| decode(&k, v.value())).transpose()
    }

    async fn start(
        &self,
        key: &JobKey,
        digest: Option<&Digest>,
        now_ms: u64,
    ) -> Result<Option<Job>> {
        let k = key.encode();
        let digest = digest.cloned();
        self.run(move |txn| {
            let Some(job) =
                get_job(txn, &k)?.and_then(|j| j.started(digest.as_ref(), now_ms, None, None))
            else {
                return Ok(None);
            };
            put_job(txn, &job)?;
            Ok(Some(job))
        })
        .await
    }

    async fn finish(&self, key: &JobKey, seq: u64, outcome: Outcome, now_ms: u64) -> Result<Job> {
        let k = key.encode();
        self.run(move |txn| {
            let job = get_job(txn, &k)?
                .ok_or(StorageError::NotFound)?
                .finished(seq, outcome, now_ms);
            put_job(txn, &job)?;
            Ok(job)
        })
        .await
    }

    async fn checkpoint(&self, key: &JobKey, upload: Option<UploadCheckpoint>) -> Result<()> {
        let k = key.encode();
        self.run(move |txn| {
            let Some(mut job) = get_job(txn, &k)? else {
                return Ok(());
            };
            if job.state == JobState::Running && job.upload != upload {
                job.upload = upload;
                put_job(txn, &job)?;
            }
            Ok(())
        })
        .await
    }

    async fn renew(&self, _key: &JobKey, _now_ms: u64) -> Result<bool> {
        Ok(true)
    }

    async fn fail_pending(&self, key: &JobKey, error: String, now_ms: u64) -> Result<()> {
        let k = key.encode();
        self.run(move |txn| {
            if let Some(job) = get_job(txn, &k)?.and_then(|j| j.given_up(error, now_ms)) {
                put_job(txn, &job)?;
            }
            Ok(())
        })
        .await
    }

    async fn recover(&self) -> Result<usize> {
        let running: Vec<Job> = self
            .read_all(true, None)?
            .into_iter()
            .filter(|j| j.state == JobState::Running)
            .collect();
        let n = running.len();
        self.run(move |txn| {
            for mut job in running {
                job.state = JobState::Pending;
                put_job(txn, &job)?;
            }
            Ok(n)
        })
        .await
    }

    async fn retry_failed(&self, filter: &JobFilter, now_ms: u64) -> Result<usize> {
        let picked: Vec<Job> = self
            .read_all(false, None)?
            .into_iter()
            .filter(|j| j.state == JobState::Failed && filter.matches(&j.key))
            .collect();
        let n = picked.len();
        self.run(move |txn| {
            for job in picked {
                put_job(txn, &job.retried(now_ms))?;
            }
            Ok(n)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(dest: &str, repo: &str, r: &str) -> JobKey {
        JobKey {
            destination: dest.into(),
            repository: repo.parse().unwrap(),
            reference: r.parse().unwrap(),
        }
    }

    fn open(path: &std::path::Path) -> RedbJobs {
        let meta = crate::storage::meta::RedbMeta::open(path).unwrap();
        RedbJobs::open(meta.database()).unwrap()
    }

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(&dir.path().join("meta.redb"));
        crate::storage::conformance::job_store_suite(Arc::new(q)).await;
    }

    #[tokio::test]
    async fn a_run_cut_short_by_a_restart_runs_again_with_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let q = open(&path);
        let a = key("eu", "prod/app", "1");
        q.enqueue(std::slice::from_ref(&a), 10).await.unwrap();
        let run = q.start(&a, None, 11).await.unwrap().unwrap();
        assert_eq!(run.lease_until_ms, None, "one process: no lease");
        assert!(!run.runnable(u64::MAX), "held until the process restarts");
        let at = UploadCheckpoint {
            digest: Digest::sha256_of(b"layer"),
            location: "/v2/prod/app/blobs/uploads/x?_state=1".into(),
        };
        q.checkpoint(&a, Some(at.clone())).await.unwrap();
        drop(q);

        let q = open(&path);
        assert_eq!(q.recover().await.unwrap(), 1);
        let resumed = q.start(&a, None, 17).await.unwrap().unwrap();
        assert_eq!(resumed.upload, Some(at), "the upload checkpoint survives");
        assert_eq!(resumed.seq, run.seq);
    }
}
