//! Pure OCI types with no I/O: digests, names, references, media types,
//! manifest parsing, the spec's error codes, routes and range headers.
//!
//! Everything here is built through `FromStr`/`TryFrom` and rejects
//! non-canonical input instead of normalising it.

pub mod digest;
pub mod error;
pub mod manifest;
pub mod name;
pub mod range;
pub mod route;

pub use digest::{Algorithm, Digest, Hasher};
pub use error::ErrorCode;
pub use manifest::{Descriptor, Manifest, ManifestKind, MediaType};
pub use name::{Reference, RepoName, Tag, UploadId};
pub use range::{ByteRange, UploadRange};
pub use route::Route;

/// Largest page of tags, repositories or referrers served at once.
pub const MAX_PAGE: usize = 10_000;

/// A stream of bytes, as read from a blob, received from a client or from
/// another registry.
pub type ByteStream = futures::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>;
