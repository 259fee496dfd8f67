//! Reading the verdict of a `gryt run` from what it printed.
//!
//! The gryt CLI's exit code cannot be trusted (gryt 1.1.8 exits 0 when a step fails and even when
//! the script does not load), but its output can: last on stdout comes a pretty-printed JSON
//! report `{"status": "ok"|"error", "results": {"runner_0": {"<step>": {"status", "returncode",
//! "duration", "error", ...}}}}`, and a script that cannot be loaded prints `Error: <reason>` on
//! stderr with no report. The verdict combines the exit code with both.

use serde::Deserialize;
use serde_json::Value;

use crate::wire::{StepResult, StepStatus};

/// What a finished `gryt run` amounts to.
#[derive(Debug, Clone, PartialEq)]
pub struct GrytVerdict {
    pub success: bool,
    pub exit_code: i64,
    pub steps: Vec<StepResult>,
    /// Why the run failed when no step says so (load error, error status with no failed step).
    pub reason: Option<String>,
}

/// Exit code used when the script could not be loaded at all (like a usage error).
pub const LOAD_ERROR_EXIT_CODE: i64 = 2;

#[derive(Deserialize)]
struct Report {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    results: serde_json::Map<String, Value>,
}

#[derive(Deserialize)]
struct StepReport {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    returncode: Option<i64>,
    #[serde(default)]
    duration: Option<f64>,
    #[serde(default)]
    error: Option<String>,
}

pub fn verdict(exit_code: i64, stdout: &str, stderr: &str) -> GrytVerdict {
    let Some(report) = last_report(stdout) else {
        if let Some(reason) = load_error(stderr) {
            return GrytVerdict {
                success: false,
                exit_code: if exit_code != 0 {
                    exit_code
                } else {
                    LOAD_ERROR_EXIT_CODE
                },
                steps: Vec::new(),
                reason: Some(reason),
            };
        }
        return GrytVerdict {
            success: exit_code == 0,
            exit_code,
            steps: Vec::new(),
            reason: None,
        };
    };

    let steps = steps_of(&report);
    if let Some(failed) = steps.iter().find(|s| s.status == StepStatus::Failed) {
        let code = failed.exit_code.filter(|c| *c != 0).unwrap_or(1);
        return GrytVerdict {
            success: false,
            exit_code: code,
            steps,
            reason: None,
        };
    }
    if exit_code != 0 {
        return GrytVerdict {
            success: false,
            exit_code,
            steps,
            reason: None,
        };
    }
    if report.status.as_deref() == Some("error") {
        let reason = Some("gryt reported status \"error\"".to_owned());
        return GrytVerdict {
            success: false,
            exit_code: 1,
            steps,
            reason,
        };
    }
    GrytVerdict {
        success: true,
        exit_code: 0,
        steps,
        reason: None,
    }
}

/// The last JSON object on stdout that parses as a report. The report is pretty-printed, so it
/// starts with a line that is exactly `{`; hook lines before it may hold JSON of their own.
fn last_report(stdout: &str) -> Option<Report> {
    let trimmed = stdout.trim_end();
    let mut search_end = trimmed.len();
    loop {
        let start = match trimmed[..search_end].rfind("\n{") {
            Some(i) => i + 1,
            None if trimmed.starts_with('{') => 0,
            None => return None,
        };
        let candidate = &trimmed[start..];
        if let Ok(report) = serde_json::from_str::<Report>(candidate)
            && (!report.results.is_empty() || report.status.is_some())
        {
            return Some(report);
        }
        if start == 0 {
            return None;
        }
        search_end = start - 1;
    }
}

fn load_error(stderr: &str) -> Option<String> {
    stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("Error:"))
        .map(|l| l.trim().to_owned())
}

fn steps_of(report: &Report) -> Vec<StepResult> {
    let mut steps = Vec::new();
    for (runner, runner_steps) in &report.results {
        let Some(runner_steps) = runner_steps.as_object() else {
            continue;
        };
        for (name, step) in runner_steps {
            let Ok(step) = serde_json::from_value::<StepReport>(step.clone()) else {
                continue;
            };
            let status = match step.status.as_deref() {
                Some("success") => StepStatus::Success,
                Some("skipped") => StepStatus::Skipped,
                _ if step.returncode == Some(0) && step.error.is_none() => StepStatus::Success,
                _ => StepStatus::Failed,
            };
            let name = if report.results.len() > 1 {
                format!("{runner}/{name}")
            } else {
                name.clone()
            };
            steps.push(StepResult {
                name,
                status,
                exit_code: step.returncode,
                duration_seconds: step.duration.unwrap_or(0.0),
                error: step.error,
            });
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAILED_STEP: &str = r#"[hook] starting
{"hook": "json-looking line"}
{
  "status": "ok",
  "results": {
    "runner_0": {
      "build": {"status": "success", "returncode": 0, "stdout": "", "stderr": "", "duration": 0.5, "attempts": 1},
      "test": {"status": "error", "returncode": 4, "stdout": "", "stderr": "boom", "duration": 0.0018, "error": "Process exited with code 4", "attempts": 1}
    }
  }
}
"#;

    #[test]
    fn a_step_error_fails_the_job_even_with_exit_zero_and_status_ok() {
        let v = verdict(0, FAILED_STEP, "");
        assert!(!v.success);
        assert_eq!(v.exit_code, 4);
        assert_eq!(v.steps.len(), 2);
        assert_eq!(v.steps[1].status, StepStatus::Failed);
        assert_eq!(
            v.steps[1].error.as_deref(),
            Some("Process exited with code 4")
        );
    }

    #[test]
    fn a_load_error_fails_with_exit_code_two() {
        let v = verdict(
            0,
            "",
            "Traceback...\nError: invalid syntax (pipeline.py, line 3)\n",
        );
        assert_eq!((v.success, v.exit_code), (false, 2));
        assert!(v.reason.unwrap().contains("invalid syntax"));
    }

    #[test]
    fn a_clean_report_succeeds() {
        let ok = "{\n  \"status\": \"ok\",\n  \"results\": {\"runner_0\": {\"a\": {\"status\": \"success\", \"returncode\": 0, \"duration\": 1.0}}}\n}\n";
        let v = verdict(0, ok, "");
        assert!(v.success);
        assert_eq!(v.steps[0].name, "a");
    }

    #[test]
    fn no_report_falls_back_to_the_exit_code() {
        assert!(verdict(0, "plain output", "").success);
        assert_eq!(verdict(3, "plain output", "").exit_code, 3);
    }

    #[test]
    fn error_status_without_a_failed_step_fails() {
        let v = verdict(0, "{\n\"status\": \"error\", \"results\": {}\n}", "");
        assert_eq!((v.success, v.exit_code), (false, 1));
    }
}
