//! The executor's public type: [`Executor`] and its settings. It turns a job spec into a result
//! in a hardened, ephemeral container (see `job.rs`); it knows nothing of HTTP or the API, and
//! it never fails as a function: every failure comes back as a result with a status. The job's
//! cleanup runs after its result, in a task the executor tracks (`cleanup.rs`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bollard::Docker;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use secrecy::SecretString;
use tokio_util::task::TaskTracker;

use crate::checkout::CheckoutSettings;
use crate::config::{ConfigError, DockerSettings, JobSettings, Settings};
use crate::secrets::mask::SecretNames;
use crate::secrets::token::{KeyError, TokenKeys};
use crate::wire::{JobResult, JobSpec};

use super::docker::check_address;
use super::metadata_guard;
use super::network::Pool;
use super::resume::Resume;
use super::warm::{WarmPool, WarmStatus};
use super::{Cleanup, JobControl, JobObserver, adopt, job};

/// What the executor needs from the settings.
#[derive(Debug, Clone)]
pub struct ExecutorSettings {
    /// Put on every container's labels; the orphan sweep uses it.
    pub agent_id: String,
    /// When each image was last used and which ones jobs hold (the disk collector reads it).
    pub image_use: crate::gc::ImageUse,
    pub work_dir: PathBuf,
    pub docker: DockerSettings,
    pub job: JobSettings,
    /// Cloning the job's repository (`git_url`).
    pub checkout: CheckoutSettings,
    /// Job environment variables whose names match are secrets.
    pub secret_env_patterns: Vec<String>,
    /// Decrypts `github_token_encrypted`; jobs with a token fail without it.
    pub encryption_key: Option<SecretString>,
    pub encryption_key_previous: Option<SecretString>,
    /// The agent's own secrets (API keys, encryption keys): masked in every job's output too.
    pub agent_secrets: Vec<SecretString>,
    /// The most memory a job may ask for, in bytes and as the operator wrote it.
    pub max_memory: (i64, String),
    /// The most CPUs a job may ask for, in NanoCPUs and as the operator wrote it.
    pub max_nano_cpus: (i64, String),
    /// Where `exec` keeps its lock files (`<state_dir>/exec`, see `exec_owner`).
    pub exec_lock_dir: PathBuf,
    /// Labels put on every container beside the agent's own (`exec`'s ownership labels).
    pub extra_labels: Vec<(String, String)>,
    /// Object storage for artifacts and caches (`store.url`); `None` when not configured.
    pub store: Option<crate::store::Store>,
    /// Where job networks take their subnets (`docker.network_pool`).
    pub network_pool: Pool,
}

impl ExecutorSettings {
    /// Registers the agent's own secrets with the log writer, so no log line can show them.
    pub fn register_secrets_for_logs(&self) {
        for secret in &self.agent_secrets {
            crate::secrets::register_global_secret(secret.clone());
        }
    }

    /// Fails when the encryption key file cannot be read: the agent must not start and then
    /// fail every job with a token as if no key were configured.
    pub fn from_settings(settings: &Settings, agent_id: String) -> Result<Self, ConfigError> {
        // An API key file that cannot be read is reported where that key is used (agent start,
        // check); here it only means there is one secret less to mask.
        let api_key = settings.api_key().ok().flatten();
        let encryption_key = settings.encryption_key()?;
        let agent_secrets = [
            api_key,
            settings.api_key_previous.clone(),
            encryption_key.clone(),
            settings.encryption_key_previous.clone(),
        ]
        .into_iter()
        .flatten()
        .chain(crate::store::secrets(&settings.store))
        .collect();
        let store = crate::store::Store::from_config(&settings.store, settings.ca_file.as_deref())
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(ExecutorSettings {
            agent_id,
            image_use: crate::gc::ImageUse::in_state_dir(&settings.state_dir),
            work_dir: settings.work_dir(),
            docker: settings.docker.clone(),
            job: settings.job.clone(),
            checkout: CheckoutSettings::from_settings(settings),
            secret_env_patterns: settings.secret_env_patterns.clone(),
            encryption_key,
            encryption_key_previous: settings.encryption_key_previous.clone(),
            agent_secrets,
            max_memory: settings.docker.max_memory_bytes()?,
            max_nano_cpus: settings.docker.max_nano_cpus()?,
            exec_lock_dir: settings.state_dir.join("exec"),
            extra_labels: Vec::new(),
            store,
            network_pool: settings.docker.network_pool()?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("{0}")]
    EncryptionKey(#[from] KeyError),
    #[error("invalid secret_env_patterns: {0}")]
    SecretPatterns(String),
    #[error("{0}")]
    Settings(#[from] ConfigError),
    #[error("cannot connect to the Docker engine at {address}: {source}")]
    Connect {
        address: String,
        source: bollard::errors::Error,
    },
    #[error(
        "unsupported Docker address `{0}`: use unix://PATH, tcp://HOST:PORT or http://HOST:PORT"
    )]
    Address(String),
}

pub struct Executor {
    pub(super) settings: ExecutorSettings,
    pub(super) token_keys: Option<TokenKeys>,
    pub(super) secret_names: SecretNames,
    /// `docker.allowed_images`: an image that matches none is refused before any pull.
    pub(super) allowed_images: globset::GlobSet,
    /// The client after API version negotiation. Made lazily, so the agent starts while the
    /// engine is down (or its socket does not exist yet) and picks it up when it comes back.
    /// A plain mutex, held only to read or store: never across the negotiation's request.
    pub(super) negotiated: Mutex<Option<Docker>>,
    /// Set once the metadata rules were seen to or tried (see [`Executor::guard_metadata`]).
    metadata_guarded: tokio::sync::OnceCell<()>,
    /// Containers started ahead of jobs (`docker.warm_pool`); off unless the long-running agent
    /// starts it ([`Executor::start_warm_pool`]).
    pub(super) warm: WarmPool,
    /// Every job's cleanup task. Closed from the start: closing only means that `wait` ends
    /// whenever no cleanup is left, and new ones are still tracked.
    cleanups: TaskTracker,
}

impl Executor {
    /// Makes an executor; no I/O happens until the first job or ping. Fails only on a Docker
    /// address that can never work.
    pub fn new(settings: ExecutorSettings) -> Result<Self, ExecutorError> {
        check_address(settings.docker.host.as_deref())?;
        let token_keys = TokenKeys::from_keys(
            settings.encryption_key.as_ref(),
            settings.encryption_key_previous.as_ref(),
        )?;
        let secret_names = SecretNames::new(&settings.secret_env_patterns)
            .map_err(|e| ExecutorError::SecretPatterns(e.to_string()))?;
        let allowed_images = crate::config::image_globs(&settings.docker.allowed_images)?;
        let warm = WarmPool::new(settings.docker.image.clone());
        let cleanups = TaskTracker::new();
        cleanups.close();
        Ok(Executor {
            warm,
            settings,
            token_keys,
            secret_names,
            allowed_images,
            negotiated: Mutex::new(None),
            metadata_guarded: tokio::sync::OnceCell::new(),
            cleanups,
        })
    }

    pub fn settings(&self) -> &ExecutorSettings {
        &self.settings
    }

    /// Runs one job to its end and returns its result once its container, network and
    /// workspace are removed. Never panics on job input, never leaves a container or workspace
    /// behind.
    pub async fn run(
        &self,
        job: &JobSpec,
        observer: &dyn JobObserver,
        control: &JobControl,
    ) -> JobResult {
        let (result, cleanup) = self.run_then_clean(job, observer, control).await;
        cleanup.finish().await;
        result
    }

    /// Runs one job and returns its result as soon as its last command ended and its output is
    /// complete (artifacts and caches uploaded, the services' ends read), with the handle of
    /// its cleanup: the removal of its containers, network and workspace, in a task this
    /// executor tracks. The removal starts when the handle is finished, started or dropped, so
    /// the caller can send the result first; [`Executor::cleanups_done`] waits for it.
    pub async fn run_then_clean(
        &self,
        job: &JobSpec,
        observer: &dyn JobObserver,
        control: &JobControl,
    ) -> (JobResult, Cleanup) {
        let (result, leftovers) = job::run(self, job, observer, control).await;
        let cleanup = match leftovers {
            Some(leftovers) => Cleanup::spawn(&self.cleanups, job.job_id, leftovers),
            None => Cleanup::nothing(job.job_id),
        };
        (result, cleanup)
    }

    /// Carries on `job`, which an earlier agent process started and left running, from
    /// `resume` (what that process kept of it, see [`Resume`]): as [`Executor::run_then_clean`],
    /// its output from its start (read again from its container's log), its result and the
    /// handle of its cleanup. A job that cannot be carried on ends with `error` saying why, and
    /// what it left is removed.
    pub async fn adopt_then_clean(
        &self,
        job: &JobSpec,
        resume: &Resume,
        observer: &dyn JobObserver,
        control: &JobControl,
    ) -> (JobResult, Cleanup) {
        let (result, leftovers) = adopt::adopt(self, job, resume, observer, control).await;
        let cleanup = match leftovers {
            Some(leftovers) => Cleanup::spawn(&self.cleanups, job.job_id, leftovers),
            None => Cleanup::nothing(job.job_id),
        };
        (result, cleanup)
    }

    /// Whether the container of a job an earlier agent process started is there to carry it on;
    /// else why not.
    pub async fn can_carry_on(&self, job: &JobSpec, resume: &Resume) -> Result<(), String> {
        adopt::check_container(self, job, resume).await
    }

    /// Keeps the sweeps off the parts of a job an earlier process ran in a warm container (they
    /// carry that container's warm id, not the job's) until the guard is dropped; `None` for a
    /// job whose parts carry its own id (the registered job spares them).
    pub fn spare(&self, resume: &Resume) -> Option<super::warm::Spared> {
        if !resume.warm {
            return None;
        }
        let name = resume.workspace.file_name()?.to_str()?;
        let (_, owner) = super::workspace::owner_of(name)?;
        Some(self.warm.spare(owner))
    }

    /// Removes what a job of an earlier agent process left (container, network, workspace)
    /// when it is not carried on (its lease is gone).
    pub async fn give_up(&self, job: &JobSpec, resume: &Resume) {
        if let Some(leftovers) = adopt::leftovers_of(self, job, resume).await {
            let cleanup = Cleanup::spawn(&self.cleanups, job.job_id, leftovers);
            cleanup.finish().await;
        }
    }

    /// Waits until no job's cleanup is left: those running and those whose handle has not
    /// started them yet (finish, start or drop those handles first, or this waits for them).
    /// Each cleanup is bounded once started (`CLEANUP_LIMIT`).
    pub async fn cleanups_done(&self) {
        self.cleanups.wait().await;
    }

    /// How many jobs' cleanups have not ended yet (running or waiting for their start).
    pub fn pending_cleanups(&self) -> usize {
        self.cleanups.len()
    }

    /// Turns the warm pool on (`docker.warm_pool`, at most `slots`): only the long-running
    /// agent does, after its first sweep removed an earlier process's pool; `exec` never does.
    pub fn start_warm_pool(self: &Arc<Self>, slots: usize) {
        self.warm.start(self.clone(), slots);
    }

    /// The pool's target and ready count (`/health`).
    pub fn warm_status(&self) -> WarmStatus {
        self.warm.status()
    }

    /// The job ids (`warm-<hex>`) of the pool's containers not yet removed, ready or taken:
    /// the sweeps spare them like running jobs' (read after the listings, like those).
    pub fn warm_ids(&self) -> Vec<String> {
        self.warm.live_ids()
    }

    /// The pool's metrics (ready containers, jobs run warm), for the agent's registry.
    pub fn warm_metrics(&self) -> (Gauge, Counter) {
        self.warm.metrics()
    }

    /// Stops the pool and removes its ready containers (the agent's exit, after its jobs).
    pub async fn drain_warm_pool(&self) {
        self.warm.drain().await;
    }

    /// Installs the rules that keep job networks from the cloud metadata address (see
    /// `metadata_guard`), once, before the first job network: when the agent may change the
    /// firewall. Otherwise the packaged pre-start step (`gryt-agent guard-metadata`) or the
    /// operator installs them, and `gryt-agent check` says whether they are there. Never fails
    /// a job: a host without `iptables` runs jobs as before, with a warning in the log.
    pub(super) async fn guard_metadata(&self) {
        let pool = self.settings.network_pool;
        self.metadata_guarded
            .get_or_init(|| async move {
                if !metadata_guard::may_change_firewall() {
                    tracing::info!(%pool, "not root: the metadata rules are left to the pre-start step (`gryt-agent check` says whether they are in place)");
                    return;
                }
                let guarded = metadata_guard::install(pool).await;
                match guarded.v4 {
                    Ok(()) => tracing::info!(%pool, "job networks cannot reach the cloud metadata address"),
                    Err(e) => tracing::warn!(%pool, error = %e, "cannot keep job networks from the cloud metadata address"),
                }
                if let Err(e) = guarded.v6 {
                    tracing::debug!(error = %e, "no IPv6 metadata rule (job networks are IPv4 only)");
                }
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_encryption_key_file_is_an_error_not_a_missing_key() {
        let mut settings = Settings::load_from(None, &[], &[]).unwrap();
        settings.encryption_key_file = Some("/nonexistent/gryt-agent/encryption.key".into());
        let error = ExecutorSettings::from_settings(&settings, "t".into())
            .expect_err("an unreadable key file must not pass");
        assert!(
            error
                .to_string()
                .contains("/nonexistent/gryt-agent/encryption.key"),
            "{error}"
        );
    }

    #[test]
    fn a_blank_previous_key_alone_is_no_key_at_all() {
        let mut settings = Settings::load_from(None, &[], &[]).unwrap();
        settings.encryption_key_previous = Some(SecretString::from("  "));
        let executor_settings = ExecutorSettings::from_settings(&settings, "t".into()).unwrap();
        assert!(Executor::new(executor_settings).is_ok());
    }
}
