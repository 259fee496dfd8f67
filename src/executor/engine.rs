//! The `Executor` itself: settings, Docker connection (lazily negotiated), the observer
//! interface, and the entry point that hands one job to `job.rs`.

use std::path::PathBuf;
use std::time::Duration;

use bollard::Docker;
use std::sync::Mutex;

use secrecy::SecretString;

use crate::checkout::CheckoutSettings;
use crate::config::{ConfigError, DockerSettings, JobSettings, Settings};
use crate::secrets::mask::SecretNames;
use crate::secrets::token::{KeyError, TokenKeys};
use crate::wire::{JobResult, JobSpec, StepResult};

use super::{JobControl, OutputStream, job};

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
        })
    }
}

/// Progress of a job, for people (the CLI's header lines) and metrics.
#[derive(Debug, Clone, Copy)]
pub enum JobEvent<'a> {
    PullStarted { image: &'a str },
    PullStatus { image: &'a str, status: &'a str },
    PullFinished { image: &'a str },
    PullFailed { image: &'a str },
    CheckedOut { url: &'a str, commit: &'a str },
    StepStarted { index: usize, name: &'a str },
    StepFinished { index: usize, step: &'a StepResult },
}

/// Receives a job's output as it arrives and its progress. Called from the job's task: keep it
/// quick and never block on the network.
pub trait JobObserver: Send + Sync {
    fn output(&self, stream: OutputStream, data: &[u8]);
    fn event(&self, _event: JobEvent<'_>) {}
}

/// An observer that ignores everything.
pub struct Discard;

impl JobObserver for Discard {
    fn output(&self, _: OutputStream, _: &[u8]) {}
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
    negotiated: Mutex<Option<Docker>>,
}

/// How long to wait for the engine when negotiating the API version.
const NEGOTIATE_TIMEOUT: Duration = Duration::from_secs(10);

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
        Ok(Executor {
            settings,
            token_keys,
            secret_names,
            allowed_images,
            negotiated: Mutex::new(None),
        })
    }

    pub fn settings(&self) -> &ExecutorSettings {
        &self.settings
    }

    /// The Docker client, negotiated with the engine when it answers (older engines need an older
    /// API version; newer ones refuse very old ones). Until the engine answers, each call tries
    /// again and returns a client whose calls fail with the engine's error.
    pub async fn docker(&self) -> Result<Docker, ExecutorError> {
        if let Some(docker) = self.negotiated_client() {
            return Ok(docker);
        }
        // Not under the lock: a slow or hung engine must not queue every other caller (a
        // health check, the sweep, other jobs) behind this request. Two callers may negotiate
        // at once; both get the same answer and the first stored wins.
        let docker = connect(self.settings.docker.host.as_deref())?;
        match tokio::time::timeout(NEGOTIATE_TIMEOUT, docker.clone().negotiate_version()).await {
            Ok(Ok(docker)) => {
                let mut negotiated = self.negotiated.lock().unwrap_or_else(|e| e.into_inner());
                Ok(negotiated.get_or_insert(docker).clone())
            }
            _ => Ok(docker),
        }
    }

    fn negotiated_client(&self) -> Option<Docker> {
        self.negotiated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// True when the Docker engine answers, at the least cost: a version negotiation that
    /// succeeded already proved it (one request fewer before a one-shot job), else a ping.
    pub async fn reachable(&self) -> bool {
        let _ = self.docker().await;
        if self.negotiated_client().is_some() {
            return true;
        }
        self.ping().await
    }

    /// True when the Docker engine answers a ping.
    pub async fn ping(&self) -> bool {
        let Ok(docker) = self.docker().await else {
            return false;
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(5), docker.ping()).await,
            Ok(Ok(_))
        )
    }

    /// Runs one job to its end and returns its result. Never panics on job input, never leaves
    /// a container or workspace behind.
    pub async fn run(
        &self,
        job: &JobSpec,
        observer: &dyn JobObserver,
        control: &JobControl,
    ) -> JobResult {
        job::run(self, job, observer, control).await
    }
}

fn check_address(address: Option<&str>) -> Result<(), ExecutorError> {
    match address {
        None => Ok(()),
        Some(a)
            if ["unix://", "tcp://", "http://", "/"]
                .iter()
                .any(|p| a.starts_with(p)) =>
        {
            Ok(())
        }
        Some(other) => Err(ExecutorError::Address(other.to_owned())),
    }
}

/// Connects to `address` (`unix://`, `tcp://`, `http://`), else to the platform default
/// (`DOCKER_HOST`, then the local socket).
pub fn connect(address: Option<&str>) -> Result<Docker, ExecutorError> {
    let timeout = 600; // seconds per request: long enough for a pull's slow layers.
    check_address(address)?;
    let result = match address {
        Some(a) if a.starts_with("unix://") => {
            Docker::connect_with_unix(a, timeout, bollard::API_DEFAULT_VERSION)
        }
        Some(a) if a.starts_with("tcp://") || a.starts_with("http://") => {
            Docker::connect_with_http(a, timeout, bollard::API_DEFAULT_VERSION)
        }
        Some(a) if a.starts_with('/') => {
            Docker::connect_with_unix(a, timeout, bollard::API_DEFAULT_VERSION)
        }
        Some(_) | None => Docker::connect_with_local_defaults(),
    };
    result.map_err(|source| ExecutorError::Connect {
        address: address.unwrap_or("the default socket").to_owned(),
        source,
    })
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

    /// An engine that accepts connections and never answers: each negotiation waits its whole
    /// timeout. Callers must not queue behind each other's (4 in a row would take 4 × 10 s).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_do_not_queue_behind_a_hung_negotiation() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let mut settings = Settings::load_from(None, &[], &[]).unwrap();
        settings.docker.host = Some(format!("tcp://{address}"));
        let executor =
            Executor::new(ExecutorSettings::from_settings(&settings, "t".into()).unwrap()).unwrap();
        let clock = std::time::Instant::now();
        let pings = futures_util::future::join_all((0..4).map(|_| executor.ping())).await;
        assert_eq!(pings, [false; 4]);
        // One negotiation (10 s) and one ping (5 s) each, side by side; queued: 40 s and more.
        assert!(
            clock.elapsed() < Duration::from_secs(30),
            "took {:?}",
            clock.elapsed()
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
