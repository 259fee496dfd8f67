//! A real `gryt-agent run` process for tests: started on a free loopback port with the test
//! image, its log kept in a file, killed when dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const KEY: &str = "push-test-key-0123456789abcdef0123456789";
pub const PREVIOUS_KEY: &str = "previous-key-0123456789abcdef0123456789";

pub struct Agent {
    pub child: Child,
    pub url: String,
    pub agent_id: String,
    pub work_dir: tempfile::TempDir,
    pub state_dir: tempfile::TempDir,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Agent {
    /// Starts `gryt-agent run` in push mode (plus `extra_env`) and waits until it answers.
    pub async fn start(test: &str, extra_env: &[(&str, &str)]) -> Agent {
        let work_dir = tempfile::tempdir().unwrap();
        Self::start_in(test, work_dir, extra_env).await
    }

    /// Like [`Agent::start`] with a given work dir (to plant leftovers before the start).
    pub async fn start_in(
        test: &str,
        work_dir: tempfile::TempDir,
        extra_env: &[(&str, &str)],
    ) -> Agent {
        Self::start_as(&super::unique_agent_id(test), work_dir, extra_env).await
    }

    pub async fn start_as(
        agent_id: &str,
        work_dir: tempfile::TempDir,
        extra_env: &[(&str, &str)],
    ) -> Agent {
        let image = super::test_image().await;
        let state_dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let agent_id = agent_id.to_owned();
        let mut cmd = agent_command(&image, &agent_id, work_dir.path(), state_dir.path(), port);
        cmd.env("RUST_LOG", "debug");
        cmd.stderr(std::fs::File::create(state_dir.path().join("agent.log")).unwrap());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let agent = Agent {
            child,
            url: format!("http://127.0.0.1:{port}"),
            agent_id,
            work_dir,
            state_dir,
        };
        agent.wait_ready().await;
        agent
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if reqwest::get(format!("{}/", self.url)).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("agent did not come up");
    }

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

    /// Everything the agent logged so far (at debug level).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.path().join("agent.log")).unwrap_or_default()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        reqwest::get(format!("{}{path}", self.url)).await.unwrap()
    }

    pub async fn assert_clean(&self) {
        for _ in 0..50 {
            if super::containers_of(&self.agent_id).await.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            super::containers_of(&self.agent_id).await.is_empty(),
            "containers left behind"
        );
        assert_eq!(
            std::fs::read_dir(self.work_dir.path()).unwrap().count(),
            0,
            "workspaces left behind"
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn agent_command(
    image: &str,
    agent_id: &str,
    work: &std::path::Path,
    state: &std::path::Path,
    port: u16,
) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gryt-agent"));
    cmd.arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GRYT_PUSH", "true")
        .env("AGENT_API_KEY", KEY)
        .env("AGENT_API_KEY_PREVIOUS", PREVIOUS_KEY)
        .env("AGENT_HOST", "127.0.0.1")
        .env("AGENT_PORT", port.to_string())
        .env("GRYT_DOCKER_IMAGE", image)
        .env("GRYT_PULL_POLICY", "never")
        .env("GRYT_WORK_DIR", work)
        .env("GRYT_STATE_DIR", state)
        .env("GRYT_AGENT_ID", agent_id)
        .env("GRYT_STOP_GRACE", "2")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}
