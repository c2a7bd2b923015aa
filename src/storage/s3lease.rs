//! Cluster-wide fills over the bucket: one replica at a time holds the
//! lease of a digest and fetches it from upstream, publishing the growing
//! blob as parts; the other replicas stream those parts to their own
//! clients instead of asking upstream. A lease whose holder stops renewing
//! it expires, and the next replica takes it over, resuming from the bytes
//! it already has.
//!
//! Keys under the prefix: `fills/<algorithm>-<hex>/lease` (JSON: holder,
//! expiry, total size once known) and `fills/<algorithm>-<hex>/<offset, 20
//! digits>` (the parts, each written once: create-only). Leases are taken and renewed by
//! conditional writes; their expiry is wall-clock time, which is what
//! replicas on different machines share.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{
    GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    UpdateVersion,
};
use serde::{Deserialize, Serialize};

use super::s3::{Keys, os_err};
use super::{FillLeases, LeaseState, Result, StorageError};
use crate::oci::Digest;

/// Largest piece read from a published blob at once.
const PART: usize = 8 * 1024 * 1024;

#[derive(Serialize, Deserialize)]
struct Lease {
    holder: String,
    /// Unix milliseconds.
    expires: u64,
    total: Option<u64>,
}

/// Time a lease must still have for its holder to delete its objects.
const RELEASE_MARGIN_MS: u64 = 250;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub struct S3Leases {
    store: Arc<dyn ObjectStore>,
    keys: Keys,
}

impl S3Leases {
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str) -> S3Leases {
        S3Leases {
            store,
            keys: Keys::new(prefix),
        }
    }

    fn dir(&self, d: &Digest) -> String {
        format!("fills/{}-{}", d.algorithm().as_str(), d.hex())
    }

    fn lease_key(&self, d: &Digest) -> Path {
        self.keys.path(&format!("{}/lease", self.dir(d)))
    }

    fn part_key(&self, d: &Digest, offset: u64) -> Path {
        self.keys.path(&format!("{}/{offset:020}", self.dir(d)))
    }

    async fn read_lease(&self, d: &Digest) -> Result<Option<(Lease, UpdateVersion)>> {
        match self
            .store
            .get_opts(&self.lease_key(d), GetOptions::default())
            .await
        {
            Ok(r) => {
                let v = UpdateVersion {
                    e_tag: r.meta.e_tag.clone(),
                    version: r.meta.version.clone(),
                };
                let body = r.bytes().await.map_err(os_err)?;
                let lease: Lease =
                    serde_json::from_slice(&body).map_err(|e| StorageError::Meta(e.to_string()))?;
                Ok(Some((lease, v)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(os_err(e)),
        }
    }

    async fn write_lease(&self, d: &Digest, lease: &Lease, mode: PutMode) -> Result<bool> {
        let body = serde_json::to_vec(lease).map_err(|e| StorageError::Meta(e.to_string()))?;
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.lease_key(d), PutPayload::from(body), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(os_err(e)),
        }
    }
}

impl S3Leases {
    /// The bytes from `offset` to the end of the part that holds it.
    async fn inside_part(&self, d: &Digest, offset: u64) -> Result<Option<Bytes>> {
        let dir = self.keys.path(&self.dir(d));
        let objects: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(os_err)?;
        let holder = objects.iter().find_map(|o| {
            let start: u64 = o.location.filename()?.parse().ok()?;
            (start < offset && offset < start + o.size).then(|| (o.location.clone(), start, o.size))
        });
        let Some((key, start, size)) = holder else {
            return Ok(None);
        };
        let opts = GetOptions {
            range: Some(GetRange::Bounded(offset - start..size)),
            ..Default::default()
        };
        match self.store.get_opts(&key, opts).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(os_err)?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(os_err(e)),
        }
    }
}

#[async_trait]
impl FillLeases for S3Leases {
    async fn acquire(&self, digest: &Digest, holder: &str, ttl: Duration) -> Result<LeaseState> {
        loop {
            let mine = Lease {
                holder: holder.to_string(),
                expires: now_ms() + ttl.as_millis() as u64,
                total: None,
            };
            match self.read_lease(digest).await? {
                None => {
                    if self.write_lease(digest, &mine, PutMode::Create).await? {
                        return Ok(LeaseState::Ours);
                    }
                }
                Some((l, _)) if l.holder == holder => return Ok(LeaseState::Ours),
                Some((l, v)) if l.expires < now_ms() => {
                    // Its holder stopped renewing it: take it over, keeping
                    // the size it learnt.
                    let mine = Lease {
                        total: l.total,
                        ..mine
                    };
                    if self.write_lease(digest, &mine, PutMode::Update(v)).await? {
                        return Ok(LeaseState::Ours);
                    }
                }
                Some((l, _)) => return Ok(LeaseState::Theirs { total: l.total }),
            }
        }
    }

    async fn renew(
        &self,
        digest: &Digest,
        holder: &str,
        ttl: Duration,
        total: Option<u64>,
    ) -> Result<bool> {
        let Some((l, v)) = self.read_lease(digest).await? else {
            return Ok(false);
        };
        if l.holder != holder {
            return Ok(false);
        }
        let renewed = Lease {
            holder: holder.to_string(),
            expires: now_ms() + ttl.as_millis() as u64,
            total: total.or(l.total),
        };
        self.write_lease(digest, &renewed, PutMode::Update(v)).await
    }

    async fn state(&self, digest: &Digest) -> Result<Option<(bool, Option<u64>)>> {
        Ok(self
            .read_lease(digest)
            .await?
            .map(|(l, _)| (l.expires >= now_ms(), l.total)))
    }

    async fn put_part(&self, digest: &Digest, offset: u64, bytes: Bytes) -> Result<bool> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(
                &self.part_key(digest, offset),
                PutPayload::from(bytes),
                opts,
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(os_err(e)),
        }
    }

    async fn part(&self, digest: &Digest, offset: u64) -> Result<Option<(Bytes, Option<u64>)>> {
        match self.store.get(&self.part_key(digest, offset)).await {
            Ok(r) => return Ok(Some((r.bytes().await.map_err(os_err)?, None))),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(os_err(e)),
        }
        // Inside a part (a holder that lost its lease follows from where
        // its own bytes end, which need not be where a part starts).
        if offset > 0
            && let Some(b) = self.inside_part(digest, offset).await?
        {
            return Ok(Some((b, None)));
        }
        // The holder published the blob and removed its parts: the rest
        // comes from the blob itself.
        let blob = self.keys.path(&format!(
            "blobs/{}/{}",
            digest.algorithm().as_str(),
            digest.hex()
        ));
        let opts = GetOptions {
            range: Some(GetRange::Bounded(offset..offset + PART as u64)),
            ..Default::default()
        };
        match self.store.get_opts(&blob, opts).await {
            Ok(r) => {
                let size = r.meta.size;
                Ok(Some((r.bytes().await.map_err(os_err)?, Some(size))))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            // Past the end (416) or not there yet.
            Err(_) => Ok(None),
        }
    }

    async fn release(&self, digest: &Digest, holder: &str) -> Result<()> {
        // Only a holder whose lease stands (with time to spare for the
        // deletes) removes anything: a lease already gone was released, and
        // an expired one may be another replica's by the time the deletes
        // land. Parts left behind are read by the next holder, not fetched
        // again.
        match self.read_lease(digest).await? {
            Some((l, _)) if l.holder == holder && l.expires >= now_ms() + RELEASE_MARGIN_MS => {}
            _ => return Ok(()),
        }
        let dir = self.keys.path(&self.dir(digest));
        let objects: Vec<_> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(os_err)?;
        for o in objects {
            match self.store.delete(&o.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(os_err(e)),
            }
        }
        Ok(())
    }
}
