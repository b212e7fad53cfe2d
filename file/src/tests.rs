//! Tests across the directions: a save verified and restored, a cancel,
//! a live save's later pass.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use ferry_ram::mapped::FileLayout;
use ferry_ram::{BlockSpec, Counters, GuestMemory, PageBitmap};

use crate::*;

/// Fills page `p` of `b` with `byte` (the test plays the guest).
fn fill_page(b: &ferry_ram::RamBlock, p: u64, byte: u8) {
    let ps = b.page_size() as usize;
    b.page_slice(p).unwrap().copy_from(&vec![byte; ps][..]);
}

/// A saved file of `specs` holding `mem`, written as a save writes it.
fn saved(mem: &GuestMemory, name: &str) -> (std::path::PathBuf, FileLayout, WrittenPages) {
    let path = std::env::temp_dir().join(format!("ferry-{name}-{}", std::process::id()));
    save_to(mem, &path)
}

/// Writes `mem` to a saved file at `path` as a save writes it (device
/// state `dev`).
pub(crate) fn save_to(
    mem: &GuestMemory,
    path: &std::path::Path,
) -> (std::path::PathBuf, FileLayout, WrittenPages) {
    let path = path.to_path_buf();
    let specs = mem.specs();
    let mut layout = FileLayout::plan(&specs, 3).unwrap();
    let file = File::create(&path).unwrap();
    file.set_len(layout.file_len).unwrap();
    let data = DataFile::open(&path, true, IoMode::Auto, 4096).unwrap();
    let written = write_pages(
        mem,
        &layout,
        &data,
        &path,
        &FileOptions::default(),
        &Counters::default(),
    )
    .unwrap();
    written
        .write_metadata(&file, &path, &mut layout, b"dev")
        .unwrap();
    (path, layout, written)
}

/// Verifying without memory gives the digest of the memory saved
/// (blocks of 4 KiB and 2 MiB pages, a block that is all zeros, data
/// at chunk and region edges), reading only present pages; a flipped
/// byte in a present page is found with its block and offset.
#[test]
fn verify_gives_the_saved_digest_and_finds_damage() {
    let specs = [
        BlockSpec {
            name: "ram".into(),
            len: 40 << 20,
            page_size: 4096,
        },
        BlockSpec {
            name: "zero".into(),
            len: 33 << 20,
            page_size: 4096,
        },
        BlockSpec {
            name: "huge".into(),
            len: 6 << 20,
            page_size: 2 << 20,
        },
    ];
    let mem = GuestMemory::anonymous(&specs).unwrap();
    let ram = &mem.blocks()[0];
    // A few pages here and there: both sides of a 16 MiB chunk edge,
    // the last page, a run of 300 pages.
    for p in [0u64, 4095, 4096, 5000, ram.pages() - 1]
        .into_iter()
        .chain(7000..7300)
    {
        fill_page(ram, p, (p % 200 + 1) as u8);
    }
    let huge = &mem.blocks()[2];
    huge.slice(huge.page_size() as u64 + 77, 1)
        .unwrap()
        .copy_from(&[9u8]);
    let (path, layout, _) = saved(&mem, "verify");
    let verify = |counters: &Counters| {
        SavedFile::open(&path, IoMode::Auto)?.verify_pages(&FileOptions::default(), counters)
    };
    let counters = Counters::default();
    let chunks = verify(&counters).unwrap();
    let digest = ferry_ram::Digest::from_chunk_hashes(
        layout
            .blocks
            .iter()
            .zip(&chunks)
            .map(|(b, h)| (b.name.as_str(), b.len, &h[..])),
    );
    assert_eq!(digest, mem.digest());
    let t = counters.snapshot();
    assert_eq!(t.pages_normal, 305 + 1);
    assert_eq!(t.ram_bytes, mem.total_bytes());
    // Only present pages are read (and gaps of up to 256 KiB between
    // them): far less than the 40 MiB of the block.
    assert!(t.wire_bytes <= (4 << 20), "read {} bytes", t.wire_bytes);

    let at = layout.blocks[0].page_file_offset(5000) + 3;
    let f = File::options().read(true).write(true).open(&path).unwrap();
    f.write_all_at(&[0xAB], at).unwrap();
    let e = verify(&Counters::default()).err().unwrap();
    let _ = std::fs::remove_file(&path);
    match e {
        FileError::Checksum {
            block,
            offset,
            file_offset,
            ..
        } => {
            assert_eq!(block, "ram");
            // Regions are 2 MiB here (the largest page).
            assert_eq!(layout.region_size, 2 << 20);
            assert_eq!(offset, 18 << 20);
            assert_eq!(file_offset, layout.blocks[0].pages_offset + offset);
        }
        other => panic!("wrong error: {other}"),
    }
}

/// A set cancel flag stops writing and reading pages at once, with an
/// error that says so.
#[test]
fn a_cancel_stops_file_threads() {
    let specs = [BlockSpec {
        name: "ram".into(),
        len: 8 << 20,
        page_size: 4096,
    }];
    let mem = GuestMemory::anonymous(&specs).unwrap();
    let layout = FileLayout::plan(&specs, 0).unwrap();
    let path = std::env::temp_dir().join(format!("ferry-cancel-{}", std::process::id()));
    File::create(&path)
        .unwrap()
        .set_len(layout.file_len)
        .unwrap();
    let data = DataFile::open(&path, true, IoMode::Auto, 4096).unwrap();
    let opts = FileOptions {
        cancel: Some(Arc::new(AtomicBool::new(true))),
        ..Default::default()
    };
    let counters = Counters::default();
    let e = write_pages(&mem, &layout, &data, &path, &opts, &counters)
        .err()
        .expect("cancelled");
    assert!(e.to_string().contains("cancelled"), "{e}");
    assert_eq!(counters.snapshot().ram_bytes, 0, "no region was saved");
    let _ = std::fs::remove_file(&path);
    let (path, ..) = saved(&mem, "cancel-verify");
    let e = SavedFile::open(&path, IoMode::Auto)
        .unwrap()
        .verify_pages(&opts, &counters)
        .expect_err("cancelled");
    let _ = std::fs::remove_file(&path);
    assert!(e.is_cancelled(), "{e}");
    assert!(e.to_string().contains("cancelled"), "{e}");
}

#[test]
fn a_later_pass_rewrites_pages_in_place_and_zeroed_pages_read_as_zeros() {
    let specs = [BlockSpec {
        name: "ram".into(),
        len: 2 << 20,
        page_size: 4096,
    }];
    let mem = GuestMemory::anonymous(&specs).unwrap();
    let b = &mem.blocks()[0];
    for p in 0..b.pages() {
        if p != 300 {
            fill_page(b, p, (p % 250 + 1) as u8);
        }
    }
    let layout = FileLayout::plan(&specs, 0).unwrap();
    let path = std::env::temp_dir().join(format!("ferry-rewrite-{}", std::process::id()));
    let file = File::create(&path).unwrap();
    file.set_len(layout.file_len).unwrap();
    let data = DataFile::open(&path, true, IoMode::Auto, 4096).unwrap();
    let opts = FileOptions {
        channels: 2,
        ..Default::default()
    };
    let counters = Counters::default();
    let written = write_pages(&mem, &layout, &data, &path, &opts, &counters).unwrap();
    assert!(!written.bitmaps[0].test(300));
    // The guest zeroes page 5, writes page 7 and the zero page 300.
    b.zero_page(5);
    for p in [7u64, 300] {
        fill_page(b, p, 0xEE);
    }
    let dirty = vec![PageBitmap::new(b.pages(), false)];
    for p in [5, 7, 300] {
        dirty[0].set(p);
    }
    let written = rewrite_pages(
        &mem, &layout, &data, &path, &opts, &counters, written, &dirty,
    )
    .unwrap();
    assert_eq!(dirty[0].count(), 0, "the pass takes the dirty pages");
    let bit = |p: u64| written.bitmaps[0].test(p);
    assert!(!bit(5) && bit(7) && bit(300));
    let len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(len, layout.file_len, "the file does not grow");
    let mut final_layout = layout.clone();
    written
        .write_metadata(&file, &path, &mut final_layout, b"")
        .unwrap();
    let back = GuestMemory::anonymous(&specs).unwrap();
    let saved = SavedFile::open(&path, IoMode::Auto).unwrap();
    saved.read_pages(&back, &opts, &counters).unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(back.blocks()[0].copy_all() == b.copy_all());
    assert_eq!(saved.restored_digest(&back), mem.digest());
}

/// A lazy restore's threads (or an error saying userfaultfd is not
/// allowed here, which skips the test).
fn start_lazy(source: Arc<dyn PageSource>, counters: &Arc<Counters>) -> Option<LazyRestore> {
    match LazyRestore::start(source, 2, counters.clone()) {
        Ok(l) => Some(l),
        Err(FileError::Io {
            what: "opening a userfaultfd",
            source,
            ..
        }) => {
            eprintln!("skipped: userfaultfd is not available here: {source}");
            None
        }
        Err(e) => panic!("lazy restore: {e}"),
    }
}

/// Lazy restore of a saved file through its PageSource: a touch is served
/// at once, the rest prefetched, and memory ends as saved.
#[test]
fn lazy_restore_reads_a_saved_file_through_its_page_source() {
    let dir = tempfile::tempdir().unwrap();
    let (path, mem, _) = crate::saved::tests::saved_guest(dir.path());
    let saved: Arc<dyn PageSource> = Arc::new(SavedFile::open(&path, IoMode::Auto).unwrap());
    let counters = Arc::new(Counters::default());
    let Some(lazy) = start_lazy(saved, &counters) else {
        return;
    };
    let memory = lazy.memory().clone();
    memory.blocks()[0].touch_page(300);
    let stats = lazy.finish().unwrap();
    assert_eq!(memory.digest(), mem.digest());
    // "ram" has 4 regions, "rom" 1.
    assert_eq!(stats.fault_regions + stats.prefetched_regions, 5);
    let t = counters.snapshot();
    assert_eq!((t.pages_normal, t.ram_bytes), (5, mem.total_bytes()));
}

/// A source that is not a file (as postcopy's network source will be):
/// every page holds its block and page number; one unit of block 1 fails.
struct Numbered {
    specs: Vec<BlockSpec>,
    bad_unit: Option<(usize, u64)>,
}

impl PageSource for Numbered {
    fn name(&self) -> String {
        "numbered".into()
    }
    fn blocks(&self) -> Vec<BlockSpec> {
        self.specs.clone()
    }
    fn unit(&self) -> u64 {
        64 << 10
    }
    fn fill(
        &self,
        block: usize,
        first_page: u64,
        pages: u64,
        dst: &mut [u8],
    ) -> Result<Filled, FileError> {
        let ps = check_range(self, &self.specs, block, first_page, pages, dst.len())? as usize;
        if self.bad_unit == Some((block, first_page)) {
            return Err(FileError::Source {
                source_name: self.name(),
                why: format!("page {first_page} did not arrive"),
            });
        }
        for (i, page) in dst.chunks_exact_mut(ps).enumerate() {
            page.fill(0);
            page[0] = block as u8 + 1;
            page[1..9].copy_from_slice(&(first_page + i as u64).to_le_bytes());
        }
        Ok(Filled {
            present: pages,
            zeros: false,
            bytes_read: dst.len() as u64,
        })
    }
}

#[test]
fn lazy_restore_serves_any_page_source_and_reports_its_error() {
    let specs = vec![
        BlockSpec {
            name: "a".into(),
            len: 1 << 20,
            page_size: 4096,
        },
        BlockSpec {
            name: "b".into(),
            len: 256 << 10,
            page_size: 4096,
        },
    ];
    let counters = Arc::new(Counters::default());
    let good = Arc::new(Numbered {
        specs: specs.clone(),
        bad_unit: None,
    });
    let Some(lazy) = start_lazy(good, &counters) else {
        return;
    };
    let memory = lazy.memory().clone();
    lazy.finish().unwrap();
    for (i, b) in memory.blocks().iter().enumerate() {
        for p in [0, 17, b.pages() - 1] {
            let mut head = [0u8; 9];
            b.slice(p * 4096, 9).unwrap().copy_to(&mut head[..]);
            assert_eq!(head[0], i as u8 + 1);
            assert_eq!(u64::from_le_bytes(head[1..9].try_into().unwrap()), p);
        }
    }
    let bad = Arc::new(Numbered {
        specs,
        bad_unit: Some((1, 16)),
    });
    let Some(lazy) = start_lazy(bad, &counters) else {
        return;
    };
    let e = lazy.finish().expect_err("a unit failed");
    assert!(matches!(e, FileError::Source { .. }), "{e}");
    assert!(e.to_string().contains("page 16 did not arrive"), "{e}");
}
