//! One leased job: slot → start → run (with heartbeats and live logs) → result spooled → log
//! flushed → complete. It decides what is sent for the job and when to stop sending; the
//! executor does the running.
//!
//! The job's helpers (heartbeat, log streamer, watchers) are owned by the job's task through
//! abort-on-drop handles: whatever ends the task — its end, an early return, a panic — ends
//! them too, so no lease is kept alive for a job nobody runs.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::heartbeat::{LEASE_LOST, keep_alive, lease_deadline};
use super::logs::LogFile;
use super::spool::{LeaseRecord, Spool, SpoolEntry};
use super::streamer::{StreamEnd, Streamer};
use super::{AwaitingSlot, Ctx};
use crate::api::{CompleteOutcome, StartOutcome};
use crate::executor::{JobControl, StopKind};
use crate::metrics::CountingObserver;
use crate::metrics::Mode;
use crate::slots::Slot;
use crate::wire::pull::{CompleteRequest, Lease, StartRequest, lease_ttl};
use crate::wire::{JobResult, JobStatus, rfc3339};

/// What became of a leased job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    /// Not run (start refused, lease expired before start, shutting down).
    Dropped,
    /// Run, or completed with `error` without running (whatever its result, delivered or not).
    Ran,
}

/// Runs one leased job to its end. `received` is when the lease answer arrived.
/// `slot` is the job's slot, or, when none was free, the mark that it is waiting for one.
pub async fn run_job(
    ctx: Arc<Ctx>,
    lease: Lease,
    received: Instant,
    slot: Result<Slot, AwaitingSlot>,
) -> JobEnd {
    let job_id = lease.job.job_id;
    let control = JobControl::new();
    let _registered = ctx.state.jobs.register(job_id, control.clone());
    let ttl = lease_ttl(lease.lease_ttl_seconds);
    let deadline = lease_deadline(received, ttl);

    if ctx.state.shutdown.is_draining() {
        tracing::info!(job_id, "shutting down: the leased job is not started");
        return JobEnd::Dropped;
    }
    let _slot = match slot {
        Ok(slot) => slot,
        Err(waiting) => match take_slot(&ctx, job_id, deadline, waiting).await {
            Some(slot) => slot,
            None => return JobEnd::Dropped,
        },
    };
    if !start(&ctx, job_id, &lease.lease_id, deadline).await {
        return JobEnd::Dropped;
    }
    tracing::info!(job_id, "job started");
    let name = Spool::new_name(job_id);
    let record = LeaseRecord {
        job_id,
        lease_id: lease.lease_id.clone(),
    };
    if let Err(e) = ctx.spool.write_lease_async(&name, &record).await {
        tracing::warn!(job_id, error = %e, "cannot record the lease: a crash now would leave the job to expire");
    }

    let lost = CancellationToken::new();
    let stop_heartbeat = CancellationToken::new();
    let heartbeat = AbortOnDropHandle::new(tokio::spawn(keep_alive(
        ctx.clone(),
        job_id,
        lease.lease_id.clone(),
        ttl,
        received,
        control.clone(),
        lost.clone(),
        stop_heartbeat.clone(),
    )));
    // Stops streaming and delivery at once: the lease was lost or a second signal came.
    let give_up = CancellationToken::new();
    let _watcher = AbortOnDropHandle::new(tokio::spawn(cancel_on_abort(
        control.clone(),
        lost.clone(),
        give_up.clone(),
    )));

    ctx.state.metrics.job_started(Mode::Pull);
    run_and_report(&ctx, &lease, &name, &control, &lost, &give_up).await;
    stop_heartbeat.cancel();
    let _ = heartbeat.await;
    JobEnd::Ran
}

/// A slot for a leased job that found none free (push mode took the one the lease was asked
/// with): the first one freed, until the lease's deadline. `None`: the job is not started, and
/// the server re-queues it when the lease expires. No operator limit is lifted for it.
async fn take_slot(
    ctx: &Ctx,
    job_id: i64,
    deadline: Instant,
    _waiting: AwaitingSlot,
) -> Option<Slot> {
    tracing::info!(
        job_id,
        "every slot was taken meanwhile (push mode): waiting for one"
    );
    tokio::select! {
        slot = ctx.state.slots.take() => Some(slot),
        _ = tokio::time::sleep_until(deadline) => {
            tracing::warn!(job_id, "no slot came free before the lease's deadline: job not started");
            None
        }
        _ = ctx.state.shutdown.draining() => None,
    }
}

/// Sends `start`; true when the job may run.
async fn start(ctx: &Ctx, job_id: i64, lease_id: &str, deadline: Instant) -> bool {
    let start = StartRequest {
        lease_id: lease_id.to_owned(),
        started_at: rfc3339(OffsetDateTime::now_utc()),
    };
    match tokio::time::timeout_at(deadline, ctx.client.start(job_id, &start)).await {
        Ok(Ok(StartOutcome::Started)) => true,
        Ok(Ok(StartOutcome::NotHeld(status))) => {
            tracing::warn!(
                job_id,
                status,
                "start refused: the lease is not held; job not run"
            );
            false
        }
        Ok(Err(e)) => {
            tracing::error!(job_id, error = %e, "start failed; job not run");
            false
        }
        Err(_) => {
            tracing::warn!(
                job_id,
                "the lease ran out before start got through; job not run"
            );
            false
        }
    }
}

/// Runs the job with its log streaming, spools the result the moment the job ends (before the
/// rest of the log is delivered), then delivers log and result.
async fn run_and_report(
    ctx: &Arc<Ctx>,
    lease: &Lease,
    name: &str,
    control: &JobControl,
    lost: &CancellationToken,
    give_up: &CancellationToken,
) {
    let job_id = lease.job.job_id;
    let log_path = ctx.spool.log_path(name);
    ctx.spool.ensure_reserve_async().await;
    let (result, log, streamer) =
        match LogFile::create(&log_path, Some(ctx.spool.reserve_path())).await {
            Ok(log) => {
                let log = Arc::new(log);
                let done = CancellationToken::new();
                let streamer = stream(ctx, lease, &log, &done, lost, control, give_up);
                // A full disk cuts the log: the job is stopped then, and ends with `error`.
                let cut = log.cut_signal();
                let stopper = control.clone();
                let _on_cut = AbortOnDropHandle::new(tokio::spawn(async move {
                    cut.cancelled().await;
                    // Graceful: an abort would also stop the delivery of what was kept.
                    stopper.cancel("the job's log could not be written (disk full)");
                }));
                let observer = CountingObserver {
                    inner: &*log,
                    metrics: &ctx.state.metrics,
                };
                let result = ctx.state.executor.run(&lease.job, &observer, control).await;
                if lost.is_cancelled() || give_up.is_cancelled() {
                    // Nothing more is sent for the job: no reason to wait for a backlog.
                    log.discard();
                }
                let synced = log.finish().await;
                let result = with_log_problem(result, log.cut(), synced.err());
                (result, Some(log), Some((streamer, done)))
            }
            Err(e) => {
                let message = format!("cannot buffer the job's log in {}: {e}", log_path.display());
                (JobResult::agent_error(job_id, message), None, None)
            }
        };
    let mut result = result;
    if result.status == JobStatus::Error && !lost.is_cancelled() {
        // Not the job's fault when the agent itself cannot run jobs now: say so, so the API
        // runs it again, and lease nothing until the agent is healthy.
        let error = result.error.clone().unwrap_or_default();
        if let Some(reasons) = ctx.state.check_after_error(job_id, &error).await {
            crate::agent::readiness::give_back(&mut result, &reasons);
        }
    }
    ctx.state
        .metrics
        .job_finished(Mode::Pull, result.status, result.duration_seconds);
    tracing::info!(job_id, status = result.status.as_str(), "job finished");

    let entry = SpoolEntry {
        job_id,
        log_file: log.as_ref().map(|_| format!("{name}.log")),
        request: CompleteRequest {
            lease_id: lease.lease_id.clone(),
            log_bytes: log.as_ref().map(|l| l.len()).unwrap_or(0),
            result,
        },
    };
    // The result first: durable before the log's last chunks are sent.
    if !lost.is_cancelled()
        && let Err(e) = ctx.spool.write_async(name, &entry).await
    {
        tracing::error!(job_id, error = %e, "cannot spool the result; sending it anyway");
    }
    if let Some((streamer, done)) = streamer {
        done.cancel();
        let end = streamer.await.unwrap_or(StreamEnd::Stopped);
        tracing::debug!(job_id, ?end, "log streaming ended");
    }
    if lost.is_cancelled() {
        // The server may have given the job to another agent: send nothing more.
        ctx.spool.remove_async(name).await;
    } else {
        deliver(ctx, name, &entry, give_up, lost).await;
    }
}

/// Streams `log` while the job runs; a logs call that says the lease is gone kills the job.
fn stream(
    ctx: &Arc<Ctx>,
    lease: &Lease,
    log: &Arc<LogFile>,
    done: &CancellationToken,
    lost: &CancellationToken,
    control: &JobControl,
    give_up: &CancellationToken,
) -> AbortOnDropHandle<StreamEnd> {
    let job_id = lease.job.job_id;
    let stream = Streamer::new(ctx.clone(), job_id, lease.lease_id.clone(), log.clone())
        .run(done.clone(), give_up.clone());
    let (lost, abort) = (lost.clone(), control.clone());
    AbortOnDropHandle::new(tokio::spawn(async move {
        let end = stream.await;
        if end == StreamEnd::Lost {
            // A logs call said the lease is gone: same as a lost heartbeat.
            tracing::warn!(job_id, "lease lost (logs): killing the job");
            lost.cancel();
            abort.abort(LEASE_LOST);
        }
        end
    }))
}

/// A job whose log was cut (disk full) or could not be made durable ends with `error`, saying
/// why: the agent cannot vouch for what it did not keep.
fn with_log_problem(
    mut result: JobResult,
    cut: Option<String>,
    sync: Option<std::io::Error>,
) -> JobResult {
    let problem = match (cut, sync) {
        (Some(cut), _) => cut,
        (None, Some(e)) => format!("cannot make the job's log durable (fsync): {e}"),
        (None, None) => return result,
    };
    result.status = JobStatus::Error;
    result.success = false;
    result.error = Some(match result.error.take() {
        Some(earlier) => format!("{problem} (the job then ended with: {earlier})"),
        None => problem,
    });
    result
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
            ctx.spool.remove_async(name).await;
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

/// Completes a leased job with `error` without running it (its job spec cannot be read, or the
/// agent failed while running it): `start` (when `needs_start`), then the completion, spooled
/// like any other. `received` is when the lease answer arrived.
pub async fn complete_with_error(
    ctx: Arc<Ctx>,
    job_id: i64,
    lease_id: String,
    ttl_seconds: u64,
    received: Instant,
    needs_start: bool,
    message: String,
) -> JobEnd {
    let control = JobControl::new();
    let _registered = ctx.state.jobs.register(job_id, control.clone());
    tracing::error!(job_id, error = %message, "completing the job with `error`");
    let deadline = lease_deadline(received, lease_ttl(ttl_seconds));
    if needs_start && !start(&ctx, job_id, &lease_id, deadline).await {
        return JobEnd::Dropped;
    }
    let name = Spool::new_name(job_id);
    let entry = SpoolEntry {
        job_id,
        log_file: None,
        request: CompleteRequest {
            lease_id,
            log_bytes: 0,
            result: JobResult::agent_error(job_id, message),
        },
    };
    if let Err(e) = ctx.spool.write_async(&name, &entry).await {
        tracing::error!(job_id, error = %e, "cannot spool the result; sending it anyway");
    }
    let (give_up, lost) = (CancellationToken::new(), CancellationToken::new());
    let _watcher = AbortOnDropHandle::new(tokio::spawn(cancel_on_abort(
        control,
        lost.clone(),
        give_up.clone(),
    )));
    deliver(&ctx, &name, &entry, &give_up, &lost).await;
    JobEnd::Ran
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

/// Runs a job's whole task and turns a panic anywhere in it into `Err(message)`. The job's
/// helpers die with the panicking task (their handles abort on drop).
pub async fn catch_panic<F: std::future::Future<Output = JobEnd>>(
    job: F,
) -> Result<JobEnd, String> {
    use futures_util::FutureExt;
    std::panic::AssertUnwindSafe(job)
        .catch_unwind()
        .await
        .map_err(|panic| {
            panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Sets its flag when dropped: tells when a helper task was ended.
    struct Ended(Arc<AtomicBool>);
    impl Drop for Ended {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_panic_in_a_job_ends_its_helpers_and_is_reported() {
        let ended = Arc::new(AtomicBool::new(false));
        let flag = Ended(ended.clone());
        let job = async move {
            // A heartbeat stand-in: it would run forever.
            let _helper = AbortOnDropHandle::new(tokio::spawn(async move {
                let _flag = flag;
                std::future::pending::<()>().await;
            }));
            tokio::task::yield_now().await;
            panic!("job spec made the agent panic");
        };
        let outcome = catch_panic(job).await;
        assert_eq!(outcome, Err("job spec made the agent panic".to_owned()));
        for _ in 0..100 {
            if ended.load(Ordering::SeqCst) {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the helper outlived the job");
    }

    #[test]
    fn a_cut_log_makes_the_result_an_error() {
        let mut ok = JobResult::agent_error(1, String::new());
        ok.status = JobStatus::Success;
        ok.success = true;
        ok.error = None;
        let cut = with_log_problem(ok.clone(), Some("disk full at 10".into()), None);
        assert_eq!(cut.status, JobStatus::Error);
        assert!(!cut.success);
        assert_eq!(cut.error.as_deref(), Some("disk full at 10"));
        assert_eq!(with_log_problem(ok.clone(), None, None), ok);
    }
}
