//! Deterministic datasets for benchmarks and tests (`ferry gen`).
//!
//! `mixed` models real guest RAM: for 4 KiB page i, i%4==0 is all zero,
//! i%4==1 is random bytes masked to their low 4 bits (compressible), and the
//! rest are random. Bytes are a pure function of (pattern, seed, offset): the
//! file is filled in 1 MiB pieces, piece c from ChaCha8 stream c, in parallel.

use std::path::Path;
use std::str::FromStr;

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use crate::{RamBlock, RamError};

const PIECE: usize = 1 << 20;
const PAGE: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    Mixed,
    Random,
    Zero,
}

impl FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mixed" => Ok(Self::Mixed),
            "random" => Ok(Self::Random),
            "zero" => Ok(Self::Zero),
            _ => Err(format!(
                "unknown pattern '{s}' (expected mixed, random or zero)"
            )),
        }
    }
}

/// Fills `buf`, which starts at byte `offset` of the dataset (a multiple of
/// 1 MiB), with the pattern's bytes.
pub fn fill(buf: &mut [u8], offset: u64, pattern: Pattern, seed: u64) {
    assert_eq!(
        offset % PIECE as u64,
        0,
        "dataset pieces start on 1 MiB boundaries"
    );
    for (i, piece) in buf.chunks_mut(PIECE).enumerate() {
        let index = offset / PIECE as u64 + i as u64;
        fill_piece(piece, index, pattern, seed);
    }
}

fn fill_piece(piece: &mut [u8], index: u64, pattern: Pattern, seed: u64) {
    if pattern == Pattern::Zero {
        piece.fill(0);
        return;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    rng.fill_bytes(piece);
    if pattern == Pattern::Mixed {
        let first_page = index * (PIECE / PAGE) as u64;
        for (p, page) in piece.chunks_mut(PAGE).enumerate() {
            match (first_page + p as u64) % 4 {
                0 => page.fill(0),
                1 => page.iter_mut().for_each(|b| *b &= 0x0f),
                _ => {}
            }
        }
    }
}

/// Writes a dataset of `size` bytes to `path` (created or truncated), using
/// all cores. `size` must be a multiple of 1 MiB.
pub fn write_file(path: &Path, size: u64, pattern: Pattern, seed: u64) -> Result<(), RamError> {
    if size == 0 || !size.is_multiple_of(PIECE as u64) {
        return Err(RamError::DatasetSize {
            path: path.into(),
            size,
        });
    }
    let block = RamBlock::file("dataset", path, PAGE as u32, true, Some(size))?;
    fill_block(&block, pattern, seed);
    Ok(())
}

/// Fills a writable block with the dataset, in parallel: each thread
/// makes 1 MiB pieces in a buffer of its own and copies them into the
/// block, so the block may be one others read (or even write) meanwhile.
pub fn fill_block(block: &RamBlock, pattern: Pattern, seed: u64) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pieces = block.len().div_ceil(PIECE as u64);
    let per = pieces.div_ceil(threads as u64).max(1);
    std::thread::scope(|s| {
        for first in (0..pieces).step_by(per as usize) {
            s.spawn(move || {
                let mut buf = vec![0u8; PIECE];
                for index in first..(first + per).min(pieces) {
                    let at = index * PIECE as u64;
                    let n = (PIECE as u64).min(block.len() - at) as usize;
                    fill_piece(&mut buf[..n], index, pattern, seed);
                    if let Some(dst) = block.slice(at, n) {
                        dst.copy_from(&buf[..n]);
                    }
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::is_zero_page;

    #[test]
    fn mixed_pages_follow_the_rule() {
        let mut buf = vec![0u8; 2 * PIECE];
        fill(&mut buf, 0, Pattern::Mixed, 7);
        for (i, page) in buf.chunks(PAGE).enumerate() {
            match i % 4 {
                0 => assert!(is_zero_page(page)),
                1 => assert!(page.iter().all(|&b| b < 16) && !is_zero_page(page)),
                _ => assert!(page.iter().any(|&b| b >= 16)),
            }
        }
    }

    #[test]
    fn bytes_depend_on_seed_and_offset_only() {
        let mut whole = vec![0u8; 3 * PIECE];
        fill(&mut whole, 0, Pattern::Random, 1);
        let mut tail = vec![0u8; PIECE];
        fill(&mut tail, 2 * PIECE as u64, Pattern::Random, 1);
        assert_eq!(&whole[2 * PIECE..], &tail[..]);
        let mut other = vec![0u8; PIECE];
        fill(&mut other, 2 * PIECE as u64, Pattern::Random, 2);
        assert_ne!(tail, other);
    }
}
