//! Making one warm container (its workspace, its network, the hardened container itself) and
//! removing one the pool will not hand out.

use std::sync::Arc;

use super::super::container::{ContainerSpec, DockerError, JobContainer, job_labels};
use super::super::image::{self, ImageError};
use super::super::limits::{parse_cpus, parse_memory};
use super::super::network::{self, JobNetwork, NetworkError};
use super::super::workspace::Workspace;
use super::{LABEL_WARM, LiveId, Shared, Warm};
use crate::config::PullPolicy;
use crate::executor::Executor;

/// Why a warm container could not be made (the refill backs off and tries again).
#[derive(Debug, thiserror::Error)]
pub(super) enum MakeError {
    #[error("no Docker engine: {0}")]
    Docker(String),
    #[error("{0}")]
    Image(#[from] ImageError),
    #[error("invalid default limits: {0}")]
    Limits(String),
    #[error("cannot create a workspace: {0}")]
    Workspace(#[from] std::io::Error),
    #[error("{0}")]
    Network(#[from] NetworkError),
    #[error("{0}")]
    Container(#[from] DockerError),
}

/// Makes one ready container of the pool's image, exactly as a job's would be made but with no
/// job environment and the agent's default limits. On any failure what was made is removed.
pub(super) async fn one(executor: &Executor, shared: &Arc<Shared>) -> Result<Warm, MakeError> {
    let settings = &executor.settings;
    let docker = executor
        .docker()
        .await
        .map_err(|e| MakeError::Docker(e.to_string()))?;
    let hold = settings.image_use.begin(&shared.image);
    // `always` is the job's business (it pulls before it takes, and a container of another
    // image id is not taken): a refill only needs the image there.
    let policy = match settings.docker.pull_policy {
        PullPolicy::Never => PullPolicy::Never,
        _ => PullPolicy::IfNotPresent,
    };
    image::ensure(&docker, &shared.image, policy, |_| {}).await?;
    let memory_bytes = parse_memory(&settings.docker.memory_limit)
        .map_err(|e| MakeError::Limits(e.to_string()))?;
    let nano_cpus =
        parse_cpus(&settings.docker.cpu_limit).map_err(|e| MakeError::Limits(e.to_string()))?;
    let live = LiveId::new(&shared.live);
    let mut labels = job_labels(&settings.agent_id, live.id(), &settings.extra_labels);
    labels.insert(LABEL_WARM.to_owned(), "true".to_owned());
    let (uid, gid) = settings.docker.job_user.ids();
    let workspace = Workspace::create(&settings.work_dir, &settings.agent_id, live.id(), uid, gid);
    let workspace = workspace.await?;
    let mut made_network = None;
    let made = async {
        let network = if settings.docker.network == network::MODE_JOB {
            executor.guard_metadata().await;
            let name = network::name_for(&workspace.unique_name());
            let pool = settings.network_pool;
            let created = JobNetwork::create(&docker, &name, pool, network::labels(labels.clone()));
            made_network.insert(created.await?).name().to_owned()
        } else {
            settings.docker.network.clone()
        };
        let spec = ContainerSpec {
            name: format!("gryt-{}", workspace.unique_name()),
            image: shared.image.clone(),
            workspace_host_path: workspace.path().to_string_lossy().into_owned(),
            // The image's own only: the job's comes with each exec.
            env: Vec::new(),
            labels,
            user: format!("{uid}:{gid}"),
            network,
            pids_limit: settings.docker.pids_limit,
            memory_bytes,
            nano_cpus,
            main_command: None,
            head: crate::executor::container::MarkId::random(),
        };
        Ok::<_, MakeError>(JobContainer::start(&docker, spec).await?)
    };
    let made = made.await;
    match made {
        Ok(container) => Ok(Warm {
            container,
            network: made_network,
            workspace,
            live,
            _image: hold,
        }),
        Err(e) => {
            // The container removed itself on failure; the network goes before the workspace.
            if let Some(mut network) = made_network {
                network.remove().await;
            }
            remove_workspace(workspace).await;
            Err(e)
        }
    }
}

/// Removes a warm container the pool will not hand out: the container, then its network, then
/// its workspace (the order of a job's cleanup). Its id leaves the live set after all three.
pub(super) async fn discard(warm: Warm) {
    let Warm {
        mut container,
        network,
        workspace,
        live,
        _image,
    } = warm;
    container.remove().await;
    if let Some(mut network) = network {
        network.remove().await;
    }
    remove_workspace(workspace).await;
    drop(live);
}

/// An untaken workspace holds nothing a job wrote: the agent removes it alone.
async fn remove_workspace(workspace: Workspace) {
    let path = workspace.path().to_owned();
    if let Err(e) = workspace.remove(None).await {
        tracing::warn!(workspace = %path.display(), error = %e, "warm pool: cannot remove a workspace");
    }
}
