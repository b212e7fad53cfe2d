//! Gathering one huge page's worth of pushed frames (the destination's
//! page readers): the push claims 512 pages at a time and sends each
//! claim's frames in page order on one channel, so a reader that meets a
//! frame starting a 2 MiB-aligned region of missing pages collects the
//! region's frames in a [`HugeStaging`] buffer, and the region is then
//! placed whole with one `UFFDIO_MOVE` ([`super::dest`]): one page-table
//! entry, where 512 `UFFDIO_COPY`s of 4 KiB would each allocate and fill a
//! fresh page (the push's bound, docs/MEASUREMENTS.md). A region the frames
//! do not cover whole, in order, is placed page by page from the buffer
//! as before.

use ferry_ram::uffd::{HugeStaging, HUGE_PAGE};

/// A region being gathered: block, first page, pages gathered so far
/// (contiguous from the first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gathering {
    pub block: usize,
    pub first: u64,
    pub pages: u64,
}

/// One reader's staging buffer and the region it holds.
pub struct RegionStage {
    buf: HugeStaging,
    page_size: u64,
    region_pages: u64,
    now: Option<Gathering>,
}

impl RegionStage {
    /// A stage for blocks of `page_size` pages; None where no staging
    /// buffer can be mapped (the reader then places page by page).
    pub fn new(page_size: u64) -> Option<Self> {
        let buf = HugeStaging::new().ok()?;
        Some(Self {
            buf,
            page_size,
            region_pages: HUGE_PAGE / page_size,
            now: None,
        })
    }

    /// Pages in one region.
    pub fn region_pages(&self) -> u64 {
        self.region_pages
    }

    /// Whether `pages` pages from `first` of `block` continue the region
    /// being gathered (the next pages, inside it).
    pub fn continues(&self, block: usize, first: u64, pages: u64) -> bool {
        self.now.is_some_and(|g| {
            g.block == block && first == g.first + g.pages && g.pages + pages <= self.region_pages
        })
    }

    /// Starts gathering the region whose first page is `first` of `block`.
    pub fn begin(&mut self, block: usize, first: u64) {
        debug_assert!(first.is_multiple_of(self.region_pages));
        self.now = Some(Gathering {
            block,
            first,
            pages: 0,
        });
    }

    /// Adds the next `pages` pages: `data`, or zeros. Only after
    /// [`Self::continues`] said yes (or right after [`Self::begin`]).
    pub fn add(&mut self, pages: u64, data: Option<&[u8]>) {
        let g = self.now.as_mut().expect("a region is being gathered");
        let at = (g.pages * self.page_size) as usize;
        let len = (pages * self.page_size) as usize;
        g.pages += pages;
        let to = &mut self.buf.bytes_mut()[at..at + len];
        match data {
            Some(d) => to.copy_from_slice(d),
            None => to.fill(0),
        }
    }

    /// Whether the region is gathered whole.
    pub fn full(&self) -> bool {
        self.now.is_some_and(|g| g.pages == self.region_pages)
    }

    /// Ends the gathering: the region and its bytes (`pages` × page size),
    /// for placing.
    pub fn take(&mut self) -> Option<(Gathering, &mut HugeStaging)> {
        let g = self.now.take()?;
        Some((g, &mut self.buf))
    }
}
