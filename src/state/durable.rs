//! Private, durable files in the state dir: directories kept 0700, and JSON values written
//! whole or not at all (a 0600 temp file, fsync, rename, fsync of the directory), so a crash or
//! a power loss leaves either the old value or the new one. What the modes keep for their jobs
//! across restarts (the pull spool, the push records) is written this way: it holds the jobs'
//! output and secrets.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use serde::Serialize;

/// Makes `dir` (and its missing parents) 0700, or tightens it to 0700 when it is wider.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    tighten(dir)
}

/// Tightens an existing directory to 0700 when others may read it (and says so in the log).
pub fn tighten(dir: &Path) -> std::io::Result<()> {
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %dir.display(), mode = format!("{:o}", mode & 0o777), "tightening to 0700");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Writes `value` as JSON to `path` in `dir` (its directory): wholly there or not at all, and
/// there through a power loss.
pub fn write_json<T: Serialize>(dir: &Path, path: &Path, value: &T) -> std::io::Result<()> {
    let json = serde_json::to_vec(value).map_err(|e| std::io::Error::other(e.to_string()))?;
    // tempfile creates its files 0600.
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(&json)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir)
}

/// Reads a JSON file written by [`write_json`]. A file that does not parse is described by
/// what is wrong and where, never by its content: the files hold job specs and results, and
/// `serde_json`'s messages quote the values they choke on.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| {
        format!(
            "not valid JSON for its kind ({:?} error at line {}, column {})",
            e.classify(),
            e.line(),
            e.column()
        )
    })
}

/// Makes renames and removals in `dir` durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_unreadable_file_is_described_without_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        std::fs::write(&path, br#"{"job_id": "s3cr3t-value"}"#).unwrap();
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct R {
            job_id: i64,
        }
        let error = super::read_json::<R>(&path).unwrap_err();
        assert!(!error.contains("s3cr3t"), "{error}");
        assert!(error.contains("line 1"), "{error}");
    }

    use super::*;

    #[test]
    fn values_are_written_0600_in_a_0700_dir_and_replaced_whole() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("records");
        private_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        let path = dir.join("one.json");
        write_json(&dir, &path, &serde_json::json!({"n": 1})).unwrap();
        write_json(&dir, &path, &serde_json::json!({"n": 2})).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), r#"{"n":2}"#);
        // No temp file is left beside it.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }
}
