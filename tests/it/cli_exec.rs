//! `gryt-agent exec` as a user runs it: the real binary, the real Docker engine.

use crate::support;

use std::process::{Command, Output, Stdio};

use support::test_image;

struct Exec {
    work_dir: tempfile::TempDir,
    state_dir: tempfile::TempDir,
    image: String,
    agent_id: String,
}

impl Exec {
    async fn new(test: &str) -> Self {
        Exec {
            work_dir: tempfile::tempdir().unwrap(),
            state_dir: tempfile::tempdir().unwrap(),
            image: test_image().await,
            agent_id: support::unique_agent_id(test),
        }
    }

    /// The id exec's containers and workspaces carry: never the configured agent id itself.
    fn exec_id(&self) -> String {
        format!("{}-exec", self.agent_id)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gryt-agent"));
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("GRYT_DOCKER_IMAGE", &self.image)
            .env("GRYT_PULL_POLICY", "never")
            .env("GRYT_WORK_DIR", self.work_dir.path())
            .env("GRYT_STATE_DIR", self.state_dir.path())
            .env("GRYT_AGENT_ID", &self.agent_id)
            .stdin(Stdio::null());
        cmd
    }

    fn pipeline(&self, name: &str, text: &str) -> String {
        let dir = self
            .work_dir
            .path()
            .parent()
            .unwrap()
            .join(format!("{}-pipelines", self.agent_id));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    }

    async fn run(&self, args: &[&str]) -> Output {
        let mut cmd = self.command(args);
        let output = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        self.assert_clean().await;
        output
    }

    async fn assert_clean(&self) {
        assert!(
            support::containers_of(&self.exec_id()).await.is_empty(),
            "container left behind"
        );
        assert_eq!(
            std::fs::read_dir(self.work_dir.path()).unwrap().count(),
            0,
            "workspace left behind"
        );
    }

    /// Starts `exec` on a job that runs until stopped; returns once its container exists
    /// (so its signal handlers are in place), with the container's id.
    async fn start_long_job(&self, known: &[String]) -> (std::process::Child, String) {
        let file = self.pipeline(
            "long.yml",
            "version: 1\nsteps:\n  - run: echo started; sleep 300\n",
        );
        let mut child = self
            .command(&["exec", &file])
            .env("GRYT_STOP_GRACE", "2")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        for _ in 0..600 {
            let now = support::containers_of(&self.exec_id()).await;
            if let Some(new) = now.into_iter().find(|c| !known.contains(c)) {
                return (child, new);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("the exec's container never appeared");
    }
}

fn signal(child: &std::process::Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name}");
}

async fn wait(child: std::process::Child) -> Output {
    tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn term_hup_and_int_stop_the_job_clean_up_and_exit_128_plus_the_signal() {
    let exec = Exec::new("cli-signals").await;
    for (name, code) in [("TERM", 143), ("HUP", 129), ("INT", 130)] {
        let (child, _) = exec.start_long_job(&[]).await;
        signal(&child, name);
        let out = wait(child).await;
        assert_eq!(
            out.status.code(),
            Some(code),
            "{name}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains("==> job cancelled"),
            "{name}: {}",
            text(&out.stderr)
        );
        exec.assert_clean().await;
    }
}

#[tokio::test]
async fn a_killed_execs_container_is_removed_by_the_next_exec_and_a_live_ones_is_not() {
    let exec = Exec::new("cli-sigkill").await;
    let (alive, alive_container) = exec.start_long_job(&[]).await;
    let (mut killed, killed_container) = exec
        .start_long_job(std::slice::from_ref(&alive_container))
        .await;
    killed.kill().unwrap();
    killed.wait().unwrap();
    let mut left = support::containers_of(&exec.exec_id()).await;
    left.sort();
    let mut both = vec![alive_container.clone(), killed_container.clone()];
    both.sort();
    assert_eq!(left, both, "a SIGKILLed exec cannot clean up");
    assert_eq!(std::fs::read_dir(exec.work_dir.path()).unwrap().count(), 2);

    let file = exec.pipeline("hello.yml", "version: 1\nsteps:\n  - run: echo Hello\n");
    let out = exec.command(&["exec", &file]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("removed 1 container(s) left by killed execs"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        support::containers_of(&exec.exec_id()).await,
        vec![alive_container.clone()],
        "only the killed exec's container goes"
    );
    assert_eq!(
        std::fs::read_dir(exec.work_dir.path()).unwrap().count(),
        1,
        "the killed exec's workspace goes, the live one's stays"
    );

    signal(&alive, "TERM");
    let out = wait(alive).await;
    assert_eq!(out.status.code(), Some(143), "{}", text(&out.stderr));
    exec.assert_clean().await;
}

#[tokio::test]
async fn an_agent_with_the_execs_id_and_work_dir_spares_a_live_execs_workspace() {
    let exec = Exec::new("cli-shared-id").await;
    let (alive, container) = exec.start_long_job(&[]).await;
    let names = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(exec.work_dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let ours = names();
    assert_eq!(ours.len(), 1, "{ours:?}");
    assert!(
        ours[0].starts_with(&format!("job+{}+0+", exec.exec_id())),
        "{ours:?}"
    );
    // A leftover of the agent's own: once it is gone, the agent's start sweep has run.
    let stale = exec
        .work_dir
        .path()
        .join(format!("job+{}+99+AbC123", exec.agent_id));
    std::fs::create_dir(&stale).unwrap();
    let state = tempfile::tempdir().unwrap();
    let log = state.path().join("agent.log");
    let mut cmd = support::process::push::command(
        &exec.image,
        &exec.agent_id,
        exec.work_dir.path(),
        state.path(),
        support::process::free_port(),
    );
    cmd.stderr(std::fs::File::create(&log).unwrap());
    let mut agent = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while stale.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let swept = !stale.exists();
    let _ = agent.kill();
    let _ = agent.wait();
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(swept, "the agent never swept its own leftover:\n{log}");
    assert_eq!(names(), ours, "the live exec's workspace was swept:\n{log}");
    assert_eq!(
        support::containers_of(&exec.exec_id()).await,
        vec![container]
    );

    signal(&alive, "TERM");
    let out = wait(alive).await;
    assert_eq!(out.status.code(), Some(143), "{}", text(&out.stderr));
    exec.assert_clean().await;
}

#[tokio::test]
async fn an_exec_that_fails_before_its_job_leaves_no_lock_file() {
    let exec = Exec::new("cli-early-error").await;
    let file = exec.pipeline("ok.yml", "version: 1\nsteps:\n  - run: true\n");
    let mut cmd = exec.command(&["exec", &file]);
    // Fails after the lock is taken: no engine answers there.
    cmd.env("DOCKER_HOST", "unix:///nonexistent/docker.sock");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("the Docker engine does not answer"),
        "{}",
        text(&out.stderr)
    );
    let locks = exec.state_dir.path().join("exec");
    assert!(
        locks.is_dir(),
        "the lock was never taken: {}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read_dir(&locks).unwrap().count(),
        0,
        "lock file left"
    );
}

#[tokio::test]
async fn a_timeout_above_the_maximum_is_a_clear_error_not_a_panic() {
    let exec = Exec::new("cli-huge-timeout").await;
    let file = exec.pipeline("ok.yml", "version: 1\nsteps:\n  - run: true\n");
    let out = exec
        .run(&["exec", &file, "--timeout", "18446744073709551615"])
        .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(
            "timeout_seconds = 18446744073709551615 is above this agent's limit job.max_timeout_seconds = 86400"
        ),
        "{}",
        text(&out.stderr)
    );
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn hello_prints_hello_on_stdout_and_exits_zero() {
    let exec = Exec::new("cli-hello").await;
    let file = exec.pipeline("hello.yml", "version: 1\nsteps:\n  - run: echo Hello\n");
    let out = exec.run(&["exec", &file]).await;
    assert_eq!(
        text(&out.stdout),
        "Hello\n",
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("==> step 1: echo Hello"), "{err}");
    assert!(err.contains("==> job success"), "{err}");
}

#[tokio::test]
async fn the_exit_status_is_the_jobs_and_streams_stay_apart() {
    let exec = Exec::new("cli-fail").await;
    let file = exec.pipeline(
        "fail.yml",
        "version: 1\nsteps:\n  - run: echo out; echo err >&2; exit 7\n",
    );
    let out = exec.run(&["exec", &file]).await;
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(text(&out.stdout), "out\n");
    assert!(text(&out.stderr).contains("err\n"));
}

#[tokio::test]
async fn json_puts_only_the_result_on_stdout() {
    let exec = Exec::new("cli-json").await;
    let file = exec.pipeline(
        "json.yml",
        "version: 1\nsteps:\n  - run: echo \"$GREETING\"\n",
    );
    let out = exec
        .run(&["exec", &file, "--json", "--env", "GREETING=hi there"])
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let result: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    assert_eq!(result["status"], "success");
    assert_eq!(result["stdout"], "hi there\n");
    assert_eq!(result["exit_code"], 0);
    assert!(
        text(&out.stderr).contains("hi there"),
        "live output goes to stderr with --json"
    );
}

#[tokio::test]
async fn an_invalid_pipeline_names_the_field_and_fails() {
    let exec = Exec::new("cli-invalid").await;
    let file = exec.pipeline(
        "bad.yml",
        "version: 1\nsteps:\n  - run: echo\n    continue_on_error: maybe\n",
    );
    let out = exec.run(&["exec", &file]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("steps[0].continue_on_error"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn a_timeout_flag_limits_the_job() {
    let exec = Exec::new("cli-timeout").await;
    let file = exec.pipeline("slow.yml", "version: 1\nsteps:\n  - run: sleep 30\n");
    let out = exec.run(&["exec", &file, "--timeout", "1", "--json"]).await;
    assert!(!out.status.success());
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["status"], "timeout");
}

#[tokio::test]
async fn a_missing_file_and_bad_config_are_clear_errors() {
    let exec = Exec::new("cli-errors").await;
    let out = exec.run(&["exec", "/nonexistent/pipeline.yml"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot read pipeline file /nonexistent/pipeline.yml"),
        "{}",
        text(&out.stderr)
    );

    let file = exec.pipeline("ok.yml", "version: 1\nsteps:\n  - run: true\n");
    let mut cmd = exec.command(&["exec", &file]);
    cmd.env("GRYT_JOB_TIMEOUT", "forever");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("GRYT_JOB_TIMEOUT"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn help_and_version() {
    let out = Command::new(env!("CARGO_BIN_EXE_gryt-agent"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = text(&out.stdout);
    assert!(help.contains("exec") && help.contains("run"), "{help}");
    let out = Command::new(env!("CARGO_BIN_EXE_gryt-agent"))
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        text(&out.stdout),
        format!("gryt-agent {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn the_flags_of_run_are_its_settings_and_reach_them() {
    let run = |args: &[&str]| {
        let state = tempfile::tempdir().unwrap();
        Command::new(env!("CARGO_BIN_EXE_gryt-agent"))
            .arg("run")
            .args(args)
            .env_clear()
            .env("HOME", state.path())
            .env("GRYT_STATE_DIR", state.path())
            .output()
            .unwrap()
    };
    let help = text(&run(&["--help"]).stdout);
    for (flag, var) in [
        ("--api-url <URL>", "GRYT_API_URL"),
        ("--push ", "GRYT_PUSH"),
        ("--concurrency <N>", "GRYT_CONCURRENCY"),
        ("--agent-id <ID>", "GRYT_AGENT_ID"),
        ("--labels <A,B>", "GRYT_AGENT_LABELS"),
        ("--state-dir <DIR>", "GRYT_STATE_DIR"),
        ("--host <HOST>", "AGENT_HOST"),
        ("--port <PORT>", "AGENT_PORT"),
    ] {
        let line = help.lines().find(|l| l.contains(flag));
        assert!(
            line.is_some_and(|l| l.contains(&format!("[env: {var}]"))),
            "{flag}: {help}"
        );
    }
    // The command line checks a number's type; the settings check its value, naming the key.
    let out = run(&["--port", "70000"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--port"),
        "{}",
        text(&out.stderr)
    );
    for (flag, value, key) in [
        ("--concurrency", "300", "concurrency"),
        ("--agent-id", "not an id", "agent_id"),
    ] {
        let out = run(&[flag, value]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag}: {stderr}");
        assert!(stderr.contains(&format!("`{key}`")), "{flag}: {stderr}");
    }
}
