//! Every setting, declared once: its section, field, type, default, environment variables, flag
//! and doc (see [`settings!`](super::declare)). `config/agent.example.toml` shows each one too;
//! a test keeps the two in step.

use std::path::PathBuf;

use secrecy::SecretString;
use serde::Deserialize;

use super::declare::{Value, settings};
use super::values::{DEFAULT_SECRET_ENV_PATTERNS, default_state_dir};

settings! {
    /// All the settings: the top-level keys, then one nested struct per `[section]`.
    pub struct Settings ("") {
        /// This agent's identity; generated once and kept in `<state_dir>/agent-id` when unset.
        agent_id: Option<String> = None, env "GRYT_AGENT_ID", flag "agent-id" "ID";
        /// Labels sent with lease requests (comma-separated in the environment and the flag).
        labels: Vec<String> = Vec::new(), env "GRYT_AGENT_LABELS", flag "labels" "A,B";
        /// State directory (agent id, result spool): `/var/lib/gryt-agent` for root, else a
        /// per-user one; never a shared `/tmp` path.
        state_dir: PathBuf = default_state_dir(), env "GRYT_STATE_DIR", flag "state-dir" "DIR";
        /// Where job workspaces are made; `<state_dir>/work` when unset.
        work_dir: Option<PathBuf> = None, env "GRYT_WORK_DIR";
        /// Base URL of the main API; pull mode runs when it is set.
        api_url: Option<String> = None, env "GRYT_API_URL", flag "api-url" "URL";
        /// Job slots: how many jobs run at once (pull and push share them).
        concurrency: usize = 1, env "GRYT_CONCURRENCY", flag "concurrency" "N";
        /// Allow plain `http://` to hosts other than loopback (API and git). Off: HTTPS only.
        allow_insecure_http: bool = false, env "GRYT_ALLOW_INSECURE_HTTP";
        /// Extra PEM CA certificate(s) to trust for HTTPS (a private CA); `SSL_CERT_FILE` works
        /// too.
        ca_file: Option<PathBuf> = None, env "GRYT_CA_FILE";
        /// How long a lease request may be held by the server (long poll).
        lease_wait_seconds: u64 = 25, env "GRYT_LEASE_WAIT";
        /// On SIGTERM, how long running jobs may finish before they are cancelled.
        shutdown_timeout_seconds: u64 = 600, env "GRYT_SHUTDOWN_TIMEOUT";
        /// Serve `GET /metrics`.
        metrics: bool = true, env "GRYT_METRICS";
        /// No new job is taken while the work dir's filesystem has less free space (MiB; 0: off).
        min_free_disk_mb: u64 = 1024, env "GRYT_MIN_FREE_DISK_MB";
        /// Local HTTP endpoint address; `0.0.0.0` with push mode, else `127.0.0.1`.
        host: Option<String> = None, env "AGENT_HOST", flag "host" "HOST";
        /// Port of the local HTTP endpoint.
        port: u16 = 8080, env "AGENT_PORT", flag "port" "PORT";
        /// Push: the key the API sends (32+ characters); pull: the agent's key.
        api_key: Option<SecretString> = None, env "AGENT_API_KEY";
        /// A file holding `api_key` (systemd credentials, Kubernetes secrets).
        api_key_file: Option<PathBuf> = None, env "AGENT_API_KEY_FILE";
        /// Also accepted while keys rotate (push; 32+ characters too).
        api_key_previous: Option<SecretString> = None, env "AGENT_API_KEY_PREVIOUS";
        /// The API's token encryption key (32 bytes, base64).
        encryption_key: Option<SecretString> = None, env "GRYT_ENCRYPTION_KEY";
        /// A file holding `encryption_key`.
        encryption_key_file: Option<PathBuf> = None, env "GRYT_ENCRYPTION_KEY_FILE";
        /// Tried too during a rotation of the encryption key.
        encryption_key_previous: Option<SecretString> = None, env "GRYT_ENCRYPTION_KEY_PREVIOUS";
        /// Case-insensitive globs: job environment variables whose names match are masked in
        /// output.
        secret_env_patterns: Vec<String> =
            DEFAULT_SECRET_ENV_PATTERNS.iter().map(|p| p.to_string()).collect(),
            env "GRYT_SECRET_ENV_PATTERNS";
        /// Pull mode: how long a job's log may make no progress on the API (answers that take none
        /// of it, or no answer) before the agent stops streaming it and completes the job without
        /// the rest.
        log_give_up_seconds: u64 = 60, env "GRYT_LOG_GIVE_UP";
    }
    sections {
        /// The `[docker]` section: the engine and each job's container.
        docker: DockerSettings,
        /// The `[job]` section: time limits, output and the gryt command.
        job: JobSettings,
        /// The `[push]` section: serving the existing API's push requests.
        push: PushSettings,
        /// The `[checkout]` section: cloning a job's repository.
        checkout: CheckoutConfig,
        /// Disk hygiene: when the agent collects images and leftovers (see `crate::gc`).
        disk: DiskSettings,
        /// The `[store]` section: object storage for artifacts and caches.
        store: StoreConfig,
    }
}

settings! {
    /// The `[push]` section: serving `POST /jobs/execute` for the existing API.
    pub struct PushSettings ("push.") {
        /// Serve `POST /jobs/execute` for the existing API (needs `api_key`, 32+ characters).
        enabled: bool = false, env "GRYT_PUSH", flag "push";
        /// Hosts a result may be POSTed to as `callback_url` (`host` or `host:port`).
        callback_allow: Vec<String> = Vec::new(), env "GRYT_CALLBACK_ALLOW";
        /// Largest request body accepted.
        max_body_bytes: usize = 10 * 1024 * 1024, env "GRYT_MAX_BODY_BYTES";
        /// Push requests that may wait for a free slot; one more is answered 429.
        max_queue: usize = 16, env "GRYT_PUSH_MAX_QUEUE";
    }
}

settings! {
    /// The `[docker]` section: the engine, and the container every job runs in.
    pub struct DockerSettings ("docker.") {
        /// Docker engine address (`unix:///...`, `tcp://...`); the platform default when unset.
        host: Option<String> = None, env "DOCKER_HOST";
        /// Default image when neither the job nor the pipeline names one.
        image: String = "ghcr.io/epyklab/gryt/pipeline:latest".into(), env "GRYT_DOCKER_IMAGE";
        /// When images are pulled: `if-not-present`, `always` or `never`.
        pull_policy: PullPolicy = PullPolicy::IfNotPresent, env "GRYT_PULL_POLICY";
        /// Which images the disk collector may remove: `agent` (only those this agent pulled or
        /// ran), `all` (any unused image: a dedicated host), `off`.
        gc_images: GcImages = GcImages::Agent, env "GRYT_GC_IMAGES";
        /// `uid[:gid]` the job runs as; never root. Read once, into `job_user`.
        user: String = JobUser::DEFAULT_TEXT.into(), env "GRYT_CONTAINER_USER";
        /// `job` (default: a network of its own for every job), `bridge`, `none`, or a named
        /// network; never `host`.
        network: String = super::pool::MODE_JOB.into(), env "GRYT_NETWORK";
        /// IPv4 CIDR, /8 to /24, that `job` networks take a /24 each from.
        network_pool: String = super::pool::DEFAULT_POOL.into(), env "GRYT_NETWORK_POOL";
        /// Most processes a job's container may have.
        pids_limit: i64 = 1024, env "GRYT_PIDS_LIMIT";
        /// Default memory limit when the job gives none (`512m`, `2g`).
        memory_limit: String = "2g".into(), env "GRYT_MEMORY_LIMIT";
        /// Default CPU limit when the job gives none (`1.5`).
        cpu_limit: String = "2".into(), env "GRYT_CPU_LIMIT";
        /// Most memory a job may ask for; this machine's memory when unset.
        max_memory: Option<String> = None, env "GRYT_MAX_MEMORY";
        /// Most CPUs a job may ask for; this machine's CPUs when unset.
        max_cpus: Option<String> = None, env "GRYT_MAX_CPUS";
        /// Globs an image name must match to run (`ghcr.io/acme/*`); `*` allows any.
        allowed_images: Vec<String> = vec!["*".into()], env "GRYT_ALLOWED_IMAGES";
        /// Containers of `image` kept created, started and idle for the next jobs (`run` only,
        /// at most the slots, at most 64); 0 turns the pool off.
        warm_pool: usize = 1, env "GRYT_WARM_POOL";
    }
    derived {
        /// `user` as numbers, read by the loader (a `Settings` changed after loading keeps the
        /// one it was loaded with).
        job_user: JobUser,
    }
}

settings! {
    /// The `[job]` section: limits and the command of each job.
    pub struct JobSettings ("job.") {
        /// Time limit for a job that sets none.
        timeout_seconds: u64 = 3600, env "GRYT_JOB_TIMEOUT";
        /// How long a stopped job gets after SIGTERM before it is killed.
        stop_grace_seconds: u64 = 10, env "GRYT_STOP_GRACE";
        /// Bytes of stdout and of stderr kept for the result (the tail is kept).
        output_cap_bytes: usize = 1024 * 1024, env "GRYT_OUTPUT_CAP";
        /// Command that runs a gryt pipeline, in `/workspace` (split on whitespace from the
        /// environment).
        gryt_command: Vec<String> = vec!["gryt".into(), "run".into(), "pipeline.py".into()],
            env "GRYT_COMMAND", kind Words;
        /// Longest time limit a job or step may ask for (`timeout_seconds`); longer is refused.
        max_timeout_seconds: u64 = 24 * 3600, env "GRYT_MAX_JOB_TIMEOUT";
        /// Most service containers one job may have (`services`); 0 refuses every job with one.
        max_services: usize = 4, env "GRYT_MAX_SERVICES";
    }
}

settings! {
    /// The `[checkout]` section: cloning a job's repository (see `crate::checkout`).
    pub struct CheckoutConfig ("checkout.") {
        /// Time limit for cloning a job's repository.
        timeout_seconds: u64 = 600, env "GRYT_CHECKOUT_TIMEOUT";
        /// Cap on the bytes a clone writes into the workspace (pack and files).
        max_bytes: u64 = 2 * 1024 * 1024 * 1024, env "GRYT_CHECKOUT_MAX_BYTES";
        /// Allow `file://` repositories (local testing).
        allow_file_urls: bool = false, env "GRYT_ALLOW_FILE_URLS";
        /// Let `git_url` reach loopback, private (RFC 1918), link-local and unique-local addresses.
        allow_private_hosts: bool = false, env "GRYT_CHECKOUT_ALLOW_PRIVATE";
    }
}

settings! {
    /// The `[disk]` section: the free-space marks of the disk collector, in MiB of free space on
    /// Docker's data root and the work dir. Below `gc_trigger_free_mb` (the high-water mark of use)
    /// the agent removes unused images and its own leftovers until `gc_target_free_mb` (the
    /// low-water mark) is free again.
    pub struct DiskSettings ("disk.") {
        /// Collect when free space falls below this (MiB; 0: never for space, leftovers still go).
        gc_trigger_free_mb: u64 = 5 * 1024, env "GRYT_GC_TRIGGER_FREE_MB";
        /// Stop collecting once this much is free (MiB); at least `gc_trigger_free_mb`.
        gc_target_free_mb: u64 = 10 * 1024, env "GRYT_GC_TARGET_FREE_MB";
        /// Time between checks of the free space.
        gc_interval_seconds: u64 = 300, env "GRYT_GC_INTERVAL";
    }
}

settings! {
    /// The `[store]` section: S3-compatible object storage for artifacts and caches (see
    /// `crate::store`). Off while `url` is unset.
    pub struct StoreConfig ("store.") {
        /// `s3://bucket/prefix`: where artifacts and caches go.
        url: Option<String> = None, env "GRYT_STORE_URL";
        /// Endpoint of an S3-compatible server (MinIO, Garage, Ceph, R2); AWS when unset.
        endpoint: Option<String> = None, env "GRYT_STORE_ENDPOINT";
        /// The bucket's region (`us-east-1` when unset); `GRYT_STORE_REGION` beats `AWS_REGION`.
        region: Option<String> = None, env "AWS_REGION" "GRYT_STORE_REGION";
        /// Allow a plain `http://` endpoint (a loopback test server).
        allow_http: bool = false, env "GRYT_STORE_ALLOW_HTTP";
        /// Static credentials; without them the instance's role (metadata service) is used.
        access_key_id: Option<SecretString> = None, env "AWS_ACCESS_KEY_ID";
        /// Goes with `access_key_id`.
        secret_access_key: Option<SecretString> = None, env "AWS_SECRET_ACCESS_KEY";
        /// Session token of temporary credentials.
        session_token: Option<SecretString> = None, env "AWS_SESSION_TOKEN";
        /// Most bytes one job's artifacts may hold together.
        max_artifact_bytes: u64 = 1024 * 1024 * 1024, env "GRYT_STORE_MAX_ARTIFACT_BYTES";
        /// Most bytes one cache may hold (files before compression, and the archive).
        max_cache_bytes: u64 = 2 * 1024 * 1024 * 1024, env "GRYT_STORE_MAX_CACHE_BYTES";
        /// Size of each part of a multipart upload (S3: 5 MiB at least).
        part_size_bytes: u64 = 8 * 1024 * 1024, env "GRYT_STORE_PART_SIZE";
        /// Retries of each request (each part of an upload on its own).
        retries: u32 = 5, env "GRYT_STORE_RETRIES";
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    IfNotPresent,
    Always,
    Never,
}

impl Value for PullPolicy {}

/// Which images the disk collector may remove (`docker.gc_images`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GcImages {
    Agent,
    All,
    Off,
}

impl Value for GcImages {}

/// The user a job runs as (`docker.user`), read once when the settings are loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobUser {
    pub uid: u32,
    pub gid: u32,
}

impl JobUser {
    /// `docker.user`'s default.
    pub const DEFAULT_TEXT: &str = "1000:1000";

    /// Parses `uid[:gid]` (numeric); refuses root, since jobs never run as root.
    pub fn parse(user: &str) -> Result<JobUser, String> {
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
        Ok(JobUser { uid, gid })
    }

    /// `(uid, gid)`, as file ownership takes them.
    pub fn ids(self) -> (u32, u32) {
        (self.uid, self.gid)
    }
}

impl Default for JobUser {
    /// [`JobUser::DEFAULT_TEXT`].
    fn default() -> Self {
        JobUser {
            uid: 1000,
            gid: 1000,
        }
    }
}
