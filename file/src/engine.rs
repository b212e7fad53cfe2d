//! The engine under saving and restoring: K threads, each with its own
//! io_uring, move a guest's pages between memory and fixed offsets of a
//! saved-guest file (the layout in `ferry_ram::mapped`): page i of a block
//! always lives at `pages_offset + i × page_size`, so threads never
//! coordinate on the file.
//!
//! Owns what the directions ([`crate::write`], [`crate::read`]) share:
//! regions handed out with one atomic add ([`Regions`]), runs of pages
//! ([`Run`], [`push_page`], [`read_runs`]), the zero-page scan of a save
//! ([`RegionScan`]), and the threads and their rings ([`run_threads`]):
//! many operations in flight per ring, short transfers resubmitted for the
//! rest, and on any error (or a cancel, [`FileOptions::cancel`]) every
//! thread stops claiming work and waits for what it has in flight before
//! returning. Operations carry raw addresses of guest memory: the kernel
//! reads or writes them, and no `&[u8]` over guest memory is formed here.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use ferry_ram::mapped::FileLayout;
use ferry_ram::{is_zero, Counters, GuestMemory, PageBitmap, RamBlock};
use ferry_transport::uring::Ring;

use crate::data::{cancelled, DataFile, FileOptions};
use crate::FileError;

pub(crate) fn check_memory_matches(
    memory: &GuestMemory,
    layout: &FileLayout,
    path: &Path,
) -> Result<(), FileError> {
    if memory.specs() != layout.specs() {
        return Err(FileError::Mismatch {
            path: path.into(),
            what: "the memory's blocks do not match the file's layout".into(),
        });
    }
    Ok(())
}

pub(crate) fn shared_words(
    layout: &FileLayout,
    words: impl Fn(&ferry_ram::mapped::BlockLayout) -> u64,
) -> Vec<Vec<AtomicU64>> {
    layout
        .blocks
        .iter()
        .map(|b| (0..words(b)).map(|_| AtomicU64::new(0)).collect())
        .collect()
}

pub(crate) fn unshare(v: Vec<Vec<AtomicU64>>) -> Vec<Vec<u64>> {
    v.into_iter()
        .map(|w| w.into_iter().map(AtomicU64::into_inner).collect())
        .collect()
}

/// A run of pages of one block to move in one operation.
#[derive(Clone, Copy)]
pub(crate) struct Run {
    pub(crate) first_page: u64,
    pub(crate) pages: u64,
}

/// One read or write in flight: `len` bytes at memory `addr` and file `offset`.
#[derive(Clone, Copy)]
pub(crate) struct Op {
    block: usize,
    region: u64,
    pub(crate) addr: *mut u8,
    pub(crate) len: u32,
    pub(crate) offset: u64,
}

/// What differs between saving and restoring.
pub(crate) trait Direction: Sync {
    const WHAT: &'static str;
    /// The runs of region `region` of block `block` to move.
    fn prepare(&self, block: usize, region: u64, runs: &mut Vec<Run>);
    /// Queues `op` on the ring.
    ///
    /// # Safety
    /// `op` must describe memory inside one of the guest's blocks.
    unsafe fn queue(&self, ring: &mut Ring, fd: RawFd, op: &Op, tag: u64) -> Result<(), FileError>;
    /// Every operation of the region has completed.
    fn region_done(&self, block: usize, region: u64) -> Result<(), FileError>;
    /// Whether a closed region counts as all of its memory moved (else
    /// `prepare` counts what it moved).
    fn counts_whole_regions(&self) -> bool {
        true
    }
    /// The memory and file both directions move between.
    fn target(&self) -> &Target<'_>;
    fn counters(&self) -> &Counters {
        self.target().counters
    }
    fn memory(&self) -> &GuestMemory {
        self.target().memory
    }
    fn layout(&self) -> &FileLayout {
        self.target().layout
    }
    fn path(&self) -> &Path {
        self.target().path
    }
}

/// The guest memory, the file's layout and path, and the counters a save
/// or restore moves pages between and reports to.
pub(crate) struct Target<'a> {
    pub(crate) memory: &'a GuestMemory,
    pub(crate) layout: &'a FileLayout,
    pub(crate) path: &'a Path,
    pub(crate) counters: &'a Counters,
}

/// The reads that restore pages `[first, end)` of a block with pages of
/// `page_size` bytes and bitmap `bitmap`: its present pages, one run per
/// stretch of them, joined across gaps of up to [`READ_ACROSS_GAP`] of
/// absent pages. The bitmap is scanned a word at a time. Returns how many
/// pages are present.
pub(crate) fn read_runs(
    bitmap: &PageBitmap,
    first: u64,
    end: u64,
    page_size: u32,
    runs: &mut Vec<Run>,
) -> u64 {
    let max_gap = READ_ACROSS_GAP / u64::from(page_size);
    let mut present = 0;
    for index in bitmap.iter_set_in(first, end) {
        push_page(runs, index, max_gap);
        present += 1;
    }
    present
}

/// Pages `[first, end)` of `block` that region `region` covers.
pub(crate) fn region_pages(block: &RamBlock, region_size: u32, region: u64) -> (u64, u64) {
    let per = u64::from(region_size / block.page_size());
    let first = region * per;
    (first, (first + per).min(block.pages()))
}

/// Adds page `index` to the last run if at most `max_gap` pages lie between
/// them (the run then covers the gap too), else starts a run.
pub(crate) fn push_page(runs: &mut Vec<Run>, index: u64, max_gap: u64) {
    match runs.last_mut() {
        Some(r) if r.first_page + r.pages + max_gap >= index => {
            r.pages = index + 1 - r.first_page;
        }
        _ => runs.push(Run {
            first_page: index,
            pages: 1,
        }),
    }
}

/// How a full save scans one region: pages from `first` on, of
/// `page_size` bytes; runs join across gaps of up to `max_gap` zero pages
/// (see [`FileOptions::hole_min`]).
pub(crate) struct RegionScan {
    pub(crate) first: u64,
    pub(crate) page_size: usize,
    pub(crate) max_gap: u64,
}

impl RegionScan {
    /// Finds which of the region's `pages` pages are not all zeros
    /// (`is_zero_at(i)` says whether page `first + i` is): sets their bits
    /// in `bitmap`, adds them to `runs`, and returns how many there are
    /// (the caller counts them once they are written).
    pub(crate) fn run(
        &self,
        pages: u64,
        is_zero_at: impl Fn(u64) -> bool,
        bitmap: &PageBitmap,
        runs: &mut Vec<Run>,
    ) -> u64 {
        let mut present = 0;
        for i in 0..pages {
            if is_zero_at(i) {
                continue;
            }
            let index = self.first + i;
            bitmap.set(index);
            push_page(runs, index, self.max_gap);
            present += 1;
        }
        present
    }

    /// Scans pages `first..first + pages` of guest block `b` in place
    /// (an atomic zero scan: the guest may be writing them).
    pub(crate) fn run_block(
        &self,
        b: &RamBlock,
        pages: u64,
        bitmap: &PageBitmap,
        runs: &mut Vec<Run>,
    ) -> u64 {
        self.run(
            pages,
            |i| {
                b.prefetch_page(self.first + i + 1);
                b.page_slice(self.first + i).is_none_or(|p| is_zero(&p))
            },
            bitmap,
            runs,
        )
    }

    /// Scans `bytes`, a private copy of the region.
    pub(crate) fn run_copy(&self, bytes: &[u8], bitmap: &PageBitmap, runs: &mut Vec<Run>) -> u64 {
        let ps = self.page_size;
        self.run(
            self.pages(bytes),
            |i| ferry_ram::is_zero_page(&bytes[i as usize * ps..(i as usize + 1) * ps]),
            bitmap,
            runs,
        )
    }

    /// Pages in `bytes`.
    pub(crate) fn pages(&self, bytes: &[u8]) -> u64 {
        (bytes.len() / self.page_size) as u64
    }
}

pub(crate) fn count_pages(c: &Counters, present: u64, zero: u64) {
    c.pages_normal.fetch_add(present, Relaxed);
    c.pages_zero.fetch_add(zero, Relaxed);
}

/// Restoring reads across a gap of absent pages up to this long rather than
/// splitting the read: an absent page reads as zeros from the file (a hole,
/// or zeros written there), the memory under it is zero already, and the
/// region's checksum proves the result. Fewer, larger reads.
pub(crate) const READ_ACROSS_GAP: u64 = 256 << 10;

/// Bytes of memory region `region` of `block` covers.
fn region_len(block: &RamBlock, region_size: u32, region: u64) -> u64 {
    let (first, end) = region_pages(block, region_size, region);
    (end - first) * u64::from(block.page_size())
}

pub(crate) fn ring_err(path: &Path, source: ferry_transport::TransportError) -> FileError {
    FileError::Ring {
        path: path.into(),
        source,
    }
}

/// Numbers the checksum regions of all blocks one after another (global
/// region numbers) and hands them out in that order, once each.
pub(crate) struct Regions {
    /// First global region number of each block, and the total after the last.
    starts: Vec<u64>,
    next: AtomicU64,
}

impl Regions {
    pub(crate) fn new(layout: &FileLayout) -> Self {
        Self::of_size(layout, u64::from(layout.region_size))
    }

    /// Pieces of `size` bytes of each block (the last maybe short) rather
    /// than checksum regions.
    pub(crate) fn of_size(layout: &FileLayout, size: u64) -> Self {
        let mut starts = vec![0];
        for b in &layout.blocks {
            let last = *starts.last().expect("starts with 0");
            starts.push(last + b.len.div_ceil(size));
        }
        Self {
            starts,
            next: AtomicU64::new(0),
        }
    }

    /// How many regions all blocks have together.
    pub(crate) fn total(&self) -> u64 {
        *self.starts.last().expect("starts with 0")
    }

    /// The next unclaimed global region number, or None when all are out.
    pub(crate) fn claim_global(&self) -> Option<u64> {
        let n = self.next.fetch_add(1, Relaxed);
        (n < self.total()).then_some(n)
    }

    /// The next unclaimed (block, region within the block).
    fn claim(&self) -> Option<(usize, u64)> {
        self.claim_global().map(|n| self.locate(n))
    }

    /// The (block, region within the block) of global region `n` < total.
    pub(crate) fn locate(&self, n: u64) -> (usize, u64) {
        let block = self.starts.partition_point(|&s| s <= n) - 1;
        (block, n - self.starts[block])
    }

    /// The global number of `region` of `block`.
    pub(crate) fn global(&self, block: usize, region: u64) -> u64 {
        self.starts[block] + region
    }
}

pub(crate) fn run_threads<D: Direction>(
    d: &D,
    layout: &FileLayout,
    data: &DataFile,
    opts: &FileOptions,
) -> Result<(), FileError> {
    let regions = Regions::new(layout);
    let abort = AtomicBool::new(false);
    let fd = data.file.as_raw_fd();
    let depth = opts.queue_depth.clamp(1, 1024);
    let results: Vec<Result<(), FileError>> = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for i in 0..opts.channels.max(1) {
            let (regions, abort) = (&regions, &abort);
            let spawned = std::thread::Builder::new()
                .name(format!("ferry-file-{i}"))
                .spawn_scoped(s, move || {
                    let r = channel_thread(d, regions, fd, depth, abort, opts);
                    if r.is_err() {
                        abort.store(true, Relaxed);
                    }
                    r
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    abort.store(true, Relaxed);
                    handles.clear();
                    return vec![Err(FileError::Stopped(format!(
                        "cannot start file thread: {e}"
                    )))];
                }
            }
        }
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(FileError::Stopped("a file thread panicked".into())))
            })
            .collect()
    });
    results.into_iter().find(Result::is_err).unwrap_or(Ok(()))
}

/// One thread's ring: operations in flight and the regions they belong to.
struct Flight {
    ring: Ring,
    /// Operations in flight, by the tag their completion carries.
    slots: Vec<Option<Op>>,
    free: Vec<usize>,
    /// Operations ready to queue (new runs, or the rest of a short transfer).
    pending: VecDeque<Op>,
    /// Regions with operations not yet completed: (block, region, remaining).
    open: Vec<(usize, u64, u32)>,
    in_flight: usize,
}

fn channel_thread<D: Direction>(
    d: &D,
    regions: &Regions,
    fd: RawFd,
    depth: usize,
    abort: &AtomicBool,
    opts: &FileOptions,
) -> Result<(), FileError> {
    let ring =
        Ring::new(depth.next_power_of_two() as u32).map_err(|source| ring_err(d.path(), source))?;
    let mut f = Flight {
        ring,
        slots: vec![None; depth],
        free: (0..depth).rev().collect(),
        pending: VecDeque::new(),
        open: Vec::new(),
        in_flight: 0,
    };
    let mut runs = Vec::new();
    let mut result = Ok(());
    loop {
        if result.is_ok() && opts.cancelled() {
            result = Err(cancelled(d.path()));
            abort.store(true, Relaxed);
        }
        if result.is_ok() && !abort.load(Relaxed) {
            result = fill(d, regions, fd, &mut f, &mut runs);
        }
        if f.in_flight == 0 {
            break;
        }
        if let Err(e) = f.ring.submit(1) {
            // io_uring_enter itself failed, so nothing more can be reaped.
            // Dropping the ring cancels what is in flight; a direct read
            // still holds its pages pinned, and a buffered one copies into
            // this process's mappings or fails, so no memory is reused under it.
            return Err(ring_err(d.path(), e));
        }
        while let Some(c) = f.ring.pop() {
            let r = complete(d, &mut f, c.user_data as usize, c.bytes());
            if result.is_ok() {
                result = r;
            }
        }
    }
    result
}

/// Queues operations until `depth` are in flight or no work is left.
fn fill<D: Direction>(
    d: &D,
    regions: &Regions,
    fd: RawFd,
    f: &mut Flight,
    runs: &mut Vec<Run>,
) -> Result<(), FileError> {
    while let Some(&slot) = f.free.last() {
        if f.pending.is_empty() && !open_region(d, regions, f, runs)? {
            break;
        }
        let Some(op) = f.pending.pop_front() else {
            continue;
        };
        // SAFETY: every Op is built by open_region from a block's page run
        // (or is the unfinished tail of one), so it lies inside guest memory.
        unsafe { d.queue(&mut f.ring, fd, &op, slot as u64)? };
        f.free.pop();
        f.slots[slot] = Some(op);
        f.in_flight += 1;
    }
    Ok(())
}

/// Claims the next region and queues its runs as pending operations.
/// Returns false when no region is left.
fn open_region<D: Direction>(
    d: &D,
    regions: &Regions,
    f: &mut Flight,
    runs: &mut Vec<Run>,
) -> Result<bool, FileError> {
    let Some((block, region)) = regions.claim() else {
        return Ok(false);
    };
    runs.clear();
    d.prepare(block, region, runs);
    if runs.is_empty() {
        return close_region(d, block, region).map(|()| true);
    }
    let b = &d.memory().blocks()[block];
    let ps = u64::from(b.page_size());
    let base = d.layout().blocks[block].pages_offset;
    for run in runs.iter() {
        f.pending.push_back(Op {
            block,
            region,
            addr: b
                .page_addr(run.first_page)
                .expect("runs lie inside the block"),
            len: (run.pages * ps) as u32,
            offset: base + run.first_page * ps,
        });
    }
    f.open.push((block, region, runs.len() as u32));
    Ok(true)
}

/// Accounts for one completion: a short transfer queues its rest, a
/// finished one may close its region.
fn complete<D: Direction>(
    d: &D,
    f: &mut Flight,
    slot: usize,
    result: std::io::Result<usize>,
) -> Result<(), FileError> {
    let Some(op) = f.slots.get_mut(slot).and_then(Option::take) else {
        return Err(FileError::Stopped(format!(
            "io_uring completed an unknown operation #{slot}"
        )));
    };
    f.free.push(slot);
    f.in_flight -= 1;
    let block = &d.memory().blocks()[op.block];
    let io_err = |source| FileError::Io {
        path: d.path().into(),
        block: block.name().into(),
        offset: op.offset,
        what: D::WHAT,
        source,
    };
    let done = match result {
        Ok(0) => {
            return Err(io_err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "no progress (end of file or no space)",
            )))
        }
        Ok(n) => n.min(op.len as usize) as u32,
        Err(e) => return Err(io_err(e)),
    };
    d.counters().wire_bytes.fetch_add(u64::from(done), Relaxed);
    if done < op.len {
        f.pending.push_front(Op {
            // SAFETY: done < len, so the address stays inside the same run.
            addr: unsafe { op.addr.add(done as usize) },
            len: op.len - done,
            offset: op.offset + u64::from(done),
            ..op
        });
        return Ok(());
    }
    let Some(i) = f
        .open
        .iter()
        .position(|&(b, r, _)| b == op.block && r == op.region)
    else {
        return Err(FileError::Stopped("completion for a closed region".into()));
    };
    f.open[i].2 -= 1;
    if f.open[i].2 == 0 {
        f.open.swap_remove(i);
        close_region(d, op.block, op.region)?;
    }
    Ok(())
}

/// Every transfer of a region has landed: check it (restoring) and count it.
fn close_region<D: Direction>(d: &D, block: usize, region: u64) -> Result<(), FileError> {
    d.region_done(block, region)?;
    if !d.counts_whole_regions() {
        return Ok(());
    }
    let b = &d.memory().blocks()[block];
    let len = region_len(b, d.layout().region_size, region);
    d.counters().ram_bytes.fetch_add(len, Relaxed);
    Ok(())
}

/// The checksum of guest memory `mem` (which the guest may be writing),
/// hashed from private copies of it a piece at a time: equal to
/// `region_checksum` of the same bytes.
pub(crate) fn guest_checksum(mem: &ferry_ram::VolatileSlice) -> u64 {
    let mut h = ferry_ram::mapped::StreamChecksum::new();
    let mut scratch = [0u8; 16 << 10];
    ferry_ram::read_in_pieces(mem, &mut scratch, |piece| h.bytes(piece));
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_ram::BlockSpec;

    fn pages(runs: &[Run]) -> Vec<(u64, u64)> {
        runs.iter().map(|r| (r.first_page, r.pages)).collect()
    }

    #[test]
    fn runs_join_across_gaps_no_longer_than_allowed() {
        let mut strict = Vec::new();
        let mut gap1 = Vec::new();
        for i in [0, 1, 2, 4, 5, 8] {
            push_page(&mut strict, i, 0);
            push_page(&mut gap1, i, 1);
        }
        assert_eq!(pages(&strict), [(0, 3), (4, 2), (8, 1)]);
        // A one-page gap (page 3) is covered; a two-page gap (6, 7) is not.
        assert_eq!(pages(&gap1), [(0, 6), (8, 1)]);
    }

    #[test]
    fn every_region_of_every_block_is_claimed_once() {
        let specs = [
            BlockSpec {
                name: "a".into(),
                len: 3 << 20,
                page_size: 4096,
            },
            BlockSpec {
                name: "b".into(),
                len: (1 << 20) + 4096,
                page_size: 4096,
            },
        ];
        let layout = FileLayout::plan(&specs, 0).unwrap();
        let r = Regions::new(&layout);
        let claimed: Vec<_> = std::iter::from_fn(|| r.claim()).collect();
        assert_eq!(claimed, [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]);
        assert_eq!(r.claim(), None);
    }
}
