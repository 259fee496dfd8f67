//! The lease loop: asks for work only with a free slot (and, in ephemeral modes, only for jobs it
//! will still run), hands each lease to a runner, and ends on drain, idleness or the job limit.
//!
//! It never runs a job itself and never sends anything but `lease`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::Ctx;
use super::runner::{JobEnd, run_job};
use crate::agent::AgentOptions;
use crate::api::retry::MAX_BACKOFF;
use crate::api::{ApiError, LeaseOutcome};
use crate::wire::pull::LeaseRequest;

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
    loop {
        reap(&ctx, tasks);
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
        if let Some(problem) = state.capacity_problem() {
            // Health shows the reason; look again soon, the space may come back.
            tracing::debug!(reason = %problem, "not leasing");
            if let Some(end) = wait_or_stop(&ctx, options, Duration::from_secs(5)).await {
                return end;
            }
            continue;
        }
        let slot = tokio::select! {
            slot = state.slots.take() => slot,
            _ = state.shutdown.draining() => return WorkEnd::Draining,
            _ = idle(&ctx, options) => return WorkEnd::Idle,
            // Wakes the loop to reap finished jobs (the job limit may now be reached).
            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
        };
        let capacity = (state.slots.free() + 1).min(budget.unwrap_or(u64::MAX) as usize);
        let request = LeaseRequest {
            agent_id: state.agent_id.clone(),
            hostname: ctx.hostname.clone(),
            version: crate::VERSION.to_owned(),
            labels: state.settings.labels.clone(),
            capacity,
            wait_seconds: state.settings.lease_wait_seconds,
        };
        let outcome = tokio::select! {
            r = ctx.client.lease(&request) => r,
            // Abandons the long poll: no new job once shutdown began.
            _ = state.shutdown.draining() => return WorkEnd::Draining,
            _ = idle(&ctx, options) => return WorkEnd::Idle,
        };
        match outcome {
            Ok(LeaseOutcome::Job(lease)) => {
                state.metrics.lease_call("job");
                tracing::info!(
                    job_id = lease.job.job_id,
                    ttl = lease.lease_ttl_seconds,
                    "leased a job"
                );
                ctx.touch();
                tasks.spawn(run_job(ctx.clone(), *lease, Instant::now(), slot));
            }
            Ok(LeaseOutcome::NoJob) => {
                state.metrics.lease_call("empty");
            }
            Err(e @ ApiError::Unauthorized { .. }) => {
                drop(slot);
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
                drop(slot);
                state.metrics.lease_call("error");
                tracing::error!(error = %e, "lease failed; retrying in {}s", MAX_BACKOFF.as_secs());
                if let Some(end) = wait_or_stop(&ctx, options, MAX_BACKOFF).await {
                    return end;
                }
            }
        }
    }
}

/// Collects the jobs that ended.
fn reap(ctx: &Ctx, tasks: &mut JoinSet<JobEnd>) {
    while let Some(done) = tasks.try_join_next() {
        match done {
            Ok(JobEnd::Ran) => {
                ctx.ran.fetch_add(1, Ordering::AcqRel);
                ctx.touch();
            }
            Ok(JobEnd::Dropped) => ctx.touch(),
            Err(e) => tracing::error!(error = %e, "a job task failed"),
        }
    }
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
