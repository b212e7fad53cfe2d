//! The PAGEMAP_SCAN ioctl on `/proc/self/pagemap` (Linux 6.7 or newer):
//! the page-table facts of an address range in one walk, returned as
//! regions of pages alike. Two users: the uffd dirty log (written pages,
//! protected again in the same walk, `uffd_wp.rs`) and
//! [`crate::RamBlock::data_pages`] (which pages of anonymous memory may
//! hold data, so a full pass reads only those).
//!
//! The C headers here predate PAGEMAP_SCAN, so the structures and numbers
//! below are transcribed from the kernel's uapi `linux/fs.h`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::PageBitmap;

// Page categories (linux/fs.h).
pub(crate) const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub(crate) const PAGE_IS_PRESENT: u64 = 1 << 3;
pub(crate) const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub(crate) const PAGE_IS_PFNZERO: u64 = 1 << 5;

// Scan flags (linux/fs.h).
pub(crate) const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
pub(crate) const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// _IOWR('f', 16, struct pm_scan_arg)
const PAGEMAP_SCAN: libc::c_ulong = 0xC060_6610;

/// `struct pm_scan_arg`: every field a u64 (96 bytes).
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

/// `struct page_region`: pages `[start, end)` (addresses) sharing the
/// `categories` asked for in the return mask.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct PageRegion {
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) categories: u64,
}

/// Regions one ioctl may return before it is called again.
pub(crate) const REGIONS_PER_SCAN: usize = 4096;

/// What one walk asks for: the pages matching every category of `all`
/// and (when not 0) one of `any`, with the categories of `report` given
/// back per region; `flags` as `PM_SCAN_*`.
#[derive(Clone, Copy)]
pub(crate) struct Query {
    pub(crate) flags: u64,
    pub(crate) all: u64,
    pub(crate) any: u64,
    pub(crate) report: u64,
}

/// Why a walk stopped.
#[derive(Debug)]
pub(crate) enum ScanError {
    /// The ioctl failed (`ENOTTY`: the kernel lacks it).
    Ioctl { source: io::Error },
    /// The kernel returned without moving past this address.
    Stalled { at: u64 },
}

/// Walks `[start, end)` with `query`, handing each matching region to
/// `each`. `regions` is the scratch the kernel fills (its length is how
/// many one call may return).
pub(crate) fn scan(
    pagemap: &File,
    start: u64,
    end: u64,
    query: Query,
    regions: &mut [PageRegion],
    mut each: impl FnMut(&PageRegion),
) -> Result<(), ScanError> {
    let mut at = start;
    while at < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: query.flags,
            start: at,
            end,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            category_mask: query.all,
            category_anyof_mask: query.any,
            return_mask: query.report,
            ..Default::default()
        };
        // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len`
        // regions into `regions`, which this function borrows mutably for
        // the call; the range is only walked, never dereferenced by us.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
        if n < 0 {
            return Err(ScanError::Ioctl {
                source: io::Error::last_os_error(),
            });
        }
        regions[..(n as usize).min(regions.len())]
            .iter()
            .for_each(&mut each);
        if arg.walk_end <= at {
            return Err(ScanError::Stalled { at });
        }
        at = arg.walk_end;
    }
    Ok(())
}

/// The pages of `[start, start + pages * page_size)` that may hold data,
/// for anonymous private memory: those present in the page tables (except
/// where the kernel's shared zero page is mapped) or swapped out. A page
/// that is neither was never written since it was mapped or discarded, and
/// reads as zeros. `None` where the kernel cannot answer (no PAGEMAP_SCAN
/// before Linux 6.7, or no /proc).
pub(crate) fn data_pages(start: u64, pages: u64, page_size: u64) -> Option<PageBitmap> {
    entries(start, pages, page_size, false)
}

/// The pages of `[start, start + pages * page_size)` with an entry in the
/// page tables: present (the kernel's shared zero page included) or
/// swapped out. `None` as for [`data_pages`].
pub(crate) fn mapped_pages(start: u64, pages: u64, page_size: u64) -> Option<PageBitmap> {
    entries(start, pages, page_size, true)
}

/// [`data_pages`] (`zero_page` false) or [`mapped_pages`] (true).
fn entries(start: u64, pages: u64, page_size: u64, zero_page: bool) -> Option<PageBitmap> {
    let pagemap = File::open("/proc/self/pagemap").ok()?;
    let bits = PageBitmap::new(pages, false);
    let end = start + pages * page_size;
    let query = Query {
        flags: 0,
        all: 0,
        any: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        report: PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO,
    };
    let mut regions = vec![PageRegion::default(); REGIONS_PER_SCAN];
    scan(&pagemap, start, end, query, &mut regions, |r| {
        let on_zero_page =
            r.categories & PAGE_IS_PFNZERO != 0 && r.categories & PAGE_IS_SWAPPED == 0;
        let (first, last) = (r.start.max(start), r.end.min(end));
        if (zero_page || !on_zero_page) && first < last {
            bits.set_range(
                (first - start) / page_size,
                (last - start).div_ceil(page_size),
            );
        }
    })
    .ok()?;
    Some(bits)
}
