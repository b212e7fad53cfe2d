//! The saved-guest file: ferry's "mapped-ram" layout, where every page of
//! every RAM block has a fixed place in the file.
//!
//! Owns the layout (where each block's bitmap, checksums and pages go), the
//! encoding of the header and block table, and the checks a file must pass
//! before anything in it is used; and what every reader of such a file
//! shares so that its cost follows the pages present, not the guest's size:
//! word-at-a-time scans of a bitmap ([`present_pages`], [`count_present`],
//! [`any_present`]), checksums of zeros known without reading them
//! ([`zero_checksum`], [`StreamChecksum`]), and opening only regular files
//! ([`open_regular`], [`check_output_path`]). The parallel writers and
//! readers live in `ferry-multifd` (file mode); this module never touches
//! page data in bulk.
//!
//! # Layout
//!
//! All integers are little-endian. Offsets are bytes from the start of the file.
//!
//! ```text
//! 0                  file header (64 bytes)
//! 64                 block table: one 320-byte entry per RAM block
//! (4 KiB aligned)    per block: page bitmap, then the region checksum table
//! (1 MiB aligned)    per block: its pages; page i at pages_offset + i × page_size
//! (1 MiB aligned)    device state (opaque bytes)
//! ```
//!
//! File header, 64 bytes:
//!
//! | offset | size | field                  | meaning                                              |
//! |--------|------|------------------------|------------------------------------------------------|
//! | 0      | 8    | magic                  | `FERRYSAV`                                           |
//! | 8      | 4    | version                | 1                                                    |
//! | 12     | 4    | flags                  | bit 0: complete (the header is written last)         |
//! | 16     | 4    | block_count            | RAM blocks, 1..=1024                                 |
//! | 20     | 4    | region_size            | bytes of memory per checksum: 1 MiB or largest page  |
//! | 24     | 8    | file_len               | length of the whole file                             |
//! | 32     | 8    | device_state_offset    | where the device state starts                        |
//! | 40     | 8    | device_state_len       | its length, at most 256 MiB                          |
//! | 48     | 8    | device_state_checksum  | xxh3-64 of the device state                          |
//! | 56     | 8    | header_checksum        | xxh3-64 of bytes 0..56 and the whole block table     |
//!
//! Block table entry, 320 bytes:
//!
//! | offset | size | field              | meaning                                                 |
//! |--------|------|--------------------|---------------------------------------------------------|
//! | 0      | 4    | name_len           | 1..=255                                                 |
//! | 4      | 256  | name               | UTF-8, zero padded                                      |
//! | 260    | 4    | page_size          | power of two, 4 KiB..=1 GiB, divides region_size        |
//! | 264    | 8    | len                | block length, a multiple of page_size                   |
//! | 272    | 8    | pages_offset       | 1 MiB aligned; page i at pages_offset + i × page_size   |
//! | 280    | 8    | bitmap_offset      | ⌈pages / 64⌉ × 8 bytes; bit i set = page i is in the file |
//! | 288    | 8    | bitmap_checksum    | xxh3-64 of the bitmap                                   |
//! | 296    | 8    | checksums_offset   | ⌈len / region_size⌉ × 8 bytes: one xxh3-64 per region   |
//! | 304    | 8    | checksums_checksum | xxh3-64 of the checksum table                           |
//! | 312    | 8    | pages_present      | set bits in the bitmap                                  |
//!
//! A page's bit is set exactly when the page is not all zeros. A page whose
//! bit is clear restores as zeros and its place in the file must read as
//! zeros: a hole (the default: zero pages are never written, the file is
//! sparse), or zeros a writer chose to write so that its writes stay large
//! (`ferry save --hole-min`). Readers may therefore read across such pages.
//! Region r of a block covers its memory bytes
//! `[r × region_size, (r + 1) × region_size)` (the last may be short) *as
//! restored*, zero pages included, so a flipped byte anywhere in the pages
//! area is found, and so is a wrong bitmap bit.
//!
//! The file's size depends only on the layout, never on how many passes
//! rewrote pages: a later pass rewrites a page in its place (zeros, or a
//! punched hole, for a page that became zero), updates its bit, and
//! recomputes the checksum of every region it touched; the header is
//! written last, marked complete, only when the final pass is in.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::{BlockSpec, RamError};

pub const MAGIC: [u8; 8] = *b"FERRYSAV";
pub const VERSION: u32 = 1;
pub const FILE_HEADER_LEN: u64 = 64;
pub const BLOCK_ENTRY_LEN: u64 = 320;
/// Every block's pages start on this boundary (and the device state too).
pub const PAGES_ALIGN: u64 = 1 << 20;
/// Bitmaps and checksum tables start on this boundary.
pub const META_ALIGN: u64 = 4096;
/// Bytes of memory covered by one checksum unless a page is larger.
pub const DEFAULT_REGION_SIZE: u32 = 1 << 20;
pub const MAX_BLOCKS: u32 = 1024;
/// The largest device state a saved guest may hold (as on the wire).
pub const MAX_DEVICE_STATE: u64 = 256 << 20;
/// The header's `flags` bit saying the writer finished.
pub const FLAG_COMPLETE: u32 = 1;
const NAME_MAX: usize = 255;

/// Where one RAM block lives in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockLayout {
    pub name: String,
    pub len: u64,
    pub page_size: u32,
    pub pages_offset: u64,
    pub bitmap_offset: u64,
    pub bitmap_checksum: u64,
    pub checksums_offset: u64,
    pub checksums_checksum: u64,
    pub pages_present: u64,
}

impl BlockLayout {
    pub fn pages(&self) -> u64 {
        self.len / u64::from(self.page_size)
    }
    pub fn bitmap_len(&self) -> u64 {
        self.pages().div_ceil(64) * 8
    }
    pub fn regions(&self, region_size: u32) -> u64 {
        self.len.div_ceil(u64::from(region_size))
    }
    pub fn checksums_len(&self, region_size: u32) -> u64 {
        self.regions(region_size) * 8
    }
    /// File offset of page `index` (which the caller keeps below `pages()`).
    pub fn page_file_offset(&self, index: u64) -> u64 {
        self.pages_offset + index * u64::from(self.page_size)
    }
    pub fn spec(&self) -> BlockSpec {
        BlockSpec {
            name: self.name.clone(),
            len: self.len,
            page_size: self.page_size,
        }
    }
}

/// The whole file's layout: what the header and block table say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileLayout {
    pub flags: u32,
    pub region_size: u32,
    pub file_len: u64,
    pub device_state_offset: u64,
    pub device_state_len: u64,
    pub device_state_checksum: u64,
    pub blocks: Vec<BlockLayout>,
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// The checksum of one region of restored memory (or of a table).
pub fn region_checksum(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}

/// Zeros to hash from: a run of absent (zero) pages is never read from
/// the file nor from memory, it is hashed from here.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// [`region_checksum`] of bytes given piece by piece, where runs of zeros
/// need no buffer: the checksum of a region (or a digest chunk) of restored
/// memory computed from its present pages alone, without touching the
/// memory (or reading the file) where its absent pages lie. Equal to
/// [`region_checksum`] of the concatenation.
pub struct StreamChecksum {
    hasher: Xxh3,
    len: u64,
}

impl Default for StreamChecksum {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamChecksum {
    pub fn new() -> Self {
        Self {
            hasher: Xxh3::new(),
            len: 0,
        }
    }
    /// Adds `bytes`.
    pub fn bytes(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
    }
    /// Adds `n` zero bytes.
    pub fn zeros(&mut self, mut n: u64) {
        while n > 0 {
            let take = n.min(ZEROS.len() as u64);
            self.bytes(&ZEROS[..take as usize]);
            n -= take;
        }
    }
    /// Bytes added so far.
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn finish(&self) -> u64 {
        self.hasher.digest()
    }
}

/// [`region_checksum`] of `len` zero bytes: what the checksum of a region
/// without a present page must be (and the digest's hash of an all-zero
/// chunk). Computed once per length and remembered, so a file of many
/// empty regions costs one lookup each, not a hash of their zeros.
pub fn zero_checksum(len: u64) -> u64 {
    static KNOWN: Mutex<BTreeMap<u64, u64>> = Mutex::new(BTreeMap::new());
    let known = |k: &BTreeMap<u64, u64>| k.get(&len).copied();
    if let Some(sum) = known(&KNOWN.lock().unwrap_or_else(PoisonError::into_inner)) {
        return sum;
    }
    let mut s = StreamChecksum::new();
    s.zeros(len);
    let sum = s.finish();
    KNOWN
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(len, sum);
    sum
}

/// Word `w` of `bitmap` with only the bits of pages in `[first, end)` kept.
fn masked_word(bitmap: &[u64], w: u64, first: u64, end: u64) -> u64 {
    let mut word = bitmap[w as usize];
    let base = w * 64;
    if first > base {
        word &= u64::MAX << (first - base);
    }
    if end < base + 64 {
        word &= (1u64 << (end.saturating_sub(base))).wrapping_sub(1);
    }
    word
}

/// The words of `bitmap` holding the bits of pages `[first, end)`.
fn word_range(first: u64, end: u64) -> std::ops::Range<u64> {
    if first >= end {
        return 0..0;
    }
    first / 64..end.div_ceil(64)
}

/// The present pages of `[first, end)` (set bits of `bitmap`, a block's
/// bitmap as [`FileLayout::read_bitmap`] returns it), lowest first. The
/// bitmap is read a word at a time: 64 absent pages cost one load.
pub fn present_pages(bitmap: &[u64], first: u64, end: u64) -> impl Iterator<Item = u64> + '_ {
    word_range(first, end)
        .flat_map(move |w| crate::set_bits(masked_word(bitmap, w, first, end), w * 64))
}

/// How many pages of `[first, end)` are present, a word at a time.
pub fn count_present(bitmap: &[u64], first: u64, end: u64) -> u64 {
    word_range(first, end)
        .map(|w| u64::from(masked_word(bitmap, w, first, end).count_ones()))
        .sum()
}

/// Whether any page of `[first, end)` is present; stops at the first.
pub fn any_present(bitmap: &[u64], first: u64, end: u64) -> bool {
    word_range(first, end).any(|w| masked_word(bitmap, w, first, end) != 0)
}

/// What kind of file `t` is, as errors name it ("a FIFO").
pub fn file_kind(t: &std::fs::FileType) -> &'static str {
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file ferry knows"
    }
}

/// Opens `path` as `options` say (plus `extra_flags`, e.g. O_DIRECT) and
/// refuses anything but a regular file: a FIFO, a device, a directory or a
/// socket would block a reader for ever or make no sense as a saved guest.
/// The open itself cannot block (O_NONBLOCK, turned off again once the
/// file is known to be regular), and the check is made on what was opened
/// (fstat), so nothing can be swapped in between. `what` names the file in
/// errors ("the saved guest"); `hint` says what to do instead.
pub fn open_regular(
    path: &Path,
    options: &OpenOptions,
    extra_flags: i32,
    what: &'static str,
    hint: &'static str,
) -> Result<File, RamError> {
    let file = options
        .clone()
        .custom_flags(libc::O_NONBLOCK | extra_flags)
        .open(path)
        .map_err(|source| RamError::PathIo {
            path: path.into(),
            what,
            source,
        })?;
    let kind = file
        .metadata()
        .map_err(|source| RamError::PathIo {
            path: path.into(),
            what,
            source,
        })?
        .file_type();
    if !kind.is_file() {
        return Err(RamError::NotRegular {
            path: path.into(),
            kind: file_kind(&kind),
            hint,
        });
    }
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function owns (`file`), reading
    // and then setting its status flags; no memory is passed.
    let cleared = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) == 0
    };
    if !cleared {
        return Err(RamError::PathIo {
            path: path.into(),
            what,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(file)
}

/// Refuses an output path where something other than a regular file
/// lies: a symbolic link (never written through), a directory, a FIFO, a
/// device, a socket. Nothing there, or a regular file, is fine. `hint`
/// says what to do instead.
pub fn check_output_path(path: &Path, hint: &'static str) -> Result<(), RamError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_file() => Err(RamError::NotRegular {
            path: path.into(),
            kind: file_kind(&m.file_type()),
            hint,
        }),
        _ => Ok(()),
    }
}

impl FileLayout {
    /// Places the blocks of `specs` and a device state of `device_state_len`
    /// bytes. Checksums, bitmap facts and the complete flag are filled in by
    /// the writer once it knows them.
    pub fn plan(specs: &[BlockSpec], device_state_len: u64) -> Result<Self, RamError> {
        if specs.is_empty() || specs.len() > MAX_BLOCKS as usize {
            return Err(RamError::Layout(format!(
                "a saved guest holds 1 to {MAX_BLOCKS} RAM blocks, not {}",
                specs.len()
            )));
        }
        if device_state_len > MAX_DEVICE_STATE {
            return Err(RamError::Layout(format!(
                "a device state of {device_state_len} bytes: a saved guest holds at most {MAX_DEVICE_STATE}"
            )));
        }
        let max_page = specs.iter().map(|s| s.page_size).max().unwrap_or(4096);
        let region_size = DEFAULT_REGION_SIZE.max(max_page);
        let mut cursor = align_up(
            FILE_HEADER_LEN + BLOCK_ENTRY_LEN * specs.len() as u64,
            META_ALIGN,
        );
        let mut blocks: Vec<BlockLayout> = specs
            .iter()
            .map(|s| BlockLayout {
                name: s.name.clone(),
                len: s.len,
                page_size: s.page_size,
                pages_offset: 0,
                bitmap_offset: 0,
                bitmap_checksum: 0,
                checksums_offset: 0,
                checksums_checksum: 0,
                pages_present: 0,
            })
            .collect();
        for b in &mut blocks {
            if b.name.is_empty() || b.name.len() > NAME_MAX {
                return Err(RamError::BadName(b.name.clone()));
            }
            b.bitmap_offset = cursor;
            cursor = align_up(cursor + b.bitmap_len(), META_ALIGN);
            b.checksums_offset = cursor;
            cursor = align_up(cursor + b.checksums_len(region_size), META_ALIGN);
        }
        cursor = align_up(cursor, PAGES_ALIGN);
        for b in &mut blocks {
            b.pages_offset = cursor;
            cursor = align_up(cursor + b.len, PAGES_ALIGN);
        }
        Ok(Self {
            flags: 0,
            region_size,
            file_len: cursor + device_state_len,
            device_state_offset: cursor,
            device_state_len,
            device_state_checksum: 0,
            blocks,
        })
    }

    pub fn is_complete(&self) -> bool {
        self.flags & FLAG_COMPLETE != 0
    }

    /// Bytes of the header and block table.
    pub fn table_len(&self) -> u64 {
        FILE_HEADER_LEN + BLOCK_ENTRY_LEN * self.blocks.len() as u64
    }

    pub fn specs(&self) -> Vec<BlockSpec> {
        self.blocks.iter().map(BlockLayout::spec).collect()
    }

    pub fn total_ram(&self) -> u64 {
        self.blocks.iter().map(|b| b.len).sum()
    }

    pub fn pages_present(&self) -> u64 {
        self.blocks.iter().map(|b| b.pages_present).sum()
    }

    /// The header and block table as they go at offset 0, checksum included.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.table_len() as usize);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&(self.blocks.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.region_size.to_le_bytes());
        out.extend_from_slice(&self.file_len.to_le_bytes());
        out.extend_from_slice(&self.device_state_offset.to_le_bytes());
        out.extend_from_slice(&self.device_state_len.to_le_bytes());
        out.extend_from_slice(&self.device_state_checksum.to_le_bytes());
        out.extend_from_slice(&[0; 8]);
        for b in &self.blocks {
            encode_entry(b, &mut out);
        }
        let sum = header_checksum(&out);
        out[56..64].copy_from_slice(&sum.to_le_bytes());
        out
    }

    /// Reads and checks the header and block table of `file`, whose name
    /// `path` is used in errors. Every offset and length is checked against
    /// the file's real size before anything is returned.
    pub fn read(file: &File, path: &Path) -> Result<Self, RamError> {
        let actual = file
            .metadata()
            .map_err(|source| io_err(path, "reading the size of", 0, source))?
            .len();
        if actual < FILE_HEADER_LEN {
            return Err(RamError::Truncated {
                path: path.into(),
                len: actual,
                need: FILE_HEADER_LEN,
                what: "the file header".into(),
            });
        }
        let mut head = vec![0u8; FILE_HEADER_LEN as usize];
        read_at(file, path, &mut head, 0, "the file header")?;
        let fixed = Fixed::decode(&head, path)?;
        let table_len = FILE_HEADER_LEN + BLOCK_ENTRY_LEN * u64::from(fixed.block_count);
        if actual < table_len {
            return Err(RamError::Truncated {
                path: path.into(),
                len: actual,
                need: table_len,
                what: format!("the block table of {} block(s)", fixed.block_count),
            });
        }
        head.resize(table_len as usize, 0);
        read_at(
            file,
            path,
            &mut head[FILE_HEADER_LEN as usize..],
            FILE_HEADER_LEN,
            "the block table",
        )?;
        let stored = u64::from_le_bytes(head[56..64].try_into().expect("8 bytes"));
        if header_checksum(&head) != stored {
            return Err(RamError::HeaderChecksum { path: path.into() });
        }
        let blocks = head[FILE_HEADER_LEN as usize..]
            .chunks_exact(BLOCK_ENTRY_LEN as usize)
            .enumerate()
            .map(|(i, e)| decode_entry(e, i, path))
            .collect::<Result<Vec<_>, _>>()?;
        let layout = Self {
            flags: fixed.flags,
            region_size: fixed.region_size,
            file_len: fixed.file_len,
            device_state_offset: fixed.device_state_offset,
            device_state_len: fixed.device_state_len,
            device_state_checksum: fixed.device_state_checksum,
            blocks,
        };
        layout.check(path, actual)?;
        Ok(layout)
    }

    /// Every rule a file must follow, against its real length `actual`.
    fn check(&self, path: &Path, actual: u64) -> Result<(), RamError> {
        if actual < self.file_len {
            return Err(RamError::Truncated {
                path: path.into(),
                len: actual,
                need: self.file_len,
                what: "the length its header gives".into(),
            });
        }
        if actual > self.file_len {
            return Err(RamError::Corrupt {
                path: path.into(),
                what: format!(
                    "the file is {actual} bytes but its header says {} (trailing bytes)",
                    self.file_len
                ),
            });
        }
        if !self.is_complete() {
            return Err(RamError::Corrupt {
                path: path.into(),
                what: "the save never finished (header not marked complete)".into(),
            });
        }
        if self.device_state_len > MAX_DEVICE_STATE {
            return Err(RamError::Corrupt {
                path: path.into(),
                what: format!(
                    "header at offset 0x28 gives a device state of {} bytes (at most {MAX_DEVICE_STATE})",
                    self.device_state_len
                ),
            });
        }
        // Regions are what `plan` makes them: 1 MiB, or the largest page.
        // (A larger one would only make every reader stage more memory.)
        let max_page = self
            .blocks
            .iter()
            .map(|b| b.page_size)
            .max()
            .unwrap_or(4096);
        if self.region_size != DEFAULT_REGION_SIZE.max(max_page) {
            return Err(RamError::Corrupt {
                path: path.into(),
                what: format!(
                    "header at offset 0x14 gives region size {}, but blocks whose largest page is {max_page} bytes have regions of {}",
                    self.region_size,
                    DEFAULT_REGION_SIZE.max(max_page)
                ),
            });
        }
        let floor = self.table_len();
        let within = |block: &str, what: &'static str, offset: u64, len: u64| {
            check_range(path, block, what, offset, len, floor, self.file_len)
        };
        for (i, b) in self.blocks.iter().enumerate() {
            if self.blocks[..i].iter().any(|o| o.name == b.name) {
                return Err(RamError::DuplicateName(b.name.clone()));
            }
            if !self.region_size.is_multiple_of(b.page_size) {
                return Err(RamError::BadField {
                    path: path.into(),
                    block: b.name.clone(),
                    what: format!(
                        "page size {} does not divide the region size {}",
                        b.page_size, self.region_size
                    ),
                });
            }
            if b.pages_offset % PAGES_ALIGN != 0 {
                return Err(RamError::BadField {
                    path: path.into(),
                    block: b.name.clone(),
                    what: format!("pages offset {:#x} is not 1 MiB aligned", b.pages_offset),
                });
            }
            if b.pages_present > b.pages() {
                return Err(RamError::BadField {
                    path: path.into(),
                    block: b.name.clone(),
                    what: format!(
                        "{} pages present but the block has only {}",
                        b.pages_present,
                        b.pages()
                    ),
                });
            }
            within(&b.name, "bitmap", b.bitmap_offset, b.bitmap_len())?;
            within(
                &b.name,
                "checksum table",
                b.checksums_offset,
                b.checksums_len(self.region_size),
            )?;
            within(&b.name, "pages", b.pages_offset, b.len)?;
        }
        within(
            "-",
            "device state",
            self.device_state_offset,
            self.device_state_len,
        )
    }

    /// Block `index`'s bitmap of present pages as 64-bit words, checked
    /// against its checksum and its count of present pages.
    pub fn read_bitmap(
        &self,
        file: &File,
        path: &Path,
        index: usize,
    ) -> Result<Vec<u64>, RamError> {
        let b = &self.blocks[index];
        let bytes = read_table(
            file,
            path,
            b,
            "bitmap",
            b.bitmap_offset,
            b.bitmap_len(),
            b.bitmap_checksum,
        )?;
        let words = words_of(&bytes);
        let set: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
        let tail_ok = tail_bits_clear(&words, b.pages());
        if set != b.pages_present || !tail_ok {
            return Err(RamError::BadField {
                path: path.into(),
                block: b.name.clone(),
                what: format!(
                    "bitmap at offset {:#x} marks {set} pages (header: {}){}",
                    b.bitmap_offset,
                    b.pages_present,
                    if tail_ok {
                        ""
                    } else {
                        ", some past the end of the block"
                    }
                ),
            });
        }
        Ok(words)
    }

    /// Block `index`'s region checksums, checked against their own checksum.
    pub fn read_checksums(
        &self,
        file: &File,
        path: &Path,
        index: usize,
    ) -> Result<Vec<u64>, RamError> {
        let b = &self.blocks[index];
        let len = b.checksums_len(self.region_size);
        let bytes = read_table(
            file,
            path,
            b,
            "checksum table",
            b.checksums_offset,
            len,
            b.checksums_checksum,
        )?;
        Ok(words_of(&bytes))
    }

    /// The device state, checked against its checksum.
    pub fn read_device_state(&self, file: &File, path: &Path) -> Result<Vec<u8>, RamError> {
        let mut bytes = vec![0u8; self.device_state_len as usize];
        read_at(
            file,
            path,
            &mut bytes,
            self.device_state_offset,
            "the device state",
        )?;
        if region_checksum(&bytes) != self.device_state_checksum {
            return Err(RamError::TableChecksum {
                path: path.into(),
                block: "-".into(),
                what: "device state",
                offset: self.device_state_offset,
            });
        }
        Ok(bytes)
    }
}

/// `len` zero bytes to read `what` into, or an error if memory for them
/// cannot be had (a file's tables are sized by its blocks' lengths).
fn zeroed(len: u64, path: &Path, what: &str) -> Result<Vec<u8>, RamError> {
    let mut v = Vec::new();
    usize::try_from(len)
        .ok()
        .and_then(|n| v.try_reserve_exact(n).ok().map(|()| n))
        .map(|n| {
            v.resize(n, 0);
            v
        })
        .ok_or_else(|| RamError::Corrupt {
            path: path.into(),
            what: format!("cannot allocate {len} bytes to read the {what}"),
        })
}

/// Reads block `b`'s table `what` (`len` bytes at `offset`) and checks it
/// against the checksum its header holds.
fn read_table(
    file: &File,
    path: &Path,
    b: &BlockLayout,
    what: &'static str,
    offset: u64,
    len: u64,
    checksum: u64,
) -> Result<Vec<u8>, RamError> {
    let mut bytes = zeroed(len, path, what)?;
    read_at(file, path, &mut bytes, offset, what).map_err(|e| match e {
        RamError::FileIo { source, .. } => RamError::FileIo {
            path: path.into(),
            what: format!("reading the {what} of block '{}'", b.name),
            offset,
            source,
        },
        other => other,
    })?;
    if region_checksum(&bytes) != checksum {
        return Err(RamError::TableChecksum {
            path: path.into(),
            block: b.name.clone(),
            what,
            offset,
        });
    }
    Ok(bytes)
}

/// Writes the metadata a finished save needs: each block's bitmap and
/// checksum table, the device state, and last the header marked complete,
/// so a file whose writer died midway is never taken for a whole one.
/// `layout`'s checksums and present counts are filled in here.
pub fn write_metadata(
    file: &File,
    path: &Path,
    layout: &mut FileLayout,
    bitmaps: &[Vec<u64>],
    checksums: &[Vec<u64>],
    device_state: &[u8],
) -> Result<(), RamError> {
    assert_eq!(bitmaps.len(), layout.blocks.len());
    assert_eq!(checksums.len(), layout.blocks.len());
    assert_eq!(device_state.len() as u64, layout.device_state_len);
    for ((b, bits), sums) in layout.blocks.iter_mut().zip(bitmaps).zip(checksums) {
        let bitmap = bytes_of(bits);
        let table = bytes_of(sums);
        b.bitmap_checksum = region_checksum(&bitmap);
        b.checksums_checksum = region_checksum(&table);
        b.pages_present = bits.iter().map(|w| u64::from(w.count_ones())).sum();
        write_at(file, path, &bitmap, b.bitmap_offset, "a bitmap")?;
        write_at(file, path, &table, b.checksums_offset, "a checksum table")?;
    }
    layout.device_state_checksum = region_checksum(device_state);
    write_at(
        file,
        path,
        device_state,
        layout.device_state_offset,
        "the device state",
    )?;
    layout.flags |= FLAG_COMPLETE;
    write_at(file, path, &layout.encode(), 0, "the header")
}

/// The fixed part of the header, decoded and checked in isolation.
struct Fixed {
    flags: u32,
    block_count: u32,
    region_size: u32,
    file_len: u64,
    device_state_offset: u64,
    device_state_len: u64,
    device_state_checksum: u64,
}

impl Fixed {
    fn decode(h: &[u8], path: &Path) -> Result<Self, RamError> {
        if h[0..8] != MAGIC {
            return Err(RamError::BadMagic {
                path: path.into(),
                found: String::from_utf8_lossy(&h[0..8]).escape_debug().to_string(),
            });
        }
        let version = le32(h, 8);
        if version != VERSION {
            return Err(RamError::BadVersion {
                path: path.into(),
                found: version,
                expected: VERSION,
            });
        }
        let block_count = le32(h, 16);
        if block_count == 0 || block_count > MAX_BLOCKS {
            return Err(RamError::Corrupt {
                path: path.into(),
                what: format!(
                    "header at offset 0x10 gives {block_count} blocks (1 to {MAX_BLOCKS} allowed)"
                ),
            });
        }
        let region_size = le32(h, 20);
        if !region_size.is_power_of_two() || !(4096..=1 << 30).contains(&region_size) {
            return Err(RamError::Corrupt {
                path: path.into(),
                what: format!("header at offset 0x14 gives region size {region_size}, not a power of two from 4 KiB to 1 GiB"),
            });
        }
        Ok(Self {
            flags: le32(h, 12),
            block_count,
            region_size,
            file_len: le64(h, 24),
            device_state_offset: le64(h, 32),
            device_state_len: le64(h, 40),
            device_state_checksum: le64(h, 48),
        })
    }
}

fn encode_entry(b: &BlockLayout, out: &mut Vec<u8>) {
    let mut name = [0u8; 256];
    name[..b.name.len()].copy_from_slice(b.name.as_bytes());
    out.extend_from_slice(&(b.name.len() as u32).to_le_bytes());
    out.extend_from_slice(&name);
    out.extend_from_slice(&b.page_size.to_le_bytes());
    for v in [
        b.len,
        b.pages_offset,
        b.bitmap_offset,
        b.bitmap_checksum,
        b.checksums_offset,
        b.checksums_checksum,
        b.pages_present,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn decode_entry(e: &[u8], index: usize, path: &Path) -> Result<BlockLayout, RamError> {
    let entry_offset = FILE_HEADER_LEN + index as u64 * BLOCK_ENTRY_LEN;
    let bad = |block: String, what: String| RamError::BadField {
        path: path.into(),
        block,
        what: format!("{what} (block table entry at offset {entry_offset:#x})"),
    };
    let name_len = le32(e, 0) as usize;
    if name_len == 0 || name_len > NAME_MAX {
        return Err(bad(format!("#{index}"), format!("name length {name_len}")));
    }
    let name = std::str::from_utf8(&e[4..4 + name_len])
        .map_err(|_| bad(format!("#{index}"), "name is not UTF-8".into()))?
        .to_string();
    let page_size = le32(e, 260);
    if !page_size.is_power_of_two() || !(4096..=1 << 30).contains(&page_size) {
        return Err(bad(name, format!("page size {page_size}")));
    }
    let len = le64(e, 264);
    if len == 0 || !len.is_multiple_of(u64::from(page_size)) {
        return Err(bad(
            name,
            format!("length {len} is not a positive multiple of the page size {page_size}"),
        ));
    }
    Ok(BlockLayout {
        name,
        len,
        page_size,
        pages_offset: le64(e, 272),
        bitmap_offset: le64(e, 280),
        bitmap_checksum: le64(e, 288),
        checksums_offset: le64(e, 296),
        checksums_checksum: le64(e, 304),
        pages_present: le64(e, 312),
    })
}

/// `[offset, offset + len)` must lie after the block table and inside the file.
fn check_range(
    path: &Path,
    block: &str,
    what: &'static str,
    offset: u64,
    len: u64,
    floor: u64,
    file_len: u64,
) -> Result<(), RamError> {
    let end = offset.checked_add(len);
    if offset < floor || end.is_none_or(|e| e > file_len) {
        return Err(RamError::OutsideFile {
            path: path.into(),
            block: block.into(),
            what,
            offset,
            len,
            floor,
            file_len,
        });
    }
    Ok(())
}

fn header_checksum(header_and_table: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(&header_and_table[..56]);
    h.update(&header_and_table[FILE_HEADER_LEN as usize..]);
    h.digest()
}

fn tail_bits_clear(words: &[u64], pages: u64) -> bool {
    let used = pages % 64;
    used == 0 || words.last().is_none_or(|w| w >> used == 0)
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn words_of(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

fn bytes_of(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn io_err(path: &Path, what: &str, offset: u64, source: std::io::Error) -> RamError {
    RamError::FileIo {
        path: PathBuf::from(path),
        what: what.into(),
        offset,
        source,
    }
}

fn read_at(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
    what: &str,
) -> Result<(), RamError> {
    file.read_exact_at(buf, offset)
        .map_err(|source| io_err(path, &format!("reading {what}"), offset, source))
}

fn write_at(file: &File, path: &Path, buf: &[u8], offset: u64, what: &str) -> Result<(), RamError> {
    file.write_all_at(buf, offset)
        .map_err(|source| io_err(path, &format!("writing {what}"), offset, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs() -> Vec<BlockSpec> {
        vec![
            BlockSpec {
                name: "ram".into(),
                len: 3 << 20,
                page_size: 4096,
            },
            BlockSpec {
                name: "vram".into(),
                len: 64 * 4096 + 4096,
                page_size: 4096,
            },
        ]
    }

    /// A new file `g.ferry` of `len` bytes (sparse) in a fresh directory,
    /// starting with `head`; the directory lives as long as the handle.
    fn file_with(head: &[u8], len: u64) -> (tempfile::TempDir, PathBuf, File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.ferry");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all_at(head, 0).unwrap();
        f.set_len(len).unwrap();
        (dir, path, f)
    }

    #[test]
    fn plan_aligns_pages_and_places_everything_inside_the_file() {
        let l = FileLayout::plan(&specs(), 100).unwrap();
        assert_eq!(l.region_size, DEFAULT_REGION_SIZE);
        for b in &l.blocks {
            assert_eq!(b.pages_offset % PAGES_ALIGN, 0);
            assert_eq!(b.bitmap_offset % META_ALIGN, 0);
            assert!(b.bitmap_offset >= l.table_len());
            assert!(b.checksums_offset >= b.bitmap_offset + b.bitmap_len());
            assert!(b.pages_offset >= b.checksums_offset + b.checksums_len(l.region_size));
        }
        assert!(l.blocks[1].pages_offset >= l.blocks[0].pages_offset + l.blocks[0].len);
        assert_eq!(l.blocks[1].bitmap_len(), 16);
        assert_eq!(l.device_state_offset % PAGES_ALIGN, 0);
        assert_eq!(l.file_len, l.device_state_offset + 100);
        assert_eq!(l.encode().len() as u64, l.table_len());
    }

    #[test]
    fn metadata_round_trips_through_a_file() {
        let mut l = FileLayout::plan(&specs(), 5).unwrap();
        let (_dir, path, f) = file_with(&[], l.file_len);
        let bitmaps = vec![vec![0b1011, 0, 0], vec![u64::MAX, 1]];
        let sums = vec![vec![1, 2, 3], vec![9]];
        write_metadata(&f, &path, &mut l, &bitmaps, &sums, b"state").unwrap();
        let r = FileLayout::read(&f, &path).unwrap();
        assert_eq!(r, l);
        assert_eq!(r.blocks[0].pages_present, 3);
        assert_eq!(r.blocks[1].pages_present, 65);
        assert_eq!(r.read_bitmap(&f, &path, 1).unwrap(), bitmaps[1]);
        assert_eq!(r.read_checksums(&f, &path, 0).unwrap(), sums[0]);
        assert_eq!(r.read_device_state(&f, &path).unwrap(), b"state");
    }

    proptest::proptest! {
        /// A header and block table with any bytes changed (and the header
        /// checksum sealed again, so the field checks are what is tested),
        /// in a file of the header's length or not: reading it never
        /// panics, and whatever it accepts lies inside the file, after the
        /// table, with page sizes dividing the region size.
        #[test]
        fn any_header_is_refused_or_lies_inside_the_file(
            changes in proptest::collection::vec((0usize..704, proptest::num::u8::ANY), 1..6),
            complete in proptest::bool::ANY,
            length_delta in -2i64..=2,
        ) {
            let mut l = FileLayout::plan(&specs(), 100).unwrap();
            if complete {
                l.flags |= FLAG_COMPLETE;
            }
            let mut head = l.encode();
            for (at, v) in changes {
                let at = at % head.len();
                if !(56..64).contains(&at) {
                    head[at] = v;
                }
            }
            let sum = header_checksum(&head);
            head[56..64].copy_from_slice(&sum.to_le_bytes());
            let len = (l.file_len as i64 + length_delta * 4096).max(head.len() as i64);
            let (_dir, path, f) = file_with(&head, len as u64);
            if let Ok(r) = FileLayout::read(&f, &path) {
                proptest::prop_assert!(r.is_complete());
                proptest::prop_assert_eq!(r.file_len, len as u64);
                let inside = |offset: u64, n: u64| {
                    offset >= r.table_len() && offset.checked_add(n).is_some_and(|e| e <= r.file_len)
                };
                for b in &r.blocks {
                    proptest::prop_assert_eq!(r.region_size % b.page_size, 0);
                    proptest::prop_assert!(inside(b.bitmap_offset, b.bitmap_len()));
                    proptest::prop_assert!(inside(b.checksums_offset, b.checksums_len(r.region_size)));
                    proptest::prop_assert!(inside(b.pages_offset, b.len));
                }
                proptest::prop_assert!(inside(r.device_state_offset, r.device_state_len));
                proptest::prop_assert!(r.device_state_len <= MAX_DEVICE_STATE);
                let max_page = r.blocks.iter().map(|b| b.page_size).max().unwrap();
                proptest::prop_assert_eq!(r.region_size, DEFAULT_REGION_SIZE.max(max_page));
            }
        }
    }

    /// A device state past the limit is refused when planning a save, and
    /// in a file (sparse, so it costs no disk) before anything is read.
    #[test]
    fn a_device_state_past_the_limit_is_refused() {
        let e = FileLayout::plan(&specs(), MAX_DEVICE_STATE + 1).unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
        let mut l = FileLayout::plan(&specs(), MAX_DEVICE_STATE).unwrap();
        l.device_state_len += 4096;
        l.file_len += 4096;
        l.flags |= FLAG_COMPLETE;
        let (_dir, path, f) = file_with(&l.encode(), l.file_len);
        let e = FileLayout::read(&f, &path).unwrap_err().to_string();
        assert!(e.contains("0x28") && e.contains("device state"), "{e}");
    }

    /// Checksums fed piece by piece, with zeros given as counts, equal the
    /// one-shot checksum of the same bytes, short inputs (xxh3 treats
    /// inputs up to 240 bytes apart) and long ones alike.
    #[test]
    fn stream_checksums_equal_one_shot_checksums() {
        for len in [
            0usize,
            1,
            16,
            17,
            128,
            129,
            240,
            241,
            1000,
            4096,
            (1 << 20) + 17,
        ] {
            let bytes: Vec<u8> = (0..len)
                .map(|i| {
                    if (i / 300) % 3 == 1 {
                        0
                    } else {
                        (i % 251) as u8 + 1
                    }
                })
                .collect();
            let mut s = StreamChecksum::new();
            let mut i = 0;
            while i < len {
                // Zeros as counts, the rest as bytes, in uneven pieces.
                let zero = bytes[i] == 0;
                let mut j = i;
                while j < len && (bytes[j] == 0) == zero && j - i < 777 {
                    j += 1;
                }
                if zero {
                    s.zeros((j - i) as u64);
                } else {
                    s.bytes(&bytes[i..j]);
                }
                i = j;
            }
            assert_eq!(s.len(), len as u64);
            assert_eq!(s.finish(), region_checksum(&bytes), "length {len}");
            assert_eq!(zero_checksum(len as u64), region_checksum(&vec![0; len]));
        }
    }

    /// The word-at-a-time scans agree with a bit-by-bit one over ranges
    /// that start and end inside words, on word boundaries, or are empty.
    #[test]
    fn present_page_scans_match_bit_by_bit() {
        let bitmap = [0x8000_0000_0000_0001u64, 0, u64::MAX, 0x00F0_0000_0000_0F00];
        let naive = |first: u64, end: u64| -> Vec<u64> {
            (first..end)
                .filter(|&i| bitmap[(i / 64) as usize] & (1 << (i % 64)) != 0)
                .collect()
        };
        for (first, end) in [
            (0, 256),
            (1, 63),
            (0, 1),
            (63, 65),
            (64, 128),
            (65, 200),
            (130, 130),
            (200, 100),
            (200, 256),
            (255, 256),
        ] {
            let want = naive(first, end);
            let got: Vec<u64> = present_pages(&bitmap, first, end).collect();
            assert_eq!(got, want, "[{first}, {end})");
            assert_eq!(count_present(&bitmap, first, end), want.len() as u64);
            assert_eq!(any_present(&bitmap, first, end), !want.is_empty());
        }
    }

    /// A FIFO, a directory and a character device are refused at once
    /// (opening the FIFO, which has no writer, does not block), naming the
    /// path and its kind; a regular file opens, and reads block as usual.
    #[test]
    fn only_regular_files_open() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let read = File::options().read(true).clone();
        for (path, kind) in [
            (fifo.as_path(), "a FIFO"),
            (dir.path(), "a directory"),
            (Path::new("/dev/null"), "a character device"),
        ] {
            let e = open_regular(path, &read, 0, "opening", "try again").unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains(&path.display().to_string())
                    && text.contains(&format!("is {kind}, not a regular file"))
                    && text.contains("try again"),
                "{text}"
            );
        }
        let (_d, path, _f) = file_with(b"abc", 3);
        let f = open_regular(&path, &read, 0, "opening", "-").unwrap();
        let mut b = [0u8; 3];
        f.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"abc");
        // SAFETY: F_GETFL on a descriptor f owns.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0, "O_NONBLOCK is off again");
        let e = open_regular(&dir.path().join("none"), &read, 0, "opening it", "-").unwrap_err();
        assert!(e.to_string().contains("opening it"), "{e}");
    }

    #[test]
    fn output_paths_must_be_absent_or_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        check_output_path(&file, "-").unwrap();
        check_output_path(&dir.path().join("none"), "-").unwrap();
        for (p, kind) in [
            (&link, "a symbolic link"),
            (&dir.path().to_path_buf(), "a directory"),
        ] {
            let e = check_output_path(p, "do this").unwrap_err().to_string();
            assert!(
                e.contains(&format!("is {kind}, not a regular file: do this")),
                "{e}"
            );
        }
    }

    #[test]
    fn bitmap_bits_past_the_block_are_refused() {
        assert!(tail_bits_clear(&[u64::MAX, 1], 65));
        assert!(!tail_bits_clear(&[u64::MAX, 2], 65));
        assert!(tail_bits_clear(&[u64::MAX], 64));
    }
}
