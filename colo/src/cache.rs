//! The secondary's RAM cache: a whole copy of the primary's memory as of
//! the last committed checkpoint (QEMU's `colo_init_ram_cache`).
//!
//! The multifd receivers write a checkpoint's pages into the cache, never
//! into the running secondary's memory, so a checkpoint that is not wholly
//! received changes nothing the secondary runs on. Once the whole
//! checkpoint (pages and device state) has arrived, [`RamCache::commit`]
//! copies into the secondary's memory every page dirtied since the last
//! checkpoint on either side: by the primary (its dirty bitmap came with
//! VMSTATE_SEND, its pages are in the cache) or by the secondary itself
//! (its own dirty log: the cache still holds the primary's copy of such a
//! page). Every other page is equal on both sides already.

use std::sync::Arc;

use ferry_ram::{GuestMemory, PageBitmap};

use crate::ColoError;

pub struct RamCache {
    memory: Arc<GuestMemory>,
}

impl RamCache {
    /// A cache holding a copy of `from` (the secondary's memory right after
    /// the migration, equal to the primary's: both guests are paused).
    pub fn copy_of(from: &GuestMemory) -> Result<Self, ColoError> {
        let memory = GuestMemory::anonymous_base_pages(&from.specs())?;
        for (src, dst) in from.blocks().iter().zip(memory.blocks()) {
            src.as_volatile_slice()
                .copy_to_volatile_slice(dst.as_volatile_slice());
        }
        Ok(Self {
            memory: Arc::new(memory),
        })
    }

    /// The cache's memory: what the multifd receivers write into.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// The primary's dirty bitmap of one checkpoint, from VMSTATE_SEND's
    /// words, checked against the cache's layout: one word list per block,
    /// the right number of words, no bit beyond the block's last page.
    pub fn dirty_from_words(&self, words: &[Vec<u64>]) -> Result<Vec<PageBitmap>, ColoError> {
        let blocks = self.memory.blocks();
        if words.len() != blocks.len() {
            return Err(ColoError::Cache(format!(
                "VMSTATE_SEND lists {} blocks, the guest has {}",
                words.len(),
                blocks.len()
            )));
        }
        let mut out = Vec::with_capacity(blocks.len());
        for (b, w) in blocks.iter().zip(words) {
            let bitmap = PageBitmap::new(b.pages(), false);
            if w.len() != bitmap.words() {
                return Err(ColoError::Cache(format!(
                    "block '{}': {} dirty words, its {} pages need {}",
                    b.name(),
                    w.len(),
                    b.pages(),
                    bitmap.words()
                )));
            }
            let tail = b.pages() % 64;
            if let Some(&last) = w.last() {
                if tail != 0 && last >> tail != 0 {
                    return Err(ColoError::Cache(format!(
                        "block '{}': dirty bits beyond its last page {} (offset {:#x})",
                        b.name(),
                        b.pages() - 1,
                        b.len()
                    )));
                }
            }
            for (i, &bits) in w.iter().enumerate() {
                bitmap.or_word(i, bits);
            }
            out.push(bitmap);
        }
        Ok(out)
    }

    /// Makes `memory` (the paused secondary's) equal the primary's at this
    /// checkpoint: copies from the cache every page set in `primary` or in
    /// `secondary`. Returns the pages copied.
    pub fn commit(
        &self,
        memory: &GuestMemory,
        primary: &[PageBitmap],
        secondary: &[PageBitmap],
    ) -> Result<u64, ColoError> {
        if memory.specs() != self.memory.specs()
            || primary.len() != memory.blocks().len()
            || secondary.len() != memory.blocks().len()
        {
            return Err(ColoError::Cache(
                "commit: the cache, the memory and the dirty bitmaps differ in layout".into(),
            ));
        }
        let mut copied = 0;
        for (i, (dst, src)) in memory.blocks().iter().zip(self.memory.blocks()).enumerate() {
            let (p, s) = (&primary[i], &secondary[i]);
            if p.pages() != dst.pages() || s.pages() != dst.pages() {
                return Err(ColoError::Cache(format!(
                    "commit: block '{}' has {} pages, the bitmaps {} and {}",
                    dst.name(),
                    dst.pages(),
                    p.pages(),
                    s.pages()
                )));
            }
            for w in 0..p.words() {
                // Read each word without losing it: take, then put back.
                let (pb, sb) = (p.take_word(w), s.take_word(w));
                p.or_word(w, pb);
                s.or_word(w, sb);
                let mut bits = pb | sb;
                while bits != 0 {
                    let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    let (Some(from), Some(to)) = (src.page_slice(page), dst.page_slice(page))
                    else {
                        return Err(ColoError::Cache(format!(
                            "commit: page {page} outside block '{}'",
                            dst.name()
                        )));
                    };
                    from.copy_to_volatile_slice(to);
                    copied += 1;
                }
            }
        }
        Ok(copied)
    }

    /// The words of `bitmaps` (for VMSTATE_SEND), leaving them unchanged.
    pub fn words_of(bitmaps: &[PageBitmap]) -> Vec<Vec<u64>> {
        bitmaps
            .iter()
            .map(|b| {
                (0..b.words())
                    .map(|w| {
                        let bits = b.take_word(w);
                        b.or_word(w, bits);
                        bits
                    })
                    .collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_ram::{BlockSpec, DEFAULT_PAGE_SIZE};

    fn mem(pages: u64, fill: u8) -> GuestMemory {
        let m = GuestMemory::anonymous_base_pages(&[BlockSpec {
            name: "ram".into(),
            len: pages * u64::from(DEFAULT_PAGE_SIZE),
            page_size: DEFAULT_PAGE_SIZE,
        }])
        .unwrap();
        let s = m.blocks()[0].as_volatile_slice();
        s.copy_from(&vec![fill; s.len()]);
        m
    }

    fn write_page(m: &GuestMemory, page: u64, byte: u8) {
        let s = m.blocks()[0].page_slice(page).unwrap();
        s.copy_from(&vec![byte; s.len()]);
    }

    #[test]
    fn commit_takes_pages_dirtied_on_either_side_from_the_cache() {
        let pages = 100;
        let primary = mem(pages, 1);
        let secondary = mem(pages, 1);
        let cache = RamCache::copy_of(&secondary).unwrap();
        assert_eq!(cache.memory().digest(), primary.digest());
        // The primary writes pages 3 and 70; they reach the cache.
        let pd = vec![PageBitmap::new(pages, false)];
        for p in [3, 70] {
            write_page(&primary, p, 9);
            write_page(cache.memory(), p, 9);
            pd[0].set(p);
        }
        // The secondary writes pages 70 and 99 on its own.
        let sd = vec![PageBitmap::new(pages, false)];
        for p in [70, 99] {
            write_page(&secondary, p, 5);
            sd[0].set(p);
        }
        assert_ne!(secondary.digest(), primary.digest());
        // Without the secondary's own pages the copy stays wrong.
        let none = vec![PageBitmap::new(pages, false)];
        let partial = mem(pages, 1);
        write_page(&partial, 99, 5);
        cache.commit(&partial, &pd, &none).unwrap();
        assert_ne!(partial.digest(), primary.digest());
        assert_eq!(cache.commit(&secondary, &pd, &sd).unwrap(), 3);
        assert_eq!(secondary.digest(), primary.digest());
        // The bitmaps are unchanged by commit and by words_of.
        assert_eq!(pd[0].count(), 2);
        assert_eq!(RamCache::words_of(&sd)[0][1], (1 << 6) | (1 << 35));
        assert_eq!(sd[0].count(), 2);
    }

    fn err<T>(r: Result<T, ColoError>) -> String {
        match r {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_dirty_bitmap_of_another_shape_is_refused() {
        let cache = RamCache::copy_of(&mem(100, 0)).unwrap();
        assert!(cache.dirty_from_words(&[vec![0, 0]]).is_ok());
        let e = err(cache.dirty_from_words(&[vec![0]]));
        assert!(e.contains("1 dirty words, its 100 pages need 2"), "{e}");
        let e = err(cache.dirty_from_words(&[vec![0, 1 << 40]]));
        assert!(e.contains("beyond its last page 99"), "{e}");
        let e = err(cache.dirty_from_words(&[]));
        assert!(e.contains("lists 0 blocks, the guest has 1"), "{e}");
    }
}
