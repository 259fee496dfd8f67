//! Wire types: every JSON body the agent sends or receives, in one place.
//!
//! `job` holds the job spec and result shared by all modes (`service` their service entries) (the push API's body and response,
//! the pull API's lease payload and completion). Field names here are contracts with the main
//! API: rename nothing.

pub mod job;
pub mod pull;
pub mod service;

pub use job::{
    ArtifactResult, ArtifactWhen, ArtifactsSpec, CacheSpec, JobResult, JobSpec, JobStatus,
    SpecError, StepResult, StepStatus, rfc3339,
};
pub use service::{ServiceCommand, ServiceResult, ServiceSpec, ServiceStatus};
