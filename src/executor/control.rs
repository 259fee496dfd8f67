//! Stopping a job from outside: a graceful cancel or an immediate abort, with a reason.
//!
//! Pull mode cancels on the API's request or at shutdown (SIGTERM, grace period, SIGKILL) and
//! aborts when its lease is lost (kill at once); push mode cancels when the client goes away.

use std::sync::Arc;

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    /// SIGTERM to the job's processes, then SIGKILL after the grace period.
    Graceful,
    /// SIGKILL at once.
    Immediate,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopRequest {
    pub kind: StopKind,
    pub reason: String,
}

/// A handle shared between the executor and whoever may stop the job. Cheap to clone.
#[derive(Debug, Clone)]
pub struct JobControl {
    tx: Arc<watch::Sender<Option<StopRequest>>>,
}

impl Default for JobControl {
    fn default() -> Self {
        JobControl {
            tx: Arc::new(watch::channel(None).0),
        }
    }
}

impl JobControl {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks for a graceful stop. The first request wins, except that an immediate one upgrades it.
    pub fn cancel(&self, reason: impl Into<String>) {
        self.request_stop(StopKind::Graceful, reason.into());
    }

    /// Asks for the job to be killed at once.
    pub fn abort(&self, reason: impl Into<String>) {
        self.request_stop(StopKind::Immediate, reason.into());
    }

    fn request_stop(&self, kind: StopKind, reason: String) {
        self.tx.send_if_modified(|current| {
            let upgrade = matches!(current, Some(r) if r.kind == StopKind::Graceful && kind == StopKind::Immediate);
            if current.is_none() || upgrade {
                *current = Some(StopRequest { kind, reason });
                true
            } else {
                false
            }
        });
    }

    /// The stop asked for so far, if any.
    pub fn request(&self) -> Option<StopRequest> {
        self.tx.borrow().clone()
    }

    /// A receiver that wakes on every new or upgraded request.
    pub fn subscribe(&self) -> watch::Receiver<Option<StopRequest>> {
        self.tx.subscribe()
    }

    /// Resolves once a stop was requested.
    pub async fn stopped(&self) -> StopRequest {
        let mut rx = self.subscribe();
        let result = rx
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|r| r.clone());
        // The sender lives in `self`, so the wait cannot fail; keep a sane value regardless.
        result.unwrap_or(StopRequest {
            kind: StopKind::Immediate,
            reason: "stopped".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_abort_upgrades_a_cancel() {
        let c = JobControl::new();
        let mut rx = c.subscribe();
        c.cancel("api asked");
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        c.abort("lease lost");
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        c.cancel("ignored");
        assert!(!rx.has_changed().unwrap());
        let r = c.stopped().await;
        assert_eq!(
            (r.kind, r.reason.as_str()),
            (StopKind::Immediate, "lease lost")
        );
    }
}
