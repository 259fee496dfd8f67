//! Push mode: jobs the existing API pushes to `POST /jobs/execute`, run in this agent's slots.
//!
//! A pushed job runs in its own task, not in the request's: if the client goes away mid-job, the
//! request future is dropped, which cancels the job (graceful stop); the job still ends in an
//! orderly way — container and workspace removed, metrics counted, and the (cancelled) result
//! sent to `callback_url` when there is one.
//!
//! The task answers first (the result to the request, and to the callback), then removes the
//! job's container, network and workspace, holding the job's slot until they are gone.
//!
//! A job with an allowed `callback_url` outlives the agent process: its record (`record`) keeps
//! the job, its progress and then its result until the callback's delivery ended, and a
//! restarted agent carries it on or sends what it owes the callback (`adopt`). A job without
//! one does not: its caller's connection closes with the process, and the next start's sweep
//! removes its container.

pub mod adopt;
pub mod callback;
pub mod record;

use std::sync::{Arc, OnceLock};

use secrecy::{ExposeSecret, SecretString};
use tokio::sync::oneshot;

use crate::executor::{Discard, JobControl};
use crate::metrics::Mode;
use crate::state::AgentState;
use crate::state::run::{Ran, run};
use crate::state::slots::Slot;
use crate::wire::{JobResult, JobSpec};
use record::{Kept, PushRecord, Records};

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
    let previous_key = state
        .push_keys
        .as_ref()
        .is_some_and(|keys| keys.is_previous(presented_key.expose_secret().as_bytes()));
    let callback = Callback::of(&state, &job, presented_key);
    let kept = match &callback {
        Some(_) => keep(&state, &job, previous_key).await,
        None => None,
    };
    let Ran {
        result,
        given_back,
        cleanup,
    } = match &kept {
        Some(kept) => run(&state, Mode::Push, &job, None, &control, kept).await,
        None => run(&state, Mode::Push, &job, None, &control, &Discard).await,
    };
    match callback {
        Some(callback) if given_back.is_none() => callback.send(result.clone(), kept).await,
        // Given back: the answer (503) tells the API to run the job itself; no callback.
        _ => {
            if let Some(kept) = kept {
                kept.forget().await;
            }
        }
    }
    // The answer first (a client gone meanwhile is no reason to keep the container); the slot
    // and the job's registration are held until its container, network and workspace are gone.
    // Marked before the answer: the client's next request may wait for this slot even when the
    // queue is full (`state::slots`), as it could when the answer came after the cleanup.
    slot.cleaning_up();
    let _ = answer.send(Answer { result, given_back });
    cleanup.finish().await;
}

/// Starts the record of a job with a callback (see `record`); `None`, logged, when it cannot
/// be written: the job runs as before, but would not outlive the agent.
async fn keep(state: &AgentState, job: &JobSpec, previous_key: bool) -> Option<Kept> {
    let records = Records::in_state_dir(&state.settings.state_dir);
    let record = PushRecord {
        job: job.clone(),
        previous_key,
        resume: None,
        result: None,
    };
    match Kept::begin(records, record).await {
        Ok(kept) => Some(kept),
        Err(e) => {
            tracing::warn!(job_id = job.job_id, error = %e, "cannot record the push job: an agent restarted under it could not carry it on");
            None
        }
    }
}

/// Where a push job's result goes besides the answer: its `callback_url`, allowed by
/// `push.callback_allow`, with the key to present.
pub struct Callback {
    job_id: i64,
    url: reqwest::Url,
    key: SecretString,
}

impl Callback {
    /// The job's callback, when it has one and it is allowed (a refused one is logged).
    fn of(state: &AgentState, job: &JobSpec, key: SecretString) -> Option<Callback> {
        match Self::allowed(state, job, key) {
            Ok(callback) => callback,
            Err(e) => {
                tracing::warn!(job_id = job.job_id, error = %e, "callback ignored");
                None
            }
        }
    }

    /// The job's callback (`None` without a `callback_url`), or why it is not allowed.
    pub fn allowed(
        state: &AgentState,
        job: &JobSpec,
        key: SecretString,
    ) -> Result<Option<Callback>, callback::CallbackError> {
        let Some(url) = job.callback_url.as_deref().filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        let url = callback::check(url, &state.settings.push.callback_allow)?;
        Ok(Some(Callback {
            job_id: job.job_id,
            url,
            key,
        }))
    }

    /// Posts `result` in a task of its own. With the job's record, the result is kept in it
    /// first, and the record goes once the delivery ended (delivered or given up).
    pub async fn send(self, result: JobResult, kept: Option<Kept>) {
        let mut kept = kept;
        if let Some(kept) = &mut kept
            && kept.record().result.as_ref() != Some(&result)
        {
            kept.keep_result(&result).await;
        }
        let Some(client) = http_client() else {
            tracing::warn!(job_id = self.job_id, "callback not sent: no HTTP client");
            if let Some(kept) = kept {
                kept.forget().await;
            }
            return;
        };
        tokio::spawn(async move {
            callback::deliver(client, self.url, &self.key, &result).await;
            if let Some(kept) = kept {
                kept.forget().await;
            }
        });
    }
}

/// The key a callback of a job of an earlier run goes with: the one its caller presented (the
/// previous key, when it is still set), else the current one.
fn key_for(state: &AgentState, previous_key: bool) -> Option<SecretString> {
    let previous = state
        .settings
        .api_key_previous
        .clone()
        .filter(|k| previous_key && !k.expose_secret().is_empty());
    previous.or_else(|| state.api_key.clone())
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
