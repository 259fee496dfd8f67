//! Free space: where to measure it (Docker's data root, the work dir) and how (`statvfs`,
//! behind [`DiskProbe`] so tests can give the collector any reading without filling a disk).

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use crate::state::disk::DiskState;

/// One filesystem's reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsReading {
    /// Bytes free for unprivileged users.
    pub free_bytes: u64,
    /// Tells filesystems apart: the work dir and Docker's root may share one.
    pub fs_id: u64,
}

/// Reads the free space of the filesystem holding a path.
pub trait DiskProbe: Send + Sync {
    fn read(&self, path: &Path) -> std::io::Result<FsReading>;
}

/// The real probe: `statvfs` on the path's nearest existing ancestor.
#[derive(Debug, Default, Clone, Copy)]
pub struct Statvfs;

impl DiskProbe for Statvfs {
    fn read(&self, path: &Path) -> std::io::Result<FsReading> {
        let existing = path
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        let stat = rustix::fs::statvfs(existing)?;
        Ok(FsReading {
            free_bytes: stat.f_bavail.saturating_mul(stat.f_frsize),
            fs_id: stat.f_fsid,
        })
    }
}

/// Where Docker keeps images, and whether this agent can measure it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DockerRoot {
    /// A local engine's `DockerRootDir`, measurable from here.
    Local(PathBuf),
    /// Not measurable (a remote engine, a root this agent cannot see): the work dir stands in.
    Unknown(String),
}

/// Finds Docker's data root from `docker info`, and whether the agent can stat it. A remote
/// engine's root is a path on another machine: never measured here, even if a same-named
/// directory exists locally.
pub async fn docker_root(
    docker: &bollard::Docker,
    host: Option<&str>,
    probe: Arc<dyn DiskProbe>,
) -> DockerRoot {
    if let Some(host) = host.filter(|h| h.starts_with("tcp://") || h.starts_with("http://")) {
        return DockerRoot::Unknown(format!(
            "the Docker engine is remote ({host}): measuring the work dir only"
        ));
    }
    let root = match docker.info().await {
        Ok(info) => info.docker_root_dir,
        Err(e) => {
            return DockerRoot::Unknown(format!(
                "cannot ask the Docker engine for its data root ({e}): measuring the work dir only"
            ));
        }
    };
    let Some(root) = root.filter(|r| !r.is_empty()).map(PathBuf::from) else {
        return DockerRoot::Unknown(
            "the Docker engine does not say where its data root is: measuring the work dir only"
                .into(),
        );
    };
    // Off the async runtime: a stat can block (a hung network filesystem).
    tokio::task::spawn_blocking(move || {
        if !root.exists() {
            return DockerRoot::Unknown(format!(
                "Docker's data root {} is not visible from here (another host or mount \
                 namespace): measuring the work dir only",
                root.display()
            ));
        }
        match probe.read(&root) {
            Ok(_) => DockerRoot::Local(root),
            Err(e) => DockerRoot::Unknown(format!(
                "cannot stat Docker's data root {} ({e}): measuring the work dir only",
                root.display()
            )),
        }
    })
    .await
    .unwrap_or_else(|e| DockerRoot::Unknown(format!("cannot stat Docker's data root: {e}")))
}

/// The readings of one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readings {
    pub work_dir: Option<FsReading>,
    pub docker_root: Option<FsReading>,
}

impl Readings {
    pub fn take(probe: &dyn DiskProbe, work_dir: &Path, root: &DockerRoot) -> Self {
        Readings {
            work_dir: probe.read(work_dir).ok(),
            docker_root: match root {
                DockerRoot::Local(path) => probe.read(path).ok(),
                DockerRoot::Unknown(_) => None,
            },
        }
    }

    /// The free bytes that removing images can raise: Docker's root, and the work dir when it
    /// shares that filesystem or Docker's root is not measured (then it stands in). `None`
    /// when nothing relevant could be read.
    pub fn image_free_bytes(&self) -> Option<u64> {
        match (self.docker_root, self.work_dir) {
            (Some(root), Some(work)) if root.fs_id == work.fs_id => {
                Some(root.free_bytes.min(work.free_bytes))
            }
            (Some(root), _) => Some(root.free_bytes),
            (None, work) => work.map(|w| w.free_bytes),
        }
    }

    /// The least free space of all that was read.
    pub fn lowest_free_bytes(&self) -> Option<u64> {
        [self.work_dir, self.docker_root]
            .into_iter()
            .flatten()
            .map(|r| r.free_bytes)
            .min()
    }
}

pub(crate) fn mib(bytes: u64) -> u64 {
    bytes / (1024 * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(free_bytes: u64, fs_id: u64) -> Option<FsReading> {
        Some(FsReading { free_bytes, fs_id })
    }

    #[test]
    fn images_only_help_the_filesystem_they_live_on() {
        let shared = Readings {
            work_dir: reading(10, 1),
            docker_root: reading(50, 1),
        };
        assert_eq!(shared.image_free_bytes(), Some(10));
        let separate = Readings {
            work_dir: reading(10, 2),
            docker_root: reading(50, 1),
        };
        assert_eq!(separate.image_free_bytes(), Some(50));
        assert_eq!(separate.lowest_free_bytes(), Some(10));
        let remote = Readings {
            work_dir: reading(10, 2),
            docker_root: None,
        };
        assert_eq!(remote.image_free_bytes(), Some(10));
    }

    #[test]
    fn statvfs_reads_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        let reading = Statvfs.read(&dir.path().join("not/yet")).unwrap();
        assert!(reading.free_bytes > 0);
    }
}
