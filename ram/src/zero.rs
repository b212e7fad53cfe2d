//! Zero-page detection with wide loads.
//!
//! A page is tested 16 bytes at a time; the common non-zero page is rejected
//! by its first few words, and a zero page is confirmed by OR-ing 64-byte
//! stripes, which the compiler turns into vector loads.

/// True when every byte of `page` is zero.
#[inline]
pub fn is_zero_page(page: &[u8]) -> bool {
    // Fast reject: most non-zero pages differ from zero in their first bytes.
    let head = page.len().min(64);
    if page[..head].iter().fold(0u8, |acc, &b| acc | b) != 0 {
        return false;
    }
    let mut stripes = page.chunks_exact(256);
    for stripe in &mut stripes {
        let mut acc = [0u64; 4];
        for words in stripe.chunks_exact(32) {
            for (lane, w) in acc.iter_mut().zip(words.chunks_exact(8)) {
                *lane |= u64::from_ne_bytes(w.try_into().unwrap());
            }
        }
        if acc.iter().any(|&w| w != 0) {
            return false;
        }
    }
    stripes.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn zero_and_nonzero_pages() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero_page(&page));
        page[4095] = 1;
        assert!(!is_zero_page(&page));
        page[4095] = 0;
        page[0] = 0x80;
        assert!(!is_zero_page(&page));
    }

    proptest! {
        #[test]
        fn any_single_set_byte_is_seen(len in 1usize..9000, pos in any::<prop::sample::Index>(), val in 1u8..) {
            let mut buf = vec![0u8; len];
            prop_assert!(is_zero_page(&buf));
            buf[pos.index(len)] = val;
            prop_assert!(!is_zero_page(&buf));
        }
    }
}
