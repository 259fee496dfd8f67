//! The result spool, `<state_dir>/spool/`: a completion is written here (atomically) before it is
//! sent and removed once the API has answered 200 or lease-lost, so a restart never loses one.
//! A job's log file lives next to its entry until then.
//!
//! This module only stores files; it never talks to the API.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::wire::pull::CompleteRequest;

/// One undelivered completion.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpoolEntry {
    pub job_id: i64,
    /// The job's buffered log (`<name>.log` beside the entry, see [`Spool::log_path`]), whose
    /// whole text must reach the API before the completion. Only its presence is used.
    pub log_file: Option<String>,
    pub request: CompleteRequest,
}

#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
#[error("spool {path}: {source}")]
pub struct SpoolError {
    path: String,
    source: std::io::Error,
}

fn err(path: &Path, source: std::io::Error) -> SpoolError {
    SpoolError {
        path: path.display().to_string(),
        source,
    }
}

impl Spool {
    /// `<state_dir>/spool`, created when missing.
    pub fn open(state_dir: &Path) -> Result<Self, SpoolError> {
        let dir = state_dir.join("spool");
        std::fs::create_dir_all(&dir).map_err(|e| err(&dir, e))?;
        Ok(Spool { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A fresh name for a job's files (`job-<id>-<uuid>`): lease ids come from the server and
    /// never go into file names.
    pub fn new_name(job_id: i64) -> String {
        format!("job-{job_id}-{}", uuid::Uuid::new_v4().simple())
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    fn entry_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// Writes the entry so that it is either wholly there or not at all (temp file + rename).
    pub fn write(&self, name: &str, entry: &SpoolEntry) -> Result<(), SpoolError> {
        let path = self.entry_path(name);
        let json = serde_json::to_vec(entry)
            .map_err(|e| err(&path, std::io::Error::other(e.to_string())))?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir).map_err(|e| err(&path, e))?;
        std::io::Write::write_all(&mut tmp, &json).map_err(|e| err(&path, e))?;
        tmp.as_file().sync_all().map_err(|e| err(&path, e))?;
        tmp.persist(&path).map_err(|e| err(&path, e.error))?;
        Ok(())
    }

    /// Forgets a job: its entry and its log.
    pub fn remove(&self, name: &str) {
        for path in [self.entry_path(name), self.log_path(name)] {
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a spool file");
            }
        }
    }

    /// Removes logs without an entry: jobs that were running when an earlier agent died (their
    /// leases are gone, nothing will be sent for them).
    pub fn remove_orphan_logs(&self) {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for item in dir.flatten() {
            let path = item.path();
            if path.extension().is_some_and(|e| e == "log") && !path.with_extension("json").exists()
            {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// Every entry left by earlier runs, by name. Unreadable ones are logged and left in place.
    pub fn entries(&self) -> Vec<(String, SpoolEntry)> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut entries = Vec::new();
        for item in dir.flatten() {
            let path = item.path();
            let (Some(stem), Some("json")) = (
                path.file_stem().and_then(|s| s.to_str()),
                path.extension().and_then(|s| s.to_str()),
            ) else {
                continue;
            };
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<SpoolEntry>(&b).map_err(|e| e.to_string()))
            {
                Ok(entry) => entries.push((stem.to_owned(), entry)),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "unreadable spool entry left in place")
                }
            }
        }
        entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{JobResult, JobStatus};

    fn entry(job_id: i64) -> SpoolEntry {
        SpoolEntry {
            job_id,
            log_file: None,
            request: CompleteRequest {
                lease_id: "L".into(),
                result: JobResult {
                    job_id,
                    status: JobStatus::Failed,
                    success: false,
                    exit_code: 2,
                    stdout: String::new(),
                    stderr: "boom".into(),
                    duration_seconds: 0.1,
                    started_at: "a".into(),
                    completed_at: "b".into(),
                    error: None,
                    steps: Vec::new(),
                    oom_killed: false,
                    artifacts: Vec::new(),
                },
                log_bytes: 0,
            },
        }
    }

    #[test]
    fn entries_survive_and_are_removed_with_their_log() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let name = Spool::new_name(9);
        spool.write(&name, &entry(9)).unwrap();
        std::fs::write(spool.log_path(&name), "log").unwrap();
        std::fs::write(spool.dir().join("job-1-dead.log"), "orphan").unwrap();
        std::fs::write(spool.dir().join("job-2-bad.json"), "{not json").unwrap();
        spool.remove_orphan_logs();
        assert!(!spool.dir().join("job-1-dead.log").exists());
        assert!(spool.log_path(&name).exists());

        let reopened = Spool::open(dir.path()).unwrap();
        let entries = reopened.entries();
        assert_eq!(entries.len(), 1, "the unreadable entry is skipped");
        assert_eq!(entries[0].0, name);
        assert_eq!(entries[0].1.request, entry(9).request);
        reopened.remove(&name);
        assert!(reopened.entries().is_empty());
        assert!(!reopened.log_path(&name).exists());
    }
}
