//! Dirty logs: which pages a running guest wrote since the last sync.
//!
//! A [`DirtyLog`] is what the controller reads between passes. Two kinds:
//! - [`BitmapLog`]: an atomic bitmap per block that the writer marks after
//!   each write (what a VMM fills from KVM's dirty log);
//! - [`crate::UffdLog`]: the kernel tracks writes with userfaultfd
//!   write-protect in async mode, read back and re-armed with PAGEMAP_SCAN.
//!
//! The order that keeps a pass correct: a sync moves the dirty bits into the
//! pass's bitmaps and clears them in the log *before* the sender reads the
//! pages, so a write after the sync is caught by the next one. A writer
//! marks a page only *after* writing it.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::{GuestMemory, PageBitmap, RamError};

/// The dirty log of a guest's memory.
pub trait DirtyLog: Send + Sync {
    /// Short name for reports: "bitmap" or "uffd".
    fn name(&self) -> &'static str;
    /// Starts tracking with every page clean.
    fn start(&self) -> Result<(), RamError>;
    /// Moves the pages written since the last sync (or start) into `into`
    /// (one bitmap per block, ORed in) and marks them clean in the log.
    /// Returns how many dirty pages the log reported.
    fn sync(&self, into: &[PageBitmap]) -> Result<u64, RamError>;
    /// Stops tracking; the guest then writes at full speed again.
    fn stop(&self) -> Result<(), RamError>;
    /// The writer's hook after writing `page` of `block`. Kernel-tracked
    /// logs ignore it.
    fn mark(&self, block: usize, page: u64);
}

/// The writer-marked log: one atomic bitmap per block.
pub struct BitmapLog {
    bitmaps: Vec<PageBitmap>,
    tracking: AtomicBool,
}

impl BitmapLog {
    pub fn new(memory: &GuestMemory) -> Self {
        Self {
            bitmaps: memory
                .blocks()
                .iter()
                .map(|b| PageBitmap::new(b.pages(), false))
                .collect(),
            tracking: AtomicBool::new(false),
        }
    }
}

impl DirtyLog for BitmapLog {
    fn name(&self) -> &'static str {
        "bitmap"
    }

    fn start(&self) -> Result<(), RamError> {
        for b in &self.bitmaps {
            for w in 0..b.words() {
                b.take_word(w);
            }
        }
        self.tracking.store(true, Ordering::Release);
        Ok(())
    }

    fn sync(&self, into: &[PageBitmap]) -> Result<u64, RamError> {
        let mut dirty = 0;
        for (log, pass) in self.bitmaps.iter().zip(into) {
            for w in 0..log.words() {
                let bits = log.take_word(w);
                if bits != 0 {
                    pass.or_word(w, bits);
                    dirty += u64::from(bits.count_ones());
                }
            }
        }
        Ok(dirty)
    }

    fn stop(&self) -> Result<(), RamError> {
        self.tracking.store(false, Ordering::Release);
        Ok(())
    }

    #[inline]
    fn mark(&self, block: usize, page: u64) {
        if self.tracking.load(Ordering::Relaxed) {
            if let Some(b) = self.bitmaps.get(block) {
                if page < b.pages() {
                    b.set(page);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BlockSpec;

    #[test]
    fn bitmap_log_reports_marked_pages_once() {
        let mem = GuestMemory::anonymous(&[BlockSpec {
            name: "ram".into(),
            len: 1 << 20,
            page_size: 4096,
        }])
        .unwrap();
        let log = BitmapLog::new(&mem);
        log.mark(0, 3); // before start: not tracked
        log.start().unwrap();
        log.mark(0, 5);
        log.mark(0, 200);
        log.mark(0, 99_999); // out of range: ignored
        let pass = vec![PageBitmap::new(256, false)];
        assert_eq!(log.sync(&pass).unwrap(), 2);
        assert_eq!(pass[0].iter_set().collect::<Vec<_>>(), vec![5, 200]);
        assert_eq!(log.sync(&pass).unwrap(), 0, "a sync clears the log");
        log.stop().unwrap();
        log.mark(0, 7);
        assert_eq!(log.sync(&pass).unwrap(), 0);
    }
}
