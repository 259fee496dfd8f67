//! Restart soak: the real agent binary is killed and started again every few seconds while it
//! runs jobs, against the conformance fake with API faults on: nothing lost, nothing doubled.
//!
//! Twelve jobs (four 3-step YAML jobs whose middle step prints a numbered line every 0.5 s,
//! seven single-command jobs printing a numbered line every 100 ms for 3–6 s, one printing
//! ~1 MB at once), concurrency 3, leases of 20 s, 5% of the API calls answered 503 and 3%
//! dropped (half of the job-call drops after the call took effect). Each agent process lives
//! 2–5 s (a seeded draw, `GRYT_SOAK_SEED` to change it), then is SIGKILLed, or in one round of
//! four handed over (SIGUSR2, exit 0 within 5 s); the next one starts at once on the same state
//! dir, work dir and agent id. Every other process runs with the warm pool on.
//!
//! The fake acts as a server may: a started job whose lease expired is leased again
//! (`set_relet_started`: the agent lost its lease answer or its lease record with the
//! process), and so is one the agent hands back (`set_requeue_run_again`: completed `error`,
//! "run it again", which a restarted agent does for a job killed before its progress was
//! recorded; a job handed back after that, one the agent could have carried on, fails the
//! test). A job run again has a new lease and a new log. So every job must end `success`
//! exactly once (one completion, identical repeats of it counted), its last lease's log byte for
//! byte its output, its result's streams the tails of its own; each lease started within one
//! agent process's life and never after the job's completion; never two running containers of
//! one job at once (sampled every 200 ms); at the end nothing of the agent left. The figures
//! (rounds, kills, hand-overs, jobs adopted, given up and run again, bytes lost, restart to
//! re-adoption) are printed before the checks.
//!
//! `cargo test --test it soak::restarts -- --ignored --nocapture` runs it (ignored until the
//! bugs it found are fixed); `GRYT_SOAK_WARM=0` keeps the warm pool off, `GRYT_SOAK_LOGS=<dir>`
//! keeps every agent process's log there.

use crate::adopt::{self, ADOPTED, GAVE_UP, Job};
use crate::fake_api::{self, FakeApi, Recorded};
use crate::support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use gryt_agent::pull::spool::INTERRUPTED;
use serde_json::Value;
use support::process::Agent;
use support::process::pull::KEY;

const JOBS: i64 = 12;
const CONCURRENCY: &str = "3";
/// Short enough that a lost lease expires during the run, long enough for a restart.
const TTL: u64 = 20;
const ERROR_RATE: f64 = 0.05;
const DROP_RATE: f64 = 0.03;
/// The whole run, restarts included.
const LIMIT: Duration = Duration::from_secs(180);
/// One round in this many ends with a hand-over instead of a SIGKILL.
const HAND_OVER_ONE_IN: u64 = 4;

/// splitmix64: the rounds' lengths and ends, repeatable from a seed.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

fn seed() -> u64 {
    std::env::var("GRYT_SOAK_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0x14)
}

/// Whether every other agent process runs with the warm pool (unless `GRYT_SOAK_WARM=0`).
fn warm_pool_rounds() -> bool {
    std::env::var("GRYT_SOAK_WARM").map_or(true, |v| v.trim() != "0")
}

/// Jobs 1–4: three steps, the middle one printing 6–8 numbered lines 0.5 s apart.
fn multi_step(id: i64) -> Job {
    let n = 6 + id % 3;
    let slow = format!(
        "i=1\nwhile [ $i -le {n} ]; do\n  echo \"m{id}-slow $i\"\n  sleep 0.5\n  i=$((i+1))\ndone"
    );
    let (first, last) = (format!("echo m{id}-first"), format!("echo m{id}-last"));
    let steps = [("first", first.as_str()), ("slow", &slow), ("last", &last)];
    let mut out = format!("m{id}-first\n");
    for i in 1..=n {
        out.push_str(&format!("m{id}-slow {i}\n"));
    }
    out.push_str(&format!("m{id}-last\n"));
    Job::out(id, adopt::spec(id, &steps), out, "")
}

/// Jobs 5–11: one command printing 31–55 numbered lines 100 ms apart, every tenth on stderr
/// (one write each, 100 ms apart: their order in the log is the order written).
fn steady(id: i64) -> Job {
    let n = 30 + (id * 7) % 31;
    let script = format!(
        "i=1\nwhile [ $i -le {n} ]; do\n  if [ $((i % 10)) -eq 5 ]; then echo \"s{id}-err $i\" >&2; \
         else echo \"s{id}-out $i\"; fi\n  sleep 0.1\n  i=$((i+1))\ndone"
    );
    let (mut stdout, mut stderr, mut log) = (String::new(), String::new(), String::new());
    for i in 1..=n {
        let (line, stream) = if i % 10 == 5 {
            (format!("s{id}-err {i}\n"), &mut stderr)
        } else {
            (format!("s{id}-out {i}\n"), &mut stdout)
        };
        stream.push_str(&line);
        log.push_str(&line);
    }
    let mut job = Job::out(id, adopt::spec(id, &[("steady", &script)]), stdout, "");
    (job.stderr, job.log) = (stderr, log);
    job
}

/// Job 12: a line, 1 s of quiet, 1.05 MB at once (more than the result keeps), 2 s more.
fn burst(id: i64) -> Job {
    let script = format!("echo big-{id}\nsleep 1\nseq -w 1 150000\nsleep 2\necho big-end");
    let mut out = format!("big-{id}\n");
    for i in 1..=150_000 {
        out.push_str(&format!("{i:06}\n"));
    }
    out.push_str("big-end\n");
    Job::out(id, adopt::spec(id, &[("burst", &script)]), out, "")
}

fn jobs() -> Vec<Job> {
    (1..=JOBS)
        .map(|id| match id {
            1..=4 => multi_step(id),
            JOBS => burst(id),
            _ => steady(id),
        })
        .collect()
}

/// How an agent process of the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Killed,
    HandedOver,
    /// The last one: SIGTERM once every job completed.
    Drained,
}

/// One agent process of the run: its life, how it ended, and what it logged.
struct Life {
    started: Instant,
    ended: Instant,
    end: End,
    warm: bool,
    log: String,
}

impl Life {
    fn covers(&self, at: Instant) -> bool {
        self.started <= at && at <= self.ended
    }
}

/// Running job containers of the agent, by job id (more than one: two runs of a job at once).
async fn running_per_job(agent_id: &str) -> HashMap<String, usize> {
    use bollard::query_parameters::ListContainersOptionsBuilder;
    let filters = HashMap::from([
        ("label", vec![format!("io.gryt.agent.id={agent_id}")]),
        ("status", vec!["running".to_owned()]),
    ]);
    let options = ListContainersOptionsBuilder::default()
        .filters(&filters)
        .build();
    let listed = support::docker()
        .await
        .list_containers(Some(options))
        .await
        .unwrap_or_default();
    let mut per_job = HashMap::new();
    for labels in listed.into_iter().filter_map(|c| c.labels) {
        if let Some(job) = labels.get("io.gryt.job.id") {
            *per_job.entry(job.clone()).or_default() += 1;
        }
    }
    per_job
}

/// Lets `agent` run for `life` or until every job completed (true then), sampling the job
/// containers every 200 ms into `doubled` (job id, how many at once).
async fn live_for(
    api: &FakeApi,
    agent: &mut Agent,
    life: Duration,
    doubled: &mut Vec<(String, usize)>,
) -> bool {
    let until = Instant::now() + life;
    loop {
        if (1..=JOBS).all(|id| api.job(id).completion.is_some()) {
            return true;
        }
        assert!(
            agent.running(),
            "the agent died on its own; log:\n{}",
            agent.log_text()
        );
        for (job, n) in running_per_job(&agent.agent_id).await {
            if n > 1 {
                doubled.push((job, n));
            }
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGUSR2 once the agent answers (its handlers are in place): exit 0 within 5 s.
async fn hand_over(agent: &mut Agent) {
    agent.wait_ready().await;
    agent.signal("USR2");
    let code = agent.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(code, 0, "hand-over exit code; log:\n{}", agent.log_text());
}

/// The job ids of the lines of `log` holding `message`, in order.
fn jobs_logged(log: &str, message: &str) -> Vec<i64> {
    log.lines()
        .filter(|l| l.contains(message))
        .filter_map(|l| super::field(l, "job_id")?.parse().ok())
        .collect()
}

/// For each life after the first, the longest time from its start to the first renewed lease
/// (heartbeat answered 200) of a job it adopted: the re-adoption.
fn readoption_times(lives: &[Life], requests: &[Recorded]) -> Vec<Duration> {
    let mut times = Vec::new();
    for life in lives.iter().skip(1) {
        let worst = jobs_logged(&life.log, ADOPTED)
            .into_iter()
            .filter_map(|id| {
                requests
                    .iter()
                    .find(|r| {
                        r.call == "heartbeat"
                            && r.job_id == Some(id)
                            && r.status == 200
                            && !r.answer_dropped
                            && life.covers(r.at)
                    })
                    .map(|r| r.at - life.started)
            })
            .max();
        times.extend(worst);
    }
    times
}

/// The run: its directories and agent id, its agent processes so far (the killed and
/// handed-over ones kept: dropping one removes what carries its agent id, the next one's jobs),
/// and the samples of doubled job containers.
struct Run {
    url: String,
    agent_id: String,
    state: tempfile::TempDir,
    work: tempfile::TempDir,
    lives: Vec<Life>,
    gone: Vec<Agent>,
    doubled: Vec<(String, usize)>,
}

impl Run {
    async fn start_agent(&self, warm: bool) -> Agent {
        let env = [
            ("GRYT_CONCURRENCY", CONCURRENCY),
            ("GRYT_WARM_POOL", if warm { "1" } else { "0" }),
        ];
        let (state, work) = (self.state.path(), self.work.path());
        Agent::pull_in(&self.agent_id, state, work, &self.url, &[], &env).await
    }

    /// Keeps the life of an agent process that ended (and its log in `GRYT_SOAK_LOGS`, a
    /// directory, when set: the state dir goes with the test).
    fn record(&mut self, started: Instant, end: End, warm: bool, agent: &Agent) {
        let log = agent.log_text();
        if let Ok(dir) = std::env::var("GRYT_SOAK_LOGS") {
            let path = std::path::Path::new(&dir).join(format!("process-{}.log", self.lives.len()));
            std::fs::write(path, &log).expect("GRYT_SOAK_LOGS: cannot write the log");
        }
        let ended = Instant::now();
        self.lives.push(Life {
            started,
            ended,
            end,
            warm,
            log,
        });
    }

    /// Starts, lets live and kills (or hands over) agent processes until every job completed;
    /// returns the last one, running, and when it started.
    async fn rounds(&mut self, api: &FakeApi, dice: &mut Dice) -> (Agent, Instant, bool) {
        let begun = Instant::now();
        loop {
            let warm = warm_pool_rounds() && self.lives.len().is_multiple_of(2);
            let mut agent = self.start_agent(warm).await;
            let started = Instant::now();
            let life = Duration::from_millis(2000 + dice.below(3001));
            if live_for(api, &mut agent, life, &mut self.doubled).await {
                return (agent, started, warm);
            }
            assert!(
                begun.elapsed() < LIMIT,
                "not every job completed in {LIMIT:?} ({} rounds); last log:\n{}",
                self.lives.len() + 1,
                agent.log_text()
            );
            let end = if dice.below(HAND_OVER_ONE_IN) == 0 {
                hand_over(&mut agent).await;
                End::HandedOver
            } else {
                agent.sigkill();
                End::Killed
            };
            self.record(started, end, warm, &agent);
            self.gone.push(agent);
        }
    }
}

/// The fake with `jobs` queued, a server's lease rules (a started job whose lease expired,
/// or that was handed back, is leased again) and the random faults seeded from `seed`.
async fn fake_with(jobs: &[Job], seed: u64) -> FakeApi {
    fake_api::quiet_injected_drops();
    let api = FakeApi::start(KEY, TTL).await;
    api.set_relet_started(true);
    api.set_requeue_run_again(true);
    api.set_grace(Duration::from_secs(2));
    for job in jobs {
        api.push_job(job.spec.clone());
    }
    api.seed(0x50A4_0000 + seed);
    api.faults(|f| {
        f.error_rate = ERROR_RATE;
        f.drop_rate = DROP_RATE;
    });
    api
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_kill_and_restart_the_agent_every_few_seconds_with_api_faults() {
    let (jobs, seed) = (jobs(), seed());
    let api = fake_with(&jobs, seed).await;
    // Made before the first process starts, not during its life.
    support::test_image().await;
    let mut run = Run {
        url: api.url.clone(),
        agent_id: support::unique_agent_id("soak-restart"),
        state: tempfile::tempdir().unwrap(),
        work: tempfile::tempdir().unwrap(),
        lives: Vec::new(),
        gone: Vec::new(),
        doubled: Vec::new(),
    };
    let begun = Instant::now();
    let (mut last, started, warm) = run.rounds(&api, &mut Dice(seed)).await;
    let wall = begun.elapsed();
    last.signal("TERM");
    let code = last.wait_exit(Duration::from_secs(60)).await;
    run.record(started, End::Drained, warm, &last);

    let requests = api.requests();
    print_figures(&api, &jobs, &run, &requests, wall, seed);
    assert_eq!(code, 0, "the last agent's exit (SIGTERM)");
    last.assert_clean_now().await;
    assert_eq!(last.spool_files(), Vec::<std::path::PathBuf>::new());
    assert_eq!(run.doubled, Vec::new(), "two running containers of one job");
    // Every job checked (each failure printed as it is found), then the verdict.
    let failed: Vec<i64> = jobs
        .iter()
        .filter(|job| {
            let check = || check_job(&api, job, &requests, &run.lives);
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(check)).is_err()
        })
        .map(|job| job.id)
        .collect();
    assert_eq!(
        failed,
        Vec::<i64>::new(),
        "jobs failing their checks (see above)"
    );
    assert_eq!(api.queued(), 0);
    let injected = api.injected();
    assert!(injected.errors > 0 && injected.drops_before + injected.drops_after > 0);
}

/// Lines of every process's log about job `id` (the last 60), for failure messages.
fn mentions(lives: &[Life], id: i64) -> String {
    let needle = format!("job_id={id} ");
    let lines: Vec<String> = lives
        .iter()
        .enumerate()
        .flat_map(|(i, life)| {
            let needle = needle.clone();
            life.log
                .lines()
                .filter(move |l| format!("{l} ").contains(&needle))
                .map(move |l| format!("[process {i}] {l}"))
        })
        .collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// One job at the end: one completion (repeats identical), `success`, its last lease's log and
/// its result's streams its own, and each of its leases started by one process only, before
/// the completion.
fn check_job(api: &FakeApi, job: &Job, requests: &[Recorded], lives: &[Life]) {
    let id = job.id;
    let rec = api.job(id);
    let about = || mentions(lives, id);
    let Some(done) = rec.completion.clone() else {
        panic!("job {id} never completed\n{}", about());
    };
    assert_eq!(done["status"], "success", "job {id}: {done}\n{}", about());
    assert!(!rec.lost, "job {id} ended as lost");
    check_handed_back(id, &rec.handed_back, lives);
    let accepted: Vec<&Recorded> = requests
        .iter()
        .filter(|r| r.job_id == Some(id) && r.call == "complete" && r.status == 200)
        .filter(|r| r.body["lease_id"] == done["lease_id"])
        .collect();
    assert_eq!(accepted.len() as u32, rec.completes_accepted, "job {id}");
    assert!(
        accepted.iter().all(|r| r.body == done),
        "job {id}: differing completions\n{}",
        about()
    );
    adopt::assert_same_text(&format!("job {id}: streamed log"), &rec.log, &job.log);
    assert_eq!(done["log_bytes"], rec.log.len(), "job {id}: log_bytes");
    let stream = |name: &str| done[name].as_str().unwrap_or_default().to_owned();
    let what = |name: &str| format!("job {id}: result {name}");
    adopt::assert_same_text(
        &what("stdout"),
        &stream("stdout"),
        &adopt::tail(&job.stdout),
    );
    adopt::assert_same_text(
        &what("stderr"),
        &stream("stderr"),
        &adopt::tail(&job.stderr),
    );
    if id <= 4 {
        adopt::assert_three_steps_passed(api, id);
    }
    check_starts(id, requests, lives, accepted[0].at);
    let started: usize = lives
        .iter()
        .map(|l| {
            jobs_logged(&l.log, "job started")
                .iter()
                .filter(|j| **j == id)
                .count()
        })
        .sum();
    assert!(
        started as u32 <= rec.leases,
        "job {id} started {started} times under {} leases\n{}",
        rec.leases,
        about()
    );
}

/// A job handed back (`error`, "run it again") is one whose lease record had no progress yet
/// (killed while its container was being made): the restarted agent cannot know its container.
/// One with recorded progress (container, steps) that was handed back is a job the agent could
/// have carried on and failed instead.
fn check_handed_back(id: i64, handed_back: &[(Value, String)], lives: &[Life]) {
    for (completion, _) in handed_back {
        assert_eq!(
            completion["error"],
            INTERRUPTED,
            "job {id}: handed back though its progress was recorded
{}",
            mentions(lives, id)
        );
    }
}

/// All `start` calls of each lease of job `id` fall within one process's life (no process
/// starts a job another one started) and before the job's first accepted completion.
fn check_starts(id: i64, requests: &[Recorded], lives: &[Life], completed: Instant) {
    let mut by_lease: HashMap<String, Vec<Instant>> = HashMap::new();
    for r in requests
        .iter()
        .filter(|r| r.call == "start" && r.job_id == Some(id))
    {
        let lease = r.body["lease_id"].as_str().unwrap_or_default().to_owned();
        by_lease.entry(lease).or_default().push(r.at);
    }
    for (lease, ats) in by_lease {
        assert!(
            lives.iter().any(|l| ats.iter().all(|at| l.covers(*at))),
            "job {id}: lease {lease} started by more than one agent process\n{}",
            mentions(lives, id)
        );
        assert!(
            ats.iter().all(|at| *at < completed),
            "job {id}: started after its completion"
        );
    }
}

/// How many lines of all the processes' logs hold `message`.
fn lines_with(lives: &[Life], message: &str) -> usize {
    lives
        .iter()
        .map(|l| jobs_logged(&l.log, message).len())
        .sum()
}

/// Prints the run's figures as a table (before the checks, so a failure has them too).
fn print_figures(
    api: &FakeApi,
    jobs: &[Job],
    run: &Run,
    requests: &[Recorded],
    wall: Duration,
    seed: u64,
) {
    let lives = &run.lives;
    let ended = |end: End| lives.iter().filter(|l| l.end == end).count();
    let mut adopted_jobs: Vec<i64> = lives
        .iter()
        .flat_map(|l| jobs_logged(&l.log, ADOPTED))
        .collect();
    adopted_jobs.sort_unstable();
    adopted_jobs.dedup();
    let records: Vec<_> = jobs.iter().map(|j| api.job(j.id)).collect();
    let leased_again: u32 = records.iter().map(|r| r.leases.saturating_sub(1)).sum();
    let (early, late): (Vec<&(Value, String)>, Vec<_>) = records
        .iter()
        .flat_map(|r| &r.handed_back)
        .partition(|(done, _)| done["error"] == INTERRUPTED);
    let printed = early.iter().filter(|(_, log)| !log.is_empty()).count();
    let repeats: u32 = records
        .iter()
        .map(|r| r.completes_accepted.saturating_sub(1))
        .sum();
    let lost: usize = jobs
        .iter()
        .zip(&records)
        .map(|(j, r)| j.log.len() - adopt::common_prefix(&r.log, &j.log))
        .sum();
    let readopt = readoption_times(lives, requests);
    let readopt_max = readopt.iter().max().map_or(0.0, |d| d.as_secs_f64());
    let injected = api.injected();
    let retries = lives
        .iter()
        .map(|l| l.log.matches("API call failed; retrying").count())
        .sum::<usize>();
    eprintln!(
        "\n| figure (restart soak, seed {seed}) | value |\n|---|---|\n\
         | jobs (concurrency {CONCURRENCY}, lease TTL {TTL} s) | {} |\n\
         | wall time | {:.1} s |\n\
         | agent processes (rounds) | {} ({} with the warm pool) |\n\
         | SIGKILLs / hand-overs (SIGUSR2) | {} / {} |\n\
         | jobs adopted (log lines) | {} ({} distinct jobs) |\n\
         | jobs given up by a restarted agent (log) | {} |\n\
         | jobs handed back (`error`, run again) killed before their progress was recorded | {} ({printed} had output on the server) |\n\
         | jobs handed back that could have been carried on (container, steps recorded) | {} |\n\
         | leases after the first (lease expired, or handed back) | {leased_again} |\n\
         | bytes lost | {lost} |\n\
         | restart to re-adoption (worst per restart: max, mean) | {readopt_max:.2} s, {:.2} s over {} restarts |\n\
         | API requests / injected 503s / drops before / drops after | {} / {} / {} / {} |\n\
         | retries logged by the agents | {retries} |\n\
         | completions per job | exactly 1 ({repeats} identical repeats accepted) |\n\
         | max jobs started and not ended at once (fake; a dead agent's included) | {} |\n\
         | samples with two running containers of a job | {} |\n",
        jobs.len(),
        wall.as_secs_f64(),
        lives.len(),
        lives.iter().filter(|l| l.warm).count(),
        ended(End::Killed),
        ended(End::HandedOver),
        lines_with(lives, ADOPTED),
        adopted_jobs.len(),
        lines_with(lives, GAVE_UP),
        early.len(),
        late.len(),
        readopt.iter().map(Duration::as_secs_f64).sum::<f64>() / readopt.len().max(1) as f64,
        readopt.len(),
        requests.len(),
        injected.errors,
        injected.drops_before,
        injected.drops_after,
        api.max_running(),
        run.doubled.len(),
    );
}
