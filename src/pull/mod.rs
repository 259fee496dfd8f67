//! Pull mode: lease jobs from the main API, run them, stream their logs and report their results
//! (protocol v1, `docs/protocol.md`).
//!
//! `worker` leases, `runner` carries one job through start/run/complete, `heartbeat` keeps its
//! lease, `logs` and `streamer` buffer and send its output, `spool` keeps results across restarts.
//! Nothing here speaks HTTP directly: that is `crate::api`.

pub mod heartbeat;
pub mod logs;
pub mod runner;
pub mod spool;
pub mod streamer;
pub mod worker;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::agent::{AgentOptions, AgentState};
use crate::api::{ApiClient, ApiError, Call, CallHooks};
use crate::executor::JobControl;
use runner::{JobEnd, cancel_on_abort, deliver};
use spool::{Spool, SpoolEntry, SpoolError};
use streamer::{StreamEnd, Streamer};
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
    awaiting: Arc<AtomicUsize>,
}

/// Marks a leased job as waiting for a slot while it lives.
pub struct AwaitingSlot(Arc<AtomicUsize>);

impl Drop for AwaitingSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
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
        let url = settings.api_url.clone().ok_or(PullError::NoUrl)?;
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
            awaiting: Arc::new(AtomicUsize::new(0)),
        }))
    }

    fn awaiting_slot(&self) -> AwaitingSlot {
        self.awaiting.fetch_add(1, Ordering::AcqRel);
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
pub async fn run(ctx: Arc<Ctx>, options: AgentOptions) -> PullEnd {
    let mut tasks: JoinSet<JobEnd> = JoinSet::new();
    // Read before the first lease: a job of this run writes its log, then its entry, into the
    // same directory, and must be neither taken for an orphan nor replayed beside its own
    // delivery. Jobs an earlier run left unfinished become `error` completions here.
    let spooled = ctx.spool.prepare_async().await;
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
        let job_id = entry.job_id;
        tracing::info!(job_id, "resending a spooled result");
        // Registered so that shutdown waits for it and a second signal stops it.
        let control = JobControl::new();
        let _registered = ctx.state.jobs.register(job_id, control.clone());
        let give_up = CancellationToken::new();
        let lost = CancellationToken::new();
        let _watcher = AbortOnDropHandle::new(tokio::spawn(cancel_on_abort(
            control.clone(),
            lost.clone(),
            give_up.clone(),
        )));
        // The log's path comes from the entry's own name, never from a path read off disk.
        let log = match entry.log_file {
            Some(_) => match logs::LogFile::open(&ctx.spool.log_path(&name)).await {
                Ok(log) => Some(log),
                Err(e) => {
                    tracing::warn!(job_id, error = %e, "spooled log unreadable: completing without the rest of it");
                    None
                }
            },
            None => None,
        };
        let end = match log {
            Some(log) => {
                Streamer::new(
                    ctx.clone(),
                    job_id,
                    entry.request.lease_id.clone(),
                    Arc::new(log),
                )
                .resume(give_up.clone())
                .await
            }
            None => StreamEnd::Delivered,
        };
        match end {
            StreamEnd::Lost => {
                tracing::warn!(
                    job_id,
                    "the API no longer holds the lease: spooled result dropped"
                );
                lost.cancel();
            }
            StreamEnd::Stopped if give_up.is_cancelled() => return,
            _ => {}
        }
        deliver(&ctx, &name, &entry, &give_up, &lost).await;
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
