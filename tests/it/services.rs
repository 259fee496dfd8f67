//! Service containers with real Docker: a service answering the job by name, services that
//! exit or never open their port (clear errors, nothing left), a stop and a timeout while
//! services run, their hardening, `services` in a pushed job's JSON, and a pulled job's service
//! swept after the agent is killed.

use crate::support;

use std::time::{Duration, Instant};

use gryt_agent::executor::JobControl;
use gryt_agent::wire::{JobResult, JobStatus, ServiceStatus};
use serde_json::{Value, json};

use support::process::Agent;
use support::process::push::KEY;
use support::{Recorder, TestAgent, job, test_agent};

/// A web service from the test image: busybox `httpd` serving one page on port 8080. It prints
/// a line first (for the output tail) and its secret-named variable (which must come out
/// masked).
const WEB: &str = "  - name: web\n    image: IMAGE\n    env: {WEB_TOKEN: web-secret-value-1}\n    command: \"echo web starting with $WEB_TOKEN; mkdir -p /tmp/www && echo hello-from-web > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www\"\n    ready_port: 8080\n";

async fn agent(test: &str) -> TestAgent {
    test_agent(test, |s| s.docker.network = "job".into()).await
}

/// `services:` entries with the test image put in.
fn services(entries: &str) -> String {
    format!("services:\n{entries}")
}

async fn pipeline(steps: &str, services_yaml: &str) -> String {
    let image = support::test_image().await;
    format!(
        "version: 1\nsteps:\n{steps}{}",
        services(services_yaml).replace("IMAGE", &image)
    )
}

/// No container, workspace or network of this agent is left.
async fn assert_all_gone(agent: &TestAgent) {
    agent.assert_clean().await;
    for _ in 0..50 {
        if networks_of(&agent.agent_id).await.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        networks_of(&agent.agent_id).await,
        Vec::<String>::new(),
        "networks left"
    );
}

async fn networks_of(agent_id: &str) -> Vec<String> {
    use bollard::query_parameters::ListNetworksOptionsBuilder;
    let filters = std::collections::HashMap::from([(
        "label",
        vec![format!(
            "{}={agent_id}",
            gryt_agent::executor::container::LABEL_AGENT_ID
        )],
    )]);
    let options = ListNetworksOptionsBuilder::default()
        .filters(&filters)
        .build();
    let listed = support::docker().await.list_networks(Some(options)).await;
    listed.unwrap().into_iter().filter_map(|n| n.name).collect()
}

fn service_error(result: &JobResult) -> &str {
    result.error.as_deref().unwrap_or("")
}

#[tokio::test]
async fn a_service_answers_the_job_by_its_name_and_its_output_is_masked() {
    let agent = agent("svc-web").await;
    let audit = support::ContainerAudit::start(&agent.agent_id).await;
    let text = pipeline(
        "  - run: wget -q -O - http://web:8080/index.html\n  - run: echo second step\n",
        WEB,
    )
    .await;
    let rec = Recorder::default();
    let result = agent
        .executor
        .run(&job(&text), &rec, &JobControl::new())
        .await;
    assert_eq!(result.status, JobStatus::Success, "{result:?}");
    assert!(result.stdout.contains("hello-from-web"), "{result:?}");
    let web = &result.services[0];
    assert_eq!(
        (web.name.as_str(), web.status),
        ("web", ServiceStatus::Running)
    );
    assert!(web.error.is_none(), "{web:?}");
    assert_eq!(web.output_tail, "web starting with [MASKED]\n", "{web:?}");
    // The job container and the service container, both hardened (the audit's service rules),
    // on one hardened job network.
    assert_eq!(audit.finish_all().await, (2, 1));
    assert_all_gone(&agent).await;
}

#[tokio::test]
async fn a_service_that_exits_at_once_fails_the_job_naming_it_with_its_last_lines() {
    let agent = agent("svc-exit").await;
    let text = pipeline(
        "  - run: touch /workspace/ran\n",
        "  - name: db\n    image: IMAGE\n    command: \"echo db cannot start: bad config >&2; exit 3\"\n    ready_port: 5432\n",
    )
    .await;
    let clock = Instant::now();
    let result = agent.run(&job(&text)).await;
    assert_eq!(result.status, JobStatus::Error, "{result:?}");
    let error = service_error(&result);
    assert!(
        error.contains("service `db`") && error.contains("exited with code 3"),
        "{error}"
    );
    assert!(result.steps.is_empty(), "no step may run: {result:?}");
    let db = &result.services[0];
    assert_eq!((db.status, db.exit_code), (ServiceStatus::Exited, Some(3)));
    assert!(
        db.output_tail.contains("db cannot start: bad config"),
        "{db:?}"
    );
    assert!(db.error.as_deref().unwrap_or("").contains("service `db`"));
    assert!(
        clock.elapsed() < Duration::from_secs(20),
        "{:?}",
        clock.elapsed()
    );
    assert_all_gone(&agent).await;
}

#[tokio::test]
async fn a_service_that_never_opens_its_port_fails_the_job_after_its_ready_timeout() {
    let agent = agent("svc-notready").await;
    let text = pipeline(
        "  - run: echo never\n",
        &format!(
            "  - name: quiet\n    image: IMAGE\n    command: \"echo listening soon; exec sleep 600\"\n    ready_port: 6379\n    ready_timeout_seconds: 2\n{WEB}"
        ),
    )
    .await;
    let clock = Instant::now();
    let result = agent.run(&job(&text)).await;
    assert_eq!(result.status, JobStatus::Error, "{result:?}");
    let error = service_error(&result);
    assert!(
        error.contains("service `quiet`")
            && error.contains("port 6379")
            && error.contains("within 2s"),
        "{error}"
    );
    let quiet = &result.services[0];
    assert_eq!(quiet.status, ServiceStatus::NotReady);
    assert_eq!(quiet.output_tail, "listening soon\n");
    // The other one was ready: it ran until the job's end.
    assert_eq!(result.services[1].status, ServiceStatus::Running);
    assert!(
        clock.elapsed() < Duration::from_secs(20),
        "{:?}",
        clock.elapsed()
    );
    assert_all_gone(&agent).await;
}

#[tokio::test]
async fn a_service_that_ends_while_the_steps_run_fails_the_job() {
    let agent = agent("svc-midway").await;
    let text = pipeline(
        "  - run: sleep 3\n",
        "  - name: brief\n    image: IMAGE\n    command: [sh, -c, \"sleep 1; echo brief is done\"]\n",
    )
    .await;
    let result = agent.run(&job(&text)).await;
    assert_eq!(result.status, JobStatus::Error, "{result:?}");
    let error = service_error(&result);
    assert!(
        error.contains("service `brief` exited with code 0 while the steps ran"),
        "{error}"
    );
    assert_eq!(result.services[0].output_tail, "brief is done\n");
    assert_all_gone(&agent).await;
}

/// Cancels its job once the job's step prints `started`: the services are up by then.
struct CancelOnStart(JobControl);

impl gryt_agent::executor::JobObserver for CancelOnStart {
    fn output(&self, _: gryt_agent::executor::OutputStream, data: &[u8]) {
        if String::from_utf8_lossy(data).contains("started") {
            self.0.cancel("the API asked");
        }
    }
    fn event(&self, _: gryt_agent::executor::JobEvent<'_>) {}
}

#[tokio::test]
async fn a_cancel_and_a_timeout_while_services_run_leave_nothing() {
    let agent = agent("svc-stop").await;
    let text = pipeline("  - run: echo started; sleep 600\n", WEB).await;
    let control = JobControl::new();
    let cancel_on_start = CancelOnStart(control.clone());
    let cancelled_job = job(&text);
    let mut timed = job(&text);
    timed.job_id = 2;
    timed.timeout_seconds = Some(5);
    let clock = Instant::now();
    let (cancelled, timed_out) = tokio::join!(
        agent
            .executor
            .run(&cancelled_job, &cancel_on_start, &control),
        agent.run(&timed)
    );
    assert_eq!(cancelled.status, JobStatus::Cancelled, "{cancelled:?}");
    assert_eq!(cancelled.services[0].status, ServiceStatus::Running);
    assert_eq!(timed_out.status, JobStatus::Timeout, "{timed_out:?}");
    assert!(
        clock.elapsed() < Duration::from_secs(30),
        "{:?}",
        clock.elapsed()
    );
    assert_all_gone(&agent).await;
}

#[tokio::test]
async fn a_stop_while_services_start_leaves_nothing() {
    let agent = agent("svc-early-stop").await;
    let text = pipeline(
        "  - run: echo never\n",
        &format!("{WEB}{}", WEB.replace("web", "web2")),
    )
    .await;
    // Stops at several points of the start: before, during and after the containers' creation.
    for delay_ms in [0, 50, 150, 300, 600] {
        let control = JobControl::new();
        let stopper = control.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            stopper.abort("lease lost");
        });
        let result = agent
            .executor
            .run(&job(&text), &gryt_agent::executor::Discard, &control)
            .await;
        assert_eq!(
            result.status,
            JobStatus::Cancelled,
            "{delay_ms} ms: {result:?}"
        );
    }
    assert_all_gone(&agent).await;
}

#[tokio::test]
async fn services_need_the_job_network_and_are_refused_before_anything_runs() {
    let agent = test_agent("svc-bridge", |s| s.docker.network = "bridge".into()).await;
    let text = pipeline("  - run: echo hi\n", WEB).await;
    let result = agent.run(&job(&text)).await;
    assert_eq!(result.status, JobStatus::Error, "{result:?}");
    assert!(
        service_error(&result).contains("docker.network"),
        "{result:?}"
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn a_pushed_jobs_json_services_run_beside_it() {
    let image = support::test_image().await;
    let agent = Agent::push("push-services", &[("GRYT_NETWORK", "job")]).await;
    let body = json!({
        "job_id": 5,
        "pipeline_b64": support::b64("version: 1\nsteps:\n  - run: wget -q -O - http://web:8080/\n"),
        "services": [{
            "name": "web",
            "image": image,
            "command": ["sh", "-c", "mkdir -p /tmp/www && echo pushed-web > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"],
            "ready_port": 8080,
            "ready_timeout_seconds": 30
        }]
    });
    let response = agent.execute(Some(KEY), body.to_string()).await;
    assert_eq!(response.status(), 200);
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["status"], "success", "{result}");
    assert!(
        result["stdout"].as_str().unwrap().contains("pushed-web"),
        "{result}"
    );
    assert_eq!(result["services"][0]["name"], "web");
    assert_eq!(result["services"][0]["status"], "running");
    agent.assert_clean().await;
}

/// A pulled job (JSON `services`) whose agent is killed while its service runs: the restarted
/// agent's orphan sweep removes the service container and the network with the job's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pulled_jobs_service_is_swept_with_it_after_the_agent_is_killed() {
    use crate::fake_api::FakeApi;
    use support::process::pull;
    let image = support::test_image().await;
    let api = FakeApi::start(pull::KEY, 30).await;
    let mut spec = support::shell_job(1, "echo started; sleep 300");
    spec["services"] = json!([{
        "name": "web",
        "image": image,
        "command": "exec httpd -f -p 8080 -h /tmp",
        "ready_port": 8080
    }]);
    api.push_job(spec);
    let (state, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let agent_id = support::unique_agent_id("svc-crash");
    let env = [("GRYT_NETWORK", "job")];
    let mut agent = Agent::pull_in(&agent_id, state.path(), work.path(), &api.url, &[], &env).await;
    api.wait_for("the job's step", Duration::from_secs(60), |a| {
        a.job(1).log.contains("started")
    })
    .await;
    assert_eq!(
        support::containers_of(&agent_id).await.len(),
        2,
        "the job's container and its service's"
    );
    agent.sigkill();
    let agent = Agent::pull_in(&agent_id, state.path(), work.path(), &api.url, &[], &env).await;
    let restarted = Instant::now();
    while !support::containers_of(&agent_id).await.is_empty()
        || !networks_of(&agent_id).await.is_empty()
    {
        assert!(
            restarted.elapsed() < Duration::from_secs(10),
            "the killed job's service, container or network is still there; log:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    api.wait_for(
        "the killed job's completion",
        Duration::from_secs(30),
        |a| a.job(1).completion.is_some(),
    )
    .await;
    // Given up, not carried on (services are not watched again): `error` at once, so the API
    // runs it again.
    let done = api.job(1).completion.unwrap();
    assert_eq!(done["status"], "error", "{done}");
    let error = done["error"].as_str().unwrap_or_default();
    assert!(error.contains("services"), "{error}");
    assert!(agent.log_text().contains("gave up a job of an earlier run"));
}
