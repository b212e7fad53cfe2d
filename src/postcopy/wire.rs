//! Postcopy's wire formats, each parsed here and nowhere else (integers
//! little-endian).
//!
//! # Page request (destination → source, the return path's PAGE_REQUEST)
//!
//! | offset | size | field                                           |
//! |-------:|-----:|-------------------------------------------------|
//! |      0 |    2 | block index, in SETUP's block order             |
//! |      2 |    8 | offset of the first page in the block, in bytes |
//! |     10 |    4 | length in bytes: whole pages, at most           |
//! |        |      | [`MAX_REQUEST_PAGES`] of them                   |
//!
//! 14 bytes. The source checks every field against its guest memory
//! ([`check_request`]) before it reads a byte. A fault in a 2 MiB region
//! of which no page has come yet asks for the whole region (512 pages),
//! which is answered in page order and placed as one huge page; a fault
//! elsewhere asks for its own page.
//!
//! # Page frame (source → destination, the preempt channel and, after the
//! switch, the multifd channels)
//!
//! | offset | size | field                                           |
//! |-------:|-----:|-------------------------------------------------|
//! |      0 |    4 | magic, the bytes `FPCP`                         |
//! |      4 |    2 | block index                                     |
//! |      6 |    2 | flags: bit 0 the pages are zeros (no payload);  |
//! |        |      | bit 1 end of this channel's stream (no pages:   |
//! |        |      | block, offset and pages are 0)                  |
//! |      8 |    8 | offset of the first page in the block, in bytes |
//! |     16 |    4 | pages N, 1 to [`MAX_RUN_PAGES`] (0 with END)     |
//! |     20 |    4 | CRC-32 (IEEE) of bytes 0..20 and the payload    |
//! |     24 |    P | payload: N × page size bytes, none if zeros     |
//!
//! The destination checks the header ([`check_run`]) before reading the
//! payload into a private buffer, checks the CRC, and only then places the
//! pages (UFFDIO_COPY / UFFDIO_ZEROPAGE).
//!
//! # Discard list (inside the postcopy package, and the body of EARLY_DISCARD)
//!
//! | size     | field                                                |
//! |---------:|------------------------------------------------------|
//! |        2 | block count B, equal to SETUP's                      |
//! | B times: |                                                      |
//! |        8 | pages in the block, equal to SETUP's                 |
//! |  8 × W   | W = ⌈pages / 64⌉ bitmap words; bit i of word w set:  |
//! |          | page 64w + i is stale (dirty at the switch); bits    |
//! |          | past the block's pages must be 0                     |
//!
//! EARLY_DISCARD carries the pages dirty when the source decided to
//! switch, its guest still running; the destination drops them then, and
//! the package's list, a superset, is dropped at the switch only for the
//! pages EARLY_DISCARD did not name.
//!
//! # Received-pages bitmap (recovery: destination → source, first bytes on
//! the re-connected main channel, before any main-channel message)
//!
//! | size | field                                                    |
//! |-----:|----------------------------------------------------------|
//! |    4 | magic, the bytes `FPCR`                                  |
//! |    4 | length L of the bitmap; must equal the size the guest's  |
//! |      | blocks give ([`bitmap_len`]), checked before it is read  |
//! |    L | the bitmap, laid out as the discard list: bit set = the  |
//! |      | destination holds the page (placed, or never discarded)  |
//! |    4 | CRC-32 (IEEE) of the magic, the length and the bitmap    |
//!
//! The source sends again exactly the discarded pages whose bit is clear
//! ([`still_missing`]); a bitmap whose blocks or page counts differ from
//! the guest's, with bits past a block's end, or that fails its CRC, is
//! refused naming what is wrong, and nothing is sent.
//!
//! # Postcopy package (source → destination, the main channel's
//! POSTCOPY_PACKAGE, read whole before anything in it is used)
//!
//! | size | field                                                    |
//! |-----:|----------------------------------------------------------|
//! |    4 | discard list length D                                    |
//! |    D | the discard list                                         |
//! | rest | the guest's device state                                 |

use ferry_ram::{BlockSpec, PageBitmap};

use super::PostcopyError;

/// The most pages one frame carries (256 KiB of 4 KiB pages).
pub const MAX_RUN_PAGES: u32 = 64;
/// The most pages one request asks for: one 2 MiB huge page of 4 KiB pages.
pub const MAX_REQUEST_PAGES: u32 = 512;
/// A page request's size on the wire.
pub const REQUEST_LEN: usize = 14;
/// A page frame's header size.
pub const FRAME_HEADER_LEN: usize = 24;
pub const FRAME_MAGIC: [u8; 4] = *b"FPCP";
pub const FLAG_ZERO: u16 = 1;
pub const FLAG_END: u16 = 2;

/// A run of pages of one block: what a request asks for and what a frame
/// carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun {
    pub block: u16,
    /// Bytes from the block's start to the run's first page.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
}

impl PageRun {
    pub fn encode_request(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..2].copy_from_slice(&self.block.to_le_bytes());
        b[2..10].copy_from_slice(&self.offset.to_le_bytes());
        b[10..14].copy_from_slice(&(self.len as u32).to_le_bytes());
        b
    }

    /// A request's fields, unchecked (see [`check_run`]).
    pub fn decode_request(b: &[u8; REQUEST_LEN]) -> Self {
        Self {
            block: u16::from_le_bytes([b[0], b[1]]),
            offset: u64::from_le_bytes(b[2..10].try_into().expect("8 bytes")),
            len: u64::from(u32::from_le_bytes(b[10..14].try_into().expect("4 bytes"))),
        }
    }
}

/// Checks a frame's `run` against the guest's blocks: a known block, page
/// aligned, whole pages, 1 to [`MAX_RUN_PAGES`] of them, inside the block.
/// Returns the block's page size and the run's first page. `channel`
/// names where the run came from.
pub fn check_run(
    blocks: &[BlockSpec],
    run: &PageRun,
    channel: &str,
) -> Result<(u64, u64), PostcopyError> {
    check_pages(blocks, run, channel, MAX_RUN_PAGES)
}

/// [`check_run`] for a page request: up to [`MAX_REQUEST_PAGES`].
pub fn check_request(
    blocks: &[BlockSpec],
    run: &PageRun,
    channel: &str,
) -> Result<(u64, u64), PostcopyError> {
    check_pages(blocks, run, channel, MAX_REQUEST_PAGES)
}

fn check_pages(
    blocks: &[BlockSpec],
    run: &PageRun,
    channel: &str,
    max_pages: u32,
) -> Result<(u64, u64), PostcopyError> {
    let Some(b) = blocks.get(usize::from(run.block)) else {
        return Err(PostcopyError::UnknownBlock {
            channel: channel.into(),
            block: run.block,
            blocks: blocks.len(),
        });
    };
    let ps = u64::from(b.page_size);
    let bad = |why: &'static str| PostcopyError::BadRun {
        channel: channel.into(),
        block: b.name.clone(),
        offset: run.offset,
        len: run.len,
        why,
    };
    if !run.offset.is_multiple_of(ps) || !run.len.is_multiple_of(ps) {
        return Err(bad("not aligned to the block's pages"));
    }
    if run.len == 0 || run.len / ps > u64::from(max_pages) {
        return Err(bad(if max_pages == MAX_REQUEST_PAGES {
            "not 1 to 512 pages"
        } else {
            "not 1 to 64 pages"
        }));
    }
    if run
        .offset
        .checked_add(run.len)
        .is_none_or(|end| end > b.len)
    {
        return Err(bad("outside the block"));
    }
    Ok((ps, run.offset / ps))
}

/// A page frame's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub run: PageRun,
    pub flags: u16,
    /// Pages in the run (0 with END).
    pub pages: u32,
    pub crc: u32,
}

impl FrameHeader {
    /// The header's first 20 bytes (what the CRC covers with the payload).
    pub fn head(block: u16, flags: u16, offset: u64, pages: u32) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[0..4].copy_from_slice(&FRAME_MAGIC);
        b[4..6].copy_from_slice(&block.to_le_bytes());
        b[6..8].copy_from_slice(&flags.to_le_bytes());
        b[8..16].copy_from_slice(&offset.to_le_bytes());
        b[16..20].copy_from_slice(&pages.to_le_bytes());
        b
    }

    /// Parses a header: magic and flags checked, the run not (see
    /// [`check_run`]); `page_size` turns pages into the run's length.
    pub fn decode(
        b: &[u8; FRAME_HEADER_LEN],
        blocks: &[BlockSpec],
        channel: &str,
    ) -> Result<Self, PostcopyError> {
        let bad = |why: String| PostcopyError::BadFrame {
            channel: channel.into(),
            why,
        };
        if b[0..4] != FRAME_MAGIC {
            return Err(bad(format!(
                "bad magic {:02x?} (not a ferry postcopy page frame)",
                &b[0..4]
            )));
        }
        let block = u16::from_le_bytes([b[4], b[5]]);
        let flags = u16::from_le_bytes([b[6], b[7]]);
        let offset = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        let pages = u32::from_le_bytes(b[16..20].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(b[20..24].try_into().expect("4 bytes"));
        if flags & !(FLAG_ZERO | FLAG_END) != 0 {
            return Err(bad(format!("unknown flags {flags:#06x}")));
        }
        if flags & FLAG_END != 0 {
            if flags != FLAG_END || block != 0 || offset != 0 || pages != 0 {
                return Err(bad("END frame with pages".into()));
            }
            return Ok(Self {
                run: PageRun {
                    block: 0,
                    offset: 0,
                    len: 0,
                },
                flags,
                pages: 0,
                crc,
            });
        }
        let ps = blocks
            .get(usize::from(block))
            .map_or(1, |b| u64::from(b.page_size));
        Ok(Self {
            run: PageRun {
                block,
                offset,
                len: u64::from(pages).saturating_mul(ps),
            },
            flags,
            pages,
            crc,
        })
    }
}

/// The CRC a frame carries.
pub fn frame_crc(head: &[u8; 20], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(head);
    h.update(payload);
    h.finalize()
}

/// Encodes the discard list: one bitmap per block.
pub fn encode_discard(discard: &[PageBitmap]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(discard.len() as u16).to_le_bytes());
    for bits in discard {
        b.extend_from_slice(&bits.pages().to_le_bytes());
        for w in bits.to_words() {
            b.extend_from_slice(&w.to_le_bytes());
        }
    }
    b
}

/// Parses a discard list against the guest's blocks: every block, its page
/// count, no page past its end.
pub fn decode_discard(b: &[u8], blocks: &[BlockSpec]) -> Result<Vec<PageBitmap>, PostcopyError> {
    decode_bitmaps(b, blocks).map_err(PostcopyError::BadDiscard)
}

/// Parses one bitmap per block (the discard list's layout) against the
/// guest's blocks; the error text says what is wrong.
fn decode_bitmaps(b: &[u8], blocks: &[BlockSpec]) -> Result<Vec<PageBitmap>, String> {
    let bad = |why: String| why;
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], String> {
        let end = at
            .checked_add(n)
            .filter(|&e| e <= b.len())
            .ok_or_else(|| format!("{} bytes end early (wanted {n} more at {at})", b.len()))?;
        let s = &b[at..end];
        at = end;
        Ok(s)
    };
    let count = u16::from_le_bytes(take(2)?.try_into().expect("2 bytes"));
    if usize::from(count) != blocks.len() {
        return Err(bad(format!(
            "{count} block(s), the guest has {}",
            blocks.len()
        )));
    }
    let mut out = Vec::with_capacity(blocks.len());
    for spec in blocks {
        let pages = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
        let ours = spec.len / u64::from(spec.page_size);
        if pages != ours {
            return Err(bad(format!(
                "block '{}' of {pages} pages, the guest's has {ours}",
                spec.name
            )));
        }
        let words = take(pages.div_ceil(64) as usize * 8)?
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
            .collect::<Vec<_>>();
        let bits = PageBitmap::from_words(pages, &words).ok_or_else(|| {
            bad(format!(
                "block '{}': pages past its end ({pages} pages) are set",
                spec.name
            ))
        })?;
        out.push(bits);
    }
    if at != b.len() {
        return Err(bad(format!("{} stray bytes at the end", b.len() - at)));
    }
    Ok(out)
}

/// The size of a bitmap in the discard list's layout for `blocks`.
pub fn bitmap_len(blocks: &[BlockSpec]) -> usize {
    2 + blocks
        .iter()
        .map(|b| 8 + 8 * (b.len / u64::from(b.page_size)).div_ceil(64) as usize)
        .sum::<usize>()
}

/// The received-pages bitmap's magic.
pub const RECEIVED_MAGIC: [u8; 4] = *b"FPCR";

/// Encodes the received-pages bitmap frame (see the module doc).
pub fn encode_received(received: &[PageBitmap]) -> Vec<u8> {
    let list = encode_discard(received);
    let mut b = Vec::with_capacity(12 + list.len());
    b.extend_from_slice(&RECEIVED_MAGIC);
    b.extend_from_slice(&(list.len() as u32).to_le_bytes());
    b.extend_from_slice(&list);
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Reads the received-pages bitmap frame from `read` (an exact reader of
/// the re-connected main channel), every field checked against `blocks`
/// before it is used; `channel` names where it came from.
pub fn read_received(
    read: &mut dyn FnMut(&mut [u8]) -> std::io::Result<()>,
    blocks: &[BlockSpec],
    channel: &str,
) -> Result<Vec<PageBitmap>, PostcopyError> {
    let bad = |why: String| PostcopyError::BadReceived {
        channel: channel.into(),
        why,
    };
    let io = |source| PostcopyError::Io {
        channel: channel.into(),
        what: "reading the received-pages bitmap",
        source,
    };
    let mut head = [0u8; 8];
    read(&mut head).map_err(io)?;
    if head[0..4] != RECEIVED_MAGIC {
        return Err(bad(format!(
            "bad magic {:02x?} (not a received-pages bitmap)",
            &head[0..4]
        )));
    }
    let len = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes")) as usize;
    let want = bitmap_len(blocks);
    if len != want {
        return Err(bad(format!(
            "{len} bytes announced, the guest's blocks make {want}"
        )));
    }
    let mut body = vec![0u8; len + 4];
    read(&mut body).map_err(io)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&head);
    h.update(&body[..len]);
    let (got, sent) = (
        h.finalize(),
        u32::from_le_bytes(body[len..].try_into().expect("4 bytes")),
    );
    if got != sent {
        return Err(bad(format!("CRC {got:#010x}, the frame says {sent:#010x}")));
    }
    decode_bitmaps(&body[..len], blocks).map_err(bad)
}

/// The pages to send again after a recovery: discarded at the switch and
/// not in the destination's received bitmap.
pub fn still_missing(discard: &[PageBitmap], received: &[PageBitmap]) -> Vec<PageBitmap> {
    discard
        .iter()
        .zip(received)
        .map(|(d, r)| {
            let words: Vec<u64> = d
                .to_words()
                .iter()
                .zip(r.to_words())
                .map(|(d, r)| d & !r)
                .collect();
            PageBitmap::from_words(d.pages(), &words).expect("bits of the discard list")
        })
        .collect()
}

/// A package that comes before any pass (`--postcopy-after 0`) must name
/// every page in its discard list: none has been sent, so a page left out
/// would be taken as final without ever arriving. Refuses one that leaves
/// pages out, naming the first such block.
pub fn check_whole_discard(discard: &[PageBitmap]) -> Result<(), PostcopyError> {
    match discard
        .iter()
        .enumerate()
        .find(|(_, d)| d.count() != d.pages())
    {
        None => Ok(()),
        Some((block, d)) => Err(PostcopyError::BadDiscard(format!(
            "the package came before any pass, but its discard list leaves {} of block \
             {block}'s {} pages out: they were never sent",
            d.pages() - d.count(),
            d.pages()
        ))),
    }
}

/// The package: discard list and device state.
pub fn encode_package(discard: &[PageBitmap], device_state: &[u8]) -> Vec<u8> {
    let list = encode_discard(discard);
    let mut b = Vec::with_capacity(4 + list.len() + device_state.len());
    b.extend_from_slice(&(list.len() as u32).to_le_bytes());
    b.extend_from_slice(&list);
    b.extend_from_slice(device_state);
    b
}

/// Splits a package into its discard list (checked against `blocks`) and
/// the device state.
pub fn decode_package(
    b: &[u8],
    blocks: &[BlockSpec],
) -> Result<(Vec<PageBitmap>, Vec<u8>), PostcopyError> {
    let Some(len) = b.get(..4) else {
        return Err(PostcopyError::BadDiscard(format!(
            "package of {} bytes has no discard length",
            b.len()
        )));
    };
    let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
    let Some(list) = b.get(4..4 + len) else {
        return Err(PostcopyError::BadDiscard(format!(
            "discard list of {len} bytes in a package of {}",
            b.len()
        )));
    };
    Ok((decode_discard(list, blocks)?, b[4 + len..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_package_before_any_pass_must_discard_every_page() {
        let whole = PageBitmap::new(100, true);
        let short = PageBitmap::new(64, true);
        short.test_and_clear(63);
        check_whole_discard(&[PageBitmap::new(100, true)]).unwrap();
        let e = check_whole_discard(&[whole, short])
            .unwrap_err()
            .to_string();
        assert!(e.contains("leaves 1 of block 1's 64 pages out"), "{e}");
    }

    fn blocks() -> Vec<BlockSpec> {
        vec![
            BlockSpec {
                name: "ram".into(),
                len: 1 << 20,
                page_size: 4096,
            },
            BlockSpec {
                name: "vram".into(),
                len: 100 * 4096,
                page_size: 4096,
            },
        ]
    }

    #[test]
    fn requests_round_trip_and_bad_ones_are_named() {
        let r = PageRun {
            block: 1,
            offset: 8192,
            len: 4096,
        };
        assert_eq!(PageRun::decode_request(&r.encode_request()), r);
        assert_eq!(
            check_request(&blocks(), &r, "return path").unwrap(),
            (4096, 2)
        );
        for (run, says) in [
            ((2, 0, 4096), "unknown block #2 (the guest has 2)"),
            ((0, 100, 4096), "not aligned"),
            ((0, 4096, 100), "not aligned"),
            ((0, 0, 0), "not 1 to 512 pages"),
            ((0, 0, 513 * 4096), "not 1 to 512 pages"),
            ((1, 99 * 4096, 8192), "outside the block"),
            ((1, !4095, 4096), "outside the block"),
        ] {
            let run = PageRun {
                block: run.0,
                offset: run.1,
                len: run.2,
            };
            let e = check_request(&blocks(), &run, "return path").unwrap_err();
            let t = e.to_string();
            assert!(t.contains(says) && t.contains("return path"), "{t}");
            if run.block < 2 {
                assert!(t.contains(&format!("offset {:#x}", run.offset)), "{t}");
            }
        }
    }

    #[test]
    fn discard_lists_round_trip_and_outside_ones_are_refused() {
        let d = vec![PageBitmap::new(256, false), PageBitmap::new(100, false)];
        d[0].set(3);
        d[1].set(99);
        let (back, ds) = decode_package(&encode_package(&d, b"dev"), &blocks()).unwrap();
        assert_eq!(ds, b"dev");
        assert_eq!(back[0].iter_set().collect::<Vec<_>>(), [3]);
        assert_eq!(back[1].iter_set().collect::<Vec<_>>(), [99]);
        // A page past the end of "vram": bit 100 of its second word.
        let mut bad = encode_discard(&d);
        let last = bad.len() - 8;
        bad[last + 4] = 0x10; // bit 36 of word 1: page 100
        let e = decode_discard(&bad, &blocks()).err().unwrap().to_string();
        assert!(e.contains("block 'vram': pages past its end"), "{e}");
        // Wrong page count, wrong block count, truncated, stray bytes.
        let short = vec![PageBitmap::new(256, false), PageBitmap::new(99, false)];
        let e = decode_discard(&encode_discard(&short), &blocks())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("block 'vram' of 99 pages, the guest's has 100"),
            "{e}"
        );
        let e = decode_discard(&encode_discard(&d[..1]), &blocks())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("1 block(s), the guest has 2"), "{e}");
        let full = encode_discard(&d);
        let e = decode_discard(&full[..full.len() - 1], &blocks())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("end early"), "{e}");
        let mut more = full.clone();
        more.push(0);
        let e = decode_discard(&more, &blocks()).err().unwrap().to_string();
        assert!(e.contains("1 stray bytes"), "{e}");
        let e = decode_package(&[9, 0, 0, 0, 1], &blocks())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("discard list of 9 bytes in a package of 5"),
            "{e}"
        );
    }

    /// Reads a received-pages frame from bytes.
    fn read(b: &[u8]) -> Result<Vec<PageBitmap>, PostcopyError> {
        let mut at = 0;
        read_received(
            &mut |buf: &mut [u8]| {
                let end = at + buf.len();
                if end > b.len() {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                buf.copy_from_slice(&b[at..end]);
                at = end;
                Ok(())
            },
            &blocks(),
            "main (recovery)",
        )
    }

    /// Re-seals a frame's CRC after a test changed its bytes.
    fn reseal(b: &mut [u8]) {
        let n = b.len() - 4;
        let crc = crc32fast::hash(&b[..n]);
        b[n..].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn received_bitmaps_round_trip_and_bad_ones_are_refused_naming_why() {
        let r = vec![PageBitmap::new(256, false), PageBitmap::new(100, true)];
        r[0].set(7);
        let good = encode_received(&r);
        assert_eq!(good.len(), 8 + bitmap_len(&blocks()) + 4);
        let back = read(&good).unwrap();
        assert_eq!(back[0].iter_set().collect::<Vec<_>>(), [7]);
        assert_eq!(back[1].count(), 100);
        // Only the discarded pages not received are sent again.
        let d = vec![PageBitmap::new(256, false), PageBitmap::new(100, false)];
        for p in [3, 7, 9] {
            d[0].set(p);
        }
        d[1].set(5);
        let missing = still_missing(&d, &back);
        assert_eq!(missing[0].iter_set().collect::<Vec<_>>(), [3, 9]);
        assert_eq!(missing[1].count(), 0);

        let says = |b: &[u8], want: &str| {
            let e = read(b).err().unwrap().to_string();
            assert!(
                e.contains("main (recovery)") && e.contains(want),
                "wanted {want:?} in: {e}"
            );
        };
        let mut bad = good.clone();
        bad[0] = b'X';
        says(&bad, "received-pages bitmap: bad magic");
        // A length other than the guest's blocks make, larger or smaller:
        // refused before anything more is read.
        for len in [0u32, 1, u32::MAX, bitmap_len(&blocks()) as u32 + 8] {
            let mut bad = good.clone();
            bad[4..8].copy_from_slice(&len.to_le_bytes());
            says(
                &bad,
                &format!("{len} bytes announced, the guest's blocks make"),
            );
        }
        let mut bad = good.clone();
        bad[20] ^= 1;
        says(&bad, "CRC");
        // Sealed, but a page past the end of "vram" (page 100) is set.
        let mut bad = good.clone();
        let last = bad.len() - 4 - 8;
        bad[last + 4] |= 0x10;
        reseal(&mut bad);
        says(&bad, "block 'vram': pages past its end");
        // Sealed, but a block of the wrong page count (same size).
        let mut bad = good.clone();
        bad[8 + 2..8 + 10].copy_from_slice(&255u64.to_le_bytes());
        reseal(&mut bad);
        says(&bad, "block 'ram' of 255 pages, the guest's has 256");
        // Cut short.
        let e = read(&good[..good.len() - 1]).err().unwrap().to_string();
        assert!(e.contains("reading the received-pages bitmap"), "{e}");
    }

    #[test]
    fn frame_headers_are_checked() {
        let head = FrameHeader::head(1, FLAG_ZERO, 4096, 2);
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[..20].copy_from_slice(&head);
        b[20..].copy_from_slice(&frame_crc(&head, &[]).to_le_bytes());
        let h = FrameHeader::decode(&b, &blocks(), "preempt").unwrap();
        assert_eq!(h.run.len, 8192);
        assert_eq!(h.flags, FLAG_ZERO);
        let mut bad = b;
        bad[0] = b'X';
        let e = FrameHeader::decode(&bad, &blocks(), "preempt").unwrap_err();
        assert!(
            e.to_string().contains("preempt: bad page frame: bad magic"),
            "{e}"
        );
        let mut bad = b;
        bad[6] = 4;
        let e = FrameHeader::decode(&bad, &blocks(), "multifd[1]").unwrap_err();
        assert!(e.to_string().contains("multifd[1]"), "{e}");
        assert!(e.to_string().contains("unknown flags"), "{e}");
    }
}
