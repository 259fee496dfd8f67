//! The job's plan: everything about a job that can be checked without Docker (pipeline, limits,
//! timeouts, image allowed, environment, token decryption, the secret set). Pure: it decides
//! before anything is pulled, created or started, so a refused job leaves nothing behind.

use std::collections::BTreeMap;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::container::WORKSPACE;
use super::limits::{at_most, bounded_seconds, parse_cpus, parse_memory};
use super::services::plan::{ServicePlan, plan_services};
use super::{Executor, ExecutorSettings};
use crate::checkout::validate_url;
use crate::pipeline::Pipeline;
use crate::pipeline::env::valid_env_name;
use crate::secrets::mask::Masker;
use crate::wire::JobSpec;

/// The job's time limit: its own `timeout_seconds` (0 or none: the agent's default), refused
/// above `job.max_timeout_seconds` before it can feed a clock.
pub(super) fn job_timeout(settings: &ExecutorSettings, job: &JobSpec) -> Result<Duration, String> {
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
pub(super) struct Plan {
    pub pipeline: Pipeline,
    pub image: String,
    pub env: Vec<String>,
    pub memory_bytes: i64,
    pub memory_text: String,
    pub nano_cpus: i64,
    pub user: (u32, u32),
    /// The decrypted GitHub token, when the job has one.
    pub token: Option<SecretString>,
    /// Every secret of this job: agent secrets, the token, secret-named env values (the
    /// services' included).
    pub masker: Masker,
    /// The service containers to start before the first step (`services/plan.rs`).
    pub services: Vec<ServicePlan>,
}

pub(super) fn plan(executor: &Executor, job: &JobSpec) -> Result<Plan, String> {
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
    let user = settings.docker.job_user.ids();
    let image = image(executor, job, &pipeline)?;
    let env = environment(job, &pipeline)?;
    let services = plan_services(executor, job, &pipeline)?;
    let token = decrypt_token(executor, job)?;
    let masker = secret_set(executor, job, &pipeline, token.as_ref());
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
        services,
    })
}

/// The job's image (the job's, else the pipeline's, else the agent's default), refused unless
/// `docker.allowed_images` allows it.
fn image(executor: &Executor, job: &JobSpec, pipeline: &Pipeline) -> Result<String, String> {
    let settings = &executor.settings;
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
    Ok(image)
}

/// The job's environment as `NAME=value`. Later layers win: agent defaults < the job's
/// `env_vars` < the pipeline's env < agent facts.
fn environment(job: &JobSpec, pipeline: &Pipeline) -> Result<Vec<String>, String> {
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
    if let Pipeline::Yaml(p) = pipeline {
        for (name, value) in p.env_pairs() {
            env.insert(name.to_owned(), value.to_owned());
        }
    }
    env.insert("GRYT_WORKSPACE".into(), WORKSPACE.into());
    env.insert("GRYT_JOB_ID".into(), job.job_id.to_string());
    Ok(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

/// Every secret of this job, to mask: the agent's own, the token, and secret-named variables
/// of the job and of the pipeline, its steps' included (masked wherever they are set).
fn secret_set(
    executor: &Executor,
    job: &JobSpec,
    pipeline: &Pipeline,
    token: Option<&SecretString>,
) -> Masker {
    let pipeline_env: Vec<(&str, &str)> = match pipeline {
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
    let services = super::services::plan::secret_values(executor, job, pipeline);
    let secrets = executor
        .settings
        .agent_secrets
        .iter()
        .map(|s| s.expose_secret())
        .chain(token.map(|t| t.expose_secret()))
        .chain(names.secret_values(&job.env_vars))
        .chain(
            pipeline_env
                .iter()
                .filter(|(k, _)| names.matches(k))
                .map(|(_, v)| *v),
        )
        .chain(services.iter().map(String::as_str));
    Masker::new(secrets)
}

/// The job's memory and CPU limits, and its steps' time limits: parsed, and refused above the
/// operator's maximum (`docker.max_memory`, `docker.max_cpus`, `job.max_timeout_seconds`).
struct Limits {
    memory_bytes: i64,
    memory_text: String,
    nano_cpus: i64,
}

fn limits(
    settings: &ExecutorSettings,
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

pub(super) fn git_url(job: &JobSpec) -> Option<&str> {
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

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;

    use super::*;
    use crate::config::Settings;

    fn executor(change: impl FnOnce(&mut Settings)) -> Executor {
        let mut settings = Settings::load_from(None, &[], &[]).unwrap();
        change(&mut settings);
        let settings = ExecutorSettings::from_settings(&settings, "t".into()).unwrap();
        Executor::new(settings).unwrap()
    }

    fn job(pipeline: &str) -> JobSpec {
        JobSpec {
            job_id: 7,
            pipeline_b64: STANDARD.encode(pipeline),
            ..JobSpec::default()
        }
    }

    const ONE_STEP: &str = "version: 1\nsteps:\n  - run: echo hi";

    fn refused(executor: &Executor, job: &JobSpec) -> String {
        match plan(executor, job) {
            Ok(_) => panic!("the plan must refuse this job"),
            Err(message) => message,
        }
    }

    #[test]
    fn a_plain_job_gets_the_default_image_limits_and_environment() {
        let executor = executor(|_| {});
        let plan = plan(&executor, &job(ONE_STEP)).unwrap();
        assert_eq!(plan.image, executor.settings.docker.image);
        assert!(plan.env.contains(&"CI=true".to_owned()), "{:?}", plan.env);
        assert!(
            plan.env.contains(&"GRYT_JOB_ID=7".to_owned()),
            "{:?}",
            plan.env
        );
        assert!(plan.memory_bytes > 0 && plan.nano_cpus > 0);
        assert!(plan.token.is_none());
    }

    #[test]
    fn an_image_outside_the_allowed_list_is_refused() {
        let executor = executor(|s| s.docker.allowed_images = vec!["alpine:*".into()]);
        let mut job = job(ONE_STEP);
        job.docker_image = Some("evil/miner:latest".into());
        let message = refused(&executor, &job);
        assert!(message.contains("evil/miner:latest"), "{message}");
        assert!(message.contains("docker.allowed_images"), "{message}");
    }

    #[test]
    fn a_job_timeout_above_the_maximum_is_refused_and_names_the_setting() {
        let executor = executor(|s| s.job.max_timeout_seconds = 60);
        let mut job = job(ONE_STEP);
        job.timeout_seconds = Some(61);
        let message = job_timeout(&executor.settings, &job).unwrap_err();
        assert!(message.contains("timeout_seconds"), "{message}");
        assert!(message.contains(MAX_TIMEOUT_SETTING), "{message}");
        job.timeout_seconds = Some(60);
        assert_eq!(
            job_timeout(&executor.settings, &job),
            Ok(Duration::from_secs(60))
        );
    }

    #[test]
    fn a_step_timeout_above_the_maximum_is_refused() {
        let executor = executor(|s| s.job.max_timeout_seconds = 60);
        let job = job("version: 1\nsteps:\n  - run: echo hi\n    timeout_seconds: 61");
        let message = refused(&executor, &job);
        assert!(message.contains("steps[0].timeout_seconds"), "{message}");
    }

    #[test]
    fn memory_above_the_operator_maximum_is_refused() {
        let executor = executor(|_| {});
        let mut job = job(ONE_STEP);
        job.memory_limit = Some("100000g".into());
        let message = refused(&executor, &job);
        assert!(message.contains("memory_limit"), "{message}");
        assert!(message.contains("docker.max_memory"), "{message}");
    }

    #[test]
    fn too_many_env_vars_are_refused() {
        let executor = executor(|_| {});
        let mut job = job(ONE_STEP);
        job.env_vars = (0..=MAX_ENV_VARS)
            .map(|i| (format!("V{i}"), "x".into()))
            .collect();
        let message = refused(&executor, &job);
        assert!(message.contains("env_vars"), "{message}");
    }

    #[test]
    fn a_token_without_an_encryption_key_is_refused_not_skipped() {
        let executor = executor(|_| {});
        let mut job = job(ONE_STEP);
        job.github_token_encrypted = Some("anything".into());
        let message = refused(&executor, &job);
        assert!(message.contains("GRYT_ENCRYPTION_KEY"), "{message}");
    }

    #[test]
    fn secret_named_values_from_the_job_its_steps_and_services_are_masked() {
        let executor = executor(|s| s.docker.network = "job".into());
        let pipeline =
            "version: 1\nsteps:\n  - run: echo hi\n    env:\n      STEP_TOKEN: step-value-1\n";
        let mut job = job(pipeline);
        job.env_vars
            .insert("API_SECRET".into(), "job-value-2".into());
        job.env_vars.insert("PLAIN".into(), "plain-value-3".into());
        job.services = vec![crate::wire::ServiceSpec {
            name: "db".into(),
            image: "postgres:16".into(),
            env: [("DB_PASSWORD".to_string(), "svc-value-4".to_string())].into(),
            ..Default::default()
        }];
        let plan = plan(&executor, &job).unwrap();
        let masked = plan
            .masker
            .mask_str("step-value-1 job-value-2 plain-value-3 svc-value-4");
        assert_eq!(masked, "[MASKED] [MASKED] plain-value-3 [MASKED]");
    }
}
