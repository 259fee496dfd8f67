//! One job from spec to result, in the order it happens: plan (`plan.rs`), image, workspace and
//! checkout, network, container, commands (`steps.rs`), the services' ends, the result; and,
//! once the workspace exists, one exit that hands the container, the network and the workspace
//! to the cleanup (`cleanup.rs`) whatever happened, which removes them after the result.

use std::time::Duration;

use bollard::Docker;
use secrecy::ExposeSecret;
use time::OffsetDateTime;
use tokio::time::Instant;

use super::cleanup::{Cleaner, Leftovers, Made};
use super::container::{ContainerSpec, JobContainer, MarkId, OutputStream, job_labels};
use super::control::{JobControl, StopKind, StopRequest};
use super::image::{self, PullProgress};
use super::limits::MAX_SECONDS_CEILING;
use super::network::{self, JobNetwork};
use super::output::Run;
use super::plan::{Plan, git_url, job_timeout, plan};
use super::resume::{Resume, unix_ms_of};
use super::services::{ServiceSetup, Services, await_ready, check_alive, not_started};
use super::steps::{
    Context, Outcome, Resuming, cancelled, gryt_command, run_gryt, run_steps, single_command,
};
use super::warm::Starting;
use super::workspace::Workspace;
use super::{Executor, JobEvent, JobObserver};
use crate::checkout::{CheckoutError, CheckoutRequest, checkout_until};
use crate::pipeline::Pipeline;
use crate::secrets::mask::Masker;
use crate::wire::{JobResult, JobSpec, JobStatus, ServiceResult, rfc3339};

/// What the job's stages share: the executor, the job, its plan, how to stop it and its clock.
pub(super) struct Job<'a> {
    pub(super) executor: &'a Executor,
    pub(super) started_at: OffsetDateTime,
    pub(super) job: &'a JobSpec,
    pub(super) plan: &'a Plan,
    pub(super) docker: &'a Docker,
    pub(super) control: &'a JobControl,
    pub(super) deadline: Instant,
    pub(super) timeout: Duration,
}

/// A stage that ends the job early says how, as the error.
type Stage<T = ()> = Result<T, Outcome>;

/// Runs the job and returns its result with what it left for the cleanup (`None` when it ended
/// before its workspace existed).
pub(super) async fn run(
    executor: &Executor,
    job: &JobSpec,
    observer: &dyn JobObserver,
    control: &JobControl,
) -> (JobResult, Option<Leftovers>) {
    let started_at = OffsetDateTime::now_utc();
    let clock = Instant::now();
    let agent_secrets = executor.settings.agent_secrets.iter();
    let masker = Masker::new(agent_secrets.map(|s| s.expose_secret()));
    let mut run = Run::new(observer, masker, executor.settings.job.output_cap_bytes);
    let (outcome, leftovers) = match job_timeout(&executor.settings, job) {
        Ok(timeout) => {
            let clock = (started_at, clock + timeout, timeout);
            match prepare_and_run(executor, job, &mut run, control, clock).await {
                Ok((outcome, leftovers)) => (outcome, Some(leftovers)),
                Err(early) => (early, None),
            }
        }
        Err(message) => (Outcome::Error(message), None),
    };
    run.flush_masks();
    (result(job, run, outcome, started_at, clock), leftovers)
}

/// The job's result from how it ended and what it printed; every text in it is masked.
pub(super) fn result(
    job: &JobSpec,
    run: Run<'_>,
    outcome: Outcome,
    started_at: OffsetDateTime,
    clock: Instant,
) -> JobResult {
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
        // Masked as they were read and made, in `services`.
        services: run.services,
    }
}

/// Plans the job, gets its image, makes its workspace, runs it there, and reads its services'
/// ends. Once the workspace exists, every path comes out here with the container, the network
/// and the workspace in the [`Leftovers`]: the one place they are handed to the cleanup.
async fn prepare_and_run(
    executor: &Executor,
    job: &JobSpec,
    run: &mut Run<'_>,
    control: &JobControl,
    (started_at, deadline, timeout): (OffsetDateTime, Instant, Duration),
) -> Stage<(Outcome, Leftovers)> {
    let starting = executor.warm.job_starting();
    let plan = plan(executor, job).map_err(Outcome::Error)?;
    run.set_masker(plan.masker.clone());
    if let Pipeline::Gryt { .. } = plan.pipeline {
        run.follow_gryt_report();
    }
    let docker = executor.docker().await;
    let docker = docker.map_err(|e| Outcome::Error(e.to_string()))?;
    let ctx = Job {
        executor,
        started_at,
        job,
        plan: &plan,
        docker: &docker,
        control,
        deadline,
        timeout,
    };
    let settings = &executor.settings;
    // Held until the containers are gone (by the cleanup): the disk collector never removes
    // them under the job.
    let image_holds: Vec<_> = std::iter::once(&plan.image)
        .chain(plan.services.iter().map(|s| &s.image))
        .map(|image| settings.image_use.begin(image))
        .collect();
    ctx.get_image(&plan.image, run.observer).await?;
    run.services = not_started(&plan.services);
    for (i, service) in plan.services.iter().enumerate() {
        let got = ctx.get_image(&service.image, run.observer).await;
        got.map_err(|early| service_image_failed(&mut run.services[i], early))?;
    }
    let (workspace, mut made) = ctx.acquire(starting).await?;
    let outcome = ctx.in_workspace(&workspace, &mut made, run).await;
    made.starting = None;
    // The one exit once the workspace exists, whatever `in_workspace` ended with. The services'
    // ends come from their containers: read now, before the result; the containers go after it.
    run.services = made.services.report(&run.masker);
    let cleaner = Cleaner::new(&docker, settings, &plan.image, plan.user, job.job_id);
    let leftovers = Leftovers {
        made,
        workspace,
        cleaner,
        image_holds,
    };
    Ok((outcome.unwrap_or_else(|early| early), leftovers))
}

impl Job<'_> {
    /// The job's path inside its workspace, in order: check out the repository, write the
    /// pipeline, restore its caches, make its network, start its services and wait for them,
    /// start its container (network, services and container kept in `made` for the cleanup),
    /// run the commands, check that its services outlived them, upload its artifacts and
    /// caches. Anything the job needs before its first command goes before `run_commands`;
    /// anything taken from its workspace or its containers after its last one goes after it:
    /// the cleanup comes after the result.
    async fn in_workspace(
        &self,
        workspace: &Workspace,
        made: &mut Made,
        run: &mut Run<'_>,
    ) -> Stage<Outcome> {
        self.check_out(workspace, run.observer).await?;
        let written =
            workspace.write_file(self.plan.pipeline.file_name(), self.plan.pipeline.text());
        written.await.map_err(|e| {
            Outcome::Error(format!("cannot write the pipeline into the workspace: {e}"))
        })?;
        let storage = self.restore(workspace, run).await?;
        let network = self.network(workspace, &mut made.network).await?;
        self.start_services(&mut made.services, workspace, &network)
            .await?;
        let own_network = made.network.as_ref().map(|n| n.name().to_owned());
        let started = match made.container.take() {
            Some(warm) => {
                let at = (
                    warm.id().to_owned(),
                    warm.head().clone(),
                    warm.is_single(),
                    true,
                );
                run.begin_progress(self.resume(at, own_network, workspace))
                    .await;
                Ok(warm)
            }
            None => {
                // Recorded before the container is made: a single command runs from its
                // start, and an agent gone meanwhile must find it (by name) to carry it on.
                let spec = self.container_spec(workspace, network);
                let single = spec.main_command.is_some();
                let at = (spec.name.clone(), spec.head.clone(), single, false);
                run.begin_progress(self.resume(at, own_network, workspace))
                    .await;
                JobContainer::start(self.docker, spec).await
            }
        };
        let container = &*made
            .container
            .insert(started.map_err(|e| Outcome::Error(e.to_string()))?);
        made.starting = None;
        let outcome = self.run_commands(container, run, None).await;
        let outcome = services_outlived_the_steps(&mut made.services, outcome);
        Ok(self.upload(storage, outcome, workspace, run).await)
    }

    /// Artifacts and caches (`crate::store`): checked, and caches restored, before any
    /// container.
    async fn restore(
        &self,
        workspace: &Workspace,
        run: &mut Run<'_>,
    ) -> Stage<crate::store::JobStorage> {
        crate::store::JobStorage::before_steps(
            self.executor.settings.store.as_ref(),
            self.job,
            self.plan.pipeline.storage_wanted(self.job),
            workspace.path(),
            self.plan.user,
            self.control,
            &mut |line| run.agent_line(OutputStream::Stderr, line),
        )
        .await
        .map_err(Outcome::Error)
    }

    /// Uploads the artifacts and saves the caches the job's end calls for, from the workspace
    /// after the last command (the container still exists; the cleanup comes later). An upload
    /// that fails makes the job an error.
    pub(super) async fn upload(
        &self,
        storage: crate::store::JobStorage,
        outcome: Outcome,
        workspace: &Workspace,
        run: &mut Run<'_>,
    ) -> Outcome {
        let end = match &outcome {
            Outcome::Finished { success: true, .. } => crate::store::JobEnd::Success,
            Outcome::Finished { .. } | Outcome::TimedOut { .. } => crate::store::JobEnd::Failure,
            Outcome::Cancelled { .. } | Outcome::Error(_) => crate::store::JobEnd::Stopped,
        };
        let stored = storage
            .after_steps(end, workspace.path(), self.control, &mut |line| {
                run.agent_line(OutputStream::Stderr, line)
            })
            .await;
        match stored {
            Ok(artifacts) => {
                run.artifacts = artifacts;
                outcome
            }
            Err(message) => Outcome::Error(message),
        }
    }

    /// The job's commands, bounded by its deadline and stopped by its control; an adopted
    /// job's from where they were (`resuming`, see `adopt.rs`).
    pub(super) async fn run_commands(
        &self,
        container: &JobContainer,
        run: &mut Run<'_>,
        resuming: Option<Resuming>,
    ) -> Outcome {
        let job_settings = &self.executor.settings.job;
        let grace = Duration::from_secs(job_settings.stop_grace_seconds.min(MAX_SECONDS_CEILING));
        let ctx = Context {
            container,
            control: self.control,
            deadline: self.deadline,
            grace,
            timeout: self.timeout,
            memory: &self.plan.memory_text,
        };
        match &self.plan.pipeline {
            Pipeline::Yaml(p) => run_steps(&ctx, p, run, resuming).await,
            Pipeline::Gryt { .. } => {
                run_gryt(
                    &ctx,
                    gryt_command(&job_settings.gryt_command),
                    run,
                    resuming,
                )
                .await
            }
        }
    }

    /// Starts the job's services on its network and waits until they are ready.
    async fn start_services(
        &self,
        services: &mut Services,
        workspace: &Workspace,
        network: &str,
    ) -> Stage {
        if services.is_empty() {
            return Ok(());
        }
        let (job_container, labels) = (self.container_name(workspace), self.labels());
        let setup = ServiceSetup {
            docker: self.docker,
            network,
            job_container: &job_container,
            labels: &labels,
            pids_limit: self.executor.settings.docker.pids_limit,
            memory_bytes: self.plan.memory_bytes,
            nano_cpus: self.plan.nano_cpus,
            masker: &self.plan.masker,
        };
        // Not cut short by a stop: a container whose create request is dropped in flight
        // would be made without the agent learning its id. `await_ready` heeds the stop.
        let started = services.start_all(&setup).await;
        started.map_err(|failure| Outcome::Error(failure.message))?;
        await_ready(services, network, self.control, self.deadline, self.timeout).await
    }

    /// The image: bounded by the job's deadline and by stop requests like everything else.
    async fn get_image(&self, image: &str, observer: &dyn JobObserver) -> Stage {
        let pull = image::ensure(
            self.docker,
            image,
            self.executor.settings.docker.pull_policy,
            |p| match p {
                PullProgress::Started => observer.event(JobEvent::PullStarted { image }),
                PullProgress::Status(s) => {
                    observer.event(JobEvent::PullStatus { image, status: &s })
                }
                PullProgress::Done => observer.event(JobEvent::PullFinished { image }),
            },
        );
        tokio::select! {
            result = pull => if let Err(e) = result {
                if matches!(e, image::ImageError::Pull { .. }) {
                    observer.event(JobEvent::PullFailed { image });
                }
                return Err(Outcome::Error(e.to_string()));
            },
            _ = tokio::time::sleep_until(self.deadline) => {
                let secs = self.timeout.as_secs();
                let error = format!("job timed out after {secs}s while getting image {image}");
                return Err(Outcome::TimedOut { exit_code: None, error });
            }
            request = self.control.stopped() => return Err(cancelled(request, None)),
        }
        Ok(())
    }

    /// The job's workspace, and what the job starts with: a warm container with its workspace
    /// and network when one fits (the pool's image, no services: those start cold, see
    /// `warm/`), its environment given to every exec and its limits applied; else a fresh
    /// workspace and nothing yet made.
    async fn acquire(&self, starting: Starting) -> Stage<(Workspace, Made)> {
        let plan = self.plan;
        let mut made = Made {
            container: None,
            network: None,
            services: Services::new(plan.services.clone()),
            warm: None,
            starting: Some(starting),
        };
        if plan.services.is_empty() {
            let warm = self.executor.warm.take(
                self.docker,
                &plan.image,
                plan.memory_bytes,
                plan.nano_cpus,
            );
            if let Some(taken) = warm.await {
                let mut container = taken.container;
                container.set_exec_env(plan.env.clone());
                made.container = Some(container);
                made.network = taken.network;
                made.warm = Some(taken.live);
                return Ok((taken.workspace, made));
            }
        }
        Ok((self.create_workspace().await?, made))
    }

    async fn create_workspace(&self) -> Stage<Workspace> {
        let settings = &self.executor.settings;
        let (uid, gid) = self.plan.user;
        let job_id = self.job.job_id.to_string();
        let created = Workspace::create(&settings.work_dir, &settings.agent_id, &job_id, uid, gid);
        created.await.map_err(|e| {
            Outcome::Error(format!(
                "cannot create the job workspace under {}: {e}",
                settings.work_dir.display()
            ))
        })
    }

    /// Clones the job's repository (when it has one) and hands it to the job's user. The clone
    /// gets what is left of the job's time (its own limit permitting) and stops when the job
    /// is stopped: it never outlives the job.
    async fn check_out(&self, workspace: &Workspace, observer: &dyn JobObserver) -> Stage {
        let Some(url) = git_url(self.job) else {
            return Ok(());
        };
        let commit = self.job.git_commit.as_deref().map(str::trim);
        let request = CheckoutRequest {
            url,
            branch: self.job.branch(),
            commit: commit.filter(|c| !c.is_empty()),
            token: self.plan.token.as_ref(),
        };
        let mut limits = self.executor.settings.checkout.clone();
        let left = self.deadline.saturating_duration_since(Instant::now());
        limits.timeout = limits.timeout.min(left);
        let cloned = checkout_until(&request, workspace.path(), &limits, async {
            self.control.stopped().await;
        })
        .await;
        let job_deadline_passed = Instant::now() >= self.deadline;
        match cloned {
            Err(CheckoutError::Stopped { .. }) => {
                let request = self.control.request().unwrap_or(StopRequest {
                    kind: StopKind::Immediate,
                    reason: "stopped".into(),
                });
                return Err(cancelled(request, None));
            }
            Err(CheckoutError::Timeout { .. }) if job_deadline_passed => {
                let secs = self.timeout.as_secs();
                let error = format!("job timed out after {secs}s while cloning {url}");
                return Err(Outcome::TimedOut {
                    exit_code: None,
                    error,
                });
            }
            Ok(done) => observer.event(JobEvent::CheckedOut {
                url,
                commit: &done.commit,
            }),
            Err(e) => return Err(Outcome::Error(e.to_string())),
        }
        let (uid, gid) = self.plan.user;
        workspace
            .hand_over(uid, gid)
            .await
            .map_err(|e| Outcome::Error(format!("cannot give the checkout to the job's user: {e}")))
    }

    /// What an agent restarted under the job needs to carry it on, as its container starts.
    /// `(container id or name, head mark, single command, warm)`.
    fn resume(
        &self,
        (container, head, single, warm): (String, MarkId, bool, bool),
        network: Option<String>,
        workspace: &Workspace,
    ) -> Resume {
        Resume {
            container,
            head,
            single,
            warm,
            network,
            workspace: workspace.path().to_owned(),
            started_unix_ms: (self.started_at.unix_timestamp_nanos() / 1_000_000).max(0) as u64,
            deadline_unix_ms: unix_ms_of(self.deadline),
            preface: Vec::new(),
            steps: Vec::new(),
            commands: Vec::new(),
            running_since_unix_ms: None,
        }
    }

    /// The labels of every container of the job (its services' too).
    pub(super) fn labels(&self) -> std::collections::HashMap<String, String> {
        let settings = &self.executor.settings;
        let job_id = self.job.job_id.to_string();
        job_labels(&settings.agent_id, &job_id, &settings.extra_labels)
    }

    fn container_name(&self, workspace: &Workspace) -> String {
        format!("gryt-{}", workspace.unique_name())
    }

    /// The network the job's containers join: a warm container's own when it came with one;
    /// with `docker.network = "job"` a new one of its own, kept in `made` for the cleanup (the
    /// metadata rules are installed before the first); otherwise the one configured.
    async fn network(&self, workspace: &Workspace, made: &mut Option<JobNetwork>) -> Stage<String> {
        if let Some(warm) = made {
            return Ok(warm.name().to_owned());
        }
        let settings = &self.executor.settings;
        if settings.docker.network != network::MODE_JOB {
            return Ok(settings.docker.network.clone());
        }
        self.executor.guard_metadata().await;
        let job_id = self.job.job_id.to_string();
        let labels = job_labels(&settings.agent_id, &job_id, &settings.extra_labels);
        let name = network::name_for(&workspace.unique_name());
        let created = JobNetwork::create(
            self.docker,
            &name,
            settings.network_pool,
            network::labels(labels),
        );
        let created = created.await.map_err(|e| Outcome::Error(e.to_string()))?;
        Ok(made.insert(created).name().to_owned())
    }

    fn container_spec(&self, workspace: &Workspace, network: String) -> ContainerSpec {
        let settings = &self.executor.settings;
        let plan = self.plan;
        ContainerSpec {
            name: self.container_name(workspace),
            image: plan.image.clone(),
            workspace_host_path: workspace.path().to_string_lossy().into_owned(),
            env: plan.env.clone(),
            labels: self.labels(),
            user: format!("{}:{}", plan.user.0, plan.user.1),
            network,
            pids_limit: settings.docker.pids_limit,
            memory_bytes: plan.memory_bytes,
            nano_cpus: plan.nano_cpus,
            main_command: single_command(&plan.pipeline, &settings.job.gryt_command),
            head: MarkId::random(),
        }
    }
}

/// A service's image could not be had: the job's error, and the service's, name it.
fn service_image_failed(service: &mut ServiceResult, early: Outcome) -> Outcome {
    let Outcome::Error(message) = early else {
        return early;
    };
    let message = format!("service `{}`: {message}", service.name);
    service.status = crate::wire::ServiceStatus::Error;
    service.error = Some(message.clone());
    Outcome::Error(message)
}

/// A service that ended while the steps ran fails a job that ran to its end (the steps ran
/// against a broken service); a job stopped or timed out stays so.
fn services_outlived_the_steps(services: &mut Services, outcome: Outcome) -> Outcome {
    if !matches!(outcome, Outcome::Finished { .. }) {
        return outcome;
    }
    match check_alive(services, "while the steps ran") {
        Some(failure) => Outcome::Error(services.fail(failure)),
        None => outcome,
    }
}
