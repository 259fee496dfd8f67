//! The jobs this agent is running now, so shutdown can cancel them and the sweep can spare them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::executor::JobControl;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RunningJobKey(u64);

#[derive(Debug, Clone, Default)]
pub struct RunningJobs {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    jobs: HashMap<RunningJobKey, (i64, JobControl)>,
}

impl RunningJobs {
    /// Registers a job; the returned guard unregisters it when dropped.
    pub fn register(&self, job_id: i64, control: JobControl) -> RunningJobGuard {
        let mut inner = self.lock();
        inner.next += 1;
        let key = RunningJobKey(inner.next);
        inner.jobs.insert(key, (job_id, control));
        RunningJobGuard {
            jobs: self.clone(),
            key,
        }
    }

    pub fn count(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Ids of the jobs running now.
    pub fn job_ids(&self) -> Vec<i64> {
        self.lock().jobs.values().map(|(id, _)| *id).collect()
    }

    /// Asks every running job to stop gracefully.
    pub fn cancel_all(&self, reason: &str) {
        for (_, control) in self.lock().jobs.values() {
            control.cancel(reason);
        }
    }

    /// Kills every running job at once.
    pub fn abort_all(&self, reason: &str) {
        for (_, control) in self.lock().jobs.values() {
            control.abort(reason);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the map inconsistent: recover it.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub struct RunningJobGuard {
    jobs: RunningJobs,
    key: RunningJobKey,
}

impl Drop for RunningJobGuard {
    fn drop(&mut self) {
        self.jobs.lock().jobs.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_jobs_are_cancelled_and_unregistered_on_drop() {
        let jobs = RunningJobs::default();
        let control = JobControl::new();
        let guard = jobs.register(7, control.clone());
        assert_eq!(jobs.job_ids(), [7]);
        jobs.cancel_all("shutting down");
        assert_eq!(control.request().unwrap().reason, "shutting down");
        drop(guard);
        assert_eq!(jobs.count(), 0);
    }
}
