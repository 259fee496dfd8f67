//! A network of its own for every job (`docker.network = "job"`): a user-defined bridge with a
//! /24 of the agent's address pool, labelled like the job's containers, made before the job's
//! first container and removed after its last.
//!
//! Separate bridges are what keeps concurrent jobs apart: Docker lets a container reach only
//! the networks it is attached to. Inside one job's network containers reach each other (ICC
//! on), so a job can reach its services by name. Every job network's subnet comes from the pool
//! (`docker.network_pool`), so one firewall rule on the pool covers them all (see
//! `metadata_guard`). Invariant, as for containers: a [`JobNetwork`] is removed on every path,
//! by [`JobNetwork::remove`] or, when dropped without it, by a removal spawned from `Drop`; the
//! orphan sweep and the disk collector remove what a crashed agent left.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{Ipam, IpamConfig, NetworkCreateRequest};
use bollard::query_parameters::ListNetworksOptionsBuilder;

use super::container::{LABEL_AGENT_ID, LABEL_JOB_ID, LABEL_MANAGED};
use super::pool::Cidr;
pub use super::pool::{DEFAULT_POOL, JOB_PREFIX, MODE_JOB, Pool};

/// Label that says a network is a job network (value [`MODE_JOB`]), beside the job labels.
pub const LABEL_NETWORK: &str = "io.gryt.network";
/// Bridge interfaces of job networks are named `gryt-` and 8 hex digits, so the host's
/// firewall and its operators can tell them apart (`ip link show type bridge`).
pub const BRIDGE_PREFIX: &str = "gryt-";

/// How many times a subnet taken by someone else between the listing and the create (another
/// job, another agent) is replaced by another free one.
const CREATE_ATTEMPTS: usize = 8;
/// How long a network whose removal failed is retried in the background.
const REMOVAL_RETRY_FOR: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{action}: {source}")]
    Docker {
        action: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error(
        "no free /{JOB_PREFIX} left in the job network pool {pool} (docker.network_pool): \
         other networks use all of it"
    )]
    PoolFull { pool: Pool },
    #[error("the job network {name} cannot be taken over: Docker gives it no id or subnet")]
    Unusable { name: String },
}

/// A job's own network, removed on every path (see the module doc).
pub struct JobNetwork {
    docker: Docker,
    id: String,
    name: String,
    subnet: Cidr,
    removed: bool,
}

/// The name of the network of the job run whose workspace has `unique` as its unique name
/// (`Workspace::unique_name`), so a network, its containers and its workspace go by one name.
pub fn name_for(unique: &str) -> String {
    format!("gryt-{unique}")
}

/// The labels of a job network: the job's (`container::job_labels`) and [`LABEL_NETWORK`].
pub fn labels(mut job_labels: HashMap<String, String>) -> HashMap<String, String> {
    job_labels.insert(LABEL_NETWORK.to_owned(), MODE_JOB.to_owned());
    job_labels
}

impl JobNetwork {
    /// Creates the network `name` with a free /24 of `pool` and `labels` (see [`labels`]).
    /// A subnet someone took meanwhile is replaced by another; a full pool is an error.
    pub async fn create(
        docker: &Docker,
        name: &str,
        pool: Pool,
        labels: HashMap<String, String>,
    ) -> Result<Self, NetworkError> {
        let mut last_error = None;
        for _ in 0..CREATE_ATTEMPTS {
            let taken = taken_subnets(docker).await?;
            let start = fastrand::u32(..pool.subnets());
            let subnet = pool
                .free_subnet(&taken, start)
                .ok_or(NetworkError::PoolFull { pool })?;
            match docker
                .create_network(request(name, subnet, labels.clone()))
                .await
            {
                Ok(created) => {
                    return Ok(JobNetwork {
                        docker: docker.clone(),
                        id: created.id,
                        name: name.to_owned(),
                        subnet,
                        removed: false,
                    });
                }
                // Taken between the listing and the create: list again, take another.
                Err(e) if e.to_string().contains("overlap") => last_error = Some(e),
                Err(source) => {
                    return Err(NetworkError::Docker {
                        action: format!("cannot create the job network {name} ({subnet})"),
                        source,
                    });
                }
            }
        }
        Err(NetworkError::Docker {
            action: format!(
                "cannot create the job network {name}: every subnet tried was taken meanwhile"
            ),
            source: last_error.unwrap_or(bollard::errors::Error::RequestTimeoutError),
        })
    }

    /// Takes over the network `name` an earlier agent process made for a job it ran (see
    /// `executor::adopt`); removed like a new one.
    pub async fn adopt(docker: &Docker, name: &str) -> Result<Self, NetworkError> {
        let inspected = docker
            .inspect_network(
                name,
                None::<bollard::query_parameters::InspectNetworkOptions>,
            )
            .await
            .map_err(|source| NetworkError::Docker {
                action: format!("cannot find the job network {name}"),
                source,
            })?;
        let subnet = inspected
            .ipam
            .and_then(|ipam| ipam.config)
            .and_then(|configs| configs.into_iter().find_map(|c| c.subnet))
            .and_then(|subnet| subnet.parse().ok());
        let (Some(id), Some(subnet)) = (inspected.id, subnet) else {
            let name = name.to_owned();
            return Err(NetworkError::Unusable { name });
        };
        Ok(JobNetwork {
            docker: docker.clone(),
            id,
            name: name.to_owned(),
            subnet,
            removed: false,
        })
    }

    /// The network's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The network's name: what a container's `network_mode` names.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The network's subnet, a /24 of the pool.
    pub fn subnet(&self) -> String {
        self.subnet.to_string()
    }

    /// Removes the network. Its containers must be gone first: Docker refuses to remove a
    /// network with endpoints, so a removal that fails is retried in the background for a
    /// while (a container removal still retrying), and the sweep catches what even that misses.
    pub async fn remove(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        remove_in_time(&self.docker, &self.id).await;
    }
}

impl Drop for JobNetwork {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let (docker, id) = (self.docker.clone(), self.id.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move { remove_in_time(&docker, &id).await });
            }
            Err(_) => {
                tracing::error!(network = %id, "job network dropped outside a runtime; the orphan sweep will remove it")
            }
        }
    }
}

fn request(name: &str, subnet: Cidr, labels: HashMap<String, String>) -> NetworkCreateRequest {
    let bridge = format!("{BRIDGE_PREFIX}{:08x}", fastrand::u32(..));
    let options = HashMap::from([
        // Containers of one job (the job and its services) reach each other.
        (
            "com.docker.network.bridge.enable_icc".to_owned(),
            "true".to_owned(),
        ),
        // And the world outside, as on the default bridge (a job fetches its dependencies).
        (
            "com.docker.network.bridge.enable_ip_masquerade".to_owned(),
            "true".to_owned(),
        ),
        ("com.docker.network.bridge.name".to_owned(), bridge),
    ]);
    NetworkCreateRequest {
        name: name.to_owned(),
        driver: Some("bridge".into()),
        // Not internal: a job reaches the internet as on the default bridge. Not attachable:
        // only the agent puts containers on it. IPv4 only: the firewall rules are on the pool.
        internal: Some(false),
        attachable: Some(false),
        enable_ipv6: Some(false),
        ipam: Some(Ipam {
            driver: Some("default".into()),
            config: Some(vec![IpamConfig {
                subnet: Some(subnet.to_string()),
                ..Default::default()
            }]),
            options: None,
        }),
        options: Some(options),
        labels: Some(labels),
        ..Default::default()
    }
}

/// The IPv4 subnets every network of the engine uses.
async fn taken_subnets(docker: &Docker) -> Result<Vec<Cidr>, NetworkError> {
    let networks = docker
        .list_networks(None)
        .await
        .map_err(|source| NetworkError::Docker {
            action: "cannot list the engine's networks".into(),
            source,
        })?;
    Ok(networks
        .into_iter()
        .flat_map(|n| n.ipam.and_then(|i| i.config).unwrap_or_default())
        .filter_map(|c| c.subnet?.parse().ok())
        .collect())
}

/// This agent's job networks, as `(network id, job id, labels)`, for the sweeps.
pub async fn list_job_networks(
    docker: &Docker,
    agent_id: &str,
) -> Result<Vec<(String, String, HashMap<String, String>)>, bollard::errors::Error> {
    let filters = HashMap::from([(
        "label",
        vec![
            format!("{LABEL_MANAGED}=true"),
            format!("{LABEL_AGENT_ID}={agent_id}"),
            format!("{LABEL_NETWORK}={MODE_JOB}"),
        ],
    )]);
    let options = ListNetworksOptionsBuilder::default()
        .filters(&filters)
        .build();
    let networks = docker.list_networks(Some(options)).await?;
    Ok(networks
        .into_iter()
        .filter_map(|n| {
            let labels = n.labels.unwrap_or_default();
            let job = labels.get(LABEL_JOB_ID).cloned().unwrap_or_default();
            Some((n.id?, job, labels))
        })
        .collect())
}

/// Removes a network; one already gone counts as removed. Refused by the engine while a
/// container is attached: the guard the sweeps rely on.
pub async fn try_remove(docker: &Docker, id: &str) -> Result<(), bollard::errors::Error> {
    match docker.remove_network(id).await {
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        other => other,
    }
}

async fn remove_in_time(docker: &Docker, id: &str) {
    for _ in 0..3 {
        if try_remove(docker, id).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tracing::warn!(network = %id, "cannot remove the job network yet; retrying in the background");
    let (docker, id) = (docker.clone(), id.to_owned());
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + REMOVAL_RETRY_FOR;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if try_remove(&docker, &id).await.is_ok() {
                tracing::info!(network = %id, "removed the job network after all");
                return;
            }
        }
        tracing::error!(network = %id, "cannot remove the job network; the orphan sweep will");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_networks_are_labelled_as_such() {
        let labels = labels(crate::executor::container::job_labels("a", "7", &[]));
        assert_eq!(labels[LABEL_NETWORK], MODE_JOB);
        assert_eq!(labels[LABEL_JOB_ID], "7");
    }
}
