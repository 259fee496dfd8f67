//! The result table rows and the machine description printed above them.

use super::*;

// The table

pub(crate) struct Row {
    pub(crate) figure: String,
    pub(crate) value: String,
    pub(crate) baseline: String,
    pub(crate) ratio: String,
    pub(crate) target: String,
    pub(crate) met: Option<bool>,
}

pub(crate) fn row(
    figure: &str,
    value: String,
    baseline: String,
    ratio: String,
    target: &str,
) -> Row {
    Row {
        figure: figure.to_owned(),
        value,
        baseline,
        ratio,
        target: target.to_owned(),
        met: None,
    }
}

impl Row {
    pub(crate) fn met(mut self, met: bool) -> Row {
        self.met = Some(met);
        self
    }
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

pub(crate) fn ratio(value: f64, baseline: f64) -> f64 {
    if baseline > 0.0 {
        value / baseline
    } else {
        0.0
    }
}

pub(crate) fn median(v: &[Duration]) -> Duration {
    percentile(v, 50.0)
}

/// Nearest-rank percentile.
pub(crate) fn percentile(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let mut s = v.to_vec();
    s.sort();
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

// ---------------------------------------------------------------------------------------------
// Machine

pub(crate) async fn machine_info(docker: &Docker, agent: &AgentBinary, opts: &Opts) -> Vec<String> {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let ram = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_owned()))
        })
        .unwrap_or_else(|| "?".into());
    let docker_version = match docker.version().await {
        Ok(v) => format!(
            "{} (API {})",
            v.version.unwrap_or_default(),
            v.api_version.unwrap_or_default()
        ),
        Err(e) => format!("? ({e})"),
    };
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let s = &opts.sizes;
    vec![
        format!("- date: {date}"),
        format!("- machine: {nproc} CPUs ({cpu}), {ram} RAM, kernel {kernel}"),
        format!("- Docker: {docker_version}; job network `{}`", opts.network),
        format!("- agent binary: {}", agent.describe()),
        format!(
            "- bench program and library executor: {} build",
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "optimized"
            }
        ),
        format!(
            "- sizes{}: M={} K={} J={} S={}s G={} MiB A={} MiB C={} W={}",
            if opts.quick { " (--quick)" } else { "" },
            s.m,
            s.k,
            s.j,
            s.s,
            s.g / MIB,
            s.a / MIB,
            s.c,
            s.w
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
