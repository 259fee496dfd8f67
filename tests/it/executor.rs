//! The executor against a real Docker engine: every job path, and what each leaves behind.

use crate::support;

use std::time::{Duration, Instant};

use gryt_agent::executor::{Discard, JobControl, OutputStream};
use gryt_agent::wire::{JobStatus, StepStatus};
use support::{Recorder, job, test_agent};

#[tokio::test]
async fn the_documented_hello_pipeline_prints_hello() {
    let agent = test_agent("hello", |_| {}).await;
    let rec = Recorder::default();
    let result = agent
        .executor
        .run(
            &job("version: 1\nsteps:\n  - run: echo Hello"),
            &rec,
            &JobControl::new(),
        )
        .await;
    assert_eq!(result.status, JobStatus::Success, "{result:?}");
    assert!(result.success);
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.stdout, "Hello\n");
    assert_eq!(result.error, None);
    assert_eq!(result.steps.len(), 1);
    assert_eq!(result.steps[0].name, "echo Hello");
    assert_eq!(result.steps[0].status, StepStatus::Success);
    assert_eq!(rec.stream(OutputStream::Stdout), b"Hello\n");
    assert!(result.started_at.ends_with('Z') && result.completed_at.ends_with('Z'));
    agent.assert_clean().await;
}

#[tokio::test]
async fn a_failing_step_stops_the_pipeline_with_its_exit_code() {
    let agent = test_agent("failing-step", |_| {}).await;
    let pipeline = "version: 1\nsteps:\n  - run: echo first\n  - run: exit 3\n    name: breaks\n  - run: echo never\n";
    let result = agent.run(&job(pipeline)).await;
    assert_eq!(result.status, JobStatus::Failed);
    assert!(!result.success);
    assert_eq!(result.exit_code, 3);
    assert_eq!(result.stdout, "first\n");
    assert_eq!(result.error, None);
    let statuses: Vec<_> = result
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.status, s.exit_code))
        .collect();
    assert_eq!(
        statuses,
        [
            ("echo first", StepStatus::Success, Some(0)),
            ("breaks", StepStatus::Failed, Some(3)),
            ("echo never", StepStatus::Skipped, None)
        ]
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn continue_on_error_runs_the_rest_and_files_persist_between_steps() {
    let agent = test_agent("continue", |_| {}).await;
    let pipeline = "version: 1\nsteps:\n  - run: echo kept > note.txt\n  - run: exit 5\n    continue_on_error: true\n  - run: cat note.txt; ls /workspace\n";
    let result = agent.run(&job(pipeline)).await;
    assert_eq!(result.status, JobStatus::Success, "{result:?}");
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.stdout, "kept\nnote.txt\npipeline.yml\n");
    assert_eq!(result.steps[1].status, StepStatus::Failed);
    assert_eq!(result.steps[1].exit_code, Some(5));
    assert_eq!(result.steps[2].status, StepStatus::Success);
    agent.assert_clean().await;
}

#[tokio::test]
async fn stderr_is_kept_apart_from_stdout() {
    let agent = test_agent("stderr", |_| {}).await;
    let rec = Recorder::default();
    let pipeline = "version: 1\nsteps:\n  - run: echo to-out; echo to-err >&2; echo more-out\n";
    let result = agent
        .executor
        .run(&job(pipeline), &rec, &JobControl::new())
        .await;
    assert_eq!(result.stdout, "to-out\nmore-out\n");
    assert_eq!(result.stderr, "to-err\n");
    assert_eq!(rec.stream(OutputStream::Stderr), b"to-err\n");
    agent.assert_clean().await;
}

#[tokio::test]
async fn env_vars_reach_the_steps_with_pipeline_and_step_env_layered_on_top() {
    let agent = test_agent("env", |_| {}).await;
    let mut spec = job(
        "version: 1\nenv:\n  FROM_PIPELINE: p\n  OVERRIDDEN: pipeline\n  PORT: 8080\nsteps:\n  - run: echo \"$FROM_JOB $FROM_PIPELINE $OVERRIDDEN $PORT $STEP_ONLY $GRYT_WORKSPACE $(pwd)\"\n    env: {STEP_ONLY: s}\n",
    );
    spec.env_vars = [
        ("FROM_JOB".into(), "j k".into()),
        ("OVERRIDDEN".into(), "job".into()),
    ]
    .into();
    let result = agent.run(&spec).await;
    assert_eq!(
        result.stdout, "j k p pipeline 8080 s /workspace /workspace\n",
        "{result:?}"
    );
    agent.assert_clean().await;
}

const GRYT_FAILING: &str = "from gryt import Pipeline  # run by the test stand-in\n# step build: echo building\n# step test: echo testing; exit 4\n";

#[tokio::test]
async fn a_gryt_pipeline_that_fails_inside_is_failed_although_gryt_exits_zero() {
    let agent = test_agent("gryt-fail", |_| {}).await;
    let result = agent.run(&job(GRYT_FAILING)).await;
    assert_eq!(result.status, JobStatus::Failed, "{result:?}");
    assert_eq!(result.exit_code, 4);
    assert!(
        result
            .stdout
            .starts_with("[hook] pipeline starting\nbuilding\ntesting\n{"),
        "{}",
        result.stdout
    );
    let steps: Vec<_> = result
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.status, s.exit_code))
        .collect();
    assert_eq!(
        steps,
        [
            ("build", StepStatus::Success, Some(0)),
            ("test", StepStatus::Failed, Some(4))
        ]
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn a_gryt_pipeline_that_does_not_load_fails_with_exit_code_2() {
    let agent = test_agent("gryt-load", |_| {}).await;
    let result = agent
        .executor
        .run(
            &job("import gryt\nSYNTAX ERROR here\n"),
            &Discard,
            &JobControl::new(),
        )
        .await;
    assert_eq!(result.status, JobStatus::Failed, "{result:?}");
    assert_eq!(result.exit_code, 2);
    assert!(
        result
            .error
            .as_deref()
            .unwrap_or("")
            .contains("invalid syntax"),
        "{result:?}"
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn a_passing_gryt_pipeline_succeeds_with_its_steps() {
    let agent = test_agent("gryt-ok", |_| {}).await;
    let script = "from gryt import Pipeline\n# step lint: true\n# step test: test \"$GRYT_WORKSPACE\" = /workspace && test -f pipeline.py\n";
    let result = agent.run(&job(script)).await;
    assert_eq!(result.status, JobStatus::Success, "{result:?}");
    assert_eq!(result.steps.len(), 2);
    agent.assert_clean().await;
}

#[tokio::test]
async fn a_job_past_its_time_limit_is_stopped_with_status_timeout() {
    let agent = test_agent("timeout", |_| {}).await;
    let mut spec =
        job("version: 1\nsteps:\n  - run: echo started; sleep 60\n  - run: echo never\n");
    spec.timeout_seconds = Some(2);
    let clock = Instant::now();
    let result = agent.run(&spec).await;
    assert_eq!(result.status, JobStatus::Timeout, "{result:?}");
    assert!(
        clock.elapsed() < Duration::from_secs(15),
        "took {:?}",
        clock.elapsed()
    );
    assert_eq!(result.stdout, "started\n");
    assert_eq!(result.error.as_deref(), Some("job timed out after 2s"));
    assert_eq!(result.steps[0].status, StepStatus::Timeout);
    assert_eq!(result.steps[1].status, StepStatus::Skipped);
    agent.assert_clean().await;
}

#[tokio::test]
async fn a_step_time_limit_stops_only_that_step() {
    let agent = test_agent("step-timeout", |_| {}).await;
    let pipeline = "version: 1\nsteps:\n  - run: sleep 60\n    timeout_seconds: 1\n    continue_on_error: true\n  - run: echo after\n";
    let result = agent.run(&job(pipeline)).await;
    assert_eq!(result.status, JobStatus::Success, "{result:?}");
    assert_eq!(result.steps[0].status, StepStatus::Timeout);
    assert_eq!(result.stdout, "after\n");
    agent.assert_clean().await;
}

#[tokio::test]
async fn running_out_of_memory_is_reported_as_such() {
    let agent = test_agent("oom", |_| {}).await;
    let mut spec =
        job("version: 1\nsteps:\n  - run: dd if=/dev/zero of=/dev/null bs=128M count=1\n");
    spec.memory_limit = Some("32m".into());
    let result = agent.run(&spec).await;
    assert_eq!(result.status, JobStatus::Failed, "{result:?}");
    assert!(result.oom_killed, "{result:?}");
    assert_eq!(result.exit_code, 137);
    assert!(
        result
            .error
            .as_deref()
            .unwrap_or("")
            .contains("out of memory"),
        "{result:?}"
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn a_cancelled_job_stops_quickly_with_status_cancelled() {
    let agent = test_agent("cancel", |_| {}).await;
    let control = JobControl::new();
    let canceller = control.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        canceller.cancel("the API asked");
    });
    let clock = Instant::now();
    let result = agent
        .executor
        .run(
            &job("version: 1\nsteps:\n  - run: sleep 60\n"),
            &Discard,
            &control,
        )
        .await;
    assert_eq!(result.status, JobStatus::Cancelled, "{result:?}");
    assert_eq!(
        result.error.as_deref(),
        Some("job cancelled: the API asked")
    );
    assert!(
        clock.elapsed() < Duration::from_secs(10),
        "took {:?}",
        clock.elapsed()
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn an_abort_kills_at_once() {
    let agent = test_agent("abort", |s| s.job.stop_grace_seconds = 30).await;
    let control = JobControl::new();
    let aborter = control.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        aborter.abort("lease lost");
    });
    let clock = Instant::now();
    // The step ignores SIGTERM: only a kill ends it, and an abort must not wait for the grace.
    let result = agent
        .executor
        .run(
            &job("version: 1\nsteps:\n  - run: trap '' TERM; sleep 60\n"),
            &Discard,
            &control,
        )
        .await;
    assert_eq!(result.status, JobStatus::Cancelled, "{result:?}");
    assert!(
        clock.elapsed() < Duration::from_secs(10),
        "took {:?}",
        clock.elapsed()
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn the_job_runs_as_non_root_without_capabilities_or_network_when_configured() {
    let agent = test_agent("hardening", |s| s.docker.network = "none".into()).await;
    let pipeline = "version: 1\nsteps:\n  - run: id -u; id -g; grep -E '^Cap(Eff|Prm|Bnd):' /proc/self/status; grep NoNewPrivs /proc/self/status; ls /sys/class/net\n";
    let result = agent.run(&job(pipeline)).await;
    assert_eq!(result.status, JobStatus::Success, "{result:?}");
    let lines: Vec<&str> = result.stdout.lines().collect();
    assert_eq!(lines[0], "1000");
    assert_eq!(lines[1], "1000");
    for cap in &lines[2..5] {
        assert!(cap.ends_with("0000000000000000"), "capability left: {cap}");
    }
    assert!(
        lines[5].ends_with('1'),
        "no_new_privs not set: {}",
        lines[5]
    );
    assert_eq!(
        &lines[6..],
        ["lo"],
        "network `none` must leave only loopback"
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn docker_inspect_shows_a_hardened_labelled_container() {
    let agent = test_agent("inspect", |_| {}).await;
    let docker = support::docker().await;
    let agent_id = agent.agent_id.clone();
    let inspector = tokio::spawn(async move {
        // An inspect can fail while the container is still being set up: ask again, as for a
        // container not listed yet, and say what failed last if it never answers.
        let mut last_error = None;
        for _ in 0..100 {
            if let Some(id) = support::containers_of(&agent_id).await.first() {
                match docker.inspect_container(id, None).await {
                    Ok(inspect) => return inspect,
                    Err(e) => last_error = Some(e),
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("job container never appeared or never answered an inspect: {last_error:?}");
    });
    let mut spec = job("version: 1\nsteps:\n  - run: sleep 3\n");
    spec.memory_limit = Some("256m".into());
    spec.cpu_limit = Some("0.5".into());
    spec.job_id = 42;
    let result = agent.run(&spec).await;
    assert_eq!(result.status, JobStatus::Success, "{result:?}");
    let inspect = inspector.await.unwrap();
    let config = inspect.config.unwrap();
    let host = inspect.host_config.unwrap();
    assert_eq!(config.user.as_deref(), Some("1000:1000"));
    // A job of one command runs it as the container's main process (no keepalive, no exec),
    // and Docker keeps its output (driver `local`, bounded) for an agent restarted under it.
    assert_eq!(
        config.cmd.as_deref(),
        Some(&["/bin/sh".to_string(), "-c".into(), "sleep 3".into()][..])
    );
    let log = host.log_config.unwrap();
    assert_eq!(log.typ.as_deref(), Some("local"));
    let log = log.config.unwrap();
    assert_eq!(
        (log["max-size"].as_str(), log["max-file"].as_str()),
        ("64m", "4")
    );
    let labels = config.labels.unwrap();
    assert_eq!(labels["io.gryt.agent.managed"], "true");
    assert_eq!(labels["io.gryt.agent.id"], agent.agent_id);
    assert_eq!(labels["io.gryt.job.id"], "42");
    assert_eq!(host.privileged, Some(false));
    assert_eq!(host.cap_drop, Some(vec!["ALL".to_string()]));
    assert!(host.cap_add.unwrap_or_default().is_empty());
    assert_eq!(
        host.security_opt,
        Some(vec!["no-new-privileges".to_string()])
    );
    assert_eq!(host.memory, Some(256 << 20));
    assert_eq!(host.nano_cpus, Some(500_000_000));
    assert!(host.pids_limit.unwrap_or(0) > 0);
    let binds = host.binds.unwrap_or_default();
    assert_eq!(binds.len(), 1, "{binds:?}");
    assert!(
        binds[0].ends_with(":/workspace") && !binds[0].contains("docker.sock"),
        "{binds:?}"
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn a_missing_image_with_pull_policy_never_is_a_clear_error() {
    let agent = test_agent("missing-image", |_| {}).await;
    let mut spec = job("version: 1\nsteps:\n  - run: true\n");
    spec.docker_image = Some("gryt-agent-test/does-not-exist:1".into());
    let result = agent.run(&spec).await;
    assert_eq!(result.status, JobStatus::Error);
    assert_eq!(
        result.error.as_deref(),
        Some(
            "image gryt-agent-test/does-not-exist:1 is not present and the pull policy is `never`"
        )
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn bad_input_is_refused_before_any_container_exists() {
    let agent = test_agent("bad-input", |_| {}).await;
    let cases = [
        ("not base64 at all!", "not valid base64"),
        (
            &support::b64("version: 1\nsteps:\n  - run: [unclosed\n") as &str,
            "invalid YAML pipeline",
        ),
        (
            &support::b64("version: 1\nsteps:\n  - run: echo\n    timeout_seconds: soon\n"),
            "steps[0].timeout_seconds",
        ),
        (
            &support::b64("version: 3\nsteps:\n  - run: echo\n"),
            "version",
        ),
        (&support::b64("version: 1\nsteps: {}\n"), "steps"),
    ];
    for (pipeline_b64, expected) in cases {
        let spec = gryt_agent::wire::JobSpec {
            job_id: 9,
            pipeline_b64: pipeline_b64.to_owned(),
            ..Default::default()
        };
        let result = agent.run(&spec).await;
        assert_eq!(result.status, JobStatus::Error);
        let error = result.error.unwrap_or_default();
        assert!(error.contains(expected), "{expected:?} not in {error:?}");
        assert!(agent.containers().await.is_empty());
    }
    let mut spec = job("version: 1\nsteps:\n  - run: true\n");
    spec.memory_limit = Some("lots".into());
    let result = agent.run(&spec).await;
    assert!(result.error.unwrap_or_default().contains("memory_limit"));
    agent.assert_clean().await;
}

#[tokio::test]
async fn fifty_megabytes_of_output_keep_memory_bounded_and_the_tail_right() {
    let agent = test_agent("big-output", |_| {}).await;
    struct Counter(std::sync::atomic::AtomicU64);
    impl gryt_agent::executor::JobObserver for Counter {
        fn output(&self, _: OutputStream, data: &[u8]) {
            self.0
                .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let counter = Counter(Default::default());
    let total: u64 = 50 * 1024 * 1024;
    // 50 MiB of numbered lines, then a known last line.
    let pipeline = format!(
        "version: 1\nsteps:\n  - run: yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c {} ; echo; echo THE-END\n",
        total
    );
    let rss_before = rss_kib();
    let result = agent
        .executor
        .run(&job(&pipeline), &counter, &JobControl::new())
        .await;
    let rss_after = rss_kib();
    assert_eq!(
        result.status,
        JobStatus::Success,
        "{}",
        result.error.unwrap_or_default()
    );
    assert_eq!(
        counter.0.load(std::sync::atomic::Ordering::Relaxed),
        total + 1 + 8
    );
    assert!(result.stdout.ends_with("\nTHE-END\n"));
    assert!(
        result.stdout.starts_with("[gryt-agent: "),
        "no dropped-bytes marker"
    );
    let dropped = total + 9 - 1024 * 1024;
    assert!(
        result
            .stdout
            .contains(&format!("{dropped} earlier bytes dropped")),
        "{}",
        &result.stdout[..100]
    );
    assert!(result.stdout.len() < 1024 * 1024 + 200);
    let growth_mib = rss_after.saturating_sub(rss_before) / 1024;
    assert!(
        growth_mib < 40,
        "RSS grew by {growth_mib} MiB while 50 MiB streamed through"
    );
    agent.assert_clean().await;
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn files_the_job_wrote_are_removed_with_the_workspace() {
    let agent = test_agent("cleanup", |_| {}).await;
    let pipeline = "version: 1\nsteps:\n  - run: mkdir -p a/b/c && echo x > a/b/c/f && chmod 000 a/b/c && chmod 500 a/b && exit 1\n";
    let result = agent.run(&job(pipeline)).await;
    assert_eq!(result.status, JobStatus::Failed);
    agent.assert_clean().await;
}

#[tokio::test]
async fn secrets_are_masked_in_streamed_output_and_results_even_split_across_chunks() {
    let vectors: serde_json::Value =
        serde_json::from_str(include_str!("../data/token-crypto.json")).unwrap();
    let vector = &vectors["valid"][0];
    let key = vector["key"].as_str().unwrap().to_owned();
    let agent = test_agent("masking", |s| s.encryption_key = Some(key.into())).await;
    let token = vector["plaintext"].as_str().unwrap();
    let (head, tail) = token.split_at(10);
    // The token arrives encrypted; the job also gets it (and another secret) through env_vars
    // and prints them whole and in two separate writes, so they straddle output chunks.
    let pipeline = format!(
        "version: 1\nsteps:\n  - run: echo \"$GH\"; printf '{head}'; sleep 0.3; printf '{tail}\\n'; echo \"$DEPLOY_PASSWORD\" >&2; echo \"$PLAIN\"\n"
    );
    let mut spec = job(&pipeline);
    spec.github_token_encrypted = Some(vector["token"].as_str().unwrap().to_owned());
    spec.env_vars = [
        ("GH".to_string(), token.to_string()),
        (
            "DEPLOY_PASSWORD".to_string(),
            "hunter2-but-longer".to_string(),
        ),
        ("PLAIN".to_string(), "visible-value".to_string()),
    ]
    .into();
    let rec = Recorder::default();
    let result = agent.executor.run(&spec, &rec, &JobControl::new()).await;
    assert_eq!(result.status, JobStatus::Success, "{result:?}");
    assert_eq!(result.stdout, "[MASKED]\n[MASKED]\nvisible-value\n");
    assert_eq!(result.stderr, "[MASKED]\n");
    let streamed = String::from_utf8(rec.stream(OutputStream::Stdout)).unwrap();
    assert_eq!(streamed, "[MASKED]\n[MASKED]\nvisible-value\n");
    let everything = format!("{result:?}{streamed}{:?}", rec.events.lock().unwrap());
    assert!(!everything.contains(token) && !everything.contains("hunter2-but-longer"));
    agent.assert_clean().await;
}

#[tokio::test]
async fn a_token_that_does_not_decrypt_fails_the_job_before_any_container() {
    let vectors: serde_json::Value =
        serde_json::from_str(include_str!("../data/token-crypto.json")).unwrap();
    let other_key = vectors["valid"][2]["key"].as_str().unwrap().to_owned();
    let agent = test_agent("bad-token", |s| s.encryption_key = Some(other_key.into())).await;
    let mut spec = job("version: 1\nsteps:\n  - run: true\n");
    spec.github_token_encrypted = Some(vectors["valid"][0]["token"].as_str().unwrap().to_owned());
    let result = agent.run(&spec).await;
    assert_eq!(result.status, JobStatus::Error);
    let error = result.error.unwrap();
    assert!(
        error.starts_with("token could not be decrypted with GRYT_ENCRYPTION_KEY"),
        "{error}"
    );
    assert!(!error.contains(vectors["valid"][0]["plaintext"].as_str().unwrap()));

    let agent = test_agent("no-key", |_| {}).await;
    let result = agent.run(&spec).await;
    assert_eq!(result.status, JobStatus::Error);
    assert!(
        result
            .error
            .unwrap()
            .contains("GRYT_ENCRYPTION_KEY is not set")
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn every_container_on_every_path_is_hardened() {
    let agent = test_agent("audit", |_| {}).await;
    let audit = support::ContainerAudit::start(&agent.agent_id).await;
    let control = JobControl::new();
    let canceller = control.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        canceller.cancel("audit");
    });
    let mut timeout = job("version: 1\nsteps:\n  - run: sleep 30\n");
    timeout.timeout_seconds = Some(1);
    let mut oom = job(
        "version: 1\nsteps:\n  - run: sleep 0.3; dd if=/dev/zero of=/dev/null bs=64M count=1\n",
    );
    oom.memory_limit = Some("16m".into());
    let jobs = [
        (
            job("version: 1\nsteps:\n  - run: sleep 0.3\n"),
            JobStatus::Success,
        ),
        (
            job("version: 1\nsteps:\n  - run: sleep 0.3; exit 1\n"),
            JobStatus::Failed,
        ),
        // Slower than GRYT_FAILING: every container here lives long enough to be inspected.
        (
            job("from gryt import Pipeline\n# step build: sleep 0.3\n# step test: exit 4\n"),
            JobStatus::Failed,
        ),
        (timeout, JobStatus::Timeout),
        (oom, JobStatus::Failed),
    ];
    let never_stopped = JobControl::new();
    let slow = job("version: 1\nsteps:\n  - run: sleep 30\n");
    let (results, cancelled) = tokio::join!(
        futures_util::future::join_all(jobs.iter().map(|(spec, _)| agent.executor.run(
            spec,
            &Discard,
            &never_stopped
        ))),
        agent.executor.run(&slow, &Discard, &control),
    );
    for ((_, expected), result) in jobs.iter().zip(&results) {
        assert_eq!(result.status, *expected, "{result:?}");
    }
    assert_eq!(cancelled.status, JobStatus::Cancelled);
    let (audited, networks) = audit.finish_all().await;
    assert_eq!(
        audited, 6,
        "the watcher must have caught every job's container"
    );
    assert_eq!(
        networks, 6,
        "every job must have had a job network of its own"
    );
    agent.assert_clean().await;
}

/// A gryt stand-in run as `sh pipeline.py`: the pipeline text is the shell script, so a test
/// decides exactly what "gryt" prints.
fn scripted_gryt(test: &str) -> impl std::future::Future<Output = support::TestAgent> + '_ {
    test_agent(test, |s| {
        s.job.gryt_command = vec!["sh".into(), "pipeline.py".into()];
    })
}

/// A report whose first step printed `bytes` bytes (gryt puts every step's output in its
/// report) and whose second step failed with 4.
fn big_report_script(bytes: u64) -> String {
    format!(
        "# gryt stand-in\necho '[hook] start'\nprintf '{{\\n  \"status\": \"ok\",\\n  \"results\": {{\"runner_0\": {{\"big\": {{\"status\": \"success\", \"returncode\": 0, \"stdout\": \"'\nhead -c {bytes} /dev/zero | tr '\\0' x\nprintf '\", \"duration\": 1.0}},\\n    \"test\": {{\"status\": \"error\", \"returncode\": 4, \"error\": \"Process exited with code 4\"}}}}}}\\n}}\\n'\nexit 0\n"
    )
}

#[tokio::test]
async fn a_gryt_report_larger_than_the_output_tail_still_decides_the_verdict() {
    let agent = scripted_gryt("gryt-big-report").await;
    // 3 MiB of report: three times the 1 MiB tail kept for the result.
    let result = agent.run(&job(&big_report_script(3 << 20))).await;
    assert_eq!(result.status, JobStatus::Failed, "{:?}", result.error);
    assert!(!result.success);
    assert_eq!(result.exit_code, 4);
    let steps: Vec<_> = result
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.status))
        .collect();
    assert_eq!(
        steps,
        [("big", StepStatus::Success), ("test", StepStatus::Failed)]
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn a_gryt_report_past_the_hard_cap_fails_the_job_and_says_so() {
    let agent = scripted_gryt("gryt-huge-report").await;
    let cap = gryt_agent::pipeline::gryt_report::MAX_REPORT_BYTES as u64;
    let result = agent.run(&job(&big_report_script(cap + 1024))).await;
    assert_eq!(result.status, JobStatus::Failed, "{:?}", result.error);
    assert!(!result.success);
    let error = result.error.unwrap_or_default();
    assert!(
        error.contains(&format!("report is larger than {cap} bytes")),
        "{error}"
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn a_gryt_run_without_a_readable_report_is_failed_not_successful() {
    let agent = scripted_gryt("gryt-no-report").await;
    for script in [
        "# gryt stand-in\necho all good\nexit 0\n",
        // Cut short: the report's first lines and no end.
        "# gryt stand-in\nprintf '{\\n  \"status\": \"ok\",\\n'\nexit 0\n",
    ] {
        let result = agent.run(&job(script)).await;
        assert_eq!(result.status, JobStatus::Failed, "{script}: {result:?}");
        assert!(!result.success);
        assert_eq!(result.exit_code, 1);
        let error = result.error.unwrap_or_default();
        assert!(error.contains("no report"), "{error}");
    }
    agent.assert_clean().await;
}

#[tokio::test]
async fn timeouts_above_the_maximum_are_refused_before_any_container() {
    let agent = test_agent("huge-timeout", |s| {
        s.job.max_timeout_seconds = 600;
        s.job.timeout_seconds = 300;
    })
    .await;
    let audit = support::ContainerAudit::start(&agent.agent_id).await;
    let mut spec = job("version: 1\nsteps:\n  - run: true\n");
    spec.timeout_seconds = Some(u64::MAX);
    let result = agent.run(&spec).await;
    assert_eq!(result.status, JobStatus::Error, "{result:?}");
    assert_eq!(
        result.error.as_deref(),
        Some(
            "timeout_seconds = 18446744073709551615 is above this agent's limit job.max_timeout_seconds = 600"
        )
    );
    spec.timeout_seconds = Some(601);
    let result = agent.run(&spec).await;
    assert_eq!(result.status, JobStatus::Error, "{result:?}");
    let step = job(
        "version: 1\nsteps:\n  - run: true\n  - run: true\n    timeout_seconds: 18446744073709551615\n",
    );
    let result = agent.run(&step).await;
    assert_eq!(result.status, JobStatus::Error, "{result:?}");
    let error = result.error.unwrap_or_default();
    assert!(
        error.contains("steps[1].timeout_seconds")
            && error.contains("job.max_timeout_seconds = 600"),
        "{error}"
    );
    // At the limit is fine.
    spec.timeout_seconds = Some(600);
    assert_eq!(agent.run(&spec).await.status, JobStatus::Success);
    assert_eq!(
        audit.finish().await,
        1,
        "only the job within the limit had a container"
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn memory_and_cpus_above_the_operators_maximum_are_refused() {
    let agent = test_agent("max-limits", |s| {
        s.docker.max_memory = Some("512m".into());
        s.docker.max_cpus = Some("1".into());
        s.docker.memory_limit = "256m".into();
        s.docker.cpu_limit = "0.5".into();
    })
    .await;
    let mut spec = job("version: 1\nsteps:\n  - run: true\n");
    spec.memory_limit = Some("1t".into());
    let result = agent.run(&spec).await;
    assert_eq!(result.status, JobStatus::Error, "{result:?}");
    assert_eq!(
        result.error.as_deref(),
        Some("memory_limit `1t` is above this agent's limit docker.max_memory = 512m")
    );
    spec.memory_limit = None;
    spec.cpu_limit = Some("1.5".into());
    let result = agent.run(&spec).await;
    assert_eq!(
        result.error.as_deref(),
        Some("cpu_limit `1.5` is above this agent's limit docker.max_cpus = 1")
    );
    assert!(agent.containers().await.is_empty());
    spec.memory_limit = Some("512m".into());
    spec.cpu_limit = Some("1".into());
    assert_eq!(agent.run(&spec).await.status, JobStatus::Success);
    agent.assert_clean().await;

    // By default the maximum is this machine's.
    let agent = test_agent("max-limits-host", |_| {}).await;
    let mut spec = job("version: 1\nsteps:\n  - run: true\n");
    spec.memory_limit = Some("1t".into());
    let error = agent.run(&spec).await.error.unwrap_or_default();
    assert!(
        error.contains("docker.max_memory") && error.contains("this machine's memory"),
        "{error}"
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn an_image_outside_allowed_images_is_refused_before_any_pull() {
    let agent = test_agent("allowed-images", |s| {
        s.docker.allowed_images = vec!["gryt-agent-test/*".into()];
        s.docker.pull_policy = gryt_agent::config::PullPolicy::Always;
    })
    .await;
    let rec = Recorder::default();
    let mut spec = job("version: 1\nimage: evil.example/miner:1\nsteps:\n  - run: true\n");
    let result = agent.executor.run(&spec, &rec, &JobControl::new()).await;
    assert_eq!(result.status, JobStatus::Error, "{result:?}");
    assert_eq!(
        result.error.as_deref(),
        Some(
            "image `evil.example/miner:1` is not allowed on this agent (docker.allowed_images: gryt-agent-test/*)"
        )
    );
    spec.docker_image = Some("alpine:3".into());
    let result = agent.executor.run(&spec, &rec, &JobControl::new()).await;
    assert!(
        result
            .error
            .unwrap_or_default()
            .contains("`alpine:3` is not allowed"),
    );
    assert!(
        rec.events.lock().unwrap().is_empty(),
        "nothing was pulled: {:?}",
        rec.events.lock().unwrap()
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn step_env_values_with_secret_names_are_masked() {
    let agent = test_agent("step-env-mask", |_| {}).await;
    let rec = Recorder::default();
    let pipeline = "version: 1\nsteps:\n  - run: echo \"$DEPLOY_TOKEN / $PLAIN\"\n    name: uses $DEPLOY_TOKEN\n    env:\n      DEPLOY_TOKEN: step-level-s3cret\n      PLAIN: shown\n";
    let result = agent
        .executor
        .run(&job(pipeline), &rec, &JobControl::new())
        .await;
    assert_eq!(result.status, JobStatus::Success, "{result:?}");
    assert_eq!(result.stdout, "[MASKED] / shown\n");
    let streamed = String::from_utf8(rec.stream(OutputStream::Stdout)).unwrap();
    assert_eq!(streamed, "[MASKED] / shown\n");
    assert!(!format!("{result:?}").contains("step-level-s3cret"));
    agent.assert_clean().await;
}

/// A bare repository `repo.git` in a temporary directory, with nested files, as a `file://`
/// URL (made with the `git` CLI).
fn nested_repository() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(work.join("sub/dir")).unwrap();
    std::fs::write(work.join("README.md"), "one\n").unwrap();
    std::fs::write(work.join("sub/dir/file.txt"), "nested\n").unwrap();
    std::fs::write(work.join("sub/gone.txt"), "delete me\n").unwrap();
    std::fs::write(work.join("run.sh"), "#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(
        work.join("run.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let git = |cwd: &std::path::Path, args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(["-c", "user.name=T", "-c", "user.email=t@example.invalid"])
            .args([
                "-c",
                "init.defaultBranch=main",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .current_dir(cwd)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .output()
            .expect("the `git` CLI builds the fixture");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    git(&work, &["init", "-q"]);
    git(&work, &["add", "."]);
    git(&work, &["commit", "-qm", "one"]);
    git(dir.path(), &["clone", "-q", "--bare", "work", "repo.git"]);
    let url = format!("file://{}", dir.path().join("repo.git").display());
    (dir, url)
}

/// Passes whoever the agent runs as: root (the checkout is handed to the job's user) or not
/// (the checkout is opened to it), as the packaged agent runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_creates_changes_and_deletes_files_anywhere_in_its_checkout() {
    let (_repo, url) = nested_repository();
    let agent = test_agent("checkout-writable", |s| s.checkout.allow_file_urls = true).await;
    let script = "echo changed > README.md && echo more >> sub/dir/file.txt && echo new > sub/dir/new.txt && rm sub/gone.txt && mkdir sub/dir/made && mv run.sh sub/ && ./sub/run.sh && cat README.md sub/dir/file.txt && echo x > .git/job-note && rm -r .git/objects";
    let mut spec = job(&format!("version: 1\nsteps:\n  - run: {script}\n"));
    spec.git_url = Some(url);
    let result = agent.run(&spec).await;
    assert_eq!(result.status, JobStatus::Success, "{result:?}");
    assert_eq!(result.stdout, "ran\nchanged\nnested\nmore\n");
    agent.assert_clean().await;
}

/// What the job made, closed to everyone but its user: only the job's user may delete it when
/// the agent is not root.
const CLOSED_TREE: &str =
    "mkdir -p a/b/c && echo x > a/b/c/f && chmod 700 a/b/c a/b && chmod 500 a";

#[tokio::test]
async fn no_workspace_is_left_after_an_abort_a_cancel_or_a_fork_bomb() {
    let agent = test_agent("endings", |s| {
        s.docker.pids_limit = 40;
        s.job.stop_grace_seconds = 1;
    })
    .await;
    for (kind, after) in [("abort", 1), ("cancel", 1)] {
        let control = JobControl::new();
        let stopper = control.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(after)).await;
            match kind {
                "abort" => stopper.abort("lease lost"),
                _ => stopper.cancel("the API asked"),
            }
        });
        let spec = job(&format!(
            "version: 1\nsteps:\n  - run: {CLOSED_TREE} && trap '' TERM && sleep 60\n"
        ));
        let result = agent.executor.run(&spec, &Discard, &control).await;
        assert_eq!(result.status, JobStatus::Cancelled, "{kind}: {result:?}");
        agent.assert_clean().await;
    }
    // A fork bomb at the pids limit: no exec can start in its container any more.
    let mut bomb = job(&format!(
        "version: 1\nsteps:\n  - run: {CLOSED_TREE} && f() {{ f | f & }}; f; sleep 60\n"
    ));
    bomb.timeout_seconds = Some(3);
    let result = agent.run(&bomb).await;
    assert_eq!(result.status, JobStatus::Timeout, "{result:?}");
    agent.assert_clean().await;
    // Two steps (an exec-shaped container), aborted while the second runs.
    let control = JobControl::new();
    let stopper = control.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        stopper.abort("lease lost");
    });
    let spec = job(&format!(
        "version: 1\nsteps:\n  - run: {CLOSED_TREE}\n  - run: sleep 60\n"
    ));
    let result = agent.executor.run(&spec, &Discard, &control).await;
    assert_eq!(result.status, JobStatus::Cancelled, "{result:?}");
    agent.assert_clean().await;
}

/// Counts the job's output: a stop can then land in the middle of a flood of it.
#[derive(Default)]
struct Flow(std::sync::atomic::AtomicU64);

impl gryt_agent::executor::JobObserver for Flow {
    fn output(&self, _: OutputStream, data: &[u8]) {
        self.0
            .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs a job that prints without end, calls `stop` once 4 MiB came out, and returns its
/// result. Docker ends a container only once its attached output has been read: a stop that
/// waited for its `docker exec` or kill without reading the output waited forever (with a
/// kill, always; with SIGTERM, when the signalling exec died with the container).
async fn stop_a_flood(test: &str, stop: fn(&JobControl)) -> gryt_agent::wire::JobResult {
    let agent = test_agent(test, |s| s.job.stop_grace_seconds = 2).await;
    let flow = std::sync::Arc::new(Flow::default());
    let control = JobControl::new();
    let (seen, stopper) = (flow.clone(), control.clone());
    tokio::spawn(async move {
        while seen.0.load(std::sync::atomic::Ordering::Relaxed) < 4 * 1024 * 1024 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop(&stopper);
    });
    let flood = job("version: 1\nsteps:\n  - run: yes 0123456789\n");
    // Generous: the job ends in seconds; the bug made it wait for ever.
    let result = tokio::time::timeout(
        Duration::from_secs(120),
        agent.executor.run(&flood, &*flow, &control),
    )
    .await
    .expect("the stopped job never ended");
    agent.assert_clean().await;
    result
}

#[tokio::test]
async fn an_abort_while_the_job_floods_its_output_ends_it() {
    let result = stop_a_flood("flood-abort", |c| c.abort("lease lost")).await;
    assert_eq!(result.status, JobStatus::Cancelled, "{result:?}");
    assert_eq!(result.error.as_deref(), Some("job aborted: lease lost"));
}

#[tokio::test]
async fn a_cancel_while_the_job_floods_its_output_ends_it() {
    for _ in 0..5 {
        let result = stop_a_flood("flood-cancel", |c| c.cancel("disk full")).await;
        assert_eq!(result.status, JobStatus::Cancelled, "{result:?}");
        assert_eq!(result.error.as_deref(), Some("job cancelled: disk full"));
    }
}

/// The result comes before the cleanup: `run_then_clean` returns while the job's container, its
/// network and its workspace still exist (the handle has not let the cleanup start), the
/// executor counts the cleanup as pending, and once the cleanup is finished nothing is left,
/// at once.
#[tokio::test]
async fn the_result_comes_before_the_cleanup_which_then_leaves_nothing() {
    let agent = test_agent("early-result", |_| {}).await;
    let spec = job("version: 1\nsteps:\n  - run: echo early\n  - run: echo done\n");
    let (result, cleanup) = agent
        .executor
        .run_then_clean(&spec, &Discard, &JobControl::new())
        .await;
    assert_eq!(result.status, JobStatus::Success, "{result:?}");
    assert_eq!(result.stdout, "early\ndone\n");
    assert_eq!(agent.containers().await.len(), 1, "the job's container");
    assert_eq!(support::networks_of(&agent.agent_id).await.len(), 1);
    assert_eq!(std::fs::read_dir(agent.work_dir.path()).unwrap().count(), 1);
    assert_eq!(agent.executor.pending_cleanups(), 1);
    assert!(!cleanup.is_finished());

    cleanup.finish().await;
    assert_eq!(agent.executor.pending_cleanups(), 0);
    agent.assert_clean_now().await;
}

/// A cleanup handle dropped unfinished starts the cleanup, which the executor tracks:
/// `cleanups_done` returns once it ended, with nothing left.
#[tokio::test]
async fn a_dropped_cleanup_runs_and_the_executor_waits_for_it() {
    let agent = test_agent("early-dropped", |_| {}).await;
    let spec = job("version: 1\nsteps:\n  - run: echo dropped\n");
    let (result, cleanup) = agent
        .executor
        .run_then_clean(&spec, &Discard, &JobControl::new())
        .await;
    assert_eq!(result.status, JobStatus::Success, "{result:?}");
    drop(cleanup);
    tokio::time::timeout(Duration::from_secs(60), agent.executor.cleanups_done())
        .await
        .expect("the dropped cleanup never ended");
    assert_eq!(agent.executor.pending_cleanups(), 0);
    agent.assert_clean_now().await;
}

/// A job that ended before its workspace existed (its image is missing) leaves nothing to clean: its handle is finished
/// at once.
#[tokio::test]
async fn a_job_that_ended_before_its_workspace_has_nothing_to_clean() {
    let agent = test_agent("early-refused", |_| {}).await;
    let mut spec = job("version: 1\nsteps:\n  - run: true\n");
    spec.docker_image = Some("gryt-agent-test/does-not-exist:1".into());
    let (result, cleanup) = agent
        .executor
        .run_then_clean(&spec, &Discard, &JobControl::new())
        .await;
    assert_eq!(result.status, JobStatus::Error, "{result:?}");
    assert!(cleanup.is_finished());
    assert_eq!(agent.executor.pending_cleanups(), 0);
    cleanup.finish().await;
    agent.assert_clean().await;
}
