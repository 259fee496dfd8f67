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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, EventsOptionsBuilder,
    KillContainerOptionsBuilder, RemoveContainerOptionsBuilder, WaitContainerOptions,
};
use futures_util::{Stream, StreamExt};
use tokio_util::task::AbortOnDropHandle;

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

/// Runs a single-command job's command under a shell that stays PID 1 and only waits for it:
/// `kill -TERM -1` from a stop request then reaches the command and everything it started
/// (the kernel spares PID 1), exactly as with an exec, and the exit status is the command's.
const MAIN_WRAPPER: &str = "\"$@\" & wait $!";

/// How long sending a signal to the job's processes (an exec of `kill`) may take.
pub const SIGNAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A command of the job: a YAML step or `gryt run`, as an exec or as the main process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobCommand {
    pub cmd: Vec<String>,
    /// Added to the container's environment, replacing variables of the same name.
    pub env: Vec<String>,
}

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
    /// `Some` for a single-command container (see the module doc), `None` for one that runs
    /// each command as an exec.
    pub main_command: Option<JobCommand>,
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
}

type OutputStreamOf =
    std::pin::Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;

/// A command started in the container: its output stream and how to learn its exit code.
pub struct RunningCommand {
    pub output: OutputStreamOf,
    ended: CommandHandle,
}

enum CommandHandle {
    /// An exec: its exit code is read by inspecting it once the output ends.
    Exec(String),
    /// The main process: a `wait` request opened right after the start answers with its exit
    /// code, or fails when the engine goes away under the job.
    Main(Option<AbortOnDropHandle<Result<Option<i64>, DockerError>>>),
}

impl JobContainer {
    /// Creates and starts the container. On any failure nothing is left behind.
    /// A single-command container is attached before it starts, so no output is lost.
    pub async fn start(docker: &Docker, spec: ContainerSpec) -> Result<Self, DockerError> {
        let (entrypoint, cmd, env) = match &spec.main_command {
            None => (
                vec!["/bin/sh", "-c"],
                vec![KEEPALIVE.into()],
                spec.env.clone(),
            ),
            Some(main) => (
                vec!["/bin/sh", "-c", MAIN_WRAPPER, "gryt-job"],
                main.cmd.clone(),
                merge_env(&spec.env, &main.env),
            ),
        };
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            entrypoint: Some(entrypoint.into_iter().map(String::from).collect()),
            cmd: Some(cmd),
            user: Some(spec.user.clone()),
            working_dir: Some(WORKSPACE.into()),
            env: Some(env),
            labels: Some(spec.labels.clone()),
            tty: Some(false),
            host_config: Some(hardened_host_config(
                &spec.workspace_host_path,
                &spec.network,
                spec.pids_limit,
                spec.memory_bytes,
                spec.nano_cpus,
            )),
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
        let oom_watch = match spec.main_command {
            None => Some(tokio::spawn(watch_oom(
                docker.clone(),
                created.id.clone(),
                oom.clone(),
            ))),
            Some(_) => None,
        };
        let mut container = JobContainer {
            docker: docker.clone(),
            id: created.id,
            oom,
            removed: false,
            oom_watch,
            main: std::sync::Mutex::new(None),
        };
        let attached = match spec.main_command {
            None => None,
            Some(_) => match container.attach().await {
                Ok(output) => Some(output),
                Err(e) => {
                    container.remove().await;
                    return Err(e);
                }
            },
        };
        if let Err(e) = docker.start_container(&container.id, None).await {
            container.remove().await;
            return Err(docker_err("cannot start the job container")(e));
        }
        if let Some(output) = attached {
            let waiting = tokio::spawn(wait_for_exit(
                docker.clone(),
                container.id.clone(),
                container.oom.clone(),
            ));
            let main = RunningCommand {
                output,
                ended: CommandHandle::Main(Some(AbortOnDropHandle::new(waiting))),
            };
            let command = spec
                .main_command
                .unwrap_or_else(|| unreachable!("attached"));
            *container.main.lock().unwrap_or_else(|e| e.into_inner()) = Some((command, main));
        }
        Ok(container)
    }

    async fn attach(&self) -> Result<OutputStreamOf, DockerError> {
        let options = AttachContainerOptionsBuilder::default()
            .stream(true)
            .stdout(true)
            .stderr(true)
            .build();
        let attached = self
            .docker
            .attach_container(&self.id, Some(options))
            .await
            .map_err(docker_err("cannot attach to the job container"))?;
        Ok(attached.output)
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
                output,
                ended: CommandHandle::Exec(exec.id),
            }),
            StartExecResults::Detached => unreachable!("exec started attached"),
        }
    }

    /// The exit code of a finished command; `None` if Docker has none (killed container).
    pub async fn exit_code(
        &self,
        command: &mut RunningCommand,
    ) -> Result<Option<i64>, DockerError> {
        match &mut command.ended {
            CommandHandle::Exec(exec_id) => {
                let inspect = self
                    .docker
                    .inspect_exec(exec_id)
                    .await
                    .map_err(docker_err("cannot read a command's exit code"))?;
                Ok(inspect.exit_code)
            }
            CommandHandle::Main(waiting) => match waiting.take() {
                Some(waiting) => waiting.await.unwrap_or(Ok(None)),
                None => Ok(None),
            },
        }
    }

    /// Sends `signal` to every job process but the keepalive (PID 1), as the job's own user.
    /// Returns false when that could not be done (the container is gone or has no shell).
    /// Bounded by [`SIGNAL_TIMEOUT`]: a container at its pids limit (a fork bomb) may never
    /// run the exec, and the caller then kills the container instead.
    pub async fn signal_job_processes(&self, signal: &str) -> bool {
        let cmd = vec![
            "/bin/sh".into(),
            "-c".into(),
            format!("kill -{signal} -1 2>/dev/null; exit 0"),
        ];
        let signalled = async {
            let Ok(mut running) = self.run(cmd, Vec::new()).await else {
                return false;
            };
            while running.output.next().await.is_some() {}
            matches!(self.exit_code(&mut running).await, Ok(Some(0)))
        };
        tokio::time::timeout(SIGNAL_TIMEOUT, signalled)
            .await
            .unwrap_or(false)
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
        // A single-command container's flag was set from the inspect before its exit code was
        // given out: there is nothing on its way.
        if self.oom_watch.is_none() {
            return self.oom_killed();
        }
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
        if let Some(watch) = &self.oom_watch {
            watch.abort();
        }
        // An unread main process's output would keep Docker from ending the container.
        drop(
            self.main
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
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

/// The host side of every container the agent makes: the workspace as the only mount, no
/// capabilities, `no-new-privileges`, never privileged, limits on pids, memory (no swap) and
/// CPUs, and no log copy kept by Docker. Public for programs that must start the very same
/// container themselves (the benchmark's baselines).
pub fn hardened_host_config(
    workspace: &str,
    network: &str,
    pids_limit: i64,
    memory_bytes: i64,
    nano_cpus: i64,
) -> HostConfig {
    HostConfig {
        binds: Some(vec![format!("{workspace}:{WORKSPACE}")]),
        cap_drop: Some(vec!["ALL".into()]),
        security_opt: Some(vec!["no-new-privileges".into()]),
        privileged: Some(false),
        pids_limit: Some(pids_limit),
        memory: Some(memory_bytes),
        // Equal to `memory`: no swap, so the limit is a real limit and OOM is visible.
        memory_swap: Some(memory_bytes),
        nano_cpus: Some(nano_cpus),
        network_mode: Some(network.to_owned()),
        // The agent reads the output itself (attach or exec); Docker keeping a copy on
        // disk would only cost disk and time.
        log_config: Some(HostConfigLogConfig {
            typ: Some("none".into()),
            config: None,
        }),
        ..Default::default()
    }
}

/// Runs `script` under `/bin/sh -c` in a short-lived hardened container of `image` as `user`,
/// with `workspace` mounted, no network and small limits; waits for it at most `timeout` and
/// removes it whatever happens. For the agent's own chores (emptying a workspace as the job's
/// user), never for a job. Ok when the script exited 0.
pub async fn run_to_end(
    docker: &Docker,
    image: &str,
    workspace: &str,
    user: (u32, u32),
    labels: HashMap<String, String>,
    script: &str,
    timeout: std::time::Duration,
) -> Result<(), String> {
    let body = ContainerCreateBody {
        image: Some(image.to_owned()),
        entrypoint: Some(vec!["/bin/sh".into(), "-c".into()]),
        cmd: Some(vec![script.to_owned()]),
        user: Some(format!("{}:{}", user.0, user.1)),
        working_dir: Some(WORKSPACE.into()),
        labels: Some(labels),
        tty: Some(false),
        host_config: Some(hardened_host_config(
            workspace,
            "none",
            64,
            64 * 1024 * 1024,
            500_000_000,
        )),
        ..Default::default()
    };
    let id = std::sync::Mutex::new(None::<String>);
    let run = async {
        let created = docker
            .create_container(
                None::<bollard::query_parameters::CreateContainerOptions>,
                body,
            )
            .await
            .map_err(|e| format!("cannot create a container from image {image}: {e}"))?;
        *id.lock().unwrap_or_else(|e| e.into_inner()) = Some(created.id.clone());
        docker
            .start_container(&created.id, None)
            .await
            .map_err(|e| format!("cannot start the container: {e}"))?;
        let mut waiting = docker.wait_container(&created.id, None::<WaitContainerOptions>);
        match waiting.next().await {
            Some(Ok(answer)) if answer.status_code == 0 => Ok(()),
            Some(Ok(answer)) => Err(format!("it exited with {}", answer.status_code)),
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                Err(format!("it exited with {code}"))
            }
            Some(Err(e)) => Err(format!("lost the container: {e}")),
            None => Err("the engine ended the wait without an exit code".into()),
        }
    };
    let result = match tokio::time::timeout(timeout, run).await {
        Ok(result) => result,
        Err(_) => Err(format!("it did not finish within {}s", timeout.as_secs())),
    };
    let created = id.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(id) = created {
        remove_container(docker, &id).await;
    }
    result
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

/// Removes a container (forced, with its anonymous volumes); one already gone counts as removed.
pub(crate) async fn try_remove(docker: &Docker, id: &str) -> Result<(), bollard::errors::Error> {
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

/// The exit code of the container's main process, waited for from just after its start (a
/// container that already exited answers at once). An error means the engine went away.
async fn wait_for_exit(
    docker: Docker,
    id: String,
    oom: Arc<AtomicBool>,
) -> Result<Option<i64>, DockerError> {
    let lost = || docker_err("lost the job container while it ran");
    let mut waiting = docker.wait_container(&id, None::<WaitContainerOptions>);
    let code = match waiting.next().await {
        Some(Ok(answer)) => answer.status_code,
        // bollard reports a non-zero exit as an error carrying the code.
        Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
        Some(Err(e)) => return Err(lost()(e)),
        // The engine hung up without an answer: it went away under the job.
        None => {
            return Err(lost()(bollard::errors::Error::IOError {
                err: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the engine ended the wait without an exit code",
                ),
            }));
        }
    };
    // An engine shutting down stops its containers and answers their waits before it exits,
    // but no longer takes new requests: a job it killed must be the agent's error, not a
    // failed job. (An exec's exit code is read the same way, with a request after the end.)
    let inspect = docker.inspect_container(&id, None).await.map_err(lost())?;
    // Set by the engine on the same kernel OOM notice that the `oom` event reports.
    if inspect.state.and_then(|s| s.oom_killed) == Some(true) {
        oom.store(true, Ordering::SeqCst);
    }
    Ok(Some(code))
}

/// `base` with `overrides` applied the way Docker applies an exec's environment: a variable
/// of the same name is replaced, a new one appended.
fn merge_env(base: &[String], overrides: &[String]) -> Vec<String> {
    let name = |entry: &str| entry.split('=').next().unwrap_or_default().to_owned();
    let mut merged: Vec<String> = base.to_vec();
    for entry in overrides {
        match merged.iter_mut().find(|e| name(e) == name(entry)) {
            Some(existing) => existing.clone_from(entry),
            None => merged.push(entry.clone()),
        }
    }
    merged
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

#[cfg(test)]
mod tests {
    use super::merge_env;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_step_variable_replaces_the_job_variable_of_the_same_name_and_adds_the_rest() {
        let merged = merge_env(
            &strings(&["A=job", "GRYT_WORKSPACE=/workspace", "B=x=y"]),
            &strings(&["A=step", "C=new", "AB=not-A"]),
        );
        assert_eq!(
            merged,
            strings(&[
                "A=step",
                "GRYT_WORKSPACE=/workspace",
                "B=x=y",
                "C=new",
                "AB=not-A"
            ])
        );
    }

    #[test]
    fn no_overrides_leave_the_environment_as_it_was() {
        let base = strings(&["A=1", "B="]);
        assert_eq!(merge_env(&base, &[]), base);
    }
}
