//! Soak: many trivial jobs through pull mode — the real `gryt-agent run` binary against the
//! conformance fake of the API, real Docker, concurrency 4 — while the fake answers 10% of all
//! API calls with a 503 and drops 5% of the connections (half of the job-call drops after the call
//! took effect, so the agent cannot know whether it got through).
//!
//! Passes only if every job was completed exactly once (repeats of the identical completion,
//! which the contract allows, are counted and reported), was started exactly once by the agent,
//! every streamed log holds exactly the job's output, no container with the agent's label, no
//! workspace and no spool file is left, and the agent's RSS at the end is within 20% of its RSS
//! after the first 100 jobs (after N/2 for N < 200).
//!
//! N is 200 (every CI run); `GRYT_SOAK_JOBS=1000 cargo test --test soak -- --nocapture` runs 1000
//! (any number). The figures are printed and repeated in the assertion messages; the measured
//! ones are in `docs/reliability.md`.

use crate::fake_api;
use crate::support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fake_api::FakeApi;
use serde_json::{Value, json};
use support::process::Agent;
use support::process::pull::KEY;
use support::{b64, unique_agent_id};

const CONCURRENCY: usize = 4;
const ERROR_RATE: f64 = 0.10;
const DROP_RATE: f64 = 0.05;

fn jobs_wanted() -> i64 {
    match std::env::var("GRYT_SOAK_JOBS") {
        Ok(v) => v
            .trim()
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .expect("GRYT_SOAK_JOBS must be a positive number"),
        Err(_) => 200,
    }
}

/// What a job prints.
struct Expected {
    stdout: String,
    stderr: String,
    /// Both streams in the order the script writes them.
    log: String,
}

/// A job printing something unique and multi-line on stdout, then stderr, then stdout again
/// (the last line without a newline, one line with a multi-byte character).
fn soak_job(id: i64) -> (Value, Expected) {
    let token = uuid::Uuid::new_v4().simple().to_string();
    let out1 = format!("soak job-{id} {token}\nline 2 of job-{id} é€\n");
    let err = format!("err job-{id} a\nerr job-{id} b {token}\n");
    let out2 = format!("tail job-{id} {}", &token[..8]);
    let script = format!(
        "printf '{}'; sleep 0.1; printf '{}' >&2; sleep 0.1; printf '{}'",
        out1.replace('\n', "\\n"),
        err.replace('\n', "\\n"),
        out2
    );
    let pipeline = format!("version: 1\nsteps:\n  - run: |\n      {script}\n");
    let job = json!({"job_id": id, "pipeline_b64": b64(&pipeline)});
    let expected = Expected {
        stdout: format!("{out1}{out2}"),
        stderr: err.clone(),
        log: format!("{out1}{err}{out2}"),
    };
    (job, expected)
}

/// Whether `log` is exactly the two streams merged, each intact and in order, whole lines at a
/// time (Docker does not order writes to two different pipes).
fn is_merge(log: &str, stdout: &str, stderr: &str) -> bool {
    let (mut out, mut err) = (stdout, stderr);
    let mut rest = log;
    while !rest.is_empty() {
        let line = match rest.find('\n') {
            Some(i) => &rest[..=i],
            None => rest,
        };
        if let Some(r) = out.strip_prefix(line) {
            out = r;
        } else if let Some(r) = err.strip_prefix(line) {
            err = r;
        } else {
            return false;
        }
        rest = &rest[line.len()..];
    }
    out.is_empty() && err.is_empty()
}

fn rss_text(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_jobs_through_pull_mode_with_api_faults() {
    let n = jobs_wanted();
    let checkpoint = if n >= 200 { 100 } else { (n / 2).max(1) };
    fake_api::quiet_injected_drops();
    let api = FakeApi::start(KEY, 30).await;
    api.seed(0x50A4 + n as u64);
    let mut expected = HashMap::new();
    for id in 1..=n {
        let (job, exp) = soak_job(id);
        api.push_job(job);
        expected.insert(id, exp);
    }
    api.faults(|f| {
        f.error_rate = ERROR_RATE;
        f.drop_rate = DROP_RATE;
    });

    let state = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let concurrency = CONCURRENCY.to_string();
    let mut agent = Agent::pull_in(
        &unique_agent_id("soak"),
        state.path(),
        work.path(),
        &api.url,
        &[],
        // With the warm pool on: its leftover check allows only ready warm containers.
        &[("GRYT_CONCURRENCY", &concurrency), ("GRYT_WARM_POOL", "1")],
    )
    .await;

    let started = Instant::now();
    let deadline = started + Duration::from_secs(60 + 2 * n as u64);
    let completed = |api: &FakeApi| {
        (1..=n)
            .filter(|id| api.job(*id).completion.is_some())
            .count() as i64
    };
    let mut rss_checkpoint = None;
    loop {
        let done = completed(&api);
        if rss_checkpoint.is_none() && done >= checkpoint {
            rss_checkpoint = Some((done, agent.rss_kib()));
        }
        if done == n {
            break;
        }
        assert!(
            agent.running(),
            "the agent died after {done} of {n} jobs; log tail:\n{}",
            tail(&agent.log_text())
        );
        assert!(
            Instant::now() < deadline,
            "only {done} of {n} jobs completed in {:?}; log tail:\n{}",
            started.elapsed(),
            tail(&agent.log_text())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let wall = started.elapsed();
    let rss_end = agent.rss_kib();
    let (rss_at, rss_first) = rss_checkpoint.unwrap();
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(60)).await, 0);

    // Figures.
    let log = agent.log_text();
    let injected = api.injected();
    let requests = api.requests();
    let mut retries: HashMap<String, usize> = HashMap::new();
    for line in log
        .lines()
        .filter(|l| l.contains("API call failed; retrying"))
    {
        let call = field(line, "call").unwrap_or("?").to_owned();
        *retries.entry(call).or_default() += 1;
    }
    let retries_total: usize = retries.values().sum();
    let mut retries_by_call: Vec<_> = retries.into_iter().collect();
    retries_by_call.sort();
    let calls = requests.len();
    let repeats: u32 = (1..=n)
        .map(|id| api.job(id).completes_accepted.saturating_sub(1))
        .sum();
    let jobs_per_s = n as f64 / wall.as_secs_f64();
    let growth = (rss_end as f64 - rss_first as f64) / rss_first as f64 * 100.0;

    // Checks, job by job.
    let mut starts: HashMap<i64, usize> = HashMap::new();
    for line in log.lines().filter(|l| l.contains("job started")) {
        let id: i64 = field(line, "job_id").unwrap().parse().unwrap();
        *starts.entry(id).or_default() += 1;
    }
    let mut reordered = 0;
    for id in 1..=n {
        let exp = &expected[&id];
        let rec = api.job(id);
        let done = rec.completion.as_ref().unwrap();
        assert_eq!(done["status"], "success", "job {id}: {done}");
        assert_eq!(
            starts.get(&id),
            Some(&1),
            "job {id} started {:?} times",
            starts.get(&id)
        );
        // Every complete the fake accepted for the job carried the same completion.
        let accepted: Vec<&Value> = requests
            .iter()
            .filter(|r| r.job_id == Some(id) && r.call == "complete" && r.status == 200)
            .map(|r| &r.body)
            .collect();
        assert_eq!(accepted.len() as u32, rec.completes_accepted, "job {id}");
        assert!(
            accepted.iter().all(|b| *b == done),
            "job {id}: differing completions"
        );
        assert_eq!(done["stdout"], exp.stdout.as_str(), "job {id} stdout");
        assert_eq!(done["stderr"], exp.stderr.as_str(), "job {id} stderr");
        assert_eq!(done["log_bytes"], rec.log.len(), "job {id} log_bytes");
        if rec.log != exp.log {
            assert!(
                is_merge(&rec.log, &exp.stdout, &exp.stderr),
                "job {id}: streamed log {:?} is not its output {:?}",
                rec.log,
                exp.log
            );
            reordered += 1;
        }
    }
    assert_eq!(api.queued(), 0);
    assert!(
        api.max_running() <= CONCURRENCY,
        "{} jobs at once",
        api.max_running()
    );
    agent.assert_clean().await;
    assert_eq!(
        agent.spool_files(),
        Vec::<std::path::PathBuf>::new(),
        "spool not empty"
    );

    let table = format!(
        "\n| figure | value |\n|---|---|\n\
         | jobs (concurrency {CONCURRENCY}) | {n} |\n\
         | wall time | {:.1} s |\n\
         | jobs/s | {jobs_per_s:.2} |\n\
         | API requests seen by the fake | {calls} |\n\
         | injected 503s ({:.0}% of calls) | {} |\n\
         | injected drops before the call took effect | {} |\n\
         | injected drops after it took effect (answer lost) | {} |\n\
         | retries logged by the agent | {retries_total} ({}) |\n\
         | completions per job | exactly 1 ({repeats} identical repeats accepted) |\n\
         | logs equal to the output, in write order | {} of {n} ({reordered} with stdout/stderr lines reordered by Docker, each stream intact) |\n\
         | max jobs running at once | {} |\n\
         | RSS after {rss_at} jobs | {} |\n\
         | RSS at the end | {} ({growth:+.1}%) |\n\
         | containers / workspaces / spool files left | 0 / 0 / 0 |\n",
        wall.as_secs_f64(),
        ERROR_RATE * 100.0,
        injected.errors,
        injected.drops_before,
        injected.drops_after,
        retries_by_call
            .iter()
            .map(|(c, k)| format!("{c} {k}"))
            .collect::<Vec<_>>()
            .join(", "),
        n - reordered,
        api.max_running(),
        rss_text(rss_first),
        rss_text(rss_end),
    );
    eprintln!("{table}");
    assert!(injected.errors > 0 && injected.drops_before + injected.drops_after > 0);
    assert!(
        growth.abs() <= 20.0,
        "RSS {} after {rss_at} jobs, {} at the end: {growth:+.1}%{table}",
        rss_text(rss_first),
        rss_text(rss_end)
    );
}

/// The value of `name=value` in a log line.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    let rest = &line[at..];
    let end = rest.find(' ').unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"'))
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The agent killed and started again every few seconds under load (`soak/restarts.rs`).
mod restarts;
