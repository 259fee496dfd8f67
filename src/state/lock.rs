//! One agent per state dir: an exclusive `flock` on `<state_dir>/agent.lock`, held for the
//! process's life.
//!
//! Two agents on one state dir would share an id, a spool and a work dir: each would sweep the
//! other's containers and workspaces as orphans and replay the other's results. The second one
//! therefore refuses to start, before it sweeps or takes anything. The kernel drops the lock when
//! the process ends, however it ends, so a crash never leaves a stale lock behind.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, flock};

/// The lock file's name in the state dir.
pub const LOCK_FILE: &str = "agent.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another gryt-agent{holder} is already running with the state dir {dir} (it holds {path}); \
         stop it, or give this agent its own state dir (GRYT_STATE_DIR)"
    )]
    Held {
        dir: String,
        path: String,
        holder: String,
    },
    #[error("cannot lock {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The held lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
    pub path: PathBuf,
}

impl StateLock {
    /// True while the lock file at `path` is still the file this lock holds: removing the state
    /// dir under a running agent unlinks it, and a second agent could then lock a new one.
    pub fn still_in_place(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (self._file.metadata(), std::fs::metadata(&self.path)) {
            (Ok(held), Ok(there)) => held.dev() == there.dev() && held.ino() == there.ino(),
            _ => false,
        }
    }
}

/// Takes the state dir's lock without waiting; the state dir must exist.
pub fn acquire(state_dir: &Path) -> Result<StateLock, LockError> {
    let path = state_dir.join(LOCK_FILE);
    let io = |source: std::io::Error| LockError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim().parse::<u32>() {
                Ok(pid) => format!(" (pid {pid})"),
                Err(_) => String::new(),
            };
            return Err(LockError::Held {
                dir: state_dir.display().to_string(),
                path: path.display().to_string(),
                holder,
            });
        }
        Err(e) => return Err(io(e.into())),
    }
    // Who holds it, for the message the next agent prints; the lock itself is the flock.
    file.set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| writeln!(file, "{}", std::process::id()))
        .map_err(io)?;
    Ok(StateLock { _file: file, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_dir_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = acquire(dir.path()).unwrap();
        let err = acquire(dir.path()).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("already running"), "{message}");
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        assert!(first.still_in_place());
        std::fs::remove_file(&first.path).unwrap();
        assert!(!first.still_in_place());
        drop(first);
        acquire(dir.path()).unwrap();
    }
}
