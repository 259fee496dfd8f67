//! Push jobs across an agent restart, with the real agent binary in push mode, a real Docker
//! engine and a callback receiver on loopback. The agent is killed (SIGKILL) or hands over
//! (SIGUSR2) while a two-step YAML job runs, and is started again with the same state dir, work
//! dir and agent id:
//!
//! - a job with a `callback_url` is carried on: the callback receives exactly one result, as if
//!   nothing happened (both steps, the whole output), and nothing is left (containers,
//!   networks, workspaces, records);
//! - a job with a callback whose container is gone meanwhile is given up: the callback
//!   receives one `error` saying why;
//! - a job without one (its caller's connection closed with the agent) is removed by the
//!   restarted agent within 5 s;
//! - a result whose callback was not delivered yet is sent again, a job whose container never
//!   started calls back an `error`, an unreadable record is removed.

use crate::push::{Seen, receiver};
use crate::support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::process::Agent;
use support::process::push::KEY;
use support::{b64, containers_of, unique_agent_id};

const ADOPTED: &str = "adopted a job of an earlier run";
const GAVE_UP: &str = "gave up a job of an earlier run";
const JOB: i64 = 41;

/// A two-step YAML job; the second step prints a line a second for ~6 s. With `callback`, its
/// result also goes to `http://127.0.0.1:<callback>/callback`.
fn two_steps(callback: Option<u16>) -> Value {
    let pipeline = "version: 1\nsteps:\n  - name: first\n    run: echo p-first\n  - name: slow\n    run: |\n      i=1\n      while [ $i -le 6 ]; do\n        echo \"p-slow $i\"\n        sleep 1\n        i=$((i+1))\n      done\n";
    let mut spec = json!({"job_id": JOB, "pipeline_b64": b64(pipeline)});
    if let Some(port) = callback {
        spec["callback_url"] = json!(format!("http://127.0.0.1:{port}/callback"));
    }
    spec
}

/// Everything the job of [`two_steps`] prints.
fn whole_output() -> String {
    let mut out = String::from("p-first\n");
    for i in 1..=6 {
        out.push_str(&format!("p-slow {i}\n"));
    }
    out
}

/// A push agent on `state` and `work` (kept by the test, to start it again on them).
async fn agent_on(agent_id: &str, state: &Path, work: &Path, callback: u16) -> Agent {
    let allow = format!("127.0.0.1:{callback}");
    let env = [
        ("GRYT_CALLBACK_ALLOW", allow.as_str()),
        ("RUST_LOG", "gryt_agent=debug,info"),
        // Plain log lines: the tests read job ids out of them.
        ("NO_COLOR", "1"),
    ];
    Agent::push_at(agent_id, state, work, &env).await
}

/// Pushes `spec` in a task of its own: its answer never comes, the agent goes away under it.
fn push(agent: &Agent, spec: Value) -> tokio::task::JoinHandle<()> {
    let url = format!("{}/jobs/execute", agent.url);
    tokio::spawn(async move {
        let _ = reqwest::Client::new()
            .post(url)
            .header("X-API-Key", KEY)
            .header("content-type", "application/json")
            .body(spec.to_string())
            .send()
            .await;
    })
}

/// The push records in the state dir (`<state>/push/*.json`).
fn records(state: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(state.join("push"))
        .map(|d| {
            d.map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `cond` holds, up to `timeout`; returns how long it took.
async fn wait_until(
    what: &str,
    timeout: Duration,
    agent: &Agent,
    mut cond: impl AsyncFnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    while !cond().await {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}; agent log:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

/// Waits until the job's record says its second step runs, then lets it print a line or two.
async fn wait_for_the_second_step(agent: &Agent, state: &Path) {
    let in_step_two = || {
        records(state).iter().any(|path| {
            let Ok(text) = std::fs::read(path) else {
                return false;
            };
            let record: Value = serde_json::from_slice(&text).unwrap_or_default();
            let resume = &record["resume"];
            resume["steps"].as_array().is_some_and(|s| s.len() == 1)
                && resume["running_since_unix_ms"].is_u64()
        })
    };
    let what = "the job's record showing its second step running";
    wait_until(what, Duration::from_secs(60), agent, async || in_step_two()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

/// The record and its dir are private: the record holds the job's secrets.
fn assert_records_private(state: &Path) {
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state.join("push")), 0o700);
    let found = records(state);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(mode(&found[0]), 0o600);
}

/// Waits for the callback, then gives a second one time to (wrongly) arrive; returns the one.
async fn the_one_callback(seen: &Seen, agent: &Agent) -> (Option<String>, Value) {
    let what = "the callback";
    wait_until(what, Duration::from_secs(90), agent, async || {
        !seen.lock().unwrap().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "callbacks: {seen:?}\n{}", agent.log_text());
    seen[0].clone()
}

/// Nothing of the job left once the restarted agent is done with it: no container, network,
/// workspace or record; then the agent stops leaving nothing.
async fn assert_nothing_left(mut agent: Agent, state: &Path) {
    agent.assert_clean().await;
    let what = "the job's record removed";
    wait_until(what, Duration::from_secs(5), &agent, async || {
        records(state).is_empty()
    })
    .await;
    agent.stop_leaving_nothing().await;
    assert!(records(state).is_empty());
}

/// The agent goes away (`stop`) while the job with a callback runs its second step; the
/// restarted agent carries it on and the callback receives its one result.
async fn carried_on_across(test: &str, stop: impl FnOnce(&mut Agent)) {
    let (port, seen) = receiver().await;
    let (state, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let agent_id = unique_agent_id(test);
    let mut first = agent_on(&agent_id, state.path(), work.path(), port).await;
    let request = push(&first, two_steps(Some(port)));
    wait_for_the_second_step(&first, state.path()).await;
    assert_records_private(state.path());

    stop(&mut first);
    let _ = request.await;
    assert_eq!(
        containers_of(&agent_id).await.len(),
        1,
        "the job's container outlives the agent"
    );
    assert!(seen.lock().unwrap().is_empty(), "called back at the stop");
    // The job prints on while no agent runs.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let agent = agent_on(&agent_id, state.path(), work.path(), port).await;
    let (key, result) = the_one_callback(&seen, &agent).await;
    let log = agent.log_text();
    assert_eq!(key.as_deref(), Some(KEY), "the callback's key");
    assert_eq!(result["job_id"], JOB);
    assert_eq!(result["status"], "success", "{result}\n{log}");
    let steps: Vec<(&str, &str)> = result["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps,
        [("first", "success"), ("slow", "success")],
        "{result}"
    );
    assert_eq!(result["stdout"], whole_output(), "{result}");
    assert_eq!(agent.logged_jobs(ADOPTED), [JOB], "{log}");
    assert_eq!(agent.logged_jobs(GAVE_UP), Vec::<i64>::new(), "{log}");
    let adopted = agent.metric("gryt_agent_jobs_adopted_total").await;
    assert_eq!(adopted, Some(1.0), "gryt_agent_jobs_adopted_total");
    assert_nothing_left(agent, state.path()).await;
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_then_restart_carries_a_job_with_a_callback_on_and_calls_back_once() {
    carried_on_across("push-adopt-kill", Agent::sigkill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_over_leaves_a_job_with_a_callback_running_for_the_next_agent() {
    carried_on_across("push-adopt-handover", |agent| {
        agent.signal("USR2");
        let status = agent.child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{}", agent.log_text());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_with_a_callback_whose_container_is_gone_calls_back_an_error() {
    let (port, seen) = receiver().await;
    let (state, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let agent_id = unique_agent_id("push-adopt-gone");
    let mut first = agent_on(&agent_id, state.path(), work.path(), port).await;
    let request = push(&first, two_steps(Some(port)));
    wait_for_the_second_step(&first, state.path()).await;
    first.sigkill();
    let _ = request.await;
    let docker = support::docker().await;
    for id in containers_of(&agent_id).await {
        let force = bollard::query_parameters::RemoveContainerOptionsBuilder::default()
            .force(true)
            .build();
        docker.remove_container(&id, Some(force)).await.unwrap();
    }

    let agent = agent_on(&agent_id, state.path(), work.path(), port).await;
    let (_, result) = the_one_callback(&seen, &agent).await;
    let log = agent.log_text();
    assert_eq!(result["job_id"], JOB);
    assert_eq!(result["status"], "error", "{result}");
    let error = result["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("could not carry it on") && error.contains("run it again"),
        "{error}"
    );
    assert_eq!(agent.logged_jobs(GAVE_UP), [JOB], "{log}");
    assert_eq!(agent.logged_jobs(ADOPTED), Vec::<i64>::new(), "{log}");
    let given_up = agent.metric("gryt_agent_jobs_given_up_total").await;
    assert_eq!(given_up, Some(1.0), "gryt_agent_jobs_given_up_total");
    assert_nothing_left(agent, state.path()).await;
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_then_restart_removes_a_job_without_a_callback_within_5_s() {
    let (port, seen) = receiver().await;
    let (state, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let agent_id = unique_agent_id("push-adopt-no-callback");
    let mut first = agent_on(&agent_id, state.path(), work.path(), port).await;
    let request = push(&first, two_steps(None));
    let what = "the job's container running";
    wait_until(what, Duration::from_secs(60), &first, async || {
        containers_of(&agent_id).await.len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        records(state.path()).is_empty(),
        "a record without a callback"
    );
    first.sigkill();
    let _ = request.await;
    let containers = containers_of(&agent_id).await;
    assert_eq!(
        containers.len(),
        1,
        "the job's container outlives the agent"
    );

    let restarted = Instant::now();
    let agent = agent_on(&agent_id, state.path(), work.path(), port).await;
    let what = "the job's container removed";
    wait_until(what, Duration::from_secs(5), &agent, async || {
        containers_of(&agent_id).await.is_empty()
    })
    .await;
    let removed = restarted.elapsed();
    eprintln!(
        "push job without a callback: its container removed {:.2} s after the restart",
        removed.as_secs_f64()
    );
    assert!(removed < Duration::from_secs(5), "{removed:?}");
    let log = agent.log_text();
    assert_eq!(agent.logged_jobs(ADOPTED), Vec::<i64>::new(), "{log}");
    assert!(seen.lock().unwrap().is_empty(), "no callback was asked for");
    assert_nothing_left(agent, state.path()).await;
    drop(first);
}

/// What an earlier run may leave besides a running job: a result whose callback was not
/// delivered yet (sent again), a job whose container never started (its callback gets an
/// `error`), an unreadable record (removed). Each is settled once and its record removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_an_earlier_run_left_are_settled_once_each() {
    use gryt_agent::push::record::{PushRecord, Records};
    use gryt_agent::wire::{JobResult, JobSpec};

    let (port, seen) = receiver().await;
    let (state, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let records_dir = Records::in_state_dir(state.path());
    let record = |id: i64, result: Option<JobResult>| {
        let mut spec = two_steps(Some(port));
        spec["job_id"] = json!(id);
        PushRecord {
            job: JobSpec::from_json(spec.to_string().as_bytes()).unwrap(),
            previous_key: false,
            resume: None,
            result,
        }
    };
    let mut delivered = JobResult::agent_error(51, String::new());
    delivered.status = gryt_agent::wire::JobStatus::Success;
    delivered.success = true;
    delivered.exit_code = 0;
    delivered.error = None;
    delivered.stdout = "made before the stop\n".into();
    records_dir
        .write("job-51-a", &record(51, Some(delivered.clone())))
        .unwrap();
    records_dir.write("job-52-b", &record(52, None)).unwrap();
    std::fs::write(records_dir.dir().join("job-53-c.json"), "{cut sho").unwrap();

    let agent_id = unique_agent_id("push-adopt-records");
    let agent = agent_on(&agent_id, state.path(), work.path(), port).await;
    let what = "two callbacks";
    wait_until(what, Duration::from_secs(30), &agent, async || {
        seen.lock().unwrap().len() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut got = seen.lock().unwrap().clone();
    got.sort_by_key(|(_, result)| result["job_id"].as_i64());
    let log = agent.log_text();
    assert_eq!(got.len(), 2, "callbacks: {got:?}\n{log}");
    assert_eq!(got[0].1, serde_json::to_value(&delivered).unwrap());
    assert_eq!(got[1].1["job_id"], 52);
    assert_eq!(got[1].1["status"], "error", "{}", got[1].1);
    assert!(log.contains("unreadable push record removed"), "{log}");
    assert_eq!(agent.logged_jobs(ADOPTED), Vec::<i64>::new(), "{log}");
    assert_nothing_left(agent, state.path()).await;
}
