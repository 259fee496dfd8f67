//! Keeps a job's lease alive: a heartbeat every `lease_ttl_seconds / 3`. On `cancel: true` it
//! cancels the job (gracefully); when the lease is lost (404/409/410, or no renewal confirmed
//! by the time only [`safety_margin`] of the TTL is left) it kills the job at once and marks
//! the lease lost, before the server can give the job to another agent.
//!
//! It only renews and reports; it never sends logs or results.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Ctx;
use crate::api::HeartbeatOutcome;
use crate::executor::JobControl;
use crate::wire::pull::{HeartbeatRequest, lease_ttl};

/// The reason a job stopped because the API asked.
pub const CANCELLED_BY_API: &str = "cancelled by the API";
/// The reason a job was killed because its lease was lost.
pub const LEASE_LOST: &str = "the lease was lost: the job may run elsewhere";

/// How much of a lease's TTL the agent leaves unused: a fifth of it, at least 0.5 s. It covers
/// what the agent cannot see — the time an answer took to arrive, the two clocks' rates, the
/// time to stop sending — so the agent is done with a lease before the server can re-lease it.
/// A fifth keeps two heartbeats (every third of the TTL) inside the usable part.
pub fn safety_margin(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_millis(500))
}

/// When a lease renewed at `renewed` for `ttl` must be treated as lost.
pub fn lease_deadline(renewed: Instant, ttl: Duration) -> Instant {
    renewed + ttl.saturating_sub(safety_margin(ttl))
}

/// Runs until `stop`, or until the lease is lost (then `lost` is cancelled). `renewed` is when
/// the lease was last confirmed (the lease answer's arrival at first); a heartbeat renews from
/// the moment it was sent, which is no later than when the server renewed it.
#[allow(clippy::too_many_arguments)]
pub async fn keep_alive(
    ctx: Arc<Ctx>,
    job_id: i64,
    lease_id: String,
    mut ttl: Duration,
    mut renewed: Instant,
    control: JobControl,
    lost: CancellationToken,
    stop: CancellationToken,
) {
    let request = HeartbeatRequest { lease_id };
    let interval = |ttl: Duration| (ttl / 3).max(Duration::from_millis(100));
    let mut next_beat = renewed + interval(ttl);
    loop {
        let deadline = lease_deadline(renewed, ttl);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next_beat.min(deadline)) => {}
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                job_id,
                margin_ms = safety_margin(ttl).as_millis() as u64,
                "no renewal confirmed in time: lease lost (stopping before the server's expiry), killing the job"
            );
            break;
        }
        let sent = Instant::now();
        let answer = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout_at(deadline, ctx.client.heartbeat(job_id, &request)) => r,
        };
        match answer {
            Ok(Ok(HeartbeatOutcome::Renewed {
                lease_ttl_seconds: 0,
                ..
            })) => {
                tracing::warn!(
                    job_id,
                    "the API renewed the lease for 0 s: lease lost, killing the job"
                );
                break;
            }
            Ok(Ok(HeartbeatOutcome::Renewed {
                cancel,
                lease_ttl_seconds,
            })) => {
                renewed = sent;
                ttl = lease_ttl(lease_ttl_seconds);
                next_beat = renewed + interval(ttl);
                if cancel && control.request().is_none() {
                    tracing::info!(job_id, "the API cancelled the job");
                    control.cancel(CANCELLED_BY_API);
                }
            }
            Ok(Ok(HeartbeatOutcome::Lost(status))) => {
                tracing::warn!(job_id, status, "lease lost: killing the job");
                break;
            }
            Ok(Err(e)) => {
                tracing::warn!(job_id, error = %e, "heartbeat refused");
                // Not renewed: try again an interval from now (the client already retried);
                // the deadline check above ends it in time.
                next_beat = Instant::now() + interval(ttl);
            }
            Err(_) => {
                tracing::warn!(
                    job_id,
                    "no renewal confirmed in time: lease lost (stopping before the server's expiry), killing the job"
                );
                break;
            }
        }
    }
    // Marked lost before the abort, so whoever sees the abort also sees why.
    lost.cancel();
    control.abort(LEASE_LOST);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_margin_is_a_fifth_of_the_ttl_and_at_least_half_a_second() {
        assert_eq!(
            safety_margin(Duration::from_secs(1)),
            Duration::from_millis(500)
        );
        assert_eq!(
            safety_margin(Duration::from_secs(3)),
            Duration::from_millis(600)
        );
        assert_eq!(
            safety_margin(Duration::from_secs(60)),
            Duration::from_secs(12)
        );
        let now = Instant::now();
        assert!(lease_deadline(now, Duration::from_secs(1)) > now);
    }
}
