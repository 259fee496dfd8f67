//! The agent's identity: its id, from settings or generated once and kept in the state dir.

use std::path::Path;

use crate::config::{Settings, valid_agent_id};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read or write {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} holds an invalid agent id (use 1-64 characters from [A-Za-z0-9._-]); fix or delete it"
    )]
    Invalid { path: String },
}

/// `agent_id` from the settings, else the id kept in `<state_dir>/agent-id`, else a new one
/// (`<hostname>-<8 hex>`) written there so the agent keeps it across restarts.
pub fn agent_id(settings: &Settings) -> Result<String, IdentityError> {
    if let Some(id) = &settings.agent_id {
        return Ok(id.clone());
    }
    load_or_create(&settings.state_dir)
}

fn load_or_create(state_dir: &Path) -> Result<String, IdentityError> {
    let path = state_dir.join("agent-id");
    let shown = path.display().to_string();
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim().to_owned();
            return if valid_agent_id(&id) {
                Ok(id)
            } else {
                Err(IdentityError::Invalid { path: shown })
            };
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(IdentityError::File {
                path: shown,
                source,
            });
        }
    }
    create_state_dir(state_dir)?;
    let id = generate();
    write_id(state_dir, &path, &id)?;
    Ok(id)
}

/// Writes `id` to `<state_dir>/agent-id` again when the file is gone (the state dir was removed
/// under a running agent): a restart then keeps the id, and sweeps what this run leaves.
pub fn restore(state_dir: &Path, id: &str) -> Result<(), IdentityError> {
    let path = state_dir.join("agent-id");
    if path.exists() {
        return Ok(());
    }
    write_id(state_dir, &path, id)?;
    tracing::warn!(path = %path.display(), "the agent id file was removed: wrote it again");
    Ok(())
}

/// Write then rename, so a crash never leaves a half-written id.
fn write_id(state_dir: &Path, path: &Path, id: &str) -> Result<(), IdentityError> {
    let tmp = state_dir.join(".agent-id.tmp");
    std::fs::write(&tmp, format!("{id}\n"))
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|source| IdentityError::File {
            path: path.display().to_string(),
            source,
        })
}

/// Creates the state dir (and missing parents) readable by the agent's user only (0700): it
/// holds the agent's identity, its lock and the spooled results. An existing dir is left as is.
pub fn create_state_dir(state_dir: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(|source| IdentityError::StateDir {
            path: state_dir.display().to_string(),
            source,
        })
}

fn generate() -> String {
    let host: String = gethostname::gethostname()
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    if host.is_empty() {
        format!("agent-{suffix}")
    } else {
        format!("{host}-{suffix}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path()).unwrap();
        assert!(valid_agent_id(&first), "{first}");
        assert_eq!(load_or_create(dir.path()).unwrap(), first);
        std::fs::remove_file(dir.path().join("agent-id")).unwrap();
        restore(dir.path(), &first).unwrap();
        assert_eq!(load_or_create(dir.path()).unwrap(), first);
    }

    #[test]
    fn the_state_dir_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("a/state");
        load_or_create(&state).unwrap();
        let mode = std::fs::metadata(&state).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");
    }

    #[test]
    fn a_corrupt_id_file_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("agent-id"), "no spaces allowed\n").unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(IdentityError::Invalid { .. })
        ));
    }
}
