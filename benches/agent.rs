//! Whole-system benchmarks of gryt-agent (issue 7), as a program: `cargo bench --bench agent`.
//!
//! Every figure is measured next to a baseline in the same run and reported as a ratio, because
//! the machines this runs on are shared and noisy: absolute times are context only. See
//! `docs/benchmarks.md` for what each figure means and the last results.
//!
//! ```text
//! cargo build --release && cargo bench --bench agent             # full size (minutes)
//! cargo bench --profile dev --bench agent -- --quick             # CI: small sizes, debug build
//! cargo bench --bench agent -- --only pickup --j 300             # one figure, own size
//! ```
//!
//! Needs a Docker engine, `/bin/busybox` (Debian's busybox-static: the job image is built from
//! it, like the tests do, since no registry may be reachable) and the `docker` CLI for the
//! `docker run --rm` baseline. The fake API here is a small one of its own, not the conformance
//! fake of `tests/it/fake_api.rs`: that one polls its queue every 50 ms (which would be
//! measured as pickup latency) and keeps every request body (gigabytes for the log figure).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder,
};
use futures_util::StreamExt;
use gryt_agent::config::{PullPolicy, Settings};
use gryt_agent::executor::container::job_host_config;
use gryt_agent::executor::{Discard, Executor, ExecutorSettings, JobControl};
use serde_json::{Value, json};

/// The job image, built as the tests build theirs (the same file).
#[path = "../tests/it/support/image.rs"]
mod image;

const KEY: &str = "bench-agent-key-0123456789abcdef0123";
/// Label on every container the bench itself creates (the agents label theirs by agent id).
const BENCH_LABEL: &str = "io.gryt.bench";
const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Options

#[derive(Debug, Clone)]
struct Sizes {
    /// Jobs per variant for the per-job overhead.
    m: usize,
    /// Jobs for the throughput figure.
    k: usize,
    /// Jobs for the pickup latency.
    j: usize,
    /// Seconds of idle footprint.
    s: u64,
    /// Bytes printed by the log job.
    g: u64,
}

struct Opts {
    quick: bool,
    sizes: Sizes,
    only: Option<String>,
    agent: Option<PathBuf>,
    network: String,
}

const FIGURES: [&str; 4] = ["overhead", "throughput", "pickup", "footprint"];

fn parse_args() -> anyhow::Result<Opts> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` appends `--bench` to a harness-less bench's arguments.
    args.retain(|a| a != "--bench");
    let quick = args.iter().any(|a| a == "--quick");
    let mut sizes = if quick {
        Sizes {
            m: 5,
            k: 12,
            j: 10,
            s: 3,
            g: 32 * MIB,
        }
    } else {
        Sizes {
            m: 50,
            k: 200,
            j: 100,
            s: 60,
            g: 1024 * MIB,
        }
    };
    let mut opts = Opts {
        quick,
        sizes: sizes.clone(),
        only: None,
        agent: None,
        network: std::env::var("GRYT_NETWORK").unwrap_or_else(|_| "bridge".into()),
    };
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        let number = |v: String| -> anyhow::Result<u64> {
            v.parse().with_context(|| format!("not a number: {v}"))
        };
        match arg.as_str() {
            "--quick" => {}
            "--only" => {
                let v = value("--only")?;
                if !FIGURES.contains(&v.as_str()) {
                    bail!("--only takes one of {FIGURES:?}");
                }
                opts.only = Some(v);
            }
            "--agent" => opts.agent = Some(value("--agent")?.into()),
            "--network" => opts.network = value("--network")?,
            "--m" => sizes.m = number(value("--m")?)? as usize,
            "--k" => sizes.k = number(value("--k")?)? as usize,
            "--j" => sizes.j = number(value("--j")?)? as usize,
            "--s" => sizes.s = number(value("--s")?)?,
            "--g-mib" => sizes.g = number(value("--g-mib")?)? * MIB,
            "-h" | "--help" => {
                println!(
                    "usage: cargo bench --bench agent -- [--quick] [--only {}] [--agent PATH] \
                     [--network bridge|none] [--m N] [--k N] [--j N] [--s SECS] [--g-mib MIB]",
                    FIGURES.join("|")
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}` (try --help)"),
        }
    }
    sizes.m = sizes.m.max(1);
    sizes.k = sizes.k.max(4);
    sizes.j = sizes.j.max(1);
    sizes.g = (sizes.g / MIB).max(1) * MIB;
    opts.sizes = sizes;
    Ok(opts)
}

impl Opts {
    fn wants(&self, figure: &str) -> bool {
        self.only.as_deref().is_none_or(|o| o == figure)
    }
}

// ---------------------------------------------------------------------------------------------
// The table

struct Row {
    figure: String,
    value: String,
    baseline: String,
    ratio: String,
    target: String,
    met: Option<bool>,
}

fn row(figure: &str, value: String, baseline: String, ratio: String, target: &str) -> Row {
    Row {
        figure: figure.to_owned(),
        value,
        baseline,
        ratio,
        target: target.to_owned(),
        met: None,
    }
}

impl Row {
    fn met(mut self, met: bool) -> Row {
        self.met = Some(met);
        self
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn ratio(value: f64, baseline: f64) -> f64 {
    if baseline > 0.0 {
        value / baseline
    } else {
        0.0
    }
}

fn median(v: &[Duration]) -> Duration {
    percentile(v, 50.0)
}

/// Nearest-rank percentile.
fn percentile(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let mut s = v.to_vec();
    s.sort();
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

// ---------------------------------------------------------------------------------------------
// Machine

async fn machine_info(docker: &Docker, agent: &AgentBinary, opts: &Opts) -> Vec<String> {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let ram = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_owned()))
        })
        .unwrap_or_else(|| "?".into());
    let docker_version = match docker.version().await {
        Ok(v) => format!(
            "{} (API {})",
            v.version.unwrap_or_default(),
            v.api_version.unwrap_or_default()
        ),
        Err(e) => format!("? ({e})"),
    };
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let s = &opts.sizes;
    vec![
        format!("- date: {date}"),
        format!("- machine: {nproc} CPUs ({cpu}), {ram} RAM, kernel {kernel}"),
        format!("- Docker: {docker_version}; job network `{}`", opts.network),
        format!("- agent binary: {}", agent.describe()),
        format!(
            "- bench program and library executor: {} build",
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "optimized"
            }
        ),
        format!(
            "- sizes{}: M={} K={} J={} S={}s G={} MiB",
            if opts.quick { " (--quick)" } else { "" },
            s.m,
            s.k,
            s.j,
            s.s,
            s.g / MIB
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// The baselines: the same hardened container, run directly

/// What every job container gets, whoever starts it: the agent's defaults.
#[derive(Clone)]
struct Hardening {
    image: String,
    user: String,
    network: String,
    pids_limit: i64,
    memory_bytes: i64,
    nano_cpus: i64,
}

impl Hardening {
    fn new(image: &str, network: &str) -> anyhow::Result<Self> {
        let d = Settings::load_from(None, &[], &[])?.docker;
        Ok(Hardening {
            image: image.to_owned(),
            user: d.user,
            network: network.to_owned(),
            pids_limit: d.pids_limit,
            memory_bytes: gryt_agent::executor::limits::parse_memory(&d.memory_limit)?,
            nano_cpus: gryt_agent::executor::limits::parse_cpus(&d.cpu_limit)?,
        })
    }

    fn body(&self, script: &str, workspace: &Path) -> ContainerCreateBody {
        ContainerCreateBody {
            image: Some(self.image.clone()),
            cmd: Some(vec!["/bin/sh".into(), "-c".into(), script.into()]),
            user: Some(self.user.clone()),
            working_dir: Some("/workspace".into()),
            labels: Some(HashMap::from([(BENCH_LABEL.into(), "true".into())])),
            tty: Some(false),
            host_config: Some(job_host_config(
                &workspace.display().to_string(),
                &self.network,
                self.pids_limit,
                self.memory_bytes,
                self.nano_cpus,
            )),
            ..Default::default()
        }
    }
}

static SEQ: AtomicI64 = AtomicI64::new(1);

fn next_id() -> i64 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

fn container_name() -> String {
    format!("gryt-bench-{}-{}", std::process::id(), next_id())
}

/// A fresh workspace for the job's user, as the agent makes one.
fn workspace(work: &Path) -> anyhow::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix("ws-").tempdir_in(work)?;
    let _ = std::os::unix::fs::chown(dir.path(), Some(1000), Some(1000));
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
    Ok(dir)
}

/// The floor: create, start, wait, remove with bollard. Returns the bytes it read when `attach`.
async fn direct_run(
    docker: &Docker,
    hard: &Hardening,
    work: &Path,
    script: &str,
    attach: bool,
) -> anyhow::Result<u64> {
    let ws = workspace(work)?;
    let options = CreateContainerOptionsBuilder::default()
        .name(&container_name())
        .build();
    let mut body = hard.body(script, ws.path());
    if !attach {
        // With the attach, the output is read through it only, as the agent's job containers do
        // (their log driver is `none`); without it, Docker's default log driver, as `docker run`.
        if let Some(h) = body.host_config.as_mut() {
            h.log_config = None;
        }
    }
    let id = docker.create_container(Some(options), body).await?.id;
    let result = async {
        let mut bytes = 0u64;
        if attach {
            let options = AttachContainerOptionsBuilder::default()
                .stream(true)
                .stdout(true)
                .stderr(true)
                .build();
            let mut attached = docker.attach_container(&id, Some(options)).await?;
            docker.start_container(&id, None).await?;
            while let Some(item) = attached.output.next().await {
                match item? {
                    LogOutput::StdOut { message } | LogOutput::StdErr { message } => {
                        bytes += message.len() as u64
                    }
                    _ => {}
                }
            }
        } else {
            docker.start_container(&id, None).await?;
        }
        let mut wait = docker.wait_container(&id, None);
        while let Some(w) = wait.next().await {
            w?;
        }
        anyhow::Ok(bytes)
    }
    .await;
    let options = RemoveContainerOptionsBuilder::default()
        .force(result.is_err())
        .v(true)
        .build();
    docker.remove_container(&id, Some(options)).await?;
    result
}

/// `docker run --rm` with the same container settings.
fn docker_run(hard: &Hardening, work: &Path) -> anyhow::Result<()> {
    let ws = workspace(work)?;
    let status = Command::new("docker")
        .args(["run", "--rm", "--name", &container_name()])
        .args(["--label", &format!("{BENCH_LABEL}=true")])
        .args(["--user", &hard.user, "--cap-drop", "ALL"])
        .args(["--security-opt", "no-new-privileges"])
        .args(["--pids-limit", &hard.pids_limit.to_string()])
        .args(["--memory", &hard.memory_bytes.to_string()])
        .args(["--memory-swap", &hard.memory_bytes.to_string()])
        .args(["--cpus", &format!("{}", hard.nano_cpus as f64 / 1e9)])
        .args(["--network", &hard.network])
        .args(["-v", &format!("{}:/workspace", ws.path().display())])
        .args(["-w", "/workspace", &hard.image, "/bin/sh", "-c", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .context("cannot run the docker CLI")?;
    if !status.success() {
        bail!("docker run failed: {status}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The agent binary, run as `exec` and as `run` (pull mode)

struct AgentBinary {
    path: PathBuf,
    why: &'static str,
}

impl AgentBinary {
    /// `--agent`, else `target/release/gryt-agent` when present, else the debug one.
    fn find(explicit: Option<PathBuf>) -> anyhow::Result<Self> {
        if let Some(path) = explicit {
            return Ok(AgentBinary {
                path,
                why: "given with --agent",
            });
        }
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
        for (profile, why) in [("release", "release build"), ("debug", "DEBUG build")] {
            let path = target.join(profile).join("gryt-agent");
            if path.is_file() {
                return Ok(AgentBinary { path, why });
            }
        }
        let path = PathBuf::from(env!("CARGO_BIN_EXE_gryt-agent"));
        Ok(AgentBinary {
            path,
            why: "built for this bench",
        })
    }

    fn describe(&self) -> String {
        let age = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .map(|e| format!(", built {} min ago", e.as_secs() / 60))
            .unwrap_or_default();
        format!("`{}` ({}{age})", self.path.display(), self.why)
    }

    /// The environment every agent process gets: the bench image, never pull, own dirs.
    fn command(&self, hard: &Hardening, work: &Path, home: &Path) -> Command {
        let mut cmd = Command::new(&self.path);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", home)
            .env("GRYT_DOCKER_IMAGE", &hard.image)
            .env("GRYT_PULL_POLICY", "never")
            .env("GRYT_NETWORK", &hard.network)
            .env("GRYT_WORK_DIR", work)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Ok(host) = std::env::var("DOCKER_HOST") {
            cmd.env("DOCKER_HOST", host);
        }
        cmd
    }

    /// `gryt-agent exec pipeline.yml`, to its exit.
    fn exec(&self, hard: &Hardening, work: &Path, pipeline: &Path) -> anyhow::Result<()> {
        let status = self
            .command(hard, work, work)
            .arg("exec")
            .arg(pipeline)
            .stderr(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("gryt-agent exec failed: {status}");
        }
        Ok(())
    }
}

/// A `gryt-agent run` in pull mode against the fake; killed when dropped.
struct PullAgent {
    child: Child,
    agent_id: String,
    _state: tempfile::TempDir,
    log: PathBuf,
}

impl PullAgent {
    async fn start(
        bin: &AgentBinary,
        hard: &Hardening,
        work: &Path,
        fake: &FakeApi,
        concurrency: usize,
    ) -> anyhow::Result<Self> {
        let state = tempfile::tempdir()?;
        let agent_id = format!("bench-{}-{}", std::process::id(), next_id());
        let log = state.path().join("agent.log");
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let parked_before = fake.parked();
        let child = bin
            .command(hard, work, state.path())
            .arg("run")
            .env(
                "RUST_LOG",
                std::env::var("GRYT_BENCH_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("GRYT_API_URL", &fake.url)
            .env("AGENT_API_KEY", KEY)
            .env("GRYT_STATE_DIR", state.path())
            .env("GRYT_AGENT_ID", &agent_id)
            .env("GRYT_CONCURRENCY", concurrency.to_string())
            .env("AGENT_HOST", "127.0.0.1")
            .env("AGENT_PORT", port.to_string())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("cannot start gryt-agent run")?;
        let agent = PullAgent {
            child,
            agent_id,
            _state: state,
            log,
        };
        // Ready when its first long poll is parked on the fake.
        fake.wait(
            "the agent's first lease request",
            Duration::from_secs(30),
            |s| (s.parked > parked_before).then_some(()),
        )
        .await
        .with_context(|| agent.tail())?;
        Ok(agent)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let from = log.len().saturating_sub(3000);
        let start = (from..=log.len())
            .find(|&i| log.is_char_boundary(i))
            .unwrap_or(0);
        format!("agent log ({}):\n{}", self.log.display(), &log[start..])
    }
}

impl Drop for PullAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::env::var_os("GRYT_BENCH_KEEP_LOGS").is_some() {
            let kept = std::env::temp_dir().join(format!("{}.log", self.agent_id));
            let _ = std::fs::copy(&self.log, &kept);
            eprintln!("  agent log kept: {}", kept.display());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal fake of the pull API: long poll woken at once by an enqueue, timestamps of what the
// bench measures, log bytes counted (not kept). No lease checks: the agent is not under test here.

#[derive(Default)]
struct FakeState {
    queue: VecDeque<Value>,
    enqueued: HashMap<i64, Instant>,
    started: HashMap<i64, Instant>,
    completed: HashMap<i64, (Instant, String)>,
    committed: HashMap<i64, u64>,
    /// Lease requests held open right now.
    parked: usize,
}

struct FakeInner {
    state: Mutex<FakeState>,
    /// Wakes parked lease requests.
    queued: tokio::sync::Notify,
    /// Bumped on every change the bench may wait for.
    tick: tokio::sync::watch::Sender<u64>,
}

#[derive(Clone)]
struct FakeApi {
    inner: Arc<FakeInner>,
    url: String,
}

impl FakeInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.tick.send_modify(|n| *n += 1);
    }
}

impl FakeApi {
    async fn start() -> anyhow::Result<FakeApi> {
        let inner = Arc::new(FakeInner {
            state: Mutex::new(FakeState::default()),
            queued: tokio::sync::Notify::new(),
            tick: tokio::sync::watch::channel(0).0,
        });
        let app = Router::new()
            .route("/api/v1/agent/lease", post(fake_lease))
            .route("/api/v1/agent/jobs/{job_id}/{call}", post(fake_job_call))
            .layer(DefaultBodyLimit::max(16 * MIB as usize))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(FakeApi { inner, url })
    }

    /// Queues a job running `pipeline` (YAML); returns its id.
    fn enqueue(&self, pipeline: &str) -> i64 {
        let id = next_id();
        let job = json!({"job_id": id, "pipeline_b64": b64(pipeline), "timeout_seconds": 3600});
        {
            let mut s = self.inner.lock();
            s.queue.push_back(job);
            s.enqueued.insert(id, Instant::now());
        }
        self.inner.queued.notify_waiters();
        id
    }

    fn parked(&self) -> usize {
        self.inner.lock().parked
    }

    /// Waits until `f` says something (at most `timeout`).
    async fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&FakeState) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.inner.tick.subscribe();
        loop {
            if let Some(v) = f(&self.inner.lock()) {
                return Ok(v);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
    }

    /// Waits for job `id`'s completion; fails unless it succeeded.
    async fn completed(&self, id: i64, timeout: Duration) -> anyhow::Result<Instant> {
        let (at, status) = self
            .wait(&format!("job {id} to complete"), timeout, |s| {
                s.completed.get(&id).cloned()
            })
            .await?;
        if status != "success" {
            bail!("job {id} ended with status {status}");
        }
        Ok(at)
    }
}

fn b64(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

async fn fake_lease(State(f): State<Arc<FakeInner>>, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or_default();
    let wait = Duration::from_secs(body["wait_seconds"].as_u64().unwrap_or(0));
    let until = tokio::time::Instant::now() + wait;
    loop {
        let notified = f.queued.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(job) = f.lock().queue.pop_front() {
            let lease = format!("lease-{}", job["job_id"]);
            return axum::Json(json!({"lease_id": lease, "lease_ttl_seconds": 60, "job": job}))
                .into_response();
        }
        if tokio::time::Instant::now() >= until {
            return StatusCode::NO_CONTENT.into_response();
        }
        f.lock().parked += 1;
        f.changed();
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(until) => {}
        }
        f.lock().parked -= 1;
        f.changed();
    }
}

#[derive(serde::Deserialize)]
struct Chunk {
    offset: u64,
    data: String,
}

async fn fake_job_call(
    State(f): State<Arc<FakeInner>>,
    UrlPath((job_id, call)): UrlPath<(i64, String)>,
    body: Bytes,
) -> Response {
    let now = Instant::now();
    let answer = match call.as_str() {
        "start" => {
            f.lock().started.insert(job_id, now);
            StatusCode::OK.into_response()
        }
        "heartbeat" => {
            axum::Json(json!({"cancel": false, "lease_ttl_seconds": 60})).into_response()
        }
        "logs" => {
            let Ok(chunk) = serde_json::from_slice::<Chunk>(&body) else {
                return StatusCode::UNPROCESSABLE_ENTITY.into_response();
            };
            let mut s = f.lock();
            let committed = s.committed.entry(job_id).or_default();
            if chunk.offset <= *committed {
                *committed = (*committed).max(chunk.offset + chunk.data.len() as u64);
            }
            axum::Json(json!({"committed": *committed})).into_response()
        }
        "complete" => {
            let body: Value = serde_json::from_slice(&body).unwrap_or_default();
            let status = body["status"].as_str().unwrap_or("?").to_owned();
            f.lock().completed.entry(job_id).or_insert((now, status));
            StatusCode::OK.into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    };
    f.changed();
    answer
}

// ---------------------------------------------------------------------------------------------
// Process footprint from /proc

struct ProcStat {
    rss_kib: u64,
    hwm_kib: u64,
    cpu_ticks: u64,
}

fn proc_stat(pid: u32) -> anyhow::Result<ProcStat> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the `(comm)`, which may hold spaces: utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| -> u64 { fields.get(i).and_then(|v| v.parse().ok()).unwrap_or(0) };
    Ok(ProcStat {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        cpu_ticks: tick(11) + tick(12),
    })
}

fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

// ---------------------------------------------------------------------------------------------
// The figures

const TRUE_JOB: &str = "version: 1\nsteps:\n  - run: \"true\"\n";
const JOB_TIMEOUT: Duration = Duration::from_secs(120);

struct Bench {
    docker: Docker,
    hard: Hardening,
    agent: AgentBinary,
    work: tempfile::TempDir,
    sizes: Sizes,
    agent_ids: Vec<String>,
}

impl Bench {
    fn executor(&self) -> anyhow::Result<(Executor, String)> {
        let mut settings = Settings::load_from(None, &[], &[])?;
        settings.docker.image = self.hard.image.clone();
        settings.docker.pull_policy = PullPolicy::Never;
        settings.docker.network = self.hard.network.clone();
        settings.work_dir = Some(self.work.path().to_owned());
        let id = format!("bench-lib-{}-{}", std::process::id(), next_id());
        let executor = Executor::new(ExecutorSettings::from_settings(&settings, id.clone())?)?;
        Ok((executor, id))
    }

    async fn pull_agent(
        &mut self,
        fake: &FakeApi,
        concurrency: usize,
    ) -> anyhow::Result<PullAgent> {
        let agent =
            PullAgent::start(&self.agent, &self.hard, self.work.path(), fake, concurrency).await?;
        self.agent_ids.push(agent.agent_id.clone());
        Ok(agent)
    }

    /// Figure 1, per-job overhead: the variants run round-robin, one job each per round, so drift on a
    /// shared machine hits them all alike. Medians of M jobs each.
    async fn overhead(&mut self) -> anyhow::Result<Vec<Row>> {
        let m = self.sizes.m;
        let fake = FakeApi::start().await?;
        let pull = self.pull_agent(&fake, 1).await?;
        let (executor, lib_id) = self.executor()?;
        self.agent_ids.push(lib_id);
        let pipeline = self.work.path().join("true.yml");
        std::fs::write(&pipeline, TRUE_JOB)?;
        let lib_job: gryt_agent::wire::JobSpec =
            serde_json::from_value(json!({"job_id": 1, "pipeline_b64": b64(TRUE_JOB)}))?;
        let work = self.work.path().to_owned();
        let mut times: [Vec<Duration>; 5] = Default::default();
        // Round 0 warms every path up (first container, connections, page cache) and is not kept.
        for round in 0..=m {
            for (variant, slot) in times.iter_mut().enumerate() {
                let clock = Instant::now();
                let took = match variant {
                    0 => {
                        direct_run(&self.docker, &self.hard, &work, "true", false).await?;
                        clock.elapsed()
                    }
                    1 => {
                        let hard = self.hard.clone();
                        let work = work.clone();
                        tokio::task::spawn_blocking(move || docker_run(&hard, &work)).await??;
                        clock.elapsed()
                    }
                    2 => {
                        let result = executor.run(&lib_job, &Discard, &JobControl::new()).await;
                        if !result.success {
                            bail!("library executor job failed: {:?}", result.error);
                        }
                        clock.elapsed()
                    }
                    3 => {
                        let (agent, hard, work, pipeline) = (
                            AgentBinary {
                                path: self.agent.path.clone(),
                                why: "",
                            },
                            self.hard.clone(),
                            work.clone(),
                            pipeline.clone(),
                        );
                        tokio::task::spawn_blocking(move || agent.exec(&hard, &work, &pipeline))
                            .await??;
                        clock.elapsed()
                    }
                    _ => {
                        // Wait for the agent to be back in its long poll, as an idle agent is.
                        fake.wait("the agent's lease request", JOB_TIMEOUT, |s| {
                            (s.parked > 0).then_some(())
                        })
                        .await?;
                        let clock = Instant::now();
                        let id = fake.enqueue(TRUE_JOB);
                        let done = fake
                            .completed(id, JOB_TIMEOUT)
                            .await
                            .with_context(|| pull.tail())?;
                        done - clock
                    }
                };
                if round > 0 {
                    slot.push(took);
                }
            }
        }
        drop(pull);
        let [direct, docker_run, lib, exec, pull] = times.map(|t| median(&t));
        let floor = direct.as_secs_f64();
        let mut rows = vec![
            row(
                "1. per job: direct bollard (floor)",
                ms(direct),
                "—".into(),
                "1.00×".into(),
                "(baseline)",
            ),
            row(
                "1. per job: `docker run --rm`",
                ms(docker_run),
                ms(direct),
                format!("{:.2}×", ratio(docker_run.as_secs_f64(), floor)),
                "(baseline)",
            ),
        ];
        for (name, t) in [
            ("1. per job: library executor", lib),
            ("1. per job: `gryt-agent exec`", exec),
            ("1. per job: pull mode (`gryt-agent run`)", pull),
        ] {
            let r = ratio(t.as_secs_f64(), floor);
            rows.push(
                row(
                    name,
                    ms(t),
                    ms(direct),
                    format!("{r:.2}×"),
                    &format!("≤ 1.05× and < docker run ({})", ms(docker_run)),
                )
                .met(r <= 1.05 && t < docker_run),
            );
        }
        Ok(rows)
    }

    /// Figure 2, throughput at concurrency 4: pull mode vs 4 parallel direct runners, in ABBA order.
    async fn throughput(&mut self) -> anyhow::Result<Vec<Row>> {
        let k = self.sizes.k;
        let half = k / 2;
        let fake = FakeApi::start().await?;
        let pull = self.pull_agent(&fake, 4).await?;
        let (mut direct_time, mut pull_time) = (Duration::ZERO, Duration::ZERO);
        let (mut direct_jobs, mut pull_jobs) = (0usize, 0usize);
        // Warm-up: one of each.
        self.direct_parallel(1).await?;
        self.pull_batch(&fake, &pull, 1).await?;
        for (i, n) in [half / 2, half - half / 2, half - half / 2, half / 2]
            .into_iter()
            .enumerate()
        {
            if i == 0 || i == 3 {
                direct_time += self.direct_parallel(n).await?;
                direct_jobs += n;
            } else {
                pull_time += self.pull_batch(&fake, &pull, n).await?;
                pull_jobs += n;
            }
        }
        let direct_rate = direct_jobs as f64 / direct_time.as_secs_f64();
        let pull_rate = pull_jobs as f64 / pull_time.as_secs_f64();
        let r = ratio(pull_rate, direct_rate);
        Ok(vec![
            row(
                "2. throughput, concurrency 4: pull mode",
                format!("{pull_rate:.2} jobs/s"),
                format!("{direct_rate:.2} jobs/s (4 direct runners)"),
                format!("{r:.2}×"),
                "≥ 0.95×",
            )
            .met(r >= 0.95),
        ])
    }

    async fn direct_parallel(&self, n: usize) -> anyhow::Result<Duration> {
        let left = Arc::new(AtomicUsize::new(n));
        let clock = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let (docker, hard, work, left) = (
                self.docker.clone(),
                self.hard.clone(),
                self.work.path().to_owned(),
                left.clone(),
            );
            tasks.spawn(async move {
                while left
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| l.checked_sub(1))
                    .is_ok()
                {
                    direct_run(&docker, &hard, &work, "true", false).await?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        Ok(clock.elapsed())
    }

    async fn pull_batch(
        &self,
        fake: &FakeApi,
        pull: &PullAgent,
        n: usize,
    ) -> anyhow::Result<Duration> {
        fake.wait("the agent's lease request", JOB_TIMEOUT, |s| {
            (s.parked > 0).then_some(())
        })
        .await?;
        let clock = Instant::now();
        let ids: Vec<i64> = (0..n).map(|_| fake.enqueue(TRUE_JOB)).collect();
        let mut last = clock;
        for id in ids {
            let at = fake
                .completed(id, JOB_TIMEOUT * 4)
                .await
                .with_context(|| pull.tail())?;
            last = last.max(at);
        }
        Ok(last - clock)
    }

    /// Figure 3, pickup latency: an idle agent (parked in its long poll), a job enqueued, `start` seen.
    /// Baseline: the same protocol done by a bare HTTP client in this process.
    async fn pickup(&mut self) -> anyhow::Result<Vec<Row>> {
        let j = self.sizes.j;
        let fake = FakeApi::start().await?;
        let bare = tokio::spawn(bare_client(fake.url.clone()));
        let base = self.pickups(&fake, j, None).await?;
        bare.abort();
        let _ = bare.await;
        fake.wait("the bare client to leave", Duration::from_secs(5), |s| {
            (s.parked == 0).then_some(())
        })
        .await
        .ok();
        let pull = self.pull_agent(&fake, 1).await?;
        let agent = self.pickups(&fake, j, Some(&pull)).await?;
        drop(pull);
        let (p50, p99) = (percentile(&agent, 50.0), percentile(&agent, 99.0));
        let (b50, b99) = (percentile(&base, 50.0), percentile(&base, 99.0));
        Ok(vec![
            row(
                "3. pickup latency p50",
                ms(p50),
                format!("{} (bare HTTP client)", ms(b50)),
                format!("{:.2}×", ratio(p50.as_secs_f64(), b50.as_secs_f64())),
                "(context)",
            ),
            row(
                "3. pickup latency p99",
                ms(p99),
                format!("{} (bare HTTP client)", ms(b99)),
                format!("{:.2}×", ratio(p99.as_secs_f64(), b99.as_secs_f64())),
                "≤ 50 ms",
            )
            .met(p99 <= Duration::from_millis(50)),
        ])
    }

    async fn pickups(
        &self,
        fake: &FakeApi,
        n: usize,
        agent: Option<&PullAgent>,
    ) -> anyhow::Result<Vec<Duration>> {
        let mut latencies = Vec::with_capacity(n);
        for i in 0..=n {
            fake.wait("a parked lease request", JOB_TIMEOUT, |s| {
                (s.parked > 0).then_some(())
            })
            .await?;
            // Let it sit idle a little, at varying phases.
            tokio::time::sleep(Duration::from_millis(5 + (i as u64 * 7) % 20)).await;
            let id = fake.enqueue(TRUE_JOB);
            let started = fake
                .wait(&format!("job {id} to start"), JOB_TIMEOUT, |s| {
                    s.started.get(&id).copied()
                })
                .await
                .with_context(|| agent.map(|a| a.tail()).unwrap_or_default())?;
            let enqueued = fake.inner.lock().enqueued[&id];
            if agent.is_some() {
                fake.completed(id, JOB_TIMEOUT).await?;
            }
            if i > 0 {
                latencies.push(started - enqueued);
            }
        }
        Ok(latencies)
    }

    /// Figure 4, footprint: an idle agent over S seconds, then a job printing G bytes.
    async fn footprint(&mut self) -> anyhow::Result<Vec<Row>> {
        let fake = FakeApi::start().await?;
        let pull = self.pull_agent(&fake, 1).await?;
        let pid = pull.pid();
        // Let the start-up settle (first sweep, Docker negotiation) before measuring idleness.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let tck = clock_ticks();
        let before = proc_stat(pid)?;
        let clock = Instant::now();
        let mut idle_rss = before.rss_kib;
        while clock.elapsed() < Duration::from_secs(self.sizes.s) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            idle_rss = idle_rss.max(proc_stat(pid)?.rss_kib);
        }
        let after = proc_stat(pid)?;
        let idle_secs = clock.elapsed().as_secs_f64();
        let cpu_pct = (after.cpu_ticks - before.cpu_ticks) as f64 / tck as f64 / idle_secs * 100.0;

        // The log job: G bytes of printable text, through the agent vs read directly.
        let g = self.sizes.g;
        let script = print_script(g);
        let clock = Instant::now();
        let read = direct_run(&self.docker, &self.hard, self.work.path(), &script, true).await?;
        let base_time = clock.elapsed();
        if read != g {
            bail!("the direct log job printed {read} bytes, not {g}");
        }
        let base_rate = g as f64 / base_time.as_secs_f64() / 1e6;

        let pipeline = format!(
            "version: 1\nsteps:\n  - name: print\n    run: |\n{}",
            script
                .lines()
                .map(|l| format!("      {l}\n"))
                .collect::<String>()
        );
        let id = fake.enqueue(&pipeline);
        let mut job_rss = 0;
        let limit = Duration::from_secs(600);
        let done = loop {
            job_rss = job_rss.max(proc_stat(pid)?.rss_kib);
            let finished = fake
                .wait("the log job", Duration::from_millis(100), |s| {
                    s.completed.get(&id).cloned()
                })
                .await;
            if let Ok(done) = finished {
                break done;
            }
            let waited = fake.inner.lock().enqueued[&id].elapsed();
            if waited > limit {
                bail!("the log job did not complete in {limit:?}\n{}", pull.tail());
            }
        };
        if done.1 != "success" {
            bail!("the log job ended with status {}\n{}", done.1, pull.tail());
        }
        let (started, committed) = {
            let s = fake.inner.lock();
            (s.started[&id], s.committed.get(&id).copied().unwrap_or(0))
        };
        if committed != g {
            bail!("the fake API received {committed} log bytes, not {g}");
        }
        let hwm = proc_stat(pid)?.hwm_kib;
        drop(pull);
        let job_time = done.0 - started;
        let rate = committed as f64 / job_time.as_secs_f64() / 1e6;
        let r = ratio(rate, base_rate);
        Ok(vec![
            row(
                "4. idle RSS (max over S)",
                mib(idle_rss),
                "—".into(),
                "—".into(),
                "≤ 15 MB",
            )
            .met(idle_rss * 1024 <= 15_000_000),
            row(
                "4. idle CPU",
                format!(
                    "{cpu_pct:.2}% ({} ticks in {idle_secs:.0} s)",
                    after.cpu_ticks - before.cpu_ticks
                ),
                "—".into(),
                "—".into(),
                "≈ 0 (no busy polling)",
            )
            .met(cpu_pct < 0.5),
            row(
                "4. log delivered to the API",
                format!(
                    "{rate:.0} MB/s ({} MiB in {:.1} s)",
                    g / MIB,
                    job_time.as_secs_f64()
                ),
                format!("{base_rate:.0} MB/s (read directly)"),
                format!("{r:.2}×"),
                "≥ 100 MB/s",
            )
            .met(rate >= 100.0),
            row(
                "4. RSS during the log job (max; peak)",
                format!("{}; {}", mib(job_rss), mib(hwm)),
                "—".into(),
                "—".into(),
                "≤ 64 MB",
            )
            .met(job_rss.max(hwm) * 1024 <= 64_000_000),
        ])
    }

    /// Containers of this run still present (there should be none).
    async fn leftovers(&self) -> usize {
        let mut n = 0;
        let mut labels = vec![format!("{BENCH_LABEL}=true")];
        labels.extend(
            self.agent_ids
                .iter()
                .map(|id| format!("{}={id}", gryt_agent::executor::container::LABEL_AGENT_ID)),
        );
        for label in labels {
            let filters = HashMap::from([("label", vec![label])]);
            let options = ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build();
            n += self
                .docker
                .list_containers(Some(options))
                .await
                .map(|l| l.len())
                .unwrap_or(0);
        }
        n
    }
}

/// A shell script printing exactly `g` bytes of printable ASCII (65-byte lines), fast.
fn print_script(g: u64) -> String {
    let block = if g >= 16 * MIB && g.is_multiple_of(16 * MIB) {
        16 * MIB
    } else {
        MIB
    };
    let line = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ01";
    let mut s = format!("yes {line} | head -c {MIB} > /tmp/b1\n");
    if block == 16 * MIB {
        s.push_str("cat /tmp/b1 /tmp/b1 /tmp/b1 /tmp/b1 > /tmp/b4\n");
        s.push_str("cat /tmp/b4 /tmp/b4 /tmp/b4 /tmp/b4 > /tmp/b\n");
    } else {
        s.push_str("mv /tmp/b1 /tmp/b\n");
    }
    s.push_str(&format!(
        "n=0; while [ $n -lt {} ]; do cat /tmp/b; n=$((n+1)); done\n",
        g / block
    ));
    s
}

/// The protocol's floor for pickup: lease (long poll) → start → complete, nothing else.
async fn bare_client(url: String) {
    let http = reqwest::Client::new();
    let base = format!("{url}/api/v1/agent");
    loop {
        let lease = http
            .post(format!("{base}/lease"))
            .bearer_auth(KEY)
            .json(
                &json!({"agent_id": "bare", "hostname": "bare", "version": "0", "labels": [],
                          "capacity": 1, "wait_seconds": 25}),
            )
            .send()
            .await;
        let Ok(lease) = lease else { return };
        if lease.status() != reqwest::StatusCode::OK {
            continue;
        }
        let Ok(lease) = lease.json::<Value>().await else {
            return;
        };
        let id = lease["job"]["job_id"].as_i64().unwrap_or(0);
        let lease_id = lease["lease_id"].clone();
        for (call, body) in [
            ("start", json!({"lease_id": lease_id, "started_at": "x"})),
            (
                "complete",
                json!({"lease_id": lease_id, "status": "success"}),
            ),
        ] {
            let _ = http
                .post(format!("{base}/jobs/{id}/{call}"))
                .bearer_auth(KEY)
                .json(&body)
                .send()
                .await;
        }
    }
}

// ---------------------------------------------------------------------------------------------

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("benchmark failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let opts = parse_args()?;
    let docker = gryt_agent::executor::connect(None)?
        .negotiate_version()
        .await
        .context("the Docker engine does not answer")?;
    let image = image::import(&docker).await.map_err(anyhow::Error::msg)?;
    let agent = AgentBinary::find(opts.agent.clone())?;
    let hard = Hardening::new(&image, &opts.network)?;
    let header = machine_info(&docker, &agent, &opts).await;
    eprintln!("{}", header.join("\n"));
    let mut bench = Bench {
        docker,
        hard,
        agent,
        work: tempfile::Builder::new().prefix("gryt-bench-").tempdir()?,
        sizes: opts.sizes.clone(),
        agent_ids: Vec::new(),
    };
    let mut rows = Vec::new();
    let total = Instant::now();
    for figure in FIGURES {
        if !opts.wants(figure) {
            continue;
        }
        eprintln!("running: {figure}");
        let clock = Instant::now();
        let figure_rows = match figure {
            "overhead" => bench.overhead().await,
            "throughput" => bench.throughput().await,
            "pickup" => bench.pickup().await,
            _ => bench.footprint().await,
        }
        .with_context(|| format!("figure `{figure}`"))?;
        eprintln!("  done in {:.1} s", clock.elapsed().as_secs_f64());
        rows.extend(figure_rows);
    }
    let left = bench.leftovers().await;

    println!("## gryt-agent benchmark\n");
    println!("{}", header.join("\n"));
    println!("- total time: {:.0} s\n", total.elapsed().as_secs_f64());
    println!("| figure | value | baseline | ratio | target | met |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        println!(
            "| {} | {} | {} | {} | {} | {met} |",
            r.figure, r.value, r.baseline, r.ratio, r.target
        );
    }
    if left > 0 {
        bail!("{left} container(s) of this run are left behind");
    }
    Ok(())
}
