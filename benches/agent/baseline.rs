//! The baselines: the same hardened container as a job's, started directly (bollard, `docker run`),
//! and a bare HTTP client doing the protocol's least for pickup.

use super::*;

/// What every job container gets, whoever starts it: the agent's defaults.
#[derive(Clone)]
pub(crate) struct Hardening {
    pub(crate) image: String,
    pub(crate) user: String,
    pub(crate) network: String,
    pub(crate) pids_limit: i64,
    pub(crate) memory_bytes: i64,
    pub(crate) nano_cpus: i64,
}

impl Hardening {
    pub(crate) fn new(image: &str, network: &str) -> anyhow::Result<Self> {
        let d = Settings::load_from(None, &[], &[])?.docker;
        Ok(Hardening {
            image: image.to_owned(),
            user: d.user,
            network: network.to_owned(),
            pids_limit: d.pids_limit,
            memory_bytes: gryt_agent::executor::limits::parse_memory(&d.memory_limit)?,
            nano_cpus: gryt_agent::executor::limits::parse_cpus(&d.cpu_limit)?,
        })
    }

    pub(crate) fn body(&self, script: &str, workspace: &Path) -> ContainerCreateBody {
        ContainerCreateBody {
            image: Some(self.image.clone()),
            cmd: Some(vec!["/bin/sh".into(), "-c".into(), script.into()]),
            user: Some(self.user.clone()),
            working_dir: Some("/workspace".into()),
            labels: Some(HashMap::from([(BENCH_LABEL.into(), "true".into())])),
            tty: Some(false),
            host_config: Some(hardened_host_config(
                &workspace.display().to_string(),
                &self.network,
                self.pids_limit,
                self.memory_bytes,
                self.nano_cpus,
            )),
            ..Default::default()
        }
    }
}

pub(crate) static SEQ: AtomicI64 = AtomicI64::new(1);

pub(crate) fn next_id() -> i64 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

pub(crate) fn container_name() -> String {
    format!("gryt-bench-{}-{}", std::process::id(), next_id())
}

/// A fresh workspace for the job's user, as the agent makes one.
pub(crate) fn workspace(work: &Path) -> anyhow::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix("ws-").tempdir_in(work)?;
    let _ = std::os::unix::fs::chown(dir.path(), Some(1000), Some(1000));
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
    Ok(dir)
}

/// The floor: create, start, wait, remove with bollard. Returns the bytes it read when `attach`.
pub(crate) async fn direct_run(
    docker: &Docker,
    hard: &Hardening,
    work: &Path,
    script: &str,
    attach: bool,
) -> anyhow::Result<u64> {
    let ws = workspace(work)?;
    let options = CreateContainerOptionsBuilder::default()
        .name(&container_name())
        .build();
    let mut body = hard.body(script, ws.path());
    if !attach {
        // With the attach, the output is read through it only, as the agent's job containers do
        // (their log driver is `none`); without it, Docker's default log driver, as `docker run`.
        if let Some(h) = body.host_config.as_mut() {
            h.log_config = None;
        }
    }
    let id = docker.create_container(Some(options), body).await?.id;
    let result = async {
        let mut bytes = 0u64;
        if attach {
            let options = AttachContainerOptionsBuilder::default()
                .stream(true)
                .stdout(true)
                .stderr(true)
                .build();
            let mut attached = docker.attach_container(&id, Some(options)).await?;
            docker.start_container(&id, None).await?;
            while let Some(item) = attached.output.next().await {
                match item? {
                    LogOutput::StdOut { message } | LogOutput::StdErr { message } => {
                        bytes += message.len() as u64
                    }
                    _ => {}
                }
            }
        } else {
            docker.start_container(&id, None).await?;
        }
        let mut wait = docker.wait_container(&id, None);
        while let Some(w) = wait.next().await {
            w?;
        }
        anyhow::Ok(bytes)
    }
    .await;
    let options = RemoveContainerOptionsBuilder::default()
        .force(result.is_err())
        .v(true)
        .build();
    docker.remove_container(&id, Some(options)).await?;
    result
}

/// `docker run --rm` with the same container settings.
pub(crate) fn docker_run(hard: &Hardening, work: &Path) -> anyhow::Result<()> {
    let ws = workspace(work)?;
    let status = Command::new("docker")
        .args(["run", "--rm", "--name", &container_name()])
        .args(["--label", &format!("{BENCH_LABEL}=true")])
        .args(["--user", &hard.user, "--cap-drop", "ALL"])
        .args(["--security-opt", "no-new-privileges"])
        .args(["--pids-limit", &hard.pids_limit.to_string()])
        .args(["--memory", &hard.memory_bytes.to_string()])
        .args(["--memory-swap", &hard.memory_bytes.to_string()])
        .args(["--cpus", &format!("{}", hard.nano_cpus as f64 / 1e9)])
        .args(["--network", &hard.network])
        .args(["-v", &format!("{}:/workspace", ws.path().display())])
        .args(["-w", "/workspace", &hard.image, "/bin/sh", "-c", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .context("cannot run the docker CLI")?;
    if !status.success() {
        bail!("docker run failed: {status}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// The protocol's floor for pickup: lease (long poll) → start → complete, nothing else.
pub(crate) async fn bare_client(url: String) {
    let http = reqwest::Client::new();
    let base = format!("{url}/api/v1/agent");
    loop {
        let lease = http
            .post(format!("{base}/lease"))
            .bearer_auth(KEY)
            .json(
                &json!({"agent_id": "bare", "hostname": "bare", "version": "0", "labels": [],
                          "capacity": 1, "wait_seconds": 25}),
            )
            .send()
            .await;
        let Ok(lease) = lease else { return };
        if lease.status() != reqwest::StatusCode::OK {
            continue;
        }
        let Ok(lease) = lease.json::<Value>().await else {
            return;
        };
        let id = lease["job"]["job_id"].as_i64().unwrap_or(0);
        let lease_id = lease["lease_id"].clone();
        for (call, body) in [
            ("start", json!({"lease_id": lease_id, "started_at": "x"})),
            (
                "complete",
                json!({"lease_id": lease_id, "status": "success"}),
            ),
        ] {
            let _ = http
                .post(format!("{base}/jobs/{id}/{call}"))
                .bearer_auth(KEY)
                .json(&body)
                .send()
                .await;
        }
    }
}
