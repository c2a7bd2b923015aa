//! wharf: an OCI registry, pull-through cache and replication daemon.
// One exception, with its justification: the mapped reads of published
// blobs in `storage::fs`.
#![deny(unsafe_code)]

pub mod api;
pub mod cache;
pub mod cli;
pub mod config;
pub mod metrics;
pub mod oci;
pub mod registry;
pub mod replication;
pub mod storage;
pub mod upstream;
