//! `ferry restore`: read a saved-guest file back into memory, many threads
//! reading pages straight into place, every checksum checked.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use std::time::{Duration, Instant};

use ferry::{
    restore_from_file, restore_lazy, synthetic::is_synthetic_state, Digest, FileFailed,
    FileOptions, FileSummary, Guest, GuestMemory, LazyRestored, Progress, Resources, RestoreTarget,
    SyntheticGuest, TrackerKind,
};

use crate::output::{print_file_summary, ProgressView};
use crate::save::file_path;

/// Restore a guest saved by `ferry save`.
///
/// Checks the header, every block's bitmap and checksum table and the device
/// state before reading any page; then K threads, each with its own
/// io_uring, read the present pages straight into fresh memory and check
/// each 1 MiB region's checksum as it lands. The result is `completed` only
/// if everything checked; the digest printed then equals the save's.
#[derive(Args)]
pub struct RestoreArgs {
    /// The saved guest: PATH or file:PATH.
    #[arg(long)]
    from: String,
    /// Keep the restored RAM in this file: written under a hidden
    /// temporary name beside it and moved into place only once every page
    /// is in and checked, so a failed restore leaves nothing and changes
    /// nothing there; a file already there is replaced whole, a symbolic
    /// link, directory, FIFO or device there is refused. The file is
    /// sparse: zero pages stay holes, but for runs shorter than 256 KiB
    /// between present pages (read across, as zeros). Several blocks: one file per block, FILE.NAME as for
    /// `ferry recv --ram-out`. Never the saved file itself. Default:
    /// anonymous memory.
    #[arg(long)]
    ram_out: Option<PathBuf>,
    /// Write the restored device state to this file.
    #[arg(long)]
    device_state_out: Option<PathBuf>,
    /// Threads reading in parallel, each with its own io_uring.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    channels: u16,
    #[command(flatten)]
    io: crate::file_io::IoArgs,
    /// Reads in flight per thread.
    #[arg(long, default_value_t = 64)]
    queue_depth: usize,
    /// Start at once and load pages on first touch (userfaultfd) while the
    /// rest is prefetched by --channels threads. The image guest does not
    /// run, so a built-in toucher plays the guest: it writes to --touch
    /// pages spread over memory (last page first, rewriting what it reads)
    /// and reports when its first write finished.
    #[arg(long, conflicts_with = "ram_out")]
    lazy: bool,
    /// With --lazy: pages the toucher writes while the prefetch runs.
    #[arg(long, default_value_t = 256, requires = "lazy")]
    touch: u64,
    /// Run the saved guest from the file's device state: a synthetic guest,
    /// or a KVM guest (needs /dev/kvm; its saved vCPU state is checked
    /// first, and a damaged one is refused naming the field before the VM
    /// runs). Restored eagerly, it runs --run-for once every page is in
    /// (the digest is of memory before it ran). With --lazy it starts at
    /// once instead of the toucher and the summary reports when its first
    /// write finished; it is paused once every page is in (a KVM guest
    /// after --run-for more) and no digest is reported. The workload (and a
    /// KVM guest's self-check: a wrong word fails the restore) is reported.
    #[arg(long)]
    run_guest: bool,
    /// With --run-guest: how long the guest runs before it is paused and
    /// its workload reported (2s, 500ms; a bare number is seconds). For a
    /// lazily restored synthetic guest: until every page is in instead.
    #[arg(long, default_value = "2s", value_parser = crate::units::parse_secs, requires = "run_guest")]
    run_for: Duration,
    /// Print one JSON object with the result instead of text and a progress bar.
    #[arg(long)]
    json: bool,
}

pub fn run(a: RestoreArgs) -> anyhow::Result<bool> {
    let json = a.json;
    crate::output::json_on_early_failure("restore", json, restore(a))
}

fn restore(a: RestoreArgs) -> anyhow::Result<bool> {
    let path = file_path(&a.from)?;
    let target = a
        .ram_out
        .clone()
        .map_or(RestoreTarget::Anonymous, RestoreTarget::Files);
    let opts = FileOptions {
        channels: a.channels,
        io: a.io.mode(),
        queue_depth: a.queue_depth,
        ..Default::default()
    };
    let progress = Arc::new(Progress::default());
    let view = ProgressView::start_for(progress.clone(), !a.json, "file");
    if a.lazy {
        let result = lazy(&path, &opts, &progress, a.touch, a.run_guest, a.run_for)?;
        drop(view);
        return report_lazy(result, &a);
    }
    let result = restore_from_file(&path, &target, &opts, &progress);
    drop(view);
    match result {
        Ok(mut r) if a.run_guest => {
            // The digest is of memory as restored, before the guest runs.
            set_digests(&mut r.summary, &r.memory, &r.device_state);
            let memory = Arc::new(r.memory);
            let ran = crate::kvm::run_after_restore(memory, &r.device_state, a.run_for);
            report_run(r.summary, ran, &r.device_state, &a)
        }
        Ok(mut r) => report_restored(&mut r.summary, Some(&r.memory), &r.device_state, &a),
        Err(f) => report_failed(&f, &a),
    }
}

/// Reports an eager restore whose guest ran: its workload, or why it could
/// not run (a damaged device state: status failed, exit status 1).
fn report_run(
    mut summary: FileSummary,
    ran: anyhow::Result<ferry::Workload>,
    device_state: &[u8],
    a: &RestoreArgs,
) -> anyhow::Result<bool> {
    let failed = match ran {
        Ok(w) => {
            let why = crate::kvm::verdict(&w);
            summary.workload = Some(w);
            why
        }
        Err(e) => {
            summary.status = "failed";
            summary.digest = None;
            summary.switchover_digest = None;
            summary.error = Some(crate::output::error_chain(&e));
            print_file_summary("restore", &summary, a.json);
            return Ok(false);
        }
    };
    if let Some(p) = &a.device_state_out {
        std::fs::write(p, device_state).with_context(|| format!("writing {}", p.display()))?;
    }
    print_file_summary("restore", &summary, a.json);
    if let Some(w) = summary.workload.as_ref().filter(|_| !a.json) {
        crate::recv::print_workload(w);
    }
    if let Some(why) = &failed {
        eprintln!("ferry restore: the restore completed, but {why}");
    }
    Ok(failed.is_none())
}

/// A lazy restore with the toucher as its guest.
fn lazy(
    path: &std::path::Path,
    opts: &FileOptions,
    progress: &Progress,
    touch: u64,
    run_guest: bool,
    run_for: Duration,
) -> anyhow::Result<Result<LazyRestored, FileFailed>> {
    let restoring = match restore_lazy(path, opts, progress) {
        Ok(r) => r,
        Err(f) => return Ok(Err(f)),
    };
    let memory = restoring.memory().clone();
    let started = restoring.started();
    if !run_guest {
        let toucher = std::thread::spawn(move || touch_pages(&memory, started, touch));
        let first_write_ms = toucher.join().ok().flatten();
        return Ok(restoring.finish(first_write_ms));
    }
    let state = restoring.device_state();
    if ferry_vmm::is_kvm_state(state) {
        return crate::kvm::run_lazily(restoring, run_for);
    }
    if !is_synthetic_state(state) {
        // Let the prefetch end before saying so: nothing is left running.
        let _ = restoring.finish(None);
        bail!("--run-guest: the saved device state is neither a synthetic nor a KVM guest's");
    }
    let guest = SyntheticGuest::from_device_state(
        memory,
        state,
        TrackerKind::Bitmap,
        Resources::none(false),
    );
    let guest = match guest {
        Ok(g) => g,
        Err(e) => {
            let _ = restoring.finish(None);
            return Err(e.into());
        }
    };
    guest.resume()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = loop {
        if let Some(t) = guest.first_write_at() {
            break Some(t);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_micros(100));
    };
    let first_write_ms = first.map(|t| t.duration_since(started).as_secs_f64() * 1e3);
    let result = restoring.finish(first_write_ms);
    guest.pause()?;
    Ok(result)
}

fn report_lazy(result: Result<LazyRestored, FileFailed>, a: &RestoreArgs) -> anyhow::Result<bool> {
    match result {
        // A guest that ran has changed its memory: no digest of it then.
        Ok(mut r) => {
            let memory = (!a.run_guest).then_some(&*r.memory);
            report_restored(&mut r.summary, memory, &r.device_state, a)
        }
        Err(f) => report_failed(&f, a),
    }
}

/// Reports a finished restore: the digests of the memory it holds (when
/// given; the restore's own digest, which touched only present pages, if
/// it took one), the device state written where --device-state-out says,
/// the summary.
fn report_restored(
    summary: &mut FileSummary,
    memory: Option<&GuestMemory>,
    device_state: &[u8],
    a: &RestoreArgs,
) -> anyhow::Result<bool> {
    if let Some(m) = memory {
        set_digests(summary, m, device_state);
    } else {
        summary.digest = None;
    }
    if let Some(p) = &a.device_state_out {
        std::fs::write(p, device_state).with_context(|| format!("writing {}", p.display()))?;
    }
    print_file_summary("restore", summary, a.json);
    let failed = summary.workload.as_ref().and_then(crate::kvm::verdict);
    if let Some(w) = summary.workload.as_ref().filter(|_| !a.json) {
        crate::recv::print_workload(w);
    }
    if let Some(why) = &failed {
        eprintln!("ferry restore: the restore completed, but {why}");
    }
    Ok(failed.is_none())
}

/// The digest of the memory (the restore's own, which touched only
/// present pages, if it took one) and of memory and device state.
fn set_digests(summary: &mut FileSummary, memory: &GuestMemory, device_state: &[u8]) {
    let digest = match summary.digest.as_deref().map(parse_digest) {
        Some(Some(d)) => d,
        _ => memory.digest(),
    };
    summary.digest = Some(digest.to_string());
    summary.switchover_digest = Some(Digest::with_device_state(digest, device_state).to_string());
}

/// A digest as [`Digest`] prints it (32 hex digits).
fn parse_digest(s: &str) -> Option<Digest> {
    u128::from_str_radix(s, 16).ok().map(Digest)
}

fn report_failed(f: &FileFailed, a: &RestoreArgs) -> anyhow::Result<bool> {
    print_file_summary("restore", &f.summary, a.json);
    Ok(false)
}

/// Plays a guest on lazily restored memory: rewrites one byte of each of
/// `pages` pages with the value it reads (the memory's contents do not
/// change), the last page of the last block first, then pages spread over
/// all of memory. Returns the milliseconds from `started` until the first
/// write finished.
fn touch_pages(memory: &GuestMemory, started: Instant, pages: u64) -> Option<f64> {
    let total = memory.total_pages();
    let mut first = None;
    for k in 0..pages.min(total) {
        let n = if k == 0 {
            total - 1
        } else {
            k.wrapping_mul(0x9E37_79B9_7F4A_7C15) % total
        };
        let (block, page) = block_page(memory, n)?;
        block.rewrite_first_byte(page);
        if first.is_none() {
            first = Some(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    first
}

/// Page `n` counted over all blocks in order: its block and index there.
fn block_page(memory: &GuestMemory, mut n: u64) -> Option<(&ferry::RamBlock, u64)> {
    for b in memory.blocks() {
        if n < b.pages() {
            return Some((b, n));
        }
        n -= b.pages();
    }
    None
}
