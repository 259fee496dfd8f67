//! The pull protocol's client: the only place that talks to the main API.
//!
//! One method per call of the v1 contract (`docs/protocol.md`), each with a typed outcome; the
//! lease-lost answers (404/409/410) are outcomes, not errors. Transient failures (network, 408,
//! 429, 5xx) are retried inside each call without end, so callers bound a call by racing it
//! against their own deadline or stop signal. This module never decides what to do with a job.

pub(crate) mod client;
pub mod endpoint;
pub mod retry;

pub use client::{ApiClient, CallHooks, MAX_ANSWER, MAX_LEASE_ANSWER};

/// The calls of the protocol, for metrics and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Lease,
    Start,
    Heartbeat,
    Logs,
    Complete,
}

impl Call {
    pub fn as_str(self) -> &'static str {
        match self {
            Call::Lease => "lease",
            Call::Start => "start",
            Call::Heartbeat => "heartbeat",
            Call::Logs => "logs",
            Call::Complete => "complete",
        }
    }
}

/// `POST /lease`.
#[derive(Debug)]
pub enum LeaseOutcome {
    Job(Box<crate::wire::pull::Lease>),
    /// 204: no job within the long poll.
    NoJob,
    /// 200 whose job does not decode, but whose lease and job id do.
    Unreadable(Box<UnreadableLease>),
}

/// A leased job the agent cannot read: it is started and completed with `error`, saying why.
#[derive(Debug, Clone)]
pub struct UnreadableLease {
    pub lease_id: String,
    pub lease_ttl_seconds: u64,
    pub job_id: i64,
    /// Why the job does not decode.
    pub error: String,
}

/// `POST /jobs/{id}/start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartOutcome {
    Started,
    /// 404/409/410: the lease is not held; the job must not run.
    NotHeld(u16),
}

/// `POST /jobs/{id}/heartbeat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatOutcome {
    Renewed {
        cancel: bool,
        lease_ttl_seconds: u64,
    },
    /// 404/409/410.
    Lost(u16),
}

/// `POST /jobs/{id}/logs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogsOutcome {
    /// The server holds this many bytes of the log.
    Committed(u64),
    /// 404/409/410.
    Lost(u16),
}

/// `POST /jobs/{id}/complete`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompleteOutcome {
    Accepted,
    /// 404/409/410: the result will not be taken; forget it.
    LeaseLost(u16),
}

/// Why a call could not be made or was refused for good. Never contains the API key.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid api_url: {0}")]
    Url(String),
    #[error("invalid ca_file {path}: {message}")]
    Ca { path: String, message: String },
    #[error("the API key contains characters that cannot go in an HTTP header")]
    Key,
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error(
        "the API refused this agent's key ({status} on {call}): check AGENT_API_KEY: {message}"
    )]
    Unauthorized {
        call: &'static str,
        status: u16,
        message: String,
    },
    #[error("the API refused {call} with {status}: {message}")]
    Rejected {
        call: &'static str,
        status: u16,
        message: String,
    },
    #[error("the API's answer to {call} is not what the protocol says: {message}")]
    Invalid { call: &'static str, message: String },
    #[error("{call} failed: {message}")]
    Transport { call: &'static str, message: String },
}
