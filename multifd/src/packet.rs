//! The multifd packet: what every multifd channel carries, back to back.
//!
//! A packet is a fixed 64-byte header, then `normal + zero` page offsets
//! (8 bytes each; normal pages first), then — with the PAGE_CRCS flag — one
//! crc32 per normal page (4 bytes each), then the payload: the normal pages'
//! bytes in offset order. Zero pages travel as offsets only. All integers are
//! little-endian.
//!
//! Live passes carry per-page crcs: a page the guest writes while it is in
//! flight fails its own check only, and only that page must come again.
//!
//! | offset | size | field                                                   |
//! |-------:|-----:|---------------------------------------------------------|
//! |      0 |    4 | magic, the bytes `FMFD`                                 |
//! |      4 |    2 | version (currently 1)                                   |
//! |      6 |    2 | flags: 1 SYNC (end of a pass), 2 END (no more packets), 4 CHECKSUM (crc fields valid), 8 PAGE_CRCS (per-page crcs follow the offsets; needs CHECKSUM), 16 COMPRESSED (the first C pages travel as one zstd frame) |
//! |      8 |    4 | block index, into the block list of the migration's setup |
//! |     12 |    4 | normal pages N                                          |
//! |     16 |    4 | zero pages Z (N + Z at most [`MAX_PACKET_PAGES`])        |
//! |     20 |    4 | page size of the block, bytes                           |
//! |     24 |    8 | sequence number, counting from 0 on each channel        |
//! |     32 |    8 | payload length on the wire, bytes: N × page size; with COMPRESSED the zstd frame's length F plus (N − C) × page size, where 1 ≤ F < C × page size |
//! |     40 |    8 | generation: the pass this packet belongs to (from 1)    |
//! |     48 |    4 | crc32 of the payload (of the pages, uncompressed; 0 with PAGE_CRCS) |
//! |     52 |    4 | crc32 of header bytes 0..52, 56..64, the offsets and the page crcs |
//! |     56 |    4 | with COMPRESSED: C, the normal pages (1 ≤ C ≤ N) whose bytes the zstd frame holds; else 0 |
//! |     60 |    4 | reserved, 0                                             |
//!
//! SYNC and END packets have N = Z = 0 and no payload. A COMPRESSED payload
//! is the zstd frame of the first C normal pages (it must decode to exactly
//! C × page size bytes), then the other N − C normal pages raw. The sender
//! puts the pages that look compressible first and sends random-looking
//! ones raw; a packet whose frame would not be smaller goes all raw. A receiver checks
//! magic, version, flags, sequence, block index, page size, counts, payload
//! length and every offset (page aligned, inside the block, and not named
//! before in this pass by any packet on any channel) before it reads a
//! single payload byte.

use ferry_ram::VolatileSlice;

/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 64;
/// Most pages (normal + zero) one packet may describe.
pub const MAX_PACKET_PAGES: u32 = 4096;

const MAGIC: [u8; 4] = *b"FMFD";
const VERSION: u16 = 1;

pub const FLAG_SYNC: u16 = 1;
pub const FLAG_END: u16 = 2;
pub const FLAG_CHECKSUM: u16 = 4;
pub const FLAG_PAGE_CRCS: u16 = 8;
pub const FLAG_COMPRESSED: u16 = 16;
const KNOWN_FLAGS: u16 = FLAG_SYNC | FLAG_END | FLAG_CHECKSUM | FLAG_PAGE_CRCS | FLAG_COMPRESSED;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketHeader {
    pub flags: u16,
    pub block: u32,
    pub normal: u32,
    pub zero: u32,
    pub page_size: u32,
    pub seq: u64,
    pub payload_len: u64,
    pub generation: u64,
    pub payload_crc: u32,
    pub header_crc: u32,
    /// With COMPRESSED: normal pages inside the zstd frame (C).
    pub compressed_pages: u32,
}

impl PacketHeader {
    pub fn pages(&self) -> usize {
        self.normal as usize + self.zero as usize
    }
    pub fn is_sync(&self) -> bool {
        self.flags & FLAG_SYNC != 0
    }
    pub fn is_end(&self) -> bool {
        self.flags & FLAG_END != 0
    }
    pub fn has_checksum(&self) -> bool {
        self.flags & FLAG_CHECKSUM != 0
    }
    pub fn has_page_crcs(&self) -> bool {
        self.flags & FLAG_PAGE_CRCS != 0
    }
    pub fn is_compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }
    /// Bytes the payload's pages hold (uncompressed).
    pub fn pages_len(&self) -> u64 {
        u64::from(self.normal) * u64::from(self.page_size)
    }
    /// With COMPRESSED: bytes of the zstd frame (the raw pages follow it).
    pub fn frame_len(&self) -> u64 {
        let raw = u64::from(self.normal - self.compressed_pages) * u64::from(self.page_size);
        self.payload_len - raw
    }

    /// Writes the header; `header_crc` is taken as given (see [`PacketHeader::seal`]).
    pub fn encode(&self, b: &mut [u8; HEADER_LEN]) {
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.block.to_le_bytes());
        b[12..16].copy_from_slice(&self.normal.to_le_bytes());
        b[16..20].copy_from_slice(&self.zero.to_le_bytes());
        b[20..24].copy_from_slice(&self.page_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.seq.to_le_bytes());
        b[32..40].copy_from_slice(&self.payload_len.to_le_bytes());
        b[40..48].copy_from_slice(&self.generation.to_le_bytes());
        b[48..52].copy_from_slice(&self.payload_crc.to_le_bytes());
        b[52..56].copy_from_slice(&self.header_crc.to_le_bytes());
        b[56..60].copy_from_slice(&self.compressed_pages.to_le_bytes());
        b[60..64].fill(0);
    }

    /// Encodes the header with its header crc computed over bytes 0..52 and
    /// `offsets` (when the CHECKSUM flag is set).
    pub fn seal(&mut self, b: &mut [u8; HEADER_LEN], offsets: &[u64]) {
        self.seal_with_page_crcs(b, offsets, &[]);
    }

    /// Like [`PacketHeader::seal`], the header crc also covering `page_crcs`.
    pub fn seal_with_page_crcs(
        &mut self,
        b: &mut [u8; HEADER_LEN],
        offsets: &[u64],
        page_crcs: &[u32],
    ) {
        self.header_crc = 0;
        self.encode(b);
        if self.has_checksum() {
            self.header_crc = header_crc(b, offsets, page_crcs);
            b[52..56].copy_from_slice(&self.header_crc.to_le_bytes());
        }
    }

    /// Where each part of this packet's body lies (see [`Body`]).
    pub fn body(&self) -> Body {
        Body::of(self)
    }

    /// Parses and checks what can be checked without the block list.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, PacketError> {
        if b[0..4] != MAGIC {
            return Err(PacketError::Magic([b[0], b[1], b[2], b[3]]));
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let version = u16_at(4);
        if version != VERSION {
            return Err(PacketError::Version(version));
        }
        let h = Self {
            flags: u16_at(6),
            block: u32_at(8),
            normal: u32_at(12),
            zero: u32_at(16),
            page_size: u32_at(20),
            seq: u64_at(24),
            payload_len: u64_at(32),
            generation: u64_at(40),
            payload_crc: u32_at(48),
            header_crc: u32_at(52),
            compressed_pages: u32_at(56),
        };
        if u32_at(60) != 0 {
            return Err(PacketError::Reserved);
        }
        if h.flags & !KNOWN_FLAGS != 0 {
            return Err(PacketError::UnknownFlags(h.flags));
        }
        if h.has_page_crcs() && !h.has_checksum() {
            return Err(PacketError::PageCrcsWithoutChecksum);
        }
        if (h.is_sync() || h.is_end()) && (h.pages() != 0 || h.payload_len != 0) {
            return Err(PacketError::MarkerWithPages);
        }
        if h.normal as u64 + h.zero as u64 > u64::from(MAX_PACKET_PAGES) {
            return Err(PacketError::TooManyPages {
                normal: h.normal,
                zero: h.zero,
            });
        }
        if h.is_compressed() {
            let c = h.compressed_pages;
            let raw = u64::from(h.normal.saturating_sub(c)) * u64::from(h.page_size);
            if c == 0 || c > h.normal {
                return Err(PacketError::CompressedPages {
                    compressed: c,
                    normal: h.normal,
                });
            }
            if h.payload_len <= raw || h.payload_len >= h.pages_len() {
                return Err(PacketError::FrameLength {
                    payload_len: h.payload_len,
                    normal: h.normal,
                    page_size: h.page_size,
                    compressed: c,
                });
            }
        } else if h.compressed_pages != 0 {
            return Err(PacketError::CompressedPagesWithoutFlag);
        } else if h.payload_len != h.pages_len() {
            return Err(PacketError::PayloadLength {
                payload_len: h.payload_len,
                normal: h.normal,
                page_size: h.page_size,
            });
        }
        Ok(h)
    }

    /// Checks the header crc against the raw header bytes and the offsets.
    pub fn header_crc_ok(&self, b: &[u8; HEADER_LEN], offsets: &[u64]) -> bool {
        self.header_crc_ok_with(b, offsets, &[])
    }

    /// Checks the header crc over the header, the offsets and the page crcs.
    pub fn header_crc_ok_with(
        &self,
        b: &[u8; HEADER_LEN],
        offsets: &[u64],
        page_crcs: &[u32],
    ) -> bool {
        !self.has_checksum() || header_crc(b, offsets, page_crcs) == self.header_crc
    }
}

/// Why a header is refused on its own, before the block list is looked at.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("bad magic {0:02x?} (expected \"FMFD\")")]
    Magic([u8; 4]),
    #[error("packet version {0}, expected {VERSION}")]
    Version(u16),
    #[error("reserved header bytes 60..64 are not zero")]
    Reserved,
    #[error("unknown flags {0:#x}")]
    UnknownFlags(u16),
    #[error("per-page crcs without the CHECKSUM flag")]
    PageCrcsWithoutChecksum,
    #[error("a SYNC or END packet carries pages")]
    MarkerWithPages,
    #[error("{normal} + {zero} pages, more than the {MAX_PACKET_PAGES} a packet may hold")]
    TooManyPages { normal: u32, zero: u32 },
    #[error("{compressed} compressed pages in a packet of {normal} normal pages")]
    CompressedPages { compressed: u32, normal: u32 },
    #[error("compressed payload of {payload_len} bytes for {normal} pages of {page_size} bytes, {compressed} of them compressed (the frame must be smaller than its pages, and not empty)")]
    FrameLength {
        payload_len: u64,
        normal: u32,
        page_size: u32,
        compressed: u32,
    },
    #[error("compressed page count without the COMPRESSED flag")]
    CompressedPagesWithoutFlag,
    #[error("payload of {payload_len} bytes for {normal} pages of {page_size} bytes")]
    PayloadLength {
        payload_len: u64,
        normal: u32,
        page_size: u32,
    },
}

/// The parts of a packet before its payload, as a sender's gather list
/// holds them: header, offsets, page crcs. The payload's runs follow.
pub const PAYLOAD_IOV: usize = 3;

/// Where each part of a packet lies, in bytes from the packet's start: the
/// one statement of the body's layout, used by the sender to build its
/// gather list and count what it sent, and by the receiver to read the
/// parts in order. Header, then `normal + zero` offsets (normal pages
/// first), then (PAGE_CRCS) one crc per normal page, then the payload: the
/// zstd frame of the first C normal pages (COMPRESSED), then the other
/// normal pages raw, in offset order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Body {
    /// Offsets: `normal + zero` little-endian u64s.
    pub offsets: std::ops::Range<u64>,
    /// Page crcs: `normal` little-endian u32s with PAGE_CRCS, else empty.
    pub page_crcs: std::ops::Range<u64>,
    /// The zstd frame of the first C normal pages (empty unless COMPRESSED).
    pub frame: std::ops::Range<u64>,
    /// The raw normal pages (all of them unless COMPRESSED).
    pub raw: std::ops::Range<u64>,
    /// Normal pages whose bytes the frame holds (C, or 0).
    pub framed_pages: usize,
    /// Normal pages: the first `normal` offsets; zero pages the rest.
    pub normal: usize,
}

impl Body {
    /// The layout a (decoded or built) header describes.
    pub fn of(h: &PacketHeader) -> Self {
        let offsets_end = HEADER_LEN as u64 + 8 * h.pages() as u64;
        let crcs = if h.has_page_crcs() {
            4 * u64::from(h.normal)
        } else {
            0
        };
        let payload = offsets_end + crcs;
        let frame = if h.is_compressed() { h.frame_len() } else { 0 };
        Self {
            offsets: HEADER_LEN as u64..offsets_end,
            page_crcs: offsets_end..payload,
            frame: payload..payload + frame,
            raw: payload + frame..payload + h.payload_len,
            framed_pages: if h.is_compressed() {
                h.compressed_pages as usize
            } else {
                0
            },
            normal: h.normal as usize,
        }
    }

    /// Bytes of the offsets.
    pub fn offsets_len(&self) -> usize {
        (self.offsets.end - self.offsets.start) as usize
    }

    /// Bytes of the page crcs.
    pub fn page_crcs_len(&self) -> usize {
        (self.page_crcs.end - self.page_crcs.start) as usize
    }

    /// The whole packet's length on the wire (ferry framing, before TLS).
    pub fn wire_len(&self) -> u64 {
        self.raw.end
    }
}

fn header_crc(b: &[u8; HEADER_LEN], offsets: &[u64], page_crcs: &[u32]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&b[0..52]);
    h.update(&b[56..64]);
    h.update(offsets_as_bytes(offsets));
    h.update(page_crcs_as_bytes(page_crcs));
    h.finalize()
}

/// crc32 of one page of guest memory others may be writing, read in place
/// ([`ferry_ram::crc32`] loads it without forming a `&[u8]`).
pub fn page_crc(page: &VolatileSlice) -> u32 {
    ferry_ram::crc32(0, page)
}

/// crc32 of bytes nobody writes meanwhile (a page this thread received).
pub fn bytes_crc(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// Per-page crcs as they travel: little-endian u32s.
pub fn page_crcs_as_bytes(crcs: &[u32]) -> &[u8] {
    // SAFETY: u32 has no padding and any byte pattern is a valid u8; the
    // slice covers exactly the crcs' memory.
    unsafe { std::slice::from_raw_parts(crcs.as_ptr().cast(), std::mem::size_of_val(crcs)) }
}

/// The page crc array as received, mutable, for reading from the wire.
pub fn page_crcs_as_bytes_mut(crcs: &mut [u32]) -> &mut [u8] {
    // SAFETY: as above; every byte pattern is a valid u32.
    unsafe { std::slice::from_raw_parts_mut(crcs.as_mut_ptr().cast(), std::mem::size_of_val(crcs)) }
}

/// crc32 of a payload given as the iovecs over its pages, in order: the
/// same value whether adjacent pages were merged into runs or not. Each run
/// is read in place by [`ferry_ram::crc32`], so others may write the pages
/// meanwhile (a page that changes fails its check, or goes again as dirty).
///
/// # Safety
/// Every iovec must point at `iov_len` bytes of memory that stays mapped
/// and readable for the whole call (guest RAM the caller holds).
pub unsafe fn payload_crc(runs: &[libc::iovec]) -> u32 {
    runs.iter().fold(0, |crc, run| {
        // SAFETY: the caller's guarantee: the run is mapped and readable
        // for the call; VolatileSlice tolerates concurrent writers.
        let mem = unsafe { VolatileSlice::new(run.iov_base.cast::<u8>(), run.iov_len) };
        ferry_ram::crc32(crc, &mem)
    })
}

/// crc32 of a payload as [`payload_crc`] computes it, over runs nobody
/// writes meanwhile, read in place.
///
/// # Safety
/// Every iovec must point at `iov_len` readable bytes that stay mapped,
/// and that no thread, guest or kernel I/O writes, for the whole call
/// (pages a receiver thread claimed and has finished reading into).
pub unsafe fn payload_crc_unshared(runs: &[libc::iovec]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    for run in runs {
        // SAFETY: the caller's guarantee: readable, mapped, and unwritten
        // while this reference lives.
        crc.update(unsafe { std::slice::from_raw_parts(run.iov_base.cast::<u8>(), run.iov_len) });
    }
    crc.finalize()
}

/// The offsets as they travel: little-endian u64s (this is a little-endian
/// host; see the compile-time check below).
pub fn offsets_as_bytes(offsets: &[u64]) -> &[u8] {
    // SAFETY: u64 has no padding and any byte pattern is a valid u8; the
    // slice covers exactly the offsets' memory.
    unsafe { std::slice::from_raw_parts(offsets.as_ptr().cast(), std::mem::size_of_val(offsets)) }
}

/// The offset array as received, mutable, for reading straight from the wire.
pub fn offsets_as_bytes_mut(offsets: &mut [u64]) -> &mut [u8] {
    // SAFETY: as above; every byte pattern is a valid u64.
    unsafe {
        std::slice::from_raw_parts_mut(offsets.as_mut_ptr().cast(), std::mem::size_of_val(offsets))
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!("ferry's wire formats are little-endian and its data path sends u64 offsets as they lie in memory");

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> PacketHeader {
        PacketHeader {
            flags: FLAG_CHECKSUM,
            block: 2,
            normal: 3,
            zero: 1,
            page_size: 4096,
            seq: 9,
            payload_len: 3 * 4096,
            generation: 1,
            payload_crc: 0xdead_beef,
            header_crc: 0,
            compressed_pages: 0,
        }
    }

    #[test]
    fn round_trip_and_crc() {
        let mut h = sample();
        let mut b = [0u8; HEADER_LEN];
        let offsets = [0u64, 4096, 8192, 65536];
        h.seal(&mut b, &offsets);
        let d = PacketHeader::decode(&b).unwrap();
        assert_eq!(d, h);
        assert!(d.header_crc_ok(&b, &offsets));
        assert!(!d.header_crc_ok(&b, &[0, 4096, 8192, 69632]));
    }

    #[test]
    fn inconsistent_headers_are_refused() {
        let mut b = [0u8; HEADER_LEN];
        let mut h = sample();
        h.payload_len = 5;
        h.encode(&mut b);
        assert!(PacketHeader::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("payload of 5 bytes"));
        let mut h = sample();
        h.normal = MAX_PACKET_PAGES;
        h.payload_len = u64::from(h.normal) * 4096;
        h.encode(&mut b);
        assert!(PacketHeader::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("more than"));
        b[0] = b'X';
        assert!(PacketHeader::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("bad magic"));
    }

    #[test]
    fn page_crcs_are_covered_and_need_the_checksum_flag() {
        let mut b = [0u8; HEADER_LEN];
        let mut h = sample();
        h.flags = FLAG_CHECKSUM | FLAG_PAGE_CRCS;
        let offsets = [0u64, 4096, 8192, 65536];
        let crcs = [1u32, 2, 3];
        h.seal_with_page_crcs(&mut b, &offsets, &crcs);
        let d = PacketHeader::decode(&b).unwrap();
        assert!(d.has_page_crcs());
        assert!(d.header_crc_ok_with(&b, &offsets, &crcs));
        assert!(!d.header_crc_ok_with(&b, &offsets, &[1, 2, 4]));
        h.flags = FLAG_PAGE_CRCS;
        h.encode(&mut b);
        assert!(PacketHeader::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("CHECKSUM"));
        assert_eq!(bytes_crc(&[0u8; 4096]), crc32fast::hash(&[0u8; 4096]));
        let b = ferry_ram::RamBlock::anonymous("t", 2 * 4096, 4096).unwrap();
        let data: Vec<u8> = (0..4096).map(|i| (i % 253) as u8).collect();
        b.page_slice(1).unwrap().copy_from(&data);
        assert_eq!(page_crc(&b.page_slice(1).unwrap()), crc32fast::hash(&data));
    }

    #[test]
    fn compressed_headers_are_checked() {
        let mut b = [0u8; HEADER_LEN];
        let mut h = sample();
        h.flags |= FLAG_COMPRESSED;
        // 3 normal pages, the first 2 in a 100-byte frame, the third raw.
        h.compressed_pages = 2;
        h.payload_len = 100 + 4096;
        h.seal(&mut b, &[0, 4096, 8192, 65536]);
        let d = PacketHeader::decode(&b).unwrap();
        assert_eq!((d.compressed_pages, d.frame_len()), (2, 100));
        assert!(d.header_crc_ok(&b, &[0, 4096, 8192, 65536]));
        // The count is covered by the header crc.
        b[56] = 3;
        assert!(!PacketHeader::decode(&b)
            .unwrap()
            .header_crc_ok(&b, &[0, 4096, 8192, 65536]));
        for (c, len, why) in [
            (0, 100, "0 compressed pages"),
            (4, 100, "4 compressed pages"),
            (2, 4096, "must be smaller"),
            (2, 3 * 4096, "must be smaller"),
        ] {
            h.compressed_pages = c;
            h.payload_len = len;
            h.encode(&mut b);
            let e = PacketHeader::decode(&b).unwrap_err().to_string();
            assert!(e.contains(why), "{c} {len}: {e}");
        }
        let mut h = sample();
        h.compressed_pages = 1;
        h.encode(&mut b);
        assert!(PacketHeader::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("without the COMPRESSED flag"));
    }

    #[test]
    fn body_layout_says_where_each_part_lies() {
        let mut h = sample();
        let b = h.body();
        assert_eq!(b.offsets, 64..64 + 4 * 8);
        assert!(b.page_crcs.is_empty() && b.frame.is_empty());
        assert_eq!(b.raw, 96..96 + 3 * 4096);
        assert_eq!(b.wire_len(), 96 + 3 * 4096);
        h.flags |= FLAG_PAGE_CRCS | FLAG_COMPRESSED;
        h.compressed_pages = 2;
        h.payload_len = 100 + 4096;
        let b = h.body();
        assert_eq!(b.page_crcs, 96..96 + 12);
        assert_eq!(b.frame, 108..208);
        assert_eq!(b.raw, 208..208 + 4096);
        assert_eq!((b.framed_pages, b.normal), (2, 3));
        let marker = PacketHeader {
            flags: FLAG_SYNC,
            ..Default::default()
        };
        assert_eq!(marker.body().wire_len(), HEADER_LEN as u64);
    }

    #[test]
    fn decode_errors_are_typed() {
        let mut b = [0u8; HEADER_LEN];
        let mut h = sample();
        h.normal = 4000;
        h.zero = 100;
        h.payload_len = 4000 * 4096;
        h.encode(&mut b);
        assert_eq!(
            PacketHeader::decode(&b),
            Err(PacketError::TooManyPages {
                normal: 4000,
                zero: 100
            })
        );
        b[4] = 9;
        assert_eq!(PacketHeader::decode(&b), Err(PacketError::Version(9)));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), HEADER_LEN)) {
            let b: [u8; HEADER_LEN] = bytes.try_into().unwrap();
            let _ = PacketHeader::decode(&b);
        }
    }
}
