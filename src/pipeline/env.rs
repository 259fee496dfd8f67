//! Environment variable names, as the YAML steps, services and job specs all check them.

/// Environment variable names Docker and `sh` accept: no `=`, no NUL, not empty.
pub fn valid_env_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['=', '\0'])
}
