//! Crash: SIGKILL the agent with 4 jobs running and one finished job's result waiting in the
//! spool (the fake refuses that `complete` with 503 until after the kill), let the 4 jobs' leases
//! go while no agent runs (the server revokes them: every call with them answers 410), restart
//! it with the same state dir, work dir and agent id, and check what a crash must not cost:
//!
//! - the killed jobs cannot be adopted (their leases are gone): the restarted agent gives each
//!   up ("gave up a job of an earlier run"), and their containers are gone within 5 s of the
//!   restart, their workspaces too, as are the killed agent's warm containers (the orphan sweep);
//! - nothing more is sent for those jobs that the server accepts, and none is started again;
//! - the spooled result is delivered by the restarted agent, exactly once;
//! - nothing is reported twice, and the restarted agent takes new work.
//!
//! (Jobs whose lease the server still honours are adopted: see `adopt`.) The agent runs with 5
//! slots: 4 for the long jobs and the one the spooled job holds while its delivery is refused.
//! The figures are printed and repeated in the assertion messages.

use crate::fake_api;
use crate::support;

use std::time::{Duration, Instant};

use fake_api::FakeApi;
use support::process::Agent;
use support::process::pull::KEY;
use support::{containers_of, shell_job, unique_agent_id};

const TTL: u64 = 30;
const SPOOLED: i64 = 5;
const KILLED: [i64; 4] = [1, 2, 3, 4];
const AFTER: i64 = 6;
const GAVE_UP: &str = "gave up a job of an earlier run";
const ADOPTED: &str = "adopted a job of an earlier run";

fn from_agent(r: &fake_api::Recorded) -> bool {
    r.user_agent
        .as_deref()
        .is_some_and(|u| u.starts_with("gryt-agent/"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_jobs_running_then_restart_loses_and_repeats_nothing() {
    let api = FakeApi::start(KEY, TTL).await;
    api.push_job(shell_job(SPOOLED, "echo spooled-5"));
    for id in KILLED {
        api.push_job(shell_job(id, &format!("echo started-{id}; sleep 300")));
    }
    api.faults(|f| {
        f.refuse_complete.insert(SPOOLED);
    });
    let state = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let agent_id = unique_agent_id("crash");
    // With the warm pool on: the killed agent's pool is swept like its jobs' containers.
    let env = [("GRYT_CONCURRENCY", "5"), ("GRYT_WARM_POOL", "1")];
    let mut agent = Agent::pull_in(&agent_id, state.path(), work.path(), &api.url, &[], &env).await;

    api.wait_for(
        "4 jobs running and a refused complete",
        Duration::from_secs(60),
        |a| {
            KILLED
                .iter()
                .all(|id| a.job(*id).log.contains(&format!("started-{id}")))
                && a.requests()
                    .iter()
                    .any(|r| r.call == "complete" && r.job_id == Some(SPOOLED))
        },
    )
    .await;
    let spooled = agent.spooled_results();
    assert_eq!(spooled.len(), 1, "{spooled:?}");
    assert!(
        spooled[0]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("job-5-")
    );
    // The spooled job's container is gone (it finished: its cleanup does not wait for a refused
    // result past `CLEANUP_WAITS_FOR_DELIVERY`, 5 s); the 4 long jobs' are running, beside the
    // ready containers of the warm pool (a job that took a warm one runs in it).
    let until = Instant::now() + Duration::from_secs(20);
    let before = loop {
        let ready = agent.health().await["warm_pool"]["ready"].as_u64().unwrap() as usize;
        let all = containers_of(&agent_id).await;
        if all.len() == 4 + ready && agent.workspaces().len() == 4 + ready {
            break all;
        }
        assert!(
            Instant::now() < until,
            "not 4 job containers and workspaces: {all:?} {:?}",
            agent.workspaces()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let workspaces_before = agent.workspaces();

    agent.sigkill();
    let killed = Instant::now();
    let refused_before_kill = api
        .requests()
        .iter()
        .filter(|r| r.call == "complete" && r.status == 503)
        .count();
    assert_eq!(api.job(SPOOLED).completion, None);
    assert_eq!(
        containers_of(&agent_id).await.len(),
        before.len(),
        "the killed agent's containers outlive it"
    );
    api.faults(|f| {
        f.refuse_complete.clear();
        // The killed jobs' leases are gone while no agent runs: none may be adopted.
        f.revoke.extend(KILLED);
    });

    let mut agent = Agent::pull_in(&agent_id, state.path(), work.path(), &api.url, &[], &env).await;
    let restarted = Instant::now();
    while containers_of(&agent_id)
        .await
        .iter()
        .any(|c| before.contains(c))
    {
        assert!(
            restarted.elapsed() < Duration::from_secs(5),
            "the killed jobs' containers are still there {:?} after the restart; log:\n{}",
            restarted.elapsed(),
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let swept_after = restarted.elapsed();

    api.wait_for("the spooled result", Duration::from_secs(30), |a| {
        a.job(SPOOLED).completion.is_some()
    })
    .await;
    let delivered_after = restarted.elapsed();
    while agent.logged_jobs(GAVE_UP) != KILLED {
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "the killed jobs were not all given up: {:?}; log:\n{}",
            agent.logged_jobs(GAVE_UP),
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let given_up_after = restarted.elapsed();
    // The restarted agent still takes work.
    api.push_job(shell_job(AFTER, "echo after-restart"));
    api.wait_for("the job after the restart", Duration::from_secs(30), |a| {
        a.job(AFTER).completion.is_some()
    })
    .await;
    // Time to (wrongly) send more.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let requests = api.requests();
    let rec = api.job(SPOOLED);
    let done = rec.completion.clone().unwrap();
    assert_eq!(done["status"], "success", "{done}");
    assert_eq!(done["stdout"], "spooled-5\n");
    assert_eq!(rec.log, "spooled-5\n");
    assert_eq!(done["log_bytes"], rec.log.len());
    let accepted_5 = requests
        .iter()
        .filter(|r| r.call == "complete" && r.job_id == Some(SPOOLED) && r.status == 200)
        .count();
    assert_eq!(
        (rec.completes_accepted, accepted_5),
        (1, 1),
        "the spooled result was reported more than once"
    );
    let log = agent.log_text();
    assert_eq!(agent.logged_jobs(ADOPTED), Vec::<i64>::new(), "{log}");
    for id in KILLED {
        let rec = api.job(id);
        // The server holds no lease for it: nothing is accepted, nothing resent, no new start.
        assert_eq!(rec.completion, None, "job {id} completed without its lease");
        assert_eq!(rec.completes_accepted, 0, "job {id}");
        assert_eq!(rec.log, format!("started-{id}\n"));
        let after: Vec<_> = requests
            .iter()
            .filter(|r| r.job_id == Some(id) && from_agent(r) && r.at > killed)
            .map(|r| (r.call.clone(), r.status))
            .collect();
        assert!(
            after.iter().all(|(c, s)| c != "start" && *s != 200),
            "job {id}: calls after the kill: {after:?}"
        );
    }
    let after = api.job(AFTER);
    assert_eq!(after.completes_accepted, 1);
    assert_eq!(after.log, "after-restart\n");
    // The killed jobs' and the killed agent's ready warm containers' workspaces are gone too.
    let left: Vec<_> = workspaces_before.iter().filter(|w| w.exists()).collect();
    assert!(left.is_empty(), "workspaces left: {left:?}\n{log}");
    let swept = log.matches("orphan sweep removed a container").count();
    assert!(log.contains("resending a spooled result"), "{log}");
    let files = agent.spool_files();
    assert!(files.is_empty(), "spool not empty: {files:?}");

    assert!(agent.running(), "the restarted agent died");
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(30)).await, 0);
    agent.assert_clean().await;

    eprintln!(
        "\n| figure | value |\n|---|---|\n\
         | jobs killed with the agent (SIGKILL) | 4 running + 1 result in the spool |\n\
         | complete refusals (503) before the kill | {refused_before_kill} |\n\
         | killed jobs' leases | revoked while no agent ran: all 4 given up {:.2} s after the restart, none adopted |\n\
         | containers left by the killed agent | {} (4 jobs + warm), all removed {:.2} s after the restart (limit 5 s; {swept} by the orphan sweep) |\n\
         | workspaces left | {}, all removed |\n\
         | spooled result delivered | {:.2} s after the restart, exactly once |\n\
         | completions per job | job {SPOOLED} and job {AFTER} 1 each (`success`); jobs 1-4 none (lease gone) |\n",
        given_up_after.as_secs_f64(),
        before.len(),
        swept_after.as_secs_f64(),
        workspaces_before.len(),
        delivered_after.as_secs_f64(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_is_spooled_before_its_log_is_delivered_and_survives_sigkill() {
    let api = FakeApi::start(KEY, 60).await;
    api.push_job(shell_job(1, "echo one; echo two"));
    // No log chunk gets through: delivery of the log hangs in retries.
    api.faults(|f| {
        f.errors.insert("logs".into(), 1_000_000);
    });
    let (state, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let agent_id = unique_agent_id("result-first");
    let mut agent = Agent::pull_in(&agent_id, state.path(), work.path(), &api.url, &[], &[]).await;
    let until = Instant::now() + Duration::from_secs(60);
    while agent.spooled_results().is_empty() {
        assert!(
            Instant::now() < until,
            "the finished job's result never reached the spool; log:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.sigkill();
    assert!(api.job(1).completion.is_none());
    assert_eq!(api.count("complete"), 0, "complete sent before the log");
    api.faults(|f| f.errors.clear());

    let mut agent = Agent::pull_in(&agent_id, state.path(), work.path(), &api.url, &[], &[]).await;
    api.wait_for("the spooled result", Duration::from_secs(30), |a| {
        a.job(1).completion.is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rec = api.job(1);
    let done = rec.completion.clone().unwrap();
    assert_eq!(done["status"], "success", "{done}");
    assert_eq!(rec.log, "one\ntwo\n");
    assert_eq!(done["log_bytes"], rec.log.len());
    assert_eq!(rec.completes_accepted, 1);
    assert_eq!(api.count("complete"), 1);
    assert!(agent.spooled_results().is_empty());
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(20)).await, 0);
    agent.assert_clean().await;
}
