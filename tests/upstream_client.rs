//! The upstream client against the scripted fake registry: token flow and
//! token cache, Basic auth, retries and `Retry-After`, digest checks, blob
//! ranges and broken bodies, redirects, tag pages, and an upstream that is
//! down.

mod common;

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use wharf::oci::{Digest, Reference, RepoName};
use wharf::storage::ByteStream;
use wharf::upstream::{Credentials, UpstreamClient, UpstreamError, UpstreamSettings};

use common::fake_upstream::{FakeUpstream, Fault, TestPki, TokenField};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const ACCEPT: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";

fn settings(fake: &FakeUpstream) -> UpstreamSettings {
    let mut s = UpstreamSettings::new(fake.url().parse().unwrap());
    s.connect_timeout = Duration::from_secs(2);
    s.response_timeout = Duration::from_secs(5);
    s.read_timeout = Duration::from_secs(5);
    s
}

fn client(fake: &FakeUpstream) -> UpstreamClient {
    UpstreamClient::new(settings(fake)).unwrap()
}

fn client_with(fake: &FakeUpstream, user: &str, pass: &str) -> UpstreamClient {
    let mut s = settings(fake);
    s.credentials = Some(Credentials::new(user, pass));
    UpstreamClient::new(s).unwrap()
}

fn name(s: &str) -> RepoName {
    s.parse().unwrap()
}

fn tag(s: &str) -> Reference {
    s.parse().unwrap()
}

fn manifest(seed: &str) -> Vec<u8> {
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": Digest::sha256_of(seed.as_bytes()), "size": seed.len()},
        "layers": [],
    })
    .to_string()
    .into_bytes()
}

fn blob_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// Reads a stream to its end; the first error is returned with the bytes
/// read before it.
async fn collect(mut s: ByteStream) -> (Vec<u8>, Option<io::Error>) {
    let mut out = Vec::new();
    while let Some(item) = s.next().await {
        match item {
            Ok(b) => out.extend_from_slice(&b),
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

/// Reads a stream that must end cleanly with exactly `expected`.
async fn expect_bytes(s: ByteStream, expected: &[u8]) {
    let (got, err) = collect(s).await;
    assert!(err.is_none(), "stream failed: {err:?}");
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "different bytes");
}

fn blob_path(repo: &str, d: &Digest) -> String {
    format!("/v2/{repo}/blobs/{d}")
}

// ---- auth ----

#[tokio::test]
async fn anonymous_token_is_fetched_once_and_reused_until_expiry() {
    let fake = FakeUpstream::start();
    fake.require_bearer("alice", "secret");
    fake.allow_anonymous(true);
    fake.token_expires_in(None); // the client assumes 60 s
    fake.token_issued_at(None);
    let body = manifest("a");
    let d = fake.add_manifest("library/alpine", Some("3"), OCI_MANIFEST, body.clone());
    let c = client(&fake);
    let repo = name("library/alpine");

    for _ in 0..5 {
        let (meta, bytes) = c.get_manifest(&repo, &tag("3"), ACCEPT).await.unwrap();
        assert_eq!(meta.digest, d);
        assert_eq!(meta.media_type, OCI_MANIFEST);
        assert_eq!(meta.size, body.len() as u64);
        assert_eq!(bytes, body);
    }
    assert_eq!(fake.token_requests(), 1);
    // One challenged request, then five authorized ones.
    assert_eq!(fake.count("GET", "/v2/library/alpine/manifests/3"), 6);
    let token_req = fake
        .requests()
        .into_iter()
        .find(|r| r.path == "/token")
        .unwrap();
    assert!(token_req.header("authorization").is_none(), "anonymous");
    let q = token_req.query.unwrap();
    assert!(q.contains("service=fake-registry"), "{q}");
    assert!(
        q.contains("scope=repository%3Alibrary%2Falpine%3Apull"),
        "{q}"
    );

    // Past the token's lifetime (on tokio's clock) a new one is fetched
    // before the request, without another challenge.
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(61)).await;
    tokio::time::resume();
    c.head_manifest(&repo, &tag("3"), ACCEPT).await.unwrap();
    assert_eq!(fake.token_requests(), 2);
    assert_eq!(fake.count("HEAD", "/v2/library/alpine/manifests/3"), 1);
}

#[tokio::test]
async fn issued_at_shortens_the_token_lifetime() {
    let fake = FakeUpstream::start();
    fake.require_bearer("alice", "secret");
    fake.allow_anonymous(true);
    // Issued 50 s ago, 60 s to live: about 10 s left (refreshed 6 s early).
    fake.token_expires_in(Some(60));
    fake.token_issued_at(Some(Duration::from_secs(50)));
    fake.add_manifest("r", Some("t"), OCI_MANIFEST, manifest("r"));
    let c = client(&fake);
    c.head_manifest(&name("r"), &tag("t"), ACCEPT)
        .await
        .unwrap();
    c.head_manifest(&name("r"), &tag("t"), ACCEPT)
        .await
        .unwrap();
    assert_eq!(fake.token_requests(), 1);
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(5)).await;
    tokio::time::resume();
    c.head_manifest(&name("r"), &tag("t"), ACCEPT)
        .await
        .unwrap();
    assert_eq!(fake.token_requests(), 2);
}

#[tokio::test]
async fn concurrent_requests_share_one_token_fetch() {
    let fake = FakeUpstream::start();
    fake.require_bearer("alice", "secret");
    fake.token_field(TokenField::AccessToken);
    // A slow realm makes every request wait on the same fetch.
    fake.fault("/token", Fault::DelayHeaders(Duration::from_millis(300)));
    let d = fake.add_blob("r", blob_bytes(1000));
    let c = client_with(&fake, "alice", "secret");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let c = c.clone();
            let d = d.clone();
            tokio::spawn(async move {
                let b = c.get_blob(&name("r"), &d, 0, 1000).await.unwrap();
                collect(b).await.0.len()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 1000);
    }
    assert_eq!(fake.token_requests(), 1);
}

#[tokio::test]
async fn credentials_flow_and_bad_credentials() {
    let fake = FakeUpstream::start();
    fake.require_bearer("alice", "s3cret");
    let body = manifest("private");
    fake.add_manifest("team/app", Some("v1"), OCI_MANIFEST, body.clone());

    let good = client_with(&fake, "alice", "s3cret");
    let (_, bytes) = good
        .get_manifest(&name("team/app"), &tag("v1"), ACCEPT)
        .await
        .unwrap();
    assert_eq!(bytes, body);
    let token_req = fake
        .requests()
        .into_iter()
        .find(|r| r.path == "/token")
        .unwrap();
    assert_eq!(
        token_req.header("authorization"),
        Some("Basic YWxpY2U6czNjcmV0")
    );
    // The registry itself never sees the password.
    assert!(
        fake.requests()
            .iter()
            .filter(|r| r.path.starts_with("/v2/"))
            .all(|r| r
                .header("authorization")
                .is_none_or(|a| a.starts_with("Bearer ")))
    );

    let bad = client_with(&fake, "alice", "wrong");
    let err = bad
        .get_manifest(&name("team/app"), &tag("v1"), ACCEPT)
        .await
        .unwrap_err();
    match &err {
        UpstreamError::Unauthorized(msg) => {
            assert!(msg.contains("incorrect username or password"), "{msg}");
            assert!(!msg.contains("wrong"), "{msg}");
        }
        e => panic!("expected Unauthorized, got {e:?}"),
    }
    assert!(!err.is_retryable() && !err.is_unavailable());
    assert!(!format!("{err:?}").contains("wrong"));

    // Anonymous is refused by this realm.
    let anon = client(&fake);
    assert!(matches!(
        anon.head_manifest(&name("team/app"), &tag("v1"), ACCEPT)
            .await,
        Err(UpstreamError::Unauthorized(_))
    ));
}

#[tokio::test]
async fn revoked_token_is_replaced_once() {
    let fake = FakeUpstream::start();
    fake.require_bearer("alice", "secret");
    fake.allow_anonymous(true);
    fake.add_manifest("r", Some("t"), OCI_MANIFEST, manifest("r"));
    let c = client(&fake);
    c.head_manifest(&name("r"), &tag("t"), ACCEPT)
        .await
        .unwrap();
    fake.revoke_tokens();
    c.head_manifest(&name("r"), &tag("t"), ACCEPT)
        .await
        .unwrap();
    assert_eq!(fake.token_requests(), 2);
}

#[tokio::test]
async fn basic_auth() {
    let fake = FakeUpstream::start();
    fake.require_basic("bob", "pw");
    let d = fake.add_blob("r", blob_bytes(10));
    let c = client_with(&fake, "bob", "pw");
    assert_eq!(c.head_blob(&name("r"), &d).await.unwrap(), 10);
    let b = c.get_blob(&name("r"), &d, 0, 10).await.unwrap();
    assert_eq!(collect(b).await.0, blob_bytes(10));
    // The first request is challenged; after that Basic is sent up front.
    assert_eq!(fake.count("*", &blob_path("r", &d)), 3);
    let sent: Vec<_> = fake
        .requests()
        .iter()
        .map(|r| r.header("authorization").map(str::to_string))
        .collect();
    assert_eq!(
        sent,
        vec![
            None,
            Some("Basic Ym9iOnB3".into()),
            Some("Basic Ym9iOnB3".into())
        ]
    );

    let bad = client_with(&fake, "bob", "nope");
    assert!(matches!(
        bad.head_blob(&name("r"), &d).await,
        Err(UpstreamError::Unauthorized(_))
    ));
    let none = client(&fake);
    assert!(matches!(
        none.head_blob(&name("r"), &d).await,
        Err(UpstreamError::Unauthorized(_))
    ));
}

#[tokio::test]
async fn ping_counts_401_as_reachable() {
    let fake = FakeUpstream::start();
    fake.require_bearer("a", "b");
    client(&fake).ping().await.unwrap();
    assert_eq!(fake.token_requests(), 0);
    assert_eq!(fake.count("GET", "/v2/"), 1);
}

// ---- retries ----

// The waits themselves (exact Retry-After, backoff, the limit) are tested
// on tokio's paused clock beside the retry loop (src/upstream/client.rs).
// These two check the header end to end over a socket, which cannot run on
// a paused clock (its auto-advance fires the response timeout while bytes
// are in flight), so each waits the smallest delay the header can say: the
// real second is the scenario, not a synchronisation.

#[tokio::test]
async fn retry_after_is_honoured_then_success() {
    let fake = FakeUpstream::start();
    let body = manifest("x");
    fake.add_manifest("r", Some("t"), OCI_MANIFEST, body.clone());
    fake.fault_times("/v2/r/manifests/t", Fault::retry_after(429, "1"), 1);
    let c = client(&fake);
    let start = Instant::now();
    let (_, bytes) = c.get_manifest(&name("r"), &tag("t"), ACCEPT).await.unwrap();
    assert_eq!(bytes, body);
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(fake.count("GET", "/v2/r/manifests/t"), 2);
}

#[tokio::test]
async fn retry_after_as_http_date_on_503() {
    let fake = FakeUpstream::start();
    let d = fake.add_blob("r", blob_bytes(5));
    // Second precision: a date 2 s ahead is 1 to 2 s ahead once formatted.
    let at = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(2));
    fake.fault_times(d.as_str(), Fault::retry_after(503, at), 1);
    let start = Instant::now();
    assert_eq!(client(&fake).head_blob(&name("r"), &d).await.unwrap(), 5);
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(fake.count("HEAD", &blob_path("r", &d)), 2);
}

#[tokio::test]
async fn retries_exhausted() {
    let fake = FakeUpstream::start();
    fake.add_manifest("r", Some("t"), OCI_MANIFEST, manifest("x"));
    fake.fault("/v2/r/manifests/t", Fault::retry_after(429, "0"));
    let mut s = settings(&fake);
    s.max_retries = 2;
    let c = UpstreamClient::new(s).unwrap();
    let err = c
        .get_manifest(&name("r"), &tag("t"), ACCEPT)
        .await
        .unwrap_err();
    assert!(
        matches!(err, UpstreamError::TooManyRequests { retry_after: Some(d) } if d.is_zero()),
        "{err:?}"
    );
    assert!(err.is_unavailable());
    assert_eq!(fake.count("GET", "/v2/r/manifests/t"), 3);

    // 503 without Retry-After: backoff, same count.
    fake.clear_faults();
    fake.reset_counters();
    fake.fault("/v2/r/manifests/t", Fault::status(503));
    let err = c
        .head_manifest(&name("r"), &tag("t"), ACCEPT)
        .await
        .unwrap_err();
    assert!(
        matches!(err, UpstreamError::Status { status: 503, .. }),
        "{err:?}"
    );
    assert!(err.is_unavailable() && err.is_retryable());
    assert_eq!(fake.count("HEAD", "/v2/r/manifests/t"), 3);

    // A Retry-After longer than the client waits ends the attempts at once.
    fake.clear_faults();
    fake.reset_counters();
    fake.fault("/v2/r/manifests/t", Fault::retry_after(429, "3600"));
    let err = c
        .head_manifest(&name("r"), &tag("t"), ACCEPT)
        .await
        .unwrap_err();
    assert!(
        matches!(err, UpstreamError::TooManyRequests { retry_after: Some(d) } if d.as_secs() == 3600),
        "{err:?}"
    );
    assert_eq!(fake.count("HEAD", "/v2/r/manifests/t"), 1);

    // Not retryable: answered once.
    fake.clear_faults();
    fake.reset_counters();
    fake.fault("/v2/r/manifests/t", Fault::status(500));
    let err = c
        .head_manifest(&name("r"), &tag("t"), ACCEPT)
        .await
        .unwrap_err();
    assert!(
        matches!(err, UpstreamError::Status { status: 500, .. }),
        "{err:?}"
    );
    assert_eq!(fake.count("HEAD", "/v2/r/manifests/t"), 1);
}

#[tokio::test]
async fn response_timeout() {
    let fake = FakeUpstream::start();
    fake.add_manifest("r", Some("t"), OCI_MANIFEST, manifest("x"));
    fake.fault_times(
        "/v2/r/manifests/t",
        Fault::DelayHeaders(Duration::from_secs(3)),
        1,
    );
    let mut s = settings(&fake);
    s.response_timeout = Duration::from_millis(300);
    s.max_retries = 0;
    let c = UpstreamClient::new(s).unwrap();
    let err = c
        .head_manifest(&name("r"), &tag("t"), ACCEPT)
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Timeout(_)), "{err:?}");
    assert!(err.is_retryable() && err.is_unavailable());
    // The next request goes through (on a fresh connection).
    c.head_manifest(&name("r"), &tag("t"), ACCEPT)
        .await
        .unwrap();
}

// ---- manifests ----

#[tokio::test]
async fn manifest_digests_are_verified() {
    let fake = FakeUpstream::start();
    let body = manifest("m");
    let d = fake.add_manifest("r", Some("t"), OCI_MANIFEST, body.clone());
    let c = client(&fake);

    let by_digest = Reference::Digest(d.clone());
    let meta = c
        .head_manifest(&name("r"), &by_digest, ACCEPT)
        .await
        .unwrap();
    assert_eq!(
        (meta.digest.clone(), meta.size),
        (d.clone(), body.len() as u64)
    );

    fake.fault(d.as_str(), Fault::WrongBytes);
    let err = c
        .get_manifest(&name("r"), &by_digest, ACCEPT)
        .await
        .unwrap_err();
    match err {
        UpstreamError::DigestMismatch { expected, computed } => {
            assert_eq!(expected, d);
            assert_ne!(computed, d);
        }
        e => panic!("expected DigestMismatch, got {e:?}"),
    }
    // By tag, the Docker-Content-Digest header is checked the same way.
    fake.clear_faults();
    fake.fault("/v2/r/manifests/t", Fault::WrongBytes);
    assert!(matches!(
        c.get_manifest(&name("r"), &tag("t"), ACCEPT).await,
        Err(UpstreamError::DigestMismatch { .. })
    ));
    // Without the header, the digest is the body's sha256.
    fake.clear_faults();
    fake.send_digest_header(false);
    let (meta, _) = c.get_manifest(&name("r"), &tag("t"), ACCEPT).await.unwrap();
    assert_eq!(meta.digest, d);
    // And a manifest that does not exist.
    assert!(matches!(
        c.get_manifest(&name("r"), &tag("nope"), ACCEPT).await,
        Err(UpstreamError::NotFound)
    ));
}

#[tokio::test]
async fn oversized_manifest_is_refused() {
    let fake = FakeUpstream::start();
    let big = vec![b' '; 4 * 1024 * 1024 + 1];
    fake.add_manifest("r", Some("big"), OCI_MANIFEST, big);
    let err = client(&fake)
        .get_manifest(&name("r"), &tag("big"), ACCEPT)
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::TooLarge), "{err:?}");
}

// ---- blobs ----

#[tokio::test]
async fn blob_ranges() {
    let fake = FakeUpstream::start();
    let data = blob_bytes(300_000);
    let d = fake.add_blob("r", data.clone());
    let c = client(&fake);
    let path = blob_path("r", &d);

    let b = c.get_blob(&name("r"), &d, 0, 300_000).await.unwrap();
    expect_bytes(b, &data).await;

    let b = c.get_blob(&name("r"), &d, 123_456, 300_000).await.unwrap();
    let (got, err) = collect(b).await;
    assert!(err.is_none());
    assert_eq!(got, data[123_456..]);

    // A server that ignores Range: the client skips the prefix itself.
    fake.fault(d.as_str(), Fault::IgnoreRange);
    let b = c.get_blob(&name("r"), &d, 200_001, 300_000).await.unwrap();
    let (got, err) = collect(b).await;
    assert!(err.is_none());
    assert_eq!(got, data[200_001..]);

    assert_eq!(
        fake.ranges(&path),
        vec![
            None,
            Some("bytes=123456-".to_string()),
            Some("bytes=200001-".to_string())
        ]
    );
    assert!(matches!(
        c.get_blob(&name("r"), &Digest::sha256_of(b"absent"), 0, 6)
            .await,
        Err(UpstreamError::NotFound)
    ));
}

#[tokio::test]
async fn truncated_body_is_an_error_not_an_end() {
    let fake = FakeUpstream::start();
    let data = blob_bytes(200_000);
    let d = fake.add_blob("r", data.clone());
    fake.fault_times(d.as_str(), Fault::Truncate { after: 70_000 }, 1);
    let c = client(&fake);
    let b = c.get_blob(&name("r"), &d, 0, 200_000).await.unwrap();
    let (got, err) = collect(b).await;
    let err = err.expect("a truncated body must end in an error");
    assert!(
        got.len() <= 70_000 && data.starts_with(&got),
        "{}",
        got.len()
    );
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");

    // Resuming from where it broke completes the blob.
    let b = c
        .get_blob(&name("r"), &d, got.len() as u64, 200_000)
        .await
        .unwrap();
    let (rest, err) = collect(b).await;
    assert!(err.is_none());
    assert_eq!([got, rest].concat(), data);
}

#[tokio::test]
async fn reset_mid_body_is_an_error() {
    let fake = FakeUpstream::start();
    let data = blob_bytes(200_000);
    let d = fake.add_blob("r", data.clone());
    fake.fault_times(d.as_str(), Fault::Reset { after: 100_000 }, 1);
    let b = client(&fake)
        .get_blob(&name("r"), &d, 0, 200_000)
        .await
        .unwrap();
    let (got, err) = collect(b).await;
    let err = err.expect("a reset must end in an error");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    assert!(got.len() <= 100_000 && data.starts_with(&got));
}

#[tokio::test]
async fn stalled_body_times_out() {
    let fake = FakeUpstream::start();
    let d = fake.add_blob("r", blob_bytes(100_000));
    fake.fault(d.as_str(), Fault::stall_after(10_000));
    let mut s = settings(&fake);
    s.read_timeout = Duration::from_secs(1);
    let b = UpstreamClient::new(s)
        .unwrap()
        .get_blob(&name("r"), &d, 0, 100_000)
        .await
        .unwrap();
    let (got, err) = collect(b).await;
    assert_eq!(got.len(), 10_000);
    assert_eq!(
        err.expect("stall must fail").kind(),
        io::ErrorKind::TimedOut
    );
}

#[tokio::test]
async fn slow_body_within_read_timeout_completes() {
    let fake = FakeUpstream::start();
    let data = blob_bytes(5_000);
    let d = fake.add_blob("r", data.clone());
    fake.fault(
        d.as_str(),
        Fault::SlowBody {
            chunk: 1_000,
            delay: Duration::from_millis(50),
        },
    );
    let b = client(&fake)
        .get_blob(&name("r"), &d, 0, 5_000)
        .await
        .unwrap();
    expect_bytes(b, &data).await;
}

#[tokio::test]
async fn redirects_drop_authorization_across_hosts() {
    let origin = FakeUpstream::start();
    let cdn = FakeUpstream::start();
    origin.require_bearer("alice", "secret");
    let data = blob_bytes(50_000);
    let d = origin.add_blob("r", data.clone());
    cdn.add_blob("r", data.clone());
    let path = blob_path("r", &d);
    origin.fault(
        d.as_str(),
        Fault::redirect(format!("{}{path}?sig=1", cdn.url())),
    );

    let c = client_with(&origin, "alice", "secret");
    let b = c.get_blob(&name("r"), &d, 1_000, 50_000).await.unwrap();
    expect_bytes(b, &data[1_000..]).await;

    let cdn_reqs = cdn.requests();
    assert_eq!(cdn_reqs.len(), 1);
    assert_eq!(cdn_reqs[0].uri(), format!("{path}?sig=1"));
    assert!(cdn_reqs[0].header("authorization").is_none());
    assert_eq!(cdn_reqs[0].header("range"), Some("bytes=1000-"));
    let last_origin = origin
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.path == path)
        .unwrap();
    assert!(
        last_origin
            .header("authorization")
            .unwrap()
            .starts_with("Bearer ")
    );

    // A redirect on the same host keeps the token.
    origin.clear_faults();
    origin.reset_counters();
    origin.fault_times(d.as_str(), Fault::redirect(format!("{path}?again=1")), 1);
    let b = c.get_blob(&name("r"), &d, 0, 50_000).await.unwrap();
    assert_eq!(collect(b).await.0, data);
    let reqs = origin.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert!(reqs.iter().all(|r| r.header("authorization").is_some()));

    // A redirect loop ends.
    origin.fault(d.as_str(), Fault::redirect(path.clone()));
    let Err(err) = c.get_blob(&name("r"), &d, 0, 50_000).await else {
        panic!("a redirect loop must fail");
    };
    assert!(matches!(err, UpstreamError::Protocol(_)), "{err:?}");
}

// ---- listings ----

#[tokio::test]
async fn tag_pages() {
    let fake = FakeUpstream::start();
    let d = fake.add_manifest("r", Some("a"), OCI_MANIFEST, manifest("x"));
    for t in ["b", "c", "d", "e"] {
        fake.set_tag("r", t, &d);
    }
    let c = client(&fake);
    let repo = name("r");
    let p1 = c.tags(&repo, Some(2), None).await.unwrap();
    assert_eq!(
        (p1.tags.clone(), p1.more),
        (vec!["a".into(), "b".into()], true)
    );
    let p2 = c.tags(&repo, Some(2), Some("b")).await.unwrap();
    assert_eq!(
        (p2.tags.clone(), p2.more),
        (vec!["c".into(), "d".into()], true)
    );
    let p3 = c.tags(&repo, Some(2), Some("d")).await.unwrap();
    assert_eq!((p3.tags.clone(), p3.more), (vec!["e".into()], false));
    let all = c.tags(&repo, None, None).await.unwrap();
    assert_eq!(all.tags.len(), 5);
    assert!(!all.more);
    assert_eq!(fake.count("GET", "/v2/r/tags/list?n=2&last=b"), 1);
    assert!(matches!(
        c.tags(&name("nope"), None, None).await,
        Err(UpstreamError::NotFound)
    ));
}

#[tokio::test]
async fn referrers_index() {
    let fake = FakeUpstream::start();
    let subject = fake.add_manifest("r", Some("t"), OCI_MANIFEST, manifest("s"));
    let referrer = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sbom",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": Digest::sha256_of(b"{}"), "size": 2},
        "layers": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 1},
    })
    .to_string();
    let rd = fake.add_manifest("r", None, OCI_MANIFEST, referrer);
    let c = client(&fake);
    let index: serde_json::Value =
        serde_json::from_slice(&c.referrers(&name("r"), &subject, None).await.unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], rd.as_str());
    let filtered = c
        .referrers(&name("r"), &subject, Some("application/vnd.example.sbom"))
        .await
        .unwrap();
    let filtered: serde_json::Value = serde_json::from_slice(&filtered).unwrap();
    assert_eq!(filtered["manifests"].as_array().unwrap().len(), 1);
    let none = c
        .referrers(&name("r"), &subject, Some("application/other"))
        .await
        .unwrap();
    let none: serde_json::Value = serde_json::from_slice(&none).unwrap();
    assert!(none["manifests"].as_array().unwrap().is_empty());
    assert!(
        fake.requests()
            .iter()
            .any(|r| r.query.as_deref() == Some("artifactType=application%2Fvnd.example.sbom"))
    );
}

// ---- availability ----

#[tokio::test]
async fn connection_refused_then_back() {
    let fake = FakeUpstream::start();
    fake.add_manifest("r", Some("t"), OCI_MANIFEST, manifest("x"));
    let mut s = settings(&fake);
    s.max_retries = 1;
    let c = UpstreamClient::new(s).unwrap();
    assert_eq!(c.host(), fake.host());
    c.ping().await.unwrap();

    fake.stop();
    let err = c.ping().await.unwrap_err();
    assert!(matches!(err, UpstreamError::Connect(_)), "{err:?}");
    assert!(err.is_unavailable() && err.is_retryable());
    let err = c
        .head_manifest(&name("r"), &tag("t"), ACCEPT)
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");

    fake.restart();
    c.head_manifest(&name("r"), &tag("t"), ACCEPT)
        .await
        .unwrap();
}

#[tokio::test]
async fn tls_with_an_extra_ca_and_http2() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let fake = FakeUpstream::start_tls(&pki.cert, &pki.key);
    assert!(fake.url().starts_with("https://127.0.0.1:"));
    fake.require_bearer("alice", "secret");
    let data = blob_bytes(300_000);
    let d = fake.add_blob("r", data.clone());

    // Not signed by a system root: a TLS error, not retried.
    let err = client_with(&fake, "alice", "secret")
        .head_blob(&name("r"), &d)
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Tls(_)), "{err:?}");
    assert!(err.is_unavailable() && !err.is_retryable());
    assert_eq!(fake.total(), 0);

    // With the CA: the token flow and the blob, over HTTP/2.
    let mut s = settings(&fake);
    s.credentials = Some(Credentials::new("alice", "secret"));
    s.ca_file = Some(pki.ca.clone());
    let c = UpstreamClient::new(s).unwrap();
    let b = c.get_blob(&name("r"), &d, 10, 300_000).await.unwrap();
    expect_bytes(b, &data[10..]).await;
    let reqs = fake.requests();
    assert_eq!(fake.token_requests(), 1);
    assert!(
        reqs.iter().all(|r| r.version == http::Version::HTTP_2),
        "{reqs:?}"
    );
}

#[test]
fn usable_from_sync_tests_and_settings_are_checked() {
    let fake = FakeUpstream::start();
    fake.add_blob("r", b"hello".to_vec());
    assert_eq!(fake.total(), 0);
    for bad in ["ftp://x", "http://h/path", "http://u:p@h", "/relative"] {
        let s = UpstreamSettings::new(bad.parse().unwrap());
        assert!(
            matches!(
                UpstreamClient::new(s),
                Err(UpstreamError::InvalidSettings(_))
            ),
            "{bad}"
        );
    }
    let mut s = settings(&fake);
    s.ca_file = Some("/nonexistent/ca.pem".into());
    assert!(matches!(
        UpstreamClient::new(s),
        Err(UpstreamError::InvalidSettings(_))
    ));
    // A client is Send + Sync and cheap to share.
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<UpstreamClient>();
    let _shared = Arc::new(client(&fake));
}

// ---- the upstream's trust boundary ----

#[tokio::test]
async fn a_blob_body_is_bounded_by_the_size_the_caller_knows() {
    let fake = FakeUpstream::start();
    let data = blob_bytes(200_000);
    let d = fake.add_blob("r", data.clone());
    let c = client(&fake);

    // An endless chunked body is cut at the blob's size: the stream fails
    // instead of yielding a byte past it, from the start or resumed.
    for offset in [0, 150_000] {
        fake.fault_times(d.as_str(), Fault::Endless, 1);
        let s = c.get_blob(&name("r"), &d, offset, 200_000).await.unwrap();
        let (got, err) = collect(s).await;
        let err = err.expect("an endless body must end in an error");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(
            got.len() as u64 <= 200_000 - offset && data[offset as usize..].starts_with(&got),
            "{offset}: {} bytes",
            got.len()
        );
    }

    // A Content-Length other than the blob's size is refused before a byte
    // is read, and not retried.
    fake.reset_counters();
    fake.fault_times(d.as_str(), Fault::ContentLength(1_000_000_000_000), 1);
    match c.get_blob(&name("r"), &d, 0, 200_000).await {
        Err(UpstreamError::SizeMismatch {
            expected: 200_000,
            announced: 1_000_000_000_000,
        }) => {}
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("a bogus Content-Length was accepted"),
    }
    assert_eq!(fake.count("GET", &blob_path("r", &d)), 1);

    // Without Content-Length: the whole blob arrives, and a body that ends
    // before the known size is an error, not an end.
    fake.fault_times(d.as_str(), Fault::NoContentLength, 1);
    let s = c.get_blob(&name("r"), &d, 0, 200_000).await.unwrap();
    expect_bytes(s, &data).await;
    fake.fault_times(d.as_str(), Fault::NoContentLength, 1);
    let s = c.get_blob(&name("r"), &d, 0, 200_001).await.unwrap();
    let (got, err) = collect(s).await;
    assert_eq!(got, data);
    let err = err.expect("a short body must end in an error");
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
}

#[tokio::test]
async fn redirects_into_private_link_local_or_unspecified_addresses_are_refused() {
    let fake = FakeUpstream::start();
    let data = blob_bytes(10_000);
    let d = fake.add_blob("r", data.clone());
    let c = client(&fake);
    let path = blob_path("r", &d);
    let port = fake.addr().port();
    // The upstream is on loopback: private and link-local ranges are not
    // its kind, and unspecified addresses (0.0.0.0 reaches this machine)
    // are never allowed. Refused without a connection attempt, not retried.
    for target in [
        "http://10.255.255.1:9".to_string(),
        "http://169.254.169.254".to_string(),
        "http://[::ffff:192.168.0.1]:9".to_string(),
        format!("http://0.0.0.0:{port}"),
    ] {
        fake.reset_counters();
        fake.fault_times(
            d.as_str(),
            Fault::redirect(format!("{target}{path}?sig=1")),
            1,
        );
        match c.get_blob(&name("r"), &d, 0, 10_000).await {
            Err(UpstreamError::Refused(m)) => assert!(!m.is_empty()),
            Err(e) => panic!("{target}: {e:?}"),
            Ok(_) => panic!("{target}: the redirect was followed"),
        }
        assert_eq!(fake.total(), 1, "{target}: only the redirecting request");
    }
    // A CDN on loopback, like the upstream, is still followed.
    let cdn = FakeUpstream::start();
    cdn.add_blob("r", data.clone());
    fake.fault_times(
        d.as_str(),
        Fault::redirect(format!("{}{path}?sig=1", cdn.url())),
        1,
    );
    let s = c.get_blob(&name("r"), &d, 0, 10_000).await.unwrap();
    expect_bytes(s, &data).await;
    assert_eq!(cdn.total(), 1);
}

#[tokio::test]
async fn token_realms_are_bound_to_the_upstreams_host_or_allowed_hosts() {
    let fake = FakeUpstream::start();
    fake.require_bearer("alice", "secret");
    let d = fake.add_blob("r", blob_bytes(100));
    // The realm is this same server under another host name.
    fake.realm_authority(&format!("localhost:{}", fake.addr().port()));
    let with_realms = |creds: bool, hosts: &[&str]| {
        let mut s = settings(&fake);
        if creds {
            s.credentials = Some(Credentials::new("alice", "secret"));
        }
        s.token_realm_hosts = hosts.iter().map(|h| h.to_string()).collect();
        UpstreamClient::new(s).unwrap()
    };

    // Not the upstream's host and not allowed: refused, with or without
    // credentials; the realm is never contacted.
    fake.allow_anonymous(true);
    for creds in [true, false] {
        let err = with_realms(creds, &[])
            .head_blob(&name("r"), &d)
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamError::Refused(_)), "{err:?}");
    }
    assert_eq!(fake.token_requests(), 0);

    // Allowed, but plain http to a host other than the upstream:
    // credentials are not sent; an anonymous token is fetched.
    let err = with_realms(true, &["localhost"])
        .head_blob(&name("r"), &d)
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Refused(_)), "{err:?}");
    assert_eq!(fake.token_requests(), 0);
    let c = with_realms(false, &["localhost"]);
    assert_eq!(c.head_blob(&name("r"), &d).await.unwrap(), 100);
    assert_eq!(fake.token_requests(), 1);

    // The upstream's own host on another port is the upstream's: its
    // credentials go there (plain http, as the upstream itself).
    let realm = FakeUpstream::start();
    realm.require_bearer("alice", "secret");
    fake.realm_authority(&realm.host());
    fake.revoke_tokens();
    let err = with_realms(true, &[])
        .head_blob(&name("r"), &d)
        .await
        .unwrap_err();
    // The other server's token is not valid here, but it was asked.
    assert!(matches!(err, UpstreamError::Unauthorized(_)), "{err:?}");
    let asked = realm.requests();
    assert!(
        asked.iter().any(|r| r.path == "/token"
            && r.header("authorization")
                .is_some_and(|a| a.starts_with("Basic "))),
        "{asked:?}"
    );
}

#[tokio::test]
async fn credentials_go_to_an_allowed_realm_host_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let fake = FakeUpstream::start_tls(&pki.cert, &pki.key);
    fake.require_bearer("alice", "secret");
    let d = fake.add_blob("r", blob_bytes(100));
    fake.realm_authority(&format!("localhost:{}", fake.addr().port()));
    let client = |hosts: Vec<String>| {
        let mut s = settings(&fake);
        s.credentials = Some(Credentials::new("alice", "secret"));
        s.ca_file = Some(pki.ca.clone());
        s.token_realm_hosts = hosts;
        UpstreamClient::new(s).unwrap()
    };
    let err = client(vec![]).head_blob(&name("r"), &d).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Refused(_)), "{err:?}");
    assert_eq!(fake.token_requests(), 0);
    let c = client(vec!["LOCALHOST".into()]);
    assert_eq!(c.head_blob(&name("r"), &d).await.unwrap(), 100);
    assert_eq!(fake.token_requests(), 1);
}

/// wharf pages its referrers (250 at a time, `Link: <...>; rel="next"`); its
/// own client, which the cache and replication use, follows every page, so
/// no referrer of a subject with more than one page is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_listings_are_followed_across_pages() {
    use common::http::HttpClient;
    use common::replication::{push_image, push_referrer};
    let w = common::spawn_wharf("");
    let http = HttpClient::new(w.url());
    let subject = push_image(
        &http,
        "signed/app",
        Some("v1"),
        &[b"layer".to_vec()],
        "amd64",
    )
    .await;
    let mut pushed = std::collections::BTreeSet::new();
    for i in 0..600 {
        let r = push_referrer(&http, "signed/app", &subject, format!("sig {i}").as_bytes()).await;
        pushed.insert(r.digest);
    }
    let first = http
        .get(&format!("/v2/signed/app/referrers/{}", subject.digest))
        .await;
    assert!(
        first.header("link").is_some(),
        "the listing spans pages: {:?}",
        first.headers
    );
    let c = UpstreamClient::new(UpstreamSettings::new(w.url().parse().unwrap())).unwrap();
    let repo: RepoName = "signed/app".parse().unwrap();
    let digest: Digest = subject.digest.parse().unwrap();
    let body = c.referrers(&repo, &digest, None).await.unwrap();
    let index: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let got: Vec<String> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["digest"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got.len(), pushed.len(), "no referrer twice, none lost");
    assert_eq!(
        got.into_iter().collect::<std::collections::BTreeSet<_>>(),
        pushed
    );
}
