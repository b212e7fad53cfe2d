//! Page bitmaps: one bit a page, scanned and claimed a 64-bit word at a time.
//!
//! Used for "pages to send this pass" on a source and "pages received" on a
//! destination. Words are atomics so many channel threads can claim disjoint
//! runs, and a dirty-log sync can set bits while senders clear others.

use std::sync::atomic::{AtomicU64, Ordering};

pub struct PageBitmap {
    words: Vec<AtomicU64>,
    pages: u64,
}

impl PageBitmap {
    /// A bitmap of `pages` bits, all clear or all set.
    pub fn new(pages: u64, all_set: bool) -> Self {
        let n = pages.div_ceil(64) as usize;
        let words = (0..n)
            .map(|i| AtomicU64::new(if all_set { full_word(pages, i) } else { 0 }))
            .collect();
        Self { words, pages }
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }
    pub fn words(&self) -> usize {
        self.words.len()
    }

    pub fn set(&self, page: u64) {
        self.words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
    }
    pub fn clear(&self, page: u64) {
        self.words[(page / 64) as usize].fetch_and(!(1 << (page % 64)), Ordering::Relaxed);
    }
    /// Sets the bit and says whether it was set before.
    pub fn test_and_set(&self, page: u64) -> bool {
        let bit = 1 << (page % 64);
        self.words[(page / 64) as usize].fetch_or(bit, Ordering::Relaxed) & bit != 0
    }
    pub fn test(&self, page: u64) -> bool {
        self.words[(page / 64) as usize].load(Ordering::Relaxed) & (1 << (page % 64)) != 0
    }

    /// Sets the bits of `pages`, with one atomic OR per run of them that
    /// falls in one word, and calls `was_set` for every page whose bit was
    /// set already: before the call, or by its earlier occurrence in
    /// `pages` (the same pages `test_and_set` on each one would report).
    pub fn set_pages(&self, pages: impl IntoIterator<Item = u64>, mut was_set: impl FnMut(u64)) {
        let mut run: Option<(u64, u64)> = None; // (word, bits of this run)
        for page in pages {
            let (word, bit) = (page / 64, 1u64 << (page % 64));
            match &mut run {
                Some((w, bits)) if *w == word => {
                    if *bits & bit != 0 {
                        was_set(page);
                    }
                    *bits |= bit;
                }
                _ => {
                    if let Some((w, bits)) = run.replace((word, bit)) {
                        self.set_run(w, bits, &mut was_set);
                    }
                }
            }
        }
        if let Some((w, bits)) = run {
            self.set_run(w, bits, &mut was_set);
        }
    }

    fn set_run(&self, word: u64, bits: u64, was_set: &mut impl FnMut(u64)) {
        let before = self.words[word as usize].fetch_or(bits, Ordering::Relaxed);
        set_bits(before & bits, word * 64).for_each(was_set);
    }

    /// Sets pages `first..end` (clamped to the bitmap), a word at a time.
    pub fn set_range(&self, first: u64, end: u64) {
        let end = end.min(self.pages);
        let mut p = first;
        while p < end {
            let bit = p % 64;
            let n = (end - p).min(64 - bit);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            self.words[(p / 64) as usize].fetch_or(mask, Ordering::Relaxed);
            p += n;
        }
    }

    /// Sets every bit (a full pass).
    pub fn set_all(&self) {
        for (i, w) in self.words.iter().enumerate() {
            w.store(full_word(self.pages, i), Ordering::Relaxed);
        }
    }

    /// Clears every bit.
    pub fn clear_all(&self) {
        for w in &self.words {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// Atomically takes word `index`: returns its bits and leaves it clear.
    /// This is how a sender marks pages clean *before* it reads them.
    pub fn take_word(&self, index: usize) -> u64 {
        self.words[index].swap(0, Ordering::AcqRel)
    }

    /// Word `index`'s bits (pages `64 * index ..`), left as they are.
    pub fn word(&self, index: usize) -> u64 {
        self.words[index].load(Ordering::Acquire)
    }

    /// ORs `bits` into word `index` (a dirty-log sync merging new writes).
    pub fn or_word(&self, index: usize, bits: u64) {
        self.words[index].fetch_or(bits, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Clears the bit and says whether it was set before.
    pub fn test_and_clear(&self, page: u64) -> bool {
        let bit = 1 << (page % 64);
        self.words[(page / 64) as usize].fetch_and(!bit, Ordering::Relaxed) & bit != 0
    }

    /// A bitmap of `pages` bits holding `words` (bit `i` of word `w` is page
    /// `64 w + i`), as a saved-guest file stores it; `None` if there are not
    /// exactly ⌈pages / 64⌉ words or a bit past the last page is set.
    pub fn from_words(pages: u64, words: &[u64]) -> Option<Self> {
        if words.len() as u64 != pages.div_ceil(64) {
            return None;
        }
        let tail_ok = words
            .last()
            .is_none_or(|&w| w & !full_word(pages, words.len() - 1) == 0);
        tail_ok.then(|| Self {
            words: words.iter().map(|&w| AtomicU64::new(w)).collect(),
            pages,
        })
    }

    /// The bits as plain words (the inverse of [`Self::from_words`]).
    pub fn to_words(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect()
    }

    /// Word `w` with only the bits of pages `first..end` kept.
    fn masked_word(&self, w: u64, first: u64, end: u64) -> u64 {
        let mut word = self.words[w as usize].load(Ordering::Relaxed);
        let base = w * 64;
        if first > base {
            word &= u64::MAX << (first - base);
        }
        if end < base + 64 {
            word &= (1u64 << end.saturating_sub(base)).wrapping_sub(1);
        }
        word
    }

    /// The words holding pages `first..end` (clamped to the bitmap).
    fn word_range(&self, first: u64, end: u64) -> (std::ops::Range<u64>, u64) {
        let end = end.min(self.pages);
        if first >= end {
            return (0..0, end);
        }
        (first / 64..end.div_ceil(64), end)
    }

    /// Set bits of pages `first..end` (clamped to the bitmap), lowest
    /// first, a word at a time: 64 clear bits cost one load.
    pub fn iter_set_in(&self, first: u64, end: u64) -> impl Iterator<Item = u64> + '_ {
        let (words, end) = self.word_range(first, end);
        words.flat_map(move |w| set_bits(self.masked_word(w, first, end), w * 64))
    }

    /// How many bits of pages `first..end` are set, a word at a time.
    pub fn count_in(&self, first: u64, end: u64) -> u64 {
        let (words, end) = self.word_range(first, end);
        words
            .map(|w| u64::from(self.masked_word(w, first, end).count_ones()))
            .sum()
    }

    /// Whether any bit of pages `first..end` is set; stops at the first.
    pub fn any_in(&self, first: u64, end: u64) -> bool {
        let (mut words, end) = self.word_range(first, end);
        words.any(|w| self.masked_word(w, first, end) != 0)
    }

    /// Set bits in page order, scanning a word at a time.
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, w)| SetBits {
            word: w.load(Ordering::Relaxed),
            base: i as u64 * 64,
        })
    }
}

/// The bits of word `i` that stand for real pages (the last word may be short).
fn full_word(pages: u64, i: usize) -> u64 {
    let first = i as u64 * 64;
    let n = (pages - first).min(64);
    if n == 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

/// The set bits of `word` as page numbers `base + bit`, lowest first.
pub fn set_bits(word: u64, base: u64) -> SetBits {
    SetBits { word, base }
}

/// Iterator behind [`set_bits`].
pub struct SetBits {
    word: u64,
    base: u64,
}

impl Iterator for SetBits {
    type Item = u64;
    #[inline]
    fn next(&mut self) -> Option<u64> {
        if self.word == 0 {
            return None;
        }
        let bit = self.word.trailing_zeros();
        self.word &= self.word - 1;
        Some(self.base + u64::from(bit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_bitmap_has_exactly_its_pages() {
        for pages in [1, 63, 64, 65, 200] {
            let b = PageBitmap::new(pages, true);
            assert_eq!(b.count(), pages);
            assert_eq!(
                b.iter_set().collect::<Vec<_>>(),
                (0..pages).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn set_range_sets_exactly_the_range() {
        for (first, end) in [(0, 1), (3, 64), (60, 200), (64, 128), (0, 300)] {
            let b = PageBitmap::new(200, false);
            b.set_range(first, end);
            assert_eq!(
                b.iter_set().collect::<Vec<_>>(),
                (first..end.min(200)).collect::<Vec<_>>()
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn set_pages_reports_what_test_and_set_would(
            before in proptest::collection::vec(0u64..300, 0..40),
            pages in proptest::collection::vec(0u64..300, 0..200),
        ) {
            let (a, b) = (PageBitmap::new(300, false), PageBitmap::new(300, false));
            for &p in &before {
                a.set(p);
                b.set(p);
            }
            let mut want: Vec<u64> = pages.iter().copied().filter(|&p| a.test_and_set(p)).collect();
            let mut got = Vec::new();
            b.set_pages(pages.iter().copied(), |p| got.push(p));
            want.sort_unstable();
            got.sort_unstable();
            proptest::prop_assert_eq!(got, want);
            proptest::prop_assert_eq!(a.iter_set().collect::<Vec<_>>(), b.iter_set().collect::<Vec<_>>());
        }
    }

    #[test]
    fn range_queries_match_a_page_by_page_scan() {
        let b = PageBitmap::new(300, false);
        for p in [0, 5, 63, 64, 65, 127, 128, 200, 299] {
            b.set(p);
        }
        for (first, end) in [
            (0, 300),
            (1, 64),
            (63, 66),
            (64, 128),
            (129, 199),
            (250, 400),
            (5, 5),
        ] {
            let want: Vec<u64> = (first..end.min(300)).filter(|&p| b.test(p)).collect();
            assert_eq!(b.iter_set_in(first, end).collect::<Vec<_>>(), want);
            assert_eq!(b.count_in(first, end), want.len() as u64);
            assert_eq!(b.any_in(first, end), !want.is_empty());
        }
        let back = PageBitmap::from_words(300, &b.to_words()).unwrap();
        assert_eq!(
            back.iter_set().collect::<Vec<_>>(),
            b.iter_set().collect::<Vec<_>>()
        );
        assert!(
            PageBitmap::from_words(300, &[0; 4]).is_none(),
            "too few words"
        );
        assert!(
            PageBitmap::from_words(65, &[0, 2]).is_none(),
            "a bit past the end"
        );
        assert!(b.test_and_clear(5) && !b.test_and_clear(5));
    }

    #[test]
    fn take_word_clears() {
        let b = PageBitmap::new(130, false);
        b.set(3);
        b.set(64 + 5);
        b.set(129);
        assert_eq!(b.take_word(1), 1 << 5);
        assert_eq!(b.take_word(1), 0);
        assert_eq!(b.iter_set().collect::<Vec<_>>(), vec![3, 129]);
        assert!(!b.test_and_set(7));
        assert!(b.test_and_set(7));
        b.clear(7);
        assert!(!b.test(7));
    }
}
