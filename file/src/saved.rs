//! A saved guest's file, opened: [`SavedFile`] owns the parsed layout
//! (`ferry_ram::mapped`), each block's page bitmap as a [`PageBitmap`], the
//! region checksums, where the device state lies, and the handle page data
//! is read through. Everything but page data and the device state is read
//! and checked when it opens; restoring ([`crate::read`]), verifying
//! ([`crate::verify`]), lazy restore (through [`crate::PageSource`]) and
//! `ferry inspect` all start here.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ferry_ram::mapped::{open_regular, FileLayout};
use ferry_ram::{BlockSpec, PageBitmap, RamError};

use crate::data::{DataFile, IoMode};
use crate::FileError;

/// A saved guest's file with its header, block table, bitmaps and checksum
/// tables read and checked (pages and the device state are read later, by
/// whoever needs them).
pub struct SavedFile {
    path: PathBuf,
    /// The handle the header and tables were read through.
    file: File,
    /// The handle page data moves through (O_DIRECT if asked and allowed).
    data: DataFile,
    layout: FileLayout,
    /// Per block: the pages present in the file.
    bitmaps: Vec<PageBitmap>,
    /// Per block: one checksum per region of memory as restored.
    checksums: Vec<Vec<u64>>,
}

impl SavedFile {
    /// Opens the saved guest at `path`, refusing at once (without blocking)
    /// anything but a regular file; reads and checks its header, block
    /// table, every bitmap and every checksum table (each against its own
    /// checksum, and every offset against the file's size); and opens the
    /// handle for page data as `io` says ([`DataFile::fallback`] says why
    /// [`IoMode::Auto`] did not use O_DIRECT, if it did not).
    pub fn open(path: &Path, io: IoMode) -> Result<Self, FileError> {
        let file = open_regular(
            path,
            File::options().read(true),
            0,
            "opening the saved guest",
            "give the path of a file `ferry save` wrote",
        )?;
        let layout = FileLayout::read(&file, path)?;
        let mut bitmaps = Vec::with_capacity(layout.blocks.len());
        let mut checksums = Vec::with_capacity(layout.blocks.len());
        for (i, b) in layout.blocks.iter().enumerate() {
            let words = layout.read_bitmap(&file, path, i)?;
            // read_bitmap has checked the length and the bits past the end.
            let bitmap =
                PageBitmap::from_words(b.pages(), &words).ok_or_else(|| RamError::BadField {
                    path: path.into(),
                    block: b.name.clone(),
                    what: format!(
                        "bitmap at offset {:#x} does not fit the block",
                        b.bitmap_offset
                    ),
                })?;
            bitmaps.push(bitmap);
            checksums.push(layout.read_checksums(&file, path, i)?);
        }
        let align = layout.blocks.iter().map(|b| u64::from(b.page_size)).min();
        let data = DataFile::open(path, false, io, align.unwrap_or(4096))?;
        Ok(Self {
            path: path.into(),
            file,
            data,
            layout,
            bitmaps,
            checksums,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The handle the header and tables were read through.
    pub fn file(&self) -> &File {
        &self.file
    }
    /// The handle page data is read through.
    pub fn data(&self) -> &DataFile {
        &self.data
    }
    /// The handle to read pages into `buf` through: the data handle, or,
    /// if that is O_DIRECT and `buf` does not meet its alignment (a
    /// caller's own buffer), the buffered one the tables were read through.
    pub(crate) fn reader_for(&self, buf: &[u8]) -> &File {
        if self.data.takes(buf) {
            self.data.file()
        } else {
            &self.file
        }
    }
    pub fn layout(&self) -> &FileLayout {
        &self.layout
    }
    /// The blocks as a restore creates them.
    pub fn specs(&self) -> Vec<BlockSpec> {
        self.layout.specs()
    }
    /// Per block, the pages present in the file.
    pub fn bitmaps(&self) -> &[PageBitmap] {
        &self.bitmaps
    }
    /// Per block, one checksum per region (`layout().region_size` bytes
    /// of memory, the last of a block maybe short).
    pub fn checksums(&self) -> &[Vec<u64>] {
        &self.checksums
    }
    /// Where the device state lies: (file offset, length in bytes).
    pub fn device_state_location(&self) -> (u64, u64) {
        (
            self.layout.device_state_offset,
            self.layout.device_state_len,
        )
    }
    /// Reads the device state and checks it against its checksum.
    pub fn read_device_state(&self) -> Result<Vec<u8>, FileError> {
        Ok(self.layout.read_device_state(&self.file, &self.path)?)
    }
    /// The file's length, and what it occupies on disk (it is sparse).
    pub fn file_len(&self) -> u64 {
        self.layout.file_len
    }
    pub fn disk_bytes(&self) -> u64 {
        self.file.metadata().map_or(0, |m| m.blocks() * 512)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::FileExt;

    use ferry_ram::{BlockSpec, Counters, GuestMemory, RamError};

    use super::*;
    use crate::FileOptions;

    /// A guest of two blocks with a few non-zero pages, saved to a file
    /// in `dir` as a save writes it; returns the path, the memory and the
    /// pages written.
    pub(crate) fn saved_guest(dir: &Path) -> (PathBuf, GuestMemory, crate::WrittenPages) {
        let specs = [
            BlockSpec {
                name: "ram".into(),
                len: 4 << 20,
                page_size: 4096,
            },
            BlockSpec {
                name: "rom".into(),
                len: 1 << 20,
                page_size: 4096,
            },
        ];
        let mem = GuestMemory::anonymous(&specs).unwrap();
        for (block, page, byte) in [
            (0usize, 0u64, 1u8),
            (0, 1, 2),
            (0, 300, 3),
            (0, 767, 4),
            (1, 9, 5),
        ] {
            let b = &mem.blocks()[block];
            b.page_slice(page).unwrap().copy_from(&[byte; 4096]);
        }
        let (path, _, written) = crate::tests::save_to(&mem, &dir.join("guest.sav"));
        (path, mem, written)
    }

    #[test]
    fn a_saved_file_opens_with_its_bitmaps_and_checksums() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mem, written) = saved_guest(dir.path());
        let saved = SavedFile::open(&path, IoMode::Auto).unwrap();
        assert_eq!(saved.specs(), mem.specs());
        assert_eq!(saved.bitmaps().len(), 2);
        for (got, want) in saved.bitmaps().iter().zip(&written.bitmaps) {
            assert_eq!(
                got.iter_set().collect::<Vec<_>>(),
                want.iter_set().collect::<Vec<_>>()
            );
        }
        assert_eq!(
            saved.bitmaps()[0].iter_set().collect::<Vec<_>>(),
            [0, 1, 300, 767]
        );
        assert_eq!(saved.bitmaps()[1].iter_set().collect::<Vec<_>>(), [9]);
        assert_eq!(saved.checksums(), &written.checksums[..]);
        assert_eq!(saved.checksums()[0].len(), 4);
        assert_eq!(saved.layout().pages_present(), 5);
        assert_eq!(saved.read_device_state().unwrap(), b"dev");
        let (offset, len) = saved.device_state_location();
        assert_eq!(len, 3);
        assert_eq!(offset, saved.layout().device_state_offset);
        // Restored through it, memory and digest are the saved guest's.
        let back = GuestMemory::anonymous(&saved.specs()).unwrap();
        saved
            .read_pages(&back, &FileOptions::default(), &Counters::default())
            .unwrap();
        assert_eq!(saved.restored_digest(&back), mem.digest());
        assert_eq!(back.digest(), mem.digest());
        let verified = saved
            .verify(&FileOptions::default(), &Counters::default())
            .unwrap();
        assert_eq!(verified, mem.digest());
    }

    #[test]
    fn a_truncated_file_is_refused_naming_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ..) = saved_guest(dir.path());
        let full = std::fs::metadata(&path).unwrap().len();
        for (cut, names) in [
            (full / 2, "the length its header gives"),
            (40, "the file header"),
        ] {
            let f = File::options().write(true).open(&path).unwrap();
            f.set_len(cut).unwrap();
            match SavedFile::open(&path, IoMode::Auto).err().expect("refused") {
                FileError::Ram(RamError::Truncated {
                    len, need, what, ..
                }) => {
                    assert_eq!(len, cut);
                    assert!(need > cut);
                    assert_eq!(what, names);
                }
                other => panic!("wrong error: {other}"),
            }
        }
    }

    #[test]
    fn a_corrupt_bitmap_or_checksum_table_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ..) = saved_guest(dir.path());
        let layout = SavedFile::open(&path, IoMode::Auto)
            .unwrap()
            .layout()
            .clone();
        let f = File::options().read(true).write(true).open(&path).unwrap();
        for (offset, what) in [
            (layout.blocks[1].bitmap_offset, "bitmap"),
            (layout.blocks[0].checksums_offset + 8, "checksum table"),
        ] {
            let mut byte = [0u8];
            f.read_exact_at(&mut byte, offset).unwrap();
            f.write_all_at(&[byte[0] ^ 0x40], offset).unwrap();
            let e = SavedFile::open(&path, IoMode::Auto).err().expect("refused");
            let text = e.to_string();
            match e {
                FileError::Ram(RamError::TableChecksum {
                    what: w, offset: o, ..
                }) => {
                    assert_eq!(w, what, "{text}");
                    assert_eq!(o, if what == "bitmap" { offset } else { offset - 8 });
                }
                other => panic!("wrong error: {other}"),
            }
            f.write_all_at(&byte, offset).unwrap();
        }
        assert!(SavedFile::open(&path, IoMode::Auto).is_ok(), "repaired");
    }

    #[test]
    fn not_a_saved_guest_is_refused_naming_the_magic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other");
        std::fs::write(&path, vec![b'x'; 8192]).unwrap();
        let e = SavedFile::open(&path, IoMode::Auto).err().expect("refused");
        assert!(
            matches!(e, FileError::Ram(RamError::BadMagic { .. })),
            "{e}"
        );
        assert!(e.to_string().contains("magic"), "{e}");
    }
}
