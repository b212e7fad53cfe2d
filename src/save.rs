//! Saving a guest to a file (file mode, the controller's side): it decides
//! the order of things — pause, lay out the file, write the pages in
//! parallel (`ferry_file::write_pages`), then bitmaps, checksums, device state
//! and last the header — and reports a [`FileSummary`]. It owns the partial
//! file beside the target (`.NAME.partial-PID`, locked while the save runs,
//! renamed into place at the end) and its clean-up.
//!
//! A running guest is saved live ([`save_live_to_file`]): pass 1 writes
//! every page while it runs, later passes rewrite the pages its dirty log
//! reports in place (the file never grows), and it pauses only for the
//! final pass and its device state. Or in the background
//! ([`save_background`]): it pauses only while its device state is saved
//! and its memory write-protected, and the file holds memory as it was then
//! (`ferry_file::background`). Both run their passes through the
//! session engine ([`crate::session`]), as `ferry send` does.
//!
//! A partial file left by a save that was killed is removed by the next
//! save to that path and named in its `note`; one whose save may still run
//! is named in the error.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_file::{
    rewrite_pages, write_background, write_pages, Arming, BackgroundStats, DataFile, FileOptions,
    WrittenPages,
};
use ferry_multifd::Counters;
use ferry_ram::mapped::{check_output_path, FileLayout};
use ferry_ram::{BlockSpec, Digest, GuestMemory, PageBitmap, WriteProtect};

use crate::session::{
    AtMaxPasses, Limits, Outcome, PassResult, PassSink, Phase, Session, SessionConfig,
};
use crate::snapshot::{
    begin, cancel_flag, conclude, io_err, record_io, FileFailed, FileSummary, SnapshotError,
};
use crate::{Guest, Parameters, Progress};

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
    let Some(log) = guest.dirty_log() else {
        return save_to_file(guest, path, opts, progress);
    };
    // The final pass is the device phase; a save may still be cancelled
    // there (the guest resumes, no file is left), as before it had phases.
    progress.cancel_in_device();
    // The passes end when what is left fits the downtime limit at the
    // speed of the pass before, or after the max passes whatever is left.
    let limits = Parameters {
        downtime_limit: live.downtime_limit,
        max_passes: live.max_passes.max(1),
        avail_switchover_bandwidth: 0,
        auto_converge: false,
        ..Parameters::default()
    };
    let config = SessionConfig {
        log: Some(log),
        limits: Limits::Fixed(limits),
        at_max_passes: AtMaxPasses::SwitchOver,
    };
    run_session_save(
        guest,
        path,
        opts,
        progress,
        config,
        |session, partial, opts, counters, summary| {
            save_live(
                session, guest, log, partial, opts, counters, progress, summary,
            )
        },
    )
}

/// [`run_save`] with a session engine driving the passes: the session's
/// phase ends as the save does.
fn run_session_save(
    guest: &dyn Guest,
    path: &Path,
    opts: &SaveOptions,
    progress: &Progress,
    config: SessionConfig<'_>,
    body: impl FnOnce(
        &mut Session<'_>,
        &Path,
        &SaveOptions,
        &Counters,
        &mut FileSummary,
    ) -> Result<(), SnapshotError>,
) -> Result<FileSummary, FileFailed> {
    let mut session = Session::new(guest, progress, config);
    let result = run_save(
        guest,
        path,
        opts,
        progress,
        |partial, opts, counters, summary| body(&mut session, partial, opts, counters, summary),
    );
    session.finish(outcome(&result));
    result
}

/// The phase a save that ended with `result` ends in.
fn outcome(result: &Result<FileSummary, FileFailed>) -> Outcome {
    match result {
        Ok(_) => Outcome::Completed,
        Err(f) if matches!(f.error, SnapshotError::Cancelled { .. }) => Outcome::Cancelled,
        Err(_) => Outcome::Failed,
    }
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
    // No dirty log: the snapshot's one pass writes memory as it was at
    // the pause, whatever the guest writes after.
    let config = SessionConfig {
        log: None,
        limits: Limits::Fixed(Parameters::default()),
        at_max_passes: AtMaxPasses::SwitchOver,
    };
    run_session_save(
        guest,
        path,
        opts,
        progress,
        config,
        |session, partial, opts, counters, summary| {
            save_bg(
                session, guest, partial, opts, bg, counters, progress, summary,
            )
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
    // The session engine notices a cancel through `progress` itself,
    // possibly before the flag is set.
    let result = match result {
        Err(_) if cancel.load(Ordering::SeqCst) || progress.cancel_requested() => {
            Err(SnapshotError::Cancelled { path: path.into() })
        }
        other => other,
    };
    let partial = created.then_some(&*partial);
    finish_save(
        guest, partial, started, &counters, progress, summary, result,
    )
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
    let align = layout.blocks.iter().map(|b| u64::from(b.page_size)).min();
    let data = DataFile::open(path, true, opts.file.io, align.unwrap_or(4096))?;
    record_io(summary, &data);
    Ok((meta, data))
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
/// final pass paused, all through `session` ([`LiveFileSink`]). The layout
/// is planned without the device state (it is taken last); the device
/// state only ever lies after all pages, so planning again with its length
/// moves nothing already written.
#[allow(clippy::too_many_arguments)]
fn save_live(
    session: &mut Session,
    guest: &dyn Guest,
    log: &dyn ferry_ram::DirtyLog,
    path: &Path,
    opts: &SaveOptions,
    counters: &Counters,
    progress: &Progress,
    summary: &mut FileSummary,
) -> Result<(), SnapshotError> {
    session.enter(Phase::Setup)?;
    let memory = guest.memory();
    summary.mode = Some("live");
    let specs = memory.specs();
    let layout = FileLayout::plan(&specs, 0)?;
    let (meta, data) = create_file(path, &layout, opts, summary)?;
    let mut sink = LiveFileSink {
        memory,
        layout: &layout,
        data: &data,
        path,
        opts: &opts.file,
        counters,
        progress,
        written: None,
    };
    // The engine starts the dirty log before pass 1.
    let passes = (|| {
        session.precopy(&mut sink)?;
        progress.set_phase("final pass");
        let paused_at = Instant::now();
        guest.pause()?;
        session.enter(Phase::Device)?;
        session.final_pass(&mut sink)?;
        let device_state = guest.save_device_state()?;
        // A dirty log makes the final pass run: every pass left its pages.
        let written = sink
            .written
            .take()
            .expect("a live save's passes wrote the file");
        write_tables(&meta, path, &specs, &written, &device_state)?;
        summary.downtime_ms = Some(paused_at.elapsed().as_secs_f64() * 1e3);
        Ok::<_, SnapshotError>((session.passes(), device_state))
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

/// A live save's [`PassSink`]: pass 1 writes every page
/// ([`write_pages`]), later passes rewrite the pending ones in place
/// ([`rewrite_pages`]). Passes are measured in guest RAM bytes covered.
struct LiveFileSink<'a> {
    memory: &'a GuestMemory,
    layout: &'a FileLayout,
    data: &'a DataFile,
    path: &'a Path,
    opts: &'a FileOptions,
    counters: &'a Counters,
    progress: &'a Progress,
    /// What the passes so far wrote (none before pass 1).
    written: Option<WrittenPages>,
}

impl PassSink for LiveFileSink<'_> {
    type Error = SnapshotError;

    fn send_pass(
        &mut self,
        _number: u64,
        pending: &Arc<Vec<PageBitmap>>,
        live: bool,
    ) -> Result<PassResult, SnapshotError> {
        let (memory, layout, data, path, opts, counters) = (
            self.memory,
            self.layout,
            self.data,
            self.path,
            self.opts,
            self.counters,
        );
        let pages = |t: ferry_multifd::Totals| t.pages_normal + t.pages_zero;
        let written = match self.written.take() {
            None => {
                self.progress.set_phase("pass 1");
                let (t, before) = (Instant::now(), counters.snapshot());
                let written = write_pages(memory, layout, data, path, opts, counters)?;
                // Every page is in the file now.
                for b in pending.iter() {
                    b.clear_all();
                }
                let pass = PassResult {
                    bytes: memory.total_bytes(),
                    pages: pages(counters.snapshot()) - pages(before),
                    seconds: t.elapsed().as_secs_f64(),
                };
                self.written = Some(written);
                return Ok(pass);
            }
            Some(w) => w,
        };
        if live {
            self.progress.set_phase("passes");
        }
        let (t, before) = (Instant::now(), counters.snapshot());
        let written = rewrite_pages(memory, layout, data, path, opts, counters, written, pending)?;
        self.written = Some(written);
        let after = counters.snapshot();
        Ok(PassResult {
            bytes: after.ram_bytes - before.ram_bytes,
            pages: pages(after) - pages(before),
            seconds: t.elapsed().as_secs_f64(),
        })
    }
}

/// The background snapshot: a short pause to save the device state and
/// write-protect memory, then memory written out as it was then while the
/// guest runs (`ferry_file::background`).
#[allow(clippy::too_many_arguments)]
fn save_bg(
    session: &mut Session,
    guest: &dyn Guest,
    path: &Path,
    opts: &SaveOptions,
    bg: &BackgroundOptions,
    counters: &Counters,
    progress: &Progress,
    summary: &mut FileSummary,
) -> Result<(), SnapshotError> {
    session.enter(Phase::Setup)?;
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
    // Seed 004's background snapshot pauses in `active`.
    session.enter(Phase::Active)?;
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
    let mut sink = BackgroundSink {
        memory,
        layout: &layout,
        data: &data,
        path,
        opts: &opts.file,
        counters,
        wp: &wp,
        out: None,
    };
    // One pass, no dirty log: the engine switches over after it.
    session.precopy(&mut sink)?;
    let (written, stats) = sink.out.take().expect("the snapshot's one pass ran");
    drop(sink);
    drop(wp);
    summary.fault_regions = Some(stats.fault_regions);
    summary.ordered_regions = Some(stats.ordered_regions);
    summary.max_fault_ms = Some(stats.max_fault_us as f64 / 1e3);
    progress.set_phase("finishing");
    write_tables(&meta, path, &specs, &written, &device_state)?;
    finish_file(&meta, path, opts, progress, &device_state, summary)
}

/// A background snapshot's [`PassSink`]: its one pass writes all of memory
/// as it was at the pause ([`write_background`]).
struct BackgroundSink<'a> {
    memory: &'a GuestMemory,
    layout: &'a FileLayout,
    data: &'a DataFile,
    path: &'a Path,
    opts: &'a FileOptions,
    counters: &'a Counters,
    wp: &'a WriteProtect,
    out: Option<(WrittenPages, BackgroundStats)>,
}

impl PassSink for BackgroundSink<'_> {
    type Error = SnapshotError;

    fn send_pass(
        &mut self,
        _number: u64,
        pending: &Arc<Vec<PageBitmap>>,
        _live: bool,
    ) -> Result<PassResult, SnapshotError> {
        let (t, before) = (Instant::now(), self.counters.snapshot());
        let out = write_background(
            self.memory,
            self.layout,
            self.data,
            self.path,
            self.opts,
            self.counters,
            self.wp,
        )?;
        for b in pending.iter() {
            b.clear_all();
        }
        self.out = Some(out);
        let after = self.counters.snapshot();
        Ok(PassResult {
            bytes: after.ram_bytes - before.ram_bytes,
            pages: (after.pages_normal + after.pages_zero)
                - (before.pages_normal + before.pages_zero),
            seconds: t.elapsed().as_secs_f64(),
        })
    }
}
