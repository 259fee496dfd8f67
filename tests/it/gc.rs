//! The disk collector against the real Docker engine: which images it removes, in which order,
//! what it never touches, where it stops; and the agent binary doing it on its own.
//!
//! Every image here is a tag of the local test image with a name unique to the test
//! (`gryt-gc-test-<uuid>:N`): removing such a tag never removes an image another suite uses.
//! The collector runs under `docker.gc_images = agent` with an agent id of its own. Free space
//! is given by a fake probe (no disk is filled), except in the end-to-end test, whose marks
//! are computed from the real free space.

use crate::support;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::TagImageOptions;
use gryt_agent::config::{DiskSettings, GcImages, PullPolicy, Settings};
use gryt_agent::executor::container::{LABEL_AGENT_ID, LABEL_JOB_ID, LABEL_MANAGED};
use gryt_agent::executor::{Executor, ExecutorSettings, JobControl};
use gryt_agent::gc::{Collector, DiskProbe, FsReading, ImageHold, ImageUse};
use gryt_agent::state::jobs::RunningJobs;

const MIB: u64 = 1024 * 1024;

/// Images tagged for one test, removed (whatever is left of them) when dropped.
struct TestImages {
    docker: Docker,
    repo: String,
}

impl TestImages {
    async fn new(tags: &[&str]) -> Self {
        let docker = support::docker().await;
        let source = support::test_image().await;
        let repo = format!("gryt-gc-test-{}", uuid::Uuid::new_v4().simple());
        for tag in tags {
            let options = TagImageOptions {
                repo: Some(repo.clone()),
                tag: Some((*tag).to_owned()),
            };
            docker.tag_image(&source, Some(options)).await.unwrap();
        }
        TestImages { docker, repo }
    }

    fn name(&self, tag: &str) -> String {
        format!("{}:{tag}", self.repo)
    }

    async fn exists(&self, tag: &str) -> bool {
        self.docker.inspect_image(&self.name(tag)).await.is_ok()
    }

    async fn existing(&self, tags: &[&str]) -> Vec<String> {
        let mut left = Vec::new();
        for tag in tags {
            if self.exists(tag).await {
                left.push((*tag).to_owned());
            }
        }
        left
    }
}

impl Drop for TestImages {
    fn drop(&mut self) {
        // Only this test's own names, by name (never forced): the shared image stays.
        let repo = self.repo.clone();
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "docker image ls --format '{{{{.Repository}}}}:{{{{.Tag}}}}' {repo} | xargs -r docker image rm >/dev/null 2>&1"
            ))
            .status();
    }
}

/// An executor of the test's own agent id, with `gc_images = agent`, a pull policy that lets
/// the collector work, and the default image set to one of the test's names.
fn executor(test: &str, default_image: String, work: &Path, state: &Path) -> Arc<Executor> {
    let mut settings = Settings::load_from(None, &[], &[]).unwrap();
    settings.docker.image = default_image;
    settings.docker.pull_policy = PullPolicy::IfNotPresent;
    settings.docker.gc_images = GcImages::Agent;
    settings.docker.network = "none".into();
    settings.work_dir = Some(work.to_owned());
    settings.state_dir = state.to_owned();
    settings.job.stop_grace_seconds = 1;
    let agent_id = support::unique_agent_id(test);
    Arc::new(Executor::new(ExecutorSettings::from_settings(&settings, agent_id).unwrap()).unwrap())
}

fn marks(trigger_mb: u64, target_mb: u64) -> DiskSettings {
    DiskSettings {
        gc_trigger_free_mb: trigger_mb,
        gc_target_free_mb: target_mb,
        gc_interval_seconds: 300,
    }
}

/// Free space that grows by `step` MiB with every image the collector removed (it forgets
/// each one it removes from the record), starting from `start` MiB. Optionally, once `after`
/// images are gone, a job starts with `image` (held until the probe is dropped).
struct Growing {
    record: ImageUse,
    recorded_at_start: usize,
    start_mb: u64,
    step_mb: u64,
    job_starts: Option<(usize, String)>,
    started: Mutex<Option<ImageHold>>,
}

impl Growing {
    fn new(record: &ImageUse, start_mb: u64, step_mb: u64) -> Self {
        Growing {
            record: record.clone(),
            recorded_at_start: record.recorded().len(),
            start_mb,
            step_mb,
            job_starts: None,
            started: Mutex::new(None),
        }
    }
}

impl DiskProbe for Growing {
    fn read(&self, _: &Path) -> std::io::Result<FsReading> {
        let removed = self
            .recorded_at_start
            .saturating_sub(self.record.recorded().len());
        if let Some((after, image)) = &self.job_starts {
            let mut started = self.started.lock().unwrap();
            if removed >= *after && started.is_none() {
                *started = Some(self.record.begin(image));
            }
        }
        Ok(FsReading {
            free_bytes: (self.start_mb + removed as u64 * self.step_mb) * MIB,
            fs_id: 1,
        })
    }
}

/// Records uses of `tags` in this order (the first is the least recently used).
fn use_in_order(record: &ImageUse, images: &TestImages, tags: &[&str]) {
    for tag in tags {
        drop(record.begin(&images.name(tag)));
    }
}

#[tokio::test]
async fn least_recently_used_go_first_and_collection_stops_at_the_low_water_mark() {
    let all = ["1", "2", "3", "running", "never", "default"];
    let images = TestImages::new(&all).await;
    let (work, state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let executor = executor("gc-lru", images.name("default"), work.path(), state.path());
    let record = executor.settings().image_use.clone();
    use_in_order(&record, &images, &["default", "1", "2", "3", "running"]);
    let _running_job = record.begin(&images.name("running"));

    // 500 MiB free, trigger 1000, target 2000; each removal frees 800: two removals reach it.
    let probe = Arc::new(Growing::new(&record, 500, 800));
    let collector = Collector::new(executor.clone(), RunningJobs::default(), marks(1000, 2000))
        .with_probe(probe);
    let done = collector.collect().await;
    assert_eq!(
        done.images_removed,
        [images.name("1"), images.name("2")],
        "{done:?}"
    );
    assert!(done.still_low.is_none(), "{done:?}");
    assert_eq!(
        images.existing(&all).await,
        ["3", "running", "never", "default"]
    );

    // Never enough: everything the agent used and no job holds goes, the default image last;
    // the running job's image and the one the agent never used stay.
    let probe = Arc::new(Growing::new(&record, 500, 0));
    let collector =
        Collector::new(executor, RunningJobs::default(), marks(1000, 2000)).with_probe(probe);
    let done = collector.collect().await;
    assert_eq!(
        done.images_removed,
        [images.name("3"), images.name("default")],
        "{done:?}"
    );
    assert!(done.still_low.is_some(), "{done:?}");
    assert_eq!(images.existing(&all).await, ["running", "never"]);
}

#[tokio::test]
async fn an_image_a_job_starts_with_during_the_collection_is_kept() {
    let all = ["1", "2", "3", "default"];
    let images = TestImages::new(&all).await;
    let (work, state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let executor = executor(
        "gc-recheck",
        images.name("default"),
        work.path(),
        state.path(),
    );
    let record = executor.settings().image_use.clone();
    use_in_order(&record, &images, &["1", "2", "3"]);
    // The plan is 1, 2, 3. Right after 1 goes, a job starts with 2: the re-check before the
    // next removal sees it, 2 stays and 3 goes instead.
    let mut probe = Growing::new(&record, 500, 0);
    probe.job_starts = Some((1, images.name("2")));
    let collector = Collector::new(executor, RunningJobs::default(), marks(1000, 2000))
        .with_probe(Arc::new(probe));
    let done = collector.collect().await;
    assert_eq!(
        done.images_removed,
        [images.name("1"), images.name("3")],
        "{done:?}"
    );
    assert_eq!(images.existing(&all).await, ["2", "default"]);
}

#[tokio::test]
async fn a_running_jobs_image_is_registered_before_use_and_kept() {
    let all = ["old", "job", "default"];
    let images = TestImages::new(&all).await;
    let (work, state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let executor = executor(
        "gc-running",
        images.name("default"),
        work.path(),
        state.path(),
    );
    let record = executor.settings().image_use.clone();
    use_in_order(&record, &images, &["old"]);
    let mut spec = support::job("version: 1\nsteps:\n  - run: sleep 120\n");
    spec.docker_image = Some(images.name("job"));
    let control = JobControl::new();
    // As the agent does: the job is registered before it makes anything.
    let jobs = RunningJobs::default();
    let _registered = jobs.register(1, control.clone());
    let job = {
        let (executor, control) = (executor.clone(), control.clone());
        tokio::spawn(async move {
            executor
                .run(&spec, &gryt_agent::executor::Discard, &control)
                .await
        })
    };
    let agent_id = executor.settings().agent_id.clone();
    for _ in 0..600 {
        if !support::containers_of(&agent_id).await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        record.is_held(&images.name("job")),
        "the job holds its image"
    );

    let probe = Arc::new(Growing::new(&record, 500, 0));
    let collector =
        Collector::new(executor.clone(), jobs.clone(), marks(1000, 2000)).with_probe(probe);
    let done = collector.collect().await;
    assert_eq!(done.images_removed, [images.name("old")], "{done:?}");
    assert_eq!(
        done.leftovers.containers, 0,
        "the running job's container stays"
    );
    assert!(images.exists("job").await);

    control.cancel("test over");
    let result = job.await.unwrap();
    assert_eq!(result.status, gryt_agent::wire::JobStatus::Cancelled);
    assert!(!record.is_held(&images.name("job")));
    assert!(record.recorded().contains_key(&images.name("job")));
}

#[tokio::test]
async fn the_agents_own_stopped_containers_networks_and_volumes_go() {
    use bollard::models::{ContainerCreateBody, NetworkCreateRequest, VolumeCreateRequest};
    use bollard::query_parameters::CreateContainerOptionsBuilder;

    let docker = support::docker().await;
    let image = support::test_image().await;
    let (work, state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let executor = executor("gc-leftovers", image.clone(), work.path(), state.path());
    let agent_id = executor.settings().agent_id.clone();
    let other_agent = support::unique_agent_id("gc-leftovers-other");
    let labels = |agent: &str, job: &str| {
        HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_AGENT_ID.to_owned(), agent.to_owned()),
            (LABEL_JOB_ID.to_owned(), job.to_owned()),
        ])
    };
    let mut containers = HashMap::new();
    for (name, agent, job) in [
        ("stale", agent_id.as_str(), "41"),
        ("running-job", agent_id.as_str(), "42"),
        ("other-agent", other_agent.as_str(), "41"),
    ] {
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            cmd: Some(vec!["true".into()]),
            labels: Some(labels(agent, job)),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default()
            .name(&format!("{agent}-{name}"))
            .build();
        let id = docker
            .create_container(Some(options), body)
            .await
            .unwrap()
            .id;
        containers.insert(name, id);
    }
    let network = docker
        .create_network(NetworkCreateRequest {
            name: format!("{agent_id}-net"),
            labels: Some(labels(&agent_id, "41")),
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    let volume = docker
        .create_volume(VolumeCreateRequest {
            name: Some(format!("{agent_id}-vol")),
            labels: Some(labels(&agent_id, "41")),
            ..Default::default()
        })
        .await
        .unwrap()
        .name;

    let jobs = RunningJobs::default();
    let _running = jobs.register(42, JobControl::new());
    // Plenty of space: leftovers go whatever the disk says; no image is even looked at.
    let probe = Arc::new(Growing::new(&ImageUse::in_memory(), 1 << 20, 0));
    let done = Collector::new(executor, jobs, marks(1000, 2000))
        .with_probe(probe)
        .collect()
        .await;
    assert_eq!(
        (
            done.leftovers.containers,
            done.leftovers.networks,
            done.leftovers.volumes
        ),
        (1, 1, 1),
        "{done:?}"
    );
    assert!(done.images_removed.is_empty());
    assert!(
        docker
            .inspect_container(&containers["stale"], None)
            .await
            .is_err()
    );
    assert!(docker.inspect_network(&network, None).await.is_err());
    assert!(docker.inspect_volume(&volume).await.is_err());
    for kept in ["running-job", "other-agent"] {
        let id = &containers[kept];
        assert!(docker.inspect_container(id, None).await.is_ok(), "{kept}");
        let options = bollard::query_parameters::RemoveContainerOptionsBuilder::default()
            .force(true)
            .build();
        docker.remove_container(id, Some(options)).await.unwrap();
    }
}

/// The agent binary in push mode on `state`, killed when dropped.
struct PushAgent {
    child: std::process::Child,
    url: String,
    log: PathBuf,
}

impl PushAgent {
    async fn start(
        images: &TestImages,
        agent_id: &str,
        work: &Path,
        state: &Path,
        env: &[(&str, String)],
    ) -> Self {
        let port = support::process::free_port();
        let image = images.name("default");
        let mut cmd = support::process::push::command(&image, agent_id, work, state, port);
        let log = state.join("agent.log");
        cmd.env("RUST_LOG", "gryt_agent=debug,info")
            .env("NO_COLOR", "1")
            .env("GRYT_PULL_POLICY", "if-not-present")
            .env("GRYT_GC_IMAGES", "agent")
            .env("GRYT_NETWORK", "none")
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let agent = PushAgent {
            child: cmd.spawn().unwrap(),
            url: format!("http://127.0.0.1:{port}"),
            log,
        };
        for _ in 0..300 {
            if reqwest::get(format!("{}/health", agent.url)).await.is_ok() {
                return agent;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the agent did not answer; log:\n{}", agent.log_text());
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn health(&self) -> serde_json::Value {
        reqwest::get(format!("{}/health", self.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn metric(&self, name: &str) -> u64 {
        let text = reqwest::get(format!("{}/metrics", self.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0)
    }

    /// Waits (generously) until the agent has finished `count` collections in all.
    async fn wait_collections(&self, count: u64) {
        for _ in 0..1800 {
            if self.metric("gryt_agent_disk_collections_total").await >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("fewer than {count} collections; log:\n{}", self.log_text());
    }
}

impl Drop for PushAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_agent_collects_by_itself_when_real_free_space_is_below_the_mark() {
    let all = ["1", "2", "job", "never", "default"];
    let images = TestImages::new(&all).await;
    let (work, state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let agent_id = support::unique_agent_id("gc-e2e");
    // An earlier run of this agent used 1 and 2 (kept in its state dir across the restart).
    let record = serde_json::json!({
        "version": 1,
        "images": {images.name("1"): 1_000, images.name("2"): 2_000},
    });
    std::fs::write(
        state.path().join("image-use.json"),
        serde_json::to_vec(&record).unwrap(),
    )
    .unwrap();
    // Marks just above the real free space: the disk is "low", and no removal of a tag can
    // make it high.
    let free_mb = gryt_agent::state::resources::free_bytes(work.path()).unwrap() / MIB;
    let env = [
        ("GRYT_GC_TRIGGER_FREE_MB", (free_mb + 2048).to_string()),
        ("GRYT_GC_TARGET_FREE_MB", (free_mb + 4096).to_string()),
        ("GRYT_GC_INTERVAL", "10".to_owned()),
    ];
    let agent = PushAgent::start(&images, &agent_id, work.path(), state.path(), &env).await;

    // The collection at start removes what the earlier run used, and nothing else.
    agent.wait_collections(1).await;
    assert_eq!(images.existing(&all).await, ["job", "never", "default"]);
    let health = agent.health().await;
    assert_eq!(health["status"], "degraded", "{health}");
    let report = &health["disk_collection"];
    assert!(
        report["still_low"]
            .as_str()
            .unwrap()
            .contains("disk still low")
    );
    assert!(report["disk"]["docker_root"].is_string(), "{health}");
    assert_eq!(
        agent
            .metric("gryt_agent_disk_collection_images_removed_total")
            .await,
        2
    );

    // A job runs with `job`: collections while it runs keep it.
    let mut spec = support::shell_job(7, "sleep 120");
    spec["docker_image"] = serde_json::json!(images.name("job"));
    let request = {
        let url = format!("{}/jobs/execute", agent.url);
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .header("X-API-Key", support::process::push::KEY)
                .json(&spec)
                .send()
                .await
        })
    };
    for _ in 0..600 {
        if agent.health().await["running_jobs"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(agent.health().await["running_jobs"], 1);
    let seen = agent.metric("gryt_agent_disk_collections_total").await;
    // Two more: at least one started after the job did.
    agent.wait_collections(seen + 2).await;
    assert_eq!(
        agent.health().await["running_jobs"],
        1,
        "{}",
        agent.log_text()
    );
    assert!(images.exists("job").await, "{}", agent.log_text());
    assert!(images.exists("never").await);
    // The use was recorded in the state dir, for the next run.
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.path().join("image-use.json")).unwrap())
            .unwrap();
    let names: HashSet<&str> = stored["images"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert!(names.contains(images.name("job").as_str()), "{stored}");
    // A client that goes away cancels its job: let it end before the agent is killed.
    request.abort();
    for _ in 0..600 {
        if agent.health().await["running_jobs"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(agent.health().await["running_jobs"], 0);
}

#[tokio::test]
async fn an_agent_refusing_jobs_for_low_disk_collects_without_waiting_for_its_timer() {
    let images = TestImages::new(&["default"]).await;
    let (work, state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let agent_id = support::unique_agent_id("gc-refusing");
    let free_mb = gryt_agent::state::resources::free_bytes(work.path()).unwrap() / MIB;
    // The timer alone would collect once a day; the work dir is below min_free_disk_mb.
    let env = [
        ("GRYT_GC_INTERVAL", "86400".to_owned()),
        ("GRYT_MIN_FREE_DISK_MB", (free_mb + 4096).to_string()),
    ];
    let agent = PushAgent::start(&images, &agent_id, work.path(), state.path(), &env).await;
    agent.wait_collections(2).await;
    assert!(images.exists("default").await);
}

#[tokio::test]
async fn check_shows_the_free_space_of_the_work_dir_and_dockers_root_against_the_marks() {
    let image = support::test_image().await;
    let state = tempfile::tempdir().unwrap();
    let free_mb = gryt_agent::state::resources::free_bytes(state.path()).unwrap() / MIB;
    let check = |trigger_mb: u64| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_gryt-agent"));
        cmd.arg("check")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("GRYT_PUSH", "true")
            .env("AGENT_API_KEY", support::process::push::KEY)
            .env("GRYT_DOCKER_IMAGE", &image)
            .env("GRYT_PULL_POLICY", "never")
            .env("GRYT_STATE_DIR", state.path())
            .env("GRYT_GC_TRIGGER_FREE_MB", trigger_mb.to_string())
            .env("GRYT_GC_TARGET_FREE_MB", (trigger_mb + 1).to_string());
        cmd
    };
    let run = |mut cmd: std::process::Command| async move {
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, text) = run(check(1)).await;
    assert!(ok, "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("disk: work dir"))
        .unwrap_or_else(|| panic!("no disk line in:\n{text}"));
    assert!(line.starts_with("[ok]"), "{text}");
    assert!(line.contains("Docker root"), "{line}");
    assert!(
        line.contains("collection below 1 MiB, until 2 MiB"),
        "{line}"
    );
    assert!(line.contains("docker.gc_images = agent"), "{line}");
    // Below the trigger: a warning that says what the agent will do, not a failure.
    let (ok, text) = run(check(free_mb + 4096)).await;
    assert!(ok, "{text}");
    assert!(text.contains("[warn] disk: work dir"), "{text}");
    assert!(text.contains("will remove unused images"), "{text}");
}

/// Records whether the job's image was held when its pull started.
struct HeldAtPull {
    record: ImageUse,
    held: Mutex<Option<bool>>,
}

impl gryt_agent::executor::JobObserver for HeldAtPull {
    fn output(&self, _: gryt_agent::executor::OutputStream, _: &[u8]) {}

    fn event(&self, event: gryt_agent::executor::JobEvent<'_>) {
        if let gryt_agent::executor::JobEvent::PullStarted { image } = event {
            *self.held.lock().unwrap() = Some(self.record.is_held(image));
        }
    }
}

#[tokio::test]
async fn a_job_holds_its_image_before_the_image_is_pulled() {
    let (work, state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // A registry that refuses connections: the pull starts, then fails at once.
    let image = format!(
        "127.0.0.1:9/gryt-gc-test-{}:1",
        uuid::Uuid::new_v4().simple()
    );
    let mut settings = Settings::load_from(None, &[], &[]).unwrap();
    settings.docker.image = image.clone();
    settings.docker.pull_policy = PullPolicy::Always;
    settings.work_dir = Some(work.path().to_owned());
    settings.state_dir = state.path().to_owned();
    let agent_id = support::unique_agent_id("gc-pull");
    let executor =
        Executor::new(ExecutorSettings::from_settings(&settings, agent_id).unwrap()).unwrap();
    let record = executor.settings().image_use.clone();
    let observer = HeldAtPull {
        record: record.clone(),
        held: Mutex::new(None),
    };
    let result = executor
        .run(
            &support::job("version: 1\nsteps:\n  - run: true\n"),
            &observer,
            &JobControl::new(),
        )
        .await;
    assert_eq!(
        result.status,
        gryt_agent::wire::JobStatus::Error,
        "{result:?}"
    );
    assert_eq!(
        *observer.held.lock().unwrap(),
        Some(true),
        "not held when the pull started"
    );
    assert!(!record.is_held(&image), "still held after the job");
    assert!(record.recorded().contains_key(&image));
}

#[tokio::test]
async fn without_a_docker_engine_a_collection_removes_nothing_and_says_why() {
    let (work, state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut settings = Settings::load_from(None, &[], &[]).unwrap();
    settings.docker.host = Some(format!("unix://{}/no-docker.sock", state.path().display()));
    settings.docker.pull_policy = PullPolicy::IfNotPresent;
    settings.work_dir = Some(work.path().to_owned());
    settings.state_dir = state.path().to_owned();
    let agent_id = support::unique_agent_id("gc-no-docker");
    let executor = Arc::new(
        Executor::new(ExecutorSettings::from_settings(&settings, agent_id).unwrap()).unwrap(),
    );
    let record = executor.settings().image_use.clone();
    drop(record.begin("gryt-gc-test-never-there:1"));
    let probe = Arc::new(Growing::new(&record, 500, 0));
    let done = Collector::new(executor, RunningJobs::default(), marks(1000, 2000))
        .with_probe(probe)
        .collect()
        .await;
    assert!(done.images_removed.is_empty(), "{done:?}");
    assert!(
        done.notes.iter().any(|n| n.contains("no image removed")),
        "{done:?}"
    );
    // Docker's root is unknown: the work dir alone was measured, and it is low.
    assert!(done.still_low.is_some(), "{done:?}");
    let disk = done.disk.unwrap();
    assert!(disk.docker_root.is_none() && disk.docker_root_note.is_some());
}
