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
    #[error("two RAM blocks are named '{0}'")]
    DuplicateName(String),
    #[error("{tracker} dirty log{}: {what}: {source}", if block.is_empty() { String::new() } else { format!(", block '{block}'") })]
    DirtyLog {
        tracker: &'static str,
        block: String,
        what: String,
        source: std::io::Error,
    },
    #[error("dataset {path}: size {size} is not a positive multiple of 1 MiB")]
    DatasetSize { path: PathBuf, size: u64 },
}
