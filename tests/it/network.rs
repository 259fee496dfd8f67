//! A network of its own for every job (`docker.network = "job"`, the default), with the real
//! engine: concurrent jobs cannot reach each other, a job's network lives exactly as long as
//! the job on every path, the sweep removes what a dead agent left, and (as root) the firewall
//! rule keeps job networks from the cloud metadata address.

use crate::support::{self, job, test_agent};

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::RemoveContainerOptionsBuilder;
use futures_util::StreamExt;
use gryt_agent::executor::network;
use gryt_agent::executor::{Discard, JobControl};
use gryt_agent::wire::JobStatus;

/// A shell command that GETs `/index.html` from `address:port` and prints the answer, failing
/// when it cannot connect within 3 s. `nc`, not busybox `wget`, which crashes when a connect
/// times out.
fn get(address: &str, port: u16) -> String {
    format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {address} {port}")
}

/// The address of the first container of `agent_id` once it runs, and the network it is on.
async fn address_of_job(agent_id: &str) -> (String, String) {
    let docker = support::docker().await;
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the job's container never got an address"
        );
        if let Some(id) = support::containers_of(agent_id).await.first() {
            let inspect = docker.inspect_container(id, None).await;
            let networks = inspect
                .ok()
                .and_then(|i| i.network_settings)
                .and_then(|n| n.networks)
                .unwrap_or_default();
            let found = networks.into_iter().find_map(|(name, endpoint)| {
                let ip = endpoint.ip_address.filter(|ip| !ip.is_empty())?;
                Some((ip, name))
            });
            if let Some(found) = found {
                return found;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `script` in a plain container of the test image on `network` and returns its exit
/// code: the test's own client, not a job.
async fn probe_from(network: &str, script: &str) -> i64 {
    let docker = support::docker().await;
    let body = ContainerCreateBody {
        image: Some(support::test_image().await),
        cmd: Some(vec!["sh".into(), "-c".into(), script.into()]),
        labels: Some(HashMap::from([(
            "io.gryt.test".to_owned(),
            "network-probe".to_owned(),
        )])),
        host_config: Some(HostConfig {
            network_mode: Some(network.to_owned()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = docker.create_container(None, body).await.unwrap().id;
    docker.start_container(&id, None).await.unwrap();
    let code = match docker.wait_container(&id, None).next().await {
        Some(Ok(answer)) => answer.status_code,
        Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
        other => panic!("probe container: {other:?}"),
    };
    let options = RemoveContainerOptionsBuilder::default().force(true).build();
    docker.remove_container(&id, Some(options)).await.unwrap();
    code
}

#[tokio::test]
async fn concurrent_jobs_cannot_reach_each_other() {
    let agent = test_agent("isolation", |_| {}).await;
    assert_jobs_apart(&agent, "10.213.", None).await;
}

/// Docker keeps job networks apart with rules it deletes and re-inserts whenever it makes a
/// network, so for moments they are not consulted (a connection got through on this machine
/// under the parallel suites); the agent's own rule in `mangle FORWARD` holds then too. The test
/// stands in for such a moment with an ACCEPT first in the `filter` table's `FORWARD`, for its
/// own pool only.
#[tokio::test]
async fn as_root_job_networks_stay_apart_while_dockers_rules_are_away() {
    // Two /24s: one network for each job.
    let pool_text = "10.214.10.0/23";
    let agent = test_agent("apart", |s| s.docker.network_pool = pool_text.into()).await;
    assert_jobs_apart(&agent, "10.214.1", Some(pool_text)).await;
    delete_rule(pool_text.parse().unwrap());
}

/// An ACCEPT of `pool` to `pool` first in the `filter` table's `FORWARD`, deleted when dropped.
struct ForwardAccept(String);

impl ForwardAccept {
    fn rule(pool: &str) -> [&str; 6] {
        ["-s", pool, "-d", pool, "-j", "ACCEPT"]
    }

    fn insert(pool: &str) -> Self {
        let status = std::process::Command::new("iptables")
            .args(["-w", "5", "-I", "FORWARD", "1"])
            .args(Self::rule(pool))
            .status()
            .unwrap();
        assert!(status.success(), "cannot insert the stand-in ACCEPT");
        ForwardAccept(pool.to_owned())
    }
}

impl Drop for ForwardAccept {
    fn drop(&mut self) {
        while std::process::Command::new("iptables")
            .args(["-w", "5", "-D", "FORWARD"])
            .args(Self::rule(&self.0))
            .status()
            .is_ok_and(|s| s.success())
        {}
    }
}

/// Job 2 cannot reach a server job 1 runs on its network, while a probe on job 1's network can.
/// `pool_prefix`: how the pool's addresses begin. `stand_in`: the pool to ACCEPT first in
/// `filter FORWARD` once job 2's network exists (Docker puts its jumps back above anything
/// inserted before it makes a network), while job 2 waits 3 s before it connects.
async fn assert_jobs_apart(agent: &support::TestAgent, pool_prefix: &str, stand_in: Option<&str>) {
    // Job 1 serves a page on its network for as long as it runs.
    let server = job(
        "version: 1\nsteps:\n  - run: echo served > index.html && exec httpd -f -p 8080 -h .\n",
    );
    let stop_server = JobControl::new();
    let serving = agent.executor.run(&server, &Discard, &stop_server);
    let client = async {
        let (address, server_network) = address_of_job(&agent.agent_id).await;
        assert!(
            address.starts_with(pool_prefix),
            "{address}: not from the pool"
        );
        assert_ne!(server_network, "bridge", "the job is on the default bridge");
        // The page is there for whoever is on the job's own network (the control: what job 2
        // fails to reach exists and answers).
        let fetch = format!("{} | grep -q served", get(&address, 8080));
        let started = Instant::now();
        while probe_from(&server_network, &fetch).await != 0 {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the server never answered on its own network"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Job 2, at the same time, on a network of its own: cannot connect.
        let wait = if stand_in.is_some() {
            "sleep 3 && "
        } else {
            ""
        };
        let mut other = job(&format!(
            "version: 1\nsteps:\n  - run: {wait}{}\n",
            get(&address, 8080)
        ));
        other.job_id = 2;
        let accept = async {
            let pool = stand_in?;
            let started = Instant::now();
            while support::networks_of(&agent.agent_id).await.len() < 2 {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "job 2 got no network"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Some(ForwardAccept::insert(pool))
        };
        let (result, _accept) = tokio::join!(agent.run(&other), accept);
        // The default bridge does not reach it either.
        let from_bridge = probe_from("bridge", &fetch).await;
        stop_server.cancel("the test is done");
        (result, from_bridge)
    };
    let (served, (result, from_bridge)) = tokio::join!(serving, client);
    assert_eq!(result.status, JobStatus::Failed, "{result:?}");
    assert!(!result.stdout.contains("served"), "{result:?}");
    assert_ne!(from_bridge, 0, "the default bridge reached a job's network");
    assert_eq!(served.status, JobStatus::Cancelled, "{served:?}");
    agent.assert_clean().await;
}

/// Runs `spec` while watching this agent's job networks; returns the result and the networks
/// seen while it ran.
async fn run_watching(
    agent: &support::TestAgent,
    spec: &gryt_agent::wire::JobSpec,
    control: &JobControl,
) -> (gryt_agent::wire::JobResult, Vec<String>) {
    let seen = std::sync::Mutex::new(Vec::<String>::new());
    let watch = async {
        loop {
            for id in support::networks_of(&agent.agent_id).await {
                let mut seen = seen.lock().unwrap();
                if !seen.contains(&id) {
                    seen.push(id);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let result = tokio::select! {
        result = agent.executor.run(spec, &Discard, control) => result,
        _ = watch => unreachable!(),
    };
    (result, seen.into_inner().unwrap())
}

#[tokio::test]
async fn a_jobs_network_lives_as_long_as_the_job_on_every_path() {
    let agent = test_agent("network-paths", |_| {}).await;
    let on_pool = "ip -4 addr show eth0 | grep -q 'inet 10\\.213\\.' && sleep 0.5";
    let mut timeout = job(&format!(
        "version: 1\nsteps:\n  - run: {on_pool} && sleep 30\n"
    ));
    timeout.timeout_seconds = Some(2);
    let cancelled = JobControl::new();
    let cases = [
        (
            job(&format!("version: 1\nsteps:\n  - run: {on_pool}\n")),
            JobControl::new(),
            JobStatus::Success,
        ),
        (
            job(&format!(
                "version: 1\nsteps:\n  - run: {on_pool} && exit 3\n"
            )),
            JobControl::new(),
            JobStatus::Failed,
        ),
        (timeout, JobControl::new(), JobStatus::Timeout),
        (
            job(&format!(
                "version: 1\nsteps:\n  - run: {on_pool}\n  - run: sleep 30\n"
            )),
            cancelled,
            JobStatus::Cancelled,
        ),
    ];
    for (spec, control, expected) in &cases {
        if *expected == JobStatus::Cancelled {
            let control = control.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                control.cancel("the test cancels it");
            });
        }
        let (result, seen) = run_watching(&agent, spec, control).await;
        assert_eq!(result.status, *expected, "{result:?}");
        assert_eq!(
            seen.len(),
            1,
            "{expected:?}: networks seen during the job: {seen:?}"
        );
        // Removed by the job's own cleanup, before its result: not later, in the background.
        assert_eq!(
            support::networks_of(&agent.agent_id).await,
            Vec::<String>::new(),
            "{expected:?}: the job's network outlived it"
        );
    }
    agent.assert_clean().await;
}

#[tokio::test]
async fn every_job_network_is_hardened_and_labelled() {
    let agent = test_agent("network-audit", |_| {}).await;
    let audit = support::ContainerAudit::start(&agent.agent_id).await;
    let mut spec = job("version: 1\nsteps:\n  - run: sleep 0.5\n  - run: \"true\"\n");
    spec.job_id = 77;
    let result = agent.run(&spec).await;
    assert_eq!(result.status, JobStatus::Success, "{result:?}");
    let (containers, networks) = audit.finish_all().await;
    assert_eq!((containers, networks), (1, 1));
    agent.assert_clean().await;
}

#[tokio::test]
async fn bridge_none_and_named_networks_make_no_job_network() {
    for mode in ["none", "bridge"] {
        let agent = test_agent("network-modes", |s| s.docker.network = mode.into()).await;
        let (result, seen) = run_watching(
            &agent,
            &job("version: 1\nsteps:\n  - run: sleep 0.5\n"),
            &JobControl::new(),
        )
        .await;
        assert_eq!(result.status, JobStatus::Success, "{mode}: {result:?}");
        assert!(seen.is_empty(), "{mode}: a job network was made: {seen:?}");
        agent.assert_clean().await;
    }
}

#[tokio::test]
async fn a_full_pool_is_a_clear_error_and_leaves_nothing() {
    // A /24 pool holds one job network; the test takes it first with a network of its own.
    let pool = "10.215.77.0/24";
    let docker = support::docker().await;
    let blocker = format!("gryt-test-blocker-{}", std::process::id());
    let request = bollard::models::NetworkCreateRequest {
        name: blocker.clone(),
        ipam: Some(bollard::models::Ipam {
            config: Some(vec![bollard::models::IpamConfig {
                subnet: Some(pool.into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    docker.create_network(request).await.unwrap();
    let agent = test_agent("pool-full", |s| s.docker.network_pool = pool.into()).await;
    let result = agent
        .run(&job("version: 1\nsteps:\n  - run: \"true\"\n"))
        .await;
    docker.remove_network(&blocker).await.unwrap();
    // The executor (root here) installed the metadata rule for this pool: not the host's.
    delete_rule(pool.parse().unwrap());
    assert_eq!(result.status, JobStatus::Error, "{result:?}");
    let error = result.error.unwrap_or_default();
    assert!(
        error.contains(pool) && error.contains("docker.network_pool"),
        "{error}"
    );
    agent.assert_clean().await;
}

#[tokio::test]
async fn the_sweep_removes_a_dead_agents_job_network_and_spares_others() {
    let agent_id = support::unique_agent_id("net-sweep");
    let other = support::unique_agent_id("net-sweep-other");
    let docker = support::docker().await;
    let plant = |agent: String, name: String| {
        let docker = docker.clone();
        async move {
            let labels = network::labels(gryt_agent::executor::container::job_labels(
                &agent,
                "99",
                &[],
            ));
            let request = bollard::models::NetworkCreateRequest {
                name,
                labels: Some(labels),
                ..Default::default()
            };
            docker.create_network(request).await.unwrap().id
        }
    };
    let pid = std::process::id();
    let ours = plant(agent_id.clone(), format!("gryt-test-ours-{pid}")).await;
    let theirs = plant(other.clone(), format!("gryt-test-theirs-{pid}")).await;
    let started = Instant::now();
    let agent =
        support::process::Agent::push_in(&agent_id, tempfile::tempdir().unwrap(), &[]).await;
    while !support::networks_of(&agent_id).await.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the orphan network is still there 5 s after start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        support::networks_of(&other).await,
        vec![theirs.clone()],
        "another agent's network was touched"
    );
    let log = agent.log_text();
    assert!(log.contains("orphan sweep removed a network"), "{log}");
    assert!(
        log.contains(&ours),
        "the removed network is not named: {log}"
    );
    docker.remove_network(&theirs).await.unwrap();
}

/// A stand-in of the cloud metadata service: 169.254.169.254 in a network namespace the test
/// made, behind a veth pair and a host route, with busybox `httpd` answering there. Everything
/// is removed on drop (the route first: the host's own route to the address comes back).
struct FakeMetadata {
    ns: String,
    host_end: String,
    server: std::process::Child,
    _root: tempfile::TempDir,
}

/// The page the stand-in serves: what a job must not be able to read.
const METADATA_PAGE: &str = "instance-credentials-of-the-test";

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl FakeMetadata {
    fn start() -> FakeMetadata {
        let id = std::process::id() % 1_000_000;
        let (ns, host_end, ns_end): (String, String, String) = (
            format!("gryt-md-{id}"),
            format!("gmd{id}h"),
            format!("gmd{id}n"),
        );
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("index.html"), METADATA_PAGE).unwrap();
        let (ns_s, host_s, peer_s) = (ns.as_str(), host_end.as_str(), ns_end.as_str());
        ip(&["netns", "add", ns_s]);
        ip(&[
            "link", "add", host_s, "type", "veth", "peer", "name", peer_s,
        ]);
        ip(&["link", "set", peer_s, "netns", ns_s]);
        ip(&["addr", "add", "10.255.254.1/30", "dev", host_s]);
        ip(&["link", "set", host_s, "up"]);
        let in_ns = |args: &[&str]| ip(&[&["netns", "exec", ns_s, "ip"][..], args].concat());
        in_ns(&["addr", "add", "10.255.254.2/30", "dev", peer_s]);
        in_ns(&["addr", "add", "169.254.169.254/32", "dev", peer_s]);
        in_ns(&["link", "set", peer_s, "up"]);
        in_ns(&["link", "set", "lo", "up"]);
        in_ns(&["route", "add", "default", "via", "10.255.254.1"]);
        ip(&[
            "route",
            "replace",
            "169.254.169.254/32",
            "via",
            "10.255.254.2",
        ]);
        let server = std::process::Command::new("ip")
            .args(["netns", "exec", ns_s, "/bin/busybox", "httpd", "-f"])
            // Every address of the namespace: 169.254.169.254 and 10.255.254.2 (the control).
            .args(["-p", "80", "-h"])
            .arg(root.path())
            .spawn()
            .unwrap();
        FakeMetadata {
            ns,
            host_end,
            server,
            _root: root,
        }
    }
}

impl Drop for FakeMetadata {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["route", "del", "169.254.169.254/32", "via", "10.255.254.2"])
            .status();
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", self.host_end.as_str()])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", self.ns.as_str()])
            .status();
    }
}

/// Deletes every copy of the IPv4 rules for `pool` (the test's own pool).
fn delete_rule(pool: network::Pool) {
    use gryt_agent::executor::metadata_guard::{CHAIN, TABLE, v4_rules};
    for rule in v4_rules(pool) {
        while std::process::Command::new("iptables")
            .args(["-w", "5", "-t", TABLE, "-D", CHAIN])
            .args(&rule)
            .output()
            .unwrap()
            .status
            .success()
        {}
    }
}

/// `gryt-agent <args>` with the test's pool; its exit status and stdout.
async fn agent_command(args: &[&str], pool: &str) -> (bool, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_gryt-agent"));
    let state = tempfile::tempdir().unwrap();
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GRYT_PUSH", "true")
        .env("AGENT_API_KEY", support::process::push::KEY)
        .env("GRYT_DOCKER_IMAGE", support::test_image().await)
        .env("GRYT_PULL_POLICY", "never")
        .env("GRYT_STATE_DIR", state.path())
        .env("GRYT_NETWORK_POOL", pool);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn metadata_line(check: &str) -> &str {
    check
        .lines()
        .find(|l| l.contains("metadata"))
        .unwrap_or_else(|| panic!("no metadata line in:\n{check}"))
}

/// Root only (it makes a network namespace and changes the firewall): skipped by name in
/// `.ci/nonroot`.
#[tokio::test]
async fn as_root_job_networks_cannot_reach_the_metadata_address_and_bridge_jobs_can() {
    use gryt_agent::executor::metadata_guard::{RuleState, v4_state};
    let pool_text = "10.214.9.0/24";
    let pool: network::Pool = pool_text.parse().unwrap();
    delete_rule(pool);
    let (_, check) = agent_command(&["check"], pool_text).await;
    assert!(
        metadata_line(&check).starts_with("[warn]"),
        "no rule yet: {check}"
    );
    let _metadata = FakeMetadata::start();
    let fetch = &format!(
        "version: 1\nsteps:\n  - run: {}\n",
        get("169.254.169.254", 80)
    );

    // The control: the default bridge reaches the stand-in (once its server listens).
    let bridge = test_agent("metadata-bridge", |s| s.docker.network = "bridge".into()).await;
    let started = Instant::now();
    let reached = loop {
        let result = bridge.run(&job(fetch)).await;
        if result.status == JobStatus::Success || started.elapsed() > Duration::from_secs(15) {
            break result;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(reached.status, JobStatus::Success, "{reached:?}");
    assert!(reached.stdout.contains(METADATA_PAGE), "{reached:?}");

    // A job on a job network: the executor (root here) installs the rule before it, and
    // the job cannot read the page.
    let jobs = test_agent("metadata-job", |s| s.docker.network_pool = pool_text.into()).await;
    let other_address = &format!("version: 1\nsteps:\n  - run: {}\n", get("10.255.254.2", 80));
    let routed = jobs.run(&job(other_address)).await;
    assert_eq!(
        routed.status,
        JobStatus::Success,
        "job networks route out: {routed:?}"
    );
    let blocked = jobs.run(&job(fetch)).await;
    assert_eq!(v4_state(pool).await, RuleState::Present);
    assert_eq!(blocked.status, JobStatus::Failed, "{blocked:?}");
    assert!(!blocked.stdout.contains(METADATA_PAGE), "{blocked:?}");
    let (_, check) = agent_command(&["check"], pool_text).await;
    assert!(metadata_line(&check).starts_with("[ok]"), "{check}");

    // The packaged pre-start step installs it too, once however often it runs.
    delete_rule(pool);
    for _ in 0..2 {
        let (ok, said) = agent_command(&["guard-metadata"], pool_text).await;
        assert!(ok, "{said}");
    }
    assert_eq!(v4_state(pool).await, RuleState::Present);
    let listed = std::process::Command::new("iptables")
        .args(["-w", "5", "-t", "mangle", "-S", "FORWARD"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert_eq!(
        listed.lines().filter(|l| l.contains(pool_text)).count(),
        2,
        "the two rules are installed once each: {listed}"
    );
    delete_rule(pool);
    bridge.assert_clean().await;
    jobs.assert_clean().await;
}
