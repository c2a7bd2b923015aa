//! Writing to another registry (the destinations of replication): blob and
//! manifest existence checks, upload sessions (cross-repository mount,
//! chunked `PATCH` with `Content-Range`, `PUT ?digest=`), and manifest
//! pushes by digest or tag.
//!
//! Every request asks for the `repository:NAME:pull,push` scope. Bodiless
//! requests and manifest pushes (held in memory) go through the retry and
//! challenge machinery; a streamed blob chunk is sent once: after a failure
//! the caller asks the session's offset ([`UpstreamClient::upload_offset`])
//! and streams again from there, or opens a new session.

use bytes::Bytes;
use http::Method;
use http::header::{ACCEPT, CONTENT_TYPE, LOCATION};

use super::client::{self, Op};
use super::{UpstreamClient, UpstreamError, header_digest, header_str};
use crate::oci::ByteStream;
use crate::oci::{Digest, Reference, RepoName};

/// Every manifest type wharf handles, for `Accept` on manifest HEADs.
pub const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

/// How `POST .../blobs/uploads/` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadStart {
    /// The blob was mounted from another repository: nothing to send.
    Mounted,
    /// An upload session; its location (path and query on the registry).
    Session(String),
}

fn push_scope(repo: &RepoName) -> String {
    format!("repository:{repo}:pull,push")
}

impl UpstreamClient {
    /// Turns a `Location` into a path and query on this registry. A
    /// location on another host is refused: credentials are only sent to
    /// the configured registry.
    fn location(
        &self,
        resp: &http::Response<hyper::body::Incoming>,
    ) -> Result<String, UpstreamError> {
        let loc = header_str(resp, LOCATION)
            .ok_or_else(|| UpstreamError::Protocol("upload response without Location".into()))?;
        let uri: http::Uri = loc
            .parse()
            .map_err(|e| UpstreamError::Protocol(format!("bad upload Location {loc:?}: {e}")))?;
        if let Some(authority) = uri.authority()
            && Some(authority) != self.inner.base.authority()
        {
            return Err(UpstreamError::Protocol(format!(
                "upload Location {loc:?} is on another host"
            )));
        }
        let pq = uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default();
        if !pq.starts_with('/') {
            return Err(UpstreamError::Protocol(format!(
                "upload Location {loc:?} is not an absolute path"
            )));
        }
        Ok(pq)
    }

    /// `HEAD` of a blob in `repo`: its size, or `None` when it is not there.
    pub async fn blob_size_if_present(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<u64>, UpstreamError> {
        let op = Op::new(
            Method::HEAD,
            format!("/v2/{repo}/blobs/{digest}"),
            Some(push_scope(repo)),
        );
        let r = self
            .inner
            .with_retries(&op, || async {
                let resp = self.inner.execute(&op).await?;
                let size = super::content_length(&resp)?.unwrap_or(0);
                client::drain(resp.into_body(), self.inner.read_timeout()).await;
                Ok(size)
            })
            .await;
        match r {
            Ok(size) => Ok(Some(size)),
            Err(UpstreamError::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `HEAD` of a manifest: the digest it has there, or `None`.
    pub async fn manifest_digest_if_present(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<Digest>, UpstreamError> {
        let op = Op::new(
            Method::HEAD,
            format!("/v2/{repo}/manifests/{reference}"),
            Some(push_scope(repo)),
        )
        .header(ACCEPT, MANIFEST_TYPES);
        let r = self
            .inner
            .with_retries(&op, || async {
                let resp = self.inner.execute(&op).await?;
                let digest = header_digest(&resp)?;
                client::drain(resp.into_body(), self.inner.read_timeout()).await;
                Ok(digest)
            })
            .await;
        match (r, reference) {
            (Ok(Some(d)), _) => Ok(Some(d)),
            (Ok(None), Reference::Digest(d)) => Ok(Some(d.clone())),
            (Ok(None), Reference::Tag(_)) => Err(UpstreamError::Protocol(
                "manifest HEAD by tag without Docker-Content-Digest".into(),
            )),
            (Err(UpstreamError::NotFound), _) => Ok(None),
            (Err(e), _) => Err(e),
        }
    }

    /// Opens an upload session in `repo`, or mounts `digest` from another
    /// repository of the same registry when `mount_from` is given and the
    /// registry can (a registry that cannot opens a session instead).
    pub async fn start_upload(
        &self,
        repo: &RepoName,
        mount: Option<(&Digest, &RepoName)>,
    ) -> Result<UploadStart, UpstreamError> {
        let mut path = format!("/v2/{repo}/blobs/uploads/");
        if let Some((digest, from)) = mount {
            path.push_str(&format!(
                "?mount={digest}&from={}",
                super::query_value(from.as_str())
            ));
        }
        let op = Op::new(Method::POST, path, Some(push_scope(repo)));
        self.inner
            .with_retries(&op, || async {
                let resp = self.inner.execute(&op).await?;
                let status = resp.status().as_u16();
                let out = match status {
                    201 => UploadStart::Mounted,
                    202 => UploadStart::Session(self.location(&resp)?),
                    s => {
                        return Err(UpstreamError::Protocol(format!(
                            "unexpected status {s} opening an upload"
                        ))
                        .into());
                    }
                };
                client::drain(resp.into_body(), self.inner.read_timeout()).await;
                Ok(out)
            })
            .await
    }

    /// The number of bytes an upload session holds (`GET` of its
    /// location, `Range: 0-<last>`), or `None` when the session is gone.
    pub async fn upload_offset(
        &self,
        repo: &RepoName,
        location: &str,
    ) -> Result<Option<u64>, UpstreamError> {
        let op = Op::new(Method::GET, location.to_string(), Some(push_scope(repo)));
        let r = self
            .inner
            .with_retries(&op, || async {
                let resp = self.inner.execute(&op).await?;
                let range = header_str(&resp, http::header::RANGE).map(str::to_string);
                client::drain(resp.into_body(), self.inner.read_timeout()).await;
                Ok(range)
            })
            .await;
        match r {
            // "0-0" is ambiguous (Distribution answers it for 0 and 1
            // byte): reading it as 0 is safe, a wrong guess is refused by
            // the registry and the caller starts over.
            Ok(Some(range)) => Ok(Some(parse_upload_range(&range)?)),
            Ok(None) => Ok(Some(0)),
            Err(UpstreamError::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `PATCH` of `len` bytes at `start` of an upload session. Returns the
    /// session's next location. Sent once (see the module documentation).
    pub async fn upload_chunk(
        &self,
        repo: &RepoName,
        location: &str,
        start: u64,
        len: u64,
        body: ByteStream,
    ) -> Result<String, UpstreamError> {
        let end = (start + len).saturating_sub(1);
        let op = Op::new(Method::PATCH, location.to_string(), Some(push_scope(repo)))
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(http::header::CONTENT_RANGE, &format!("{start}-{end}"));
        let resp = self
            .inner
            .execute_stream(&op, body, len)
            .await
            .map_err(|f| f.error)?;
        let next = self.location(&resp)?;
        client::drain(resp.into_body(), self.inner.read_timeout()).await;
        Ok(next)
    }

    /// Closes an upload session with `PUT ?digest=`: the registry verifies
    /// the bytes it holds against `digest`.
    pub async fn finish_upload(
        &self,
        repo: &RepoName,
        location: &str,
        digest: &Digest,
    ) -> Result<(), UpstreamError> {
        let sep = if location.contains('?') { '&' } else { '?' };
        let op = Op::new(
            Method::PUT,
            format!("{location}{sep}digest={digest}"),
            Some(push_scope(repo)),
        )
        .header(CONTENT_TYPE, "application/octet-stream");
        self.inner
            .with_retries(&op, || async {
                let resp = self.inner.execute(&op).await?;
                client::drain(resp.into_body(), self.inner.read_timeout()).await;
                Ok(())
            })
            .await
    }

    /// Abandons an upload session (best effort).
    pub async fn cancel_upload(&self, repo: &RepoName, location: &str) {
        let op = Op::new(Method::DELETE, location.to_string(), Some(push_scope(repo)));
        if let Ok(resp) = self.inner.execute(&op).await {
            client::drain(resp.into_body(), self.inner.read_timeout()).await;
        }
    }

    /// `PUT` of a manifest by digest or tag. Returns the digest the
    /// registry reports (or the reference's, or the body's sha256).
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        media_type: &str,
        body: Bytes,
    ) -> Result<Digest, UpstreamError> {
        let op = Op::new(
            Method::PUT,
            format!("/v2/{repo}/manifests/{reference}"),
            Some(push_scope(repo)),
        )
        .header(CONTENT_TYPE, media_type)
        .body(body.clone());
        self.inner
            .with_retries(&op, || async {
                let resp = self.inner.execute(&op).await?;
                let reported = header_digest(&resp)?;
                client::drain(resp.into_body(), self.inner.read_timeout()).await;
                Ok(match (reported, reference) {
                    (Some(d), _) => d,
                    (None, Reference::Digest(d)) => d.clone(),
                    (None, Reference::Tag(_)) => Digest::sha256_of(&body),
                })
            })
            .await
    }
}

/// `0-<last>` → the number of bytes held (`last + 1`; `0-0` reads as 0).
fn parse_upload_range(v: &str) -> Result<u64, UpstreamError> {
    let bad = || UpstreamError::Protocol(format!("bad upload Range {v:?}"));
    let v = v.trim();
    let v = v.strip_prefix("bytes=").unwrap_or(v);
    let (start, end) = v.split_once('-').ok_or_else(bad)?;
    let start: u64 = start.trim().parse().map_err(|_| bad())?;
    let end: u64 = end.trim().parse().map_err(|_| bad())?;
    if start != 0 || end < start {
        return Err(bad());
    }
    Ok(if end == 0 { 0 } else { end + 1 })
}

#[cfg(test)]
mod tests {
    use super::parse_upload_range;

    #[test]
    fn upload_ranges() {
        assert_eq!(parse_upload_range("0-0").unwrap(), 0);
        assert_eq!(parse_upload_range("0-99").unwrap(), 100);
        assert_eq!(parse_upload_range("bytes=0-9").unwrap(), 10);
        for bad in ["", "5-9", "0-", "x-1", "0--1"] {
            assert!(parse_upload_range(bad).is_err(), "{bad}");
        }
    }
}
