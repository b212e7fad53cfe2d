//! ferry-ram: a guest's memory as ferry sees it.
//!
//! Owns the RAM blocks (rust-vmm `vm-memory` regions: anonymous, backed by
//! a file, or a VMM's own `GuestMemoryMmap` regions taken without a copy),
//! the page bitmaps that say which pages to move, the dirty logs of a
//! running guest (a writer-marked bitmap, and userfaultfd write-protect),
//! the reads of memory others write ([`shared`]: zero scan, copies into
//! private buffers; [`crc32`]: the data path's checksum, in place), the
//! digest that proves both sides hold the same bytes, the deterministic
//! datasets `ferry gen` writes, the [`Prefaulter`] that populates a
//! destination's memory just ahead of the pages arriving, the layout of a saved guest's file
//! ([`mapped`]), userfaultfd helpers ([`uffd`]) and the [`Counters`] of
//! pages and bytes moved that every data path shares. It knows nothing of
//! sockets.

mod bitmap;
mod block;
mod counters;
mod crc;
mod digest;
mod dirty;
mod error;
pub mod mapped;
mod memory;
mod pagemap;
pub mod pattern;
mod prefault;
pub mod shared;
pub mod uffd;
mod uffd_wp;
mod zero;

pub use bitmap::{set_bits, PageBitmap};
pub use block::{RamBlock, DEFAULT_PAGE_SIZE};
pub use counters::{Counters, Totals};
pub use crc::crc32;
pub use digest::{Digest, DIGEST_CHUNK};
pub use dirty::{BitmapLog, DirtyLog};
pub use error::RamError;
pub use memory::{block_file_paths, BlockSpec, GuestMemory, StagedFiles};
pub use prefault::{PrefaultReport, Prefaulter, DEFAULT_PREFAULT_WINDOW};
pub use shared::{is_zero, read_in_pieces};
pub use uffd_wp::{UffdLog, WriteProtect};
pub use vm_memory;
pub use vm_memory::{GuestAddress, GuestMemoryMmap, VolatileSlice};
pub use zero::is_zero_page;
