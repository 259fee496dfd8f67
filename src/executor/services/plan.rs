//! The services' part of the job's plan: which services a job runs and whether this agent lets
//! it. Pure, like the rest of the plan: a refused service leaves nothing behind.
//!
//! The pipeline's `services:` and the job spec's `services` are combined (the pipeline's first);
//! a name given in both is refused, since the job could reach only one of them by it.

use std::time::Duration;

use crate::executor::Executor;
use crate::executor::limits::bounded_seconds;
use crate::pipeline::Pipeline;
use crate::pipeline::services::check_services;
use crate::wire::{JobSpec, ServiceCommand, ServiceSpec};

/// The `docker.network` mode services need: a network of the job's own, where their names
/// are aliases no other job can answer to (on a shared network, two jobs' `db` would be one
/// name for both).
pub(crate) const JOB_NETWORK: &str = crate::executor::network::MODE_JOB;

/// One service as it will be started.
#[derive(Debug, Clone)]
pub(crate) struct ServicePlan {
    pub name: String,
    pub image: String,
    /// `NAME=value`, the service's own entries only (none of the job's).
    pub env: Vec<String>,
    /// `(entrypoint, cmd)` overrides; `None` keeps the image's.
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub ready_port: Option<u16>,
    pub ready_timeout: Duration,
}

/// The job's services: the pipeline's and the spec's together, checked, counted against
/// `job.max_services`, their images against `docker.allowed_images` and their
/// `ready_timeout_seconds` against `job.max_timeout_seconds`.
pub(crate) fn plan_services(
    executor: &Executor,
    job: &JobSpec,
    pipeline: &Pipeline,
) -> Result<Vec<ServicePlan>, String> {
    let settings = &executor.settings;
    let field = |(f, m): (String, String)| format!("invalid field `{f}`: {m}");
    check_services("services", &job.services).map_err(field)?;
    let mut all = match pipeline {
        Pipeline::Yaml(p) => p.service_specs(),
        Pipeline::Gryt { .. } => Vec::new(),
    };
    let from_pipeline = all.len();
    all.extend(job.services.iter().cloned());
    if all.is_empty() {
        return Ok(Vec::new());
    }
    let network = &settings.docker.network;
    if network != JOB_NETWORK {
        return Err(format!(
            "the job has services, which need a network of the job's own: this agent's \
             docker.network is `{network}`, services need `{JOB_NETWORK}`"
        ));
    }
    let max = settings.job.max_services;
    if all.len() > max {
        return Err(format!(
            "the job asks for {} services; this agent allows at most {max} (job.max_services)",
            all.len()
        ));
    }
    // Each list passed on its own; what is left is a name in both.
    if check_services("services", &all).is_err() {
        let dup = all[from_pipeline..]
            .iter()
            .find(|s| {
                all[..from_pipeline]
                    .iter()
                    .any(|p| p.name.eq_ignore_ascii_case(&s.name))
            })
            .map(|s| s.name.clone())
            .unwrap_or_default();
        return Err(format!(
            "service `{dup}` is in both the pipeline's `services` and the job's; give it once"
        ));
    }
    all.iter().map(|s| plan_one(executor, s)).collect()
}

fn plan_one(executor: &Executor, spec: &ServiceSpec) -> Result<ServicePlan, String> {
    let settings = &executor.settings;
    let name = &spec.name;
    if !executor.allowed_images.is_match(&spec.image) {
        return Err(format!(
            "service `{name}`: image `{}` is not allowed on this agent (docker.allowed_images: {})",
            spec.image,
            settings.docker.allowed_images.join(", ")
        ));
    }
    let ready_timeout = bounded_seconds(
        &format!("service `{name}` ready_timeout_seconds"),
        spec.ready_timeout(),
        settings.job.max_timeout_seconds,
        "job.max_timeout_seconds",
    )
    .map_err(|e| e.to_string())?;
    let (entrypoint, cmd) = match &spec.command {
        None => (None, None),
        Some(ServiceCommand::Args(args)) => (None, Some(args.clone())),
        Some(ServiceCommand::Shell(line)) => (
            Some(vec!["/bin/sh".to_owned(), "-c".to_owned()]),
            Some(vec![line.clone()]),
        ),
    };
    Ok(ServicePlan {
        name: name.clone(),
        image: spec.image.clone(),
        env: spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        entrypoint,
        cmd,
        ready_port: spec.ready_port,
        ready_timeout,
    })
}

/// The values of the services' secret-named variables, for the job's masker.
pub(crate) fn secret_values(
    executor: &Executor,
    job: &JobSpec,
    pipeline: &Pipeline,
) -> Vec<String> {
    let names = &executor.secret_names;
    let pipeline_services = match pipeline {
        Pipeline::Yaml(p) => p.service_specs(),
        Pipeline::Gryt { .. } => Vec::new(),
    };
    pipeline_services
        .iter()
        .chain(&job.services)
        .flat_map(|s| names.secret_values(&s.env).map(str::to_owned))
        .collect()
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;

    use super::*;
    use crate::config::Settings;
    use crate::executor::ExecutorSettings;

    fn executor(change: impl FnOnce(&mut Settings)) -> Executor {
        let mut settings = Settings::load_from(None, &[], &[]).unwrap();
        settings.docker.network = JOB_NETWORK.into();
        change(&mut settings);
        let settings = ExecutorSettings::from_settings(&settings, "t".into()).unwrap();
        Executor::new(settings).unwrap()
    }

    fn job(pipeline: &str, services: Vec<ServiceSpec>) -> (JobSpec, Pipeline) {
        let spec = JobSpec {
            job_id: 7,
            pipeline_b64: STANDARD.encode(pipeline),
            services,
            ..JobSpec::default()
        };
        let pipeline = Pipeline::from_b64(&spec.pipeline_b64).unwrap();
        (spec, pipeline)
    }

    fn service(name: &str, image: &str) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            image: image.into(),
            ..Default::default()
        }
    }

    const WITH_DB: &str = "version: 1\nsteps:\n  - run: x\nservices:\n  - name: db\n    image: postgres:16\n    env: {POSTGRES_PASSWORD: pw-secret-1}\n    ready_port: 5432\n";

    #[test]
    fn the_pipelines_and_the_specs_services_combine_in_order() {
        let executor = executor(|_| {});
        let (spec, pipeline) = job(WITH_DB, vec![service("cache", "redis:7")]);
        let plans = plan_services(&executor, &spec, &pipeline).unwrap();
        let names: Vec<&str> = plans.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["db", "cache"]);
        assert_eq!(plans[0].env, ["POSTGRES_PASSWORD=pw-secret-1"]);
        assert_eq!(plans[0].ready_timeout, Duration::from_secs(60));
        assert_eq!(
            (plans[0].entrypoint.as_ref(), plans[0].cmd.as_ref()),
            (None, None)
        );
    }

    #[test]
    fn services_need_a_network_of_the_jobs_own() {
        for network in ["bridge", "none", "shared-net"] {
            let executor = executor(|s| s.docker.network = network.into());
            let (spec, pipeline) = job(WITH_DB, vec![]);
            let message = plan_services(&executor, &spec, &pipeline).unwrap_err();
            assert!(message.contains("docker.network"), "{message}");
            let (spec, pipeline) = job("version: 1\nsteps:\n  - run: x\n", vec![]);
            assert!(
                plan_services(&executor, &spec, &pipeline)
                    .unwrap()
                    .is_empty()
            );
        }
    }

    #[test]
    fn a_name_in_both_places_is_refused() {
        let executor = executor(|_| {});
        let (spec, pipeline) = job(WITH_DB, vec![service("DB", "redis:7")]);
        let message = plan_services(&executor, &spec, &pipeline).unwrap_err();
        assert!(
            message.contains("`DB`") && message.contains("both"),
            "{message}"
        );
    }

    #[test]
    fn more_services_than_the_operator_allows_are_refused() {
        let executor = executor(|s| s.job.max_services = 1);
        let (spec, pipeline) = job(WITH_DB, vec![service("cache", "redis:7")]);
        let message = plan_services(&executor, &spec, &pipeline).unwrap_err();
        assert!(message.contains("job.max_services"), "{message}");
        let none = executor_with_no_services();
        let (spec, pipeline) = job("version: 1\nsteps:\n  - run: x\n", vec![]);
        assert!(plan_services(&none, &spec, &pipeline).unwrap().is_empty());
    }

    fn executor_with_no_services() -> Executor {
        executor(|s| s.job.max_services = 0)
    }

    #[test]
    fn a_service_image_outside_the_allowed_list_is_refused() {
        let executor =
            executor(|s| s.docker.allowed_images = vec!["ghcr.io/*".into(), "postgres:*".into()]);
        let (spec, pipeline) = job(WITH_DB, vec![service("miner", "evil/miner")]);
        let message = plan_services(&executor, &spec, &pipeline).unwrap_err();
        assert!(
            message.contains("`miner`") && message.contains("docker.allowed_images"),
            "{message}"
        );
    }

    #[test]
    fn a_ready_timeout_above_the_job_maximum_is_refused() {
        let executor = executor(|s| {
            s.job.max_timeout_seconds = 60;
            s.job.timeout_seconds = 60;
        });
        let mut slow = service("db", "postgres:16");
        slow.ready_timeout_seconds = Some(61);
        let (spec, pipeline) = job("version: 1\nsteps:\n  - run: x\n", vec![slow]);
        let message = plan_services(&executor, &spec, &pipeline).unwrap_err();
        assert!(message.contains("job.max_timeout_seconds"), "{message}");
    }

    #[test]
    fn a_bad_spec_entry_names_its_field() {
        let executor = executor(|_| {});
        let (spec, pipeline) = job(
            "version: 1\nsteps:\n  - run: x\n",
            vec![service("1db", "postgres")],
        );
        let message = plan_services(&executor, &spec, &pipeline).unwrap_err();
        assert!(message.contains("services[0].name"), "{message}");
    }

    #[test]
    fn a_shell_command_runs_under_sh_and_a_list_keeps_the_entrypoint() {
        let executor = executor(|_| {});
        let mut shell = service("web", "busybox");
        shell.command = Some(ServiceCommand::Shell("httpd -f".into()));
        let mut list = service("db", "postgres");
        list.command = Some(ServiceCommand::Args(vec!["postgres".into()]));
        let (spec, pipeline) = job("version: 1\nsteps:\n  - run: x\n", vec![shell, list]);
        let plans = plan_services(&executor, &spec, &pipeline).unwrap();
        assert_eq!(
            plans[0].entrypoint.as_deref(),
            Some(&["/bin/sh".to_owned(), "-c".to_owned()][..])
        );
        assert_eq!(plans[0].cmd.as_deref(), Some(&["httpd -f".to_owned()][..]));
        assert_eq!(plans[1].entrypoint, None);
        assert_eq!(plans[1].cmd.as_deref(), Some(&["postgres".to_owned()][..]));
    }

    #[test]
    fn secret_named_service_variables_are_collected() {
        let executor = executor(|_| {});
        let mut api = service("api", "fake");
        api.env = [
            ("API_TOKEN".to_string(), "tok-secret-2".to_string()),
            ("PLAIN".to_string(), "plain".to_string()),
        ]
        .into();
        let (spec, pipeline) = job(WITH_DB, vec![api]);
        let secrets = secret_values(&executor, &spec, &pipeline);
        assert_eq!(secrets, ["pw-secret-1", "tok-secret-2"]);
    }
}
