//! Push mode against a real running agent on loopback with real Docker: the existing API's
//! contract (paths, fields, status codes), its documented manual test, and its failure answers.

use crate::support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use support::process::push::{self, KEY, PREVIOUS_KEY};
use support::process::{Agent, free_port};

fn hello_body() -> String {
    json!({"job_id": 1, "pipeline_b64": support::b64("version: 1\nsteps:\n  - run: echo Hello")})
        .to_string()
}

#[tokio::test]
async fn the_documented_manual_test_passes() {
    // With the warm pool on: one push flow runs its jobs in warm containers.
    let agent = Agent::push("push-hello", &[("GRYT_WARM_POOL", "1")]).await;
    let root: Value = agent.get("/").await.json().await.unwrap();
    assert_eq!(
        root,
        json!({"service": "Gryt CI Agent", "version": env!("CARGO_PKG_VERSION"), "status": "running"})
    );

    let response = agent.execute(Some(KEY), hello_body()).await;
    assert_eq!(response.status(), 200);
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["job_id"], 1);
    assert_eq!(result["success"], true);
    assert_eq!(result["status"], "success");
    assert_eq!(result["exit_code"], 0);
    assert_eq!(result["stdout"].as_str().unwrap().trim_end(), "Hello");
    assert_eq!(result["error"], Value::Null);
    for field in [
        "stderr",
        "duration_seconds",
        "started_at",
        "completed_at",
        "steps",
    ] {
        assert!(result.get(field).is_some(), "result lacks {field}");
    }
    // The previous key is accepted too while keys rotate.
    let response = agent.execute(Some(PREVIOUS_KEY), hello_body()).await;
    assert_eq!(response.status(), 200);
    agent.assert_clean().await;
    let log = agent.log_text();
    assert!(log.contains("push job finished"), "{log}");
    assert!(
        !log.contains(KEY) && !log.contains(PREVIOUS_KEY),
        "a key reached the log"
    );
}

#[tokio::test]
async fn wrong_or_missing_key_is_401_before_the_body_is_read() {
    let agent = Agent::push("push-auth", &[]).await;
    for key in [None, Some("wrong-key"), Some(&KEY[..KEY.len() - 1])] {
        let response = agent.execute(key, hello_body()).await;
        assert_eq!(response.status(), 401, "key {key:?}");
        let body: Value = response.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("X-API-Key"));
    }
    // The key is checked before the body is read: announce 11 MiB, send none, and the answer
    // (401, not 413 and not a wait for the body) comes back anyway.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(agent.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = format!(
        "POST /jobs/execute HTTP/1.1\r\nHost: agent\r\nX-API-Key: wrong\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        11 * 1024 * 1024
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );
    assert!(support::containers_of(&agent.agent_id).await.is_empty());
}

#[tokio::test]
async fn bad_bodies_get_413_and_422_naming_the_field() {
    let agent = Agent::push("push-bad", &[]).await;
    let response = agent.execute(Some(KEY), vec![b' '; 11 * 1024 * 1024]).await;
    assert_eq!(response.status(), 413);

    let response = agent.execute(Some(KEY), "{not json").await;
    assert_eq!(response.status(), 422);

    let response = agent
        .execute(
            Some(KEY),
            json!({"job_id": "one", "pipeline_b64": "eA=="}).to_string(),
        )
        .await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["field"], "job_id");

    let response = agent
        .execute(
            Some(KEY),
            json!({"job_id": 1, "pipeline_b64": "%%%"}).to_string(),
        )
        .await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["field"], "pipeline_b64");
    agent.assert_clean().await;
}

#[tokio::test]
async fn a_failing_job_is_200_with_success_false_and_its_exit_code() {
    let agent = Agent::push("push-fail", &[]).await;
    let body = json!({"job_id": 2, "pipeline_b64": support::b64("version: 1\nsteps:\n  - run: echo no >&2; exit 3\n")});
    let response = agent.execute(Some(KEY), body.to_string()).await;
    assert_eq!(response.status(), 200);
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["success"], false);
    assert_eq!(result["status"], "failed");
    assert_eq!(result["exit_code"], 3);
    assert_eq!(result["stderr"], "no\n");
    agent.assert_clean().await;
}

#[tokio::test]
async fn over_capacity_requests_wait_in_a_bounded_queue_and_only_a_full_queue_gets_429() {
    let agent = Arc::new(
        Agent::push(
            "push-queue",
            &[("GRYT_CONCURRENCY", "1"), ("GRYT_PUSH_MAX_QUEUE", "2")],
        )
        .await,
    );
    let job = |id: i64, script: &str| support::shell_job(id, script).to_string();
    let send = |body: String| {
        let agent = agent.clone();
        tokio::spawn(async move {
            let response = agent.execute(Some(KEY), body).await;
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        })
    };
    let first = send(job(30, "sleep 8; echo first"));
    wait_for_running(&agent, 1).await;
    // Every slot busy: the next request waits instead of being refused.
    let second = send(job(31, "echo second"));
    wait_for_queue(&agent, 1).await;
    // A waiting client that gives up leaves the queue, and its job never runs.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap()
        .post(format!("{}/jobs/execute", agent.url))
        .header("X-API-Key", KEY)
        .body(job(32, "echo never"))
        .send()
        .await;
    assert!(impatient.is_err(), "the impatient client timed out");
    wait_for_queue(&agent, 1).await;
    let third = send(job(33, "echo third"));
    wait_for_queue(&agent, 2).await;
    // The queue is full: 429 with Retry-After, and /health still answers at once.
    let response = agent.execute(Some(KEY), hello_body()).await;
    assert_eq!(response.status(), 429);
    assert!(response.headers().get("retry-after").is_some());
    let health: Value = agent.get("/health").await.json().await.unwrap();
    assert_eq!(health["push_queue"], 2, "{health}");
    assert_eq!(health["push_queue_max"], 2, "{health}");

    for (task, out) in [(first, "first\n"), (second, "second\n"), (third, "third\n")] {
        let (status, result) = task.await.unwrap();
        assert_eq!(status, 200, "{result}");
        assert_eq!(result["status"], "success", "{result}");
        assert_eq!(result["stdout"], out);
    }
    // Three jobs ran: the abandoned one never did.
    let text = agent.get("/metrics").await.text().await.unwrap();
    assert!(
        text.contains("gryt_agent_jobs_started_total{mode=\"push\"} 3"),
        "{text}"
    );
    assert!(text.contains("gryt_agent_push_queue 0"), "{text}");
    agent.assert_clean().await;
}

async fn wait_for_queue(agent: &Agent, n: u64) {
    for _ in 0..200 {
        let health: Value = agent.get("/health").await.json().await.unwrap();
        if health["push_queue"] == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the push queue never held {n}");
}

async fn wait_for_running(agent: &Agent, n: u64) {
    for _ in 0..100 {
        let health: Value = agent.get("/health").await.json().await.unwrap();
        if health["running_jobs"] == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job never started");
}

#[tokio::test]
async fn health_reports_docker_and_degrades_when_it_is_unreachable() {
    let agent = Agent::push("push-health", &[]).await;
    let health: Value = agent.get("/health").await.json().await.unwrap();
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["docker_available"], true);
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));

    let dead = Agent::push(
        "push-dead-docker",
        &[("DOCKER_HOST", "unix:///nonexistent/docker.sock")],
    )
    .await;
    let response = dead.get("/health").await;
    assert_eq!(response.status(), 200);
    let health: Value = response.json().await.unwrap();
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["docker_available"], false);
    assert!(
        health["reasons"]
            .to_string()
            .contains("the Docker engine does not answer"),
        "{health}"
    );
    // An agent that cannot run jobs takes none: 503 with Retry-After, so the API runs the job
    // itself; the agent keeps running.
    let response = dead.execute(Some(KEY), hello_body()).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().get("retry-after").is_some());
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("Docker engine"),
        "{body}"
    );
    assert!(!dead.log_text().contains("push job started"));
    assert!(dead.get("/").await.status().is_success());
    let text = dead.get("/metrics").await.text().await.unwrap();
    assert!(
        text.contains("gryt_agent_not_ready{cause=\"docker\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn metrics_count_jobs() {
    let agent = Agent::push("push-metrics", &[("GRYT_PULL_POLICY", "if-not-present")]).await;
    agent.execute(Some(KEY), hello_body()).await;
    // No registry is reachable here: the pull of an absent image fails, and is counted.
    let absent = json!({"job_id": 5, "pipeline_b64": support::b64("version: 1\nsteps:\n  - run: true\n"),
                        "docker_image": "gryt-agent-test/absent:1"});
    let result: Value = agent
        .execute(Some(KEY), absent.to_string())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(result["status"], "error");
    assert!(
        result["error"]
            .as_str()
            .unwrap()
            .contains("cannot pull image gryt-agent-test/absent:1"),
        "{result}"
    );
    let text = agent.get("/metrics").await.text().await.unwrap();
    assert!(
        text.contains("gryt_agent_jobs_started_total{mode=\"push\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("gryt_agent_jobs_finished_total{mode=\"push\",status=\"success\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("gryt_agent_job_duration_seconds_count 2"),
        "{text}"
    );
    assert!(
        text.contains("gryt_agent_image_pulls_total{outcome=\"error\"} 1"),
        "{text}"
    );

    let quiet = Agent::push("push-no-metrics", &[("GRYT_METRICS", "false")]).await;
    assert_eq!(quiet.get("/metrics").await.status(), 404);
}

/// Callbacks a receiver got: the `X-API-Key` header and the body.
pub(crate) type Seen = Arc<Mutex<Vec<(Option<String>, Value)>>>;

/// A loopback receiver that records the callbacks it gets.
pub(crate) async fn receiver() -> (u16, Seen) {
    let seen: Seen = Arc::default();
    let store = seen.clone();
    let app = axum::Router::new().route(
        "/callback",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::Json<Value>| {
                let store = store.clone();
                async move {
                    let key = headers
                        .get("x-api-key")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    store.lock().unwrap().push((key, body.0));
                    "ok"
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, seen)
}

#[tokio::test]
async fn callbacks_reach_allowed_hosts_only() {
    let (allowed_port, allowed_seen) = receiver().await;
    let (other_port, other_seen) = receiver().await;
    let allow = format!("127.0.0.1:{allowed_port}");
    let agent = Agent::push("push-callback", &[("GRYT_CALLBACK_ALLOW", &allow)]).await;
    for (job_id, port) in [(10, allowed_port), (11, other_port)] {
        let body = json!({"job_id": job_id, "pipeline_b64": support::b64("version: 1\nsteps:\n  - run: echo cb\n"),
                          "callback_url": format!("http://127.0.0.1:{port}/callback")});
        assert_eq!(
            agent.execute(Some(KEY), body.to_string()).await.status(),
            200
        );
    }
    for _ in 0..100 {
        if !allowed_seen.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = allowed_seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0.as_deref(), Some(KEY));
    assert_eq!(seen[0].1["job_id"], 10);
    assert_eq!(seen[0].1["stdout"], "cb\n");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        other_seen.lock().unwrap().is_empty(),
        "callback sent to a host not allowed"
    );
}

/// A receiver on an allowed host that answers every callback with a 307 to `to`.
async fn redirector(to: String) -> (u16, Arc<Mutex<usize>>) {
    let hits: Arc<Mutex<usize>> = Arc::default();
    let count = hits.clone();
    let app = axum::Router::new().route(
        "/callback",
        axum::routing::post(move || {
            let (count, to) = (count.clone(), to.clone());
            async move {
                *count.lock().unwrap() += 1;
                (
                    axum::http::StatusCode::TEMPORARY_REDIRECT,
                    [(axum::http::header::LOCATION, to)],
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, hits)
}

#[tokio::test]
async fn a_callback_redirect_is_not_followed() {
    let (elsewhere_port, elsewhere_seen) = receiver().await;
    let (port, hits) = redirector(format!("http://127.0.0.1:{elsewhere_port}/callback")).await;
    // Only the redirecting host and port are allowed.
    let allow = format!("127.0.0.1:{port}");
    let agent = Agent::push("push-redirect", &[("GRYT_CALLBACK_ALLOW", &allow)]).await;
    let body = json!({"job_id": 12, "pipeline_b64": support::b64("version: 1\nsteps:\n  - run: echo cb\n"),
                      "callback_url": format!("http://127.0.0.1:{port}/callback")});
    assert_eq!(
        agent.execute(Some(KEY), body.to_string()).await.status(),
        200
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !agent.log_text().contains("redirect: not followed") {
        assert!(Instant::now() < deadline, "{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A redirect is a final failure: asked once, not retried, and nothing reached the target.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(*hits.lock().unwrap(), 1);
    assert!(
        elsewhere_seen.lock().unwrap().is_empty(),
        "the key and the result followed the redirect"
    );
}

#[tokio::test]
async fn a_client_that_disconnects_mid_job_leaves_nothing_behind() {
    let agent = Agent::push("push-disconnect", &[]).await;
    let body = json!({"job_id": 4, "pipeline_b64": support::b64("version: 1\nsteps:\n  - run: sleep 30\n")}).to_string();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let response = client
        .post(format!("{}/jobs/execute", agent.url))
        .header("X-API-Key", KEY)
        .body(body)
        .send()
        .await;
    assert!(response.is_err(), "the client gave up after 2s");
    // The job is cancelled (grace 2s) and cleaned up.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let health: Value = agent.get("/health").await.json().await.unwrap();
        if health["running_jobs"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "job still running after the client left"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.assert_clean().await;
    let text = agent.get("/metrics").await.text().await.unwrap();
    assert!(text.contains("status=\"cancelled\"} 1"), "{text}");
}

#[tokio::test]
async fn push_mode_refuses_to_start_with_a_short_or_missing_key() {
    let image = support::test_image().await;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for (key, previous) in [
        (Some("too-short"), None),
        (None, None),
        (Some(KEY), Some("too-short")),
    ] {
        let mut cmd = push::command(
            &image,
            "short-key",
            dirs.0.path(),
            dirs.1.path(),
            free_port(),
        );
        cmd.env_remove("AGENT_API_KEY");
        if let Some(key) = key {
            cmd.env("AGENT_API_KEY", key);
        }
        // The previous key is held to the same minimum as the current one.
        if let Some(previous) = previous {
            cmd.env("AGENT_API_KEY_PREVIOUS", previous);
        }
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("at least 32 characters"), "{stderr}");
        if previous.is_some() {
            assert!(stderr.contains("AGENT_API_KEY_PREVIOUS"), "{stderr}");
        }
        assert!(
            !stderr.contains("too-short"),
            "the key must not be echoed: {stderr}"
        );
    }
}

#[tokio::test]
async fn too_little_free_disk_is_a_503_and_a_degraded_health() {
    let agent = Agent::push("push-disk", &[("GRYT_MIN_FREE_DISK_MB", "1000000000000")]).await;
    let health: Value = agent.get("/health").await.json().await.unwrap();
    assert_eq!(health["status"], "degraded");
    assert!(
        health["reasons"].to_string().contains("min_free_disk_mb"),
        "{health}"
    );
    let response = agent.execute(Some(KEY), hello_body()).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().get("retry-after").is_some());
    agent.assert_clean().await;
}

/// Push mode answers as soon as the result is made; the job's container, network and workspace
/// go right after, with its slot held until they are gone: nothing is left shortly after, and
/// the slot is free again.
#[tokio::test]
async fn push_answers_then_nothing_is_left() {
    let agent = Agent::push("early-push", &[]).await;
    let response = agent.execute(Some(KEY), hello_body()).await;
    assert_eq!(response.status(), 200);
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["status"], "success", "{result}");
    agent.assert_clean().await;
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let health = agent.health().await;
        if health["free_slots"] == health["capacity"] {
            break;
        }
        assert!(Instant::now() < until, "the slot stays taken: {health}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A push agent stopped right after it answered exits with nothing left: the drain waits for
/// the job's cleanup, which follows the answer.
#[tokio::test]
async fn a_push_agent_stopped_right_after_an_answer_leaves_nothing() {
    let mut agent = Agent::push("early-push-term", &[]).await;
    let response = agent.execute(Some(KEY), hello_body()).await;
    assert_eq!(response.status(), 200);
    // No grace: the agent itself waited for the cleanup before it exited.
    agent.stop_leaving_nothing().await;
}

/// A client that sends its next job as soon as it has the previous answer is served, also with
/// `push.max_queue` 0: the answer comes before the job's cleanup, and a request may wait for a
/// slot that is only being cleaned up without a place in the queue (before, the answer came
/// after the cleanup and such a request found the slot free).
#[tokio::test]
async fn a_request_right_after_an_answer_waits_for_the_cleanup_not_429() {
    let agent = Agent::push("push-after-answer", &[("GRYT_PUSH_MAX_QUEUE", "0")]).await;
    for i in 0..3 {
        let response = agent.execute(Some(KEY), hello_body()).await;
        assert_eq!(response.status(), 200, "request {i}");
    }
    assert_eq!(agent.health().await["push_queue"], 0);
    agent.assert_clean().await;
}
