//! The job's workspace: a fresh directory under the work dir, mounted at `/workspace`.
//!
//! Its name, `job+<agent id>+<job id>+<random>`, says which agent made it (`+` is in no agent
//! id), so the orphan sweep of one agent never touches another's in a shared work dir.
//!
//! Invariant: a workspace is removed on every path. [`Workspace::remove`] does it explicitly
//! (with the job's user's help when the agent is not root, see [`empty_as_job_user`]);
//! dropping a `Workspace` without it (error, panic) removes what it can through `TempDir`'s drop.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use super::container;

/// First part of every workspace name.
pub const PREFIX: &str = "job+";

/// The `(agent id, job id)` a workspace name carries; `None` for anything else.
pub fn owner_of(name: &str) -> Option<(&str, &str)> {
    let mut parts = name.strip_prefix(PREFIX)?.split('+');
    let (agent, job, random) = (parts.next()?, parts.next()?, parts.next()?);
    (parts.next().is_none() && !agent.is_empty() && !random.is_empty()).then_some((agent, job))
}

/// The unique name of the workspace at `path` (see [`Workspace::unique_name`]).
pub fn unique_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().replace('+', "-"))
        .unwrap_or_default()
}

pub struct Workspace {
    dir: Option<TempDir>,
    path: PathBuf,
    handed_over: bool,
    /// Made by an earlier agent process (see [`Workspace::adopt`]): removed by path.
    adopted: bool,
}

impl Workspace {
    /// Creates `<work_dir>/job+<agent>+<job>+<random>/`, owned by (or writable for) the job's
    /// `uid:gid`. `job_id` is a job's number or a warm container's id (`warm-<hex>`, see
    /// `executor::warm`): [`owner_of`] reads both. Off the runtime: it is file I/O.
    pub async fn create(
        work_dir: &Path,
        agent_id: &str,
        job_id: &str,
        uid: u32,
        gid: u32,
    ) -> io::Result<Self> {
        let work_dir = work_dir.to_owned();
        let prefix = format!("{PREFIX}{agent_id}+{job_id}+");
        blocking(move || Self::create_blocking(&work_dir, &prefix, uid, gid)).await
    }

    fn create_blocking(work_dir: &Path, prefix: &str, uid: u32, gid: u32) -> io::Result<Self> {
        std::fs::create_dir_all(work_dir)?;
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(work_dir)?;
        // The container user must be able to write here. As root we hand the directory to it;
        // otherwise we cannot chown, so the directory is opened to everyone (it is private to
        // this job, inside the agent's own work dir, and removed with it).
        let handed_over = std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).is_ok();
        let mode = if handed_over { 0o750 } else { 0o777 };
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode))?;
        let path = dir.path().to_owned();
        Ok(Workspace {
            dir: Some(dir),
            path,
            handed_over,
            adopted: false,
        })
    }

    /// Takes over the workspace at `path` an earlier agent process made for a job it ran (see
    /// `executor::adopt`): removed like a new one, by [`Workspace::remove`] or when dropped.
    pub fn adopt(path: PathBuf) -> Self {
        Workspace {
            dir: None,
            path,
            // Only `hand_over` reads it, before the first command; an adopted job is past it.
            handed_over: true,
            adopted: true,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A name unique to this job run, usable as a container name (`+` is not allowed there).
    pub fn unique_name(&self) -> String {
        unique_name(&self.path)
    }

    /// Writes a file into the workspace, readable by the container user. The name may already
    /// exist in a checked-out repository, possibly as a symlink pointing anywhere: the old entry is
    /// removed and the file created anew (`create_new` does not follow symlinks), so the agent
    /// never writes through a link.
    pub async fn write_file(&self, name: &str, contents: &str) -> io::Result<()> {
        let path = self.path.join(name);
        let (name, contents) = (name.to_owned(), contents.to_owned());
        blocking(move || write_new(&path, &name, &contents)).await
    }

    /// Gives the checkout to the job's user, so the job can change its own repository. As root
    /// everything is chowned to it; otherwise everything is made writable for all (the job's
    /// uid is not the agent's). Symlinks are never followed.
    pub async fn hand_over(&self, uid: u32, gid: u32) -> io::Result<()> {
        let root = self.path.clone();
        let as_root = self.handed_over;
        blocking(move || {
            if as_root {
                chown_tree(&root, uid, gid)
            } else {
                open_tree(&root)
            }
        })
        .await
    }

    /// Removes the workspace and everything in it, off the runtime (a build tree can be large).
    /// What the agent may not delete (a non-root agent, directories the job's user made) is
    /// emptied by the job's user in a short-lived container of `cleaner`, then removed.
    pub async fn remove(mut self, cleaner: Option<&JobUserCleaner<'_>>) -> io::Result<()> {
        let path = match self.dir.take() {
            Some(dir) => dir.keep(),
            None if self.adopted => {
                self.adopted = false;
                self.path.clone()
            }
            None => return Ok(()),
        };
        remove_tree(&path, cleaner).await
    }
}

impl Drop for Workspace {
    /// A new workspace's `TempDir` removes itself; an adopted one is removed here the same way
    /// (an error path, a panic).
    fn drop(&mut self) {
        if self.adopted {
            let _ = remove_all(&self.path);
        }
    }
}

/// Removes `path` and all in it; when that fails and `cleaner` is given, the job's user
/// empties it first. Used by the executor and by the orphan sweep.
pub async fn remove_tree(path: &Path, cleaner: Option<&JobUserCleaner<'_>>) -> io::Result<()> {
    let owned = path.to_owned();
    let first = match (blocking(move || remove_all(&owned)).await, cleaner) {
        (Err(e), Some(cleaner)) => (e, cleaner),
        (result, _) => return result,
    };
    let (first, cleaner) = first;
    if let Err(e) = empty_as_job_user(cleaner, path).await {
        tracing::warn!(workspace = %path.display(), error = %e, "the job's user could not empty the workspace");
        return Err(first);
    }
    let owned = path.to_owned();
    blocking(move || remove_all(&owned)).await
}

fn remove_all(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// What emptying a workspace as the job's user needs: a Docker engine, an image with `/bin/sh`
/// present on it (the job's), the job's `uid:gid`, and the labels that make the container the
/// agent's (the sweep finds it if the agent dies meanwhile).
pub struct JobUserCleaner<'a> {
    pub docker: &'a bollard::Docker,
    pub image: &'a str,
    pub user: (u32, u32),
    pub agent_id: &'a str,
    pub job_id: &'a str,
    /// Labels beyond the agent's own (an exec's ownership labels).
    pub extra_labels: &'a [(String, String)],
}

/// How long emptying a workspace as the job's user may take, start to end.
pub const JOB_USER_CLEANUP_TIMEOUT: Duration = Duration::from_secs(120);

/// Empties `path` from a hardened container running as the job's user: no network, no
/// capabilities, a small pids and memory limit, bounded by [`JOB_USER_CLEANUP_TIMEOUT`].
/// The container is removed whatever happens.
pub async fn empty_as_job_user(cleaner: &JobUserCleaner<'_>, path: &Path) -> Result<(), String> {
    let labels = container::job_labels(cleaner.agent_id, cleaner.job_id, cleaner.extra_labels);
    // `chmod -R` per entry: on `/workspace` itself (not the job's) busybox stops at the top.
    // Links are skipped (chmod would follow them).
    let script = "for f in /workspace/..?* /workspace/.[!.]* /workspace/*; do \
                  [ -L \"$f\" ] || [ ! -e \"$f\" ] || chmod -R u+rwX \"$f\"; done 2>/dev/null; \
                  rm -rf /workspace/..?* /workspace/.[!.]* /workspace/*; \
                  [ -z \"$(ls -A /workspace)\" ]";
    container::run_to_end(
        cleaner.docker,
        cleaner.image,
        &path.to_string_lossy(),
        cleaner.user,
        labels,
        script,
        JOB_USER_CLEANUP_TIMEOUT,
    )
    .await
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

fn write_new(path: &Path, name: &str, contents: &str) -> io::Result<()> {
    use std::io::Write;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            return Err(io::Error::other(format!(
                "{name} is a directory in the repository"
            )));
        }
        Ok(_) => std::fs::remove_file(path)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    file.write_all(contents.as_bytes())?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
}

fn chown_tree(dir: &Path, uid: u32, gid: u32) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
        if entry.file_type()?.is_dir() {
            chown_tree(&path, uid, gid)?;
        }
    }
    Ok(())
}

/// Makes every directory under `dir` writable for all and every file readable and writable for
/// all (executable for all when its owner may execute it). Symlinks are left alone: `chmod`
/// would change what they point to.
fn open_tree(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            continue;
        }
        let mode = entry.metadata()?.permissions().mode() & 0o777;
        let open = if kind.is_dir() {
            0o777
        } else if mode & 0o100 != 0 {
            mode | 0o777
        } else {
            mode | 0o666
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(open))?;
        if kind.is_dir() {
            open_tree(&path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_agent_and_the_job() {
        assert_eq!(
            owner_of("job+agent-1.x+42+AbC123"),
            Some(("agent-1.x", "42"))
        );
        assert_eq!(owner_of("job+a+-7+r"), Some(("a", "-7")));
        assert_eq!(
            owner_of("job+a+warm-0123abcd+r"),
            Some(("a", "warm-0123abcd"))
        );
        for other in [
            "job-42-abc",
            "job+a+1",
            "job++1+r",
            "job+a+1+r+x",
            "x+a+1+r",
        ] {
            assert_eq!(owner_of(other), None, "{other}");
        }
    }
}
