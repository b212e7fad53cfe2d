//! `--io auto|direct|buffered`: how `save` and `restore` move page data
//! between memory and the file (`ferry::IoMode`).

use clap::{Args, ValueEnum};
use ferry::IoMode;

#[derive(Args)]
pub struct IoArgs {
    /// How page data moves between memory and the file. `auto` (the
    /// default): O_DIRECT, bypassing the page cache, wherever the file
    /// system takes it for this file and the pages meet its alignment;
    /// elsewhere (e.g. ramfs) buffered I/O, and the summary says why
    /// (`direct_io_fallback` in --json). `direct`: O_DIRECT or an error.
    /// `buffered`: through the page cache, which then holds the file's
    /// pages. Either way the bitmaps, checksums, device state and header go
    /// through the page cache, and a save ends with an fsync.
    /// (`--direct-io`, from before O_DIRECT was the default, means `auto`.)
    #[arg(long, value_enum, default_value_t = IoArg::Auto)]
    io: IoArg,
    /// Kept for old scripts: the same as `--io auto`, the default.
    #[arg(long, hide = true, conflicts_with = "io")]
    direct_io: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum IoArg {
    Auto,
    Direct,
    Buffered,
}

impl IoArgs {
    pub fn mode(&self) -> IoMode {
        match self.io {
            IoArg::Auto => IoMode::Auto,
            IoArg::Direct => IoMode::Direct,
            IoArg::Buffered => IoMode::Buffered,
        }
    }
}
