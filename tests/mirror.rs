//! The pull-through cache with real clients and a real upstream: CNCF
//! Distribution (`docker-registry serve`) holds the images, wharf mirrors
//! it, and containerd (hosts.toml), podman (registries.conf), skopeo (the
//! prefix form) and the Docker engine (`registry-mirrors`) pull through
//! wharf. See tests/MIRROR.md for what each test proves and the client
//! facts it relies on.
//!
//! How a test knows wharf served a pull: Distribution's access log names
//! the user agent of every request. After seeding, only `wharf/<version>`
//! may appear there; a client falling back to the upstream itself would show
//! up with its own agent. Then Distribution is stopped and a client with an
//! empty store pulls again: only wharf's cache can answer.
//!
//! Every external tool is required; a missing one fails the test (run
//! `scripts/test`, which installs them).

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::containerd::Containerd;
use common::distribution::{Access, Distribution};
use common::http::{HttpClient, StatusCode};
use common::images::{self, DockerCleanup, OciImage, PRINT_MARKER, run, unique};
use common::{require_tool, sha256};

/// The user agent wharf's upstream client sends: `wharf/<version>`.
const WHARF_AGENT: &str = concat!("wharf/", env!("CARGO_PKG_VERSION"));

// ---------------------------------------------------------------------------
// containerd: hosts.toml mirror

/// containerd pulls `<distribution>/ns/img:1` (a multi-arch OCI index) with a
/// hosts.toml naming wharf as a pull/resolve mirror. wharf routes the
/// request by its `?ns=` to the rule for that upstream. Checks: containerd
/// recorded the index digest Distribution holds; every request Distribution
/// saw came from wharf, one GET per blob, and only the host platform's blobs;
/// the image runs. Then Distribution is stopped and a fresh containerd pulls
/// and runs the image again: from wharf's cache alone.
#[test]
fn containerd_pulls_through_hosts_toml_mirror_and_from_cache_with_upstream_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = images::oci_index(&dir.path().join("src"));
    let mut upstream = Distribution::start();
    let digest = upstream.seed(&image, "ns/img", "1");
    let seeded = upstream.access_log().len();
    let wharf = common::spawn_wharf(&rule("dist", &upstream, ""));

    let certs = dir.path().join("certs.d");
    write_hosts_toml(&certs, &upstream.host(), &wharf.url());
    let reference = format!("{}/ns/img:1", upstream.host());

    let ctrd = Containerd::start();
    ctrd.pull_via_mirror(&certs, &reference);
    assert_eq!(
        ctrd.image_digest(&reference),
        digest,
        "digest containerd recorded"
    );
    assert_eq!(
        ctrd.run_marker(&reference),
        image.native().marker,
        "container output"
    );

    let seen = &upstream.access_log()[seeded..];
    assert_only_wharf(seen);
    let native = manifest_blobs(&image, &image.native().digest);
    for blob in &native {
        assert_eq!(
            blob_gets(seen, "ns/img", blob),
            1,
            "upstream GETs of blob {blob}: {seen:#?}"
        );
    }
    for platform in image
        .platforms
        .iter()
        .filter(|p| p.digest != image.native().digest)
    {
        for blob in manifest_blobs(&image, &platform.digest) {
            assert_eq!(
                blob_gets(seen, "ns/img", &blob),
                0,
                "wharf fetched a blob of {} that nobody asked for",
                platform.architecture
            );
        }
    }
    drop(ctrd);

    // Upstream gone: a containerd with an empty store still pulls.
    upstream.stop();
    let ctrd = Containerd::start();
    ctrd.pull_via_mirror(&certs, &reference);
    assert_eq!(
        ctrd.image_digest(&reference),
        digest,
        "digest after the pull from the cache"
    );
    assert_eq!(
        ctrd.run_marker(&reference),
        image.native().marker,
        "container output after the pull from the cache"
    );
}

/// A hosts.toml mirror entry for a registry that has no rule in wharf:
/// wharf answers 404 to the `?ns=` request without contacting that registry
/// (or any other), and containerd falls back to the registry itself. The
/// pull succeeds with the right digest; the registry's log shows only
/// containerd, the configured upstream's log shows nothing, and wharf cached
/// nothing.
#[test]
fn containerd_falls_back_to_the_registry_when_no_rule_serves_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = images::oci_image(&dir.path().join("src"), images::host_arch());
    let configured = Distribution::start();
    let unrelated = Distribution::start();
    let digest = unrelated.seed(&image, "ns/other", "1");
    let seeded = unrelated.access_log().len();
    let wharf = common::spawn_wharf(&rule("dist", &configured, ""));

    let certs = dir.path().join("certs.d");
    write_hosts_toml(&certs, &unrelated.host(), &wharf.url());
    let reference = format!("{}/ns/other:1", unrelated.host());
    let ctrd = Containerd::start();
    ctrd.pull_via_mirror(&certs, &reference);
    assert_eq!(
        ctrd.image_digest(&reference),
        digest,
        "digest containerd recorded"
    );
    assert_eq!(
        ctrd.run_marker(&reference),
        image.native().marker,
        "container output"
    );

    let seen = &unrelated.access_log()[seeded..];
    assert!(
        !seen.is_empty() && seen.iter().all(|a| a.user_agent.starts_with("containerd/")),
        "the unrelated registry must be reached by containerd alone, never by wharf: {seen:#?}"
    );
    for blob in manifest_blobs(&image, &digest) {
        assert_eq!(
            blob_gets(seen, "ns/other", &blob),
            1,
            "containerd GET {blob}"
        );
    }
    assert!(
        configured.access_log().is_empty(),
        "the configured upstream was contacted: {:#?}",
        configured.access_log()
    );
    assert!(
        stored_blobs(&wharf.data_dir()).is_empty(),
        "wharf stored content for a registry it has no rule for"
    );
}

/// `?ns=` naming a registry without a rule, asked directly: 404 with
/// `NAME_UNKNOWN` (the repository is unknown to wharf; containerd falls back
/// on any 404) for manifests, blobs and tags alike, and no upstream is
/// contacted: neither the live registry the ns names nor the configured one.
#[test]
fn unknown_ns_is_404_name_unknown_and_contacts_no_upstream() {
    let configured = Distribution::start();
    let unrelated = Distribution::start();
    let wharf = common::spawn_wharf(&rule("dist", &configured, ""));
    let blob = format!("sha256:{}", "a".repeat(64));
    let mut failures = Vec::new();
    block_on(async {
        let http = HttpClient::new(wharf.url());
        for ns in ["unknown.example:1", &unrelated.host()] {
            for path in [
                format!("/v2/x/manifests/t?ns={ns}"),
                format!("/v2/library/x/manifests/t?ns={ns}"),
                format!("/v2/x/blobs/{blob}?ns={ns}"),
                format!("/v2/x/tags/list?ns={ns}"),
            ] {
                let r = http.get(&path).await;
                let code = r.error_code();
                if r.status != StatusCode::NOT_FOUND || code != "NAME_UNKNOWN" {
                    failures.push(format!(
                        "GET {path}: expected 404 NAME_UNKNOWN, got {} {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    ));
                }
            }
            let r = http.head(&format!("/v2/x/manifests/t?ns={ns}")).await;
            assert_eq!(r.status, StatusCode::NOT_FOUND, "HEAD manifest ?ns={ns}");
        }
    });
    assert!(
        configured.access_log().is_empty(),
        "the configured upstream was contacted: {:#?}",
        configured.access_log()
    );
    assert!(
        unrelated.access_log().is_empty(),
        "wharf contacted the registry named by ?ns=: {:#?}",
        unrelated.access_log()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------
// podman: registries.conf mirror

/// podman pulls `<distribution>/ns/img:1` with a registries.conf whose
/// mirror is wharf's `dist` prefix (`location = "WHARF/dist"`). Checks the
/// digest podman recorded, that Distribution saw only wharf, and that the
/// image runs; then, with Distribution stopped, a podman with an empty store
/// pulls it again from wharf's cache.
#[test]
fn podman_pulls_through_registries_conf_mirror_and_from_cache_with_upstream_down() {
    require_tool("podman");
    require_tool("runc");
    let dir = tempfile::tempdir().expect("tempdir");
    let image = images::oci_image(&dir.path().join("src"), images::host_arch());
    let mut upstream = Distribution::start();
    let digest = upstream.seed(&image, "ns/img", "1");
    let seeded = upstream.access_log().len();
    let wharf = common::spawn_wharf(&rule("dist", &upstream, ""));

    let conf = dir.path().join("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "unqualified-search-registries = []\n\n\
             [[registry]]\nprefix = \"{up}\"\nlocation = \"{up}\"\ninsecure = true\n\n\
             [[registry.mirror]]\nlocation = \"{w}/dist\"\ninsecure = true\n",
            up = upstream.host(),
            w = wharf.host()
        ),
    )
    .expect("write registries.conf");
    let reference = format!("{}/ns/img:1", upstream.host());

    let podman = Podman::new(&dir.path().join("store1"), &conf);
    run(podman.cmd().args(["pull", "--quiet", &reference]));
    assert_eq!(podman.digest(&reference), digest, "digest podman recorded");
    let by_digest = format!("{}/ns/img@{digest}", upstream.host());
    let repo_digests = podman.repo_digests(&reference);
    assert!(
        repo_digests.contains(&by_digest),
        "{by_digest} not in podman's RepoDigests: {repo_digests:?}"
    );
    assert_eq!(
        podman.run_marker(&reference),
        image.native().marker,
        "container output"
    );
    let seen = &upstream.access_log()[seeded..];
    assert_only_wharf(seen);
    for blob in manifest_blobs(&image, &digest) {
        assert_eq!(
            blob_gets(seen, "ns/img", &blob),
            1,
            "upstream GETs of {blob}"
        );
    }

    upstream.stop();
    let podman = Podman::new(&dir.path().join("store2"), &conf);
    run(podman.cmd().args(["pull", "--quiet", &reference]));
    assert_eq!(
        podman.digest(&reference),
        digest,
        "digest after the pull from the cache"
    );
    assert_eq!(
        podman.run_marker(&reference),
        image.native().marker,
        "container output after the pull from the cache"
    );
}

// ---------------------------------------------------------------------------
// skopeo: the prefix form

/// `skopeo copy docker://WHARF/dist/ns/img:1 oci:DIR:1` of a single image:
/// the manifest digest is the one Distribution holds, every blob hashes to
/// its digest and is byte-identical to the source. A second copy is served
/// from the cache (no new upstream blob GET).
#[test]
fn skopeo_copies_an_image_through_a_prefix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = images::oci_image(&dir.path().join("src"), images::host_arch());
    let upstream = Distribution::start();
    let digest = upstream.seed(&image, "ns/img", "1");
    assert_eq!(
        sha256(&inspect_raw(&format!("{}/ns/img:1", upstream.host()))),
        digest,
        "Distribution serves the seeded manifest"
    );
    let seeded = upstream.access_log().len();
    let wharf = common::spawn_wharf(&rule("dist", &upstream, ""));
    let source = format!("{}/dist/ns/img:1", wharf.host());

    assert_eq!(
        sha256(&inspect_raw(&source)),
        digest,
        "manifest through wharf"
    );
    for n in 0..2 {
        let out = dir.path().join(format!("copy{n}"));
        skopeo_copy_out(&source, &out, false);
        assert_eq!(verify_oci_copy(&out, "1", &digest, &image), 2);
    }
    let seen = &upstream.access_log()[seeded..];
    assert_only_wharf(seen);
    for blob in manifest_blobs(&image, &digest) {
        assert_eq!(
            blob_gets(seen, "ns/img", &blob),
            1,
            "two copies, one upstream GET of {blob}"
        );
    }
}

/// `skopeo copy --all` of a multi-arch index through a rule with
/// `upstream_prefix` (`WHARF/hub/img` is `DIST/ns/img`): index, both
/// platform manifests and all four blobs arrive with their digests.
#[test]
fn skopeo_copies_an_index_through_upstream_prefix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = images::oci_index(&dir.path().join("src"));
    let upstream = Distribution::start();
    let digest = upstream.seed(&image, "ns/img", "1");
    let seeded = upstream.access_log().len();
    let wharf = common::spawn_wharf(&rule("hub", &upstream, "upstream_prefix = \"ns\""));
    let source = format!("{}/hub/img:1", wharf.host());

    assert_eq!(sha256(&inspect_raw(&source)), digest, "index through wharf");
    let out = dir.path().join("copy");
    skopeo_copy_out(&source, &out, true);
    assert_eq!(verify_oci_copy(&out, "1", &digest, &image), 4);
    let seen = &upstream.access_log()[seeded..];
    assert_only_wharf(seen);
    assert!(
        seen.iter().all(|a| a.path.starts_with("/v2/ns/img/")),
        "upstream_prefix not applied: {seen:#?}"
    );
}

// ---------------------------------------------------------------------------
// Docker engine: registry-mirrors

/// The Docker engine with `registry-mirrors` = wharf, whose ROOT rule points
/// at Distribution seeded with `library/<name>:1` (a multi-arch OCI index).
/// `docker pull docker.io/library/<name>:1` cannot reach Docker Hub here (no
/// internet), so its success means the mirror served it. Checks the digest
/// Docker reports, the image ID (the host platform's config digest), that
/// Distribution saw only wharf, and that the image runs.
#[test]
fn docker_engine_pulls_through_registry_mirrors() {
    require_tool("docker");
    let dir = tempfile::tempdir().expect("tempdir");
    let image = images::oci_index(&dir.path().join("src"));
    let upstream = Distribution::start();
    let name = unique("mirror");
    let digest = upstream.seed(&image, &format!("library/{name}"), "1");
    let seeded = upstream.access_log().len();
    let wharf = common::spawn_wharf(&rule("ROOT", &upstream, ""));

    let _mirror = DaemonMirror::set(&wharf.url());
    let mut cleanup = DockerCleanup::new();
    let reference = format!("docker.io/library/{name}:1");
    cleanup.add(&reference);
    cleanup.add(format!("docker.io/library/{name}@{digest}"));

    let out = run(Command::new("docker").args(["pull", &reference]));
    assert!(
        out.contains(&format!("Digest: {digest}")),
        "docker pull reported another digest than Distribution's {digest}:\n{out}"
    );
    let id =
        run(Command::new("docker").args(["image", "inspect", "--format", "{{.Id}}", &reference]))
            .trim()
            .to_string();
    cleanup.add(&id);
    let native = json(&image.blob(&image.native().digest).expect("native manifest"));
    assert_eq!(
        id,
        native["config"]["digest"].as_str().expect("config digest"),
        "image ID is the host platform's config digest"
    );
    let repo_digests = run(Command::new("docker").args([
        "image",
        "inspect",
        "--format",
        "{{range .RepoDigests}}{{.}} {{end}}",
        &reference,
    ]));
    assert!(
        repo_digests
            .split_whitespace()
            .any(|r| r == format!("{name}@{digest}")
                || r == format!("docker.io/library/{name}@{digest}")),
        "{name}@{digest} not in RepoDigests: {repo_digests}"
    );
    let out = run(Command::new("docker").args([
        "run",
        "--rm",
        "--network",
        "none",
        &reference,
        "/bin/sh",
        "-c",
        PRINT_MARKER,
    ]));
    assert_eq!(out.trim(), image.native().marker, "container output");

    let seen = &upstream.access_log()[seeded..];
    assert_only_wharf(seen);
    for blob in manifest_blobs(&image, &image.native().digest) {
        assert_eq!(
            blob_gets(seen, &format!("library/{name}"), &blob),
            1,
            "upstream GETs of {blob}"
        );
    }
}

// ---------------------------------------------------------------------------
// Coalescing with real clients

/// Four `skopeo copy` processes pull the same cold image (a 64 MiB layer)
/// through wharf at once. Distribution's access log shows exactly one GET
/// per blob, answered 200 in full; all four copies are complete and
/// byte-identical to the source.
#[test]
fn four_concurrent_skopeo_pulls_make_one_upstream_get_per_blob() {
    const CLIENTS: usize = 4;
    let dir = tempfile::tempdir().expect("tempdir");
    let image = images::oci_image_with_payload(
        &dir.path().join("src"),
        images::host_arch(),
        64 * 1024 * 1024,
    );
    let upstream = Distribution::start();
    let digest = upstream.seed(&image, "ns/big", "1");
    let seeded = upstream.access_log().len();
    let wharf = common::spawn_wharf(&rule("dist", &upstream, ""));
    let source = format!("{}/dist/ns/big:1", wharf.host());

    let start = Arc::new(Barrier::new(CLIENTS));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|n| {
            let out = dir.path().join(format!("copy{n}"));
            let source = source.clone();
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                let began = Instant::now();
                skopeo_copy_out(&source, &out, false);
                (began, Instant::now(), out)
            })
        })
        .collect();
    let results: Vec<(Instant, Instant, PathBuf)> = threads
        .into_iter()
        .map(|t| t.join().expect("a skopeo copy failed"))
        .collect();
    let last_start = results.iter().map(|r| r.0).max().unwrap();
    let first_end = results.iter().map(|r| r.1).min().unwrap();
    assert!(
        last_start < first_end,
        "the four copies did not run at the same time"
    );
    for (_, _, out) in &results {
        assert_eq!(verify_oci_copy(out, "1", &digest, &image), 3);
    }

    let seen = &upstream.access_log()[seeded..];
    assert_only_wharf(seen);
    let blobs = manifest_blobs(&image, &digest);
    assert_eq!(blobs.len(), 3, "config, busybox layer, payload layer");
    for blob in &blobs {
        let gets: Vec<&Access> = seen
            .iter()
            .filter(|a| a.method == "GET" && a.path == format!("/v2/ns/big/blobs/{blob}"))
            .collect();
        assert_eq!(
            gets.len(),
            1,
            "{CLIENTS} concurrent pulls must make exactly one upstream GET of {blob}: {gets:#?}"
        );
        assert_eq!(gets[0].status, 200, "the one GET is a full 200: {gets:#?}");
    }
    // The tag is looked up upstream once too: concurrent lookups of one
    // tag wait for the first.
    let manifest_gets: Vec<&Access> = seen
        .iter()
        .filter(|a| a.method == "GET" && a.path == "/v2/ns/big/manifests/1")
        .collect();
    assert_eq!(
        manifest_gets.len(),
        1,
        "{CLIENTS} concurrent pulls must make one upstream GET of the tag: {manifest_gets:#?}"
    );
}

// ---------------------------------------------------------------------------
// The client configurations in config/examples/

/// The example client configurations parse the way their clients parse them
/// (podman reads registries.conf itself) and point at what wharf's default
/// config serves: Docker Hub under ROOT (Docker engine), by `?ns=docker.io`
/// (containerd) and under `docker-hub/` (podman).
#[test]
fn config_examples_parse_and_match_the_default_rules() {
    require_tool("podman");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples");
    let read = |name: &str| {
        std::fs::read_to_string(examples.join(name))
            .unwrap_or_else(|e| panic!("config/examples/{name}: {e}"))
    };

    let defaults: toml::Table = read("../wharf.toml").parse().expect("config/wharf.toml");
    let hub_rule = |prefix: &str| {
        defaults["pull_through"]
            .as_array()
            .expect("[[pull_through]]")
            .iter()
            .any(|r| {
                r["prefix"].as_str() == Some(prefix)
                    && r["upstream"].as_str() == Some("https://registry-1.docker.io")
            })
    };
    assert!(hub_rule("ROOT"), "no default ROOT rule for Docker Hub");
    assert!(hub_rule("docker-hub"), "no default docker-hub rule");

    let hosts: toml::Table = read("containerd-hosts.toml")
        .parse()
        .expect("containerd-hosts.toml");
    assert_eq!(
        hosts["server"].as_str(),
        Some("https://registry-1.docker.io")
    );
    let mirrors = hosts["host"].as_table().expect("[host.\"...\"]");
    assert_eq!(mirrors.len(), 1, "{mirrors:?}");
    let (url, host) = mirrors.iter().next().unwrap();
    assert!(
        url.starts_with("http://") || url.starts_with("https://"),
        "{url}"
    );
    assert_eq!(
        host["capabilities"],
        toml::Value::Array(vec!["pull".into(), "resolve".into()])
    );

    let daemon = json(read("docker-daemon.json").as_bytes());
    let daemon = daemon.as_object().expect("a JSON object");
    assert_eq!(
        daemon.keys().collect::<Vec<_>>(),
        ["registry-mirrors"],
        "dockerd refuses unknown keys"
    );
    let list = daemon["registry-mirrors"].as_array().expect("a list");
    assert!(
        !list.is_empty()
            && list.iter().all(|m| m
                .as_str()
                .is_some_and(|m| m.starts_with("http://") || m.starts_with("https://"))),
        "{list:?}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let podman = Podman::new(dir.path(), &examples.join("registries.conf"));
    let registries = json(
        run(podman
            .cmd()
            .args(["info", "--format", "{{json .Registries}}"]))
        .as_bytes(),
    );
    let hub = &registries["docker.io"];
    assert_eq!(hub["Prefix"], "docker.io", "{registries}");
    let mirror = hub["Mirrors"][0]["Location"].as_str().unwrap_or_default();
    assert!(
        mirror.ends_with("/docker-hub"),
        "the podman mirror must name wharf's docker-hub prefix: {registries}"
    );
}

// ---------------------------------------------------------------------------
// Helpers: wharf rules, access logs, manifests

/// A `[[pull_through]]` table for `upstream` (any table replaces wharf's
/// default rules).
fn rule(prefix: &str, upstream: &Distribution, extra: &str) -> String {
    format!(
        "[[pull_through]]\nprefix = \"{prefix}\"\nupstream = \"{}\"\n{extra}\n",
        upstream.url()
    )
}

/// Every request in `seen` came from wharf: no client reached the upstream
/// itself.
fn assert_only_wharf(seen: &[Access]) {
    assert!(!seen.is_empty(), "the upstream saw no request at all");
    let others: Vec<&Access> = seen
        .iter()
        .filter(|a| a.user_agent != WHARF_AGENT)
        .collect();
    assert!(
        others.is_empty(),
        "requests reached the upstream from someone other than wharf ({WHARF_AGENT}): {others:#?}"
    );
}

/// GETs of `/v2/REPO/blobs/DIGEST` in the log, whatever their status.
fn blob_gets(seen: &[Access], repo: &str, digest: &str) -> usize {
    let path = format!("/v2/{repo}/blobs/{digest}");
    seen.iter()
        .filter(|a| a.method == "GET" && a.path == path)
        .count()
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)))
}

/// The config and layer digests of the image manifest `digest` in `image`.
fn manifest_blobs(image: &OciImage, digest: &str) -> Vec<String> {
    let m = json(&image.blob(digest).expect("manifest in the source layout"));
    std::iter::once(&m["config"])
        .chain(m["layers"].as_array().expect("layers"))
        .map(|d| d["digest"].as_str().expect("digest").to_string())
        .collect()
}

/// Blob digests stored under a wharf data directory.
fn stored_blobs(data: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(prefixes) = std::fs::read_dir(data.join("blobs/sha256")) {
        for p in prefixes.flatten() {
            for b in std::fs::read_dir(p.path()).into_iter().flatten().flatten() {
                out.push(format!("sha256:{}", b.file_name().to_string_lossy()));
            }
        }
    }
    out
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

// ---------------------------------------------------------------------------
// skopeo

/// `skopeo inspect --raw docker://REFERENCE` over plain HTTP.
fn inspect_raw(reference: &str) -> Vec<u8> {
    require_tool("skopeo");
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo inspect --raw docker://{reference} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `skopeo copy docker://SOURCE oci:OUT:1`, unchanged (`--preserve-digests`),
/// with every platform when `all`.
fn skopeo_copy_out(source: &str, out: &Path, all: bool) {
    require_tool("skopeo");
    let mut cmd = Command::new("skopeo");
    cmd.args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--preserve-digests",
    ]);
    if all {
        cmd.arg("--all");
    }
    run(cmd
        .arg(format!("docker://{source}"))
        .arg(format!("oci:{}:1", out.display())));
}

/// Checks an OCI layout written by skopeo: `tag` names `digest`; every
/// manifest it reaches (index, platform manifests) and every config and
/// layer blob is present with its descriptor's size, hashes to its digest
/// and is byte-identical to the same blob in `source`. Returns the number of
/// config and layer blobs checked.
fn verify_oci_copy(out: &Path, tag: &str, digest: &str, source: &OciImage) -> usize {
    let index = json(&std::fs::read(out.join("index.json")).expect("index.json"));
    let named: Vec<&str> = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .filter(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .filter_map(|m| m["digest"].as_str())
        .collect();
    assert_eq!(named, [digest], "what {tag} names in {}", out.display());

    let read = |d: &str, size: Option<u64>| -> Vec<u8> {
        let hex = d.strip_prefix("sha256:").expect("sha256 digest");
        let bytes = std::fs::read(out.join("blobs/sha256").join(hex))
            .unwrap_or_else(|e| panic!("{d} missing in {}: {e}", out.display()));
        assert_eq!(sha256(&bytes), d, "content does not hash to its digest");
        if let Some(size) = size {
            assert_eq!(bytes.len() as u64, size, "size of {d}");
        }
        assert_eq!(
            source.blob(d).as_deref(),
            Some(&bytes[..]),
            "{d} differs from the source layout"
        );
        bytes
    };
    let top = json(&read(digest, None));
    let manifests: Vec<serde_json::Value> = match top["manifests"].as_array() {
        Some(children) => children
            .iter()
            .map(|c| {
                json(&read(
                    c["digest"].as_str().expect("digest"),
                    c["size"].as_u64(),
                ))
            })
            .collect(),
        None => vec![top],
    };
    let mut checked = 0;
    for m in &manifests {
        for d in std::iter::once(&m["config"]).chain(m["layers"].as_array().expect("layers")) {
            read(d["digest"].as_str().expect("digest"), d["size"].as_u64());
            checked += 1;
        }
    }
    checked
}

// ---------------------------------------------------------------------------
// containerd

/// `CERTS_D/<host>/hosts.toml`: `server` is the registry itself (the
/// fallback), wharf a pull/resolve mirror tried first.
fn write_hosts_toml(certs: &Path, host: &str, wharf_url: &str) {
    let d = certs.join(host);
    std::fs::create_dir_all(&d).expect("mkdir certs.d/HOST");
    std::fs::write(
        d.join("hosts.toml"),
        format!(
            "server = \"http://{host}\"\n\n[host.\"{wharf_url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .expect("write hosts.toml");
}

// ---------------------------------------------------------------------------
// podman

/// podman with a private store and `CONTAINERS_REGISTRIES_CONF`.
struct Podman {
    store: PathBuf,
    registries_conf: PathBuf,
}

impl Podman {
    fn new(store: &Path, registries_conf: &Path) -> Self {
        Podman {
            store: store.to_path_buf(),
            registries_conf: registries_conf.to_path_buf(),
        }
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_REGISTRIES_CONF", &self.registries_conf)
            .arg("--root")
            .arg(self.store.join("root"))
            .arg("--runroot")
            .arg(self.store.join("run"))
            .arg("--tmpdir")
            .arg(self.store.join("tmp"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ]);
        cmd
    }

    fn digest(&self, reference: &str) -> String {
        run(self
            .cmd()
            .args(["image", "inspect", "--format", "{{.Digest}}", reference]))
        .trim()
        .to_string()
    }

    fn repo_digests(&self, reference: &str) -> Vec<String> {
        run(self.cmd().args([
            "image",
            "inspect",
            "--format",
            "{{range .RepoDigests}}{{.}} {{end}}",
            reference,
        ]))
        .split_whitespace()
        .map(str::to_string)
        .collect()
    }

    fn run_marker(&self, reference: &str) -> String {
        run(self.cmd().args([
            "run",
            "--rm",
            "--runtime",
            "runc",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--network",
            "none",
            reference,
            "/bin/sh",
            "-c",
            PRINT_MARKER,
        ]))
        .trim()
        .to_string()
    }
}

// ---------------------------------------------------------------------------
// Docker engine: daemon.json

const DAEMON_JSON: &str = "/etc/docker/daemon.json";
/// The original daemon.json while a test has changed it. Found at start, it
/// means an earlier run died before restoring: it is restored first.
const DAEMON_JSON_BACKUP: &str = "/etc/docker/daemon.json.wharf-mirror-test";
/// Serializes every test (in any process) that edits daemon.json.
const DAEMON_JSON_LOCK: &str = "/tmp/wharf-test-docker-daemon-json.lock";

/// `registry-mirrors` set in /etc/docker/daemon.json and reloaded (SIGHUP)
/// for the guard's lifetime. Drop (also on panic) puts the file back and
/// reloads again, so the engine ends with the mirrors it started with.
///
/// dockerd reloads only the keys present in the file: a file without
/// `registry-mirrors` leaves the current list in place. So restoring writes
/// the original list (or `[]`) explicitly first, reloads, and only then
/// puts the original bytes back.
struct DaemonMirror {
    _lock: std::fs::File,
    /// The file as it was (`None`: there was none).
    original: Option<Vec<u8>>,
}

impl DaemonMirror {
    fn set(url: &str) -> Self {
        require_tool("dockerd");
        require_tool("pidof");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(DAEMON_JSON_LOCK)
            .expect("open the daemon.json lock file");
        lock.lock().expect("lock daemon.json");
        if let Ok(stale) = std::fs::read(DAEMON_JSON_BACKUP) {
            eprintln!("restoring {DAEMON_JSON} from {DAEMON_JSON_BACKUP}, left by an earlier run");
            let stale = (!stale.is_empty()).then_some(stale);
            restore_daemon_json(stale.as_deref()).expect("restore the stale daemon.json backup");
            let _ = std::fs::remove_file(DAEMON_JSON_BACKUP);
        }
        let original = std::fs::read(DAEMON_JSON).ok();
        let mut config = daemon_config(original.as_deref()).unwrap_or_else(|e| panic!("{e}"));
        // An empty backup stands for "there was no daemon.json".
        write_atomic(
            Path::new(DAEMON_JSON_BACKUP),
            original.as_deref().unwrap_or_default(),
        )
        .expect("write the daemon.json backup");
        let guard = DaemonMirror {
            _lock: lock,
            original,
        };
        config.insert("registry-mirrors".into(), serde_json::json!([url]));
        write_atomic(
            Path::new(DAEMON_JSON),
            &serde_json::to_vec_pretty(&config).expect("json"),
        )
        .expect("write daemon.json");
        reload_dockerd().unwrap_or_else(|e| panic!("{e}"));
        wait_for_mirrors(|mirrors| mirrors.iter().any(|m| same_url(m, url))).unwrap_or_else(|m| {
            panic!("dockerd did not take the mirror {url} after SIGHUP; it lists {m:?}")
        });
        guard
    }
}

impl Drop for DaemonMirror {
    fn drop(&mut self) {
        match restore_daemon_json(self.original.as_deref()) {
            Ok(()) => {
                let _ = std::fs::remove_file(DAEMON_JSON_BACKUP);
            }
            // The backup stays, so that the next run restores it.
            Err(e) => eprintln!("could not restore {DAEMON_JSON}: {e}"),
        }
    }
}

/// Puts `original` back (removes the file for `None`) and reloads dockerd
/// until its mirror list is the original one again. Does not panic, as it
/// runs in Drop.
fn restore_daemon_json(original: Option<&[u8]>) -> Result<(), String> {
    let mut config = daemon_config(original)?;
    let mirrors = config
        .get("registry-mirrors")
        .cloned()
        .unwrap_or_else(|| serde_json::json!([]));
    let wanted: Vec<String> = serde_json::from_value(mirrors.clone()).unwrap_or_default();
    // First with the list spelled out (dockerd keeps its current list when
    // the key is missing), then byte for byte as it was.
    config.insert("registry-mirrors".into(), mirrors);
    let explicit = serde_json::to_vec_pretty(&config).map_err(|e| e.to_string())?;
    write_atomic(Path::new(DAEMON_JSON), &explicit)
        .map_err(|e| format!("write {DAEMON_JSON}: {e}"))?;
    reload_dockerd()?;
    wait_for_mirrors(|mirrors| {
        mirrors.len() == wanted.len() && mirrors.iter().zip(&wanted).all(|(a, b)| same_url(a, b))
    })
    .map_err(|m| format!("dockerd lists the mirrors {m:?}, not the original {wanted:?}"))?;
    match original {
        Some(bytes) => write_atomic(Path::new(DAEMON_JSON), bytes)
            .map_err(|e| format!("write {DAEMON_JSON}: {e}"))?,
        None => {
            std::fs::remove_file(DAEMON_JSON).map_err(|e| format!("remove {DAEMON_JSON}: {e}"))?
        }
    }
    reload_dockerd()
}

/// daemon.json as a JSON object (empty for no file).
fn daemon_config(
    bytes: Option<&[u8]>,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match bytes {
        None => Ok(serde_json::Map::new()),
        Some(b) => match serde_json::from_slice(b) {
            Ok(serde_json::Value::Object(m)) => Ok(m),
            _ => Err(format!(
                "{DAEMON_JSON} is not a JSON object: {}",
                String::from_utf8_lossy(b)
            )),
        },
    }
}

/// Writes through a temporary file and a rename, so dockerd never reads a
/// half-written file.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// SIGHUP to the one running dockerd: it reloads daemon.json.
fn reload_dockerd() -> Result<(), String> {
    let out = Command::new("pidof")
        .arg("dockerd")
        .output()
        .map_err(|e| format!("run pidof: {e}"))?;
    let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let [pid] = &pids[..] else {
        return Err(format!("expected one dockerd, found {pids:?}"));
    };
    let status = Command::new("kill")
        .args(["-HUP", pid])
        .status()
        .map_err(|e| format!("run kill: {e}"))?;
    if !status.success() {
        return Err(format!("kill -HUP {pid} failed"));
    }
    Ok(())
}

/// Polls `docker info` (up to 30 s) until its mirror list satisfies `done`;
/// returns the last list seen on timeout.
fn wait_for_mirrors(done: impl Fn(&[String]) -> bool) -> Result<(), Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mirrors: Option<Vec<String>> = Command::new("docker")
            .args(["info", "--format", "{{json .RegistryConfig.Mirrors}}"])
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| serde_json::from_slice(&out.stdout).unwrap_or_default());
        if mirrors.as_deref().is_some_and(&done) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(mirrors.unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `http://h:p` and `http://h:p/` are the same mirror (docker adds the `/`).
fn same_url(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}
