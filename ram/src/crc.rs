//! CRC-32 of guest memory that others may be writing, read in place.
//!
//! The data path checksums every page it sends (the multifd packets'
//! `payload_crc`). Guest memory may change under the reader, so it cannot
//! be a `&[u8]` (see [`crate::shared`]), and copying it into a private
//! buffer first costs a quarter of the checksum's speed. Here the bytes are
//! loaded by inline assembly straight into vector registers, and everything
//! after the load works on register values. A load by inline assembly is
//! outside Rust's memory model, like a relaxed atomic load: it sees some
//! bytes the writers stored (a page changing meanwhile may mix old and new
//! bytes, and fails its check on the other side, or goes again as dirty).
//!
//! The value is the standard CRC-32 (IEEE 802.3, reflected, the one
//! `crc32fast` computes), so the wire is unchanged: [`crc32`] of a region
//! equals `crc32fast::hash` of the same bytes. The fold is the carry-less
//! multiplication method of Gopal et al., "Fast CRC Computation for Generic
//! Polynomials Using PCLMULQDQ Instruction" (Intel, 2009): four 128-bit
//! accumulators fold 64 bytes per step, then one 128-bit value is folded
//! to 64 bits and reduced to 32 by Barrett reduction. Where the CPU has
//! AVX-512 and VPCLMULQDQ, sixteen accumulators in four 512-bit registers
//! fold 256 bytes a step, which is what keeps up with memory. Without PCLMULQDQ,
//! or for the last bytes that do not fill 64, the memory is copied out in
//! small pieces and `crc32fast` hashes the copy.

use vm_memory::VolatileSlice;

use crate::read_in_pieces;

/// Continues the CRC-32 `crc` (0 to start; the value of the bytes before)
/// over `mem`, which others may be writing, and returns the CRC-32 of the
/// bytes before followed by `mem`.
pub fn crc32(crc: u32, mem: &VolatileSlice) -> u32 {
    let (ptr, len) = (mem.ptr_guard().as_ptr(), mem.len());
    let mut done = 0;
    let mut crc = crc;
    #[cfg(target_arch = "x86_64")]
    {
        let wide = if fold::wide_available() {
            len - len % 256
        } else {
            0
        };
        if wide > 0 {
            // SAFETY: the CPU has the features (checked just above), `wide`
            // is a non-zero multiple of 256, and `ptr..ptr + wide` lies in
            // `mem`, whose memory stays mapped while `mem` lives.
            crc = unsafe { fold::crc32_wide(crc, ptr, wide) };
            done = wide;
        }
        let narrow = (len - done) - (len - done) % 64;
        if narrow > 0 && fold::available() {
            // SAFETY: as above, for the multiple of 64 bytes after `done`.
            crc = unsafe { fold::crc32(crc, ptr.add(done), narrow) };
            done += narrow;
        }
    }
    let _ = ptr;
    if done == len {
        return crc;
    }
    tail_crc32(crc, mem, done)
}

/// Continues `crc` over `mem[from..]` from private copies of it (kept out
/// of line: pages never need it where the fold runs).
#[cold]
#[inline(never)]
fn tail_crc32(crc: u32, mem: &VolatileSlice, from: usize) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(crc);
    if let Ok(rest) = mem.offset(from) {
        read_in_pieces(&rest, &mut [0u8; 1024], |piece| h.update(piece));
    }
    h.finalize()
}

#[cfg(target_arch = "x86_64")]
mod fold {
    use std::arch::asm;
    use std::arch::x86_64::{
        __m128i, __m512i, _mm256_castsi256_si128, _mm256_extracti128_si256, _mm256_xor_si256,
        _mm512_castsi128_si512, _mm512_castsi512_si256, _mm512_clmulepi64_epi128,
        _mm512_extracti64x4_epi64, _mm512_maskz_mov_epi64, _mm512_set_epi64,
        _mm512_ternarylogic_epi64, _mm512_xor_si512, _mm_and_si128, _mm_clmulepi64_si128,
        _mm_cvtsi32_si128, _mm_extract_epi32, _mm_set_epi32, _mm_set_epi64x, _mm_srli_si128,
        _mm_xor_si128,
    };

    // Constants for the reflected polynomial P = 0x104C11DB7 (as in the
    // paper): each K is x^n mod P, bit-reflected, for the fold distance it
    // serves.
    /// Fold by 512 bits (four accumulators, 64 bytes a step): x^(512+32), x^(512-32).
    const K1: i64 = 0x1_5444_2bd4;
    const K2: i64 = 0x1_c6e4_1596;
    /// Fold by 128 bits (one accumulator into the next): x^(128+32), x^(128-32).
    const K3: i64 = 0x1_7519_97d0;
    const K4: i64 = 0x0_ccaa_009e;
    /// Fold 96 bits to 64: x^64.
    const K5: i64 = 0x1_63cd_6124;
    /// Fold by 256 and 384 bits (lanes of one register onto its last).
    const K_256_LOW: i64 = 0x0_f1da_05aa;
    const K_256_HIGH: i64 = 0x1_5a54_6366;
    const K_384_LOW: i64 = 0x0_3db1_ecdc;
    const K_384_HIGH: i64 = 0x1_7435_9406;
    /// Fold by 1024 bits (one 512-bit register onto the one 128 bytes on).
    const K_1024_LOW: i64 = 0x1_e88e_f372;
    const K_1024_HIGH: i64 = 0x1_4a7f_e880;
    /// Fold by 2048 bits (sixteen accumulators, 256 bytes a step): x^(2048+32), x^(2048-32).
    const K_2048_LOW: i64 = 0x1_1542_778a;
    const K_2048_HIGH: i64 = 0x1_322d_1430;
    /// Barrett reduction: P itself and floor(x^64 / P), both reflected.
    const P_X: i64 = 0x1_DB71_0641;
    const U_PRIME: i64 = 0x1_F701_1641;

    /// True when this CPU can run [`crc32`] (std caches the answer).
    #[inline]
    pub(super) fn available() -> bool {
        is_x86_feature_detected!("pclmulqdq") && is_x86_feature_detected!("sse4.1")
    }

    /// True when this CPU can run [`crc32_wide`].
    #[inline]
    pub(super) fn wide_available() -> bool {
        available()
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("vpclmulqdq")
    }

    /// Loads the 256 bytes at `p` into four 512-bit registers.
    ///
    /// # Safety
    /// As [`load64`], for `p..p + 256`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load256(p: *const u8) -> [__m512i; 4] {
        let (a, b, c, d): (__m512i, __m512i, __m512i, __m512i);
        // SAFETY: the caller's guarantee; the instructions only read
        // `p..p + 256` into the four output registers.
        unsafe {
            asm!(
                "vmovdqu64 {a}, zmmword ptr [{p}]",
                "vmovdqu64 {b}, zmmword ptr [{p} + 64]",
                "vmovdqu64 {c}, zmmword ptr [{p} + 128]",
                "vmovdqu64 {d}, zmmword ptr [{p} + 192]",
                p = in(reg) p,
                a = out(zmm_reg) a,
                b = out(zmm_reg) b,
                c = out(zmm_reg) c,
                d = out(zmm_reg) d,
                options(pure, readonly, nostack, preserves_flags),
            );
        }
        [a, b, c, d]
    }

    /// Four accumulators at once, as [`fold_into`].
    #[inline]
    #[target_feature(enable = "avx512f", enable = "vpclmulqdq")]
    fn fold4_into(acc: __m512i, next: __m512i, k: __m512i) -> __m512i {
        let lo = _mm512_clmulepi64_epi128(acc, k, 0x00);
        let hi = _mm512_clmulepi64_epi128(acc, k, 0x11);
        // 0x96: the three-way exclusive or.
        _mm512_ternarylogic_epi64(next, lo, hi, 0x96)
    }

    /// Continues the CRC-32 `crc` over `len` bytes at `p`, 256 bytes a
    /// step.
    ///
    /// # Safety
    /// The CPU must have AVX-512F, VPCLMULQDQ, PCLMULQDQ and SSE4.1; `len`
    /// must be a non-zero multiple of 256, and `p..p + len` mapped and
    /// readable for the call (others may write it).
    #[target_feature(
        enable = "avx512f",
        enable = "avx2",
        enable = "vpclmulqdq",
        enable = "pclmulqdq",
        enable = "sse4.1"
    )]
    pub(super) unsafe fn crc32_wide(crc: u32, p: *const u8, len: usize) -> u32 {
        debug_assert!(len >= 256 && len.is_multiple_of(256));
        // SAFETY: `len >= 256`, so the first 256 bytes are in the region.
        let mut v = unsafe { load256(p) };
        v[0] = _mm512_xor_si512(v[0], _mm512_castsi128_si512(_mm_cvtsi32_si128(!crc as i32)));
        let (l, h) = (K_2048_LOW, K_2048_HIGH);
        let k = _mm512_set_epi64(h, l, h, l, h, l, h, l);
        let mut at = 256;
        // The loop that matters: 256 bytes a step, sixteen independent folds.
        while at < len {
            // SAFETY: `at + 256 <= len` (`len` is a multiple of 256).
            let y = unsafe { load256(p.add(at)) };
            for (acc, next) in v.iter_mut().zip(y) {
                *acc = fold4_into(*acc, next, k);
            }
            at += 256;
        }
        // The sixteen 128-bit accumulators into one, in three short steps:
        // v[0] and v[1] forward by 128 bytes onto v[2] and v[3], then that
        // pair's first forward by 64 bytes onto its second, then lanes 0..3
        // of the last register forward by 48, 32 and 16 bytes onto lane 3.
        let fold_by = |lo: i64, hi: i64| _mm512_set_epi64(hi, lo, hi, lo, hi, lo, hi, lo);
        let a = fold4_into(v[0], v[2], fold_by(K_1024_LOW, K_1024_HIGH));
        let b = fold4_into(v[1], v[3], fold_by(K_1024_LOW, K_1024_HIGH));
        let z = fold4_into(a, b, fold_by(K1, K2));
        let lanes = _mm512_set_epi64(0, 0, K4, K3, K_256_HIGH, K_256_LOW, K_384_HIGH, K_384_LOW);
        let last_lane = _mm512_maskz_mov_epi64(0b1100_0000, z);
        let t = _mm512_ternarylogic_epi64(
            _mm512_clmulepi64_epi128(z, lanes, 0x00),
            _mm512_clmulepi64_epi128(z, lanes, 0x11),
            last_lane,
            0x96,
        );
        let t = _mm256_xor_si256(_mm512_castsi512_si256(t), _mm512_extracti64x4_epi64(t, 1));
        let x = _mm_xor_si128(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
        let k3k4 = _mm_set_epi64x(K4, K3);
        reduce(x, k3k4)
    }

    /// Loads the 64 bytes at `p` into four vector registers.
    ///
    /// # Safety
    /// `p..p + 64` must be mapped and readable. Others may write it
    /// meanwhile: the load is an assembly instruction, which Rust's memory
    /// model does not see as a racing non-atomic read.
    #[inline(always)]
    unsafe fn load64(p: *const u8) -> [__m128i; 4] {
        let (a, b, c, d): (__m128i, __m128i, __m128i, __m128i);
        // SAFETY: the caller's guarantee; the instructions only read
        // `p..p + 64` into the four output registers.
        unsafe {
            asm!(
                "movdqu {a}, xmmword ptr [{p}]",
                "movdqu {b}, xmmword ptr [{p} + 16]",
                "movdqu {c}, xmmword ptr [{p} + 32]",
                "movdqu {d}, xmmword ptr [{p} + 48]",
                p = in(reg) p,
                a = out(xmm_reg) a,
                b = out(xmm_reg) b,
                c = out(xmm_reg) c,
                d = out(xmm_reg) d,
                options(pure, readonly, nostack, preserves_flags),
            );
        }
        [a, b, c, d]
    }

    /// `acc` moved forward by the distance `k` encodes, plus `next`.
    #[inline]
    #[target_feature(enable = "pclmulqdq")]
    fn fold_into(acc: __m128i, next: __m128i, k: __m128i) -> __m128i {
        let (lo, hi) = (
            _mm_clmulepi64_si128(acc, k, 0x00),
            _mm_clmulepi64_si128(acc, k, 0x11),
        );
        _mm_xor_si128(_mm_xor_si128(next, lo), hi)
    }

    /// Continues the CRC-32 `crc` over `len` bytes at `p`.
    ///
    /// # Safety
    /// The CPU must have PCLMULQDQ and SSE4.1; `len` must be a non-zero
    /// multiple of 64, and `p..p + len` mapped and readable for the call
    /// (others may write it).
    #[target_feature(enable = "pclmulqdq", enable = "sse4.1")]
    pub(super) unsafe fn crc32(crc: u32, p: *const u8, len: usize) -> u32 {
        debug_assert!(len >= 64 && len.is_multiple_of(64));
        // SAFETY: `len >= 64`, so the first 64 bytes are in the region.
        let [mut x0, mut x1, mut x2, mut x3] = unsafe { load64(p) };
        x0 = _mm_xor_si128(x0, _mm_cvtsi32_si128(!crc as i32));
        let k1k2 = _mm_set_epi64x(K2, K1);
        let mut at = 64;
        // The loop that matters: 64 bytes a step, four independent folds.
        while at < len {
            // SAFETY: `at + 64 <= len` (`len` is a multiple of 64).
            let [y0, y1, y2, y3] = unsafe { load64(p.add(at)) };
            x0 = fold_into(x0, y0, k1k2);
            x1 = fold_into(x1, y1, k1k2);
            x2 = fold_into(x2, y2, k1k2);
            x3 = fold_into(x3, y3, k1k2);
            at += 64;
        }
        let k3k4 = _mm_set_epi64x(K4, K3);
        let x = fold_into(fold_into(fold_into(x0, x1, k3k4), x2, k3k4), x3, k3k4);
        reduce(x, k3k4)
    }

    /// The CRC-32 (final value) of the 128-bit remainder `x`.
    #[target_feature(enable = "pclmulqdq", enable = "sse4.1")]
    fn reduce(x: __m128i, k3k4: __m128i) -> u32 {
        let low32 = _mm_set_epi32(0, 0, 0, !0);
        // 128 → 96 bits: the low 64 bits times x^(128-32), plus the high 64.
        let x = _mm_xor_si128(_mm_clmulepi64_si128(x, k3k4, 0x10), _mm_srli_si128(x, 8));
        // 96 → 64 bits: the low 32 bits times x^64, plus the rest.
        let x = _mm_xor_si128(
            _mm_clmulepi64_si128(_mm_and_si128(x, low32), _mm_set_epi64x(0, K5), 0x00),
            _mm_srli_si128(x, 4),
        );
        // Barrett: T1 = (x mod x^32)·µ, T2 = (T1 mod x^32)·P, CRC = (x ^ T2) / x^32.
        let pu = _mm_set_epi64x(U_PRIME, P_X);
        let t1 = _mm_clmulepi64_si128(_mm_and_si128(x, low32), pu, 0x10);
        let t2 = _mm_clmulepi64_si128(_mm_and_si128(t1, low32), pu, 0x00);
        !(_mm_extract_epi32(_mm_xor_si128(x, t2), 1) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RamBlock;
    use proptest::prelude::*;

    fn block_with(data: &[u8]) -> RamBlock {
        let len = data.len().next_multiple_of(4096).max(4096) as u64;
        let b = RamBlock::anonymous("t", len, 4096).unwrap();
        b.slice(0, data.len()).unwrap().copy_from(data);
        b
    }

    proptest! {
        // The in-place fold and the copy path give crc32fast's value for
        // any bytes, any start, any length, and any split into two calls.
        #[test]
        fn equals_crc32fast(data in prop::collection::vec(any::<u8>(), 0..9000),
                            start in 0usize..100, cut in any::<prop::sample::Index>()) {
            let b = block_with(&data);
            let start = start.min(data.len());
            let mem = b.slice(start as u64, data.len() - start).unwrap();
            prop_assert_eq!(crc32(0, &mem), crc32fast::hash(&data[start..]));
            let cut = cut.index(data.len() - start + 1);
            let (a, z) = (mem.subslice(0, cut).unwrap(), mem.offset(cut).unwrap());
            prop_assert_eq!(crc32(crc32(0, &a), &z), crc32fast::hash(&data[start..]));
        }
    }

    #[test]
    fn whole_pages_and_a_flipped_bit() {
        let data: Vec<u8> = (0..4 * 4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let b = block_with(&data);
        let good = crc32(0, &b.as_volatile_slice());
        assert_eq!(good, crc32fast::hash(&data));
        b.slice(5000, 1).unwrap().copy_from(&[data[5000] ^ 0x10]);
        assert_ne!(crc32(0, &b.as_volatile_slice()), good);
        assert_eq!(crc32(0, &b.slice(0, 0).unwrap()), 0);
    }
}
