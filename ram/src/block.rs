//! One RAM block: a named, page-aligned run of guest memory.
//!
//! The bytes live in a vm-memory [`MmapRegion`] the block shares (an `Arc`):
//! anonymous (fresh zeroed memory, as a destination allocates), shared over
//! a file (an image guest's RAM file, or a destination's `--ram-out`), or a
//! region a VMM already holds in its `GuestMemoryMmap` (taken without a
//! copy). Guest vCPUs, receiver threads and the kernel write these bytes
//! while others read them, so the block never hands out `&[u8]` over them:
//! readers get a [`VolatileSlice`] (vm-memory's view of memory others may
//! write) or a raw address for an iovec, and [`crate::shared`] holds the
//! reads that interpret the bytes (zero scan, copies into private buffers).

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, MmapRegion, VolatileMemory, VolatileSlice};

use crate::RamError;

/// The page size ferry uses unless a block says otherwise.
pub const DEFAULT_PAGE_SIZE: u32 = 4096;

pub struct RamBlock {
    name: String,
    page_size: u32,
    len: u64,
    writable: bool,
    /// The mapping: never moved or resized while any `Arc` of it lives.
    map: Arc<MmapRegion>,
    /// Where the block lies in guest physical memory (see
    /// [`crate::GuestMemory::guest_memory_mmap`]).
    guest_base: GuestAddress,
}

impl RamBlock {
    /// A zero-filled anonymous block, as a destination allocates before pages
    /// arrive. Transparent huge pages are requested where the kernel offers
    /// them: fewer faults while payloads land.
    pub fn anonymous(name: &str, len: u64, page_size: u32) -> Result<Self, RamError> {
        let b = Self::anonymous_base_pages(name, len, page_size)?;
        b.advise(libc::MADV_HUGEPAGE);
        Ok(b)
    }

    /// A zero-filled anonymous block that never uses transparent huge pages
    /// (a write-protect dirty log then reports single pages, not 2 MiB).
    pub fn anonymous_base_pages(name: &str, len: u64, page_size: u32) -> Result<Self, RamError> {
        check_shape(name, len, page_size)?;
        let map = MmapRegion::new(len as usize).map_err(|e| map_err(name, len, e))?;
        let b = Self::with_region(name, page_size, true, Arc::new(map), GuestAddress(0));
        b.advise(libc::MADV_NOHUGEPAGE);
        Ok(b)
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
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let map = MmapRegion::build(
            Some(FileOffset::new(file, 0)),
            len as usize,
            prot,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
        )
        .map_err(|e| map_err(name, len, e))?;
        Ok(Self::with_region(
            name,
            page_size,
            writable,
            Arc::new(map),
            GuestAddress(0),
        ))
    }

    /// A block over a region a VMM already maps (from its
    /// `GuestMemoryMmap`), shared without a copy, at the guest address the
    /// VMM gave it. Writable unless the mapping lacks `PROT_WRITE`.
    pub fn from_region(
        name: &str,
        page_size: u32,
        map: Arc<MmapRegion>,
        guest_base: GuestAddress,
    ) -> Result<Self, RamError> {
        check_shape(name, map.size() as u64, page_size)?;
        let writable = map.prot() & libc::PROT_WRITE != 0;
        Ok(Self::with_region(
            name, page_size, writable, map, guest_base,
        ))
    }

    fn with_region(
        name: &str,
        page_size: u32,
        writable: bool,
        map: Arc<MmapRegion>,
        guest_base: GuestAddress,
    ) -> Self {
        Self {
            name: name.into(),
            page_size,
            len: map.size() as u64,
            writable,
            map,
            guest_base,
        }
    }

    /// Which of this block's pages may hold data, read from the page
    /// tables: for anonymous private memory, a page never written since it
    /// was mapped (or discarded) reads as zeros, so a pass over every page
    /// need not read it. The answer holds as of the walk: like a read of
    /// the page, a write after it must be caught by the dirty log.
    ///
    /// `None` where the page tables cannot speak for the bytes (a shared or
    /// file mapping: they live in the page cache) or the kernel cannot
    /// answer (PAGEMAP_SCAN is Linux 6.7 or newer).
    pub fn data_pages(&self) -> Option<crate::PageBitmap> {
        if !self.is_private_anonymous() {
            return None;
        }
        crate::pagemap::data_pages(
            self.host_addr() as u64,
            self.pages(),
            u64::from(self.page_size),
        )
    }

    /// Which of this block's pages have an entry in the page tables
    /// (present, the shared zero page included, or swapped out): a page
    /// without one faults at its next touch. Anonymous private memory only,
    /// as for [`Self::data_pages`]; `None` elsewhere or where the kernel
    /// cannot answer.
    pub fn mapped_pages(&self) -> Option<crate::PageBitmap> {
        self.is_private_anonymous().then(|| {
            crate::pagemap::mapped_pages(
                self.host_addr() as u64,
                self.pages(),
                u64::from(self.page_size),
            )
        })?
    }

    fn is_private_anonymous(&self) -> bool {
        self.map.file_offset().is_none()
            && self.map.flags() & libc::MAP_PRIVATE != 0
            && self.map.flags() & libc::MAP_SHARED == 0
    }

    /// The same block placed at `guest_base` in guest physical memory.
    pub(crate) fn at_guest_base(mut self, guest_base: GuestAddress) -> Self {
        self.guest_base = guest_base;
        self
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

    /// The vm-memory mapping behind the block (shared, never copied).
    pub fn region(&self) -> &Arc<MmapRegion> {
        &self.map
    }

    /// Where the block lies in guest physical memory.
    pub fn guest_base(&self) -> GuestAddress {
        self.guest_base
    }

    /// Base address of the block in this process.
    pub fn host_addr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    /// The whole block as a volatile slice.
    pub fn as_volatile_slice(&self) -> VolatileSlice<'_> {
        self.map.as_volatile_slice()
    }

    /// `len` bytes from `offset`, or `None` if they do not lie wholly
    /// inside the block.
    pub fn slice(&self, offset: u64, len: usize) -> Option<VolatileSlice<'_>> {
        let offset = usize::try_from(offset).ok()?;
        self.map.get_slice(offset, len).ok()
    }

    /// Page `index` as a volatile slice, or `None` past the block's end.
    pub fn page_slice(&self, index: u64) -> Option<VolatileSlice<'_>> {
        let offset = index.checked_mul(u64::from(self.page_size))?;
        self.slice(offset, self.page_size as usize)
    }

    /// Pages `first..first + count` as one volatile slice, or `None` if
    /// they do not lie wholly inside the block.
    pub fn pages_slice(&self, first: u64, count: u64) -> Option<VolatileSlice<'_>> {
        let ps = u64::from(self.page_size);
        let len = usize::try_from(count.checked_mul(ps)?).ok()?;
        self.slice(first.checked_mul(ps)?, len)
    }

    /// A copy of `len` bytes from `offset`, or `None` if they do not lie
    /// wholly inside the block (for checks and tests; the data path copies
    /// into buffers it reuses).
    pub fn copy_bytes(&self, offset: u64, len: usize) -> Option<Vec<u8>> {
        let mut out = vec![0u8; len];
        self.slice(offset, len)?.copy_to(&mut out[..]);
        Some(out)
    }

    /// A copy of page `index`, or `None` past the block's end.
    pub fn copy_page(&self, index: u64) -> Option<Vec<u8>> {
        self.copy_bytes(index * u64::from(self.page_size), self.page_size as usize)
    }

    /// A copy of the whole block.
    pub fn copy_all(&self) -> Vec<u8> {
        self.copy_bytes(0, self.len as usize).unwrap_or_default()
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

    /// Bytes `offset..offset + len` of the block as a plain slice, for a
    /// caller that knows nobody writes them meanwhile; `None` if the range
    /// is not wholly inside the block.
    ///
    /// # Safety
    /// While the returned slice lives, no thread, vCPU or kernel I/O may
    /// write any of these bytes: the guest is paused and every receiver
    /// and file read into them has finished, or the calling thread is
    /// the only one that writes them (a receiver's claimed page) and does
    /// not while the slice lives.
    pub unsafe fn bytes_unshared(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let end = offset.checked_add(len as u64)?;
        if end > self.len {
            return None;
        }
        // SAFETY: offset..end lies inside the mapping (checked above), which
        // lives as long as `self`; the caller promises no writes meanwhile.
        Some(unsafe { std::slice::from_raw_parts(self.host_addr().add(offset as usize), len) })
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

impl RamBlock {
    /// A hint about the mapping's pages (huge pages or not); failure (no
    /// THP) is harmless and ignored.
    /// Populates `len` bytes at `offset` writable (`MADV_POPULATE_WRITE`:
    /// faults the pages in as a write would, without writing; what they
    /// hold is unchanged). Fails on a range outside the block, or where the
    /// kernel lacks it (Linux < 5.14).
    pub fn populate_write(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let end = offset.checked_add(len).filter(|&e| e <= self.len);
        if end.is_none() || !offset.is_multiple_of(4096) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "populate {len:#x} bytes at {offset:#x}: outside the block's {:#x} bytes or \
                     not page-aligned",
                    self.len
                ),
            ));
        }
        // SAFETY: the range lies inside this block's own live mapping
        // (checked above), and MADV_POPULATE_WRITE only faults pages in; it
        // never changes what memory holds, so writers elsewhere are unaffected.
        let rc = unsafe {
            libc::madvise(
                self.host_addr().add(offset as usize).cast(),
                len as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn advise(&self, advice: libc::c_int) {
        // SAFETY: madvise over exactly this block's own mapping with a
        // hint that does not change its contents.
        unsafe {
            libc::madvise(self.host_addr().cast(), self.len as usize, advice);
        }
    }
}

fn map_err(name: &str, len: u64, e: vm_memory::mmap::MmapRegionError) -> RamError {
    let source = match e {
        vm_memory::mmap::MmapRegionError::Mmap(io) => io,
        other => std::io::Error::other(other.to_string()),
    };
    RamError::Map {
        block: name.into(),
        len,
        source,
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
    if len == 0 || !len.is_multiple_of(u64::from(page_size)) {
        return Err(RamError::BadLength {
            block: name.into(),
            len,
            page_size,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_block_is_zero_and_pages_are_addressable() {
        let b = RamBlock::anonymous("ram", 16 * 4096, 4096).unwrap();
        assert_eq!(b.pages(), 16);
        assert!(crate::shared::is_zero(&b.as_volatile_slice()));
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
    fn data_pages_are_the_written_pages_of_anonymous_memory() {
        let b = RamBlock::anonymous_base_pages("ram", 64 * 4096, 4096).unwrap();
        for p in [3, 40] {
            b.page_slice(p).unwrap().copy_from(&[1u8; 4096]);
        }
        // A read maps the kernel's zero page: still no data.
        assert!(crate::shared::is_zero(&b.page_slice(20).unwrap()));
        // A page written and then discarded reads as zeros again.
        b.page_slice(50).unwrap().copy_from(&[2u8; 4096]);
        // SAFETY: page 50 lies inside the block's mapping, which nothing
        // else uses; MADV_DONTNEED only makes it read as zeros again.
        let rc =
            unsafe { libc::madvise(b.page_addr(50).unwrap().cast(), 4096, libc::MADV_DONTNEED) };
        assert_eq!(rc, 0);
        let Some(data) = b.data_pages() else {
            eprintln!("skipped: this kernel has no PAGEMAP_SCAN (Linux 6.7 or newer)");
            return;
        };
        assert_eq!(data.iter_set().collect::<Vec<_>>(), [3, 40]);
        // A page written after the walk is the dirty log's to report.
        b.page_slice(7).unwrap().copy_from(&[3u8; 4096]);
        assert!(!data.test(7));
        assert!(b.data_pages().unwrap().test(7));
    }

    #[test]
    fn a_file_block_has_no_data_pages_answer() {
        let dir = tempfile::tempdir().unwrap();
        let b = RamBlock::file("ram", &dir.path().join("ram"), 4096, true, Some(8192)).unwrap();
        assert!(b.data_pages().is_none());
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
