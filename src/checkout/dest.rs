//! The checkout destination: must be an empty directory; put back empty after a failed clone.
//!
//! The caller made `dest` (owner, mode) and mounts it as `/workspace`, so a failed checkout
//! leaves it as it found it: present, empty, same owner and mode. gix itself removes a clone
//! destination that was empty when a clone fails, hence the re-creation.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::CheckoutError;

#[derive(Debug, Clone)]
pub(crate) struct Dest {
    path: PathBuf,
    mode: u32,
    uid: u32,
    gid: u32,
}

impl Dest {
    /// Checks that `path` is an existing, empty directory and remembers how it was made.
    pub(crate) fn inspect(path: &Path) -> Result<Self, CheckoutError> {
        let fail = |reason: String| CheckoutError::Destination {
            path: path.to_owned(),
            reason,
        };
        let meta = std::fs::symlink_metadata(path).map_err(|e| fail(e.to_string()))?;
        if !meta.is_dir() {
            return Err(fail("is not a directory".into()));
        }
        let mut entries = std::fs::read_dir(path).map_err(|e| fail(e.to_string()))?;
        if entries.next().is_some() {
            return Err(fail("is not empty".into()));
        }
        Ok(Dest {
            path: path.to_owned(),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Empties the directory if it is still there; never makes it again (its owner may have
    /// removed it on purpose).
    pub(crate) fn empty_if_present(&self) -> io::Result<()> {
        match self.empty() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    fn empty(&self) -> io::Result<()> {
        for entry in std::fs::read_dir(&self.path)? {
            let entry = entry?;
            // Not followed: a checked-out symlink must not lead removal elsewhere.
            if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(entry.path())?;
            } else {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }

    /// Empties the directory, or makes it again as it was when gix removed it.
    pub(crate) fn reset(&self) -> io::Result<()> {
        match self.empty() {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !self.path.exists() => {
                std::fs::create_dir(&self.path)?;
                // Only root can give the directory back to its owner; otherwise it is ours, as
                // it was (non-root callers cannot make directories for others).
                std::os::unix::fs::chown(&self.path, Some(self.uid), Some(self.gid)).ok();
                std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(self.mode))
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Dest;

    #[test]
    fn a_reset_makes_a_removed_destination_again_but_an_abandoned_clone_does_not() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("repo");
        std::fs::create_dir(&path).unwrap();
        let dest = Dest::inspect(&path).unwrap();

        std::fs::write(path.join("file"), "x").unwrap();
        std::fs::create_dir(path.join("dir")).unwrap();
        dest.empty_if_present().unwrap();
        assert_eq!(std::fs::read_dir(&path).unwrap().count(), 0);

        std::fs::remove_dir(&path).unwrap();
        dest.empty_if_present().unwrap();
        assert!(
            !path.exists(),
            "an abandoned clone made the workspace again"
        );
        dest.reset().unwrap();
        assert!(path.is_dir());
    }
}
