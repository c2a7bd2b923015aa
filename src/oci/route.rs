//! Maps a request path onto one of the API's routes, parsing every path
//! parameter into its type. Unparseable parameters are errors, never strings
//! passed further in.

use super::digest::Digest;
use super::error::ErrorCode;
use super::name::{Reference, RepoName, UploadId};

/// One endpoint of the distribution API (the method is matched by the API layer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`
    Base,
    /// `/v2/_catalog`
    Catalog,
    /// `/v2/<name>/manifests/<reference>`
    Manifest {
        name: RepoName,
        reference: Reference,
    },
    /// `/v2/<name>/blobs/<digest>`
    Blob { name: RepoName, digest: Digest },
    /// `/v2/<name>/blobs/uploads/`
    UploadStart { name: RepoName },
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload { name: RepoName, id: UploadId },
    /// `/v2/<name>/tags/list`
    TagsList { name: RepoName },
    /// `/v2/<name>/referrers/<digest>`
    Referrers { name: RepoName, digest: Digest },
}

/// Why a path is not a valid route; each maps onto a spec error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteError {
    pub code: ErrorCode,
    pub message: String,
}

impl RouteError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        RouteError {
            code,
            message: message.into(),
        }
    }
}

fn name_of(segments: &[&str]) -> Result<RepoName, RouteError> {
    let joined = segments.join("/");
    joined.parse().map_err(|e| {
        RouteError::new(
            ErrorCode::NameInvalid,
            format!("invalid repository name: {e}"),
        )
    })
}

fn digest_of(s: &str) -> Result<Digest, RouteError> {
    s.parse()
        .map_err(|e| RouteError::new(ErrorCode::DigestInvalid, format!("invalid digest: {e}")))
}

impl Route {
    /// Parses a raw (still percent-encoded) request path.
    pub fn parse(path: &str) -> Result<Route, RouteError> {
        let not_found = || RouteError::new(ErrorCode::NameUnknown, "no such endpoint");
        let rest = match path.strip_prefix("/v2") {
            Some("") | Some("/") => return Ok(Route::Base),
            Some(r) => r.strip_prefix('/').ok_or_else(not_found)?,
            None => return Err(not_found()),
        };
        if rest == "_catalog" {
            return Ok(Route::Catalog);
        }
        let seg: Vec<&str> = rest.split('/').collect();
        let n = seg.len();
        if n >= 3 && seg[n - 2] == "tags" && seg[n - 1] == "list" {
            return Ok(Route::TagsList {
                name: name_of(&seg[..n - 2])?,
            });
        }
        // `.../blobs/uploads/` (trailing slash) or `.../blobs/uploads`.
        if n >= 4 && seg[n - 1].is_empty() && seg[n - 2] == "uploads" && seg[n - 3] == "blobs" {
            return Ok(Route::UploadStart {
                name: name_of(&seg[..n - 3])?,
            });
        }
        if n >= 3 && seg[n - 1] == "uploads" && seg[n - 2] == "blobs" {
            return Ok(Route::UploadStart {
                name: name_of(&seg[..n - 2])?,
            });
        }
        if n >= 4 && seg[n - 2] == "uploads" && seg[n - 3] == "blobs" {
            let name = name_of(&seg[..n - 3])?;
            let id = seg[n - 1]
                .parse()
                .map_err(|_| RouteError::new(ErrorCode::BlobUploadUnknown, "unknown upload id"))?;
            return Ok(Route::Upload { name, id });
        }
        if n >= 3 {
            let last = seg[n - 1];
            match seg[n - 2] {
                "manifests" => {
                    let name = name_of(&seg[..n - 2])?;
                    let reference = last.parse().map_err(|e| match e {
                        super::name::ReferenceError::Digest(e) => RouteError::new(
                            ErrorCode::DigestInvalid,
                            format!("invalid digest: {e}"),
                        ),
                        super::name::ReferenceError::Tag(e) => {
                            RouteError::new(ErrorCode::ManifestInvalid, format!("invalid tag: {e}"))
                        }
                    })?;
                    return Ok(Route::Manifest { name, reference });
                }
                "blobs" => {
                    return Ok(Route::Blob {
                        name: name_of(&seg[..n - 2])?,
                        digest: digest_of(last)?,
                    });
                }
                "referrers" => {
                    return Ok(Route::Referrers {
                        name: name_of(&seg[..n - 2])?,
                        digest: digest_of(last)?,
                    });
                }
                _ => {}
            }
        }
        Err(not_found())
    }

    /// The repository a route addresses, if any.
    pub fn name(&self) -> Option<&RepoName> {
        match self {
            Route::Base | Route::Catalog => None,
            Route::Manifest { name, .. }
            | Route::Blob { name, .. }
            | Route::UploadStart { name }
            | Route::Upload { name, .. }
            | Route::TagsList { name }
            | Route::Referrers { name, .. } => Some(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D: &str = "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4";

    #[test]
    fn routes() {
        assert_eq!(Route::parse("/v2/").unwrap(), Route::Base);
        assert_eq!(Route::parse("/v2").unwrap(), Route::Base);
        assert_eq!(Route::parse("/v2/_catalog").unwrap(), Route::Catalog);
        let r = Route::parse("/v2/a/manifests/b/manifests/latest").unwrap();
        assert!(
            matches!(r, Route::Manifest { ref name, reference: Reference::Tag(ref t) } if name.as_str() == "a/manifests/b" && t.as_str() == "latest")
        );
        let r = Route::parse(&format!("/v2/a/manifests/blobs/{D}")).unwrap();
        assert!(matches!(r, Route::Blob { ref name, .. } if name.as_str() == "a/manifests"));
        assert!(matches!(
            Route::parse("/v2/x/y/blobs/uploads/").unwrap(),
            Route::UploadStart { .. }
        ));
        assert!(matches!(
            Route::parse("/v2/x/blobs/uploads").unwrap(),
            Route::UploadStart { .. }
        ));
        assert!(matches!(
            Route::parse("/v2/x/blobs/uploads/0b5c-11").unwrap(),
            Route::Upload { .. }
        ));
        assert!(matches!(
            Route::parse("/v2/x/tags/list").unwrap(),
            Route::TagsList { .. }
        ));
        assert!(matches!(
            Route::parse(&format!("/v2/x/referrers/{D}")).unwrap(),
            Route::Referrers { .. }
        ));
    }

    #[test]
    fn rejects_traversal_and_bad_params() {
        let code = |p: &str| Route::parse(p).unwrap_err().code;
        assert_eq!(code("/v2/../etc/manifests/latest"), ErrorCode::NameInvalid);
        assert_eq!(code("/v2/a%2Fb/manifests/latest"), ErrorCode::NameInvalid);
        assert_eq!(
            code("/v2/a/%2e%2e/manifests/latest"),
            ErrorCode::NameInvalid
        );
        assert_eq!(code("/v2/A/tags/list"), ErrorCode::NameInvalid);
        assert_eq!(code("/v2/a/blobs/sha256:xyz"), ErrorCode::DigestInvalid);
        assert_eq!(code("/v2/a/manifests/sha256:XYZ"), ErrorCode::DigestInvalid);
        assert_eq!(code("/v2/a/manifests/-bad"), ErrorCode::ManifestInvalid);
        assert_eq!(
            code("/v2/a/blobs/uploads/..%2F.."),
            ErrorCode::BlobUploadUnknown
        );
        assert_eq!(code("/v3/a/tags/list"), ErrorCode::NameUnknown);
        assert_eq!(code("/v2/a/unknown/x"), ErrorCode::NameUnknown);
    }

    proptest! {
        #[test]
        fn manifest_route_round_trip(name in "[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,3}", tag in "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,20}") {
            let r = Route::parse(&format!("/v2/{name}/manifests/{tag}")).unwrap();
            match r {
                Route::Manifest { name: n, reference } => {
                    prop_assert_eq!(n.as_str(), name.as_str());
                    prop_assert_eq!(reference.to_string(), tag);
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }

        #[test]
        fn never_panics(p in "/v2/[a-z/._%:0-9-]{0,80}") {
            let _ = Route::parse(&p);
        }
    }
}
