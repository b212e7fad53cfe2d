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

use ferry_multifd::file::{read_pages, verify_pages, DataFile, FileOptions};
use ferry_multifd::lazy::LazyRestore;
use ferry_multifd::{Counters, MultifdError};
use ferry_ram::mapped::{
    any_present, open_regular, present_pages, zero_checksum, FileLayout, StreamChecksum,
};
use ferry_ram::{block_file_paths, Digest, GuestMemory, RamError, DIGEST_CHUNK};

use crate::snapshot::{
    add_note, begin, cancel_flag, conclude, FileFailed, FileSummary, LazyReport, SnapshotError,
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
    let SavedFile {
        file,
        layout,
        bitmaps,
        checksums,
        device_state,
    } = SavedFile::open(path, progress)?;
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
    let data = DataFile::open(path, false, opts.direct_io)?;
    summary.direct_io = data.direct;
    add_note(summary, data.note.as_deref());
    progress.set_phase("reading");
    read_pages(
        &memory, &layout, &bitmaps, &checksums, &data, path, opts, counters,
    )?;
    if opts.cancelled() {
        return Err(MultifdError::Aborted(format!("{}: cancelled", path.display())).into());
    }
    progress.set_phase("digest");
    summary.digest = Some(restored_digest(&memory, &bitmaps).to_string());
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

/// The digest of freshly restored `memory` whose present pages are those
/// set in `bitmaps`: hashes the present pages and, for the others, the
/// zeros fresh memory holds there (the region checksums proved it), so an
/// absent page is never touched and a chunk of `DIGEST_CHUNK` bytes
/// without a present page costs nothing but a lookup. Equal to
/// `memory.digest()`.
fn restored_digest(memory: &GuestMemory, bitmaps: &[Vec<u64>]) -> Digest {
    let chunk = DIGEST_CHUNK as u64;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let hashes: Vec<Vec<u64>> = memory
        .blocks()
        .iter()
        .zip(bitmaps)
        .map(|(b, words)| {
            let ps = u64::from(b.page_size());
            let chunks = b.len().div_ceil(chunk);
            let hash = |c: u64| {
                let (start, end) = (c * chunk, ((c + 1) * chunk).min(b.len()));
                let (first, last) = (start / ps, end / ps);
                if !any_present(words, first, last) {
                    return zero_checksum(end - start);
                }
                let mut h = StreamChecksum::new();
                let mut at = first;
                for p in present_pages(words, first, last) {
                    h.zeros((p - at) * ps);
                    h.bytes(&b.bytes()[(p * ps) as usize..((p + 1) * ps) as usize]);
                    at = p + 1;
                }
                h.zeros((last - at) * ps);
                h.finish()
            };
            let per = chunks.div_ceil(threads).max(1);
            std::thread::scope(|s| {
                let parts: Vec<_> = (0..chunks)
                    .step_by(per as usize)
                    .map(|c0| {
                        s.spawn(move || {
                            (c0..(c0 + per).min(chunks)).map(hash).collect::<Vec<u64>>()
                        })
                    })
                    .collect();
                parts
                    .into_iter()
                    .flat_map(|p| p.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    Digest::from_chunk_hashes(
        memory
            .blocks()
            .iter()
            .zip(&hashes)
            .map(|(b, h)| (b.name(), b.len(), &h[..])),
    )
}

/// Checks every checksum of the guest saved at `path` as a restore would,
/// without memory to restore into ([`verify_pages`]): time and memory grow
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
        let SavedFile {
            file,
            layout,
            bitmaps,
            checksums,
            device_state,
        } = SavedFile::open(path, progress)?;
        let data = DataFile::open(path, false, opts.direct_io)?;
        summary.direct_io = data.direct;
        add_note(&mut summary, data.note.as_deref());
        progress.set_phase("reading");
        let chunks = verify_pages(&layout, &bitmaps, &checksums, &data, path, &opts, &counters)?;
        let digest = Digest::from_chunk_hashes(
            layout
                .blocks
                .iter()
                .zip(&chunks)
                .map(|(b, h)| (b.name.as_str(), b.len, &h[..])),
        );
        summary.digest = Some(digest.to_string());
        summary.switchover_digest =
            Some(Digest::with_device_state(digest, &device_state).to_string());
        summary.file_len = layout.file_len;
        summary.file_disk_bytes = file.metadata().map_or(0, |m| m.blocks() * 512);
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

/// A saved guest's file with its header, tables and device state read and
/// checked (pages are read later, by whoever restores them).
struct SavedFile {
    file: File,
    layout: FileLayout,
    /// Per block: the bitmap of pages present, and one checksum per region.
    bitmaps: Vec<Vec<u64>>,
    checksums: Vec<Vec<u64>>,
    device_state: Vec<u8>,
}

impl SavedFile {
    fn open(path: &Path, progress: &Progress) -> Result<Self, SnapshotError> {
        let file = open_saved(path)?;
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
        Ok(Self {
            file,
            layout,
            bitmaps,
            checksums,
            device_state,
        })
    }
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
        let SavedFile {
            file,
            layout,
            bitmaps,
            checksums,
            device_state,
        } = SavedFile::open(path, progress)?;
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
