//! Errors of the ram crate.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RamError {
    #[error("cannot open RAM file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot map RAM block '{block}' ({len} bytes): {source}")]
    Map {
        block: String,
        len: u64,
        source: std::io::Error,
    },
    #[error(
        "RAM block '{block}': length {len} is not a positive multiple of the page size {page_size}"
    )]
    BadLength {
        block: String,
        len: u64,
        page_size: u32,
    },
    #[error(
        "RAM block '{block}': page size {page_size} is not a power of two between 4 KiB and 1 GiB"
    )]
    BadPageSize { block: String, page_size: u32 },
    #[error("RAM block name '{0}' is empty or longer than 255 bytes")]
    BadName(String),
    #[error("RAM blocks {0}: they overlap in guest physical memory, or run past its end")]
    GuestLayout(String),
    #[error("two RAM blocks are named '{0}'")]
    DuplicateName(String),
    #[error("RAM blocks '{first}' and '{second}' would both be kept in {path} (names differ only in characters a file name cannot hold)")]
    SharedFile {
        first: String,
        second: String,
        path: PathBuf,
    },
    #[error("{tracker} dirty log{}: {what}: {source}", if block.is_empty() { String::new() } else { format!(", block '{block}'") })]
    DirtyLog {
        tracker: &'static str,
        block: String,
        what: String,
        source: std::io::Error,
    },
    #[error("dataset {path}: size {size} is not a positive multiple of 1 MiB")]
    DatasetSize { path: PathBuf, size: u64 },
    #[error("{path}: truncated: the file is {len} bytes, but {what} needs {need}")]
    Truncated {
        path: PathBuf,
        len: u64,
        need: u64,
        what: String,
    },
    #[error(
        "{path}: not a ferry saved guest (magic \"{found}\" at offset 0, expected \"FERRYSAV\")"
    )]
    BadMagic { path: PathBuf, found: String },
    #[error(
        "{path}: file format version {found} at offset 0x8, this ferry reads version {expected}"
    )]
    BadVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("{path}: the header checksum (offset 0x38) does not match the header and block table: corrupted header")]
    HeaderChecksum { path: PathBuf },
    #[error("{path}: block '{block}': {what}")]
    BadField {
        path: PathBuf,
        block: String,
        what: String,
    },
    #[error("{path}: block '{block}': {what} at offset {offset:#x} ({len} bytes) lies outside the file (data may lie from {floor:#x}, after the block table, to {file_len:#x})")]
    OutsideFile {
        path: PathBuf,
        block: String,
        what: &'static str,
        offset: u64,
        len: u64,
        floor: u64,
        file_len: u64,
    },
    #[error("{path}: block '{block}': the {what} at offset {offset:#x} does not match its checksum: corrupted")]
    TableChecksum {
        path: PathBuf,
        block: String,
        what: &'static str,
        offset: u64,
    },
    #[error("{path}: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path}: {what} at offset {offset:#x}: {source}")]
    FileIo {
        path: PathBuf,
        what: String,
        offset: u64,
        source: std::io::Error,
    },
    #[error("cannot lay out a saved guest: {0}")]
    Layout(String),
    #[error("{path}: {what}: {source}")]
    PathIo {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{path} is {kind}, not a regular file: {hint}")]
    NotRegular {
        path: PathBuf,
        /// "a FIFO", "a directory", "a symbolic link", ...
        kind: &'static str,
        /// What to do instead.
        hint: &'static str,
    },
}
