//! Test images built locally, without any network, in well under a second:
//! OCI image layouts written with `umoci`, and Docker-engine images made with
//! `docker import`. Every image contains a static busybox as `/bin/busybox`
//! (with `/bin/sh` pointing at it) and a `/marker` file whose one line is
//! unique to the build, so a test that runs the image can prove it got this
//! exact content back.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::require_tool;

/// How long one external command may take before the test fails.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Shell command that prints the first line of `/marker` with shell builtins
/// only (it does not depend on busybox applet lookup).
pub const PRINT_MARKER: &str = "read m < /marker; echo \"$m\"";

/// One image (or index) in an OCI layout.
#[derive(Debug, Clone)]
pub struct OciImage {
    /// The OCI layout directory.
    pub layout: PathBuf,
    /// The reference name in the layout's `index.json`.
    pub tag: String,
    /// Digest of the manifest (or index) the tag points at.
    pub digest: String,
    pub media_type: String,
    /// For an index: one entry per platform. For an image: itself.
    pub platforms: Vec<Platform>,
}

/// A platform-specific image manifest.
#[derive(Debug, Clone)]
pub struct Platform {
    pub architecture: String,
    pub digest: String,
    /// The content of `/marker` inside this image.
    pub marker: String,
}

impl OciImage {
    /// The `oci:LAYOUT:TAG` reference for skopeo.
    pub fn reference(&self) -> String {
        format!("oci:{}:{}", self.layout.display(), self.tag)
    }

    /// The platform entry a container started on this host would use.
    pub fn native(&self) -> &Platform {
        let arch = host_arch();
        self.platforms
            .iter()
            .find(|p| p.architecture == arch)
            .unwrap_or_else(|| panic!("image {} has no {arch} manifest", self.tag))
    }

    /// The raw bytes of a blob (or manifest) stored in the layout.
    pub fn blob(&self, digest: &str) -> Option<Vec<u8>> {
        let hex = digest.strip_prefix("sha256:")?;
        std::fs::read(self.layout.join("blobs/sha256").join(hex)).ok()
    }
}

/// The OCI architecture name of this machine (`amd64`, `arm64`, ...).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// A string unique to this process and call, usable in image names and tags
/// (lowercase letters, digits and `-`).
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{:x}-{}",
        std::process::id(),
        nanos & 0xffff_ffff_ffff,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A single-platform image in a new OCI layout at `dir/layout`, tagged with
/// the architecture name (`amd64`, `arm64`, ...). The busybox inside is always
/// the host's, whatever `arch` says: only an image of the host architecture
/// can run.
pub fn oci_image(dir: &Path, arch: &str) -> OciImage {
    let layout = dir.join("layout");
    init_layout(&layout);
    let platform = add_image(dir, &layout, arch, arch);
    OciImage {
        layout,
        tag: arch.to_string(),
        digest: platform.digest.clone(),
        media_type: OCI_MANIFEST.to_string(),
        platforms: vec![platform],
    }
}

/// Like [`oci_image`], with one more layer holding `/payload`: `size` random
/// bytes (they do not compress, so the layer blob is about as large). For
/// tests that need a blob big enough to take a while to transfer.
pub fn oci_image_with_payload(dir: &Path, arch: &str, size: u64) -> OciImage {
    let mut image = oci_image(dir, arch);
    let payload = dir.join(unique("payload"));
    std::fs::create_dir_all(&payload).expect("mkdir payload");
    let mut random = std::fs::File::open("/dev/urandom")
        .expect("open /dev/urandom")
        .take(size);
    let mut file = std::fs::File::create(payload.join("payload")).expect("create payload");
    let copied = std::io::copy(&mut random, &mut file).expect("write payload");
    assert_eq!(copied, size, "short read from /dev/urandom");
    drop(file);
    run(Command::new("umoci")
        .args([
            "insert",
            "--image",
            &format!("{}:{}", image.layout.display(), image.tag),
        ])
        .arg(&payload)
        .arg("/"));
    let digest = tag_digest(&image.layout, &image.tag);
    image.digest = digest.clone();
    image.platforms[0].digest = digest;
    image
}

/// An OCI image index with an `amd64` and an `arm64` image, tagged `multi` in
/// a new OCI layout at `dir/layout`. The index is stored as a blob and named
/// in `index.json`, as an OCI layout stores any index.
pub fn oci_index(dir: &Path) -> OciImage {
    let layout = dir.join("layout");
    init_layout(&layout);
    let platforms: Vec<Platform> = ["amd64", "arm64"]
        .iter()
        .map(|arch| add_image(dir, &layout, arch, arch))
        .collect();

    let manifests: Vec<serde_json::Value> = platforms
        .iter()
        .map(|p| {
            let size = std::fs::metadata(blob_path(&layout, &p.digest))
                .expect("manifest blob")
                .len();
            serde_json::json!({
                "mediaType": OCI_MANIFEST,
                "digest": p.digest,
                "size": size,
                "platform": {"architecture": p.architecture, "os": "linux"},
            })
        })
        .collect();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    });
    let bytes = serde_json::to_vec_pretty(&index).expect("index json");
    let digest = super::sha256(&bytes);
    std::fs::write(blob_path(&layout, &digest), &bytes).expect("write index blob");

    let index_json = layout.join("index.json");
    let mut top: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_json).expect("read index.json"))
            .expect("index.json is JSON");
    top["manifests"]
        .as_array_mut()
        .expect("index.json manifests")
        .push(serde_json::json!({
            "mediaType": OCI_INDEX,
            "digest": digest,
            "size": bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": "multi"},
        }));
    std::fs::write(&index_json, serde_json::to_vec(&top).expect("json")).expect("write index.json");

    OciImage {
        layout,
        tag: "multi".to_string(),
        digest,
        media_type: OCI_INDEX.to_string(),
        platforms,
    }
}

/// Writes a root filesystem with `/bin/busybox`, `/bin/sh -> busybox` and
/// `/marker` (containing `marker`) into `rootfs`.
pub fn busybox_rootfs(rootfs: &Path, marker: &str) {
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir rootfs/bin");
    std::fs::copy(static_busybox(), bin.join("busybox")).expect("copy busybox");
    std::os::unix::fs::symlink("busybox", bin.join("sh")).expect("symlink /bin/sh");
    std::fs::write(rootfs.join("marker"), format!("{marker}\n")).expect("write marker");
}

/// An image in the local Docker engine, made by `docker import`.
#[derive(Debug, Clone)]
pub struct DockerImage {
    /// `name:tag` as imported.
    pub reference: String,
    /// The image ID (`sha256:` of its config).
    pub id: String,
    /// The content of `/marker`.
    pub marker: String,
}

/// Imports a busybox root filesystem into the Docker engine as `reference`
/// (`tar -C rootfs -c . | docker import - REFERENCE`), with `CMD ["/bin/sh"]`.
/// Register the result with a [`DockerCleanup`] so it is removed afterwards.
pub fn docker_import(dir: &Path, reference: &str) -> DockerImage {
    require_tool("docker");
    let marker = unique("docker-marker");
    let rootfs = dir.join(format!("rootfs-{marker}"));
    busybox_rootfs(&rootfs, &marker);
    let out = sh(&format!(
        "tar -C {} -c . | docker import -c 'CMD [\"/bin/sh\"]' -c 'ENV PATH=/bin' - {}",
        shell_quote(&rootfs.display().to_string()),
        shell_quote(reference)
    ));
    let id = out
        .lines()
        .map(str::trim)
        .rfind(|l| l.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("docker import printed no image ID: {out}"))
        .to_string();
    DockerImage {
        reference: reference.to_string(),
        id,
        marker,
    }
}

/// Removes Docker-engine images (by reference or ID) when dropped, so a test
/// leaves the engine as it found it even when it fails half-way.
#[derive(Debug, Default)]
pub struct DockerCleanup {
    refs: Vec<String>,
}

impl DockerCleanup {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn add(&mut self, reference: impl Into<String>) {
        self.refs.push(reference.into());
    }
}

impl Drop for DockerCleanup {
    fn drop(&mut self) {
        for r in self.refs.iter().rev() {
            let _ = Command::new("docker")
                .args(["rmi", "-f", r])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Runs a command to completion (at most [`COMMAND_TIMEOUT`]) and returns its
/// stdout; panics with the command line, status, stdout and stderr if it
/// fails or hangs.
pub fn run(cmd: &mut Command) -> String {
    let (ok, out, err, desc) = run_status(cmd);
    assert!(
        ok,
        "command failed: {desc}\n--- stdout:\n{out}\n--- stderr:\n{err}"
    );
    out
}

/// Like [`run`], but returns `(success, stdout, stderr)` instead of
/// panicking on a non-zero exit.
pub fn try_run(cmd: &mut Command) -> (bool, String, String) {
    let (ok, out, err, _) = run_status(cmd);
    (ok, out, err)
}

/// `sh -c SCRIPT`, through [`run`].
pub fn sh(script: &str) -> String {
    run(Command::new("sh").arg("-c").arg(script))
}

pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn run_status(cmd: &mut Command) -> (bool, String, String, String) {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stdout.read_to_end(&mut b);
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stderr.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
    let err = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    match status {
        Some(s) => (s.success(), out, err, format!("{desc} ({s})")),
        None => panic!(
            "command timed out after {COMMAND_TIMEOUT:?}: {desc}\n--- stdout:\n{out}\n--- stderr:\n{err}"
        ),
    }
}

fn init_layout(layout: &Path) {
    require_tool("umoci");
    if !layout.join("index.json").exists() {
        run(Command::new("umoci")
            .arg("init")
            .arg("--layout")
            .arg(layout));
    }
}

/// Adds an image tagged `tag` for `arch` to `layout` and returns its manifest.
fn add_image(dir: &Path, layout: &Path, tag: &str, arch: &str) -> Platform {
    let image = format!("{}:{tag}", layout.display());
    let marker = unique(&format!("oci-marker-{arch}"));
    let rootfs = dir.join(format!("rootfs-{marker}"));
    busybox_rootfs(&rootfs, &marker);
    run(Command::new("umoci").args(["new", "--image", &image]));
    run(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--os",
        "linux",
        "--architecture",
        arch,
        "--config.cmd",
        "/bin/sh",
        "--config.env",
        "PATH=/bin",
    ]));
    run(Command::new("umoci")
        .args(["insert", "--image", &image])
        .arg(&rootfs)
        .arg("/"));
    Platform {
        architecture: arch.to_string(),
        digest: tag_digest(layout, tag),
        marker,
    }
}

/// The digest `tag` points at in the layout's `index.json`.
fn tag_digest(layout: &Path, tag: &str) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("read index.json"))
            .expect("index.json is JSON");
    index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .and_then(|m| m["digest"].as_str())
        .unwrap_or_else(|| panic!("umoci wrote no manifest for tag {tag}"))
        .to_string()
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").expect("sha256 digest"))
}

/// The host's busybox, checked to be statically linked (an image holds
/// nothing else, so a dynamically linked one could not start).
pub fn static_busybox() -> PathBuf {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        let path = PathBuf::from(p);
        if let Ok(bytes) = std::fs::read(&path) {
            assert!(
                is_static_elf(&bytes),
                "{p} is dynamically linked; install busybox-static (scripts/test does)"
            );
            return path;
        }
    }
    panic!("busybox is not installed; install busybox-static (scripts/test does)");
}

/// True for a 64-bit little-endian ELF file without a PT_INTERP header.
fn is_static_elf(b: &[u8]) -> bool {
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        o + 4 <= b.len() && u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) != 3
    })
}
