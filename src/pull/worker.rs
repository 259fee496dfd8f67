//! The lease loop: asks for work only while a slot is free (and, in ephemeral modes, only for
//! jobs it will still run), without holding the slot during the long poll, hands each lease to
//! a runner, and ends on drain, idleness or the job limit.
//!
//! It paces itself: an answer that comes back well before the requested wait (or any answer,
//! with a wait of 0) is followed by a jittered pause, so an idle agent makes at most about two
//! lease calls a second whatever the server does.
//!
//! It never runs a job itself and never sends anything but `lease`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::Ctx;
use super::runner::{JobEnd, Leased, catch_panic, complete_with_error, run_job};
use super::spool::Spool;
use crate::api::retry::MAX_BACKOFF;
use crate::api::{ApiError, LeaseOutcome};
use crate::state::AgentOptions;
use crate::state::admit::Refusal;
use crate::wire::pull::LeaseRequest;

/// The shortest pause after a quick lease answer; the pause is uniform in [`QUICK_PAUSE`, 2 ×
/// [`QUICK_PAUSE`]].
pub const QUICK_PAUSE: Duration = Duration::from_millis(500);

/// How often the loop looks at its counters while it waits for jobs to end.
const TICK: Duration = Duration::from_millis(100);
/// A refused key is logged at most this often.
const CREDENTIALS_LOG_EVERY: Duration = Duration::from_secs(60);

/// Why the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkEnd {
    Draining,
    LimitReached,
    Idle,
}

pub async fn work(ctx: Arc<Ctx>, options: &AgentOptions, tasks: &mut JoinSet<JobEnd>) -> WorkEnd {
    let state = &ctx.state;
    let limit = match (options.once, options.max_jobs) {
        (true, Some(n)) => Some(n.min(1)),
        (true, None) => Some(1),
        (false, n) => n,
    };
    let mut last_credentials_log: Option<Instant> = None;
    let mut quick_logged = false;
    loop {
        let mut dropped = reap(&ctx, tasks);
        if state.shutdown.is_draining() {
            return WorkEnd::Draining;
        }
        let in_flight = tasks.len() as u64;
        let ran = ctx.ran.load(Ordering::Acquire);
        // Jobs this agent may still lease without ever leasing more than it will run.
        let budget = limit.map(|l| l.saturating_sub(ran + in_flight));
        if budget == Some(0) {
            if in_flight == 0 {
                return WorkEnd::LimitReached;
            }
            // The last jobs are still running: wait for them, leasing nothing more.
            if let Some(end) = wait_or_stop(&ctx, options, TICK).await {
                return end;
            }
            continue;
        }
        if let Err(refusal) = state.admission() {
            if refusal == Refusal::Draining {
                return WorkEnd::Draining;
            }
            // Health shows the reason; look again soon, the space may come back.
            tracing::debug!(reason = %refusal.message(), "not leasing");
            if let Some(end) = wait_or_stop(&ctx, options, Duration::from_secs(5)).await {
                return end;
            }
            continue;
        }
        tokio::select! {
            _ = slot_free(&ctx) => {}
            _ = state.shutdown.draining() => return WorkEnd::Draining,
            _ = idle(&ctx, options) => return WorkEnd::Idle,
            // Wakes the loop to reap finished jobs (the job limit may now be reached).
            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
        }
        // A leased job that was not started (start refused, lease gone) is a quick answer too:
        // a server that keeps handing out such jobs must not make the agent spin.
        dropped |= reap(&ctx, tasks);
        if dropped && let Some(end) = quick_pause(&ctx, options, &mut quick_logged, None).await {
            return end;
        }
        let capacity = state.slots.free().clamp(
            1,
            budget.unwrap_or(u64::MAX).min(usize::MAX as u64) as usize,
        );
        let wait_seconds = state.settings.lease_wait_seconds;
        let request = LeaseRequest {
            agent_id: state.agent_id.clone(),
            hostname: ctx.hostname.clone(),
            version: crate::VERSION.to_owned(),
            labels: state.settings.labels.clone(),
            capacity,
            wait_seconds,
        };
        let asked = Instant::now();
        // No slot is held during the long poll: push mode may take one meanwhile.
        let outcome = tokio::select! {
            r = ctx.client.lease(&request) => r,
            // Abandons the long poll: no new job once shutdown began.
            _ = state.shutdown.draining() => return WorkEnd::Draining,
            _ = idle(&ctx, options) => return WorkEnd::Idle,
        };
        let received = Instant::now();
        let mut quick = false;
        match outcome {
            Ok(LeaseOutcome::Job(lease)) if lease.lease_ttl_seconds == 0 => {
                state.metrics.lease_call("job");
                // Expired on arrival: the server would refuse any call for it.
                tracing::error!(
                    job_id = lease.job.job_id,
                    "the API leased a job with lease_ttl_seconds 0: not started (the lease is already over)"
                );
                quick = true;
            }
            Ok(LeaseOutcome::Job(lease)) => {
                state.metrics.lease_call("job");
                tracing::info!(
                    job_id = lease.job.job_id,
                    ttl = lease.lease_ttl_seconds,
                    "leased a job"
                );
                ctx.touch();
                // One spool name for the job's files, whatever becomes of its task.
                let leased = Leased {
                    job_id: lease.job.job_id,
                    lease_id: lease.lease_id.clone(),
                    ttl_seconds: lease.lease_ttl_seconds,
                    received,
                    name: Spool::new_name(lease.job.job_id),
                };
                // Taken here, before the next lease call can count it as free; when push mode
                // took it meanwhile, the job waits for one (and leasing waits with it).
                let slot = match state.slots.try_take() {
                    Some(slot) => Ok(slot),
                    None => Err(ctx.awaiting_slot()),
                };
                let job = run_job(ctx.clone(), *lease, received, leased.name.clone(), slot);
                tasks.spawn(guarded(ctx.clone(), leased, job));
            }
            Ok(LeaseOutcome::Unreadable(bad)) => {
                state.metrics.lease_call("job");
                ctx.touch();
                quick = true;
                if bad.lease_ttl_seconds == 0 {
                    tracing::error!(
                        job_id = bad.job_id,
                        error = %bad.error,
                        "the API leased an unreadable job with lease_ttl_seconds 0: not started"
                    );
                } else {
                    let message = format!("the agent cannot read this job: {}", bad.error);
                    let leased = Leased {
                        job_id: bad.job_id,
                        lease_id: bad.lease_id,
                        ttl_seconds: bad.lease_ttl_seconds,
                        received,
                        name: Spool::new_name(bad.job_id),
                    };
                    tasks.spawn(complete_with_error(ctx.clone(), leased, true, message));
                }
            }
            Ok(LeaseOutcome::NoJob) => {
                state.metrics.lease_call("empty");
                // Well before the wait asked for (or no wait at all): the long poll is not
                // pacing this agent, so it paces itself.
                quick =
                    received - asked < Duration::from_secs(wait_seconds) / 2 || wait_seconds == 0;
            }
            Err(e @ ApiError::Unauthorized { .. }) => {
                state.metrics.lease_call("unauthorized");
                let message = e.to_string();
                state.api_status.record_credentials_problem(message.clone());
                if last_credentials_log.is_none_or(|at| at.elapsed() >= CREDENTIALS_LOG_EVERY) {
                    tracing::error!(error = %message, "credentials problem; retrying every {}s", MAX_BACKOFF.as_secs());
                    last_credentials_log = Some(Instant::now());
                }
                if let Some(end) = wait_or_stop(&ctx, options, MAX_BACKOFF).await {
                    return end;
                }
            }
            Err(e) => {
                state.metrics.lease_call("error");
                tracing::error!(error = %e, "lease failed; retrying in {}s", MAX_BACKOFF.as_secs());
                if let Some(end) = wait_or_stop(&ctx, options, MAX_BACKOFF).await {
                    return end;
                }
            }
        }
        if quick
            && let Some(end) =
                quick_pause(&ctx, options, &mut quick_logged, Some(received - asked)).await
        {
            return end;
        }
    }
}

/// The jittered pause after a quick answer (0.5-1 s); the first one is logged.
async fn quick_pause(
    ctx: &Ctx,
    options: &AgentOptions,
    logged: &mut bool,
    answered_in: Option<Duration>,
) -> Option<WorkEnd> {
    if !*logged {
        tracing::warn!(
            wait_seconds = ctx.state.settings.lease_wait_seconds,
            answered_ms = answered_in.map(|d| d.as_millis() as u64),
            "the API answered the lease long poll well before the wait asked for (or with a job that could not be started): pausing 0.5-1 s between such calls"
        );
        *logged = true;
    }
    let pause = QUICK_PAUSE + QUICK_PAUSE.mul_f64(fastrand::f64());
    wait_or_stop(ctx, options, pause).await
}

/// Resolves when a slot is free and no leased job is still waiting for one (it would take the
/// slot a new lease was asked with). Waits for each without polling.
async fn slot_free(ctx: &Ctx) {
    loop {
        ctx.awaiting.none().await;
        ctx.state.slots.wait_free().await;
        if ctx.awaiting.count() == 0 {
            return;
        }
    }
}

/// Runs a job's task; a panic anywhere in it is logged and the job completed with `error`
/// (its helpers died with the task).
async fn guarded(ctx: Arc<Ctx>, leased: Leased, job: impl Future<Output = JobEnd>) -> JobEnd {
    match catch_panic(job).await {
        Ok(end) => end,
        Err(panic) => {
            tracing::error!(job_id = leased.job_id, panic = %panic, "the job's task panicked");
            let message =
                format!("the agent failed while running this job (internal error: {panic})");
            complete_with_error(ctx, leased, false, message).await
        }
    }
}

/// Collects the jobs that ended; true when one of them was dropped without running.
fn reap(ctx: &Ctx, tasks: &mut JoinSet<JobEnd>) -> bool {
    let mut dropped = false;
    while let Some(done) = tasks.try_join_next() {
        match done {
            Ok(JobEnd::Ran) => {
                ctx.ran.fetch_add(1, Ordering::AcqRel);
                ctx.touch();
            }
            Ok(JobEnd::Dropped) => {
                dropped = true;
                ctx.touch();
            }
            Err(e) => tracing::error!(error = %e, "a job task failed"),
        }
    }
    dropped
}

/// Sleeps `wait` unless shutdown begins or the agent turns idle first.
async fn wait_or_stop(ctx: &Ctx, options: &AgentOptions, wait: Duration) -> Option<WorkEnd> {
    tokio::select! {
        _ = tokio::time::sleep(wait) => None,
        _ = ctx.state.shutdown.draining() => Some(WorkEnd::Draining),
        _ = idle(ctx, options) => Some(WorkEnd::Idle),
    }
}

/// Resolves once the agent has had no job for `idle_exit` (never without `--idle-exit`).
async fn idle(ctx: &Ctx, options: &AgentOptions) {
    let Some(limit) = options.idle_exit else {
        return std::future::pending().await;
    };
    loop {
        if ctx.state.jobs.count() > 0 {
            ctx.touch();
        } else if ctx.idle_for() >= limit {
            return;
        }
        tokio::time::sleep(TICK).await;
    }
}
