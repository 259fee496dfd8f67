//! The orphan sweep: removes this agent's containers and workspaces that no running job owns.
//!
//! Runs at start (what a crashed or killed agent left behind) and then on a slow timer. Only
//! containers labelled with this agent's id are touched: other agents sharing the Docker engine
//! keep theirs.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bollard::query_parameters::{ListContainersOptionsBuilder, RemoveContainerOptionsBuilder};

use super::AgentState;
use crate::executor::container::{LABEL_AGENT_ID, LABEL_JOB_ID, LABEL_MANAGED};

/// Time between sweeps after the first.
pub const INTERVAL: Duration = Duration::from_secs(600);

/// What one sweep removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub containers: usize,
    pub workspaces: usize,
}

/// Sweeps now, then every [`INTERVAL`] until the agent stops.
pub fn spawn(state: Arc<AgentState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let swept = sweep(&state).await;
            if swept != Swept::default() {
                tracing::warn!(
                    containers = swept.containers,
                    workspaces = swept.workspaces,
                    "removed leftovers of earlier jobs"
                );
            }
            tokio::select! {
                _ = tokio::time::sleep(INTERVAL) => {}
                _ = state.shutdown.stopped() => return,
            }
        }
    })
}

/// One sweep. Failures are logged, never fatal: the next sweep tries again.
pub async fn sweep(state: &AgentState) -> Swept {
    let running: HashSet<String> = state
        .jobs
        .job_ids()
        .iter()
        .map(|id| id.to_string())
        .collect();
    Swept {
        containers: sweep_containers(state, &running).await,
        workspaces: sweep_workspaces(&state.executor.settings().work_dir, &running).await,
    }
}

async fn sweep_containers(state: &AgentState, running: &HashSet<String>) -> usize {
    let Ok(docker) = state.executor.docker().await else {
        return 0;
    };
    let filters = HashMap::from([(
        "label",
        vec![
            format!("{LABEL_MANAGED}=true"),
            format!("{LABEL_AGENT_ID}={}", state.agent_id),
        ],
    )]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let containers = match docker.list_containers(Some(options)).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "orphan sweep: cannot list containers");
            return 0;
        }
    };
    let mut removed = 0;
    for container in containers {
        let Some(id) = container.id else { continue };
        let job = container
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_JOB_ID))
            .cloned()
            .unwrap_or_default();
        if running.contains(&job) {
            continue;
        }
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match docker.remove_container(&id, Some(options)).await {
            Ok(()) => {
                tracing::info!(container = %id, job_id = %job, "orphan sweep removed a container");
                removed += 1;
            }
            Err(e) => {
                tracing::warn!(container = %id, error = %e, "orphan sweep cannot remove a container")
            }
        }
    }
    removed
}

/// Removes `job-<id>-*` directories of jobs that are not running.
async fn sweep_workspaces(work_dir: &Path, running: &HashSet<String>) -> usize {
    let Ok(entries) = std::fs::read_dir(work_dir) else {
        return 0;
    };
    let mut stale = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // `job-<id>-<random>`; the random part has no `-`, the id may be negative.
        let Some((job, _)) = name
            .strip_prefix("job-")
            .and_then(|rest| rest.rsplit_once('-'))
        else {
            continue;
        };
        let job = job.to_owned();
        if !running.contains(&job) && entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            stale.push(entry.path());
        }
    }
    tokio::task::spawn_blocking(move || {
        let mut removed = 0;
        for path in stale {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(workspace = %path.display(), "orphan sweep removed a workspace");
                    removed += 1;
                }
                Err(e) => tracing::warn!(workspace = %path.display(), error = %e, "orphan sweep cannot remove a workspace"),
            }
        }
        removed
    })
    .await
    .unwrap_or(0)
}
