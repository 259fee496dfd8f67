//! Hand-over (SIGUSR2), with the real agent in pull mode against the fake API and a real Docker
//! engine: the agent exits 0 at once and leaves its running job as it is (container running,
//! workspace and lease record in place, nothing reported), for the next agent process to adopt;
//! also when it comes during a drain (SIGTERM).

use crate::fake_api;
use crate::support;

use std::time::{Duration, Instant};

use fake_api::FakeApi;
use support::process::Agent;
use support::process::pull::KEY;
use support::{containers_of, shell_job};

/// Whether the container runs now, as the engine says.
async fn is_running(id: &str) -> bool {
    let docker = support::docker().await;
    let inspect = docker.inspect_container(id, None).await.unwrap();
    inspect.state.and_then(|s| s.running) == Some(true)
}

/// An agent (fresh directories) running job 1, which prints and then sleeps for 5 minutes.
async fn agent_running_a_long_job(api: &FakeApi, test: &str) -> Agent {
    api.push_job(shell_job(1, "echo started-1; sleep 300"));
    let agent = Agent::pull(test, &api.url, &[], &[]).await;
    api.wait_for("the job running", Duration::from_secs(60), |a| {
        a.job(1).log.contains("started-1")
    })
    .await;
    agent
}

/// What a hand-over must leave of the job of [`agent_running_a_long_job`] once the agent exited:
/// its one container (`containers`) running, its workspace and lease record, and no result.
async fn assert_left_in_place(agent: &Agent, api: &FakeApi, containers: &[String]) {
    let log = agent.log_text();
    assert!(
        log.contains("handing over: exiting and leaving 1 running jobs to the next agent process"),
        "{log}"
    );
    // Still there a moment after the exit: nothing of the agent removes it in the background.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(containers_of(&agent.agent_id).await, containers, "{log}");
    assert!(
        is_running(&containers[0]).await,
        "the job's container stopped"
    );
    assert_eq!(agent.workspaces().len(), 1, "the job's workspace is gone");
    let leases: Vec<_> = agent
        .spool_files()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "lease"))
        .collect();
    assert_eq!(leases.len(), 1, "the job's lease record is gone");
    // The job was neither failed nor cancelled: nothing was reported for it.
    assert_eq!(api.job(1).completion, None);
    assert_eq!(api.count("complete"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_exits_at_once_and_leaves_the_running_job_in_place() {
    let api = FakeApi::start(KEY, 30).await;
    let mut agent = agent_running_a_long_job(&api, "hand-over").await;
    let agent_id = agent.agent_id.clone();
    let health = agent.health().await;
    assert_eq!(
        health["adopted"],
        serde_json::json!({"running": 0, "total": 0}),
        "{health}"
    );
    assert_eq!(health["running_jobs"], 1, "{health}");
    let containers = containers_of(&agent_id).await;
    assert_eq!(containers.len(), 1, "{containers:?}");

    agent.signal("USR2");
    let signalled = Instant::now();
    let code = agent.wait_exit(Duration::from_secs(5)).await;
    let exited_after = signalled.elapsed();
    assert_eq!(code, 0, "{}", agent.log_text());
    assert_left_in_place(&agent, &api, &containers).await;
    eprintln!(
        "hand-over: exit 0 {:.3} s after SIGUSR2, the job's container still running",
        exited_after.as_secs_f64()
    );

    // Dropping the agent removes what is labelled with its id (no next process adopts it here).
    drop(agent);
    assert_eq!(containers_of(&agent_id).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_during_a_drain_hands_over_instead_of_waiting() {
    let api = FakeApi::start(KEY, 30).await;
    let mut agent = agent_running_a_long_job(&api, "hand-over-drain").await;
    let containers = containers_of(&agent.agent_id).await;
    assert_eq!(containers.len(), 1, "{containers:?}");
    agent.signal("TERM");
    let until = Instant::now() + Duration::from_secs(5);
    while agent.health().await["draining"] != true {
        assert!(
            Instant::now() < until,
            "no drain; log:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(agent.running(), "the drain did not wait for the job");
    agent.signal("USR2");
    assert_eq!(
        agent.wait_exit(Duration::from_secs(5)).await,
        0,
        "{}",
        agent.log_text()
    );
    assert_left_in_place(&agent, &api, &containers).await;
}
