//! Reading the verdict of a `gryt run` from what it printed.
//!
//! The gryt CLI's exit code cannot be trusted (gryt 1.1.8 exits 0 when a step fails and even when
//! the script does not load), but its output can: last on stdout comes a pretty-printed JSON
//! report `{"status": "ok"|"error", "results": {"runner_0": {"<step>": {"status", "returncode",
//! "duration", "error", ...}}}}`, and a script that cannot be loaded prints `Error: <reason>` on
//! stderr with no report. The verdict combines the exit code with both; a run without a report
//! that can be read failed. Both streams are followed as they flow ([`ReportCapture`],
//! [`ErrorLineCapture`]), never read from a capped tail.

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

/// Most bytes of gryt's report that are kept (the report holds every step's output). A report
/// past it fails the job with a message saying so: its verdict is never guessed.
pub const MAX_REPORT_BYTES: usize = 32 * 1024 * 1024;

/// Longest `Error:` line of stderr that is kept.
const MAX_ERROR_LINE: usize = 4096;

/// Follows gryt's stdout as it flows and keeps the region its report is in: from the last line
/// that is exactly `{` (the pretty-printed report's first line; nested lines are indented) to
/// the end. Memory is bounded by [`MAX_REPORT_BYTES`] however much the job prints, and no byte
/// of the output is ever skipped, so the verdict does not depend on a tail's size.
#[derive(Debug)]
pub struct ReportCapture {
    cap: usize,
    /// The region since the last `{` line; `None` before the first one.
    region: Option<Vec<u8>>,
    /// The current region grew past `cap` (and was dropped).
    overflowed: bool,
    /// The current line's first bytes (up to 3) and its length so far.
    head: [u8; 3],
    line_len: usize,
}

/// What [`ReportCapture`] found.
#[derive(Debug, PartialEq)]
pub enum ReportRegion {
    /// No line `{` on stdout: gryt printed no report.
    Missing,
    /// The report's region is larger than the cap.
    TooLarge {
        limit: usize,
    },
    Text(String),
}

impl Default for ReportCapture {
    fn default() -> Self {
        Self::with_cap(MAX_REPORT_BYTES)
    }
}

impl ReportCapture {
    pub fn with_cap(cap: usize) -> Self {
        ReportCapture {
            cap,
            region: None,
            overflowed: false,
            head: [0; 3],
            line_len: 0,
        }
    }

    pub fn push(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let (piece, rest, ends_line) = match data.iter().position(|&b| b == b'\n') {
                Some(i) => (&data[..=i], &data[i + 1..], true),
                None => (data, &[][..], false),
            };
            let body = if ends_line {
                &piece[..piece.len() - 1]
            } else {
                piece
            };
            let start = self.line_len.min(self.head.len());
            let take = (self.head.len() - start).min(body.len());
            self.head[start..start + take].copy_from_slice(&body[..take]);
            self.line_len += body.len();
            self.append(piece);
            if ends_line {
                let line = &self.head[..self.line_len.min(3)];
                if line == b"{" || line == b"{\r" {
                    let mut region = line.to_vec();
                    region.push(b'\n');
                    self.region = Some(region);
                    self.overflowed = false;
                }
                self.line_len = 0;
            }
            data = rest;
        }
    }

    fn append(&mut self, piece: &[u8]) {
        if self.overflowed {
            return;
        }
        let Some(region) = &mut self.region else {
            return;
        };
        if region.len() + piece.len() > self.cap {
            self.overflowed = true;
            *region = Vec::new();
            return;
        }
        region.extend_from_slice(piece);
    }

    pub fn finish(&self) -> ReportRegion {
        match &self.region {
            _ if self.overflowed => ReportRegion::TooLarge { limit: self.cap },
            None => ReportRegion::Missing,
            Some(bytes) => ReportRegion::Text(String::from_utf8_lossy(bytes).into_owned()),
        }
    }
}

/// Follows gryt's stderr and keeps its last line that starts with `Error:` (a load error).
#[derive(Debug, Default)]
pub struct ErrorLineCapture {
    current: Vec<u8>,
    /// The current line is longer than kept: only its start is.
    current_len: usize,
    last: Option<String>,
}

impl ErrorLineCapture {
    pub fn push(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let (body, rest, ends_line) = match data.iter().position(|&b| b == b'\n') {
                Some(i) => (&data[..i], &data[i + 1..], true),
                None => (data, &[][..], false),
            };
            let room = MAX_ERROR_LINE.saturating_sub(self.current.len());
            self.current
                .extend_from_slice(&body[..body.len().min(room)]);
            self.current_len += body.len();
            if ends_line {
                self.end_line();
            }
            data = rest;
        }
    }

    fn end_line(&mut self) {
        if self.current.starts_with(b"Error:") {
            let line = String::from_utf8_lossy(&self.current).trim().to_owned();
            self.last = Some(line);
        }
        self.current.clear();
        self.current_len = 0;
    }

    /// The last `Error:` line, the unfinished last line included.
    pub fn last_error(&self) -> Option<String> {
        if self.current.starts_with(b"Error:") {
            return Some(String::from_utf8_lossy(&self.current).trim().to_owned());
        }
        self.last.clone()
    }
}

/// The verdict of a `gryt run` that exited with `exit_code`, from what the captures followed.
/// Without a report that parses, the run failed, whatever gryt's exit code says.
pub fn verdict(exit_code: i64, stdout: &ReportCapture, stderr: &ErrorLineCapture) -> GrytVerdict {
    let failed_code = if exit_code != 0 { exit_code } else { 1 };
    let failed = |code: i64, reason: String| GrytVerdict {
        success: false,
        exit_code: code,
        steps: Vec::new(),
        reason: Some(reason),
    };
    let report = match stdout.finish() {
        ReportRegion::Text(text) => parse_report(&text),
        ReportRegion::TooLarge { limit } => {
            return failed(
                failed_code,
                format!(
                    "gryt's report is larger than {limit} bytes, this agent's limit: the job's \
                     result cannot be read, so it is failed"
                ),
            );
        }
        ReportRegion::Missing => None,
    };
    let Some(report) = report else {
        if let Some(reason) = stderr.last_error() {
            let code = if exit_code != 0 {
                exit_code
            } else {
                LOAD_ERROR_EXIT_CODE
            };
            return failed(code, reason);
        }
        return failed(
            failed_code,
            format!(
                "gryt printed no report that could be read (exit code {exit_code}): the job's \
                 result is unknown, so it is failed"
            ),
        );
    };
    verdict_of_report(exit_code, &report)
}

/// Whole texts through the captures: for tests and callers that hold all of the output.
pub fn verdict_of_text(exit_code: i64, stdout: &str, stderr: &str) -> GrytVerdict {
    let mut out = ReportCapture::default();
    out.push(stdout.as_bytes());
    let mut err = ErrorLineCapture::default();
    err.push(stderr.as_bytes());
    verdict(exit_code, &out, &err)
}

fn verdict_of_report(exit_code: i64, report: &Report) -> GrytVerdict {
    let steps = steps_of(report);
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

/// The report in the region from the last `{` line to the end of stdout, if it is one.
fn parse_report(region: &str) -> Option<Report> {
    let report = serde_json::from_str::<Report>(region.trim_end()).ok()?;
    (!report.results.is_empty() || report.status.is_some()).then_some(report)
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
        let v = verdict_of_text(0, FAILED_STEP, "");
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
        let v = verdict_of_text(
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
        let v = verdict_of_text(0, ok, "");
        assert!(v.success);
        assert_eq!(v.steps[0].name, "a");
    }

    #[test]
    fn no_report_is_a_failure_whatever_the_exit_code() {
        let v = verdict_of_text(0, "plain output", "");
        assert_eq!((v.success, v.exit_code), (false, 1));
        assert!(v.reason.unwrap().contains("no report"));
        assert_eq!(verdict_of_text(3, "plain output", "").exit_code, 3);
        // A report followed by more output is not the report gryt prints last.
        let v = verdict_of_text(0, &format!("{FAILED_STEP}trailing text\n"), "");
        assert!(!v.success);
        // A report cut short does not parse.
        let v = verdict_of_text(0, "{\n  \"status\": \"ok\",\n", "");
        assert!(!v.success);
    }

    #[test]
    fn the_report_is_found_at_any_chunking_after_any_amount_of_output() {
        let noise = "x".repeat(3 * 1024 * 1024) + "\n{\"hook\": 1}\n{\n";
        let text = format!("{noise}not a report\n{FAILED_STEP}");
        for chunk in [1usize, 2, 3, 7, 4096, 1 << 20] {
            let mut out = ReportCapture::default();
            for piece in text.as_bytes().chunks(chunk) {
                out.push(piece);
            }
            let v = verdict(0, &out, &ErrorLineCapture::default());
            assert_eq!(
                (v.success, v.exit_code, v.steps.len()),
                (false, 4, 2),
                "{chunk}"
            );
        }
    }

    #[test]
    fn a_report_past_the_cap_fails_and_says_so() {
        let mut out = ReportCapture::with_cap(64);
        out.push(FAILED_STEP.as_bytes());
        let v = verdict(0, &out, &ErrorLineCapture::default());
        assert!(!v.success);
        assert!(v.reason.unwrap().contains("larger than 64 bytes"));
        // Even when gryt's report says everything passed.
        let ok = "{\n  \"status\": \"ok\",\n  \"results\": {\"runner_0\": {\"a\": {\"status\": \"success\", \"returncode\": 0}}}\n}\n";
        let mut out = ReportCapture::with_cap(32);
        out.push(ok.as_bytes());
        assert!(!verdict(0, &out, &ErrorLineCapture::default()).success);
    }

    #[test]
    fn the_last_error_line_is_kept_at_any_chunking() {
        let text = "Error: first\nnoise\nError: invalid syntax\nmore noise\n";
        let mut err = ErrorLineCapture::default();
        for piece in text.as_bytes().chunks(3) {
            err.push(piece);
        }
        assert_eq!(err.last_error().as_deref(), Some("Error: invalid syntax"));
    }

    #[test]
    fn error_status_without_a_failed_step_fails() {
        let v = verdict_of_text(0, "{\n\"status\": \"error\", \"results\": {}\n}", "");
        assert_eq!((v.success, v.exit_code), (false, 1));
    }
}
