//! Admission, the same for pull and push: whether the agent takes a job now (not while it
//! drains, nor while it cannot run jobs) and the slot the job runs in.
//!
//! Pull mode asks [`AgentState::admission`] before every lease and takes a slot with
//! [`SlotWait::Until`] the lease's deadline; push mode calls [`AgentState::admit`] with
//! [`SlotWait::Queue`] (a bounded queue of waiting requests, `push.max_queue`).

use tokio::time::Instant;

use super::AgentState;
use super::slots::Slot;

/// Why a job is not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The agent is shutting down.
    Draining,
    /// The agent cannot run jobs now (the readiness problems, in words).
    Unable(String),
    /// Every slot is busy and `max` requests wait already.
    QueueFull { max: usize },
    /// No slot came free before the deadline.
    NoSlotInTime,
}

impl Refusal {
    /// The refusal in words, as the push endpoint answers it.
    pub fn message(&self) -> String {
        match self {
            Refusal::Draining => "the agent is shutting down".to_owned(),
            Refusal::Unable(reasons) => reasons.clone(),
            Refusal::QueueFull { max } => {
                format!("all job slots are busy and {max} requests wait already (push.max_queue)")
            }
            Refusal::NoSlotInTime => "no slot came free before the lease's deadline".to_owned(),
        }
    }
}

/// How long a job that found no free slot waits for one.
#[derive(Debug, Clone, Copy)]
pub enum SlotWait {
    /// In the bounded queue of push requests, holding one of its `max` places, until a slot
    /// is free or the agent drains.
    Queue { max: usize },
    /// Until the deadline (a leased job's lease) or the drain.
    Until(Instant),
}

impl AgentState {
    /// Whether a job may be taken now: not while the agent drains, nor while it cannot run jobs
    /// (Docker does not answer, a directory is missing and cannot be made again, descriptors or
    /// disk space are short, or a job just failed because of the agent). Cheap (it reads the
    /// last check; see [`super::readiness`]): called before every lease and push admission.
    pub fn admission(&self) -> Result<(), Refusal> {
        if self.shutdown.is_draining() {
            return Err(Refusal::Draining);
        }
        match self.readiness.reason() {
            Some(reasons) => Err(Refusal::Unable(reasons)),
            None => Ok(()),
        }
    }

    /// A slot: a free one at once, else the first one freed within `wait`. None while the
    /// agent drains. No operator limit is lifted for the waiting job.
    pub async fn slot(&self, wait: SlotWait) -> Result<Slot, Refusal> {
        if self.shutdown.is_draining() {
            return Err(Refusal::Draining);
        }
        if let Some(slot) = self.slots.try_take() {
            return Ok(slot);
        }
        match wait {
            SlotWait::Queue { max } => {
                // Dropped with the request (client gone): the place in the queue goes too.
                let Some(_place) = self.slots.join_queue(max) else {
                    return Err(Refusal::QueueFull { max });
                };
                tokio::select! {
                    slot = self.slots.take() => Ok(slot),
                    _ = self.shutdown.draining() => Err(Refusal::Draining),
                }
            }
            SlotWait::Until(deadline) => tokio::select! {
                slot = self.slots.take() => Ok(slot),
                _ = tokio::time::sleep_until(deadline) => Err(Refusal::NoSlotInTime),
                _ = self.shutdown.draining() => Err(Refusal::Draining),
            },
        }
    }

    /// [`AgentState::admission`], then a [`AgentState::slot`], then the admission again: the
    /// wait may have been long, and the agent may have turned unable meanwhile.
    pub async fn admit(&self, wait: SlotWait) -> Result<Slot, Refusal> {
        self.admission()?;
        let slot = self.slot(wait).await?;
        self.admission()?;
        Ok(slot)
    }
}
