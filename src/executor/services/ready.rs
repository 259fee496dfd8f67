//! Waiting for services to be ready, and noticing one that ended.
//!
//! Readiness is a TCP connect from the agent to the service's address on the job's network.
//! It needs no privilege (the agent runs as root or not alike) and nothing inside the service's
//! image: the bridge's addresses are routed on the engine's host, where the agent runs anyway
//! (it bind-mounts the workspace). A connect to a container's own address gets a refusal while
//! nothing listens: Docker's port proxy, which accepts for any published port, is not in the way.

use std::net::IpAddr;
use std::time::Duration;

use bollard::Docker;
use futures_util::future::try_join_all;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::plan::ServicePlan;
use super::watch::Ended;
use super::{Service, ServiceFailure, Services};
use crate::executor::control::JobControl;
use crate::executor::steps::{Outcome, cancelled};
use crate::wire::ServiceStatus;

/// Pause between two connection attempts, and the longest one attempt may take.
const PROBE_PAUSE: Duration = Duration::from_millis(100);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a service without an address may take to be seen ended (its watch reads its end).
const END_GRACE: Duration = Duration::from_secs(3);

/// Waits until every service with a `ready_port` accepts connections on it, bounded by each
/// service's `ready_timeout_seconds`, the job's deadline and its stop requests. A service that
/// ends meanwhile, or is not ready in time, fails the job (status `error`, named in the error).
pub(in crate::executor) async fn await_ready(
    services: &mut Services,
    network: &str,
    control: &JobControl,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), Outcome> {
    let Some(docker) = services.docker.clone() else {
        return Ok(());
    };
    let waits = services
        .started()
        .map(|(i, service)| ready_one(&docker, network, i, &services.plans[i], service));
    let waited = tokio::select! {
        waited = try_join_all(waits) => waited.map(|_| ()),
        _ = tokio::time::sleep_until(deadline) => {
            let secs = timeout.as_secs();
            let error = format!("job timed out after {secs}s while waiting for its services");
            return Err(Outcome::TimedOut { exit_code: None, error });
        }
        request = control.stopped() => return Err(cancelled(request, None)),
    };
    let failure = match waited {
        Ok(()) => check_alive(services, "before the steps started"),
        Err(failure) => Some(failure),
    };
    match failure {
        Some(failure) => Err(Outcome::Error(services.fail(failure))),
        None => Ok(()),
    }
}

/// The first service that has ended (`when` says when, for the message), if one has.
pub(in crate::executor) fn check_alive(services: &Services, when: &str) -> Option<ServiceFailure> {
    services.started().find_map(|(i, service)| {
        let ended = service.watch.ended()?;
        Some(ended_failure(i, &services.plans[i], ended, when))
    })
}

async fn ready_one(
    docker: &Docker,
    network: &str,
    index: usize,
    plan: &ServicePlan,
    service: &Service,
) -> Result<(), ServiceFailure> {
    let Some(port) = plan.ready_port else {
        return Ok(());
    };
    let name = &plan.name;
    let probe = async {
        let address = match address(docker, &service.id, network).await {
            Ok(address) => address,
            Err(e) => {
                // A service that ended at once has no address any more: its end (exit code,
                // OOM), which its watch learns a moment later, is the better reason.
                let ended = tokio::time::timeout(END_GRACE, service.watch.until_ended()).await;
                if let Ok(ended) = ended {
                    return Err(ended_failure(index, plan, ended, "before it was ready"));
                }
                return Err(ServiceFailure {
                    index,
                    status: ServiceStatus::Error,
                    message: format!("service `{name}`: {e}"),
                });
            }
        };
        loop {
            let attempt = tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect((address, port)));
            if let Ok(Ok(_connected)) = attempt.await {
                return Ok(());
            }
            tokio::time::sleep(PROBE_PAUSE).await;
        }
    };
    tokio::select! {
        ready = probe => ready,
        ended = service.watch.until_ended() => {
            Err(ended_failure(index, plan, ended, "before it was ready"))
        }
        _ = tokio::time::sleep(plan.ready_timeout) => Err(ServiceFailure {
            index,
            status: ServiceStatus::NotReady,
            message: format!(
                "service `{name}` did not accept connections on port {port} within {}s \
                 (ready_timeout_seconds); its last output lines are in the result's `services`",
                plan.ready_timeout.as_secs()
            ),
        }),
    }
}

/// The service's address on the job's network.
async fn address(docker: &Docker, id: &str, network: &str) -> Result<IpAddr, String> {
    let inspect = docker
        .inspect_container(id, None)
        .await
        .map_err(|e| format!("cannot inspect its container: {e}"))?;
    let networks = inspect.network_settings.and_then(|n| n.networks);
    let endpoint = networks.as_ref().and_then(|n| n.get(network));
    let ip = endpoint.and_then(|e| e.ip_address.as_deref().filter(|a| !a.is_empty()));
    let ip = ip.ok_or_else(|| format!("it has no address on the job's network {network}"))?;
    ip.parse()
        .map_err(|_| format!("its address {ip:?} on the job's network is not an IP address"))
}

fn ended_failure(index: usize, plan: &ServicePlan, ended: Ended, when: &str) -> ServiceFailure {
    let name = &plan.name;
    let (status, how) = match ended {
        Ended {
            oom_killed: true, ..
        } => (
            ServiceStatus::OomKilled,
            "was killed for running out of memory".to_owned(),
        ),
        Ended {
            exit_code: Some(code),
            ..
        } => (ServiceStatus::Exited, format!("exited with code {code}")),
        Ended {
            exit_code: None, ..
        } => (ServiceStatus::Exited, "ended".to_owned()),
    };
    ServiceFailure {
        index,
        status,
        message: format!(
            "service `{name}` {how} {when}; its last output lines are in the result's `services`"
        ),
    }
}
