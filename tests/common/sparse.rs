//! A saved-guest file that announces a huge guest but holds a few pages,
//! written the way a save writes it without ever holding the guest: shared
//! by the library's tests (tests/file.rs) and the binary's
//! (tools/tests/file.rs).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ferry_ram::mapped::{region_checksum, write_metadata, zero_checksum, FileLayout};

/// Writes a saved guest of one 4 KiB-page block of `len` bytes whose only
/// present pages are a few spread over it (each filled with one byte
/// value), without ever holding `len` bytes: its bitmap, checksums and
/// header as a save writes them. Returns the file and (page, byte) pairs.
pub fn huge_sparse_file(dir: &Path, len: u64) -> (PathBuf, Vec<(u64, u8)>) {
    let specs = [ferry_ram::BlockSpec {
        name: "ram".into(),
        len,
        page_size: 4096,
    }];
    let device_state = b"huge sparse guest".to_vec();
    let mut layout = FileLayout::plan(&specs, device_state.len() as u64).unwrap();
    let path = dir.join("huge.ferry");
    let f = File::create(&path).unwrap();
    f.set_len(layout.file_len).unwrap();
    let total = len / 4096;
    let pages: Vec<(u64, u8)> = [0, 1, 300, total / 2, total - 1]
        .into_iter()
        .zip(1u8..)
        .collect();
    let b = layout.blocks[0].clone();
    let rs = u64::from(layout.region_size);
    let mut bitmap = vec![0u64; (b.bitmap_len() / 8) as usize];
    let mut sums = vec![zero_checksum(rs); b.regions(layout.region_size) as usize];
    for &(p, byte) in &pages {
        bitmap[(p / 64) as usize] |= 1 << (p % 64);
        f.write_all_at(&[byte; 4096], b.page_file_offset(p))
            .unwrap();
    }
    for &(p, _) in &pages {
        let r = p * 4096 / rs;
        let mut region = vec![0u8; rs as usize];
        for &(q, byte) in pages.iter().filter(|(q, _)| q * 4096 / rs == r) {
            let at = (q * 4096 - r * rs) as usize;
            region[at..at + 4096].fill(byte);
        }
        sums[r as usize] = region_checksum(&region);
    }
    write_metadata(&f, &path, &mut layout, &[bitmap], &[sums], &device_state).unwrap();
    (path, pages)
}
