//! The one mapping from domain errors to the spec's error codes and HTTP
//! statuses.

use http::{HeaderValue, StatusCode, header};

use super::{Resp, empty, full};
use crate::oci::ErrorCode;
use crate::oci::error::error_body;
use crate::registry::{Missing, RegistryError};

/// An error response in the spec's JSON format.
pub fn error_response(status: StatusCode, code: ErrorCode, message: &str) -> Resp {
    let mut r = http::Response::new(full(error_body(code, message)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Maps every [`RegistryError`] onto a status and a spec code. Internal
/// failures are logged here and reported without their details.
pub fn registry_error(e: &RegistryError) -> Resp {
    use RegistryError as E;
    let (status, code) = match e {
        E::BlobUnknown => (StatusCode::NOT_FOUND, ErrorCode::BlobUnknown),
        E::ManifestUnknown | E::ManifestNotAcceptable(_) => {
            (StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown)
        }
        E::NameUnknown | E::NameUnknownWhy(_) => (StatusCode::NOT_FOUND, ErrorCode::NameUnknown),
        E::UploadUnknown => (StatusCode::NOT_FOUND, ErrorCode::BlobUploadUnknown),
        E::DigestInvalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid),
        E::ManifestInvalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::ManifestInvalid),
        E::ManifestTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::ManifestInvalid),
        E::ManifestBlobUnknown(_) => (StatusCode::BAD_REQUEST, ErrorCode::ManifestBlobUnknown),
        E::SizeInvalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::SizeInvalid),
        E::UploadInvalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::BlobUploadInvalid),
        E::ChunkOutOfOrder { current } => {
            let mut r = error_response(
                StatusCode::RANGE_NOT_SATISFIABLE,
                ErrorCode::BlobUploadInvalid,
                &e.to_string(),
            );
            r.headers_mut()
                .insert(header::RANGE, range_header(*current));
            return r;
        }
        E::RangeNotSatisfiable { size } => {
            let mut r = error_response(
                StatusCode::RANGE_NOT_SATISFIABLE,
                ErrorCode::SizeInvalid,
                &format!("requested range is beyond the blob's {size} bytes"),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
        E::Unsupported(_) => (StatusCode::METHOD_NOT_ALLOWED, ErrorCode::Unsupported),
        E::ParamInvalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::Unsupported),
        E::NameInvalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::NameInvalid),
        E::Denied(_) => (StatusCode::FORBIDDEN, ErrorCode::Denied),
        E::TooManyRequests(_) => (StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyRequests),
        // Not found upstream, or upstream failing with nothing cached: a 404
        // with the reason, so that mirror clients fall back to the next host.
        E::Upstream { what, message } => {
            tracing::info!(%message, "pull-through miss could not be served");
            let code = match what {
                Missing::Manifest => ErrorCode::ManifestUnknown,
                Missing::Blob => ErrorCode::BlobUnknown,
                Missing::Name => ErrorCode::NameUnknown,
            };
            (StatusCode::NOT_FOUND, code)
        }
        E::Body(err) => {
            tracing::info!(error = %err, "request body failed");
            (StatusCode::BAD_REQUEST, ErrorCode::BlobUploadInvalid)
        }
        E::Storage(err) => {
            tracing::error!(error = %err, "storage failure");
            return internal_error();
        }
    };
    error_response(status, code, &e.to_string())
}

/// 500 with no spec code in the body (the spec defines none for it).
pub fn internal_error() -> Resp {
    let mut r = http::Response::new(empty());
    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    r
}

/// `Range: 0-<end>` for an upload of `size` bytes (`0-0` when empty, as
/// Distribution and the spec's examples use).
pub fn range_header(size: u64) -> HeaderValue {
    let end = size.saturating_sub(1);
    HeaderValue::from_str(&format!("0-{end}")).expect("ascii")
}
