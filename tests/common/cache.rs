//! Helpers for the pull-through cache tests: pull-through rules pointing at
//! a [`FakeUpstream`], deterministic pseudo-random content, images seeded
//! upstream, and the blob files a data directory holds.

use serde_json::json;

use super::fake_upstream::FakeUpstream;
use super::images::{OCI_INDEX, OCI_MANIFEST};

/// A `[[pull_through]]` table serving `prefix` from `fake`, with `extra`
/// keys (`tag_ttl = "1h"`, ...).
pub fn rule(prefix: &str, fake: &FakeUpstream, extra: &str) -> String {
    format!(
        "[[pull_through]]\nprefix = \"{prefix}\"\nupstream = \"{}\"\n{extra}\n",
        fake.url()
    )
}

/// `n` pseudo-random bytes (xorshift), the same for the same `seed`.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Seeds an image (config + one layer + manifest tagged `tag`) upstream.
/// Returns the manifest digest, the layer digest and the manifest bytes.
pub fn seed_image(
    fake: &FakeUpstream,
    repo: &str,
    tag: &str,
    layer: &[u8],
) -> (String, String, Vec<u8>) {
    let img = seed_platform_image(fake, repo, Some(tag), "linux", "amd64", layer);
    (img.manifest, img.layer, img.bytes)
}

/// The digests of an image seeded upstream, and its manifest.
#[derive(Debug, Clone)]
pub struct SeededImage {
    pub manifest: String,
    pub config: String,
    pub layer: String,
    pub bytes: Vec<u8>,
}

/// Seeds an image for `os`/`arch` (config + one layer + manifest, tagged
/// `tag` when given) upstream.
pub fn seed_platform_image(
    fake: &FakeUpstream,
    repo: &str,
    tag: Option<&str>,
    os: &str,
    arch: &str,
    layer: &[u8],
) -> SeededImage {
    let config = format!(
        "{{\"architecture\":\"{arch}\",\"os\":\"{os}\",\"tag\":\"{}\"}}",
        tag.unwrap_or_default()
    );
    let cd = fake.add_blob(repo, config.clone().into_bytes());
    let ld = fake.add_blob(repo, layer.to_vec());
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld.to_string(), "size": layer.len()}],
    }))
    .unwrap();
    let md = fake.add_manifest(repo, tag, OCI_MANIFEST, m.clone());
    SeededImage {
        manifest: md.to_string(),
        config: cd.to_string(),
        layer: ld.to_string(),
        bytes: m,
    }
}

/// Seeds an OCI index tagged `tag` upstream over images already in `repo`,
/// each with its `(os, architecture)`. Returns its digest and bytes.
pub fn seed_index(
    fake: &FakeUpstream,
    repo: &str,
    tag: &str,
    images: &[(&SeededImage, &str, &str)],
) -> (String, Vec<u8>) {
    let manifests: Vec<_> = images
        .iter()
        .map(|(img, os, arch)| {
            json!({
                "mediaType": OCI_MANIFEST,
                "digest": img.manifest,
                "size": img.bytes.len(),
                "platform": {"os": os, "architecture": arch},
            })
        })
        .collect();
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests,
    }))
    .unwrap();
    let d = fake.add_manifest(repo, Some(tag), OCI_INDEX, index.clone());
    (d.to_string(), index)
}

/// Blob files stored under a data directory, as `sha256:<hex>`.
pub fn stored_blobs(data: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let root = data.join("blobs/sha256");
    if let Ok(prefixes) = std::fs::read_dir(&root) {
        for p in prefixes.flatten() {
            for b in std::fs::read_dir(p.path()).unwrap().flatten() {
                out.push(format!("sha256:{}", b.file_name().to_string_lossy()));
            }
        }
    }
    out
}
