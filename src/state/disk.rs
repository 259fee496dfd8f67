//! The disk collector's face in the shared state: its last report (shown on `/health`) and its
//! wake-up (a job refused for low disk). The collector itself is `crate::gc`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::Notify;

/// The free space that matters for one collection, with the reason when Docker's root is not
/// measured. Shown by `/health` and `gryt-agent check`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DiskState {
    pub work_dir: PathBuf,
    /// `None` when it could not be read.
    pub work_dir_free_mb: Option<u64>,
    pub docker_root: Option<PathBuf>,
    pub docker_root_free_mb: Option<u64>,
    /// Why Docker's root is not measured, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_root_note: Option<String>,
    pub trigger_free_mb: u64,
    pub target_free_mb: u64,
}

/// The last collection, as `/health` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct GcReport {
    pub last_run: String,
    pub images_removed: usize,
    pub bytes_freed: u64,
    pub disk: Option<DiskState>,
    /// Set when the disk is still low after the collection: `/health` is then `degraded`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub still_low: Option<String>,
}

/// The agent's link to its collector: the last report, and the wake-up for refused jobs.
#[derive(Debug, Clone, Default)]
pub struct GcHandle {
    last: Arc<Mutex<Option<GcReport>>>,
    wake: Arc<Notify>,
}

impl GcHandle {
    /// Asks for a collection soon (a job was refused for low disk); never waits.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Resolves at the next [`GcHandle::wake`].
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    pub fn report(&self) -> Option<GcReport> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Keeps the collector's latest report.
    pub fn set(&self, report: GcReport) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
    }
}
