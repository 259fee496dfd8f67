//! Settings: every knob the agent has, declared once and loaded in one place.
//!
//! Layers, lowest first: built-in defaults < TOML file (`--config PATH`, else
//! `/etc/gryt-agent/agent.toml` when present) < environment < command-line flags. The existing
//! Python agent's variable names (`AGENT_API_KEY`, `AGENT_HOST`, ...) work unchanged; new ones use
//! a `GRYT_` prefix. Each setting is declared once in `sections.rs` with its key, default,
//! variables, flag and doc; [`settings`] lists them. The environment is mapped by those explicit
//! names rather than by a naming rule, so each variable is documented and none is picked up by
//! accident. `config/agent.example.toml` documents every key; a test keeps the two in step.
//!
//! This module is on the ground floor: it imports nothing of the executor, secrets or modes
//! (the value parsers it shares with the executor are in [`crate::units`]).

mod declare;
pub mod pool;
mod sections;
mod validate;
mod values;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use secrecy::{ExposeSecret, SecretString};

pub use declare::{Flag, FlagValue, Kind, Setting};
pub use sections::{
    CheckoutConfig, DiskSettings, DockerSettings, GcImages, JobSettings, JobUser, PullPolicy,
    PushSettings, Settings, StoreConfig,
};
pub use validate::{
    MAX_DISK_MARK_MB, MAX_PART_SIZE, MAX_PUSH_QUEUE, MAX_SERVICES_SETTING, MAX_WARM_POOL,
    MIN_PART_SIZE,
};
pub use values::{DEFAULT_SECRET_ENV_PATTERNS, image_globs, secret_name_glob, valid_agent_id};

/// Where the TOML file is looked for when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/gryt-agent/agent.toml";

/// Every declared setting, top-level keys first, then each section's.
pub fn settings() -> &'static [&'static Setting] {
    static ALL: LazyLock<Vec<&'static Setting>> = LazyLock::new(|| {
        let mut all = Vec::new();
        Settings::collect(&mut all);
        all
    });
    &ALL
}

/// Every environment variable with the setting it sets, in declaration order.
pub fn env_vars() -> impl Iterator<Item = (&'static str, &'static Setting)> {
    settings()
        .iter()
        .flat_map(|s| s.env.iter().map(move |var| (*var, *s)))
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
        let env: Vec<(String, String)> = env_vars()
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
            let Some((_, setting)) = env_vars().find(|(v, _)| v == var) else {
                continue;
            };
            builder = set(builder, setting.key, setting.kind, value)
                .map_err(|e| key_error(var, e.to_string()))?;
        }
        for (key, value) in overrides {
            let kind = settings()
                .iter()
                .find(|s| s.key == *key)
                .map_or(Kind::Scalar, |s| s.kind);
            builder = set(builder, key, kind, value).map_err(|e| key_error(key, e.to_string()))?;
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
    let from_env = env_vars().find(|(var, s)| mentions(s.key) && env.iter().any(|(v, _)| v == var));
    match from_env {
        Some((var, _)) => format!("{message} (set by the environment variable {var})"),
        None => message,
    }
}

/// Sets `key` from text: a list is split as its [`Kind`] says, anything else is converted by
/// the loader.
fn set(
    builder: config::ConfigBuilder<config::builder::DefaultState>,
    key: &str,
    kind: Kind,
    value: &str,
) -> Result<config::ConfigBuilder<config::builder::DefaultState>, config::ConfigError> {
    let items: Vec<String> = match kind {
        Kind::Scalar => return builder.set_override(key, value),
        Kind::Words => value.split_whitespace().map(str::to_owned).collect(),
        Kind::List => value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    };
    builder.set_override(key, items)
}
