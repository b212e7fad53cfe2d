//! File mode: K threads, each with its own io_uring, move a guest's pages
//! between memory and fixed offsets of a saved-guest file (the layout in
//! `ferry_ram::mapped`): page i of a block always lives at
//! `pages_offset + i × page_size`, so threads never coordinate on the file.
//!
//! Work is cut into checksum regions (1 MiB of a block); threads claim them
//! with one atomic add. Saving a region scans it for zero pages (never
//! written: they stay holes), sets the bitmap bits of the others, checksums
//! the region and queues one write per run of non-zero pages, straight from
//! guest memory. Restoring a region queues one read per run of present pages
//! straight into place and, once they have all landed, checks the region's
//! checksum. Many operations are in flight per ring; short transfers are
//! resubmitted for the rest; on any error every thread stops claiming work
//! and waits for what it has in flight before returning.
//!
//! Passes can rewrite pages in place later: a page's place never moves and
//! a region's checksum is recomputed whenever the region is written again.
//!
//! Restoring never touches the memory of an absent page: a region without
//! a present page is checked against the known checksum of zeros, and a
//! region with some is checksummed from the pages its reads filled and the
//! zeros of the rest. [`verify_pages`] checks a file the same way without
//! memory to restore into. A cancel flag ([`FileOptions::cancel`]) stops
//! every thread at its next step.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use ferry_ram::mapped::{
    count_present, open_regular, present_pages, region_checksum, zero_checksum, FileLayout,
    StreamChecksum,
};
use ferry_ram::{is_zero_page, GuestMemory, PageBitmap, RamBlock, RamError, DIGEST_CHUNK};
use ferry_transport::uring::Ring;

use crate::{Counters, MultifdError};

/// How file mode runs.
#[derive(Clone, Debug)]
pub struct FileOptions {
    /// Threads, each with its own ring.
    pub channels: u16,
    /// Open the file with O_DIRECT (falls back to buffered I/O if refused).
    pub direct_io: bool,
    /// Reads or writes in flight per thread.
    pub queue_depth: usize,
    /// Saving: the shortest run of zero pages left as a hole in the file.
    /// Shorter runs between non-zero pages are written (as the zeros they
    /// are) so writes stay large; their bitmap bits stay clear either way.
    /// A page size (or less) leaves every zero page a hole.
    pub hole_min: u64,
    /// Set (from any thread) to stop early: threads claim no more work,
    /// wait for what they have in flight, and the call returns
    /// [`MultifdError::Aborted`] saying it was cancelled.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for FileOptions {
    fn default() -> Self {
        Self {
            channels: 2,
            direct_io: false,
            queue_depth: 64,
            hole_min: 0,
            cancel: None,
        }
    }
}

impl FileOptions {
    /// Whether [`FileOptions::cancel`] is set.
    pub fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|c| c.load(Relaxed))
    }
}

/// The error a cancelled file operation ends with.
pub(crate) fn cancelled(path: &Path) -> MultifdError {
    MultifdError::Aborted(format!("{}: cancelled", path.display()))
}

/// The file descriptor page data moves through.
pub struct DataFile {
    file: File,
    /// O_DIRECT is in effect.
    pub direct: bool,
    /// Why O_DIRECT was asked for and not used.
    pub note: Option<String>,
}

impl DataFile {
    /// Opens `path` (which exists, and must be a regular file) for page
    /// I/O, with O_DIRECT if asked and the file system allows it.
    pub fn open(path: &Path, write: bool, direct: bool) -> Result<Self, MultifdError> {
        let open = |flags: i32| {
            open_regular(
                path,
                File::options().read(true).write(write),
                flags,
                "opening for page I/O",
                "a saved guest is a regular file",
            )
        };
        if !direct {
            return Ok(Self {
                file: open(0)?,
                direct: false,
                note: None,
            });
        }
        match open(libc::O_DIRECT) {
            Ok(file) => Ok(Self {
                file,
                direct: true,
                note: None,
            }),
            Err(RamError::PathIo { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                Ok(Self {
                    file: open(0)?,
                    direct: false,
                    note: Some(format!(
                        "the file system of {} refuses O_DIRECT (tmpfs did before Linux 6.6); used buffered I/O",
                        path.display()
                    )),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

/// What a save found while writing pages, per block in block order.
pub struct WrittenPages {
    /// Bit i set: page i was written (it is not all zeros).
    pub bitmaps: Vec<Vec<u64>>,
    /// One checksum per region of memory.
    pub checksums: Vec<Vec<u64>>,
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
) -> Result<WrittenPages, MultifdError> {
    check_memory_matches(memory, layout, path)?;
    let save = Save {
        t: Target {
            memory,
            layout,
            path,
            counters,
        },
        bitmaps: shared_words(layout, |b| b.bitmap_len() / 8),
        checksums: shared_words(layout, |b| b.regions(layout.region_size)),
        hole_min: opts.hole_min,
        dirty: None,
    };
    run_threads(&save, layout, data, opts)?;
    Ok(WrittenPages {
        bitmaps: unshare(save.bitmaps),
        checksums: unshare(save.checksums),
    })
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
) -> Result<WrittenPages, MultifdError> {
    check_memory_matches(memory, layout, path)?;
    let dirty_fits = dirty.len() == memory.blocks().len()
        && dirty
            .iter()
            .zip(memory.blocks())
            .all(|(d, b)| d.pages() == b.pages());
    if !dirty_fits || written.bitmaps.len() != layout.blocks.len() {
        return Err(MultifdError::Aborted(format!(
            "{}: the dirty bitmaps do not match the memory",
            path.display()
        )));
    }
    let share = |v: Vec<Vec<u64>>| -> Vec<Vec<AtomicU64>> {
        v.into_iter()
            .map(|w| w.into_iter().map(AtomicU64::new).collect())
            .collect()
    };
    let save = Save {
        t: Target {
            memory,
            layout,
            path,
            counters,
        },
        bitmaps: share(written.bitmaps),
        checksums: share(written.checksums),
        hole_min: opts.hole_min,
        dirty: Some(dirty),
    };
    run_threads(&save, layout, data, opts)?;
    Ok(WrittenPages {
        bitmaps: unshare(save.bitmaps),
        checksums: unshare(save.checksums),
    })
}

/// Reads every present page of the file into `memory` (zeroed memory with
/// the file's layout) and checks every region's checksum.
#[allow(clippy::too_many_arguments)]
pub fn read_pages(
    memory: &GuestMemory,
    layout: &FileLayout,
    bitmaps: &[Vec<u64>],
    checksums: &[Vec<u64>],
    data: &DataFile,
    path: &Path,
    opts: &FileOptions,
    counters: &Counters,
) -> Result<(), MultifdError> {
    check_memory_matches(memory, layout, path)?;
    let restore = Restore {
        t: Target {
            memory,
            layout,
            path,
            counters,
        },
        bitmaps,
        checksums,
    };
    run_threads(&restore, layout, data, opts)
}

/// Reads a saved file as restoring would and checks every region's
/// checksum, without memory to restore into: `opts.channels` threads each
/// take a piece of a block at a time (16 MiB, or a region if regions are
/// larger), read its present pages (the same reads a restore makes) into
/// a small buffer and hash them with the zeros of its absent pages into
/// the region checksums and the digest's chunk hashes. A piece without a
/// present page is checked against the checksum of zeros and never read,
/// so time and memory grow with the pages present, not the guest's size.
/// Returns, per block, the xxh3-64 of each `DIGEST_CHUNK` of its memory as
/// restored (for `ferry_ram::Digest::from_chunk_hashes`).
#[allow(clippy::too_many_arguments)]
pub fn verify_pages(
    layout: &FileLayout,
    bitmaps: &[Vec<u64>],
    checksums: &[Vec<u64>],
    data: &DataFile,
    path: &Path,
    opts: &FileOptions,
    counters: &Counters,
) -> Result<Vec<Vec<u64>>, MultifdError> {
    let chunk = DIGEST_CHUNK as u64;
    let v = Verify {
        layout,
        bitmaps,
        checksums,
        data,
        path,
        counters,
        unit: chunk.max(u64::from(layout.region_size)),
        chunks: shared_words(layout, |b| b.len.div_ceil(chunk)),
    };
    let pieces = Regions::of_size(layout, v.unit);
    let abort = AtomicBool::new(false);
    let results: Vec<Result<(), MultifdError>> = std::thread::scope(|s| {
        let (v, pieces, abort) = (&v, &pieces, &abort);
        let handles: Vec<_> = (0..opts.channels.max(1))
            .map(|i| {
                std::thread::Builder::new()
                    .name(format!("ferry-verify-{i}"))
                    .spawn_scoped(s, move || {
                        let r = v.run(pieces, abort, opts);
                        if r.is_err() {
                            abort.store(true, Relaxed);
                        }
                        r
                    })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h.join().unwrap_or_else(|_| {
                    Err(MultifdError::Aborted("a verify thread panicked".into()))
                }),
                Err(e) => {
                    abort.store(true, Relaxed);
                    Err(MultifdError::Aborted(format!(
                        "cannot start a verify thread: {e}"
                    )))
                }
            })
            .collect()
    });
    results.into_iter().find(Result::is_err).unwrap_or(Ok(()))?;
    Ok(unshare(v.chunks))
}

/// Bytes a verify thread reads at once.
const VERIFY_READ: usize = 1 << 20;

struct Verify<'a> {
    layout: &'a FileLayout,
    bitmaps: &'a [Vec<u64>],
    checksums: &'a [Vec<u64>],
    data: &'a DataFile,
    path: &'a Path,
    counters: &'a Counters,
    /// Bytes of a block one thread takes at a time: whole regions and
    /// whole digest chunks.
    unit: u64,
    /// Per block, the hash of each digest chunk.
    chunks: Vec<Vec<AtomicU64>>,
}

/// The region and digest-chunk hashes of one piece of a block, fed in order.
struct Hashing<'v, 'a> {
    v: &'v Verify<'a>,
    block: usize,
    /// Bytes of the block hashed so far.
    pos: u64,
    region: StreamChecksum,
    chunk: StreamChecksum,
}

impl Verify<'_> {
    fn run(
        &self,
        pieces: &Regions,
        abort: &AtomicBool,
        opts: &FileOptions,
    ) -> Result<(), MultifdError> {
        let mut buf = Vec::new();
        let mut runs = Vec::new();
        while !abort.load(Relaxed) {
            if opts.cancelled() {
                return Err(cancelled(self.path));
            }
            let Some(n) = pieces.claim_global() else {
                break;
            };
            let (block, piece) = pieces.locate(n);
            self.piece(block, piece, &mut buf, &mut runs)?;
        }
        Ok(())
    }

    fn piece(
        &self,
        block: usize,
        piece: u64,
        buf: &mut Vec<u8>,
        runs: &mut Vec<Run>,
    ) -> Result<(), MultifdError> {
        let b = &self.layout.blocks[block];
        let ps = u64::from(b.page_size);
        let rs = u64::from(self.layout.region_size);
        let chunk = DIGEST_CHUNK as u64;
        let start = piece * self.unit;
        let end = (start + self.unit).min(b.len);
        let words = &self.bitmaps[block];
        let present = count_present(words, start / ps, end / ps);
        count_pages(self.counters, present, (end - start) / ps - present);
        self.counters.ram_bytes.fetch_add(end - start, Relaxed);
        if present == 0 {
            // Nothing to read: every region and chunk here is zeros.
            for r in start / rs..end.div_ceil(rs) {
                let len = ((r + 1) * rs).min(b.len) - r * rs;
                self.check_region(block, r, zero_checksum(len))?;
            }
            for c in start / chunk..end.div_ceil(chunk) {
                let len = ((c + 1) * chunk).min(b.len) - c * chunk;
                self.chunks[block][c as usize].store(zero_checksum(len), Relaxed);
            }
            return Ok(());
        }
        let mut h = Hashing {
            v: self,
            block,
            pos: start,
            region: StreamChecksum::new(),
            chunk: StreamChecksum::new(),
        };
        if buf.is_empty() {
            buf.resize(VERIFY_READ, 0);
        }
        // Region by region, the reads a restore makes.
        for r in start / rs..end.div_ceil(rs) {
            let (first, last) = (r * rs / ps, (((r + 1) * rs).min(b.len)) / ps);
            runs.clear();
            read_runs(words, first, last, b.page_size, runs);
            let mut at = first;
            for run in runs.iter() {
                h.put(None, (run.first_page - at) * ps)?;
                let mut offset = run.first_page * ps;
                let stop = (run.first_page + run.pages) * ps;
                while offset < stop {
                    let n = (stop - offset).min(buf.len() as u64) as usize;
                    let file_offset = b.pages_offset + offset;
                    self.data
                        .file()
                        .read_exact_at(&mut buf[..n], file_offset)
                        .map_err(|source| MultifdError::FileIo {
                            path: self.path.into(),
                            block: b.name.clone(),
                            offset: file_offset,
                            what: "reading pages",
                            source,
                        })?;
                    self.counters.wire_bytes.fetch_add(n as u64, Relaxed);
                    h.put(Some(&buf[..n]), n as u64)?;
                    offset += n as u64;
                }
                at = run.first_page + run.pages;
            }
            h.put(None, (last - at) * ps)?;
        }
        Ok(())
    }

    fn check_region(&self, block: usize, region: u64, sum: u64) -> Result<(), MultifdError> {
        if sum == self.checksums[block][region as usize] {
            return Ok(());
        }
        let b = &self.layout.blocks[block];
        let rs = u64::from(self.layout.region_size);
        let offset = region * rs;
        Err(MultifdError::FileChecksum {
            path: self.path.into(),
            block: b.name.clone(),
            offset,
            len: (offset + rs).min(b.len) - offset,
            file_offset: b.pages_offset + offset,
        })
    }
}

impl Hashing<'_, '_> {
    /// Adds `n` bytes: `bytes` (n long), or zeros; closes each region and
    /// chunk as its last byte comes in.
    fn put(&mut self, bytes: Option<&[u8]>, n: u64) -> Result<(), MultifdError> {
        let rs = u64::from(self.v.layout.region_size);
        let chunk = DIGEST_CHUNK as u64;
        let len = self.v.layout.blocks[self.block].len;
        let mut done = 0u64;
        while done < n {
            let region_end = ((self.pos / rs + 1) * rs).min(len);
            let chunk_end = ((self.pos / chunk + 1) * chunk).min(len);
            let take = (n - done)
                .min(region_end - self.pos)
                .min(chunk_end - self.pos);
            match bytes {
                Some(b) => {
                    let piece = &b[done as usize..(done + take) as usize];
                    self.region.bytes(piece);
                    self.chunk.bytes(piece);
                }
                None => {
                    self.region.zeros(take);
                    self.chunk.zeros(take);
                }
            }
            self.pos += take;
            done += take;
            if self.pos == region_end {
                let sum = std::mem::take(&mut self.region).finish();
                self.v.check_region(self.block, (self.pos - 1) / rs, sum)?;
            }
            if self.pos == chunk_end {
                let sum = std::mem::take(&mut self.chunk).finish();
                self.v.chunks[self.block][((self.pos - 1) / chunk) as usize].store(sum, Relaxed);
            }
        }
        Ok(())
    }
}

pub(crate) fn check_memory_matches(
    memory: &GuestMemory,
    layout: &FileLayout,
    path: &Path,
) -> Result<(), MultifdError> {
    if memory.specs() != layout.specs() {
        return Err(MultifdError::Aborted(format!(
            "{}: the memory's blocks do not match the file's layout",
            path.display()
        )));
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
struct Op {
    block: usize,
    region: u64,
    addr: *mut u8,
    len: u32,
    offset: u64,
}

/// What differs between saving and restoring.
trait Direction: Sync {
    const WHAT: &'static str;
    /// The runs of region `region` of block `block` to move.
    fn prepare(&self, block: usize, region: u64, runs: &mut Vec<Run>);
    /// Queues `op` on the ring.
    ///
    /// # Safety
    /// `op` must describe memory inside one of the guest's blocks.
    unsafe fn queue(
        &self,
        ring: &mut Ring,
        fd: RawFd,
        op: &Op,
        tag: u64,
    ) -> Result<(), MultifdError>;
    /// Every operation of the region has completed.
    fn region_done(&self, block: usize, region: u64) -> Result<(), MultifdError>;
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
struct Target<'a> {
    memory: &'a GuestMemory,
    layout: &'a FileLayout,
    path: &'a Path,
    counters: &'a Counters,
}

struct Save<'a> {
    t: Target<'a>,
    bitmaps: Vec<Vec<AtomicU64>>,
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
        let ps = b.page_size() as usize;
        let max_gap = (self.hole_min / ps as u64).saturating_sub(1);
        let (mut present, mut zero) = (0u64, 0u64);
        for index in first..end {
            if !dirty.test(index) {
                continue;
            }
            dirty.clear(index);
            let bit = 1u64 << (index % 64);
            let word = &self.bitmaps[block][(index / 64) as usize];
            if b.page_slice(index).is_some_and(|p| ferry_ram::is_zero(&p)) {
                zero += 1;
                // Its place must read as zeros: rewrite it if it held data.
                if word.fetch_and(!bit, Relaxed) & bit != 0 {
                    push_page(runs, index, 0);
                }
            } else {
                word.fetch_or(bit, Relaxed);
                push_page(runs, index, max_gap);
                present += 1;
            }
        }
        if present + zero == 0 {
            return;
        }
        // SAFETY: interim (file mode moves to its own crate next).
        let bytes = unsafe { b.bytes_unshared(first * ps as u64, (end - first) as usize * ps) }
            .expect("the region lies inside its block");
        self.checksums[block][region as usize].store(region_checksum(bytes), Relaxed);
        count_pages(self.t.counters, present, zero);
        self.t
            .counters
            .ram_bytes
            .fetch_add((present + zero) * ps as u64, Relaxed);
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
        // SAFETY: interim (file mode moves to its own crate next).
        let bytes = unsafe { b.bytes_unshared(first * ps as u64, (end - first) as usize * ps) }
            .expect("the region lies inside its block");
        let scan = RegionScan {
            first,
            page_size: ps,
            max_gap: (self.hole_min / ps as u64).saturating_sub(1),
        };
        self.checksums[block][region as usize].store(region_checksum(bytes), Relaxed);
        let present = scan.run(bytes, &self.bitmaps[block], runs);
        count_pages(self.t.counters, present, scan.pages(bytes) - present);
    }

    unsafe fn queue(
        &self,
        ring: &mut Ring,
        fd: RawFd,
        op: &Op,
        tag: u64,
    ) -> Result<(), MultifdError> {
        // SAFETY: op lies inside a block of the guest memory, which outlives
        // the pool, and the source guest does not unmap it meanwhile.
        unsafe { ring.queue_write_at(fd, op.addr, op.len, op.offset, tag) }
            .map_err(|source| ring_err(self.t.path, source))
    }

    fn region_done(&self, _block: usize, _region: u64) -> Result<(), MultifdError> {
        Ok(())
    }
    fn target(&self) -> &Target<'_> {
        &self.t
    }
}

struct Restore<'a> {
    t: Target<'a>,
    bitmaps: &'a [Vec<u64>],
    checksums: &'a [Vec<u64>],
}

impl Restore<'_> {
    /// The reads of region `region` of `block` (see [`read_runs`]), and
    /// how many of its pages are present.
    fn runs(&self, block: usize, region: u64, runs: &mut Vec<Run>) -> u64 {
        let b = &self.t.memory.blocks()[block];
        let (first, end) = region_pages(b, self.t.layout.region_size, region);
        read_runs(&self.bitmaps[block], first, end, b.page_size(), runs)
    }
}

impl Direction for Restore<'_> {
    const WHAT: &'static str = "reading pages";

    fn prepare(&self, block: usize, region: u64, runs: &mut Vec<Run>) {
        let b = &self.t.memory.blocks()[block];
        let (first, end) = region_pages(b, self.t.layout.region_size, region);
        let present = self.runs(block, region, runs);
        count_pages(self.t.counters, present, end - first - present);
    }

    unsafe fn queue(
        &self,
        ring: &mut Ring,
        fd: RawFd,
        op: &Op,
        tag: u64,
    ) -> Result<(), MultifdError> {
        // SAFETY: op lies inside a writable block of the destination memory,
        // which outlives the pool; each page belongs to exactly one region and
        // one thread, so nothing else touches it until the read completes.
        unsafe { ring.queue_read_at(fd, op.addr, op.len, op.offset, tag) }
            .map_err(|source| ring_err(self.t.path, source))
    }

    /// Checks the region as restored: the pages its reads filled (which
    /// may hold what the file had where absent pages lie) as they are in
    /// memory, and every other page as the zeros fresh memory holds there,
    /// without touching it: a region with no present page costs no memory
    /// access at all, and an absent page is never faulted in.
    fn region_done(&self, block: usize, region: u64) -> Result<(), MultifdError> {
        let b = &self.t.memory.blocks()[block];
        let (first, end) = region_pages(b, self.t.layout.region_size, region);
        let ps = u64::from(b.page_size());
        let mut runs = Vec::new();
        self.runs(block, region, &mut runs);
        let sum = if runs.is_empty() {
            zero_checksum((end - first) * ps)
        } else {
            let mut h = StreamChecksum::new();
            let mut at = first;
            for r in &runs {
                h.zeros((r.first_page - at) * ps);
                h.bytes(pages_bytes(b, r.first_page, r.pages));
                at = r.first_page + r.pages;
            }
            h.zeros((end - at) * ps);
            h.finish()
        };
        if sum == self.checksums[block][region as usize] {
            return Ok(());
        }
        let offset = first * ps;
        Err(MultifdError::FileChecksum {
            path: self.t.path.into(),
            block: b.name().into(),
            offset,
            len: (end - first) * ps,
            file_offset: self.t.layout.blocks[block].pages_offset + offset,
        })
    }
    fn target(&self) -> &Target<'_> {
        &self.t
    }
}

/// Pages `[first, first + pages)` of `b` as one slice over those pages
/// only (see [`RamBlock::page`]), so a thread checking the pages it read
/// holds no slice over pages other threads are filling.
///
/// # Panics
/// If the pages run past the end of the block (callers stay inside).
fn pages_bytes(b: &RamBlock, first: u64, pages: u64) -> &[u8] {
    assert!(
        first + pages <= b.pages(),
        "pages {first}..{} are past the end of block '{}'",
        first + pages,
        b.name()
    );
    let p = b.page_addr(first).expect("first lies inside the block");
    // SAFETY: p is the start of page `first`, and `pages` whole pages from
    // there lie inside the block's readable mapping, which lives as long
    // as `b`.
    unsafe {
        std::slice::from_raw_parts(p.cast_const(), (pages * u64::from(b.page_size())) as usize)
    }
}

/// The reads that restore pages `[first, end)` of a block with pages of
/// `page_size` bytes and bitmap `bitmap`: its present pages, one run per
/// stretch of them, joined across gaps of up to [`READ_ACROSS_GAP`] of
/// absent pages. The bitmap is scanned a word at a time. Returns how many
/// pages are present.
pub(crate) fn read_runs(
    bitmap: &[u64],
    first: u64,
    end: u64,
    page_size: u32,
    runs: &mut Vec<Run>,
) -> u64 {
    let max_gap = READ_ACROSS_GAP / u64::from(page_size);
    let mut present = 0;
    for index in present_pages(bitmap, first, end) {
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

/// How a full save scans one region's bytes: pages from `first` on, of
/// `page_size` bytes; runs join across gaps of up to `max_gap` zero pages
/// (see [`FileOptions::hole_min`]).
pub(crate) struct RegionScan {
    pub(crate) first: u64,
    pub(crate) page_size: usize,
    pub(crate) max_gap: u64,
}

impl RegionScan {
    /// Finds the pages of `bytes` that are not all zeros: sets their bits
    /// in `bitmap`, adds them to `runs`, and returns how many there are
    /// (the caller counts them once they are written).
    pub(crate) fn run(&self, bytes: &[u8], bitmap: &[AtomicU64], runs: &mut Vec<Run>) -> u64 {
        let mut present = 0;
        for (i, page) in bytes.chunks_exact(self.page_size).enumerate() {
            if is_zero_page(page) {
                continue;
            }
            let index = self.first + i as u64;
            bitmap[(index / 64) as usize].fetch_or(1 << (index % 64), Relaxed);
            push_page(runs, index, self.max_gap);
            present += 1;
        }
        present
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
const READ_ACROSS_GAP: u64 = 256 << 10;

/// Bytes of memory region `region` of `block` covers.
fn region_len(block: &RamBlock, region_size: u32, region: u64) -> u64 {
    let (first, end) = region_pages(block, region_size, region);
    (end - first) * u64::from(block.page_size())
}

pub(crate) fn ring_err(path: &Path, source: ferry_transport::TransportError) -> MultifdError {
    MultifdError::Transport {
        channel: format!("file {}", path.display()),
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

fn run_threads<D: Direction>(
    d: &D,
    layout: &FileLayout,
    data: &DataFile,
    opts: &FileOptions,
) -> Result<(), MultifdError> {
    let regions = Regions::new(layout);
    let abort = AtomicBool::new(false);
    let fd = data.file.as_raw_fd();
    let depth = opts.queue_depth.clamp(1, 1024);
    let results: Vec<Result<(), MultifdError>> = std::thread::scope(|s| {
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
                    return vec![Err(MultifdError::Aborted(format!(
                        "cannot start file thread: {e}"
                    )))];
                }
            }
        }
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(MultifdError::Aborted("a file thread panicked".into())))
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
) -> Result<(), MultifdError> {
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
) -> Result<(), MultifdError> {
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
) -> Result<bool, MultifdError> {
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
) -> Result<(), MultifdError> {
    let Some(op) = f.slots.get_mut(slot).and_then(Option::take) else {
        return Err(MultifdError::Aborted(format!(
            "io_uring completed an unknown operation #{slot}"
        )));
    };
    f.free.push(slot);
    f.in_flight -= 1;
    let block = &d.memory().blocks()[op.block];
    let io_err = |source| MultifdError::FileIo {
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
        return Err(MultifdError::Aborted(
            "completion for a closed region".into(),
        ));
    };
    f.open[i].2 -= 1;
    if f.open[i].2 == 0 {
        f.open.swap_remove(i);
        close_region(d, op.block, op.region)?;
    }
    Ok(())
}

/// Every transfer of a region has landed: check it (restoring) and count it.
fn close_region<D: Direction>(d: &D, block: usize, region: u64) -> Result<(), MultifdError> {
    d.region_done(block, region)?;
    if !d.counts_whole_regions() {
        return Ok(());
    }
    let b = &d.memory().blocks()[block];
    let len = region_len(b, d.layout().region_size, region);
    d.counters().ram_bytes.fetch_add(len, Relaxed);
    Ok(())
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

    /// A saved file of `specs` holding `mem`, written as a save writes it.
    fn saved(mem: &GuestMemory, name: &str) -> (std::path::PathBuf, FileLayout, WrittenPages) {
        let specs = mem.specs();
        let mut layout = FileLayout::plan(&specs, 3).unwrap();
        let path = std::env::temp_dir().join(format!("ferry-{name}-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        file.set_len(layout.file_len).unwrap();
        let data = DataFile::open(&path, true, false).unwrap();
        let written = write_pages(
            mem,
            &layout,
            &data,
            &path,
            &FileOptions::default(),
            &Counters::default(),
        )
        .unwrap();
        ferry_ram::mapped::write_metadata(
            &file,
            &path,
            &mut layout,
            &written.bitmaps,
            &written.checksums,
            b"dev",
        )
        .unwrap();
        (path, layout, written)
    }

    /// Verifying without memory gives the digest of the memory saved
    /// (blocks of 4 KiB and 2 MiB pages, a block that is all zeros, data
    /// at chunk and region edges), reading only present pages; a flipped
    /// byte in a present page is found with its block and offset.
    #[test]
    fn verify_gives_the_saved_digest_and_finds_damage() {
        let specs = [
            BlockSpec {
                name: "ram".into(),
                len: 40 << 20,
                page_size: 4096,
            },
            BlockSpec {
                name: "zero".into(),
                len: 33 << 20,
                page_size: 4096,
            },
            BlockSpec {
                name: "huge".into(),
                len: 6 << 20,
                page_size: 2 << 20,
            },
        ];
        let mem = GuestMemory::anonymous(&specs).unwrap();
        let ram = &mem.blocks()[0];
        // A few pages here and there: both sides of a 16 MiB chunk edge,
        // the last page, a run of 300 pages.
        for p in [0u64, 4095, 4096, 5000, ram.pages() - 1]
            .into_iter()
            .chain(7000..7300)
        {
            // SAFETY: page p lies inside the writable block.
            unsafe { std::ptr::write_bytes(ram.page_addr(p).unwrap(), (p % 200 + 1) as u8, 4096) };
        }
        // SAFETY: as above, in the 2 MiB-page block.
        unsafe { *mem.blocks()[2].page_addr(1).unwrap().add(77) = 9 };
        let (path, layout, written) = saved(&mem, "verify");
        let data = DataFile::open(&path, false, false).unwrap();
        let verify = |counters: &Counters| {
            verify_pages(
                &layout,
                &written.bitmaps,
                &written.checksums,
                &data,
                &path,
                &FileOptions::default(),
                counters,
            )
        };
        let counters = Counters::default();
        let chunks = verify(&counters).unwrap();
        let digest = ferry_ram::Digest::from_chunk_hashes(
            layout
                .blocks
                .iter()
                .zip(&chunks)
                .map(|(b, h)| (b.name.as_str(), b.len, &h[..])),
        );
        assert_eq!(digest, mem.digest());
        let t = counters.snapshot();
        assert_eq!(t.pages_normal, 305 + 1);
        assert_eq!(t.ram_bytes, mem.total_bytes());
        // Only present pages are read (and gaps of up to 256 KiB between
        // them): far less than the 40 MiB of the block.
        assert!(t.wire_bytes <= (4 << 20), "read {} bytes", t.wire_bytes);

        let at = layout.blocks[0].page_file_offset(5000) + 3;
        let f = File::options().read(true).write(true).open(&path).unwrap();
        f.write_all_at(&[0xAB], at).unwrap();
        let e = verify(&Counters::default()).err().unwrap();
        let _ = std::fs::remove_file(&path);
        match e {
            MultifdError::FileChecksum {
                block,
                offset,
                file_offset,
                ..
            } => {
                assert_eq!(block, "ram");
                // Regions are 2 MiB here (the largest page).
                assert_eq!(layout.region_size, 2 << 20);
                assert_eq!(offset, 18 << 20);
                assert_eq!(file_offset, layout.blocks[0].pages_offset + offset);
            }
            other => panic!("wrong error: {other}"),
        }
    }

    /// A set cancel flag stops writing and reading pages at once, with an
    /// error that says so.
    #[test]
    fn a_cancel_stops_file_threads() {
        let specs = [BlockSpec {
            name: "ram".into(),
            len: 8 << 20,
            page_size: 4096,
        }];
        let mem = GuestMemory::anonymous(&specs).unwrap();
        let layout = FileLayout::plan(&specs, 0).unwrap();
        let path = std::env::temp_dir().join(format!("ferry-cancel-{}", std::process::id()));
        File::create(&path)
            .unwrap()
            .set_len(layout.file_len)
            .unwrap();
        let data = DataFile::open(&path, true, false).unwrap();
        let opts = FileOptions {
            cancel: Some(Arc::new(AtomicBool::new(true))),
            ..Default::default()
        };
        let counters = Counters::default();
        let e = write_pages(&mem, &layout, &data, &path, &opts, &counters)
            .err()
            .expect("cancelled");
        assert!(e.to_string().contains("cancelled"), "{e}");
        assert_eq!(counters.snapshot().ram_bytes, 0, "no region was saved");
        let words = vec![vec![0u64; 2048 / 64]];
        let sums = vec![vec![0u64; 8]];
        let e = verify_pages(&layout, &words, &sums, &data, &path, &opts, &counters)
            .expect_err("cancelled");
        let _ = std::fs::remove_file(&path);
        assert!(e.to_string().contains("cancelled"), "{e}");
    }

    #[test]
    fn a_later_pass_rewrites_pages_in_place_and_zeroed_pages_read_as_zeros() {
        let specs = [BlockSpec {
            name: "ram".into(),
            len: 2 << 20,
            page_size: 4096,
        }];
        let mem = GuestMemory::anonymous(&specs).unwrap();
        let b = &mem.blocks()[0];
        for p in 0..b.pages() {
            if p != 300 {
                // SAFETY: page p lies inside the writable block.
                unsafe {
                    std::ptr::write_bytes(b.page_addr(p).unwrap(), (p % 250 + 1) as u8, 4096)
                };
            }
        }
        let layout = FileLayout::plan(&specs, 0).unwrap();
        let path = std::env::temp_dir().join(format!("ferry-rewrite-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        file.set_len(layout.file_len).unwrap();
        let data = DataFile::open(&path, true, false).unwrap();
        let opts = FileOptions {
            channels: 2,
            ..Default::default()
        };
        let counters = Counters::default();
        let written = write_pages(&mem, &layout, &data, &path, &opts, &counters).unwrap();
        assert_eq!(written.bitmaps[0][300 / 64] & (1 << (300 % 64)), 0);
        // The guest zeroes page 5, writes page 7 and the zero page 300.
        b.zero_page(5);
        for p in [7u64, 300] {
            // SAFETY: as above.
            unsafe { std::ptr::write_bytes(b.page_addr(p).unwrap(), 0xEE, 4096) };
        }
        let dirty = vec![PageBitmap::new(b.pages(), false)];
        for p in [5, 7, 300] {
            dirty[0].set(p);
        }
        let written = rewrite_pages(
            &mem, &layout, &data, &path, &opts, &counters, written, &dirty,
        )
        .unwrap();
        assert_eq!(dirty[0].count(), 0, "the pass takes the dirty pages");
        let bit = |p: u64| written.bitmaps[0][(p / 64) as usize] & (1 << (p % 64)) != 0;
        assert!(!bit(5) && bit(7) && bit(300));
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(len, layout.file_len, "the file does not grow");
        let back = GuestMemory::anonymous(&specs).unwrap();
        read_pages(
            &back,
            &layout,
            &written.bitmaps,
            &written.checksums,
            &data,
            &path,
            &opts,
            &counters,
        )
        .unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(back.blocks()[0].copy_all() == b.copy_all());
    }
}
