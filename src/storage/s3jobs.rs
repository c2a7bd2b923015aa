//! The replication queue in the S3 bucket, shared by every replica: one
//! JSON object per job, changed only by compare-and-swap, and a lease on
//! every running job so that one replica at a time runs it and a lost
//! replica's jobs are taken over when its leases end.
//!
//! Keys under `<prefix>/meta/` (`<repo>` as in [`super::s3meta`];
//! `<dest>` and `<ref>` escaped so each is one key segment):
//! - `jobs/<repo>/<dest>/<ref>`: the job ([`JobDocument`]);
//! - `jobs-active/<repo>/<dest>/<ref>`: an empty marker while the job is
//!   PENDING or RUNNING, so the scheduler reads the active jobs and not
//!   every job ever replicated.
//!
//! **Markers.** `enqueue` writes the marker before and after it arms the
//! job; retiring a marker deletes it and then reads the job again, putting
//! the marker back if the job became active meanwhile. Whatever the
//! interleaving, an active job always has its marker (a stray marker of an
//! ended job is harmless: the job is read and skipped).
//!
//! **Leases.** `start` writes the caller's holder id and a wall-clock
//! expiry into the job; the worker renews it at a third of its lifetime.
//! Expiry is wall-clock time because replicas on different machines share
//! nothing else. A job RUNNING under an ended lease is runnable again
//! ([`Job::runnable`]); the holder that lost it learns so from `renew` and
//! stops, and its `finish` and `checkpoint` change nothing.

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use object_store::path::Path;

use super::jobs::{
    Job, JobDocument, JobFilter, JobKey, JobState, JobStore, Outcome, UploadCheckpoint,
};
use super::s3meta::{S3Meta, enc_repo};
use super::{Result, StorageError};
use crate::oci::{Digest, Reference, RepoName};

/// Concurrent requests when a call touches many jobs.
const CONCURRENCY: usize = 16;

/// Escapes a key segment: ASCII letters, digits, `_`, `-` and (not first)
/// `.` stay; every other byte becomes `!XX` (`!` is in no name, tag or
/// digest, and object_store leaves it as it is, unlike `~` or `%`).
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, b) in s.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0) {
            out.push(b as char);
        } else {
            out.push_str(&format!("!{b:02X}"));
        }
    }
    out
}

fn rel(key: &JobKey) -> String {
    let reference = match &key.reference {
        Reference::Tag(t) => escape(t.as_str()),
        Reference::Digest(d) => escape(d.as_str()),
    };
    format!(
        "{}/{}/{reference}",
        enc_repo(key.repository.as_str()),
        escape(&key.destination)
    )
}

pub struct S3Jobs {
    meta: S3Meta,
    /// This process's id in the leases it takes.
    holder: String,
    ttl: Duration,
}

impl S3Jobs {
    /// A queue over `meta`'s bucket whose runs hold leases of `ttl`.
    pub fn new(meta: S3Meta, ttl: Duration) -> S3Jobs {
        S3Jobs {
            meta,
            holder: format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()),
            ttl,
        }
    }

    /// This replica's holder id.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    fn job_key(&self, key: &JobKey) -> Path {
        self.meta.key(&format!("jobs/{}", rel(key)))
    }

    fn marker_key(&self, key: &JobKey) -> Path {
        self.meta.key(&format!("jobs-active/{}", rel(key)))
    }

    async fn read(&self, key: &JobKey) -> Result<Option<Job>> {
        self.read_named(&rel(key)).await
    }

    /// The job named `name` (relative to `jobs/`).
    async fn read_named(&self, name: &str) -> Result<Option<Job>> {
        match self
            .meta
            .get(&self.meta.key(&format!("jobs/{name}")))
            .await?
        {
            Some(b) => Ok(Some(JobDocument::decode(&b)?)),
            None => Ok(None),
        }
    }

    /// Compare-and-swap on one job: `f` maps the current job to the new
    /// one (`None`: leave it). Returns what `f` returned last (the job as
    /// written), or `None` when it left the job alone.
    async fn change<F>(&self, key: &JobKey, mut f: F) -> Result<Option<Job>>
    where
        F: FnMut(Option<Job>) -> Result<Option<Job>> + Send,
    {
        let mut written = None;
        let changed = self
            .meta
            .update(&self.job_key(key), |cur| {
                let cur = cur.map(JobDocument::decode).transpose()?;
                written = f(cur)?;
                written.as_ref().map(JobDocument::encode).transpose()
            })
            .await?;
        Ok(if changed { written } else { None })
    }

    async fn put_marker(&self, key: &JobKey) -> Result<()> {
        self.meta.put(&self.marker_key(key), Vec::new()).await
    }

    /// Removes the marker of a job that ended, unless it became active
    /// meanwhile (see the module's doc).
    async fn retire_marker(&self, key: &JobKey) -> Result<()> {
        self.retire_marker_named(&rel(key)).await
    }

    /// [`retire_marker`](S3Jobs::retire_marker) by the job's relative name:
    /// delete the marker, then read the job again and put the marker back
    /// if it is active, or if the job cannot be read (a stray marker is
    /// harmless, a missing one strands the job).
    async fn retire_marker_named(&self, name: &str) -> Result<()> {
        let marker = self.meta.key(&format!("jobs-active/{name}"));
        self.meta.remove(&marker).await?;
        match self.read_named(name).await {
            Ok(Some(j)) if matches!(j.state, JobState::Pending | JobState::Running) => {
                self.meta.put(&marker, Vec::new()).await
            }
            Ok(_) => Ok(()),
            Err(e) => {
                self.meta.put(&marker, Vec::new()).await?;
                Err(e)
            }
        }
    }

    /// Every job under `rel` (relative to `meta/`), in key order.
    async fn read_all(&self, rel: &str) -> Result<Vec<Job>> {
        let objects = self.meta.list(rel).await?;
        let bodies = self
            .meta
            .bodies(objects.into_iter().map(|(_, o)| o).collect())
            .await?;
        let mut jobs = bodies
            .iter()
            .map(|b| JobDocument::decode(b))
            .collect::<Result<Vec<Job>>>()?;
        jobs.sort_by(|a, b| key_order(&a.key).cmp(&key_order(&b.key)));
        Ok(jobs)
    }
}

fn key_order(k: &JobKey) -> (&str, &str, String) {
    (
        k.destination.as_str(),
        k.repository.as_str(),
        k.reference.to_string(),
    )
}

#[async_trait]
impl JobStore for S3Jobs {
    async fn enqueue(&self, keys: &[JobKey], now_ms: u64) -> Result<()> {
        futures::stream::iter(keys.iter().cloned())
            .map(|key| async move {
                self.put_marker(&key).await?;
                self.change(&key, |old| {
                    let seq = old.as_ref().map_or(0, |j| j.seq) + 1;
                    Ok(Some(Job::rearmed(old, key.clone(), seq, now_ms)))
                })
                .await?;
                self.put_marker(&key).await
            })
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<Result<()>>>()
            .await
            .into_iter()
            .collect()
    }

    async fn active(&self) -> Result<Vec<Job>> {
        let markers = self.meta.list("jobs-active").await?;
        let found: Vec<(String, Option<Job>)> = futures::stream::iter(markers)
            .map(|(name, _)| async move {
                // A marker is named as the job it marks.
                let job = self.read_named(&name).await?;
                Ok::<_, StorageError>((name, job))
            })
            .buffered(CONCURRENCY)
            .collect::<Vec<Result<_>>>()
            .await
            .into_iter()
            .collect::<Result<_>>()?;
        let mut active = Vec::new();
        for (name, job) in found {
            match job {
                Some(j) if matches!(j.state, JobState::Pending | JobState::Running) => {
                    active.push(j)
                }
                // An ended job, or an enqueue that has written its marker
                // and not yet its job (or stopped there, unacknowledged):
                // retired only if the job is still not active afterwards.
                _ => self.retire_marker_named(&name).await?,
            }
        }
        active.sort_by(|a, b| key_order(&a.key).cmp(&key_order(&b.key)));
        Ok(active)
    }

    async fn list(&self, repository: Option<&RepoName>) -> Result<Vec<Job>> {
        match repository {
            Some(r) => {
                self.read_all(&format!("jobs/{}", enc_repo(r.as_str())))
                    .await
            }
            None => self.read_all("jobs").await,
        }
    }

    async fn get(&self, key: &JobKey) -> Result<Option<Job>> {
        self.read(key).await
    }

    fn lease_ttl(&self) -> Option<Duration> {
        Some(self.ttl)
    }

    async fn start(
        &self,
        key: &JobKey,
        digest: Option<&Digest>,
        now_ms: u64,
    ) -> Result<Option<Job>> {
        let until = now_ms + self.ttl.as_millis() as u64;
        let job = self
            .change(key, |cur| {
                Ok(cur.and_then(|j| j.started(digest, now_ms, Some(&self.holder), Some(until))))
            })
            .await?;
        Ok(job)
    }

    async fn finish(&self, key: &JobKey, seq: u64, outcome: Outcome, now_ms: u64) -> Result<Job> {
        let mut current = None;
        let written = self
            .change(key, |cur| {
                let job = cur.ok_or(StorageError::NotFound)?;
                if job.state != JobState::Running || job.holder.as_deref() != Some(&self.holder) {
                    // Only the run that holds the job ends it.
                    // Taken over (or ended) by another replica: its run
                    // decides.
                    current = Some(job);
                    return Ok(None);
                }
                current = None;
                Ok(Some(job.finished(seq, outcome.clone(), now_ms)))
            })
            .await?;
        match (written, current) {
            (Some(job), _) => {
                if !matches!(job.state, JobState::Pending | JobState::Running) {
                    self.retire_marker(key).await?;
                }
                Ok(job)
            }
            (None, Some(job)) => Ok(job),
            (None, None) => Err(StorageError::NotFound),
        }
    }

    async fn fail_pending(&self, key: &JobKey, error: String, now_ms: u64) -> Result<()> {
        let failed = self
            .change(key, |cur| {
                Ok(cur.and_then(|j| j.given_up(error.clone(), now_ms)))
            })
            .await?;
        if failed.is_some() {
            self.retire_marker(key).await?;
        }
        Ok(())
    }

    async fn checkpoint(&self, key: &JobKey, upload: Option<UploadCheckpoint>) -> Result<()> {
        self.change(key, |cur| {
            Ok(cur.and_then(|mut j| {
                let ours =
                    j.state == JobState::Running && j.holder.as_deref() == Some(&self.holder);
                (ours && j.upload != upload).then(|| {
                    j.upload = upload.clone();
                    j
                })
            }))
        })
        .await?;
        Ok(())
    }

    async fn renew(&self, key: &JobKey, now_ms: u64) -> Result<bool> {
        let until = now_ms + self.ttl.as_millis() as u64;
        let renewed = self
            .change(key, |cur| {
                Ok(cur.and_then(|mut j| {
                    let ours =
                        j.state == JobState::Running && j.holder.as_deref() == Some(&self.holder);
                    ours.then(|| {
                        j.lease_until_ms = Some(until);
                        j
                    })
                }))
            })
            .await?;
        Ok(renewed.is_some())
    }

    async fn recover(&self) -> Result<usize> {
        // This process holds nothing yet; runs that a crash cut short are
        // taken over when their leases end.
        Ok(0)
    }

    async fn retry_failed(&self, filter: &JobFilter, now_ms: u64) -> Result<usize> {
        let picked: Vec<Job> = self
            .read_all("jobs")
            .await?
            .into_iter()
            .filter(|j| j.state == JobState::Failed && filter.matches(&j.key))
            .collect();
        let mut n = 0;
        for job in picked {
            self.put_marker(&job.key).await?;
            let retried = self
                .change(&job.key, |cur| {
                    Ok(cur
                        .filter(|j| j.state == JobState::Failed)
                        .map(|j| j.retried(now_ms)))
                })
                .await?;
            if retried.is_some() {
                n += 1;
            } else {
                self.retire_marker(&job.key).await?;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn escaped_segments_are_plain_and_distinct() {
        assert_eq!(escape("eu-west-1"), "eu-west-1");
        assert_eq!(escape("v1.2"), "v1.2");
        assert_eq!(escape(".."), "!2E.");
        assert_eq!(escape("a/b"), "a!2Fb");
        assert_eq!(escape("sha256:ab"), "sha256!3Aab");
        assert_ne!(escape("a!2F"), escape("a/"));
        for s in ["eu-west-1", "..", "a/b", "sha256:ab", "x y~%"] {
            let e = escape(s);
            assert_eq!(
                object_store::path::Path::from(e.as_str()).as_ref(),
                e,
                "{s}"
            );
        }
    }
}
