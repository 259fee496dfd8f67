//! Push mode: jobs the existing API pushes to `POST /jobs/execute`, run in this agent's slots.
//!
//! A pushed job runs in its own task, not in the request's: if the client goes away mid-job, the
//! request future is dropped, which cancels the job (graceful stop); the job still ends in an
//! orderly way — container and workspace removed, metrics counted, and the (cancelled) result
//! sent to `callback_url` when there is one.
//!
//! The task answers first (the result to the request, and to the callback), then removes the
//! job's container, network and workspace, holding the job's slot until they are gone.

pub mod callback;

use std::sync::{Arc, OnceLock};

use secrecy::SecretString;
use tokio::sync::oneshot;

use crate::executor::{Discard, JobControl};
use crate::metrics::Mode;
use crate::state::AgentState;
use crate::state::run::Ran;
use crate::state::slots::Slot;
use crate::wire::{JobResult, JobSpec};

/// What the request is answered with.
#[derive(Debug)]
pub struct Answer {
    pub result: JobResult,
    /// The job failed because the agent could not run jobs (the reasons): it is given back.
    pub given_back: Option<String>,
}

/// Runs `job` in `slot` and returns its result as soon as it is made; the job's task goes on
/// removing what the job left, in its slot. `presented_key` is the caller's `X-API-Key`,
/// reused for the callback.
pub async fn run_job(
    state: Arc<AgentState>,
    job: JobSpec,
    slot: Slot,
    presented_key: SecretString,
) -> Answer {
    let job_id = job.job_id;
    let control = JobControl::new();
    let mut cancel_on_drop = CancelOnDrop(Some(control.clone()));
    let (answer, answered) = oneshot::channel();
    let task = tokio::spawn(run_in_slot(
        state,
        job,
        slot,
        control,
        presented_key,
        answer,
    ));
    let answer = match answered.await {
        Ok(answer) => answer,
        // The job's task ended without an answer: it panicked, and its container and workspace
        // guards cleaned up on the unwind.
        Err(_) => Answer {
            result: panic_result(job_id, task.await.err()),
            given_back: None,
        },
    };
    cancel_on_drop.0 = None;
    answer
}

async fn run_in_slot(
    state: Arc<AgentState>,
    job: JobSpec,
    slot: Slot,
    control: JobControl,
    presented_key: SecretString,
    answer: oneshot::Sender<Answer>,
) {
    let mut slot = slot;
    let _registered = state.jobs.register(job.job_id, control.clone());
    tracing::info!(job_id = job.job_id, "push job started");
    let Ran {
        result,
        given_back,
        cleanup,
    } = crate::state::run::run(&state, Mode::Push, &job, None, &control, &Discard).await;
    if given_back.is_none() {
        callback(&state, &job, &result, presented_key);
    }
    // The answer first (a client gone meanwhile is no reason to keep the container); the slot
    // and the job's registration are held until its container, network and workspace are gone.
    // Marked before the answer: the client's next request may wait for this slot even when the
    // queue is full (`state::slots`), as it could when the answer came after the cleanup.
    slot.cleaning_up();
    let _ = answer.send(Answer { result, given_back });
    cleanup.finish().await;
}

/// Sends `result` to the job's `callback_url`, when it has an allowed one, in a task of its own.
fn callback(state: &AgentState, job: &JobSpec, result: &JobResult, presented_key: SecretString) {
    let Some(url) = job.callback_url.as_deref().filter(|u| !u.is_empty()) else {
        return;
    };
    match callback::check(url, &state.settings.push.callback_allow) {
        Ok(url) => match http_client() {
            Some(client) => {
                let result = result.clone();
                tokio::spawn(async move {
                    callback::deliver(client, url, &presented_key, &result).await
                });
            }
            None => tracing::warn!(job_id = job.job_id, "callback not sent: no HTTP client"),
        },
        Err(e) => tracing::warn!(job_id = job.job_id, error = %e, "callback ignored"),
    }
}

/// Cancels the job when the request handling it is dropped before the job ended.
struct CancelOnDrop(Option<JobControl>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(control) = self.0.take() {
            tracing::warn!("push client went away mid-job: cancelling the job");
            control.cancel("the push client disconnected");
        }
    }
}

fn http_client() -> Option<&'static reqwest::Client> {
    static CLIENT: OnceLock<Option<reqwest::Client>> = OnceLock::new();
    CLIENT.get_or_init(callback::client).as_ref()
}

fn panic_result(job_id: i64, error: Option<tokio::task::JoinError>) -> JobResult {
    let error = error.map_or_else(
        || "the job's task ended without a result".into(),
        |e| e.to_string(),
    );
    JobResult::agent_error(
        job_id,
        format!("internal error while running the job: {error}"),
    )
}
