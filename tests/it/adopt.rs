//! Adoption: jobs outlive the agent. The real agent binary is killed (SIGKILL) or hands over
//! (SIGUSR2) while jobs run, and is started again with the same state dir, work dir and agent
//! id against the conformance fake:
//!
//! - a job whose container still lives and whose lease the API still honours is adopted: no
//!   second `start`, heartbeats resume, the log goes on from the server's `committed` byte for
//!   byte (what the job printed while no agent ran included), a multi-step job resumes at its
//!   running step, and the job completes once, as if nothing happened;
//! - a job whose lease is gone (revoked, expired, unknown) or whose container is gone is given
//!   up: its container is removed within 5 s of the restart;
//! - a job whose deadline passed while no agent ran completes `timeout`.
//!
//! Each test prints its figures (jobs adopted, bytes lost, time from the restart to the
//! re-adoption); `docs/reliability.md` keeps the measured ones.

use crate::fake_api;
use crate::support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use fake_api::FakeApi;
use serde_json::{Value, json};
use support::process::pull::KEY;
use support::process::{Agent, agent_binary};
use support::{b64, unique_agent_id};

/// Long enough that no lease runs out while the agent is down (3 s) or restarting.
const TTL: u64 = 30;
/// The result keeps this much of each stream (`job.output_cap_bytes`, default).
const CAP: usize = 1024 * 1024;
pub(crate) const ADOPTED: &str = "adopted a job of an earlier run";
pub(crate) const GAVE_UP: &str = "gave up a job of an earlier run";

/// A job of these tests: its spec, what it prints, and a line showing it runs.
pub(crate) struct Job {
    pub(crate) id: i64,
    pub(crate) spec: Value,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    /// Both streams in the order the job writes them: what the server's log must hold.
    pub(crate) log: String,
    /// Printed early: once the server has it, the job is running.
    pub(crate) started: String,
}

impl Job {
    /// Only stdout, no stderr.
    pub(crate) fn out(id: i64, spec: Value, stdout: String, started: &str) -> Job {
        Job {
            id,
            spec,
            log: stdout.clone(),
            stdout,
            stderr: String::new(),
            started: started.to_owned(),
        }
    }
}

/// A YAML pipeline of named steps, each script a block scalar (no quoting to get wrong).
fn yaml(steps: &[(&str, &str)]) -> String {
    let mut text = String::from("version: 1\nsteps:\n");
    for (name, script) in steps {
        text.push_str(&format!("  - name: {name}\n    run: |\n"));
        for line in script.lines() {
            text.push_str(&format!("      {line}\n"));
        }
    }
    text
}

pub(crate) fn spec(id: i64, steps: &[(&str, &str)]) -> Value {
    json!({"job_id": id, "pipeline_b64": b64(&yaml(steps))})
}

/// (a) Three steps; the second runs ~8 s printing a line a second (killed in the middle).
fn multi_step(id: i64) -> Job {
    let slow = "i=1\nwhile [ $i -le 8 ]; do\n  echo \"a-slow $i\"\n  sleep 1\n  i=$((i+1))\ndone";
    let spec = spec(
        id,
        &[
            ("first", "echo a-first"),
            ("slow", slow),
            ("last", "echo a-last"),
        ],
    );
    let mut out = String::from("a-first\n");
    for i in 1..=8 {
        out.push_str(&format!("a-slow {i}\n"));
    }
    out.push_str("a-last\n");
    Job::out(id, spec, out, "a-slow 1\n")
}

/// (b) A numbered line every 100 ms for ~10 s; every tenth goes to stderr (one write each,
/// 100 ms apart, so their order in the log is the order written).
fn steady(id: i64) -> Job {
    let script = "i=1\nwhile [ $i -le 100 ]; do\n  if [ $((i % 10)) -eq 5 ]; then echo \"b-err $i\" >&2; else echo \"b-out $i\"; fi\n  sleep 0.1\n  i=$((i+1))\ndone";
    let (mut stdout, mut stderr, mut log) = (String::new(), String::new(), String::new());
    for i in 1..=100 {
        let line = if i % 10 == 5 {
            format!("b-err {i}\n")
        } else {
            format!("b-out {i}\n")
        };
        if i % 10 == 5 {
            stderr.push_str(&line);
        } else {
            stdout.push_str(&line);
        }
        log.push_str(&line);
    }
    Job {
        id,
        spec: spec(id, &[("steady", script)]),
        stdout,
        stderr,
        log,
        started: "b-out 1\n".into(),
    }
}

/// (c) A line, 3 s of quiet (the agent is killed meanwhile), ~2.1 MB at once (printed while no
/// agent runs), then 6 s more so the container still lives at the restart.
fn burst(id: i64) -> Job {
    let script = "echo c-begin\nsleep 3\nseq -w 1 300000\nsleep 6\necho c-end";
    let mut out = String::from("c-begin\n");
    for i in 1..=300_000 {
        out.push_str(&format!("{i:06}\n"));
    }
    out.push_str("c-end\n");
    Job::out(id, spec(id, &[("burst", script)]), out, "c-begin\n")
}

/// What the result keeps of a stream: the last [`CAP`] bytes after a marker line when more
/// was printed (`TailBuffer::to_text`; the texts here are ASCII).
pub(crate) fn tail(text: &str) -> String {
    if text.len() <= CAP {
        return text.to_owned();
    }
    let dropped = text.len() - CAP;
    format!(
        "[gryt-agent: {dropped} earlier bytes dropped, the last {CAP} are kept]\n{}",
        &text[dropped..]
    )
}

/// Length of the common prefix of two texts (where they first differ).
pub(crate) fn common_prefix(a: &str, b: &str) -> usize {
    a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count()
}

/// Asserts two (possibly megabytes long) texts are equal, saying where they first differ.
pub(crate) fn assert_same_text(what: &str, got: &str, want: &str) {
    if got == want {
        return;
    }
    let at = common_prefix(got, want);
    let around = |t: &str| {
        let start = at.saturating_sub(40);
        String::from_utf8_lossy(&t.as_bytes()[start.min(t.len())..(at + 40).min(t.len())])
            .into_owned()
    };
    panic!(
        "{what}: {} bytes, {} expected; first difference at byte {at}: got {:?}, expected {:?}",
        got.len(),
        want.len(),
        around(got),
        around(want)
    );
}

/// The end of the agent's log, for failure messages.
fn log_end(agent: &Agent) -> String {
    let text = agent.log_text();
    let mut cut = text.len().saturating_sub(6000);
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    text[cut..].to_owned()
}

/// Waits until `cond` holds, up to `timeout`; returns how long it took. The failure shows the
/// end of `agent`'s log.
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
            "timed out after {timeout:?} waiting for: {what}; agent log (end):\n{}",
            log_end(agent)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

/// The agent's job containers that are running now (with the warm pool off, all of its
/// running containers), optionally only those of one job.
async fn running_containers(agent_id: &str, job: Option<i64>) -> Vec<String> {
    use bollard::query_parameters::ListContainersOptionsBuilder;
    let mut labels = vec![format!("io.gryt.agent.id={agent_id}")];
    if let Some(job) = job {
        labels.push(format!("io.gryt.job.id={job}"));
    }
    let filters = std::collections::HashMap::from([
        ("label", labels),
        ("status", vec!["running".to_owned()]),
    ]);
    let options = ListContainersOptionsBuilder::default()
        .filters(&filters)
        .build();
    let listed = support::docker()
        .await
        .list_containers(Some(options))
        .await
        .unwrap();
    listed.into_iter().filter_map(|c| c.id).collect()
}

/// Containers (running or not) of one job of the agent.
async fn job_containers(agent_id: &str, job: i64) -> Vec<String> {
    use bollard::query_parameters::ListContainersOptionsBuilder;
    let labels = vec![
        format!("io.gryt.agent.id={agent_id}"),
        format!("io.gryt.job.id={job}"),
    ];
    let filters = std::collections::HashMap::from([("label", labels)]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let listed = support::docker()
        .await
        .list_containers(Some(options))
        .await
        .unwrap();
    listed.into_iter().filter_map(|c| c.id).collect()
}

/// The agent-wide files at the top of the state dir, which hold nothing of a job: the lock,
/// the agent's id, the image GC's use record (and the tests' own agent logs, `agent-*.log`).
const AGENT_WIDE: [&str; 3] = ["agent.lock", "agent-id", "image-use.json"];

/// What the state dir keeps for running jobs (leases, specs, offsets, secrets) is never
/// readable by others: the state dir is 0700 or tighter, and so is every directory in it, every
/// file 0600 (but the agent-wide files, [`AGENT_WIDE`]).
fn assert_state_private(state: &Path) {
    let mode = |p: &Path| std::fs::symlink_metadata(p).map(|m| m.permissions().mode() & 0o777);
    let top = mode(state).unwrap();
    assert_eq!(top & 0o077, 0, "the state dir is {top:o}");
    let mut todo = vec![state.to_owned()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let agent_wide = AGENT_WIDE.contains(&name.as_str())
                || (name.starts_with("agent-") && name.ends_with(".log"));
            if dir == state && agent_wide {
                continue;
            }
            // Removed meanwhile: nothing to check.
            let Ok(m) = mode(&path) else { continue };
            assert_eq!(
                m & 0o077,
                0,
                "{} is {m:o}: readable by others",
                path.display()
            );
            if path.is_dir() && !path.is_symlink() {
                todo.push(path);
            }
        }
    }
}

/// When the restarted agent first renewed each job's lease (a heartbeat answered 200 after
/// `since`): the re-adoption. `None` for a job it never renewed.
fn first_heartbeats(api: &FakeApi, jobs: &[i64], since: Instant) -> Vec<Option<Duration>> {
    let requests = api.requests();
    jobs.iter()
        .map(|id| {
            requests
                .iter()
                .find(|r| {
                    r.call == "heartbeat"
                        && r.job_id == Some(*id)
                        && r.status == 200
                        && r.at > since
                })
                .map(|r| r.at - since)
        })
        .collect()
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("never".into(), |d| format!("{:.2} s", d.as_secs_f64()))
}

/// The checks every adopted job must pass once the restarted agent completed it: one `start`
/// (the first agent's), one complete, success, the log and the result's streams byte for
/// byte, and a start time from before the agent went away.
fn assert_completed_as_if_nothing_happened(api: &FakeApi, job: &Job, gone_at: &str, log: &str) {
    let id = job.id;
    let rec = api.job(id);
    let requests = api.requests();
    let calls = |call: &str| {
        requests
            .iter()
            .filter(|r| r.call == call && r.job_id == Some(id))
            .count()
    };
    let done = rec.completion.clone().expect("completed");
    assert_eq!(
        done["status"], "success",
        "job {id}: {done}\nagent log:\n{log}"
    );
    assert_eq!(calls("start"), 1, "job {id}: `start` calls");
    assert_eq!(
        (calls("complete"), rec.completes_accepted),
        (1, 1),
        "job {id}: completes (sent, accepted)"
    );
    assert_eq!(
        (rec.leases, rec.lost),
        (1, false),
        "job {id}: leased again or lost"
    );
    assert_same_text(&format!("job {id}: streamed log"), &rec.log, &job.log);
    assert_eq!(done["log_bytes"], rec.log.len(), "job {id}: log_bytes");
    let stdout = done["stdout"].as_str().unwrap_or_default();
    assert_same_text(
        &format!("job {id}: result stdout"),
        stdout,
        &tail(&job.stdout),
    );
    let stderr = done["stderr"].as_str().unwrap_or_default();
    assert_same_text(
        &format!("job {id}: result stderr"),
        stderr,
        &tail(&job.stderr),
    );
    let started_at = done["started_at"].as_str().unwrap_or_default();
    assert!(
        started_at < gone_at,
        "job {id}: started_at {started_at} is not before the agent went away ({gone_at})"
    );
}

/// The (a) job's steps: all three ran and passed, the middle one across the restart.
pub(crate) fn assert_three_steps_passed(api: &FakeApi, id: i64) {
    let done = api.job(id).completion.unwrap();
    let steps: Vec<(String, String, i64)> = done["steps"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or_default().to_owned(),
                s["status"].as_str().unwrap_or_default().to_owned(),
                s["exit_code"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    let want: Vec<(String, String, i64)> = ["first", "slow", "last"]
        .iter()
        .map(|n| (n.to_string(), "success".to_string(), 0))
        .collect();
    assert_eq!(steps, want, "job {id}: steps {}", done["steps"]);
}

fn now_rfc3339() -> String {
    gryt_agent::wire::job::rfc3339(time::OffsetDateTime::now_utc())
}

/// Starts `jobs` on a fresh agent and waits until each has printed its first line.
async fn start_jobs(
    test: &str,
    jobs: &[Job],
    env: &[(&str, &str)],
) -> (FakeApi, tempfile::TempDir, tempfile::TempDir, String, Agent) {
    let api = FakeApi::start(KEY, TTL).await;
    for job in jobs {
        api.push_job(job.spec.clone());
    }
    let (state, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let agent_id = unique_agent_id(test);
    let agent = Agent::pull_in(&agent_id, state.path(), work.path(), &api.url, &[], env).await;
    wait_until(
        "every job printing",
        Duration::from_secs(90),
        &agent,
        async || {
            jobs.iter()
                .all(|j| api.job(j.id).log.contains(j.started.as_str()))
        },
    )
    .await;
    (api, state, work, agent_id, agent)
}

/// Waits for every job's completion after a restart (the agent's log end on failure).
async fn wait_completions(api: &FakeApi, agent: &Agent, ids: &[i64]) -> Duration {
    wait_until(
        "every job's completion",
        Duration::from_secs(90),
        agent,
        async || ids.iter().all(|id| api.job(*id).completion.is_some()),
    )
    .await
}

/// The moment the agent went away: by the test's clock and the wall clock (results' format),
/// and how much of each job's log the server had then.
struct Gone {
    at: Instant,
    wall: String,
    logged: Vec<usize>,
}

impl Gone {
    fn now(api: &FakeApi, jobs: &[Job]) -> Gone {
        Gone {
            at: Instant::now(),
            wall: now_rfc3339(),
            logged: jobs.iter().map(|j| api.job(j.id).log.len()).collect(),
        }
    }
}

/// Prints the figures of one adoption as a table (`restarted`: when the agent started again).
fn print_figures(
    title: &str,
    api: &FakeApi,
    agent: &Agent,
    jobs: &[Job],
    gone: &Gone,
    restarted: Instant,
) {
    let ids: Vec<i64> = jobs.iter().map(|j| j.id).collect();
    let renewed = first_heartbeats(api, &ids, restarted);
    let mut rows = String::new();
    for (i, job) in jobs.iter().enumerate() {
        let log = api.job(job.id).log;
        let lost = job.log.len() - common_prefix(&log, &job.log);
        rows.push_str(&format!(
            "| job {} | {} bytes expected; {} on the server at the stop, {} after it; bytes \
             lost: {lost}; lease renewed {} after the restart |\n",
            job.id,
            job.log.len(),
            gone.logged[i],
            log.len().saturating_sub(gone.logged[i]),
            secs(renewed[i]),
        ));
    }
    let worst = renewed.iter().copied().max().flatten();
    eprintln!(
        "\n| figure ({title}) | value |\n|---|---|\n\
         | agent down | {:.2} s |\n\
         | jobs adopted | {:?} of {ids:?} |\n{rows}\
         | time from the restart to the re-adoption (last lease renewed) | {} |\n\
         | time from the restart to the last completion | {:.2} s |\n",
        (restarted - gone.at).as_secs_f64(),
        agent.logged_jobs(ADOPTED),
        secs(worst),
        restarted.elapsed().as_secs_f64(),
    );
}

/// After a restart: waits for every job's completion, prints the figures, and checks that each
/// job was adopted (one line each, none given up, `/health` and the metric agree) and completed
/// as if nothing happened. Job 1 is the multi-step one.
async fn assert_all_adopted(title: &str, api: &FakeApi, agent: &Agent, jobs: &[Job], gone: &Gone) {
    let restarted = Instant::now();
    let ids: Vec<i64> = jobs.iter().map(|j| j.id).collect();
    wait_completions(api, agent, &ids).await;
    print_figures(title, api, agent, jobs, gone, restarted);
    let log = log_end(agent);
    for job in jobs {
        assert_completed_as_if_nothing_happened(api, job, &gone.wall, &log);
    }
    assert_three_steps_passed(api, 1);
    assert_eq!(agent.logged_jobs(ADOPTED), ids, "adopted lines\n{log}");
    assert_eq!(agent.logged_jobs(GAVE_UP), Vec::<i64>::new(), "{log}");
    // The result goes out before the job's cleanup, which the adopted job's count waits for.
    let total = jobs.len();
    let done = json!({"running": 0, "total": total});
    wait_until(
        "the adopted jobs' cleanups",
        Duration::from_secs(30),
        agent,
        async || agent.health().await["adopted"] == done,
    )
    .await;
    let adopted = agent.metric("gryt_agent_jobs_adopted_total").await;
    assert_eq!(adopted, Some(total as f64), "gryt_agent_jobs_adopted_total");
}

/// The control: run without a restart, the same jobs meet the same expectations (so a failure
/// of the tests below is the restart's, not the expectations').
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_the_same_jobs_without_a_restart_print_what_is_expected() {
    let jobs = [multi_step(1), steady(2), burst(3)];
    let ids: Vec<i64> = jobs.iter().map(|j| j.id).collect();
    let env = [("GRYT_CONCURRENCY", "3")];
    let (api, _state, _work, _agent_id, mut agent) = start_jobs("adopt-control", &jobs, &env).await;
    wait_completions(&api, &agent, &ids).await;
    let log = log_end(&agent);
    for job in &jobs {
        assert_completed_as_if_nothing_happened(&api, job, &now_rfc3339(), &log);
    }
    assert_three_steps_passed(&api, 1);
    assert_eq!(agent.logged_jobs(ADOPTED), Vec::<i64>::new());
    agent.stop_leaving_nothing().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_then_restart_adopts_every_running_job_and_loses_no_byte() {
    let jobs = [multi_step(1), steady(2), burst(3)];
    let env = [("GRYT_CONCURRENCY", "3")];
    let (api, state, work, agent_id, mut first) = start_jobs("adopt-kill", &jobs, &env).await;
    assert_state_private(state.path());

    first.sigkill();
    let gone = Gone::now(&api, &jobs);
    assert_eq!(
        running_containers(&agent_id, None).await.len(),
        3,
        "the killed agent's job containers outlive it"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut agent = Agent::pull_in(&agent_id, state.path(), work.path(), &api.url, &[], &env).await;
    assert_all_adopted("SIGKILL, restart", &api, &agent, &jobs, &gone).await;
    assert!(agent.spool_files().is_empty(), "{:?}", agent.spool_files());
    agent.stop_leaving_nothing().await;
}

/// SIGUSR2 makes the agent exit 0 at once (within 5 s) leaving its jobs' containers running and
/// having sent nothing that ends them; the new binary, at another path, adopts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_over_to_a_new_binary_keeps_the_jobs_running() {
    let jobs = [multi_step(1), steady(2)];
    let env = [("GRYT_CONCURRENCY", "2")];
    let (api, state, work, agent_id, mut old) = start_jobs("adopt-handover", &jobs, &env).await;
    // The new version, installed at another path while the old one runs.
    let install = tempfile::tempdir().unwrap();
    let next = install.path().join("gryt-agent-next");
    std::fs::copy(agent_binary(), &next).unwrap();

    old.signal("USR2");
    let signalled = Instant::now();
    let code = old.wait_exit(Duration::from_secs(5)).await;
    let exited = signalled.elapsed();
    let gone = Gone::now(&api, &jobs);
    assert_eq!(code, 0, "hand-over exit code; log:\n{}", log_end(&old));
    eprintln!(
        "\n| hand-over (SIGUSR2): old agent exited after | {:.2} s (limit 5 s) |",
        exited.as_secs_f64()
    );
    let running = running_containers(&agent_id, None).await;
    assert_eq!(running.len(), 2, "the job containers outlive the hand-over");
    assert_state_private(state.path());
    assert_eq!(
        old.logged_jobs(GAVE_UP),
        Vec::<i64>::new(),
        "{}",
        log_end(&old)
    );
    let sent: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.at > signalled && (r.call == "complete" || r.call == "start"))
        .map(|r| (r.call, r.job_id))
        .collect();
    assert!(sent.is_empty(), "sent at the hand-over: {sent:?}");

    let (state, work) = (state.path(), work.path());
    let mut agent = Agent::pull_in_with(&next, &agent_id, state, work, &api.url, &[], &env).await;
    assert_all_adopted("SIGUSR2 hand-over, new binary", &api, &agent, &jobs, &gone).await;
    // The new agent takes new work.
    api.push_job(spec(3, &[("after", "echo after-hand-over")]));
    wait_completions(&api, &agent, &[3]).await;
    let rec = api.job(3);
    assert_eq!(rec.completion.unwrap()["status"], "success");
    assert_eq!(rec.log, "after-hand-over\n");
    assert!(agent.spool_files().is_empty(), "{:?}", agent.spool_files());
    agent.stop_leaving_nothing().await;
}

/// What became of each job of the next test while no agent ran: its lease revoked (410), run
/// out (410), unknown to the server (404); its lease honoured but its container removed; both
/// intact (the one job to adopt).
/// A job that took a warm container: its container, network and workspace carry the
/// container's warm id, not the job's, and the restarted agent (with a pool of its own) must
/// spare and carry them on all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_in_a_warm_container_is_carried_on_too() {
    let jobs = [multi_step(1)];
    let env = [("GRYT_CONCURRENCY", "1"), ("GRYT_WARM_POOL", "1")];
    let api = FakeApi::start(KEY, TTL).await;
    let (state, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let agent_id = unique_agent_id("adopt-warm");
    let mut first = Agent::pull_in(&agent_id, state.path(), work.path(), &api.url, &[], &env).await;
    wait_until(
        "a ready warm container",
        Duration::from_secs(60),
        &first,
        async || first.health().await["warm_pool"]["ready"] == json!(1),
    )
    .await;
    api.push_job(jobs[0].spec.clone());
    wait_until(
        "the job printing",
        Duration::from_secs(60),
        &first,
        async || api.job(1).log.contains(jobs[0].started.as_str()),
    )
    .await;
    assert!(
        running_containers(&agent_id, Some(1)).await.is_empty(),
        "the job should run in the warm container (labelled with its warm id)"
    );
    first.sigkill();
    let gone = Gone::now(&api, &jobs);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut agent = Agent::pull_in(&agent_id, state.path(), work.path(), &api.url, &[], &env).await;
    assert_all_adopted("warm container, SIGKILL", &api, &agent, &jobs, &gone).await;
    assert!(agent.spool_files().is_empty(), "{:?}", agent.spool_files());
    agent.stop_leaving_nothing().await;
}

/// A gryt pipeline that took a warm container runs `gryt run` as an exec, not as the main
/// process: the restarted agent follows that exec to its end and never runs the pipeline again.
/// The stand-in for gryt (`sh pipeline.py`) counts its runs in the workspace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gryt_pipeline_in_a_warm_container_is_followed_not_run_again() {
    let script = "echo run >> runs.txt\necho \"runs: $(wc -l < runs.txt)\"\nsleep 4\n\
                  printf '{\\n  \"status\": \"ok\",\\n  \"results\": {\"runner_0\": {\"one\": \
                  {\"status\": \"success\", \"returncode\": 0, \"duration\": 1.0}}}\\n}\\n'\n";
    let report = "{\n  \"status\": \"ok\",\n  \"results\": {\"runner_0\": {\"one\": {\"status\": \
                  \"success\", \"returncode\": 0, \"duration\": 1.0}}}\n}\n";
    let env = [
        ("GRYT_CONCURRENCY", "1"),
        ("GRYT_WARM_POOL", "1"),
        ("GRYT_COMMAND", "sh pipeline.py"),
    ];
    let api = FakeApi::start(KEY, TTL).await;
    let (state, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let agent_id = unique_agent_id("adopt-gryt-warm");
    let mut first = Agent::pull_in(&agent_id, state.path(), work.path(), &api.url, &[], &env).await;
    wait_until(
        "a ready warm container",
        Duration::from_secs(60),
        &first,
        async || first.health().await["warm_pool"]["ready"] == json!(1),
    )
    .await;
    api.push_job(json!({"job_id": 1, "pipeline_b64": b64(script)}));
    wait_until(
        "the pipeline printing",
        Duration::from_secs(60),
        &first,
        async || api.job(1).log.contains("runs: 1"),
    )
    .await;
    first.sigkill();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut agent = Agent::pull_in(&agent_id, state.path(), work.path(), &api.url, &[], &env).await;
    wait_until(
        "the completion",
        Duration::from_secs(60),
        &agent,
        async || api.job(1).completion.is_some(),
    )
    .await;
    let rec = api.job(1);
    let done = rec.completion.clone().unwrap();
    assert_eq!(done["status"], "success", "{done}\n{}", log_end(&agent));
    assert_eq!(rec.log, format!("runs: 1\n{report}"), "run once, whole log");
    assert_eq!(api.count("start"), 1);
    assert_eq!(agent.logged_jobs(ADOPTED), vec![1]);
    agent.stop_leaving_nothing().await;
}

const REVOKED: i64 = 1;
const EXPIRED: i64 = 2;
const FORGOTTEN: i64 = 3;
const NO_CONTAINER: i64 = 4;
const CARRIED_ON: i64 = 5;
const LEASE_GONE: [i64; 3] = [REVOKED, EXPIRED, FORGOTTEN];

/// Four jobs that would run for 5 minutes, and one that ends 8 s after it printed its line.
fn jobs_to_lose() -> [Job; 5] {
    let sleeper = |id: i64| {
        let started = format!("started-{id}\n");
        let script = format!("echo started-{id}\nsleep 300");
        Job::out(
            id,
            spec(id, &[("sleep", &script)]),
            started.clone(),
            &started,
        )
    };
    let short = "echo started-5\nsleep 8\necho done-5";
    let carried = Job::out(
        CARRIED_ON,
        spec(CARRIED_ON, &[("short", short)]),
        "started-5\ndone-5\n".into(),
        "started-5\n",
    );
    [
        sleeper(REVOKED),
        sleeper(EXPIRED),
        sleeper(FORGOTTEN),
        sleeper(NO_CONTAINER),
        carried,
    ]
}

/// Does to the jobs what happens to them while no agent runs (see [`REVOKED`]); returns the
/// containers of the jobs whose lease is gone.
async fn lose_while_down(api: &FakeApi, agent_id: &str) -> Vec<String> {
    api.faults(|f| {
        f.revoke.insert(REVOKED);
    });
    api.expire_lease(EXPIRED);
    api.forget_lease(FORGOTTEN);
    let docker = support::docker().await;
    for id in job_containers(agent_id, NO_CONTAINER).await {
        let force = bollard::query_parameters::RemoveContainerOptionsBuilder::default()
            .force(true)
            .build();
        docker.remove_container(&id, Some(force)).await.unwrap();
    }
    let mut doomed = Vec::new();
    for id in LEASE_GONE {
        doomed.extend(job_containers(agent_id, id).await);
    }
    assert_eq!(doomed.len(), 3, "the killed agent's containers outlive it");
    doomed
}

/// The jobs whose lease is gone: nothing of theirs the server accepted after `since` (no
/// completion, no log, no start).
fn assert_nothing_accepted_without_a_lease(api: &FakeApi, since: Instant) {
    let requests = api.requests();
    for id in LEASE_GONE {
        let rec = api.job(id);
        assert_eq!(
            rec.completion, None,
            "job {id}: completed without its lease"
        );
        assert_eq!(rec.log, format!("started-{id}\n"), "job {id}: log");
        let accepted: Vec<_> = requests
            .iter()
            .filter(|r| r.job_id == Some(id) && r.at > since)
            .filter(|r| r.call == "start" || r.status == 200)
            .map(|r| (r.call.clone(), r.status))
            .collect();
        assert!(
            accepted.is_empty(),
            "job {id}: after the kill: {accepted:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_gives_up_the_jobs_whose_lease_or_container_is_gone() {
    let jobs = jobs_to_lose();
    let env = [("GRYT_CONCURRENCY", "5")];
    let (api, state, work, agent_id, mut first) = start_jobs("adopt-gone", &jobs, &env).await;
    first.sigkill();
    let gone = Gone::now(&api, &jobs);
    let doomed = lose_while_down(&api, &agent_id).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut agent = Agent::pull_in(&agent_id, state.path(), work.path(), &api.url, &[], &env).await;
    let restarted = Instant::now();
    let what = "the containers of the jobs whose lease is gone removed";
    let removed = wait_until(what, Duration::from_secs(5), &agent, async || {
        let left = support::containers_of(&agent_id).await;
        !doomed.iter().any(|c| left.contains(c))
    })
    .await;
    let gave_up = wait_until(
        "4 jobs given up",
        Duration::from_secs(30),
        &agent,
        async || agent.logged_jobs(GAVE_UP).len() >= 4,
    )
    .await;
    wait_completions(&api, &agent, &[NO_CONTAINER, CARRIED_ON]).await;
    // Time to (wrongly) send more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!(
        "\n| figure (leases or containers gone while down) | value |\n|---|---|\n\
         | jobs given up | {:?} (lease revoked, expired, unknown; container removed) |\n\
         | their containers removed | {:.2} s after the restart (limit 5 s) |\n\
         | all given up (log) | {:.2} s after the restart |\n",
        agent.logged_jobs(GAVE_UP),
        removed.as_secs_f64(),
        gave_up.as_secs_f64(),
    );
    print_figures(
        "the one job to adopt",
        &api,
        &agent,
        &jobs[4..],
        &gone,
        restarted,
    );

    let log = log_end(&agent);
    let given_up = [REVOKED, EXPIRED, FORGOTTEN, NO_CONTAINER];
    assert_eq!(agent.logged_jobs(GAVE_UP), given_up, "{log}");
    assert_eq!(agent.logged_jobs(ADOPTED), [CARRIED_ON], "{log}");
    assert_nothing_accepted_without_a_lease(&api, gone.at);
    // Its lease is honoured and its container gone: completed `error` once, so the server can
    // queue it again at once.
    let rec = api.job(NO_CONTAINER);
    let done = rec.completion.clone().unwrap();
    assert_eq!(done["status"], "error", "{done}");
    assert_eq!(rec.completes_accepted, 1);
    assert_eq!(rec.log, format!("started-{NO_CONTAINER}\n"));
    assert_completed_as_if_nothing_happened(&api, &jobs[4], &gone.wall, &log);
    let health = agent.health().await;
    assert_eq!(
        health["adopted"],
        json!({"running": 0, "total": 1}),
        "{health}"
    );
    assert!(agent.spool_files().is_empty(), "{:?}", agent.spool_files());
    agent.stop_leaving_nothing().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passed_while_no_agent_ran_ends_the_job_as_timed_out() {
    let mut job = Job::out(
        1,
        spec(1, &[("sleep", "echo started\nsleep 60")]),
        "started\n".into(),
        "started\n",
    );
    job.spec["timeout_seconds"] = json!(6);
    let (api, state, work, agent_id, mut first) =
        start_jobs("adopt-deadline", std::slice::from_ref(&job), &[]).await;
    let seen = Instant::now();
    first.sigkill();
    // Past the deadline (6 s from the start, which was before `seen`) by 2 s or more.
    tokio::time::sleep(Duration::from_secs(8).saturating_sub(seen.elapsed())).await;
    assert_eq!(
        running_containers(&agent_id, Some(1)).await.len(),
        1,
        "the job's container outlives the agent"
    );

    let agent = Agent::pull_in(&agent_id, state.path(), work.path(), &api.url, &[], &[]).await;
    let restarted = Instant::now();
    let stopped = wait_until(
        "the timed-out job's completion",
        Duration::from_secs(10),
        &agent,
        async || api.job(1).completion.is_some(),
    )
    .await;
    eprintln!(
        "\n| figure (deadline passed while down) | value |\n|---|---|\n\
         | job deadline | 6 s; agent down {:.2} s |\n\
         | completed `timeout` | {:.2} s after the restart |\n",
        (restarted - seen).as_secs_f64(),
        stopped.as_secs_f64(),
    );
    let rec = api.job(1);
    let done = rec.completion.clone().unwrap();
    assert_eq!(done["status"], "timeout", "{done}\n{}", log_end(&agent));
    assert_eq!(rec.completes_accepted, 1);
    assert_eq!(api.count("start"), 1);
    assert_eq!(rec.log, "started\n");
    assert_eq!(done["log_bytes"], rec.log.len());
    let mut agent = agent;
    agent.assert_clean().await;
    assert!(agent.spool_files().is_empty(), "{:?}", agent.spool_files());
    agent.stop_leaving_nothing().await;
}

/// A job printing a line, then after 2 s ~1 MB at once, then after 2 s more its last line.
fn late_burst(id: i64) -> Job {
    let script = "echo d-begin\nsleep 2\nseq -w 1 150000\nsleep 2\necho d-end";
    let mut out = String::from("d-begin\n");
    for i in 1..=150_000 {
        out.push_str(&format!("{i:06}\n"));
    }
    out.push_str("d-end\n");
    Job::out(id, spec(id, &[("burst", script)]), out, "d-begin\n")
}

/// The restarted agent starts following the job's container log while (or just after) the job
/// prints ~1 MB at once: what it prints 2 s later must still reach the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_followed_from_the_middle_of_a_burst_loses_no_byte() {
    let job = late_burst(1);
    let (api, state, work, agent_id, mut first) =
        start_jobs("adopt-late-burst", std::slice::from_ref(&job), &[]).await;
    let seen = Instant::now();
    first.sigkill();
    let gone = Gone::now(&api, std::slice::from_ref(&job));
    // The burst starts 2 s after `d-begin`: the restarted agent adopts the job in its midst.
    tokio::time::sleep(Duration::from_millis(2100).saturating_sub(seen.elapsed())).await;
    let mut agent = Agent::pull_in(&agent_id, state.path(), work.path(), &api.url, &[], &[]).await;
    let restarted = Instant::now();
    wait_completions(&api, &agent, &[1]).await;
    let jobs = std::slice::from_ref(&job);
    print_figures(
        "adopted during a burst",
        &api,
        &agent,
        jobs,
        &gone,
        restarted,
    );
    assert_completed_as_if_nothing_happened(&api, &job, &gone.wall, &log_end(&agent));
    agent.stop_leaving_nothing().await;
}
