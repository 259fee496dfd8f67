//! What the agent knows of its own health: the API's answers (pull mode) and shutdown state.

use std::sync::Mutex;

use serde::Serialize;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::wire::rfc3339;

/// Pull mode's view of the main API, shown on `/health`.
#[derive(Debug, Default)]
pub struct ApiStatus {
    inner: Mutex<ApiStatusReport>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct ApiStatusReport {
    /// When a call to the API last succeeded.
    pub last_success: Option<String>,
    /// The last failure, if it came after the last success.
    pub last_error: Option<String>,
    /// Set while the API refuses the agent's key (401/403): health is `degraded`.
    pub credentials_problem: Option<String>,
}

impl ApiStatus {
    pub fn record_success(&self) {
        let mut s = self.lock();
        s.last_success = Some(rfc3339(OffsetDateTime::now_utc()));
        s.last_error = None;
        s.credentials_problem = None;
    }

    pub fn record_error(&self, error: impl Into<String>) {
        self.lock().last_error = Some(error.into());
    }

    pub fn record_credentials_problem(&self, problem: impl Into<String>) {
        let problem = problem.into();
        let mut s = self.lock();
        s.last_error = Some(problem.clone());
        s.credentials_problem = Some(problem);
    }

    pub fn report(&self) -> ApiStatusReport {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ApiStatusReport> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The agent's shutdown phases: draining (no new jobs) and then stopped (endpoint closes). A
/// hand-over (`SIGUSR2`) is a drain that never waits for the jobs: the process exits with them
/// still running, for the next one to adopt.
#[derive(Debug, Default, Clone)]
pub struct Shutdown {
    draining: CancellationToken,
    stopped: CancellationToken,
    handing_over: CancellationToken,
}

impl Shutdown {
    /// Stop taking jobs; running jobs go on.
    pub fn begin_drain(&self) {
        self.draining.cancel();
    }

    /// Stop taking jobs for a hand-over: the drain (every mode stops taking jobs at it), marked
    /// so that what runs meanwhile can tell it from a drain: the jobs are to be left as they are.
    pub fn begin_hand_over(&self) {
        self.handing_over.cancel();
        self.draining.cancel();
    }

    pub fn is_handing_over(&self) -> bool {
        self.handing_over.is_cancelled()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    pub async fn draining(&self) {
        self.draining.cancelled().await
    }

    /// Everything is done: close the endpoint.
    pub fn stop(&self) {
        self.draining.cancel();
        self.stopped.cancel();
    }

    pub async fn stopped(&self) {
        self.stopped.cancelled().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_over_is_a_drain_and_a_drain_no_hand_over() {
        let drain = Shutdown::default();
        drain.begin_drain();
        assert!(drain.is_draining() && !drain.is_handing_over());
        let hand_over = Shutdown::default();
        hand_over.begin_hand_over();
        assert!(hand_over.is_draining() && hand_over.is_handing_over());
    }
}
