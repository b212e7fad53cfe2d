//! Reading guest memory that other threads may be writing.
//!
//! Guest RAM is written by vCPUs, receiver threads and the kernel while the
//! data path reads it, so ferry never forms a `&[u8]` over it: a reference
//! promises the bytes do not change while it lives, and here they may. Two
//! kinds of read are allowed instead, and this module holds both:
//! - word loads through `AtomicU64` (relaxed): each load sees some whole
//!   value a writer stored, and nothing is assumed between loads. The zero
//!   scan works this way, on the memory itself.
//! - copies through vm-memory's [`VolatileSlice`] into memory ferry owns
//!   ([`read_in_pieces`]); whatever interprets the bytes (a compressor, a
//!   digest) then reads its private copy, which nobody else writes. A copy
//!   taken while a page changes may mix old and new bytes; such a page is
//!   dirty in the log and goes again.
//!
//! The data path's checksum has a third way, in [`crate::crc32`]: loads by
//! inline assembly straight into vector registers, as fast as reading a
//! `&[u8]` and as sound as an atomic load.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::VolatileSlice;

use crate::is_zero_page;

/// True when every byte of `mem` is zero (as seen by one pass of loads).
///
/// Page-aligned memory (the data path's case) is read in place, 8 bytes a
/// load; anything else is copied out in pieces first.
#[inline]
pub fn is_zero(mem: &VolatileSlice) -> bool {
    let ptr = mem.ptr_guard().as_ptr();
    let len = mem.len();
    if !(ptr as usize).is_multiple_of(8) || !len.is_multiple_of(8) {
        let mut zero = true;
        read_in_pieces(mem, &mut [0u8; 256], |piece| zero &= is_zero_page(piece));
        return zero;
    }
    // SAFETY: `ptr` is 8-byte aligned and `len` a multiple of 8, and the
    // slice's memory stays mapped while `mem` lives. AtomicU64 has u64's
    // size and alignment, so the memory is `len / 8` atomics; every access
    // here is an atomic load, which may run alongside any other thread's
    // or the guest's stores.
    let words = unsafe { std::slice::from_raw_parts(ptr.cast::<AtomicU64>(), len / 8) };
    // Most non-zero pages differ from zero in their first words.
    let (head, rest) = words.split_at(words.len().min(8));
    if head.iter().any(|w| w.load(Ordering::Relaxed) != 0) {
        return false;
    }
    let mut stripes = rest.chunks_exact(32);
    for stripe in &mut stripes {
        let mut acc = [0u64; 4];
        for quad in stripe.chunks_exact(4) {
            for (lane, w) in acc.iter_mut().zip(quad) {
                *lane |= w.load(Ordering::Relaxed);
            }
        }
        if acc.iter().any(|&w| w != 0) {
            return false;
        }
    }
    stripes
        .remainder()
        .iter()
        .all(|w| w.load(Ordering::Relaxed) == 0)
}

/// Copies `mem` piece by piece into `scratch` (each piece at most its
/// length) and hands each copy to `f`, in order: how a checksum, digest or
/// compressor reads guest memory.
///
/// # Panics
/// If `scratch` is empty.
pub fn read_in_pieces(mem: &VolatileSlice, scratch: &mut [u8], mut f: impl FnMut(&[u8])) {
    assert!(!scratch.is_empty(), "read_in_pieces needs scratch space");
    let mut done = 0;
    while done < mem.len() {
        let n = scratch.len().min(mem.len() - done);
        let piece = &mut scratch[..n];
        // `done + n <= mem.len()`, so the subslice is in bounds.
        if let Ok(part) = mem.subslice(done, n) {
            part.copy_to(piece);
        }
        f(piece);
        done += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RamBlock;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn zero_scan_sees_any_single_byte(pages in 1u64..4, pos in any::<prop::sample::Index>(), val in 1u8..) {
            let b = RamBlock::anonymous("t", pages * 4096, 4096).unwrap();
            prop_assert!(is_zero(&b.as_volatile_slice()));
            let at = pos.index((pages * 4096) as usize);
            b.slice(at as u64, 1).unwrap().copy_from(&[val]);
            prop_assert!(!is_zero(&b.as_volatile_slice()));
            // Unaligned views take the copying path.
            let from = at.saturating_sub(3) as u64;
            prop_assert!(!is_zero(&b.slice(from, at - from as usize + 1).unwrap()));
            if at > 0 {
                prop_assert!(is_zero(&b.slice(1, at - 1).unwrap()));
            }
        }
    }

    #[test]
    fn pieces_cover_the_memory_in_order() {
        let b = RamBlock::anonymous("t", 3 * 4096, 4096).unwrap();
        let data: Vec<u8> = (0..3 * 4096).map(|i| (i * 7 % 251) as u8).collect();
        b.as_volatile_slice().copy_from(&data);
        let mut seen = Vec::new();
        read_in_pieces(&b.as_volatile_slice(), &mut [0u8; 1000], |p| {
            assert!(p.len() <= 1000);
            seen.extend_from_slice(p)
        });
        assert_eq!(seen, data);
    }
}
