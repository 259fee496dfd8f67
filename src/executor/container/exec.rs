//! The commands run in a job container: execs, the attached main process, their exit codes, and
//! signals to the job's processes.

use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::query_parameters::AttachContainerOptionsBuilder;
use futures_util::StreamExt;
use tokio_util::task::AbortOnDropHandle;

use super::events::ExecDeaths;
use super::log::{EndSeen, OutputStreamOf, command_output};
use super::marks::{self, Kind, MarkId};
use super::spec::WORKSPACE;
use super::{DockerError, JobContainer, docker_err};

/// How long sending a signal to the job's processes (an exec of `kill`) may take.
pub const SIGNAL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an exec's own end marks may take to be read after Docker reported its end, before
/// the agent writes them for it (it was killed before it could).
const MARKS_WAIT: Duration = Duration::from_millis(500);

/// How often an exec is inspected while it runs, beside Docker's `exec_die` events (which an
/// exec ending before the event subscription reached the engine would miss).
const EXEC_POLL: Duration = Duration::from_secs(2);

/// A command started in the container: its output stream and how to learn its exit code.
pub struct RunningCommand {
    pub output: OutputStreamOf,
    pub(super) ended: CommandHandle,
}

pub(super) enum CommandHandle {
    /// An exec: its exit code is the one its end mark carries, else (it was killed before it
    /// wrote it) Docker's, read by inspecting it once the output ends. The task that writes
    /// its marks when it died without them is aborted with it.
    Exec {
        exec_id: String,
        end: Arc<EndSeen>,
        _closer: AbortOnDropHandle<()>,
    },
    /// The main process: a `wait` request opened right after the start answers with its exit
    /// code, or fails when the engine goes away under the job.
    Main(Option<AbortOnDropHandle<Result<Option<i64>, DockerError>>>),
    /// An exec that ended while no agent ran and that Docker no longer knows: its exit code is
    /// the one its end mark carries, if it wrote one.
    Gone { end: Arc<EndSeen> },
}

/// `cmd` under a shell that sends its output to the main process's streams, writes `id`'s
/// start mark, and ends each stream with `id`'s end mark, the stdout one with the exit status.
/// The shell's own stderr goes nowhere: it would report a command killed by a stop
/// ("Terminated") into the job's output, which a job run without it never had.
fn wrap(id: &MarkId, cmd: Vec<String>) -> Vec<String> {
    let script = format!(
        "exec >/proc/1/fd/1 2>/dev/null </dev/null; {}; \"$@\" 2>/proc/1/fd/2; s=$?; {}; {} >/proc/1/fd/2; exit $s",
        marks::printf(id, Kind::Start),
        marks::printf(id, Kind::Status(0)),
        marks::printf(id, Kind::Plain),
    );
    [
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        script,
        "gryt-command".to_owned(),
    ]
    .into_iter()
    .chain(cmd)
    .collect()
}

fn no_exec_log() -> DockerError {
    DockerError {
        action: "cannot start a command in a single-command container".into(),
        source: bollard::errors::Error::IOError {
            err: std::io::Error::other("the container runs its one command as its main process"),
        },
    }
}

/// Runs `script` under `/bin/sh -c` as an attached exec; its exit code.
async fn chore(
    docker: &Docker,
    container: &str,
    script: String,
) -> Result<Option<i64>, DockerError> {
    let exec = docker
        .create_exec(
            container,
            CreateExecOptions {
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                attach_stdin: Some(false),
                tty: Some(false),
                cmd: Some(vec!["/bin/sh".into(), "-c".into(), script]),
                ..Default::default()
            },
        )
        .await
        .map_err(docker_err("cannot run a command in the job container"))?;
    let started = docker
        .start_exec(&exec.id, None::<StartExecOptions>)
        .await
        .map_err(docker_err("cannot run a command in the job container"))?;
    if let StartExecResults::Attached { mut output, .. } = started {
        while output.next().await.is_some() {}
    }
    let inspect = docker
        .inspect_exec(&exec.id)
        .await
        .map_err(docker_err("cannot read a command's exit code"))?;
    Ok(inspect.exit_code)
}

/// Waits until the exec ended; then, unless its own end marks are read soon after, writes them
/// for it, so that its output ends (the output of a process killed mid-line included).
pub(super) async fn close_when_dead(
    docker: Docker,
    container: String,
    exec_id: String,
    id: MarkId,
    deaths: ExecDeaths,
    end: Arc<EndSeen>,
) {
    loop {
        tokio::select! {
            _ = deaths.wait_for(&exec_id) => break,
            _ = tokio::time::sleep(EXEC_POLL) => {
                match docker.inspect_exec(&exec_id).await {
                    Ok(inspect) if inspect.running == Some(true) => {}
                    // Ended, or gone with its container (whose output then ends by itself).
                    _ => break,
                }
            }
        }
    }
    let notified = end.notify.notified();
    if end.is_complete() {
        return;
    }
    let _ = tokio::time::timeout(MARKS_WAIT, notified).await;
    if end.is_complete() {
        return;
    }
    write_end_marks(&docker, &container, &id).await;
}

/// Writes `id`'s end marks (without a status) into the container's streams, for a command that
/// ended without writing them.
pub(super) async fn write_end_marks(docker: &Docker, container: &str, id: &MarkId) {
    let script = format!(
        "{} >/proc/1/fd/1; {} >/proc/1/fd/2",
        marks::printf(id, Kind::Plain),
        marks::printf(id, Kind::Plain)
    );
    let written = tokio::time::timeout(SIGNAL_TIMEOUT, chore(docker, container, script)).await;
    if !matches!(written, Ok(Ok(Some(0)))) {
        tracing::debug!(container = %container, "cannot write a killed command's end marks; its output ends with the container");
    }
}

impl JobContainer {
    pub(super) async fn attach(&self) -> Result<OutputStreamOf, DockerError> {
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

    /// Starts `cmd` in the container as its user, in the workspace, with `env` added (over the
    /// container's exec environment, see `JobContainer::set_exec_env`). Its output is its share
    /// of the container's output (see `log.rs`): the exec writes into the main process's
    /// streams and ends each with its end mark; a task writes the marks for it when it died
    /// before it could (killed by a stop, the OOM killer or itself).
    pub async fn run(
        &self,
        id: MarkId,
        cmd: Vec<String>,
        env: Vec<String>,
    ) -> Result<RunningCommand, DockerError> {
        let Some(log) = &self.log else {
            // A single-command container runs its one command as its main process.
            return Err(no_exec_log());
        };
        let reading = log.clone().lock_owned().await;
        let exec_id = self.start_detached(wrap(&id, cmd), env).await?;
        let end = Arc::new(EndSeen::default());
        let closer = tokio::spawn(close_when_dead(
            self.docker.clone(),
            self.id.clone(),
            exec_id.clone(),
            id.clone(),
            self.exec_deaths.clone(),
            end.clone(),
        ));
        Ok(RunningCommand {
            output: command_output(reading, id, end.clone()),
            ended: CommandHandle::Exec {
                exec_id,
                end,
                _closer: AbortOnDropHandle::new(closer),
            },
        })
    }

    /// Starts an exec that nobody attaches to; its id.
    async fn start_detached(
        &self,
        cmd: Vec<String>,
        env: Vec<String>,
    ) -> Result<String, DockerError> {
        let env = if self.exec_env.is_empty() {
            env
        } else {
            super::merge_env(&self.exec_env, &env)
        };
        let exec = self
            .docker
            .create_exec(
                &self.id,
                CreateExecOptions {
                    attach_stdout: Some(false),
                    attach_stderr: Some(false),
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
        let options = StartExecOptions {
            detach: true,
            tty: false,
            output_capacity: None,
        };
        self.docker
            .start_exec(&exec.id, Some(options))
            .await
            .map_err(docker_err("cannot start a command in the job container"))?;
        Ok(exec.id)
    }

    /// Runs one of the agent's chores (a signal, end marks) as an exec, attached, as the job's
    /// user; its exit code.
    async fn chore(&self, script: String) -> Result<Option<i64>, DockerError> {
        chore(&self.docker, &self.id, script).await
    }

    /// The exit code of a finished command; `None` if Docker has none (killed container).
    pub async fn exit_code(
        &self,
        command: &mut RunningCommand,
    ) -> Result<Option<i64>, DockerError> {
        match &mut command.ended {
            CommandHandle::Exec { exec_id, end, .. } => {
                if let Some(status) = end.status() {
                    return Ok(Some(status));
                }
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
            CommandHandle::Gone { end } => Ok(end.status()),
        }
    }

    /// Sends `signal` to every job process but the keepalive (PID 1), as the job's own user.
    /// Returns false when that could not be done (the container is gone or has no shell).
    /// Bounded by [`SIGNAL_TIMEOUT`]: a container at its pids limit (a fork bomb) may never
    /// run the exec, and the caller then kills the container instead.
    pub async fn signal_job_processes(&self, signal: &str) -> bool {
        let script = format!("kill -{signal} -1 2>/dev/null; exit 0");
        let signalled = async { matches!(self.chore(script).await, Ok(Some(0))) };
        tokio::time::timeout(SIGNAL_TIMEOUT, signalled)
            .await
            .unwrap_or(false)
    }
}
