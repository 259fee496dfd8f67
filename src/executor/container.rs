//! The Docker layer: one hardened, labelled job container and the commands run inside it.
//!
//! A job container's main process only keeps it alive; every command (a YAML step, `gryt run`)
//! is a Docker exec in it, so files persist between steps and each command has its own exit code
//! and separate stdout/stderr. This module knows Docker, not pipelines or results.
//! Invariant: a [`JobContainer`] is removed on every path: explicitly by [`JobContainer::remove`],
//! or, if dropped without it (error, panic, cancelled future), by a removal spawned from `Drop`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptionsBuilder, KillContainerOptionsBuilder,
    RemoveContainerOptionsBuilder,
};
use futures_util::{Stream, StreamExt};

/// Label on every container the agent creates; the orphan sweep finds them by it.
pub const LABEL_MANAGED: &str = "io.gryt.agent.managed";
/// Label naming the agent that owns the container.
pub const LABEL_AGENT_ID: &str = "io.gryt.agent.id";
/// Label naming the job the container runs.
pub const LABEL_JOB_ID: &str = "io.gryt.job.id";

/// Where the workspace is mounted inside the container.
pub const WORKSPACE: &str = "/workspace";

/// Keeps the container alive between commands. A loop, because `kill -TERM -1` from a stop
/// request reaches this `sleep` too (it only spares PID 1, the shell).
const KEEPALIVE: &str = "while :; do sleep 3600; done";

/// Everything needed to create a job container.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub workspace_host_path: String,
    pub env: Vec<String>,
    pub labels: HashMap<String, String>,
    /// `uid:gid`, never root.
    pub user: String,
    pub network: String,
    pub pids_limit: i64,
    pub memory_bytes: i64,
    pub nano_cpus: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

#[derive(Debug, thiserror::Error)]
#[error("{action}: {source}")]
pub struct DockerError {
    pub action: String,
    #[source]
    pub source: bollard::errors::Error,
}

fn docker_err(action: impl Into<String>) -> impl FnOnce(bollard::errors::Error) -> DockerError {
    let action = action.into();
    move |source| DockerError { action, source }
}

pub struct JobContainer {
    docker: Docker,
    id: String,
    oom: Arc<AtomicBool>,
    removed: bool,
    oom_watch: tokio::task::JoinHandle<()>,
}

/// A command started in the container: its output stream and the exec id to read its exit code.
pub struct RunningCommand {
    pub exec_id: String,
    pub output:
        std::pin::Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>,
}

impl JobContainer {
    /// Creates and starts the container. On any failure nothing is left behind.
    pub async fn start(docker: &Docker, spec: ContainerSpec) -> Result<Self, DockerError> {
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            entrypoint: Some(vec!["/bin/sh".into(), "-c".into()]),
            cmd: Some(vec![KEEPALIVE.into()]),
            user: Some(spec.user.clone()),
            working_dir: Some(WORKSPACE.into()),
            env: Some(spec.env.clone()),
            labels: Some(spec.labels.clone()),
            tty: Some(false),
            host_config: Some(HostConfig {
                binds: Some(vec![format!("{}:{WORKSPACE}", spec.workspace_host_path)]),
                cap_drop: Some(vec!["ALL".into()]),
                security_opt: Some(vec!["no-new-privileges".into()]),
                privileged: Some(false),
                pids_limit: Some(spec.pids_limit),
                memory: Some(spec.memory_bytes),
                // Equal to `memory`: no swap, so the limit is a real limit and OOM is visible.
                memory_swap: Some(spec.memory_bytes),
                nano_cpus: Some(spec.nano_cpus),
                network_mode: Some(spec.network.clone()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default()
            .name(&spec.name)
            .build();
        let created = docker
            .create_container(Some(options), body)
            .await
            .map_err(docker_err(format!(
                "cannot create a container from image {}",
                spec.image
            )))?;

        let oom = Arc::new(AtomicBool::new(false));
        let oom_watch = tokio::spawn(watch_oom(docker.clone(), created.id.clone(), oom.clone()));
        let mut container = JobContainer {
            docker: docker.clone(),
            id: created.id,
            oom,
            removed: false,
            oom_watch,
        };
        if let Err(e) = docker.start_container(&container.id, None).await {
            container.remove().await;
            return Err(docker_err("cannot start the job container")(e));
        }
        Ok(container)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Starts `cmd` in the container as its user, in the workspace, with `env` added.
    pub async fn run(
        &self,
        cmd: Vec<String>,
        env: Vec<String>,
    ) -> Result<RunningCommand, DockerError> {
        let exec = self
            .docker
            .create_exec(
                &self.id,
                CreateExecOptions {
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    attach_stdin: Some(false),
                    tty: Some(false),
                    cmd: Some(cmd),
                    env: Some(env),
                    working_dir: Some(WORKSPACE.to_owned()),
                    ..Default::default()
                },
            )
            .await
            .map_err(docker_err("cannot start a command in the job container"))?;
        let started = self
            .docker
            .start_exec(
                &exec.id,
                Some(StartExecOptions {
                    detach: false,
                    tty: false,
                    output_capacity: Some(64 * 1024),
                }),
            )
            .await
            .map_err(docker_err(
                "cannot attach to a command in the job container",
            ))?;
        match started {
            StartExecResults::Attached { output, .. } => Ok(RunningCommand {
                exec_id: exec.id,
                output,
            }),
            StartExecResults::Detached => unreachable!("exec started attached"),
        }
    }

    /// The exit code of a finished command; `None` if Docker has none (killed container).
    pub async fn exit_code(&self, exec_id: &str) -> Result<Option<i64>, DockerError> {
        let inspect = self
            .docker
            .inspect_exec(exec_id)
            .await
            .map_err(docker_err("cannot read a command's exit code"))?;
        Ok(inspect.exit_code)
    }

    /// Sends `signal` to every job process but the keepalive (PID 1), as the job's own user.
    /// Returns false when that could not be done (the container is gone or has no shell).
    pub async fn signal_job_processes(&self, signal: &str) -> bool {
        let cmd = vec![
            "/bin/sh".into(),
            "-c".into(),
            format!("kill -{signal} -1 2>/dev/null; exit 0"),
        ];
        let Ok(mut running) = self.run(cmd, Vec::new()).await else {
            return false;
        };
        while running.output.next().await.is_some() {}
        matches!(self.exit_code(&running.exec_id).await, Ok(Some(0)))
    }

    /// Kills everything in the container at once.
    pub async fn kill(&self) {
        let options = KillContainerOptionsBuilder::default()
            .signal("KILL")
            .build();
        if let Err(e) = self.docker.kill_container(&self.id, Some(options)).await {
            tracing::debug!(container = %self.id, error = %e, "kill failed (container may already be stopped)");
        }
    }

    /// Whether the kernel OOM-killed a process in this container so far.
    pub fn oom_killed(&self) -> bool {
        self.oom.load(Ordering::SeqCst)
    }

    /// Waits briefly for an OOM event that may still be on its way after a command died of 137.
    pub async fn settle_oom(&self) -> bool {
        for _ in 0..20 {
            if self.oom_killed() {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        self.oom_killed()
    }

    /// Kills and removes the container with its anonymous volumes.
    pub async fn remove(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        self.oom_watch.abort();
        remove_container(&self.docker, &self.id).await;
    }
}

impl Drop for JobContainer {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        self.oom_watch.abort();
        let (docker, id) = (self.docker.clone(), self.id.clone());
        // Dropped on an error path, a panic or a cancelled future: remove it in the background.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move { remove_container(&docker, &id).await });
            }
            Err(_) => {
                tracing::error!(container = %id, "job container dropped outside a runtime; the orphan sweep will remove it")
            }
        }
    }
}

/// How long a container whose removal failed is retried in the background: long enough to
/// outlast an engine restart.
const REMOVAL_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(600);

async fn remove_container(docker: &Docker, id: &str) {
    for _ in 0..3 {
        if try_remove(docker, id).await.is_ok() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // The engine is gone or busy (restarting, say): keep trying without holding up the job's
    // result. The orphan sweep at the next start catches what even this misses.
    tracing::warn!(container = %id, "cannot remove the job container yet; retrying in the background");
    let (docker, id) = (docker.clone(), id.to_owned());
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + REMOVAL_RETRY_FOR;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            if try_remove(&docker, &id).await.is_ok() {
                tracing::info!(container = %id, "removed the job container after all");
                return;
            }
        }
        tracing::error!(container = %id, "cannot remove the job container; the orphan sweep will");
    });
}

/// Removes a container; a container that is already gone counts as removed.
async fn try_remove(docker: &Docker, id: &str) -> Result<(), bollard::errors::Error> {
    let options = RemoveContainerOptionsBuilder::default()
        .force(true)
        .v(true)
        .build();
    match docker.remove_container(id, Some(options)).await {
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        other => other,
    }
}

/// Sets `flag` when Docker reports an OOM kill in the container. Runs until aborted.
async fn watch_oom(docker: Docker, id: String, flag: Arc<AtomicBool>) {
    let filters = HashMap::from([("container", vec![id.as_str()]), ("event", vec!["oom"])]);
    // `since` replays events from before the subscription reached the engine: an OOM in the
    // first milliseconds of a command is not missed.
    let since = (std::time::SystemTime::now() - std::time::Duration::from_secs(5))
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().to_string())
        .unwrap_or_default();
    let options = EventsOptionsBuilder::default()
        .since(&since)
        .filters(&filters)
        .build();
    let mut events = docker.events(Some(options));
    while let Some(event) = events.next().await {
        match event {
            Ok(_) => flag.store(true, Ordering::SeqCst),
            Err(_) => return,
        }
    }
}
