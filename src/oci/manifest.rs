//! Manifest parsing: keeps the raw bytes (the digest is computed over them)
//! beside a parsed view of what they reference. The OCI structures come from
//! the `oci-spec` crate; every digest inside is re-parsed strictly.

use std::collections::BTreeMap;
use std::fmt;

use oci_spec::image::{ImageIndex, ImageManifest};

use super::digest::Digest;

/// Largest manifest accepted on push (the spec's recommended limit).
pub const MAX_MANIFEST_SIZE: usize = 4 * 1024 * 1024;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// A manifest media type wharf stores and serves.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct MediaType(Box<str>);

impl MediaType {
    pub fn new(s: &str) -> MediaType {
        MediaType(s.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// Which structure this media type denotes, if it is a manifest type.
    pub fn kind(&self) -> Option<ManifestKind> {
        match &*self.0 {
            OCI_MANIFEST | DOCKER_MANIFEST => Some(ManifestKind::Image),
            OCI_INDEX | DOCKER_LIST => Some(ManifestKind::Index),
            _ => None,
        }
    }
    /// Does an `Accept` header value list this type (or a wildcard for it)?
    pub fn accepted_by(&self, accept: &str) -> bool {
        accept.split(',').any(|item| {
            let t = item.split(';').next().unwrap_or("").trim();
            t == "*/*" || t == "application/*" || t.eq_ignore_ascii_case(&self.0)
        })
    }
}

impl fmt::Display for MediaType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for MediaType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    /// An image manifest (OCI or Docker schema 2): config + layers.
    Image,
    /// An index or manifest list: child manifests.
    Index,
}

/// An OCI content descriptor, as served in the referrers index.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A parsed manifest and the raw bytes it came from.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub media_type: MediaType,
    pub kind: ManifestKind,
    /// Blobs this manifest needs (config and layers of an image manifest).
    pub blobs: Vec<Digest>,
    /// Child manifests (an index's entries).
    pub children: Vec<Digest>,
    /// The `subject` this manifest refers to (referrers API).
    pub subject: Option<Digest>,
    /// `artifactType`, or for an image manifest its config media type.
    pub artifact_type: Option<String>,
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is larger than {MAX_MANIFEST_SIZE} bytes")]
    TooLarge,
    #[error("manifest is not valid JSON: {0}")]
    Json(String),
    #[error("unsupported manifest media type {0:?}")]
    UnsupportedMediaType(String),
    #[error("manifest mediaType {body:?} does not match Content-Type {header:?}")]
    MediaTypeMismatch { body: String, header: String },
    #[error("manifest schemaVersion must be 2")]
    SchemaVersion,
    #[error("invalid manifest: {0}")]
    Invalid(String),
    #[error("invalid digest in manifest: {0}")]
    Digest(String),
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    schema_version: Option<serde_json::Value>,
    media_type: Option<String>,
    manifests: Option<serde_json::Value>,
    config: Option<serde_json::Value>,
}

fn strict(d: &oci_spec::image::Digest) -> Result<Digest, ManifestError> {
    d.to_string()
        .parse()
        .map_err(|e: super::digest::DigestError| ManifestError::Digest(format!("{d}: {e}")))
}

impl Manifest {
    /// Parses and validates manifest bytes. `content_type` is the request's
    /// `Content-Type`, if any; the media type comes from the body's
    /// `mediaType`, else the header, else the body's shape.
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_SIZE {
            return Err(ManifestError::TooLarge);
        }
        let probe: Probe =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
        if probe.schema_version.as_ref().and_then(|v| v.as_u64()) != Some(2) {
            return Err(ManifestError::SchemaVersion);
        }
        let header = content_type
            .map(|h| h.split(';').next().unwrap_or("").trim())
            .filter(|h| !h.is_empty());
        let media_type = match (&probe.media_type, header) {
            (Some(body), Some(h)) if body != h && MediaType::new(h).kind().is_some() => {
                return Err(ManifestError::MediaTypeMismatch {
                    body: body.clone(),
                    header: h.to_string(),
                });
            }
            (Some(body), _) => body.clone(),
            (None, Some(h)) if MediaType::new(h).kind().is_some() => h.to_string(),
            (None, _) if probe.manifests.is_some() => OCI_INDEX.to_string(),
            (None, _) if probe.config.is_some() => OCI_MANIFEST.to_string(),
            (None, h) => {
                return Err(ManifestError::UnsupportedMediaType(
                    h.unwrap_or("(none)").to_string(),
                ));
            }
        };
        let media_type = MediaType::new(&media_type);
        let kind = media_type
            .kind()
            .ok_or_else(|| ManifestError::UnsupportedMediaType(media_type.to_string()))?;
        let to_map = |a: &Option<std::collections::HashMap<String, String>>| {
            a.as_ref()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default()
        };
        match kind {
            ManifestKind::Image => {
                let m: ImageManifest = serde_json::from_slice(bytes)
                    .map_err(|e| ManifestError::Invalid(e.to_string()))?;
                let mut blobs = Vec::with_capacity(m.layers().len() + 1);
                blobs.push(strict(m.config().digest())?);
                for l in m.layers() {
                    // Foreign (non-distributable) layers live elsewhere by design.
                    let mt = l.media_type().to_string();
                    if mt.contains("foreign") || mt.contains("nondistributable") {
                        continue;
                    }
                    blobs.push(strict(l.digest())?);
                }
                let subject = m
                    .subject()
                    .as_ref()
                    .map(|s| strict(s.digest()))
                    .transpose()?;
                let artifact_type = m
                    .artifact_type()
                    .as_ref()
                    .map(|t| t.to_string())
                    .or_else(|| Some(m.config().media_type().to_string()));
                Ok(Manifest {
                    media_type,
                    kind,
                    blobs,
                    children: Vec::new(),
                    subject,
                    artifact_type,
                    annotations: to_map(m.annotations()),
                })
            }
            ManifestKind::Index => {
                let m: ImageIndex = serde_json::from_slice(bytes)
                    .map_err(|e| ManifestError::Invalid(e.to_string()))?;
                let children = m
                    .manifests()
                    .iter()
                    .map(|d| strict(d.digest()))
                    .collect::<Result<Vec<_>, _>>()?;
                let subject = m
                    .subject()
                    .as_ref()
                    .map(|s| strict(s.digest()))
                    .transpose()?;
                Ok(Manifest {
                    media_type,
                    kind,
                    blobs: Vec::new(),
                    children,
                    subject,
                    artifact_type: m.artifact_type().as_ref().map(|t| t.to_string()),
                    annotations: to_map(m.annotations()),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
    const L1: &str = "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4";

    fn image(extra: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{CFG}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{L1}","size":32}}]{extra}}}"#
        )
    }

    #[test]
    fn image_manifest() {
        let m = Manifest::parse(image("").as_bytes(), Some(OCI_MANIFEST)).unwrap();
        assert_eq!(m.kind, ManifestKind::Image);
        assert_eq!(m.blobs.len(), 2);
        assert_eq!(m.blobs[0].as_str(), CFG);
        assert!(m.subject.is_none());
        assert_eq!(
            m.artifact_type.as_deref(),
            Some("application/vnd.oci.image.config.v1+json")
        );
    }

    #[test]
    fn subject_and_artifact_type() {
        let extra = format!(
            r#","artifactType":"application/x.sig","subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{L1}","size":10}},"annotations":{{"a":"b"}}"#
        );
        let m = Manifest::parse(image(&extra).as_bytes(), None).unwrap();
        assert_eq!(m.subject.unwrap().as_str(), L1);
        assert_eq!(m.artifact_type.as_deref(), Some("application/x.sig"));
        assert_eq!(m.annotations.get("a").map(String::as_str), Some("b"));
    }

    #[test]
    fn index() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[{{"mediaType":"{DOCKER_MANIFEST}","digest":"{L1}","size":5,"platform":{{"architecture":"amd64","os":"linux","features":["sse4"]}}}}]}}"#
        );
        let m = Manifest::parse(body.as_bytes(), Some(DOCKER_LIST)).unwrap();
        assert_eq!(m.kind, ManifestKind::Index);
        assert_eq!(m.children.len(), 1);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            Manifest::parse(b"{", None),
            Err(ManifestError::Json(_))
        ));
        assert!(matches!(
            Manifest::parse(br#"{"schemaVersion":1}"#, None),
            Err(ManifestError::SchemaVersion)
        ));
        assert!(matches!(
            Manifest::parse(image("").as_bytes(), Some(OCI_INDEX)),
            Err(ManifestError::MediaTypeMismatch { .. })
        ));
        let upper = image("").replace(CFG, &CFG.to_uppercase().replace("SHA256", "sha256"));
        assert!(matches!(
            Manifest::parse(upper.as_bytes(), None),
            Err(ManifestError::Digest(_)) | Err(ManifestError::Invalid(_))
        ));
        let big = vec![b' '; MAX_MANIFEST_SIZE + 1];
        assert!(matches!(
            Manifest::parse(&big, None),
            Err(ManifestError::TooLarge)
        ));
        assert!(matches!(
            Manifest::parse(
                br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#,
                None
            ),
            Err(ManifestError::Invalid(_))
        ));
    }

    #[test]
    fn accept_matching() {
        let t = MediaType::new(OCI_MANIFEST);
        assert!(
            t.accepted_by("application/json, application/vnd.oci.image.manifest.v1+json;q=0.5")
        );
        assert!(t.accepted_by("*/*"));
        assert!(!t.accepted_by(DOCKER_MANIFEST));
    }
}
