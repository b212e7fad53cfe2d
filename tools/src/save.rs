//! `ferry save`: write a guest (an image guest: a file's bytes as RAM, or a
//! running synthetic guest, live or in the background) to a saved-guest
//! file, many threads writing pages at fixed offsets.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use ferry::{
    save_background, save_live_to_file, save_to_file, verify_file, BackgroundOptions, FileOptions,
    FileSummary, LiveOptions, Progress, Resources, SaveOptions,
};
use ferry_ram::mapped::open_regular;

use crate::guest_args::{GuestArgs, GuestKind};
use crate::output::{print_file_summary, ProgressView};
use crate::units::parse_size;

/// Save a guest to a saved-guest file.
///
/// The file is written beside its target under a hidden name
/// (.NAME.partial-PID) and renamed into place once complete, so a failed
/// or cancelled save leaves no file of its own and any older file intact.
/// A partial file that a killed save left beside the target is removed by
/// the next save to it (and named in its note); one whose save may still
/// run is named in the error.
///
/// K threads, each with its own io_uring, write every non-zero page at its
/// fixed place in the file (page i of a block at pages_offset + i × page
/// size); zero pages are never marked present, and runs of them of at
/// least --hole-min (1 MiB) are never written: they stay holes. Then the page
/// bitmaps, a checksum per 1 MiB of memory, the device state and last the
/// header go in, and the file is synced. `ferry restore` reads it back.
///
/// A running guest (`--guest synthetic` or `--guest kvm`) is saved live: pass 1 writes every
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
    /// Live save (synthetic or KVM guest, without --background): pause once what
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
    /// Live save (synthetic or KVM guest, without --background): pause after this
    /// many passes whatever is left.
    #[arg(long, default_value_t = 10, conflicts_with = "background")]
    max_passes: u64,
    /// Background snapshot (synthetic or KVM guest): the guest runs on while its
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
    /// Where to save: PATH or file:PATH (created, or replaced once the save
    /// is complete; a symbolic link, directory, FIFO or device there is
    /// refused).
    #[arg(long)]
    to: String,
    /// Threads writing in parallel, each with its own io_uring.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    channels: u16,
    #[command(flatten)]
    io: crate::file_io::IoArgs,
    /// Writes in flight per thread.
    #[arg(long, default_value_t = 64)]
    queue_depth: usize,
    /// Shortest run of zero pages left as a hole (e.g. 4K, 1M). Shorter
    /// zero runs between data are written as zeros to keep writes large; no
    /// zero page is ever marked present. 4K: every zero page is a hole, the
    /// smallest file, but scattered zero pages then cost the file system an
    /// extent each: 2 GiB `mixed` saved at 78% of dd's speed and restored at
    /// 91%, against 110% and 196% with 1M (docs/MEASUREMENTS.md).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    hole_min: u64,
    /// Do not fsync the file at the end (the save is then not durable when reported).
    #[arg(long)]
    no_sync: bool,
    /// Print one JSON object with the result instead of text and a progress bar.
    #[arg(long)]
    json: bool,
}

/// Migration URIs of kinds other than a file: an argument starting with
/// one of these is refused rather than taken for a file's name.
const OTHER_SCHEMES: [&str; 7] = ["tcp:", "unix:", "tls:", "exec:", "fd:", "rdma:", "vsock:"];

/// The path a saved-guest argument names: PATH, or file:PATH as a
/// migration URI writes it (every file command takes both).
pub fn file_path(arg: &str) -> anyhow::Result<PathBuf> {
    if arg.starts_with("file:") {
        return match arg.parse::<ferry_transport::ChannelUri>() {
            Ok(ferry_transport::ChannelUri::File(p)) => Ok(p),
            _ => bail!("'{arg}' names no file (expected PATH or file:PATH)"),
        };
    }
    if let Some(scheme) = OTHER_SCHEMES.iter().find(|s| arg.starts_with(*s)) {
        bail!(
            "'{arg}' is a {} URI, not a file: file commands take PATH or file:PATH (for a file whose name starts with '{scheme}', write ./{arg})",
            scheme.trim_end_matches(':')
        );
    }
    if arg.is_empty() {
        bail!("an empty path (expected PATH or file:PATH)");
    }
    Ok(PathBuf::from(arg))
}

pub fn run(a: SaveArgs) -> anyhow::Result<bool> {
    let json = a.json;
    crate::output::json_on_early_failure("save", json, save(a))
}

fn save(a: SaveArgs) -> anyhow::Result<bool> {
    let path = file_path(&a.to)?;
    if let Some(ram) = &a.guest.ram {
        // Checked here, before the guest maps it: opening a FIFO or a
        // device to map would block or make no sense.
        open_regular(
            ram,
            std::fs::File::options().read(true),
            0,
            "opening the guest's RAM file",
            "--ram takes a regular file (e.g. one `ferry gen` wrote)",
        )?;
        refuse_same_file(ram, &path)?;
    }
    let guest = a.guest.build(Resources::none(true))?;
    let opts = SaveOptions {
        file: FileOptions {
            channels: a.channels,
            io: a.io.mode(),
            queue_depth: a.queue_depth,
            hole_min: a.hole_min,
            ..Default::default()
        },
        sync: !a.no_sync,
    };
    let progress = Arc::new(Progress::default());
    // A second Ctrl-C exits at once: leave no unfinished file behind.
    crate::signals::cancel_save_on_signal(&progress, partial_path(&path));
    let view = ProgressView::start_for(progress.clone(), !a.json, "file");
    let running = a.guest.guest != GuestKind::Image;
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

/// Reads the saved file back as a restore would (`ferry verify`) and
/// compares the digest of the memory and device state it holds with the
/// one taken at the pause (live: switchover; background: if asked).
fn verify_digest(path: &Path, opts: &FileOptions, s: &mut FileSummary) -> anyhow::Result<bool> {
    let progress = Progress::default();
    let restored = match verify_file(path, opts, &progress) {
        Ok(v) => v.switchover_digest.unwrap_or_default(),
        Err(f) => {
            s.status = "failed";
            s.error = Some(format!(
                "reading the saved file back to check it: {}",
                f.error
            ));
            return Ok(false);
        }
    };
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
