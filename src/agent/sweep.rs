//! The orphan sweep: removes this agent's containers, job networks and workspaces that no
//! running job owns, and the containers of `gryt-agent exec`s on this host that were killed
//! (`exec_owner`).
//!
//! Runs at start, before the agent takes a job (what a crashed or killed agent left behind), and
//! then on a slow timer while jobs run. Only
//! containers labelled with this agent's id are touched: other agents sharing the Docker engine
//! keep theirs.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bollard::query_parameters::ListContainersOptionsBuilder;

use crate::executor::container::{LABEL_AGENT_ID, LABEL_JOB_ID, LABEL_MANAGED, try_remove};
use crate::executor::exec_owner;
use crate::executor::workspace::{self, JobUserCleaner};
use crate::state::AgentState;

/// Time between sweeps after the first.
pub const INTERVAL: Duration = Duration::from_secs(600);

/// What one sweep removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub containers: usize,
    pub networks: usize,
    pub workspaces: usize,
}

/// How long the sweep at start may hold up the agent: an engine that does not answer must not
/// keep `/health` and the rest from coming up (the timer sweeps again later).
const FIRST_SWEEP_LIMIT: Duration = Duration::from_secs(30);

/// Sweeps once before the agent takes jobs (what a crashed or killed agent left behind), then
/// returns the task that sweeps every [`INTERVAL`] until the agent stops.
pub async fn start(state: Arc<AgentState>) -> tokio::task::JoinHandle<()> {
    match tokio::time::timeout(FIRST_SWEEP_LIMIT, sweep(&state)).await {
        Ok(swept) => report(&swept),
        Err(_) => {
            tracing::warn!("orphan sweep at start did not finish in time; the timer sweeps again")
        }
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(INTERVAL) => {}
                _ = state.shutdown.stopped() => return,
            }
            report(&sweep(&state).await);
        }
    })
}

fn report(swept: &Swept) {
    if *swept != Swept::default() {
        tracing::warn!(
            containers = swept.containers,
            networks = swept.networks,
            workspaces = swept.workspaces,
            "removed leftovers of earlier jobs"
        );
    }
}

/// One sweep. Failures are logged, never fatal: the next sweep tries again.
pub async fn sweep(state: &AgentState) -> Swept {
    let docker = state.executor.docker().await.ok();
    let containers = match &docker {
        Some(docker) => list_containers(docker, &state.agent_id).await,
        None => Vec::new(),
    };
    let networks = match &docker {
        Some(docker) => list_networks(docker, &state.agent_id).await,
        None => Vec::new(),
    };
    let work_dir = state.executor.settings().work_dir.clone();
    let agent_id = state.agent_id.clone();
    let workspaces = tokio::task::spawn_blocking(move || list_workspaces(&work_dir, &agent_id))
        .await
        .unwrap_or_default();
    // Read AFTER the listings. A job is registered before its workspace and container exist,
    // so whatever was listed for a job that is running now has its id in this set; a set read
    // before the listings would miss a job that started during them, and its fresh container
    // and workspace would be removed under it.
    // The warm pool's containers (ready or taken) are spared the same way: the pool adds a
    // warm id before it makes anything under it and removes it after all is gone.
    let running: HashSet<String> = state
        .jobs
        .job_ids()
        .iter()
        .map(|id| id.to_string())
        .chain(state.executor.warm_ids())
        .collect();
    let containers: Vec<_> = containers
        .into_iter()
        .filter(|(_, job, _)| !running.contains(job))
        .collect();
    let networks: Vec<_> = networks
        .into_iter()
        .filter(|(_, job)| !running.contains(job))
        .collect();
    // A workspace the agent cannot delete is emptied by the job's user in a container of the
    // job's image (its container's, when one was left), else of the default image.
    let images: HashMap<String, String> = containers
        .iter()
        .map(|(_, job, image)| (job.clone(), image.clone()))
        .collect();
    let workspaces: Vec<_> = workspaces
        .into_iter()
        .filter(|(_, job)| !running.contains(job))
        .collect();
    let settings = state.executor.settings();
    Swept {
        containers: match &docker {
            Some(docker) => {
                let user = settings.docker.job_user.ids();
                // And what `gryt-agent exec`s killed on this host left (see `exec_owner`).
                let dead_execs = exec_owner::sweep_dead_execs(
                    docker,
                    &settings.exec_lock_dir,
                    &settings.work_dir,
                    user,
                );
                remove_containers(docker, containers).await + dead_execs.await
            }
            None => 0,
        },
        // After the containers: the engine refuses to remove a network still in use.
        networks: match &docker {
            Some(docker) => remove_networks(docker, networks).await,
            None => 0,
        },
        workspaces: remove_workspaces(state, docker.as_ref(), &images, workspaces).await,
    }
}

/// This agent's containers, as `(container id, job id, image)`.
async fn list_containers(
    docker: &bollard::Docker,
    agent_id: &str,
) -> Vec<(String, String, String)> {
    let filters = HashMap::from([(
        "label",
        vec![
            format!("{LABEL_MANAGED}=true"),
            format!("{LABEL_AGENT_ID}={agent_id}"),
        ],
    )]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    match docker.list_containers(Some(options)).await {
        Ok(containers) => containers
            .into_iter()
            // An `exec`'s container is its own process's: only `exec_owner`'s sweep, which
            // checks that process is gone, may remove it.
            .filter(|c| {
                c.labels
                    .as_ref()
                    .is_none_or(|l| !l.contains_key(crate::executor::exec_owner::LABEL_EXEC_LOCK))
            })
            .filter_map(|c| {
                let job = c.labels.as_ref().and_then(|l| l.get(LABEL_JOB_ID)).cloned();
                Some((c.id?, job.unwrap_or_default(), c.image.unwrap_or_default()))
            })
            .collect(),
        Err(e) => {
            tracing::debug!(error = %e, "orphan sweep: cannot list containers");
            Vec::new()
        }
    }
}

/// This agent's job networks, as `(network id, job id)`; an exec's are `exec_owner`'s.
async fn list_networks(docker: &bollard::Docker, agent_id: &str) -> Vec<(String, String)> {
    match crate::executor::network::list_job_networks(docker, agent_id).await {
        Ok(networks) => networks
            .into_iter()
            .filter(|(_, _, labels)| !labels.contains_key(exec_owner::LABEL_EXEC_LOCK))
            .map(|(id, job, _)| (id, job))
            .collect(),
        Err(e) => {
            tracing::debug!(error = %e, "orphan sweep: cannot list networks");
            Vec::new()
        }
    }
}

async fn remove_networks(docker: &bollard::Docker, stale: Vec<(String, String)>) -> usize {
    let mut removed = 0;
    for (id, job) in stale {
        match crate::executor::network::try_remove(docker, &id).await {
            Ok(()) => {
                tracing::info!(network = %id, job_id = %job, "orphan sweep removed a network");
                removed += 1;
            }
            Err(e) => {
                tracing::warn!(network = %id, error = %e, "orphan sweep cannot remove a network")
            }
        }
    }
    removed
}

async fn remove_containers(
    docker: &bollard::Docker,
    stale: Vec<(String, String, String)>,
) -> usize {
    let mut removed = 0;
    for (id, job, _) in stale {
        match try_remove(docker, &id).await {
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

/// This agent's workspaces in the work dir, as `(path, job id)`: only names that carry this
/// agent's id (another agent may share the work dir).
fn list_workspaces(work_dir: &Path, agent_id: &str) -> Vec<(PathBuf, String)> {
    let Ok(entries) = std::fs::read_dir(work_dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((owner, job)) = workspace::owner_of(&name) else {
            continue;
        };
        if owner == agent_id && entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            found.push((entry.path(), job.to_owned()));
        }
    }
    found
}

async fn remove_workspaces(
    state: &AgentState,
    docker: Option<&bollard::Docker>,
    images: &HashMap<String, String>,
    stale: Vec<(PathBuf, String)>,
) -> usize {
    let settings = state.executor.settings();
    let user = settings.docker.job_user.ids();
    let mut removed = 0;
    for (path, job) in stale {
        let image = images.get(&job).unwrap_or(&settings.docker.image);
        let cleaner = docker.map(|docker| JobUserCleaner {
            docker,
            image,
            user,
            agent_id: &state.agent_id,
            job_id: &job,
            extra_labels: &[],
        });
        match workspace::remove_tree(&path, cleaner.as_ref()).await {
            Ok(()) => {
                tracing::info!(workspace = %path.display(), "orphan sweep removed a workspace");
                removed += 1;
            }
            Err(e) => {
                tracing::warn!(workspace = %path.display(), error = %e, "orphan sweep cannot remove a workspace")
            }
        }
    }
    removed
}
