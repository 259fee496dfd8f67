//! The health report: whether this agent can take jobs, and why not, as `GET /health` shows it.
//! Built from the last readiness check (every 2 s) and the other cached answers: it never pings
//! Docker itself, so it answers at once.

use serde::Serialize;

use super::AgentState;
use super::adopted::AdoptedReport;
use super::disk::GcReport;
use super::status::ApiStatusReport;

#[derive(Debug, Serialize)]
pub struct Health {
    /// `healthy` or `degraded`.
    pub status: &'static str,
    pub version: &'static str,
    pub docker_available: bool,
    pub agent_id: String,
    pub running_jobs: usize,
    /// Job slots in all.
    pub capacity: usize,
    pub free_slots: usize,
    pub draining: bool,
    /// Jobs carried on from an earlier agent process: running now, and in all since the start.
    pub adopted: AdoptedReport,
    /// Push requests waiting for a slot, and how many may (push mode only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push_queue: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push_queue_max: Option<usize>,
    /// Why the status is `degraded` (empty when healthy).
    pub reasons: Vec<String>,
    /// Pull mode's view of the API; absent without pull mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api: Option<ApiStatusReport>,
    /// The warm pool: how many ready containers it keeps (0: off) and how many are ready.
    pub warm_pool: crate::executor::warm::WarmStatus,
    /// The last disk collection (free space, marks, what it removed); absent before the first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_collection: Option<GcReport>,
}

impl AgentState {
    /// The report `/health` serialises.
    pub fn health(&self) -> Health {
        let docker_available = self.readiness.docker_available();
        let mut reasons = self.readiness.reasons();
        let api = self.modes.pull().then(|| self.api_status.report());
        if let Some(problem) = api.as_ref().and_then(|a| a.credentials_problem.clone()) {
            reasons.push(problem);
        }
        let disk_collection = self.gc.report();
        if let Some(problem) = disk_collection.as_ref().and_then(|r| r.still_low.clone()) {
            reasons.push(problem);
        }
        Health {
            status: if reasons.is_empty() {
                "healthy"
            } else {
                "degraded"
            },
            version: crate::VERSION,
            docker_available,
            agent_id: self.agent_id.clone(),
            running_jobs: self.jobs.count(),
            capacity: self.slots.total(),
            free_slots: self.slots.free(),
            draining: self.shutdown.is_draining(),
            adopted: self.adopted.report(),
            push_queue: self.push_keys.as_ref().map(|_| self.slots.queued()),
            push_queue_max: self
                .push_keys
                .as_ref()
                .map(|_| self.settings.push.max_queue),
            reasons,
            api,
            warm_pool: self.executor.warm_status(),
            disk_collection,
        }
    }
}
