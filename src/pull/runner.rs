//! One leased job: slot → start → run (with heartbeats and live logs) → result spooled → log
//! flushed → complete → the job's container, network and workspace removed → slot freed. It
//! decides what is sent for the job and when to stop sending; the run itself is the path it
//! shares with push mode (`crate::state::run`), and the result goes out through `delivery`.
//! The cleanup starts once the delivery ended (or [`CLEANUP_WAITS_FOR_DELIVERY`] after the
//! result was spooled, whichever comes first): the result does not compete with it for the
//! engine and the CPUs, and the slot stays taken until the job's resources are free.
//!
//! The job's helpers (heartbeat, log streamer, watchers) are owned by the job's task through
//! abort-on-drop handles: whatever ends the task — its end, an early return, a panic — ends
//! them too, so no lease is kept alive for a job nobody runs.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::delivery::{Watch, deliver};
use super::heartbeat::{LEASE_LOST, keep_alive, lease_deadline};
use super::logs::LogFile;
use super::spool::{LeaseRecord, SpoolEntry};
use super::streamer::{StreamEnd, Streamer};
use super::{AwaitingSlot, Ctx};
use crate::api::StartOutcome;
use futures_util::future::BoxFuture;

use crate::executor::{Cleanup, JobControl, JobEvent, JobObserver, OutputStream, Resume};
use crate::metrics::Mode;
use crate::state::admit::{Refusal, SlotWait};
use crate::state::run::{Output, Ran, run, settle};
use crate::state::slots::Slot;
use crate::wire::pull::{CompleteRequest, Lease, StartRequest, lease_ttl};
use crate::wire::{JobResult, JobStatus, rfc3339};

/// How long a job's cleanup waits for its log and result to be sent. Sending them takes
/// milliseconds when the API is well, and the cleanup would only compete with them for the
/// engine and the CPUs; an API slow to take them (retries, `Retry-After`) must not keep a
/// finished job's containers running.
pub const CLEANUP_WAITS_FOR_DELIVERY: Duration = Duration::from_secs(5);

/// What became of a leased job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    /// Not run (start refused, lease expired before start, shutting down).
    Dropped,
    /// Run, or completed with `error` without running (whatever its result, delivered or not).
    Ran,
}

/// Runs one leased job to its end. `received` is when the lease answer arrived; `name` is the
/// job's one spool name (its lease record, log and result, also if its task panics).
/// `slot` is the job's slot, or, when none was free, the mark that it is waiting for one.
pub async fn run_job(
    ctx: Arc<Ctx>,
    lease: Lease,
    received: Instant,
    name: String,
    slot: Result<Slot, AwaitingSlot>,
) -> JobEnd {
    let job_id = lease.job.job_id;
    let watch = Watch::new(&ctx.state, job_id);
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
    let record = LeaseRecord {
        job_id,
        lease_id: lease.lease_id.clone(),
        job: Some(lease.job.clone()),
        resume: None,
    };
    if let Err(e) = ctx.spool.write_lease_async(&name, &record).await {
        tracing::warn!(job_id, error = %e, "cannot record the lease: a crash now would leave the job to expire");
    }
    let leased = Carried {
        lease: &lease,
        renewed: received,
        ttl,
        name: &name,
        record,
    };
    carry(ctx, leased, &watch, None).await
}

/// A started job's lease, when it was last renewed, its spool name and its lease record.
pub(super) struct Carried<'a> {
    pub lease: &'a Lease,
    pub renewed: Instant,
    pub ttl: Duration,
    pub name: &'a str,
    pub record: LeaseRecord,
}

/// A started job from its first heartbeat to its cleanup; with `resume`, one an earlier agent
/// process started, carried on from where it was (`pull::adopt`).
pub(super) async fn carry(
    ctx: Arc<Ctx>,
    carried: Carried<'_>,
    watch: &Watch,
    resume: Option<&Resume>,
) -> JobEnd {
    let lease = carried.lease;
    let stop_heartbeat = CancellationToken::new();
    let heartbeat = AbortOnDropHandle::new(tokio::spawn(keep_alive(
        ctx.clone(),
        lease.job.job_id,
        lease.lease_id.clone(),
        carried.ttl,
        carried.renewed,
        watch.control.clone(),
        watch.lost.clone(),
        stop_heartbeat.clone(),
    )));
    let cleanup = run_and_report(&ctx, &carried, watch, resume).await;
    stop_heartbeat.cancel();
    let _ = heartbeat.await;
    // The result is out: the job's leftovers go now, and its slot and registration (dropped on
    // return) only after them.
    cleanup.finish().await;
    JobEnd::Ran
}

/// A slot for a leased job that found none free (push mode took the one the lease was asked
/// with): the first one freed, until the lease's deadline. `None`: the job is not started, and
/// the server re-queues it when the lease expires.
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
    match ctx.state.slot(SlotWait::Until(deadline)).await {
        Ok(slot) => Some(slot),
        Err(Refusal::NoSlotInTime) => {
            tracing::warn!(
                job_id,
                "no slot came free before the lease's deadline: job not started"
            );
            None
        }
        Err(_) => None,
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
/// rest of the log is delivered), then delivers log and result. Returns the job's cleanup, not
/// started yet.
async fn run_and_report(
    ctx: &Arc<Ctx>,
    carried: &Carried<'_>,
    watch: &Watch,
    resume: Option<&Resume>,
) -> Cleanup {
    let (lease, name) = (carried.lease, carried.name);
    let job_id = lease.job.job_id;
    let (lost, give_up, control) = (&watch.lost, &watch.give_up, &watch.control);
    let log_path = ctx.spool.log_path(name);
    ctx.spool.ensure_reserve_async().await;
    let (ran, log, streamer) =
        match LogFile::create(&log_path, Some(ctx.spool.reserve_path())).await {
            Ok(log) => {
                let log = Arc::new(log);
                let done = CancellationToken::new();
                let adopted = resume.is_some();
                let streamer = stream(ctx, lease, &log, &done, lost, control, give_up, adopted);
                // A full disk cuts the log: the job is stopped then, and ends with `error`.
                let cut = log.cut_signal();
                let stopper = control.clone();
                let _on_cut = AbortOnDropHandle::new(tokio::spawn(async move {
                    cut.cancelled().await;
                    // Graceful: an abort would also stop the delivery of what was kept.
                    stopper.cancel("the job's log could not be written (disk full)");
                }));
                let output = LogOutput {
                    log: &log,
                    watch,
                    ctx,
                    name,
                    record: &carried.record,
                };
                let ran = run(&ctx.state, Mode::Pull, &lease.job, resume, control, &output).await;
                (ran, Some(log), Some((streamer, done)))
            }
            Err(e) => {
                let message = format!("cannot buffer the job's log in {}: {e}", log_path.display());
                ctx.state.metrics.job_started(Mode::Pull);
                let result = JobResult::agent_error(job_id, message);
                let ran = settle(&ctx.state, Mode::Pull, result, !lost.is_cancelled()).await;
                (ran, None, None)
            }
        };

    let Ran {
        result,
        mut cleanup,
        ..
    } = ran;
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
    let send = async {
        if let Some((streamer, done)) = streamer {
            done.cancel();
            let end = streamer.await.unwrap_or(StreamEnd::Stopped);
            tracing::debug!(job_id, ?end, "log streaming ended");
        }
        // With the lease lost, the server may have given the job to another agent: nothing
        // more is sent, and the spool forgets the job.
        deliver(ctx, name, &entry, watch).await;
    };
    send_then_clean(send, &mut cleanup, job_id).await;
    cleanup
}

/// Runs `send` (the rest of the log, then the result) before `cleanup` starts, unless sending
/// takes longer than [`CLEANUP_WAITS_FOR_DELIVERY`]: then the cleanup starts meanwhile.
async fn send_then_clean(send: impl Future<Output = ()>, cleanup: &mut Cleanup, job_id: i64) {
    tokio::pin!(send);
    if tokio::time::timeout(CLEANUP_WAITS_FOR_DELIVERY, &mut send)
        .await
        .is_err()
    {
        tracing::info!(
            job_id,
            "the result is not delivered yet: removing the job's container meanwhile"
        );
        cleanup.start();
        send.await;
    }
}

/// A pulled job's output: its buffered log, which the streamer sends as it grows; and its
/// progress, kept in its lease record for an agent restarted under it.
struct LogOutput<'a> {
    log: &'a LogFile,
    watch: &'a Watch,
    ctx: &'a Ctx,
    name: &'a str,
    record: &'a LeaseRecord,
}

impl JobObserver for LogOutput<'_> {
    fn output(&self, stream: OutputStream, data: &[u8]) {
        self.log.output(stream, data);
    }

    fn event(&self, event: JobEvent<'_>) {
        self.log.event(event);
    }

    fn progress<'b>(&'b self, resume: &'b Resume) -> BoxFuture<'b, ()> {
        Box::pin(async move {
            let mut record = self.record.clone();
            record.resume = Some(resume.clone());
            let written = self.ctx.spool.write_lease_async(self.name, &record).await;
            if let Err(e) = written {
                // The record on disk is behind the job now: a restarted agent reading it could
                // run a command again. It must not be carried on (see `Spool::not_adoptable`).
                tracing::error!(job_id = record.job_id, error = %e, "cannot record the job's progress: an agent restarted now will not carry it on");
                self.ctx
                    .spool
                    .not_adoptable_async(self.name, self.record)
                    .await;
            }
        })
    }
}

impl Output for LogOutput<'_> {
    async fn finish(&self, result: JobResult) -> JobResult {
        if self.watch.lost.is_cancelled() || self.watch.give_up.is_cancelled() {
            // Nothing more is sent for the job: no reason to wait for a backlog.
            self.log.discard();
        }
        let synced = self.log.finish().await;
        with_log_problem(result, self.log.cut(), synced.err())
    }

    fn answered(&self) -> bool {
        !self.watch.lost.is_cancelled()
    }
}

/// Streams `log` while the job runs; a logs call that says the lease is gone kills the job. An
/// `adopted` job's log is made again from its start: the server's `committed` is asked first.
#[allow(clippy::too_many_arguments)]
fn stream(
    ctx: &Arc<Ctx>,
    lease: &Lease,
    log: &Arc<LogFile>,
    done: &CancellationToken,
    lost: &CancellationToken,
    control: &JobControl,
    give_up: &CancellationToken,
    adopted: bool,
) -> AbortOnDropHandle<StreamEnd> {
    let job_id = lease.job.job_id;
    let streamer = Streamer::new(ctx.clone(), job_id, lease.lease_id.clone(), log.clone());
    let stream = streamer.run_from_server(done.clone(), give_up.clone(), adopted);
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

/// A leased job as the runner answers for it when it cannot run it: which job, which lease,
/// when the lease answer arrived, and the job's one spool name.
#[derive(Debug, Clone)]
pub struct Leased {
    pub job_id: i64,
    pub lease_id: String,
    pub ttl_seconds: u64,
    pub received: Instant,
    pub name: String,
}

/// Completes a leased job with `error` without running it (its job spec cannot be read, or the
/// agent failed while running it): `start` (when `needs_start`), then the completion, spooled
/// under the job's name like any other (it replaces a lease record left by the failed run).
pub async fn complete_with_error(
    ctx: Arc<Ctx>,
    leased: Leased,
    needs_start: bool,
    message: String,
) -> JobEnd {
    let job_id = leased.job_id;
    let watch = Watch::new(&ctx.state, job_id);
    tracing::error!(job_id, error = %message, "completing the job with `error`");
    let deadline = lease_deadline(leased.received, lease_ttl(leased.ttl_seconds));
    if needs_start && !start(&ctx, job_id, &leased.lease_id, deadline).await {
        return JobEnd::Dropped;
    }
    let entry = SpoolEntry {
        job_id,
        log_file: None,
        request: CompleteRequest {
            lease_id: leased.lease_id,
            log_bytes: 0,
            result: JobResult::agent_error(job_id, message),
        },
    };
    if let Err(e) = ctx.spool.write_async(&leased.name, &entry).await {
        tracing::error!(job_id, error = %e, "cannot spool the result; sending it anyway");
    }
    deliver(&ctx, &leased.name, &entry, &watch).await;
    JobEnd::Ran
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
