//! Running one command in the job container to its end: output, time limit, stop requests.

use std::time::Duration;

use bollard::container::LogOutput;
use futures_util::StreamExt;
use tokio::time::{Instant, sleep_until};

use super::container::{JobCommand, JobContainer, OutputStream};
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

/// Runs `command` until it ends, feeding its output to `on_output`. A timeout or graceful stop sends
/// SIGTERM to the job's processes, then SIGKILL after `grace`; an immediate stop kills the
/// container at once.
pub async fn run_command(
    container: &JobContainer,
    command: JobCommand,
    deadline: Instant,
    grace: Duration,
    control: &JobControl,
    on_output: &mut (dyn FnMut(OutputStream, &[u8]) + Send),
) -> CommandEnd {
    let mut stop_rx = control.subscribe();
    if let Some(request) = stop_rx.borrow_and_update().clone() {
        return CommandEnd::Stopped(request, None);
    }
    // A single-command container's command is its main process, already started with it.
    let started = match container.take_main(&command) {
        Some(main) => Ok(main),
        None => container.run(command.cmd, command.env).await,
    };
    let mut running = match started {
        Ok(r) => r,
        Err(e) => return CommandEnd::Failed(e.to_string()),
    };
    let mut ending: Option<Ending> = None;
    let mut kill_at: Option<Instant> = None;
    let mut stop_rx_open = true;
    let mut stream_error = None;
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
            _ = sleep_until(deadline), if ending.is_none() => {
                ending = Some(Ending::Timeout);
                kill_at = Some(begin_graceful_stop(container, grace).await);
            }
            changed = stop_rx.changed(), if stop_rx_open => {
                if changed.is_err() {
                    stop_rx_open = false;
                    continue;
                }
                let Some(request) = stop_rx.borrow_and_update().clone() else { continue };
                match request.kind {
                    StopKind::Immediate => {
                        container.kill().await;
                        kill_at = None;
                    }
                    StopKind::Graceful if ending.is_none() => {
                        kill_at = Some(begin_graceful_stop(container, grace).await);
                    }
                    StopKind::Graceful => {}
                }
                // A timeout already under way stays a timeout unless the stop is immediate.
                if ending.is_none() || request.kind == StopKind::Immediate {
                    ending = Some(Ending::Stop(request));
                }
            }
            _ = sleep_until(kill_at.unwrap_or_else(Instant::now)), if kill_at.is_some() => {
                kill_at = None;
                if !container.signal_job_processes("KILL").await {
                    container.kill().await;
                }
            }
        }
    }
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

async fn begin_graceful_stop(container: &JobContainer, grace: Duration) -> Instant {
    if !container.signal_job_processes("TERM").await {
        // No shell to signal with, or the container is gone: there is nothing gentle left to do.
        container.kill().await;
    }
    Instant::now() + grace
}
