//! The executor: turns a [`JobSpec`] into an ephemeral, hardened container and a [`JobResult`].
//!
//! One executor serves every mode (exec, push, pull). It never fails as a function: whatever
//! happens (bad pipeline, missing image, Docker gone, timeout, cancel) comes back as a result
//! with a status. It knows nothing of HTTP or the API; modes observe a job through
//! [`JobObserver`] and stop it through [`JobControl`].

// Pure parts, also built without the `runtime` feature (the fuzz targets use them).
pub mod capture;
pub mod limits;
/// The job network pool's rules live with the settings that check it at load.
pub use crate::config::pool;

#[cfg(feature = "runtime")]
mod adopt;
#[cfg(feature = "runtime")]
mod cleanup;
#[cfg(feature = "runtime")]
pub mod command;
#[cfg(feature = "runtime")]
pub mod container;
#[cfg(feature = "runtime")]
pub mod control;
#[cfg(feature = "runtime")]
mod docker;
#[cfg(feature = "runtime")]
pub mod exec_owner;
#[cfg(feature = "runtime")]
// Named for the type it holds, the executor's face; its module doc says what it must not do.
#[allow(clippy::module_inception)]
mod executor;
#[cfg(feature = "runtime")]
pub mod image;
#[cfg(feature = "runtime")]
mod job;
#[cfg(feature = "runtime")]
pub mod metadata_guard;
#[cfg(feature = "runtime")]
pub mod network;
#[cfg(feature = "runtime")]
mod observer;
#[cfg(feature = "runtime")]
mod output;
#[cfg(feature = "runtime")]
mod plan;
#[cfg(feature = "runtime")]
pub mod resume;
#[cfg(feature = "runtime")]
mod services;
#[cfg(feature = "runtime")]
mod steps;
#[cfg(feature = "runtime")]
pub mod warm;
#[cfg(feature = "runtime")]
pub mod workspace;

#[cfg(feature = "runtime")]
pub use cleanup::{CLEANUP_LIMIT, Cleanup};
#[cfg(feature = "runtime")]
pub use container::OutputStream;
#[cfg(feature = "runtime")]
pub use control::{JobControl, StopKind, StopRequest};
#[cfg(feature = "runtime")]
pub use docker::connect;
#[cfg(feature = "runtime")]
pub use executor::{Executor, ExecutorError, ExecutorSettings};
#[cfg(feature = "runtime")]
pub use observer::{Discard, JobEvent, JobObserver};
#[cfg(feature = "runtime")]
pub use resume::Resume;
