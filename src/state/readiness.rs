//! Whether the agent can run a job now: the Docker engine answers, its directories exist (they
//! are made again when removed), file descriptors and disk space are free, and no job failed
//! lately for a cause of the agent's own. Checked before every lease and every push admission.
//!
//! The checks cost a Docker ping and a few system calls, so they do not run per request: a
//! monitor task runs them every [`PROBE_INTERVAL`] (and at once when woken) and the result is
//! cached here; [`Readiness::problems`] only reads the cache. `/health` shows the same reasons.
//!
//! [`AgentState::report_infra_failure`] is for the code that runs jobs: a job that failed because
//! of the agent (not of the job) raises it, and the agent takes no job until [`INFRA_HOLD`] has
//! passed and a full check found nothing wrong.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::AgentState;
use super::lock::{self, StateLock};
use super::resources;

/// Time between two checks while nothing wakes the monitor.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// After a reported infrastructure failure, no job for at least this long.
pub const INFRA_HOLD: Duration = Duration::from_secs(10);
/// Longest a Docker ping may take before the engine counts as not answering.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// What stops the agent from taking jobs (the `cause` label of `gryt_agent_not_ready`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    NotChecked,
    Docker,
    Directories,
    Descriptors,
    Disk,
    InfraFailure,
}

impl Cause {
    pub const ALL: [Cause; 6] = [
        Cause::NotChecked,
        Cause::Docker,
        Cause::Directories,
        Cause::Descriptors,
        Cause::Disk,
        Cause::InfraFailure,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Cause::NotChecked => "not_checked",
            Cause::Docker => "docker",
            Cause::Directories => "directories",
            Cause::Descriptors => "descriptors",
            Cause::Disk => "disk",
            Cause::InfraFailure => "infra_failure",
        }
    }
}

/// One run of the checks.
#[derive(Debug, Clone)]
pub struct Probe {
    /// When the checks began (a failure reported after that is not cleared by them).
    pub started: Instant,
    pub problems: Vec<(Cause, String)>,
}

impl Probe {
    /// Whether the Docker engine answered this check.
    pub fn docker_available(&self) -> bool {
        !self.problems.iter().any(|(c, _)| *c == Cause::Docker)
    }

    /// The problems in words, joined (`None`: nothing is wrong).
    pub fn reasons(&self) -> Option<String> {
        (!self.problems.is_empty()).then(|| join(&self.problems))
    }
}

/// Problems in words, one sentence each, as `/health` and the refusals say them.
fn words(problems: &[(Cause, String)]) -> Vec<String> {
    problems.iter().map(|(_, r)| r.clone()).collect()
}

fn join(problems: &[(Cause, String)]) -> String {
    words(problems).join("; ")
}

#[derive(Debug)]
struct InfraFailure {
    reason: String,
    at: Instant,
}

/// The cached answer to "can this agent run a job now?".
#[derive(Debug, Default)]
pub struct Readiness {
    probe: Mutex<Option<Probe>>,
    infra: Mutex<Option<InfraFailure>>,
    wake: tokio::sync::Notify,
}

impl Readiness {
    /// Why no job can be taken now (empty: one can).
    pub fn problems(&self) -> Vec<(Cause, String)> {
        let mut problems = match &*lock(&self.probe) {
            Some(probe) => probe.problems.clone(),
            None => vec![(
                Cause::NotChecked,
                "the agent has not yet checked that it can run jobs".to_owned(),
            )],
        };
        if let Some(failure) = &*lock(&self.infra) {
            problems.push((
                Cause::InfraFailure,
                format!(
                    "a job could not run because of the agent ({}): taking no jobs until a check \
                     passes",
                    failure.reason
                ),
            ));
        }
        problems
    }

    /// [`Readiness::problems`] in words (empty: a job can be taken).
    pub fn reasons(&self) -> Vec<String> {
        words(&self.problems())
    }

    /// Why no job can be taken now, joined into one sentence (`None`: one can).
    pub fn reason(&self) -> Option<String> {
        let problems = self.problems();
        (!problems.is_empty()).then(|| join(&problems))
    }

    /// Whether the Docker engine answered the last check.
    pub fn docker_available(&self) -> bool {
        lock(&self.probe)
            .as_ref()
            .is_some_and(|p| p.docker_available())
    }

    /// Says that a job failed for a cause of the agent's, not the job's (Docker gone, a
    /// directory or descriptor missing): no job is taken until [`INFRA_HOLD`] has passed and a
    /// check after it found nothing wrong. Wakes the monitor to check at once. Reached through
    /// [`AgentState::report_infra_failure`], which also sets the metric.
    fn report_infra_failure(&self, reason: impl Into<String>) {
        let reason = reason.into();
        tracing::warn!(reason = %reason, "a job could not run because of the agent: taking no jobs until healthy");
        *lock(&self.infra) = Some(InfraFailure {
            reason,
            at: Instant::now(),
        });
        self.wake();
    }

    /// Asks the monitor to check now rather than at its next tick.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Keeps `probe` as the current answer unless a check that began later was kept already
    /// (checks overlap: the monitor's and one after a job's error); clears a reported failure
    /// it vouches for.
    pub fn record(&self, probe: Probe) {
        let mut current = lock(&self.probe);
        if current.as_ref().is_some_and(|c| c.started > probe.started) {
            return;
        }
        let mut infra = lock(&self.infra);
        if infra
            .as_ref()
            .is_some_and(|f| clears(f.at, &probe, INFRA_HOLD))
        {
            tracing::info!("checks pass again after a job failed because of the agent");
            *infra = None;
        }
        drop(infra);
        *current = Some(probe);
    }
}

/// A failure reported at `at` is cleared by a clean check that began `hold` after it.
fn clears(at: Instant, probe: &Probe, hold: Duration) -> bool {
    probe.problems.is_empty() && probe.started >= at + hold
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Words a job's `error` result as given back: the agent, not the job, could not run it.
pub fn give_back(result: &mut crate::wire::JobResult, reasons: &str) {
    let cause = result.error.take().unwrap_or_default();
    result.error = Some(format!(
        "the agent could not run this job ({reasons}); run it again: {cause}"
    ));
}

impl AgentState {
    /// For the code that runs jobs: a job failed because of the agent, not of the job (the
    /// Docker engine went away, the work dir vanished, descriptors ran out). Report the job as
    /// `error` saying the agent could not run it, then call this: the agent takes no job (no
    /// lease, push answers 503) until [`INFRA_HOLD`] has passed and a full check finds nothing
    /// wrong, and `/health` says why meanwhile.
    pub fn report_infra_failure(&self, reason: impl Into<String>) {
        self.metrics
            .set_not_ready(Cause::InfraFailure.as_str(), true);
        self.readiness.report_infra_failure(reason);
    }

    /// After a job ended in `error`, pull or push: checks the agent at once (not at the
    /// monitor's next tick). When the agent itself cannot run jobs now (Docker gone, a directory
    /// removed, descriptors out), the error was most likely its own: it is reported as such (no
    /// job is taken until the agent is healthy again for [`INFRA_HOLD`]) and the reasons are
    /// returned, so the mode can give the job back instead of blaming it.
    pub async fn check_after_error(&self, job_id: i64, error: &str) -> Option<String> {
        let probe = self.probe().await;
        let reasons = probe.reasons();
        if let Some(reasons) = &reasons {
            self.report_infra_failure(format!("job {job_id}: {error}"));
            tracing::warn!(job_id, %reasons, "a job failed while the agent could not run jobs: given back");
        }
        self.readiness.record(probe);
        reasons
    }

    /// Runs every check once (a Docker ping, directories, descriptors, disk).
    pub async fn probe(&self) -> Probe {
        let started = Instant::now();
        let docker_available = tokio::time::timeout(PING_TIMEOUT, self.executor.ping())
            .await
            .unwrap_or(false);
        let mut problems = Vec::new();
        if !docker_available {
            problems.push((
                Cause::Docker,
                "the Docker engine does not answer".to_owned(),
            ));
        }
        let dirs = self.required_dirs();
        let state_lock = self.state_lock.clone();
        // A generated id lives in the state dir only: written again if the dir was removed.
        let generated_id = match self.settings.agent_id {
            Some(_) => None,
            None => Some((self.settings.state_dir.clone(), self.agent_id.clone())),
        };
        let work_dir = self.executor.settings().work_dir.clone();
        let min_free = self.settings.min_free_disk_mb;
        let local = tokio::task::spawn_blocking(move || {
            let dirs_problem = ensure_dirs(&dirs, &state_lock).or_else(|| {
                let (dir, id) = generated_id?;
                super::identity::restore(&dir, &id)
                    .err()
                    .map(|e| e.to_string())
            });
            [
                (Cause::Directories, dirs_problem),
                (Cause::Descriptors, resources::descriptor_problem()),
                (Cause::Disk, resources::disk_problem(&work_dir, min_free)),
            ]
        })
        .await;
        match local {
            Ok(found) => problems.extend(found.into_iter().filter_map(|(c, p)| Some((c, p?)))),
            Err(e) => problems.push((Cause::Directories, format!("the checks failed: {e}"))),
        }
        Probe { started, problems }
    }

    /// The directories a job needs: the state dir, the work dir and (pull mode) the spool.
    fn required_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = vec![
            self.settings.state_dir.clone(),
            self.executor.settings().work_dir.clone(),
        ];
        if self.modes.pull() {
            dirs.push(self.settings.state_dir.join("spool"));
        }
        dirs
    }
}

/// Makes missing directories again (the state dir 0700, and its lock taken again); says why
/// when one cannot be made or the lock is now someone else's.
fn ensure_dirs(dirs: &[PathBuf], state_lock: &Mutex<Option<StateLock>>) -> Option<String> {
    for (i, dir) in dirs.iter().enumerate() {
        if dir.is_dir() {
            continue;
        }
        if dir.exists() {
            return Some(format!(
                "{} is not a directory: taking no jobs",
                dir.display()
            ));
        }
        let made = if i == 0 {
            super::identity::create_state_dir(dir).map_err(|e| e.to_string())
        } else if dir.ends_with("spool") {
            // As `Spool::open` makes it: results and logs are the jobs' output.
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| e.to_string())
        } else {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())
        };
        match made {
            Ok(()) => {
                tracing::warn!(dir = %dir.display(), "a directory of the agent was removed: made it again")
            }
            Err(e) => {
                return Some(format!(
                    "{} is missing and cannot be made again ({e}): taking no jobs",
                    dir.display()
                ));
            }
        }
    }
    relock(&dirs[0], state_lock)
}

/// Takes the state dir's lock again when its file was removed (with the directory, say).
fn relock(state_dir: &std::path::Path, state_lock: &Mutex<Option<StateLock>>) -> Option<String> {
    let mut held = lock(state_lock);
    let current = held.as_ref()?;
    if current.still_in_place() {
        return None;
    }
    match lock::acquire(state_dir) {
        Ok(new) => {
            tracing::warn!(path = %new.path.display(), "the state dir's lock file was removed: locked it again");
            *held = Some(new);
            None
        }
        Err(e) => Some(format!("{e}: taking no jobs")),
    }
}

/// Checks every [`PROBE_INTERVAL`], or when woken, until the agent stops; logs each change.
pub fn start_monitor(state: Arc<AgentState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last: Vec<String> = Vec::new();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(PROBE_INTERVAL) => {}
                _ = state.readiness.wake.notified() => {}
                _ = state.shutdown.stopped() => return,
            }
            check_once(&state, &mut last).await;
        }
    })
}

/// One check, recorded, counted in the metrics and logged when the answer changed.
pub async fn check_once(state: &AgentState, last: &mut Vec<String>) {
    let probe = state.probe().await;
    state.readiness.record(probe);
    let problems = state.readiness.problems();
    for cause in Cause::ALL {
        state
            .metrics
            .set_not_ready(cause.as_str(), problems.iter().any(|(c, _)| *c == cause));
    }
    let reasons = words(&problems);
    if reasons != *last {
        if reasons.is_empty() {
            tracing::info!("the agent can run jobs again");
        } else {
            tracing::warn!(reasons = %reasons.join("; "), "the agent cannot run jobs now: taking none");
        }
        *last = reasons;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(started: Instant, problems: Vec<(Cause, String)>) -> Probe {
        Probe { started, problems }
    }

    #[tokio::test]
    async fn a_reported_failure_holds_until_a_clean_check_after_the_hold() {
        let readiness = Readiness::default();
        assert_eq!(readiness.problems()[0].0, Cause::NotChecked);
        readiness.record(probe(Instant::now(), Vec::new()));
        assert!(readiness.problems().is_empty());

        readiness.report_infra_failure("cannot create the workspace");
        let at = Instant::now();
        let problems = readiness.problems();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].0, Cause::InfraFailure);
        assert!(problems[0].1.contains("cannot create the workspace"));
        // A clean check too soon, and a failing one after the hold, keep it.
        readiness.record(probe(at, Vec::new()));
        assert_eq!(readiness.problems().len(), 1);
        let later = at + INFRA_HOLD + Duration::from_secs(1);
        readiness.record(probe(later, vec![(Cause::Docker, "down".into())]));
        assert_eq!(readiness.problems().len(), 2);
        // A clean check after the hold clears it.
        readiness.record(probe(later, Vec::new()));
        assert!(readiness.problems().is_empty());
    }

    #[tokio::test]
    async fn an_older_check_never_replaces_a_newer_one() {
        let readiness = Readiness::default();
        let older = Instant::now();
        let newer = older + Duration::from_secs(1);
        readiness.record(probe(newer, Vec::new()));
        readiness.record(probe(older, vec![(Cause::Docker, "down".into())]));
        assert!(readiness.problems().is_empty());
        assert!(readiness.docker_available());
        let later = newer + Duration::from_secs(1);
        readiness.record(probe(later, vec![(Cause::Docker, "down".into())]));
        assert!(!readiness.docker_available());
        assert_eq!(readiness.reason().as_deref(), Some("down"));
    }

    #[test]
    fn removed_directories_are_made_again_and_the_state_dir_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let work = state.join("work");
        std::fs::create_dir_all(&work).unwrap();
        let held = Mutex::new(Some(lock::acquire(&state).unwrap()));
        std::fs::remove_dir_all(&state).unwrap();
        assert_eq!(ensure_dirs(&[state.clone(), work.clone()], &held), None);
        assert!(work.is_dir());
        let mode = std::fs::metadata(&state).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // The lock was taken again: a second agent is still refused.
        assert!(held.lock().unwrap().as_ref().unwrap().still_in_place());
        assert!(lock::acquire(&state).is_err());
        // A file where the work dir should be cannot be fixed: it is a problem.
        std::fs::remove_dir_all(&work).unwrap();
        std::fs::write(&work, "not a dir").unwrap();
        let problem = ensure_dirs(&[state, work], &held).unwrap();
        assert!(problem.contains("not a directory"), "{problem}");
    }
}
