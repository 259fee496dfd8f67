//! Command-line interface: argument definitions and dispatch to one module per subcommand.
//! Nothing here does the work itself.

mod check;
mod conformance;
mod exec;
mod guard;
mod run;
mod setting_flags;
mod token;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gryt_agent::secrets::MaskingMakeWriter;
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "gryt-agent",
    version,
    about = "Runs Gryt CI jobs in hardened, ephemeral Docker containers"
)]
pub struct Cli {
    /// TOML settings file [default: /etc/gryt-agent/agent.toml when present]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Log filter in RUST_LOG syntax (e.g. `info`, `gryt_agent=debug`) [default: RUST_LOG, else
    /// `info` for `run` and `warn` for the one-shot commands]
    #[arg(long, global = true, value_name = "FILTER")]
    pub log: Option<String>,

    /// Log format: `human` for terminals, `json` (one object per line) for log shipping
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run one pipeline file locally, in a container, and exit with its exit code.
    Exec(exec::ExecArgs),
    /// Check the setup (settings, directories, Docker, image, keys) and print what to fix.
    Check,
    /// Run the long-running agent: pull jobs from the API and/or serve push requests.
    Run(run::RunArgs),
    /// Work with the encrypted GitHub tokens the main API sends.
    Token(token::TokenArgs),
    /// Check a main API against the pull protocol's server rules, with its conformance jobs.
    Conformance(conformance::ConformanceArgs),
    /// Drop traffic from the job network pool to the cloud metadata address (iptables, as
    /// root): the packaged service runs it before the agent starts.
    GuardMetadata,
}

pub fn init_logging(cli: &Cli) {
    let filter = cli
        .log
        .as_deref()
        .map(EnvFilter::new)
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| match cli.command {
            Command::Run(_) => EnvFilter::new("info"),
            _ => EnvFilter::new("warn"),
        });
    // Secrets registered with `register_global_secret` never reach the log.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(MaskingMakeWriter::stderr());
    match cli.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Exec(args) => exec::run(cli.config.as_deref(), args).await,
        Command::Run(args) => run::run(cli.config.as_deref(), args).await,
        Command::Check => check::run(cli.config.as_deref()).await,
        Command::Token(args) => token::run(cli.config.as_deref(), args),
        Command::Conformance(args) => conformance::run(cli.config.as_deref(), args).await,
        Command::GuardMetadata => guard::run(cli.config.as_deref()).await,
    }
}
