//! The agent's shared state, below the modes: settings, identity, slots, running jobs,
//! readiness, status and the health report, and the one admission and run path that pull and
//! push mode share. It imports no mode: `agent`, `pull`, `push`, `server` and `gc` import it.

pub mod admit;
pub mod adopted;
pub mod disk;
pub mod durable;
pub mod health;
pub mod identity;
pub mod jobs;
pub mod lock;
pub mod modes;
pub mod push_keys;
pub mod readiness;
pub mod resources;
pub mod run;
pub mod slots;
pub mod status;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::SecretString;

use crate::config::{ConfigError, Settings};
use crate::executor::{Executor, ExecutorError, ExecutorSettings};
use crate::metrics::Metrics;

use jobs::RunningJobs;
pub use modes::{KeyProblem, MIN_PUSH_KEY_LEN, Modes};
use push_keys::PushKeys;
use slots::Slots;
use status::{ApiStatus, Shutdown};

/// Everything the modes and the endpoint share.
pub struct AgentState {
    pub settings: Settings,
    /// The modes the settings turn on.
    pub modes: Modes,
    pub agent_id: String,
    pub api_key: Option<SecretString>,
    /// Keys accepted on `POST /jobs/execute`; `Some` exactly when push mode is on.
    pub push_keys: Option<PushKeys>,
    pub executor: Arc<Executor>,
    /// The disk collector's last report and wake-up (`crate::gc`).
    pub gc: disk::GcHandle,
    pub slots: Slots,
    pub metrics: Metrics,
    pub jobs: RunningJobs,
    /// Jobs carried on from an earlier agent process, and those given up on.
    pub adopted: adopted::Adopted,
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

/// Why the agent's state cannot be built from these settings.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
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
}

impl AgentState {
    /// Checks the settings for the long-running agent and builds its state (no I/O but files).
    pub fn new(settings: Settings) -> Result<Arc<Self>, StateError> {
        let modes = Modes::of(&settings);
        if modes.none() {
            return Err(StateError::NothingToDo);
        }
        let api_key = settings.api_key()?;
        if let Some(problem) = modes
            .key_problems(api_key.as_ref(), settings.api_key_previous.as_ref())
            .first()
        {
            return Err(match problem {
                KeyProblem::Push => StateError::PushKey,
                KeyProblem::Pull => StateError::PullKey,
                KeyProblem::PreviousPush => StateError::PreviousPushKey,
            });
        }
        let push_keys = match (&api_key, modes.push) {
            (Some(key), true) => Some(PushKeys::new(
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
        std::fs::create_dir_all(work_dir).map_err(|source| StateError::WorkDir {
            path: work_dir.display().to_string(),
            source,
        })?;
        executor_settings.register_secrets_for_logs();
        let executor = Arc::new(Executor::new(executor_settings)?);
        let slots = Slots::new(settings.concurrency);
        let mut metrics = Metrics::new(settings.concurrency);
        let (warm_ready, warm_jobs) = executor.warm_metrics();
        metrics.register_warm(warm_ready, warm_jobs);
        let adopted = adopted::Adopted::new(metrics.adoption());
        Ok(Arc::new(AgentState {
            settings,
            modes,
            agent_id,
            api_key,
            push_keys,
            executor,
            gc: disk::GcHandle::default(),
            slots,
            metrics,
            jobs: RunningJobs::default(),
            adopted,
            api_status: ApiStatus::default(),
            shutdown: Shutdown::default(),
            readiness: readiness::Readiness::default(),
            state_lock: Arc::new(Mutex::new(Some(state_lock))),
        }))
    }

    /// Where the endpoint listens: `AGENT_HOST` else `0.0.0.0` with push mode (the API must
    /// reach it) or `127.0.0.1` when only pulling (nothing outside needs it).
    pub fn listen_address(&self) -> (String, u16) {
        let default_host = if self.modes.push {
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
