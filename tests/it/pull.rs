//! Pull mode end to end: the real agent binary against the conformance fake of the API, with the
//! real Docker engine. Every test checks that no container and no workspace is left.

use crate::fake_api;
use crate::support;

use std::process::Command;
use std::time::{Duration, Instant};

use fake_api::FakeApi;
use serde_json::{Value, json};
use support::process::Agent;
use support::process::pull::KEY;
use support::{b64, containers_of, shell_job, test_image, unique_agent_id};

fn job(id: i64, pipeline: &str) -> Value {
    json!({"job_id": id, "pipeline_b64": b64(pipeline)})
}

#[tokio::test]
async fn a_job_end_to_end_with_once() {
    let api = FakeApi::start(KEY, 30).await;
    // stdout and stderr interleaved, a multi-byte character, no trailing newline at the end.
    api.push_job(shell_job(
        1,
        "echo 'héllo €'; sleep 0.3; echo to-err >&2; sleep 0.3; printf 'last'",
    ));
    let mut agent = Agent::pull(
        "e2e",
        &api.url,
        &["--once"],
        &[("GRYT_AGENT_LABELS", "linux,x86")],
    )
    .await;
    assert_eq!(
        agent.wait_exit(Duration::from_secs(60)).await,
        0,
        "{}",
        agent.log_text()
    );

    let rec = api.job(1);
    let done = rec.completion.clone().expect("no completion");
    assert_eq!(done["status"], "success", "{done}");
    assert_eq!(done["stdout"], "héllo €\nlast");
    assert_eq!(rec.log, "héllo €\nto-err\nlast");
    assert_eq!(done["log_bytes"], rec.log.len());
    assert_eq!(rec.completes_accepted, 1);

    let reqs = api.requests();
    let calls: Vec<&str> = reqs
        .iter()
        .filter(|r| r.job_id == Some(1) && r.call != "heartbeat")
        .map(|r| r.call.as_str())
        .collect();
    assert_eq!(calls.first(), Some(&"start"));
    assert_eq!(calls.last(), Some(&"complete"));
    assert!(calls.contains(&"logs"));
    let lease = &reqs[0];
    assert_eq!(lease.call, "lease");
    assert_eq!(lease.body["agent_id"], agent.agent_id.as_str());
    assert_eq!(lease.body["labels"], json!(["linux", "x86"]));
    assert_eq!(lease.body["capacity"], 1);
    assert_eq!(lease.body["wait_seconds"], 2);
    for r in &reqs {
        assert_eq!(
            r.authorization.as_deref(),
            Some(format!("Bearer {KEY}").as_str())
        );
        assert!(r.user_agent.as_deref().unwrap().starts_with("gryt-agent/"));
    }
    // --once: exactly one lease, nothing after the completion.
    assert_eq!(api.count("lease"), 1);
    assert!(
        !agent.log_text().contains(KEY),
        "the key must never be logged"
    );
    assert!(agent.spooled_results().is_empty());
    agent.assert_clean().await;
}

#[tokio::test]
async fn idle_long_poll_is_no_busy_loop_and_idle_exit_exits() {
    let api = FakeApi::start(KEY, 30).await;
    let started = Instant::now();
    let mut agent = Agent::pull("idle", &api.url, &["--idle-exit", "5"], &[]).await;
    assert_eq!(
        agent.wait_exit(Duration::from_secs(20)).await,
        0,
        "{}",
        agent.log_text()
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(12),
        "{took:?}"
    );
    // Lease wait is 2 s: over ~5 s that is at most 3 or 4 polls, not a busy loop.
    let leases = api.count("lease");
    assert!((1..=4).contains(&leases), "{leases} lease requests");
    agent.assert_clean().await;
}

#[tokio::test]
async fn twenty_jobs_with_concurrency_four_and_max_jobs() {
    let api = FakeApi::start(KEY, 30).await;
    for id in 1..=20 {
        api.push_job(shell_job(id, &format!("sleep 0.5; echo job-{id}")));
    }
    // One more than --max-jobs: it must never be leased.
    api.push_job(shell_job(21, "echo never"));
    let mut agent = Agent::pull(
        "many",
        &api.url,
        &["--max-jobs", "20"],
        &[("GRYT_CONCURRENCY", "4")],
    )
    .await;
    assert_eq!(
        agent.wait_exit(Duration::from_secs(150)).await,
        0,
        "{}",
        agent.log_text()
    );
    assert!(api.max_running() <= 4, "{} at once", api.max_running());
    assert!(api.max_running() >= 2, "jobs never overlapped");
    for id in 1..=20 {
        let rec = api.job(id);
        let done = rec
            .completion
            .unwrap_or_else(|| panic!("job {id} not completed"));
        assert_eq!(done["status"], "success");
        assert_eq!(rec.completes_accepted, 1);
        assert_eq!(rec.log, format!("job-{id}\n"));
    }
    assert_eq!(api.queued(), 1, "job 21 was leased");
    for r in api.requests().iter().filter(|r| r.call == "lease") {
        let cap = r.body["capacity"].as_u64().unwrap();
        assert!((1..=4).contains(&cap), "capacity {cap}");
    }
    agent.assert_clean().await;
}

#[tokio::test]
async fn faults_on_every_call_still_deliver_everything_once() {
    let api = FakeApi::start(KEY, 30).await;
    for id in 1..=3 {
        api.push_job(shell_job(
            id,
            &format!("for i in 1 2 3; do echo line-$i-{id}; sleep 0.4; done"),
        ));
    }
    api.faults(|f| {
        for call in ["lease", "start", "heartbeat", "logs", "complete"] {
            f.errors.insert(call.into(), 2);
            f.drops.insert(call.into(), 1);
        }
        f.retry_after = Some(1);
        f.lower_committed = 2;
        f.slow = Some(Duration::from_millis(300));
    });
    let mut agent = Agent::pull("faults", &api.url, &["--max-jobs", "3"], &[]).await;
    assert_eq!(
        agent.wait_exit(Duration::from_secs(120)).await,
        0,
        "{}",
        agent.log_text()
    );
    for id in 1..=3 {
        let rec = api.job(id);
        let done = rec
            .completion
            .unwrap_or_else(|| panic!("job {id} not completed"));
        assert_eq!(done["status"], "success");
        assert_eq!(rec.log, format!("line-1-{id}\nline-2-{id}\nline-3-{id}\n"));
        assert_eq!(done["log_bytes"], rec.log.len());
    }
    // Retry-After: 1 was honoured: retries after an injected 503 came no sooner than ~1 s.
    let reqs = api.requests();
    let outage = reqs
        .iter()
        .position(|r| r.call == "lease" && r.status == 503)
        .expect("no injected 503");
    let retry = reqs[outage + 1..]
        .iter()
        .find(|r| r.call == "lease")
        .unwrap();
    assert!(
        retry.at - reqs[outage].at >= Duration::from_millis(900),
        "Retry-After ignored"
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn cancel_from_the_api_stops_the_job_within_a_heartbeat() {
    let api = FakeApi::start(KEY, 3).await;
    api.push_job(shell_job(1, "echo started; sleep 60"));
    let mut agent = Agent::pull("cancel", &api.url, &["--once"], &[]).await;
    api.wait_for("job output", Duration::from_secs(30), |a| {
        a.job(1).log.contains("started")
    })
    .await;
    let asked = Instant::now();
    api.faults(|f| {
        f.cancel.insert(1);
    });
    loop {
        if containers_of(&agent.agent_id).await.is_empty() {
            break;
        }
        // One heartbeat (1 s) plus the stop grace (1 s) plus slack.
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "container still there"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(agent.wait_exit(Duration::from_secs(30)).await, 0);
    let done = api.job(1).completion.expect("no completion");
    assert_eq!(done["status"], "cancelled", "{done}");
    // The text docs/protocol.md gives, exactly.
    assert_eq!(
        done["error"], "job cancelled: cancelled by the API",
        "{done}"
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn a_lost_lease_kills_the_job_and_sends_nothing_more() {
    let api = FakeApi::start(KEY, 3).await;
    api.push_job(shell_job(1, "echo started; sleep 60"));
    let mut agent = Agent::pull("lost", &api.url, &[], &[]).await;
    api.wait_for("job output", Duration::from_secs(30), |a| {
        a.job(1).log.contains("started")
    })
    .await;
    let revoked = Instant::now();
    api.faults(|f| {
        f.revoke.insert(1);
    });
    loop {
        if containers_of(&agent.agent_id).await.is_empty() {
            break;
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(4),
            "container still there"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Give the agent time to (wrongly) send more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reqs = api.requests();
    let first_lost = reqs
        .iter()
        .find(|r| r.job_id == Some(1) && r.status == 410)
        .expect("no heartbeat saw the revoked lease")
        .at;
    let after: Vec<_> = reqs
        .iter()
        .filter(|r| r.job_id == Some(1) && r.at > first_lost + Duration::from_millis(500))
        .collect();
    assert!(after.is_empty(), "calls after the loss: {after:?}");
    assert!(api.job(1).completion.is_none());
    assert_eq!(api.count("complete"), 0);
    assert!(agent.running(), "the agent must survive a lost lease");
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(20)).await, 0);
    assert!(agent.spooled_results().is_empty());
    agent.assert_clean().await;
}

#[tokio::test]
async fn a_refused_start_means_the_job_is_not_run() {
    let api = FakeApi::start(KEY, 30).await;
    api.push_job(shell_job(1, "echo must-not-run"));
    api.push_job(shell_job(2, "echo ok"));
    api.faults(|f| {
        f.refuse_start.insert(1);
    });
    let mut agent = Agent::pull("refused", &api.url, &["--once"], &[]).await;
    assert_eq!(
        agent.wait_exit(Duration::from_secs(60)).await,
        0,
        "{}",
        agent.log_text()
    );
    let calls: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| r.job_id == Some(1))
        .map(|r| r.call)
        .collect();
    assert_eq!(calls, ["start"]);
    assert_eq!(api.job(1).log, "");
    // --once counts jobs run: the refused one does not count, job 2 runs.
    assert_eq!(api.job(2).completion.unwrap()["status"], "success");
    agent.assert_clean().await;
}

#[tokio::test]
async fn a_result_survives_sigkill_in_the_spool() {
    let api = FakeApi::start(KEY, 60).await;
    api.push_job(shell_job(1, "echo spooled"));
    api.faults(|f| f.complete_down = true);
    // The test keeps the directories: the restarted agent gets the same ones.
    let (state, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let agent_id = unique_agent_id("spool");
    let start = || Agent::pull_in(&agent_id, state.path(), work.path(), &api.url, &[], &[]);
    let mut agent = start().await;
    api.wait_for("a complete attempt", Duration::from_secs(60), |a| {
        a.count("complete") > 0
    })
    .await;
    assert_eq!(agent.spooled_results().len(), 1);
    agent.signal("KILL");
    agent.wait_exit(Duration::from_secs(10)).await;
    assert!(api.job(1).completion.is_none());
    api.faults(|f| f.complete_down = false);

    drop(agent);
    let mut agent = start().await;
    api.wait_for("the spooled result", Duration::from_secs(30), |a| {
        a.job(1).completion.is_some()
    })
    .await;
    let rec = api.job(1);
    assert_eq!(rec.completion.unwrap()["status"], "success");
    assert_eq!(rec.log, "spooled\n");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(agent.spooled_results().is_empty());
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(20)).await, 0);
    agent.assert_clean().await;
}

#[tokio::test]
async fn sigterm_lets_the_running_job_finish_and_leases_nothing_more() {
    let api = FakeApi::start(KEY, 30).await;
    api.push_job(shell_job(1, "echo begin; sleep 3; echo end"));
    let mut agent = Agent::pull("drain", &api.url, &[], &[]).await;
    api.wait_for("job output", Duration::from_secs(30), |a| {
        a.job(1).log.contains("begin")
    })
    .await;
    api.push_job(shell_job(2, "echo never"));
    let leases = api.count("lease");
    agent.signal("TERM");
    assert_eq!(
        agent.wait_exit(Duration::from_secs(30)).await,
        0,
        "{}",
        agent.log_text()
    );
    let rec = api.job(1);
    assert_eq!(rec.completion.unwrap()["status"], "success");
    assert_eq!(rec.log, "begin\nend\n");
    assert_eq!(api.count("lease"), leases, "leased after SIGTERM");
    assert_eq!(api.queued(), 1);
    agent.assert_clean().await;
}

#[tokio::test]
async fn a_second_signal_cancels_at_once() {
    let api = FakeApi::start(KEY, 30).await;
    api.push_job(shell_job(1, "echo begin; sleep 60"));
    let mut agent = Agent::pull("second", &api.url, &[], &[]).await;
    api.wait_for("job output", Duration::from_secs(30), |a| {
        a.job(1).log.contains("begin")
    })
    .await;
    agent.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(agent.running());
    let second = Instant::now();
    agent.signal("INT");
    assert_eq!(
        agent.wait_exit(Duration::from_secs(20)).await,
        0,
        "{}",
        agent.log_text()
    );
    assert!(second.elapsed() < Duration::from_secs(10));
    let done = api
        .job(1)
        .completion
        .expect("the cancelled job is still reported");
    assert_eq!(done["status"], "cancelled");
    assert_eq!(
        done["error"], "job aborted: the agent was stopped (second signal)",
        "{done}"
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn shutdown_timeout_cancels_with_a_reason() {
    let api = FakeApi::start(KEY, 30).await;
    api.push_job(shell_job(1, "echo begin; sleep 60"));
    let mut agent = Agent::pull("timeout", &api.url, &[], &[("GRYT_SHUTDOWN_TIMEOUT", "1")]).await;
    api.wait_for("job output", Duration::from_secs(30), |a| {
        a.job(1).log.contains("begin")
    })
    .await;
    agent.signal("TERM");
    assert_eq!(
        agent.wait_exit(Duration::from_secs(20)).await,
        0,
        "{}",
        agent.log_text()
    );
    let done = api.job(1).completion.expect("no completion");
    assert_eq!(done["status"], "cancelled");
    assert_eq!(
        done["error"], "job cancelled: the agent shut down",
        "{done}"
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn bad_credentials_degrade_health_without_a_crash_or_a_flood() {
    let api = FakeApi::start("the-right-key-that-the-agent-lacks", 30).await;
    let mut agent = Agent::pull("creds", &api.url, &[], &[]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let health = agent.health().await;
    assert_eq!(health["status"], "degraded", "{health}");
    let reasons = health["reasons"].to_string();
    assert!(reasons.contains("401"), "{reasons}");
    assert!(!health.to_string().contains(KEY));
    assert!(agent.running());
    let leases = api.count("lease");
    assert!((1..=2).contains(&leases), "{leases} lease requests in 3 s");
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(10)).await, 0);
    assert_eq!(agent.log_text().matches("credentials problem").count(), 1);
    assert!(!agent.log_text().contains(KEY));
    agent.assert_clean().await;
}

#[tokio::test]
async fn plain_http_to_a_non_loopback_host_is_refused_before_any_connection() {
    let api = FakeApi::start(KEY, 30).await;
    let started = Instant::now();
    // 192.0.2.1 (TEST-NET-1) is only a string here: the URL check refuses it before connecting.
    let mut agent = Agent::pull(
        "insecure",
        &api.url,
        &[],
        &[("GRYT_API_URL", "http://192.0.2.1:8000")],
    )
    .await;
    let code = agent.wait_exit(Duration::from_secs(10)).await;
    assert_ne!(code, 0);
    assert!(started.elapsed() < Duration::from_secs(5));
    let log = agent.log_text();
    assert!(log.contains("allow_insecure_http"), "{log}");
    assert!(!log.contains(KEY));
}

#[tokio::test]
async fn too_little_free_disk_means_no_lease_and_a_degraded_health() {
    let api = FakeApi::start(KEY, 30).await;
    api.push_job(job(90, "version: 1\nsteps:\n  - run: echo never\n"));
    // More free space than any disk has: the guard must hold the agent back.
    let mut agent = Agent::pull(
        "disk-guard",
        &api.url,
        &[],
        &[("GRYT_MIN_FREE_DISK_MB", "1000000000000")],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let health = agent.health().await;
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(
        health["reasons"].to_string().contains("min_free_disk_mb"),
        "{health}"
    );
    assert_eq!(api.count("lease"), 0, "leased with a full disk");
    assert_eq!(api.queued(), 1);
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(10)).await, 0);
    agent.assert_clean().await;
}

#[tokio::test]
async fn check_makes_one_authenticated_call_and_says_what_to_fix() {
    let api = FakeApi::start(KEY, 30).await;
    let image = test_image().await;
    let state = tempfile::tempdir().unwrap();
    let run = |key: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gryt-agent"));
        cmd.arg("check")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("GRYT_API_URL", &api.url)
            .env("AGENT_API_KEY", key)
            .env("GRYT_DOCKER_IMAGE", &image)
            .env("GRYT_PULL_POLICY", "never")
            .env("GRYT_STATE_DIR", state.path());
        cmd
    };
    let mut good = run(KEY);
    let out = tokio::task::spawn_blocking(move || good.output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("[ok]   the API at"), "{text}");
    assert_eq!(api.count("lease"), 0, "check must never lease");
    assert_eq!(api.count("heartbeat"), 1);

    let mut bad = run("a-key-the-api-does-not-know-0123456789");
    let out = tokio::task::spawn_blocking(move || bad.output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("[FAIL]") && text.contains("refused this agent's key"),
        "{text}"
    );
    assert!(
        !text.contains("a-key-the-api-does-not-know"),
        "the key was printed: {text}"
    );
}

#[tokio::test]
async fn state_dir_and_spool_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let api = FakeApi::start(KEY, 60).await;
    api.push_job(shell_job(1, "echo private"));
    api.faults(|f| f.complete_down = true);
    let (state, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // A state dir others may read: the agent tightens it.
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut agent = Agent::pull_in(
        &unique_agent_id("private"),
        state.path(),
        work.path(),
        &api.url,
        &[],
        &[],
    )
    .await;
    api.wait_for("a complete attempt", Duration::from_secs(60), |a| {
        a.count("complete") > 0
    })
    .await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(state.path()), 0o700);
    assert_eq!(mode(&state.path().join("spool")), 0o700);
    let files = agent.spool_files();
    assert!(
        files
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "log")),
        "{files:?}"
    );
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    agent.signal("KILL");
    agent.wait_exit(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_push_job_runs_while_pull_waits_for_a_lease() {
    // Push mode wants a key of 32+ characters.
    const LONG_KEY: &str = "pull-and-push-key-0123456789abcdef0123";
    let api = FakeApi::start(LONG_KEY, 30).await;
    let mut agent = Agent::pull(
        "push-pull",
        &api.url,
        &[],
        &[
            ("AGENT_API_KEY", LONG_KEY),
            ("GRYT_PUSH", "true"),
            ("GRYT_LEASE_WAIT", "20"),
        ],
    )
    .await;
    agent.wait_ready().await;
    api.wait_for("a long poll", Duration::from_secs(20), |a| {
        a.count("lease") > 0
    })
    .await;
    let health = agent.health().await;
    assert_eq!(health["free_slots"], 1, "{health}");
    let response = agent
        .execute(Some(LONG_KEY), shell_job(50, "echo pushed").to_string())
        .await;
    assert_eq!(response.status(), 200, "{}", agent.log_text());
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["status"], "success", "{result}");
    // And pull mode still takes work after it.
    api.push_job(shell_job(51, "echo pulled"));
    api.wait_for("the pulled job", Duration::from_secs(40), |a| {
        a.job(51).completion.is_some()
    })
    .await;
    assert_eq!(api.job(51).log, "pulled\n");
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(30)).await, 0);
    agent.assert_clean().await;
}

#[tokio::test]
async fn once_exits_non_zero_when_the_result_stays_in_the_spool() {
    let api = FakeApi::start(KEY, 30).await;
    api.push_job(shell_job(1, "echo kept"));
    api.faults(|f| f.reject_complete = true);
    let mut agent = Agent::pull("undelivered", &api.url, &["--once"], &[]).await;
    let code = agent.wait_exit(Duration::from_secs(60)).await;
    let log = agent.log_text();
    assert_eq!(code, 3, "{log}");
    assert!(log.contains("could not be delivered"), "{log}");
    assert_eq!(agent.spooled_results().len(), 1);
    assert!(api.job(1).completion.is_none());
}

#[tokio::test]
async fn zero_job_limits_are_refused() {
    let api = FakeApi::start(KEY, 30).await;
    for flag in ["--max-jobs", "--idle-exit"] {
        let mut agent = Agent::pull("zero", &api.url, &[flag, "0"], &[]).await;
        let code = agent.wait_exit(Duration::from_secs(10)).await;
        let log = agent.log_text();
        assert_eq!(code, 2, "{flag} 0: {log}");
        assert!(log.contains(flag) && log.contains("0"), "{log}");
    }
    assert_eq!(api.count("lease"), 0);
}

/// A tmpfs mounted for one test (tests run as root), unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .expect("cannot run mount");
        assert!(status.success(), "mounting a tmpfs needs root");
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_disk_that_fills_during_a_job_ends_it_with_error_and_loses_nothing_else() {
    let api = FakeApi::start(KEY, 30).await;
    // 20 MB of output into an 8 MiB spool.
    api.push_job(shell_job(
        1,
        "echo begin; yes 0123456789 | head -c 20000000; echo never",
    ));
    api.push_job(shell_job(2, "echo after"));
    let (state, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let _spool = Tmpfs::mount(&state.path().join("spool"), "8m");
    let mut agent = Agent::pull_in(
        &unique_agent_id("disk-full"),
        state.path(),
        work.path(),
        &api.url,
        &["--max-jobs", "2"],
        &[],
    )
    .await;
    assert_eq!(
        agent.wait_exit(Duration::from_secs(120)).await,
        0,
        "{}",
        agent.log_text()
    );
    let rec = api.job(1);
    let done = rec.completion.expect("job 1 not completed");
    assert_eq!(done["status"], "error", "{}", done["error"]);
    let error = done["error"].as_str().unwrap();
    assert!(error.contains("disk is full"), "{error}");
    assert!(rec.log.starts_with("begin\n"));
    assert!(
        rec.log.contains("[gryt-agent: the log is cut here"),
        "{}",
        &rec.log[rec.log.len().saturating_sub(300)..]
    );
    assert_eq!(done["log_bytes"], rec.log.len());
    assert!(!rec.log.contains("never"));
    // The next job runs and is reported as usual; the spool is empty again.
    assert_eq!(api.job(2).completion.unwrap()["status"], "success");
    assert_eq!(api.job(2).log, "after\n");
    assert!(agent.spooled_results().is_empty());
    agent.assert_clean().await;
}

#[tokio::test]
async fn a_leased_job_whose_slot_push_took_waits_for_it() {
    const LONG_KEY: &str = "pull-and-push-key-0123456789abcdef0123";
    let api = FakeApi::start(LONG_KEY, 30).await;
    let mut agent = Agent::pull(
        "slot-wait",
        &api.url,
        &[],
        &[
            ("AGENT_API_KEY", LONG_KEY),
            ("GRYT_PUSH", "true"),
            ("GRYT_LEASE_WAIT", "20"),
        ],
    )
    .await;
    agent.wait_ready().await;
    api.wait_for("a long poll", Duration::from_secs(20), |a| {
        a.count("lease") > 0
    })
    .await;
    // Push takes the only slot while pull waits in its long poll...
    let url = agent.url.clone();
    let pushed_at = Instant::now();
    let push = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("{url}/jobs/execute"))
            .header("content-type", "application/json")
            .header("X-API-Key", LONG_KEY)
            .body(shell_job(60, "echo pushed; sleep 3").to_string())
            .send()
            .await
            .unwrap()
    });
    let until = Instant::now() + Duration::from_secs(20);
    while agent.health().await["free_slots"] != 0 {
        assert!(Instant::now() < until, "the push job never took the slot");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...and the long poll then hands out a job: it waits for the slot, then runs.
    api.push_job(shell_job(61, "echo pulled"));
    api.wait_for("the pulled job", Duration::from_secs(60), |a| {
        a.job(61).completion.is_some()
    })
    .await;
    let response = push.await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        agent.log_text().contains("every slot was taken meanwhile"),
        "{}",
        agent.log_text()
    );
    let start = api
        .requests()
        .into_iter()
        .find(|r| r.call == "start" && r.job_id == Some(61))
        .unwrap();
    assert!(
        start.at - pushed_at >= Duration::from_millis(2500),
        "the pulled job started while the push job held the only slot"
    );
    assert_eq!(api.job(61).completion.unwrap()["status"], "success");
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(30)).await, 0);
    agent.assert_clean().await;
}

/// `/health`'s free slots, once it reports it as `want` (bounded: a slot is freed right after
/// the job's cleanup ends).
async fn wait_free_slots(agent: &Agent, want: u64) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let health = agent.health().await;
        if health["free_slots"] == want {
            return;
        }
        assert!(Instant::now() < until, "free slots stay at {health}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The result reaches the API before the job's container is gone: the cleanup starts once the
/// delivery ended (or `CLEANUP_WAITS_FOR_DELIVERY`, 5 s, after the result was spooled, far
/// beyond this check), so while the API refuses the completion (503, retried) the result has
/// been sent and the job's container and workspace are still there, its slot still taken.
/// Once the API takes the result, nothing is left and the slot is free again.
#[tokio::test]
async fn the_result_reaches_the_api_before_the_jobs_container_is_removed() {
    let api = FakeApi::start(KEY, 30).await;
    api.faults(|f| {
        f.refuse_complete.insert(1);
    });
    api.push_job(shell_job(1, "echo early"));
    let mut agent = Agent::pull("early-pull", &api.url, &[], &[]).await;
    api.wait_for("the result", Duration::from_secs(60), |a| {
        a.count("complete") >= 1
    })
    .await;
    let sent = api.requests().into_iter().find(|r| r.call == "complete");
    let sent = sent.expect("no complete recorded").body;
    assert_eq!(sent["status"], "success", "{sent}");
    assert_eq!(sent["stdout"], "early\n", "{sent}");
    assert_eq!(
        containers_of(&agent.agent_id).await.len(),
        1,
        "the job's container went before its result was delivered; log:\n{}",
        agent.log_text()
    );
    assert_eq!(agent.workspaces().len(), 1, "{:?}", agent.workspaces());
    assert_eq!(agent.health().await["free_slots"], 0);

    api.faults(|f| f.refuse_complete.clear());
    api.wait_for("the completion", Duration::from_secs(60), |a| {
        a.job(1).completion.is_some()
    })
    .await;
    agent.assert_clean().await;
    wait_free_slots(&agent, 1).await;
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(20)).await, 0);
}

/// An agent told to stop right after the API took a job's result exits with nothing left: the
/// drain waits for the job's cleanup, which follows its result.
#[tokio::test]
async fn an_agent_stopped_right_after_a_result_exits_with_nothing_left() {
    let api = FakeApi::start(KEY, 30).await;
    api.push_job(shell_job(1, "echo stop-after"));
    let mut agent = Agent::pull("early-term", &api.url, &[], &[]).await;
    api.wait_for("the completion", Duration::from_secs(60), |a| {
        a.job(1).completion.is_some()
    })
    .await;
    // No grace: the agent itself waited for the cleanup before it exited.
    agent.stop_leaving_nothing().await;
}

/// A result the API keeps refusing does not keep the job's container: once delivering took
/// `CLEANUP_WAITS_FOR_DELIVERY` (5 s) the cleanup starts meanwhile, and the slot stays taken
/// until the delivery ended too.
#[tokio::test]
async fn a_result_slow_to_deliver_does_not_keep_the_jobs_container() {
    let api = FakeApi::start(KEY, 30).await;
    api.faults(|f| {
        f.refuse_complete.insert(1);
    });
    api.push_job(shell_job(1, "echo slow"));
    let mut agent = Agent::pull("slow-deliver", &api.url, &[], &[]).await;
    api.wait_for("the result", Duration::from_secs(60), |a| {
        a.count("complete") >= 1
    })
    .await;
    let until = Instant::now() + Duration::from_secs(30);
    while !containers_of(&agent.agent_id).await.is_empty() || !agent.workspaces().is_empty() {
        assert!(
            Instant::now() < until,
            "the container waits for the delivery; log:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(api.job(1).completion.is_none(), "the API took the result");
    assert_eq!(agent.health().await["free_slots"], 0, "the slot went first");

    api.faults(|f| f.refuse_complete.clear());
    api.wait_for("the completion", Duration::from_secs(60), |a| {
        a.job(1).completion.is_some()
    })
    .await;
    wait_free_slots(&agent, 1).await;
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(20)).await, 0);
    agent.assert_clean_now().await;
}
