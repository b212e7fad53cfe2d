//! `ferry inspect` (what a saved-guest file holds and where) and `ferry
//! verify` (read it all back and check every checksum).

use std::sync::Arc;

use clap::Args;
use ferry::{verify_file, FileOptions, Progress, SavedFile};
use serde_json::json;

use crate::output::{print_file_summary, ProgressView};
use crate::save::file_path;
use crate::units::bytes;

/// Show the layout of a saved-guest file: its blocks, where their bitmaps,
/// checksums and pages are, how many pages are present, the device state.
///
/// The header, block table, bitmaps and checksum tables are checked (as
/// every reader of the file opens it: `ferry_file::SavedFile`) but page
/// data is not read; `ferry verify` does that.
#[derive(Args)]
pub struct InspectArgs {
    /// The saved-guest file: PATH or file:PATH (a regular file).
    path: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn inspect(a: InspectArgs) -> anyhow::Result<bool> {
    let json = a.json;
    crate::output::json_on_early_failure("inspect", json, show(a))
}

fn show(a: InspectArgs) -> anyhow::Result<bool> {
    let path = file_path(&a.path)?;
    let saved = SavedFile::open(&path, ferry::IoMode::Buffered)?;
    let layout = saved.layout();
    let disk = saved.disk_bytes();
    if a.json {
        let blocks: Vec<_> = layout
            .blocks
            .iter()
            .map(|b| {
                json!({
                    "name": b.name, "len": b.len, "page_size": b.page_size,
                    "pages": b.pages(), "pages_present": b.pages_present,
                    "pages_offset": b.pages_offset, "bitmap_offset": b.bitmap_offset,
                    "bitmap_len": b.bitmap_len(), "checksums_offset": b.checksums_offset,
                    "checksums_len": b.checksums_len(layout.region_size),
                })
            })
            .collect();
        println!(
            "{}",
            json!({
                "status": "completed", "path": path.display().to_string(),
                "version": ferry_ram::mapped::VERSION, "complete": layout.is_complete(),
                "file_len": layout.file_len, "file_disk_bytes": disk,
                "region_size": layout.region_size, "ram_bytes": layout.total_ram(),
                "pages_present": layout.pages_present(),
                "device_state_offset": layout.device_state_offset,
                "device_state_bytes": layout.device_state_len,
                "blocks": blocks,
            })
        );
        return Ok(true);
    }
    println!(
        "{}: ferry saved guest, format version {}, {} of RAM in {} block(s)",
        path.display(),
        ferry_ram::mapped::VERSION,
        bytes(layout.total_ram()),
        layout.blocks.len()
    );
    println!(
        "  file: {} bytes ({} on disk: zero runs are holes); one checksum per {} of memory",
        layout.file_len,
        bytes(disk),
        bytes(u64::from(layout.region_size))
    );
    for b in &layout.blocks {
        println!(
            "  block '{}': {} ({} pages of {}), {} present ({} zero)",
            b.name,
            bytes(b.len),
            b.pages(),
            bytes(u64::from(b.page_size)),
            b.pages_present,
            b.pages() - b.pages_present
        );
        println!(
            "    bitmap at {:#x} ({} bytes), checksums at {:#x} ({} bytes), pages at {:#x}..{:#x}",
            b.bitmap_offset,
            b.bitmap_len(),
            b.checksums_offset,
            b.checksums_len(layout.region_size),
            b.pages_offset,
            b.pages_offset + b.len
        );
    }
    println!(
        "  device state: {} bytes at {:#x}",
        layout.device_state_len, layout.device_state_offset
    );
    Ok(true)
}

/// Check every checksum of a saved-guest file: header, bitmaps, checksum
/// tables, device state and every 1 MiB region of page data.
///
/// Reads the file as `ferry restore` does (the same reads of its present
/// pages), but into small buffers rather than the guest's memory: time and
/// memory grow with the pages present, not the guest's size. Prints the
/// digest of the memory a restore would give (equal to the save's). Exit
/// status 0 only if everything checked.
#[derive(Args)]
pub struct VerifyArgs {
    /// The saved-guest file: PATH or file:PATH (a regular file).
    path: String,
    /// Threads reading in parallel.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    channels: u16,
    #[command(flatten)]
    io: crate::file_io::IoArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn verify(a: VerifyArgs) -> anyhow::Result<bool> {
    let json = a.json;
    crate::output::json_on_early_failure("verify", json, check(a))
}

fn check(a: VerifyArgs) -> anyhow::Result<bool> {
    let path = file_path(&a.path)?;
    let opts = FileOptions {
        channels: a.channels,
        io: a.io.mode(),
        ..Default::default()
    };
    let progress = Arc::new(Progress::default());
    let view = ProgressView::start_for(progress.clone(), !a.json, "file");
    let result = verify_file(&path, &opts, &progress);
    drop(view);
    match result {
        Ok(summary) => {
            print_file_summary("verify", &summary, a.json);
            if !a.json {
                eprintln!("ferry verify: OK: every checksum holds");
            }
            Ok(true)
        }
        Err(f) => {
            print_file_summary("verify", &f.summary, a.json);
            Ok(false)
        }
    }
}
