//! `gryt-agent guard-metadata`: installs the rules that keep job networks from the cloud
//! metadata address (see `executor::metadata_guard`), for the packaged non-root service, whose
//! unit runs it with full privileges before the agent starts (`ExecStartPre=-+`). Idempotent.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use gryt_agent::config::Settings;
use gryt_agent::executor::metadata_guard::{self, METADATA_V4, METADATA_V6};

pub async fn run(config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(config, &[]).context("settings")?;
    let pool = settings.docker.network_pool()?;
    if !metadata_guard::may_change_firewall() {
        eprintln!(
            "gryt-agent guard-metadata: changing the firewall needs root (or CAP_NET_ADMIN); \
             the packaged unit runs it as root (ExecStartPre=-+)"
        );
        return Ok(ExitCode::from(1));
    }
    let guarded = metadata_guard::install(pool).await;
    if let Err(e) = &guarded.v6 {
        println!("IPv6: no rule for {METADATA_V6} ({e}); job networks are IPv4 only");
    } else {
        println!("IPv6: job network bridges cannot reach {METADATA_V6}");
    }
    match guarded.v4 {
        Ok(()) => {
            println!("job network pool {pool} cannot reach {METADATA_V4}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("gryt-agent guard-metadata: {e}");
            Ok(ExitCode::from(1))
        }
    }
}
