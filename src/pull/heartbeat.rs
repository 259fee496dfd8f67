//! Keeps a job's lease alive: a heartbeat every `lease_ttl_seconds / 3`. On `cancel: true` it
//! cancels the job (gracefully); when the lease is lost (404/409/410, or no successful heartbeat
//! for a whole TTL) it kills the job at once and marks the lease lost.
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

/// Runs until `stop`, or until the lease is lost (then `lost` is cancelled).
#[allow(clippy::too_many_arguments)]
pub async fn keep_alive(
    ctx: Arc<Ctx>,
    job_id: i64,
    lease_id: String,
    mut ttl: Duration,
    mut last_renewal: Instant,
    control: JobControl,
    lost: CancellationToken,
    stop: CancellationToken,
) {
    let request = HeartbeatRequest { lease_id };
    let interval = |ttl: Duration| (ttl / 3).max(Duration::from_millis(100));
    // Counted from the lease's last renewal (the lease answer at first), not from whenever the
    // previous call ended: a slow `start` or heartbeat must not push the next past the TTL.
    let mut next_beat = last_renewal + interval(ttl);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next_beat) => {}
        }
        let deadline = last_renewal + ttl;
        let answer = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout_at(deadline, ctx.client.heartbeat(job_id, &request)) => r,
        };
        match answer {
            Ok(Ok(HeartbeatOutcome::Renewed {
                cancel,
                lease_ttl_seconds,
            })) => {
                last_renewal = Instant::now();
                ttl = lease_ttl(lease_ttl_seconds);
                next_beat = last_renewal + interval(ttl);
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
                // Not renewed: try again an interval from now (the client already retried).
                next_beat = Instant::now() + interval(ttl);
                if Instant::now() >= deadline {
                    tracing::warn!(
                        job_id,
                        "no heartbeat got through for a whole TTL: lease lost"
                    );
                    break;
                }
            }
            Err(_) => {
                tracing::warn!(
                    job_id,
                    "no heartbeat got through for a whole TTL: lease lost, killing the job"
                );
                break;
            }
        }
    }
    // Marked lost before the abort, so whoever sees the abort also sees why.
    lost.cancel();
    control.abort(LEASE_LOST);
}
