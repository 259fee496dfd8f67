//! `gryt-agent run`: the long-running agent (pull mode when an API URL is set, push mode when
//! switched on, both at once if asked).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use gryt_agent::agent::{self, AgentOptions};
use gryt_agent::config::Settings;

use super::setting_flags::SettingFlags;

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    // The flags that are settings (`--api-url`, `--push`, `--port`, ...), from their declaration.
    #[command(flatten)]
    pub settings: SettingFlags,
    /// Exit after one job is completed (ephemeral agents)
    #[arg(long)]
    pub once: bool,
    /// Exit after N jobs are completed (ephemeral agents; N >= 1)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_jobs: Option<u64>,
    /// Exit after SECS without a job (ephemeral agents; SECS >= 1)
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_exit: Option<u64>,
}

/// Exit code of an ephemeral agent that ended with results still in its spool.
pub const UNDELIVERED_EXIT: u8 = 3;

pub async fn run(config: Option<&Path>, args: RunArgs) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(config, &args.settings.overrides)?;
    let options = AgentOptions {
        once: args.once,
        max_jobs: args.max_jobs,
        idle_exit: args.idle_exit.map(Duration::from_secs),
    };
    match agent::run(settings, options).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // Its own code: an ephemeral agent's host must not be thrown away with results in it.
        Err(e @ agent::AgentError::Undelivered(_)) => {
            eprintln!("gryt-agent: {e}");
            Ok(ExitCode::from(UNDELIVERED_EXIT))
        }
        Err(e) => Err(e.into()),
    }
}
