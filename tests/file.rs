//! File mode through the controller's API: a guest of several blocks (one
//! all zero, one with 2 MiB pages) saved and restored with every channel
//! count, buffered and O_DIRECT, on a real disk; the restored memory must
//! be the saved memory byte for byte, and damage must come back as the
//! typed error that names it.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use common::{image_guest, MIB};
use ferry::{
    restore_from_file, save_to_file, FileOptions, GuestMemory, Progress, RestoreTarget,
    SaveOptions, SnapshotError,
};
use ferry_multifd::MultifdError;
use ferry_ram::pattern::{fill_block, Pattern};
use ferry_ram::{BlockSpec, RamError};

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

fn options(channels: u16, direct_io: bool, hole_min: u64) -> FileOptions {
    FileOptions {
        channels,
        direct_io,
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
                .filter(|&i| ferry_ram::is_zero_page(b.page(i)))
                .count() as u64
        })
        .sum();
    for channels in [1, 2, 4] {
        for direct in [false, true] {
            for hole_min in [0, MIB] {
                let path = dir.path().join("g.ferry");
                let opts = SaveOptions {
                    file: options(channels, direct, hole_min),
                    sync: true,
                };
                let saved = save_to_file(&guest, &path, &opts, &Progress::default()).unwrap();
                assert_eq!(saved.pages_zero, zero_pages);
                assert_eq!(saved.pages_normal, mem.total_pages() - zero_pages);
                assert_eq!(saved.ram_bytes, mem.total_bytes());
                let r = restore_from_file(
                    &path,
                    &RestoreTarget::Anonymous,
                    &options(channels, direct, 0),
                    &Progress::default(),
                )
                .unwrap();
                assert_eq!(r.device_state, b"device state of the test guest");
                assert_eq!(r.memory.specs(), mem.specs());
                for (a, b) in mem.blocks().iter().zip(r.memory.blocks()) {
                    assert!(a.bytes() == b.bytes(), "block '{}' differs", a.name());
                }
                assert_eq!(r.memory.digest(), mem.digest());
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
        SnapshotError::Multifd(MultifdError::FileChecksum { block, offset, .. }) => {
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
        let restoring =
            ferry::restore_lazy(&path, &options(channels, false, 0), &Progress::default()).unwrap();
        let m = restoring.memory().clone();
        // Touch the last page of every block, and pages all over, while the
        // prefetch runs: each read must see the saved bytes.
        let original = mem.clone();
        let toucher = std::thread::spawn(move || {
            for (a, b) in original.blocks().iter().zip(m.blocks()).rev() {
                for page in [b.pages() - 1, b.pages() / 2, 0] {
                    assert!(
                        b.page(page) == a.page(page),
                        "block '{}' page {page}",
                        a.name()
                    );
                }
            }
        });
        toucher.join().unwrap();
        let r = restoring.finish(None).unwrap();
        for (a, b) in mem.blocks().iter().zip(r.memory.blocks()) {
            assert!(a.bytes() == b.bytes(), "block '{}' differs", a.name());
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
            ferry::restore_lazy(&path, &options(2, false, 0), &Progress::default()).unwrap();
        let m = restoring.memory().clone();
        let toucher = std::thread::spawn(move || {
            let ram = &m.blocks()[0];
            std::hint::black_box(ram.page(ram.pages() - 1)[1]);
        });
        toucher.join().unwrap();
        restoring
            .finish(None)
            .err()
            .expect("damage must fail a lazy restore")
    });
    assert!(err.summary.digest.is_none());
    match err.error {
        SnapshotError::Multifd(MultifdError::FileChecksum { block, offset, .. }) => {
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
