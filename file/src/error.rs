//! Errors of file mode. Each names the file, and where it applies the
//! block and the offset in memory or in the file.

use std::io;
use std::path::PathBuf;

use ferry_ram::RamError;
use ferry_transport::TransportError;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The layout, a table or the device state failed its checks, or a
    /// RAM or userfaultfd operation failed (see [`RamError`]).
    #[error(transparent)]
    Ram(#[from] RamError),
    #[error("{path}: {what} of block '{block}' at file offset {offset:#x}: {source}")]
    Io {
        path: PathBuf,
        block: String,
        offset: u64,
        what: &'static str,
        source: io::Error,
    },
    #[error("{path}: block '{block}': checksum mismatch in the {len} bytes at offset {offset:#x} (file offset {file_offset:#x}): the saved pages or their bitmap are corrupted")]
    Checksum {
        path: PathBuf,
        block: String,
        offset: u64,
        len: u64,
        file_offset: u64,
    },
    /// The io_uring of a file thread failed.
    #[error("file {path}: {source}")]
    Ring {
        path: PathBuf,
        source: TransportError,
    },
    /// O_DIRECT was required ([`crate::IoMode::Direct`]) and cannot be used.
    #[error("O_DIRECT was asked for (--io direct) and cannot be used: {why}")]
    DirectIo { path: PathBuf, why: String },
    #[error("{path}: cancelled")]
    Cancelled { path: PathBuf },
    /// The memory, bitmaps or buffers handed in do not fit the file.
    #[error("{path}: {what}")]
    Mismatch { path: PathBuf, what: String },
    /// A [`crate::PageSource`] was asked for pages it cannot fill as asked.
    #[error("{source_name}: block #{block}{}: pages {first}..{end}: {why}", if name.is_empty() { String::new() } else { format!(" '{name}'") })]
    Range {
        source_name: String,
        block: usize,
        name: String,
        first: u64,
        end: u64,
        why: String,
    },
    /// A page source other than a file failed (postcopy: the network).
    #[error("page source {source_name}: {why}")]
    Source { source_name: String, why: String },
    /// A thread could not start or panicked, or an internal check failed.
    #[error("file mode stopped: {0}")]
    Stopped(String),
}

impl FileError {
    /// Whether this is the error a cancel ends with.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, Self::Cancelled { .. })
    }
}
