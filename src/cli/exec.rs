//! `gryt-agent exec`: run one pipeline file on this machine's Docker.
//!
//! The job's stdout goes to stdout and its stderr to stderr, live and unchanged; the agent's own
//! lines (step headers, pull progress, the summary) go to stderr, so `exec` composes in shell
//! pipelines. With `--json`, stdout holds only the result and all live output goes to stderr.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Context, bail};
use base64::Engine;
use clap::Args;
use gryt_agent::config::Settings;
use gryt_agent::executor::exec_owner::{self, ExecLock};
use gryt_agent::executor::{
    Executor, ExecutorSettings, JobControl, JobEvent, JobObserver, OutputStream,
};
use gryt_agent::wire::{JobResult, JobSpec, StepStatus};

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Pipeline file: a gryt Python script or a YAML pipeline (`-` reads standard input)
    pub pipeline_file: PathBuf,
    /// Image to run in (overrides the pipeline's `image` and GRYT_DOCKER_IMAGE)
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,
    /// Environment variable for the job, `KEY=VALUE`, or `KEY` to pass this shell's value (repeatable)
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Time limit for the job in seconds
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Memory limit (`512m`, `2g`)
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// CPU limit (`0.5`, `2`)
    #[arg(long, value_name = "CPUS")]
    pub cpus: Option<String>,
    /// Print the result as JSON on stdout; the job's output then goes to stderr
    #[arg(long)]
    pub json: bool,
}

pub async fn run(config: Option<&Path>, args: ExecArgs) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(config, &[])?;
    let text = read_pipeline(&args.pipeline_file)?;
    let job = JobSpec {
        job_id: 0,
        pipeline_b64: base64::engine::general_purpose::STANDARD.encode(text),
        docker_image: args.image.clone(),
        env_vars: parse_env(&args.env)?,
        timeout_seconds: args.timeout,
        memory_limit: args.memory.clone(),
        cpu_limit: args.cpus.clone(),
        // A local run is its operator's own: it may write caches (see docs/protocol.md).
        trusted: true,
        ..JobSpec::default()
    };
    let mut executor_settings = ExecutorSettings::from_settings(&settings, exec_id(&settings))?;
    executor_settings.register_secrets_for_logs();
    // Held until this process ends, however it ends: its container carries the lock's path,
    // so a later exec or agent start can tell this exec's leftovers from a live exec's job.
    let lock_dir = executor_settings.exec_lock_dir.clone();
    let lock = tokio::task::spawn_blocking(move || ExecLock::acquire(&lock_dir))
        .await?
        .with_context(|| {
            format!(
                "cannot make exec's lock file in {}",
                executor_settings.exec_lock_dir.display()
            )
        })?;
    executor_settings.extra_labels = lock.labels();
    let executor = Executor::new(executor_settings)?;
    if !executor.reachable().await {
        bail!(
            "the Docker engine does not answer (is it running, and may this user use its socket?)"
        );
    }
    sweep_dead_execs(&executor).await;

    let control = JobControl::new();
    let signalled = Arc::new(AtomicI32::new(0));
    let signals = Signals::listen().context("cannot listen for signals")?;
    tokio::spawn(stop_on_signals(control.clone(), signalled.clone(), signals));
    let observer = Terminal { json: args.json };
    let result = executor.run(&job, &observer, &control).await;
    lock.release().await;

    summarize(&result);
    if args.json {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &result)?;
        writeln!(out)?;
    }
    // Stopped by a signal: the shell's convention, 128 + its number, after the cleanup.
    match signalled.load(Ordering::SeqCst) {
        0 => Ok(exit_code(&result)),
        signal => Ok(ExitCode::from(128 + signal as u8)),
    }
}

/// The id exec's workspaces and containers carry: `<agent_id>-exec` (`local-exec` without one).
/// Never the agent's own id, even when an agent on this host is configured with the same
/// `agent_id` and work dir: the agent's sweep takes everything carrying its id (and job 0 is
/// never one of its running jobs), so it would remove a live exec's workspace.
fn exec_id(settings: &Settings) -> String {
    format!("{}-exec", settings.agent_id.as_deref().unwrap_or("local"))
}

/// Removes what execs killed on this host (SIGKILL: no cleanup ran) left behind.
async fn sweep_dead_execs(executor: &Executor) {
    let Ok(docker) = executor.docker().await else {
        return;
    };
    let settings = executor.settings();
    let user = settings.docker.job_user.ids();
    let removed =
        exec_owner::sweep_dead_execs(&docker, &settings.exec_lock_dir, &settings.work_dir, user)
            .await;
    if removed > 0 {
        eprintln!("gryt-agent: removed {removed} container(s) left by killed execs");
    }
}

fn read_pipeline(path: &Path) -> anyhow::Result<String> {
    if path == Path::new("-") {
        return std::io::read_to_string(std::io::stdin())
            .context("cannot read the pipeline from standard input");
    }
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read pipeline file {}", path.display()))
}

fn parse_env(pairs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    for pair in pairs {
        let (key, value) = match pair.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => {
                let v = std::env::var(pair)
                    .with_context(|| format!("--env {pair}: no such variable in this shell"))?;
                (pair.clone(), v)
            }
        };
        if key.is_empty() {
            bail!("--env {pair}: the variable name is empty");
        }
        env.insert(key, value);
    }
    Ok(env)
}

/// The signals `exec` stops its job on, listened to from before the job starts.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn listen() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// The first SIGINT (Ctrl-C), SIGTERM (a CI system's cancel, `timeout`) or SIGHUP (a closed
/// terminal) stops the job gracefully and is remembered for the exit code; a second kills it
/// at once. Either way the job's container and workspace are removed before `exec` exits.
async fn stop_on_signals(control: JobControl, signalled: Arc<AtomicI32>, signals: Signals) {
    let Signals {
        mut int,
        mut term,
        mut hup,
    } = signals;
    let mut next = async || {
        tokio::select! {
            _ = int.recv() => (2, "interrupted"),
            _ = term.recv() => (15, "terminated"),
            _ = hup.recv() => (1, "hung up"),
        }
    };
    let (number, word) = next().await;
    signalled.store(number, Ordering::SeqCst);
    eprintln!("gryt-agent: {word}: stopping the job (a second signal kills it)");
    control.cancel(word);
    let (_, word) = next().await;
    control.abort(format!("{word} twice"));
}

/// Writes the job's output to the terminal as it arrives.
struct Terminal {
    json: bool,
}

impl JobObserver for Terminal {
    fn output(&self, stream: OutputStream, data: &[u8]) {
        // A closed pipe on our side (`exec ... | head`) must not fail the job: ignore write errors.
        if stream == OutputStream::Stdout && !self.json {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(data).and_then(|_| out.flush());
        } else {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(data).and_then(|_| err.flush());
        }
    }

    fn event(&self, event: JobEvent<'_>) {
        match event {
            JobEvent::PullStarted { image } => eprintln!("==> pulling image {image}"),
            JobEvent::PullStatus { image: _, status } => eprintln!("    {status}"),
            JobEvent::PullFinished { image } => eprintln!("==> pulled {image}"),
            JobEvent::PullFailed { image } => eprintln!("==> cannot pull {image}"),
            JobEvent::CheckedOut { url, commit } => eprintln!("==> checked out {url} at {commit}"),
            JobEvent::StepStarted { index, name } => eprintln!("==> step {}: {name}", index + 1),
            JobEvent::StepFinished { index, step } => {
                let code = step
                    .exit_code
                    .map(|c| format!(", exit code {c}"))
                    .unwrap_or_default();
                eprintln!(
                    "<== step {}: {} ({:.2}s{code})",
                    index + 1,
                    status_word(step.status),
                    step.duration_seconds
                );
            }
        }
    }
}

fn status_word(status: StepStatus) -> &'static str {
    match status {
        StepStatus::Success => "success",
        StepStatus::Failed => "failed",
        StepStatus::Timeout => "timed out",
        StepStatus::Cancelled => "cancelled",
        StepStatus::Skipped => "skipped",
    }
}

fn summarize(result: &JobResult) {
    let mut line = format!(
        "==> job {} in {:.2}s",
        result.status.as_str(),
        result.duration_seconds
    );
    if !result.success && result.exit_code >= 0 {
        line.push_str(&format!(", exit code {}", result.exit_code));
    }
    if let Some(error) = &result.error {
        line.push_str(&format!(": {error}"));
    }
    eprintln!("{line}");
}

/// The job's exit code when it has one that a shell can carry, else 1.
fn exit_code(result: &JobResult) -> ExitCode {
    if result.success {
        return ExitCode::SUCCESS;
    }
    match u8::try_from(result.exit_code) {
        Ok(code) if code != 0 => ExitCode::from(code),
        _ => ExitCode::from(1),
    }
}
