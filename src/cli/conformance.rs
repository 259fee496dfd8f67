//! `gryt-agent conformance --api URL`: runs the server conformance checker against a main API
//! and prints its report. Exit 0 only when every rule passed, 1 when one failed or the run could
//! not finish, 2 when the API could not be reached or the settings are wrong.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use gryt_agent::config::Settings;
use gryt_agent::conformance::{self, Options};

#[derive(Args, Debug)]
pub struct ConformanceArgs {
    /// The API's base URL [default: the `api_url` setting, GRYT_API_URL]
    #[arg(long = "api", value_name = "URL")]
    pub api: Option<String>,
    /// The agent id the checker leases with
    #[arg(long, default_value = "gryt-conformance-checker")]
    pub agent_id: String,
}

pub async fn run(config: Option<&Path>, args: ConformanceArgs) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(config, &[]).context("settings")?;
    let Some(api_url) = args.api.or(settings.api_url.clone()) else {
        eprintln!("gryt-agent conformance: give the API's URL with --api (or GRYT_API_URL)");
        return Ok(ExitCode::from(2));
    };
    let Some(key) = settings.api_key().context("settings")? else {
        eprintln!("gryt-agent conformance: no API key: set AGENT_API_KEY or AGENT_API_KEY_FILE");
        return Ok(ExitCode::from(2));
    };
    let options = Options {
        api_url,
        allow_insecure_http: settings.allow_insecure_http,
        key,
        ca_file: settings.ca_file.clone(),
        agent_id: args.agent_id,
    };
    println!(
        "gryt-agent conformance: leasing only jobs labelled `{}`",
        conformance::LABEL
    );
    let began = std::time::Instant::now();
    match conformance::run(&options).await {
        Ok(report) => {
            print!("{}", report.render());
            println!("(the run took {:.0} s)", began.elapsed().as_secs_f64());
            Ok(ExitCode::from(if report.passed() { 0 } else { 1 }))
        }
        Err(e) => {
            println!("gryt-agent conformance: {e}");
            Ok(ExitCode::from(2))
        }
    }
}
