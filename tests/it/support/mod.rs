//! Shared test support: the local test image, executors wired to it, and leftover checks.
//!
//! No registry is reachable here, so the image the tests run in is built locally by `image.rs`
//! (shared with the benchmark): Debian's `busybox-static` binary with its applets, plus
//! `gryt-standin.sh` installed as `/usr/local/bin/gryt` (a TEST STAND-IN for the gryt CLI, see
//! that file). Tests that need Docker fail when there is none: they never skip.
#![allow(dead_code)]

pub mod image;
pub mod process;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use bollard::Docker;
use bollard::query_parameters::{ListContainersOptionsBuilder, ListNetworksOptionsBuilder};
use futures_util::StreamExt;
use gryt_agent::config::Settings;
use gryt_agent::executor::container::LABEL_AGENT_ID;
use gryt_agent::executor::{Executor, ExecutorSettings, JobObserver, OutputStream};
use tokio::sync::OnceCell;

static IMAGE: OnceCell<String> = OnceCell::const_new();

/// The Docker engine the tests use; panics (fails the test) when there is none.
pub async fn docker() -> Docker {
    let docker = gryt_agent::executor::connect(None).expect("no Docker client");
    let docker = docker.negotiate_version().await.expect(
        "the Docker engine does not answer: these tests need a running Docker engine (see .ci/run)",
    );
    docker.ping().await.expect("Docker ping failed");
    docker
}

/// Builds (once) and returns the test image's name.
pub async fn test_image() -> String {
    IMAGE.get_or_init(build_test_image).await.clone()
}

async fn build_test_image() -> String {
    import_test_image(&docker().await).await
}

/// Imports the test image into `docker` (when it is not there yet) and returns its name.
pub async fn import_test_image(docker: &Docker) -> String {
    image::import(docker)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A unique agent id per test, so leftover checks only see that test's containers.
pub fn unique_agent_id(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("test-{test}-{}-{nanos}", std::process::id())
}

/// An executor on the test image with a private work dir. `tweak` adjusts the settings.
pub struct TestAgent {
    pub executor: Executor,
    pub agent_id: String,
    pub work_dir: tempfile::TempDir,
}

pub async fn test_agent(test: &str, tweak: impl FnOnce(&mut Settings)) -> TestAgent {
    let image = test_image().await;
    let work_dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::load_from(None, &[], &[]).unwrap();
    settings.docker.image = image;
    settings.docker.pull_policy = gryt_agent::config::PullPolicy::Never;
    settings.work_dir = Some(work_dir.path().to_owned());
    settings.job.stop_grace_seconds = 2;
    tweak(&mut settings);
    let agent_id = unique_agent_id(test);
    let executor =
        Executor::new(ExecutorSettings::from_settings(&settings, agent_id.clone()).unwrap())
            .unwrap();
    TestAgent {
        executor,
        agent_id,
        work_dir,
    }
}

impl TestAgent {
    /// Runs `spec` to its end with no observer and no stop request.
    pub async fn run(&self, spec: &gryt_agent::wire::JobSpec) -> gryt_agent::wire::JobResult {
        self.executor
            .run(
                spec,
                &gryt_agent::executor::Discard,
                &gryt_agent::executor::JobControl::new(),
            )
            .await
    }

    /// Containers (running or not) carrying this agent's label.
    pub async fn containers(&self) -> Vec<String> {
        containers_of(&self.agent_id).await
    }

    /// Asserts that no container, no network and no workspace of this agent is left.
    pub async fn assert_clean(&self) {
        // Removal of a dropped container happens in the background: give it a moment.
        for _ in 0..50 {
            if self.containers().await.is_empty() && networks_of(&self.agent_id).await.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        self.assert_clean_now().await;
    }

    /// Asserts that no container, no network and no workspace of this agent is left now.
    pub async fn assert_clean_now(&self) {
        assert_eq!(
            self.containers().await,
            Vec::<String>::new(),
            "containers left behind"
        );
        assert_eq!(
            networks_of(&self.agent_id).await,
            Vec::<String>::new(),
            "networks left behind"
        );
        let left: Vec<PathBuf> = std::fs::read_dir(self.work_dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(left.is_empty(), "workspaces left behind: {left:?}");
    }
}

pub async fn containers_of(agent_id: &str) -> Vec<String> {
    containers_in(&docker().await, agent_id).await.unwrap()
}

/// Containers (running or not) of `agent_id` on the engine `docker` speaks to.
pub async fn containers_in(
    docker: &Docker,
    agent_id: &str,
) -> Result<Vec<String>, bollard::errors::Error> {
    let filters = HashMap::from([("label", vec![format!("{LABEL_AGENT_ID}={agent_id}")])]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let listed = docker.list_containers(Some(options)).await?;
    Ok(listed.into_iter().filter_map(|c| c.id).collect())
}

/// Networks labelled with `agent_id` (its job networks).
pub async fn networks_of(agent_id: &str) -> Vec<String> {
    let filters = HashMap::from([("label", vec![format!("{LABEL_AGENT_ID}={agent_id}")])]);
    let options = ListNetworksOptionsBuilder::default()
        .filters(&filters)
        .build();
    let listed = docker().await.list_networks(Some(options)).await.unwrap();
    listed.into_iter().filter_map(|n| n.id).collect()
}

/// Records everything a job printed, in arrival order.
#[derive(Default)]
pub struct Recorder {
    pub chunks: Mutex<Vec<(OutputStream, Vec<u8>)>>,
    pub events: Mutex<Vec<String>>,
}

impl JobObserver for Recorder {
    fn output(&self, stream: OutputStream, data: &[u8]) {
        self.chunks.lock().unwrap().push((stream, data.to_vec()));
    }
    fn event(&self, event: gryt_agent::executor::JobEvent<'_>) {
        self.events.lock().unwrap().push(format!("{event:?}"));
    }
}

impl Recorder {
    pub fn stream(&self, which: OutputStream) -> Vec<u8> {
        self.chunks
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, _)| *s == which)
            .flat_map(|(_, d)| d.clone())
            .collect()
    }
}

pub fn b64(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// A lease's job as the API sends it: a one-step YAML pipeline running `script`.
pub fn shell_job(id: i64, script: &str) -> serde_json::Value {
    let pipeline = format!("version: 1\nsteps:\n  - run: {script}\n");
    serde_json::json!({"job_id": id, "pipeline_b64": b64(&pipeline)})
}

/// Valid token vector `index` of the API-side set (`tests/data/token-crypto.json`), as
/// (encryption key, encrypted token, plaintext token).
pub fn token_vector(index: usize) -> (String, String, String) {
    let vectors: serde_json::Value =
        serde_json::from_str(include_str!("../../data/token-crypto.json")).unwrap();
    let v = &vectors["valid"][index];
    let s = |k: &str| v[k].as_str().unwrap().to_owned();
    (s("key"), s("token"), s("plaintext"))
}

/// A job running `pipeline` (YAML or gryt script text).
pub fn job(pipeline: &str) -> gryt_agent::wire::JobSpec {
    gryt_agent::wire::JobSpec {
        job_id: 1,
        pipeline_b64: b64(pipeline),
        ..Default::default()
    }
}

/// Watches Docker's `create` events for containers of `agent_id` while jobs run and inspects
/// each one as it is created.
///
/// Events rather than polling: a short job's container can live for less than one round of
/// listing and inspecting on a loaded machine, and a missed container would hide a regression.
///
/// Networks too: Docker's network events carry no labels, so every network created meanwhile
/// is inspected, and those labelled with `agent_id` are audited.
pub struct ContainerAudit {
    created: std::sync::Arc<Mutex<Vec<String>>>,
    seen: std::sync::Arc<Mutex<HashMap<String, bollard::models::ContainerInspectResponse>>>,
    networks: std::sync::Arc<Mutex<HashMap<String, bollard::models::NetworkInspect>>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
    network_task: tokio::task::JoinHandle<()>,
    agent_id: String,
}

impl ContainerAudit {
    pub async fn start(agent_id: &str) -> Self {
        use bollard::query_parameters::EventsOptionsBuilder;
        let docker = docker().await;
        let created: std::sync::Arc<Mutex<Vec<String>>> = Default::default();
        let seen: std::sync::Arc<
            Mutex<HashMap<String, bollard::models::ContainerInspectResponse>>,
        > = Default::default();
        let stop = tokio_util::sync::CancellationToken::new();
        let label = format!("{LABEL_AGENT_ID}={agent_id}");
        // `since` replays what happened before the subscription reached the engine.
        let since = (std::time::SystemTime::now() - std::time::Duration::from_secs(2))
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs()
            .to_string();
        let networks: std::sync::Arc<Mutex<HashMap<String, bollard::models::NetworkInspect>>> =
            Default::default();
        let network_task = tokio::spawn(watch_networks(
            docker.clone(),
            since.clone(),
            networks.clone(),
            stop.clone(),
        ));
        let (ids, store, stopped) = (created.clone(), seen.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let filters = HashMap::from([
                ("type", vec!["container"]),
                ("event", vec!["create"]),
                ("label", vec![label.as_str()]),
            ]);
            let options = EventsOptionsBuilder::default()
                .since(&since)
                .filters(&filters)
                .build();
            let mut events = docker.events(Some(options));
            loop {
                let event = tokio::select! {
                    _ = stopped.cancelled() => return,
                    event = events.next() => event,
                };
                let Some(event) = event else { return };
                let event = event.expect("Docker event stream failed");
                let Some(id) = event.actor.and_then(|a| a.id) else {
                    continue;
                };
                ids.lock().unwrap().push(id.clone());
                match docker.inspect_container(&id, None).await {
                    Ok(inspect) => {
                        store.lock().unwrap().insert(id, inspect);
                    }
                    // Said when the test fails: the container was removed before the inspect.
                    Err(e) => eprintln!("container audit: inspect of {id} failed: {e}"),
                }
            }
        });
        ContainerAudit {
            created,
            seen,
            networks,
            stop,
            task,
            network_task,
            agent_id: agent_id.to_owned(),
        }
    }

    /// Stops watching and asserts every container created was inspected and hardened; returns
    /// how many there were.
    pub async fn finish(self) -> usize {
        self.finish_all().await.0
    }

    /// Like [`ContainerAudit::finish`], and asserts every network of the agent created
    /// meanwhile was a hardened job network; returns how many containers and networks.
    pub async fn finish_all(self) -> (usize, usize) {
        // Let the last events arrive: the jobs have finished, so nothing new is being created.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        self.stop.cancel();
        self.task.await.unwrap();
        self.network_task.await.unwrap();
        let networks = self.networks.lock().unwrap().clone();
        let ours: Vec<_> = networks
            .iter()
            .filter(|(_, n)| {
                n.labels.as_ref().and_then(|l| l.get(LABEL_AGENT_ID)) == Some(&self.agent_id)
            })
            .collect();
        for (id, inspect) in &ours {
            audit_network(id, inspect);
        }
        let created = self.created.lock().unwrap().clone();
        let seen = self.seen.lock().unwrap();
        for id in &created {
            let inspect = seen
                .get(id)
                .unwrap_or_else(|| panic!("container {id} was gone before it could be inspected"));
            audit_container(id, inspect);
        }
        (created.len(), ours.len())
    }
}

/// Inspects every network created from `since` on until `stop`, into `store` (by id).
async fn watch_networks(
    docker: Docker,
    since: String,
    store: std::sync::Arc<Mutex<HashMap<String, bollard::models::NetworkInspect>>>,
    stop: tokio_util::sync::CancellationToken,
) {
    use bollard::query_parameters::EventsOptionsBuilder;
    let filters = HashMap::from([("type", vec!["network"]), ("event", vec!["create"])]);
    let options = EventsOptionsBuilder::default()
        .since(&since)
        .filters(&filters)
        .build();
    let mut events = docker.events(Some(options));
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = events.next() => event,
        };
        let Some(event) = event else { return };
        let event = event.expect("Docker event stream failed");
        let Some(id) = event.actor.and_then(|a| a.id) else {
            continue;
        };
        // Another test's network may be gone already: only this agent's are audited, and
        // theirs live as long as their job's container.
        if let Ok(inspect) = docker.inspect_network(&id, None).await {
            store.lock().unwrap().insert(id, inspect);
        }
    }
}

/// What every job network must be: a bridge of the agent's pool, labelled as a job network of
/// its agent and job, not attachable, IPv4 only, with a `gryt-` bridge the firewall can name.
pub fn audit_network(id: &str, inspect: &bollard::models::NetworkInspect) {
    let labels = inspect.labels.as_ref().expect("labels");
    for key in [
        "io.gryt.agent.managed",
        "io.gryt.agent.id",
        "io.gryt.job.id",
    ] {
        assert!(labels.contains_key(key), "{id}: label {key}: {labels:?}");
    }
    assert_eq!(
        labels.get("io.gryt.network").map(String::as_str),
        Some("job"),
        "{id}: job network label"
    );
    assert_eq!(inspect.driver.as_deref(), Some("bridge"), "{id}: driver");
    assert_ne!(inspect.name.as_deref(), Some("host"), "{id}: host network");
    assert_ne!(inspect.attachable, Some(true), "{id}: attachable");
    assert_ne!(inspect.enable_ipv6, Some(true), "{id}: IPv6");
    assert_ne!(inspect.ingress, Some(true), "{id}: ingress");
    let options = inspect.options.clone().unwrap_or_default();
    assert!(
        options
            .get("com.docker.network.bridge.name")
            .is_some_and(|b| b.starts_with("gryt-") && b.len() <= 15),
        "{id}: bridge name: {options:?}"
    );
    let subnets: Vec<String> = inspect
        .ipam
        .as_ref()
        .and_then(|i| i.config.clone())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|c| c.subnet)
        .collect();
    assert_eq!(subnets.len(), 1, "{id}: subnets {subnets:?}");
    assert!(subnets[0].ends_with("/24"), "{id}: subnet {subnets:?}");
}

/// The few capabilities a service container may get back (to prepare its data directory and
/// drop to its image's user); a job container gets none.
const SERVICE_CAPABILITIES: &[&str] = &["CHOWN", "SETUID", "SETGID", "DAC_OVERRIDE", "FOWNER"];

/// The hardening every job container must have, and every service container (labelled
/// `io.gryt.service`) but for its user and those few capabilities.
pub fn audit_container(id: &str, inspect: &bollard::models::ContainerInspectResponse) {
    let config = inspect.config.as_ref().expect("config");
    let host = inspect.host_config.as_ref().expect("host config");
    let service = config
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key("io.gryt.service"));
    if service {
        audit_service(id, inspect);
    } else {
        let user = config.user.as_deref().unwrap_or("");
        assert!(
            !user.is_empty() && !user.starts_with("0") && !user.starts_with("root"),
            "{id}: user {user:?}"
        );
        assert!(
            host.cap_add.as_ref().is_none_or(|c| c.is_empty()),
            "{id}: cap_add"
        );
    }
    assert_ne!(host.privileged, Some(true), "{id}: privileged");
    assert_eq!(
        host.cap_drop.as_deref(),
        Some(&["ALL".to_string()][..]),
        "{id}: capabilities"
    );
    assert!(
        host.security_opt
            .as_ref()
            .is_some_and(|o| o.iter().any(|s| s == "no-new-privileges")),
        "{id}: no-new-privileges"
    );
    assert!(host.pids_limit.unwrap_or(0) > 0, "{id}: pids limit");
    assert!(host.memory.unwrap_or(0) > 0, "{id}: memory limit");
    assert!(host.nano_cpus.unwrap_or(0) > 0, "{id}: cpu limit");
    for bind in host.binds.iter().flatten() {
        assert!(
            !bind.contains("docker.sock"),
            "{id}: Docker socket mounted: {bind}"
        );
    }
    for mount in inspect.mounts.iter().flatten() {
        let source = mount.source.as_deref().unwrap_or("");
        assert!(
            !source.contains("docker.sock"),
            "{id}: Docker socket mounted: {source}"
        );
    }
    assert_ne!(
        host.network_mode.as_deref(),
        Some("host"),
        "{id}: host network"
    );
    assert_ne!(
        host.pid_mode.as_deref(),
        Some("host"),
        "{id}: host pid namespace"
    );
    let labels = config.labels.as_ref().expect("labels");
    assert_eq!(
        labels.get("io.gryt.agent.managed").map(String::as_str),
        Some("true"),
        "{id}: label"
    );
    assert!(labels.contains_key("io.gryt.job.id"), "{id}: job label");
}

/// A service container: only the service capabilities, nothing of the host mounted (the
/// anonymous volumes its image declares are Docker's, removed with it), and a user-defined
/// network, never the default bridge or the host's.
fn audit_service(id: &str, inspect: &bollard::models::ContainerInspectResponse) {
    let host = inspect.host_config.as_ref().expect("host config");
    for cap in host.cap_add.iter().flatten() {
        assert!(
            SERVICE_CAPABILITIES.contains(&cap.trim_start_matches("CAP_")),
            "{id}: service capability {cap}"
        );
    }
    assert!(
        host.binds.as_ref().is_none_or(|b| b.is_empty()),
        "{id}: service binds {:?}",
        host.binds
    );
    for mount in inspect.mounts.iter().flatten() {
        assert_eq!(
            mount.typ.as_deref(),
            Some("volume"),
            "{id}: service mount {mount:?}"
        );
    }
    let network = host.network_mode.as_deref().unwrap_or("");
    assert!(
        !["", "default", "bridge", "host", "none"].contains(&network),
        "{id}: service network {network:?}"
    );
}
