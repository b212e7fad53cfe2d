//! Background snapshot (seed 004's `bg_migration`): write a guest's memory
//! to a saved-guest file *as it was when the snapshot began*, while the
//! guest runs on.
//!
//! Protecting a GiB of 4 KiB pages takes tens of milliseconds, too long
//! for the pause, so [`Arming`] protects all memory *before* it while a
//! handler lets each write through at once (lifting that page's protection)
//! and notes the page; during the pause only the noted pages are protected
//! again ([`Arming::rearm`]). The caller then saves the device state and
//! resumes the guest; then [`write_background`] runs. Memory is saved a checksum
//! region (1 MiB) at a time: a region is first *copied* out of guest memory
//! into a private buffer while still protected, then its protection is
//! lifted, then the copy is checksummed, scanned for zero pages and written
//! at its fixed place (its runs all at once, through the thread's
//! io_uring). K writer threads claim regions in order; one handler
//! thread reads write faults: a write to a region nobody has copied yet
//! makes the handler copy that region first (the writer's thread waits in
//! the kernel meanwhile), lift its protection, which wakes the writer, and
//! queue the copy for the writer threads, which write queued copies before
//! claiming new regions. A region's state moves fresh → copying → copied
//! exactly once (one atomic compare-and-swap decides who copies it), so no
//! page is ever saved after the guest changed it.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_ram::mapped::{region_checksum, FileLayout};
use ferry_ram::{Counters, GuestMemory, PageBitmap, WriteProtect};
use ferry_transport::uring::Ring;

use crate::data::{cancelled, AlignedBuf, DataFile, FileOptions};
use crate::engine::{
    check_memory_matches, count_pages, region_pages, ring_err, shared_words, unshare, RegionScan,
    Regions, Run,
};
use crate::write::{empty_bitmaps, WrittenPages};
use crate::FileError;

const FRESH: u8 = 0;
const COPYING: u8 = 1;
const COPIED: u8 = 2;
/// Regions copied by the fault handler and not yet written, at most (the
/// memory they hold: this many checksum regions, 1 MiB each).
const MAX_QUEUED: usize = 64;
/// Writes in flight per writer thread (a 1 MiB region of `mixed` memory
/// is 64 runs of three pages).
const WRITES_IN_FLIGHT: u32 = 64;

/// How a background snapshot's write-out went.
#[derive(Clone, Debug, Default)]
pub struct BackgroundStats {
    /// Regions the handler copied because the guest was about to write them.
    pub fault_regions: u64,
    /// Regions the writer threads copied in order.
    pub ordered_regions: u64,
    /// The longest a guest write waited (fault read until protection lifted).
    pub max_fault_us: u64,
}

/// Memory being write-protected while the guest still runs (before the
/// snapshot's pause): a handler thread lets each write fault through at once
/// and notes its page, to be protected again by [`Arming::rearm`].
pub struct Arming {
    wp: Arc<WriteProtect>,
    noted: Arc<Vec<PageBitmap>>,
    page_sizes: Vec<u64>,
    stop: Arc<AtomicBool>,
    handler: Option<JoinHandle<Result<(), FileError>>>,
}

/// How long the arming handler waits for faults before looking at its stop flag.
const ARMING_POLL_MS: i32 = 1;

impl Arming {
    /// Starts the handler, then protects all of `memory` (registered with
    /// `wp`) while the guest runs.
    pub fn start(memory: &GuestMemory, wp: Arc<WriteProtect>) -> Result<Self, FileError> {
        let noted: Arc<Vec<PageBitmap>> = Arc::new(
            memory
                .blocks()
                .iter()
                .map(|b| PageBitmap::new(b.pages(), false))
                .collect(),
        );
        let page_sizes: Vec<u64> = memory
            .blocks()
            .iter()
            .map(|b| u64::from(b.page_size()))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let handler = {
            let (wp, noted, stop, sizes) =
                (wp.clone(), noted.clone(), stop.clone(), page_sizes.clone());
            std::thread::Builder::new()
                .name("ferry-bg-arming".into())
                .spawn(move || {
                    let mut faults = Vec::new();
                    while !stop.load(Ordering::Acquire) {
                        wp.faults(ARMING_POLL_MS, &mut faults)?;
                        for &addr in &faults {
                            let Some((block, offset)) = wp.locate(addr) else {
                                return Err(FileError::Stopped(format!(
                                    "a write fault at {addr:#x}, outside the guest's memory"
                                )));
                            };
                            let ps = sizes[block];
                            // Noted before the writer can go on, so a pause
                            // that finds every vCPU stopped finds every note.
                            noted[block].set(offset / ps);
                            wp.unprotect(block, offset / ps * ps, ps)?;
                        }
                    }
                    Ok(())
                })
                .map_err(|e| FileError::Stopped(format!("cannot start the arming handler: {e}")))?
        };
        let arming = Self {
            wp,
            noted,
            page_sizes,
            stop,
            handler: Some(handler),
        };
        arming.wp.protect_all()?;
        Ok(arming)
    }

    /// With the guest paused (no write in flight): stops the handler and
    /// protects again every page it let through. Returns how many.
    pub fn rearm(mut self) -> Result<u64, FileError> {
        self.stop_handler()?;
        let mut pages = 0;
        for (block, (bits, &ps)) in self.noted.iter().zip(&self.page_sizes).enumerate() {
            let mut run: Option<(u64, u64)> = None;
            for page in bits.iter_set() {
                pages += 1;
                run = match run {
                    Some((first, n)) if first + n == page => Some((first, n + 1)),
                    Some((first, n)) => {
                        self.wp.protect(block, first * ps, n * ps)?;
                        Some((page, 1))
                    }
                    None => Some((page, 1)),
                };
            }
            if let Some((first, n)) = run {
                self.wp.protect(block, first * ps, n * ps)?;
            }
        }
        Ok(pages)
    }

    fn stop_handler(&mut self) -> Result<(), FileError> {
        self.stop.store(true, Ordering::Release);
        match self.handler.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(FileError::Stopped("the arming handler panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for Arming {
    fn drop(&mut self) {
        if let Err(e) = self.stop_handler() {
            tracing::error!("background snapshot: {e}");
        }
    }
}

/// A region copied by the fault handler, waiting to be written.
struct Job {
    block: usize,
    region: u64,
    buf: AlignedBuf,
}

struct Shared<'a> {
    memory: &'a GuestMemory,
    layout: &'a FileLayout,
    data: &'a DataFile,
    path: &'a Path,
    counters: &'a Counters,
    wp: &'a WriteProtect,
    hole_min: u64,
    /// Global region numbers; `state` is indexed by them.
    regions: Regions,
    state: Vec<AtomicU8>,
    copied: AtomicU64,
    queue: Mutex<VecDeque<Job>>,
    bitmaps: Vec<PageBitmap>,
    checksums: Vec<Vec<AtomicU64>>,
    abort: AtomicBool,
    /// Set from outside to cancel the write-out.
    cancel: Option<Arc<AtomicBool>>,
    fault_regions: AtomicU64,
    ordered_regions: AtomicU64,
    max_fault_us: AtomicU64,
}

/// Writes `memory` as it was when `wp` protected it (all of it, before
/// this is called) to `data`, laid out as `layout`, with `opts.channels`
/// writer threads and one fault handler. Returns when every region is in
/// the file and no page is protected any more.
pub fn write_background(
    memory: &GuestMemory,
    layout: &FileLayout,
    data: &DataFile,
    path: &Path,
    opts: &FileOptions,
    counters: &Counters,
    wp: &WriteProtect,
) -> Result<(WrittenPages, BackgroundStats), FileError> {
    check_memory_matches(memory, layout, path)?;
    let regions = Regions::new(layout);
    let s = Shared {
        memory,
        layout,
        data,
        path,
        counters,
        wp,
        hole_min: opts.hole_min,
        state: (0..regions.total()).map(|_| AtomicU8::new(FRESH)).collect(),
        regions,
        copied: AtomicU64::new(0),
        queue: Mutex::new(VecDeque::new()),
        bitmaps: empty_bitmaps(layout),
        checksums: shared_words(layout, |b| b.regions(layout.region_size)),
        abort: AtomicBool::new(false),
        cancel: opts.cancel.clone(),
        fault_regions: AtomicU64::new(0),
        ordered_regions: AtomicU64::new(0),
        max_fault_us: AtomicU64::new(0),
    };
    let results: Vec<Result<(), FileError>> = std::thread::scope(|scope| {
        let s = &s;
        let mut handles = Vec::new();
        let mut spawn_error = None;
        // Thread 0 handles faults, the others write.
        for i in 0..=opts.channels.max(1) {
            let name = if i == 0 {
                "ferry-bg-faults".to_string()
            } else {
                format!("ferry-bg-{i}")
            };
            let spawned = std::thread::Builder::new()
                .name(name)
                .spawn_scoped(scope, move || {
                    let r = if i == 0 {
                        s.handle_faults()
                    } else {
                        s.write_out()
                    };
                    if r.is_err() {
                        s.abort.store(true, Ordering::Release);
                    }
                    r
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    s.abort.store(true, Ordering::Release);
                    spawn_error = Some(FileError::Stopped(format!(
                        "cannot start a snapshot thread: {e}"
                    )));
                    break;
                }
            }
        }
        let mut results: Vec<_> = handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(FileError::Stopped("a snapshot thread panicked".into()))
                })
            })
            .collect();
        results.extend(spawn_error.map(Err));
        results
    });
    results.into_iter().find(Result::is_err).unwrap_or(Ok(()))?;
    if s.copied.load(Ordering::Acquire) != s.regions.total() {
        return Err(FileError::Stopped(
            "the snapshot's threads stopped before every region was saved".into(),
        ));
    }
    let stats = BackgroundStats {
        fault_regions: s.fault_regions.load(Ordering::Relaxed),
        ordered_regions: s.ordered_regions.load(Ordering::Relaxed),
        max_fault_us: s.max_fault_us.load(Ordering::Relaxed),
    };
    Ok((
        WrittenPages {
            bitmaps: s.bitmaps,
            checksums: unshare(s.checksums),
        },
        stats,
    ))
}

impl Shared<'_> {
    fn region_bytes(&self, block: usize, region: u64) -> (u64, usize) {
        let b = &self.memory.blocks()[block];
        let (first, end) = region_pages(b, self.layout.region_size, region);
        let ps = u64::from(b.page_size());
        (first * ps, ((end - first) * ps) as usize)
    }

    /// Copies region `region` of `block` (still protected, so unchanged
    /// since the snapshot began) into `buf`, then lifts its protection,
    /// which wakes any writer waiting there. Only the one who moved the
    /// region to COPYING calls this; it then counts the region copied once
    /// the copy is sure to be written (queued, or about to be by itself).
    fn copy_out(
        &self,
        global: u64,
        block: usize,
        region: u64,
        buf: &mut AlignedBuf,
    ) -> Result<(), FileError> {
        let (offset, len) = self.region_bytes(block, region);
        let region_mem = self.memory.blocks()[block]
            .slice(offset, len)
            .ok_or_else(|| {
                FileError::Stopped(format!("region {region} of block #{block} lies outside it"))
            })?;
        // A volatile copy out of guest memory into the private buffer.
        region_mem.copy_to(buf.get_mut(len));
        self.wp.unprotect(block, offset, len as u64)?;
        self.state[global as usize].store(COPIED, Ordering::Release);
        Ok(())
    }

    /// Checksums, scans and writes a copied region at its place.
    fn write_copy(
        &self,
        ring: &mut Ring,
        block: usize,
        region: u64,
        buf: &AlignedBuf,
    ) -> Result<(), FileError> {
        let b = &self.memory.blocks()[block];
        let (first, _) = region_pages(b, self.layout.region_size, region);
        let (_, len) = self.region_bytes(block, region);
        let bytes = buf.get(len);
        self.checksums[block][region as usize].store(region_checksum(bytes), Ordering::Relaxed);
        let ps = b.page_size() as usize;
        let scan = RegionScan {
            first,
            page_size: ps,
            max_gap: (self.hole_min / ps as u64).saturating_sub(1),
        };
        let mut runs: Vec<Run> = Vec::new();
        let present = scan.run_copy(bytes, &self.bitmaps[block], &mut runs);
        let base = self.layout.blocks[block].pages_offset;
        let pieces: Vec<(&[u8], u64)> = runs
            .iter()
            .map(|run| {
                let from = ((run.first_page - first) as usize) * ps;
                let to = from + run.pages as usize * ps;
                (&bytes[from..to], base + run.first_page * ps as u64)
            })
            .collect();
        ring.write_all_at(self.data.file().as_raw_fd(), &pieces)
            .map_err(|e| FileError::Io {
                path: self.path.into(),
                block: b.name().into(),
                offset: pieces[e.piece].1,
                what: "writing pages",
                source: e.source,
            })?;
        let written: usize = pieces.iter().map(|(p, _)| p.len()).sum();
        self.counters
            .wire_bytes
            .fetch_add(written as u64, Ordering::Relaxed);
        count_pages(self.counters, present, scan.pages(bytes) - present);
        self.counters
            .ram_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }

    /// A writer thread: queued copies first, else the next fresh region.
    fn write_out(&self) -> Result<(), FileError> {
        let mut buf = AlignedBuf::new(self.layout.region_size as usize);
        let mut ring = Ring::new(WRITES_IN_FLIGHT).map_err(|e| ring_err(self.path, e))?;
        let total = self.regions.total();
        while !self.abort.load(Ordering::Acquire) {
            if self
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed))
            {
                return Err(cancelled(self.path));
            }
            let job = self.queue.lock().ok().and_then(|mut q| q.pop_front());
            if let Some(job) = job {
                self.write_copy(&mut ring, job.block, job.region, &job.buf)?;
                continue;
            }
            if let Some(n) = self.regions.claim_global() {
                let won = self.state[n as usize]
                    .compare_exchange(FRESH, COPYING, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok();
                if won {
                    let (block, region) = self.regions.locate(n);
                    self.copy_out(n, block, region, &mut buf)?;
                    self.copied.fetch_add(1, Ordering::AcqRel);
                    self.ordered_regions.fetch_add(1, Ordering::Relaxed);
                    self.write_copy(&mut ring, block, region, &buf)?;
                }
                continue;
            }
            let idle = self.queue.lock().is_ok_and(|q| q.is_empty());
            if self.copied.load(Ordering::Acquire) == total && idle {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// The fault handler: copies out the region a guest write waits on.
    fn handle_faults(&self) -> Result<(), FileError> {
        let mut ring = Ring::new(WRITES_IN_FLIGHT).map_err(|e| ring_err(self.path, e))?;
        let total = self.regions.total();
        let mut faults = Vec::new();
        while !self.abort.load(Ordering::Acquire) && self.copied.load(Ordering::Acquire) < total {
            self.wp.faults(10, &mut faults)?;
            for &addr in &faults {
                let t0 = Instant::now();
                let Some((block, offset)) = self.wp.locate(addr) else {
                    return Err(FileError::Stopped(format!(
                        "a write fault at {addr:#x}, outside the guest's memory"
                    )));
                };
                let region = offset / u64::from(self.layout.region_size);
                let global = self.regions.global(block, region);
                let won = self.state[global as usize]
                    .compare_exchange(FRESH, COPYING, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok();
                if won {
                    let mut buf = AlignedBuf::new(self.layout.region_size as usize);
                    self.copy_out(global, block, region, &mut buf)?;
                    self.fault_regions.fetch_add(1, Ordering::Relaxed);
                    self.max_fault_us
                        .fetch_max(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                    let mut q = self.queue.lock().map_err(|_| {
                        FileError::Stopped("the snapshot's queue was poisoned".into())
                    })?;
                    // Copies waiting for the writers are bounded: past
                    // that, the handler writes its copy itself (the guest
                    // already runs on; only later faults wait longer).
                    if q.len() < MAX_QUEUED {
                        q.push_back(Job { block, region, buf });
                        drop(q);
                        self.copied.fetch_add(1, Ordering::AcqRel);
                    } else {
                        drop(q);
                        self.write_copy(&mut ring, block, region, &buf)?;
                        self.copied.fetch_add(1, Ordering::AcqRel);
                    }
                    continue;
                }
                // A writer thread is copying it: its unprotect wakes the
                // waiter; wait for that, then wake again (harmless) in case
                // this fault came after.
                while self.state[global as usize].load(Ordering::Acquire) != COPIED {
                    if self.abort.load(Ordering::Acquire) {
                        return Ok(());
                    }
                    std::hint::spin_loop();
                }
                let ps = u64::from(self.memory.blocks()[block].page_size());
                self.wp.wake(block, offset / ps * ps, ps)?;
            }
        }
        Ok(())
    }
}
