//! Bad input end to end, through the push endpoint of a real agent: each gets a clear error,
//! nothing crashes, nothing is left behind, nothing is written outside the work dir.

use crate::support;

use std::time::Duration;

use serde_json::{Value, json};
use support::process::Agent;
use support::process::push::KEY;

async fn post(agent: &Agent, body: String) -> (u16, Value) {
    let response = agent.execute(Some(KEY), body).await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The agent still answers and is healthy.
async fn assert_alive(agent: &Agent) {
    let health: Value = agent.get("/health").await.json().await.unwrap();
    assert_eq!(health["status"], "healthy", "{health}");
}

#[tokio::test]
async fn oversized_nested_nul_and_huge_inputs_get_clear_errors() {
    let parent = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir_in(parent.path()).unwrap();
    let agent = Agent::push_in(&support::unique_agent_id("bad-input-e2e"), work, &[]).await;

    // A pipeline over the 1 MiB limit inside a body under the 10 MiB limit.
    let big = support::b64(&format!("# {}\n", "x".repeat(2 * 1024 * 1024)));
    let (status, body) = post(
        &agent,
        json!({"job_id": 1, "pipeline_b64": big}).to_string(),
    )
    .await;
    assert_eq!(status, 422);
    assert!(
        body["error"].as_str().unwrap().contains("larger than"),
        "{body}"
    );

    // Deep YAML nesting: refused by the parser's depth limit, not by a stack overflow.
    let deep = format!(
        "version: 1\nsteps:\n  - run: x\n    env: {}{}\n",
        "[".repeat(50_000),
        "]".repeat(50_000)
    );
    let (status, body) = post(
        &agent,
        json!({"job_id": 2, "pipeline_b64": support::b64(&deep)}).to_string(),
    )
    .await;
    assert_eq!(status, 422, "{body}");

    // NUL bytes: in the pipeline (422) and in an env value (the job fails with a clear error).
    let (status, body) = post(&agent, json!({"job_id": 3, "pipeline_b64": support::b64("version: 1\nsteps:\n  - run: a\u{0}b\n")}).to_string()).await;
    assert_eq!(status, 422);
    assert!(body["error"].as_str().unwrap().contains("NUL"), "{body}");
    let hello = support::b64("version: 1\nsteps:\n  - run: echo hi\n");
    let (status, body) = post(
        &agent,
        json!({"job_id": 4, "pipeline_b64": hello, "env_vars": {"A": "x\u{0}y"}}).to_string(),
    )
    .await;
    assert_eq!((status, body["status"].as_str()), (200, Some("error")));
    assert!(body["error"].as_str().unwrap().contains("NUL"), "{body}");

    // A huge env map.
    let env: serde_json::Map<String, Value> = (0..20_000)
        .map(|i| (format!("VAR_{i}"), json!("v")))
        .collect();
    let (status, body) = post(
        &agent,
        json!({"job_id": 5, "pipeline_b64": hello, "env_vars": env}).to_string(),
    )
    .await;
    assert_eq!((status, body["status"].as_str()), (200, Some("error")));
    assert!(
        body["error"].as_str().unwrap().contains("at most 1000"),
        "{body}"
    );

    // Path tricks in what could become a name: the image, env names.
    for image in ["../../etc/passwd", "/absolute", "UPPER/case:tag", "a b"] {
        let (status, body) = post(
            &agent,
            json!({"job_id": 6, "pipeline_b64": hello, "docker_image": image}).to_string(),
        )
        .await;
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("error")),
            "{image}: {body}"
        );
        assert!(
            body["error"].as_str().unwrap().contains(image),
            "the error names the image: {body}"
        );
    }
    let (status, body) = post(
        &agent,
        json!({"job_id": 7, "pipeline_b64": hello, "env_vars": {"A=B": "x"}}).to_string(),
    )
    .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("error")),
        "{body}"
    );

    // Extreme numbers.
    let (status, _) = post(
        &agent,
        json!({"job_id": -9223372036854775808i64, "pipeline_b64": hello}).to_string(),
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = post(
        &agent,
        r#"{"job_id": 1e400, "pipeline_b64": "eA=="}"#.to_string(),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = post(
        &agent,
        json!({"job_id": 8, "pipeline_b64": hello, "timeout_seconds": -1}).to_string(),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["field"], "timeout_seconds");
    // Past the operator's maximum: once a panic ("task panicked"), now an error naming the
    // field and the limit, for the job and for a step.
    let (status, body) = post(
        &agent,
        json!({"job_id": 8, "pipeline_b64": hello, "timeout_seconds": u64::MAX}).to_string(),
    )
    .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("error")),
        "{body}"
    );
    assert_eq!(
        body["error"],
        "timeout_seconds = 18446744073709551615 is above this agent's limit job.max_timeout_seconds = 86400"
    );
    let step = support::b64(
        "version: 1\nsteps:\n  - run: true\n    timeout_seconds: 18446744073709551615\n",
    );
    let (status, body) = post(
        &agent,
        json!({"job_id": 8, "pipeline_b64": step}).to_string(),
    )
    .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("error")),
        "{body}"
    );
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("steps[0].timeout_seconds"),
        "{body}"
    );
    // More memory or CPUs than the machine has: refused, not applied.
    for (field, value, limit) in [
        ("memory_limit", "1t", "docker.max_memory"),
        ("cpu_limit", "4096", "docker.max_cpus"),
    ] {
        let (status, body) = post(
            &agent,
            json!({"job_id": 8, "pipeline_b64": hello, field: value}).to_string(),
        )
        .await;
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("error")),
            "{body}"
        );
        let error = body["error"].as_str().unwrap();
        assert!(
            error.contains(&format!("{field} `{value}`")) && error.contains(limit),
            "{body}"
        );
    }

    assert_alive(&agent).await;
    agent.assert_clean().await;
    // Nothing was written beside the work dir.
    let beside: Vec<_> = std::fs::read_dir(parent.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(beside.len(), 1, "{beside:?}");
}

#[tokio::test]
async fn a_header_flood_is_refused_and_the_agent_lives_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let agent = Agent::push("header-flood", &[]).await;
    let address = agent.url.trim_start_matches("http://").to_owned();
    for _ in 0..3 {
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        let mut request = String::from("GET /health HTTP/1.1\r\nHost: agent\r\n");
        for i in 0..5000 {
            request.push_str(&format!("X-Flood-{i}: {}\r\n", "y".repeat(100)));
        }
        request.push_str("\r\n");
        // The server may close the connection while we still write: that is a refusal too.
        let _ = stream.write_all(request.as_bytes()).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            !answer.starts_with("HTTP/1.1 200"),
            "a flooded request was served: {}",
            &answer[..answer.len().min(200)]
        );
    }
    // One huge header line.
    let client = reqwest::Client::new();
    let response = client
        .get(format!("{}/health", agent.url))
        .header("X-Big", "z".repeat(1024 * 1024))
        .send()
        .await;
    if let Ok(response) = response {
        assert!(response.status().is_client_error(), "{}", response.status());
    }
    assert_alive(&agent).await;
}
