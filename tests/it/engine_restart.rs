//! The Docker engine restarting under a running job: the job is given back (503 with a clear
//! message, the agent's failure, not the job's), `/health` turns `degraded`, push requests get 503 meanwhile, and once the engine is back the agent takes jobs
//! again and the stranded container is removed, with no restart of the agent.
//!
//! The test runs its OWN `dockerd` (Debian's docker.io) on a private socket and data root, in a
//! private network namespace (`unshare --net`, which keeps the mounts, cgroups included), so it
//! never touches the machine's engine: a `dockerd` without a bridge deletes `docker0` in its
//! network namespace, and here that namespace is its own. Needs root.

use crate::fake_api;
use crate::support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bollard::Docker;
use serde_json::{Value, json};
use support::process::push::KEY;
use support::process::{Agent, containers_by_kind_in};

const POOL_ON: (&str, &str) = ("GRYT_WARM_POOL", "1");

struct PrivateEngine {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PrivateEngine {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("gryt-engine-")
            .tempdir()
            .unwrap();
        std::fs::write(dir.path().join("daemon.json"), "{}").unwrap();
        PrivateEngine { dir, child: None }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    fn address(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    async fn start(&mut self) -> Docker {
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("dockerd.log"))
            .unwrap();
        let child = Command::new("unshare")
            .args(["--net", "--", "dockerd"])
            .arg("--config-file")
            .arg(d.join("daemon.json"))
            .arg("--host")
            .arg(self.address())
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("docker.pid"))
            .args([
                "--storage-driver",
                "vfs",
                "--iptables=false",
                "--ip-masq=false",
                "--bridge",
                "none",
            ])
            .args([
                "--shutdown-timeout",
                "1",
                "--cgroup-parent",
                "gryt-engine-test",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("dockerd (Debian's docker.io) is needed");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // The socket only exists once dockerd listens.
            let client =
                Docker::connect_with_unix(&self.address(), 30, bollard::API_DEFAULT_VERSION);
            if let Ok(docker) = client
                && let Ok(negotiated) = docker.negotiate_version().await
                && negotiated.ping().await.is_ok()
            {
                return negotiated;
            }
            assert!(
                Instant::now() < deadline,
                "private dockerd did not come up: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the engine as a restart would (SIGTERM; its containers are stopped).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `unshare` execs dockerd, so the child's pid is dockerd's.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }
}

impl Drop for PrivateEngine {
    fn drop(&mut self) {
        self.stop();
        // vfs layers are plain directories; containerd may leave mounts under exec-root.
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.path().join("exec"))
            .stderr(Stdio::null())
            .status();
    }
}

async fn wait_health(agent: &Agent, status: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let h = agent.health().await;
        if h["status"] == status {
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "health never became {status}: {h}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_restart_fails_the_running_job_and_the_agent_recovers() {
    let mut engine = PrivateEngine::new();
    let docker = engine.start().await;
    support::import_test_image(&docker).await;
    let address = engine.address();
    let agent = Agent::push(
        "engine-restart",
        &[("DOCKER_HOST", &address), ("GRYT_NETWORK", "none"), POOL_ON],
    )
    .await;
    assert_eq!(agent.health().await["status"], "healthy");
    wait_pool(&agent, &docker).await;

    let slow = json!({"job_id": 70, "pipeline_b64": support::b64("version: 1\nsteps:\n  - run: echo started; sleep 60\n")});
    let running = {
        let url = agent.url.clone();
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{url}/jobs/execute"))
                .header("X-API-Key", KEY)
                .body(slow.to_string())
                .send()
                .await
                .unwrap()
        })
    };
    // Wait until the job runs in the warm container, then restart the engine.
    wait_warm_job_started(&agent, &docker, 1).await;
    engine.stop();

    let response = tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("the job never ended")
        .unwrap();
    // The job failed because of the agent, not of the job: it is given back (503 with
    // Retry-After, as for an agent that cannot run jobs), so the API runs it elsewhere.
    assert_eq!(response.status(), 503);
    assert!(response.headers().get("retry-after").is_some());
    let body: Value = response.json().await.unwrap();
    let error = body["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains("the agent could not run this job") && error.contains("Docker"),
        "unclear error: {error}"
    );
    let down = wait_health(&agent, "degraded", Duration::from_secs(15)).await;
    assert_eq!(down["docker_available"], false);
    // The job's error is taken for the agent's own failure: no job until healthy for a while.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let h = agent.health().await;
        if h["reasons"]
            .to_string()
            .contains("could not run because of the agent")
        {
            break;
        }
        assert!(Instant::now() < deadline, "no infrastructure failure: {h}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // While the engine is down the agent takes no job: 503 with Retry-After (the API runs it).
    let refused = json!({"job_id": 72, "pipeline_b64": support::b64("version: 1\nsteps:\n  - run: echo no\n")});
    let response = agent.execute(Some(KEY), refused.to_string()).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().get("retry-after").is_some());

    let docker = engine.start().await;
    wait_health(&agent, "healthy", Duration::from_secs(30)).await;
    // The restart killed the pool's ready container: it is removed and replaced, and the next
    // job runs warm, in the fresh one.
    let fresh = wait_pool(&agent, &docker).await;
    let hello = json!({"job_id": 71, "pipeline_b64": support::b64("version: 1\nsteps:\n  - run: echo back; hostname\n")});
    let result: Value = agent
        .execute(Some(KEY), hello.to_string())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(result["status"], "success", "{result}");
    assert_eq!(result["stdout"], format!("back\n{}\n", &fresh[..12]));
    assert_eq!(
        agent.warm_jobs().await,
        2,
        "the job after the restart ran cold"
    );

    // The container stranded by the restart is removed once the engine answers again, and the
    // dead ready one is gone: only the pool's ready container is left while the agent runs.
    assert_only_the_pool_left(&agent, &docker).await;
    assert!(
        agent
            .log_text()
            .contains("removed the job container after all"),
        "{}",
        agent.log_text()
    );
    assert_nothing_left_after_stop(agent, &docker).await;
}

/// Waits (up to 30 s) until the pool has its one ready container running on the private engine
/// and nothing else of the agent is there (a dead warm container included); returns its id.
async fn wait_pool(agent: &Agent, docker: &Docker) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (others, warm) = containers_by_kind_in(docker, &agent.agent_id)
            .await
            .unwrap_or_default();
        if agent.health().await["warm_pool"]["ready"] == 1 && warm.len() == 1 && others.is_empty() {
            return warm[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "the pool never had one live ready container alone: warm {warm:?}, others {others:?}; log:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the `warm`-th job that ran warm has its first command running: it took the ready
/// container (the counter), and the pool, which refills only once no job is on its way to its
/// first command, made the next one.
async fn wait_warm_job_started(agent: &Agent, docker: &Docker, warm: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, running_warm) = containers_by_kind_in(docker, &agent.agent_id)
            .await
            .unwrap_or_default();
        if agent.warm_jobs().await == warm && running_warm.len() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the job never started in a warm container; log:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// Waits (up to 30 s) until the agent has nothing on the private engine and in its work dir but
/// the pool's: one running ready container and its workspace.
async fn assert_only_the_pool_left(agent: &Agent, docker: &Docker) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (others, warm) = containers_by_kind_in(docker, &agent.agent_id)
            .await
            .unwrap_or_default();
        let (warm_dirs, dirs): (Vec<_>, Vec<_>) = agent
            .workspaces()
            .into_iter()
            .partition(|p| p.to_string_lossy().contains("+warm-"));
        if others.is_empty() && warm.len() <= 1 && dirs.is_empty() && warm_dirs.len() <= 1 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: containers {others:?} (warm {warm:?}), workspaces {dirs:?} (warm {warm_dirs:?}); log:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stops the agent (SIGTERM, which drains its pool) and asserts that nothing of it is left on
/// the private engine or in its work dir.
async fn assert_nothing_left_after_stop(mut agent: Agent, docker: &Docker) {
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(60)).await, 0);
    assert_eq!(
        containers(docker, &agent.agent_id).await,
        Vec::<String>::new(),
        "containers left after the agent stopped; log:\n{}",
        agent.log_text()
    );
    assert_eq!(agent.workspaces(), Vec::<std::path::PathBuf>::new());
}

/// The agent's containers on the private engine; none while it is down.
async fn containers(docker: &Docker, agent_id: &str) -> Vec<String> {
    support::containers_in(docker, agent_id)
        .await
        .unwrap_or_default()
}

/// Pull mode: a job that fails because the engine went away is given back (its completion says
/// the agent could not run it, so the API runs it again), nothing is leased while the engine is
/// down, and the next job runs once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_job_the_engine_failed_is_given_back_and_leasing_waits_for_it() {
    let mut engine = PrivateEngine::new();
    let docker = engine.start().await;
    support::import_test_image(&docker).await;
    let api = fake_api::FakeApi::start(support::process::pull::KEY, 30).await;
    let agent = Agent::pull(
        "engine-restart-pull",
        &api.url,
        &[],
        &[
            ("DOCKER_HOST", &engine.address()),
            ("GRYT_NETWORK", "none"),
            POOL_ON,
        ],
    )
    .await;
    wait_pool(&agent, &docker).await;
    api.push_job(support::shell_job(80, "echo started; sleep 60"));
    wait_warm_job_started(&agent, &docker, 1).await;
    engine.stop();
    api.wait_for("the completion", Duration::from_secs(60), |a| {
        a.job(80).completion.is_some()
    })
    .await;
    let done = api.job(80).completion.unwrap();
    assert_eq!(done["status"], "error", "{done}");
    let error = done["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("the agent could not run this job") && error.contains("Docker"),
        "{error}"
    );
    // Nothing is leased while the engine is down (the job stays queued at the API).
    api.push_job(support::shell_job(81, "echo back"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(api.job(81).leases, 0, "leased while the engine was down");
    let docker = engine.start().await;
    api.wait_for("job 81", Duration::from_secs(60), |a| {
        a.job(81).completion.is_some()
    })
    .await;
    assert_eq!(api.job(81).completion.unwrap()["status"], "success");
    assert_eq!(api.job(81).log, "back\n");
    assert_only_the_pool_left(&agent, &docker).await;
    assert_nothing_left_after_stop(agent, &docker).await;
}
