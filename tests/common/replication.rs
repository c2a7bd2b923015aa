//! Helpers for the replication tests: wharf "regions" without pull-through
//! rules, destination and rule tables, images pushed over HTTP, and waiting
//! on the replication status API.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::http::{HttpClient, Method};
use super::images::{OCI_INDEX, OCI_MANIFEST};
use super::{Wharf, spawn_config_in, start};

/// Spawns wharf on 127.0.0.1:0 with no pull-through rules, a fresh data
/// directory and `extra_toml` appended.
pub fn spawn_region(extra_toml: &str) -> Wharf {
    let dir = tempfile::tempdir().expect("tempdir");
    spawn_region_in(dir, "127.0.0.1:0", extra_toml)
}

/// Like [`spawn_region`], over an existing directory and on `listen`.
/// With `[[pull_through]]` tables in `extra_toml`, those are the rules.
pub fn spawn_region_in(dir: tempfile::TempDir, listen: &str, extra_toml: &str) -> Wharf {
    let no_rules = if extra_toml.contains("[[pull_through]]") {
        ""
    } else {
        "pull_through = []\n"
    };
    spawn_config_in(dir, no_rules, listen, "", extra_toml)
}

/// Restarts a killed (or running: it is killed first) wharf over the same
/// data and configuration; `same_port` keeps its address.
pub fn restart(w: &mut Wharf, same_port: bool) {
    w.kill9();
    if same_port {
        let text = std::fs::read_to_string(&w.config).expect("config");
        let text = text.replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{}\"", w.addr),
        );
        std::fs::write(&w.config, text).expect("config");
    }
    let (child, addr) = start(&w.config, &[]);
    w.child = child;
    w.addr = addr;
}

/// A `[[replication.destinations]]` table for a local (plain http)
/// registry, with short retry delays. `extra` adds keys.
pub fn destination(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[replication.destinations]]\nname = \"{name}\"\nurl = \"{url}\"\ninsecure = true\nretry_initial = \"100ms\"\nretry_max = \"1s\"\n{extra}\n"
    )
}

/// A `[[replication.rules]]` table.
pub fn rule(prefixes: &[&str], destinations: &[&str]) -> String {
    let filters: Vec<String> = prefixes
        .iter()
        .map(|p| format!("{{ prefix = \"{p}\" }}"))
        .collect();
    let dests: Vec<String> = destinations.iter().map(|d| format!("\"{d}\"")).collect();
    format!(
        "[[replication.rules]]\nfilters = [{}]\ndestinations = [{}]\n",
        filters.join(", "),
        dests.join(", ")
    )
}

/// `[replication]` with the periodic comparison off (tests trigger it).
pub const NO_RECONCILE: &str = "[replication]\nreconcile_interval = \"0s\"\n";

/// An image pushed to a registry.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub digest: String,
    pub manifest: Vec<u8>,
    pub blobs: Vec<String>,
}

/// Pushes an image (a config and `layers`) to `repo` and tags it `tag`
/// (or pushes it by digest when `tag` is `None`).
pub async fn push_image(
    c: &HttpClient,
    repo: &str,
    tag: Option<&str>,
    layers: &[Vec<u8>],
    arch: &str,
) -> Pushed {
    let config = serde_json::to_vec(&json!({
        "architecture": arch, "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [] },
        "config": {}, "created": format!("{:?}", layers.iter().map(|l| l.len()).collect::<Vec<_>>()),
    }))
    .unwrap();
    let config_digest = c.push_blob(repo, &config).await;
    let mut blobs = vec![config_digest.clone()];
    let mut descs = Vec::new();
    for l in layers {
        let d = c.push_blob(repo, l).await;
        descs.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": d, "size": l.len(),
        }));
        blobs.push(d);
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len() },
        "layers": descs,
    }))
    .unwrap();
    let digest = super::sha256(&manifest);
    let r = c
        .put_manifest(
            repo,
            tag.unwrap_or(digest.as_str()),
            OCI_MANIFEST,
            &manifest,
        )
        .await;
    assert_eq!(r.status, 201, "push manifest: {r:?}");
    Pushed {
        digest,
        manifest,
        blobs,
    }
}

/// Pushes an index of `children` (already pushed by digest) as `tag`.
pub async fn push_index(
    c: &HttpClient,
    repo: &str,
    tag: &str,
    children: &[(&Pushed, &str)],
) -> Pushed {
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": children.iter().map(|(p, arch)| json!({
            "mediaType": OCI_MANIFEST, "digest": p.digest, "size": p.manifest.len(),
            "platform": { "os": "linux", "architecture": arch },
        })).collect::<Vec<_>>(),
    }))
    .unwrap();
    let r = c.put_manifest(repo, tag, OCI_INDEX, &index).await;
    assert_eq!(r.status, 201, "push index: {r:?}");
    Pushed {
        digest: super::sha256(&index),
        manifest: index,
        blobs: Vec::new(),
    }
}

/// Pushes an artifact (a signature) whose subject is `subject`, by digest.
pub async fn push_referrer(c: &HttpClient, repo: &str, subject: &Pushed, payload: &[u8]) -> Pushed {
    let empty = c.push_blob(repo, b"{}").await;
    let layer = c.push_blob(repo, payload).await;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
        "config": { "mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2 },
        "layers": [{ "mediaType": "application/octet-stream", "digest": layer, "size": payload.len() }],
        "subject": { "mediaType": OCI_MANIFEST, "digest": subject.digest, "size": subject.manifest.len() },
    }))
    .unwrap();
    let digest = super::sha256(&manifest);
    let r = c.put_manifest(repo, &digest, OCI_MANIFEST, &manifest).await;
    assert_eq!(r.status, 201, "push referrer: {r:?}");
    Pushed {
        digest,
        manifest,
        blobs: vec![empty, layer],
    }
}

/// The replication status (`GET /_wharf/replication/status?QUERY`).
pub async fn status(c: &HttpClient, query: &str) -> Value {
    let r = c.get(&format!("/_wharf/replication/status{query}")).await;
    assert_eq!(r.status, 200, "status: {r:?}");
    r.json()
}

/// Polls the status until `done` holds for its jobs, or panics after
/// `timeout` with the last status.
pub async fn wait_for(
    c: &HttpClient,
    timeout: Duration,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = status(c, "").await;
        let jobs = s["jobs"].as_array().cloned().unwrap_or_default();
        if done(&jobs) {
            return jobs;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; status: {}",
            serde_json::to_string_pretty(&s).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every job has this status, and there are `n` of them.
pub fn all(jobs: &[Value], n: usize, status: &str) -> bool {
    jobs.len() == n && jobs.iter().all(|j| j["status"] == status)
}

/// `GET` of a manifest by reference: its `Docker-Content-Digest` and body,
/// or `None` on 404.
pub async fn manifest(c: &HttpClient, repo: &str, reference: &str) -> Option<(String, Vec<u8>)> {
    let r = c
        .send(
            Method::GET,
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("accept", &format!("{OCI_MANIFEST}, {OCI_INDEX}"))],
            Vec::new(),
        )
        .await;
    if r.status == 404 {
        return None;
    }
    assert_eq!(r.status, 200, "manifest {repo}:{reference}: {r:?}");
    let digest = r
        .header("docker-content-digest")
        .unwrap_or_default()
        .to_string();
    Some((digest, r.body.to_vec()))
}

/// The sha256 of a blob's bytes as served by `c`.
pub async fn blob_digest(c: &HttpClient, repo: &str, digest: &str) -> Option<String> {
    let r = c.get(&format!("/v2/{repo}/blobs/{digest}")).await;
    if r.status == 404 {
        return None;
    }
    assert_eq!(r.status, 200, "blob {repo}@{digest}: {r:?}");
    Some(super::sha256(&r.body))
}

/// A counter or gauge of `/metrics` for destination `dest`.
pub async fn metric(c: &HttpClient, name: &str, dest: &str) -> u64 {
    let text = String::from_utf8(c.get("/metrics").await.body.to_vec()).unwrap();
    let prefix = format!("{name}{{destination=\"{dest}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}
