//! The pool's watch over its ready containers: one that stops running (killed behind the
//! agent's back, or all of them when the engine restarts) leaves the pool at once and is
//! removed with its network and workspace, so the refill makes a fresh one before a job comes
//! for it, and no dead warm container waits in the pool.
//!
//! How: Docker's `die` events of this agent's warm containers and, each time the event stream
//! is (re)connected, one inspect of every ready container: what died while the stream was down
//! (an engine restart closes it) sent no event that reached it. Idle, it costs one open
//! connection and no CPU; while the engine is down, a connection attempt every
//! [`MAX_RETRY`] at most. Each death counts against the refill's backoff (`refill.rs`), so
//! containers that die as soon as they are made cannot make the pool spin.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::EventsOptionsBuilder;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;

use super::super::container::LABEL_AGENT_ID;
use super::{LABEL_WARM, Shared, lock, make};
use crate::executor::Executor;

const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);

pub(super) async fn run(shared: Arc<Shared>, executor: Arc<Executor>) {
    let mut changed = shared.changed.subscribe();
    let mut retry = FIRST_RETRY;
    let filters = HashMap::from([
        ("type", vec!["container".to_owned()]),
        ("event", vec!["die".to_owned()]),
        (
            "label",
            vec![
                format!("{LABEL_AGENT_ID}={}", executor.settings.agent_id),
                format!("{LABEL_WARM}=true"),
            ],
        ),
    ]);
    loop {
        let connected = Instant::now();
        if let Ok(docker) = executor.docker().await {
            watch_once(&shared, &docker, &filters, &mut changed).await;
        }
        if lock(&shared.inner).stopped {
            return;
        }
        // A stream that stayed up a while ended with a working engine (a restart): reconnect
        // soon. One that fails at once backs off.
        if connected.elapsed() > MAX_RETRY {
            retry = FIRST_RETRY;
        }
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = stopped(&shared, &mut changed) => return,
        }
        retry = (retry * 2).min(MAX_RETRY);
    }
}

/// One connection of the event stream, until it ends or the pool stops.
async fn watch_once(
    shared: &Shared,
    docker: &Docker,
    filters: &HashMap<&str, Vec<String>>,
    changed: &mut watch::Receiver<()>,
) {
    // `since` (a second before the check below) replays what died between the check and the
    // moment the subscription reaches the engine: nothing falls between the two.
    let since = (std::time::SystemTime::now() - Duration::from_secs(1))
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().to_string())
        .unwrap_or_default();
    let options = EventsOptionsBuilder::default()
        .since(&since)
        .filters(filters)
        .build();
    let mut events = docker.events(Some(options));
    let ready: Vec<String> = lock(&shared.inner)
        .ready
        .iter()
        .map(|w| w.container.id().to_owned())
        .collect();
    for id in ready {
        let running = match docker.inspect_container(&id, None).await {
            Ok(c) => c.state.and_then(|s| s.running) == Some(true),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => false,
            // The engine is away: the stream below fails too, and the next connection checks.
            Err(_) => true,
        };
        if !running {
            remove_dead(shared, &id).await;
        }
    }
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = stopped(shared, changed) => return,
        };
        match event {
            Some(Ok(event)) => {
                if let Some(id) = event.actor.and_then(|a| a.id) {
                    remove_dead(shared, &id).await;
                }
            }
            Some(Err(_)) | None => return,
        }
    }
}

/// Takes container `id` out of the ready ones, if it is one, and removes it; then wakes the
/// refill. A taken container that dies is its job's business.
async fn remove_dead(shared: &Shared, id: &str) {
    let dead = {
        let mut inner = lock(&shared.inner);
        let Some(at) = inner.ready.iter().position(|w| w.container.id() == id) else {
            return;
        };
        let Some(dead) = inner.ready.remove(at) else {
            return;
        };
        shared.set_ready_gauge(&inner);
        dead
    };
    tracing::debug!(container = %id, "warm pool: a ready container is not running any more; removing it");
    make::discard(dead).await;
    shared.deaths.fetch_add(1, Ordering::SeqCst);
    shared.changed.send_replace(());
}

/// Ends once the pool is stopped (drained).
async fn stopped(shared: &Shared, changed: &mut watch::Receiver<()>) {
    while !lock(&shared.inner).stopped {
        if changed.changed().await.is_err() {
            return;
        }
    }
}
