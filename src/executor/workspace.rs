//! The job's workspace: a fresh directory under the work dir, mounted at `/workspace`.
//!
//! Invariant: a workspace is removed on every path. [`Workspace::remove`] does it explicitly;
//! dropping a `Workspace` without it (error, panic) removes it through `TempDir`'s own drop.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

pub struct Workspace {
    dir: Option<TempDir>,
    path: PathBuf,
    handed_over: bool,
}

impl Workspace {
    /// Creates `<work_dir>/job-<id>-<random>/`, owned by (or writable for) the job's `uid:gid`.
    pub fn create(work_dir: &Path, job_id: i64, uid: u32, gid: u32) -> io::Result<Self> {
        std::fs::create_dir_all(work_dir)?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("job-{job_id}-"))
            .tempdir_in(work_dir)?;
        // The container user must be able to write here. As root we hand the directory to it;
        // otherwise we cannot chown, so the directory is opened to everyone (it is private to
        // this job and removed with it).
        let handed_over = std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).is_ok();
        let mode = if handed_over { 0o750 } else { 0o777 };
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode))?;
        let path = dir.path().to_owned();
        Ok(Workspace {
            dir: Some(dir),
            path,
            handed_over,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when the agent may be unable to delete what the job wrote (it could not chown the
    /// workspace, so it is not root): the job's own user must empty it first.
    pub fn needs_job_user_cleanup(&self) -> bool {
        !self.handed_over
    }

    /// A name unique to this job run (the directory's name), usable as a container name.
    pub fn unique_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Writes a file into the workspace, readable by the container user. The name may already
    /// exist in a checked-out repository, possibly as a symlink pointing anywhere: the old entry is
    /// removed and the file created anew (`create_new` does not follow symlinks), so the agent
    /// never writes through a link.
    pub fn write_file(&self, name: &str, contents: &str) -> io::Result<()> {
        use std::io::Write;
        let path = self.path.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {
                return Err(io::Error::other(format!(
                    "{name} is a directory in the repository"
                )));
            }
            Ok(_) => std::fs::remove_file(&path)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        file.write_all(contents.as_bytes())?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
    }

    /// Gives everything in the workspace to the job's user (a checkout made by a root agent is
    /// root's otherwise, and the job could not change its own repository). Symlinks are changed
    /// themselves, never followed. A no-op when the agent is not root.
    pub async fn hand_over(&self, uid: u32, gid: u32) -> io::Result<()> {
        if !self.handed_over {
            return Ok(());
        }
        let root = self.path.clone();
        tokio::task::spawn_blocking(move || chown_tree(&root, uid, gid))
            .await
            .map_err(io::Error::other)?
    }

    /// Removes the workspace and everything in it. Off the runtime: a build tree can be large.
    pub async fn remove(mut self) -> io::Result<()> {
        let Some(dir) = self.dir.take() else {
            return Ok(());
        };
        let result = tokio::task::spawn_blocking(move || dir.close()).await;
        match result {
            Ok(r) => r,
            Err(e) => Err(io::Error::other(e)),
        }
    }
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
