//! Push jobs with a callback that an earlier agent process left, taken on by this one.
//!
//! At start, before the first sweep, [`claim`] reads the records (`record`): each job whose
//! record has its progress and no result yet is registered, so the sweep spares its container
//! and the drain waits for it, and takes a slot. Once the endpoint is up, [`spawn_all`] decides
//! each in a task of its own:
//!
//! - progress, container alive, a slot, the callback still allowed: carried on as if nothing
//!   happened (`Executor::adopt_then_clean` through `state::run`), its result posted to the
//!   callback as a push job's is, then its cleanup;
//! - progress, but any of those missing: given up — what it left is removed and the callback
//!   gets an `error` saying why (when it is still allowed);
//! - no progress (the agent stopped before the container started): the callback gets an `error`;
//! - a result (the agent stopped before the callback's delivery ended): sent again.
//!
//! Either way the record goes once the callback's delivery ended.

use std::sync::Arc;

use super::Callback;
use super::record::{Kept, PushRecord, Records};
use crate::executor::warm::Spared;
use crate::executor::{JobControl, Resume};
use crate::metrics::Mode;
use crate::state::AgentState;
use crate::state::jobs::RunningJobGuard;
use crate::state::run::{Ran, run};
use crate::state::slots::Slot;
use crate::wire::JobResult;

/// A push job of an earlier run, with what it holds until decided.
pub struct Claimed {
    kept: Kept,
    /// For a job that may be carried on: registered (spared by the sweep, waited for by the
    /// drain) and its slot, if one was free.
    held: Option<Held>,
}

struct Held {
    control: JobControl,
    slot: Option<Slot>,
    _registered: RunningJobGuard,
    /// A job that ran in a warm container: its parts carry the container's warm id.
    _spared: Option<Spared>,
}

/// Reads every record an earlier run left; registers each job that may be carried on and
/// takes a slot for it. Called before the first sweep, whatever the modes: a record exists
/// only if push mode was on, and its callback is owed an answer.
pub async fn claim(state: &Arc<AgentState>) -> Vec<Claimed> {
    let records = Records::in_state_dir(&state.settings.state_dir);
    records
        .all_async()
        .await
        .into_iter()
        .map(|(name, record)| {
            let held = (record.result.is_none() && record.resume.is_some()).then(|| {
                let control = JobControl::new();
                Held {
                    _registered: state.jobs.register(record.job.job_id, control.clone()),
                    control,
                    slot: state.slots.try_take(),
                    _spared: record.resume.as_ref().and_then(|r| state.executor.spare(r)),
                }
            });
            Claimed {
                kept: Kept::taken_over(records.clone(), name, record),
                held,
            }
        })
        .collect()
}

/// Decides each claimed job in a task of its own (see the module doc).
pub fn spawn_all(state: &Arc<AgentState>, claimed: Vec<Claimed>) {
    for job in claimed {
        tokio::spawn(decide(state.clone(), job));
    }
}

async fn decide(state: Arc<AgentState>, claimed: Claimed) {
    let Claimed { kept, held } = claimed;
    let record = kept.record().clone();
    let job_id = record.job.job_id;
    let callback = callback_of(&state, &record);
    if let Some(result) = record.result {
        tracing::info!(
            job_id,
            "sending the callback of a push job of an earlier run again"
        );
        return match callback {
            Ok(callback) => callback.send(result, Some(kept)).await,
            Err(why) => forget(kept, job_id, &why).await,
        };
    }
    let (Some(resume), Some(held)) = (record.resume.clone(), held) else {
        tracing::warn!(
            job_id,
            "a push job of an earlier run was not finished (its container had not started): \
             its callback gets `error`"
        );
        let message = "the agent stopped while this job started (killed, crashed or \
                       restarted), before its container ran: run it again";
        return send_error(callback, kept, message.to_owned()).await;
    };
    let callback = match callback {
        Ok(callback) => callback,
        Err(why) => return give_up(&state, &resume, Err(why), kept).await,
    };
    let Some(mut slot) = held.slot else {
        let why = "every slot is taken (fewer slots than before the restart)".to_owned();
        return give_up(&state, &resume, Ok((callback, why)), kept).await;
    };
    if let Err(why) = state.executor.can_carry_on(&record.job, &resume).await {
        return give_up(&state, &resume, Ok((callback, why)), kept).await;
    }
    tracing::info!(
        job_id,
        container = %resume.container,
        step = resume.steps.len(),
        "adopted a job of an earlier run"
    );
    let _adopted = state.adopted.begin(job_id);
    let job = &record.job;
    let Ran {
        result, cleanup, ..
    } = run(&state, Mode::Push, job, Some(&resume), &held.control, &kept).await;
    // Given back or not, the callback is told: no caller waits for an answer any more.
    callback.send(result, Some(kept)).await;
    slot.cleaning_up();
    cleanup.finish().await;
}

/// The job's callback as the settings allow it now, with the key its caller presented; else
/// why none can be sent.
fn callback_of(state: &AgentState, record: &PushRecord) -> Result<Callback, String> {
    let key = super::key_for(state, record.previous_key)
        .ok_or_else(|| "the agent has no key to send its callback with".to_owned())?;
    match Callback::allowed(state, &record.job, key) {
        Ok(Some(callback)) => Ok(callback),
        Ok(None) => Err("it has no callback_url".into()),
        Err(e) => Err(format!("its callback is no longer allowed: {e}")),
    }
}

/// Removes what the job left; its callback (when it can be sent) gets an `error` saying why.
async fn give_up(
    state: &AgentState,
    resume: &Resume,
    callback: Result<(Callback, String), String>,
    kept: Kept,
) {
    let job = kept.record().job.clone();
    let reason = match &callback {
        Ok((_, why)) | Err(why) => why.clone(),
    };
    tracing::warn!(job_id = job.job_id, reason = %reason, "gave up a job of an earlier run");
    state.adopted.gave_up();
    state.executor.give_up(&job, resume).await;
    let message = format!(
        "the agent stopped while this job ran (killed, crashed or restarted) and the restarted \
         agent could not carry it on ({reason}): run it again"
    );
    send_error(callback.map(|(c, _)| c), kept, message).await;
}

/// Posts an `error` result (`message`) to the callback, or forgets the record when none can be
/// sent.
async fn send_error(callback: Result<Callback, String>, kept: Kept, message: String) {
    let job_id = kept.record().job.job_id;
    match callback {
        Ok(callback) => {
            let result = JobResult::agent_error(job_id, message);
            callback.send(result, Some(kept)).await;
        }
        Err(why) => forget(kept, job_id, &why).await,
    }
}

async fn forget(kept: Kept, job_id: i64, why: &str) {
    tracing::warn!(job_id, reason = %why, "the callback of a push job of an earlier run is not sent");
    kept.forget().await;
}
