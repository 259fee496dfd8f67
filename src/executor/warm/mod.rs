//! The warm pool: containers of the default image created and started ahead of time, so a job
//! that fits skips the cold start (`docker.warm_pool`, `gryt-agent run` only).
//!
//! A warm container is a job container made before its job: the same hardened spec
//! (`container::hardened_host_config`), the exec shape (a keepalive main process), its own fresh
//! workspace and, with `docker.network = "job"`, its own fresh network; its limits are the
//! agent's defaults until a job takes it and its own are applied. Its labels are the usual
//! `job_labels` with a job id of its own, `warm-<hex>`, and [`LABEL_WARM`].
//!
//! **A container never serves two jobs**: a taken container leaves the pool for good and goes
//! through its job's one cleanup exit like a cold one; the pool makes a fresh one instead.
//!
//! Files: this one is the face ([`WarmPool`]: status, ids, start, drain, and the job's
//! [`Starting`] mark); `make.rs` makes and discards one warm container; `refill.rs` the
//! background loop that keeps the pool full; `dead.rs` removes a ready container that stopped
//! running (killed, or the engine restarted); `take.rs` how a job takes one.

mod dead;
mod make;
mod refill;
mod take;

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

use super::Executor;
use super::container::JobContainer;
use super::network::JobNetwork;
use super::workspace::Workspace;

/// Label on a warm container and its network, beside the job labels (value `true`).
pub const LABEL_WARM: &str = "io.gryt.warm";
/// First part of every warm container's job id label (and of its workspace's job part).
pub const WARM_ID_PREFIX: &str = "warm-";
/// How long the pool's drain at shutdown may wait for a refill under way (an engine that does
/// not answer must not keep the agent from exiting; the next start's sweep removes the rest).
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// What `/health` shows of the pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct WarmStatus {
    /// How many ready containers the pool keeps (0: off).
    pub target: usize,
    /// How many are ready now.
    pub ready: usize,
}

/// The pool of one executor. Off (target 0) until [`WarmPool::start`]; `exec` never starts it.
pub struct WarmPool {
    shared: Arc<Shared>,
}

/// What the pool, its refill loop and the jobs share.
struct Shared {
    /// The image the pool's containers run (`docker.image`).
    image: String,
    /// Ready containers kept; 0 while off.
    target: AtomicUsize,
    inner: Mutex<Inner>,
    /// Bumped on every change the refill loop or a waiting job may be waiting for.
    changed: watch::Sender<()>,
    /// Warm ids made and not yet removed, ready or taken: the sweeps spare them.
    live: Arc<Mutex<HashSet<String>>>,
    /// Jobs between their start in the executor and their first command: a refill waits for
    /// none to be left, so it never delays a job on its way to its first command.
    starting: AtomicUsize,
    /// Ready containers found dead by the watch (`dead.rs`); the refill backs off on them.
    deaths: AtomicU64,
    ready_gauge: Gauge,
    warm_jobs: Counter,
    /// The refill loop and the watch, once started.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

#[derive(Default)]
struct Inner {
    ready: VecDeque<Warm>,
    /// A refill is making a container now (past its wait for starting jobs).
    refilling: bool,
    /// Drained: nothing more is made or handed out.
    stopped: bool,
}

/// One ready container with its workspace and network.
struct Warm {
    container: JobContainer,
    network: Option<JobNetwork>,
    workspace: Workspace,
    live: LiveId,
    /// The image is held while the container exists: the disk collector never removes it.
    _image: crate::gc::ImageHold,
}

/// A warm id in the pool's live set, taken out when this is dropped: kept by whoever holds the
/// container (the pool, then the job until its cleanup is over).
pub(super) struct LiveId {
    set: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl LiveId {
    fn new(set: &Arc<Mutex<HashSet<String>>>) -> Self {
        let id = format!("{WARM_ID_PREFIX}{:016x}", fastrand::u64(..));
        lock(set).insert(id.clone());
        LiveId {
            set: set.clone(),
            id,
        }
    }

    pub(super) fn id(&self) -> &str {
        &self.id
    }
}

/// A warm id an earlier agent process's pool gave a container that a job it ran had taken: kept in
/// the live set (so the sweeps spare the container, its network and its workspace) while the
/// job is carried on by this process (`executor::adopt`).
pub struct Spared(#[allow(dead_code)] LiveId);

impl Drop for LiveId {
    fn drop(&mut self) {
        lock(&self.set).remove(&self.id);
    }
}

/// A job on its way to its first command; refills wait while any is (see `refill.rs`).
pub(super) struct Starting(Arc<Shared>);

impl Drop for Starting {
    fn drop(&mut self) {
        self.0.starting.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.send_replace(());
    }
}

/// A lock that a panic elsewhere does not poison for good: the data is sets and queues.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl WarmPool {
    /// An empty pool, off, for containers of `image`.
    pub(super) fn new(image: String) -> Self {
        let (changed, _) = watch::channel(());
        WarmPool {
            shared: Arc::new(Shared {
                image,
                target: AtomicUsize::new(0),
                inner: Mutex::new(Inner::default()),
                changed,
                live: Arc::default(),
                starting: AtomicUsize::new(0),
                deaths: AtomicU64::new(0),
                ready_gauge: Gauge::default(),
                warm_jobs: Counter::default(),
                tasks: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Turns the pool on with `min(docker.warm_pool, slots)` containers and starts its refill
    /// loop and its watch. Called once by the long-running agent after its first sweep (which removes an
    /// earlier process's pool); a second call, or a target of 0, does nothing.
    pub(super) fn start(&self, executor: Arc<Executor>, slots: usize) {
        let target = executor.settings.docker.warm_pool.min(slots);
        let mut tasks = lock(&self.shared.tasks);
        if target == 0 || !tasks.is_empty() || lock(&self.shared.inner).stopped {
            return;
        }
        self.shared.target.store(target, Ordering::SeqCst);
        tracing::info!(target, image = %self.shared.image, "warm pool on");
        let watch = dead::run(self.shared.clone(), executor.clone());
        tasks.push(tokio::spawn(refill::run(self.shared.clone(), executor)));
        tasks.push(tokio::spawn(watch));
    }

    /// Target and ready count, from memory.
    pub fn status(&self) -> WarmStatus {
        WarmStatus {
            target: self.shared.target.load(Ordering::SeqCst),
            ready: lock(&self.shared.inner).ready.len(),
        }
    }

    /// Spares `id` (a warm id of an earlier process, see [`Spared`]) until the guard is dropped.
    pub fn spare(&self, id: &str) -> Spared {
        lock(&self.shared.live).insert(id.to_owned());
        Spared(LiveId {
            set: self.shared.live.clone(),
            id: id.to_owned(),
        })
    }

    /// The warm ids of every container the pool made and that is not removed yet (ready or
    /// taken by a job): the sweeps spare these as they spare running jobs.
    pub fn live_ids(&self) -> Vec<String> {
        lock(&self.shared.live).iter().cloned().collect()
    }

    /// The gauge of ready containers and the counter of jobs that ran in a warm one, for the
    /// agent's metrics registry.
    pub fn metrics(&self) -> (Gauge, Counter) {
        (
            self.shared.ready_gauge.clone(),
            self.shared.warm_jobs.clone(),
        )
    }

    /// Marks a job on its way to its first command until the mark is dropped.
    pub(super) fn job_starting(&self) -> Starting {
        self.shared.starting.fetch_add(1, Ordering::SeqCst);
        Starting(self.shared.clone())
    }

    /// Stops the pool and removes its ready containers, networks and workspaces. A refill under
    /// way finishes (bounded by [`DRAIN_LIMIT`]) and removes what it made, as does the watch a
    /// dead container it is removing. Called when the agent stops, after its jobs: a taken
    /// container goes with its job.
    pub(super) async fn drain(&self) {
        lock(&self.shared.inner).stopped = true;
        self.shared.target.store(0, Ordering::SeqCst);
        self.shared.changed.send_replace(());
        let tasks = std::mem::take(&mut *lock(&self.shared.tasks));
        let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
        for mut task in tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                tracing::warn!(
                    "warm pool: a refill did not end in time; the next start's sweep removes what it made"
                );
                task.abort();
            }
        }
        let ready: Vec<Warm> = lock(&self.shared.inner).ready.drain(..).collect();
        self.shared.ready_gauge.set(0);
        let removed = ready.len();
        futures_util::future::join_all(ready.into_iter().map(make::discard)).await;
        if removed > 0 {
            tracing::info!(removed, "warm pool drained");
        }
    }
}

impl Shared {
    /// How many more containers the pool wants now.
    fn wanted(&self) -> usize {
        let inner = lock(&self.inner);
        let target = self.target.load(Ordering::SeqCst);
        if inner.stopped {
            return 0;
        }
        target.saturating_sub(inner.ready.len() + usize::from(inner.refilling))
    }

    fn set_ready_gauge(&self, inner: &Inner) {
        self.ready_gauge.set(inner.ready.len() as i64);
    }
}
