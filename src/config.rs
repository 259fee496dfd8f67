//! Settings: every knob the agent has, loaded in one place.
//!
//! Layers, lowest first: built-in defaults < TOML file (`--config PATH`, else
//! `/etc/gryt-agent/agent.toml` when present) < environment < command-line flags. The existing
//! Python agent's variable names (`AGENT_API_KEY`, `AGENT_HOST`, ...) work unchanged; new ones use
//! a `GRYT_` prefix. The environment is mapped by the explicit [`ENV_VARS`] table rather than by a
//! naming rule, so each variable is documented and none is picked up by accident.
//! `config/agent.example.toml` documents every key; keep the two in step.

use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::executor::limits::{
    MAX_SECONDS_CEILING, at_most, bounded_seconds, host_memory_bytes, host_nano_cpus, parse_cpus,
    parse_memory,
};

/// Where the TOML file is looked for when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/gryt-agent/agent.toml";

/// The largest `push.max_queue`: each waiting request holds a connection of the endpoint.
pub const MAX_PUSH_QUEUE: usize = 256;

/// Environment variable → setting key. Lists are comma-separated (`GRYT_AGENT_LABELS=a,b`),
/// except the gryt command, which is split on whitespace.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("AGENT_API_KEY", "api_key"),
    ("AGENT_API_KEY_FILE", "api_key_file"),
    ("AGENT_API_KEY_PREVIOUS", "api_key_previous"),
    ("GRYT_ENCRYPTION_KEY", "encryption_key"),
    ("GRYT_ENCRYPTION_KEY_FILE", "encryption_key_file"),
    ("GRYT_ENCRYPTION_KEY_PREVIOUS", "encryption_key_previous"),
    ("GRYT_API_URL", "api_url"),
    ("GRYT_CONCURRENCY", "concurrency"),
    ("GRYT_ALLOW_INSECURE_HTTP", "allow_insecure_http"),
    ("GRYT_CA_FILE", "ca_file"),
    ("GRYT_LEASE_WAIT", "lease_wait_seconds"),
    ("GRYT_SHUTDOWN_TIMEOUT", "shutdown_timeout_seconds"),
    ("GRYT_METRICS", "metrics"),
    ("GRYT_MIN_FREE_DISK_MB", "min_free_disk_mb"),
    ("GRYT_GC_IMAGES", "docker.gc_images"),
    ("GRYT_GC_TRIGGER_FREE_MB", "disk.gc_trigger_free_mb"),
    ("GRYT_GC_TARGET_FREE_MB", "disk.gc_target_free_mb"),
    ("GRYT_GC_INTERVAL", "disk.gc_interval_seconds"),
    ("GRYT_PUSH", "push.enabled"),
    ("GRYT_CALLBACK_ALLOW", "push.callback_allow"),
    ("GRYT_MAX_BODY_BYTES", "push.max_body_bytes"),
    ("GRYT_PUSH_MAX_QUEUE", "push.max_queue"),
    ("GRYT_SECRET_ENV_PATTERNS", "secret_env_patterns"),
    ("AGENT_HOST", "host"),
    ("AGENT_PORT", "port"),
    ("GRYT_AGENT_ID", "agent_id"),
    ("GRYT_AGENT_LABELS", "labels"),
    ("GRYT_STATE_DIR", "state_dir"),
    ("GRYT_WORK_DIR", "work_dir"),
    ("GRYT_DOCKER_IMAGE", "docker.image"),
    ("GRYT_PULL_POLICY", "docker.pull_policy"),
    ("GRYT_CONTAINER_USER", "docker.user"),
    ("GRYT_NETWORK", "docker.network"),
    ("GRYT_NETWORK_POOL", "docker.network_pool"),
    ("GRYT_PIDS_LIMIT", "docker.pids_limit"),
    ("GRYT_MEMORY_LIMIT", "docker.memory_limit"),
    ("GRYT_CPU_LIMIT", "docker.cpu_limit"),
    ("DOCKER_HOST", "docker.host"),
    ("GRYT_JOB_TIMEOUT", "job.timeout_seconds"),
    ("GRYT_STOP_GRACE", "job.stop_grace_seconds"),
    ("GRYT_OUTPUT_CAP", "job.output_cap_bytes"),
    ("GRYT_COMMAND", "job.gryt_command"),
    ("GRYT_CHECKOUT_TIMEOUT", "checkout.timeout_seconds"),
    ("GRYT_CHECKOUT_MAX_BYTES", "checkout.max_bytes"),
    ("GRYT_ALLOW_FILE_URLS", "checkout.allow_file_urls"),
    (
        "GRYT_CHECKOUT_ALLOW_PRIVATE",
        "checkout.allow_private_hosts",
    ),
    ("GRYT_LOG_GIVE_UP", "log_give_up_seconds"),
    ("GRYT_MAX_JOB_TIMEOUT", "job.max_timeout_seconds"),
    ("GRYT_MAX_SERVICES", "job.max_services"),
    ("GRYT_MAX_MEMORY", "docker.max_memory"),
    ("GRYT_MAX_CPUS", "docker.max_cpus"),
    ("GRYT_ALLOWED_IMAGES", "docker.allowed_images"),
    ("GRYT_STORE_URL", "store.url"),
    ("GRYT_STORE_ENDPOINT", "store.endpoint"),
    ("AWS_REGION", "store.region"),
    ("GRYT_STORE_REGION", "store.region"),
    ("GRYT_STORE_ALLOW_HTTP", "store.allow_http"),
    ("AWS_ACCESS_KEY_ID", "store.access_key_id"),
    ("AWS_SECRET_ACCESS_KEY", "store.secret_access_key"),
    ("AWS_SESSION_TOKEN", "store.session_token"),
    ("GRYT_STORE_MAX_ARTIFACT_BYTES", "store.max_artifact_bytes"),
    ("GRYT_STORE_MAX_CACHE_BYTES", "store.max_cache_bytes"),
    ("GRYT_STORE_PART_SIZE", "store.part_size_bytes"),
    ("GRYT_STORE_RETRIES", "store.retries"),
];

/// Keys whose environment value is a list.
const LIST_KEYS: &[&str] = &[
    "labels",
    "job.gryt_command",
    "push.callback_allow",
    "secret_env_patterns",
    "docker.allowed_images",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// This agent's identity; generated once and kept in `<state_dir>/agent-id` when unset.
    pub agent_id: Option<String>,
    pub labels: Vec<String>,
    pub state_dir: PathBuf,
    /// Where job workspaces are made; `<state_dir>/work` when unset.
    pub work_dir: Option<PathBuf>,
    /// Base URL of the main API; pull mode runs when it is set.
    pub api_url: Option<String>,
    /// Job slots: how many jobs run at once (pull and push share them).
    pub concurrency: usize,
    /// Allow plain `http://` to hosts other than loopback (API and git). Off: HTTPS only.
    pub allow_insecure_http: bool,
    /// Extra PEM CA certificate(s) to trust for HTTPS (a private CA); `SSL_CERT_FILE` works too.
    pub ca_file: Option<PathBuf>,
    /// How long a lease request may be held by the server (long poll).
    pub lease_wait_seconds: u64,
    /// On SIGTERM, how long running jobs may finish before they are cancelled.
    pub shutdown_timeout_seconds: u64,
    /// Serve `GET /metrics`.
    pub metrics: bool,
    /// No new job is taken while the work dir's filesystem has less free space (MiB; 0: off).
    pub min_free_disk_mb: u64,
    /// Local HTTP endpoint address; `0.0.0.0` with push mode, else `127.0.0.1`.
    pub host: Option<String>,
    pub port: u16,
    pub api_key: Option<SecretString>,
    pub api_key_file: Option<PathBuf>,
    pub api_key_previous: Option<SecretString>,
    pub encryption_key: Option<SecretString>,
    pub encryption_key_file: Option<PathBuf>,
    pub encryption_key_previous: Option<SecretString>,
    /// Case-insensitive globs: job environment variables whose names match are masked in output.
    pub secret_env_patterns: Vec<String>,
    pub docker: DockerSettings,
    pub job: JobSettings,
    pub push: PushSettings,
    pub checkout: CheckoutConfig,
    /// Pull mode: how long a job's log may make no progress on the API (answers that take none
    /// of it, or no answer) before the agent stops streaming it and completes the job without
    /// the rest.
    pub log_give_up_seconds: u64,
    /// Disk hygiene: when the agent collects images and leftovers (see `crate::gc`).
    pub disk: DiskSettings,
    pub store: StoreConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushSettings {
    /// Serve `POST /jobs/execute` for the existing API (needs `api_key`, 32+ characters).
    pub enabled: bool,
    /// Hosts a result may be POSTed to as `callback_url` (`host` or `host:port`).
    pub callback_allow: Vec<String>,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Push requests that may wait for a free slot; one more is answered 429.
    pub max_queue: usize,
}

impl Default for PushSettings {
    fn default() -> Self {
        PushSettings {
            enabled: false,
            callback_allow: Vec::new(),
            max_body_bytes: 10 * 1024 * 1024,
            max_queue: 16,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DockerSettings {
    /// Docker engine address (`unix:///...`, `tcp://...`); the platform default when unset.
    pub host: Option<String>,
    /// Default image when neither the job nor the pipeline names one.
    pub image: String,
    pub pull_policy: PullPolicy,
    /// Which images the disk collector may remove: `agent` (only those this agent pulled or
    /// ran), `all` (any unused image: a dedicated host), `off`.
    pub gc_images: GcImages,
    /// `uid[:gid]` the job runs as; never root.
    pub user: String,
    /// `job` (default: a network of its own for every job), `bridge`, `none`, or a named
    /// network; never `host`.
    pub network: String,
    /// IPv4 CIDR, /8 to /24, that `job` networks take a /24 each from (`10.213.0.0/16`).
    pub network_pool: String,
    pub pids_limit: i64,
    /// Default memory limit when the job gives none (`512m`, `2g`).
    pub memory_limit: String,
    /// Default CPU limit when the job gives none (`1.5`).
    pub cpu_limit: String,
    /// Most memory a job may ask for; this machine's memory when unset.
    pub max_memory: Option<String>,
    /// Most CPUs a job may ask for; this machine's CPUs when unset.
    pub max_cpus: Option<String>,
    /// Globs an image name must match to run (`ghcr.io/acme/*`); `*` allows any.
    pub allowed_images: Vec<String>,
}

/// The `[checkout]` section: cloning a job's repository (see `crate::checkout`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckoutConfig {
    pub timeout_seconds: u64,
    /// Cap on the bytes a clone writes into the workspace (pack and files).
    pub max_bytes: u64,
    pub allow_file_urls: bool,
    /// Let `git_url` reach loopback, private (RFC 1918), link-local and unique-local addresses.
    pub allow_private_hosts: bool,
}

impl Default for CheckoutConfig {
    fn default() -> Self {
        CheckoutConfig {
            timeout_seconds: 600,
            max_bytes: 2 * 1024 * 1024 * 1024,
            allow_file_urls: false,
            allow_private_hosts: false,
        }
    }
}

/// The `[store]` section: S3-compatible object storage for artifacts and caches (see
/// `crate::store`). Off while `url` is unset.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `s3://bucket/prefix`: where artifacts and caches go.
    pub url: Option<String>,
    /// Endpoint of an S3-compatible server (MinIO, Garage, Ceph, R2); AWS when unset.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Allow a plain `http://` endpoint (a loopback test server).
    pub allow_http: bool,
    /// Static credentials; without them the instance's role (metadata service) is used.
    pub access_key_id: Option<SecretString>,
    pub secret_access_key: Option<SecretString>,
    pub session_token: Option<SecretString>,
    /// Most bytes one job's artifacts may hold together.
    pub max_artifact_bytes: u64,
    /// Most bytes one cache may hold (files before compression, and the archive).
    pub max_cache_bytes: u64,
    /// Size of each part of a multipart upload (S3: 5 MiB at least).
    pub part_size_bytes: u64,
    /// Retries of each request (each part of an upload on its own).
    pub retries: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: None,
            endpoint: None,
            region: None,
            allow_http: false,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            max_artifact_bytes: 1024 * 1024 * 1024,
            max_cache_bytes: 2 * 1024 * 1024 * 1024,
            part_size_bytes: 8 * 1024 * 1024,
            retries: 5,
        }
    }
}

/// S3's smallest part (except the last) and the largest the agent holds in memory.
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
pub const MAX_PART_SIZE: u64 = 256 * 1024 * 1024;

impl StoreConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.url {
            let bucket = url
                .strip_prefix("s3://")
                .map(|rest| rest.split('/').next().unwrap_or(""))
                .unwrap_or("");
            if bucket.is_empty() {
                return Err(key_error("store.url", "must be `s3://bucket[/prefix]`"));
            }
        }
        if let Some(endpoint) = &self.endpoint {
            if endpoint.starts_with("http://") {
                if !self.allow_http {
                    return Err(key_error(
                        "store.endpoint",
                        "is plain http://: set store.allow_http (for a loopback test server only)",
                    ));
                }
            } else if !endpoint.starts_with("https://") {
                return Err(key_error("store.endpoint", "must be an https:// URL"));
            }
        }
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&self.part_size_bytes) {
            return Err(key_error(
                "store.part_size_bytes",
                format!("must be between {MIN_PART_SIZE} and {MAX_PART_SIZE}"),
            ));
        }
        if self.max_artifact_bytes == 0 || self.max_cache_bytes == 0 {
            return Err(key_error(
                "store.max_artifact_bytes",
                "store.max_artifact_bytes and store.max_cache_bytes must be at least 1",
            ));
        }
        if self.retries > 20 {
            return Err(key_error("store.retries", "must be at most 20"));
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return Err(key_error(
                "store.access_key_id",
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY go together",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    IfNotPresent,
    Always,
    Never,
}

/// Which images the disk collector may remove (`docker.gc_images`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GcImages {
    Agent,
    All,
    Off,
}

/// The `[disk]` section: the free-space marks of the disk collector, in MiB of free space on
/// Docker's data root and the work dir. Below `gc_trigger_free_mb` (the high-water mark of use)
/// the agent removes unused images and its own leftovers until `gc_target_free_mb` (the
/// low-water mark) is free again.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiskSettings {
    /// Collect when free space falls below this (MiB; 0: never for space, leftovers still go).
    pub gc_trigger_free_mb: u64,
    /// Stop collecting once this much is free (MiB); at least `gc_trigger_free_mb`.
    pub gc_target_free_mb: u64,
    /// Time between checks of the free space.
    pub gc_interval_seconds: u64,
}

impl Default for DiskSettings {
    fn default() -> Self {
        DiskSettings {
            gc_trigger_free_mb: 5 * 1024,
            gc_target_free_mb: 10 * 1024,
            gc_interval_seconds: 300,
        }
    }
}

/// The largest `job.max_services` accepted: each service is a container with limits of its own.
pub const MAX_SERVICES_SETTING: usize = 64;

/// The largest free-space mark accepted (MiB): 1 EiB, far beyond any disk, and its bytes fit a u64.
pub const MAX_DISK_MARK_MB: u64 = 1 << 40;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobSettings {
    /// Time limit for a job that sets none.
    pub timeout_seconds: u64,
    /// How long a stopped job gets after SIGTERM before it is killed.
    pub stop_grace_seconds: u64,
    /// Bytes of stdout and of stderr kept for the result (the tail is kept).
    pub output_cap_bytes: usize,
    /// Command that runs a gryt pipeline, in `/workspace`.
    pub gryt_command: Vec<String>,
    /// Longest time limit a job or step may ask for (`timeout_seconds`); longer is refused.
    pub max_timeout_seconds: u64,
    /// Most service containers one job may have (`services`); 0 refuses every job with one.
    pub max_services: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            agent_id: None,
            labels: Vec::new(),
            state_dir: default_state_dir(),
            work_dir: None,
            api_url: None,
            concurrency: 1,
            allow_insecure_http: false,
            ca_file: None,
            lease_wait_seconds: 25,
            shutdown_timeout_seconds: 600,
            metrics: true,
            min_free_disk_mb: 1024,
            host: None,
            port: 8080,
            api_key: None,
            api_key_file: None,
            api_key_previous: None,
            encryption_key: None,
            encryption_key_file: None,
            encryption_key_previous: None,
            secret_env_patterns: crate::secrets::mask::DEFAULT_SECRET_ENV_PATTERNS
                .iter()
                .map(|p| p.to_string())
                .collect(),
            docker: DockerSettings::default(),
            job: JobSettings::default(),
            push: PushSettings::default(),
            checkout: CheckoutConfig::default(),
            log_give_up_seconds: 60,
            disk: DiskSettings::default(),
            store: StoreConfig::default(),
        }
    }
}

impl Default for DockerSettings {
    fn default() -> Self {
        DockerSettings {
            host: None,
            image: "ghcr.io/epyklab/gryt/pipeline:latest".into(),
            pull_policy: PullPolicy::IfNotPresent,
            gc_images: GcImages::Agent,
            user: "1000:1000".into(),
            network: crate::executor::pool::MODE_JOB.into(),
            network_pool: crate::executor::pool::DEFAULT_POOL.into(),
            pids_limit: 1024,
            memory_limit: "2g".into(),
            cpu_limit: "2".into(),
            max_memory: None,
            max_cpus: None,
            allowed_images: vec!["*".into()],
        }
    }
}

impl Default for JobSettings {
    fn default() -> Self {
        JobSettings {
            timeout_seconds: 3600,
            stop_grace_seconds: 10,
            output_cap_bytes: 1024 * 1024,
            gryt_command: vec!["gryt".into(), "run".into(), "pipeline.py".into()],
            max_timeout_seconds: 24 * 3600,
            max_services: 4,
        }
    }
}

/// `/var/lib/gryt-agent` for root (a system service), else a per-user state directory; empty
/// (refused by `validate`) when neither is known.
fn default_state_dir() -> PathBuf {
    state_dir_for(
        is_root(),
        std::env::var_os("XDG_STATE_HOME"),
        std::env::var_os("HOME"),
    )
}

/// Never a shared path such as `/tmp/gryt-agent`: another local user could create it first (or
/// a symlink in its place) and read or plant spooled results. Without a home the operator must
/// say where (`state_dir`).
fn state_dir_for(
    root: bool,
    xdg_state_home: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> PathBuf {
    if root {
        return PathBuf::from("/var/lib/gryt-agent");
    }
    if let Some(state) = xdg_state_home.filter(|v| !v.is_empty()) {
        return PathBuf::from(state).join("gryt-agent");
    }
    match home.filter(|v| !v.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/state/gryt-agent"),
        None => PathBuf::new(),
    }
}

fn is_root() -> bool {
    // SAFETY-free check: the effective uid via /proc avoids a libc dependency.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("invalid setting `{key}`: {message}")]
    Key { key: String, message: String },
}

fn key_error(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key: key.to_owned(),
        message: message.into(),
    }
}

impl Settings {
    /// Loads the layers: `file` (or the default path when present), then the process environment,
    /// then `overrides` (flags) as `(key, value)` pairs.
    pub fn load(file: Option<&Path>, overrides: &[(&str, String)]) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = ENV_VARS
            .iter()
            .filter_map(|(var, _)| std::env::var(var).ok().map(|v| (var.to_string(), v)))
            .collect();
        Self::load_from(file, &env, overrides)
    }

    /// [`Settings::load`] with the environment given explicitly (tests, and no global state).
    pub fn load_from(
        file: Option<&Path>,
        env: &[(String, String)],
        overrides: &[(&str, String)],
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        let default_path = Path::new(DEFAULT_CONFIG_PATH);
        let file = file.or_else(|| default_path.exists().then_some(default_path));
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::File {
                path: path.to_owned(),
                source,
            })?;
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        for (var, value) in env {
            let Some((_, key)) = ENV_VARS.iter().find(|(v, _)| v == var) else {
                continue;
            };
            builder = set(builder, key, value).map_err(|e| key_error(var, e.to_string()))?;
        }
        for (key, value) in overrides {
            builder = set(builder, key, value).map_err(|e| key_error(key, e.to_string()))?;
        }
        let settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::Invalid(with_origin(e.to_string(), env, overrides)))?;
        let mut settings = settings;
        settings.fit_defaults_to_host();
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let d = &self.docker;
        if d.image.trim().is_empty() {
            return Err(key_error("docker.image", "must not be empty"));
        }
        let memory = parse_memory(&d.memory_limit)
            .map_err(|e| key_error("docker.memory_limit", e.to_string()))?;
        let cpus =
            parse_cpus(&d.cpu_limit).map_err(|e| key_error("docker.cpu_limit", e.to_string()))?;
        let (max_memory, max_memory_text) = d.max_memory_bytes()?;
        at_most(
            "docker.memory_limit",
            &d.memory_limit,
            memory,
            max_memory,
            "docker.max_memory",
            &max_memory_text,
        )
        .map_err(|e| key_error("docker.memory_limit", e.to_string()))?;
        let (max_cpus, max_cpus_text) = d.max_nano_cpus()?;
        at_most(
            "docker.cpu_limit",
            &d.cpu_limit,
            cpus,
            max_cpus,
            "docker.max_cpus",
            &max_cpus_text,
        )
        .map_err(|e| key_error("docker.cpu_limit", e.to_string()))?;
        let allowed = image_globs(&d.allowed_images)?;
        if !allowed.is_match(&d.image) {
            return Err(key_error(
                "docker.image",
                format!(
                    "`{}` is not in docker.allowed_images {:?}",
                    d.image, d.allowed_images
                ),
            ));
        }
        parse_user(&d.user).map_err(|e| key_error("docker.user", e))?;
        if d.pids_limit <= 0 {
            return Err(key_error("docker.pids_limit", "must be at least 1"));
        }
        if d.network.trim().is_empty() || d.network == "host" {
            return Err(key_error(
                "docker.network",
                "must be `job`, `bridge`, `none` or a named network (not `host`)",
            ));
        }
        d.network_pool()?;
        let j = &self.job;
        if j.max_timeout_seconds == 0 {
            return Err(key_error("job.max_timeout_seconds", "must be at least 1"));
        }
        if j.timeout_seconds == 0 {
            return Err(key_error("job.timeout_seconds", "must be at least 1"));
        }
        // Every duration of the settings that feeds a clock, bounded in one place.
        let ceiling = MAX_SECONDS_CEILING;
        let durations = [
            (
                "job.max_timeout_seconds",
                j.max_timeout_seconds,
                ceiling,
                "its ceiling",
            ),
            (
                "job.timeout_seconds",
                j.timeout_seconds,
                j.max_timeout_seconds,
                "job.max_timeout_seconds",
            ),
            (
                "job.stop_grace_seconds",
                j.stop_grace_seconds,
                ceiling,
                "its ceiling",
            ),
            (
                "shutdown_timeout_seconds",
                self.shutdown_timeout_seconds,
                ceiling,
                "its ceiling",
            ),
            (
                "checkout.timeout_seconds",
                self.checkout.timeout_seconds,
                ceiling,
                "its ceiling",
            ),
        ];
        for (key, value, limit, limit_name) in durations {
            bounded_seconds(key, value, limit, limit_name)
                .map_err(|e| key_error(key, e.to_string()))?;
        }
        // Handed to gix as a signed allocation limit, where 0 would mean none.
        if !(1..=i64::MAX as u64).contains(&self.checkout.max_bytes) {
            return Err(key_error(
                "checkout.max_bytes",
                format!("must be between 1 and {}", i64::MAX),
            ));
        }
        if j.max_services > MAX_SERVICES_SETTING {
            return Err(key_error(
                "job.max_services",
                format!("must be at most {MAX_SERVICES_SETTING}"),
            ));
        }
        if j.output_cap_bytes < 1024 {
            return Err(key_error("job.output_cap_bytes", "must be at least 1024"));
        }
        if j.gryt_command.is_empty() || j.gryt_command[0].is_empty() {
            return Err(key_error("job.gryt_command", "must name a command"));
        }
        if !(1..=256).contains(&self.concurrency) {
            return Err(key_error("concurrency", "must be between 1 and 256"));
        }
        if self.lease_wait_seconds > 300 {
            return Err(key_error("lease_wait_seconds", "must be at most 300"));
        }
        if self.push.max_body_bytes < 1024 {
            return Err(key_error("push.max_body_bytes", "must be at least 1024"));
        }
        if self.push.max_queue > MAX_PUSH_QUEUE {
            return Err(key_error(
                "push.max_queue",
                format!("must be at most {MAX_PUSH_QUEUE}"),
            ));
        }
        for pattern in &self.secret_env_patterns {
            crate::secrets::mask::glob(pattern)
                .map_err(|e| key_error("secret_env_patterns", format!("`{pattern}`: {e}")))?;
        }
        if self.state_dir.as_os_str().is_empty() {
            return Err(key_error(
                "state_dir",
                "no default without HOME or XDG_STATE_HOME (and no shared /tmp fallback): \
                 set GRYT_STATE_DIR to a directory only this agent's user can write",
            ));
        }
        if !(5..=3600).contains(&self.log_give_up_seconds) {
            return Err(key_error(
                "log_give_up_seconds",
                "must be between 5 and 3600",
            ));
        }
        if self.checkout.timeout_seconds == 0 {
            return Err(key_error("checkout.timeout_seconds", "must be at least 1"));
        }
        self.validate_disk()?;
        self.store.validate()?;
        if let Some(id) = &self.agent_id
            && !valid_agent_id(id)
        {
            return Err(key_error(
                "agent_id",
                "use 1-64 characters from [A-Za-z0-9._-]",
            ));
        }
        Ok(())
    }

    fn validate_disk(&self) -> Result<(), ConfigError> {
        let d = &self.disk;
        for (key, value) in [
            ("disk.gc_trigger_free_mb", d.gc_trigger_free_mb),
            ("disk.gc_target_free_mb", d.gc_target_free_mb),
        ] {
            if value > MAX_DISK_MARK_MB {
                return Err(key_error(
                    key,
                    format!("must be at most {MAX_DISK_MARK_MB}"),
                ));
            }
        }
        if d.gc_target_free_mb < d.gc_trigger_free_mb {
            return Err(key_error(
                "disk.gc_target_free_mb",
                format!(
                    "must be at least disk.gc_trigger_free_mb ({})",
                    d.gc_trigger_free_mb
                ),
            ));
        }
        if !(10..=86_400).contains(&d.gc_interval_seconds) {
            return Err(key_error(
                "disk.gc_interval_seconds",
                "must be between 10 and 86400",
            ));
        }
        Ok(())
    }

    /// Lowers the built-in memory and CPU defaults to this machine's size when it is smaller
    /// and no maximum is set, so a small host starts with the defaults instead of refusing them.
    fn fit_defaults_to_host(&mut self) {
        let builtin = DockerSettings::default();
        let d = &mut self.docker;
        if d.max_memory.is_none()
            && d.memory_limit == builtin.memory_limit
            && let (Some(host), Ok(default)) = (host_memory_bytes(), parse_memory(&d.memory_limit))
            && host < default
        {
            d.memory_limit = host.to_string();
        }
        if d.max_cpus.is_none()
            && d.cpu_limit == builtin.cpu_limit
            && let Ok(default) = parse_cpus(&d.cpu_limit)
            && host_nano_cpus() < default
        {
            d.cpu_limit = (host_nano_cpus() / 1_000_000_000).to_string();
        }
    }

    pub fn work_dir(&self) -> PathBuf {
        self.work_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("work"))
    }

    /// The API key: `api_key`, else the contents of `api_key_file` (trailing newline trimmed).
    pub fn api_key(&self) -> Result<Option<SecretString>, ConfigError> {
        secret_or_file(&self.api_key, &self.api_key_file, "api_key_file")
    }

    /// The token encryption key: `encryption_key`, else the contents of `encryption_key_file`.
    pub fn encryption_key(&self) -> Result<Option<SecretString>, ConfigError> {
        secret_or_file(
            &self.encryption_key,
            &self.encryption_key_file,
            "encryption_key_file",
        )
    }
}

fn secret_or_file(
    value: &Option<SecretString>,
    file: &Option<PathBuf>,
    file_key: &str,
) -> Result<Option<SecretString>, ConfigError> {
    if let Some(v) = value.as_ref().filter(|v| !v.expose_secret().is_empty()) {
        return Ok(Some(v.clone()));
    }
    let Some(path) = file else { return Ok(None) };
    let text = std::fs::read_to_string(path)
        .map_err(|e| key_error(file_key, format!("cannot read {}: {e}", path.display())))?;
    Ok(Some(SecretString::from(
        text.trim_end_matches(['\n', '\r']).to_owned(),
    )))
}

/// Adds where a bad value came from, so the user knows which variable or flag to fix.
fn with_origin(message: String, env: &[(String, String)], overrides: &[(&str, String)]) -> String {
    let mentions = |key: &str| message.contains(&format!("`{key}`"));
    if let Some((key, _)) = overrides.iter().find(|(k, _)| mentions(k)) {
        return format!("{message} (set by the command-line flag for `{key}`)");
    }
    let from_env = ENV_VARS
        .iter()
        .find(|(var, key)| mentions(key) && env.iter().any(|(v, _)| v == var));
    match from_env {
        Some((var, _)) => format!("{message} (set by the environment variable {var})"),
        None => message,
    }
}

fn set(
    builder: config::ConfigBuilder<config::builder::DefaultState>,
    key: &str,
    value: &str,
) -> Result<config::ConfigBuilder<config::builder::DefaultState>, config::ConfigError> {
    if LIST_KEYS.contains(&key) {
        let items: Vec<String> = if key == "job.gryt_command" {
            value.split_whitespace().map(str::to_owned).collect()
        } else {
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        };
        builder.set_override(key, items)
    } else {
        builder.set_override(key, value)
    }
}

impl DockerSettings {
    /// The most memory a job may have, in bytes and as written: `max_memory`, else this
    /// machine's memory.
    pub fn max_memory_bytes(&self) -> Result<(i64, String), ConfigError> {
        match &self.max_memory {
            Some(text) => parse_memory(text)
                .map(|b| (b, text.clone()))
                .map_err(|e| key_error("docker.max_memory", e.to_string())),
            None => host_memory_bytes()
                .map(|b| (b, format!("{b} bytes (this machine's memory)")))
                .ok_or_else(|| {
                    key_error(
                        "docker.max_memory",
                        "this machine's memory is unknown (no /proc/meminfo): set it",
                    )
                }),
        }
    }

    /// The most CPUs a job may have, in NanoCPUs and as written: `max_cpus`, else this
    /// machine's CPUs.
    /// `network_pool` parsed: an IPv4 CIDR from /8 to /24.
    pub fn network_pool(&self) -> Result<crate::executor::pool::Pool, ConfigError> {
        self.network_pool
            .parse()
            .map_err(|e: String| key_error("docker.network_pool", e))
    }

    pub fn max_nano_cpus(&self) -> Result<(i64, String), ConfigError> {
        match &self.max_cpus {
            Some(text) => parse_cpus(text)
                .map(|n| (n, text.clone()))
                .map_err(|e| key_error("docker.max_cpus", e.to_string())),
            None => {
                let n = host_nano_cpus();
                Ok((n, format!("{} (this machine's CPUs)", n / 1_000_000_000)))
            }
        }
    }
}

/// The `allowed_images` globs as one set; an invalid glob is an error naming it.
pub fn image_globs(patterns: &[String]) -> Result<globset::GlobSet, ConfigError> {
    let mut set = globset::GlobSetBuilder::new();
    for pattern in patterns {
        let glob = globset::Glob::new(pattern)
            .map_err(|e| key_error("docker.allowed_images", format!("`{pattern}`: {e}")))?;
        set.add(glob);
    }
    set.build()
        .map_err(|e| key_error("docker.allowed_images", e.to_string()))
}

/// Agent ids go into container labels, file names and URLs: keep them plain.
pub fn valid_agent_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Parses `uid[:gid]` (numeric); refuses root, since jobs never run as root.
pub fn parse_user(user: &str) -> Result<(u32, u32), String> {
    let (uid, gid) = user.split_once(':').unwrap_or((user, user));
    let uid: u32 = uid
        .parse()
        .map_err(|_| format!("`{user}` is not numeric `uid[:gid]`"))?;
    let gid: u32 = gid
        .parse()
        .map_err(|_| format!("`{user}` is not numeric `uid[:gid]`"))?;
    if uid == 0 {
        return Err("jobs never run as root (uid 0)".into());
    }
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "port = 9000\n[docker]\nimage = \"from-file\"\nnetwork = \"none\"\n",
        )
        .unwrap();
        let s = Settings::load_from(
            Some(&file),
            &env(&[
                ("GRYT_DOCKER_IMAGE", "from-env"),
                ("GRYT_AGENT_LABELS", "linux, x86 ,"),
                ("AGENT_PORT", "9100"),
            ]),
            &[("docker.image", "from-flag".into())],
        )
        .unwrap();
        assert_eq!(s.docker.image, "from-flag");
        assert_eq!(s.docker.network, "none");
        assert_eq!(s.port, 9100);
        assert_eq!(s.labels, ["linux", "x86"]);
        assert_eq!(s.job.timeout_seconds, 3600);
    }

    #[test]
    fn invalid_values_name_the_key() {
        let err =
            Settings::load_from(None, &env(&[("GRYT_JOB_TIMEOUT", "soon")]), &[]).unwrap_err();
        assert!(err.to_string().contains("job.timeout_seconds"), "{err}");
        let err =
            Settings::load_from(None, &env(&[("GRYT_MEMORY_LIMIT", "lots")]), &[]).unwrap_err();
        assert!(err.to_string().contains("docker.memory_limit"), "{err}");
        let err =
            Settings::load_from(None, &env(&[("GRYT_CONTAINER_USER", "0:0")]), &[]).unwrap_err();
        assert!(err.to_string().contains("docker.user"), "{err}");
        let err = Settings::load_from(None, &[], &[("docker.pull_policy", "sometimes".into())])
            .unwrap_err();
        assert!(err.to_string().contains("pull_policy"), "{err}");
        let err =
            Settings::load_from(None, &env(&[("GRYT_PUSH_MAX_QUEUE", "257")]), &[]).unwrap_err();
        assert!(err.to_string().contains("push.max_queue"), "{err}");
        let s = Settings::load_from(None, &env(&[("GRYT_PUSH_MAX_QUEUE", "0")]), &[]).unwrap();
        assert_eq!(s.push.max_queue, 0);
    }

    #[test]
    fn the_example_file_is_valid_and_documents_every_variable() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/agent.example.toml");
        Settings::load_from(Some(Path::new(example)), &[], &[]).unwrap();
        let text = std::fs::read_to_string(example).unwrap();
        for (var, _) in ENV_VARS {
            assert!(
                text.contains(var),
                "config/agent.example.toml does not mention {var}"
            );
        }
    }

    #[test]
    fn secret_env_patterns_from_env_and_validated() {
        let s = Settings::load_from(None, &[], &[]).unwrap();
        assert_eq!(
            s.secret_env_patterns,
            ["*TOKEN*", "*SECRET*", "*PASSWORD*", "*KEY*"]
        );
        let s = Settings::load_from(
            None,
            &env(&[("GRYT_SECRET_ENV_PATTERNS", "*TOKEN*, DEPLOY_*,")]),
            &[],
        )
        .unwrap();
        assert_eq!(s.secret_env_patterns, ["*TOKEN*", "DEPLOY_*"]);
        let err = Settings::load_from(None, &env(&[("GRYT_SECRET_ENV_PATTERNS", "a[")]), &[])
            .unwrap_err();
        assert!(err.to_string().contains("secret_env_patterns"), "{err}");
    }

    #[test]
    fn no_shared_temp_dir_fallback_for_the_state_dir() {
        assert_eq!(
            state_dir_for(false, None, Some("/home/ci".into())),
            Path::new("/home/ci/.local/state/gryt-agent")
        );
        assert_eq!(
            state_dir_for(true, None, None),
            Path::new("/var/lib/gryt-agent")
        );
        let none = state_dir_for(false, None, Some("".into()));
        assert_eq!(none, PathBuf::new());
        assert!(!none.starts_with(std::env::temp_dir()));
        let err = Settings::load_from(None, &env(&[("GRYT_STATE_DIR", "")]), &[]).unwrap_err();
        assert!(err.to_string().contains("GRYT_STATE_DIR"), "{err}");
        let err = Settings::load_from(None, &env(&[("GRYT_LOG_GIVE_UP", "0")]), &[]).unwrap_err();
        assert!(err.to_string().contains("log_give_up_seconds"), "{err}");
    }

    #[test]
    fn durations_and_limits_above_their_maximum_are_refused_naming_both() {
        let err = Settings::load_from(None, &env(&[("GRYT_JOB_TIMEOUT", "86401")]), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("job.timeout_seconds") && err.contains("job.max_timeout_seconds = 86400"),
            "{err}"
        );
        let s = Settings::load_from(
            None,
            &env(&[
                ("GRYT_JOB_TIMEOUT", "86401"),
                ("GRYT_MAX_JOB_TIMEOUT", "90000"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(s.job.max_timeout_seconds, 90000);
        for (var, key) in [
            ("GRYT_STOP_GRACE", "job.stop_grace_seconds"),
            ("GRYT_SHUTDOWN_TIMEOUT", "shutdown_timeout_seconds"),
            ("GRYT_CHECKOUT_TIMEOUT", "checkout.timeout_seconds"),
            ("GRYT_MAX_JOB_TIMEOUT", "job.max_timeout_seconds"),
        ] {
            let err = Settings::load_from(None, &env(&[(var, "18446744073709551615")]), &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{var}: {err}");
        }
        let err = Settings::load_from(
            None,
            &env(&[("GRYT_MEMORY_LIMIT", "4g"), ("GRYT_MAX_MEMORY", "1g")]),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("docker.memory_limit") && err.contains("docker.max_memory = 1g"),
            "{err}"
        );
        let err = Settings::load_from(None, &env(&[("GRYT_CPU_LIMIT", "4096")]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("docker.max_cpus"), "{err}");
        let err = Settings::load_from(
            None,
            &env(&[
                ("GRYT_CPU_LIMIT", "1"),
                ("GRYT_MAX_CPUS", "1.5"),
                ("GRYT_MAX_MEMORY", "lots"),
            ]),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("docker.max_memory"), "{err}");
    }

    #[test]
    fn store_settings_are_bounded_and_name_the_key() {
        let s = Settings::load_from(
            None,
            &env(&[
                ("GRYT_STORE_URL", "s3://bucket/prefix"),
                ("GRYT_STORE_ENDPOINT", "http://127.0.0.1:3900"),
                ("GRYT_STORE_ALLOW_HTTP", "true"),
                ("AWS_ACCESS_KEY_ID", "GKid"),
                ("AWS_SECRET_ACCESS_KEY", "visible-store-secret"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(s.store.url.as_deref(), Some("s3://bucket/prefix"));
        assert!(!format!("{s:?}").contains("visible-store-secret"));
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("GRYT_STORE_URL", "https://bucket")], "store.url"),
            (&[("GRYT_STORE_URL", "s3://")], "store.url"),
            (
                &[("GRYT_STORE_ENDPOINT", "http://minio:9000")],
                "store.endpoint",
            ),
            (&[("GRYT_STORE_ENDPOINT", "minio:9000")], "store.endpoint"),
            (&[("GRYT_STORE_PART_SIZE", "1024")], "store.part_size_bytes"),
            (
                &[("GRYT_STORE_PART_SIZE", "99999999999")],
                "store.part_size_bytes",
            ),
            (&[("GRYT_STORE_RETRIES", "1000")], "store.retries"),
            (
                &[("GRYT_STORE_MAX_CACHE_BYTES", "0")],
                "store.max_cache_bytes",
            ),
            (&[("AWS_ACCESS_KEY_ID", "GKid")], "store.access_key_id"),
        ];
        for (vars, key) in cases {
            let err = Settings::load_from(None, &env(vars), &[]).unwrap_err();
            assert!(err.to_string().contains(key), "{vars:?}: {err}");
        }
    }

    #[test]
    fn allowed_images_are_globs_and_the_default_image_must_match() {
        let s = Settings::load_from(None, &[], &[]).unwrap();
        assert_eq!(s.docker.allowed_images, ["*"]);
        let s = Settings::load_from(
            None,
            &env(&[
                ("GRYT_ALLOWED_IMAGES", "ghcr.io/acme/*, alpine:*"),
                ("GRYT_DOCKER_IMAGE", "alpine:3"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(s.docker.allowed_images, ["ghcr.io/acme/*", "alpine:*"]);
        let err = Settings::load_from(
            None,
            &env(&[("GRYT_ALLOWED_IMAGES", "ghcr.io/acme/*")]),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("docker.image") && err.contains("allowed_images"),
            "{err}"
        );
        let err = Settings::load_from(None, &env(&[("GRYT_ALLOWED_IMAGES", "a[")]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("docker.allowed_images"), "{err}");
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, "[docker]\nimgae = \"typo\"\n").unwrap();
        let err = Settings::load_from(Some(&file), &[], &[]).unwrap_err();
        assert!(err.to_string().contains("imgae"), "{err}");
    }

    #[test]
    fn api_key_from_a_file_and_never_in_debug() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("key");
        std::fs::write(&key_file, "k3y-from-file-0123456789abcdef0123\n").unwrap();
        let s = Settings::load_from(
            None,
            &env(&[("AGENT_API_KEY_FILE", key_file.to_str().unwrap())]),
            &[],
        )
        .unwrap();
        assert_eq!(
            s.api_key().unwrap().unwrap().expose_secret(),
            "k3y-from-file-0123456789abcdef0123"
        );
        let s =
            Settings::load_from(None, &env(&[("AGENT_API_KEY", "visible-secret")]), &[]).unwrap();
        assert!(!format!("{s:?}").contains("visible-secret"));
    }

    #[test]
    fn disk_collection_settings_from_env_and_bounded() {
        let s = Settings::load_from(None, &[], &[]).unwrap();
        assert_eq!(s.docker.gc_images, GcImages::Agent);
        assert!(s.disk.gc_trigger_free_mb <= s.disk.gc_target_free_mb);
        let s = Settings::load_from(
            None,
            &env(&[
                ("GRYT_GC_IMAGES", "all"),
                ("GRYT_GC_TRIGGER_FREE_MB", "100"),
                ("GRYT_GC_TARGET_FREE_MB", "200"),
                ("GRYT_GC_INTERVAL", "60"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(s.docker.gc_images, GcImages::All);
        assert_eq!(
            (s.disk.gc_trigger_free_mb, s.disk.gc_target_free_mb),
            (100, 200)
        );
        assert_eq!(s.disk.gc_interval_seconds, 60);
        for (var, value, key) in [
            ("GRYT_GC_IMAGES", "some", "gc_images"),
            ("GRYT_GC_TARGET_FREE_MB", "10", "disk.gc_target_free_mb"),
            (
                "GRYT_GC_TRIGGER_FREE_MB",
                "99999999999999",
                "disk.gc_trigger_free_mb",
            ),
            ("GRYT_GC_INTERVAL", "0", "disk.gc_interval_seconds"),
        ] {
            let err = Settings::load_from(None, &env(&[(var, value)]), &[]).unwrap_err();
            assert!(err.to_string().contains(key), "{var}={value}: {err}");
        }
    }
}
