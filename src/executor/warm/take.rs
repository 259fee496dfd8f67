//! How a job takes a warm container: one that fits (the pool's image, the pool on; the caller
//! sends jobs with services the cold way), still running and of the image the job resolved,
//! with the job's memory and CPU limits applied before anything of the job runs in it.
//!
//! A pool problem never fails a job: a container that is dead, of another image id (the tag
//! moved since it was made) or refuses the limits is removed, and the job starts cold.

use std::time::Duration;

use bollard::Docker;
use bollard::models::ContainerUpdateBody;
use tokio::time::Instant;

use super::super::container::JobContainer;
use super::super::network::JobNetwork;
use super::super::workspace::Workspace;
use super::{LiveId, Shared, Warm, WarmPool, lock, make};

/// How long a job that finds no container ready waits for a refill already under way: about
/// what a cold start costs, so waiting is never much slower than not.
const REFILL_WAIT: Duration = Duration::from_secs(2);

/// A warm container handed to a job: from here on it is the job's, removed by the job's
/// cleanup exit; `live` keeps its warm id spared by the sweeps until then.
pub(in crate::executor) struct Taken {
    pub container: JobContainer,
    pub network: Option<JobNetwork>,
    pub workspace: Workspace,
    pub live: LiveId,
}

impl WarmPool {
    /// A ready container for a job of `image` with these limits, or `None` (the cold path).
    pub(in crate::executor) async fn take(
        &self,
        docker: &Docker,
        image: &str,
        memory_bytes: i64,
        nano_cpus: i64,
    ) -> Option<Taken> {
        let shared = &self.shared;
        if image != shared.image || shared.target.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            return None;
        }
        let warm = pop_or_wait(shared).await?;
        let readied = ready_for_job(docker, &warm, image, memory_bytes, nano_cpus).await;
        match readied {
            Ok(()) => {
                shared.warm_jobs.inc();
                let Warm {
                    container,
                    network,
                    workspace,
                    live,
                    _image,
                } = warm;
                Some(Taken {
                    container,
                    network,
                    workspace,
                    live,
                })
            }
            Err(reason) => {
                tracing::warn!(container = %warm.container.id(), %reason, "warm pool: container not usable, removed; the job starts cold");
                make::discard(warm).await;
                None
            }
        }
    }
}

/// The oldest ready container; when none is ready but a refill is under way, that one, if it
/// comes within [`REFILL_WAIT`].
async fn pop_or_wait(shared: &Shared) -> Option<Warm> {
    // Subscribed before the look: a refill that ends after it wakes the wait below.
    let mut changed = shared.changed.subscribe();
    let deadline = Instant::now() + REFILL_WAIT;
    loop {
        {
            let mut inner = lock(&shared.inner);
            if inner.stopped {
                return None;
            }
            if let Some(warm) = inner.ready.pop_front() {
                shared.set_ready_gauge(&inner);
                drop(inner);
                shared.changed.send_replace(());
                return Some(warm);
            }
            if !inner.refilling {
                return None;
            }
        }
        match tokio::time::timeout_at(deadline, changed.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return None,
        }
    }
}

/// One inspect of the container and of the job's image, then the job's limits (memory with no
/// swap, as `hardened_host_config` sets them, and CPUs).
async fn ready_for_job(
    docker: &Docker,
    warm: &Warm,
    image: &str,
    memory_bytes: i64,
    nano_cpus: i64,
) -> Result<(), String> {
    let id = warm.container.id();
    let (container, wanted) = tokio::join!(
        docker.inspect_container(id, None),
        docker.inspect_image(image)
    );
    let container = container.map_err(|e| format!("cannot inspect it: {e}"))?;
    let wanted = wanted.map_err(|e| format!("cannot inspect image {image}: {e}"))?;
    let running = container.state.as_ref().and_then(|s| s.running) == Some(true);
    if !running {
        return Err("it is not running (engine restarted, or killed)".into());
    }
    if container.image.is_none() || container.image != wanted.id {
        return Err(format!("{image} is another image now"));
    }
    let limits = ContainerUpdateBody {
        memory: Some(memory_bytes),
        memory_swap: Some(memory_bytes),
        nano_cpus: Some(nano_cpus),
        ..Default::default()
    };
    docker
        .update_container(id, limits)
        .await
        .map_err(|e| format!("cannot apply the job's limits: {e}"))
}
