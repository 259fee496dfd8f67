//! The result spool, `<state_dir>/spool/`: a completion is written here (atomically, fsynced,
//! directory included) the moment its job ends, and removed once the API has answered 200 or
//! lease-lost, so a crash never loses one. A job's log file and its lease record
//! (`<name>.lease`, written when the job starts) live next to its entry until then; a lease
//! record without an entry is a job an earlier run did not finish.
//!
//! The state dir and the spool are kept 0700, their files 0600. The `*_async` methods run the
//! file work off the async runtime. This module only stores files; it never talks to the API.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::executor::Resume;
use crate::state::durable;
use crate::wire::pull::CompleteRequest;
use crate::wire::{JobResult, JobSpec};

/// Size of the room kept free in the spool (`.reserve`): deleted when a job's log fills the
/// disk, so that job's result (whose stdout and stderr tails are at most
/// `job.output_cap_bytes` each) can still be written.
pub const RESERVE_BYTES: u64 = 4 * 1024 * 1024;

/// What the spool keeps of a running job's lease, for a restart to report it or, with the job
/// and its progress, to carry it on (`pull::adopt`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub job_id: i64,
    pub lease_id: String,
    /// The job as leased (its secrets included: the file is 0600 in the 0700 state dir).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobSpec>,
    /// What a restarted agent needs to carry the job on, once its container started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Resume>,
}

impl LeaseRecord {
    /// The job and its progress, when a restarted agent may carry it on.
    pub fn adoptable(&self) -> Option<(&JobSpec, &Resume)> {
        Some((self.job.as_ref()?, self.resume.as_ref()?))
    }
}

/// The error a job left unfinished by an earlier run is completed with.
pub const INTERRUPTED: &str = "the agent stopped while this job ran (killed, crashed or restarted); \
     its container was removed at the restart, so the job cannot be carried on: run it again";

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
    /// `<state_dir>/spool`, created when missing; the state dir and the spool are made 0700
    /// (tightened when they are wider: spooled results and logs are the jobs' output).
    pub fn open(state_dir: &Path) -> Result<Self, SpoolError> {
        let dir = state_dir.join("spool");
        durable::private_dir(&dir).map_err(|e| err(&dir, e))?;
        durable::tighten(state_dir).map_err(|e| err(state_dir, e))?;
        Ok(Spool { dir })
    }

    /// The reserve file (see [`RESERVE_BYTES`]).
    pub fn reserve_path(&self) -> PathBuf {
        self.dir.join(".reserve")
    }

    /// Makes the reserve when it is missing (after a disk-full job used it); best effort.
    pub fn ensure_reserve(&self) {
        let path = self.reserve_path();
        if path.exists() {
            return;
        }
        let made = (|| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            let zeros = vec![0u8; 64 * 1024];
            for _ in 0..RESERVE_BYTES / zeros.len() as u64 {
                file.write_all(&zeros)?;
            }
            file.sync_all()
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            tracing::warn!(path = %path.display(), error = %e, "cannot keep room for results in the spool");
        }
    }

    fn lease_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.lease"))
    }

    /// Records a started job's lease (fsynced), so a restart can report the job.
    pub fn write_lease(&self, name: &str, record: &LeaseRecord) -> Result<(), SpoolError> {
        self.write_json(&self.lease_path(name), record)
    }

    /// Turns every lease record without an entry (a job an earlier run did not finish) into an
    /// entry completing it with `error` ([`INTERRUPTED`]), with its buffered log if any. Records
    /// a restarted agent may carry on ([`LeaseRecord::adoptable`]) are left to `pull::adopt`.
    pub fn recover_interrupted(&self) {
        for (name, record) in self.unfinished() {
            if record.adoptable().is_some() {
                continue;
            }
            tracing::warn!(
                job_id = record.job_id,
                "a job of an earlier run was not finished: completing it with `error`"
            );
            self.write_interrupted(&name, &record, INTERRUPTED);
        }
    }

    /// The lease records without an entry: jobs an earlier run did not finish. An unreadable
    /// record is removed (and logged).
    pub fn unfinished(&self) -> Vec<(String, LeaseRecord)> {
        let mut records = Vec::new();
        for (name, path) in self.files_with("lease") {
            if self.entry_path(&name).exists() {
                continue;
            }
            let read = crate::state::durable::read_json::<LeaseRecord>(&path);
            match read {
                Ok(record) => records.push((name, record)),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "unreadable lease record removed");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        records
    }

    /// Writes the entry completing the unfinished job of `record` with `error` (`message`),
    /// with its buffered log if any; the entry, or `None` when it could not be written.
    pub fn write_interrupted(
        &self,
        name: &str,
        record: &LeaseRecord,
        message: &str,
    ) -> Option<SpoolEntry> {
        let log = std::fs::metadata(self.log_path(name)).ok();
        let entry = SpoolEntry {
            job_id: record.job_id,
            log_file: log.as_ref().map(|_| format!("{name}.log")),
            request: CompleteRequest {
                lease_id: record.lease_id.clone(),
                log_bytes: log.map(|m| m.len()).unwrap_or(0),
                result: JobResult::agent_error(record.job_id, message.to_owned()),
            },
        };
        match self.write(name, &entry) {
            Ok(()) => Some(entry),
            Err(e) => {
                tracing::error!(job_id = record.job_id, error = %e, "cannot spool the interrupted job's result");
                None
            }
        }
    }

    /// `(name, path)` of the files with this extension.
    fn files_with(&self, extension: &str) -> Vec<(String, PathBuf)> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        dir.flatten()
            .map(|item| item.path())
            .filter_map(|path| {
                let stem = path.file_stem()?.to_str()?.to_owned();
                (path.extension()? == extension).then_some((stem, path))
            })
            .collect()
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

    /// Writes the entry so that it is either wholly there or not at all, and stays there
    /// through a power loss (temp file 0600, fsync, rename, fsync of the directory).
    pub fn write(&self, name: &str, entry: &SpoolEntry) -> Result<(), SpoolError> {
        self.write_json(&self.entry_path(name), entry)
    }

    fn write_json<T: Serialize>(&self, path: &Path, value: &T) -> Result<(), SpoolError> {
        durable::write_json(&self.dir, path, value).map_err(|e| err(path, e))
    }

    /// Forgets a job: its entry, its log and its lease record.
    pub fn remove(&self, name: &str) {
        for path in [
            self.entry_path(name),
            self.log_path(name),
            self.lease_path(name),
        ] {
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a spool file");
            }
        }
        let _ = durable::sync_dir(&self.dir);
    }

    /// Removes logs with neither an entry nor a lease record (nothing will be sent for them);
    /// run after [`Spool::recover_interrupted`].
    pub fn remove_orphan_logs(&self) {
        for (name, path) in self.files_with("log") {
            if !self.entry_path(&name).exists() && !self.lease_path(&name).exists() {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// [`Spool::write`] off the async runtime.
    pub async fn write_async(&self, name: &str, entry: &SpoolEntry) -> Result<(), SpoolError> {
        let (spool, name, entry) = (self.clone(), name.to_owned(), entry.clone());
        let path = self.entry_path(&name);
        tokio::task::spawn_blocking(move || spool.write(&name, &entry))
            .await
            .unwrap_or_else(|e| Err(err(&path, std::io::Error::other(e.to_string()))))
    }

    /// Makes the job's lease record one a restart does not carry on (after its progress could
    /// not be written, so the record is behind the job): rewritten without progress, or, if
    /// even that fails, removed (the lease then expires and the API runs the job again).
    pub async fn not_adoptable_async(&self, name: &str, record: &LeaseRecord) {
        let record = LeaseRecord {
            resume: None,
            ..record.clone()
        };
        if self.write_lease_async(name, &record).await.is_err() {
            let path = self.lease_path(name);
            let removed = tokio::task::spawn_blocking(move || std::fs::remove_file(&path)).await;
            if !matches!(removed, Ok(Ok(()))) {
                tracing::error!(
                    job_id = record.job_id,
                    "cannot remove the job's lease record either"
                );
            }
        }
    }

    /// [`Spool::write_lease`] off the async runtime.
    pub async fn write_lease_async(
        &self,
        name: &str,
        record: &LeaseRecord,
    ) -> Result<(), SpoolError> {
        let (spool, name, record) = (self.clone(), name.to_owned(), record.clone());
        let path = self.lease_path(&name);
        tokio::task::spawn_blocking(move || spool.write_lease(&name, &record))
            .await
            .unwrap_or_else(|e| Err(err(&path, std::io::Error::other(e.to_string()))))
    }

    /// [`Spool::remove`] off the async runtime.
    pub async fn remove_async(&self, name: &str) {
        let (spool, name) = (self.clone(), name.to_owned());
        let _ = tokio::task::spawn_blocking(move || spool.remove(&name)).await;
    }

    /// [`Spool::ensure_reserve`] off the async runtime.
    pub async fn ensure_reserve_async(&self) {
        let spool = self.clone();
        let _ = tokio::task::spawn_blocking(move || spool.ensure_reserve()).await;
    }

    /// At start, off the async runtime: reports the jobs an earlier run left unfinished, drops
    /// orphan logs, and returns every entry to resend.
    pub async fn prepare_async(&self) -> Vec<(String, SpoolEntry)> {
        let spool = self.clone();
        tokio::task::spawn_blocking(move || {
            spool.recover_interrupted();
            spool.remove_orphan_logs();
            spool.ensure_reserve();
            spool.entries()
        })
        .await
        .unwrap_or_default()
    }

    /// Every entry left by earlier runs, by name. Unreadable ones are logged and left in place.
    pub fn entries(&self) -> Vec<(String, SpoolEntry)> {
        let mut entries = Vec::new();
        for (stem, path) in self.files_with("json") {
            match crate::state::durable::read_json::<SpoolEntry>(&path) {
                Ok(entry) => entries.push((stem, entry)),
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
    use std::os::unix::fs::PermissionsExt;

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
                    services: Vec::new(),
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

    #[test]
    fn a_lease_record_without_an_entry_becomes_an_error_completion_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        for path in [dir.path(), spool.dir()] {
            let mode = std::fs::metadata(path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{}", path.display());
        }
        let name = Spool::new_name(3);
        let record = LeaseRecord {
            job_id: 3,
            lease_id: "L3".into(),
            job: None,
            resume: None,
        };
        spool.write_lease(&name, &record).unwrap();
        std::fs::write(spool.log_path(&name), "partial").unwrap();
        spool.recover_interrupted();
        spool.remove_orphan_logs();
        let entries = spool.entries();
        assert_eq!(entries.len(), 1);
        let (found, entry) = &entries[0];
        assert_eq!(found, &name);
        assert_eq!(entry.request.lease_id, "L3");
        assert_eq!(entry.request.log_bytes, 7);
        assert_eq!(entry.request.result.status, JobStatus::Error);
        assert!(spool.log_path(&name).exists());
        let mode = std::fs::metadata(spool.entry_path(&name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        spool.remove(&name);
        assert!(spool.files_with("lease").is_empty());
    }

    #[test]
    fn a_job_completed_under_its_own_name_is_not_also_interrupted() {
        // What the runner does when a job's task panics: the completion goes under the name
        // its lease record and log were written under, so a restart sends it once.
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let name = Spool::new_name(4);
        let record = LeaseRecord {
            job_id: 4,
            lease_id: "L4".into(),
            job: None,
            resume: None,
        };
        spool.write_lease(&name, &record).unwrap();
        std::fs::write(spool.log_path(&name), "before the panic").unwrap();
        spool.write(&name, &entry(4)).unwrap();
        spool.recover_interrupted();
        spool.remove_orphan_logs();
        let entries = spool.entries();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].1.request, entry(4).request);
        spool.remove(&name);
        assert!(spool.entries().is_empty());
        assert!(spool.files_with("lease").is_empty());
        assert!(!spool.log_path(&name).exists());
    }
}
