//! Restoring a saved guest from its file, and verifying a file (file mode,
//! the controller's side): check the header, tables and device state before
//! reading pages into fresh memory (or RAM files, or lazily on demand), and
//! report a [`FileSummary`].
//!
//! Restoring and verifying cost time and memory in proportion to the
//! pages present in the file, not the guest's size: absent (zero) pages
//! are never read, never touched in the memory restored into (a RAM file
//! keeps them as holes), and regions and digest chunks without a present
//! page are checked against the known checksum of zeros.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use ferry_file::{FileError, FileOptions, IoMode, LazyRestore, SavedFile};
use ferry_multifd::Counters;
use ferry_ram::mapped::open_regular;
use ferry_ram::{block_file_paths, Digest, GuestMemory, RamError};

use crate::snapshot::{
    begin, cancel_flag, conclude, record_io, FileFailed, FileSummary, LazyReport, SnapshotError,
};
use crate::Progress;

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
    let (saved, device_state) = open_checked(path, opts.io, progress)?;
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
    record_io(summary, saved.data());
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
        let (saved, device_state) = open_checked(path, opts.io, progress)?;
        record_io(&mut summary, saved.data());
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
    io: IoMode,
    progress: &Progress,
) -> Result<(SavedFile, Vec<u8>), SnapshotError> {
    let saved = SavedFile::open(path, io)?;
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
///
/// [`IoMode::Auto`] reads through the page cache here: the prefetch and
/// the faults read one region at a time per thread, synchronously, and
/// buffered reads let the kernel's readahead keep the disk busy ahead of
/// them (2 GiB on this project's VM, 5 runs: all pages in 2.09 s buffered
/// against 2.55 s with O_DIRECT, and 1.14 against 1.71 s for a file saved
/// with `--hole-min 1M`; first writes alike, 7-19 ms). `IoMode::Direct`
/// still reads with O_DIRECT.
pub fn restore_lazy(
    path: &Path,
    opts: &FileOptions,
    progress: &Progress,
) -> Result<LazyRestoring, FileFailed> {
    let (started, counters, mut summary) = begin(path, opts, progress);
    let io = match opts.io {
        IoMode::Auto => IoMode::Buffered,
        other => other,
    };
    let begun = (|| {
        let (saved, device_state) = open_checked(path, io, progress)?;
        summary.file_len = saved.file_len();
        summary.file_disk_bytes = saved.disk_bytes();
        record_io(&mut summary, saved.data());
        if opts.io == IoMode::Auto {
            summary.note = Some(
                "lazy restore: buffered reads (--io auto), so the kernel's readahead runs \
                 ahead of the prefetch; --io direct reads with O_DIRECT"
                    .into(),
            );
        }
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
