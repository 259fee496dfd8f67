//! A job's cleanup, after its result: removing its containers, its network and its workspace in
//! a task of the executor's, so the result never waits for Docker to tear a container down.
//!
//! The task is spawned on the executor's tracker when the result is made, so
//! `Executor::cleanups_done` waits for it, but it removes nothing until its [`Cleanup`] handle
//! lets it: when the handle is finished ([`Cleanup::finish`]), started ([`Cleanup::start`]) or
//! dropped. The caller decides how long the job's leftovers may wait for its result to go out
//! (pull mode: until the result is delivered; push mode: not at all). Once started, a cleanup is
//! bounded by [`CLEANUP_LIMIT`]; past it an error is logged and what is left is the orphan
//! sweep's. On a panic or an abort nothing changes: the guards of what the job made
//! (`JobContainer`, the service containers, `JobNetwork`, the workspace's directory) still
//! remove it when dropped.

use std::time::Duration;

use bollard::Docker;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

use super::container::JobContainer;
use super::network::JobNetwork;
use super::services::Services;
use super::warm::{LiveId, Starting};
use super::workspace::{JobUserCleaner, Workspace};
use crate::gc::ImageHold;

/// How long one job's cleanup may take once started. Above the slowest step it may take (the
/// job's user emptying its workspace, `workspace::JOB_USER_CLEANUP_TIMEOUT`), so that only an
/// engine that stopped answering reaches it.
pub const CLEANUP_LIMIT: Duration = Duration::from_secs(300);

/// What the job made in Docker, kept for the cleanup, which removes the containers before the
/// network they are attached to.
pub(super) struct Made {
    pub container: Option<JobContainer>,
    /// The job's service containers (those started so far).
    pub services: Services,
    /// The job's own network (`docker.network = "job"`).
    pub network: Option<JobNetwork>,
    /// A warm container's id (`warm/`), spared by the sweeps until the cleanup is over (dropped
    /// with `made`, after the workspace).
    pub warm: Option<LiveId>,
    /// Held until the first command: the warm pool refills only when no job is on its way to
    /// one (`warm/refill.rs`).
    pub starting: Option<Starting>,
}

/// Everything a job leaves once its result is made, owned by its cleanup's task.
pub(super) struct Leftovers {
    pub made: Made,
    pub workspace: Workspace,
    pub cleaner: Cleaner,
    /// Held until the containers are gone: the disk collector never removes an image under
    /// the job's containers.
    pub image_holds: Vec<ImageHold>,
}

/// What emptying the workspace as the job's user needs (see [`JobUserCleaner`]), owned.
pub(super) struct Cleaner {
    pub docker: Docker,
    pub image: String,
    pub user: (u32, u32),
    pub agent_id: String,
    pub job_id: String,
    pub extra_labels: Vec<(String, String)>,
}

impl Cleaner {
    /// The cleaner of job `job_id` of an agent with `settings`, emptying as `user` in `image`.
    pub fn new(
        docker: &Docker,
        settings: &super::ExecutorSettings,
        image: &str,
        user: (u32, u32),
        job_id: i64,
    ) -> Self {
        Cleaner {
            docker: docker.clone(),
            image: image.to_owned(),
            user,
            agent_id: settings.agent_id.clone(),
            job_id: job_id.to_string(),
            extra_labels: settings.extra_labels.clone(),
        }
    }
}

impl Leftovers {
    /// Removes the container and the services, then the network, then the workspace. The
    /// container goes first: removing it kills every job process at once (a fork bomb at its
    /// pids limit included), so nothing writes into the workspace any more; with the services
    /// gone too the network has no endpoints left (Docker refuses to remove a network in use).
    /// What the agent may not delete (agent not root) the job's user empties from a short-lived
    /// container of its own, on no network (see `workspace::empty_as_job_user`).
    async fn remove(self) {
        let Leftovers {
            mut made,
            workspace,
            cleaner,
            image_holds,
        } = self;
        // Together: the services never touch the workspace, and the network waits for both.
        let container = async {
            if let Some(container) = made.container.as_mut() {
                container.remove().await;
            }
        };
        tokio::join!(container, made.services.remove_all());
        drop(image_holds);
        if let Some(network) = made.network.as_mut() {
            network.remove().await;
        }
        let cleaner = JobUserCleaner {
            docker: &cleaner.docker,
            image: &cleaner.image,
            user: cleaner.user,
            agent_id: &cleaner.agent_id,
            job_id: &cleaner.job_id,
            extra_labels: &cleaner.extra_labels,
        };
        let path = workspace.path().to_owned();
        if let Err(e) = workspace.remove(Some(&cleaner)).await {
            tracing::error!(workspace = %path.display(), error = %e, "cannot remove the job workspace");
        }
    }
}

/// The handle of one job's cleanup. The removal starts when the handle is finished, started or
/// dropped (see the module doc); [`Cleanup::finish`] waits for its end.
#[must_use = "the job's leftovers wait until the cleanup is finished, started or dropped"]
pub struct Cleanup {
    job_id: i64,
    /// Sending on it, or dropping it, lets the removal begin.
    start: Option<oneshot::Sender<()>>,
    /// `None` when the job left nothing, or once waited for.
    task: Option<JoinHandle<()>>,
}

impl Cleanup {
    /// The cleanup of a job that left nothing to remove (it ended before its workspace existed).
    pub fn nothing(job_id: i64) -> Self {
        Cleanup {
            job_id,
            start: None,
            task: None,
        }
    }

    /// Spawns the removal of `leftovers` on `tracker`, waiting for the handle's word.
    pub(super) fn spawn(tracker: &TaskTracker, job_id: i64, leftovers: Leftovers) -> Self {
        let (start, started) = oneshot::channel::<()>();
        let task = tracker.spawn(async move {
            // A start, or a handle dropped without one: either way the removal begins.
            let _ = started.await;
            if tokio::time::timeout(CLEANUP_LIMIT, leftovers.remove())
                .await
                .is_err()
            {
                tracing::error!(
                    job_id,
                    limit_seconds = CLEANUP_LIMIT.as_secs(),
                    "the job's cleanup did not end in time: the orphan sweep removes what is left"
                );
            }
        });
        Cleanup {
            job_id,
            start: Some(start),
            task: Some(task),
        }
    }

    /// Lets the removal begin now, without waiting for it.
    pub fn start(&mut self) {
        if let Some(start) = self.start.take() {
            let _ = start.send(());
        }
    }

    /// Starts the removal (if it has not started) and waits until it ended, at most
    /// [`CLEANUP_LIMIT`] from its start. Dropped before that, the removal goes on.
    pub async fn finish(mut self) {
        self.start();
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            // Its guards removed what they hold on the unwind, in the background.
            tracing::error!(job_id = self.job_id, error = %e, "the job's cleanup failed");
        }
    }

    /// True once there is nothing left to wait for.
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

impl std::fmt::Debug for Cleanup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cleanup")
            .field("job_id", &self.job_id)
            .field("started", &self.start.is_none())
            .field("finished", &self.is_finished())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Leftovers of a job that made no container: only its workspace, under `work_dir`. No
    /// Docker request is made (the client connects lazily, and the agent may remove the tree).
    async fn workspace_only(work_dir: &std::path::Path) -> (Leftovers, std::path::PathBuf) {
        let (uid, gid) = (rustix::process::getuid(), rustix::process::getgid());
        let workspace = Workspace::create(work_dir, "agent", "7", uid.as_raw(), gid.as_raw());
        let workspace = workspace.await.unwrap();
        let path = workspace.path().to_owned();
        let docker = super::super::connect(Some("http://127.0.0.1:9")).unwrap();
        let leftovers = Leftovers {
            made: Made {
                container: None,
                services: Services::new(Vec::new()),
                network: None,
                warm: None,
                starting: None,
            },
            workspace,
            cleaner: Cleaner {
                docker,
                image: "none".into(),
                user: (uid.as_raw(), gid.as_raw()),
                agent_id: "agent".into(),
                job_id: "7".into(),
                extra_labels: Vec::new(),
            },
            image_holds: Vec::new(),
        };
        (leftovers, path)
    }

    #[tokio::test]
    async fn a_cleanup_waits_for_its_handle_and_is_tracked_until_it_ends() {
        let work_dir = tempfile::tempdir().unwrap();
        let (leftovers, path) = workspace_only(work_dir.path()).await;
        let tracker = TaskTracker::new();
        tracker.close();
        let cleanup = Cleanup::spawn(&tracker, 7, leftovers);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(path.exists(), "removed before the handle let it");
        assert!(!cleanup.is_finished());
        assert_eq!(tracker.len(), 1);
        cleanup.finish().await;
        assert!(!path.exists(), "the workspace is left");
        assert!(tracker.is_empty());
    }

    #[tokio::test]
    async fn a_dropped_handle_starts_the_cleanup() {
        let work_dir = tempfile::tempdir().unwrap();
        let (leftovers, path) = workspace_only(work_dir.path()).await;
        let tracker = TaskTracker::new();
        tracker.close();
        drop(Cleanup::spawn(&tracker, 7, leftovers));
        tokio::time::timeout(Duration::from_secs(10), tracker.wait())
            .await
            .expect("the cleanup did not end");
        assert!(!path.exists(), "the workspace is left");
    }

    #[tokio::test]
    async fn a_job_that_left_nothing_is_clean_at_once() {
        let cleanup = Cleanup::nothing(7);
        assert!(cleanup.is_finished());
        cleanup.finish().await;
    }
}
