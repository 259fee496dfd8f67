//! Taking over a job container an earlier agent process started: its log read back from its
//! head mark (Docker kept it, see `log.rs`), and the command that was running when that process
//! went away found again by its marks.

use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::LogsOptionsBuilder;
use futures_util::StreamExt;
use tokio_util::task::AbortOnDropHandle;

use super::events::wait_for_exit;
use super::exec::{CommandHandle, RunningCommand, close_when_dead, write_end_marks};
use super::log::{ContainerLog, EndSeen, OutputStreamOf, command_output, main_output};
use super::marks::{Kind, MarkId, Piece, Scanner};
use super::{DockerError, JobCommand, JobContainer, OutputStream, docker_err};

/// How long the head of an adopted container's log may take to be read.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a container cannot be taken over.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("the job's container is gone")]
    Gone,
    #[error("the job's container does not run any more and was not the job's one command")]
    Stopped,
    #[error(
        "the job's output while no agent ran was more than Docker keeps per container \
         ({} files of {}): its beginning is lost",
        super::log::LOG_FILES,
        super::log::LOG_FILE_SIZE
    )]
    HeadLost,
    #[error(transparent)]
    Docker(#[from] DockerError),
}

/// What became of the command that ran when the earlier agent process went away.
pub enum Resumed {
    /// It runs, or ended while no agent ran: its output (from its start) and end come from here.
    Command(RunningCommand),
    /// It never started.
    NotStarted,
}

impl JobContainer {
    /// Takes over the container `id` whose main process wrote `head` first. `main_command` is
    /// the job's one command when the main process runs it (`None`: the container runs each
    /// command as an exec). Its whole log is read again from the start, so the job's output
    /// is the same as if no agent had gone away.
    pub async fn adopt(
        docker: &Docker,
        id: &str,
        head: &MarkId,
        main_command: Option<JobCommand>,
    ) -> Result<Self, AdoptError> {
        let inspect = match docker.inspect_container(id, None).await {
            Ok(inspect) => inspect,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => return Err(AdoptError::Gone),
            Err(e) => return Err(docker_err("cannot inspect the job's container")(e).into()),
        };
        // The record may name the container (written before it was made): its id from here on.
        let id = inspect.id.as_deref().unwrap_or(id);
        let state = inspect.state.clone().unwrap_or_default();
        if main_command.is_none() && state.running != Some(true) {
            return Err(AdoptError::Stopped);
        }
        let mut log = ContainerLog::new(followed_to_the_end(docker, id));
        let first = tokio::time::timeout(HEAD_TIMEOUT, log.next()).await;
        match first {
            Ok(Some(Ok((OutputStream::Stdout, Piece::Mark { id: mark, .. })))) if &mark == head => {
            }
            Ok(Some(Err(e))) => {
                return Err(docker_err("cannot read the job container's log")(e).into());
            }
            _ => return Err(AdoptError::HeadLost),
        }
        let single = main_command.is_some();
        let mut container = JobContainer::handle(docker, id, head.clone(), single);
        if state.oom_killed == Some(true) {
            container
                .oom
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        match main_command {
            None => container.log = Some(Arc::new(tokio::sync::Mutex::new(log))),
            Some(command) => {
                let waiting = tokio::spawn(wait_for_exit(
                    docker.clone(),
                    id.to_owned(),
                    container.oom.clone(),
                ));
                let main = RunningCommand {
                    output: main_output(log),
                    ended: CommandHandle::Main(Some(AbortOnDropHandle::new(waiting))),
                };
                container.set_started(command, main);
            }
        }
        Ok(container)
    }

    /// A handle on the container `id` of a job given up, only to remove it (by
    /// [`JobContainer::remove`], or when dropped).
    pub fn for_removal(docker: &Docker, id: &str) -> Self {
        // Single: nothing to watch in a container that is only removed.
        JobContainer::handle(docker, id, MarkId::random(), true)
    }

    /// The output of a command that finished before the earlier agent process went away,
    /// read again from the log up to its end marks.
    pub async fn replay(&self, mark: &MarkId) -> Option<OutputStreamOf> {
        let log = self.log.as_ref()?.clone().lock_owned().await;
        Some(command_output(
            log,
            mark.clone(),
            Arc::new(EndSeen::default()),
        ))
    }

    /// The command with marks `mark` that ran when the earlier agent process went away: found
    /// among the container's execs, else in the log (it ended while no agent ran, killed
    /// before it could write its end marks included, which are then written for it).
    pub async fn resume(&self, mark: &MarkId) -> Result<Resumed, DockerError> {
        let Some(log) = &self.log else {
            return Ok(Resumed::NotStarted);
        };
        let end = Arc::new(EndSeen::default());
        let ended = match self.find_exec(mark).await? {
            Some(exec_id) => {
                let closer = tokio::spawn(close_when_dead(
                    self.docker.clone(),
                    self.id.clone(),
                    exec_id.clone(),
                    mark.clone(),
                    self.exec_deaths.clone(),
                    end.clone(),
                ));
                CommandHandle::Exec {
                    exec_id,
                    end: end.clone(),
                    _closer: AbortOnDropHandle::new(closer),
                }
            }
            None => {
                let (started, ended) = self.marks_in_log(mark).await?;
                if !started {
                    return Ok(Resumed::NotStarted);
                }
                if !ended {
                    write_end_marks(&self.docker, &self.id, mark).await;
                }
                CommandHandle::Gone { end: end.clone() }
            }
        };
        let reading = log.clone().lock_owned().await;
        Ok(Resumed::Command(RunningCommand {
            output: command_output(reading, mark.clone(), end),
            ended,
        }))
    }

    /// Makes `running` the command `command` that the next `run_command` of it takes up.
    pub fn set_started(&self, command: JobCommand, running: RunningCommand) {
        *self.main.lock().unwrap_or_else(|e| e.into_inner()) = Some((command, running));
    }

    /// The exec whose command carries `mark`, if Docker still knows it.
    async fn find_exec(&self, mark: &MarkId) -> Result<Option<String>, DockerError> {
        let inspect = self
            .docker
            .inspect_container(&self.id, None)
            .await
            .map_err(docker_err("cannot inspect the job's container"))?;
        for exec_id in inspect.exec_ids.unwrap_or_default() {
            let Ok(exec) = self.docker.inspect_exec(&exec_id).await else {
                continue;
            };
            let arguments = exec
                .process_config
                .and_then(|p| p.arguments)
                .unwrap_or_default();
            if arguments.iter().any(|a| a.contains(mark.as_str())) {
                return Ok(Some(exec_id));
            }
        }
        Ok(None)
    }

    /// Whether the log so far holds `mark`'s start mark, and both its end marks.
    async fn marks_in_log(&self, mark: &MarkId) -> Result<(bool, bool), DockerError> {
        let mut source = read_log(&self.docker, &self.id, false);
        let mut scanners: [Scanner; 2] = Default::default();
        let (mut started, mut ends) = (false, [false; 2]);
        while let Some(item) = source.next().await {
            let (i, message) = match item {
                Ok(bollard::container::LogOutput::StdOut { message }) => (0, message),
                Ok(bollard::container::LogOutput::StdErr { message }) => (1, message),
                Ok(_) => continue,
                Err(e) => return Err(docker_err("cannot read the job container's log")(e)),
            };
            let mut pieces = Vec::new();
            scanners[i].push(&message, &mut pieces);
            for piece in pieces {
                match piece {
                    Piece::Mark { id, kind } if &id == mark => match kind {
                        Kind::Start => started = true,
                        _ => ends[i] = true,
                    },
                    _ => {}
                }
            }
        }
        Ok((started, ends == [true, true]))
    }
}

/// The container's log from its start, followed until the container stops, then read once more
/// as a whole for what the follow missed: Docker may end a follow at the container's stop before
/// it gave the last messages (seen: a job's last line lost). Each stream's bytes beyond those
/// the follow gave come from that last read, in its order.
fn followed_to_the_end(docker: &Docker, id: &str) -> OutputStreamOf {
    enum Phase {
        Follow(OutputStreamOf),
        Rest(OutputStreamOf),
        Done,
    }
    struct Reading {
        docker: Docker,
        id: String,
        phase: Phase,
        /// Bytes given per stream (stdout, stderr): by the follow, then skipped in the rest.
        given: [u64; 2],
    }
    let start = Reading {
        docker: docker.clone(),
        id: id.to_owned(),
        phase: Phase::Follow(read_log(docker, id, true)),
        given: [0; 2],
    };
    Box::pin(futures_util::stream::unfold(start, |mut r| async move {
        loop {
            let item = match &mut r.phase {
                Phase::Follow(s) | Phase::Rest(s) => s.next().await,
                Phase::Done => return None,
            };
            let following = matches!(r.phase, Phase::Follow(_));
            let (i, message) = match item {
                None if following => {
                    r.phase = Phase::Rest(read_log(&r.docker, &r.id, false));
                    continue;
                }
                None => return None,
                Some(Err(e)) => {
                    r.phase = Phase::Done;
                    return Some((Err(e), r));
                }
                Some(Ok(bollard::container::LogOutput::StdOut { message })) => (0, message),
                Some(Ok(bollard::container::LogOutput::StdErr { message })) => (1, message),
                Some(Ok(_)) => continue,
            };
            let len = message.len() as u64;
            if following {
                r.given[i] += len;
                return Some((Ok(output_of(i, message)), r));
            }
            // The rest: skip what the follow gave.
            let skip = r.given[i].min(len);
            r.given[i] -= skip;
            if skip < len {
                let message = message.slice(skip as usize..);
                return Some((Ok(output_of(i, message)), r));
            }
        }
    }))
}

fn output_of(stream: usize, message: bytes::Bytes) -> bollard::container::LogOutput {
    match stream {
        0 => bollard::container::LogOutput::StdOut { message },
        _ => bollard::container::LogOutput::StdErr { message },
    }
}

/// The container's log from its start, followed (until the container stops) or as it is now.
fn read_log(docker: &Docker, id: &str, follow: bool) -> OutputStreamOf {
    let options = LogsOptionsBuilder::default()
        .follow(follow)
        .stdout(true)
        .stderr(true)
        .build();
    Box::pin(docker.logs(id, Some(options)))
}
