//! Interoperability with real clients: skopeo, containerd (`ctr`), podman and
//! the Docker engine push to and pull from a running wharf. The tests check
//! what a user relies on: the manifests and blobs that come back are
//! byte-for-byte the ones pushed (same digests), and the images run.
//!
//! Every external tool is required; a missing one fails the test (run
//! `scripts/test`, which installs them). Each scenario takes the registry
//! address (`HOST:PORT`) as its parameter, so it can run against any
//! registry; the tests pass a freshly spawned wharf (on the filesystem
//! backend, or on the S3 backend over a SeaweedFS spawned by the test).
//!
//! Client facts these tests rely on:
//! - All traffic is plain HTTP on loopback. skopeo and podman need
//!   `--tls-verify=false`, `ctr` needs `--plain-http`; the Docker engine needs
//!   nothing, as it treats 127.0.0.0/8 as an insecure registry by default.
//! - Images built by umoci leave the optional `mediaType` field out of their
//!   manifests, so the registry has to take the type from the Content-Type
//!   of the manifest PUT.
//! - `skopeo copy --format v2s2` converts only manifests (an OCI index becomes
//!   a Docker manifest list with `--all`); config and layer blobs keep their
//!   digests. `--preserve-digests` refuses any conversion, so OCI pushes use
//!   it to prove nothing was rewritten.

mod common;

use std::path::Path;
use std::process::Command;

use common::containerd::Containerd;
use common::images::{
    self, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, DockerCleanup, OCI_INDEX, OCI_MANIFEST, OciImage,
    PRINT_MARKER, run, try_run, unique,
};
use common::{require_tool, sha256};

// ---------------------------------------------------------------------------
// Tests: one wharf per test.

#[test]
fn skopeo_copies_oci_image() {
    let wharf = common::spawn_wharf("");
    skopeo_roundtrip(&wharf.host(), Shape::Image, Format::Oci);
}

#[test]
fn skopeo_copies_oci_index() {
    let wharf = common::spawn_wharf("");
    skopeo_roundtrip(&wharf.host(), Shape::Index, Format::Oci);
}

#[test]
fn skopeo_copies_docker_image() {
    let wharf = common::spawn_wharf("");
    skopeo_roundtrip(&wharf.host(), Shape::Image, Format::Docker);
}

#[test]
fn skopeo_copies_docker_manifest_list() {
    let wharf = common::spawn_wharf("");
    skopeo_roundtrip(&wharf.host(), Shape::Index, Format::Docker);
}

#[test]
fn containerd_pulls_and_runs_oci_index() {
    let wharf = common::spawn_wharf("");
    containerd_pull_and_run(&wharf.host(), Shape::Index, Format::Oci);
}

#[test]
fn containerd_pulls_and_runs_docker_image() {
    let wharf = common::spawn_wharf("");
    containerd_pull_and_run(&wharf.host(), Shape::Image, Format::Docker);
}

#[test]
fn podman_pulls_and_runs_oci_image() {
    let wharf = common::spawn_wharf("");
    podman_pull_and_run(&wharf.host(), Shape::Image, Format::Oci);
}

#[test]
fn podman_pulls_and_runs_docker_manifest_list() {
    let wharf = common::spawn_wharf("");
    podman_pull_and_run(&wharf.host(), Shape::Index, Format::Docker);
}

#[test]
fn docker_pushes_pulls_and_runs() {
    let wharf = common::spawn_wharf("");
    docker_push_pull_run(&wharf.host());
}

// The same scenarios against wharf on the S3 backend (a SeaweedFS spawned
// by the test), with and without presigned redirects for blob GETs.

#[test]
fn skopeo_copies_oci_index_over_s3() {
    let sw = common::seaweedfs::SeaweedFs::start_blocking();
    let wharf = sw.spawn_wharf("interop", "", &[], &[]);
    skopeo_roundtrip(&wharf.host(), Shape::Index, Format::Oci);
}

#[test]
fn skopeo_copies_docker_image_over_s3_with_redirects() {
    let sw = common::seaweedfs::SeaweedFs::start_blocking();
    let wharf = sw.spawn_wharf("interop", "redirect = true\n", &[], &[]);
    skopeo_roundtrip(&wharf.host(), Shape::Image, Format::Docker);
}

#[test]
fn containerd_pulls_and_runs_oci_index_over_s3() {
    let sw = common::seaweedfs::SeaweedFs::start_blocking();
    let wharf = sw.spawn_wharf("interop", "", &[], &[]);
    containerd_pull_and_run(&wharf.host(), Shape::Index, Format::Oci);
}

#[test]
fn containerd_pulls_and_runs_docker_image_over_s3_with_redirects() {
    let sw = common::seaweedfs::SeaweedFs::start_blocking();
    let wharf = sw.spawn_wharf("interop", "redirect = true\n", &[], &[]);
    containerd_pull_and_run(&wharf.host(), Shape::Image, Format::Docker);
}

#[test]
fn docker_pulls_and_runs_oci_index() {
    let wharf = common::spawn_wharf("");
    docker_pull_oci_index(&wharf.host());
}

// ---------------------------------------------------------------------------
// Building and pushing test images.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// One image for the host architecture.
    Image,
    /// An index (manifest list) with amd64 and arm64 images.
    Index,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// Pushed unchanged: OCI manifests and index, digests preserved.
    Oci,
    /// Converted by skopeo to Docker schema 2 (`--format v2s2`).
    Docker,
}

impl Format {
    fn manifest_type(self) -> &'static str {
        match self {
            Format::Oci => OCI_MANIFEST,
            Format::Docker => DOCKER_MANIFEST,
        }
    }
    fn index_type(self) -> &'static str {
        match self {
            Format::Oci => OCI_INDEX,
            Format::Docker => DOCKER_MANIFEST_LIST,
        }
    }
    fn top_type(self, shape: Shape) -> &'static str {
        match shape {
            Shape::Image => self.manifest_type(),
            Shape::Index => self.index_type(),
        }
    }
}

fn build(dir: &Path, shape: Shape) -> OciImage {
    match shape {
        Shape::Image => images::oci_image(dir, images::host_arch()),
        Shape::Index => images::oci_index(dir),
    }
}

/// What skopeo pushed.
struct Pushed {
    /// `HOST/REPO:TAG`.
    reference: String,
    /// `HOST/REPO`.
    repository: String,
    /// Digest of the pushed manifest (or index), as skopeo computed it.
    digest: String,
    /// The manifest bytes the registry serves for the tag.
    manifest: Vec<u8>,
}

impl Pushed {
    fn by_digest(&self) -> String {
        format!("{}@{}", self.repository, self.digest)
    }
}

/// `skopeo copy` of `image` to `docker://HOST/REPO:TAG`; checks the registry
/// then serves, for the tag, exactly the manifest skopeo pushed.
fn skopeo_push(host: &str, image: &OciImage, repo: &str, tag: &str, format: Format) -> Pushed {
    require_tool("skopeo");
    let repository = format!("{host}/{repo}");
    let reference = format!("{repository}:{tag}");
    let digestfile = image.layout.with_file_name(unique("digest"));
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet", "--dest-tls-verify=false", "--digestfile"])
        .arg(&digestfile);
    if image.media_type == OCI_INDEX {
        cmd.arg("--all");
    }
    match format {
        // Fails instead of silently converting anything.
        Format::Oci => cmd.arg("--preserve-digests"),
        Format::Docker => cmd.args(["--format", "v2s2"]),
    };
    run(cmd
        .arg(image.reference())
        .arg(format!("docker://{reference}")));
    let digest = std::fs::read_to_string(&digestfile)
        .expect("skopeo wrote no digest file")
        .trim()
        .to_string();
    if format == Format::Oci {
        assert_eq!(
            digest, image.digest,
            "skopeo pushed an OCI image under another digest than its own"
        );
    }
    let manifest = inspect_raw(&reference);
    assert_eq!(
        sha256(&manifest),
        digest,
        "GET manifest {reference} returned other bytes than were pushed:\n{}",
        String::from_utf8_lossy(&manifest)
    );
    if format == Format::Oci {
        assert_eq!(Some(&manifest), image.blob(&digest).as_ref());
    }
    Pushed {
        reference,
        repository,
        digest,
        manifest,
    }
}

/// `skopeo inspect --raw docker://REFERENCE`: the manifest bytes as served.
fn inspect_raw(reference: &str) -> Vec<u8> {
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

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)))
}

/// A manifest's media type; OCI manifests may leave the field out (umoci
/// does), Docker ones always carry it.
fn media_type(manifest: &serde_json::Value) -> &str {
    manifest["mediaType"]
        .as_str()
        .unwrap_or(if manifest["manifests"].is_array() {
            OCI_INDEX
        } else {
            OCI_MANIFEST
        })
}

fn str_field<'a>(v: &'a serde_json::Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key:?} in {v}"))
}

/// The descriptors in a manifest's `manifests` (index) or `config` + `layers`
/// (image).
fn descriptors(manifest: &serde_json::Value) -> Vec<serde_json::Value> {
    if let Some(list) = manifest["manifests"].as_array() {
        return list.clone();
    }
    let mut out = vec![manifest["config"].clone()];
    out.extend(
        manifest["layers"]
            .as_array()
            .unwrap_or_else(|| panic!("no layers in {manifest}"))
            .iter()
            .cloned(),
    );
    out
}

// ---------------------------------------------------------------------------
// skopeo

/// Pushes an image or index with skopeo (OCI as is, or converted to Docker
/// schema 2), reads it back by tag and by digest, then copies it back out
/// with every platform into a `dir:` directory and checks each manifest and
/// blob there hashes to its digest and is the one the source layout holds.
fn skopeo_roundtrip(host: &str, shape: Shape, format: Format) {
    require_tool("skopeo");
    let dir = tempfile::tempdir().expect("tempdir");
    let image = build(&dir.path().join("src"), shape);
    let repo = format!("interop/skopeo-{shape:?}-{format:?}").to_lowercase();
    let pushed = skopeo_push(host, &image, &repo, "1", format);

    let top = json(&pushed.manifest);
    assert_eq!(
        media_type(&top),
        format.top_type(shape),
        "pushed manifest has the wrong media type: {top}"
    );

    // The same bytes by digest.
    assert_eq!(inspect_raw(&pushed.by_digest()), pushed.manifest);

    // The tag is listed.
    let tags = json(
        run(Command::new("skopeo")
            .args(["list-tags", "--tls-verify=false"])
            .arg(format!("docker://{}", pushed.repository)))
        .as_bytes(),
    );
    let tags: Vec<&str> = tags["Tags"]
        .as_array()
        .unwrap_or_else(|| panic!("no Tags in {tags}"))
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    assert_eq!(tags, ["1"], "tags of {}", pushed.repository);

    // Every platform manifest of an index, by digest.
    if shape == Shape::Index {
        let children = descriptors(&top);
        let mut arches: Vec<&str> = children
            .iter()
            .map(|c| c["platform"]["architecture"].as_str().unwrap_or("?"))
            .collect();
        arches.sort();
        assert_eq!(arches, ["amd64", "arm64"], "platforms in {top}");
        for child in &children {
            let digest = str_field(child, "digest");
            assert_eq!(str_field(child, "mediaType"), format.manifest_type());
            let bytes = inspect_raw(&format!("{}@{digest}", pushed.repository));
            assert_eq!(sha256(&bytes), digest, "manifest {digest} by digest");
            assert_eq!(bytes.len() as u64, child["size"].as_u64().unwrap());
            assert_eq!(media_type(&json(&bytes)), format.manifest_type());
            if format == Format::Oci {
                assert!(
                    image.platforms.iter().any(|p| p.digest == digest),
                    "index names a manifest that was not pushed: {digest}"
                );
            }
        }
    }

    // Copy everything back out and check every byte.
    let out = dir.path().join("pulled");
    run(Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--all",
            "--preserve-digests",
            "--src-tls-verify=false",
        ])
        .arg(format!("docker://{}", pushed.reference))
        .arg(format!("dir:{}", out.display())));
    let blobs = verify_dir_copy(&out, &pushed.digest, &image);
    let expected = match shape {
        Shape::Image => 2, // config + one layer
        Shape::Index => 4, // two configs + two layers
    };
    assert_eq!(blobs, expected, "blobs copied back: {blobs}");
}

/// Checks a `skopeo copy --all ... dir:OUT` directory: `manifest.json` hashes
/// to `digest`; for an index every platform manifest is there as
/// `HEX.manifest.json` and hashes to its name; every config and layer blob
/// has its descriptor's size and digest and is byte-identical to the blob of
/// the same digest in the source layout. Returns the number of blobs checked.
fn verify_dir_copy(out: &Path, digest: &str, source: &OciImage) -> usize {
    let top_bytes = std::fs::read(out.join("manifest.json")).expect("manifest.json");
    assert_eq!(sha256(&top_bytes), digest, "manifest pulled back");
    let top = json(&top_bytes);
    let mut manifests = Vec::new();
    if top["manifests"].is_array() {
        for child in descriptors(&top) {
            let d = str_field(&child, "digest");
            let hex = d.strip_prefix("sha256:").expect("sha256 digest");
            let bytes = std::fs::read(out.join(format!("{hex}.manifest.json")))
                .unwrap_or_else(|e| panic!("platform manifest {d} not copied back: {e}"));
            assert_eq!(sha256(&bytes), d, "platform manifest pulled back");
            manifests.push(json(&bytes));
        }
    } else {
        manifests.push(top);
    }
    let mut checked = 0;
    for m in &manifests {
        for desc in descriptors(m) {
            let d = str_field(&desc, "digest");
            let hex = d.strip_prefix("sha256:").expect("sha256 digest");
            let bytes =
                std::fs::read(out.join(hex)).unwrap_or_else(|e| panic!("blob {d} missing: {e}"));
            assert_eq!(
                bytes.len() as u64,
                desc["size"].as_u64().expect("size"),
                "size of blob {d}"
            );
            assert_eq!(
                sha256(&bytes),
                d,
                "blob pulled back does not hash to its digest"
            );
            assert_eq!(
                source.blob(d).as_deref(),
                Some(&bytes[..]),
                "blob {d} differs from the one in the source layout"
            );
            checked += 1;
        }
    }
    checked
}

// ---------------------------------------------------------------------------
// containerd

/// Pushes with skopeo, pulls with containerd over plain HTTP (tag, and for an
/// index also by digest), checks containerd recorded the pushed digest and
/// that a container from the image prints the image's marker.
fn containerd_pull_and_run(host: &str, shape: Shape, format: Format) {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = build(&dir.path().join("src"), shape);
    let repo = format!("interop/ctr-{shape:?}-{format:?}").to_lowercase();
    let pushed = skopeo_push(host, &image, &repo, "1", format);
    let ctrd = Containerd::start();

    let mut refs = vec![pushed.reference.clone()];
    if shape == Shape::Index {
        refs.push(pushed.by_digest());
    }
    for reference in &refs {
        run(ctrd.ctr().args([
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            "native",
            reference,
        ]));
        let list = run(ctrd.ctr().args(["images", "ls"]));
        let line = list
            .lines()
            .find(|l| l.split_whitespace().next() == Some(reference.as_str()))
            .unwrap_or_else(|| panic!("{reference} not in `ctr images ls`:\n{list}"));
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            fields[2], pushed.digest,
            "digest containerd recorded: {line}"
        );
        assert_eq!(fields[1], format.top_type(shape), "media type: {line}");

        let out = run(ctrd.ctr().args([
            "run",
            "--rm",
            "--snapshotter",
            "native",
            reference,
            &unique("interop"),
            "/bin/sh",
            "-c",
            PRINT_MARKER,
        ]));
        assert_eq!(out.trim(), image.native().marker, "container output");
    }
}

// ---------------------------------------------------------------------------
// podman

/// Pushes with skopeo, pulls with podman (private storage), checks the
/// digest podman recorded and that a container prints the image's marker.
fn podman_pull_and_run(host: &str, shape: Shape, format: Format) {
    require_tool("podman");
    require_tool("runc");
    let dir = tempfile::tempdir().expect("tempdir");
    let image = build(&dir.path().join("src"), shape);
    let repo = format!("interop/podman-{shape:?}-{format:?}").to_lowercase();
    let pushed = skopeo_push(host, &image, &repo, "1", format);

    let store = dir.path().join("podman");
    let podman = || {
        let mut cmd = Command::new("podman");
        cmd.arg("--root")
            .arg(store.join("root"))
            .arg("--runroot")
            .arg(store.join("run"))
            .arg("--tmpdir")
            .arg(store.join("tmp"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ]);
        cmd
    };

    run(podman().args(["pull", "--quiet", "--tls-verify=false", &pushed.reference]));
    let digest = run(podman().args([
        "image",
        "inspect",
        "--format",
        "{{.Digest}}",
        &pushed.reference,
    ]));
    assert_eq!(digest.trim(), pushed.digest, "digest podman recorded");
    let repo_digests = run(podman().args([
        "image",
        "inspect",
        "--format",
        "{{range .RepoDigests}}{{.}} {{end}}",
        &pushed.reference,
    ]));
    assert!(
        repo_digests
            .split_whitespace()
            .any(|r| r == pushed.by_digest()),
        "{} not in podman's RepoDigests: {repo_digests}",
        pushed.by_digest()
    );

    let out = run(podman().args([
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
        &pushed.reference,
        "/bin/sh",
        "-c",
        PRINT_MARKER,
    ]));
    assert_eq!(out.trim(), image.native().marker, "container output");
}

// ---------------------------------------------------------------------------
// Docker engine

fn docker_image_id(reference: &str) -> String {
    run(Command::new("docker").args(["image", "inspect", "--format", "{{.Id}}", reference]))
        .trim()
        .to_string()
}

fn docker_repo_digests(reference: &str) -> String {
    run(Command::new("docker").args([
        "image",
        "inspect",
        "--format",
        "{{range .RepoDigests}}{{.}} {{end}}",
        reference,
    ]))
}

fn docker_run_marker(reference: &str) -> String {
    run(Command::new("docker").args([
        "run",
        "--rm",
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

/// `docker import` → `docker push` to the registry → remove locally →
/// `docker pull` (by tag, then by digest) → `docker run`. Checks the digest
/// push reported is what the registry serves and what pull reports, and that
/// the pulled image is the imported one (same image ID) and runs.
fn docker_push_pull_run(host: &str) {
    require_tool("docker");
    require_tool("skopeo");
    let mut cleanup = DockerCleanup::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let local = format!("wharf-interop/{}:1", unique("busybox"));
    cleanup.add(&local);
    let image = images::docker_import(dir.path(), &local);
    cleanup.add(&image.id);

    let repository = format!("{host}/interop/{}", unique("busybox"));
    let remote = format!("{repository}:1");
    cleanup.add(&remote);
    run(Command::new("docker").args(["tag", &local, &remote]));
    let out = run(Command::new("docker").args(["push", &remote]));
    let digest = out
        .split_whitespace()
        .skip_while(|w| *w != "digest:")
        .nth(1)
        .unwrap_or_else(|| panic!("docker push reported no digest:\n{out}"))
        .to_string();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );

    // The registry serves exactly the manifest docker pushed.
    let manifest = inspect_raw(&remote);
    assert_eq!(sha256(&manifest), digest, "manifest served for {remote}");
    assert_eq!(media_type(&json(&manifest)), DOCKER_MANIFEST);

    // Forget the image locally, so that pull has to download it.
    run(Command::new("docker").args(["rmi", &remote, &local]));
    let (present, _, _) = try_run(Command::new("docker").args(["image", "inspect", &image.id]));
    assert!(
        !present,
        "image {} still present after docker rmi",
        image.id
    );

    let out = run(Command::new("docker").args(["pull", &remote]));
    assert!(
        out.contains(&format!("Digest: {digest}")),
        "docker pull reported another digest than push ({digest}):\n{out}"
    );
    assert_eq!(docker_image_id(&remote), image.id, "image ID after pull");
    let by_digest = format!("{repository}@{digest}");
    cleanup.add(&by_digest);
    let repo_digests = docker_repo_digests(&remote);
    assert!(
        repo_digests.split_whitespace().any(|r| r == by_digest),
        "{by_digest} not in RepoDigests: {repo_digests}"
    );
    assert_eq!(docker_run_marker(&remote), image.marker, "container output");

    // Again, by digest.
    run(Command::new("docker").args(["rmi", &remote]));
    run(Command::new("docker").args(["pull", &by_digest]));
    assert_eq!(
        docker_image_id(&by_digest),
        image.id,
        "image ID after pull by digest"
    );
    assert_eq!(
        docker_run_marker(&by_digest),
        image.marker,
        "container output"
    );
}

/// The Docker engine pulls and runs a multi-arch OCI index pushed by skopeo.
fn docker_pull_oci_index(host: &str) {
    require_tool("docker");
    let mut cleanup = DockerCleanup::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = images::oci_index(&dir.path().join("src"));
    let repo = format!("interop/{}", unique("docker-index"));
    let pushed = skopeo_push(host, &image, &repo, "1", Format::Oci);
    cleanup.add(&pushed.reference);
    cleanup.add(pushed.by_digest());

    run(Command::new("docker").args(["pull", &pushed.reference]));
    let id = docker_image_id(&pushed.reference);
    cleanup.add(&id);
    let native = image.native();
    let manifest = json(&image.blob(&native.digest).expect("native manifest"));
    assert_eq!(
        id,
        str_field(&manifest["config"], "digest"),
        "docker pulled another platform than its own"
    );
    let repo_digests = docker_repo_digests(&pushed.reference);
    assert!(
        repo_digests
            .split_whitespace()
            .any(|r| r == pushed.by_digest()),
        "{} not in RepoDigests: {repo_digests}",
        pushed.by_digest()
    );
    assert_eq!(
        docker_run_marker(&pushed.reference),
        native.marker,
        "container output"
    );
}
