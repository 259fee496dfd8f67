//! Who owns the container of a `gryt-agent exec`, even after the exec was SIGKILLed.
//!
//! Each exec holds an exclusive `flock` on a file of its own in `<state_dir>/exec/` for as long
//! as it lives, and labels its containers with that file's path and the host's name. The kernel
//! drops the lock when the process dies, however it dies. The next exec, or the agent at start,
//! lists containers with such labels, and for each whose lock file is in its own lock dir and
//! on this host, tries to take the lock: taken (or the file gone) means the owner is dead, and
//! its container, network and workspace are removed; held means a live exec, which is left
//! alone.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use bollard::Docker;
use bollard::query_parameters::{ListContainersOptionsBuilder, ListNetworksOptionsBuilder};
use rustix::fs::{FlockOperation, flock};

use super::container::{LABEL_AGENT_ID, LABEL_JOB_ID, WORKSPACE, try_remove};
use super::network;
use super::workspace::{self, JobUserCleaner};

/// Label naming the lock file of the exec that owns the container.
pub const LABEL_EXEC_LOCK: &str = "io.gryt.exec.lock";
/// Label naming the host that exec ran on.
pub const LABEL_EXEC_HOST: &str = "io.gryt.exec.host";

/// The lock an exec holds for its whole life. Dropped (or the process killed), it is released.
pub struct ExecLock {
    _file: File,
    path: PathBuf,
}

impl ExecLock {
    /// Makes `dir` (private to this user) and a lock file in it, and locks it.
    pub fn acquire(dir: &Path) -> io::Result<ExecLock> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let file = tempfile::Builder::new()
            .prefix(&format!("exec-{}-", std::process::id()))
            .suffix(".lock")
            .tempfile_in(dir)?;
        let (file, path) = file.keep().map_err(|e| e.error)?;
        flock(&file, FlockOperation::NonBlockingLockExclusive).map_err(io::Error::from)?;
        Ok(ExecLock { _file: file, path })
    }

    /// The labels that tie a container to this exec.
    pub fn labels(&self) -> Vec<(String, String)> {
        vec![
            (
                LABEL_EXEC_LOCK.to_owned(),
                self.path.to_string_lossy().into_owned(),
            ),
            (LABEL_EXEC_HOST.to_owned(), host_name()),
        ]
    }

    /// Removes the lock file and lets the lock go, off the runtime (what dropping it does).
    pub async fn release(self) {
        let _ = tokio::task::spawn_blocking(move || drop(self)).await;
    }
}

/// However the exec ends short of being killed (its job done, or an early error before any
/// container), its lock file goes: removed while still locked, then the lock is let go.
impl Drop for ExecLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub fn host_name() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

/// Whether the exec that holds (held) `path` is dead: `Some(true)` when its lock can be taken
/// or the file is gone, `Some(false)` when it is held, `None` when that cannot be told.
fn owner_is_dead(path: &Path) -> Option<bool> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Some(true),
        Err(_) => return None,
    };
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Some(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Some(false),
        Err(_) => None,
    }
}

/// A container of a dead exec, with what is needed to remove it and its workspace.
struct Orphan {
    id: String,
    lock: PathBuf,
    image: String,
    agent_id: String,
    job_id: String,
    workspace: Option<PathBuf>,
}

/// Removes the containers (and workspaces, and lock files) of execs on this host whose lock
/// file is in `lock_dir` and whose process is dead. Returns how many containers it removed.
/// Never touches a live exec's job, another host's, or anything outside `lock_dir` and
/// `work_dir`.
pub async fn sweep_dead_execs(
    docker: &Docker,
    lock_dir: &Path,
    work_dir: &Path,
    job_user: (u32, u32),
) -> usize {
    let mut removed = 0;
    for orphan in dead_exec_containers(docker, lock_dir, work_dir).await {
        if let Err(e) = try_remove(docker, &orphan.id).await {
            tracing::warn!(container = %orphan.id, error = %e, "cannot remove a dead exec's container");
            continue;
        }
        removed += 1;
        tracing::info!(container = %orphan.id, "removed the container of an exec that was killed");
        if let Some(path) = &orphan.workspace {
            let cleaner = JobUserCleaner {
                docker,
                image: &orphan.image,
                user: job_user,
                agent_id: &orphan.agent_id,
                job_id: &orphan.job_id,
                extra_labels: &[],
            };
            if let Err(e) = workspace::remove_tree(path, Some(&cleaner)).await {
                tracing::warn!(workspace = %path.display(), error = %e, "cannot remove a dead exec's workspace");
            }
        }
        let lock = orphan.lock.clone();
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(lock)).await;
    }
    remove_dead_exec_networks(docker, lock_dir).await;
    removed
}

/// Removes the job networks of execs on this host whose lock file is in `lock_dir` and whose
/// process is dead (after their containers: the engine refuses a network still in use).
async fn remove_dead_exec_networks(docker: &Docker, lock_dir: &Path) {
    let host = host_name();
    let filters = HashMap::from([(
        "label",
        vec![
            LABEL_EXEC_LOCK.to_owned(),
            format!("{LABEL_EXEC_HOST}={host}"),
            format!("{}={}", network::LABEL_NETWORK, network::MODE_JOB),
        ],
    )]);
    let options = ListNetworksOptionsBuilder::default()
        .filters(&filters)
        .build();
    let Ok(listed) = docker.list_networks(Some(options)).await else {
        return;
    };
    let mut candidates = Vec::new();
    for n in listed {
        let labels = n.labels.unwrap_or_default();
        let lock = labels.get(LABEL_EXEC_LOCK).map(PathBuf::from);
        if let (Some(id), Some(lock)) = (n.id, lock.filter(|l| l.parent() == Some(lock_dir))) {
            candidates.push((id, lock));
        }
    }
    let dead: Vec<String> = tokio::task::spawn_blocking(move || {
        candidates
            .into_iter()
            .filter(|(_, lock)| owner_is_dead(lock) == Some(true))
            .map(|(id, _)| id)
            .collect()
    })
    .await
    .unwrap_or_default();
    for id in dead {
        match network::try_remove(docker, &id).await {
            Ok(()) => {
                tracing::info!(network = %id, "removed the network of an exec that was killed")
            }
            Err(e) => {
                tracing::warn!(network = %id, error = %e, "cannot remove a dead exec's network")
            }
        }
    }
}

async fn dead_exec_containers(docker: &Docker, lock_dir: &Path, work_dir: &Path) -> Vec<Orphan> {
    let host = host_name();
    let filters = HashMap::from([(
        "label",
        vec![
            LABEL_EXEC_LOCK.to_owned(),
            format!("{LABEL_EXEC_HOST}={host}"),
        ],
    )]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let listed = match docker.list_containers(Some(options)).await {
        Ok(listed) => listed,
        Err(e) => {
            tracing::debug!(error = %e, "cannot list exec containers");
            return Vec::new();
        }
    };
    let mut candidates = Vec::new();
    for c in listed {
        let labels = c.labels.unwrap_or_default();
        let Some(lock) = labels.get(LABEL_EXEC_LOCK).map(PathBuf::from) else {
            continue;
        };
        // Only this user's execs: their lock files are in this lock dir.
        if lock.parent() != Some(lock_dir) {
            continue;
        }
        let workspace = c
            .mounts
            .unwrap_or_default()
            .into_iter()
            .find(|m| m.destination.as_deref() == Some(WORKSPACE))
            .and_then(|m| m.source)
            .map(PathBuf::from)
            .filter(|p| is_workspace_in(p, work_dir));
        candidates.push(Orphan {
            id: c.id.unwrap_or_default(),
            lock,
            image: c.image.unwrap_or_default(),
            agent_id: labels.get(LABEL_AGENT_ID).cloned().unwrap_or_default(),
            job_id: labels.get(LABEL_JOB_ID).cloned().unwrap_or_default(),
            workspace,
        });
    }
    tokio::task::spawn_blocking(move || {
        candidates
            .into_iter()
            .filter(|o| !o.id.is_empty() && owner_is_dead(&o.lock) == Some(true))
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// A workspace directly in `work_dir`, by its name.
fn is_workspace_in(path: &Path, work_dir: &Path) -> bool {
    path.parent() == Some(work_dir)
        && path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(workspace::owner_of)
            .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_alive_and_a_released_one_dead() {
        let dir = tempfile::tempdir().unwrap();
        let lock = ExecLock::acquire(&dir.path().join("exec")).unwrap();
        let path = lock.path.clone();
        assert_eq!(owner_is_dead(&path), Some(false));
        drop(lock);
        assert_eq!(owner_is_dead(&path), Some(true));
        assert!(!path.exists(), "a dropped lock removes its file");
        assert_eq!(
            std::fs::read_dir(dir.path().join("exec")).unwrap().count(),
            0
        );
        // A lock file left by a killed exec: nobody holds it.
        let left = dir.path().join("left.lock");
        std::fs::write(&left, "").unwrap();
        assert_eq!(owner_is_dead(&left), Some(true));
    }
}
