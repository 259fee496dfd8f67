//! The `Executor` itself: settings, Docker connection (lazily negotiated), the observer
//! interface, and the entry point that hands one job to `job.rs`.

use std::path::PathBuf;
use std::time::Duration;

use bollard::Docker;
use tokio::sync::Mutex;

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
            work_dir: settings.work_dir(),
            docker: settings.docker.clone(),
            job: settings.job.clone(),
            checkout: CheckoutSettings::from_settings(settings),
            secret_env_patterns: settings.secret_env_patterns.clone(),
            encryption_key,
            encryption_key_previous: settings.encryption_key_previous.clone(),
            agent_secrets,
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
    /// The client after API version negotiation. Made lazily, so the agent starts while the
    /// engine is down (or its socket does not exist yet) and picks it up when it comes back.
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
        Ok(Executor {
            settings,
            token_keys,
            secret_names,
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
        let mut negotiated = self.negotiated.lock().await;
        if let Some(docker) = negotiated.as_ref() {
            return Ok(docker.clone());
        }
        let docker = connect(self.settings.docker.host.as_deref())?;
        match tokio::time::timeout(NEGOTIATE_TIMEOUT, docker.clone().negotiate_version()).await {
            Ok(Ok(docker)) => {
                *negotiated = Some(docker.clone());
                Ok(docker)
            }
            _ => Ok(docker),
        }
    }

    /// True when the Docker engine answers, at the least cost: a version negotiation that
    /// succeeded already proved it (one request fewer before a one-shot job), else a ping.
    pub async fn reachable(&self) -> bool {
        let _ = self.docker().await;
        if self.negotiated.lock().await.is_some() {
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

    #[test]
    fn a_blank_previous_key_alone_is_no_key_at_all() {
        let mut settings = Settings::load_from(None, &[], &[]).unwrap();
        settings.encryption_key_previous = Some(SecretString::from("  "));
        let executor_settings = ExecutorSettings::from_settings(&settings, "t".into()).unwrap();
        assert!(Executor::new(executor_settings).is_ok());
    }
}
