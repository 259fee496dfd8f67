//! Service containers on the wire: the job spec's `services` entries and the result's
//! per-service report. Field names are contracts with the main API (`docs/protocol.md`).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// One service the job needs beside it (a database, a cache, a fake server), started before the
/// first step on the job's network and reachable there by `name`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct ServiceSpec {
    /// The service's DNS name on the job's network: a letter, then letters, digits and `-`.
    pub name: String,
    pub image: String,
    #[serde(default, deserialize_with = "super::job::null_as_default")]
    pub env: BTreeMap<String, String>,
    /// Replaces the image's command; `None` runs the image as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<ServiceCommand>,
    /// Steps start once this TCP port of the service accepts connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_port: Option<u16>,
    /// How long the service gets to open `ready_port`; [`DEFAULT_READY_TIMEOUT_SECONDS`] when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_timeout_seconds: Option<u64>,
}

/// How long a service gets to open its `ready_port` when it does not say.
pub const DEFAULT_READY_TIMEOUT_SECONDS: u64 = 60;

impl ServiceSpec {
    /// The service's time to become ready, in seconds (not yet bounded by the operator's max).
    pub fn ready_timeout(&self) -> u64 {
        self.ready_timeout_seconds
            .unwrap_or(DEFAULT_READY_TIMEOUT_SECONDS)
    }
}

/// Debug never shows env values: a service's password is a secret like any other.
impl fmt::Debug for ServiceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceSpec")
            .field("name", &self.name)
            .field("image", &self.image)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("command", &self.command.as_ref().map(|_| "[set]"))
            .field("ready_port", &self.ready_port)
            .field("ready_timeout_seconds", &self.ready_timeout_seconds)
            .finish()
    }
}

/// A service's command: a list replaces the image's `CMD` (its `ENTRYPOINT` still runs, as in
/// Compose); a string is run by the image's `/bin/sh -c` instead of its `ENTRYPOINT` and `CMD`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum ServiceCommand {
    Args(Vec<String>),
    Shell(String),
}

/// How a service ended up, in the result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceStatus {
    /// It started (and opened its `ready_port`, if it has one) and ran until the job's end.
    Running,
    /// Its main process ended before the job did.
    Exited,
    /// The kernel killed it for running out of memory.
    OomKilled,
    /// Its `ready_port` accepted no connection within its `ready_timeout_seconds`.
    NotReady,
    /// The agent could not start it (image, Docker).
    Error,
    /// Not started: the job ended before (another service failed, a stop, a timeout).
    NotStarted,
}

/// One service in a job's result. Every text in it is masked like the job's output.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct ServiceResult {
    pub name: String,
    pub status: ServiceStatus,
    /// The exit code of its main process when it ended before the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// Why it failed the job; `None` for a service that ran until the job's end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its last output lines (stdout and stderr as they came), at most [`OUTPUT_TAIL_LINES`]
    /// lines and [`OUTPUT_TAIL_BYTES`] bytes.
    #[serde(default)]
    pub output_tail: String,
}

/// Most lines of a service's output kept for the result.
pub const OUTPUT_TAIL_LINES: usize = 50;
/// Most bytes of a service's output kept for the result.
pub const OUTPUT_TAIL_BYTES: usize = 8 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_command_forms_and_the_defaults_decode() {
        let list: ServiceSpec = serde_json::from_str(
            r#"{"name": "db", "image": "postgres:16", "env": {"P": "x"},
                "command": ["postgres", "-c", "fsync=off"], "ready_port": 5432}"#,
        )
        .unwrap();
        assert_eq!(
            list.command,
            Some(ServiceCommand::Args(vec![
                "postgres".into(),
                "-c".into(),
                "fsync=off".into()
            ]))
        );
        assert_eq!(list.ready_timeout(), DEFAULT_READY_TIMEOUT_SECONDS);
        let shell: ServiceSpec = serde_json::from_str(
            r#"{"name": "web", "image": "i", "env": null, "command": "httpd -f",
                "ready_timeout_seconds": 5}"#,
        )
        .unwrap();
        assert_eq!(
            shell.command,
            Some(ServiceCommand::Shell("httpd -f".into()))
        );
        assert_eq!(shell.ready_timeout(), 5);
        assert!(shell.env.is_empty() && shell.ready_port.is_none());
    }

    #[test]
    fn a_port_outside_u16_is_refused_by_the_decoder() {
        let err = serde_json::from_str::<ServiceSpec>(
            r#"{"name": "db", "image": "i", "ready_port": 70000}"#,
        );
        assert!(err.is_err());
    }

    #[test]
    fn debug_hides_env_values_and_the_command() {
        let spec = ServiceSpec {
            name: "db".into(),
            image: "postgres".into(),
            env: [("POSTGRES_PASSWORD".to_string(), "hunter22".to_string())].into(),
            command: Some(ServiceCommand::Shell("run --password hunter22".into())),
            ..Default::default()
        };
        let shown = format!("{spec:?}");
        assert!(!shown.contains("hunter22"), "{shown}");
        assert!(shown.contains("POSTGRES_PASSWORD"), "{shown}");
    }

    #[test]
    fn a_result_is_written_with_snake_case_statuses() {
        let result = ServiceResult {
            name: "db".into(),
            status: ServiceStatus::NotReady,
            exit_code: None,
            error: Some("x".into()),
            output_tail: "last\n".into(),
        };
        let v = serde_json::to_value(&result).unwrap();
        assert_eq!(v["status"], "not_ready");
        assert_eq!(v["output_tail"], "last\n");
        assert!(v.get("exit_code").is_none());
    }
}
