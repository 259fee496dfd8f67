//! Running one admitted job, the same for pull and push: the metrics, the counting observer,
//! the executor, the output's end, and, after an `error`, the check whether the agent (not the
//! job) was at fault, in which case the job is given back. The result comes back before the
//! job's container, network and workspace are removed: the mode gets the handle of that
//! cleanup in [`Ran`], sends the result, then finishes the cleanup before it frees the job's
//! slot (the job's resources are in use until its container is gone).
//!
//! The mode keeps what is its own: pull mode its lease, log and delivery; push mode its
//! answer and callback. Registering the job in [`super::jobs::RunningJobs`] stays with the
//! mode too, as each registers at a different moment (pull before it waits for a slot).

use std::future::Future;

use super::AgentState;
use super::readiness::give_back;
use crate::executor::{Cleanup, JobControl, JobObserver, Resume};
use crate::metrics::{CountingObserver, Mode};
use crate::wire::{JobResult, JobSpec, JobStatus};

/// What became of a run job.
#[derive(Debug)]
pub struct Ran {
    pub result: JobResult,
    /// The job failed because the agent could not run jobs (the reasons): it is given back,
    /// so the API runs it again elsewhere.
    pub given_back: Option<String>,
    /// The removal of what the job left (container, network, workspace): not started until
    /// the mode finishes, starts or drops it.
    pub cleanup: Cleanup,
}

/// Where a job's output goes, and what the end of it says about the result.
pub trait Output: JobObserver {
    /// Called once the job ended: settles the output and may turn the result into an `error`
    /// (pull mode: a log that was cut or could not be made durable).
    fn finish(&self, result: JobResult) -> impl Future<Output = JobResult> + Send {
        std::future::ready(result)
    }

    /// False when nothing more will be sent for the job (pull mode: its lease is lost): an
    /// `error` is then not checked against the agent's own health.
    fn answered(&self) -> bool {
        true
    }
}

impl Output for crate::executor::Discard {}

/// Runs `job` with `output` and settles its result (see [`settle`]); its cleanup waits in
/// [`Ran::cleanup`]. With `resume`, the job is one an earlier agent process started, carried
/// on from where it was (`Executor::adopt_then_clean`).
pub async fn run(
    state: &AgentState,
    mode: Mode,
    job: &JobSpec,
    resume: Option<&Resume>,
    control: &JobControl,
    output: &impl Output,
) -> Ran {
    state.metrics.job_started(mode);
    let observer = CountingObserver {
        inner: output,
        metrics: &state.metrics,
    };
    let executor = &state.executor;
    let (result, cleanup) = match resume {
        None => executor.run_then_clean(job, &observer, control).await,
        Some(resume) => {
            executor
                .adopt_then_clean(job, resume, &observer, control)
                .await
        }
    };
    let result = output.finish(result).await;
    let settled = settle(state, mode, result, output.answered()).await;
    Ran { cleanup, ..settled }
}

/// The end of a job that [`AgentState::metrics`] counted as started (whether it ran or not):
/// an `error` is checked against the agent's health when `answered` (and given back when the
/// agent was at fault), the metrics count it as finished. Its cleanup is
/// [`Cleanup::nothing`]: the caller that has one puts it in.
pub async fn settle(state: &AgentState, mode: Mode, mut result: JobResult, answered: bool) -> Ran {
    let job_id = result.job_id;
    let mut given_back = None;
    if result.status == JobStatus::Error && answered {
        // Not the job's fault when the agent itself cannot run jobs now: say so, so the API
        // runs it again, and take nothing until the agent is healthy.
        let error = result.error.clone().unwrap_or_default();
        given_back = state.check_after_error(job_id, &error).await;
        if let Some(reasons) = &given_back {
            give_back(&mut result, reasons);
        }
    }
    state
        .metrics
        .job_finished(mode, result.status, result.duration_seconds);
    let what = match mode {
        Mode::Pull => "job finished",
        Mode::Push => "push job finished",
    };
    tracing::info!(
        job_id,
        status = result.status.as_str(),
        exit_code = result.exit_code,
        "{what}"
    );
    Ran {
        result,
        given_back,
        cleanup: Cleanup::nothing(job_id),
    }
}
