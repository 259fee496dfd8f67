//! Service containers: the databases, caches and fake servers a job asks for (`services`),
//! started before its first step on the job's own network, reachable there by their `name`,
//! and removed with the job on every path.
//!
//! Hardening differs from a job container in one way only: a service runs as its image's user
//! (common service images start as root to prepare their data directory, then drop to their
//! own user), with just the capabilities that needs (see [`SERVICE_CAPABILITIES`]). Like a job
//! container it is never privileged, has `no-new-privileges`, no mounts of the host (no Docker
//! socket), never the host network, and limits of its own: the job's memory and CPU limits and
//! `docker.pids_limit`, per service. It carries the job container's labels (and
//! [`LABEL_SERVICE`]), so the orphan sweep and the disk collector treat it as the job's.
//! Invariant: what the result says of a service is read before its container is removed
//! ([`Services::report`]); every service container is removed by [`Services::remove_all`], or,
//! when it is dropped without it (abort, panic, a stop while services start), by a removal
//! spawned from `Drop` (`Created`), from the moment it is created.

pub(super) mod plan;
mod ready;
mod watch;

use std::collections::HashMap;

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, EndpointSettings, HostConfig, HostConfigLogConfig, NetworkingConfig,
};
use bollard::query_parameters::{AttachContainerOptionsBuilder, CreateContainerOptionsBuilder};
use futures_util::future::join_all;

use self::plan::ServicePlan;
use self::watch::Watch;
use super::container::remove_container as remove;
use crate::secrets::mask::Masker;
use crate::wire::{ServiceResult, ServiceStatus};

pub(super) use ready::{await_ready, check_alive};

/// Label naming the service a container runs (beside the job's labels).
pub const LABEL_SERVICE: &str = "io.gryt.service";

/// What a service may do as root inside its own container, and why: `CHOWN` and `FOWNER` to
/// hand its data directory to its user and set its modes (postgres, mysql, redis entrypoints),
/// `SETUID` and `SETGID` to drop to that user (`gosu`, `su-exec`, the servers themselves),
/// `DAC_OVERRIDE` to prepare files root does not own. Nothing that reaches beyond the
/// container: no `NET_ADMIN`, `NET_RAW`, `SYS_*`, `MKNOD`.
pub const SERVICE_CAPABILITIES: &[&str] = &["CHOWN", "SETUID", "SETGID", "DAC_OVERRIDE", "FOWNER"];

/// Everything a service container is made with beside its own plan.
pub(super) struct ServiceSetup<'a> {
    pub docker: &'a Docker,
    /// The job's network (user-defined), where the service's `name` is its alias.
    pub network: &'a str,
    /// The job container's name: service containers are named after it.
    pub job_container: &'a str,
    /// The job container's labels, given to every service too.
    pub labels: &'a HashMap<String, String>,
    pub pids_limit: i64,
    pub memory_bytes: i64,
    pub nano_cpus: i64,
    /// The job's masker: a service's output tail is masked like the job's output.
    pub masker: &'a Masker,
}

/// Why a service fails the job: which one, how it ended, and the message for the job's error.
#[derive(Debug, Clone)]
pub(super) struct ServiceFailure {
    pub index: usize,
    pub status: ServiceStatus,
    pub message: String,
}

/// A started service container; removed when dropped without [`Services::remove_all`].
struct Service {
    id: String,
    watch: Watch,
    container: Created,
}

/// The job's services: the ones started (to remove) and what is known of each so far.
pub(super) struct Services {
    docker: Option<Docker>,
    plans: Vec<ServicePlan>,
    /// By the plans' index; `None` while not started.
    started: Vec<Option<Service>>,
    /// Why the job failed because of a service, if it did.
    failure: Option<ServiceFailure>,
}

impl Services {
    pub fn new(plans: Vec<ServicePlan>) -> Self {
        let started = plans.iter().map(|_| None).collect();
        Services {
            docker: None,
            plans,
            started,
            failure: None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.plans.is_empty()
    }

    /// Records the service that failed the job (the first one wins).
    pub(super) fn fail(&mut self, failure: ServiceFailure) -> String {
        let message = failure.message.clone();
        self.failure.get_or_insert(failure);
        message
    }

    /// Creates and starts every service (concurrently). Each one started is kept for the
    /// removal before the first error is returned.
    pub async fn start_all(&mut self, setup: &ServiceSetup<'_>) -> Result<(), ServiceFailure> {
        self.docker = Some(setup.docker.clone());
        let starts = self.plans.iter().map(|plan| start_one(setup, plan));
        let mut first_error = None;
        for (i, started) in join_all(starts).await.into_iter().enumerate() {
            match started {
                Ok(service) => self.started[i] = Some(service),
                Err(message) => {
                    first_error.get_or_insert(ServiceFailure {
                        index: i,
                        status: ServiceStatus::Error,
                        message,
                    });
                }
            }
        }
        match first_error {
            Some(failure) => {
                self.fail(failure.clone());
                Err(failure)
            }
            None => Ok(()),
        }
    }

    /// What became of each service, in the order they were asked for, masked: for a started
    /// one, whether it ended on its own and its output's tail, read from its watch (which stops
    /// here). Called once the steps ended, before the job's result is made; the containers are
    /// removed later, by [`Services::remove_all`].
    pub fn report(&mut self, masker: &Masker) -> Vec<ServiceResult> {
        let failure = self.failure.as_ref();
        self.plans
            .iter()
            .zip(self.started.iter_mut())
            .enumerate()
            .map(|(i, (plan, started))| {
                let end = started
                    .as_mut()
                    .map(|service| (service.watch.ended(), service.watch.stop_and_tail()));
                let failed = failure.filter(|f| f.index == i);
                service_result(plan, end, failed, masker)
            })
            .collect()
    }

    /// Removes every service container (concurrently).
    pub async fn remove_all(&mut self) {
        let removals = self
            .started
            .iter_mut()
            .filter_map(Option::as_mut)
            .map(|service| service.container.remove());
        join_all(removals).await;
        self.started.iter_mut().for_each(|s| *s = None);
    }

    fn started(&self) -> impl Iterator<Item = (usize, &Service)> {
        self.started
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, s.as_ref()?)))
    }
}

/// The result's entries for services not started (yet): what the result says of them when the
/// job ends before they start.
pub(super) fn not_started(plans: &[ServicePlan]) -> Vec<ServiceResult> {
    plans
        .iter()
        .map(|plan| ServiceResult {
            name: plan.name.clone(),
            status: ServiceStatus::NotStarted,
            exit_code: None,
            error: None,
            output_tail: String::new(),
        })
        .collect()
}

/// What the result says of one service.
fn service_result(
    plan: &ServicePlan,
    end: Option<(Option<watch::Ended>, String)>,
    failed: Option<&ServiceFailure>,
    masker: &Masker,
) -> ServiceResult {
    let Some((ended, tail)) = end else {
        let mut result = not_started(std::slice::from_ref(plan)).remove(0);
        if let Some(f) = failed {
            result.status = f.status;
            result.error = Some(masker.mask_str(&f.message));
        }
        return result;
    };
    let (status, exit_code) = match (failed, ended) {
        (Some(f), ended) => (f.status, ended.and_then(|e| e.exit_code)),
        (None, Some(e)) if e.oom_killed => (ServiceStatus::OomKilled, e.exit_code),
        (None, Some(e)) => (ServiceStatus::Exited, e.exit_code),
        (None, None) => (ServiceStatus::Running, None),
    };
    ServiceResult {
        name: plan.name.clone(),
        status,
        exit_code,
        error: failed.map(|f| masker.mask_str(&f.message)),
        // Masked as it was read (`watch.rs`).
        output_tail: tail,
    }
}

/// Creates, attaches to (before the start, so no output is lost) and starts one service; on
/// any failure removes what it made. The error names the service.
async fn start_one(setup: &ServiceSetup<'_>, plan: &ServicePlan) -> Result<Service, String> {
    let docker = setup.docker;
    let name = &plan.name;
    let options = CreateContainerOptionsBuilder::default()
        .name(&format!("{}-svc-{}", setup.job_container, name))
        .build();
    let created = docker
        .create_container(Some(options), service_body(setup, plan))
        .await
        .map_err(|e| {
            format!(
                "service `{name}`: cannot create a container from image {}: {e}",
                plan.image
            )
        })?;
    // From here on the guard removes it whatever happens (see `Created`).
    let mut created = Created {
        docker: docker.clone(),
        id: Some(created.id),
    };
    let id = created.id().to_owned();
    let attach = AttachContainerOptionsBuilder::default()
        .stream(true)
        .stdout(true)
        .stderr(true)
        .build();
    let output = match docker.attach_container(&id, Some(attach)).await {
        Ok(attached) => attached.output,
        Err(e) => {
            created.remove().await;
            return Err(format!(
                "service `{name}`: cannot attach to its container: {e}"
            ));
        }
    };
    let watch = Watch::spawn(docker.clone(), id.clone(), output, setup.masker.clone());
    if let Err(e) = docker.start_container(&id, None).await {
        drop(watch);
        created.remove().await;
        return Err(format!("service `{name}`: cannot start its container: {e}"));
    }
    Ok(Service {
        id,
        watch,
        container: created,
    })
}

/// A service container from its creation on: removed when dropped before [`Created::remove`]
/// (an abort, a stop or a panic dropping the job's future, while it starts or after).
struct Created {
    docker: Docker,
    /// `None` once removed.
    id: Option<String>,
}

impl Created {
    fn id(&self) -> &str {
        self.id.as_deref().unwrap_or_default()
    }

    async fn remove(&mut self) {
        if let Some(id) = self.id.take() {
            remove(&self.docker, &id).await;
        }
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else {
            return;
        };
        let docker = self.docker.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move { remove(&docker, &id).await });
            }
            Err(_) => {
                tracing::error!(container = %id, "a service container was dropped outside a runtime; the orphan sweep will remove it")
            }
        }
    }
}

fn service_body(setup: &ServiceSetup<'_>, plan: &ServicePlan) -> ContainerCreateBody {
    let mut labels = setup.labels.clone();
    labels.insert(LABEL_SERVICE.to_owned(), plan.name.clone());
    let endpoint = EndpointSettings {
        aliases: Some(vec![plan.name.clone()]),
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(plan.image.clone()),
        entrypoint: plan.entrypoint.clone(),
        cmd: plan.cmd.clone(),
        // No `user`: the image's own (see the module doc).
        hostname: Some(plan.name.clone()),
        env: Some(plan.env.clone()),
        labels: Some(labels),
        tty: Some(false),
        host_config: Some(service_host_config(setup)),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(HashMap::from([(setup.network.to_owned(), endpoint)])),
        }),
        ..Default::default()
    }
}

/// A service's side of the host: see the module doc. No binds at all; the anonymous volumes an
/// image declares go with the container (`v` on removal).
fn service_host_config(setup: &ServiceSetup<'_>) -> HostConfig {
    HostConfig {
        cap_drop: Some(vec!["ALL".into()]),
        cap_add: Some(SERVICE_CAPABILITIES.iter().map(|c| c.to_string()).collect()),
        security_opt: Some(vec!["no-new-privileges".into()]),
        privileged: Some(false),
        pids_limit: Some(setup.pids_limit),
        memory: Some(setup.memory_bytes),
        // No swap, as for the job container: an OOM kill is visible.
        memory_swap: Some(setup.memory_bytes),
        nano_cpus: Some(setup.nano_cpus),
        network_mode: Some(setup.network.to_owned()),
        // The agent reads the output itself (attach): no copy on Docker's disk.
        log_config: Some(HostConfigLogConfig {
            typ: Some("none".into()),
            config: None,
        }),
        ..Default::default()
    }
}
