//! The long-running agent (`gryt-agent run`): shared state, the local endpoint, the modes that
//! feed it jobs, signals and the drain on shutdown.
//!
//! Shutdown: the first SIGTERM/SIGINT stops taking jobs at once; running jobs get
//! `shutdown_timeout_seconds` to finish, then they are cancelled (status `cancelled`); a second
//! signal kills them at once. The agent exits 0 once every job has been reported.

pub mod identity;
pub mod jobs;
pub mod resources;
pub mod status;
pub mod sweep;

use std::sync::Arc;
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
    #[error("{0}")]
    Identity(#[from] identity::IdentityError),
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
        let push_keys = match (&api_key, push) {
            (Some(key), true) => Some(crate::push::auth::PushKeys::new(
                key.clone(),
                settings.api_key_previous.clone(),
            )),
            _ => None,
        };
        let agent_id = identity::agent_id(&settings)?;
        let executor_settings = ExecutorSettings::from_settings(&settings, agent_id.clone())?;
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
        }))
    }

    /// Why this agent cannot take a job now (too little free disk), if it cannot.
    pub fn capacity_problem(&self) -> Option<String> {
        resources::disk_problem(
            &self.executor.settings().work_dir,
            self.settings.min_free_disk_mb,
        )
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
    let state = AgentState::new(settings)?;
    // Checked before anything listens or connects: a refused URL means no traffic at all.
    let pull = match state.settings.api_url {
        Some(_) => Some(crate::pull::Ctx::new(state.clone())?),
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
    tracing::info!(
        agent_id = %state.agent_id,
        address = %listener.local_addr().map(|a| a.to_string()).unwrap_or(address),
        pull = state.settings.api_url.is_some(),
        push = state.settings.push.enabled,
        slots = state.slots.total(),
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
            async move { shutdown.stopped().await },
        ))
    };
    let mut pull_task = pull.map(|ctx| tokio::spawn(crate::pull::run(ctx, options)));

    let pull_ended = tokio::select! {
        _ = signals.next() => None,
        ended = finished(&mut pull_task) => Some(ended),
    };
    match &pull_ended {
        Some(Ok(())) => tracing::info!("ephemeral limit reached: exiting"),
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
    if let Ok(Err(e)) = server.await {
        tracing::error!(error = %e, "local endpoint failed");
    }
    match pull_ended {
        Some(Err(e)) => Err(AgentError::PullTask(e)),
        _ => Ok(()),
    }
}

/// Resolves when pull mode ends by itself (ephemeral limits, or a panic); never without pull
/// mode.
async fn finished(
    task: &mut Option<tokio::task::JoinHandle<crate::pull::WorkEnd>>,
) -> Result<(), tokio::task::JoinError> {
    match task {
        Some(task) => task.await.map(|_| ()),
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

/// SIGTERM and SIGINT, registered once for the agent's whole life.
pub struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    pub fn install() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        Signals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// Resolves on the next SIGTERM or SIGINT; never, if no handler could be installed (the
    /// agent can then only be killed, but never stops spuriously).
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
        }
    }
}
