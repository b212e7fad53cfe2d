//! What saving and restoring share (file mode): the error type, the
//! [`FileSummary`] both report, [`FileFailed`], and the small steps every
//! file operation begins and ends with. Saving lives in [`crate::save`],
//! restoring and verifying in [`crate::restore`]; both are re-exported here
//! so `ferry::snapshot::*` paths keep working.
//!
//! A save is durable when it reports success (the file is synced unless the
//! caller asks otherwise). It writes beside the target (a hidden
//! `.NAME.partial-PID`, locked while the save runs) and renames the
//! finished file into place, so a failed or cancelled save
//! ([`Progress::cancel`]) leaves no file of its own and any older file at
//! the target intact. A restore into RAM files writes them under temporary
//! names too and moves them into place only when every page is in and
//! checked; a failed restore hands back no memory and leaves no file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ferry_file::{DataFile, FileError, FileOptions, IoMode};
use ferry_multifd::{Counters, MultifdError};
use ferry_ram::RamError;
use serde::Serialize;

use crate::session::{PhaseError, SessionError};
use crate::{GuestError, Progress};

pub use crate::restore::{
    open_saved, restore_from_file, restore_lazy, verify_file, LazyRestored, LazyRestoring,
    RestoreTarget, Restored,
};
pub use crate::save::{
    save_background, save_live_to_file, save_to_file, BackgroundOptions, LiveOptions, SaveOptions,
};

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
    /// The session engine's own failure (a phase change it refused, or a
    /// cancel noticed between passes).
    #[error(transparent)]
    Session(SessionError),
    #[error("{path}: cancelled; nothing was written there (the partial file was removed)")]
    Cancelled { path: PathBuf },
    #[error("{path}: {partial} lies beside it: {why}")]
    Partial {
        path: PathBuf,
        partial: PathBuf,
        why: &'static str,
    },
}

impl From<SessionError> for SnapshotError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Ram(e) => Self::Ram(e),
            other => Self::Session(other),
        }
    }
}

impl From<PhaseError> for SnapshotError {
    fn from(e: PhaseError) -> Self {
        Self::Session(e.into())
    }
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
    /// How page data was asked to move: "auto" (O_DIRECT where the file
    /// system takes it, the default), "direct" or "buffered".
    pub io: &'static str,
    /// O_DIRECT was asked for or allowed (`io` is not "buffered"), and
    /// whether it was used.
    pub direct_io_requested: bool,
    pub direct_io: bool,
    /// Why `io` "auto" used buffered I/O instead of O_DIRECT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct_io_fallback: Option<String>,
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
    /// `ferry restore --run-guest`: how far the restored guest ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<crate::Workload>,
    pub started_at_unix: f64,
    pub finished_at_unix: f64,
}

impl FileSummary {
    pub(crate) fn new(path: &Path, opts: &FileOptions) -> Self {
        Self {
            status: "failed",
            path: path.display().to_string(),
            channels: opts.channels,
            io: opts.io.name(),
            direct_io_requested: opts.io != IoMode::Buffered,
            started_at_unix: crate::summary::unix_now(),
            ..Default::default()
        }
    }

    pub(crate) fn finish(&mut self, started: Instant, counters: &Counters, error: Option<String>) {
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
    pub(crate) fn finish_with<T>(
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
pub(crate) fn begin(
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
pub(crate) fn conclude<T, U>(
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
    pub(crate) fn new(error: SnapshotError, summary: FileSummary) -> Self {
        Self {
            error,
            summary: Box::new(summary),
        }
    }
}

/// A flag that turns true when `progress` is cancelled (at once if it is).
pub(crate) fn cancel_flag(progress: &Progress) -> Arc<AtomicBool> {
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    progress.on_cancel(move || flag.store(true, Ordering::SeqCst));
    cancel
}

pub(crate) fn io_err<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl Fn(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        path: path.into(),
        what,
        source,
    }
}

/// Records how `data` moves page data: O_DIRECT or not, and why not.
pub(crate) fn record_io(summary: &mut FileSummary, data: &DataFile) {
    summary.direct_io = data.direct;
    summary.direct_io_fallback.clone_from(&data.fallback);
}
