//! The long-running agent (`gryt-agent run`): shared state, the local endpoint, the modes that
//! feed it jobs, signals and the drain on shutdown.
//!
//! Shutdown: the first SIGTERM, SIGINT, SIGHUP or SIGQUIT stops taking jobs at once (a drain);
//! running jobs get `shutdown_timeout_seconds` to finish, then they are cancelled (status
//! `cancelled`); a second one of any of them kills them at once. Either way every job is cleaned
//! up and reported, and the agent exits 0. SIGHUP (a closed terminal, or a reload by habit) and
//! SIGQUIT (Ctrl-\) would otherwise kill the process without cleanup.

pub mod identity;
pub mod jobs;
pub mod lock;
pub mod readiness;
pub mod resources;
pub mod status;
pub mod sweep;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpListener;

use crate::config::{ConfigError, Settings};
use crate::executor::{Executor, ExecutorError, ExecutorSettings};
use crate::metrics::Metrics;
use crate::slots::Slots;

use jobs::RunningJobs;
use status::{ApiStatus, Shutdown};

/// The documented minimum length of the push-mode API key.
pub const MIN_PUSH_KEY_LEN: usize = 32;

/// Everything the modes and the endpoint share.
pub struct AgentState {
    pub settings: Settings,
    pub agent_id: String,
    pub api_key: Option<SecretString>,
    /// Keys accepted on `POST /jobs/execute`; `Some` exactly when push mode is on.
    pub push_keys: Option<crate::push::auth::PushKeys>,
    pub executor: Arc<Executor>,
    /// The disk collector's last report and wake-up (`crate::gc`).
    pub gc: crate::gc::GcHandle,
    pub slots: Slots,
    pub metrics: Metrics,
    pub jobs: RunningJobs,
    pub api_status: ApiStatus,
    pub shutdown: Shutdown,
    /// Whether a job can run now (cached checks; see [`readiness`]).
    pub readiness: readiness::Readiness,
    /// The state dir's lock, held for the process's life (taken again if its file is removed).
    pub state_lock: Arc<Mutex<Option<lock::StateLock>>>,
}

/// Ephemeral-agent limits (autoscaled fleets): exit after some work or some idleness.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Exit after one job is completed.
    pub once: bool,
    /// Exit after this many jobs are completed.
    pub max_jobs: Option<u64>,
    /// Exit after this long without a job.
    pub idle_exit: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("nothing to do: set GRYT_API_URL (pull mode) and/or GRYT_PUSH=true (push mode)")]
    NothingToDo,
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error(
        "push mode needs AGENT_API_KEY (or AGENT_API_KEY_FILE) of at least {MIN_PUSH_KEY_LEN} characters; \
         make one with `openssl rand -hex 32`"
    )]
    PushKey,
    #[error(
        "pull mode needs AGENT_API_KEY (or AGENT_API_KEY_FILE): the key the API knows this agent by"
    )]
    PullKey,
    #[error(
        "AGENT_API_KEY_PREVIOUS must be at least {MIN_PUSH_KEY_LEN} characters, like the current key (or unset)"
    )]
    PreviousPushKey,
    #[error("{0}")]
    Identity(#[from] identity::IdentityError),
    #[error("{0}")]
    Lock(#[from] lock::LockError),
    #[error("cannot create the work dir {path}: {source}")]
    WorkDir {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Executor(#[from] ExecutorError),
    #[error("{0}")]
    Pull(#[from] crate::pull::PullError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
    #[error("pull mode stopped unexpectedly: {0}")]
    PullTask(#[source] tokio::task::JoinError),
    #[error(
        "{0} result(s) could not be delivered to the API: they stay in the spool and are sent at the next start"
    )]
    Undelivered(usize),
}

impl AgentState {
    /// Checks the settings for the long-running agent and builds its state (no I/O but files).
    pub fn new(settings: Settings) -> Result<Arc<Self>, AgentError> {
        let pull = settings.api_url.is_some();
        let push = settings.push.enabled;
        if !pull && !push {
            return Err(AgentError::NothingToDo);
        }
        let api_key = settings.api_key()?;
        let key_len = api_key
            .as_ref()
            .map(|k| k.expose_secret().len())
            .unwrap_or(0);
        if push && key_len < MIN_PUSH_KEY_LEN {
            return Err(AgentError::PushKey);
        }
        if pull && key_len == 0 {
            return Err(AgentError::PullKey);
        }
        let previous_len = settings
            .api_key_previous
            .as_ref()
            .map(|k| k.expose_secret().len())
            .unwrap_or(0);
        if push && previous_len > 0 && previous_len < MIN_PUSH_KEY_LEN {
            return Err(AgentError::PreviousPushKey);
        }
        let push_keys = match (&api_key, push) {
            (Some(key), true) => Some(crate::push::auth::PushKeys::new(
                key.clone(),
                settings.api_key_previous.clone(),
            )),
            _ => None,
        };
        // Locked before anything else touches the state dir: a second agent on it stops here,
        // before it sweeps the first one's containers or replays its spool.
        identity::create_state_dir(&settings.state_dir)?;
        let state_lock = lock::acquire(&settings.state_dir)?;
        let agent_id = identity::agent_id(&settings)?;
        let executor_settings = ExecutorSettings::from_settings(&settings, agent_id.clone())?;
        // Made now, so that a work dir missing later means someone removed it.
        let work_dir = &executor_settings.work_dir;
        std::fs::create_dir_all(work_dir).map_err(|source| AgentError::WorkDir {
            path: work_dir.display().to_string(),
            source,
        })?;
        executor_settings.register_secrets_for_logs();
        let executor = Arc::new(Executor::new(executor_settings)?);
        let slots = Slots::new(settings.concurrency);
        let metrics = Metrics::new(settings.concurrency);
        Ok(Arc::new(AgentState {
            settings,
            agent_id,
            api_key,
            push_keys,
            executor,
            gc: crate::gc::GcHandle::default(),
            slots,
            metrics,
            jobs: RunningJobs::default(),
            api_status: ApiStatus::default(),
            shutdown: Shutdown::default(),
            readiness: readiness::Readiness::default(),
            state_lock: Arc::new(Mutex::new(Some(state_lock))),
        }))
    }

    /// Why this agent cannot take a job now, if it cannot: Docker does not answer, a directory
    /// is missing and cannot be made again, descriptors or disk space are short, or a job just
    /// failed because of the agent. Cheap (it reads the last check; see [`readiness`]): called
    /// before every lease and every push admission.
    pub fn capacity_problem(&self) -> Option<String> {
        let problems = self.readiness.problems();
        if problems.is_empty() {
            return None;
        }
        let reasons: Vec<String> = problems.into_iter().map(|(_, r)| r).collect();
        Some(reasons.join("; "))
    }

    /// For the code that runs jobs: a job failed because of the agent, not of the job (the
    /// Docker engine went away, the work dir vanished, descriptors ran out). Report the job as
    /// `error` saying the agent could not run it, then call this: the agent takes no job (no
    /// lease, push answers 503) until `readiness::INFRA_HOLD` has passed and a full check finds
    /// nothing wrong, and `/health` says why meanwhile.
    pub fn report_infra_failure(&self, reason: impl Into<String>) {
        self.metrics.set_not_ready("infra_failure", true);
        self.readiness.report_infra_failure(reason);
    }

    /// Where the endpoint listens: `AGENT_HOST` else `0.0.0.0` with push mode (the API must
    /// reach it) or `127.0.0.1` when only pulling (nothing outside needs it).
    pub fn listen_address(&self) -> (String, u16) {
        let default_host = if self.settings.push.enabled {
            "0.0.0.0"
        } else {
            "127.0.0.1"
        };
        let host = self
            .settings
            .host
            .clone()
            .unwrap_or_else(|| default_host.to_owned());
        (host, self.settings.port)
    }
}

/// Runs the agent until it is told to stop (or, ephemeral, has done its work).
pub async fn run(settings: Settings, options: AgentOptions) -> Result<(), AgentError> {
    // Installed first and kept for the whole run: a signal that arrives at any moment from here
    // on (even before readiness is announced, or between the first and the second) is seen.
    let mut signals = Signals::install();
    let descriptors = resources::raise_descriptor_limit();
    let state = AgentState::new(settings)?;
    // Checked before anything listens or connects: a refused URL means no traffic at all.
    let pull = match state.settings.api_url {
        Some(_) => Some(crate::pull::Ctx::new(state.clone()).await?),
        None => None,
    };
    let collector = crate::gc::start(state.clone()).await;
    let (host, port) = state.listen_address();
    let address = format!("{host}:{port}");
    let listener = TcpListener::bind((host.as_str(), port))
        .await
        .map_err(|source| AgentError::Listen {
            address: address.clone(),
            source,
        })?;
    // Leftovers of an earlier run go before the first job can arrive.
    let sweeper = sweep::start(state.clone()).await;
    // The first check before any job can arrive; then one every few seconds.
    readiness::check_once(&state, &mut Vec::new()).await;
    let monitor = readiness::start_monitor(state.clone());
    tracing::info!(
        agent_id = %state.agent_id,
        address = %listener.local_addr().map(|a| a.to_string()).unwrap_or(address),
        pull = state.settings.api_url.is_some(),
        push = state.settings.push.enabled,
        slots = state.slots.total(),
        descriptors = descriptors.unwrap_or(u64::MAX),
        "gryt-agent {} running",
        crate::VERSION
    );
    // Readiness for systemd (Type=notify); a no-op when not started by systemd.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let server = {
        let shutdown = state.shutdown.clone();
        tokio::spawn(crate::server::serve(
            listener,
            crate::server::router(state.clone()),
            crate::server::Limits::for_descriptors(descriptors),
            state.clone(),
            async move { shutdown.stopped().await },
        ))
    };
    let mut pull_task = pull.map(|ctx| tokio::spawn(crate::pull::run(ctx, options)));

    let pull_ended = tokio::select! {
        _ = signals.next() => None,
        ended = finished(&mut pull_task) => Some(ended),
    };
    match &pull_ended {
        Some(Ok(_)) => tracing::info!("ephemeral limit reached: exiting"),
        Some(Err(e)) => tracing::error!(error = %e, "pull mode failed: exiting"),
        None => tracing::info!("signal received: taking no new jobs, letting running jobs finish"),
    }
    // Also when pull mode ended by itself: push jobs may still run (returns at once if idle).
    drain(&state, &mut signals).await;
    if pull_ended.is_none()
        && let Some(task) = pull_task
    {
        // Returns at once: draining ended leasing, and drain waited for the jobs.
        let _ = task.await;
    }
    collector.stop().await;
    state.shutdown.stop();
    sweeper.abort();
    monitor.abort();
    if let Ok(Err(e)) = server.await {
        tracing::error!(error = %e, "local endpoint failed");
    }
    match pull_ended {
        Some(Err(e)) => Err(AgentError::PullTask(e)),
        Some(Ok(undelivered)) if undelivered > 0 => Err(AgentError::Undelivered(undelivered)),
        _ => Ok(()),
    }
}

/// Resolves when pull mode ends by itself (ephemeral limits, or a panic) with the number of
/// results it could not deliver; never without pull mode.
async fn finished(
    task: &mut Option<tokio::task::JoinHandle<crate::pull::PullEnd>>,
) -> Result<usize, tokio::task::JoinError> {
    match task {
        Some(task) => task.await.map(|end| end.undelivered),
        None => std::future::pending().await,
    }
}

/// Stops taking jobs, waits for running ones up to the shutdown timeout, then cancels what is
/// left and waits for those to be reported. A further signal at any point kills at once.
pub async fn drain(state: &Arc<AgentState>, signals: &mut Signals) {
    state.shutdown.begin_drain();
    let timeout = Duration::from_secs(state.settings.shutdown_timeout_seconds);
    tokio::select! {
        _ = wait_until_idle(state) => return,
        _ = tokio::time::sleep(timeout) => state.jobs.cancel_all("the agent shut down"),
        _ = signals.next() => abort_all(state),
    }
    tokio::select! {
        _ = wait_until_idle(state) => {}
        _ = signals.next() => {
            abort_all(state);
            wait_until_idle(state).await;
        }
    }
}

fn abort_all(state: &AgentState) {
    tracing::warn!("second signal: killing running jobs");
    state
        .jobs
        .abort_all("the agent was stopped (second signal)");
}

async fn wait_until_idle(state: &AgentState) {
    while state.jobs.count() > 0 || state.slots.running() > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGTERM, SIGINT, SIGHUP and SIGQUIT, registered once for the agent's whole life. All four
/// mean the same: drain (the first), kill the jobs (the next).
pub struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
    quit: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    pub fn install() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        Signals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
            hup: signal(SignalKind::hangup()).ok(),
            quit: signal(SignalKind::quit()).ok(),
        }
    }

    /// Resolves on the next SIGTERM, SIGINT, SIGHUP or SIGQUIT; never, if no handler could be
    /// installed (the agent can then only be killed, but never stops spuriously).
    pub async fn next(&mut self) {
        async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
            match signal {
                Some(s) => {
                    if s.recv().await.is_none() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.term) => {}
            _ = recv(&mut self.int) => {}
            _ = recv(&mut self.hup) => {}
            _ = recv(&mut self.quit) => {}
        }
    }
}
