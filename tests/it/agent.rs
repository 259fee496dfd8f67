//! The long-running agent's housekeeping and lifecycle, with a real process and a real Docker
//! engine: the orphan sweep, one agent per state dir, signals, the endpoint's connection limits,
//! and the ephemeral flags' bounds.

use crate::support;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bollard::models::ContainerCreateBody;
use bollard::query_parameters::RemoveContainerOptionsBuilder;
use support::process::push::{self, KEY};
use support::process::{Agent, free_port};

/// A container labelled as if an agent had started it for `job_id`, left running.
async fn plant_container(agent_id: &str, job_id: &str) -> String {
    let docker = support::docker().await;
    let labels = HashMap::from([
        ("io.gryt.agent.managed".to_owned(), "true".to_owned()),
        ("io.gryt.agent.id".to_owned(), agent_id.to_owned()),
        ("io.gryt.job.id".to_owned(), job_id.to_owned()),
    ]);
    let body = ContainerCreateBody {
        image: Some(support::test_image().await),
        cmd: Some(vec!["sleep".into(), "3600".into()]),
        labels: Some(labels),
        ..Default::default()
    };
    let id = docker.create_container(None, body).await.unwrap().id;
    docker.start_container(&id, None).await.unwrap();
    id
}

/// Makes `dir/job-made/deep/file` as the job's user (1000:1000), the directories closed to
/// others, as a job does: a non-root agent cannot delete them itself.
async fn write_as_job_user(dir: &std::path::Path) {
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let docker = support::docker().await;
    let body = ContainerCreateBody {
        image: Some(support::test_image().await),
        user: Some("1000:1000".into()),
        cmd: Some(vec![
            "sh".into(),
            "-c".into(),
            "mkdir -p /w/job-made/deep && echo x > /w/job-made/deep/file && chmod 700 /w/job-made/deep".into(),
        ]),
        host_config: Some(bollard::models::HostConfig {
            binds: Some(vec![format!("{}:/w", dir.display())]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = docker.create_container(None, body).await.unwrap().id;
    docker.start_container(&id, None).await.unwrap();
    let mut wait = docker.wait_container(&id, None);
    use futures_util::StreamExt;
    let code = wait.next().await.unwrap().map(|r| r.status_code);
    let options = RemoveContainerOptionsBuilder::default().force(true).build();
    docker.remove_container(&id, Some(options)).await.unwrap();
    assert_eq!(code.ok(), Some(0), "the job-user write failed");
}

#[tokio::test]
async fn leftovers_of_a_dead_agent_are_swept_at_start_and_other_agents_are_spared() {
    let agent_id = support::unique_agent_id("sweep");
    let other_agent = support::unique_agent_id("sweep-other");
    let ours = plant_container(&agent_id, "99").await;
    let theirs = plant_container(&other_agent, "99").await;
    let work_dir = tempfile::tempdir().unwrap();
    let stale = work_dir.path().join(format!("job+{agent_id}+99+AbC123"));
    std::fs::create_dir_all(stale.join("deep/tree")).unwrap();
    std::fs::write(stale.join("deep/tree/file"), "x").unwrap();
    // What a job left that only the job's user may delete when the agent is not root.
    write_as_job_user(&stale).await;
    // Another agent's workspace in the same work dir, and one whose name says no owner.
    let theirs_dir = work_dir.path().join(format!("job+{other_agent}+99+XyZ789"));
    std::fs::create_dir_all(theirs_dir.join("a")).unwrap();
    let ownerless = work_dir.path().join("job-99-AbC123");
    std::fs::create_dir_all(&ownerless).unwrap();
    let unrelated = work_dir.path().join("keep-me");
    std::fs::write(&unrelated, "not a workspace").unwrap();

    let started = Instant::now();
    let agent = Agent::push_in(&agent_id, work_dir, &[]).await;
    while !support::containers_of(&agent_id).await.is_empty() || stale.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "leftovers still there 5 s after start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        support::containers_of(&other_agent).await,
        vec![theirs.clone()],
        "another agent's container was touched"
    );
    assert!(unrelated.exists());
    assert!(
        theirs_dir.join("a").exists(),
        "another agent's workspace was touched"
    );
    assert!(
        ownerless.exists(),
        "a workspace of no known owner was touched"
    );
    let log = agent.log_text();
    assert!(log.contains("removed leftovers of earlier jobs"), "{log}");
    assert!(
        log.contains(&ours[..12]) || log.contains(&ours),
        "the removed container is not named in the log"
    );

    let docker = support::docker().await;
    let options = RemoveContainerOptionsBuilder::default().force(true).build();
    docker
        .remove_container(&theirs, Some(options))
        .await
        .unwrap();
}

/// `POST /jobs/execute` of a shell job in the background; resolves to (status, result).
fn push_job(url: &str, id: i64, script: &str) -> tokio::task::JoinHandle<(u16, serde_json::Value)> {
    let (url, body) = (url.to_owned(), support::shell_job(id, script).to_string());
    tokio::spawn(async move {
        let response = reqwest::Client::new()
            .post(format!("{url}/jobs/execute"))
            .header("X-API-Key", KEY)
            .body(body)
            .send()
            .await
            .expect("the push request failed");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or_default())
    })
}

/// Waits until the agent runs `n` jobs.
async fn wait_running(agent: &Agent, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.health().await["running_jobs"] != n {
        assert!(Instant::now() < deadline, "{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_second_agent_on_the_same_state_dir_refuses_to_start_and_never_sweeps() {
    let first = Agent::push("lock", &[]).await;
    let job = push_job(&first.url, 1, "sleep 3; echo survived");
    wait_running(&first, 1).await;
    // Same state dir and id (as a second copy of a unit would have): it would sweep the first
    // one's running container as an orphan.
    let other_work = tempfile::tempdir().unwrap();
    let mut cmd = push::command(
        &support::test_image().await,
        &first.agent_id,
        other_work.path(),
        &first.state,
        free_port(),
    );
    cmd.stdout(Stdio::null());
    let started = Instant::now();
    let mut second = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            panic!("the second agent did not refuse to start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "second agent exited {:?} after {:.2?}",
        status.code(),
        started.elapsed()
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("another gryt-agent")
            && stderr.contains(&first.state.display().to_string())
            && stderr.contains(&format!("pid {}", first.pid())),
        "{stderr}"
    );
    assert!(!stderr.contains("orphan sweep"), "{stderr}");
    let (status, result) = job.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(result["status"], "success", "{result}");
    assert_eq!(result["stdout"], "survived\n");
    first.assert_clean().await;
}

#[tokio::test]
async fn sighup_and_sigquit_drain_like_sigterm() {
    for signal in ["HUP", "QUIT"] {
        let mut agent = Agent::push(&format!("signal-{signal}"), &[]).await;
        let job = push_job(&agent.url, 1, "sleep 2; echo finished");
        wait_running(&agent, 1).await;
        let sent = Instant::now();
        agent.signal(signal);
        // The running job finishes and its result is delivered; then the agent exits 0.
        let (status, result) = job.await.unwrap();
        assert_eq!(status, 200, "SIG{signal}: {}", agent.log_text());
        assert_eq!(result["status"], "success", "SIG{signal}: {result}");
        assert_eq!(result["stdout"], "finished\n");
        let code = agent.wait_exit(Duration::from_secs(30)).await;
        println!(
            "SIG{signal}: job finished, agent exited {code} {:.1?} after the signal",
            sent.elapsed()
        );
        assert_eq!(code, 0, "SIG{signal}: {}", agent.log_text());
        assert!(agent.log_text().contains("signal received"));
        agent.assert_clean().await;
    }
}

#[tokio::test]
async fn max_jobs_and_idle_exit_of_zero_are_refused() {
    for (flag, value) in [("--max-jobs", "0"), ("--idle-exit", "0")] {
        let out = Command::new(env!("CARGO_BIN_EXE_gryt-agent"))
            .args(["run", flag, value])
            .env_clear()
            .env("GRYT_API_URL", "http://127.0.0.1:9")
            .env("AGENT_API_KEY", "some-key")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains("1.."),
            "{flag}: {stderr}"
        );
    }
}

/// Raises this process's soft descriptor limit to its hard one (the agent inherits it).
fn raise_descriptor_limit(need: u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    setrlimit(Resource::Nofile, limit).unwrap();
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    assert!(
        soft >= need,
        "this test needs {need} descriptors; the hard limit is {soft}"
    );
}

#[tokio::test]
async fn idle_connections_cannot_lock_out_health_or_push_and_are_closed() {
    use tokio::io::AsyncReadExt;
    const IDLE: usize = 1500;
    raise_descriptor_limit(IDLE as u64 + 1000);
    let agent = Agent::push("endpoint", &[]).await;
    let address = agent.url.trim_start_matches("http://").to_owned();
    let opened = Instant::now();
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(tokio::net::TcpStream::connect(&address).await.unwrap());
    }
    // Over the cap (1024) and all idle: health and a push request still get in.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let asked = Instant::now();
    let health: serde_json::Value = client
        .get(format!("{}/health", agent.url))
        .send()
        .await
        .expect("/health did not answer with 1500 idle connections open")
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "healthy", "{health}");
    let health_took = asked.elapsed();
    let (status, result) = push_job(&agent.url, 1, "echo through").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(result["stdout"], "through\n");
    let metrics = client
        .get(format!("{}/metrics", agent.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let open: usize = metrics
        .lines()
        .find_map(|l| l.strip_prefix("gryt_agent_connections "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(open <= 1024, "{open} connections open over the cap");

    // Every idle socket is closed by the agent: the oldest at the cap, the rest once the
    // header-read timeout (10 s) has passed.
    let mut closing = tokio::task::JoinSet::new();
    for mut stream in idle {
        closing.spawn(async move {
            let mut buf = [0u8; 16];
            let read = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut buf)).await;
            matches!(read, Ok(Ok(0)) | Ok(Err(_)))
        });
    }
    let mut closed = 0;
    while let Some(done) = closing.join_next().await {
        closed += usize::from(done.unwrap());
    }
    assert_eq!(closed, IDLE, "idle connections left open");
    let took = opened.elapsed();
    assert!(
        took >= Duration::from_secs(9),
        "closed before the timeout: {took:?}"
    );
    println!(
        "{IDLE} idle connections: /health answered in {health_took:.2?}; all closed {took:.1?} after opening; {open} open at most"
    );
    assert!(agent.get("/health").await.status().is_success());
}
