//! One job from spec to result: prepare (pipeline, limits, image, workspace, container), run its
//! commands, clean up, and assemble the result. The order of cleanup is the invariant that
//! matters here: the container and the workspace go on every path.

use std::collections::BTreeMap;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use time::OffsetDateTime;
use tokio::time::Instant;

use super::capture::TailBuffer;
use super::command::{CommandEnd, run_command};
use super::container::{
    ContainerSpec, JobCommand, JobContainer, LABEL_AGENT_ID, LABEL_JOB_ID, LABEL_MANAGED,
    OutputStream, WORKSPACE,
};
use super::control::{JobControl, StopKind, StopRequest};
use super::image::{self, PullProgress};
use super::limits::{MAX_SECONDS_CEILING, at_most, bounded_seconds, parse_cpus, parse_memory};
use super::workspace::{JobUserCleaner, Workspace};
use super::{Executor, JobEvent, JobObserver};
use crate::checkout::{CheckoutError, CheckoutRequest, checkout_until, validate_url};
use crate::config::parse_user;
use crate::pipeline::gryt_report::{self, ErrorLineCapture, ReportCapture};
use crate::pipeline::yaml::Step;
use crate::pipeline::yaml::valid_env_name;
use crate::pipeline::{Pipeline, YamlPipeline};
use crate::secrets::mask::{Masker, StreamMasker};
use crate::wire::{JobResult, JobSpec, JobStatus, StepResult, StepStatus, rfc3339};

/// How the job as a whole ended, before it becomes a result.
enum Outcome {
    Finished {
        success: bool,
        exit_code: i64,
        error: Option<String>,
    },
    TimedOut {
        exit_code: Option<i64>,
        error: String,
    },
    Cancelled {
        exit_code: Option<i64>,
        reason: String,
    },
    Error(String),
}

/// The mutable state of one run: captured output, steps so far, OOM, and the masking that every
/// byte of output passes through before anyone (observer or result) sees it.
struct Run<'a> {
    observer: &'a dyn JobObserver,
    masker: Masker,
    stdout_mask: StreamMasker,
    stderr_mask: StreamMasker,
    stdout: TailBuffer,
    stderr: TailBuffer,
    /// For a gryt pipeline: its report and load error, followed over the whole output (the
    /// tails above may have dropped them).
    gryt: Option<(ReportCapture, ErrorLineCapture)>,
    steps: Vec<StepResult>,
    oom_killed: bool,
    artifacts: Vec<crate::wire::ArtifactResult>,
}

impl Run<'_> {
    fn output(&mut self, stream: OutputStream, data: &[u8]) {
        let masked = match stream {
            OutputStream::Stdout => self.stdout_mask.push(data),
            OutputStream::Stderr => self.stderr_mask.push(data),
        };
        self.emit(stream, &masked);
    }

    fn emit(&mut self, stream: OutputStream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        match stream {
            OutputStream::Stdout => self.stdout.push(data),
            OutputStream::Stderr => self.stderr.push(data),
        }
        if let Some((report, errors)) = &mut self.gryt {
            match stream {
                OutputStream::Stdout => report.push(data),
                OutputStream::Stderr => errors.push(data),
            }
        }
        self.observer.output(stream, data);
    }

    /// Releases what the maskers held back in case it was the start of a secret.
    fn flush_masks(&mut self) {
        let out = self.stdout_mask.finish();
        self.emit(OutputStream::Stdout, &out);
        let err = self.stderr_mask.finish();
        self.emit(OutputStream::Stderr, &err);
    }

    /// Masks the secrets known so far (the token is only known once decrypted).
    fn set_masker(&mut self, masker: Masker) {
        self.stdout_mask = masker.stream();
        self.stderr_mask = masker.stream();
        self.masker = masker;
    }
}

pub(super) async fn run(
    executor: &Executor,
    job: &JobSpec,
    observer: &dyn JobObserver,
    control: &JobControl,
) -> JobResult {
    let started_at = OffsetDateTime::now_utc();
    let clock = Instant::now();
    let cap = executor.settings.job.output_cap_bytes;
    let masker = Masker::new(
        executor
            .settings
            .agent_secrets
            .iter()
            .map(|s| s.expose_secret()),
    );
    let mut run = Run {
        observer,
        stdout_mask: masker.stream(),
        stderr_mask: masker.stream(),
        masker,
        stdout: TailBuffer::new(cap),
        stderr: TailBuffer::new(cap),
        gryt: None,
        steps: Vec::new(),
        oom_killed: false,
        artifacts: Vec::new(),
    };
    let outcome = match job_timeout(&executor.settings, job) {
        Ok(timeout) => {
            let deadline = clock + timeout;
            prepare_and_run(executor, job, &mut run, control, deadline, timeout).await
        }
        Err(message) => Outcome::Error(message),
    };
    run.flush_masks();

    let (status, success, exit_code, error) = match outcome {
        Outcome::Finished { success: true, .. } => (JobStatus::Success, true, 0, None),
        Outcome::Finished {
            success: false,
            exit_code,
            error,
        } => (JobStatus::Failed, false, exit_code, error),
        Outcome::TimedOut { exit_code, error } => (
            JobStatus::Timeout,
            false,
            exit_code.unwrap_or(-1),
            Some(error),
        ),
        Outcome::Cancelled { exit_code, reason } => (
            JobStatus::Cancelled,
            false,
            exit_code.unwrap_or(-1),
            Some(reason),
        ),
        Outcome::Error(message) => (JobStatus::Error, false, -1, Some(message)),
    };
    JobResult {
        job_id: job.job_id,
        status,
        success,
        exit_code,
        stdout: run.stdout.to_text(),
        stderr: run.stderr.to_text(),
        duration_seconds: clock.elapsed().as_secs_f64(),
        started_at: rfc3339(started_at),
        completed_at: rfc3339(OffsetDateTime::now_utc()),
        error: error.map(|e| run.masker.mask_str(&e)),
        // Masked as they were made, in `run_steps` and `run_gryt`.
        steps: run.steps,
        oom_killed: run.oom_killed,
        artifacts: run.artifacts,
    }
}

/// The job's time limit: its own `timeout_seconds` (0 or none: the agent's default), refused
/// above `job.max_timeout_seconds` before it can feed a clock.
fn job_timeout(settings: &super::ExecutorSettings, job: &JobSpec) -> Result<Duration, String> {
    let max = settings.job.max_timeout_seconds;
    match job.timeout_seconds.filter(|t| *t > 0) {
        Some(t) => bounded_seconds("timeout_seconds", t, max, MAX_TIMEOUT_SETTING)
            .map_err(|e| e.to_string()),
        // Validated at start; bounded again in case the settings were made otherwise.
        None => bounded_seconds(
            "job.timeout_seconds",
            settings.job.timeout_seconds,
            max,
            MAX_TIMEOUT_SETTING,
        )
        .map_err(|e| e.to_string()),
    }
}

const MAX_TIMEOUT_SETTING: &str = "job.max_timeout_seconds";

/// Everything about a job that can be checked without Docker.
struct Plan {
    pipeline: Pipeline,
    image: String,
    env: Vec<String>,
    memory_bytes: i64,
    memory_text: String,
    nano_cpus: i64,
    user: (u32, u32),
    /// The decrypted GitHub token, when the job has one.
    token: Option<SecretString>,
    /// Every secret of this job: agent secrets, the token, secret-named env values.
    masker: Masker,
}

fn plan(executor: &Executor, job: &JobSpec) -> Result<Plan, String> {
    let settings = &executor.settings;
    let pipeline = Pipeline::from_b64(&job.pipeline_b64).map_err(|e| e.to_string())?;
    if let Some(url) = git_url(job) {
        validate_url(url, &settings.checkout).map_err(|e| e.to_string())?;
    }
    let Limits {
        memory_bytes,
        memory_text,
        nano_cpus,
    } = limits(settings, job, &pipeline)?;
    let user = parse_user(&settings.docker.user)
        .map_err(|e| format!("invalid docker.user setting: {e}"))?;
    let image = job
        .docker_image
        .clone()
        .filter(|i| !i.trim().is_empty())
        .or_else(|| pipeline.image().map(str::to_owned))
        .unwrap_or_else(|| settings.docker.image.clone());
    if !executor.allowed_images.is_match(&image) {
        return Err(format!(
            "image `{image}` is not allowed on this agent (docker.allowed_images: {})",
            settings.docker.allowed_images.join(", ")
        ));
    }

    // Later layers win: agent defaults < the job's env_vars < the pipeline's env < agent facts.
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("HOME".into(), "/tmp".into());
    env.insert("CI".into(), "true".into());
    check_env_size(&job.env_vars)?;
    for (name, value) in &job.env_vars {
        if !valid_env_name(name) || value.contains('\0') {
            return Err(format!(
                "invalid env_vars entry `{}`: names must be non-empty without `=`, values without NUL",
                name.escape_debug()
            ));
        }
        env.insert(name.clone(), value.clone());
    }
    if let Pipeline::Yaml(p) = &pipeline {
        for (name, value) in p.env_pairs() {
            env.insert(name.to_owned(), value.to_owned());
        }
    }
    env.insert("GRYT_WORKSPACE".into(), WORKSPACE.into());
    env.insert("GRYT_JOB_ID".into(), job.job_id.to_string());
    let token = decrypt_token(executor, job)?;
    // The pipeline's variables, its steps' included: a secret-named one is masked wherever
    // it is set.
    let pipeline_env: Vec<(&str, &str)> = match &pipeline {
        Pipeline::Yaml(p) => p
            .env_pairs()
            .chain(
                p.steps
                    .iter()
                    .flat_map(|s| s.env.iter().map(|(k, v)| (k.as_str(), v.0.as_str()))),
            )
            .collect(),
        Pipeline::Gryt { .. } => Vec::new(),
    };
    let names = &executor.secret_names;
    let secrets = executor
        .settings
        .agent_secrets
        .iter()
        .map(|s| s.expose_secret())
        .chain(token.as_ref().map(|t| t.expose_secret()))
        .chain(names.secret_values(&job.env_vars))
        .chain(
            pipeline_env
                .iter()
                .filter(|(k, _)| names.matches(k))
                .map(|(_, v)| *v),
        );
    let masker = Masker::new(secrets);
    let env = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    Ok(Plan {
        pipeline,
        image,
        env,
        memory_bytes,
        memory_text,
        nano_cpus,
        user,
        token,
        masker,
    })
}

/// The job's memory and CPU limits, and its steps' time limits: parsed, and refused above the
/// operator's maximum (`docker.max_memory`, `docker.max_cpus`, `job.max_timeout_seconds`).
struct Limits {
    memory_bytes: i64,
    memory_text: String,
    nano_cpus: i64,
}

fn limits(
    settings: &super::ExecutorSettings,
    job: &JobSpec,
    pipeline: &Pipeline,
) -> Result<Limits, String> {
    let memory_text = job
        .memory_limit
        .clone()
        .unwrap_or_else(|| settings.docker.memory_limit.clone());
    let memory_bytes =
        parse_memory(&memory_text).map_err(|e| format!("invalid memory_limit: {e}"))?;
    let (max_memory, max_memory_text) = &settings.max_memory;
    at_most(
        "memory_limit",
        &memory_text,
        memory_bytes,
        *max_memory,
        "docker.max_memory",
        max_memory_text,
    )
    .map_err(|e| e.to_string())?;
    let cpu_text = job
        .cpu_limit
        .clone()
        .unwrap_or_else(|| settings.docker.cpu_limit.clone());
    let nano_cpus = parse_cpus(&cpu_text).map_err(|e| format!("invalid cpu_limit: {e}"))?;
    let (max_cpus, max_cpus_text) = &settings.max_nano_cpus;
    at_most(
        "cpu_limit",
        &cpu_text,
        nano_cpus,
        *max_cpus,
        "docker.max_cpus",
        max_cpus_text,
    )
    .map_err(|e| e.to_string())?;
    if let Pipeline::Yaml(p) = pipeline {
        for (i, step) in p.steps.iter().enumerate() {
            if let Some(t) = step.timeout_seconds {
                let field = format!("steps[{i}].timeout_seconds");
                bounded_seconds(
                    &field,
                    t,
                    settings.job.max_timeout_seconds,
                    MAX_TIMEOUT_SETTING,
                )
                .map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(Limits {
        memory_bytes,
        memory_text,
        nano_cpus,
    })
}

fn git_url(job: &JobSpec) -> Option<&str> {
    job.git_url
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty())
}

/// Most `env_vars` entries a job may have, and their total size. A process's environment shares
/// the kernel's argument space (a few MiB): past it, every exec in the container fails with
/// E2BIG, so refuse clearly up front instead.
pub const MAX_ENV_VARS: usize = 1000;
pub const MAX_ENV_BYTES: usize = 1024 * 1024;

fn check_env_size(env: &BTreeMap<String, String>) -> Result<(), String> {
    if env.len() > MAX_ENV_VARS {
        return Err(format!(
            "env_vars has {} entries; at most {MAX_ENV_VARS} are allowed",
            env.len()
        ));
    }
    let bytes: usize = env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    if bytes > MAX_ENV_BYTES {
        return Err(format!(
            "env_vars hold {bytes} bytes; at most {MAX_ENV_BYTES} are allowed"
        ));
    }
    Ok(())
}

/// The job's GitHub token in clear, or an error that never holds token or key bytes. A job with
/// a token is never run without it (a clone would fail later, or worse, half-succeed).
fn decrypt_token(executor: &Executor, job: &JobSpec) -> Result<Option<SecretString>, String> {
    let Some(encrypted) = job
        .github_token_encrypted
        .as_deref()
        .filter(|t| !t.trim().is_empty())
    else {
        return Ok(None);
    };
    let Some(keys) = &executor.token_keys else {
        return Err(
            "the job has a github_token_encrypted but GRYT_ENCRYPTION_KEY is not set on this agent"
                .into(),
        );
    };
    keys.decrypt(encrypted)
        .map(|d| Some(d.plaintext))
        .map_err(|e| e.to_string())
}

async fn prepare_and_run(
    executor: &Executor,
    job: &JobSpec,
    run: &mut Run<'_>,
    control: &JobControl,
    deadline: Instant,
    timeout: Duration,
) -> Outcome {
    let plan = match plan(executor, job) {
        Ok(plan) => plan,
        Err(message) => return Outcome::Error(message),
    };
    run.set_masker(plan.masker.clone());
    if let Pipeline::Gryt { .. } = plan.pipeline {
        run.gryt = Some(Default::default());
    }
    let settings = &executor.settings;
    let docker = match executor.docker().await {
        Ok(docker) => docker,
        Err(e) => return Outcome::Error(e.to_string()),
    };

    // The image: bounded by the job's deadline and by stop requests like everything else.
    let observer = run.observer;
    let image_name = plan.image.clone();
    // Held until the container is gone: the disk collector never removes it under the job.
    let _image_hold = settings.image_use.begin(&plan.image);
    let pull = image::ensure(
        &docker,
        &plan.image,
        settings.docker.pull_policy,
        |p| match p {
            PullProgress::Started => observer.event(JobEvent::PullStarted { image: &image_name }),
            PullProgress::Status(s) => observer.event(JobEvent::PullStatus {
                image: &image_name,
                status: &s,
            }),
            PullProgress::Done => observer.event(JobEvent::PullFinished { image: &image_name }),
        },
    );
    tokio::select! {
    result = pull => if let Err(e) = result {
                if matches!(e, image::ImageError::Pull { .. }) {
                    observer.event(JobEvent::PullFailed { image: &image_name });
                }
                return Outcome::Error(e.to_string());
            },
            _ = tokio::time::sleep_until(deadline) => {
                return Outcome::TimedOut { exit_code: None, error: format!("job timed out after {}s while getting image {}", timeout.as_secs(), plan.image) };
            }
            request = control.stopped() => return cancelled(request, None),
        }

    let job_id = job.job_id.to_string();
    let cleaner = JobUserCleaner {
        docker: &docker,
        image: &plan.image,
        user: plan.user,
        agent_id: &settings.agent_id,
        job_id: &job_id,
        extra_labels: &settings.extra_labels,
    };
    let created = Workspace::create(
        &settings.work_dir,
        &settings.agent_id,
        job.job_id,
        plan.user.0,
        plan.user.1,
    );
    let workspace = match created.await {
        Ok(w) => w,
        Err(e) => {
            return Outcome::Error(format!(
                "cannot create the job workspace under {}: {e}",
                settings.work_dir.display()
            ));
        }
    };
    if let Some(url) = git_url(job) {
        let request = CheckoutRequest {
            url,
            branch: job.branch(),
            commit: job
                .git_commit
                .as_deref()
                .map(str::trim)
                .filter(|c| !c.is_empty()),
            token: plan.token.as_ref(),
        };
        // The clone gets what is left of the job's time (its own limit permitting) and stops
        // when the job is stopped: it never outlives the job.
        let mut limits = settings.checkout.clone();
        limits.timeout = limits
            .timeout
            .min(deadline.saturating_duration_since(Instant::now()));
        let cloned = checkout_until(&request, workspace.path(), &limits, async {
            control.stopped().await;
        })
        .await;
        let job_deadline_passed = Instant::now() >= deadline;
        match cloned {
            Err(CheckoutError::Stopped { .. }) => {
                let request = control.request().unwrap_or(StopRequest {
                    kind: StopKind::Immediate,
                    reason: "stopped".into(),
                });
                cleanup(None, workspace, &cleaner).await;
                return cancelled(request, None);
            }
            Err(CheckoutError::Timeout { .. }) if job_deadline_passed => {
                cleanup(None, workspace, &cleaner).await;
                return Outcome::TimedOut {
                    exit_code: None,
                    error: format!(
                        "job timed out after {}s while cloning {url}",
                        timeout.as_secs()
                    ),
                };
            }
            Ok(done) => run.observer.event(JobEvent::CheckedOut {
                url,
                commit: &done.commit,
            }),
            Err(e) => {
                cleanup(None, workspace, &cleaner).await;
                return Outcome::Error(e.to_string());
            }
        }
        if let Err(e) = workspace.hand_over(plan.user.0, plan.user.1).await {
            cleanup(None, workspace, &cleaner).await;
            return Outcome::Error(format!("cannot give the checkout to the job's user: {e}"));
        }
    }
    let written = workspace.write_file(plan.pipeline.file_name(), plan.pipeline.text());
    if let Err(e) = written.await {
        cleanup(None, workspace, &cleaner).await;
        return Outcome::Error(format!("cannot write the pipeline into the workspace: {e}"));
    }

    // Artifacts and caches (`crate::store`): checked and restored before any container.
    let storage = crate::store::JobStorage::before_steps(
        settings.store.as_ref(),
        job,
        &plan.pipeline,
        workspace.path(),
        plan.user,
        control,
        &mut |line| run.output(OutputStream::Stderr, line.as_bytes()),
    )
    .await;
    let storage = match storage {
        Ok(storage) => storage,
        Err(message) => {
            cleanup(None, workspace, &cleaner).await;
            return Outcome::Error(message);
        }
    };

    let mut labels = std::collections::HashMap::new();
    labels.insert(LABEL_MANAGED.to_owned(), "true".to_owned());
    labels.insert(LABEL_AGENT_ID.to_owned(), settings.agent_id.clone());
    labels.insert(LABEL_JOB_ID.to_owned(), job.job_id.to_string());
    labels.extend(settings.extra_labels.iter().cloned());
    let spec = ContainerSpec {
        name: format!("gryt-{}", workspace.unique_name()),
        image: plan.image.clone(),
        workspace_host_path: workspace.path().to_string_lossy().into_owned(),
        env: plan.env.clone(),
        labels,
        user: format!("{}:{}", plan.user.0, plan.user.1),
        network: settings.docker.network.clone(),
        pids_limit: settings.docker.pids_limit,
        memory_bytes: plan.memory_bytes,
        nano_cpus: plan.nano_cpus,
        main_command: single_command(&plan.pipeline, &settings.job.gryt_command),
    };
    let container = match JobContainer::start(&docker, spec).await {
        Ok(c) => c,
        Err(e) => {
            cleanup(None, workspace, &cleaner).await;
            return Outcome::Error(e.to_string());
        }
    };

    let grace = Duration::from_secs(settings.job.stop_grace_seconds.min(MAX_SECONDS_CEILING));
    let ctx = Context {
        container: &container,
        control,
        deadline,
        grace,
        timeout,
        memory: &plan.memory_text,
    };
    let outcome = match &plan.pipeline {
        Pipeline::Yaml(p) => run_steps(&ctx, p, run).await,
        Pipeline::Gryt { .. } => {
            run_gryt(&ctx, gryt_command(&settings.job.gryt_command), run).await
        }
    };
    let end = match &outcome {
        Outcome::Finished { success: true, .. } => crate::store::JobEnd::Success,
        Outcome::Finished { .. } | Outcome::TimedOut { .. } => crate::store::JobEnd::Failure,
        Outcome::Cancelled { .. } | Outcome::Error(_) => crate::store::JobEnd::Stopped,
    };
    let stored = storage
        .after_steps(end, workspace.path(), control, &mut |line| {
            run.output(OutputStream::Stderr, line.as_bytes())
        })
        .await;
    let outcome = match stored {
        Ok(artifacts) => {
            run.artifacts = artifacts;
            outcome
        }
        Err(message) => Outcome::Error(message),
    };
    cleanup(Some(container), workspace, &cleaner).await;
    outcome
}

/// Removes the container, then the workspace. The container goes first: removing it kills
/// every job process at once (a fork bomb at its pids limit included), so nothing writes into
/// the workspace any more. What the agent may not delete (agent not root) the job's user
/// empties from a short-lived container of its own (see `workspace::empty_as_job_user`).
async fn cleanup(
    container: Option<JobContainer>,
    workspace: Workspace,
    cleaner: &JobUserCleaner<'_>,
) {
    if let Some(mut container) = container {
        container.remove().await;
    }
    let path = workspace.path().to_owned();
    if let Err(e) = workspace.remove(Some(cleaner)).await {
        tracing::error!(workspace = %path.display(), error = %e, "cannot remove the job workspace");
    }
}

struct Context<'a> {
    container: &'a JobContainer,
    control: &'a JobControl,
    deadline: Instant,
    grace: Duration,
    timeout: Duration,
    memory: &'a str,
}

impl Context<'_> {
    fn oom_message(&self) -> String {
        format!(
            "out of memory: a job process was killed by the kernel (memory limit {})",
            self.memory
        )
    }
}

fn cancelled(request: StopRequest, exit_code: Option<i64>) -> Outcome {
    let reason = match request.kind {
        StopKind::Graceful => format!("job cancelled: {}", request.reason),
        StopKind::Immediate => format!("job aborted: {}", request.reason),
    };
    Outcome::Cancelled { exit_code, reason }
}

async fn run_steps(ctx: &Context<'_>, pipeline: &YamlPipeline, run: &mut Run<'_>) -> Outcome {
    let mut outcome: Option<Outcome> = None;
    for (index, step) in pipeline.steps.iter().enumerate() {
        // Masked here, where it is made: observers see it before the result does (a name falls
        // back to the script's first line, which may hold a secret).
        let name = run.masker.mask_str(&step.display_name(index));
        if outcome.is_some() {
            run.steps.push(StepResult {
                name,
                status: StepStatus::Skipped,
                exit_code: None,
                duration_seconds: 0.0,
                error: None,
            });
            continue;
        }
        run.observer
            .event(JobEvent::StepStarted { index, name: &name });
        let step_clock = Instant::now();
        let step_deadline = match step.timeout_seconds {
            Some(t) => ctx.deadline.min(step_clock + Duration::from_secs(t)),
            None => ctx.deadline,
        };
        let end = run_command(
            ctx.container,
            step_command(step),
            step_deadline,
            ctx.grace,
            ctx.control,
            &mut |s, d| run.output(s, d),
        )
        .await;

        let mut result = StepResult {
            name,
            status: StepStatus::Success,
            exit_code: None,
            duration_seconds: step_clock.elapsed().as_secs_f64(),
            error: None,
        };
        match end {
            CommandEnd::Exited(code) => {
                result.exit_code = code;
                if code != Some(0) {
                    result.status = StepStatus::Failed;
                    if code == Some(137) && ctx.container.settle_oom().await {
                        run.oom_killed = true;
                        result.error = Some(ctx.oom_message());
                    } else if code.is_none() {
                        result.error = Some("the step ended without an exit code".into());
                    }
                    if !step.continue_on_error {
                        let error = result.error.clone();
                        outcome = Some(Outcome::Finished {
                            success: false,
                            exit_code: code.unwrap_or(-1),
                            error,
                        });
                    }
                }
            }
            CommandEnd::TimedOut(code) => {
                result.exit_code = code;
                result.status = StepStatus::Timeout;
                let job_timed_out = step_deadline >= ctx.deadline;
                let error = if job_timed_out {
                    format!("job timed out after {}s", ctx.timeout.as_secs())
                } else {
                    format!(
                        "step timed out after {}s",
                        step.timeout_seconds.unwrap_or_default()
                    )
                };
                result.error = Some(error.clone());
                if job_timed_out || !step.continue_on_error {
                    outcome = Some(Outcome::TimedOut {
                        exit_code: code,
                        error,
                    });
                }
            }
            CommandEnd::Stopped(request, code) => {
                result.exit_code = code;
                result.status = StepStatus::Cancelled;
                result.error = Some(request.reason.clone());
                outcome = Some(cancelled(request, code));
            }
            CommandEnd::Failed(message) => {
                result.status = StepStatus::Failed;
                result.error = Some(message.clone());
                outcome = Some(Outcome::Error(message));
            }
        }
        result.error = result.error.map(|e| run.masker.mask_str(&e));
        run.observer.event(JobEvent::StepFinished {
            index,
            step: &result,
        });
        run.steps.push(result);
    }
    outcome.unwrap_or(Outcome::Finished {
        success: true,
        exit_code: 0,
        error: None,
    })
}

/// The command of a YAML step: its script under `sh -c`, with the step's own variables.
fn step_command(step: &Step) -> JobCommand {
    JobCommand {
        cmd: vec!["/bin/sh".to_owned(), "-c".to_owned(), step.run.clone()],
        env: step
            .env
            .iter()
            .map(|(k, v)| format!("{k}={}", v.0))
            .collect(),
    }
}

/// `gryt run` as configured: the setting's argv, no variables beyond the job's.
fn gryt_command(gryt_command: &[String]) -> JobCommand {
    JobCommand {
        cmd: gryt_command.to_vec(),
        env: Vec::new(),
    }
}

/// The job's only command when it has exactly one (a gryt pipeline, a one-step YAML pipeline):
/// it can run as the container's main process. Built by the same functions `run_steps` and
/// `run_gryt` use, so the runner asks for the command that is already running.
fn single_command(pipeline: &Pipeline, gryt_argv: &[String]) -> Option<JobCommand> {
    match pipeline {
        Pipeline::Yaml(p) if p.steps.len() == 1 => p.steps.first().map(step_command),
        Pipeline::Yaml(_) => None,
        Pipeline::Gryt { .. } => Some(gryt_command(gryt_argv)),
    }
}

async fn run_gryt(ctx: &Context<'_>, command: JobCommand, run: &mut Run<'_>) -> Outcome {
    let end = run_command(
        ctx.container,
        command,
        ctx.deadline,
        ctx.grace,
        ctx.control,
        &mut |s, d| run.output(s, d),
    )
    .await;
    match end {
        CommandEnd::Exited(code) => {
            // gryt's report is the end of its stdout: release what the masker still holds
            // back before reading it.
            run.flush_masks();
            let code = code.unwrap_or(-1);
            let oom = code == 137 && ctx.container.settle_oom().await;
            let verdict = match &run.gryt {
                Some((report, errors)) => gryt_report::verdict(code, report, errors),
                None => gryt_report::verdict_of_text(code, "", ""),
            };
            // Masked again after parsing: a secret that JSON escaped in the report (a `"` or
            // `\` in it) passed the output masker and is whole again now.
            run.steps = verdict
                .steps
                .into_iter()
                .map(|mut step| {
                    step.name = run.masker.mask_str(&step.name);
                    step.error = step.error.map(|e| run.masker.mask_str(&e));
                    step
                })
                .collect();
            if oom {
                run.oom_killed = true;
                return Outcome::Finished {
                    success: false,
                    exit_code: code,
                    error: Some(ctx.oom_message()),
                };
            }
            Outcome::Finished {
                success: verdict.success,
                exit_code: verdict.exit_code,
                error: verdict.reason,
            }
        }
        CommandEnd::TimedOut(code) => Outcome::TimedOut {
            exit_code: code,
            error: format!("job timed out after {}s", ctx.timeout.as_secs()),
        },
        CommandEnd::Stopped(request, code) => cancelled(request, code),
        CommandEnd::Failed(message) => Outcome::Error(message),
    }
}
