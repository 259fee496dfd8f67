//! One leased job: lease → start → run (with heartbeats and live logs) → log flushed → complete.
//! It decides what is sent for the job and when to stop sending; the executor does the running.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Ctx;
use super::heartbeat::{LEASE_LOST, keep_alive};
use super::logs::LogFile;
use super::spool::{Spool, SpoolEntry};
use super::streamer::{StreamEnd, Streamer};
use crate::api::{CompleteOutcome, StartOutcome};
use crate::executor::{JobControl, StopKind};
use crate::metrics::CountingObserver;
use crate::metrics::Mode;
use crate::slots::Slot;
use crate::wire::pull::{CompleteRequest, Lease, StartRequest, lease_ttl};
use crate::wire::{JobResult, rfc3339};

/// What became of a leased job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    /// Not run (start refused, lease expired before start, shutting down).
    Dropped,
    /// Run (whatever its result, delivered or not).
    Ran,
}

/// Runs one leased job to its end. `received` is when the lease answer arrived.
pub async fn run_job(ctx: Arc<Ctx>, lease: Lease, received: Instant, slot: Slot) -> JobEnd {
    let job_id = lease.job.job_id;
    let control = JobControl::new();
    let _registered = ctx.state.jobs.register(job_id, control.clone());
    let _slot = slot;
    let ttl = lease_ttl(lease.lease_ttl_seconds);
    let expires = received + ttl;

    if ctx.state.shutdown.is_draining() {
        tracing::info!(job_id, "shutting down: the leased job is not started");
        return JobEnd::Dropped;
    }
    let start = StartRequest {
        lease_id: lease.lease_id.clone(),
        started_at: rfc3339(OffsetDateTime::now_utc()),
    };
    match tokio::time::timeout_at(expires, ctx.client.start(job_id, &start)).await {
        Ok(Ok(StartOutcome::Started)) => {}
        Ok(Ok(StartOutcome::NotHeld(status))) => {
            tracing::warn!(
                job_id,
                status,
                "start refused: the lease is not held; job not run"
            );
            return JobEnd::Dropped;
        }
        Ok(Err(e)) => {
            tracing::error!(job_id, error = %e, "start failed; job not run");
            return JobEnd::Dropped;
        }
        Err(_) => {
            tracing::warn!(
                job_id,
                "the lease expired before start got through; job not run"
            );
            return JobEnd::Dropped;
        }
    }
    tracing::info!(job_id, "job started");

    let lost = CancellationToken::new();
    let stop_heartbeat = CancellationToken::new();
    let heartbeat = tokio::spawn(keep_alive(
        ctx.clone(),
        job_id,
        lease.lease_id.clone(),
        ttl,
        received,
        control.clone(),
        lost.clone(),
        stop_heartbeat.clone(),
    ));
    // Stops streaming and delivery at once: the lease was lost or a second signal came.
    let give_up = CancellationToken::new();
    let watcher = tokio::spawn(cancel_on_abort(
        control.clone(),
        lost.clone(),
        give_up.clone(),
    ));

    let name = Spool::new_name(job_id);
    let log_path = ctx.spool.log_path(&name);
    ctx.state.metrics.job_started(Mode::Pull);
    let (result, log) = match LogFile::create(&log_path) {
        Ok(log) => {
            let log = Arc::new(log);
            let done = CancellationToken::new();
            let stream = Streamer::new(ctx.clone(), job_id, lease.lease_id.clone(), log.clone())
                .run(done.clone(), give_up.clone());
            let (lost_by_logs, abort) = (lost.clone(), control.clone());
            let streamer = tokio::spawn(async move {
                let end = stream.await;
                if end == StreamEnd::Lost {
                    // A logs call said the lease is gone: same as a lost heartbeat.
                    tracing::warn!(job_id, "lease lost (logs): killing the job");
                    lost_by_logs.cancel();
                    abort.abort(LEASE_LOST);
                }
                end
            });
            let result = ctx
                .state
                .executor
                .run(
                    &lease.job,
                    &CountingObserver {
                        inner: &*log,
                        metrics: &ctx.state.metrics,
                    },
                    &control,
                )
                .await;
            log.finish();
            done.cancel();
            let end = streamer.await.unwrap_or(StreamEnd::Stopped);
            tracing::debug!(job_id, ?end, "log streaming ended");
            (result, Some(log))
        }
        Err(e) => {
            let message = format!("cannot buffer the job's log in {}: {e}", log_path.display());
            (JobResult::agent_error(job_id, message), None)
        }
    };
    ctx.state
        .metrics
        .job_finished(Mode::Pull, result.status, result.duration_seconds);
    tracing::info!(job_id, status = result.status.as_str(), "job finished");

    if lost.is_cancelled() {
        // The server may have given the job to another agent: send nothing more.
        ctx.spool.remove(&name);
    } else {
        let entry = SpoolEntry {
            job_id,
            log_file: log.as_ref().map(|_| format!("{name}.log")),
            request: CompleteRequest {
                lease_id: lease.lease_id.clone(),
                log_bytes: log.as_ref().map(|l| l.len()).unwrap_or(0),
                result,
            },
        };
        if let Err(e) = ctx.spool.write(&name, &entry) {
            tracing::error!(job_id, error = %e, "cannot spool the result; sending it anyway");
        }
        deliver(&ctx, &name, &entry, &give_up, &lost).await;
    }
    stop_heartbeat.cancel();
    let _ = heartbeat.await;
    watcher.abort();
    JobEnd::Ran
}

/// Sends a spooled completion until the API takes it or says the lease is gone; then forgets it.
/// On a final refusal or a stop it stays in the spool for the next start.
pub async fn deliver(
    ctx: &Ctx,
    name: &str,
    entry: &SpoolEntry,
    give_up: &CancellationToken,
    lost: &CancellationToken,
) {
    let job_id = entry.job_id;
    let answer = tokio::select! {
        biased;
        _ = lost.cancelled() => {
            ctx.spool.remove(name);
            return;
        }
        _ = give_up.cancelled() => {
            tracing::warn!(job_id, "stopping at once: the result stays in the spool for the next start");
            return;
        }
        r = ctx.client.complete(job_id, &entry.request) => r,
    };
    match answer {
        Ok(CompleteOutcome::Accepted) => {
            tracing::info!(job_id, "result delivered");
            ctx.spool.remove(name);
        }
        Ok(CompleteOutcome::LeaseLost(status)) => {
            tracing::warn!(
                job_id,
                status,
                "the API no longer holds the lease: result dropped"
            );
            ctx.spool.remove(name);
        }
        Err(e) => {
            tracing::error!(job_id, error = %e, "the API refused the result; it stays in the spool");
        }
    }
}

/// After a second signal, how long the killed job's log and result may still take to deliver
/// before they are left in the spool for the next start.
pub const DELIVERY_AFTER_ABORT: Duration = Duration::from_secs(10);

/// Cancels `give_up` when the job is stopped at once: immediately when its lease was lost,
/// after [`DELIVERY_AFTER_ABORT`] on a second signal (the result is still sent if the API
/// answers in time).
pub async fn cancel_on_abort(
    control: JobControl,
    lost: CancellationToken,
    give_up: CancellationToken,
) {
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
