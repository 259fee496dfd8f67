//! Bodies of the pull protocol v1 (`{api_url}/api/v1/agent/...`), as `docs/protocol.md` and
//! `docs/openapi.yaml` describe them. Field names are the contract: rename nothing. This module
//! holds data only; sending it is `crate::api`'s job.

use serde::{Deserialize, Serialize};

use super::job::{JobResult, JobSpec};

/// `POST /lease`: ask for one job; the server may hold the request up to `wait_seconds`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct LeaseRequest {
    pub agent_id: String,
    pub hostname: String,
    pub version: String,
    pub labels: Vec<String>,
    /// Free job slots on this agent (never more than it will run).
    pub capacity: usize,
    pub wait_seconds: u64,
}

/// `200` answer to `POST /lease`: a job, leased to this agent for `lease_ttl_seconds`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Lease {
    pub lease_id: String,
    pub lease_ttl_seconds: u64,
    pub job: JobSpec,
}

/// The longest lease TTL the agent takes at its word (a day): a larger number from the API,
/// added to a clock reading, would overflow it.
pub const MAX_LEASE_TTL_SECONDS: u64 = 86_400;

/// A lease TTL from the API as a duration the agent can compute with: at least one second, at
/// most [`MAX_LEASE_TTL_SECONDS`].
pub fn lease_ttl(seconds: u64) -> std::time::Duration {
    std::time::Duration::from_secs(seconds.clamp(1, MAX_LEASE_TTL_SECONDS))
}

/// `POST /jobs/{job_id}/start`: the agent is about to run the job.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct StartRequest {
    pub lease_id: String,
    /// RFC 3339, UTC.
    pub started_at: String,
}

/// `POST /jobs/{job_id}/heartbeat`: renew the lease.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct HeartbeatRequest {
    pub lease_id: String,
}

/// `200` answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct HeartbeatReply {
    /// The job should stop: the agent cancels it and completes it as `cancelled`.
    #[serde(default)]
    pub cancel: bool,
    /// The lease's TTL from now on.
    pub lease_ttl_seconds: u64,
}

/// `POST /jobs/{job_id}/logs`: a piece of the job's combined output text.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct LogChunk {
    pub lease_id: String,
    /// Byte offset of `data` in the job's log text (UTF-8).
    pub offset: u64,
    pub data: String,
}

/// `200` answer to a log chunk: how many bytes of the log the server now holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct LogAck {
    pub committed: u64,
}

/// `POST /jobs/{job_id}/complete`: the lease id, every field of the job result, and the length
/// of the streamed log text.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct CompleteRequest {
    pub lease_id: String,
    #[serde(flatten)]
    pub result: JobResult,
    pub log_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::JobStatus;

    #[test]
    fn complete_flattens_the_result() {
        let body = CompleteRequest {
            lease_id: "L1".into(),
            result: JobResult {
                job_id: 4,
                status: JobStatus::Success,
                success: true,
                exit_code: 0,
                stdout: "hi\n".into(),
                stderr: String::new(),
                duration_seconds: 1.5,
                started_at: "2024-01-01T00:00:00.000Z".into(),
                completed_at: "2024-01-01T00:00:01.500Z".into(),
                error: None,
                steps: Vec::new(),
                oom_killed: false,
                artifacts: Vec::new(),
                services: Vec::new(),
            },
            log_bytes: 3,
        };
        let v = serde_json::to_value(&body).unwrap();
        for key in [
            "lease_id",
            "job_id",
            "status",
            "success",
            "exit_code",
            "stdout",
            "stderr",
            "duration_seconds",
            "started_at",
            "completed_at",
            "error",
            "steps",
            "log_bytes",
        ] {
            assert!(v.get(key).is_some(), "{key} missing in {v}");
        }
        let back: CompleteRequest = serde_json::from_value(v).unwrap();
        assert_eq!(back, body);
    }

    #[test]
    fn a_lease_ttl_from_the_api_is_bounded_both_ways() {
        use std::time::Duration;
        assert_eq!(super::lease_ttl(0), Duration::from_secs(1));
        assert_eq!(super::lease_ttl(30), Duration::from_secs(30));
        assert_eq!(
            super::lease_ttl(u64::MAX),
            Duration::from_secs(super::MAX_LEASE_TTL_SECONDS)
        );
    }
}
