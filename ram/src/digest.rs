//! The digest of guest memory: the same 128-bit value on both sides of a
//! migration exactly when both hold the same blocks with the same bytes.
//!
//! Each block is cut into `DIGEST_CHUNK` pieces hashed in parallel with
//! xxh3-64; the block name, length and the chunk hashes, in order, are then
//! hashed with xxh3-128. The result does not depend on the thread count.
//! Memory is read through copies into private buffers
//! ([`crate::read_in_pieces`]), so a digest may be taken while others write.

use std::fmt;

use xxhash_rust::xxh3::Xxh3;

use crate::{read_in_pieces, GuestMemory, RamBlock};

/// Bytes copied out of guest memory at a time while hashing.
const PIECE: usize = 16 << 10;

/// Bytes per independently hashed piece.
pub const DIGEST_CHUNK: usize = 16 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Digest(pub u128);

/// How a digest reads guest memory.
#[derive(Clone, Copy)]
enum Reading {
    /// Through copies: others may write meanwhile.
    Copied,
    /// In place: nobody writes meanwhile (the caller promised).
    Still,
}

impl Digest {
    /// The digest of guest memory, read through copies, so it may be
    /// taken while the guest or receivers write (it then describes some
    /// mix of before and after).
    pub fn of_memory(mem: &GuestMemory) -> Self {
        Self::of_memory_reading(mem, Reading::Copied)
    }

    /// [`Digest::of_memory`], reading memory in place (no copies: what a
    /// switchover, whose downtime it counts in, wants).
    ///
    /// # Safety
    /// Nobody may write `mem` during the call: the guest is paused (or
    /// never writes), and every receiver, file read or fault handler
    /// filling it has finished.
    pub unsafe fn of_still_memory(mem: &GuestMemory) -> Self {
        Self::of_memory_reading(mem, Reading::Still)
    }

    fn of_memory_reading(mem: &GuestMemory, reading: Reading) -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let hashes: Vec<Vec<u64>> = mem
            .blocks()
            .iter()
            .map(|b| chunk_hashes(b, threads, reading))
            .collect();
        Self::from_chunk_hashes(
            mem.blocks()
                .iter()
                .zip(&hashes)
                .map(|(b, h)| (b.name(), b.len(), &h[..])),
        )
    }

    /// The digest of blocks given as (name, length, the xxh3-64 of each
    /// `DIGEST_CHUNK` piece of its bytes in order, the last maybe short):
    /// [`Digest::of_memory`] for callers that hash the pieces themselves
    /// (a saved file checked without holding its memory; restored memory
    /// whose zero pages must stay untouched).
    pub fn from_chunk_hashes<'a>(
        blocks: impl IntoIterator<Item = (&'a str, u64, &'a [u64])>,
    ) -> Self {
        let mut top = Xxh3::new();
        for (name, len, hashes) in blocks {
            top.update(&(name.len() as u64).to_le_bytes());
            top.update(name.as_bytes());
            top.update(&len.to_le_bytes());
            for h in hashes {
                top.update(&h.to_le_bytes());
            }
        }
        Digest(top.digest128())
    }

    /// Digest of a plain byte string (device state), in the same format.
    pub fn of_bytes(bytes: &[u8]) -> Self {
        let mut top = Xxh3::new();
        top.update(&(bytes.len() as u64).to_le_bytes());
        top.update(bytes);
        Digest(top.digest128())
    }

    /// One digest for a guest's memory and device state together: what
    /// the source had at switchover and the destination holds before resume.
    pub fn of_guest(memory: &GuestMemory, device_state: &[u8]) -> Self {
        Self::with_device_state(Self::of_memory(memory), device_state)
    }

    /// [`Digest::of_guest`], reading memory in place.
    ///
    /// # Safety
    /// As [`Digest::of_still_memory`]: nobody writes `memory` meanwhile.
    pub unsafe fn of_still_guest(memory: &GuestMemory, device_state: &[u8]) -> Self {
        // SAFETY: the caller's promise, passed on.
        Self::with_device_state(unsafe { Self::of_still_memory(memory) }, device_state)
    }

    /// [`Digest::of_guest`] from the memory's digest taken already.
    pub fn with_device_state(memory: Digest, device_state: &[u8]) -> Self {
        let mut top = Xxh3::new();
        top.update(&memory.0.to_le_bytes());
        top.update(&Self::of_bytes(device_state).0.to_le_bytes());
        Digest(top.digest128())
    }
}

/// The xxh3-64 of each `DIGEST_CHUNK` piece of `block`, hashed by up to
/// `threads` threads.
fn chunk_hashes(block: &RamBlock, threads: usize, reading: Reading) -> Vec<u64> {
    let len = block.len();
    let chunks: Vec<(u64, usize)> = (0..len)
        .step_by(DIGEST_CHUNK)
        .map(|at| (at, (DIGEST_CHUNK as u64).min(len - at) as usize))
        .collect();
    let mut out = vec![0u64; chunks.len()];
    let per = chunks.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for (outs, ins) in out.chunks_mut(per).zip(chunks.chunks(per)) {
            s.spawn(move || {
                let mut scratch = vec![0u8; PIECE];
                for (o, &(at, n)) in outs.iter_mut().zip(ins) {
                    *o = match reading {
                        Reading::Copied => {
                            let mut h = Xxh3::new();
                            if let Some(c) = block.slice(at, n) {
                                read_in_pieces(&c, &mut scratch, |piece| h.update(piece));
                            }
                            h.digest()
                        }
                        // SAFETY: `Reading::Still` comes only from
                        // `of_still_memory`, whose caller promised that
                        // nobody writes the memory during the call.
                        Reading::Still => unsafe { block.bytes_unshared(at, n) }
                            .map_or(0, xxhash_rust::xxh3::xxh3_64),
                    };
                }
            });
        }
    });
    out
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlockSpec, GuestMemory};

    #[test]
    fn digest_sees_one_byte() {
        let spec = [BlockSpec {
            name: "ram".into(),
            len: 3 * DIGEST_CHUNK as u64 / 2,
            page_size: 4096,
        }];
        let a = GuestMemory::anonymous(&spec).unwrap();
        let b = GuestMemory::anonymous(&spec).unwrap();
        assert_eq!(a.digest(), b.digest());
        // SAFETY: the address is inside b's only block, which is writable.
        unsafe { *b.blocks()[0].host_addr().add(DIGEST_CHUNK + 5) = 1 };
        assert_ne!(a.digest(), b.digest());
        let block = &b.blocks()[0];
        assert_eq!(
            chunk_hashes(block, 1, Reading::Copied),
            chunk_hashes(block, 3, Reading::Copied)
        );
        // SAFETY: nothing writes `b` during the call (this thread only).
        assert_eq!(unsafe { Digest::of_still_memory(&b) }, b.digest());
        let whole = block.as_volatile_slice();
        // The streamed hash of each chunk is xxh3-64 of its bytes.
        let mut copy = vec![0u8; whole.len()];
        whole.copy_to(&mut copy[..]);
        let direct: Vec<u64> = copy
            .chunks(DIGEST_CHUNK)
            .map(xxhash_rust::xxh3::xxh3_64)
            .collect();
        assert_eq!(chunk_hashes(block, 2, Reading::Copied), direct);
    }
}
