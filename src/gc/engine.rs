//! The collector's Docker calls: listing candidate images and what protects them, removing an
//! image by name (never forced), and removing this agent's stopped containers, networks and
//! volumes.

use std::collections::{HashMap, HashSet};

use bollard::Docker;
use bollard::query_parameters::{
    ListContainersOptions, ListImagesOptions, ListNetworksOptions, ListVolumesOptions,
    RemoveImageOptions, RemoveVolumeOptions,
};

use super::plan::Candidate;
use super::usage::ImageUse;
use crate::config::GcImages;
use crate::executor::container::{LABEL_AGENT_ID, LABEL_JOB_ID, LABEL_MANAGED, try_remove};

/// An image as the engine describes it.
#[derive(Debug, Clone)]
pub struct Inspected {
    pub id: String,
    pub size_bytes: u64,
    /// Its tags (`repo:tag`).
    pub names: usize,
}

/// `Ok(None)` when the engine has no such image.
pub async fn inspect(docker: &Docker, reference: &str) -> Result<Option<Inspected>, String> {
    match docker.inspect_image(reference).await {
        Ok(image) => Ok(image.id.map(|id| Inspected {
            id,
            size_bytes: image.size.unwrap_or(0).max(0) as u64,
            names: image.repo_tags.map_or(0, |t| t.len()),
        })),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// The candidates under `mode`, with the last use from the record. Recorded images that no
/// longer exist (and that no job holds) are forgotten.
pub async fn candidates(
    docker: &Docker,
    mode: GcImages,
    record: &ImageUse,
) -> Result<Vec<Candidate>, String> {
    let recorded = record.recorded();
    // Last use per image id: any of its recorded names counts.
    let mut used_by_id: HashMap<String, i64> = HashMap::new();
    let mut by_reference = Vec::new();
    for (reference, stamp) in &recorded {
        match inspect(docker, reference).await? {
            Some(image) => {
                let entry = used_by_id.entry(image.id.clone()).or_insert(*stamp);
                *entry = (*entry).max(*stamp);
                by_reference.push(Candidate {
                    reference: reference.clone(),
                    image_id: image.id,
                    size_bytes: image.size_bytes,
                    last_used: Some(*stamp),
                    names: image.names,
                });
            }
            None if !record.is_held(reference) => record.forget(reference),
            None => {}
        }
    }
    match mode {
        GcImages::Off => Ok(Vec::new()),
        GcImages::Agent => Ok(by_reference),
        GcImages::All => {
            let options = ListImagesOptions {
                all: false,
                ..Default::default()
            };
            let images = docker
                .list_images(Some(options))
                .await
                .map_err(|e| e.to_string())?;
            let mut all = Vec::new();
            for image in images {
                let last_used = used_by_id.get(&image.id).copied();
                let size_bytes = image.size.max(0) as u64;
                let tags: Vec<String> = image
                    .repo_tags
                    .into_iter()
                    .filter(|t| t != "<none>:<none>")
                    .collect();
                let count = tags.len();
                let names = if tags.is_empty() {
                    vec![image.id.clone()]
                } else {
                    tags
                };
                all.extend(names.into_iter().map(|reference| Candidate {
                    reference,
                    image_id: image.id.clone(),
                    size_bytes,
                    last_used,
                    names: count,
                }));
            }
            Ok(all)
        }
    }
}

/// What running containers (anyone's) use: the names they were made from and their image ids.
pub async fn running_images(docker: &Docker) -> Result<(HashSet<String>, HashSet<String>), String> {
    let containers = docker
        .list_containers(Some(ListContainersOptions::default()))
        .await
        .map_err(|e| e.to_string())?;
    let mut names = HashSet::new();
    let mut ids = HashSet::new();
    for c in containers {
        names.extend(c.image);
        ids.extend(c.image_id);
    }
    Ok((names, ids))
}

/// What removing one name did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removal {
    /// The image itself went (its last name): its bytes were freed.
    pub deleted: bool,
}

/// Removes one name of an image, never forced: the engine refuses when a container still uses
/// the image, which is one more guard.
pub async fn remove_image(docker: &Docker, reference: &str) -> Result<Removal, String> {
    let options = RemoveImageOptions {
        force: false,
        noprune: false,
        ..Default::default()
    };
    match docker.remove_image(reference, Some(options), None).await {
        Ok(items) => Ok(Removal {
            deleted: items.iter().any(|i| i.deleted.is_some()),
        }),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code,
            message,
            ..
        }) => Err(format!("{message} (HTTP {status_code})")),
        Err(e) => Err(e.to_string()),
    }
}

/// What the agent's own leftovers cleanup removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Leftovers {
    pub containers: usize,
    pub networks: usize,
    pub volumes: usize,
}

fn agent_filters(agent_id: &str) -> HashMap<String, Vec<String>> {
    HashMap::from([(
        "label".to_owned(),
        vec![format!("{LABEL_AGENT_ID}={agent_id}")],
    )])
}

/// Removes this agent's stopped containers, networks and volumes, except those of a running
/// job. `running_jobs` is called AFTER the listings (a job registers before it makes anything),
/// as in the orphan sweep.
pub async fn remove_leftovers(
    docker: &Docker,
    agent_id: &str,
    running_jobs: impl Fn() -> HashSet<String>,
) -> Leftovers {
    let mut filters = agent_filters(agent_id);
    filters
        .entry("label".to_owned())
        .or_default()
        .push(format!("{LABEL_MANAGED}=true"));
    filters.insert(
        "status".to_owned(),
        vec!["created".into(), "exited".into(), "dead".into()],
    );
    let containers = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .unwrap_or_default();
    let networks = docker
        .list_networks(Some(ListNetworksOptions {
            filters: Some(agent_filters(agent_id)),
        }))
        .await
        .unwrap_or_default();
    let volumes = docker
        .list_volumes(Some(ListVolumesOptions {
            filters: Some(agent_filters(agent_id)),
        }))
        .await
        .ok()
        .and_then(|v| v.volumes)
        .unwrap_or_default();
    let running = running_jobs();
    let spare = |labels: Option<&HashMap<String, String>>| {
        labels
            .and_then(|l| l.get(LABEL_JOB_ID))
            .is_some_and(|job| running.contains(job))
    };
    let mut removed = Leftovers::default();
    // An `exec`'s container (still `created` while it starts) is its own process's: only
    // `exec_owner`'s sweep, which checks that process is gone, removes it.
    let exec_owned = |labels: Option<&HashMap<String, String>>| {
        labels.is_some_and(|l| l.contains_key(crate::executor::exec_owner::LABEL_EXEC_LOCK))
    };
    for c in containers {
        let keep = spare(c.labels.as_ref()) || exec_owned(c.labels.as_ref());
        let Some(id) = c.id.filter(|_| !keep) else {
            continue;
        };
        match try_remove(docker, &id).await {
            Ok(()) => removed.containers += 1,
            Err(e) => {
                tracing::warn!(container = %id, error = %e, "disk collection: cannot remove a stopped container")
            }
        }
    }
    for n in networks {
        // An exec's network, too, is its own process's until `exec_owner` finds it dead.
        let keep = spare(n.labels.as_ref()) || exec_owned(n.labels.as_ref());
        let Some(id) = n.id.filter(|_| !keep) else {
            continue;
        };
        // Refused while a container is attached: exactly the guard wanted.
        match docker.remove_network(&id).await {
            Ok(()) => removed.networks += 1,
            Err(e) => tracing::debug!(network = %id, error = %e, "disk collection: network kept"),
        }
    }
    for v in volumes {
        if spare(Some(&v.labels)) {
            continue;
        }
        // Never forced: a volume a container still mounts is refused.
        match docker
            .remove_volume(&v.name, Some(RemoveVolumeOptions { force: false }))
            .await
        {
            Ok(()) => removed.volumes += 1,
            Err(e) => tracing::debug!(volume = %v.name, error = %e, "disk collection: volume kept"),
        }
    }
    removed
}
