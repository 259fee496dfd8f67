//! The Docker layer: one hardened, labelled job container and the commands run inside it.
//!
//! A container runs in one of two shapes. A job of several commands (a multi-step YAML pipeline)
//! gets a container whose main process only keeps it alive; every command is a Docker exec in
//! it, so files persist between steps and each command has its own exit code and separate
//! stdout/stderr. A job of one command (a gryt pipeline, a one-step YAML pipeline) runs that
//! command as the container's main process instead, attached before the start: the same result
//! without a `docker exec` (the costliest call after the container's own start) or an events
//! subscription. This module knows Docker, not pipelines or results.
//! Invariant: a [`JobContainer`] is removed on every path: explicitly by [`JobContainer::remove`],
//! or, if dropped without it (error, panic, cancelled future), by a removal spawned from `Drop`.
//!
//! Files: this one is the face ([`JobContainer`]: create, start, remove); `spec.rs` the labels
//! and the hardened container spec; `exec.rs` the commands run in it; `events.rs` kills, OOM
//! notices, exits and removal; `oneshot.rs` the agent's short-lived chore containers.

mod adopt;
mod events;
mod exec;
mod log;
mod marks;
mod oneshot;
mod spec;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use bollard::Docker;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::CreateContainerOptionsBuilder;
use tokio_util::task::AbortOnDropHandle;

pub use adopt::{AdoptError, Resumed};
use events::{ExecDeaths, wait_for_exit, watch_events};
pub(crate) use events::{remove_container, try_remove};
use exec::CommandHandle;
pub use exec::{RunningCommand, SIGNAL_TIMEOUT};
use log::{ContainerLog, main_output};
pub use log::{LOG_DRIVER, log_config};
pub use marks::MarkId;
pub use oneshot::run_to_end;
use spec::merge_env;
pub use spec::{
    ContainerSpec, JobCommand, LABEL_AGENT_ID, LABEL_JOB_ID, LABEL_MANAGED, WORKSPACE,
    hardened_host_config, job_labels,
};

/// Keeps the container alive between commands, after writing the head mark (see `marks.rs`).
/// A loop, because `kill -TERM -1` from a stop request reaches this `sleep` too (it only
/// spares PID 1, the shell).
fn keepalive(head: &MarkId) -> String {
    format!(
        "{}; while :; do sleep 3600; done",
        marks::printf(head, marks::Kind::Plain)
    )
}

/// Runs a single-command job's command under a shell that stays PID 1 and only waits for it,
/// after writing the head mark: `kill -TERM -1` from a stop request then reaches the command
/// and everything it started (the kernel spares PID 1), exactly as with an exec, and the exit
/// status is the command's. `wait`'s own stderr goes nowhere: it reports a command killed by a
/// stop ("Terminated"), which is not the job's output.
fn main_wrapper(head: &MarkId) -> String {
    format!(
        "{}; \"$@\" & wait $! 2>/dev/null",
        marks::printf(head, marks::Kind::Plain)
    )
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
    /// Exec-shaped containers only: a single-command container learns of an OOM kill from the
    /// inspect after its exit instead (one Docker request fewer per job).
    oom_watch: Option<tokio::task::JoinHandle<()>>,
    /// A single-command container's main process (and the command it runs), started with the
    /// container and not yet handed to [`JobContainer::take_main`].
    main: std::sync::Mutex<Option<(JobCommand, RunningCommand)>>,
    /// Given to every exec beneath the command's own variables: the job's environment in a
    /// container made before the job was known (a warm one, see `executor::warm`), whose own
    /// environment is only its image's. Empty for a container made for its job.
    exec_env: Vec<String>,
    /// Exec-shaped containers only: the container's output, read by one command at a time.
    log: Option<Arc<tokio::sync::Mutex<ContainerLog>>>,
    /// The execs Docker reported ended (filled by the events watch of an exec-shaped container).
    exec_deaths: ExecDeaths,
    /// The mark the main process wrote first.
    head: MarkId,
    /// The main process is the job's one command (else each command is an exec).
    single: bool,
}

impl JobContainer {
    /// Creates and starts the container. On any failure nothing is left behind.
    /// A single-command container is attached before it starts, so no output is lost.
    pub async fn start(docker: &Docker, spec: ContainerSpec) -> Result<Self, DockerError> {
        let head = spec.head.clone();
        let (entrypoint, cmd, env) = match &spec.main_command {
            None => (
                vec!["/bin/sh".to_owned(), "-c".to_owned()],
                vec![keepalive(&head)],
                spec.env.clone(),
            ),
            Some(main) => (
                vec![
                    "/bin/sh".to_owned(),
                    "-c".to_owned(),
                    main_wrapper(&head),
                    "gryt-job".to_owned(),
                ],
                main.cmd.clone(),
                merge_env(&spec.env, &main.env),
            ),
        };
        let mut host_config = hardened_host_config(
            &spec.workspace_host_path,
            &spec.network,
            spec.pids_limit,
            spec.memory_bytes,
            spec.nano_cpus,
        );
        // Kept by Docker while no agent reads it (`log.rs`).
        host_config.log_config = Some(log_config());
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            entrypoint: Some(entrypoint),
            cmd: Some(cmd),
            user: Some(spec.user.clone()),
            working_dir: Some(WORKSPACE.into()),
            env: Some(env),
            labels: Some(spec.labels.clone()),
            tty: Some(false),
            host_config: Some(host_config),
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

        let mut container =
            JobContainer::handle(docker, &created.id, head, spec.main_command.is_some());
        // Attached before the start: nothing the container writes is missed.
        let attached = match container.attach().await {
            Ok(output) => ContainerLog::new(output),
            Err(e) => {
                container.remove().await;
                return Err(e);
            }
        };
        if let Err(e) = docker.start_container(&container.id, None).await {
            container.remove().await;
            return Err(docker_err("cannot start the job container")(e));
        }
        match spec.main_command {
            None => container.log = Some(Arc::new(tokio::sync::Mutex::new(attached))),
            Some(command) => {
                let waiting = tokio::spawn(wait_for_exit(
                    docker.clone(),
                    container.id.clone(),
                    container.oom.clone(),
                ));
                let main = RunningCommand {
                    output: main_output(attached),
                    ended: CommandHandle::Main(Some(AbortOnDropHandle::new(waiting))),
                };
                *container.main.lock().unwrap_or_else(|e| e.into_inner()) = Some((command, main));
            }
        }
        Ok(container)
    }

    /// A handle on the container `id`, with nothing read yet; an exec-shaped one's events are
    /// watched (OOM kills and execs' ends; a single-command container learns of an OOM kill from
    /// the inspect after its exit instead, one Docker request fewer per job).
    fn handle(docker: &Docker, id: &str, head: MarkId, single: bool) -> Self {
        let oom = Arc::new(AtomicBool::new(false));
        let exec_deaths = ExecDeaths::default();
        let oom_watch = (!single).then(|| {
            tokio::spawn(watch_events(
                docker.clone(),
                id.to_owned(),
                oom.clone(),
                exec_deaths.clone(),
            ))
        });
        JobContainer {
            docker: docker.clone(),
            id: id.to_owned(),
            oom,
            removed: false,
            oom_watch,
            main: std::sync::Mutex::new(None),
            exec_env: Vec::new(),
            log: None,
            exec_deaths,
            head,
            single,
        }
    }

    /// The main process of a single-command container, once: the job's `command` is already
    /// running when such a container has started. `None` for an exec-shaped container.
    pub fn take_main(&self, command: &JobCommand) -> Option<RunningCommand> {
        let (started, main) = self.main.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        // The planner and the runner must agree on the one command (see `steps::single_command`).
        debug_assert_eq!(&started, command, "the main process runs another command");
        Some(main)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The mark the container's main process wrote first: a replay of its log that does not
    /// start with it lost its beginning.
    pub fn head(&self) -> &MarkId {
        &self.head
    }

    /// Whether the main process is the job's one command (else each command is an exec).
    pub fn is_single(&self) -> bool {
        self.single
    }

    /// Gives every later exec `env` beneath its own variables (merged as [`merge_env`] does):
    /// how a warm container, made before its job, runs the job's commands with the job's
    /// environment.
    pub fn set_exec_env(&mut self, env: Vec<String>) {
        self.exec_env = env;
    }

    /// Kills and removes the container with its anonymous volumes.
    pub async fn remove(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        if let Some(watch) = &self.oom_watch {
            watch.abort();
        }
        // An unread main process's output (or an exec-shaped container's attached output)
        // would keep Docker from ending the container.
        drop(
            self.main
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        self.log = None;
        remove_container(&self.docker, &self.id).await;
    }
}

impl Drop for JobContainer {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        if let Some(watch) = &self.oom_watch {
            watch.abort();
        }
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
