//! Manifest parsing: keeps the raw bytes (the digest is computed over them)
//! beside a parsed view of what they reference. The OCI structures come from
//! the `oci-spec` crate; every digest inside is re-parsed strictly.

use std::collections::BTreeMap;
use std::fmt;

use oci_spec::image::{ImageIndex, ImageManifest};

use super::digest::Digest;

/// Largest manifest accepted on push (the spec's recommended limit).
pub const MAX_MANIFEST_SIZE: usize = 4 * 1024 * 1024;

/// Deepest nesting of JSON arrays and objects accepted in a manifest. Real
/// manifests nest about five levels (index, `manifests`, a descriptor, its
/// `platform`, `os.features`); the bound is checked by a byte scan before
/// any parser sees the bytes.
pub const MAX_JSON_DEPTH: usize = 64;

/// Deepest nesting of indexes: an index of image manifests has depth 1, an
/// index whose entries include such indexes depth 2, and so on. A push of
/// an index deeper than this is refused, and replication and sync stop at
/// it; tree walks never go further.
pub const MAX_INDEX_DEPTH: usize = 8;

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

/// Content a manifest needs: a digest and the size its descriptor declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentRef {
    pub digest: Digest,
    pub size: u64,
}

/// A parsed manifest and the raw bytes it came from.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub media_type: MediaType,
    pub kind: ManifestKind,
    /// Blobs this manifest needs (config and layers of an image manifest).
    pub blobs: Vec<ContentRef>,
    /// Child manifests (an index's entries).
    pub children: Vec<ContentRef>,
    /// The `subject` this manifest refers to (referrers API), with the
    /// size its descriptor declares.
    pub subject: Option<ContentRef>,
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
    #[error("manifest is not valid UTF-8 (at byte {0})")]
    Utf8(usize),
    #[error("manifest JSON nests deeper than {MAX_JSON_DEPTH} levels")]
    TooDeep,
    #[error("unsupported manifest media type {0:?}")]
    UnsupportedMediaType(String),
    #[error("manifest mediaType {body:?} does not match Content-Type {header:?}")]
    MediaTypeMismatch { body: String, header: String },
    #[error("manifest schemaVersion must be 2")]
    SchemaVersion,
    #[error("{field} {value:?} is not a media type (type/subtype, RFC 6838)")]
    MediaTypeInvalid { field: &'static str, value: String },
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

/// Checks a media type (a descriptor's, or an `artifactType`) against the
/// image spec's grammar, RFC 6838's restricted names: `type/subtype`, each
/// 1 to 127 characters, starting with a letter or digit, then letters,
/// digits and `!#$&-^_.+`. No parameters.
fn check_media_type(field: &'static str, value: &str) -> Result<(), ManifestError> {
    fn restricted_name(s: &str) -> bool {
        let b = s.as_bytes();
        (1..=127).contains(&b.len())
            && b[0].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(c))
    }
    match value.split_once('/') {
        Some((t, sub)) if restricted_name(t) && restricted_name(sub) => Ok(()),
        _ => {
            let mut value = value.to_string();
            if value.len() > 64 {
                let mut end = 64;
                while !value.is_char_boundary(end) {
                    end -= 1;
                }
                value.truncate(end);
                value.push_str("...");
            }
            Err(ManifestError::MediaTypeInvalid { field, value })
        }
    }
}

/// The digest and size of a descriptor, once its digest and media type
/// are checked.
fn content(
    field: &'static str,
    d: &oci_spec::image::Descriptor,
) -> Result<ContentRef, ManifestError> {
    check_media_type(field, d.media_type().as_ref())?;
    Ok(ContentRef {
        digest: strict(d.digest())?,
        size: d.size(),
    })
}

/// Refuses JSON whose arrays and objects nest deeper than `max`: one pass
/// over the bytes, counting brackets outside strings, so that no parser
/// (and no stack) ever meets a deeper document. Syntax is left to the
/// parser.
pub fn check_json_depth(bytes: &[u8], max: usize) -> Result<(), ManifestError> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(ManifestError::TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

impl Manifest {
    /// Parses and validates manifest bytes. `content_type` is the request's
    /// `Content-Type`, if any; the media type comes from the body's
    /// `mediaType`, else the header, else the body's shape.
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_SIZE {
            return Err(ManifestError::TooLarge);
        }
        // serde_json skips unknown fields without validating their strings
        // or bounding their nesting: both are checked here first.
        std::str::from_utf8(bytes).map_err(|e| ManifestError::Utf8(e.valid_up_to()))?;
        check_json_depth(bytes, MAX_JSON_DEPTH)?;
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
                blobs.push(content("config mediaType", m.config())?);
                for l in m.layers() {
                    // Every digest is checked; foreign (non-distributable)
                    // layers live elsewhere by design, so they are not
                    // required to be present.
                    let d = content("layer mediaType", l)?;
                    let mt = l.media_type().to_string();
                    if !(mt.contains("foreign") || mt.contains("nondistributable")) {
                        blobs.push(d);
                    }
                }
                let subject = m
                    .subject()
                    .as_ref()
                    .map(|s| content("subject mediaType", s))
                    .transpose()?;
                let artifact_type = m.artifact_type().as_ref().map(|t| t.to_string());
                if let Some(t) = &artifact_type {
                    check_media_type("artifactType", t)?;
                }
                let artifact_type =
                    artifact_type.or_else(|| Some(m.config().media_type().to_string()));
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
                    .map(|d| content("manifests[] mediaType", d))
                    .collect::<Result<Vec<_>, _>>()?;
                let subject = m
                    .subject()
                    .as_ref()
                    .map(|s| content("subject mediaType", s))
                    .transpose()?;
                let artifact_type = m.artifact_type().as_ref().map(|t| t.to_string());
                if let Some(t) = &artifact_type {
                    check_media_type("artifactType", t)?;
                }
                Ok(Manifest {
                    media_type,
                    kind,
                    blobs: Vec::new(),
                    children,
                    subject,
                    artifact_type,
                    annotations: to_map(m.annotations()),
                })
            }
        }
    }
}

/// A platform filter, `os/arch[/variant]` (a filter without a variant
/// matches every variant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl std::str::FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
            return Err(format!("platform {s:?} is not os/arch or os/arch/variant"));
        }
        Ok(Platform {
            os: parts[0].to_string(),
            architecture: parts[1].to_string(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }
}

impl Platform {
    /// Whether an index entry's `platform` object is this platform.
    pub fn matches(&self, p: &serde_json::Value) -> bool {
        p["os"].as_str() == Some(&self.os)
            && p["architecture"].as_str() == Some(&self.architecture)
            && (self.variant.is_none() || p["variant"].as_str() == self.variant.as_deref())
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
        assert_eq!(m.blobs[0].digest.as_str(), CFG);
        assert_eq!((m.blobs[0].size, m.blobs[1].size), (2, 32));
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
        assert_eq!(m.subject.unwrap().digest.as_str(), L1);
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
    fn nesting_is_bounded_before_parsing() {
        // A million levels inside an unknown field: serde_json would skip
        // them without a bound; the scan refuses them without recursing.
        let deep = image(&format!(
            r#","x":{}{}"#,
            "[".repeat(1_000_000),
            "]".repeat(1_000_000)
        ));
        assert_eq!(
            Manifest::parse(deep.as_bytes(), None).unwrap_err(),
            ManifestError::TooDeep
        );
        let at_limit = format!(
            "{}{}",
            "[".repeat(MAX_JSON_DEPTH),
            "]".repeat(MAX_JSON_DEPTH)
        );
        assert!(check_json_depth(at_limit.as_bytes(), MAX_JSON_DEPTH).is_ok());
        let over = format!("[{at_limit}]");
        assert!(check_json_depth(over.as_bytes(), MAX_JSON_DEPTH).is_err());
        // Brackets inside strings (and escaped quotes) do not count.
        let quoted = format!(r#"["\"{}\\", "{}"]"#, "[".repeat(100), "{".repeat(100));
        assert!(check_json_depth(quoted.as_bytes(), 2).is_ok());
        assert!(
            Manifest::parse(
                image(&format!(r#","x":"{}""#, "[".repeat(100))).as_bytes(),
                None
            )
            .is_ok()
        );
    }

    #[test]
    fn invalid_utf8_is_refused_even_where_serde_would_skip_it() {
        let mut body = image(r#","x":"XX""#).into_bytes();
        let at = body.windows(2).position(|w| w == b"XX").unwrap();
        body[at] = 0xff;
        body[at + 1] = 0xfe;
        assert_eq!(
            Manifest::parse(&body, None).unwrap_err(),
            ManifestError::Utf8(at)
        );
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

    // ---- properties ----

    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    const DOCKER_FOREIGN: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

    /// A valid digest string: mostly sha256, sometimes sha512.
    fn digest() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[0-9a-f]{64}".prop_map(|h| format!("sha256:{h}")),
            1 => "[0-9a-f]{128}".prop_map(|h| format!("sha512:{h}")),
        ]
    }

    /// A media type of the `type/subtype` shape (not a manifest type).
    fn artifact_media_type() -> impl Strategy<Value = String> {
        "application/vnd\\.[a-z0-9]{1,10}(\\.[a-z0-9]{1,10}){0,3}(\\+(json|tar|gzip))?"
    }

    fn annotations() -> impl Strategy<Value = BTreeMap<String, String>> {
        proptest::collection::btree_map("\\PC{0,16}", "\\PC{0,24}", 0..4)
    }

    #[derive(Debug, Clone)]
    struct Desc {
        media_type: String,
        digest: String,
        size: u64,
        annotations: BTreeMap<String, String>,
        urls: Vec<String>,
        platform: Option<Value>,
        artifact_type: Option<String>,
    }

    impl Desc {
        fn to_json(&self) -> Value {
            let mut o = Map::new();
            o.insert("mediaType".into(), json!(self.media_type));
            o.insert("digest".into(), json!(self.digest));
            o.insert("size".into(), json!(self.size));
            if !self.annotations.is_empty() {
                o.insert("annotations".into(), json!(self.annotations));
            }
            if !self.urls.is_empty() {
                o.insert("urls".into(), json!(self.urls));
            }
            if let Some(p) = &self.platform {
                o.insert("platform".into(), p.clone());
            }
            if let Some(t) = &self.artifact_type {
                o.insert("artifactType".into(), json!(t));
            }
            Value::Object(o)
        }
    }

    fn desc(media_type: impl Strategy<Value = String>) -> impl Strategy<Value = Desc> {
        (media_type, digest(), any::<u64>(), annotations()).prop_map(
            |(media_type, digest, size, annotations)| Desc {
                media_type,
                digest,
                size,
                annotations,
                urls: Vec::new(),
                platform: None,
                artifact_type: None,
            },
        )
    }

    /// A layer descriptor and whether it is foreign (not a blob wharf holds).
    fn layer(docker: bool) -> impl Strategy<Value = (Desc, bool)> {
        let known: Vec<(String, bool)> = if docker {
            vec![
                (
                    "application/vnd.docker.image.rootfs.diff.tar.gzip".into(),
                    false,
                ),
                (DOCKER_FOREIGN.into(), true),
            ]
        } else {
            vec![
                ("application/vnd.oci.image.layer.v1.tar".into(), false),
                ("application/vnd.oci.image.layer.v1.tar+gzip".into(), false),
                ("application/vnd.oci.image.layer.v1.tar+zstd".into(), false),
                (
                    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip".into(),
                    true,
                ),
                (DOCKER_FOREIGN.into(), true),
            ]
        };
        let mt = prop_oneof![
            4 => proptest::sample::select(known),
            1 => artifact_media_type().prop_map(|t| (t, false)),
        ];
        (mt, desc(Just(String::new()))).prop_map(|((mt, foreign), mut d)| {
            d.media_type = mt;
            if foreign {
                d.urls = vec![format!("https://cdn.example/{}", d.digest)];
            }
            (d, foreign)
        })
    }

    /// How the request presents the media type: in the body, the header,
    /// both, or neither.
    #[derive(Debug, Clone, Copy)]
    enum Presented {
        Body,
        Header,
        HeaderWithParams,
        BodyAndHeader,
        BodyAndNonManifestHeader,
        Neither,
    }

    fn presented() -> impl Strategy<Value = Presented> {
        proptest::sample::select(vec![
            Presented::Body,
            Presented::Header,
            Presented::HeaderWithParams,
            Presented::BodyAndHeader,
            Presented::BodyAndNonManifestHeader,
            Presented::Neither,
        ])
    }

    /// Applies `p` to a body: returns the Content-Type to send and the media
    /// type `parse` must report (body, else header, else the body's shape).
    fn present(
        body: &mut Map<String, Value>,
        media_type: &str,
        shape_default: &str,
        p: Presented,
    ) -> (Option<String>, String) {
        let in_body = matches!(
            p,
            Presented::Body | Presented::BodyAndHeader | Presented::BodyAndNonManifestHeader
        );
        if in_body {
            body.insert("mediaType".into(), json!(media_type));
        }
        match p {
            Presented::Body => (None, media_type.into()),
            Presented::Header => (Some(media_type.into()), media_type.into()),
            Presented::HeaderWithParams => (
                Some(format!("{media_type}; charset=utf-8")),
                media_type.into(),
            ),
            Presented::BodyAndHeader => (Some(media_type.into()), media_type.into()),
            Presented::BodyAndNonManifestHeader => {
                (Some("application/json".into()), media_type.into())
            }
            Presented::Neither => (None, shape_default.into()),
        }
    }

    #[derive(Debug, Clone)]
    struct GenImage {
        docker: bool,
        config: Desc,
        layers: Vec<(Desc, bool)>,
        subject: Option<Desc>,
        artifact_type: Option<String>,
        annotations: BTreeMap<String, String>,
        presented: Presented,
    }

    fn gen_image() -> impl Strategy<Value = GenImage> {
        any::<bool>().prop_flat_map(|docker| {
            let config_type = if docker {
                Just(DOCKER_CONFIG.to_string()).boxed()
            } else {
                prop_oneof![
                    Just("application/vnd.oci.image.config.v1+json".to_string()),
                    Just("application/vnd.oci.empty.v1+json".to_string()),
                    artifact_media_type(),
                ]
                .boxed()
            };
            let subject_type =
                prop_oneof![Just(OCI_MANIFEST.to_string()), Just(OCI_INDEX.to_string())];
            (
                desc(config_type),
                proptest::collection::vec(layer(docker), 0..6),
                proptest::option::of(desc(subject_type)),
                proptest::option::of(artifact_media_type()),
                annotations(),
                presented(),
            )
                .prop_map(
                    move |(config, layers, subject, artifact_type, annotations, presented)| {
                        GenImage {
                            docker,
                            config,
                            layers,
                            subject,
                            artifact_type,
                            annotations,
                            presented,
                        }
                    },
                )
        })
    }

    /// The body, the Content-Type and the media type `parse` must report.
    fn render_image(g: &GenImage) -> (Vec<u8>, Option<String>, String) {
        let mut o = Map::new();
        o.insert("schemaVersion".into(), json!(2));
        let mt = if g.docker {
            DOCKER_MANIFEST
        } else {
            OCI_MANIFEST
        };
        let (header, expected_mt) = present(&mut o, mt, OCI_MANIFEST, g.presented);
        if let Some(t) = &g.artifact_type {
            o.insert("artifactType".into(), json!(t));
        }
        o.insert("config".into(), g.config.to_json());
        o.insert(
            "layers".into(),
            Value::Array(g.layers.iter().map(|(d, _)| d.to_json()).collect()),
        );
        if let Some(s) = &g.subject {
            o.insert("subject".into(), s.to_json());
        }
        if !g.annotations.is_empty() {
            o.insert("annotations".into(), json!(g.annotations));
        }
        (
            serde_json::to_vec(&Value::Object(o)).unwrap(),
            header,
            expected_mt,
        )
    }

    fn platform() -> impl Strategy<Value = Value> {
        (
            proptest::sample::select(vec![
                "amd64", "arm64", "arm", "386", "ppc64le", "s390x", "riscv64",
            ]),
            proptest::sample::select(vec!["linux", "windows", "darwin", "freebsd"]),
            proptest::option::of("v[5-8]"),
            proptest::option::of("[0-9]{1,2}\\.[0-9]{1,4}\\.[0-9]{1,5}"),
            proptest::option::of(proptest::collection::vec("[a-z0-9]{1,8}", 0..3)),
            proptest::option::of(proptest::collection::vec("[a-z0-9]{1,8}", 0..3)),
        )
            .prop_map(|(arch, os, variant, os_version, os_features, features)| {
                let mut p = Map::new();
                p.insert("architecture".into(), json!(arch));
                p.insert("os".into(), json!(os));
                if let Some(v) = variant {
                    p.insert("variant".into(), json!(v));
                }
                if let Some(v) = os_version {
                    p.insert("os.version".into(), json!(v));
                }
                if let Some(v) = os_features {
                    p.insert("os.features".into(), json!(v));
                }
                if let Some(v) = features {
                    p.insert("features".into(), json!(v));
                }
                Value::Object(p)
            })
    }

    #[derive(Debug, Clone)]
    struct GenIndex {
        docker: bool,
        children: Vec<Desc>,
        subject: Option<Desc>,
        artifact_type: Option<String>,
        annotations: BTreeMap<String, String>,
        presented: Presented,
    }

    fn gen_index() -> impl Strategy<Value = GenIndex> {
        any::<bool>().prop_flat_map(|docker| {
            let child_type = if docker {
                Just(DOCKER_MANIFEST.to_string()).boxed()
            } else {
                prop_oneof![Just(OCI_MANIFEST.to_string()), Just(OCI_INDEX.to_string())].boxed()
            };
            let child = (
                desc(child_type),
                proptest::option::of(platform()),
                proptest::option::of(artifact_media_type()),
            )
                .prop_map(move |(mut d, platform, artifact_type)| {
                    d.platform = platform;
                    if !docker {
                        d.artifact_type = artifact_type;
                    }
                    d
                });
            let subject_type =
                prop_oneof![Just(OCI_MANIFEST.to_string()), Just(OCI_INDEX.to_string())];
            (
                proptest::collection::vec(child, 0..6),
                proptest::option::of(desc(subject_type)),
                proptest::option::of(artifact_media_type()),
                annotations(),
                presented(),
            )
                .prop_map(
                    move |(children, subject, artifact_type, annotations, presented)| GenIndex {
                        docker,
                        children,
                        subject,
                        artifact_type,
                        annotations,
                        presented,
                    },
                )
        })
    }

    fn render_index(g: &GenIndex) -> (Vec<u8>, Option<String>, String) {
        let mut o = Map::new();
        o.insert("schemaVersion".into(), json!(2));
        let mt = if g.docker { DOCKER_LIST } else { OCI_INDEX };
        let (header, expected_mt) = present(&mut o, mt, OCI_INDEX, g.presented);
        if let Some(t) = &g.artifact_type {
            o.insert("artifactType".into(), json!(t));
        }
        o.insert(
            "manifests".into(),
            Value::Array(g.children.iter().map(Desc::to_json).collect()),
        );
        if let Some(s) = &g.subject {
            o.insert("subject".into(), s.to_json());
        }
        if !g.annotations.is_empty() {
            o.insert("annotations".into(), json!(g.annotations));
        }
        (
            serde_json::to_vec(&Value::Object(o)).unwrap(),
            header,
            expected_mt,
        )
    }

    fn strs(ds: &[ContentRef]) -> Vec<&str> {
        ds.iter().map(|d| d.digest.as_str()).collect()
    }

    fn sizes(ds: &[ContentRef]) -> Vec<u64> {
        ds.iter().map(|d| d.size).collect()
    }

    /// Arbitrary JSON built from the manifest vocabulary, to reach past the
    /// JSON syntax check into the structural parsing.
    fn manifestish_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<u64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|n| json!(n)),
            Just(json!(2)),
            digest().prop_map(Value::String),
            "sha256:[0-9a-fA-F]{0,66}".prop_map(Value::String),
            proptest::sample::select(vec![
                OCI_MANIFEST,
                OCI_INDEX,
                DOCKER_MANIFEST,
                DOCKER_LIST,
                DOCKER_FOREIGN,
                "application/vnd.oci.image.config.v1+json",
            ])
            .prop_map(|s| json!(s)),
            "\\PC{0,12}".prop_map(Value::String),
        ];
        let key = proptest::sample::select(vec![
            "schemaVersion",
            "mediaType",
            "config",
            "layers",
            "manifests",
            "digest",
            "size",
            "subject",
            "artifactType",
            "annotations",
            "platform",
            "urls",
            "x",
        ]);
        leaf.prop_recursive(4, 64, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::vec((key.clone(), inner), 0..7).prop_map(|kvs| {
                    Value::Object(kvs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
                }),
            ]
        })
    }

    proptest! {
        #[test]
        fn image_round_trip(g in gen_image()) {
            let (body, header, expected_mt) = render_image(&g);
            let m = Manifest::parse(&body, header.as_deref()).unwrap();
            prop_assert_eq!(m.media_type.as_str(), expected_mt.as_str());
            prop_assert_eq!(m.kind, ManifestKind::Image);
            let mut blobs = vec![g.config.digest.as_str()];
            blobs.extend(
                g.layers.iter().filter(|(_, foreign)| !foreign).map(|(d, _)| d.digest.as_str()),
            );
            prop_assert_eq!(strs(&m.blobs), blobs);
            let mut blob_sizes = vec![g.config.size];
            blob_sizes.extend(g.layers.iter().filter(|(_, foreign)| !foreign).map(|(d, _)| d.size));
            prop_assert_eq!(sizes(&m.blobs), blob_sizes);
            prop_assert!(m.children.is_empty());
            prop_assert_eq!(
                m.subject.as_ref().map(|s| (s.digest.as_str(), s.size)),
                g.subject.as_ref().map(|s| (s.digest.as_str(), s.size))
            );
            // artifactType, else the config's media type.
            let artifact_type = g.artifact_type.as_deref().unwrap_or(&g.config.media_type);
            prop_assert_eq!(m.artifact_type.as_deref(), Some(artifact_type));
            prop_assert_eq!(&m.annotations, &g.annotations);
        }

        #[test]
        fn index_round_trip(g in gen_index()) {
            let (body, header, expected_mt) = render_index(&g);
            let m = Manifest::parse(&body, header.as_deref()).unwrap();
            prop_assert_eq!(m.media_type.as_str(), expected_mt.as_str());
            prop_assert_eq!(m.kind, ManifestKind::Index);
            prop_assert!(m.blobs.is_empty());
            let children: Vec<&str> = g.children.iter().map(|d| d.digest.as_str()).collect();
            prop_assert_eq!(strs(&m.children), children);
            let child_sizes: Vec<u64> = g.children.iter().map(|d| d.size).collect();
            prop_assert_eq!(sizes(&m.children), child_sizes);
            prop_assert_eq!(
                m.subject.as_ref().map(|s| (s.digest.as_str(), s.size)),
                g.subject.as_ref().map(|s| (s.digest.as_str(), s.size))
            );
            prop_assert_eq!(m.artifact_type.as_deref(), g.artifact_type.as_deref());
            prop_assert_eq!(&m.annotations, &g.annotations);
        }

        #[test]
        fn image_and_index_headers_conflict(g in gen_image()) {
            // A body that names its type, sent under the other kind's
            // Content-Type, is refused.
            let mut g = g;
            g.presented = Presented::Body;
            let (body, _, mt) = render_image(&g);
            let other = if mt == OCI_MANIFEST { OCI_INDEX } else { DOCKER_LIST };
            prop_assert!(
                matches!(
                    Manifest::parse(&body, Some(other)),
                    Err(ManifestError::MediaTypeMismatch { .. })
                ),
                "expected a media type mismatch"
            );
        }

        #[test]
        fn bad_digest_is_refused(
            g in gen_image(),
            which in any::<proptest::sample::Index>(),
            bad in "sha256:[0-9a-f]{0,63}|sha256:[0-9A-F]{64}|sha512:[0-9a-f]{64}|(md5|blake3|sha384|sha256\\+b64u):[0-9a-f]{1,64}|[a-z]{1,6}",
        ) {
            // Corrupting any one digest wharf relies on (config, a
            // distributable layer, the subject) never yields Ok, even where
            // oci-spec itself would accept it (unknown algorithms).
            let mut g = g;
            let mut slots: Vec<Option<usize>> = vec![None];
            slots.extend((0..g.layers.len()).filter(|&i| !g.layers[i].1).map(Some));
            let subject = g.subject.is_some();
            let n = slots.len() + usize::from(subject);
            match which.index(n) {
                i if i < slots.len() => match slots[i] {
                    None => g.config.digest = bad,
                    Some(l) => g.layers[l].0.digest = bad,
                },
                _ => g.subject.as_mut().unwrap().digest = bad,
            }
            let (body, header, _) = render_image(&g);
            let r = Manifest::parse(&body, header.as_deref());
            prop_assert!(
                matches!(r, Err(ManifestError::Digest(_)) | Err(ManifestError::Invalid(_))),
                "got {:?}", r
            );
        }

        // A foreign layer's digest is re-parsed strictly too, although the
        // blob itself is not required to be present.
        #[test]
        fn foreign_layer_digest_is_checked(
            g in gen_image(),
            bad in "(md5|blake3|sha384):[0-9a-f]{1,64}",
        ) {
            let mut g = g;
            g.layers.push((
                Desc {
                    media_type: DOCKER_FOREIGN.into(),
                    digest: bad,
                    size: 1,
                    annotations: BTreeMap::new(),
                    urls: vec!["https://cdn.example/layer".into()],
                    platform: None,
                    artifact_type: None,
                },
                true,
            ));
            let (body, header, _) = render_image(&g);
            let r = Manifest::parse(&body, header.as_deref());
            prop_assert!(
                matches!(r, Err(ManifestError::Digest(_)) | Err(ManifestError::Invalid(_))),
                "got {:?}", r
            );
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            ct in proptest::option::of(".{0,60}"),
        ) {
            let _ = Manifest::parse(&bytes, ct.as_deref());
        }

        #[test]
        fn manifestish_json_never_panics(
            v in manifestish_json(),
            ct in proptest::option::of(proptest::sample::select(vec![
                OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST, "application/json", "",
            ])),
        ) {
            let bytes = serde_json::to_vec(&v).unwrap();
            if let Ok(m) = Manifest::parse(&bytes, ct) {
                // Whatever is accepted is a manifest type of the kind reported.
                prop_assert_eq!(m.media_type.kind(), Some(m.kind));
            }
        }
    }
}
