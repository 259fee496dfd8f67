//! The job spec a job arrives as and the result it leaves as, shared by every mode.
//!
//! Field names are a contract with the main API (push mode's `POST /jobs/execute` body and
//! response, pull mode's lease and `complete` bodies): rename nothing here. Unknown fields in a
//! job spec are ignored so that a newer API does not break an older agent.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use time::OffsetDateTime;

use super::service::{ServiceResult, ServiceSpec};

/// A job as the main API describes it.
#[derive(Clone, Default, Deserialize, Serialize)]
pub struct JobSpec {
    pub job_id: i64,
    /// The pipeline file, base64 encoded: a gryt Python script or a declarative YAML pipeline.
    pub pipeline_b64: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_url: Option<String>,
    /// Branch to check out; `None` (absent or null) means `main`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github_token_encrypted: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_image: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub env_vars: BTreeMap<String, String>,
    /// CPUs, e.g. `"1.0"`; a JSON number is accepted too.
    #[serde(
        default,
        deserialize_with = "opt_string_or_number",
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_limit: Option<String>,
    /// Memory with a unit, e.g. `"512m"`, `"2g"`; a JSON number means bytes.
    #[serde(
        default,
        deserialize_with = "opt_string_or_number",
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_limit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    /// Push mode only: where to POST the result as well.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// Files to upload to the object store after the steps; replaces the pipeline's `artifacts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<ArtifactsSpec>,
    /// Caches to restore before the first step and save after; replaces the pipeline's `cache`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<Vec<CacheSpec>>,
    /// The API vouches for this job (a push to a protected branch): only such a job writes
    /// caches. Absent means `false`: the job reads the default branch's caches, writes none.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trusted: bool,
    /// Service containers started before the first step, beside the pipeline's own (a name
    /// given in both is refused).
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub services: Vec<ServiceSpec>,
}

/// `artifacts`: workspace paths (globs allowed) uploaded after the steps, and when.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct ArtifactsSpec {
    #[serde(default, deserialize_with = "null_as_default")]
    pub paths: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub when: ArtifactWhen,
}

/// Which job endings upload artifacts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactWhen {
    #[default]
    OnSuccess,
    OnFailure,
    Always,
}

/// One `cache` entry: a literal key, files whose contents the key also hashes, and the
/// workspace paths the cache holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct CacheSpec {
    pub key: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub files: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub paths: Vec<String>,
}

/// One uploaded artifact in a result.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct ArtifactResult {
    /// Relative to the workspace.
    pub path: String,
    /// `s3://bucket/prefix/artifacts/<job_id>/<path>`.
    pub url: String,
    pub size: u64,
    /// Hex SHA-256 of the bytes uploaded.
    pub sha256: String,
}

impl JobSpec {
    pub const DEFAULT_BRANCH: &'static str = "main";

    pub fn branch(&self) -> &str {
        self.git_branch
            .as_deref()
            .filter(|b| !b.is_empty())
            .unwrap_or(Self::DEFAULT_BRANCH)
    }

    /// Parses a job spec from JSON, naming the offending field when it fails.
    pub fn from_json(body: &[u8]) -> Result<Self, SpecError> {
        let de = &mut serde_json::Deserializer::from_slice(body);
        serde_path_to_error::deserialize(de).map_err(|e| SpecError {
            field: e.path().to_string(),
            message: e.inner().to_string(),
        })
    }
}

/// Debug never shows the encrypted token or env values: they are secrets or may contain them.
impl fmt::Debug for JobSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobSpec")
            .field("job_id", &self.job_id)
            .field("pipeline_b64_len", &self.pipeline_b64.len())
            .field("git_url", &self.git_url)
            .field("git_branch", &self.git_branch)
            .field("git_commit", &self.git_commit)
            .field(
                "github_token_encrypted",
                &self.github_token_encrypted.as_ref().map(|_| "[MASKED]"),
            )
            .field("docker_image", &self.docker_image)
            .field("env_vars", &self.env_vars.keys().collect::<Vec<_>>())
            .field("cpu_limit", &self.cpu_limit)
            .field("memory_limit", &self.memory_limit)
            .field("timeout_seconds", &self.timeout_seconds)
            .field("artifacts", &self.artifacts)
            .field("cache", &self.cache)
            .field("trusted", &self.trusted)
            .field("services", &self.services)
            .finish()
    }
}

/// A job spec that could not be parsed: `field` is the JSON path (`.` for the document).
#[derive(Debug, thiserror::Error)]
#[error("invalid job spec: field `{field}`: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

/// How a job ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Every step passed.
    Success,
    /// The job ran and a step failed (non-zero exit, out of memory).
    Failed,
    /// The job ran past its time limit and was stopped.
    Timeout,
    /// The job was stopped on request (API cancel, agent shutdown).
    Cancelled,
    /// The agent could not run the job (bad pipeline, image unavailable, Docker failure).
    Error,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Success => "success",
            JobStatus::Failed => "failed",
            JobStatus::Timeout => "timeout",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Error => "error",
        }
    }
}

/// How one step ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    Success,
    Failed,
    Timeout,
    Cancelled,
    /// Not run because an earlier step failed or the job was stopped.
    Skipped,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct StepResult {
    pub name: String,
    pub status: StepStatus,
    /// `None` when the step did not run to an exit code (skipped, killed before it started).
    pub exit_code: Option<i64>,
    pub duration_seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The result of a job: a superset of the existing push API's response.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct JobResult {
    pub job_id: i64,
    pub status: JobStatus,
    pub success: bool,
    /// The failing step's exit code, 0 on success, -1 when no process produced one.
    pub exit_code: i64,
    pub stdout: String,
    pub stderr: String,
    pub duration_seconds: f64,
    pub started_at: String,
    pub completed_at: String,
    /// Why the job did not end normally; `None` for success and for an ordinary step failure.
    pub error: Option<String>,
    #[serde(default)]
    pub steps: Vec<StepResult>,
    /// The kernel killed a job process because the container ran out of memory.
    #[serde(default)]
    pub oom_killed: bool,
    /// Artifacts uploaded to the object store (empty when none were asked for or uploaded).
    #[serde(default)]
    pub artifacts: Vec<ArtifactResult>,
    /// The job's service containers, in the order they were asked for (empty without any).
    #[serde(default)]
    pub services: Vec<ServiceResult>,
}

impl JobResult {
    /// The result of a job the agent could not run at all (status `error`, no process ran).
    pub fn agent_error(job_id: i64, message: String) -> Self {
        let now = rfc3339(OffsetDateTime::now_utc());
        JobResult {
            job_id,
            status: JobStatus::Error,
            success: false,
            exit_code: -1,
            stdout: String::new(),
            stderr: String::new(),
            duration_seconds: 0.0,
            started_at: now.clone(),
            completed_at: now,
            error: Some(message),
            steps: Vec::new(),
            oom_killed: false,
            artifacts: Vec::new(),
            services: Vec::new(),
        }
    }
}

/// RFC 3339 in UTC with millisecond precision and a `Z`, as the result's timestamps are written.
pub fn rfc3339(at: OffsetDateTime) -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    at.to_offset(time::UtcOffset::UTC)
        .format(&fmt)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

pub(super) fn null_as_default<'de, D, T>(de: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(de)?.unwrap_or_default())
}

fn opt_string_or_number<'de, D>(de: D) -> Result<Option<String>, D::Error>
where
    D: Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum StringOrNumber {
        String(String),
        Number(serde_json::Number),
    }
    Ok(match Option::<StringOrNumber>::deserialize(de)? {
        None => None,
        Some(StringOrNumber::String(s)) => Some(s),
        Some(StringOrNumber::Number(n)) => Some(n.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_push_api_body_and_ignores_unknown_fields() {
        let spec = JobSpec::from_json(
            br#"{"job_id": 7, "pipeline_b64": "eA==", "git_branch": null, "env_vars": null,
                 "cpu_limit": 1.5, "memory_limit": "512m", "brand_new_field": {"x": 1}}"#,
        )
        .unwrap();
        assert_eq!(spec.job_id, 7);
        assert_eq!(spec.branch(), "main");
        assert!(spec.env_vars.is_empty());
        assert_eq!(spec.cpu_limit.as_deref(), Some("1.5"));
    }

    #[test]
    fn names_the_field_with_the_wrong_type() {
        let err =
            JobSpec::from_json(br#"{"job_id": "seven", "pipeline_b64": "eA=="}"#).unwrap_err();
        assert_eq!(err.field, "job_id");
        let err =
            JobSpec::from_json(br#"{"job_id": 1, "pipeline_b64": "eA==", "env_vars": {"A": 1}}"#)
                .unwrap_err();
        assert_eq!(err.field, "env_vars.A");
        let err = JobSpec::from_json(br#"{"job_id": 1}"#).unwrap_err();
        assert!(err.message.contains("pipeline_b64"), "{err}");
    }

    #[test]
    fn artifacts_cache_and_trusted_decode_and_old_specs_still_do() {
        let spec = JobSpec::from_json(
            br#"{"job_id": 1, "pipeline_b64": "eA==", "trusted": true,
                 "artifacts": {"paths": ["dist/", "reports/*.xml"], "when": "always"},
                 "cache": [{"key": "deps", "files": ["Cargo.lock"], "paths": ["target"]}]}"#,
        )
        .unwrap();
        let artifacts = spec.artifacts.unwrap();
        assert_eq!(artifacts.paths, ["dist/", "reports/*.xml"]);
        assert_eq!(artifacts.when, ArtifactWhen::Always);
        assert_eq!(spec.cache.unwrap()[0].files, ["Cargo.lock"]);
        assert!(spec.trusted);
        let old = JobSpec::from_json(br#"{"job_id": 1, "pipeline_b64": "eA=="}"#).unwrap();
        assert!(old.artifacts.is_none() && old.cache.is_none() && !old.trusted);
        let err = JobSpec::from_json(
            br#"{"job_id": 1, "pipeline_b64": "eA==", "artifacts": {"paths": [], "when": "never"}}"#,
        )
        .unwrap_err();
        assert_eq!(err.field, "artifacts.when");
    }

    #[test]
    fn services_decode_null_means_none_and_the_result_always_has_the_field() {
        let spec = JobSpec::from_json(
            br#"{"job_id": 1, "pipeline_b64": "eA==",
                 "services": [{"name": "db", "image": "postgres:16", "ready_port": 5432}]}"#,
        )
        .unwrap();
        assert_eq!(spec.services[0].name, "db");
        assert_eq!(spec.services[0].ready_port, Some(5432));
        let none =
            JobSpec::from_json(br#"{"job_id": 1, "pipeline_b64": "eA==", "services": null}"#)
                .unwrap();
        assert!(none.services.is_empty());
        let err = JobSpec::from_json(
            br#"{"job_id": 1, "pipeline_b64": "eA==", "services": [{"name": "db"}]}"#,
        )
        .unwrap_err();
        assert!(err.field.starts_with("services[0]"), "{err}");
        let result = serde_json::to_value(JobResult::agent_error(1, "x".into())).unwrap();
        assert_eq!(result["services"], serde_json::json!([]));
    }

    #[test]
    fn debug_hides_secrets() {
        let spec = JobSpec {
            github_token_encrypted: Some("gAAAA-secret".into()),
            env_vars: [("API_TOKEN".to_string(), "hunter2".to_string())].into(),
            services: vec![ServiceSpec {
                name: "db".into(),
                env: [("DB_PASSWORD".to_string(), "hunter3".to_string())].into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let shown = format!("{spec:?}");
        assert!(
            !shown.contains("gAAAA-secret")
                && !shown.contains("hunter2")
                && !shown.contains("hunter3"),
            "{shown}"
        );
    }

    #[test]
    fn timestamps_are_utc_with_z() {
        let at = OffsetDateTime::from_unix_timestamp(0).unwrap();
        assert_eq!(rfc3339(at), "1970-01-01T00:00:00.000Z");
    }
}
