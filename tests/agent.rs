//! The long-running agent's housekeeping, with a real process and a real Docker engine.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::models::ContainerCreateBody;
use bollard::query_parameters::RemoveContainerOptionsBuilder;
use support::process::Agent;

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
