//! A real `gryt-agent run` process in pull mode for the reliability suites: its own state and
//! work directories (kept across a restart), its log in a file, its RSS readable, killed when
//! dropped. Include with `#[path = "support/pull_agent.rs"] mod pull_agent;` next to `mod support;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{containers_of, test_image};

pub const KEY: &str = "test-agent-key-0123456789abcdef";

pub struct PullAgent {
    pub child: Child,
    pub agent_id: String,
    pub state: PathBuf,
    pub work: PathBuf,
    pub log: PathBuf,
}

impl PullAgent {
    /// Starts `gryt-agent run` against `api_url` with `state` and `work` as its directories
    /// (`env` adds to or overrides the defaults). Job containers get no network.
    pub async fn start(
        agent_id: &str,
        state: &Path,
        work: &Path,
        api_url: &str,
        env: &[(&str, &str)],
    ) -> PullAgent {
        let image = test_image().await;
        let port = crate::support::process::free_port();
        let log = state.join(format!("agent-{port}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gryt-agent"));
        cmd.arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", state)
            .env("RUST_LOG", "gryt_agent=debug,info")
            // Plain log lines: the suites read fields out of them.
            .env("NO_COLOR", "1")
            .env("GRYT_API_URL", api_url)
            .env("AGENT_API_KEY", KEY)
            .env("GRYT_STATE_DIR", state)
            .env("GRYT_WORK_DIR", work)
            .env("GRYT_DOCKER_IMAGE", image)
            .env("GRYT_PULL_POLICY", "never")
            .env("GRYT_AGENT_ID", agent_id)
            .env("GRYT_STOP_GRACE", "1")
            .env("GRYT_NETWORK", "none")
            .env("GRYT_LEASE_WAIT", "2")
            .env("AGENT_HOST", "127.0.0.1")
            .env("AGENT_PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Ok(h) = std::env::var("DOCKER_HOST") {
            cmd.env("DOCKER_HOST", h);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("cannot start gryt-agent");
        PullAgent {
            child,
            agent_id: agent_id.to_owned(),
            state: state.to_owned(),
            work: work.to_owned(),
            log,
        }
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

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The result files in the spool (`*.json`) and every other file there.
    pub fn spool_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.state.join("spool"))
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    }

    pub fn workspaces(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.work)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }

    /// No container with this agent's label and no workspace left (containers are removed in
    /// the background: up to 5 s of grace).
    pub async fn assert_clean(&self) {
        for _ in 0..50 {
            if containers_of(&self.agent_id).await.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            containers_of(&self.agent_id).await,
            Vec::<String>::new(),
            "containers left behind"
        );
        assert_eq!(self.workspaces(), Vec::<PathBuf>::new(), "workspaces left");
    }
}

impl Drop for PullAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
