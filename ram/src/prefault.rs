//! Prefaulting a destination's fresh memory just ahead of the pages that
//! arrive: a helper thread populates (`MADV_POPULATE_WRITE`, huge pages
//! where the block has them) the next window of guest memory past the
//! receive cursor, so the receivers' copies land in memory that is already
//! there instead of each taking the fault, and the zeroing of a page,
//! themselves.
//!
//! The cursor is the bytes of guest RAM received so far ([`Counters`]'
//! `ram_bytes`, zero pages included), read as a position in the blocks
//! laid end to end: a first pass sends the blocks in order, from the
//! start. The thread only ever populates ahead of the cursor, never behind
//! it: a range the cursor jumped over (zero pages, which arrive as offsets
//! only) stays unpopulated, so a sparse guest costs at most one window of
//! memory per hole. It stops once the cursor has passed the end (the first
//! pass is over), when asked, or at the first error (say a kernel without
//! `MADV_POPULATE_WRITE`, Linux 5.14), which it reports with its figures.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{Counters, GuestMemory};

/// How far ahead of the cursor the thread populates, by default.
pub const DEFAULT_PREFAULT_WINDOW: u64 = 32 << 20;

/// Populated per call: one huge page.
const STEP: u64 = 2 << 20;

/// How long the thread sleeps when it has caught up with its window.
const IDLE: Duration = Duration::from_micros(300);

/// What a [`Prefaulter`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefaultReport {
    /// Bytes populated ahead of the cursor.
    pub bytes: u64,
    /// Why it stopped early, if it did (an madvise error).
    pub error: Option<String>,
    /// Wall time the thread ran.
    pub elapsed: Duration,
}

/// The helper thread; stopped and joined by [`Prefaulter::stop`] or on drop.
pub struct Prefaulter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<PrefaultReport>>,
}

impl Prefaulter {
    /// Starts populating `memory` up to `window` bytes ahead of
    /// `counters.ram_bytes`.
    pub fn start(
        memory: Arc<GuestMemory>,
        counters: Arc<Counters>,
        window: u64,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-prefault".into())
            .spawn(move || run(&memory, &counters, window.max(STEP), &flag))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread (it finishes the step in hand) and says what it did.
    pub fn stop(mut self) -> PrefaultReport {
        self.halt()
    }

    fn halt(&mut self) -> PrefaultReport {
        self.stop.store(true, Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Prefaulter {
    fn drop(&mut self) {
        self.halt();
    }
}

fn run(
    memory: &GuestMemory,
    counters: &Counters,
    window: u64,
    stop: &AtomicBool,
) -> PrefaultReport {
    let started = Instant::now();
    let total = memory.total_bytes();
    let mut report = PrefaultReport::default();
    // Everything below `done` was populated or lies behind the cursor.
    let mut done = 0u64;
    while !stop.load(Relaxed) {
        let cursor = counters.ram_bytes.load(Relaxed);
        if cursor >= total {
            break;
        }
        let start = done.max(cursor);
        let end = cursor.saturating_add(window).min(total);
        if start >= end {
            std::thread::sleep(IDLE);
            continue;
        }
        // To the next huge-page boundary, at most one step.
        let step_end = ((start / STEP + 1) * STEP).min(end);
        if let Err(e) = populate(memory, start, step_end - start) {
            report.error = Some(e);
            break;
        }
        report.bytes += step_end - start;
        done = step_end;
    }
    report.elapsed = started.elapsed();
    report
}

/// Populates `len` bytes at position `at` of the blocks laid end to end.
fn populate(memory: &GuestMemory, mut at: u64, mut len: u64) -> Result<(), String> {
    let mut base = 0u64;
    for block in memory.blocks() {
        let block_end = base + block.len();
        while len > 0 && at < block_end {
            let offset = at - base;
            let n = len.min(block.len() - offset);
            block
                .populate_write(offset, n)
                .map_err(|e| format!("block {}: offset {offset:#x}: {e}", block.name()))?;
            at += n;
            len -= n;
        }
        base = block_end;
        if len == 0 {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BlockSpec;
    use std::sync::atomic::Ordering::SeqCst;

    const MIB: u64 = 1 << 20;

    /// Pages of `[from, to)` of block 0 resident, by mincore.
    fn resident(memory: &GuestMemory, from: u64, to: u64) -> usize {
        let block = &memory.blocks()[0];
        let pages = ((to - from) / 4096) as usize;
        let mut vec = vec![0u8; pages];
        // SAFETY: the range lies inside the block's live mapping (the test
        // holds `memory`), page-aligned, and `vec` has a byte per page.
        let rc = unsafe {
            libc::mincore(
                block.host_addr().add(from as usize).cast(),
                (to - from) as usize,
                vec.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let until = Instant::now() + Duration::from_secs(30);
        while !cond() {
            assert!(Instant::now() < until, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn it_populates_a_window_ahead_of_the_cursor_and_nothing_behind_it() {
        // Base pages: a huge page would make neighbours resident too.
        let memory = Arc::new(
            GuestMemory::anonymous_base_pages(&[BlockSpec {
                name: "ram".into(),
                len: 64 * MIB,
                page_size: 4096,
            }])
            .unwrap(),
        );
        let counters = Arc::new(Counters::default());
        // The cursor has jumped to 16 MiB: 0..16 MiB were zero pages.
        counters.ram_bytes.store(16 * MIB, SeqCst);
        let p = Prefaulter::start(memory.clone(), counters.clone(), 8 * MIB).unwrap();
        let window_pages = (8 * MIB / 4096) as usize;
        wait_for("the window to be populated", || {
            resident(&memory, 16 * MIB, 24 * MIB) == window_pages
        });
        assert_eq!(resident(&memory, 0, 16 * MIB), 0, "behind the cursor");
        assert_eq!(
            resident(&memory, 24 * MIB, 64 * MIB),
            0,
            "beyond the window"
        );
        // The cursor moves past another hole: the hole stays empty.
        counters.ram_bytes.store(40 * MIB, SeqCst);
        wait_for("the next window", || {
            resident(&memory, 40 * MIB, 48 * MIB) == window_pages
        });
        assert_eq!(
            resident(&memory, 24 * MIB, 40 * MIB),
            0,
            "the hole jumped over"
        );
        // Past the end: the thread ends by itself.
        counters.ram_bytes.store(64 * MIB, SeqCst);
        let report = p.stop();
        assert_eq!(report.error, None);
        assert_eq!(report.bytes, 16 * MIB);
        // Populating never changes what memory holds.
        assert_eq!(memory.digest(), {
            let zero = GuestMemory::anonymous_base_pages(&[BlockSpec {
                name: "ram".into(),
                len: 64 * MIB,
                page_size: 4096,
            }])
            .unwrap();
            zero.digest()
        });
    }
}
