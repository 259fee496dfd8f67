//! Jobs an earlier agent process left running, carried on by this one.
//!
//! A started job's lease record holds the job and, once its container started, its progress
//! (`runner`, `executor::Resume`). At start, before the first sweep, [`claim`] registers every
//! job whose record has both, so the sweep spares its container, and takes a slot for it. Then
//! each is decided ([`spawn_all`]): a heartbeat that answers 200 means the API still holds the
//! lease for this agent, and the job is carried on as if nothing happened (no second `start`,
//! its log continued from the server's `committed`, its result sent once). Any other answer
//! gives it up: its container, network and workspace are removed; a job whose lease is gone is
//! forgotten (the API runs it again), one whose lease still holds but cannot be carried on is
//! completed with `error` at once.

use std::sync::Arc;

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::Ctx;
use super::delivery::{Watch, deliver};
use super::runner::{Carried, JobEnd, carry};
use super::spool::LeaseRecord;
use crate::api::HeartbeatOutcome;
use crate::executor::warm::Spared;
use crate::state::slots::Slot;
use crate::wire::pull::{HeartbeatRequest, Lease, lease_ttl};

/// A job of an earlier run, registered and holding a slot (if one was free) until decided.
pub struct Claimed {
    name: String,
    record: LeaseRecord,
    watch: Watch,
    slot: Option<Slot>,
    /// A job that ran in a warm container: its parts carry the container's warm id.
    spared: Option<Spared>,
}

/// Registers every job an earlier run left that may be carried on, and takes a slot for each.
/// Called before the first sweep: a registered job's container is spared.
pub async fn claim(ctx: &Arc<Ctx>) -> Vec<Claimed> {
    let spool = ctx.spool.clone();
    let unfinished = tokio::task::spawn_blocking(move || spool.unfinished())
        .await
        .unwrap_or_default();
    unfinished
        .into_iter()
        .filter(|(_, record)| record.adoptable().is_some())
        .map(|(name, record)| Claimed {
            watch: Watch::new(&ctx.state, record.job_id),
            slot: ctx.state.slots.try_take(),
            spared: record
                .resume
                .as_ref()
                .and_then(|resume| ctx.state.executor.spare(resume)),
            name,
            record,
        })
        .collect()
}

/// Decides each claimed job in `tasks`, beside the leased ones: carried on or given up.
pub fn spawn_all(ctx: &Arc<Ctx>, claimed: Vec<Claimed>, tasks: &mut JoinSet<JobEnd>) {
    for job in claimed {
        tasks.spawn(adopt(ctx.clone(), job));
    }
}

/// Why a job of an earlier run is not carried on.
enum GiveUp {
    /// The API no longer holds its lease for this agent: nothing more is sent for it.
    LeaseGone(String),
    /// Its lease holds, but it cannot go on here: completed with `error`.
    CannotGoOn(String),
}

async fn adopt(ctx: Arc<Ctx>, claimed: Claimed) -> JobEnd {
    let job_id = claimed.record.job_id;
    let Some((job, resume)) = claimed.record.adoptable() else {
        return JobEnd::Dropped;
    };
    let (job, resume) = (job.clone(), resume.clone());
    if claimed.slot.is_none() {
        let reason = "every slot is taken (fewer slots than before the restart)";
        return give_up(&ctx, &claimed, GiveUp::CannotGoOn(reason.into())).await;
    }
    if let Err(reason) = ctx.state.executor.can_carry_on(&job, &resume).await {
        return give_up(&ctx, &claimed, GiveUp::CannotGoOn(reason)).await;
    }
    let request = HeartbeatRequest {
        lease_id: claimed.record.lease_id.clone(),
    };
    let sent = Instant::now();
    let ttl = match ctx.client.heartbeat(job_id, &request).await {
        Ok(HeartbeatOutcome::Renewed {
            lease_ttl_seconds, ..
        }) if lease_ttl_seconds > 0 => lease_ttl_seconds,
        Ok(HeartbeatOutcome::Renewed { .. }) => {
            let gone = GiveUp::LeaseGone("the API renewed its lease for 0 s".into());
            return give_up(&ctx, &claimed, gone).await;
        }
        Ok(HeartbeatOutcome::Lost(status)) => {
            let gone =
                GiveUp::LeaseGone(format!("its lease is gone (heartbeat answered {status})"));
            return give_up(&ctx, &claimed, gone).await;
        }
        Err(e) => {
            // Unconfirmed is not held: the job must not go on where the API may have given it
            // to another agent.
            let gone = GiveUp::LeaseGone(format!("its lease could not be confirmed: {e}"));
            return give_up(&ctx, &claimed, gone).await;
        }
    };
    tracing::info!(
        job_id,
        container = %resume.container,
        step = resume.steps.len(),
        "adopted a job of an earlier run"
    );
    let _adopted = ctx.state.adopted.begin(job_id);
    let lease = Lease {
        lease_id: claimed.record.lease_id.clone(),
        lease_ttl_seconds: ttl,
        job,
    };
    let carried = Carried {
        lease: &lease,
        renewed: sent,
        ttl: lease_ttl(ttl),
        name: &claimed.name,
        record: claimed.record.clone(),
    };
    let end = carry(ctx.clone(), carried, &claimed.watch, Some(&resume)).await;
    // After the cleanup: the sweeps spare the job's parts until they are gone.
    drop((claimed.slot, claimed.spared));
    end
}

/// Removes what the job left and settles its record (see [`GiveUp`]).
async fn give_up(ctx: &Arc<Ctx>, claimed: &Claimed, why: GiveUp) -> JobEnd {
    let job_id = claimed.record.job_id;
    let reason = match &why {
        GiveUp::LeaseGone(reason) | GiveUp::CannotGoOn(reason) => reason.clone(),
    };
    tracing::warn!(job_id, reason = %reason, "gave up a job of an earlier run");
    ctx.state.adopted.gave_up();
    if let Some((job, resume)) = claimed.record.adoptable() {
        ctx.state.executor.give_up(job, resume).await;
    }
    match why {
        GiveUp::LeaseGone(_) => {
            claimed.watch.lost.cancel();
            let (spool, name) = (ctx.spool.clone(), claimed.name.clone());
            let _ = tokio::task::spawn_blocking(move || spool.remove(&name)).await;
            JobEnd::Dropped
        }
        GiveUp::CannotGoOn(reason) => {
            let message = format!(
                "the agent stopped while this job ran (killed, crashed or restarted) and the \
                 restarted agent could not carry it on ({reason}): run it again"
            );
            let (spool, name, record) = (
                ctx.spool.clone(),
                claimed.name.clone(),
                claimed.record.clone(),
            );
            let written = tokio::task::spawn_blocking(move || {
                spool.write_interrupted(&name, &record, &message)
            });
            if let Ok(Some(entry)) = written.await {
                deliver(ctx, &claimed.name, &entry, &claimed.watch).await;
            }
            JobEnd::Ran
        }
    }
}
