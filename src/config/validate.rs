//! Checking the loaded settings: every value bounded and every combination possible, each
//! error naming its key (the loader adds which variable or flag set it).

use super::sections::{DockerSettings, JobUser, Settings, StoreConfig};
use super::values::{image_globs, secret_name_glob, valid_agent_id};
use super::{ConfigError, key_error};
use crate::units::{
    MAX_SECONDS_CEILING, at_most, bounded_seconds, host_memory_bytes, host_nano_cpus, parse_cpus,
    parse_memory,
};

/// The largest `push.max_queue`: each waiting request holds a connection of the endpoint.
pub const MAX_PUSH_QUEUE: usize = 256;

/// The largest `job.max_services` accepted: each service is a container with limits of its own.
pub const MAX_SERVICES_SETTING: usize = 64;

/// The largest `docker.warm_pool`: each ready container is a started container, a workspace and
/// (with `job` networks) a /24 of the pool, kept while the agent runs.
pub const MAX_WARM_POOL: usize = 64;

/// The largest free-space mark accepted (MiB): 1 EiB, far beyond any disk, and its bytes fit a u64.
pub const MAX_DISK_MARK_MB: u64 = 1 << 40;

/// S3's smallest part (except the last) and the largest the agent holds in memory.
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
pub const MAX_PART_SIZE: u64 = 256 * 1024 * 1024;

impl Settings {
    /// Checks every setting, then fills the derived ones (`docker.job_user`).
    pub(super) fn validate(&mut self) -> Result<(), ConfigError> {
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
        let job_user = JobUser::parse(&d.user).map_err(|e| key_error("docker.user", e))?;
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
        if d.warm_pool > MAX_WARM_POOL {
            return Err(key_error(
                "docker.warm_pool",
                format!("must be at most {MAX_WARM_POOL} (0 turns the pool off)"),
            ));
        }
        let j = &self.job;
        if j.max_services > MAX_SERVICES_SETTING {
            return Err(key_error(
                "job.max_services",
                format!("must be at most {MAX_SERVICES_SETTING}"),
            ));
        }
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
            secret_name_glob(pattern)
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
        self.docker.job_user = job_user;
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
    pub(super) fn fit_defaults_to_host(&mut self) {
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
}

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

impl DockerSettings {
    /// `network_pool` parsed: an IPv4 CIDR from /8 to /24.
    pub fn network_pool(&self) -> Result<super::pool::Pool, ConfigError> {
        self.network_pool
            .parse()
            .map_err(|e: String| key_error("docker.network_pool", e))
    }

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
