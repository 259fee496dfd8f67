//! The commands run in a job container: execs, the attached main process, their exit codes, and
//! signals to the job's processes.

use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::query_parameters::AttachContainerOptionsBuilder;
use futures_util::{Stream, StreamExt};
use tokio_util::task::AbortOnDropHandle;

use super::spec::WORKSPACE;
use super::{DockerError, JobContainer, docker_err};

/// How long sending a signal to the job's processes (an exec of `kill`) may take.
pub const SIGNAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub(super) type OutputStreamOf =
    std::pin::Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;

/// A command started in the container: its output stream and how to learn its exit code.
pub struct RunningCommand {
    pub output: OutputStreamOf,
    pub(super) ended: CommandHandle,
}

pub(super) enum CommandHandle {
    /// An exec: its exit code is read by inspecting it once the output ends.
    Exec(String),
    /// The main process: a `wait` request opened right after the start answers with its exit
    /// code, or fails when the engine goes away under the job.
    Main(Option<AbortOnDropHandle<Result<Option<i64>, DockerError>>>),
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
    /// container's exec environment, see `JobContainer::set_exec_env`).
    pub async fn run(
        &self,
        cmd: Vec<String>,
        env: Vec<String>,
    ) -> Result<RunningCommand, DockerError> {
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
}
