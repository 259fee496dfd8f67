//! `gryt-agent run`: the long-running agent (pull mode when an API URL is set, push mode when
//! switched on, both at once if asked).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use gryt_agent::agent::{self, AgentOptions};
use gryt_agent::config::Settings;

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// Main API base URL: turns pull mode on [env: GRYT_API_URL]
    #[arg(long, value_name = "URL")]
    pub api_url: Option<String>,
    /// Serve POST /jobs/execute for the existing API [env: GRYT_PUSH]
    #[arg(long)]
    pub push: bool,
    /// Jobs run at once [env: GRYT_CONCURRENCY]
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,
    /// This agent's id [env: GRYT_AGENT_ID]
    #[arg(long, value_name = "ID")]
    pub agent_id: Option<String>,
    /// Labels sent with lease requests, comma-separated [env: GRYT_AGENT_LABELS]
    #[arg(long, value_name = "A,B")]
    pub labels: Option<String>,
    /// State directory (agent id, result spool) [env: GRYT_STATE_DIR]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Address of the local endpoint [env: AGENT_HOST]
    #[arg(long, value_name = "HOST")]
    pub host: Option<String>,
    /// Port of the local endpoint [env: AGENT_PORT]
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Exit after one job is completed (ephemeral agents)
    #[arg(long)]
    pub once: bool,
    /// Exit after N jobs are completed (ephemeral agents; at least 1)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_jobs: Option<u64>,
    /// Exit after SECS without a job (ephemeral agents; at least 1)
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_exit: Option<u64>,
}

impl RunArgs {
    /// The flags that are settings, as `(key, value)` overrides: flags beat file and environment.
    fn overrides(&self) -> Vec<(&'static str, String)> {
        let mut o = Vec::new();
        if let Some(v) = &self.api_url {
            o.push(("api_url", v.clone()));
        }
        if self.push {
            o.push(("push.enabled", "true".to_owned()));
        }
        if let Some(v) = self.concurrency {
            o.push(("concurrency", v.to_string()));
        }
        if let Some(v) = &self.agent_id {
            o.push(("agent_id", v.clone()));
        }
        if let Some(v) = &self.labels {
            o.push(("labels", v.clone()));
        }
        if let Some(v) = &self.state_dir {
            o.push(("state_dir", v.display().to_string()));
        }
        if let Some(v) = &self.host {
            o.push(("host", v.clone()));
        }
        if let Some(v) = self.port {
            o.push(("port", v.to_string()));
        }
        o
    }
}

pub async fn run(config: Option<&Path>, args: RunArgs) -> anyhow::Result<ExitCode> {
    let overrides = args.overrides();
    let overrides: Vec<(&str, String)> = overrides.into_iter().collect();
    let settings = Settings::load(config, &overrides)?;
    let options = AgentOptions {
        once: args.once,
        max_jobs: args.max_jobs,
        idle_exit: args.idle_exit.map(Duration::from_secs),
    };
    agent::run(settings, options).await?;
    Ok(ExitCode::SUCCESS)
}
