//! `ferry save`: write a guest (an image guest: a file's bytes as RAM) to a
//! saved-guest file, many threads writing pages at fixed offsets.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use ferry::{save_to_file, FileOptions, ImageGuest, Progress, SaveOptions};

use crate::output::{print_file_summary, ProgressView};
use crate::units::parse_size;

/// Save a guest whose RAM is a file's bytes to a saved-guest file.
///
/// K threads, each with its own io_uring, write every non-zero page at its
/// fixed place in the file (page i of a block at pages_offset + i × page
/// size); zero pages are never written and stay holes. Then the page
/// bitmaps, a checksum per 1 MiB of memory, the device state and last the
/// header go in, and the file is synced. `ferry restore` reads it back.
#[derive(Args)]
pub struct SaveArgs {
    /// File whose bytes are the guest's RAM (e.g. made by `ferry gen`); its
    /// size must be a multiple of 4 KiB.
    #[arg(long)]
    ram: PathBuf,
    /// Where to save: file:PATH (created or replaced).
    #[arg(long)]
    to: String,
    /// Threads writing in parallel, each with its own io_uring.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    channels: u16,
    /// Write pages with O_DIRECT (bypassing the page cache); falls back to
    /// buffered writes, with a note, where the file system refuses it (tmpfs).
    #[arg(long)]
    direct_io: bool,
    /// Writes in flight per thread.
    #[arg(long, default_value_t = 64)]
    queue_depth: usize,
    /// Shortest run of zero pages left as a hole (e.g. 4K, 1M). Shorter
    /// zero runs between data are written as zeros to keep writes large; no
    /// zero page is ever marked present. 4K: every zero page is a hole.
    #[arg(long, default_value = "4K", value_parser = parse_size)]
    hole_min: u64,
    /// Do not fsync the file at the end (the save is then not durable when reported).
    #[arg(long)]
    no_sync: bool,
    /// File holding the guest's device state (default: a short text describing the image).
    #[arg(long)]
    device_state: Option<PathBuf>,
    /// Print one JSON object with the result instead of text and a progress bar.
    #[arg(long)]
    json: bool,
}

/// The path of a `file:PATH` URI.
pub fn file_uri(uri: &str) -> anyhow::Result<PathBuf> {
    match uri.strip_prefix("file:") {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => bail!("'{uri}' is not a file URI (expected file:PATH)"),
    }
}

pub fn run(a: SaveArgs) -> anyhow::Result<bool> {
    let json = a.json;
    crate::output::json_on_early_failure("save", json, save(a))
}

fn save(a: SaveArgs) -> anyhow::Result<bool> {
    let path = file_uri(&a.to)?;
    refuse_same_file(&a.ram, &path)?;
    let device_state = match &a.device_state {
        Some(p) => Some(
            std::fs::read(p).with_context(|| format!("reading device state {}", p.display()))?,
        ),
        None => None,
    };
    let guest = ImageGuest::open(&a.ram, device_state)?;
    let opts = SaveOptions {
        file: FileOptions {
            channels: a.channels,
            direct_io: a.direct_io,
            queue_depth: a.queue_depth,
            hole_min: a.hole_min,
        },
        sync: !a.no_sync,
    };
    let progress = Arc::new(Progress::default());
    let view = ProgressView::start_for(progress.clone(), !a.json, "file");
    let result = save_to_file(&guest, &path, &opts, &progress);
    drop(view);
    let (mut summary, ok) = match result {
        Ok(s) => (s, true),
        Err(f) => (*f.summary, false),
    };
    if ok {
        summary.digest = Some(ferry::Guest::memory(&guest).digest().to_string());
    }
    print_file_summary("save", &summary, a.json);
    Ok(ok)
}

/// Saving a RAM file onto itself would destroy it before it is read.
fn refuse_same_file(ram: &Path, out: &Path) -> anyhow::Result<()> {
    if let (Ok(a), Ok(b)) = (ram.canonicalize(), out.canonicalize()) {
        if a == b {
            bail!(
                "{} is both the guest's RAM and the save target",
                ram.display()
            );
        }
    }
    Ok(())
}
