//! Running one command in the job container to its end: output, time limit, stop requests.

use std::time::Duration;

use bollard::container::LogOutput;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use tokio::time::{Instant, sleep_until};

use super::container::{JobCommand, JobContainer, MarkId, OutputStream};
use super::control::{JobControl, StopKind, StopRequest};

/// How a command ended.
#[derive(Debug, Clone, PartialEq)]
pub enum CommandEnd {
    /// It exited by itself; `None` when Docker reported no exit code.
    Exited(Option<i64>),
    /// It ran past `deadline` and was stopped.
    TimedOut(Option<i64>),
    /// Someone asked for the job to stop.
    Stopped(StopRequest, Option<i64>),
    /// Docker failed under it (engine gone, container removed).
    Failed(String),
}

enum Ending {
    Timeout,
    Stop(StopRequest),
}

/// Runs `command` until it ends, feeding its output to `on_output`; as an exec, `mark` ends its
/// output (see `container::log`). A timeout or graceful stop sends
/// SIGTERM to the job's processes, then SIGKILL after `grace`; an immediate stop kills the
/// container at once.
///
/// The Docker calls that stop the job run beside the reading of its output, never instead of
/// it: Docker finishes a container's exit (and so a kill, and a `docker exec` that died with
/// the container) only once the attached output has been read to its end. A loop that waited
/// for them without reading deadlocked with the engine whenever the job had more output
/// queued than the pipes hold (a job printing fast when it was stopped).
#[allow(clippy::too_many_arguments)]
pub async fn run_command(
    container: &JobContainer,
    command: JobCommand,
    mark: MarkId,
    deadline: Instant,
    grace: Duration,
    control: &JobControl,
    on_output: &mut (dyn FnMut(OutputStream, &[u8]) + Send),
) -> CommandEnd {
    let mut stop_rx = control.subscribe();
    if let Some(request) = stop_rx.borrow_and_update().clone() {
        // A main process that already runs is not read: its output is let go of, so that Docker
        // can end the container (see above).
        drop(container.take_main(&command));
        return CommandEnd::Stopped(request, None);
    }
    // A single-command container's command is its main process, already started with it.
    let started = match container.take_main(&command) {
        Some(main) => Ok(main),
        None => container.run(mark, command.cmd, command.env).await,
    };
    let mut running = match started {
        Ok(r) => r,
        Err(e) => return CommandEnd::Failed(e.to_string()),
    };
    let mut ending: Option<Ending> = None;
    let mut kill_at: Option<Instant> = None;
    let mut stop_rx_open = true;
    let mut stream_error = None;
    // Signals and kills under way, each saying when to force the kill (`None`: nothing more to
    // do). Whatever is still under way when the output ends is dropped: the command is over.
    let mut stopping: FuturesUnordered<BoxFuture<'_, Option<Instant>>> = FuturesUnordered::new();
    let mut killed = false;
    loop {
        tokio::select! {
            item = running.output.next() => match item {
                Some(Ok(LogOutput::StdOut { message })) => on_output(OutputStream::Stdout, &message),
                Some(Ok(LogOutput::StdErr { message })) => on_output(OutputStream::Stderr, &message),
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    stream_error = Some(e.to_string());
                    break;
                }
                None => break,
            },
            Some(at) = stopping.next(), if !stopping.is_empty() => {
                // The grace runs from the SIGTERM; nothing is left to wait for after a kill.
                if !killed {
                    kill_at = at.or(kill_at);
                }
            }
            _ = sleep_until(deadline), if ending.is_none() => {
                ending = Some(Ending::Timeout);
                stopping.push(Box::pin(terminate(container, grace)));
            }
            changed = stop_rx.changed(), if stop_rx_open => {
                if changed.is_err() {
                    stop_rx_open = false;
                    continue;
                }
                let Some(request) = stop_rx.borrow_and_update().clone() else { continue };
                match request.kind {
                    StopKind::Immediate => {
                        killed = true;
                        kill_at = None;
                        stopping.push(Box::pin(kill(container)));
                    }
                    StopKind::Graceful if ending.is_none() => {
                        stopping.push(Box::pin(terminate(container, grace)));
                    }
                    StopKind::Graceful => {}
                }
                // A timeout already under way stays a timeout unless the stop is immediate.
                if ending.is_none() || request.kind == StopKind::Immediate {
                    ending = Some(Ending::Stop(request));
                }
            }
            _ = sleep_until(kill_at.unwrap_or_else(Instant::now)), if kill_at.is_some() => {
                killed = true;
                kill_at = None;
                stopping.push(Box::pin(force_kill(container)));
            }
        }
    }
    drop(stopping);
    let exit_code = match container.exit_code(&mut running).await {
        Ok(code) => code,
        // The output ended on its own but Docker cannot say how the command ended: the engine
        // went away (restart, crash) under the job. That is the agent's failure, not the job's.
        Err(e) if ending.is_none() && stream_error.is_none() => {
            return CommandEnd::Failed(format!("lost the Docker engine during the job: {e}"));
        }
        Err(_) => None,
    };
    match (ending, stream_error) {
        (Some(Ending::Timeout), _) => CommandEnd::TimedOut(exit_code),
        (Some(Ending::Stop(request)), _) => CommandEnd::Stopped(request, exit_code),
        (None, Some(error)) => {
            CommandEnd::Failed(format!("lost the command's output stream: {error}"))
        }
        (None, None) => CommandEnd::Exited(exit_code),
    }
}

/// SIGTERM to the job's processes; says when to force the kill (after `grace`). The container
/// is killed at once when the signal cannot be sent.
async fn terminate(container: &JobContainer, grace: Duration) -> Option<Instant> {
    if container.signal_job_processes("TERM").await {
        return Some(Instant::now() + grace);
    }
    // No shell to signal with, or the container is gone: there is nothing gentle left to do.
    container.kill().await;
    None
}

/// SIGKILL to the job's processes once the grace is over, else the container's kill.
async fn force_kill(container: &JobContainer) -> Option<Instant> {
    if !container.signal_job_processes("KILL").await {
        container.kill().await;
    }
    None
}

async fn kill(container: &JobContainer) -> Option<Instant> {
    container.kill().await;
    None
}
