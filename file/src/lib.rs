//! ferry-file: file mode. Saves a guest's memory to a saved-guest file
//! (the "mapped-ram" layout of `ferry_ram::mapped`: every page has a fixed
//! place, zero pages are holes) and restores it: eagerly, lazily on
//! demand (userfaultfd), or writes a running guest as it was at an instant
//! (background snapshot).
//!
//! - [`SavedFile`] (saved.rs): an opened saved file — layout, per-block
//!   [`ferry_ram::PageBitmap`]s, checksums, device state location, data
//!   handle. Restore ([`SavedFile::read_pages`], read.rs), verify
//!   ([`SavedFile::verify`], verify.rs) and `ferry inspect` start here.
//! - [`write_pages`] / [`rewrite_pages`] (write.rs): a save's passes, and
//!   [`WrittenPages::write_metadata`] for the tables written last.
//! - [`PageSource`] (page_source.rs): "fill this range of guest pages",
//!   what [`LazyRestore`] (lazy.rs) reads through; [`SavedFile`] is one.
//! - [`Arming`] / [`write_background`] (background.rs): the background
//!   snapshot.
//! - engine.rs: the K threads with their own io_uring under saving and
//!   restoring; data.rs: [`FileOptions`] and [`DataFile`].
//!
//! Guest memory is never read through a `&[u8]` here (vCPUs and other
//! threads may write it): zero scans are atomic loads in place
//! (`ferry_ram::is_zero`), checksums and digests hash private copies
//! (`ferry_ram::read_in_pieces`), and the kernel reads and writes pages at
//! raw addresses (io_uring, userfaultfd). Counters are the shared
//! [`ferry_ram::Counters`] (`wire_bytes` counts page data read or written).

pub mod background;
mod data;
mod engine;
mod error;
pub mod lazy;
mod page_source;
mod read;
mod saved;
mod verify;
mod write;

#[cfg(test)]
mod tests;

pub use background::{write_background, Arming, BackgroundStats};
pub use data::{DataFile, FileOptions, IoMode};
pub use error::FileError;
pub use lazy::{LazyRestore, LazyStats};
pub use page_source::{check_range, Filled, PageSource};
pub use read::restored_digest;
pub use saved::SavedFile;
pub use write::{rewrite_pages, write_pages, WrittenPages};
