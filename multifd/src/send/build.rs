//! Building one packet: the sender thread's work between claiming a chunk
//! of the pass and handing the packet to its [`super::delivery::Delivery`].
//! Owns the [`Slot`] a packet is built in, the chunk scan (clean before
//! read, zero pages sorted out, compressible pages first), the header, zstd
//! compression of the payload, and sealing the header crc; the body's
//! layout itself is [`crate::packet::Body`]'s.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use ferry_ram::{is_zero, set_bits, GuestMemory, PageBitmap, VolatileSlice};

use super::pool::PassWork;
use crate::compress::Compressor;
use crate::packet::{
    offsets_as_bytes, page_crc, page_crcs_as_bytes, PacketHeader, FLAG_CHECKSUM, FLAG_COMPRESSED,
    FLAG_PAGE_CRCS, HEADER_LEN, PAYLOAD_IOV,
};

/// How many pages ahead of the zero-page scan a page's first cache line is
/// prefetched. Measured on 2 GiB `mixed`, K=2, 7 alternating runs: 16 pages
/// ahead cut the median wall time from 0.484 s to 0.444 s (8 and 24 ahead did
/// about as well in a shorter, 3-run trial).
const PREFETCH_PAGES: u64 = 16;
/// The kernel maps a file's pages into the sender on a fault 16 at a time
/// (fault-around, 64 KiB), and a prefetch of a page not mapped yet is
/// dropped. So at the first page of each such window the scan reads the
/// first byte of the next window, which maps it: the prefetches ahead then
/// find their pages. Measured on 2 GiB `mixed`, K=2, alternating runs of
/// one binary: 10 pairs, median wall 0.543 -> 0.509 s and sender CPU
/// 0.93 -> 0.85 s; with zstd, 6 pairs, 1.194 -> 1.005 s; perf showed the
/// scan's samples down by a third.
const FAULT_AROUND_PAGES: u64 = 16;

/// One packet being prepared or in flight. Slots live in a boxed slice and
/// never move, so the pointers inside `msg` and `iov` stay valid.
pub(super) struct Slot {
    pub(super) header: [u8; HEADER_LEN],
    /// Normal page offsets, then zero page offsets.
    pub(super) offsets: Vec<u64>,
    /// header, offsets, then runs of contiguous normal pages.
    pub(super) iov: Vec<libc::iovec>,
    pub(super) msg: libc::msghdr,
    pub(super) normal: u64,
    pub(super) zero: u64,
    pub(super) page_size: u64,
    /// The packet's size in ferry framing (what the counters add up).
    pub(super) wire: u64,
    /// Bytes this slot's ring send puts on the socket.
    pub(super) send_len: u64,
    /// The compressed payload, when compressed.
    pub(super) zbuf: Vec<u8>,
    /// The payload's pages copied out of guest memory, when the builder
    /// copies payloads (`PacketBuilder::copies_payload`).
    pub(super) payload: Vec<u8>,
    /// Every iovec points at this slot's own buffers (the payload was
    /// copied): nothing in the packet is guest memory.
    pub(super) owns_payload: bool,
    /// Payload bytes of the pages, and on the wire.
    pub(super) payload_raw: u64,
    pub(super) payload_wire: u64,
    /// Completions still due before the slot is free: 1, or 2 with zero-copy.
    pub(super) awaiting: u8,
    /// Live passes: one crc per normal page.
    pub(super) page_crcs: Vec<u32>,
    /// In a live pass: the pass's bitmaps and the block, to check the pages
    /// against `page_crcs` once the kernel is done with them.
    pub(super) verify: Option<(Arc<Vec<PageBitmap>>, usize)>,
}

impl Slot {
    pub(super) fn new(max_pages: usize) -> Self {
        Self {
            header: [0; HEADER_LEN],
            offsets: Vec::with_capacity(max_pages),
            iov: Vec::with_capacity(max_pages + PAYLOAD_IOV),
            // SAFETY: a zeroed msghdr is a valid empty message.
            msg: unsafe { std::mem::zeroed() },
            normal: 0,
            zero: 0,
            page_size: 0,
            wire: 0,
            send_len: 0,
            zbuf: Vec::new(),
            payload: Vec::new(),
            owns_payload: false,
            payload_raw: 0,
            payload_wire: 0,
            awaiting: 0,
            page_crcs: Vec::with_capacity(max_pages),
            verify: None,
        }
    }
}

/// A sender thread's packet building state: what it needs to turn a
/// claimed chunk into a packet in a [`Slot`], and its sequence numbers.
pub(super) struct PacketBuilder {
    pub(super) memory: Arc<GuestMemory>,
    checksum: bool,
    packet_pages: usize,
    /// The next packet's sequence number.
    seq: u64,
    /// Zero-page offsets of the packet being built.
    zero_scratch: Vec<u64>,
    /// With compression: offsets of random-looking pages (sent raw).
    raw_scratch: Vec<u64>,
    /// zstd context, when compressing.
    compressor: Option<Compressor>,
    /// Whether each payload is copied whole out of guest memory into its
    /// slot: when zstd or the channel's TLS records read the payload
    /// anyway. The checksum then reads that copy, zstd and TLS read it in
    /// place, and the packet holds no guest memory. Chosen once.
    copies_payload: bool,
}

impl PacketBuilder {
    /// A builder; `sealed` says the channel's delivery reads every
    /// payload (TLS records), so payloads are copied out of guest memory
    /// once, here.
    pub(super) fn new(
        memory: Arc<GuestMemory>,
        checksum: bool,
        packet_pages: usize,
        compressor: Option<Compressor>,
        sealed: bool,
    ) -> Self {
        let copies_payload = sealed || compressor.is_some();
        Self {
            memory,
            checksum,
            packet_pages,
            seq: 0,
            zero_scratch: Vec::with_capacity(packet_pages),
            raw_scratch: Vec::with_capacity(packet_pages),
            compressor,
            copies_payload,
        }
    }

    /// Builds the packet for one chunk into `s`. False if the chunk had no
    /// pages to send (the sequence number is then not used). The error is
    /// zstd's.
    pub(super) fn build(
        &mut self,
        s: &mut Slot,
        work: &PassWork,
        block_index: usize,
        first_word: usize,
    ) -> std::io::Result<bool> {
        let per_page = work.live && self.checksum;
        let pages = self.scan_chunk(s, work, block_index, first_word, per_page);
        if pages.normal + pages.zero == 0 {
            return Ok(false);
        }
        s.owns_payload = self.copies_payload;
        if self.copies_payload {
            // SAFETY: the payload's iovecs point at pages of `self.memory`,
            // which this builder holds for the call.
            unsafe { take_payload(s) };
        }
        let mut h = self.data_header(s, work.generation, block_index, &pages, per_page);
        if pages.compressible > 0 && self.compressor.is_some() {
            self.compress_payload(s, &mut h, &pages)?;
        }
        s.verify = per_page.then(|| (work.bitmaps.clone(), block_index));
        self.finish_packet(s, h, &pages);
        Ok(true)
    }

    /// Builds a SYNC or END packet (no pages) into `s`.
    pub(super) fn marker(&mut self, s: &mut Slot, flag: u16, generation: u64) {
        s.offsets.clear();
        s.page_crcs.clear();
        s.iov.clear();
        s.owns_payload = true;
        let mut h = PacketHeader {
            flags: flag,
            generation,
            seq: self.seq,
            ..Default::default()
        };
        if self.checksum {
            h.flags |= FLAG_CHECKSUM;
        }
        h.seal(&mut s.header, &[]);
        s.iov.push(libc::iovec {
            iov_base: s.header.as_mut_ptr().cast(),
            iov_len: HEADER_LEN,
        });
        (s.normal, s.zero, s.page_size) = (0, 0, 0);
        s.wire = h.body().wire_len();
        (s.payload_raw, s.payload_wire) = (0, 0);
        s.verify = None;
        self.seq += 1;
    }

    /// The chunk's loop: takes its dirty bits (clean before read) and sorts
    /// its pages into the slot: zero pages as offsets only, the others as
    /// iovecs over guest memory; with compression the compressible-looking
    /// pages first (they go into the zstd frame), then the random-looking
    /// ones (raw). Offsets end up normal pages first, then zero pages.
    fn scan_chunk(
        &mut self,
        s: &mut Slot,
        work: &PassWork,
        block_index: usize,
        first_word: usize,
        per_page: bool,
    ) -> ChunkPages {
        let block = &self.memory.blocks()[block_index];
        let bitmap = &work.bitmaps[block_index];
        let last_word = (first_word + work.words_per_chunk).min(bitmap.words());
        let ps = block.page_size() as usize;
        let sort = self.compressor.is_some();
        s.offsets.clear();
        s.page_crcs.clear();
        reset_iov(&mut s.iov, &mut s.header);
        self.zero_scratch.clear();
        self.raw_scratch.clear();
        let data_pages = work.data_pages.get(block_index).and_then(Option::as_ref);
        for w in first_word..last_word {
            let bits = bitmap.take_word(w);
            // Pages the page tables say were never written: zero, unread.
            let unwritten = data_pages.map_or(0, |d| bits & !d.word(w));
            for page in set_bits(unwritten, w as u64 * 64) {
                self.zero_scratch.push(page * ps as u64);
            }
            for page in set_bits(bits & !unwritten, w as u64 * 64) {
                if page % FAULT_AROUND_PAGES == 0 {
                    block.touch_page(page + FAULT_AROUND_PAGES);
                }
                block.prefetch_page(page + PREFETCH_PAGES);
                let Some(mem) = block.page_slice(page) else {
                    continue; // bits past the block's end are never set
                };
                let offset = page * ps as u64;
                if is_zero(&mem) {
                    self.zero_scratch.push(offset);
                } else if sort && !looks_compressible(&mem) {
                    self.raw_scratch.push(offset);
                } else {
                    s.offsets.push(offset);
                    if per_page {
                        s.page_crcs.push(page_crc(&mem));
                    }
                    push_page(&mut s.iov, &mem, PAYLOAD_IOV);
                }
            }
        }
        let compressible = s.offsets.len();
        let raw_from = s.iov.len();
        for &offset in &self.raw_scratch {
            let Some(mem) = block.page_slice(offset / ps as u64) else {
                continue; // taken from this block's bitmap above
            };
            if per_page {
                s.page_crcs.push(page_crc(&mem));
            }
            push_page(&mut s.iov, &mem, raw_from);
        }
        s.offsets.extend_from_slice(&self.raw_scratch);
        let normal = s.offsets.len();
        s.offsets.extend_from_slice(&self.zero_scratch);
        debug_assert!(s.offsets.len() <= self.packet_pages);
        ChunkPages {
            page_size: ps,
            compressible,
            normal,
            zero: self.zero_scratch.len(),
            raw_from,
        }
    }

    /// The packet header for the pages `scan_chunk` put in `s`, with the
    /// payload as the raw pages (and its crc, unless per-page crcs go).
    fn data_header(
        &mut self,
        s: &mut Slot,
        generation: u64,
        block_index: usize,
        pages: &ChunkPages,
        per_page: bool,
    ) -> PacketHeader {
        let flags = match (self.checksum, per_page) {
            (false, _) => 0,
            (true, false) => FLAG_CHECKSUM,
            (true, true) => FLAG_CHECKSUM | FLAG_PAGE_CRCS,
        };
        let h = PacketHeader {
            flags,
            block: block_index as u32,
            normal: pages.normal as u32,
            zero: pages.zero as u32,
            page_size: pages.page_size as u32,
            seq: self.seq,
            payload_len: (pages.normal * pages.page_size) as u64,
            generation,
            payload_crc: if !self.checksum || per_page {
                0
            } else if s.owns_payload {
                crate::packet::bytes_crc(&s.payload[..pages.normal * pages.page_size])
            } else {
                // SAFETY: the payload's iovecs point at pages of
                // `self.memory`, which this builder holds for the call.
                unsafe { crate::packet::payload_crc(&s.iov[PAYLOAD_IOV..]) }
            },
            header_crc: 0,
            compressed_pages: 0,
        };
        s.payload_raw = h.payload_len;
        h
    }

    /// Replaces the compressible pages' iovecs with one zstd frame in the
    /// slot's buffer, if the frame is smaller than they are.
    fn compress_payload(
        &mut self,
        s: &mut Slot,
        h: &mut PacketHeader,
        pages: &ChunkPages,
    ) -> std::io::Result<()> {
        let Some(c) = self.compressor.as_mut() else {
            return Ok(());
        };
        // With zstd the payload was copied into the slot (`take_payload`):
        // its compressible pages come first.
        let compressible = pages.compressible * pages.page_size;
        if !c.compress(&[&s.payload[..compressible]], &mut s.zbuf)? {
            return Ok(());
        }
        h.flags |= FLAG_COMPRESSED;
        h.compressed_pages = pages.compressible as u32;
        h.payload_len =
            (s.zbuf.len() + (pages.normal - pages.compressible) * pages.page_size) as u64;
        s.iov.splice(
            PAYLOAD_IOV..pages.raw_from,
            [libc::iovec {
                iov_base: s.zbuf.as_mut_ptr().cast(),
                iov_len: s.zbuf.len(),
            }],
        );
        Ok(())
    }

    /// Seals the header, points the slot's iovecs at the offsets and page
    /// crcs, and records what the packet carries.
    fn finish_packet(&mut self, s: &mut Slot, mut h: PacketHeader, pages: &ChunkPages) {
        s.payload_wire = h.payload_len;
        h.seal_with_page_crcs(&mut s.header, &s.offsets, &s.page_crcs);
        let body = h.body();
        let off = offsets_as_bytes(&s.offsets);
        debug_assert_eq!(off.len(), body.offsets_len());
        s.iov[1] = libc::iovec {
            iov_base: off.as_ptr() as *mut _,
            iov_len: off.len(),
        };
        let crcs = page_crcs_as_bytes(&s.page_crcs);
        debug_assert_eq!(crcs.len(), body.page_crcs_len());
        s.iov[2] = libc::iovec {
            iov_base: crcs.as_ptr() as *mut _,
            iov_len: crcs.len(),
        };
        s.normal = pages.normal as u64;
        s.zero = pages.zero as u64;
        s.page_size = pages.page_size as u64;
        s.wire = body.wire_len();
        self.seq += 1;
    }
}

/// A live packet the kernel has finished with: each page that no longer
/// matches the crc it carried fails its check at the receiver, so it goes
/// again in the next pass.
pub(super) fn recheck_pages(
    s: &Slot,
    (bitmaps, block): (Arc<Vec<PageBitmap>>, usize),
    memory: &GuestMemory,
    counters: &crate::Counters,
) {
    let Some(b) = memory.block(block) else { return };
    let ps = s.page_size.max(1);
    let mut changed = 0;
    for (&off, &crc) in s.offsets[..s.normal as usize].iter().zip(&s.page_crcs) {
        let now = b.page_slice(off / ps).map(|p| page_crc(&p));
        if now != Some(crc) {
            bitmaps[block].set(off / ps);
            changed += 1;
        }
    }
    counters
        .pages_changed_in_flight
        .fetch_add(changed, Ordering::Relaxed);
}

/// Whether a page is worth giving to zstd: 64 bytes sampled across it take
/// few distinct values (text, tables, low-entropy data). Random-looking
/// pages (about 56 distinct of 64) go raw, saving zstd's time on them.
#[inline]
fn looks_compressible(page: &VolatileSlice) -> bool {
    use ferry_ram::vm_memory::Bytes;
    let mut seen = [0u64; 4];
    let step = (page.len() / 64).max(1);
    for at in (0..page.len()).step_by(step) {
        // One byte loaded at a time: the guest may be writing the page.
        let b: u8 = page.load(at, Ordering::Relaxed).unwrap_or(0);
        seen[usize::from(b >> 6)] |= 1 << (b & 63);
    }
    seen.iter().map(|w| w.count_ones()).sum::<u32>() <= 40
}

/// What [`ChannelSender::scan_chunk`] found in a chunk.
pub(super) struct ChunkPages {
    pub(super) page_size: usize,
    /// Normal pages that looked compressible (the first ones): the zstd
    /// frame's pages if it shrinks them. All of them without compression.
    pub(super) compressible: usize,
    /// Normal pages in all.
    pub(super) normal: usize,
    pub(super) zero: usize,
    /// Index of the first iovec of the raw (not compressed) pages.
    pub(super) raw_from: usize,
}

/// Starts a packet's iovec list: the header, then empty entries for the
/// offsets and page crcs (filled in once the packet is sealed).
pub(super) fn reset_iov(iov: &mut Vec<libc::iovec>, header: &mut [u8; HEADER_LEN]) {
    iov.clear();
    iov.push(libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER_LEN,
    });
    iov.resize(
        PAYLOAD_IOV,
        libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        },
    );
}

/// Copies the payload's pages out of guest memory into the slot's own
/// `payload` buffer and points its iovecs there instead (run for run, so
/// the indexes of `ChunkPages` still hold). The buffer only ever grows (to
/// the largest payload so far): the payload is its first bytes, and
/// nothing is zeroed per packet.
///
/// # Safety
/// The slot's payload iovecs (from `PAYLOAD_IOV`) must point at memory
/// that stays mapped and readable for the call.
unsafe fn take_payload(s: &mut Slot) {
    let total: usize = s.iov[PAYLOAD_IOV..].iter().map(|v| v.iov_len).sum();
    if s.payload.len() < total {
        s.payload.resize(total, 0);
    }
    let mut at = 0;
    for v in &mut s.iov[PAYLOAD_IOV..] {
        // SAFETY: the caller's guarantee; VolatileSlice tolerates writers.
        let mem = unsafe { VolatileSlice::new(v.iov_base.cast::<u8>(), v.iov_len) };
        let copy = &mut s.payload[at..at + v.iov_len];
        mem.copy_to(copy);
        v.iov_base = copy.as_mut_ptr().cast();
        at += v.iov_len;
    }
}

/// Appends a page to an iovec list, merging it with the previous entry when
/// the two are adjacent in memory and that entry is at index `first` or later.
#[inline]
fn push_page(iov: &mut Vec<libc::iovec>, page: &VolatileSlice, first: usize) {
    let base = page.ptr_guard().as_ptr();
    let pages_started = iov.len() > first;
    if let Some(last) = iov.last_mut().filter(|_| pages_started) {
        if last.iov_base as usize + last.iov_len == base as usize {
            last.iov_len += page.len();
            return;
        }
    }
    iov.push(libc::iovec {
        iov_base: base.cast_mut().cast(),
        iov_len: page.len(),
    });
}
