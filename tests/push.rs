//! Push mode against a real running agent on loopback with real Docker: the existing API's
//! contract (paths, fields, status codes), its documented manual test, and its failure answers.

mod support;

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
    let agent = Agent::push("push-hello", &[]).await;
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
async fn a_full_agent_answers_429_with_retry_after() {
    let agent = Arc::new(Agent::push("push-busy", &[("GRYT_CONCURRENCY", "1")]).await);
    let slow = json!({"job_id": 3, "pipeline_b64": support::b64("version: 1\nsteps:\n  - run: sleep 3\n")}).to_string();
    let first = {
        let agent = agent.clone();
        tokio::spawn(async move { agent.execute(Some(KEY), slow).await.status() })
    };
    wait_for_running(&agent, 1).await;
    let response = agent.execute(Some(KEY), hello_body()).await;
    assert_eq!(response.status(), 429);
    assert!(response.headers().get("retry-after").is_some());
    assert_eq!(first.await.unwrap(), 200);
    agent.assert_clean().await;
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
    // A job on an agent without Docker fails with a clear error and the agent keeps running.
    let result: Value = dead
        .execute(Some(KEY), hello_body())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(result["status"], "error");
    assert!(dead.get("/").await.status().is_success());
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
type Seen = Arc<Mutex<Vec<(Option<String>, Value)>>>;

/// A loopback receiver that records the callbacks it gets.
async fn receiver() -> (u16, Seen) {
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
    for key in [Some("too-short"), None] {
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
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("at least 32 characters"), "{stderr}");
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
