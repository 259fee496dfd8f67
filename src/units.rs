//! Values as operators and jobs write them, below every module that reads them: resource
//! limits as Docker users write them (`512m`, `2g`, `1.5` CPUs), this machine's size, and the
//! bound on every number from outside (job, API, settings) that becomes a duration fed to a
//! clock: adding an unbounded one to an `Instant` panics, so [`bounded_seconds`] is the one door
//! they pass. Imports nothing of the crate: `config` and the executor both build on it.

use std::time::Duration;

/// Smallest memory limit Docker accepts.
pub const MIN_MEMORY_BYTES: i64 = 6 * 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LimitError {
    #[error("`{0}` is not a memory size (examples: 512m, 2g, 1073741824)")]
    Memory(String),
    #[error("`{0}` is below Docker's minimum of 6m")]
    MemoryTooSmall(String),
    #[error("`{0}` is not a CPU count (examples: 0.5, 1, 2.0)")]
    Cpus(String),
    /// A value over an operator's limit: names the field, the value, the limit and its setting.
    #[error("{field} {value} is above this agent's limit {limit_name} = {limit}")]
    AboveLimit {
        field: String,
        value: String,
        limit_name: String,
        limit: String,
    },
}

/// The longest duration any setting may give (a year and a day): far beyond any job, far below
/// what would overflow an `Instant`.
pub const MAX_SECONDS_CEILING: u64 = 366 * 24 * 3600;

/// `value` seconds as a `Duration` when it is at most `limit` (and the ceiling), else an error
/// naming `field`, the value and the limit (`limit_name` is the setting that sets it).
pub fn bounded_seconds(
    field: &str,
    value: u64,
    limit: u64,
    limit_name: &str,
) -> Result<Duration, LimitError> {
    let limit = limit.min(MAX_SECONDS_CEILING);
    if value > limit {
        return Err(LimitError::AboveLimit {
            field: field.to_owned(),
            value: format!("= {value}"),
            limit_name: limit_name.to_owned(),
            limit: limit.to_string(),
        });
    }
    Ok(Duration::from_secs(value))
}

/// Checks a parsed limit (`bytes` or NanoCPUs) against the operator's maximum.
pub fn at_most(
    field: &str,
    text: &str,
    value: i64,
    max: i64,
    limit_name: &str,
    max_text: &str,
) -> Result<(), LimitError> {
    if value > max {
        return Err(LimitError::AboveLimit {
            field: field.to_owned(),
            value: format!("`{text}`"),
            limit_name: limit_name.to_owned(),
            limit: max_text.to_owned(),
        });
    }
    Ok(())
}

/// This machine's memory in bytes (`MemTotal` of `/proc/meminfo`); `None` when unreadable.
pub fn host_memory_bytes() -> Option<i64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The CPUs this process may use, in NanoCPUs.
pub fn host_nano_cpus() -> i64 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus as i64).saturating_mul(1_000_000_000)
}

/// Parses a memory size with Docker's binary units: `b`, `k`, `m`, `g`, `t`, optionally followed
/// by `b` or `ib` (`512m`, `512MB`, `512MiB` are all 512 × 2^20); a bare number is bytes.
pub fn parse_memory(text: &str) -> Result<i64, LimitError> {
    let err = || LimitError::Memory(text.to_owned());
    let t = text.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().map_err(|_| err())?;
    let unit = unit.trim();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b').filter(|u| !u.is_empty()))
        .unwrap_or(unit);
    let shift = match unit {
        "" | "b" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(err()),
    };
    let bytes = number * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes > i64::MAX as f64 {
        return Err(err());
    }
    let bytes = bytes as i64;
    if bytes < MIN_MEMORY_BYTES {
        return Err(LimitError::MemoryTooSmall(text.to_owned()));
    }
    Ok(bytes)
}

/// Parses a CPU count into Docker's NanoCPUs.
pub fn parse_cpus(text: &str) -> Result<i64, LimitError> {
    let cpus: f64 = text
        .trim()
        .parse()
        .map_err(|_| LimitError::Cpus(text.to_owned()))?;
    if !cpus.is_finite() || !(0.01..=4096.0).contains(&cpus) {
        return Err(LimitError::Cpus(text.to_owned()));
    }
    Ok((cpus * 1e9).round() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_units() {
        assert_eq!(parse_memory("512m"), Ok(512 << 20));
        assert_eq!(parse_memory("2g"), Ok(2 << 30));
        assert_eq!(parse_memory("2G"), Ok(2 << 30));
        assert_eq!(parse_memory("512MiB"), Ok(512 << 20));
        assert_eq!(parse_memory("512mb"), Ok(512 << 20));
        assert_eq!(parse_memory("1.5g"), Ok(3 << 29));
        assert_eq!(parse_memory("10485760"), Ok(10 << 20));
        assert!(matches!(
            parse_memory("1m"),
            Err(LimitError::MemoryTooSmall(_))
        ));
        for bad in ["", "m", "lots", "-5m", "5x", "1e400"] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_past_their_limit_are_errors_naming_field_and_limit() {
        assert_eq!(
            bounded_seconds("timeout_seconds", 60, 86400, "job.max_timeout_seconds"),
            Ok(Duration::from_secs(60))
        );
        let err = bounded_seconds(
            "timeout_seconds",
            u64::MAX,
            86400,
            "job.max_timeout_seconds",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "timeout_seconds = 18446744073709551615 is above this agent's limit job.max_timeout_seconds = 86400"
        );
        // The ceiling holds even when the limit itself is absurd.
        assert!(bounded_seconds("x", MAX_SECONDS_CEILING + 1, u64::MAX, "y").is_err());
    }

    #[test]
    fn the_host_has_memory_and_cpus() {
        assert!(host_memory_bytes().unwrap() > MIN_MEMORY_BYTES);
        assert!(host_nano_cpus() >= 1_000_000_000);
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_cpus("1.0"), Ok(1_000_000_000));
        assert_eq!(parse_cpus("0.5"), Ok(500_000_000));
        for bad in ["", "0", "-1", "many", "NaN", "inf"] {
            assert!(parse_cpus(bad).is_err(), "{bad}");
        }
    }
}
