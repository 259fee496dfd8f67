//! Delivering a job's result, one path for a job this run ran, a job completed with `error`
//! without running, and a result an earlier run left in the spool: the rest of its log (a
//! replay only; a running job's streamer sends its log as it goes), then the completion, until
//! the API takes it or says the lease is gone. Stopped at once when the lease is lost, and soon
//! after a second signal (the result then stays in the spool for the next start).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::Ctx;
use super::logs::LogFile;
use super::spool::SpoolEntry;
use super::streamer::{StreamEnd, Streamer};
use crate::api::CompleteOutcome;
use crate::executor::{JobControl, StopKind};
use crate::state::AgentState;
use crate::state::jobs::RunningJobGuard;

/// After a second signal, how long the killed job's log and result may still take to deliver
/// before they are left in the spool for the next start.
pub const DELIVERY_AFTER_ABORT: Duration = Duration::from_secs(10);

/// A job the agent answers for: registered as running (shutdown waits for it, a second signal
/// stops it), with the tokens that stop what is sent for it. Dropping it unregisters the job.
pub struct Watch {
    pub control: JobControl,
    /// Cancelled when the lease is lost: nothing more is sent for the job.
    pub lost: CancellationToken,
    /// Cancelled when sending must stop at once (the lease is lost, or a second signal came
    /// [`DELIVERY_AFTER_ABORT`] ago).
    pub give_up: CancellationToken,
    _registered: RunningJobGuard,
    _watcher: AbortOnDropHandle<()>,
}

impl Watch {
    pub fn new(state: &AgentState, job_id: i64) -> Self {
        let control = JobControl::new();
        let registered = state.jobs.register(job_id, control.clone());
        let (lost, give_up) = (CancellationToken::new(), CancellationToken::new());
        let watcher = AbortOnDropHandle::new(tokio::spawn(cancel_on_abort(
            control.clone(),
            lost.clone(),
            give_up.clone(),
        )));
        Watch {
            control,
            lost,
            give_up,
            _registered: registered,
            _watcher: watcher,
        }
    }
}

/// Sends what an earlier run left in the spool for one job: the rest of its log, then the
/// completion. False when told to stop at once (nothing more should be replayed).
pub async fn replay(ctx: &Arc<Ctx>, name: &str, entry: &SpoolEntry) -> bool {
    let job_id = entry.job_id;
    tracing::info!(job_id, "resending a spooled result");
    let watch = Watch::new(&ctx.state, job_id);
    // The log's path comes from the entry's own name, never from a path read off disk.
    let log = match entry.log_file {
        Some(_) => match LogFile::open(&ctx.spool.log_path(name)).await {
            Ok(log) => Some(log),
            Err(e) => {
                tracing::warn!(job_id, error = %e, "spooled log unreadable: completing without the rest of it");
                None
            }
        },
        None => None,
    };
    let end = match log {
        Some(log) => {
            let lease_id = entry.request.lease_id.clone();
            Streamer::new(ctx.clone(), job_id, lease_id, Arc::new(log))
                .resume(watch.give_up.clone())
                .await
        }
        None => StreamEnd::Delivered,
    };
    match end {
        StreamEnd::Lost => {
            tracing::warn!(
                job_id,
                "the API no longer holds the lease: spooled result dropped"
            );
            watch.lost.cancel();
        }
        StreamEnd::Stopped if watch.give_up.is_cancelled() => return false,
        _ => {}
    }
    deliver(ctx, name, entry, &watch).await;
    !watch.give_up.is_cancelled()
}

/// Sends a spooled completion until the API takes it or says the lease is gone; then forgets it
/// (at once, sending nothing, when the lease is already lost). On a final refusal or a stop it
/// stays in the spool for the next start.
pub async fn deliver(ctx: &Ctx, name: &str, entry: &SpoolEntry, watch: &Watch) {
    let job_id = entry.job_id;
    let answer = tokio::select! {
        biased;
        _ = watch.lost.cancelled() => {
            ctx.spool.remove_async(name).await;
            return;
        }
        _ = watch.give_up.cancelled() => {
            tracing::warn!(job_id, "stopping at once: the result stays in the spool for the next start");
            return;
        }
        r = ctx.client.complete(job_id, &entry.request) => r,
    };
    match answer {
        Ok(CompleteOutcome::Accepted) => {
            tracing::info!(job_id, "result delivered");
            ctx.spool.remove_async(name).await;
        }
        Ok(CompleteOutcome::LeaseLost(status)) => {
            tracing::warn!(
                job_id,
                status,
                "the API no longer holds the lease: result dropped"
            );
            ctx.spool.remove_async(name).await;
        }
        Err(e) => {
            tracing::error!(job_id, error = %e, "the API refused the result; it stays in the spool");
        }
    }
}

/// Cancels `give_up` when the job is stopped at once: immediately when its lease was lost,
/// after [`DELIVERY_AFTER_ABORT`] on a second signal (the result is still sent if the API
/// answers in time).
async fn cancel_on_abort(control: JobControl, lost: CancellationToken, give_up: CancellationToken) {
    let mut rx = control.subscribe();
    let _ = rx
        .wait_for(|r| matches!(r, Some(r) if r.kind == StopKind::Immediate))
        .await;
    // The heartbeat marks the lease lost before it aborts the job.
    if !lost.is_cancelled() {
        tokio::select! {
            _ = lost.cancelled() => {}
            _ = tokio::time::sleep(DELIVERY_AFTER_ABORT) => {}
        }
    }
    give_up.cancel();
}
