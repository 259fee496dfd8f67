//! `gryt-agent conformance`: the real binary against the conformance fake of the API over
//! loopback. The fake keeps every server rule, so the checker must pass it; each broken variant
//! breaks one rule, which the checker must name. A normal job queued beside the conformance jobs
//! must never be leased by the checker.

use crate::fake_api;

use std::process::Stdio;
use std::time::Duration;

use fake_api::{Broken, CONFORMANCE_LABEL, FakeApi};
use serde_json::json;

const KEY: &str = "conformance-test-key-0123456789abcdef";
/// Short, so a run takes seconds; long enough that a loaded machine still renews in time.
const TTL: u64 = 4;
const NORMAL_JOB: i64 = 7;

/// Every rule the checker reports, as `R<n> <title>` (the document's wording).
const RULES: [&str; 14] = [
    "R1 an unknown key gets 401 with a JSON error",
    "R2 the long poll holds until a job or wait_seconds",
    "R3 start is idempotent per lease",
    "R4 start does not renew the lease",
    "R5 a heartbeat renews the lease",
    "R6 log chunks follow committed",
    "R7 a log chunk holds at most 1 MiB",
    "R8 logs are per lease",
    "R9 a repeated completion is answered 200",
    "R10 a lease not held is answered 404, 409 or 410",
    "R11 an expired job is leased again only after a grace period",
    "R12 a job whose lease expired before start is leased again",
    "R13 a completion for an old lease after the job finished gets 409",
    "R14 the conformance label gets only conformance jobs",
];

/// A fake with a normal job queued first and the three conformance jobs (ids 101-103).
async fn fake(broken: Broken, relet_started: bool) -> FakeApi {
    let api = FakeApi::start(KEY, TTL).await;
    api.set_relet_started(relet_started);
    api.faults(|f| f.broken = broken);
    api.push_job(json!({"job_id": NORMAL_JOB, "pipeline_b64": "ZWNobyBoaQo="}));
    api.push_conformance_jobs(101);
    api
}

/// Runs `gryt-agent conformance --api <fake>`; its exit code and stdout.
async fn check(api: &FakeApi) -> (i32, String) {
    let state = tempfile::tempdir().unwrap();
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_gryt-agent"))
        .args(["conformance", "--api", &api.url])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", state.path())
        .env("GRYT_STATE_DIR", state.path())
        .env("AGENT_API_KEY", KEY)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the checker ran for over two minutes")
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains(KEY) && !err.contains(KEY),
        "the key was printed"
    );
    // Shown with --nocapture: what an API team would read.
    println!("{text}{err}");
    (out.status.code().unwrap_or(-1), format!("{text}{err}"))
}

/// The rules the report says FAIL.
fn failed(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("FAIL "))
        .collect()
}

/// The checker asked only for the conformance label, and the normal job is still queued.
fn never_took_the_normal_job(api: &FakeApi) {
    for r in api.requests().iter().filter(|r| r.call == "lease") {
        assert_eq!(r.body["labels"], json!([CONFORMANCE_LABEL]), "{:?}", r.body);
        assert_eq!(r.body["capacity"], 1);
    }
    assert_eq!(api.job(NORMAL_JOB).leases, 0, "the normal job was leased");
    assert_eq!(api.queued(), 1);
}

#[tokio::test]
async fn the_conformance_fake_passes_every_rule() {
    let api = fake(Broken::default(), true).await;
    let (code, text) = check(&api).await;
    assert_eq!(code, 0, "{text}");
    for rule in RULES {
        assert!(text.contains(&format!("PASS {rule}\n")), "{rule}:\n{text}");
    }
    never_took_the_normal_job(&api);
    // A completed once with its whole log; B and C under their second lease, C with a new log.
    let a = api.job(101);
    assert_eq!(a.completes_accepted, 2, "A's completion and its repeat");
    assert!(a.log.starts_with("héllo\nworld\nxxx"), "{:.20}", a.log);
    assert_eq!(a.log.len(), 13 + 1024 * 1024);
    let (b, c) = (api.job(102), api.job(103));
    assert_eq!((b.leases, c.leases), (2, 2));
    assert!(b.completion.is_some() && c.completion.is_some());
    assert_eq!(c.log, "attempt-2\n");
}

#[tokio::test]
async fn a_server_that_ends_expired_started_jobs_passes_with_r8_skipped() {
    let api = fake(Broken::default(), false).await;
    let (code, text) = check(&api).await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("SKIP R8 logs are per lease"), "{text}");
    assert!(failed(&text).is_empty(), "{text}");
    assert!(api.job(103).lost);
    never_took_the_normal_job(&api);
}

/// Runs the checker against a fake that breaks one rule: it must fail that rule alone.
async fn catches(broken: Broken, rule: &str) {
    let api = fake(broken, true).await;
    let (code, text) = check(&api).await;
    assert_eq!(code, 1, "{text}");
    assert_eq!(failed(&text), [rule], "{text}");
    never_took_the_normal_job(&api);
}

#[tokio::test]
async fn a_poll_answered_at_once_fails_r2() {
    let broken = Broken {
        poll_at_once: true,
        ..Broken::default()
    };
    catches(broken, RULES[1]).await;
}

#[tokio::test]
async fn a_start_that_is_not_idempotent_fails_r3() {
    let broken = Broken {
        start_not_idempotent: true,
        ..Broken::default()
    };
    catches(broken, RULES[2]).await;
}

#[tokio::test]
async fn log_chunks_kept_whatever_their_offset_fail_r6() {
    let broken = Broken {
        logs_any_offset: true,
        ..Broken::default()
    };
    catches(broken, RULES[5]).await;
}

#[tokio::test]
async fn leasing_again_without_a_grace_period_fails_r11() {
    let broken = Broken {
        no_grace: true,
        ..Broken::default()
    };
    catches(broken, RULES[10]).await;
}

#[tokio::test]
async fn a_normal_job_handed_to_the_checker_is_completed_as_error_and_fails_r14() {
    let api = fake(
        Broken {
            ignore_labels: true,
            ..Broken::default()
        },
        true,
    )
    .await;
    let (code, text) = check(&api).await;
    assert_eq!(code, 1, "{text}");
    assert_eq!(failed(&text), [RULES[13]], "{text}");
    assert!(text.contains("no more leases"), "{text}");
    // It did not run: start and an `error` completion, nothing else; and no further lease.
    let normal = api.job(NORMAL_JOB);
    let done = normal.completion.expect("the stray job was not completed");
    assert_eq!(done["status"], "error", "{done}");
    assert!(
        done["error"].as_str().unwrap().contains("run it again"),
        "{done}"
    );
    assert_eq!(normal.log, "");
    let calls: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| r.job_id == Some(NORMAL_JOB))
        .map(|r| r.call)
        .collect();
    assert_eq!(calls, ["start", "complete"]);
    assert_eq!(
        api.count("lease"),
        2,
        "the unknown-key lease and the one that got the job"
    );
    assert_eq!(
        api.queued(),
        3,
        "the conformance jobs were leased after the stray one"
    );
}

#[tokio::test]
async fn without_conformance_jobs_it_takes_nothing_and_says_what_to_queue() {
    let api = FakeApi::start(KEY, TTL).await;
    api.push_job(json!({"job_id": NORMAL_JOB, "pipeline_b64": "ZWNobyBoaQo="}));
    let (code, text) = check(&api).await;
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("0 of the 3 conformance jobs came") && text.contains("gryt-conformance"),
        "{text}"
    );
    never_took_the_normal_job(&api);
}

#[tokio::test]
async fn an_api_that_does_not_answer_is_exit_code_2() {
    // A port nothing listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let state = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_gryt-agent"))
        .args(["conformance", "--api", &format!("http://127.0.0.1:{port}")])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GRYT_STATE_DIR", state.path())
        .env("AGENT_API_KEY", KEY)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("did not answer"), "{text}");
}

/// R3's second half, which the checker cannot provoke (it cannot cancel a job): the fake answers
/// `410` to the start of a job cancelled before it started, and never leases it again.
#[tokio::test]
async fn the_fake_answers_410_to_the_start_of_a_job_cancelled_before_start() {
    let api = FakeApi::start(KEY, 1).await;
    api.set_grace(Duration::from_millis(200));
    api.push_job(json!({"job_id": 9, "pipeline_b64": "ZWNobyBoaQo="}));
    let http = reqwest::Client::new();
    let post = |path: &str, body: serde_json::Value| {
        http.post(format!("{}{}{path}", api.url, fake_api::PREFIX))
            .bearer_auth(KEY)
            .json(&body)
            .send()
    };
    let lease_body = json!({"agent_id": "t", "hostname": "h", "version": "0", "labels": [],
                            "capacity": 1, "wait_seconds": 0});
    let lease: serde_json::Value = post("/lease", lease_body.clone())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    api.faults(|f| {
        f.cancel_before_start.insert(9);
    });
    let start = post(
        "/jobs/9/start",
        json!({"lease_id": lease["lease_id"], "started_at": "2026-01-01T00:00:00.000Z"}),
    )
    .await
    .unwrap();
    assert_eq!(start.status(), 410);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = post("/lease", lease_body).await.unwrap();
    assert_eq!(again.status(), 204, "a cancelled job was leased again");
}

#[tokio::test]
async fn a_key_bound_to_another_agent_id_is_named_with_the_fix() {
    let api = fake(Broken::default(), true).await;
    api.faults(|f| f.key_bound_to = Some("builder-1".into()));
    let (code, text) = check(&api).await;
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("a lease was refused: 403") && text.contains("--agent-id"),
        "{text}"
    );
    assert_eq!(api.queued(), 4, "nothing was leased");
}
