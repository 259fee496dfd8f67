//! Pull mode against a hostile or broken API: the real agent binary against the conformance
//! fake with its fault switches, one answer the protocol does not allow (or allows but should
//! not pace the agent) per test. `docs/reliability.md` lists what each does and the figures.

use crate::fake_api;
use crate::support;

use std::time::{Duration, Instant};

use fake_api::FakeApi;
use serde_json::json;
use support::process::Agent;
use support::process::pull::KEY;
use support::{b64, containers_of, shell_job};

#[tokio::test]
async fn an_instant_204_server_gets_at_most_about_two_lease_calls_a_second() {
    let api = FakeApi::start(KEY, 30).await;
    api.faults(|f| f.instant_204 = true);
    let mut agent = Agent::pull("instant-204", &api.url, &[], &[]).await;
    agent.wait_ready().await;
    let first = Instant::now();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let window = first.elapsed().as_secs_f64();
    let calls = api.count("lease");
    let rate = calls as f64 / window;
    eprintln!("lease calls against an instant-204 server: {calls} in {window:.1} s ({rate:.2}/s)");
    assert!(rate <= 2.5, "{calls} lease calls in {window:.1} s");
    assert!(calls >= 3, "the agent stopped asking: {calls}");
    // Said once, not once per call.
    let log = agent.log_text();
    assert_eq!(
        log.matches("well before the wait asked for").count(),
        1,
        "{log}"
    );
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(20)).await, 0);
}

#[tokio::test]
async fn a_lease_wait_of_zero_is_paced_too() {
    let api = FakeApi::start(KEY, 30).await;
    let mut agent = Agent::pull("wait-0", &api.url, &[], &[("GRYT_LEASE_WAIT", "0")]).await;
    agent.wait_ready().await;
    let first = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let calls = api.count("lease");
    let rate = calls as f64 / first.elapsed().as_secs_f64();
    eprintln!("lease calls with lease_wait_seconds 0: {calls} ({rate:.2}/s)");
    assert!(rate <= 2.5, "{calls} lease calls: {rate:.2}/s");
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(20)).await, 0);
}

#[tokio::test]
async fn jobs_whose_start_is_refused_are_paced_like_quick_answers() {
    let api = FakeApi::start(KEY, 30).await;
    for id in 1..=40 {
        api.push_job(shell_job(id, "echo never"));
    }
    api.faults(|f| f.refuse_start.extend(1..=40));
    let mut agent = Agent::pull("refused-stream", &api.url, &[], &[]).await;
    agent.wait_ready().await;
    let first = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let calls = api.count("lease");
    let rate = calls as f64 / first.elapsed().as_secs_f64();
    eprintln!("lease calls while every start is refused: {calls} ({rate:.2}/s)");
    assert!(rate <= 2.5, "{calls} lease calls: {rate:.2}/s");
    assert!(calls >= 2, "{calls}");
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(20)).await, 0);
    agent.assert_clean().await;
}

#[tokio::test]
async fn an_unreadable_job_is_started_and_completed_with_error() {
    let api = FakeApi::start(KEY, 30).await;
    // `pipeline_b64` must be a string: the job does not decode, its lease and id do.
    api.push_job(json!({"job_id": 7, "pipeline_b64": 5}));
    let mut agent = Agent::pull("unreadable", &api.url, &["--once"], &[]).await;
    assert_eq!(
        agent.wait_exit(Duration::from_secs(30)).await,
        0,
        "{}",
        agent.log_text()
    );
    let rec = api.job(7);
    assert!(rec.started, "not started");
    let done = rec.completion.expect("not completed");
    assert_eq!(done["status"], "error", "{done}");
    let error = done["error"].as_str().unwrap();
    assert!(
        error.contains("cannot read this job") && error.contains("pipeline_b64"),
        "{error}"
    );
    assert_eq!(done["log_bytes"], 0);
    assert_eq!(api.count("lease"), 1);
    agent.assert_clean().await;
}

#[tokio::test]
async fn an_endless_lease_answer_is_cut_at_the_cap() {
    let api = FakeApi::start(KEY, 30).await;
    api.faults(|f| f.endless_lease_answer = true);
    let mut agent = Agent::pull("endless", &api.url, &[], &[]).await;
    agent.wait_ready().await;
    let until = Instant::now() + Duration::from_secs(20);
    while !agent.log_text().contains("larger than") {
        assert!(Instant::now() < until, "{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss_mib = agent.rss_kib() / 1024;
    eprintln!("agent RSS after an endless lease answer: {rss_mib} MiB");
    assert!(
        rss_mib < 200,
        "agent RSS {rss_mib} MiB after an endless answer"
    );
    assert!(agent.log_text().contains("16777216 bytes"));
    let health = agent.health().await;
    assert!(health.to_string().contains("larger than"), "{health}");
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(20)).await, 0);
}

#[tokio::test]
async fn a_committed_beyond_what_was_sent_skips_no_output() {
    let api = FakeApi::start(KEY, 30).await;
    api.push_job(shell_job(
        1,
        "echo first; sleep 1; echo second; sleep 1; echo third",
    ));
    api.faults(|f| f.overshoot_committed = 1);
    let mut agent = Agent::pull("overshoot", &api.url, &["--once"], &[]).await;
    assert_eq!(
        agent.wait_exit(Duration::from_secs(60)).await,
        0,
        "{}",
        agent.log_text()
    );
    let rec = api.job(1);
    assert_eq!(rec.log, "first\nsecond\nthird\n");
    let done = rec.completion.unwrap();
    assert_eq!(done["log_bytes"], rec.log.len());
    let log = agent.log_text();
    assert_eq!(
        log.matches("protocol error: the API's `committed` is beyond")
            .count(),
        1,
        "{log}"
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn a_log_without_progress_is_given_up_after_the_setting() {
    let api = FakeApi::start(KEY, 30).await;
    api.push_job(shell_job(1, "echo some-output"));
    api.faults(|f| f.stall_logs = true);
    let started = Instant::now();
    let mut agent = Agent::pull(
        "give-up",
        &api.url,
        &["--once"],
        &[("GRYT_LOG_GIVE_UP", "5")],
    )
    .await;
    assert_eq!(
        agent.wait_exit(Duration::from_secs(40)).await,
        0,
        "{}",
        agent.log_text()
    );
    assert!(started.elapsed() >= Duration::from_secs(5));
    let rec = api.job(1);
    let done = rec.completion.expect("not completed");
    // The completion says how long the log is; the server holds less: a truncated log.
    assert_eq!(done["status"], "success");
    assert_eq!(done["log_bytes"], "some-output\n".len());
    assert_eq!(rec.log, "");
    assert!(agent.log_text().contains("log_give_up_seconds"));
    agent.assert_clean().await;
}

#[tokio::test]
async fn a_lease_is_given_up_before_the_server_could_re_lease_it() {
    const TTL: u64 = 3;
    let api = FakeApi::start(KEY, TTL).await;
    api.push_job(shell_job(1, "echo started; sleep 60"));
    let mut agent = Agent::pull("margin", &api.url, &[], &[]).await;
    api.wait_for("job output", Duration::from_secs(30), |a| {
        a.job(1).log.contains("started")
    })
    .await;
    // No heartbeat is confirmed from now on: the lease runs out on the fake's clock.
    api.faults(|f| {
        f.errors.insert("heartbeat".into(), 1_000);
    });
    let until = Instant::now() + Duration::from_secs(TTL + 10);
    let (seen, expires) = loop {
        let expires = api.lease_expires(1).unwrap();
        if agent.log_text().contains("lease lost") {
            break (Instant::now(), expires);
        }
        assert!(Instant::now() < until, "{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "lease given up {:.2} s before the fake's expiry (TTL {TTL} s)",
        expires.saturating_duration_since(seen).as_secs_f64()
    );
    assert!(
        seen < expires,
        "the agent held the lease past the server's expiry by {:?}",
        seen - expires
    );
    // Nothing was sent for the job from the server's expiry on, and it is not completed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let late: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.job_id == Some(1) && r.at >= expires)
        .map(|r| r.call)
        .collect();
    assert!(late.is_empty(), "calls after the expiry: {late:?}");
    assert!(api.job(1).completion.is_none());
    let until = Instant::now() + Duration::from_secs(10);
    while !containers_of(&agent.agent_id).await.is_empty() {
        assert!(Instant::now() < until, "the job's container is still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(20)).await, 0);
    agent.assert_clean().await;
}

#[tokio::test]
async fn a_lease_with_a_ttl_of_zero_is_not_run() {
    let api = FakeApi::start(KEY, 0).await;
    api.push_job(
        json!({"job_id": 3, "pipeline_b64": b64("version: 1\nsteps:\n  - run: echo never\n")}),
    );
    let mut agent = Agent::pull("ttl-0", &api.url, &[], &[]).await;
    api.wait_for("the lease", Duration::from_secs(20), |a| a.queued() == 0)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(api.count("start"), 0, "a 0 s lease was started");
    assert!(agent.log_text().contains("lease_ttl_seconds 0"));
    assert!(containers_of(&agent.agent_id).await.is_empty());
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(20)).await, 0);
    agent.assert_clean().await;
}

/// The log's writer may be behind a fast job's output; once the lease is gone that backlog is
/// dropped, not waited for: the job ends (and its slot is free) at once.
#[tokio::test]
async fn a_lease_lost_during_heavy_output_ends_the_job_promptly() {
    let api = FakeApi::start(KEY, 30).await;
    api.push_job(shell_job(
        1,
        "echo begin; yes 0123456789 | head -c 200000000; echo end",
    ));
    let mut agent = Agent::pull("heavy-lost", &api.url, &[], &[]).await;
    api.wait_for("job output", Duration::from_secs(30), |a| {
        a.job(1).log.contains("begin")
    })
    .await;
    api.faults(|f| {
        f.revoke.insert(1);
    });
    let revoked = Instant::now();
    while !agent.log_text().contains("job finished") {
        assert!(
            revoked.elapsed() < Duration::from_secs(30),
            "{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(api.job(1).completion.is_none());
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(20)).await, 0);
    agent.assert_clean().await;
}
