//! The S3 backend on a real SeaweedFS spawned by each test: the storage
//! conformance suite, conditional writes, and several wharf replicas over
//! one bucket (push on one and pull on another, tag races, uploads moving
//! between replicas, a replica killed mid-upload).

mod common;

use std::sync::Arc;

use common::seaweedfs::SeaweedFs;
use wharf::storage::conformance;
use wharf::storage::s3::{S3Fills, S3Store};
use wharf::storage::s3meta::S3Meta;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_conformance_on_seaweedfs() {
    let sw = SeaweedFs::start().await;
    let scratch = tempfile::tempdir().unwrap();
    let client = sw.object_store();
    let store = Arc::new(
        S3Store::new(client.clone(), "conformance", scratch.path().to_path_buf()).unwrap(),
    );
    conformance::blob_store_suite(store.clone(), store.clone()).await;
    conformance::fill_store_suite(Arc::new(S3Fills(store.clone())), store.clone()).await;
    conformance::meta_store_suite(Arc::new(S3Meta::new(client, "conformance"))).await;
}
