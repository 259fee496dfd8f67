//! `gryt-agent check`: validates the setup and prints a checklist with what to fix.
//! Exits non-zero when something would stop the agent from running jobs.

use std::path::Path;
use std::process::ExitCode;

use gryt_agent::api::{ApiClient, ApiError, Call, CallHooks, HeartbeatOutcome};
use gryt_agent::config::{PullPolicy, Settings};
use gryt_agent::executor::{Executor, ExecutorSettings};
use gryt_agent::gc::Collector;
use gryt_agent::state::jobs::RunningJobs;
use gryt_agent::state::{KeyProblem, MIN_PUSH_KEY_LEN, Modes, identity, resources};
use gryt_agent::store::Store;
use gryt_agent::wire::pull::HeartbeatRequest;

#[derive(Default)]
struct Checklist {
    failures: usize,
}

impl Checklist {
    fn ok(&mut self, what: impl AsRef<str>) {
        println!("[ok]   {}", what.as_ref());
    }
    fn warn(&mut self, what: impl AsRef<str>, fix: impl AsRef<str>) {
        println!("[warn] {}\n       -> {}", what.as_ref(), fix.as_ref());
    }
    fn fail(&mut self, what: impl AsRef<str>, fix: impl AsRef<str>) {
        self.failures += 1;
        println!("[FAIL] {}\n       -> {}", what.as_ref(), fix.as_ref());
    }
}

pub async fn run(config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let mut list = Checklist::default();
    let settings = match Settings::load(config, &[]) {
        Ok(s) => {
            list.ok("settings load and are valid");
            s
        }
        Err(e) => {
            list.fail(
                format!("settings: {e}"),
                "fix the named key in the file, environment or flags",
            );
            return Ok(ExitCode::from(1));
        }
    };
    check_modes(&settings, &mut list);
    check_dirs(&settings, &mut list);
    check_descriptors(&mut list);
    check_docker(&settings, &mut list).await;
    check_metadata(&settings, &mut list).await;
    check_api(&settings, &mut list).await;
    check_store(&settings, &mut list).await;
    if list.failures == 0 {
        println!("\nall checks passed");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("\n{} check(s) failed", list.failures);
        Ok(ExitCode::from(1))
    }
}

fn check_modes(settings: &Settings, list: &mut Checklist) {
    let key = match settings.api_key() {
        Ok(key) => key,
        Err(e) => {
            list.fail(
                format!("API key: {e}"),
                "make AGENT_API_KEY_FILE point at a readable file",
            );
            None
        }
    };
    let modes = Modes::of(settings);
    if modes.none() {
        return list.fail(
            "neither pull mode nor push mode is configured",
            "set GRYT_API_URL (pull mode) and/or GRYT_PUSH=true (push mode)",
        );
    }
    // Only the current key is checked here, as before: the previous one is checked at start.
    let problems = modes.key_problems(key.as_ref(), None);
    if let Some(url) = &modes.pull_url {
        if problems.contains(&KeyProblem::Pull) {
            list.fail(
                "pull mode has no API key",
                "set AGENT_API_KEY or AGENT_API_KEY_FILE",
            );
        } else {
            list.ok(format!("pull mode: API at {url}"));
        }
    }
    if modes.push {
        if problems.contains(&KeyProblem::Push) {
            list.fail(
                format!("push mode needs an API key of at least {MIN_PUSH_KEY_LEN} characters"),
                "set AGENT_API_KEY (e.g. `openssl rand -hex 32`), the same on the API",
            );
        } else {
            list.ok("push mode: API key set");
        }
    }
}

fn check_dirs(settings: &Settings, list: &mut Checklist) {
    for (what, dir) in [
        ("state dir", settings.state_dir.clone()),
        ("work dir", settings.work_dir()),
    ] {
        // The state dir as the agent makes it: private (0700).
        let made = if what == "state dir" {
            identity::create_state_dir(&dir).map_err(std::io::Error::other)
        } else {
            std::fs::create_dir_all(&dir)
        };
        let probe = made.and_then(|_| tempfile::tempfile_in(&dir));
        match probe {
            Ok(_) => list.ok(format!("{what} {} is writable", dir.display())),
            Err(e) => list.fail(
                format!("{what} {} is not writable: {e}", dir.display()),
                "create it and give the agent's user write access (or set GRYT_STATE_DIR / GRYT_WORK_DIR)",
            ),
        }
    }
}

/// The descriptor limit the agent would get (it raises its soft limit to the hard one).
fn check_descriptors(list: &mut Checklist) {
    match resources::raise_descriptor_limit() {
        Some(limit) if limit < 4096 => list.warn(
            format!("the file descriptor limit is {limit}"),
            "raise it (LimitNOFILE=65536 in the systemd unit, `ulimit -n` in a shell): the endpoint's connections and the jobs share it",
        ),
        Some(limit) => list.ok(format!("file descriptor limit {limit}")),
        None => list.ok("file descriptor limit: unlimited"),
    }
}

async fn check_docker(settings: &Settings, list: &mut Checklist) {
    let executor_settings = match ExecutorSettings::from_settings(settings, "check".into()) {
        Ok(s) => s,
        // An encryption key file that cannot be read: the agent would refuse to start.
        Err(e) => return list.fail(format!("settings: {e}"), "fix the key file or its path"),
    };
    let executor = match Executor::new(executor_settings) {
        Ok(e) => e,
        Err(e) => return list.fail(format!("Docker: {e}"), "fix DOCKER_HOST / docker.host"),
    };
    let docker = match executor.docker().await {
        Ok(d) => d,
        Err(e) => {
            return list.fail(
                format!("Docker: {e}"),
                "start the Docker engine, or fix DOCKER_HOST",
            );
        }
    };
    match docker.version().await {
        Ok(v) => list.ok(format!(
            "Docker engine {} (API {}) answers",
            v.version.unwrap_or_default(),
            v.api_version.unwrap_or_default()
        )),
        Err(e) => {
            return list.fail(
                format!("the Docker engine does not answer: {e}"),
                "start it (`systemctl start docker`) and add the agent's user to the `docker` group",
            );
        }
    }
    let image = &settings.docker.image;
    match docker.inspect_image(image).await {
        Ok(_) => list.ok(format!("default image {image} is present")),
        Err(_) if settings.docker.pull_policy == PullPolicy::Never => list.fail(
            format!("default image {image} is not present and the pull policy is `never`"),
            "load the image (`docker load`/`docker import`) or set GRYT_PULL_POLICY=if-not-present",
        ),
        Err(_) => list.warn(
            format!("default image {image} is not present yet"),
            "it will be pulled before the first job; pull it now to save that time",
        ),
    }
    check_disk(settings, executor, list).await;
}

/// Free space of the work dir and Docker's data root against the collector's marks.
async fn check_disk(settings: &Settings, executor: Executor, list: &mut Checklist) {
    let collector = Collector::new(
        std::sync::Arc::new(executor),
        RunningJobs::default(),
        settings.disk.clone(),
    );
    let Some(disk) = collector.disk_state().await else {
        return;
    };
    let shown = |free: Option<u64>| free.map_or("unreadable".to_owned(), |f| format!("{f} MiB"));
    let root = match (&disk.docker_root, &disk.docker_root_note) {
        (Some(path), _) => format!(
            "Docker root {}: {} free",
            path.display(),
            shown(disk.docker_root_free_mb)
        ),
        (None, note) => note.clone().unwrap_or_default(),
    };
    let what = format!(
        "disk: work dir {}: {} free; {root}; collection below {} MiB, until {} MiB (docker.gc_images = {})",
        disk.work_dir.display(),
        shown(disk.work_dir_free_mb),
        disk.trigger_free_mb,
        disk.target_free_mb,
        format!("{:?}", settings.docker.gc_images).to_lowercase(),
    );
    let lowest = [disk.work_dir_free_mb, disk.docker_root_free_mb]
        .into_iter()
        .flatten()
        .min();
    match lowest {
        Some(free) if free < disk.trigger_free_mb => list.warn(
            what,
            "the agent will remove unused images; free space by hand if it stays low",
        ),
        _ => list.ok(what),
    }
}

/// The metadata protection (see `metadata_guard`): a warning, never a failure, when it is not
/// in place or cannot be read (the firewall is readable by root only).
async fn check_metadata(settings: &Settings, list: &mut Checklist) {
    use gryt_agent::executor::metadata_guard::{RuleState, v4_state};
    use gryt_agent::executor::network::MODE_JOB;
    let network = &settings.docker.network;
    if network != MODE_JOB {
        return list.warn(
            format!("metadata protection: off (docker.network = {network}: jobs reach what the host reaches, the cloud metadata address included)"),
            "use GRYT_NETWORK=job (the default): a network per job, its pool kept from the metadata address",
        );
    }
    let Ok(pool) = settings.docker.network_pool() else {
        return;
    };
    match v4_state(pool).await {
        RuleState::Present => list.ok(format!(
            "metadata protection: active (iptables -t mangle FORWARD drops {pool} -> 169.254.169.254 and between job networks)"
        )),
        RuleState::Absent => list.warn(
            format!("metadata protection: inactive (no rule in iptables -t mangle FORWARD drops {pool} -> 169.254.169.254, or none keeps job networks apart)"),
            "run `gryt-agent guard-metadata` as root (the packaged service does at start), or run the agent as root",
        ),
        RuleState::Unknown(why) => list.warn(
            format!("metadata protection: unknown ({why})"),
            "run `sudo gryt-agent check` to read the firewall; install `iptables` if missing",
        ),
    }
}

/// Object storage: writes, reads back and deletes a small object under the prefix.
async fn check_store(settings: &Settings, list: &mut Checklist) {
    let store = match Store::from_config(&settings.store, settings.ca_file.as_deref()) {
        Ok(Some(store)) => store,
        Ok(None) => return,
        Err(e) => return list.fail(format!("{e}"), "fix GRYT_STORE_URL / GRYT_STORE_ENDPOINT"),
    };
    let url = settings.store.url.as_deref().unwrap_or_default();
    let probe = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        store.probe(&format!("{}-{}", std::process::id(), gryt_agent::VERSION)),
    )
    .await;
    match probe {
        Ok(Ok(())) => list.ok(format!("object store {url} can be written, read and cleaned")),
        Ok(Err(e)) => list.fail(
            format!("{e}"),
            "check the bucket, GRYT_STORE_ENDPOINT, the region and the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the instance role)",
        ),
        Err(_) => list.fail(
            format!("the object store {url} did not answer within 60 s"),
            "check GRYT_STORE_ENDPOINT and the network route to it",
        ),
    }
}

struct Quiet;

impl CallHooks for Quiet {
    fn succeeded(&self, _: Call) {}
    fn failed(&self, _: Call, _: &str) {}
}

/// Pull mode: one authenticated call. A heartbeat for a job that cannot exist is safe (it can
/// never hand out a job, unlike a lease) and tells the key's fate: 404/409/410 means the API
/// knows this key and simply holds no such lease; 401/403 means it refuses the key.
async fn check_api(settings: &Settings, list: &mut Checklist) {
    let Some(url) = Modes::of(settings).pull_url else {
        return;
    };
    let Ok(Some(key)) = settings.api_key() else {
        return;
    };
    let client = match ApiClient::new(
        &url,
        settings.allow_insecure_http,
        &key,
        settings.ca_file.as_deref(),
        std::sync::Arc::new(Quiet),
    ) {
        Ok(c) => c,
        Err(e) => return list.fail(format!("API: {e}"), "fix GRYT_API_URL / GRYT_CA_FILE"),
    };
    let probe = HeartbeatRequest {
        lease_id: "gryt-agent-check".into(),
    };
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        client.heartbeat(0, &probe),
    )
    .await;
    match answer {
        Ok(Ok(HeartbeatOutcome::Lost(_))) | Ok(Ok(HeartbeatOutcome::Renewed { .. })) => {
            list.ok(format!("the API at {url} accepts this agent's key"))
        }
        Ok(Err(e @ ApiError::Unauthorized { .. })) => list.fail(
            format!("{e}"),
            "give the agent the key the API has for it (AGENT_API_KEY)",
        ),
        Ok(Err(e)) => list.fail(
            format!("API: {e}"),
            "check GRYT_API_URL and that the API is up",
        ),
        Err(_) => list.fail(
            format!("the API at {url} did not answer within 20 s"),
            "check GRYT_API_URL, DNS, the firewall/Tailscale route and the API",
        ),
    }
}
