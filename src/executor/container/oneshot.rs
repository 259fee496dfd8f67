//! Short-lived hardened containers for the agent's own chores (emptying a workspace as the
//! job's user), run to their end and removed whatever happens; never for a job.

use std::collections::HashMap;

use bollard::Docker;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::WaitContainerOptions;
use futures_util::StreamExt;

use super::events::remove_container;
use super::spec::{WORKSPACE, hardened_host_config};

/// Runs `script` under `/bin/sh -c` in a short-lived hardened container of `image` as `user`,
/// with `workspace` mounted, no network and small limits; waits for it at most `timeout` and
/// removes it whatever happens. Ok when the script exited 0.
pub async fn run_to_end(
    docker: &Docker,
    image: &str,
    workspace: &str,
    user: (u32, u32),
    labels: HashMap<String, String>,
    script: &str,
    timeout: std::time::Duration,
) -> Result<(), String> {
    let body = ContainerCreateBody {
        image: Some(image.to_owned()),
        entrypoint: Some(vec!["/bin/sh".into(), "-c".into()]),
        cmd: Some(vec![script.to_owned()]),
        user: Some(format!("{}:{}", user.0, user.1)),
        working_dir: Some(WORKSPACE.into()),
        labels: Some(labels),
        tty: Some(false),
        host_config: Some(hardened_host_config(
            workspace,
            "none",
            64,
            64 * 1024 * 1024,
            500_000_000,
        )),
        ..Default::default()
    };
    let id = std::sync::Mutex::new(None::<String>);
    let run = async {
        let created = docker
            .create_container(
                None::<bollard::query_parameters::CreateContainerOptions>,
                body,
            )
            .await
            .map_err(|e| format!("cannot create a container from image {image}: {e}"))?;
        *id.lock().unwrap_or_else(|e| e.into_inner()) = Some(created.id.clone());
        docker
            .start_container(&created.id, None)
            .await
            .map_err(|e| format!("cannot start the container: {e}"))?;
        let mut waiting = docker.wait_container(&created.id, None::<WaitContainerOptions>);
        match waiting.next().await {
            Some(Ok(answer)) if answer.status_code == 0 => Ok(()),
            Some(Ok(answer)) => Err(format!("it exited with {}", answer.status_code)),
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                Err(format!("it exited with {code}"))
            }
            Some(Err(e)) => Err(format!("lost the container: {e}")),
            None => Err("the engine ended the wait without an exit code".into()),
        }
    };
    let result = match tokio::time::timeout(timeout, run).await {
        Ok(result) => result,
        Err(_) => Err(format!("it did not finish within {}s", timeout.as_secs())),
    };
    let created = id.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(id) = created {
        remove_container(docker, &id).await;
    }
    result
}
