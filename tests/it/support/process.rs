//! The real `gryt-agent run` binary as a child process, for the suites that test it end to end
//! in push mode or in pull mode.
//!
//! [`command`] is the environment every such process starts from: nothing inherited but `PATH`
//! (and `DOCKER_HOST` when set), the test image never pulled, the agent's id, state and work
//! directories, and its endpoint on a free loopback port. [`Agent::push`] and [`Agent::pull`]
//! add what each mode needs; either way the agent's log goes to a file in its state directory,
//! and the process is killed when the [`Agent`] is dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{networks_of, test_image, unique_agent_id};

/// This agent's containers: job containers (anything but a running warm one), and the running
/// warm containers (`io.gryt.warm=true`) of its pool: ready ones, or taken by a running job
/// (none runs when a test checks for leftovers).
pub async fn containers_by_kind(agent_id: &str) -> (Vec<String>, Vec<String>) {
    containers_by_kind_in(&super::docker().await, agent_id)
        .await
        .unwrap()
}

/// [`containers_by_kind`] on the engine `docker` speaks to (a test's private one).
pub async fn containers_by_kind_in(
    docker: &bollard::Docker,
    agent_id: &str,
) -> Result<(Vec<String>, Vec<String>), bollard::errors::Error> {
    use bollard::query_parameters::ListContainersOptionsBuilder;
    let filters =
        std::collections::HashMap::from([("label", vec![format!("io.gryt.agent.id={agent_id}")])]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let listed = docker.list_containers(Some(options)).await?;
    let (warm, jobs): (Vec<_>, Vec<_>) = listed.into_iter().partition(|c| {
        is_warm(c.labels.as_ref())
            && c.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING)
    });
    let ids = |list: Vec<bollard::models::ContainerSummary>| {
        list.into_iter().filter_map(|c| c.id).collect()
    };
    Ok((ids(jobs), ids(warm)))
}

/// This agent's networks: job networks, and its warm containers' (`io.gryt.warm=true`).
pub async fn networks_by_kind(agent_id: &str) -> (Vec<String>, Vec<String>) {
    let mut warm = Vec::new();
    let mut jobs = Vec::new();
    let docker = super::docker().await;
    for id in networks_of(agent_id).await {
        match docker.inspect_network(&id, None).await {
            Ok(n) if is_warm(n.labels.as_ref()) => warm.push(id),
            Ok(_) => jobs.push(id),
            // Removed meanwhile.
            Err(_) => {}
        }
    }
    (jobs, warm)
}

fn is_warm(labels: Option<&std::collections::HashMap<String, String>>) -> bool {
    labels
        .and_then(|l| l.get("io.gryt.warm"))
        .is_some_and(|v| v == "true")
}

/// Push mode: the keys the endpoint accepts, and its command.
pub mod push {
    use std::path::Path;
    use std::process::Command;

    pub const KEY: &str = "push-test-key-0123456789abcdef0123456789";
    pub const PREVIOUS_KEY: &str = "previous-key-0123456789abcdef0123456789";

    /// `gryt-agent run` in push mode with [`KEY`] and [`PREVIOUS_KEY`]; stderr is piped, for a
    /// test that runs it to completion and reads what it printed.
    pub fn command(image: &str, agent_id: &str, work: &Path, state: &Path, port: u16) -> Command {
        let mut cmd = super::command(image, agent_id, work, state, port);
        cmd.env("GRYT_PUSH", "true")
            .env("AGENT_API_KEY", KEY)
            .env("AGENT_API_KEY_PREVIOUS", PREVIOUS_KEY)
            .env("GRYT_STOP_GRACE", "2");
        cmd
    }
}

/// Pull mode: the key the agent presents to the (fake) API.
pub mod pull {
    pub const KEY: &str = "test-agent-key-0123456789abcdef";
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The agent binary cargo built for these tests.
pub fn agent_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_gryt-agent"))
}

/// `gryt-agent run` with the environment common to both modes. stdin and stdout are null,
/// stderr is piped (an [`Agent`] sends it to its log file instead).
pub fn command(image: &str, agent_id: &str, work: &Path, state: &Path, port: u16) -> Command {
    command_of(agent_binary(), image, agent_id, work, state, port)
}

/// [`command`] running `binary` (a copy of [`agent_binary`] elsewhere stands for a new version
/// installed over a running one).
pub fn command_of(
    binary: &Path,
    image: &str,
    agent_id: &str,
    work: &Path,
    state: &Path,
    port: u16,
) -> Command {
    let mut cmd = Command::new(binary);
    cmd.arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", state)
        .env("GRYT_DOCKER_IMAGE", image)
        .env("GRYT_PULL_POLICY", "never")
        .env("GRYT_AGENT_ID", agent_id)
        .env("GRYT_STATE_DIR", state)
        .env("GRYT_WORK_DIR", work)
        // Off unless a test turns it on: the exact "no container of this agent" checks of the
        // suites stay meaningful. The `warm` suite and the reliability suites turn it on.
        .env("GRYT_WARM_POOL", "0")
        .env("AGENT_HOST", "127.0.0.1")
        .env("AGENT_PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Ok(h) = std::env::var("DOCKER_HOST") {
        cmd.env("DOCKER_HOST", h);
    }
    cmd
}

/// A running `gryt-agent run` process.
pub struct Agent {
    pub child: Child,
    pub agent_id: String,
    /// `http://127.0.0.1:<port>`, the agent's endpoint.
    pub url: String,
    pub state: PathBuf,
    pub work: PathBuf,
    /// The agent's stderr: `agent-<port>.log` in its state dir, so that an agent restarted on
    /// the same state dir writes a new one.
    pub log: PathBuf,
    /// The most warm containers the agent may keep (`GRYT_WARM_POOL` as given, 0 by default):
    /// while it runs, [`Agent::assert_clean`] allows that many ready ones and no more.
    pub warm_pool: usize,
    /// Temporary directories the agent was given to own: removed after the process is killed.
    _owned: Vec<TempDir>,
}

impl Agent {
    /// Starts `gryt-agent run` in push mode (plus `env`) with fresh directories and waits until
    /// it answers.
    pub async fn push(test: &str, env: &[(&str, &str)]) -> Agent {
        Self::push_in(&unique_agent_id(test), tempfile::tempdir().unwrap(), env).await
    }

    /// Like [`Agent::push`] as `agent_id` with a given work dir (to plant leftovers before the
    /// start).
    pub async fn push_in(agent_id: &str, work: TempDir, env: &[(&str, &str)]) -> Agent {
        let state = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cmd = push::command(
            &test_image().await,
            agent_id,
            work.path(),
            state.path(),
            port,
        );
        cmd.env("RUST_LOG", "debug");
        let mut agent = Self::spawn(cmd, agent_id, work.path(), state.path(), port, env);
        agent._owned = vec![work, state];
        agent.wait_ready().await;
        agent
    }

    /// Like [`Agent::push_in`] with a state and a work dir the caller keeps (to start the
    /// agent again on them).
    pub async fn push_at(agent_id: &str, state: &Path, work: &Path, env: &[(&str, &str)]) -> Agent {
        let port = free_port();
        let mut cmd = push::command(&test_image().await, agent_id, work, state, port);
        cmd.env("RUST_LOG", "debug");
        let agent = Self::spawn(cmd, agent_id, work, state, port, env);
        agent.wait_ready().await;
        agent
    }

    /// Starts `gryt-agent run <args>` in pull mode against `api_url` with fresh directories
    /// (`env` adds to or overrides the defaults).
    pub async fn pull(test: &str, api_url: &str, args: &[&str], env: &[(&str, &str)]) -> Agent {
        let (state, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut agent = Self::pull_in(
            &unique_agent_id(test),
            state.path(),
            work.path(),
            api_url,
            args,
            env,
        )
        .await;
        agent._owned = vec![state, work];
        agent
    }

    /// Like [`Agent::pull`] as `agent_id` with `state` and `work` as its directories, which the
    /// caller keeps (to restart an agent on them, or to read them after it stopped).
    pub async fn pull_in(
        agent_id: &str,
        state: &Path,
        work: &Path,
        api_url: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        Self::pull_in_with(agent_binary(), agent_id, state, work, api_url, args, env).await
    }

    /// Like [`Agent::pull_in`] running `binary` instead of the one cargo built (an upgrade).
    pub async fn pull_in_with(
        binary: &Path,
        agent_id: &str,
        state: &Path,
        work: &Path,
        api_url: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let port = free_port();
        let mut cmd = command_of(binary, &test_image().await, agent_id, work, state, port);
        cmd.args(args)
            .env("RUST_LOG", "gryt_agent=debug,info")
            // Plain log lines: the suites read fields out of them.
            .env("NO_COLOR", "1")
            .env("GRYT_API_URL", api_url)
            .env("AGENT_API_KEY", pull::KEY)
            .env("GRYT_STOP_GRACE", "1")
            // Jobs here need no network (and the CI engine may have no bridge).
            .env("GRYT_NETWORK", "none")
            .env("GRYT_LEASE_WAIT", "2");
        Self::spawn(cmd, agent_id, work, state, port, env)
    }

    fn spawn(
        mut cmd: Command,
        agent_id: &str,
        work: &Path,
        state: &Path,
        port: u16,
        env: &[(&str, &str)],
    ) -> Agent {
        let log = state.join(format!("agent-{port}.log"));
        cmd.stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("cannot start gryt-agent");
        let warm_pool = env
            .iter()
            .rev()
            .find(|(k, _)| *k == "GRYT_WARM_POOL")
            .map_or(0, |(_, v)| v.parse().expect("GRYT_WARM_POOL"));
        Agent {
            warm_pool,
            child,
            agent_id: agent_id.to_owned(),
            url: format!("http://127.0.0.1:{port}"),
            state: state.to_owned(),
            work: work.to_owned(),
            log,
            _owned: Vec::new(),
        }
    }

    /// Waits until the endpoint answers (any answer).
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if reqwest::get(format!("{}/", self.url)).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("agent did not come up; log:\n{}", self.log_text());
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's resident set size in KiB (`VmRSS` in `/proc/<pid>/status`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("agent process gone");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("no VmRSS")
    }

    /// SIGKILL (what `Child::kill` sends), then reaps the process.
    pub fn sigkill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends `sig` (a name for `kill -<sig>`: `TERM`, `INT`, `KILL`).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the process to exit; returns its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let until = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                panic!(
                    "agent did not exit in {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything the agent logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        reqwest::get(format!("{}{path}", self.url)).await.unwrap()
    }

    /// `GET /health` as JSON, once the endpoint answers (up to 5 s).
    pub async fn health(&self) -> serde_json::Value {
        let url = format!("{}/health", self.url);
        for _ in 0..50 {
            if let Ok(r) = reqwest::get(&url).await {
                return r.json().await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no /health; log:\n{}", self.log_text());
    }

    /// The job ids of the log lines holding `message`, sorted (its `job_id` field, in the
    /// human format `job_id=7` or the JSON one `"job_id":7`).
    pub fn logged_jobs(&self, message: &str) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .log_text()
            .lines()
            .filter(|l| l.contains(message))
            .filter_map(|l| {
                let at = l
                    .find("job_id=")
                    .map(|i| i + 7)
                    .or_else(|| l.find("\"job_id\":").map(|i| i + 9))?;
                let digits: String = l[at..]
                    .trim_start_matches('"')
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '-')
                    .collect();
                digits.parse().ok()
            })
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The value of the unlabelled metric `name` in `/metrics`, if there is one.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = self.get("/metrics").await.text().await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    /// `gryt_agent_warm_jobs_total` from `/metrics`: the jobs that ran in a warm container.
    pub async fn warm_jobs(&self) -> u64 {
        let text = self.get("/metrics").await.text().await.unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("gryt_agent_warm_jobs_total "))
            .unwrap_or_else(|| panic!("no warm jobs counter in {text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    /// `POST /jobs/execute` (push mode) with `key` as `X-API-Key`, if any.
    pub async fn execute(
        &self,
        key: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        let mut request = reqwest::Client::new()
            .post(format!("{}/jobs/execute", self.url))
            .body(body);
        request = request.header("content-type", "application/json");
        if let Some(key) = key {
            request = request.header("X-API-Key", key);
        }
        request.send().await.unwrap()
    }

    /// Every file in the spool (results, logs, lease records and whatever else is there) but
    /// the room the agent keeps free for results (`.reserve`).
    pub fn spool_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.state.join("spool"))
            .map(|d| {
                d.map(|e| e.unwrap().path())
                    .filter(|p| !p.ends_with(".reserve"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The results waiting in the spool (`*.json`).
    pub fn spooled_results(&self) -> Vec<PathBuf> {
        self.spool_files()
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect()
    }

    pub fn workspaces(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.work)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }

    /// No container or network with this agent's label and no workspace left. A job's cleanup
    /// follows its result (and a dropped container is removed in the background): up to 5 s
    /// of grace for all three. With a warm pool, while the agent runs, its ready warm
    /// containers (running, `io.gryt.warm=true`) with their networks and workspaces are no
    /// leftovers, up to `warm_pool` of each; once it has exited, they are.
    pub async fn assert_clean(&self) {
        for _ in 0..50 {
            if self.leftovers().await == Leftovers::default() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.assert_clean_now().await;
    }

    /// No container or network with this agent's label and no workspace left, now (see
    /// [`Agent::assert_clean`] for the warm pool's).
    /// Stops the agent with SIGTERM, asserts that it exited 0 and, with no grace (the agent
    /// itself waits for its jobs' cleanups and drains its pool before it exits), that nothing
    /// of it is left.
    pub async fn stop_leaving_nothing(&mut self) {
        self.signal("TERM");
        let code = self.wait_exit(Duration::from_secs(60)).await;
        assert_eq!(code, 0, "{}", self.log_text());
        self.assert_clean_now().await;
    }

    pub async fn assert_clean_now(&self) {
        let left = self.leftovers().await;
        assert_eq!(
            left.containers,
            Vec::<String>::new(),
            "containers left behind"
        );
        assert_eq!(left.networks, Vec::<String>::new(), "networks left behind");
        assert_eq!(
            left.workspaces,
            Vec::<PathBuf>::new(),
            "workspaces left behind"
        );
    }

    /// This agent's containers, networks and workspaces, but for what its warm pool may keep
    /// while it runs (see [`Agent::assert_clean`]).
    pub async fn leftovers(&self) -> Leftovers {
        let running = Path::new(&format!("/proc/{}", self.child.id())).exists();
        let allowed = if running { self.warm_pool } else { 0 };
        let keep = |(mut jobs, warm): (Vec<String>, Vec<String>)| {
            if warm.len() > allowed {
                jobs.extend(warm);
            }
            jobs
        };
        let (warm, mut workspaces): (Vec<PathBuf>, Vec<PathBuf>) = self
            .workspaces()
            .into_iter()
            .partition(|p| p.to_string_lossy().contains("+warm-"));
        if warm.len() > allowed {
            workspaces.extend(warm);
        }
        Leftovers {
            containers: keep(containers_by_kind(&self.agent_id).await),
            networks: keep(networks_by_kind(&self.agent_id).await),
            workspaces,
        }
    }
}

/// What an agent's jobs left: containers, networks and workspaces.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Leftovers {
    pub containers: Vec<String>,
    pub networks: Vec<String>,
    pub workspaces: Vec<PathBuf>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        // An agent with a warm pool is stopped as an operator would (SIGTERM: it drains its
        // pool); a SIGKILL would leave the pool to a next start this test never makes.
        if self.warm_pool > 0 && matches!(self.child.try_wait(), Ok(None)) {
            self.signal("TERM");
            let until = Instant::now() + Duration::from_secs(30);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        remove_what_is_labelled(&self.agent_id);
    }
}

/// Removes the containers and networks labelled with `agent_id` from the machine's engine: what
/// a test agent killed in the middle of a job's cleanup (which now follows the result) left.
/// The next start's sweep would remove them; a test that never starts one leaves them, and job
/// networks hold /24s of the pool every test shares.
fn remove_what_is_labelled(agent_id: &str) {
    let label = format!("label=io.gryt.agent.id={agent_id}");
    let list = |args: &[&str]| -> Vec<String> {
        Command::new("docker")
            .args(args)
            .args(["--filter", &label])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    };
    let containers = list(&["ps", "-aq"]);
    if !containers.is_empty() {
        let _ = Command::new("docker")
            .args(["rm", "-f"])
            .args(&containers)
            .output();
    }
    let networks = list(&["network", "ls", "-q"]);
    if !networks.is_empty() {
        let _ = Command::new("docker")
            .args(["network", "rm"])
            .args(&networks)
            .output();
    }
}
