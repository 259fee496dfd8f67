//! `gryt-agent exec` as a user runs it: the real binary, the real Docker engine.

mod support;

use std::process::{Command, Output, Stdio};

use support::test_image;

struct Exec {
    work_dir: tempfile::TempDir,
    image: String,
    agent_id: String,
}

impl Exec {
    async fn new(test: &str) -> Self {
        Exec {
            work_dir: tempfile::tempdir().unwrap(),
            image: test_image().await,
            agent_id: support::unique_agent_id(test),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gryt-agent"));
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("GRYT_DOCKER_IMAGE", &self.image)
            .env("GRYT_PULL_POLICY", "never")
            .env("GRYT_WORK_DIR", self.work_dir.path())
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
        assert!(
            support::containers_of(&self.agent_id).await.is_empty(),
            "container left behind"
        );
        assert_eq!(
            std::fs::read_dir(self.work_dir.path()).unwrap().count(),
            0,
            "workspace left behind"
        );
        output
    }
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
