//! The agent binary under measurement, run as `exec` and as `run` (pull mode).

use super::*;

pub(crate) struct AgentBinary {
    pub(crate) path: PathBuf,
    pub(crate) why: &'static str,
}

impl AgentBinary {
    /// `--agent`, else `target/release/gryt-agent` when present, else the debug one.
    pub(crate) fn find(explicit: Option<PathBuf>) -> anyhow::Result<Self> {
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

    pub(crate) fn describe(&self) -> String {
        let age = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .map(|e| format!(", built {} min ago", e.as_secs() / 60))
            .unwrap_or_default();
        format!("`{}` ({}{age})", self.path.display(), self.why)
    }

    /// The environment every agent process gets: the bench image, never pull, own dirs.
    pub(crate) fn command(&self, hard: &Hardening, work: &Path, home: &Path) -> Command {
        let mut cmd = Command::new(&self.path);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", home)
            .env("GRYT_DOCKER_IMAGE", &hard.image)
            .env("GRYT_PULL_POLICY", "never")
            .env("GRYT_NETWORK", &hard.network)
            .env("GRYT_WORK_DIR", work)
            // Off unless a figure asks for it (figure 8): the figures measured before the warm
            // pool existed stay comparable with their history.
            .env("GRYT_WARM_POOL", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Ok(host) = std::env::var("DOCKER_HOST") {
            cmd.env("DOCKER_HOST", host);
        }
        cmd
    }

    /// `gryt-agent exec pipeline.yml`, to its exit.
    pub(crate) fn exec(
        &self,
        hard: &Hardening,
        work: &Path,
        pipeline: &Path,
    ) -> anyhow::Result<()> {
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

/// A `gryt-agent run` in pull mode against the fake (push mode too when asked); stopped when
/// dropped.
pub(crate) struct PullAgent {
    pub(crate) child: Child,
    pub(crate) agent_id: String,
    pub(crate) _state: tempfile::TempDir,
    pub(crate) log: PathBuf,
    /// Its local endpoint: `http://127.0.0.1:<port>` (`/health`, `/metrics`, push).
    pub(crate) url: String,
}

impl PullAgent {
    pub(crate) async fn start(
        bin: &AgentBinary,
        hard: &Hardening,
        work: &Path,
        fake: &FakeApi,
        concurrency: usize,
    ) -> anyhow::Result<Self> {
        Self::start_with(bin, hard, work, fake, concurrency, &[]).await
    }

    /// As [`PullAgent::start`], with more environment (overriding the bench's own).
    pub(crate) async fn start_with(
        bin: &AgentBinary,
        hard: &Hardening,
        work: &Path,
        fake: &FakeApi,
        concurrency: usize,
        env: &[(&str, &str)],
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
            .envs(env.iter().copied())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("cannot start gryt-agent run")?;
        let agent = PullAgent {
            child,
            agent_id,
            _state: state,
            log,
            url: format!("http://127.0.0.1:{port}"),
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

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let from = log.len().saturating_sub(3000);
        let start = (from..=log.len())
            .find(|&i| log.is_char_boundary(i))
            .unwrap_or(0);
        format!("agent log ({}):\n{}", self.log.display(), &log[start..])
    }
}

/// How long a stopped agent may take to drain before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(30);

impl Drop for PullAgent {
    /// SIGTERM first, so the agent drains what it holds (a warm pool's containers) as in
    /// production; SIGKILL only when it has not exited within [`STOP_GRACE`].
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
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
