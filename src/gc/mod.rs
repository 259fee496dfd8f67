//! Disk hygiene: the agent frees disk space by itself, so it stays healthy for months.
//!
//! On a timer (`disk.gc_interval_seconds`), and within [`WAKE_SPACING`] of the agent refusing
//! jobs for low disk (`min_free_disk_mb`, or [`GcHandle::wake`]), the collector
//! removes this agent's stopped containers, networks and volumes (by the `io.gryt.agent.id`
//! label), then, when the free space of Docker's data root (or of the work dir on the same
//! filesystem, or alone when Docker's root cannot be measured) is below
//! `disk.gc_trigger_free_mb`, removes images until `disk.gc_target_free_mb` is free: least
//! recently used first, the default image last, never one a running job holds or a running
//! container uses, and only those `docker.gc_images` allows. It never delays a job: jobs only
//! register their image in [`ImageUse`] (a short lock), and the collector re-checks those
//! holds right before each removal.

pub mod engine;
pub mod plan;
pub mod space;
pub mod usage;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{DiskSettings, GcImages, PullPolicy};
use crate::executor::Executor;
use crate::state::AgentState;
pub use crate::state::disk::{GcHandle, GcReport};
use crate::state::jobs::RunningJobs;

pub use space::{DiskProbe, DiskState, DockerRoot, FsReading, Readings, Statvfs};
pub use usage::{ImageHold, ImageUse};

use space::mib;

/// However often jobs are refused for low disk, collections start at most this often.
pub const WAKE_SPACING: Duration = Duration::from_secs(30);

/// The first collection waits this long after the start: the orphan sweep at start removes
/// what an earlier run left, and the two need not race for the same containers.
pub const FIRST_DELAY: Duration = Duration::from_secs(10);

/// What one collection did and saw.
#[derive(Debug, Clone, Default)]
pub struct Collection {
    /// Names removed (tags, digests or ids), in order.
    pub images_removed: Vec<String>,
    /// Docker's size of the images that went entirely (an untagged alias frees nothing).
    pub bytes_freed: u64,
    pub leftovers: engine::Leftovers,
    /// The disk after the collection (`None` when Docker did not answer).
    pub disk: Option<DiskState>,
    /// Set when free space is still below the trigger after the collection.
    pub still_low: Option<String>,
    /// Why something was not done (Docker's root not measurable, images not allowed, ...).
    pub notes: Vec<String>,
}

/// Collects on one agent's behalf.
pub struct Collector {
    executor: Arc<Executor>,
    jobs: RunningJobs,
    disk: DiskSettings,
    probe: Arc<dyn DiskProbe>,
}

impl Collector {
    pub fn new(executor: Arc<Executor>, jobs: RunningJobs, disk: DiskSettings) -> Self {
        Collector {
            executor,
            jobs,
            disk,
            probe: Arc::new(Statvfs),
        }
    }

    /// Replaces `statvfs` (tests give readings without filling a disk).
    pub fn with_probe(mut self, probe: Arc<dyn DiskProbe>) -> Self {
        self.probe = probe;
        self
    }

    fn trigger_bytes(&self) -> u64 {
        self.disk.gc_trigger_free_mb.saturating_mul(1024 * 1024)
    }

    fn target_bytes(&self) -> u64 {
        self.disk.gc_target_free_mb.saturating_mul(1024 * 1024)
    }

    /// One collection. Never fails: what could not be done is in `notes` and the log.
    pub async fn collect(&self) -> Collection {
        let settings = self.executor.settings();
        let mut done = Collection::default();
        // Without a client nothing is removed, but the disk is still measured and reported.
        let docker = self.executor.docker().await.ok();
        let root = match &docker {
            Some(docker) => {
                let (jobs, executor) = (self.jobs.clone(), self.executor.clone());
                // Running jobs' and the warm pool's live containers (see the orphan sweep).
                done.leftovers = engine::remove_leftovers(docker, &settings.agent_id, move || {
                    let running = jobs.job_ids().into_iter().map(|id| id.to_string());
                    running.chain(executor.warm_ids()).collect()
                })
                .await;
                let host = settings.docker.host.as_deref();
                space::docker_root(docker, host, self.probe.clone()).await
            }
            None => DockerRoot::Unknown(
                "no Docker client (see docker.host): measuring the work dir only".into(),
            ),
        };
        if let DockerRoot::Unknown(note) = &root {
            done.notes.push(note.clone());
        }
        let before = self.read(&root).await;
        let trigger = self.trigger_bytes();
        match (before.image_free_bytes(), &docker) {
            (Some(free), Some(docker)) if trigger > 0 && free < trigger => {
                self.collect_images(docker, &root, &mut done).await
            }
            (Some(free), None) if trigger > 0 && free < trigger => {
                done.notes.push("no image removed: no Docker client".into())
            }
            (Some(_), _) => {}
            (None, _) => done
                .notes
                .push("cannot read the free space: no image removed".into()),
        }
        let after = self.read(&root).await;
        let disk = self.state_of(&root, &after);
        if let Some(free) = after.lowest_free_bytes().filter(|f| *f < trigger) {
            let place = match (&disk.docker_root, after.docker_root) {
                (Some(path), Some(r)) if r.free_bytes == free => path.clone(),
                _ => disk.work_dir.clone(),
            };
            done.still_low = Some(format!(
                "disk still low after collection: {} MiB free on {} (disk.gc_trigger_free_mb = {})",
                mib(free),
                place.display(),
                self.disk.gc_trigger_free_mb
            ));
        }
        done.disk = Some(disk);
        done
    }

    async fn collect_images(
        &self,
        docker: &bollard::Docker,
        root: &DockerRoot,
        done: &mut Collection,
    ) {
        let settings = self.executor.settings();
        if settings.docker.gc_images == GcImages::Off {
            done.notes
                .push("docker.gc_images = off: no image removed".into());
            return;
        }
        if settings.docker.pull_policy == PullPolicy::Never {
            // Such images were put there by hand and could not come back: never removed.
            done.notes
                .push("docker.pull_policy = never: no image removed".into());
            return;
        }
        let record = &settings.image_use;
        let planned = match self.plan(docker).await {
            Ok(planned) => planned,
            Err(e) => {
                // Fail closed: without knowing what runs, nothing goes.
                done.notes.push(format!("no image removed: {e}"));
                return;
            }
        };
        let (plan, mut protected) = planned;
        let target = self.target_bytes();
        for mut candidate in plan {
            match self.read(root).await.image_free_bytes() {
                Some(free) if free < target => {}
                _ => break,
            }
            // A job may have started with this image since the plan was made.
            if self
                .held_since(docker, &mut candidate, &mut protected)
                .await
            {
                continue;
            }
            match engine::remove_image(docker, &candidate.reference).await {
                Ok(removal) => {
                    record.forget(&candidate.reference);
                    let freed = if removal.deleted {
                        candidate.size_bytes
                    } else {
                        0
                    };
                    done.bytes_freed = done.bytes_freed.saturating_add(freed);
                    tracing::info!(
                        image = %candidate.reference,
                        freed_mib = mib(freed),
                        "disk collection removed an image"
                    );
                    done.images_removed.push(candidate.reference);
                }
                // A container (even a stopped one) still uses it: kept, as wanted.
                Err(e) if e.ends_with("(HTTP 409)") => tracing::debug!(
                    image = %candidate.reference,
                    error = %e,
                    "disk collection kept an image in use"
                ),
                Err(e) => tracing::warn!(
                    image = %candidate.reference,
                    error = %e,
                    "disk collection cannot remove an image"
                ),
            }
        }
    }

    /// The removal order, and what protects images now.
    async fn plan(
        &self,
        docker: &bollard::Docker,
    ) -> Result<(Vec<plan::Candidate>, plan::Protected), String> {
        let settings = self.executor.settings();
        let record = &settings.image_use;
        let candidates = engine::candidates(docker, settings.docker.gc_images, record).await?;
        let (references, image_ids) = engine::running_images(docker).await?;
        let mut protected = plan::Protected {
            image_ids,
            references,
        };
        for reference in record.held() {
            protect(docker, &reference, &mut protected).await?;
        }
        let default_id = engine::inspect(docker, &settings.docker.image)
            .await?
            .map(|i| i.id);
        let plan = plan::order(
            settings.docker.gc_images,
            candidates,
            &protected,
            &settings.docker.image,
            default_id.as_deref(),
        );
        Ok((plan, protected))
    }

    /// True when `candidate` must stay now: a job holds it (by name, or by image id when it is
    /// the image's last name, counted again now), or it is gone already. Fails closed: what
    /// cannot be checked stays.
    async fn held_since(
        &self,
        docker: &bollard::Docker,
        candidate: &mut plan::Candidate,
        protected: &mut plan::Protected,
    ) -> bool {
        for reference in self.executor.settings().image_use.held() {
            if !protected.references.contains(&reference)
                && protect(docker, &reference, protected).await.is_err()
            {
                return true;
            }
        }
        match engine::inspect(docker, &candidate.reference).await {
            Ok(Some(now)) if now.id == candidate.image_id => candidate.names = now.names,
            _ => return true,
        }
        protected.covers(candidate)
    }

    async fn read(&self, root: &DockerRoot) -> Readings {
        let probe = self.probe.clone();
        let work_dir = self.executor.settings().work_dir.clone();
        let root = root.clone();
        tokio::task::spawn_blocking(move || Readings::take(&*probe, &work_dir, &root))
            .await
            .unwrap_or(Readings {
                work_dir: None,
                docker_root: None,
            })
    }

    fn state_of(&self, root: &DockerRoot, readings: &Readings) -> DiskState {
        DiskState {
            work_dir: self.executor.settings().work_dir.clone(),
            work_dir_free_mb: readings.work_dir.map(|r| mib(r.free_bytes)),
            docker_root: match root {
                DockerRoot::Local(path) => Some(path.clone()),
                DockerRoot::Unknown(_) => None,
            },
            docker_root_free_mb: readings.docker_root.map(|r| mib(r.free_bytes)),
            docker_root_note: match root {
                DockerRoot::Unknown(note) => Some(note.clone()),
                DockerRoot::Local(_) => None,
            },
            trigger_free_mb: self.disk.gc_trigger_free_mb,
            target_free_mb: self.disk.gc_target_free_mb,
        }
    }

    /// The disk as the collector sees it, without collecting (`gryt-agent check`).
    pub async fn disk_state(&self) -> Option<DiskState> {
        let docker = self.executor.docker().await.ok()?;
        let settings = self.executor.settings();
        let root =
            space::docker_root(&docker, settings.docker.host.as_deref(), self.probe.clone()).await;
        let readings = self.read(&root).await;
        Some(self.state_of(&root, &readings))
    }
}

/// Adds a held reference, and its image id when the image exists, to `protected`.
async fn protect(
    docker: &bollard::Docker,
    reference: &str,
    protected: &mut plan::Protected,
) -> Result<(), String> {
    protected.references.insert(reference.to_owned());
    if let Some(image) = engine::inspect(docker, reference).await? {
        protected.image_ids.insert(image.id);
    }
    Ok(())
}

/// The collector's tasks; [`GcTasks::stop`] ends them and writes the record one last time.
pub struct GcTasks {
    timer: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl GcTasks {
    pub async fn stop(self) {
        self.timer.abort();
        self.stop.cancel();
        let _ = self.writer.await;
    }
}

/// Loads the record of image use and starts the collector's timer and the record's writer.
/// The first collection runs [`FIRST_DELAY`] after the start, in the background: it never
/// holds up the agent's start.
pub async fn start(state: Arc<AgentState>) -> GcTasks {
    let record = state.executor.settings().image_use.clone();
    match record.load().await {
        Ok(count) => tracing::debug!(images = count, "image-use record loaded"),
        Err(e) => tracing::warn!(
            error = %e,
            "starting with an empty image-use record: images used before are not collected \
             under docker.gc_images = agent"
        ),
    }
    let stop = CancellationToken::new();
    let writer = tokio::spawn(write_record(record, stop.clone()));
    let collector = Collector::new(
        state.executor.clone(),
        state.jobs.clone(),
        state.settings.disk.clone(),
    );
    let timer = tokio::spawn(run_timer(collector, state));
    GcTasks {
        timer,
        writer,
        stop,
    }
}

async fn run_timer(collector: Collector, state: Arc<AgentState>) {
    let interval = Duration::from_secs(state.settings.disk.gc_interval_seconds);
    let mut last: Option<Instant> = None;
    tokio::select! {
        _ = tokio::time::sleep(FIRST_DELAY) => {}
        _ = state.shutdown.stopped() => return,
    }
    loop {
        if let Some(last) = last {
            tokio::select! {
                _ = tokio::time::sleep_until(last + interval) => {}
                _ = state.gc.woken() => tokio::time::sleep_until(last + WAKE_SPACING).await,
                _ = refusing_jobs(&state, last + WAKE_SPACING) => {}
                _ = state.shutdown.stopped() => return,
            }
        }
        let done = collector.collect().await;
        // What could not be done is said once at info level, then only in debug logs.
        report(&state, &done, last.is_none());
        last = Some(Instant::now());
    }
}

/// Resolves once the work dir is below `min_free_disk_mb` (the agent then refuses jobs),
/// checking from `from` on every [`WAKE_SPACING`].
async fn refusing_jobs(state: &AgentState, from: Instant) {
    tokio::time::sleep_until(from).await;
    loop {
        let work_dir = state.executor.settings().work_dir.clone();
        let min_free_mb = state.settings.min_free_disk_mb;
        let refusing = tokio::task::spawn_blocking(move || {
            crate::state::resources::disk_problem(&work_dir, min_free_mb).is_some()
        })
        .await
        .unwrap_or(false);
        if refusing {
            return;
        }
        tokio::time::sleep(WAKE_SPACING).await;
    }
}

fn report(state: &AgentState, done: &Collection, first: bool) {
    let l = done.leftovers;
    if !done.images_removed.is_empty() || l != engine::Leftovers::default() {
        tracing::info!(
            images = done.images_removed.len(),
            freed_mib = mib(done.bytes_freed),
            containers = l.containers,
            networks = l.networks,
            volumes = l.volumes,
            "disk collection done"
        );
    }
    for note in &done.notes {
        if first {
            tracing::info!(note = %note, "disk collection");
        } else {
            tracing::debug!(note = %note, "disk collection");
        }
    }
    if let Some(problem) = &done.still_low {
        tracing::warn!("{problem}");
    }
    state.metrics.disk_collection(
        done.images_removed.len() as u64,
        done.bytes_freed,
        done.still_low.is_some(),
    );
    state.gc.set(GcReport {
        last_run: crate::wire::rfc3339(time::OffsetDateTime::now_utc()),
        images_removed: done.images_removed.len(),
        bytes_freed: done.bytes_freed,
        disk: done.disk.clone(),
        still_low: done.still_low.clone(),
    });
}

/// Writes the record a moment after each change (changes in a burst make one write), and once
/// more when stopped.
async fn write_record(record: ImageUse, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = record.changed() => {}
            _ = stop.cancelled() => break,
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.cancelled() => break,
        }
        if let Err(e) = record.save().await {
            tracing::warn!(error = %e, "cannot write the image-use record");
        }
    }
    if let Err(e) = record.save().await {
        tracing::warn!(error = %e, "cannot write the image-use record");
    }
}
