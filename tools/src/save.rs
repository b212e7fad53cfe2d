//! `ferry save`: write a guest (an image guest: a file's bytes as RAM, or a
//! running synthetic guest, live or in the background) to a saved-guest
//! file, many threads writing pages at fixed offsets.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use ferry::{
    restore_from_file, save_background, save_live_to_file, save_to_file, BackgroundOptions, Digest,
    FileOptions, FileSummary, LiveOptions, Progress, Resources, RestoreTarget, SaveOptions,
};

use crate::guest_args::{GuestArgs, GuestKind};
use crate::output::{print_file_summary, ProgressView};
use crate::units::parse_size;

/// Save a guest to a saved-guest file.
///
/// K threads, each with its own io_uring, write every non-zero page at its
/// fixed place in the file (page i of a block at pages_offset + i × page
/// size); zero pages are never written and stay holes. Then the page
/// bitmaps, a checksum per 1 MiB of memory, the device state and last the
/// header go in, and the file is synced. `ferry restore` reads it back.
///
/// A running guest (`--guest synthetic`) is saved live: pass 1 writes every
/// page while it runs, later passes rewrite the pages it dirtied in place,
/// and it pauses only for the final pass and its device state (downtime_ms,
/// passes and switchover_digest in the summary; it stays paused after). With
/// --background it pauses only to save its device state and write-protect
/// its memory, then runs on while its memory is written out as it was at
/// that pause (pause_ms in the summary).
#[derive(Args)]
pub struct SaveArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// Live save (synthetic guest, without --background): pause once what
    /// is left would be written within this long: 300ms, 1.5s...; a bare
    /// number is milliseconds.
    #[arg(
        long,
        default_value = "300ms",
        value_parser = crate::units::parse_millis,
        allow_negative_numbers = true,
        conflicts_with = "background"
    )]
    downtime_limit: Duration,
    /// Live save (synthetic guest, without --background): pause after this
    /// many passes whatever is left.
    #[arg(long, default_value_t = 10, conflicts_with = "background")]
    max_passes: u64,
    /// Background snapshot (synthetic guest): the guest runs on while its
    /// memory is written as it was at the start (userfaultfd write-protect,
    /// synchronous mode).
    #[arg(long)]
    background: bool,
    /// Background snapshot: also take the digest of memory at the pause
    /// (lengthens the pause by a hash of all memory, reported apart).
    #[arg(long, requires = "background")]
    digest_at_pause: bool,
    /// After saving, restore the file into fresh memory and report its
    /// digest of memory and device state (file_digest); with
    /// --digest-at-pause or a live save, fail if it differs.
    #[arg(long)]
    verify_digest: bool,
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
    if let Some(ram) = &a.guest.ram {
        refuse_same_file(ram, &path)?;
    }
    let guest = a.guest.build(Resources::none(true))?;
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
    // A second Ctrl-C exits at once: leave no unfinished file behind.
    crate::signals::cancel_save_on_signal(&progress, partial_path(&path));
    let view = ProgressView::start_for(progress.clone(), !a.json, "file");
    let running = a.guest.guest == GuestKind::Synthetic;
    let result = if a.background {
        let bg = BackgroundOptions {
            digest_at_pause: a.digest_at_pause,
        };
        save_background(&*guest, &path, &opts, &bg, &progress)
    } else if running {
        let live = LiveOptions {
            downtime_limit: a.downtime_limit,
            max_passes: a.max_passes,
        };
        save_live_to_file(&*guest, &path, &opts, &live, &progress)
    } else {
        save_to_file(&*guest, &path, &opts, &progress)
    };
    drop(view);
    let (mut summary, mut ok) = match result {
        Ok(s) => (s, true),
        Err(f) => (*f.summary, false),
    };
    if ok && progress.cancel_requested() && !a.json {
        eprintln!("ferry save: the save completed before the cancel took effect");
    }
    // Memory still equals the file's unless the guest runs on (background).
    if ok && !a.background {
        summary.digest = Some(guest.memory().digest().to_string());
    }
    drop(guest);
    if ok && a.verify_digest {
        ok = verify_digest(&path, &opts.file, &mut summary)?;
    }
    print_file_summary("save", &summary, a.json);
    Ok(ok)
}

/// Restores the saved file into fresh memory and compares its digest with
/// the one taken at the pause (live: switchover; background: if asked).
fn verify_digest(path: &Path, opts: &FileOptions, s: &mut FileSummary) -> anyhow::Result<bool> {
    let progress = Progress::default();
    let r = match restore_from_file(path, &RestoreTarget::Anonymous, opts, &progress) {
        Ok(r) => r,
        Err(f) => {
            s.status = "failed";
            s.error = Some(format!("restoring the saved file to check it: {}", f.error));
            return Ok(false);
        }
    };
    let restored = Digest::of_guest(&r.memory, &r.device_state).to_string();
    let expected = s.digest_at_pause.clone().or(s.switchover_digest.clone());
    s.file_digest = Some(restored.clone());
    if let Some(e) = expected {
        if e != restored {
            s.status = "failed";
            s.error = Some(format!(
                "the saved file's memory (digest {restored}) is not the guest's at the pause ({e})"
            ));
            return Ok(false);
        }
    }
    Ok(true)
}

/// Where the save writes until it is complete: `.NAME.partial-PID` beside
/// the target (as the controller's snapshot module names it).
fn partial_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "guest".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.partial-{}", std::process::id()))
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
