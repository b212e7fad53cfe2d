//! Saving: writes a guest's non-zero pages at their places in the file
//! ([`write_pages`], a whole pass) or rewrites the pages a dirty log
//! reports ([`rewrite_pages`], a later pass of a live save), and hands
//! back what the tables need ([`WrittenPages`]: bitmaps and checksums),
//! which [`WrittenPages::write_metadata`] puts in the file last.
//!
//! Each region is scanned for zero pages in place (atomic loads: the guest
//! may be running), checksummed from private copies of its bytes, and its
//! runs of non-zero pages are written by the kernel straight from guest
//! memory (io_uring writes from raw addresses). Zero pages are never
//! written: they stay holes, unless `hole_min` asks for larger writes.

use std::fs::File;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use ferry_ram::mapped::{write_metadata, FileLayout};
use ferry_ram::{is_zero, Counters, GuestMemory, PageBitmap};
use ferry_transport::uring::Ring;

use crate::data::{DataFile, FileOptions};
use crate::engine::{
    check_memory_matches, count_pages, guest_checksum, push_page, region_pages, ring_err,
    run_threads, shared_words, unshare, Direction, Op, RegionScan, Run, Target,
};
use crate::FileError;

/// What a save found while writing pages, per block in block order.
pub struct WrittenPages {
    /// Per block, bit i set: page i was written (it is not all zeros).
    pub bitmaps: Vec<PageBitmap>,
    /// Per block, one checksum per region of memory.
    pub checksums: Vec<Vec<u64>>,
}

impl WrittenPages {
    /// Writes the file's tables for these pages (bitmaps, checksum tables),
    /// the device state and, last, the header marked complete (see
    /// `ferry_ram::mapped::write_metadata`); fills in `layout`'s checksums
    /// and counts of present pages.
    pub fn write_metadata(
        &self,
        file: &File,
        path: &Path,
        layout: &mut FileLayout,
        device_state: &[u8],
    ) -> Result<(), FileError> {
        let words: Vec<Vec<u64>> = self.bitmaps.iter().map(PageBitmap::to_words).collect();
        write_metadata(file, path, layout, &words, &self.checksums, device_state)?;
        Ok(())
    }
}

/// Writes every non-zero page of `memory` to its place in `data`, which is
/// laid out as `layout` says, with `opts.channels` threads.
pub fn write_pages(
    memory: &GuestMemory,
    layout: &FileLayout,
    data: &DataFile,
    path: &Path,
    opts: &FileOptions,
    counters: &Counters,
) -> Result<WrittenPages, FileError> {
    check_memory_matches(memory, layout, path)?;
    let save = Save {
        t: Target {
            memory,
            layout,
            path,
            counters,
        },
        bitmaps: empty_bitmaps(layout),
        checksums: shared_words(layout, |b| b.regions(layout.region_size)),
        hole_min: opts.hole_min,
        dirty: None,
    };
    run_threads(&save, layout, data, opts)?;
    Ok(WrittenPages {
        bitmaps: save.bitmaps,
        checksums: unshare(save.checksums),
    })
}

/// One clear bitmap per block of `layout`.
pub(crate) fn empty_bitmaps(layout: &FileLayout) -> Vec<PageBitmap> {
    layout
        .blocks
        .iter()
        .map(|b| PageBitmap::new(b.pages(), false))
        .collect()
}

/// A later pass of a live save: rewrites, in place, the pages set in
/// `dirty` (one bitmap per block, cleared as they are taken) and updates
/// `written` (from the pass before) to match: a dirty page that became zero
/// loses its bit and is overwritten with the zeros it holds (unless its
/// place is a hole already), and every region with a dirty page gets its
/// checksum recomputed. The file's size never changes.
#[allow(clippy::too_many_arguments)]
pub fn rewrite_pages(
    memory: &GuestMemory,
    layout: &FileLayout,
    data: &DataFile,
    path: &Path,
    opts: &FileOptions,
    counters: &Counters,
    written: WrittenPages,
    dirty: &[PageBitmap],
) -> Result<WrittenPages, FileError> {
    check_memory_matches(memory, layout, path)?;
    let fits = |bitmaps: &[PageBitmap]| {
        bitmaps.len() == memory.blocks().len()
            && bitmaps
                .iter()
                .zip(memory.blocks())
                .all(|(d, b)| d.pages() == b.pages())
    };
    let sums_fit = written.checksums.len() == layout.blocks.len()
        && written
            .checksums
            .iter()
            .zip(&layout.blocks)
            .all(|(c, b)| c.len() as u64 == b.regions(layout.region_size));
    if !fits(dirty) || !fits(&written.bitmaps) || !sums_fit {
        return Err(FileError::Mismatch {
            path: path.into(),
            what: "the dirty bitmaps do not match the memory".into(),
        });
    }
    let save = Save {
        t: Target {
            memory,
            layout,
            path,
            counters,
        },
        bitmaps: written.bitmaps,
        checksums: written
            .checksums
            .into_iter()
            .map(|w| w.into_iter().map(AtomicU64::new).collect())
            .collect(),
        hole_min: opts.hole_min,
        dirty: Some(dirty),
    };
    run_threads(&save, layout, data, opts)?;
    Ok(WrittenPages {
        bitmaps: save.bitmaps,
        checksums: unshare(save.checksums),
    })
}

struct Save<'a> {
    t: Target<'a>,
    bitmaps: Vec<PageBitmap>,
    checksums: Vec<Vec<AtomicU64>>,
    hole_min: u64,
    /// A later pass: only these pages (taken out as they are written).
    dirty: Option<&'a [PageBitmap]>,
}

impl Save<'_> {
    /// A later pass's region: its dirty pages only.
    fn prepare_dirty(&self, dirty: &PageBitmap, block: usize, region: u64, runs: &mut Vec<Run>) {
        let b = &self.t.memory.blocks()[block];
        let (first, end) = region_pages(b, self.t.layout.region_size, region);
        let ps = u64::from(b.page_size());
        let max_gap = (self.hole_min / ps).saturating_sub(1);
        let bitmap = &self.bitmaps[block];
        let (mut present, mut zero) = (0u64, 0u64);
        for index in dirty.iter_set_in(first, end) {
            dirty.clear(index);
            if b.page_slice(index).is_none_or(|p| is_zero(&p)) {
                zero += 1;
                // Its place must read as zeros: rewrite it if it held data.
                if bitmap.test_and_clear(index) {
                    push_page(runs, index, 0);
                }
            } else {
                bitmap.set(index);
                push_page(runs, index, max_gap);
                present += 1;
            }
        }
        if present + zero == 0 {
            return;
        }
        if let Some(mem) = b.pages_slice(first, end - first) {
            self.checksums[block][region as usize].store(guest_checksum(&mem), Relaxed);
        }
        count_pages(self.t.counters, present, zero);
        self.t
            .counters
            .ram_bytes
            .fetch_add((present + zero) * ps, Relaxed);
    }
}

impl Direction for Save<'_> {
    const WHAT: &'static str = "writing pages";

    fn counts_whole_regions(&self) -> bool {
        self.dirty.is_none()
    }

    fn prepare(&self, block: usize, region: u64, runs: &mut Vec<Run>) {
        if let Some(dirty) = self.dirty {
            self.prepare_dirty(&dirty[block], block, region, runs);
            return;
        }
        let b = &self.t.memory.blocks()[block];
        let (first, end) = region_pages(b, self.t.layout.region_size, region);
        let ps = b.page_size() as usize;
        let scan = RegionScan {
            first,
            page_size: ps,
            max_gap: (self.hole_min / ps as u64).saturating_sub(1),
        };
        if let Some(mem) = b.pages_slice(first, end - first) {
            self.checksums[block][region as usize].store(guest_checksum(&mem), Relaxed);
        }
        let present = scan.run_block(b, end - first, &self.bitmaps[block], runs);
        count_pages(self.t.counters, present, end - first - present);
    }

    unsafe fn queue(&self, ring: &mut Ring, fd: RawFd, op: &Op, tag: u64) -> Result<(), FileError> {
        // SAFETY: the caller guarantees op lies inside a block of the guest
        // memory, which outlives the threads (run_threads waits for every
        // completion); the kernel only reads it. A page the guest changes
        // while the write is in flight is marked in its dirty log and
        // written again by a later pass (or the guest is paused).
        unsafe { ring.queue_write_at(fd, op.addr, op.len, op.offset, tag) }
            .map_err(|source| ring_err(self.t.path, source))
    }

    fn region_done(&self, _block: usize, _region: u64) -> Result<(), FileError> {
        Ok(())
    }
    fn target(&self) -> &Target<'_> {
        &self.t
    }
}
