//! Carrying on a job an earlier agent process started and left running (see `resume.rs`): its
//! container, network and workspace taken over, its output read again from the container's log
//! (so the job's log and result are what they would have been), then its commands followed or
//! run on from where they were, and the job ended as any other: artifacts, result, cleanup.
//!
//! It never starts a command twice: a command whose start mark is in the container's log is
//! followed to its end (or, ended while no agent ran, read back with the exit status its end
//! mark carries), never run again.

use std::time::Duration;

use futures_util::StreamExt;
use secrecy::ExposeSecret;
use time::OffsetDateTime;

use super::cleanup::{Cleaner, Leftovers, Made};
use super::container::{JobCommand, JobContainer, MarkId, OutputStream, Resumed, remove_container};
use super::control::JobControl;
use super::job::{Job, result};
use super::network::JobNetwork;
use super::output::Run;
use super::plan::{job_timeout, plan};
use super::resume::{Resume, instant_of};
use super::services::Services;
use super::steps::{Outcome, Resuming, gryt_command, single_command, step_command};
use super::workspace::Workspace;
use super::{Executor, JobObserver};
use crate::pipeline::Pipeline;
use crate::secrets::mask::Masker;
use crate::wire::{JobResult, JobSpec};

/// How long the output of a step that finished before the restart may take to be read again.
const REPLAY_LIMIT: Duration = Duration::from_secs(120);

/// Carries on `job` from `resume`; returns its result with what it left for the cleanup.
pub(super) async fn adopt(
    executor: &Executor,
    job: &JobSpec,
    resume: &Resume,
    observer: &dyn JobObserver,
    control: &JobControl,
) -> (JobResult, Option<Leftovers>) {
    let started_at =
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(resume.started_unix_ms) * 1_000_000)
            .unwrap_or_else(|_| OffsetDateTime::now_utc());
    let clock = instant_of(resume.started_unix_ms);
    let agent_secrets = executor.settings.agent_secrets.iter();
    let masker = Masker::new(agent_secrets.map(|s| s.expose_secret()));
    let mut run = Run::new(observer, masker, executor.settings.job.output_cap_bytes);
    let (outcome, leftovers) = match job_timeout(&executor.settings, job) {
        Ok(timeout) => {
            // Never later than the job's own time limit allows, whatever the record says.
            let deadline = instant_of(resume.deadline_unix_ms).min(clock + timeout);
            carry_on(
                executor,
                job,
                resume,
                &mut run,
                control,
                (started_at, deadline, timeout),
            )
            .await
        }
        Err(message) => (
            Outcome::Error(message),
            leftovers_of(executor, job, resume).await,
        ),
    };
    run.flush_masks();
    (result(job, run, outcome, started_at, clock), leftovers)
}

async fn carry_on(
    executor: &Executor,
    job: &JobSpec,
    resume: &Resume,
    run: &mut Run<'_>,
    control: &JobControl,
    (started_at, deadline, timeout): (OffsetDateTime, tokio::time::Instant, Duration),
) -> (Outcome, Option<Leftovers>) {
    let docker = match executor.docker().await {
        Ok(docker) => docker,
        // The sweep removes what is left once the engine answers.
        Err(e) => return (Outcome::Error(e.to_string()), None),
    };
    // The mode checked it before; checked again here, the one door to what a record names.
    if let Err(why) = check_container(executor, job, resume).await {
        let leftovers = leftovers_of(executor, job, resume).await;
        return (
            Outcome::Error(format!("cannot carry the job on: {why}")),
            leftovers,
        );
    }
    let plan = match plan(executor, job) {
        Ok(plan) => plan,
        Err(message) => {
            let leftovers = leftovers_of(executor, job, resume).await;
            return (Outcome::Error(message), leftovers);
        }
    };
    run.set_masker(plan.masker.clone());
    if let Pipeline::Gryt { .. } = plan.pipeline {
        run.follow_gryt_report();
    }
    let settings = &executor.settings;
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
    let image_holds = vec![settings.image_use.begin(&plan.image)];
    let workspace = Workspace::adopt(resume.workspace.clone());
    let mut made = Made {
        container: None,
        services: Services::new(Vec::new()),
        network: None,
        warm: None,
        starting: None,
    };
    let outcome = take_over(&ctx, resume, &mut made, run).await;
    let outcome = match outcome {
        Ok(container) => {
            let outcome = replay_and_run(&ctx, container, resume, run).await;
            upload(&ctx, job, outcome, &workspace, run).await
        }
        Err(early) => early,
    };
    let cleaner = Cleaner::new(&docker, settings, &plan.image, plan.user, job.job_id);
    let leftovers = Leftovers {
        made,
        workspace,
        cleaner,
        image_holds,
    };
    (outcome, Some(leftovers))
}

/// Takes over the job's network and container into `made`; the container, ready to go on.
async fn take_over<'m>(
    ctx: &Job<'_>,
    resume: &Resume,
    made: &'m mut Made,
    run: &mut Run<'_>,
) -> Result<&'m JobContainer, Outcome> {
    let docker = ctx.docker;
    if let Some(name) = &resume.network {
        match JobNetwork::adopt(docker, name).await {
            Ok(network) => made.network = Some(network),
            Err(e) => {
                remove_container(docker, &resume.container).await;
                return Err(Outcome::Error(format!("cannot carry the job on: {e}")));
            }
        }
    }
    let main_command = match (&ctx.plan.pipeline, resume.single) {
        (pipeline, true) => {
            let gryt = &ctx.executor.settings.job.gryt_command;
            Some(single_command(pipeline, gryt).ok_or_else(|| {
                Outcome::Error(
                    "cannot carry the job on: its record does not fit its pipeline".into(),
                )
            })?)
        }
        (_, false) => None,
    };
    let adopted = JobContainer::adopt(docker, &resume.container, &resume.head, main_command).await;
    let mut container = match adopted {
        Ok(container) => container,
        Err(e) => {
            remove_container(docker, &resume.container).await;
            return Err(Outcome::Error(format!("cannot carry the job on: {e}")));
        }
    };
    if resume.warm {
        container.set_exec_env(ctx.plan.env.clone());
    }
    // The job's log as it was: the agent's own lines, then the container's output.
    for line in &resume.preface {
        let stream = if line.stderr {
            OutputStream::Stderr
        } else {
            OutputStream::Stdout
        };
        run.output(stream, line.text.as_bytes());
    }
    run.progress = Some(resume.clone());
    Ok(&*made.container.insert(container))
}

/// Reads the finished steps' output again, then goes on with the command that ran (followed, or
/// started now if it never did) and the rest.
async fn replay_and_run(
    ctx: &Job<'_>,
    container: &JobContainer,
    resume: &Resume,
    run: &mut Run<'_>,
) -> Outcome {
    let gryt = &ctx.executor.settings.job.gryt_command;
    let steps = match &ctx.plan.pipeline {
        // The main process's output is read from its start: nothing to replay apart.
        Pipeline::Yaml(_) if resume.single => {
            let since = resume
                .running_since_unix_ms
                .unwrap_or(resume.started_unix_ms);
            let resuming = Resuming {
                index: 0,
                mark: MarkId::random(),
                since: Some(instant_of(since)),
            };
            return ctx.run_commands(container, run, Some(resuming)).await;
        }
        Pipeline::Gryt { .. } if resume.single => {
            return ctx.run_commands(container, run, None).await;
        }
        // `gryt run` as an exec (a warm container): the one command, never started twice.
        Pipeline::Gryt { .. } => {
            return match resume_running(container, resume, 0, gryt_command(gryt), run).await {
                Ok(resuming) => ctx.run_commands(container, run, Some(resuming)).await,
                Err(early) => early,
            };
        }
        Pipeline::Yaml(p) => p,
    };
    let finished = resume.steps.len().min(steps.steps.len());
    for mark in resume.commands.iter().take(finished) {
        if let Err(message) = replay(container, mark, run).await {
            return Outcome::Error(message);
        }
    }
    run.steps = resume.steps[..finished].to_vec();
    let resuming = match steps.steps.get(finished) {
        Some(step) => resume_running(container, resume, finished, step_command(step), run).await,
        // Every step finished: only the job's end is left.
        None => Ok(Resuming {
            index: finished,
            mark: MarkId::random(),
            since: None,
        }),
    };
    match resuming {
        Ok(resuming) => ctx.run_commands(container, run, Some(resuming)).await,
        Err(early) => early,
    }
}

/// Where the command at `index` (`command`) goes on: followed when it started (its running
/// command set in the container), else started now under the mark recorded for it, or under a
/// new one when none was.
async fn resume_running(
    container: &JobContainer,
    resume: &Resume,
    index: usize,
    command: JobCommand,
    run: &mut Run<'_>,
) -> Result<Resuming, Outcome> {
    let Some(mark) = resume.running() else {
        let mark = MarkId::random();
        return Ok(Resuming {
            index,
            mark,
            since: None,
        });
    };
    match container.resume(mark).await {
        Ok(Resumed::Command(running)) => {
            container.set_started(command, running);
            let since = resume
                .running_since_unix_ms
                .unwrap_or(resume.started_unix_ms);
            Ok(Resuming {
                index,
                mark: mark.clone(),
                since: Some(instant_of(since)),
            })
        }
        Ok(Resumed::NotStarted) => {
            // `run_steps` records it again as it starts.
            if let Some(progress) = &mut run.progress {
                progress.commands.pop();
            }
            Ok(Resuming {
                index,
                mark: mark.clone(),
                since: None,
            })
        }
        Err(e) => Err(Outcome::Error(format!("cannot carry the job on: {e}"))),
    }
}

/// One finished command's output, read again from the container's log into the job's.
async fn replay(container: &JobContainer, mark: &MarkId, run: &mut Run<'_>) -> Result<(), String> {
    let Some(mut output) = container.replay(mark).await else {
        return Err("cannot carry the job on: its container runs no commands as execs".into());
    };
    let read = async {
        while let Some(item) = output.next().await {
            match item {
                Ok(bollard::container::LogOutput::StdOut { message }) => {
                    run.output(OutputStream::Stdout, &message)
                }
                Ok(bollard::container::LogOutput::StdErr { message }) => {
                    run.output(OutputStream::Stderr, &message)
                }
                Ok(_) => {}
                Err(e) => return Err(format!("cannot read the job container's log again: {e}")),
            }
        }
        Ok(())
    };
    tokio::time::timeout(REPLAY_LIMIT, read)
        .await
        .unwrap_or_else(|_| {
            Err("the output of a finished step is not whole in the container's log".into())
        })
}

/// The job's artifacts after its last command (its caches are not saved: see
/// `JobStorage::adopted`).
async fn upload(
    ctx: &Job<'_>,
    job: &JobSpec,
    outcome: Outcome,
    workspace: &Workspace,
    run: &mut Run<'_>,
) -> Outcome {
    let wanted = ctx.plan.pipeline.storage_wanted(job);
    let store = ctx.executor.settings.store.as_ref();
    match crate::store::JobStorage::adopted(store, job, wanted) {
        Ok(storage) => ctx.upload(storage, outcome, workspace, run).await,
        Err(message) => Outcome::Error(message),
    }
}

/// Whether the job can be carried on: its record names this agent's own parts
/// ([`Resume::check`], and the container's agent label), it has no services (their readiness
/// and ends are not watched again), and its container is still there (running, unless it ran
/// the job's one command); else why not.
pub(super) async fn check_container(
    executor: &Executor,
    job: &JobSpec,
    resume: &Resume,
) -> Result<(), String> {
    let settings = &executor.settings;
    resume.check(&settings.work_dir, &settings.agent_id)?;
    let plan = plan(executor, job)?;
    if !plan.services.is_empty() {
        return Err("it has services, which are not carried on across an agent restart".into());
    }
    let docker = executor.docker().await.map_err(|e| e.to_string())?;
    match docker.inspect_container(&resume.container, None).await {
        Ok(inspect) if !labelled_for(&inspect, &settings.agent_id) => {
            Err("its record names a container that is not this agent's".into())
        }
        Ok(inspect) => {
            let running = inspect.state.and_then(|s| s.running) == Some(true);
            if running || resume.single {
                Ok(())
            } else {
                Err("its container stopped".into())
            }
        }
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Err("its container is gone".into()),
        Err(e) => Err(format!("cannot inspect its container: {e}")),
    }
}

/// Whether an inspected container carries this agent's label.
fn labelled_for(inspect: &bollard::models::ContainerInspectResponse, agent_id: &str) -> bool {
    let labels = inspect.config.as_ref().and_then(|c| c.labels.as_ref());
    labels
        .and_then(|l| l.get(super::container::LABEL_AGENT_ID))
        .is_some_and(|id| id == agent_id)
}

/// Removes the service containers beside the job's container: those of its agent carrying the
/// same job label (its own id, or a warm container's id), found by label since the record does
/// not name them. They go first: the network cannot be removed while they are on it.
async fn remove_services(docker: &bollard::Docker, agent_id: &str, resume: &Resume) {
    use bollard::query_parameters::ListContainersOptionsBuilder;
    let owner = resume
        .workspace
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(super::workspace::owner_of)
        .map(|(_, owner)| owner.to_owned());
    let Some(owner) = owner else { return };
    let labels = vec![
        format!("{}={agent_id}", super::container::LABEL_AGENT_ID),
        format!("{}={owner}", super::container::LABEL_JOB_ID),
    ];
    let filters = std::collections::HashMap::from([("label", labels)]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let Ok(listed) = docker.list_containers(Some(options)).await else {
        return;
    };
    for id in listed.into_iter().filter_map(|c| c.id) {
        if id != resume.container {
            remove_container(docker, &id).await;
        }
    }
}

/// What a job of an earlier agent process left (container, network, workspace), for a cleanup
/// when it is not carried on: removed the way every job's leftovers are (`cleanup.rs`). `None`
/// without an engine (the sweep removes them once it answers).
pub(super) async fn leftovers_of(
    executor: &Executor,
    job: &JobSpec,
    resume: &Resume,
) -> Option<Leftovers> {
    let docker = executor.docker().await.ok()?;
    let settings = &executor.settings;
    if let Err(why) = resume.check(&settings.work_dir, &settings.agent_id) {
        // Nothing it names is removed: the sweep removes this agent's leftovers by label.
        tracing::error!(job_id = job.job_id, error = %why, "a job record not removed by what it names");
        return None;
    }
    remove_services(&docker, &settings.agent_id, resume).await;
    let network = match &resume.network {
        Some(name) => match JobNetwork::adopt(&docker, name).await {
            Ok(network) => Some(network),
            Err(e) => {
                tracing::warn!(network = %name, error = %e, "cannot take over a job network given up; the sweep will remove it");
                None
            }
        },
        None => None,
    };
    let container = match docker.inspect_container(&resume.container, None).await {
        Ok(inspect) if labelled_for(&inspect, &settings.agent_id) => {
            Some(JobContainer::for_removal(&docker, &resume.container))
        }
        // Gone, or not this agent's: nothing to remove.
        _ => None,
    };
    let made = Made {
        container,
        services: Services::new(Vec::new()),
        network,
        warm: None,
        starting: None,
    };
    // The job's image empties the workspace as the job's user when the agent may not.
    let image = plan(executor, job).map(|p| p.image);
    let image = image.unwrap_or_else(|_| settings.docker.image.clone());
    let user = settings.docker.job_user.ids();
    let cleaner = Cleaner::new(&docker, settings, &image, user, job.job_id);
    Some(Leftovers {
        made,
        workspace: Workspace::adopt(resume.workspace.clone()),
        cleaner,
        image_holds: Vec::new(),
    })
}
