//! File mode through the controller's API: a guest of several blocks (one
//! all zero, one with 2 MiB pages) saved and restored with every channel
//! count, buffered and O_DIRECT, on a real disk; the restored memory must
//! be the saved memory byte for byte, and damage must come back as the
//! typed error that names it.

mod common;
#[path = "common/sparse.rs"]
mod sparse;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

use common::{image_guest, MIB};
use ferry::FileError;
use ferry::{
    restore_from_file, save_live_to_file, save_to_file, verify_file, DirtyPattern, FileOptions,
    Guest, GuestError, GuestMemory, ImageGuest, IoMode, LiveOptions, Progress, Resources,
    RestoreTarget, SaveOptions, SnapshotError, TrackerKind,
};
use ferry_ram::pattern::{fill_block, Pattern};
use ferry_ram::DirtyLog;
use ferry_ram::{BlockSpec, RamError};
use sparse::huge_sparse_file;

fn guest_memory() -> Arc<GuestMemory> {
    let spec = |name: &str, len: u64, page_size: u32| BlockSpec {
        name: name.into(),
        len,
        page_size,
    };
    let mem = GuestMemory::anonymous(&[
        spec("ram", 20 * MIB, 4096),
        spec("vram", 3 * MIB + 8192, 4096),
        spec("rom", MIB, 4096),
        spec("huge", 4 * MIB, 2 << 20),
    ])
    .unwrap();
    let b = mem.blocks();
    fill_block(&b[0], Pattern::Mixed, 11);
    fill_block(&b[1], Pattern::Random, 12);
    fill_block(&b[2], Pattern::Zero, 13);
    fill_block(&b[3], Pattern::Mixed, 14);
    Arc::new(mem)
}

fn disk_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ferry-file-api")
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn options(channels: u16, io: IoMode, hole_min: u64) -> FileOptions {
    FileOptions {
        channels,
        io,
        hole_min,
        ..Default::default()
    }
}

#[test]
fn every_block_comes_back_byte_identical() {
    let dir = disk_dir();
    let mem = guest_memory();
    let guest = image_guest(mem.clone());
    let zero_pages: u64 = mem
        .blocks()
        .iter()
        .map(|b| {
            (0..b.pages())
                .filter(|&i| ferry_ram::is_zero(&b.page_slice(i).unwrap()))
                .count() as u64
        })
        .sum();
    for channels in [1, 2, 4] {
        for io in [IoMode::Buffered, IoMode::Auto] {
            for hole_min in [0, MIB] {
                let path = dir.path().join("g.ferry");
                let opts = SaveOptions {
                    file: options(channels, io, hole_min),
                    sync: true,
                };
                let saved = save_to_file(&guest, &path, &opts, &Progress::default()).unwrap();
                assert_eq!(saved.pages_zero, zero_pages);
                assert_eq!(saved.pages_normal, mem.total_pages() - zero_pages);
                assert_eq!(saved.ram_bytes, mem.total_bytes());
                let r = restore_from_file(
                    &path,
                    &RestoreTarget::Anonymous,
                    &options(channels, io, 0),
                    &Progress::default(),
                )
                .unwrap();
                assert_eq!(r.device_state, b"device state of the test guest");
                assert_eq!(r.memory.specs(), mem.specs());
                for (a, b) in mem.blocks().iter().zip(r.memory.blocks()) {
                    assert!(a.copy_all() == b.copy_all(), "block '{}' differs", a.name());
                }
                assert_eq!(r.memory.digest(), mem.digest());
                // The restore's own digest, which touches present pages only.
                assert_eq!(r.summary.digest, Some(mem.digest().to_string()));
                assert_eq!(r.summary.pages_normal, saved.pages_normal);
            }
        }
    }
}

#[test]
fn damage_is_a_typed_error_and_no_memory_comes_back() {
    let dir = disk_dir();
    let guest = image_guest(guest_memory());
    let path = dir.path().join("g.ferry");
    save_to_file(&guest, &path, &SaveOptions::default(), &Progress::default()).unwrap();
    let layout = ferry_ram::mapped::FileLayout::read(&File::open(&path).unwrap(), &path).unwrap();
    let restore = || {
        restore_from_file(
            &path,
            &RestoreTarget::Anonymous,
            &FileOptions::default(),
            &Progress::default(),
        )
    };
    // A byte of the "huge" block's second 2 MiB page.
    let huge = &layout.blocks[3];
    let at = huge.page_file_offset(1) + 12345;
    let f = File::options().read(true).write(true).open(&path).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[!b[0]], at).unwrap();
    let e = restore()
        .err()
        .expect("a damaged page must fail the restore");
    assert!(e.summary.digest.is_none());
    match e.error {
        SnapshotError::File(FileError::Checksum { block, offset, .. }) => {
            assert_eq!(block, "huge");
            assert_eq!(offset, 2 << 20);
        }
        other => panic!("wrong error: {other}"),
    }
    f.write_all_at(&b, at).unwrap();
    assert!(restore().is_ok());
    f.set_len(layout.file_len - 1).unwrap();
    assert!(matches!(
        restore().err().unwrap().error,
        SnapshotError::Ram(RamError::Truncated { .. })
    ));
}

#[test]
fn lazy_restore_serves_touches_and_ends_byte_identical() {
    let dir = disk_dir();
    let mem = guest_memory();
    let guest = image_guest(mem.clone());
    let path = dir.path().join("g.ferry");
    save_to_file(&guest, &path, &SaveOptions::default(), &Progress::default()).unwrap();
    for channels in [1, 3] {
        let restoring = ferry::restore_lazy(
            &path,
            &options(channels, IoMode::Auto, 0),
            &Progress::default(),
        )
        .unwrap();
        let m = restoring.memory().clone();
        // Touch the last page of every block, and pages all over, while the
        // prefetch runs: each read must see the saved bytes.
        let original = mem.clone();
        let toucher = std::thread::spawn(move || {
            for (a, b) in original.blocks().iter().zip(m.blocks()).rev() {
                for page in [b.pages() - 1, b.pages() / 2, 0] {
                    assert!(
                        b.copy_page(page) == a.copy_page(page),
                        "block '{}' page {page}",
                        a.name()
                    );
                }
            }
        });
        toucher.join().unwrap();
        let r = restoring.finish(None).unwrap();
        for (a, b) in mem.blocks().iter().zip(r.memory.blocks()) {
            assert!(a.copy_all() == b.copy_all(), "block '{}' differs", a.name());
        }
        let lazy = r.summary.lazy.unwrap();
        // One region size for the file: 2 MiB, the largest page size here.
        let regions: u64 = mem.blocks().iter().map(|b| b.len().div_ceil(2 * MIB)).sum();
        assert_eq!(lazy.fault_regions + lazy.prefetched_regions, regions);
        assert_eq!(r.summary.ram_bytes, mem.total_bytes());
    }
}

#[test]
fn lazy_restore_of_a_damaged_file_fails_without_hanging_the_guest() {
    let dir = disk_dir();
    let guest = image_guest(guest_memory());
    let path = dir.path().join("g.ferry");
    save_to_file(&guest, &path, &SaveOptions::default(), &Progress::default()).unwrap();
    let layout = ferry_ram::mapped::FileLayout::read(&File::open(&path).unwrap(), &path).unwrap();
    // A byte in the last MiB of the "ram" block, which the toucher reads first.
    let at = layout.blocks[0].pages_offset + 20 * MIB - 4096 + 1;
    let f = File::options().read(true).write(true).open(&path).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[!b[0]], at).unwrap();
    let err = common::within(30, move || {
        let restoring =
            ferry::restore_lazy(&path, &options(2, IoMode::Auto, 0), &Progress::default()).unwrap();
        let m = restoring.memory().clone();
        let toucher = std::thread::spawn(move || {
            let ram = &m.blocks()[0];
            std::hint::black_box(ram.copy_bytes((ram.pages() - 1) * 4096 + 1, 1));
        });
        toucher.join().unwrap();
        restoring
            .finish(None)
            .err()
            .expect("damage must fail a lazy restore")
    });
    assert!(err.summary.digest.is_none());
    match err.error {
        SnapshotError::File(FileError::Checksum { block, offset, .. }) => {
            assert_eq!(block, "ram");
            // Regions are 2 MiB in this file (the "huge" block's page size).
            assert_eq!(layout.region_size as u64, 2 * MIB);
            assert_eq!(offset, 18 * MIB);
        }
        other => panic!("wrong error: {other}"),
    }
}

/// Restoring RAM into files must never truncate the saved file itself
/// (`--ram-out` naming it, or a block file that is it): refused, and the
/// saved file still restores.
#[test]
fn restoring_ram_into_the_saved_file_is_refused() {
    let dir = disk_dir();
    let mem = common::memory(&[("ram", 4)], Pattern::Mixed, 3);
    let path = dir.path().join("g.ferry");
    let saved = save_to_file(
        &image_guest(mem.clone()),
        &path,
        &SaveOptions::default(),
        &Progress::default(),
    )
    .unwrap();
    let e = restore_from_file(
        &path,
        &RestoreTarget::Files(path.clone()),
        &FileOptions::default(),
        &Progress::default(),
    )
    .err()
    .expect("refused");
    assert!(
        e.to_string()
            .contains("refusing to restore RAM into the saved file"),
        "{e}"
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), saved.file_len);
    let r = restore_from_file(
        &path,
        &RestoreTarget::Anonymous,
        &FileOptions::default(),
        &Progress::default(),
    )
    .unwrap();
    assert_eq!(r.memory.digest(), mem.digest());
}

/// The hidden files in `dir` (partial saves, staged RAM files).
fn hidden(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect()
}

/// An image guest that, when asked for its device state (after the save
/// has created its partial file), has another thread cancel the save and
/// waits until it has.
struct CancelledMidway {
    inner: ImageGuest,
    progress: Arc<Progress>,
}

impl Guest for CancelledMidway {
    fn memory(&self) -> &Arc<GuestMemory> {
        self.inner.memory()
    }
    fn dirty_log(&self) -> Option<&dyn DirtyLog> {
        None
    }
    fn pause(&self) -> Result<(), GuestError> {
        self.inner.pause()
    }
    fn resume(&self) -> Result<(), GuestError> {
        self.inner.resume()
    }
    fn is_running(&self) -> bool {
        self.inner.is_running()
    }
    fn save_device_state(&self) -> Result<Vec<u8>, GuestError> {
        let (tx, rx) = mpsc::channel();
        let progress = self.progress.clone();
        std::thread::spawn(move || {
            assert!(progress.cancel(), "the save accepts a cancel");
            let _ = tx.send(());
        });
        rx.recv().unwrap();
        self.inner.save_device_state()
    }
    fn load_device_state(&self, state: &[u8]) -> Result<(), GuestError> {
        self.inner.load_device_state(state)
    }
    fn set_throttle(&self, percent: u8) {
        self.inner.set_throttle(percent)
    }
    fn resources(&self) -> &Resources {
        self.inner.resources()
    }
}

/// A save cancelled through its Progress from another thread ends with
/// the Cancelled error and status "cancelled", removes its partial file,
/// leaves an older file at the target as it was and the guest running; so
/// does a save whose Progress was cancelled before it started.
#[test]
fn a_cancelled_save_removes_its_partial_file_and_keeps_the_old_one() {
    let dir = disk_dir();
    let path = dir.path().join("g.ferry");
    std::fs::write(&path, b"an older save").unwrap();
    let mem = common::memory(&[("ram", 8)], Pattern::Mixed, 1);
    let progress = Arc::new(Progress::default());
    let guest = CancelledMidway {
        inner: image_guest(mem.clone()),
        progress: progress.clone(),
    };
    let f = save_to_file(&guest, &path, &SaveOptions::default(), &progress)
        .expect_err("a cancelled save fails");
    assert!(
        matches!(&f.error, SnapshotError::Cancelled { path: p } if *p == path),
        "{}",
        f.error
    );
    assert!(f.error.to_string().contains("cancelled"), "{}", f.error);
    assert_eq!(f.summary.status, "cancelled");
    assert_eq!(f.summary.pages_normal, 0, "no page was written");
    assert!(guest.is_running(), "a cancelled save resumes the guest");
    assert_eq!(std::fs::read(&path).unwrap(), b"an older save");
    assert!(hidden(dir.path()).is_empty(), "{:?}", hidden(dir.path()));

    let early = Progress::default();
    early.cancel();
    let f = save_to_file(&image_guest(mem), &path, &SaveOptions::default(), &early)
        .expect_err("cancelled before it began");
    assert!(
        matches!(f.error, SnapshotError::Cancelled { .. }),
        "{}",
        f.error
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"an older save");
    assert!(hidden(dir.path()).is_empty(), "{:?}", hidden(dir.path()));
}

/// A live save that would run pass after pass is cancelled from another
/// thread while it rewrites pages: it ends cancelled, its partial file
/// removed, nothing at the target, the guest still running.
#[test]
fn a_live_save_cancelled_between_passes_leaves_nothing() {
    common::within(120, || {
        let dir = disk_dir();
        let path = dir.path().join("live.ferry");
        // Fast enough that every pass leaves dirty pages: with no downtime
        // allowed, only the cancel ends the passes (a slower guest could
        // leave none and let the save finish before the cancel came).
        let guest = Arc::new(common::synthetic(
            16,
            512 * MIB,
            DirtyPattern::Random,
            TrackerKind::Bitmap,
        ));
        let live = LiveOptions {
            downtime_limit: std::time::Duration::ZERO,
            max_passes: u64::MAX,
        };
        let progress = Arc::new(Progress::default());
        let canceller = {
            let progress = progress.clone();
            std::thread::spawn(move || {
                common::wait_until(|| progress.phase() == "passes");
                progress.cancel();
            })
        };
        let f = save_live_to_file(&*guest, &path, &SaveOptions::default(), &live, &progress)
            .expect_err("cancelled");
        canceller.join().unwrap();
        assert!(
            matches!(f.error, SnapshotError::Cancelled { .. }),
            "{}",
            f.error
        );
        assert_eq!(f.summary.status, "cancelled");
        assert!(
            guest.is_running(),
            "the guest runs on after a cancelled save"
        );
        assert!(!path.exists());
        assert!(hidden(dir.path()).is_empty(), "{:?}", hidden(dir.path()));
    });
}

/// Partial files of earlier saves to the same path: one nobody holds
/// locked whose process is gone (a save that was killed) is removed and
/// named in the note; one held locked (a save running) or whose process
/// still exists is named in the error, and left alone.
#[test]
fn stale_partial_files_are_removed_and_live_ones_named_in_the_error() {
    let dir = disk_dir();
    let path = dir.path().join("g.ferry");
    let guest = image_guest(common::memory(&[("ram", 2)], Pattern::Mixed, 2));
    let opts = SaveOptions::default();
    // No process has a PID above the kernel's limit.
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let dead = dir.path().join(format!(".g.ferry.partial-{}", pid_max + 1));
    File::create(&dead).unwrap().set_len(64 * MIB).unwrap();
    let s = save_to_file(&guest, &path, &opts, &Progress::default()).unwrap();
    let note = s.note.unwrap_or_default();
    assert!(note.contains(&dead.display().to_string()), "{note}");
    assert!(!dead.exists());
    assert!(hidden(dir.path()).is_empty(), "{:?}", hidden(dir.path()));

    // Held locked: a save that is running (here: this test holding it).
    let running = dir.path().join(format!(".g.ferry.partial-{}", pid_max + 2));
    let held = File::create(&running).unwrap();
    // SAFETY: flock on a descriptor `held` owns.
    assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);
    let before = std::fs::read(&path).unwrap();
    let f = save_to_file(&guest, &path, &opts, &Progress::default()).expect_err("refused");
    let e = f.error.to_string();
    assert!(
        e.contains(&running.display().to_string()) && e.contains("running"),
        "{e}"
    );
    assert!(running.exists());
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the old save is kept"
    );
    drop(held);
    std::fs::remove_file(&running).unwrap();

    // Unlocked, but its process (PID 1) exists: it cannot be told from a
    // save that is just starting.
    let unsure = dir.path().join(".g.ferry.partial-1");
    File::create(&unsure).unwrap();
    let e = save_to_file(&guest, &path, &opts, &Progress::default())
        .expect_err("refused")
        .error
        .to_string();
    assert!(
        e.contains(&unsure.display().to_string()) && e.contains("remove that file"),
        "{e}"
    );
    assert!(unsure.exists());
}

/// A saved guest whose header announces 256 GiB of RAM but holds a few
/// pages restores into a RAM file, and verifies, reading only those pages:
/// the RAM file is sparse, holds the pages where they belong, and the
/// digests of restore and verify agree. (Time and memory are measured end
/// to end by the ferry command's test of the same.)
#[test]
fn a_huge_sparse_guest_restores_into_a_sparse_file_and_verifies() {
    let dir = disk_dir();
    let (path, pages) = huge_sparse_file(dir.path(), 256 << 30);
    let out = dir.path().join("ram.out");
    let r = common::within(120, {
        let (path, out) = (path.clone(), out.clone());
        move || {
            restore_from_file(
                &path,
                &RestoreTarget::Files(out),
                &FileOptions::default(),
                &Progress::default(),
            )
            .map(|r| r.summary)
            .map_err(|f| f.error.to_string())
        }
    })
    .unwrap();
    let v = verify_file(&path, &FileOptions::default(), &Progress::default()).unwrap();
    assert_eq!(r.digest, v.digest);
    assert_eq!(r.pages_normal, pages.len() as u64);
    let f = File::open(&out).unwrap();
    let md = f.metadata().unwrap();
    assert_eq!(md.len(), 256 << 30);
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&md) * 512 < 64 * MIB,
        "the RAM file is sparse"
    );
    for (p, byte) in pages {
        let mut b = [0u8; 4096];
        f.read_exact_at(&mut b, p * 4096).unwrap();
        assert!(b.iter().all(|&x| x == byte), "page {p}");
    }
    assert!(hidden(dir.path()).is_empty(), "{:?}", hidden(dir.path()));
}
