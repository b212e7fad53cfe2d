//! Saving a guest to a file and restoring it: the controller's side of file
//! mode. It decides the order of things — pause, lay out the file, write the
//! pages in parallel (`ferry_file::write_pages`), then bitmaps, checksums, device
//! state and last the header; or check the header, tables and device state
//! before reading pages into fresh memory — and reports a [`FileSummary`].
//!
//! A running guest is saved live ([`save_live_to_file`]): pass 1 writes
//! every page while it runs, later passes rewrite the pages its dirty log
//! reports in place (the file never grows), and it pauses only for the
//! final pass and its device state. Or in the background
//! ([`save_background`]): it pauses only while its device state is saved
//! and its memory write-protected, and the file holds memory as it was then
//! (`ferry_file::background`).
//!
//! A save is durable when it reports success (the file is synced unless the
//! caller asks otherwise). It writes beside the target (a hidden
//! `.NAME.partial-PID`, locked while the save runs) and renames the
//! finished file into place, so a failed or cancelled save
//! ([`Progress::cancel`]) leaves no file of its own and any older file at
//! the target intact. A partial file left by a save that was killed is
//! removed by the next save to that path and named in its `note`; one whose
//! save may still run is named in the error. A restore into RAM files
//! writes them under temporary names too and moves them into place only
//! when every page is in and checked; a failed restore hands back no
//! memory and leaves no file.
//!
//! Restoring and verifying cost time and memory in proportion to the
//! pages present in the file, not the guest's size: absent (zero) pages
//! are never read, never touched in the memory restored into (a RAM file
//! keeps them as holes), and regions and digest chunks without a present
//! page are checked against the known checksum of zeros.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_file::{
    rewrite_pages, write_background, write_pages, Arming, DataFile, FileError, FileOptions,
    LazyRestore, SavedFile, WrittenPages,
};
use ferry_multifd::{Counters, MultifdError};
use ferry_ram::mapped::{check_output_path, open_regular, FileLayout};
use ferry_ram::{
    block_file_paths, BlockSpec, Digest, GuestMemory, PageBitmap, RamError, WriteProtect,
};
use serde::Serialize;

use crate::{Guest, GuestError, Progress};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Ram(#[from] RamError),
    #[error(transparent)]
    Multifd(#[from] MultifdError),
    #[error(transparent)]
    File(FileError),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: the saved guest has {bytes} bytes of RAM, more than can be mapped here ({source}); restore it into a RAM file instead (`ferry restore --ram-out`), which only needs the pages present")]
    Memory {
        path: PathBuf,
        bytes: u64,
        source: Box<RamError>,
    },
    #[error("{path}: cancelled; nothing was written there (the partial file was removed)")]
    Cancelled { path: PathBuf },
    #[error("{path}: {partial} lies beside it: {why}")]
    Partial {
        path: PathBuf,
        partial: PathBuf,
        why: &'static str,
    },
}

/// A file-mode error; a saved file's failed checks stay [`SnapshotError::Ram`].
impl From<FileError> for SnapshotError {
    fn from(e: FileError) -> Self {
        match e {
            FileError::Ram(e) => Self::Ram(e),
            other => Self::File(other),
        }
    }
}

/// What a save or restore reports (`ferry save/restore/verify --json`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct FileSummary {
    /// "completed", "failed" or "cancelled".
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub path: String,
    pub channels: u16,
    /// O_DIRECT was asked for, and whether it was used.
    pub direct_io_requested: bool,
    pub direct_io: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Guest RAM covered (present and zero pages); for a live save, summed
    /// over all passes.
    pub ram_bytes: u64,
    /// Page data written to or read from the file.
    pub file_bytes: u64,
    /// The file's length, and what it occupies on disk (it is sparse).
    pub file_len: u64,
    pub file_disk_bytes: u64,
    pub pages_normal: u64,
    pub pages_zero: u64,
    pub seconds: f64,
    /// Guest RAM per second, and page data per second, in GB/s.
    pub gbps: f64,
    pub gbps_file: f64,
    /// Digest of all guest RAM (see `ferry_ram::Digest`): what was saved, or
    /// what the restored memory holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    pub device_state_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_state_digest: Option<String>,
    /// How a running guest was saved: "live" (passes, then a pause for the
    /// last) or "background" (memory as it was at a short pause).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<&'static str>,
    /// Live: passes over memory, the final one included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passes: Option<u64>,
    /// Live: from the pause until the final pass, device state and metadata
    /// were in the file (the fsync after is not counted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    /// Live: digest of memory and device state as saved (taken while the
    /// guest is still paused after the save); a restore's `digest` of the
    /// same guest equals it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switchover_digest: Option<String>,
    /// Background: how long the guest was paused (device state and
    /// write-protect), not counting `digest_at_pause_ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<f64>,
    /// Background, if asked: digest of memory and device state taken during
    /// the pause (the memory the file must hold), and what taking it cost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest_at_pause: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest_at_pause_ms: Option<f64>,
    /// Background: pages the guest wrote while its memory was being
    /// write-protected before the pause, protected again during it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rearmed_pages: Option<u64>,
    /// Background: regions saved early because the guest was about to write
    /// them, regions saved in order, and the longest from the handler
    /// reading a write fault until that region's protection was lifted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault_regions: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ordered_regions: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_fault_ms: Option<f64>,
    /// `ferry save --verify-digest`: digest of memory and device state as
    /// restored from the saved file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_digest: Option<String>,
    /// For a lazy restore: how the memory became whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy: Option<LazyReport>,
    pub started_at_unix: f64,
    pub finished_at_unix: f64,
}

impl FileSummary {
    fn new(path: &Path, opts: &FileOptions) -> Self {
        Self {
            status: "failed",
            path: path.display().to_string(),
            channels: opts.channels,
            direct_io_requested: opts.direct_io,
            started_at_unix: crate::summary::unix_now(),
            ..Default::default()
        }
    }

    fn finish(&mut self, started: Instant, counters: &Counters, error: Option<String>) {
        let t = counters.snapshot();
        self.ram_bytes = t.ram_bytes;
        self.file_bytes = t.wire_bytes;
        self.pages_normal = t.pages_normal;
        self.pages_zero = t.pages_zero;
        self.seconds = started.elapsed().as_secs_f64();
        self.finished_at_unix = crate::summary::unix_now();
        let s = self.seconds.max(1e-9);
        self.gbps = self.ram_bytes as f64 / s / 1e9;
        self.gbps_file = self.file_bytes as f64 / s / 1e9;
        self.status = if error.is_none() {
            "completed"
        } else {
            "failed"
        };
        self.error = error;
    }

    /// [`Self::finish`] with the error of `result`, if any.
    fn finish_with<T>(
        &mut self,
        started: Instant,
        counters: &Counters,
        result: &Result<T, SnapshotError>,
    ) {
        self.finish(
            started,
            counters,
            result.as_ref().err().map(|e| e.to_string()),
        );
    }

    pub fn completed(&self) -> bool {
        self.status == "completed"
    }
}

/// The start of a file operation: the time, its counters (attached to
/// `progress`) and its summary.
fn begin(
    path: &Path,
    opts: &FileOptions,
    progress: &Progress,
) -> (Instant, Arc<Counters>, FileSummary) {
    let started = Instant::now();
    let counters = Arc::new(Counters::default());
    progress.attach(counters.clone());
    (started, counters, FileSummary::new(path, opts))
}

/// The end of a file operation whose `summary` is finished: the phase set to
/// its status, and `result` handed back with the summary, as what `ok`
/// makes of a success or as the error.
fn conclude<T, U>(
    progress: &Progress,
    summary: FileSummary,
    result: Result<T, SnapshotError>,
    ok: impl FnOnce(T, FileSummary) -> U,
) -> Result<U, FileFailed> {
    progress.set_phase(summary.status);
    match result {
        Ok(v) => Ok(ok(v, summary)),
        Err(error) => Err(FileFailed::new(error, summary)),
    }
}

/// How a lazy restore went.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LazyReport {
    /// From the start of the restore until the guest's memory could be used.
    pub ready_ms: f64,
    /// From the start of the restore until the guest's first write finished
    /// (filled in by whoever runs the guest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_write_ms: Option<f64>,
    /// Regions loaded because the guest touched them first, and by the prefetch.
    pub fault_regions: u64,
    pub prefetched_regions: u64,
    /// The longest a fault waited for its region.
    pub max_fault_ms: f64,
}

/// A failed save or restore: the error and what had been done by then.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct FileFailed {
    pub error: SnapshotError,
    pub summary: Box<FileSummary>,
}

impl FileFailed {
    fn new(error: SnapshotError, summary: FileSummary) -> Self {
        Self {
            error,
            summary: Box::new(summary),
        }
    }
}

/// How a save runs.
#[derive(Clone, Debug)]
pub struct SaveOptions {
    pub file: FileOptions,
    /// fsync the file before reporting success.
    pub sync: bool,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            file: FileOptions::default(),
            sync: true,
        }
    }
}

/// Saves a paused `guest` to a new file at `path` (replacing any file there).
pub fn save_to_file(
    guest: &dyn Guest,
    path: &Path,
    opts: &SaveOptions,
    progress: &Progress,
) -> Result<FileSummary, FileFailed> {
    run_save(
        guest,
        path,
        opts,
        progress,
        |partial, opts, counters, summary| save(guest, partial, opts, counters, progress, summary),
    )
}

/// How a live save decides when to pause.
#[derive(Clone, Debug)]
pub struct LiveOptions {
    /// Pause once the pages left would take no longer than this to write
    /// (at the speed of the pass before).
    pub downtime_limit: Duration,
    /// Pause after this many passes whatever is left (at least 1).
    pub max_passes: u64,
}

impl Default for LiveOptions {
    fn default() -> Self {
        Self {
            downtime_limit: Duration::from_millis(300),
            max_passes: 10,
        }
    }
}

/// Saves a running `guest` live: passes while it runs, then a pause for
/// the final pass and device state. The guest stays paused afterwards (as
/// QEMU's after a migration to a file); a failed save resumes it. A guest
/// without a dirty log is saved as [`save_to_file`] does.
pub fn save_live_to_file(
    guest: &dyn Guest,
    path: &Path,
    opts: &SaveOptions,
    live: &LiveOptions,
    progress: &Progress,
) -> Result<FileSummary, FileFailed> {
    run_save(
        guest,
        path,
        opts,
        progress,
        |partial, opts, counters, summary| match guest.dirty_log() {
            Some(log) => save_live(guest, log, partial, opts, live, counters, progress, summary),
            None => save(guest, partial, opts, counters, progress, summary),
        },
    )
}

/// How a background snapshot runs.
#[derive(Clone, Debug, Default)]
pub struct BackgroundOptions {
    /// Take the digest of memory and device state during the pause (it
    /// lengthens the pause by a hash of all memory; reported apart).
    pub digest_at_pause: bool,
}

/// Saves a running `guest` as it is now, letting it run on while its
/// memory is written out (seed 004's background snapshot): it pauses only
/// while its device state is saved and its memory write-protected.
pub fn save_background(
    guest: &dyn Guest,
    path: &Path,
    opts: &SaveOptions,
    bg: &BackgroundOptions,
    progress: &Progress,
) -> Result<FileSummary, FileFailed> {
    run_save(
        guest,
        path,
        opts,
        progress,
        |partial, opts, counters, summary| {
            save_bg(guest, partial, opts, bg, counters, progress, summary)
        },
    )
}

/// What every kind of save shares: counters and progress, a summary, the
/// file written beside `path` (locked, see [`claim_partial`]) and renamed
/// into place once `body` succeeds, cancel through `progress` (handed to
/// `body` in the options it gets), and [`finish_save`]'s clean-up either way.
fn run_save(
    guest: &dyn Guest,
    path: &Path,
    opts: &SaveOptions,
    progress: &Progress,
    body: impl FnOnce(&Path, &SaveOptions, &Counters, &mut FileSummary) -> Result<(), SnapshotError>,
) -> Result<FileSummary, FileFailed> {
    let (started, counters, mut summary) = begin(path, &opts.file, progress);
    progress
        .total_ram_bytes
        .store(guest.memory().total_bytes(), Ordering::Relaxed);
    let mut opts = opts.clone();
    let cancel = cancel_flag(progress);
    opts.file.cancel = Some(cancel.clone());
    let partial = partial_path(path);
    let mut created = false;
    let result = claim_partial(path, &partial, &mut summary).and_then(|lock| {
        created = true;
        body(&partial, &opts, &counters, &mut summary)?;
        if cancel.load(Ordering::SeqCst) {
            return Err(SnapshotError::Cancelled { path: path.into() });
        }
        replace(&partial, path, opts.sync)?;
        drop(lock);
        Ok(())
    });
    let result = match result {
        Err(_) if cancel.load(Ordering::SeqCst) => {
            Err(SnapshotError::Cancelled { path: path.into() })
        }
        other => other,
    };
    let partial = created.then_some(&*partial);
    finish_save(
        guest, partial, started, &counters, progress, summary, result,
    )
}

/// A flag that turns true when `progress` is cancelled (at once if it is).
fn cancel_flag(progress: &Progress) -> Arc<AtomicBool> {
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    progress.on_cancel(move || flag.store(true, Ordering::SeqCst));
    cancel
}

fn finish_save(
    guest: &dyn Guest,
    partial: Option<&Path>,
    started: Instant,
    counters: &Counters,
    progress: &Progress,
    mut summary: FileSummary,
    result: Result<(), SnapshotError>,
) -> Result<FileSummary, FileFailed> {
    if result.is_err() {
        if let Some(p) = partial {
            let _ = std::fs::remove_file(p);
        }
        if let Err(e) = guest.resume() {
            tracing::error!("resuming the guest after a failed save: {e}");
        }
    }
    summary.finish_with(started, counters, &result);
    if matches!(result, Err(SnapshotError::Cancelled { .. })) {
        summary.status = "cancelled";
    }
    conclude(progress, summary, result, |(), summary| summary)
}

/// Where a save writes before it is complete: beside the target, so the
/// final rename is atomic and a failed save leaves any older file intact.
fn partial_path(path: &Path) -> PathBuf {
    path.with_file_name(format!("{}{}", partial_prefix(path), std::process::id()))
}

/// The start of the name of every save's partial file for `path`.
fn partial_prefix(path: &Path) -> String {
    let name = path
        .file_name()
        .map_or_else(|| "guest".into(), |n| n.to_string_lossy().into_owned());
    format!(".{name}.partial-")
}

/// Gets a save to `path` ready to write `partial`: refuses a target that
/// is not a regular file (a directory, FIFO, device, socket or symbolic
/// link), deals with partial files of earlier saves to the same path
/// ([`clear_stale_partials`]), then creates `partial` new (never through a
/// symbolic link) and holds an exclusive lock on it while the save runs,
/// which tells a later save that this one is alive. The returned file
/// holds the lock.
fn claim_partial(
    path: &Path,
    partial: &Path,
    summary: &mut FileSummary,
) -> Result<File, SnapshotError> {
    check_output_path(
        path,
        "save to a path where nothing is, or a regular file to replace",
    )?;
    clear_stale_partials(path, summary)?;
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(partial)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => SnapshotError::Partial {
                path: path.into(),
                partial: partial.into(),
                why: "another save to this path is running in this process",
            },
            _ => SnapshotError::Io {
                path: partial.into(),
                what: "creating the file",
                source,
            },
        })?;
    // SAFETY: flock on a descriptor `file` owns; no memory is passed. It
    // waits only while a later save looks at this file (a moment).
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        let source = std::io::Error::last_os_error();
        let _ = std::fs::remove_file(partial);
        return Err(SnapshotError::Io {
            path: partial.into(),
            what: "locking the file",
            source,
        });
    }
    Ok(file)
}

/// Partial files beside `path` (`.NAME.partial-PID`) left by earlier saves
/// to it. One nobody holds locked whose process is gone was left by a save
/// that was killed: it is removed, and named in `summary.note`. One still
/// locked belongs to a save that is running; one whose process still
/// exists (yet unlocked: just being created, or the PID was reused) cannot
/// be told from a running one: either is an error that names the file.
fn clear_stale_partials(path: &Path, summary: &mut FileSummary) -> Result<(), SnapshotError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let prefix = partial_prefix(path);
    let Ok(entries) = std::fs::read_dir(dir) else {
        // Creating the partial file will say what is wrong with the directory.
        return Ok(());
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|p| p.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let stale = dir.join(&name);
        let in_use = |why| SnapshotError::Partial {
            path: path.into(),
            partial: stale.clone(),
            why,
        };
        let Ok(f) = File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&stale)
        else {
            continue;
        };
        // SAFETY: flock on a descriptor `f` owns; no memory is passed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(in_use(
                "a save to this path is running (it holds that file locked); wait for it to end or cancel it",
            ));
        }
        if process_exists(pid) {
            return Err(in_use(
                "a save to this path left it and its process still exists, so it may be running; remove that file if no save to this path runs, then save again",
            ));
        }
        if std::fs::remove_file(&stale).is_ok() {
            removed.push(stale.display().to_string());
        }
    }
    if !removed.is_empty() {
        summary.note = Some(format!(
            "removed {}, left by an earlier save to {} that did not finish",
            removed.join(", "),
            path.display()
        ));
    }
    Ok(())
}

/// Whether a process `pid` exists (in this PID namespace).
fn process_exists(pid: libc::pid_t) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists and may be
    // signalled; nothing is sent.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Puts the finished file at `path` (replacing what was there) and, with
/// `sync`, makes the rename durable too.
fn replace(partial: &Path, path: &Path, sync: bool) -> Result<(), SnapshotError> {
    let io = |what| {
        move |source| SnapshotError::Io {
            path: path.into(),
            what,
            source,
        }
    };
    std::fs::rename(partial, path).map_err(io("renaming the finished file into place"))?;
    if sync {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing the directory"))?;
    }
    Ok(())
}

fn save(
    guest: &dyn Guest,
    path: &Path,
    opts: &SaveOptions,
    counters: &Counters,
    progress: &Progress,
    summary: &mut FileSummary,
) -> Result<(), SnapshotError> {
    let memory = guest.memory();
    progress.set_phase("pausing");
    guest.pause()?;
    let device_state = guest.save_device_state()?;
    let layout = FileLayout::plan(&memory.specs(), device_state.len() as u64)?;
    let (meta, data) = create_file(path, &layout, opts, summary)?;
    progress.set_phase("writing");
    let written = write_pages(memory, &layout, &data, path, &opts.file, counters)?;
    progress.set_phase("finishing");
    write_tables(&meta, path, &memory.specs(), &written, &device_state)?;
    finish_file(&meta, path, opts, progress, &device_state, summary)
}

/// Writes the bitmaps, checksum tables and device state of a file whose
/// pages are written, sizing it to its final layout (a live save and a
/// background snapshot learn the device state's length only at the end;
/// the device state lies after all pages, so no page moves).
fn write_tables(
    meta: &File,
    path: &Path,
    specs: &[BlockSpec],
    written: &WrittenPages,
    device_state: &[u8],
) -> Result<(), SnapshotError> {
    let mut layout = FileLayout::plan(specs, device_state.len() as u64)?;
    meta.set_len(layout.file_len)
        .map_err(io_err(path, "setting the file's length"))?;
    written.write_metadata(meta, path, &mut layout, device_state)?;
    Ok(())
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl Fn(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        path: path.into(),
        what,
        source,
    }
}

/// Creates the file at `path` with `layout`'s length, and opens it for
/// page I/O (O_DIRECT if asked and allowed).
fn create_file(
    path: &Path,
    layout: &FileLayout,
    opts: &SaveOptions,
    summary: &mut FileSummary,
) -> Result<(File, DataFile), SnapshotError> {
    // The partial file [`claim_partial`] made (and holds locked).
    let meta = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err(path, "opening the new file"))?;
    meta.set_len(layout.file_len)
        .map_err(io_err(path, "setting the file's length"))?;
    let data = DataFile::open(path, true, opts.file.direct_io)?;
    summary.direct_io = data.direct;
    add_note(summary, data.note.as_deref());
    Ok((meta, data))
}

/// Adds `note` (if any) to the summary's note.
fn add_note(summary: &mut FileSummary, note: Option<&str>) {
    if let Some(n) = note {
        summary.note = Some(match summary.note.take() {
            Some(old) => format!("{old}; {n}"),
            None => n.to_string(),
        });
    }
}

/// Syncs the finished file (if asked) and reports its size and device state.
fn finish_file(
    meta: &File,
    path: &Path,
    opts: &SaveOptions,
    progress: &Progress,
    device_state: &[u8],
    summary: &mut FileSummary,
) -> Result<(), SnapshotError> {
    if opts.sync {
        progress.set_phase("syncing");
        meta.sync_all().map_err(io_err(path, "syncing the file"))?;
    }
    let md = meta
        .metadata()
        .map_err(io_err(path, "reading the file's size"))?;
    summary.file_len = md.len();
    summary.file_disk_bytes = md.blocks() * 512;
    summary.device_state_bytes = device_state.len() as u64;
    summary.device_state_digest = Some(Digest::of_bytes(device_state).to_string());
    Ok(())
}

/// The live save: pass 1 and later passes while the guest runs, then the
/// final pass paused. The layout is planned without the device state (it
/// is taken last); the device state only ever lies after all pages, so
/// planning again with its length moves nothing already written.
#[allow(clippy::too_many_arguments)]
fn save_live(
    guest: &dyn Guest,
    log: &dyn ferry_ram::DirtyLog,
    path: &Path,
    opts: &SaveOptions,
    live: &LiveOptions,
    counters: &Counters,
    progress: &Progress,
    summary: &mut FileSummary,
) -> Result<(), SnapshotError> {
    let memory = guest.memory();
    summary.mode = Some("live");
    let specs = memory.specs();
    let layout = FileLayout::plan(&specs, 0)?;
    let (meta, data) = create_file(path, &layout, opts, summary)?;
    let pending: Vec<PageBitmap> = memory
        .blocks()
        .iter()
        .map(|b| PageBitmap::new(b.pages(), false))
        .collect();
    let page_sizes: Vec<u64> = memory
        .blocks()
        .iter()
        .map(|b| u64::from(b.page_size()))
        .collect();
    let dirty_bytes = |p: &[PageBitmap]| -> u64 {
        p.iter()
            .zip(&page_sizes)
            .map(|(b, ps)| b.count() * ps)
            .sum()
    };
    log.start()?;
    let passes = (|| {
        progress.set_phase("pass 1");
        let t = Instant::now();
        let mut written = write_pages(memory, &layout, &data, path, &opts.file, counters)?;
        let mut passes = 1u64;
        let (mut bytes, mut secs) = (memory.total_bytes(), t.elapsed().as_secs_f64());
        loop {
            log.sync(&pending)?;
            let remaining = dirty_bytes(&pending);
            let bandwidth = bytes as f64 / secs.max(1e-6);
            let threshold = bandwidth * live.downtime_limit.as_secs_f64();
            tracing::debug!(passes, remaining, threshold, "live save pass done");
            if remaining as f64 <= threshold || passes >= live.max_passes.max(1) {
                break;
            }
            progress.set_phase("passes");
            let (t, before) = (Instant::now(), counters.snapshot().ram_bytes);
            written = rewrite_pages(
                memory, &layout, &data, path, &opts.file, counters, written, &pending,
            )?;
            passes += 1;
            bytes = counters.snapshot().ram_bytes - before;
            secs = t.elapsed().as_secs_f64();
        }
        progress.set_phase("final pass");
        let paused_at = Instant::now();
        guest.pause()?;
        log.sync(&pending)?;
        let written = rewrite_pages(
            memory, &layout, &data, path, &opts.file, counters, written, &pending,
        )?;
        passes += 1;
        let device_state = guest.save_device_state()?;
        write_tables(&meta, path, &specs, &written, &device_state)?;
        summary.downtime_ms = Some(paused_at.elapsed().as_secs_f64() * 1e3);
        Ok::<_, SnapshotError>((passes, device_state))
    })();
    if let Err(e) = log.stop() {
        tracing::error!("stopping the dirty log after a live save: {e}");
    }
    let (passes, device_state) = passes?;
    summary.passes = Some(passes);
    // Still paused: memory is as saved, so hashing costs no downtime.
    summary.switchover_digest = Some(Digest::of_guest(memory, &device_state).to_string());
    finish_file(&meta, path, opts, progress, &device_state, summary)
}

/// The background snapshot: a short pause to save the device state and
/// write-protect memory, then memory written out as it was then while the
/// guest runs (`ferry_file::background`).
fn save_bg(
    guest: &dyn Guest,
    path: &Path,
    opts: &SaveOptions,
    bg: &BackgroundOptions,
    counters: &Counters,
    progress: &Progress,
    summary: &mut FileSummary,
) -> Result<(), SnapshotError> {
    let memory = guest.memory();
    summary.mode = Some("background");
    // Registering and protecting all of memory take time (tens of ms for a
    // GiB of 4 KiB pages): both happen before the pause, while a handler
    // lets through (and notes) each write the guest makes meanwhile; the
    // pause then only protects those pages again.
    let wp = Arc::new(WriteProtect::new(memory)?);
    // The file too is made before the pause, so writing starts the moment
    // the guest runs on; the device state's length is known only later,
    // and moves nothing when the layout is planned again with it.
    let specs = memory.specs();
    let layout = FileLayout::plan(&specs, 0)?;
    let (meta, data) = create_file(path, &layout, opts, summary)?;
    let arming = Arming::start(memory, wp.clone())?;
    let was_running = guest.is_running();
    progress.set_phase("pausing");
    let paused_at = Instant::now();
    guest.pause()?;
    let prepared = (|| {
        let device_state = guest.save_device_state()?;
        summary.rearmed_pages = Some(arming.rearm()?);
        Ok::<_, SnapshotError>(device_state)
    })();
    let mut digest_time = Duration::ZERO;
    if let (true, Ok(state)) = (bg.digest_at_pause, &prepared) {
        let t = Instant::now();
        summary.digest_at_pause = Some(Digest::of_guest(memory, state).to_string());
        digest_time = t.elapsed();
        summary.digest_at_pause_ms = Some(digest_time.as_secs_f64() * 1e3);
    }
    if was_running {
        guest.resume()?;
    }
    summary.pause_ms = Some(
        paused_at
            .elapsed()
            .saturating_sub(digest_time)
            .as_secs_f64()
            * 1e3,
    );
    let device_state = prepared?;
    progress.set_phase("writing");
    let (written, stats) =
        write_background(memory, &layout, &data, path, &opts.file, counters, &wp)?;
    drop(wp);
    summary.fault_regions = Some(stats.fault_regions);
    summary.ordered_regions = Some(stats.ordered_regions);
    summary.max_fault_ms = Some(stats.max_fault_us as f64 / 1e3);
    progress.set_phase("finishing");
    write_tables(&meta, path, &specs, &written, &device_state)?;
    finish_file(&meta, path, opts, progress, &device_state, summary)
}

/// Where restored memory goes.
#[derive(Clone, Debug)]
pub enum RestoreTarget {
    /// Fresh anonymous memory.
    Anonymous,
    /// New sparse files at this path (one per block, named as `ferry recv
    /// --ram-out` names them), written under temporary names beside it and
    /// moved into place, replacing what was there, only once the restore
    /// succeeded. A symbolic link or anything but a regular file there is
    /// refused.
    Files(PathBuf),
}

/// A restored guest: its memory, its device state, and the report.
pub struct Restored {
    pub memory: GuestMemory,
    pub device_state: Vec<u8>,
    pub summary: FileSummary,
}

/// Restores the guest saved at `path`: every header field, table and
/// checksum is checked; on any error (or a cancel through `progress`) no
/// memory is handed back. The summary's `digest` is that of the restored
/// memory.
pub fn restore_from_file(
    path: &Path,
    target: &RestoreTarget,
    opts: &FileOptions,
    progress: &Progress,
) -> Result<Restored, FileFailed> {
    let (started, counters, mut summary) = begin(path, opts, progress);
    let mut opts = opts.clone();
    opts.cancel = Some(cancel_flag(progress));
    let result = restore(path, target, &opts, &counters, progress, &mut summary);
    if result.is_err() {
        summary.digest = None;
    }
    summary.finish_with(started, &counters, &result);
    conclude(
        progress,
        summary,
        result,
        |(memory, device_state), summary| Restored {
            memory,
            device_state,
            summary,
        },
    )
}

fn restore(
    path: &Path,
    target: &RestoreTarget,
    opts: &FileOptions,
    counters: &Counters,
    progress: &Progress,
    summary: &mut FileSummary,
) -> Result<(GuestMemory, Vec<u8>), SnapshotError> {
    progress.set_phase("checking");
    let (saved, device_state) = open_checked(path, opts.direct_io, progress)?;
    let (file, layout) = (saved.file(), saved.layout());
    let specs = layout.specs();
    let (memory, staged) = match target {
        RestoreTarget::Anonymous => (
            GuestMemory::anonymous(&specs).map_err(|e| match e {
                RamError::Map { ref source, .. } if source.raw_os_error() == Some(libc::ENOMEM) => {
                    SnapshotError::Memory {
                        path: path.into(),
                        bytes: layout.total_ram(),
                        source: Box::new(e),
                    }
                }
                other => other.into(),
            })?,
            None,
        ),
        RestoreTarget::Files(p) => {
            refuse_overwriting(&block_file_paths(&specs, p)?, path)?;
            let (memory, staged) = GuestMemory::create_files_staged(&specs, p)?;
            (memory, Some(staged))
        }
    };
    // On an error from here, `staged` drops its files unmoved.
    summary.direct_io = saved.data().direct;
    add_note(summary, saved.data().note.as_deref());
    progress.set_phase("reading");
    saved.read_pages(&memory, opts, counters)?;
    if opts.cancelled() {
        return Err(FileError::Cancelled { path: path.into() }.into());
    }
    progress.set_phase("digest");
    summary.digest = Some(saved.restored_digest(&memory).to_string());
    if let Some(staged) = staged {
        staged.commit()?;
    }
    let md = file.metadata().map_err(|source| SnapshotError::Io {
        path: path.into(),
        what: "reading the file's size",
        source,
    })?;
    summary.file_len = md.len();
    summary.file_disk_bytes = md.blocks() * 512;
    summary.device_state_bytes = device_state.len() as u64;
    summary.device_state_digest = Some(Digest::of_bytes(&device_state).to_string());
    Ok((memory, device_state))
}

/// Checks every checksum of the guest saved at `path` as a restore would,
/// without memory to restore into ([`SavedFile::verify`]): time and memory grow
/// with the pages present in the file, not the guest's size. The summary's
/// `digest` is that of the memory a restore would give, `switchover_digest`
/// that with the device state.
pub fn verify_file(
    path: &Path,
    opts: &FileOptions,
    progress: &Progress,
) -> Result<FileSummary, FileFailed> {
    let (started, counters, mut summary) = begin(path, opts, progress);
    let mut opts = opts.clone();
    opts.cancel = Some(cancel_flag(progress));
    let result = (|| {
        progress.set_phase("checking");
        let (saved, device_state) = open_checked(path, opts.direct_io, progress)?;
        summary.direct_io = saved.data().direct;
        add_note(&mut summary, saved.data().note.as_deref());
        progress.set_phase("reading");
        let digest = saved.verify(&opts, &counters)?;
        summary.digest = Some(digest.to_string());
        summary.switchover_digest =
            Some(Digest::with_device_state(digest, &device_state).to_string());
        summary.file_len = saved.file_len();
        summary.file_disk_bytes = saved.disk_bytes();
        summary.device_state_bytes = device_state.len() as u64;
        summary.device_state_digest = Some(Digest::of_bytes(&device_state).to_string());
        Ok::<_, SnapshotError>(())
    })();
    if result.is_err() {
        summary.digest = None;
        summary.switchover_digest = None;
    }
    summary.finish_with(started, &counters, &result);
    conclude(progress, summary, result, |(), summary| summary)
}

/// Opens the saved guest at `path` ([`SavedFile::open`]: header, tables)
/// and reads its device state, all checked; pages are read later, by
/// whoever restores them.
fn open_checked(
    path: &Path,
    direct_io: bool,
    progress: &Progress,
) -> Result<(SavedFile, Vec<u8>), SnapshotError> {
    let saved = SavedFile::open(path, direct_io)?;
    progress
        .total_ram_bytes
        .store(saved.layout().total_ram(), Ordering::Relaxed);
    let device_state = saved.read_device_state()?;
    Ok((saved, device_state))
}

/// Opens the saved guest at `path` for reading, refusing at once (without
/// blocking) anything but a regular file.
pub fn open_saved(path: &Path) -> Result<File, SnapshotError> {
    Ok(open_regular(
        path,
        File::options().read(true),
        0,
        "opening the saved guest",
        "give the path of a file `ferry save` wrote",
    )?)
}

/// Refuses RAM files that are the saved file itself: creating them would
/// truncate the file before it is read.
fn refuse_overwriting(ram_files: &[PathBuf], saved: &Path) -> Result<(), SnapshotError> {
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let saved_id = id(saved);
    for f in ram_files {
        if f == saved || (saved_id.is_some() && id(f) == saved_id) {
            return Err(SnapshotError::Io {
                path: f.clone(),
                what: "refusing to restore RAM into the saved file being restored",
                source: std::io::ErrorKind::AlreadyExists.into(),
            });
        }
    }
    Ok(())
}

/// A lazy restore under way: the guest's memory is usable now; pages it
/// touches first are loaded on demand while the rest is prefetched.
pub struct LazyRestoring {
    lazy: LazyRestore,
    device_state: Vec<u8>,
    summary: FileSummary,
    started: Instant,
    counters: Arc<Counters>,
}

/// A finished lazy restore.
pub struct LazyRestored {
    pub memory: Arc<GuestMemory>,
    pub device_state: Vec<u8>,
    pub summary: FileSummary,
}

/// Starts a lazy restore of `path`: checks the header, tables and device
/// state, maps the guest's memory with every page missing and returns as
/// soon as it can be touched. `opts.channels` prefetch threads fill it.
pub fn restore_lazy(
    path: &Path,
    opts: &FileOptions,
    progress: &Progress,
) -> Result<LazyRestoring, FileFailed> {
    let (started, counters, mut summary) = begin(path, opts, progress);
    let begun = (|| {
        let (saved, device_state) = open_checked(path, opts.direct_io, progress)?;
        summary.file_len = saved.file_len();
        summary.file_disk_bytes = saved.disk_bytes();
        summary.direct_io = saved.data().direct;
        summary.note = saved.data().note.clone();
        progress.set_phase("lazy");
        let lazy = LazyRestore::start(Arc::new(saved), opts.channels, counters.clone())?;
        Ok::<_, SnapshotError>((lazy, device_state))
    })();
    match begun {
        Ok((lazy, device_state)) => {
            summary.lazy = Some(LazyReport {
                ready_ms: started.elapsed().as_secs_f64() * 1e3,
                ..Default::default()
            });
            Ok(LazyRestoring {
                lazy,
                device_state,
                summary,
                started,
                counters,
            })
        }
        Err(error) => {
            summary.finish(started, &counters, Some(error.to_string()));
            Err(FileFailed::new(error, summary))
        }
    }
}

impl LazyRestoring {
    /// The guest's memory; usable at once.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        self.lazy.memory()
    }
    pub fn device_state(&self) -> &[u8] {
        &self.device_state
    }
    /// When the restore started (for measuring the guest's first write).
    pub fn started(&self) -> Instant {
        self.started
    }
    /// Regions in place so far, and in all.
    pub fn progress(&self) -> (u64, u64) {
        self.lazy.progress()
    }

    /// Waits until every page is in place and checked. `first_write_ms` is
    /// what the guest measured, if it wrote.
    pub fn finish(self, first_write_ms: Option<f64>) -> Result<LazyRestored, FileFailed> {
        let Self {
            lazy,
            device_state,
            mut summary,
            started,
            counters,
        } = self;
        let memory = lazy.memory().clone();
        let result = lazy.finish();
        let error = result.as_ref().err().map(ToString::to_string);
        if let (Some(report), Ok(stats)) = (summary.lazy.as_mut(), &result) {
            report.first_write_ms = first_write_ms;
            report.fault_regions = stats.fault_regions;
            report.prefetched_regions = stats.prefetched_regions;
            report.max_fault_ms = stats.max_fault_us as f64 / 1e3;
        }
        summary.finish(started, &counters, error);
        match result {
            Ok(_) => {
                summary.device_state_bytes = device_state.len() as u64;
                summary.device_state_digest = Some(Digest::of_bytes(&device_state).to_string());
                Ok(LazyRestored {
                    memory,
                    device_state,
                    summary,
                })
            }
            Err(e) => Err(FileFailed::new(e.into(), summary)),
        }
    }
}
