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
//! The C headers here predate PAGEMAP_SCAN and libc has no userfaultfd
//! types, so the structures and numbers below are transcribed from the
//! kernel's uapi `linux/userfaultfd.h` and `linux/fs.h`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use crate::uffd::{Userfault, UFFDIO_REGISTER_MODE_WP};
use crate::{DirtyLog, GuestMemory, PageBitmap, RamError};

// linux/userfaultfd.h (opening and registering live in `crate::uffd`)
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// _IOWR(0xAA, 0x06, struct uffdio_writeprotect)
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xC018_AA06;

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

// linux/fs.h
const PAGE_IS_WRITTEN: u64 = 1 << 1;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// _IOWR('f', 16, struct pm_scan_arg)
const PAGEMAP_SCAN: libc::c_ulong = 0xC060_6610;

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// Regions one scan call may return before it is called again.
const REGIONS_PER_SCAN: usize = 4096;

/// A block's address range as the kernel sees it.
struct Range {
    name: String,
    start: u64,
    len: u64,
    page_size: u64,
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
        let ranges: Vec<Range> = memory
            .blocks()
            .iter()
            .map(|b| Range {
                name: b.name().into(),
                start: b.host_addr() as u64,
                len: b.len(),
                page_size: u64::from(b.page_size()),
            })
            .collect();
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
        let mut arg = scan_arg(r.start, r.start + r.page_size, 0, &mut regions);
        // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len`
        // regions into the vector it points to, which we hold locked.
        if unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) } < 0 {
            return Err(unsupported(
                "the kernel lacks the PAGEMAP_SCAN ioctl (Linux 6.7 or newer is needed)",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Scans block `r` for written pages, protects them again and sets
    /// them in `into`. Returns how many pages were written.
    fn scan_block(&self, r: &Range, into: &PageBitmap) -> Result<u64, RamError> {
        let mut regions = self.regions.lock().unwrap();
        let end = r.start + r.len;
        let mut at = r.start;
        let mut dirty = 0;
        while at < end {
            let mut arg = scan_arg(
                at,
                end,
                PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                &mut regions,
            );
            // SAFETY: as in probe_scan; the range lies inside a registered
            // block mapping.
            let n = unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
            if n < 0 {
                return Err(self.error(r, "PAGEMAP_SCAN"));
            }
            for reg in &regions[..(n as usize).min(REGIONS_PER_SCAN)] {
                let (first, last) = (reg.start.max(r.start), reg.end.min(end));
                if first >= last {
                    continue;
                }
                let p0 = (first - r.start) / r.page_size;
                let p1 = (last - r.start).div_ceil(r.page_size);
                into.set_range(p0, p1);
                dirty += p1 - p0;
            }
            if arg.walk_end <= at {
                return Err(RamError::DirtyLog {
                    tracker: "uffd",
                    block: r.name.clone(),
                    what: format!("PAGEMAP_SCAN made no progress at {:#x}", at - r.start),
                    source: std::io::Error::other("scan stalled"),
                });
            }
            at = arg.walk_end;
        }
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

fn scan_arg(start: u64, end: u64, flags: u64, regions: &mut [PageRegion]) -> PmScanArg {
    PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        flags,
        start,
        end,
        vec: regions.as_mut_ptr() as u64,
        vec_len: regions.len() as u64,
        category_mask: PAGE_IS_WRITTEN,
        return_mask: PAGE_IS_WRITTEN,
        ..Default::default()
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
}
