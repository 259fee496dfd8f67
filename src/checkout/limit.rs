//! The size limit: bytes a clone writes into the workspace, the fetched pack plus the files.
//!
//! Three checks share one [`Budget`]:
//! - Pack bytes: gix reports every read of the incoming pack to the progress child it names
//!   `read pack` (id `BWRB`) and checks the interrupt flag on each read, so the download stops
//!   within one buffer of the limit.
//! - Before any file is written, [`worktree_bytes`] adds up what the checkout will write (each
//!   file's size from the object headers, plus [`ENTRY_COST`] per entry) and the clone is refused
//!   when that does not fit: a small pack of a very compressible blob is never inflated to disk.
//! - While files are written: gix adds the bytes of each written file to the counter of its
//!   `writing` child (id `CLCB`) directly, not through the progress calls, so a [`Watch`] thread
//!   reads those counters and trips the interrupt flag, which gix checks before each file. This
//!   catches what the headers cannot know: files grown by `.gitattributes` filters (`eol`,
//!   `ident`); the overshoot is at most the growth of the file being written.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gix::progress::{Count, Id, MessageLevel, NestedProgress, Progress, Step, StepShared, Unit};

/// gix-pack's `bundle::write::ProgressId::ReadPackBytes`.
const READ_PACK_BYTES: Id = *b"BWRB";
/// gix's `clone::checkout::main_worktree::ProgressId::BytesWritten`.
const BYTES_WRITTEN: Id = *b"CLCB";

/// What each tree entry costs besides its content: an inode and an index entry, roughly. It
/// also bounds how many entries a tree of empty files can make the checkout create.
pub(crate) const ENTRY_COST: u64 = 256;

/// How often [`Watch`] reads the checkout's counters.
const WATCH_EVERY: Duration = Duration::from_millis(5);

/// Shared by the progress tree of one checkout.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: u64,
    /// Pack bytes received (and written to `.git`).
    received: AtomicU64,
    /// The checkout's own counters of bytes written, as gix updates them.
    written: Mutex<Vec<StepShared>>,
    exceeded: AtomicBool,
    interrupt: Arc<AtomicBool>,
}

impl Budget {
    pub(crate) fn new(limit: u64, interrupt: Arc<AtomicBool>) -> Arc<Self> {
        Arc::new(Budget {
            limit,
            received: AtomicU64::new(0),
            written: Mutex::new(Vec::new()),
            exceeded: AtomicBool::new(false),
            interrupt,
        })
    }

    pub(crate) fn exceeded(&self) -> bool {
        self.exceeded.load(Ordering::SeqCst)
    }

    /// Bytes written into the workspace so far.
    fn used(&self) -> u64 {
        let written: u64 = self
            .written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|c| c.load(Ordering::SeqCst) as u64)
            .fold(0, u64::saturating_add);
        self.received.load(Ordering::SeqCst).saturating_add(written)
    }

    fn trip(&self) {
        self.exceeded.store(true, Ordering::SeqCst);
        self.interrupt.store(true, Ordering::SeqCst);
    }

    /// Trips the limit when more than the limit was written.
    fn check(&self) {
        if self.used() > self.limit {
            self.trip();
        }
    }

    fn add(&self, bytes: u64) {
        self.received.fetch_add(bytes, Ordering::SeqCst);
        self.check();
    }

    /// Whether `bytes` more still fit; trips the limit when not.
    pub(crate) fn fits(&self, bytes: u64) -> bool {
        let fits = self.used().saturating_add(bytes) <= self.limit;
        if !fits {
            self.trip();
        }
        fits
    }

    /// What is left of the limit.
    pub(crate) fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.used())
    }

    /// Starts over after the destination was emptied (a second fetch after a refused one).
    pub(crate) fn restart(&self) {
        self.received.store(0, Ordering::SeqCst);
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Watches the checkout's counters until the returned guard is dropped.
    pub(crate) fn watch(self: &Arc<Self>) -> std::io::Result<Watch> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (budget, stop) = (self.clone(), stop.clone());
            std::thread::Builder::new()
                .name("checkout-size".into())
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) && !budget.exceeded() {
                        budget.check();
                        std::thread::park_timeout(WATCH_EVERY);
                    }
                })?
        };
        Ok(Watch {
            budget: self.clone(),
            stop,
            thread: Some(thread),
        })
    }
}

/// Stops the watching thread when dropped, after a last check.
pub(crate) struct Watch {
    budget: Arc<Budget>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
        self.budget.check();
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
        let step: StepShared = Arc::new(AtomicUsize::new(0));
        if id == BYTES_WRITTEN {
            self.budget
                .written
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(step.clone());
        }
        Limiter {
            budget: self.budget.clone(),
            id,
            step,
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

/// Bytes the checkout of `tree` will write: each file's size (from the object headers, nothing
/// is inflated) plus [`ENTRY_COST`] per entry. Stops adding once past `limit` or interrupted, so
/// a tree that names the same subtree over and over costs no more than the limit to measure.
pub(crate) fn worktree_bytes(
    tree: &gix::Tree<'_>,
    limit: u64,
    interrupt: &AtomicBool,
) -> Result<u64, gix::Error> {
    let mut sizer = Sizer {
        repo: tree.repo,
        total: 0,
        limit,
        interrupt,
        error: None,
    };
    let walked = tree.traverse().depthfirst(&mut sizer);
    if let Some(e) = sizer.error {
        return Err(e);
    }
    if sizer.total <= limit && !interrupt.load(Ordering::SeqCst) {
        walked?;
    }
    Ok(sizer.total)
}

struct Sizer<'a> {
    repo: &'a gix::Repository,
    total: u64,
    limit: u64,
    interrupt: &'a AtomicBool,
    error: Option<gix::Error>,
}

impl Sizer<'_> {
    fn next(&self) -> gix::traverse::tree::visit::Action {
        if self.total > self.limit || self.interrupt.load(Ordering::Relaxed) {
            std::ops::ControlFlow::Break(())
        } else {
            std::ops::ControlFlow::Continue(true)
        }
    }
}

impl gix::traverse::tree::Visit for Sizer<'_> {
    fn pop_back_tracked_path_and_set_current(&mut self) {}
    fn pop_front_tracked_path_and_set_current(&mut self) {}
    fn push_back_tracked_path_component(&mut self, _: &gix::bstr::BStr) {}
    fn push_path_component(&mut self, _: &gix::bstr::BStr) {}
    fn pop_path_component(&mut self) {}

    fn visit_tree(
        &mut self,
        _: &gix::objs::tree::EntryRef<'_>,
    ) -> gix::traverse::tree::visit::Action {
        self.total = self.total.saturating_add(ENTRY_COST);
        self.next()
    }

    fn visit_nontree(
        &mut self,
        entry: &gix::objs::tree::EntryRef<'_>,
    ) -> gix::traverse::tree::visit::Action {
        self.total = self.total.saturating_add(ENTRY_COST);
        // Submodule entries (commits) are left empty; blobs and symlinks are written.
        if entry.mode.is_blob() || entry.mode.is_link() {
            match self.repo.find_header(entry.oid.to_owned()) {
                Ok(header) => self.total = self.total.saturating_add(header.size()),
                Err(e) => {
                    self.error = Some(e);
                    return std::ops::ControlFlow::Break(());
                }
            }
        }
        self.next()
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

    #[test]
    fn a_worktree_fits_in_what_the_pack_left() {
        let flag = Arc::new(AtomicBool::new(false));
        let budget = Budget::new(100, flag.clone());
        let mut root = Limiter::new(budget.clone());
        root.add_child_with_id("read pack", READ_PACK_BYTES)
            .inc_by(40);
        assert_eq!(budget.remaining(), 60);
        assert!(budget.fits(60));
        assert!(!flag.load(Ordering::SeqCst));
        assert!(!budget.fits(61));
        assert!(budget.exceeded() && flag.load(Ordering::SeqCst));
    }

    #[test]
    fn the_watch_sees_bytes_gix_writes_past_the_progress_calls() {
        let flag = Arc::new(AtomicBool::new(false));
        let budget = Budget::new(100, flag.clone());
        let mut root = Limiter::new(budget.clone());
        root.add_child_with_id("read pack", READ_PACK_BYTES)
            .inc_by(40);
        let writing = root.add_child_with_id("writing", BYTES_WRITTEN);
        let _watch = budget.watch().unwrap();
        // gix adds to the counter directly, not through `inc_by`.
        writing.counter().fetch_add(60, Ordering::Relaxed);
        assert_eq!(budget.remaining(), 0);
        writing.counter().fetch_add(1, Ordering::Relaxed);
        // The watch thread trips the flag on its own (generous bound: a loaded machine).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !flag.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(budget.exceeded() && flag.load(Ordering::SeqCst));
    }
}
