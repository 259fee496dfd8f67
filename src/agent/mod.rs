//! The long-running agent (`gryt-agent run`): start-up, signals, the drain on shutdown and the
//! orphan sweep. The state it starts with is `crate::state`; the modes that feed it jobs are
//! `crate::pull` and `crate::push` (through `crate::server`). Only the CLI imports this module.
//!
//! Shutdown: the first SIGTERM, SIGINT, SIGHUP or SIGQUIT stops taking jobs at once (a drain);
//! running jobs get `shutdown_timeout_seconds` to finish, then they are cancelled (status
//! `cancelled`); a second one of any of them kills them at once. Either way every job is cleaned
//! up and reported, and the agent exits 0: it waits for the jobs' cleanups, which come after
//! their results, too. SIGHUP (a closed terminal, or a reload by habit) and
//! SIGQUIT (Ctrl-\) would otherwise kill the process without cleanup.
//!
//! Hand-over (upgrades): SIGUSR2 stops taking jobs as a drain does, but waits for nothing: the
//! process exits 0 at once and leaves the running jobs' containers, networks and workspaces in
//! place for the next agent process on the same state dir to adopt (see `hand_over`). It may
//! come at any time, also during a drain.

pub mod sweep;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::Settings;
use crate::state::{AgentState, StateError, readiness, resources};

pub use crate::state::AgentOptions;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Pull(#[from] crate::pull::PullError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
    #[error("pull mode stopped unexpectedly: {0}")]
    PullTask(#[source] tokio::task::JoinError),
    #[error(
        "{0} result(s) could not be delivered to the API: they stay in the spool and are sent at the next start"
    )]
    Undelivered(usize),
}

/// How long the agent waits at its exit for the cleanups still running: their own limit.
const CLEANUPS_AT_EXIT: Duration = crate::executor::CLEANUP_LIMIT;

/// Runs the agent until it is told to stop (or, ephemeral, has done its work).
pub async fn run(settings: Settings, options: AgentOptions) -> Result<(), AgentError> {
    // Installed first and kept for the whole run: a signal that arrives at any moment from here
    // on (even before readiness is announced, or between the first and the second) is seen.
    let mut signals = Signals::install();
    let descriptors = resources::raise_descriptor_limit();
    let state = AgentState::new(settings)?;
    // Checked before anything listens or connects: a refused URL means no traffic at all.
    let pull = match state.modes.pull_url {
        Some(_) => Some(crate::pull::Ctx::new(state.clone()).await?),
        None => None,
    };
    // Jobs an earlier process left running are registered before the first sweep, which then
    // spares their containers (`pull::adopt`).
    let claimed = match &pull {
        Some(ctx) => crate::pull::adopt::claim(ctx).await,
        None => Vec::new(),
    };
    // And the push jobs with a callback it left (`push::adopt`), whatever the modes are now.
    let pushed = crate::push::adopt::claim(&state).await;
    let collector = crate::gc::start(state.clone()).await;
    let (host, port) = state.listen_address();
    let address = format!("{host}:{port}");
    let listener = TcpListener::bind((host.as_str(), port))
        .await
        .map_err(|source| AgentError::Listen {
            address: address.clone(),
            source,
        })?;
    // Leftovers of an earlier run go before the first job can arrive.
    let sweeper = sweep::start(state.clone()).await;
    // The first check before any job can arrive; then one every few seconds.
    readiness::check_once(&state, &mut Vec::new()).await;
    let monitor = readiness::start_monitor(state.clone());
    // After the first sweep, which removed an earlier process's pool: never the other way round.
    state.executor.start_warm_pool(state.slots.total());
    tracing::info!(
        agent_id = %state.agent_id,
        address = %listener.local_addr().map(|a| a.to_string()).unwrap_or(address),
        pull = state.modes.pull(),
        push = state.modes.push,
        slots = state.slots.total(),
        descriptors = descriptors.unwrap_or(u64::MAX),
        "gryt-agent {} running",
        crate::VERSION
    );
    // Readiness for systemd (Type=notify); a no-op when not started by systemd.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let server = {
        let shutdown = state.shutdown.clone();
        tokio::spawn(crate::server::serve(
            listener,
            crate::server::router(state.clone()),
            crate::server::Limits::for_descriptors(descriptors),
            state.clone(),
            async move { shutdown.stopped().await },
        ))
    };
    // Each decided in a task of its own: registered, so the drain waits for those carried on.
    crate::push::adopt::spawn_all(&state, pushed);
    let mut pull_task = pull.map(|ctx| tokio::spawn(crate::pull::run(ctx, options, claimed)));

    let pull_ended = tokio::select! {
        signal = signals.next() => match signal {
            Signal::Drain => None,
            Signal::HandOver => hand_over(&state),
        },
        ended = finished(&mut pull_task) => Some(ended),
    };
    match &pull_ended {
        Some(Ok(_)) => tracing::info!("ephemeral limit reached: exiting"),
        Some(Err(e)) => tracing::error!(error = %e, "pull mode failed: exiting"),
        None => tracing::info!("signal received: taking no new jobs, letting running jobs finish"),
    }
    // Also when pull mode ended by itself: push jobs may still run (returns at once if idle).
    drain(&state, &mut signals).await;
    if pull_ended.is_none()
        && let Some(task) = pull_task
    {
        // Returns at once: draining ended leasing, and drain waited for the jobs.
        let _ = task.await;
    }
    // After the jobs (a taken container goes with its job): nothing of the pool outlives the agent.
    state.executor.drain_warm_pool().await;
    collector.stop().await;
    state.shutdown.stop();
    sweeper.abort();
    monitor.abort();
    if let Ok(Err(e)) = server.await {
        tracing::error!(error = %e, "local endpoint failed");
    }
    // A job task ended by the pull task's end (or a panic) dropped its cleanup's handle, which
    // started it: nothing of a job is left when the agent exits.
    let cleanups = state.executor.cleanups_done();
    if tokio::time::timeout(CLEANUPS_AT_EXIT, cleanups)
        .await
        .is_err()
    {
        tracing::error!(
            left = state.executor.pending_cleanups(),
            "jobs' cleanups did not end before the exit: the orphan sweep removes what is left"
        );
    }
    match pull_ended {
        Some(Err(e)) => Err(AgentError::PullTask(e)),
        Some(Ok(undelivered)) if undelivered > 0 => Err(AgentError::Undelivered(undelivered)),
        _ => Ok(()),
    }
}

/// Resolves when pull mode ends by itself (ephemeral limits, or a panic) with the number of
/// results it could not deliver; never without pull mode.
async fn finished(
    task: &mut Option<tokio::task::JoinHandle<crate::pull::PullEnd>>,
) -> Result<usize, tokio::task::JoinError> {
    match task {
        Some(task) => task.await.map(|end| end.undelivered),
        None => std::future::pending().await,
    }
}

/// Stops taking jobs, waits for running ones up to the shutdown timeout, then cancels what is
/// left and waits for those to be reported. A further drain signal at any point kills at once;
/// a hand-over signal leaves the jobs as they are to the next process (see `hand_over`).
pub async fn drain(state: &Arc<AgentState>, signals: &mut Signals) {
    state.shutdown.begin_drain();
    let timeout = Duration::from_secs(state.settings.shutdown_timeout_seconds);
    tokio::select! {
        _ = wait_until_idle(state) => return,
        _ = tokio::time::sleep(timeout) => state.jobs.cancel_all("the agent shut down"),
        signal = signals.next() => match signal {
            Signal::Drain => abort_all(state),
            Signal::HandOver => hand_over(state),
        },
    }
    tokio::select! {
        _ = wait_until_idle(state) => {}
        signal = signals.next() => match signal {
            Signal::Drain => {
                abort_all(state);
                wait_until_idle(state).await;
            }
            Signal::HandOver => hand_over(state),
        },
    }
}

/// The hand-over (SIGUSR2): stops taking jobs and ends the process at once with exit code 0,
/// leaving the running jobs to the next agent process, which adopts them from their containers
/// and the lease records the spool keeps for them. Results not yet delivered stay in the spool
/// for it too.
///
/// Stopping taking jobs is the drain's first step: no mode asks for work once it began, the
/// lease long poll in flight is dropped at it (its connection closes with the process), a job
/// leased meanwhile is not started, and push requests are answered 503. Nothing else is
/// waited for, so there is nothing a second signal could cut short.
///
/// The process ends with [`std::process::exit`], not by returning: returning would drop the
/// runtime and, with it, every job's task, and their drop guards stop and remove what the job
/// runs in (the job container's `Drop` removes it). `exit` runs no destructor. Nothing is lost
/// by that: the log goes to stderr unbuffered, every record the next process needs is on disk
/// before the command it is for, and the state dir's lock is released by the kernel.
fn hand_over(state: &AgentState) -> ! {
    state.shutdown.begin_hand_over();
    let running = state.jobs.job_ids();
    tracing::info!(
        job_ids = ?running,
        "handing over: exiting and leaving {} running jobs to the next agent process",
        running.len()
    );
    let _ = std::io::stderr().flush();
    std::process::exit(0)
}

fn abort_all(state: &AgentState) {
    tracing::warn!("second signal: killing running jobs");
    state
        .jobs
        .abort_all("the agent was stopped (second signal)");
}

/// Until no job runs, no slot is taken and no job's cleanup is left (each is bounded by
/// `executor::CLEANUP_LIMIT` once started; the modes start theirs before freeing the slot).
async fn wait_until_idle(state: &AgentState) {
    while state.jobs.count() > 0
        || state.slots.running() > 0
        || state.executor.pending_cleanups() > 0
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a signal asks the agent to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM, SIGINT, SIGHUP, SIGQUIT: drain (the first), kill the jobs (the next).
    Drain,
    /// SIGUSR2: hand the running jobs over to the next agent process and exit.
    HandOver,
}

/// SIGTERM, SIGINT, SIGHUP, SIGQUIT and SIGUSR2, registered once for the agent's whole life.
/// The first four mean the same: drain (the first), kill the jobs (the next); SIGUSR2 means a
/// hand-over.
pub struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
    quit: Option<tokio::signal::unix::Signal>,
    usr2: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    pub fn install() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        Signals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
            hup: signal(SignalKind::hangup()).ok(),
            quit: signal(SignalKind::quit()).ok(),
            usr2: signal(SignalKind::user_defined2()).ok(),
        }
    }

    /// Resolves on the next of these signals with what it asks; never, if no handler could be
    /// installed (the agent can then only be killed, but never stops spuriously).
    pub async fn next(&mut self) -> Signal {
        async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
            match signal {
                Some(s) => {
                    if s.recv().await.is_none() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.term) => Signal::Drain,
            _ = recv(&mut self.int) => Signal::Drain,
            _ = recv(&mut self.hup) => Signal::Drain,
            _ = recv(&mut self.quit) => Signal::Drain,
            _ = recv(&mut self.usr2) => Signal::HandOver,
        }
    }
}
