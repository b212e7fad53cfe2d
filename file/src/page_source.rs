//! Where a restore's pages come from: [`PageSource`] fills a range of a
//! block's guest pages into a buffer the caller owns, checked. Lazy restore
//! ([`crate::LazyRestore`]) reads through it, so the same fault and
//! prefetch threads can serve a guest from a saved file ([`SavedFile`], the
//! first implementation) or, for postcopy, from the network.

use std::os::unix::fs::FileExt;

use ferry_ram::mapped::{region_checksum, zero_checksum};
use ferry_ram::BlockSpec;

use crate::{FileError, SavedFile};

/// What [`PageSource::fill`] put in the buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filled {
    /// Pages of the range that hold data (not all zeros).
    pub present: u64,
    /// True when every page of the range is zeros and the buffer was left
    /// untouched: the caller places zeros (UFFDIO_ZEROPAGE) rather than
    /// the buffer.
    pub zeros: bool,
    /// Bytes the source read (from its file, or off the wire) to fill it.
    pub bytes_read: u64,
}

/// A source of guest pages: "fill this range of guest pages".
///
/// # Contract
///
/// - The source serves the blocks [`Self::blocks`] gives, in that order;
///   `block` is an index into them.
/// - Ranges are in pages of that block and are *units*: `first_page` is a
///   multiple of [`Self::unit`] bytes / the block's page size, and the
///   range runs one unit or up to the end of the block if that comes
///   first. (A saved file's unit is its checksum region, the least it can
///   check; a network source may use the same, so a lazy restore's state
///   per unit serves both.) Anything else is refused with
///   [`FileError::Range`], as is a `dst` that is not exactly
///   `pages × page_size` bytes.
/// - `dst` is the caller's private staging buffer, never guest memory that
///   others may touch: the caller places it in guest memory (atomically,
///   e.g. `UFFDIO_COPY`) only after `fill` returned `Ok`, so a guest never
///   sees bytes the source has not vouched for. On `Err` the buffer's
///   contents are unspecified and must not be placed.
/// - `Ok` means the bytes are the guest's as the source holds them and
///   checked as well as the source can (a file: against the region's
///   checksum; the network: against the packet's). With
///   [`Filled::zeros`] the buffer is untouched and the range is zeros.
/// - `fill` may be called from many threads at once, for different
///   ranges or the same one; it keeps no state between calls that a
///   concurrent call could disturb.
pub trait PageSource: Send + Sync {
    /// What the source is, as errors name it (a path, a URI).
    fn name(&self) -> String;
    /// The guest's blocks.
    fn blocks(&self) -> Vec<BlockSpec>;
    /// Bytes of a block one `fill` covers (see the contract): a power of
    /// two at least as large as every block's page size.
    fn unit(&self) -> u64;
    /// Fills `dst` with pages `first_page..first_page + pages` of block
    /// `block`, checked (see the contract).
    fn fill(
        &self,
        block: usize,
        first_page: u64,
        pages: u64,
        dst: &mut [u8],
    ) -> Result<Filled, FileError>;
}

/// Checks a `fill` request against `blocks` and `unit`: the block exists,
/// the range is one whole unit (or the block's tail), and `dst` fits it.
/// Returns the block's page size.
pub fn check_range(
    source: &dyn PageSource,
    blocks: &[BlockSpec],
    block: usize,
    first_page: u64,
    pages: u64,
    dst_len: usize,
) -> Result<u64, FileError> {
    let refuse = |name: &str, why: String| FileError::Range {
        source_name: source.name(),
        block,
        name: name.into(),
        first: first_page,
        end: first_page.saturating_add(pages),
        why,
    };
    let Some(b) = blocks.get(block) else {
        return Err(refuse(
            "",
            format!("the source has {} block(s)", blocks.len()),
        ));
    };
    let ps = u64::from(b.page_size);
    let total = b.len / ps;
    let per = (source.unit() / ps).max(1);
    let end = first_page.checked_add(pages).filter(|&e| e <= total);
    let Some(end) = end else {
        return Err(refuse(
            &b.name,
            format!("past the end of the block ({total} pages)"),
        ));
    };
    if pages == 0
        || !first_page.is_multiple_of(per)
        || (end != total && end - first_page != per)
        || end - first_page > per
    {
        return Err(refuse(
            &b.name,
            format!("not one whole unit of {per} pages (or the block's last)"),
        ));
    }
    if dst_len as u64 != pages * ps {
        return Err(refuse(
            &b.name,
            format!(
                "a buffer of {dst_len} bytes for {} bytes of pages",
                pages * ps
            ),
        ));
    }
    Ok(ps)
}

/// A saved file serves its checksum regions: present pages read in one
/// read (from the first present page to the last; absent pages between
/// read as the zeros the file holds there), absent ones zeros, the whole
/// checked against the region's checksum.
impl PageSource for SavedFile {
    fn name(&self) -> String {
        self.path().display().to_string()
    }

    fn blocks(&self) -> Vec<BlockSpec> {
        self.specs()
    }

    fn unit(&self) -> u64 {
        u64::from(self.layout().region_size)
    }

    fn fill(
        &self,
        block: usize,
        first_page: u64,
        pages: u64,
        dst: &mut [u8],
    ) -> Result<Filled, FileError> {
        let ps = check_range(self, &self.specs(), block, first_page, pages, dst.len())?;
        let lb = &self.layout().blocks[block];
        let bits = &self.bitmaps()[block];
        let end = first_page + pages;
        let region = first_page * ps / self.unit();
        let offset = first_page * ps;
        let len = pages * ps;
        let mut present = bits.iter_set_in(first_page, end);
        let (sum, filled) = match present.next() {
            // No page to read: zeros, whose checksum is known without
            // hashing (a sparse guest's empty regions cost no work but this).
            None => (
                zero_checksum(len),
                Filled {
                    present: 0,
                    zeros: true,
                    bytes_read: 0,
                },
            ),
            Some(lo) => {
                let hi = present.last().unwrap_or(lo);
                dst.fill(0);
                let from = ((lo - first_page) * ps) as usize;
                let to = ((hi + 1 - first_page) * ps) as usize;
                let file_offset = lb.page_file_offset(lo);
                self.reader_for(&dst[from..to])
                    .read_exact_at(&mut dst[from..to], file_offset)
                    .map_err(|source| FileError::Io {
                        path: self.path().into(),
                        block: lb.name.clone(),
                        offset: file_offset,
                        what: "reading pages",
                        source,
                    })?;
                (
                    region_checksum(dst),
                    Filled {
                        present: bits.count_in(first_page, end),
                        zeros: false,
                        bytes_read: (to - from) as u64,
                    },
                )
            }
        };
        if sum != self.checksums()[block][region as usize] {
            return Err(FileError::Checksum {
                path: self.path().into(),
                block: lb.name.clone(),
                offset,
                len,
                file_offset: lb.pages_offset + offset,
            });
        }
        Ok(filled)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::saved::tests::saved_guest;
    use crate::IoMode;

    #[test]
    fn a_saved_file_fills_whole_regions_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mem, _) = saved_guest(dir.path());
        let saved = SavedFile::open(&path, IoMode::Auto).unwrap();
        let src: &dyn PageSource = &saved;
        assert_eq!(src.unit(), 1 << 20);
        assert_eq!(src.blocks(), mem.specs());
        let mut buf = vec![0xAAu8; 1 << 20];
        // Region 1 of "ram" (pages 256..512): page 300 present.
        let f = src.fill(0, 256, 256, &mut buf).unwrap();
        assert_eq!(
            f,
            Filled {
                present: 1,
                zeros: false,
                bytes_read: 4096
            }
        );
        let mut want = vec![0u8; 1 << 20];
        mem.blocks()[0]
            .pages_slice(256, 256)
            .unwrap()
            .copy_to(&mut want[..]);
        assert!(buf == want, "region 1 as saved");
        // Region 0: pages 0 and 1, read together.
        let f = src.fill(0, 0, 256, &mut buf).unwrap();
        assert_eq!((f.present, f.bytes_read), (2, 8192));
        // Region 3 (pages 768..1024) has none: zeros, buffer untouched.
        buf.fill(0xAA);
        let f = src.fill(0, 768, 256, &mut buf).unwrap();
        assert!(f.zeros && f.present == 0 && f.bytes_read == 0);
        assert!(buf.iter().all(|&b| b == 0xAA));
        // A flipped byte in a present page is found, naming block and
        // offset; other regions still fill.
        let at = saved.layout().blocks[0].page_file_offset(300) + 5;
        let w = std::fs::File::options().write(true).open(&path).unwrap();
        w.write_all_at(&[0x77], at).unwrap();
        assert!(src.fill(0, 0, 256, &mut buf).is_ok());
        match src.fill(0, 256, 256, &mut buf).expect_err("damaged") {
            FileError::Checksum {
                block,
                offset,
                file_offset,
                ..
            } => {
                assert_eq!(block, "ram");
                assert_eq!(offset, 1 << 20);
                assert_eq!(
                    file_offset,
                    saved.layout().blocks[0].pages_offset + (1 << 20)
                );
            }
            other => panic!("wrong error: {other}"),
        }
    }

    #[test]
    fn ranges_a_source_cannot_fill_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ..) = saved_guest(dir.path());
        let saved = SavedFile::open(&path, IoMode::Auto).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for (block, first, pages, len, says) in [
            (2usize, 0u64, 256u64, 1usize << 20, "2 block(s)"),
            (1, 256, 256, 1 << 20, "past the end"),
            (0, 900, 256, 1 << 20, "past the end"),
            (0, 10, 256, 1 << 20, "whole unit"),
            (0, 0, 100, 100 * 4096, "whole unit"),
            (0, 0, 0, 0, "whole unit"),
            (0, 0, 256, 4096, "a buffer of 4096 bytes"),
        ] {
            let e = saved
                .fill(block, first, pages, &mut buf[..len])
                .err()
                .unwrap_or_else(|| panic!("{block} {first}+{pages} accepted"));
            assert!(matches!(e, FileError::Range { .. }), "{e}");
            assert!(e.to_string().contains(says), "{e}");
            assert!(e.to_string().contains("guest.sav"), "{e}");
        }
    }
}
