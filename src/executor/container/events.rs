//! How a job container ends: kills, OOM notices, the main process's exit, and removal (retried
//! in the background when the engine is away).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bollard::Docker;
use bollard::query_parameters::{
    EventsOptionsBuilder, KillContainerOptionsBuilder, RemoveContainerOptionsBuilder,
    WaitContainerOptions,
};
use futures_util::StreamExt;

use super::{DockerError, JobContainer, docker_err};

impl JobContainer {
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
}

/// How long a container whose removal failed is retried in the background: long enough to
/// outlast an engine restart.
const REMOVAL_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(600);

/// Removes a container (see [`try_remove`]); one the engine does not remove now is retried in
/// the background. Also for service containers (`executor::services`).
pub(crate) async fn remove_container(docker: &Docker, id: &str) {
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
pub(super) async fn wait_for_exit(
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
    } else if code == SIGKILL_EXIT {
        // The engine may handle the OOM notice just after the exit (seen under load): a
        // killed process is looked at again, briefly, before it is called anything else.
        settle_oom_flag(&docker, &id, &oom).await;
    }
    Ok(Some(code))
}

/// The exit code of a process killed by SIGKILL (the OOM killer's signal).
const SIGKILL_EXIT: i64 = 137;

/// Re-reads the container's OOM flag a few times (at most ~0.5 s) after a SIGKILL exit.
async fn settle_oom_flag(docker: &Docker, id: &str, oom: &AtomicBool) {
    for _ in 0..10 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let Ok(inspect) = docker.inspect_container(id, None).await else {
            return;
        };
        if inspect.state.and_then(|s| s.oom_killed) == Some(true) {
            oom.store(true, Ordering::SeqCst);
            return;
        }
    }
}

/// The execs of a container that Docker reported ended (`exec_die` events), for the tasks that
/// wait for one (`exec.rs`).
#[derive(Clone, Default)]
pub(super) struct ExecDeaths(Arc<(std::sync::Mutex<HashSet<String>>, tokio::sync::Notify)>);

impl ExecDeaths {
    fn record(&self, exec_id: String) {
        let (ended, notify) = &*self.0;
        ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(exec_id);
        notify.notify_waiters();
    }

    /// Returns once the exec `exec_id` was reported ended.
    pub(super) async fn wait_for(&self, exec_id: &str) {
        let (ended, notify) = &*self.0;
        loop {
            let notified = notify.notified();
            if ended
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(exec_id)
            {
                return;
            }
            notified.await;
        }
    }
}

/// Sets `flag` when Docker reports an OOM kill in the container and records the execs that
/// end in it. Runs until aborted.
pub(super) async fn watch_events(
    docker: Docker,
    id: String,
    flag: Arc<AtomicBool>,
    deaths: ExecDeaths,
) {
    let filters = HashMap::from([
        ("container", vec![id.as_str()]),
        ("event", vec!["oom", "exec_die"]),
    ]);
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
        let Ok(event) = event else { return };
        if event.action.as_deref() == Some("oom") {
            flag.store(true, Ordering::SeqCst);
            continue;
        }
        let exec_id = event
            .actor
            .and_then(|actor| actor.attributes)
            .and_then(|mut attributes| attributes.remove("execID"));
        if let Some(exec_id) = exec_id {
            deaths.record(exec_id);
        }
    }
}
