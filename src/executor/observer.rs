//! How modes watch a job: the [`JobObserver`] that receives its output and [`JobEvent`]s.

use futures_util::future::BoxFuture;

use crate::wire::StepResult;

use super::OutputStream;
use super::resume::Resume;

/// Progress of a job, for people (the CLI's header lines) and metrics.
#[derive(Debug, Clone, Copy)]
pub enum JobEvent<'a> {
    PullStarted { image: &'a str },
    PullStatus { image: &'a str, status: &'a str },
    PullFinished { image: &'a str },
    PullFailed { image: &'a str },
    CheckedOut { url: &'a str, commit: &'a str },
    StepStarted { index: usize, name: &'a str },
    StepFinished { index: usize, step: &'a StepResult },
}

/// Receives a job's output as it arrives and its progress. Called from the job's task: keep it
/// quick and never block on the network.
pub trait JobObserver: Send + Sync {
    fn output(&self, stream: OutputStream, data: &[u8]);
    fn event(&self, _event: JobEvent<'_>) {}

    /// What an agent restarted under the job needs to carry it on, each time it changed (the
    /// container started, a command started or finished). The job goes on once this returned:
    /// a mode that keeps it (pull mode, beside the lease) has it on disk before the command
    /// it names starts.
    fn progress<'a>(&'a self, _resume: &'a Resume) -> BoxFuture<'a, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// An observer that ignores everything.
pub struct Discard;

impl JobObserver for Discard {
    fn output(&self, _: OutputStream, _: &[u8]) {}
}
