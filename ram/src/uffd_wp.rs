//! The kernel dirty log: userfaultfd write-protect in async mode, read back
//! and re-armed with the PAGEMAP_SCAN ioctl (Linux 6.7 or newer).
//!
//! Every block is registered with a userfaultfd in write-protect mode with
//! `UFFD_FEATURE_WP_ASYNC`: a write to a protected page is resolved by the
//! kernel itself (no fault message, no handler thread) by lifting the
//! protection, which PAGEMAP_SCAN reports as `PAGE_IS_WRITTEN`. A sync scans
//! each block for written pages with `PM_SCAN_WP_MATCHING`, which protects
//! them again in the same walk, so a write after the scan is caught by the
//! next one. The writer needs no hooks at all.
//!
//! libc has no userfaultfd types, so the structures and numbers below are
//! transcribed from the kernel's uapi `linux/userfaultfd.h`; PAGEMAP_SCAN's
//! are in `pagemap.rs`.

use std::fs::File;
use std::sync::Mutex;

use crate::pagemap::{
    self, PageRegion, Query, ScanError, PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC,
    PM_SCAN_WP_MATCHING, REGIONS_PER_SCAN,
};
use crate::uffd::{iowr, UffdioRange, Userfault, UFFDIO_REGISTER_MODE_WP};
use crate::{DirtyLog, GuestMemory, PageBitmap, RamError};

// linux/userfaultfd.h (opening and registering live in `crate::uffd`)
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFDIO_WRITEPROTECT: u64 = iowr(0x06, std::mem::size_of::<UffdioWriteprotect>());
// The value linux/userfaultfd.h gives it.
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xC018_AA06);

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// A block's address range as the kernel sees it.
struct Range {
    name: String,
    start: u64,
    len: u64,
    page_size: u64,
}

impl Range {
    /// The ranges of every block of `memory`.
    fn of(memory: &GuestMemory) -> Vec<Range> {
        memory
            .blocks()
            .iter()
            .map(|b| Range {
                name: b.name().into(),
                start: b.host_addr() as u64,
                len: b.len(),
                page_size: u64::from(b.page_size()),
            })
            .collect()
    }
}

pub struct UffdLog {
    uffd: Userfault,
    pagemap: File,
    ranges: Vec<Range>,
    regions: Mutex<Vec<PageRegion>>,
}

impl UffdLog {
    /// Opens a userfaultfd with async write-protect and registers every
    /// block of `memory` with it. A clear error where the kernel lacks
    /// userfaultfd, async write-protect or PAGEMAP_SCAN.
    pub fn new(memory: &GuestMemory) -> Result<Self, RamError> {
        let uffd =
            Userfault::open_with_features(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED)
                .map_err(|e| {
                    unsupported(
                "cannot open a userfaultfd with UFFD_FEATURE_WP_ASYNC (Linux 6.7 or newer is \
                 needed; an unprivileged process also needs vm.unprivileged_userfaultfd = 1)",
                e,
            )
                })?;
        let pagemap = File::open("/proc/self/pagemap").map_err(|e| RamError::DirtyLog {
            tracker: "uffd",
            block: String::new(),
            what: "opening /proc/self/pagemap".into(),
            source: e,
        })?;
        let ranges = Range::of(memory);
        let log = Self {
            uffd,
            pagemap,
            ranges,
            regions: Mutex::new(vec![PageRegion::default(); REGIONS_PER_SCAN]),
        };
        for r in &log.ranges {
            log.register(r)?;
        }
        log.probe_scan()?;
        Ok(log)
    }

    fn register(&self, r: &Range) -> Result<(), RamError> {
        self.uffd
            .register_mode(r.start, r.len, UFFDIO_REGISTER_MODE_WP)
            .map_err(|_| self.error(r, "registering write-protect mode"))
    }

    /// Protects (`protect`) or unprotects every page of block `r`.
    fn write_protect(&self, r: &Range, protect: bool) -> Result<(), RamError> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange {
                start: r.start,
                len: r.len,
            },
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads the struct we own; the range is
        // a registered block mapping.
        if unsafe { libc::ioctl(self.uffd.raw_fd(), UFFDIO_WRITEPROTECT, &mut wp) } != 0 {
            return Err(self.error(r, "UFFDIO_WRITEPROTECT"));
        }
        Ok(())
    }

    /// A read-only scan of the first page, so a kernel without
    /// PAGEMAP_SCAN is refused here and not in the middle of a migration.
    fn probe_scan(&self) -> Result<(), RamError> {
        let Some(r) = self.ranges.first() else {
            return Ok(());
        };
        let mut regions = self.regions.lock().unwrap();
        pagemap::scan(
            &self.pagemap,
            r.start,
            r.start + r.page_size,
            written(0),
            &mut regions,
            |_| (),
        )
        .map_err(|e| {
            let source = match e {
                ScanError::Ioctl { source, .. } => source,
                ScanError::Stalled { .. } => std::io::Error::other("scan stalled"),
            };
            unsupported(
                "the kernel lacks the PAGEMAP_SCAN ioctl (Linux 6.7 or newer is needed)",
                source,
            )
        })
    }

    /// Scans block `r` for written pages, protects them again and sets
    /// them in `into`. Returns how many pages were written.
    fn scan_block(&self, r: &Range, into: &PageBitmap) -> Result<u64, RamError> {
        let mut regions = self.regions.lock().unwrap();
        let end = r.start + r.len;
        let mut dirty = 0;
        pagemap::scan(
            &self.pagemap,
            r.start,
            end,
            written(PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC),
            &mut regions,
            |reg| {
                let (first, last) = (reg.start.max(r.start), reg.end.min(end));
                if first < last {
                    let p0 = (first - r.start) / r.page_size;
                    let p1 = (last - r.start).div_ceil(r.page_size);
                    into.set_range(p0, p1);
                    dirty += p1 - p0;
                }
            },
        )
        .map_err(|e| {
            let (what, source) = match e {
                ScanError::Ioctl { source, .. } => ("PAGEMAP_SCAN".into(), source),
                ScanError::Stalled { at } => (
                    format!("PAGEMAP_SCAN made no progress at {:#x}", at - r.start),
                    std::io::Error::other("scan stalled"),
                ),
            };
            RamError::DirtyLog {
                tracker: "uffd",
                block: r.name.clone(),
                what,
                source,
            }
        })?;
        Ok(dirty)
    }

    fn error(&self, r: &Range, what: &str) -> RamError {
        RamError::DirtyLog {
            tracker: "uffd",
            block: r.name.clone(),
            what: what.into(),
            source: std::io::Error::last_os_error(),
        }
    }
}

impl DirtyLog for UffdLog {
    fn name(&self) -> &'static str {
        "uffd"
    }

    fn start(&self) -> Result<(), RamError> {
        for r in &self.ranges {
            self.write_protect(r, true)?;
        }
        Ok(())
    }

    fn sync(&self, into: &[PageBitmap]) -> Result<u64, RamError> {
        let mut dirty = 0;
        for (r, bits) in self.ranges.iter().zip(into) {
            dirty += self.scan_block(r, bits)?;
        }
        Ok(dirty)
    }

    fn stop(&self) -> Result<(), RamError> {
        for r in &self.ranges {
            self.write_protect(r, false)?;
        }
        Ok(())
    }

    fn mark(&self, _block: usize, _page: u64) {}
}

/// The written pages (`flags` as `PM_SCAN_*`).
fn written(flags: u64) -> Query {
    Query {
        flags,
        all: PAGE_IS_WRITTEN,
        any: 0,
        report: PAGE_IS_WRITTEN,
    }
}

fn unsupported(what: &str, source: std::io::Error) -> RamError {
    RamError::DirtyLog {
        tracker: "uffd",
        block: String::new(),
        what: what.into(),
        source,
    }
}

/// Write-protect in synchronous mode, for a background snapshot (seed 004's
/// `bg_migration`): every block is registered with a userfaultfd in
/// write-protect mode (with `UFFD_FEATURE_WP_UNPOPULATED`, so pages never
/// touched are protected too), [`WriteProtect::protect_all`] arms it, and
/// from then on a write to a protected page stops the writing thread and
/// sends a fault message; the writer goes on only once the handler lifts
/// the protection of that page ([`WriteProtect::unprotect`], which wakes it).
/// Dropping it closes the descriptor, which lifts any protection left and
/// wakes every waiter.
pub struct WriteProtect {
    uffd: Userfault,
    ranges: Vec<Range>,
}

impl WriteProtect {
    /// Opens the userfaultfd and registers every block of `memory`. A
    /// clear error where the kernel lacks write-protect of unpopulated
    /// pages (Linux 6.4) or the range is registered elsewhere (a
    /// `uffd` dirty log).
    pub fn new(memory: &GuestMemory) -> Result<Self, RamError> {
        let uffd = Userfault::open_with_features(UFFD_FEATURE_WP_UNPOPULATED).map_err(|e| {
            unsupported(
                "cannot open a userfaultfd with UFFD_FEATURE_WP_UNPOPULATED (Linux 6.4 or newer \
                 is needed; an unprivileged process also needs vm.unprivileged_userfaultfd = 1)",
                e,
            )
        })?;
        let ranges = Range::of(memory);
        for r in &ranges {
            uffd.register_mode(r.start, r.len, UFFDIO_REGISTER_MODE_WP)
                .map_err(|source| RamError::DirtyLog {
                    tracker: "write-protect",
                    block: r.name.clone(),
                    what: match source.raw_os_error() {
                        Some(libc::EBUSY) => {
                            "registering write-protect mode: another userfaultfd tracks this \
                             memory (a uffd dirty log?)"
                        }
                        Some(libc::EINVAL) => {
                            "registering write-protect mode: this kind of mapping cannot be \
                             write-protected (a read-only or file-backed block?)"
                        }
                        _ => "registering write-protect mode",
                    }
                    .into(),
                    source,
                })?;
        }
        Ok(Self { uffd, ranges })
    }

    /// Protects every page of every block.
    pub fn protect_all(&self) -> Result<(), RamError> {
        for i in 0..self.ranges.len() {
            let r = &self.ranges[i];
            self.change(i, 0, r.len, true)?;
        }
        Ok(())
    }

    /// Protects `[offset, offset + len)` of block `block` (page aligned,
    /// inside the block).
    pub fn protect(&self, block: usize, offset: u64, len: u64) -> Result<(), RamError> {
        self.change(block, offset, len, true)
    }

    /// Lifts the protection of `[offset, offset + len)` of block `block`
    /// (page aligned, inside the block) and wakes threads waiting there.
    pub fn unprotect(&self, block: usize, offset: u64, len: u64) -> Result<(), RamError> {
        self.change(block, offset, len, false)
    }

    /// Wakes threads waiting on faults in `[offset, offset + len)` of block
    /// `block` (whose protection someone else lifted).
    pub fn wake(&self, block: usize, offset: u64, len: u64) -> Result<(), RamError> {
        let r = self.range(block, offset, len)?;
        self.uffd
            .wake(r.start as *mut u8, r.len)
            .map_err(|source| self.error_at(block, "UFFDIO_WAKE", source))
    }

    /// Waits up to `timeout_ms` for write faults; their addresses.
    pub fn faults(&self, timeout_ms: i32, out: &mut Vec<u64>) -> Result<(), RamError> {
        self.uffd
            .faults(timeout_ms, out)
            .map_err(|source| RamError::DirtyLog {
                tracker: "write-protect",
                block: String::new(),
                what: "reading fault messages".into(),
                source,
            })
    }

    /// The block and byte offset in it of host address `addr`, if any.
    pub fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        self.ranges
            .iter()
            .position(|r| addr >= r.start && addr - r.start < r.len)
            .map(|i| (i, addr - self.ranges[i].start))
    }

    fn range(&self, block: usize, offset: u64, len: u64) -> Result<UffdioRange, RamError> {
        let r = self.ranges.get(block).ok_or_else(|| RamError::DirtyLog {
            tracker: "write-protect",
            block: format!("#{block}"),
            what: "no such block".into(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        let aligned = offset.is_multiple_of(r.page_size) && len.is_multiple_of(r.page_size);
        if !aligned || len == 0 || offset.checked_add(len).is_none_or(|e| e > r.len) {
            return Err(RamError::DirtyLog {
                tracker: "write-protect",
                block: r.name.clone(),
                what: format!("range {offset:#x}+{len:#x} is not whole pages of the block"),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        }
        Ok(UffdioRange {
            start: r.start + offset,
            len,
        })
    }

    fn change(&self, block: usize, offset: u64, len: u64, protect: bool) -> Result<(), RamError> {
        let mut wp = UffdioWriteprotect {
            range: self.range(block, offset, len)?,
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads the struct we own; the range was
        // checked to lie inside a registered block mapping.
        if unsafe { libc::ioctl(self.uffd.raw_fd(), UFFDIO_WRITEPROTECT, &mut wp) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(self.error_at(block, "UFFDIO_WRITEPROTECT", e));
        }
        Ok(())
    }

    fn error_at(&self, block: usize, what: &str, source: std::io::Error) -> RamError {
        RamError::DirtyLog {
            tracker: "write-protect",
            block: self
                .ranges
                .get(block)
                .map_or_else(String::new, |r| r.name.clone()),
            what: what.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BlockSpec;

    #[test]
    fn written_pages_are_reported_once_and_rearmed() {
        let mem = GuestMemory::anonymous_base_pages(&[BlockSpec {
            name: "ram".into(),
            len: 4 << 20,
            page_size: 4096,
        }])
        .unwrap();
        let log = UffdLog::new(&mem).expect("this kernel supports uffd async write-protect");
        log.start().unwrap();
        let block = &mem.blocks()[0];
        let written = [0u64, 1, 77, 512, 1023];
        for &p in &written {
            // SAFETY: page p is inside the writable block.
            unsafe { *block.page_addr(p).unwrap() = 1 };
        }
        let pass = vec![PageBitmap::new(block.pages(), false)];
        assert_eq!(log.sync(&pass).unwrap(), written.len() as u64);
        assert_eq!(pass[0].iter_set().collect::<Vec<_>>(), written);
        let again = vec![PageBitmap::new(block.pages(), false)];
        assert_eq!(log.sync(&again).unwrap(), 0, "the scan re-armed them");
        // SAFETY: as above.
        unsafe { *block.page_addr(77).unwrap() = 2 };
        assert_eq!(log.sync(&again).unwrap(), 1);
        assert!(again[0].test(77));
        log.stop().unwrap();
        // SAFETY: as above.
        unsafe { *block.page_addr(5).unwrap() = 2 };
    }

    #[test]
    fn a_write_to_a_protected_page_waits_for_the_handler() {
        let mem = GuestMemory::anonymous_base_pages(&[BlockSpec {
            name: "ram".into(),
            len: 1 << 20,
            page_size: 4096,
        }])
        .unwrap();
        let wp = WriteProtect::new(&mem).expect("this kernel supports sync write-protect");
        wp.protect_all().unwrap();
        let addr = mem.blocks()[0].host_addr() as usize;
        let writer = std::thread::spawn(move || {
            // SAFETY: page 3 of the block, which outlives this thread (joined below).
            unsafe { std::ptr::write_volatile((addr + 3 * 4096 + 8) as *mut u8, 9) }
        });
        let mut faults = Vec::new();
        while faults.is_empty() {
            wp.faults(1000, &mut faults).unwrap();
        }
        let (block, offset) = wp.locate(faults[0]).unwrap();
        assert_eq!((block, offset & !4095), (0, 3 * 4096));
        let byte_8_of_page_3 = || {
            use vm_memory::Bytes;
            let page = mem.blocks()[0].page_slice(3).unwrap();
            page.read_obj::<u8>(8).unwrap()
        };
        assert_eq!(byte_8_of_page_3(), 0, "the write waits");
        wp.unprotect(0, 3 * 4096, 4096).unwrap();
        writer.join().unwrap();
        assert_eq!(byte_8_of_page_3(), 9);
    }
}
