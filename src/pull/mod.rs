//! Pull mode: lease jobs from the main API, run them, stream their logs and report their results
//! (protocol v1, `docs/protocol.md`).
//!
//! `worker` leases, `runner` carries one job through start/run/complete, `heartbeat` keeps its
//! lease, `logs` and `streamer` buffer and send its output, `delivery` sends its result (also
//! one an earlier run left), `spool` keeps results across restarts, `adopt` carries on the jobs
//! an earlier agent process left running. Admission and the run itself
//! are shared with push mode (`crate::state::admit`, `crate::state::run`).
//! Nothing here speaks HTTP directly: that is `crate::api`.

pub mod adopt;
pub mod delivery;
pub mod heartbeat;
pub mod logs;
pub mod runner;
pub mod spool;
pub mod streamer;
pub mod worker;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::api::{ApiClient, ApiError, Call, CallHooks};
use crate::state::{AgentOptions, AgentState};
use runner::JobEnd;
use spool::{Spool, SpoolEntry, SpoolError};
pub use worker::WorkEnd;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("{0}")]
    Api(#[from] ApiError),
    #[error("{0}")]
    Spool(#[from] SpoolError),
    #[error("pull mode needs api_url (GRYT_API_URL)")]
    NoUrl,
    #[error("pull mode needs AGENT_API_KEY (or AGENT_API_KEY_FILE)")]
    NoKey,
    #[error("cannot set up pull mode: {0}")]
    Setup(String),
}

/// What every part of pull mode shares.
pub struct Ctx {
    pub state: Arc<AgentState>,
    pub client: ApiClient,
    pub spool: Spool,
    pub hostname: String,
    /// Jobs run to their end by this agent (for `--once` / `--max-jobs`).
    pub ran: AtomicU64,
    last_busy: Mutex<Instant>,
    /// Leased jobs waiting for a slot (push mode took theirs): no lease call meanwhile.
    awaiting: Awaiting,
}

/// How many leased jobs wait for a slot, watched so the lease loop can wait for none.
#[derive(Debug, Clone)]
struct Awaiting(Arc<watch::Sender<usize>>);

impl Awaiting {
    fn new() -> Self {
        Awaiting(Arc::new(watch::Sender::new(0)))
    }

    fn count(&self) -> usize {
        *self.0.borrow()
    }

    /// Resolves once no leased job waits for a slot.
    async fn none(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives in `self`: the wait ends only when the count is 0.
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

/// Marks a leased job as waiting for a slot while it lives.
pub struct AwaitingSlot(Awaiting);

impl Drop for AwaitingSlot {
    fn drop(&mut self) {
        self.0.0.send_modify(|n| *n -= 1);
    }
}

impl Ctx {
    /// Checks the settings and prepares the client and the spool (off the async runtime: it
    /// reads the CA file and makes the state dir); makes no connection.
    pub async fn new(state: Arc<AgentState>) -> Result<Arc<Self>, PullError> {
        tokio::task::spawn_blocking(move || Self::new_blocking(state))
            .await
            .unwrap_or_else(|e| Err(PullError::Setup(e.to_string())))
    }

    fn new_blocking(state: Arc<AgentState>) -> Result<Arc<Self>, PullError> {
        let settings = &state.settings;
        let url = state.modes.pull_url.clone().ok_or(PullError::NoUrl)?;
        let key = state.api_key.clone().ok_or(PullError::NoKey)?;
        let hooks: Arc<dyn CallHooks> = Arc::new(StateHooks(state.clone()));
        let client = ApiClient::new(
            &url,
            settings.allow_insecure_http,
            &key,
            settings.ca_file.as_deref(),
            hooks,
        )?;
        let spool = Spool::open(&settings.state_dir)?;
        Ok(Arc::new(Ctx {
            hostname: gethostname::gethostname().to_string_lossy().into_owned(),
            state,
            client,
            spool,
            ran: AtomicU64::new(0),
            last_busy: Mutex::new(Instant::now()),
            awaiting: Awaiting::new(),
        }))
    }

    fn awaiting_slot(&self) -> AwaitingSlot {
        self.awaiting.0.send_modify(|n| *n += 1);
        AwaitingSlot(self.awaiting.clone())
    }

    fn touch(&self) {
        *self.last_busy.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn idle_for(&self) -> std::time::Duration {
        self.last_busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }
}

/// How pull mode ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PullEnd {
    pub work: WorkEnd,
    /// Results still in the spool (not delivered) when it ended.
    pub undelivered: usize,
}

/// Runs pull mode until shutdown begins or an ephemeral limit is reached; returns once every
/// job it took has been reported (or given up on by a second signal).
pub async fn run(ctx: Arc<Ctx>, options: AgentOptions, claimed: Vec<adopt::Claimed>) -> PullEnd {
    let mut tasks: JoinSet<JobEnd> = JoinSet::new();
    // Read before the first lease and before the claimed jobs are decided: a job of this run
    // writes its log, then its entry, into the same directory, and must be neither taken for an
    // orphan nor replayed beside its own delivery (a claimed job given up writes one). Jobs an
    // earlier run left unfinished, and cannot be carried on, become `error` completions here.
    let spooled = ctx.spool.prepare_async().await;
    // Claimed before the first sweep (`adopt::claim`): carried on or given up beside the leases.
    adopt::spawn_all(&ctx, claimed, &mut tasks);
    let replay = tokio::spawn(replay_spool(ctx.clone(), spooled));
    let work = worker::work(ctx.clone(), &options, &mut tasks).await;
    tracing::info!(?work, "no more leases");
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            tracing::error!(error = %e, "a job task failed");
        }
    }
    let _ = replay.await;
    let spool = ctx.spool.clone();
    let undelivered = tokio::task::spawn_blocking(move || spool.entries().len())
        .await
        .unwrap_or(0);
    if undelivered > 0 {
        tracing::error!(
            undelivered,
            dir = %ctx.spool.dir().display(),
            "results not delivered: they stay in the spool for the next start"
        );
    }
    PullEnd { work, undelivered }
}

/// Sends what earlier runs left in the spool: the rest of each log, then the completion.
async fn replay_spool(ctx: Arc<Ctx>, spooled: Vec<(String, SpoolEntry)>) {
    for (name, entry) in spooled {
        if !delivery::replay(&ctx, &name, &entry).await {
            // Told to stop at once (a second signal): the rest stays for the next start.
            return;
        }
    }
}

/// Reports every call's fate to `/health` and the metrics.
struct StateHooks(Arc<AgentState>);

impl CallHooks for StateHooks {
    fn succeeded(&self, _call: Call) {
        self.0.api_status.record_success();
    }

    fn failed(&self, call: Call, message: &str) {
        self.0.metrics.api_error(call.as_str());
        self.0
            .api_status
            .record_error(format!("{}: {message}", call.as_str()));
    }
}
