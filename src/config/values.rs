//! Defaults that depend on the machine (the state directory) and the syntax of values other
//! modules read the same way: secret-name globs, image globs, agent ids.

use std::path::PathBuf;

use super::{ConfigError, key_error};

/// Environment variable names whose values are treated as secrets unless configured otherwise
/// (`secret_env_patterns`).
pub const DEFAULT_SECRET_ENV_PATTERNS: &[&str] = &["*TOKEN*", "*SECRET*", "*PASSWORD*", "*KEY*"];

/// Compiles one `secret_env_patterns` entry: a case-insensitive glob on a variable's name.
pub fn secret_name_glob(pattern: &str) -> Result<globset::GlobMatcher, globset::Error> {
    Ok(globset::GlobBuilder::new(pattern)
        .case_insensitive(true)
        .build()?
        .compile_matcher())
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

/// `/var/lib/gryt-agent` for root (a system service), else a per-user state directory; empty
/// (refused by `validate`) when neither is known.
pub(super) fn default_state_dir() -> PathBuf {
    state_dir_for(
        is_root(),
        std::env::var_os("XDG_STATE_HOME"),
        std::env::var_os("HOME"),
    )
}

/// Never a shared path such as `/tmp/gryt-agent`: another local user could create it first (or
/// a symlink in its place) and read or plant spooled results. Without a home the operator must
/// say where (`state_dir`).
pub(super) fn state_dir_for(
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
