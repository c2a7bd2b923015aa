//! Re-hashing every stored blob (`wharf fsck`, offline or through a running
//! server): a blob whose bytes do not hash to its digest is quarantined.

use std::sync::Arc;

use futures::{Stream, StreamExt};

use super::{BlobStore, Result};
use crate::oci::Digest;

/// What re-hashing one blob found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub digest: Digest,
    /// `Some(hash of the bytes)` when they did not match: the blob was
    /// quarantined.
    pub corrupt: Option<Digest>,
}

/// Re-hashes every blob of `store`, one at a time, quarantining those that
/// do not match; one item per blob. Stops at the first storage error.
pub fn check_all(store: Arc<dyn BlobStore>) -> impl Stream<Item = Result<Checked>> {
    futures::stream::once(async move {
        let digests = match store.list().await {
            Ok(d) => d,
            Err(e) => return futures::stream::iter(vec![Err(e)]).left_stream(),
        };
        futures::stream::iter(digests)
            .then(move |digest| {
                let store = store.clone();
                async move { check_one(&*store, digest).await }
            })
            .right_stream()
    })
    .flatten()
}

async fn check_one(store: &dyn BlobStore, digest: Digest) -> Result<Checked> {
    let mut stream = store.read(&digest, None).await?;
    let mut hasher = digest.algorithm().hasher();
    while let Some(chunk) = stream.next().await {
        hasher.update(&chunk?);
    }
    let computed = hasher.finish();
    if computed == digest {
        return Ok(Checked {
            digest,
            corrupt: None,
        });
    }
    store.quarantine(&digest).await?;
    Ok(Checked {
        digest,
        corrupt: Some(computed),
    })
}
