//! The record of image use: when this agent last used each image, and which images jobs hold
//! right now.
//!
//! A job registers its image *before* the image is inspected or pulled ([`ImageUse::begin`]) and
//! holds it until its container is gone (the [`ImageHold`] guard), so the collector never sees
//! an image a job is starting with as unused. Registration only takes a short lock: it never
//! waits for the collector or the disk. The times are kept in `<state_dir>/image-use.json`,
//! written by the collector's task off the async runtime, so least-recently-used survives
//! restarts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// The record's file name in the state dir.
pub const FILE_NAME: &str = "image-use.json";

/// Images remembered at most; beyond it the least recently used record that no job holds is
/// forgotten (which, under `docker.gc_images = agent`, only means that image is never removed).
pub const MAX_RECORDS: usize = 4096;

/// A record file larger than this is not read (it cannot be one the agent wrote).
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// Longest image reference kept (Docker's own limit is far below).
const MAX_REF_LEN: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("cannot read the image-use record {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("cannot write the image-use record {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// Shared record of image use; clones share it.
#[derive(Debug, Clone)]
pub struct ImageUse {
    inner: Arc<Mutex<Inner>>,
    changed: Arc<Notify>,
    file: Option<PathBuf>,
    /// One writer at a time: two renames of the same temporary file must not interleave.
    writing: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Image reference → last use, in milliseconds since the epoch (strictly increasing within
    /// a run, so the order of uses is kept even within one millisecond).
    last_used: HashMap<String, i64>,
    /// Image reference → jobs holding it now.
    holds: HashMap<String, usize>,
    last_stamp: i64,
}

/// On-disk form of the record.
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    version: u32,
    images: HashMap<String, i64>,
}

impl ImageUse {
    /// A record kept in memory only (`gryt-agent exec`, tests).
    pub fn in_memory() -> Self {
        Self::with_file(None)
    }

    /// A record kept in `state_dir`; nothing is read or written until [`ImageUse::load`] and
    /// [`ImageUse::save`].
    pub fn in_state_dir(state_dir: &Path) -> Self {
        Self::with_file(Some(state_dir.join(FILE_NAME)))
    }

    fn with_file(file: Option<PathBuf>) -> Self {
        ImageUse {
            inner: Arc::default(),
            changed: Arc::default(),
            file,
            writing: Arc::default(),
        }
    }

    /// Registers that a job is about to use `image`: records the time and holds the image
    /// until the guard is dropped (after the job's container is removed).
    pub fn begin(&self, image: &str) -> ImageHold {
        let image: String = image.chars().take(MAX_REF_LEN).collect();
        {
            let mut inner = self.lock();
            *inner.holds.entry(image.clone()).or_default() += 1;
            inner.touch(&image);
        }
        self.changed.notify_one();
        ImageHold {
            record: self.clone(),
            image,
        }
    }

    /// Images held by a job now.
    pub fn held(&self) -> Vec<String> {
        self.lock().holds.keys().cloned().collect()
    }

    pub fn is_held(&self, image: &str) -> bool {
        self.lock().holds.contains_key(image)
    }

    /// Every recorded image with its last use (ms since the epoch).
    pub fn recorded(&self) -> HashMap<String, i64> {
        self.lock().last_used.clone()
    }

    /// Forgets an image the collector removed (or that no longer exists).
    pub fn forget(&self, image: &str) {
        if self.lock().last_used.remove(image).is_some() {
            self.changed.notify_one();
        }
    }

    /// Resolves when the record changed since the last call (the writer's wake-up).
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Reads the record kept by an earlier run and merges it in (the later use wins). A missing
    /// file is an empty record; an unreadable one is an error, and the record stays as it is.
    pub async fn load(&self) -> Result<usize, UsageError> {
        let Some(path) = self.file.clone() else {
            return Ok(0);
        };
        let stored = tokio::task::spawn_blocking(move || read(&path))
            .await
            .map_err(|e| UsageError::Read {
                path: self.shown(),
                reason: e.to_string(),
            })??;
        let mut inner = self.lock();
        let count = stored.len();
        // A time far in the future (a clock set back, an edited file) is capped, so later
        // stamps can still go after it. (Stamps of a busy run may run a little ahead of the clock.)
        let cap = now_ms().saturating_add(24 * 3600 * 1000);
        for (image, stamp) in stored {
            let stamp = stamp.min(cap);
            let entry = inner.last_used.entry(image).or_insert(stamp);
            *entry = (*entry).max(stamp);
            inner.last_stamp = inner.last_stamp.max(stamp);
        }
        inner.bound();
        Ok(count)
    }

    /// Writes the record (a temporary file, then a rename: a crash never leaves half of it).
    pub async fn save(&self) -> Result<(), UsageError> {
        let Some(path) = self.file.clone() else {
            return Ok(());
        };
        let _one_writer = self.writing.lock().await;
        let stored = Stored {
            version: 1,
            images: self.recorded(),
        };
        let shown = self.shown();
        tokio::task::spawn_blocking(move || write(&path, &stored))
            .await
            .map_err(|e| UsageError::Write {
                path: shown.clone(),
                source: std::io::Error::other(e.to_string()),
            })?
            .map_err(|source| UsageError::Write {
                path: shown,
                source,
            })
    }

    fn shown(&self) -> String {
        self.file
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update leaves the maps consistent: a poisoned lock can be taken over.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn touch(&mut self, image: &str) {
        let stamp = now_ms().max(self.last_stamp.saturating_add(1));
        self.last_stamp = stamp;
        self.last_used.insert(image.to_owned(), stamp);
        self.bound();
    }

    /// Keeps at most [`MAX_RECORDS`], forgetting the oldest that no job holds.
    fn bound(&mut self) {
        while self.last_used.len() > MAX_RECORDS {
            let oldest = self
                .last_used
                .iter()
                .filter(|(image, _)| !self.holds.contains_key(*image))
                .min_by_key(|(_, stamp)| **stamp)
                .map(|(image, _)| image.clone());
            match oldest {
                Some(image) => self.last_used.remove(&image),
                None => break,
            };
        }
    }
}

/// Held by a job while it uses its image; dropping it ends the use.
#[derive(Debug)]
pub struct ImageHold {
    record: ImageUse,
    image: String,
}

impl Drop for ImageHold {
    fn drop(&mut self) {
        {
            let mut inner = self.record.lock();
            if let Some(count) = inner.holds.get_mut(&self.image) {
                *count -= 1;
                if *count == 0 {
                    inner.holds.remove(&self.image);
                }
            }
            // Used until now: a long job's image is recent when it ends.
            inner.touch(&self.image);
        }
        self.record.changed.notify_one();
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn read(path: &Path) -> Result<HashMap<String, i64>, UsageError> {
    let fail = |reason: String| UsageError::Read {
        path: path.display().to_string(),
        reason,
    };
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(fail(e.to_string())),
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(fail(format!(
            "{} bytes, more than the {MAX_FILE_BYTES} allowed",
            meta.len()
        )));
    }
    let text = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let stored: Stored = serde_json::from_slice(&text).map_err(|e| fail(e.to_string()))?;
    if stored.version != 1 {
        return Err(fail(format!("unknown version {}", stored.version)));
    }
    Ok(stored
        .images
        .into_iter()
        .filter(|(image, stamp)| {
            !image.trim().is_empty() && image.len() <= MAX_REF_LEN && *stamp >= 0
        })
        .collect())
}

fn write(path: &Path, stored: &Stored) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec(stored).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uses_are_ordered_and_holds_end_with_the_guard() {
        let record = ImageUse::in_memory();
        let a = record.begin("a:1");
        let b = record.begin("b:1");
        assert!(record.is_held("a:1") && record.is_held("b:1"));
        let first = record.recorded();
        assert!(first["a:1"] < first["b:1"]);
        drop(a);
        assert!(!record.is_held("a:1"));
        // Ending the use touches it again: `a` is now the most recent.
        assert!(record.recorded()["a:1"] > record.recorded()["b:1"]);
        let again = record.begin("b:1");
        drop(b);
        assert!(record.is_held("b:1"), "a second job still holds it");
        drop(again);
        assert!(record.held().is_empty());
    }

    #[tokio::test]
    async fn the_record_survives_a_restart_and_a_bad_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let record = ImageUse::in_state_dir(dir.path());
        drop(record.begin("old:1"));
        drop(record.begin("new:1"));
        record.save().await.unwrap();
        let restarted = ImageUse::in_state_dir(dir.path());
        assert_eq!(restarted.load().await.unwrap(), 2);
        assert_eq!(restarted.recorded(), record.recorded());
        // A use after the restart is later than anything recorded before it.
        drop(restarted.begin("old:1"));
        assert!(restarted.recorded()["old:1"] > record.recorded()["new:1"]);

        // A time far in the future is capped: later uses still come after it.
        std::fs::write(
            dir.path().join(FILE_NAME),
            format!("{{\"version\":1,\"images\":{{\"future:1\":{}}}}}", i64::MAX),
        )
        .unwrap();
        let future = ImageUse::in_state_dir(dir.path());
        future.load().await.unwrap();
        drop(future.begin("later:1"));
        assert!(future.recorded()["later:1"] > future.recorded()["future:1"]);

        std::fs::write(dir.path().join(FILE_NAME), "{not json").unwrap();
        let broken = ImageUse::in_state_dir(dir.path());
        assert!(matches!(broken.load().await, Err(UsageError::Read { .. })));
        assert!(broken.recorded().is_empty());
    }

    #[test]
    fn the_record_is_bounded_and_never_forgets_a_held_image() {
        let record = ImageUse::in_memory();
        let _held = record.begin("held:1");
        for i in 0..MAX_RECORDS + 10 {
            drop(record.begin(&format!("img:{i}")));
        }
        let recorded = record.recorded();
        assert_eq!(recorded.len(), MAX_RECORDS);
        assert!(recorded.contains_key("held:1"));
        assert!(!recorded.contains_key("img:0"));
    }
}
