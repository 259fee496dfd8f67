//! gryt-agent: runs Gryt CI jobs in hardened, ephemeral Docker containers.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library; see ARCHITECTURE.md for the map.

pub mod agent;
pub mod api;
pub mod checkout;
pub mod config;
pub mod executor;
pub mod metrics;
pub mod pipeline;
pub mod pull;
pub mod push;
pub mod secrets;
pub mod server;
pub mod slots;
pub mod wire;

/// The agent's version, as reported on `/`, `/health` and in `User-Agent`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
