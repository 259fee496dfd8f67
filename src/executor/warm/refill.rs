//! The pool's refill loop: one refill at a time, never while a job is on its way to its first
//! command, backing off while Docker fails.
//!
//! When: a refill starts once the pool has fewer ready containers than its target and no job is
//! between its start in the executor and its first command (the `Starting` marks). A job that
//! took a container is making its way to its first command while the refill would compete with
//! it for the engine; once that command runs, the refill makes the next container beside it.
//! So a refill never delays a job's start, and the next job finds a container ready as soon as
//! the engine has made one. A job that finds none ready while a refill is under way waits for
//! it (bounded, see `take.rs`): that refill started before the job did.
//!
//! Failures: the first one of a streak is a warning, the others are debug lines, the recovery
//! an info line; the retries wait 1 s, doubling up to [`MAX_BACKOFF`]. An engine that is down
//! for an hour costs a request a minute and a few log lines, no spinning.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep_until};

use super::{Shared, lock, make};
use crate::executor::Executor;

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

pub(super) async fn run(shared: Arc<Shared>, executor: Arc<Executor>) {
    let mut changed = shared.changed.subscribe();
    let mut backoff = FIRST_BACKOFF;
    let mut failing = false;
    let mut retry_at = Instant::now();
    loop {
        changed.borrow_and_update();
        let due =
            shared.wanted() > 0 && shared.starting.load(std::sync::atomic::Ordering::SeqCst) == 0;
        if !due {
            if lock(&shared.inner).stopped || changed.changed().await.is_err() {
                return;
            }
            continue;
        }
        if Instant::now() < retry_at {
            tokio::select! {
                _ = sleep_until(retry_at) => {}
                _ = changed.changed() => {}
            }
            continue;
        }
        {
            let mut inner = lock(&shared.inner);
            if inner.stopped {
                return;
            }
            inner.refilling = true;
        }
        let made = make::one(&executor, &shared).await;
        // The lock is let go of before any await: the loop's future must be `Send`.
        let (made, stopped) = {
            let mut inner = lock(&shared.inner);
            inner.refilling = false;
            match made {
                Ok(warm) if !inner.stopped => {
                    inner.ready.push_back(warm);
                    shared.set_ready_gauge(&inner);
                    (Ok(None), false)
                }
                Ok(warm) => (Ok(Some(warm)), true),
                Err(e) => (Err(e), inner.stopped),
            }
        };
        shared.changed.send_replace(());
        match made {
            Ok(Some(unwanted)) => make::discard(unwanted).await,
            Ok(None) => {
                if failing {
                    tracing::info!("warm pool: containers are made again");
                }
                (failing, backoff) = (false, FIRST_BACKOFF);
            }
            Err(e) => {
                if failing {
                    tracing::debug!(error = %e, retry_in = ?backoff, "warm pool: cannot make a container");
                } else {
                    tracing::warn!(error = %e, retry_in = ?backoff, "warm pool: cannot make a container; jobs start cold meanwhile");
                }
                failing = true;
                retry_at = Instant::now() + backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        if stopped {
            return;
        }
    }
}
