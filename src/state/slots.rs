//! Job slots: how many jobs this agent runs at once, shared by pull and push mode, and the
//! bounded queue of push requests waiting for one.
//!
//! A slot stays taken until its job's cleanup ended, which comes after the job's answer (see
//! `state::run`). A push request that finds every slot taken, some of them by answered jobs
//! only being cleaned up, may wait for one of those without a place in the queue: a client
//! that sends its next job as soon as it has the previous answer is served as it was when the
//! answer came after the cleanup, also with `push.max_queue` 0. At most one such request waits
//! per slot being cleaned up, so the waiting stays bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Clone)]
pub struct Slots {
    semaphore: Arc<Semaphore>,
    total: usize,
    queued: Arc<AtomicUsize>,
    /// Taken slots whose job has answered and is only being cleaned up.
    cleaning: Arc<AtomicUsize>,
    /// Requests waiting for one of those, beside the queue.
    after_cleanup: Arc<AtomicUsize>,
}

/// A place in the queue for a slot; dropping it (the slot came, or the request went away)
/// leaves the queue.
#[derive(Debug)]
pub struct QueuePlace {
    queued: Arc<AtomicUsize>,
}

impl Drop for QueuePlace {
    fn drop(&mut self) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A taken slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    cleaning: Arc<AtomicUsize>,
    /// Counted in `cleaning` (see [`Slot::cleaning_up`]).
    marked: bool,
}

impl Slot {
    /// Marks the slot's job as answered, only its cleanup left: a push request may wait for
    /// this slot without a place in the queue (see the module doc). Counted until dropped.
    pub fn cleaning_up(&mut self) {
        if !self.marked {
            self.marked = true;
            self.cleaning.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.marked {
            self.cleaning.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Slots {
    pub fn new(total: usize) -> Self {
        Slots {
            semaphore: Arc::new(Semaphore::new(total)),
            total,
            queued: Arc::default(),
            cleaning: Arc::default(),
            after_cleanup: Arc::default(),
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn free(&self) -> usize {
        self.semaphore.available_permits()
    }

    pub fn running(&self) -> usize {
        self.total - self.free()
    }

    /// Requests waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// A place in the queue, unless `max` requests wait already; then, while fewer requests
    /// wait beside the queue than slots are only being cleaned up, a place beside it (see the
    /// module doc). Hold it while waiting in [`Slots::take`] (the semaphore serves waiters in
    /// order).
    pub fn join_queue(&self, max: usize) -> Option<QueuePlace> {
        let place = |counter: &Arc<AtomicUsize>, max: usize| {
            counter
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                })
                .ok()
                .map(|_| QueuePlace {
                    queued: counter.clone(),
                })
        };
        place(&self.queued, max)
            .or_else(|| place(&self.after_cleanup, self.cleaning.load(Ordering::Acquire)))
    }

    /// Takes a slot if one is free now.
    pub fn try_take(&self) -> Option<Slot> {
        self.semaphore
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|p| self.slot(p))
    }

    /// Waits for a free slot.
    pub async fn take(&self) -> Slot {
        match self.semaphore.clone().acquire_owned().await {
            Ok(permit) => self.slot(permit),
            // The semaphore is never closed; a closed one would be a bug, not an input.
            Err(_) => unreachable!("job slots are never closed"),
        }
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> Slot {
        Slot {
            _permit: permit,
            cleaning: self.cleaning.clone(),
            marked: false,
        }
    }

    /// Waits until a slot is free without taking it (pull mode leases first, then takes one, so
    /// that its long poll never keeps a slot from push mode).
    pub async fn wait_free(&self) {
        match self.semaphore.acquire().await {
            Ok(permit) => drop(permit),
            Err(_) => unreachable!("job slots are never closed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_and_freed_on_drop() {
        let slots = Slots::new(2);
        let a = slots.try_take().unwrap();
        let _b = slots.try_take().unwrap();
        assert!(slots.try_take().is_none());
        assert_eq!((slots.running(), slots.free()), (2, 0));
        drop(a);
        assert_eq!(slots.free(), 1);
    }

    #[test]
    fn the_queue_is_bounded_and_a_dropped_place_leaves_it() {
        let slots = Slots::new(1);
        let a = slots.join_queue(2).unwrap();
        let _b = slots.join_queue(2).unwrap();
        assert!(slots.join_queue(2).is_none());
        assert_eq!(slots.queued(), 2);
        drop(a);
        assert_eq!(slots.queued(), 1);
        assert!(slots.join_queue(2).is_some());
        assert!(Slots::new(1).join_queue(0).is_none());
    }

    #[test]
    fn a_slot_only_being_cleaned_up_lets_one_request_wait_beside_the_queue() {
        let slots = Slots::new(1);
        let mut slot = slots.try_take().unwrap();
        assert!(slots.join_queue(0).is_none(), "a running job's slot");
        slot.cleaning_up();
        slot.cleaning_up();
        let beside = slots.join_queue(0).expect("a slot being cleaned up");
        assert!(slots.join_queue(0).is_none(), "one request per such slot");
        assert_eq!(slots.queued(), 0, "not a place of the queue");
        drop(beside);
        drop(slot);
        assert!(
            slots.join_queue(0).is_none(),
            "nothing is cleaned up any more"
        );
    }
}
