//! Verifying without memory: reads a [`SavedFile`] as restoring would,
//! into small private buffers, and checks every region's checksum while
//! computing the digest a restore would give ([`SavedFile::verify`]).
//!
//! Threads each take a piece of a block at a time (16 MiB, or a region if
//! regions are larger), read its present pages (the same reads a restore
//! makes) and hash them with the zeros of its absent pages into the region
//! checksums and the digest's chunk hashes. A piece without a present page
//! is checked against the checksum of zeros and never read, so time and
//! memory grow with the pages present, not the guest's size.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use ferry_ram::mapped::{zero_checksum, FileLayout, StreamChecksum};
use ferry_ram::{Counters, Digest, PageBitmap, DIGEST_CHUNK};

use crate::data::{cancelled, AlignedBuf, DataFile, FileOptions};
use crate::engine::{count_pages, read_runs, shared_words, unshare, Regions, Run};
use crate::{FileError, SavedFile};

impl SavedFile {
    /// Checks every region's checksum as [`Self::verify_pages`] does and
    /// returns the digest of the memory a restore would give.
    pub fn verify(&self, opts: &FileOptions, counters: &Counters) -> Result<Digest, FileError> {
        let chunks = self.verify_pages(opts, counters)?;
        Ok(Digest::from_chunk_hashes(
            self.layout()
                .blocks
                .iter()
                .zip(&chunks)
                .map(|(b, h)| (b.name.as_str(), b.len, &h[..])),
        ))
    }

    /// Reads the file as restoring would and checks every region's
    /// checksum, without memory to restore into, with `opts.channels`
    /// threads (see the module doc). Returns, per block, the xxh3-64 of
    /// each `DIGEST_CHUNK` of its memory as restored (for
    /// `ferry_ram::Digest::from_chunk_hashes`).
    pub fn verify_pages(
        &self,
        opts: &FileOptions,
        counters: &Counters,
    ) -> Result<Vec<Vec<u64>>, FileError> {
        verify_pages(
            self.layout(),
            self.bitmaps(),
            self.checksums(),
            self.data(),
            self.path(),
            opts,
            counters,
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn verify_pages(
    layout: &FileLayout,
    bitmaps: &[PageBitmap],
    checksums: &[Vec<u64>],
    data: &DataFile,
    path: &Path,
    opts: &FileOptions,
    counters: &Counters,
) -> Result<Vec<Vec<u64>>, FileError> {
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
    let results: Vec<Result<(), FileError>> = std::thread::scope(|s| {
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
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(FileError::Stopped("a verify thread panicked".into()))),
                Err(e) => {
                    abort.store(true, Relaxed);
                    Err(FileError::Stopped(format!(
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
    bitmaps: &'a [PageBitmap],
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
    ) -> Result<(), FileError> {
        // Page aligned: the data handle may be O_DIRECT.
        let mut buf = AlignedBuf::new(VERIFY_READ);
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
        buf: &mut AlignedBuf,
        runs: &mut Vec<Run>,
    ) -> Result<(), FileError> {
        let b = &self.layout.blocks[block];
        let ps = u64::from(b.page_size);
        let rs = u64::from(self.layout.region_size);
        let chunk = DIGEST_CHUNK as u64;
        let start = piece * self.unit;
        let end = (start + self.unit).min(b.len);
        let words = &self.bitmaps[block];
        let present = words.count_in(start / ps, end / ps);
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
        let buf = buf.get_mut(VERIFY_READ);
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
                        .map_err(|source| FileError::Io {
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

    fn check_region(&self, block: usize, region: u64, sum: u64) -> Result<(), FileError> {
        if sum == self.checksums[block][region as usize] {
            return Ok(());
        }
        let b = &self.layout.blocks[block];
        let rs = u64::from(self.layout.region_size);
        let offset = region * rs;
        Err(FileError::Checksum {
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
    fn put(&mut self, bytes: Option<&[u8]>, n: u64) -> Result<(), FileError> {
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
