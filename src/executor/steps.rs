//! A job's commands: the YAML steps one after another (with their results and time limits) or
//! `gryt run` and its report, each run in the job's container; and how the job ended.

use std::time::Duration;

use tokio::time::Instant;

use super::command::{CommandEnd, run_command};
use super::container::{JobCommand, JobContainer, MarkId};
use super::control::{JobControl, StopKind, StopRequest};
use super::observer::JobEvent;
use super::output::Run;
use crate::pipeline::gryt_report;
use crate::pipeline::yaml::Step;
use crate::pipeline::{Pipeline, YamlPipeline};
use crate::wire::{StepResult, StepStatus};

/// How the job as a whole ended, before it becomes a result.
pub(super) enum Outcome {
    Finished {
        success: bool,
        exit_code: i64,
        error: Option<String>,
    },
    TimedOut {
        exit_code: Option<i64>,
        error: String,
    },
    Cancelled {
        exit_code: Option<i64>,
        reason: String,
    },
    Error(String),
}

pub(super) struct Context<'a> {
    pub container: &'a JobContainer,
    pub control: &'a JobControl,
    pub deadline: Instant,
    pub grace: Duration,
    pub timeout: Duration,
    pub memory: &'a str,
}

impl Context<'_> {
    fn oom_message(&self) -> String {
        format!(
            "out of memory: a job process was killed by the kernel (memory limit {})",
            self.memory
        )
    }
}

pub(super) fn cancelled(request: StopRequest, exit_code: Option<i64>) -> Outcome {
    let reason = match request.kind {
        StopKind::Graceful => format!("job cancelled: {}", request.reason),
        StopKind::Immediate => format!("job aborted: {}", request.reason),
    };
    Outcome::Cancelled { exit_code, reason }
}

/// Where an adopted job's steps go on (`adopt.rs`): the steps before `index` finished (their
/// results are in `run.steps`), and step `index` started at `since` as the command with marks
/// `mark` (its `RunningCommand` set in the container), or, with `since` `None`, is to start now
/// under that mark.
pub(super) struct Resuming {
    pub index: usize,
    pub mark: MarkId,
    pub since: Option<Instant>,
}

pub(super) async fn run_steps(
    ctx: &Context<'_>,
    pipeline: &YamlPipeline,
    run: &mut Run<'_>,
    mut resuming: Option<Resuming>,
) -> Outcome {
    let mut outcome: Option<Outcome> = None;
    let first = resuming.as_ref().map_or(0, |r| r.index);
    for (index, step) in pipeline.steps.iter().enumerate() {
        if index < first {
            // Finished before the agent that ran it went away: its result is kept.
            if outcome.is_none() {
                outcome = run.steps.get(index).and_then(|r| ended_the_job(step, r));
            }
            continue;
        }
        // Masked here, where it is made: observers see it before the result does (a name falls
        // back to the script's first line, which may hold a secret).
        let name = run.masker.mask_str(&step.display_name(index));
        if outcome.is_some() {
            run.steps.push(StepResult {
                name,
                status: StepStatus::Skipped,
                exit_code: None,
                duration_seconds: 0.0,
                error: None,
            });
            continue;
        }
        run.observer
            .event(JobEvent::StepStarted { index, name: &name });
        let (mark, step_clock) = match resuming.take() {
            Some(Resuming {
                mark,
                since: Some(since),
                ..
            }) => (mark, since),
            Some(Resuming { mark, .. }) => {
                run.command_starting(&mark).await;
                (mark, Instant::now())
            }
            None => {
                let mark = MarkId::random();
                run.command_starting(&mark).await;
                (mark, Instant::now())
            }
        };
        let step_deadline = match step.timeout_seconds {
            // The plan refused a step timeout above the job maximum; clamped again here so
            // the clock never overflows whatever reaches it.
            Some(t) => ctx
                .deadline
                .min(step_clock + Duration::from_secs(t.min(super::limits::MAX_SECONDS_CEILING))),
            None => ctx.deadline,
        };
        let end = run_command(
            ctx.container,
            step_command(step),
            mark,
            step_deadline,
            ctx.grace,
            ctx.control,
            &mut |s, d| run.output(s, d),
        )
        .await;

        let mut result = StepResult {
            name,
            status: StepStatus::Success,
            exit_code: None,
            duration_seconds: step_clock.elapsed().as_secs_f64(),
            error: None,
        };
        outcome = judge_step(ctx, step, step_deadline, end, &mut result, run).await;
        result.error = result.error.map(|e| run.masker.mask_str(&e));
        run.observer.event(JobEvent::StepFinished {
            index,
            step: &result,
        });
        run.steps.push(result);
        run.command_finished().await;
    }
    outcome.unwrap_or(Outcome::Finished {
        success: true,
        exit_code: 0,
        error: None,
    })
}

/// How a step that finished before an agent restart ended the job, if it did (as `judge_step`
/// decided then).
fn ended_the_job(step: &Step, result: &StepResult) -> Option<Outcome> {
    let error = result.error.clone();
    match result.status {
        StepStatus::Success | StepStatus::Skipped => None,
        StepStatus::Failed if step.continue_on_error => None,
        StepStatus::Failed => Some(Outcome::Finished {
            success: false,
            exit_code: result.exit_code.unwrap_or(-1),
            error,
        }),
        StepStatus::Timeout => {
            let job = error
                .as_deref()
                .is_some_and(|e| e.starts_with("job timed out"));
            (job || !step.continue_on_error).then(|| Outcome::TimedOut {
                exit_code: result.exit_code,
                error: error.unwrap_or_default(),
            })
        }
        StepStatus::Cancelled => Some(Outcome::Cancelled {
            exit_code: result.exit_code,
            reason: error.unwrap_or_default(),
        }),
    }
}

/// Records how one step ended in its result; returns the job's outcome when the step ends the
/// job (it failed without `continue_on_error`, the job timed out, or the job was stopped).
async fn judge_step(
    ctx: &Context<'_>,
    step: &Step,
    step_deadline: Instant,
    end: CommandEnd,
    result: &mut StepResult,
    run: &mut Run<'_>,
) -> Option<Outcome> {
    match end {
        CommandEnd::Exited(code) => {
            result.exit_code = code;
            if code != Some(0) {
                result.status = StepStatus::Failed;
                if code == Some(137) && ctx.container.settle_oom().await {
                    run.oom_killed = true;
                    result.error = Some(ctx.oom_message());
                } else if code.is_none() {
                    result.error = Some("the step ended without an exit code".into());
                }
                if !step.continue_on_error {
                    let error = result.error.clone();
                    return Some(Outcome::Finished {
                        success: false,
                        exit_code: code.unwrap_or(-1),
                        error,
                    });
                }
            }
        }
        CommandEnd::TimedOut(code) => {
            result.exit_code = code;
            result.status = StepStatus::Timeout;
            let job_timed_out = step_deadline >= ctx.deadline;
            let error = if job_timed_out {
                format!("job timed out after {}s", ctx.timeout.as_secs())
            } else {
                format!(
                    "step timed out after {}s",
                    step.timeout_seconds.unwrap_or_default()
                )
            };
            result.error = Some(error.clone());
            if job_timed_out || !step.continue_on_error {
                return Some(Outcome::TimedOut {
                    exit_code: code,
                    error,
                });
            }
        }
        CommandEnd::Stopped(request, code) => {
            result.exit_code = code;
            result.status = StepStatus::Cancelled;
            result.error = Some(request.reason.clone());
            return Some(cancelled(request, code));
        }
        CommandEnd::Failed(message) => {
            result.status = StepStatus::Failed;
            result.error = Some(message.clone());
            return Some(Outcome::Error(message));
        }
    }
    None
}

/// The command of a YAML step: its script under `sh -c`, with the step's own variables.
pub(super) fn step_command(step: &Step) -> JobCommand {
    JobCommand {
        cmd: vec!["/bin/sh".to_owned(), "-c".to_owned(), step.run.clone()],
        env: step
            .env
            .iter()
            .map(|(k, v)| format!("{k}={}", v.0))
            .collect(),
    }
}

/// `gryt run` as configured: the setting's argv, no variables beyond the job's.
pub(super) fn gryt_command(gryt_command: &[String]) -> JobCommand {
    JobCommand {
        cmd: gryt_command.to_vec(),
        env: Vec::new(),
    }
}

/// The job's only command when it has exactly one (a gryt pipeline, a one-step YAML pipeline):
/// it can run as the container's main process. Built by the same functions `run_steps` and
/// `run_gryt` use, so the runner asks for the command that is already running.
pub(super) fn single_command(pipeline: &Pipeline, gryt_argv: &[String]) -> Option<JobCommand> {
    match pipeline {
        Pipeline::Yaml(p) if p.steps.len() == 1 => p.steps.first().map(step_command),
        Pipeline::Yaml(_) => None,
        Pipeline::Gryt { .. } => Some(gryt_command(gryt_argv)),
    }
}

/// `gryt run`; an adopted job's from where it was (`resuming`: its index is 0).
pub(super) async fn run_gryt(
    ctx: &Context<'_>,
    command: JobCommand,
    run: &mut Run<'_>,
    resuming: Option<Resuming>,
) -> Outcome {
    let mark = match resuming {
        Some(Resuming {
            mark,
            since: Some(_),
            ..
        }) => mark,
        Some(Resuming { mark, .. }) => {
            run.command_starting(&mark).await;
            mark
        }
        None => {
            let mark = MarkId::random();
            run.command_starting(&mark).await;
            mark
        }
    };
    let end = run_command(
        ctx.container,
        command,
        mark,
        ctx.deadline,
        ctx.grace,
        ctx.control,
        &mut |s, d| run.output(s, d),
    )
    .await;
    match end {
        CommandEnd::Exited(code) => {
            // gryt's report is the end of its stdout: release what the masker still holds
            // back before reading it.
            run.flush_masks();
            let code = code.unwrap_or(-1);
            let oom = code == 137 && ctx.container.settle_oom().await;
            let verdict = match &run.gryt {
                Some((report, errors)) => gryt_report::verdict(code, report, errors),
                None => gryt_report::verdict_of_text(code, "", ""),
            };
            // Masked again after parsing: a secret that JSON escaped in the report (a `"` or
            // `\` in it) passed the output masker and is whole again now.
            run.steps = verdict
                .steps
                .into_iter()
                .map(|mut step| {
                    step.name = run.masker.mask_str(&step.name);
                    step.error = step.error.map(|e| run.masker.mask_str(&e));
                    step
                })
                .collect();
            if oom {
                run.oom_killed = true;
                return Outcome::Finished {
                    success: false,
                    exit_code: code,
                    error: Some(ctx.oom_message()),
                };
            }
            Outcome::Finished {
                success: verdict.success,
                exit_code: verdict.exit_code,
                error: verdict.reason,
            }
        }
        CommandEnd::TimedOut(code) => Outcome::TimedOut {
            exit_code: code,
            error: format!("job timed out after {}s", ctx.timeout.as_secs()),
        },
        CommandEnd::Stopped(request, code) => cancelled(request, code),
        CommandEnd::Failed(message) => Outcome::Error(message),
    }
}
