//! One RAM block: a named, page-aligned run of guest memory.
//!
//! The bytes live in a memory mapping the block owns: anonymous (fresh zeroed
//! memory, as a destination allocates) or shared over a file (an image guest's
//! RAM file, or a destination's `--ram-out`). The data path reaches pages by
//! address: senders hand the kernel iovecs over them, receivers read payloads
//! straight into them. Several threads touch disjoint pages of one block at
//! once, so the block hands out raw page addresses rather than `&mut` slices.

use std::fs::File;
use std::path::Path;

use memmap2::{MmapOptions, MmapRaw};

use crate::RamError;

/// The page size ferry uses unless a block says otherwise.
pub const DEFAULT_PAGE_SIZE: u32 = 4096;

pub struct RamBlock {
    name: String,
    page_size: u32,
    len: u64,
    writable: bool,
    /// An anonymous or file mapping; never moved or resized while the block lives.
    map: MmapRaw,
}

impl RamBlock {
    /// A zero-filled anonymous block, as a destination allocates before pages
    /// arrive. Transparent huge pages are requested where the kernel offers
    /// them: fewer faults while payloads land.
    pub fn anonymous(name: &str, len: u64, page_size: u32) -> Result<Self, RamError> {
        let b = Self::anonymous_base_pages(name, len, page_size)?;
        advise(&b.map, libc::MADV_HUGEPAGE);
        Ok(b)
    }

    /// A zero-filled anonymous block that never uses transparent huge pages
    /// (a write-protect dirty log then reports single pages, not 2 MiB).
    pub fn anonymous_base_pages(name: &str, len: u64, page_size: u32) -> Result<Self, RamError> {
        check_shape(name, len, page_size)?;
        let map = MmapOptions::new()
            .len(len as usize)
            .map_anon()
            .map_err(|source| RamError::Map {
                block: name.into(),
                len,
                source,
            })?;
        let raw = MmapRaw::from(map);
        advise(&raw, libc::MADV_NOHUGEPAGE);
        Ok(Self {
            name: name.into(),
            page_size,
            len,
            writable: true,
            map: raw,
        })
    }

    /// A block whose bytes are the file's, shared: writes land in the file.
    /// With `create_len`, the file is created (or truncated) to that length
    /// first, which leaves it sparse and zero-filled.
    pub fn file(
        name: &str,
        path: &Path,
        page_size: u32,
        writable: bool,
        create_len: Option<u64>,
    ) -> Result<Self, RamError> {
        let open_err = |source| RamError::Open {
            path: path.into(),
            source,
        };
        let file = if let Some(len) = create_len {
            let f = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .map_err(open_err)?;
            f.set_len(len).map_err(open_err)?;
            f
        } else {
            File::options()
                .read(true)
                .write(writable)
                .open(path)
                .map_err(open_err)?
        };
        let len = file.metadata().map_err(open_err)?.len();
        check_shape(name, len, page_size)?;
        let map = if writable {
            MmapOptions::new().map_raw(&file)
        } else {
            MmapOptions::new().map_raw_read_only(&file)
        }
        .map_err(|source| RamError::Map {
            block: name.into(),
            len,
            source,
        })?;
        Ok(Self {
            name: name.into(),
            page_size,
            len,
            writable,
            map,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn page_size(&self) -> u32 {
        self.page_size
    }
    pub fn pages(&self) -> u64 {
        self.len / u64::from(self.page_size)
    }
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Base address of the block in this process.
    pub fn host_addr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Address of page `index`, or `None` past the end of the block.
    pub fn page_addr(&self, index: u64) -> Option<*mut u8> {
        (index < self.pages()).then(|| {
            // SAFETY: index < pages, so the offset stays inside the mapping.
            unsafe {
                self.host_addr()
                    .add((index * u64::from(self.page_size)) as usize)
            }
        })
    }

    /// Asks the CPU to start loading the first cache line of page `index`
    /// (nothing happens past the block's end). The zero-page scan reads each
    /// page's first bytes in turn; each is a cache and TLB miss the hardware
    /// prefetcher cannot see coming, because it never crosses a page boundary.
    #[inline]
    pub fn prefetch_page(&self, index: u64) {
        #[cfg(target_arch = "x86_64")]
        if let Some(p) = self.page_addr(index) {
            // SAFETY: a prefetch is a hint that never faults and changes no
            // memory; p lies inside this block's mapping in any case.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    p.cast_const().cast(),
                )
            };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = index;
    }

    /// Reads page `index`'s first byte (nothing past the block's end), so
    /// that a page not mapped yet is mapped now, and its neighbours with it
    /// (which a prefetch, being only a hint, never does).
    #[inline]
    pub fn touch_page(&self, index: u64) {
        if let Some(p) = self.page_addr(index) {
            // SAFETY: p lies inside this block's readable mapping.
            let _ = unsafe { std::ptr::read_volatile(p.cast_const()) };
        }
    }

    /// The block's bytes. The guest (or a receiver thread) may write them
    /// while they are read; callers use what they see as a snapshot and rely
    /// on the dirty log to resend a page that changed.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes long, readable, and lives as long
        // as `self`; concurrent writers only ever store whole bytes into it.
        unsafe { std::slice::from_raw_parts(self.host_addr(), self.len as usize) }
    }

    /// Page `index` as a slice (see [`RamBlock::bytes`] about concurrent
    /// writes). The slice covers this page only, so a receiver thread may
    /// read a page it claimed while others write other pages of the block.
    ///
    /// # Panics
    /// If `index` is past the block's last page (callers check first).
    pub fn page(&self, index: u64) -> &[u8] {
        let p = self
            .page_addr(index)
            .unwrap_or_else(|| panic!("page {index} is past the end of block '{}'", self.name));
        // SAFETY: p is the start of a whole page inside this block's readable
        // mapping, which lives as long as `self`.
        unsafe { std::slice::from_raw_parts(p.cast_const(), self.page_size as usize) }
    }

    /// Reads the first byte of page `index` and writes it back: a write the
    /// guest makes that leaves memory as it was (how a test toucher plays a
    /// guest on lazily restored memory). Only for writable blocks.
    pub fn rewrite_first_byte(&self, index: u64) {
        assert!(self.writable, "block '{}' is read-only", self.name);
        if let Some(p) = self.page_addr(index) {
            // SAFETY: p is the start of a page inside a writable mapping of
            // this block; one byte is read and the same value stored back.
            unsafe {
                let v = std::ptr::read_volatile(p);
                std::ptr::write_volatile(p, v);
            }
        }
    }

    /// Fills page `index` with zeros. Only for writable blocks.
    pub fn zero_page(&self, index: u64) {
        assert!(self.writable, "block '{}' is read-only", self.name);
        if let Some(p) = self.page_addr(index) {
            // SAFETY: p is the start of a page inside a writable mapping of
            // this block; the page is page_size bytes long.
            unsafe { std::ptr::write_bytes(p, 0, self.page_size as usize) };
        }
    }
}

fn advise(map: &MmapRaw, advice: libc::c_int) {
    // SAFETY: madvise on our own anonymous mapping with a huge-page hint that
    // does not change its contents; failure (no THP) is harmless and ignored.
    unsafe {
        libc::madvise(map.as_mut_ptr().cast(), map.len(), advice);
    }
}

fn check_shape(name: &str, len: u64, page_size: u32) -> Result<(), RamError> {
    if name.is_empty() || name.len() > 255 {
        return Err(RamError::BadName(name.into()));
    }
    if !page_size.is_power_of_two() || !(4096..=1 << 30).contains(&page_size) {
        return Err(RamError::BadPageSize {
            block: name.into(),
            page_size,
        });
    }
    if len == 0 || len % u64::from(page_size) != 0 {
        return Err(RamError::BadLength {
            block: name.into(),
            len,
            page_size,
        });
    }
    Ok(())
}

// SAFETY: the mapping is plain memory owned by the block; moving or sharing
// the block between threads moves or shares only the pointer, and all writes
// through it go to disjoint pages chosen by the data path.
unsafe impl Send for RamBlock {}
// SAFETY: as above.
unsafe impl Sync for RamBlock {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_block_is_zero_and_pages_are_addressable() {
        let b = RamBlock::anonymous("ram", 16 * 4096, 4096).unwrap();
        assert_eq!(b.pages(), 16);
        assert!(b.bytes().iter().all(|&x| x == 0));
        assert!(b.page_addr(15).is_some());
        assert!(b.page_addr(16).is_none());
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(matches!(
            RamBlock::anonymous("ram", 4097, 4096),
            Err(RamError::BadLength { .. })
        ));
        assert!(matches!(
            RamBlock::anonymous("ram", 8192, 3000),
            Err(RamError::BadPageSize { .. })
        ));
        assert!(matches!(
            RamBlock::anonymous("", 8192, 4096),
            Err(RamError::BadName(_))
        ));
    }

    #[test]
    fn file_block_writes_reach_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let b = RamBlock::file("ram", &path, 4096, true, Some(8192)).unwrap();
        // SAFETY: page 1 is inside the writable mapping.
        unsafe { *b.page_addr(1).unwrap() = 7 };
        drop(b);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 8192);
        assert_eq!(bytes[4096], 7);
    }
}
