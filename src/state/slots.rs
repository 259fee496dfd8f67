//! Job slots: how many jobs this agent runs at once, shared by pull and push mode, and the
//! bounded queue of push requests waiting for one.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Clone)]
pub struct Slots {
    semaphore: Arc<Semaphore>,
    total: usize,
    queued: Arc<AtomicUsize>,
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
}

impl Slots {
    pub fn new(total: usize) -> Self {
        Slots {
            semaphore: Arc::new(Semaphore::new(total)),
            total,
            queued: Arc::default(),
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

    /// A place in the queue, unless `max` requests wait already. Hold it while waiting in
    /// [`Slots::take`] (the semaphore serves waiters in order).
    pub fn join_queue(&self, max: usize) -> Option<QueuePlace> {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| QueuePlace {
                queued: self.queued.clone(),
            })
    }

    /// Takes a slot if one is free now.
    pub fn try_take(&self) -> Option<Slot> {
        self.semaphore
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|p| Slot { _permit: p })
    }

    /// Waits for a free slot.
    pub async fn take(&self) -> Slot {
        match self.semaphore.clone().acquire_owned().await {
            Ok(permit) => Slot { _permit: permit },
            // The semaphore is never closed; a closed one would be a bug, not an input.
            Err(_) => unreachable!("job slots are never closed"),
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
}
