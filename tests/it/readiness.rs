//! An agent that cannot run jobs takes none: with Docker unreachable, its directories removed or
//! unmakeable, or its file descriptors nearly exhausted, it leases nothing (pull), answers 503
//! with `Retry-After` (push), and says why on `/health` and in the metrics. The real agent
//! binary, the conformance fake of the API and the real Docker engine.

use crate::fake_api;
use crate::support;

use std::process::Command;
use std::time::{Duration, Instant};

use fake_api::FakeApi;
use serde_json::Value;
use support::process::Agent;
use support::process::pull::KEY;
use support::process::push::KEY as PUSH_KEY;
use support::{shell_job, unique_agent_id};

/// Waits until `/health` says `status`; returns it.
async fn wait_health(agent: &Agent, status: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health = agent.health().await;
        if health["status"] == status {
            return health;
        }
        assert!(
            Instant::now() < deadline,
            "health never became {status}: {health}\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The job stays queued at the API for `time` (the agent leased nothing).
async fn assert_not_leased(api: &FakeApi, time: Duration) {
    let until = Instant::now() + time;
    while Instant::now() < until {
        assert_eq!(
            api.queued(),
            1,
            "a job was leased by an agent that cannot run it"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn pull_with_docker_unreachable_leases_nothing_and_says_why() {
    let api = FakeApi::start(KEY, 30).await;
    api.push_job(shell_job(1, "echo never"));
    let agent = Agent::pull(
        "ready-docker",
        &api.url,
        &[],
        &[("DOCKER_HOST", "unix:///nonexistent/docker.sock")],
    )
    .await;
    agent.wait_ready().await;
    let health = wait_health(&agent, "degraded").await;
    assert_eq!(health["docker_available"], false);
    assert!(
        health["reasons"]
            .to_string()
            .contains("the Docker engine does not answer"),
        "{health}"
    );
    // Several rounds of the lease loop: no lease call at all, the job stays at the API.
    assert_not_leased(&api, Duration::from_secs(7)).await;
    assert_eq!(api.count("lease"), 0);
    let metrics = agent.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("gryt_agent_not_ready{cause=\"docker\"} 1"),
        "{metrics}"
    );
    assert!(agent.log_text().contains("cannot run jobs now"));
}

#[tokio::test]
async fn directories_removed_under_a_running_agent_are_made_again_or_stop_the_leasing() {
    let api = FakeApi::start(KEY, 30).await;
    let (state, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let agent_id = unique_agent_id("ready-dirs");
    let agent = Agent::pull_in(&agent_id, state.path(), work.path(), &api.url, &[], &[]).await;
    agent.wait_ready().await;
    wait_health(&agent, "healthy").await;
    let spool = state.path().join("spool");
    assert!(spool.is_dir());

    // Removed: made again within a few seconds, and the next job runs as usual.
    std::fs::remove_dir_all(&spool).unwrap();
    std::fs::remove_dir_all(work.path()).unwrap();
    let removed = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !(spool.is_dir() && work.path().is_dir()) {
        assert!(
            Instant::now() < deadline,
            "the removed directories were not made again\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "directories made again {:.1?} after removal",
        removed.elapsed()
    );
    api.push_job(shell_job(1, "echo after-removal"));
    api.wait_for("job 1 completed", Duration::from_secs(60), |a| {
        a.job(1).completion.is_some()
    })
    .await;
    let done = api.job(1).completion.unwrap();
    assert_eq!(done["status"], "success", "{done}");
    assert_eq!(done["stdout"], "after-removal\n");

    // Cannot be made again (a file in its place): no lease, and /health says which directory.
    std::fs::remove_dir_all(work.path()).unwrap();
    std::fs::write(work.path(), "not a directory").unwrap();
    let not_leasing = agent.log_text().matches("not leasing").count();
    let blocked = Instant::now();
    let health = wait_health(&agent, "degraded").await;
    println!(
        "a file in the work dir's place: degraded {:.1?} after",
        blocked.elapsed()
    );
    assert!(
        health["reasons"].to_string().contains("is not a directory"),
        "{health}"
    );
    // The lease loop has seen it (a long poll begun before may still hand out a job: the job
    // is queued only once the loop stopped asking).
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.log_text().matches("not leasing").count() == not_leasing {
        assert!(Instant::now() < deadline, "{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    api.push_job(shell_job(2, "echo once-fixed"));
    assert_not_leased(&api, Duration::from_secs(7)).await;
    let metrics = agent.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("gryt_agent_not_ready{cause=\"directories\"} 1"),
        "{metrics}"
    );

    // Fixed: the agent takes the job.
    std::fs::remove_file(work.path()).unwrap();
    wait_health(&agent, "healthy").await;
    api.wait_for("job 2 completed", Duration::from_secs(60), |a| {
        a.job(2).completion.is_some()
    })
    .await;
    assert_eq!(api.job(2).completion.unwrap()["status"], "success");
    agent.assert_clean().await;
}

/// Sets the agent's soft `RLIMIT_NOFILE` with `prlimit` (the soft one only: raising it back
/// needs no privilege).
fn set_descriptor_limit(pid: u32, limit: u64) {
    let status = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={limit}:")])
        .status()
        .expect("prlimit (util-linux) is needed");
    assert!(status.success(), "prlimit failed");
}

fn open_descriptors(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64
}

#[tokio::test]
async fn descriptors_nearly_exhausted_take_no_job() {
    let agent = Agent::push("ready-fds", &[]).await;
    wait_health(&agent, "healthy").await;
    // Leave the agent 20 free descriptors: enough to answer, too few for a job.
    let limit = open_descriptors(agent.pid()) + 20;
    set_descriptor_limit(agent.pid(), limit);
    let lowered = Instant::now();
    let health = wait_health(&agent, "degraded").await;
    println!(
        "descriptor limit {limit}: degraded {:.1?} after",
        lowered.elapsed()
    );
    assert!(
        health["reasons"]
            .to_string()
            .contains("file descriptors free"),
        "{health}"
    );
    let body = shell_job(1, "echo hello").to_string();
    let response = agent.execute(Some(PUSH_KEY), body.clone()).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().get("retry-after").is_some());
    let metrics = agent.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("gryt_agent_not_ready{cause=\"descriptors\"} 1"),
        "{metrics}"
    );

    // Descriptors back: jobs run again.
    set_descriptor_limit(agent.pid(), 4096);
    wait_health(&agent, "healthy").await;
    let response = agent.execute(Some(PUSH_KEY), body).await;
    assert_eq!(response.status(), 200);
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["status"], "success", "{result}");
    agent.assert_clean().await;
}
