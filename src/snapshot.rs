//! Saving a guest to a file and restoring it: the controller's side of file
//! mode. It decides the order of things — pause, lay out the file, write the
//! pages in parallel (`ferry_multifd::file`), then bitmaps, checksums, device
//! state and last the header; or check the header, tables and device state
//! before reading pages into fresh memory — and reports a [`FileSummary`].
//!
//! A save is durable when it reports success (the file is synced unless the
//! caller asks otherwise). It writes beside the target and renames the
//! finished file into place, so a failed save leaves no file of its own and
//! any older file at the target intact; a failed restore removes the RAM
//! file it created and hands back no memory.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use ferry_multifd::file::{read_pages, write_pages, DataFile, FileOptions};
use ferry_multifd::lazy::LazyRestore;
use ferry_multifd::{Counters, MultifdError};
use ferry_ram::mapped::{write_metadata, FileLayout};
use ferry_ram::{Digest, GuestMemory, RamError};
use serde::Serialize;

use crate::{Guest, GuestError, Progress};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Ram(#[from] RamError),
    #[error(transparent)]
    Multifd(#[from] MultifdError),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
}

/// What a save or restore reports (`ferry save/restore/verify --json`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct FileSummary {
    /// "completed" or "failed".
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
    /// Guest RAM covered (present and zero pages).
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

    pub fn completed(&self) -> bool {
        self.status == "completed"
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
    let started = Instant::now();
    let counters = Arc::new(Counters::default());
    progress.attach(counters.clone());
    progress
        .total_ram_bytes
        .store(guest.memory().total_bytes(), Ordering::Relaxed);
    let mut summary = FileSummary::new(path, &opts.file);
    let partial = partial_path(path);
    let result = save(guest, &partial, opts, &counters, progress, &mut summary)
        .and_then(|()| replace(&partial, path, opts.sync));
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
        if let Err(e) = guest.resume() {
            tracing::error!("resuming the guest after a failed save: {e}");
        }
    }
    summary.finish(
        started,
        &counters,
        result.as_ref().err().map(|e| e.to_string()),
    );
    progress.set_phase(summary.status);
    match result {
        Ok(()) => Ok(summary),
        Err(error) => Err(FileFailed {
            error,
            summary: Box::new(summary),
        }),
    }
}

/// Where a save writes before it is complete: beside the target, so the
/// final rename is atomic and a failed save leaves any older file intact.
fn partial_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "guest".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.partial-{}", std::process::id()))
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
    let mut layout = FileLayout::plan(&memory.specs(), device_state.len() as u64)?;
    let io = |what| {
        move |source| SnapshotError::Io {
            path: path.into(),
            what,
            source,
        }
    };
    let meta = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io("creating the file"))?;
    meta.set_len(layout.file_len)
        .map_err(io("setting the file's length"))?;
    let data = DataFile::open(path, true, opts.file.direct_io)?;
    summary.direct_io = data.direct;
    summary.note = data.note.clone();
    progress.set_phase("writing");
    let written = write_pages(memory, &layout, &data, path, &opts.file, counters)?;
    progress.set_phase("finishing");
    write_metadata(
        &meta,
        path,
        &mut layout,
        &written.bitmaps,
        &written.checksums,
        &device_state,
    )?;
    if opts.sync {
        progress.set_phase("syncing");
        meta.sync_all().map_err(io("syncing the file"))?;
    }
    let md = meta.metadata().map_err(io("reading the file's size"))?;
    summary.file_len = md.len();
    summary.file_disk_bytes = md.blocks() * 512;
    summary.device_state_bytes = device_state.len() as u64;
    summary.device_state_digest = Some(Digest::of_bytes(&device_state).to_string());
    Ok(())
}

/// Where restored memory goes.
#[derive(Clone, Debug)]
pub enum RestoreTarget {
    /// Fresh anonymous memory.
    Anonymous,
    /// Files created (or truncated) at this path, as `ferry recv --ram-out`.
    Files(PathBuf),
}

/// A restored guest: its memory, its device state, and the report.
pub struct Restored {
    pub memory: GuestMemory,
    pub device_state: Vec<u8>,
    pub summary: FileSummary,
}

/// Restores the guest saved at `path`: every header field, table and
/// checksum is checked; on any error no memory is handed back.
pub fn restore_from_file(
    path: &Path,
    target: &RestoreTarget,
    opts: &FileOptions,
    progress: &Progress,
) -> Result<Restored, FileFailed> {
    let started = Instant::now();
    let counters = Arc::new(Counters::default());
    progress.attach(counters.clone());
    let mut summary = FileSummary::new(path, opts);
    let result = restore(path, target, opts, &counters, progress, &mut summary);
    summary.finish(
        started,
        &counters,
        result.as_ref().err().map(|e| e.to_string()),
    );
    progress.set_phase(summary.status);
    match result {
        Ok((memory, device_state)) => Ok(Restored {
            memory,
            device_state,
            summary,
        }),
        Err(error) => Err(FileFailed {
            error,
            summary: Box::new(summary),
        }),
    }
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
    let file = File::open(path).map_err(|source| SnapshotError::Io {
        path: path.into(),
        what: "opening the saved guest",
        source,
    })?;
    let layout = FileLayout::read(&file, path)?;
    progress
        .total_ram_bytes
        .store(layout.total_ram(), Ordering::Relaxed);
    let mut bitmaps = Vec::new();
    let mut checksums = Vec::new();
    for i in 0..layout.blocks.len() {
        bitmaps.push(layout.read_bitmap(&file, path, i)?);
        checksums.push(layout.read_checksums(&file, path, i)?);
    }
    let device_state = layout.read_device_state(&file, path)?;
    let specs = layout.specs();
    let memory = match target {
        RestoreTarget::Anonymous => GuestMemory::anonymous(&specs)?,
        RestoreTarget::Files(p) => GuestMemory::create_files(&specs, p)?,
    };
    let filled = DataFile::open(path, false, opts.direct_io).and_then(|data| {
        summary.direct_io = data.direct;
        summary.note = data.note.clone();
        progress.set_phase("reading");
        read_pages(
            &memory, &layout, &bitmaps, &checksums, &data, path, opts, counters,
        )
    });
    if let Err(e) = filled {
        drop(memory);
        if let RestoreTarget::Files(p) = target {
            for f in ram_file_paths(&specs, p) {
                let _ = std::fs::remove_file(f);
            }
        }
        return Err(e.into());
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

/// The files `GuestMemory::create_files` makes for `specs` at `path`.
fn ram_file_paths(specs: &[ferry_ram::BlockSpec], path: &Path) -> Vec<PathBuf> {
    if specs.len() == 1 {
        return vec![path.to_path_buf()];
    }
    specs.iter().map(|s| path.with_extension(&s.name)).collect()
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
    let started = Instant::now();
    let counters = Arc::new(Counters::default());
    progress.attach(counters.clone());
    let mut summary = FileSummary::new(path, opts);
    let begun = (|| {
        let file = File::open(path).map_err(|source| SnapshotError::Io {
            path: path.into(),
            what: "opening the saved guest",
            source,
        })?;
        let layout = FileLayout::read(&file, path)?;
        progress
            .total_ram_bytes
            .store(layout.total_ram(), Ordering::Relaxed);
        let mut bitmaps = Vec::new();
        let mut checksums = Vec::new();
        for i in 0..layout.blocks.len() {
            bitmaps.push(layout.read_bitmap(&file, path, i)?);
            checksums.push(layout.read_checksums(&file, path, i)?);
        }
        let device_state = layout.read_device_state(&file, path)?;
        summary.file_len = layout.file_len;
        summary.file_disk_bytes = file.metadata().map_or(0, |m| m.blocks() * 512);
        let data = DataFile::open(path, false, opts.direct_io)?;
        summary.direct_io = data.direct;
        summary.note = data.note.clone();
        progress.set_phase("lazy");
        let lazy = LazyRestore::start(
            layout,
            bitmaps,
            checksums,
            data,
            path,
            opts.channels,
            counters.clone(),
        )?;
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
            Err(FileFailed {
                error,
                summary: Box::new(summary),
            })
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
            Err(e) => Err(FileFailed {
                error: e.into(),
                summary: Box::new(summary),
            }),
        }
    }
}
