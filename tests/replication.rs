//! Replication between spawned wharf "regions" (A replicates to B) and a
//! real Distribution registry (C): identical digests, indexes and
//! referrers, filters, failures with their reason, a destination down and
//! back, kill -9 in the middle of a large image, tags moving during a copy,
//! and reconciliation (periodic and `wharf replication sync`).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::cache::random_bytes;
use common::distribution::Distribution;
use common::http::HttpClient;
use common::replication::{
    NO_RECONCILE, all, blob_digest, destination, manifest, metric, push_image, push_index,
    push_referrer, restart, rule, spawn_region, spawn_region_in, status, wait_for,
};
use common::wharf_bin;

const PATIENCE: Duration = Duration::from_secs(90);

fn jobs_of<'a>(jobs: &'a [serde_json::Value], dest: &str) -> Vec<&'a serde_json::Value> {
    jobs.iter().filter(|j| j["destination"] == dest).collect()
}

async fn catalog(c: &HttpClient) -> Vec<String> {
    let r = c.get("/v2/_catalog").await;
    assert_eq!(r.status, 200, "{r:?}");
    serde_json::from_value(r.json()["repositories"].clone()).unwrap()
}

async fn tags(c: &HttpClient, repo: &str) -> Vec<String> {
    let r = c.get(&format!("/v2/{repo}/tags/list")).await;
    assert_eq!(r.status, 200, "{r:?}");
    let mut t: Vec<String> = serde_json::from_value(r.json()["tags"].clone()).unwrap();
    t.sort();
    t
}

/// `wharf replication ARGS... --server URL`: (success, stdout, stderr).
fn cli(args: &[&str], server: &str) -> (bool, String, String) {
    let out = Command::new(wharf_bin())
        .arg("replication")
        .args(args)
        .args(["--server", server])
        .output()
        .expect("run wharf replication");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_to_a_appears_in_b_and_c_with_identical_digests_and_filters_hold() {
    let b = spawn_region("");
    let c = Distribution::start();
    let a = spawn_region(&format!(
        "{NO_RECONCILE}{}{}{}",
        destination(
            "b",
            &b.url(),
            "region = \"eu-west-1\"\nregistry_id = \"222233334444\""
        ),
        destination("c", &c.url(), ""),
        rule(&["prod/"], &["b", "c"]),
    ));
    let (ca, cb, cc) = (
        HttpClient::new(a.url()),
        HttpClient::new(b.url()),
        HttpClient::new(c.url()),
    );
    let img = push_image(
        &ca,
        "prod/app",
        Some("1.0"),
        &[random_bytes(300_000, 1), random_bytes(5_000, 2)],
        "amd64",
    )
    .await;
    // Outside the rule's filter: never replicated, no job.
    push_image(
        &ca,
        "dev/tool",
        Some("1"),
        &[random_bytes(1000, 3)],
        "amd64",
    )
    .await;

    let jobs = wait_for(&ca, PATIENCE, "both destinations", |j| {
        all(j, 2, "COMPLETE")
    })
    .await;
    for j in &jobs {
        assert_eq!(j["repository"], "prod/app");
        assert_eq!(j["reference"], "1.0");
        assert_eq!(j["digest"], img.digest.as_str());
    }
    assert_eq!(jobs_of(&jobs, "b")[0]["region"], "eu-west-1");
    assert_eq!(jobs_of(&jobs, "b")[0]["registry_id"], "222233334444");

    for (name, client) in [("B", &cb), ("C", &cc)] {
        let (digest, body) = manifest(client, "prod/app", "1.0")
            .await
            .unwrap_or_else(|| panic!("{name} lacks prod/app:1.0"));
        assert_eq!(digest, img.digest, "{name}");
        assert_eq!(body, img.manifest, "{name}: manifest bytes differ");
        for blob in &img.blobs {
            assert_eq!(
                blob_digest(client, "prod/app", blob).await.as_deref(),
                Some(blob.as_str()),
                "{name}: blob {blob}"
            );
        }
        assert!(
            manifest(client, "dev/tool", "1").await.is_none(),
            "{name}: dev/tool was replicated despite the filter"
        );
    }
    assert_eq!(catalog(&cb).await, ["prod/app"]);
    assert!(metric(&ca, "wharf_replication_bytes_sent_total", "b").await >= 305_000);
    assert_eq!(metric(&ca, "wharf_replication_queue_depth", "b").await, 0);
    assert_eq!(
        metric(&ca, "wharf_replication_completed_total", "c").await,
        1
    );

    // Status of one image from the CLI.
    let (ok, out, err) = cli(&["status", "prod/app:1.0"], &a.url());
    assert!(ok, "{err}");
    assert_eq!(out.matches("COMPLETE").count(), 2, "{out}");
    assert!(out.contains(&img.digest), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_arch_index_and_referrers_are_replicated() {
    let b = spawn_region("");
    let c = Distribution::start();
    let a = spawn_region(&format!(
        "{NO_RECONCILE}{}{}{}",
        destination("b", &b.url(), ""),
        destination("c", &c.url(), ""),
        rule(&[], &["b", "c"]),
    ));
    let (ca, cb, cc) = (
        HttpClient::new(a.url()),
        HttpClient::new(b.url()),
        HttpClient::new(c.url()),
    );
    let repo = "team/multi";
    let amd = push_image(&ca, repo, None, &[random_bytes(20_000, 10)], "amd64").await;
    let arm = push_image(&ca, repo, None, &[random_bytes(20_000, 11)], "arm64").await;
    let index = push_index(&ca, repo, "v1", &[(&amd, "amd64"), (&arm, "arm64")]).await;
    let sig = push_referrer(&ca, repo, &index, b"signature of the index").await;
    let sbom = push_referrer(&ca, repo, &amd, b"sbom of the amd64 image").await;

    // One job per pushed manifest and destination.
    let jobs = wait_for(&ca, PATIENCE, "index, children and referrers", |j| {
        all(j, 10, "COMPLETE")
    })
    .await;
    assert_eq!(jobs_of(&jobs, "b").len(), 5);

    for (name, client) in [("B", &cb), ("C", &cc)] {
        let (digest, body) = manifest(client, repo, "v1").await.unwrap();
        assert_eq!(digest, index.digest, "{name}: index digest");
        assert_eq!(body, index.manifest, "{name}");
        for m in [&amd, &arm, &sig, &sbom] {
            let (d, body) = manifest(client, repo, &m.digest)
                .await
                .unwrap_or_else(|| panic!("{name} lacks {}", m.digest));
            assert_eq!((d, body), (m.digest.clone(), m.manifest.clone()), "{name}");
            for blob in &m.blobs {
                assert_eq!(
                    blob_digest(client, repo, blob).await.as_deref(),
                    Some(blob.as_str()),
                    "{name}"
                );
            }
        }
    }
    // B (a wharf) answers the referrers API with the replicated referrers.
    for (subject, referrer) in [(&index, &sig), (&amd, &sbom)] {
        let r = cb
            .get(&format!("/v2/{repo}/referrers/{}", subject.digest))
            .await;
        let listed: Vec<String> = r.json()["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["digest"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(listed, std::slice::from_ref(&referrer.digest));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_fail_with_a_clear_reason_and_retry_requeues() {
    let fake = common::fake_upstream::FakeUpstream::start();
    fake.require_bearer("replicator", "right-secret");
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("password");
    std::fs::write(&secret, "wrong-secret\n").unwrap();
    let a = spawn_region(&format!(
        "{NO_RECONCILE}{}{}",
        destination(
            "secure",
            &fake.url(),
            &format!(
                "credentials = {{ username = \"replicator\", password_file = {:?} }}",
                secret.display().to_string()
            )
        ),
        rule(&["prod/"], &["secure"]),
    ));
    let ca = HttpClient::new(a.url());
    push_image(&ca, "prod/app", Some("1"), &[random_bytes(100, 1)], "amd64").await;
    let jobs = wait_for(&ca, PATIENCE, "the job to fail", |j| all(j, 1, "FAILED")).await;
    let reason = jobs[0]["failure_reason"].as_str().unwrap();
    assert!(
        reason.contains("rejected the credentials"),
        "unclear reason: {reason}"
    );
    assert_eq!(
        jobs[0]["attempts"], 1,
        "refused credentials are not retried"
    );

    let (ok, out, err) = cli(&["status", "prod/app"], &a.url());
    assert!(ok, "{err}");
    assert!(
        out.contains("FAILED") && out.contains("rejected the credentials"),
        "{out}"
    );

    // `retry` puts it back; it fails again the same way.
    let (ok, out, err) = cli(&["retry", "prod/app:1"], &a.url());
    assert!(ok, "{err}");
    assert!(out.starts_with("1 failed jobs queued again"), "{out}");
    wait_for(&ca, PATIENCE, "the retried job to fail", |j| {
        all(j, 1, "FAILED") && j[0]["updated_at"] != jobs[0]["updated_at"]
    })
    .await;
    assert_eq!(
        metric(&ca, "wharf_replication_failures_total", "secure").await,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_down_during_20_pushes_catches_up_when_back() {
    let mut b = spawn_region("");
    let b_url = b.url();
    b.kill9();
    let a = spawn_region(&format!(
        "{NO_RECONCILE}{}{}",
        destination("b", &b_url, "max_attempts = 2\nmax_concurrency = 2"),
        rule(&["prod/"], &["b"]),
    ));
    let ca = HttpClient::new(a.url());
    let mut pushed = Vec::new();
    for i in 0..20 {
        let tag = format!("t{i}");
        let img = push_image(
            &ca,
            "prod/app",
            Some(&tag),
            &[random_bytes(2_000, i)],
            "amd64",
        )
        .await;
        pushed.push((tag, img.digest));
    }
    // Waiting, with the reason, and the destination reported down.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let s = status(&ca, "").await;
        let jobs = s["jobs"].as_array().unwrap();
        assert_eq!(jobs.len(), 20);
        assert!(jobs.iter().all(|j| j["status"] == "IN_PROGRESS"), "{s}");
        if s["destinations"][0]["unavailable_reason"].is_string()
            && jobs.iter().all(|j| j["failure_reason"].is_string())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "destination never reported down: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // An unreachable destination costs no attempts, so nothing is FAILED:
    // every failed run is counted, so once more runs failed than
    // max_attempts (2) allows one job, none of them cost an attempt.
    let deadline = Instant::now() + PATIENCE;
    while metric(&ca, "wharf_replication_failures_total", "b").await <= 2 {
        assert!(Instant::now() < deadline, "the destination was not retried");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = status(&ca, "").await;
    assert!(
        s["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["status"] == "IN_PROGRESS" && j["attempts"] == 0),
        "{s}"
    );
    assert_eq!(metric(&ca, "wharf_replication_queue_depth", "b").await, 20);
    // The lag grows while the destination is down (the failed runs above
    // can come sooner than two seconds after the first push).
    let deadline = Instant::now() + PATIENCE;
    while metric(&ca, "wharf_replication_lag_seconds", "b").await < 2 {
        assert!(Instant::now() < deadline, "the replication lag never grew");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(metric(&ca, "wharf_replication_failures_total", "b").await >= 1);

    restart(&mut b, true);
    let cb = HttpClient::new(b.url());
    // Catching up, never more than max_concurrency jobs run at once.
    let most = std::sync::atomic::AtomicUsize::new(0);
    wait_for(&ca, PATIENCE, "the backlog", |j| {
        let running = j.iter().filter(|j| j["running"] == true).count();
        most.fetch_max(running, std::sync::atomic::Ordering::Relaxed);
        all(j, 20, "COMPLETE")
    })
    .await;
    assert!(
        most.into_inner() <= 2,
        "more than max_concurrency jobs ran at once"
    );
    let mut want: Vec<String> = pushed.iter().map(|(t, _)| t.clone()).collect();
    want.sort();
    assert_eq!(tags(&cb, "prod/app").await, want);
    for (tag, digest) in &pushed {
        assert_eq!(&manifest(&cb, "prod/app", tag).await.unwrap().0, digest);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_while_replicating_a_large_image_then_restart_completes_it() {
    let b = spawn_region("");
    let mut a = spawn_region(&format!(
        "{NO_RECONCILE}{}{}",
        destination("b", &b.url(), "chunk_size = \"64KiB\""),
        rule(&["prod/"], &["b"]),
    ));
    let (ca, cb) = (HttpClient::new(a.url()), HttpClient::new(b.url()));
    let big = random_bytes(48 << 20, 42);
    let img = push_image(&ca, "prod/big", Some("1"), &[big], "amd64").await;

    // Kill A once part of the layer has reached B.
    let deadline = Instant::now() + PATIENCE;
    let sent = loop {
        let n = metric(&ca, "wharf_replication_bytes_sent_total", "b").await;
        if n >= 1 << 20 {
            break n;
        }
        assert!(Instant::now() < deadline, "replication never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    a.kill9();
    assert!(
        sent < 48 << 20,
        "the copy finished before the kill ({sent} bytes)"
    );
    assert!(
        manifest(&cb, "prod/big", "1").await.is_none(),
        "B shows the manifest early"
    );

    restart(&mut a, false);
    let ca = HttpClient::new(a.url());
    let jobs = wait_for(&ca, PATIENCE, "the resumed job", |j| all(j, 1, "COMPLETE")).await;
    assert_eq!(jobs[0]["digest"], img.digest.as_str());
    // The layer resumed where B's upload session stood (the checkpoint
    // may trail the kill by a chunk): what was sent before is not resent.
    let after = metric(&ca, "wharf_replication_bytes_sent_total", "b").await;
    assert!(
        after + sent <= (48 << 20) + (64 << 10) + 4096,
        "resent the layer from the start: {sent} bytes before the kill, {after} after"
    );
    let (digest, body) = manifest(&cb, "prod/big", "1").await.unwrap();
    assert_eq!((digest, body), (img.digest.clone(), img.manifest.clone()));
    for blob in &img.blobs {
        assert_eq!(
            blob_digest(&cb, "prod/big", blob).await.as_deref(),
            Some(blob.as_str())
        );
    }
    assert_eq!(catalog(&cb).await, ["prod/big"]);
    assert_eq!(tags(&cb, "prod/big").await, ["1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_moved_twice_quickly_ends_at_the_newest_digest() {
    let b = spawn_region("");
    let a = spawn_region(&format!(
        "{NO_RECONCILE}{}{}",
        destination("b", &b.url(), "chunk_size = \"64KiB\""),
        rule(&["prod/"], &["b"]),
    ));
    let (ca, cb) = (HttpClient::new(a.url()), HttpClient::new(b.url()));
    // The first image is slow to copy, so the tag moves while it runs.
    push_image(
        &ca,
        "prod/app",
        Some("latest"),
        &[random_bytes(8 << 20, 1)],
        "amd64",
    )
    .await;
    let deadline = Instant::now() + PATIENCE;
    while metric(&ca, "wharf_replication_bytes_sent_total", "b").await == 0 {
        assert!(Instant::now() < deadline, "replication never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    push_image(
        &ca,
        "prod/app",
        Some("latest"),
        &[random_bytes(1000, 2)],
        "amd64",
    )
    .await;
    let newest = push_image(
        &ca,
        "prod/app",
        Some("latest"),
        &[random_bytes(1000, 3)],
        "amd64",
    )
    .await;

    let jobs = wait_for(&ca, PATIENCE, "the tag's job", |j| {
        all(j, 1, "COMPLETE") && j[0]["digest"] == newest.digest.as_str()
    })
    .await;
    assert_eq!(jobs[0]["reference"], "latest");
    assert_eq!(
        manifest(&cb, "prod/app", "latest").await.unwrap().0,
        newest.digest
    );
    // And it stays there: with the job complete and nothing queued for the
    // destination, no run of the older digest is left to overwrite it.
    let deadline = Instant::now() + PATIENCE;
    while metric(&ca, "wharf_replication_queue_depth", "b").await != 0 {
        assert!(Instant::now() < deadline, "work left for the destination");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        status(&ca, "").await["jobs"][0]["running"],
        false,
        "no run left"
    );
    assert_eq!(
        manifest(&cb, "prod/app", "latest").await.unwrap().0,
        newest.digest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_pushed_before_the_rule_is_backfilled_by_sync() {
    let b = spawn_region("");
    let mut a = spawn_region("");
    let ca = HttpClient::new(a.url());
    let old = push_image(
        &ca,
        "prod/old",
        Some("1"),
        &[random_bytes(5_000, 7)],
        "amd64",
    )
    .await;
    push_image(&ca, "dev/x", Some("1"), &[random_bytes(500, 8)], "amd64").await;

    // Now the rule exists.
    let mut text = std::fs::read_to_string(&a.config).unwrap();
    text.push_str(&format!(
        "{NO_RECONCILE}{}{}",
        destination("b", &b.url(), ""),
        rule(&["prod/"], &["b"])
    ));
    std::fs::write(&a.config, text).unwrap();
    restart(&mut a, false);
    let (ca, cb) = (HttpClient::new(a.url()), HttpClient::new(b.url()));

    let (ok, out, err) = cli(&["sync", "--dry-run"], &a.url());
    assert!(ok, "{err}");
    assert!(
        out.contains("1 to replicate") && out.contains("prod/old:1 -> b (missing)"),
        "{out}"
    );
    assert!(catalog(&cb).await.is_empty(), "a dry run copied something");
    assert!(status(&ca, "").await["jobs"].as_array().unwrap().is_empty());

    let (ok, out, err) = cli(&["sync", "--rule", "0"], &a.url());
    assert!(ok, "{err}");
    assert!(out.contains("replicated 1 images"), "{out}");
    assert_eq!(manifest(&cb, "prod/old", "1").await.unwrap().0, old.digest);
    assert_eq!(catalog(&cb).await, ["prod/old"]);

    // Nothing left to do.
    let (ok, out, _) = cli(&["sync", "--dry-run"], &a.url());
    assert!(ok && out.contains("0 to replicate"), "{out}");
    let (ok, _, err) = cli(&["sync", "--rule", "3"], &a.url());
    assert!(!ok && err.contains("no replication rule 3"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_reconciliation_repairs_a_tag_lost_at_the_destination() {
    let b = spawn_region("");
    let a = spawn_region(&format!(
        "[replication]\nreconcile_interval = \"1s\"\n{}{}",
        destination("b", &b.url(), ""),
        rule(&["prod/"], &["b"]),
    ));
    let (ca, cb) = (HttpClient::new(a.url()), HttpClient::new(b.url()));
    let img = push_image(
        &ca,
        "prod/app",
        Some("1"),
        &[random_bytes(3_000, 9)],
        "amd64",
    )
    .await;
    wait_for(&ca, PATIENCE, "the push", |j| all(j, 1, "COMPLETE")).await;
    assert_eq!(manifest(&cb, "prod/app", "1").await.unwrap().0, img.digest);

    // Someone deletes the tag at B: the next pass puts it back.
    assert_eq!(cb.delete("/v2/prod/app/manifests/1").await.status, 202);
    assert!(manifest(&cb, "prod/app", "1").await.is_none());
    let deadline = Instant::now() + PATIENCE;
    while manifest(&cb, "prod/app", "1").await.is_none() {
        assert!(Instant::now() < deadline, "the lost tag was never repaired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(manifest(&cb, "prod/app", "1").await.unwrap().0, img.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_sync_picks_up_a_new_upstream_tag_within_one_interval() {
    let mut up = Distribution::start();
    let cu = HttpClient::new(up.url());
    let v10 = push_image(
        &cu,
        "lib/app",
        Some("1.0"),
        &[random_bytes(50_000, 1)],
        "amd64",
    )
    .await;
    push_image(
        &cu,
        "lib/app",
        Some("2.0"),
        &[random_bytes(500, 2)],
        "amd64",
    )
    .await;
    let amd = push_image(&cu, "lib/app", None, &[random_bytes(700, 3)], "amd64").await;
    let arm = push_image(&cu, "lib/app", None, &[random_bytes(700, 4)], "arm64").await;
    let index = push_index(
        &cu,
        "lib/app",
        "1.1-multi",
        &[(&amd, "amd64"), (&arm, "arm64")],
    )
    .await;

    let interval = Duration::from_secs(2);
    let a = spawn_region(&format!(
        "[[sync]]\nupstream = \"{}\"\nrepositories = [\"lib/app\"]\nlocal_prefix = \"mirror\"\ntags = [\"1.*\"]\nplatforms = [\"linux/amd64\"]\ninterval = \"2s\"\n",
        up.url()
    ));
    let ca = HttpClient::new(a.url());
    let local = "mirror/lib/app";
    let deadline = Instant::now() + PATIENCE;
    while manifest(&ca, local, "1.0").await.is_none()
        || manifest(&ca, local, "1.1-multi").await.is_none()
    {
        assert!(
            Instant::now() < deadline,
            "the first pass never copied 1.0 and 1.1-multi"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        manifest(&ca, local, "1.0").await.unwrap(),
        (v10.digest.clone(), v10.manifest.clone())
    );
    assert_eq!(
        tags(&ca, local).await,
        ["1.0", "1.1-multi"],
        "2.0 does not match 1.*"
    );
    // The platform filter: an index of the amd64 entry only.
    let (d, body) = manifest(&ca, local, "1.1-multi").await.unwrap();
    assert_ne!(d, index.digest, "a filtered index has its own digest");
    let entries: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let entries = entries["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["digest"], amd.digest.as_str());
    assert!(manifest(&ca, local, &amd.digest).await.is_some());
    assert!(manifest(&ca, local, &arm.digest).await.is_none());

    // A new upstream tag appears locally within one interval (plus the
    // time of a pass).
    let v12 = push_image(
        &cu,
        "lib/app",
        Some("1.2"),
        &[random_bytes(900, 5)],
        "amd64",
    )
    .await;
    let pushed = Instant::now();
    while manifest(&ca, local, "1.2").await.is_none() {
        assert!(
            pushed.elapsed() < interval + Duration::from_secs(5),
            "1.2 did not arrive within one interval"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(manifest(&ca, local, "1.2").await.unwrap().0, v12.digest);

    // Local copies are ordinary repositories, served with the upstream down.
    up.stop();
    assert_eq!(manifest(&ca, local, "1.2").await.unwrap().0, v12.digest);
    for blob in &v12.blobs {
        assert_eq!(
            blob_digest(&ca, local, blob).await.as_deref(),
            Some(blob.as_str())
        );
    }
    // The status shows the passes, and the failing one's reason.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let st = ca.get("/_wharf/sync/status").await.json();
        let e = &st["sync"][0];
        assert_eq!(e["repositories"][0]["local"], local);
        if e["last_pass"]["failures"].as_u64().unwrap_or(0) > 0 {
            assert!(e["passes"].as_u64().unwrap() >= 2, "{st}");
            assert!(
                e["last_error"].as_str().unwrap().contains("lib/app"),
                "{st}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no failing pass reported: {st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_present_in_another_repository_of_the_destination_are_mounted() {
    let c = Distribution::start();
    let a = spawn_region(&format!(
        "{NO_RECONCILE}{}{}",
        destination("c", &c.url(), ""),
        rule(&["prod/"], &["c"]),
    ));
    let (ca, cc) = (HttpClient::new(a.url()), HttpClient::new(c.url()));
    let layers = [random_bytes(200_000, 21), random_bytes(100_000, 22)];
    let first = push_image(&ca, "prod/a", Some("1"), &layers, "amd64").await;
    wait_for(&ca, PATIENCE, "prod/a", |j| all(j, 1, "COMPLETE")).await;
    let second = push_image(&ca, "prod/b", Some("1"), &layers, "amd64").await;
    assert_eq!(first.digest, second.digest);
    wait_for(&ca, PATIENCE, "prod/b", |j| all(j, 2, "COMPLETE")).await;

    let log = c.access_log();
    let mounted: Vec<_> = log
        .iter()
        .filter(|l| {
            l.method == "POST"
                && l.path.starts_with("/v2/prod/b/blobs/uploads/?mount=")
                && l.path.contains("from=prod%2Fa")
                && l.status == 201
        })
        .collect();
    assert_eq!(
        mounted.len(),
        first.blobs.len(),
        "every blob mounted: {log:#?}"
    );
    assert!(
        !log.iter()
            .any(|l| l.method == "PATCH" && l.path.starts_with("/v2/prod/b/")),
        "a blob was uploaded again instead of mounted"
    );
    for blob in &first.blobs {
        assert_eq!(
            blob_digest(&cc, "prod/b", blob).await.as_deref(),
            Some(blob.as_str())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_acknowledged_just_before_kill9_is_replicated_after_restart() {
    let mut b = spawn_region("");
    b.kill9();
    let mut a = spawn_region(&format!(
        "{NO_RECONCILE}{}{}",
        destination("b", &b.url(), ""),
        rule(&["prod/"], &["b"]),
    ));
    let ca = HttpClient::new(a.url());
    let img = push_image(
        &ca,
        "prod/app",
        Some("1"),
        &[random_bytes(1000, 5)],
        "amd64",
    )
    .await;
    // The 201 came back: the job is durable. Crash at once.
    a.kill9();
    restart(&mut a, false);
    let ca = HttpClient::new(a.url());
    let s = status(&ca, "?repo=prod/app&ref=1").await;
    assert_eq!(s["jobs"].as_array().unwrap().len(), 1, "{s}");
    assert_eq!(s["jobs"][0]["status"], "IN_PROGRESS");
    restart(&mut b, true);
    let jobs = wait_for(&ca, PATIENCE, "the job", |j| all(j, 1, "COMPLETE")).await;
    assert_eq!(jobs[0]["digest"], img.digest.as_str());
    let cb = HttpClient::new(b.url());
    assert_eq!(manifest(&cb, "prod/app", "1").await.unwrap().0, img.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulled_through_content_is_replicated_only_when_the_rule_asks() {
    let up = Distribution::start();
    let cu = HttpClient::new(up.url());
    let app = push_image(
        &cu,
        "lib/app",
        Some("1"),
        &[random_bytes(30_000, 31)],
        "amd64",
    )
    .await;
    push_image(
        &cu,
        "lib/other",
        Some("1"),
        &[random_bytes(300, 32)],
        "amd64",
    )
    .await;
    let b = spawn_region("");
    let a = spawn_region(&format!(
        "{NO_RECONCILE}[[pull_through]]\nprefix = \"up\"\nupstream = \"{}\"\n\n{}\
         [[replication.rules]]\nfilters = [{{ prefix = \"up/lib/app\" }}]\ndestinations = [\"b\"]\ninclude_pulled_through = true\n\n{}",
        up.url(),
        destination("b", &b.url(), ""),
        rule(&["up/"], &["b"]),
    ));
    let (ca, cb) = (HttpClient::new(a.url()), HttpClient::new(b.url()));
    // Pull both through A.
    assert_eq!(
        manifest(&ca, "up/lib/app", "1").await.unwrap().0,
        app.digest
    );
    assert!(manifest(&ca, "up/lib/other", "1").await.is_some());

    let jobs = wait_for(&ca, PATIENCE, "the pulled image", |j| all(j, 1, "COMPLETE")).await;
    assert_eq!(jobs[0]["repository"], "up/lib/app");
    let (d, body) = manifest(&cb, "up/lib/app", "1").await.unwrap();
    assert_eq!((d, body), (app.digest.clone(), app.manifest.clone()));
    for blob in &app.blobs {
        assert_eq!(
            blob_digest(&cb, "up/lib/app", blob).await.as_deref(),
            Some(blob.as_str())
        );
    }
    assert_eq!(
        catalog(&cb).await,
        ["up/lib/app"],
        "lib/other's rule does not include pulled content"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_killed_in_the_middle_of_a_blob_gets_identical_content_when_back() {
    let mut b = spawn_region("");
    let a = spawn_region(&format!(
        "{NO_RECONCILE}{}{}",
        destination("b", &b.url(), "chunk_size = \"64KiB\""),
        rule(&["prod/"], &["b"]),
    ));
    let ca = HttpClient::new(a.url());
    let img = push_image(
        &ca,
        "prod/big",
        Some("1"),
        &[random_bytes(24 << 20, 77)],
        "amd64",
    )
    .await;
    let deadline = Instant::now() + PATIENCE;
    // Past the config blob, inside the layer.
    while metric(&ca, "wharf_replication_bytes_sent_total", "b").await < 1 << 20 {
        assert!(Instant::now() < deadline, "replication never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.kill9();
    restart(&mut b, true);
    let jobs = wait_for(&ca, PATIENCE, "the interrupted job", |j| {
        all(j, 1, "COMPLETE")
    })
    .await;
    assert_eq!(jobs[0]["digest"], img.digest.as_str());
    let cb = HttpClient::new(b.url());
    assert_eq!(manifest(&cb, "prod/big", "1").await.unwrap().0, img.digest);
    for blob in &img.blobs {
        assert_eq!(
            blob_digest(&cb, "prod/big", blob).await.as_deref(),
            Some(blob.as_str())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_keeps_failing_is_failed_after_max_attempts() {
    // A registry that answers but refuses every write (405).
    let fake = common::fake_upstream::FakeUpstream::start();
    fake.no_auth();
    let a = spawn_region(&format!(
        "{NO_RECONCILE}{}{}",
        destination("readonly", &fake.url(), "max_attempts = 3"),
        rule(&["prod/"], &["readonly"]),
    ));
    let ca = HttpClient::new(a.url());
    push_image(&ca, "prod/app", Some("1"), &[random_bytes(100, 1)], "amd64").await;
    let jobs = wait_for(&ca, PATIENCE, "the job to fail", |j| all(j, 1, "FAILED")).await;
    assert_eq!(jobs[0]["attempts"], 3);
    let reason = jobs[0]["failure_reason"].as_str().unwrap();
    assert!(
        reason.contains("405") && reason.contains("after 3 attempts"),
        "{reason}"
    );
    assert_eq!(
        fake.count("POST", "/v2/prod/app/blobs/uploads/"),
        3,
        "one upload attempt per job attempt"
    );
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// An image and `levels` indexes over it, each the only entry of the
/// next: (media type, bytes) from the image up to the outermost index.
fn nested_chain(levels: usize) -> Vec<(&'static str, Vec<u8>)> {
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let layer = b"the layer at the bottom";
    let image = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": wharf::oci::Digest::sha256_of(config).to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": wharf::oci::Digest::sha256_of(layer).to_string(), "size": layer.len()}],
    }))
    .unwrap();
    let mut chain = vec![(OCI_MANIFEST, image)];
    for _ in 0..levels {
        let (mt, below) = chain.last().unwrap();
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": mt,
                "digest": wharf::oci::Digest::sha256_of(below).to_string(), "size": below.len()}],
        }))
        .unwrap();
        chain.push((OCI_INDEX, index));
    }
    chain
}

/// An index nested 3000 levels deep, stored at A the way an older wharf
/// accepted it: replicating it ends its job FAILED with the reason instead
/// of overflowing the stack; nothing of it reaches B; A keeps serving and
/// replicating, and after a restart the job is still FAILED (no crash
/// loop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_nested_past_the_limit_fails_its_job_and_wharf_keeps_serving() {
    use wharf::storage::{BlobStore, MetaStore};
    let b = spawn_region("");
    let dir = tempfile::tempdir().unwrap();
    {
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let store = wharf::storage::fs::FsStore::open(&data).unwrap();
        let meta = wharf::storage::meta::RedbMeta::open(&data.join("meta.redb")).unwrap();
        let repo: wharf::oci::RepoName = "prod/deep".parse().unwrap();
        for blob in [
            &br#"{"architecture":"amd64","os":"linux"}"#[..],
            b"the layer at the bottom",
        ] {
            let d = wharf::oci::Digest::sha256_of(blob);
            store
                .put(&d, bytes::Bytes::copy_from_slice(blob))
                .await
                .unwrap();
            meta.link_blob(&repo, wharf::storage::RepoKind::Hosted, &d)
                .await
                .unwrap();
        }
        let chain = nested_chain(3000);
        let last = chain.len() - 1;
        for (i, (mt, body)) in chain.into_iter().enumerate() {
            let d = wharf::oci::Digest::sha256_of(&body);
            // A record as written before depths were recorded.
            let record: wharf::storage::ManifestRecord =
                serde_json::from_value(serde_json::json!({"media_type": mt, "size": body.len()}))
                    .unwrap();
            store.put(&d, bytes::Bytes::from(body)).await.unwrap();
            let tag: wharf::oci::Tag = "deep".parse().unwrap();
            let tag = (i == last).then_some(&tag);
            meta.put_manifest(
                &repo,
                wharf::storage::RepoKind::Hosted,
                &d,
                &record,
                tag,
                None,
            )
            .await
            .unwrap();
        }
    }
    let mut a = spawn_region_in(
        dir,
        "127.0.0.1:0",
        &format!(
            "{NO_RECONCILE}{}{}",
            destination("b", &b.url(), ""),
            rule(&["prod/"], &["b"])
        ),
    );
    let (ca, cb) = (HttpClient::new(a.url()), HttpClient::new(b.url()));
    // Reconciliation finds the tag missing at B and enqueues its job.
    let (ok, out, err) = cli(&["sync", "--no-wait"], &a.url());
    assert!(
        ok && out.contains("prod/deep:deep -> b (missing)"),
        "{out}{err}"
    );
    let jobs = wait_for(&ca, PATIENCE, "the deep index's job to fail", |j| {
        all(j, 1, "FAILED")
    })
    .await;
    let reason = jobs[0]["failure_reason"].as_str().unwrap();
    assert!(
        reason.contains("nested") && reason.contains("at most 8"),
        "unclear reason: {reason}"
    );
    assert!(catalog(&cb).await.is_empty(), "part of the tree reached B");

    // A still serves and replicates.
    let img = push_image(
        &ca,
        "prod/app",
        Some("1"),
        &[random_bytes(2_000, 1)],
        "amd64",
    )
    .await;
    wait_for(&ca, PATIENCE, "the next push", |j| {
        j.iter()
            .any(|j| j["repository"] == "prod/app" && j["status"] == "COMPLETE")
    })
    .await;
    assert_eq!(manifest(&cb, "prod/app", "1").await.unwrap().0, img.digest);

    // A restart does not run the failed job again.
    restart(&mut a, false);
    let ca = HttpClient::new(a.url());
    let jobs = status(&ca, "").await["jobs"].clone();
    let deep: Vec<&serde_json::Value> = jobs
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["repository"] == "prod/deep")
        .collect();
    assert_eq!(deep.len(), 1, "{jobs}");
    assert_eq!(deep[0]["status"], "FAILED", "{jobs}");
    assert_eq!(ca.get("/v2/").await.status, 200);
}

/// A scheduled sync from an upstream serving an index nested 3000 levels
/// deep: the pass reports the tag as failed with the reason, stores
/// nothing of it, and wharf keeps serving and syncing other tags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synced_index_nested_past_the_limit_fails_that_tag_only() {
    let up = common::fake_upstream::FakeUpstream::start();
    up.no_auth();
    up.add_blob("lib/deep", &br#"{"architecture":"amd64","os":"linux"}"#[..]);
    up.add_blob("lib/deep", &b"the layer at the bottom"[..]);
    let chain = nested_chain(3000);
    let last = chain.len() - 1;
    for (i, (mt, body)) in chain.into_iter().enumerate() {
        up.add_manifest("lib/deep", (i == last).then_some("deep"), mt, body);
    }
    let shallow = nested_chain(2);
    for (i, (mt, body)) in shallow.iter().enumerate() {
        up.add_manifest("lib/deep", (i == 2).then_some("shallow"), mt, body.clone());
    }
    let a = spawn_region(&format!(
        "[[sync]]\nupstream = \"{}\"\nrepositories = [\"lib/deep\"]\ninterval = \"1h\"\n",
        up.url()
    ));
    let ca = HttpClient::new(a.url());
    let deadline = Instant::now() + PATIENCE;
    let st = loop {
        let st = ca.get("/_wharf/sync/status").await.json();
        if st["sync"][0]["passes"].as_u64().unwrap_or(0) >= 1 {
            break st;
        }
        assert!(Instant::now() < deadline, "no pass finished: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let e = &st["sync"][0];
    assert_eq!(e["last_pass"]["failures"], 1, "{st}");
    assert_eq!(e["last_pass"]["tags_copied"], 1, "{st}");
    let error = e["last_error"].as_str().unwrap();
    assert!(
        error.contains("lib/deep:deep") && error.contains("nested"),
        "{error}"
    );
    assert!(manifest(&ca, "lib/deep", "deep").await.is_none());
    let shallow_top = wharf::oci::Digest::sha256_of(&shallow[2].1).to_string();
    assert_eq!(
        manifest(&ca, "lib/deep", "shallow").await.unwrap().0,
        shallow_top
    );
    assert_eq!(ca.get("/v2/").await.status, 200);
}
