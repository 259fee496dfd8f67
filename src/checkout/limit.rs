//! The size limit: counts pack bytes as gix reads them and trips the interrupt flag past the cap.
//!
//! gix reports every read of the incoming pack to the progress child it names `read pack`
//! (id `BWRB`) and checks the interrupt flag on each read, so tripping the flag here stops the
//! download within one buffer of the limit rather than after the whole pack is on disk.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use gix::progress::{Count, Id, MessageLevel, NestedProgress, Progress, Step, StepShared, Unit};

/// gix-pack's `bundle::write::ProgressId::ReadPackBytes`.
const READ_PACK_BYTES: Id = *b"BWRB";

/// Shared by the progress tree of one checkout.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: u64,
    received: AtomicU64,
    exceeded: AtomicBool,
    interrupt: Arc<AtomicBool>,
}

impl Budget {
    pub(crate) fn new(limit: u64, interrupt: Arc<AtomicBool>) -> Arc<Self> {
        Arc::new(Budget {
            limit,
            received: AtomicU64::new(0),
            exceeded: AtomicBool::new(false),
            interrupt,
        })
    }

    pub(crate) fn exceeded(&self) -> bool {
        self.exceeded.load(Ordering::SeqCst)
    }

    fn add(&self, bytes: u64) {
        let total = self.received.fetch_add(bytes, Ordering::SeqCst) + bytes;
        if total > self.limit {
            self.exceeded.store(true, Ordering::SeqCst);
            self.interrupt.store(true, Ordering::SeqCst);
        }
    }
}

/// A progress node that shows nothing and feeds pack bytes into a [`Budget`].
pub(crate) struct Limiter {
    budget: Arc<Budget>,
    id: Id,
    step: StepShared,
}

impl Limiter {
    pub(crate) fn new(budget: Arc<Budget>) -> Self {
        Limiter {
            budget,
            id: gix::progress::UNKNOWN,
            step: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn child(&self, id: Id) -> Self {
        Limiter {
            budget: self.budget.clone(),
            id,
            step: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn counts_bytes(&self) -> bool {
        self.id == READ_PACK_BYTES
    }
}

impl Count for Limiter {
    fn set(&self, step: Step) {
        let before = self.step.swap(step, Ordering::SeqCst);
        if self.counts_bytes() && step > before {
            self.budget.add((step - before) as u64);
        }
    }

    fn step(&self) -> Step {
        self.step.load(Ordering::SeqCst)
    }

    fn inc_by(&self, step: Step) {
        self.step.fetch_add(step, Ordering::SeqCst);
        if self.counts_bytes() {
            self.budget.add(step as u64);
        }
    }

    fn counter(&self) -> StepShared {
        self.step.clone()
    }
}

impl Progress for Limiter {
    fn init(&mut self, _max: Option<Step>, _unit: Option<Unit>) {}
    fn set_name(&mut self, _name: String) {}
    fn name(&self) -> Option<String> {
        None
    }
    fn id(&self) -> Id {
        self.id
    }
    fn message(&self, _level: MessageLevel, _message: String) {}
}

impl NestedProgress for Limiter {
    type SubProgress = Limiter;

    fn add_child(&mut self, _name: impl Into<String>) -> Self::SubProgress {
        self.child(gix::progress::UNKNOWN)
    }

    fn add_child_with_id(&mut self, _name: impl Into<String>, id: Id) -> Self::SubProgress {
        self.child(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pack_bytes_count_and_the_limit_trips_the_flag() {
        let flag = Arc::new(AtomicBool::new(false));
        let budget = Budget::new(100, flag.clone());
        let mut root = Limiter::new(budget.clone());
        let other = root.add_child_with_id("checkout", *b"CLCF");
        other.inc_by(1000);
        assert!(!budget.exceeded());
        let pack = root.add_child_with_id("read pack", READ_PACK_BYTES);
        pack.inc_by(60);
        pack.set(90);
        assert!(!flag.load(Ordering::SeqCst));
        pack.inc_by(20);
        assert!(budget.exceeded());
        assert!(flag.load(Ordering::SeqCst));
    }
}
