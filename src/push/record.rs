//! What the state dir keeps of a push job with a callback, so that the job outlives the agent
//! process (`<state_dir>/push/<name>.json`, the dir 0700, each file 0600, written whole and
//! fsynced like the pull spool): the job as pushed, then its progress once its container
//! started (`executor::Resume`, kept by the job's observer, [`Kept`]), then its result once it
//! is made. The record goes once the result was handed to the callback and the delivery ended
//! (delivered or given up). A restarted agent finds what is left (`push::adopt`): it carries the
//! job on, or sends the result again, or an `error`.
//!
//! A push job without a callback has no record: its caller's connection closes with the agent
//! process, and nobody would be told what became of it.

use std::path::{Path, PathBuf};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::executor::{JobObserver, OutputStream, Resume};
use crate::state::durable;
use crate::state::run::Output;
use crate::wire::{JobResult, JobSpec};

/// One push job's record.
#[derive(Clone, Serialize, Deserialize)]
pub struct PushRecord {
    /// The job as pushed (its secrets included: the file is 0600 in a 0700 dir).
    pub job: JobSpec,
    /// The caller presented the agent's previous key (`AGENT_API_KEY_PREVIOUS`): the callback
    /// goes with that one. The key itself is not kept.
    #[serde(default)]
    pub previous_key: bool,
    /// What a restarted agent needs to carry the job on, once its container started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Resume>,
    /// The job's result, once made: a restarted agent sends it to the callback again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<JobResult>,
}

#[derive(Debug, thiserror::Error)]
#[error("push record {path}: {source}")]
pub struct RecordError {
    path: String,
    source: std::io::Error,
}

/// The records' directory, `<state_dir>/push`.
#[derive(Debug, Clone)]
pub struct Records {
    dir: PathBuf,
}

impl Records {
    /// The records of the agent on `state_dir`; nothing is made until the first write.
    pub fn in_state_dir(state_dir: &Path) -> Self {
        Records {
            dir: state_dir.join("push"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A fresh name for a job's record (`job-<id>-<uuid>`).
    pub fn new_name(job_id: i64) -> String {
        format!("job-{job_id}-{}", uuid::Uuid::new_v4().simple())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// Writes the record (the dir made 0700 first: the state dir may have been made again).
    pub fn write(&self, name: &str, record: &PushRecord) -> Result<(), RecordError> {
        let path = self.path(name);
        durable::private_dir(&self.dir)
            .and_then(|()| durable::write_json(&self.dir, &path, record))
            .map_err(|source| RecordError {
                path: path.display().to_string(),
                source,
            })
    }

    /// Forgets a job's record.
    pub fn remove(&self, name: &str) {
        let path = self.path(name);
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a push record");
        }
        let _ = durable::sync_dir(&self.dir);
    }

    /// Every record an earlier run left, by name. An unreadable one is removed (and logged):
    /// nothing could be done with it.
    pub fn all(&self) -> Vec<(String, PushRecord)> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut records = Vec::new();
        for path in dir.flatten().map(|item| item.path()) {
            let Some(name) = record_name(&path) else {
                continue;
            };
            let read = crate::state::durable::read_json::<PushRecord>(&path);
            match read {
                Ok(record) => records.push((name, record)),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "unreadable push record removed");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        records
    }

    /// [`Records::write`] off the async runtime.
    pub async fn write_async(&self, name: &str, record: &PushRecord) -> Result<(), RecordError> {
        let (records, name, record) = (self.clone(), name.to_owned(), record.clone());
        let path = self.path(&name).display().to_string();
        tokio::task::spawn_blocking(move || records.write(&name, &record))
            .await
            .unwrap_or_else(|e| {
                Err(RecordError {
                    path,
                    source: std::io::Error::other(e.to_string()),
                })
            })
    }

    /// [`Records::remove`] off the async runtime.
    pub async fn remove_async(&self, name: &str) {
        let (records, name) = (self.clone(), name.to_owned());
        let _ = tokio::task::spawn_blocking(move || records.remove(&name)).await;
    }

    /// [`Records::all`] off the async runtime.
    pub async fn all_async(&self) -> Vec<(String, PushRecord)> {
        let records = self.clone();
        tokio::task::spawn_blocking(move || records.all())
            .await
            .unwrap_or_default()
    }
}

/// The name of a record file (`<name>.json`); temp files and anything else are not records.
fn record_name(path: &Path) -> Option<String> {
    (path.extension()? == "json").then_some(())?;
    let stem = path.file_stem()?.to_str()?;
    stem.starts_with("job-").then(|| stem.to_owned())
}

/// A push job's record while the job runs. As the job's observer it keeps the job's progress
/// in the record and nothing else: the output goes only to the result's tail, as without one.
pub struct Kept {
    records: Records,
    name: String,
    record: PushRecord,
}

impl Kept {
    /// Writes the first record of `record`'s job (no progress yet) under a fresh name.
    pub async fn begin(records: Records, record: PushRecord) -> Result<Kept, RecordError> {
        let name = Records::new_name(record.job.job_id);
        records.write_async(&name, &record).await?;
        Ok(Kept {
            records,
            name,
            record,
        })
    }

    /// The record an earlier run left under `name`, taken over.
    pub fn taken_over(records: Records, name: String, record: PushRecord) -> Kept {
        Kept {
            records,
            name,
            record,
        }
    }

    pub fn record(&self) -> &PushRecord {
        &self.record
    }

    /// Keeps `result` in the record before it goes to the callback: an agent that stops
    /// before the delivery ended sends it again at its next start.
    pub async fn keep_result(&mut self, result: &JobResult) {
        self.record.resume = None;
        self.record.result = Some(result.clone());
        if let Err(e) = self.records.write_async(&self.name, &self.record).await {
            tracing::warn!(job_id = result.job_id, error = %e, "cannot record the push job's result: an agent restarted before its callback is delivered cannot send it again");
        }
    }

    /// Removes the record: the job's result was handed to the callback and its delivery ended.
    pub async fn forget(self) {
        self.records.remove_async(&self.name).await;
    }
}

impl JobObserver for Kept {
    fn output(&self, _: OutputStream, _: &[u8]) {}

    fn progress<'a>(&'a self, resume: &'a Resume) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let mut record = self.record.clone();
            record.resume = Some(resume.clone());
            if let Err(e) = self.records.write_async(&self.name, &record).await {
                // The record on disk is behind the job now: a restarted agent reading it could
                // run a command again. Without progress it is not carried on (its callback gets
                // `error`); removed if even that cannot be written.
                tracing::error!(job_id = record.job.job_id, error = %e, "cannot record the push job's progress: an agent restarted now will not carry it on");
                record.resume = None;
                if self.records.write_async(&self.name, &record).await.is_err() {
                    self.records.remove_async(&self.name).await;
                }
            }
        })
    }
}

impl Output for Kept {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn record(job_id: i64) -> PushRecord {
        PushRecord {
            job: JobSpec {
                job_id,
                callback_url: Some("http://127.0.0.1:9/cb".into()),
                ..JobSpec::default()
            },
            previous_key: true,
            resume: None,
            result: None,
        }
    }

    #[test]
    fn records_are_private_survive_and_are_removed() {
        let state = tempfile::tempdir().unwrap();
        let records = Records::in_state_dir(state.path());
        assert!(records.all().is_empty(), "no dir yet: no record");
        let name = Records::new_name(5);
        records.write(&name, &record(5)).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(records.dir()), 0o700);
        assert_eq!(mode(&records.path(&name)), 0o600);
        let all = records.all();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0, name);
        assert_eq!(all[0].1.job.job_id, 5);
        assert!(all[0].1.previous_key);
        assert!(all[0].1.resume.is_none() && all[0].1.result.is_none());
        records.remove(&name);
        assert!(records.all().is_empty());
    }

    #[test]
    fn an_unreadable_record_is_removed_and_other_files_are_left_alone() {
        let state = tempfile::tempdir().unwrap();
        let records = Records::in_state_dir(state.path());
        durable::private_dir(records.dir()).unwrap();
        let broken = records.dir().join("job-1-abc.json");
        std::fs::write(&broken, "{not json").unwrap();
        let other = records.dir().join(".tmpXYZ");
        std::fs::write(&other, "half written").unwrap();
        assert!(records.all().is_empty());
        assert!(!broken.exists());
        assert!(other.exists());
    }

    #[tokio::test]
    async fn the_kept_record_holds_the_progress_then_the_result() {
        let state = tempfile::tempdir().unwrap();
        let records = Records::in_state_dir(state.path());
        let mut kept = Kept::begin(records.clone(), record(7)).await.unwrap();
        let resume = Resume {
            container: "c".into(),
            head: crate::executor::container::MarkId::random(),
            single: true,
            warm: false,
            network: None,
            workspace: "/w".into(),
            started_unix_ms: 1,
            deadline_unix_ms: 2,
            preface: Vec::new(),
            steps: Vec::new(),
            commands: Vec::new(),
            running_since_unix_ms: None,
        };
        kept.progress(&resume).await;
        let found = records.all();
        assert_eq!(found[0].1.resume.as_ref(), Some(&resume));
        let result = JobResult::agent_error(7, "x".into());
        kept.keep_result(&result).await;
        let found = records.all();
        assert_eq!(found[0].1.result.as_ref(), Some(&result));
        assert!(found[0].1.resume.is_none());
        kept.forget().await;
        assert!(records.all().is_empty());
    }
}
