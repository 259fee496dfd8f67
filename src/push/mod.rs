//! Push mode: jobs the existing API pushes to `POST /jobs/execute`, run in this agent's slots.
//!
//! A pushed job runs in its own task, not in the request's: if the client goes away mid-job, the
//! request future is dropped, which cancels the job (graceful stop); the job still ends in an
//! orderly way — container and workspace removed, metrics counted, and the (cancelled) result
//! sent to `callback_url` when there is one.

pub mod callback;

use std::sync::{Arc, OnceLock};

use secrecy::SecretString;

use crate::executor::{Discard, JobControl};
use crate::metrics::Mode;
use crate::state::AgentState;
use crate::state::slots::Slot;
use crate::wire::{JobResult, JobSpec};

pub use crate::state::run::Ran;

/// Runs `job` in `slot` and returns its result. `presented_key` is the caller's `X-API-Key`,
/// reused for the callback.
pub async fn run_job(
    state: Arc<AgentState>,
    job: JobSpec,
    slot: Slot,
    presented_key: SecretString,
) -> Ran {
    let job_id = job.job_id;
    let control = JobControl::new();
    let mut cancel_on_drop = CancelOnDrop(Some(control.clone()));
    let task = tokio::spawn(run_in_slot(state, job, slot, control, presented_key));
    let ran = match task.await {
        Ok(ran) => ran,
        // The job task panicked: its container and workspace guards cleaned up on unwind.
        Err(e) => Ran {
            result: panic_result(job_id, e),
            given_back: None,
        },
    };
    cancel_on_drop.0 = None;
    ran
}

async fn run_in_slot(
    state: Arc<AgentState>,
    job: JobSpec,
    slot: Slot,
    control: JobControl,
    presented_key: SecretString,
) -> Ran {
    let _slot = slot;
    let _registered = state.jobs.register(job.job_id, control.clone());
    tracing::info!(job_id = job.job_id, "push job started");
    let ran = crate::state::run::run(&state, Mode::Push, &job, &control, &Discard).await;
    if ran.given_back.is_some() {
        return ran;
    }
    if let Some(url) = job.callback_url.as_deref().filter(|u| !u.is_empty()) {
        match callback::check(url, &state.settings.push.callback_allow) {
            Ok(url) => match http_client() {
                Some(client) => {
                    let result = ran.result.clone();
                    tokio::spawn(async move {
                        callback::deliver(client, url, &presented_key, &result).await
                    });
                }
                None => tracing::warn!(job_id = job.job_id, "callback not sent: no HTTP client"),
            },
            Err(e) => tracing::warn!(job_id = job.job_id, error = %e, "callback ignored"),
        }
    }
    ran
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

fn panic_result(job_id: i64, error: tokio::task::JoinError) -> JobResult {
    JobResult::agent_error(
        job_id,
        format!("internal error while running the job: {error}"),
    )
}
