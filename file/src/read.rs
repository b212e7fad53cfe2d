//! Restoring eagerly: every present page of a [`SavedFile`] is read by the
//! kernel straight into its place in fresh memory (io_uring reads to raw
//! addresses), each region checked against its checksum once its reads
//! have landed ([`SavedFile::read_pages`]); and the digest of memory so
//! restored, computed without touching an absent page
//! ([`SavedFile::restored_digest`]).
//!
//! Restoring never touches the memory of an absent page: a region without
//! a present page is checked against the known checksum of zeros, and a
//! region with some is checksummed from copies of the pages its reads
//! filled and the zeros of the rest.

use std::os::fd::RawFd;

use ferry_ram::mapped::{zero_checksum, StreamChecksum};
use ferry_ram::{
    read_in_pieces, Counters, Digest, GuestMemory, PageBitmap, RamBlock, DIGEST_CHUNK,
};
use ferry_transport::uring::Ring;

use crate::data::FileOptions;
use crate::engine::{
    check_memory_matches, count_pages, read_runs, region_pages, ring_err, run_threads, Direction,
    Op, Run, Target,
};
use crate::{FileError, SavedFile};

/// Bytes of guest memory copied out at a time to be hashed.
const HASH_PIECE: usize = 64 << 10;

impl SavedFile {
    /// Reads every present page of the file into `memory` (fresh, zeroed
    /// memory with the file's blocks, which nothing else writes until this
    /// returns) with `opts.channels` threads, and checks every region's
    /// checksum.
    pub fn read_pages(
        &self,
        memory: &GuestMemory,
        opts: &FileOptions,
        counters: &Counters,
    ) -> Result<(), FileError> {
        let (layout, path) = (self.layout(), self.path());
        check_memory_matches(memory, layout, path)?;
        let restore = Restore {
            t: Target {
                memory,
                layout,
                path,
                counters,
            },
            bitmaps: self.bitmaps(),
            checksums: self.checksums(),
        };
        run_threads(&restore, layout, self.data(), opts)
    }

    /// The digest of `memory` freshly restored from this file (by
    /// [`Self::read_pages`]): hashes copies of the present pages and, for
    /// the others, the zeros fresh memory holds there (the region checksums
    /// proved it), so an absent page is never touched and a chunk of
    /// `DIGEST_CHUNK` bytes without a present page costs nothing but a
    /// lookup. Equal to `memory.digest()`.
    pub fn restored_digest(&self, memory: &GuestMemory) -> Digest {
        restored_digest(memory, self.bitmaps())
    }
}

/// [`SavedFile::restored_digest`] for memory whose present pages are those
/// set in `bitmaps` (one per block).
pub fn restored_digest(memory: &GuestMemory, bitmaps: &[PageBitmap]) -> Digest {
    let chunk = DIGEST_CHUNK as u64;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let hashes: Vec<Vec<u64>> = memory
        .blocks()
        .iter()
        .zip(bitmaps)
        .map(|(b, bits)| {
            let chunks = b.len().div_ceil(chunk);
            let per = chunks.div_ceil(threads).max(1);
            std::thread::scope(|s| {
                let parts: Vec<_> = (0..chunks)
                    .step_by(per as usize)
                    .map(|c0| {
                        s.spawn(move || {
                            let mut scratch = vec![0u8; HASH_PIECE];
                            (c0..(c0 + per).min(chunks))
                                .map(|c| chunk_hash(b, bits, c, &mut scratch))
                                .collect::<Vec<u64>>()
                        })
                    })
                    .collect();
                parts
                    .into_iter()
                    .flat_map(|p| p.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    Digest::from_chunk_hashes(
        memory
            .blocks()
            .iter()
            .zip(&hashes)
            .map(|(b, h)| (b.name(), b.len(), &h[..])),
    )
}

/// The hash of digest chunk `c` of block `b`, whose present pages are set
/// in `bits`: copies of the present pages (runs of them at a time), zeros
/// for the rest.
fn chunk_hash(b: &RamBlock, bits: &PageBitmap, c: u64, scratch: &mut [u8]) -> u64 {
    let chunk = DIGEST_CHUNK as u64;
    let ps = u64::from(b.page_size());
    let (start, end) = (c * chunk, ((c + 1) * chunk).min(b.len()));
    let (first, last) = (start / ps, end / ps);
    if !bits.any_in(first, last) {
        return zero_checksum(end - start);
    }
    let mut runs = Vec::new();
    for p in bits.iter_set_in(first, last) {
        crate::engine::push_page(&mut runs, p, 0);
    }
    let mut h = StreamChecksum::new();
    let mut at = first;
    for r in &runs {
        h.zeros((r.first_page - at) * ps);
        if let Some(mem) = b.pages_slice(r.first_page, r.pages) {
            read_in_pieces(&mem, scratch, |piece| h.bytes(piece));
        }
        at = r.first_page + r.pages;
    }
    h.zeros((last - at) * ps);
    h.finish()
}

struct Restore<'a> {
    t: Target<'a>,
    bitmaps: &'a [PageBitmap],
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

    unsafe fn queue(&self, ring: &mut Ring, fd: RawFd, op: &Op, tag: u64) -> Result<(), FileError> {
        // SAFETY: the caller guarantees op lies inside a block of the
        // destination memory, which is writable (fresh memory) and outlives
        // the threads (run_threads waits for every completion); each page
        // belongs to exactly one region and one thread, and nobody else
        // writes the memory until read_pages returns, so the kernel's write
        // is the only access until the read completes.
        unsafe { ring.queue_read_at(fd, op.addr, op.len, op.offset, tag) }
            .map_err(|source| ring_err(self.t.path, source))
    }

    /// Checks the region as restored: the pages its reads filled (which
    /// may hold what the file had where absent pages lie) as they are in
    /// memory, and every other page as the zeros fresh memory holds there,
    /// without touching it: a region with no present page costs no memory
    /// access at all, and an absent page is never faulted in.
    fn region_done(&self, block: usize, region: u64) -> Result<(), FileError> {
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
                // SAFETY: this thread's reads filled these pages and have
                // completed; each page belongs to one region and one thread
                // (see `queue`), and nothing else writes the memory until
                // read_pages returns, so nobody writes them meanwhile.
                let bytes = unsafe { b.bytes_unshared(r.first_page * ps, (r.pages * ps) as usize) };
                if let Some(bytes) = bytes {
                    h.bytes(bytes);
                }
                at = r.first_page + r.pages;
            }
            h.zeros((end - at) * ps);
            h.finish()
        };
        if sum == self.checksums[block][region as usize] {
            return Ok(());
        }
        let offset = first * ps;
        Err(FileError::Checksum {
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
