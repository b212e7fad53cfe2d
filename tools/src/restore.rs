//! `ferry restore`: read a saved-guest file back into memory, many threads
//! reading pages straight into place, every checksum checked.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use ferry::{restore_from_file, FileOptions, Progress, RestoreTarget};

use crate::output::{print_file_summary, ProgressView};
use crate::save::file_uri;

/// Restore a guest saved by `ferry save`.
///
/// Checks the header, every block's bitmap and checksum table and the device
/// state before reading any page; then K threads, each with its own
/// io_uring, read the present pages straight into fresh memory and check
/// each 1 MiB region's checksum as it lands. The result is `completed` only
/// if everything checked; the digest printed then equals the save's.
#[derive(Args)]
pub struct RestoreArgs {
    /// The saved guest: file:PATH.
    #[arg(long)]
    from: String,
    /// Keep the restored RAM in this file (created or truncated; sparse where
    /// pages are zero; removed if the restore fails). Default: anonymous memory.
    #[arg(long)]
    ram_out: Option<PathBuf>,
    /// Write the restored device state to this file.
    #[arg(long)]
    device_state_out: Option<PathBuf>,
    /// Threads reading in parallel, each with its own io_uring.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    channels: u16,
    /// Read pages with O_DIRECT (bypassing the page cache); falls back to
    /// buffered reads, with a note, where the file system refuses it.
    #[arg(long)]
    direct_io: bool,
    /// Reads in flight per thread.
    #[arg(long, default_value_t = 64)]
    queue_depth: usize,
    /// Print one JSON object with the result instead of text and a progress bar.
    #[arg(long)]
    json: bool,
}

pub fn run(a: RestoreArgs) -> anyhow::Result<bool> {
    let json = a.json;
    crate::output::json_on_early_failure("restore", json, restore(a))
}

fn restore(a: RestoreArgs) -> anyhow::Result<bool> {
    let path = file_uri(&a.from)?;
    let target = a
        .ram_out
        .clone()
        .map_or(RestoreTarget::Anonymous, RestoreTarget::Files);
    let opts = FileOptions {
        channels: a.channels,
        direct_io: a.direct_io,
        queue_depth: a.queue_depth,
        ..Default::default()
    };
    let progress = Arc::new(Progress::default());
    let view = ProgressView::start_for(progress.clone(), !a.json, "file");
    let result = restore_from_file(&path, &target, &opts, &progress);
    drop(view);
    match result {
        Ok(mut r) => {
            r.summary.digest = Some(r.memory.digest().to_string());
            if let Some(p) = &a.device_state_out {
                std::fs::write(p, &r.device_state)
                    .with_context(|| format!("writing {}", p.display()))?;
            }
            print_file_summary("restore", &r.summary, a.json);
            Ok(true)
        }
        Err(f) => {
            print_file_summary("restore", &f.summary, a.json);
            Ok(false)
        }
    }
}
