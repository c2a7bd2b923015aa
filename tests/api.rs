//! In-process API tests: the hyper service is built over a temporary store
//! and driven with requests, no socket. Every endpoint of the distribution
//! API and every bad-input case, asserting both the response (status, spec
//! error code, headers) and what is or is not stored afterwards.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use wharf::api::App;
use wharf::oci::Digest;
use wharf::registry::Registry;
use wharf::storage::BlobStore;
use wharf::storage::fs::FsStore;
use wharf::storage::meta::RedbMeta;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

struct T {
    app: App,
    store: Arc<FsStore>,
    meta: Arc<RedbMeta>,
    _dir: tempfile::TempDir,
}

#[derive(Debug)]
struct R {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl R {
    fn h(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("missing header {name} in {self:?}"))
            .to_str()
            .unwrap()
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
    fn code(&self) -> String {
        let v = self.json();
        assert!(
            v["errors"][0]["message"].is_string(),
            "error message present"
        );
        v["errors"][0]["code"].as_str().unwrap().to_string()
    }
}

fn sha(data: &[u8]) -> String {
    Digest::sha256_of(data).to_string()
}

impl T {
    /// Pushes, by digest, an artifact whose subject is `subject` (of
    /// `subject_size` bytes): an empty config, `layer` (of `layer_size`
    /// bytes), `artifact_type`, an annotation `i`. Returns the response and
    /// the artifact's digest.
    async fn push_referrer(
        &self,
        repo: &str,
        (subject, subject_size): (&str, usize),
        artifact_type: &str,
        (layer, layer_size): (&str, usize),
        i: usize,
    ) -> (R, String) {
        let empty = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
        let m = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": layer, "size": layer_size}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": subject_size},
            "annotations": {"org.example.i": i.to_string()},
        }))
        .unwrap();
        let d = sha(&m);
        let r = self
            .put_manifest(&format!("/v2/{repo}/manifests/{d}"), OCI_MANIFEST, &m)
            .await;
        (r, d)
    }

    fn new() -> T {
        T::with(|r| r)
    }

    /// An app whose registry `f` configured.
    fn with(f: impl FnOnce(Registry) -> Registry) -> T {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FsStore::open(dir.path()).unwrap());
        let meta = Arc::new(RedbMeta::open(&dir.path().join("meta.redb")).unwrap());
        let app = App::new(f(Registry::new(store.clone(), store.clone(), meta.clone())));
        T {
            app,
            store,
            meta,
            _dir: dir,
        }
    }

    /// `PUT` of `body` at `path` with `Content-Type: content_type`.
    async fn put_manifest(&self, path: &str, content_type: &str, body: &[u8]) -> R {
        self.req(Method::PUT, path, &[("content-type", content_type)], body)
            .await
    }

    async fn req(&self, method: Method, path: &str, headers: &[(&str, &str)], body: &[u8]) -> R {
        let mut b = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(Bytes::copy_from_slice(body))).unwrap();
        let resp = self.app.handle(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        assert_eq!(
            parts
                .headers
                .get("docker-distribution-api-version")
                .unwrap(),
            "registry/2.0"
        );
        R {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    async fn get(&self, path: &str) -> R {
        self.req(Method::GET, path, &[], b"").await
    }

    async fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let d = sha(data);
        let r = self
            .req(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
                &[],
                data,
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        d
    }

    /// Pushes config + one layer and an image manifest; returns (manifest bytes, digest).
    async fn push_image(&self, repo: &str, tag: &str, seed: &str) -> (Vec<u8>, String) {
        let config = format!("{{\"seed\":\"{seed}\"}}");
        let layer = format!("layer-{seed}");
        let cd = self.push_blob(repo, config.as_bytes()).await;
        let ld = self.push_blob(repo, layer.as_bytes()).await;
        let m = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": layer.len()}],
        });
        let bytes = serde_json::to_vec(&m).unwrap();
        let r = self
            .put_manifest(&format!("/v2/{repo}/manifests/{tag}"), OCI_MANIFEST, &bytes)
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        let d = sha(&bytes);
        assert_eq!(r.h("docker-content-digest"), d);
        assert_eq!(r.h("location"), format!("/v2/{repo}/manifests/{d}"));
        (bytes, d)
    }

    async fn stored(&self) -> Vec<String> {
        self.store
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.to_string())
            .collect()
    }

    async fn repos(&self) -> Vec<String> {
        let v = self.get("/v2/_catalog").await.json();
        v["repositories"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect()
    }
}

#[tokio::test]
async fn base_endpoint_and_unknown_routes() {
    let t = T::new();
    let r = t.get("/v2/").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!({}));
    let r = t.get("/v2/a/nothing/here").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code(), "NAME_UNKNOWN");
    let r = t.req(Method::POST, "/v2/a/tags/list", &[], b"").await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.code(), "UNSUPPORTED");
    assert_eq!(t.get("/healthz").await.status, StatusCode::OK);
}

/// The ETag a HEAD of `digest` in `r/one` answers.
async fn r_etag(t: &T, digest: &str) -> String {
    let r = t
        .req(Method::HEAD, &format!("/v2/r/one/blobs/{digest}"), &[], b"")
        .await;
    let etag = r.h("etag").to_string();
    assert_eq!(etag, format!("\"{digest}\""));
    etag
}

#[tokio::test]
async fn blob_reads_heads_and_ranges() {
    let t = T::new();
    let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    let d = t.push_blob("r/one", &data).await;
    let r = t
        .req(Method::HEAD, &format!("/v2/r/one/blobs/{d}"), &[], b"")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.h("content-length"), "10000");
    assert_eq!(r.h("docker-content-digest"), d);
    assert!(r.body.is_empty());
    let r = t.get(&format!("/v2/r/one/blobs/{d}")).await;
    assert_eq!(&r.body[..], &data[..]);
    let r = t
        .req(
            Method::GET,
            &format!("/v2/r/one/blobs/{d}"),
            &[("range", "bytes=100-199")],
            b"",
        )
        .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.h("content-range"), "bytes 100-199/10000");
    assert_eq!(&r.body[..], &data[100..200]);
    let r = t
        .req(
            Method::GET,
            &format!("/v2/r/one/blobs/{d}"),
            &[("range", "bytes=-10")],
            b"",
        )
        .await;
    assert_eq!(&r.body[..], &data[9990..]);
    // Beyond the end: 416 with the size, and nothing else changes.
    let r = t
        .req(
            Method::GET,
            &format!("/v2/r/one/blobs/{d}"),
            &[("range", "bytes=10000-")],
            b"",
        )
        .await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.h("content-range"), "bytes */10000");
    assert_eq!(r.code(), "SIZE_INVALID");
    // If-Range (RFC 9110, 13.1.5): the range is served only while the
    // validator matches the blob's ETag; otherwise the whole blob, 200.
    let etag = r_etag(&t, &d).await;
    for (if_range, partial) in [
        (etag.clone(), true),
        (format!("W/{etag}"), false),
        ("\"sha256:0000\"".to_string(), false),
        (format!("\"{}\"", sha(b"other")), false),
        ("Wed, 21 Oct 2015 07:28:00 GMT".to_string(), false),
        ("garbage".to_string(), false),
    ] {
        for range in ["bytes=100-199", "bytes=10000-"] {
            let r = t
                .req(
                    Method::GET,
                    &format!("/v2/r/one/blobs/{d}"),
                    &[("range", range), ("if-range", &if_range)],
                    b"",
                )
                .await;
            match (partial, range) {
                (true, "bytes=100-199") => {
                    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT, "{if_range}");
                    assert_eq!(&r.body[..], &data[100..200]);
                }
                (true, _) => assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE),
                (false, _) => {
                    assert_eq!(r.status, StatusCode::OK, "{if_range} {range}");
                    assert!(r.headers.get("content-range").is_none());
                    assert_eq!(r.h("content-length"), "10000");
                    assert_eq!(&r.body[..], &data[..], "{if_range} {range}");
                }
            }
        }
    }
    // A blob is readable only through repositories it was pushed or mounted to.
    let r = t.get(&format!("/v2/r/two/blobs/{d}")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code(), "BLOB_UNKNOWN");
    // Delete unlinks from the repository only.
    let _ = t.push_blob("r/two", &data).await;
    let r = t
        .req(Method::DELETE, &format!("/v2/r/one/blobs/{d}"), &[], b"")
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(
        t.get(&format!("/v2/r/one/blobs/{d}")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        &t.get(&format!("/v2/r/two/blobs/{d}")).await.body[..],
        &data[..]
    );
    let r = t
        .req(Method::DELETE, &format!("/v2/r/one/blobs/{d}"), &[], b"")
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code(), "BLOB_UNKNOWN");
}

#[tokio::test]
async fn chunked_upload_with_status_and_out_of_order_chunk() {
    let t = T::new();
    let data = b"0123456789abcdefghij";
    let d = sha(data);
    let r = t.req(Method::POST, "/v2/c/blobs/uploads/", &[], b"").await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let loc = r.h("location").to_string();
    assert!(loc.starts_with("/v2/c/blobs/uploads/"));
    assert_eq!(r.h("range"), "0-0");
    assert!(!r.h("docker-upload-uuid").is_empty());
    let r = t
        .req(
            Method::PATCH,
            &loc,
            &[("content-range", "0-9"), ("content-length", "10")],
            &data[..10],
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    assert_eq!(r.h("range"), "0-9");
    let loc = r.h("location").to_string();
    // Status.
    let r = t.get(&loc).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(r.h("range"), "0-9");
    // Out of order: 416, the upload is unchanged.
    let r = t
        .req(
            Method::PATCH,
            &loc,
            &[("content-range", "12-19"), ("content-length", "8")],
            &data[12..],
        )
        .await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.code(), "BLOB_UPLOAD_INVALID");
    assert_eq!(r.h("range"), "0-9");
    // A chunk whose length disagrees with its range: SIZE_INVALID, unchanged.
    let r = t
        .req(
            Method::PATCH,
            &loc,
            &[("content-range", "10-19")],
            &data[10..15],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "SIZE_INVALID");
    let r = t
        .req(
            Method::PATCH,
            &loc,
            &[("content-range", "ten-twenty")],
            &data[10..],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "BLOB_UPLOAD_INVALID");
    assert_eq!(t.get(&loc).await.h("range"), "0-9");
    // Last chunk with the PUT.
    let r = t
        .req(
            Method::PUT,
            &format!("{loc}?digest={d}"),
            &[("content-range", "10-19"), ("content-length", "10")],
            &data[10..],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(r.h("location"), format!("/v2/c/blobs/{d}"));
    assert_eq!(&t.get(&format!("/v2/c/blobs/{d}")).await.body[..], data);
    // The session is gone.
    let r = t.get(&loc).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code(), "BLOB_UPLOAD_UNKNOWN");
}

#[tokio::test]
async fn streamed_patch_then_put_and_cancel() {
    let t = T::new();
    let data = vec![7u8; 300_000];
    let d = sha(&data);
    let loc = t
        .req(Method::POST, "/v2/s/blobs/uploads/", &[], b"")
        .await
        .h("location")
        .to_string();
    let r = t.req(Method::PATCH, &loc, &[], &data).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.h("range"), "0-299999");
    let r = t
        .req(Method::PUT, &format!("{loc}?digest={d}"), &[], b"")
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(t.get(&format!("/v2/s/blobs/{d}")).await.body.len(), 300_000);

    let loc = t
        .req(Method::POST, "/v2/s/blobs/uploads/", &[], b"")
        .await
        .h("location")
        .to_string();
    t.req(Method::PATCH, &loc, &[], b"abc").await;
    let r = t.req(Method::DELETE, &loc, &[], b"").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = t.req(Method::DELETE, &loc, &[], b"").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code(), "BLOB_UPLOAD_UNKNOWN");
    assert!(!t.stored().await.contains(&sha(b"abc")));
}

#[tokio::test]
async fn sha512_blobs() {
    let t = T::new();
    let data = b"five hundred and twelve";
    let d = Digest::of(wharf::oci::Algorithm::Sha512, data).to_string();
    let r = t
        .req(
            Method::POST,
            &format!("/v2/x/blobs/uploads/?digest={d}"),
            &[],
            data,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(&t.get(&format!("/v2/x/blobs/{d}")).await.body[..], data);
}

#[tokio::test]
async fn cross_repository_mount() {
    let t = T::new();
    let d = t.push_blob("src/repo", b"shared layer").await;
    let r = t
        .req(
            Method::POST,
            &format!("/v2/dst/repo/blobs/uploads/?mount={d}&from=src/repo"),
            &[],
            b"",
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.h("location"), format!("/v2/dst/repo/blobs/{d}"));
    assert_eq!(
        &t.get(&format!("/v2/dst/repo/blobs/{d}")).await.body[..],
        b"shared layer"
    );
    // Not in `from`: falls back to an upload session.
    let other = sha(b"not there");
    let r = t
        .req(
            Method::POST,
            &format!("/v2/dst/repo/blobs/uploads/?mount={other}&from=src/repo"),
            &[],
            b"",
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert!(r.h("location").starts_with("/v2/dst/repo/blobs/uploads/"));
    // No `from`: never mounts from an arbitrary repository.
    let r = t
        .req(
            Method::POST,
            &format!("/v2/third/blobs/uploads/?mount={d}"),
            &[],
            b"",
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(
        t.get(&format!("/v2/third/blobs/{d}")).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn manifests_by_tag_and_digest() {
    let t = T::new();
    let (bytes, d) = t.push_image("img", "v1", "a").await;
    for reference in ["v1", d.as_str()] {
        let r = t.get(&format!("/v2/img/manifests/{reference}")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(&r.body[..], &bytes[..]);
        assert_eq!(r.h("content-type"), OCI_MANIFEST);
        assert_eq!(r.h("docker-content-digest"), d);
        assert_eq!(r.h("content-length"), bytes.len().to_string());
        let r = t
            .req(
                Method::HEAD,
                &format!("/v2/img/manifests/{reference}"),
                &[],
                b"",
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.h("content-length"), bytes.len().to_string());
        assert_eq!(r.h("docker-content-digest"), d);
    }
    // Content negotiation: a client that accepts only Docker types is not
    // handed an OCI manifest by tag; by digest the content is pinned.
    let r = t
        .req(
            Method::GET,
            "/v2/img/manifests/v1",
            &[("accept", DOCKER_MANIFEST)],
            b"",
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code(), "MANIFEST_UNKNOWN");
    let r = t
        .req(
            Method::GET,
            "/v2/img/manifests/v1",
            &[("accept", DOCKER_MANIFEST), ("accept", OCI_MANIFEST)],
            b"",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = t
        .req(
            Method::GET,
            &format!("/v2/img/manifests/{d}"),
            &[("accept", DOCKER_MANIFEST)],
            b"",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    // PUT by digest.
    let r = t
        .put_manifest(&format!("/v2/img2/manifests/{d}"), OCI_MANIFEST, &bytes)
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "blobs are not in img2");
    assert_eq!(r.code(), "MANIFEST_BLOB_UNKNOWN");
    let r = t
        .put_manifest(&format!("/v2/img/manifests/{d}"), OCI_MANIFEST, &bytes)
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    // An index of it.
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": d, "size": bytes.len(),
                       "platform": {"architecture": "amd64", "os": "linux"}}]
    }))
    .unwrap();
    let r = t
        .put_manifest("/v2/img/manifests/multi", OCI_INDEX, &index)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(
        t.get("/v2/img/manifests/multi").await.h("content-type"),
        OCI_INDEX
    );
}

#[tokio::test]
async fn tag_and_manifest_deletion() {
    let t = T::new();
    let (_, d) = t.push_image("del", "v1", "a").await;
    let r = t
        .put_manifest(
            "/v2/del/manifests/v2",
            OCI_MANIFEST,
            &t.get("/v2/del/manifests/v1").await.body,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    // Deleting a tag leaves the manifest and other tags.
    let r = t
        .req(Method::DELETE, "/v2/del/manifests/v1", &[], b"")
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(
        t.get("/v2/del/manifests/v1").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(t.get("/v2/del/manifests/v2").await.status, StatusCode::OK);
    assert_eq!(
        t.get(&format!("/v2/del/manifests/{d}")).await.status,
        StatusCode::OK
    );
    // Deleting by digest removes it and its tags.
    let r = t
        .req(Method::DELETE, &format!("/v2/del/manifests/{d}"), &[], b"")
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let r = t.get(&format!("/v2/del/manifests/{d}")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code(), "MANIFEST_UNKNOWN");
    assert_eq!(
        t.get("/v2/del/manifests/v2").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(t.get("/v2/del/tags/list").await.json()["tags"], json!([]));
    let r = t
        .req(Method::DELETE, "/v2/del/manifests/v9", &[], b"")
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code(), "MANIFEST_UNKNOWN");
}

#[tokio::test]
async fn tag_list_and_catalog_pagination() {
    let t = T::new();
    let (bytes, _) = t.push_image("pg", "t0", "a").await;
    for tag in ["t3", "t1", "t2", "t4"] {
        let r = t
            .put_manifest(&format!("/v2/pg/manifests/{tag}"), OCI_MANIFEST, &bytes)
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let r = t.get("/v2/pg/tags/list").await;
    assert_eq!(
        r.json(),
        json!({"name": "pg", "tags": ["t0", "t1", "t2", "t3", "t4"]})
    );
    assert!(r.headers.get("link").is_none());
    let r = t.get("/v2/pg/tags/list?n=2").await;
    assert_eq!(r.json()["tags"], json!(["t0", "t1"]));
    assert_eq!(r.h("link"), "</v2/pg/tags/list?n=2&last=t1>; rel=\"next\"");
    let r = t.get("/v2/pg/tags/list?n=2&last=t1").await;
    assert_eq!(r.json()["tags"], json!(["t2", "t3"]));
    let r = t.get("/v2/pg/tags/list?n=2&last=t3").await;
    assert_eq!(r.json()["tags"], json!(["t4"]));
    assert!(r.headers.get("link").is_none());
    assert_eq!(
        t.get("/v2/pg/tags/list?n=0").await.json()["tags"],
        json!([])
    );
    let r = t.get("/v2/pg/tags/list?n=abc").await;
    assert_eq!(r.status.as_u16() / 100, 4);
    let r = t.get("/v2/unknown/tags/list").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code(), "NAME_UNKNOWN");

    for repo in ["cat/b", "cat/a", "cat/c"] {
        t.push_blob(repo, b"x").await;
    }
    assert_eq!(t.repos().await, vec!["cat/a", "cat/b", "cat/c", "pg"]);
    let r = t.get("/v2/_catalog?n=2").await;
    assert_eq!(r.json()["repositories"], json!(["cat/a", "cat/b"]));
    assert_eq!(r.h("link"), "</v2/_catalog?n=2&last=cat/b>; rel=\"next\"");
    let r = t.get("/v2/_catalog?n=2&last=cat/b").await;
    assert_eq!(r.json()["repositories"], json!(["cat/c", "pg"]));
}

#[tokio::test]
async fn referrers_with_filter_and_subject_before_it_exists() {
    let t = T::new();
    let (subject_bytes, subject) = t.push_image("ref", "v1", "s").await;
    let missing_subject = sha(b"a manifest that was never pushed");
    let mut pushed = Vec::new();
    for (i, (subj, atype)) in [
        (subject.as_str(), "application/vnd.example.sig"),
        (subject.as_str(), "application/vnd.example.sbom"),
        (missing_subject.as_str(), "application/vnd.example.sig"),
    ]
    .iter()
    .enumerate()
    {
        let layer = t.push_blob("ref", format!("payload{i}").as_bytes()).await;
        let (r, d) = t
            .push_referrer("ref", (subj, subject_bytes.len()), atype, (&layer, 8), i)
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        assert_eq!(r.h("oci-subject"), *subj);
        pushed.push(d);
    }
    let r = t.get(&format!("/v2/ref/referrers/{subject}")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.h("content-type"), OCI_INDEX);
    let v = r.json();
    assert_eq!(v["schemaVersion"], 2);
    assert_eq!(v["mediaType"], OCI_INDEX);
    let mut got: Vec<String> = v["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["digest"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    let mut want = vec![pushed[0].clone(), pushed[1].clone()];
    want.sort();
    assert_eq!(got, want);
    assert!(v["manifests"][0]["artifactType"].is_string());
    assert!(v["manifests"][0]["annotations"]["org.example.i"].is_string());
    assert!(r.headers.get("oci-filters-applied").is_none());
    let r = t
        .get(&format!(
            "/v2/ref/referrers/{subject}?artifactType=application%2Fvnd.example.sbom"
        ))
        .await;
    assert_eq!(r.h("oci-filters-applied"), "artifactType");
    let v = r.json();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(v["manifests"][0]["digest"], pushed[1].as_str());
    // The subject pushed after its referrer.
    let r = t.get(&format!("/v2/ref/referrers/{missing_subject}")).await;
    assert_eq!(r.json()["manifests"][0]["digest"], pushed[2].as_str());
    // Nothing refers to the referrer itself.
    let r = t.get(&format!("/v2/ref/referrers/{}", pushed[0])).await;
    assert_eq!(r.json()["manifests"], json!([]));
    // Deleting a referrer removes it from the index.
    t.req(
        Method::DELETE,
        &format!("/v2/ref/manifests/{}", pushed[1]),
        &[],
        b"",
    )
    .await;
    let r = t.get(&format!("/v2/ref/referrers/{subject}")).await;
    assert_eq!(r.json()["manifests"].as_array().unwrap().len(), 1);
    let r = t.get("/v2/ref/referrers/sha256:nothex").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "DIGEST_INVALID");
}

/// The referrers API is paginated (one body for thousands of referrers is
/// megabytes): a client that follows `Link: <...>; rel="next"` collects every
/// referrer exactly once, with the default page and with a small `n`, with
/// and without a filter.
#[tokio::test]
async fn referrers_are_paginated_by_link_headers() {
    let t = T::new();
    let (subject_bytes, subject) = t.push_image("many", "v1", "s").await;
    let layer = t.push_blob("many", b"signature").await;
    let mut sigs = std::collections::BTreeSet::new();
    let mut all = std::collections::BTreeSet::new();
    for i in 0..320 {
        let atype = if i % 3 == 0 {
            "application/vnd.example.sig"
        } else {
            "application/vnd.example.sbom"
        };
        let (r, d) = t
            .push_referrer(
                "many",
                (&subject, subject_bytes.len()),
                atype,
                (&layer, 9),
                i,
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        if i % 3 == 0 {
            sigs.insert(d.clone());
        }
        all.insert(d);
    }
    let sig_filter = "artifactType=application%2Fvnd.example.sig";
    for (first, expected, page) in [
        (String::new(), &all, 250),
        ("?n=7".to_string(), &all, 7),
        (format!("?{sig_filter}"), &sigs, 250),
        (format!("?n=10&{sig_filter}"), &sigs, 10),
        ("?n=100000".to_string(), &all, 250),
    ] {
        let mut url = format!("/v2/many/referrers/{subject}{first}");
        let mut seen = Vec::new();
        let mut pages = 0;
        loop {
            let r = t.get(&url).await;
            assert_eq!(r.status, StatusCode::OK, "{url}: {r:?}");
            assert_eq!(r.h("content-type"), OCI_INDEX);
            let body = r.json();
            let got = body["manifests"].as_array().unwrap();
            assert!(got.len() <= page, "{url}: {} on one page", got.len());
            seen.extend(
                got.iter()
                    .map(|d| d["digest"].as_str().unwrap().to_string()),
            );
            pages += 1;
            assert!(
                pages <= 1 + expected.len() / page,
                "{first}: too many pages"
            );
            match r.headers.get("link") {
                None => break,
                Some(link) => {
                    assert_eq!(got.len(), page, "{url}: a short page before the last");
                    let link = link.to_str().unwrap();
                    let next = link
                        .strip_prefix('<')
                        .and_then(|l| l.strip_suffix(">; rel=\"next\""))
                        .unwrap_or_else(|| panic!("bad Link {link}"));
                    url = next.to_string();
                }
            }
        }
        let unique: std::collections::BTreeSet<String> = seen.iter().cloned().collect();
        assert_eq!(unique.len(), seen.len(), "{first}: a referrer came twice");
        assert_eq!(&unique, expected, "{first}: referrers lost or foreign");
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(seen, sorted, "{first}: pages are in digest order");
    }
    let r = t.get(&format!("/v2/many/referrers/{subject}?n=abc")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "UNSUPPORTED");
    let r = t
        .get(&format!("/v2/many/referrers/{subject}?last=nope"))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "DIGEST_INVALID");
}

// ---- bad input: a clear error, and nothing stored ----

#[tokio::test]
async fn invalid_names_tags_and_digests() {
    let t = T::new();
    let d = sha(b"x");
    for (path, code) in [
        ("/v2/UPPER/tags/list".to_string(), "NAME_INVALID"),
        ("/v2/a__-b/manifests/latest".to_string(), "NAME_INVALID"),
        (format!("/v2/{}/tags/list", "a".repeat(256)), "NAME_INVALID"),
        ("/v2/a/manifests/-bad-tag".to_string(), "MANIFEST_INVALID"),
        (
            format!("/v2/a/manifests/{}", "t".repeat(129)),
            "MANIFEST_INVALID",
        ),
        ("/v2/a/blobs/sha256:1234".to_string(), "DIGEST_INVALID"),
        (
            format!(
                "/v2/a/blobs/{}",
                d.to_uppercase().replace("SHA256", "sha256")
            ),
            "DIGEST_INVALID",
        ),
        (format!("/v2/a/blobs/md5:{}", &d[7..39]), "DIGEST_INVALID"),
        ("/v2/a/manifests/sha256:zz".to_string(), "DIGEST_INVALID"),
    ] {
        for method in [Method::GET, Method::HEAD, Method::PUT, Method::DELETE] {
            let r = t
                .req(
                    method.clone(),
                    &path,
                    &[("content-type", OCI_MANIFEST)],
                    b"{}",
                )
                .await;
            if code == "MANIFEST_INVALID" && method != Method::PUT {
                // An invalid tag names no manifest: 404 for reads and deletes.
                assert_eq!(r.status, StatusCode::NOT_FOUND, "{method} {path}");
                if method != Method::HEAD {
                    assert_eq!(r.code(), "MANIFEST_UNKNOWN", "{method} {path}");
                }
                continue;
            }
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{method} {path}");
            if method != Method::HEAD {
                assert_eq!(r.code(), code, "{method} {path}");
            }
        }
    }
    let r = t
        .req(
            Method::POST,
            "/v2/a/blobs/uploads/?digest=sha256:short",
            &[],
            b"x",
        )
        .await;
    assert_eq!(r.code(), "DIGEST_INVALID");
    let r = t
        .req(
            Method::POST,
            "/v2/a/blobs/uploads/?mount=nope&from=b",
            &[],
            b"",
        )
        .await;
    assert_eq!(r.code(), "DIGEST_INVALID");
    assert!(t.stored().await.is_empty());
    assert!(t.repos().await.is_empty());
}

/// Query values an endpoint cannot take are the client's mistake: 400 with
/// the spec's code (UNSUPPORTED, "an invalid set of parameters", for `n`;
/// DIGEST_INVALID and NAME_INVALID for a mount's `mount` and `from`), never
/// 405, and nothing is created.
#[tokio::test]
async fn bad_query_values_are_400_and_create_nothing() {
    let t = T::new();
    t.push_image("q/src", "v1", "q").await;
    let layer = sha(b"layer-q");
    let repos = t.repos().await;
    let stored = t.stored().await;
    for path in [
        "/v2/q/src/tags/list?n=-1",
        "/v2/q/src/tags/list?n=abc",
        "/v2/q/src/tags/list?n=1.5",
        "/v2/q/src/tags/list?n=99999999999999999999999",
        "/v2/_catalog?n=-1",
        "/v2/_catalog?n=abc",
    ] {
        let r = t.get(path).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {r:?}");
        assert_eq!(r.code(), "UNSUPPORTED", "{path}");
    }
    for (query, code) in [
        ("mount=nope&from=q/src".to_string(), "DIGEST_INVALID"),
        ("mount=&from=q/src".to_string(), "DIGEST_INVALID"),
        (format!("mount={layer}&from=Q/SRC"), "NAME_INVALID"),
        (format!("mount={layer}&from=../q/src"), "NAME_INVALID"),
        (format!("mount={layer}&from="), "NAME_INVALID"),
    ] {
        let path = format!("/v2/q/dst/blobs/uploads/?{query}");
        let r = t.req(Method::POST, &path, &[], b"").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {r:?}");
        assert_eq!(r.code(), code, "{path}");
        assert!(r.headers.get("location").is_none(), "{path}");
    }
    assert_eq!(t.repos().await, repos, "no repository was created");
    assert_eq!(t.stored().await, stored);
    let staged: Vec<_> = std::fs::read_dir(t._dir.path().join("uploads"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        staged.is_empty(),
        "no upload session was opened: {staged:?}"
    );
}

#[tokio::test]
async fn path_traversal_is_refused() {
    let t = T::new();
    for path in [
        "/v2/../../etc/passwd/tags/list",
        "/v2/a/../b/tags/list",
        "/v2/a%2F..%2Fb/tags/list",
        "/v2/a%2fb/manifests/latest",
        "/v2/%2e%2e/blobs/uploads/",
        "/v2/a/./b/tags/list",
        "/v2//a/tags/list",
    ] {
        for method in [Method::GET, Method::POST, Method::PUT] {
            let r = t.req(method.clone(), path, &[], b"x").await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{method} {path}: {r:?}");
            assert_eq!(r.code(), "NAME_INVALID", "{method} {path}");
        }
    }
    let r = t.get("/v2/a/blobs/uploads/..%2F..%2Fmeta.redb").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code(), "BLOB_UPLOAD_UNKNOWN");
    assert!(t.stored().await.is_empty());
    assert!(t.repos().await.is_empty());
}

#[tokio::test]
async fn digest_and_size_mismatches_store_nothing() {
    let t = T::new();
    let data = b"the real content";
    let wrong = sha(b"something else");
    // Monolithic.
    let r = t
        .req(
            Method::POST,
            &format!("/v2/m/blobs/uploads/?digest={wrong}"),
            &[],
            data,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "DIGEST_INVALID");
    // POST then PUT with the wrong digest: the session ends, nothing stored.
    let loc = t
        .req(Method::POST, "/v2/m/blobs/uploads/", &[], b"")
        .await
        .h("location")
        .to_string();
    let r = t
        .req(Method::PUT, &format!("{loc}?digest={wrong}"), &[], data)
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "DIGEST_INVALID");
    assert_eq!(t.get(&loc).await.code(), "BLOB_UPLOAD_UNKNOWN");
    // PUT without digest.
    let loc = t
        .req(Method::POST, "/v2/m/blobs/uploads/", &[], b"")
        .await
        .h("location")
        .to_string();
    let r = t.req(Method::PUT, &loc, &[], data).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "DIGEST_INVALID");
    // Size mismatch: Content-Length says more than the body.
    let right = sha(data);
    let r = t
        .req(
            Method::POST,
            &format!("/v2/m/blobs/uploads/?digest={right}"),
            &[("content-length", "99")],
            data,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "SIZE_INVALID");
    for d in [&wrong, &right] {
        let r = t
            .req(Method::HEAD, &format!("/v2/m/blobs/{d}"), &[], b"")
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
    }
    assert!(
        t.stored().await.is_empty(),
        "nothing stored: {:?}",
        t.stored().await
    );
}

#[tokio::test]
async fn bad_manifests_store_nothing() {
    let t = T::new();
    let cd = t.push_blob("bm", b"{}").await;
    let before = t.stored().await;
    let missing = sha(b"missing layer");
    let valid = |layer: &str| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": 13}],
        }))
        .unwrap()
    };
    let cases: Vec<(Vec<u8>, &str, StatusCode, &str)> = vec![
        (valid(&missing), OCI_MANIFEST, StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN"),
        (b"{not json".to_vec(), OCI_MANIFEST, StatusCode::BAD_REQUEST, "MANIFEST_INVALID"),
        (b"{\"schemaVersion\":1}".to_vec(), OCI_MANIFEST, StatusCode::BAD_REQUEST, "MANIFEST_INVALID"),
        (
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#.to_vec(),
            OCI_MANIFEST,
            StatusCode::BAD_REQUEST,
            "MANIFEST_INVALID",
        ),
        (valid(&missing), OCI_INDEX, StatusCode::BAD_REQUEST, "MANIFEST_INVALID"),
        (
            valid("sha256:NOTHEX"),
            OCI_MANIFEST,
            StatusCode::BAD_REQUEST,
            "MANIFEST_INVALID",
        ),
        (
            serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
                "manifests": [{"mediaType": OCI_MANIFEST, "digest": missing, "size": 3}]})).unwrap(),
            OCI_INDEX,
            StatusCode::BAD_REQUEST,
            "MANIFEST_BLOB_UNKNOWN",
        ),
        (vec![b' '; 4 * 1024 * 1024 + 1], OCI_MANIFEST, StatusCode::PAYLOAD_TOO_LARGE, "MANIFEST_INVALID"),
    ];
    for (i, (body, ct, status, code)) in cases.into_iter().enumerate() {
        let r = t.put_manifest("/v2/bm/manifests/latest", ct, &body).await;
        assert_eq!(r.status, status, "case {i}: {r:?}");
        assert_eq!(r.code(), code, "case {i}");
    }
    // PUT by a digest the content does not hash to.
    let layer = t.push_blob("bm", b"a good layer.").await;
    let good = valid(&layer);
    let before = [before, vec![layer]].concat();
    let r = t
        .put_manifest(&format!("/v2/bm/manifests/{missing}"), OCI_MANIFEST, &good)
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "DIGEST_INVALID");
    let r = t.get("/v2/bm/manifests/latest").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(t.get("/v2/bm/tags/list").await.json()["tags"], json!([]));
    let mut now = t.stored().await;
    now.sort();
    let mut before = before;
    before.sort();
    assert_eq!(now, before, "no manifest bytes stored");
}

#[tokio::test]
async fn unknown_and_foreign_upload_ids() {
    let t = T::new();
    for (m, body) in [
        (Method::GET, &b""[..]),
        (Method::PATCH, b"x"),
        (Method::PUT, b""),
        (Method::DELETE, b""),
    ] {
        let r = t
            .req(
                m.clone(),
                &format!(
                    "/v2/u/blobs/uploads/00000000-0000-0000-0000-000000000000?digest={}",
                    sha(b"x")
                ),
                &[],
                body,
            )
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{m}");
        assert_eq!(r.code(), "BLOB_UPLOAD_UNKNOWN", "{m}");
    }
    // A session belongs to the repository it was opened in.
    let loc = t
        .req(Method::POST, "/v2/u/blobs/uploads/", &[], b"")
        .await
        .h("location")
        .to_string();
    let foreign = loc.replace("/v2/u/", "/v2/other/");
    let r = t.req(Method::PATCH, &foreign, &[], b"x").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code(), "BLOB_UPLOAD_UNKNOWN");
    assert_eq!(t.get(&loc).await.h("range"), "0-0");
}

/// Pushes `body` as `repo:tag` and asserts it was refused with `code` and
/// that nothing of it was stored: no tag, no manifest by digest, no new
/// blob.
async fn refused_and_absent(t: &T, repo: &str, tag: &str, ct: &str, body: &[u8], code: &str) {
    let before = {
        let mut b = t.stored().await;
        b.sort();
        b
    };
    let r = t
        .put_manifest(&format!("/v2/{repo}/manifests/{tag}"), ct, body)
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{tag}: {r:?}");
    assert_eq!(r.code(), code, "{tag}: {r:?}");
    assert_eq!(
        t.get(&format!("/v2/{repo}/manifests/{tag}")).await.status,
        StatusCode::NOT_FOUND,
        "{tag}: the tag exists"
    );
    let by_digest = t.get(&format!("/v2/{repo}/manifests/{}", sha(body))).await;
    assert_eq!(
        by_digest.status,
        StatusCode::NOT_FOUND,
        "{tag}: stored by digest"
    );
    let tags = t.get(&format!("/v2/{repo}/tags/list")).await;
    if tags.status == StatusCode::OK {
        let listed = tags.json()["tags"].clone();
        assert!(
            !listed.as_array().unwrap().iter().any(|x| x == tag),
            "{tag}: listed in {listed}"
        );
    }
    let mut now = t.stored().await;
    now.sort();
    assert_eq!(now, before, "{tag}: bytes were stored");
}

#[tokio::test]
async fn manifests_nested_too_deep_not_utf8_or_with_wrong_sizes_store_nothing() {
    let t = T::new();
    let config = br#"{"architecture":"amd64"}"#;
    let layer = b"a layer of thirty-one bytes...!";
    let cd = t.push_blob("dm", config).await;
    let ld = t.push_blob("dm", layer).await;
    let image = |config_size: usize, layer_size: usize, extra: &str| {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{config_size}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{ld}","size":{layer_size}}}]{extra}}}"#
        )
        .into_bytes()
    };
    let (cn, ln) = (config.len(), layer.len());

    // A million levels of nesting in a field no parser needs.
    let deep = image(
        cn,
        ln,
        &format!(r#","x":{}{}"#, "[".repeat(1_000_000), "]".repeat(1_000_000)),
    );
    refused_and_absent(&t, "dm", "deep", OCI_MANIFEST, &deep, "MANIFEST_INVALID").await;

    // Invalid UTF-8 inside a string of a field the parser skips.
    let mut bad_utf8 = image(cn, ln, r#","x":{"a":"??"}"#);
    let at = bad_utf8.windows(2).position(|w| w == b"??").unwrap();
    bad_utf8[at..at + 2].copy_from_slice(&[0xc3, 0x28]);
    refused_and_absent(
        &t,
        "dm",
        "utf8",
        OCI_MANIFEST,
        &bad_utf8,
        "MANIFEST_INVALID",
    )
    .await;

    // Descriptors whose size is not the stored blob's.
    for (tag, body) in [
        ("layer-size", image(cn, ln + 1, "")),
        ("config-size", image(cn - 1, ln, "")),
    ] {
        refused_and_absent(&t, "dm", tag, OCI_MANIFEST, &body, "MANIFEST_INVALID").await;
    }
    // The empty config wharf stores on demand: not for a manifest refused
    // for another reason (a missing layer),
    let empty = sha(b"{}");
    let missing_layer = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(b"not pushed"), "size": 10}],
    }))
    .unwrap();
    refused_and_absent(
        &t,
        "dm",
        "no-layer",
        OCI_MANIFEST,
        &missing_layer,
        "MANIFEST_BLOB_UNKNOWN",
    )
    .await;
    // nor for a wrong size.
    let wrong_empty = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 3},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": ln}],
    }))
    .unwrap();
    refused_and_absent(
        &t,
        "dm",
        "empty-size",
        OCI_MANIFEST,
        &wrong_empty,
        "MANIFEST_INVALID",
    )
    .await;

    // The right sizes are accepted; an index must be right about its
    // child's size too.
    let good = image(cn, ln, "");
    let r = t
        .put_manifest("/v2/dm/manifests/good", OCI_MANIFEST, &good)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let index = |size: usize| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": sha(&good), "size": size}],
        }))
        .unwrap()
    };
    refused_and_absent(
        &t,
        "dm",
        "child-size",
        OCI_INDEX,
        &index(good.len() + 7),
        "MANIFEST_INVALID",
    )
    .await;
    let r = t
        .put_manifest("/v2/dm/manifests/index", OCI_INDEX, &index(good.len()))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
}

/// Media types (of descriptors, and `artifactType`) must be `type/subtype`
/// as RFC 6838 and the image spec define them: an `artifactType` that is
/// empty, has spaces, a newline or a NUL is refused, not stored into the
/// referrers index that clients filter on.
#[tokio::test]
async fn manifests_with_malformed_media_types_store_nothing() {
    let t = T::new();
    let config = br#"{"architecture":"amd64"}"#;
    let layer = b"a layer";
    let cd = t.push_blob("mt", config).await;
    let ld = t.push_blob("mt", layer).await;
    let (subject, _) = t.push_image("mt", "base", "s").await;
    let image = |config_type: &str,
                 layer_type: &str,
                 subject_type: &str,
                 artifact: Option<&str>| {
        let mut m = json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": config_type, "digest": cd, "size": config.len()},
            "layers": [{"mediaType": layer_type, "digest": ld, "size": layer.len()}],
            "subject": {"mediaType": subject_type, "digest": sha(&subject), "size": subject.len()},
        });
        if let Some(a) = artifact {
            m["artifactType"] = json!(a);
        }
        serde_json::to_vec(&m).unwrap()
    };
    let (c, l, s) = (
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.oci.image.layer.v1.tar",
        OCI_MANIFEST,
    );
    let long = format!("application/{}", "x".repeat(128));
    for (tag, body) in [
        ("artifact-empty", image(c, l, s, Some(""))),
        (
            "artifact-spaces",
            image(c, l, s, Some("weird type with spaces")),
        ),
        ("artifact-newline", image(c, l, s, Some("application/x\nb"))),
        ("artifact-nul", image(c, l, s, Some("application/x\u{0}b"))),
        ("artifact-no-subtype", image(c, l, s, Some("application"))),
        (
            "artifact-two-slashes",
            image(c, l, s, Some("application/x/y")),
        ),
        ("artifact-too-long", image(c, l, s, Some(&long))),
        ("config-type-empty", image("", l, s, None)),
        ("layer-type-spaces", image(c, "a layer", s, None)),
        ("subject-type-bad", image(c, l, "-/x", None)),
    ] {
        refused_and_absent(&t, "mt", tag, OCI_MANIFEST, &body, "MANIFEST_INVALID").await;
    }
    let index = |child_type: &str, artifact: &str| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "artifactType": artifact,
            "manifests": [{"mediaType": child_type, "digest": sha(&subject), "size": subject.len()}],
        }))
        .unwrap()
    };
    for (tag, body) in [
        ("index-child-type", index(" ", "application/vnd.example")),
        ("index-artifact", index(OCI_MANIFEST, "application/x y")),
    ] {
        refused_and_absent(&t, "mt", tag, OCI_INDEX, &body, "MANIFEST_INVALID").await;
    }
    // Nothing of it reached the referrers index.
    let r = t.get(&format!("/v2/mt/referrers/{}", sha(&subject))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["manifests"], json!([]), "{r:?}");

    // Well-formed types, with every character RFC 6838 allows, are stored
    // and filtered on.
    let odd_but_valid = "application/vnd.a-b_c.d+json!#$&^";
    let body = image(c, l, s, Some(odd_but_valid));
    let r = t
        .req(
            Method::PUT,
            &format!("/v2/mt/manifests/{}", sha(&body)),
            &[("content-type", OCI_MANIFEST)],
            &body,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let r = t
        .req(
            Method::PUT,
            "/v2/mt/manifests/index",
            &[("content-type", OCI_INDEX)],
            &index(OCI_MANIFEST, "application/vnd.example"),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let filter = "application%2Fvnd.a-b_c.d%2Bjson%21%23%24%26%5E";
    let r = t
        .get(&format!(
            "/v2/mt/referrers/{}?artifactType={filter}",
            sha(&subject)
        ))
        .await;
    assert_eq!(
        r.json()["manifests"][0]["artifactType"],
        json!(odd_but_valid),
        "{r:?}"
    );
}

/// A `subject` descriptor is held to the same rule as every other one:
/// when the manifest it names is in the repository, its size must be that
/// manifest's (a subject not pushed yet is allowed, as the spec says).
#[tokio::test]
async fn a_subject_descriptor_with_a_wrong_size_stores_nothing() {
    let t = T::new();
    let (subject, subject_digest) = t.push_image("subj", "base", "s").await;
    let config = br#"{"sig":1}"#;
    let cd = t.push_blob("subj", config).await;
    let referrer = |size: usize, digest: &str| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.sig",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
            "layers": [],
            "subject": {"mediaType": OCI_MANIFEST, "digest": digest, "size": size},
        }))
        .unwrap()
    };
    for (tag, size) in [
        ("bigger", subject.len() + 1),
        ("smaller", subject.len() - 1),
        ("zero", 0),
    ] {
        let body = referrer(size, &subject_digest);
        refused_and_absent(&t, "subj", tag, OCI_MANIFEST, &body, "MANIFEST_INVALID").await;
    }
    let r = t.get(&format!("/v2/subj/referrers/{subject_digest}")).await;
    assert_eq!(r.json()["manifests"], json!([]), "{r:?}");

    // The right size is accepted; so is any size for a subject not pushed.
    for (tag, body) in [
        ("right", referrer(subject.len(), &subject_digest)),
        ("absent", referrer(12_345, &sha(b"not pushed"))),
    ] {
        let r = t
            .put_manifest(&format!("/v2/subj/manifests/{tag}"), OCI_MANIFEST, &body)
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{tag}: {r:?}");
    }
    let r = t.get(&format!("/v2/subj/referrers/{subject_digest}")).await;
    assert_eq!(r.json()["manifests"].as_array().unwrap().len(), 1, "{r:?}");
}

/// An index of `child` (of `child_type`), pushed by digest.
async fn push_index_of(t: &T, repo: &str, child: &[u8], child_type: &str) -> Vec<u8> {
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": child_type, "digest": sha(child), "size": child.len()}],
    }))
    .unwrap();
    let r = t
        .req(
            Method::PUT,
            &format!("/v2/{repo}/manifests/{}", sha(&index)),
            &[("content-type", OCI_INDEX)],
            &index,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    index
}

#[tokio::test]
async fn indexes_nest_at_most_the_documented_depth() {
    let t = T::new();
    let (image, _) = t.push_image("nest", "img", "n").await;
    // An index of the image has depth 1; MAX_INDEX_DEPTH levels are fine.
    let mut top = image.clone();
    let mut top_type = OCI_MANIFEST;
    for _ in 0..wharf::oci::manifest::MAX_INDEX_DEPTH {
        top = push_index_of(&t, "nest", &top, top_type).await;
        top_type = OCI_INDEX;
    }
    // One more level is refused, and stores nothing.
    let over = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": sha(&image), "size": image.len()},
            {"mediaType": OCI_INDEX, "digest": sha(&top), "size": top.len()},
        ],
    }))
    .unwrap();
    refused_and_absent(&t, "nest", "too-deep", OCI_INDEX, &over, "MANIFEST_INVALID").await;
    let r = t
        .put_manifest("/v2/nest/manifests/too-deep", OCI_INDEX, &over)
        .await;
    let message = r.json()["errors"][0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    let limit = format!("at most {}", wharf::oci::manifest::MAX_INDEX_DEPTH);
    assert!(message.contains(&limit), "{message}");
}

/// Manifests stored without a recorded depth (before depths were kept)
/// count as deep as their stored trees are.
#[tokio::test]
async fn indexes_stored_without_a_recorded_depth_are_measured() {
    use wharf::oci::manifest::MAX_INDEX_DEPTH;
    use wharf::storage::{ManifestRecord, MetaStore};
    let t = T::new();
    let (image, _) = t.push_image("old", "img", "o").await;
    let repo: wharf::oci::RepoName = "old".parse().unwrap();
    // `levels` indexes over `image`, stored as an older wharf did.
    let stored_chain = async |levels: usize| {
        let (mut top, mut top_type) = (image.clone(), OCI_MANIFEST);
        for _ in 0..levels {
            let index = serde_json::to_vec(&json!({
                "schemaVersion": 2, "mediaType": OCI_INDEX,
                "manifests": [{"mediaType": top_type, "digest": sha(&top), "size": top.len()}],
            }))
            .unwrap();
            let d = Digest::sha256_of(&index);
            t.store.put(&d, Bytes::from(index.clone())).await.unwrap();
            // A record as written before depths were recorded.
            let record: ManifestRecord =
                serde_json::from_value(json!({"media_type": OCI_INDEX, "size": index.len()}))
                    .unwrap();
            t.meta
                .put_manifest(
                    &repo,
                    wharf::storage::RepoKind::Hosted,
                    &d,
                    &record,
                    None,
                    None,
                )
                .await
                .unwrap();
            (top, top_type) = (index, OCI_INDEX);
        }
        top
    };
    // Three old levels, then pushes up to the limit: all accepted.
    let mut top = stored_chain(3).await;
    for _ in 3..MAX_INDEX_DEPTH {
        top = push_index_of(&t, "old", &top, OCI_INDEX).await;
    }
    let over = |top: &[u8]| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_INDEX, "digest": sha(top), "size": top.len()}],
        }))
        .unwrap()
    };
    refused_and_absent(
        &t,
        "old",
        "one-more",
        OCI_INDEX,
        &over(&top),
        "MANIFEST_INVALID",
    )
    .await;
    // An old tree far deeper than the limit is measured only as far as
    // needed to refuse.
    let deep = stored_chain(40).await;
    refused_and_absent(
        &t,
        "old",
        "on-top",
        OCI_INDEX,
        &over(&deep),
        "MANIFEST_INVALID",
    )
    .await;
}

/// Upload sessions are bounded (`storage.max_upload_sessions`): beyond the
/// bound a new session answers 429 TOOMANYREQUESTS and stages nothing;
/// ending one (cancel or finish) makes room again, and a monolithic push,
/// which keeps no session, still goes through.
#[tokio::test]
async fn upload_sessions_are_bounded() {
    let t = T::with(|r| r.with_max_upload_sessions(3));
    let staged = || async {
        wharf::storage::UploadStore::list(&*t.store)
            .await
            .unwrap()
            .len()
    };
    let mut locations = Vec::new();
    for _ in 0..3 {
        let r = t
            .req(Method::POST, "/v2/s/app/blobs/uploads/", &[], b"")
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
        locations.push(r.h("location").to_string());
    }
    let r = t
        .req(Method::POST, "/v2/s/app/blobs/uploads/", &[], b"")
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.code(), "TOOMANYREQUESTS");
    assert_eq!(staged().await, 3, "the refused session staged nothing");
    let d = sha(b"whole");
    let r = t
        .req(
            Method::POST,
            &format!("/v2/s/app/blobs/uploads/?digest={d}"),
            &[],
            b"whole",
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "a monolithic push keeps no session"
    );
    let r = t.req(Method::DELETE, &locations[0], &[], b"").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = t
        .req(Method::POST, "/v2/s/app/blobs/uploads/", &[], b"")
        .await;
    assert_eq!(
        r.status,
        StatusCode::ACCEPTED,
        "a cancelled session made room"
    );
    let r = t
        .req(
            Method::PUT,
            &format!("{}?digest={}", locations[1], sha(b"")),
            &[],
            b"",
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let r = t
        .req(Method::POST, "/v2/s/app/blobs/uploads/", &[], b"")
        .await;
    assert_eq!(
        r.status,
        StatusCode::ACCEPTED,
        "a finished session made room"
    );
    let r = t
        .req(Method::POST, "/v2/s/app/blobs/uploads/", &[], b"")
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
}
