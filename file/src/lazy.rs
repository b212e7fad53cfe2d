//! Lazy restore: the guest's memory exists at once, empty and registered
//! with userfaultfd (missing mode); a first touch of any page stops the
//! toucher until a fault thread has loaded that page's region from the
//! [`PageSource`] (a saved file, or for postcopy the network), while K
//! prefetch threads load every other region in order.
//!
//! The unit of loading is the source's unit (a saved file's checksum
//! region, 1 MiB of a block): the source fills a private staging buffer
//! and checks it ([`PageSource::fill`]), and only then is it placed in
//! guest memory in one atomic UFFDIO_COPY (or UFFDIO_ZEROPAGE for a region
//! of zeros), so the guest never sees unchecked bytes. Each region has a
//! state (absent, loading, loaded) claimed with one compare-and-swap, so
//! exactly one thread loads it; a fault on a region another thread is
//! loading is woken by that thread's copy.
//!
//! On any error (a bad checksum, a failed read) loading stops and the
//! userfaultfd is closed, which lets any waiting toucher continue on zero
//! pages; the restore then reports the error and its memory must not be used.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use ferry_ram::uffd::Userfault;
use ferry_ram::{Counters, GuestMemory};

use crate::{FileError, PageSource};

const ABSENT: u8 = 0;
const LOADING: u8 = 1;
const LOADED: u8 = 2;

/// What a lazy restore did, once every region is in place.
#[derive(Clone, Copy, Debug, Default)]
pub struct LazyStats {
    /// Regions loaded because the guest touched them first.
    pub fault_regions: u64,
    /// Regions loaded by the background prefetch.
    pub prefetched_regions: u64,
    /// Longest wait of a fault for its region, in microseconds.
    pub max_fault_us: u64,
}

struct Shared {
    memory: Arc<GuestMemory>,
    source: Arc<dyn PageSource>,
    /// The source's unit of loading, in bytes (a region).
    unit: u64,
    /// The source's name, as errors give it.
    path: PathBuf,
    /// Closed (dropped) on error or when every region is loaded.
    uffd: Mutex<Option<Arc<Userfault>>>,
    /// Per block, per region: ABSENT, LOADING or LOADED.
    states: Vec<Vec<AtomicU8>>,
    /// Next region (global number) for the prefetchers.
    next: AtomicU64,
    /// First global region number of each block.
    starts: Vec<u64>,
    loaded: AtomicU64,
    regions: u64,
    stop: AtomicBool,
    error: Mutex<Option<FileError>>,
    counters: Arc<Counters>,
    fault_regions: AtomicU64,
    prefetched_regions: AtomicU64,
    max_fault_us: AtomicU64,
}

/// A running lazy restore.
pub struct LazyRestore {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl LazyRestore {
    /// Creates the guest's memory (anonymous, every page missing, shaped
    /// as `source`'s blocks), registers it, and starts one fault thread and
    /// `prefetchers` prefetch threads, all reading through `source`. The
    /// memory may be used as soon as this returns.
    pub fn start(
        source: Arc<dyn PageSource>,
        prefetchers: u16,
        counters: Arc<Counters>,
    ) -> Result<Self, FileError> {
        let path = PathBuf::from(source.name());
        let specs = source.blocks();
        let unit = source.unit();
        let uffd_err = |what: &'static str| {
            let path = path.clone();
            move |source| FileError::Io {
                path,
                block: "-".into(),
                offset: 0,
                what,
                source,
            }
        };
        let max_page = specs.iter().map(|b| u64::from(b.page_size)).max();
        if !unit.is_power_of_two() || max_page.is_some_and(|p| p > unit) {
            return Err(FileError::Mismatch {
                path,
                what: format!("a unit of {unit} bytes, not a power of two as large as every page"),
            });
        }
        let memory = Arc::new(GuestMemory::anonymous(&specs)?);
        let uffd = Userfault::open().map_err(uffd_err("opening a userfaultfd"))?;
        for b in memory.blocks() {
            uffd.register(b.host_addr(), b.len())
                .map_err(uffd_err("registering memory with userfaultfd"))?;
        }
        let mut starts = vec![0];
        let mut states = Vec::new();
        for b in &specs {
            let n = b.len.div_ceil(unit);
            starts.push(starts.last().expect("starts with 0") + n);
            states.push((0..n).map(|_| AtomicU8::new(ABSENT)).collect());
        }
        let regions = *starts.last().expect("starts with 0");
        let shared = Arc::new(Shared {
            memory,
            source,
            unit,
            path,
            uffd: Mutex::new(Some(Arc::new(uffd))),
            states,
            next: AtomicU64::new(0),
            starts,
            loaded: AtomicU64::new(0),
            regions,
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
            counters,
            fault_regions: AtomicU64::new(0),
            prefetched_regions: AtomicU64::new(0),
            max_fault_us: AtomicU64::new(0),
        });
        let mut lazy = Self {
            shared: shared.clone(),
            threads: Vec::new(),
        };
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map_err(|e| FileError::Stopped(format!("cannot start a lazy-restore thread: {e}")))
        };
        let s = shared.clone();
        lazy.threads.push(spawn(
            "ferry-faults".into(),
            Box::new(move || fault_thread(&s)),
        )?);
        for i in 0..prefetchers.max(1) {
            let s = shared.clone();
            lazy.threads.push(spawn(
                format!("ferry-prefetch-{i}"),
                Box::new(move || prefetch_thread(&s)),
            )?);
        }
        Ok(lazy)
    }

    /// The guest's memory: usable now; a page not yet loaded is loaded on touch.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.shared.memory
    }

    /// Regions in place so far, and in all.
    pub fn progress(&self) -> (u64, u64) {
        (
            self.shared.loaded.load(Ordering::Relaxed),
            self.shared.regions,
        )
    }

    /// Waits until every region is loaded (or loading failed), then
    /// unregisters the memory.
    pub fn finish(mut self) -> Result<LazyStats, FileError> {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let s = &self.shared;
        close_uffd(s);
        if let Some(e) = s.error.lock().expect("error lock").take() {
            return Err(e);
        }
        Ok(LazyStats {
            fault_regions: s.fault_regions.load(Ordering::Relaxed),
            prefetched_regions: s.prefetched_regions.load(Ordering::Relaxed),
            max_fault_us: s.max_fault_us.load(Ordering::Relaxed),
        })
    }
}

impl Drop for LazyRestore {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        close_uffd(&self.shared);
    }
}

fn close_uffd(s: &Shared) {
    s.uffd.lock().expect("uffd lock").take();
}

fn uffd(s: &Shared) -> Option<Arc<Userfault>> {
    s.uffd.lock().expect("uffd lock").clone()
}

/// Records the first error, stops every thread and lets waiting touchers go.
fn fail(s: &Shared, e: FileError) {
    let mut slot = s.error.lock().expect("error lock");
    if slot.is_none() {
        *slot = Some(e);
    }
    drop(slot);
    s.stop.store(true, Ordering::Relaxed);
    close_uffd(s);
}

fn prefetch_thread(s: &Shared) {
    let Some(mut staging) = Staging::new(s) else {
        return;
    };
    let staging = staging.bytes();
    while !s.stop.load(Ordering::Relaxed) {
        let n = s.next.fetch_add(1, Ordering::Relaxed);
        let Some(block) = s.starts.partition_point(|&x| x <= n).checked_sub(1) else {
            break;
        };
        if block + 1 >= s.starts.len() {
            break;
        }
        let region = n - s.starts[block];
        if claim(s, block, region) {
            match load_region(s, block, region, staging) {
                Ok(()) => {
                    s.prefetched_regions.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => fail(s, e),
            }
        }
    }
}

fn fault_thread(s: &Shared) {
    let Some(mut staging) = Staging::new(s) else {
        return;
    };
    let staging = staging.bytes();
    let mut faults = Vec::new();
    while !s.stop.load(Ordering::Relaxed) {
        let Some(u) = uffd(s) else { break };
        if let Err(e) = u.faults(20, &mut faults) {
            fail(
                s,
                FileError::Io {
                    path: s.path.clone(),
                    block: "-".into(),
                    offset: 0,
                    what: "reading userfaultfd messages",
                    source: e,
                },
            );
            break;
        }
        for &addr in &faults {
            let t = Instant::now();
            if let Err(e) = serve_fault(s, &u, addr, staging) {
                fail(s, e);
                break;
            }
            let us = t.elapsed().as_micros() as u64;
            s.max_fault_us.fetch_max(us, Ordering::Relaxed);
        }
    }
}

/// Loads the region holding `addr` unless another thread is, or has.
fn serve_fault(s: &Shared, u: &Userfault, addr: u64, staging: &mut [u8]) -> Result<(), FileError> {
    let Some((block, region)) = region_of(s, addr) else {
        return Err(FileError::Stopped(format!(
            "userfaultfd reported a fault at {addr:#x}, outside guest memory"
        )));
    };
    if claim(s, block, region) {
        load_region(s, block, region, staging)?;
        s.fault_regions.fetch_add(1, Ordering::Relaxed);
    } else if s.states[block][region as usize].load(Ordering::Acquire) == LOADED {
        // Filled just before the fault was queued: make sure the toucher runs.
        let b = &s.memory.blocks()[block];
        let page = (addr & !(u64::from(b.page_size()) - 1)) as *mut u8;
        let _ = u.wake(page, u64::from(b.page_size()));
    }
    // LOADING: the loader's copy wakes the toucher.
    Ok(())
}

/// A thread's region-sized buffer, page aligned (for O_DIRECT reads).
struct Staging(ferry_ram::RamBlock);

impl Staging {
    fn new(s: &Shared) -> Option<Self> {
        match ferry_ram::RamBlock::anonymous("staging", s.unit, 4096) {
            Ok(b) => Some(Self(b)),
            Err(e) => {
                fail(s, e.into());
                None
            }
        }
    }
    /// The buffer as plain bytes: it is this thread's alone (never guest
    /// memory, never shared), so a `&mut [u8]` over it is sound.
    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is len bytes, writable, private to this
        // Staging (created here, its address never handed out except as
        // this borrow, which `&mut self` makes unique) and lives as long
        // as it.
        unsafe { std::slice::from_raw_parts_mut(self.0.host_addr(), self.0.len() as usize) }
    }
}

fn region_of(s: &Shared, addr: u64) -> Option<(usize, u64)> {
    s.memory.blocks().iter().enumerate().find_map(|(i, b)| {
        let start = b.host_addr() as u64;
        (addr >= start && addr < start + b.len()).then(|| (i, (addr - start) / s.unit))
    })
}

fn claim(s: &Shared, block: usize, region: u64) -> bool {
    s.states[block][region as usize]
        .compare_exchange(ABSENT, LOADING, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// Has the source fill region `region` of `block` into `staging` (checked)
/// and places it in guest memory in one copy.
fn load_region(s: &Shared, block: usize, region: u64, staging: &mut [u8]) -> Result<(), FileError> {
    let b = &s.memory.blocks()[block];
    let ps = u64::from(b.page_size());
    let per = s.unit / ps;
    let first = region * per;
    let pages = per.min(b.pages() - first);
    let len = (pages * ps) as usize;
    let buf = &mut staging[..len];
    let filled = s.source.fill(block, first, pages, buf)?;
    s.counters
        .wire_bytes
        .fetch_add(filled.bytes_read, Ordering::Relaxed);
    let Some(u) = uffd(s) else {
        return Err(FileError::Stopped("lazy restore stopped".into()));
    };
    let dst = b.page_addr(first).expect("region starts inside its block");
    let placed = if filled.zeros {
        u.zero(dst, len as u64)
    } else {
        // SAFETY: dst..dst+len is the region's memory inside a registered
        // block, missing until this copy (we hold the region's LOADING
        // claim), so the kernel's atomic copy is its only writer; buf is
        // len bytes of this thread's private staging buffer.
        unsafe { u.copy(dst, buf.as_ptr(), len as u64) }
    };
    placed.map_err(|source| FileError::Io {
        path: s.path.clone(),
        block: b.name().into(),
        offset: first * ps,
        what: "placing a region with userfaultfd",
        source,
    })?;
    s.states[block][region as usize].store(LOADED, Ordering::Release);
    s.counters
        .pages_normal
        .fetch_add(filled.present, Ordering::Relaxed);
    s.counters
        .pages_zero
        .fetch_add(pages - filled.present, Ordering::Relaxed);
    s.counters
        .ram_bytes
        .fetch_add(len as u64, Ordering::Relaxed);
    if s.loaded.fetch_add(1, Ordering::AcqRel) + 1 == s.regions {
        s.stop.store(true, Ordering::Relaxed);
    }
    Ok(())
}
