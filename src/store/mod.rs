//! Artifacts and caches on S3-compatible object storage (AWS S3, MinIO, Garage, Ceph, R2).
//!
//! `spec` holds the pure rules (paths, keys, cache scopes); the rest runs with the `runtime`
//! feature: the client (`client.rs`: settings to an `object_store` S3 client, locations under
//! the prefix), streaming transfers with bounded memory (`transfer.rs`: multipart uploads whose
//! parts are retried on their own), picking files in a workspace without following links
//! (`select.rs`), cache archives (`archive.rs`: tar + zstd, unpacked only inside the
//! workspace), and the two calls the executor makes around a job's steps (`job.rs`).

pub mod spec;

#[cfg(feature = "runtime")]
mod archive;
#[cfg(feature = "runtime")]
mod client;
#[cfg(feature = "runtime")]
mod job;
#[cfg(feature = "runtime")]
mod select;
#[cfg(feature = "runtime")]
mod transfer;

#[cfg(feature = "runtime")]
pub use client::{Store, StoreError, secrets};
#[cfg(feature = "runtime")]
pub use job::{JobEnd, JobStorage};
