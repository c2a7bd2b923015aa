//! Operations endpoints beside the registry API: health and readiness
//! probes, Prometheus metrics, and the cache's admin API (stats, forced
//! refresh) that `wharf cache` talks to.
//!
//! - `GET /healthz`: the process answers (liveness).
//! - `GET /readyz`: storage answers (readiness); 503 with the reason if not.
//! - `GET /metrics`: the Prometheus text exposition.
//! - `GET /_wharf/cache/stats`: budget, hit and miss counts, fills, as JSON.
//! - `POST /_wharf/cache/refresh?ref=NAME:TAG` (or `NAME@DIGEST`): fetch a
//!   cached manifest from upstream now, whatever its age.
//!
//! - `GET /_wharf/replication/status[?repo=NAME[&ref=TAG|DIGEST]]`: every
//!   replication job (of a repository, of an image) with its state
//!   (IN_PROGRESS, COMPLETE, FAILED and the reason), and the destinations.
//! - `POST /_wharf/replication/retry[?destination=&repo=&ref=]`: FAILED
//!   jobs back into the queue.
//! - `POST /_wharf/replication/sync[?rule=N][&dry_run=true]`: compare the
//!   source with the destinations now and enqueue the differences.
//!
//! - `GET /_wharf/sync/status`: each `[[sync]]` entry and its last pass.
//!
//! - `POST /_wharf/fsck`: re-hash every stored blob now, quarantining those
//!   that do not match (`wharf fsck --server`). The answer streams as JSON
//!   lines: `{"corrupt":D,"computed":C}` per bad blob, an empty line at
//!   most every second while blobs check out, and last
//!   `{"checked":N,"corrupt":M}` (or `{"error":...}`). One at a time (429
//!   while one runs); it stops if the client goes away.
//!
//! Errors use the distribution spec's JSON error format.

use http::{HeaderValue, Method, Response, StatusCode, header};

use super::error::{error_response, registry_error};
use super::{App, Query, Resp, full, json};
use crate::metrics::{BLOB, MANIFEST};
use crate::oci::{ErrorCode, Reference, RepoName};
use crate::replication::reconcile::reconcile;
use crate::replication::{Replication, status_name, unix_ms};
use crate::storage::jobs::{JobFilter, JobState};

impl App {
    /// Answers an operations path, or `None` for any other path.
    pub(super) async fn operations(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
    ) -> Option<Resp> {
        let resp = match (method, path) {
            (&Method::GET | &Method::HEAD, "/healthz") => {
                json(StatusCode::OK, r#"{"status":"ok"}"#)
            }
            (&Method::GET | &Method::HEAD, "/readyz") => self.readyz().await,
            (&Method::GET, "/metrics") => {
                let mut r = Response::new(full(self.metrics.encode()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            (&Method::GET, "/_wharf/cache/stats") => self.cache_stats(),
            (&Method::POST, "/_wharf/cache/refresh") => self.refresh(&Query::parse(query)).await,
            (&Method::GET, "/_wharf/replication/status") => {
                self.replication_status(&Query::parse(query)).await
            }
            (&Method::POST, "/_wharf/replication/retry") => {
                self.replication_retry(&Query::parse(query)).await
            }
            (&Method::POST, "/_wharf/replication/sync") => {
                self.replication_sync(&Query::parse(query)).await
            }
            (&Method::GET, "/_wharf/sync/status") => self.sync_status(),
            (&Method::POST, "/_wharf/fsck") => self.fsck(),
            (
                _,
                "/healthz"
                | "/readyz"
                | "/metrics"
                | "/_wharf/cache/stats"
                | "/_wharf/cache/refresh"
                | "/_wharf/replication/status"
                | "/_wharf/replication/retry"
                | "/_wharf/replication/sync"
                | "/_wharf/sync/status"
                | "/_wharf/fsck",
            ) => error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::Unsupported,
                &format!("method {method} is not supported on {path}"),
            ),
            _ => return None,
        };
        Some(resp)
    }

    fn fsck(&self) -> Resp {
        use futures::StreamExt as _;
        let Ok(guard) = self.fsck_running.clone().try_lock_owned() else {
            return error_response(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::TooManyRequests,
                "an fsck is already running",
            );
        };
        struct Run<S> {
            checks: std::pin::Pin<Box<S>>,
            checked: u64,
            corrupt: u64,
            last: tokio::time::Instant,
            done: bool,
            _one_at_a_time: tokio::sync::OwnedMutexGuard<()>,
        }
        let run = Run {
            checks: Box::pin(self.registry.fsck()),
            checked: 0,
            corrupt: 0,
            last: tokio::time::Instant::now(),
            done: false,
            _one_at_a_time: guard,
        };
        let line = |v: serde_json::Value| bytes::Bytes::from(format!("{v}\n"));
        let body = futures::stream::unfold(run, move |mut run| async move {
            if run.done {
                return None;
            }
            loop {
                let out = match run.checks.next().await {
                    Some(Ok(c)) => {
                        run.checked += 1;
                        match c.corrupt {
                            Some(computed) => {
                                run.corrupt += 1;
                                tracing::error!(digest = %c.digest, %computed, "fsck: corrupt blob quarantined");
                                line(serde_json::json!({
                                    "corrupt": c.digest.as_str(),
                                    "computed": computed.as_str(),
                                }))
                            }
                            None if run.last.elapsed() >= std::time::Duration::from_secs(1) => {
                                bytes::Bytes::from_static(b"\n")
                            }
                            None => continue,
                        }
                    }
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "fsck failed");
                        run.done = true;
                        line(serde_json::json!({ "error": e.to_string() }))
                    }
                    None => {
                        run.done = true;
                        line(serde_json::json!({ "checked": run.checked, "corrupt": run.corrupt }))
                    }
                };
                run.last = tokio::time::Instant::now();
                return Some((Ok(out), run));
            }
        });
        let mut r = Response::new(super::stream_body(body.boxed()));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        );
        r
    }

    async fn readyz(&self) -> Resp {
        match self.registry.ready().await {
            Ok(()) => json(StatusCode::OK, r#"{"status":"ready"}"#),
            Err(e) => {
                tracing::warn!(error = %e, "readiness check failed");
                let body = serde_json::json!({ "status": "unavailable", "reason": e.to_string() });
                json(StatusCode::SERVICE_UNAVAILABLE, body.to_string())
            }
        }
    }

    fn cache_stats(&self) -> Resp {
        let Some(cache) = self.registry.cache() else {
            return error_response(
                StatusCode::NOT_FOUND,
                ErrorCode::NameUnknown,
                "the pull-through cache is off (no [[pull_through]] rules)",
            );
        };
        let (blob_hits, blob_misses) = cache.counters.get(&BLOB);
        let (manifest_hits, manifest_misses) = cache.counters.get(&MANIFEST);
        let f = &cache.fills.counters;
        let body = serde_json::json!({
            "budget": cache.budget.stats(),
            "blobs": { "hits": blob_hits, "misses": blob_misses },
            "manifests": { "hits": manifest_hits, "misses": manifest_misses },
            "revalidations": cache.counters.revalidations.get(),
            "stale_serves": cache.counters.stale_serves.get(),
            "fills": {
                "started": f.started.get(),
                "in_progress": cache.fills.active_count(),
                "coalesced_waiters": f.coalesced.get(),
                "failed": f.failed.get(),
                "corrupt": f.corrupt.get(),
                "upstream_bytes": f.upstream_bytes.get(),
            },
            "evictions": cache.budget.metrics.evictions.get(),
            "evicted_bytes": cache.budget.metrics.evicted_bytes.get(),
            "rules": cache.rules().0.iter().map(|r| serde_json::json!({
                "prefix": r.prefix.as_ref().map_or("ROOT", |p| p.as_str()),
                "upstream": r.upstream.host(),
            })).collect::<Vec<_>>(),
        });
        json(StatusCode::OK, body.to_string())
    }

    async fn refresh(&self, query: &Query) -> Resp {
        let Some(image) = query.get("ref") else {
            return error_response(
                StatusCode::BAD_REQUEST,
                ErrorCode::NameInvalid,
                "missing ref=NAME:TAG or ref=NAME@DIGEST",
            );
        };
        let (name, reference) = match split_ref(image) {
            Ok(x) => x,
            Err(msg) => {
                return error_response(StatusCode::BAD_REQUEST, ErrorCode::NameInvalid, &msg);
            }
        };
        match self.registry.refresh(&name, &reference).await {
            Ok(hit) => {
                let body = serde_json::json!({
                    "name": name.as_str(),
                    "reference": reference.to_string(),
                    "digest": hit.digest.as_str(),
                    "media_type": hit.media_type,
                    "size": hit.size,
                });
                json(StatusCode::OK, body.to_string())
            }
            Err(e) => registry_error(&e),
        }
    }
}

fn bad_request(msg: &str) -> Resp {
    error_response(StatusCode::BAD_REQUEST, ErrorCode::NameInvalid, msg)
}

fn internal(e: impl std::fmt::Display) -> Resp {
    tracing::error!(error = %e, "replication operation failed");
    super::error::internal_error()
}

/// The `repo`, `ref` and `destination` parameters as a job filter.
fn job_filter(query: &Query) -> Result<JobFilter, Box<Resp>> {
    let repository =
        match query.get("repo") {
            None | Some("") => None,
            Some(r) => Some(r.parse::<RepoName>().map_err(|e| {
                Box::new(bad_request(&format!("invalid repository name {r:?}: {e}")))
            })?),
        };
    let reference = match query.get("ref") {
        None | Some("") => None,
        Some(_) if repository.is_none() => return Err(Box::new(bad_request("ref needs repo"))),
        Some(r) => Some(
            r.parse::<Reference>()
                .map_err(|e| Box::new(bad_request(&format!("invalid tag or digest {r:?}: {e}"))))?,
        ),
    };
    Ok(JobFilter {
        destination: query
            .get("destination")
            .filter(|d| !d.is_empty())
            .map(str::to_string),
        repository,
        reference,
    })
}

fn ms_to_rfc3339(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

impl App {
    fn replication(&self) -> Result<&Replication, Box<Resp>> {
        self.replication.as_deref().ok_or_else(|| {
            Box::new(error_response(
                StatusCode::NOT_FOUND,
                ErrorCode::NameUnknown,
                "replication is not configured (no [[replication.rules]])",
            ))
        })
    }

    /// Replication and the jobs `query` selects.
    fn replication_jobs(&self, query: &Query) -> Result<(&Replication, JobFilter), Box<Resp>> {
        Ok((self.replication()?, job_filter(query)?))
    }

    async fn replication_status(&self, query: &Query) -> Resp {
        let (rep, filter) = match self.replication_jobs(query) {
            Ok(r) => r,
            Err(resp) => return *resp,
        };
        let jobs = match rep
            .status(filter.repository.as_ref(), filter.reference.as_ref())
            .await
        {
            Ok(j) => j,
            Err(e) => return internal(e),
        };
        let now = unix_ms();
        let jobs: Vec<_> = jobs
            .iter()
            .filter(|j| {
                filter
                    .destination
                    .as_ref()
                    .is_none_or(|d| *d == j.key.destination)
            })
            .map(|j| {
                let dest = rep.destinations.get(&j.key.destination);
                let in_progress = matches!(j.state, JobState::Pending | JobState::Running);
                // A job waiting for a destination that is down shows why.
                let reason = match (&j.error, in_progress) {
                    (Some(e), _) => Some(e.clone()),
                    (None, true) => rep
                        .pause_of(&j.key.destination)
                        .map(|(_, why)| format!("waiting for the destination: {why}")),
                    (None, false) => None,
                };
                serde_json::json!({
                    "destination": j.key.destination,
                    "region": dest.and_then(|d| d.region.clone()),
                    "registry_id": dest.and_then(|d| d.registry_id.clone()),
                    "repository": j.key.repository.as_str(),
                    "reference": j.key.reference.to_string(),
                    "digest": j.digest.as_ref().map(|d| d.as_str()),
                    "status": status_name(j.state),
                    "running": j.state == JobState::Running,
                    // With a queue shared by replicas: which one runs it.
                    "holder": j.holder,
                    "next_attempt_at": j
                        .not_before_ms
                        .filter(|_| j.state == JobState::Pending)
                        .map(ms_to_rfc3339),
                    "attempts": j.attempts,
                    "failure_reason": reason,
                    "enqueued_at": ms_to_rfc3339(j.enqueued_ms),
                    "updated_at": ms_to_rfc3339(j.updated_ms),
                    "lag_seconds": in_progress.then(|| now.saturating_sub(j.enqueued_ms) / 1000),
                })
            })
            .collect();
        let mut names: Vec<&String> = rep.destinations.keys().collect();
        names.sort();
        let destinations: Vec<_> = names
            .into_iter()
            .map(|n| {
                let d = &rep.destinations[n];
                let pause = rep.pause_of(n);
                serde_json::json!({
                    "name": d.name,
                    "url": d.url,
                    "region": d.region,
                    "registry_id": d.registry_id,
                    "unavailable_for_seconds": pause.as_ref().map(|p| p.0.as_secs_f64()),
                    "unavailable_reason": pause.map(|p| p.1),
                })
            })
            .collect();
        let body = serde_json::json!({ "jobs": jobs, "destinations": destinations });
        json(StatusCode::OK, body.to_string())
    }

    fn sync_status(&self) -> Resp {
        let entries: Vec<_> = self
            .sync
            .iter()
            .map(|e| {
                let st = e.status().clone();
                serde_json::json!({
                    "upstream": e.url,
                    "repositories": e.repositories.iter().map(|(up, local)| serde_json::json!({
                        "upstream": up.as_str(), "local": local.as_str(),
                    })).collect::<Vec<_>>(),
                    "interval_seconds": e.interval.as_secs_f64(),
                    "passes": st.passes,
                    "running": st.running,
                    "last_started_at": st.last_started_ms.map(ms_to_rfc3339),
                    "last_finished_at": st.last_finished_ms.map(ms_to_rfc3339),
                    "last_pass": st.last,
                    "last_error": st.last_error,
                })
            })
            .collect();
        json(
            StatusCode::OK,
            serde_json::json!({ "sync": entries }).to_string(),
        )
    }

    async fn replication_retry(&self, query: &Query) -> Resp {
        let (rep, filter) = match self.replication_jobs(query) {
            Ok(r) => r,
            Err(resp) => return *resp,
        };
        match rep.retry(&filter).await {
            Ok(n) => json(
                StatusCode::OK,
                serde_json::json!({ "retried": n }).to_string(),
            ),
            Err(e) => internal(e),
        }
    }

    async fn replication_sync(&self, query: &Query) -> Resp {
        let rep = match self.replication() {
            Ok(r) => r,
            Err(resp) => return *resp,
        };
        let rule = match query.get("rule") {
            None | Some("") => None,
            Some(r) => match r.parse::<usize>() {
                Ok(n) => Some(n),
                Err(_) => return bad_request(&format!("rule must be a rule's index, not {r:?}")),
            },
        };
        if let Some(n) = rule
            && n >= rep.rules.len()
        {
            return bad_request(&format!(
                "there is no replication rule {n} ({} rules)",
                rep.rules.len()
            ));
        }
        let dry_run = matches!(query.get("dry_run"), Some("true" | "1" | ""));
        match reconcile(rep, &self.registry, rule, dry_run).await {
            Ok(plan) => json(
                StatusCode::OK,
                serde_json::json!({ "dry_run": dry_run, "plan": plan }).to_string(),
            ),
            Err(e) => internal(format!("{e:#}")),
        }
    }
}

/// Splits `NAME:TAG`, `NAME@DIGEST` (or a bare `NAME`, meaning `latest`)
/// into a repository and a reference, checking both against the spec's
/// grammars.
pub fn split_ref(image: &str) -> Result<(RepoName, Reference), String> {
    let (name, reference) = if let Some((n, d)) = image.split_once('@') {
        (n, d)
    } else {
        // A colon after the last slash separates the tag (a colon before
        // it belongs to a host:port, which local names never have).
        let last_slash = image.rfind('/').map_or(0, |i| i + 1);
        match image[last_slash..].rfind(':') {
            Some(i) => (&image[..last_slash + i], &image[last_slash + i + 1..]),
            None => (image, "latest"),
        }
    };
    let name: RepoName = name
        .parse()
        .map_err(|e| format!("invalid repository name {name:?}: {e}"))?;
    let reference: Reference = reference
        .parse()
        .map_err(|e| format!("invalid tag or digest {reference:?}: {e}"))?;
    Ok((name, reference))
}

#[cfg(test)]
mod tests {
    use super::split_ref;
    use crate::oci::name::MAX_NAME_LEN;
    use crate::oci::{Digest, Reference};
    use proptest::prelude::*;

    /// Repository names from the spec's grammar (the strategy of
    /// `oci::name`'s tests), within the length limit.
    fn name() -> impl Strategy<Value = String> {
        "[a-z0-9]{1,8}((\\.|_|__|-{1,3})[a-z0-9]{1,8}){0,2}(/[a-z0-9]{1,8}((\\.|_|__|-{1,3})[a-z0-9]{1,8}){0,2}){0,3}"
            .prop_filter("name too long", |s| s.len() <= MAX_NAME_LEN)
    }

    fn tag() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_][A-Za-z0-9._-]{0,127}"
    }

    fn digest() -> impl Strategy<Value = String> {
        prop_oneof![
            "[0-9a-f]{64}".prop_map(|h| format!("sha256:{h}")),
            "[0-9a-f]{128}".prop_map(|h| format!("sha512:{h}")),
        ]
    }

    proptest! {
        #[test]
        fn name_tag_round_trip(n in name(), t in tag()) {
            let (name, r) = split_ref(&format!("{n}:{t}")).unwrap();
            prop_assert_eq!(name.as_str(), n.as_str());
            prop_assert!(matches!(&r, Reference::Tag(x) if x.as_str() == t), "{:?}", r);
        }

        #[test]
        fn name_digest_round_trip(n in name(), d in digest()) {
            let (name, r) = split_ref(&format!("{n}@{d}")).unwrap();
            prop_assert_eq!(name.as_str(), n.as_str());
            let want: Digest = d.parse().unwrap();
            prop_assert_eq!(r, Reference::Digest(want));
        }

        #[test]
        fn bare_name_means_latest(n in name()) {
            let (name, r) = split_ref(&n).unwrap();
            prop_assert_eq!(name.as_str(), n.as_str());
            prop_assert_eq!(r.to_string(), "latest");
        }

        #[test]
        fn split_ref_never_panics(s in ".{0,100}|[a-z0-9._/:@-]{0,40}") {
            // And whatever it accepts re-joins into a ref that splits the same.
            if let Ok((name, r)) = split_ref(&s) {
                let sep = match r {
                    Reference::Tag(_) => ':',
                    Reference::Digest(_) => '@',
                };
                let again = split_ref(&format!("{name}{sep}{r}")).unwrap();
                prop_assert_eq!(again.0, name);
                prop_assert_eq!(again.1, r);
            }
        }
    }

    #[test]
    fn refs_split_into_name_and_reference() {
        let (n, r) = split_ref("docker-hub/library/alpine:3.20").unwrap();
        assert_eq!(
            (n.as_str(), r.to_string().as_str()),
            ("docker-hub/library/alpine", "3.20")
        );
        let (n, r) = split_ref("ghcr/org/app").unwrap();
        assert_eq!(
            (n.as_str(), r.to_string().as_str()),
            ("ghcr/org/app", "latest")
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let (n, r) = split_ref(&format!("q/app@{d}")).unwrap();
        assert_eq!((n.as_str(), r.to_string()), ("q/app", d));
        assert!(split_ref("Bad/Name:1").is_err());
        assert!(split_ref("ok/name:bad tag").is_err());
        assert!(split_ref("ok/name@sha256:short").is_err());
    }
}
