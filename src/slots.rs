//! Job slots: how many jobs this agent runs at once, shared by pull and push mode.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Clone)]
pub struct Slots {
    semaphore: Arc<Semaphore>,
    total: usize,
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
}
