//! Parsing resource limits as Docker users write them (`512m`, `2g`, `1.5` CPUs).

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
    fn cpus() {
        assert_eq!(parse_cpus("1.0"), Ok(1_000_000_000));
        assert_eq!(parse_cpus("0.5"), Ok(500_000_000));
        for bad in ["", "0", "-1", "many", "NaN", "inf"] {
            assert!(parse_cpus(bad).is_err(), "{bad}");
        }
    }
}
