//! Counts the jobs this agent process adopted (carried on after an earlier process left them
//! running: a hand-over, a crash, a restart) and those it gave up on, for `/health` and the
//! metrics.
//!
//! An adopted job is counted as running while its [`AdoptedJob`] guard lives: whatever ends the
//! job's task (its end, an early return, a panic) drops the guard and the count with it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use serde::Serialize;

use crate::metrics::AdoptionCounters;

/// The adopted jobs' counts (shared by every clone) and their metrics.
#[derive(Debug, Clone, Default)]
pub struct Adopted {
    counts: Arc<Counts>,
    metrics: AdoptionCounters,
}

#[derive(Debug, Default)]
struct Counts {
    running: AtomicUsize,
    total: AtomicU64,
}

/// What `/health` shows as `adopted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AdoptedReport {
    /// Adopted jobs running now.
    pub running: usize,
    /// Jobs adopted since this process started.
    pub total: u64,
}

impl Adopted {
    /// Counts into `metrics` (`gryt_agent_jobs_adopted_total`, `gryt_agent_jobs_given_up_total`).
    pub fn new(metrics: AdoptionCounters) -> Self {
        Adopted {
            counts: Arc::default(),
            metrics,
        }
    }

    /// One more adopted job, running until the returned guard is dropped.
    pub fn begin(&self, job_id: i64) -> AdoptedJob {
        self.counts.running.fetch_add(1, Ordering::AcqRel);
        self.counts.total.fetch_add(1, Ordering::AcqRel);
        self.metrics.adopted.inc();
        AdoptedJob {
            counts: self.counts.clone(),
            job_id,
        }
    }

    /// One job an earlier process left that this one could not carry on.
    pub fn gave_up(&self) {
        self.metrics.given_up.inc();
    }

    pub fn running(&self) -> usize {
        self.counts.running.load(Ordering::Acquire)
    }

    pub fn total(&self) -> u64 {
        self.counts.total.load(Ordering::Acquire)
    }

    pub fn report(&self) -> AdoptedReport {
        AdoptedReport {
            running: self.running(),
            total: self.total(),
        }
    }
}

/// An adopted job, counted as running while this lives.
#[derive(Debug)]
pub struct AdoptedJob {
    counts: Arc<Counts>,
    job_id: i64,
}

impl AdoptedJob {
    pub fn job_id(&self) -> i64 {
        self.job_id
    }
}

impl Drop for AdoptedJob {
    fn drop(&mut self) {
        self.counts.running.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn an_adopted_job_runs_until_its_guard_is_dropped_and_stays_in_the_total() {
        let adopted = Adopted::new(AdoptionCounters::default());
        assert_eq!(
            adopted.report(),
            AdoptedReport {
                running: 0,
                total: 0
            }
        );
        let first = adopted.begin(7);
        let second = adopted.clone().begin(8);
        assert_eq!((first.job_id(), second.job_id()), (7, 8));
        assert_eq!(
            adopted.report(),
            AdoptedReport {
                running: 2,
                total: 2
            }
        );
        drop(first);
        assert_eq!((adopted.running(), adopted.total()), (1, 2));
        drop(second);
        assert_eq!(
            adopted.report(),
            AdoptedReport {
                running: 0,
                total: 2
            }
        );
    }

    #[test]
    fn adopted_and_given_up_jobs_are_counted_in_the_metrics() {
        let metrics = Metrics::new(1);
        let adopted = Adopted::new(metrics.adoption());
        drop(adopted.begin(1));
        let _running = adopted.begin(2);
        adopted.gave_up();
        let text = metrics.encode();
        assert!(text.contains("gryt_agent_jobs_adopted_total 2"), "{text}");
        assert!(text.contains("gryt_agent_jobs_given_up_total 1"), "{text}");
        // Giving up is no adoption.
        assert_eq!(
            adopted.report(),
            AdoptedReport {
                running: 1,
                total: 2
            }
        );
    }

    #[test]
    fn the_report_is_running_and_total() {
        let report = AdoptedReport {
            running: 1,
            total: 3,
        };
        assert_eq!(
            serde_json::to_value(report).unwrap(),
            serde_json::json!({"running": 1, "total": 3})
        );
    }
}
