//! The warm pool with real Docker and the real agent (push mode): a job that fits runs in a
//! ready container with its own environment, limits and workspace; a container never serves two
//! jobs; jobs that do not fit start cold; the pool refills, is hardened like any job container,
//! is drained at stop, swept after a SIGKILL, and survives a container killed behind its back.

use crate::support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::query_parameters::{KillContainerOptions, ListContainersOptionsBuilder};
use serde_json::{Value, json};

use support::process::Agent;
use support::process::push::KEY;
use support::{containers_of, networks_of, unique_agent_id};

const POOL_ON: (&str, &str) = ("GRYT_WARM_POOL", "1");

/// This agent's ready warm containers (label `io.gryt.warm=true`), as `(id, job id label)`.
async fn warm_containers(agent_id: &str) -> Vec<(String, String)> {
    let filters = HashMap::from([(
        "label",
        vec![
            format!("io.gryt.agent.id={agent_id}"),
            "io.gryt.warm=true".to_owned(),
        ],
    )]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let listed = support::docker()
        .await
        .list_containers(Some(options))
        .await
        .unwrap();
    listed
        .into_iter()
        .map(|c| {
            let job = c.labels.unwrap_or_default()["io.gryt.job.id"].clone();
            (c.id.unwrap(), job)
        })
        .collect()
}

/// Waits until `/health` shows `ready` ready containers (up to 30 s) and returns the pool's
/// report.
async fn wait_ready(agent: &Agent, ready: u64) -> Value {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let pool = agent.health().await["warm_pool"].clone();
        if pool["ready"] == ready {
            return pool;
        }
        assert!(
            Instant::now() < until,
            "pool never had {ready} ready: {pool}; log:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs a one-step job printing its hostname (the short container id) and more; returns the
/// result.
async fn run(agent: &Agent, body: Value) -> Value {
    let response = agent.execute(Some(KEY), body.to_string()).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn hostname_job(id: i64) -> Value {
    json!({"job_id": id, "pipeline_b64": support::b64("version: 1\nsteps:\n  - run: hostname")})
}

fn hostname_of(result: &Value) -> String {
    assert_eq!(result["status"], "success", "{result}");
    result["stdout"].as_str().unwrap().trim().to_owned()
}

/// Stops the agent with SIGTERM and checks that nothing of it is left: no container, no
/// network, no workspace.
async fn stop_and_assert_nothing_left(mut agent: Agent) {
    agent.stop_leaving_nothing().await;
}

#[tokio::test]
async fn a_job_runs_in_the_warm_container_with_its_env_limits_and_workspace() {
    let agent = Agent::push("warm-run", &[POOL_ON]).await;
    let pool = wait_ready(&agent, 1).await;
    assert_eq!(pool, json!({"target": 1, "ready": 1}));
    let warm = warm_containers(&agent.agent_id).await;
    assert_eq!(warm.len(), 1, "{warm:?}");
    let (id, job_label) = &warm[0];
    assert!(job_label.starts_with("warm-"), "{job_label}");
    // Hardened like any job container, on a job network of its own.
    let docker = support::docker().await;
    let inspect = docker.inspect_container(id, None).await.unwrap();
    support::audit_container(id, &inspect);
    let network = inspect
        .host_config
        .as_ref()
        .unwrap()
        .network_mode
        .clone()
        .unwrap();
    let network = docker.inspect_network(&network, None).await.unwrap();
    support::audit_network(id, &network);
    assert!(
        inspect
            .config
            .as_ref()
            .unwrap()
            .env
            .iter()
            .flatten()
            .all(|e| !e.starts_with("GRYT_JOB_ID=")),
        "a warm container has no job environment before its job"
    );

    let script = "hostname; echo \"var=$WARM_VAR job=$GRYT_JOB_ID\"; \
                  cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes; \
                  ls /workspace";
    let body = json!({
        "job_id": 41,
        "memory_limit": "96m",
        "env_vars": {"WARM_VAR": "from-the-job"},
        "pipeline_b64": support::b64(&format!("version: 1\nsteps:\n  - run: {}\n", json!(script))),
    });
    let result = run(&agent, body).await;
    assert_eq!(result["status"], "success", "{result}");
    let lines: Vec<&str> = result["stdout"].as_str().unwrap().lines().collect();
    assert_eq!(
        lines[0],
        &id[..12],
        "the job did not run in the warm container"
    );
    assert_eq!(lines[1], "var=from-the-job job=41");
    assert_eq!(
        lines[2],
        (96 * 1024 * 1024).to_string(),
        "the job's memory limit"
    );
    assert!(lines.contains(&"pipeline.yml"), "{lines:?}");
    assert_eq!(agent.warm_jobs().await, 1);
    // And the pool refilled, with a fresh container.
    wait_ready(&agent, 1).await;
    let fresh = warm_containers(&agent.agent_id).await;
    assert_eq!(fresh.len(), 1);
    assert_ne!(&fresh[0].0, id, "a container served two jobs");
    support::audit_container(
        &fresh[0].0,
        &docker.inspect_container(&fresh[0].0, None).await.unwrap(),
    );
    stop_and_assert_nothing_left(agent).await;
}

/// A job asking for more than the defaults (512m, 1.5 CPUs) gets it in a warm container, made
/// with the defaults, before its first command: memory (with no swap) and CPUs.
#[tokio::test]
async fn a_job_asking_for_more_memory_than_the_default_gets_it_in_a_warm_container() {
    let agent = Agent::push("warm-limits", &[POOL_ON, ("GRYT_MAX_MEMORY", "2g")]).await;
    wait_ready(&agent, 1).await;
    let (id, _) = warm_containers(&agent.agent_id).await.remove(0);
    let script = "hostname; m=/sys/fs/cgroup/memory; \
                  if [ -d $m ]; then cat $m/memory.limit_in_bytes $m/memory.memsw.limit_in_bytes; \
                  cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us; \
                  else cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory.swap.max; \
                  cut -d' ' -f1 /sys/fs/cgroup/cpu.max; fi";
    let body = json!({
        "job_id": 42,
        "memory_limit": "1g",
        "cpu_limit": "0.5",
        "pipeline_b64": support::b64(&format!("version: 1\nsteps:\n  - run: {}\n", json!(script))),
    });
    let result = run(&agent, body).await;
    assert_eq!(result["status"], "success", "{result}");
    let lines: Vec<&str> = result["stdout"].as_str().unwrap().lines().collect();
    assert_eq!(lines[0], &id[..12], "not run warm: {result}");
    let gib = (1024 * 1024 * 1024).to_string();
    // cgroup v1: memory+swap equals memory; v2: no swap at all.
    let swap = if lines[2] == "0" { "0" } else { gib.as_str() };
    assert_eq!(lines[1..], [gib.as_str(), swap, "50000"], "{result}");
    stop_and_assert_nothing_left(agent).await;
}

#[tokio::test]
async fn two_jobs_never_share_a_container() {
    let agent = Agent::push("warm-two", &[POOL_ON]).await;
    wait_ready(&agent, 1).await;
    let first = hostname_of(&run(&agent, hostname_job(1)).await);
    wait_ready(&agent, 1).await;
    let second = hostname_of(&run(&agent, hostname_job(2)).await);
    assert_ne!(first, second, "two jobs ran in one container");
    assert_eq!(agent.warm_jobs().await, 2);
    // A gryt job (one command, the main process of a cold container) runs as an exec here.
    wait_ready(&agent, 1).await;
    let gryt = json!({"job_id": 3, "pipeline_b64": support::b64("print('x')\n")});
    let result = run(&agent, gryt).await;
    assert_eq!(result["status"], "success", "{result}");
    assert_eq!(agent.warm_jobs().await, 3);
    stop_and_assert_nothing_left(agent).await;
}

#[tokio::test]
async fn jobs_on_another_image_or_with_services_start_cold() {
    let agent = Agent::push("warm-cold", &[POOL_ON]).await;
    wait_ready(&agent, 1).await;
    let (warm_id, _) = warm_containers(&agent.agent_id).await.remove(0);
    // The same image by its id: another name than the pool's, so the cold path.
    let image = support::test_image().await;
    let image_id = support::docker()
        .await
        .inspect_image(&image)
        .await
        .unwrap()
        .id
        .unwrap();
    let mut body = hostname_job(1);
    body["docker_image"] = json!(image_id);
    assert_ne!(hostname_of(&run(&agent, body).await), &warm_id[..12]);
    let services = json!({
        "job_id": 2,
        "pipeline_b64": support::b64("version: 1\nsteps:\n  - run: hostname\n"),
        "services": [{"name": "side", "image": image, "command": "exec sleep 600"}],
    });
    let result = run(&agent, services).await;
    assert_ne!(hostname_of(&result), &warm_id[..12]);
    assert_eq!(agent.warm_jobs().await, 0);
    let still = warm_containers(&agent.agent_id).await;
    assert_eq!(still.len(), 1, "{still:?}");
    assert_eq!(still[0].0, warm_id, "the ready container stays ready");
    stop_and_assert_nothing_left(agent).await;
}

#[tokio::test]
async fn a_warm_container_killed_behind_the_agents_back_is_replaced_before_a_job_comes() {
    let agent = Agent::push("warm-killed", &[POOL_ON]).await;
    wait_ready(&agent, 1).await;
    let (killed, _) = warm_containers(&agent.agent_id).await.remove(0);
    support::docker()
        .await
        .kill_container(&killed, None::<KillContainerOptions>)
        .await
        .unwrap();
    // The pool sees it die: the dead one is removed and a fresh one made, with no job asking.
    let fresh = wait_replaced(&agent, &killed).await;
    let host = hostname_of(&run(&agent, hostname_job(1)).await);
    assert_eq!(
        host,
        &fresh[..12],
        "the job did not run in the fresh container"
    );
    assert_eq!(agent.warm_jobs().await, 1);
    assert!(
        agent.log_text().contains("stopped running"),
        "{}",
        agent.log_text()
    );
    stop_and_assert_nothing_left(agent).await;
}

/// Waits (up to 30 s) until the agent's only warm container is a running one other than `dead`,
/// with `dead` gone, and returns its id.
async fn wait_replaced(agent: &Agent, dead: &str) -> String {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let warm = warm_containers(&agent.agent_id).await;
        let (_, running) = support::process::containers_by_kind(&agent.agent_id).await;
        if warm.len() == 1 && warm[0].0 != dead && running == [warm[0].0.clone()] {
            return warm[0].0.clone();
        }
        assert!(
            Instant::now() < until,
            "the dead warm container was not replaced: {warm:?}; log:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_sigkilled_agents_pool_is_swept_at_restart_and_made_anew() {
    let (state, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let agent_id = unique_agent_id("warm-sigkill");
    let mut agent = Agent::push_at(&agent_id, state.path(), work.path(), &[POOL_ON]).await;
    wait_ready(&agent, 1).await;
    let old = warm_containers(&agent_id).await;
    assert_eq!(old.len(), 1);
    agent.sigkill();
    assert_eq!(
        containers_of(&agent_id).await.len(),
        1,
        "the pool outlives a SIGKILL"
    );
    let agent = Agent::push_at(&agent_id, state.path(), work.path(), &[POOL_ON]).await;
    wait_ready(&agent, 1).await;
    let new = warm_containers(&agent_id).await;
    assert_eq!(new.len(), 1, "{new:?}");
    assert_ne!(new[0], old[0], "the old warm container was not swept");
    assert_eq!(containers_of(&agent_id).await.len(), 1);
    assert_eq!(networks_of(&agent_id).await.len(), 1);
    assert_eq!(agent.workspaces().len(), 1, "{:?}", agent.workspaces());
    assert!(
        agent
            .log_text()
            .contains("orphan sweep removed a container")
    );
    stop_and_assert_nothing_left(agent).await;
}

#[tokio::test]
async fn the_pool_is_off_at_zero_and_never_larger_than_the_slots() {
    let agent = Agent::push(
        "warm-bounds",
        &[("GRYT_WARM_POOL", "3"), ("GRYT_CONCURRENCY", "2")],
    )
    .await;
    let pool = wait_ready(&agent, 2).await;
    assert_eq!(pool["target"], 2);
    assert_eq!(warm_containers(&agent.agent_id).await.len(), 2);
    stop_and_assert_nothing_left(agent).await;
    let agent = Agent::push("warm-off", &[]).await;
    assert_eq!(
        agent.health().await["warm_pool"],
        json!({"target": 0, "ready": 0})
    );
    hostname_of(&run(&agent, hostname_job(1)).await);
    assert_eq!(agent.warm_jobs().await, 0);
    agent.assert_clean().await;
}
