//! gryt-agent: runs Gryt CI jobs in hardened, ephemeral Docker containers.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library; see ARCHITECTURE.md for the map.
//! Without the default `runtime` feature only the pure modules are built (wire types, pipelines,
//! secrets, settings, units, output capture): what the fuzz targets need, without Docker, HTTP
//! or git.

#[cfg(feature = "runtime")]
pub mod agent;
#[cfg(feature = "runtime")]
pub mod api;
#[cfg(feature = "runtime")]
pub mod checkout;
pub mod config;
#[cfg(feature = "runtime")]
pub mod conformance;
pub mod executor;
#[cfg(feature = "runtime")]
pub mod gc;
#[cfg(feature = "runtime")]
pub mod metrics;
pub mod pipeline;
#[cfg(feature = "runtime")]
pub mod pull;
#[cfg(feature = "runtime")]
pub mod push;
pub mod secrets;
#[cfg(feature = "runtime")]
pub mod server;
#[cfg(feature = "runtime")]
pub mod state;
pub mod store;
pub mod units;
pub mod wire;

/// The agent's version, as reported on `/`, `/health` and in `User-Agent`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
